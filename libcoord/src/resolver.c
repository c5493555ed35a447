/*
 * resolver.c — the resolver: an xDS (ADS, state of the world, v3) server fed
 * by the registry, coord_registry_get_connection, coord_registry_resolve.
 *
 * gRPC's C core has no public resolver plug-in but has an xDS client: a
 * channel to xds:///<name> asks the management server named by its bootstrap
 * for a Listener <name>, then the Cluster the Listener's route names, then
 * that Cluster's ClusterLoadAssignment, and follows every update pushed.
 * This file is that management server, written on gRPC's C core server API.
 *
 * Resources (for a requested name L = "<svc>" or "pick_first/<svc>"):
 *   Listener L: api_listener = HttpConnectionManager with an inline
 *     RouteConfiguration (virtual host domains ["*"], route prefix "" ->
 *     cluster L) and the router filter (gRPC requires it).
 *   Cluster L: type EDS over ADS; lb_policy ROUND_ROBIN, or for pick_first a
 *     load_balancing_policy naming gRPC's registered "pick_first" through a
 *     TypedStruct (gRPC 1.51 reads it only with
 *     GRPC_EXPERIMENTAL_XDS_CUSTOM_LB_CONFIG=true).
 *   ClusterLoadAssignment L: one locality (region "coord", weight 1 — gRPC
 *     drops a locality without a weight) holding every registered instance
 *     of <svc> as a HEALTHY endpoint (host names resolved to IPs, duplicates
 *     dropped).  No instances: the locality is empty and calls fail with
 *     UNAVAILABLE until one registers.
 * Every requested name is served, registered or not.
 *
 * Protocol: a response carries every resource the stream subscribes to for
 * that type, a server-wide increasing version_info and a per-stream nonce.
 * A request whose response_nonce is not the last nonce sent for its type is
 * stale and ignored (the client will answer the newer response).  An ACK
 * with unchanged names needs nothing; a NACK (error_detail set) is logged to
 * stderr and the stream keeps its last good state (nothing is resent until
 * something changes).  A changed name set is answered at once.
 *
 * Threads, locks, ownership:
 *   - Each coord_xds_server_t owns one grpc_server, one completion queue
 *     (create_for_next) and one server thread, the only thread that calls
 *     grpc_completion_queue_next on it.  Every tag on that queue is an
 *     xds_tag_t inside an xds_stream_t (or the server's shutdown tag).
 *   - A feed thread follows the registry: a snapshot (Range of /services/)
 *     then a watch on /services/ from the snapshot's revision + 1 (the core's
 *     watch resumes across reconnects without losing events); on a watch
 *     error it takes a new snapshot and watches again.  It resolves host
 *     names (getaddrinfo may block) before taking the lock.
 *   - One mutex (srv->mu) guards everything in the server: the service
 *     table, the stream list and every stream's state.  Both threads start
 *     gRPC batches while holding it (grpc_call_start_batch never calls back
 *     synchronously), so a registry change pushes to the streams directly
 *     from the feed thread: a stream has at most one send in flight; a type
 *     whose content changed while one was in flight is marked dirty and sent
 *     when the send completes.
 *   - A stream is freed by the server thread once its close-on-server op has
 *     completed and no op of it is outstanding.
 *   - The per-client state (the in-process server used by get_connection) is
 *     in the COORD__SLOT_RESOLVER slot behind its own mutex; the process
 *     environment (bootstrap) is guarded by one global mutex: one coord_t
 *     per process owns the bootstrap at a time.
 */
#include "internal.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/slice.h>
#include <grpc/support/time.h>

#include "xds/cluster.pb-c.h"
#include "xds/core.pb-c.h"
#include "xds/discovery.pb-c.h"
#include "xds/endpoint.pb-c.h"
#include "xds/hcm.pb-c.h"
#include "xds/listener.pb-c.h"
#include "xds/protobuf.pb-c.h"
#include "xds/route.pb-c.h"
#include "xds/router.pb-c.h"
#include "xds/status.pb-c.h"
#include "xds/typed_struct.pb-c.h"

#define ADS_METHOD "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
#define TYPE_PREFIX "type.googleapis.com/"
#define LDS_TYPE TYPE_PREFIX "envoy.config.listener.v3.Listener"
#define CDS_TYPE TYPE_PREFIX "envoy.config.cluster.v3.Cluster"
#define EDS_TYPE TYPE_PREFIX "envoy.config.endpoint.v3.ClusterLoadAssignment"
#define HCM_TYPE                                                                                             \
  TYPE_PREFIX "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
#define ROUTER_TYPE TYPE_PREFIX "envoy.extensions.filters.http.router.v3.Router"
#define TYPED_STRUCT_TYPE TYPE_PREFIX "xds.type.v3.TypedStruct"
#define PICK_FIRST_PREFIX "pick_first/"
#define SERVICES_PREFIX "/services/"

enum { T_LDS, T_CDS, T_EDS, T_MAX };
static const char *const type_urls[T_MAX] = {LDS_TYPE, CDS_TYPE, EDS_TYPE};
static const char *const type_short[T_MAX] = {"LDS", "CDS", "EDS"};

/* ---------------------------------------------------------------- state */

typedef struct xds_inst {
  char *id;
  char *addr; /* as registered: "host:port" */
  char *ip;   /* resolved literal, NULL if it did not resolve */
  int port;
} xds_inst_t;

typedef struct xds_service {
  char *name;
  xds_inst_t *inst; /* sorted by id */
  size_t n, cap;
  struct xds_service *next;
} xds_service_t;

typedef struct xds_stream xds_stream_t;
enum { K_NEW, K_RECV, K_SEND, K_CLOSE, K_FINISH, K_SHUTDOWN };
typedef struct xds_tag {
  int kind;
  xds_stream_t *s;
} xds_tag_t;

typedef struct xds_sub {
  char **names;
  size_t n;
  int requested; /* a request for this type arrived */
  int dirty;     /* a response is owed */
  char nonce[32];
  char version[32];
} xds_sub_t;

struct xds_stream {
  coord_xds_server_t *srv;
  xds_stream_t *next, *prev;
  grpc_call *call;
  grpc_call_details details;
  grpc_metadata_array req_md;
  xds_tag_t t_new, t_recv, t_send, t_close, t_finish;
  int ops; /* batches outstanding */
  grpc_byte_buffer *recv_bb;
  grpc_byte_buffer *send_bb;
  int cancelled;
  grpc_status_code st_code;
  grpc_slice st_details;
  int md_sent, send_inflight, closed, finishing, listed;
  uint64_t nonce_ctr;
  char *node;
  xds_sub_t sub[T_MAX];
};

struct coord_xds_server_s {
  coord_t *c;
  pthread_mutex_t mu;
  grpc_server *server;
  grpc_completion_queue *cq;
  pthread_t thread, feed;
  int feed_started, thread_started;
  int port;
  int stop_fd;  /* eventfd: tells the feed thread to stop */
  int stopping; /* under mu */
  int shutdown_done;
  xds_tag_t t_shutdown;
  xds_stream_t *pending; /* waiting in grpc_server_request_call */
  xds_stream_t *streams;
  xds_service_t *services;
  uint64_t version;
  int64_t start_rev; /* revision of the first snapshot */
  int verbose;
};

/* ---------------------------------------------------------------- helpers */

static void xlog(coord_xds_server_t *srv, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void xlog(coord_xds_server_t *srv, const char *fmt, ...) {
  COORD_UNUSED(srv);
  char buf[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  fprintf(stderr, "coord xds: %s\n", buf);
}

/* Resolves a host to a numeric IP (v4 preferred); NULL if it does not. */
static char *resolve_host(const char *host) {
  unsigned char tmp[16];
  if (inet_pton(AF_INET, host, tmp) == 1 || inet_pton(AF_INET6, host, tmp) == 1)
    return strdup(host);
  struct addrinfo hints = {0}, *res = NULL;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_family = AF_UNSPEC;
  if (getaddrinfo(host, NULL, &hints, &res) != 0 || !res)
    return NULL;
  char buf[INET6_ADDRSTRLEN] = "";
  struct addrinfo *pick = res;
  for (struct addrinfo *a = res; a; a = a->ai_next)
    if (a->ai_family == AF_INET) {
      pick = a;
      break;
    }
  if (pick->ai_family == AF_INET)
    inet_ntop(AF_INET, &((struct sockaddr_in *)pick->ai_addr)->sin_addr, buf, sizeof buf);
  else if (pick->ai_family == AF_INET6)
    inet_ntop(AF_INET6, &((struct sockaddr_in6 *)pick->ai_addr)->sin6_addr, buf, sizeof buf);
  freeaddrinfo(res);
  return buf[0] ? strdup(buf) : NULL;
}

static grpc_byte_buffer *bb_from(const void *data, size_t len) {
  grpc_slice sl = grpc_slice_from_copied_buffer(data, len);
  grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(&sl, 1);
  grpc_slice_unref(sl);
  return bb;
}

static ProtobufCMessage *bb_unpack(const ProtobufCMessageDescriptor *d, grpc_byte_buffer *bb) {
  grpc_byte_buffer_reader r;
  if (!grpc_byte_buffer_reader_init(&r, bb))
    return NULL;
  grpc_slice sl = grpc_byte_buffer_reader_readall(&r);
  grpc_byte_buffer_reader_destroy(&r);
  ProtobufCMessage *m = protobuf_c_message_unpack(d, NULL, GRPC_SLICE_LENGTH(sl), GRPC_SLICE_START_PTR(sl));
  grpc_slice_unref(sl);
  return m;
}

/* Packs m into any (value malloc'd: free any->value.data). */
static int pack_any(const ProtobufCMessage *m, const char *type_url, Google__Protobuf__Any *any) {
  size_t n = protobuf_c_message_get_packed_size(m);
  uint8_t *buf = malloc(n ? n : 1);
  if (!buf)
    return COORD_ENOMEM;
  protobuf_c_message_pack(m, buf);
  google__protobuf__any__init(any);
  any->type_url = (char *)type_url;
  any->value.data = buf;
  any->value.len = n;
  return 0;
}

/* "pick_first/<svc>" -> <svc> and *pf = 1; "<svc>" -> <svc>. */
static const char *svc_of(const char *rname, int *pf) {
  size_t l = strlen(PICK_FIRST_PREFIX);
  if (strncmp(rname, PICK_FIRST_PREFIX, l) == 0) {
    if (pf)
      *pf = 1;
    return rname + l;
  }
  if (pf)
    *pf = 0;
  return rname;
}

/* ---------------------------------------------------------------- service table (under mu) */

static xds_service_t *svc_find(coord_xds_server_t *srv, const char *name, int create) {
  for (xds_service_t *s = srv->services; s; s = s->next)
    if (strcmp(s->name, name) == 0)
      return s;
  if (!create)
    return NULL;
  xds_service_t *s = calloc(1, sizeof *s);
  if (!s || !(s->name = strdup(name))) {
    free(s);
    return NULL;
  }
  s->next = srv->services;
  srv->services = s;
  return s;
}

static void inst_clear(xds_inst_t *i) {
  free(i->id);
  free(i->addr);
  free(i->ip);
  memset(i, 0, sizeof *i);
}

static void svc_free_all(coord_xds_server_t *srv) {
  xds_service_t *s = srv->services;
  while (s) {
    xds_service_t *nx = s->next;
    for (size_t i = 0; i < s->n; i++)
      inst_clear(&s->inst[i]);
    free(s->inst);
    free(s->name);
    free(s);
    s = nx;
  }
  srv->services = NULL;
}

/* Insert or replace instance id (takes ownership of *inst's strings). */
static int svc_put(xds_service_t *s, xds_inst_t *inst) {
  size_t i = 0;
  while (i < s->n && strcmp(s->inst[i].id, inst->id) < 0)
    i++;
  if (i < s->n && strcmp(s->inst[i].id, inst->id) == 0) {
    inst_clear(&s->inst[i]);
    s->inst[i] = *inst;
    return 0;
  }
  if (s->n == s->cap) {
    size_t nc = s->cap ? s->cap * 2 : 4;
    xds_inst_t *ni = realloc(s->inst, nc * sizeof *ni);
    if (!ni)
      return COORD_ENOMEM;
    s->inst = ni;
    s->cap = nc;
  }
  memmove(&s->inst[i + 1], &s->inst[i], (s->n - i) * sizeof *s->inst);
  s->inst[i] = *inst;
  s->n++;
  return 0;
}

static int svc_del(xds_service_t *s, const char *id) {
  for (size_t i = 0; i < s->n; i++)
    if (strcmp(s->inst[i].id, id) == 0) {
      inst_clear(&s->inst[i]);
      memmove(&s->inst[i], &s->inst[i + 1], (s->n - i - 1) * sizeof *s->inst);
      s->n--;
      return 1;
    }
  return 0;
}

/* ---------------------------------------------------------------- resources */

static int build_listener(const char *lname, Google__Protobuf__Any *out) {
  Envoy__Config__Route__V3__RouteAction action = ENVOY__CONFIG__ROUTE__V3__ROUTE_ACTION__INIT;
  action.cluster_specifier_case = ENVOY__CONFIG__ROUTE__V3__ROUTE_ACTION__CLUSTER_SPECIFIER_CLUSTER;
  action.cluster = (char *)lname;
  Envoy__Config__Route__V3__RouteMatch match = ENVOY__CONFIG__ROUTE__V3__ROUTE_MATCH__INIT;
  match.path_specifier_case = ENVOY__CONFIG__ROUTE__V3__ROUTE_MATCH__PATH_SPECIFIER_PREFIX;
  match.prefix = "";
  Envoy__Config__Route__V3__Route route = ENVOY__CONFIG__ROUTE__V3__ROUTE__INIT;
  route.match = &match;
  route.action_case = ENVOY__CONFIG__ROUTE__V3__ROUTE__ACTION_ROUTE;
  route.route = &action;
  Envoy__Config__Route__V3__Route *routes[1] = {&route};
  char *domains[1] = {"*"};
  Envoy__Config__Route__V3__VirtualHost vh = ENVOY__CONFIG__ROUTE__V3__VIRTUAL_HOST__INIT;
  vh.name = (char *)lname;
  vh.n_domains = 1;
  vh.domains = domains;
  vh.n_routes = 1;
  vh.routes = routes;
  Envoy__Config__Route__V3__VirtualHost *vhs[1] = {&vh};
  Envoy__Config__Route__V3__RouteConfiguration rc = ENVOY__CONFIG__ROUTE__V3__ROUTE_CONFIGURATION__INIT;
  rc.name = (char *)lname;
  rc.n_virtual_hosts = 1;
  rc.virtual_hosts = vhs;

  Google__Protobuf__Any router_any = GOOGLE__PROTOBUF__ANY__INIT;
  router_any.type_url = ROUTER_TYPE; /* an empty Router message */
  Envoy__Extensions__Filters__Network__HttpConnectionManager__V3__HttpFilter router =
      ENVOY__EXTENSIONS__FILTERS__NETWORK__HTTP_CONNECTION_MANAGER__V3__HTTP_FILTER__INIT;
  router.name = "envoy.filters.http.router";
  router.config_type_case =
      ENVOY__EXTENSIONS__FILTERS__NETWORK__HTTP_CONNECTION_MANAGER__V3__HTTP_FILTER__CONFIG_TYPE_TYPED_CONFIG;
  router.typed_config = &router_any;
  Envoy__Extensions__Filters__Network__HttpConnectionManager__V3__HttpFilter *filters[1] = {&router};
  Envoy__Extensions__Filters__Network__HttpConnectionManager__V3__HttpConnectionManager hcm =
      ENVOY__EXTENSIONS__FILTERS__NETWORK__HTTP_CONNECTION_MANAGER__V3__HTTP_CONNECTION_MANAGER__INIT;
  hcm.stat_prefix = "coord";
  hcm.route_specifier_case =
      ENVOY__EXTENSIONS__FILTERS__NETWORK__HTTP_CONNECTION_MANAGER__V3__HTTP_CONNECTION_MANAGER__ROUTE_SPECIFIER_ROUTE_CONFIG;
  hcm.route_config = &rc;
  hcm.n_http_filters = 1;
  hcm.http_filters = filters;

  Google__Protobuf__Any hcm_any;
  int rc_ = pack_any(&hcm.base, HCM_TYPE, &hcm_any);
  if (rc_)
    return rc_;
  Envoy__Config__Listener__V3__ApiListener api = ENVOY__CONFIG__LISTENER__V3__API_LISTENER__INIT;
  api.api_listener = &hcm_any;
  Envoy__Config__Listener__V3__Listener l = ENVOY__CONFIG__LISTENER__V3__LISTENER__INIT;
  l.name = (char *)lname;
  l.api_listener = &api;
  rc_ = pack_any(&l.base, LDS_TYPE, out);
  free(hcm_any.value.data);
  return rc_;
}

static int build_cluster(const char *cname, Google__Protobuf__Any *out) {
  int pf = 0;
  svc_of(cname, &pf);
  Envoy__Config__Core__V3__AggregatedConfigSource ads =
      ENVOY__CONFIG__CORE__V3__AGGREGATED_CONFIG_SOURCE__INIT;
  Envoy__Config__Core__V3__ConfigSource cs = ENVOY__CONFIG__CORE__V3__CONFIG_SOURCE__INIT;
  cs.config_source_specifier_case = ENVOY__CONFIG__CORE__V3__CONFIG_SOURCE__CONFIG_SOURCE_SPECIFIER_ADS;
  cs.ads = &ads;
  cs.resource_api_version = ENVOY__CONFIG__CORE__V3__API_VERSION__V3;
  Envoy__Config__Cluster__V3__Cluster__EdsClusterConfig eds =
      ENVOY__CONFIG__CLUSTER__V3__CLUSTER__EDS_CLUSTER_CONFIG__INIT;
  eds.eds_config = &cs;
  eds.service_name = (char *)cname;
  Envoy__Config__Cluster__V3__Cluster cl = ENVOY__CONFIG__CLUSTER__V3__CLUSTER__INIT;
  cl.name = (char *)cname;
  cl.cluster_discovery_type_case = ENVOY__CONFIG__CLUSTER__V3__CLUSTER__CLUSTER_DISCOVERY_TYPE_TYPE;
  cl.type = ENVOY__CONFIG__CLUSTER__V3__CLUSTER__DISCOVERY_TYPE__EDS;
  cl.eds_cluster_config = &eds;
  cl.lb_policy = ENVOY__CONFIG__CLUSTER__V3__CLUSTER__LB_POLICY__ROUND_ROBIN;

  /* pick_first: load_balancing_policy -> TypedStruct naming gRPC's policy. */
  Google__Protobuf__Struct empty = GOOGLE__PROTOBUF__STRUCT__INIT;
  Xds__Type__V3__TypedStruct ts = XDS__TYPE__V3__TYPED_STRUCT__INIT;
  ts.type_url = TYPE_PREFIX "pick_first";
  ts.value = &empty;
  Google__Protobuf__Any ts_any = GOOGLE__PROTOBUF__ANY__INIT;
  Envoy__Config__Core__V3__TypedExtensionConfig tec = ENVOY__CONFIG__CORE__V3__TYPED_EXTENSION_CONFIG__INIT;
  Envoy__Config__Cluster__V3__LoadBalancingPolicy__Policy pol =
      ENVOY__CONFIG__CLUSTER__V3__LOAD_BALANCING_POLICY__POLICY__INIT;
  Envoy__Config__Cluster__V3__LoadBalancingPolicy__Policy *pols[1] = {&pol};
  Envoy__Config__Cluster__V3__LoadBalancingPolicy lbp =
      ENVOY__CONFIG__CLUSTER__V3__LOAD_BALANCING_POLICY__INIT;
  if (pf) {
    int r = pack_any(&ts.base, TYPED_STRUCT_TYPE, &ts_any);
    if (r)
      return r;
    tec.name = "pick_first";
    tec.typed_config = &ts_any;
    pol.typed_extension_config = &tec;
    lbp.n_policies = 1;
    lbp.policies = pols;
    cl.load_balancing_policy = &lbp;
  }
  int r = pack_any(&cl.base, CDS_TYPE, out);
  free(ts_any.value.data);
  return r;
}

/* Under mu (reads the service table). */
static int build_cla(coord_xds_server_t *srv, const char *cname, Google__Protobuf__Any *out) {
  xds_service_t *s = svc_find(srv, svc_of(cname, NULL), 0);
  size_t n = s ? s->n : 0;
  Envoy__Config__Endpoint__V3__LbEndpoint *lbe = calloc(n ? n : 1, sizeof *lbe);
  Envoy__Config__Endpoint__V3__LbEndpoint **lbep = calloc(n ? n : 1, sizeof *lbep);
  Envoy__Config__Endpoint__V3__Endpoint *ep = calloc(n ? n : 1, sizeof *ep);
  Envoy__Config__Core__V3__Address *ad = calloc(n ? n : 1, sizeof *ad);
  Envoy__Config__Core__V3__SocketAddress *sa = calloc(n ? n : 1, sizeof *sa);
  int r = COORD_ENOMEM;
  if (!lbe || !lbep || !ep || !ad || !sa)
    goto out;
  size_t k = 0;
  for (size_t i = 0; i < n; i++) {
    const xds_inst_t *in = &s->inst[i];
    if (!in->ip)
      continue;
    int dup = 0;
    for (size_t j = 0; j < i && !dup; j++)
      dup = s->inst[j].ip && s->inst[j].port == in->port && strcmp(s->inst[j].ip, in->ip) == 0;
    if (dup)
      continue;
    envoy__config__core__v3__socket_address__init(&sa[k]);
    sa[k].address = in->ip;
    sa[k].port_specifier_case = ENVOY__CONFIG__CORE__V3__SOCKET_ADDRESS__PORT_SPECIFIER_PORT_VALUE;
    sa[k].port_value = (uint32_t)in->port;
    envoy__config__core__v3__address__init(&ad[k]);
    ad[k].address_case = ENVOY__CONFIG__CORE__V3__ADDRESS__ADDRESS_SOCKET_ADDRESS;
    ad[k].socket_address = &sa[k];
    envoy__config__endpoint__v3__endpoint__init(&ep[k]);
    ep[k].address = &ad[k];
    envoy__config__endpoint__v3__lb_endpoint__init(&lbe[k]);
    lbe[k].host_identifier_case = ENVOY__CONFIG__ENDPOINT__V3__LB_ENDPOINT__HOST_IDENTIFIER_ENDPOINT;
    lbe[k].endpoint = &ep[k];
    lbe[k].health_status = ENVOY__CONFIG__CORE__V3__HEALTH_STATUS__HEALTHY;
    lbep[k] = &lbe[k];
    k++;
  }
  Envoy__Config__Core__V3__Locality loc = ENVOY__CONFIG__CORE__V3__LOCALITY__INIT;
  loc.region = "coord";
  Google__Protobuf__UInt32Value w = GOOGLE__PROTOBUF__UINT32_VALUE__INIT;
  w.value = 1;
  Envoy__Config__Endpoint__V3__LocalityLbEndpoints lle =
      ENVOY__CONFIG__ENDPOINT__V3__LOCALITY_LB_ENDPOINTS__INIT;
  lle.locality = &loc;
  lle.load_balancing_weight = &w;
  lle.n_lb_endpoints = k;
  lle.lb_endpoints = lbep;
  Envoy__Config__Endpoint__V3__LocalityLbEndpoints *lles[1] = {&lle};
  Envoy__Config__Endpoint__V3__ClusterLoadAssignment cla =
      ENVOY__CONFIG__ENDPOINT__V3__CLUSTER_LOAD_ASSIGNMENT__INIT;
  cla.cluster_name = (char *)cname;
  cla.n_endpoints = 1;
  cla.endpoints = lles;
  r = pack_any(&cla.base, EDS_TYPE, out);
out:
  free(lbe);
  free(lbep);
  free(ep);
  free(ad);
  free(sa);
  return r;
}

/* ---------------------------------------------------------------- streams (under mu) */

static void stream_free(xds_stream_t *s) {
  for (int t = 0; t < T_MAX; t++) {
    for (size_t i = 0; i < s->sub[t].n; i++)
      free(s->sub[t].names[i]);
    free(s->sub[t].names);
  }
  if (s->recv_bb)
    grpc_byte_buffer_destroy(s->recv_bb);
  if (s->send_bb)
    grpc_byte_buffer_destroy(s->send_bb);
  if (s->call)
    grpc_call_unref(s->call);
  grpc_call_details_destroy(&s->details);
  grpc_metadata_array_destroy(&s->req_md);
  grpc_slice_unref(s->st_details);
  free(s->node);
  free(s);
}

static xds_stream_t *stream_new(coord_xds_server_t *srv) {
  xds_stream_t *s = calloc(1, sizeof *s);
  if (!s)
    return NULL;
  s->srv = srv;
  grpc_call_details_init(&s->details);
  grpc_metadata_array_init(&s->req_md);
  s->st_details = grpc_empty_slice();
  xds_tag_t *tags[] = {&s->t_new, &s->t_recv, &s->t_send, &s->t_close, &s->t_finish};
  int kinds[] = {K_NEW, K_RECV, K_SEND, K_CLOSE, K_FINISH};
  for (int i = 0; i < 5; i++) {
    tags[i]->kind = kinds[i];
    tags[i]->s = s;
  }
  return s;
}

static void stream_unlink(xds_stream_t *s) {
  if (!s->listed)
    return;
  if (s->prev)
    s->prev->next = s->next;
  else
    s->srv->streams = s->next;
  if (s->next)
    s->next->prev = s->prev;
  s->listed = 0;
}

static void request_next_call(coord_xds_server_t *srv) {
  if (srv->stopping || srv->pending)
    return;
  xds_stream_t *s = stream_new(srv);
  if (!s)
    return;
  grpc_call_error e =
      grpc_server_request_call(srv->server, &s->call, &s->details, &s->req_md, srv->cq, srv->cq, &s->t_new);
  if (e != GRPC_CALL_OK) {
    xlog(srv, "grpc_server_request_call failed: %d", (int)e);
    stream_free(s);
    return;
  }
  srv->pending = s;
}

static void stream_finish(xds_stream_t *s, grpc_status_code code, const char *msg) {
  if (s->finishing || s->closed)
    return;
  s->finishing = 1;
  grpc_op ops[2];
  memset(ops, 0, sizeof ops);
  size_t n = 0;
  if (!s->md_sent) {
    ops[n].op = GRPC_OP_SEND_INITIAL_METADATA;
    n++;
    s->md_sent = 1;
  }
  grpc_slice_unref(s->st_details);
  s->st_details = grpc_slice_from_copied_string(msg ? msg : "");
  ops[n].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
  ops[n].data.send_status_from_server.status = code;
  ops[n].data.send_status_from_server.status_details = &s->st_details;
  n++;
  if (grpc_call_start_batch(s->call, ops, n, &s->t_finish, NULL) == GRPC_CALL_OK)
    s->ops++;
}

static void stream_recv(xds_stream_t *s) {
  if (s->closed || s->finishing)
    return;
  grpc_op op;
  memset(&op, 0, sizeof op);
  op.op = GRPC_OP_RECV_MESSAGE;
  op.data.recv_message.recv_message = &s->recv_bb;
  if (grpc_call_start_batch(s->call, &op, 1, &s->t_recv, NULL) == GRPC_CALL_OK)
    s->ops++;
}

/* Sends the next owed response, if no send is in flight. */
static void stream_pump(xds_stream_t *s) {
  coord_xds_server_t *srv = s->srv;
  if (s->send_inflight || s->closed || s->finishing)
    return;
  int t;
  for (t = 0; t < T_MAX; t++)
    if (s->sub[t].dirty)
      break;
  if (t == T_MAX)
    return;
  xds_sub_t *sub = &s->sub[t];
  sub->dirty = 0;
  Google__Protobuf__Any *res = calloc(sub->n ? sub->n : 1, sizeof *res);
  Google__Protobuf__Any **resp_ptrs = calloc(sub->n ? sub->n : 1, sizeof *resp_ptrs);
  size_t k = 0;
  int err = (!res || !resp_ptrs) ? COORD_ENOMEM : 0;
  for (size_t i = 0; i < sub->n && !err; i++) {
    const char *nm = sub->names[i];
    if (!*nm || !*svc_of(nm, NULL))
      continue;
    if (t == T_LDS)
      err = build_listener(nm, &res[k]);
    else if (t == T_CDS)
      err = build_cluster(nm, &res[k]);
    else
      err = build_cla(srv, nm, &res[k]);
    if (!err) {
      resp_ptrs[k] = &res[k];
      k++;
    }
  }
  if (!err) {
    snprintf(sub->version, sizeof sub->version, "%llu", (unsigned long long)++srv->version);
    snprintf(sub->nonce, sizeof sub->nonce, "%llu", (unsigned long long)++s->nonce_ctr);
    Envoy__Service__Discovery__V3__DiscoveryResponse dr =
        ENVOY__SERVICE__DISCOVERY__V3__DISCOVERY_RESPONSE__INIT;
    dr.version_info = sub->version;
    dr.type_url = (char *)type_urls[t];
    dr.nonce = sub->nonce;
    dr.n_resources = k;
    dr.resources = resp_ptrs;
    size_t len = protobuf_c_message_get_packed_size(&dr.base);
    uint8_t *buf = malloc(len ? len : 1);
    if (buf) {
      protobuf_c_message_pack(&dr.base, buf);
      s->send_bb = bb_from(buf, len);
      free(buf);
    } else {
      err = COORD_ENOMEM;
    }
  }
  for (size_t i = 0; i < k; i++)
    free(res[i].value.data);
  free(res);
  free(resp_ptrs);
  if (err) {
    xlog(srv, "cannot build %s response: %s", type_short[t], coord_strerror(err));
    stream_finish(s, GRPC_STATUS_INTERNAL, "coord xds: out of memory");
    return;
  }
  if (srv->verbose)
    xlog(srv, "stream %p: %s version %s nonce %s, %zu resources", (void *)s, type_short[t], sub->version,
         sub->nonce, k);
  grpc_op ops[2];
  memset(ops, 0, sizeof ops);
  size_t n = 0;
  if (!s->md_sent) {
    ops[n].op = GRPC_OP_SEND_INITIAL_METADATA;
    n++;
    s->md_sent = 1;
  }
  ops[n].op = GRPC_OP_SEND_MESSAGE;
  ops[n].data.send_message.send_message = s->send_bb;
  n++;
  if (grpc_call_start_batch(s->call, ops, n, &s->t_send, NULL) == GRPC_CALL_OK) {
    s->ops++;
    s->send_inflight = 1;
  } else {
    grpc_byte_buffer_destroy(s->send_bb);
    s->send_bb = NULL;
  }
}

static int names_equal(const xds_sub_t *sub, char **names, size_t n) {
  if (sub->n != n)
    return 0;
  for (size_t i = 0; i < n; i++) {
    size_t j;
    for (j = 0; j < sub->n; j++)
      if (strcmp(names[i], sub->names[j]) == 0)
        break;
    if (j == sub->n)
      return 0;
  }
  return 1;
}

static void stream_on_request(xds_stream_t *s, const Envoy__Service__Discovery__V3__DiscoveryRequest *rq) {
  coord_xds_server_t *srv = s->srv;
  if (!s->node && rq->node && rq->node->id)
    s->node = strdup(rq->node->id);
  int t;
  for (t = 0; t < T_MAX; t++)
    if (rq->type_url && strcmp(rq->type_url, type_urls[t]) == 0)
      break;
  if (t == T_MAX) {
    if (srv->verbose)
      xlog(srv, "ignoring request for type %s", rq->type_url ? rq->type_url : "");
    return;
  }
  xds_sub_t *sub = &s->sub[t];
  /* Stale: the client has not seen our latest response of this type yet
   * (a nonce before this stream's first request of the type is from an
   * earlier stream: the request is a fresh one). */
  if (sub->requested && rq->response_nonce && rq->response_nonce[0] &&
      strcmp(rq->response_nonce, sub->nonce) != 0)
    return;
  if (rq->error_detail)
    xlog(srv, "client %s NACKed %s version %s (keeping last good): %d %s", s->node ? s->node : "?",
         type_short[t], rq->version_info ? rq->version_info : "", rq->error_detail->code,
         rq->error_detail->message ? rq->error_detail->message : "");
  if (sub->requested && names_equal(sub, rq->resource_names, rq->n_resource_names))
    return; /* ACK (or NACK) of the current set: nothing owed */
  char **nn = calloc(rq->n_resource_names ? rq->n_resource_names : 1, sizeof *nn);
  if (!nn)
    return;
  for (size_t i = 0; i < rq->n_resource_names; i++)
    if (!(nn[i] = strdup(rq->resource_names[i] ? rq->resource_names[i] : ""))) {
      for (size_t j = 0; j < i; j++)
        free(nn[j]);
      free(nn);
      return;
    }
  for (size_t i = 0; i < sub->n; i++)
    free(sub->names[i]);
  free(sub->names);
  sub->names = nn;
  sub->n = rq->n_resource_names;
  sub->requested = 1;
  sub->dirty = 1;
  if (srv->verbose)
    xlog(srv, "stream %p subscribes %s to %zu names", (void *)s, type_short[t], sub->n);
  stream_pump(s);
}

/* A service's instances changed: owe EDS to every stream watching it. */
static void service_changed(coord_xds_server_t *srv, const char *name) {
  for (xds_stream_t *s = srv->streams; s; s = s->next) {
    xds_sub_t *sub = &s->sub[T_EDS];
    if (!sub->requested)
      continue;
    for (size_t i = 0; i < sub->n; i++)
      if (name == NULL || strcmp(svc_of(sub->names[i], NULL), name) == 0) {
        sub->dirty = 1;
        stream_pump(s);
        break;
      }
  }
}

/* ---------------------------------------------------------------- server thread */

static void on_event(coord_xds_server_t *srv, xds_tag_t *tag, int ok) {
  xds_stream_t *s = tag->s;
  switch (tag->kind) {
  case K_SHUTDOWN:
    srv->shutdown_done = 1;
    return;
  case K_NEW: {
    srv->pending = NULL;
    if (!ok) {
      stream_free(s);
      request_next_call(srv);
      return;
    }
    s->next = srv->streams;
    s->prev = NULL;
    if (srv->streams)
      srv->streams->prev = s;
    srv->streams = s;
    s->listed = 1;
    grpc_op op;
    memset(&op, 0, sizeof op);
    op.op = GRPC_OP_RECV_CLOSE_ON_SERVER;
    op.data.recv_close_on_server.cancelled = &s->cancelled;
    if (grpc_call_start_batch(s->call, &op, 1, &s->t_close, NULL) == GRPC_CALL_OK)
      s->ops++;
    else
      s->closed = 1;
    if (grpc_slice_str_cmp(s->details.method, ADS_METHOD) != 0) {
      stream_finish(s, GRPC_STATUS_UNIMPLEMENTED, "coord xds serves only ADS (StreamAggregatedResources)");
    } else if (srv->stopping) {
      stream_finish(s, GRPC_STATUS_UNAVAILABLE, "coord xds is stopping");
    } else {
      stream_recv(s);
    }
    request_next_call(srv);
    break;
  }
  case K_RECV: {
    s->ops--;
    grpc_byte_buffer *bb = s->recv_bb;
    s->recv_bb = NULL;
    if (!ok || !bb) {
      stream_finish(s, GRPC_STATUS_OK, NULL); /* the client closed its side */
      break;
    }
    Envoy__Service__Discovery__V3__DiscoveryRequest *rq =
        (Envoy__Service__Discovery__V3__DiscoveryRequest *)bb_unpack(
            &envoy__service__discovery__v3__discovery_request__descriptor, bb);
    grpc_byte_buffer_destroy(bb);
    if (!rq) {
      stream_finish(s, GRPC_STATUS_INVALID_ARGUMENT, "coord xds: undecodable DiscoveryRequest");
      break;
    }
    stream_on_request(s, rq);
    protobuf_c_message_free_unpacked(&rq->base, NULL);
    stream_recv(s);
    break;
  }
  case K_SEND:
    s->ops--;
    s->send_inflight = 0;
    if (s->send_bb) {
      grpc_byte_buffer_destroy(s->send_bb);
      s->send_bb = NULL;
    }
    if (ok)
      stream_pump(s);
    break;
  case K_CLOSE:
    s->ops--;
    s->closed = 1;
    break;
  case K_FINISH:
    s->ops--;
    break;
  }
  if (s && s->closed && s->ops == 0) {
    stream_unlink(s);
    stream_free(s);
  }
}

static void *server_thread(void *arg) {
  coord_xds_server_t *srv = arg;
  int cq_shut = 0;
  for (;;) {
    grpc_event ev = grpc_completion_queue_next(srv->cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL);
    if (ev.type == GRPC_QUEUE_SHUTDOWN)
      break;
    if (ev.type != GRPC_OP_COMPLETE)
      continue;
    pthread_mutex_lock(&srv->mu);
    on_event(srv, ev.tag, ev.success);
    if (srv->shutdown_done && !srv->streams && !srv->pending && !cq_shut) {
      cq_shut = 1;
      grpc_completion_queue_shutdown(srv->cq);
    }
    pthread_mutex_unlock(&srv->mu);
  }
  return NULL;
}

/* ---------------------------------------------------------------- registry feed */

/* Parses an instance document into host/port; 0 on success. */
static int parse_doc(const void *val, size_t len, char **host, int *port) {
  json_error_t je;
  json_t *doc = json_loadb(val, len, 0, &je);
  if (!doc)
    return -1;
  json_t *a = json_object_get(doc, "address"), *p = json_object_get(doc, "port");
  int ok = json_is_string(a) && json_string_length(a) > 0 && json_is_integer(p) &&
           json_integer_value(p) >= 1 && json_integer_value(p) <= 65535;
  if (ok) {
    *host = strdup(json_string_value(a));
    *port = (int)json_integer_value(p);
  }
  json_decref(doc);
  return ok && *host ? 0 : -1;
}

/* key "/services/<name>/<id>" -> name, id (malloc'd); 0 on success. */
static int parse_key(const char *key, char **name, char **id) {
  size_t pl = strlen(SERVICES_PREFIX);
  if (strncmp(key, SERVICES_PREFIX, pl) != 0)
    return -1;
  const char *n = key + pl, *slash = strchr(n, '/');
  if (!slash || slash == n || !slash[1] || strchr(slash + 1, '/'))
    return -1;
  *name = strndup(n, (size_t)(slash - n));
  *id = strdup(slash + 1);
  if (!*name || !*id) {
    free(*name);
    free(*id);
    return -1;
  }
  return 0;
}

/* Builds an instance from a PUT of key (resolving its host: may block).
 * 0 and *name, *in filled; -1 if the key is not an instance key; 1 if the
 * document is invalid (*name and in->id filled: the instance is absent). */
static int make_inst(coord_xds_server_t *srv, const char *key, const void *val, size_t len, char **name,
                     xds_inst_t *in) {
  char *host = NULL;
  int port = 0;
  memset(in, 0, sizeof *in);
  if (parse_key(key, name, &in->id) != 0)
    return -1;
  if (parse_doc(val, len, &host, &port) != 0) {
    xlog(srv, "ignoring invalid instance document at %s", key);
    return 1;
  }
  in->port = port;
  in->ip = resolve_host(host);
  in->addr = coord__sprintf(strchr(host, ':') ? "[%s]:%d" : "%s:%d", host, port);
  if (!in->ip)
    xlog(srv, "instance %s/%s: cannot resolve %s", *name, in->id, host);
  free(host);
  return 0;
}

/* Applies one watch event (PUT or DELETE) and pushes the change. */
static void apply_kv(coord_xds_server_t *srv, const char *key, const void *val, size_t len, int is_put) {
  char *name = NULL;
  xds_inst_t in;
  int rc;
  if (is_put) {
    rc = make_inst(srv, key, val, len, &name, &in);
    if (rc < 0)
      return;
    if (rc > 0)
      is_put = 0; /* an invalid document: the instance is absent */
  } else {
    memset(&in, 0, sizeof in);
    if (parse_key(key, &name, &in.id) != 0)
      return;
  }
  pthread_mutex_lock(&srv->mu);
  xds_service_t *s = svc_find(srv, name, is_put);
  int changed = 0;
  if (s && is_put)
    changed = svc_put(s, &in) == 0; /* takes in's strings */
  else if (s)
    changed = svc_del(s, in.id);
  if (changed)
    service_changed(srv, name);
  pthread_mutex_unlock(&srv->mu);
  if (!(changed && is_put))
    inst_clear(&in);
  free(name);
}

/* Replaces the whole table by a fresh Range (built aside, swapped in one
 * step, so that no stream ever sees a half-loaded table); returns the
 * Range's revision or a negative code. */
static int64_t load_snapshot(coord_xds_server_t *srv) {
  coord_range_opts_t o = {0};
  o.prefix = 1;
  coord_kv_result_t *r = NULL;
  int rc = coord_kv_get(srv->c, SERVICES_PREFIX, &o, &r);
  if (rc < 0)
    return rc;
  coord_xds_server_t tmp; /* only its service table is used */
  memset(&tmp, 0, sizeof tmp);
  for (size_t i = 0; i < r->n; i++) {
    char *name = NULL;
    xds_inst_t in;
    int mr = make_inst(srv, r->kvs[i].key, r->kvs[i].value, r->kvs[i].value_len, &name, &in);
    xds_service_t *s = mr == 0 ? svc_find(&tmp, name, 1) : NULL;
    if (!s || svc_put(s, &in) != 0)
      inst_clear(&in);
    free(name);
  }
  int64_t rev = r->revision;
  coord_kv_result_free(r);
  pthread_mutex_lock(&srv->mu);
  xds_service_t *old = srv->services;
  srv->services = tmp.services;
  tmp.services = old;
  service_changed(srv, NULL);
  pthread_mutex_unlock(&srv->mu);
  svc_free_all(&tmp);
  return rev;
}

static int feed_stopped(coord_xds_server_t *srv, int wait_ms) {
  struct pollfd p = {.fd = srv->stop_fd, .events = POLLIN};
  return poll(&p, 1, wait_ms) > 0;
}

static void *feed_thread(void *arg) {
  coord_xds_server_t *srv = arg;
  int64_t rev = srv->start_rev;
  int failures = 0;
  coord_watch_t *w = NULL;
  while (!feed_stopped(srv, 0)) {
    if (!w) {
      if (rev < 0)
        rev = load_snapshot(srv);
      if (rev >= 0) {
        coord_watch_opts_t wo = {0};
        wo.prefix = 1;
        wo.start_revision = rev + 1;
        if (coord_watch_create(srv->c, SERVICES_PREFIX, &wo, &w) < 0)
          w = NULL;
      }
      if (!w) {
        xlog(srv, "registry feed: %s; retrying", coord_last_error());
        rev = -1;
        if (feed_stopped(srv, (int)coord__backoff_ms(srv->c, ++failures)))
          break;
        continue;
      }
      failures = 0;
    }
    struct pollfd p[2] = {{.fd = srv->stop_fd, .events = POLLIN},
                          {.fd = coord_watch_fd(w), .events = POLLIN}};
    if (poll(p, 2, 1000) < 0 && errno != EINTR)
      break;
    if (p[0].revents)
      break;
    for (;;) {
      coord_event_t *ev = NULL;
      int rc = coord_watch_next(w, 1, &ev);
      if (rc == COORD_ETIMEDOUT)
        break;
      if (rc < 0) {
        xlog(srv, "registry watch ended (%s: %s); reloading", coord_strerror(rc), coord_last_error());
        coord_watch_close(w);
        w = NULL;
        rev = -1;
        break;
      }
      apply_kv(srv, ev->kv.key, ev->kv.value, ev->kv.value_len, ev->type == COORD_EVENT_PUT);
      coord_event_free(ev);
    }
  }
  if (w)
    coord_watch_close(w);
  return NULL;
}

/* ---------------------------------------------------------------- public: server */

int coord_xds_server_start(coord_t *c, const char *addr, coord_xds_server_t **out) {
  if (!c || !addr || !out)
    return coord__err(COORD_EINVAL, "coord_xds_server_start: NULL argument");
  coord_xds_server_t *srv = calloc(1, sizeof *srv);
  if (!srv)
    return coord__err(COORD_ENOMEM, "out of memory");
  srv->c = c;
  srv->verbose = getenv("COORD_XDS_VERBOSE") != NULL;
  srv->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  pthread_mutex_init(&srv->mu, NULL);
  srv->t_shutdown.kind = K_SHUTDOWN;
  if (srv->stop_fd < 0) {
    free(srv);
    return coord__err(COORD_EIO, "eventfd: %s", strerror(errno));
  }
  /* A first snapshot before serving, so that the first answers are right. */
  int64_t rev = load_snapshot(srv);
  srv->start_rev = rev;
  if (rev < 0) {
    int rc = (int)rev;
    close(srv->stop_fd);
    pthread_mutex_destroy(&srv->mu);
    free(srv);
    return rc;
  }
  grpc_init();
  srv->cq = grpc_completion_queue_create_for_next(NULL);
  srv->server = grpc_server_create(NULL, NULL);
  grpc_server_register_completion_queue(srv->server, srv->cq, NULL);
  grpc_server_credentials *creds = grpc_insecure_server_credentials_create();
  srv->port = grpc_server_add_http2_port(srv->server, addr, creds);
  grpc_server_credentials_release(creds);
  if (srv->port <= 0) {
    grpc_server_destroy(srv->server);
    grpc_completion_queue_shutdown(srv->cq);
    while (grpc_completion_queue_next(srv->cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL).type !=
           GRPC_QUEUE_SHUTDOWN)
      ;
    grpc_completion_queue_destroy(srv->cq);
    grpc_shutdown();
    pthread_mutex_lock(&srv->mu);
    svc_free_all(srv);
    pthread_mutex_unlock(&srv->mu);
    close(srv->stop_fd);
    pthread_mutex_destroy(&srv->mu);
    free(srv);
    return coord__err(COORD_EIO, "xds server: cannot listen on %s", addr);
  }
  grpc_server_start(srv->server);
  pthread_mutex_lock(&srv->mu);
  request_next_call(srv);
  pthread_mutex_unlock(&srv->mu);
  /* The feed watches from the snapshot's revision + 1. */
  if (pthread_create(&srv->thread, NULL, server_thread, srv) == 0)
    srv->thread_started = 1;
  if (pthread_create(&srv->feed, NULL, feed_thread, srv) == 0)
    srv->feed_started = 1;
  if (!srv->thread_started || !srv->feed_started) {
    coord_xds_server_stop(srv);
    return coord__err(COORD_ENOMEM, "xds server: cannot start threads");
  }
  *out = srv;
  return 0;
}

int coord_xds_server_port(const coord_xds_server_t *s) {
  return s ? s->port : -1;
}

void coord_xds_server_stop(coord_xds_server_t *srv) {
  if (!srv)
    return;
  uint64_t one = 1;
  if (write(srv->stop_fd, &one, sizeof one) < 0) {
    /* cannot happen with an eventfd below its maximum */
  }
  if (srv->feed_started)
    pthread_join(srv->feed, NULL);
  pthread_mutex_lock(&srv->mu);
  srv->stopping = 1;
  grpc_server_shutdown_and_notify(srv->server, srv->cq, &srv->t_shutdown);
  grpc_server_cancel_all_calls(srv->server);
  pthread_mutex_unlock(&srv->mu);
  if (srv->thread_started) {
    pthread_join(srv->thread, NULL);
  } else {
    grpc_completion_queue_shutdown(srv->cq);
    while (grpc_completion_queue_next(srv->cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL).type !=
           GRPC_QUEUE_SHUTDOWN)
      ;
  }
  grpc_server_destroy(srv->server);
  grpc_completion_queue_destroy(srv->cq);
  grpc_shutdown();
  svc_free_all(srv);
  close(srv->stop_fd);
  pthread_mutex_destroy(&srv->mu);
  free(srv);
}

char *coord_xds_bootstrap_json(const char *server_uri) {
  if (!server_uri)
    return NULL;
  json_t *j = json_pack("{s:[{s:s, s:[{s:s}], s:[s]}], s:{s:s, s:s, s:{}}}", "xds_servers", "server_uri",
                        server_uri, "channel_creds", "type", "insecure", "server_features", "xds_v3", "node",
                        "id", "coord-client", "cluster", "coord", "locality");
  if (!j)
    return NULL;
  char *s = json_dumps(j, JSON_COMPACT);
  json_decref(j);
  return s;
}

/* ---------------------------------------------------------------- public: get_connection */

typedef struct coord_resolver_state {
  pthread_mutex_t mu;
  coord_xds_server_t *srv; /* started on first use */
} resolver_state_t;

/* The process environment: which server the bootstrap points at. */
static pthread_mutex_t g_env_mu = PTHREAD_MUTEX_INITIALIZER;
static coord_xds_server_t *g_env_owner;

static void *resolver_state_new(coord_t *c) {
  COORD_UNUSED(c);
  resolver_state_t *st = calloc(1, sizeof *st);
  if (st)
    pthread_mutex_init(&st->mu, NULL);
  return st;
}

static int valid_name(const char *name) {
  return name && *name && !strchr(name, '/') && strlen(name) < 512;
}

/* Starts the in-process server and owns the process bootstrap. */
static int ensure_server(coord_t *c, resolver_state_t *st) {
  if (st->srv)
    return 0;
  pthread_mutex_lock(&g_env_mu);
  if (g_env_owner) {
    pthread_mutex_unlock(&g_env_mu);
    return coord__err(COORD_EEXIST,
                      "this process's gRPC xDS bootstrap already points at the resolver of another "
                      "coord client; use that client's get_connection");
  }
  if (getenv("GRPC_XDS_BOOTSTRAP") || getenv("GRPC_XDS_BOOTSTRAP_CONFIG")) {
    pthread_mutex_unlock(&g_env_mu);
    return coord__err(COORD_EEXIST,
                      "the process already has an xDS bootstrap of its own (GRPC_XDS_BOOTSTRAP or "
                      "GRPC_XDS_BOOTSTRAP_CONFIG is set); coord will not override it: use "
                      "coord_registry_resolve, or point that bootstrap at coord-xds");
  }
  coord_xds_server_t *srv = NULL;
  int rc = coord_xds_server_start(c, "127.0.0.1:0", &srv);
  if (rc < 0) {
    pthread_mutex_unlock(&g_env_mu);
    return rc;
  }
  char uri[64];
  snprintf(uri, sizeof uri, "127.0.0.1:%d", srv->port);
  char *boot = coord_xds_bootstrap_json(uri);
  if (!boot) {
    pthread_mutex_unlock(&g_env_mu);
    coord_xds_server_stop(srv);
    return coord__err(COORD_ENOMEM, "out of memory");
  }
  setenv("GRPC_XDS_BOOTSTRAP_CONFIG", boot, 1);
  free(boot);
  /* pick_first through Cluster.load_balancing_policy needs this in 1.51. */
  setenv("GRPC_EXPERIMENTAL_XDS_CUSTOM_LB_CONFIG", "true", 0);
  g_env_owner = srv;
  pthread_mutex_unlock(&g_env_mu);
  st->srv = srv;
  return 0;
}

int coord_registry_get_connection_lb(coord_t *c, const char *name, coord_lb_policy_t lb,
                                     struct grpc_channel **out) {
  if (!c || !out || !valid_name(name))
    return coord__err(COORD_EINVAL, "get_connection: a service name without '/' is required");
  if (lb != COORD_LB_ROUND_ROBIN && lb != COORD_LB_PICK_FIRST)
    return coord__err(COORD_EINVAL, "get_connection: unknown lb policy %d", (int)lb);
  if (coord__closing(c))
    return coord__err(COORD_ECLOSED, "client closed");
  resolver_state_t *st = coord__slot(c, COORD__SLOT_RESOLVER, resolver_state_new);
  if (!st)
    return coord__err(COORD_ENOMEM, "out of memory");
  pthread_mutex_lock(&st->mu);
  int rc = ensure_server(c, st);
  pthread_mutex_unlock(&st->mu);
  if (rc < 0)
    return rc;
  char *target = coord__sprintf("xds:///%s%s", lb == COORD_LB_PICK_FIRST ? PICK_FIRST_PREFIX : "", name);
  if (!target)
    return coord__err(COORD_ENOMEM, "out of memory");
  grpc_arg args[1];
  args[0].type = GRPC_ARG_STRING;
  args[0].key = GRPC_ARG_DEFAULT_AUTHORITY;
  args[0].value.string = (char *)name;
  grpc_channel_args ca = {1, args};
  grpc_channel_credentials *creds = grpc_insecure_credentials_create();
  grpc_channel *ch = grpc_channel_create(target, creds, &ca);
  grpc_channel_credentials_release(creds);
  free(target);
  if (!ch)
    return coord__err(COORD_EIO, "grpc_channel_create failed");
  *out = ch;
  return 0;
}

int coord_registry_get_connection(coord_t *c, const char *name, struct grpc_channel **out) {
  return coord_registry_get_connection_lb(c, name, COORD_LB_ROUND_ROBIN, out);
}

void coord__resolver_close(coord_t *c) {
  resolver_state_t *st = coord__slot_get(c, COORD__SLOT_RESOLVER);
  if (!st)
    return;
  pthread_mutex_lock(&st->mu);
  coord_xds_server_t *srv = st->srv;
  st->srv = NULL;
  pthread_mutex_unlock(&st->mu);
  if (srv) {
    pthread_mutex_lock(&g_env_mu);
    if (g_env_owner == srv) {
      g_env_owner = NULL;
      unsetenv("GRPC_XDS_BOOTSTRAP_CONFIG");
    }
    pthread_mutex_unlock(&g_env_mu);
    coord_xds_server_stop(srv);
  }
  /* The slot itself is freed with the client (st stays valid until then);
   * free it here since nothing else owns it. */
  pthread_mutex_destroy(&st->mu);
  free(st);
}

/* ---------------------------------------------------------------- public: resolve */

void coord_resolution_clear(coord_resolution_t *r) {
  if (!r)
    return;
  for (size_t i = 0; i < r->n; i++)
    free(r->addresses[i]);
  free(r->addresses);
  free(r->target);
  free(r->service_config);
  memset(r, 0, sizeof *r);
}

int coord_registry_resolve(coord_t *c, const char *name, coord_resolution_t *out) {
  if (!c || !out || !valid_name(name))
    return coord__err(COORD_EINVAL, "resolve: a service name without '/' is required");
  memset(out, 0, sizeof *out);
  char *prefix = coord__sprintf(SERVICES_PREFIX "%s/", name);
  if (!prefix)
    return coord__err(COORD_ENOMEM, "out of memory");
  coord_range_opts_t o = {0};
  o.prefix = 1;
  coord_kv_result_t *r = NULL;
  int rc = coord_kv_get(c, prefix, &o, &r);
  free(prefix);
  if (rc < 0)
    return rc;
  out->addresses = calloc(r->n ? r->n : 1, sizeof *out->addresses);
  out->service_config = strdup("{\"loadBalancingConfig\":[{\"round_robin\":{}}]}");
  size_t tcap = 64;
  char *t4 = malloc(tcap), *t6 = malloc(tcap);
  size_t l4 = 0, l6 = 0, c4 = tcap, c6 = tcap;
  if (!out->addresses || !out->service_config || !t4 || !t6) {
    free(t4);
    free(t6);
    coord_kv_result_free(r);
    coord_resolution_clear(out);
    return coord__err(COORD_ENOMEM, "out of memory");
  }
  t4[0] = t6[0] = 0;
  for (size_t i = 0; i < r->n; i++) {
    char *host = NULL;
    int port = 0;
    if (parse_doc(r->kvs[i].value, r->kvs[i].value_len, &host, &port) != 0)
      continue;
    out->addresses[out->n++] = coord__sprintf(strchr(host, ':') ? "[%s]:%d" : "%s:%d", host, port);
    char *ip = resolve_host(host);
    free(host);
    if (!ip)
      continue;
    int v6 = strchr(ip, ':') != NULL;
    char item[INET6_ADDRSTRLEN + 16];
    snprintf(item, sizeof item, v6 ? "[%s]:%d" : "%s:%d", ip, port);
    free(ip);
    char **t = v6 ? &t6 : &t4;
    size_t *l = v6 ? &l6 : &l4, *cp = v6 ? &c6 : &c4;
    size_t need = *l + strlen(item) + 2;
    if (need > *cp) {
      char *nt = realloc(*t, need * 2);
      if (!nt)
        continue;
      *t = nt;
      *cp = need * 2;
    }
    *l += (size_t)sprintf(*t + *l, "%s%s", *l ? "," : "", item);
  }
  coord_kv_result_free(r);
  /* One scheme per target: IPv4 if there is any IPv4 address, else IPv6. */
  if (l4)
    out->target = coord__sprintf("ipv4:%s", t4);
  else if (l6)
    out->target = coord__sprintf("ipv6:%s", t6);
  free(t4);
  free(t6);
  return 0;
}
