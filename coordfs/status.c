/*
 * status.c — /status: one JSON document made when the file is opened (so a
 * reader sees one consistent snapshot): endpoints, connection state, the
 * cluster as the answering member sees it, and coordfs's counters.
 *
 * Skipped keys: keys that cannot be file names (cfs_key_problem) are left
 * out of the tree.  /status counts them all ("skipped_keys") and names the
 * first SKIPPED_LISTED of them in byte order ("skipped": full etcd keys,
 * "/config/a//b", as JSON strings; bytes that are not UTF-8 become '?', a
 * name longer than SKIPPED_NAME_MAX bytes is cut and ends in "...").  Each
 * is logged once when it appears: at start-up (status_log_skipped_all,
 * at most SKIPPED_LOGGED lines, then one line that says how many more) and
 * from the watch (status_log_skipped, called by events.c when cache_apply
 * raised newbad), not on each later change of the same key.
 *
 * Threads: called from a FUSE worker; one Status call to etcd (1 s
 * deadline), then g.lock for the cache sizes and the skipped keys (copied
 * under the lock, sorted and formatted after it).  The log functions run
 * without g.lock (status_log_skipped_all takes it to copy the names).
 */
#include "coordfs.h"
#include "log.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static json_t *hex(uint64_t v) {
  char b[24];
  snprintf(b, sizeof(b), "%llx", (unsigned long long)v);
  return json_string(b);
}

static uint64_t load(uint64_t *p) {
  return __atomic_load_n(p, __ATOMIC_RELAXED);
}

#define SKIPPED_LISTED 100
#define SKIPPED_LOGGED 1000
#define SKIPPED_NAME_MAX 1024

struct skipped_key {
  char *p; /* the full key ("/config/a//b"), NUL-terminated */
  size_t len;
  size_t pl; /* length of its tree's prefix ("/config/") */
};

struct skipped {
  const char *prefix; /* of the cache being walked */
  struct skipped_key *v;
  size_t n, cap;
};

/* cache_skipped's callback: copies the key. */
static void skipped_add(const char *key, size_t len, void *arg) {
  struct skipped *s = arg;
  if (s->n == s->cap) {
    size_t cap = s->cap ? 2 * s->cap : 16;
    struct skipped_key *v = realloc(s->v, cap * sizeof(*v));
    if (!v)
      return;
    s->v = v;
    s->cap = cap;
  }
  size_t pl = strlen(s->prefix);
  char *p = malloc(pl + len + 1);
  if (!p)
    return;
  memcpy(p, s->prefix, pl);
  memcpy(p + pl, key, len);
  p[pl + len] = 0;
  s->v[s->n].p = p;
  s->v[s->n].len = pl + len;
  s->v[s->n].pl = pl;
  s->n++;
}

static int skipped_cmp(const void *a, const void *b) {
  const struct skipped_key *x = a, *y = b;
  int c = memcmp(x->p, y->p, x->len < y->len ? x->len : y->len);
  return c ? c : (x->len > y->len) - (x->len < y->len);
}

/* Copies both trees' skipped keys.  g.lock held. */
static void skipped_collect_locked(struct skipped *s) {
  memset(s, 0, sizeof(*s));
  if (g.config.nbad) {
    s->prefix = "/config/";
    cache_skipped(&g.config, skipped_add, s);
  }
  if (g.services.nbad) {
    s->prefix = "/services/";
    cache_skipped(&g.services, skipped_add, s);
  }
}

static void skipped_sort(struct skipped *s) {
  if (s->n > 1)
    qsort(s->v, s->n, sizeof(*s->v), skipped_cmp);
}

static void skipped_free(struct skipped *s) {
  for (size_t i = 0; i < s->n; i++)
    free(s->v[i].p);
  free(s->v);
}

/* A JSON string of a key: bytes that are not UTF-8 become '?', a long one
 * is cut. */
static json_t *key_json(const char *p, size_t n) {
  int cut = n > SKIPPED_NAME_MAX;
  char *c = malloc((cut ? SKIPPED_NAME_MAX : n) + 4);
  if (!c)
    return NULL;
  size_t m = cut ? SKIPPED_NAME_MAX : n;
  memcpy(c, p, m);
  if (cut)
    memcpy(c + m, "...", 3), m += 3;
  json_t *s = cfs_json_bytes(c, m);
  free(c);
  return s;
}

/* The key for a log line: printable ASCII as it is, other bytes as \xNN,
 * cut after SKIPPED_NAME_MAX bytes. */
static void key_text(const char *p, size_t n, char *out, size_t size) {
  size_t o = 0;
  for (size_t i = 0; i < n && o + 8 < size; i++) {
    unsigned char ch = (unsigned char)p[i];
    if (i == SKIPPED_NAME_MAX) {
      memcpy(out + o, "...", 3);
      o += 3;
      break;
    }
    if (ch >= 0x20 && ch < 0x7f && ch != '\\')
      out[o++] = (char)ch;
    else
      o += (size_t)snprintf(out + o, size - o, "\\x%02x", ch);
  }
  out[o] = 0;
}

static void log_skipped(const char *full, size_t len, const char *why) {
  char text[4 * SKIPPED_NAME_MAX + 16];
  key_text(full, len, text, sizeof(text));
  cfs_log(LOG_WARNING, "key %s cannot be shown as a file (%s): left out (see \"skipped\" in /status)", text,
          why);
}

void status_log_skipped(const char *prefix, const char *key, size_t len) {
  size_t pl = strlen(prefix);
  char *full = malloc(pl + len + 1);
  if (!full)
    return;
  memcpy(full, prefix, pl);
  memcpy(full + pl, key, len);
  full[pl + len] = 0;
  const char *why = cfs_key_problem(key, len);
  log_skipped(full, pl + len, why ? why : "?");
  free(full);
}

void status_log_skipped_all(void) {
  struct skipped s;
  pthread_mutex_lock(&g.lock);
  skipped_collect_locked(&s);
  pthread_mutex_unlock(&g.lock);
  skipped_sort(&s);
  for (size_t i = 0; i < s.n && i < SKIPPED_LOGGED; i++) {
    size_t pl = s.v[i].pl;
    const char *why = cfs_key_problem(s.v[i].p + pl, s.v[i].len - pl);
    log_skipped(s.v[i].p, s.v[i].len, why ? why : "?");
  }
  if (s.n > SKIPPED_LOGGED)
    cfs_log(LOG_WARNING, "%zu more keys cannot be shown as files (not logged; counted in /status)",
            s.n - SKIPPED_LOGGED);
  skipped_free(&s);
}

int status_snapshot(char **out, size_t *len) {
  coord_status_t st;
  memset(&st, 0, sizeof(st));
  int rc = coord_status(g.c, 1000, &st);
  __atomic_store_n(&g.connected, rc == 0, __ATOMIC_RELAXED);
  json_t *o = json_object();
  if (!o)
    return -ENOMEM;
  json_object_set_new(o, "endpoints", json_string(g.o.endpoints ? g.o.endpoints : ""));
  json_object_set_new(o, "connected", json_boolean(rc == 0));
  json_object_set_new(o, "state", json_string(rc == 0 ? "connected" : "disconnected"));
  if (rc) {
    json_object_set_new(o, "error", json_string(coord_strerror(rc)));
  } else {
    json_object_set_new(o, "endpoint", json_string(st.endpoint));
    json_object_set_new(o, "cluster_id", hex(st.cluster_id));
    json_object_set_new(o, "member_id", hex(st.member_id));
    json_object_set_new(o, "leader", hex(st.leader));
    json_object_set_new(o, "raft_term", json_integer((json_int_t)st.raft_term));
    json_object_set_new(o, "etcd_version", json_string(st.version));
  }
  pthread_mutex_lock(&g.lock);
  int64_t rev = g.config.rev > g.services.rev ? g.config.rev : g.services.rev;
  int nbad = g.config.nbad, sbad = g.services.nbad;
  struct skipped skipped;
  skipped_collect_locked(&skipped);
  pthread_mutex_unlock(&g.lock);
  skipped_sort(&skipped);
  json_object_set_new(o, "revision", json_integer(rc == 0 && st.revision > rev ? st.revision : rev));
  json_object_set_new(o, "mountpoint", json_string(g.o.mountpoint));
  json_object_set_new(o, "prefix", json_string(g.o.prefix ? g.o.prefix : ""));
  json_t *cn = json_object();
  json_object_set_new(cn, "ops", json_integer((json_int_t)load(&g.counters.ops)));
  json_object_set_new(cn, "cache_hits", json_integer((json_int_t)load(&g.counters.cache_hits)));
  json_object_set_new(cn, "events", json_integer((json_int_t)load(&g.counters.events)));
  json_object_set_new(cn, "errors", json_integer((json_int_t)load(&g.counters.errors)));
  json_object_set_new(cn, "commits", json_integer((json_int_t)load(&g.counters.commits)));
  json_object_set_new(cn, "conflicts", json_integer((json_int_t)load(&g.counters.conflicts)));
  json_object_set_new(cn, "skipped_keys", json_integer(nbad + sbad));
  json_object_set_new(o, "counters", cn);
  json_object_set_new(o, "skipped_keys", json_integer(nbad + sbad));
  json_t *sk = json_array();
  for (size_t i = 0; i < skipped.n && i < SKIPPED_LISTED; i++)
    json_array_append_new(sk, key_json(skipped.v[i].p, skipped.v[i].len));
  skipped_free(&skipped);
  json_object_set_new(o, "skipped", sk);
  char *s = json_dumps(o, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
  json_decref(o);
  if (!s)
    return -ENOMEM;
  size_t n = strlen(s);
  char *t = realloc(s, n + 2);
  if (!t) {
    free(s);
    return -ENOMEM;
  }
  t[n] = '\n';
  t[n + 1] = 0;
  *out = t;
  *len = n + 1;
  return 0;
}
