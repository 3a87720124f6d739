#include "tls_settings.h"

#include <algorithm>
#include <array>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string_view>
#include <system_error>
#include <tuple>
#include <vector>

namespace gatherer::client {
namespace {

constexpr std::string_view kCertificate = "-----BEGIN CERTIFICATE-----";
// Files bigger than this are not certificates (the whole system store is
// about 200 KB).
constexpr std::uintmax_t kMaxPemFile = 16ull << 20;

enum class Pem { kCertificate, kPrivateKey };

// Ok when `pem` holds the kind of PEM block asked for; else InvalidArgument
// naming `source` (a file, or a setting).
Status ExpectPem(std::string_view pem, Pem kind, const std::string& source) {
  if (kind == Pem::kCertificate) {
    if (pem.find(kCertificate) != std::string_view::npos) return Status::Ok();
    return InvalidArgument(source + " holds no PEM certificate (" + std::string(kCertificate) + ")");
  }
  if (pem.find("-----BEGIN ") != std::string_view::npos && pem.find("PRIVATE KEY-----") != std::string_view::npos) {
    return Status::Ok();
  }
  return InvalidArgument(source + " holds no PEM private key");
}

Status ReadFile(const std::filesystem::path& path, const char* what, std::string& out) {
  std::error_code ec;
  const auto size = std::filesystem::file_size(path, ec);
  if (ec) return InvalidArgument(std::string(what) + " " + path.string() + ": " + ec.message());
  if (size > kMaxPemFile) {
    return InvalidArgument(std::string(what) + " " + path.string() + " is " + std::to_string(size) +
                           " bytes: not a PEM file");
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) return InvalidArgument(std::string(what) + " " + path.string() + ": cannot be read");
  out.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  return Status::Ok();
}

Status ReadCa(const std::string& where, std::string& pem) {
  std::error_code ec;
  if (!std::filesystem::is_directory(where, ec)) {
    if (Status s = ReadFile(where, "cacert", pem); !s.ok()) return s;
    return ExpectPem(pem, Pem::kCertificate, "cacert " + where);
  }
  // A directory (like /etc/ssl/certs): every regular file that holds a
  // certificate, in name order so every run sends the same text.
  std::vector<std::filesystem::path> files;
  for (const auto& entry : std::filesystem::directory_iterator(where, ec)) {
    std::error_code kind;
    if (entry.is_regular_file(kind)) files.push_back(entry.path());
  }
  if (ec) return InvalidArgument("cacert " + where + ": " + ec.message());
  std::sort(files.begin(), files.end());
  for (const auto& file : files) {
    std::string text;
    if (!ReadFile(file, "cacert", text).ok() || text.find(kCertificate) == std::string::npos) continue;
    pem += text;
    if (pem.back() != '\n') pem += '\n';
  }
  if (pem.empty()) return InvalidArgument("cacert " + where + ": no file in the directory holds a PEM certificate");
  return Status::Ok();
}

bool Printable(std::string_view text) {
  return std::all_of(text.begin(), text.end(), [](char c) { return c > ' ' && c < 0x7f; });
}

}  // namespace

Status LoadTlsFiles(const Options& options, SessionSettings& settings) {
  if (!options.cacert.empty()) {
    settings.tls_ca_pem.clear();
    if (Status s = ReadCa(options.cacert, settings.tls_ca_pem); !s.ok()) return s;
  }
  if (options.cert.empty() != options.key.empty()) {
    return InvalidArgument("a client certificate needs its key: give cert and key together");
  }
  if (!options.cert.empty()) {
    if (Status s = ReadFile(options.cert, "cert", settings.tls_cert_pem); !s.ok()) return s;
    if (Status s = ExpectPem(settings.tls_cert_pem, Pem::kCertificate, "cert " + options.cert); !s.ok()) return s;
    if (Status s = ReadFile(options.key, "key", settings.tls_key_pem); !s.ok()) return s;
    if (Status s = ExpectPem(settings.tls_key_pem, Pem::kPrivateKey, "key " + options.key); !s.ok()) return s;
  }
  return Status::Ok();
}

Status ValidateTlsAndProxy(const SessionSettings& settings) {
  if (settings.tls_cert_pem.empty() != settings.tls_key_pem.empty()) {
    return InvalidArgument("tls_cert_pem and tls_key_pem come together");
  }
  for (const auto& [pem, kind, name] : {std::tuple{&settings.tls_ca_pem, Pem::kCertificate, "tls_ca_pem"},
                                        std::tuple{&settings.tls_cert_pem, Pem::kCertificate, "tls_cert_pem"},
                                        std::tuple{&settings.tls_key_pem, Pem::kPrivateKey, "tls_key_pem"}}) {
    if (pem->empty()) continue;
    if (Status s = ExpectPem(*pem, kind, name); !s.ok()) return s;
  }
  if (!settings.proxy.empty()) {
    static constexpr std::array<std::string_view, 6> kSchemes = {"http://",   "https://",  "socks4://",
                                                                 "socks4a://", "socks5://", "socks5h://"};
    const std::string_view proxy = settings.proxy;
    const bool scheme = std::any_of(kSchemes.begin(), kSchemes.end(), [&](std::string_view s) {
      return proxy.size() > s.size() && proxy.substr(0, s.size()) == s;
    });
    if (!scheme || !Printable(proxy)) {
      return InvalidArgument("proxy '" + settings.proxy +
                             "' is not a proxy URL (http://, https://, socks4://, socks4a://, socks5:// or "
                             "socks5h:// and a host, no spaces)");
    }
  }
  if (!settings.no_proxy.empty() && !Printable(settings.no_proxy)) {
    return InvalidArgument("no_proxy has spaces or control bytes: hosts separated by commas");
  }
  return Status::Ok();
}

}  // namespace gatherer::client
