/*
 * lock_deadline.c — checks coord_lease_deadline and coord_lock_deadline
 * against a real etcd ($COORD_ENDPOINTS), for tests/test_coord_lock.py.
 * Every line of output is flushed at once; times are CLOCK_MONOTONIC ms,
 * comparable between processes on one machine.
 *
 *   lock_deadline checks RUN
 *       Every error path and the values while renewals succeed; prints
 *       "ok <what>" / "FAIL <what> ..." and "PASSED" if nothing failed
 *       (exit 1 otherwise).  Lock names end in RUN.
 *   lock_deadline fresh TTL_MS
 *       Grants a lease, prints "GRANTED <id>", waits for a line on stdin
 *       (the test freezes etcd meanwhile), keeps the lease alive and prints
 *       "FRESH <rc>" (no renewal answered yet), waits for another line
 *       (etcd thawed), then "KNOWN <rc> <ms_left> <ttl_ms>" once known.
 *   lock_deadline hold NAME TTL_MS
 *       Acquires NAME, prints "ACQUIRED <key> <token>", then every 20 ms
 *       "DL <now> <rc> <ms_left>" (coord_lock_deadline), and "LOST <now>"
 *       from the lost callback, until EOF on stdin; then unlocks.
 *   lock_deadline acquire NAME
 *       Acquires NAME (waits for ever), prints "ACQUIRED_AT <now>", unlocks.
 *
 * Threads: main, plus libcoord's event thread, on which on_lost runs (it
 * only prints, under stdout's own lock).
 */
#include "checks.h"
#include "coord.h"

#include <inttypes.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static char run[64];

static long long now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void die(const char *what, int rc) {
  fprintf(stderr, "lock_deadline: %s: %s (%d): %s\n", what, coord_strerror(rc), rc, coord_last_error());
  exit(2);
}

static const char *nm(const char *base) {
  static char buf[4][128];
  static int i;
  i = (i + 1) % 4;
  snprintf(buf[i], sizeof buf[i], "%s-%s", base, run);
  return buf[i];
}

static void sleep_ms(int ms) {
  poll(NULL, 0, ms);
}

/* Polls coord_lease_deadline until it answers 0 (or 5 s). */
static int lease_deadline_known(coord_t *c, int64_t id, int64_t *left, int64_t *ttl) {
  int rc = COORD_EUNAVAILABLE;
  for (int i = 0; i < 250 && rc == COORD_EUNAVAILABLE; i++) {
    rc = coord_lease_deadline(c, id, left, ttl);
    if (rc == COORD_EUNAVAILABLE)
      sleep_ms(20);
  }
  return rc;
}

static struct { int done, status; } acq;

static void acquired(coord_lock_t *lock, int status, void *arg) {
  (void)lock, (void)arg;
  __atomic_store_n(&acq.status, status, __ATOMIC_SEQ_CST);
  __atomic_store_n(&acq.done, 1, __ATOMIC_SEQ_CST);
}

static int lost_seen;

static void lost_flag(coord_lock_t *lock, void *arg) {
  (void)lock, (void)arg;
  __atomic_store_n(&lost_seen, 1, __ATOMIC_SEQ_CST);
}

static int cmd_checks(coord_t *c) {
  int64_t left = 77, ttl = 77;

  /* --- lease level: arguments */
  EQ(coord_lease_deadline(NULL, 1, &left, &ttl), COORD_EINVAL, "lease_deadline: NULL client");
  EQ(left, 0, "lease_deadline: ms_left zeroed on error");
  EQ(ttl, 0, "lease_deadline: ttl_ms zeroed on error");
  EQ(coord_lease_deadline(c, 0, &left, NULL), COORD_EINVAL, "lease_deadline: lease id 0");
  EQ(coord_lease_deadline(c, -5, &left, NULL), COORD_EINVAL, "lease_deadline: negative lease id");
  EQ(coord_lease_deadline(c, 1, NULL, NULL), COORD_EINVAL, "lease_deadline: NULL ms_left");
  /* no lease kept yet at all (the lease subsystem does not exist yet) */
  EQ(coord_lease_deadline(c, 0x1234, &left, NULL), COORD_ENOTFOUND, "lease_deadline: unknown lease");

  /* --- a kept lease */
  int64_t id = 0, other = 0;
  int rc = coord_lease_grant(c, 3000, &id);
  if (rc)
    die("grant", rc);
  rc = coord_lease_grant(c, 3000, &other);
  if (rc)
    die("grant", rc);
  EQ(coord_lease_keepalive(c, id, NULL, NULL), 0, "keepalive");
  EQ(coord_lease_deadline(c, other, &left, NULL), COORD_ENOTFOUND, "lease_deadline: granted, not kept");
  rc = lease_deadline_known(c, id, &left, &ttl);
  EQ(rc, 0, "lease_deadline: known after the first renewal");
  int64_t granted = 0, remaining = 0;
  EQ(coord_lease_ttl(c, id, &remaining, &granted), 0, "lease_ttl");
  EQ(ttl, granted, "lease_deadline: ttl_ms is the TTL etcd granted");
  CHECK(left > 0 && left <= ttl, "lease_deadline: 0 < ms_left (%lld) <= ttl (%lld)", (long long)left,
        (long long)ttl);
  EQ(coord_lease_deadline(c, id, &left, NULL), 0, "lease_deadline: ttl_ms may be NULL");

  /* While renewals succeed (every TTL/3) ms_left stays above about 2/3 of
   * the TTL (less a tick and a round trip), never above the TTL, and never
   * above what etcd itself says is left (etcd truncates to whole seconds:
   * its remaining + 1 s is an upper bound). */
  int64_t lo = INT64_MAX, hi = 0, over_etcd = 0;
  long long t_end = now_ms() + 2 * ttl + 500;
  int samples = 0, compared = 0;
  while (now_ms() < t_end) {
    int64_t l = 0;
    rc = coord_lease_deadline(c, id, &l, NULL);
    if (rc)
      break;
    lo = l < lo ? l : lo;
    hi = l > hi ? l : hi;
    if (samples % 5 == 0) {
      /* etcd's answer is compared with the deadline read after it, valid
       * only if no renewal was answered in between (it did not go up) */
      int64_t rem = 0, l2 = 0;
      if (coord_lease_ttl(c, id, &rem, NULL) == 0 && coord_lease_deadline(c, id, &l2, NULL) == 0 && l2 <= l) {
        compared++;
        if (l2 > rem + 1000 && l2 - (rem + 1000) > over_etcd)
          over_etcd = l2 - (rem + 1000);
      }
    }
    samples++;
    sleep_ms(20);
  }
  EQ(rc, 0, "lease_deadline: answers 0 for two TTLs of renewals");
  CHECK(hi <= ttl, "lease_deadline: never above the TTL (max %lld, ttl %lld)", (long long)hi, (long long)ttl);
  CHECK(lo > ttl / 2 - 300, "lease_deadline: renewals keep it above ~2/3 TTL (min %lld ms, ttl %lld)",
        (long long)lo, (long long)ttl);
  CHECK(compared >= 5, "lease_deadline: compared with etcd's TimeToLive %d times", compared);
  EQ(over_etcd, 0, "lease_deadline: never promises more than etcd's own remaining TTL (+1 s rounding)");

  /* stopped, and revoked: not kept any more */
  EQ(coord_lease_keepalive_stop(c, id), 0, "keepalive_stop");
  EQ(coord_lease_deadline(c, id, &left, &ttl), COORD_ENOTFOUND, "lease_deadline: after keepalive_stop");
  EQ(coord_lease_keepalive(c, id, NULL, NULL), 0, "keepalive again");
  rc = lease_deadline_known(c, id, &left, &ttl);
  EQ(rc, 0, "lease_deadline: known again after keeping it again");
  EQ(coord_lease_revoke(c, id), 0, "revoke");
  EQ(coord_lease_deadline(c, id, &left, NULL), COORD_ENOTFOUND, "lease_deadline: after revoke");
  coord_lease_revoke(c, other);

  /* --- lock level */
  left = ttl = 77;
  EQ(coord_lock_deadline(NULL, &left, &ttl), COORD_EINVAL, "lock_deadline: NULL lock");
  EQ(left, 0, "lock_deadline: ms_left zeroed on error");
  EQ(ttl, 0, "lock_deadline: ttl_ms zeroed on error");
  coord_lock_t *l = NULL;
  rc = coord_lock_acquire(c, nm("dl"), 3000, 10000, &l);
  if (rc)
    die("acquire", rc);
  EQ(coord_lock_deadline(l, NULL, NULL), COORD_EINVAL, "lock_deadline: NULL ms_left");
  rc = coord_lock_deadline(l, &left, &ttl);
  EQ(rc, 0, "lock_deadline: held");
  CHECK(left > 0 && left <= 3000, "lock_deadline: 0 < ms_left (%lld) <= 3000", (long long)left);
  for (int i = 0; i < 100 && ttl == 0; i++) { /* the TTL is known from the first renewal */
    sleep_ms(20);
    coord_lock_deadline(l, &left, &ttl);
  }
  EQ(ttl, 3000, "lock_deadline: ttl_ms");
  EQ(coord_lock_deadline(l, &left, NULL), 0, "lock_deadline: ttl_ms may be NULL");

  /* a queued waiter has a deadline too (its place in the queue) */
  coord_lock_t *w = NULL;
  EQ(coord_lock_acquire_async(c, nm("dl"), 3000, acquired, NULL, &w), 0, "acquire_async (queued)");
  rc = COORD_ENOTFOUND;
  for (int i = 0; i < 250 && rc == COORD_ENOTFOUND; i++) { /* no lease yet: ENOTFOUND */
    rc = coord_lock_deadline(w, &left, NULL);
    if (rc == COORD_ENOTFOUND)
      sleep_ms(20);
  }
  EQ(rc, 0, "lock_deadline: queued waiter");
  EQ(coord_lock_state(w), 1, "waiter still waiting");
  coord_lock_cancel(w);
  for (int i = 0; i < 250 && !__atomic_load_n(&acq.done, __ATOMIC_SEQ_CST); i++)
    sleep_ms(20);
  EQ(acq.status, COORD_ECANCELED, "cancelled waiter's callback");
  EQ(coord_lock_deadline(w, &left, NULL), COORD_ECANCELED, "lock_deadline: failed acquire gives its code");
  coord_lock_unlock(w);

  /* lost: its key deleted behind its back */
  coord_lock_on_lost(l, lost_flag, NULL);
  EQ(coord_kv_delete(c, coord_lock_key(l), NULL, NULL), 0, "delete the holder key");
  for (int i = 0; i < 250 && !__atomic_load_n(&lost_seen, __ATOMIC_SEQ_CST); i++)
    sleep_ms(20);
  CHECK(__atomic_load_n(&lost_seen, __ATOMIC_SEQ_CST), "lost callback");
  EQ(coord_lock_deadline(l, &left, &ttl), COORD_ELOST, "lock_deadline: lost");
  EQ(left, 0, "lock_deadline: ms_left 0 when lost");
  EQ(coord_lock_unlock(l), COORD_ELOST, "unlock of a lost lock");

  if (failures == 0)
    printf("PASSED\n");
  fflush(stdout);
  return failures ? 1 : 0;
}

static int wait_line(void) {
  char line[256];
  return fgets(line, sizeof line, stdin) != NULL;
}

static int cmd_fresh(coord_t *c, long long ttl_ms) {
  int64_t id = 0;
  int rc = coord_lease_grant(c, ttl_ms, &id);
  if (rc)
    die("grant", rc);
  printf("GRANTED %" PRIx64 "\n", (uint64_t)id);
  fflush(stdout);
  if (!wait_line())
    return 1;
  rc = coord_lease_keepalive(c, id, NULL, NULL);
  if (rc)
    die("keepalive", rc);
  sleep_ms(300); /* the first renewal is out by now, unanswered */
  int64_t left = 0, ttl = 0;
  printf("FRESH %d\n", coord_lease_deadline(c, id, &left, &ttl));
  fflush(stdout);
  if (!wait_line())
    return 1;
  rc = lease_deadline_known(c, id, &left, &ttl);
  printf("KNOWN %d %lld %lld\n", rc, (long long)left, (long long)ttl);
  fflush(stdout);
  coord_lease_revoke(c, id);
  return 0;
}

static void on_lost_print(coord_lock_t *lock, void *arg) {
  (void)lock, (void)arg;
  printf("LOST %lld\n", now_ms());
  fflush(stdout);
}

static int cmd_hold(coord_t *c, const char *name, long long ttl_ms) {
  coord_lock_t *l = NULL;
  int rc = coord_lock_acquire(c, name, ttl_ms, -1, &l);
  if (rc)
    die("acquire", rc);
  coord_lock_on_lost(l, on_lost_print, NULL);
  printf("ACQUIRED %s %lld\n", coord_lock_key(l), (long long)coord_lock_token(l));
  fflush(stdout);
  for (;;) {
    int64_t left = 0;
    long long t = now_ms();
    rc = coord_lock_deadline(l, &left, NULL);
    printf("DL %lld %d %lld\n", t, rc, (long long)left);
    fflush(stdout);
    struct pollfd pf = {0, POLLIN, 0};
    if (poll(&pf, 1, 20) > 0) {
      char buf[256];
      if (read(0, buf, sizeof buf) <= 0)
        break;
    }
  }
  rc = coord_lock_unlock(l);
  printf("RELEASED %d\n", rc);
  fflush(stdout);
  return 0;
}

static int cmd_acquire(coord_t *c, const char *name) {
  coord_lock_t *l = NULL;
  int rc = coord_lock_acquire(c, name, 0, -1, &l);
  if (rc)
    die("acquire", rc);
  printf("ACQUIRED_AT %lld\n", now_ms());
  fflush(stdout);
  coord_lock_unlock(l);
  return 0;
}

int main(int argc, char **argv) {
  if (argc < 3) {
    fprintf(stderr, "usage: lock_deadline checks RUN | fresh TTL_MS | hold NAME TTL_MS | acquire NAME\n");
    return 2;
  }
  coord_t *c = NULL;
  int rc = coord_new(NULL, &c);
  if (rc)
    die("coord_new", rc);
  int ret = 2;
  if (!strcmp(argv[1], "checks")) {
    snprintf(run, sizeof run, "%s", argv[2]);
    ret = cmd_checks(c);
  } else if (!strcmp(argv[1], "fresh")) {
    ret = cmd_fresh(c, atoll(argv[2]));
  } else if (!strcmp(argv[1], "hold") && argc > 3) {
    ret = cmd_hold(c, argv[2], atoll(argv[3]));
  } else if (!strcmp(argv[1], "acquire")) {
    ret = cmd_acquire(c, argv[2]);
  } else {
    fprintf(stderr, "lock_deadline: unknown command %s\n", argv[1]);
  }
  coord_close(c);
  return ret;
}
