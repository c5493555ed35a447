/*
 * test_config_codec.c — unit tests (no server) of the config value encoding:
 * coord_config_encode / coord_config_decode.
 *
 * The rules under test (config.c): bytes that parse as JSON are that JSON,
 * other bytes a string; a string is stored raw unless the raw bytes would
 * parse as JSON, then quoted; other values compact.  Every value must
 * round-trip through encode then decode.
 */
#include "coord.h"
#include "unit.h"

/* encode(v) gives exactly want (len bytes). */
static void expect_encoding(json_t *v, const char *want, size_t want_len, const char *file, int line) {
  char *bytes = NULL;
  size_t len = 0;
  int rc = coord_config_encode(v, &bytes, &len);
  if (rc != 0) {
    unit__fail(file, line, "encode failed: %d %s", rc, coord_last_error());
  } else if (len != want_len || memcmp(bytes, want, len) != 0) {
    char a[200], b[200];
    unit__fail(file, line, "encoded %s, want %s", unit__show(bytes, len, a, sizeof a),
               unit__show(want, want_len, b, sizeof b));
  } else {
    json_t *back = coord_config_decode(bytes, len);
    if (!back || !json_equal(back, v))
      unit__fail(file, line, "decode(encode(v)) != v for %s",
                 unit__show(want, want_len, (char[200]){0}, 200));
    json_decref(back);
  }
  free(bytes);
  json_decref(v);
}
#define ENC(v, want) expect_encoding((v), (want), strlen(want), __FILE__, __LINE__)

static json_t *J(const char *text) {
  json_error_t e;
  return json_loads(text, JSON_DECODE_ANY, &e);
}

TEST(encode_objects_and_arrays_compact) {
  ENC(J("{ \"a\" : 1, \"b\" : [ true, null ] }"), "{\"a\":1,\"b\":[true,null]}");
  ENC(J("[ ]"), "[]");
  ENC(J("{}"), "{}");
  ENC(J("[1, \"two\", {\"three\": 3.5}]"), "[1,\"two\",{\"three\":3.5}]");
}

TEST(encode_scalars) {
  ENC(json_integer(42), "42");
  ENC(json_integer(-9007199254740993LL), "-9007199254740993");
  ENC(json_real(0.25), "0.25");
  ENC(json_true(), "true");
  ENC(json_false(), "false");
  ENC(json_null(), "null");
}

TEST(encode_plain_strings_raw) {
  ENC(json_string("hello"), "hello");
  ENC(json_string(""), "");
  ENC(json_string("two words"), "two words");
  ENC(json_string("{not json"), "{not json");
  ENC(json_string("42abc"), "42abc");
  ENC(json_string("\xc3\xa9t\xc3\xa9"), "\xc3\xa9t\xc3\xa9");
  ENC(json_string("tru"), "tru");
  ENC(json_string("a\nb"), "a\nb");
}

TEST(encode_json_looking_strings_quoted) {
  ENC(json_string("42"), "\"42\"");
  ENC(json_string("-1.5e3"), "\"-1.5e3\"");
  ENC(json_string("true"), "\"true\"");
  ENC(json_string("null"), "\"null\"");
  ENC(json_string("\"x\""), "\"\\\"x\\\"\"");
  ENC(json_string("{\"a\":1}"), "\"{\\\"a\\\":1}\"");
  ENC(json_string("[]"), "\"[]\"");
  ENC(json_string(" 7 "), "\" 7 \"");
  ENC(json_string("\n42\n"), "\"\\n42\\n\"");
}

TEST(encode_string_with_nul) {
  json_t *v = json_stringn("a\0b", 3);
  expect_encoding(v, "a\0b", 3, __FILE__, __LINE__);
}

TEST(encode_errors) {
  char *b = (char *)"untouched";
  size_t n = 9;
  CHECK_RC(coord_config_encode(NULL, &b, &n), COORD_EINVAL);
  json_t *v = json_integer(1);
  CHECK_RC(coord_config_encode(v, NULL, &n), COORD_EINVAL);
  CHECK_RC(coord_config_encode(v, &b, NULL), COORD_EINVAL);
  json_decref(v);
  CHECK(strlen(coord_last_error()) > 0);
}

TEST(decode_json_values) {
  json_t *v = coord_config_decode("{\"a\":[1,2]}", 11);
  REQUIRE(v != NULL);
  CHECK(json_is_object(v));
  CHECK_EQ(json_array_size(json_object_get(v, "a")), 2);
  json_decref(v);
  v = coord_config_decode("  12  ", 6);
  CHECK(json_is_integer(v) && json_integer_value(v) == 12);
  json_decref(v);
  v = coord_config_decode("false", 5);
  CHECK(json_is_false(v));
  json_decref(v);
  v = coord_config_decode("\"quoted\"", 8);
  CHECK(json_is_string(v));
  CHECK_STREQ(json_string_value(v), "quoted");
  json_decref(v);
  /* only the first len bytes count */
  v = coord_config_decode("123456", 3);
  CHECK(json_is_integer(v) && json_integer_value(v) == 123);
  json_decref(v);
}

TEST(decode_other_bytes_as_string) {
  json_t *v = coord_config_decode("hello world", 11);
  CHECK(json_is_string(v));
  CHECK_STREQ(json_string_value(v), "hello world");
  json_decref(v);
  v = coord_config_decode("", 0);
  CHECK(json_is_string(v) && json_string_length(v) == 0);
  json_decref(v);
  v = coord_config_decode(NULL, 0);
  CHECK(json_is_string(v) && json_string_length(v) == 0);
  json_decref(v);
  v = coord_config_decode("{\"a\":", 5);
  CHECK(json_is_string(v));
  CHECK_STREQ(json_string_value(v), "{\"a\":");
  json_decref(v);
  v = coord_config_decode("1 2", 3);
  CHECK(json_is_string(v));
  json_decref(v);
  CHECK_NULL(coord_config_decode(NULL, 3));
}

TEST(decode_binary_round_trips) {
  const char bin[] = {'\xff', '\x00', '\xfe', 'a'};
  json_t *v = coord_config_decode(bin, sizeof bin);
  REQUIRE(v != NULL);
  CHECK(json_is_string(v));
  CHECK_EQ(json_string_length(v), sizeof bin);
  char *out = NULL;
  size_t n = 0;
  CHECK_OK(coord_config_encode(v, &out, &n));
  CHECK_EQ(n, sizeof bin);
  CHECK_MEMEQ(out, bin, sizeof bin);
  free(out);
  json_decref(v);
}

TEST(round_trip_many_strings) {
  static const char *samples[] = {"0",     "-0",  "1e5",  "x",     "\"",      "\"\"",       "[",
                                  "[1,2]", "{}",  " ",    "nul",   "null ",   "\t\"s\"\t",  "\\u0041",
                                  "true!", "NaN", "0x10", "1.0.0", "{\"k\"}", "caf\xc3\xa9"};
  for (size_t i = 0; i < sizeof samples / sizeof samples[0]; i++) {
    json_t *v = json_string(samples[i]);
    REQUIRE(v != NULL);
    char *out = NULL;
    size_t n = 0;
    CHECK_OK(coord_config_encode(v, &out, &n));
    json_t *back = coord_config_decode(out, n);
    CHECK_MSG(back && json_equal(back, v), "sample %s", samples[i]);
    json_decref(back);
    free(out);
    json_decref(v);
  }
}
