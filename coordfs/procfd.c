/*
 * procfd.c — does a process still have a writable descriptor on a file of
 * this mount, and which process is a thread part of?
 *
 * Asked by a FLUSH (fs.c flush_commits): close() sends FLUSH for every
 * descriptor, and RELEASE, without waiting for it, after the last one.  A
 * FLUSH that knows it is the opening process's last close can commit at
 * once what would otherwise be committed just after close() returned.
 *
 * The answer comes from /proc/<pid>/fdinfo/<fd>: its "ino:", "flags:"
 * (only writable descriptors count) and "mnt_id:" lines, and the device
 * (major:minor) of that mount in /proc/<pid>/mountinfo, compared with this
 * mount's own device, learnt from /proc/self/mountinfo at start-up.  The
 * device, not the mount id, so that a bind mount of this file system (a
 * container's) counts.  Nothing here touches a FUSE file system, so it is
 * safe inside a handler.  The descriptor being closed is already out of
 * the fd table when its FLUSH comes.
 *
 * "Cannot tell" (pid 0 from another pid namespace, another user's /proc
 * entries, the device unknown) is an answer of its own (-1): the caller
 * keeps its old rule.
 *
 * Threads: dev_major, dev_minor and dev_known are written once by
 * procfd_init, on main's thread before the FUSE loop starts; afterwards
 * everything here only reads.
 */
#include "coordfs.h"

#include <dirent.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static unsigned dev_major, dev_minor;
static int dev_known;

/* A path field of mountinfo, with its octal escapes undone (also main.c). */
void cfs_mountinfo_unescape(char *s) {
  char *o = s;
  for (; *s; s++) {
    if (s[0] == '\\' && s[1] >= '0' && s[1] <= '3' && s[2] >= '0' && s[2] <= '7' && s[3] >= '0' &&
        s[3] <= '7') {
      *o++ = (char)((s[1] - '0') * 64 + (s[2] - '0') * 8 + (s[3] - '0'));
      s += 3;
    } else {
      *o++ = *s;
    }
  }
  *o = 0;
}

void procfd_init(const char *mountpoint) {
  FILE *f = fopen("/proc/self/mountinfo", "re");
  if (!f)
    return;
  char *line = NULL;
  size_t cap = 0;
  while (getline(&line, &cap, f) > 0) {
    unsigned maj, min;
    char mnt[4096];
    /* id parent major:minor root mount-point ... (the last match wins: the
     * newest mount on that path is this one) */
    if (sscanf(line, "%*d %*d %u:%u %*s %4095s", &maj, &min, mnt) != 3)
      continue;
    cfs_mountinfo_unescape(mnt);
    if (!strcmp(mnt, mountpoint)) {
      dev_major = maj;
      dev_minor = min;
      dev_known = 1;
    }
  }
  free(line);
  fclose(f);
}

/* Is mount mnt_id, as process pid sees it, on this file system's device?
 * 1 yes, 0 no, -1 cannot tell. */
static int mount_is_ours(pid_t pid, long mnt_id) {
  char path[64];
  snprintf(path, sizeof path, "/proc/%d/mountinfo", (int)pid);
  FILE *f = fopen(path, "re");
  if (!f)
    return -1;
  char *line = NULL;
  size_t cap = 0;
  int ours = -1; /* not found */
  while (getline(&line, &cap, f) > 0) {
    long id;
    unsigned maj, min;
    if (sscanf(line, "%ld %*d %u:%u", &id, &maj, &min) == 3 && id == mnt_id) {
      ours = maj == dev_major && min == dev_minor;
      break;
    }
  }
  free(line);
  fclose(f);
  return ours;
}

pid_t procfd_tgid(pid_t tid) {
  char path[64], buf[1024];
  snprintf(path, sizeof path, "/proc/%d/status", (int)tid);
  int fd = tid > 0 ? open(path, O_RDONLY | O_CLOEXEC) : -1;
  ssize_t n = fd >= 0 ? read(fd, buf, sizeof buf - 1) : -1;
  if (fd >= 0)
    close(fd);
  if (n <= 0)
    return 0;
  buf[n] = 0;
  const char *t = strstr(buf, "\nTgid:");
  return t ? (pid_t)strtol(t + 6, NULL, 10) : 0;
}

/* One fdinfo file: 1 if it is a writable descriptor on ino of this mount,
 * 0 if not, -1 if that cannot be told. */
static int fdinfo_is(pid_t pid, const char *path, fuse_ino_t ino) {
  char buf[512];
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  ssize_t n = fd >= 0 ? read(fd, buf, sizeof buf - 1) : -1;
  if (fd >= 0)
    close(fd);
  if (n <= 0)
    return 0; /* closed meanwhile */
  buf[n] = 0;
  const char *i = strstr(buf, "\nino:"), *m = strstr(buf, "\nmnt_id:"), *fl = strstr(buf, "\nflags:");
  if (!i || !m || !fl)
    return -1; /* an older kernel */
  if (strtoull(i + 5, NULL, 10) != ino || (strtoul(fl + 7, NULL, 8) & O_ACCMODE) == O_RDONLY)
    return 0;
  return mount_is_ours(pid, strtol(m + 8, NULL, 10));
}

int procfd_writer(pid_t pid, fuse_ino_t ino) {
  if (!dev_known || pid <= 0)
    return -1;
  char dir[64];
  snprintf(dir, sizeof dir, "/proc/%d/fdinfo", (int)pid);
  DIR *d = opendir(dir);
  if (!d)
    return -1; /* gone, or another user's process */
  int found = 0;
  for (struct dirent *de; found == 0 && (de = readdir(d));) {
    if (de->d_name[0] == '.')
      continue;
    char path[sizeof dir + sizeof de->d_name + 1];
    snprintf(path, sizeof path, "%s/%s", dir, de->d_name);
    found = fdinfo_is(pid, path, ino);
  }
  closedir(d);
  return found;
}
