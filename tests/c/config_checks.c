/*
 * config_checks.c — self-checking scenarios for libcoord's configuration
 * centre, run by tests/test_config.py against a real etcd (COORD_ENDPOINTS).
 *
 *   config_checks [SCENARIO...]     (none: all of them)
 *
 * Prints "ok <name>" per scenario and "FAIL ..." per failed check; the exit
 * code is the number of failed checks (0: all passed).
 */
#include <coord.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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

static json_t *parse(const char *s) {
  json_error_t e;
  json_t *v = json_loads(s, JSON_DECODE_ANY, &e);
  if (v == NULL) {
    printf("FAIL bad test JSON %s: %s\n", s, e.text);
    exit(100);
  }
  return v;
}

/* Raw bytes stored at /config/key, as a malloc'd NUL-terminated string. */
static char *raw(coord_t *c, const char *key, size_t *len) {
  char full[512];
  snprintf(full, sizeof full, "/config/%s", key);
  coord_kv_result_t *r = NULL;
  if (coord_kv_get(c, full, NULL, &r) < 0 || r->n == 0) {
    coord_kv_result_free(r);
    return NULL;
  }
  char *s = malloc(r->kvs[0].value_len + 1);
  memcpy(s, r->kvs[0].value, r->kvs[0].value_len);
  s[r->kvs[0].value_len] = '\0';
  if (len)
    *len = r->kvs[0].value_len;
  coord_kv_result_free(r);
  return s;
}

/* set v at key, get it back equal; the raw bytes are want_raw if given. */
static void roundtrip_one(coord_t *c, const char *key, json_t *v, const char *want_raw) {
  CHECK_RC(coord_config_set(c, key, v), 0);
  json_t *back = NULL;
  CHECK_RC(coord_config_get(c, key, &back), 0);
  if (!back || !json_equal(back, v)) {
    char *a = json_dumps(v, JSON_ENCODE_ANY), *b = back ? json_dumps(back, JSON_ENCODE_ANY) : NULL;
    printf("FAIL roundtrip %s: set %s, got %s\n", key, a, b ? b : "nothing");
    failures++;
    free(a);
    free(b);
  }
  json_decref(back);
  if (want_raw) {
    size_t len = 0;
    char *r = raw(c, key, &len);
    if (!r || len != strlen(want_raw) || memcmp(r, want_raw, len) != 0) {
      printf("FAIL raw %s: stored [%s], want [%s]\n", key, r ? r : "(none)", want_raw);
      failures++;
    }
    free(r);
  }
}

static void roundtrip(void) {
  coord_t *c = client();
  struct {
    const char *json; /* value as JSON */
    const char *raw;  /* what etcd must hold */
  } cases[] = {
      {"{\"host\":\"db1\",\"port\":5432,\"tags\":[\"a\",\"b\"],\"tls\":{\"on\":true}}",
       "{\"host\":\"db1\",\"port\":5432,\"tags\":[\"a\",\"b\"],\"tls\":{\"on\":true}}"},
      {"[1, 2, [3, {\"x\": null}]]", "[1,2,[3,{\"x\":null}]]"},
      {"{}", "{}"},
      {"[]", "[]"},
      {"42", "42"},
      {"-7", "-7"},
      {"3.5", "3.5"},
      {"true", "true"},
      {"false", "false"},
      {"null", "null"},
      {"\"hello world\"", "hello world"},
      {"\"\"", ""},
      {"\"h\\u00e9llo \\u2603\"", "h\xc3\xa9llo \xe2\x98\x83"},
      {"\"line1\\nline2\"", "line1\nline2"},
      {"\"42\"", "\"42\""},
      {"\"true\"", "\"true\""},
      {"\"null\"", "\"null\""},
      {"\"\\\"x\\\"\"", "\"\\\"x\\\"\""},
      {"\"{\\\"a\\\":1}\"", "\"{\\\"a\\\":1}\""},
      {"\"[1]\"", "\"[1]\""},
      {"\" 7 \"", "\" 7 \""},
      {"\"{not json\"", "{not json"},
      {"\"42abc\"", "42abc"},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    char key[64];
    snprintf(key, sizeof key, "rt/case%zu", i);
    json_t *v = parse(cases[i].json);
    roundtrip_one(c, key, v, cases[i].raw);
    json_decref(v);
  }
  /* a string with a NUL byte inside */
  json_t *nul = json_stringn("a\0b", 3);
  roundtrip_one(c, "rt/nul", nul, NULL);
  json_decref(nul);
  size_t len = 0;
  char *r = raw(c, "rt/nul", &len);
  CHECK(r && len == 3 && memcmp(r, "a\0b", 3) == 0);
  free(r);

  /* nested keys are independent keys */
  json_t *v1 = parse("{\"a\":1}"), *v2 = parse("\"deep\""), *v3 = parse("[3]");
  roundtrip_one(c, "nest", v1, "{\"a\":1}");
  roundtrip_one(c, "nest/one", v2, "deep");
  roundtrip_one(c, "nest/one/two/three", v3, "[3]");
  json_t *back = NULL;
  CHECK_RC(coord_config_get(c, "nest", &back), 0);
  CHECK(back && json_equal(back, v1));
  json_decref(back);
  json_decref(v1);
  json_decref(v2);
  json_decref(v3);

  /* bytes written by someone else: JSON is JSON, anything else a string */
  CHECK_RC(coord_kv_put(c, "/config/ext/num", "12", 2, NULL, NULL), 0);
  CHECK_RC(coord_kv_put(c, "/config/ext/text", "plain text", 10, NULL, NULL), 0);
  CHECK_RC(coord_kv_put(c, "/config/ext/bin", "\xff\xfe", 2, NULL, NULL), 0);
  CHECK_RC(coord_config_get(c, "ext/num", &back), 0);
  CHECK(back && json_is_integer(back) && json_integer_value(back) == 12);
  json_decref(back);
  CHECK_RC(coord_config_get(c, "ext/text", &back), 0);
  CHECK(back && json_is_string(back) && strcmp(json_string_value(back), "plain text") == 0);
  json_decref(back);
  back = NULL;
  CHECK_RC(coord_config_get(c, "ext/bin", &back), 0);
  CHECK(back && json_is_string(back) && json_string_length(back) == 2);
  /* and it is written back byte for byte */
  if (back) {
    CHECK_RC(coord_config_set(c, "ext/bin2", back), 0);
    r = raw(c, "ext/bin2", &len);
    CHECK(r && len == 2 && memcmp(r, "\xff\xfe", 2) == 0);
    free(r);
  }
  json_decref(back);

  /* overwrite and delete */
  json_t *a = parse("1"), *b = parse("\"two\"");
  CHECK_RC(coord_config_set(c, "ow", a), 0);
  CHECK_RC(coord_config_set(c, "ow", b), 0);
  CHECK_RC(coord_config_get(c, "ow", &back), 0);
  CHECK(back && json_equal(back, b));
  json_decref(back);
  CHECK_RC(coord_config_delete(c, "ow"), 0);
  back = NULL;
  CHECK_RC(coord_config_get(c, "ow", &back), COORD_ENOTFOUND);
  CHECK(back == NULL);
  CHECK_RC(coord_config_delete(c, "ow"), COORD_ENOTFOUND);
  json_decref(a);
  json_decref(b);
  coord_close(c);
  printf("ok roundtrip\n");
}

static void pack(void) {
  coord_t *c = client();
  CHECK_RC(coord_config_pack(c, "svc/db", "{s:s, s:i, s:b, s:[s,s]}", "host", "db.local", "port", 5432, "tls",
                             1, "replicas", "r1", "r2"),
           0);
  const char *host = NULL, *r1 = NULL, *r2 = NULL;
  int port = 0, tls = 0;
  CHECK_RC(coord_config_unpack(c, "svc/db", "{s:s, s:i, s:b, s:[s,s]}", "host", &host, "port", &port, "tls",
                               &tls, "replicas", &r1, &r2),
           0);
  /* the unpacked strings are still valid here, after the call */
  CHECK(host && strcmp(host, "db.local") == 0 && port == 5432 && tls == 1);
  CHECK(r1 && r2 && strcmp(r1, "r1") == 0 && strcmp(r2, "r2") == 0);
  /* optional members and scalars */
  json_int_t missing = -1;
  CHECK_RC(coord_config_unpack(c, "svc/db", "{s?I}", "nothere", &missing), 0);
  CHECK(missing == -1);
  CHECK_RC(coord_config_pack(c, "svc/limit", "i", 100), 0);
  int limit = 0;
  CHECK_RC(coord_config_unpack(c, "svc/limit", "i", &limit), 0);
  CHECK(limit == 100);
  CHECK_RC(coord_config_pack(c, "svc/name", "s", "42"), 0);
  const char *name = NULL;
  CHECK_RC(coord_config_unpack(c, "svc/name", "s", &name), 0);
  CHECK(name && strcmp(name, "42") == 0);

  /* wrong format: EFORMAT with jansson's text */
  port = 0;
  CHECK_RC(coord_config_unpack(c, "svc/db", "{s:s}", "port", &host), COORD_EFORMAT);
  CHECK(strstr(coord_last_error(), "Expected string") != NULL);
  printf("unpack error message: %s\n", coord_last_error());
  CHECK_RC(coord_config_unpack(c, "svc/limit", "{s:i}", "port", &port), COORD_EFORMAT);
  CHECK(strstr(coord_last_error(), "Expected object") != NULL);
  CHECK_RC(coord_config_unpack(c, "svc/db", "{s:i}", "absent", &port), COORD_EFORMAT);
  CHECK(strstr(coord_last_error(), "absent") != NULL);
  CHECK_RC(coord_config_unpack(c, "svc/db", "{s:i!}", "port", &port), COORD_EFORMAT);
  CHECK_RC(coord_config_unpack(c, "svc/db", "{s:i", "port", &port), COORD_EFORMAT);
  CHECK_RC(coord_config_unpack(c, "svc/nothere", "i", &port), COORD_ENOTFOUND);
  CHECK_RC(coord_config_pack(c, "svc/x", "{s:i", "a", 1), COORD_EFORMAT);
  CHECK_RC(coord_config_pack(c, "svc/x", "[i]]", 1), COORD_EFORMAT);
  json_t *v = NULL;
  CHECK_RC(coord_config_get(c, "svc/x", &v), COORD_ENOTFOUND);
  coord_close(c);
  printf("ok pack\n");
}

static void errors(void) {
  coord_t *c = client();
  json_t *v = json_integer(1), *out = NULL;
  coord_watch_t *w = NULL;
  static const char *bad[] = {"", "/a", "a/", "a//b", ".", "..", "a/./b", "a/../b", "./a", "a/..", "/"};
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    const char *k = bad[i];
    CHECK_RC(coord_config_get(c, k, &out), COORD_EINVAL);
    CHECK_RC(coord_config_set(c, k, v), COORD_EINVAL);
    CHECK_RC(coord_config_delete(c, k), COORD_EINVAL);
    CHECK_RC(coord_config_pack(c, k, "i", 1), COORD_EINVAL);
    int dummy = 0;
    CHECK_RC(coord_config_unpack(c, k, "i", &dummy), COORD_EINVAL);
    CHECK_RC(coord_config_watch(c, k, 0, &w), COORD_EINVAL);
    if (k[0] != '\0') { /* "" is "everything" for list and watch_prefix */
      CHECK_RC(coord_config_list(c, k, &out), COORD_EINVAL);
      CHECK_RC(coord_config_watch_prefix(c, k, 0, &w), COORD_EINVAL);
    }
  }
  CHECK(strstr(coord_last_error(), "/") != NULL); /* the message names the key */
  CHECK_RC(coord_config_get(NULL, "a", &out), COORD_EINVAL);
  CHECK_RC(coord_config_get(c, NULL, &out), COORD_EINVAL);
  CHECK_RC(coord_config_get(c, "a", NULL), COORD_EINVAL);
  CHECK_RC(coord_config_set(NULL, "a", v), COORD_EINVAL);
  CHECK_RC(coord_config_set(c, NULL, v), COORD_EINVAL);
  CHECK_RC(coord_config_set(c, "a", NULL), COORD_EINVAL);
  CHECK_RC(coord_config_delete(NULL, "a"), COORD_EINVAL);
  CHECK_RC(coord_config_delete(c, NULL), COORD_EINVAL);
  CHECK_RC(coord_config_pack(NULL, "a", "i", 1), COORD_EINVAL);
  CHECK_RC(coord_config_pack(c, "a", NULL), COORD_EINVAL);
  int i = 0;
  CHECK_RC(coord_config_unpack(NULL, "a", "i", &i), COORD_EINVAL);
  CHECK_RC(coord_config_unpack(c, "a", NULL), COORD_EINVAL);
  CHECK_RC(coord_config_list(NULL, "a", &out), COORD_EINVAL);
  CHECK_RC(coord_config_list(c, "a", NULL), COORD_EINVAL);
  CHECK_RC(coord_config_watch(NULL, "a", 0, &w), COORD_EINVAL);
  CHECK_RC(coord_config_watch(c, NULL, 0, &w), COORD_EINVAL);
  CHECK_RC(coord_config_watch(c, "a", 0, NULL), COORD_EINVAL);
  CHECK_RC(coord_config_watch_prefix(NULL, "a", 0, &w), COORD_EINVAL);
  CHECK_RC(coord_config_watch_prefix(c, "a", 0, NULL), COORD_EINVAL);
  CHECK(w == NULL);
  /* missing keys */
  CHECK_RC(coord_config_get(c, "missing", &out), COORD_ENOTFOUND);
  CHECK(strstr(coord_last_error(), "missing") != NULL);
  CHECK_RC(coord_config_delete(c, "missing"), COORD_ENOTFOUND);
  CHECK_RC(coord_config_unpack(c, "missing", "i", &i), COORD_ENOTFOUND);
  /* list of nothing is an empty object, not an error */
  CHECK_RC(coord_config_list(c, "missing", &out), 0);
  CHECK(out && json_is_object(out) && json_object_size(out) == 0);
  json_decref(out);
  /* keys with unusual but valid characters */
  CHECK_RC(coord_config_set(c, "a.b/c-d/e_f/.hidden/x..y", v), 0);
  CHECK_RC(coord_config_get(c, "a.b/c-d/e_f/.hidden/x..y", &out), 0);
  json_decref(out);
  json_decref(v);
  coord_close(c);
  printf("ok errors\n");
}

static void list(void) {
  coord_t *c = client();
  const char *keys[] = {"app",   "app/db", "app/db/host", "app/web", "application",
                        "apple", "app-x",  "ap",          "zzz"};
  for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++) {
    json_t *v = json_string(keys[i]);
    CHECK_RC(coord_config_set(c, keys[i], v), 0);
    json_decref(v);
  }
  json_t *out = NULL;
  CHECK_RC(coord_config_list(c, "app", &out), 0);
  CHECK(out && json_object_size(out) == 4);
  const char *want[] = {"app", "app/db", "app/db/host", "app/web"};
  for (size_t i = 0; out && i < 4; i++) {
    json_t *v = json_object_get(out, want[i]);
    CHECK(v && json_is_string(v) && strcmp(json_string_value(v), want[i]) == 0);
  }
  json_decref(out);
  CHECK_RC(coord_config_list(c, "app/db", &out), 0);
  CHECK(out && json_object_size(out) == 2 && json_object_get(out, "app/db/host"));
  json_decref(out);
  CHECK_RC(coord_config_list(c, "app/db/host", &out), 0);
  CHECK(out && json_object_size(out) == 1);
  json_decref(out);
  /* a prefix that is only a directory */
  CHECK_RC(coord_config_delete(c, "app"), 0);
  CHECK_RC(coord_config_list(c, "app", &out), 0);
  CHECK(out && json_object_size(out) == 3 && !json_object_get(out, "app"));
  json_decref(out);
  /* everything (other scenarios may have left keys too) */
  for (int pass = 0; pass < 2; pass++) {
    CHECK_RC(coord_config_list(c, pass ? "" : NULL, &out), 0);
    CHECK(out && json_object_size(out) >= 8);
    CHECK(out && json_object_get(out, "zzz") && json_object_get(out, "application") &&
          json_object_get(out, "ap"));
    CHECK(out && json_object_get(out, "app/db/host") && !json_object_get(out, "app"));
    json_decref(out);
  }
  coord_close(c);
  printf("ok list\n");
}

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

static int is_event(coord_event_t *ev, coord_event_type_t type, const char *name, const char *json) {
  if (!ev || ev->type != type || !ev->name || strcmp(ev->name, name) != 0)
    return 0;
  if (json == NULL)
    return ev->json == NULL;
  json_t *want = parse(json);
  int ok = ev->json && json_equal(ev->json, want);
  json_decref(want);
  return ok;
}

static void watch(void) {
  coord_t *c = client();
  coord_t *other = client();
  json_t *v = parse("{\"v\":0}");
  CHECK_RC(coord_config_set(other, "w/app/one", v), 0);
  CHECK_RC(coord_config_set(other, "w/application/x", v), 0);
  json_decref(v);

  coord_watch_t *pw = NULL, *kw = NULL, *allw = NULL;
  CHECK_RC(coord_config_watch_prefix(c, "w/app", 1, &pw), 0);
  CHECK_RC(coord_config_watch(c, "w/app/one", 0, &kw), 0);
  CHECK_RC(coord_config_watch_prefix(c, NULL, 0, &allw), 0);
  if (!pw || !kw || !allw)
    goto out;
  CHECK(coord_watch_fd(pw) >= 0);
  /* current state first, without "w/application/x" */
  coord_event_t *ev = next_event(pw);
  CHECK(is_event(ev, COORD_EVENT_PUT, "w/app/one", "{\"v\":0}"));
  coord_event_free(ev);

  v = parse("\"x\"");
  CHECK_RC(coord_config_set(other, "w/application/y", v), 0);
  CHECK_RC(coord_config_set(other, "w/apple", v), 0);
  CHECK_RC(coord_config_set(other, "w/app", v), 0);
  json_decref(v);
  v = parse("[1,2]");
  CHECK_RC(coord_config_set(other, "w/app/one", v), 0);
  json_decref(v);
  CHECK_RC(coord_config_delete(other, "w/app/one"), 0);

  ev = next_event(pw);
  CHECK(is_event(ev, COORD_EVENT_PUT, "w/app", "\"x\""));
  coord_event_free(ev);
  ev = next_event(pw);
  CHECK(is_event(ev, COORD_EVENT_PUT, "w/app/one", "[1,2]"));
  coord_event_free(ev);
  ev = next_event(pw);
  CHECK(is_event(ev, COORD_EVENT_DELETE, "w/app/one", NULL));
  coord_event_free(ev);
  ev = NULL;
  CHECK_RC(coord_watch_next(pw, 200, &ev), COORD_ETIMEDOUT);
  coord_event_free(ev);

  /* the key watch sees only its key */
  ev = next_event(kw);
  CHECK(is_event(ev, COORD_EVENT_PUT, "w/app/one", "[1,2]"));
  coord_event_free(ev);
  ev = next_event(kw);
  CHECK(is_event(ev, COORD_EVENT_DELETE, "w/app/one", NULL));
  coord_event_free(ev);
  ev = NULL;
  CHECK_RC(coord_watch_next(kw, 100, &ev), COORD_ETIMEDOUT);
  coord_event_free(ev);

  /* the watch of everything sees all five changes, in order */
  const char *names[] = {"w/application/y", "w/apple", "w/app", "w/app/one", "w/app/one"};
  for (int i = 0; i < 5; i++) {
    ev = next_event(allw);
    CHECK(ev && ev->name && strcmp(ev->name, names[i]) == 0);
    if (ev && (!ev->name || strcmp(ev->name, names[i]) != 0))
      printf("  got %s (key %s)\n", ev->name ? ev->name : "(null)", ev->kv.key);
    coord_event_free(ev);
  }
out:
  coord_watch_close(pw);
  coord_watch_close(kw);
  coord_watch_close(allw);
  coord_close(other);
  coord_close(c);
  printf("ok watch\n");
}

static void namespace(void) {
  coord_config_t cfg = coord_default_config();
  cfg.prefix = "/tenant-a";
  coord_t *ns = NULL;
  CHECK_RC(coord_new(&cfg, &ns), 0);
  coord_t *plain = client();
  if (!ns)
    return;
  coord_watch_t *w = NULL;
  CHECK_RC(coord_config_watch_prefix(ns, "svc", 0, &w), 0);
  json_t *v = parse("{\"a\":1}");
  CHECK_RC(coord_config_set(ns, "svc/x", v), 0);
  /* stored under the namespace */
  coord_kv_result_t *r = NULL;
  CHECK_RC(coord_kv_get(plain, "/tenant-a/config/svc/x", NULL, &r), 0);
  CHECK(r && r->n == 1 && strcmp(r->kvs[0].value, "{\"a\":1}") == 0);
  coord_kv_result_free(r);
  json_t *back = NULL;
  CHECK_RC(coord_config_get(plain, "svc/x", &back), COORD_ENOTFOUND);
  CHECK_RC(coord_config_get(ns, "svc/x", &back), 0);
  CHECK(back && json_equal(back, v));
  json_decref(back);
  json_t *all = NULL;
  CHECK_RC(coord_config_list(ns, NULL, &all), 0);
  CHECK(all && json_object_size(all) == 1 && json_object_get(all, "svc/x"));
  json_decref(all);
  if (w) {
    coord_event_t *ev = next_event(w);
    CHECK(is_event(ev, COORD_EVENT_PUT, "svc/x", "{\"a\":1}"));
    coord_event_free(ev);
  }
  coord_watch_close(w);
  json_decref(v);
  coord_close(plain);
  coord_close(ns);
  printf("ok namespace\n");
}

int main(int argc, char **argv) {
  setvbuf(stdout, NULL, _IOLBF, 0);
  static const struct {
    const char *name;
    void (*fn)(void);
  } all[] = {{"roundtrip", roundtrip}, {"pack", pack},   {"errors", errors},
             {"list", list},           {"watch", watch}, {"namespace", namespace}};
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
