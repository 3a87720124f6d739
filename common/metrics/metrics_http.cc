#include "metrics_http.h"

#include <arpa/inet.h>
#include <microhttpd.h>
#include <netinet/in.h>

#include <cstring>

namespace gatherer {

struct MetricsHttpServer::Impl {
  Render render;
  MHD_Daemon* daemon = nullptr;
  std::uint16_t port = 0;

  static MHD_Result Answer(void* cls, MHD_Connection* connection, const char* url, const char* method,
                           const char* /*version*/, const char* /*upload_data*/, size_t* /*upload_size*/,
                           void** /*state*/) {
    auto* self = static_cast<Impl*>(cls);
    std::string body;
    unsigned status = MHD_HTTP_OK;
    const char* type = "text/plain; version=0.0.4; charset=utf-8";
    if (std::strcmp(method, "GET") != 0 && std::strcmp(method, "HEAD") != 0) {
      status = MHD_HTTP_METHOD_NOT_ALLOWED;
      body = "GET /metrics\n";
      type = "text/plain";
    } else if (std::strcmp(url, "/metrics") != 0) {
      status = MHD_HTTP_NOT_FOUND;
      body = "Gatherer metrics are at /metrics\n";
      type = "text/plain";
    } else {
      body = self->render();
    }
    MHD_Response* response = MHD_create_response_from_buffer(body.size(), body.data(), MHD_RESPMEM_MUST_COPY);
    if (!response) return MHD_NO;
    MHD_add_response_header(response, "Content-Type", type);
    const MHD_Result r = MHD_queue_response(connection, status, response);
    MHD_destroy_response(response);
    return r;
  }
};

MetricsHttpServer::MetricsHttpServer(Render render) : impl_(std::make_unique<Impl>()) {
  impl_->render = std::move(render);
}

MetricsHttpServer::~MetricsHttpServer() { stop(); }

Status MetricsHttpServer::start(const std::string& address) {
  const auto colon = address.rfind(':');
  if (colon == std::string::npos) return InvalidArgument("metrics address is not ADDR:PORT: " + address);
  sockaddr_in sa{};
  sa.sin_family = AF_INET;
  const std::string host = address.substr(0, colon);
  if (inet_pton(AF_INET, host.c_str(), &sa.sin_addr) != 1) {
    return InvalidArgument("metrics address is not an IPv4 address: " + host);
  }
  char* end = nullptr;
  const unsigned long port = std::strtoul(address.c_str() + colon + 1, &end, 10);
  if (end == address.c_str() + colon + 1 || *end != '\0' || port > 65535) {
    return InvalidArgument("metrics port is not a number 0..65535: " + address);
  }
  sa.sin_port = htons(static_cast<std::uint16_t>(port));
  impl_->daemon = MHD_start_daemon(MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_ERROR_LOG, 0, nullptr, nullptr,
                                   &Impl::Answer, impl_.get(), MHD_OPTION_SOCK_ADDR, &sa,
                                   MHD_OPTION_CONNECTION_TIMEOUT, 10u, MHD_OPTION_END);
  if (!impl_->daemon) return Unavailable("cannot serve metrics on " + address);
  const MHD_DaemonInfo* info = MHD_get_daemon_info(impl_->daemon, MHD_DAEMON_INFO_BIND_PORT);
  impl_->port = info ? info->port : static_cast<std::uint16_t>(port);
  return Status::Ok();
}

void MetricsHttpServer::stop() {
  if (impl_->daemon) MHD_stop_daemon(impl_->daemon);
  impl_->daemon = nullptr;
}

std::uint16_t MetricsHttpServer::port() const { return impl_->port; }

std::string PromEscape(const std::string& value) {
  std::string out;
  out.reserve(value.size());
  for (char c : value) {
    if (c == '\\') out += "\\\\";
    else if (c == '"') out += "\\\"";
    else if (c == '\n') out += "\\n";
    else out += c;
  }
  return out;
}

}  // namespace gatherer
