// HTTPS with the session's TLS settings, against Debian's nginx on 127.0.0.1
// with a CA and certificates this test makes (openssl): a CA given as a file
// or a directory, a server the system store does not know, a wrong CA, the
// insecure switch, a server asking for a client certificate, and a proxy.
// Everything is checked as a user would: the responses, or the error at
// each statement's index, or the Error before anything is sent.

#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "free_port.h"
#include "gatherer/gatherer.h"
#include "http_server.h"
#include "process.h"
#include "wait_for.h"

namespace gatherer::testing {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;

std::string NginxBinary() {
  for (const char* path : {"/usr/sbin/nginx", "/usr/bin/nginx"}) {
    if (::access(path, X_OK) == 0) return path;
  }
  return {};
}

void Write(const fs::path& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary);
  out << text;
}

bool PortAccepts(std::uint16_t port) {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(port);
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  const bool ok = ::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0;
  ::close(fd);
  return ok;
}

// The certificates and an nginx serving https on two ports: `open_port`
// for anyone, `mtls_port` only for a client certificate signed by the CA.
// Every answer is "ok <TLS version> <HTTP version>".
class TlsTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    nginx_ = NginxBinary();
    if (nginx_.empty()) return;
    dir_ = fs::temp_directory_path() / ("gatherer-tls-" + std::to_string(::getpid()));
    fs::remove_all(dir_);
    fs::create_directories(dir_ / "cas");
    const std::string d = dir_.string();
    Write(dir_ / "server.ext", "subjectAltName=IP:127.0.0.1,DNS:localhost\n");
    // Two CAs, the server's and the client's certificates signed by the first.
    const std::vector<std::string> steps = {
        "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=gatherer-test-ca "
        "-keyout " + d + "/ca.key -out " + d + "/ca.pem",
        "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=another-ca "
        "-keyout " + d + "/wrong-ca.key -out " + d + "/wrong-ca.pem",
        "openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=127.0.0.1 -keyout " + d +
            "/server.key -out " + d + "/server.csr",
        "openssl x509 -req -in " + d + "/server.csr -CA " + d + "/ca.pem -CAkey " + d + "/ca.key -CAcreateserial "
        "-days 2 -extfile " + d + "/server.ext -out " + d + "/server.pem",
        "openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=gatherer-client -keyout " + d +
            "/client.key -out " + d + "/client.csr",
        "openssl x509 -req -in " + d + "/client.csr -CA " + d + "/ca.pem -CAkey " + d + "/ca.key -CAcreateserial "
        "-days 2 -out " + d + "/client.pem",
    };
    for (const auto& step : steps) {
      if (std::system((step + " >/dev/null 2>&1").c_str()) != 0) {
        setup_error_ = "failed: " + step;
        return;
      }
    }
    // A CA directory: the CA beside a file that is not a certificate.
    fs::copy_file(dir_ / "ca.pem", dir_ / "cas" / "ca.pem");
    Write(dir_ / "cas" / "README", "not a certificate\n");
    open_port_ = FreeTcpPort();
    mtls_port_ = FreeTcpPort();
    const std::string server_tls = "    ssl_certificate " + d + "/server.pem;\n    ssl_certificate_key " + d +
                                   "/server.key;\n    ssl_protocols TLSv1.3;\n";
    Write(dir_ / "nginx.conf",
          "master_process off;\ndaemon off;\nworker_processes 1;\npid " + d + "/nginx.pid;\nerror_log " + d +
              "/error.log;\nevents {}\nhttp {\n  access_log off;\n  client_body_temp_path " + d + ";\n"
              "  default_type text/plain;\n"
              "  server {\n    listen 127.0.0.1:" + std::to_string(open_port_) + " ssl http2;\n" + server_tls +
              "    location / { return 200 \"ok $ssl_protocol $server_protocol\"; }\n  }\n"
              "  server {\n    listen 127.0.0.1:" + std::to_string(mtls_port_) + " ssl http2;\n" + server_tls +
              "    ssl_client_certificate " + d + "/ca.pem;\n    ssl_verify_client on;\n"
              "    location / { return 200 \"ok $ssl_protocol $server_protocol\"; }\n  }\n}\n");
    server_ = new Process({nginx_, "-p", d + "/", "-c", d + "/nginx.conf", "-e", d + "/error.log"});
    if (!WaitFor([] { return PortAccepts(open_port_) && PortAccepts(mtls_port_); }, 10s)) {
      setup_error_ = "nginx did not start: " + server_->stderr_text();
    }
  }
  static void TearDownTestSuite() {
    delete server_;
    server_ = nullptr;
    if (!dir_.empty()) fs::remove_all(dir_);
  }
  void SetUp() override {
    // CI installs nginx (.ci/install-deps); elsewhere the suite says why it skips.
    if (nginx_.empty()) GTEST_SKIP() << "nginx is not installed (apt-get install nginx-light)";
    ASSERT_TRUE(setup_error_.empty()) << setup_error_;
  }

  static std::string Url(std::uint16_t port, const std::string& path, const char* host = "127.0.0.1") {
    return "https://" + std::string(host) + ":" + std::to_string(port) + path;
  }
  static std::vector<Statement> Gets(std::uint16_t port, int n) {
    std::vector<Statement> out;
    for (int i = 0; i < n; ++i) out.push_back(Get(Url(port, "/s/" + std::to_string(i), i % 2 ? "localhost" : "127.0.0.1")));
    return out;
  }
  static Options Quiet() {
    Options o;
    o.workers = 8;
    o.log_level = 50;
    o.settings.max_attempts = 1;
    return o;
  }
  static std::vector<Response> Run(Options options, std::vector<Statement> statements) {
    Gatherer g(std::move(options));
    g.statements = std::move(statements);
    return g.gather();
  }
  static std::string Path(const char* name) { return (dir_ / name).string(); }

  static inline std::string nginx_;
  static inline fs::path dir_;
  static inline std::string setup_error_;
  static inline std::uint16_t open_port_ = 0;
  static inline std::uint16_t mtls_port_ = 0;
  static inline Process* server_ = nullptr;
};

TEST_F(TlsTest, ACaFileVerifiesTheServerOverTls13AndHttp2) {
  Options o = Quiet();
  o.cacert = Path("ca.pem");
  const auto responses = Run(o, Gets(open_port_, 20));
  ASSERT_EQ(responses.size(), 20u);
  for (const auto& r : responses) {
    ASSERT_TRUE(r.ok()) << r.error->message;
    EXPECT_EQ(r.body, "ok TLSv1.3 HTTP/2.0");
  }
}

TEST_F(TlsTest, ACaDirectoryVerifiesTheServer) {
  Options o = Quiet();
  o.cacert = (dir_ / "cas").string();
  const auto responses = Run(o, Gets(open_port_, 4));
  for (const auto& r : responses) EXPECT_TRUE(r.ok()) << r.error->message;
}

TEST_F(TlsTest, AServerTheTrustedCasDoNotKnowFailsWithATlsErrorAtItsIndex) {
  for (const std::string ca : {"", "wrong-ca.pem"}) {
    Options o = Quiet();
    if (!ca.empty()) o.cacert = Path(ca.c_str());
    const auto responses = Run(o, Gets(open_port_, 3));
    ASSERT_EQ(responses.size(), 3u);
    for (const auto& r : responses) {
      ASSERT_FALSE(r.ok()) << "trusted a server signed by an unknown CA (cacert '" << ca << "')";
      EXPECT_EQ(r.error->code, StatusCode::kFailedPrecondition) << r.error->message;
      EXPECT_NE(r.error->message.find("certificate"), std::string::npos) << r.error->message;
    }
  }
}

TEST_F(TlsTest, InsecureSkipsVerification) {
  Options o = Quiet();
  o.settings.tls_insecure = true;
  const auto responses = Run(o, Gets(open_port_, 4));
  for (const auto& r : responses) EXPECT_TRUE(r.ok()) << r.error->message;
}

TEST_F(TlsTest, AClientCertificateForAServerThatAsksForOne) {
  Options without = Quiet();
  without.cacert = Path("ca.pem");
  const auto refused = Run(without, Gets(mtls_port_, 2));
  for (const auto& r : refused) {
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status, 400) << "nginx: no required SSL certificate was sent";
  }
  Options with = without;
  with.cert = Path("client.pem");
  with.key = Path("client.key");
  const auto responses = Run(with, Gets(mtls_port_, 6));
  for (const auto& r : responses) {
    ASSERT_TRUE(r.ok()) << (r.error ? r.error->message : "status " + std::to_string(r.status));
    EXPECT_EQ(r.body, "ok TLSv1.3 HTTP/2.0");
  }
}

TEST_F(TlsTest, BadTlsFilesAndProxiesAreRefusedBeforeAnythingIsSent) {
  auto refused = [](Options o) -> std::string {
    try {
      Gatherer g(std::move(o));
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), StatusCode::kInvalidArgument) << e.what();
      return e.what();
    }
    return "accepted";
  };
  Options o = Quiet();
  o.cacert = Path("no-such.pem");
  EXPECT_NE(refused(o).find("no-such.pem"), std::string::npos);
  o = Quiet();
  o.cacert = Path("server.key");
  EXPECT_NE(refused(o).find("holds no PEM certificate"), std::string::npos);
  o = Quiet();
  o.cert = Path("client.pem");
  EXPECT_NE(refused(o).find("needs its key"), std::string::npos);
  o.key = Path("client.pem");
  EXPECT_NE(refused(o).find("no PEM private key"), std::string::npos);
  o = Quiet();
  o.settings.proxy = "ftp://127.0.0.1:21";
  EXPECT_NE(refused(o).find("not a proxy URL"), std::string::npos);
}

// An HTTP proxy receives the absolute URL; no_proxy sends a host past it.
TEST(ProxyTest, StatementsGoThroughTheSessionsProxyExceptNoProxyHosts) {
  std::vector<std::string> seen;
  std::mutex mu;
  HttpServer proxy([&](const HttpRequest& req) {
    std::lock_guard lock(mu);
    seen.push_back(req.target);
    HttpReply reply;
    reply.body = "via proxy";
    return reply;
  });
  HttpServer direct;
  Options o;
  o.log_level = 50;
  o.settings.max_attempts = 1;
  o.settings.proxy = "http://127.0.0.1:" + std::to_string(proxy.port());
  o.settings.no_proxy = "127.0.0.1";
  Gatherer g(o);
  // gatherer.invalid never resolves (RFC 6761): only the proxy can answer it.
  g.statements = {Get("http://gatherer.invalid/a"), Get(direct.url("/b"))};
  const auto& responses = g.gather();
  ASSERT_TRUE(responses[0].ok()) << responses[0].error->message;
  EXPECT_EQ(responses[0].body, "via proxy");
  ASSERT_TRUE(responses[1].ok()) << responses[1].error->message;
  EXPECT_EQ(responses[1].body, "ok:/b");
  std::lock_guard lock(mu);
  EXPECT_EQ(seen, std::vector<std::string>{"http://gatherer.invalid/a"});
}

}  // namespace
}  // namespace gatherer::testing
