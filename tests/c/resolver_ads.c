/*
 * resolver_ads.c — test program: speaks ADS (state of the world, v3) to a
 * coord xDS server directly, as gRPC's xDS client would, and checks the
 * protocol: resources, ACK, NACK, stale nonces, name changes, pushes.
 *
 *   resolver_ads HOST:PORT NAME EXPECTED_ENDPOINTS
 *
 * Steps (each prints a line; any failure prints "FAIL ..." and exits 1):
 *   LDS  request [NAME] -> Listener NAME, api_listener HttpConnectionManager
 *        with an inline route "" -> cluster NAME and the router filter.
 *   CDS  (after ACKing LDS: the ACK must not be answered) -> EDS Cluster over ADS.
 *   EDS  -> one locality with weight 1 and EXPECTED_ENDPOINTS endpoints.
 *   NACK of EDS -> no answer within 500 ms.
 *   stale request (unknown nonce, new names) -> no answer within 500 ms.
 *   "WAITING" -> the test registers one more instance -> an EDS push with
 *        EXPECTED_ENDPOINTS + 1 endpoints ("PUSH <ms>").
 *   name change with the right nonce -> answered with both resources.
 *   half-close -> status OK.
 *
 * Threads: just main, with one pluck queue.
 */
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/support/time.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "xds/cluster.pb-c.h"
#include "xds/discovery.pb-c.h"
#include "xds/endpoint.pb-c.h"
#include "xds/hcm.pb-c.h"
#include "xds/listener.pb-c.h"
#include "xds/route.pb-c.h"

#define T "type.googleapis.com/"
#define LDS T "envoy.config.listener.v3.Listener"
#define CDS T "envoy.config.cluster.v3.Cluster"
#define EDS T "envoy.config.endpoint.v3.ClusterLoadAssignment"

typedef Envoy__Service__Discovery__V3__DiscoveryResponse Resp;

static grpc_completion_queue *cq;
static grpc_call *call;
static grpc_byte_buffer *recv_bb;
static int recv_pending;
static int tag_send, tag_recv, tag_status, tag_md;

#define FAIL(...)                                                                                            \
  do {                                                                                                       \
    printf("FAIL ");                                                                                         \
    printf(__VA_ARGS__);                                                                                     \
    printf("\n");                                                                                            \
    exit(1);                                                                                                 \
  } while (0)

static long long now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static gpr_timespec in_ms(int ms) {
  return gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC), gpr_time_from_millis(ms, GPR_TIMESPAN));
}

static void send_req(const char *type, const char *version, const char *nonce, char **names, size_t n,
                     const char *nack) {
  Envoy__Service__Discovery__V3__DiscoveryRequest rq = ENVOY__SERVICE__DISCOVERY__V3__DISCOVERY_REQUEST__INIT;
  Envoy__Config__Core__V3__Node node = ENVOY__CONFIG__CORE__V3__NODE__INIT;
  node.id = "resolver_ads";
  Google__Rpc__Status st = GOOGLE__RPC__STATUS__INIT;
  rq.node = &node;
  rq.type_url = (char *)type;
  rq.version_info = (char *)version;
  rq.response_nonce = (char *)nonce;
  rq.n_resource_names = n;
  rq.resource_names = names;
  if (nack) {
    st.code = 3;
    st.message = (char *)nack;
    rq.error_detail = &st;
  }
  size_t len = protobuf_c_message_get_packed_size(&rq.base);
  uint8_t *buf = malloc(len + 1);
  protobuf_c_message_pack(&rq.base, buf);
  grpc_slice sl = grpc_slice_from_copied_buffer((char *)buf, len);
  free(buf);
  grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(&sl, 1);
  grpc_slice_unref(sl);
  grpc_op op;
  memset(&op, 0, sizeof op);
  op.op = GRPC_OP_SEND_MESSAGE;
  op.data.send_message.send_message = bb;
  if (grpc_call_start_batch(call, &op, 1, &tag_send, NULL) != GRPC_CALL_OK)
    FAIL("start send");
  grpc_event ev = grpc_completion_queue_pluck(cq, &tag_send, in_ms(5000), NULL);
  grpc_byte_buffer_destroy(bb);
  if (ev.type != GRPC_OP_COMPLETE || !ev.success)
    FAIL("send failed");
}

/* The next response within ms, or NULL. */
static Resp *recv_resp(int ms) {
  if (!recv_pending) {
    grpc_op op;
    memset(&op, 0, sizeof op);
    op.op = GRPC_OP_RECV_MESSAGE;
    op.data.recv_message.recv_message = &recv_bb;
    if (grpc_call_start_batch(call, &op, 1, &tag_recv, NULL) != GRPC_CALL_OK)
      FAIL("start recv");
    recv_pending = 1;
  }
  grpc_event ev = grpc_completion_queue_pluck(cq, &tag_recv, in_ms(ms), NULL);
  if (ev.type == GRPC_QUEUE_TIMEOUT)
    return NULL;
  recv_pending = 0;
  if (!ev.success || !recv_bb)
    FAIL("stream ended");
  grpc_byte_buffer_reader r;
  grpc_byte_buffer_reader_init(&r, recv_bb);
  grpc_slice sl = grpc_byte_buffer_reader_readall(&r);
  grpc_byte_buffer_reader_destroy(&r);
  grpc_byte_buffer_destroy(recv_bb);
  recv_bb = NULL;
  Resp *m = (Resp *)protobuf_c_message_unpack(&envoy__service__discovery__v3__discovery_response__descriptor,
                                              NULL, GRPC_SLICE_LENGTH(sl), GRPC_SLICE_START_PTR(sl));
  grpc_slice_unref(sl);
  if (!m)
    FAIL("undecodable DiscoveryResponse");
  return m;
}

static Resp *expect(const char *type, size_t nres) {
  Resp *m = recv_resp(5000);
  if (!m)
    FAIL("no %s response", type);
  if (strcmp(m->type_url, type) != 0)
    FAIL("expected %s, got %s", type, m->type_url);
  if (m->n_resources != nres)
    FAIL("%s: %zu resources, expected %zu", type, m->n_resources, nres);
  if (!m->nonce[0] || !m->version_info[0])
    FAIL("%s: empty nonce or version", type);
  for (size_t i = 0; i < nres; i++)
    if (strcmp(m->resources[i]->type_url, type) != 0)
      FAIL("%s: resource of type %s", type, m->resources[i]->type_url);
  return m;
}

static void expect_silence(const char *why) {
  Resp *m = recv_resp(500);
  if (m)
    FAIL("%s was answered (%s nonce %s)", why, m->type_url, m->nonce);
}

#define UNPACK(type, desc, any)                                                                              \
  ((type *)protobuf_c_message_unpack(&desc, NULL, (any)->value.len, (any)->value.data))

static size_t cla_endpoints(Resp *m, size_t i, const char *name) {
  Envoy__Config__Endpoint__V3__ClusterLoadAssignment *cla =
      UNPACK(Envoy__Config__Endpoint__V3__ClusterLoadAssignment,
             envoy__config__endpoint__v3__cluster_load_assignment__descriptor, m->resources[i]);
  if (!cla || strcmp(cla->cluster_name, name) != 0)
    FAIL("EDS: bad ClusterLoadAssignment");
  if (cla->n_endpoints != 1 || !cla->endpoints[0]->locality || !cla->endpoints[0]->load_balancing_weight ||
      cla->endpoints[0]->load_balancing_weight->value != 1)
    FAIL("EDS: need exactly one locality with weight 1");
  size_t n = cla->endpoints[0]->n_lb_endpoints;
  for (size_t k = 0; k < n; k++) {
    Envoy__Config__Endpoint__V3__LbEndpoint *e = cla->endpoints[0]->lb_endpoints[k];
    if (!e->endpoint || !e->endpoint->address || !e->endpoint->address->socket_address ||
        e->health_status != ENVOY__CONFIG__CORE__V3__HEALTH_STATUS__HEALTHY)
      FAIL("EDS: bad endpoint");
  }
  protobuf_c_message_free_unpacked(&cla->base, NULL);
  return n;
}

int main(int argc, char **argv) {
  if (argc != 4) {
    fprintf(stderr, "usage: resolver_ads HOST:PORT NAME EXPECTED_ENDPOINTS\n");
    return 2;
  }
  char *name = argv[2];
  size_t expected = (size_t)atoi(argv[3]);
  setvbuf(stdout, NULL, _IOLBF, 0);
  grpc_init();
  cq = grpc_completion_queue_create_for_pluck(NULL);
  grpc_channel_credentials *creds = grpc_insecure_credentials_create();
  grpc_channel *ch = grpc_channel_create(argv[1], creds, NULL);
  grpc_channel_credentials_release(creds);
  grpc_slice method = grpc_slice_from_static_string(
      "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources");
  call = grpc_channel_create_call(ch, NULL, GRPC_PROPAGATE_DEFAULTS, cq, method, NULL,
                                  gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
  grpc_metadata_array init_md, trail_md;
  grpc_metadata_array_init(&init_md);
  grpc_metadata_array_init(&trail_md);
  grpc_status_code status = GRPC_STATUS_UNKNOWN;
  grpc_slice details;
  grpc_op ops[2];
  memset(ops, 0, sizeof ops);
  ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
  ops[0].flags = GRPC_INITIAL_METADATA_WAIT_FOR_READY;
  if (grpc_call_start_batch(call, ops, 1, &tag_md, NULL) != GRPC_CALL_OK)
    FAIL("start");
  grpc_completion_queue_pluck(cq, &tag_md, in_ms(5000), NULL);
  memset(ops, 0, sizeof ops);
  ops[0].op = GRPC_OP_RECV_INITIAL_METADATA;
  ops[0].data.recv_initial_metadata.recv_initial_metadata = &init_md;
  ops[1].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
  ops[1].data.recv_status_on_client.status = &status;
  ops[1].data.recv_status_on_client.status_details = &details;
  ops[1].data.recv_status_on_client.trailing_metadata = &trail_md;
  if (grpc_call_start_batch(call, ops, 2, &tag_status, NULL) != GRPC_CALL_OK)
    FAIL("start status");

  char *names[2] = {name, "other-service"};

  /* LDS */
  send_req(LDS, "", "", names, 1, NULL);
  Resp *m = expect(LDS, 1);
  Envoy__Config__Listener__V3__Listener *l =
      UNPACK(Envoy__Config__Listener__V3__Listener, envoy__config__listener__v3__listener__descriptor,
             m->resources[0]);
  if (!l || strcmp(l->name, name) != 0 || !l->api_listener || !l->api_listener->api_listener)
    FAIL("LDS: bad Listener");
  Envoy__Extensions__Filters__Network__HttpConnectionManager__V3__HttpConnectionManager *hcm = UNPACK(
      Envoy__Extensions__Filters__Network__HttpConnectionManager__V3__HttpConnectionManager,
      envoy__extensions__filters__network__http_connection_manager__v3__http_connection_manager__descriptor,
      l->api_listener->api_listener);
  if (!hcm || !hcm->route_config || hcm->route_config->n_virtual_hosts != 1)
    FAIL("LDS: no inline route config");
  Envoy__Config__Route__V3__VirtualHost *vh = hcm->route_config->virtual_hosts[0];
  if (vh->n_domains != 1 || strcmp(vh->domains[0], "*") != 0 || vh->n_routes != 1 || !vh->routes[0]->match ||
      vh->routes[0]->match->path_specifier_case !=
          ENVOY__CONFIG__ROUTE__V3__ROUTE_MATCH__PATH_SPECIFIER_PREFIX ||
      strcmp(vh->routes[0]->match->prefix, "") != 0 || !vh->routes[0]->route ||
      strcmp(vh->routes[0]->route->cluster, name) != 0)
    FAIL("LDS: bad virtual host");
  if (hcm->n_http_filters != 1 || !hcm->http_filters[0]->typed_config ||
      strcmp(hcm->http_filters[0]->typed_config->type_url,
             T "envoy.extensions.filters.http.router.v3.Router") != 0)
    FAIL("LDS: no router filter");
  printf("LDS ok version %s nonce %s\n", m->version_info, m->nonce);
  send_req(LDS, m->version_info, m->nonce, names, 1, NULL); /* ACK */
  protobuf_c_message_free_unpacked(&hcm->base, NULL);
  protobuf_c_message_free_unpacked(&l->base, NULL);
  protobuf_c_message_free_unpacked(&m->base, NULL);

  /* CDS: the first answer must be CDS (the LDS ACK was not answered). */
  send_req(CDS, "", "", names, 1, NULL);
  m = expect(CDS, 1);
  Envoy__Config__Cluster__V3__Cluster *cl = UNPACK(
      Envoy__Config__Cluster__V3__Cluster, envoy__config__cluster__v3__cluster__descriptor, m->resources[0]);
  if (!cl || strcmp(cl->name, name) != 0 ||
      cl->type != ENVOY__CONFIG__CLUSTER__V3__CLUSTER__DISCOVERY_TYPE__EDS || !cl->eds_cluster_config ||
      !cl->eds_cluster_config->eds_config || !cl->eds_cluster_config->eds_config->ads ||
      cl->lb_policy != ENVOY__CONFIG__CLUSTER__V3__CLUSTER__LB_POLICY__ROUND_ROBIN)
    FAIL("CDS: bad Cluster");
  printf("CDS ok version %s nonce %s\n", m->version_info, m->nonce);
  send_req(CDS, m->version_info, m->nonce, names, 1, NULL);
  protobuf_c_message_free_unpacked(&cl->base, NULL);
  protobuf_c_message_free_unpacked(&m->base, NULL);

  /* EDS */
  send_req(EDS, "", "", names, 1, NULL);
  m = expect(EDS, 1);
  size_t n = cla_endpoints(m, 0, name);
  if (n != expected)
    FAIL("EDS: %zu endpoints, expected %zu", n, expected);
  printf("EDS ok %zu endpoints version %s nonce %s\n", n, m->version_info, m->nonce);
  char nonce[64];
  snprintf(nonce, sizeof nonce, "%s", m->nonce);
  send_req(EDS, "", nonce, names, 1, "resolver_ads test nack"); /* NACK */
  protobuf_c_message_free_unpacked(&m->base, NULL);
  expect_silence("a NACK");
  printf("NACK ok\n");
  send_req(EDS, "", "bogus-nonce", names, 2, NULL);
  expect_silence("a stale request");
  printf("STALE ok\n");

  /* A registry change is pushed. */
  printf("WAITING\n");
  long long t0 = now_ms();
  m = expect(EDS, 1);
  n = cla_endpoints(m, 0, name);
  if (n != expected + 1)
    FAIL("push: %zu endpoints, expected %zu", n, expected + 1);
  printf("PUSH %lld\n", now_ms() - t0);
  snprintf(nonce, sizeof nonce, "%s", m->nonce);
  protobuf_c_message_free_unpacked(&m->base, NULL);

  /* A name change with the right nonce is answered with both. */
  send_req(EDS, "", nonce, names, 2, NULL);
  m = expect(EDS, 2);
  if (cla_endpoints(m, 0, name) != expected + 1 || cla_endpoints(m, 1, "other-service") != 0)
    FAIL("EDS for two names");
  printf("NAMES ok\n");
  protobuf_c_message_free_unpacked(&m->base, NULL);

  memset(ops, 0, sizeof ops);
  ops[0].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
  grpc_call_start_batch(call, ops, 1, &tag_send, NULL);
  grpc_completion_queue_pluck(cq, &tag_send, in_ms(5000), NULL);
  grpc_event ev = grpc_completion_queue_pluck(cq, &tag_status, in_ms(5000), NULL);
  if (ev.type != GRPC_OP_COMPLETE || status != GRPC_STATUS_OK)
    FAIL("close: status %d", (int)status);
  if (recv_pending)
    grpc_completion_queue_pluck(cq, &tag_recv, in_ms(5000), NULL);
  if (recv_bb)
    grpc_byte_buffer_destroy(recv_bb);
  printf("CLOSE ok\n");
  grpc_slice_unref(details);
  grpc_metadata_array_destroy(&init_md);
  grpc_metadata_array_destroy(&trail_md);
  grpc_call_unref(call);
  grpc_channel_destroy(ch);
  grpc_completion_queue_shutdown(cq);
  while (grpc_completion_queue_pluck(cq, NULL, gpr_inf_future(GPR_CLOCK_REALTIME), NULL).type !=
         GRPC_QUEUE_SHUTDOWN)
    ;
  grpc_completion_queue_destroy(cq);
  grpc_shutdown();
  return 0;
}
