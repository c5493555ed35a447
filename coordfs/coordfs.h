/*
 * coordfs.h — what the parts of coordfs share.
 *
 * coordfs is a FUSE (low-level API) file system over libcoord:
 *
 *   main.c      options, daemonizing, start-up and shut-down
 *   fs.c        the inode table, dispatch by tree, the FUSE low-level ops
 *   cache.c     the watch-coherent key cache (one per tree: config, services)
 *   config.c    /config: files and directories from keys, buffered writes
 *   services.c  /services: instances, registration by an open file
 *   events.c    the watch thread and the /events/ streams
 *   status.c    /status
 *   procfd.c    /proc: does a closing process keep other descriptors?
 *   notifier.c  the notifier thread: self-operations so inotify works
 *   locks.c     /locks (issue 5) behind the locks_* hooks declared below
 *   local.c     mount-local files in /config (editors' temporary files)
 *   log.c       logging: stderr in the foreground, syslog as a daemon (log.h)
 *
 * Threads:
 *   - libfuse's worker threads (fuse_session_loop_mt) run the ops in fs.c.
 *     A handler never waits for the watch thread or the notifier thread.
 *   - the watch thread (events.c) reads the config, services and locks watches,
 *     applies each event to the caches, invalidates the kernel's cached pages
 *     and attributes of what changed, feeds the /events/ streams and queues
 *     self-operations for the notifier.  When quiet after start-up or a
 *     burst of events it gives freed memory back (malloc_trim).
 *   - the notifier thread (notifier.c) performs those self-operations on the
 *     mount.  Its requests are recognised by fuse_req_ctx(req)->pid ==
 *     g.notifier_tid and answered from the local view without etcd.
 *   - libcoord's own event thread runs lease-lost callbacks (services.c) and
 *     the lock callbacks (locks.c), which answer waiting lock requests.
 *   - re-registration threads (services.c), started by a lost lease or by
 *     the watch thread's DELETE of an instance still registered here, put
 *     the instance back; services_shutdown waits for them.
 *   - locks.c's timer thread (answers interrupted lock requests, retries
 *     acquires) and note thread (puts the note of a granted write); see
 *     locks.c's header.
 *
 * Locks (always taken in this order, never held across an etcd call, a
 * fuse_reply_* that may block, a kernel notification or a self-operation):
 *   g.lock        the caches (config, services), the inode table, counters
 *                 that are not atomics, the mount-local directories.
 *   file->lock    one open file: its write buffer and registration.
 *                 Taken before g.lock when both are needed.
 *   events lock   (events.c, private) the /events/ streams and their queues.
 *   notifier lock (notifier.c, private) the job queue and the current job.
 *   wr_lock       (config.c, private, a leaf) the list of writable /config
 *                 handles, their shown sizes and kept times.
 *   local lock    (local.c, private, a leaf: taken under g.lock and
 *                 file->lock) the mount-local files.
 *
 * Behaviour chosen where DESIGN.md leaves a choice:
 *   - an overwrite in place that lost the race (someone wrote the key after
 *     it was opened) fails its close with EBUSY; an append is retried on top
 *     of the other writer's value; transport failures are EIO, and a commit
 *     without an answer in time (it may still be applied) is ETIMEDOUT;
 *   - an open for writing in /config asks etcd first (config.c probe): the
 *     shell sees EIO/EACCES at the open, not at a close it ignores;
 *   - mode and owner are not stored: chmod/chown to what is shown succeed,
 *     any other is EPERM; times are kept on this mount in /config;
 *   - a flush commits a /config file when /proc shows it is the opener's
 *     last writable descriptor on it (fs.c flush_commits; after a write
 *     only, when /proc cannot tell); release commits whatever is left;
 *   - a directory this mount empties (rm, mv, rmdir below it) stays as a
 *     mount-local directory until it is removed, as on a local disk; one
 *     emptied by another client goes (config.c keep_parent);
 *   - a read-only open (and a failed lookup) in /config first asks etcd for the key's
 *     revision (keys only) and waits, at most 1 s, until the watch has
 *     brought the cache that far, so etcdctl's changes are read back at
 *     once; with etcd unreachable the cache answers after 0.5 s;
 *   - every name below /services looks up as a directory, so that
 *     `exec 3>/services/new/id` registers without a mkdir;
 *   - rm of a /services instance that an open file of this mount keeps
 *     registered fails with EBUSY; if anyone else deletes it, it is put
 *     back (under the same lease while that lives);
 *   - an unknown option, or a mount point that already has a coordfs on
 *     it, is refused before daemonizing (main.c);
 *   - on a read-only mount the notifier only invalidates (no self-ops);
 *   - flock/POSIX locks outside /locks stay with the kernel unless locks.c
 *     asks for FUSE_CAP_FLOCK_LOCKS/POSIX_LOCKS, then they are accepted.
 *
 * Ownership: a cfs_file belongs to the open file description (fi->fh) from
 * open/create until release, which frees it.  Cache nodes belong to their
 * cache.  Inodes belong to the inode table and live while the kernel holds
 * a lookup count on them.
 */
#ifndef COORDFS_H
#define COORDFS_H

#define FUSE_USE_VERSION 34
#include <fuse_lowlevel.h>

#include <pthread.h>
#include <stdint.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <time.h>

#include "coord.h"

/* etcd's default --max-request-bytes is 1.5 MiB; a Put carries the key and a
 * little framing besides the value. */
#define CFS_MAX_REQUEST (1536 * 1024)
#define CFS_REQUEST_OVERHEAD 512

/* ---------------------------------------------------------------- options */

struct cfs_opts {
  char *endpoints;
  char *user;
  char *password_file;
  char *password; /* from the file or $COORD_PASSWORD, never from argv */
  char *cacert, *cert, *key;
  char *prefix;
  char *subtree;     /* --subtree: load and watch only /config/<subtree>/ */
  char *local_names; /* --local-names: ':'-separated globs (NULL: default) */
  char *config_root; /* "/config/" or "/config/<subtree>/" (set by main) */
  int lock_ttl_ms;
  int service_ttl_ms;
  int timeout_ms; /* per etcd call (0: libcoord default) */
  int foreground, debug, ro, allow_other, default_permissions;
  int uid_set, gid_set;
  unsigned uid, gid;
  unsigned umask;   /* applied to writable files (0666) and directories (0777) */
  char *mountpoint; /* absolute */
};

/* ---------------------------------------------------------------- counters */

struct cfs_counters {
  uint64_t ops, cache_hits, events, errors, commits, conflicts;
};
#define CFS_COUNT(field) __atomic_add_fetch(&g.counters.field, 1, __ATOMIC_RELAXED)

/* ---------------------------------------------------------------- cache */

/* One path of a tree as the cache knows it: a key, a directory made of the
 * keys below it, a mount-local directory, or all at once. */
struct cfs_node {
  char *path;  /* relative to the tree: "app/db" */
  int present; /* the key exists in etcd */
  int bad;     /* the key cannot be a file name (left out, counted) */
  char *val;   /* value (NUL-terminated copy), when present */
  size_t len;
  int64_t create_rev, mod_rev, version, lease;
  int64_t rev;           /* revision of the last change applied (put or delete) */
  struct timespec mtime; /* when this mount saw that revision, or what
                            utimens set on this mount since (config.c) */
  struct timespec atime; /* the same for the access time */
  int ndesc;             /* present good keys strictly below path/ */
  int localdir;          /* a mount-local directory: made by mkdir on this
                            mount, or emptied of its last key by this mount;
                            cleared when a key is written below it */
  int nlocal;            /* localdir nodes strictly below path/ (they keep
                            this directory, as files keep it by ndesc) */
  int creating;          /* open handles that created it and have not committed */
  int pending;           /* writes of this mount to the key in flight (events.c) */
  struct cfs_node *next;
};

struct cfs_cache {
  const char *prefix; /* "/config/" */
  struct cfs_node **tab;
  size_t cap, n;
  int nbad;         /* present keys that cannot be file names */
  int newbad;       /* set by cache_apply when it made a key one of those
                       (for the caller to log); only callers clear it */
  int64_t rev;      /* highest revision applied */
  int64_t notified; /* highest revision whose event the watch thread has fully
                       handled (cache, kernel invalidation, notifier jobs) */
};

struct cfs_node *cache_find(struct cfs_cache *c, const char *path);
struct cfs_node *cache_node(struct cfs_cache *c, const char *path); /* find or add */
/* Applies a change at revision rev if it is newer than what the node holds.
 * Returns 1 if the node changed, 0 if not (an older or same revision: the
 * echo of this mount's own write).  version -1 (this mount's own write):
 * version and create_rev are worked out from the node, or left to the
 * watch event if it came first. */
int cache_apply(struct cfs_cache *c, const char *key, size_t key_len, int is_put, const void *val, size_t len,
                int64_t rev, int64_t create_rev, int64_t version, int64_t lease);
/* Frees the nodes of key and its ancestors that hold nothing any more
 * (deleted, nothing below, nothing open or in flight, older than the
 * watch's progress).  g.lock held; called by the watch thread. */
void cache_prune(struct cfs_cache *c, const char *key);
/* Marks a write of this mount to key as in flight (d = 1) or done (-1).
 * g.lock held. */
void cache_pending(struct cfs_cache *c, const char *key, int d);
/* Makes n a mount-local directory (on) or not, keeping the nlocal of its
 * ancestors right.  g.lock held; never set localdir directly. */
void cache_set_localdir(struct cfs_cache *c, struct cfs_node *n, int on);
int cache_is_dir(const struct cfs_node *n);
int cache_is_file(const struct cfs_node *n);
/* Calls fn for each visible child of dir (""=root of the tree). */
void cache_children(struct cfs_cache *c, const char *dir,
                    void (*fn)(struct cfs_node *n, const char *name, void *arg), void *arg);
/* 1 if key (relative to the tree) can be shown as a file path. */
int cfs_key_ok(const char *key, size_t len);
/* Why key cannot be shown as a file path (a constant string), or NULL. */
const char *cfs_key_problem(const char *key, size_t len);
/* Calls fn with each present key that cannot be a file name (its bytes
 * as in etcd, relative to the tree; NUL-terminated, len may count NULs). */
void cache_skipped(struct cfs_cache *c, void (*fn)(const char *key, size_t len, void *arg), void *arg);
/* opts.c: pure parsers of command-line durations and lock names. */
int cfs_parse_ms(const char *s);
int cfs_lock_name_ok(const char *name);
/* getxattr (name) or listxattr (name NULL) of a key's metadata; n NULL: not
 * a key.  Returns the length or -errno; size 0 asks for the length. */
int cache_xattr(const struct cfs_node *n, const char *name, char *buf, size_t size);
void cache_free(struct cfs_cache *c);

/* ---------------------------------------------------------------- files */

enum cfs_kind {
  FK_DIR,
  FK_CONFIG,  /* /config file */
  FK_SERVICE, /* /services/<name>/<id> */
  FK_EVENTS,  /* /events/... */
  FK_STATUS,
  FK_NOTIFY, /* opened by the notifier thread: every op is a no-op */
  FK_LOCK,   /* /locks/<name>: locks.c owns priv */
};

struct cfs_stream;

struct cfs_file {
  enum cfs_kind kind;
  pthread_mutex_t lock;
  char *path; /* mount path, "config/app" */
  char *key;  /* key relative to its tree ("app"; "chat/chat-1") */
  int writable;
  /* write buffer (config, service) */
  char *buf;
  size_t len, cap;
  int dirty;        /* buffer differs from what was committed */
  int truncating;   /* started by truncating: commit without a compare */
  int failed;       /* a write or commit failed: never commit */
  int creating;     /* holds a cfs_node.creating reference (config) */
  int wrote;        /* write() or ftruncate() since the last commit */
  int append;       /* O_APPEND (config): commit as compare-and-retry appends */
  size_t base_len;  /* append: bytes of the value the appends follow */
  int64_t base_rev; /* mod revision the buffer starts from (0: no key) */
  int times_set;    /* utimens while open (config, under config.c's
                       wr_lock): the times to keep after the commit */
  struct timespec atime, mtime;
  pid_t opener; /* process that opened it for writing (config, service), 0: unknown */
  /* config.c's list of writable /config handles (getattr sizes) */
  size_t shown_len; /* len as getattr shows it, under config.c's wr_lock */
  uint64_t wseq;    /* when it last changed size (newest wins) */
  struct cfs_file *wprev, *wnext;
  /* snapshot for reads (status, directory listings) */
  char *snap;
  size_t snap_len;
  /* service registration */
  uint64_t reg_id; /* services.c's registration, 0 if none */
  int registered;
  /* /events stream */
  struct cfs_stream *stream;
  /* directory listing: packed dirent buffer built at opendir */
  char *dirbuf;
  size_t dirlen;
  void *priv;                   /* locks.c; local.c (a mount-local /config file) */
  struct cfs_file *prev, *next; /* every open file (fs.c), for shut-down */
};

struct cfs_file *cfs_file_new(enum cfs_kind kind, const char *path);
void cfs_file_free(struct cfs_file *f);
/* At shut-down, after the FUSE loop ended: ends and frees every file whose
 * release never came (the kernel drops pending releases at unmount). */
void cfs_files_shutdown(void);

/* ---------------------------------------------------------------- global */

struct cfs {
  struct cfs_opts o;
  coord_t *c;
  struct fuse_session *se;
  pthread_mutex_t lock; /* g.lock, see above */
  pthread_cond_t cond;  /* with g.lock: broadcast when a cache's notified grows */
  struct cfs_cache config, services;
  struct cfs_counters counters;
  pid_t notifier_tid;
  struct timespec started;
  int connected; /* last etcd call reached etcd */
};
extern struct cfs g;

/* ---------------------------------------------------------------- fs.c */

extern const struct fuse_lowlevel_ops cfs_ops;
int cfs_errno(int coord_err); /* COORD_E* -> errno (positive) */
void cfs_fill_stat(struct stat *st, mode_t mode, off_t size, const struct timespec *mtime);
/* Is there a kernel-visible inode for this mount path?  Returns its number or 0. */
fuse_ino_t cfs_inode_known(const char *path);
int cfs_is_self(fuse_req_t req); /* request made by the notifier thread */
/* For locks.c: answer an open/create that was kept pending. */
void cfs_reply_create(fuse_req_t req, const char *path, struct fuse_file_info *fi);

/* ---------------------------------------------------------------- config.c */

int config_load(void); /* initial range; 0 or COORD_E* */
int config_stat(const char *rel, struct stat *st);
/* A name the cache does not have: if etcd has it (a key, or keys below it)
 * wait until the watch thread has brought it in.  1 if it exists. */
int config_freshen_name(const char *rel);
int config_list(const char *rel, void (*fill)(const char *name, mode_t mode, void *arg), void *arg);
int config_open(const char *rel, struct cfs_file *f, int flags, int create, mode_t mode);
int config_read(struct cfs_file *f, size_t size, off_t off, char **out, size_t *out_len); /* malloc'd */
int config_write(struct cfs_file *f, const char *buf, size_t size, off_t off);
/* 1 if it wrote to etcd, 0 if there was nothing to write, or -errno. */
int config_commit(struct cfs_file *f);
/* Size of the newest writable handle of this mount open on the mount path
 * (the kernel must not be told the committed size while a longer or
 * shorter value is being written).  1 and *size if there is one, else 0. */
int config_open_size(const char *path, off_t *size);
/* utimens of the mount path (rel below /config): kept as the file's times
 * on this mount until the key changes; a handle open for writing keeps
 * them past its commit.  0 or -errno. */
int config_set_times(const char *path, const char *rel, struct cfs_file *f, const struct timespec *atime,
                     const struct timespec *mtime);
int config_truncate(struct cfs_file *f, const char *rel, off_t size);
int config_unlink(const char *rel);
int config_mkdir(const char *rel);
int config_rmdir(const char *rel);
int config_rename(const char *from, const char *to, unsigned flags);
int config_xattr(const char *rel, const char *name, char *buf, size_t size); /* len or -errno */
int config_release(struct cfs_file *f);
void config_untrack(struct cfs_file *f); /* off the writable list (idempotent) */
/* etcd key (relative to /config/) that the file at rel reads and writes. */
char *config_key_of(const char *rel);

/* ---------------------------------------------------------------- local.c
 *
 * Mount-local files: /config names matching --local-names (editors'
 * temporary files) kept in this mount's memory, never in etcd.  config.c
 * routes them here; a local handle is an FK_CONFIG file whose priv is set.
 * local.c's lock is a leaf (may be taken under g.lock and file->lock). */

int local_init(const char *globs); /* NULL: the default list; "" none */
void local_free(void);
int local_name(const char *rel); /* the last component matches a glob */
int local_name_n(const char *rel, size_t len);
int local_exists(const char *rel); /* a local name, and such a file exists */
int local_stat(const char *rel, struct stat *st);
int local_stat_open(const char *rel, struct stat *st); /* unlinked, still open */
int local_dir_used(const char *dir);                   /* a local file below dir/ */
void local_list(const char *dir, void (*fn)(const char *name, mode_t mode, void *arg), void *arg);
int local_open(const char *rel, struct cfs_file *f, int flags, int create, mode_t mode);
int local_read(struct cfs_file *f, size_t size, off_t off, char **out, size_t *out_len);
int local_write(struct cfs_file *f, const char *buf, size_t size, off_t off);
void local_release(struct cfs_file *f); /* idempotent */
int local_setattr(const char *rel, struct cfs_file *f, const struct stat *attr, int to_set);
int local_unlink(const char *rel);
int local_rename(const char *from, const char *to, int noreplace);
int local_rename_dir(const char *from, const char *to);

/* ---------------------------------------------------------------- services.c */

int services_load(void);
int services_stat(const char *rel, struct stat *st);
int services_list(const char *rel, void (*fill)(const char *name, mode_t mode, void *arg), void *arg);
int services_open(const char *rel, struct cfs_file *f, int flags, int create);
int services_read(struct cfs_file *f, size_t size, off_t off, char **out, size_t *out_len);
int services_write(struct cfs_file *f, const char *buf, size_t size, off_t off);
int services_flush(struct cfs_file *f);
void services_release(struct cfs_file *f);
void services_shutdown(void); /* before coord_close: waits for re-registrations */
/* The watch saw key ("name/id") deleted at rev: if a file of this mount
 * keeps it registered, it is put back (from a thread; never blocks). */
void services_deleted(const char *key, size_t len, int64_t rev);
int services_unlink(const char *rel);
int services_xattr(const char *rel, const char *name, char *buf, size_t size);

/* ---------------------------------------------------------------- events.c */

enum cfs_stream_kind { S_CONFIG, S_SERVICES, S_LOCKS, S_NKINDS };
int events_start(void); /* creates the watches and the watch thread */
void events_stop(void);
int events_open(struct cfs_file *f, int which, int nonblock);
void events_read(fuse_req_t req, struct cfs_file *f, size_t size, int nonblock);
void events_poll(fuse_req_t req, struct cfs_file *f, struct fuse_pollhandle *ph);
void events_release(struct cfs_file *f);
/* A JSON string of bytes that may not be UTF-8 (invalid bytes become '?'). */
json_t *cfs_json_bytes(const char *p, size_t n);

/* ---------------------------------------------------------------- procfd.c */

/* Undoes mountinfo's octal escapes of a path field (in place). */
void cfs_mountinfo_unescape(char *s);
/* Learns this mount's device from /proc/self/mountinfo (after the mount). */
void procfd_init(const char *mountpoint);
/* 1 if process pid has a writable descriptor on inode ino of this mount,
 * 0 if it has none, -1 if that cannot be told.  Reads /proc only: safe in
 * a handler. */
int procfd_writer(pid_t pid, fuse_ino_t ino);
/* The process (thread group) of thread tid, or 0 if it cannot be told. */
pid_t procfd_tgid(pid_t tid);

/* ---------------------------------------------------------------- status.c */

int status_snapshot(char **out, size_t *len);
/* Logs a key of the tree under prefix ("/config/") that cannot be shown
 * (once, when it appears: events.c on cache newbad).  No lock held. */
void status_log_skipped(const char *prefix, const char *key, size_t len);
/* After the initial loads: logs every key that cannot be shown. */
void status_log_skipped_all(void);

/* ---------------------------------------------------------------- notifier.c */

enum cfs_job_op { J_MODIFY, J_CREATE, J_MKDIR, J_UNLINK, J_RMDIR, J_INVAL, J_FORGET };
void notifier_start(void);
void notifier_stop(void);
/* Queue a self-operation on the mount path (never blocks, no locks needed). */
void notifier_queue(enum cfs_job_op op, const char *path, fuse_ino_t ino);
/* The notifier's current self-operation on path, or -1 (for the daemon's
 * answers to the notifier's own requests). */
int notifier_current(const char *path);

/* ---------------------------------------------------------------- /locks hooks
 *
 * fs.c handles the /locks directory itself and calls these for everything
 * below it.  rel is the path below /locks ("deploy").  Each hook that takes
 * a fuse_req_t must answer it exactly once, now or later (a write or flock
 * that waits for the lock is answered from another thread; an interrupt
 * answers it EINTR).  f is the cfs_file of kind FK_LOCK made by fs.c;
 * f->priv is locks.c's own.  fs.c frees f after locks_release returns.
 */
int locks_init(void);                              /* after coord_new; 0 or COORD_E* */
void locks_shutdown(void);                         /* before coord_close */
void locks_conn_init(struct fuse_conn_info *conn); /* e.g. want FUSE_CAP_FLOCK_LOCKS */
int locks_stat(const char *rel, struct stat *st);  /* st prefilled (uid, gid, times); 0 or -errno */
int locks_list(void (*fill)(const char *name, mode_t mode, void *arg), void *arg); /* names in /locks */
/* open (create: O_CREAT of a new name); never takes the lock.  Answer with
 * fuse_reply_open(req, fi) (open) or cfs_reply_create(req, "locks/<rel>", fi)
 * (create), or an error. */
void locks_open(fuse_req_t req, const char *rel, struct cfs_file *f, struct fuse_file_info *fi, int create);
void locks_read(fuse_req_t req, struct cfs_file *f, size_t size, off_t off);
/* nonblock: O_NONBLOCK in the write's fi->flags (the file's flags now) */
void locks_write(fuse_req_t req, struct cfs_file *f, const char *buf, size_t size, off_t off, int nonblock);
void locks_flush(fuse_req_t req, struct cfs_file *f);
void locks_release(struct cfs_file *f); /* last close; no reply (fs.c replies) */
void locks_poll(fuse_req_t req, struct cfs_file *f, struct fuse_pollhandle *ph);
void locks_flock(fuse_req_t req, struct cfs_file *f, int op);
void locks_getlk(fuse_req_t req, struct cfs_file *f, struct flock *lock);
void locks_setlk(fuse_req_t req, struct cfs_file *f, struct flock *lock, int sleep);
int locks_unlink(const char *rel); /* 0 or -errno */

#endif
