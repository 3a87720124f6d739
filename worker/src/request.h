#pragma once
// Request building, apart from the I/O loop: the header list of a session
// (built once, read by every I/O thread), the checks that end a statement
// before any attempt (url, method, header names and values, allowed hosts),
// the header list of a statement that names headers of its own, and the
// options of the easy handle that carries a statement's attempts (method,
// url, headers, body, timeouts, protocols, redirects, callbacks).
// request_test.cc checks them on their own, mostly without a server.
//
// A SessionHeaders is immutable once built: any thread may read it. The
// functions touch only what they are given.

#include <curl/curl.h>

#include <optional>
#include <string>
#include <string_view>

#include "gatherer/config.h"
#include "gatherer/destinations.h"
#include "gatherer/statement.h"

namespace gatherer::worker {

#ifndef GATHERER_VERSION
#error "GATHERER_VERSION must be defined (worker/CMakeLists.txt)"
#endif
// Sent with every request unless the session or the statement names a
// User-Agent of its own (then libcurl sends theirs: one custom header wins).
inline constexpr char kUserAgentLine[] = "User-Agent: gatherer/" GATHERER_VERSION;
// libcurl adds "Content-Type: application/x-www-form-urlencoded" to every
// request whose body goes through CURLOPT_POSTFIELDS; a custom header with
// nothing after the colon removes it. A body is sent with the Content-Type
// its statement or session names, or none: the fetcher does not guess.
inline constexpr char kNoContentTypeLine[] = "Content-Type:";
// "Accept-Encoding: " and every encoding this libcurl decodes, the value
// CURLOPT_ACCEPT_ENCODING "" stands for. Sent as a header of the list unless
// the session or the statement names one: libcurl then formats no line of its
// own for each request (its printf costs about 130 instructions per byte),
// and decodes what comes back all the same, CURLOPT_ACCEPT_ENCODING being set.
const char* AcceptEncodingLine();

// Appends "name: value" to `list` through `line` (a reused buffer);
// "Name;" is libcurl's spelling of an empty header ("Name:" would delete it).
// False when out of memory (then `list` is unchanged).
bool AppendHeader(curl_slist*& list, std::string& line, std::string_view name, std::string_view value);

// Whether `headers` names `name` (case-insensitive).
bool NamesHeader(const Headers& headers, std::string_view name);

// The session's header list as libcurl takes it, built once per session so
// that a statement without headers of its own costs no allocation for them.
// libcurl only reads a list, so every I/O thread may hand the same one to its
// easy handles.
struct SessionHeaders {
  explicit SessionHeaders(const Headers& headers);
  ~SessionHeaders() { curl_slist_free_all(list); }
  SessionHeaders(const SessionHeaders&) = delete;
  SessionHeaders& operator=(const SessionHeaders&) = delete;

  // For a request without a body, and for one with a body.
  const curl_slist* plain() const { return list; }
  const curl_slist* with_body() const { return names_content_type ? list : &no_content_type; }

  // Set when a session header is invalid: every statement fails with it.
  std::optional<ResponseError> error;
  bool names_user_agent = false;
  bool names_content_type = false;
  bool names_accept_encoding = false;

 private:
  curl_slist* list = nullptr;
  curl_slist no_content_type{};  // not libcurl's: never freed with curl_slist_free_all
};

// The host of `url` when the allow-list of `destinations` refuses it (or
// when the host cannot be told), as a sentence; "" when it is allowed.
std::string RefusedHost(const char* url, const DestinationPolicy& destinations);

// Buffers one I/O thread reuses for every request it builds, so that building
// one allocates only what libcurl keeps (its copies of the url and header lines).
struct RequestScratch {
  std::string joined_url;
  std::string header_line;
};

// What PlanRequest found a statement's request is made of.
struct RequestPlan {
  const std::string* url = nullptr;       // the statement's url, or the scratch's joined one
  const curl_slist* headers = nullptr;    // the session's list, or the statement's own
  bool posts = false;                     // the statement's body goes with it (CURLOPT_POSTFIELDS)
};

// Checks a statement and works out its url and header list. A path is joined
// to the session's base_url (in `scratch`); an absolute url is used as it is.
// Without headers of its own a statement takes the session's list as it is;
// otherwise `own` receives a list of its own: the session's headers minus
// those it names, then its own, then the fetcher's defaults. The caller frees
// `own` (curl_slist_free_all), after an error too. Returns the error that
// ends the statement without an attempt, if any.
std::optional<ResponseError> PlanRequest(const Statement& statement, const SessionSettings& settings,
                                         const SessionHeaders& session_headers, const DestinationPolicy& destinations,
                                         RequestScratch& scratch, curl_slist*& own, RequestPlan& plan);

// The callbacks of one transfer's attempts and the pointer each is given.
// PrereqCallback is installed for non-idempotent statements and when hosts
// are allow-listed. Every connection's socket is opened by `open_socket`
// (given `data`) and closed by `close_socket` (given `thread`: a connection
// keeps the close callback and pointer of the handle that opened it, and may
// outlive that handle's transfer, never its I/O thread).
struct RequestHooks {
  void* data = nullptr;
  void* thread = nullptr;
  char* error_buffer = nullptr;  // CURL_ERROR_SIZE bytes
  curl_write_callback write = nullptr;
  curl_write_callback header = nullptr;
  curl_prereq_callback prereq = nullptr;
  curl_opensocket_callback open_socket = nullptr;
  curl_closesocket_callback close_socket = nullptr;
};

// What every request of one fetcher shares.
struct RequestPolicy {
  const DestinationPolicy* destinations = nullptr;
  // CURLOPT_INTERFACE, "host!<address>": the local address every connection
  // leaves from (Fetcher::Options::source_address); nullptr = the system's.
  const char* interface = nullptr;
};

// Whether `address` is an IPv4 or IPv6 literal ("127.0.0.12", "::1"), as a
// source address must be: never a host name or an interface name, which
// libcurl would resolve at each connection.
bool IsIpLiteral(std::string_view address);

// Sets every option of a statement's request on `easy` (fresh, or reset with
// curl_easy_reset) once; its retries reuse them. `statement` and the header
// list `plan` names must outlive the handle's use: libcurl copies the url but
// neither the body nor the list. `share`: the session's CURLSH, or nullptr.
// It is ConfigureSession then ConfigureStatement.
std::optional<ResponseError> ConfigureRequest(CURL* easy, const Statement& statement, const SessionSettings& settings,
                                              const RequestPlan& plan, bool idempotent, CURLSH* share,
                                              const RequestPolicy& policy, const RequestHooks& hooks);

// The options every request of a session has alike: protocols, redirects,
// connect timeout, HTTP version, encodings, callbacks, TLS, proxy, share.
std::optional<ResponseError> ConfigureSession(CURL* easy, const SessionSettings& settings, CURLSH* share,
                                              const RequestPolicy& policy, const RequestHooks& hooks);

// The options of one statement: url, timeout, headers, method and body, and
// the pointers its callbacks are given. On a handle that last carried a
// plain GET of the same session (IsPlainGet) it is all a plain GET needs:
// every option it sets there is set again, and none of the others changed.
std::optional<ResponseError> ConfigureStatement(CURL* easy, const Statement& statement, const SessionSettings& settings,
                                                const RequestPlan& plan, bool idempotent, const RequestPolicy& policy,
                                                const RequestHooks& hooks);

// A GET without a body, idempotent: the statement whose handle an I/O thread
// keeps configured for the session's next one.
bool IsPlainGet(const Statement& statement, bool idempotent);

}  // namespace gatherer::worker
