/*
 * config.c — the /config tree: one file per key below /config/, directories
 * from the '/' in keys, and the key-and-prefix case shown as <dir>/.value.
 *
 * Directories exist because of the keys below them, or are mount-local
 * (cfs_node.localdir): made by mkdir here, or emptied here by rm, mv or
 * rmdir (keep_parent), until a key is written in them or they are removed.
 *
 * Reads are served from g.config, the cache that the watch thread keeps
 * coherent and that every acknowledged write of this mount updates from the
 * Put's answer before the write is acknowledged.
 *
 * Writes are buffered in the open file and committed whole with one request
 * on fsync, on the flush of the opener's last close (fs.c flush_commits:
 * the shell's `> file` opens, dup2()s and closes the first descriptor, and
 * that close must not publish the empty truncated value), or on release:
 *   - opened with O_TRUNC, created, or truncated to 0 before any write: a
 *     plain Put (the new content does not depend on the old);
 *   - otherwise (append, overwrite in place): a Txn that puts only if the
 *     key's mod revision is still the one read at open.  If someone else
 *     wrote in between the close fails with EBUSY and nothing is written.
 * A handle whose write or commit failed never commits afterwards: nothing
 * half-written reaches etcd.
 *
 * Locking: file->lock is held by the caller (fs.c) for every function that
 * takes a cfs_file; g.lock is taken here around cache access only, never
 * across an etcd call.
 */
#include "coordfs.h"
#include "log.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CONFIG_PREFIX "/config/"

#ifndef RENAME_EXCHANGE
#define RENAME_NOREPLACE (1 << 0)
#define RENAME_EXCHANGE (1 << 1)
#endif

static char *etcd_key(const char *key) {
  size_t n = strlen(key);
  char *k = malloc(sizeof(CONFIG_PREFIX) + n);
  if (k) {
    memcpy(k, CONFIG_PREFIX, sizeof(CONFIG_PREFIX) - 1);
    memcpy(k + sizeof(CONFIG_PREFIX) - 1, key, n + 1);
  }
  return k;
}

/* Marks this mount's write to key in flight (1) or done (-1). */
static void pending(const char *key, int d) {
  pthread_mutex_lock(&g.lock);
  cache_pending(&g.config, key, d);
  pthread_mutex_unlock(&g.lock);
}

static int is_value_path(const char *rel) {
  size_t n = strlen(rel);
  return n > 7 && !strcmp(rel + n - 7, "/.value");
}

char *config_key_of(const char *rel) {
  if (!strcmp(rel, ".value"))
    return NULL;
  if (is_value_path(rel))
    return strndup(rel, strlen(rel) - 7);
  return strdup(rel);
}

static size_t max_value(const char *key) {
  size_t over =
      CFS_REQUEST_OVERHEAD + strlen(key) + sizeof(CONFIG_PREFIX) + (g.o.prefix ? strlen(g.o.prefix) : 0);
  return CFS_MAX_REQUEST - over;
}

int config_load(void) {
  coord_range_opts_t ro = {.prefix = 1, .timeout_ms = g.o.timeout_ms};
  coord_kv_result_t *r = NULL;
  /* the whole of /config/, or only the --subtree (keys keep their path) */
  int rc = coord_kv_get(g.c, g.o.config_root ? g.o.config_root : CONFIG_PREFIX, &ro, &r);
  if (rc)
    return rc;
  pthread_mutex_lock(&g.lock);
  for (size_t i = 0; i < r->n; i++) {
    coord_kv_t *kv = &r->kvs[i];
    if (kv->key_len < sizeof(CONFIG_PREFIX) - 1)
      continue;
    cache_apply(&g.config, kv->key + sizeof(CONFIG_PREFIX) - 1, kv->key_len - (sizeof(CONFIG_PREFIX) - 1), 1,
                kv->value, kv->value_len, kv->mod_revision, kv->create_revision, kv->version, kv->lease);
  }
  if (r->revision > g.config.rev)
    g.config.rev = r->revision;
  g.config.notified = g.config.rev;
  pthread_mutex_unlock(&g.lock);
  coord_kv_result_free(r);
  return 0;
}

/* With g.lock held. */
static int stat_locked(const char *rel, struct stat *st) {
  mode_t dmode = S_IFDIR | (g.o.ro ? 0555 : 0755), fmode = S_IFREG | (g.o.ro ? 0444 : 0644);
  if (!*rel) {
    cfs_fill_stat(st, dmode, 0, NULL);
    return 0;
  }
  if (is_value_path(rel)) {
    char *k = config_key_of(rel);
    struct cfs_node *n = k ? cache_find(&g.config, k) : NULL;
    free(k);
    if (n && cache_is_dir(n) && cache_is_file(n)) {
      cfs_fill_stat(st, fmode, (off_t)n->len, &n->mtime);
      return 0;
    }
    return -ENOENT;
  }
  struct cfs_node *n = cache_find(&g.config, rel);
  if (cache_is_dir(n))
    cfs_fill_stat(st, dmode, 0, &n->mtime);
  else if (cache_is_file(n))
    cfs_fill_stat(st, fmode, (off_t)n->len, &n->mtime);
  else
    return -ENOENT;
  return 0;
}

int config_stat(const char *rel, struct stat *st) {
  pthread_mutex_lock(&g.lock);
  int rc = stat_locked(rel, st);
  pthread_mutex_unlock(&g.lock);
  return rc;
}

struct list_ctx {
  void (*fill)(const char *name, mode_t mode, void *arg);
  void *arg;
};

static void list_one(struct cfs_node *n, const char *name, void *arg) {
  struct list_ctx *lc = arg;
  lc->fill(name, cache_is_dir(n) ? S_IFDIR : S_IFREG, lc->arg);
}

int config_list(const char *rel, void (*fill)(const char *name, mode_t mode, void *arg), void *arg) {
  struct list_ctx lc = {fill, arg};
  pthread_mutex_lock(&g.lock);
  struct cfs_node *n = *rel ? cache_find(&g.config, rel) : NULL;
  if (*rel && !cache_is_dir(n)) {
    pthread_mutex_unlock(&g.lock);
    return -ENOTDIR;
  }
  if (n && cache_is_file(n))
    fill(".value", S_IFREG, arg);
  cache_children(&g.config, rel, list_one, &lc);
  pthread_mutex_unlock(&g.lock);
  return 0;
}

static int buf_reserve(struct cfs_file *f, size_t n) {
  if (n <= f->cap)
    return 0;
  size_t cap = f->cap ? f->cap : 256;
  while (cap < n)
    cap *= 2;
  char *b = realloc(f->buf, cap);
  if (!b)
    return -ENOMEM;
  f->buf = b;
  f->cap = cap;
  return 0;
}

/* Makes the cache at least as new as etcd for key before an open: one
 * keys-only Range (no value), then, if the cache is behind, a wait (at most
 * FRESH_WAIT_MS) until the watch thread has handled the change, including
 * the kernel invalidation.  So a value changed with etcdctl is read back at
 * once, even if its event is still on the way.  If etcd cannot be asked,
 * the cache is used as it is. */
#define FRESH_CHECK_MS 500
#define FRESH_WAIT_MS 1000
static void freshen(const char *key) {
  char *k = etcd_key(key);
  if (!k)
    return;
  coord_range_opts_t ro = {.keys_only = 1, .timeout_ms = FRESH_CHECK_MS};
  coord_kv_result_t *r = NULL;
  int rc = coord_kv_get(g.c, k, &ro, &r);
  free(k);
  if (rc) {
    coord_kv_result_free(r);
    return;
  }
  int exists = r->n > 0;
  int64_t want = exists ? r->kvs[0].mod_revision : 0;
  coord_kv_result_free(r);
  struct timespec until;
  clock_gettime(CLOCK_MONOTONIC, &until);
  until.tv_sec += FRESH_WAIT_MS / 1000;
  pthread_mutex_lock(&g.lock);
  for (;;) {
    struct cfs_node *n = cache_find(&g.config, key);
    if (exists ? (n && n->rev >= want && g.config.notified >= want) : (!n || !n->present))
      break;
    if (pthread_cond_timedwait(&g.cond, &g.lock, &until) == ETIMEDOUT)
      break;
  }
  pthread_mutex_unlock(&g.lock);
}

int config_freshen_name(const char *rel) {
  if (!cfs_key_ok(rel, strlen(rel)))
    return 0;
  char *k = etcd_key(rel);
  char *dir = k ? malloc(strlen(k) + 2) : NULL;
  if (!dir) {
    free(k);
    return 0;
  }
  sprintf(dir, "%s/", k);
  coord_range_opts_t ro = {.keys_only = 1, .limit = 1, .timeout_ms = FRESH_CHECK_MS};
  coord_kv_result_t *r = NULL;
  int rc = coord_kv_get(g.c, k, &ro, &r);
  if (!rc && r->n == 0) {
    coord_kv_result_free(r);
    r = NULL;
    ro.prefix = 1;
    rc = coord_kv_get(g.c, dir, &ro, &r);
  }
  char *key = NULL;
  int64_t want = 0;
  if (!rc && r->n > 0 && r->kvs[0].key_len > sizeof(CONFIG_PREFIX) - 1) {
    key = strdup(r->kvs[0].key + sizeof(CONFIG_PREFIX) - 1);
    want = r->kvs[0].mod_revision;
  }
  coord_kv_result_free(r);
  free(k);
  free(dir);
  if (!key)
    return 0;
  struct timespec until;
  clock_gettime(CLOCK_MONOTONIC, &until);
  until.tv_sec += FRESH_WAIT_MS / 1000;
  pthread_mutex_lock(&g.lock);
  for (;;) {
    struct cfs_node *n = cache_find(&g.config, key);
    if (n && n->rev >= want && g.config.notified >= want)
      break;
    if (pthread_cond_timedwait(&g.cond, &g.lock, &until) == ETIMEDOUT)
      break;
  }
  pthread_mutex_unlock(&g.lock);
  free(key);
  return 1;
}

int config_open(const char *rel, struct cfs_file *f, int flags, int create) {
  char *key = config_key_of(rel);
  if (!key || !*key) {
    free(key);
    return -EINVAL;
  }
  if (!create && !(flags & O_TRUNC))
    freshen(key);
  f->key = key;
  f->writable = (flags & O_ACCMODE) != O_RDONLY;
  pthread_mutex_lock(&g.lock);
  struct cfs_node *n = cache_node(&g.config, key);
  if (!n) {
    pthread_mutex_unlock(&g.lock);
    return -ENOMEM;
  }
  if (!create && !cache_is_file(n)) {
    /* The kernel still shows the name (its entry is cached for a moment
     * after the key went away, e.g. a create whose commit failed).  Opened
     * for writing, the file is made again, as O_CREAT would have. */
    if (cache_is_dir(n) || !f->writable) {
      pthread_mutex_unlock(&g.lock);
      return cache_is_dir(n) ? -EISDIR : -ENOENT;
    }
    create = 1;
  }
  int rc = 0;
  if (f->writable) {
    if (create || (flags & O_TRUNC)) {
      f->truncating = 1;
      f->dirty = 1;
      f->len = 0;
    } else {
      f->base_rev = n->present ? n->mod_rev : 0;
      f->len = 0;
      if (n->present && n->len) {
        rc = buf_reserve(f, n->len);
        if (!rc) {
          memcpy(f->buf, n->val, n->len);
          f->len = n->len;
        }
      }
    }
    if (create && !n->present) {
      n->creating++;
      f->creating = 1;
    }
  }
  pthread_mutex_unlock(&g.lock);
  return rc;
}

static int copy_range(const char *src, size_t len, size_t size, off_t off, char **out, size_t *out_len) {
  *out = NULL;
  *out_len = 0;
  if ((size_t)off >= len)
    return 0;
  size_t n = len - (size_t)off < size ? len - (size_t)off : size;
  *out = malloc(n ? n : 1);
  if (!*out)
    return -ENOMEM;
  memcpy(*out, src + off, n);
  *out_len = n;
  return 0;
}

int config_read(struct cfs_file *f, size_t size, off_t off, char **out, size_t *out_len) {
  if (f->writable)
    return copy_range(f->buf, f->len, size, off, out, out_len);
  pthread_mutex_lock(&g.lock);
  struct cfs_node *n = cache_find(&g.config, f->key);
  int rc = n && n->present ? copy_range(n->val, n->len, size, off, out, out_len) : 0;
  if (!n || !n->present)
    *out = NULL, *out_len = 0;
  pthread_mutex_unlock(&g.lock);
  CFS_COUNT(cache_hits);
  return rc;
}

int config_write(struct cfs_file *f, const char *buf, size_t size, off_t off) {
  if (f->failed)
    return -EIO;
  size_t end = (size_t)off + size;
  if (end > max_value(f->key)) {
    f->failed = 1;
    return -EFBIG;
  }
  int rc = buf_reserve(f, end);
  if (rc)
    return rc;
  if ((size_t)off > f->len)
    memset(f->buf + f->len, 0, (size_t)off - f->len);
  memcpy(f->buf + off, buf, size);
  if (end > f->len)
    f->len = end;
  f->dirty = 1;
  f->wrote = 1;
  return (int)size;
}

/* Records this mount's acknowledged write (rc 0) and ends its in-flight
 * mark in one step, so that the watch thread sees either "in flight" or
 * "applied at rev", never a moment with neither. */
static void finish_put(const char *key, const void *val, size_t len, int rc, int64_t rev) {
  pthread_mutex_lock(&g.lock);
  if (!rc)
    cache_apply(&g.config, key, strlen(key), 1, val, len, rev, -1, -1, 0);
  cache_pending(&g.config, key, -1);
  pthread_mutex_unlock(&g.lock);
}

/* After this mount removed key (rm, the source of an mv, or rmdir of a
 * mount-local directory), with g.lock held: the directory it was in, if
 * that was its last entry, stays as a mount-local directory, the way an
 * emptied directory stays on a local file system until rmdir (so `rm -r`
 * and `rm d/f; rmdir d` work).  Another client's delete makes it go
 * instead (events.c).  If that directory is also a key (the key-and-prefix
 * case) it is that file again: returns the directory's path for the kernel
 * to forget (caller frees), else NULL. */
static char *keep_parent(const char *key) {
  const char *slash = strrchr(key, '/');
  if (!slash)
    return NULL;
  char *dir = strndup(key, (size_t)(slash - key));
  struct cfs_node *d = dir ? cache_find(&g.config, dir) : NULL;
  if (d && !cache_is_dir(d)) {
    if (cache_is_file(d))
      return dir;
    cache_set_localdir(&g.config, d, 1);
  }
  free(dir);
  return NULL;
}

/* The kernel knows dir as a directory; it is a file now: drop its entry
 * (from the notifier: never from inside a handler). */
static void forget_dir(char *dir) {
  if (!dir)
    return;
  char *path = malloc(strlen(dir) + sizeof("config/"));
  if (path) {
    sprintf(path, "config/%s", dir);
    notifier_queue(J_FORGET, path, 0);
    free(path);
  }
  free(dir);
}

/* Records this mount's acknowledged delete (rc 0) and ends its in-flight
 * mark, in one step (as finish_put). */
static void finish_delete(const char *key, int rc, int64_t rev) {
  char *forget = NULL;
  pthread_mutex_lock(&g.lock);
  if (!rc) {
    cache_apply(&g.config, key, strlen(key), 0, NULL, 0, rev, 0, 0, 0);
    forget = keep_parent(key);
  }
  cache_pending(&g.config, key, -1);
  pthread_mutex_unlock(&g.lock);
  forget_dir(forget);
}

static void drop_creating(struct cfs_file *f) {
  if (!f->creating)
    return;
  pthread_mutex_lock(&g.lock);
  struct cfs_node *n = cache_find(&g.config, f->key);
  if (n && n->creating > 0)
    n->creating--;
  int gone = n && !cache_is_file(n) && !cache_is_dir(n);
  pthread_mutex_unlock(&g.lock);
  f->creating = 0;
  if (gone) /* never committed: the kernel must forget the name it created */
    notifier_queue(J_FORGET, f->path, 0);
}

/* Puts value at key, with a compare on the mod revision unless plain.
 * The write is marked in flight for its whole round trip: its watch event
 * may reach the watch thread before the answer does, and must then be
 * taken for the echo it is (the kernel already saw this operation). */
static int put_value(const char *key, const char *val, size_t len, int plain, int64_t base_rev,
                     int64_t *rev) {
  char *k = etcd_key(key);
  if (!k)
    return -ENOMEM;
  int rc;
  pending(key, 1);
  if (plain) {
    coord_put_opts_t po = {.timeout_ms = g.o.timeout_ms};
    coord_kv_result_t *r = NULL;
    rc = coord_kv_put(g.c, k, val, len, &po, &r);
    if (!rc)
      *rev = r->revision;
    coord_kv_result_free(r);
  } else {
    coord_cmp_t cmp = {.key = k, .target = COORD_CMP_MOD, .result = COORD_CMP_EQUAL, .number = base_rev};
    coord_op_t op = {.type = COORD_OP_PUT, .key = k, .value = val, .value_len = len};
    coord_txn_t txn = {.cmp = &cmp, .ncmp = 1, .success = &op, .nsuccess = 1, .timeout_ms = g.o.timeout_ms};
    coord_txn_result_t *r = NULL;
    rc = coord_kv_txn(g.c, &txn, &r);
    if (!rc && !r->succeeded)
      rc = COORD_ECONFLICT;
    if (!rc)
      *rev = r->revision;
    coord_txn_result_free(r);
  }
  free(k);
  finish_put(key, val, len, rc, rc ? 0 : *rev);
  if (rc) {
    CFS_COUNT(errors);
    if (rc == COORD_ECONFLICT)
      CFS_COUNT(conflicts);
    return -cfs_errno(rc);
  }
  CFS_COUNT(commits);
  return 0;
}

int config_commit(struct cfs_file *f) {
  if (f->failed)
    return 0;
  if (!f->dirty)
    return 0;
  int64_t rev = 0;
  cfs_log(LOG_DEBUG, "commit /config/%s: %zu bytes, %s", f->key, f->len,
          f->truncating ? "plain put" : "compare on the revision read at open");
  int rc = put_value(f->key, f->buf ? f->buf : "", f->len, f->truncating, f->base_rev, &rev);
  if (rc) {
    f->failed = 1;
    f->dirty = 0;
    drop_creating(f);
    return rc;
  }
  f->base_rev = rev;
  f->truncating = 0;
  f->dirty = 0;
  f->wrote = 0;
  drop_creating(f);
  return 0;
}

int config_release(struct cfs_file *f) {
  int rc = config_commit(f);
  drop_creating(f);
  return rc;
}

int config_truncate(struct cfs_file *f, const char *rel, off_t size) {
  if (f && f->writable) {
    if (f->failed)
      return -EIO;
    if ((size_t)size > max_value(f->key))
      return -EFBIG;
    int rc = buf_reserve(f, (size_t)size);
    if (rc)
      return rc;
    if ((size_t)size > f->len)
      memset(f->buf + f->len, 0, (size_t)size - f->len);
    f->len = (size_t)size;
    if (size == 0)
      f->truncating = 1;
    f->dirty = 1;
    f->wrote = 1;
    return 0;
  }
  /* truncate(2) on a path: read, resize, commit at once with a compare */
  char *key = config_key_of(rel);
  if (!key)
    return -EINVAL;
  if ((size_t)size > max_value(key)) {
    free(key);
    return -EFBIG;
  }
  char *val = calloc(1, (size_t)size + 1);
  if (!val) {
    free(key);
    return -ENOMEM;
  }
  pthread_mutex_lock(&g.lock);
  struct cfs_node *n = cache_find(&g.config, key);
  int64_t base = 0;
  int rc = 0;
  if (n && n->present) {
    memcpy(val, n->val, n->len < (size_t)size ? n->len : (size_t)size);
    base = n->mod_rev;
  } else if (!n || !n->creating) {
    rc = -ENOENT;
  }
  pthread_mutex_unlock(&g.lock);
  int64_t rev;
  cfs_log(LOG_DEBUG, "truncate /config/%s to %lld bytes", key, (long long)size);
  if (!rc)
    rc = put_value(key, val, (size_t)size, size == 0, base, &rev);
  free(val);
  free(key);
  return rc;
}

int config_unlink(const char *rel) {
  char *key = config_key_of(rel);
  if (!key)
    return -EINVAL;
  pthread_mutex_lock(&g.lock);
  struct cfs_node *n = cache_find(&g.config, key);
  int rc = 0;
  if (!is_value_path(rel) && cache_is_dir(n))
    rc = -EISDIR;
  else if (!n || !n->present || n->bad)
    rc = -ENOENT;
  pthread_mutex_unlock(&g.lock);
  if (!rc) {
    char *k = etcd_key(key);
    coord_range_opts_t ro = {.timeout_ms = g.o.timeout_ms};
    coord_kv_result_t *r = NULL;
    pending(key, 1);
    int e = k ? coord_kv_delete(g.c, k, &ro, &r) : COORD_ENOMEM;
    if (e) {
      CFS_COUNT(errors);
      rc = -cfs_errno(e);
    } else {
      CFS_COUNT(commits);
    }
    finish_delete(key, e, e ? 0 : r->revision);
    coord_kv_result_free(r);
    free(k);
  }
  free(key);
  return rc;
}

int config_mkdir(const char *rel) {
  if (is_value_path(rel) || !strcmp(rel, ".value") || !cfs_key_ok(rel, strlen(rel)))
    return -EINVAL;
  pthread_mutex_lock(&g.lock);
  struct cfs_node *n = cache_node(&g.config, rel);
  int rc = 0;
  if (!n)
    rc = -ENOMEM;
  else if (cache_is_dir(n) || cache_is_file(n))
    rc = -EEXIST;
  else
    cache_set_localdir(&g.config, n, 1);
  pthread_mutex_unlock(&g.lock);
  return rc;
}

static void any_child(struct cfs_node *n, const char *name, void *arg) {
  (void)n;
  (void)name;
  *(int *)arg = 1;
}

int config_rmdir(const char *rel) {
  pthread_mutex_lock(&g.lock);
  struct cfs_node *n = cache_find(&g.config, rel);
  int rc = 0, busy = 0;
  if (!cache_is_dir(n)) {
    rc = cache_is_file(n) ? -ENOTDIR : -ENOENT;
  } else {
    cache_children(&g.config, rel, any_child, &busy);
    if (busy || n->ndesc > 0 || n->nlocal > 0 || cache_is_file(n))
      rc = -ENOTEMPTY;
    else
      cache_set_localdir(&g.config, n, 0);
  }
  char *forget = rc ? NULL : keep_parent(rel);
  pthread_mutex_unlock(&g.lock);
  forget_dir(forget);
  return rc;
}

struct move {
  char *from, *to; /* keys relative to /config/ */
  char *ef, *et;   /* etcd keys */
  char *val;
  size_t len;
  int64_t mod;
};

struct collect {
  const char *from;
  size_t n, cap;
  struct move *m;
  int err;
};

static int add_move(struct collect *cl, struct cfs_node *n, const char *to_key) {
  if (cl->n == cl->cap) {
    size_t cap = cl->cap ? cl->cap * 2 : 8;
    struct move *m = realloc(cl->m, cap * sizeof(*m));
    if (!m)
      return -ENOMEM;
    cl->m = m;
    cl->cap = cap;
  }
  struct move *m = &cl->m[cl->n++];
  memset(m, 0, sizeof(*m));
  m->from = strdup(n->path);
  m->to = strdup(to_key);
  m->val = malloc(n->len + 1);
  if (!m->from || !m->to || !m->val)
    return -ENOMEM;
  memcpy(m->val, n->val, n->len);
  m->len = n->len;
  m->mod = n->mod_rev;
  m->ef = etcd_key(m->from);
  m->et = etcd_key(m->to);
  return m->ef && m->et ? 0 : -ENOMEM;
}

static void free_moves(struct collect *cl) {
  for (size_t i = 0; i < cl->n; i++) {
    free(cl->m[i].from);
    free(cl->m[i].to);
    free(cl->m[i].ef);
    free(cl->m[i].et);
    free(cl->m[i].val);
  }
  free(cl->m);
}

/* etcd's default --max-txn-ops is 128: a put and a delete per key. */
#define MAX_MOVE_KEYS 64

/* 1 if path is dir or below it. */
static int at_or_below(const char *path, const char *dir, size_t dl) {
  return !strncmp(path, dir, dl) && (!path[dl] || path[dl] == '/');
}

/* Moves the mount-local directories at fk and below it to tk.  g.lock
 * held.  The nodes are collected first and changed afterwards:
 * cache_set_localdir() and cache_node() may add nodes and grow the table. */
static int move_localdirs(const char *fk, const char *tk) {
  size_t fl = strlen(fk), n = 0, cap = 0;
  struct cfs_node **src = NULL;
  for (size_t i = 0; i < g.config.cap; i++)
    for (struct cfs_node *x = g.config.tab[i]; x; x = x->next) {
      if (!x->localdir || !at_or_below(x->path, fk, fl))
        continue;
      if (n == cap) {
        struct cfs_node **v = realloc(src, (cap = cap ? cap * 2 : 8) * sizeof(*v));
        if (!v) {
          free(src);
          return -ENOMEM;
        }
        src = v;
      }
      src[n++] = x;
    }
  int rc = 0;
  for (size_t i = 0; i < n; i++) {
    char *t = malloc(strlen(tk) + strlen(src[i]->path) - fl + 1);
    if (!t) {
      rc = -ENOMEM;
      continue; /* the source stays where it was */
    }
    sprintf(t, "%s%s", tk, src[i]->path + fl);
    cache_set_localdir(&g.config, src[i], 0); /* a node is never freed here */
    struct cfs_node *d = cache_node(&g.config, t);
    if (d && !d->ndesc)
      cache_set_localdir(&g.config, d, 1);
    free(t);
  }
  free(src);
  return rc;
}

/* Works out a rename with g.lock held: the keys to move (cl), whether a
 * directory moves (*dir), and *local when only mount-local directories
 * move.  0 or -errno. */
static int plan_rename(const char *from, const char *to, const char *fk, const char *tk, unsigned flags,
                       struct collect *cl, int *dir, int *local) {
  struct cfs_node *src = cache_find(&g.config, fk), *dst = cache_find(&g.config, tk);
  *local = 0;
  *dir = !is_value_path(from) && cache_is_dir(src);
  if (!*dir) { /* a file */
    if (!src || !src->present)
      return src && src->creating ? -EBUSY : -ENOENT;
    if (!is_value_path(to) && cache_is_dir(dst))
      return -EISDIR;
    if ((flags & RENAME_NOREPLACE) && cache_is_file(dst))
      return -EEXIST;
    return add_move(cl, src, tk);
  }
  if (cache_is_file(dst) && !cache_is_dir(dst))
    return -ENOTDIR;
  if (cache_is_dir(dst) && (dst->ndesc > 0 || dst->nlocal > 0 || dst->present))
    return -ENOTEMPTY;
  if (src->ndesc == 0 && !src->present) {
    *local = 1;
    return 0;
  }
  size_t fl = strlen(fk);
  for (size_t i = 0; i < g.config.cap; i++)
    for (struct cfs_node *n = g.config.tab[i]; n; n = n->next) {
      if (!n->present || n->bad || !at_or_below(n->path, fk, fl))
        continue;
      if (cl->n >= MAX_MOVE_KEYS)
        return -EXDEV; /* mv falls back to copy and delete */
      char *nt = malloc(strlen(tk) + strlen(n->path) - fl + 1);
      if (!nt)
        return -ENOMEM;
      sprintf(nt, "%s%s", tk, n->path + fl);
      int rc = add_move(cl, n, nt);
      free(nt);
      if (rc)
        return rc;
    }
  return 0;
}

/* One Txn: for every key, compare its mod revision, put the new key and
 * delete the old.  On success the cache takes the moves, the mount-local
 * directories below a moved directory follow it, and the source's
 * directory stays if it is now empty (keep_parent). */
static int commit_moves(struct collect *cl, const char *fk, const char *tk, int dir) {
  coord_cmp_t *cmp = calloc(cl->n, sizeof(*cmp));
  coord_op_t *ops = calloc(cl->n * 2, sizeof(*ops));
  if (!cmp || !ops) {
    free(cmp);
    free(ops);
    return -ENOMEM;
  }
  for (size_t i = 0; i < cl->n; i++) {
    struct move *m = &cl->m[i];
    cmp[i] =
        (coord_cmp_t){.key = m->ef, .target = COORD_CMP_MOD, .result = COORD_CMP_EQUAL, .number = m->mod};
    ops[2 * i] = (coord_op_t){.type = COORD_OP_PUT, .key = m->et, .value = m->val, .value_len = m->len};
    ops[2 * i + 1] = (coord_op_t){.type = COORD_OP_DELETE, .key = m->ef};
  }
  coord_txn_t txn = {
      .cmp = cmp, .ncmp = cl->n, .success = ops, .nsuccess = cl->n * 2, .timeout_ms = g.o.timeout_ms};
  coord_txn_result_t *r = NULL;
  for (size_t i = 0; i < cl->n; i++)
    pending(cl->m[i].from, 1), pending(cl->m[i].to, 1);
  int e = coord_kv_txn(g.c, &txn, &r);
  if (!e && !r->succeeded)
    e = COORD_ECONFLICT;
  char *forget = NULL;
  pthread_mutex_lock(&g.lock);
  for (size_t i = 0; i < cl->n; i++) {
    struct move *m = &cl->m[i];
    if (!e) {
      cache_apply(&g.config, m->from, strlen(m->from), 0, NULL, 0, r->revision, 0, 0, 0);
      cache_apply(&g.config, m->to, strlen(m->to), 1, m->val, m->len, r->revision, -1, -1, 0);
    }
    cache_pending(&g.config, m->from, -1);
    cache_pending(&g.config, m->to, -1);
  }
  if (!e) {
    if (dir)
      move_localdirs(fk, tk);
    forget = keep_parent(fk);
  }
  pthread_mutex_unlock(&g.lock);
  forget_dir(forget);
  coord_txn_result_free(r);
  free(cmp);
  free(ops);
  if (e) {
    CFS_COUNT(errors);
    return -cfs_errno(e);
  }
  CFS_COUNT(commits);
  return 0;
}

int config_rename(const char *from, const char *to, unsigned flags) {
  if (flags & RENAME_EXCHANGE)
    return -EINVAL;
  char *fk = config_key_of(from), *tk = config_key_of(to);
  if (!fk || !tk || !*fk || !*tk || !cfs_key_ok(tk, strlen(tk))) {
    free(fk);
    free(tk);
    return -EINVAL;
  }
  struct collect cl = {0};
  int local = 0, dir = 0;
  char *forget = NULL;
  pthread_mutex_lock(&g.lock);
  int rc = plan_rename(from, to, fk, tk, flags, &cl, &dir, &local);
  if (!rc && local) { /* only mount-local directories: nothing in etcd */
    rc = move_localdirs(fk, tk);
    forget = keep_parent(fk);
  }
  pthread_mutex_unlock(&g.lock);
  forget_dir(forget);
  if (!rc && cl.n)
    rc = commit_moves(&cl, fk, tk, dir);
  free_moves(&cl);
  free(fk);
  free(tk);
  return rc;
}

int config_xattr(const char *rel, const char *name, char *buf, size_t size) {
  char *key = config_key_of(rel);
  if (!key)
    return name ? -ENODATA : 0;
  pthread_mutex_lock(&g.lock);
  struct cfs_node *n = cache_find(&g.config, key);
  int is_file = n && n->present && !n->bad && (is_value_path(rel) || !cache_is_dir(n));
  int rc = cache_xattr(is_file ? n : NULL, name, buf, size);
  pthread_mutex_unlock(&g.lock);
  free(key);
  return rc;
}
