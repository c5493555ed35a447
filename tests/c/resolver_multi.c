/*
 * resolver_multi.c — test program: one coord client, several channels from
 * coord_registry_get_connection at once (one in-process xDS server, one
 * ADS stream, several services and both LB policies).
 *
 *   resolver_multi SVC_A SVC_B ROUNDS
 *
 * Opens round_robin channels to SVC_A and SVC_B and a pick_first channel to
 * SVC_A, then does ROUNDS rounds of one call on each (interleaved).  Prints
 * "<channel> <backend id>" per answer and exits 0 if every call succeeded,
 * each round_robin channel reached at least two backends, and the
 * pick_first channel always the same one.  Also checks argument errors.
 * Backends answer /coord.example.Echo/Who with their id
 * (examples/grpc_echo_server).  Etcd endpoints from $COORD_ENDPOINTS.
 *
 * Threads: just main; one pluck queue.
 */
#include <coord.h>

#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/support/time.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static grpc_completion_queue *cq;

static int who(grpc_channel *ch, char *out, size_t outsz) {
  gpr_timespec deadline = gpr_time_add(gpr_now(GPR_CLOCK_REALTIME), gpr_time_from_millis(5000, GPR_TIMESPAN));
  grpc_call *call = grpc_channel_create_call(ch, NULL, GRPC_PROPAGATE_DEFAULTS, cq,
                                             grpc_slice_from_static_string("/coord.example.Echo/Who"), NULL,
                                             deadline, NULL);
  grpc_slice empty = grpc_empty_slice();
  grpc_byte_buffer *req = grpc_raw_byte_buffer_create(&empty, 0), *resp = NULL;
  grpc_metadata_array md1, md2;
  grpc_metadata_array_init(&md1);
  grpc_metadata_array_init(&md2);
  grpc_status_code st = GRPC_STATUS_UNKNOWN;
  grpc_slice details;
  grpc_op ops[6];
  memset(ops, 0, sizeof ops);
  ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
  ops[0].flags = GRPC_INITIAL_METADATA_WAIT_FOR_READY; /* the first calls wait for xDS */
  ops[1].op = GRPC_OP_SEND_MESSAGE;
  ops[1].data.send_message.send_message = req;
  ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
  ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
  ops[3].data.recv_initial_metadata.recv_initial_metadata = &md1;
  ops[4].op = GRPC_OP_RECV_MESSAGE;
  ops[4].data.recv_message.recv_message = &resp;
  ops[5].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
  ops[5].data.recv_status_on_client.status = &st;
  ops[5].data.recv_status_on_client.status_details = &details;
  ops[5].data.recv_status_on_client.trailing_metadata = &md2;
  int tag;
  grpc_call_start_batch(call, ops, 6, &tag, NULL);
  grpc_completion_queue_pluck(cq, &tag, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
  out[0] = 0;
  if (st == GRPC_STATUS_OK && resp) {
    grpc_byte_buffer_reader r;
    grpc_byte_buffer_reader_init(&r, resp);
    grpc_slice s = grpc_byte_buffer_reader_readall(&r);
    grpc_byte_buffer_reader_destroy(&r);
    size_t n = GRPC_SLICE_LENGTH(s) < outsz - 1 ? GRPC_SLICE_LENGTH(s) : outsz - 1;
    memcpy(out, GRPC_SLICE_START_PTR(s), n);
    out[n] = 0;
    grpc_slice_unref(s);
  }
  if (resp)
    grpc_byte_buffer_destroy(resp);
  grpc_byte_buffer_destroy(req);
  grpc_slice_unref(details);
  grpc_metadata_array_destroy(&md1);
  grpc_metadata_array_destroy(&md2);
  grpc_call_unref(call);
  return (int)st;
}

int main(int argc, char **argv) {
  if (argc != 4) {
    fprintf(stderr, "usage: resolver_multi SVC_A SVC_B ROUNDS\n");
    return 2;
  }
  int rounds = atoi(argv[3]);
  setvbuf(stdout, NULL, _IOLBF, 0);
  coord_t *c = NULL;
  int rc = coord_new(NULL, &c);
  if (rc < 0) {
    fprintf(stderr, "coord_new: %s\n", coord_last_error());
    return 1;
  }
  grpc_init();
  grpc_channel *bad = NULL;
  if (coord_registry_get_connection(c, "a/b", &bad) != COORD_EINVAL ||
      coord_registry_get_connection(c, "", &bad) != COORD_EINVAL ||
      coord_registry_get_connection_lb(c, argv[1], (coord_lb_policy_t)7, &bad) != COORD_EINVAL || bad) {
    printf("FAIL argument checks\n");
    return 1;
  }
  const char *label[3] = {"A", "B", "A-pick-first"};
  grpc_channel *ch[3] = {NULL, NULL, NULL};
  if (coord_registry_get_connection(c, argv[1], &ch[0]) < 0 ||
      coord_registry_get_connection(c, argv[2], &ch[1]) < 0 ||
      coord_registry_get_connection_lb(c, argv[1], COORD_LB_PICK_FIRST, &ch[2]) < 0) {
    printf("FAIL get_connection: %s\n", coord_last_error());
    return 1;
  }
  cq = grpc_completion_queue_create_for_pluck(NULL);
  char first[3][128] = {"", "", ""};
  int distinct[3] = {0, 0, 0}, failed = 0;
  for (int r = 0; r < rounds; r++, usleep(2000)) /* give every connection time to come up */
    for (int k = 0; k < 3; k++) {
      char id[128];
      int st = who(ch[k], id, sizeof id);
      if (st != 0) {
        printf("%s ERR %d\n", label[k], st);
        failed++;
        continue;
      }
      printf("%s %s\n", label[k], id);
      if (!first[k][0])
        snprintf(first[k], sizeof first[k], "%s", id), distinct[k] = 1;
      else if (strcmp(first[k], id) != 0)
        distinct[k] = 2;
    }
  int ok = !failed && distinct[0] == 2 && distinct[1] == 2 && distinct[2] == 1;
  printf("%s failed=%d\n", ok ? "PASS" : "FAIL", failed);
  for (int k = 0; k < 3; k++)
    grpc_channel_destroy(ch[k]);
  grpc_completion_queue_shutdown(cq);
  while (grpc_completion_queue_pluck(cq, NULL, gpr_inf_future(GPR_CLOCK_REALTIME), NULL).type !=
         GRPC_QUEUE_SHUTDOWN)
    ;
  grpc_completion_queue_destroy(cq);
  coord_close(c);
  grpc_shutdown();
  return ok ? 0 : 1;
}
