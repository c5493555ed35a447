/*
 * lock_checks.c — API checks of libcoord's locks against a real etcd
 * ($COORD_ENDPOINTS), run by tests/test_lock.py: every documented error
 * code, NULL and invalid arguments, handle accessors, notes, TTLs, guarded
 * writes, loss by key deletion, async acquire/cancel/unlock-in-callback,
 * namespaces, and coord_close with locks still open.
 *
 * Prints "ok <what>" per check, "FAIL <what> ..." on failure; exits 1 if
 * anything failed.  Lock names are made unique with argv[1] (a run id).
 */
#include "checks.h"
#include "coord.h"

#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static char run[64];

static const char *nm(const char *base) {
  static __thread char buf[8][128];
  static __thread int i;
  i = (i + 1) % 8;
  snprintf(buf[i], sizeof buf[i], "%s-%s", base, run);
  return buf[i];
}

/* Number of keys under /locks/<name>/ as seen by client c. */
static int64_t nkeys(coord_t *c, const char *name) {
  char p[256];
  snprintf(p, sizeof p, "/locks/%s/", name);
  coord_range_opts_t o;
  memset(&o, 0, sizeof o);
  o.prefix = 1;
  o.count_only = 1;
  coord_kv_result_t *r = NULL;
  if (coord_kv_get(c, p, &o, &r))
    return -1;
  int64_t n = r->count;
  coord_kv_result_free(r);
  return n;
}

static void wait_keys(coord_t *c, const char *name, int64_t want) {
  for (int i = 0; i < 200 && nkeys(c, name) != want; i++)
    usleep(10 * 1000);
}

typedef struct waiter {
  pthread_mutex_t mu;
  pthread_cond_t cv;
  int calls;
  int status;
  int lost;
  int unlock_in_cb;
  int unlock_rc;
} waiter_t;

static void waiter_init(waiter_t *w) {
  memset(w, 0, sizeof *w);
  pthread_mutex_init(&w->mu, NULL);
  pthread_cond_init(&w->cv, NULL);
}

static void acq_cb(coord_lock_t *lock, int status, void *arg) {
  waiter_t *w = arg;
  int urc = 0;
  if (w->unlock_in_cb)
    urc = coord_lock_unlock(lock);
  pthread_mutex_lock(&w->mu);
  w->calls++;
  w->status = status;
  w->unlock_rc = urc;
  pthread_cond_broadcast(&w->cv);
  pthread_mutex_unlock(&w->mu);
}

static void lost_cb(coord_lock_t *lock, void *arg) {
  waiter_t *w = arg;
  (void)lock;
  pthread_mutex_lock(&w->mu);
  w->lost++;
  pthread_cond_broadcast(&w->cv);
  pthread_mutex_unlock(&w->mu);
}

/* Waits up to ms for *field >= 1; returns it. */
static int wait_field(waiter_t *w, int *field, int ms) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  ts.tv_sec += ms / 1000;
  ts.tv_nsec += (long)(ms % 1000) * 1000000L;
  if (ts.tv_nsec >= 1000000000L)
    ts.tv_sec++, ts.tv_nsec -= 1000000000L;
  pthread_mutex_lock(&w->mu);
  while (*field == 0)
    if (pthread_cond_timedwait(&w->cv, &w->mu, &ts) != 0)
      break;
  int v = *field;
  pthread_mutex_unlock(&w->mu);
  return v;
}

static void check_invalid(coord_t *c) {
  coord_lock_t *l = (coord_lock_t *)&l; /* must be reset to NULL */
  EQ(coord_lock_acquire(NULL, "x", 0, 0, &l), COORD_EINVAL, "acquire NULL client");
  CHECK(l == NULL, "acquire resets *out on error");
  EQ(coord_lock_acquire(c, NULL, 0, 0, &l), COORD_EINVAL, "acquire NULL name");
  EQ(coord_lock_acquire(c, "", 0, 0, &l), COORD_EINVAL, "acquire empty name");
  EQ(coord_lock_acquire(c, "a/b", 0, 0, &l), COORD_EINVAL, "acquire name with '/'");
  EQ(coord_lock_acquire(c, "x", 0, 0, NULL), COORD_EINVAL, "acquire NULL out");
  EQ(coord_lock_acquire(c, "x", -1, 0, &l), COORD_EINVAL, "acquire negative TTL");
  EQ(coord_lock_acquire(c, "x", 0, -2, &l), COORD_EINVAL, "acquire timeout < -1");
  EQ(coord_lock_try_acquire(NULL, "x", 0, &l), COORD_EINVAL, "try NULL client");
  EQ(coord_lock_try_acquire(c, "", 0, &l), COORD_EINVAL, "try empty name");
  EQ(coord_lock_try_acquire(c, "/", 0, &l), COORD_EINVAL, "try name '/'");
  EQ(coord_lock_try_acquire(c, "x", -5, &l), COORD_EINVAL, "try negative TTL");
  EQ(coord_lock_try_acquire(c, "x", 0, NULL), COORD_EINVAL, "try NULL out");
  waiter_t w;
  waiter_init(&w);
  EQ(coord_lock_acquire_async(c, "x", 0, NULL, &w, &l), COORD_EINVAL, "async NULL callback");
  EQ(coord_lock_acquire_async(NULL, "x", 0, acq_cb, &w, &l), COORD_EINVAL, "async NULL client");
  EQ(coord_lock_acquire_async(c, "x/", 0, acq_cb, &w, &l), COORD_EINVAL, "async bad name");
  EQ(coord_lock_acquire_async(c, "x", -1, acq_cb, &w, &l), COORD_EINVAL, "async negative TTL");
  EQ(coord_lock_acquire_async(c, "x", 0, acq_cb, &w, NULL), COORD_EINVAL, "async NULL out");
  EQ(coord_lock_unlock(NULL), COORD_EINVAL, "unlock NULL");
  int64_t ms = 0;
  EQ(coord_lock_ttl(NULL, &ms), COORD_EINVAL, "ttl NULL lock");
  CHECK(coord_lock_key(NULL) == NULL, "key NULL lock");
  EQ(coord_lock_token(NULL), 0, "token NULL lock");
  EQ(coord_lock_state(NULL), COORD_EINVAL, "state NULL lock");
  EQ(coord_lock_set_note(NULL, "a", 1), COORD_EINVAL, "set_note NULL lock");
  coord_lock_cancel(NULL);
  coord_lock_on_lost(NULL, lost_cb, &w);
  CHECK(1, "cancel/on_lost NULL do not crash");
  json_t *v = json_integer(1);
  EQ(coord_config_set_guarded(NULL, NULL, "k", v), COORD_EINVAL, "guarded NULL client");
  EQ(coord_config_set_guarded(c, NULL, "k", v), COORD_EINVAL, "guarded NULL lock");
  json_decref(v);
}

static void check_basics(coord_t *c, coord_t *c2) {
  const char *name = nm("basic");
  coord_lock_t *l = NULL;
  EQ(coord_lock_acquire(c, name, 0, 0, &l), 0, "acquire free lock");
  if (!l)
    return;
  const char *key = coord_lock_key(l);
  char pfx[256];
  snprintf(pfx, sizeof pfx, "/locks/%s/", name);
  CHECK(key && strncmp(key, pfx, strlen(pfx)) == 0 &&
            strspn(key + strlen(pfx), "0123456789abcdef") == strlen(key + strlen(pfx)),
        "key is /locks/<name>/<lower-case hex> (%s)", key ? key : "(null)");
  EQ(coord_lock_state(l), 0, "state of a held lock");
  coord_kv_result_t *r = NULL;
  CHECK(coord_kv_get(c2, key, NULL, &r) == 0 && r->n == 1, "holder key exists in etcd");
  if (r && r->n == 1) {
    EQ(coord_lock_token(l), r->kvs[0].create_revision, "token == holder key's create revision");
    char hex[32];
    snprintf(hex, sizeof hex, "%" PRIx64, (uint64_t)r->kvs[0].lease);
    CHECK(strcmp(key + strlen(pfx), hex) == 0, "key's hex is its lease (%s)", hex);
  }
  coord_kv_result_free(r);
  int64_t ms = -1;
  EQ(coord_lock_ttl(l, &ms), 0, "ttl of held lock");
  CHECK(ms > 0 && ms <= COORD_LOCK_DEFAULT_TTL_MS, "default TTL is 10 s (remaining %lld ms)", (long long)ms);
  EQ(coord_lock_ttl(l, NULL), COORD_EINVAL, "ttl NULL out");
  EQ(coord_lock_set_note(l, NULL, 3), COORD_EINVAL, "set_note NULL with length");
  EQ(coord_lock_set_note(l, "deploy by ci", 12), 0, "set_note");
  r = NULL;
  CHECK(coord_kv_get(c2, key, NULL, &r) == 0 && r->n == 1 && r->kvs[0].value_len == 12 &&
            memcmp(r->kvs[0].value, "deploy by ci", 12) == 0,
        "note is the holder key's value");
  if (r && r->n == 1) {
    EQ(r->kvs[0].create_revision, coord_lock_token(l), "note keeps the create revision");
    CHECK(r->kvs[0].lease != 0, "note keeps the lease");
  }
  coord_kv_result_free(r);

  /* try_acquire / timeout on a held lock leave no key */
  coord_lock_t *l2 = (coord_lock_t *)&l2;
  EQ(coord_lock_try_acquire(c2, name, 0, &l2), COORD_ELOCKED, "try_acquire of a held lock");
  CHECK(l2 == NULL, "try_acquire failure leaves *out NULL");
  EQ(nkeys(c2, name), 1, "failed try_acquire leaves no key");
  int64_t t0 = 0;
  {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    t0 = ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
  }
  EQ(coord_lock_acquire(c2, name, 0, 300, &l2), COORD_ETIMEDOUT, "acquire times out");
  {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    int64_t el = ts.tv_sec * 1000 + ts.tv_nsec / 1000000 - t0;
    CHECK(el >= 300 && el < 3000, "timeout honoured (%lld ms)", (long long)el);
  }
  EQ(nkeys(c2, name), 1, "timed-out waiter leaves no key");

  /* guarded writes */
  json_t *v = json_string("v1");
  EQ(coord_config_set_guarded(c, l, "", v), COORD_EINVAL, "guarded empty key");
  EQ(coord_config_set_guarded(c, l, "/abs", v), COORD_EINVAL, "guarded key with leading '/'");
  EQ(coord_config_set_guarded(c, l, "k", NULL), COORD_EINVAL, "guarded NULL value");
  EQ(coord_config_set_guarded(c2, l, "k", v), COORD_EINVAL, "guarded with another client's lock");
  char ck[128];
  snprintf(ck, sizeof ck, "guard/%s", name);
  EQ(coord_config_set_guarded(c, l, ck, v), 0, "guarded write while held");
  json_t *got = NULL;
  CHECK(coord_config_get(c2, ck, &got) == 0 && json_is_string(got) &&
            strcmp(json_string_value(got), "v1") == 0,
        "guarded write stored");
  json_decref(got);
  json_decref(v);

  EQ(coord_lock_unlock(l), 0, "unlock held lock");
  EQ(nkeys(c2, name), 0, "unlock deletes the key");
  EQ(coord_lock_try_acquire(c2, name, 1500, &l2), 0, "try_acquire of a free lock");
  if (l2) {
    ms = 0;
    EQ(coord_lock_ttl(l2, &ms), 0, "ttl 1500 ms");
    CHECK(ms > 0 && ms <= 2000, "1500 ms rounds up to 2 s (remaining %lld)", (long long)ms);
    EQ(coord_lock_unlock(l2), 0, "unlock");
  }
}

static void check_lost(coord_t *c, coord_t *c2) {
  const char *name = nm("lost");
  coord_lock_t *l = NULL;
  EQ(coord_lock_acquire(c, name, 5000, 0, &l), 0, "acquire");
  if (!l)
    return;
  waiter_t w;
  waiter_init(&w);
  coord_lock_on_lost(l, lost_cb, &w);
  /* a waiter from the other client */
  waiter_t w2;
  waiter_init(&w2);
  coord_lock_t *l2 = NULL;
  EQ(coord_lock_acquire_async(c2, name, 0, acq_cb, &w2, &l2), 0, "async acquire (queued)");
  wait_keys(c, name, 2);
  EQ(coord_lock_state(l2), 1, "state of a waiter");
  EQ(w2.calls, 0, "waiter not called while held");
  EQ(coord_kv_delete(c2, coord_lock_key(l), NULL, NULL), 0, "delete the holder key behind its back");
  EQ(wait_field(&w, &w.lost, 5000), 1, "lost callback called once");
  EQ(coord_lock_state(l), COORD_ELOST, "state after loss");
  json_t *v = json_string("late");
  EQ(coord_config_set_guarded(c, l, "k", v), COORD_ELOST, "guarded write of a lost lock");
  json_decref(v);
  EQ(coord_lock_set_note(l, "x", 1), COORD_ELOST, "set_note of a lost lock");
  int64_t ms;
  EQ(coord_lock_ttl(l, &ms), COORD_ELOST, "ttl of a lost lock");
  EQ(wait_field(&w2, &w2.calls, 5000), 1, "next waiter granted");
  EQ(w2.status, 0, "next waiter status 0");
  EQ(coord_lock_state(l2), 0, "next waiter holds");
  EQ(coord_lock_unlock(l), COORD_ELOST, "unlock of a lost lock");
  usleep(100 * 1000);
  EQ(w.lost, 1, "lost callback not called again");
  EQ(coord_lock_unlock(l2), 0, "unlock the waiter");
  EQ(w2.calls, 1, "acquire callback called exactly once");
}

static void check_async(coord_t *c, coord_t *c2) {
  const char *name = nm("async");
  coord_lock_t *h = NULL;
  EQ(coord_lock_acquire(c, name, 0, 0, &h), 0, "holder");
  /* cancel: callback ECANCELED, key gone */
  waiter_t w;
  waiter_init(&w);
  coord_lock_t *l = NULL;
  EQ(coord_lock_acquire_async(c2, name, 0, acq_cb, &w, &l), 0, "async acquire");
  wait_keys(c, name, 2);
  EQ(nkeys(c, name), 2, "waiter queued");
  coord_lock_cancel(l);
  EQ(wait_field(&w, &w.calls, 5000), 1, "cancel calls back");
  EQ(w.status, COORD_ECANCELED, "cancel status");
  EQ(nkeys(c, name), 1, "cancelled waiter's key is gone when told");
  EQ(coord_lock_state(l), COORD_ECANCELED, "state after cancel");
  coord_lock_cancel(l); /* again: no-op */
  EQ(coord_lock_unlock(l), 0, "unlock a cancelled handle");
  usleep(50 * 1000);
  EQ(w.calls, 1, "callback called exactly once");

  /* unlock of a pending waiter: no callback ever */
  waiter_init(&w);
  EQ(coord_lock_acquire_async(c2, name, 0, acq_cb, &w, &l), 0, "async acquire");
  wait_keys(c, name, 2);
  EQ(coord_lock_unlock(l), 0, "unlock pending");
  EQ(nkeys(c, name), 1, "unlocked waiter's key is gone");
  usleep(100 * 1000);
  EQ(w.calls, 0, "no callback after unlock");

  /* unlock from inside the callback, on the event thread */
  waiter_init(&w);
  w.unlock_in_cb = 1;
  EQ(coord_lock_acquire_async(c2, name, 0, acq_cb, &w, &l), 0, "async acquire");
  wait_keys(c, name, 2);
  EQ(coord_lock_unlock(h), 0, "release holder");
  EQ(wait_field(&w, &w.calls, 5000), 1, "waiter granted");
  EQ(w.status, 0, "granted status");
  EQ(w.unlock_rc, 0, "unlock inside the callback");
  wait_keys(c, name, 0);
  EQ(nkeys(c, name), 0, "key gone after unlock in callback");

  /* a held lock cannot be cancelled */
  waiter_init(&w);
  EQ(coord_lock_acquire_async(c2, name, 0, acq_cb, &w, &l), 0, "async acquire of free lock");
  EQ(wait_field(&w, &w.calls, 5000), 1, "granted");
  coord_lock_cancel(l);
  EQ(coord_lock_state(l), 0, "cancel of a held lock is a no-op");
  EQ(coord_lock_unlock(l), 0, "unlock");
}

static void check_fifo_same_client(coord_t *c) {
  const char *name = nm("order");
  enum { N = 5 };
  coord_lock_t *h = NULL;
  EQ(coord_lock_acquire(c, name, 0, 0, &h), 0, "holder");
  waiter_t w[N];
  coord_lock_t *l[N];
  for (int i = 0; i < N; i++) {
    waiter_init(&w[i]);
    coord_lock_acquire_async(c, name, 0, acq_cb, &w[i], &l[i]);
    wait_keys(c, name, i + 2);
  }
  EQ(nkeys(c, name), N + 1, "all queued");
  coord_lock_unlock(h);
  int ok = 1;
  for (int i = 0; i < N; i++) {
    if (wait_field(&w[i], &w[i].calls, 5000) != 1 || w[i].status != 0)
      ok = 0;
    for (int j = i + 1; j < N; j++)
      if (w[j].calls != 0)
        ok = 0;
    usleep(30 * 1000);
    for (int j = i + 1; j < N; j++)
      if (w[j].calls != 0)
        ok = 0;
    coord_lock_unlock(l[i]);
  }
  CHECK(ok, "waiters of one client granted in queue order, one at a time");
}

static void check_namespace(const char *endpoints, coord_t *plain) {
  coord_config_t cfg = coord_default_config();
  cfg.endpoints = endpoints;
  cfg.prefix = "/ns1";
  coord_t *c = NULL;
  EQ(coord_new(&cfg, &c), 0, "client with namespace");
  if (!c)
    return;
  const char *name = nm("ns");
  coord_lock_t *l = NULL;
  EQ(coord_lock_acquire(c, name, 0, 0, &l), 0, "acquire in namespace");
  char pfx[256];
  snprintf(pfx, sizeof pfx, "/ns1/locks/%s/", name);
  coord_range_opts_t o;
  memset(&o, 0, sizeof o);
  o.prefix = 1;
  coord_kv_result_t *r = NULL;
  CHECK(coord_kv_get(plain, pfx, &o, &r) == 0 && r->n == 1, "key under the namespace prefix");
  coord_kv_result_free(r);
  CHECK(coord_lock_key(l) && strncmp(coord_lock_key(l), "/locks/", 7) == 0,
        "coord_lock_key has no namespace");
  coord_lock_t *l2 = NULL;
  EQ(coord_lock_try_acquire(c, name, 0, &l2), COORD_ELOCKED, "try in namespace sees holder");
  EQ(coord_lock_try_acquire(plain, name, 0, &l2), 0, "other namespace is another lock");
  if (l2)
    coord_lock_unlock(l2);
  EQ(coord_lock_unlock(l), 0, "unlock");
  coord_close(c);
}

static void check_close(const char *endpoints, coord_t *other) {
  coord_config_t cfg = coord_default_config();
  cfg.endpoints = endpoints;
  coord_t *c = NULL;
  EQ(coord_new(&cfg, &c), 0, "client to close");
  if (!c)
    return;
  const char *name = nm("close");
  coord_lock_t *held = NULL, *pend = NULL;
  EQ(coord_lock_acquire(c, name, 0, 0, &held), 0, "held at close");
  waiter_t w;
  waiter_init(&w);
  EQ(coord_lock_acquire_async(c, name, 0, acq_cb, &w, &pend), 0, "pending at close");
  wait_keys(other, name, 2);
  coord_close(c); /* frees both handles */
  EQ(w.calls, 1, "pending acquire told at close");
  EQ(w.status, COORD_ECLOSED, "with COORD_ECLOSED");
  EQ(nkeys(other, name), 0, "close released every key");
  EQ(coord_lock_try_acquire(other, name, 0, &held), 0, "lock free after close");
  if (held)
    coord_lock_unlock(held);
}

int main(int argc, char **argv) {
  snprintf(run, sizeof run, "%s", argc > 1 ? argv[1] : "r");
  setvbuf(stdout, NULL, _IOLBF, 0);
  const char *eps = getenv("COORD_ENDPOINTS");
  coord_t *c = NULL, *c2 = NULL;
  int rc = coord_new(NULL, &c);
  if (rc == 0)
    rc = coord_new(NULL, &c2);
  if (rc) {
    printf("FAIL coord_new: %s\n", coord_last_error());
    return 1;
  }
  check_invalid(c);
  check_basics(c, c2);
  check_lost(c, c2);
  check_async(c, c2);
  check_fifo_same_client(c);
  check_namespace(eps, c);
  check_close(eps, c);
  coord_close(c2);
  coord_close(c);
  printf("%s: %d failure(s)\n", failures ? "FAILED" : "PASSED", failures);
  return failures ? 1 : 0;
}
