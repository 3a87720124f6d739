#pragma once
// CURVE security for Gatherer's sockets (PROTOCOL.md §1.7): key pairs in
// ZeroMQ's Z85 text form, key files, allow-lists, and the ZAP handler through
// which the broker admits only listed keys.
//
// Key files use ZeroMQ's certificate layout, so keys made by other ZeroMQ
// tools can be used too. A key pair file (secret: mode 0600):
//
//     # Gatherer CURVE key pair: keep this file secret
//     curve
//         public-key = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"
//         secret-key = "JTKVSB%%)wK0E.X)V>+}o?pNmC{O&4W4b!Ni{Lh6"
//
// and its public half (safe to copy to peers) without the secret-key line.
//
// Thread-safety: the free functions are; a ZapHandler is owned by one thread
// and runs its own.

#include <atomic>
#include <memory>
#include <string>
#include <string_view>
#include <thread>
#include <unordered_set>

#include "gatherer/status.h"

namespace spdlog {
class logger;
}
namespace zmq {
class context_t;
class message_t;
class socket_t;
}

namespace gatherer {

// A CURVE key is 32 bytes, 40 characters in Z85.
inline constexpr std::size_t kCurveKeyZ85Size = 40;

struct CurveKeyPair {
  std::string public_key;  // Z85
  std::string secret_key;  // Z85; empty for a public key alone
};

// A fresh key pair (libsodium through libzmq). Unavailable when libzmq was
// built without CURVE.
Result<CurveKeyPair> GenerateCurveKeyPair();

// True when `key` is 40 valid Z85 characters.
bool IsCurveKey(std::string_view key);

// Reads a key pair file (both lines required). The error names the file.
Result<CurveKeyPair> ReadCurveKeyPair(const std::string& path);

// A public key given as 40 Z85 characters, or as the path of a key file
// (a public one or a pair: only its public-key is taken).
Result<std::string> ReadCurvePublicKey(const std::string& key_or_path);

// What a connecting peer (client, worker, gatherer-ctl) needs for CURVE,
// read from its --curve-broker-key (a key or a key file) and --curve-key (its
// key pair file). Both empty: CURVE off (an empty broker key). One without
// the other, or either unreadable: invalid_argument saying which.
struct CurveClientKeys {
  std::string broker_public_key;  // empty: plaintext
  CurveKeyPair own;
};
Result<CurveClientKeys> ReadCurveClientKeys(const std::string& broker_key, const std::string& key_file);

// Public keys allowed to connect: a file with one key per line (bare Z85 or
// `public-key = "..."`; `#` starts a comment), or a directory whose every
// regular file is a key file. An empty list is an error: it would admit no
// one, which is never what was meant.
Result<std::unordered_set<std::string>> ReadCurveAllowList(const std::string& path);

// Writes `<prefix>.key` (the pair, mode 0600) and `<prefix>.pub` (the public
// key). Refuses to overwrite an existing file.
Status WriteCurveKeyFiles(const std::string& prefix, const CurveKeyPair& pair);

// Socket set-up, before bind or connect.
void MakeCurveServer(zmq::socket_t& socket, const CurveKeyPair& own);
void MakeCurveClient(zmq::socket_t& socket, const CurveKeyPair& own, const std::string& server_public_key);

// The Z85 public key that the ZAP handler admitted for the connection a
// message came in on; empty when the socket does not use CURVE.
std::string_view PeerCurveKey(const zmq::message_t& frame);

// Answers ZeroMQ's authentication requests (ZAP, RFC 27) for every CURVE
// server socket of `context`: a client key in `allowed` is admitted with
// its Z85 form as User-Id (PeerCurveKey); any other is refused, and the
// refusal logged (rate-limited by the caller's logger level). Bound to
// inproc://zeromq.zap.01, so at most one per context, and it must be
// started before the server socket binds.
class ZapHandler {
 public:
  // `log`: where refusals are logged (at most one line a second).
  ZapHandler(zmq::context_t& context, std::unordered_set<std::string> allowed, spdlog::logger& log);
  ~ZapHandler();  // stops the thread
  ZapHandler(const ZapHandler&) = delete;
  ZapHandler& operator=(const ZapHandler&) = delete;

  // Binds and starts answering. Unavailable if another handler is bound.
  [[nodiscard]] Status start();
  std::uint64_t refused() const { return refused_.load(std::memory_order_relaxed); }

 private:
  void run();

  zmq::context_t& context_;
  const std::unordered_set<std::string> allowed_;
  spdlog::logger& log_;
  std::unique_ptr<zmq::socket_t> socket_;
  std::atomic<bool> stopping_{false};
  std::atomic<std::uint64_t> refused_{0};
  std::thread thread_;
};

}  // namespace gatherer
