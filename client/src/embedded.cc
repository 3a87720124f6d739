#include "embedded.h"

#include "gatherer/broker.h"
#include "gatherer/event_loop.h"
#include "gatherer/gatherer.h"
#include "gatherer/worker.h"

namespace gatherer {
namespace {

class InProcessCluster final : public EmbeddedCluster {
 public:
  InProcessCluster(zmq::context_t& context, const std::string& endpoint, std::shared_ptr<spdlog::logger> logger,
                   unsigned io_threads) {
    BrokerOptions bo;
    bo.endpoints = {endpoint};
    bo.context = &context;
    bo.logger = logger;
    bo.own_thread = false;
    broker_ = std::make_unique<Broker>(bo);
    if (Status s = broker_->start(); !s.ok()) throw Error("embedded broker: " + s.ToString(), -1, s.code());
    WorkerOptions wo;
    wo.broker = endpoint;
    wo.context = &context;
    wo.logger = std::move(logger);
    wo.io_threads = io_threads;
    wo.warn_insecure_sessions = false;  // the Gatherer warns
    wo.own_thread = false;
    worker_ = std::make_unique<Worker>(wo);
    if (Status s = worker_->start(); !s.ok()) {
      broker_->stop();
      throw Error("embedded worker: " + s.ToString(), -1, s.code());
    }
    // The worker first: its results reach the broker, and the broker's
    // answers the client, within one pass.
    driver_ = std::make_unique<LoopDriver>(std::vector<LoopPart*>{&worker_->loop(), &broker_->loop()});
    driver_->start();
  }
  ~InProcessCluster() override {
    driver_->stop();
    worker_->stop();
    broker_->stop();
  }
  LoopDriver& driver() override { return *driver_; }

 private:
  std::unique_ptr<Broker> broker_;
  std::unique_ptr<Worker> worker_;
  std::unique_ptr<LoopDriver> driver_;
};

}  // namespace

std::unique_ptr<EmbeddedCluster> StartEmbeddedCluster(zmq::context_t& context, const std::string& endpoint,
                                                      std::shared_ptr<spdlog::logger> logger, unsigned io_threads) {
  return std::make_unique<InProcessCluster>(context, endpoint, std::move(logger), io_threads);
}

}  // namespace gatherer
