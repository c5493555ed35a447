/*
 * log.h — coordfs's log: standard error in the foreground (-f, -d), syslog
 * (facility daemon, ident "coordfs") once daemonized; levels are syslog's.
 *
 * The level is LOG_INFO, LOG_DEBUG with -d; $COORDFS_LOG_LEVEL (err,
 * warning, notice, info, debug, or 3..7) overrides it.  At LOG_DEBUG:
 *   - every FUSE request (libfuse's own trace, which -d turns on; libfuse's
 *     messages are routed here by fuse_set_log_func);
 *   - every etcd call coordfs makes through libcoord (key, result, time),
 *     and every watch event received: coordfs is linked with
 *     -Wl,--wrap=<call> for the calls listed in the Makefile's FS_WRAP, and
 *     log.c's __wrap_<call> logs around __real_<call>.  Failed calls are
 *     logged at LOG_WARNING (expected outcomes such as "not found" or "lock
 *     held" at LOG_DEBUG).
 */
#ifndef COORDFS_LOG_H
#define COORDFS_LOG_H

#include <syslog.h>

extern int cfs_log_level;

/* Before anything is logged: level from -d and $COORDFS_LOG_LEVEL; output to
 * stderr with -f/-d, else to syslog from now on; libfuse's messages routed
 * here. */
void cfs_log_init(int foreground, int debug);
/* Once mounted: the start-up line, at LOG_NOTICE. */
void cfs_log_started(const char *mountpoint, const char *endpoints);
void cfs_log(int level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#define cfs_debug(...)                                                                                       \
  do {                                                                                                       \
    if (cfs_log_level >= LOG_DEBUG)                                                                          \
      cfs_log(LOG_DEBUG, __VA_ARGS__);                                                                       \
  } while (0)

#endif
