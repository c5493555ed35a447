/*
 * grpc_echo_client.c — example: call a registered gRPC service through
 * coord_registry_get_connection and print which backend answered.
 *
 *   grpc_echo_client --name NAME [--count N] [--duration-ms MS]
 *                    [--interval-ms MS] [--deadline-ms MS] [--pick-first]
 *                    [--static] [--resolve]
 *
 * Etcd endpoints come from $COORD_ENDPOINTS.  The channel comes from
 * coord_registry_get_connection (xds:///NAME through libcoord's in-process
 * xDS server: it follows the registry without reconnecting), or with
 * --static from coord_registry_resolve (a fixed ipv4: target with a
 * round_robin service config).  --resolve only prints the resolution.
 *
 * Each call of /coord.example.Echo/Who prints one line:
 *   "<unix ms> OK <backend id>"  or  "<unix ms> ERR <grpc status> <details>"
 * and at the end "SUMMARY ok=<n> err=<n>".  It stops after --count calls
 * (default 10) or, with --duration-ms, after that long.
 *
 * Threads: just main; each call is plucked from its own pluck queue.
 */
#include <coord.h>

#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/support/alloc.h>
#include <grpc/support/time.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define METHOD "/coord.example.Echo/Who"

static long long now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* One unary call; 0 and the reply in out, or the gRPC status. */
static int call_who(grpc_channel *ch, grpc_completion_queue *cq, int deadline_ms, char *out, size_t outsz,
                    char *err, size_t errsz) {
  gpr_timespec deadline =
      gpr_time_add(gpr_now(GPR_CLOCK_REALTIME), gpr_time_from_millis(deadline_ms, GPR_TIMESPAN));
  grpc_slice method = grpc_slice_from_static_string(METHOD);
  grpc_call *call =
      grpc_channel_create_call(ch, NULL, GRPC_PROPAGATE_DEFAULTS, cq, method, NULL, deadline, NULL);
  grpc_slice empty = grpc_empty_slice();
  grpc_byte_buffer *req = grpc_raw_byte_buffer_create(&empty, 0);
  grpc_byte_buffer *resp = NULL;
  grpc_metadata_array init_md, trail_md;
  grpc_metadata_array_init(&init_md);
  grpc_metadata_array_init(&trail_md);
  grpc_status_code status = GRPC_STATUS_UNKNOWN;
  grpc_slice details = grpc_empty_slice();
  grpc_op ops[6];
  memset(ops, 0, sizeof ops);
  ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
  ops[1].op = GRPC_OP_SEND_MESSAGE;
  ops[1].data.send_message.send_message = req;
  ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
  ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
  ops[3].data.recv_initial_metadata.recv_initial_metadata = &init_md;
  ops[4].op = GRPC_OP_RECV_MESSAGE;
  ops[4].data.recv_message.recv_message = &resp;
  ops[5].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
  ops[5].data.recv_status_on_client.status = &status;
  ops[5].data.recv_status_on_client.status_details = &details;
  ops[5].data.recv_status_on_client.trailing_metadata = &trail_md;
  int tag;
  grpc_call_start_batch(call, ops, 6, &tag, NULL);
  grpc_completion_queue_pluck(cq, &tag, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
  out[0] = 0;
  if (status == GRPC_STATUS_OK && resp) {
    grpc_byte_buffer_reader r;
    grpc_byte_buffer_reader_init(&r, resp);
    grpc_slice s = grpc_byte_buffer_reader_readall(&r);
    grpc_byte_buffer_reader_destroy(&r);
    size_t n = GRPC_SLICE_LENGTH(s) < outsz - 1 ? GRPC_SLICE_LENGTH(s) : outsz - 1;
    memcpy(out, GRPC_SLICE_START_PTR(s), n);
    out[n] = 0;
    grpc_slice_unref(s);
  } else {
    char *d = grpc_slice_to_c_string(details);
    snprintf(err, errsz, "%s", d);
    gpr_free(d);
  }
  if (resp)
    grpc_byte_buffer_destroy(resp);
  grpc_byte_buffer_destroy(req);
  grpc_slice_unref(details);
  grpc_metadata_array_destroy(&init_md);
  grpc_metadata_array_destroy(&trail_md);
  grpc_call_unref(call);
  return (int)status;
}

static void usage(void) {
  fprintf(stderr, "usage: grpc_echo_client --name NAME [--count N] [--duration-ms MS] [--interval-ms MS]\n"
                  "                        [--deadline-ms MS] [--pick-first] [--static] [--resolve]\n");
  exit(2);
}

int main(int argc, char **argv) {
  const char *name = NULL;
  long count = 10, duration = 0, interval = 0, deadline = 2000;
  int pick_first = 0, use_static = 0, resolve_only = 0;
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--pick-first"))
      pick_first = 1;
    else if (!strcmp(argv[i], "--static"))
      use_static = 1;
    else if (!strcmp(argv[i], "--resolve"))
      resolve_only = 1;
    else if (i + 1 >= argc)
      usage();
    else if (!strcmp(argv[i], "--name"))
      name = argv[++i];
    else if (!strcmp(argv[i], "--count"))
      count = atol(argv[++i]);
    else if (!strcmp(argv[i], "--duration-ms"))
      duration = atol(argv[++i]);
    else if (!strcmp(argv[i], "--interval-ms"))
      interval = atol(argv[++i]);
    else if (!strcmp(argv[i], "--deadline-ms"))
      deadline = atol(argv[++i]);
    else
      usage();
  }
  if (!name)
    usage();
  setvbuf(stdout, NULL, _IOLBF, 0);

  coord_t *c = NULL;
  int rc = coord_new(NULL, &c);
  if (rc < 0) {
    fprintf(stderr, "coord_new: %s: %s\n", coord_strerror(rc), coord_last_error());
    return 1;
  }
  grpc_init();
  grpc_channel *ch = NULL;
  if (resolve_only || use_static) {
    coord_resolution_t res;
    rc = coord_registry_resolve(c, name, &res);
    if (rc < 0) {
      fprintf(stderr, "resolve: %s: %s\n", coord_strerror(rc), coord_last_error());
      return 1;
    }
    if (resolve_only) {
      for (size_t i = 0; i < res.n; i++)
        printf("ADDRESS %s\n", res.addresses[i]);
      printf("TARGET %s\n", res.target ? res.target : "");
      printf("SERVICE_CONFIG %s\n", res.service_config);
      coord_resolution_clear(&res);
      coord_close(c);
      grpc_shutdown();
      return 0;
    }
    if (!res.target) {
      fprintf(stderr, "no instances of %s\n", name);
      return 1;
    }
    grpc_arg arg = {
        .type = GRPC_ARG_STRING, .key = GRPC_ARG_SERVICE_CONFIG, .value.string = res.service_config};
    grpc_channel_args args = {1, &arg};
    grpc_channel_credentials *creds = grpc_insecure_credentials_create();
    ch = grpc_channel_create(res.target, creds, &args);
    grpc_channel_credentials_release(creds);
    coord_resolution_clear(&res);
  } else {
    rc = coord_registry_get_connection_lb(c, name, pick_first ? COORD_LB_PICK_FIRST : COORD_LB_ROUND_ROBIN,
                                          &ch);
    if (rc < 0) {
      fprintf(stderr, "get_connection: %s: %s\n", coord_strerror(rc), coord_last_error());
      return 1;
    }
  }

  grpc_completion_queue *cq = grpc_completion_queue_create_for_pluck(NULL);
  long ok = 0, bad = 0;
  long long start = now_ms();
  for (long i = 0; duration > 0 ? now_ms() - start < duration : i < count; i++) {
    char who[256], err[512] = "";
    int st = call_who(ch, cq, (int)deadline, who, sizeof who, err, sizeof err);
    if (st == 0) {
      ok++;
      printf("%lld OK %s\n", now_ms(), who);
    } else {
      bad++;
      printf("%lld ERR %d %s\n", now_ms(), st, err);
    }
    if (interval > 0)
      usleep((useconds_t)interval * 1000);
  }
  printf("SUMMARY ok=%ld err=%ld\n", ok, bad);
  grpc_completion_queue_shutdown(cq);
  while (grpc_completion_queue_pluck(cq, NULL, gpr_inf_future(GPR_CLOCK_REALTIME), NULL).type !=
         GRPC_QUEUE_SHUTDOWN)
    ;
  grpc_completion_queue_destroy(cq);
  grpc_channel_destroy(ch);
  coord_close(c);
  grpc_shutdown();
  return 0;
}
