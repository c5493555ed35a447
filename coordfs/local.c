/*
 * local.c — mount-local files in /config: names that match --local-names
 * (by default the temporary files of editors: vim's .x.swp and .x.swpx and
 * its 4913 probe, backups x~, emacs's #x# and .#x) live in this mount's
 * memory only and never reach etcd.  Without this, one edit of a config
 * file with vim put half a dozen keys cluster-wide, each seen by every
 * watcher.
 *
 * A local file is an ordinary file for as long as the mount lives: create,
 * read, write (O_APPEND too), truncate, chmod, utimens, unlink (an unlinked
 * file stays usable through its open descriptors), rename to another local
 * name.  Renaming between a local name and a key is EXDEV: mv copies, and
 * the key's Put is then one write, as for any new file.  chown keeps only
 * what is shown (EPERM otherwise, as for keys).  A key in etcd whose name
 * matches the globs is not shown on this mount (config.c hides it); a
 * directory that holds local files exists for as long as they do.
 *
 * The globs are fnmatch(3) patterns matched against the last path
 * component, separated by ':' (a comma would end the -o option); an empty
 * list turns the feature off.
 *
 * Ownership: a local file (struct lfile) belongs to the table while linked
 * and to each open handle (cfs_file.priv of a /config handle whose name is
 * local) through lf->refs; the last reference frees it.
 *
 * Locking: lk guards the table, every lfile and the glob list (read-only
 * after local_init).  It is a leaf: taken under g.lock (config.c asks for
 * directories while holding it) and under file->lock, never the other way.
 */
#include "coordfs.h"

#include <errno.h>
#include <fcntl.h>
#include <fnmatch.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define DEFAULT_GLOBS ".*.sw?:.*.swpx:4913:*~:#*#:.#*"

struct lfile {
  char *path; /* below /config: "app/.db.swp" */
  char *data;
  size_t len, cap;
  mode_t mode; /* permission bits */
  struct timespec atime, mtime;
  int refs;   /* 1 while linked, + 1 per open handle */
  int linked; /* in the table */
  struct lfile *next;
};

static pthread_mutex_t lk = PTHREAD_MUTEX_INITIALIZER;
static struct lfile *files;   /* linked: the names */
static struct lfile *orphans; /* unlinked, still open: for fstat */
static char **globs;
static size_t nglobs;

int local_init(const char *spec) {
  if (!spec)
    spec = DEFAULT_GLOBS;
  char *copy = strdup(spec), *save = NULL;
  if (!copy)
    return -ENOMEM;
  for (char *t = strtok_r(copy, ":", &save); t; t = strtok_r(NULL, ":", &save)) {
    char **v = realloc(globs, (nglobs + 1) * sizeof(*v));
    if (!v || !(v[nglobs] = strdup(t))) {
      globs = v ? v : globs;
      free(copy);
      return -ENOMEM;
    }
    globs = v;
    nglobs++;
  }
  free(copy);
  return 0;
}

void local_free(void) {
  while (files || orphans) {
    struct lfile *f = files ? files : orphans;
    *(files ? &files : &orphans) = f->next;
    free(f->path);
    free(f->data);
    free(f);
  }
  for (size_t i = 0; i < nglobs; i++)
    free(globs[i]);
  free(globs);
  globs = NULL;
  nglobs = 0;
}

int local_name_n(const char *rel, size_t len) {
  if (!nglobs)
    return 0;
  const char *base = rel + len;
  while (base > rel && base[-1] != '/')
    base--;
  size_t n = len - (size_t)(base - rel);
  char name[256]; /* one component: at most 255 bytes */
  if (!n || n >= sizeof(name))
    return 0;
  memcpy(name, base, n);
  name[n] = 0;
  for (size_t i = 0; i < nglobs; i++)
    if (!fnmatch(globs[i], name, 0))
      return 1;
  return 0;
}

int local_name(const char *rel) {
  return local_name_n(rel, strlen(rel));
}

/* lk held. */
static struct lfile *find_in(struct lfile *list, const char *rel) {
  for (struct lfile *f = list; f; f = f->next)
    if (!strcmp(f->path, rel))
      return f;
  return NULL;
}

static struct lfile *find(const char *rel) {
  return find_in(files, rel);
}

/* lk held: takes f off list *head. */
static void take_off(struct lfile **head, struct lfile *f) {
  for (struct lfile **pp = head; *pp; pp = &(*pp)->next)
    if (*pp == f) {
      *pp = f->next;
      return;
    }
}

/* lk held: drop a reference; frees at the last. */
static void unref(struct lfile *f) {
  if (--f->refs > 0)
    return;
  if (!f->linked)
    take_off(&orphans, f);
  free(f->path);
  free(f->data);
  free(f);
}

/* lk held: takes f out of the table; while open it is an orphan. */
static void unlink_file(struct lfile *f) {
  take_off(&files, f);
  f->linked = 0;
  if (f->refs > 1) {
    f->next = orphans;
    orphans = f;
  }
  unref(f);
}

static void fill(const struct lfile *f, struct stat *st) {
  cfs_fill_stat(st, S_IFREG | 0644, (off_t)f->len, &f->mtime);
  st->st_mode = S_IFREG | (f->mode & 07777);
  st->st_atim = f->atime;
}

int local_stat(const char *rel, struct stat *st) {
  pthread_mutex_lock(&lk);
  struct lfile *f = find(rel);
  if (f)
    fill(f, st);
  pthread_mutex_unlock(&lk);
  return f ? 0 : -ENOENT;
}

int local_exists(const char *rel) {
  if (!local_name(rel))
    return 0;
  pthread_mutex_lock(&lk);
  int found = find(rel) != NULL;
  pthread_mutex_unlock(&lk);
  return found;
}

int local_stat_open(const char *rel, struct stat *st) {
  pthread_mutex_lock(&lk);
  struct lfile *f = find_in(orphans, rel);
  if (f)
    fill(f, st);
  pthread_mutex_unlock(&lk);
  return f ? 0 : -ENOENT;
}

/* 1 if rel (a path below dir) is strictly below dir ("" is the top). */
static int below(const char *path, const char *dir) {
  size_t n = strlen(dir);
  return !n || (!strncmp(path, dir, n) && path[n] == '/');
}

int local_dir_used(const char *dir) {
  pthread_mutex_lock(&lk);
  struct lfile *f = files;
  while (f && !below(f->path, dir))
    f = f->next;
  pthread_mutex_unlock(&lk);
  return f != NULL;
}

void local_list(const char *dir, void (*fn)(const char *name, mode_t mode, void *arg), void *arg) {
  size_t n = strlen(dir);
  pthread_mutex_lock(&lk);
  for (struct lfile *f = files; f; f = f->next) {
    if (!below(f->path, dir))
      continue;
    const char *name = f->path + (n ? n + 1 : 0);
    if (!strchr(name, '/'))
      fn(name, S_IFREG, arg);
  }
  pthread_mutex_unlock(&lk);
}

int local_open(const char *rel, struct cfs_file *f, int flags, int create, mode_t mode) {
  int rc = 0;
  pthread_mutex_lock(&lk);
  struct lfile *lf = find(rel);
  if (lf && create && (flags & O_EXCL)) {
    rc = -EEXIST;
  } else if (!lf && !create && !(flags & O_CREAT)) {
    rc = -ENOENT;
  } else if (!lf) {
    lf = calloc(1, sizeof(*lf));
    if (!lf || !(lf->path = strdup(rel))) {
      free(lf);
      lf = NULL;
      rc = -ENOMEM;
    } else {
      lf->mode = (mode & 07777) ? (mode & 07777) : 0644;
      clock_gettime(CLOCK_REALTIME, &lf->mtime);
      lf->atime = lf->mtime;
      lf->refs = 1;
      lf->linked = 1;
      lf->next = files;
      files = lf;
    }
  }
  if (!rc) {
    lf->refs++;
    f->priv = lf;
    f->writable = (flags & O_ACCMODE) != O_RDONLY;
    f->append = (flags & O_APPEND) != 0;
    if (f->writable && (flags & O_TRUNC)) {
      lf->len = 0;
      clock_gettime(CLOCK_REALTIME, &lf->mtime);
    }
  }
  pthread_mutex_unlock(&lk);
  return rc;
}

int local_read(struct cfs_file *f, size_t size, off_t off, char **out, size_t *out_len) {
  struct lfile *lf = f->priv;
  *out = NULL;
  *out_len = 0;
  int rc = 0;
  pthread_mutex_lock(&lk);
  if ((size_t)off < lf->len) {
    size_t n = lf->len - (size_t)off < size ? lf->len - (size_t)off : size;
    *out = malloc(n);
    if (*out) {
      memcpy(*out, lf->data + off, n);
      *out_len = n;
    } else {
      rc = -ENOMEM;
    }
  }
  pthread_mutex_unlock(&lk);
  return rc;
}

/* lk held: makes room for len bytes, zero-filling a hole. */
static int resize(struct lfile *lf, size_t len) {
  if (len > lf->cap) {
    size_t cap = lf->cap ? lf->cap : 4096;
    while (cap < len)
      cap *= 2;
    char *d = realloc(lf->data, cap);
    if (!d)
      return -ENOMEM;
    lf->data = d;
    lf->cap = cap;
  }
  if (len > lf->len)
    memset(lf->data + lf->len, 0, len - lf->len);
  lf->len = len;
  clock_gettime(CLOCK_REALTIME, &lf->mtime);
  return 0;
}

int local_write(struct cfs_file *f, const char *buf, size_t size, off_t off) {
  struct lfile *lf = f->priv;
  pthread_mutex_lock(&lk);
  if (f->append)
    off = (off_t)lf->len;
  size_t end = (size_t)off + size;
  int rc = end > CFS_MAX_REQUEST ? -EFBIG : 0; /* the same limit as a key */
  if (!rc && end > lf->len)
    rc = resize(lf, end);
  if (!rc) {
    memcpy(lf->data + off, buf, size);
    clock_gettime(CLOCK_REALTIME, &lf->mtime);
  }
  pthread_mutex_unlock(&lk);
  return rc ? rc : (int)size;
}

void local_release(struct cfs_file *f) {
  struct lfile *lf = f->priv;
  if (!lf)
    return;
  pthread_mutex_lock(&lk);
  unref(lf);
  pthread_mutex_unlock(&lk);
  f->priv = NULL;
}

int local_setattr(const char *rel, struct cfs_file *f, const struct stat *attr, int to_set) {
  pthread_mutex_lock(&lk);
  struct lfile *lf = f && f->priv ? f->priv : find(rel);
  if (!lf)
    lf = find_in(orphans, rel); /* fchmod of an unlinked file */
  int rc = lf ? 0 : -ENOENT;
  if (!rc && (((to_set & FUSE_SET_ATTR_UID) && attr->st_uid != g.o.uid) ||
              ((to_set & FUSE_SET_ATTR_GID) && attr->st_gid != g.o.gid)))
    rc = -EPERM;
  if (!rc && (to_set & FUSE_SET_ATTR_SIZE))
    rc = (size_t)attr->st_size > CFS_MAX_REQUEST ? -EFBIG : resize(lf, (size_t)attr->st_size);
  if (!rc && (to_set & FUSE_SET_ATTR_MODE))
    lf->mode = attr->st_mode & 07777;
  struct timespec now;
  clock_gettime(CLOCK_REALTIME, &now);
  if (!rc && (to_set & (FUSE_SET_ATTR_ATIME | FUSE_SET_ATTR_ATIME_NOW)))
    lf->atime = (to_set & FUSE_SET_ATTR_ATIME_NOW) ? now : attr->st_atim;
  if (!rc && (to_set & (FUSE_SET_ATTR_MTIME | FUSE_SET_ATTR_MTIME_NOW)))
    lf->mtime = (to_set & FUSE_SET_ATTR_MTIME_NOW) ? now : attr->st_mtim;
  pthread_mutex_unlock(&lk);
  return rc;
}

int local_unlink(const char *rel) {
  pthread_mutex_lock(&lk);
  struct lfile *f = find(rel);
  if (f)
    unlink_file(f);
  pthread_mutex_unlock(&lk);
  return f ? 0 : -ENOENT;
}

int local_rename(const char *from, const char *to, int noreplace) {
  char *np = strdup(to);
  if (!np)
    return -ENOMEM;
  pthread_mutex_lock(&lk);
  struct lfile *f = find(from), *t = find(to);
  int rc = !f ? -ENOENT : t && noreplace ? -EEXIST : 0;
  if (!rc && t != f) {
    if (t)
      unlink_file(t);
    free(f->path);
    f->path = np;
    np = NULL;
  }
  pthread_mutex_unlock(&lk);
  free(np);
  return rc;
}

int local_rename_dir(const char *from, const char *to) {
  size_t fl = strlen(from);
  int rc = 0;
  pthread_mutex_lock(&lk);
  for (struct lfile *f = files; f; f = f->next) {
    if (!below(f->path, from))
      continue;
    char *np = malloc(strlen(to) + strlen(f->path) - fl + 1);
    if (!np) {
      rc = -ENOMEM;
      continue;
    }
    sprintf(np, "%s%s", to, f->path + fl);
    free(f->path);
    f->path = np;
  }
  pthread_mutex_unlock(&lk);
  return rc;
}
