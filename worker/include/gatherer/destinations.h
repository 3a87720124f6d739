#pragma once
// Which destinations a worker refuses to fetch from, whatever a statement
// asks: private, loopback and link-local addresses (checked after DNS, on
// every connection, redirects included — against request forgery towards a
// cloud metadata service such as 169.254.169.254 or the worker's own
// network), and hosts outside an allow-list (checked on every request,
// redirects included). A refused statement fails with permission_denied,
// never retried (docs/errors.md).
//
// Pure values and functions; safe from any thread.

#include <string>
#include <string_view>
#include <vector>

#include "gatherer/status.h"

struct sockaddr;

namespace gatherer {

struct DestinationPolicy {
  bool refuse_loopback = false;    // 127.0.0.0/8, ::1, 0.0.0.0/8, ::
  bool refuse_private = false;     // 10/8, 172.16/12, 192.168/16, 100.64/10, fc00::/7
  bool refuse_link_local = false;  // 169.254/16 (cloud metadata), fe80::/10
  // Hosts allowed (case-insensitive); "*.example.com" allows every
  // subdomain of example.com. Empty = every host.
  std::vector<std::string> allowed_hosts;

  bool refuses_addresses() const { return refuse_loopback || refuse_private || refuse_link_local; }
  bool any() const { return refuses_addresses() || !allowed_hosts.empty(); }
};

// Sets the address classes of `list`: comma-separated "loopback", "private",
// "link-local", or "all" (the three). The error names the bad word.
Status ParseRefusedDestinations(std::string_view list, DestinationPolicy& policy);

// Why `address` (IPv4 or IPv6; IPv4-mapped IPv6 is read as IPv4) is refused,
// e.g. "169.254.169.254 is link-local"; empty when it is not.
std::string RefusedAddress(const sockaddr* address, const DestinationPolicy& policy);

// True when `host` (as in a URL, IPv6 brackets included) is allowed.
bool HostAllowed(std::string_view host, const DestinationPolicy& policy);

}  // namespace gatherer
