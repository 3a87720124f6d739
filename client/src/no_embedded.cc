#include "embedded.h"
#include "gatherer/gatherer.h"

namespace gatherer {

std::unique_ptr<EmbeddedCluster> StartEmbeddedCluster(zmq::context_t&, const std::string&,
                                                      std::shared_ptr<spdlog::logger>, unsigned) {
  throw Error(
      "no broker given, and this program is linked with gatherer::remote, which has no embedded mode: set "
      "Options::broker to a gatherer-broker endpoint, or link gatherer::client for the embedded broker and worker",
      -1, StatusCode::kFailedPrecondition);
}

}  // namespace gatherer
