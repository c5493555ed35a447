/*
 * config_tool.c — a small command-line driver of libcoord's configuration
 * centre, used by tests/test_config.py against a real etcd
 * (COORD_ENDPOINTS).  Values are read and printed as JSON (any value).
 *
 *   config_tool set KEY JSON          coord_config_set with that value
 *   config_tool setstr KEY TEXT       coord_config_set with the string TEXT
 *   config_tool get KEY               prints the value (compact JSON)
 *   config_tool delete KEY
 *   config_tool list [PREFIX]         prints the object (compact, sorted)
 *   config_tool watch KEY N TIMEOUT_MS [current]
 *   config_tool watch_prefix PREFIX|- N TIMEOUT_MS [current]
 *       print "ready", then N events, one per line:
 *       {"type":"PUT"|"DELETE","name":KEY,"value":JSON}; exit 2 if fewer
 *       came within TIMEOUT_MS.
 *
 * On a libcoord error: prints "error NAME: detail" on stdout (NAME as in
 * coord.h without COORD_, e.g. ENOTFOUND) and exits 1.  64: usage.
 */
#include <coord.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *code_name(int rc) {
  switch (rc) {
  case COORD_EINVAL:
    return "EINVAL";
  case COORD_ENOTFOUND:
    return "ENOTFOUND";
  case COORD_EFORMAT:
    return "EFORMAT";
  case COORD_EUNAVAILABLE:
    return "EUNAVAILABLE";
  case COORD_ETIMEDOUT:
    return "ETIMEDOUT";
  case COORD_ETOOBIG:
    return "ETOOBIG";
  default:
    return coord_strerror(rc);
  }
}

static int fail(int rc) {
  printf("error %s: %s\n", code_name(rc), coord_last_error());
  return 1;
}

static void print_json(const json_t *v) {
  char *s = json_dumps(v, JSON_COMPACT | JSON_ENCODE_ANY | JSON_SORT_KEYS);
  printf("%s\n", s ? s : "(unprintable)");
  free(s);
}

static int watch(coord_t *c, int prefix, int argc, char **argv) {
  if (argc < 5)
    return 64;
  const char *key = argv[2];
  if (prefix && strcmp(key, "-") == 0)
    key = NULL;
  int want = atoi(argv[3]);
  int timeout = atoi(argv[4]);
  int current = argc > 5 && strcmp(argv[5], "current") == 0;
  coord_watch_t *w = NULL;
  int rc = prefix ? coord_config_watch_prefix(c, key, current, &w) : coord_config_watch(c, key, current, &w);
  if (rc < 0)
    return fail(rc);
  printf("ready\n");
  int status = 0;
  for (int got = 0; got < want; got++) {
    coord_event_t *ev = NULL;
    rc = coord_watch_next(w, timeout, &ev);
    if (rc == COORD_ETIMEDOUT) {
      status = 2;
      break;
    }
    if (rc < 0) {
      status = fail(rc);
      break;
    }
    json_t *line = json_pack("{s:s, s:s?, s:O?}", "type", ev->type == COORD_EVENT_PUT ? "PUT" : "DELETE",
                             "name", ev->name, "value", ev->json);
    print_json(line);
    json_decref(line);
    coord_event_free(ev);
  }
  coord_watch_close(w);
  return status;
}

static int run(coord_t *c, int argc, char **argv) {
  const char *cmd = argv[1];
  int rc;
  if (strcmp(cmd, "set") == 0 && argc >= 4) {
    json_error_t e;
    json_t *v = json_loads(argv[3], JSON_DECODE_ANY, &e);
    if (v == NULL) {
      fprintf(stderr, "config_tool: bad JSON: %s\n", e.text);
      return 64;
    }
    rc = coord_config_set(c, argv[2], v);
    json_decref(v);
    return rc < 0 ? fail(rc) : 0;
  }
  if (strcmp(cmd, "setstr") == 0 && argc >= 4) {
    json_t *v = json_string(argv[3]);
    rc = coord_config_set(c, argv[2], v);
    json_decref(v);
    return rc < 0 ? fail(rc) : 0;
  }
  if (strcmp(cmd, "get") == 0 && argc >= 3) {
    json_t *v = NULL;
    rc = coord_config_get(c, argv[2], &v);
    if (rc < 0)
      return fail(rc);
    print_json(v);
    json_decref(v);
    return 0;
  }
  if (strcmp(cmd, "delete") == 0 && argc >= 3) {
    rc = coord_config_delete(c, argv[2]);
    return rc < 0 ? fail(rc) : 0;
  }
  if (strcmp(cmd, "list") == 0) {
    json_t *v = NULL;
    rc = coord_config_list(c, argc >= 3 ? argv[2] : NULL, &v);
    if (rc < 0)
      return fail(rc);
    print_json(v);
    json_decref(v);
    return 0;
  }
  if (strcmp(cmd, "watch") == 0)
    return watch(c, 0, argc, argv);
  if (strcmp(cmd, "watch_prefix") == 0)
    return watch(c, 1, argc, argv);
  return 64;
}

int main(int argc, char **argv) {
  setvbuf(stdout, NULL, _IOLBF, 0);
  if (argc < 2) {
    fprintf(stderr, "usage: config_tool set|setstr|get|delete|list|watch|watch_prefix ...\n");
    return 64;
  }
  coord_t *c = NULL;
  int rc = coord_new(NULL, &c);
  if (rc < 0)
    return fail(rc);
  int status = run(c, argc, argv);
  coord_close(c);
  if (status == 64)
    fprintf(stderr, "config_tool: bad usage\n");
  return status;
}
