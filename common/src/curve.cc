#include "gatherer/curve.h"

#include <sys/stat.h>

#include <array>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <spdlog/spdlog.h>
#include <zmq_addon.hpp>

#include "gatherer/log.h"
#include "gatherer/strings.h"

namespace gatherer {
namespace {

// The value of a `name = "value"` line of a key file, if this line is one.
std::optional<std::string> KeyFileValue(std::string_view line, std::string_view name) {
  line = Trim(line);
  if (!line.starts_with(name)) return std::nullopt;
  line = Trim(line.substr(name.size()));
  if (!line.starts_with('=')) return std::nullopt;
  line = Trim(line.substr(1));
  if (line.size() >= 2 && line.front() == '"' && line.back() == '"') line = line.substr(1, line.size() - 2);
  return std::string(line);
}

Result<std::string> ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return Unexpected(NotFound("cannot read " + path + ": " + std::strerror(errno)));
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

Result<CurveKeyPair> ParseKeyFile(const std::string& text, const std::string& path, bool need_secret) {
  CurveKeyPair pair;
  std::istringstream lines(text);
  for (std::string line; std::getline(lines, line);) {
    if (auto v = KeyFileValue(line, "public-key")) pair.public_key = *v;
    if (auto v = KeyFileValue(line, "secret-key")) pair.secret_key = *v;
  }
  if (!IsCurveKey(pair.public_key)) {
    return Unexpected(InvalidArgument(path + ": no public-key = \"<40 Z85 characters>\" line"));
  }
  if (need_secret && !IsCurveKey(pair.secret_key)) {
    return Unexpected(InvalidArgument(path + ": no secret-key = \"<40 Z85 characters>\" line (a key pair file, "
                                              "not a public key, is needed here)"));
  }
  return pair;
}

}  // namespace

Result<CurveKeyPair> GenerateCurveKeyPair() {
  std::array<char, kCurveKeyZ85Size + 1> pub{}, sec{};
  if (zmq_curve_keypair(pub.data(), sec.data()) != 0) {
    return Unexpected(Unavailable(std::string("cannot make a CURVE key pair: ") + zmq_strerror(zmq_errno())));
  }
  return CurveKeyPair{std::string(pub.data(), kCurveKeyZ85Size), std::string(sec.data(), kCurveKeyZ85Size)};
}

bool IsCurveKey(std::string_view key) {
  if (key.size() != kCurveKeyZ85Size) return false;
  std::array<std::uint8_t, 32> raw{};
  const std::string z(key);
  return zmq_z85_decode(raw.data(), z.c_str()) != nullptr;
}

Result<CurveKeyPair> ReadCurveKeyPair(const std::string& path) {
  auto text = ReadFile(path);
  if (!text) return Unexpected(text.error());
  return ParseKeyFile(*text, path, /*need_secret=*/true);
}

Result<std::string> ReadCurvePublicKey(const std::string& key_or_path) {
  if (IsCurveKey(key_or_path)) return key_or_path;
  auto text = ReadFile(key_or_path);
  if (!text) {
    return Unexpected(InvalidArgument("not a CURVE public key (40 Z85 characters) nor a readable key file: " +
                                      key_or_path));
  }
  auto pair = ParseKeyFile(*text, key_or_path, /*need_secret=*/false);
  if (!pair) return Unexpected(pair.error());
  return pair->public_key;
}

Result<CurveClientKeys> ReadCurveClientKeys(const std::string& broker_key, const std::string& key_file) {
  if (broker_key.empty() && key_file.empty()) return CurveClientKeys{};
  if (broker_key.empty() || key_file.empty()) {
    return Unexpected(InvalidArgument("CURVE needs --curve-broker-key and --curve-key together"));
  }
  auto broker = ReadCurvePublicKey(broker_key);
  if (!broker) return Unexpected(InvalidArgument("--curve-broker-key: " + broker.error().message()));
  auto own = ReadCurveKeyPair(key_file);
  if (!own) return Unexpected(InvalidArgument("--curve-key: " + own.error().message()));
  return CurveClientKeys{std::move(*broker), std::move(*own)};
}

Result<std::unordered_set<std::string>> ReadCurveAllowList(const std::string& path) {
  std::unordered_set<std::string> keys;
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec)) {
    for (const auto& entry : std::filesystem::directory_iterator(path, ec)) {
      if (!entry.is_regular_file()) continue;
      auto key = ReadCurvePublicKey(entry.path().string());
      if (!key) return Unexpected(key.error());
      keys.insert(*key);
    }
    if (ec) return Unexpected(NotFound("cannot list " + path + ": " + ec.message()));
  } else {
    auto text = ReadFile(path);
    if (!text) return Unexpected(text.error());
    std::istringstream lines(*text);
    int number = 0;
    for (std::string line; std::getline(lines, line);) {
      ++number;
      std::string_view l = Trim(line);
      if (l.empty() || l.starts_with('#') || l == "curve" || l == "metadata") continue;
      if (l.starts_with("secret-key")) {
        return Unexpected(InvalidArgument(path + ":" + std::to_string(number) +
                                          ": a secret key does not belong in an allow-list"));
      }
      std::string key(l);
      if (auto v = KeyFileValue(l, "public-key")) key = *v;
      if (!IsCurveKey(key)) {
        return Unexpected(InvalidArgument(path + ":" + std::to_string(number) +
                                          ": not a CURVE public key (40 Z85 characters)"));
      }
      keys.insert(key);
    }
  }
  if (keys.empty()) return Unexpected(InvalidArgument(path + ": no public key listed; it would admit no one"));
  return keys;
}

Status WriteCurveKeyFiles(const std::string& prefix, const CurveKeyPair& pair) {
  const std::string secret_path = prefix + ".key", public_path = prefix + ".pub";
  for (const auto& p : {secret_path, public_path}) {
    if (std::filesystem::exists(p)) return FailedPrecondition(p + " exists; not overwritten");
  }
  const auto write = [](const std::string& path, const std::string& text, mode_t mode) -> Status {
    const mode_t old = ::umask(0777 & ~mode);
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    ::umask(old);
    out << text;
    out.close();
    if (!out) return Unavailable("cannot write " + path + ": " + std::strerror(errno));
    return Status::Ok();
  };
  const std::string pub_line = "    public-key = \"" + pair.public_key + "\"\n";
  if (Status s = write(secret_path,
                       "# Gatherer CURVE key pair: keep this file secret\ncurve\n" + pub_line +
                           "    secret-key = \"" + pair.secret_key + "\"\n",
                       0600);
      !s.ok()) {
    return s;
  }
  return write(public_path, "# Gatherer CURVE public key: give it to the peers that must trust it\ncurve\n" + pub_line,
               0644);
}

void MakeCurveServer(zmq::socket_t& socket, const CurveKeyPair& own) {
  socket.set(zmq::sockopt::curve_server, 1);
  socket.set(zmq::sockopt::curve_secretkey, own.secret_key);
  // A domain makes libzmq consult the ZAP handler for every connection.
  socket.set(zmq::sockopt::zap_domain, "gatherer");
}

void MakeCurveClient(zmq::socket_t& socket, const CurveKeyPair& own, const std::string& server_public_key) {
  socket.set(zmq::sockopt::curve_serverkey, server_public_key);
  socket.set(zmq::sockopt::curve_publickey, own.public_key);
  socket.set(zmq::sockopt::curve_secretkey, own.secret_key);
}

std::string_view PeerCurveKey(const zmq::message_t& frame) {
  const char* user = zmq_msg_gets(frame.handle(), "User-Id");
  return user ? std::string_view(user) : std::string_view();
}

ZapHandler::ZapHandler(zmq::context_t& context, std::unordered_set<std::string> allowed, spdlog::logger& log)
    : context_(context), allowed_(std::move(allowed)), log_(log) {}

ZapHandler::~ZapHandler() {
  stopping_.store(true, std::memory_order_release);
  if (thread_.joinable()) thread_.join();
}

Status ZapHandler::start() {
  socket_ = std::make_unique<zmq::socket_t>(context_, zmq::socket_type::rep);
  socket_->set(zmq::sockopt::linger, 0);
  try {
    socket_->bind("inproc://zeromq.zap.01");
  } catch (const zmq::error_t& e) {
    socket_.reset();
    return Unavailable(std::string("cannot start the CURVE authenticator: ") + e.what());
  }
  thread_ = std::thread([this] { run(); });
  return Status::Ok();
}

// RFC 27: a request is version, request id, domain, address, routing id,
// mechanism and, for CURVE, the client's 32-byte public key; the reply is
// version, request id, status code, status text, user id and metadata.
void ZapHandler::run() {
  RateLimitedLog refusals;
  std::vector<zmq::message_t> request;
  while (!stopping_.load(std::memory_order_acquire)) {
    zmq::pollitem_t item{socket_->handle(), 0, ZMQ_POLLIN, 0};
    // Woken every 200 ms at most, to notice stop(): handshakes are rare.
    if (zmq::poll(&item, 1, std::chrono::milliseconds(200)) <= 0) continue;
    request.clear();
    if (!zmq::recv_multipart(*socket_, std::back_inserter(request), zmq::recv_flags::dontwait)) continue;
    std::string code = "400", text = "key not allowed", user;
    std::string_view address = request.size() > 3 ? request[3].to_string_view() : std::string_view();
    if (request.size() == 7 && request[0].to_string_view() == "1.0" && request[5].to_string_view() == "CURVE" &&
        request[6].size() == 32) {
      std::array<char, kCurveKeyZ85Size + 1> z85{};
      zmq_z85_encode(z85.data(), static_cast<const std::uint8_t*>(request[6].data()), 32);
      std::string key(z85.data(), kCurveKeyZ85Size);
      if (allowed_.contains(key)) {
        code = "200";
        text = "OK";
        user = std::move(key);
      } else {
        refused_.fetch_add(1, std::memory_order_relaxed);
        if (std::uint64_t suppressed = 0; refusals.allow(suppressed)) {
          log_.warn("broker: refused a connection from {} with CURVE key {}, which is not allowed ({} more since)",
                    address, key, suppressed);
        }
      }
    } else {
      refused_.fetch_add(1, std::memory_order_relaxed);
      text = "only CURVE is accepted";
    }
    std::array<zmq::const_buffer, 6> reply = {
        zmq::buffer(std::string_view("1.0")),
        zmq::buffer(request.size() > 1 ? request[1].data() : nullptr, request.size() > 1 ? request[1].size() : 0),
        zmq::buffer(code), zmq::buffer(text), zmq::buffer(user), zmq::const_buffer()};
    try {
      zmq::send_multipart(*socket_, reply);
    } catch (const zmq::error_t&) {
      // The requesting connection went away; nothing to answer.
    }
  }
  socket_.reset();
}

}  // namespace gatherer
