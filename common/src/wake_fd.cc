#include "gatherer/wake_fd.h"

#include <sys/eventfd.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <system_error>

namespace gatherer {

WakeFd::WakeFd() : fd_(eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)) {
  if (fd_ < 0) throw std::system_error(errno, std::generic_category(), "eventfd");
}

WakeFd::~WakeFd() { close(fd_); }

void WakeFd::signal() {
  const std::uint64_t one = 1;
  // EAGAIN only when the counter is saturated: a wake-up is pending anyway.
  (void)!write(fd_, &one, sizeof(one));
}

void WakeFd::drain() {
  std::uint64_t count = 0;
  // EAGAIN: nothing to consume.
  (void)!read(fd_, &count, sizeof(count));
}

}  // namespace gatherer
