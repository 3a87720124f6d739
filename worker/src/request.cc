#include "request.h"

#include <arpa/inet.h>
#include <netinet/in.h>

#include <algorithm>

#include "fetcher.h"
#include "gatherer/strings.h"

namespace gatherer::worker {

namespace {

// Appends a line as it is; false when out of memory (then `list` is unchanged).
bool AppendLine(curl_slist*& list, const char* line) {
  curl_slist* next = curl_slist_append(list, line);
  if (next == nullptr) return false;
  list = next;
  return true;
}

// The fetcher's own lines, each unless the headers already name it.
bool AppendDefaultLines(curl_slist*& list, bool names_user_agent, bool names_accept_encoding) {
  if (!names_user_agent && !AppendLine(list, kUserAgentLine)) return false;
  const char* accept_encoding = AcceptEncodingLine();
  return names_accept_encoding || accept_encoding == nullptr || AppendLine(list, accept_encoding);
}

}  // namespace

bool AppendHeader(curl_slist*& list, std::string& line, std::string_view name, std::string_view value) {
  line.assign(name);
  line += value.empty() ? ";" : ": ";
  line += value;
  return AppendLine(list, line.c_str());
}

bool IsIpLiteral(std::string_view address) {
  // inet_pton wants a terminated string; a literal is at most 45 characters.
  char text[INET6_ADDRSTRLEN] = {};
  if (address.empty() || address.size() >= sizeof text) return false;
  address.copy(text, address.size());
  in6_addr parsed{};
  return inet_pton(AF_INET, text, &parsed) == 1 || inet_pton(AF_INET6, text, &parsed) == 1;
}

const char* AcceptEncodingLine() {
  static const std::string line = [] {
    // The order libcurl lists them in (content_encoding.c).
    const curl_version_info_data* info = curl_version_info(CURLVERSION_NOW);
    std::string encodings;
    auto add = [&](const char* name) { encodings.append(encodings.empty() ? "" : ", ").append(name); };
    if (info->features & CURL_VERSION_LIBZ) {
      add("deflate");
      add("gzip");
    }
    if (info->features & CURL_VERSION_BROTLI) add("br");
    if (info->features & CURL_VERSION_ZSTD) add("zstd");
    return encodings.empty() ? std::string() : "Accept-Encoding: " + encodings;
  }();
  return line.empty() ? nullptr : line.c_str();
}

bool NamesHeader(const Headers& headers, std::string_view name) {
  return std::any_of(headers.begin(), headers.end(), [&](const auto& h) { return EqualsIgnoreCase(h.first, name); });
}

SessionHeaders::SessionHeaders(const Headers& headers) {
  for (const auto& [name, value] : headers) {
    if (!IsHttpToken(name) || !IsHttpFieldValue(value)) {
      error = ResponseError{StatusCode::kInvalidArgument, "invalid header '" + name + "'"};
      return;
    }
  }
  names_user_agent = NamesHeader(headers, "User-Agent");
  names_content_type = NamesHeader(headers, "Content-Type");
  names_accept_encoding = NamesHeader(headers, "Accept-Encoding");
  std::string line;
  bool ok = true;
  for (const auto& [name, value] : headers) ok = ok && AppendHeader(list, line, name, value);
  ok = ok && AppendDefaultLines(list, names_user_agent, names_accept_encoding);
  if (!ok) {
    error = ResponseError{StatusCode::kInternal, "out of memory"};
    return;
  }
  // The removal of libcurl's Content-Type goes in front of the shared list
  // (order does not matter to it), so both lists share their nodes.
  no_content_type.data = const_cast<char*>(kNoContentTypeLine);
  no_content_type.next = list;
}

std::string RefusedHost(const char* url, const DestinationPolicy& destinations) {
  CURLU* parsed = curl_url();
  char* host = nullptr;
  std::string why;
  if (parsed == nullptr || curl_url_set(parsed, CURLUPART_URL, url, 0) != CURLUE_OK ||
      curl_url_get(parsed, CURLUPART_HOST, &host, 0) != CURLUE_OK) {
    why = "cannot tell the host of " + std::string(url) + " to check it against the allowed hosts";
  } else if (!HostAllowed(host, destinations)) {
    why = "host " + std::string(host) + " is not among this worker's allowed hosts";
  }
  curl_free(host);
  curl_url_cleanup(parsed);
  return why;
}

std::optional<ResponseError> PlanRequest(const Statement& statement, const SessionSettings& settings,
                                         const SessionHeaders& session_headers, const DestinationPolicy& destinations,
                                         RequestScratch& scratch, curl_slist*& own, RequestPlan& plan) {
  // A path is joined to base_url; an absolute url goes to libcurl as it is
  // (libcurl copies it either way).
  plan.url = &statement.url;
  if (!statement.url.empty() && statement.url.front() == '/') {
    if (settings.base_url.empty()) {
      return ResponseError{StatusCode::kInvalidArgument, "url is a path and the session has no base_url"};
    }
    std::string_view base = settings.base_url;
    while (!base.empty() && base.back() == '/') base.remove_suffix(1);
    scratch.joined_url.assign(base).append(statement.url);
    plan.url = &scratch.joined_url;
  }
  if (!IsHttpToken(statement.method)) {
    return ResponseError{StatusCode::kInvalidArgument, "method is not an HTTP token"};
  }
  if (!destinations.allowed_hosts.empty()) {
    if (std::string why = RefusedHost(plan.url->c_str(), destinations); !why.empty()) {
      return ResponseError{StatusCode::kPermissionDenied, "destination refused: " + why};
    }
  }
  if (session_headers.error) return session_headers.error;
  const std::string& method = statement.method;
  const bool has_body = !statement.body.empty();
  plan.posts = method != "HEAD" && (method == "POST" || has_body);

  // Without headers of its own a statement takes the session's list as it
  // is; otherwise it gets a list of its own: the session's defaults minus
  // those it names, then its own, then the defaults of the fetcher.
  plan.headers = plan.posts ? session_headers.with_body() : session_headers.plain();
  if (!statement.headers.empty()) {
    for (const auto& [name, value] : statement.headers) {
      if (!IsHttpToken(name) || !IsHttpFieldValue(value)) {
        return ResponseError{StatusCode::kInvalidArgument, "invalid header '" + name + "'"};
      }
    }
    const ResponseError out_of_memory{StatusCode::kInternal, "out of memory"};
    for (const auto& [name, value] : settings.headers) {
      if (!NamesHeader(statement.headers, name) && !AppendHeader(own, scratch.header_line, name, value)) {
        return out_of_memory;
      }
    }
    for (const auto& [name, value] : statement.headers) {
      if (!AppendHeader(own, scratch.header_line, name, value)) return out_of_memory;
    }
    if (!AppendDefaultLines(own,
                            session_headers.names_user_agent || NamesHeader(statement.headers, "User-Agent"),
                            session_headers.names_accept_encoding ||
                                NamesHeader(statement.headers, "Accept-Encoding"))) {
      return out_of_memory;
    }
    if (plan.posts && !session_headers.names_content_type && !NamesHeader(statement.headers, "Content-Type") &&
        !AppendLine(own, kNoContentTypeLine)) {
      return out_of_memory;
    }
    plan.headers = own;
  }
  return std::nullopt;
}

namespace {

// curl_easy_setopt of several options, stopping at the first that fails.
class Setter {
 public:
  explicit Setter(CURL* easy) : easy_(easy) {}
  template <typename T>
  void operator()(CURLoption option, T value) {
    if (rc_ == CURLE_OK) rc_ = curl_easy_setopt(easy_, option, value);
  }
  std::optional<ResponseError> error() const {
    if (rc_ == CURLE_OK) return std::nullopt;
    return ResponseError{StatusCodeFromCurl(rc_), std::string("curl_easy_setopt: ") + curl_easy_strerror(rc_)};
  }

 private:
  CURL* easy_;
  CURLcode rc_ = CURLE_OK;
};

}  // namespace

bool IsPlainGet(const Statement& statement, bool idempotent) {
  return idempotent && statement.body.empty() && statement.method == "GET";
}

std::optional<ResponseError> ConfigureSession(CURL* easy, const SessionSettings& settings, CURLSH* share,
                                              const RequestPolicy& policy, const RequestHooks& hooks) {
  Setter set(easy);
  set(CURLOPT_NOSIGNAL, 1L);
  // Never file://, gopher://, ..., not even through a redirect.
  set(CURLOPT_PROTOCOLS_STR, "http,https");
  set(CURLOPT_REDIR_PROTOCOLS_STR, "http,https");
  if (settings.max_redirects > 0) {
    set(CURLOPT_FOLLOWLOCATION, 1L);
    set(CURLOPT_MAXREDIRS, static_cast<long>(settings.max_redirects));
  }
  set(CURLOPT_CONNECTTIMEOUT_MS, static_cast<long>(settings.connect_timeout_ms));
  set(CURLOPT_HTTP_VERSION, static_cast<long>(CURL_HTTP_VERSION_2TLS));
  // Every encoding libcurl decodes; the header itself is in the list
  // (AcceptEncodingLine), this makes libcurl decode what comes back.
  set(CURLOPT_ACCEPT_ENCODING, "");
  set(CURLOPT_WRITEFUNCTION, hooks.write);
  set(CURLOPT_HEADERFUNCTION, hooks.header);
  if (settings.max_body_bytes > 0) {
    // Refuses early when Content-Length already says too much; the write
    // callback enforces the cap on decoded bytes.
    set(CURLOPT_MAXFILESIZE_LARGE, static_cast<curl_off_t>(settings.max_body_bytes));
  }
  // Every connection's address, after DNS and at each redirect, is checked
  // (when addresses are refused) before the socket exists; a reused one was
  // checked when made. The I/O thread learns of each socket's open and close.
  set(CURLOPT_OPENSOCKETFUNCTION, hooks.open_socket);
  set(CURLOPT_CLOSESOCKETFUNCTION, hooks.close_socket);
  set(CURLOPT_CLOSESOCKETDATA, hooks.thread);
  // Connections leave from this address only; libcurl reuses a kept-alive
  // connection only for a transfer that asks for the same one.
  if (policy.interface != nullptr) set(CURLOPT_INTERFACE, policy.interface);
  if (share != nullptr) set(CURLOPT_SHARE, share);
  // TLS and proxy, from the session's settings, which outlive every handle
  // of the session: libcurl keeps a pointer to the PEM text, not a copy.
  auto blob = [&](CURLoption option, const std::string& pem) {
    curl_blob b{const_cast<char*>(pem.data()), pem.size(), CURL_BLOB_NOCOPY};
    set(option, &b);  // the struct is copied, the text is not
  };
  if (!settings.tls_ca_pem.empty()) {
    // In place of the system's store, not beside it.
    set(CURLOPT_CAINFO, static_cast<const char*>(nullptr));
    set(CURLOPT_CAPATH, static_cast<const char*>(nullptr));
    blob(CURLOPT_CAINFO_BLOB, settings.tls_ca_pem);
  }
  if (!settings.tls_cert_pem.empty()) {
    set(CURLOPT_SSLCERTTYPE, "PEM");
    blob(CURLOPT_SSLCERT_BLOB, settings.tls_cert_pem);
    set(CURLOPT_SSLKEYTYPE, "PEM");
    blob(CURLOPT_SSLKEY_BLOB, settings.tls_key_pem);
  }
  if (settings.tls_insecure) {
    set(CURLOPT_SSL_VERIFYPEER, 0L);
    set(CURLOPT_SSL_VERIFYHOST, 0L);
  }
  if (!settings.proxy.empty()) set(CURLOPT_PROXY, settings.proxy.c_str());
  if (!settings.no_proxy.empty()) set(CURLOPT_NOPROXY, settings.no_proxy.c_str());
  return set.error();
}

std::optional<ResponseError> ConfigureStatement(CURL* easy, const Statement& statement, const SessionSettings& settings,
                                                const RequestPlan& plan, bool idempotent, const RequestPolicy& policy,
                                                const RequestHooks& hooks) {
  const std::string& method = statement.method;
  const DestinationPolicy& destinations = *policy.destinations;
  Setter set(easy);
  set(CURLOPT_URL, plan.url->c_str());
  set(CURLOPT_PRIVATE, hooks.data);
  set(CURLOPT_ERRORBUFFER, hooks.error_buffer);
  const std::uint32_t timeout_ms = statement.timeout_ms != 0 ? statement.timeout_ms : settings.timeout_ms;
  set(CURLOPT_TIMEOUT_MS, static_cast<long>(timeout_ms));
  const std::string& url = *plan.url;
  // Over https, wait for a connection being set up that may multiplex (h2)
  // instead of opening another; plain http never multiplexes here, so it
  // would only serialise connection set-up.
  const bool https = url.size() >= 8 && EqualsIgnoreCase(std::string_view(url).substr(0, 8), "https://");
  set(CURLOPT_PIPEWAIT, https ? 1L : 0L);
  set(CURLOPT_WRITEDATA, hooks.data);
  set(CURLOPT_HEADERDATA, hooks.data);
  if (!idempotent || !destinations.allowed_hosts.empty()) {
    set(CURLOPT_PREREQFUNCTION, hooks.prereq);
    set(CURLOPT_PREREQDATA, hooks.data);
  } else {
    set(CURLOPT_PREREQFUNCTION, static_cast<curl_prereq_callback>(nullptr));
  }
  set(CURLOPT_OPENSOCKETDATA, hooks.data);
  // libcurl never writes to the list: the session's may be shared.
  set(CURLOPT_HTTPHEADER, const_cast<curl_slist*>(plan.headers));

  if (method == "HEAD") {
    set(CURLOPT_NOBODY, 1L);
  } else if (plan.posts) {
    set(CURLOPT_POSTFIELDSIZE_LARGE, static_cast<curl_off_t>(statement.body.size()));
    // Not copied: the statement outlives the handle's use (RequestPlan comment).
    set(CURLOPT_POSTFIELDS, statement.body.data());
    if (method != "POST") set(CURLOPT_CUSTOMREQUEST, method.c_str());
  } else if (method != "GET") {
    set(CURLOPT_CUSTOMREQUEST, method.c_str());
  }
  return set.error();
}

std::optional<ResponseError> ConfigureRequest(CURL* easy, const Statement& statement, const SessionSettings& settings,
                                              const RequestPlan& plan, bool idempotent, CURLSH* share,
                                              const RequestPolicy& policy, const RequestHooks& hooks) {
  if (auto error = ConfigureSession(easy, settings, share, policy, hooks)) return error;
  return ConfigureStatement(easy, statement, settings, plan, idempotent, policy, hooks);
}

}  // namespace gatherer::worker
