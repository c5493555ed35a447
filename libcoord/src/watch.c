/*
 * watch.c — the client's one Watch stream, multiplexing every watch by a
 * watch id this file assigns, and the public coord_watch_t on top.
 *
 * A watcher's promise is: every change in its key range, once, in
 * revision order, with no gap — across stream failures, member failover
 * and compaction.  How it is kept:
 *   - next_rev is the first revision not yet delivered.  A new stream
 *     re-creates each watcher from next_rev, and events below next_rev
 *     (already delivered) are dropped.
 *   - Each watcher starts with a Range of its key range (the seed) at the
 *     revision it starts from; `known` (key -> mod revision) is that state,
 *     updated by every event.  If etcd answers that next_rev was compacted,
 *     the watcher re-reads the range and emits the difference against
 *     `known` (PUT for new or changed keys, DELETE for vanished ones), then
 *     goes on from the read's revision + 1.
 *
 * States: SEEDING (seed Range in flight) -> PENDING (needs a create on the
 * stream) -> CREATING (create sent) -> ACTIVE; RESYNC (compaction re-read in
 * flight) -> PENDING.  DEAD once removed or failed.
 *
 * Threads and locks: ws->mu guards the watcher list, every watcher's
 * state/next_rev/known, the stream pointer and the flags.  Callbacks are
 * called on the event thread without ws->mu; `in_cb` marks a watcher whose
 * callback is running so that coord__watch_remove from another thread waits
 * for it (ws->cv).  Rule: in_cb is raised while ws->mu is still held from
 * the look-up that found the watcher (deliver_locked); a watcher looked at
 * under one hold of ws->mu and used after another may already be freed.
 *
 * A tick timer reopens the stream after a failure (next endpoint,
 * back-off) and sends pending creates.
 */
#include "internal.h"
#include "stream.h"

#include <assert.h>
#include <errno.h>
#include <poll.h>
#include <search.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#define TICK_MS 100

enum { W_SEEDING, W_PENDING, W_CREATING, W_ACTIVE, W_RESYNC, W_DEAD };

typedef struct known_key {
  int64_t mod;
  size_t len;
  char key[];
} known_key_t;

typedef struct watches watches_t;

struct coord__watcher {
  watches_t *ws;
  int64_t id;
  char *key, *end; /* namespaced range [key, end); end NULL: one key */
  size_t klen, elen;
  char *rel_key; /* as given (for Range via the kv helpers) */
  int prefix;
  int64_t next_rev;
  int state;
  int with_current;
  int in_cb;   /* callbacks running + reads in flight that use this watcher */
  int orphan;  /* removed from the event thread while in_cb > 0: the last
                * reference frees it */
  void *known; /* tsearch tree of known_key_t */
  coord__watch_cb cb;
  void *arg;
  coord__watcher_t *next;
};

struct watches {
  coord_t *c;
  pthread_mutex_t mu;
  pthread_cond_t cv;
  coord__watcher_t *list;
  coord__stream_t *stream;
  int failures;
  int64_t reconnect_at;
  int64_t next_id;
  int ticking;
  int closed;
};

static void tick(coord_t *c, void *arg);
static const coord__stream_ops_t watch_ops;

static void *watches_new(coord_t *c) {
  watches_t *ws = calloc(1, sizeof *ws);
  if (!ws)
    return NULL;
  ws->c = c;
  ws->next_id = 1;
  pthread_mutex_init(&ws->mu, NULL);
  pthread_cond_init(&ws->cv, NULL);
  return ws;
}

/* ---------------------------------------------------------------- known */

static int known_cmp(const void *a, const void *b) {
  const known_key_t *x = a, *y = b;
  size_t n = x->len < y->len ? x->len : y->len;
  int r = memcmp(x->key, y->key, n);
  return r ? r : (x->len > y->len) - (x->len < y->len);
}

static known_key_t *known_make(const char *key, size_t len, int64_t mod) {
  known_key_t *k = malloc(sizeof *k + len + 1);
  if (!k)
    return NULL;
  k->mod = mod;
  k->len = len;
  memcpy(k->key, key, len);
  k->key[len] = '\0';
  return k;
}

/* Records key at mod (PUT) or forgets it (mod < 0: DELETE). */
static void known_set(coord__watcher_t *w, const char *key, size_t len, int64_t mod) {
  known_key_t *probe = known_make(key, len, mod);
  if (!probe)
    return;
  if (mod < 0) {
    void *node = tfind(probe, &w->known, known_cmp);
    if (node) {
      known_key_t *old = *(known_key_t **)node;
      tdelete(probe, &w->known, known_cmp);
      free(old);
    }
    free(probe);
    return;
  }
  void *node = tsearch(probe, &w->known, known_cmp);
  if (!node) {
    free(probe);
    return;
  }
  known_key_t *have = *(known_key_t **)node;
  if (have != probe) {
    have->mod = mod;
    free(probe);
  }
}

static int64_t known_get(coord__watcher_t *w, const char *key, size_t len) {
  known_key_t *probe = known_make(key, len, 0);
  if (!probe)
    return -1;
  void *node = tfind(probe, &w->known, known_cmp);
  free(probe);
  return node ? (*(known_key_t **)node)->mod : -1;
}

/* ---------------------------------------------------------------- delivery */

static void watcher_free(coord__watcher_t *w);

/* Drops one in_cb reference (ws->mu held); frees an orphan at zero.
 * Returns 1 if w was freed. */
static int unref_locked(watches_t *ws, coord__watcher_t *w) {
  assert(w->in_cb > 0);
  w->in_cb--;
  pthread_cond_broadcast(&ws->cv);
  if (w->in_cb == 0 && w->orphan) {
    watcher_free(w);
    return 1;
  }
  return 0;
}

/* Calls w's callback without ws->mu.  Called and returns with ws->mu held;
 * the in_cb reference is taken before the lock is let go, so that a
 * coord__watch_remove on another thread, which waits for in_cb to reach 0,
 * cannot free w between the caller's last look at it and the call.  Returns
 * 1 if w was freed (an orphan whose callback removed it): the caller must not
 * touch w again.  A caller that holds its own reference never sees 1. */
static int deliver_locked(watches_t *ws, coord__watcher_t *w, const coord_event_t *evs, size_t n,
                          int status) {
  if (w->state == W_DEAD)
    return 0;
  w->in_cb++;
  pthread_mutex_unlock(&ws->mu);
  w->cb(w->arg, evs, n, status);
  pthread_mutex_lock(&ws->mu);
  return unref_locked(ws, w);
}

static void events_free(coord_event_t *evs, size_t n) {
  for (size_t i = 0; i < n; i++)
    coord__event_clear(&evs[i]);
  free(evs);
}

static coord__watcher_t *find_locked(watches_t *ws, int64_t id) {
  for (coord__watcher_t *w = ws->list; w; w = w->next)
    if (w->id == id)
      return w;
  return NULL;
}

/* Sends the create request for w (ws->mu held). */
static void send_create_locked(watches_t *ws, coord__watcher_t *w) {
  if (!ws->stream || w->state != W_PENDING)
    return;
  Etcdserverpb__WatchCreateRequest cr = ETCDSERVERPB__WATCH_CREATE_REQUEST__INIT;
  cr.key.data = (uint8_t *)w->key;
  cr.key.len = w->klen;
  if (w->end) {
    cr.range_end.data = (uint8_t *)w->end;
    cr.range_end.len = w->elen;
  }
  cr.start_revision = w->next_rev;
  cr.watch_id = w->id;
  Etcdserverpb__WatchRequest req = ETCDSERVERPB__WATCH_REQUEST__INIT;
  req.request_union_case = ETCDSERVERPB__WATCH_REQUEST__REQUEST_UNION_CREATE_REQUEST;
  req.create_request = &cr;
  if (coord__stream_send(ws->stream, &req.base) == 0)
    w->state = W_CREATING;
}

static void send_cancel_locked(watches_t *ws, int64_t id) {
  if (!ws->stream)
    return;
  Etcdserverpb__WatchCancelRequest cr = ETCDSERVERPB__WATCH_CANCEL_REQUEST__INIT;
  cr.watch_id = id;
  Etcdserverpb__WatchRequest req = ETCDSERVERPB__WATCH_REQUEST__INIT;
  req.request_union_case = ETCDSERVERPB__WATCH_REQUEST__REQUEST_UNION_CANCEL_REQUEST;
  req.cancel_request = &cr;
  coord__stream_send(ws->stream, &req.base);
}

/* Opens the stream if needed and sends every pending create (ws->mu held). */
static void kick_locked(watches_t *ws) {
  coord_t *c = ws->c;
  if (ws->closed)
    return;
  if (!ws->stream && coord__now_ms() >= ws->reconnect_at) {
    int any = 0;
    for (coord__watcher_t *w = ws->list; w; w = w->next)
      any |= w->state != W_DEAD;
    if (any)
      ws->stream = coord__stream_open(c, coord__endpoint_current(c), "/etcdserverpb.Watch/Watch",
                                      &etcdserverpb__watch_response__descriptor, 1, &watch_ops, ws);
  }
  for (coord__watcher_t *w = ws->list; w; w = w->next)
    send_create_locked(ws, w);
}

/* ---------------------------------------------------------------- resync */

typedef struct diff {
  coord_event_t *evs;
  size_t n, cap;
} diff_t;

static int diff_push(diff_t *d, coord_event_t *ev) {
  if (d->n == d->cap) {
    size_t cap = d->cap ? d->cap * 2 : 16;
    coord_event_t *nv = realloc(d->evs, cap * sizeof *nv);
    if (!nv)
      return -1;
    d->evs = nv;
    d->cap = cap;
  }
  d->evs[d->n++] = *ev;
  return 0;
}

static coord__watcher_t *walk_w;
static coord_kv_result_t *walk_r;
static diff_t *walk_d;
static int64_t walk_rev;

static int kv_in_result(const coord_kv_result_t *r, const char *key, size_t len) {
  /* results are sorted by key (etcd's default order) */
  size_t lo = 0, hi = r->n;
  while (lo < hi) {
    size_t mid = (lo + hi) / 2;
    const coord_kv_t *kv = &r->kvs[mid];
    size_t n = kv->key_len < len ? kv->key_len : len;
    int c = memcmp(kv->key, key, n);
    if (!c)
      c = (kv->key_len > len) - (kv->key_len < len);
    if (!c)
      return 1;
    if (c < 0)
      lo = mid + 1;
    else
      hi = mid;
  }
  return 0;
}

/* twalk visitor: known keys absent from the re-read become DELETEs.  twalk
 * has no user pointer; the walk runs on the event thread only, under the
 * watcher's state RESYNC, so the file statics above are not shared. */
static void vanished(const void *node, VISIT v, int depth) {
  COORD_UNUSED(depth);
  if (v != postorder && v != leaf)
    return;
  const known_key_t *k = *(known_key_t *const *)node;
  size_t ns = coord__ns_len(walk_w->ws->c);
  const char *rel = k->len >= ns ? k->key + ns : "";
  size_t rlen = k->len >= ns ? k->len - ns : 0;
  if (kv_in_result(walk_r, rel, rlen))
    return;
  coord_event_t ev;
  memset(&ev, 0, sizeof ev);
  ev.type = COORD_EVENT_DELETE;
  ev.kv.key = coord__strndup(rel, rlen);
  ev.kv.key_len = rlen;
  ev.kv.value = coord__strdup("");
  ev.kv.mod_revision = walk_rev;
  ev.revision = walk_rev;
  if (!ev.kv.key || !ev.kv.value || diff_push(walk_d, &ev))
    coord__event_clear(&ev);
}

static int by_revision(const void *a, const void *b) {
  const coord_event_t *x = a, *y = b;
  return (x->revision > y->revision) - (x->revision < y->revision);
}

static pthread_mutex_t walk_mu = PTHREAD_MUTEX_INITIALIZER;

/* The events that turn `known` into the state r; updates `known`. */
static void compute_diff(coord__watcher_t *w, coord_kv_result_t *r, int all, diff_t *d) {
  size_t ns = coord__ns_len(w->ws->c);
  /* first the vanished keys, while r still holds every kv */
  pthread_mutex_lock(&walk_mu);
  walk_w = w, walk_r = r, walk_d = d, walk_rev = r->revision;
  twalk(w->known, vanished);
  pthread_mutex_unlock(&walk_mu);
  for (size_t i = 0; i < r->n; i++) {
    coord_kv_t *kv = &r->kvs[i];
    char *full = coord__sprintf("%.*s%s", (int)ns, w->key, kv->key);
    if (!full)
      continue;
    int64_t have = known_get(w, full, ns + kv->key_len);
    if (all || have != kv->mod_revision) {
      coord_event_t ev;
      memset(&ev, 0, sizeof ev);
      ev.type = COORD_EVENT_PUT;
      ev.kv = *kv;
      ev.revision = kv->mod_revision;
      memset(kv, 0, sizeof *kv); /* moved into the event */
      if (diff_push(d, &ev))
        coord__event_clear(&ev);
    }
    free(full);
  }
  if (d->n > 1) /* d->evs is NULL when nothing differs: qsort(NULL, 0) is UB */
    qsort(d->evs, d->n, sizeof *d->evs, by_revision);
  /* apply to known */
  for (size_t i = 0; i < d->n; i++) {
    coord_event_t *ev = &d->evs[i];
    char *full = coord__sprintf("%.*s%s", (int)ns, w->key, ev->kv.key);
    if (full)
      known_set(w, full, ns + ev->kv.key_len, ev->type == COORD_EVENT_PUT ? ev->kv.mod_revision : -1);
    free(full);
  }
}

static int start_range_locked(watches_t *ws, coord__watcher_t *w, int state);

/* A read that failed for want of etcd is tried again after a back-off; the
 * watcher's in_cb reference is held across the wait. */
static void retry_range(coord_t *c, void *arg) {
  coord__watcher_t *w = arg;
  watches_t *ws = w->ws;
  COORD_UNUSED(c);
  pthread_mutex_lock(&ws->mu);
  int state = w->state;
  if (state != W_DEAD && start_range_locked(ws, w, state) == 0) {
    unref_locked(ws, w); /* the new read holds its own reference */
    pthread_mutex_unlock(&ws->mu);
    return;
  }
  unref_locked(ws, w);
  pthread_mutex_unlock(&ws->mu);
}

/* Seed (first read) and resync (after compaction) both end here. */
static void range_done(coord_t *c, int status, coord_kv_result_t *r, void *arg) {
  coord__watcher_t *w = arg;
  watches_t *ws = w->ws;
  pthread_mutex_lock(&ws->mu);
  int state = w->state;
  if (state == W_DEAD) {
    unref_locked(ws, w);
    pthread_mutex_unlock(&ws->mu);
    coord_kv_result_free(r);
    return;
  }
  if (status == COORD_EUNAVAILABLE || status == COORD_ETIMEDOUT) {
    pthread_mutex_unlock(&ws->mu);
    coord__after(c, coord__backoff_ms(c, 4), retry_range, w); /* keeps the reference */
    return;
  }
  if (status) {
    /* the watch cannot go on (permission denied, compacted seed, ...) */
    deliver_locked(ws, w, NULL, 0, status); /* the read's reference keeps w */
    w->state = W_DEAD;
    unref_locked(ws, w); /* the read's reference */
    pthread_mutex_unlock(&ws->mu);
    return;
  }
  diff_t d = {0};
  if (state == W_SEEDING && !w->with_current) {
    /* the seed only fills known */
    size_t ns = coord__ns_len(c);
    for (size_t i = 0; i < r->n; i++) {
      char *full = coord__sprintf("%.*s%s", (int)ns, w->key, r->kvs[i].key);
      if (full)
        known_set(w, full, ns + r->kvs[i].key_len, r->kvs[i].mod_revision);
      free(full);
    }
  } else {
    compute_diff(w, r, state == W_SEEDING, &d);
  }
  if (state == W_RESYNC || w->next_rev == 0)
    w->next_rev = r->revision + 1;
  w->state = W_PENDING;
  kick_locked(ws);
  if (d.n)
    deliver_locked(ws, w, d.evs, d.n, 0); /* the read's reference keeps w */
  unref_locked(ws, w);                    /* the read's reference, dropped last */
  pthread_mutex_unlock(&ws->mu);
  coord_kv_result_free(r);
  events_free(d.evs, d.n);
}

/* Starts a seed or resync read (ws->mu held; takes an in_cb reference so
 * that the watcher outlives the read). */
static int start_range_locked(watches_t *ws, coord__watcher_t *w, int state) {
  w->state = state;
  w->in_cb++;
  coord_range_opts_t o = {0};
  o.prefix = w->prefix;
  if (state == W_SEEDING && w->next_rev > 1)
    o.revision = w->next_rev - 1;
  if (state == W_SEEDING && !w->with_current)
    o.keys_only = 1;
  int rc = coord__get_async(ws->c, w->rel_key, &o, range_done, w);
  if (rc)
    w->in_cb--;
  return rc;
}

/* ---------------------------------------------------------------- stream */

static void on_response(coord__stream_t *s, ProtobufCMessage *msg, void *arg) {
  watches_t *ws = arg;
  Etcdserverpb__WatchResponse *r = (Etcdserverpb__WatchResponse *)msg;
  COORD_UNUSED(s);
  pthread_mutex_lock(&ws->mu);
  ws->failures = 0;
  coord__watcher_t *w = find_locked(ws, r->watch_id);
  if (!w || w->state == W_DEAD) {
    pthread_mutex_unlock(&ws->mu);
    return;
  }
  if (r->created && !r->canceled && w->state == W_CREATING)
    w->state = W_ACTIVE;
  if (r->canceled || r->compact_revision > 0) {
    if (r->compact_revision > 0) {
      /* next_rev was compacted: re-read and emit the difference */
      if (start_range_locked(ws, w, W_RESYNC) == 0) {
        pthread_mutex_unlock(&ws->mu);
        return;
      }
    }
    const char *why = r->cancel_reason && *r->cancel_reason ? r->cancel_reason : "cancelled by etcd";
    int code = strstr(why, "permission") ? COORD_EACCES : COORD_EIO;
    coord__err(code, "watch cancelled: %s", why);
    if (!deliver_locked(ws, w, NULL, 0, code))
      w->state = W_DEAD;
    pthread_mutex_unlock(&ws->mu);
    return;
  }
  if (!r->n_events) {
    pthread_mutex_unlock(&ws->mu);
    return;
  }
  coord_event_t *evs = calloc(r->n_events, sizeof *evs);
  size_t n = 0;
  for (size_t i = 0; evs && i < r->n_events; i++) {
    Mvccpb__Event *e = r->events[i];
    if (!e->kv || e->kv->mod_revision < w->next_rev)
      continue; /* delivered before a reconnect */
    coord_event_t *ev = &evs[n];
    if (coord__kv_from_pb(ws->c, e->kv, &ev->kv))
      continue;
    ev->type = e->type == MVCCPB__EVENT__EVENT_TYPE__DELETE ? COORD_EVENT_DELETE : COORD_EVENT_PUT;
    ev->revision = e->kv->mod_revision;
    known_set(w, (const char *)e->kv->key.data, e->kv->key.len,
              ev->type == COORD_EVENT_PUT ? ev->revision : -1);
    n++;
  }
  if (n) {
    w->next_rev = evs[n - 1].revision + 1;
    deliver_locked(ws, w, evs, n, 0);
  }
  pthread_mutex_unlock(&ws->mu);
  events_free(evs, n);
}

static void on_end(coord__stream_t *s, int status, void *arg) {
  watches_t *ws = arg;
  coord_t *c = ws->c;
  COORD_UNUSED(status);
  int ep = coord__stream_endpoint(s);
  pthread_mutex_lock(&ws->mu);
  ws->stream = NULL;
  for (coord__watcher_t *w = ws->list; w; w = w->next)
    if (w->state == W_CREATING || w->state == W_ACTIVE)
      w->state = W_PENDING; /* re-create from next_rev on the next stream */
  int closed = ws->closed;
  if (!closed) {
    ws->failures++;
    ws->reconnect_at = coord__now_ms() + coord__backoff_ms(c, ws->failures);
  }
  pthread_cond_broadcast(&ws->cv);
  pthread_mutex_unlock(&ws->mu);
  if (!closed)
    coord__endpoint_failed(c, ep);
}

static const coord__stream_ops_t watch_ops = {"Watch", on_response, on_end};

static void tick(coord_t *c, void *arg) {
  watches_t *ws = arg;
  pthread_mutex_lock(&ws->mu);
  if (ws->closed) {
    ws->ticking = 0;
    pthread_cond_broadcast(&ws->cv);
    pthread_mutex_unlock(&ws->mu);
    return;
  }
  kick_locked(ws);
  pthread_mutex_unlock(&ws->mu);
  coord__after(c, TICK_MS, tick, ws);
}

/* ---------------------------------------------------------------- add/remove */

int coord__watch_add_ex(coord_t *c, const char *key, int prefix, int64_t start_rev, int with_current,
                        coord__watch_cb cb, void *arg, coord__watcher_t **out) {
  if (!c || !key || !cb || !out || start_rev < 0)
    return coord__err(COORD_EINVAL, "watch: bad argument");
  if (!*key && !prefix)
    return coord__err(COORD_EINVAL, "watch: key is empty");
  watches_t *ws = coord__slot(c, COORD__SLOT_WATCH, watches_new);
  if (!ws)
    return coord__err(COORD_ENOMEM, "out of memory");
  coord__watcher_t *w = calloc(1, sizeof *w);
  if (!w)
    return coord__err(COORD_ENOMEM, "out of memory");
  w->ws = ws;
  w->cb = cb;
  w->arg = arg;
  w->prefix = prefix;
  w->with_current = with_current;
  w->next_rev = start_rev;
  w->rel_key = coord__strdup(key);
  w->key = coord__key(c, key, &w->klen);
  if (w->key && prefix)
    w->end = coord__prefix_end(w->key, w->klen, &w->elen);
  if (!w->rel_key || !w->key || (prefix && !w->end)) {
    free(w->rel_key), free(w->key), free(w->end), free(w);
    return coord__err(COORD_ENOMEM, "out of memory");
  }
  pthread_mutex_lock(&ws->mu);
  if (ws->closed) {
    pthread_mutex_unlock(&ws->mu);
    free(w->rel_key), free(w->key), free(w->end), free(w);
    return coord__err(COORD_ECLOSED, "client closing");
  }
  w->id = ws->next_id++;
  w->next = ws->list;
  ws->list = w;
  int rc = start_range_locked(ws, w, W_SEEDING);
  if (rc) {
    ws->list = w->next;
    pthread_mutex_unlock(&ws->mu);
    free(w->rel_key), free(w->key), free(w->end), free(w);
    return rc;
  }
  int start = !ws->ticking;
  ws->ticking = 1;
  pthread_mutex_unlock(&ws->mu);
  if (start)
    coord__after(c, 0, tick, ws);
  *out = w;
  return 0;
}

int coord__watch_add(coord_t *c, const char *key, int prefix, int64_t start_rev, coord__watch_cb cb,
                     void *arg, coord__watcher_t **out) {
  return coord__watch_add_ex(c, key, prefix, start_rev, 0, cb, arg, out);
}

static void watcher_free(coord__watcher_t *w) {
  tdestroy(w->known, free);
  free(w->rel_key);
  free(w->key);
  free(w->end);
  free(w);
}

void coord__watch_remove(coord__watcher_t *w) {
  if (!w)
    return;
  watches_t *ws = w->ws;
  coord_t *c = ws->c;
  int on_loop = coord__on_event_thread(c);
  pthread_mutex_lock(&ws->mu);
  int was_live = w->state == W_CREATING || w->state == W_ACTIVE;
  w->state = W_DEAD;
  if (was_live)
    send_cancel_locked(ws, w->id);
  for (coord__watcher_t **pp = &ws->list; *pp; pp = &(*pp)->next) {
    if (*pp == w) {
      *pp = w->next;
      break;
    }
  }
  if (on_loop) {
    /* From a callback (maybe this watcher's own): waiting would deadlock,
     * since whatever holds a reference runs on this very thread. */
    if (w->in_cb) {
      w->orphan = 1; /* freed by whoever drops the last reference */
      pthread_mutex_unlock(&ws->mu);
      return;
    }
    pthread_mutex_unlock(&ws->mu);
    watcher_free(w);
    return;
  }
  while (w->in_cb)
    pthread_cond_wait(&ws->cv, &ws->mu);
  pthread_mutex_unlock(&ws->mu);
  watcher_free(w);
}

void coord__watches_close(coord_t *c) {
  watches_t *ws = coord__slot_get(c, COORD__SLOT_WATCH);
  if (!ws)
    return;
  pthread_mutex_lock(&ws->mu);
  ws->closed = 1;
  coord__watcher_t *list = ws->list;
  ws->list = NULL;
  if (ws->stream)
    coord__stream_cancel(ws->stream);
  pthread_mutex_unlock(&ws->mu);
  while (list) {
    coord__watcher_t *w = list;
    list = w->next;
    pthread_mutex_lock(&ws->mu);
    while (w->in_cb)
      pthread_cond_wait(&ws->cv, &ws->mu);
    int dead = w->state == W_DEAD;
    w->state = W_ACTIVE;
    pthread_mutex_unlock(&ws->mu);
    if (!dead) {
      coord__err(COORD_ECLOSED, "client closed");
      w->cb(w->arg, NULL, 0, COORD_ECLOSED);
    }
    watcher_free(w);
  }
  pthread_mutex_lock(&ws->mu);
  while (ws->stream || ws->ticking)
    pthread_cond_wait(&ws->cv, &ws->mu);
  pthread_mutex_unlock(&ws->mu);
  pthread_mutex_destroy(&ws->mu);
  pthread_cond_destroy(&ws->cv);
  free(ws);
}

/* ---------------------------------------------------------------- public */

/* coord_watch_t: a watcher whose callback queues decoded copies of the
 * events; an eventfd is readable while the queue is not empty.  pw->mu
 * guards the queue, `status` and `ended`; the condition variable wakes
 * coord_watch_next. */
typedef struct qev {
  coord_event_t *ev;
  struct qev *next;
} qev_t;

struct coord_watch_s {
  coord_t *c;
  coord__watcher_t *w;
  coord__decode_fn decode;
  void *decode_arg;
  pthread_mutex_t mu;
  pthread_cond_t cv;
  int efd;
  qev_t *head, *tail;
  int status; /* error that ended the watch, 0 while it runs */
  int ended;  /* the watcher is gone (client closed or failed) */
};

static void public_cb(void *arg, const coord_event_t *evs, size_t n, int status) {
  coord_watch_t *pw = arg;
  qev_t *head = NULL, **tail = &head;
  size_t added = 0;
  for (size_t i = 0; i < n; i++) {
    coord_event_t *ev = malloc(sizeof *ev);
    qev_t *q = malloc(sizeof *q);
    if (!ev || !q || coord__event_copy(&evs[i], ev)) {
      free(ev), free(q);
      continue;
    }
    if (pw->decode && pw->decode(pw->c, ev, pw->decode_arg)) {
      coord_event_free(ev);
      free(q);
      continue;
    }
    q->ev = ev;
    q->next = NULL;
    *tail = q;
    tail = &q->next;
    added++;
  }
  pthread_mutex_lock(&pw->mu);
  int was_empty = pw->head == NULL;
  if (head) {
    if (pw->tail)
      pw->tail->next = head;
    else
      pw->head = head;
    for (qev_t *q = head; q; q = q->next)
      pw->tail = q;
  }
  if (status) {
    pw->status = status;
    pw->ended = 1;
  }
  if (was_empty && (added || status)) {
    uint64_t one = 1;
    ssize_t wr = write(pw->efd, &one, sizeof one);
    COORD_UNUSED(wr);
  }
  pthread_cond_broadcast(&pw->cv);
  pthread_mutex_unlock(&pw->mu);
}

int coord__watch_public(coord_t *c, const char *key, const coord_watch_opts_t *opts, coord__decode_fn decode,
                        void *decode_arg, coord_watch_t **out) {
  if (!c || !key || !out)
    return coord__err(COORD_EINVAL, "coord_watch_create: NULL argument");
  *out = NULL;
  coord_watch_opts_t o = opts ? *opts : (coord_watch_opts_t){0};
  if (o.start_revision < 0)
    return coord__err(COORD_EINVAL, "coord_watch_create: negative start revision");
  if (o.start_revision == 0 && !coord__on_event_thread(c)) {
    /* "From now" means from the revision current when this returns: every
     * change made after the call is delivered, none before it. */
    coord_range_opts_t ro = {0};
    ro.count_only = 1;
    ro.prefix = !*key;
    coord_kv_result_t *r = NULL;
    int rc = coord_kv_get(c, key, &ro, &r);
    if (rc)
      return rc;
    o.start_revision = r->revision + 1;
    coord_kv_result_free(r);
  }
  coord_watch_t *pw = calloc(1, sizeof *pw);
  if (!pw)
    return coord__err(COORD_ENOMEM, "out of memory");
  pw->c = c;
  pw->decode = decode;
  pw->decode_arg = decode_arg;
  pw->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (pw->efd < 0) {
    free(pw);
    return coord__err(COORD_ENOMEM, "eventfd: %s", strerror(errno));
  }
  pthread_mutex_init(&pw->mu, NULL);
  pthread_cond_init(&pw->cv, NULL);
  int rc = coord__watch_add_ex(c, key, o.prefix, o.start_revision, o.with_current, public_cb, pw, &pw->w);
  if (rc) {
    close(pw->efd);
    pthread_mutex_destroy(&pw->mu);
    pthread_cond_destroy(&pw->cv);
    free(pw);
    return rc;
  }
  *out = pw;
  return 0;
}

int coord_watch_create(coord_t *c, const char *key, const coord_watch_opts_t *opts, coord_watch_t **out) {
  if (key && !*key && !(opts && opts->prefix))
    return coord__err(COORD_EINVAL, "coord_watch_create: key is empty");
  return coord__watch_public(c, key, opts, NULL, NULL, out);
}

int coord_watch_fd(coord_watch_t *w) {
  return w ? w->efd : coord__err(COORD_EINVAL, "coord_watch_fd: NULL watch");
}

int coord_watch_next(coord_watch_t *pw, int timeout_ms, coord_event_t **ev) {
  if (!pw || !ev)
    return coord__err(COORD_EINVAL, "coord_watch_next: NULL argument");
  *ev = NULL;
  struct timespec until;
  clock_gettime(CLOCK_MONOTONIC, &until);
  if (timeout_ms > 0) {
    until.tv_sec += timeout_ms / 1000;
    until.tv_nsec += (long)(timeout_ms % 1000) * 1000000;
    if (until.tv_nsec >= 1000000000)
      until.tv_sec++, until.tv_nsec -= 1000000000;
  }
  pthread_mutex_lock(&pw->mu);
  while (!pw->head && !pw->ended && timeout_ms != 0) {
    if (timeout_ms < 0) {
      pthread_cond_wait(&pw->cv, &pw->mu);
    } else {
      /* the condvar runs on CLOCK_REALTIME: wait in short slices */
      struct timespec now, rt;
      clock_gettime(CLOCK_MONOTONIC, &now);
      if (now.tv_sec > until.tv_sec || (now.tv_sec == until.tv_sec && now.tv_nsec >= until.tv_nsec))
        break;
      clock_gettime(CLOCK_REALTIME, &rt);
      long slice_ns = (until.tv_sec - now.tv_sec) * 1000000000L + (until.tv_nsec - now.tv_nsec);
      if (slice_ns > 50000000L)
        slice_ns = 50000000L;
      rt.tv_nsec += slice_ns;
      while (rt.tv_nsec >= 1000000000)
        rt.tv_sec++, rt.tv_nsec -= 1000000000;
      pthread_cond_timedwait(&pw->cv, &pw->mu, &rt);
    }
  }
  int rc;
  if (pw->head) {
    qev_t *q = pw->head;
    pw->head = q->next;
    if (!pw->head)
      pw->tail = NULL;
    *ev = q->ev;
    free(q);
    rc = 0;
  } else if (pw->ended) {
    rc = pw->status ? pw->status : COORD_ECLOSED;
    coord__err(rc, "watch ended: %s", coord_strerror(rc));
  } else {
    rc = coord__err(COORD_ETIMEDOUT, "no event within %d ms", timeout_ms);
  }
  if (!pw->head && !pw->ended) {
    uint64_t v;
    ssize_t rd = read(pw->efd, &v, sizeof v); /* no longer readable */
    COORD_UNUSED(rd);
  }
  pthread_mutex_unlock(&pw->mu);
  return rc;
}

void coord_watch_close(coord_watch_t *pw) {
  if (!pw)
    return;
  pthread_mutex_lock(&pw->mu);
  int ended = pw->ended && pw->status == COORD_ECLOSED;
  pthread_mutex_unlock(&pw->mu);
  if (!ended)
    coord__watch_remove(pw->w); /* after this, public_cb no longer runs */
  while (pw->head) {
    qev_t *q = pw->head;
    pw->head = q->next;
    coord_event_free(q->ev);
    free(q);
  }
  close(pw->efd);
  pthread_mutex_destroy(&pw->mu);
  pthread_cond_destroy(&pw->cv);
  free(pw);
}
