#pragma once
// Session settings: everything that shapes how a session's statements are
// fetched. They travel once per session (client -> broker -> each worker),
// never per statement (docs/architecture.md §3).
//
// Plain value; not synchronised.

#include <cstdint>
#include <string>
#include <vector>

#include "gatherer/rate_limit.h"
#include "gatherer/statement.h"

namespace gatherer {

struct SessionSettings {
  // Maximum statements of this session in flight across the whole cluster
  // (the sliding window). Pyot default 25. Range 1..100000.
  std::uint32_t workers = 25;
  // Joined with statements whose url is a path ("/a/b"); empty = none.
  std::string base_url;
  // Headers sent with every statement (a statement's own header of the same
  // name replaces the default).
  Headers headers;
  // Total time for one attempt, in ms (CURLOPT_TIMEOUT_MS). 0 = no limit.
  std::uint32_t timeout_ms = 30'000;
  // Time to establish a connection, in ms (CURLOPT_CONNECTTIMEOUT_MS).
  std::uint32_t connect_timeout_ms = 10'000;
  // Attempts per statement including the first; 1 disables retries.
  std::uint32_t max_attempts = 4;
  // Exponential backoff between attempts: base * 2^(attempt-1), capped at
  // backoff_max_ms, with full jitter.
  std::uint32_t backoff_base_ms = 100;
  std::uint32_t backoff_max_ms = 10'000;
  // A Retry-After header (seconds or an HTTP date) replaces the backoff, up
  // to this long, in ms; a longer one is waited this long.
  std::uint32_t retry_after_max_ms = 60'000;
  // Response bodies larger than this fail with resource_exhausted; at most
  // kMaxResponseBody.
  std::uint64_t max_body_bytes = 64ull << 20;
  // Redirects followed (0 = none). Only http and https are ever allowed.
  std::uint32_t max_redirects = 5;
  // Final statuses accepted as success: [accept_min, accept_max]. Default 2xx-3xx.
  std::uint16_t accept_min = 200;
  std::uint16_t accept_max = 399;
  // Declared rate limits (PROTOCOL.md §3.8), enforced across the cluster by
  // the broker: host rules (no path) key each destination host; named rules
  // key a method + path pattern on a host. Empty = the broker's defaults.
  std::vector<RateRule> rate_limits;
  // Learn limits from responses (Retry-After, X-App-Rate-Limit, RateLimit,
  // ...): a 429 pauses its key for the whole cluster and the statement runs
  // again; advertised limits are enforced from then on. Implied by
  // rate_limits.
  bool learn_rate_limits = false;
  // TLS, for https statements (PROTOCOL.md §3.1). Certificates travel as
  // PEM text, so every worker uses the same ones whatever its filesystem;
  // a client reads them from files (Options::cacert, cert, key).
  // Trusted CA certificates, replacing the system's; empty = the system's.
  std::string tls_ca_pem;
  // A client certificate and its private key (mutual TLS): both or neither.
  std::string tls_cert_pem;
  std::string tls_key_pem;
  // Skip verifying the server's certificate and name: for testing only;
  // client and workers log a warning.
  bool tls_insecure = false;
  // Proxy for every statement ("http://host:3128", "socks5h://host:1080");
  // empty = the worker's environment (http_proxy, https_proxy, all_proxy,
  // no_proxy, as libcurl reads them). no_proxy: hosts reached directly
  // ("example.com,10.0.0.0/8"; "*" = all).
  std::string proxy;
  std::string no_proxy;
  // Is the session subject to rate limiting at all?
  bool rate_aware() const { return learn_rate_limits || !rate_limits.empty(); }
};

// Largest statement body a client accepts (and a broker forwards), in bytes.
inline constexpr std::uint64_t kMaxStatementBody = 16ull << 20;
// Largest settable max_body_bytes: a body travels in one ZeroMQ frame, and a
// frame over ZMQ_MAXMSGSIZE (256 MiB) would make the broker drop the worker's
// connection (PROTOCOL.md §5).
inline constexpr std::uint64_t kMaxResponseBody = 256ull << 20;

}  // namespace gatherer
