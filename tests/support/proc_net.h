#pragma once
// ForEachTcpSocket: the IPv4 TCP sockets of this host as /proc/net/tcp
// lists them (local port, state, inode), for tests that check which
// connections a process holds.

#include <cstdint>
#include <fstream>
#include <sstream>
#include <string>

namespace gatherer::testing {

// Calls f(local_port, state, inode) for each IPv4 TCP socket in one read of
// /proc/net/tcp until f returns false. `state` is the kernel's hex code
// ("0A" LISTEN, "01" ESTABLISHED); inode "0" is a socket no process holds
// any more (TIME_WAIT).
template <typename F>
void ForEachTcpSocket(F&& f) {
  std::ifstream tcp("/proc/net/tcp");
  std::string line;
  std::getline(tcp, line);  // header
  while (std::getline(tcp, line)) {
    // "  sl  local_address rem_address   st tx:rx tr:when retrnsmt   uid  timeout inode"
    std::istringstream in(line);
    std::string sl, local, remote, st, queues, timer, retr, uid, timeout, inode;
    if (!(in >> sl >> local >> remote >> st >> queues >> timer >> retr >> uid >> timeout >> inode)) continue;
    const auto colon = local.find(':');
    if (colon == std::string::npos) continue;
    if (!f(static_cast<std::uint16_t>(std::stoul(local.substr(colon + 1), nullptr, 16)), st, inode)) return;
  }
}

}  // namespace gatherer::testing
