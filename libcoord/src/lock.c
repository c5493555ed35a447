/*
 * lock.c — distributed locks: etcd's concurrency.Mutex in C, asynchronous on
 * the client's event thread, with a pool of pre-granted leases, fencing
 * tokens and guarded writes (coord_config_set_guarded).
 *
 * ALGORITHM AND KEYS (DESIGN.md "Key layout"; identical to Go's
 * concurrency.Mutex, so `etcdctl lock /locks/<name>` and Go programs
 * interoperate):
 *   prefix  = "/locks/<name>/"           (namespace prefix added by the core)
 *   my key  = prefix + "<lease id in lower-case hex>", value = holder note
 *   1. queueing Txn: if create_revision(my key) == 0
 *        then Put(my key, "", lease) + Range(prefix, sort create ascend, limit 1)
 *        else Range(my key)          + Range(prefix, sort create ascend, limit 1)
 *      token = my key's create revision (the Txn revision when the Put ran).
 *   2. held if the first key under the prefix has my create revision.
 *   3. otherwise CHECK: a read-only Txn
 *        if create_revision(my key) == token
 *        then Range(prefix, max_create_revision = token - 1,
 *                   sort create descend, limit 1)
 *      (the compare makes a deleted own key visible at once).  No key below
 *      mine: held.  Else wait until that predecessor key is deleted at a
 *      revision above the CHECK's, and CHECK again.
 *   coord_range_opts_t / coord_op_t have no max_create_revision and no
 *   compare range_end, so the request is built with coord__txn_build and
 *   patched here before coord__unary_async serializes it.
 *   try_acquire writes nothing when the lock is taken: its Txn compares
 *   version(every key under the prefix) == 0 (a Compare with range_end) and
 *   only then Puts; so COORD_ELOCKED leaves no key and costs no write.
 *   Deletes are learnt from ONE watch per (client, lock name) on the prefix
 *   (see "name watches" below for why not one watch per waiter as in Go),
 *   which every handle follows from its queueing Txn on: a DELETE of the
 *   predecessor wakes a waiter; a DELETE of a handle's own key (above its
 *   token) means the lock, or the place in the queue, is lost.  The lease's
 *   lost callback (lease.c) means the same.
 *
 * LEASES AND TTL: the caller's ttl_ms maps to etcd seconds rounded up
 * (coord__ms_to_ttl_s: 1 ms -> 1 s, 1500 ms -> 2 s); 0 means
 * COORD_LOCK_DEFAULT_TTL_MS (10 s); a negative TTL is COORD_EINVAL.  etcd may
 * raise a tiny TTL to its minimum.  Every handle uses a lease of its own,
 * taken from a per-client pool of pre-granted leases per TTL (in seconds),
 * kept alive by coord_lease_keepalive on the one KeepAlive stream.  A lease
 * goes back to the pool only when its key is known to be gone (the release
 * Delete succeeded, or no key was ever written); when in doubt (a write
 * timed out, the key was deleted by someone else, which may mean the lease
 * was revoked) it is revoked instead.  The pool is refilled asynchronously
 * (POOL_SPARE free leases per TTL once a TTL has been used, at most POOL_MAX
 * kept), so an uncontended acquire + unlock costs exactly two writes: the
 * queueing Txn and the Delete.  A pooled lease can die unnoticed (revoked,
 * or expired while the client was cut off); the queueing Txn then fails
 * with "lease not found" (COORD_ENOTFOUND) having written nothing, and is
 * retried once with a freshly granted lease after the class's other free
 * leases are revoked.
 *
 * STATE MACHINE of a handle (h->state):
 *
 *   LK_LEASE --grant--> LK_TXN --lowest--> LK_HELD --key/lease gone--> LK_LOST
 *   (pool lease: start     |                  ^
 *    directly in LK_TXN)   +--not lowest--> LK_CHECK <--pred deleted-- LK_WAIT
 *                                             |  +--pred found------->  ^
 *                                             +--none below--> LK_HELD
 *   any pending state (LEASE, TXN, CHECK, WAIT) --error/cancel/lost--> LK_FAILED
 *   LK_HELD --coord_lock_unlock--> LK_RELEASED
 *
 *   At most one "main" call (grant, queueing Txn, CHECK) is in flight
 *   (h->busy).  Events that arrive while it is (cancel, lease lost, key
 *   deleted) only set flags (h->cancel, h->lease_dead, h->key_gone); the
 *   call's completion acts on them.  In LK_WAIT nothing is in flight, so such
 *   an event acts at once.
 *   Failure path: fail() moves to LK_FAILED, leaves the name watch and
 *   disposes of key and lease (dispose()): no key -> lease back to the pool;
 *   key exists -> async Delete (h->cleaning), then lease back to the pool;
 *   outcome of a write unknown, key deleted by someone else, or lease
 *   reported dead -> revoke the lease (best effort).  The acquire outcome
 *   (callback or wakeup of the blocking form) is delivered only after the
 *   Delete finished, so a cancelled or timed-out waiter has no key left
 *   once it is told.  coord_lock_state() of a failed handle is the failure
 *   code (COORD_ECANCELED, COORD_ETIMEDOUT, ...).
 *   A waiter whose lease is lost (or whose key is deleted) fails with
 *   COORD_ELOST: it lost its place in the queue (as Go's Mutex does when
 *   its session ends); it does not queue again by itself.
 *
 * THREADS, LOCKS, OWNERSHIP:
 *   - One mutex per client (pool->mu) guards the pool and every field of
 *     every handle of that client; one condvar (pool->cond, CLOCK_MONOTONIC)
 *     is broadcast whenever an outcome is delivered or a call completes.
 *   - Lock order: pool->mu before any lock of the core (it is fine to start
 *     core calls under pool->mu; the core never runs a callback under its own
 *     locks).  User callbacks and coord__watch_remove are NEVER called with
 *     pool->mu held: transitions collect them in a post_t that post_run()
 *     executes after the mutex is released.
 *   - coord_lock_deadline never blocks: it reads the local lease expiry
 *     (lease.c, ls->mu) holding pool->mu, from any thread, callbacks too.
 *   - Every completion, watch event, timer and lease-lost callback runs on
 *     the event thread and never blocks.  Blocking functions
 *     (coord_lock_acquire, _try_acquire, _ttl, _set_note, guarded writes)
 *     refuse to run on the event thread (COORD_EINVAL); coord_lock_unlock and
 *     coord_lock_cancel may be called from anywhere, including from inside
 *     the handle's own callbacks (then unlock does not wait).  A caller of
 *     coord_lock_unlock must not hold a lock that its own acquire or lost
 *     callback takes: unlock waits for a callback that is running.
 *   - Handle lifetime is reference counted (h->refs): one reference for the
 *     user (dropped by coord_lock_unlock), one per call or timer in flight
 *     (h->ops counts those), one temporary reference while post_run works on
 *     the handle.  The handle is freed when refs reaches 0, always detached
 *     from its name watch before (asserted).  Name watches belong to the
 *     pool: callbacks find their handles on pool->locks under the mutex;
 *     a name watch is freed only by the janitor timer (event thread, so no
 *     callback of it runs) or by close after coord__watch_remove returned.
 *   - The acquire callback runs exactly once, on the event thread, unless
 *     coord_lock_unlock was called first (then never); h->calling counts
 *     user callbacks running so that unlock from another thread waits for
 *     them ("its callback is not called after this returns").
 *   - Blocking unlock (off the event thread) waits until no call of the
 *     handle is in flight, so the key is gone when it returns; it returns
 *     COORD_ELOST if the lock had been lost (or the Delete found no key), the
 *     Delete's error if the Delete failed (the lease is then revoked), else 0.
 *     From the event thread it returns at once with the local view.
 *   - coord__locks_close (from coord_close, event thread still running)
 *     cancels every pending acquire (callbacks get COORD_ECLOSED), releases
 *     every held lock, waits for every call in flight, revokes the pool's
 *     leases, removes the name watches, waits for the event thread to pass a
 *     barrier (so no lease-lost callback still runs), then frees the pool AND
 *     every handle the user did not unlock: handles must not be used after
 *     coord_close.  If some call never completes (CLOSE_WAIT_MS), it leaks
 *     instead of freeing what a late callback would touch.
 */
#include "internal.h"

#include <assert.h>
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define LOCKS_ROOT "/locks/"
#define POOL_SPARE 1 /* free leases kept ready per TTL once that TTL is used */
#define POOL_MAX 4   /* free leases kept at most per TTL; more are revoked */
/* Used when a blocking call asks for the client's default (timeout 0): the
 * core does not expose its configured default to subsystems. */
#define LOCK_DEFAULT_TIMEOUT_MS 5000
/* How long coord__locks_close waits for calls in flight before giving up
 * (and leaking rather than freeing memory a late callback could touch). */
#define CLOSE_WAIT_MS 30000
/* Revokes are best effort (an unrevoked lease expires by its TTL): short
 * deadline, so that close does not hang while etcd is unreachable. */
#define REVOKE_TIMEOUT_MS 2000

typedef enum {
  LK_LEASE, /* waiting for a lease grant */
  LK_TXN,   /* queueing Txn in flight */
  LK_CHECK, /* CHECK Txn in flight */
  LK_WAIT,  /* watching the predecessor */
  LK_HELD,
  LK_LOST,     /* was held; lease or key gone */
  LK_FAILED,   /* acquire ended without the lock (h->status says why) */
  LK_RELEASED, /* unlocked (or released by close) after being held */
} lk_state_t;

static int is_pending(lk_state_t s) {
  return s == LK_LEASE || s == LK_TXN || s == LK_CHECK || s == LK_WAIT;
}

typedef struct lease_class {
  struct coord_lock_pool *pool;
  int64_t ttl_s;
  int64_t free_ids[POOL_MAX];
  int nfree;
  int refilling;       /* grants in flight for this class */
  int64_t refill_sent; /* when the oldest of them was asked for (monotonic ms) */
  struct lease_class *next;
} lease_class_t;

struct coord_lock_pool {
  coord_t *c;
  pthread_mutex_t mu;
  pthread_cond_t cond;
  lease_class_t *classes;
  coord_lock_t *locks; /* every live handle (doubly linked) */
  int ops;             /* pool-level calls and timers in flight */
  struct name_watch *nws;
  int janitor; /* the sweep timer of idle name watches is armed */
  int closing;
  int barrier_done;
};

struct coord_lock_s {
  coord_t *c;
  struct coord_lock_pool *pool;
  coord_lock_t *prev, *next;
  char *name;
  char *prefix;            /* "/locks/<name>/" */
  char *key;               /* prefix + lease hex; NULL until a lease is assigned */
  struct spent_key *spent; /* keys h->key replaced, kept until lock_free */
  lease_class_t *cls;
  int64_t lease;      /* 0 until assigned */
  int64_t grant_sent; /* when the handle's own grant was asked for (monotonic ms) */
  int lease_owned;    /* the handle owns h->lease (not yet handed back) */
  int64_t token;      /* create revision of key; 0 until known */
  lk_state_t state;
  int status; /* LK_FAILED: why */
  char *detail;
  int try_mode;
  int sync; /* blocking form: outcome read by the waiting caller */
  coord_lock_cb cb;
  void *cb_arg;
  coord_lock_lost_cb lost_cb;
  void *lost_arg;
  int cb_pending;    /* acquire outcome not delivered yet */
  int deliver_timer; /* a timer will deliver the outcome */
  int cancel;        /* cancel asked while a call was in flight */
  int cancel_status;
  int lease_dead;   /* etcd reported the lease gone */
  int key_gone;     /* our key was deleted by someone else */
  int lost_pending; /* lost, lost_cb not called yet */
  int user_gone;    /* coord_lock_unlock called */
  int release_rc;
  int retried;     /* queueing Txn retried once with a fresh lease */
  int key_written; /* the queueing Txn put our key (it may still exist) */
  int busy;        /* a main call (grant, Txn, CHECK) in flight */
  int cleaning;    /* a cleanup Delete in flight */
  int calling;     /* user callbacks running now */
  int ops;         /* calls and timers in flight */
  int refs;
  struct name_watch *nw; /* the name's shared watch (from the queueing Txn on) */
  char *pred_key;        /* LK_WAIT: the key just below ours ... */
  int64_t wait_rev;      /* ... which existed at this revision */
};

/* Work collected under the mutex and done after it is released. */
typedef struct post {
  coord_lock_t *h; /* holds a temporary reference when set */
  int call_acq;
  int acq_status;
  int call_lost;
  coord_lock_lost_cb lost_cb;
  void *lost_arg;
} post_t;

static void pool_lease_lost(int64_t id, void *arg);
static void start_txn(coord_lock_t *h, post_t *p);
static void start_check(coord_lock_t *h, post_t *p);
static void fail(coord_lock_t *h, int status, post_t *p);

/* ---------------------------------------------------------------- helpers */

static int check_name(const char *fn, const char *name) {
  if (name == NULL)
    return coord__err(COORD_EINVAL, "%s: lock name is NULL", fn);
  if (name[0] == '\0')
    return coord__err(COORD_EINVAL, "%s: lock name is empty", fn);
  if (strchr(name, '/') != NULL)
    return coord__err(COORD_EINVAL, "%s: lock name \"%s\" contains '/'", fn, name);
  return 0;
}

/* ms TTL -> etcd seconds: 0 is the default (10 s), negative is invalid,
 * anything else rounds up to whole seconds. */
static int ttl_seconds(const char *fn, int64_t ttl_ms, int64_t *out) {
  if (ttl_ms < 0)
    return coord__err(COORD_EINVAL, "%s: negative TTL %" PRId64 " ms", fn, ttl_ms);
  if (ttl_ms == 0)
    ttl_ms = COORD_LOCK_DEFAULT_TTL_MS;
  *out = coord__ms_to_ttl_s(ttl_ms);
  return 0;
}

static void deadline_after(struct timespec *ts, int64_t ms) {
  clock_gettime(CLOCK_MONOTONIC, ts);
  ts->tv_sec += ms / 1000;
  ts->tv_nsec += (ms % 1000) * 1000000L;
  if (ts->tv_nsec >= 1000000000L) {
    ts->tv_sec++;
    ts->tv_nsec -= 1000000000L;
  }
}

/* Under mu: make sure the post holds a reference on h. */
static void post_ref(coord_lock_t *h, post_t *p) {
  if (p->h == NULL) {
    p->h = h;
    h->refs++;
  }
  assert(p->h == h);
}

static void nw_detach(coord_lock_t *h);

/* Under mu: h stops following its name's watch (it left the queue). */
static void detach_watchers(coord_lock_t *h, post_t *p) {
  COORD_UNUSED(p);
  nw_detach(h);
}

static void list_remove(struct coord_lock_pool *pool, coord_lock_t *h) {
  if (h->prev)
    h->prev->next = h->next;
  else if (pool->locks == h)
    pool->locks = h->next;
  if (h->next)
    h->next->prev = h->prev;
  h->prev = h->next = NULL;
}

/* coord_lock_key hands h->key out without a copy, and a retry with a fresh
 * lease replaces it on the event thread; a key a caller may still be
 * reading is therefore kept here until the handle is freed. */
struct spent_key {
  struct spent_key *next;
  char *key;
};

/* Under mu: gives h the key for lease id (h->key NULL and -1 if out of
 * memory).  The key replaced is kept, or leaked if even that fails, never
 * freed under a reader. */
static int key_assign(coord_lock_t *h, int64_t id) {
  if (h->key != NULL) {
    struct spent_key *sk = malloc(sizeof *sk);
    if (sk != NULL) {
      sk->key = h->key;
      sk->next = h->spent;
      h->spent = sk;
    }
  }
  h->key = coord__sprintf("%s%" PRIx64, h->prefix, (uint64_t)id);
  return h->key != NULL ? 0 : -1;
}

static void lock_free(coord_lock_t *h) {
  assert(h->nw == NULL);
  assert(h->ops == 0 && h->calling == 0);
  while (h->spent != NULL) {
    struct spent_key *sk = h->spent;
    h->spent = sk->next;
    free(sk->key);
    free(sk);
  }
  free(h->pred_key);
  free(h->name);
  free(h->prefix);
  free(h->key);
  free(h->detail);
  free(h);
}

/* Under mu: drop a reference; returns 1 if the caller must lock_free(h)
 * after releasing mu (h is already off the list). */
static int unref_locked(coord_lock_t *h) {
  assert(h->refs > 0);
  if (--h->refs > 0)
    return 0;
  list_remove(h->pool, h);
  return 1;
}

static void unref(coord_lock_t *h) {
  struct coord_lock_pool *pool = h->pool;
  pthread_mutex_lock(&pool->mu);
  int dead = unref_locked(h);
  pthread_mutex_unlock(&pool->mu);
  if (dead)
    lock_free(h);
}

/* Runs what a transition collected; mu must NOT be held. */
static void post_run(post_t *p) {
  coord_lock_t *h = p->h;
  if (h == NULL)
    return;
  if (p->call_acq)
    h->cb(h, p->acq_status, h->cb_arg);
  if (p->call_lost)
    p->lost_cb(h, p->lost_arg);
  struct coord_lock_pool *pool = h->pool;
  pthread_mutex_lock(&pool->mu);
  h->calling -= p->call_acq + p->call_lost;
  assert(h->calling >= 0);
  pthread_cond_broadcast(&pool->cond);
  int dead = unref_locked(h);
  pthread_mutex_unlock(&pool->mu);
  if (dead)
    lock_free(h);
}

/* Under mu: a call or timer for h starts (its completion calls op_done). */
static void op_begin(coord_lock_t *h) {
  h->ops++;
  h->refs++;
}

/* Under mu, at the start of a completion: the call is over; its reference
 * moves into the post (dropped by post_run). */
static void op_done(coord_lock_t *h, post_t *p) {
  assert(h->ops > 0);
  h->ops--;
  if (p->h == NULL)
    p->h = h; /* takes over the call's reference */
  else
    h->refs--;
  pthread_cond_broadcast(&h->pool->cond);
}

/* ---------------------------------------------------------------- pool */

static void *pool_new(coord_t *c) {
  struct coord_lock_pool *pool = coord__xmalloc(sizeof *pool);
  if (pool == NULL)
    return NULL;
  pool->c = c;
  pthread_mutex_init(&pool->mu, NULL);
  pthread_condattr_t ca;
  pthread_condattr_init(&ca);
  pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
  pthread_cond_init(&pool->cond, &ca);
  pthread_condattr_destroy(&ca);
  return pool;
}

static lease_class_t *class_get(struct coord_lock_pool *pool, int64_t ttl_s) {
  for (lease_class_t *k = pool->classes; k; k = k->next)
    if (k->ttl_s == ttl_s)
      return k;
  lease_class_t *k = coord__xmalloc(sizeof *k);
  if (k == NULL)
    return NULL;
  k->pool = pool;
  k->ttl_s = ttl_s;
  k->next = pool->classes;
  pool->classes = k;
  return k;
}

static void pool_revoke_done(coord_t *c, int status, ProtobufCMessage *resp, void *arg) {
  struct coord_lock_pool *pool = arg;
  pthread_mutex_lock(&pool->mu);
  pool->ops--;
  pthread_cond_broadcast(&pool->cond);
  pthread_mutex_unlock(&pool->mu);
}

/* Under mu: stop keeping id alive and revoke it (deletes any key on it). */
static void pool_revoke(struct coord_lock_pool *pool, int64_t id) {
  coord__lease_keepalive_forget(pool->c, id); /* stop would wait for pool_lease_lost, which takes mu */
  Etcdserverpb__LeaseRevokeRequest req = ETCDSERVERPB__LEASE_REVOKE_REQUEST__INIT;
  req.id = id;
  pool->ops++;
  if (coord__unary_async(pool->c, &coord__m_lease_revoke, &req.base, REVOKE_TIMEOUT_MS, pool_revoke_done,
                         pool) < 0)
    pool->ops--; /* it will expire by itself */
}

/* Under mu: a live lease with no key on it goes back to the pool. */
static void pool_put(lease_class_t *k, int64_t id) {
  struct coord_lock_pool *pool = k->pool;
  if (pool->closing || k->nfree >= POOL_MAX) {
    pool_revoke(pool, id);
    return;
  }
  k->free_ids[k->nfree++] = id;
}

/* Local expiry of a lease just granted, until its first renewal answers:
 * the granted TTL from when the grant was asked for (etcd started the lease
 * later than that, however slow the answer; a retried grant was first asked
 * for earlier still).  coord_lock_deadline relies on it never being late. */
static int64_t grant_expiry(const Etcdserverpb__LeaseGrantResponse *r, int64_t sent) {
  return sent + r->ttl * 1000;
}

static void pool_refill_done(coord_t *c, int status, ProtobufCMessage *resp, void *arg) {
  lease_class_t *k = arg;
  struct coord_lock_pool *pool = k->pool;
  pthread_mutex_lock(&pool->mu);
  pool->ops--;
  k->refilling--;
  if (status == 0) {
    Etcdserverpb__LeaseGrantResponse *r = (Etcdserverpb__LeaseGrantResponse *)resp;
    if (r->id != 0 && (r->error == NULL || r->error[0] == '\0')) {
      if (coord__lease_keepalive_until(c, r->id, grant_expiry(r, k->refill_sent), pool_lease_lost, pool) < 0)
        pool_revoke(pool, r->id);
      else
        pool_put(k, r->id);
    }
  }
  pthread_cond_broadcast(&pool->cond);
  pthread_mutex_unlock(&pool->mu);
}

/* Under mu: keep POOL_SPARE leases of this TTL ready. */
static void pool_refill(lease_class_t *k) {
  struct coord_lock_pool *pool = k->pool;
  while (!pool->closing && k->nfree + k->refilling < POOL_SPARE) {
    Etcdserverpb__LeaseGrantRequest req = ETCDSERVERPB__LEASE_GRANT_REQUEST__INIT;
    req.ttl = k->ttl_s;
    if (k->refilling == 0)
      k->refill_sent = coord__now_ms();
    k->refilling++;
    pool->ops++;
    if (coord__unary_async(pool->c, &coord__m_lease_grant, &req.base, 0, pool_refill_done, k) < 0) {
      k->refilling--;
      pool->ops--;
      return;
    }
  }
}

/* Under mu: a free lease of this TTL, or 0. */
static int64_t pool_take(lease_class_t *k) {
  int64_t id = 0;
  if (k->nfree > 0)
    id = k->free_ids[--k->nfree];
  pool_refill(k);
  return id;
}

/* Under mu: the handle gives up its lease.  how: 0 back to the pool (no key
 * on it), 1 revoke, 2 dead (the keep-alive gave up on it: revoked by someone
 * or expired as far as we know; still revoked, best effort, because after a
 * local expiry etcd may still hold it, and our key with it). */
static void lease_hand_back(coord_lock_t *h, int how) {
  if (!h->lease_owned)
    return;
  h->lease_owned = 0;
  if (how == 0)
    pool_put(h->cls, h->lease);
  else
    pool_revoke(h->pool, h->lease);
}

/* ---------------------------------------------------------------- delivery */

static void deliver(coord_lock_t *h, post_t *p);

static void deliver_timer_fn(coord_t *c, void *arg) {
  coord_lock_t *h = arg;
  post_t p = {0};
  pthread_mutex_lock(&h->pool->mu);
  op_done(h, &p);
  h->deliver_timer = 0;
  deliver(h, &p);
  pthread_mutex_unlock(&h->pool->mu);
  post_run(&p);
}

/* Under mu: hand the acquire outcome (state LK_HELD or LK_FAILED) to the
 * blocking waiter or the callback, once, after any cleanup. */
static void deliver(coord_lock_t *h, post_t *p) {
  assert(!is_pending(h->state));
  if (!h->cb_pending || h->cleaning || h->deliver_timer)
    return;
  if (h->sync || h->cb == NULL) {
    h->cb_pending = 0;
    pthread_cond_broadcast(&h->pool->cond);
    return;
  }
  if (coord__on_event_thread(h->c)) {
    h->cb_pending = 0;
    post_ref(h, p);
    p->call_acq = 1;
    p->acq_status = h->state == LK_HELD ? 0 : h->status;
    h->calling++;
    pthread_cond_broadcast(&h->pool->cond);
    return;
  }
  /* Callbacks run on the event thread only. */
  h->deliver_timer = 1;
  op_begin(h);
  coord__after(h->c, 0, deliver_timer_fn, h);
}

static void notify_lost(coord_lock_t *h, post_t *p) {
  if (!h->lost_pending || h->lost_cb == NULL || h->user_gone)
    return;
  h->lost_pending = 0;
  post_ref(h, p);
  p->call_lost = 1;
  p->lost_cb = h->lost_cb;
  p->lost_arg = h->lost_arg;
  h->calling++;
}

/* ---------------------------------------------------------------- transitions */

static void remember_detail(coord_lock_t *h) {
  if (h->detail == NULL && coord__on_event_thread(h->c)) {
    const char *d = coord_last_error();
    if (d != NULL && d[0] != '\0')
      h->detail = coord__strdup(d);
  }
}

/* Under mu: disposes of key and lease after an acquire ended without the
 * lock.  key_written: our key may exist; uncertain: a write's outcome is
 * unknown. */
static void dispose(coord_lock_t *h, int key_written, int uncertain);

static void cleanup_done(coord_t *c, int status, coord_kv_result_t *r, void *arg) {
  coord_lock_t *h = arg;
  post_t p = {0};
  pthread_mutex_lock(&h->pool->mu);
  op_done(h, &p);
  h->cleaning = 0;
  if (h->state == LK_RELEASED && h->release_rc == 0) {
    if (status < 0)
      h->release_rc = status;
    else if (r != NULL && r->count == 0)
      h->release_rc = coord__err(COORD_ELOST, "coord_lock_unlock: %s was already gone", h->key);
  }
  if (h->lease_dead)
    lease_hand_back(h, 2);
  else if (status < 0 || (r != NULL && r->count == 0) || h->key_gone)
    lease_hand_back(h, 1); /* not sure what is on it: revoke */
  else
    lease_hand_back(h, 0);
  if (h->state == LK_FAILED)
    deliver(h, &p);
  pthread_mutex_unlock(&h->pool->mu);
  coord_kv_result_free(r);
  post_run(&p);
}

static void dispose(coord_lock_t *h, int key_written, int uncertain) {
  if (!h->lease_owned)
    return;
  if (h->lease_dead) {
    lease_hand_back(h, 2);
  } else if (uncertain || h->key_gone) {
    lease_hand_back(h, 1);
  } else if (key_written) {
    op_begin(h);
    h->cleaning = 1;
    if (coord__delete_async(h->c, h->key, NULL, cleanup_done, h) < 0) {
      h->cleaning = 0;
      h->ops--;
      h->refs--; /* the caller holds its own reference */
      lease_hand_back(h, 1);
    }
  } else {
    lease_hand_back(h, 0);
  }
}

/* Under mu: the pending acquire ends without the lock.  uncertain: a write
 * of ours may or may not have happened (the lease is revoked). */
static void fail_ex(coord_lock_t *h, int status, int uncertain, post_t *p) {
  assert(is_pending(h->state));
  assert(status < 0);
  h->state = LK_FAILED;
  h->status = status;
  detach_watchers(h, p);
  dispose(h, h->key_written, uncertain);
  deliver(h, p);
}

static void fail(coord_lock_t *h, int status, post_t *p) {
  fail_ex(h, status, 0, p);
}

/* Under mu: the lock is ours. */
static void held(coord_lock_t *h, post_t *p) {
  assert(is_pending(h->state));
  h->state = LK_HELD;
  deliver(h, p);
}

/* Under mu: our key or lease is gone.  Acts now unless a main call is in
 * flight (its completion looks at the flags). */
static void lost_event(coord_lock_t *h, post_t *p) {
  if (h->state == LK_HELD) {
    h->state = LK_LOST;
    detach_watchers(h, p);
    h->lost_pending = 1;
    notify_lost(h, p);
  } else if (is_pending(h->state) && !h->busy) {
    fail(h, coord__err(COORD_ELOST, "lock %s: lost the place in the queue (key or lease gone)", h->key), p);
  }
}

/* ---------------------------------------------------------------- watches */

/*
 * One watch per (client, lock name) on the prefix /locks/<name>/, shared by
 * every handle of that name from its queueing Txn on, and kept NW_IDLE_MS
 * after the last one left (a janitor timer sweeps idle ones).  Why shared
 * and long-lived: etcd serves a watch that starts at a past revision from
 * its "unsynced" group, caught up only every 100 ms; a watch per waiter
 * (Go's Mutex) starts in the past whenever anything was written while it
 * was being set up, which under contention adds up to 100 ms to a handoff.
 * A warm name watch delivers a DELETE about as fast as etcd commits it.
 *
 * A handle cares about two kinds of DELETE: of its own key with a revision
 * above its token (that incarnation is gone: lost), and in LK_WAIT of its
 * predecessor with a revision above wait_rev (check again).  Events are
 * delivered in revision order, but one may arrive before the response of
 * the CHECK that makes a handle wait for it; so the watch keeps the last
 * NW_RING deletes, and every handle that starts to wait (or to hold) looks
 * them up first (nw_deleted_after).  If the ring dropped a delete newer
 * than what the handle knows, the answer is "unknown" and it checks again.
 */
#define NW_RING 64
#define NW_IDLE_MS 5000
#define NW_SWEEP_MS 250

typedef struct name_watch {
  struct coord_lock_pool *pool;
  char *prefix;
  coord__watcher_t *w; /* NULL once broken */
  int64_t last_rev;    /* highest revision delivered (or start - 1) */
  int users;           /* handles with h->nw == this */
  int64_t idle_since;
  int broken; /* the watch ended and could not be restarted */
  struct {
    char *key;
    int64_t rev;
  } ring[NW_RING];
  int rpos, rcount;
  int64_t dropped_max; /* highest revision of a delete that left the ring */
  struct name_watch *next;
} name_watch_t;

static void nw_cb(void *arg, const coord_event_t *evs, size_t n, int status);

static void nw_free(name_watch_t *nw) {
  for (int i = 0; i < nw->rcount; i++)
    free(nw->ring[i].key);
  free(nw->prefix);
  free(nw);
}

/* Under mu: 1 if key was deleted after rev (as far as the ring knows), 2 if
 * the ring cannot tell, 0 if not. */
static int nw_deleted_after(name_watch_t *nw, const char *key, int64_t rev) {
  if (nw == NULL || key == NULL)
    return 2;
  for (int i = 0; i < nw->rcount; i++)
    if (nw->ring[i].rev > rev && strcmp(nw->ring[i].key, key) == 0)
      return 1;
  if (nw->broken || nw->dropped_max > rev)
    return 2;
  return 0;
}

static void nw_ring_add(name_watch_t *nw, const char *key, int64_t rev) {
  char *k = coord__strdup(key);
  if (k == NULL) {
    if (rev > nw->dropped_max)
      nw->dropped_max = rev;
    return;
  }
  if (nw->rcount == NW_RING) {
    if (nw->ring[nw->rpos].rev > nw->dropped_max)
      nw->dropped_max = nw->ring[nw->rpos].rev;
    free(nw->ring[nw->rpos].key);
  } else {
    nw->rcount++;
  }
  nw->ring[nw->rpos].key = k;
  nw->ring[nw->rpos].rev = rev;
  nw->rpos = (nw->rpos + 1) % NW_RING;
}

static void janitor_fn(coord_t *c, void *arg);

/* Under mu: sweep idle name watches soon. */
static void janitor_arm(struct coord_lock_pool *pool) {
  if (pool->janitor || pool->closing)
    return;
  pool->janitor = 1;
  pool->ops++;
  coord__after(pool->c, NW_SWEEP_MS, janitor_fn, pool);
}

static void janitor_fn(coord_t *c, void *arg) {
  struct coord_lock_pool *pool = arg;
  name_watch_t *gone = NULL;
  pthread_mutex_lock(&pool->mu);
  pool->ops--;
  pool->janitor = 0;
  int64_t now = coord__now_ms();
  int idle_left = 0;
  for (name_watch_t **pp = &pool->nws; *pp;) {
    name_watch_t *nw = *pp;
    if (nw->users == 0 && (nw->broken || pool->closing || now - nw->idle_since >= NW_IDLE_MS)) {
      *pp = nw->next;
      nw->next = gone;
      gone = nw;
      continue;
    }
    if (nw->users == 0)
      idle_left = 1;
    pp = &nw->next;
  }
  if (idle_left)
    janitor_arm(pool);
  pthread_cond_broadcast(&pool->cond);
  pthread_mutex_unlock(&pool->mu);
  while (gone != NULL) { /* on the event thread: remove does not wait */
    name_watch_t *nw = gone;
    gone = nw->next;
    if (nw->w != NULL)
      coord__watch_remove(nw->w);
    nw_free(nw);
  }
}

/* Under mu: h follows the watch of its name, which covers every revision
 * from start_rev on (a new one starts there; an existing one started
 * earlier, at the queueing Txn of an earlier handle). */
static int nw_attach(coord_lock_t *h, int64_t start_rev) {
  struct coord_lock_pool *pool = h->pool;
  assert(h->nw == NULL);
  name_watch_t *nw = NULL;
  for (nw = pool->nws; nw; nw = nw->next)
    if (!nw->broken && strcmp(nw->prefix, h->prefix) == 0)
      break;
  if (nw == NULL) {
    nw = coord__xmalloc(sizeof *nw);
    if (nw == NULL || (nw->prefix = coord__strdup(h->prefix)) == NULL) {
      free(nw);
      return coord__err(COORD_ENOMEM, "lock %s: out of memory", h->name);
    }
    nw->pool = pool;
    nw->last_rev = start_rev - 1;
    int rc = coord__watch_add(h->c, nw->prefix, 1, start_rev, nw_cb, nw, &nw->w);
    if (rc < 0) {
      nw_free(nw);
      return rc;
    }
    nw->next = pool->nws;
    pool->nws = nw;
  }
  nw->users++;
  h->nw = nw;
  return 0;
}

static void nw_detach(coord_lock_t *h) {
  name_watch_t *nw = h->nw;
  if (nw == NULL)
    return;
  h->nw = NULL;
  assert(nw->users > 0);
  if (--nw->users == 0) {
    nw->idle_since = coord__now_ms();
    janitor_arm(h->pool);
  }
}

/* Under mu: finds one handle on nw that the deletion of key at rev affects
 * and acts on it; returns 1 if it did (p may then hold work). */
static int nw_apply(name_watch_t *nw, const char *key, int64_t rev, post_t *p) {
  for (coord_lock_t *h = nw->pool->locks; h; h = h->next) {
    if (h->nw != nw)
      continue;
    if (!h->key_gone && h->token > 0 && rev > h->token && h->key != NULL && strcmp(key, h->key) == 0) {
      h->key_gone = 1;
      lost_event(h, p);
      return 1;
    }
    if (h->state == LK_WAIT && rev > h->wait_rev && h->pred_key != NULL && strcmp(key, h->pred_key) == 0) {
      start_check(h, p);
      return 1;
    }
  }
  return 0;
}

static void nw_cb(void *arg, const coord_event_t *evs, size_t n, int status) {
  name_watch_t *nw = arg;
  struct coord_lock_pool *pool = nw->pool;
  pthread_mutex_lock(&pool->mu);
  if (status < 0) {
    coord__watcher_t *old = nw->w;
    nw->w = NULL;
    int rc = status;
    if (!pool->closing && status != COORD_ECLOSED && !coord__closing(pool->c)) {
      /* Start again where it stopped; the old watcher is removed below. */
      rc = coord__watch_add(pool->c, nw->prefix, 1, nw->last_rev + 1, nw_cb, nw, &nw->w);
    }
    if (rc < 0) {
      nw->broken = 1;
      /* Nobody can tell the waiters when to check again: fail them. */
      for (;;) {
        post_t p = {0};
        coord_lock_t *h = pool->locks;
        while (h && !(h->nw == nw && is_pending(h->state) && !h->busy))
          h = h->next;
        if (h == NULL)
          break;
        fail(h, rc, &p);
        pthread_mutex_unlock(&pool->mu);
        post_run(&p);
        pthread_mutex_lock(&pool->mu);
      }
    }
    pthread_mutex_unlock(&pool->mu);
    if (old != NULL)
      coord__watch_remove(old);
    return;
  }
  for (size_t i = 0; i < n; i++) {
    if (evs[i].revision > nw->last_rev)
      nw->last_rev = evs[i].revision;
    if (evs[i].type != COORD_EVENT_DELETE || evs[i].kv.key == NULL)
      continue;
    nw_ring_add(nw, evs[i].kv.key, evs[i].revision);
    for (;;) {
      post_t p = {0};
      if (!nw_apply(nw, evs[i].kv.key, evs[i].revision, &p))
        break;
      if (p.h != NULL) {
        pthread_mutex_unlock(&pool->mu);
        post_run(&p);
        pthread_mutex_lock(&pool->mu);
      }
    }
  }
  pthread_mutex_unlock(&pool->mu);
}

/* ---------------------------------------------------------------- calls */

/* Sends a Txn built from txn, with the patches coord_txn_t cannot express:
 * max_create (> 0) on the first success Range, and the range end of
 * cmp_prefix (non-NULL) on the first compare. */
static int send_txn(coord_lock_t *h, const coord_txn_t *txn, int64_t max_create, const char *cmp_prefix,
                    coord__unary_cb cb) {
  Etcdserverpb__TxnRequest *req = coord__txn_build(h->c, txn);
  if (req == NULL)
    return coord__err(COORD_ENOMEM, "lock %s: cannot build Txn", h->name);
  char *end = NULL;
  if (cmp_prefix != NULL) {
    size_t klen = 0, elen = 0;
    char *full = coord__key(h->c, cmp_prefix, &klen);
    if (full != NULL)
      end = coord__prefix_end(full, klen, &elen);
    free(full);
    if (end == NULL || req->n_compare < 1) {
      free(end);
      coord__txn_request_free(req);
      return coord__err(COORD_ENOMEM, "lock %s: cannot build Txn", h->name);
    }
    req->compare[0]->range_end.data = (uint8_t *)end;
    req->compare[0]->range_end.len = elen;
  }
  if (max_create > 0) {
    assert(req->n_success >= 1 &&
           req->success[0]->request_case == ETCDSERVERPB__REQUEST_OP__REQUEST_REQUEST_RANGE);
    req->success[0]->request_range->max_create_revision = max_create;
  }
  int rc = coord__unary_async(h->c, &coord__m_txn, &req->base, 0, cb, h);
  if (end != NULL) { /* ours: take it back before the request is freed */
    req->compare[0]->range_end.data = NULL;
    req->compare[0]->range_end.len = 0;
    free(end);
  }
  coord__txn_request_free(req);
  return rc;
}

static void grant_done(coord_t *c, int status, ProtobufCMessage *resp, void *arg);

/* Under mu: get a lease (pool or grant), then the queueing Txn. */
static void start_lease(coord_lock_t *h, post_t *p) {
  h->state = LK_LEASE;
  int64_t id = h->retried ? 0 : pool_take(h->cls); /* a retry always gets a fresh lease */
  if (id != 0) {
    h->lease = id;
    h->lease_owned = 1;
    if (key_assign(h, id) < 0) {
      fail(h, coord__err(COORD_ENOMEM, "lock %s: out of memory", h->name), p);
      return;
    }
    start_txn(h, p);
    return;
  }
  Etcdserverpb__LeaseGrantRequest req = ETCDSERVERPB__LEASE_GRANT_REQUEST__INIT;
  req.ttl = h->cls->ttl_s;
  op_begin(h);
  h->busy = 1;
  h->grant_sent = coord__now_ms();
  int rc = coord__unary_async(h->c, &coord__m_lease_grant, &req.base, 0, grant_done, h);
  if (rc < 0) {
    h->busy = 0;
    h->ops--;
    h->refs--;
    fail(h, rc, p);
  }
}

static void grant_done(coord_t *c, int status, ProtobufCMessage *resp, void *arg) {
  coord_lock_t *h = arg;
  post_t p = {0};
  pthread_mutex_lock(&h->pool->mu);
  op_done(h, &p);
  h->busy = 0;
  assert(h->state == LK_LEASE);
  int64_t id = 0;
  if (status == 0) {
    Etcdserverpb__LeaseGrantResponse *r = (Etcdserverpb__LeaseGrantResponse *)resp;
    if (r->error != NULL && r->error[0] != '\0')
      status = coord__err(COORD_EIO, "lock %s: lease grant: %s", h->name, r->error);
    else if (r->id == 0)
      status = coord__err(COORD_EPROTO, "lock %s: lease grant returned no id", h->name);
    else
      id = r->id;
  }
  if (status == 0) {
    int rc = coord__lease_keepalive_until(
        c, id, grant_expiry((Etcdserverpb__LeaseGrantResponse *)resp, h->grant_sent), pool_lease_lost,
        h->pool);
    if (rc < 0) {
      pool_revoke(h->pool, id);
      status = rc;
    }
  }
  if (status < 0) {
    remember_detail(h);
    fail(h, h->cancel ? h->cancel_status : status, &p);
  } else {
    h->lease = id;
    h->lease_owned = 1;
    h->lease_dead = 0;
    if (key_assign(h, id) < 0)
      fail(h, coord__err(COORD_ENOMEM, "lock %s: out of memory", h->name), &p);
    else if (h->cancel)
      fail(h, h->cancel_status, &p);
    else
      start_txn(h, &p);
  }
  pthread_mutex_unlock(&h->pool->mu);
  post_run(&p);
}

static void txn_done(coord_t *c, int status, ProtobufCMessage *resp, void *arg);

/* Under mu: the queueing Txn (or try_acquire's). */
static void start_txn(coord_lock_t *h, post_t *p) {
  assert(h->lease_owned && h->key != NULL);
  h->state = LK_TXN;
  coord_cmp_t cmp;
  memset(&cmp, 0, sizeof cmp);
  coord_op_t put, first, mine;
  memset(&put, 0, sizeof put);
  memset(&first, 0, sizeof first);
  memset(&mine, 0, sizeof mine);
  put.type = COORD_OP_PUT;
  put.key = h->key;
  put.value = "";
  put.value_len = 0;
  put.lease = h->lease;
  first.type = COORD_OP_RANGE;
  first.key = h->prefix;
  first.prefix = 1;
  first.limit = 1;
  first.sort_order = COORD_SORT_ASCEND;
  first.sort_target = COORD_SORT_CREATE;
  mine.type = COORD_OP_RANGE;
  mine.key = h->key;
  coord_op_t success[2] = {put, first};
  coord_op_t failure[2] = {mine, first};
  coord_txn_t txn;
  memset(&txn, 0, sizeof txn);
  txn.cmp = &cmp;
  txn.ncmp = 1;
  txn.success = success;
  txn.nsuccess = 2;
  if (h->try_mode) {
    /* version(every key under prefix) == 0: nothing is written if taken. */
    cmp.key = h->prefix;
    cmp.target = COORD_CMP_VERSION;
    cmp.result = COORD_CMP_EQUAL;
    cmp.number = 0;
    txn.failure = NULL;
    txn.nfailure = 0;
  } else {
    cmp.key = h->key;
    cmp.target = COORD_CMP_CREATE;
    cmp.result = COORD_CMP_EQUAL;
    cmp.number = 0;
    txn.failure = failure;
    txn.nfailure = 2;
  }
  op_begin(h);
  h->busy = 1;
  int rc = send_txn(h, &txn, 0, h->try_mode ? h->prefix : NULL, txn_done);
  if (rc < 0) {
    h->busy = 0;
    h->ops--;
    h->refs--;
    fail(h, rc, p); /* nothing was sent: no key */
  }
}

static void txn_done(coord_t *c, int status, ProtobufCMessage *resp, void *arg) {
  coord_lock_t *h = arg;
  post_t p = {0};
  coord_txn_result_t *r = NULL;
  if (status == 0)
    status = coord__txn_result_from_pb(c, (const Etcdserverpb__TxnResponse *)resp, &r);
  pthread_mutex_lock(&h->pool->mu);
  op_done(h, &p);
  h->busy = 0;
  assert(h->state == LK_TXN);
  if (status < 0) {
    remember_detail(h);
    if (status == COORD_ENOTFOUND && !h->retried && !h->cancel && !h->pool->closing) {
      /* "requested lease not found": a pooled lease died unnoticed (revoked,
       * or expired while we were cut off).  Its siblings in the pool are
       * suspect too: drop them all, and try once more with a fresh grant.
       * Nothing was written (etcd rejected the whole Txn). */
      h->retried = 1;
      lease_class_t *k = h->cls;
      while (k->nfree > 0)
        pool_revoke(h->pool, k->free_ids[--k->nfree]);
      lease_hand_back(h, 1);
      h->lease = 0;
      h->lease_dead = 0;
      start_lease(h, &p);
    } else {
      /* A Txn that timed out may have committed: revoke the lease. */
      fail_ex(h, h->cancel ? h->cancel_status : status, 1, &p);
    }
    goto out;
  }
  int64_t rev = r->revision;
  if (h->try_mode && !r->succeeded) {
    fail(h, coord__err(COORD_ELOCKED, "lock %s is held", h->name), &p);
    goto out;
  }
  if (r->n < 2 || r->responses[0] == NULL || r->responses[1] == NULL) {
    fail_ex(h, coord__err(COORD_EPROTO, "lock %s: unexpected Txn answer", h->name), 1, &p);
    goto out;
  }
  h->key_written = 1;
  if (r->succeeded)
    h->token = rev;
  else if (r->responses[0]->n > 0)
    h->token = r->responses[0]->kvs[0].create_revision;
  else {
    h->key_gone = 1;
    fail(h, coord__err(COORD_EPROTO, "lock %s: own key vanished inside a Txn", h->name), &p);
    goto out;
  }
  int64_t lowest = r->responses[1]->n > 0 ? r->responses[1]->kvs[0].create_revision : 0;
  if (h->cancel) {
    fail(h, h->cancel_status, &p);
  } else if (h->lease_dead || h->key_gone) {
    fail(h, coord__err(COORD_ELOST, "lock %s: lease lost while queueing", h->name), &p);
  } else {
    int rc = nw_attach(h, rev + 1);
    /* our key existed at rev: only a delete above rev matters (not above
     * the token: a ring that dropped an older delete would then answer
     * "unknown" for ever) */
    int gone = rc < 0 ? 0 : nw_deleted_after(h->nw, h->key, rev);
    if (rc < 0) {
      remember_detail(h);
      fail(h, rc, &p);
    } else if (gone == 1) {
      h->key_gone = 1;
      fail(h, coord__err(COORD_ELOST, "lock %s: own key deleted while queueing", h->name), &p);
    } else if (gone == 0 && lowest == h->token) {
      held(h, &p);
    } else if (gone == 0 && h->try_mode) {
      fail(h, coord__err(COORD_ELOCKED, "lock %s is held", h->name), &p);
    } else {
      start_check(h, &p); /* also settles "unknown" */
    }
  }
out:
  pthread_mutex_unlock(&h->pool->mu);
  coord_txn_result_free(r);
  post_run(&p);
}

static void check_done(coord_t *c, int status, ProtobufCMessage *resp, void *arg);

/* Under mu: is there a key below ours? */
static void start_check(coord_lock_t *h, post_t *p) {
  assert(h->token > 0 && h->nw != NULL);
  h->state = LK_CHECK;
  coord_cmp_t cmp;
  memset(&cmp, 0, sizeof cmp);
  cmp.key = h->key;
  cmp.target = COORD_CMP_CREATE;
  cmp.result = COORD_CMP_EQUAL;
  cmp.number = h->token;
  coord_op_t below;
  memset(&below, 0, sizeof below);
  below.type = COORD_OP_RANGE;
  below.key = h->prefix;
  below.prefix = 1;
  below.limit = 1;
  below.sort_order = COORD_SORT_DESCEND;
  below.sort_target = COORD_SORT_CREATE;
  coord_txn_t txn;
  memset(&txn, 0, sizeof txn);
  txn.cmp = &cmp;
  txn.ncmp = 1;
  txn.success = &below;
  txn.nsuccess = 1;
  op_begin(h);
  h->busy = 1;
  int rc = send_txn(h, &txn, h->token - 1, NULL, check_done);
  if (rc < 0) {
    h->busy = 0;
    h->ops--;
    h->refs--;
    fail(h, rc, p);
  }
}

static void check_done(coord_t *c, int status, ProtobufCMessage *resp, void *arg) {
  coord_lock_t *h = arg;
  post_t p = {0};
  coord_txn_result_t *r = NULL;
  if (status == 0)
    status = coord__txn_result_from_pb(c, (const Etcdserverpb__TxnResponse *)resp, &r);
  pthread_mutex_lock(&h->pool->mu);
  op_done(h, &p);
  h->busy = 0;
  assert(h->state == LK_CHECK);
  if (status < 0) {
    remember_detail(h);
    fail(h, h->cancel ? h->cancel_status : status, &p);
  } else if (h->cancel) {
    fail(h, h->cancel_status, &p);
  } else if (h->lease_dead || h->key_gone || !r->succeeded) {
    h->key_gone = h->key_gone || !r->succeeded;
    fail(h, coord__err(COORD_ELOST, "lock %s: lost the place in the queue (key or lease gone)", h->name), &p);
  } else if (r->n < 1 || r->responses[0] == NULL) {
    fail(h, coord__err(COORD_EPROTO, "lock %s: unexpected Txn answer", h->name), &p);
  } else if (h->nw == NULL || h->nw->broken) {
    fail(h, coord__err(COORD_EIO, "lock %s: the watch of the lock ended", h->name), &p);
  } else {
    /* The CHECK saw our key at r->revision; a delete of it that the watch
     * delivered before this answer is in the ring.  "Unknown" (the ring
     * dropped a delete above r->revision) checks again: each CHECK has a
     * newer revision, so this ends. */
    int own = nw_deleted_after(h->nw, h->key, r->revision);
    if (own == 1) {
      h->key_gone = 1;
      fail(h, coord__err(COORD_ELOST, "lock %s: own key deleted", h->name), &p);
    } else if (own == 2) {
      start_check(h, &p);
    } else if (r->responses[0]->n == 0) {
      held(h, &p);
    } else if (h->try_mode) {
      fail(h, coord__err(COORD_ELOCKED, "lock %s is held", h->name), &p);
    } else {
      char *pred = coord__strdup(r->responses[0]->kvs[0].key);
      if (pred == NULL) {
        fail(h, coord__err(COORD_ENOMEM, "lock %s: out of memory", h->name), &p);
      } else {
        free(h->pred_key);
        h->pred_key = pred;
        h->wait_rev = r->revision;
        h->state = LK_WAIT;
        if (nw_deleted_after(h->nw, pred, h->wait_rev) != 0)
          start_check(h, &p); /* already gone (or cannot tell) */
      }
    }
  }
  pthread_mutex_unlock(&h->pool->mu);
  coord_txn_result_free(r);
  post_run(&p);
}

/* ---------------------------------------------------------------- lease lost */

static void pool_lease_lost(int64_t id, void *arg) {
  struct coord_lock_pool *pool = arg;
  post_t p = {0};
  pthread_mutex_lock(&pool->mu);
  for (lease_class_t *k = pool->classes; k; k = k->next) {
    for (int i = 0; i < k->nfree; i++) {
      if (k->free_ids[i] == id) {
        k->free_ids[i] = k->free_ids[--k->nfree];
        pool_refill(k);
        break;
      }
    }
  }
  for (coord_lock_t *h = pool->locks; h; h = h->next) {
    if (h->lease_owned && h->lease == id) {
      h->lease_dead = 1;
      lost_event(h, &p);
      break;
    }
  }
  pthread_mutex_unlock(&pool->mu);
  post_run(&p);
}

/* ---------------------------------------------------------------- public */

static struct coord_lock_pool *get_pool(coord_t *c) {
  return coord__slot(c, COORD__SLOT_LOCKS, pool_new);
}

static int lock_start(const char *fn, coord_t *c, const char *name, int64_t ttl_ms, int try_mode, int sync,
                      coord_lock_cb cb, void *arg, coord_lock_t **out) {
  if (out != NULL)
    *out = NULL;
  if (c == NULL || out == NULL)
    return coord__err(COORD_EINVAL, "%s: NULL argument", fn);
  int rc = check_name(fn, name);
  if (rc < 0)
    return rc;
  int64_t ttl_s = 0;
  rc = ttl_seconds(fn, ttl_ms, &ttl_s);
  if (rc < 0)
    return rc;
  if (coord__closing(c))
    return coord__err(COORD_ECLOSED, "%s: client is closing", fn);
  struct coord_lock_pool *pool = get_pool(c);
  if (pool == NULL)
    return coord__err(COORD_ENOMEM, "%s: out of memory", fn);
  coord_lock_t *h = coord__xmalloc(sizeof *h);
  if (h == NULL)
    return coord__err(COORD_ENOMEM, "%s: out of memory", fn);
  h->c = c;
  h->pool = pool;
  h->name = coord__strdup(name);
  h->prefix = coord__sprintf(LOCKS_ROOT "%s/", name);
  h->try_mode = try_mode;
  h->sync = sync;
  h->cb = cb;
  h->cb_arg = arg;
  h->cb_pending = 1;
  h->refs = 1; /* the user's */
  h->state = LK_LEASE;
  if (h->name == NULL || h->prefix == NULL) {
    lock_free(h);
    return coord__err(COORD_ENOMEM, "%s: out of memory", fn);
  }
  post_t p = {0};
  pthread_mutex_lock(&pool->mu);
  if (pool->closing) {
    pthread_mutex_unlock(&pool->mu);
    lock_free(h);
    return coord__err(COORD_ECLOSED, "%s: client is closing", fn);
  }
  h->cls = class_get(pool, ttl_s);
  if (h->cls == NULL) {
    pthread_mutex_unlock(&pool->mu);
    lock_free(h);
    return coord__err(COORD_ENOMEM, "%s: out of memory", fn);
  }
  h->next = pool->locks;
  if (pool->locks)
    pool->locks->prev = h;
  pool->locks = h;
  start_lease(h, &p);
  /* A failure to even send is reported by the return value. */
  rc = 0;
  if (h->state == LK_FAILED && !h->cleaning && h->ops == 0) {
    rc = h->status;
    h->cb_pending = 0;
  }
  pthread_mutex_unlock(&pool->mu);
  post_run(&p);
  if (rc < 0) {
    coord_lock_unlock(h);
    return rc;
  }
  *out = h;
  return 0;
}

int coord_lock_acquire_async(coord_t *c, const char *name, int64_t ttl_ms, coord_lock_cb cb, void *arg,
                             coord_lock_t **out) {
  static const char fn[] = "coord_lock_acquire_async";
  if (cb == NULL) {
    if (out != NULL)
      *out = NULL;
    return coord__err(COORD_EINVAL, "%s: NULL callback", fn);
  }
  return lock_start(fn, c, name, ttl_ms, 0, 0, cb, arg, out);
}

/* The blocking forms: start, wait for the outcome (timeout_ms < 0: for
 * ever), cancel on timeout and wait for the cleanup. */
static int lock_wait(const char *fn, coord_t *c, const char *name, int64_t ttl_ms, int try_mode,
                     int timeout_ms, coord_lock_t **out) {
  if (out == NULL)
    return coord__err(COORD_EINVAL, "%s: NULL argument", fn);
  *out = NULL;
  if (c != NULL && coord__on_event_thread(c))
    return coord__err(COORD_EINVAL, "%s: blocking call on the event thread", fn);
  if (timeout_ms < -1)
    return coord__err(COORD_EINVAL, "%s: invalid timeout %d", fn, timeout_ms);
  if (timeout_ms == 0)
    timeout_ms = c ? coord__default_timeout_ms(c) : LOCK_DEFAULT_TIMEOUT_MS;
  coord_lock_t *h = NULL;
  int rc = lock_start(fn, c, name, ttl_ms, try_mode, 1, NULL, NULL, &h);
  if (rc < 0)
    return rc;
  struct coord_lock_pool *pool = h->pool;
  struct timespec dl;
  if (timeout_ms > 0)
    deadline_after(&dl, timeout_ms);
  post_t p = {0};
  pthread_mutex_lock(&pool->mu);
  while (h->cb_pending) {
    if (timeout_ms < 0) {
      pthread_cond_wait(&pool->cond, &pool->mu);
      continue;
    }
    if (pthread_cond_timedwait(&pool->cond, &pool->mu, &dl) == ETIMEDOUT && h->cb_pending) {
      if (is_pending(h->state) && !h->cancel) {
        h->cancel = 1;
        h->cancel_status = COORD_ETIMEDOUT;
        if (!h->busy)
          fail(h, COORD_ETIMEDOUT, &p);
      }
      while (h->cb_pending)
        pthread_cond_wait(&pool->cond, &pool->mu);
    }
  }
  rc = h->state == LK_HELD ? 0 : h->status;
  char *detail = coord__strdup(h->detail);
  pthread_mutex_unlock(&pool->mu);
  post_run(&p);
  if (rc == 0) {
    *out = h;
    free(detail);
    return 0;
  }
  coord_lock_unlock(h);
  if (rc == COORD_ETIMEDOUT)
    coord__err(rc, "%s(%s): timed out after %d ms", fn, name, timeout_ms);
  else if (rc == COORD_ELOCKED)
    coord__err(rc, "%s(%s): lock is held", fn, name);
  else
    coord__err(rc, "%s(%s): %s", fn, name, detail ? detail : coord_strerror(rc));
  free(detail);
  return rc;
}

int coord_lock_acquire(coord_t *c, const char *name, int64_t ttl_ms, int timeout_ms, coord_lock_t **out) {
  return lock_wait("coord_lock_acquire", c, name, ttl_ms, 0, timeout_ms, out);
}

int coord_lock_try_acquire(coord_t *c, const char *name, int64_t ttl_ms, coord_lock_t **out) {
  return lock_wait("coord_lock_try_acquire", c, name, ttl_ms, 1, -1, out);
}

void coord_lock_cancel(coord_lock_t *h) {
  if (h == NULL)
    return;
  post_t p = {0};
  pthread_mutex_lock(&h->pool->mu);
  if (is_pending(h->state) && !h->cancel) {
    h->cancel = 1;
    h->cancel_status = coord__err(COORD_ECANCELED, "lock %s: acquire cancelled", h->name);
    if (!h->busy)
      fail(h, COORD_ECANCELED, &p);
  }
  pthread_mutex_unlock(&h->pool->mu);
  post_run(&p);
}

int coord_lock_unlock(coord_lock_t *h) {
  if (h == NULL)
    return coord__err(COORD_EINVAL, "coord_lock_unlock: NULL lock");
  struct coord_lock_pool *pool = h->pool;
  post_t p = {0};
  int rc = 0;
  pthread_mutex_lock(&pool->mu);
  assert(!h->user_gone);
  h->user_gone = 1;
  h->cb_pending = 0; /* no acquire callback after this returns */
  switch (h->state) {
  case LK_LEASE:
  case LK_TXN:
  case LK_CHECK:
  case LK_WAIT:
    if (!h->cancel) {
      h->cancel = 1;
      h->cancel_status = COORD_ECANCELED;
    }
    if (!h->busy)
      fail(h, COORD_ECANCELED, &p);
    break;
  case LK_HELD:
    detach_watchers(h, &p);
    h->state = LK_RELEASED;
    dispose(h, 1, 0);
    break;
  case LK_LOST:
    rc = COORD_ELOST;
    dispose(h, 0, 0);
    break;
  case LK_FAILED:
  case LK_RELEASED:
    break;
  }
  pthread_mutex_unlock(&pool->mu);
  post_run(&p);
  if (!coord__on_event_thread(h->c)) {
    pthread_mutex_lock(&pool->mu);
    while (h->ops > 0 || h->calling > 0)
      pthread_cond_wait(&pool->cond, &pool->mu);
    if (rc == 0)
      rc = h->release_rc;
    pthread_mutex_unlock(&pool->mu);
  }
  unref(h);
  if (rc == COORD_ELOST)
    return coord__err(COORD_ELOST, "coord_lock_unlock: the lock had been lost");
  return rc;
}

int coord_lock_ttl(coord_lock_t *h, int64_t *remaining_ms) {
  static const char fn[] = "coord_lock_ttl";
  if (h == NULL || remaining_ms == NULL)
    return coord__err(COORD_EINVAL, "%s: NULL argument", fn);
  *remaining_ms = 0;
  if (coord__on_event_thread(h->c))
    return coord__err(COORD_EINVAL, "%s: blocking call on the event thread", fn);
  pthread_mutex_lock(&h->pool->mu);
  lk_state_t st = h->state;
  int status = h->status;
  int64_t lease = h->lease_owned ? h->lease : 0;
  int64_t ttl_s = h->cls->ttl_s;
  pthread_mutex_unlock(&h->pool->mu);
  if (st == LK_LOST)
    return coord__err(COORD_ELOST, "%s: lock lost", fn);
  if (st == LK_FAILED)
    return coord__err(status, "%s: acquire failed: %s", fn, coord_strerror(status));
  if (st == LK_RELEASED)
    return coord__err(COORD_EINVAL, "%s: lock released", fn);
  if (lease == 0) { /* still waiting for its lease: the TTL it will get */
    *remaining_ms = ttl_s * 1000;
    return 0;
  }
  int64_t granted = 0;
  int rc = coord_lease_ttl(h->c, lease, remaining_ms, &granted);
  if (rc == COORD_ENOTFOUND)
    return coord__err(COORD_ELOST, "%s: lease %" PRIx64 " expired", fn, (uint64_t)lease);
  return rc;
}

int coord_lock_deadline(coord_lock_t *h, int64_t *ms_left, int64_t *ttl_ms) {
  static const char fn[] = "coord_lock_deadline";
  if (ms_left != NULL)
    *ms_left = 0;
  if (ttl_ms != NULL)
    *ttl_ms = 0;
  if (h == NULL || ms_left == NULL)
    return coord__err(COORD_EINVAL, "%s: NULL argument", fn);
  /* pool->mu is held across the look-up (pool->mu before ls->mu), so that
   * the lease cannot go back to the pool, to another handle, meanwhile. */
  pthread_mutex_lock(&h->pool->mu);
  int rc = 0;
  switch (h->state) {
  case LK_LOST:
    rc = coord__err(COORD_ELOST, "%s: lock %s lost", fn, h->name);
    break;
  case LK_FAILED:
    rc = coord__err(h->status, "%s: acquire of %s failed: %s", fn, h->name, coord_strerror(h->status));
    break;
  case LK_RELEASED:
    rc = coord__err(COORD_EINVAL, "%s: lock %s released", fn, h->name);
    break;
  default:
    if (!h->lease_owned) {
      rc = coord__err(COORD_ENOTFOUND, "%s: lock %s has no lease yet", fn, h->name);
      break;
    }
    rc = coord_lease_deadline(h->c, h->lease, ms_left, ttl_ms);
    if (rc == COORD_ENOTFOUND) /* the keep-alive gave it up: lost callback on its way */
      rc = coord__err(COORD_ELOST, "%s: lease %" PRIx64 " of lock %s expired", fn, (uint64_t)h->lease,
                      h->name);
    break;
  }
  pthread_mutex_unlock(&h->pool->mu);
  return rc;
}

const char *coord_lock_key(coord_lock_t *h) {
  if (h == NULL)
    return NULL;
  pthread_mutex_lock(&h->pool->mu);
  const char *k = h->key;
  pthread_mutex_unlock(&h->pool->mu);
  return k;
}

int64_t coord_lock_token(coord_lock_t *h) {
  if (h == NULL)
    return 0;
  pthread_mutex_lock(&h->pool->mu);
  int64_t t = h->token;
  pthread_mutex_unlock(&h->pool->mu);
  return t;
}

int coord_lock_state(coord_lock_t *h) {
  if (h == NULL)
    return coord__err(COORD_EINVAL, "coord_lock_state: NULL lock");
  pthread_mutex_lock(&h->pool->mu);
  int s;
  switch (h->state) {
  case LK_HELD:
    s = 0;
    break;
  case LK_LOST:
    s = COORD_ELOST;
    break;
  case LK_FAILED:
    s = h->status;
    break;
  case LK_RELEASED:
    s = COORD_ECLOSED;
    break;
  default:
    s = 1;
    break;
  }
  pthread_mutex_unlock(&h->pool->mu);
  return s;
}

static void lost_timer_fn(coord_t *c, void *arg) {
  coord_lock_t *h = arg;
  post_t p = {0};
  pthread_mutex_lock(&h->pool->mu);
  op_done(h, &p);
  notify_lost(h, &p);
  pthread_mutex_unlock(&h->pool->mu);
  post_run(&p);
}

void coord_lock_on_lost(coord_lock_t *h, coord_lock_lost_cb cb, void *arg) {
  if (h == NULL)
    return;
  pthread_mutex_lock(&h->pool->mu);
  h->lost_cb = cb;
  h->lost_arg = arg;
  if (h->lost_pending && cb != NULL) {
    /* Lost before anyone listened: tell from the event thread. */
    op_begin(h);
    coord__after(h->c, 0, lost_timer_fn, h);
  }
  pthread_mutex_unlock(&h->pool->mu);
}

/* Snapshot of a held lock for a guarded Txn. */
static int held_snapshot(const char *fn, coord_lock_t *h, char **key, int64_t *token, int64_t *lease) {
  pthread_mutex_lock(&h->pool->mu);
  int st = h->state;
  *key = st == LK_HELD ? coord__strdup(h->key) : NULL;
  *token = h->token;
  *lease = h->lease;
  pthread_mutex_unlock(&h->pool->mu);
  if (st != LK_HELD)
    return coord__err(COORD_ELOST, "%s: lock is not held", fn);
  if (*key == NULL)
    return coord__err(COORD_ENOMEM, "%s: out of memory", fn);
  return 0;
}

int coord_lock_set_note(coord_lock_t *h, const void *note, size_t len) {
  static const char fn[] = "coord_lock_set_note";
  if (h == NULL || (note == NULL && len > 0))
    return coord__err(COORD_EINVAL, "%s: NULL argument", fn);
  if (coord__on_event_thread(h->c))
    return coord__err(COORD_EINVAL, "%s: blocking call on the event thread", fn);
  char *key = NULL;
  int64_t token = 0, lease = 0;
  int rc = held_snapshot(fn, h, &key, &token, &lease);
  if (rc < 0)
    return rc;
  coord_cmp_t cmp = {.key = key, .target = COORD_CMP_CREATE, .result = COORD_CMP_EQUAL, .number = token};
  coord_op_t put;
  memset(&put, 0, sizeof put);
  put.type = COORD_OP_PUT;
  put.key = key;
  put.value = note ? note : "";
  put.value_len = len;
  put.lease = lease;
  coord_txn_t txn;
  memset(&txn, 0, sizeof txn);
  txn.cmp = &cmp;
  txn.ncmp = 1;
  txn.success = &put;
  txn.nsuccess = 1;
  coord_txn_result_t *r = NULL;
  rc = coord_kv_txn(h->c, &txn, &r);
  if (rc == 0 && !r->succeeded)
    rc = coord__err(COORD_ELOST, "%s: %s no longer holds the lock", fn, key);
  coord_txn_result_free(r);
  free(key);
  return rc;
}

/* ---------------------------------------------------------------- guarded write */

/* Same rule as config.c's keys: non-empty '/'-separated path, no empty,
 * "." or ".." part, no leading or trailing '/'. */
static int check_config_key(const char *fn, const char *key) {
  if (key == NULL)
    return coord__err(COORD_EINVAL, "%s: key is NULL", fn);
  if (key[0] == '\0')
    return coord__err(COORD_EINVAL, "%s: key is empty", fn);
  const char *p = key;
  for (;;) {
    const char *slash = strchr(p, '/');
    size_t n = slash ? (size_t)(slash - p) : strlen(p);
    if (n == 0 || (n == 1 && p[0] == '.') || (n == 2 && p[0] == '.' && p[1] == '.'))
      return coord__err(COORD_EINVAL, "%s: invalid key \"%s\"", fn, key);
    if (slash == NULL)
      break;
    p = slash + 1;
  }
  return 0;
}

int coord_config_set_guarded(coord_t *c, coord_lock_t *lock, const char *key, const json_t *value) {
  static const char fn[] = "coord_config_set_guarded";
  if (c == NULL || lock == NULL || value == NULL)
    return coord__err(COORD_EINVAL, "%s: NULL argument", fn);
  if (lock->c != c)
    return coord__err(COORD_EINVAL, "%s: lock belongs to another client", fn);
  int rc = check_config_key(fn, key);
  if (rc < 0)
    return rc;
  if (coord__on_event_thread(c))
    return coord__err(COORD_EINVAL, "%s: blocking call on the event thread", fn);
  char *bytes = NULL;
  size_t len = 0;
  rc = coord_config_encode(value, &bytes, &len);
  if (rc < 0)
    return rc;
  char *hkey = NULL;
  int64_t token = 0, lease = 0;
  rc = held_snapshot(fn, lock, &hkey, &token, &lease);
  if (rc < 0) {
    free(bytes);
    return rc;
  }
  char *ckey = coord__sprintf("/config/%s", key);
  if (ckey == NULL) {
    free(bytes);
    free(hkey);
    return coord__err(COORD_ENOMEM, "%s: out of memory", fn);
  }
  coord_cmp_t cmp = {.key = hkey, .target = COORD_CMP_CREATE, .result = COORD_CMP_EQUAL, .number = token};
  coord_op_t put;
  memset(&put, 0, sizeof put);
  put.type = COORD_OP_PUT;
  put.key = ckey;
  put.value = bytes;
  put.value_len = len;
  coord_txn_t txn;
  memset(&txn, 0, sizeof txn);
  txn.cmp = &cmp;
  txn.ncmp = 1;
  txn.success = &put;
  txn.nsuccess = 1;
  coord_txn_result_t *r = NULL;
  rc = coord_kv_txn(c, &txn, &r);
  if (rc == 0 && !r->succeeded)
    rc = coord__err(COORD_ELOST, "%s: lock %s lost (token %" PRId64 "); nothing written", fn, hkey, token);
  coord_txn_result_free(r);
  free(ckey);
  free(hkey);
  free(bytes);
  return rc;
}

/* ---------------------------------------------------------------- close */

static void barrier_fn(coord_t *c, void *arg) {
  struct coord_lock_pool *pool = arg;
  pthread_mutex_lock(&pool->mu);
  pool->barrier_done = 1;
  pthread_cond_broadcast(&pool->cond);
  pthread_mutex_unlock(&pool->mu);
}

static int all_quiet(struct coord_lock_pool *pool) {
  if (pool->ops > 0)
    return 0;
  for (coord_lock_t *h = pool->locks; h; h = h->next)
    if (h->ops > 0 || h->calling > 0)
      return 0;
  return 1;
}

/* Waits (mu held) until pred or the deadline; returns pred's last value. */
static int wait_until(struct coord_lock_pool *pool, int (*pred)(struct coord_lock_pool *),
                      struct timespec *dl) {
  while (!pred(pool))
    if (pthread_cond_timedwait(&pool->cond, &pool->mu, dl) == ETIMEDOUT)
      return pred(pool);
  return 1;
}

static int barrier_passed(struct coord_lock_pool *pool) {
  return pool->barrier_done;
}

void coord__locks_close(coord_t *c) {
  struct coord_lock_pool *pool = coord__slot_get(c, COORD__SLOT_LOCKS);
  if (pool == NULL)
    return;
  /* 1. Cancel pending acquires, release held locks. */
  pthread_mutex_lock(&pool->mu);
  pool->closing = 1;
  for (coord_lock_t *h = pool->locks; h; h = h->next) {
    post_t p = {0};
    if (is_pending(h->state)) {
      if (!h->cancel) {
        h->cancel = 1;
        h->cancel_status = COORD_ECLOSED;
      }
      if (!h->busy)
        fail(h, COORD_ECLOSED, &p);
    } else if (h->state == LK_HELD) {
      detach_watchers(h, &p);
      h->state = LK_RELEASED;
      dispose(h, 1, 0);
    } else if (h->state == LK_LOST) {
      dispose(h, 0, 0);
    }
    if (p.h != NULL)
      h->refs--;                         /* the handle stays on the list; freed below */
    assert(!p.call_acq && !p.call_lost); /* not on the event thread */
  }
  pthread_mutex_unlock(&pool->mu);

  /* 2. Wait for every call and callback in flight. */
  struct timespec dl;
  deadline_after(&dl, CLOSE_WAIT_MS);
  pthread_mutex_lock(&pool->mu);
  int quiet = wait_until(pool, all_quiet, &dl);
  /* 3. Revoke the pool's free leases (in parallel, REVOKE_TIMEOUT_MS). */
  for (lease_class_t *k = pool->classes; k; k = k->next)
    while (k->nfree > 0)
      pool_revoke(pool, k->free_ids[--k->nfree]);
  quiet = wait_until(pool, all_quiet, &dl) && quiet;
  if (!quiet) {
    pthread_mutex_unlock(&pool->mu);
    return; /* something never called back: leak rather than risk a use after free */
  }
  /* 3b. Remove the name watches (outside the mutex: removal waits for a
   * callback in progress, which takes the mutex). */
  name_watch_t *nws = pool->nws;
  pool->nws = NULL;
  pthread_mutex_unlock(&pool->mu);
  while (nws != NULL) {
    name_watch_t *nw = nws;
    nws = nw->next;
    /* taken under the mutex: a failing nw_cb removes its own watcher once
     * it has set nw->w to NULL, and a watcher must be removed once */
    pthread_mutex_lock(&pool->mu);
    coord__watcher_t *w = nw->w;
    nw->w = NULL;
    pthread_mutex_unlock(&pool->mu);
    if (w != NULL)
      coord__watch_remove(w);
    nw_free(nw);
  }

  /* 4. Barrier: a lease-lost callback that was already running is over. */
  pthread_mutex_lock(&pool->mu);
  pool->barrier_done = 0;
  pthread_mutex_unlock(&pool->mu);
  coord__after(c, 0, barrier_fn, pool);
  struct timespec dl2;
  deadline_after(&dl2, 5000);
  pthread_mutex_lock(&pool->mu);
  int passed = wait_until(pool, barrier_passed, &dl2);
  quiet = quiet && all_quiet(pool);
  pthread_mutex_unlock(&pool->mu);
  if (!quiet || !passed)
    return; /* something never called back: leak rather than risk a use after free */

  /* 5. Free everything, including handles the user did not unlock. */
  while (pool->locks != NULL) {
    coord_lock_t *h = pool->locks;
    list_remove(pool, h);
    h->nw = NULL; /* freed in step 3b */
    lock_free(h);
  }
  while (pool->classes != NULL) {
    lease_class_t *k = pool->classes;
    pool->classes = k->next;
    free(k);
  }
  pthread_mutex_destroy(&pool->mu);
  pthread_cond_destroy(&pool->cond);
  free(pool);
}
