#include "gatherer/destinations.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <array>
#include <cstring>

#include "gatherer/strings.h"

namespace gatherer {
namespace {

std::string Ipv4Text(const std::uint8_t* b) {
  char text[INET_ADDRSTRLEN] = {};
  ::inet_ntop(AF_INET, b, text, sizeof text);
  return text;
}

std::string ClassOf4(const std::uint8_t* b, const DestinationPolicy& p) {
  if (p.refuse_loopback && (b[0] == 127 || b[0] == 0)) return "loopback";
  if (p.refuse_link_local && b[0] == 169 && b[1] == 254) return "link-local";
  if (p.refuse_private && (b[0] == 10 || (b[0] == 172 && (b[1] & 0xF0) == 16) || (b[0] == 192 && b[1] == 168) ||
                           (b[0] == 100 && (b[1] & 0xC0) == 64))) {
    return "private";
  }
  return {};
}

}  // namespace

Status ParseRefusedDestinations(std::string_view list, DestinationPolicy& policy) {
  while (!list.empty()) {
    const auto comma = list.find(',');
    const std::string_view word = Trim(list.substr(0, comma));
    list = comma == std::string_view::npos ? std::string_view() : list.substr(comma + 1);
    if (word == "loopback") {
      policy.refuse_loopback = true;
    } else if (word == "private") {
      policy.refuse_private = true;
    } else if (word == "link-local") {
      policy.refuse_link_local = true;
    } else if (word == "all") {
      policy.refuse_loopback = policy.refuse_private = policy.refuse_link_local = true;
    } else if (!word.empty()) {
      return InvalidArgument("unknown destination class '" + std::string(word) +
                             "' (loopback, private, link-local or all)");
    }
  }
  return Status::Ok();
}

std::string RefusedAddress(const sockaddr* address, const DestinationPolicy& policy) {
  if (address == nullptr || !policy.refuses_addresses()) return {};
  if (address->sa_family == AF_INET) {
    const auto* in = reinterpret_cast<const sockaddr_in*>(address);
    const auto* b = reinterpret_cast<const std::uint8_t*>(&in->sin_addr);
    const std::string cls = ClassOf4(b, policy);
    return cls.empty() ? cls : Ipv4Text(b) + " is " + cls;
  }
  if (address->sa_family != AF_INET6) return {};
  const auto* in6 = reinterpret_cast<const sockaddr_in6*>(address);
  const auto* b = reinterpret_cast<const std::uint8_t*>(&in6->sin6_addr);
  static constexpr std::array<std::uint8_t, 12> kMapped = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF};
  if (std::memcmp(b, kMapped.data(), kMapped.size()) == 0) {
    const std::string cls = ClassOf4(b + 12, policy);
    return cls.empty() ? cls : Ipv4Text(b + 12) + " is " + cls;
  }
  char text[INET6_ADDRSTRLEN] = {};
  ::inet_ntop(AF_INET6, b, text, sizeof text);
  bool zero_to_14 = true;
  for (int i = 0; i < 15; ++i) zero_to_14 = zero_to_14 && b[i] == 0;
  std::string cls;
  if (policy.refuse_loopback && zero_to_14 && (b[15] == 1 || b[15] == 0)) {
    cls = "loopback";
  } else if (policy.refuse_link_local && b[0] == 0xFE && (b[1] & 0xC0) == 0x80) {
    cls = "link-local";
  } else if (policy.refuse_private && (b[0] & 0xFE) == 0xFC) {
    cls = "private";
  }
  return cls.empty() ? cls : std::string(text) + " is " + cls;
}

bool HostAllowed(std::string_view host, const DestinationPolicy& policy) {
  if (policy.allowed_hosts.empty()) return true;
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') host = host.substr(1, host.size() - 2);
  while (!host.empty() && host.back() == '.') host.remove_suffix(1);  // "example.com." is example.com
  for (std::string_view allowed : policy.allowed_hosts) {
    if (allowed.starts_with("*.")) {
      const std::string_view suffix = allowed.substr(1);  // ".example.com"
      if (host.size() > suffix.size() && EqualsIgnoreCase(host.substr(host.size() - suffix.size()), suffix)) {
        return true;
      }
    } else if (EqualsIgnoreCase(host, allowed)) {
      return true;
    }
  }
  return false;
}

}  // namespace gatherer
