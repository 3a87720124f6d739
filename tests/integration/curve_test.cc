// CURVE (PROTOCOL.md §1.7) through the real binaries: a gatherer-broker
// started with a key pair and allow-lists, a gatherer-worker with a listed
// worker key, and clients with listed, unlisted and no keys. What a user and
// an operator check: listed keys fetch everything; an unlisted key and a
// plaintext peer are refused at once with an error that says why; a client
// key cannot act as a worker; another client key cannot touch a session it
// did not open; a broker bound off loopback without CURVE warns.

#include <filesystem>
#include <string>
#include <tuple>
#include <vector>

#include <gtest/gtest.h>
#include <zmq.hpp>

#include "gatherer/curve.h"
#include "gatherer/gatherer.h"
#include "gatherer/log.h"
#include "gatherer/protocol.h"
#include "gatherer/transport.h"
#include "free_port.h"
#include "http_server.h"
#include "process.h"
#include "wait_for.h"

namespace gatherer {
namespace {
namespace proto = protocol;
using namespace std::chrono_literals;
using namespace testing;

const std::string kBin = GATHERER_BIN_DIR;

CurveKeyPair MakeKeys(const std::filesystem::path& prefix) {
  auto pair = GenerateCurveKeyPair();
  EXPECT_TRUE(pair.has_value());
  EXPECT_TRUE(WriteCurveKeyFiles(prefix.string(), *pair).ok());
  return *pair;
}

class CurveTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() / ("gatherer-curve-" + std::to_string(::getpid()) + "-" +
                                                      ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::remove_all(dir_);
    std::filesystem::create_directories(dir_ / "clients");
    broker_ = MakeKeys(dir_ / "broker");
    client_ = MakeKeys(dir_ / "clients" / "client");
    second_ = MakeKeys(dir_ / "clients" / "second");
    worker_ = MakeKeys(dir_ / "worker");
    operator_ = MakeKeys(dir_ / "operator");
    stranger_ = MakeKeys(dir_ / "stranger");
    endpoint_ = testing::FreeTcpEndpoint();
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  std::unique_ptr<Process> StartBroker() {
    return std::make_unique<Process>(std::vector<std::string>{
        kBin + "/broker/gatherer-broker", "--bind", endpoint_, "--curve-key", (dir_ / "broker.key").string(),
        "--curve-clients", (dir_ / "clients").string(), "--curve-workers", (dir_ / "worker.pub").string(),
        "--curve-operators", (dir_ / "operator.pub").string(),
        "--log-level", "warning"});
  }
  std::unique_ptr<Process> StartWorker() {
    return std::make_unique<Process>(std::vector<std::string>{
        kBin + "/worker/gatherer-worker", "--broker", endpoint_, "--curve-broker-key", (dir_ / "broker.pub").string(),
        "--curve-key", (dir_ / "worker.key").string(), "--io-threads", "1", "--log-level",
        "warning"});
  }
  Options ClientOptions(const CurveKeyPair& own) const {
    Options o;
    o.broker = endpoint_;
    o.workers = 16;
    o.log_level = 40;
    o.broker_timeout = 30s;
    o.curve_broker_key = broker_.public_key;
    o.curve_public_key = own.public_key;
    o.curve_secret_key = own.secret_key;
    return o;
  }
  // A raw DEALER speaking CURVE with `own` keys, connected to the broker.
  zmq::socket_t RawPeer(const CurveKeyPair& own) {
    zmq::socket_t s(ctx_, zmq::socket_type::dealer);
    proto::ConfigureSocket(s);
    MakeCurveClient(s, own, broker_.public_key);
    s.connect(endpoint_);
    return s;
  }
  // The next message on `s` within 10 s.
  static proto::Frames Receive(zmq::socket_t& s) {
    proto::Frames frames;
    const auto deadline = Clock::now() + 10s;
    while (Clock::now() < deadline) {
      zmq::pollitem_t item{s.handle(), 0, ZMQ_POLLIN, 0};
      zmq::poll(&item, 1, 100ms);
      if (proto::ReceiveMessage(s, frames)) return frames;
    }
    return {};
  }
  // Sends `frames` and expects ERROR permission_denied.
  static void ExpectDenied(zmq::socket_t& s, proto::Frames frames, const char* what) {
    ASSERT_EQ(proto::SendMessage(s, {}, frames, /*block=*/true), proto::SendResult::kSent) << what;
    proto::Frames reply = Receive(s);
    auto error = proto::DecodeError(reply);
    ASSERT_TRUE(error.has_value()) << what << ": no ERROR";
    EXPECT_EQ(error->code, StatusCode::kPermissionDenied) << what << ": " << error->message;
  }

  std::filesystem::path dir_;
  CurveKeyPair broker_, client_, second_, worker_, stranger_, operator_;
  std::string endpoint_;
  zmq::context_t ctx_;
};

TEST_F(CurveTest, ListedKeysFetchEverythingEncrypted) {
  HttpServer server;
  auto broker = StartBroker();
  auto worker = StartWorker();
  Gatherer g(ClientOptions(client_));
  for (int i = 0; i < 200; ++i) g.statements.push_back(Statement{.url = server.url("/s/" + std::to_string(i))});
  g.gather();
  ASSERT_EQ(g.responses.size(), 200u);
  for (int i = 0; i < 200; ++i) {
    EXPECT_EQ(g.responses[i].status, 200) << i;
    EXPECT_EQ(g.responses[i].body, "ok:/s/" + std::to_string(i));
  }
  EXPECT_EQ(server.requests(), 200u);
}

TEST_F(CurveTest, UnlistedClientKeyIsRefusedAtOnceSayingWhy) {
  HttpServer server;
  auto broker = StartBroker();
  auto worker = StartWorker();
  Gatherer g(ClientOptions(stranger_));
  g.statements.push_back(Statement{.url = server.url("/s/0")});
  const auto t0 = Clock::now();
  try {
    g.gather();
    FAIL() << "an unlisted key was served";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), StatusCode::kPermissionDenied) << e.what();
    EXPECT_NE(std::string(e.what()).find("allow-list"), std::string::npos) << e.what();
  }
  EXPECT_LT(Clock::now() - t0, 10s) << "refusal waited like an outage";
  EXPECT_EQ(server.requests(), 0u);
}

TEST_F(CurveTest, PlaintextClientIsRefusedSayingWhy) {
  HttpServer server;
  auto broker = StartBroker();
  auto worker = StartWorker();
  Options o;
  o.broker = endpoint_;
  o.log_level = 40;
  o.broker_timeout = 30s;
  Gatherer g(o);
  g.statements.push_back(Statement{.url = server.url("/s/0")});
  const auto t0 = Clock::now();
  try {
    g.gather();
    FAIL() << "a plaintext client was served by a CURVE broker";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), StatusCode::kPermissionDenied) << e.what();
    EXPECT_NE(std::string(e.what()).find("CURVE"), std::string::npos) << e.what();
  }
  EXPECT_LT(Clock::now() - t0, 20s) << "refusal waited out the broker timeout";
  EXPECT_EQ(server.requests(), 0u);
}

TEST_F(CurveTest, AClientKeyCannotRegisterAsAWorkerNorAWorkerKeyOpenASession) {
  auto broker = StartBroker();
  zmq::socket_t as_worker = RawPeer(client_);
  ExpectDenied(as_worker, proto::Encode(proto::Ready{"impostor", "h", 10}), "READY from a client key");
  zmq::socket_t as_client = RawPeer(worker_);
  ExpectDenied(as_client, proto::Encode(proto::Open{NewSessionId(), SessionSettings{}, 0}), "OPEN from a worker key");
}

TEST_F(CurveTest, AnotherClientKeyCannotTouchASessionItDidNotOpen) {
  HttpServer server;
  auto broker = StartBroker();
  auto worker = StartWorker();
  const SessionId session = NewSessionId();
  zmq::socket_t owner = RawPeer(client_);
  proto::Frames open = proto::Encode(proto::Open{session, SessionSettings{}, 0});
  ASSERT_EQ(proto::SendMessage(owner, {}, open, true), proto::SendResult::kSent);
  ASSERT_TRUE(proto::DecodeOpened(Receive(owner)).has_value());

  // The session id leaked: the second listed client key tries everything.
  zmq::socket_t other = RawPeer(second_);
  const Statement s{.url = server.url("/stolen")};
  ExpectDenied(other, proto::EncodeHeartbeat(session), "HEARTBEAT");
  ExpectDenied(other, proto::EncodeSubmit(session, 0, std::span<const Statement>(&s, 1)), "SUBMIT");
  ExpectDenied(other, proto::Encode(proto::Ack{session, 1}), "ACK");
  ExpectDenied(other, proto::Encode(proto::Sync{session, 0, {}}), "SYNC");
  ExpectDenied(other, proto::Encode(proto::Command::kCancel, proto::SessionRef{session}), "CANCEL");
  ExpectDenied(other, proto::Encode(proto::Open{session, SessionSettings{}, 0}), "OPEN of the same session");
  ExpectDenied(other, proto::Encode(proto::Command::kClose, proto::SessionRef{session}), "CLOSE");
  EXPECT_EQ(server.requests(), 0u);

  // The owner's session is whole and still works.
  const Statement mine{.url = server.url("/mine")};
  proto::Frames submit = proto::EncodeSubmit(session, 0, std::span<const Statement>(&mine, 1));
  ASSERT_EQ(proto::SendMessage(owner, {}, submit, true), proto::SendResult::kSent);
  std::optional<proto::Results> results;
  for (int i = 0; i < 10 && !results; ++i) {
    proto::Frames m = Receive(owner);
    if (auto command = proto::PeekCommand(m); command && *command == proto::Command::kResults) {
      results = *proto::DecodeResults(m);
    }
  }
  ASSERT_TRUE(results.has_value());
  ASSERT_EQ(results->results.size(), 1u);
  EXPECT_EQ(results->results[0].response.body, "ok:/mine");
  EXPECT_EQ(server.requests(), 1u);
}

// §1.7, §3.9: with CURVE only an operator key may steer the broker; a client
// key, listed as it is, cannot shut it down or read its sessions.
TEST_F(CurveTest, OnlyAnOperatorKeyMayUseGathererCtl) {
  auto broker = StartBroker();
  auto worker = StartWorker();
  const auto ctl = [&](const std::string& key, const std::string& command) {
    Process p({kBin + "/ctl/gatherer-ctl", "--broker", endpoint_, "--curve-broker-key", (dir_ / "broker.pub").string(),
               "--curve-key", key, "--timeout", "5000", command});
    const auto rc = p.wait(20s);
    return std::make_pair(rc.value_or(-1), p.stdout_text() + p.stderr_text());
  };
  int rc = -1;
  std::string out;
  // The worker registers within moments; until then the table is empty.
  EXPECT_TRUE(testing::WaitFor([&] {
    std::tie(rc, out) = ctl((dir_ / "operator.key").string(), "workers");
    return rc == 0 && out.find("idle") != std::string::npos;
  }, 20s)) << rc << ": " << out;
  std::tie(rc, out) = ctl((dir_ / "clients" / "client.key").string(), "shutdown");
  EXPECT_EQ(rc, 1) << out;
  EXPECT_NE(out.find("permission_denied"), std::string::npos) << out;
  EXPECT_TRUE(broker->running()) << "a client key shut the broker down";
}

// §1.7: with CURVE a client's route is not derived from its session id.
TEST_F(CurveTest, AClientRoutingIdIsRandomNotItsSessionId) {
  ZapHandler zap(ctx_, {client_.public_key}, Logger());
  ASSERT_TRUE(zap.start().ok());
  zmq::socket_t router(ctx_, zmq::socket_type::router);
  router.set(zmq::sockopt::linger, 0);
  MakeCurveServer(router, broker_);
  router.bind(endpoint_);
  Options o = ClientOptions(client_);
  o.connect_timeout = 100ms;  // nobody answers its CLOSE
  Gatherer g(o);  // sends OPEN at once
  proto::Frames frames = Receive(router);
  ASSERT_GE(frames.size(), 2u);
  const std::string peer = frames[0].to_string();
  EXPECT_EQ(PeerCurveKey(frames[1]), client_.public_key);
  auto open = proto::DecodeOpen(std::span<const zmq::message_t>(frames.data() + 1, frames.size() - 1));
  ASSERT_TRUE(open.has_value());
  ASSERT_EQ(peer.size(), 17u);
  EXPECT_EQ(peer[0], 'c');
  EXPECT_NE(peer.substr(1), std::string(open->session.raw()));
}

TEST_F(CurveTest, APlaintextBrokerBoundOffLoopbackWarnsAndALoopbackOneDoesNot) {
  const std::string port = endpoint_.substr(endpoint_.rfind(':') + 1);
  for (const std::string& bind : {"tcp://0.0.0.0:" + port, endpoint_}) {
    Process broker({kBin + "/broker/gatherer-broker", "--bind", bind, "--log-level", "info"});
    ASSERT_TRUE(testing::WaitFor([&] { return broker.stderr_text().find("listening") != std::string::npos; }, 10s));
    broker.kill(SIGTERM);
    ASSERT_TRUE(broker.wait(10s).has_value());
    const bool warned = broker.stderr_text().find("CURVE is off") != std::string::npos;
    EXPECT_EQ(warned, bind != endpoint_) << bind << ": " << broker.stderr_text();
  }
}

}  // namespace
}  // namespace gatherer

namespace gatherer {
namespace {

// compose.yml configures the binaries through GATHERER_* variables: they are
// read, and a flag on the command line wins over them.
TEST(DeploymentTest, EnvironmentVariablesSetWhatFlagsDoAndAFlagWins) {
  const std::string env_ep = testing::FreeTcpEndpoint(), flag_ep = testing::FreeTcpEndpoint();
  Process from_env({"/usr/bin/env", "GATHERER_BIND=" + env_ep, "GATHERER_LOG_LEVEL=info",
                    kBin + "/broker/gatherer-broker"});
  Process flag_wins({"/usr/bin/env", "GATHERER_BIND=" + env_ep, "GATHERER_LOG_LEVEL=info",
                     kBin + "/broker/gatherer-broker", "--bind", flag_ep});
  for (Process* p : {&from_env, &flag_wins}) {
    ASSERT_TRUE(testing::WaitFor([&] { return p->stderr_text().find("listening") != std::string::npos; }, 10s))
        << p->stderr_text();
  }
  EXPECT_NE(from_env.stderr_text().find("listening on " + env_ep), std::string::npos) << from_env.stderr_text();
  EXPECT_NE(flag_wins.stderr_text().find("listening on " + flag_ep), std::string::npos) << flag_wins.stderr_text();
  // A worker finds its broker through GATHERER_BROKER.
  Process worker({"/usr/bin/env", "GATHERER_BROKER=" + env_ep, "GATHERER_LOG_LEVEL=info",
                  kBin + "/worker/gatherer-worker"});
  EXPECT_TRUE(testing::WaitFor([&] { return from_env.stderr_text().find("ready with") != std::string::npos; }, 10s))
      << from_env.stderr_text();
}

}  // namespace
}  // namespace gatherer

namespace gatherer {
namespace {

// The guard through the real binaries: a worker started with
// --refuse-destinations answers a statement redirected to the cloud metadata
// address with permission_denied, and the statement next to it is served.
TEST(DeploymentTest, AGuardedWorkerRefusesARedirectToTheMetadataAddress) {
  HttpServer server([](const testing::HttpRequest& request) {
    if (request.target == "/metadata") {
      return testing::HttpReply{302, {{"Location", "http://169.254.169.254/latest/meta-data/iam/"}}, ""};
    }
    return testing::HttpReply{200, {}, "fine"};
  });
  const std::string ep = testing::FreeTcpEndpoint();
  Process broker({kBin + "/broker/gatherer-broker", "--bind", ep, "--log-level", "warning"});
  Process worker({kBin + "/worker/gatherer-worker", "--broker", ep, "--refuse-destinations", "link-local,private",
                  "--io-threads", "1", "--log-level", "warning"});
  Options o;
  o.broker = ep;
  o.log_level = 40;
  Gatherer g(o);
  g.statements = {Statement{.url = server.url("/metadata")}, Statement{.url = server.url("/other")}};
  g.gather();
  ASSERT_EQ(g.responses.size(), 2u);
  ASSERT_TRUE(g.responses[0].error.has_value());
  EXPECT_EQ(g.responses[0].error->code, StatusCode::kPermissionDenied);
  EXPECT_NE(g.responses[0].error->message.find("169.254.169.254 is link-local"), std::string::npos)
      << g.responses[0].error->message;
  EXPECT_EQ(g.responses[1].body, "fine");
  Process bad({kBin + "/worker/gatherer-worker", "--refuse-destinations", "intranet"});
  ASSERT_EQ(bad.wait(10s), std::optional<int>(2));
  EXPECT_NE(bad.stderr_text().find("intranet"), std::string::npos) << bad.stderr_text();
}

// --source-address takes an IP address of this host and nothing else: a host
// name is a usage error at start, before the worker connects anywhere.
TEST(DeploymentTest, AWorkerRefusesASourceAddressThatIsNotAnIpAddress) {
  Process bad({kBin + "/worker/gatherer-worker", "--source-address", "localhost", "--log-level", "warning"});
  ASSERT_EQ(bad.wait(10s), std::optional<int>(2));
  EXPECT_NE(bad.stderr_text().find("--source-address: source address 'localhost' is not an IPv4 or IPv6 address"),
            std::string::npos)
      << bad.stderr_text();
}

}  // namespace
}  // namespace gatherer
