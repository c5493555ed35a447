/*
 * services.c — the /services tree: /services/<name>/<id> is one live
 * instance (its JSON document), read from g.services, the cache that the
 * watch thread keeps coherent.
 *
 * Registration: a process opens /services/<name>/<id> for writing and
 * writes an instance document.  As soon as the bytes written form a valid
 * document (an object with an "address" string and a "port" 1..65535; "id"
 * and "name" come from the path and must agree if given; "metadata" an
 * object if given) it is put under a lease of --service-ttl that libcoord
 * keeps alive.  Bytes that cannot become a valid document fail the write
 * with EINVAL; an incomplete document at close fails the close with EINVAL;
 * nothing is registered in either case.  The last close of the open file
 * (FUSE release: also when the process dies) revokes the lease, which
 * deletes the key at once.  If coordfs dies the lease expires after the TTL.
 * If the lease is lost while the file is open (coordfs cut off from etcd for
 * longer than the TTL), the instance is registered again under a new lease
 * as soon as etcd answers.  If the key is deleted while the file is open
 * (etcdctl del, rm on another mount, any client), the watch thread tells
 * services_deleted, and the document is put back under the same lease
 * while that lease lives (a new one if etcd says it is gone).  Our own
 * revoke at release is not put back: the registration leaves the list
 * before it.  `rm` of such an instance on this mount fails with EBUSY and
 * deletes nothing (logged at info with the holder's pid).  An invalid
 * document is logged (LOG_WARNING) with what is wrong, once per failed
 * write or close.
 *
 * Any name below /services looks up as a directory (empty if it has no
 * instances), so `exec 3>/services/chat/chat-1` works for a new service;
 * only names with live instances are listed.
 *
 * Locking: file->lock held by the caller for the cfs_file functions; g.lock
 * around cache access only; reg_lock for the list of registrations.
 *
 * Ownership: a registration (struct reg) is in the regs list from its first
 * valid document until its file is released, which unlinks and frees it.
 * libcoord's lease-lost callback and the re-registration threads get the
 * registration's number, not a pointer, and find it in the list (or not,
 * once released).
 *
 * Threads: a lost lease (libcoord's event thread, on_lease_lost) or a
 * deleted key (the watch thread, services_deleted) starts a
 * re-registration thread (reregister) that uses g.c; neither caller blocks
 * or calls etcd.  At most one such thread works on a registration
 * (reg.rereg); a loss, delete or new document while it works asks it for
 * one more round (reg.again), so the last document is the one put back.
 * rereg_threads counts them under reg_lock, and services_shutdown (before
 * coord_close) stops new ones, wakes the waiting ones and waits for all to
 * end, so that none outlives the client.  reg_lock is never held across an
 * etcd call, and is taken after g.lock's holders have let go (never both).
 */
#include "coordfs.h"
#include "log.h"

#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define SERVICES_PREFIX "/services/"
#define SVC_PREFIX_LEN (sizeof(SERVICES_PREFIX) - 1)

int services_load(void) {
  coord_range_opts_t ro = {.prefix = 1, .timeout_ms = g.o.timeout_ms};
  coord_kv_result_t *r = NULL;
  int rc = coord_kv_get(g.c, SERVICES_PREFIX, &ro, &r);
  if (rc)
    return rc;
  pthread_mutex_lock(&g.lock);
  for (size_t i = 0; i < r->n; i++) {
    coord_kv_t *kv = &r->kvs[i];
    if (kv->key_len < SVC_PREFIX_LEN)
      continue;
    cache_apply(&g.services, kv->key + SVC_PREFIX_LEN, kv->key_len - SVC_PREFIX_LEN, 1, kv->value,
                kv->value_len, kv->mod_revision, kv->create_revision, kv->version, kv->lease);
  }
  if (r->revision > g.services.rev)
    g.services.rev = r->revision;
  g.services.notified = g.services.rev;
  pthread_mutex_unlock(&g.lock);
  coord_kv_result_free(r);
  return 0;
}

/* 1: a service name; 2: name/id; 0: anything else. */
static int depth(const char *rel) {
  if (!*rel)
    return 0;
  const char *s = strchr(rel, '/');
  if (!s)
    return 1;
  return strchr(s + 1, '/') || !s[1] ? 0 : 2;
}

int services_stat(const char *rel, struct stat *st) {
  mode_t dmode = S_IFDIR | (g.o.ro ? 0555 : 0755);
  if (!*rel) {
    cfs_fill_stat(st, dmode, 0, NULL);
    return 0;
  }
  int d = depth(rel);
  int rc = -ENOENT;
  pthread_mutex_lock(&g.lock);
  struct cfs_node *n = cache_find(&g.services, rel);
  if (d == 1) {
    cfs_fill_stat(st, dmode, 0, n ? &n->mtime : NULL);
    rc = 0;
  } else if (d == 2 && n && n->present && !n->bad) {
    cfs_fill_stat(st, S_IFREG | (g.o.ro ? 0444 : 0644), (off_t)n->len, &n->mtime);
    rc = 0;
  }
  pthread_mutex_unlock(&g.lock);
  return rc;
}

struct list_ctx {
  void (*fill)(const char *name, mode_t mode, void *arg);
  void *arg;
  int want_dirs;
};

static void list_one(struct cfs_node *n, const char *name, void *arg) {
  struct list_ctx *lc = arg;
  if (lc->want_dirs && cache_is_dir(n))
    lc->fill(name, S_IFDIR, lc->arg);
  else if (!lc->want_dirs && cache_is_file(n))
    lc->fill(name, S_IFREG, lc->arg);
}

int services_list(const char *rel, void (*fill)(const char *name, mode_t mode, void *arg), void *arg) {
  int d = depth(rel);
  if (*rel && d != 1)
    return -ENOTDIR;
  struct list_ctx lc = {fill, arg, d == 0};
  pthread_mutex_lock(&g.lock);
  cache_children(&g.services, rel, list_one, &lc);
  pthread_mutex_unlock(&g.lock);
  return 0;
}

int services_open(const char *rel, struct cfs_file *f, int flags, int create) {
  if (depth(rel) != 2)
    return depth(rel) == 1 ? -EISDIR : -ENOENT;
  if (!cfs_key_ok(rel, strlen(rel)))
    return -EINVAL;
  f->key = strdup(rel);
  if (!f->key)
    return -ENOMEM;
  f->writable = (flags & O_ACCMODE) != O_RDONLY;
  if (!f->writable && !create) {
    struct stat st;
    return services_stat(rel, &st);
  }
  return 0;
}

int services_read(struct cfs_file *f, size_t size, off_t off, char **out, size_t *out_len) {
  *out = NULL;
  *out_len = 0;
  pthread_mutex_lock(&g.lock);
  struct cfs_node *n = cache_find(&g.services, f->key);
  if (n && n->present && (size_t)off < n->len) {
    size_t len = n->len - (size_t)off < size ? n->len - (size_t)off : size;
    *out = malloc(len);
    if (*out) {
      memcpy(*out, n->val + off, len);
      *out_len = len;
    }
  }
  pthread_mutex_unlock(&g.lock);
  CFS_COUNT(cache_hits);
  return 0;
}

static int blank(const char *s, size_t n) {
  for (size_t i = 0; i < n; i++)
    if (s[i] != ' ' && s[i] != '\n' && s[i] != '\t' && s[i] != '\r')
      return 0;
  return 1;
}

/* Checks doc against DESIGN's instance document and fills in id and name
 * from the path.  0, or -EINVAL with what is wrong in why. */
static int check_doc(json_t *doc, const char *name, const char *id, char *why, size_t size) {
  if (!json_is_object(doc)) {
    snprintf(why, size, "not a JSON object");
    return -EINVAL;
  }
  json_t *a = json_object_get(doc, "address"), *p = json_object_get(doc, "port");
  if (!json_is_string(a) || !*json_string_value(a)) {
    snprintf(why, size, "\"address\" %s", !a ? "missing" : "is not a non-empty string");
    return -EINVAL;
  }
  if (!json_is_integer(p)) {
    snprintf(why, size, "\"port\" %s", !p ? "missing" : "is not an integer");
    return -EINVAL;
  }
  if (json_integer_value(p) < 1 || json_integer_value(p) > 65535) {
    snprintf(why, size, "\"port\" %lld out of range 1..65535", (long long)json_integer_value(p));
    return -EINVAL;
  }
  json_t *i = json_object_get(doc, "id"), *n = json_object_get(doc, "name"),
         *m = json_object_get(doc, "metadata");
  if (i && (!json_is_string(i) || strcmp(json_string_value(i), id))) {
    snprintf(why, size, "\"id\" disagrees with the path: must be \"%s\" or left out", id);
    return -EINVAL;
  }
  if (n && (!json_is_string(n) || strcmp(json_string_value(n), name))) {
    snprintf(why, size, "\"name\" disagrees with the path: must be \"%s\" or left out", name);
    return -EINVAL;
  }
  if (m && !json_is_object(m) && !json_is_null(m)) {
    snprintf(why, size, "\"metadata\" is not an object");
    return -EINVAL;
  }
  json_object_set_new(doc, "id", json_string(id));
  json_object_set_new(doc, "name", json_string(name));
  return 0;
}

/* One invalid document: logged once per failed write or close. */
static void log_invalid(const struct cfs_file *f, const char *why) {
  cfs_log(LOG_WARNING, "/services/%s: invalid instance document, nothing registered (EINVAL): %s", f->key,
          why);
}

struct reg {
  uint64_t id;
  char *key;   /* "name/id" */
  char *value; /* the document registered; NULL until the first put */
  size_t len;
  int64_t lease;
  int64_t rev; /* revision of the last put of the document */
  pid_t pid;   /* the process that opened the file (0: unknown) */
  int lost;    /* the lease is gone: the next re-registration grants one */
  int rereg;   /* a reregister thread works on it */
  int again;   /* asked for another round while that thread works */
  struct reg *next;
};
static pthread_mutex_t reg_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t rereg_cv = PTHREAD_COND_INITIALIZER; /* rereg_* changed */
static struct reg *regs;
static uint64_t next_reg_id = 1;
static int rereg_threads; /* reregister threads running, under reg_lock */
static int rereg_stop;    /* services_shutdown has begun, under reg_lock */

static struct reg *reg_find(uint64_t id) {
  for (struct reg *r = regs; r; r = r->next)
    if (r->id == id)
      return r;
  return NULL;
}

static void on_lease_lost(int64_t lease, void *arg);

/* Grants a lease kept alive for registration id.  0 or COORD_E*. */
static int grant(uint64_t id, int64_t *lease) {
  int rc = coord_lease_grant(g.c, g.o.service_ttl_ms, lease);
  if (rc)
    return rc;
  rc = coord_lease_keepalive(g.c, *lease, on_lease_lost, (void *)(uintptr_t)id);
  if (rc)
    coord_lease_revoke(g.c, *lease);
  return rc;
}

/* Puts the instance under lease; *rev: the revision of the put. */
static int put_instance(const char *key, const char *value, size_t len, int64_t lease, int64_t *rev) {
  char *k = malloc(SVC_PREFIX_LEN + strlen(key) + 1);
  if (!k)
    return COORD_ENOMEM;
  sprintf(k, SERVICES_PREFIX "%s", key);
  coord_put_opts_t po = {.lease = lease, .timeout_ms = g.o.timeout_ms};
  coord_kv_result_t *r = NULL;
  pthread_mutex_lock(&g.lock);
  cache_pending(&g.services, key, 1);
  pthread_mutex_unlock(&g.lock);
  int rc = coord_kv_put(g.c, k, value, len, &po, &r);
  pthread_mutex_lock(&g.lock);
  if (!rc) {
    cache_apply(&g.services, key, strlen(key), 1, value, len, r->revision, -1, -1, lease);
    *rev = r->revision;
  }
  cache_pending(&g.services, key, -1);
  pthread_mutex_unlock(&g.lock);
  coord_kv_result_free(r);
  free(k);
  return rc;
}

/* Waits up to 1 s, or less if services_shutdown begins; 1 if it has. */
static int rereg_pause(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  ts.tv_sec += 1;
  pthread_mutex_lock(&reg_lock);
  while (!rereg_stop && pthread_cond_timedwait(&rereg_cv, &reg_lock, &ts) == 0)
    ;
  int stop = rereg_stop;
  pthread_mutex_unlock(&reg_lock);
  return stop;
}

/* One round of a re-registration: puts the document again, under the
 * registration's lease while it lives, else under a new one.  Returns 0
 * when done (registered, or nothing left to do), 1 for another round at
 * once, -1 after a failure (another round after a pause). */
static int reregister_round(uint64_t id) {
  pthread_mutex_lock(&reg_lock);
  struct reg *r = rereg_stop ? NULL : reg_find(id);
  if (!r || !r->value) { /* released meanwhile, shutting down, or never put */
    if (r)
      r->rereg = 0;
    pthread_mutex_unlock(&reg_lock);
    return 0;
  }
  r->again = 0;
  char *key = strdup(r->key), *value = malloc(r->len + 1);
  size_t len = r->len;
  int64_t lease = r->lost ? 0 : r->lease;
  if (value)
    memcpy(value, r->value, len);
  pthread_mutex_unlock(&reg_lock);
  int64_t fresh = 0, rev = 0;
  int rc = !key || !value ? COORD_ENOMEM : 0;
  if (!rc && lease) {
    rc = put_instance(key, value, len, lease, &rev);
    if (rc == COORD_ENOTFOUND) { /* "requested lease not found": expired or revoked */
      pthread_mutex_lock(&reg_lock);
      if ((r = reg_find(id)) && r->lease == lease)
        r->lost = 1;
      pthread_mutex_unlock(&reg_lock);
    }
  } else if (!rc) {
    rc = grant(id, &fresh);
    if (!rc && (rc = put_instance(key, value, len, fresh, &rev))) {
      coord_lease_revoke(g.c, fresh);
      fresh = 0;
    }
  }
  free(key);
  free(value);
  if (rc == COORD_ENOTFOUND && lease)
    return 1; /* the next round grants a new lease */
  if (rc)
    return -1;
  int64_t old = 0;
  int more = 0;
  pthread_mutex_lock(&reg_lock);
  r = reg_find(id);
  if (r) {
    if (fresh) {
      old = r->lease;
      r->lease = fresh;
      r->lost = 0;
    }
    if (rev > r->rev)
      r->rev = rev;
    more = r->again && !rereg_stop; /* deleted or rewritten meanwhile */
    if (!more)
      r->rereg = 0;
  }
  pthread_mutex_unlock(&reg_lock);
  if (!r && fresh) /* released while we registered: undo */
    coord_lease_revoke(g.c, fresh);
  else if (old && old != fresh) /* the lost one, if etcd still has it: no leak */
    coord_lease_revoke(g.c, old);
  return more;
}

/* The rounds of one re-registration: until one succeeds with no other
 * asked for, the file is released, 100 pauses have passed (one after each
 * failure) or services_shutdown begins. */
static void reregister_rounds(uint64_t id) {
  int pauses = 0, quick = 0;
  for (;;) {
    int rc = reregister_round(id);
    if (rc == 0)
      return;
    if (rc > 0 && ++quick % 16) /* another round at once (not for ever without a pause) */
      continue;
    if (rc < 0)
      CFS_COUNT(errors);
    if (++pauses >= 100 || rereg_pause())
      break;
  }
  pthread_mutex_lock(&reg_lock);
  struct reg *r = reg_find(id);
  if (r)
    r->rereg = 0;
  char *key = r && pauses >= 100 ? strdup(r->key) : NULL;
  pthread_mutex_unlock(&reg_lock);
  if (key)
    cfs_log(LOG_ERR, "/services/%s: gave up registering it again after %d attempts", key, pauses);
  free(key);
}

/* Re-registration after a lost lease or a deleted key, on a thread of its
 * own (the lost callback runs on libcoord's event thread, the delete is
 * seen by the watch thread: neither may block). */
static void *reregister(void *arg) {
  reregister_rounds((uint64_t)(uintptr_t)arg);
  pthread_mutex_lock(&reg_lock);
  assert(rereg_threads > 0);
  rereg_threads--;
  pthread_cond_broadcast(&rereg_cv);
  pthread_mutex_unlock(&reg_lock);
  return NULL;
}

/* reg_lock held.  Has r registered again: asks its running reregister
 * thread for another round, or starts one.  0, or -1 if none could start. */
static int rereg_begin(struct reg *r) {
  if (rereg_stop)
    return -1;
  if (r->rereg) {
    r->again = 1;
    return 0;
  }
  pthread_t t;
  if (pthread_create(&t, NULL, reregister, (void *)(uintptr_t)r->id))
    return -1;
  pthread_detach(t);
  r->rereg = 1;
  rereg_threads++; /* under reg_lock before the thread can end */
  return 0;
}

static void on_lease_lost(int64_t lease, void *arg) {
  uint64_t id = (uint64_t)(uintptr_t)arg;
  pthread_mutex_lock(&reg_lock);
  struct reg *r = reg_find(id);
  int again = r && r->lease == lease && !rereg_stop;
  char *key = again ? strdup(r->key) : NULL;
  int started = 0;
  if (again) {
    r->lost = 1;
    started = !rereg_begin(r);
  }
  pthread_mutex_unlock(&reg_lock);
  if (again)
    cfs_log(started ? LOG_WARNING : LOG_ERR, "lease %llx of /services/%s lost: %s", (unsigned long long)lease,
            key ? key : "?", started ? "registering it again" : "cannot start a thread to register it again");
  free(key);
}

void services_deleted(const char *key, size_t len, int64_t rev) {
  int n = 0, failed = 0;
  pthread_mutex_lock(&reg_lock);
  for (struct reg *r = regs; r; r = r->next)
    if (r->value && rev > r->rev && strlen(r->key) == len && !memcmp(r->key, key, len)) {
      if (rereg_begin(r))
        failed++;
      else
        n++;
    }
  pthread_mutex_unlock(&reg_lock);
  if (n || failed)
    cfs_log(failed ? LOG_ERR : LOG_NOTICE,
            "/services/%.*s deleted at revision %lld while its file is open: %s", (int)len, key,
            (long long)rev, failed ? "cannot start a thread to register it again" : "registering it again");
}

void services_shutdown(void) {
  pthread_mutex_lock(&reg_lock);
  rereg_stop = 1;
  pthread_cond_broadcast(&rereg_cv);
  while (rereg_threads > 0) /* each ends within its libcoord call's timeout */
    pthread_cond_wait(&rereg_cv, &reg_lock);
  pthread_mutex_unlock(&reg_lock);
}

/* Registers (or replaces) f's instance with value.  0 or -errno. */
static int do_register(struct cfs_file *f, const char *value, size_t len) {
  char *v = malloc(len + 1);
  if (!v)
    return -ENOMEM;
  memcpy(v, value, len);
  v[len] = 0;
  int rc = 0;
  pthread_mutex_lock(&reg_lock);
  struct reg *r = f->reg_id ? reg_find(f->reg_id) : NULL;
  if (!r) {
    r = calloc(1, sizeof(*r));
    if (!r || !(r->key = strdup(f->key))) {
      free(r);
      r = NULL;
      rc = COORD_ENOMEM;
    } else {
      r->id = next_reg_id++;
      r->pid = f->opener;
      r->next = regs;
      regs = r;
      f->reg_id = r->id;
    }
  }
  int64_t lease = r ? r->lease : 0;
  pthread_mutex_unlock(&reg_lock);
  if (!rc && !lease) {
    rc = grant(f->reg_id, &lease);
    if (!rc) {
      pthread_mutex_lock(&reg_lock);
      reg_find(f->reg_id)->lease = lease;
      pthread_mutex_unlock(&reg_lock);
    }
  }
  int64_t rev = 0;
  if (!rc)
    rc = put_instance(f->key, v, len, lease, &rev);
  if (rc) {
    free(v);
    CFS_COUNT(errors);
    cfs_log(LOG_WARNING, "/services/%s: cannot register: %s", f->key, coord_strerror(rc));
    return -cfs_errno(rc);
  }
  pthread_mutex_lock(&reg_lock);
  r = reg_find(f->reg_id);
  free(r->value);
  r->value = v;
  r->len = len;
  if (rev > r->rev)
    r->rev = rev;
  if (r->rereg) /* a re-registration may be putting the old document */
    r->again = 1;
  pthread_mutex_unlock(&reg_lock);
  f->registered = 1;
  CFS_COUNT(commits);
  return 0;
}

int services_write(struct cfs_file *f, const char *buf, size_t size, off_t off) {
  size_t end = (size_t)off + size, old_len = f->len;
  if (end > CFS_MAX_REQUEST - CFS_REQUEST_OVERHEAD)
    return -EFBIG;
  if (end > f->cap) {
    char *b = realloc(f->buf, end);
    if (!b)
      return -ENOMEM;
    f->buf = b;
    f->cap = end;
  }
  if ((size_t)off > f->len)
    memset(f->buf + f->len, ' ', (size_t)off - f->len);
  memcpy(f->buf + off, buf, size);
  if (end > f->len)
    f->len = end;
  if (blank(f->buf, f->len))
    return (int)size;
  json_error_t err;
  char why[JSON_ERROR_TEXT_LENGTH + 200];
  json_t *doc = json_loadb(f->buf, f->len, 0, &err);
  if (!doc) {
    if (json_error_code(&err) == json_error_premature_end_of_input)
      return (int)size; /* not complete yet */
    f->len = old_len;
    snprintf(why, sizeof(why), "not JSON at byte %d (line %d, column %d): %s", err.position, err.line,
             err.column, err.text);
    log_invalid(f, why);
    return -EINVAL;
  }
  char *name = strdup(f->key), *id = name ? strchr(name, '/') : NULL;
  int rc = -ENOMEM;
  if (id) {
    *id++ = 0;
    rc = check_doc(doc, name, id, why, sizeof(why));
    if (rc)
      log_invalid(f, why);
  }
  char *value = rc ? NULL : json_dumps(doc, JSON_COMPACT | JSON_PRESERVE_ORDER);
  if (!rc && !value)
    rc = -ENOMEM;
  if (!rc)
    rc = do_register(f, value, strlen(value));
  free(value);
  free(name);
  json_decref(doc);
  if (rc) {
    f->len = old_len;
    return rc;
  }
  return (int)size;
}

int services_flush(struct cfs_file *f) {
  if (f->writable && !f->registered && f->len && !blank(f->buf, f->len)) {
    json_error_t err;
    json_t *doc = json_loadb(f->buf, f->len, 0, &err);
    char why[JSON_ERROR_TEXT_LENGTH + 100];
    if (doc) /* cannot be: a complete document was checked by its write */
      snprintf(why, sizeof(why), "not registered");
    else
      snprintf(why, sizeof(why), "incomplete JSON at close (%zu bytes): %s", f->len, err.text);
    json_decref(doc);
    log_invalid(f, why);
    return -EINVAL;
  }
  return 0;
}

void services_release(struct cfs_file *f) {
  if (!f->reg_id)
    return;
  pthread_mutex_lock(&reg_lock);
  struct reg *r = NULL, **rp;
  for (rp = &regs; *rp; rp = &(*rp)->next)
    if ((*rp)->id == f->reg_id) {
      r = *rp;
      *rp = r->next;
      break;
    }
  pthread_mutex_unlock(&reg_lock);
  f->reg_id = 0;
  f->registered = 0;
  if (!r)
    return;
  /* the key is attached to the lease: revoking deletes it at once (the
   * registration is out of the list, so that delete is not put back) */
  if (r->lease)
    coord_lease_revoke(g.c, r->lease);
  free(r->key);
  free(r->value);
  free(r);
}

/* The command name of process pid ("?" if gone). */
static void comm_of(pid_t pid, char *buf, size_t size) {
  snprintf(buf, size, "?");
  char path[64];
  snprintf(path, sizeof(path), "/proc/%d/comm", (int)pid);
  FILE *fp = pid > 0 ? fopen(path, "r") : NULL;
  if (!fp)
    return;
  if (fgets(buf, (int)size, fp))
    buf[strcspn(buf, "\n")] = 0;
  fclose(fp);
}

int services_unlink(const char *rel) {
  if (depth(rel) != 2)
    return -EPERM;
  /* an instance that a file of this mount keeps registered: deleting it
   * would only have it registered again (services_deleted) */
  pid_t holder = -1;
  pthread_mutex_lock(&reg_lock);
  for (struct reg *r = regs; r && holder < 0; r = r->next)
    if (r->value && !strcmp(r->key, rel))
      holder = r->pid;
  pthread_mutex_unlock(&reg_lock);
  if (holder >= 0) {
    char comm[32];
    comm_of(holder, comm, sizeof(comm));
    cfs_log(LOG_INFO, "rm /services/%s: EBUSY: registered through this mount by an open file (pid %d, %s)",
            rel, (int)holder, comm);
    return -EBUSY;
  }
  char *k = malloc(SVC_PREFIX_LEN + strlen(rel) + 1);
  if (!k)
    return -ENOMEM;
  sprintf(k, SERVICES_PREFIX "%s", rel);
  coord_range_opts_t ro = {.timeout_ms = g.o.timeout_ms};
  coord_kv_result_t *r = NULL;
  int rc = coord_kv_delete(g.c, k, &ro, &r);
  free(k);
  if (rc) {
    CFS_COUNT(errors);
    return -cfs_errno(rc);
  }
  if (r->count == 0)
    rc = -ENOENT;
  else {
    pthread_mutex_lock(&g.lock);
    cache_apply(&g.services, rel, strlen(rel), 0, NULL, 0, r->revision, 0, 0, 0);
    pthread_mutex_unlock(&g.lock);
  }
  coord_kv_result_free(r);
  return rc;
}

int services_xattr(const char *rel, const char *name, char *buf, size_t size) {
  if (depth(rel) != 2)
    return name ? -ENODATA : 0;
  pthread_mutex_lock(&g.lock);
  struct cfs_node *n = cache_find(&g.services, rel);
  int rc = cache_xattr(n && n->present && !n->bad ? n : NULL, name, buf, size);
  pthread_mutex_unlock(&g.lock);
  return rc;
}
