/*
 * config.c — the configuration centre: JSON values under /config/<key>.
 *
 * How it fits: config is a thin layer over the client core's KV and watch
 * calls (kv.c, watch.c).  It owns no per-client state and no thread: every
 * function here is a plain blocking call made on the caller's thread, except
 * the watch decoder, which the core runs on the event thread (it only parses
 * and never blocks).
 *
 * Value encoding (coord_config_encode / coord_config_decode), shared with
 * coordfs and tools:
 *   - bytes that parse as JSON (any JSON value, scalars included) are that
 *     JSON; any other bytes are a string;
 *   - a JSON string is stored as its raw bytes, unless those bytes would
 *     themselves parse as JSON ("42", "true", "\"x\""), in which case it is
 *     stored as the quoted JSON string, so that every value round-trips;
 *   - every other value is stored compact (JSON_COMPACT | JSON_ENCODE_ANY).
 *   Decoding never fails: bytes that are neither JSON nor UTF-8 become a
 *   string holding those bytes unchecked (so encode gives them back as is).
 *
 * Keys are paths: non-empty, '/'-separated, with no empty part, no "." or
 * ".." part, no leading or trailing '/'.  A prefix is a path prefix: "app"
 * covers "app" and "app/...", never "application".  list fetches key "app"
 * and the range "app/" at one revision; watch_prefix watches the etcd prefix
 * "/config/app" and its decoder drops keys that are not on the path boundary.
 *
 * Watches (coord__watch_public) start at the store revision current when
 * they are created, so every change made after coord_config_watch* returns
 * is seen.
 *
 * Ownership and threads: values handed in are borrowed; values handed out
 * (json_t from get/list/decode, bytes from encode) belong to the caller.
 * The one piece of state is per thread: the values coord_config_unpack
 * keeps alive for the pointers it handed out (see unpack_keep).  Every
 * function may be called from any thread, but none from the event thread
 * (they block on etcd).
 */
#include "internal.h"

#include <assert.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define CONFIG_ROOT "/config/"
#define CONFIG_ROOT_LEN (sizeof(CONFIG_ROOT) - 1)

/* Flags used for every parse of a stored value: any JSON value, NUL allowed
 * inside strings.  The encoder's "would it parse?" check uses the same flags
 * as the decoder, which is what makes strings round-trip. */
#define CONFIG_DECODE_FLAGS (JSON_DECODE_ANY | JSON_ALLOW_NUL)

/* ---------------------------------------------------------------- codec */

json_t *coord_config_decode(const void *bytes, size_t len) {
  if (bytes == NULL && len > 0)
    return NULL;
  if (bytes == NULL)
    bytes = "";
  json_error_t jerr;
  json_t *v = json_loadb(bytes, len, CONFIG_DECODE_FLAGS, &jerr);
  if (v != NULL)
    return v;
  v = json_stringn(bytes, len);
  if (v == NULL) /* not UTF-8: keep the bytes as they are */
    v = json_stringn_nocheck(bytes, len);
  return v;
}

int coord_config_encode(const json_t *value, char **bytes, size_t *len) {
  if (value == NULL || bytes == NULL || len == NULL)
    return coord__err(COORD_EINVAL, "coord_config_encode: NULL argument");
  *bytes = NULL;
  *len = 0;
  if (json_is_string(value)) {
    const char *s = json_string_value(value);
    size_t n = json_string_length(value);
    json_error_t jerr;
    json_t *probe = json_loadb(s, n, CONFIG_DECODE_FLAGS, &jerr);
    if (probe == NULL) {
      /* Not JSON by itself: raw bytes (plus a NUL for convenience). */
      char *out = coord__xmalloc(n + 1);
      if (out == NULL)
        return coord__err(COORD_ENOMEM, "coord_config_encode: out of memory");
      memcpy(out, s, n);
      out[n] = '\0';
      *bytes = out;
      *len = n;
      return 0;
    }
    json_decref(probe);
    /* Falls through: stored quoted so that it reads back as a string. */
  }
  char *out = json_dumps(value, JSON_COMPACT | JSON_ENCODE_ANY);
  if (out == NULL)
    return coord__err(COORD_EINVAL, "coord_config_encode: value cannot be serialized as JSON");
  *bytes = out;
  *len = strlen(out);
  return 0;
}

/* ---------------------------------------------------------------- keys */

/* Checks a config key (or a non-empty prefix).  what: "key" or "prefix". */
static int check_key(const char *fn, const char *what, const char *key) {
  if (key == NULL)
    return coord__err(COORD_EINVAL, "%s: %s is NULL", fn, what);
  if (key[0] == '\0')
    return coord__err(COORD_EINVAL, "%s: %s is empty", fn, what);
  if (key[0] == '/')
    return coord__err(COORD_EINVAL, "%s: %s \"%s\" starts with '/'", fn, what, key);
  const char *p = key;
  for (;;) {
    const char *slash = strchr(p, '/');
    size_t n = slash ? (size_t)(slash - p) : strlen(p);
    if (n == 0)
      return coord__err(COORD_EINVAL, "%s: %s \"%s\" has an empty path part", fn, what, key);
    if ((n == 1 && p[0] == '.') || (n == 2 && p[0] == '.' && p[1] == '.'))
      return coord__err(COORD_EINVAL, "%s: %s \"%s\" has a \".\" or \"..\" part", fn, what, key);
    if (slash == NULL)
      break;
    p = slash + 1;
  }
  return 0;
}

/* "/config/" + key, malloc'd. */
static char *config_key(const char *key) {
  return coord__sprintf(CONFIG_ROOT "%s", key);
}

/* The config key of an etcd key (namespace already stripped), or NULL if it
 * is not under /config/. */
static const char *config_name(const char *etcd_key, size_t len) {
  if (len < CONFIG_ROOT_LEN || memcmp(etcd_key, CONFIG_ROOT, CONFIG_ROOT_LEN) != 0)
    return NULL;
  return etcd_key + CONFIG_ROOT_LEN;
}

/* ---------------------------------------------------------------- get/set */

int coord_config_get(coord_t *c, const char *key, json_t **out) {
  static const char fn[] = "coord_config_get";
  if (out != NULL)
    *out = NULL;
  if (c == NULL || out == NULL)
    return coord__err(COORD_EINVAL, "%s: NULL argument", fn);
  assert(!coord__on_event_thread(c)); /* blocks on etcd */
  int rc = check_key(fn, "key", key);
  if (rc < 0)
    return rc;
  char *k = config_key(key);
  if (k == NULL)
    return coord__err(COORD_ENOMEM, "%s: out of memory", fn);
  coord_kv_result_t *r = NULL;
  rc = coord_kv_get(c, k, NULL, &r);
  free(k);
  if (rc < 0)
    return rc;
  assert(r != NULL);
  if (r->n == 0) {
    coord_kv_result_free(r);
    return coord__err(COORD_ENOTFOUND, "%s: no config key \"%s\"", fn, key);
  }
  json_t *v = coord_config_decode(r->kvs[0].value, r->kvs[0].value_len);
  coord_kv_result_free(r);
  if (v == NULL)
    return coord__err(COORD_ENOMEM, "%s: out of memory", fn);
  *out = v;
  return 0;
}

int coord_config_set(coord_t *c, const char *key, const json_t *value) {
  static const char fn[] = "coord_config_set";
  if (c == NULL || value == NULL)
    return coord__err(COORD_EINVAL, "%s: NULL argument", fn);
  assert(!coord__on_event_thread(c)); /* blocks on etcd */
  int rc = check_key(fn, "key", key);
  if (rc < 0)
    return rc;
  char *bytes = NULL;
  size_t len = 0;
  rc = coord_config_encode(value, &bytes, &len);
  if (rc < 0)
    return rc;
  char *k = config_key(key);
  if (k == NULL) {
    free(bytes);
    return coord__err(COORD_ENOMEM, "%s: out of memory", fn);
  }
  rc = coord_kv_put(c, k, bytes, len, NULL, NULL);
  free(k);
  free(bytes);
  return rc;
}

int coord_config_delete(coord_t *c, const char *key) {
  static const char fn[] = "coord_config_delete";
  if (c == NULL)
    return coord__err(COORD_EINVAL, "%s: NULL argument", fn);
  assert(!coord__on_event_thread(c)); /* blocks on etcd */
  int rc = check_key(fn, "key", key);
  if (rc < 0)
    return rc;
  char *k = config_key(key);
  if (k == NULL)
    return coord__err(COORD_ENOMEM, "%s: out of memory", fn);
  coord_kv_result_t *r = NULL;
  rc = coord_kv_delete(c, k, NULL, &r);
  free(k);
  if (rc < 0)
    return rc;
  int64_t deleted = r ? r->count : 0;
  coord_kv_result_free(r);
  if (deleted == 0)
    return coord__err(COORD_ENOTFOUND, "%s: no config key \"%s\"", fn, key);
  return 0;
}

/* ---------------------------------------------------------------- pack */

/* json_unpack's "s" and "o" hand out pointers into the value.  So that they
 * stay usable after coord_config_unpack returns, each thread keeps the last
 * value it unpacked of each key (a JSON object key -> value, owned by the
 * thread) until it unpacks that key again, or exits. */
static pthread_key_t unpack_key;
static pthread_once_t unpack_once = PTHREAD_ONCE_INIT;
static int unpack_key_ok;

static void unpack_values_free(void *p) {
  json_decref(p);
}

static void unpack_key_init(void) {
  unpack_key_ok = pthread_key_create(&unpack_key, unpack_values_free) == 0;
}

/* Keeps v (a reference we own) as this thread's last unpacked value of key.
 * If that cannot be done, v is leaked rather than left dangling. */
static void unpack_keep(const char *key, json_t *v) {
  pthread_once(&unpack_once, unpack_key_init);
  if (!unpack_key_ok)
    return;
  json_t *kept = pthread_getspecific(unpack_key);
  if (kept == NULL) {
    kept = json_object();
    if (kept == NULL || pthread_setspecific(unpack_key, kept) != 0) {
      json_decref(kept);
      return;
    }
  }
  if (json_object_set_nocheck(kept, key, v) == 0) /* drops the previous value */
    json_decref(v);
}

int coord_config_unpack(coord_t *c, const char *key, const char *fmt, ...) {
  static const char fn[] = "coord_config_unpack";
  if (c == NULL || fmt == NULL)
    return coord__err(COORD_EINVAL, "%s: NULL argument", fn);
  json_t *v = NULL;
  int rc = coord_config_get(c, key, &v);
  if (rc < 0)
    return rc;
  json_error_t jerr;
  va_list ap;
  va_start(ap, fmt);
  int jrc = json_vunpack_ex(v, &jerr, 0, fmt, ap);
  va_end(ap);
  unpack_keep(key, v);
  if (jrc != 0)
    return coord__err(COORD_EFORMAT, "%s: value of \"%s\" does not match \"%s\": %s", fn, key, fmt,
                      jerr.text);
  return 0;
}

int coord_config_pack(coord_t *c, const char *key, const char *fmt, ...) {
  static const char fn[] = "coord_config_pack";
  if (c == NULL || fmt == NULL)
    return coord__err(COORD_EINVAL, "%s: NULL argument", fn);
  int rc = check_key(fn, "key", key);
  if (rc < 0)
    return rc;
  json_error_t jerr;
  va_list ap;
  va_start(ap, fmt);
  json_t *v = json_vpack_ex(&jerr, 0, fmt, ap);
  va_end(ap);
  if (v == NULL)
    return coord__err(COORD_EFORMAT, "%s: cannot build a value from \"%s\": %s", fn, fmt, jerr.text);
  rc = coord_config_set(c, key, v);
  json_decref(v);
  return rc;
}

/* ---------------------------------------------------------------- list */

/* Adds every kv of r to obj as name -> decoded value. */
static int list_add(json_t *obj, const coord_kv_result_t *r) {
  for (size_t i = 0; i < r->n; i++) {
    const coord_kv_t *kv = &r->kvs[i];
    const char *name = config_name(kv->key, kv->key_len);
    if (name == NULL || name[0] == '\0')
      continue; /* outside /config/ (cannot happen for our ranges) */
    json_t *v = coord_config_decode(kv->value, kv->value_len);
    if (v == NULL || json_object_set_new(obj, name, v) != 0)
      return coord__err(COORD_ENOMEM, "coord_config_list: out of memory");
  }
  return 0;
}

int coord_config_list(coord_t *c, const char *prefix, json_t **out) {
  static const char fn[] = "coord_config_list";
  if (out != NULL)
    *out = NULL;
  if (c == NULL || out == NULL)
    return coord__err(COORD_EINVAL, "%s: NULL argument", fn);
  assert(!coord__on_event_thread(c)); /* blocks on etcd */
  int all = prefix == NULL || prefix[0] == '\0';
  int rc = all ? 0 : check_key(fn, "prefix", prefix);
  if (rc < 0)
    return rc;
  json_t *obj = json_object();
  if (obj == NULL)
    return coord__err(COORD_ENOMEM, "%s: out of memory", fn);

  coord_kv_result_t *self = NULL, *below = NULL;
  char *k_self = NULL, *k_below = NULL;
  if (all) {
    k_below = coord__strdup(CONFIG_ROOT);
  } else {
    k_self = config_key(prefix);
    k_below = coord__sprintf(CONFIG_ROOT "%s/", prefix);
  }
  if (k_below == NULL || (!all && k_self == NULL)) {
    rc = coord__err(COORD_ENOMEM, "%s: out of memory", fn);
    goto out;
  }
  int64_t rev = 0;
  if (!all) {
    rc = coord_kv_get(c, k_self, NULL, &self);
    if (rc < 0)
      goto out;
    rev = self->revision; /* read the range at the same revision */
  }
  coord_range_opts_t ro = {0};
  ro.prefix = 1;
  ro.revision = rev;
  rc = coord_kv_get(c, k_below, &ro, &below);
  if (rc < 0)
    goto out;
  if (self != NULL && (rc = list_add(obj, self)) < 0)
    goto out;
  if ((rc = list_add(obj, below)) < 0)
    goto out;
  *out = obj;
  obj = NULL;
  rc = 0;
out:
  coord_kv_result_free(self);
  coord_kv_result_free(below);
  free(k_self);
  free(k_below);
  json_decref(obj);
  return rc;
}

/* ---------------------------------------------------------------- watch */

/* Decoder run by the core on the event thread for each event of a config
 * watch.  arg is the length of the watched etcd key "/config/<prefix>" (as
 * an integer, so nothing needs freeing) for a prefix watch, 0 for a watch of
 * one key or of every key.  A prefix watch on "/config/app" also sees
 * "/config/application": such keys are skipped (return 1). */
static int config_decode_event(coord_t *c, coord_event_t *ev, void *arg) {
  COORD_UNUSED(c);
  size_t boundary = (size_t)(uintptr_t)arg;
  assert(ev != NULL && ev->kv.key != NULL);
  if (boundary > 0) {
    if (ev->kv.key_len < boundary)
      return 1;
    if (ev->kv.key_len > boundary && ev->kv.key[boundary] != '/')
      return 1;
  }
  const char *name = config_name(ev->kv.key, ev->kv.key_len);
  if (name == NULL || name[0] == '\0')
    return 1;
  ev->name = coord__strdup(name);
  if (ev->name == NULL)
    return 1;
  if (ev->type == COORD_EVENT_PUT) {
    ev->json = coord_config_decode(ev->kv.value, ev->kv.value_len);
    if (ev->json == NULL) {
      free(ev->name);
      ev->name = NULL;
      return 1;
    }
  }
  return 0;
}

int coord_config_watch(coord_t *c, const char *key, int with_current, coord_watch_t **out) {
  static const char fn[] = "coord_config_watch";
  if (out != NULL)
    *out = NULL;
  if (c == NULL || out == NULL)
    return coord__err(COORD_EINVAL, "%s: NULL argument", fn);
  assert(!coord__on_event_thread(c)); /* blocks on etcd */
  int rc = check_key(fn, "key", key);
  if (rc < 0)
    return rc;
  char *k = config_key(key);
  if (k == NULL)
    return coord__err(COORD_ENOMEM, "%s: out of memory", fn);
  coord_watch_opts_t o = {0};
  o.with_current = with_current;
  rc = coord__watch_public(c, k, &o, config_decode_event, NULL, out);
  free(k);
  return rc;
}

int coord_config_watch_prefix(coord_t *c, const char *prefix, int with_current, coord_watch_t **out) {
  static const char fn[] = "coord_config_watch_prefix";
  if (out != NULL)
    *out = NULL;
  if (c == NULL || out == NULL)
    return coord__err(COORD_EINVAL, "%s: NULL argument", fn);
  assert(!coord__on_event_thread(c)); /* blocks on etcd */
  int all = prefix == NULL || prefix[0] == '\0';
  int rc = all ? 0 : check_key(fn, "prefix", prefix);
  if (rc < 0)
    return rc;
  /* Every key: the etcd prefix "/config/" is already on a boundary. */
  char *k = all ? coord__strdup(CONFIG_ROOT) : config_key(prefix);
  if (k == NULL)
    return coord__err(COORD_ENOMEM, "%s: out of memory", fn);
  size_t boundary = all ? 0 : strlen(k);
  coord_watch_opts_t o = {0};
  o.prefix = 1;
  o.with_current = with_current;
  rc = coord__watch_public(c, k, &o, config_decode_event, (void *)(uintptr_t)boundary, out);
  free(k);
  return rc;
}
