#include "http_server.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <charconv>
#include <cstring>
#include <stdexcept>
#include <string_view>
#include <thread>

#include "gatherer/wake_fd.h"

namespace gatherer::testing {
namespace {

// A head larger than this is answered 400: no test needs more, and it bounds
// what a client that never sends "\r\n\r\n" can make us buffer.
constexpr std::size_t kMaxHeadBytes = 64 * 1024;
constexpr std::uint64_t kMaxBodyBytes = 256ULL * 1024 * 1024;
constexpr int kListenBacklog = 4096;
// epoll data tags; connection tags are (generation << 32 | fd), generation >= 1.
constexpr std::uint64_t kListenTag = ~0ULL;
constexpr std::uint64_t kWakeTag = ~0ULL - 1;

std::runtime_error sys_error(const char* what) {
  return std::runtime_error(std::string("HttpServer: ") + what + ": " + std::strerror(errno));
}

char ascii_lower(char c) { return (c >= 'A' && c <= 'Z') ? static_cast<char>(c - 'A' + 'a') : c; }

bool iequals(std::string_view a, std::string_view b) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (ascii_lower(a[i]) != ascii_lower(b[i])) return false;
  }
  return true;
}

std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
  return s;
}

// True if the comma-separated header value lists `token` (RFC 9110 5.6.1).
bool has_token(std::string_view value, std::string_view token) {
  while (!value.empty()) {
    const std::size_t comma = value.find(',');
    if (iequals(trim(value.substr(0, comma)), token)) return true;
    if (comma == std::string_view::npos) break;
    value.remove_prefix(comma + 1);
  }
  return false;
}

std::string_view reason_phrase(int status) {
  switch (status) {
    case 100: return "Continue";
    case 200: return "OK";
    case 201: return "Created";
    case 202: return "Accepted";
    case 204: return "No Content";
    case 206: return "Partial Content";
    case 301: return "Moved Permanently";
    case 302: return "Found";
    case 304: return "Not Modified";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 408: return "Request Timeout";
    case 409: return "Conflict";
    case 411: return "Length Required";
    case 413: return "Content Too Large";
    case 429: return "Too Many Requests";
    case 500: return "Internal Server Error";
    case 501: return "Not Implemented";
    case 502: return "Bad Gateway";
    case 503: return "Service Unavailable";
    case 504: return "Gateway Timeout";
    default: return "Status";
  }
}

void append_number(std::string& out, std::uint64_t n) {
  char buf[24];
  const auto [end, ec] = std::to_chars(buf, buf + sizeof buf, n);
  (void)ec;
  out.append(buf, end);
}

using Headers = std::vector<std::pair<std::string, std::string>>;

// Appends a whole reply to `out`. The body is passed in two parts so the
// default handler can send "ok:" + target without building a string. A
// Content-Length set by the handler wins over ours, so a test can announce
// more bytes than it sends (then drop) to fake a truncated body.
void append_reply(std::string& out, int status, const Headers& headers, std::string_view body_a,
                  std::string_view body_b, bool head_only, bool close) {
  out.append("HTTP/1.1 ");
  append_number(out, static_cast<std::uint64_t>(status));
  out.push_back(' ');
  out.append(reason_phrase(status));
  out.append("\r\n");
  bool has_length = false;
  for (const auto& [name, value] : headers) has_length |= iequals(name, "content-length");
  if (!has_length) {
    out.append("Content-Length: ");
    append_number(out, body_a.size() + body_b.size());
    out.append("\r\n");
  }
  for (const auto& [name, value] : headers) {
    out.append(name);
    out.append(": ");
    out.append(value);
    out.append("\r\n");
  }
  // Tells the client not to reuse the connection we are about to close.
  if (close) out.append("Connection: close\r\n");
  out.append("\r\n");
  if (!head_only) {
    out.append(body_a);
    out.append(body_b);
  }
}

// Lets a benchmark open more sockets than the usual soft limit of 1024.
void raise_fd_limit() {
  rlimit limit{};
  if (getrlimit(RLIMIT_NOFILE, &limit) == 0 && limit.rlim_cur < limit.rlim_max) {
    limit.rlim_cur = limit.rlim_max;
    setrlimit(RLIMIT_NOFILE, &limit);
  }
}

}  // namespace

std::string HttpRequest::header(std::string_view name) const {
  for (const auto& [key, value] : headers) {
    if (iequals(key, name)) return value;
  }
  return {};
}

// Everything below runs on the loop thread, except the constructor, the
// destructor (after the thread has been joined) and the counter reads.
struct HttpServer::Impl {
  struct Conn {
    int fd = -1;
    std::uint64_t tag = 0;
    in_addr peer_address{};  // network order, as accept() gave it
    std::uint16_t peer_port = 0;
    std::string in;  // bytes received; in[in_pos..] not yet parsed
    std::size_t in_pos = 0;
    std::string out;  // bytes queued; out[out_pos..] not yet sent
    std::size_t out_pos = 0;
    bool pending = false;        // a delayed reply is in the timer heap
    bool close_after_write = false;
    bool read_eof = false;
    bool continue_sent = false;  // "100 Continue" sent for the request being read
  };

  // A delayed reply, fired in (due, seq) order.
  struct Timer {
    std::chrono::steady_clock::time_point due;
    std::uint64_t seq;
    std::uint64_t tag;
    HttpReply reply;
    bool head_only;
    bool close;
  };
  struct TimerLater {
    bool operator()(const Timer& a, const Timer& b) const {
      return a.due != b.due ? a.due > b.due : a.seq > b.seq;
    }
  };

  enum class Parse { kNeedMore, kReady, kBad, kLengthRequired, kTooLarge };

  Impl(HttpHandler h, std::string host) : handler_(std::move(h)), host_(std::move(host)) {}

  void start();
  void stop_and_close();
  void run();
  void accept_all();
  void on_event(std::uint64_t tag, std::uint32_t events);
  void read_all(Conn& c);
  void serve(Conn& c);
  Parse parse_one(Conn& c, std::size_t& consumed, bool& keep_alive, bool& head_only);
  void dispatch(Conn& c, bool keep_alive, bool head_only);
  void finish_reply(Conn& c, const HttpReply& reply, bool head_only, bool close);
  void flush(Conn& c);
  void close_conn(Conn& c);
  void fire_due_timers();
  int next_timeout_ms() const;
  Conn* find(std::uint64_t tag) {
    const auto fd = static_cast<std::size_t>(tag & 0xffffffffU);
    if (fd >= conns_.size() || !conns_[fd] || conns_[fd]->tag != tag) return nullptr;
    return conns_[fd].get();
  }
  void request_done() { in_flight_.fetch_sub(1); }

  void release_timers();

  HttpHandler handler_;
  std::string host_;  // IPv4 address listened on
  int listen_fd_ = -1;
  int epoll_fd_ = -1;
  WakeFd wake_;  // release_delayed() and stop_and_close() wake the loop
  std::uint16_t port_ = 0;
  std::thread thread_;

  // Loop-thread state.
  std::vector<std::unique_ptr<Conn>> conns_;  // indexed by fd
  std::uint32_t generation_ = 0;
  std::vector<Timer> timers_;  // min-heap by TimerLater
  std::uint64_t timer_seq_ = 0;
  HttpRequest request_;  // reused so steady traffic keeps its string capacity
  std::array<char, 64 * 1024> read_buf_{};

  // Written by the loop thread only; read from anywhere. Sequentially
  // consistent so a test that sees in_flight() drop also sees what the
  // handler wrote before it (TSAN cannot see the socket in between).
  std::atomic<std::uint64_t> requests_{0};
  std::atomic<std::int64_t> in_flight_{0};
  std::atomic<std::int64_t> max_in_flight_{0};
  std::atomic<std::uint64_t> connections_{0};
  // Set by release_delayed() and stop_and_close(), then the loop is woken.
  std::atomic<bool> release_{false};
  std::atomic<bool> stop_{false};
};

void HttpServer::Impl::start() {
  raise_fd_limit();
  listen_fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (listen_fd_ < 0) throw sys_error("socket");
  int one = 1;
  setsockopt(listen_fd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  if (::inet_pton(AF_INET, host_.c_str(), &addr.sin_addr) != 1) {
    throw std::invalid_argument("HttpServer: not an IPv4 address: " + host_);
  }
  addr.sin_port = 0;
  if (::bind(listen_fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    throw sys_error("bind");
  }
  if (::listen(listen_fd_, kListenBacklog) != 0) throw sys_error("listen");
  socklen_t len = sizeof addr;
  if (::getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    throw sys_error("getsockname");
  }
  port_ = ntohs(addr.sin_port);

  epoll_fd_ = ::epoll_create1(EPOLL_CLOEXEC);
  if (epoll_fd_ < 0) throw sys_error("epoll_create1");
  // Level-triggered: accept_all() may stop early (EMFILE) and must be called again.
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.u64 = kListenTag;
  if (::epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, listen_fd_, &ev) != 0) throw sys_error("epoll_ctl");
  ev.data.u64 = kWakeTag;
  if (::epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, wake_.fd(), &ev) != 0) throw sys_error("epoll_ctl");

  thread_ = std::thread([this] { run(); });
}

void HttpServer::Impl::stop_and_close() {
  if (thread_.joinable()) {
    stop_.store(true);
    wake_.signal();
    thread_.join();
  }
  for (auto& c : conns_) {
    if (c) ::close(c->fd);
  }
  conns_.clear();
  for (int* fd : {&listen_fd_, &epoll_fd_}) {
    if (*fd >= 0) ::close(*fd);
    *fd = -1;
  }
}

int HttpServer::Impl::next_timeout_ms() const {
  if (timers_.empty()) return -1;
  const auto now = std::chrono::steady_clock::now();
  const auto due = timers_.front().due;
  if (due <= now) return 0;
  // Round up: waking a millisecond early would only spin once more.
  const auto ms = std::chrono::ceil<std::chrono::milliseconds>(due - now).count();
  return static_cast<int>(std::min<std::int64_t>(ms, 60'000));
}

void HttpServer::Impl::run() {
  std::array<epoll_event, 256> events;
  for (;;) {
    const int n = ::epoll_wait(epoll_fd_, events.data(), static_cast<int>(events.size()),
                               next_timeout_ms());
    if (n < 0) {
      if (errno == EINTR) continue;
      return;  // only EBADF/EINVAL, i.e. a bug; the destructor still joins.
    }
    for (int i = 0; i < n; ++i) {
      const std::uint64_t tag = events[static_cast<std::size_t>(i)].data.u64;
      if (tag == kWakeTag) {
        if (stop_.load()) return;
        wake_.drain();
        continue;
      }
      if (tag == kListenTag) {
        accept_all();
      } else {
        on_event(tag, events[static_cast<std::size_t>(i)].events);
      }
    }
    if (release_.exchange(false)) release_timers();
    fire_due_timers();
  }
}

// Every timer waiting now falls due now; they fire in the order they were set.
void HttpServer::Impl::release_timers() {
  const auto now = std::chrono::steady_clock::now();
  for (Timer& timer : timers_) timer.due = std::min(timer.due, now);
  std::make_heap(timers_.begin(), timers_.end(), TimerLater{});
}

void HttpServer::Impl::accept_all() {
  for (;;) {
    sockaddr_in peer{};
    socklen_t peer_len = sizeof peer;
    const int fd =
        ::accept4(listen_fd_, reinterpret_cast<sockaddr*>(&peer), &peer_len, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) {
      // EAGAIN: drained. EMFILE/ENFILE: out of fds; the level-triggered
      // listen fd brings us back once a connection closes.
      return;
    }
    int one = 1;
    // Replies are written whole; Nagle would only hold back pipelined ones.
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (++generation_ == 0) generation_ = 1;
    auto conn = std::make_unique<Conn>();
    conn->fd = fd;
    conn->tag = (static_cast<std::uint64_t>(generation_) << 32) | static_cast<std::uint32_t>(fd);
    conn->peer_address = peer.sin_addr;
    conn->peer_port = ntohs(peer.sin_port);
    // Edge-triggered with EPOLLOUT always on: no epoll_ctl per partial write;
    // read_all() and flush() therefore run until EAGAIN.
    epoll_event ev{};
    ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET;
    ev.data.u64 = conn->tag;
    if (::epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, fd, &ev) != 0) {
      ::close(fd);
      continue;
    }
    const auto index = static_cast<std::size_t>(fd);
    if (index >= conns_.size()) conns_.resize(index + 1);
    conns_[index] = std::move(conn);
    connections_.fetch_add(1);
  }
}

void HttpServer::Impl::on_event(std::uint64_t tag, std::uint32_t events) {
  Conn* c = find(tag);
  if (c == nullptr) return;
  if (events & EPOLLERR) {
    close_conn(*c);
    return;
  }
  if (events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP)) {
    read_all(*c);
    if (find(tag) == nullptr) return;
    serve(*c);
    return;  // serve() flushes
  }
  if (events & EPOLLOUT) flush(*c);
}

void HttpServer::Impl::read_all(Conn& c) {
  for (;;) {
    const ssize_t n = ::recv(c.fd, read_buf_.data(), read_buf_.size(), 0);
    if (n > 0) {
      c.in.append(read_buf_.data(), static_cast<std::size_t>(n));
      continue;
    }
    if (n == 0) {
      c.read_eof = true;
      return;
    }
    if (errno == EINTR) continue;
    if (errno != EAGAIN && errno != EWOULDBLOCK) close_conn(c);
    return;
  }
}

// Parses and answers requests from c.in until one needs more bytes, waits on
// a delayed reply (later pipelined requests wait behind it), or ends the
// connection; then writes what was queued.
void HttpServer::Impl::serve(Conn& c) {
  while (!c.pending && !c.close_after_write) {
    std::size_t consumed = 0;
    bool keep_alive = true;
    bool head_only = false;
    const Parse result = parse_one(c, consumed, keep_alive, head_only);
    if (result == Parse::kNeedMore) break;
    if (result != Parse::kReady) {
      const int status = result == Parse::kLengthRequired ? 411
                         : result == Parse::kTooLarge     ? 413
                                                          : 400;
      append_reply(c.out, status, {}, reason_phrase(status), {}, false, true);
      c.close_after_write = true;
      c.in_pos = c.in.size();
      break;
    }
    c.in_pos += consumed;
    c.continue_sent = false;
    const std::uint64_t tag = c.tag;
    dispatch(c, keep_alive, head_only);
    if (find(tag) == nullptr) return;  // dropped
  }
  if (c.in_pos == c.in.size()) {
    c.in.clear();
    c.in_pos = 0;
  } else if (c.in_pos > 0) {
    c.in.erase(0, c.in_pos);
    c.in_pos = 0;
  }
  flush(c);
}

HttpServer::Impl::Parse HttpServer::Impl::parse_one(Conn& c, std::size_t& consumed,
                                                    bool& keep_alive, bool& head_only) {
  // RFC 9112 2.2: a server SHOULD ignore empty lines before a request-line.
  while (c.in.size() - c.in_pos >= 2 && c.in[c.in_pos] == '\r' && c.in[c.in_pos + 1] == '\n') {
    c.in_pos += 2;
  }
  const std::string_view data(c.in.data() + c.in_pos, c.in.size() - c.in_pos);
  const std::size_t head_end = data.find("\r\n\r\n");
  if (head_end == std::string_view::npos) {
    return data.size() > kMaxHeadBytes ? Parse::kBad : Parse::kNeedMore;
  }
  if (head_end > kMaxHeadBytes) return Parse::kBad;

  // Request line: method SP target SP version.
  const std::size_t line_end = data.find("\r\n");
  const std::string_view line = data.substr(0, line_end);
  const std::size_t sp1 = line.find(' ');
  if (sp1 == std::string_view::npos || sp1 == 0) return Parse::kBad;
  const std::size_t sp2 = line.find(' ', sp1 + 1);
  if (sp2 == std::string_view::npos || sp2 == sp1 + 1) return Parse::kBad;
  const std::string_view method = line.substr(0, sp1);
  const std::string_view target = line.substr(sp1 + 1, sp2 - sp1 - 1);
  const std::string_view version = line.substr(sp2 + 1);
  if (version == "HTTP/1.1") {
    keep_alive = true;
  } else if (version == "HTTP/1.0") {
    keep_alive = false;
  } else {
    return Parse::kBad;
  }
  head_only = method == "HEAD";

  // Header fields, stored into the reused request as we go.
  std::size_t count = 0;
  std::uint64_t content_length = 0;
  bool has_length = false;
  bool expect_continue = false;
  auto& headers = request_.headers;
  std::size_t pos = line_end + 2;
  while (pos < head_end + 2) {
    const std::size_t eol = data.find("\r\n", pos);
    const std::string_view field = data.substr(pos, eol - pos);
    pos = eol + 2;
    // Obsolete line folding is rejected, as RFC 9112 5.2 allows.
    if (field.empty() || field.front() == ' ' || field.front() == '\t') return Parse::kBad;
    const std::size_t colon = field.find(':');
    if (colon == std::string_view::npos || colon == 0) return Parse::kBad;
    const std::string_view name = field.substr(0, colon);
    if (name.find_first_of(" \t") != std::string_view::npos) return Parse::kBad;
    const std::string_view value = trim(field.substr(colon + 1));

    if (iequals(name, "content-length")) {
      std::uint64_t n = 0;
      const auto [end, ec] = std::from_chars(value.data(), value.data() + value.size(), n);
      if (value.empty() || ec != std::errc() || end != value.data() + value.size()) {
        return Parse::kBad;
      }
      if (has_length && n != content_length) return Parse::kBad;
      content_length = n;
      has_length = true;
    } else if (iequals(name, "transfer-encoding")) {
      // Chunked request bodies are not needed by any test; say so plainly.
      return Parse::kLengthRequired;
    } else if (iequals(name, "connection")) {
      if (has_token(value, "close")) keep_alive = false;
      else if (has_token(value, "keep-alive")) keep_alive = true;
    } else if (iequals(name, "expect")) {
      expect_continue = iequals(value, "100-continue");
    }

    if (count < headers.size()) {
      headers[count].first.assign(name);
      headers[count].second.assign(value);
    } else {
      headers.emplace_back(std::string(name), std::string(value));
    }
    ++count;
  }
  if (content_length > kMaxBodyBytes) return Parse::kTooLarge;

  const std::size_t body_start = head_end + 4;
  if (data.size() - body_start < content_length) {
    // curl waits up to a second for this before sending a large body.
    if (expect_continue && !c.continue_sent) {
      c.out.append("HTTP/1.1 100 Continue\r\n\r\n");
      c.continue_sent = true;
    }
    return Parse::kNeedMore;
  }
  headers.resize(count);
  request_.method.assign(method);
  request_.target.assign(target);
  request_.body.assign(data.substr(body_start, static_cast<std::size_t>(content_length)));
  consumed = body_start + static_cast<std::size_t>(content_length);
  return Parse::kReady;
}

void HttpServer::Impl::dispatch(Conn& c, bool keep_alive, bool head_only) {
  requests_.fetch_add(1);
  const std::int64_t now_in_flight = in_flight_.fetch_add(1) + 1;
  if (now_in_flight > max_in_flight_.load()) {
    max_in_flight_.store(now_in_flight);
  }
  const bool close = !keep_alive;

  if (!handler_) {
    // Default handler, written straight into the output buffer: benchmarks
    // run 20k requests through it.
    static const Headers kDefaultHeaders = {{"Content-Type", "text/plain"}};
    append_reply(c.out, 200, kDefaultHeaders, "ok:", request_.target, head_only, close);
    request_done();
    c.close_after_write = close;
    return;
  }

  HttpReply reply;
  char peer_address[INET_ADDRSTRLEN] = {};
  ::inet_ntop(AF_INET, &c.peer_address, peer_address, sizeof peer_address);
  request_.peer_address.assign(peer_address);
  request_.peer_port = c.peer_port;
  try {
    reply = handler_(request_);
  } catch (const std::exception& e) {
    reply = HttpReply{};
    reply.status = 500;
    reply.body = std::string("handler threw: ") + e.what();
  } catch (...) {
    reply = HttpReply{};
    reply.status = 500;
    reply.body = "handler threw";
  }
  if (reply.delay > std::chrono::milliseconds::zero()) {
    // A delayed drop closes the connection when the delay ends.
    c.pending = true;
    timers_.push_back(Timer{std::chrono::steady_clock::now() + reply.delay, timer_seq_++, c.tag,
                           std::move(reply), head_only, close});
    std::push_heap(timers_.begin(), timers_.end(), TimerLater{});
    return;
  }
  finish_reply(c, reply, head_only, close);
}

// Queues (or drops) the reply to the request at the head of the connection.
void HttpServer::Impl::finish_reply(Conn& c, const HttpReply& reply, bool head_only, bool close) {
  request_done();
  if (reply.drop) {
    close_conn(c);
    return;
  }
  append_reply(c.out, reply.status, reply.headers, reply.body, {}, head_only, close);
  c.close_after_write = close || reply.close_after;
}

void HttpServer::Impl::fire_due_timers() {
  const auto now = std::chrono::steady_clock::now();
  while (!timers_.empty() && timers_.front().due <= now) {
    std::pop_heap(timers_.begin(), timers_.end(), TimerLater{});
    Timer timer = std::move(timers_.back());
    timers_.pop_back();
    Conn* c = find(timer.tag);
    if (c == nullptr) continue;  // closed meanwhile; close_conn() settled in_flight
    c->pending = false;
    finish_reply(*c, timer.reply, timer.head_only, timer.close);
    if (find(timer.tag) == nullptr) continue;
    serve(*c);  // requests pipelined behind this one
  }
}

void HttpServer::Impl::flush(Conn& c) {
  while (c.out_pos < c.out.size()) {
    const ssize_t n =
        ::send(c.fd, c.out.data() + c.out_pos, c.out.size() - c.out_pos, MSG_NOSIGNAL);
    if (n > 0) {
      c.out_pos += static_cast<std::size_t>(n);
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;  // EPOLLOUT edge resumes
    close_conn(c);
    return;
  }
  c.out.clear();
  c.out_pos = 0;
  if (c.pending) return;
  if (c.close_after_write || c.read_eof) close_conn(c);
}

void HttpServer::Impl::close_conn(Conn& c) {
  // The delayed reply will never be written; its timer finds no connection.
  if (c.pending) request_done();
  const int fd = c.fd;
  ::close(fd);  // also removes it from the epoll set
  conns_[static_cast<std::size_t>(fd)].reset();
}

HttpServer::HttpServer(HttpHandler handler, std::string bind_address)
    : impl_(std::make_unique<Impl>(std::move(handler), std::move(bind_address))) {
  try {
    impl_->start();
  } catch (...) {
    impl_->stop_and_close();
    throw;
  }
}

HttpServer::~HttpServer() { impl_->stop_and_close(); }

std::uint16_t HttpServer::port() const { return impl_->port_; }

std::string HttpServer::url(std::string_view path) const {
  std::string out = "http://" + impl_->host_ + ":";
  append_number(out, impl_->port_);
  out.append(path);
  return out;
}

std::uint64_t HttpServer::requests() const { return impl_->requests_.load(); }
std::int64_t HttpServer::in_flight() const { return impl_->in_flight_.load(); }
std::int64_t HttpServer::max_in_flight() const {
  return impl_->max_in_flight_.load();
}
std::uint64_t HttpServer::connections() const {
  return impl_->connections_.load();
}

void HttpServer::release_delayed() {
  impl_->release_.store(true);
  impl_->wake_.signal();
}

}  // namespace gatherer::testing
