#pragma once
// Allocator settings for Gatherer's executables (gatherer, gatherer-broker,
// gatherer-worker), never applied by the libraries: a program that links
// them keeps its own allocator policy.

namespace gatherer {

// Response bodies of hundreds of KB up to megabytes are allocated and freed
// at every hop. glibc's defaults serve such a block from a fresh mmap, or
// give the top of the heap back right after it is freed, so each body pays
// its page faults again (a third of the CPU of a run of 1 MiB bodies was
// the kernel's). This keeps blocks under 32 MiB on the heap and up to 32 MiB
// of freed memory per arena for the next ones. Measured on 2,000 bodies of
// 1 MiB embedded: 0.76x the CPU (kernel time 1.23 s to 0.50 s), peak RSS
// lower in most runs (median 103 MB against 120) but up to 170 MB in one of 8.
// Call first in main, before any thread starts. A no-op without glibc, and
// where the executable is linked with tcmalloc_minimal (GATHERER_TCMALLOC,
// the default), whose mallopt does nothing: it serves builds without it.
void TuneAllocatorForBodies();

}  // namespace gatherer
