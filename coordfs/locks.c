/*
 * locks.c — /locks: one file per lock name, the same lock as libcoord's
 * coord_lock_* and `etcdctl lock /locks/<name>` (DESIGN.md "/locks", whose
 * first bullet, "opening for writing takes the lock", this supersedes: see
 * coordfs(8)).
 *
 * WHAT THE KERNEL SEES
 *   - Every valid name exists (lookup and stat always succeed, size 0), so
 *     `exec 9>/coord/locks/x` and `flock /coord/locks/x` open it without a
 *     create; `ls` lists only the names that have a holder or waiters in etcd
 *     (one keys-only Range over /locks/).  rm and mkdir are refused (EPERM,
 *     mkdir by fs.c).  A name can never hold '/': the kernel splits paths.
 *     fs.c gives every lookup of a name a new inode (entry timeout 0), so
 *     each open of a lock file has an inode of its own: the kernel holds an
 *     inode's i_rwsem through a write, and a write that waits for the lock
 *     would otherwise stall every other write, and every O_TRUNC open
 *     (`exec 9>`), of that name on this mount, uninterruptibly.
 *   - open never blocks and never takes the lock, whatever the flags
 *     (O_WRONLY, O_RDWR, O_CREAT, O_TRUNC, O_NONBLOCK); it makes no etcd call.
 *   - The lock is taken for the open file by its first write ("writing
 *     acquires, held while open") or by flock(2):
 *       write: on a file that does not hold the lock, the write first
 *         acquires it: the FUSE request is kept pending (no worker thread
 *         waits), granted in arrival order (etcd's Mutex queue) on
 *         libcoord's event thread, and then answered by the note thread
 *         once the bytes are the holder's note.  O_NONBLOCK (the write's
 *         fi->flags, so fcntl F_SETFL counts): try_acquire, EAGAIN at once
 *         when held.  A write by the holder only updates the note.
 *       flock(2) (FUSE_CAP_FLOCK_LOCKS, asked for in locks_conn_init):
 *         LOCK_EX and LOCK_SH both take it (one exclusive lock per name),
 *         LOCK_NB is try_acquire (EWOULDBLOCK), LOCK_UN releases it
 *         whichever way it was taken (and withdraws a request of the same
 *         open file that waits: a write gets EINTR, a flock ENOLCK, since
 *         the kernel turns a flock's EINTR into ERESTARTSYS, which reaches
 *         a caller with no signal pending as errno 512).  A blocking LOCK_EX is
 *         kept pending like a write.  A file that holds: LOCK_EX is a no-op.
 *     A second blocking request of an open file while one waits: EDEADLK
 *     (EAGAIN / EWOULDBLOCK with O_NONBLOCK / LOCK_NB).
 *   - A pending request registers fuse_req_interrupt_func: a signal to the
 *     waiter (flock -w's alarm, ^C, SIGKILL) withdraws it at once: its
 *     acquire is cancelled (coord_lock_cancel starts the Delete of the queue
 *     key) and the request is answered EINTR by the timer thread without
 *     waiting for etcd, so a slow etcd cannot hold the interrupted process.
 *     The handle stays on lkf->cancelling until its acquire callback says
 *     the Delete is done (then the event thread ends it); until then a try
 *     of that name on this mount waits for it as for a release
 *     (wait_own_release_locked), so a try does not see the dead entry.
 *     If the lock was granted at that same moment, it is released again:
 *     the note thread unlocks it (an R_END job, waiting for the Delete),
 *     and tries wait for that too (lkf->ending).
 *   - A waiting acquire that fails for a reason that passes (COORD_ETIMEDOUT,
 *     COORD_EUNAVAILABLE, COORD_EIO: etcd slow or cut off; COORD_ELOST: the
 *     waiter's lease or key went, its place in the queue with it) does not
 *     end the wait: the timer thread starts it again after a back-off
 *     (RETRY_MIN_MS doubling to RETRY_MAX_MS), until it is granted or the
 *     waiter is interrupted, so `flock -w 20` waits its 20 s even while etcd
 *     is unreachable.  Other errors (EACCES ...) answer the request.
 *   - The lock is released when the open file is released (last close, also
 *     on process death): FUSE release.  The kernel sends release without
 *     waiting for it (only the flush of close() is synchronous, and a flush
 *     comes for every close of every dup, so it cannot release), so the key
 *     is deleted a millisecond or so after close() returned, and the next
 *     request may even be read before the release.  So that a try on this
 *     mount right after its previous holder closed (or exited) never finds
 *     that holder's key, a try waits for this mount's releases and
 *     withdrawals of the name, and for up to FLUSH_GRACE_MS for the release
 *     of a flushed holder (wait_own_release_locked).  Another mount's release
 *     is not waited for.  flock -u (LOCK_UN) is synchronous: the key is gone
 *     when it returns.
 *   - write by the holder: the bytes (placed at their offsets) become the
 *     holder's note (coord_lock_set_note, a guarded Put).  read: JSON about
 *     the lock, {"name","holder","holder_note","token","ttl_ms","waiters",
 *     "held_by_me","state"}, holder = lowest create revision under
 *     /locks/<name>/, waiters = the other keys; built at offset 0, later
 *     offsets read the same snapshot.
 *   - Lost lock (coord_lock_on_lost: lease expired or revoked, key deleted;
 *     or a guarded write or a read finding our key gone first): the file's
 *     state becomes LOST, which is logged once (LOG_WARNING: name, key,
 *     token); read, write, flush (so close) and poll then answer EIO (poll:
 *     POLLERR, and a poll handle kept by a waiting poll is notified).  The
 *     next waiter proceeds by itself (the key is gone).  LOCK_UN or release
 *     drop the lost handle; a new flock takes it anew.
 *   - TTL: --lock-ttl (g.o.lock_ttl_ms); libcoord keeps held leases alive.
 *
 * OBJECTS AND OWNERSHIP
 *   struct lkf is f->priv for every open file of /locks/<name>; it is on the
 *   global list L.all from open until freed.  It is reference counted
 *   (lkf->refs, under L.mu):
 *     - 1 for the open file: dropped at release, or when the open's reply
 *       finds the opener gone (then locks.c frees the cfs_file too, since
 *       the kernel will send no release);
 *     - 1 per libcoord handle it started, until coord_lock_unlock on that
 *       handle has returned;
 *     - 1 per pin (below), and 1 per job queued for the note thread.
 *   Every handle started here is, at any moment, in exactly one place:
 *     - lkf->h, the current one (state WAIT: acquiring; HELD; LOST);
 *     - lkf->cancelling: withdrawn while acquiring; its acquire callback
 *       ends it, or hands it to the note thread as an R_END job if it was
 *       granted (room is reserved when the acquire starts, so withdrawing
 *       never allocates);
 *     - lkf->deferred: detached while pinned; the last unpinner ends it;
 *     - owned by the thread that detached it and is ending it (end_handle).
 *   An acquire callback for a handle in none of the first two places is for
 *   an abandoned handle and does nothing.
 *   A waiting request is a struct preq, lkf->pr; state WAIT holds exactly
 *   while lkf->pr is set (lkf->h is NULL between a failure and its retry).
 *   It is answered exactly once, by whoever "claims" it under L.mu (takes
 *   lkf->pr): the acquire callback (granted, or a final error), a
 *   withdrawal (interrupt, LOCK_UN, shut-down), or a failed start.  A
 *   claimed request may be handed on as a job: L.answers (the timer thread
 *   answers it with preq->err) or L.notes (the note thread puts the note of
 *   a granted write and answers it).  L.notes also carries R_END jobs,
 *   which hold a handle, not a request.
 *   Interrupts find their request by a unique id (preq->id, passed as the
 *   interrupt data), never by pointer: an interrupt callback of libfuse can
 *   run just after the request was answered and freed.
 *
 * THREADS AND LOCKS
 *   L.mu (private) guards every lkf and preq field, L.all and the job
 *   queues.  No libcoord call that can wait (unlock, try_acquire, set_note,
 *   kv/lease calls) and no fuse_reply_* / notification is made while holding
 *   it.  Two libcoord calls ARE made under it, off the event thread only:
 *   coord_lock_acquire_async and coord_lock_cancel.  Neither waits for etcd
 *   nor runs a callback on the calling thread (coord.h: callbacks run on the
 *   event thread; lock.c hands an outcome found off it to the event thread
 *   by a timer), and libcoord never runs our callbacks under its own locks,
 *   so this cannot deadlock; in exchange a handle is current the moment it
 *   exists, and a callback can never meet a handle it cannot place.
 *   Calls that only read a handle (coord_lock_key, coord_lock_token) are
 *   made in its acquire callback (the handle cannot be freed while its
 *   callback runs: coord_lock_unlock waits for it) or under a pin.
 *   g.lock is not used here except inside cfs_reply_create (fs.c), never with
 *   L.mu held.  file->lock is NOT used by locks.c (fs.c holds it around
 *   locks_release only); the event-thread callbacks and the helper threads
 *   never take it, so a release that waits in coord_lock_unlock cannot
 *   deadlock with them.
 *   A held handle is used outside L.mu only while "pinned" (lkf->pins > 0):
 *   an unlocker that finds the lkf pinned hands the handle to the last
 *   unpinner (lkf->deferred) instead of freeing it under the pinner's feet.
 *   Threads:
 *     - FUSE workers run the hooks; they may wait for etcd (try_acquire,
 *       set_note, the read's Range, the blocking unlock of LOCK_UN/release),
 *       never for a lock to be granted.
 *     - libcoord's event thread runs on_acquired and on_lost; they never
 *       block (unlock from there is asynchronous); on_acquired answers a
 *       granted flock itself and hands a granted write to the note thread.
 *     - libfuse runs on_interrupt on a worker with the request's own lock
 *       held: it withdraws the request (cancel, under L.mu) and queues its
 *       EINTR answer for the timer thread; it never answers it itself.
 *       While start_acquire is still registering the interrupt callback
 *       (lkf->registering) it only flags lkf->interrupted, and start_acquire
 *       withdraws and answers after registering (answering the request
 *       before fuse_req_interrupt_func returns would free it under libfuse).
 *     - the timer thread (timer_main) answers L.answers and starts the
 *       retries that are due.  It never waits for etcd.
 *     - the note thread (note_main) puts the note of each granted write
 *       (a guarded Put, up to the call timeout) and answers the write, and
 *       unlocks the handles of R_END jobs (a Delete, waited for).
 *     - main's thread runs locks_shutdown after the session loop ended and
 *       BEFORE cfs_files_shutdown: it stops and joins the two helper
 *       threads, claims every waiting request and queued job (freed with
 *       fuse_reply_none), detaches every handle, waits on L.cv until no
 *       on_acquired runs (L.in_cb), unlocks the handles (blocking: keys
 *       deleted) and frees every lock file, so cfs_files_shutdown finds
 *       none.
 */
#include "coordfs.h"
#include "log.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>

#define LOCKS_PREFIX "/locks/"
#define NOTE_MAX (CFS_MAX_REQUEST - CFS_REQUEST_OVERHEAD - 512)
/* Back-off between the attempts of a waiting acquire that failed for a
 * reason that passes (see retryable). */
#define RETRY_MIN_MS 100
#define RETRY_MAX_MS 2000

enum lst {
  L_NONE, /* no handle */
  L_WAIT, /* a request waits for the lock (lkf->pr) */
  L_HELD,
  L_LOST, /* was held, lease or key gone: EIO until LOCK_UN / release */
};

enum rkind {
  R_FLOCK,
  R_WRITE,
  R_END, /* not a request: a job for the note thread, ending preq->h */
};

/* A request kept pending until the lock is granted, and then, once claimed,
 * maybe a job for a helper thread. */
struct preq {
  fuse_req_t req;
  uint64_t id; /* the interrupt data: unique, never reused */
  enum rkind kind;
  int err;   /* on L.answers: the errno it is answered with */
  char *buf; /* R_WRITE: the bytes written, at off */
  size_t size;
  off_t off;
  struct lkf *l;   /* on L.notes: the file (holds a reference) */
  coord_lock_t *h; /* R_END: a withdrawn handle granted as it was withdrawn */
  struct preq *next;
};

struct lkf {
  struct cfs_file *f; /* NULL once the file is gone */
  char *name;
  int refs;
  enum lst st;
  coord_lock_t *h; /* current handle (L_WAIT: NULL while a retry is due) */
  char *key;       /* held: our key, and token */
  int64_t token;
  struct preq *pr;           /* the waiting request: set exactly in L_WAIT */
  int registering;           /* start_acquire is in fuse_req_interrupt_func */
  int interrupted;           /* an interrupt came while registering */
  int failures;              /* retryable acquire failures in a row */
  int retry;                 /* the timer thread starts the acquire again ... */
  struct timespec retry_at;  /* ... at this time (CLOCK_MONOTONIC) */
  coord_lock_t **cancelling; /* withdrawn acquires: their callback ends them */
  size_t ncancelling, capcancelling;
  int releasing; /* locks_release is deleting this file's key (L.rel_cv) */
  int ending;    /* R_END jobs of this file: keys the note thread deletes */
  int flushed;   /* closed (FLUSH) while held: its release may be coming */
  /* handles used outside L.mu */
  int pins;
  coord_lock_t **deferred;
  size_t ndeferred;
  /* poll, note, read snapshot */
  struct fuse_pollhandle *ph;
  char *note;
  size_t note_len;
  char *snap;
  size_t snap_len;
  struct lkf *prev, *next;
};

static struct {
  pthread_mutex_t mu;
  pthread_cond_t cv;       /* in_cb went to 0 */
  pthread_cond_t rel_cv;   /* a release, withdrawal or unpin finished (CLOCK_MONOTONIC) */
  pthread_cond_t timer_cv; /* the timer thread has work (CLOCK_MONOTONIC) */
  pthread_cond_t note_cv;  /* the note thread has work */
  struct lkf *all;
  uint64_t next_id;
  int in_cb; /* on_acquired calls running (shut-down waits for them) */
  int shutting_down;
  int stop;                      /* the helper threads end */
  struct preq *answers;          /* for the timer thread: answer with ->err */
  struct preq *notes, **notes_t; /* for the note thread, in grant order */
  pthread_t timer, noter;
  int threads; /* helper threads started (0, 1 or 2) */
} L = {.mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER, .note_cv = PTHREAD_COND_INITIALIZER};

/* ---------------------------------------------------------------- helpers */

static void preq_free(struct preq *pr) {
  if (!pr)
    return;
  free(pr->buf);
  free(pr);
}

static void lkf_free(struct lkf *l) {
  if (l->ph)
    fuse_pollhandle_destroy(l->ph);
  free(l->name);
  free(l->key);
  free(l->note);
  free(l->snap);
  free(l->deferred);
  free(l->cancelling);
  free(l);
}

/* Under L.mu: drop one reference; 1 if the caller must lkf_free(l) after
 * releasing L.mu (l is already off the list). */
static int unref_locked(struct lkf *l) {
  if (--l->refs > 0)
    return 0;
  if (l->prev)
    l->prev->next = l->next;
  else if (L.all == l)
    L.all = l->next;
  if (l->next)
    l->next->prev = l->prev;
  return 1;
}

static void unref(struct lkf *l) {
  pthread_mutex_lock(&L.mu);
  int dead = unref_locked(l);
  pthread_mutex_unlock(&L.mu);
  if (dead)
    lkf_free(l);
}

/* Not under L.mu: unlock a handle that l started and drop its reference.
 * Off the event thread this waits until the key is deleted. */
static int end_handle(struct lkf *l, coord_lock_t *h) {
  int rc = coord_lock_unlock(h);
  unref(l);
  return rc;
}

/* Under L.mu: takes the current handle away (state L_NONE; nothing may be
 * waiting: see withdraw_locked).  Returns it for the caller to
 * end_handle(), or NULL if there is none or l is pinned (then the last
 * unpinner ends it). */
static coord_lock_t *detach_locked(struct lkf *l) {
  coord_lock_t *h = l->h;
  l->h = NULL;
  l->st = L_NONE;
  free(l->key);
  l->key = NULL;
  l->token = 0;
  if (h && l->pins) {
    coord_lock_t **d = realloc(l->deferred, (l->ndeferred + 1) * sizeof(*d));
    if (d) {
      l->deferred = d;
      l->deferred[l->ndeferred++] = h;
      return NULL;
    }
    /* out of memory: unlock now and hope (the pinner only puts a note) */
  }
  return h;
}

/* Under L.mu: detach_locked once no pin is held, so that the handle comes
 * back to the caller (not deferred to the last unpinner, which may be the
 * note thread, busy with the next note) and the caller's blocking unlock
 * has deleted the key when it returns.  Pins are short: a note's Put. */
static coord_lock_t *detach_unpinned_locked(struct lkf *l) {
  while (l->pins > 0)
    pthread_cond_wait(&L.rel_cv, &L.mu);
  return detach_locked(l);
}

/* Under L.mu: pin l (its current handle may be used outside L.mu). */
static void pin_locked(struct lkf *l) {
  l->pins++;
  l->refs++;
}

/* Not under L.mu: unpin; the last unpinner ends the deferred handles. */
static void unpin(struct lkf *l) {
  pthread_mutex_lock(&L.mu);
  coord_lock_t **d = NULL;
  size_t nd = 0;
  if (--l->pins == 0) {
    d = l->deferred;
    nd = l->ndeferred;
    l->deferred = NULL;
    l->ndeferred = 0;
    pthread_cond_broadcast(&L.rel_cv); /* detach_unpinned_locked */
  }
  pthread_mutex_unlock(&L.mu);
  for (size_t i = 0; i < nd; i++)
    end_handle(l, d[i]);
  free(d);
  unref(l);
}

/* The open file is gone without a release to come (the opener vanished
 * before the answer): free the cfs_file, drop its ref. */
static void drop_file(struct lkf *l) {
  pthread_mutex_lock(&L.mu);
  struct cfs_file *f = l->f; /* NULL: released or shut down already */
  l->f = NULL;
  int dead = f ? unref_locked(l) : 0;
  pthread_mutex_unlock(&L.mu);
  cfs_file_free(f);
  if (dead)
    lkf_free(l);
}

static int lock_errno(int status) {
  if (status == COORD_ECANCELED)
    return EINTR;
  if (status == COORD_ELOCKED)
    return EWOULDBLOCK;
  return cfs_errno(status);
}

/* Failures of a waiting acquire that pass: etcd slow or unreachable for a
 * while (a call timed out, no endpoint answered, the lock's watch broke),
 * or the waiter's lease or key went (its place in the queue is lost, not
 * the wait).  Everything else (permission, protocol, closing) is final. */
static int retryable(int status) {
  return status == COORD_ETIMEDOUT || status == COORD_EUNAVAILABLE || status == COORD_EIO ||
         status == COORD_ELOST;
}

static struct timespec after_ms(int ms) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  t.tv_sec += ms / 1000;
  t.tv_nsec += (long)(ms % 1000) * 1000000;
  if (t.tv_nsec >= 1000000000)
    t.tv_sec++, t.tv_nsec -= 1000000000;
  return t;
}

static int ts_before(const struct timespec *a, const struct timespec *b) {
  return a->tv_sec < b->tv_sec || (a->tv_sec == b->tv_sec && a->tv_nsec < b->tv_nsec);
}

/* Not under L.mu: answer a claimed request with an error and free it. */
static void answer(struct preq *pr, int err) {
  if (!pr)
    return;
  fuse_reply_err(pr->req, err);
  preq_free(pr);
}

/* ---------------------------------------------------------------- withdrawing */

/* Under L.mu, off the event thread: the waiting request leaves (interrupt,
 * LOCK_UN, a release, shut-down).  l goes back to L_NONE and its acquire,
 * if one is running, is cancelled: the handle moves to l->cancelling and
 * its callback ends it once the queue key is deleted.  Returns the request,
 * claimed, for the caller to answer; NULL if start_acquire is registering
 * the request's interrupt callback (then only l->interrupted is set and
 * start_acquire withdraws it) or if nothing waits. */
static struct preq *withdraw_locked(struct lkf *l) {
  if (!l->pr)
    return NULL;
  if (l->registering) {
    l->interrupted = 1;
    return NULL;
  }
  struct preq *pr = l->pr;
  l->pr = NULL;
  l->st = L_NONE;
  l->retry = 0;
  l->failures = 0;
  coord_lock_t *h = l->h;
  l->h = NULL;
  if (h) {
    l->cancelling[l->ncancelling++] = h; /* room reserved by start_locked */
    coord_lock_cancel(h);                /* under L.mu: see THREADS AND LOCKS */
  }
  return pr;
}

/* ---------------------------------------------------------------- callbacks */

/* Not under L.mu: the held lock `lock` of l is lost (libcoord said so, or a
 * guarded write or a read found our key gone first).  Logs it once, wakes a
 * waiting poll. */
static void mark_lost(struct lkf *l, coord_lock_t *lock) {
  struct fuse_pollhandle *ph = NULL;
  char *name = NULL, *key = NULL;
  int64_t token = 0;
  pthread_mutex_lock(&L.mu);
  int now_lost = l->h == lock && l->st == L_HELD;
  if (now_lost) {
    l->st = L_LOST;
    ph = l->ph;
    l->ph = NULL;
    name = strdup(l->name);
    key = l->key ? strdup(l->key) : NULL;
    token = l->token;
  }
  pthread_mutex_unlock(&L.mu);
  if (now_lost)
    cfs_log(LOG_WARNING,
            "lock %s (key %s, token %" PRId64
            ") lost: lease expired or revoked; the holder's read/write/poll "
            "now fail with EIO",
            name ? name : "?", key ? key : "?", token);
  free(name);
  free(key);
  if (ph) {
    fuse_lowlevel_notify_poll(ph);
    fuse_pollhandle_destroy(ph);
  }
}

static void on_lost(coord_lock_t *lock, void *arg) {
  mark_lost(arg, lock);
}

/* Under L.mu: the acquire of l failed for a reason that passes; the timer
 * thread starts it again after the back-off.  Returns the delay. */
static int schedule_retry_locked(struct lkf *l) {
  int shift = l->failures < 5 ? l->failures : 5;
  int ms = RETRY_MIN_MS << shift;
  if (ms > RETRY_MAX_MS)
    ms = RETRY_MAX_MS;
  l->failures++;
  l->retry = 1;
  l->retry_at = after_ms(ms);
  pthread_cond_signal(&L.timer_cv);
  return ms;
}

static void log_retry(const char *name, int status, int failures, int ms) {
  if (failures == 1)
    cfs_log(LOG_NOTICE, "lock %s: acquire failed (%s); still waiting: trying again every %d..%d ms", name,
            coord_strerror(status), ms, RETRY_MAX_MS);
  else
    cfs_debug("lock %s: acquire failed again (%s, %d in a row); trying again in %d ms", name,
              coord_strerror(status), failures, ms);
}

/* Acquire outcome of `lock`, on the event thread (never under L.mu). */
static void acquired(coord_lock_t *lock, int status, struct lkf *l) {
  /* the handle lives while its callback runs: safe to read here */
  char *key = NULL;
  int64_t token = 0;
  if (status == 0) {
    const char *k = coord_lock_key(lock);
    key = k ? strdup(k) : NULL;
    token = coord_lock_token(lock);
  }
  pthread_mutex_lock(&L.mu);
  for (size_t i = 0; i < l->ncancelling; i++) {
    if (l->cancelling[i] != lock)
      continue;
    /* withdrawn (its request was answered): the queue key is deleted now
     * (libcoord tells after the Delete) */
    l->cancelling[i] = l->cancelling[--l->ncancelling];
    free(key);
    struct preq *job = status == 0 && !L.stop ? calloc(1, sizeof(*job)) : NULL;
    if (job) {
      /* ... unless it was granted at that same moment: its key is the
       * holder's now, and an unlock from here would delete it after we
       * return.  The note thread unlocks it, waiting for the Delete, and
       * tries of the name wait for that (l->ending) */
      job->kind = R_END;
      job->h = lock;
      job->l = l;
      l->refs++; /* the job's */
      l->ending++;
      *L.notes_t = job;
      L.notes_t = &job->next;
      pthread_cond_signal(&L.note_cv);
      cfs_debug("lock %s: granted as its waiter was withdrawn: released again", l->name);
      pthread_mutex_unlock(&L.mu); /* l may be gone from here on */
      return;
    }
    pthread_cond_broadcast(&L.rel_cv); /* a try may wait for this name */
    pthread_mutex_unlock(&L.mu);
    end_handle(l, lock); /* event thread: does not wait */
    return;
  }
  if (l->st != L_WAIT || l->h != lock) {
    /* abandoned: whoever took it away ends it */
    pthread_mutex_unlock(&L.mu);
    free(key);
    return;
  }
  if (status == 0) {
    struct preq *pr = l->pr;
    l->pr = NULL;
    l->st = L_HELD;
    l->flushed = 0;
    l->failures = 0;
    free(l->key);
    l->key = key;
    l->token = token;
    free(l->note);
    l->note = NULL;
    l->note_len = 0;
    if (pr->kind == R_WRITE) {
      /* the note's Put may take a while: the note thread does it */
      pr->l = l;
      l->refs++;
      pr->next = NULL;
      *L.notes_t = pr;
      L.notes_t = &pr->next;
      pthread_cond_signal(&L.note_cv);
      pr = NULL;
    }
    pthread_mutex_unlock(&L.mu);
    coord_lock_on_lost(lock, on_lost, l);
    if (pr) {
      fuse_reply_err(pr->req, 0); /* flock granted */
      preq_free(pr);
    }
    return;
  }
  free(key);
  l->h = NULL;
  if (retryable(status) && !L.shutting_down) {
    int ms = schedule_retry_locked(l);
    int failures = l->failures;
    char *name = strdup(l->name);
    pthread_mutex_unlock(&L.mu);
    log_retry(name ? name : "?", status, failures, ms);
    free(name);
    end_handle(l, lock); /* failed: libcoord has disposed of its key */
    return;
  }
  struct preq *pr = l->pr;
  l->pr = NULL;
  l->st = L_NONE;
  pthread_mutex_unlock(&L.mu);
  end_handle(l, lock);
  answer(pr, lock_errno(status));
}

static void on_acquired(coord_lock_t *lock, int status, void *arg) {
  pthread_mutex_lock(&L.mu);
  L.in_cb++;
  pthread_mutex_unlock(&L.mu);
  acquired(lock, status, arg);
  pthread_mutex_lock(&L.mu);
  if (--L.in_cb == 0)
    pthread_cond_broadcast(&L.cv);
  pthread_mutex_unlock(&L.mu);
}

/* libfuse, on a worker, with the request's lock held: withdraw the request
 * and leave its EINTR answer to the timer thread. */
static void on_interrupt(fuse_req_t req, void *data) {
  (void)req;
  uint64_t id = (uint64_t)(uintptr_t)data;
  pthread_mutex_lock(&L.mu);
  struct lkf *l = L.all;
  while (l && !(l->pr && l->pr->id == id))
    l = l->next;
  struct preq *pr = l ? withdraw_locked(l) : NULL;
  if (pr) {
    pr->err = EINTR;
    pr->next = L.answers;
    L.answers = pr;
    pthread_cond_signal(&L.timer_cv);
  }
  pthread_mutex_unlock(&L.mu);
}

/* ---------------------------------------------------------------- acquiring */

/* Under L.mu, off the event thread; l->st == L_WAIT, l->h == NULL, l->pr
 * set.  Starts the acquire for l's request; its outcome comes to
 * on_acquired.  Returns NULL, or the request, claimed, when it must be
 * answered now with pr->err (by the caller, after L.mu). */
static struct preq *start_locked(struct lkf *l) {
  l->retry = 0;
  int rc = COORD_ENOMEM;
  if (l->ncancelling == l->capcancelling) {
    size_t cap = l->capcancelling ? 2 * l->capcancelling : 2;
    coord_lock_t **c = realloc(l->cancelling, cap * sizeof(*c));
    if (c) {
      l->cancelling = c;
      l->capcancelling = cap;
    }
  }
  if (l->ncancelling < l->capcancelling) {
    l->refs++; /* the handle's */
    coord_lock_t *h = NULL;
    rc = coord_lock_acquire_async(g.c, l->name, g.o.lock_ttl_ms, on_acquired, l, &h);
    if (rc == 0) {
      l->h = h;
      return NULL;
    }
    l->refs--; /* never the last: the waiting request keeps the file open */
  }
  if (retryable(rc) && !L.shutting_down) {
    schedule_retry_locked(l);
    return NULL;
  }
  struct preq *pr = l->pr;
  l->pr = NULL;
  l->st = L_NONE;
  l->failures = 0;
  pr->err = lock_errno(rc);
  return pr;
}

/* A blocking flock or write on a file in L_NONE: keeps req pending and
 * starts the acquire.  Returns 0 when req is taken care of (answered now or
 * later), -EBUSY if the file's state changed meanwhile (another request of
 * it got there first): the caller looks again. */
static int start_acquire(fuse_req_t req, struct lkf *l, enum rkind kind, const char *buf, size_t size,
                         off_t off) {
  struct preq *pr = calloc(1, sizeof(*pr));
  if (pr && kind == R_WRITE && (pr->buf = malloc(size ? size : 1)))
    memcpy(pr->buf, buf, size);
  if (!pr || (kind == R_WRITE && !pr->buf)) {
    preq_free(pr);
    fuse_reply_err(req, ENOMEM);
    return 0;
  }
  pr->req = req;
  pr->kind = kind;
  pr->size = size;
  pr->off = off;
  pthread_mutex_lock(&L.mu);
  if (l->st != L_NONE) {
    pthread_mutex_unlock(&L.mu);
    preq_free(pr);
    return -EBUSY;
  }
  uint64_t id = pr->id = ++L.next_id;
  l->pr = pr;
  l->st = L_WAIT;
  l->h = NULL;
  l->failures = 0;
  l->interrupted = 0;
  l->registering = 1; /* nobody claims pr until it is registered */
  pthread_mutex_unlock(&L.mu);

  fuse_req_interrupt_func(req, on_interrupt, (void *)(uintptr_t)id); /* may call it now */

  pthread_mutex_lock(&L.mu);
  l->registering = 0;
  struct preq *ans = NULL;
  if (l->interrupted) {
    ans = withdraw_locked(l); /* nothing started: no handle to cancel */
    ans->err = EINTR;
  } else {
    ans = start_locked(l);
  }
  pthread_mutex_unlock(&L.mu);
  if (ans)
    answer(ans, ans->err);
  return 0;
}

/* A try (LOCK_NB, O_NONBLOCK) must not fail because of this mount's own
 * previous holder that has already closed, or its own waiter that was just
 * withdrawn.  The kernel sends FUSE_RELEASE without waiting for it, so a
 * process that closed the lock file (or exited) has returned before its key
 * is deleted, and the next try can even be read from /dev/fuse before that
 * RELEASE; an interrupted waiter is answered before its queue key is
 * deleted.  So a try on a name waits, under L.mu:
 *   - while a file of this mount is releasing it (locks_release deleting
 *     the key) or withdrawing a waiter of it (l->cancelling not empty, or
 *     an R_END job: l->ending), at most a little longer than that Delete
 *     may take;
 *   - while a holder of this mount has been flushed (a close) but not
 *     released, at most FLUSH_GRACE_MS: if no release follows, another
 *     descriptor keeps the lock held and the try fails as it should. */
#define FLUSH_GRACE_MS 100

enum hold { H_NONE, H_FLUSHED, H_RELEASING };

static enum hold own_holder_locked(const char *name) {
  enum hold w = H_NONE;
  for (struct lkf *x = L.all; x; x = x->next)
    if (!strcmp(x->name, name)) {
      if (x->releasing || x->ncancelling || x->ending)
        return H_RELEASING;
      if (x->flushed && x->st == L_HELD)
        w = H_FLUSHED;
    }
  return w;
}

static void wait_own_release_locked(const char *name) {
  struct timespec release_until = after_ms((g.o.timeout_ms > 0 ? g.o.timeout_ms : 5000) + 1000);
  struct timespec flush_until = after_ms(FLUSH_GRACE_MS);
  for (;;) {
    enum hold w = own_holder_locked(name);
    if (w == H_NONE)
      break;
    struct timespec *until = w == H_RELEASING ? &release_until : &flush_until;
    if (pthread_cond_timedwait(&L.rel_cv, &L.mu, until) == ETIMEDOUT && own_holder_locked(name) == w)
      break; /* still the same: a try answers from etcd's view */
  }
}

/* LOCK_NB / O_NONBLOCK: one Txn, nothing left behind if held.  Returns 0
 * (this file holds the lock) or -errno. */
static int try_acquire(struct lkf *l) {
  pthread_mutex_lock(&L.mu);
  wait_own_release_locked(l->name);
  l->refs++; /* the handle's */
  pthread_mutex_unlock(&L.mu);
  coord_lock_t *h = NULL;
  int rc = coord_lock_try_acquire(g.c, l->name, g.o.lock_ttl_ms, &h);
  if (rc < 0) {
    unref(l);
    return -lock_errno(rc);
  }
  const char *k = coord_lock_key(h);
  char *key = k ? strdup(k) : NULL;
  int64_t token = coord_lock_token(h);
  pthread_mutex_lock(&L.mu);
  int busy = l->st != L_NONE; /* another request of this file got there first */
  if (!busy) {
    l->st = L_HELD;
    l->flushed = 0;
    l->h = h;
    l->key = key;
    l->token = token;
    key = NULL;
    free(l->note);
    l->note = NULL;
    l->note_len = 0;
  }
  pthread_mutex_unlock(&L.mu);
  free(key);
  if (busy) {
    end_handle(l, h);
    return 0;
  }
  coord_lock_on_lost(h, on_lost, l);
  return 0;
}

/* Not under L.mu: the holder's write: the bytes at off become part of the
 * note (a guarded Put).  0 or -errno (EIO: the lock is lost). */
static int put_note(struct lkf *l, const char *buf, size_t size, off_t off) {
  pthread_mutex_lock(&L.mu);
  if (l->st != L_HELD) {
    int err = l->st == L_LOST ? -EIO : -ENOLCK; /* ENOLCK: let go meanwhile (LOCK_UN) */
    pthread_mutex_unlock(&L.mu);
    return err;
  }
  size_t end = (size_t)off + size;
  size_t nlen = end > l->note_len ? end : l->note_len;
  char *note = malloc(nlen ? nlen : 1);
  if (!note) {
    pthread_mutex_unlock(&L.mu);
    return -ENOMEM;
  }
  if (l->note_len)
    memcpy(note, l->note, l->note_len);
  if ((size_t)off > l->note_len)
    memset(note + l->note_len, 0, (size_t)off - l->note_len);
  memcpy(note + off, buf, size);
  coord_lock_t *h = l->h;
  pin_locked(l);
  pthread_mutex_unlock(&L.mu);

  int rc = coord_lock_set_note(h, note, nlen);
  if (rc == COORD_ELOST)
    mark_lost(l, h); /* before on_lost, maybe: read and poll must agree now */

  pthread_mutex_lock(&L.mu);
  if (rc == 0 && l->h == h) {
    free(l->note);
    l->note = note;
    l->note_len = nlen;
    note = NULL;
  }
  pthread_mutex_unlock(&L.mu);
  free(note);
  unpin(l);
  if (rc == COORD_ELOST)
    return -EIO;
  return rc ? -cfs_errno(rc) : 0;
}

/* ---------------------------------------------------------------- helper threads */

/* Answers withdrawn requests and starts the retries that are due.  Never
 * waits for etcd. */
static void *timer_main(void *arg) {
  (void)arg;
  pthread_mutex_lock(&L.mu);
  while (!L.stop) {
    if (L.answers) {
      struct preq *a = L.answers;
      L.answers = NULL;
      pthread_mutex_unlock(&L.mu);
      while (a) {
        struct preq *n = a->next;
        answer(a, a->err);
        a = n;
      }
      pthread_mutex_lock(&L.mu);
      continue;
    }
    struct timespec now, next = {0};
    clock_gettime(CLOCK_MONOTONIC, &now);
    int have = 0;
    struct lkf *due = NULL;
    for (struct lkf *l = L.all; l && !due; l = l->next) {
      if (!l->retry)
        continue;
      if (!ts_before(&now, &l->retry_at))
        due = l;
      else if (!have || ts_before(&l->retry_at, &next))
        next = l->retry_at, have = 1;
    }
    if (due) {
      struct preq *pr = NULL;
      if (due->st == L_WAIT && due->pr && !due->h && !L.shutting_down)
        pr = start_locked(due);
      else
        due->retry = 0;
      if (pr) {
        pthread_mutex_unlock(&L.mu);
        answer(pr, pr->err);
        pthread_mutex_lock(&L.mu);
      }
      continue;
    }
    if (have)
      pthread_cond_timedwait(&L.timer_cv, &L.mu, &next);
    else
      pthread_cond_wait(&L.timer_cv, &L.mu);
  }
  pthread_mutex_unlock(&L.mu);
  return NULL;
}

/* Not under L.mu: an R_END job: unlock its handle (waits for the Delete),
 * then let the tries of its name go on. */
static void end_job(struct preq *job) {
  struct lkf *l = job->l;
  end_handle(l, job->h);
  pthread_mutex_lock(&L.mu);
  l->ending--;
  pthread_cond_broadcast(&L.rel_cv);
  int dead = unref_locked(l); /* the job's */
  pthread_mutex_unlock(&L.mu);
  if (dead)
    lkf_free(l);
  preq_free(job);
}

/* Puts the note of each granted write and answers the write; ends the
 * handles of R_END jobs. */
static void *note_main(void *arg) {
  (void)arg;
  pthread_mutex_lock(&L.mu);
  while (!L.stop) {
    struct preq *pr = L.notes;
    if (!pr) {
      pthread_cond_wait(&L.note_cv, &L.mu);
      continue;
    }
    L.notes = pr->next;
    if (!L.notes)
      L.notes_t = &L.notes;
    pthread_mutex_unlock(&L.mu);
    if (pr->kind == R_END) {
      end_job(pr);
      pthread_mutex_lock(&L.mu);
      continue;
    }
    int rc = put_note(pr->l, pr->buf, pr->size, pr->off);
    if (rc)
      fuse_reply_err(pr->req, -rc);
    else
      fuse_reply_write(pr->req, pr->size);
    unref(pr->l);
    preq_free(pr);
    pthread_mutex_lock(&L.mu);
  }
  pthread_mutex_unlock(&L.mu);
  return NULL;
}

/* ---------------------------------------------------------------- hooks */

int locks_init(void) {
  pthread_condattr_t a;
  if (pthread_condattr_init(&a))
    return COORD_ENOMEM;
  pthread_condattr_setclock(&a, CLOCK_MONOTONIC);
  int rc = pthread_cond_init(&L.rel_cv, &a) || pthread_cond_init(&L.timer_cv, &a);
  pthread_condattr_destroy(&a);
  if (rc)
    return COORD_ENOMEM;
  L.notes_t = &L.notes;
  /* started after daemonizing, with main's signals blocked (inherited) */
  if (pthread_create(&L.timer, NULL, timer_main, NULL))
    return COORD_ENOMEM;
  L.threads = 1;
  if (pthread_create(&L.noter, NULL, note_main, NULL))
    return COORD_ENOMEM;
  L.threads = 2;
  return 0;
}

void locks_shutdown(void) {
  /* The session loop has ended: no worker runs and no release will come.
   * Stop the helper threads, withdraw what waits, release what is held,
   * free every lock file (so main.c must call this before
   * cfs_files_shutdown, which then finds no lock file).  A callback
   * starting after the claims below finds its handle abandoned; one already
   * running is waited for, since it may be queueing a note job. */
  pthread_mutex_lock(&L.mu);
  L.shutting_down = 1;
  L.stop = 1;
  pthread_cond_broadcast(&L.timer_cv);
  pthread_cond_broadcast(&L.note_cv);
  pthread_mutex_unlock(&L.mu);
  if (L.threads > 0)
    pthread_join(L.timer, NULL);
  if (L.threads > 1)
    pthread_join(L.noter, NULL); /* a note's Put in flight ends within the call timeout */
  L.threads = 0;

  pthread_mutex_lock(&L.mu);
  size_t n = 0;
  for (struct lkf *l = L.all; l; l = l->next)
    n++;
  struct lkf **ls = calloc(n ? n : 1, sizeof(*ls));
  coord_lock_t **hs = calloc(n ? n : 1, sizeof(*hs));
  struct preq **prs = calloc(n ? n : 1, sizeof(*prs));
  coord_lock_t ***cs = calloc(n ? n : 1, sizeof(*cs));
  size_t *ncs = calloc(n ? n : 1, sizeof(*ncs));
  size_t i = 0;
  for (struct lkf *l = L.all; l && ls && hs && prs && cs && ncs; l = l->next, i++) {
    ls[i] = l;
    l->refs++;      /* ours, while we work */
    prs[i] = l->pr; /* claimed; its handle is ended below, which cancels it */
    l->pr = NULL;
    l->retry = 0;
    l->registering = 0;
    hs[i] = detach_locked(l); /* nothing is pinned: no thread is left to pin */
    cs[i] = l->cancelling;    /* ended below: their callbacks find them gone */
    ncs[i] = l->ncancelling;
    l->cancelling = NULL;
    l->ncancelling = l->capcancelling = 0;
  }
  struct preq *answers = L.answers, *notes = L.notes;
  L.answers = L.notes = NULL;
  L.notes_t = &L.notes;
  while (L.in_cb > 0)
    pthread_cond_wait(&L.cv, &L.mu);
  pthread_mutex_unlock(&L.mu);
  /* unmounted: nobody to answer; fuse_reply_none frees the requests */
  for (struct preq *p = answers, *nx; p; p = nx) {
    nx = p->next;
    fuse_reply_none(p->req);
    preq_free(p);
  }
  for (struct preq *p = notes, *nx; p; p = nx) {
    nx = p->next;
    if (p->kind == R_END) {
      end_job(p);
      continue;
    }
    fuse_reply_none(p->req);
    unref(p->l);
    preq_free(p);
  }
  for (size_t j = 0; j < i; j++) {
    struct lkf *l = ls[j];
    if (hs[j])
      end_handle(l, hs[j]); /* waits: a pending acquire is cancelled */
    for (size_t k = 0; k < ncs[j]; k++)
      end_handle(l, cs[j][k]);
    free(cs[j]);
    if (prs[j]) {
      fuse_reply_none(prs[j]->req);
      preq_free(prs[j]);
    }
    pthread_mutex_lock(&L.mu);
    struct cfs_file *f = l->f;
    l->f = NULL;
    if (f)
      l->refs--; /* the file's (ours keeps it) */
    pthread_mutex_unlock(&L.mu);
    cfs_file_free(f);
    unref(l); /* ours */
  }
  free(ls);
  free(hs);
  free(prs);
  free(cs);
  free(ncs);
}

void locks_conn_init(struct fuse_conn_info *conn) {
  if (conn->capable & FUSE_CAP_FLOCK_LOCKS)
    conn->want |= FUSE_CAP_FLOCK_LOCKS;
}

int locks_stat(const char *rel, struct stat *st) {
  (void)st; /* fs.c's regular file 0644, size 0 */
  return cfs_lock_name_ok(rel) ? 0 : -ENOENT;
}

struct name_set {
  char **v;
  size_t n, cap;
};

static int name_seen(struct name_set *s, const char *name, size_t len) {
  for (size_t i = 0; i < s->n; i++)
    if (strlen(s->v[i]) == len && !memcmp(s->v[i], name, len))
      return 1;
  return 0;
}

int locks_list(void (*fill)(const char *name, mode_t mode, void *arg), void *arg) {
  coord_range_opts_t ro = {.prefix = 1, .keys_only = 1, .timeout_ms = g.o.timeout_ms};
  coord_kv_result_t *r = NULL;
  int rc = coord_kv_get(g.c, LOCKS_PREFIX, &ro, &r);
  if (rc)
    return -cfs_errno(rc);
  struct name_set s = {0};
  size_t pl = strlen(LOCKS_PREFIX);
  for (size_t i = 0; i < r->n; i++) {
    const char *k = r->kvs[i].key;
    size_t kl = r->kvs[i].key_len;
    if (kl <= pl || memcmp(k, LOCKS_PREFIX, pl))
      continue;
    const char *name = k + pl;
    const char *slash = memchr(name, '/', kl - pl);
    if (!slash || slash == name) /* /locks/<name>/<lease>: others are not locks */
      continue;
    size_t nl = (size_t)(slash - name);
    if (nl > 255 || memchr(name, 0, nl) || name_seen(&s, name, nl))
      continue;
    char *copy = strndup(name, nl);
    if (!copy || !cfs_lock_name_ok(copy)) {
      free(copy);
      continue;
    }
    if (s.n == s.cap) {
      size_t cap = s.cap ? 2 * s.cap : 16;
      char **v = realloc(s.v, cap * sizeof(*v));
      if (!v) {
        free(copy);
        rc = -ENOMEM;
        break;
      }
      s.v = v;
      s.cap = cap;
    }
    s.v[s.n++] = copy;
  }
  coord_kv_result_free(r);
  for (size_t i = 0; i < s.n; i++) {
    if (!rc)
      fill(s.v[i], S_IFREG, arg);
    free(s.v[i]);
  }
  free(s.v);
  return rc;
}

void locks_open(fuse_req_t req, const char *rel, struct cfs_file *f, struct fuse_file_info *fi, int create) {
  if (!cfs_lock_name_ok(rel)) {
    fi->fh = 0;
    cfs_file_free(f);
    fuse_reply_err(req, strchr(rel, '/') ? EINVAL : ENOENT);
    return;
  }
  struct lkf *l = calloc(1, sizeof(*l));
  f->key = strdup(rel);
  if (!l || !(l->name = strdup(rel)) || !f->key) {
    free(l ? l->name : NULL);
    free(l);
    fi->fh = 0;
    cfs_file_free(f);
    fuse_reply_err(req, ENOMEM);
    return;
  }
  l->f = f;
  l->refs = 1; /* the file's */
  f->priv = l;
  fi->direct_io = 1;
  pthread_mutex_lock(&L.mu);
  l->next = L.all;
  if (L.all)
    L.all->prev = l;
  L.all = l;
  pthread_mutex_unlock(&L.mu);
  /* Opening never takes the lock (a write or flock does): answer now. */
  if (create)
    cfs_reply_create(req, f->path, fi); /* forgets the inode itself if the opener is gone */
  else if (fuse_reply_open(req, fi) == -ENOENT)
    drop_file(l); /* the opener is gone: no release will come */
}

static struct lkf *LK(struct cfs_file *f) {
  return f ? (struct lkf *)f->priv : NULL;
}

/* JSON about the lock: holder (lowest create revision), its note, token and
 * TTL left, waiters, and this file's own state. */
static int build_info(struct lkf *l, char **out, size_t *len) {
  /* held before the Range (and still, after it): our key must be the holder,
   * or the lock is lost even if on_lost has not arrived yet */
  pthread_mutex_lock(&L.mu);
  coord_lock_t *h0 = l->st == L_HELD && l->key ? l->h : NULL;
  char *key0 = h0 ? strdup(l->key) : NULL;
  pthread_mutex_unlock(&L.mu);
  char *prefix = NULL;
  if (asprintf(&prefix, LOCKS_PREFIX "%s/", l->name) < 0) {
    free(key0);
    return -ENOMEM;
  }
  coord_range_opts_t ro = {.prefix = 1,
                           .limit = 1,
                           .sort_order = COORD_SORT_ASCEND,
                           .sort_target = COORD_SORT_CREATE,
                           .timeout_ms = g.o.timeout_ms};
  coord_kv_result_t *r = NULL;
  int rc = coord_kv_get(g.c, prefix, &ro, &r);
  free(prefix);
  if (rc) {
    free(key0);
    return -cfs_errno(rc);
  }
  coord_kv_t *holder = r->n ? &r->kvs[0] : NULL;
  int gone = key0 && (!holder || strcmp(holder->key, key0));
  free(key0);
  if (gone) {
    coord_kv_result_free(r);
    mark_lost(l, h0); /* no-op if it changed meanwhile (then it is not ours to judge) */
    pthread_mutex_lock(&L.mu);
    int lost = l->st == L_LOST && l->h == h0;
    pthread_mutex_unlock(&L.mu);
    if (lost)
      return -EIO;
    return build_info(l, out, len);
  }
  int64_t ttl_ms = 0, granted = 0;
  if (holder && holder->lease) {
    if (coord_lease_ttl(g.c, holder->lease, &ttl_ms, &granted))
      ttl_ms = 0;
    if (ttl_ms < 0)
      ttl_ms = 0;
  }
  pthread_mutex_lock(&L.mu);
  enum lst st = l->st;
  int mine = holder && l->st == L_HELD && l->key && !strcmp(l->key, holder->key);
  pthread_mutex_unlock(&L.mu);
  static const char *const names[] = {"none", "waiting", "held", "lost"};
  json_t *o = json_object();
  json_object_set_new(o, "name", json_string(l->name));
  json_object_set_new(o, "holder", holder ? json_stringn(holder->key, holder->key_len) : json_null());
  json_t *note = holder ? json_stringn(holder->value, holder->value_len) : NULL; /* NULL: not UTF-8 */
  json_object_set_new(o, "holder_note", note ? note : json_null());
  json_object_set_new(o, "token", json_integer(holder ? holder->create_revision : 0));
  json_object_set_new(o, "ttl_ms", json_integer(ttl_ms));
  json_object_set_new(o, "waiters", json_integer(r->count > 0 ? r->count - 1 : 0));
  json_object_set_new(o, "held_by_me", json_boolean(mine));
  json_object_set_new(o, "state", json_string(names[st]));
  json_object_set_new(o, "revision", json_integer(r->revision));
  coord_kv_result_free(r);
  char *s = json_dumps(o, JSON_COMPACT | JSON_PRESERVE_ORDER);
  json_decref(o);
  if (!s)
    return -ENOMEM;
  size_t n = strlen(s);
  char *buf = malloc(n + 2);
  if (!buf) {
    free(s);
    return -ENOMEM;
  }
  memcpy(buf, s, n);
  buf[n] = '\n';
  buf[n + 1] = 0;
  free(s);
  *out = buf;
  *len = n + 1;
  return 0;
}

void locks_read(fuse_req_t req, struct cfs_file *f, size_t size, off_t off) {
  struct lkf *l = LK(f);
  pthread_mutex_lock(&L.mu);
  int lost = l->st == L_LOST;
  pthread_mutex_unlock(&L.mu);
  if (lost) {
    fuse_reply_err(req, EIO);
    return;
  }
  if (off == 0) {
    char *s = NULL;
    size_t n = 0;
    int rc = build_info(l, &s, &n);
    if (rc) {
      fuse_reply_err(req, -rc);
      return;
    }
    pthread_mutex_lock(&L.mu);
    free(l->snap);
    l->snap = s;
    l->snap_len = n;
    pthread_mutex_unlock(&L.mu);
  }
  pthread_mutex_lock(&L.mu);
  char *copy = NULL;
  size_t n = 0;
  if (l->snap && off >= 0 && (size_t)off < l->snap_len) {
    n = l->snap_len - (size_t)off < size ? l->snap_len - (size_t)off : size;
    copy = malloc(n);
    if (copy)
      memcpy(copy, l->snap + off, n);
    else
      n = 0;
  }
  pthread_mutex_unlock(&L.mu);
  fuse_reply_buf(req, copy, n);
  free(copy);
}

void locks_write(fuse_req_t req, struct cfs_file *f, const char *buf, size_t size, off_t off, int nonblock) {
  struct lkf *l = LK(f);
  if (off < 0 || (size_t)off > NOTE_MAX || size > NOTE_MAX - (size_t)off) {
    fuse_reply_err(req, EFBIG);
    return;
  }
  for (;;) {
    pthread_mutex_lock(&L.mu);
    enum lst st = l->st;
    pthread_mutex_unlock(&L.mu);
    int rc;
    switch (st) {
    case L_HELD: /* the holder's write: the note */
      rc = put_note(l, buf, size, off);
      break;
    case L_LOST:
      rc = -EIO;
      break;
    case L_WAIT: /* another request of this open file waits for the lock */
      rc = nonblock ? -EAGAIN : -EDEADLK;
      break;
    default: /* L_NONE: writing acquires */
      if (!nonblock) {
        if (start_acquire(req, l, R_WRITE, buf, size, off) == -EBUSY)
          continue;
        return; /* answered now or later */
      }
      rc = try_acquire(l);
      if (rc == -EWOULDBLOCK)
        rc = -EAGAIN;
      if (!rc)
        rc = put_note(l, buf, size, off);
    }
    if (rc)
      fuse_reply_err(req, -rc);
    else
      fuse_reply_write(req, size);
    return;
  }
}

void locks_flush(fuse_req_t req, struct cfs_file *f) {
  struct lkf *l = LK(f);
  pthread_mutex_lock(&L.mu);
  int lost = l->st == L_LOST;
  if (l->st == L_HELD)
    l->flushed = 1; /* see wait_own_release_locked */
  pthread_mutex_unlock(&L.mu);
  fuse_reply_err(req, lost ? EIO : 0); /* close() reports a lost lock */
}

void locks_release(struct cfs_file *f) {
  struct lkf *l = LK(f);
  if (!l)
    return;
  pthread_mutex_lock(&L.mu);
  /* a waiting request keeps the file open, so none can wait here; if one
   * did, it is withdrawn */
  struct preq *pr = withdraw_locked(l);
  l->releasing = 1; /* tries of this name wait (wait_own_release_locked) */
  coord_lock_t *h = detach_unpinned_locked(l);
  l->f = NULL;
  if (!h) {
    l->releasing = 0;
    pthread_cond_broadcast(&L.rel_cv);
  }
  pthread_mutex_unlock(&L.mu);
  answer(pr, EINTR);
  if (h) {
    end_handle(l, h); /* the key is deleted when this returns */
    pthread_mutex_lock(&L.mu);
    l->releasing = 0;
    pthread_cond_broadcast(&L.rel_cv);
    pthread_mutex_unlock(&L.mu);
  }
  f->priv = NULL;
  unref(l); /* the file's; fs.c frees f */
}

void locks_poll(fuse_req_t req, struct cfs_file *f, struct fuse_pollhandle *ph) {
  struct lkf *l = LK(f);
  struct fuse_pollhandle *old = NULL;
  pthread_mutex_lock(&L.mu);
  unsigned ev = POLLIN | POLLOUT | POLLRDNORM | POLLWRNORM;
  if (l->st == L_LOST) {
    ev |= POLLERR;
    old = ph;
  } else if (ph) {
    old = l->ph; /* the newest poll is the one to wake */
    l->ph = ph;
  }
  pthread_mutex_unlock(&L.mu);
  if (old)
    fuse_pollhandle_destroy(old);
  fuse_reply_poll(req, ev);
}

void locks_flock(fuse_req_t req, struct cfs_file *f, int op) {
  struct lkf *l = LK(f);
  int nb = op & LOCK_NB;
  op &= ~LOCK_NB;
  if (op == LOCK_UN) {
    pthread_mutex_lock(&L.mu);
    coord_lock_t *h = NULL;
    struct preq *pr = NULL;
    if (l->st == L_WAIT)
      pr = withdraw_locked(l); /* another request of this file waits: withdraw it */
    else
      h = detach_unpinned_locked(l); /* flock -u: the key is gone when it returns */
    pthread_mutex_unlock(&L.mu);
    /* not EINTR for a flock: the kernel turns a flock's EINTR into
     * ERESTARTSYS, which reaches the caller as errno 512 when no signal is
     * pending */
    if (pr)
      answer(pr, pr->kind == R_FLOCK ? ENOLCK : EINTR);
    if (h)
      end_handle(l, h);
    fuse_reply_err(req, 0);
    return;
  }
  if (op != LOCK_EX && op != LOCK_SH) {
    fuse_reply_err(req, EINVAL);
    return;
  }
  for (;;) {
    pthread_mutex_lock(&L.mu);
    enum lst st = l->st;
    coord_lock_t *old = st == L_LOST ? detach_unpinned_locked(l) : NULL;
    if (st == L_LOST)
      st = L_NONE;
    pthread_mutex_unlock(&L.mu);
    if (old)
      end_handle(l, old); /* lost: take it anew */
    if (st == L_HELD) {
      fuse_reply_err(req, 0); /* this open file holds it already */
      return;
    }
    if (st == L_WAIT) {
      fuse_reply_err(req, nb ? EWOULDBLOCK : EDEADLK);
      return;
    }
    if (nb) {
      int rc = try_acquire(l);
      fuse_reply_err(req, -rc);
      return;
    }
    if (start_acquire(req, l, R_FLOCK, NULL, 0, 0) != -EBUSY)
      return; /* answered now or later */
  }
}

void locks_getlk(fuse_req_t req, struct cfs_file *f, struct flock *lock) {
  (void)f, (void)lock;
  fuse_reply_err(req, ENOSYS); /* POSIX locks stay in the kernel */
}

void locks_setlk(fuse_req_t req, struct cfs_file *f, struct flock *lock, int sleep) {
  (void)f, (void)lock, (void)sleep;
  fuse_reply_err(req, ENOSYS);
}

int locks_unlink(const char *rel) {
  (void)rel;
  return -EPERM; /* a lock is broken by revoking its lease, not by rm */
}
