/*
 * transport.c — the client core: configuration, gRPC channels to the etcd
 * endpoints, the one completion queue and the one event thread that runs
 * every completion and timer, unary calls with retry, failover and auth,
 * and coord_new / coord_close.
 *
 * Threads and locks:
 *   - The event thread (event_main) is the only thread that calls
 *     grpc_completion_queue_next on c->cq.  It runs tag callbacks and due
 *     timers, never while holding c->mu.
 *   - A blocking call (coord__unary) runs on a pluck queue owned by the
 *     calling thread (thread_cq, one per thread, shared by every coord_t the
 *     thread uses); only that thread plucks it, for its own call's tag, so
 *     it never meets the event thread's queue.
 *   - c->mu guards: cur (endpoint in use), token, the timer list, the
 *     in-flight call list and each listed call's grpc_call pointer (set and
 *     cleared by the attempt's thread, cancelled by coord_close), slots,
 *     the closing/stopping flags and `connected`.  It is a leaf lock:
 *     nothing else is taken while it is held, and no callback is called
 *     under it.
 *   - Configuration fields are written once in coord_new and read-only after.
 *
 * Unary call life cycle (unary_t): created by coord__unary_async with the
 * request already serialized; each attempt creates a grpc_call on the
 * current endpoint with one batch of all six ops; the batch's completion
 * (unary_done, on the event thread) either delivers the answer, or
 * schedules a retry (timer) on the next endpoint, or re-authenticates and
 * retries, or delivers the error.  The unary_t stays on c->calls from
 * creation to the callback so that coord_close can cancel it.  A blocking
 * call (coord__unary) goes through the same attempt_start/unary_decide
 * steps in a loop on the calling thread, sleeping its back-off there.
 */
#include "internal.h"

#include <assert.h>
#include <errno.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc_security.h>
#include <grpc/support/time.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct timer {
  int64_t due;
  coord__timer_fn fn;
  void *arg;
  struct timer *next;
} timer_t_;

typedef struct unary unary_t;

struct coord_s {
  /* immutable after coord_new */
  coord_config_t cfg;
  char *own[8]; /* owned copies of the cfg strings */
  size_t ns_len;
  size_t nep;
  char **ep;
  grpc_channel **ch;
  grpc_channel_credentials *creds;
  grpc_completion_queue *cq;
  pthread_t thread;
  unsigned int seed;

  pthread_mutex_t slot_mu; /* serialises subsystem creation */
  pthread_mutex_t mu;      /* see the file comment */
  pthread_cond_t cv;       /* signalled when calls drain */
  int cur;
  char *token;
  timer_t_ *timers;
  unary_t *calls;
  size_t ncalls;
  void *slots[COORD__SLOT_MAX];
  int closing;  /* coord_close began: subsystems shut down */
  int stopping; /* no new calls are started */
  int connected;
};

/* ---------------------------------------------------------------- methods */

const coord__method_t coord__m_range = {"/etcdserverpb.KV/Range", &etcdserverpb__range_response__descriptor,
                                        2};
const coord__method_t coord__m_put = {"/etcdserverpb.KV/Put", &etcdserverpb__put_response__descriptor, 1};
const coord__method_t coord__m_delete = {"/etcdserverpb.KV/DeleteRange",
                                         &etcdserverpb__delete_range_response__descriptor, 1};
const coord__method_t coord__m_txn = {"/etcdserverpb.KV/Txn", &etcdserverpb__txn_response__descriptor, 0};
const coord__method_t coord__m_compact = {"/etcdserverpb.KV/Compact",
                                          &etcdserverpb__compaction_response__descriptor, 1};
const coord__method_t coord__m_lease_grant = {"/etcdserverpb.Lease/LeaseGrant",
                                              &etcdserverpb__lease_grant_response__descriptor, 1};
const coord__method_t coord__m_lease_revoke = {"/etcdserverpb.Lease/LeaseRevoke",
                                               &etcdserverpb__lease_revoke_response__descriptor, 1};
const coord__method_t coord__m_lease_ttl = {"/etcdserverpb.Lease/LeaseTimeToLive",
                                            &etcdserverpb__lease_time_to_live_response__descriptor, 2};
const coord__method_t coord__m_auth = {"/etcdserverpb.Auth/Authenticate",
                                       &etcdserverpb__authenticate_response__descriptor, 1};
const coord__method_t coord__m_status = {"/etcdserverpb.Maintenance/Status",
                                         &etcdserverpb__status_response__descriptor, 2};

/* ---------------------------------------------------------------- config */

coord_config_t coord_default_config(void) {
  coord_config_t cfg;
  memset(&cfg, 0, sizeof cfg);
  cfg.timeout_ms = 5000;
  cfg.dial_timeout_ms = 5000;
  cfg.retry.max_attempts = 8;
  cfg.retry.initial_delay_ms = 50;
  cfg.retry.max_delay_ms = 1000;
  cfg.retry.multiplier = 2.0;
  return cfg;
}

static int config_check(const coord_config_t *cfg) {
  if (cfg->timeout_ms < -1 || cfg->dial_timeout_ms < -1)
    return coord__err(COORD_EINVAL, "timeout_ms and dial_timeout_ms must be >= -1");
  if (cfg->retry.max_attempts < 0 || cfg->retry.initial_delay_ms < 0 || cfg->retry.max_delay_ms < 0 ||
      cfg->retry.multiplier < 0)
    return coord__err(COORD_EINVAL, "retry settings must not be negative");
  if ((cfg->cert_file == NULL) != (cfg->key_file == NULL))
    return coord__err(COORD_EINVAL, "cert_file and key_file go together");
  if (cfg->password && !cfg->username)
    return coord__err(COORD_EINVAL, "password given without username");
  return 0;
}

/* Splits "a:1,http://b:2" into host:port strings; https:// turns on TLS.
 * Pure (no client needed), so that it can be fuzzed.  *out is a
 * NULL-terminated array freed with coord__endpoints_free. */
int coord__parse_endpoints(const char *list, char ***out, size_t *n, int *tls) {
  *out = NULL;
  *n = 0;
  if (!list)
    return coord__err(COORD_EINVAL, "endpoints: NULL");
  char *copy = coord__strdup(list), *save = NULL;
  if (!copy)
    return COORD_ENOMEM;
  size_t cap = 2;
  for (const char *p = list; *p; p++)
    cap += *p == ',';
  char **ep = calloc(cap, sizeof *ep);
  if (!ep) {
    free(copy);
    return COORD_ENOMEM;
  }
  size_t count = 0;
  int rc = 0;
  for (char *tok = strtok_r(copy, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
    while (*tok == ' ')
      tok++;
    size_t tl = strlen(tok);
    while (tl && tok[tl - 1] == ' ')
      tok[--tl] = '\0';
    if (!strncmp(tok, "https://", 8)) {
      *tls = 1;
      tok += 8;
    } else if (!strncmp(tok, "http://", 7)) {
      tok += 7;
    } else if (strstr(tok, "://")) {
      rc = coord__err(COORD_EINVAL, "endpoint '%s': only http:// and https:// are understood", tok);
      break;
    }
    tl = strlen(tok);
    if (tl && tok[tl - 1] == '/')
      tok[--tl] = '\0';
    char *colon = strrchr(tok, ':');
    char *end = NULL;
    long port = colon ? strtol(colon + 1, &end, 10) : 0;
    if (!colon || colon == tok || !end || *end || end == colon + 1 || colon[1] == '-' || colon[1] == '+' ||
        port < 1 || port > 65535 || strpbrk(tok, " /?#@\t")) {
      rc = coord__err(COORD_EINVAL, "endpoint '%s' is not host:port", tok);
      break;
    }
    assert(count + 1 < cap);
    ep[count] = coord__strdup(tok);
    if (!ep[count]) {
      rc = COORD_ENOMEM;
      break;
    }
    count++;
  }
  free(copy);
  if (!rc && count == 0)
    rc = coord__err(COORD_EINVAL, "no endpoint in '%s'", list);
  if (rc) {
    coord__endpoints_free(ep);
    return rc;
  }
  *out = ep;
  *n = count;
  return 0;
}

void coord__endpoints_free(char **ep) {
  for (size_t i = 0; ep && ep[i]; i++)
    free(ep[i]);
  free(ep);
}

static int parse_endpoints(coord_t *c, const char *list, int *tls) {
  return coord__parse_endpoints(list, &c->ep, &c->nep, tls);
}

static char *read_file(const char *path, int *rc) {
  FILE *f = fopen(path, "rb");
  if (!f) {
    *rc = coord__err(COORD_ETLS, "cannot read %s: %s", path, strerror(errno));
    return NULL;
  }
  size_t cap = 4096, n = 0;
  char *buf = malloc(cap);
  while (buf) {
    size_t got = fread(buf + n, 1, cap - n - 1, f);
    n += got;
    if (n < cap - 1)
      break;
    cap *= 2;
    char *nb = realloc(buf, cap);
    if (!nb) {
      free(buf);
      buf = NULL;
    }
    buf = nb;
  }
  fclose(f);
  if (!buf) {
    *rc = COORD_ENOMEM;
    return NULL;
  }
  buf[n] = '\0';
  return buf;
}

static int make_credentials(coord_t *c, int tls) {
  if (!tls && !c->cfg.ca_file && !c->cfg.cert_file) {
    c->creds = grpc_insecure_credentials_create();
    return 0;
  }
  int rc = 0;
  char *ca = NULL, *cert = NULL, *key = NULL;
  if (c->cfg.ca_file && !(ca = read_file(c->cfg.ca_file, &rc)))
    goto out;
  if (c->cfg.cert_file &&
      (!(cert = read_file(c->cfg.cert_file, &rc)) || !(key = read_file(c->cfg.key_file, &rc))))
    goto out;
  grpc_ssl_pem_key_cert_pair pair = {key, cert};
  c->creds = grpc_ssl_credentials_create(ca, cert ? &pair : NULL, NULL, NULL);
  if (!c->creds)
    rc = coord__err(COORD_ETLS, "TLS credentials rejected");
out:
  free(ca);
  free(cert);
  if (key) {
    memset(key, 0, strlen(key));
    free(key);
  }
  return rc;
}

static grpc_channel *make_channel(coord_t *c, const char *ep) {
  grpc_arg args[8];
  int n = 0;
  args[n].type = GRPC_ARG_INTEGER, args[n].key = GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH,
  args[n++].value.integer = -1;
  args[n].type = GRPC_ARG_INTEGER, args[n].key = GRPC_ARG_KEEPALIVE_TIME_MS, args[n++].value.integer = 6000;
  args[n].type = GRPC_ARG_INTEGER, args[n].key = GRPC_ARG_KEEPALIVE_TIMEOUT_MS,
  args[n++].value.integer = 3000;
  args[n].type = GRPC_ARG_INTEGER, args[n].key = GRPC_ARG_HTTP2_MAX_PINGS_WITHOUT_DATA,
  args[n++].value.integer = 0;
  args[n].type = GRPC_ARG_INTEGER, args[n].key = GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS,
  args[n++].value.integer = 100;
  args[n].type = GRPC_ARG_INTEGER, args[n].key = GRPC_ARG_MIN_RECONNECT_BACKOFF_MS,
  args[n++].value.integer = 100;
  args[n].type = GRPC_ARG_INTEGER, args[n].key = GRPC_ARG_MAX_RECONNECT_BACKOFF_MS,
  args[n++].value.integer = 1000;
  /* One subchannel per client channel: do not share connections with other
   * coord_t in the process (each has its own failover state). */
  args[n].type = GRPC_ARG_INTEGER, args[n].key = GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL,
  args[n++].value.integer = 1;
  grpc_channel_args ca = {(size_t)n, args};
  char *target = coord__sprintf("dns:///%s", ep);
  if (!target)
    return NULL;
  grpc_channel *ch = grpc_channel_create(target, c->creds, &ca);
  free(target);
  return ch;
}

/* ---------------------------------------------------------------- small API */

grpc_completion_queue *coord__cq(coord_t *c) {
  return c->cq;
}

int coord__default_timeout_ms(coord_t *c) {
  return c->cfg.timeout_ms;
}

size_t coord__ns_len(coord_t *c) {
  return c->ns_len;
}

char *coord__key(coord_t *c, const char *key, size_t *len) {
  size_t kl = strlen(key);
  char *k = malloc(c->ns_len + kl + 1);
  if (!k)
    return NULL;
  memcpy(k, c->cfg.prefix, c->ns_len);
  memcpy(k + c->ns_len, key, kl + 1);
  if (len)
    *len = c->ns_len + kl;
  return k;
}

int coord__endpoint_current(coord_t *c) {
  pthread_mutex_lock(&c->mu);
  int ep = c->cur;
  pthread_mutex_unlock(&c->mu);
  return ep;
}

void coord__endpoint_failed(coord_t *c, int ep) {
  pthread_mutex_lock(&c->mu);
  if (c->cur == ep && c->nep > 1)
    c->cur = (ep + 1) % (int)c->nep;
  pthread_mutex_unlock(&c->mu);
}

const char *coord__endpoint_name(coord_t *c, int ep) {
  return c->ep[ep];
}

void coord__set_connected(coord_t *c, int up) {
  pthread_mutex_lock(&c->mu);
  c->connected = up;
  pthread_mutex_unlock(&c->mu);
}

int coord__closing(coord_t *c) {
  pthread_mutex_lock(&c->mu);
  int v = c->closing;
  pthread_mutex_unlock(&c->mu);
  return v;
}

int coord__on_event_thread(coord_t *c) {
  return pthread_equal(pthread_self(), c->thread);
}

void *coord__slot(coord_t *c, int slot, coord__slot_new make) {
  assert(slot >= 0 && slot < COORD__SLOT_MAX);
  /* slot_mu serialises creation so that make() runs once; c->mu stays a
   * leaf lock because make() may use the client (it must not call
   * coord__slot for the same slot). */
  pthread_mutex_lock(&c->slot_mu);
  pthread_mutex_lock(&c->mu);
  void *s = c->slots[slot];
  pthread_mutex_unlock(&c->mu);
  if (!s && make) {
    s = make(c);
    pthread_mutex_lock(&c->mu);
    c->slots[slot] = s;
    pthread_mutex_unlock(&c->mu);
  }
  pthread_mutex_unlock(&c->slot_mu);
  return s;
}

void *coord__slot_get(coord_t *c, int slot) {
  return coord__slot(c, slot, NULL);
}

int64_t coord__backoff_ms(coord_t *c, int n) {
  double d = c->cfg.retry.initial_delay_ms;
  for (int i = 1; i < n && d < c->cfg.retry.max_delay_ms; i++)
    d *= c->cfg.retry.multiplier > 1 ? c->cfg.retry.multiplier : 1;
  if (d > c->cfg.retry.max_delay_ms)
    d = c->cfg.retry.max_delay_ms;
  /* +-20% jitter so that clients that failed together retry apart */
  pthread_mutex_lock(&c->mu);
  double r = (double)rand_r(&c->seed) / RAND_MAX;
  pthread_mutex_unlock(&c->mu);
  return (int64_t)(d * (0.8 + 0.4 * r));
}

/* ---------------------------------------------------------------- timers */

void coord__after(coord_t *c, int64_t delay_ms, coord__timer_fn fn, void *arg) {
  timer_t_ *t = malloc(sizeof *t);
  assert(t); /* a lost timer would silently stall a subsystem */
  t->due = coord__now_ms() + (delay_ms > 0 ? delay_ms : 0);
  t->fn = fn;
  t->arg = arg;
  pthread_mutex_lock(&c->mu);
  timer_t_ **pp = &c->timers;
  while (*pp && (*pp)->due <= t->due)
    pp = &(*pp)->next;
  t->next = *pp;
  *pp = t;
  pthread_mutex_unlock(&c->mu);
}

/* Runs the timers that are due; returns ms until the next one (<= 20). */
static int64_t run_timers(coord_t *c) {
  for (;;) {
    int64_t now = coord__now_ms();
    pthread_mutex_lock(&c->mu);
    timer_t_ *t = c->timers;
    if (!t || t->due > now) {
      int64_t wait = t ? t->due - now : 20;
      pthread_mutex_unlock(&c->mu);
      return wait < 20 ? wait : 20;
    }
    c->timers = t->next;
    pthread_mutex_unlock(&c->mu);
    t->fn(c, t->arg);
    free(t);
  }
}

static void *event_main(void *arg) {
  coord_t *c = arg;
  for (;;) {
    int64_t wait = run_timers(c);
    gpr_timespec dl = gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC), gpr_time_from_millis(wait, GPR_TIMESPAN));
    grpc_event ev = grpc_completion_queue_next(c->cq, dl, NULL);
    if (ev.type == GRPC_QUEUE_SHUTDOWN)
      break;
    if (ev.type == GRPC_OP_COMPLETE) {
      coord__tag_t *tag = ev.tag;
      tag->fn(tag, ev.success);
    }
  }
  return NULL;
}

/* ---------------------------------------------------------------- messages */

grpc_byte_buffer *coord__pack(const ProtobufCMessage *m) {
  size_t n = protobuf_c_message_get_packed_size(m);
  grpc_slice s = grpc_slice_malloc(n);
  protobuf_c_message_pack(m, GRPC_SLICE_START_PTR(s));
  grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(&s, 1);
  grpc_slice_unref(s);
  return bb;
}

ProtobufCMessage *coord__unpack(const ProtobufCMessageDescriptor *d, grpc_byte_buffer *bb) {
  grpc_byte_buffer_reader r;
  if (!grpc_byte_buffer_reader_init(&r, bb))
    return NULL;
  grpc_slice s = grpc_byte_buffer_reader_readall(&r);
  grpc_byte_buffer_reader_destroy(&r);
  ProtobufCMessage *m = protobuf_c_message_unpack(d, NULL, GRPC_SLICE_LENGTH(s), GRPC_SLICE_START_PTR(s));
  grpc_slice_unref(s);
  return m;
}

size_t coord__call_metadata(coord_t *c, grpc_metadata *md, int hasleader) {
  size_t n = 0;
  pthread_mutex_lock(&c->mu);
  if (c->token) {
    md[n].key = grpc_slice_from_static_string("token");
    md[n].value = grpc_slice_from_copied_string(c->token);
    n++;
  }
  pthread_mutex_unlock(&c->mu);
  if (hasleader) {
    md[n].key = grpc_slice_from_static_string("hasleader");
    md[n].value = grpc_slice_from_static_string("true");
    n++;
  }
  return n;
}

grpc_call *coord__stream_call(coord_t *c, int ep, const char *path) {
  grpc_slice method = grpc_slice_from_static_string(path);
  grpc_call *call = grpc_channel_create_call(c->ch[ep], NULL, GRPC_PROPAGATE_DEFAULTS, c->cq, method, NULL,
                                             gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
  grpc_slice_unref(method);
  return call;
}

/* ---------------------------------------------------------------- errors */

static int contains(grpc_slice s, const char *needle) {
  size_t n = strlen(needle), len = GRPC_SLICE_LENGTH(s);
  const char *p = (const char *)GRPC_SLICE_START_PTR(s);
  for (size_t i = 0; i + n <= len; i++)
    if (!memcmp(p + i, needle, n))
      return 1;
  return 0;
}

int coord__status_err(grpc_status_code st, grpc_slice details, const char *what) {
  int len = (int)GRPC_SLICE_LENGTH(details);
  const char *d = (const char *)GRPC_SLICE_START_PTR(details);
  int code;
  switch (st) {
  case GRPC_STATUS_OK:
    return 0;
  case GRPC_STATUS_UNAVAILABLE:
    code = COORD_EUNAVAILABLE;
    break;
  case GRPC_STATUS_DEADLINE_EXCEEDED:
    code = COORD_ETIMEDOUT;
    break;
  case GRPC_STATUS_PERMISSION_DENIED:
    code = COORD_EACCES;
    break;
  case GRPC_STATUS_UNAUTHENTICATED:
    code = COORD_EAUTH;
    break;
  case GRPC_STATUS_RESOURCE_EXHAUSTED:
    code = contains(details, "too many requests") ? COORD_EUNAVAILABLE : COORD_ETOOBIG;
    break;
  case GRPC_STATUS_NOT_FOUND:
    code = COORD_ENOTFOUND;
    break;
  case GRPC_STATUS_CANCELLED:
    code = COORD_ECANCELED;
    break;
  case GRPC_STATUS_OUT_OF_RANGE:
    code = contains(details, "compacted") ? COORD_ECOMPACTED : COORD_EINVAL;
    break;
  case GRPC_STATUS_INVALID_ARGUMENT:
    if (contains(details, "too large"))
      code = COORD_ETOOBIG;
    else if (contains(details, "authentication failed"))
      code = COORD_EAUTH;
    else
      code = COORD_EINVAL;
    break;
  case GRPC_STATUS_FAILED_PRECONDITION:
    code = contains(details, "authentication") ? COORD_EAUTH : COORD_EIO;
    break;
  default:
    code = COORD_EIO;
    break;
  }
  return coord__err(code, "%s: %.*s (grpc status %d)", what, len, d, (int)st);
}

/* ---------------------------------------------------------------- unary */

struct unary {
  coord__tag_t tag;
  coord_t *c;
  const coord__method_t *m;
  grpc_slice payload;
  int64_t deadline; /* monotonic ms; INT64_MAX: none */
  int attempt;
  int ep;
  int reauthed;
  grpc_call *call;
  grpc_metadata md[2];
  size_t nmd;
  grpc_byte_buffer *send;
  grpc_metadata_array md_init, md_trail;
  grpc_byte_buffer *recv;
  grpc_status_code status;
  grpc_slice details;
  coord__unary_cb cb;
  void *arg;
  grpc_completion_queue *cq; /* c->cq, or the calling thread's (blocking) */
  int fail;                  /* see unary_fail */
  char fail_detail[256];
  unary_t *next, *prev;
};

static void unary_attempt(coord_t *c, void *arg);

static void unary_unlink(unary_t *u) {
  coord_t *c = u->c;
  pthread_mutex_lock(&c->mu);
  if (u->prev)
    u->prev->next = u->next;
  else
    c->calls = u->next;
  if (u->next)
    u->next->prev = u->prev;
  c->ncalls--;
  if (c->ncalls == 0)
    pthread_cond_broadcast(&c->cv);
  pthread_mutex_unlock(&c->mu);
}

/* Ends an asynchronous call: the callback, then the answer and the unary_t
 * are freed. */
static void unary_finish(unary_t *u, int status, ProtobufCMessage *resp) {
  u->cb(u->c, status, resp, u->arg);
  if (resp)
    protobuf_c_message_free_unpacked(resp, NULL);
  grpc_slice_unref(u->payload);
  unary_unlink(u);
  free(u);
}

static void attempt_reset(unary_t *u) {
  /* u->call is taken off under c->mu: stop_event_thread cancels the calls
   * it finds on c->calls, and must never meet one being unreffed. */
  pthread_mutex_lock(&u->c->mu);
  grpc_call *call = u->call;
  u->call = NULL;
  pthread_mutex_unlock(&u->c->mu);
  if (call)
    grpc_call_unref(call);
  for (size_t i = 0; i < u->nmd; i++) {
    grpc_slice_unref(u->md[i].key);
    grpc_slice_unref(u->md[i].value);
  }
  u->nmd = 0;
  if (u->send)
    grpc_byte_buffer_destroy(u->send);
  if (u->recv)
    grpc_byte_buffer_destroy(u->recv);
  u->send = u->recv = NULL;
  grpc_metadata_array_destroy(&u->md_init);
  grpc_metadata_array_destroy(&u->md_trail);
  grpc_slice_unref(u->details);
  u->details = grpc_empty_slice();
}

static int retryable(const unary_t *u, int code, grpc_slice details) {
  if (code == COORD_EUNAVAILABLE) {
    if (u->m->idempotent)
      return 1;
    /* A Txn is retried only when etcd certainly did not apply it. */
    return contains(details, "no leader") || contains(details, "failed to connect") ||
           contains(details, "Connection refused") ||
           contains(details, "connections to all backends failing");
  }
  return code == COORD_ETIMEDOUT && u->m->idempotent == 2;
}

static void reauth_then_retry(coord_t *c, int status, void *arg) {
  unary_t *u = arg;
  if (status)
    unary_finish(u, status, NULL);
  else
    unary_attempt(c, u);
}

/* What to do once an attempt has finished: the answer, an error, a retry
 * after *delay ms, or a retry after re-authenticating.  The attempt's
 * resources are released in every case. */
enum { D_OK, D_FAIL, D_RETRY, D_REAUTH };

static int unary_decide(unary_t *u, int ok, ProtobufCMessage **resp, int *code, int64_t *delay) {
  coord_t *c = u->c;
  int64_t now = coord__now_ms();
  grpc_status_code st = ok ? u->status : GRPC_STATUS_UNAVAILABLE;
  *resp = NULL;
  if (st == GRPC_STATUS_OK) {
    *resp = u->recv ? coord__unpack(u->m->resp, u->recv) : NULL;
    attempt_reset(u);
    coord__set_connected(c, 1);
    if (!*resp) {
      *code = coord__err(COORD_EPROTO, "%s: answer could not be decoded", u->m->path);
      return D_FAIL;
    }
    return D_OK;
  }
  *code = coord__status_err(st, u->details, u->m->path);
  pthread_mutex_lock(&c->mu);
  int stopping = c->stopping, have_user = c->cfg.username != NULL;
  pthread_mutex_unlock(&c->mu);
  if (st == GRPC_STATUS_UNAUTHENTICATED && have_user && !u->reauthed && !stopping && u->m != &coord__m_auth) {
    /* etcd rejected the token (expired or the member restarted) */
    attempt_reset(u);
    u->reauthed = 1;
    return D_REAUTH;
  }
  if (*code == COORD_EUNAVAILABLE || *code == COORD_ETIMEDOUT) {
    coord__set_connected(c, 0);
    coord__endpoint_failed(c, u->ep);
  }
  *delay = coord__backoff_ms(c, u->attempt);
  int more = u->attempt < c->cfg.retry.max_attempts && now + *delay < u->deadline && !stopping;
  if (more && retryable(u, *code, u->details)) {
    if (*code == COORD_ETIMEDOUT)
      *delay = 0;
    attempt_reset(u);
    return D_RETRY;
  }
  if (*code == COORD_EUNAVAILABLE && u->attempt > 1)
    *code = coord__err(COORD_EUNAVAILABLE, "%s: no endpoint answered after %d attempts (last: %s)",
                       u->m->path, u->attempt, coord_last_error());
  attempt_reset(u);
  return D_FAIL;
}

static void unary_done(coord__tag_t *tag, int ok) {
  unary_t *u = (unary_t *)tag;
  ProtobufCMessage *resp;
  int code = 0;
  int64_t delay = 0;
  switch (unary_decide(u, ok, &resp, &code, &delay)) {
  case D_OK:
    unary_finish(u, 0, resp);
    break;
  case D_FAIL:
    unary_finish(u, code, NULL);
    break;
  case D_RETRY:
    coord__after(u->c, delay, unary_attempt, u);
    break;
  case D_REAUTH:
    coord__reauth_async(u->c, reauth_then_retry, u);
    break;
  }
}

static gpr_timespec abs_deadline(int64_t deadline_ms) {
  if (deadline_ms == INT64_MAX)
    return gpr_inf_future(GPR_CLOCK_REALTIME);
  int64_t rem = deadline_ms - coord__now_ms();
  if (rem < 0)
    rem = 0;
  return gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC), gpr_time_from_millis(rem, GPR_TIMESPAN));
}

/* A failure found while starting an attempt is delivered from the event
 * thread, never from inside coord__unary_async: its caller may hold a lock
 * that the callback takes. */
static void unary_fail_now(coord_t *c, void *arg) {
  unary_t *u = arg;
  COORD_UNUSED(c);
  unary_finish(u, coord__err(u->fail, "%s", u->fail_detail), NULL);
}

static void unary_fail(unary_t *u, int code) {
  u->fail = code;
  snprintf(u->fail_detail, sizeof u->fail_detail, "%s", coord_last_error());
  if (coord__on_event_thread(u->c))
    unary_fail_now(u->c, u);
  else
    coord__after(u->c, 0, unary_fail_now, u);
}

/* Starts one attempt on the current endpoint; 0, or the error that kept
 * it from starting (nothing is then outstanding). */
static int attempt_start(coord_t *c, unary_t *u) {
  pthread_mutex_lock(&c->mu);
  int stopping = c->stopping;
  u->ep = c->cur;
  pthread_mutex_unlock(&c->mu);
  if (stopping)
    return coord__err(COORD_ECLOSED, "client closed");
  u->attempt++;
  /* An idempotent call gives one endpoint at most half of what is left (at
   * least 1 s), so a frozen member cannot eat the whole deadline. */
  int64_t dl = u->deadline, now = coord__now_ms();
  if (u->m->idempotent == 2 && c->nep > 1 && dl != INT64_MAX && u->attempt < c->cfg.retry.max_attempts) {
    int64_t slice = (dl - now) / 2;
    if (slice < 1000)
      slice = 1000;
    if (now + slice < dl)
      dl = now + slice;
  }
  grpc_slice method = grpc_slice_from_static_string(u->m->path);
  grpc_call *call = grpc_channel_create_call(c->ch[u->ep], NULL, GRPC_PROPAGATE_DEFAULTS, u->cq, method, NULL,
                                             abs_deadline(dl), NULL);
  grpc_slice_unref(method);
  pthread_mutex_lock(&c->mu); /* published for stop_event_thread's cancel */
  u->call = call;
  pthread_mutex_unlock(&c->mu);
  u->nmd = coord__call_metadata(c, u->md, 0);
  u->send = grpc_raw_byte_buffer_create(&u->payload, 1);
  grpc_metadata_array_init(&u->md_init);
  grpc_metadata_array_init(&u->md_trail);
  grpc_op ops[6];
  memset(ops, 0, sizeof ops);
  ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
  ops[0].data.send_initial_metadata.count = u->nmd;
  ops[0].data.send_initial_metadata.metadata = u->nmd ? u->md : NULL;
  ops[1].op = GRPC_OP_SEND_MESSAGE;
  ops[1].data.send_message.send_message = u->send;
  ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
  ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
  ops[3].data.recv_initial_metadata.recv_initial_metadata = &u->md_init;
  ops[4].op = GRPC_OP_RECV_MESSAGE;
  ops[4].data.recv_message.recv_message = &u->recv;
  ops[5].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
  ops[5].data.recv_status_on_client.trailing_metadata = &u->md_trail;
  ops[5].data.recv_status_on_client.status = &u->status;
  ops[5].data.recv_status_on_client.status_details = &u->details;
  u->tag.fn = unary_done;
  grpc_call_error e = grpc_call_start_batch(u->call, ops, 6, &u->tag, NULL);
  if (e != GRPC_CALL_OK) {
    attempt_reset(u);
    return coord__err(COORD_EIO, "%s: grpc_call_start_batch failed (%d)", u->m->path, (int)e);
  }
  return 0;
}

static void unary_attempt(coord_t *c, void *arg) {
  unary_t *u = arg;
  int rc = attempt_start(c, u);
  if (rc)
    unary_fail(u, rc);
}

/* A new call, serialized and on c->calls (so that coord_close can cancel
 * it); NULL with the error set if the client is stopping. */
static unary_t *unary_new(coord_t *c, const coord__method_t *m, const ProtobufCMessage *req, int timeout_ms,
                          grpc_completion_queue *cq, int *rc) {
  unary_t *u = coord__xmalloc(sizeof *u);
  if (!u) {
    *rc = coord__err(COORD_ENOMEM, "out of memory");
    return NULL;
  }
  if (timeout_ms == 0)
    timeout_ms = c->cfg.timeout_ms;
  u->c = c;
  u->m = m;
  u->cq = cq;
  u->deadline = timeout_ms < 0 ? INT64_MAX : coord__now_ms() + timeout_ms;
  u->details = grpc_empty_slice();
  size_t n = protobuf_c_message_get_packed_size(req);
  u->payload = grpc_slice_malloc(n);
  protobuf_c_message_pack(req, GRPC_SLICE_START_PTR(u->payload));
  pthread_mutex_lock(&c->mu);
  if (c->stopping) {
    pthread_mutex_unlock(&c->mu);
    grpc_slice_unref(u->payload);
    free(u);
    *rc = coord__err(COORD_ECLOSED, "client closed");
    return NULL;
  }
  u->next = c->calls;
  if (c->calls)
    c->calls->prev = u;
  c->calls = u;
  c->ncalls++;
  pthread_mutex_unlock(&c->mu);
  return u;
}

int coord__unary_async(coord_t *c, const coord__method_t *m, const ProtobufCMessage *req, int timeout_ms,
                       coord__unary_cb cb, void *arg) {
  int rc = 0;
  unary_t *u = unary_new(c, m, req, timeout_ms, c->cq, &rc);
  if (!u)
    return rc;
  u->cb = cb;
  u->arg = arg;
  unary_attempt(c, u);
  return 0;
}

static int authenticate(coord_t *c);

/* Blocking calls run on a completion queue of the calling thread's own
 * (pluck), so the thread that waits also drives the call: no hand-over
 * through the event thread.  The queue lives as long as the thread; its
 * destructor holds a gRPC reference so that it may run after the last
 * coord_close. */
static pthread_key_t tcq_key;
static pthread_once_t tcq_once = PTHREAD_ONCE_INIT;

static void tcq_free(void *p) {
  grpc_init();
  grpc_completion_queue_shutdown(p);
  grpc_completion_queue_destroy(p);
  grpc_shutdown();
}

static void tcq_make_key(void) {
  pthread_key_create(&tcq_key, tcq_free);
}

static grpc_completion_queue *thread_cq(void) {
  pthread_once(&tcq_once, tcq_make_key);
  grpc_completion_queue *cq = pthread_getspecific(tcq_key);
  if (!cq) {
    cq = grpc_completion_queue_create_for_pluck(NULL);
    pthread_setspecific(tcq_key, cq);
  }
  return cq;
}

static void sleep_ms(int64_t ms) {
  struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000};
  while (nanosleep(&ts, &ts) && errno == EINTR)
    ;
}

int coord__unary(coord_t *c, const coord__method_t *m, const ProtobufCMessage *req, int timeout_ms,
                 ProtobufCMessage **resp) {
  if (coord__on_event_thread(c))
    return coord__err(COORD_EINVAL, "blocking libcoord call from a callback (event thread)");
  int rc = 0;
  unary_t *u = unary_new(c, m, req, timeout_ms, thread_cq(), &rc);
  if (!u)
    return rc;
  ProtobufCMessage *answer = NULL;
  for (;;) {
    if ((rc = attempt_start(c, u)))
      break;
    /* the call's deadline bounds this wait; coord_close cancels it */
    grpc_event ev = grpc_completion_queue_pluck(u->cq, &u->tag, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
    assert(ev.type == GRPC_OP_COMPLETE && ev.tag == &u->tag);
    int64_t delay = 0;
    int d = unary_decide(u, ev.success, &answer, &rc, &delay);
    if (d == D_OK) {
      rc = 0;
      break;
    }
    if (d == D_FAIL)
      break;
    if (d == D_REAUTH) {
      if ((rc = authenticate(c)))
        break;
      continue;
    }
    sleep_ms(delay);
  }
  grpc_slice_unref(u->payload);
  unary_unlink(u);
  free(u);
  if (rc == 0)
    *resp = answer;
  return rc;
}

/* ---------------------------------------------------------------- auth */

typedef struct reauth {
  void (*done)(coord_t *c, int status, void *arg);
  void *arg;
} reauth_t;

static void reauth_cb(coord_t *c, int status, ProtobufCMessage *resp, void *arg) {
  reauth_t *r = arg;
  if (status == 0) {
    Etcdserverpb__AuthenticateResponse *a = (Etcdserverpb__AuthenticateResponse *)resp;
    char *tok = coord__strdup(a->token);
    pthread_mutex_lock(&c->mu);
    free(c->token);
    c->token = tok;
    pthread_mutex_unlock(&c->mu);
  }
  r->done(c, status, r->arg);
  free(r);
}

void coord__reauth_async(coord_t *c, void (*done)(coord_t *c, int status, void *arg), void *arg) {
  reauth_t *r = malloc(sizeof *r);
  if (!r) {
    done(c, COORD_ENOMEM, arg);
    return;
  }
  r->done = done;
  r->arg = arg;
  pthread_mutex_lock(&c->mu);
  free(c->token); /* the Authenticate call itself must go without it */
  c->token = NULL;
  pthread_mutex_unlock(&c->mu);
  Etcdserverpb__AuthenticateRequest req = ETCDSERVERPB__AUTHENTICATE_REQUEST__INIT;
  req.name = (char *)c->cfg.username;
  req.password = (char *)(c->cfg.password ? c->cfg.password : "");
  if (coord__unary_async(c, &coord__m_auth, &req.base, 0, reauth_cb, r)) {
    free(r);
    done(c, COORD_ECLOSED, arg);
  }
}

static int authenticate(coord_t *c) {
  pthread_mutex_lock(&c->mu);
  free(c->token); /* the Authenticate call itself must go without it */
  c->token = NULL;
  pthread_mutex_unlock(&c->mu);
  Etcdserverpb__AuthenticateRequest req = ETCDSERVERPB__AUTHENTICATE_REQUEST__INIT;
  req.name = (char *)c->cfg.username;
  req.password = (char *)(c->cfg.password ? c->cfg.password : "");
  ProtobufCMessage *resp = NULL;
  int rc = coord__unary(c, &coord__m_auth, &req.base, c->cfg.dial_timeout_ms, &resp);
  if (rc) {
    if (rc == COORD_EAUTH || rc == COORD_EINVAL)
      return coord__err(COORD_EAUTH, "authentication as '%s' failed: %s", c->cfg.username,
                        coord_last_error());
    return rc;
  }
  char *tok = coord__strdup(((Etcdserverpb__AuthenticateResponse *)resp)->token);
  protobuf_c_message_free_unpacked(resp, NULL);
  pthread_mutex_lock(&c->mu);
  free(c->token);
  c->token = tok;
  pthread_mutex_unlock(&c->mu);
  return tok ? 0 : COORD_ENOMEM;
}

/* ---------------------------------------------------------------- status */

int coord_status(coord_t *c, int timeout_ms, coord_status_t *out) {
  if (!c || !out)
    return coord__err(COORD_EINVAL, "coord_status: NULL argument");
  Etcdserverpb__StatusRequest req = ETCDSERVERPB__STATUS_REQUEST__INIT;
  ProtobufCMessage *resp = NULL;
  memset(out, 0, sizeof *out);
  int ep = coord__endpoint_current(c);
  snprintf(out->endpoint, sizeof out->endpoint, "%s", c->ep[ep]);
  int rc = coord__unary(c, &coord__m_status, &req.base, timeout_ms, &resp);
  if (rc)
    return rc;
  Etcdserverpb__StatusResponse *s = (Etcdserverpb__StatusResponse *)resp;
  if (s->header) {
    out->cluster_id = s->header->cluster_id;
    out->member_id = s->header->member_id;
    out->revision = s->header->revision;
    out->raft_term = s->header->raft_term;
  }
  out->leader = s->leader;
  snprintf(out->version, sizeof out->version, "%s", s->version ? s->version : "");
  out->connected = 1;
  snprintf(out->endpoint, sizeof out->endpoint, "%s", c->ep[coord__endpoint_current(c)]);
  protobuf_c_message_free_unpacked(resp, NULL);
  return 0;
}

/* ---------------------------------------------------------------- new/close */

/* Subsystems that are not linked in (or have nothing to close) fall back to
 * these; each subsystem's own file defines the real one. */
__attribute__((weak)) void coord__registry_close(coord_t *c) {
  COORD_UNUSED(c);
}
__attribute__((weak)) void coord__locks_close(coord_t *c) {
  COORD_UNUSED(c);
}
__attribute__((weak)) void coord__resolver_close(coord_t *c) {
  COORD_UNUSED(c);
}

static int copy_cfg(coord_t *c, const coord_config_t *cfg) {
  c->cfg = *cfg;
  const char **fields[] = {&c->cfg.endpoints, &c->cfg.username, &c->cfg.password, &c->cfg.ca_file,
                           &c->cfg.cert_file, &c->cfg.key_file, &c->cfg.prefix};
  for (size_t i = 0; i < sizeof fields / sizeof fields[0]; i++) {
    if (!*fields[i])
      continue;
    c->own[i] = coord__strdup(*fields[i]);
    if (!c->own[i])
      return COORD_ENOMEM;
    *fields[i] = c->own[i];
  }
  if (!c->cfg.prefix)
    c->cfg.prefix = "";
  c->ns_len = strlen(c->cfg.prefix);
  if (c->cfg.timeout_ms == 0)
    c->cfg.timeout_ms = 5000;
  if (c->cfg.dial_timeout_ms == 0)
    c->cfg.dial_timeout_ms = c->cfg.timeout_ms;
  if (c->cfg.retry.max_attempts == 0)
    c->cfg.retry = coord_default_config().retry;
  return 0;
}

static void free_client(coord_t *c) {
  for (size_t i = 0; i < c->nep; i++) {
    if (c->ch && c->ch[i])
      grpc_channel_destroy(c->ch[i]);
    free(c->ep[i]);
  }
  free(c->ch);
  free(c->ep);
  if (c->creds)
    grpc_channel_credentials_release(c->creds);
  if (c->token) {
    memset(c->token, 0, strlen(c->token));
    free(c->token);
  }
  for (size_t i = 0; i < sizeof c->own / sizeof c->own[0]; i++) {
    if (c->own[i] && i == 2)
      memset(c->own[i], 0, strlen(c->own[i])); /* password */
    free(c->own[i]);
  }
  while (c->timers) {
    timer_t_ *t = c->timers;
    c->timers = t->next;
    free(t);
  }
  pthread_mutex_destroy(&c->mu);
  pthread_mutex_destroy(&c->slot_mu);
  pthread_cond_destroy(&c->cv);
  free(c);
}

static void stop_event_thread(coord_t *c) {
  pthread_mutex_lock(&c->mu);
  c->stopping = 1;
  for (unary_t *u = c->calls; u; u = u->next)
    if (u->call)
      grpc_call_cancel(u->call, NULL);
  pthread_mutex_unlock(&c->mu);
  /* Calls waiting for a retry timer end at their next attempt (stopping). */
  pthread_mutex_lock(&c->mu);
  while (c->ncalls > 0) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_nsec += 50 * 1000000;
    if (ts.tv_nsec >= 1000000000)
      ts.tv_sec++, ts.tv_nsec -= 1000000000;
    pthread_cond_timedwait(&c->cv, &c->mu, &ts);
    for (unary_t *u = c->calls; u; u = u->next)
      if (u->call)
        grpc_call_cancel(u->call, NULL);
  }
  pthread_mutex_unlock(&c->mu);
  grpc_completion_queue_shutdown(c->cq);
  pthread_join(c->thread, NULL);
  grpc_completion_queue_destroy(c->cq);
  c->cq = NULL;
}

int coord_new(const coord_config_t *cfg_in, coord_t **out) {
  if (!out)
    return coord__err(COORD_EINVAL, "coord_new: out is NULL");
  *out = NULL;
  coord_config_t cfg = cfg_in ? *cfg_in : coord_default_config();
  int rc = config_check(&cfg);
  if (rc)
    return rc;
  if (!cfg.endpoints || !*cfg.endpoints) {
    const char *env = getenv("COORD_ENDPOINTS");
    cfg.endpoints = env && *env ? env : "localhost:2379";
  }
  coord_t *c = coord__xmalloc(sizeof *c);
  if (!c)
    return coord__err(COORD_ENOMEM, "out of memory");
  pthread_mutex_init(&c->mu, NULL);
  pthread_mutex_init(&c->slot_mu, NULL);
  pthread_cond_init(&c->cv, NULL);
  c->seed = (unsigned int)coord__now_ms() ^ (unsigned int)(uintptr_t)c;
  int tls = 0;
  if ((rc = copy_cfg(c, &cfg)) || (rc = parse_endpoints(c, c->cfg.endpoints, &tls))) {
    free_client(c);
    return rc;
  }
  grpc_init();
  if ((rc = make_credentials(c, tls))) {
    free_client(c);
    grpc_shutdown();
    return rc;
  }
  c->ch = calloc(c->nep, sizeof *c->ch);
  for (size_t i = 0; c->ch && i < c->nep; i++)
    c->ch[i] = make_channel(c, c->ep[i]);
  c->cq = grpc_completion_queue_create_for_next(NULL);
  if (!c->ch || pthread_create(&c->thread, NULL, event_main, c)) {
    if (c->cq)
      grpc_completion_queue_destroy(c->cq);
    free_client(c);
    grpc_shutdown();
    return coord__err(COORD_ENOMEM, "cannot start the event thread");
  }
  /* Check that etcd answers (and who we are) before handing the client out. */
  if (c->cfg.username)
    rc = authenticate(c);
  if (!rc) {
    Etcdserverpb__StatusRequest req = ETCDSERVERPB__STATUS_REQUEST__INIT;
    ProtobufCMessage *resp = NULL;
    rc = coord__unary(c, &coord__m_status, &req.base, c->cfg.dial_timeout_ms, &resp);
    if (rc == COORD_EUNAVAILABLE || rc == COORD_ETIMEDOUT)
      rc = coord__err(rc, "no etcd endpoint answered at %s within %d ms: %s", c->cfg.endpoints,
                      c->cfg.dial_timeout_ms, coord_last_error());
    if (resp)
      protobuf_c_message_free_unpacked(resp, NULL);
  }
  if (rc) {
    char detail[512];
    snprintf(detail, sizeof detail, "%s", coord_last_error());
    stop_event_thread(c);
    free_client(c);
    grpc_shutdown();
    return coord__err(rc, "%s", detail);
  }
  *out = c;
  return 0;
}

void coord_close(coord_t *c) {
  if (!c)
    return;
  assert(!coord__on_event_thread(c));
  pthread_mutex_lock(&c->mu);
  c->closing = 1;
  pthread_mutex_unlock(&c->mu);
  coord__registry_close(c);
  coord__locks_close(c);
  coord__resolver_close(c);
  coord__watches_close(c);
  coord__leases_close(c);
  stop_event_thread(c);
  free_client(c);
  grpc_shutdown();
}
