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
 */
#include <coord.h>

#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static long now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int main(int argc, char **argv) {
  setvbuf(stdout, NULL, _IOLBF, 0);
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
