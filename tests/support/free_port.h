#pragma once
// A loopback TCP port that was free a moment ago, for tests and benchmarks
// that must name an endpoint before the process that binds it starts (a
// broker restarted on the same endpoint, a worker started before its
// broker). The kernel may hand the port to someone else in between; on a
// test machine that is rare enough.

#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdint>
#include <string>

namespace gatherer::testing {

inline std::uint16_t FreeTcpPort() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  socklen_t len = sizeof(addr);
  getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  close(fd);
  return ntohs(addr.sin_port);
}

// "tcp://127.0.0.1:<free port>"
inline std::string FreeTcpEndpoint() { return "tcp://127.0.0.1:" + std::to_string(FreeTcpPort()); }

}  // namespace gatherer::testing
