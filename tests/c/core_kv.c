/*
 * core_kv.c — end-to-end checks of the client core's KV and leases against
 * a real etcd (COORD_ENDPOINTS).  Driven by tests/test_core.py; each
 * subcommand prints "ok ..." lines and exits 0, or prints the failure and
 * exits 1.
 *
 *   core_kv basic       put/get/delete/txn, binary and 1 MiB values,
 *                       range options, too-large value
 *   core_kv lease       keepalive past 3x TTL; prints the lease id, then
 *                       closes the client (revoking it)
 *   core_kv lost-stop   a lost callback still running when the lease is
 *                       stopped (then revoked): the stop waits for it
 *   core_kv invalid     invalid arguments give COORD_EINVAL
 *   core_kv connect T   coord_new with dial timeout T ms; prints the code
 *   core_kv writer N P  puts P/0..P/N-1 and prints each acknowledged key
 *   core_kv tls CA CERT KEY   connects over TLS ("-" for none) and puts
 *   core_kv auth USER PASSWORD KEY
 *                       connects as USER (password given on stdin would be
 *                       better; tests only) and puts KEY; prints the code;
 *                       with WAIT_S in the environment it sleeps that long
 *                       after the first put (token expiry) and puts again
 */
#include <coord.h>

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define CHECK(cond, ...)                                                                                     \
  do {                                                                                                       \
    if (!(cond)) {                                                                                           \
      fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);                                        \
      fprintf(stderr, __VA_ARGS__);                                                                          \
      fprintf(stderr, " [%s]\n", coord_last_error());                                                        \
      exit(1);                                                                                               \
    }                                                                                                        \
  } while (0)

static coord_t *client(void) {
  coord_t *c = NULL;
  int rc = coord_new(NULL, &c);
  CHECK(rc == 0, "coord_new: %s", coord_strerror(rc));
  return c;
}

static void basic(void) {
  coord_t *c = client();
  int rc;
  /* put / get */
  rc = coord_kv_put(c, "t/a", "1", 1, NULL, NULL);
  CHECK(rc == 0, "put: %d", rc);
  coord_kv_result_t *r = NULL;
  rc = coord_kv_get(c, "t/a", NULL, &r);
  CHECK(rc == 0 && r->n == 1 && r->kvs[0].value_len == 1 && !memcmp(r->kvs[0].value, "1", 1), "get");
  CHECK(!strcmp(r->kvs[0].key, "t/a") && r->kvs[0].version == 1 && r->revision > 0, "metadata");
  coord_kv_result_free(r);
  /* binary value with NULs and every byte */
  char bin[256];
  for (int i = 0; i < 256; i++)
    bin[i] = (char)i;
  rc = coord_kv_put(c, "t/bin", bin, sizeof bin, NULL, NULL);
  CHECK(rc == 0, "put bin");
  rc = coord_kv_get(c, "t/bin", NULL, &r);
  CHECK(rc == 0 && r->n == 1 && r->kvs[0].value_len == 256 && !memcmp(r->kvs[0].value, bin, 256), "bin");
  coord_kv_result_free(r);
  printf("ok binary\n");
  /* 1 MiB */
  size_t big = 1 << 20;
  char *v = malloc(big);
  for (size_t i = 0; i < big; i++)
    v[i] = (char)('a' + i % 26);
  rc = coord_kv_put(c, "t/big", v, big, NULL, NULL);
  CHECK(rc == 0, "put 1MiB: %s", coord_strerror(rc));
  rc = coord_kv_get(c, "t/big", NULL, &r);
  CHECK(rc == 0 && r->n == 1 && r->kvs[0].value_len == big && !memcmp(r->kvs[0].value, v, big), "get 1MiB");
  coord_kv_result_free(r);
  free(v);
  printf("ok 1MiB\n");
  /* too large: etcd's request limit is 1.5 MiB by default */
  size_t huge = 3 << 20;
  v = calloc(1, huge);
  rc = coord_kv_put(c, "t/huge", v, huge, NULL, NULL);
  CHECK(rc == COORD_ETOOBIG, "huge put gave %d (%s)", rc, coord_strerror(rc));
  CHECK(strlen(coord_last_error()) > 0, "detail");
  printf("ok too-large: %s\n", coord_last_error());
  free(v);
  rc = coord_kv_get(c, "t/huge", NULL, &r);
  CHECK(rc == 0 && r->n == 0, "nothing stored");
  coord_kv_result_free(r);
  /* range options */
  for (int i = 0; i < 5; i++) {
    char k[32];
    snprintf(k, sizeof k, "t/r/%d", i);
    CHECK(coord_kv_put(c, k, k, strlen(k), NULL, NULL) == 0, "put %s", k);
  }
  coord_range_opts_t o = {0};
  o.prefix = 1;
  rc = coord_kv_get(c, "t/r/", &o, &r);
  CHECK(rc == 0 && r->n == 5 && r->count == 5, "prefix n=%zu", r ? r->n : 0);
  coord_kv_result_free(r);
  o.limit = 2;
  o.sort_order = COORD_SORT_DESCEND;
  o.sort_target = COORD_SORT_KEY;
  rc = coord_kv_get(c, "t/r/", &o, &r);
  CHECK(rc == 0 && r->n == 2 && r->more && !strcmp(r->kvs[0].key, "t/r/4"), "limit+sort");
  int64_t rev_before = r->revision;
  coord_kv_result_free(r);
  memset(&o, 0, sizeof o);
  o.prefix = 1;
  o.count_only = 1;
  rc = coord_kv_get(c, "t/r/", &o, &r);
  CHECK(rc == 0 && r->n == 0 && r->count == 5, "count_only");
  coord_kv_result_free(r);
  o.count_only = 0;
  o.keys_only = 1;
  rc = coord_kv_get(c, "t/r/", &o, &r);
  CHECK(rc == 0 && r->n == 5 && r->kvs[0].value_len == 0, "keys_only");
  coord_kv_result_free(r);
  CHECK(coord_kv_put(c, "t/r/0", "new", 3, NULL, NULL) == 0, "overwrite");
  memset(&o, 0, sizeof o);
  o.revision = rev_before;
  rc = coord_kv_get(c, "t/r/0", &o, &r);
  CHECK(rc == 0 && r->n == 1 && !strcmp(r->kvs[0].value, "t/r/0"), "read at revision");
  coord_kv_result_free(r);
  o.revision = 0;
  o.serializable = 1;
  rc = coord_kv_get(c, "t/r/0", &o, &r);
  CHECK(rc == 0 && r->n == 1 && !strcmp(r->kvs[0].value, "new"), "serializable");
  coord_kv_result_free(r);
  printf("ok range options\n");
  /* put with prev_kv */
  coord_put_opts_t po = {0};
  po.prev_kv = 1;
  rc = coord_kv_put(c, "t/a", "2", 1, &po, &r);
  CHECK(rc == 0 && r->n == 1 && !strcmp(r->kvs[0].value, "1"), "prev_kv");
  coord_kv_result_free(r);
  /* txn: compare on value, version, create and mod revision */
  rc = coord_kv_get(c, "t/a", NULL, &r);
  int64_t mod = r->kvs[0].mod_revision, create = r->kvs[0].create_revision;
  coord_kv_result_free(r);
  coord_cmp_t cmp[4] = {
      {"t/a", COORD_CMP_VALUE, COORD_CMP_EQUAL, 0, "2", 1},
      {"t/a", COORD_CMP_VERSION, COORD_CMP_EQUAL, 2, NULL, 0},
      {"t/a", COORD_CMP_CREATE, COORD_CMP_EQUAL, create, NULL, 0},
      {"t/a", COORD_CMP_MOD, COORD_CMP_EQUAL, mod, NULL, 0},
  };
  coord_op_t ok_ops[2] = {{.type = COORD_OP_PUT, .key = "t/b", .value = "yes", .value_len = 3},
                          {.type = COORD_OP_RANGE, .key = "t/a"}};
  coord_op_t bad_ops[1] = {{.type = COORD_OP_PUT, .key = "t/b", .value = "no", .value_len = 2}};
  coord_txn_t t = {cmp, 4, ok_ops, 2, bad_ops, 1, 0};
  coord_txn_result_t *tr = NULL;
  rc = coord_kv_txn(c, &t, &tr);
  CHECK(rc == 0 && tr->succeeded && tr->n == 2 && tr->responses[1]->n == 1, "txn success");
  coord_txn_result_free(tr);
  cmp[3].number = mod - 1;
  rc = coord_kv_txn(c, &t, &tr);
  CHECK(rc == 0 && !tr->succeeded && tr->n == 1, "txn failure branch");
  coord_txn_result_free(tr);
  rc = coord_kv_get(c, "t/b", NULL, &r);
  CHECK(rc == 0 && r->n == 1 && !strcmp(r->kvs[0].value, "no"), "txn effect");
  coord_kv_result_free(r);
  printf("ok txn\n");
  /* delete */
  memset(&o, 0, sizeof o);
  o.prefix = 1;
  o.prev_kv = 1;
  rc = coord_kv_delete(c, "t/r/", &o, &r);
  CHECK(rc == 0 && r->count == 5 && r->n == 5, "delete prefix");
  coord_kv_result_free(r);
  rc = coord_kv_delete(c, "t/a", NULL, NULL);
  CHECK(rc == 0, "delete");
  rc = coord_kv_get(c, "t/a", NULL, &r);
  CHECK(rc == 0 && r->n == 0, "deleted");
  coord_kv_result_free(r);
  printf("ok delete\n");
  coord_close(c);
}

static void lease(int ttl_s) {
  coord_t *c = client();
  int64_t id = 0;
  int rc = coord_lease_grant(c, ttl_s * 1000, &id);
  CHECK(rc == 0 && id > 0, "grant");
  CHECK(coord_kv_put(c, "t/leased", "x", 1, &(coord_put_opts_t){.lease = id}, NULL) == 0, "put leased");
  rc = coord_lease_keepalive(c, id, NULL, NULL);
  CHECK(rc == 0, "keepalive");
  sleep((unsigned)(3 * ttl_s + 1));
  int64_t rem = 0, granted = 0;
  rc = coord_lease_ttl(c, id, &rem, &granted);
  CHECK(rc == 0 && rem > 0 && granted == ttl_s * 1000, "alive after 3x TTL: rem %lld", (long long)rem);
  coord_kv_result_t *r = NULL;
  CHECK(coord_kv_get(c, "t/leased", NULL, &r) == 0 && r->n == 1, "key kept");
  coord_kv_result_free(r);
  printf("ok lease %llx alive after %d s\n", (unsigned long long)id, 3 * ttl_s + 1);
  fflush(stdout);
  coord_close(c);
  printf("closed %llx\n", (unsigned long long)id);
}

typedef struct lost_probe {
  pthread_mutex_t mu;
  int started, finished;
} lost_probe_t;

/* A lost callback that takes half a second, as one that cleans up might. */
static void slow_lost(int64_t id, void *arg) {
  lost_probe_t *p = arg;
  (void)id;
  pthread_mutex_lock(&p->mu);
  p->started = 1;
  pthread_mutex_unlock(&p->mu);
  usleep(500 * 1000);
  pthread_mutex_lock(&p->mu);
  p->finished = 1;
  pthread_mutex_unlock(&p->mu);
}

/* Keeps a lease alive with slow_lost, revokes it from a second client so
 * that the next renewal answer reports it gone, and once slow_lost has
 * started calls stop (how = 0) or revoke (how = 1) on the first.  When that
 * returns, slow_lost must be over: the caller frees its argument next. */
static void lost_then_stop(coord_t *c, coord_t *other, int how) {
  lost_probe_t *p = calloc(1, sizeof *p);
  CHECK(p != NULL, "calloc");
  pthread_mutex_init(&p->mu, NULL);
  int64_t id = 0;
  CHECK(coord_lease_grant(c, 2000, &id) == 0, "grant");
  CHECK(coord_lease_keepalive(c, id, slow_lost, p) == 0, "keepalive");
  CHECK(coord_lease_revoke(other, id) == 0, "revoke from the other client");
  int started = 0;
  for (int i = 0; i < 1000 && !started; i++) {
    usleep(10 * 1000);
    pthread_mutex_lock(&p->mu);
    started = p->started;
    pthread_mutex_unlock(&p->mu);
  }
  CHECK(started, "lost callback not called within 10 s");
  int rc = how == 0 ? coord_lease_keepalive_stop(c, id) : coord_lease_revoke(c, id);
  CHECK(rc == 0 || rc == COORD_ENOTFOUND, "%s: %s", how ? "revoke" : "stop", coord_strerror(rc));
  pthread_mutex_lock(&p->mu);
  int finished = p->finished;
  pthread_mutex_unlock(&p->mu);
  CHECK(finished, "%s returned while the lost callback was still running",
        how ? "coord_lease_revoke" : "coord_lease_keepalive_stop");
  pthread_mutex_destroy(&p->mu);
  free(p);
}

static void lost_stop(void) {
  coord_t *c = client(), *other = client();
  lost_then_stop(c, other, 0);
  printf("ok stop waits for the lost callback\n");
  lost_then_stop(c, other, 1);
  printf("ok revoke waits for the lost callback\n");
  coord_close(other);
  coord_close(c);
}

static void invalid(void) {
  coord_t *c = NULL;
  coord_config_t cfg = coord_default_config();
  CHECK(coord_new(NULL, NULL) == COORD_EINVAL, "NULL out");
  cfg.endpoints = "not an endpoint";
  CHECK(coord_new(&cfg, &c) == COORD_EINVAL && !c, "bad endpoint");
  printf("ok bad endpoint: %s\n", coord_last_error());
  cfg.endpoints = "127.0.0.1:99999";
  CHECK(coord_new(&cfg, &c) == COORD_EINVAL, "bad port");
  cfg.endpoints = "ftp://127.0.0.1:1";
  CHECK(coord_new(&cfg, &c) == COORD_EINVAL, "bad scheme");
  cfg = coord_default_config();
  cfg.cert_file = "/nonexistent";
  CHECK(coord_new(&cfg, &c) == COORD_EINVAL, "cert without key");
  cfg = coord_default_config();
  cfg.ca_file = "/nonexistent/ca.pem";
  CHECK(coord_new(&cfg, &c) == COORD_ETLS, "unreadable CA");
  c = client();
  coord_kv_result_t *r = NULL;
  CHECK(coord_kv_get(NULL, "k", NULL, &r) == COORD_EINVAL, "NULL client");
  CHECK(coord_kv_get(c, NULL, NULL, &r) == COORD_EINVAL, "NULL key");
  CHECK(coord_kv_get(c, "", NULL, &r) == COORD_EINVAL, "empty key");
  CHECK(coord_kv_get(c, "k", NULL, NULL) == COORD_EINVAL, "NULL out");
  CHECK(coord_kv_put(c, "", "v", 1, NULL, NULL) == COORD_EINVAL, "put empty key");
  CHECK(coord_kv_put(c, "k", NULL, 3, NULL, NULL) == COORD_EINVAL, "put NULL value");
  CHECK(coord_kv_delete(c, NULL, NULL, NULL) == COORD_EINVAL, "delete NULL");
  CHECK(coord_kv_txn(c, NULL, NULL) == COORD_EINVAL, "txn NULL");
  coord_op_t op = {.type = COORD_OP_PUT, .key = ""};
  coord_txn_t t = {NULL, 0, &op, 1, NULL, 0, 0};
  CHECK(coord_kv_txn(c, &t, NULL) == COORD_EINVAL, "txn empty key");
  int64_t id;
  CHECK(coord_lease_grant(c, 0, &id) == COORD_EINVAL, "lease ttl 0");
  CHECK(coord_lease_grant(c, -5, &id) == COORD_EINVAL, "lease ttl <0");
  CHECK(coord_lease_revoke(c, 0) == COORD_EINVAL, "revoke 0");
  CHECK(coord_lease_ttl(c, 0x7fffffff, NULL, NULL) == COORD_ENOTFOUND, "unknown lease");
  CHECK(coord_watch_create(c, NULL, NULL, NULL) == COORD_EINVAL, "watch NULL");
  coord_watch_t *w;
  CHECK(coord_watch_create(c, "", NULL, &w) == COORD_EINVAL, "watch empty");
  CHECK(coord_watch_next(NULL, 0, NULL) == COORD_EINVAL, "next NULL");
  CHECK(coord_kv_compact(c, 0, 0) == COORD_EINVAL, "compact 0");
  CHECK(!strcmp(coord_strerror(COORD_ELOCKED), "lock is held"), "strerror");
  CHECK(!strcmp(coord_strerror(12345), "unknown error"), "strerror unknown");
  printf("ok invalid arguments\n");
  coord_close(c);
}

static void connect_only(int timeout_ms) {
  coord_config_t cfg = coord_default_config();
  cfg.dial_timeout_ms = timeout_ms;
  coord_t *c = NULL;
  struct timespec a, b;
  clock_gettime(CLOCK_MONOTONIC, &a);
  int rc = coord_new(&cfg, &c);
  clock_gettime(CLOCK_MONOTONIC, &b);
  long ms = (b.tv_sec - a.tv_sec) * 1000 + (b.tv_nsec - a.tv_nsec) / 1000000;
  printf("rc=%d ms=%ld err=%s detail=%s\n", rc, ms, coord_strerror(rc), coord_last_error());
  if (c)
    coord_close(c);
}

static void writer(int n, const char *prefix) {
  coord_t *c = client();
  int fails = 0;
  for (int i = 0; i < n; i++) {
    char k[256];
    snprintf(k, sizeof k, "%s/%06d", prefix, i);
    int rc = coord_kv_put(c, k, k, strlen(k), NULL, NULL);
    if (rc == 0)
      printf("ack %s\n", k);
    else
      printf("err %s %s\n", k, coord_last_error()), fails++;
    fflush(stdout);
  }
  printf("done fails=%d\n", fails);
  coord_close(c);
}

static const char *arg_or_null(const char *s) {
  return strcmp(s, "-") ? s : NULL;
}

static void tls(const char *ca, const char *cert, const char *key) {
  coord_config_t cfg = coord_default_config();
  cfg.ca_file = arg_or_null(ca);
  cfg.cert_file = arg_or_null(cert);
  cfg.key_file = arg_or_null(key);
  cfg.dial_timeout_ms = 3000;
  coord_t *c = NULL;
  int rc = coord_new(&cfg, &c);
  printf("new rc=%d %s: %s\n", rc, coord_strerror(rc), coord_last_error());
  if (rc)
    return;
  rc = coord_kv_put(c, "tls/k", "v", 1, NULL, NULL);
  printf("put rc=%d %s\n", rc, coord_strerror(rc));
  coord_close(c);
}

static void auth(const char *user, const char *password, const char *key) {
  coord_config_t cfg = coord_default_config();
  cfg.username = user;
  cfg.password = password;
  coord_t *c = NULL;
  int rc = coord_new(&cfg, &c);
  printf("new rc=%d %s: %s\n", rc, coord_strerror(rc), coord_last_error());
  if (rc)
    return;
  rc = coord_kv_put(c, key, "v", 1, NULL, NULL);
  printf("put rc=%d %s: %s\n", rc, coord_strerror(rc), coord_last_error());
  const char *wait = getenv("WAIT_S");
  if (wait) {
    sleep((unsigned)atoi(wait));
    rc = coord_kv_put(c, key, "w", 1, NULL, NULL);
    printf("put2 rc=%d %s: %s\n", rc, coord_strerror(rc), coord_last_error());
  }
  coord_kv_result_t *r = NULL;
  rc = coord_kv_get(c, key, NULL, &r);
  printf("get rc=%d %s\n", rc, coord_strerror(rc));
  coord_kv_result_free(r);
  coord_close(c);
}

int main(int argc, char **argv) {
  setvbuf(stdout, NULL, _IOLBF, 0);
  if (argc < 2)
    return 2;
  if (!strcmp(argv[1], "basic"))
    basic();
  else if (!strcmp(argv[1], "lease"))
    lease(argc > 2 ? atoi(argv[2]) : 2);
  else if (!strcmp(argv[1], "lost-stop"))
    lost_stop();
  else if (!strcmp(argv[1], "invalid"))
    invalid();
  else if (!strcmp(argv[1], "connect"))
    connect_only(argc > 2 ? atoi(argv[2]) : 2000);
  else if (!strcmp(argv[1], "tls") && argc > 4)
    tls(argv[2], argv[3], argv[4]);
  else if (!strcmp(argv[1], "auth") && argc > 4)
    auth(argv[2], argv[3], argv[4]);
  else if (!strcmp(argv[1], "writer") && argc > 3)
    writer(atoi(argv[2]), argv[3]);
  else
    return 2;
  return 0;
}
