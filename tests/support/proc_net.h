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

// The pid in `candidates` holding a socket whose local port is `port`, or 0.
inline int PidOwningTcpPort(std::uint16_t port, const std::vector<int>& candidates) {
  std::ifstream tcp("/proc/net/tcp");
  std::string line;
  std::getline(tcp, line);  // header
  std::string inode;
  while (std::getline(tcp, line)) {
    // "  sl  local_address rem_address   st tx:rx tr:when retrnsmt   uid  timeout inode"
    std::istringstream in(line);
    std::string sl, local, remote, st, queues, timer, retr, uid, timeout, node;
    if (!(in >> sl >> local >> remote >> st >> queues >> timer >> retr >> uid >> timeout >> node)) continue;
    const auto colon = local.find(':');
    if (colon == std::string::npos) continue;
    if (std::stoul(local.substr(colon + 1), nullptr, 16) == port) {
      inode = node;
      break;
    }
  }
  if (inode.empty() || inode == "0") return 0;
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

}  // namespace gatherer::testing
