/*
 * opts.c — the pure parsers of coordfs's outside input that are not keys:
 * durations given on the command line (--lock-ttl, --service-ttl,
 * --timeout) and lock names (the file names under /locks).  No state, no
 * FUSE or etcd calls, so that tests/fuzz/fuzz_coordfs_opts.c can include
 * this file and throw anything at it.
 */
#include "coordfs.h"

#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* "1.5", "1.5s" (seconds) or "250ms" -> milliseconds, rounded down;
 * -1 for anything else: empty, negative, NaN, infinite, trailing garbage,
 * or more than INT_MAX ms (about 24 days). */
int cfs_parse_ms(const char *s) {
  if (!s || !*s)
    return -1;
  char *end;
  double v = strtod(s, &end);
  if (end == s || !isfinite(v) || v < 0)
    return -1;
  double ms;
  if (!*end || !strcmp(end, "s"))
    ms = v * 1000.0;
  else if (!strcmp(end, "ms"))
    ms = v;
  else
    return -1;
  if (!(ms <= (double)INT_MAX))
    return -1;
  return (int)ms;
}

/* A lock name is one file name: 1..255 bytes, no '/', not "." or "..". */
int cfs_lock_name_ok(const char *name) {
  size_t n = strlen(name);
  return n > 0 && n <= 255 && !strchr(name, '/') && strcmp(name, ".") && strcmp(name, "..");
}
