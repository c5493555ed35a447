/*
 * test_service_json.c — unit tests (no server) of the registry's instance
 * document: coord_service_from_json(_at), coord_service_to_json,
 * coord_service_clear.
 */
#include "coord.h"
#include "unit.h"

static json_t *J(const char *text) {
  json_error_t e;
  json_t *v = json_loads(text, JSON_DECODE_ANY, &e);
  if (!v)
    fprintf(stderr, "bad test JSON %s: %s\n", text, e.text);
  return v;
}

/* from_json(text) must fail with EINVAL, a message, and out zeroed. */
static void rejects(const char *text, const char *name, const char *id, const char *file, int line) {
  json_t *doc = J(text);
  coord_service_t s;
  memset(&s, 0xab, sizeof s);
  int rc = coord_service_from_json_at(doc, name, id, &s);
  if (rc != COORD_EINVAL)
    unit__fail(file, line, "%s accepted (rc %d)", text, rc);
  else if (coord_last_error()[0] == '\0')
    unit__fail(file, line, "%s: no error message", text);
  if (s.id || s.name || s.address || s.metadata || s.port)
    unit__fail(file, line, "%s: out not cleared", text);
  json_decref(doc);
}
#define REJECTS(text) rejects((text), NULL, NULL, __FILE__, __LINE__)
#define REJECTS_AT(text, name, id) rejects((text), (name), (id), __FILE__, __LINE__)

TEST(minimal_document) {
  json_t *doc = J("{\"address\":\"10.0.0.5\",\"port\":8080}");
  coord_service_t s;
  CHECK_OK(coord_service_from_json(doc, &s));
  CHECK_STREQ(s.address, "10.0.0.5");
  CHECK_EQ(s.port, 8080);
  CHECK_NULL(s.id);
  CHECK_NULL(s.name);
  CHECK_NULL(s.metadata);
  coord_service_clear(&s);
  CHECK_NULL(s.address);
  json_decref(doc);
}

TEST(full_document) {
  json_t *doc = J("{\"id\":\"chat-1\",\"name\":\"chat\",\"address\":\"h\",\"port\":1,"
                  "\"metadata\":{\"zone\":\"a\",\"w\":[1]},\"extra\":true}");
  coord_service_t s;
  CHECK_OK(coord_service_from_json(doc, &s));
  CHECK_STREQ(s.id, "chat-1");
  CHECK_STREQ(s.name, "chat");
  CHECK_EQ(s.port, 1);
  REQUIRE(json_is_object(s.metadata));
  CHECK_STREQ(json_string_value(json_object_get(s.metadata, "zone")), "a");
  /* metadata is a copy: the document can go */
  json_decref(doc);
  CHECK_EQ(json_array_size(json_object_get(s.metadata, "w")), 1);
  coord_service_clear(&s);
}

TEST(path_fills_and_must_agree) {
  json_t *doc = J("{\"address\":\"h\",\"port\":65535}");
  coord_service_t s;
  CHECK_OK(coord_service_from_json_at(doc, "chat", "c1", &s));
  CHECK_STREQ(s.name, "chat");
  CHECK_STREQ(s.id, "c1");
  CHECK_EQ(s.port, 65535);
  coord_service_clear(&s);
  json_decref(doc);
  REJECTS_AT("{\"id\":\"c2\",\"address\":\"h\",\"port\":1}", "chat", "c1");
  REJECTS_AT("{\"name\":\"mail\",\"address\":\"h\",\"port\":1}", "chat", "c1");
  REJECTS_AT("{\"address\":\"h\",\"port\":1}", "a/b", "c1");
  REJECTS_AT("{\"address\":\"h\",\"port\":1}", "chat", "");
  doc = J("{\"id\":\"c1\",\"name\":\"chat\",\"address\":\"h\",\"port\":1}");
  CHECK_OK(coord_service_from_json_at(doc, "chat", "c1", &s));
  coord_service_clear(&s);
  CHECK_OK(coord_service_from_json_at(doc, NULL, "c1", &s));
  CHECK_STREQ(s.name, "chat");
  coord_service_clear(&s);
  json_decref(doc);
}

TEST(rejects_bad_documents) {
  REJECTS("[]");
  REJECTS("\"x\"");
  REJECTS("42");
  REJECTS("null");
  REJECTS("{}");
  REJECTS("{\"port\":80}");
  REJECTS("{\"address\":\"\",\"port\":80}");
  REJECTS("{\"address\":null,\"port\":80}");
  REJECTS("{\"address\":[\"h\"],\"port\":80}");
  REJECTS("{\"address\":\"h\"}");
  REJECTS("{\"address\":\"h\",\"port\":\"80\"}");
  REJECTS("{\"address\":\"h\",\"port\":0}");
  REJECTS("{\"address\":\"h\",\"port\":65536}");
  REJECTS("{\"address\":\"h\",\"port\":-80}");
  REJECTS("{\"address\":\"h\",\"port\":80.0}");
  REJECTS("{\"address\":\"h\",\"port\":true}");
  REJECTS("{\"address\":\"h\",\"port\":80,\"id\":1}");
  REJECTS("{\"address\":\"h\",\"port\":80,\"id\":\"\"}");
  REJECTS("{\"address\":\"h\",\"port\":80,\"id\":\"a/b\"}");
  REJECTS("{\"address\":\"h\",\"port\":80,\"name\":false}");
  REJECTS("{\"address\":\"h\",\"port\":80,\"name\":\"x/\"}");
  REJECTS("{\"address\":\"h\",\"port\":80,\"metadata\":[]}");
  REJECTS("{\"address\":\"h\",\"port\":80,\"metadata\":\"m\"}");
  REJECTS("{\"address\":\"h\",\"port\":80,\"metadata\":3}");
  json_t *nul = json_pack("{s:s%,s:i}", "address", "a\0b", 3, "port", 80);
  coord_service_t s;
  CHECK_RC(coord_service_from_json(nul, &s), COORD_EINVAL);
  json_decref(nul);
  CHECK_RC(coord_service_from_json(NULL, &s), COORD_EINVAL);
  json_t *doc = J("{\"address\":\"h\",\"port\":80}");
  CHECK_RC(coord_service_from_json(doc, NULL), COORD_EINVAL);
  json_decref(doc);
}

TEST(messages_name_the_field) {
  json_t *doc = J("{\"address\":\"h\",\"port\":70000}");
  coord_service_t s;
  CHECK_RC(coord_service_from_json(doc, &s), COORD_EINVAL);
  CHECK(strstr(coord_last_error(), "port") != NULL);
  json_decref(doc);
  doc = J("{\"port\":7}");
  CHECK_RC(coord_service_from_json(doc, &s), COORD_EINVAL);
  CHECK(strstr(coord_last_error(), "address") != NULL);
  json_decref(doc);
}

TEST(metadata_null_is_none) {
  json_t *doc = J("{\"address\":\"h\",\"port\":80,\"metadata\":null}");
  coord_service_t s;
  CHECK_OK(coord_service_from_json(doc, &s));
  CHECK_NULL(s.metadata);
  coord_service_clear(&s);
  json_decref(doc);
}

TEST(to_json_fields) {
  json_t *md = J("{\"zone\":\"eu\"}");
  coord_service_t in = {.id = "i1", .name = "n1", .address = "127.0.0.1", .port = 9000, .metadata = md};
  json_t *doc = coord_service_to_json(&in);
  REQUIRE(doc != NULL);
  CHECK_STREQ(json_string_value(json_object_get(doc, "id")), "i1");
  CHECK_STREQ(json_string_value(json_object_get(doc, "name")), "n1");
  CHECK_STREQ(json_string_value(json_object_get(doc, "address")), "127.0.0.1");
  CHECK_EQ(json_integer_value(json_object_get(doc, "port")), 9000);
  CHECK(json_equal(json_object_get(doc, "metadata"), md));
  CHECK(json_object_get(doc, "metadata") != md); /* a copy */
  CHECK_EQ(json_object_size(doc), 5);
  /* and back */
  coord_service_t s;
  CHECK_OK(coord_service_from_json_at(doc, "n1", "i1", &s));
  CHECK_STREQ(s.address, "127.0.0.1");
  CHECK(json_equal(s.metadata, md));
  coord_service_clear(&s);
  json_decref(doc);
  /* no metadata: an empty object; no id/name: left out */
  coord_service_t bare = {.address = "h", .port = 1};
  doc = coord_service_to_json(&bare);
  REQUIRE(doc != NULL);
  CHECK(json_is_object(json_object_get(doc, "metadata")));
  CHECK_EQ(json_object_size(json_object_get(doc, "metadata")), 0);
  CHECK_NULL(json_object_get(doc, "id"));
  json_decref(doc);
  json_decref(md);
}

TEST(to_json_rejects_invalid) {
  coord_service_t s = {.id = "i", .name = "n", .address = "h", .port = 1};
  CHECK_NULL(coord_service_to_json(NULL));
  s.port = 0;
  CHECK_NULL(coord_service_to_json(&s));
  s.port = 65536;
  CHECK_NULL(coord_service_to_json(&s));
  s.port = 1;
  s.address = NULL;
  CHECK_NULL(coord_service_to_json(&s));
  s.address = "";
  CHECK_NULL(coord_service_to_json(&s));
  s.address = "h";
  s.id = "a/b";
  CHECK_NULL(coord_service_to_json(&s));
  s.id = "i";
  json_t *arr = json_array();
  s.metadata = arr;
  CHECK_NULL(coord_service_to_json(&s));
  json_decref(arr);
  s.metadata = NULL;
  s.address = "\xff\xfe";
  CHECK_NULL(coord_service_to_json(&s));
}

TEST(clear_is_idempotent) {
  coord_service_t s = {0};
  coord_service_clear(&s);
  coord_service_clear(NULL);
  json_t *doc = J("{\"address\":\"h\",\"port\":2,\"metadata\":{}}");
  CHECK_OK(coord_service_from_json_at(doc, "n", "i", &s));
  coord_service_clear(&s);
  coord_service_clear(&s);
  CHECK_NULL(s.metadata);
  json_decref(doc);
}

TEST(list_free_null) {
  coord_service_list_free(NULL, 0);
  coord_service_t *list = calloc(2, sizeof *list);
  list[0].address = strdup("a");
  list[1].id = strdup("b");
  coord_service_list_free(list, 2);
}
