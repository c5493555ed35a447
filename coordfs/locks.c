/*
 * locks.c — /locks: one file per lock name, the same lock as libcoord's
 * coord_lock_* and `etcdctl lock /locks/<name>` (DESIGN.md "/locks").
 *
 * WHAT THE KERNEL SEES
 *   - Every valid name exists (lookup and stat always succeed, size 0), so
 *     `exec 9>/coord/locks/x` and `flock /coord/locks/x` open it without a
 *     create; `ls` lists only the names that have a holder or waiters in etcd
 *     (one keys-only Range over /locks/).  rm and mkdir are refused (EPERM,
 *     mkdir by fs.c).  A name can never hold '/': the kernel splits paths.
 *   - open for write (O_WRONLY/O_RDWR) takes the lock.  The FUSE request is
 *     kept pending (no worker thread waits) and answered with
 *     fuse_reply_open from the acquire callback on libcoord's event thread,
 *     in arrival order (etcd's Mutex queue).  O_NONBLOCK: try_acquire, EAGAIN
 *     at once when held.  open for read takes nothing.
 *   - flock(2) (FUSE_CAP_FLOCK_LOCKS, asked for in locks_conn_init) takes the
 *     same lock for the open file: LOCK_EX and LOCK_SH both take it (there is
 *     one, exclusive, lock per name), LOCK_NB is try_acquire (EWOULDBLOCK),
 *     LOCK_UN releases it whichever way it was taken.  A blocking LOCK_EX is
 *     kept pending like an open.
 *   - A pending open/flock registers fuse_req_interrupt_func: a signal to the
 *     waiter (flock -w's alarm, ^C, SIGKILL) cancels the acquire
 *     (coord_lock_cancel deletes the queue key) and the request is answered
 *     EINTR from the acquire callback, i.e. after the key is gone.  If the
 *     lock was granted at the same moment, it is released again.
 *   - The lock is released when the open file is released (last close, also
 *     on process death): FUSE release.  The kernel sends release without
 *     waiting for it (only the flush of close() is synchronous, and a flush
 *     comes for every close of every dup, so it cannot release), so the key
 *     is deleted a millisecond or so after close() returned, and the next
 *     request may even be read before the release.  So that a try on this
 *     mount right after its previous holder closed (or exited) never finds
 *     that holder's key, a try waits for this mount's releases of the name,
 *     and for up to FLUSH_GRACE_MS for the release of a flushed holder
 *     (wait_own_release_locked).  Another mount's release is not waited for.
 *     flock -u (LOCK_UN) is synchronous: the key is gone when it returns.
 *   - write: the bytes (placed at their offsets) become the holder's note
 *     (coord_lock_set_note, a guarded Put).  read: JSON about the lock,
 *     {"name","holder","holder_note","token","ttl_ms","waiters","held_by_me",
 *     "state"}, holder = lowest create revision under /locks/<name>/,
 *     waiters = the other keys; built at offset 0, later offsets read the
 *     same snapshot.
 *   - Lost lock (coord_lock_on_lost: lease expired or revoked, key deleted):
 *     the file's state becomes LOST; read, write, flush and poll then answer
 *     EIO (poll: POLLERR, and a poll handle kept by a waiting poll is
 *     notified).  The next waiter proceeds by itself (the key is gone).
 *     LOCK_UN or release drop the lost handle; a new flock takes it anew.
 *   - TTL: --lock-ttl (g.o.lock_ttl_ms); libcoord keeps held leases alive.
 *
 * OBJECTS AND OWNERSHIP
 *   struct lkf is f->priv for every open file of /locks/<name>; it is on the
 *   global list L.all from open until freed.  It is reference counted
 *   (lkf->refs, under L.mu):
 *     - 1 for the open file: dropped at release, or when the open fails or
 *       its reply finds the opener gone (then locks.c frees the cfs_file too,
 *       since the kernel will send no release);
 *     - 1 per libcoord handle it started, until coord_lock_unlock on that
 *       handle has returned;
 *     - 1 per pin (below).
 *   At most one handle is current (lkf->h, state lkf->st); handles being
 *   unlocked are no longer current.
 *   A pending request (lkf->req) is answered exactly once, by whoever
 *   "claims" it under L.mu (sets lkf->req = NULL): the acquire callback in
 *   every case but the ones that fail before the acquire even started.
 *   Interrupts find their request by a unique id (lkf->req_id, passed as the
 *   interrupt data), never by pointer: an interrupt callback of libfuse can
 *   run just after the request was answered and the lkf freed.
 *
 * THREADS AND LOCKS
 *   L.mu (private) guards every lkf field and L.all.  It is a leaf for the
 *   purpose of libcoord: no libcoord call that can wait (unlock, cancel,
 *   acquire, set_note, kv/lease calls) and no fuse_reply_* / notification is
 *   made while holding it.  Calls that only read a handle (coord_lock_key,
 *   coord_lock_token) are not made under it either.  g.lock is not used here
 *   except inside cfs_reply_create (fs.c), never with L.mu held.  file->lock
 *   is NOT used by locks.c (fs.c holds it around locks_release only); the
 *   event-thread callbacks never take it, so a release that waits in
 *   coord_lock_unlock cannot deadlock with them.
 *   A handle is used outside L.mu only while "pinned" (lkf->pins > 0): an
 *   unlocker that finds the lkf pinned hands the handle to the last unpinner
 *   (lkf->deferred) instead of freeing it under the pinner's feet.
 *   Threads:
 *     - FUSE workers run the hooks; they may wait for etcd (try_acquire,
 *       set_note, the read's Range, the blocking unlock of LOCK_UN/release),
 *       never for a lock to be granted.
 *     - libcoord's event thread runs on_acquired and on_lost; they never
 *       block (unlock from there is asynchronous) and answer the pending
 *       FUSE request directly.
 *     - libfuse runs on_interrupt on a worker with the request's own lock
 *       held; it only cancels (never waits for the event thread on anything
 *       that needs L.mu or the request lock).
 *     - main's thread runs locks_shutdown after the session loop ended and
 *       BEFORE cfs_files_shutdown: it claims every pending request (freed
 *       with fuse_reply_none), detaches every handle, waits on L.cv until no
 *       on_acquired runs (L.in_cb), unlocks the handles (blocking: keys
 *       deleted) and frees every lock file, so cfs_files_shutdown finds none.
 */
#include "coordfs.h"

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

enum lst {
  L_NONE, /* no handle */
  L_WAIT, /* acquire pending (a request is kept, or being answered) */
  L_HELD,
  L_LOST, /* was held, lease or key gone: EIO until LOCK_UN / release */
};

enum rkind { R_OPEN, R_CREATE, R_FLOCK };

struct lkf {
  struct cfs_file *f; /* NULL once the file is gone */
  char *name;
  int refs;
  enum lst st;
  coord_lock_t *h; /* current handle (L_WAIT: may still be NULL) */
  char *key;       /* held: our key, and token */
  int64_t token;
  /* the pending request */
  fuse_req_t req;
  uint64_t req_id;
  enum rkind kind;
  struct fuse_file_info fi; /* R_OPEN/R_CREATE: what to answer with */
  int interrupted;
  int releasing; /* locks_release is deleting this file's key (L.rel_cv) */
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
  pthread_cond_t cv;     /* in_cb went to 0 */
  pthread_cond_t rel_cv; /* a release finished (CLOCK_MONOTONIC, locks_init) */
  struct lkf *all;
  uint64_t next_id;
  int in_cb; /* on_acquired calls running (shut-down waits for them) */
  int shutting_down;
} L = {.mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER};

/* ---------------------------------------------------------------- helpers */

static void lkf_free(struct lkf *l) {
  if (l->ph)
    fuse_pollhandle_destroy(l->ph);
  free(l->name);
  free(l->key);
  free(l->note);
  free(l->snap);
  free(l->deferred);
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

/* Under L.mu: takes the current handle away (state L_NONE).  Returns it for
 * the caller to end_handle(), or NULL if there is none or l is pinned (then
 * the last unpinner ends it). */
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
    /* out of memory: unlock now and hope (the pinner only cancels) */
  }
  return h;
}

/* Under L.mu: detach_locked once no pin is held, so that the handle comes
 * back to the caller (not deferred to the last unpinner, which may be the
 * event thread, where unlocking cannot wait) and the caller's blocking
 * unlock has deleted the key when it returns.  Pins are short: a reply
 * sent from on_acquired, a cancel, a note's Put. */
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

/* Under L.mu: claim the pending request (NULL if already answered). */
static fuse_req_t claim_locked(struct lkf *l) {
  fuse_req_t req = l->req;
  l->req = NULL;
  l->req_id = 0;
  return req;
}

/* The open file is gone without a release to come (failed open, or the
 * opener vanished before the answer): free the cfs_file, drop its ref. */
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

/* Not under L.mu: answer a successful open/create/flock.  Returns the
 * fuse_reply_* result (-ENOENT: the requester is gone). */
static int reply_ok(fuse_req_t req, enum rkind kind, struct fuse_file_info *fi, const char *path) {
  switch (kind) {
  case R_OPEN:
    return fuse_reply_open(req, fi);
  case R_CREATE:
    cfs_reply_create(req, path, fi);
    return 0; /* cfs_reply_create forgets the inode itself; see locks_open */
  case R_FLOCK:
    return fuse_reply_err(req, 0);
  }
  return 0;
}

static int lock_errno(int status, int interrupted) {
  if (interrupted || status == COORD_ECANCELED)
    return EINTR;
  if (status == COORD_ELOCKED)
    return EWOULDBLOCK;
  return cfs_errno(status);
}

/* ---------------------------------------------------------------- callbacks */

/* Not under L.mu: the held lock `lock` of l is lost (libcoord said so, or a
 * guarded write found our key gone first).  Wakes a waiting poll. */
static void mark_lost(struct lkf *l, coord_lock_t *lock) {
  struct fuse_pollhandle *ph = NULL;
  pthread_mutex_lock(&L.mu);
  if (l->h == lock && l->st == L_HELD) {
    l->st = L_LOST;
    ph = l->ph;
    l->ph = NULL;
  }
  pthread_mutex_unlock(&L.mu);
  if (ph) {
    fuse_lowlevel_notify_poll(ph);
    fuse_pollhandle_destroy(ph);
  }
}

static void on_lost(coord_lock_t *lock, void *arg) {
  mark_lost(arg, lock);
}

/* Acquire outcome, on the event thread (or, for a lock granted before
 * coord_lock_acquire_async returned, still on the event thread). */
static void acquired(coord_lock_t *lock, int status, struct lkf *l) {
  pthread_mutex_lock(&L.mu);
  if (l->st != L_WAIT || (l->h && l->h != lock)) {
    /* abandoned: whoever took it away unlocks it */
    pthread_mutex_unlock(&L.mu);
    return;
  }
  l->h = lock;
  fuse_req_t req = claim_locked(l);
  enum rkind kind = l->kind;
  struct fuse_file_info fi = l->fi;
  int interrupted = l->interrupted;
  char *path = NULL;
  if (status == 0 && req && !interrupted) {
    l->st = L_HELD;
    l->flushed = 0;
    if (kind == R_CREATE && l->f)
      path = strdup(l->f->path);
    pin_locked(l);
    pthread_mutex_unlock(&L.mu);
    /* event thread: neither call waits */
    const char *k = coord_lock_key(lock);
    char *key = k ? strdup(k) : NULL;
    int64_t token = coord_lock_token(lock);
    coord_lock_on_lost(lock, on_lost, l);
    pthread_mutex_lock(&L.mu);
    if (l->h == lock) {
      free(l->key);
      l->key = key;
      l->token = token;
      key = NULL;
      free(l->note);
      l->note = NULL;
      l->note_len = 0;
    }
    pthread_mutex_unlock(&L.mu);
    free(key);
    int rc = reply_ok(req, kind, &fi, path ? path : "locks");
    free(path);
    int gone = rc == -ENOENT && kind != R_FLOCK;
    if (gone) {
      /* the opener is gone: no release will come for this file */
      pthread_mutex_lock(&L.mu);
      coord_lock_t *h = l->h == lock ? detach_locked(l) : NULL; /* pinned: deferred */
      pthread_mutex_unlock(&L.mu);
      if (h)
        end_handle(l, h);
    }
    unpin(l);
    if (gone)
      drop_file(l);
    return;
  }
  /* failed, cancelled, interrupted (granted or not), or nobody to tell */
  coord_lock_t *h = detach_locked(l);
  pthread_mutex_unlock(&L.mu);
  if (h)
    end_handle(l, h); /* event thread: asynchronous */
  if (!req)
    return;
  fuse_reply_err(req, lock_errno(status ? status : COORD_ECANCELED, interrupted));
  if (kind != R_FLOCK)
    drop_file(l);
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

/* libfuse, on a worker, with the request's lock held. */
static void on_interrupt(fuse_req_t req, void *data) {
  (void)req;
  uint64_t id = (uint64_t)(uintptr_t)data;
  pthread_mutex_lock(&L.mu);
  struct lkf *l = L.all;
  while (l && !(l->req && l->req_id == id))
    l = l->next;
  coord_lock_t *h = NULL;
  if (l) {
    l->interrupted = 1;
    h = l->h;
    if (h)
      pin_locked(l);
  }
  pthread_mutex_unlock(&L.mu);
  if (h) {
    coord_lock_cancel(h); /* its callback answers EINTR once the key is gone */
    unpin(l);
  }
  /* no handle yet: start_acquire sees l->interrupted and cancels */
}

/* ---------------------------------------------------------------- acquiring */

/* Starts the pending acquire for req (open, create or flock) and leaves the
 * answer to on_acquired.  Not under L.mu; l->st is L_NONE. */
static void start_acquire(fuse_req_t req, struct lkf *l, enum rkind kind, struct fuse_file_info *fi) {
  pthread_mutex_lock(&L.mu);
  uint64_t id = ++L.next_id;
  l->st = L_WAIT;
  l->h = NULL;
  l->req = req;
  l->req_id = id;
  l->kind = kind;
  if (fi)
    l->fi = *fi;
  l->interrupted = 0;
  pin_locked(l);
  pthread_mutex_unlock(&L.mu);

  fuse_req_interrupt_func(req, on_interrupt, (void *)(uintptr_t)id); /* may call it now */

  pthread_mutex_lock(&L.mu);
  int stop = l->interrupted || L.shutting_down;
  if (!stop)
    l->refs++; /* the handle's */
  pthread_mutex_unlock(&L.mu);
  int rc = COORD_ECANCELED;
  coord_lock_t *h = NULL;
  if (!stop) {
    rc = coord_lock_acquire_async(g.c, l->name, g.o.lock_ttl_ms, on_acquired, l, &h);
    if (rc < 0)
      unref(l);
  }
  pthread_mutex_lock(&L.mu);
  fuse_req_t mine = NULL;
  int cancel = 0;
  if (rc < 0) {
    /* never started: nobody else answers */
    mine = claim_locked(l);
    l->st = L_NONE;
  } else if (l->st == L_WAIT && (l->h == NULL || l->h == h)) {
    l->h = h;
    cancel = l->interrupted || L.shutting_down;
  }
  int interrupted = l->interrupted;
  pthread_mutex_unlock(&L.mu);
  if (cancel)
    coord_lock_cancel(h);
  if (mine) {
    fuse_reply_err(mine, lock_errno(rc, interrupted));
    if (kind != R_FLOCK)
      drop_file(l);
  }
  unpin(l);
}

/* A try (LOCK_NB, O_NONBLOCK) must not fail because of this mount's own
 * previous holder that has already closed.  The kernel sends FUSE_RELEASE
 * without waiting for it, so a process that closed the lock file (or
 * exited) has returned before its key is deleted, and the next try can
 * even be read from /dev/fuse before that RELEASE.  So a try on a name
 * waits, under L.mu:
 *   - while a file of this mount is releasing it (locks_release deleting
 *     the key), at most a little longer than that Delete may take;
 *   - while a holder of this mount has been flushed (a close) but not
 *     released, at most FLUSH_GRACE_MS: if no release follows, another
 *     descriptor keeps the lock held and the try fails as it should. */
#define FLUSH_GRACE_MS 100

enum hold { H_NONE, H_FLUSHED, H_RELEASING };

static enum hold own_holder_locked(const char *name) {
  enum hold w = H_NONE;
  for (struct lkf *x = L.all; x; x = x->next)
    if (!strcmp(x->name, name)) {
      if (x->releasing)
        return H_RELEASING;
      if (x->flushed && x->st == L_HELD)
        w = H_FLUSHED;
    }
  return w;
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
 * or -errno. */
static int try_acquire(struct lkf *l) {
  pthread_mutex_lock(&L.mu);
  wait_own_release_locked(l->name);
  l->refs++; /* the handle's */
  pthread_mutex_unlock(&L.mu);
  coord_lock_t *h = NULL;
  int rc = coord_lock_try_acquire(g.c, l->name, g.o.lock_ttl_ms, &h);
  if (rc < 0) {
    unref(l);
    return -lock_errno(rc, 0);
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

/* ---------------------------------------------------------------- hooks */

int locks_init(void) {
  pthread_condattr_t a;
  if (pthread_condattr_init(&a))
    return COORD_ENOMEM;
  pthread_condattr_setclock(&a, CLOCK_MONOTONIC);
  int rc = pthread_cond_init(&L.rel_cv, &a);
  pthread_condattr_destroy(&a);
  return rc ? COORD_ENOMEM : 0;
}

void locks_shutdown(void) {
  /* The session loop has ended: no worker runs and no release will come.
   * Withdraw what waits, release what is held, free every lock file (so
   * main.c must call this before cfs_files_shutdown, which then finds no
   * lock file).  A callback starting after the claims below finds its
   * attempt abandoned; one already running is waited for, since it may be
   * freeing its file. */
  pthread_mutex_lock(&L.mu);
  L.shutting_down = 1;
  size_t n = 0;
  for (struct lkf *l = L.all; l; l = l->next)
    n++;
  struct lkf **ls = calloc(n ? n : 1, sizeof(*ls));
  coord_lock_t **hs = calloc(n ? n : 1, sizeof(*hs));
  fuse_req_t *reqs = calloc(n ? n : 1, sizeof(*reqs));
  size_t i = 0;
  for (struct lkf *l = L.all; l && ls && hs && reqs; l = l->next, i++) {
    ls[i] = l;
    l->refs++; /* ours, while we work */
    reqs[i] = claim_locked(l);
    hs[i] = detach_locked(l);
  }
  while (L.in_cb > 0)
    pthread_cond_wait(&L.cv, &L.mu);
  pthread_mutex_unlock(&L.mu);
  for (size_t j = 0; j < i; j++) {
    struct lkf *l = ls[j];
    if (hs[j])
      end_handle(l, hs[j]); /* waits: a pending acquire is cancelled */
    if (reqs[j])
      fuse_reply_none(reqs[j]); /* unmounted: nobody to answer; frees it */
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
  free(reqs);
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

  enum rkind kind = create ? R_CREATE : R_OPEN;
  if (!f->writable) {
    if (reply_ok(req, kind, fi, f->path) == -ENOENT)
      drop_file(l);
    return;
  }
  if (fi->flags & O_NONBLOCK) {
    int rc = try_acquire(l);
    if (rc) {
      fuse_reply_err(req, rc == -EWOULDBLOCK ? EAGAIN : -rc);
      drop_file(l);
      return;
    }
    if (reply_ok(req, kind, fi, f->path) == -ENOENT) {
      pthread_mutex_lock(&L.mu);
      coord_lock_t *h = detach_locked(l);
      pthread_mutex_unlock(&L.mu);
      if (h)
        end_handle(l, h);
      drop_file(l);
    }
    return;
  }
  start_acquire(req, l, kind, fi);
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

void locks_write(fuse_req_t req, struct cfs_file *f, const char *buf, size_t size, off_t off) {
  struct lkf *l = LK(f);
  if (off < 0 || (size_t)off > NOTE_MAX || size > NOTE_MAX - (size_t)off) {
    fuse_reply_err(req, EFBIG);
    return;
  }
  pthread_mutex_lock(&L.mu);
  if (l->st != L_HELD) {
    int err = l->st == L_LOST ? EIO : EPERM;
    pthread_mutex_unlock(&L.mu);
    fuse_reply_err(req, err);
    return;
  }
  size_t end = (size_t)off + size;
  size_t nlen = end > l->note_len ? end : l->note_len;
  char *note = malloc(nlen ? nlen : 1);
  if (!note) {
    pthread_mutex_unlock(&L.mu);
    fuse_reply_err(req, ENOMEM);
    return;
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
    fuse_reply_err(req, EIO);
  else if (rc)
    fuse_reply_err(req, cfs_errno(rc));
  else
    fuse_reply_write(req, size);
}

void locks_flush(fuse_req_t req, struct cfs_file *f) {
  struct lkf *l = LK(f);
  pthread_mutex_lock(&L.mu);
  int lost = l->st == L_LOST;
  if (l->st == L_HELD)
    l->flushed = 1; /* see wait_own_release_locked */
  pthread_mutex_unlock(&L.mu);
  fuse_reply_err(req, lost ? EIO : 0);
}

void locks_release(struct cfs_file *f) {
  struct lkf *l = LK(f);
  if (!l)
    return;
  pthread_mutex_lock(&L.mu);
  /* nothing can be pending: a pending open has no file yet, and a pending
   * flock holds a reference on the file */
  l->releasing = 1; /* tries of this name wait (wait_own_release_locked) */
  coord_lock_t *h = l->st == L_WAIT ? NULL : detach_unpinned_locked(l);
  l->f = NULL;
  if (!h) {
    l->releasing = 0;
    pthread_cond_broadcast(&L.rel_cv);
  }
  pthread_mutex_unlock(&L.mu);
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
    coord_lock_t *h = NULL, *cancel = NULL;
    if (l->st == L_WAIT) {
      /* another thread's LOCK_EX on this file waits: withdraw it */
      l->interrupted = 1;
      if ((cancel = l->h))
        pin_locked(l);
    } else {
      h = detach_unpinned_locked(l); /* flock -u: the key is gone when it returns */
    }
    pthread_mutex_unlock(&L.mu);
    if (cancel) {
      coord_lock_cancel(cancel);
      unpin(l);
    }
    if (h)
      end_handle(l, h);
    fuse_reply_err(req, 0);
    return;
  }
  if (op != LOCK_EX && op != LOCK_SH) {
    fuse_reply_err(req, EINVAL);
    return;
  }
  pthread_mutex_lock(&L.mu);
  enum lst st = l->st;
  coord_lock_t *old = st == L_LOST ? detach_locked(l) : NULL;
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
  start_acquire(req, l, R_FLOCK, NULL);
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
