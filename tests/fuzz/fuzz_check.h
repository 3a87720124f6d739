#pragma once
// FUZZ_CHECK(cond): the fuzz targets' assertion. It aborts, which libFuzzer
// reports as a crash with the input that caused it; it is on in every build
// (assert() is not under -DNDEBUG).

#include <cstdio>
#include <cstdlib>

#define FUZZ_CHECK(cond)                                                          \
  do {                                                                            \
    if (!(cond)) {                                                                \
      std::fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond); \
      std::abort();                                                               \
    }                                                                             \
  } while (0)
