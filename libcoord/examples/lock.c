/*
 * lock.c — example: a distributed lock with libcoord.
 *
 * Takes the lock "example" (waiting up to 30 s), prints its holder key and
 * fencing token, leaves a note on it, makes a guarded write (one that only
 * commits while the lock is still held), holds it for a moment and
 * releases it.  Run two at once: the second waits for the first.  Exits 0
 * on success.
 *
 *   COORD_ENDPOINTS=127.0.0.1:2379 ./lock [NAME] [HOLD_MS]
 *
 * The lock is the same as `etcdctl lock /locks/NAME`.
 */
#include <coord.h>

#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#define CHECK(what, rc)                                                                                      \
  do {                                                                                                       \
    int rc_ = (rc);                                                                                          \
    if (rc_ < 0) {                                                                                           \
      fprintf(stderr, "%s failed: %s (%s)\n", what, coord_strerror(rc_), coord_last_error());                \
      exit(1);                                                                                               \
    }                                                                                                        \
  } while (0)

/* Runs on libcoord's event thread if the lock is lost while held (lease
 * expired or revoked, key deleted): must not block. */
static void lost(coord_lock_t *lock, void *arg) {
  (void)arg;
  fprintf(stderr, "lock %s lost!\n", coord_lock_key(lock));
}

int main(int argc, char **argv) {
  const char *name = argc > 1 ? argv[1] : "example";
  int hold_ms = argc > 2 ? atoi(argv[2]) : 500;

  coord_t *c = NULL;
  CHECK("coord_new", coord_new(NULL, &c));

  coord_lock_t *lock = NULL;
  /* TTL 5 s (0 would be the default 10 s): if this process dies, the lock
   * is free again at most 5 s later.  Wait up to 30 s for it. */
  CHECK("coord_lock_acquire", coord_lock_acquire(c, name, 5000, 30000, &lock));
  coord_lock_on_lost(lock, lost, NULL);
  printf("acquired %s token %lld\n", coord_lock_key(lock), (long long)coord_lock_token(lock));

  CHECK("coord_lock_set_note", coord_lock_set_note(lock, "example holder", 14));

  /* Work protected by the lock: a guarded write fails with COORD_ELOST
   * instead of overwriting a successor's work if we lost the lock. */
  json_t *v = json_pack("{s:I}", "token", (json_int_t)coord_lock_token(lock));
  CHECK("coord_config_set_guarded", coord_config_set_guarded(c, lock, "example/last-holder", v));
  json_decref(v);

  int64_t left = 0;
  CHECK("coord_lock_ttl", coord_lock_ttl(lock, &left));
  printf("holding for %d ms (lease TTL left %lld ms)\n", hold_ms, (long long)left);
  usleep((useconds_t)hold_ms * 1000);

  CHECK("coord_lock_unlock", coord_lock_unlock(lock));
  printf("released\n");
  coord_close(c);
  return 0;
}
