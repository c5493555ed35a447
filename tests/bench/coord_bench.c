/*
 * coord_bench — the libcoord (and coordfs) side of `make bench` (issue 7).
 *
 *   coord_bench [--endpoints E] [--n N] [--conc C] [--prefix P] [--hold-ms H]
 *               [--value-size S] [--path FILE] [--key KEY] WORKLOAD
 *
 * The same workloads as tests/bench/peers/peer.go and peer.py, one per run;
 * the result is one JSON line on stdout:
 *   {"impl":"coord","workload":"put_seq","n":..,"p50_us":..,"p99_us":..,"mean_us":..,"ops_s":..}
 * or {"impl":"coord","workload":..,"error":".."} (exit 1).
 *
 * Client workloads: put_seq, get_lin, get_ser, put_conc, get_conc (C threads
 * on one coord_t), lock_cycle, lock_handoff, watch.
 * coordfs workloads: fs_pread (pread of an open file in a loop), fs_read
 * (open+read+close in a loop) of --path; inotify (libcoord Put of --key, then
 * wait for the inotify event on --path, a file on a coordfs mount).
 */
#include "coord.h"
#include "rpc.pb-c.h"

#include <errno.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <fcntl.h>
#include <libgen.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/inotify.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static const char *endpoints = "127.0.0.1:2379";
static const char *workload = "";
static const char *prefix = "/bench/coord";
static const char *path = NULL;
static const char *wkey = NULL;
static long n_iter = 1000;
static int conc = 64;
static int hold_ms = 120;
static size_t value_size = 100;
static int64_t max_ns = 0; /* --max-seconds: coordfs loops stop early (0: no limit) */
static char *value;
static coord_t *cli;

static int64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void json_str(const char *s) {
  putchar('"');
  for (; *s; s++) {
    if (*s == '"' || *s == '\\')
      printf("\\%c", *s);
    else if ((unsigned char)*s < 0x20)
      printf("\\u%04x", *s);
    else
      putchar(*s);
  }
  putchar('"');
}

static void __attribute__((noreturn)) fail(const char *what, int rc) {
  char msg[1024];
  if (rc < 0)
    snprintf(msg, sizeof msg, "%s: %s (%s)", what, coord_strerror(rc), coord_last_error());
  else
    snprintf(msg, sizeof msg, "%s: %s", what, strerror(rc ? rc : errno));
  printf("{\"impl\":\"coord\",\"workload\":");
  json_str(workload);
  printf(",\"error\":");
  json_str(msg);
  printf("}\n");
  fflush(stdout);
  _exit(1);
}

static int cmp_i64(const void *a, const void *b) {
  int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
  return x < y ? -1 : x > y;
}

static double pct(const int64_t *s, size_t n, double p) {
  if (n == 0)
    return 0;
  return s[(size_t)(p * (double)(n - 1) + 0.5)] / 1000.0;
}

/* Summary, wall time and every sample (µs, 0.01 µs resolution: the driver
 * merges rounds). */
static void emit(int64_t *lat, size_t n, int64_t wall_ns) {
  double sum = 0;
  qsort(lat, n, sizeof *lat, cmp_i64);
  for (size_t i = 0; i < n; i++)
    sum += lat[i] / 1000.0;
  printf("{\"impl\":\"coord\",\"workload\":");
  json_str(workload);
  printf(",\"n\":%zu,\"p50_us\":%.3f,\"p99_us\":%.3f,\"mean_us\":%.3f,\"ops_s\":%.3f,\"wall_s\":%.6f,\"lat_"
         "us\":[",
         n, pct(lat, n, 0.5), pct(lat, n, 0.99), n ? sum / n : 0, wall_ns > 0 ? n / (wall_ns / 1e9) : 0,
         wall_ns / 1e9);
  for (size_t i = 0; i < n; i++)
    printf("%s%.2f", i ? "," : "", (double)(lat[i] / 10) / 100.0);
  printf("]}\n");
  fflush(stdout);
}

static void connect_client(void) {
  coord_config_t cfg = coord_default_config();
  cfg.endpoints = endpoints;
  int rc = coord_new(&cfg, &cli);
  if (rc)
    fail("coord_new", rc);
}

static void put(const char *key, const void *v, size_t len) {
  coord_put_opts_t po = {0};
  int rc = coord_kv_put(cli, key, v, len, &po, NULL);
  if (rc)
    fail("put", rc);
}

static void get(const char *key, int serializable) {
  coord_range_opts_t ro = {0};
  coord_kv_result_t *res = NULL;
  ro.serializable = serializable;
  int rc = coord_kv_get(cli, key, &ro, &res);
  if (rc)
    fail("get", rc);
  if (res->n != 1)
    fail("get: key missing", EINVAL);
  coord_kv_result_free(res);
}

/* ---------------------------------------------------------------- 1: sequential */

static void run_seq(void) {
  char key[512], k[512];
  int64_t *lat = calloc(n_iter, sizeof *lat);
  snprintf(key, sizeof key, "%s/key", prefix);
  put(key, value, value_size);
  int64_t start = now_ns();
  for (long i = 0; i < n_iter; i++) {
    int64_t t0 = now_ns();
    if (!strcmp(workload, "put_seq")) {
      snprintf(k, sizeof k, "%s/k%ld", prefix, i % 1000);
      put(k, value, value_size);
    } else {
      get(key, !strcmp(workload, "get_ser"));
    }
    lat[i] = now_ns() - t0;
  }
  emit(lat, n_iter, now_ns() - start);
  free(lat);
}

/* ---------------------------------------------------------------- 2: concurrent */

static atomic_long next_op;
static int64_t *conc_lat;

static void *conc_worker(void *arg) {
  (void)arg;
  char key[512], k[512];
  int is_put = !strcmp(workload, "put_conc");
  snprintf(key, sizeof key, "%s/key", prefix);
  for (;;) {
    long i = atomic_fetch_add(&next_op, 1);
    if (i >= n_iter)
      break;
    int64_t t0 = now_ns();
    if (is_put) {
      snprintf(k, sizeof k, "%s/c%ld", prefix, i % 1000);
      put(k, value, value_size);
    } else {
      get(key, 0);
    }
    conc_lat[i] = now_ns() - t0;
  }
  return NULL;
}

static void run_conc(void) {
  char key[512];
  pthread_t *th = calloc(conc, sizeof *th);
  conc_lat = calloc(n_iter, sizeof *conc_lat);
  snprintf(key, sizeof key, "%s/key", prefix);
  put(key, value, value_size);
  int64_t start = now_ns();
  for (int i = 0; i < conc; i++)
    if (pthread_create(&th[i], NULL, conc_worker, NULL))
      fail("pthread_create", errno);
  for (int i = 0; i < conc; i++)
    pthread_join(th[i], NULL);
  emit(conc_lat, n_iter, now_ns() - start);
  free(conc_lat);
  free(th);
}

/* ---------------------------------------------------------------- 3: locks */

static void lock_name(char *buf, size_t len, const char *what) {
  /* lock names may not contain '/': bench-coord-lock */
  snprintf(buf, len, "%s-%s", prefix + (prefix[0] == '/'), what);
  for (char *p = buf; *p; p++)
    if (*p == '/')
      *p = '-';
}

static void run_lock_cycle(void) {
  char name[256];
  int64_t *lat = calloc(n_iter, sizeof *lat);
  lock_name(name, sizeof name, "lock");
  int64_t start = now_ns();
  for (long i = 0; i < n_iter; i++) {
    coord_lock_t *lk = NULL;
    int64_t t0 = now_ns();
    int rc = coord_lock_acquire(cli, name, 10000, 10000, &lk);
    if (rc)
      fail("coord_lock_acquire", rc);
    rc = coord_lock_unlock(lk);
    if (rc)
      fail("coord_lock_unlock", rc);
    lat[i] = now_ns() - t0;
  }
  emit(lat, n_iter, now_ns() - start);
  free(lat);
}

struct waiter {
  const char *name;
  coord_lock_t *lock;
  int rc;
  int64_t got_ns;
};

static void *wait_turn(void *arg) {
  struct waiter *w = arg;
  w->rc = coord_lock_acquire(cli, w->name, 10000, 30000, &w->lock);
  w->got_ns = now_ns();
  return NULL;
}

static long queued(const char *name) {
  char pfx[512];
  coord_range_opts_t ro = {0};
  coord_kv_result_t *res = NULL;
  snprintf(pfx, sizeof pfx, "/locks/%s/", name);
  ro.prefix = 1;
  ro.count_only = 1;
  int rc = coord_kv_get(cli, pfx, &ro, &res);
  if (rc)
    fail("count waiters", rc);
  long cnt = (long)res->count;
  coord_kv_result_free(res);
  return cnt;
}

/* Two lock handles on one client take turns, as the Go peer's two sessions:
 * the holder waits until the waiter's key is queued, holds hold_ms longer,
 * releases; latency is from just before unlock to the waiter's acquire
 * returning in its own thread. */
static void run_lock_handoff(void) {
  char name[256];
  int64_t *lat = calloc(n_iter, sizeof *lat);
  coord_lock_t *holder = NULL;
  lock_name(name, sizeof name, "handoff");
  int rc = coord_lock_acquire(cli, name, 10000, 10000, &holder);
  if (rc)
    fail("coord_lock_acquire", rc);
  int64_t start = now_ns();
  for (long i = 0; i < n_iter; i++) {
    struct waiter w = {.name = name};
    pthread_t th;
    if (pthread_create(&th, NULL, wait_turn, &w))
      fail("pthread_create", errno);
    int64_t deadline = now_ns() + 10000000000LL;
    while (queued(name) < 2) {
      if (now_ns() > deadline)
        fail("waiter never queued", ETIMEDOUT);
      usleep(200);
    }
    usleep(hold_ms * 1000);
    int64_t t0 = now_ns();
    rc = coord_lock_unlock(holder);
    if (rc)
      fail("coord_lock_unlock", rc);
    pthread_join(th, NULL);
    if (w.rc)
      fail("waiter acquire", w.rc);
    lat[i] = w.got_ns - t0;
    holder = w.lock;
  }
  int64_t wall = now_ns() - start;
  coord_lock_unlock(holder);
  emit(lat, n_iter, wall);
  free(lat);
}

/* ---------------------------------------------------------------- 4: watch */

static void run_watch(void) {
  char key[512], v[32];
  coord_watch_opts_t wo = {0};
  coord_watch_t *w = NULL;
  coord_event_t *ev = NULL;
  int64_t *lat = calloc(n_iter, sizeof *lat);
  snprintf(key, sizeof key, "%s/watched", prefix);
  int rc = coord_watch_create(cli, key, &wo, &w);
  if (rc)
    fail("coord_watch_create", rc);
  /* the watch may be registered after create returns: put until it sees one */
  for (int tries = 0;; tries++) {
    put(key, "warmup", 6);
    if (!(rc = coord_watch_next(w, 200, &ev)))
      break;
    if (rc != COORD_ETIMEDOUT || tries == 50)
      fail("first watch event", rc);
  }
  coord_event_free(ev);
  while (!coord_watch_next(w, 50, &ev)) /* extra warm-up events */
    coord_event_free(ev);
  int64_t start = now_ns();
  for (long i = 0; i < n_iter; i++) {
    int len = snprintf(v, sizeof v, "%ld", i);
    int64_t t0 = now_ns();
    put(key, v, len);
    if ((rc = coord_watch_next(w, 10000, &ev)))
      fail("watch event", rc);
    lat[i] = now_ns() - t0;
    coord_event_free(ev);
  }
  int64_t wall = now_ns() - start;
  coord_watch_close(w);
  emit(lat, n_iter, wall);
  free(lat);
}

/* ---------------------------------------------------------------- gRPC floor */

/* get_lin_raw: the same linearizable Range straight on gRPC's C core, from
 * the calling thread (a pluck queue, no event thread, no retry): the floor
 * of any client built on the C core on this machine. */
static void run_get_raw(void) {
  char key[512], target[512];
  snprintf(key, sizeof key, "%s/key", prefix);
  put(key, value, value_size); /* through libcoord, which also ran grpc_init */
  const char *ep = endpoints;
  if (!strncmp(ep, "http://", 7))
    ep += 7;
  snprintf(target, sizeof target, "%.*s", (int)strcspn(ep, ","), ep);
  grpc_channel_credentials *cr = grpc_insecure_credentials_create();
  grpc_channel *ch = grpc_channel_create(target, cr, NULL);
  grpc_completion_queue *cq = grpc_completion_queue_create_for_pluck(NULL);
  Etcdserverpb__RangeRequest req = ETCDSERVERPB__RANGE_REQUEST__INIT;
  req.key.data = (uint8_t *)key;
  req.key.len = strlen(key);
  size_t len = etcdserverpb__range_request__get_packed_size(&req);
  grpc_slice reqs = grpc_slice_malloc(len);
  etcdserverpb__range_request__pack(&req, GRPC_SLICE_START_PTR(reqs));
  grpc_slice method = grpc_slice_from_static_string("/etcdserverpb.KV/Range");
  int64_t *lat = calloc(n_iter + 1, sizeof *lat);
  int64_t start = 0;
  for (long i = -1; i < n_iter; i++) { /* i == -1: connect, not timed */
    if (i == 0)
      start = now_ns();
    int64_t t0 = now_ns();
    gpr_timespec dl = gpr_time_add(gpr_now(GPR_CLOCK_REALTIME), gpr_time_from_seconds(10, GPR_TIMESPAN));
    grpc_call *call = grpc_channel_create_call(ch, NULL, GRPC_PROPAGATE_DEFAULTS, cq, method, NULL, dl, NULL);
    grpc_byte_buffer *sendbb = grpc_raw_byte_buffer_create(&reqs, 1), *recvbb = NULL;
    grpc_metadata_array imd, tmd;
    grpc_metadata_array_init(&imd);
    grpc_metadata_array_init(&tmd);
    grpc_status_code st = GRPC_STATUS_UNKNOWN;
    grpc_slice details = grpc_empty_slice();
    grpc_op ops[6];
    memset(ops, 0, sizeof ops);
    ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    if (i < 0)
      ops[0].flags = GRPC_INITIAL_METADATA_WAIT_FOR_READY;
    ops[1].op = GRPC_OP_SEND_MESSAGE;
    ops[1].data.send_message.send_message = sendbb;
    ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
    ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
    ops[3].data.recv_initial_metadata.recv_initial_metadata = &imd;
    ops[4].op = GRPC_OP_RECV_MESSAGE;
    ops[4].data.recv_message.recv_message = &recvbb;
    ops[5].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
    ops[5].data.recv_status_on_client.trailing_metadata = &tmd;
    ops[5].data.recv_status_on_client.status = &st;
    ops[5].data.recv_status_on_client.status_details = &details;
    if (grpc_call_start_batch(call, ops, 6, (void *)1, NULL) != GRPC_CALL_OK)
      fail("grpc_call_start_batch", EIO);
    grpc_event ev = grpc_completion_queue_pluck(cq, (void *)1, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
    if (ev.type != GRPC_OP_COMPLETE || st != GRPC_STATUS_OK || !recvbb)
      fail("raw Range failed", EIO);
    grpc_byte_buffer_reader rd;
    grpc_byte_buffer_reader_init(&rd, recvbb);
    grpc_slice all = grpc_byte_buffer_reader_readall(&rd);
    grpc_byte_buffer_reader_destroy(&rd);
    Etcdserverpb__RangeResponse *resp =
        etcdserverpb__range_response__unpack(NULL, GRPC_SLICE_LENGTH(all), GRPC_SLICE_START_PTR(all));
    if (!resp || resp->n_kvs != 1)
      fail("raw Range: key missing", EIO);
    etcdserverpb__range_response__free_unpacked(resp, NULL);
    grpc_slice_unref(all);
    grpc_byte_buffer_destroy(recvbb);
    grpc_byte_buffer_destroy(sendbb);
    grpc_slice_unref(details);
    grpc_metadata_array_destroy(&imd);
    grpc_metadata_array_destroy(&tmd);
    grpc_call_unref(call);
    if (i >= 0)
      lat[i] = now_ns() - t0;
  }
  emit(lat, n_iter, now_ns() - start);
  grpc_slice_unref(reqs);
  grpc_channel_destroy(ch);
  grpc_channel_credentials_release(cr);
  grpc_completion_queue_shutdown(cq);
  while (grpc_completion_queue_pluck(cq, NULL, gpr_inf_future(GPR_CLOCK_REALTIME), NULL).type !=
         GRPC_QUEUE_SHUTDOWN)
    ;
  grpc_completion_queue_destroy(cq);
  free(lat);
}

/* ---------------------------------------------------------------- 5: coordfs */

static void run_fs_read(int reopen) {
  char buf[8192];
  int64_t *lat = calloc(n_iter, sizeof *lat);
  int fd = -1;
  if (!path)
    fail("--path is required", EINVAL);
  if (!reopen && (fd = open(path, O_RDONLY)) < 0)
    fail(path, errno);
  /* warm-up: the first read fills the page cache */
  for (int i = 0; i < 3; i++) {
    int f = open(path, O_RDONLY);
    if (f < 0 || read(f, buf, sizeof buf) <= 0)
      fail(path, errno);
    close(f);
  }
  int64_t start = now_ns();
  long i;
  for (i = 0; i < n_iter; i++) {
    int64_t t0 = now_ns();
    ssize_t got;
    if (max_ns && t0 - start > max_ns)
      break;
    if (reopen) {
      int f = open(path, O_RDONLY);
      if (f < 0)
        fail("open", errno);
      got = read(f, buf, sizeof buf);
      close(f);
    } else {
      got = pread(fd, buf, sizeof buf, 0);
    }
    if (got <= 0)
      fail("read", got < 0 ? errno : EIO);
    lat[i] = now_ns() - t0;
  }
  emit(lat, (size_t)i, now_ns() - start);
  if (fd >= 0)
    close(fd);
  free(lat);
}

/* Drains pending inotify events; returns 1 if one named base was among them. */
static int drain_inotify(int fd, const char *base) {
  char buf[8192] __attribute__((aligned(__alignof__(struct inotify_event))));
  int seen = 0;
  for (;;) {
    ssize_t len = read(fd, buf, sizeof buf);
    if (len <= 0)
      return seen;
    for (char *p = buf; p < buf + len;) {
      struct inotify_event *e = (struct inotify_event *)p;
      if (e->len == 0 || !strcmp(e->name, base))
        seen = 1;
      p += sizeof *e + e->len;
    }
  }
}

static void run_inotify(void) {
  char dirbuf[1024], basebuf[1024], v[32];
  int64_t *lat = calloc(n_iter, sizeof *lat);
  struct stat st;
  if (!path || !wkey)
    fail("--path and --key are required", EINVAL);
  snprintf(dirbuf, sizeof dirbuf, "%s", path);
  snprintf(basebuf, sizeof basebuf, "%s", path);
  const char *dir = dirname(dirbuf), *base = basename(basebuf);
  put(wkey, "0", 1);
  /* the file must be known to the kernel (looked up) for coordfs to notify */
  int64_t deadline = now_ns() + 5000000000LL;
  while (stat(path, &st) < 0) {
    if (now_ns() > deadline)
      fail(path, errno);
    usleep(1000);
  }
  int fd = inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
  if (fd < 0)
    fail("inotify_init1", errno);
  if (inotify_add_watch(fd, dir, IN_MODIFY | IN_CLOSE_WRITE | IN_ATTRIB | IN_CREATE | IN_MOVED_TO) < 0)
    fail(dir, errno);
  usleep(20000);
  drain_inotify(fd, base);
  long timeouts = 0;
  size_t n = 0;
  int64_t start = now_ns();
  for (long i = 0; i < n_iter; i++) {
    int len = snprintf(v, sizeof v, "%ld", i + 1);
    int64_t t0 = now_ns(), t1 = 0;
    if (max_ns && t0 - start > max_ns)
      break;
    put(wkey, v, len);
    int64_t until = t0 + 2000000000LL;
    while (!t1) {
      struct pollfd pfd = {.fd = fd, .events = POLLIN};
      int left = (int)((until - now_ns()) / 1000000);
      if (left <= 0 || poll(&pfd, 1, left) <= 0)
        break;
      if (drain_inotify(fd, base))
        t1 = now_ns();
    }
    if (!t1) {
      if (++timeouts >= 3)
        fail("no inotify event within 2 s of a remote Put (3 times)", ETIMEDOUT);
      continue;
    }
    lat[n++] = t1 - t0;
    usleep(2000); /* let the change's other events (close_write, attrib) arrive */
    drain_inotify(fd, base);
  }
  int64_t wall = now_ns() - start;
  close(fd);
  emit(lat, n, wall);
  free(lat);
}

/* ---------------------------------------------------------------- main */

int main(int argc, char **argv) {
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i], *nx = i + 1 < argc ? argv[i + 1] : NULL;
    if (!strcmp(a, "--endpoints") && nx)
      endpoints = argv[++i];
    else if (!strcmp(a, "--n") && nx)
      n_iter = atol(argv[++i]);
    else if (!strcmp(a, "--conc") && nx)
      conc = atoi(argv[++i]);
    else if (!strcmp(a, "--prefix") && nx)
      prefix = argv[++i];
    else if (!strcmp(a, "--hold-ms") && nx)
      hold_ms = atoi(argv[++i]);
    else if (!strcmp(a, "--value-size") && nx)
      value_size = (size_t)atol(argv[++i]);
    else if (!strcmp(a, "--path") && nx)
      path = argv[++i];
    else if (!strcmp(a, "--key") && nx)
      wkey = argv[++i];
    else if (!strcmp(a, "--max-seconds") && nx)
      max_ns = (int64_t)(atof(argv[++i]) * 1e9);
    else if (a[0] != '-')
      workload = a;
    else {
      fprintf(stderr, "usage: coord_bench [--endpoints E] [--n N] [--conc C] [--prefix P] [--hold-ms H] "
                      "[--value-size S] [--path FILE] [--key KEY] [--max-seconds S] WORKLOAD\n");
      return 2;
    }
  }
  if (n_iter < 1)
    n_iter = 1;
  if (conc < 1)
    conc = 1;
  value = malloc(value_size + 1);
  memset(value, 'v', value_size);
  value[value_size] = 0;

  if (!strcmp(workload, "fs_pread") || !strcmp(workload, "fs_read")) {
    run_fs_read(!strcmp(workload, "fs_read"));
    return 0;
  }
  connect_client();
  if (!strcmp(workload, "put_seq") || !strcmp(workload, "get_lin") || !strcmp(workload, "get_ser"))
    run_seq();
  else if (!strcmp(workload, "put_conc") || !strcmp(workload, "get_conc"))
    run_conc();
  else if (!strcmp(workload, "lock_cycle"))
    run_lock_cycle();
  else if (!strcmp(workload, "lock_handoff"))
    run_lock_handoff();
  else if (!strcmp(workload, "watch"))
    run_watch();
  else if (!strcmp(workload, "get_lin_raw"))
    run_get_raw();
  else if (!strcmp(workload, "inotify"))
    run_inotify();
  else
    fail("unknown workload", EINVAL);
  coord_close(cli);
  free(value);
  return 0;
}
