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
 *
 * Any name below /services looks up as a directory (empty if it has no
 * instances), so `exec 3>/services/chat/chat-1` works for a new service;
 * only names with live instances are listed.
 *
 * Locking: file->lock held by the caller for the cfs_file functions; g.lock
 * around cache access only.
 */
#include "coordfs.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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
 * from the path.  0 or -EINVAL. */
static int check_doc(json_t *doc, const char *name, const char *id) {
  if (!json_is_object(doc))
    return -EINVAL;
  json_t *a = json_object_get(doc, "address"), *p = json_object_get(doc, "port");
  if (!json_is_string(a) || !*json_string_value(a))
    return -EINVAL;
  if (!json_is_integer(p) || json_integer_value(p) < 1 || json_integer_value(p) > 65535)
    return -EINVAL;
  json_t *i = json_object_get(doc, "id"), *n = json_object_get(doc, "name"),
         *m = json_object_get(doc, "metadata");
  if (i && (!json_is_string(i) || strcmp(json_string_value(i), id)))
    return -EINVAL;
  if (n && (!json_is_string(n) || strcmp(json_string_value(n), name)))
    return -EINVAL;
  if (m && !json_is_object(m) && !json_is_null(m))
    return -EINVAL;
  json_object_set_new(doc, "id", json_string(id));
  json_object_set_new(doc, "name", json_string(name));
  return 0;
}

static int do_register(struct cfs_file *f, const char *value, size_t len) {
  int rc = 0;
  if (!f->lease) {
    int64_t lease = 0;
    rc = coord_lease_grant(g.c, g.o.service_ttl_ms, &lease);
    if (!rc) {
      rc = coord_lease_keepalive(g.c, lease, NULL, NULL);
      if (rc)
        coord_lease_revoke(g.c, lease);
      else
        f->lease = lease;
    }
  }
  char *k = malloc(SVC_PREFIX_LEN + strlen(f->key) + 1);
  if (!rc && !k)
    rc = COORD_ENOMEM;
  if (!rc) {
    sprintf(k, SERVICES_PREFIX "%s", f->key);
    coord_put_opts_t po = {.lease = f->lease, .timeout_ms = g.o.timeout_ms};
    coord_kv_result_t *r = NULL;
    pthread_mutex_lock(&g.lock);
    cache_pending(&g.services, f->key, 1);
    pthread_mutex_unlock(&g.lock);
    rc = coord_kv_put(g.c, k, value, len, &po, &r);
    if (!rc) {
      pthread_mutex_lock(&g.lock);
      cache_apply(&g.services, f->key, strlen(f->key), 1, value, len, r->revision, -1, -1, f->lease);
      pthread_mutex_unlock(&g.lock);
      f->registered = 1;
      CFS_COUNT(commits);
    }
    pthread_mutex_lock(&g.lock);
    cache_pending(&g.services, f->key, -1);
    pthread_mutex_unlock(&g.lock);
    coord_kv_result_free(r);
  }
  free(k);
  if (rc) {
    CFS_COUNT(errors);
    return -cfs_errno(rc);
  }
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
  json_t *doc = json_loadb(f->buf, f->len, 0, &err);
  if (!doc) {
    if (json_error_code(&err) == json_error_premature_end_of_input)
      return (int)size; /* not complete yet */
    f->len = old_len;
    return -EINVAL;
  }
  char *name = strdup(f->key), *id = name ? strchr(name, '/') : NULL;
  int rc = -ENOMEM;
  if (id) {
    *id++ = 0;
    rc = check_doc(doc, name, id);
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
  if (f->writable && !f->registered && f->len && !blank(f->buf, f->len))
    return -EINVAL;
  return 0;
}

void services_release(struct cfs_file *f) {
  if (f->lease) {
    /* the key is attached to the lease: revoking deletes it at once */
    coord_lease_revoke(g.c, f->lease);
    f->lease = 0;
    f->registered = 0;
  }
}

int services_unlink(const char *rel) {
  if (depth(rel) != 2)
    return -EPERM;
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
