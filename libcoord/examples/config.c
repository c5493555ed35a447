/*
 * config.c — example: the configuration centre of libcoord.
 *
 * Sets a few values under /config/example/..., reads them back as JSON and
 * with jansson's pack/unpack formats, lists the "example" prefix, watches
 * it while one value changes, and cleans up.  Exits 0 on success.
 *
 *   COORD_ENDPOINTS=127.0.0.1:2379 ./config
 *
 * (Endpoints from $COORD_ENDPOINTS, else localhost:2379.)
 */
#include <coord.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CHECK(what, rc)                                                                                      \
  do {                                                                                                       \
    int rc_ = (rc);                                                                                          \
    if (rc_ < 0) {                                                                                           \
      fprintf(stderr, "%s failed: %s (%s)\n", what, coord_strerror(rc_), coord_last_error());                \
      exit(1);                                                                                               \
    }                                                                                                        \
  } while (0)

static void print_value(const char *label, const json_t *v) {
  char *s = json_dumps(v, JSON_COMPACT | JSON_ENCODE_ANY);
  printf("%s %s\n", label, s ? s : "?");
  free(s);
}

int main(void) {
  coord_t *c = NULL;
  CHECK("coord_new", coord_new(NULL, &c));

  /* 1. set: any JSON value; a plain string is stored as its raw bytes. */
  json_t *db = json_pack("{s:s, s:i, s:[s,s]}", "host", "db.internal", "port", 5432, "replicas", "r1", "r2");
  json_t *greeting = json_string("hello, world");
  CHECK("set example/db", coord_config_set(c, "example/db", db));
  CHECK("set example/greeting", coord_config_set(c, "example/greeting", greeting));
  json_decref(db);
  json_decref(greeting);

  /* 2. get: the value as JSON. */
  json_t *v = NULL;
  CHECK("get example/db", coord_config_get(c, "example/db", &v));
  print_value("example/db =", v);
  json_decref(v);

  /* 3. pack / unpack: typed access in jansson's format language. */
  CHECK("pack example/limits",
        coord_config_pack(c, "example/limits", "{s:i, s:f}", "max_conns", 100, "ratio", 0.75));
  const char *host = NULL;
  int port = 0, max_conns = 0;
  double ratio = 0;
  CHECK("unpack example/db",
        coord_config_unpack(c, "example/db", "{s:s, s:i}", "host", &host, "port", &port));
  CHECK("unpack example/limits",
        coord_config_unpack(c, "example/limits", "{s:i, s:f}", "max_conns", &max_conns, "ratio", &ratio));
  printf("db at %s:%d, max_conns %d, ratio %.2f\n", host, port, max_conns, ratio);
  /* A wrong format is COORD_EFORMAT with jansson's explanation. */
  int rc = coord_config_unpack(c, "example/db", "{s:i}", "host", &port);
  printf("unpack with a wrong format: %s (%s)\n", coord_strerror(rc), coord_last_error());
  if (rc != COORD_EFORMAT)
    return 1;

  /* 4. list: every key under the path prefix "example". */
  json_t *all = NULL;
  CHECK("list example", coord_config_list(c, "example", &all));
  print_value("list example =", all);
  size_t listed = json_object_size(all);
  json_decref(all);
  if (listed != 3)
    return 1;

  /* 5. watch the prefix while a value changes. */
  coord_watch_t *w = NULL;
  CHECK("watch example", coord_config_watch_prefix(c, "example", 0, &w));
  json_t *newport = json_integer(6543);
  CHECK("set example/db/port", coord_config_set(c, "example/db/port", newport));
  json_decref(newport);
  coord_event_t *ev = NULL;
  CHECK("coord_watch_next", coord_watch_next(w, 5000, &ev));
  printf("event: %s %s ", ev->type == COORD_EVENT_PUT ? "PUT" : "DELETE", ev->name);
  print_value("=", ev->json);
  int ok = ev->type == COORD_EVENT_PUT && strcmp(ev->name, "example/db/port") == 0;
  coord_event_free(ev);
  coord_watch_close(w);

  /* 6. clean up. */
  const char *keys[] = {"example/db/port", "example/db", "example/greeting", "example/limits"};
  for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++)
    CHECK("delete", coord_config_delete(c, keys[i]));
  coord_close(c);
  return ok ? 0 : 1;
}
