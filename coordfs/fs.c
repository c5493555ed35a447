/*
 * fs.c — the inode table, dispatch by tree, and the FUSE low-level ops.
 *
 * Inodes are identified by their mount path ("config/app/db", "status";
 * "" is the root).  An inode number is handed out the first time the kernel
 * looks a path up and lives until the kernel forgets it; numbers are never
 * reused.  A /locks file is the exception: every lookup of it gets a new
 * inode (ino_new; see reply_entry_for and locks.c).  A rename moves the
 * path of the inode (and of the inodes below a renamed directory).
 *
 * Each op resolves its inode to a path, picks the tree from the first path
 * component and answers from that tree's module.  Requests made by the
 * notifier thread (cfs_is_self) are answered from the local view only: they
 * never reach etcd (see notifier.c).
 *
 * Locking: the inode table is under g.lock; paths are copied out before any
 * other work.  An open file's ops are serialised by file->lock.
 */
#include "coordfs.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/statvfs.h>
#include <unistd.h>

#define ENTRY_TIMEOUT 1.0
#define ATTR_TIMEOUT 1.0

struct cfs g;

/* ---------------------------------------------------------------- inode table */

struct inode {
  fuse_ino_t ino;
  char *path;
  uint64_t nlookup;
  struct inode *next_i, *next_p;
};

#define NBUCKETS 4096
static struct inode *by_ino[NBUCKETS], *by_path[NBUCKETS];
static fuse_ino_t next_ino = 2;
static struct inode root = {.ino = FUSE_ROOT_ID, .path = "", .nlookup = 1};

static size_t phash(const char *s) {
  uint64_t h = 1469598103934665603ull;
  for (; *s; s++)
    h = (h ^ (unsigned char)*s) * 1099511628211ull;
  return h % NBUCKETS;
}

static struct inode *find_ino(fuse_ino_t ino) {
  if (ino == FUSE_ROOT_ID)
    return &root;
  for (struct inode *i = by_ino[ino % NBUCKETS]; i; i = i->next_i)
    if (i->ino == ino)
      return i;
  return NULL;
}

static struct inode *find_path(const char *path) {
  if (!*path)
    return &root;
  for (struct inode *i = by_path[phash(path)]; i; i = i->next_p)
    if (!strcmp(i->path, path))
      return i;
  return NULL;
}

static void unlink_path(struct inode *in) {
  struct inode **pp = &by_path[phash(in->path)];
  for (; *pp; pp = &(*pp)->next_p)
    if (*pp == in) {
      *pp = in->next_p;
      return;
    }
}

/* Finds or makes the inode of path and adds one lookup.  g.lock held. */
static fuse_ino_t ino_ref(const char *path) {
  struct inode *in = find_path(path);
  if (!in) {
    in = calloc(1, sizeof(*in));
    if (!in || !(in->path = strdup(path))) {
      free(in);
      return 0;
    }
    in->ino = next_ino++;
    in->next_i = by_ino[in->ino % NBUCKETS];
    by_ino[in->ino % NBUCKETS] = in;
    size_t h = phash(path);
    in->next_p = by_path[h];
    by_path[h] = in;
  }
  if (in != &root)
    in->nlookup++;
  return in->ino;
}

/* A new inode for path with one lookup, never found by path (find_path,
 * cfs_inode_known): the kernel's inode of each lookup of a /locks file
 * (reply_entry_for).  g.lock held. */
static fuse_ino_t ino_new(const char *path) {
  struct inode *in = calloc(1, sizeof(*in));
  if (!in || !(in->path = strdup(path))) {
    free(in);
    return 0;
  }
  in->ino = next_ino++;
  in->nlookup = 1;
  in->next_i = by_ino[in->ino % NBUCKETS];
  by_ino[in->ino % NBUCKETS] = in;
  return in->ino;
}

static void ino_forget(fuse_ino_t ino, uint64_t n) {
  pthread_mutex_lock(&g.lock);
  struct inode *in = find_ino(ino);
  if (in && in != &root) {
    in->nlookup = in->nlookup > n ? in->nlookup - n : 0;
    if (!in->nlookup) {
      struct inode **pp = &by_ino[ino % NBUCKETS];
      for (; *pp; pp = &(*pp)->next_i)
        if (*pp == in) {
          *pp = in->next_i;
          break;
        }
      unlink_path(in);
      free(in->path);
      free(in);
    }
  }
  pthread_mutex_unlock(&g.lock);
}

/* Moves from (and everything below it) to to.  g.lock held. */
static void ino_rename(const char *from, const char *to) {
  size_t fl = strlen(from);
  for (size_t b = 0; b < NBUCKETS; b++)
    for (struct inode *i = by_ino[b]; i; i = i->next_i) {
      if (strncmp(i->path, from, fl) || (i->path[fl] && i->path[fl] != '/'))
        continue;
      char *np = malloc(strlen(to) + strlen(i->path + fl) + 1);
      if (!np)
        continue;
      sprintf(np, "%s%s", to, i->path + fl);
      unlink_path(i);
      free(i->path);
      i->path = np;
      size_t h = phash(np);
      i->next_p = by_path[h];
      by_path[h] = i;
    }
}

fuse_ino_t cfs_inode_known(const char *path) {
  pthread_mutex_lock(&g.lock);
  struct inode *in = find_path(path);
  fuse_ino_t ino = in && in->nlookup ? in->ino : 0;
  pthread_mutex_unlock(&g.lock);
  return ino;
}

/* Copy of the path of ino, or NULL. */
static char *path_of(fuse_ino_t ino) {
  pthread_mutex_lock(&g.lock);
  struct inode *in = find_ino(ino);
  char *p = in ? strdup(in->path) : NULL;
  pthread_mutex_unlock(&g.lock);
  return p;
}

static char *join(const char *dir, const char *name) {
  char *p = malloc(strlen(dir) + strlen(name) + 2);
  if (p)
    sprintf(p, "%s%s%s", dir, *dir ? "/" : "", name);
  return p;
}

/* The path of name in directory parent, or NULL after answering the request
 * (ESTALE: the kernel's parent is no longer known; ENOMEM). */
static char *child_path(fuse_req_t req, fuse_ino_t parent, const char *name) {
  char *dir = path_of(parent);
  char *path = dir ? join(dir, name) : NULL;
  if (!path)
    fuse_reply_err(req, dir ? ENOMEM : ESTALE);
  free(dir);
  return path;
}

/* ---------------------------------------------------------------- helpers */

enum tree { T_ROOT, T_CONFIG, T_SERVICES, T_LOCKS, T_EVENTS, T_STATUS, T_NONE };

/* The tree of a mount path and the path below the tree's top ("" at the top). */
static enum tree split(const char *path, const char **rel) {
  static const struct {
    const char *name;
    enum tree t;
  } tops[] = {{"config", T_CONFIG},
              {"services", T_SERVICES},
              {"locks", T_LOCKS},
              {"events", T_EVENTS},
              {"status", T_STATUS}};
  *rel = "";
  if (!*path)
    return T_ROOT;
  for (size_t i = 0; i < sizeof(tops) / sizeof(tops[0]); i++) {
    size_t n = strlen(tops[i].name);
    if (!strncmp(path, tops[i].name, n) && (path[n] == 0 || path[n] == '/')) {
      *rel = path[n] ? path + n + 1 : "";
      return tops[i].t;
    }
  }
  return T_NONE;
}

static int event_which(const char *rel) {
  if (!strcmp(rel, "config"))
    return S_CONFIG;
  if (!strcmp(rel, "services"))
    return S_SERVICES;
  if (!strcmp(rel, "locks"))
    return S_LOCKS;
  return -1;
}

int cfs_errno(int e) {
  switch (e) {
  case COORD_OK:
    return 0;
  case COORD_EINVAL:
  case COORD_EFORMAT:
    return EINVAL;
  case COORD_ENOMEM:
    return ENOMEM;
  case COORD_EACCES:
  case COORD_EAUTH:
    return EACCES;
  case COORD_ENOTFOUND:
    return ENOENT;
  case COORD_ELOCKED:
    return EAGAIN;
  case COORD_ECONFLICT:
    return EBUSY;
  case COORD_ETOOBIG:
    return EFBIG;
  case COORD_ECANCELED:
    return EINTR;
  case COORD_EEXIST:
    return EEXIST;
  case COORD_ENOTSUP:
    return ENOTSUP;
  default:
    return EIO;
  }
}

void cfs_fill_stat(struct stat *st, mode_t mode, off_t size, const struct timespec *mtime) {
  memset(st, 0, sizeof(*st));
  if (mode & 0200) /* a writable name: the umask option decides */
    mode = (mode & S_IFMT) | ((S_ISDIR(mode) ? 0777 : 0666) & ~g.o.umask);
  st->st_mode = mode;
  st->st_nlink = S_ISDIR(mode) ? 2 : 1;
  st->st_size = size;
  st->st_uid = g.o.uid;
  st->st_gid = g.o.gid;
  st->st_blksize = 4096;
  st->st_blocks = (size + 511) / 512;
  const struct timespec *t = mtime && mtime->tv_sec ? mtime : &g.started;
  st->st_mtim = st->st_ctim = st->st_atim = *t;
}

int cfs_is_self(fuse_req_t req) {
  return g.notifier_tid && fuse_req_ctx(req)->pid == g.notifier_tid;
}

static int do_stat(const char *path, struct stat *st) {
  const char *rel;
  mode_t ro_dir = S_IFDIR | 0555, ro_file = S_IFREG | 0444;
  switch (split(path, &rel)) {
  case T_ROOT:
    cfs_fill_stat(st, S_IFDIR | 0755, 0, NULL);
    return 0;
  case T_CONFIG:
    return config_stat(rel, st);
  case T_SERVICES:
    return services_stat(rel, st);
  case T_LOCKS:
    cfs_fill_stat(st, S_IFDIR | 0755, 0, NULL);
    if (!*rel)
      return 0;
    cfs_fill_stat(st, S_IFREG | 0644, 0, NULL);
    return locks_stat(rel, st);
  case T_EVENTS:
    if (!*rel) {
      cfs_fill_stat(st, ro_dir, 0, NULL);
      return 0;
    }
    if (event_which(rel) < 0)
      return -ENOENT;
    cfs_fill_stat(st, ro_file, 0, NULL);
    return 0;
  case T_STATUS:
    if (*rel)
      return -ENOTDIR;
    cfs_fill_stat(st, ro_file, 0, NULL);
    return 0;
  default:
    return -ENOENT;
  }
}

/* Stat of path for the notifier's own request: a deleted name still answers
 * as it was, so that its unlink/rmdir reaches the daemon. */
static int self_stat(const char *path, struct stat *st) {
  int rc = do_stat(path, st);
  if (rc) {
    int op = notifier_current(path);
    if (op == J_UNLINK) {
      cfs_fill_stat(st, S_IFREG | 0644, 0, NULL);
      rc = 0;
    } else if (op == J_RMDIR) {
      cfs_fill_stat(st, S_IFDIR | 0755, 0, NULL);
      rc = 0;
    }
  }
  return rc;
}

static int reply_entry_for(fuse_req_t req, const char *path, struct stat *st, struct fuse_entry_param *e) {
  memset(e, 0, sizeof(*e));
  /* A /locks file gets a new inode at every lookup (entry timeout 0), so
   * that each open of it has its own: a write that waits for the lock holds
   * its inode's i_rwsem, which must not stall other opens (locks.c). */
  const char *rel;
  int lockfile = split(path, &rel) == T_LOCKS && *rel;
  pthread_mutex_lock(&g.lock);
  e->ino = lockfile ? ino_new(path) : ino_ref(path);
  pthread_mutex_unlock(&g.lock);
  if (!e->ino)
    return -ENOMEM;
  st->st_ino = e->ino;
  e->attr = *st;
  e->attr_timeout = ATTR_TIMEOUT;
  e->entry_timeout = lockfile ? 0 : ENTRY_TIMEOUT;
  return 0;
}

/* Every cfs_file, so that shut-down can end those whose release never came.
 * files_lock guards the list links only. */
static pthread_mutex_t files_lock = PTHREAD_MUTEX_INITIALIZER;
static struct cfs_file *files;

struct cfs_file *cfs_file_new(enum cfs_kind kind, const char *path) {
  struct cfs_file *f = calloc(1, sizeof(*f));
  if (!f)
    return NULL;
  f->kind = kind;
  pthread_mutex_init(&f->lock, NULL);
  f->path = strdup(path);
  if (!f->path) {
    free(f);
    return NULL;
  }
  pthread_mutex_lock(&files_lock);
  f->next = files;
  if (files)
    files->prev = f;
  files = f;
  pthread_mutex_unlock(&files_lock);
  return f;
}

void cfs_file_free(struct cfs_file *f) {
  if (!f)
    return;
  pthread_mutex_lock(&files_lock);
  if (f->prev)
    f->prev->next = f->next;
  else if (files == f)
    files = f->next;
  if (f->next)
    f->next->prev = f->prev;
  pthread_mutex_unlock(&files_lock);
  if (f->kind == FK_CONFIG) {
    config_untrack(f);
    local_release(f);
  }
  pthread_mutex_destroy(&f->lock);
  free(f->path);
  free(f->key);
  free(f->buf);
  free(f->snap);
  free(f->dirbuf);
  free(f);
}

void cfs_files_shutdown(void) {
  for (;;) {
    pthread_mutex_lock(&files_lock);
    struct cfs_file *f = files;
    pthread_mutex_unlock(&files_lock);
    if (!f)
      return;
    switch (f->kind) {
    case FK_SERVICE:
      services_release(f); /* revokes the lease: the instance goes at once */
      break;
    case FK_EVENTS:
      events_release(f);
      break;
    case FK_LOCK:
      locks_release(f);
      break;
    default: /* config: flush already committed what was written */
      break;
    }
    cfs_file_free(f);
  }
}

static struct cfs_file *FH(struct fuse_file_info *fi) {
  return fi ? (struct cfs_file *)(uintptr_t)fi->fh : NULL;
}

void cfs_reply_create(fuse_req_t req, const char *path, struct fuse_file_info *fi) {
  struct stat st;
  struct fuse_entry_param e;
  int rc = do_stat(path, &st);
  if (rc)
    cfs_fill_stat(&st, S_IFREG | 0644, 0, NULL);
  if (reply_entry_for(req, path, &st, &e)) {
    fuse_reply_err(req, ENOMEM);
    return;
  }
  if (fuse_reply_create(req, &e, fi) == -ENOENT)
    ino_forget(e.ino, 1); /* the caller was interrupted */
}

/* ---------------------------------------------------------------- ops: names */

static void op_init(void *userdata, struct fuse_conn_info *conn) {
  (void)userdata;
  if (conn->capable & FUSE_CAP_ATOMIC_O_TRUNC)
    conn->want |= FUSE_CAP_ATOMIC_O_TRUNC;
  conn->want &= ~FUSE_CAP_WRITEBACK_CACHE;
  conn->want &= ~FUSE_CAP_READDIRPLUS;
  conn->want &= ~FUSE_CAP_READDIRPLUS_AUTO;
  /* libfuse asks for both because the ops exist; the kernel keeps flock and
   * POSIX locks locally unless locks.c wants them for /locks. */
  conn->want &= ~(FUSE_CAP_FLOCK_LOCKS | FUSE_CAP_POSIX_LOCKS);
  locks_conn_init(conn);
}

static void op_lookup(fuse_req_t req, fuse_ino_t parent, const char *name) {
  CFS_COUNT(ops);
  if (strlen(name) > 255) {
    fuse_reply_err(req, ENAMETOOLONG);
    return;
  }
  char *path = child_path(req, parent, name);
  if (!path)
    return;
  struct stat st;
  int rc;
  if (cfs_is_self(req)) {
    int op = notifier_current(path);
    rc = (op == J_CREATE || op == J_MKDIR) ? -ENOENT : self_stat(path, &st);
  } else {
    rc = do_stat(path, &st);
    const char *rel;
    /* a key made elsewhere whose event is still on the way */
    if (rc == -ENOENT && split(path, &rel) == T_CONFIG && config_freshen_name(rel))
      rc = do_stat(path, &st);
  }
  struct fuse_entry_param e;
  if (!rc)
    rc = reply_entry_for(req, path, &st, &e);
  if (rc)
    fuse_reply_err(req, -rc);
  else if (fuse_reply_entry(req, &e) == -ENOENT)
    ino_forget(e.ino, 1);
  free(path);
}

static void op_forget(fuse_req_t req, fuse_ino_t ino, uint64_t nlookup) {
  ino_forget(ino, nlookup);
  fuse_reply_none(req);
}

static void op_forget_multi(fuse_req_t req, size_t count, struct fuse_forget_data *forgets) {
  for (size_t i = 0; i < count; i++)
    ino_forget(forgets[i].ino, forgets[i].nlookup);
  fuse_reply_none(req);
}

/* The attributes the kernel is told: the tree's, except that a /config
 * file open for writing on this mount shows the size being written (also
 * when it was created and not committed yet).  Told the committed size in
 * the middle of a write (fstat, fchmod or futimens before close: cp -p,
 * tar x), the kernel would cut its cached pages, and the next reader's
 * copy of the new value, to the old length. */
static int stat_shown(fuse_req_t req, const char *path, struct stat *st) {
  int rc = cfs_is_self(req) ? self_stat(path, st) : do_stat(path, st);
  const char *rel;
  off_t size;
  if (rc == -ENOENT && split(path, &rel) == T_CONFIG && local_name(rel) && !local_stat_open(rel, st))
    return 0; /* an unlinked mount-local file read through a descriptor */
  if (split(path, &rel) == T_CONFIG && *rel && (!rc || rc == -ENOENT) && config_open_size(path, &size)) {
    if (rc) /* created, not committed yet */
      cfs_fill_stat(st, S_IFREG | 0644, 0, NULL), rc = 0;
    if (S_ISREG(st->st_mode)) {
      st->st_size = size;
      st->st_blocks = (size + 511) / 512;
    }
  }
  return rc;
}

static void op_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
  (void)fi;
  CFS_COUNT(ops);
  char *path = path_of(ino);
  if (!path) {
    fuse_reply_err(req, ESTALE);
    return;
  }
  struct stat st;
  int rc = stat_shown(req, path, &st);
  st.st_ino = ino;
  if (rc)
    fuse_reply_err(req, -rc);
  else
    fuse_reply_attr(req, &st, ATTR_TIMEOUT);
  free(path);
}

#define SET_TIMES                                                                                            \
  (FUSE_SET_ATTR_ATIME | FUSE_SET_ATTR_MTIME | FUSE_SET_ATTR_ATIME_NOW | FUSE_SET_ATTR_MTIME_NOW)

/* truncate/ftruncate. */
static int set_size(enum tree t, const char *rel, struct cfs_file *f, off_t size) {
  int rc = 0;
  if (t == T_CONFIG) {
    struct cfs_file *cf = f && f->kind == FK_CONFIG ? f : NULL;
    if (cf)
      pthread_mutex_lock(&cf->lock);
    rc = config_truncate(cf, rel, size);
    if (cf)
      pthread_mutex_unlock(&cf->lock);
  } else if (t == T_SERVICES && f && f->kind == FK_SERVICE) {
    pthread_mutex_lock(&f->lock);
    if ((size_t)size < f->len)
      f->len = (size_t)size;
    pthread_mutex_unlock(&f->lock);
  } else if (!(f && f->kind == FK_LOCK)) { /* `exec 9>lock` truncates: nothing to do */
    rc = -EACCES;
  }
  return rc;
}

/* utimens: /config keeps times on this mount (config_set_times); elsewhere
 * only a change to what is shown already (a no-op) is accepted. */
static int set_times(enum tree t, const char *path, const char *rel, struct cfs_file *f,
                     const struct stat *cur, const struct stat *attr, int to_set) {
  struct timespec now, a = cur->st_atim, m = cur->st_mtim;
  clock_gettime(CLOCK_REALTIME, &now);
  if (to_set & FUSE_SET_ATTR_ATIME_NOW)
    a = now;
  else if (to_set & FUSE_SET_ATTR_ATIME)
    a = attr->st_atim;
  if (to_set & FUSE_SET_ATTR_MTIME_NOW)
    m = now;
  else if (to_set & FUSE_SET_ATTR_MTIME)
    m = attr->st_mtim;
  if (t == T_CONFIG && *rel)
    return config_set_times(path, rel, f, &a, &m);
  int same = a.tv_sec == cur->st_atim.tv_sec && a.tv_nsec == cur->st_atim.tv_nsec &&
             m.tv_sec == cur->st_mtim.tv_sec && m.tv_nsec == cur->st_mtim.tv_nsec;
  return same ? 0 : -EPERM;
}

/* Carries out a setattr, all or nothing as far as can be checked first.
 * Mode and owner are not stored anywhere: a chmod or chown to what the
 * file shows already succeeds, any other is EPERM (it would not be kept).
 * Times are checked before the size is changed. */
static int set_attrs(fuse_req_t req, const char *path, struct cfs_file *f, const struct stat *attr,
                     int to_set) {
  const char *rel;
  enum tree t = split(path, &rel);
  struct stat cur;
  int rc = stat_shown(req, path, &cur);
  if (rc)
    return rc;
  struct cfs_file *cf = f && f->kind == FK_CONFIG ? f : NULL;
  if (t == T_CONFIG && ((cf && cf->priv) || (local_name(rel) && S_ISREG(cur.st_mode))))
    return g.o.ro ? -EROFS : local_setattr(rel, cf, attr, to_set); /* keeps mode and times */
  int times = to_set & SET_TIMES;
  if (g.o.ro &&
      ((to_set & (FUSE_SET_ATTR_SIZE | FUSE_SET_ATTR_MODE | FUSE_SET_ATTR_UID | FUSE_SET_ATTR_GID)) || times))
    return -EROFS;
  if ((to_set & FUSE_SET_ATTR_MODE) && (attr->st_mode & 07777) != (cur.st_mode & 07777))
    return -EPERM;
  if (((to_set & FUSE_SET_ATTR_UID) && attr->st_uid != cur.st_uid) ||
      ((to_set & FUSE_SET_ATTR_GID) && attr->st_gid != cur.st_gid))
    return -EPERM;
  if (times && !(t == T_CONFIG && *rel) && set_times(t, path, rel, f, &cur, attr, to_set))
    return -EPERM;
  if ((to_set & FUSE_SET_ATTR_SIZE) && (rc = set_size(t, rel, f, attr->st_size)))
    return rc;
  if (times && t == T_CONFIG && *rel)
    rc = set_times(t, path, rel, f, &cur, attr, to_set);
  return rc;
}

static void op_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr, int to_set,
                       struct fuse_file_info *fi) {
  CFS_COUNT(ops);
  char *path = path_of(ino);
  if (!path) {
    fuse_reply_err(req, ESTALE);
    return;
  }
  /* the notifier's futimens (IN_ATTRIB) changes nothing */
  int rc = cfs_is_self(req) ? 0 : set_attrs(req, path, FH(fi), attr, to_set);
  struct stat st;
  if (!rc)
    rc = stat_shown(req, path, &st);
  st.st_ino = ino;
  if (rc)
    fuse_reply_err(req, -rc);
  else
    fuse_reply_attr(req, &st, ATTR_TIMEOUT);
  free(path);
}

/* Makes a name (mkdir) and answers with its entry. */
static void op_mkdir(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode) {
  (void)mode;
  CFS_COUNT(ops);
  char *path = child_path(req, parent, name);
  if (!path)
    return;
  const char *rel;
  enum tree t = split(path, &rel);
  int rc;
  if (cfs_is_self(req))
    rc = 0;
  else if (g.o.ro)
    rc = -EROFS;
  else if (t == T_CONFIG)
    rc = config_mkdir(rel);
  else
    rc = -EPERM;
  struct stat st;
  struct fuse_entry_param e;
  if (!rc) {
    if (do_stat(path, &st))
      cfs_fill_stat(&st, S_IFDIR | 0755, 0, NULL);
    rc = reply_entry_for(req, path, &st, &e);
  }
  if (rc)
    fuse_reply_err(req, -rc);
  else if (fuse_reply_entry(req, &e) == -ENOENT)
    ino_forget(e.ino, 1);
  free(path);
}

static void op_unlink(fuse_req_t req, fuse_ino_t parent, const char *name) {
  CFS_COUNT(ops);
  char *path = child_path(req, parent, name);
  if (!path)
    return;
  const char *rel;
  enum tree t = split(path, &rel);
  int rc;
  if (cfs_is_self(req))
    rc = 0;
  else if (g.o.ro)
    rc = -EROFS;
  else if (t == T_CONFIG)
    rc = config_unlink(rel);
  else if (t == T_SERVICES)
    rc = services_unlink(rel);
  else if (t == T_LOCKS && *rel)
    rc = locks_unlink(rel);
  else
    rc = -EPERM;
  fuse_reply_err(req, -rc);
  free(path);
}

static void op_rmdir(fuse_req_t req, fuse_ino_t parent, const char *name) {
  CFS_COUNT(ops);
  char *path = child_path(req, parent, name);
  if (!path)
    return;
  const char *rel;
  enum tree t = split(path, &rel);
  int rc;
  if (cfs_is_self(req))
    rc = 0;
  else if (g.o.ro)
    rc = -EROFS;
  else if (t == T_CONFIG && *rel)
    rc = config_rmdir(rel);
  else
    rc = -EPERM;
  fuse_reply_err(req, -rc);
  free(path);
}

static void op_rename(fuse_req_t req, fuse_ino_t parent, const char *name, fuse_ino_t newparent,
                      const char *newname, unsigned int flags) {
  CFS_COUNT(ops);
  char *d1 = path_of(parent), *d2 = path_of(newparent);
  char *from = d1 ? join(d1, name) : NULL, *to = d2 ? join(d2, newname) : NULL;
  free(d1);
  free(d2);
  int rc;
  const char *r1, *r2;
  if (!from || !to)
    rc = -ENOMEM;
  else if (g.o.ro)
    rc = -EROFS;
  else if (split(from, &r1) != T_CONFIG || split(to, &r2) != T_CONFIG || !*r1 || !*r2)
    rc = -EXDEV;
  else
    rc = config_rename(r1, r2, flags);
  if (!rc) {
    pthread_mutex_lock(&g.lock);
    ino_rename(from, to);
    pthread_mutex_unlock(&g.lock);
  }
  fuse_reply_err(req, -rc);
  free(from);
  free(to);
}

/* ---------------------------------------------------------------- ops: files */

/* Opens path (create: O_CREAT of a new name).  Answers the request unless
 * the file belongs to /locks, whose hook answers it. */
static void open_path(fuse_req_t req, const char *path, struct fuse_file_info *fi, int create, mode_t mode) {
  const char *rel;
  enum tree t = split(path, &rel);
  int rc = 0;
  struct cfs_file *f = NULL;
  int writable = (fi->flags & O_ACCMODE) != O_RDONLY;
  if (cfs_is_self(req)) {
    f = cfs_file_new(FK_NOTIFY, path);
    if (!f)
      rc = -ENOMEM;
    fi->keep_cache = 1;
    /* no FLUSH at the notifier's close(): it has nothing to commit, and
     * close is then one round trip fewer (and cannot stall the notifier
     * where the caller of close keeps other threads from running, as
     * valgrind does) */
    fi->noflush = 1;
  } else if (writable && g.o.ro) {
    rc = -EROFS;
  } else {
    switch (t) {
    case T_CONFIG:
      f = cfs_file_new(FK_CONFIG, path);
      rc = f ? config_open(rel, f, fi->flags, create, mode) : -ENOMEM;
      if (!rc && writable)
        f->opener = procfd_tgid(fuse_req_ctx(req)->pid);
      /* a writer starts from etcd's value (config_open): pages cached
       * from an older one must not be mixed with its writes */
      fi->keep_cache = !writable;
      break;
    case T_SERVICES:
      f = cfs_file_new(FK_SERVICE, path);
      rc = f ? services_open(rel, f, fi->flags, create) : -ENOMEM;
      if (!rc && writable)
        f->opener = procfd_tgid(fuse_req_ctx(req)->pid);
      fi->direct_io = 1;
      break;
    case T_EVENTS:
      if (writable || create) {
        rc = -EACCES;
        break;
      }
      f = cfs_file_new(FK_EVENTS, path);
      rc = f ? events_open(f, event_which(rel), fi->flags & O_NONBLOCK) : -ENOMEM;
      /* Seekable, though the offset means nothing to a stream: head(1)
       * seeks back over what it read past its last line and reports an
       * error when a regular file refuses. */
      fi->direct_io = 1;
      break;
    case T_STATUS:
      if (writable || create) {
        rc = -EACCES;
        break;
      }
      f = cfs_file_new(FK_STATUS, path);
      rc = f ? status_snapshot(&f->snap, &f->snap_len) : -ENOMEM;
      fi->direct_io = 1;
      break;
    case T_LOCKS:
      if (!*rel) {
        rc = -EISDIR;
        break;
      }
      f = cfs_file_new(FK_LOCK, path);
      if (!f) {
        rc = -ENOMEM;
        break;
      }
      f->writable = writable;
      fi->fh = (uintptr_t)f;
      fi->direct_io = 1;
      locks_open(req, rel, f, fi, create); /* answers req */
      return;
    default:
      rc = create ? -EACCES : -EISDIR;
    }
  }
  if (rc) {
    if (f && f->kind == FK_CONFIG)
      config_release(f);
    cfs_file_free(f);
    fuse_reply_err(req, -rc);
    return;
  }
  f->writable = writable;
  fi->fh = (uintptr_t)f;
  if (create) {
    cfs_reply_create(req, path, fi);
  } else if (fuse_reply_open(req, fi) == -ENOENT) {
    /* interrupted: the kernel will not send release */
    if (f->kind == FK_CONFIG)
      config_release(f);
    else if (f->kind == FK_SERVICE)
      services_release(f);
    else if (f->kind == FK_EVENTS)
      events_release(f);
    cfs_file_free(f);
  }
}

static void op_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
  CFS_COUNT(ops);
  char *path = path_of(ino);
  if (!path) {
    fuse_reply_err(req, ESTALE);
    return;
  }
  open_path(req, path, fi, 0, 0);
  free(path);
}

static void op_create(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode,
                      struct fuse_file_info *fi) {
  CFS_COUNT(ops);
  char *path = child_path(req, parent, name);
  if (!path)
    return;
  if (strlen(name) > 255)
    fuse_reply_err(req, ENAMETOOLONG);
  else
    open_path(req, path, fi, 1, mode);
  free(path);
}

static void reply_data(fuse_req_t req, int rc, char *data, size_t len) {
  if (rc < 0)
    fuse_reply_err(req, -rc);
  else
    fuse_reply_buf(req, data, len);
  free(data);
}

static void op_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi) {
  (void)ino;
  CFS_COUNT(ops);
  struct cfs_file *f = FH(fi);
  char *data = NULL;
  size_t len = 0;
  int rc = 0;
  switch (f->kind) {
  case FK_CONFIG:
    pthread_mutex_lock(&f->lock);
    rc = config_read(f, size, off, &data, &len);
    pthread_mutex_unlock(&f->lock);
    break;
  case FK_SERVICE:
    pthread_mutex_lock(&f->lock);
    rc = services_read(f, size, off, &data, &len);
    pthread_mutex_unlock(&f->lock);
    break;
  case FK_STATUS:
    /* a copy, as in op_readdir: release may free f->snap while we reply */
    if ((size_t)off < f->snap_len) {
      len = f->snap_len - (size_t)off < size ? f->snap_len - (size_t)off : size;
      data = malloc(len);
      if (data)
        memcpy(data, f->snap + off, len);
      else
        rc = -ENOMEM;
    }
    break;
  case FK_EVENTS:
    events_read(req, f, size, fi->flags & O_NONBLOCK);
    return;
  case FK_LOCK:
    locks_read(req, f, size, off);
    return;
  default:
    break;
  }
  reply_data(req, rc, data, len);
}

static void op_write(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size, off_t off,
                     struct fuse_file_info *fi) {
  (void)ino;
  CFS_COUNT(ops);
  struct cfs_file *f = FH(fi);
  int rc;
  switch (f->kind) {
  case FK_NOTIFY:
    rc = (int)size;
    break;
  case FK_CONFIG:
    pthread_mutex_lock(&f->lock);
    rc = config_write(f, buf, size, off);
    pthread_mutex_unlock(&f->lock);
    break;
  case FK_SERVICE:
    pthread_mutex_lock(&f->lock);
    rc = services_write(f, buf, size, off);
    pthread_mutex_unlock(&f->lock);
    break;
  case FK_LOCK:
    locks_write(req, f, buf, size, off, fi->flags & O_NONBLOCK);
    return;
  default:
    rc = -EBADF;
  }
  if (rc < 0)
    fuse_reply_err(req, -rc);
  else
    fuse_reply_write(req, (size_t)rc);
}

/* Should this FLUSH commit?  close() sends FLUSH for every descriptor
 * (dups, children that inherited it) and RELEASE, without waiting for it,
 * after the last one.  A FLUSH commits a /config file when it is, as far as
 * /proc can tell (procfd.c), the last close of the process that opened it:
 * that process has no other writable descriptor on the file.  Then close()
 * returns with the value in etcd and in this mount's cache, including an
 * O_TRUNC open with nothing written (`: > file`).  A child closing what it
 * inherited (`exec 3>f`, then `sleep 1`), or the shell's first close of
 * `> file` (still open as fd 1), commits nothing: no empty or partial
 * value is published in between.  When /proc cannot tell, a FLUSH commits
 * after a write, as before; RELEASE commits whatever is left. */
static int flush_commits(struct cfs_file *f, fuse_req_t req, fuse_ino_t ino) {
  if (f->kind != FK_CONFIG || !f->dirty || f->failed)
    return 0;
  pid_t who = f->opener ? procfd_tgid(fuse_req_ctx(req)->pid) : 0;
  if (!who)
    return f->wrote;
  if (who != f->opener)
    return 0;
  int w = procfd_writer(who, ino);
  return w < 0 ? f->wrote : !w;
}

/* After this mount committed a /config file: the kernel drops the file's
 * attributes and pages, so the next stat and read get the committed value
 * (an append may have been placed after another writer's, and a size the
 * kernel was told during the write is stale).  No dirty pages exist
 * without writeback caching, so this never blocks and is safe inside the
 * handler of the commit's own FLUSH, FSYNC or RELEASE. */
static void committed(fuse_ino_t ino) {
  fuse_lowlevel_notify_inval_inode(g.se, ino, 0, 0);
}

/* Commits an open file's buffer: always for fsync (flush_req NULL); for a
 * FLUSH as flush_commits says.  /services documents register at each. */
static int commit(struct cfs_file *f, fuse_req_t flush_req, fuse_ino_t ino) {
  int rc = 0;
  pthread_mutex_lock(&f->lock);
  if (f->kind == FK_CONFIG && (!flush_req || flush_commits(f, flush_req, ino)))
    rc = config_commit(f);
  else if (f->kind == FK_SERVICE)
    rc = services_flush(f);
  pthread_mutex_unlock(&f->lock);
  if (rc > 0)
    committed(ino);
  return rc < 0 ? rc : 0;
}

static void op_flush(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
  CFS_COUNT(ops);
  struct cfs_file *f = FH(fi);
  if (f->kind == FK_LOCK) {
    locks_flush(req, f);
    return;
  }
  fuse_reply_err(req, -commit(f, req, ino));
}

static void op_fsync(fuse_req_t req, fuse_ino_t ino, int datasync, struct fuse_file_info *fi) {
  (void)datasync;
  CFS_COUNT(ops);
  struct cfs_file *f = FH(fi);
  fuse_reply_err(req, f->kind == FK_LOCK ? 0 : -commit(f, NULL, ino));
}

static void op_release(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
  struct cfs_file *f = FH(fi);
  int wrote = 0;
  pthread_mutex_lock(&f->lock);
  switch (f->kind) {
  case FK_CONFIG:
    wrote = config_release(f) > 0;
    break;
  case FK_SERVICE:
    services_release(f);
    break;
  case FK_EVENTS:
    events_release(f);
    break;
  case FK_LOCK:
    locks_release(f);
    break;
  default:
    break;
  }
  pthread_mutex_unlock(&f->lock);
  cfs_file_free(f);
  if (wrote)
    committed(ino);
  fuse_reply_err(req, 0);
}

/* Only the notifier's J_MODIFY uses it (to raise IN_MODIFY); for anyone
 * else a key has no blocks to allocate.  Never ENOSYS: the kernel would
 * stop sending it for good. */
static void op_fallocate(fuse_req_t req, fuse_ino_t ino, int mode, off_t offset, off_t length,
                         struct fuse_file_info *fi) {
  (void)ino, (void)mode, (void)offset, (void)length, (void)fi;
  fuse_reply_err(req, cfs_is_self(req) ? 0 : EOPNOTSUPP);
}

static void op_poll(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi, struct fuse_pollhandle *ph) {
  (void)ino;
  struct cfs_file *f = FH(fi);
  if (f->kind == FK_EVENTS) {
    events_poll(req, f, ph);
    return;
  }
  if (f->kind == FK_LOCK) {
    locks_poll(req, f, ph);
    return;
  }
  if (ph)
    fuse_pollhandle_destroy(ph);
  fuse_reply_poll(req, POLLIN | POLLOUT | POLLRDNORM | POLLWRNORM);
}

static void op_flock(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi, int op) {
  (void)ino;
  struct cfs_file *f = FH(fi);
  if (f->kind == FK_LOCK)
    locks_flock(req, f, op);
  else
    /* With flock forwarded to the daemon (for /locks), the kernel no longer
     * keeps flocks on other files: refuse rather than pretend to lock.  A
     * distributed lock is a file under /locks. */
    fuse_reply_err(req, ENOLCK);
}

static void op_getlk(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi, struct flock *lock) {
  (void)ino;
  struct cfs_file *f = FH(fi);
  if (f->kind == FK_LOCK) {
    locks_getlk(req, f, lock);
    return;
  }
  lock->l_type = F_UNLCK;
  fuse_reply_lock(req, lock);
}

static void op_setlk(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi, struct flock *lock,
                     int sleep) {
  (void)ino;
  struct cfs_file *f = FH(fi);
  if (f->kind == FK_LOCK)
    locks_setlk(req, f, lock, sleep);
  else
    fuse_reply_err(req, 0);
}

/* ---------------------------------------------------------------- ops: directories */

/* Directory listings are collected first (the tree modules call dir_add
 * with g.lock held) and packed into dirents afterwards, when the inode
 * numbers of names the kernel knows can be looked up. */
struct dirfill {
  fuse_req_t req;
  const char *dir;
  size_t n, cap;
  char **names;
  mode_t *modes;
  int err;
};

static void dir_add(const char *name, mode_t mode, void *arg) {
  struct dirfill *d = arg;
  if (d->n == d->cap) {
    size_t cap = d->cap ? d->cap * 2 : 32;
    char **names = realloc(d->names, cap * sizeof(*names));
    if (names)
      d->names = names;
    mode_t *modes = realloc(d->modes, cap * sizeof(*modes));
    if (modes)
      d->modes = modes;
    if (!names || !modes) {
      d->err = ENOMEM;
      return;
    }
    d->cap = cap;
  }
  d->names[d->n] = strdup(name);
  if (!d->names[d->n]) {
    d->err = ENOMEM;
    return;
  }
  d->modes[d->n++] = mode;
}

/* Packs the collected names into a dirent buffer (g.lock not held). */
static int dir_pack(struct dirfill *d, char **out, size_t *out_len) {
  size_t len = 0, cap = 0;
  char *buf = NULL;
  for (size_t i = 0; i < d->n; i++) {
    struct stat st = {.st_mode = d->modes[i]};
    char *path = join(d->dir, d->names[i]);
    if (!path)
      break;
    fuse_ino_t ino = cfs_inode_known(path);
    if (!ino) { /* a stable number for a name the kernel has not looked up */
      uint64_t h = 1469598103934665603ull;
      for (const char *s = path; *s; s++)
        h = (h ^ (unsigned char)*s) * 1099511628211ull;
      ino = (h | (1ull << 62)) & ~(1ull << 63);
    }
    free(path);
    st.st_ino = ino;
    size_t need = fuse_add_direntry(d->req, NULL, 0, d->names[i], NULL, 0);
    if (len + need > cap) {
      size_t ncap = cap ? cap * 2 : 4096;
      while (ncap < len + need)
        ncap *= 2;
      char *b = realloc(buf, ncap);
      if (!b) {
        free(buf);
        return -ENOMEM;
      }
      buf = b;
      cap = ncap;
    }
    fuse_add_direntry(d->req, buf + len, need, d->names[i], &st, (off_t)(len + need));
    len += need;
  }
  *out = buf;
  *out_len = len;
  return 0;
}

static void dir_free(struct dirfill *d) {
  for (size_t i = 0; i < d->n; i++)
    free(d->names[i]);
  free(d->names);
  free(d->modes);
}

static void op_opendir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
  CFS_COUNT(ops);
  char *path = path_of(ino);
  if (!path) {
    fuse_reply_err(req, ESTALE);
    return;
  }
  struct dirfill d = {.req = req, .dir = path};
  dir_add(".", S_IFDIR, &d);
  dir_add("..", S_IFDIR, &d);
  const char *rel;
  int rc = 0;
  switch (split(path, &rel)) {
  case T_ROOT:
    dir_add("config", S_IFDIR, &d);
    dir_add("services", S_IFDIR, &d);
    dir_add("locks", S_IFDIR, &d);
    dir_add("events", S_IFDIR, &d);
    dir_add("status", S_IFREG, &d);
    break;
  case T_CONFIG:
    rc = config_list(rel, dir_add, &d);
    break;
  case T_SERVICES:
    rc = services_list(rel, dir_add, &d);
    break;
  case T_LOCKS:
    rc = *rel ? -ENOTDIR : locks_list(dir_add, &d);
    break;
  case T_EVENTS:
    if (*rel) {
      rc = -ENOTDIR;
      break;
    }
    dir_add("config", S_IFREG, &d);
    dir_add("services", S_IFREG, &d);
    dir_add("locks", S_IFREG, &d);
    break;
  default:
    rc = -ENOTDIR;
  }
  if (!rc && d.err)
    rc = -d.err;
  char *buf = NULL;
  size_t len = 0;
  if (!rc)
    rc = dir_pack(&d, &buf, &len);
  dir_free(&d);
  struct cfs_file *f = rc ? NULL : cfs_file_new(FK_DIR, path);
  if (!rc && !f)
    rc = -ENOMEM;
  free(path);
  if (rc) {
    free(buf);
    fuse_reply_err(req, -rc);
    return;
  }
  f->dirbuf = buf;
  f->dirlen = len;
  fi->fh = (uintptr_t)f;
  if (fuse_reply_open(req, fi) == -ENOENT)
    cfs_file_free(f);
}

static void op_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi) {
  (void)ino;
  struct cfs_file *f = FH(fi);
  if ((size_t)off >= f->dirlen) {
    fuse_reply_buf(req, NULL, 0);
    return;
  }
  /* Reply from a copy: once the kernel has the answer, releasedir may free
   * f->dirbuf on another worker before fuse_reply_buf returns (ASan's writev
   * interceptor reads the iovec after the call and reports a use after free). */
  size_t n = f->dirlen - (size_t)off < size ? f->dirlen - (size_t)off : size;
  char *copy = malloc(n);
  if (!copy) {
    fuse_reply_err(req, ENOMEM);
    return;
  }
  memcpy(copy, f->dirbuf + off, n);
  fuse_reply_buf(req, copy, n);
  free(copy);
}

static void op_releasedir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
  (void)ino;
  cfs_file_free(FH(fi));
  fuse_reply_err(req, 0);
}

/* ---------------------------------------------------------------- ops: xattrs, statfs */

static void xattr(fuse_req_t req, fuse_ino_t ino, const char *name, size_t size) {
  CFS_COUNT(ops);
  char *path = path_of(ino);
  if (!path) {
    fuse_reply_err(req, ESTALE);
    return;
  }
  char *buf = size ? malloc(size) : NULL;
  const char *rel;
  int rc;
  switch (split(path, &rel)) {
  case T_CONFIG:
    rc = *rel ? config_xattr(rel, name, buf, size) : (name ? -ENODATA : 0);
    break;
  case T_SERVICES:
    rc = services_xattr(rel, name, buf, size);
    break;
  default:
    rc = name ? -ENODATA : 0;
  }
  if (rc < 0)
    fuse_reply_err(req, -rc);
  else if (!size)
    fuse_reply_xattr(req, (size_t)rc);
  else
    fuse_reply_buf(req, buf, (size_t)rc);
  free(buf);
  free(path);
}

static void op_getxattr(fuse_req_t req, fuse_ino_t ino, const char *name, size_t size) {
  xattr(req, ino, name, size);
}

static void op_listxattr(fuse_req_t req, fuse_ino_t ino, size_t size) {
  xattr(req, ino, NULL, size);
}

static void op_setxattr(fuse_req_t req, fuse_ino_t ino, const char *name, const char *value, size_t size,
                        int flags) {
  (void)ino, (void)name, (void)value, (void)size, (void)flags;
  fuse_reply_err(req, ENOTSUP);
}

static void op_removexattr(fuse_req_t req, fuse_ino_t ino, const char *name) {
  (void)ino, (void)name;
  fuse_reply_err(req, ENOTSUP);
}

static void op_statfs(fuse_req_t req, fuse_ino_t ino) {
  (void)ino;
  struct statvfs sv = {.f_bsize = 4096, .f_frsize = 4096, .f_namemax = 255};
  fuse_reply_statfs(req, &sv);
}

const struct fuse_lowlevel_ops cfs_ops = {
    .init = op_init,
    .lookup = op_lookup,
    .forget = op_forget,
    .forget_multi = op_forget_multi,
    .getattr = op_getattr,
    .setattr = op_setattr,
    .mkdir = op_mkdir,
    .unlink = op_unlink,
    .rmdir = op_rmdir,
    .rename = op_rename,
    .open = op_open,
    .create = op_create,
    .read = op_read,
    .write = op_write,
    .flush = op_flush,
    .fsync = op_fsync,
    .release = op_release,
    .poll = op_poll,
    .fallocate = op_fallocate,
    .flock = op_flock,
    .getlk = op_getlk,
    .setlk = op_setlk,
    .opendir = op_opendir,
    .readdir = op_readdir,
    .releasedir = op_releasedir,
    .getxattr = op_getxattr,
    .listxattr = op_listxattr,
    .setxattr = op_setxattr,
    .removexattr = op_removexattr,
    .statfs = op_statfs,
};
