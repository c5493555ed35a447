/*
 * lease.c — etcd leases: grant, revoke, time-to-live, and the client's one
 * LeaseKeepAlive stream that renews every lease this client keeps alive.
 *
 * Renewal: each kept lease is renewed at a third of its TTL.  The answer's
 * TTL, counted from when the request was sent, gives the local expiry: if
 * no answer renews a lease before that instant (etcd unreachable), or etcd
 * answers TTL <= 0 (revoked, expired), the lease is lost: it leaves the
 * kept set and its lost callback runs once.  Being conservative here is
 * what lets a lock holder never believe it holds a lock etcd let go.
 *
 * A tick timer (every TICK_MS on the event thread) sends due renewals,
 * detects local expiry and reopens the stream (on the next endpoint) after
 * a failure.  ls->mu guards the kept list, the stream pointer, the flags
 * and `calling`; callbacks (lost) are called without it.  A lease leaves
 * the kept set and enters `calling` in one hold of ls->mu, and
 * coord_lease_keepalive_stop / coord_lease_revoke wait while their lease is
 * in `calling`: after they return, its lost callback is not running and
 * never will.  Internal callers that hold a lock their lost callback takes
 * use coord__lease_keepalive_forget, which does not wait.
 *
 * coord_lease_deadline reads a kept lease's local expiry under ls->mu: it
 * never blocks on etcd, so a caller may ask it as often as it likes, from
 * any thread (the lock pool asks it holding pool->mu: pool->mu comes before
 * ls->mu, and lease.c never takes pool->mu while holding ls->mu).
 */
#include "internal.h"
#include "stream.h"

#include <assert.h>
#include <stdlib.h>
#include <string.h>

#define TICK_MS 100

typedef struct kept {
  int64_t id;
  int64_t ttl_ms;     /* granted TTL, from the last answer (0: unknown yet) */
  int64_t next_renew; /* monotonic ms */
  int64_t expires;    /* local expiry; INT64_MAX until the first answer */
  int64_t sent_at;    /* 0: no renewal outstanding */
  coord_lease_lost_cb lost;
  void *arg;
  struct kept *next;
} kept_t;

typedef struct lost_call {
  coord_lease_lost_cb fn;
  void *arg;
  int64_t id;
} lost_call_t;

typedef struct leases {
  coord_t *c;
  pthread_mutex_t mu;
  pthread_cond_t cv;
  kept_t *kept;
  const lost_call_t *calling; /* the lost callbacks the event thread is */
  size_t ncalling;            /* calling now, off ls->mu (else NULL, 0) */
  coord__stream_t *stream;
  int failures;
  int64_t reconnect_at;
  int ticking; /* the tick timer is scheduled */
  int closed;
} leases_t;

static void tick(coord_t *c, void *arg);

static void *leases_new(coord_t *c) {
  leases_t *ls = calloc(1, sizeof *ls);
  if (!ls)
    return NULL;
  ls->c = c;
  pthread_mutex_init(&ls->mu, NULL);
  pthread_cond_init(&ls->cv, NULL);
  return ls;
}

static leases_t *leases(coord_t *c) {
  return coord__slot(c, COORD__SLOT_LEASE, leases_new);
}

/* ---------------------------------------------------------------- unary */

int coord_lease_grant(coord_t *c, int64_t ttl_ms, int64_t *id) {
  if (!c || !id)
    return coord__err(COORD_EINVAL, "coord_lease_grant: NULL argument");
  if (ttl_ms <= 0)
    return coord__err(COORD_EINVAL, "coord_lease_grant: ttl_ms must be > 0 (got %lld)", (long long)ttl_ms);
  Etcdserverpb__LeaseGrantRequest req = ETCDSERVERPB__LEASE_GRANT_REQUEST__INIT;
  req.ttl = coord__ms_to_ttl_s(ttl_ms);
  ProtobufCMessage *resp = NULL;
  int rc = coord__unary(c, &coord__m_lease_grant, &req.base, 0, &resp);
  if (rc)
    return rc;
  Etcdserverpb__LeaseGrantResponse *g = (Etcdserverpb__LeaseGrantResponse *)resp;
  if (g->error && *g->error)
    rc = coord__err(COORD_EIO, "lease grant: %s", g->error);
  else
    *id = g->id;
  protobuf_c_message_free_unpacked(resp, NULL);
  return rc;
}

static int calling_locked(const leases_t *ls, int64_t id) {
  for (size_t i = 0; i < ls->ncalling; i++)
    if (ls->calling[i].id == id)
      return 1;
  return 0;
}

/* Removes id from the kept set without calling its lost callback.  With
 * wait, off the event thread, it also waits for a lost callback of id that
 * the event thread is running: once the public stop or revoke returns, the
 * callback's arg is the caller's to free.  (On the event thread no lost
 * callback can be running but the caller's own.) */
static void unkeep(coord_t *c, int64_t id, int wait) {
  leases_t *ls = coord__slot_get(c, COORD__SLOT_LEASE);
  if (!ls)
    return;
  wait = wait && !coord__on_event_thread(c);
  pthread_mutex_lock(&ls->mu);
  for (kept_t **pp = &ls->kept; *pp; pp = &(*pp)->next) {
    if ((*pp)->id == id) {
      kept_t *k = *pp;
      *pp = k->next;
      free(k);
      break;
    }
  }
  while (wait && calling_locked(ls, id))
    pthread_cond_wait(&ls->cv, &ls->mu);
  pthread_mutex_unlock(&ls->mu);
}

void coord__lease_keepalive_forget(coord_t *c, int64_t id) {
  unkeep(c, id, 0);
}

int coord_lease_revoke(coord_t *c, int64_t id) {
  if (!c || id <= 0)
    return coord__err(COORD_EINVAL, "coord_lease_revoke: NULL client or bad lease id");
  unkeep(c, id, 1);
  Etcdserverpb__LeaseRevokeRequest req = ETCDSERVERPB__LEASE_REVOKE_REQUEST__INIT;
  req.id = id;
  ProtobufCMessage *resp = NULL;
  int rc = coord__unary(c, &coord__m_lease_revoke, &req.base, 0, &resp);
  if (resp)
    protobuf_c_message_free_unpacked(resp, NULL);
  return rc;
}

int coord_lease_ttl(coord_t *c, int64_t id, int64_t *remaining_ms, int64_t *granted_ms) {
  if (!c || id <= 0)
    return coord__err(COORD_EINVAL, "coord_lease_ttl: NULL client or bad lease id");
  Etcdserverpb__LeaseTimeToLiveRequest req = ETCDSERVERPB__LEASE_TIME_TO_LIVE_REQUEST__INIT;
  req.id = id;
  ProtobufCMessage *resp = NULL;
  int rc = coord__unary(c, &coord__m_lease_ttl, &req.base, 0, &resp);
  if (rc)
    return rc;
  Etcdserverpb__LeaseTimeToLiveResponse *t = (Etcdserverpb__LeaseTimeToLiveResponse *)resp;
  if (t->ttl < 0) {
    rc = coord__err(COORD_ENOTFOUND, "lease %llx not found (expired or revoked)", (unsigned long long)id);
  } else {
    if (remaining_ms)
      *remaining_ms = t->ttl * 1000;
    if (granted_ms)
      *granted_ms = t->grantedttl * 1000;
  }
  protobuf_c_message_free_unpacked(resp, NULL);
  return rc;
}

/* ---------------------------------------------------------------- stream */

/* Under ls->mu, in the same hold that took the leases off the kept set:
 * v is what unkeep waits on until call_lost is over. */
static void calling_publish_locked(leases_t *ls, const lost_call_t *v, size_t n) {
  assert(ls->calling == NULL); /* lost callbacks run on the event thread only */
  ls->calling = v;
  ls->ncalling = n;
}

/* Runs the lost callbacks published as ls->calling (event thread, ls->mu
 * not held), then withdraws them. */
static void call_lost(leases_t *ls, const lost_call_t *v, size_t n) {
  for (size_t i = 0; i < n; i++)
    if (v[i].fn)
      v[i].fn(v[i].id, v[i].arg);
  pthread_mutex_lock(&ls->mu);
  ls->calling = NULL;
  ls->ncalling = 0;
  pthread_cond_broadcast(&ls->cv);
  pthread_mutex_unlock(&ls->mu);
}

static void ka_message(coord__stream_t *s, ProtobufCMessage *msg, void *arg) {
  leases_t *ls = arg;
  Etcdserverpb__LeaseKeepAliveResponse *r = (Etcdserverpb__LeaseKeepAliveResponse *)msg;
  COORD_UNUSED(s);
  lost_call_t lost = {0};
  int64_t now = coord__now_ms();
  pthread_mutex_lock(&ls->mu);
  ls->failures = 0;
  for (kept_t **pp = &ls->kept; *pp; pp = &(*pp)->next) {
    kept_t *k = *pp;
    if (k->id != r->id)
      continue;
    if (r->ttl <= 0) {
      lost = (lost_call_t){k->lost, k->arg, k->id};
      *pp = k->next;
      free(k);
    } else {
      /* Counted from the send time of the request answered (one at a
       * time per lease): etcd renewed the lease later than that.  An
       * answer while none is out (the lease was kept again while an old
       * renewal was out) moves no expiry: its send time is unknown. */
      k->ttl_ms = r->ttl * 1000;
      if (k->sent_at)
        k->expires = k->sent_at + k->ttl_ms;
      k->next_renew = now + k->ttl_ms / 3;
      k->sent_at = 0;
    }
    break;
  }
  if (lost.id)
    calling_publish_locked(ls, &lost, 1);
  pthread_mutex_unlock(&ls->mu);
  if (lost.id)
    coord__err(COORD_ELOST, "lease %llx expired or revoked", (unsigned long long)lost.id),
        call_lost(ls, &lost, 1);
}

static void ka_end(coord__stream_t *s, int status, void *arg) {
  leases_t *ls = arg;
  coord_t *c = ls->c;
  COORD_UNUSED(status);
  int ep = coord__stream_endpoint(s);
  pthread_mutex_lock(&ls->mu);
  ls->stream = NULL;
  for (kept_t *k = ls->kept; k; k = k->next)
    k->sent_at = 0, k->next_renew = 0; /* resend on the next stream */
  int closed = ls->closed;
  if (!closed) {
    ls->failures++;
    ls->reconnect_at = coord__now_ms() + coord__backoff_ms(c, ls->failures);
  }
  pthread_cond_broadcast(&ls->cv);
  pthread_mutex_unlock(&ls->mu);
  if (!closed)
    coord__endpoint_failed(c, ep);
}

static const coord__stream_ops_t ka_ops = {"LeaseKeepAlive", ka_message, ka_end};

/* Called with ls->mu held. */
static void send_due_locked(leases_t *ls, int64_t now) {
  for (kept_t *k = ls->kept; k && ls->stream; k = k->next) {
    if (k->sent_at || now < k->next_renew)
      continue;
    Etcdserverpb__LeaseKeepAliveRequest req = ETCDSERVERPB__LEASE_KEEP_ALIVE_REQUEST__INIT;
    req.id = k->id;
    if (coord__stream_send(ls->stream, &req.base) == 0)
      k->sent_at = now;
  }
}

static void tick(coord_t *c, void *arg) {
  leases_t *ls = arg;
  int64_t now = coord__now_ms();
  lost_call_t *lost = NULL;
  size_t nlost = 0, cap = 0;
  pthread_mutex_lock(&ls->mu);
  if (ls->closed || !ls->kept) {
    ls->ticking = 0;
    pthread_cond_broadcast(&ls->cv);
    pthread_mutex_unlock(&ls->mu);
    return;
  }
  /* local expiry: no renewal answered in time */
  for (kept_t **pp = &ls->kept; *pp;) {
    kept_t *k = *pp;
    if (now < k->expires) {
      pp = &k->next;
      continue;
    }
    if (nlost == cap) {
      cap = cap ? cap * 2 : 4;
      lost_call_t *nl = realloc(lost, cap * sizeof *lost);
      if (!nl)
        break;
      lost = nl;
    }
    lost[nlost++] = (lost_call_t){k->lost, k->arg, k->id};
    *pp = k->next;
    free(k);
  }
  if (!ls->stream && ls->kept && now >= ls->reconnect_at)
    ls->stream = coord__stream_open(c, coord__endpoint_current(c), "/etcdserverpb.Lease/LeaseKeepAlive",
                                    &etcdserverpb__lease_keep_alive_response__descriptor, 0, &ka_ops, ls);
  send_due_locked(ls, now);
  if (nlost)
    calling_publish_locked(ls, lost, nlost);
  pthread_mutex_unlock(&ls->mu);
  if (nlost) {
    coord__err(COORD_ELOST, "lease not renewed before its TTL ran out");
    call_lost(ls, lost, nlost);
  }
  free(lost);
  coord__after(c, TICK_MS, tick, ls);
}

int coord_lease_keepalive(coord_t *c, int64_t id, coord_lease_lost_cb lost, void *arg) {
  return coord__lease_keepalive_until(c, id, INT64_MAX, lost, arg);
}

int coord__lease_keepalive_until(coord_t *c, int64_t id, int64_t expires, coord_lease_lost_cb lost,
                                 void *arg) {
  if (!c || id <= 0)
    return coord__err(COORD_EINVAL, "coord_lease_keepalive: NULL client or bad lease id");
  leases_t *ls = leases(c);
  if (!ls)
    return coord__err(COORD_ENOMEM, "out of memory");
  kept_t *k = calloc(1, sizeof *k);
  if (!k)
    return coord__err(COORD_ENOMEM, "out of memory");
  k->id = id;
  k->expires = expires;
  k->lost = lost;
  k->arg = arg;
  pthread_mutex_lock(&ls->mu);
  if (ls->closed) {
    pthread_mutex_unlock(&ls->mu);
    free(k);
    return coord__err(COORD_ECLOSED, "client closing");
  }
  for (kept_t *o = ls->kept; o; o = o->next) {
    if (o->id == id) {
      pthread_mutex_unlock(&ls->mu);
      free(k);
      return coord__err(COORD_EEXIST, "lease %llx is already kept alive", (unsigned long long)id);
    }
  }
  k->next = ls->kept;
  ls->kept = k;
  int start = !ls->ticking;
  ls->ticking = 1;
  pthread_mutex_unlock(&ls->mu);
  if (start)
    coord__after(c, 0, tick, ls);
  return 0;
}

int coord_lease_keepalive_stop(coord_t *c, int64_t id) {
  if (!c || id <= 0)
    return coord__err(COORD_EINVAL, "coord_lease_keepalive_stop: bad argument");
  unkeep(c, id, 1);
  return 0;
}

int coord_lease_deadline(coord_t *c, int64_t id, int64_t *ms_left, int64_t *ttl_ms) {
  static const char fn[] = "coord_lease_deadline";
  if (ms_left)
    *ms_left = 0;
  if (ttl_ms)
    *ttl_ms = 0;
  if (!c || id <= 0 || !ms_left)
    return coord__err(COORD_EINVAL, "%s: NULL argument or bad lease id", fn);
  leases_t *ls = coord__slot_get(c, COORD__SLOT_LEASE);
  if (!ls)
    return coord__err(COORD_ENOTFOUND, "%s: lease %llx is not kept alive by this client", fn,
                      (unsigned long long)id);
  int64_t now = coord__now_ms();
  int rc = 0;
  pthread_mutex_lock(&ls->mu);
  kept_t *k = ls->kept;
  while (k && k->id != id)
    k = k->next;
  if (!k) {
    rc = coord__err(COORD_ENOTFOUND,
                    "%s: lease %llx is not kept alive by this client (never, stopped or lost)", fn,
                    (unsigned long long)id);
  } else if (k->expires == INT64_MAX) {
    rc = coord__err(COORD_EUNAVAILABLE, "%s: no renewal of lease %llx answered yet", fn,
                    (unsigned long long)id);
  } else {
    *ms_left = k->expires - now;
    if (ttl_ms)
      *ttl_ms = k->ttl_ms;
  }
  pthread_mutex_unlock(&ls->mu);
  return rc;
}

/* ---------------------------------------------------------------- close */

typedef struct revoke_all {
  pthread_mutex_t mu;
  pthread_cond_t cv;
  size_t pending;
} revoke_all_t;

static void revoked(coord_t *c, int status, ProtobufCMessage *resp, void *arg) {
  revoke_all_t *r = arg;
  COORD_UNUSED(c), COORD_UNUSED(status), COORD_UNUSED(resp);
  pthread_mutex_lock(&r->mu);
  r->pending--;
  pthread_cond_signal(&r->cv);
  pthread_mutex_unlock(&r->mu);
}

void coord__leases_close(coord_t *c) {
  leases_t *ls = coord__slot_get(c, COORD__SLOT_LEASE);
  if (!ls)
    return;
  pthread_mutex_lock(&ls->mu);
  ls->closed = 1;
  kept_t *list = ls->kept;
  ls->kept = NULL;
  if (ls->stream)
    coord__stream_cancel(ls->stream);
  pthread_mutex_unlock(&ls->mu);
  /* Revoke every kept lease at once, in parallel, so that locks and
   * registrations of this client are released now, not after their TTL. */
  revoke_all_t r = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0};
  while (list) {
    kept_t *k = list;
    list = k->next;
    Etcdserverpb__LeaseRevokeRequest req = ETCDSERVERPB__LEASE_REVOKE_REQUEST__INIT;
    req.id = k->id;
    pthread_mutex_lock(&r.mu);
    r.pending++;
    pthread_mutex_unlock(&r.mu);
    if (coord__unary_async(c, &coord__m_lease_revoke, &req.base, 2000, revoked, &r)) {
      pthread_mutex_lock(&r.mu);
      r.pending--;
      pthread_mutex_unlock(&r.mu);
    }
    free(k);
  }
  pthread_mutex_lock(&r.mu);
  while (r.pending)
    pthread_cond_wait(&r.cv, &r.mu);
  pthread_mutex_unlock(&r.mu);
  pthread_mutex_lock(&ls->mu);
  while (ls->stream || ls->ticking)
    pthread_cond_wait(&ls->cv, &ls->mu);
  pthread_mutex_unlock(&ls->mu);
  pthread_mutex_destroy(&ls->mu);
  pthread_cond_destroy(&ls->cv);
  free(ls);
}
