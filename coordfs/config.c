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
 * An open for writing first asks etcd what the close would find (probe:
 * reachable, write permitted), so that the error reaches the shell, which
 * ignores close()'s; the handle starts from etcd's value, not the cache's.
 *
 * Writes are buffered in the open file and committed whole with one request
 * on fsync, on the flush of the opener's last close (fs.c flush_commits:
 * the shell's `> file` opens, dup2()s and closes the first descriptor, and
 * that close must not publish the empty truncated value), or on release:
 *   - opened with O_TRUNC, created, or truncated to 0 before any write: a
 *     plain Put (the new content does not depend on the old);
 *   - O_APPEND: the bytes written go after whatever etcd holds at commit
 *     (a Txn on the revision; when another writer got there first, the
 *     failed compare brings its value and the Txn is tried again), so two
 *     writers' appends both survive;
 *   - otherwise (overwrite in place): a Txn that puts only if the key's mod
 *     revision is still the one read at open.  If someone else wrote in
 *     between the close fails with EBUSY and nothing is written.
 * A commit without an answer in time is ETIMEDOUT (it may still be
 * applied) unless a read shows it was (settle); EIO means not written.  A
 * handle whose write or commit failed never commits afterwards: nothing
 * half-written reaches etcd.
 *
 * While a handle is open for writing, getattr and setattr show its size
 * (the writers list, under wr_lock); fs.c invalidates the inode after each
 * commit.  Times set with utimens are kept on this mount (node atime and
 * mtime) until the key changes.
 *
 * Locking: file->lock is held by the caller (fs.c) for every function that
 * takes a cfs_file; g.lock is taken here around cache access only, never
 * across an etcd call.
 */
#include "coordfs.h"
#include "log.h"

#include <assert.h>
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
      if (n->atime.tv_sec)
        st->st_atim = n->atime;
      return 0;
    }
    return -ENOENT;
  }
  struct cfs_node *n = cache_find(&g.config, rel);
  if (cache_is_dir(n))
    cfs_fill_stat(st, dmode, 0, &n->mtime);
  else if (cache_is_file(n) && !local_name(rel)) /* a local name hides its key */
    cfs_fill_stat(st, fmode, (off_t)n->len, &n->mtime);
  else if (local_dir_used(rel)) /* kept by the mount-local files in it */
    return cfs_fill_stat(st, dmode, 0, NULL), 0;
  else
    return -ENOENT;
  if (n->atime.tv_sec)
    st->st_atim = n->atime;
  return 0;
}

int config_stat(const char *rel, struct stat *st) {
  if (local_name(rel) && !local_stat(rel, st))
    return 0;
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
  if (cache_is_dir(n))
    lc->fill(name, S_IFDIR, lc->arg);
  else if (!local_name(name)) /* shown by local_list instead */
    lc->fill(name, S_IFREG, lc->arg);
}

int config_list(const char *rel, void (*fill)(const char *name, mode_t mode, void *arg), void *arg) {
  struct list_ctx lc = {fill, arg};
  pthread_mutex_lock(&g.lock);
  struct cfs_node *n = *rel ? cache_find(&g.config, rel) : NULL;
  if (*rel && !cache_is_dir(n) && !local_dir_used(rel)) {
    pthread_mutex_unlock(&g.lock);
    return -ENOTDIR;
  }
  if (n && cache_is_dir(n) && cache_is_file(n))
    fill(".value", S_IFREG, arg);
  cache_children(&g.config, rel, list_one, &lc);
  local_list(rel, fill, arg);
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
  if (!cfs_key_ok(rel, strlen(rel)) || local_name(rel))
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

/* ---------------------------------------------------------------- writable handles */

/* Every writable /config handle of this mount, so that getattr and setattr
 * without a handle (fstat, fchmod, futimens: cp -p, tar x) report the size
 * being written rather than the committed one; the kernel would otherwise
 * cut the new value to the old length in its page cache.  wr_lock guards
 * the list, shown_len and wseq; it is a leaf (taken after file->lock, never
 * with g.lock). */
static pthread_mutex_t wr_lock = PTHREAD_MUTEX_INITIALIZER;
static struct cfs_file *writers;
static uint64_t wr_seq;

static void track(struct cfs_file *f) {
  pthread_mutex_lock(&wr_lock);
  f->shown_len = f->len;
  f->wseq = ++wr_seq;
  f->wprev = NULL;
  f->wnext = writers;
  if (writers)
    writers->wprev = f;
  writers = f;
  pthread_mutex_unlock(&wr_lock);
}

void config_untrack(struct cfs_file *f) {
  pthread_mutex_lock(&wr_lock);
  if (f->wprev)
    f->wprev->wnext = f->wnext;
  else if (writers == f)
    writers = f->wnext;
  if (f->wnext)
    f->wnext->wprev = f->wprev;
  f->wprev = f->wnext = NULL;
  pthread_mutex_unlock(&wr_lock);
}

/* f->len changed (file->lock held). */
static void set_len(struct cfs_file *f, size_t len) {
  f->len = len;
  pthread_mutex_lock(&wr_lock);
  f->shown_len = len;
  f->wseq = ++wr_seq;
  pthread_mutex_unlock(&wr_lock);
}

/* The writable handle on path that changed size last (wr_lock held). */
static struct cfs_file *newest_writer_locked(const char *path) {
  struct cfs_file *best = NULL;
  for (struct cfs_file *f = writers; f; f = f->wnext)
    if (!strcmp(f->path, path) && (!best || f->wseq > best->wseq))
      best = f;
  return best;
}

int config_open_size(const char *path, off_t *size) {
  pthread_mutex_lock(&wr_lock);
  struct cfs_file *best = newest_writer_locked(path);
  if (best)
    *size = (off_t)best->shown_len;
  pthread_mutex_unlock(&wr_lock);
  return best != NULL;
}

/* Applies times to the node of key (g.lock not held). */
static int node_times(const char *key, const struct timespec *atime, const struct timespec *mtime) {
  pthread_mutex_lock(&g.lock);
  struct cfs_node *n = *key ? cache_find(&g.config, key) : NULL;
  int rc = n && (cache_is_file(n) || cache_is_dir(n) || n->creating) ? 0 : -ENOENT;
  if (!rc) {
    n->atime = *atime;
    n->mtime = *mtime;
  }
  pthread_mutex_unlock(&g.lock);
  return rc;
}

/* utimens: the times are kept as the file's on this mount until its key
 * changes, the way a key's mtime is already this mount's own (when it saw
 * the revision).  A writable handle open on the path (f, or the newest
 * one: cp -p and tar set times with futimens, which sends no handle,
 * before they close) keeps them for its commit, which would otherwise
 * stamp its own time over them.  0 or -errno. */
int config_set_times(const char *path, const char *rel, struct cfs_file *f, const struct timespec *atime,
                     const struct timespec *mtime) {
  pthread_mutex_lock(&wr_lock);
  struct cfs_file *w = f && f->kind == FK_CONFIG && f->writable ? f : newest_writer_locked(path);
  if (w) {
    w->times_set = 1;
    w->atime = *atime;
    w->mtime = *mtime;
  }
  pthread_mutex_unlock(&wr_lock);
  char *key = config_key_of(rel);
  int rc = key ? node_times(key, atime, mtime) : -ENOENT;
  free(key);
  return w ? 0 : rc;
}

/* After a commit: the times set while the handle was open (file->lock). */
static void keep_times(struct cfs_file *f) {
  pthread_mutex_lock(&wr_lock);
  int set = f->times_set;
  struct timespec a = f->atime, m = f->mtime;
  f->times_set = 0;
  pthread_mutex_unlock(&wr_lock);
  if (set)
    node_times(f->key, &a, &m);
}

/* ---------------------------------------------------------------- opening */

/* The key as etcd holds it (a copy), as read by a probe or a failed compare. */
struct current {
  int exists;
  char *val;
  size_t len;
  int64_t mod_rev;
};

/* Copies the first kv of a Txn's single Range response into cur. */
static int take_current(const coord_txn_result_t *r, struct current *cur) {
  memset(cur, 0, sizeof(*cur));
  const coord_kv_result_t *rr = r->n > 0 ? r->responses[0] : NULL;
  if (!rr || rr->n == 0)
    return 0;
  cur->val = malloc(rr->kvs[0].value_len + 1);
  if (!cur->val)
    return -ENOMEM;
  memcpy(cur->val, rr->kvs[0].value, rr->kvs[0].value_len);
  cur->len = rr->kvs[0].value_len;
  cur->mod_rev = rr->kvs[0].mod_revision;
  cur->exists = 1;
  return 0;
}

/* One Txn on etcd key k: if the key's mod revision compares to number as
 * res says, Put val; else read the key (take_current).  The probe and the
 * compared writes are both this shape.  COORD_* code; *out to free. */
static int put_else_read(const char *k, coord_cmp_result_t res, int64_t number, const char *val, size_t len,
                         coord_txn_result_t **out) {
  coord_cmp_t cmp = {.key = k, .target = COORD_CMP_MOD, .result = res, .number = number};
  coord_op_t put = {.type = COORD_OP_PUT, .key = k, .value = val, .value_len = len};
  coord_op_t get = {.type = COORD_OP_RANGE, .key = k};
  coord_txn_t txn = {.cmp = &cmp,
                     .ncmp = 1,
                     .success = &put,
                     .nsuccess = 1,
                     .failure = &get,
                     .nfailure = 1,
                     .timeout_ms = g.o.timeout_ms};
  return coord_kv_txn(g.c, &txn, out);
}

/* What the close will find, asked at open (bash ignores close() errors, so
 * they must come here): one Txn whose compare can never hold (no mod
 * revision is below 0).  Its success branch holds a Put of the key, so
 * etcd checks write permission and passes it through raft (a quorum must
 * answer) without ever running it; its failure branch reads the key.
 * Nothing is written whatever happens, so a timeout here is a plain EIO.
 * Fills cur with etcd's current value.  0 or -errno. */
static int probe(const char *key, struct current *cur) {
  char *k = etcd_key(key);
  if (!k)
    return -ENOMEM;
  coord_txn_result_t *r = NULL;
  int rc = put_else_read(k, COORD_CMP_LESS, 0, "", 0, &r);
  assert(rc || !r->succeeded); /* mod_revision < 0 never holds */
  int err = rc ? -cfs_errno(rc) : take_current(r, cur);
  if (rc) {
    CFS_COUNT(errors);
    cfs_log(LOG_INFO, "open /config/%s for writing: %s%s%s", key, coord_strerror(rc),
            *coord_last_error() ? ": " : "", coord_last_error());
  }
  coord_txn_result_free(r);
  free(k);
  return err;
}

/* Sets up a writable handle from etcd's current value (g.lock held).
 * Opened with O_TRUNC, or creating a key etcd does not have: the new
 * content does not depend on the old (plain Put).  O_APPEND: the bytes
 * written are appended to whatever the key holds at commit.  Otherwise
 * the commit compares the revision read here. */
static int open_writable(struct cfs_file *f, struct cfs_node *n, int flags, int create, struct current *cur) {
  f->base_rev = cur->exists ? cur->mod_rev : 0;
  f->append = (flags & O_APPEND) && !(flags & O_TRUNC);
  int trunc = (flags & O_TRUNC) || (create && !cur->exists);
  f->len = 0;
  if (trunc && !f->append) {
    f->truncating = 1;
    f->dirty = 1;
  } else if (cur->exists) {
    f->buf = cur->val; /* the handle takes it */
    f->cap = cur->len + 1;
    f->len = cur->len;
    cur->val = NULL;
  }
  f->base_len = f->len;
  if (f->append && create)
    f->dirty = 1; /* `>> new` makes the file even if nothing is written */
  if (create && !n->present) {
    n->creating++;
    f->creating = 1;
  }
  return 0;
}

int config_open(const char *rel, struct cfs_file *f, int flags, int create, mode_t mode) {
  char *key = config_key_of(rel);
  if (!key || !*key) {
    free(key);
    return -EINVAL;
  }
  f->key = key;
  if (local_name(rel))
    return local_open(rel, f, flags, create, mode);
  f->writable = (flags & O_ACCMODE) != O_RDONLY;
  struct current cur = {0};
  if (f->writable) {
    int rc = probe(key, &cur);
    if (rc)
      return rc;
  } else if (!create && !(flags & O_TRUNC)) {
    freshen(key);
  }
  pthread_mutex_lock(&g.lock);
  struct cfs_node *n = cache_node(&g.config, key);
  int rc = n ? 0 : -ENOMEM;
  if (!rc && !create && !(f->writable ? cur.exists : cache_is_file(n))) {
    /* Not a key (any more).  The kernel may still show the name (its
     * entry is cached for a moment after the key went away, e.g. a create
     * whose commit failed).  Opened for writing, the file is made again,
     * as O_CREAT would have. */
    if (cache_is_dir(n) || !f->writable)
      rc = cache_is_dir(n) ? -EISDIR : -ENOENT;
    create = 1;
  }
  if (!rc && f->writable)
    rc = open_writable(f, n, flags, create, &cur);
  pthread_mutex_unlock(&g.lock);
  free(cur.val);
  if (!rc && f->writable)
    track(f);
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
  if (f->priv)
    return local_read(f, size, off, out, out_len);
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
  if (f->priv)
    return local_write(f, buf, size, off);
  if (f->failed)
    return -EIO;
  if (f->append) /* at the end of what this handle holds, whatever the
                    kernel's idea of the size */
    off = (off_t)f->len;
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
    set_len(f, end);
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

/* One request: a plain Put of val at etcd key k, or a Txn that puts only
 * if the key's mod revision is still base_rev (0: the key must not exist)
 * and otherwise reads the key into *cur.  COORD_* code; *rev on success. */
static int send_put(const char *k, const char *val, size_t len, int plain, int64_t base_rev, int64_t *rev,
                    struct current *cur) {
  int rc;
  if (plain) {
    coord_put_opts_t po = {.timeout_ms = g.o.timeout_ms};
    coord_kv_result_t *r = NULL;
    rc = coord_kv_put(g.c, k, val, len, &po, &r);
    if (!rc)
      *rev = r->revision;
    coord_kv_result_free(r);
    return rc;
  }
  coord_txn_result_t *r = NULL;
  rc = put_else_read(k, COORD_CMP_EQUAL, base_rev, val, len, &r);
  if (!rc && !r->succeeded) {
    rc = COORD_ECONFLICT;
    if (take_current(r, cur))
      rc = COORD_ENOMEM;
  }
  if (!rc)
    *rev = r->revision;
  coord_txn_result_free(r);
  return rc;
}

/* A write whose answer did not come in time may have been applied anyway
 * (etcd may have committed it before the deadline, or a frozen member may
 * still propose it when it resumes).  One read settles it when it can: the
 * key holds this value at a revision after seen_rev, so the write took
 * effect.  Otherwise the outcome is unknown and the caller reports
 * ETIMEDOUT, never EIO, which means "not written" (coordfs(8), ERRORS). */
#define SETTLE_MS 1000
static int settle(const char *k, const char *val, size_t len, int64_t seen_rev, int64_t *rev) {
  coord_range_opts_t ro = {.timeout_ms = SETTLE_MS};
  coord_kv_result_t *r = NULL;
  int applied = !coord_kv_get(g.c, k, &ro, &r) && r->n == 1 && r->kvs[0].mod_revision > seen_rev &&
                r->kvs[0].value_len == len && !memcmp(r->kvs[0].value, val, len);
  if (applied)
    *rev = r->kvs[0].mod_revision;
  coord_kv_result_free(r);
  return applied;
}

/* Writes value at key (send_put) and keeps this mount's cache right.  The
 * write is marked in flight for its whole round trip: its watch event may
 * reach the watch thread before the answer does, and must then be taken
 * for the echo it is (the kernel already saw this operation).  seen_rev is
 * the key's mod revision when the writer last read it (for settle).
 * Returns 0, or -errno: EBUSY when the compare failed (*cur then holds the
 * key as etcd has it; counted by the caller), ETIMEDOUT when the outcome
 * is unknown. */
static int put_value(const char *key, const char *val, size_t len, int plain, int64_t base_rev,
                     int64_t seen_rev, int64_t *rev, struct current *cur) {
  char *k = etcd_key(key);
  if (!k)
    return -ENOMEM;
  struct current ignored = {0};
  pending(key, 1);
  int rc = send_put(k, val, len, plain, base_rev, rev, cur ? cur : &ignored);
  free(ignored.val);
  if (rc == COORD_ETIMEDOUT && settle(k, val, len, seen_rev, rev))
    rc = 0;
  free(k);
  finish_put(key, val, len, rc, rc ? 0 : *rev);
  if (rc == COORD_ECONFLICT)
    return -EBUSY;
  if (rc) {
    CFS_COUNT(errors);
    cfs_log(LOG_WARNING, "write of /config/%s %s: %s%s%s", key,
            rc == COORD_ETIMEDOUT ? "timed out, outcome unknown" : "failed", coord_strerror(rc),
            *coord_last_error() ? ": " : "", coord_last_error());
    return rc == COORD_ETIMEDOUT ? -ETIMEDOUT : -cfs_errno(rc);
  }
  CFS_COUNT(commits);
  return 0;
}

/* Appends lose nothing between writers (two shells' `>>`): the bytes this
 * handle appended (after base_len) are put after the value the handle
 * started from, with a compare on its revision; when another writer got
 * there first, the failed compare brings etcd's value, the appended bytes
 * are placed after it and the Txn is tried again. */
#define APPEND_TRIES 64
static int commit_append(struct cfs_file *f, int64_t *rev) {
  for (int attempt = 1;; attempt++) {
    struct current cur = {0};
    int rc = put_value(f->key, f->buf ? f->buf : "", f->len, 0, f->base_rev, f->base_rev, rev, &cur);
    if (rc != -EBUSY || attempt == APPEND_TRIES) {
      free(cur.val);
      if (rc == -EBUSY)
        CFS_COUNT(conflicts);
      return rc;
    }
    size_t add = f->len - f->base_len;
    if (!add && cur.exists) { /* `>> f` with nothing written: the key exists now */
      free(f->buf);
      f->buf = cur.val;
      f->cap = cur.len + 1;
      set_len(f, cur.len);
      f->base_len = cur.len;
      f->base_rev = *rev = cur.mod_rev;
      return 0;
    }
    if (cur.len + add > max_value(f->key)) {
      free(cur.val);
      return -EFBIG;
    }
    char *nb = malloc(cur.len + add + 1);
    if (!nb) {
      free(cur.val);
      return -ENOMEM;
    }
    memcpy(nb, cur.val, cur.len);
    memcpy(nb + cur.len, f->buf + f->base_len, add);
    free(cur.val);
    free(f->buf);
    f->buf = nb;
    f->cap = cur.len + add + 1;
    f->base_len = cur.len;
    f->base_rev = cur.exists ? cur.mod_rev : 0;
    set_len(f, cur.len + add);
  }
}

int config_commit(struct cfs_file *f) {
  if (f->failed || !f->dirty)
    return 0;
  int64_t rev = 0;
  cfs_log(LOG_DEBUG, "commit /config/%s: %zu bytes, %s", f->key, f->len,
          f->truncating ? "plain put"
          : f->append   ? "append"
                        : "compare on the revision read at open");
  int rc;
  if (f->append && !f->truncating) {
    rc = commit_append(f, &rev);
  } else {
    rc = put_value(f->key, f->buf ? f->buf : "", f->len, f->truncating, f->base_rev, f->base_rev, &rev, NULL);
    if (rc == -EBUSY)
      CFS_COUNT(conflicts);
  }
  if (rc == -EBUSY)
    cfs_log(LOG_NOTICE,
            "write of /config/%s not committed: the key was written by another client since it was opened",
            f->key);
  f->dirty = 0;
  if (rc) {
    f->failed = 1;
    drop_creating(f);
    return rc;
  }
  f->base_rev = rev;
  f->base_len = f->len;
  f->truncating = 0;
  f->wrote = 0;
  keep_times(f);
  drop_creating(f);
  return 1;
}

int config_release(struct cfs_file *f) {
  local_release(f);
  int rc = config_commit(f);
  drop_creating(f);
  config_untrack(f);
  return rc;
}

int config_truncate(struct cfs_file *f, const char *rel, off_t size) {
  if ((f && f->priv) || local_exists(rel)) {
    struct stat a = {.st_size = size};
    return local_setattr(rel, f, &a, FUSE_SET_ATTR_SIZE);
  }
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
    set_len(f, (size_t)size);
    if (size == 0)
      f->truncating = 1;
    f->append = 0; /* the new value no longer follows the old one */
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
    rc = put_value(key, val, (size_t)size, size == 0, base, base, &rev, NULL);
  if (rc == -EBUSY)
    CFS_COUNT(conflicts);
  free(val);
  free(key);
  return rc;
}

int config_unlink(const char *rel) {
  if (local_name(rel) && !local_unlink(rel))
    return 0;
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
  if (local_exists(rel))
    return -EEXIST;
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
  if (local_dir_used(rel)) {
    rc = -ENOTEMPTY;
  } else if (!cache_is_dir(n)) {
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
  struct stat st;
  if (local_exists(from)) /* a mount-local file */
    return local_name(to) ? local_rename(from, to, flags & RENAME_NOREPLACE) : -EXDEV;
  if (local_name(to) && !(config_stat(from, &st) == 0 && S_ISDIR(st.st_mode)))
    return -EXDEV; /* a key does not become mount-local: mv copies */
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
  if (!rc && (dir || local))
    local_rename_dir(fk, tk); /* the mount-local files below go along */
  free_moves(&cl);
  free(fk);
  free(tk);
  return rc;
}

int config_xattr(const char *rel, const char *name, char *buf, size_t size) {
  if (local_exists(rel))
    return name ? -ENODATA : 0; /* not a key: no etcd metadata */
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
