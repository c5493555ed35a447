/*
 * test_util.c — unit tests of libcoord/src/util.c: TTL rounding, etcd's
 * prefix range end, string helpers, the thread-local error detail, and deep
 * copies of events.  No server needed.
 */
#include "internal.h"

#include "unit.h"

#include <pthread.h>
#include <time.h>

/* ---------------------------------------------------------------- time */

TEST(ms_to_ttl_rounds_up_to_whole_seconds) {
  CHECK_EQ(coord__ms_to_ttl_s(0), 0);
  CHECK_EQ(coord__ms_to_ttl_s(-1), 0);
  CHECK_EQ(coord__ms_to_ttl_s(-5000), 0);
  CHECK_EQ(coord__ms_to_ttl_s(1), 1);
  CHECK_EQ(coord__ms_to_ttl_s(999), 1);
  CHECK_EQ(coord__ms_to_ttl_s(1000), 1);
  CHECK_EQ(coord__ms_to_ttl_s(1001), 2);
  CHECK_EQ(coord__ms_to_ttl_s(10000), 10);
  CHECK_EQ(coord__ms_to_ttl_s(INT64_C(9000000000000)), INT64_C(9000000000));
}

TEST(now_ms_is_monotonic_and_in_ms) {
  int64_t a = coord__now_ms();
  struct timespec ts = {0, 20 * 1000 * 1000};
  nanosleep(&ts, NULL);
  int64_t b = coord__now_ms();
  CHECK_GE(b - a, 19);
  CHECK_LT(b - a, 5000);
}

/* ---------------------------------------------------------------- keys */

static void check_end(const char *key, size_t n, const char *want, size_t want_n, int line) {
  size_t got_n = 12345;
  char *e = coord__prefix_end(key, n, &got_n);
  if (!e) {
    unit__fail(__FILE__, line, "coord__prefix_end returned NULL");
    return;
  }
  if (got_n != want_n || memcmp(e, want, want_n) != 0) {
    char x[200], y[200];
    unit__fail(__FILE__, line, "prefix_end(%s): %s (len %zu), want %s (len %zu)",
               unit__show(key, n, x, sizeof x), unit__show(e, got_n, y, sizeof y), got_n, want, want_n);
  }
  free(e);
}

TEST(prefix_end_increments_last_byte) {
  check_end("a", 1, "b", 1, __LINE__);
  check_end("/config/", 8, "/config0", 8, __LINE__); /* '/' + 1 == '0' */
  check_end("/locks/deploy/", 14, "/locks/deploy0", 14, __LINE__);
  check_end("ab\x01", 3, "ab\x02", 3, __LINE__);
  check_end("a\xfe", 2, "a\xff", 2, __LINE__);
}

TEST(prefix_end_skips_trailing_0xff) {
  check_end("a\xff", 2, "b", 1, __LINE__);
  check_end("ab\xff\xff", 4, "ac", 2, __LINE__);
}

TEST(prefix_end_of_all_0xff_or_empty_is_whole_keyspace) {
  /* etcd: range_end "\0" means every key >= key */
  check_end("\xff\xff", 2, "\0", 1, __LINE__);
  check_end("", 0, "\0", 1, __LINE__);
}

TEST(prefix_end_keeps_embedded_nul) {
  check_end("a\0b", 3, "a\0c", 3, __LINE__);
}

/* ---------------------------------------------------------------- strings */

TEST(strndup_copies_n_bytes_and_terminates) {
  char *s = coord__strndup("hello world", 5);
  REQUIRE_NOTNULL(s);
  CHECK_STREQ(s, "hello");
  free(s);
  s = coord__strndup("a\0b", 3);
  REQUIRE_NOTNULL(s);
  CHECK_MEMEQ(s, "a\0b\0", 4);
  free(s);
  s = coord__strndup(NULL, 0);
  REQUIRE_NOTNULL(s);
  CHECK_STREQ(s, "");
  free(s);
}

TEST(strdup_of_null_is_null) {
  CHECK_NULL(coord__strdup(NULL));
  char *s = coord__strdup("x");
  CHECK_STREQ(s, "x");
  free(s);
}

TEST(sprintf_allocates) {
  char *s = coord__sprintf("%s/%d/%llx", "/locks/a", 7, 0x694d7b1f3f5cbd0aULL);
  CHECK_STREQ(s, "/locks/a/7/694d7b1f3f5cbd0a");
  free(s);
  char big[3000];
  memset(big, 'k', sizeof big - 1);
  big[sizeof big - 1] = '\0';
  s = coord__sprintf("<%s>", big);
  REQUIRE_NOTNULL(s);
  CHECK_EQ(strlen(s), sizeof big + 1);
  free(s);
}

TEST(xmalloc_zeroes_and_never_returns_null_for_zero) {
  unsigned char *p = coord__xmalloc(64);
  REQUIRE_NOTNULL(p);
  int zero = 1;
  for (int i = 0; i < 64; i++)
    zero &= p[i] == 0;
  CHECK(zero);
  free(p);
  p = coord__xmalloc(0);
  CHECK_NOTNULL(p);
  free(p);
}

/* ---------------------------------------------------------------- errors */

TEST(err_returns_code_and_sets_detail) {
  coord__err_clear();
  CHECK_STREQ(coord_last_error(), "");
  CHECK_EQ(coord__err(COORD_ETIMEDOUT, "Range %s after %d ms", "/config/app", 250), COORD_ETIMEDOUT);
  CHECK_STREQ(coord_last_error(), "Range /config/app after 250 ms");
  coord__err_clear();
  CHECK_STREQ(coord_last_error(), "");
}

TEST(err_detail_is_truncated_not_overflowed) {
  char big[2000];
  memset(big, 'x', sizeof big - 1);
  big[sizeof big - 1] = '\0';
  CHECK_EQ(coord__err(COORD_EIO, "%s", big), COORD_EIO);
  size_t n = strlen(coord_last_error());
  CHECK_GT(n, 100);
  CHECK_LT(n, sizeof big - 1);
  coord__err_clear();
}

static void *other_thread(void *arg) {
  char *seen = arg;
  snprintf(seen, 64, "%s", coord_last_error()); /* this thread's detail: empty */
  coord__err(COORD_EINVAL, "set by the other thread");
  return NULL;
}

TEST(err_detail_is_thread_local) {
  char seen[64] = "unset";
  pthread_t t;
  coord__err(COORD_EACCES, "main thread detail");
  REQUIRE_EQ(pthread_create(&t, NULL, other_thread, seen), 0);
  pthread_join(t, NULL);
  CHECK_STREQ(seen, "");
  CHECK_STREQ(coord_last_error(), "main thread detail");
  coord__err_clear();
}

TEST(strerror_names_every_code) {
  CHECK_STREQ(coord_strerror(COORD_OK), "success");
  const char *unknown = coord_strerror(-9999);
  CHECK_NOTNULL(unknown);
  for (int code = COORD_EINVAL; code >= COORD_ETLS; code--) {
    const char *s = coord_strerror(code);
    CHECK_MSG(s && *s && strcmp(s, unknown) != 0, "code %d has no name", code);
    for (int other = COORD_EINVAL; other > code; other--)
      CHECK_MSG(strcmp(s, coord_strerror(other)) != 0, "codes %d and %d share \"%s\"", code, other, s);
  }
  CHECK_STREQ(coord_strerror(1), unknown);
}

/* ---------------------------------------------------------------- events */

TEST(event_copy_is_deep) {
  coord_event_t src;
  memset(&src, 0, sizeof src);
  char key[] = "config/app", val[] = "{\"port\":1}\0tail";
  src.type = COORD_EVENT_PUT;
  src.revision = 42;
  src.kv.key = key;
  src.kv.key_len = strlen(key);
  src.kv.value = val;
  src.kv.value_len = sizeof val - 1; /* embedded NUL kept */
  src.kv.create_revision = 40;
  src.kv.mod_revision = 42;
  src.kv.version = 3;
  src.kv.lease = 0x1234;
  src.name = "app";
  src.id = NULL;
  src.json = json_pack("{s:i}", "port", 1);
  REQUIRE_NOTNULL(src.json);

  coord_event_t *dst = calloc(1, sizeof *dst);
  REQUIRE_NOTNULL(dst);
  CHECK_OK(coord__event_copy(&src, dst));
  CHECK_EQ(dst->type, COORD_EVENT_PUT);
  CHECK_EQ(dst->revision, 42);
  CHECK(dst->kv.key != key && dst->kv.value != val);
  CHECK_STREQ(dst->kv.key, "config/app");
  CHECK_EQ(dst->kv.key_len, strlen(key));
  CHECK_EQ(dst->kv.value_len, sizeof val - 1);
  CHECK_MEMEQ(dst->kv.value, val, sizeof val - 1);
  CHECK_EQ(((char *)dst->kv.value)[dst->kv.value_len], '\0');
  CHECK_EQ(dst->kv.create_revision, 40);
  CHECK_EQ(dst->kv.mod_revision, 42);
  CHECK_EQ(dst->kv.version, 3);
  CHECK_EQ(dst->kv.lease, 0x1234);
  CHECK(dst->name != src.name);
  CHECK_STREQ(dst->name, "app");
  CHECK_NULL(dst->id);
  CHECK(dst->json == src.json); /* shared by reference count */
  CHECK_EQ(src.json->refcount, 2);
  coord_event_free(dst);
  CHECK_EQ(src.json->refcount, 1);
  json_decref(src.json);
}

TEST(event_copy_of_delete_without_value) {
  coord_event_t src, dst;
  memset(&src, 0, sizeof src);
  src.type = COORD_EVENT_DELETE;
  src.kv.key = "k";
  src.kv.key_len = 1;
  CHECK_OK(coord__event_copy(&src, &dst));
  CHECK_STREQ(dst.kv.key, "k");
  CHECK_NOTNULL(dst.kv.value);
  CHECK_EQ(dst.kv.value_len, 0);
  CHECK_NULL(dst.json);
  coord__event_clear(&dst);
  CHECK_NULL(dst.kv.key);
}

TEST(frees_accept_null) {
  coord_event_free(NULL);
  coord__event_clear(NULL);
  coord__kv_clear(NULL);
  coord_kv_result_free(NULL);
  coord_txn_result_free(NULL);
  CHECK(1);
}
