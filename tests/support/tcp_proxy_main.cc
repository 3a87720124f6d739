// gatherer-test-proxy: a plain TCP forwarder for link-fault tests, the kind
// of box (a NAT, a load balancer, an SSH tunnel) that sits between a
// Gatherer client or worker and its broker. Listens on 127.0.0.1:LISTEN,
// connects each accepted connection to 127.0.0.1:TARGET and copies bytes
// both ways; prints "ready" on stdout once listening. A test SIGKILLs it to
// reset every connection through it at once, and starts it again on the
// same port.
//
//   gatherer-test-proxy LISTEN_PORT TARGET_PORT
//
// One thread per direction per connection: tests open a handful.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <thread>

namespace {

sockaddr_in Loopback(int port) {
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<std::uint16_t>(port));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  return a;
}

// Copies until either side closes, then shuts both down so the other
// direction ends too.
void Copy(int from, int to) {
  char buf[64 * 1024];
  for (;;) {
    const ssize_t n = ::read(from, buf, sizeof(buf));
    if (n <= 0) break;
    ssize_t off = 0;
    while (off < n) {
      const ssize_t w = ::write(to, buf + off, static_cast<std::size_t>(n - off));
      if (w <= 0) {
        off = -1;
        break;
      }
      off += w;
    }
    if (off < 0) break;
  }
  ::shutdown(from, SHUT_RDWR);
  ::shutdown(to, SHUT_RDWR);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: gatherer-test-proxy LISTEN_PORT TARGET_PORT\n");
    return 2;
  }
  const int listen_port = std::atoi(argv[1]);
  const int target_port = std::atoi(argv[2]);
  const int lfd = ::socket(AF_INET, SOCK_STREAM, 0);
  const int one = 1;
  ::setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  sockaddr_in addr = Loopback(listen_port);
  if (::bind(lfd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 || ::listen(lfd, 64) != 0) {
    std::perror("gatherer-test-proxy: listen");
    return 1;
  }
  std::printf("ready\n");
  std::fflush(stdout);
  for (;;) {
    const int client = ::accept(lfd, nullptr, nullptr);
    if (client < 0) continue;
    const int server = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in target = Loopback(target_port);
    if (::connect(server, reinterpret_cast<sockaddr*>(&target), sizeof(target)) != 0) {
      ::close(client);
      ::close(server);
      continue;
    }
    ::setsockopt(client, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    ::setsockopt(server, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    // The second direction to end closes both descriptors.
    auto ended = std::make_shared<std::atomic<int>>(0);
    auto pump = [client, server, ended](int from, int to) {
      Copy(from, to);
      if (ended->fetch_add(1) == 1) {
        ::close(client);
        ::close(server);
      }
    };
    std::thread(pump, client, server).detach();
    std::thread(pump, server, client).detach();
  }
}
