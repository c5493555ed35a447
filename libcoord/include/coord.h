/*
 * coord.h — the one public header of libcoord.
 *
 * libcoord is distributed coordination on etcd v3: a client core (KV, leases,
 * watches, auth, failover) and on top of it distributed locks, a service
 * registry and a configuration centre.  Every handle is opaque.  Every
 * function that can fail returns 0 or a negative COORD_E* code;
 * coord_strerror() names the code and coord_last_error() gives a
 * thread-local sentence saying what failed.  Every blocking call takes a
 * timeout in milliseconds: 0 means the client's configured default,
 * -1 means wait for ever (coord_watch_next alone reads 0 as "do not wait").
 *
 * Threads: a coord_t may be used from any number of threads at once.  Each
 * coord_t runs one internal event thread; callbacks documented as "called on
 * the event thread" must not block (no blocking libcoord call from inside
 * them: start an asynchronous one instead).
 *
 * Keys: C strings, relative to the configured namespace prefix (the prefix is
 * added on the way out and removed from every key handed back).  Values are
 * byte strings (pointer + length) and may hold any byte, NUL included.
 */
#ifndef COORD_H
#define COORD_H

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define COORD_VERSION_MAJOR 0
#define COORD_VERSION_MINOR 1
#define COORD_VERSION_PATCH 0

/* ---------------------------------------------------------------- errors */

#define COORD_OK 0
#define COORD_EINVAL (-1)       /* invalid argument */
#define COORD_ENOMEM (-2)       /* out of memory */
#define COORD_EUNAVAILABLE (-3) /* no etcd endpoint answered */
#define COORD_ETIMEDOUT (-4)    /* the call's timeout ran out */
#define COORD_EACCES (-5)       /* etcd denied permission */
#define COORD_EAUTH (-6)        /* authentication failed */
#define COORD_ENOTFOUND (-7)    /* no such key */
#define COORD_ELOCKED (-8)      /* lock held by someone else */
#define COORD_ECONFLICT (-9)    /* a compare failed: someone else wrote */
#define COORD_ETOOBIG (-10)     /* request larger than etcd accepts */
#define COORD_ELOST (-11)       /* lock or lease lost */
#define COORD_ECANCELED (-12)   /* cancelled by the caller */
#define COORD_ECOMPACTED (-13)  /* revision compacted away */
#define COORD_ECLOSED (-14)     /* handle or client closed */
#define COORD_ENOTSUP (-15)     /* not supported */
#define COORD_EPROTO (-16)      /* unexpected answer from etcd */
#define COORD_EFORMAT (-17)     /* value is not of the expected form */
#define COORD_EIO (-18)         /* other etcd or transport error */
#define COORD_EEXIST (-19)      /* already exists */
#define COORD_ETLS (-20)        /* TLS files unreadable or rejected */

/* A short, static, human sentence for a COORD_E* code. */
const char *coord_strerror(int err);
/* Detail of the last error raised on this thread ("" if none). */
const char *coord_last_error(void);

/* ---------------------------------------------------------------- client */

typedef struct coord_s coord_t;

typedef struct coord_retry {
  int max_attempts;     /* total attempts per call, >= 1 (default 5) */
  int initial_delay_ms; /* first back-off (default 50) */
  int max_delay_ms;     /* back-off cap (default 1000) */
  double multiplier;    /* growth per attempt (default 2.0); jitter +-20% */
} coord_retry_t;

typedef struct coord_config {
  /* Comma-separated endpoints: "host:port", "http://host:port" or
   * "https://host:port".  NULL: $COORD_ENDPOINTS, else "localhost:2379". */
  const char *endpoints;
  const char *username; /* NULL: no auth */
  const char *password;
  const char *ca_file;   /* PEM CA bundle; enables TLS */
  const char *cert_file; /* PEM client certificate (needs key_file) */
  const char *key_file;  /* PEM client key */
  const char *prefix;    /* namespace prefix before every key ("" none) */
  int timeout_ms;        /* default deadline of each call (default 5000) */
  int dial_timeout_ms;   /* coord_new waits this long for etcd (5000) */
  coord_retry_t retry;
} coord_config_t;

coord_config_t coord_default_config(void);
/* Connects and checks that etcd answers (and authenticates) within
 * dial_timeout_ms.  cfg NULL: coord_default_config(). */
int coord_new(const coord_config_t *cfg, coord_t **out);
/* Cancels watches, revokes every lease this client holds (locks released,
 * registrations removed), stops the event thread and frees everything. */
void coord_close(coord_t *c);

/* Status of the cluster as seen from the endpoint in use. */
typedef struct coord_status {
  char endpoint[256]; /* endpoint answering now */
  uint64_t cluster_id;
  uint64_t member_id;
  uint64_t leader;
  int64_t revision;
  uint64_t raft_term;
  char version[32];
  int connected; /* 1 if the last call reached etcd */
} coord_status_t;
int coord_status(coord_t *c, int timeout_ms, coord_status_t *out);

/* ---------------------------------------------------------------- KV */

typedef struct coord_kv {
  char *key; /* without namespace prefix, NUL-terminated */
  size_t key_len;
  void *value; /* NUL-terminated for convenience; value_len excludes it */
  size_t value_len;
  int64_t create_revision;
  int64_t mod_revision;
  int64_t version;
  int64_t lease;
} coord_kv_t;

typedef struct coord_kv_result {
  int64_t revision; /* store revision when the request was served */
  int64_t count;    /* range: keys matched; delete: keys deleted */
  int more;         /* range: more keys beyond the limit */
  size_t n;         /* entries in kvs */
  coord_kv_t *kvs;  /* range: the keys; put/delete: previous kvs if asked */
} coord_kv_result_t;
void coord_kv_result_free(coord_kv_result_t *r);

typedef enum { COORD_SORT_NONE = 0, COORD_SORT_ASCEND = 1, COORD_SORT_DESCEND = 2 } coord_sort_order_t;
typedef enum {
  COORD_SORT_KEY = 0,
  COORD_SORT_VERSION = 1,
  COORD_SORT_CREATE = 2,
  COORD_SORT_MOD = 3,
  COORD_SORT_VALUE = 4
} coord_sort_target_t;

typedef struct coord_range_opts {
  int prefix;            /* every key starting with key */
  const char *range_end; /* or [key, range_end) (ignored if prefix) */
  int64_t limit;         /* 0: no limit */
  int64_t revision;      /* 0: latest */
  coord_sort_order_t sort_order;
  coord_sort_target_t sort_target;
  int keys_only;
  int count_only;
  int serializable; /* may be served by a member without the leader */
  int prev_kv;      /* delete: return the deleted kvs */
  int timeout_ms;   /* 0: client default */
} coord_range_opts_t;

typedef struct coord_put_opts {
  int64_t lease;
  int prev_kv;
  int timeout_ms;
} coord_put_opts_t;

int coord_kv_get(coord_t *c, const char *key, const coord_range_opts_t *opts, coord_kv_result_t **out);
int coord_kv_put(coord_t *c, const char *key, const void *value, size_t len, const coord_put_opts_t *opts,
                 coord_kv_result_t **out /* may be NULL */);
int coord_kv_delete(coord_t *c, const char *key, const coord_range_opts_t *opts,
                    coord_kv_result_t **out /* may be NULL */);
/* Compacts the store up to rev (used by tests and tools). */
int coord_kv_compact(coord_t *c, int64_t rev, int timeout_ms);

typedef enum {
  COORD_CMP_VERSION = 0,
  COORD_CMP_CREATE = 1,
  COORD_CMP_MOD = 2,
  COORD_CMP_VALUE = 3,
  COORD_CMP_LEASE = 4
} coord_cmp_target_t;
typedef enum {
  COORD_CMP_EQUAL = 0,
  COORD_CMP_GREATER = 1,
  COORD_CMP_LESS = 2,
  COORD_CMP_NOT_EQUAL = 3
} coord_cmp_result_t;

typedef struct coord_cmp {
  const char *key;
  coord_cmp_target_t target;
  coord_cmp_result_t result;
  int64_t number;    /* version, create/mod revision or lease */
  const void *value; /* COORD_CMP_VALUE */
  size_t value_len;
} coord_cmp_t;

typedef enum { COORD_OP_RANGE = 0, COORD_OP_PUT = 1, COORD_OP_DELETE = 2 } coord_op_type_t;
typedef struct coord_op {
  coord_op_type_t type;
  const char *key;
  const void *value; /* put */
  size_t value_len;
  int64_t lease; /* put */
  int prefix;    /* range/delete */
  int64_t limit; /* range */
  int prev_kv;   /* put/delete */
  coord_sort_order_t sort_order;
  coord_sort_target_t sort_target;
} coord_op_t;

typedef struct coord_txn {
  const coord_cmp_t *cmp;
  size_t ncmp;
  const coord_op_t *success;
  size_t nsuccess;
  const coord_op_t *failure;
  size_t nfailure;
  int timeout_ms;
} coord_txn_t;

typedef struct coord_txn_result {
  int64_t revision;
  int succeeded;
  size_t n;                      /* one per executed op */
  coord_kv_result_t **responses; /* each as for get/put/delete */
} coord_txn_result_t;
void coord_txn_result_free(coord_txn_result_t *r);
/* Txns are never retried after a timeout (they may have committed). */
int coord_kv_txn(coord_t *c, const coord_txn_t *txn, coord_txn_result_t **out);

/* ---------------------------------------------------------------- leases */

/* TTLs are in milliseconds and rounded UP to etcd's whole seconds (1 ms is
 * 1 s).  etcd may raise a TTL to its own minimum (about 2 s with default
 * election settings); coord_lease_ttl reports the TTL actually granted. */
int coord_lease_grant(coord_t *c, int64_t ttl_ms, int64_t *id);
int coord_lease_revoke(coord_t *c, int64_t id);
/* remaining and granted TTL in ms; COORD_ENOTFOUND if expired/unknown. */
int coord_lease_ttl(coord_t *c, int64_t id, int64_t *remaining_ms, int64_t *granted_ms);
/* Keep the lease alive on the client's one KeepAlive stream (renewed at
 * TTL/3) until coord_lease_keepalive_stop, coord_lease_revoke or close.
 * lost (may be NULL) is called once on the event thread if etcd reports the
 * lease gone.  Once coord_lease_keepalive_stop or coord_lease_revoke of the
 * lease has returned, lost is not running and will not be called, so arg
 * may be freed (from inside a callback, lost may be the one running).  They
 * wait for a lost callback in progress: do not call them holding a lock
 * that lost takes. */
typedef void (*coord_lease_lost_cb)(int64_t id, void *arg);
int coord_lease_keepalive(coord_t *c, int64_t id, coord_lease_lost_cb lost, void *arg);
int coord_lease_keepalive_stop(coord_t *c, int64_t id);
/* Until when is a lease this client keeps alive certainly alive?  Answered
 * locally, without a round trip: *ms_left is the time from now to the send
 * time of the last renewal etcd answered plus the TTL of that answer (etcd
 * renewed it later than we sent, so the lease lives at least that long
 * unless it is revoked; the lease's clock and ours are assumed to run at
 * the same rate).  While renewals succeed *ms_left stays above about 2/3
 * of the TTL; when they fail (etcd cut off, or slow) it runs down, and at 0
 * the lease is given up locally and its lost callback runs.  <= 0: etcd may
 * already have let it go.  *ttl_ms (may be NULL) is the TTL etcd granted
 * in its last answer (0 if none yet).  Returns 0; COORD_ENOTFOUND if the
 * lease is not kept alive by this client (never was, stopped, revoked or
 * lost); COORD_EUNAVAILABLE if no renewal has been answered yet (a lease
 * given to coord_lease_keepalive: its first renewal is sent at once).
 * Never blocks: any thread may call it as often as it likes, callbacks
 * included.  Revocation by someone else is not foreseen here: it comes as
 * the lost callback. */
int coord_lease_deadline(coord_t *c, int64_t id, int64_t *ms_left, int64_t *ttl_ms);

/* ---------------------------------------------------------------- watches */

typedef struct coord_watch_s coord_watch_t;

typedef enum { COORD_EVENT_PUT = 0, COORD_EVENT_DELETE = 1 } coord_event_type_t;

typedef struct coord_event {
  coord_event_type_t type;
  coord_kv_t kv;    /* key (no namespace), value (PUT), revisions */
  int64_t revision; /* revision of the change (== kv.mod_revision) */
  /* filled by registry and config watches (NULL otherwise): */
  char *name;   /* config: key below /config/; registry: service name */
  char *id;     /* registry: instance id */
  json_t *json; /* config value or instance document; NULL on DELETE */
} coord_event_t;
void coord_event_free(coord_event_t *ev);

typedef struct coord_watch_opts {
  int prefix;             /* watch every key starting with key */
  int64_t start_revision; /* 0: from now */
  int with_current;       /* first emit the current keys as PUT events */
} coord_watch_opts_t;

/* A watch never loses or repeats an event: across reconnects it resumes from
 * the last revision + 1; if that was compacted it re-reads and emits the
 * difference (PUTs for changed keys, DELETEs for vanished ones).  Without a
 * start revision it starts at the revision current when the call returns
 * (one round trip): every later change is delivered. */
int coord_watch_create(coord_t *c, const char *key, const coord_watch_opts_t *opts, coord_watch_t **out);
/* Readable (POLLIN) while events are pending. */
int coord_watch_fd(coord_watch_t *w);
/* Next event: 0 and *ev (free with coord_event_free), COORD_ETIMEDOUT if none
 * came in time (timeout_ms 0: do not wait, -1: wait for ever),
 * COORD_ECLOSED after coord_close, or the error that ended the watch. */
int coord_watch_next(coord_watch_t *w, int timeout_ms, coord_event_t **ev);
void coord_watch_close(coord_watch_t *w);

/* ---------------------------------------------------------------- locks */

/* Key layout and algorithm of etcd's concurrency.Mutex: the holder key is
 * /locks/<name>/<lease id in hex>; the lowest create revision holds.  A lock
 * taken here excludes `etcdctl lock /locks/<name>` and the reverse.
 * ttl_ms: 0 means COORD_LOCK_DEFAULT_TTL_MS; otherwise rounded up to whole
 * seconds as for leases.  Names may not contain '/' and may not be empty. */
#define COORD_LOCK_DEFAULT_TTL_MS 10000

typedef struct coord_lock_s coord_lock_t;

int coord_lock_acquire(coord_t *c, const char *name, int64_t ttl_ms, int timeout_ms, coord_lock_t **out);
/* COORD_ELOCKED at once if someone holds it (no key is left behind). */
int coord_lock_try_acquire(coord_t *c, const char *name, int64_t ttl_ms, coord_lock_t **out);

/* Asynchronous acquire.  Returns at once with a pending handle; cb is called
 * exactly once on the event thread: status 0 when held, a negative code when
 * it failed, COORD_ECANCELED after coord_lock_cancel.  The handle is always
 * ended with coord_lock_unlock (also after a failure). */
typedef void (*coord_lock_cb)(coord_lock_t *lock, int status, void *arg);
int coord_lock_acquire_async(coord_t *c, const char *name, int64_t ttl_ms, coord_lock_cb cb, void *arg,
                             coord_lock_t **out);
/* Withdraw a pending acquire: its key is deleted at once.  No-op if held. */
void coord_lock_cancel(coord_lock_t *lock);

/* Releases (deletes the key) and frees the handle, in any state.  Returns
 * COORD_ELOST if the lock had been lost meanwhile. A pending acquire is
 * cancelled, and its callback is not called after this returns. */
int coord_lock_unlock(coord_lock_t *lock);
int coord_lock_ttl(coord_lock_t *lock, int64_t *remaining_ms);
/* Full key, no namespace; NULL until a lease is assigned.  A retry with a
 * fresh lease gives a new key; every string returned stays valid until
 * coord_lock_unlock. */
const char *coord_lock_key(coord_lock_t *lock);
int64_t coord_lock_token(coord_lock_t *lock); /* fencing: create revision */
/* coord_lease_deadline of the lock's lease: how long the lock is certainly
 * still held (*ms_left, ms from now; <= 0: it may be lost already) and the
 * TTL granted (*ttl_ms, may be NULL; 0 if not known yet), with no round
 * trip.  A holder that must stop before anyone else can get the lock
 * (coord-lock(1) kills its command) acts while *ms_left is still well
 * above 0.  Returns 0 while held (and while queued, for the place in the
 * queue), COORD_ELOST once lost (or once its lease was given up locally),
 * COORD_ENOTFOUND while still waiting for a lease, the failure code after
 * a failed acquire, COORD_EINVAL when NULL or released.  Never blocks;
 * callable from any thread, the lock's own callbacks included. */
int coord_lock_deadline(coord_lock_t *lock, int64_t *ms_left, int64_t *ttl_ms);
/* 0 while held, COORD_ELOST once lost, 1 while still waiting. */
int coord_lock_state(coord_lock_t *lock);
/* Called once on the event thread when a held lock is lost (lease expired
 * or revoked, or its key deleted). */
typedef void (*coord_lock_lost_cb)(coord_lock_t *lock, void *arg);
void coord_lock_on_lost(coord_lock_t *lock, coord_lock_lost_cb cb, void *arg);
/* Replaces the holder note (value of the holder key) while held. */
int coord_lock_set_note(coord_lock_t *lock, const void *note, size_t len);

/* ---------------------------------------------------------------- registry */

/* Instance document at /services/<name>/<id>:
 * {"id","name","address","port","metadata"} attached to a lease. */
typedef struct coord_service {
  char *id;
  char *name;
  char *address;
  int port;         /* 1..65535 */
  json_t *metadata; /* object or NULL */
} coord_service_t;

/* Register (or replace) an instance; kept alive, and registered again by
 * itself if its lease is ever lost.  ttl_ms 0: 10 s. */
int coord_registry_register(coord_t *c, const coord_service_t *svc, int64_t ttl_ms);
/* An instance this client registered: its lease is revoked (the key goes
 * with it, unless another client has put it since).  Any other instance:
 * its key is deleted.  COORD_ENOTFOUND if there was none. */
int coord_registry_unregister(coord_t *c, const char *name, const char *id);
/* Every instance of name with a valid document, sorted by id, name and id
 * filled from the key (none: 0, *out NULL, *n 0).  Free with
 * coord_service_list_free. */
int coord_registry_discover(coord_t *c, const char *name, coord_service_t **out, size_t *n);
void coord_service_list_free(coord_service_t *list, size_t n);
/* Events carry name, id and json (the document, with id and name filled
 * from the key). name NULL: every service.  A PUT whose document is invalid
 * is reported as a DELETE of that instance. */
int coord_registry_watch(coord_t *c, const char *name, int with_current, coord_watch_t **out);

/* Parse / build the instance document.  Parse checks: object, "address" a
 * non-empty string, "port" an integer 1..65535, optional "id"/"name" strings,
 * optional "metadata" object. */
int coord_service_from_json(const json_t *doc, coord_service_t *out);
/* The same for a document found at /services/<name>/<id>: "name" and "id",
 * if present, must equal name and id (either may be NULL: no check), and
 * out->name / out->id are taken from the path when the document has none. */
int coord_service_from_json_at(const json_t *doc, const char *name, const char *id, coord_service_t *out);
json_t *coord_service_to_json(const coord_service_t *svc);
void coord_service_clear(coord_service_t *svc);

struct grpc_channel;
typedef enum { COORD_LB_ROUND_ROBIN = 0, COORD_LB_PICK_FIRST = 1 } coord_lb_policy_t;
/* A channel to xds:///<name> that follows the registry (see the resolver). */
int coord_registry_get_connection(coord_t *c, const char *name, struct grpc_channel **out);
int coord_registry_get_connection_lb(coord_t *c, const char *name, coord_lb_policy_t lb,
                                     struct grpc_channel **out);

/* ---------------------------------------------------------------- resolver */

/* The resolver is an xDS (ADS, state of the world, v3) server fed by the
 * registry: gRPC's built-in xDS client resolves xds:///<name> through it and
 * follows every change without reconnecting.
 *
 * coord_registry_get_connection starts one such server in-process on
 * 127.0.0.1 (a free port) the first time it is called and points the
 * process's gRPC at it by setting GRPC_XDS_BOOTSTRAP_CONFIG (and
 * GRPC_EXPERIMENTAL_XDS_CUSTOM_LB_CONFIG=true, which pick_first needs in
 * gRPC 1.51).  If the process already has GRPC_XDS_BOOTSTRAP or
 * GRPC_XDS_BOOTSTRAP_CONFIG of its own, it fails with COORD_EEXIST instead
 * of overriding it; one coord_t per process owns the bootstrap at a time
 * (another client's get_connection fails with COORD_EEXIST until the owner
 * is closed; gRPC reads the bootstrap only when its process-wide xDS client
 * is created, so destroy the old owner's channels first).  Round robin is
 * the default; COORD_LB_PICK_FIRST
 * resolves xds:///pick_first/<name> (authority <name>).  The channel
 * belongs to the caller (grpc_channel_destroy).
 *
 * Resource names served: Listener "<name>" (or "pick_first/<name>") with an
 * inline route to Cluster of the same name, an EDS Cluster over ADS, and its
 * ClusterLoadAssignment: one locality (weight 1) with every registered
 * instance of <name>, HEALTHY.  Any requested name is served; a service
 * with no instances has an empty locality (calls fail with UNAVAILABLE). */

typedef struct coord_xds_server_s coord_xds_server_t;

/* Starts an xDS server on addr ("host:port"; port 0 picks a free one) that
 * serves c's registry.  Runs its own thread and completion queue. */
int coord_xds_server_start(coord_t *c, const char *addr, coord_xds_server_t **out);
/* The port it listens on. */
int coord_xds_server_port(const coord_xds_server_t *s);
/* Stops it (streams are cancelled) and frees it.  Stop every server of a
 * client before coord_close(c). */
void coord_xds_server_stop(coord_xds_server_t *s);
/* The gRPC xDS bootstrap JSON that points clients at server_uri
 * ("host:port"); malloc'd, free() it.  Give it to any gRPC language through
 * GRPC_XDS_BOOTSTRAP_CONFIG (the text) or GRPC_XDS_BOOTSTRAP (a file). */
char *coord_xds_bootstrap_json(const char *server_uri);

/* The current instances of a service without xDS.  addresses[i] is
 * "host:port" as registered; target is a static gRPC target of their
 * resolved IPs ("ipv4:10.0.0.1:80,10.0.0.2:80" or "ipv6:[::1]:80,..."),
 * NULL if there are none; service_config is the matching round_robin
 * service config {"loadBalancingConfig":[{"round_robin":{}}]} to pass as
 * GRPC_ARG_SERVICE_CONFIG.  Such a channel does not follow later changes. */
typedef struct coord_resolution {
  size_t n;
  char **addresses;
  char *target;
  char *service_config;
} coord_resolution_t;
int coord_registry_resolve(coord_t *c, const char *name, coord_resolution_t *out);
void coord_resolution_clear(coord_resolution_t *r);

/* ---------------------------------------------------------------- config */

/* Values: a stored value that parses as JSON is that JSON, anything else is
 * a string.  A JSON string is stored as its raw bytes, unless those bytes
 * would themselves parse as JSON ("42", "true"), in which case it is stored
 * quoted so that it reads back as the same string. */
int coord_config_get(coord_t *c, const char *key, json_t **out);
int coord_config_set(coord_t *c, const char *key, const json_t *value);
int coord_config_delete(coord_t *c, const char *key);
/* jansson json_unpack / json_pack formats on the value of key.  unpack:
 * COORD_EFORMAT (jansson's message in coord_last_error()) if the value does
 * not match; pointers it hands out ("s", "o") stay valid until the same
 * thread unpacks the same key again (or exits). */
int coord_config_unpack(coord_t *c, const char *key, const char *fmt, ...);
int coord_config_pack(coord_t *c, const char *key, const char *fmt, ...);
/* Object {key: value} of every key under the path prefix ("" or NULL: all).
 * "app" covers "app" and "app/..." but never "application". */
int coord_config_list(coord_t *c, const char *prefix, json_t **out);
int coord_config_watch(coord_t *c, const char *key, int with_current, coord_watch_t **out);
int coord_config_watch_prefix(coord_t *c, const char *prefix, int with_current, coord_watch_t **out);
/* Guarded write: commits only while lock is still held (compare on its
 * holder key's create revision); COORD_ELOST otherwise, nothing written. */
int coord_config_set_guarded(coord_t *c, coord_lock_t *lock, const char *key, const json_t *value);
/* Value encoding used by config (exposed for coordfs and tools). */
json_t *coord_config_decode(const void *bytes, size_t len);
int coord_config_encode(const json_t *value, char **bytes, size_t *len);

#ifdef __cplusplus
}
#endif
#endif
