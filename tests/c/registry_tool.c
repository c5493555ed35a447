/*
 * registry_tool.c — a small command-line driver of libcoord's registry, used
 * by tests/test_registry.py against a real etcd (COORD_ENDPOINTS).
 *
 *   registry_tool register NAME ID ADDRESS PORT TTL_MS [METADATA_JSON]
 *       registers, prints "registered", then keeps the registration until
 *       stdin reaches EOF (or a line "quit"); then unregisters (a line
 *       "close" instead: coord_close without unregistering first) and exits.
 *   registry_tool discover NAME
 *       prints one instance document per line (compact JSON), then "n=N".
 *   registry_tool watch NAME|- N TIMEOUT_MS [current]
 *       creates a watch, prints "ready", then prints N events, one per line:
 *       {"type":"PUT"|"DELETE","name":...,"id":...,"doc":...}, and exits 0;
 *       exits 2 if fewer came within TIMEOUT_MS.
 *   registry_tool unregister NAME ID
 *       prints the result code's name ("ok", "ENOTFOUND", ...).
 *
 * Exit codes: 0 success, 1 a libcoord call failed (message on stderr),
 * 2 timeout waiting for events, 64 usage.
 */
#include <coord.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int fail(const char *what, int rc) {
  fprintf(stderr, "registry_tool: %s: %s (%d): %s\n", what, coord_strerror(rc), rc, coord_last_error());
  return 1;
}

static coord_t *connect_or_die(void) {
  coord_t *c = NULL;
  int rc = coord_new(NULL, &c);
  if (rc < 0) {
    fail("coord_new", rc);
    exit(1);
  }
  return c;
}

static int cmd_register(int argc, char **argv) {
  if (argc < 7)
    return 64;
  coord_service_t s = {0};
  s.name = argv[2];
  s.id = argv[3];
  s.address = argv[4];
  s.port = atoi(argv[5]);
  long long ttl = atoll(argv[6]);
  if (argc > 7) {
    json_error_t e;
    s.metadata = json_loads(argv[7], 0, &e);
    if (s.metadata == NULL) {
      fprintf(stderr, "registry_tool: bad metadata: %s\n", e.text);
      return 64;
    }
  }
  coord_t *c = connect_or_die();
  int rc = coord_registry_register(c, &s, ttl);
  json_decref(s.metadata);
  if (rc < 0) {
    coord_close(c);
    return fail("coord_registry_register", rc);
  }
  printf("registered\n");
  fflush(stdout);
  char line[256];
  int unregister = 1;
  while (fgets(line, sizeof line, stdin) != NULL) {
    if (strncmp(line, "quit", 4) == 0)
      break;
    if (strncmp(line, "close", 5) == 0) {
      unregister = 0;
      break;
    }
    if (strncmp(line, "discover", 8) == 0) {
      coord_service_t *list = NULL;
      size_t n = 0;
      rc = coord_registry_discover(c, s.name, &list, &n);
      printf("discover rc=%d n=%zu\n", rc, n);
      coord_service_list_free(list, n);
      fflush(stdout);
    }
  }
  if (unregister) {
    rc = coord_registry_unregister(c, s.name, s.id);
    if (rc < 0) {
      coord_close(c);
      return fail("coord_registry_unregister", rc);
    }
    printf("unregistered\n");
  }
  coord_close(c);
  printf("closed\n");
  return 0;
}

static int cmd_discover(int argc, char **argv) {
  if (argc < 3)
    return 64;
  coord_t *c = connect_or_die();
  coord_service_t *list = NULL;
  size_t n = 0;
  int rc = coord_registry_discover(c, argv[2], &list, &n);
  if (rc < 0) {
    coord_close(c);
    return fail("coord_registry_discover", rc);
  }
  for (size_t i = 0; i < n; i++) {
    json_t *doc = coord_service_to_json(&list[i]);
    char *s = doc ? json_dumps(doc, JSON_COMPACT | JSON_SORT_KEYS) : NULL;
    printf("%s\n", s ? s : "null");
    free(s);
    json_decref(doc);
  }
  printf("n=%zu\n", n);
  coord_service_list_free(list, n);
  coord_close(c);
  return 0;
}

static int cmd_watch(int argc, char **argv) {
  if (argc < 5)
    return 64;
  const char *name = strcmp(argv[2], "-") == 0 ? NULL : argv[2];
  int want = atoi(argv[3]);
  int timeout = atoi(argv[4]);
  int current = argc > 5 && strcmp(argv[5], "current") == 0;
  coord_t *c = connect_or_die();
  coord_watch_t *w = NULL;
  int rc = coord_registry_watch(c, name, current, &w);
  if (rc < 0) {
    coord_close(c);
    return fail("coord_registry_watch", rc);
  }
  printf("ready\n");
  fflush(stdout);
  int got = 0, status = 0;
  while (got < want) {
    coord_event_t *ev = NULL;
    rc = coord_watch_next(w, timeout, &ev);
    if (rc == COORD_ETIMEDOUT) {
      status = 2;
      break;
    }
    if (rc < 0) {
      status = fail("coord_watch_next", rc);
      break;
    }
    json_t *line =
        json_pack("{s:s, s:s?, s:s?, s:O?, s:s%}", "type", ev->type == COORD_EVENT_PUT ? "PUT" : "DELETE",
                  "name", ev->name, "id", ev->id, "doc", ev->json, "key", ev->kv.key, ev->kv.key_len);
    char *s = line ? json_dumps(line, JSON_COMPACT | JSON_SORT_KEYS) : NULL;
    printf("%s\n", s ? s : "null");
    fflush(stdout);
    free(s);
    json_decref(line);
    coord_event_free(ev);
    got++;
  }
  coord_watch_close(w);
  coord_close(c);
  return status;
}

static int cmd_unregister(int argc, char **argv) {
  if (argc < 4)
    return 64;
  coord_t *c = connect_or_die();
  int rc = coord_registry_unregister(c, argv[2], argv[3]);
  printf("%s\n", rc == 0 ? "ok" : rc == COORD_ENOTFOUND ? "ENOTFOUND" : coord_strerror(rc));
  coord_close(c);
  return rc == 0 || rc == COORD_ENOTFOUND ? 0 : 1;
}

int main(int argc, char **argv) {
  setvbuf(stdout, NULL, _IOLBF, 0);
  if (argc < 2)
    goto usage;
  if (strcmp(argv[1], "register") == 0)
    return cmd_register(argc, argv);
  if (strcmp(argv[1], "discover") == 0)
    return cmd_discover(argc, argv);
  if (strcmp(argv[1], "watch") == 0)
    return cmd_watch(argc, argv);
  if (strcmp(argv[1], "unregister") == 0)
    return cmd_unregister(argc, argv);
usage:
  fprintf(stderr, "usage: registry_tool register|discover|watch|unregister ...\n");
  return 64;
}
