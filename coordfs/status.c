/*
 * status.c — /status: one JSON document made when the file is opened (so a
 * reader sees one consistent snapshot): endpoints, connection state, the
 * cluster as the answering member sees it, and coordfs's counters.
 *
 * Threads: called from a FUSE worker; one Status call to etcd (1 s
 * deadline), then g.lock for the cache sizes.
 */
#include "coordfs.h"

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
  pthread_mutex_unlock(&g.lock);
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
