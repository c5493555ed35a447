/*
 * fuzz_coordfs_cache.c — libFuzzer target for coordfs's handling of key
 * names from etcd: cfs_key_ok (which keys can be file paths) and the
 * watch-coherent cache (cache_apply, cache_children, cache_xattr,
 * cache_prune) that turns arbitrary keys — any bytes, NULs, empty
 * components, ".", "..", ".value", very long names — into a tree.
 *
 * coordfs/cache.c is pure (no FUSE calls, no global state), so it is
 * compiled into this target directly; `make fuzz` needs no coordfs objects.
 *
 * Input: records [op][klen][key...][vlen][value...]; op bit 0: put (else
 * delete), bit 1: prune afterwards, bit 2: first flip the key's directory as
 * a mount-local one (mkdir/rmdir; cache_set_localdir).  Revisions
 * increase.  A small model
 * (the last value of each distinct key, byte-exact) is kept, and after
 * every record:
 *   - cfs_key_ok(k) implies: no empty component, none of ".", "..",
 *     ".value", no NUL, no component over 255 bytes;
 *   - every present good key is a file with exactly its last value, and
 *     each directory above it is a directory whose ndesc is the number of
 *     present good keys strictly below it;
 *   - a deleted good key is not a file;
 *   - nbad is the number of present keys that cannot be file names, and
 *     cache_skipped lists exactly those keys, byte for byte; newbad is
 *     raised exactly when a put makes a key one of them;
 *   - listing names are non-empty and have no '/';
 *   - every node's nlocal is the number of mount-local directories
 *     strictly below it, and such a directory is a directory.
 */
#include "../../coordfs/cache.c"

#include <assert.h>

#define MAXK 48

struct mkey {
  char k[256];
  size_t klen;
  int present;
  char v[256];
  size_t vlen;
};

static int component_ok(const char *p, size_t n) {
  if (n == 0 || n > 255)
    return 0;
  if ((n == 1 && p[0] == '.') || (n == 2 && p[0] == '.' && p[1] == '.'))
    return 0;
  if (n == 6 && !memcmp(p, ".value", 6))
    return 0;
  return 1;
}

static int my_key_ok(const char *k, size_t len) {
  if (len == 0 || memchr(k, 0, len))
    return 0;
  size_t start = 0;
  for (size_t i = 0; i <= len; i++)
    if (i == len || k[i] == '/') {
      if (!component_ok(k + start, i - start))
        return 0;
      start = i + 1;
    }
  return 1;
}

/* nlocal of every node against a count of the localdir nodes below it. */
static void check_local(struct cfs_cache *c) {
  for (size_t i = 0; i < c->cap; i++)
    for (struct cfs_node *d = c->tab[i]; d; d = d->next) {
      size_t dl = strlen(d->path);
      int below = 0;
      for (size_t j = 0; j < c->cap; j++)
        for (struct cfs_node *x = c->tab[j]; x; x = x->next)
          if (x->localdir && strlen(x->path) > dl + 1 && !memcmp(x->path, d->path, dl) && x->path[dl] == '/')
            below++;
      assert(d->nlocal == below);
      if (d->localdir)
        assert(cache_is_dir(d));
    }
}

/* cache_skipped lists exactly the present keys that cannot be names, each
 * with its bytes as given (NULs included). */
struct skipped_check {
  struct mkey *model;
  size_t nm, n;
};

static void check_skipped(const char *key, size_t len, void *arg) {
  struct skipped_check *sc = arg;
  sc->n++;
  assert(key[len] == 0 && !cfs_key_ok(key, len) && cfs_key_problem(key, len));
  if (sc->nm >= MAXK)
    return;
  size_t j;
  for (j = 0; j < sc->nm; j++)
    if (sc->model[j].klen == len && !memcmp(sc->model[j].k, key, len))
      break;
  assert(j < sc->nm && sc->model[j].present);
}

static void check_name(struct cfs_node *n, const char *name, void *arg) {
  (void)n;
  (void)arg;
  assert(*name && !strchr(name, '/'));
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  struct cfs_cache c = {.prefix = "/config/"};
  static struct mkey model[MAXK];
  size_t nm = 0;
  int64_t rev = 1;
  size_t i = 0;
  while (i + 3 <= size) {
    uint8_t op = data[i++];
    size_t klen = data[i++] % 64;
    if (i + klen + 1 > size)
      break;
    /* keys reach the cache NUL-terminated (libcoord terminates key bytes;
     * key_len counts any NUL inside), as here */
    char key[65];
    memcpy(key, data + i, klen);
    key[klen] = 0;
    i += klen;
    size_t vlen = data[i++] % 32;
    if (i + vlen > size)
      vlen = size - i;
    const char *val = (const char *)data + i;
    i += vlen;
    int is_put = op & 1;
    rev++;

    int ok = cfs_key_ok(key, klen);
    assert(ok == my_key_ok(key, klen));

    char *slash = ok ? strrchr(key, '/') : NULL;
    if ((op & 4) && slash) { /* mkdir/rmdir of the key's directory, first */
      *slash = 0;
      struct cfs_node *d = cache_node(&c, key);
      if (d)
        cache_set_localdir(&c, d, !d->localdir);
      *slash = '/';
    }
    /* model: the key's entry, and whether it was a present bad key */
    size_t j;
    for (j = 0; j < nm; j++)
      if (model[j].klen == klen && !memcmp(model[j].k, key, klen))
        break;
    int was_bad = j < nm && model[j].present && !ok;

    c.newbad = 0;
    int changed = cache_apply(&c, key, klen, is_put, val, vlen, rev, is_put ? rev : 0, is_put ? 1 : 0, 0);
    assert(changed == 1); /* a newer revision always applies */
    c.notified = rev;
    if (j < nm || nm < MAXK) /* newbad: exactly when a key became a present bad one */
      assert(c.newbad == (is_put && !ok && !was_bad));
    if (j == nm && nm < MAXK) {
      memcpy(model[nm].k, key, klen);
      model[nm].klen = klen;
      nm++;
    }
    if (j < nm) {
      model[j].present = is_put;
      memcpy(model[j].v, val, vlen);
      model[j].vlen = is_put ? vlen : 0;
    }
    if (op & 2) {
      char *p = strndup(key, klen);
      if (p) {
        cache_prune(&c, p);
        free(p);
      }
    }

    /* checks */
    int nbad = 0;
    for (size_t a = 0; a < nm; a++) {
      struct mkey *m = &model[a];
      int good = my_key_ok(m->k, m->klen);
      if (m->present && !good)
        nbad++;
      if (!good)
        continue;
      char path[257];
      memcpy(path, m->k, m->klen);
      path[m->klen] = 0;
      struct cfs_node *n = cache_find(&c, path);
      if (m->present) {
        assert(n && cache_is_file(n));
        assert(n->len == m->vlen && !memcmp(n->val, m->v, m->vlen));
        /* every directory above it */
        for (char *s = strchr(path, '/'); s; s = strchr(s + 1, '/')) {
          *s = 0;
          struct cfs_node *d = cache_find(&c, path);
          assert(d && cache_is_dir(d));
          int below = 0;
          size_t dl = strlen(path);
          for (size_t b = 0; b < nm; b++)
            if (model[b].present && my_key_ok(model[b].k, model[b].klen) && model[b].klen > dl + 1 &&
                !memcmp(model[b].k, path, dl) && model[b].k[dl] == '/')
              below++;
          assert(d->ndesc == below);
          *s = '/';
        }
      } else {
        assert(!n || !cache_is_file(n));
      }
    }
    if (nm < MAXK) /* the model tracks every key */
      assert(c.nbad == nbad);
    struct skipped_check sc = {model, nm, 0};
    cache_skipped(&c, check_skipped, &sc);
    assert(sc.n == (size_t)c.nbad);
    cache_children(&c, "", check_name, NULL);
    check_local(&c);

    /* metadata of the last key, with short buffers */
    char path[65];
    memcpy(path, key, klen);
    path[klen] = 0;
    struct cfs_node *n = cache_find(&c, path);
    char xb[8];
    (void)cache_xattr(n, NULL, xb, sizeof xb);
    (void)cache_xattr(n, "user.coord.mod_revision", xb, sizeof xb);
    (void)cache_xattr(n, "user.coord.version", NULL, 0);
  }
  cache_free(&c);
  return 0;
}
