/*
 * internal.h — what libcoord's subsystems share and users never see.
 *
 * The client core (transport.c) owns the gRPC channels, the one completion
 * queue and the one event thread.  Everything asynchronous in libcoord is a
 * callback run on that event thread: unary calls (coord__unary_async and the
 * kv helpers built on it), watch events (watch.c), lease keep-alive answers
 * (lease.c) and timers (coord__after).
 *
 * Rules every subsystem follows:
 *   - Callbacks run on the event thread and must not block: never call a
 *     blocking libcoord function from one (coord__on_event_thread() lets a
 *     function assert this).  Chain asynchronous calls instead.
 *   - Keys passed to the kv helpers are relative to the namespace prefix,
 *     exactly like the public API; the core adds and strips the prefix.
 *   - Each subsystem keeps its state behind its own mutex; a callback never
 *     runs while the core holds one of its own locks.
 */
#ifndef COORD_INTERNAL_H
#define COORD_INTERNAL_H

#include "coord.h"

#include <grpc/grpc.h>
#include <protobuf-c/protobuf-c.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>

#include "kv.pb-c.h"
#include "rpc.pb-c.h"

#define COORD_UNUSED(x) ((void)(x))

/* ---------------------------------------------------------------- errors */

/* Sets this thread's detail message and returns code. */
int coord__err(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void coord__err_clear(void);

/* ---------------------------------------------------------------- time */

int64_t coord__now_ms(void); /* CLOCK_MONOTONIC in ms */
/* ms -> etcd seconds, rounded up; 0 for ms <= 0. */
int64_t coord__ms_to_ttl_s(int64_t ms);

/* ---------------------------------------------------------------- memory */

void *coord__xmalloc(size_t n); /* abort on OOM is never used: NULL checked */
char *coord__strdup(const char *s);
char *coord__strndup(const char *s, size_t n);
char *coord__sprintf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* ---------------------------------------------------------------- keys */

/* prefix + key (malloc'd, NUL-terminated, *len set if non-NULL). */
char *coord__key(coord_t *c, const char *key, size_t *len);
/* The etcd range end that covers every key starting with p[0..n). */
char *coord__prefix_end(const char *p, size_t n, size_t *out_len);
/* Length of the client's namespace prefix. */
size_t coord__ns_len(coord_t *c);
/* Fills a public coord_kv_t from an etcd KeyValue, stripping the prefix. */
int coord__kv_from_pb(coord_t *c, const Mvccpb__KeyValue *pb, coord_kv_t *out);
void coord__kv_clear(coord_kv_t *kv);

/* ---------------------------------------------------------------- endpoints */

/* "h:p,http://h:p,https://h:p" -> NULL-terminated array of "h:p"; *tls set
 * if any is https.  Pure: fuzzed by tests/fuzz/fuzz_endpoints.c. */
int coord__parse_endpoints(const char *list, char ***out, size_t *n, int *tls);
void coord__endpoints_free(char **ep);

/* ---------------------------------------------------------------- calls */

typedef struct coord__method {
  const char *path; /* "/etcdserverpb.KV/Range" */
  const ProtobufCMessageDescriptor *resp;
  int idempotent; /* retried after a deadline */
} coord__method_t;

extern const coord__method_t coord__m_range, coord__m_put, coord__m_delete, coord__m_txn, coord__m_compact,
    coord__m_lease_grant, coord__m_lease_revoke, coord__m_lease_ttl, coord__m_auth, coord__m_status;

/* status is 0 or a COORD_E* code; resp is NULL on error and is freed by the
 * core after the callback returns. */
typedef void (*coord__unary_cb)(coord_t *c, int status, ProtobufCMessage *resp, void *arg);

/* Starts a unary call with retry and failover.  timeout_ms 0: default,
 * -1: no deadline.  The request is serialized before return. */
int coord__unary_async(coord_t *c, const coord__method_t *m, const ProtobufCMessage *req, int timeout_ms,
                       coord__unary_cb cb, void *arg);
/* Blocking form; *resp freed by the caller with protobuf_c_message_free_unpacked. */
int coord__unary(coord_t *c, const coord__method_t *m, const ProtobufCMessage *req, int timeout_ms,
                 ProtobufCMessage **resp);

/* ---------------------------------------------------------------- kv async */

typedef void (*coord__kv_cb)(coord_t *c, int status, coord_kv_result_t *r, void *arg);
typedef void (*coord__txn_cb)(coord_t *c, int status, coord_txn_result_t *r, void *arg);
/* r is owned by the callback (free it with coord_kv_result_free). */
int coord__get_async(coord_t *c, const char *key, const coord_range_opts_t *opts, coord__kv_cb cb, void *arg);
int coord__put_async(coord_t *c, const char *key, const void *value, size_t len, const coord_put_opts_t *opts,
                     coord__kv_cb cb, void *arg);
int coord__delete_async(coord_t *c, const char *key, const coord_range_opts_t *opts, coord__kv_cb cb,
                        void *arg);
int coord__txn_async(coord_t *c, const coord_txn_t *txn, coord__txn_cb cb, void *arg);
/* Builds requests (used by the sync and async forms). */
Etcdserverpb__TxnRequest *coord__txn_build(coord_t *c, const coord_txn_t *txn);
void coord__txn_request_free(Etcdserverpb__TxnRequest *r);
int coord__txn_result_from_pb(coord_t *c, const Etcdserverpb__TxnResponse *pb, coord_txn_result_t **out);

/* ---------------------------------------------------------------- leases */

/* coord_lease_keepalive with a known local expiry until the first renewal
 * answers (monotonic ms; a lease just granted: the grant's send time + TTL,
 * or an answer time + TTL minus a margin for the round trip).  Without it a
 * lease cut off from etcd before its first renewal would never be reported
 * lost. */
int coord__lease_keepalive_until(coord_t *c, int64_t id, int64_t expires, coord_lease_lost_cb lost,
                                 void *arg);
/* coord_lease_keepalive_stop without its wait for a lost callback of id in
 * progress: for callers that hold a lock that callback takes (the lock
 * pool), which make arg outlive the callback themselves. */
void coord__lease_keepalive_forget(coord_t *c, int64_t id);
/* The client's default call timeout (ms). */
int coord__default_timeout_ms(coord_t *c);

/* ---------------------------------------------------------------- timers */

typedef void (*coord__timer_fn)(coord_t *c, void *arg);
/* Runs fn on the event thread after delay_ms (0: as soon as possible). */
void coord__after(coord_t *c, int64_t delay_ms, coord__timer_fn fn, void *arg);
int coord__on_event_thread(coord_t *c);
/* True once coord_close has begun. */
int coord__closing(coord_t *c);

/* ---------------------------------------------------------------- watches */

typedef struct coord__watcher coord__watcher_t;
/* status 0: n events (valid during the call only).  status < 0: the watch
 * ended for good (COORD_ECLOSED on close); no call follows. */
typedef void (*coord__watch_cb)(void *arg, const coord_event_t *evs, size_t n, int status);
/* key/range_end relative to the namespace; prefix: every key under key. */
int coord__watch_add(coord_t *c, const char *key, int prefix, int64_t start_rev, coord__watch_cb cb,
                     void *arg, coord__watcher_t **out);
/* As coord__watch_add; with_current: first emit the current keys as PUTs. */
int coord__watch_add_ex(coord_t *c, const char *key, int prefix, int64_t start_rev, int with_current,
                        coord__watch_cb cb, void *arg, coord__watcher_t **out);
/* After return the callback is not running and will not run again (when
 * called from inside the callback itself, no further call follows). */
void coord__watch_remove(coord__watcher_t *w);

/* Public watch built on a watcher plus a decoder that fills name/id/json
 * (NULL decode: plain kv events).  Returns 0 to keep the event, 1 to skip. */
typedef int (*coord__decode_fn)(coord_t *c, coord_event_t *ev, void *arg);
int coord__watch_public(coord_t *c, const char *key, const coord_watch_opts_t *opts, coord__decode_fn decode,
                        void *decode_arg, coord_watch_t **out);

/* ---------------------------------------------------------------- events */

int coord__event_copy(const coord_event_t *src, coord_event_t *dst);
void coord__event_clear(coord_event_t *ev);

/* ---------------------------------------------------------------- subsystems */

/* Each subsystem's per-client state; created lazily, freed by coord_close
 * in the order registry, locks, resolver, watches, leases. */
struct coord_lock_pool;
struct coord_registry_state;
struct coord_resolver_state;
void coord__locks_close(coord_t *c);
void coord__registry_close(coord_t *c);
void coord__resolver_close(coord_t *c);
void coord__watches_close(coord_t *c);
void coord__leases_close(coord_t *c);

/* Accessors for the subsystem slots in coord_t (set once, under the core's
 * mutex: the slot is created by the first caller). */
typedef void *(*coord__slot_new)(coord_t *c);
void *coord__slot(coord_t *c, int slot, coord__slot_new make);
enum {
  COORD__SLOT_LOCKS,
  COORD__SLOT_REGISTRY,
  COORD__SLOT_RESOLVER,
  COORD__SLOT_WATCH,
  COORD__SLOT_LEASE,
  COORD__SLOT_MAX
};
void *coord__slot_get(coord_t *c, int slot); /* NULL if never made */

/* ---------------------------------------------------------------- streams */

/* Every completion on the client's queue carries a tag that starts with
 * this; the event thread calls fn(tag, ok). */
typedef struct coord__tag {
  void (*fn)(struct coord__tag *tag, int ok);
} coord__tag_t;

grpc_completion_queue *coord__cq(coord_t *c);
/* Endpoint index calls should use now, and the report that one failed (the
 * client then moves on to the next endpoint). */
int coord__endpoint_current(coord_t *c);
void coord__endpoint_failed(coord_t *c, int ep);
const char *coord__endpoint_name(coord_t *c, int ep);
/* A streaming call on endpoint ep without deadline, registered on the
 * client's queue.  hasleader: add the "hasleader: true" metadata.  The
 * initial metadata (token, hasleader) is filled into md (size >= 2) and must
 * stay valid until the SEND_INITIAL_METADATA op completes. */
grpc_call *coord__stream_call(coord_t *c, int ep, const char *path);
size_t coord__call_metadata(coord_t *c, grpc_metadata *md, int hasleader);
grpc_byte_buffer *coord__pack(const ProtobufCMessage *m);
ProtobufCMessage *coord__unpack(const ProtobufCMessageDescriptor *d, grpc_byte_buffer *bb);
/* Maps a finished call's status to COORD_E* (and sets the detail). */
int coord__status_err(grpc_status_code st, grpc_slice details, const char *what);
/* Retry back-off for the n-th consecutive failure (1-based), jittered. */
int64_t coord__backoff_ms(coord_t *c, int n);
/* Re-authenticate asynchronously (token rejected); done(c, status, arg). */
void coord__reauth_async(coord_t *c, void (*done)(coord_t *c, int status, void *arg), void *arg);
/* Marks the connection state for coord_status. */
void coord__set_connected(coord_t *c, int up);

#endif
