/*
 * util.c — small things every subsystem needs: error codes and the
 * thread-local detail message, monotonic time, allocation helpers, the
 * namespace prefix on keys, and conversion of etcd KeyValues and events
 * into the public structs.
 *
 * Nothing here holds state shared between threads except the thread-local
 * error buffer, which each thread owns.
 */
#include "internal.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* ---------------------------------------------------------------- errors */

static __thread char err_detail[512];

const char *coord_strerror(int err) {
  switch (err) {
  case COORD_OK:
    return "success";
  case COORD_EINVAL:
    return "invalid argument";
  case COORD_ENOMEM:
    return "out of memory";
  case COORD_EUNAVAILABLE:
    return "etcd unavailable";
  case COORD_ETIMEDOUT:
    return "timed out";
  case COORD_EACCES:
    return "permission denied by etcd";
  case COORD_EAUTH:
    return "authentication failed";
  case COORD_ENOTFOUND:
    return "not found";
  case COORD_ELOCKED:
    return "lock is held";
  case COORD_ECONFLICT:
    return "conflicting change";
  case COORD_ETOOBIG:
    return "request too large";
  case COORD_ELOST:
    return "lock or lease lost";
  case COORD_ECANCELED:
    return "cancelled";
  case COORD_ECOMPACTED:
    return "revision compacted";
  case COORD_ECLOSED:
    return "closed";
  case COORD_ENOTSUP:
    return "not supported";
  case COORD_EPROTO:
    return "protocol error";
  case COORD_EFORMAT:
    return "bad value format";
  case COORD_EIO:
    return "I/O error";
  case COORD_EEXIST:
    return "already exists";
  case COORD_ETLS:
    return "TLS error";
  default:
    return "unknown error";
  }
}

const char *coord_last_error(void) {
  return err_detail;
}

int coord__err(int code, const char *fmt, ...) {
  /* Format into a scratch buffer first: the arguments may point into
   * err_detail itself (a detail that wraps the previous one). */
  char buf[sizeof err_detail];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  memcpy(err_detail, buf, sizeof err_detail);
  return code;
}

void coord__err_clear(void) {
  err_detail[0] = '\0';
}

/* ---------------------------------------------------------------- time */

int64_t coord__now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int64_t coord__ms_to_ttl_s(int64_t ms) {
  if (ms <= 0)
    return 0;
  return (ms + 999) / 1000;
}

/* ---------------------------------------------------------------- memory */

void *coord__xmalloc(size_t n) {
  return calloc(1, n ? n : 1);
}

char *coord__strdup(const char *s) {
  return s ? strdup(s) : NULL;
}

char *coord__strndup(const char *s, size_t n) {
  char *p = malloc(n + 1);
  if (!p)
    return NULL;
  if (n)
    memcpy(p, s, n);
  p[n] = '\0';
  return p;
}

char *coord__sprintf(const char *fmt, ...) {
  va_list ap;
  char *s = NULL;
  va_start(ap, fmt);
  if (vasprintf(&s, fmt, ap) < 0)
    s = NULL;
  va_end(ap);
  return s;
}

/* ---------------------------------------------------------------- keys */

char *coord__prefix_end(const char *p, size_t n, size_t *out_len) {
  /* etcd's rule: increment the last byte that is not 0xff and cut there;
   * all 0xff (or empty) means "to the end of the key space": "\0". */
  char *end = malloc(n + 1);
  if (!end)
    return NULL;
  memcpy(end, p, n);
  for (size_t i = n; i > 0; i--) {
    unsigned char b = (unsigned char)end[i - 1];
    if (b < 0xff) {
      end[i - 1] = (char)(b + 1);
      end[i] = '\0';
      *out_len = i;
      return end;
    }
  }
  end[0] = '\0';
  *out_len = 1;
  return end;
}

void coord__kv_clear(coord_kv_t *kv) {
  if (!kv)
    return;
  free(kv->key);
  free(kv->value);
  memset(kv, 0, sizeof *kv);
}

int coord__kv_from_pb(coord_t *c, const Mvccpb__KeyValue *pb, coord_kv_t *out) {
  size_t ns = coord__ns_len(c);
  size_t klen = pb->key.len >= ns ? pb->key.len - ns : 0;
  const char *k = pb->key.len >= ns ? (const char *)pb->key.data + ns : "";
  memset(out, 0, sizeof *out);
  out->key = coord__strndup(k, klen);
  out->value = coord__strndup((const char *)pb->value.data, pb->value.len);
  if (!out->key || !out->value) {
    coord__kv_clear(out);
    return COORD_ENOMEM;
  }
  out->key_len = klen;
  out->value_len = pb->value.len;
  out->create_revision = pb->create_revision;
  out->mod_revision = pb->mod_revision;
  out->version = pb->version;
  out->lease = pb->lease;
  return 0;
}

void coord_kv_result_free(coord_kv_result_t *r) {
  if (!r)
    return;
  for (size_t i = 0; i < r->n; i++)
    coord__kv_clear(&r->kvs[i]);
  free(r->kvs);
  free(r);
}

void coord_txn_result_free(coord_txn_result_t *r) {
  if (!r)
    return;
  for (size_t i = 0; i < r->n; i++)
    coord_kv_result_free(r->responses[i]);
  free(r->responses);
  free(r);
}

/* ---------------------------------------------------------------- events */

void coord__event_clear(coord_event_t *ev) {
  if (!ev)
    return;
  coord__kv_clear(&ev->kv);
  free(ev->name);
  free(ev->id);
  if (ev->json)
    json_decref(ev->json);
  memset(ev, 0, sizeof *ev);
}

void coord_event_free(coord_event_t *ev) {
  if (!ev)
    return;
  coord__event_clear(ev);
  free(ev);
}

int coord__event_copy(const coord_event_t *src, coord_event_t *dst) {
  memset(dst, 0, sizeof *dst);
  dst->type = src->type;
  dst->revision = src->revision;
  dst->kv = src->kv;
  dst->kv.key = coord__strndup(src->kv.key ? src->kv.key : "", src->kv.key_len);
  dst->kv.value = coord__strndup(src->kv.value ? src->kv.value : "", src->kv.value_len);
  dst->name = coord__strdup(src->name);
  dst->id = coord__strdup(src->id);
  dst->json = src->json ? json_incref(src->json) : NULL;
  if (!dst->kv.key || !dst->kv.value || (src->name && !dst->name) || (src->id && !dst->id)) {
    coord__event_clear(dst);
    return COORD_ENOMEM;
  }
  return 0;
}
