/*
 * fuzz_coordfs_opts.c — libFuzzer target for coordfs's pure option and
 * name parsers (coordfs/opts.c, compiled in): durations from the command
 * line and lock names from paths under /locks.
 *
 * Properties: cfs_parse_ms returns -1 or a value in 0..INT_MAX, and
 * agrees with a re-parse of its own output in ms ("<n>ms" -> n);
 * cfs_lock_name_ok accepts exactly 1..255 bytes without '/', other than
 * "." and "..".
 */
#include "../../coordfs/opts.c"

#include <assert.h>
#include <stdint.h>
#include <stdio.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  char *s = malloc(size + 1);
  if (!s)
    return 0;
  memcpy(s, data, size);
  s[size] = '\0';
  int ms = cfs_parse_ms(s);
  assert(ms >= -1);
  if (ms >= 0) {
    char back[32];
    snprintf(back, sizeof back, "%dms", ms);
    assert(cfs_parse_ms(back) == ms);
  }
  size_t n = strlen(s);
  int ok = cfs_lock_name_ok(s);
  int want = n > 0 && n <= 255 && !memchr(s, '/', n) && strcmp(s, ".") && strcmp(s, "..");
  assert(ok == want);
  free(s);
  return 0;
}
