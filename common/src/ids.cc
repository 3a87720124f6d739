#include "gatherer/ids.h"

#include <unistd.h>
#include <uuid/uuid.h>

#include <atomic>
#include <cstdio>

namespace gatherer {

std::string SessionId::ToString() const {
  char text[37];
  uuid_unparse_lower(bytes.data(), text);
  return std::string(text, 36);
}

SessionId NewSessionId() {
  SessionId id;
  uuid_generate_random(id.bytes.data());
  return id;
}

Result<SessionId> ParseSessionId(std::string_view text) {
  if (text.size() != 36) return Unexpected(InvalidArgument("session id must be 36 characters"));
  char buf[37];
  std::memcpy(buf, text.data(), 36);
  buf[36] = '\0';
  SessionId id;
  if (uuid_parse(buf, id.bytes.data()) != 0) return Unexpected(InvalidArgument("session id is not a uuid"));
  return id;
}

Result<SessionId> SessionIdFromRaw(std::string_view raw) {
  if (raw.size() != 16) return Unexpected(InvalidArgument("session id must be 16 bytes"));
  SessionId id;
  std::memcpy(id.bytes.data(), raw.data(), 16);
  return id;
}

std::string NewWorkerId() {
  static std::atomic<unsigned> counter{0};
  char host[64] = {};
  if (gethostname(host, sizeof(host) - 1) != 0) std::snprintf(host, sizeof(host), "host");
  return std::string(host) + "-" + std::to_string(getpid()) + "-" + std::to_string(counter++);
}

}  // namespace gatherer
