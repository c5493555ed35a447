/*
 * events.c — the watch thread, and the /events/{config,services,locks}
 * streams.
 *
 * The watch thread owns three prefix watches (/config/, /services/,
 * /locks/) and waits on their coord_watch_fd()s.  For each event it:
 *   1. applies it to the cache (config, services) under g.lock, noting what
 *      was visible before and after;
 *   2. with no lock held: invalidates the kernel's pages and attributes of a
 *      changed file the kernel knows (so the next read gets the new value),
 *      and queues the notifier's self-operations for inotify;
 *   3. appends the event's JSON line to every open stream of that kind that
 *      started before the event's revision, and answers waiting readers and
 *      pollers.
 * A key that cannot be shown is logged when it appears (status.c).  The
 * DELETE of a /services instance that this mount registered and whose file
 * is still open is handed to services.c (services_deleted), which puts it
 * back from a thread of its own: the watch thread never calls etcd.
 * An event whose revision the cache already holds is this mount's own write
 * (applied from the answer to its Put): it is neither invalidated nor
 * echoed to the notifier, but it is still a line in /events/.  An event
 * that arrives while a write of this mount to the same key is in flight
 * (cfs_node.pending) is taken for that write's echo: its pages are dropped
 * but no self-operation is queued.  A write by another client that lands
 * on that key inside that round trip is therefore not reported to inotify
 * (its value is still read back); the writer's own events cover the moment.
 *
 * Streams: a read with nothing queued is kept as a pending fuse_req_t (no
 * worker thread waits) and answered by the watch thread, or with EINTR by
 * the interrupt callback when the reader gets a signal.  A read returns
 * whole lines (a single line longer than the read size is split).  A
 * reader more than STREAM_MAX bytes behind loses the backlog: it is
 * replaced by {"type":"LOST","revision":N} (every event up to N is gone).
 *
 * Locking: ev_lock guards every stream (queues, waiters, poll handles) and
 * the stream lists.  fuse replies and poll notifications are sent after
 * ev_lock is released.  g.lock is never held together with ev_lock.
 */
#include "coordfs.h"

#include <errno.h>
#include <malloc.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

/* Unread bytes kept per open stream. */
#define STREAM_MAX (16u << 20)

struct waiter {
  fuse_req_t req;
  size_t size;
  struct waiter *next;
};

struct cfs_stream {
  int which;
  int64_t start_rev; /* events at or before it are not delivered */
  char *q;           /* whole lines not read yet */
  size_t qlen, qcap;
  struct waiter *waiters;
  struct fuse_pollhandle *ph;
  struct cfs_stream *next;
};

static pthread_mutex_t ev_lock = PTHREAD_MUTEX_INITIALIZER;
static struct cfs_stream *streams[S_NKINDS];

static const char *const watch_prefix[S_NKINDS] = {"/config/", "/services/", "/locks/"};
static coord_watch_t *watches[S_NKINDS];
static int64_t last_rev[S_NKINDS];
static pthread_t thread;
static int thread_started;
static int wake_fd = -1;
static int stopping; /* set by events_stop, read by the watch thread (atomics) */

/* ---------------------------------------------------------------- streams */

/* Takes up to size bytes of whole lines from the queue.  ev_lock held. */
static void take(struct cfs_stream *s, size_t size, char **out, size_t *len) {
  size_t n = s->qlen < size ? s->qlen : size;
  size_t cut = n;
  for (size_t i = n; i > 0; i--)
    if (s->q[i - 1] == '\n') {
      cut = i;
      break;
    }
  *out = malloc(cut ? cut : 1);
  if (!*out) {
    *len = 0;
    return;
  }
  memcpy(*out, s->q, cut);
  memmove(s->q, s->q + cut, s->qlen - cut);
  s->qlen -= cut;
  *len = cut;
}

static void on_interrupt(fuse_req_t req, void *data) {
  (void)data;
  int found = 0;
  pthread_mutex_lock(&ev_lock);
  for (int k = 0; k < S_NKINDS && !found; k++)
    for (struct cfs_stream *s = streams[k]; s && !found; s = s->next)
      for (struct waiter **wp = &s->waiters; *wp; wp = &(*wp)->next)
        if ((*wp)->req == req) {
          struct waiter *w = *wp;
          *wp = w->next;
          free(w);
          found = 1;
          break;
        }
  pthread_mutex_unlock(&ev_lock);
  if (found)
    fuse_reply_err(req, EINTR);
}

static int64_t current_revision(void) {
  coord_range_opts_t ro = {.count_only = 1, .timeout_ms = g.o.timeout_ms};
  coord_kv_result_t *r = NULL;
  int64_t rev = 0;
  if (!coord_kv_get(g.c, "/", &ro, &r))
    rev = r->revision;
  coord_kv_result_free(r);
  if (!rev) {
    pthread_mutex_lock(&g.lock);
    rev = g.config.rev > g.services.rev ? g.config.rev : g.services.rev;
    pthread_mutex_unlock(&g.lock);
  }
  return rev;
}

int events_open(struct cfs_file *f, int which, int nonblock) {
  (void)nonblock;
  if (which < 0)
    return -ENOENT;
  struct cfs_stream *s = calloc(1, sizeof(*s));
  if (!s)
    return -ENOMEM;
  s->which = which;
  s->start_rev = current_revision();
  pthread_mutex_lock(&ev_lock);
  s->next = streams[which];
  streams[which] = s;
  pthread_mutex_unlock(&ev_lock);
  f->stream = s;
  return 0;
}

void events_read(fuse_req_t req, struct cfs_file *f, size_t size, int nonblock) {
  struct cfs_stream *s = f->stream;
  char *data = NULL;
  size_t len = 0;
  pthread_mutex_lock(&ev_lock);
  if (s->qlen) {
    take(s, size, &data, &len);
    pthread_mutex_unlock(&ev_lock);
    fuse_reply_buf(req, data, len);
    free(data);
    return;
  }
  pthread_mutex_unlock(&ev_lock);
  if (nonblock) {
    fuse_reply_err(req, EAGAIN);
    return;
  }
  /* Register the interrupt callback before the request is visible to the
   * watch thread: it may be called at once (already interrupted), then it
   * finds nothing and fuse_req_interrupted() below answers EINTR. */
  fuse_req_interrupt_func(req, on_interrupt, NULL);
  pthread_mutex_lock(&ev_lock);
  if (fuse_req_interrupted(req)) {
    pthread_mutex_unlock(&ev_lock);
    fuse_reply_err(req, EINTR);
    return;
  }
  if (s->qlen) {
    take(s, size, &data, &len);
    pthread_mutex_unlock(&ev_lock);
    fuse_reply_buf(req, data, len);
    free(data);
    return;
  }
  struct waiter *w = calloc(1, sizeof(*w)), **wp;
  if (!w) {
    pthread_mutex_unlock(&ev_lock);
    fuse_reply_err(req, ENOMEM);
    return;
  }
  w->req = req;
  w->size = size;
  for (wp = &s->waiters; *wp; wp = &(*wp)->next)
    ;
  *wp = w;
  pthread_mutex_unlock(&ev_lock);
}

void events_poll(fuse_req_t req, struct cfs_file *f, struct fuse_pollhandle *ph) {
  struct cfs_stream *s = f->stream;
  struct fuse_pollhandle *old = NULL;
  pthread_mutex_lock(&ev_lock);
  if (ph) {
    old = s->ph;
    s->ph = ph;
  }
  unsigned revents = s->qlen ? POLLIN | POLLRDNORM : 0;
  pthread_mutex_unlock(&ev_lock);
  if (old)
    fuse_pollhandle_destroy(old);
  fuse_reply_poll(req, revents);
}

void events_release(struct cfs_file *f) {
  struct cfs_stream *s = f->stream;
  if (!s)
    return;
  pthread_mutex_lock(&ev_lock);
  for (struct cfs_stream **sp = &streams[s->which]; *sp; sp = &(*sp)->next)
    if (*sp == s) {
      *sp = s->next;
      break;
    }
  struct waiter *w = s->waiters;
  s->waiters = NULL;
  pthread_mutex_unlock(&ev_lock);
  while (w) { /* cannot happen: the kernel releases after the last read */
    struct waiter *next = w->next;
    fuse_reply_err(w->req, EINTR);
    free(w);
    w = next;
  }
  if (s->ph)
    fuse_pollhandle_destroy(s->ph);
  free(s->q);
  free(s);
  f->stream = NULL;
}

struct answer {
  fuse_req_t req;
  char *data;
  size_t len;
  struct answer *next;
};

/* Appends line to the streams of kind which that started before rev,
 * then answers readers and pollers. */
static void publish(int which, int64_t rev, const char *line, size_t len) {
  struct answer *answers = NULL;
  struct fuse_pollhandle *phs[64];
  size_t nph = 0;
  pthread_mutex_lock(&ev_lock);
  for (struct cfs_stream *s = streams[which]; s; s = s->next) {
    if (rev <= s->start_rev)
      continue;
    if (s->qlen + len > STREAM_MAX) {
      /* a reader that does not keep up: what it missed is replaced by one
       * line that says so, and the stream goes on from here */
      s->qlen =
          (size_t)snprintf(s->q, s->qcap, "{\"type\":\"LOST\",\"revision\":%lld}\n", (long long)rev - 1);
    }
    if (s->qlen + len > s->qcap) {
      size_t cap = s->qcap ? s->qcap : 4096;
      while (cap < s->qlen + len)
        cap *= 2;
      char *q = realloc(s->q, cap);
      if (!q)
        continue;
      s->q = q;
      s->qcap = cap;
    }
    memcpy(s->q + s->qlen, line, len);
    s->qlen += len;
    while (s->qlen && s->waiters) {
      struct waiter *w = s->waiters;
      s->waiters = w->next;
      struct answer *a = calloc(1, sizeof(*a));
      if (a) {
        a->req = w->req;
        take(s, w->size, &a->data, &a->len);
        a->next = answers;
        answers = a;
      } else {
        fuse_reply_err(w->req, ENOMEM);
      }
      free(w);
    }
    if (s->ph && nph < sizeof(phs) / sizeof(phs[0])) {
      phs[nph++] = s->ph;
      s->ph = NULL;
    }
  }
  pthread_mutex_unlock(&ev_lock);
  while (answers) {
    struct answer *a = answers;
    answers = a->next;
    fuse_reply_buf(a->req, a->data, a->len);
    free(a->data);
    free(a);
  }
  for (size_t i = 0; i < nph; i++) {
    fuse_lowlevel_notify_poll(phs[i]);
    fuse_pollhandle_destroy(phs[i]);
  }
}

/* (coordfs.h; also status.c's key names) */
json_t *cfs_json_bytes(const char *p, size_t n) {
  json_t *s = json_stringn(p, n);
  if (s)
    return s;
  char *c = malloc(n + 1);
  if (!c)
    return NULL;
  for (size_t i = 0; i < n; i++)
    c[i] = (unsigned char)p[i] >= 0x80 || !p[i] ? '?' : p[i];
  s = json_stringn(c, n);
  free(c);
  return s;
}

static void publish_event(int which, const coord_event_t *ev, const char *rel, size_t rel_len) {
  json_t *o = json_object();
  if (!o)
    return;
  json_object_set_new(o, "type", json_string(ev->type == COORD_EVENT_PUT ? "PUT" : "DELETE"));
  json_object_set_new(o, "key", cfs_json_bytes(rel, rel_len));
  json_object_set_new(o, "revision", json_integer(ev->revision));
  if (ev->type == COORD_EVENT_PUT)
    json_object_set_new(o, "value", cfs_json_bytes(ev->kv.value, ev->kv.value_len));
  char *s = json_dumps(o, JSON_COMPACT | JSON_PRESERVE_ORDER);
  json_decref(o);
  if (!s)
    return;
  size_t n = strlen(s);
  char *line = realloc(s, n + 2);
  if (!line) {
    free(s);
    return;
  }
  line[n] = '\n';
  line[n + 1] = 0;
  publish(which, ev->revision, line, n + 1);
  free(line);
}

/* ---------------------------------------------------------------- cache + notifier */

#define MAX_JOBS 64
struct jobs {
  size_t n;
  struct {
    enum cfs_job_op op;
    char *path;
  } j[MAX_JOBS];
};

static void add_job(struct jobs *js, enum cfs_job_op op, const char *top, const char *rel, size_t rel_len,
                    const char *suffix) {
  if (js->n >= MAX_JOBS)
    return;
  char *p = malloc(strlen(top) + rel_len + strlen(suffix) + 2);
  if (!p)
    return;
  sprintf(p, "%s/%.*s%s", top, (int)rel_len, rel, suffix);
  js->j[js->n].op = op;
  js->j[js->n].path = p;
  js->n++;
}

/* What of a key's path was visible, per level. */
#define MAX_DEPTH 64
struct seen {
  int depth;             /* number of path components */
  size_t end[MAX_DEPTH]; /* length of the prefix ending at component i */
  int vis[MAX_DEPTH];    /* component i visible (as dir, or file for the last) */
  int file;              /* the key itself visible as a file */
  int dir;               /* the key itself visible as a directory */
};

static void look(struct cfs_cache *c, const char *key, size_t len, struct seen *s) {
  memset(s, 0, sizeof(*s));
  char *p = strndup(key, len);
  if (!p)
    return;
  for (size_t i = 0; i <= len && s->depth < MAX_DEPTH; i++) {
    if (i == len || p[i] == '/') {
      char save = p[i];
      p[i] = 0;
      struct cfs_node *n = cache_find(c, p);
      s->end[s->depth] = i;
      s->vis[s->depth] = cache_is_dir(n) || (i == len && cache_is_file(n));
      if (i == len) {
        s->file = cache_is_file(n);
        s->dir = cache_is_dir(n);
      }
      p[i] = save;
      s->depth++;
    }
  }
  free(p);
}

/* Applies one event of tree which to its cache and works out the
 * self-operations that make the kernel report it. */
static void apply_event(int which, const coord_event_t *ev, const char *rel, size_t rel_len) {
  struct cfs_cache *c = which == S_CONFIG ? &g.config : &g.services;
  const char *top = which == S_CONFIG ? "config" : "services";
  struct jobs js = {0};
  struct seen before, after;
  /* a key with a local name is hidden on this mount (local.c) */
  int ok = cfs_key_ok(rel, rel_len) && !(which == S_CONFIG && local_name_n(rel, rel_len));
  pthread_mutex_lock(&g.lock);
  char *key = strndup(rel, rel_len);
  struct cfs_node *kn = key ? cache_find(c, key) : NULL;
  free(key);
  /* a write of this mount in flight: the event may be its echo, arriving
   * before the Put's answer; the kernel already saw that operation, so no
   * self-operation is queued.  The kernel's pages are still dropped: the
   * event may instead be another client's write that came in between. */
  int own = kn && kn->pending > 0;
  if (ok)
    look(c, rel, rel_len, &before);
  c->newbad = 0;
  int changed = cache_apply(c, rel, rel_len, ev->type == COORD_EVENT_PUT, ev->kv.value, ev->kv.value_len,
                            ev->revision, ev->kv.create_revision, ev->kv.version, ev->kv.lease);
  int newbad = c->newbad;
  if (ok && changed)
    look(c, rel, rel_len, &after);
  pthread_mutex_unlock(&g.lock);
  if (newbad) /* a key that cannot be shown appeared: said once, here */
    status_log_skipped(which == S_CONFIG ? "/config/" : "/services/", rel, rel_len);
  if (!ok || !changed || before.depth != after.depth)
    return;
  int d = after.depth;
  if (after.file && before.file) {
    add_job(&js, J_MODIFY, top, rel, rel_len, after.dir ? "/.value" : "");
  } else if (after.file && !before.file) {
    /* the first component that was not there is the new name */
    for (int i = 0; i < d; i++)
      if (!before.vis[i]) {
        if (i == d - 1)
          add_job(&js, J_CREATE, top, rel, rel_len, "");
        else
          add_job(&js, J_MKDIR, top, rel, after.end[i], "");
        break;
      }
    if (before.dir)
      add_job(&js, J_CREATE, top, rel, rel_len, "/.value");
  } else if (!after.file && before.file) {
    add_job(&js, J_UNLINK, top, rel, rel_len, before.dir ? "/.value" : "");
    /* Not for /services/<name>: every name there can be looked up (opening
     * <name>/<id> registers), so removing the directory when its last
     * instance leaves only makes a concurrent registration in it fail with
     * ENOENT (its path walk ends in the removed directory). */
    for (int i = d - 2; i >= 0 && which != S_SERVICES; i--)
      if (before.vis[i] && !after.vis[i])
        add_job(&js, J_RMDIR, top, rel, before.end[i], "");
  }
  for (size_t i = 0; i < js.n; i++) {
    char *p = js.j[i].path;
    char *slash = strrchr(p, '/');
    fuse_ino_t ino = cfs_inode_known(p);
    *slash = 0;
    fuse_ino_t parent = cfs_inode_known(p);
    *slash = '/';
    if (js.j[i].op == J_MODIFY && ino) /* the next read must see the new value */
      fuse_lowlevel_notify_inval_inode(g.se, ino, 0, 0);
    if (!own && (ino || parent))
      notifier_queue(js.j[i].op, p, ino);
    free(p);
  }
}

/* ---------------------------------------------------------------- the watch thread */

static int open_watch(int k, int64_t start) {
  coord_watch_opts_t wo = {.prefix = 1, .start_revision = start};
  /* with --subtree, /config is watched below the subtree only; events keep
   * their path relative to watch_prefix (see handle) */
  const char *p = k == S_CONFIG && g.o.config_root ? g.o.config_root : watch_prefix[k];
  int rc = coord_watch_create(g.c, p, &wo, &watches[k]);
  if (rc)
    watches[k] = NULL;
  return rc;
}

static void handle(int k, coord_event_t *ev) {
  size_t pl = strlen(watch_prefix[k]);
  if (ev->kv.key_len < pl)
    return;
  const char *rel = ev->kv.key + pl;
  size_t rel_len = ev->kv.key_len - pl;
  CFS_COUNT(events);
  if (ev->revision > last_rev[k])
    last_rev[k] = ev->revision;
  if (k != S_LOCKS) {
    apply_event(k, ev, rel, rel_len);
    if (k == S_SERVICES && ev->type == COORD_EVENT_DELETE) /* hands off, never blocks */
      services_deleted(rel, rel_len, ev->revision);
    struct cfs_cache *c = k == S_CONFIG ? &g.config : &g.services;
    char *key = strndup(rel, rel_len);
    pthread_mutex_lock(&g.lock);
    if (ev->revision > c->notified)
      c->notified = ev->revision;
    if (key && ev->type == COORD_EVENT_DELETE)
      cache_prune(c, key);
    pthread_cond_broadcast(&g.cond);
    pthread_mutex_unlock(&g.lock);
    free(key);
  }
  publish_event(k, ev, rel, rel_len);
}

/* A watch that failed (or was refused: a user without read permission on
 * that prefix) is opened again after WATCH_RETRY_MS, from its last event. */
#define WATCH_RETRY_MS 500

/* Handles every event queued on watch k.  Returns how many; a watch that
 * ended is closed and reopened after WATCH_RETRY_MS (from its last event). */
static int drain(int k, int64_t now_ms, int64_t *retry_at) {
  int handled = 0;
  for (;;) {
    coord_event_t *ev = NULL;
    int rc = coord_watch_next(watches[k], 0, &ev);
    if (rc == COORD_ETIMEDOUT)
      break;
    if (rc) {
      CFS_COUNT(errors);
      coord_watch_close(watches[k]);
      watches[k] = NULL;
      *retry_at = now_ms + WATCH_RETRY_MS;
      break;
    }
    handle(k, ev);
    coord_event_free(ev);
    handled++;
  }
  return handled;
}

/* Memory given back.  The initial load, the watches' seed reads and a
 * burst of events free much more than they keep, and glibc holds on to
 * what was freed (measured with 110,000 keys: 115 MiB resident for a live
 * heap of 51 MB, 56 MiB after malloc_trim).  So once the watch thread has
 * been quiet for TRIM_QUIET_MS after start-up, or after TRIM_EVENTS
 * events, it calls malloc_trim(0).  Start-up trims twice, the second time
 * TRIM_AGAIN_MS later, for seed reads of a large tree that finish after
 * the first quiet second.  Only the watch thread touches this. */
#define TRIM_QUIET_MS 1000
#define TRIM_AGAIN_MS 5000
#define TRIM_EVENTS 1000

struct trim {
  int64_t at;  /* when to trim if still quiet (ms, monotonic); 0: not due */
  int startup; /* start-up trims still to come */
  int events;  /* events since the last trim */
};

static void trim_note(struct trim *t, int64_t now_ms, int handled) {
  t->events += handled;
  if (handled && (t->startup || t->events >= TRIM_EVENTS))
    t->at = now_ms + TRIM_QUIET_MS; /* wait for quiet again */
}

/* The poll timeout that the trim asks for (-1: none). */
static int trim_wait(const struct trim *t, int64_t now_ms) {
  return !t->at ? -1 : t->at <= now_ms ? 0 : (int)(t->at - now_ms);
}

static void trim_maybe(struct trim *t, int64_t now_ms) {
  if (!t->at || now_ms < t->at)
    return;
  malloc_trim(0);
  t->events = 0;
  t->at = t->startup > 1 ? now_ms + TRIM_AGAIN_MS : 0;
  if (t->startup)
    t->startup--;
}

static int64_t mono_ms(void) {
  struct timespec now;
  clock_gettime(CLOCK_MONOTONIC, &now);
  return (int64_t)now.tv_sec * 1000 + now.tv_nsec / 1000000;
}

static void *watch_main(void *arg) {
  (void)arg;
  int64_t retry_at[S_NKINDS] = {0};
  struct trim trim = {.at = mono_ms() + TRIM_QUIET_MS, .startup = 2};
  while (!__atomic_load_n(&stopping, __ATOMIC_ACQUIRE)) {
    struct pollfd pfd[S_NKINDS + 1];
    int idx[S_NKINDS + 1], n = 0, broken = 0;
    int64_t now_ms = mono_ms();
    for (int k = 0; k < S_NKINDS; k++) {
      if (!watches[k] && (now_ms < retry_at[k] || open_watch(k, last_rev[k] + 1))) {
        if (now_ms >= retry_at[k])
          retry_at[k] = now_ms + WATCH_RETRY_MS;
        broken = 1;
        continue;
      }
      pfd[n].fd = coord_watch_fd(watches[k]);
      pfd[n].events = POLLIN;
      idx[n++] = k;
    }
    pfd[n].fd = wake_fd;
    pfd[n].events = POLLIN;
    idx[n++] = -1;
    int wait = trim_wait(&trim, now_ms);
    if (broken && (wait < 0 || wait > WATCH_RETRY_MS))
      wait = WATCH_RETRY_MS;
    int ready = poll(pfd, (nfds_t)n, wait);
    if (ready < 0 && errno != EINTR)
      break;
    now_ms = mono_ms();
    int handled = 0;
    for (int i = 0; i < n; i++)
      if (idx[i] >= 0 && (pfd[i].revents & (POLLIN | POLLERR | POLLHUP)))
        handled += drain(idx[i], now_ms, &retry_at[idx[i]]);
    trim_note(&trim, now_ms, handled);
    if (ready == 0)
      trim_maybe(&trim, now_ms);
  }
  return NULL;
}

int events_start(void) {
  wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (wake_fd < 0)
    return COORD_EIO;
  pthread_mutex_lock(&g.lock);
  last_rev[S_CONFIG] = g.config.rev;
  last_rev[S_SERVICES] = g.services.rev;
  last_rev[S_LOCKS] = g.config.rev > g.services.rev ? g.config.rev : g.services.rev;
  pthread_mutex_unlock(&g.lock);
  for (int k = 0; k < S_NKINDS; k++) {
    int rc = open_watch(k, last_rev[k] + 1);
    if (rc && rc != COORD_EACCES)
      return rc;
  }
  if (pthread_create(&thread, NULL, watch_main, NULL))
    return COORD_ENOMEM;
  thread_started = 1;
  return 0;
}

void events_stop(void) {
  if (wake_fd < 0)
    return;
  __atomic_store_n(&stopping, 1, __ATOMIC_RELEASE);
  uint64_t one = 1;
  if (write(wake_fd, &one, sizeof(one)) < 0) {
    /* nothing to do: the thread also wakes on its next event */
  }
  if (thread_started)
    pthread_join(thread, NULL);
  thread_started = 0;
  for (int k = 0; k < S_NKINDS; k++)
    if (watches[k]) {
      coord_watch_close(watches[k]);
      watches[k] = NULL;
    }
  close(wake_fd);
  wake_fd = -1;
}
