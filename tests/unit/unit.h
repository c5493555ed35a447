/*
 * unit.h — a tiny C unit-test framework, header only, no dependencies.
 *
 *   #include "coord.h"      (first, if CHECK_OK should name COORD_E* codes)
 *   #include "unit.h"
 *
 *   TEST(prefix_end_simple) {
 *     size_t n;
 *     char *e = coord__prefix_end("ab", 2, &n);
 *     REQUIRE(e != NULL);           stops this test if false
 *     CHECK_EQ(n, 2);               integers (printed as signed and hex)
 *     CHECK_MEMEQ(e, "ac", 2);
 *     CHECK_STREQ(coord_strerror(0), "success");
 *     free(e);
 *   }
 *
 * Each test_*.c file is one program: unit.h supplies main(), which runs every
 * TEST in the order written (or only those named on the command line) and
 * prints
 *     ok NAME
 *     FAIL NAME: file.c:12: CHECK_EQ(n, 2): 3 != 2
 * (one FAIL line per failed test: its first failure; later failures of the
 * same test follow it as "  # file:line: ..." lines), and last
 *     unit: P passed, F failed
 * which scripts/run-unit adds up.  Exit status 0 if nothing failed, else 1.
 *
 * CHECK_* record a failure and go on; REQUIRE* record it and return from the
 * test at once.  UNIT_SKIP("why") ends a test as passed with a note.
 * Define UNIT_NO_MAIN before including to write your own main (call
 * unit_run(argc, argv)).
 */
#ifndef COORD_UNIT_H
#define COORD_UNIT_H

#include <inttypes.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef void (*unit_fn)(void);

struct unit_test {
  const char *name;
  unit_fn fn;
  struct unit_test *next;
};

struct unit_state {
  struct unit_test *head, *tail;
  const char *current;
  int failed; /* checks failed in the current test */
  int stop;   /* REQUIRE failed: return from the test */
  char first[1024];
  char more[4096]; /* later failures of the current test, printed after FAIL */
};

static struct unit_state unit__s;

static inline void unit__register(struct unit_test *t) {
  if (unit__s.tail)
    unit__s.tail->next = t;
  else
    unit__s.head = t;
  unit__s.tail = t;
}

#define UNIT__CAT2(a, b) a##b
#define UNIT__CAT(a, b) UNIT__CAT2(a, b)

/* Defines a test; registered before main() runs, run in file order. */
#define TEST(name)                                                                                           \
  static void unit_test_##name(void);                                                                        \
  static struct unit_test unit_reg_##name = {#name, unit_test_##name, NULL};                                 \
  __attribute__((constructor)) static void unit_ctor_##name(void) {                                          \
    unit__register(&unit_reg_##name);                                                                        \
  }                                                                                                          \
  static void unit_test_##name(void)

__attribute__((format(printf, 3, 4))) static inline void unit__fail(const char *file, int line,
                                                                    const char *fmt, ...) {
  char msg[900];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  if (unit__s.failed++ == 0)
    snprintf(unit__s.first, sizeof unit__s.first, "%s:%d: %s", file, line, msg);
  else {
    size_t used = strlen(unit__s.more);
    if (used + 1 < sizeof unit__s.more)
      snprintf(unit__s.more + used, sizeof unit__s.more - used, "  # %s:%d: %s\n", file, line, msg);
  }
}

/* Prints a byte string for messages: printable ASCII as is, others \xNN. */
static inline const char *unit__show(const void *p, size_t n, char *buf, size_t cap) {
  const unsigned char *s = (const unsigned char *)p;
  size_t o = 0, i = 0;
  if (!p) {
    snprintf(buf, cap, "(null)");
    return buf;
  }
  buf[o++] = '"';
  for (; i < n && o + 10 < cap; i++) {
    if (s[i] >= 0x20 && s[i] < 0x7f && s[i] != '"' && s[i] != '\\')
      buf[o++] = (char)s[i];
    else
      o += (size_t)snprintf(buf + o, cap - o, "\\x%02x", s[i]);
  }
  buf[o++] = '"';
  if (i < n) {
    memcpy(buf + o, "...", 3);
    o += 3;
  }
  buf[o] = '\0';
  return buf;
}

#define CHECK(cond)                                                                                          \
  do {                                                                                                       \
    if (!(cond))                                                                                             \
      unit__fail(__FILE__, __LINE__, "CHECK(%s) failed", #cond);                                             \
  } while (0)

#define CHECK_MSG(cond, ...)                                                                                 \
  do {                                                                                                       \
    if (!(cond)) {                                                                                           \
      char unit__m[700];                                                                                     \
      snprintf(unit__m, sizeof unit__m, __VA_ARGS__);                                                        \
      unit__fail(__FILE__, __LINE__, "CHECK(%s) failed: %s", #cond, unit__m);                                \
    }                                                                                                        \
  } while (0)

/* Integer comparisons: both sides are evaluated once, as intmax_t. */
#define UNIT__CMP(a, op, b, what)                                                                            \
  do {                                                                                                       \
    intmax_t unit__a = (intmax_t)(a), unit__b = (intmax_t)(b);                                               \
    if (!(unit__a op unit__b))                                                                               \
      unit__fail(__FILE__, __LINE__, what "(%s, %s): %jd (0x%jx) vs %jd (0x%jx)", #a, #b, unit__a,           \
                 (uintmax_t)unit__a, unit__b, (uintmax_t)unit__b);                                           \
  } while (0)

#define CHECK_EQ(a, b) UNIT__CMP(a, ==, b, "CHECK_EQ")
#define CHECK_NE(a, b) UNIT__CMP(a, !=, b, "CHECK_NE")
#define CHECK_LT(a, b) UNIT__CMP(a, <, b, "CHECK_LT")
#define CHECK_LE(a, b) UNIT__CMP(a, <=, b, "CHECK_LE")
#define CHECK_GT(a, b) UNIT__CMP(a, >, b, "CHECK_GT")
#define CHECK_GE(a, b) UNIT__CMP(a, >=, b, "CHECK_GE")

#define CHECK_DBL_NEAR(a, b, eps)                                                                            \
  do {                                                                                                       \
    double unit__a = (double)(a), unit__b = (double)(b);                                                     \
    if (!(unit__a - unit__b <= (eps) && unit__b - unit__a <= (eps)))                                         \
      unit__fail(__FILE__, __LINE__, "CHECK_DBL_NEAR(%s, %s): %g vs %g", #a, #b, unit__a, unit__b);          \
  } while (0)

#define CHECK_NULL(p)                                                                                        \
  do {                                                                                                       \
    if ((p) != NULL)                                                                                         \
      unit__fail(__FILE__, __LINE__, "CHECK_NULL(%s): not NULL", #p);                                        \
  } while (0)

#define CHECK_NOTNULL(p)                                                                                     \
  do {                                                                                                       \
    if ((p) == NULL)                                                                                         \
      unit__fail(__FILE__, __LINE__, "CHECK_NOTNULL(%s): NULL", #p);                                         \
  } while (0)

/* Strings: NULL is allowed on either side (equal only to NULL). */
#define CHECK_STREQ(a, b)                                                                                    \
  do {                                                                                                       \
    const char *unit__a = (a), *unit__b = (b);                                                               \
    if (!((unit__a == NULL && unit__b == NULL) ||                                                            \
          (unit__a != NULL && unit__b != NULL && strcmp(unit__a, unit__b) == 0))) {                          \
      char unit__x[200], unit__y[200];                                                                       \
      unit__fail(__FILE__, __LINE__, "CHECK_STREQ(%s, %s): %s vs %s", #a, #b,                                \
                 unit__show(unit__a, unit__a ? strlen(unit__a) : 0, unit__x, sizeof unit__x),                \
                 unit__show(unit__b, unit__b ? strlen(unit__b) : 0, unit__y, sizeof unit__y));               \
    }                                                                                                        \
  } while (0)

#define CHECK_STRNE(a, b)                                                                                    \
  do {                                                                                                       \
    const char *unit__a = (a), *unit__b = (b);                                                               \
    if ((unit__a == NULL && unit__b == NULL) ||                                                              \
        (unit__a != NULL && unit__b != NULL && strcmp(unit__a, unit__b) == 0))                               \
      unit__fail(__FILE__, __LINE__, "CHECK_STRNE(%s, %s): both %s", #a, #b, unit__a ? unit__a : "NULL");    \
  } while (0)

/* n bytes at a and at b are equal. */
#define CHECK_MEMEQ(a, b, n)                                                                                 \
  do {                                                                                                       \
    const void *unit__a = (a), *unit__b = (b);                                                               \
    size_t unit__n = (size_t)(n);                                                                            \
    if (unit__a == NULL || unit__b == NULL || memcmp(unit__a, unit__b, unit__n) != 0) {                      \
      char unit__x[200], unit__y[200];                                                                       \
      unit__fail(__FILE__, __LINE__, "CHECK_MEMEQ(%s, %s, %zu): %s vs %s", #a, #b, unit__n,                  \
                 unit__show(unit__a, unit__n, unit__x, sizeof unit__x),                                      \
                 unit__show(unit__b, unit__n, unit__y, sizeof unit__y));                                     \
    }                                                                                                        \
  } while (0)

/* A call that returns 0 on success and a negative code otherwise.  With
 * coord.h included first, the code is named with coord_strerror and the
 * thread's coord_last_error detail. */
#ifdef COORD_H
#define UNIT__DESCRIBE(rc, buf)                                                                              \
  snprintf(buf, sizeof buf, "%d (%s: %s)", (int)(rc), coord_strerror((int)(rc)), coord_last_error())
#else
#define UNIT__DESCRIBE(rc, buf) snprintf(buf, sizeof buf, "%d", (int)(rc))
#endif

#define CHECK_OK(expr)                                                                                       \
  do {                                                                                                       \
    long unit__rc = (long)(expr);                                                                            \
    if (unit__rc != 0) {                                                                                     \
      char unit__d[600];                                                                                     \
      UNIT__DESCRIBE(unit__rc, unit__d);                                                                     \
      unit__fail(__FILE__, __LINE__, "CHECK_OK(%s): %s", #expr, unit__d);                                    \
    }                                                                                                        \
  } while (0)

/* expr returns exactly code (e.g. COORD_EINVAL). */
#define CHECK_RC(expr, code)                                                                                 \
  do {                                                                                                       \
    long unit__rc = (long)(expr), unit__want = (long)(code);                                                 \
    if (unit__rc != unit__want) {                                                                            \
      char unit__d[600];                                                                                     \
      UNIT__DESCRIBE(unit__rc, unit__d);                                                                     \
      unit__fail(__FILE__, __LINE__, "CHECK_RC(%s, %s): got %s, want %ld", #expr, #code, unit__d,            \
                 unit__want);                                                                                \
    }                                                                                                        \
  } while (0)

/* REQUIRE*: as CHECK*, but a failure ends the test at once. */
#define UNIT__REQUIRE(check)                                                                                 \
  do {                                                                                                       \
    int unit__before = unit__s.failed;                                                                       \
    check;                                                                                                   \
    if (unit__s.failed != unit__before) {                                                                    \
      unit__s.stop = 1;                                                                                      \
      return;                                                                                                \
    }                                                                                                        \
  } while (0)
#define REQUIRE(cond) UNIT__REQUIRE(CHECK(cond))
#define REQUIRE_EQ(a, b) UNIT__REQUIRE(CHECK_EQ(a, b))
#define REQUIRE_NOTNULL(p) UNIT__REQUIRE(CHECK_NOTNULL(p))
#define REQUIRE_OK(expr) UNIT__REQUIRE(CHECK_OK(expr))
#define REQUIRE_STREQ(a, b) UNIT__REQUIRE(CHECK_STREQ(a, b))

/* Ends the current test as passed, with a note. */
#define UNIT_SKIP(why)                                                                                       \
  do {                                                                                                       \
    printf("  # %s: skipped: %s\n", unit__s.current, (why));                                                 \
    return;                                                                                                  \
  } while (0)

static inline int unit__selected(const char *name, int argc, char **argv) {
  if (argc <= 1)
    return 1;
  for (int i = 1; i < argc; i++)
    if (strcmp(argv[i], name) == 0)
      return 1;
  return 0;
}

/* Runs the registered tests; returns the exit status. */
static inline int unit_run(int argc, char **argv) {
  int pass = 0, fail = 0;
  setvbuf(stdout, NULL, _IOLBF, 0);
  for (struct unit_test *t = unit__s.head; t; t = t->next) {
    if (!unit__selected(t->name, argc, argv))
      continue;
    unit__s.current = t->name;
    unit__s.failed = 0;
    unit__s.stop = 0;
    unit__s.first[0] = '\0';
    unit__s.more[0] = '\0';
    t->fn();
    if (unit__s.failed) {
      printf("FAIL %s: %s\n%s", t->name, unit__s.first, unit__s.more);
      fail++;
    } else {
      printf("ok %s\n", t->name);
      pass++;
    }
    fflush(stdout);
  }
  unit__s.current = NULL;
  printf("unit: %d passed, %d failed\n", pass, fail);
  fflush(stdout);
  return fail ? 1 : 0;
}

#ifndef UNIT_NO_MAIN
int main(int argc, char **argv) {
  return unit_run(argc, argv);
}
#endif

#endif
