#pragma once
// Names the calling thread as `top -H`, `ps -L`, perf and gdb show it, so
// that an operator can tell Gatherer's threads apart: gatherer-io (a
// worker's I/O loop), gatherer-driver (the embedded cluster's stand-in),
// gatherer-output (the CLI's writer).

#include <pthread.h>

#include <string>
#include <string_view>

namespace gatherer {

// Linux keeps 15 bytes of a name; a longer one is cut there.
inline void NameThisThread(std::string_view name) {
  const std::string cut(name.substr(0, 15));
  pthread_setname_np(pthread_self(), cut.c_str());
}

}  // namespace gatherer
