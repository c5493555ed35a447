/*
 * registry.c — example: service registration and discovery with libcoord.
 *
 * Registers an instance of the service "example-echo" (kept alive on a
 * lease, and registered again by itself if that lease is ever lost),
 * discovers the service's instances, watches the service for a moment while
 * a second instance comes and goes, then unregisters.  Exits 0 on success.
 *
 *   COORD_ENDPOINTS=127.0.0.1:2379 ./registry
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

/* Prints one watch event. */
static void print_event(const coord_event_t *ev) {
  if (ev->type == COORD_EVENT_PUT) {
    char *doc = json_dumps(ev->json, JSON_COMPACT);
    printf("  event: PUT %s/%s %s\n", ev->name, ev->id, doc ? doc : "");
    free(doc);
  } else {
    printf("  event: DELETE %s/%s\n", ev->name, ev->id);
  }
}

int main(void) {
  coord_t *c = NULL;
  CHECK("coord_new", coord_new(NULL, &c));

  /* 1. Register an instance: /services/example-echo/echo-1 on a 5 s lease. */
  coord_service_t me = {0};
  me.name = "example-echo";
  me.id = "echo-1";
  me.address = "127.0.0.1";
  me.port = 7001;
  me.metadata = json_pack("{s:s, s:i}", "zone", "local", "weight", 10);
  CHECK("coord_registry_register", coord_registry_register(c, &me, 5000));
  printf("registered %s/%s at %s:%d\n", me.name, me.id, me.address, me.port);

  /* 2. Discover every instance of the service. */
  coord_service_t *list = NULL;
  size_t n = 0;
  CHECK("coord_registry_discover", coord_registry_discover(c, "example-echo", &list, &n));
  printf("discovered %zu instance(s):\n", n);
  int found = 0;
  for (size_t i = 0; i < n; i++) {
    printf("  %s/%s %s:%d\n", list[i].name, list[i].id, list[i].address, list[i].port);
    found |= strcmp(list[i].id, "echo-1") == 0;
  }
  coord_service_list_free(list, n);
  if (!found) {
    fprintf(stderr, "our own instance was not discovered\n");
    return 1;
  }

  /* 3. Watch the service (starting with the current instances) while a
   *    second instance registers and unregisters. */
  coord_watch_t *w = NULL;
  CHECK("coord_registry_watch", coord_registry_watch(c, "example-echo", 1, &w));
  coord_service_t other = {.name = "example-echo", .id = "echo-2", .address = "127.0.0.1", .port = 7002};
  CHECK("register echo-2", coord_registry_register(c, &other, 5000));
  CHECK("unregister echo-2", coord_registry_unregister(c, "example-echo", "echo-2"));
  int puts = 0, deletes = 0;
  while (puts < 2 || deletes < 1) {
    coord_event_t *ev = NULL;
    int rc = coord_watch_next(w, 5000, &ev);
    CHECK("coord_watch_next", rc);
    print_event(ev);
    if (ev->type == COORD_EVENT_PUT)
      puts++;
    else
      deletes++;
    coord_event_free(ev);
  }
  coord_watch_close(w);

  /* 4. Unregister and close (close would also unregister what is left). */
  CHECK("coord_registry_unregister", coord_registry_unregister(c, me.name, me.id));
  json_decref(me.metadata);
  printf("unregistered %s/%s\n", me.name, me.id);
  coord_close(c);
  return 0;
}
