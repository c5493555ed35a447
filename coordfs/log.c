/*
 * log.c — coordfs's log (see log.h): stderr in the foreground, syslog when
 * daemonized, syslog's levels; libfuse's messages and request trace; and, at
 * LOG_DEBUG, every etcd call coordfs makes through libcoord.
 *
 * The etcd calls are seen without touching libcoord or the rest of coordfs:
 * the coordfs binary is linked with -Wl,--wrap=<call> (Makefile: FS_WRAP), so
 * that its references to <call> (and libcoord's own references across its
 * objects) reach __wrap_<call> here, which times __real_<call> and logs it.
 * Values are never logged (they may be secrets), only their lengths.
 */
#define FUSE_USE_VERSION 34
#include <fuse_lowlevel.h>

#include "log.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

#include "coord.h"

int cfs_log_level = LOG_INFO;
static int to_syslog;

static const char *level_name(int level) {
  static const char *names[] = {"emerg", "alert", "crit", "error", "warning", "notice", "info", "debug"};
  return level >= 0 && level <= LOG_DEBUG ? names[level] : "?";
}

static void vlog(int level, const char *fmt, va_list ap) {
  if (level > cfs_log_level)
    return;
  char msg[2048];
  vsnprintf(msg, sizeof(msg), fmt, ap);
  size_t n = strlen(msg);
  while (n && msg[n - 1] == '\n')
    msg[--n] = 0;
  if (to_syslog) {
    syslog(level, "%s", msg);
    return;
  }
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  struct tm tm;
  gmtime_r(&ts.tv_sec, &tm);
  char line[2200];
  snprintf(line, sizeof(line), "%02d:%02d:%02d.%03ld coordfs[%d] %s: %s\n", tm.tm_hour, tm.tm_min, tm.tm_sec,
           ts.tv_nsec / 1000000, (int)getpid(), level_name(level), msg);
  fputs(line, stderr); /* one call: lines of different threads do not mix */
}

void cfs_log(int level, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vlog(level, fmt, ap);
  va_end(ap);
}

/* libfuse's messages: its errors, and with -d its trace of every request.
 * fuse_log_level has syslog's values. */
static void fuse_log_cb(enum fuse_log_level level, const char *fmt, va_list ap) {
  vlog((int)level, fmt, ap);
}

void cfs_log_init(int foreground, int debug) {
  cfs_log_level = debug ? LOG_DEBUG : LOG_INFO;
  if (!foreground) {
    /* the daemon: its start-up already goes to syslog (fatal start-up
     * errors are printed on stderr by main.c, for the waiting parent) */
    openlog("coordfs", LOG_PID | LOG_NDELAY, LOG_DAEMON);
    to_syslog = 1;
  }
  const char *env = getenv("COORDFS_LOG_LEVEL");
  if (env && *env) {
    static const struct {
      const char *name;
      int level;
    } names[] = {{"err", LOG_ERR},       {"error", LOG_ERR}, {"warning", LOG_WARNING}, {"warn", LOG_WARNING},
                 {"notice", LOG_NOTICE}, {"info", LOG_INFO}, {"debug", LOG_DEBUG}};
    char *end;
    long v = strtol(env, &end, 10);
    if (!*end && v >= LOG_ERR && v <= LOG_DEBUG)
      cfs_log_level = (int)v;
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
      if (!strcasecmp(env, names[i].name))
        cfs_log_level = names[i].level;
  }
  fuse_set_log_func(fuse_log_cb);
}

void cfs_log_started(const char *mountpoint, const char *endpoints) {
  cfs_log(LOG_NOTICE, "mounted %s (etcd %s, coordfs %d.%d.%d, log level %s)", mountpoint, endpoints,
          COORD_VERSION_MAJOR, COORD_VERSION_MINOR, COORD_VERSION_PATCH, level_name(cfs_log_level));
}

/* ---------------------------------------------------------------- etcd calls */

static struct timespec now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t;
}

static double ms_since(struct timespec t0) {
  struct timespec t = now();
  return (t.tv_sec - t0.tv_sec) * 1e3 + (t.tv_nsec - t0.tv_nsec) / 1e6;
}

/* Outcomes that are answers, not failures. */
static int expected(int rc) {
  return rc == 0 || rc == COORD_ENOTFOUND || rc == COORD_ELOCKED || rc == COORD_ECONFLICT ||
         rc == COORD_ECANCELED || rc == COORD_EEXIST;
}

static int wanted(int rc) {
  return (expected(rc) ? LOG_DEBUG : LOG_WARNING) <= cfs_log_level;
}

/* "etcd <call> <detail> -> ok|error (detail) (ms)" */
static void call_done(int rc, struct timespec t0, const char *call, const char *result, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));
static void call_done(int rc, struct timespec t0, const char *call, const char *result, const char *fmt,
                      ...) {
  int level = expected(rc) ? LOG_DEBUG : LOG_WARNING;
  if (level > cfs_log_level)
    return;
  double ms = ms_since(t0);
  char what[700];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(what, sizeof(what), fmt, ap);
  va_end(ap);
  if (rc)
    cfs_log(level, "etcd %s %s -> %s%s%s (%.2f ms)", call, what, coord_strerror(rc),
            level == LOG_WARNING && *coord_last_error() ? ": " : "",
            level == LOG_WARNING ? coord_last_error() : "", ms);
  else
    cfs_log(level, "etcd %s %s -> ok%s%s (%.2f ms)", call, what, result && *result ? " " : "",
            result ? result : "", ms);
}

static const char *range_desc(char *buf, size_t n, const char *key, const coord_range_opts_t *o) {
  if (!o)
    snprintf(buf, n, "%s", key);
  else
    snprintf(buf, n, "%s%s%s%s limit=%lld rev=%lld%s%s", key, o->prefix ? " (prefix)" : "",
             !o->prefix && o->range_end ? " to " : "", !o->prefix && o->range_end ? o->range_end : "",
             (long long)o->limit, (long long)o->revision, o->keys_only ? " keys-only" : "",
             o->count_only ? " count-only" : "");
  return buf;
}

int __real_coord_new(const coord_config_t *cfg, coord_t **out);
int __wrap_coord_new(const coord_config_t *cfg, coord_t **out) {
  struct timespec t0 = now();
  int rc = __real_coord_new(cfg, out);
  call_done(rc, t0, "connect", NULL, "endpoints=%s%s%s", cfg && cfg->endpoints ? cfg->endpoints : "(default)",
            cfg && cfg->username ? " user=" : "", cfg && cfg->username ? cfg->username : "");
  return rc;
}

void __real_coord_close(coord_t *c);
void __wrap_coord_close(coord_t *c) {
  struct timespec t0 = now();
  __real_coord_close(c);
  call_done(0, t0, "close", "leases revoked", "%s", "");
}

int __real_coord_status(coord_t *c, int timeout_ms, coord_status_t *out);
int __wrap_coord_status(coord_t *c, int timeout_ms, coord_status_t *out) {
  struct timespec t0 = now();
  int rc = __real_coord_status(c, timeout_ms, out);
  if (wanted(rc)) {
    char res[400] = "";
    if (!rc && out)
      snprintf(res, sizeof(res), "endpoint=%s rev=%lld leader=%llx", out->endpoint, (long long)out->revision,
               (unsigned long long)out->leader);
    call_done(rc, t0, "Status", res, "%s", "");
  }
  return rc;
}

int __real_coord_kv_get(coord_t *c, const char *key, const coord_range_opts_t *opts, coord_kv_result_t **out);
int __wrap_coord_kv_get(coord_t *c, const char *key, const coord_range_opts_t *opts,
                        coord_kv_result_t **out) {
  struct timespec t0 = now();
  int rc = __real_coord_kv_get(c, key, opts, out);
  if (wanted(rc)) {
    char d[600], res[96] = "";
    if (!rc && out && *out)
      snprintf(res, sizeof(res), "%zu kvs (count %lld) rev=%lld", (*out)->n, (long long)(*out)->count,
               (long long)(*out)->revision);
    call_done(rc, t0, "Range", res, "%s", range_desc(d, sizeof(d), key, opts));
  }
  return rc;
}

int __real_coord_kv_put(coord_t *c, const char *key, const void *value, size_t len,
                        const coord_put_opts_t *opts, coord_kv_result_t **out);
int __wrap_coord_kv_put(coord_t *c, const char *key, const void *value, size_t len,
                        const coord_put_opts_t *opts, coord_kv_result_t **out) {
  struct timespec t0 = now();
  int rc = __real_coord_kv_put(c, key, value, len, opts, out);
  if (wanted(rc)) {
    char res[64] = "";
    if (!rc && out && *out)
      snprintf(res, sizeof(res), "rev=%lld", (long long)(*out)->revision);
    call_done(rc, t0, "Put", res, "%s len=%zu lease=%llx", key, len,
              (unsigned long long)(opts ? opts->lease : 0));
  }
  return rc;
}

int __real_coord_kv_delete(coord_t *c, const char *key, const coord_range_opts_t *opts,
                           coord_kv_result_t **out);
int __wrap_coord_kv_delete(coord_t *c, const char *key, const coord_range_opts_t *opts,
                           coord_kv_result_t **out) {
  struct timespec t0 = now();
  int rc = __real_coord_kv_delete(c, key, opts, out);
  if (wanted(rc)) {
    char d[600], res[64] = "";
    if (!rc && out && *out)
      snprintf(res, sizeof(res), "deleted %lld rev=%lld", (long long)(*out)->count,
               (long long)(*out)->revision);
    call_done(rc, t0, "DeleteRange", res, "%s", range_desc(d, sizeof(d), key, opts));
  }
  return rc;
}

int __real_coord_kv_txn(coord_t *c, const coord_txn_t *txn, coord_txn_result_t **out);
int __wrap_coord_kv_txn(coord_t *c, const coord_txn_t *txn, coord_txn_result_t **out) {
  struct timespec t0 = now();
  int rc = __real_coord_kv_txn(c, txn, out);
  if (wanted(rc)) {
    char res[64] = "";
    if (!rc && out && *out)
      snprintf(res, sizeof(res), "%s rev=%lld", (*out)->succeeded ? "succeeded" : "compare failed",
               (long long)(*out)->revision);
    const char *first = txn->ncmp ? txn->cmp[0].key : txn->nsuccess ? txn->success[0].key : "";
    call_done(rc, t0, "Txn", res, "%s cmp=%zu success=%zu failure=%zu", first ? first : "", txn->ncmp,
              txn->nsuccess, txn->nfailure);
  }
  return rc;
}

int __real_coord_lease_grant(coord_t *c, int64_t ttl_ms, int64_t *id);
int __wrap_coord_lease_grant(coord_t *c, int64_t ttl_ms, int64_t *id) {
  struct timespec t0 = now();
  int rc = __real_coord_lease_grant(c, ttl_ms, id);
  if (wanted(rc)) {
    char res[40] = "";
    if (!rc && id)
      snprintf(res, sizeof(res), "id=%llx", (unsigned long long)*id);
    call_done(rc, t0, "LeaseGrant", res, "ttl=%lldms", (long long)ttl_ms);
  }
  return rc;
}

int __real_coord_lease_revoke(coord_t *c, int64_t id);
int __wrap_coord_lease_revoke(coord_t *c, int64_t id) {
  struct timespec t0 = now();
  int rc = __real_coord_lease_revoke(c, id);
  call_done(rc, t0, "LeaseRevoke", NULL, "id=%llx", (unsigned long long)id);
  return rc;
}

int __real_coord_lease_ttl(coord_t *c, int64_t id, int64_t *remaining_ms, int64_t *granted_ms);
int __wrap_coord_lease_ttl(coord_t *c, int64_t id, int64_t *remaining_ms, int64_t *granted_ms) {
  struct timespec t0 = now();
  int rc = __real_coord_lease_ttl(c, id, remaining_ms, granted_ms);
  if (wanted(rc)) {
    char res[64] = "";
    if (!rc && remaining_ms)
      snprintf(res, sizeof(res), "remaining=%lldms", (long long)*remaining_ms);
    call_done(rc, t0, "LeaseTimeToLive", res, "id=%llx", (unsigned long long)id);
  }
  return rc;
}

int __real_coord_lease_keepalive(coord_t *c, int64_t id, coord_lease_lost_cb lost, void *arg);
int __wrap_coord_lease_keepalive(coord_t *c, int64_t id, coord_lease_lost_cb lost, void *arg) {
  struct timespec t0 = now();
  int rc = __real_coord_lease_keepalive(c, id, lost, arg);
  call_done(rc, t0, "LeaseKeepAlive", NULL, "id=%llx (on the client's stream)", (unsigned long long)id);
  return rc;
}

int __real_coord_watch_create(coord_t *c, const char *key, const coord_watch_opts_t *opts,
                              coord_watch_t **out);
int __wrap_coord_watch_create(coord_t *c, const char *key, const coord_watch_opts_t *opts,
                              coord_watch_t **out) {
  struct timespec t0 = now();
  int rc = __real_coord_watch_create(c, key, opts, out);
  call_done(rc, t0, "Watch", NULL, "%s%s start=%lld%s", key, opts && opts->prefix ? " (prefix)" : "",
            (long long)(opts ? opts->start_revision : 0), opts && opts->with_current ? " with-current" : "");
  return rc;
}

int __real_coord_watch_next(coord_watch_t *w, int timeout_ms, coord_event_t **ev);
int __wrap_coord_watch_next(coord_watch_t *w, int timeout_ms, coord_event_t **ev) {
  int rc = __real_coord_watch_next(w, timeout_ms, ev);
  if (rc == 0 && ev && *ev)
    cfs_debug("etcd watch event %s %s rev=%lld len=%zu", (*ev)->type == COORD_EVENT_PUT ? "PUT" : "DELETE",
              (*ev)->kv.key ? (*ev)->kv.key : "", (long long)(*ev)->revision, (*ev)->kv.value_len);
  else if (rc && rc != COORD_ETIMEDOUT && rc != COORD_ECLOSED)
    cfs_log(LOG_WARNING, "etcd watch ended: %s", coord_strerror(rc));
  return rc;
}

int __real_coord_lock_try_acquire(coord_t *c, const char *name, int64_t ttl_ms, coord_lock_t **out);
int __wrap_coord_lock_try_acquire(coord_t *c, const char *name, int64_t ttl_ms, coord_lock_t **out) {
  struct timespec t0 = now();
  int rc = __real_coord_lock_try_acquire(c, name, ttl_ms, out);
  if (wanted(rc)) {
    char res[40] = "";
    if (!rc && out && *out)
      snprintf(res, sizeof(res), "token=%lld", (long long)coord_lock_token(*out));
    call_done(rc, t0, "lock try", res, "%s ttl=%lldms", name, (long long)ttl_ms);
  }
  return rc;
}

int __real_coord_lock_acquire_async(coord_t *c, const char *name, int64_t ttl_ms, coord_lock_cb cb, void *arg,
                                    coord_lock_t **out);
int __wrap_coord_lock_acquire_async(coord_t *c, const char *name, int64_t ttl_ms, coord_lock_cb cb, void *arg,
                                    coord_lock_t **out) {
  struct timespec t0 = now();
  int rc = __real_coord_lock_acquire_async(c, name, ttl_ms, cb, arg, out);
  call_done(rc, t0, "lock acquire", "queued", "%s ttl=%lldms", name, (long long)ttl_ms);
  return rc;
}

void __real_coord_lock_cancel(coord_lock_t *lock);
void __wrap_coord_lock_cancel(coord_lock_t *lock) {
  struct timespec t0 = now();
  char key[512];
  snprintf(key, sizeof(key), "%s", lock && coord_lock_key(lock) ? coord_lock_key(lock) : "");
  __real_coord_lock_cancel(lock);
  call_done(0, t0, "lock cancel", NULL, "%s", key);
}

int __real_coord_lock_unlock(coord_lock_t *lock);
int __wrap_coord_lock_unlock(coord_lock_t *lock) {
  struct timespec t0 = now();
  char key[512];
  snprintf(key, sizeof(key), "%s", lock && coord_lock_key(lock) ? coord_lock_key(lock) : "");
  int rc = __real_coord_lock_unlock(lock);
  call_done(rc == COORD_ELOST ? 0 : rc, t0, "lock release", rc == COORD_ELOST ? "(had been lost)" : NULL,
            "%s", key);
  return rc;
}

int __real_coord_lock_set_note(coord_lock_t *lock, const void *note, size_t len);
int __wrap_coord_lock_set_note(coord_lock_t *lock, const void *note, size_t len) {
  struct timespec t0 = now();
  int rc = __real_coord_lock_set_note(lock, note, len);
  call_done(rc, t0, "lock note", NULL, "%s len=%zu", coord_lock_key(lock) ? coord_lock_key(lock) : "", len);
  return rc;
}
