/*
 * locks.c — /locks (issue 5).  This is the placeholder that keeps the
 * build linking: /locks lists nothing and every name below it is ENOENT.
 * The real implementation replaces this file and keeps the hooks declared
 * in coordfs.h ("/locks hooks"); fs.c dispatches everything below /locks
 * to them.
 */
#include "coordfs.h"

#include <errno.h>

int locks_init(void) {
  return 0;
}

void locks_shutdown(void) {}

void locks_conn_init(struct fuse_conn_info *conn) {
  (void)conn;
}

int locks_stat(const char *rel, struct stat *st) {
  (void)rel, (void)st;
  return -ENOENT;
}

int locks_list(void (*fill)(const char *name, mode_t mode, void *arg), void *arg) {
  (void)fill, (void)arg;
  return 0;
}

void locks_open(fuse_req_t req, const char *rel, struct cfs_file *f, struct fuse_file_info *fi, int create) {
  (void)rel, (void)create;
  fi->fh = 0;
  cfs_file_free(f);
  fuse_reply_err(req, create ? EACCES : ENOENT);
}

void locks_read(fuse_req_t req, struct cfs_file *f, size_t size, off_t off) {
  (void)f, (void)size, (void)off;
  fuse_reply_err(req, EBADF);
}

void locks_write(fuse_req_t req, struct cfs_file *f, const char *buf, size_t size, off_t off) {
  (void)f, (void)buf, (void)size, (void)off;
  fuse_reply_err(req, EBADF);
}

void locks_flush(fuse_req_t req, struct cfs_file *f) {
  (void)f;
  fuse_reply_err(req, 0);
}

void locks_release(struct cfs_file *f) {
  (void)f;
}

void locks_poll(fuse_req_t req, struct cfs_file *f, struct fuse_pollhandle *ph) {
  (void)f;
  if (ph)
    fuse_pollhandle_destroy(ph);
  fuse_reply_poll(req, 0);
}

void locks_flock(fuse_req_t req, struct cfs_file *f, int op) {
  (void)f, (void)op;
  fuse_reply_err(req, ENOSYS);
}

void locks_getlk(fuse_req_t req, struct cfs_file *f, struct flock *lock) {
  (void)f, (void)lock;
  fuse_reply_err(req, ENOSYS);
}

void locks_setlk(fuse_req_t req, struct cfs_file *f, struct flock *lock, int sleep) {
  (void)f, (void)lock, (void)sleep;
  fuse_reply_err(req, ENOSYS);
}

int locks_unlink(const char *rel) {
  (void)rel;
  return -ENOENT;
}
