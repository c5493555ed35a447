/*
 * core_watch.c — prints every event of a prefix watch, for tests/test_core.py.
 *
 *   core_watch events PREFIX START_REV UNTIL_KEY TIMEOUT_MS
 *
 * Watches PREFIX from START_REV (0: now) and prints one line per event,
 * "PUT <key> <revision> <value>" or "DELETE <key> <revision>", until a PUT
 * of UNTIL_KEY is seen (then "end") or TIMEOUT_MS passes without one
 * (then "timeout", exit 1).  Uses coord_watch_fd with poll(2), as an event
 * loop would.
 *
 *   core_watch churn KEY SECONDS
 *
 * Hunts for races between delivery and coord_watch_close: three threads put
 * KEY without pause while two threads open a watch on it, wait for its first
 * event and close it after a random pause under 1 ms, again and again, for
 * SECONDS.  Every watch must see an
 * event within 10 s.  Prints "churn watches=N events=M", exit 0; a sanitizer
 * (the suite also runs sanitized) reports a watcher used after it was freed.
 */
#include <coord.h>

#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static long now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

typedef struct churn {
  coord_t *c;
  const char *key;
  long until;
  int failed, stop; /* under mu */
  long watches, events;
  pthread_mutex_t mu;
} churn_t;

/* Puts until the watchers are done (stop), so that the last watch opened
 * still gets its event. */
static void *churn_writer(void *arg) {
  churn_t *ch = arg;
  for (long i = 0;; i++) {
    pthread_mutex_lock(&ch->mu);
    int stop = ch->stop;
    pthread_mutex_unlock(&ch->mu);
    if (stop)
      break;
    char v[32];
    int n = snprintf(v, sizeof v, "%ld", i);
    if (coord_kv_put(ch->c, ch->key, v, (size_t)n, NULL, NULL)) {
      printf("put: %s\n", coord_last_error());
      pthread_mutex_lock(&ch->mu);
      ch->failed = 1;
      pthread_mutex_unlock(&ch->mu);
      break;
    }
  }
  return NULL;
}

static void *churn_watcher(void *arg) {
  churn_t *ch = arg;
  unsigned seed = (unsigned)(uintptr_t)&seed;
  for (;;) {
    pthread_mutex_lock(&ch->mu);
    int failed = ch->failed;
    pthread_mutex_unlock(&ch->mu);
    if (failed || now_ms() >= ch->until)
      break;
    coord_watch_t *w = NULL;
    int rc = coord_watch_create(ch->c, ch->key, NULL, &w);
    if (rc) {
      printf("watch: %s: %s\n", coord_strerror(rc), coord_last_error());
      pthread_mutex_lock(&ch->mu);
      ch->failed = 1;
      pthread_mutex_unlock(&ch->mu);
      break;
    }
    coord_event_t *ev = NULL;
    rc = coord_watch_next(w, 10000, &ev);
    coord_event_free(ev);
    /* a pause of 0-999 us lands the close at a random point of the event
     * thread's handling of the next responses */
    struct timespec pause = {0, (long)(rand_r(&seed) % 1000) * 1000};
    nanosleep(&pause, NULL);
    coord_watch_close(w); /* while the writers' events keep arriving */
    pthread_mutex_lock(&ch->mu);
    ch->watches++;
    ch->events += rc == 0;
    if (rc) {
      printf("watch saw no event: %s\n", coord_strerror(rc));
      ch->failed = 1;
    }
    pthread_mutex_unlock(&ch->mu);
  }
  return NULL;
}

#define CHURN_WATCHERS 2
#define CHURN_WRITERS 3 /* responses arrive while the event thread is busy */

static int churn(const char *key, long seconds) {
  churn_t ch = {0};
  ch.key = key;
  pthread_mutex_init(&ch.mu, NULL);
  int rc = coord_new(NULL, &ch.c);
  if (rc) {
    printf("coord_new: %s: %s\n", coord_strerror(rc), coord_last_error());
    return 1;
  }
  ch.until = now_ms() + seconds * 1000;
  pthread_t wr[CHURN_WRITERS], wa[CHURN_WATCHERS];
  for (int i = 0; i < CHURN_WRITERS; i++)
    pthread_create(&wr[i], NULL, churn_writer, &ch);
  for (int i = 0; i < CHURN_WATCHERS; i++)
    pthread_create(&wa[i], NULL, churn_watcher, &ch);
  for (int i = 0; i < CHURN_WATCHERS; i++)
    pthread_join(wa[i], NULL);
  pthread_mutex_lock(&ch.mu);
  ch.stop = 1;
  pthread_mutex_unlock(&ch.mu);
  for (int i = 0; i < CHURN_WRITERS; i++)
    pthread_join(wr[i], NULL);
  coord_close(ch.c);
  pthread_mutex_destroy(&ch.mu);
  printf("churn watches=%ld events=%ld\n", ch.watches, ch.events);
  return ch.failed;
}

int main(int argc, char **argv) {
  setvbuf(stdout, NULL, _IOLBF, 0);
  if (argc == 4 && !strcmp(argv[1], "churn"))
    return churn(argv[2], atol(argv[3]));
  if (argc != 6 || strcmp(argv[1], "events"))
    return 2;
  const char *prefix = argv[2], *until = argv[4];
  long timeout = atol(argv[5]);
  coord_t *c = NULL;
  int rc = coord_new(NULL, &c);
  if (rc) {
    printf("coord_new: %s: %s\n", coord_strerror(rc), coord_last_error());
    return 1;
  }
  coord_watch_opts_t o = {0};
  o.prefix = 1;
  o.start_revision = atoll(argv[3]);
  coord_watch_t *w = NULL;
  rc = coord_watch_create(c, prefix, &o, &w);
  if (rc) {
    printf("watch: %s: %s\n", coord_strerror(rc), coord_last_error());
    return 1;
  }
  printf("watching\n");
  long deadline = now_ms() + timeout;
  int done = 0, status = 1;
  while (!done && now_ms() < deadline) {
    struct pollfd p = {coord_watch_fd(w), POLLIN, 0};
    if (poll(&p, 1, 100) <= 0)
      continue;
    coord_event_t *ev;
    while ((rc = coord_watch_next(w, 0, &ev)) == 0) {
      if (ev->type == COORD_EVENT_PUT)
        printf("PUT %s %lld %.*s\n", ev->kv.key, (long long)ev->revision, (int)ev->kv.value_len,
               (char *)ev->kv.value);
      else
        printf("DELETE %s %lld\n", ev->kv.key, (long long)ev->revision);
      if (ev->type == COORD_EVENT_PUT && !strcmp(ev->kv.key, until))
        done = 1, status = 0;
      coord_event_free(ev);
    }
    if (rc != COORD_ETIMEDOUT) {
      printf("watch ended: %s: %s\n", coord_strerror(rc), coord_last_error());
      break;
    }
  }
  printf(done ? "end\n" : "timeout\n");
  coord_watch_close(w);
  coord_close(c);
  return status;
}
