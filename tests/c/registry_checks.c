/*
 * registry_checks.c — self-checking scenarios for libcoord's registry,
 * run by tests/test_registry.py against a real etcd (COORD_ENDPOINTS).
 *
 *   registry_checks [SCENARIO...]     (none: all of them)
 *
 * Each scenario prints "ok <name>" or "FAIL <name>: ..." lines; the exit
 * code is the number of failed checks (0: all passed).
 */
#include <coord.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static int failures;

#define CHECK(cond)                                                                                          \
  do {                                                                                                       \
    if (!(cond)) {                                                                                           \
      printf("FAIL %s:%d: %s (last error: %s)\n", __func__, __LINE__, #cond, coord_last_error());            \
      failures++;                                                                                            \
    }                                                                                                        \
  } while (0)
#define CHECK_RC(expr, want)                                                                                 \
  do {                                                                                                       \
    int rc_ = (expr);                                                                                        \
    if (rc_ != (want)) {                                                                                     \
      printf("FAIL %s:%d: %s = %d (%s), want %d (last error: %s)\n", __func__, __LINE__, #expr, rc_,         \
             coord_strerror(rc_), want, coord_last_error());                                                 \
      failures++;                                                                                            \
    }                                                                                                        \
  } while (0)

static coord_t *client(void) {
  coord_t *c = NULL;
  int rc = coord_new(NULL, &c);
  if (rc < 0) {
    printf("FAIL coord_new: %s: %s\n", coord_strerror(rc), coord_last_error());
    exit(100);
  }
  return c;
}

static void sleep_ms(int ms) {
  struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
  nanosleep(&ts, NULL);
}

static int64_t now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static json_t *parse(const char *s) {
  json_error_t e;
  json_t *v = json_loads(s, JSON_DECODE_ANY, &e);
  if (v == NULL) {
    printf("FAIL bad test JSON %s: %s\n", s, e.text);
    exit(100);
  }
  return v;
}

/* The raw kv of key (NULL if absent). */
static coord_kv_result_t *raw_get(coord_t *c, const char *key) {
  coord_kv_result_t *r = NULL;
  if (coord_kv_get(c, key, NULL, &r) < 0)
    return NULL;
  if (r->n == 0) {
    coord_kv_result_free(r);
    return NULL;
  }
  return r;
}

/* ---------------------------------------------------------------- documents */

static void expect_doc_invalid(const char *text) {
  json_t *doc = parse(text);
  coord_service_t s;
  int rc = coord_service_from_json(doc, &s);
  if (rc != COORD_EINVAL) {
    printf("FAIL document %s accepted (rc %d)\n", text, rc);
    failures++;
  } else if (coord_last_error()[0] == '\0') {
    printf("FAIL document %s: no error message\n", text);
    failures++;
  }
  CHECK(s.address == NULL && s.id == NULL && s.name == NULL && s.metadata == NULL);
  json_decref(doc);
}

static void documents(void) {
  expect_doc_invalid("[]");
  expect_doc_invalid("\"x\"");
  expect_doc_invalid("{}");
  expect_doc_invalid("{\"port\":80}");
  expect_doc_invalid("{\"address\":\"\",\"port\":80}");
  expect_doc_invalid("{\"address\":5,\"port\":80}");
  expect_doc_invalid("{\"address\":\"h\"}");
  expect_doc_invalid("{\"address\":\"h\",\"port\":\"80\"}");
  expect_doc_invalid("{\"address\":\"h\",\"port\":0}");
  expect_doc_invalid("{\"address\":\"h\",\"port\":65536}");
  expect_doc_invalid("{\"address\":\"h\",\"port\":-1}");
  expect_doc_invalid("{\"address\":\"h\",\"port\":80.0}");
  expect_doc_invalid("{\"address\":\"h\",\"port\":80,\"id\":7}");
  expect_doc_invalid("{\"address\":\"h\",\"port\":80,\"id\":\"\"}");
  expect_doc_invalid("{\"address\":\"h\",\"port\":80,\"id\":\"a/b\"}");
  expect_doc_invalid("{\"address\":\"h\",\"port\":80,\"name\":true}");
  expect_doc_invalid("{\"address\":\"h\",\"port\":80,\"metadata\":[1]}");
  expect_doc_invalid("{\"address\":\"h\",\"port\":80,\"metadata\":\"x\"}");

  coord_service_t s;
  json_t *doc = parse("{\"address\":\"10.0.0.5\",\"port\":65535}");
  CHECK_RC(coord_service_from_json(doc, &s), 0);
  CHECK(s.address && strcmp(s.address, "10.0.0.5") == 0 && s.port == 65535);
  CHECK(s.id == NULL && s.name == NULL && s.metadata == NULL);
  coord_service_clear(&s);
  /* the path fills name and id, and must agree with the document */
  CHECK_RC(coord_service_from_json_at(doc, "chat", "c1", &s), 0);
  CHECK(s.name && strcmp(s.name, "chat") == 0 && s.id && strcmp(s.id, "c1") == 0);
  coord_service_clear(&s);
  json_decref(doc);

  doc = parse("{\"id\":\"c1\",\"name\":\"chat\",\"address\":\"h\",\"port\":1,\"metadata\":{\"zone\":\"a\"}}");
  CHECK_RC(coord_service_from_json_at(doc, "chat", "c1", &s), 0);
  CHECK(json_is_object(s.metadata) &&
        strcmp(json_string_value(json_object_get(s.metadata, "zone")), "a") == 0);
  coord_service_clear(&s);
  CHECK_RC(coord_service_from_json_at(doc, "chat", "c2", &s), COORD_EINVAL);
  CHECK_RC(coord_service_from_json_at(doc, "mail", "c1", &s), COORD_EINVAL);
  CHECK_RC(coord_service_from_json_at(doc, "a/b", NULL, &s), COORD_EINVAL);
  CHECK_RC(coord_service_from_json(NULL, &s), COORD_EINVAL);
  CHECK_RC(coord_service_from_json(doc, NULL), COORD_EINVAL);
  json_decref(doc);

  /* metadata null (Go's nil map) is accepted as no metadata */
  doc = parse("{\"address\":\"h\",\"port\":2,\"metadata\":null}");
  CHECK_RC(coord_service_from_json(doc, &s), 0);
  CHECK(s.metadata == NULL);
  coord_service_clear(&s);
  json_decref(doc);

  /* to_json writes the documented fields; round trip */
  coord_service_t in = {.id = "i1", .name = "n1", .address = "127.0.0.1", .port = 8080, .metadata = NULL};
  json_t *out = coord_service_to_json(&in);
  CHECK(out != NULL);
  if (out) {
    CHECK(strcmp(json_string_value(json_object_get(out, "id")), "i1") == 0);
    CHECK(strcmp(json_string_value(json_object_get(out, "name")), "n1") == 0);
    CHECK(strcmp(json_string_value(json_object_get(out, "address")), "127.0.0.1") == 0);
    CHECK(json_integer_value(json_object_get(out, "port")) == 8080);
    CHECK(json_is_object(json_object_get(out, "metadata")));
    CHECK_RC(coord_service_from_json_at(out, "n1", "i1", &s), 0);
    CHECK(s.port == 8080);
    coord_service_clear(&s);
    json_decref(out);
  }
  in.port = 0;
  CHECK(coord_service_to_json(&in) == NULL);
  in.port = 1;
  in.address = "";
  CHECK(coord_service_to_json(&in) == NULL);
  CHECK(coord_service_to_json(NULL) == NULL);
  coord_service_clear(NULL); /* no-op */
  printf("ok documents\n");
}

/* ---------------------------------------------------------------- arguments */

static void arguments(void) {
  coord_t *c = client();
  coord_service_t ok = {.id = "a1", .name = "args", .address = "h", .port = 80};
  coord_service_t s;
  CHECK_RC(coord_registry_register(NULL, &ok, 0), COORD_EINVAL);
  CHECK_RC(coord_registry_register(c, NULL, 0), COORD_EINVAL);
  CHECK_RC(coord_registry_register(c, &ok, -5), COORD_EINVAL);
  s = ok, s.name = NULL;
  CHECK_RC(coord_registry_register(c, &s, 0), COORD_EINVAL);
  s = ok, s.name = "";
  CHECK_RC(coord_registry_register(c, &s, 0), COORD_EINVAL);
  s = ok, s.name = "a/b";
  CHECK_RC(coord_registry_register(c, &s, 0), COORD_EINVAL);
  s = ok, s.id = NULL;
  CHECK_RC(coord_registry_register(c, &s, 0), COORD_EINVAL);
  s = ok, s.id = "x/y";
  CHECK_RC(coord_registry_register(c, &s, 0), COORD_EINVAL);
  s = ok, s.address = NULL;
  CHECK_RC(coord_registry_register(c, &s, 0), COORD_EINVAL);
  s = ok, s.address = "";
  CHECK_RC(coord_registry_register(c, &s, 0), COORD_EINVAL);
  s = ok, s.port = 0;
  CHECK_RC(coord_registry_register(c, &s, 0), COORD_EINVAL);
  s = ok, s.port = 65536;
  CHECK_RC(coord_registry_register(c, &s, 0), COORD_EINVAL);
  json_t *arr = json_array();
  s = ok, s.metadata = arr;
  CHECK_RC(coord_registry_register(c, &s, 0), COORD_EINVAL);
  json_decref(arr);
  /* nothing was written by the failed calls */
  coord_kv_result_t *r = NULL;
  coord_range_opts_t pre = {.prefix = 1};
  CHECK_RC(coord_kv_get(c, "/services/", &pre, &r), 0);
  CHECK(r && r->n == 0);
  coord_kv_result_free(r);

  coord_service_t *list = NULL;
  size_t n = 7;
  CHECK_RC(coord_registry_discover(c, NULL, &list, &n), COORD_EINVAL);
  CHECK_RC(coord_registry_discover(c, "a/b", &list, &n), COORD_EINVAL);
  CHECK_RC(coord_registry_discover(c, "", &list, &n), COORD_EINVAL);
  CHECK_RC(coord_registry_discover(c, "x", NULL, &n), COORD_EINVAL);
  CHECK_RC(coord_registry_discover(c, "x", &list, NULL), COORD_EINVAL);
  CHECK_RC(coord_registry_discover(NULL, "x", &list, &n), COORD_EINVAL);
  CHECK_RC(coord_registry_discover(c, "nobody", &list, &n), 0);
  CHECK(list == NULL && n == 0);
  coord_watch_t *w = NULL;
  CHECK_RC(coord_registry_watch(c, "a/b", 0, &w), COORD_EINVAL);
  CHECK_RC(coord_registry_watch(c, "", 0, &w), COORD_EINVAL);
  CHECK_RC(coord_registry_watch(c, "x", 0, NULL), COORD_EINVAL);
  CHECK_RC(coord_registry_watch(NULL, "x", 0, &w), COORD_EINVAL);
  CHECK_RC(coord_registry_unregister(c, "nobody", "none"), COORD_ENOTFOUND);
  CHECK_RC(coord_registry_unregister(c, NULL, "none"), COORD_EINVAL);
  CHECK_RC(coord_registry_unregister(c, "x", "a/b"), COORD_EINVAL);
  CHECK_RC(coord_registry_unregister(NULL, "x", "y"), COORD_EINVAL);
  coord_close(c);
  printf("ok arguments\n");
}

/* ---------------------------------------------------------------- lifecycle */

static void lifecycle(void) {
  coord_t *c = client();
  json_t *md = parse("{\"zone\":\"eu-1\",\"weight\":3}");
  coord_service_t a = {.id = "web-1", .name = "web", .address = "127.0.0.1", .port = 8001, .metadata = md};
  coord_service_t b = {.id = "web-2", .name = "web", .address = "127.0.0.2", .port = 8002};
  CHECK_RC(coord_registry_register(c, &a, 3000), 0);
  CHECK_RC(coord_registry_register(c, &b, 0), 0);

  /* the stored document */
  coord_kv_result_t *r = raw_get(c, "/services/web/web-1");
  CHECK(r != NULL);
  if (r) {
    json_t *doc = parse(r->kvs[0].value);
    CHECK(strcmp(json_string_value(json_object_get(doc, "id")), "web-1") == 0);
    CHECK(strcmp(json_string_value(json_object_get(doc, "name")), "web") == 0);
    CHECK(strcmp(json_string_value(json_object_get(doc, "address")), "127.0.0.1") == 0);
    CHECK(json_integer_value(json_object_get(doc, "port")) == 8001);
    CHECK(json_equal(json_object_get(doc, "metadata"), md));
    CHECK(r->kvs[0].lease != 0);
    int64_t remaining = 0, granted = 0;
    CHECK_RC(coord_lease_ttl(c, r->kvs[0].lease, &remaining, &granted), 0);
    CHECK(granted >= 3000);
    json_decref(doc);
    coord_kv_result_free(r);
  }

  coord_service_t *list = NULL;
  size_t n = 0;
  CHECK_RC(coord_registry_discover(c, "web", &list, &n), 0);
  CHECK(n == 2);
  if (n == 2) {
    CHECK(strcmp(list[0].id, "web-1") == 0 && strcmp(list[0].name, "web") == 0);
    CHECK(list[0].port == 8001 && json_equal(list[0].metadata, md));
    CHECK(strcmp(list[1].id, "web-2") == 0 && list[1].port == 8002);
    CHECK(strcmp(list[1].address, "127.0.0.2") == 0);
  }
  coord_service_list_free(list, n);

  /* "web" does not see "webx" */
  coord_service_t x = {.id = "x1", .name = "webx", .address = "h", .port = 9};
  CHECK_RC(coord_registry_register(c, &x, 0), 0);
  CHECK_RC(coord_registry_discover(c, "web", &list, &n), 0);
  CHECK(n == 2);
  coord_service_list_free(list, n);

  /* registering the same instance again replaces it (one key, new doc) */
  a.port = 8011;
  CHECK_RC(coord_registry_register(c, &a, 3000), 0);
  CHECK_RC(coord_registry_discover(c, "web", &list, &n), 0);
  CHECK(n == 2 && list[0].port == 8011);
  coord_service_list_free(list, n);
  sleep_ms(3500); /* longer than the TTL: the keep-alive works */
  CHECK_RC(coord_registry_discover(c, "web", &list, &n), 0);
  CHECK(n == 2 && list[0].port == 8011);
  coord_service_list_free(list, n);

  CHECK_RC(coord_registry_unregister(c, "web", "web-1"), 0);
  r = raw_get(c, "/services/web/web-1");
  CHECK(r == NULL);
  coord_kv_result_free(r);
  CHECK_RC(coord_registry_unregister(c, "web", "web-1"), COORD_ENOTFOUND);
  CHECK_RC(coord_registry_discover(c, "web", &list, &n), 0);
  CHECK(n == 1 && strcmp(list[0].id, "web-2") == 0);
  coord_service_list_free(list, n);

  /* close unregisters what is left */
  coord_close(c);
  c = client();
  r = raw_get(c, "/services/web/web-2");
  CHECK(r == NULL);
  coord_kv_result_free(r);
  r = raw_get(c, "/services/webx/x1");
  CHECK(r == NULL);
  coord_kv_result_free(r);
  coord_close(c);
  json_decref(md);
  printf("ok lifecycle\n");
}

/* ---------------------------------------------------------------- healing */

/* Waits until key exists with a lease other than old; returns ms taken or -1. */
static int64_t wait_new_lease(coord_t *c, const char *key, int64_t old, int limit_ms) {
  int64_t t0 = now_ms();
  while (now_ms() - t0 < limit_ms) {
    coord_kv_result_t *r = raw_get(c, key);
    int64_t lease = r ? r->kvs[0].lease : 0;
    coord_kv_result_free(r);
    if (lease != 0 && lease != old)
      return now_ms() - t0;
    sleep_ms(10);
  }
  return -1;
}

static void healing(void) {
  coord_t *c = client();     /* registers */
  coord_t *other = client(); /* plays the external actor */
  coord_service_t a = {.id = "h1", .name = "heal", .address = "127.0.0.1", .port = 7000};
  CHECK_RC(coord_registry_register(c, &a, 10000), 0);
  const char *key = "/services/heal/h1";

  for (int round = 0; round < 3; round++) {
    coord_kv_result_t *r = raw_get(other, key);
    CHECK(r != NULL);
    if (!r)
      break;
    int64_t lease = r->kvs[0].lease;
    coord_kv_result_free(r);
    /* lease revoked by someone else: registered again with a new lease */
    CHECK_RC(coord_lease_revoke(other, lease), 0);
    int64_t took = wait_new_lease(other, key, lease, 2000);
    CHECK(took >= 0);
    printf("re-registered after revoke in %lld ms\n", (long long)took);
  }

  /* key deleted by someone else: put back */
  coord_kv_result_t *r = raw_get(other, key);
  int64_t lease = r ? r->kvs[0].lease : 0;
  coord_kv_result_free(r);
  CHECK_RC(coord_kv_delete(other, key, NULL, NULL), 0);
  int64_t took = wait_new_lease(other, key, lease, 2000);
  CHECK(took >= 0);
  printf("re-registered after delete in %lld ms\n", (long long)took);

  /* the document is the same after healing, and unregister still works */
  coord_service_t *list = NULL;
  size_t n = 0;
  CHECK_RC(coord_registry_discover(other, "heal", &list, &n), 0);
  CHECK(n == 1 && list[0].port == 7000);
  coord_service_list_free(list, n);
  CHECK_RC(coord_registry_unregister(c, "heal", "h1"), 0);
  sleep_ms(300); /* nothing comes back after an unregister */
  r = raw_get(other, key);
  CHECK(r == NULL);
  coord_kv_result_free(r);
  coord_close(c);
  coord_close(other);
  printf("ok healing\n");
}

/* ---------------------------------------------------------------- watch */

static coord_event_t *next_event(coord_watch_t *w) {
  coord_event_t *ev = NULL;
  int rc = coord_watch_next(w, 5000, &ev);
  if (rc < 0) {
    printf("FAIL watch_next: %s: %s\n", coord_strerror(rc), coord_last_error());
    failures++;
    return NULL;
  }
  return ev;
}

static void watch(void) {
  coord_t *c = client();
  coord_t *other = client();
  coord_service_t a = {.id = "w1", .name = "wsvc", .address = "127.0.0.1", .port = 5001};
  CHECK_RC(coord_registry_register(other, &a, 0), 0);

  coord_watch_t *w = NULL, *all = NULL;
  CHECK_RC(coord_registry_watch(c, "wsvc", 1, &w), 0);
  CHECK_RC(coord_registry_watch(c, NULL, 0, &all), 0);
  if (!w || !all)
    goto out;
  CHECK(coord_watch_fd(w) >= 0);

  /* with_current: the existing instance first */
  coord_event_t *ev = next_event(w);
  CHECK(ev && ev->type == COORD_EVENT_PUT && strcmp(ev->name, "wsvc") == 0 && strcmp(ev->id, "w1") == 0);
  CHECK(ev && ev->json && json_integer_value(json_object_get(ev->json, "port")) == 5001);
  coord_event_free(ev);

  coord_service_t b = {.id = "w2", .name = "wsvc", .address = "127.0.0.2", .port = 5002};
  CHECK_RC(coord_registry_register(other, &b, 0), 0);
  ev = next_event(w);
  CHECK(ev && ev->type == COORD_EVENT_PUT && strcmp(ev->id, "w2") == 0);
  CHECK(ev && ev->json && strcmp(json_string_value(json_object_get(ev->json, "address")), "127.0.0.2") == 0);
  CHECK(ev && ev->json && strcmp(json_string_value(json_object_get(ev->json, "name")), "wsvc") == 0);
  coord_event_free(ev);
  ev = next_event(all);
  CHECK(ev && ev->type == COORD_EVENT_PUT && strcmp(ev->name, "wsvc") == 0 && strcmp(ev->id, "w2") == 0);
  coord_event_free(ev);

  /* another service: seen by the all-services watch only */
  coord_service_t o = {.id = "o1", .name = "wsvcother", .address = "h", .port = 1};
  CHECK_RC(coord_registry_register(other, &o, 0), 0);
  ev = next_event(all);
  CHECK(ev && strcmp(ev->name, "wsvcother") == 0 && strcmp(ev->id, "o1") == 0);
  coord_event_free(ev);

  CHECK_RC(coord_registry_unregister(other, "wsvc", "w1"), 0);
  ev = next_event(w);
  CHECK(ev && ev->type == COORD_EVENT_DELETE && strcmp(ev->id, "w1") == 0 && ev->json == NULL);
  coord_event_free(ev);

  /* an invalid document is reported as the instance going away */
  CHECK_RC(coord_kv_put(other, "/services/wsvc/bad", "{\"port\":1}", 10, NULL, NULL), 0);
  ev = next_event(w);
  CHECK(ev && ev->type == COORD_EVENT_DELETE && strcmp(ev->id, "bad") == 0 && ev->json == NULL);
  coord_event_free(ev);

  /* nothing else is pending on the service watch */
  ev = NULL;
  CHECK_RC(coord_watch_next(w, 200, &ev), COORD_ETIMEDOUT);
  coord_event_free(ev);
out:
  coord_watch_close(w);
  coord_watch_close(all);
  coord_close(other);
  coord_close(c);
  printf("ok watch\n");
}

/* ---------------------------------------------------------------- foreign */

/* Instances written by someone else (raw puts with the documented layout):
 * discovered, with name/id from the key; invalid ones left out. */
static void foreign(void) {
  coord_t *c = client();
  const char *good = "{\"address\":\"10.1.1.1\",\"port\":443}";
  const char *full = "{\"id\":\"f2\",\"name\":\"ext\",\"address\":\"10.1.1.2\",\"port\":444,\"metadata\":{}}";
  const char *mismatch = "{\"id\":\"other\",\"address\":\"10.1.1.3\",\"port\":445}";
  CHECK_RC(coord_kv_put(c, "/services/ext/f1", good, strlen(good), NULL, NULL), 0);
  CHECK_RC(coord_kv_put(c, "/services/ext/f2", full, strlen(full), NULL, NULL), 0);
  CHECK_RC(coord_kv_put(c, "/services/ext/f3", mismatch, strlen(mismatch), NULL, NULL), 0);
  CHECK_RC(coord_kv_put(c, "/services/ext/f4", "not json", 8, NULL, NULL), 0);
  CHECK_RC(coord_kv_put(c, "/services/ext/deep/er", good, strlen(good), NULL, NULL), 0);
  coord_service_t *list = NULL;
  size_t n = 0;
  CHECK_RC(coord_registry_discover(c, "ext", &list, &n), 0);
  CHECK(n == 2);
  if (n == 2) {
    CHECK(strcmp(list[0].id, "f1") == 0 && strcmp(list[0].name, "ext") == 0 && list[0].port == 443);
    CHECK(strcmp(list[1].id, "f2") == 0 && list[1].port == 444);
  }
  coord_service_list_free(list, n);
  /* unregister removes an instance this client did not register */
  CHECK_RC(coord_registry_unregister(c, "ext", "f1"), 0);
  coord_kv_result_t *r = raw_get(c, "/services/ext/f1");
  CHECK(r == NULL);
  coord_kv_result_free(r);
  coord_close(c);
  printf("ok foreign\n");
}

/* ---------------------------------------------------------------- namespace */

static void namespace(void) {
  coord_config_t cfg = coord_default_config();
  cfg.prefix = "/tenant-b";
  coord_t *ns = NULL;
  CHECK_RC(coord_new(&cfg, &ns), 0);
  coord_t *plain = client();
  if (!ns)
    return;
  coord_watch_t *w = NULL;
  CHECK_RC(coord_registry_watch(ns, NULL, 0, &w), 0);
  coord_service_t a = {.id = "n1", .name = "nsvc", .address = "h", .port = 5};
  CHECK_RC(coord_registry_register(ns, &a, 0), 0);
  coord_kv_result_t *r = raw_get(plain, "/tenant-b/services/nsvc/n1");
  CHECK(r != NULL && r->kvs[0].lease != 0);
  coord_kv_result_free(r);
  coord_service_t *list = NULL;
  size_t n = 0;
  CHECK_RC(coord_registry_discover(plain, "nsvc", &list, &n), 0);
  CHECK(n == 0);
  coord_service_list_free(list, n);
  CHECK_RC(coord_registry_discover(ns, "nsvc", &list, &n), 0);
  CHECK(n == 1 && strcmp(list[0].id, "n1") == 0);
  coord_service_list_free(list, n);
  if (w) {
    coord_event_t *ev = next_event(w);
    CHECK(ev && ev->type == COORD_EVENT_PUT && ev->name && strcmp(ev->name, "nsvc") == 0);
    coord_event_free(ev);
  }
  coord_watch_close(w);
  /* healing works under a namespace too */
  r = raw_get(plain, "/tenant-b/services/nsvc/n1");
  int64_t lease = r ? r->kvs[0].lease : 0;
  coord_kv_result_free(r);
  CHECK_RC(coord_lease_revoke(plain, lease), 0);
  CHECK(wait_new_lease(plain, "/tenant-b/services/nsvc/n1", lease, 2000) >= 0);
  coord_close(ns);
  r = raw_get(plain, "/tenant-b/services/nsvc/n1");
  CHECK(r == NULL);
  coord_kv_result_free(r);
  coord_close(plain);
  printf("ok namespace\n");
}

/* ---------------------------------------------------------------- threads */

#include <pthread.h>

struct worker {
  coord_t *c;
  int index;
  int errors;
};

/* Registers, replaces and unregisters instances from several threads on one
 * client, while the main thread revokes their leases behind their back. */
static void *worker_main(void *arg) {
  struct worker *wk = arg;
  char id[32];
  for (int i = 0; i < 15; i++) {
    snprintf(id, sizeof id, "t%d-%d", wk->index, i % 4);
    coord_service_t s = {.id = id, .name = "threads", .address = "127.0.0.1", .port = 1000 + i};
    if (coord_registry_register(wk->c, &s, 3000) != 0)
      wk->errors++;
    if (i % 3 == 2) {
      int rc = coord_registry_unregister(wk->c, "threads", id);
      if (rc != 0 && rc != COORD_ENOTFOUND)
        wk->errors++;
    }
  }
  return NULL;
}

static void threads(void) {
  coord_t *c = client();
  coord_t *other = client();
  enum { NT = 4 };
  struct worker wk[NT];
  pthread_t th[NT];
  for (int i = 0; i < NT; i++) {
    wk[i] = (struct worker){c, i, 0};
    pthread_create(&th[i], NULL, worker_main, &wk[i]);
  }
  /* revoke whatever leases are there, a few times, while they work */
  for (int round = 0; round < 10; round++) {
    coord_kv_result_t *r = NULL;
    coord_range_opts_t pre = {.prefix = 1};
    if (coord_kv_get(other, "/services/threads/", &pre, &r) == 0) {
      for (size_t i = 0; i < r->n; i++)
        (void)coord_lease_revoke(other, r->kvs[i].lease);
      coord_kv_result_free(r);
    }
    sleep_ms(20);
  }
  for (int i = 0; i < NT; i++) {
    pthread_join(th[i], NULL);
    CHECK(wk[i].errors == 0);
  }
  /* every instance still registered comes back: t<i>-0..3 (the last round
   * of each id: i = 11..14 -> 11%4=3 (unregistered: 11%3=2), 12%4=0,
   * 13%4=1, 14%4=2 (unregistered: 14%3=2)) */
  const char *want[] = {"t0-0", "t0-1", "t1-0", "t1-1", "t2-0", "t2-1", "t3-0", "t3-1"};
  int64_t t0 = now_ms();
  size_t n = 0;
  coord_service_t *list = NULL;
  while (now_ms() - t0 < 3000) {
    CHECK_RC(coord_registry_discover(other, "threads", &list, &n), 0);
    coord_service_list_free(list, n);
    list = NULL;
    if (n >= 8)
      break;
    sleep_ms(20);
  }
  CHECK_RC(coord_registry_discover(other, "threads", &list, &n), 0);
  CHECK(n == 8);
  for (size_t i = 0; i < n && i < 8; i++)
    CHECK(strcmp(list[i].id, want[i]) == 0);
  coord_service_list_free(list, n);
  coord_close(c);
  CHECK_RC(coord_registry_discover(other, "threads", &list, &n), 0);
  CHECK(n == 0);
  coord_service_list_free(list, n);
  coord_close(other);
  printf("ok threads\n");
}

int main(int argc, char **argv) {
  setvbuf(stdout, NULL, _IOLBF, 0);
  static const struct {
    const char *name;
    void (*fn)(void);
  } all[] = {{"documents", documents}, {"arguments", arguments}, {"lifecycle", lifecycle},
             {"healing", healing},     {"watch", watch},         {"foreign", foreign},
             {"namespace", namespace}, {"threads", threads}};
  size_t nall = sizeof all / sizeof all[0];
  for (size_t i = 0; i < nall; i++) {
    int run = argc < 2;
    for (int j = 1; j < argc; j++)
      run |= strcmp(argv[j], all[i].name) == 0;
    if (run)
      all[i].fn();
  }
  printf("%d failed\n", failures);
  return failures > 99 ? 99 : failures;
}
