/*
 * fuzz_config_codec.c — libFuzzer target for the config value codec: any
 * bytes stored in etcd (written by anyone) decode to a JSON value, and the
 * codec round-trips: encode(decode(b)) decodes to an equal value, and a
 * JSON string always comes back as the same string.
 */
#include <coord.h>

#include <assert.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  json_t *v = coord_config_decode(data, size);
  if (!v)
    return 0; /* only when out of memory or not valid UTF-8 for a string */
  char *bytes = NULL;
  size_t len = 0;
  if (coord_config_encode(v, &bytes, &len) == 0) {
    json_t *w = coord_config_decode(bytes, len);
    assert(w && json_equal(v, w));
    json_decref(w);
    free(bytes);
  }
  /* the same bytes as a C string value: stored so that it reads back equal */
  json_t *s = json_stringn((const char *)data, size);
  if (s && coord_config_encode(s, &bytes, &len) == 0) {
    json_t *w = coord_config_decode(bytes, len);
    assert(w && json_equal(s, w));
    json_decref(w);
    free(bytes);
  }
  json_decref(s);
  json_decref(v);
  return 0;
}
