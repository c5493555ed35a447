/*
 * registry.c — service registration and discovery under /services/<name>/<id>.
 *
 * How it fits: an instance is one key, /services/<name>/<id>, whose value is
 * the JSON document {"id","name","address","port","metadata"} and which is
 * attached to a lease of its own.  The lease is renewed on the client's one
 * KeepAlive stream (lease.c).  discover is one prefix Range (kv.c); watch is
 * a public watch (watch.c) whose decoder fills name, id and the document.
 * The resolver (resolver.c) builds on discover and watch; coordfs builds on
 * the document functions (coord_service_from_json_at).
 *
 * Keeping an instance registered: each registration made by this client is a
 * `struct reg` in the client's registry state.  Two things tell it that its
 * key is gone: the keep-alive "lost" callback (lease expired or revoked), and
 * a watch on its own key (a DELETE newer than our last put: revoked by
 * etcdctl, expired, deleted by hand), which reacts within milliseconds where
 * the keep-alive would only notice at the next renewal.  Either one moves
 * the registration from ACTIVE to RENEWING and starts, on the event thread, a
 * chain of asynchronous calls: revoke the old lease (best effort), grant a
 * new one, put the document with it, keep it alive, back to ACTIVE.  A failed
 * step is retried after a back-off (coord__after), for as long as it takes.
 * Nothing in that chain blocks.
 *
 * Threads and ownership:
 *   - rs->op_mu serializes the blocking public operations (register,
 *     unregister, close).  Only user threads take it, never the event
 *     thread, so they may block on etcd while holding it.
 *   - rs->mu guards the list and every field of every reg marked "(mu)".  It
 *     is held only for short, non-blocking sections, on any thread.
 *   - A reg is owned by the list (one reference) and by each asynchronous
 *     step or timer in flight (one reference each).  unregister/close take
 *     it off the list, mark it REMOVED, then wait on rs->cv until the
 *     in-flight steps have noticed and dropped their references; only then
 *     is the lease revoked and the reg freed.  A step that sees REMOVED
 *     leaves the lease it had just been granted in r->lease and stops, so
 *     that the retiring thread revokes it (synchronously: when unregister
 *     returns, the key is gone).
 *   - A lease is added to the keep-alive set under rs->mu in the same
 *     section that makes the reg ACTIVE with it, so whoever retires the reg
 *     later always finds the lease to stop.
 *   - The keep-alive "lost" callback gets rs (not the reg) and looks the
 *     reg up by lease id under rs->mu, so a late call about a lease we
 *     stopped finds nothing; rs itself is freed by close only after an
 *     event-thread fence (lease.c may call a "lost" callback it collected
 *     just before the lease was stopped).  The key watch gets the reg and is
 *     removed (coord__watch_remove waits for a running callback) before the
 *     reg is freed.
 *
 * Invariants (asserted in reg_check_locked): an ACTIVE reg has a lease != 0
 * and no chain (refs == 1); a RENEWING reg has lease 0 and exactly one chain
 * in flight (refs == 2); a REMOVED reg is off the list.
 *
 * Watches (coord_registry_watch, via coord__watch_public) start at the
 * store revision current when they are created, so every change made after
 * the call returns is seen.
 */
#include "internal.h"

#include <assert.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define SERVICES_ROOT "/services/"
#define SERVICES_ROOT_LEN (sizeof(SERVICES_ROOT) - 1)
#define DEFAULT_TTL_MS 10000
#define RETRY_MIN_MS 100
#define RETRY_MAX_MS 2000

/* ---------------------------------------------------------------- names */

/* A service name or instance id: non-empty, no '/'. */
static int check_part(const char *fn, const char *what, const char *s) {
  if (s == NULL)
    return coord__err(COORD_EINVAL, "%s: %s is NULL", fn, what);
  if (s[0] == '\0')
    return coord__err(COORD_EINVAL, "%s: %s is empty", fn, what);
  if (strchr(s, '/') != NULL)
    return coord__err(COORD_EINVAL, "%s: %s \"%s\" contains '/'", fn, what, s);
  return 0;
}

/* Splits "/services/<name>/<id>" (namespace stripped).  Returns 0 and
 * malloc'd name and id, or -1 if the key is not an instance key. */
static int split_key(const char *key, size_t len, char **name, char **id) {
  *name = *id = NULL;
  if (len <= SERVICES_ROOT_LEN || memcmp(key, SERVICES_ROOT, SERVICES_ROOT_LEN) != 0)
    return -1;
  const char *n = key + SERVICES_ROOT_LEN;
  const char *end = key + len;
  const char *slash = memchr(n, '/', (size_t)(end - n));
  if (slash == NULL || slash == n || slash + 1 == end)
    return -1;
  const char *i = slash + 1;
  if (memchr(i, '/', (size_t)(end - i)) != NULL || memchr(n, '\0', (size_t)(end - n)) != NULL)
    return -1;
  *name = coord__strndup(n, (size_t)(slash - n));
  *id = coord__strndup(i, (size_t)(end - i));
  if (*name == NULL || *id == NULL) {
    free(*name);
    free(*id);
    *name = *id = NULL;
    return -1;
  }
  return 0;
}

/* ---------------------------------------------------------------- documents */

void coord_service_clear(coord_service_t *svc) {
  if (svc == NULL)
    return;
  free(svc->id);
  free(svc->name);
  free(svc->address);
  if (svc->metadata != NULL)
    json_decref(svc->metadata);
  memset(svc, 0, sizeof *svc);
}

/* Optional string member that must be a valid part and agree with want. */
static int doc_part(const char *fn, const json_t *doc, const char *field, const char *want, char **out) {
  *out = NULL;
  const json_t *v = json_object_get(doc, field);
  if (v == NULL) {
    if (want != NULL && (*out = coord__strdup(want)) == NULL)
      return coord__err(COORD_ENOMEM, "%s: out of memory", fn);
    return 0;
  }
  if (!json_is_string(v))
    return coord__err(COORD_EINVAL, "%s: \"%s\" must be a string", fn, field);
  const char *s = json_string_value(v);
  if (strlen(s) != json_string_length(v))
    return coord__err(COORD_EINVAL, "%s: \"%s\" contains a NUL byte", fn, field);
  int rc = check_part(fn, field, s);
  if (rc < 0)
    return rc;
  if (want != NULL && strcmp(s, want) != 0)
    return coord__err(COORD_EINVAL, "%s: \"%s\" is \"%s\" but the path says \"%s\"", fn, field, s, want);
  if ((*out = coord__strdup(s)) == NULL)
    return coord__err(COORD_ENOMEM, "%s: out of memory", fn);
  return 0;
}

int coord_service_from_json_at(const json_t *doc, const char *name, const char *id, coord_service_t *out) {
  static const char fn[] = "coord_service_from_json";
  if (out == NULL)
    return coord__err(COORD_EINVAL, "%s: NULL argument", fn);
  memset(out, 0, sizeof *out);
  if (doc == NULL)
    return coord__err(COORD_EINVAL, "%s: NULL document", fn);
  if (!json_is_object(doc))
    return coord__err(COORD_EINVAL, "%s: the document is not a JSON object", fn);
  int rc;
  if ((name != NULL && (rc = check_part(fn, "name", name)) < 0) ||
      (id != NULL && (rc = check_part(fn, "id", id)) < 0))
    return rc;

  coord_service_t s = {0};
  const json_t *addr = json_object_get(doc, "address");
  if (addr == NULL || !json_is_string(addr) || json_string_length(addr) == 0) {
    rc = coord__err(COORD_EINVAL, "%s: \"address\" must be a non-empty string", fn);
    goto fail;
  }
  if (strlen(json_string_value(addr)) != json_string_length(addr)) {
    rc = coord__err(COORD_EINVAL, "%s: \"address\" contains a NUL byte", fn);
    goto fail;
  }
  const json_t *port = json_object_get(doc, "port");
  if (port == NULL || !json_is_integer(port) || json_integer_value(port) < 1 ||
      json_integer_value(port) > 65535) {
    rc = coord__err(COORD_EINVAL, "%s: \"port\" must be an integer from 1 to 65535", fn);
    goto fail;
  }
  const json_t *md = json_object_get(doc, "metadata");
  if (md != NULL && !json_is_object(md) && !json_is_null(md)) {
    rc = coord__err(COORD_EINVAL, "%s: \"metadata\" must be an object", fn);
    goto fail;
  }
  if ((rc = doc_part(fn, doc, "id", id, &s.id)) < 0 || (rc = doc_part(fn, doc, "name", name, &s.name)) < 0)
    goto fail;
  s.address = coord__strdup(json_string_value(addr));
  s.port = (int)json_integer_value(port);
  if (md != NULL && json_is_object(md))
    s.metadata = json_deep_copy(md);
  if (s.address == NULL || (md != NULL && json_is_object(md) && s.metadata == NULL)) {
    rc = coord__err(COORD_ENOMEM, "%s: out of memory", fn);
    goto fail;
  }
  *out = s;
  return 0;
fail:
  coord_service_clear(&s);
  return rc;
}

int coord_service_from_json(const json_t *doc, coord_service_t *out) {
  return coord_service_from_json_at(doc, NULL, NULL, out);
}

/* Checks the fields of svc (id/name only if required or given). */
static int check_service(const char *fn, const coord_service_t *svc, int need_ids) {
  int rc;
  if (svc == NULL)
    return coord__err(COORD_EINVAL, "%s: NULL service", fn);
  if ((need_ids || svc->id != NULL) && (rc = check_part(fn, "id", svc->id)) < 0)
    return rc;
  if ((need_ids || svc->name != NULL) && (rc = check_part(fn, "name", svc->name)) < 0)
    return rc;
  if (svc->address == NULL || svc->address[0] == '\0')
    return coord__err(COORD_EINVAL, "%s: address must be a non-empty string", fn);
  if (svc->port < 1 || svc->port > 65535)
    return coord__err(COORD_EINVAL, "%s: port %d is not from 1 to 65535", fn, svc->port);
  if (svc->metadata != NULL && !json_is_object(svc->metadata))
    return coord__err(COORD_EINVAL, "%s: metadata must be a JSON object", fn);
  return 0;
}

json_t *coord_service_to_json(const coord_service_t *svc) {
  static const char fn[] = "coord_service_to_json";
  if (check_service(fn, svc, 0) < 0)
    return NULL;
  json_t *md = svc->metadata ? json_deep_copy(svc->metadata) : json_object();
  json_t *doc = json_object();
  if (doc == NULL || md == NULL)
    goto oom;
  if ((svc->id != NULL && json_object_set_new(doc, "id", json_string(svc->id)) != 0) ||
      (svc->name != NULL && json_object_set_new(doc, "name", json_string(svc->name)) != 0) ||
      json_object_set_new(doc, "address", json_string(svc->address)) != 0 ||
      json_object_set_new(doc, "port", json_integer(svc->port)) != 0)
    goto oom;
  if (json_object_set_new(doc, "metadata", md) != 0) {
    md = NULL; /* set_new consumed it even on failure */
    goto oom;
  }
  return doc;
oom:
  json_decref(md);
  json_decref(doc);
  /* json_string() fails on invalid UTF-8 as well as on lack of memory. */
  coord__err(COORD_EINVAL, "%s: a field is not valid UTF-8 (or out of memory)", fn);
  return NULL;
}

/* ---------------------------------------------------------------- state */

enum reg_state { REG_ACTIVE, REG_RENEWING, REG_REMOVED };

struct coord_registry_state;

struct reg {
  struct reg *next; /* (mu) */
  coord_t *c;
  struct coord_registry_state *rs;
  char *name, *id, *key; /* key: /services/<name>/<id> */
  char *doc;             /* the JSON document, compact */
  size_t doc_len;
  int64_t ttl_ms;
  enum reg_state state;      /* (mu) */
  int64_t lease;             /* (mu) current lease; 0 while RENEWING */
  int64_t put_rev;           /* (mu) revision of our last put */
  int64_t backoff_ms;        /* (mu) next retry delay */
  int refs;                  /* (mu) list + steps in flight */
  coord__watcher_t *watcher; /* set at register, removed by unregister/close */
};

struct coord_registry_state {
  pthread_mutex_t op_mu; /* serializes register/unregister/close */
  pthread_mutex_t mu;    /* guards list and the (mu) fields */
  pthread_cond_t cv;     /* signalled when a reg drops a reference */
  struct reg *list;      /* (mu) */
  int closing;           /* (mu) */
};

static void *registry_new(coord_t *c) {
  COORD_UNUSED(c);
  struct coord_registry_state *rs = coord__xmalloc(sizeof *rs);
  if (rs == NULL)
    return NULL;
  pthread_mutex_init(&rs->op_mu, NULL);
  pthread_mutex_init(&rs->mu, NULL);
  pthread_cond_init(&rs->cv, NULL);
  return rs;
}

static struct coord_registry_state *registry_state(coord_t *c) {
  return coord__slot(c, COORD__SLOT_REGISTRY, registry_new);
}

static void reg_free(struct reg *r) {
  if (r == NULL)
    return;
  free(r->name);
  free(r->id);
  free(r->key);
  free(r->doc);
  free(r);
}

/* The invariants of the file comment; caller holds rs->mu. */
static void reg_check_locked(const struct reg *r) {
  assert(r->refs >= 1);
  assert(r->state != REG_ACTIVE || (r->lease != 0 && r->refs == 1));
  assert(r->state != REG_RENEWING || (r->lease == 0 && r->refs == 2));
  COORD_UNUSED(r);
}

/* Drops one reference; caller holds rs->mu.  The last one is the list's,
 * dropped by unregister/close after waiting, which frees the reg itself. */
static void reg_unref_locked(struct reg *r) {
  assert(r->refs > 1);
  r->refs--;
  pthread_cond_broadcast(&r->rs->cv);
}

/* ---------------------------------------------------------------- async chain */

static void lease_lost_cb(int64_t id, void *arg);
static void chain_grant(struct reg *r);
static int64_t renew_begin_locked(struct reg *r, int64_t lease);
static void renew_start(struct reg *r, int64_t old);

/* Fire-and-forget revoke of a lease we no longer want. */
static void revoke_done(coord_t *c, int status, ProtobufCMessage *resp, void *arg) {
  COORD_UNUSED(c);
  COORD_UNUSED(status);
  COORD_UNUSED(resp);
  COORD_UNUSED(arg);
}

static void revoke_async(coord_t *c, int64_t lease) {
  if (lease == 0)
    return;
  Etcdserverpb__LeaseRevokeRequest req = ETCDSERVERPB__LEASE_REVOKE_REQUEST__INIT;
  req.id = lease;
  (void)coord__unary_async(c, &coord__m_lease_revoke, &req.base, 0, revoke_done, NULL);
}

static void retry_timer(coord_t *c, void *arg) {
  COORD_UNUSED(c);
  chain_grant(arg);
}

/* A step failed: try again later (keeps the chain's reference). */
static void chain_retry(struct reg *r) {
  pthread_mutex_lock(&r->rs->mu);
  int64_t delay = r->backoff_ms;
  r->backoff_ms = r->backoff_ms * 2 > RETRY_MAX_MS ? RETRY_MAX_MS : r->backoff_ms * 2;
  pthread_mutex_unlock(&r->rs->mu);
  coord__after(r->c, delay, retry_timer, r);
}

/* True if the chain must stop (r removed, or the client closing); then the
 * chain's reference is dropped, and lease (0: none), a lease the chain had
 * just been granted, is left in r->lease for the thread that retires r to
 * revoke: so that the key is gone when unregister returns. */
static int chain_should_stop(struct reg *r, int64_t lease) {
  struct coord_registry_state *rs = r->rs;
  pthread_mutex_lock(&rs->mu);
  int stop = r->state == REG_REMOVED || rs->closing || coord__closing(r->c);
  if (stop) {
    assert(r->lease == 0);
    r->lease = lease;
    reg_unref_locked(r);
  }
  pthread_mutex_unlock(&rs->mu);
  return stop;
}

struct put_step {
  struct reg *r;
  int64_t lease;
};

static void chain_put_done(coord_t *c, int status, coord_kv_result_t *res, void *arg) {
  struct put_step *st = arg;
  struct reg *r = st->r;
  int64_t lease = st->lease;
  free(st);
  int64_t rev = res ? res->revision : 0;
  coord_kv_result_free(res);
  if (status < 0) {
    revoke_async(c, lease); /* carries no key */
    if (!chain_should_stop(r, 0))
      chain_retry(r);
    return;
  }
  if (chain_should_stop(r, lease)) /* unregister revokes it, deleting the key */
    return;
  struct coord_registry_state *rs = r->rs;
  pthread_mutex_lock(&rs->mu);
  if (r->state == REG_REMOVED || rs->closing) { /* removed since the check */
    r->lease = lease;
    reg_unref_locked(r);
    pthread_mutex_unlock(&rs->mu);
    return;
  }
  assert(r->state == REG_RENEWING && r->lease == 0);
  /* The keep-alive starts under rs->mu together with ACTIVE, so that whoever
   * retires r afterwards finds the lease and stops it (lease.c never holds
   * its own lock while calling back, so rs->mu -> lease lock is safe).  Only
   * rs, which outlives every keep-alive of ours, is passed to it. */
  int kept = coord_lease_keepalive(c, lease, lease_lost_cb, rs);
  r->state = REG_ACTIVE;
  r->lease = lease;
  r->put_rev = rev;
  r->backoff_ms = RETRY_MIN_MS;
  int64_t old = kept < 0 ? renew_begin_locked(r, lease) : 0; /* cannot keep it: start over */
  reg_unref_locked(r);
  reg_check_locked(r);
  pthread_mutex_unlock(&rs->mu);
  if (old != 0)
    renew_start(r, old);
}

static void chain_grant_done(coord_t *c, int status, ProtobufCMessage *resp, void *arg) {
  struct reg *r = arg;
  const Etcdserverpb__LeaseGrantResponse *g = (const Etcdserverpb__LeaseGrantResponse *)resp;
  int64_t lease = 0;
  if (status == 0 && g != NULL && (g->error == NULL || g->error[0] == '\0'))
    lease = g->id;
  if (lease == 0) {
    if (!chain_should_stop(r, 0))
      chain_retry(r);
    return;
  }
  if (chain_should_stop(r, lease))
    return;
  struct put_step *st = coord__xmalloc(sizeof *st);
  coord_put_opts_t po = {0};
  po.lease = lease;
  if (st != NULL) {
    st->r = r;
    st->lease = lease;
    /* r->key/doc are immutable while the chain holds its reference. */
    if (coord__put_async(c, r->key, r->doc, r->doc_len, &po, chain_put_done, st) == 0)
      return;
    free(st);
  }
  revoke_async(c, lease);
  if (!chain_should_stop(r, 0))
    chain_retry(r);
}

/* Grants a new lease for r; holds the chain's reference throughout. */
static void chain_grant(struct reg *r) {
  if (chain_should_stop(r, 0))
    return;
  Etcdserverpb__LeaseGrantRequest req = ETCDSERVERPB__LEASE_GRANT_REQUEST__INIT;
  req.ttl = coord__ms_to_ttl_s(r->ttl_ms);
  if (coord__unary_async(r->c, &coord__m_lease_grant, &req.base, 0, chain_grant_done, r) < 0)
    chain_retry(r);
}

/* The key of r is gone or its lease lost: if lease is still r's current
 * lease and r is ACTIVE, start re-registering.  Caller holds rs->mu.
 * Returns the old lease to let go of (0: nothing to do). */
static int64_t renew_begin_locked(struct reg *r, int64_t lease) {
  if (r->state != REG_ACTIVE || r->lease != lease || r->rs->closing)
    return 0;
  assert(lease != 0);
  r->state = REG_RENEWING;
  r->lease = 0;
  r->refs++; /* the chain's reference */
  assert(r->refs >= 2);
  return lease;
}

/* Outside rs->mu: stop renewing the old lease, revoke it, start the chain. */
static void renew_start(struct reg *r, int64_t old) {
  coord_lease_keepalive_stop(r->c, old);
  revoke_async(r->c, old); /* may still exist if only the key was deleted */
  chain_grant(r);
}

/* Keep-alive says lease id is gone (event thread). */
static void lease_lost_cb(int64_t id, void *arg) {
  struct coord_registry_state *rs = arg;
  struct reg *found = NULL;
  int64_t old = 0;
  pthread_mutex_lock(&rs->mu);
  for (struct reg *r = rs->list; r != NULL; r = r->next) {
    if (r->lease == id) {
      reg_check_locked(r);
      old = renew_begin_locked(r, id);
      found = r;
      break;
    }
  }
  pthread_mutex_unlock(&rs->mu);
  if (found != NULL && old != 0)
    renew_start(found, old);
}

/* Watch on our own key (event thread): a DELETE after our last put. */
static void key_watch_cb(void *arg, const coord_event_t *evs, size_t n, int status) {
  struct reg *r = arg;
  if (status < 0)
    return; /* watch ended; the keep-alive still reports lease loss */
  int64_t old = 0;
  pthread_mutex_lock(&r->rs->mu);
  reg_check_locked(r);
  for (size_t i = 0; i < n && old == 0; i++) {
    if (evs[i].type == COORD_EVENT_DELETE && evs[i].revision > r->put_rev)
      old = renew_begin_locked(r, r->lease);
  }
  pthread_mutex_unlock(&r->rs->mu);
  if (old != 0)
    renew_start(r, old);
}

/* ---------------------------------------------------------------- register */

/* Takes r off rs's list and marks it REMOVED (caller holds op_mu, not mu),
 * stops its key watch, waits until no step of its chain is in flight, and
 * stops renewing its lease.  Returns that lease (0: none), still to be
 * revoked; r itself is then the caller's to free. */
static int64_t reg_detach(struct coord_registry_state *rs, struct reg *r) {
  pthread_mutex_lock(&rs->mu);
  struct reg **pp = &rs->list;
  while (*pp != NULL && *pp != r)
    pp = &(*pp)->next;
  if (*pp == r)
    *pp = r->next;
  r->next = NULL;
  r->state = REG_REMOVED;
  pthread_mutex_unlock(&rs->mu);

  if (r->watcher != NULL)
    coord__watch_remove(r->watcher); /* key_watch_cb no longer runs */
  r->watcher = NULL;

  pthread_mutex_lock(&rs->mu);
  while (r->refs > 1)
    pthread_cond_wait(&rs->cv, &rs->mu);
  assert(r->refs == 1);
  int64_t lease = r->lease; /* stable now: no step is left to change it */
  pthread_mutex_unlock(&rs->mu);
  if (lease != 0)
    coord_lease_keepalive_stop(r->c, lease);
  return lease;
}

/* reg_detach, then revoke the lease (deleting the key if it still carries
 * it) and free r.  A lease already gone is not an error. */
static int reg_retire(struct coord_registry_state *rs, struct reg *r) {
  coord_t *c = r->c;
  int64_t lease = reg_detach(rs, r);
  reg_free(r);
  int rc = lease != 0 ? coord_lease_revoke(c, lease) : 0;
  if (rc == COORD_ENOTFOUND)
    rc = 0;
  return rc;
}

int coord_registry_register(coord_t *c, const coord_service_t *svc, int64_t ttl_ms) {
  static const char fn[] = "coord_registry_register";
  if (c == NULL || svc == NULL)
    return coord__err(COORD_EINVAL, "%s: NULL argument", fn);
  int rc = check_service(fn, svc, 1);
  if (rc < 0)
    return rc;
  if (ttl_ms < 0)
    return coord__err(COORD_EINVAL, "%s: negative ttl", fn);
  assert(!coord__on_event_thread(c));
  if (ttl_ms == 0)
    ttl_ms = DEFAULT_TTL_MS;
  struct coord_registry_state *rs = registry_state(c);
  if (rs == NULL)
    return coord__err(COORD_ENOMEM, "%s: out of memory", fn);

  struct reg *r = coord__xmalloc(sizeof *r);
  json_t *doc = coord_service_to_json(svc);
  if (r == NULL || doc == NULL) {
    json_decref(doc);
    free(r);
    return doc == NULL ? COORD_EINVAL : coord__err(COORD_ENOMEM, "%s: out of memory", fn);
  }
  r->c = c;
  r->rs = rs;
  r->ttl_ms = ttl_ms;
  r->refs = 1;
  r->backoff_ms = RETRY_MIN_MS;
  r->state = REG_ACTIVE;
  r->name = coord__strdup(svc->name);
  r->id = coord__strdup(svc->id);
  r->key = coord__sprintf(SERVICES_ROOT "%s/%s", svc->name, svc->id);
  r->doc = json_dumps(doc, JSON_COMPACT);
  json_decref(doc);
  if (r->name == NULL || r->id == NULL || r->key == NULL || r->doc == NULL) {
    reg_free(r);
    return coord__err(COORD_ENOMEM, "%s: out of memory", fn);
  }
  r->doc_len = strlen(r->doc);

  pthread_mutex_lock(&rs->op_mu);
  pthread_mutex_lock(&rs->mu);
  int closing = rs->closing;
  struct reg *old = NULL;
  for (struct reg *o = rs->list; o != NULL && !closing; o = o->next)
    if (strcmp(o->name, r->name) == 0 && strcmp(o->id, r->id) == 0)
      old = o;
  /* Replacing our own registration: stop the old one's renewals first, so
   * that none of its steps starts a new put; its lease is revoked once the
   * key carries the new one.  (A put of the old one already in flight that
   * lands after ours dies with that revoke, and our key watch heals it.) */
  if (old != NULL)
    old->state = REG_REMOVED;
  pthread_mutex_unlock(&rs->mu);
  if (closing) {
    pthread_mutex_unlock(&rs->op_mu);
    reg_free(r);
    return coord__err(COORD_ECLOSED, "%s: client is closing", fn);
  }

  int64_t lease = 0;
  coord_kv_result_t *res = NULL;
  rc = coord_lease_grant(c, ttl_ms, &lease);
  if (rc == 0) {
    coord_put_opts_t po = {0};
    po.lease = lease;
    rc = coord_kv_put(c, r->key, r->doc, r->doc_len, &po, &res);
    if (rc < 0) {
      char detail[256];
      snprintf(detail, sizeof detail, "%s", coord_last_error());
      (void)coord_lease_revoke(c, lease);
      rc = coord__err(rc, "%s: putting %s: %s", fn, r->key, detail);
    }
  }
  if (rc < 0) {
    /* A replacement that failed leaves the instance unregistered. */
    if (old != NULL) {
      char detail[512];
      snprintf(detail, sizeof detail, "%s", coord_last_error());
      (void)reg_retire(rs, old);
      coord__err(rc, "%s", detail);
    }
    pthread_mutex_unlock(&rs->op_mu);
    reg_free(r);
    return rc;
  }
  r->lease = lease;
  r->put_rev = res->revision;
  coord_kv_result_free(res);
  if (old != NULL)
    (void)reg_retire(rs, old); /* the key now carries the new lease */

  /* On the list, ACTIVE, and kept alive, all under mu (see chain_put_done). */
  pthread_mutex_lock(&rs->mu);
  rc = coord_lease_keepalive(c, lease, lease_lost_cb, rs);
  if (rc == 0) {
    r->next = rs->list;
    rs->list = r;
    reg_check_locked(r);
  }
  pthread_mutex_unlock(&rs->mu);
  if (rc == 0)
    rc = coord__watch_add(c, r->key, 0, r->put_rev + 1, key_watch_cb, r, &r->watcher);
  if (rc < 0) {
    char detail[512];
    snprintf(detail, sizeof detail, "%s", coord_last_error());
    (void)reg_retire(rs, r); /* revokes the lease: the key goes */
    pthread_mutex_unlock(&rs->op_mu);
    return coord__err(rc, "%s: cannot keep %s/%s alive: %s", fn, svc->name, svc->id, detail);
  }
  pthread_mutex_unlock(&rs->op_mu);
  return 0;
}

int coord_registry_unregister(coord_t *c, const char *name, const char *id) {
  static const char fn[] = "coord_registry_unregister";
  if (c == NULL)
    return coord__err(COORD_EINVAL, "%s: NULL client", fn);
  int rc;
  if ((rc = check_part(fn, "name", name)) < 0 || (rc = check_part(fn, "id", id)) < 0)
    return rc;
  assert(!coord__on_event_thread(c));
  struct coord_registry_state *rs = coord__slot_get(c, COORD__SLOT_REGISTRY);
  if (rs != NULL) {
    struct reg *mine = NULL;
    pthread_mutex_lock(&rs->op_mu);
    pthread_mutex_lock(&rs->mu);
    for (struct reg *r = rs->list; r != NULL; r = r->next)
      if (strcmp(r->name, name) == 0 && strcmp(r->id, id) == 0)
        mine = r;
    pthread_mutex_unlock(&rs->mu);
    if (mine != NULL) {
      /* Revoking our lease deletes the key if it is still ours (if another
       * client has put it since, it is theirs and stays). */
      rc = reg_retire(rs, mine);
      pthread_mutex_unlock(&rs->op_mu);
      if (rc < 0)
        return coord__err(rc, "%s: revoking the lease of %s/%s: %s", fn, name, id, coord_strerror(rc));
      return 0;
    }
    pthread_mutex_unlock(&rs->op_mu);
  }
  /* Not registered by this client: delete the instance key itself. */
  char *key = coord__sprintf(SERVICES_ROOT "%s/%s", name, id);
  if (key == NULL)
    return coord__err(COORD_ENOMEM, "%s: out of memory", fn);
  coord_kv_result_t *res = NULL;
  rc = coord_kv_delete(c, key, NULL, &res);
  if (rc == 0 && res != NULL && res->count == 0)
    rc = coord__err(COORD_ENOTFOUND, "%s: no instance %s", fn, key);
  coord_kv_result_free(res);
  free(key);
  return rc;
}

/* Event-thread barrier: returns once the event thread has run a timer
 * queued now, i.e. once whatever callback it was running when we queued it
 * (a keep-alive "lost" call collected before we stopped that lease, for
 * instance) has returned. */
struct fence {
  pthread_mutex_t mu;
  pthread_cond_t cv;
  int done;
};

static void fence_fn(coord_t *c, void *arg) {
  COORD_UNUSED(c);
  struct fence *f = arg;
  pthread_mutex_lock(&f->mu);
  f->done = 1;
  pthread_cond_broadcast(&f->cv);
  pthread_mutex_unlock(&f->mu);
}

static void event_thread_fence(coord_t *c) {
  struct fence f = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0};
  coord__after(c, 0, fence_fn, &f);
  pthread_mutex_lock(&f.mu);
  while (!f.done)
    pthread_cond_wait(&f.cv, &f.mu);
  pthread_mutex_unlock(&f.mu);
  pthread_mutex_destroy(&f.mu);
  pthread_cond_destroy(&f.cv);
}

/* Revokes at close: all at once, each bounded, so that a close with etcd
 * gone takes one timeout, not one per registration. */
#define CLOSE_REVOKE_TIMEOUT_MS 2000

struct revoke_wait {
  pthread_mutex_t mu;
  pthread_cond_t cv;
  size_t pending;
};

static void close_revoked(coord_t *c, int status, ProtobufCMessage *resp, void *arg) {
  COORD_UNUSED(c);
  COORD_UNUSED(status);
  COORD_UNUSED(resp);
  struct revoke_wait *w = arg;
  pthread_mutex_lock(&w->mu);
  assert(w->pending > 0);
  w->pending--;
  pthread_cond_broadcast(&w->cv);
  pthread_mutex_unlock(&w->mu);
}

void coord__registry_close(coord_t *c) {
  struct coord_registry_state *rs = coord__slot_get(c, COORD__SLOT_REGISTRY);
  if (rs == NULL)
    return;
  assert(!coord__on_event_thread(c));
  pthread_mutex_lock(&rs->op_mu);
  pthread_mutex_lock(&rs->mu);
  rs->closing = 1;
  pthread_mutex_unlock(&rs->mu);
  struct revoke_wait w = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0};
  for (;;) {
    pthread_mutex_lock(&rs->mu);
    struct reg *r = rs->list;
    pthread_mutex_unlock(&rs->mu);
    if (r == NULL)
      break;
    int64_t lease = reg_detach(rs, r);
    reg_free(r);
    if (lease == 0)
      continue;
    Etcdserverpb__LeaseRevokeRequest req = ETCDSERVERPB__LEASE_REVOKE_REQUEST__INIT;
    req.id = lease;
    pthread_mutex_lock(&w.mu);
    w.pending++;
    pthread_mutex_unlock(&w.mu);
    if (coord__unary_async(c, &coord__m_lease_revoke, &req.base, CLOSE_REVOKE_TIMEOUT_MS, close_revoked, &w) <
        0) {
      pthread_mutex_lock(&w.mu);
      w.pending--;
      pthread_mutex_unlock(&w.mu);
    }
  }
  pthread_mutex_lock(&w.mu);
  while (w.pending > 0)
    pthread_cond_wait(&w.cv, &w.mu);
  pthread_mutex_unlock(&w.mu);
  pthread_mutex_destroy(&w.mu);
  pthread_cond_destroy(&w.cv);
  pthread_mutex_unlock(&rs->op_mu);
  /* Every lease of ours has left the keep-alive set, but a "lost" call
   * collected just before may still be running with rs as its argument. */
  event_thread_fence(c);
  pthread_mutex_destroy(&rs->op_mu);
  pthread_mutex_destroy(&rs->mu);
  pthread_cond_destroy(&rs->cv);
  free(rs);
}

/* ---------------------------------------------------------------- discover */

void coord_service_list_free(coord_service_t *list, size_t n) {
  if (list == NULL)
    return;
  for (size_t i = 0; i < n; i++)
    coord_service_clear(&list[i]);
  free(list);
}

/* Parses one instance kv into out (name/id from the key).  0 or -1. */
static int service_from_kv(const coord_kv_t *kv, coord_service_t *out) {
  char *name, *id;
  if (split_key(kv->key, kv->key_len, &name, &id) < 0)
    return -1;
  json_error_t jerr;
  json_t *doc = json_loadb(kv->value, kv->value_len, 0, &jerr);
  int rc = doc ? coord_service_from_json_at(doc, name, id, out) : -1;
  json_decref(doc);
  free(name);
  free(id);
  return rc < 0 ? -1 : 0;
}

int coord_registry_discover(coord_t *c, const char *name, coord_service_t **out, size_t *n) {
  static const char fn[] = "coord_registry_discover";
  if (out != NULL)
    *out = NULL;
  if (n != NULL)
    *n = 0;
  if (c == NULL || out == NULL || n == NULL)
    return coord__err(COORD_EINVAL, "%s: NULL argument", fn);
  assert(!coord__on_event_thread(c)); /* blocks on etcd */
  int rc = check_part(fn, "name", name);
  if (rc < 0)
    return rc;
  char *prefix = coord__sprintf(SERVICES_ROOT "%s/", name);
  if (prefix == NULL)
    return coord__err(COORD_ENOMEM, "%s: out of memory", fn);
  coord_range_opts_t ro = {0};
  ro.prefix = 1;
  coord_kv_result_t *res = NULL;
  rc = coord_kv_get(c, prefix, &ro, &res);
  free(prefix);
  if (rc < 0)
    return rc;
  coord_service_t *list = res->n ? coord__xmalloc(res->n * sizeof *list) : NULL;
  if (res->n > 0 && list == NULL) {
    coord_kv_result_free(res);
    return coord__err(COORD_ENOMEM, "%s: out of memory", fn);
  }
  size_t k = 0;
  for (size_t i = 0; i < res->n; i++)
    if (service_from_kv(&res->kvs[i], &list[k]) == 0)
      k++; /* instances with an invalid document are left out */
  coord_kv_result_free(res);
  coord__err_clear();
  if (k == 0) {
    free(list);
    list = NULL;
  }
  *out = list;
  *n = k;
  return 0;
}

/* ---------------------------------------------------------------- watch */

/* Decoder for registry watches (event thread): fills name, id and the
 * document (completed with name and id from the key).  A PUT whose document
 * is invalid is reported as a DELETE: that instance cannot be used.  Keys
 * that are not /services/<name>/<id> are skipped. */
static int registry_decode_event(coord_t *c, coord_event_t *ev, void *arg) {
  COORD_UNUSED(c);
  COORD_UNUSED(arg);
  assert(ev != NULL && ev->kv.key != NULL);
  if (split_key(ev->kv.key, ev->kv.key_len, &ev->name, &ev->id) < 0)
    return 1;
  if (ev->type == COORD_EVENT_PUT) {
    coord_service_t s;
    if (service_from_kv(&ev->kv, &s) == 0) {
      ev->json = coord_service_to_json(&s);
      coord_service_clear(&s);
    }
    if (ev->json == NULL)
      ev->type = COORD_EVENT_DELETE;
  }
  return 0;
}

int coord_registry_watch(coord_t *c, const char *name, int with_current, coord_watch_t **out) {
  static const char fn[] = "coord_registry_watch";
  if (out != NULL)
    *out = NULL;
  if (c == NULL || out == NULL)
    return coord__err(COORD_EINVAL, "%s: NULL argument", fn);
  assert(!coord__on_event_thread(c)); /* blocks on etcd */
  int rc;
  if (name != NULL && (rc = check_part(fn, "name", name)) < 0)
    return rc;
  char *prefix = name ? coord__sprintf(SERVICES_ROOT "%s/", name) : coord__strdup(SERVICES_ROOT);
  if (prefix == NULL)
    return coord__err(COORD_ENOMEM, "%s: out of memory", fn);
  coord_watch_opts_t o = {0};
  o.prefix = 1;
  o.with_current = with_current;
  rc = coord__watch_public(c, prefix, &o, registry_decode_event, NULL, out);
  free(prefix);
  return rc;
}
