/*
 * checks.h — the check macros of the C test programs that print one line
 * per check ("ok <what>" or "FAIL <what> [line, condition] last error")
 * and exit 1 when any failed (lock_checks.c, lock_deadline.c; pytest reads
 * their output).  The including file defines nothing of its own for this:
 * failures is counted here, static to each program.
 */
#ifndef COORD_TESTS_CHECKS_H
#define COORD_TESTS_CHECKS_H

#include <stdio.h>

#include "coord.h"

static int failures;

#define CHECK(cond, ...)                                                                                     \
  do {                                                                                                       \
    if (cond) {                                                                                              \
      printf("ok   " __VA_ARGS__);                                                                           \
      printf("\n");                                                                                          \
    } else {                                                                                                 \
      failures++;                                                                                            \
      printf("FAIL " __VA_ARGS__);                                                                           \
      printf("  [line %d: %s] last error: %s\n", __LINE__, #cond, coord_last_error());                       \
    }                                                                                                        \
    fflush(stdout);                                                                                          \
  } while (0)

/* Evaluates a and b once each. */
#define EQ(a, b, what)                                                                                       \
  do {                                                                                                       \
    long long eq_a_ = (long long)(a), eq_b_ = (long long)(b);                                                \
    CHECK(eq_a_ == eq_b_, "%s (got %lld, want %lld)", what, eq_a_, eq_b_);                                   \
  } while (0)

#endif
