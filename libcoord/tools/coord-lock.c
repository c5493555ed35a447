/*
 * coord-lock.c — run a command while holding one of coord's distributed
 * locks, and make sure the command no longer runs by the time anyone else
 * can get the lock (flock(1) for etcd, with a watchdog).
 *
 *   coord-lock [options] NAME [--] CMD [ARGS...]
 *
 * Takes the lock NAME (coord_lock_acquire: the same lock as `etcdctl lock
 * /locks/NAME` and coordfs's /locks/NAME), runs CMD with COORD_LOCK_TOKEN
 * (the fencing token), COORD_LOCK_KEY (the holder key as etcd stores it,
 * with the --prefix) and COORD_LOCK_NAME in its environment, waits for it,
 * releases the lock and exits with CMD's status.  docs/man/coord-lock.1
 * is the manual: options, defaults and exit statuses (the EXIT_* below).
 *
 * THE WATCHDOG.  A lock is only as good as its lease: a holder cut off from
 * etcd longer than the TTL loses it, and another client gets it.  So while
 * CMD runs, coord-lock asks coord_lock_deadline how long the lease is
 * certainly alive (the send time of the last renewal etcd answered plus
 * its TTL; answered locally, no round trip).  Renewals happen every TTL/3,
 * so while they succeed that stays above 2/3 of the TTL.  When it drops
 * below --term-before (default TTL/3) every process of CMD's tree gets
 * SIGTERM; after --kill-after (default 2 s), or as soon as it drops below
 * --kill-before (default min(1 s, term-before/2)), whichever comes first,
 * SIGKILL, repeated until no process of the tree is left.  A lock that
 * libcoord reports lost (coord_lock_on_lost: lease expired or revoked, key
 * deleted) gets SIGKILL at once.  Either way coord-lock exits EXIT_LOST.
 *
 * CMD'S TREE.  coord-lock is a child subreaper (PR_SET_CHILD_SUBREAPER):
 * every process CMD starts stays below it, even one that daemonizes, until
 * coord-lock exits.  "The tree" is every live process below coord-lock,
 * found by reading /proc (a process may fork between the scan and the
 * signal; the SIGKILL sweep repeats until a scan finds nobody).  CMD stays
 * in coord-lock's process group, so it keeps the terminal.  When CMD exits
 * by itself, what it left running in the background is neither waited for
 * nor killed.
 *
 * FORK.  fork() after grpc_init breaks gRPC (DESIGN.md), and the token must
 * be in CMD's environment, which needs the lock first.  So the child that
 * will exec CMD is forked before coord_new, with PR_SET_PDEATHSIG(SIGKILL)
 * (it never outlives a killed coord-lock), and waits on the "go" pipe:
 * once the lock is held the parent writes the token, key and name there
 * and closes it; the child puts them in its environment and execs CMD.
 * EOF with nothing read means the lock was not taken: the child exits
 * without running anything.  exec failures come back on the close-on-exec
 * "exec" pipe (errno), as with posix_spawn.
 *
 * THREADS, SIGNALS, OWNERSHIP.  main() is the only thread of coord-lock's
 * own; libcoord adds its event thread (and gRPC its threads).  The signals
 * coord-lock handles (SIGCHLD, SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1,
 * SIGUSR2) are blocked before any thread exists, so every thread inherits
 * the mask, and main reads them from a signalfd; the child restores the
 * original mask before exec.  While CMD runs, SIGTERM, SIGINT, SIGHUP,
 * SIGQUIT, SIGUSR1 and SIGUSR2 sent to coord-lock by a process are
 * forwarded to CMD (a terminal's ^C already reached CMD's process group:
 * not forwarded twice); while waiting for the lock, SIGTERM, SIGINT,
 * SIGHUP and SIGQUIT withdraw from the queue and exit 128+N.  The acquire
 * and lost callbacks run on the event thread: they only store a status
 * (atomic) and write to an eventfd that main polls; the struct they use
 * lives in main's frame until coord_lock_unlock has returned (after which
 * no callback runs).  The lock handle belongs to main.
 */
#include <coord.h>

#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <math.h> /* isfinite (a macro: no libm) */
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* Exit statuses (also in the man page).  CMD's own status otherwise. */
#define EXIT_BUSY 1          /* -n: lock held; -w: wait timed out (-E changes it) */
#define EXIT_USAGE 64        /* bad command line */
#define EXIT_UNAVAILABLE 69  /* etcd unreachable, auth failed, etcd error */
#define EXIT_OSERR 71        /* fork, pipe, ... failed */
#define EXIT_LOST 75         /* CMD signalled: the lock was, or could have been, lost */
#define EXIT_CANNOT_EXEC 126 /* CMD found but not executable */
#define EXIT_NOT_FOUND 127   /* CMD not found */

#define DEFAULT_TTL_MS 10000
#define DEFAULT_KILL_AFTER_MS 2000
#define KILL_BEFORE_CAP_MS 1000
#define POLL_CAP_MS 1000  /* longest sleep while CMD runs */
#define SWEEP_EVERY_MS 20 /* SIGKILL sweeps while the tree lingers */

typedef struct opts {
  const char *name;
  char **cmd;
  int nowait;
  int64_t wait_ms; /* -1: for ever */
  int64_t ttl_ms;
  int64_t term_before_ms; /* -1: default */
  int64_t kill_before_ms; /* -1: default */
  int64_t kill_after_ms;
  int busy_code;
  int verbose;
  const char *endpoints, *prefix, *user, *password_file, *cacert, *cert, *key;
} opts_t;

/* Shared with the callbacks (event thread): see the header. */
typedef struct events {
  int acq_fd;  /* eventfd: the async acquire finished */
  int lost_fd; /* eventfd: the held lock was lost */
  int acq_status;
} events_t;

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  fprintf(stderr, "coord-lock: %s\n", buf);
}

static int64_t now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void usage(int code) {
  fprintf(code ? stderr : stdout,
          "usage: coord-lock [options] NAME [--] CMD [ARGS...]\n"
          "Runs CMD holding coord's distributed lock NAME (/locks/NAME in etcd).\n"
          "  -n, --nonblock          fail at once (exit 1) if the lock is held\n"
          "  -w, --wait SECONDS      wait at most that long for the lock (exit 1)\n"
          "  -E, --conflict-exit-code N  exit status for -n and -w (default 1)\n"
          "      --ttl DURATION      lease TTL (default 10s; '500ms', '3s', '3' = 3 s)\n"
          "      --term-before D     SIGTERM to CMD when the lease may end within D (TTL/3)\n"
          "      --kill-before D     SIGKILL when it may end within D (min(1s, term-before/2))\n"
          "      --kill-after D      SIGKILL D after the SIGTERM at the latest (2s)\n"
          "      --endpoints E       etcd endpoints (default $COORD_ENDPOINTS or localhost:2379)\n"
          "      --prefix P          namespace prefix before every key\n"
          "      --user NAME         etcd user; password from --password-file or $COORD_PASSWORD\n"
          "      --password-file F   file whose first line is the password\n"
          "      --cacert F, --cert F, --key F   TLS files\n"
          "  -v, --verbose           say when the lock is taken and released\n"
          "Exit: CMD's status; 1 lock busy or wait timed out; 75 CMD killed because the lock\n"
          "was or could be lost; 64 usage; 69 etcd error; 71 system error; 126/127 CMD not run.\n");
  exit(code);
}

/* "3", "2.5", "3s", "500ms", "1m" -> ms (a bare number is seconds). */
static int parse_duration(const char *s, int64_t *ms) {
  char *end = NULL;
  errno = 0;
  double v = strtod(s, &end);
  if (end == s || errno || !isfinite(v) || v < 0)
    return -1;
  double mult = 1000;
  if (!strcmp(end, "ms"))
    mult = 1;
  else if (!strcmp(end, "m"))
    mult = 60000;
  else if (strcmp(end, "s") && strcmp(end, ""))
    return -1;
  v *= mult;
  if (v > 1e12)
    return -1;
  int64_t whole = (int64_t)v;
  *ms = (double)whole < v ? whole + 1 : whole; /* rounded up: no libm */
  return 0;
}

static int64_t duration_arg(const char *opt, const char *s) {
  int64_t ms = 0;
  if (parse_duration(s, &ms) < 0) {
    say("%s: invalid duration '%s' (e.g. 3, 2.5s, 500ms)", opt, s);
    exit(EXIT_USAGE);
  }
  return ms;
}

static void parse_args(int argc, char **argv, opts_t *o) {
  enum {
    O_TTL = 256,
    O_TERM_BEFORE,
    O_KILL_BEFORE,
    O_KILL_AFTER,
    O_ENDPOINTS,
    O_PREFIX,
    O_USER,
    O_PWFILE,
    O_CACERT,
    O_CERT,
    O_KEY
  };
  static const struct option longs[] = {{"nonblock", no_argument, NULL, 'n'},
                                        {"nb", no_argument, NULL, 'n'},
                                        {"wait", required_argument, NULL, 'w'},
                                        {"timeout", required_argument, NULL, 'w'},
                                        {"conflict-exit-code", required_argument, NULL, 'E'},
                                        {"verbose", no_argument, NULL, 'v'},
                                        {"help", no_argument, NULL, 'h'},
                                        {"ttl", required_argument, NULL, O_TTL},
                                        {"term-before", required_argument, NULL, O_TERM_BEFORE},
                                        {"kill-before", required_argument, NULL, O_KILL_BEFORE},
                                        {"kill-after", required_argument, NULL, O_KILL_AFTER},
                                        {"endpoints", required_argument, NULL, O_ENDPOINTS},
                                        {"prefix", required_argument, NULL, O_PREFIX},
                                        {"user", required_argument, NULL, O_USER},
                                        {"password-file", required_argument, NULL, O_PWFILE},
                                        {"cacert", required_argument, NULL, O_CACERT},
                                        {"cert", required_argument, NULL, O_CERT},
                                        {"key", required_argument, NULL, O_KEY},
                                        {NULL, 0, NULL, 0}};
  memset(o, 0, sizeof *o);
  o->wait_ms = -1;
  o->ttl_ms = DEFAULT_TTL_MS;
  o->term_before_ms = o->kill_before_ms = -1;
  o->kill_after_ms = DEFAULT_KILL_AFTER_MS;
  o->busy_code = EXIT_BUSY;
  int ch;
  opterr = 0;
  /* '+': stop at NAME, so that CMD's own options are left alone */
  while ((ch = getopt_long(argc, argv, "+nw:E:vh", longs, NULL)) != -1) {
    switch (ch) {
    case 'n':
      o->nowait = 1;
      break;
    case 'w':
      o->wait_ms = duration_arg("-w", optarg);
      break;
    case 'E': {
      char *end = NULL;
      long v = strtol(optarg, &end, 10);
      if (*optarg == '\0' || *end != '\0' || v < 0 || v > 255) {
        say("-E: exit code must be 0..255, not '%s'", optarg);
        exit(EXIT_USAGE);
      }
      o->busy_code = (int)v;
      break;
    }
    case 'v':
      o->verbose = 1;
      break;
    case 'h':
      usage(0);
      break;
    case O_TTL:
      o->ttl_ms = duration_arg("--ttl", optarg);
      break;
    case O_TERM_BEFORE:
      o->term_before_ms = duration_arg("--term-before", optarg);
      break;
    case O_KILL_BEFORE:
      o->kill_before_ms = duration_arg("--kill-before", optarg);
      break;
    case O_KILL_AFTER:
      o->kill_after_ms = duration_arg("--kill-after", optarg);
      break;
    case O_ENDPOINTS:
      o->endpoints = optarg;
      break;
    case O_PREFIX:
      o->prefix = optarg;
      break;
    case O_USER:
      o->user = optarg;
      break;
    case O_PWFILE:
      o->password_file = optarg;
      break;
    case O_CACERT:
      o->cacert = optarg;
      break;
    case O_CERT:
      o->cert = optarg;
      break;
    case O_KEY:
      o->key = optarg;
      break;
    default:
      if (optopt > 0 && optopt < 256)
        say("option -%c: unknown, or its argument is missing", optopt);
      else
        say("option %s: unknown, or its argument is missing", argv[optind - 1]);
      usage(EXIT_USAGE);
    }
  }
  if (optind >= argc) {
    say("no lock NAME given");
    usage(EXIT_USAGE);
  }
  o->name = argv[optind++];
  if (optind < argc && !strcmp(argv[optind], "--"))
    optind++;
  if (optind >= argc) {
    say("no CMD given");
    usage(EXIT_USAGE);
  }
  o->cmd = argv + optind;
  if (o->name[0] == '\0' || strchr(o->name, '/')) {
    say("lock name '%s' must be non-empty and without '/'", o->name);
    exit(EXIT_USAGE);
  }
  if (o->nowait && o->wait_ms >= 0) {
    say("-n and -w exclude each other");
    exit(EXIT_USAGE);
  }
  if (o->wait_ms == 0)
    o->nowait = 1;
  if (o->ttl_ms <= 0) {
    say("--ttl must be above 0");
    exit(EXIT_USAGE);
  }
  int64_t ttl = (o->ttl_ms + 999) / 1000 * 1000; /* etcd's whole seconds */
  int64_t term = o->term_before_ms >= 0 ? o->term_before_ms : ttl / 3;
  int64_t kill = o->kill_before_ms >= 0 ? o->kill_before_ms : 0;
  if (o->term_before_ms >= 0 && (term <= 0 || term >= ttl)) {
    say("--term-before must be above 0 and below the TTL (%" PRId64 " ms)", ttl);
    exit(EXIT_USAGE);
  }
  if (o->kill_before_ms >= 0 && (kill <= 0 || kill >= term)) {
    say("--kill-before must be above 0 and below --term-before (%" PRId64 " ms)", term);
    exit(EXIT_USAGE);
  }
  if (o->user && !o->password_file && !getenv("COORD_PASSWORD")) {
    say("--user needs --password-file or $COORD_PASSWORD (never a password on the command line)");
    exit(EXIT_USAGE);
  }
}

/* First line of file, without its newline; NULL (errno set) on failure. */
static char *read_password(const char *file) {
  FILE *f = fopen(file, "r");
  if (!f)
    return NULL;
  char buf[1024];
  char *line = fgets(buf, sizeof buf, f);
  fclose(f);
  if (!line)
    buf[0] = '\0';
  buf[strcspn(buf, "\r\n")] = '\0';
  char *pw = strdup(buf);
  memset(buf, 0, sizeof buf);
  return pw;
}

/* ---------------------------------------------------------------- the child */

/* The pre-forked child (see FORK above): waits for the go pipe, then
 * execs CMD with the lock's variables.  Never returns. */
static void child_main(int go_fd, int exec_fd, pid_t parent, const sigset_t *mask, char **cmd) {
  if (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0 || getppid() != parent)
    _exit(EXIT_OSERR);
  size_t cap = 4096, n = 0;
  char *buf = malloc(cap);
  for (;;) {
    if (buf == NULL)
      _exit(EXIT_OSERR);
    if (n + 1 >= cap)
      buf = realloc(buf, cap *= 2);
    if (buf == NULL)
      _exit(EXIT_OSERR);
    ssize_t r = read(go_fd, buf + n, cap - n - 1);
    if (r < 0 && errno == EINTR)
      continue;
    if (r <= 0)
      break;
    n += (size_t)r;
  }
  if (n == 0)
    _exit(0); /* the lock was not taken: CMD never runs */
  buf[n] = '\0';
  /* "COORD_LOCK_TOKEN=...\0COORD_LOCK_KEY=...\0COORD_LOCK_NAME=...\0" */
  for (char *p = buf; p < buf + n; p += strlen(p) + 1)
    if (putenv(p) != 0)
      _exit(EXIT_OSERR);
  sigprocmask(SIG_SETMASK, mask, NULL);
  execvp(cmd[0], cmd);
  int e = errno;
  if (write(exec_fd, &e, sizeof e) < 0) {
    /* the parent is gone: nobody to tell */
  }
  _exit(e == ENOENT ? EXIT_NOT_FOUND : EXIT_CANNOT_EXEC);
}

/* ---------------------------------------------------------------- the tree */

typedef struct proc {
  pid_t pid, ppid;
  int zombie;
  int below; /* below coord-lock */
} proc_t;

static int proc_cmp(const void *a, const void *b) {
  pid_t x = ((const proc_t *)a)->pid, y = ((const proc_t *)b)->pid;
  return (x > y) - (x < y);
}

/* Signals every live process below coord-lock with sig (0: only counts
 * them).  Returns how many there were, or -1 if /proc is unreadable. */
static int signal_tree(int sig) {
  DIR *d = opendir("/proc");
  if (d == NULL)
    return -1;
  size_t n = 0, cap = 256;
  proc_t *ps = malloc(cap * sizeof *ps);
  struct dirent *de;
  while (ps != NULL && (de = readdir(d)) != NULL) {
    if (!isdigit((unsigned char)de->d_name[0]))
      continue;
    char path[300], buf[512];
    snprintf(path, sizeof path, "/proc/%s/stat", de->d_name);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
      continue; /* gone meanwhile */
    ssize_t r = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (r <= 0)
      continue;
    buf[r] = '\0';
    /* "pid (comm) S ppid ...": comm may hold anything, ')' included */
    char *rp = strrchr(buf, ')');
    char state = 0;
    int ppid = 0;
    if (rp == NULL || sscanf(rp + 1, " %c %d", &state, &ppid) != 2)
      continue;
    if (n == cap) {
      proc_t *np = realloc(ps, (cap *= 2) * sizeof *ps);
      if (np == NULL) {
        free(ps);
        ps = NULL;
        break;
      }
      ps = np;
    }
    ps[n++] = (proc_t){(pid_t)atoi(de->d_name), (pid_t)ppid, state == 'Z' || state == 'X', 0};
  }
  closedir(d);
  if (ps == NULL)
    return -1;
  qsort(ps, n, sizeof *ps, proc_cmp);
  pid_t self = getpid();
  for (int changed = 1; changed;) { /* one pass per generation */
    changed = 0;
    for (size_t i = 0; i < n; i++) {
      if (ps[i].below)
        continue;
      int below = ps[i].ppid == self;
      if (!below) {
        proc_t key = {.pid = ps[i].ppid};
        proc_t *parent = bsearch(&key, ps, n, sizeof *ps, proc_cmp);
        below = parent != NULL && parent->below;
      }
      if (below)
        ps[i].below = changed = 1;
    }
  }
  int count = 0;
  for (size_t i = 0; i < n; i++) {
    if (!ps[i].below || ps[i].zombie)
      continue;
    count++;
    if (sig)
      kill(ps[i].pid, sig);
  }
  free(ps);
  return count;
}

/* ---------------------------------------------------------------- callbacks */

static void wake(int fd) {
  uint64_t one = 1;
  if (write(fd, &one, sizeof one) < 0) {
    /* an eventfd write fails only on overflow: it is readable anyway */
  }
}

static void drain(int fd) {
  uint64_t v;
  while (read(fd, &v, sizeof v) > 0) {
  }
}

/* Event thread. */
static void on_acquired(coord_lock_t *lock, int status, void *arg) {
  events_t *ev = arg;
  (void)lock;
  __atomic_store_n(&ev->acq_status, status, __ATOMIC_RELEASE);
  wake(ev->acq_fd);
}

/* Event thread. */
static void on_lost(coord_lock_t *lock, void *arg) {
  events_t *ev = arg;
  (void)lock;
  wake(ev->lost_fd);
}

/* ---------------------------------------------------------------- main */

static int forwarded(int sig) {
  return sig == SIGTERM || sig == SIGINT || sig == SIGHUP || sig == SIGQUIT || sig == SIGUSR1 ||
         sig == SIGUSR2;
}

static int withdraws(int sig) {
  return sig == SIGTERM || sig == SIGINT || sig == SIGHUP || sig == SIGQUIT;
}

static int exit_status_of(int status) {
  if (WIFEXITED(status))
    return WEXITSTATUS(status);
  if (WIFSIGNALED(status))
    return 128 + WTERMSIG(status);
  return EXIT_OSERR;
}

/* Reaps every child that ended; sets *cmd_status when CMD is one. */
static void reap(pid_t cmd, int *cmd_done, int *cmd_status) {
  int st;
  pid_t p;
  while ((p = waitpid(-1, &st, WNOHANG)) > 0) {
    if (p == cmd) {
      *cmd_done = 1;
      *cmd_status = st;
    }
  }
}

typedef struct run {
  const opts_t *o;
  coord_t *c;
  coord_lock_t *lock;
  events_t ev;
  int sfd;
  pid_t cmd;
} run_t;

/* Waits for the lock as the options say.  0 when held, else the exit
 * status (the handle is gone then). */
static int acquire(run_t *r) {
  const opts_t *o = r->o;
  int rc;
  if (o->nowait) {
    rc = coord_lock_try_acquire(r->c, o->name, o->ttl_ms, &r->lock);
    if (rc == COORD_ELOCKED) {
      say("lock %s is held by someone else", o->name);
      return o->busy_code;
    }
    if (rc < 0) {
      say("cannot take lock %s: %s: %s", o->name, coord_strerror(rc), coord_last_error());
      return EXIT_UNAVAILABLE;
    }
    return 0;
  }
  rc = coord_lock_acquire_async(r->c, o->name, o->ttl_ms, on_acquired, &r->ev, &r->lock);
  if (rc < 0) {
    say("cannot take lock %s: %s: %s", o->name, coord_strerror(rc), coord_last_error());
    return EXIT_UNAVAILABLE;
  }
  int64_t until = o->wait_ms >= 0 ? now_ms() + o->wait_ms : INT64_MAX;
  for (;;) {
    struct pollfd pf[2] = {{r->sfd, POLLIN, 0}, {r->ev.acq_fd, POLLIN, 0}};
    int64_t left = until == INT64_MAX ? POLL_CAP_MS : until - now_ms();
    if (left < 0)
      left = 0;
    int n = poll(pf, 2, left > POLL_CAP_MS ? POLL_CAP_MS : (int)left);
    if (n < 0 && errno != EINTR) {
      say("poll: %s", strerror(errno));
      coord_lock_unlock(r->lock);
      return EXIT_OSERR;
    }
    if (pf[1].revents) {
      drain(r->ev.acq_fd);
      rc = __atomic_load_n(&r->ev.acq_status, __ATOMIC_ACQUIRE);
      if (rc == 0)
        return 0;
      say("cannot take lock %s: %s", o->name, coord_strerror(rc));
      coord_lock_unlock(r->lock);
      return EXIT_UNAVAILABLE;
    }
    struct signalfd_siginfo si;
    while (read(r->sfd, &si, sizeof si) == (ssize_t)sizeof si) {
      int sig = (int)si.ssi_signo;
      if (withdraws(sig)) {
        say("%s while waiting for lock %s: giving up", strsignal(sig), o->name);
        coord_lock_unlock(r->lock);
        return 128 + sig;
      }
      if (sig == SIGCHLD) {
        int done = 0, st = 0;
        reap(r->cmd, &done, &st);
        if (done) {
          say("the child that was to run CMD died (status %d) while waiting for the lock",
              exit_status_of(st));
          coord_lock_unlock(r->lock);
          return EXIT_OSERR;
        }
      }
    }
    if (until != INT64_MAX && now_ms() >= until) {
      coord_lock_unlock(r->lock); /* withdraws the waiter (or releases a lock just taken) */
      say("timed out after %.1f s waiting for lock %s", o->wait_ms / 1000.0, o->name);
      return o->busy_code;
    }
  }
}

/* Sends the lock's variables down the go pipe; returns 0 once CMD runs,
 * or the exit status if it does not (exec failed).  Closes both fds: the
 * child runs CMD, or exits, either way. */
static int start_cmd(run_t *r, int go_fd, int exec_fd) {
  const opts_t *o = r->o;
  const char *prefix = o->prefix ? o->prefix : "";
  const char *key = coord_lock_key(r->lock);
  size_t need = strlen(prefix) + strlen(key) + strlen(o->name) + 128;
  char *msg = malloc(need);
  if (msg == NULL) {
    say("out of memory");
    close(go_fd);
    close(exec_fd);
    return EXIT_OSERR;
  }
  int len = snprintf(msg, need, "COORD_LOCK_TOKEN=%" PRId64 "%cCOORD_LOCK_KEY=%s%s%cCOORD_LOCK_NAME=%s%c",
                     coord_lock_token(r->lock), 0, prefix, key, 0, o->name, 0);
  ssize_t off = 0;
  while (off < len) {
    ssize_t w = write(go_fd, msg + off, (size_t)(len - off));
    if (w < 0 && errno == EINTR)
      continue;
    if (w <= 0)
      break;
    off += w;
  }
  int werr = errno;
  free(msg);
  close(go_fd);
  if (off < len) {
    say("cannot hand the lock to the child that runs CMD: %s", strerror(werr));
    close(exec_fd);
    return EXIT_OSERR;
  }
  int e = 0;
  ssize_t got;
  do
    got = read(exec_fd, &e, sizeof e);
  while (got < 0 && errno == EINTR);
  close(exec_fd);
  if (got == (ssize_t)sizeof e) {
    say("%s: %s", o->cmd[0], strerror(e));
    return e == ENOENT ? EXIT_NOT_FOUND : EXIT_CANNOT_EXEC;
  }
  return 0;
}

enum stage { RUNNING, TERMED, KILLING };

/* sig to CMD's whole tree; to CMD alone if /proc cannot be read.  Returns
 * how many live processes the tree had (-1: unknown). */
static int signal_all(pid_t cmd, int cmd_done, int sig) {
  int n = signal_tree(sig);
  if (n < 0 && !cmd_done && sig)
    kill(cmd, sig); /* not reaped yet: the pid is still CMD's */
  return n;
}

/* Waits for CMD, with the watchdog (see the header).  Returns the exit
 * status. */
static int supervise(run_t *r) {
  const opts_t *o = r->o;
  int64_t ms_left = 0, ttl = 0;
  coord_lock_deadline(r->lock, &ms_left, &ttl);
  if (ttl <= 0)
    ttl = (o->ttl_ms + 999) / 1000 * 1000;
  int64_t term_before = o->term_before_ms >= 0 ? o->term_before_ms : ttl / 3;
  int64_t kill_before = o->kill_before_ms >= 0
                            ? o->kill_before_ms
                            : (term_before / 2 < KILL_BEFORE_CAP_MS ? term_before / 2 : KILL_BEFORE_CAP_MS);
  if (term_before > ttl * 2 / 3)
    say("warning: --term-before %.1f s is above 2/3 of the TTL (%.1f s): renewals that are merely slow "
        "may get CMD killed",
        term_before / 1000.0, ttl / 1000.0);
  if (o->verbose)
    say("holding lock %s (key %s, token %" PRId64 ", TTL %.1f s): running %s (pid %d)", o->name,
        coord_lock_key(r->lock), coord_lock_token(r->lock), ttl / 1000.0, o->cmd[0], (int)r->cmd);

  enum stage stage = RUNNING;
  int lost = 0, cmd_done = 0, cmd_status = 0, late_said = 0;
  int64_t term_at = 0, deadline_at = INT64_MAX;
  for (;;) {
    struct signalfd_siginfo si;
    while (read(r->sfd, &si, sizeof si) == (ssize_t)sizeof si) {
      int sig = (int)si.ssi_signo;
      /* SI_KERNEL: from the terminal, which signalled CMD's group itself */
      if (forwarded(sig) && !cmd_done && si.ssi_code != SI_KERNEL) {
        if (o->verbose)
          say("forwarding %s to %s (pid %d)", strsignal(sig), o->cmd[0], (int)r->cmd);
        kill(r->cmd, sig);
      }
    }
    uint64_t v;
    if (read(r->ev.lost_fd, &v, sizeof v) > 0)
      lost = 1;
    reap(r->cmd, &cmd_done, &cmd_status);

    int64_t now = now_ms();
    int drc = lost ? COORD_ELOST : coord_lock_deadline(r->lock, &ms_left, NULL);
    if (drc == 0)
      deadline_at = now + ms_left;
    if (cmd_done && stage == RUNNING && drc == 0 && ms_left > 0)
      return exit_status_of(cmd_status); /* CMD ran and ended while the lock was certainly held */
    if (drc != 0 && stage != KILLING) {
      if (!cmd_done)
        say("lock %s lost (%s): sending SIGKILL to %s (pid %d)", o->name, coord_strerror(drc), o->cmd[0],
            (int)r->cmd);
      else
        say("lock %s lost (%s) as %s ended", o->name, coord_strerror(drc), o->cmd[0]);
      stage = KILLING;
    } else if (stage == RUNNING && ms_left < term_before) {
      say("lease renewals failing, lock %s may be lost in %.1f s: sending SIGTERM to %s (pid %d)", o->name,
          ms_left / 1000.0, o->cmd[0], (int)r->cmd);
      stage = TERMED;
      term_at = now;
      signal_all(r->cmd, cmd_done, SIGTERM);
    }
    if (stage == TERMED && (now - term_at >= o->kill_after_ms || ms_left < kill_before)) {
      if (signal_tree(0) != 0 || !cmd_done)
        say("lock %s may be lost in %.1f s: sending SIGKILL to %s (pid %d) and its processes", o->name,
            ms_left / 1000.0, o->cmd[0], (int)r->cmd);
      stage = KILLING;
    }
    int left_in_tree = 0;
    if (stage == KILLING) {
      left_in_tree = signal_all(r->cmd, cmd_done, SIGKILL);
      reap(r->cmd, &cmd_done, &cmd_status);
      if (cmd_done && left_in_tree != 0)
        left_in_tree = signal_tree(0);
    } else if (stage == TERMED && cmd_done) {
      left_in_tree = signal_tree(0);
    }
    if (stage != RUNNING && cmd_done && left_in_tree <= 0) {
      int64_t margin = deadline_at == INT64_MAX ? 0 : deadline_at - now_ms();
      if (drc == 0 && margin > 0)
        say("%s (pid %d) and its processes are gone (%s %d), %.2f s before lock %s could be lost", o->cmd[0],
            (int)r->cmd, WIFSIGNALED(cmd_status) ? "signal" : "status",
            WIFSIGNALED(cmd_status) ? WTERMSIG(cmd_status) : WEXITSTATUS(cmd_status), margin / 1000.0,
            o->name);
      else
        say("%s (pid %d) and its processes are gone (%s %d); lock %s was lost", o->cmd[0], (int)r->cmd,
            WIFSIGNALED(cmd_status) ? "signal" : "status",
            WIFSIGNALED(cmd_status) ? WTERMSIG(cmd_status) : WEXITSTATUS(cmd_status), o->name);
      return EXIT_LOST;
    }
    if (stage != RUNNING && !late_said && deadline_at != INT64_MAX && now_ms() >= deadline_at) {
      say("warning: %s (pid %d) or one of its processes still runs after lock %s could be lost", o->cmd[0],
          (int)r->cmd, o->name);
      late_said = 1;
    }

    int64_t wait = POLL_CAP_MS;
    if (stage == RUNNING)
      wait = ms_left - term_before;
    else if (stage == TERMED) {
      int64_t a = term_at + o->kill_after_ms - now, b = ms_left - kill_before;
      wait = a < b ? a : b;
      if (cmd_done && wait > SWEEP_EVERY_MS)
        wait = SWEEP_EVERY_MS; /* see when the rest of the tree ends */
    } else
      wait = SWEEP_EVERY_MS;
    if (wait > POLL_CAP_MS)
      wait = POLL_CAP_MS;
    if (wait < 1)
      wait = 1;
    struct pollfd pf[2] = {{r->sfd, POLLIN, 0}, {r->ev.lost_fd, POLLIN, 0}};
    if (poll(pf, 2, (int)wait) < 0 && errno != EINTR) {
      say("poll: %s", strerror(errno));
      usleep(SWEEP_EVERY_MS * 1000); /* go on watching, without spinning */
    }
  }
}

int main(int argc, char **argv) {
  opts_t o;
  parse_args(argc, argv, &o);
  char *password = NULL;
  if (o.password_file) {
    password = read_password(o.password_file);
    if (password == NULL) {
      say("cannot read password file %s: %s", o.password_file, strerror(errno));
      return EXIT_USAGE;
    }
  } else if (o.user) {
    password = strdup(getenv("COORD_PASSWORD"));
  }

  sigset_t sigs, oldmask;
  sigemptyset(&sigs);
  int handled[] = {SIGCHLD, SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2};
  for (size_t i = 0; i < sizeof handled / sizeof handled[0]; i++)
    sigaddset(&sigs, handled[i]);
  sigprocmask(SIG_BLOCK, &sigs, &oldmask); /* before any thread: all inherit it */
  if (prctl(PR_SET_CHILD_SUBREAPER, 1) != 0)
    say("warning: cannot become a child subreaper (%s): CMD's orphans may escape a kill", strerror(errno));

  int go[2], ex[2];
  if (pipe2(go, O_CLOEXEC) || pipe2(ex, O_CLOEXEC)) {
    say("pipe: %s", strerror(errno));
    return EXIT_OSERR;
  }
  pid_t parent = getpid();
  fflush(NULL);
  pid_t pid = fork(); /* before coord_new: no gRPC thread exists yet */
  if (pid < 0) {
    say("fork: %s", strerror(errno));
    return EXIT_OSERR;
  }
  if (pid == 0) {
    close(go[1]);
    close(ex[0]);
    free(password);
    child_main(go[0], ex[1], parent, &oldmask, o.cmd);
  }
  close(go[0]);
  close(ex[1]);
  signal(SIGPIPE, SIG_IGN); /* a write to a child gone: EPIPE */

  run_t r;
  memset(&r, 0, sizeof r);
  r.o = &o;
  r.cmd = pid;
  r.sfd = signalfd(-1, &sigs, SFD_NONBLOCK | SFD_CLOEXEC);
  r.ev.acq_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  r.ev.lost_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  int status = 0;
  if (r.sfd < 0 || r.ev.acq_fd < 0 || r.ev.lost_fd < 0) {
    say("signalfd/eventfd: %s", strerror(errno));
    status = EXIT_OSERR;
    goto out_child;
  }

  coord_config_t cfg = coord_default_config();
  cfg.endpoints = o.endpoints;
  if (o.prefix)
    cfg.prefix = o.prefix;
  cfg.username = o.user;
  cfg.password = password;
  cfg.ca_file = o.cacert;
  cfg.cert_file = o.cert;
  cfg.key_file = o.key;
  int rc = coord_new(&cfg, &r.c);
  if (password) {
    memset(password, 0, strlen(password));
    free(password);
  }
  if (rc < 0) {
    say("cannot reach etcd: %s: %s", coord_strerror(rc), coord_last_error());
    status = EXIT_UNAVAILABLE;
    goto out_child;
  }
  status = acquire(&r);
  if (status != 0) {
    r.lock = NULL;
    goto out_close;
  }
  coord_lock_on_lost(r.lock, on_lost, &r.ev);
  status = start_cmd(&r, go[1], ex[0]);
  go[1] = ex[0] = -1;
  if (status == 0) {
    status = supervise(&r);
  } else {
    waitpid(pid, NULL, 0); /* exec failed: the child exits */
  }
  rc = coord_lock_unlock(r.lock);
  if (rc == COORD_ELOST && status != EXIT_LOST)
    say("warning: lock %s was lost after %s ended (%s)", o.name, o.cmd[0], coord_last_error());
  else if (rc < 0 && rc != COORD_ELOST)
    say("warning: releasing lock %s: %s: %s (its lease ends by itself)", o.name, coord_strerror(rc),
        coord_last_error());
  else if (o.verbose && rc == 0)
    say("released lock %s", o.name);
  goto out_close;

out_child:
  /* CMD never runs: EOF on the go pipe makes the child exit at once */
  if (go[1] >= 0)
    close(go[1]);
  go[1] = -1;
  waitpid(pid, NULL, 0);
out_close:
  if (go[1] >= 0) {
    close(go[1]);
    waitpid(pid, NULL, 0);
  }
  if (ex[0] >= 0)
    close(ex[0]);
  if (r.c)
    coord_close(r.c);
  if (r.sfd >= 0)
    close(r.sfd);
  if (r.ev.acq_fd >= 0)
    close(r.ev.acq_fd);
  if (r.ev.lost_fd >= 0)
    close(r.ev.lost_fd);
  return status;
}
