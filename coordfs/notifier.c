/*
 * notifier.c — the notifier thread: makes inotify work for changes made by
 * any client.
 *
 * The kernel raises inotify events only for operations that go through it.
 * When the watch thread sees a change to something the kernel has looked up
 * (the name itself or its directory), it queues a job here and this thread
 * performs the matching operation on the mount itself:
 *
 *   J_MODIFY  open(O_WRONLY) + fallocate(KEEP_SIZE) + futimens + close
 *             -> IN_OPEN, IN_MODIFY, IN_ATTRIB, IN_CLOSE_WRITE
 *   J_CREATE  open(O_CREAT|O_EXCL) + close -> IN_CREATE, IN_CLOSE_WRITE
 *   J_MKDIR   mkdir                         -> IN_CREATE|IN_ISDIR
 *   J_UNLINK  unlink                        -> IN_DELETE
 *   J_RMDIR   rmdir                         -> IN_DELETE|IN_ISDIR
 *   J_INVAL   only drops the kernel's cached pages and attributes
 *   J_FORGET  only drops the kernel's cached name (a created file that was
 *             never committed, so that the name is looked up again)
 *
 * The daemon recognises these requests by thread id (cfs_is_self: the
 * request's pid is this thread's tid) and answers them from the local view:
 * the lookup of a name being created answers ENOENT (the cache already has
 * it), the lookup of a name being deleted answers as it was, and open,
 * write, setattr, create, mkdir, unlink and rmdir are no-ops that never reach
 * etcd; its opens are answered with noflush, so its close() sends no FLUSH
 * (and RELEASE does not wait).  notifier_current() tells fs.c which job is
 * in progress.
 *
 * Rules: a self-operation is only ever performed from this thread, never
 * from inside a FUSE handler, and never while holding g.lock, ev_lock or any
 * file lock (the operations wait for FUSE handlers that may need them).
 * nt_lock guards the queue and the current job; it is not held during the
 * operation itself.  On a read-only mount only J_INVAL has any effect.
 */
#include "coordfs.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

struct job {
  enum cfs_job_op op;
  char *path; /* mount path: "config/app" */
  fuse_ino_t ino;
  struct job *next;
};

static pthread_mutex_t nt_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t nt_cond = PTHREAD_COND_INITIALIZER;
static struct job *head, *tail;
static struct job *cur; /* the job being performed, owned by the thread */
static int stopping, started;
static pthread_t thread;

void notifier_queue(enum cfs_job_op op, const char *path, fuse_ino_t ino) {
  struct job *j = calloc(1, sizeof(*j));
  if (!j || !(j->path = strdup(path))) {
    free(j);
    return;
  }
  j->op = op;
  j->ino = ino;
  pthread_mutex_lock(&nt_lock);
  if (tail)
    tail->next = j;
  else
    head = j;
  tail = j;
  pthread_cond_broadcast(&nt_cond); /* shared with notifier_start's wait */
  pthread_mutex_unlock(&nt_lock);
}

int notifier_current(const char *path) {
  pthread_mutex_lock(&nt_lock);
  int op = cur && !strcmp(cur->path, path) ? (int)cur->op : -1;
  pthread_mutex_unlock(&nt_lock);
  return op;
}

static void perform(struct job *j) {
  char *full = malloc(strlen(g.o.mountpoint) + strlen(j->path) + 2);
  if (!full)
    return;
  sprintf(full, "%s/%s", g.o.mountpoint, j->path);
  int fd;
  struct stat st;
  if (j->op == J_CREATE || j->op == J_MKDIR) {
    /* the kernel may still hold the name with its old type (a key that
     * became a directory): drop it so that the operation reaches us */
    char *slash = strrchr(j->path, '/');
    if (slash) {
      *slash = 0;
      fuse_ino_t parent = cfs_inode_known(j->path);
      *slash = '/';
      if (parent)
        fuse_lowlevel_notify_inval_entry(g.se, parent, slash + 1, strlen(slash + 1));
    }
  }
  if (!g.o.ro) {
    switch (j->op) {
    case J_MODIFY:
      fd = open(full, O_WRONLY | O_NONBLOCK | O_NOFOLLOW | O_CLOEXEC);
      if (fd >= 0) {
        /* fallocate with KEEP_SIZE raises IN_MODIFY without touching the
         * kernel's idea of the size (which a writer of this mount may be
         * using for O_APPEND); ftruncate to the same size if not possible */
        if (fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, 1) && !fstat(fd, &st) && ftruncate(fd, st.st_size)) {
          /* the event is lost for this file; the value is still right */
        }
        (void)futimens(fd, NULL); /* IN_ATTRIB: the mtime is new */
        close(fd);
      }
      break;
    case J_CREATE:
      fd = open(full, O_WRONLY | O_CREAT | O_EXCL | O_NONBLOCK | O_NOFOLLOW | O_CLOEXEC, 0644);
      if (fd >= 0)
        close(fd);
      break;
    case J_MKDIR:
      (void)mkdir(full, 0755);
      break;
    case J_UNLINK:
      (void)unlink(full);
      break;
    case J_RMDIR:
      (void)rmdir(full);
      break;
    case J_INVAL:
    case J_FORGET:
      break;
    }
  }
  if (j->op == J_FORGET) {
    char *slash = strrchr(j->path, '/');
    if (slash) {
      *slash = 0;
      fuse_ino_t parent = cfs_inode_known(j->path);
      *slash = '/';
      if (parent)
        fuse_lowlevel_notify_inval_entry(g.se, parent, slash + 1, strlen(slash + 1));
    }
  }
  /* whatever pages the operation left are dropped: the next read asks */
  fuse_ino_t ino = cfs_inode_known(j->path);
  if (ino && (j->op == J_MODIFY || j->op == J_INVAL))
    fuse_lowlevel_notify_inval_inode(g.se, ino, 0, 0);
  free(full);
}

static void *notifier_main(void *arg) {
  (void)arg;
  pthread_mutex_lock(&nt_lock);
  g.notifier_tid = (pid_t)syscall(SYS_gettid);
  pthread_cond_broadcast(&nt_cond); /* notifier_start waits for the tid */
  for (;;) {
    while (!head && !stopping)
      pthread_cond_wait(&nt_cond, &nt_lock);
    if (stopping)
      break;
    struct job *j = head;
    head = j->next;
    if (!head)
      tail = NULL;
    cur = j;
    pthread_mutex_unlock(&nt_lock);
    perform(j);
    pthread_mutex_lock(&nt_lock);
    cur = NULL;
    free(j->path);
    free(j);
  }
  while (head) {
    struct job *j = head;
    head = j->next;
    free(j->path);
    free(j);
  }
  tail = NULL;
  pthread_mutex_unlock(&nt_lock);
  return NULL;
}

/* Returns once the thread's id is known, so that every FUSE request after
 * this can be told apart (g.notifier_tid is not written again). */
void notifier_start(void) {
  if (pthread_create(&thread, NULL, notifier_main, NULL))
    return;
  started = 1;
  pthread_mutex_lock(&nt_lock);
  while (!g.notifier_tid)
    pthread_cond_wait(&nt_cond, &nt_lock);
  pthread_mutex_unlock(&nt_lock);
}

void notifier_stop(void) {
  if (!started)
    return;
  pthread_mutex_lock(&nt_lock);
  stopping = 1;
  pthread_cond_signal(&nt_cond);
  pthread_mutex_unlock(&nt_lock);
  pthread_join(thread, NULL);
  started = 0;
}
