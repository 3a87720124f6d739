#include "gatherer/allocator.h"

#include <cstdlib>  // defines __GLIBC__ where it applies

#if defined(__GLIBC__)
#include <malloc.h>
#endif

namespace gatherer {

void TuneAllocatorForBodies() {
#if defined(__GLIBC__)
  // Fixed values also turn off glibc's sliding mmap threshold, which would
  // otherwise move the trim threshold with it.
  constexpr int kThreshold = 32 << 20;
  mallopt(M_MMAP_THRESHOLD, kThreshold);
  mallopt(M_TRIM_THRESHOLD, kThreshold);
#endif
}

}  // namespace gatherer
