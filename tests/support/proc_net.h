#pragma once
// PidOwningTcpPort: which of some processes owns the IPv4 TCP socket bound
// to a local port, read from /proc. Lets a test HTTP server tell which worker
// process sent a request (HttpRequest::peer_port).

#include <dirent.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

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

// The inode of the IPv4 TCP socket bound to local `port`, or "" when one
// read of /proc/net/tcp does not show it.
inline std::string TcpSocketInode(std::uint16_t port) {
  std::string found;
  ForEachTcpSocket([&](std::uint16_t local, const std::string&, const std::string& inode) {
    // Inode 0: its port a new connection may already reuse; keep looking.
    if (inode == "0" || local != port) return true;
    found = inode;
    return false;
  });
  return found;
}

// The pid in `candidates` whose open files include socket `inode`, or 0.
inline int PidHoldingSocket(const std::string& inode, const std::vector<int>& candidates) {
  const std::string target = "socket:[" + inode + "]";
  for (int pid : candidates) {
    const std::string dir = "/proc/" + std::to_string(pid) + "/fd";
    DIR* d = opendir(dir.c_str());
    if (!d) continue;
    bool found = false;
    while (dirent* e = readdir(d)) {
      char buf[64] = {};
      const std::string link = dir + "/" + e->d_name;
      const ssize_t n = readlink(link.c_str(), buf, sizeof buf - 1);
      if (n > 0 && target == std::string(buf, static_cast<std::size_t>(n))) {
        found = true;
        break;
      }
    }
    closedir(d);
    if (found) return pid;
  }
  return 0;
}

// The pid in `candidates` holding a socket whose local port is `port`, or 0.
inline int PidOwningTcpPort(std::uint16_t port, const std::vector<int>& candidates) {
  // /proc/net/tcp is read in pieces, not as a snapshot: with connections
  // opening and closing meanwhile a read can skip a line, so the look-up is
  // tried again (a few times at most) before giving up.
  for (int attempt = 0; attempt < 5; ++attempt) {
    const std::string inode = TcpSocketInode(port);
    if (inode.empty()) continue;
    if (const int pid = PidHoldingSocket(inode, candidates); pid > 0) return pid;
  }
  return 0;
}

}  // namespace gatherer::testing
