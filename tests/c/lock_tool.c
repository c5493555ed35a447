/*
 * lock_tool.c — drives libcoord locks for tests/test_lock.py (real etcd at
 * $COORD_ENDPOINTS).  Every line of output is flushed at once.
 *
 *   lock_tool count NAME ITERS COUNTER_KEY
 *       ITERS times: acquire NAME, read COUNTER_KEY, write it + 1 (a plain
 *       non-atomic read-modify-write), release.  Prints "CS <token> <value>"
 *       for each critical section (value = the counter written).
 *   lock_tool hold NAME [TTL_MS]
 *       Acquires (waits for ever), prints "ACQUIRED <key> <token>", then
 *       obeys lines on stdin: "release" (prints "RELEASED <rc>"), "acquire"
 *       (again, after a release: "ACQUIRED ..." or "ACQFAIL <rc> <detail>"),
 *       "state" ("STATE <n>"), "ttl" ("TTL <rc> <ms>"), "note TEXT"
 *       ("NOTE <rc>"), "guard KEY VALUE" (coord_config_set_guarded with the
 *       string VALUE: "GUARD <rc>").  Prints "LOST <state>" from the lost
 *       callback.  EOF on stdin releases (if held) and exits.
 *   lock_tool try NAME            "TRY <rc> [key token]" (releases if taken)
 *   lock_tool timeout NAME MS     "RESULT <rc> <elapsed ms>"
 *   lock_tool cancel NAME MS      async acquire, cancel after MS ms:
 *                                 "CB <status> <state>"
 *   lock_tool writes NAME         store revisions advanced by an uncontended
 *                                 acquire and by its release (after one
 *                                 warm-up cycle): "WRITES <acq> <rel>"
 *   lock_tool latency NAME ITERS
 *       ITERS acquire/release cycles; prints "LAT <p50> <p90> <max>", the
 *       acquire times in microseconds (run two at once for handoffs).
 *   lock_tool stress NAME THREADS ITERS
 *       THREADS threads on two clients mix blocking acquires (with and
 *       without timeouts), try_acquire, async acquires that are cancelled,
 *       unlocked while pending or unlocked from their callback, checking
 *       that at most one holder is inside at a time and that every
 *       callback runs exactly once: "STRESS <held> <violations>".
 */
#include "coord.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static void die(const char *what, int rc) {
  fprintf(stderr, "lock_tool: %s: %s (%d): %s\n", what, coord_strerror(rc), rc, coord_last_error());
  exit(2);
}

static long long now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void on_lost(coord_lock_t *lock, void *arg) {
  (void)arg;
  printf("LOST %d\n", coord_lock_state(lock));
  fflush(stdout);
}

static int cmd_count(coord_t *c, const char *name, int iters, const char *counter) {
  for (int i = 0; i < iters; i++) {
    coord_lock_t *l = NULL;
    int rc = coord_lock_acquire(c, name, 0, -1, &l);
    if (rc)
      die("acquire", rc);
    coord_kv_result_t *r = NULL;
    rc = coord_kv_get(c, counter, NULL, &r);
    if (rc)
      die("get", rc);
    long v = r->n ? strtol(r->kvs[0].value, NULL, 10) : 0;
    coord_kv_result_free(r);
    char buf[32];
    int n = snprintf(buf, sizeof buf, "%ld", v + 1);
    rc = coord_kv_put(c, counter, buf, (size_t)n, NULL, NULL);
    if (rc)
      die("put", rc);
    printf("CS %lld %ld\n", (long long)coord_lock_token(l), v + 1);
    fflush(stdout);
    rc = coord_lock_unlock(l);
    if (rc)
      die("unlock", rc);
  }
  return 0;
}

static int cmd_hold(coord_t *c, const char *name, long long ttl) {
  coord_lock_t *l = NULL;
  int rc = coord_lock_acquire(c, name, ttl, -1, &l);
  if (rc)
    die("acquire", rc);
  coord_lock_on_lost(l, on_lost, NULL);
  printf("ACQUIRED %s %lld\n", coord_lock_key(l), (long long)coord_lock_token(l));
  fflush(stdout);
  char line[4096];
  while (fgets(line, sizeof line, stdin)) {
    line[strcspn(line, "\n")] = '\0';
    if (strcmp(line, "release") == 0) {
      rc = l ? coord_lock_unlock(l) : COORD_EINVAL;
      l = NULL;
      printf("RELEASED %d\n", rc);
    } else if (strcmp(line, "acquire") == 0) {
      if (l == NULL) {
        rc = coord_lock_acquire(c, name, ttl, -1, &l);
        if (rc) {
          printf("ACQFAIL %d %s\n", rc, coord_last_error());
        } else {
          coord_lock_on_lost(l, on_lost, NULL);
          printf("ACQUIRED %s %lld\n", coord_lock_key(l), (long long)coord_lock_token(l));
        }
      }
    } else if (l == NULL) {
      printf("NOTHELD %s\n", line);
    } else if (strcmp(line, "state") == 0) {
      printf("STATE %d\n", coord_lock_state(l));
    } else if (strcmp(line, "ttl") == 0) {
      int64_t ms = 0;
      rc = coord_lock_ttl(l, &ms);
      printf("TTL %d %lld\n", rc, (long long)ms);
    } else if (strncmp(line, "note ", 5) == 0) {
      rc = coord_lock_set_note(l, line + 5, strlen(line + 5));
      printf("NOTE %d\n", rc);
    } else if (strncmp(line, "guard ", 6) == 0) {
      char *key = line + 6;
      char *val = strchr(key, ' ');
      if (!val) {
        printf("GUARD usage\n");
      } else {
        *val++ = '\0';
        json_t *j = json_string(val);
        rc = coord_config_set_guarded(c, l, key, j);
        json_decref(j);
        printf("GUARD %d\n", rc);
      }
    } else {
      printf("UNKNOWN %s\n", line);
    }
    fflush(stdout);
  }
  if (l) {
    rc = coord_lock_unlock(l);
    printf("RELEASED %d\n", rc);
    fflush(stdout);
  }
  return 0;
}

static int cmd_try(coord_t *c, const char *name) {
  coord_lock_t *l = NULL;
  int rc = coord_lock_try_acquire(c, name, 0, &l);
  if (rc) {
    printf("TRY %d\n", rc);
  } else {
    printf("TRY 0 %s %lld\n", coord_lock_key(l), (long long)coord_lock_token(l));
    coord_lock_unlock(l);
  }
  fflush(stdout);
  return 0;
}

static int cmd_timeout(coord_t *c, const char *name, int ms) {
  coord_lock_t *l = NULL;
  long long t0 = now_ms();
  int rc = coord_lock_acquire(c, name, 0, ms, &l);
  printf("RESULT %d %lld\n", rc, now_ms() - t0);
  fflush(stdout);
  if (rc == 0)
    coord_lock_unlock(l);
  return 0;
}

static struct {
  pthread_mutex_t mu;
  pthread_cond_t cv;
  int done, status;
} cb_state = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0};

static void acquired(coord_lock_t *lock, int status, void *arg) {
  (void)lock, (void)arg;
  pthread_mutex_lock(&cb_state.mu);
  cb_state.done++;
  cb_state.status = status;
  pthread_cond_broadcast(&cb_state.cv);
  pthread_mutex_unlock(&cb_state.mu);
}

static int cmd_cancel(coord_t *c, const char *name, int ms) {
  coord_lock_t *l = NULL;
  int rc = coord_lock_acquire_async(c, name, 0, acquired, NULL, &l);
  if (rc)
    die("acquire_async", rc);
  usleep((useconds_t)ms * 1000);
  coord_lock_cancel(l);
  pthread_mutex_lock(&cb_state.mu);
  while (!cb_state.done)
    pthread_cond_wait(&cb_state.cv, &cb_state.mu);
  int st = cb_state.status;
  pthread_mutex_unlock(&cb_state.mu);
  printf("CB %d %d\n", st, coord_lock_state(l));
  fflush(stdout);
  coord_lock_unlock(l);
  return 0;
}

static int64_t revision(coord_t *c) {
  coord_status_t st;
  int rc = coord_status(c, 0, &st);
  if (rc)
    die("status", rc);
  return st.revision;
}

static int cmd_writes(coord_t *c, const char *name) {
  coord_lock_t *l = NULL;
  int rc = coord_lock_acquire(c, name, 0, -1, &l); /* warm-up: fills the lease pool */
  if (rc)
    die("acquire", rc);
  if ((rc = coord_lock_unlock(l)))
    die("unlock", rc);
  usleep(200 * 1000);
  int64_t r0 = revision(c);
  if ((rc = coord_lock_acquire(c, name, 0, -1, &l)))
    die("acquire", rc);
  int64_t r1 = revision(c);
  if ((rc = coord_lock_unlock(l)))
    die("unlock", rc);
  int64_t r2 = revision(c);
  printf("WRITES %lld %lld\n", (long long)(r1 - r0), (long long)(r2 - r1));
  fflush(stdout);
  return 0;
}

static int cmp_ll(const void *a, const void *b) {
  long long x = *(const long long *)a, y = *(const long long *)b;
  return x < y ? -1 : x > y;
}

static int cmd_latency(coord_t *c, const char *name, int iters) {
  long long *lat = calloc((size_t)iters, sizeof *lat);
  if (!lat || iters <= 0)
    return 2;
  for (int i = 0; i < iters; i++) {
    struct timespec a, b;
    coord_lock_t *l = NULL;
    clock_gettime(CLOCK_MONOTONIC, &a);
    int rc = coord_lock_acquire(c, name, 0, -1, &l);
    clock_gettime(CLOCK_MONOTONIC, &b);
    if (rc)
      die("acquire", rc);
    lat[i] = (b.tv_sec - a.tv_sec) * 1000000LL + (b.tv_nsec - a.tv_nsec) / 1000;
    if ((rc = coord_lock_unlock(l)))
      die("unlock", rc);
  }
  qsort(lat, (size_t)iters, sizeof *lat, cmp_ll);
  printf("LAT %lld %lld %lld\n", lat[iters / 2], lat[iters * 9 / 10], lat[iters - 1]);
  fflush(stdout);
  free(lat);
  return 0;
}

/* ---------------------------------------------------------------- stress */

static coord_t *stress_c[2];
static const char *stress_name;
static int stress_iters;
static int inside, violations, held_count;
static pthread_mutex_t stress_mu = PTHREAD_MUTEX_INITIALIZER;

static void enter_exit(void) {
  pthread_mutex_lock(&stress_mu);
  if (++inside != 1)
    violations++;
  held_count++;
  pthread_mutex_unlock(&stress_mu);
  usleep(500);
  pthread_mutex_lock(&stress_mu);
  inside--;
  pthread_mutex_unlock(&stress_mu);
}

typedef struct scb {
  pthread_mutex_t mu;
  pthread_cond_t cv;
  int calls, status, unlock_in_cb;
} scb_t;

static void stress_cb(coord_lock_t *lock, int status, void *arg) {
  scb_t *s = arg;
  if (status == 0 && s->unlock_in_cb) {
    /* held: a (very short) critical section on the event thread */
    pthread_mutex_lock(&stress_mu);
    if (++inside != 1)
      violations++;
    held_count++;
    inside--;
    pthread_mutex_unlock(&stress_mu);
    coord_lock_unlock(lock);
  }
  pthread_mutex_lock(&s->mu);
  s->calls++;
  s->status = status;
  pthread_cond_broadcast(&s->cv);
  pthread_mutex_unlock(&s->mu);
}

static void *stress_thread(void *arg) {
  long id = (long)arg;
  unsigned seed = (unsigned)id * 7919u + 17u;
  coord_t *c = stress_c[id % 2];
  for (int i = 0; i < stress_iters; i++) {
    int what = (int)(rand_r(&seed) % 6);
    coord_lock_t *l = NULL;
    int rc;
    if (what == 0 || what == 1) {
      rc = coord_lock_acquire(c, stress_name, 0, what == 0 ? -1 : (int)(rand_r(&seed) % 30) + 1, &l);
      if (rc == 0) {
        enter_exit();
        coord_lock_unlock(l);
      } else if (rc != COORD_ETIMEDOUT) {
        die("stress acquire", rc);
      }
    } else if (what == 2) {
      rc = coord_lock_try_acquire(c, stress_name, 0, &l);
      if (rc == 0) {
        enter_exit();
        coord_lock_unlock(l);
      } else if (rc != COORD_ELOCKED) {
        die("stress try", rc);
      }
    } else {
      scb_t s = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0, what == 5};
      rc = coord_lock_acquire_async(c, stress_name, 0, stress_cb, &s, &l);
      if (rc)
        die("stress async", rc);
      usleep((useconds_t)(rand_r(&seed) % 3000));
      if (what == 3) {
        coord_lock_cancel(l);
        pthread_mutex_lock(&s.mu);
        while (!s.calls)
          pthread_cond_wait(&s.cv, &s.mu);
        pthread_mutex_unlock(&s.mu);
        if (s.status == 0)
          enter_exit();
        else if (s.status != COORD_ECANCELED)
          die("stress cancel status", s.status);
        coord_lock_unlock(l);
      } else if (what == 4) {
        coord_lock_unlock(l); /* pending or held: no callback after this */
        pthread_mutex_lock(&s.mu);
        int calls = s.calls, st = s.status;
        pthread_mutex_unlock(&s.mu);
        usleep(2000);
        pthread_mutex_lock(&s.mu);
        if (s.calls != calls || calls > 1)
          violations++;
        pthread_mutex_unlock(&s.mu);
        (void)st;
      } else {
        pthread_mutex_lock(&s.mu);
        while (!s.calls)
          pthread_cond_wait(&s.cv, &s.mu);
        pthread_mutex_unlock(&s.mu);
        if (s.status != 0)
          die("stress async status", s.status);
      }
      usleep(3000); /* a late second callback would show here */
      pthread_mutex_lock(&s.mu);
      if (s.calls > 1)
        violations++;
      pthread_mutex_unlock(&s.mu);
    }
  }
  return NULL;
}

static int cmd_stress(coord_t *c, const char *name, int threads, int iters) {
  stress_c[0] = c;
  int rc = coord_new(NULL, &stress_c[1]);
  if (rc)
    die("coord_new", rc);
  stress_name = name;
  stress_iters = iters;
  pthread_t t[64];
  if (threads > 64)
    threads = 64;
  for (long i = 0; i < threads; i++)
    pthread_create(&t[i], NULL, stress_thread, (void *)i);
  for (int i = 0; i < threads; i++)
    pthread_join(t[i], NULL);
  coord_close(stress_c[1]);
  printf("STRESS %d %d\n", held_count, violations);
  fflush(stdout);
  return 0;
}

int main(int argc, char **argv) {
  if (argc < 3) {
    fprintf(stderr, "usage: lock_tool count|hold|try|timeout|cancel|writes NAME ...\n");
    return 2;
  }
  setvbuf(stdout, NULL, _IOLBF, 0);
  coord_t *c = NULL;
  int rc = coord_new(NULL, &c);
  if (rc)
    die("coord_new", rc);
  const char *cmd = argv[1], *name = argv[2];
  int ret = 2;
  if (strcmp(cmd, "count") == 0 && argc == 5)
    ret = cmd_count(c, name, atoi(argv[3]), argv[4]);
  else if (strcmp(cmd, "hold") == 0)
    ret = cmd_hold(c, name, argc > 3 ? atoll(argv[3]) : 0);
  else if (strcmp(cmd, "try") == 0)
    ret = cmd_try(c, name);
  else if (strcmp(cmd, "timeout") == 0 && argc == 4)
    ret = cmd_timeout(c, name, atoi(argv[3]));
  else if (strcmp(cmd, "cancel") == 0 && argc == 4)
    ret = cmd_cancel(c, name, atoi(argv[3]));
  else if (strcmp(cmd, "writes") == 0)
    ret = cmd_writes(c, name);
  else if (strcmp(cmd, "latency") == 0 && argc == 4)
    ret = cmd_latency(c, name, atoi(argv[3]));
  else if (strcmp(cmd, "stress") == 0 && argc == 5)
    ret = cmd_stress(c, name, atoi(argv[3]), atoi(argv[4]));
  else
    fprintf(stderr, "lock_tool: bad command line\n");
  coord_close(c);
  return ret;
}
