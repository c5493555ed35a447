/*
 * grpc_echo_server.c — example: a gRPC server (raw gRPC C core, no code
 * generation) that registers itself in coord's registry.
 *
 * It serves one method, /coord.example.Echo/Who, whose answer is the
 * instance id as raw bytes (no protobuf needed for so small a reply), listens
 * on 127.0.0.1:<port> (0: a free port) and registers
 * /services/<name>/<id> = {"address":"127.0.0.1","port":<port>} under a
 * lease that libcoord keeps alive.  Clients find it with
 * coord_registry_get_connection (see grpc_echo_client.c) or through
 * xds:///<name> with coord-xds's bootstrap.
 *
 *   grpc_echo_server --name NAME --id ID [--port P] [--ttl MS] [--grace MS]
 *
 * Etcd endpoints come from $COORD_ENDPOINTS.  Prints "READY <port>" once
 * registered.  Reads commands on stdin: "unregister" (remove the
 * registration, keep serving; prints "UNREGISTERED <unix ms>"), "register"
 * (register again), "quit" (or end of input, or SIGTERM/SIGINT): graceful
 * stop — unregister, keep serving for --grace ms (default 300) so that
 * clients move away without a failed call, then stop.  At exit it prints
 * "CALLS <n> LAST <unix ms of the last call, 0 if none>".
 *
 * Threads: main reads stdin and signals; one server thread owns the
 * completion queue (the only caller of grpc_completion_queue_next).  The
 * call counters are atomics.
 */
#include <coord.h>

#include <errno.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/support/time.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/signalfd.h>
#include <time.h>
#include <unistd.h>

#define METHOD "/coord.example.Echo/Who"

typedef struct call_ctx {
  grpc_call *call;
  grpc_call_details details;
  grpc_metadata_array md;
  grpc_byte_buffer *req;
  grpc_byte_buffer *resp;
  int cancelled;
  grpc_slice status_details;
  int stage; /* 0: waiting for a call, 1: answering */
} call_ctx_t;

static grpc_server *g_server;
static grpc_completion_queue *g_cq;
static const char *g_id;
static long g_calls;
static long long g_last_ms;
static int g_shutdown_tag;
static int g_stopping; /* guarded by g_mu */
static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;

static long long now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void request_call(void) {
  call_ctx_t *ctx = calloc(1, sizeof *ctx);
  if (!ctx)
    abort();
  grpc_call_details_init(&ctx->details);
  grpc_metadata_array_init(&ctx->md);
  if (grpc_server_request_call(g_server, &ctx->call, &ctx->details, &ctx->md, g_cq, g_cq, ctx) !=
      GRPC_CALL_OK) {
    grpc_call_details_destroy(&ctx->details);
    grpc_metadata_array_destroy(&ctx->md);
    free(ctx);
  }
}

static void ctx_free(call_ctx_t *ctx) {
  if (ctx->call)
    grpc_call_unref(ctx->call);
  if (ctx->req)
    grpc_byte_buffer_destroy(ctx->req);
  if (ctx->resp)
    grpc_byte_buffer_destroy(ctx->resp);
  grpc_slice_unref(ctx->status_details);
  grpc_call_details_destroy(&ctx->details);
  grpc_metadata_array_destroy(&ctx->md);
  free(ctx);
}

/* Answers a new call in one batch: the reply does not depend on the request. */
static void answer(call_ctx_t *ctx) {
  int known = grpc_slice_str_cmp(ctx->details.method, METHOD) == 0;
  if (known) {
    __atomic_add_fetch(&g_calls, 1, __ATOMIC_SEQ_CST);
    __atomic_store_n(&g_last_ms, now_ms(), __ATOMIC_SEQ_CST);
  }
  grpc_slice body = grpc_slice_from_copied_string(g_id);
  ctx->resp = grpc_raw_byte_buffer_create(&body, 1);
  grpc_slice_unref(body);
  ctx->status_details = grpc_slice_from_static_string(known ? "" : "unknown method");
  grpc_op ops[5];
  memset(ops, 0, sizeof ops);
  size_t n = 0;
  ops[n++].op = GRPC_OP_SEND_INITIAL_METADATA;
  ops[n].op = GRPC_OP_RECV_MESSAGE;
  ops[n++].data.recv_message.recv_message = &ctx->req;
  if (known) {
    ops[n].op = GRPC_OP_SEND_MESSAGE;
    ops[n++].data.send_message.send_message = ctx->resp;
  }
  ops[n].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
  ops[n].data.send_status_from_server.status = known ? GRPC_STATUS_OK : GRPC_STATUS_UNIMPLEMENTED;
  ops[n++].data.send_status_from_server.status_details = &ctx->status_details;
  ops[n].op = GRPC_OP_RECV_CLOSE_ON_SERVER;
  ops[n++].data.recv_close_on_server.cancelled = &ctx->cancelled;
  ctx->stage = 1;
  if (grpc_call_start_batch(ctx->call, ops, n, ctx, NULL) != GRPC_CALL_OK)
    ctx_free(ctx);
}

static void *serve(void *arg) {
  (void)arg;
  for (;;) {
    grpc_event ev = grpc_completion_queue_next(g_cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL);
    if (ev.type == GRPC_QUEUE_SHUTDOWN)
      return NULL;
    if (ev.type != GRPC_OP_COMPLETE || ev.tag == &g_shutdown_tag)
      continue;
    call_ctx_t *ctx = ev.tag;
    if (ctx->stage == 0) {
      if (!ev.success) {
        ctx_free(ctx); /* the server is shutting down */
        continue;
      }
      pthread_mutex_lock(&g_mu);
      if (!g_stopping)
        request_call();
      pthread_mutex_unlock(&g_mu);
      answer(ctx);
    } else {
      ctx_free(ctx);
    }
  }
}

static void usage(void) {
  fprintf(stderr, "usage: grpc_echo_server --name NAME --id ID [--port P] [--ttl MS] [--grace MS]\n");
  exit(2);
}

int main(int argc, char **argv) {
  const char *name = NULL, *id = NULL;
  int port = 0, grace = 300;
  long ttl = 0;
  for (int i = 1; i < argc; i++) {
    if (i + 1 >= argc)
      usage();
    if (!strcmp(argv[i], "--name"))
      name = argv[++i];
    else if (!strcmp(argv[i], "--id"))
      id = argv[++i];
    else if (!strcmp(argv[i], "--port"))
      port = atoi(argv[++i]);
    else if (!strcmp(argv[i], "--ttl"))
      ttl = atol(argv[++i]);
    else if (!strcmp(argv[i], "--grace"))
      grace = atoi(argv[++i]);
    else
      usage();
  }
  if (!name || !id)
    usage();
  g_id = id;

  /* SIGTERM/SIGINT are read from a signalfd by the main loop. */
  sigset_t sigs;
  sigemptyset(&sigs);
  sigaddset(&sigs, SIGTERM);
  sigaddset(&sigs, SIGINT);
  pthread_sigmask(SIG_BLOCK, &sigs, NULL);
  int sfd = signalfd(-1, &sigs, SFD_CLOEXEC);

  coord_t *c = NULL;
  int rc = coord_new(NULL, &c);
  if (rc < 0) {
    fprintf(stderr, "coord_new: %s: %s\n", coord_strerror(rc), coord_last_error());
    return 1;
  }

  grpc_init();
  g_cq = grpc_completion_queue_create_for_next(NULL);
  g_server = grpc_server_create(NULL, NULL);
  grpc_server_register_completion_queue(g_server, g_cq, NULL);
  char addr[64];
  snprintf(addr, sizeof addr, "127.0.0.1:%d", port);
  grpc_server_credentials *creds = grpc_insecure_server_credentials_create();
  port = grpc_server_add_http2_port(g_server, addr, creds);
  grpc_server_credentials_release(creds);
  if (port <= 0) {
    fprintf(stderr, "cannot listen on %s\n", addr);
    return 1;
  }
  grpc_server_start(g_server);
  request_call();
  pthread_t th;
  pthread_create(&th, NULL, serve, NULL);

  coord_service_t svc = {.id = (char *)id, .name = (char *)name, .address = "127.0.0.1", .port = port};
  rc = coord_registry_register(c, &svc, ttl);
  if (rc < 0) {
    fprintf(stderr, "register: %s: %s\n", coord_strerror(rc), coord_last_error());
    return 1;
  }
  int registered = 1;
  printf("READY %d\n", port);
  fflush(stdout);

  char line[256];
  size_t ll = 0;
  int quit = 0;
  while (!quit) {
    struct pollfd p[2] = {{.fd = 0, .events = POLLIN}, {.fd = sfd, .events = POLLIN}};
    if (poll(p, 2, -1) < 0) {
      if (errno == EINTR)
        continue;
      break;
    }
    if (p[1].revents)
      break;
    if (!p[0].revents)
      continue;
    ssize_t r = read(0, line + ll, sizeof line - 1 - ll);
    if (r <= 0)
      break;
    ll += (size_t)r;
    line[ll] = 0;
    char *nl;
    while ((nl = strchr(line, '\n'))) {
      *nl = 0;
      if (!strcmp(line, "unregister") && registered) {
        rc = coord_registry_unregister(c, name, id);
        registered = 0;
        printf("UNREGISTERED %lld %d\n", now_ms(), rc);
        fflush(stdout);
      } else if (!strcmp(line, "register") && !registered) {
        rc = coord_registry_register(c, &svc, ttl);
        registered = rc == 0;
        printf("REGISTERED %lld %d\n", now_ms(), rc);
        fflush(stdout);
      } else if (!strcmp(line, "quit")) {
        quit = 1;
      }
      size_t used = (size_t)(nl + 1 - line);
      memmove(line, nl + 1, ll - used + 1);
      ll -= used;
    }
    if (ll >= sizeof line - 1)
      ll = 0;
  }

  /* Graceful stop: leave the registry first, then serve a little longer. */
  if (registered) {
    rc = coord_registry_unregister(c, name, id);
    printf("UNREGISTERED %lld %d\n", now_ms(), rc);
    fflush(stdout);
  }
  if (grace > 0)
    usleep((useconds_t)grace * 1000);
  pthread_mutex_lock(&g_mu);
  g_stopping = 1;
  pthread_mutex_unlock(&g_mu);
  grpc_server_shutdown_and_notify(g_server, g_cq, &g_shutdown_tag);
  grpc_server_cancel_all_calls(g_server);
  grpc_completion_queue_shutdown(g_cq);
  pthread_join(th, NULL);
  grpc_server_destroy(g_server);
  grpc_completion_queue_destroy(g_cq);
  coord_close(c);
  grpc_shutdown();
  printf("CALLS %ld LAST %lld\n", __atomic_load_n(&g_calls, __ATOMIC_SEQ_CST),
         __atomic_load_n(&g_last_ms, __ATOMIC_SEQ_CST));
  fflush(stdout);
  close(sfd);
  return 0;
}
