/*
 * main.c — `coordfs [options] MOUNTPOINT`: options, daemonizing, start-up
 * and shut-down.
 *
 * Start-up order matters:
 *   1. parse options (one that neither coordfs nor libfuse knows is named
 *      and refused with exit 2: check_fuse_opts), read the password (file
 *      or $COORD_PASSWORD; never argv), check the mount point (refused if
 *      a coordfs is mounted exactly there already: coordfs_mounted_on);
 *   2. unless -f/-d: fork.  The parent waits on a pipe for the child's
 *      verdict and exits with it, so `coordfs` returns non-zero with the
 *      child's message when etcd cannot be reached or the mount fails.
 *      The fork happens before gRPC is initialised (coord_new), because
 *      fork() after grpc_init() breaks gRPC;
 *   3. coord_new (connects, checks etcd answers), load the caches, open the
 *      watches, start the watch and notifier threads, mount;
 *   4. tell the parent, detach stdio, run the multi-threaded FUSE loop.
 * SIGTERM/SIGINT/SIGHUP end the loop (libfuse's handlers, which run on the
 * main thread: every other thread is created with them blocked); then
 * coordfs stops its threads, unmounts and closes the client, which revokes
 * the leases of open registrations.  `fusermount3 -u` ends the loop too.
 */
#include "coordfs.h"
#include "log.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/vfs.h>
#include <unistd.h>

#include <fuse_opt.h>

/* Declared by fuse_lowlevel.h only for FUSE_USE_VERSION >= 312. */
int fuse_session_loop_mt_312(struct fuse_session *se, struct fuse_loop_config *config);
#define CFS_MAX_THREADS 512

enum { KEY_HELP, KEY_VERSION, KEY_FG, KEY_DEBUG, KEY_RO, KEY_ALLOW_OTHER, KEY_DEFPERM, KEY_IGNORE };

struct raw {
  char *lock_ttl, *service_ttl, *timeout;
  int uid, gid;
  char *umask;
  int nonopts;
  char *first_nonopt;
};
static struct raw raw = {.uid = -1, .gid = -1};

#define O(t, f)                                                                                              \
  { t, offsetof(struct cfs_opts, f), 0 }
#define R(t, f)                                                                                              \
  { t, offsetof(struct raw, f), 0 }

/* fuse_opt applies every matching template in order, and "--x %s" also
 * matches "--x=v" (as "=v"): the "--x=%s" form must come last to win. */
static const struct fuse_opt opts_spec[] = {
    O("--endpoints %s", endpoints),
    O("--endpoints=%s", endpoints),
    O("endpoints=%s", endpoints),
    O("--user %s", user),
    O("--user=%s", user),
    O("user=%s", user),
    O("--password-file %s", password_file),
    O("--password-file=%s", password_file),
    O("password-file=%s", password_file),
    O("password_file=%s", password_file),
    O("--cacert %s", cacert),
    O("--cacert=%s", cacert),
    O("cacert=%s", cacert),
    O("--cert %s", cert),
    O("--cert=%s", cert),
    O("cert=%s", cert),
    O("--key %s", key),
    O("--key=%s", key),
    O("key=%s", key),
    O("--local-names %s", local_names),
    O("--local-names=%s", local_names),
    O("local-names=%s", local_names),
    O("local_names=%s", local_names),
    O("--subtree %s", subtree),
    O("--subtree=%s", subtree),
    O("subtree=%s", subtree),
    O("--prefix %s", prefix),
    O("--prefix=%s", prefix),
    O("prefix=%s", prefix),
    FUSE_OPT_END,
};

static const struct fuse_opt raw_spec[] = {
    R("--lock-ttl %s", lock_ttl),
    R("--lock-ttl=%s", lock_ttl),
    R("lock-ttl=%s", lock_ttl),
    R("lock_ttl=%s", lock_ttl),
    R("--service-ttl %s", service_ttl),
    R("--service-ttl=%s", service_ttl),
    R("service-ttl=%s", service_ttl),
    R("service_ttl=%s", service_ttl),
    R("--timeout %s", timeout),
    R("--timeout=%s", timeout),
    R("timeout=%s", timeout),
    R("uid=%d", uid),
    R("gid=%d", gid),
    R("umask=%s", umask),
    FUSE_OPT_END,
};

static const struct fuse_opt key_spec[] = {
    FUSE_OPT_KEY("-h", KEY_HELP),
    FUSE_OPT_KEY("--help", KEY_HELP),
    FUSE_OPT_KEY("-V", KEY_VERSION),
    FUSE_OPT_KEY("--version", KEY_VERSION),
    FUSE_OPT_KEY("-f", KEY_FG),
    FUSE_OPT_KEY("-d", KEY_DEBUG),
    FUSE_OPT_KEY("debug", KEY_DEBUG),
    FUSE_OPT_KEY("ro", KEY_RO),
    FUSE_OPT_KEY("allow_other", KEY_ALLOW_OTHER),
    FUSE_OPT_KEY("default_permissions", KEY_DEFPERM),
    /* fstab words that are not FUSE options */
    FUSE_OPT_KEY("_netdev", KEY_IGNORE),
    FUSE_OPT_KEY("noauto", KEY_IGNORE),
    FUSE_OPT_KEY("auto", KEY_IGNORE),
    FUSE_OPT_KEY("nofail", KEY_IGNORE),
    FUSE_OPT_KEY("user", KEY_IGNORE),
    FUSE_OPT_KEY("users", KEY_IGNORE),
    FUSE_OPT_KEY("defaults", KEY_IGNORE),
    FUSE_OPT_KEY("rw", KEY_IGNORE),
    FUSE_OPT_END,
};

static void usage(FILE *f) {
  fprintf(
      f,
      "usage: coordfs [options] MOUNTPOINT\n"
      "\n"
      "  --endpoints=E        etcd endpoints, comma-separated (default $COORD_ENDPOINTS or localhost:2379)\n"
      "  --user=NAME          etcd user (password from --password-file or $COORD_PASSWORD)\n"
      "  --password-file=F    file whose first line is the password\n"
      "  --cacert=F --cert=F --key=F   TLS\n"
      "  --prefix=P           namespace prefix before every key\n"
      "  --subtree=PATH       load and watch only /config/PATH/ (for an etcd\n"
      "                       user whose role covers that subtree alone)\n"
      "  --local-names=GLOBS  /config names kept on this mount only, never in etcd,\n"
      "                       ':'-separated (default: editors' temporary files,\n"
      "                       .*.sw?:.*.swpx:4913:*~:#*#:.#*; empty: none)\n"
      "  --lock-ttl=T         lease TTL of locks taken through /locks (default 10s)\n"
      "  --service-ttl=T      lease TTL of registrations through /services (default 10s)\n"
      "  --timeout=T          deadline of each etcd call (default 5s)\n"
      "  -f                   stay in the foreground\n"
      "  -d                   debug (implies -f)\n"
      "  -o OPT[,OPT...]      each option above as name=value, and ro, allow_other,\n"
      "                       default_permissions, uid=N, gid=N\n"
      "  T is a number of seconds, or a number with the suffix ms or s.\n");
}

/* Options that coordfs does not know itself and leaves to libfuse (mount
 * options such as nosuid, fsname=, max_read=): each is checked with a
 * trial fuse_session_new before anything else happens (check_fuse_opts). */
#define MAX_PASSED 64
static char *passed[MAX_PASSED];
static int npassed;

static int opt_proc(void *data, const char *arg, int key, struct fuse_args *outargs) {
  (void)data, (void)outargs;
  switch (key) {
  case KEY_HELP:
    usage(stdout);
    exit(0);
  case KEY_VERSION:
    printf("coordfs %d.%d.%d (libfuse %s)\n", COORD_VERSION_MAJOR, COORD_VERSION_MINOR, COORD_VERSION_PATCH,
           fuse_pkgversion());
    exit(0);
  case KEY_FG:
    g.o.foreground = 1;
    return 0;
  case KEY_DEBUG:
    g.o.debug = g.o.foreground = 1;
    return 1; /* libfuse prints every request */
  case KEY_RO:
    g.o.ro = 1;
    return 1;
  case KEY_ALLOW_OTHER:
    g.o.allow_other = 1;
    return 1;
  case KEY_DEFPERM:
    g.o.default_permissions = 1;
    return 1;
  case KEY_IGNORE:
    return 0;
  case FUSE_OPT_KEY_NONOPT:
    raw.nonopts++;
    if (raw.nonopts == 1) {
      raw.first_nonopt = strdup(arg);
    } else if (raw.nonopts == 2) {
      /* `mount -t fuse.coordfs SOURCE DIR`: the source is the endpoints */
      if (!g.o.endpoints && raw.first_nonopt && strchr(raw.first_nonopt, ':'))
        g.o.endpoints = raw.first_nonopt;
      else
        free(raw.first_nonopt);
      raw.first_nonopt = strdup(arg);
    } else {
      fprintf(stderr, "coordfs: unexpected argument '%s'\n", arg);
      exit(2);
    }
    return 0;
  default: /* FUSE_OPT_KEY_OPT: "-x", "--x[=v]", or one of an -o list */
    if (npassed < MAX_PASSED)
      passed[npassed++] = strdup(arg);
    return 1;
  }
}

/* Long options and -o names, for the hint after an unknown option. */
static const char *const known_names[] = {
    "endpoints", "user",        "password-file", "cacert",
    "cert",      "key",         "subtree",       "prefix",
    "lock-ttl",  "service-ttl", "local-names",   "timeout",
    "help",      "version",     "allow_other",   "default_permissions",
    "uid",       "gid",         "umask",         "debug",
    "ro",
};

/* Edit distance of a[0..n) and b, if at most 2 (else 3). */
static int near(const char *a, size_t n, const char *b) {
  size_t m = strlen(b);
  if (n > m + 2 || m > n + 2 || n > 64 || m > 64)
    return 3;
  int d[65][65];
  for (size_t i = 0; i <= n; i++)
    d[i][0] = (int)i;
  for (size_t j = 0; j <= m; j++)
    d[0][j] = (int)j;
  for (size_t i = 1; i <= n; i++)
    for (size_t j = 1; j <= m; j++) {
      int v = d[i - 1][j - 1] + (a[i - 1] != b[j - 1] && !(strchr("-_", a[i - 1]) && strchr("-_", b[j - 1])));
      if (d[i - 1][j] + 1 < v)
        v = d[i - 1][j] + 1;
      if (d[i][j - 1] + 1 < v)
        v = d[i][j - 1] + 1;
      d[i][j] = v;
    }
  return d[n][m] > 2 ? 3 : d[n][m];
}

/* Says that arg (as coordfs got it: "--endpoint=x", or "bogus=1" from an
 * -o list) is unknown, with a guess at what was meant. */
static void unknown_option(const char *arg) {
  int dash = arg[0] == '-';
  const char *name = arg;
  while (*name == '-')
    name++;
  size_t n = strcspn(name, "=");
  const char *best = NULL;
  int best_d = 3;
  for (size_t i = 0; i < sizeof(known_names) / sizeof(known_names[0]); i++) {
    int d = near(name, n, known_names[i]);
    if (d < best_d && d < (int)n) {
      best_d = d;
      best = known_names[i];
    }
  }
  fprintf(stderr, "coordfs: unknown option '%s%s'", dash ? "" : "-o ", arg);
  if (best)
    fprintf(stderr, " (did you mean '%s%s%s'?)", dash ? "--" : "-o ", best, name + n);
  fprintf(stderr, "\ncoordfs: coordfs --help lists the options\n");
}

static void quiet_log(enum fuse_log_level level, const char *fmt, va_list ap) {
  (void)level, (void)fmt, (void)ap;
}

/* Every option left to libfuse must be one that libfuse knows: else it
 * would refuse them all only after etcd was reached, in words that do not
 * say which.  A trial session (no mount, no /dev/fuse) per option tells.
 * 0, or 2 after saying which is unknown. */
static int check_fuse_opts(void) {
  int rc = 0;
  fuse_set_log_func(quiet_log);
  for (int i = 0; i < npassed && !rc; i++) {
    if (!passed[i])
      continue;
    char *argv[] = {"coordfs", passed[i][0] == '-' ? passed[i] : "-o", passed[i], NULL};
    struct fuse_args a = FUSE_ARGS_INIT(passed[i][0] == '-' ? 2 : 3, argv);
    struct fuse_session *se = fuse_session_new(&a, &cfs_ops, sizeof(cfs_ops), NULL);
    if (se)
      fuse_session_destroy(se);
    else
      rc = 2;
    fuse_opt_free_args(&a);
    if (rc)
      unknown_option(passed[i]);
  }
  fuse_set_log_func(NULL); /* libfuse's own, until cfs_log_init */
  for (int i = 0; i < npassed; i++)
    free(passed[i]);
  npassed = 0;
  return rc;
}

/* 1 if a coordfs is mounted exactly on path (/proc/self/mountinfo: file
 * system type fuse.coordfs, or source coordfs). */
static int coordfs_mounted_on(const char *path) {
  FILE *f = fopen("/proc/self/mountinfo", "r");
  if (!f)
    return 0;
  char *line = NULL;
  size_t cap = 0;
  int found = 0;
  while (!found && getline(&line, &cap, f) > 0) {
    /* id parent maj:min root MOUNTPOINT options [optional...] - TYPE SOURCE super */
    char *save = NULL, *mp = NULL, *tok = strtok_r(line, " \n", &save);
    for (int i = 0; tok && i < 4; i++) {
      tok = strtok_r(NULL, " \n", &save);
      if (i == 3)
        mp = tok;
    }
    while (tok && strcmp(tok, "-"))
      tok = strtok_r(NULL, " \n", &save);
    char *type = tok ? strtok_r(NULL, " \n", &save) : NULL;
    char *source = type ? strtok_r(NULL, " \n", &save) : NULL;
    if (!mp || !type)
      continue;
    cfs_mountinfo_unescape(mp); /* space, tab, newline, backslash are \ooo */
    found = !strcmp(mp, path) && (!strcmp(type, "fuse.coordfs") ||
                                  (!strncmp(type, "fuse", 4) && source && !strcmp(source, "coordfs")));
  }
  free(line);
  fclose(f);
  return found;
}

/* "10", "10s", "500ms" -> ms; -1 if malformed. */
static char *read_password(const char *file) {
  FILE *f = fopen(file, "r");
  if (!f)
    return NULL;
  char buf[1024];
  char *line = fgets(buf, sizeof(buf), f);
  fclose(f);
  if (!line)
    return strdup("");
  buf[strcspn(buf, "\r\n")] = 0;
  return strdup(buf);
}

static int ready_fd = -1;

/* Tells the waiting parent how start-up went (0: mounted). */
static void report(int code) {
  if (ready_fd >= 0) {
    unsigned char c = (unsigned char)code;
    if (write(ready_fd, &c, 1) < 0) {
      /* the parent is gone: nothing to tell */
    }
    close(ready_fd);
    ready_fd = -1;
  }
}

static void fail(int code) {
  report(code);
  exit(code);
}

/* Forks; the parent waits for the child's report and exits with it. */
static void daemonize(void) {
  int p[2];
  if (pipe(p)) {
    perror("coordfs: pipe");
    exit(1);
  }
  pid_t pid = fork();
  if (pid < 0) {
    perror("coordfs: fork");
    exit(1);
  }
  if (pid > 0) {
    close(p[1]);
    unsigned char c;
    ssize_t n;
    do
      n = read(p[0], &c, 1);
    while (n < 0 && errno == EINTR);
    _exit(n == 1 ? c : 1);
  }
  close(p[0]);
  ready_fd = p[1];
  setsid();
}

static void detach_stdio(void) {
  int fd = open("/dev/null", O_RDWR);
  if (fd >= 0) {
    dup2(fd, 0);
    dup2(fd, 1);
    dup2(fd, 2);
    if (fd > 2)
      close(fd);
  }
}

int main(int argc, char **argv) {
  struct fuse_args args = FUSE_ARGS_INIT(argc, argv);
  clock_gettime(CLOCK_REALTIME, &g.started);
  pthread_mutex_init(&g.lock, NULL);
  pthread_condattr_t ca;
  pthread_condattr_init(&ca);
  pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
  pthread_cond_init(&g.cond, &ca);
  g.config.prefix = "/config/";
  g.services.prefix = "/services/";
  g.o.lock_ttl_ms = 10000;
  g.o.service_ttl_ms = 10000;

  if (fuse_opt_parse(&args, &g.o, opts_spec, NULL) || fuse_opt_parse(&args, &raw, raw_spec, NULL) ||
      fuse_opt_parse(&args, NULL, key_spec, opt_proc)) {
    fprintf(stderr, "coordfs: coordfs --help lists the options\n"); /* after libfuse's reason */
    return 2;
  }
  if (check_fuse_opts()) {
    fuse_opt_free_args(&args);
    return 2;
  }
  cfs_log_init(g.o.foreground, g.o.debug); /* stderr with -f/-d, else syslog */
  if (!raw.first_nonopt) {
    fprintf(stderr, "coordfs: no mount point given\n");
    usage(stderr);
    return 2;
  }
  if (g.o.subtree) {
    size_t n = strlen(g.o.subtree);
    while (n && g.o.subtree[n - 1] == '/')
      g.o.subtree[--n] = '\0';
    if (!cfs_key_ok(g.o.subtree, n)) {
      fprintf(stderr, "coordfs: bad --subtree '%s': a config path such as app or app/db\n", g.o.subtree);
      return 2;
    }
    if (asprintf(&g.o.config_root, "/config/%s/", g.o.subtree) < 0)
      return 1;
  } else {
    g.o.config_root = strdup("/config/");
  }
  if (local_init(g.o.local_names)) {
    fprintf(stderr, "coordfs: out of memory\n");
    return 1;
  }
  if (raw.lock_ttl && (g.o.lock_ttl_ms = cfs_parse_ms(raw.lock_ttl)) <= 0) {
    fprintf(stderr, "coordfs: bad --lock-ttl '%s'\n", raw.lock_ttl);
    return 2;
  }
  if (raw.service_ttl && (g.o.service_ttl_ms = cfs_parse_ms(raw.service_ttl)) <= 0) {
    fprintf(stderr, "coordfs: bad --service-ttl '%s'\n", raw.service_ttl);
    return 2;
  }
  if (raw.timeout && (g.o.timeout_ms = cfs_parse_ms(raw.timeout)) <= 0) {
    fprintf(stderr, "coordfs: bad --timeout '%s'\n", raw.timeout);
    return 2;
  }
  g.o.umask = 022;
  if (raw.umask) {
    char *end;
    unsigned long m = strtoul(raw.umask, &end, 8);
    if (*end || m > 0777) {
      fprintf(stderr, "coordfs: bad umask '%s'\n", raw.umask);
      return 2;
    }
    g.o.umask = (unsigned)m;
  }
  g.o.uid = raw.uid >= 0 ? (unsigned)raw.uid : getuid();
  g.o.gid = raw.gid >= 0 ? (unsigned)raw.gid : getgid();
  if (g.o.password_file) {
    g.o.password = read_password(g.o.password_file);
    if (!g.o.password) {
      fprintf(stderr, "coordfs: cannot read password file %s: %s\n", g.o.password_file, strerror(errno));
      return 1;
    }
  } else if (getenv("COORD_PASSWORD")) {
    g.o.password = strdup(getenv("COORD_PASSWORD"));
  }
  if (!g.o.endpoints)
    g.o.endpoints = getenv("COORD_ENDPOINTS") ? strdup(getenv("COORD_ENDPOINTS")) : strdup("localhost:2379");

  char real[PATH_MAX];
  struct stat st;
  if (!realpath(raw.first_nonopt, real) || stat(real, &st)) {
    fprintf(stderr, "coordfs: mount point %s: %s\n", raw.first_nonopt, strerror(errno));
    return 1;
  }
  if (!S_ISDIR(st.st_mode)) {
    fprintf(stderr, "coordfs: mount point %s: not a directory\n", raw.first_nonopt);
    return 1;
  }
  /* A live coordfs there: refuse (a second daemon would stack on it).  A
   * dead one (its daemon killed: statfs gets ENOTCONN) is mounted over, as
   * before; it can be unmounted later. */
  struct statfs sf;
  if (coordfs_mounted_on(real)) {
    if (statfs(real, &sf) == 0 || errno != ENOTCONN) {
      fprintf(stderr,
              "coordfs: mount point %s: a coordfs is already mounted there (unmount it first: fusermount3 -u "
              "%s)\n",
              real, real);
      fuse_opt_free_args(&args);
      return 1;
    }
    fprintf(stderr, "coordfs: mount point %s: the coordfs mounted there is dead; mounting over it\n", real);
  }
  g.o.mountpoint = strdup(real);
  fuse_opt_add_arg(&args, "-o");
  fuse_opt_add_arg(&args, "fsname=coordfs,subtype=coordfs");

  if (!g.o.foreground)
    daemonize(); /* before gRPC exists */

  /* Every thread made from here on (libcoord's, the watch thread, the
   * notifier, libfuse's workers) has the termination signals blocked, so
   * that libfuse's handlers run on this thread. */
  sigset_t block, old;
  sigemptyset(&block);
  sigaddset(&block, SIGINT);
  sigaddset(&block, SIGTERM);
  sigaddset(&block, SIGHUP);
  pthread_sigmask(SIG_BLOCK, &block, &old);
  signal(SIGPIPE, SIG_IGN);

  coord_config_t cfg = coord_default_config();
  cfg.endpoints = g.o.endpoints;
  cfg.username = g.o.user;
  cfg.password = g.o.password;
  cfg.ca_file = g.o.cacert;
  cfg.cert_file = g.o.cert;
  cfg.key_file = g.o.key;
  cfg.prefix = g.o.prefix ? g.o.prefix : "";
  if (g.o.timeout_ms > 0) {
    cfg.timeout_ms = g.o.timeout_ms;
    cfg.dial_timeout_ms = g.o.timeout_ms;
  }
  int rc = coord_new(&cfg, &g.c);
  if (rc) {
    fprintf(stderr, "coordfs: cannot reach etcd at %s: %s%s%s\n", g.o.endpoints, coord_strerror(rc),
            *coord_last_error() ? ": " : "", coord_last_error());
    fail(1);
  }
  /* A user allowed only part of the tree still mounts: a tree it may not
   * read shows empty (and its watch keeps being retried). */
  for (int i = 0; i < 2; i++) {
    rc = i == 0 ? config_load() : services_load();
    if (rc == COORD_EACCES) {
      fprintf(stderr, "coordfs: warning: no permission to read %s in etcd; it shows empty%s\n",
              i == 0 ? g.o.config_root : "/services/",
              i == 0 && !g.o.subtree ? " (--subtree limits the mount to what the user may read)" : "");
    } else if (rc) {
      fprintf(stderr, "coordfs: cannot read from etcd at %s: %s%s%s\n", g.o.endpoints, coord_strerror(rc),
              *coord_last_error() ? ": " : "", coord_last_error());
      fail(1);
    }
  }
  status_log_skipped_all(); /* keys the tree leaves out, once each */
  if ((rc = locks_init())) {
    fprintf(stderr, "coordfs: /locks: %s\n", coord_strerror(rc));
    fail(1);
  }

  struct fuse_session *se = fuse_session_new(&args, &cfs_ops, sizeof(cfs_ops), NULL);
  if (!se) {
    fprintf(stderr, "coordfs: bad FUSE options\n");
    fail(1);
  }
  g.se = se;
  if (fuse_set_signal_handlers(se)) {
    fprintf(stderr, "coordfs: cannot set signal handlers\n");
    fail(1);
  }
  if ((rc = events_start())) {
    fprintf(stderr, "coordfs: cannot watch etcd at %s: %s\n", g.o.endpoints, coord_strerror(rc));
    fail(1);
  }
  if (fuse_session_mount(se, g.o.mountpoint)) {
    fprintf(stderr, "coordfs: cannot mount on %s (is it already mounted, or is /dev/fuse missing?)\n",
            g.o.mountpoint);
    events_stop();
    fail(1);
  }
  procfd_init(g.o.mountpoint);
  notifier_start();
  if (chdir("/")) {
    /* not fatal: paths are absolute */
  }
  report(0);
  if (!g.o.foreground)
    detach_stdio();
  cfs_log_started(g.o.mountpoint, g.o.endpoints);
  pthread_sigmask(SIG_SETMASK, &old, NULL);

  /* The 3.12 loop API (libfuse 3.14 exports it) lifts the 3.2 loop's cap
   * of 10 worker threads: an op that waits for etcd ties up one thread. */
  struct fuse_loop_config *lc = fuse_loop_cfg_create();
  fuse_loop_cfg_set_idle_threads(lc, 16);
  fuse_loop_cfg_set_max_threads(lc, CFS_MAX_THREADS);
  rc = fuse_session_loop_mt_312(se, lc);
  fuse_loop_cfg_destroy(lc);

  pthread_sigmask(SIG_BLOCK, &block, NULL);
  cfs_log(LOG_NOTICE, "unmounting %s", g.o.mountpoint);
  events_stop();
  fuse_remove_signal_handlers(se);
  fuse_session_unmount(se);
  notifier_stop();
  locks_shutdown(); /* first: frees the lock files, incl. pending opens */
  cfs_files_shutdown();
  services_shutdown();
  coord_close(g.c);
  fuse_session_destroy(se);
  fuse_opt_free_args(&args);
  cache_free(&g.config);
  cache_free(&g.services);
  local_free();
  return rc < 0 ? 1 : 0;
}
