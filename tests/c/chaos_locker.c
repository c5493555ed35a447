/*
 * chaos_locker.c — a libcoord lock user for tests/test_lock_chaos.py.
 *
 *   chaos_locker NAME LOG TTL_MS MAX_HOLD_US
 *
 * Loops for ever (until killed): acquire NAME (waits up to 30 s), note the
 * start in CLOCK_REALTIME ns and the fencing token, stay inside for a random
 * time below MAX_HOLD_US, note the end, then append one line to LOG with a
 * single write(2) on an O_APPEND descriptor (so that lines from many
 * processes never mix) and release:
 *
 *   libcoord <pid> <token> <start ns> <end ns> ok|lost
 *
 * "lost" when the lock was lost during the section (the lease expired:
 * the holder knows it must not trust the section).  The line is written
 * before the release, so a section in the log ended while the lock was
 * held; a process killed inside a section leaves no line for it.
 * Acquire failures (etcd member restarting) are printed on stderr and
 * retried.
 */
#include <coord.h>

#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static long long now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

int main(int argc, char **argv) {
  if (argc != 5) {
    fprintf(stderr, "usage: chaos_locker NAME LOG TTL_MS MAX_HOLD_US\n");
    return 64;
  }
  const char *name = argv[1];
  int fd = open(argv[2], O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0) {
    perror(argv[2]);
    return 1;
  }
  int64_t ttl = atoll(argv[3]);
  long max_hold = atol(argv[4]);
  srand((unsigned)(getpid() ^ now_ns()));
  coord_t *c = NULL;
  int rc = coord_new(NULL, &c);
  if (rc) {
    fprintf(stderr, "chaos_locker: coord_new: %s: %s\n", coord_strerror(rc), coord_last_error());
    return 1;
  }
  for (;;) {
    coord_lock_t *l = NULL;
    rc = coord_lock_acquire(c, name, ttl, 30000, &l);
    if (rc) {
      fprintf(stderr, "chaos_locker: acquire: %s: %s\n", coord_strerror(rc), coord_last_error());
      if (l)
        coord_lock_unlock(l);
      usleep(100000);
      continue;
    }
    long long start = now_ns();
    long long token = (long long)coord_lock_token(l);
    if (max_hold > 0)
      usleep((useconds_t)(rand() % max_hold));
    long long end = now_ns();
    int lost = coord_lock_state(l) != 0;
    char line[200];
    int n = snprintf(line, sizeof line, "libcoord %d %lld %lld %lld %s\n", (int)getpid(), token, start, end,
                     lost ? "lost" : "ok");
    if (write(fd, line, (size_t)n) != n)
      perror("chaos_locker: write");
    rc = coord_lock_unlock(l);
    if (rc && rc != COORD_ELOST)
      fprintf(stderr, "chaos_locker: unlock: %s: %s\n", coord_strerror(rc), coord_last_error());
  }
}
