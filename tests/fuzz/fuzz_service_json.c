/*
 * fuzz_service_json.c — libFuzzer target for the instance document parser
 * (coord_service_from_json), the outside data that every registration and
 * every coordfs write to /services goes through.
 *
 * Property: any input either is rejected with COORD_EINVAL, or parses into
 * a service whose port is 1..65535 and address non-empty, and whose
 * document (coord_service_to_json) parses back to the same service.
 */
#include <coord.h>

#include <assert.h>
#include <stdint.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  json_t *doc = json_loadb((const char *)data, size, JSON_DECODE_ANY, NULL);
  if (!doc)
    return 0;
  coord_service_t s;
  memset(&s, 0, sizeof s);
  int rc = coord_service_from_json(doc, &s);
  if (rc == 0) {
    assert(s.port >= 1 && s.port <= 65535);
    assert(s.address && *s.address);
    json_t *back = coord_service_to_json(&s);
    assert(back);
    coord_service_t t;
    memset(&t, 0, sizeof t);
    assert(coord_service_from_json(back, &t) == 0);
    assert(t.port == s.port && !strcmp(t.address, s.address));
    assert((!s.id && !t.id) || (s.id && t.id && !strcmp(s.id, t.id)));
    coord_service_clear(&t);
    json_decref(back);
  } else {
    assert(rc == COORD_EINVAL);
  }
  coord_service_clear(&s);
  json_decref(doc);
  return 0;
}
