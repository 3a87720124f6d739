#include "stats.h"

namespace gatherer::broker_ops {

const char* WorkerStateName(bool draining, std::chrono::milliseconds silent, std::chrono::milliseconds heartbeat,
                            std::uint32_t leased) {
  if (draining) return "draining";
  if (silent > 2 * heartbeat) return "unresponsive";
  return leased > 0 ? "busy" : "idle";
}

std::string PeerHost(const zmq::message_t& frame) {
  // zmq_msg_gets returns NULL (EINVAL) when the transport sets no such property.
  const char* address = zmq_msg_gets(const_cast<zmq_msg_t*>(frame.handle()), "Peer-Address");
  return address ? std::string(address) : std::string("local");
}

const char* Version() { return GATHERER_VERSION; }

}  // namespace gatherer::broker_ops
