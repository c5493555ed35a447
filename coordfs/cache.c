/*
 * cache.c — the watch-coherent key cache of one tree (/config, /services).
 *
 * Every key below the tree's prefix is held in memory with its value and
 * etcd metadata, keyed by its path relative to the tree.  Each directory
 * level of a key also has a node (so that a directory knows how many keys are
 * below it and readdir only has to look at direct children).  Deleted keys
 * keep their node with present = 0 and the revision of the delete, so that a
 * late event older than what this mount already applied (its own write,
 * applied from the Put's answer) is recognised and ignored.
 *
 * A key that cannot be a file name (cfs_key_problem says why) is kept too,
 * marked bad: left out of the tree, counted in nbad, listed by
 * cache_skipped for /status.  cache_apply raises newbad when a key becomes
 * such a key, so that its caller can log it once (cache.c logs nothing: it
 * stays pure, for tests/fuzz/fuzz_coordfs_cache.c).
 *
 * Locking: every function here is called with g.lock held.
 */
#include "coordfs.h"

#include <assert.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static uint64_t hash(const char *s) {
  uint64_t h = 1469598103934665603ull;
  for (; *s; s++)
    h = (h ^ (unsigned char)*s) * 1099511628211ull;
  return h;
}

struct cfs_node *cache_find(struct cfs_cache *c, const char *path) {
  if (!c->cap)
    return NULL;
  for (struct cfs_node *n = c->tab[hash(path) % c->cap]; n; n = n->next)
    if (!strcmp(n->path, path))
      return n;
  return NULL;
}

static void grow(struct cfs_cache *c) {
  size_t cap = c->cap ? c->cap * 2 : 256;
  struct cfs_node **tab = calloc(cap, sizeof(*tab));
  if (!tab)
    return;
  for (size_t i = 0; i < c->cap; i++) {
    struct cfs_node *n = c->tab[i], *next;
    for (; n; n = next) {
      next = n->next;
      size_t h = hash(n->path) % cap;
      n->next = tab[h];
      tab[h] = n;
    }
  }
  free(c->tab);
  c->tab = tab;
  c->cap = cap;
}

struct cfs_node *cache_node(struct cfs_cache *c, const char *path) {
  struct cfs_node *n = cache_find(c, path);
  if (n)
    return n;
  if (c->n + 1 > c->cap * 3 / 4)
    grow(c);
  if (!c->cap)
    return NULL;
  n = calloc(1, sizeof(*n));
  if (!n || !(n->path = strdup(path))) {
    free(n);
    return NULL;
  }
  size_t h = hash(path) % c->cap;
  n->next = c->tab[h];
  c->tab[h] = n;
  c->n++;
  return n;
}

const char *cfs_key_problem(const char *key, size_t len) {
  if (len == 0)
    return "empty name";
  if (memchr(key, 0, len))
    return "contains a NUL byte";
  const char *p = key, *end = key + len;
  while (p <= end) {
    const char *s = memchr(p, '/', (size_t)(end - p));
    size_t part = s ? (size_t)(s - p) : (size_t)(end - p);
    if (part == 0)
      return "empty path component (a leading, trailing or double '/')";
    if (part > 255)
      return "path component longer than 255 bytes";
    if ((part == 1 && p[0] == '.') || (part == 2 && p[0] == '.' && p[1] == '.'))
      return "path component '.' or '..'";
    if (part == 6 && !memcmp(p, ".value", 6))
      return "path component '.value' (reserved for a directory's own value)";
    if (!s)
      break;
    p = s + 1;
  }
  return NULL;
}

int cfs_key_ok(const char *key, size_t len) {
  return !cfs_key_problem(key, len);
}

/* Adds d to the descendant count of every ancestor directory of path.  A
 * key written in a mount-local directory makes it an ordinary one (it now
 * exists because of keys, and goes with them): each such localdir cleared
 * on the way up is taken off the nlocal of the ancestors above it. */
static void add_ancestors(struct cfs_cache *c, const char *path, int d) {
  char *p = strdup(path);
  if (!p)
    return;
  int cleared = 0;
  for (char *s = strrchr(p, '/'); s; s = strrchr(p, '/')) {
    *s = 0;
    struct cfs_node *a = cache_node(c, p);
    if (a) {
      a->ndesc += d;
      a->nlocal -= cleared;
      assert(a->ndesc >= 0 && a->nlocal >= 0);
      if (d > 0 && a->localdir) {
        a->localdir = 0;
        cleared++;
      }
    }
  }
  free(p);
}

void cache_set_localdir(struct cfs_cache *c, struct cfs_node *n, int on) {
  on = !!on;
  if (n->localdir == on)
    return;
  n->localdir = on;
  char *p = strdup(n->path);
  if (!p)
    return; /* n->path outlives this call: p is only a scratch copy */
  for (char *s = strrchr(p, '/'); s; s = strrchr(p, '/')) {
    *s = 0;
    struct cfs_node *a = cache_node(c, p);
    if (a) {
      a->nlocal += on ? 1 : -1;
      assert(a->nlocal >= 0);
    }
  }
  free(p);
}

/* The node path of a key.  A key with a NUL byte cannot be a file name,
 * and cut at the NUL it would alias another key ("a\0x" would overwrite the
 * node of "a"): such keys, and the keys starting with '/' (never file names
 * either), get "/" + the key in hex, a space no other key maps to. */
static char *node_path(const char *key, size_t key_len) {
  if (key_len && !memchr(key, 0, key_len) && key[0] != '/')
    return strndup(key, key_len);
  char *p = malloc(2 * key_len + 2);
  if (!p)
    return NULL;
  p[0] = '/';
  for (size_t i = 0; i < key_len; i++)
    snprintf(p + 1 + 2 * i, 3, "%02x", (unsigned char)key[i]);
  p[1 + 2 * key_len] = 0;
  return p;
}

int cache_apply(struct cfs_cache *c, const char *key, size_t key_len, int is_put, const void *val, size_t len,
                int64_t rev, int64_t create_rev, int64_t version, int64_t lease) {
  int ok = cfs_key_ok(key, key_len);
  char *path = node_path(key, key_len);
  if (!path)
    return 0;
  struct cfs_node *n = cache_node(c, path);
  free(path);
  if (!n)
    return 0;
  if (rev > c->rev)
    c->rev = rev;
  if (rev < n->rev)
    return 0;
  if (rev == n->rev) {
    /* the same change seen twice (the Put's answer and the watch event):
     * keep what is known; the local answer passes -1 for unknown fields */
    if (is_put && n->present) {
      if (create_rev >= 0)
        n->create_rev = create_rev;
      if (version >= 0)
        n->version = version;
      if (lease >= 0)
        n->lease = lease;
    }
    return 0;
  }
  if (is_put && version < 0) { /* this mount's own write: work out the rest */
    version = n->present ? n->version + 1 : 1;
    create_rev = n->present ? n->create_rev : rev;
  }
  int was = n->present && !n->bad, was_bad = n->present && n->bad;
  if (was_bad)
    c->nbad--;
  n->rev = rev;
  clock_gettime(CLOCK_REALTIME, &n->mtime);
  n->atime = n->mtime;
  free(n->val);
  n->val = NULL;
  n->len = 0;
  if (is_put) {
    n->val = malloc(len + 1);
    if (n->val) {
      memcpy(n->val, val, len);
      n->val[len] = 0;
      n->len = len;
    }
    n->present = 1;
    n->bad = !ok;
    n->mod_rev = rev;
    n->create_rev = create_rev;
    n->version = version;
    n->lease = lease;
    if (n->bad)
      c->nbad++;
    if (n->bad && !was_bad)
      c->newbad = 1;
  } else {
    n->present = 0;
    n->bad = 0;
    n->mod_rev = n->create_rev = n->version = n->lease = 0;
  }
  int now = n->present && !n->bad;
  if (now != was)
    add_ancestors(c, n->path, now ? 1 : -1);
  return 1;
}

void cache_pending(struct cfs_cache *c, const char *key, int d) {
  assert(d == 1 || d == -1);
  if (d > 0) {
    struct cfs_node *n = cache_node(c, key);
    if (n)
      n->pending++;
    return;
  }
  /* the end of a write whose start could not allocate its node finds no
   * mark to take back (or a node made since, at 0): pending never goes
   * below 0, or every later write of the key would look like someone
   * else's and be echoed */
  struct cfs_node *n = cache_find(c, key);
  if (n && n->pending > 0)
    n->pending--;
}

int cache_is_dir(const struct cfs_node *n) {
  return n && (n->ndesc > 0 || n->localdir || n->nlocal > 0);
}

int cache_is_file(const struct cfs_node *n) {
  return n && ((n->present && !n->bad) || n->creating > 0);
}

void cache_children(struct cfs_cache *c, const char *dir,
                    void (*fn)(struct cfs_node *n, const char *name, void *arg), void *arg) {
  size_t dl = strlen(dir);
  for (size_t i = 0; i < c->cap; i++)
    for (struct cfs_node *n = c->tab[i]; n; n = n->next) {
      const char *name;
      if (dl == 0)
        name = n->path;
      else if (!strncmp(n->path, dir, dl) && n->path[dl] == '/')
        name = n->path + dl + 1;
      else
        continue;
      if (!*name || strchr(name, '/'))
        continue;
      if (cache_is_dir(n) || cache_is_file(n))
        fn(n, name, arg);
    }
}

/* A node that holds nothing any more and that no late answer can touch:
 * a deleted key the watch has gone past, with nothing below or open. */
static int prunable(const struct cfs_cache *c, const struct cfs_node *n) {
  return !n->present && !n->ndesc && !n->localdir && !n->nlocal && !n->creating && !n->pending &&
         n->rev <= c->notified;
}

static void drop(struct cfs_cache *c, struct cfs_node *n) {
  struct cfs_node **pp = &c->tab[hash(n->path) % c->cap];
  for (; *pp; pp = &(*pp)->next)
    if (*pp == n) {
      *pp = n->next;
      c->n--;
      free(n->path);
      free(n->val);
      free(n);
      return;
    }
}

void cache_prune(struct cfs_cache *c, const char *key) {
  char *p = strdup(key);
  if (!p)
    return;
  for (;;) {
    struct cfs_node *n = cache_find(c, p);
    if (n && prunable(c, n))
      drop(c, n);
    else if (n)
      break; /* an ancestor still in use keeps the ones above it too */
    char *s = strrchr(p, '/');
    if (!s)
      break;
    *s = 0;
  }
  free(p);
}

static int nibble(char h) {
  return h >= 'a' ? h - 'a' + 10 : h - '0';
}

void cache_skipped(struct cfs_cache *c, void (*fn)(const char *key, size_t len, void *arg), void *arg) {
  for (size_t i = 0; i < c->cap; i++)
    for (struct cfs_node *n = c->tab[i]; n; n = n->next) {
      if (!n->present || !n->bad)
        continue;
      if (n->path[0] != '/') {
        fn(n->path, strlen(n->path), arg);
        continue;
      }
      /* "/" + the key in hex (node_path) */
      size_t len = (strlen(n->path) - 1) / 2;
      char *k = malloc(len + 1);
      if (!k)
        continue;
      for (size_t j = 0; j < len; j++)
        k[j] = (char)(nibble(n->path[1 + 2 * j]) << 4 | nibble(n->path[2 + 2 * j]));
      k[len] = 0;
      fn(k, len, arg);
      free(k);
    }
}

void cache_free(struct cfs_cache *c) {
  for (size_t i = 0; i < c->cap; i++) {
    struct cfs_node *n = c->tab[i], *next;
    for (; n; n = next) {
      next = n->next;
      free(n->path);
      free(n->val);
      free(n);
    }
  }
  free(c->tab);
  c->tab = NULL;
  c->cap = c->n = 0;
}

int cache_xattr(const struct cfs_node *n, const char *name, char *buf, size_t size) {
  static const char names[] = "user.coord.create_revision\0user.coord.mod_revision\0"
                              "user.coord.version\0user.coord.lease";
  char tmp[32];
  const char *val;
  size_t len;
  if (!name) {
    val = n ? names : "";
    len = n ? sizeof(names) : 0;
  } else if (!n) {
    return -ENODATA;
  } else {
    int64_t v;
    if (!strcmp(name, "user.coord.create_revision"))
      v = n->create_rev;
    else if (!strcmp(name, "user.coord.mod_revision"))
      v = n->mod_rev;
    else if (!strcmp(name, "user.coord.version"))
      v = n->version;
    else if (!strcmp(name, "user.coord.lease"))
      v = n->lease;
    else
      return -ENODATA;
    len = (size_t)snprintf(tmp, sizeof(tmp), "%lld", (long long)v);
    val = tmp;
  }
  if (size == 0)
    return (int)len;
  if (size < len)
    return -ERANGE;
  memcpy(buf, val, len);
  return (int)len;
}
