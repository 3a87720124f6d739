// gatherer: fetch statements read as JSON Lines (or bare URLs) and write the
// responses as JSON Lines in input order (DESIGN §2 "CLI").
//
//   gatherer fetch [FILE|-] [--workers N] [--broker tcp://host:port] ...
//
// Exit status: 0 all statements succeeded, 1 some failed (or gather() threw
// under --cancel-on-raise), 2 usage error or invalid input (nothing fetched).
// Thin by design: parsing and formatting live in jsonl.cc.

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include "gatherer/gatherer.h"
#include "gatherer/log.h"
#include "jsonl.h"

namespace {

constexpr int kExitOk = 0;
constexpr int kExitFailed = 1;
constexpr int kExitUsage = 2;

// Output is flushed in chunks this big: one fwrite per few MB keeps syscalls
// rare without holding all of a million responses' JSON at once.
constexpr std::size_t kFlushBytes = 4u << 20;

struct FetchFlags {
  std::string file;
  int workers = 25;
  std::string broker;
  bool cancel_on_raise = false;
  std::vector<std::string> headers;
  std::string base_url;
  double timeout_s = 30;
  int retries = 3;
  // The CLI defaults to warnings only (30), unlike the library's 10: debug
  // lines on stderr would drown the progress of a long run.
  std::string log_level = "30";
  unsigned io_threads = 0;
};

void PrintError(const std::string& message) { std::fprintf(stderr, "gatherer: %s\n", message.c_str()); }

// Builds Options from flags; on failure prints why and returns false.
bool BuildOptions(const FetchFlags& flags, gatherer::Options& options) {
  options.broker = flags.broker;
  options.workers = flags.workers;
  options.cancel_on_raise = flags.cancel_on_raise;
  options.embedded_io_threads = flags.io_threads;
  auto level = gatherer::ParseLogLevel(flags.log_level);
  if (!level) {
    PrintError("--log-level: " + level.error().message());
    return false;
  }
  options.log_level = *level;

  gatherer::SessionSettings& settings = options.settings;
  settings.workers = static_cast<std::uint32_t>(flags.workers);
  settings.max_attempts = static_cast<std::uint32_t>(flags.retries) + 1;
  settings.timeout_ms = static_cast<std::uint32_t>(std::llround(flags.timeout_s * 1000));
  for (const std::string& arg : flags.headers) {
    auto header = gatherer::cli::ParseHeaderArg(arg);
    if (!header) {
      PrintError("--header '" + arg + "': " + header.error().message());
      return false;
    }
    settings.headers.push_back(std::move(*header));
  }
  if (!flags.base_url.empty()) {
    if (auto s = gatherer::ValidateStatement(gatherer::Get(flags.base_url), {}); !s.ok()) {
      PrintError("--base-url: " + s.message());
      return false;
    }
    settings.base_url = flags.base_url;
  }
  return true;
}

bool WriteAll(const std::string& data) {
  return std::fwrite(data.data(), 1, data.size(), stdout) == data.size();
}

int RunFetch(const FetchFlags& flags) {
  gatherer::Options options;
  if (!BuildOptions(flags, options)) return kExitUsage;

  // Every statement is read and validated before a Gatherer exists, so a bad
  // line 900,000 costs no request and no session.
  const bool from_stdin = flags.file.empty() || flags.file == "-";
  const std::string input_name = from_stdin ? "<stdin>" : flags.file;
  std::unique_ptr<std::FILE, int (*)(std::FILE*)> owned(nullptr, &std::fclose);
  std::FILE* in = stdin;
  if (!from_stdin) {
    owned.reset(std::fopen(flags.file.c_str(), "r"));
    if (!owned) {
      PrintError("cannot open '" + flags.file + "': " + std::strerror(errno));
      return kExitUsage;
    }
    in = owned.get();
  }
  auto statements = gatherer::cli::ReadStatements(in, options.settings);
  owned.reset();
  if (!statements) {
    PrintError(input_name + ": " + statements.error().message());
    return statements.error().code() == gatherer::StatusCode::kInvalidArgument ? kExitUsage
                                                                               : kExitFailed;
  }
  if (statements->empty()) return kExitOk;

  try {
    gatherer::Gatherer gatherer(std::move(options));
    gatherer.statements = std::move(*statements);
    const std::vector<gatherer::Response>& responses = gatherer.gather();

    bool any_failed = false;
    std::string out;
    out.reserve(kFlushBytes + (kFlushBytes >> 2));
    for (std::size_t i = 0; i < responses.size(); ++i) {
      any_failed = any_failed || !responses[i].ok();
      gatherer::cli::AppendResponseJson(out, i, responses[i]);
      if (out.size() >= kFlushBytes) {
        if (!WriteAll(out)) {
          PrintError(std::string("writing stdout: ") + std::strerror(errno));
          return kExitFailed;
        }
        out.clear();
      }
    }
    if (!WriteAll(out) || std::fflush(stdout) != 0) {
      PrintError(std::string("writing stdout: ") + std::strerror(errno));
      return kExitFailed;
    }
    return any_failed ? kExitFailed : kExitOk;
  } catch (const gatherer::Error& e) {
    if (e.index() >= 0) {
      PrintError(std::string(e.what()) + " (statement index " + std::to_string(e.index()) + ")");
    } else {
      PrintError(e.what());
    }
    return kExitFailed;
  } catch (const std::exception& e) {
    PrintError(e.what());
    return kExitFailed;
  }
}

}  // namespace

int main(int argc, char** argv) {
  // stdout carries the JSON Lines; every log line must go to stderr.
  spdlog::set_default_logger(
      std::make_shared<spdlog::logger>("gatherer-cli", std::make_shared<spdlog::sinks::stderr_color_sink_mt>()));

  CLI::App app{"gatherer: fetch many HTTP requests through a Gatherer cluster"};
  app.set_version_flag("--version", "gatherer " GATHERER_VERSION);
  app.require_subcommand(1);

  FetchFlags flags;
  CLI::App* fetch = app.add_subcommand(
      "fetch", "Read statements (JSON Lines or bare URLs) from FILE or stdin, write responses "
               "as JSON Lines to stdout in input order");
  fetch->add_option("FILE", flags.file, "Input file; '-' or none = stdin");
  fetch->add_option("--workers", flags.workers, "Statements in flight across the cluster")
      ->capture_default_str()
      ->check(CLI::Range(1, 100000));
  fetch->add_option("--broker", flags.broker, "Broker endpoint (tcp://host:port); empty = embedded");
  fetch->add_flag("--cancel-on-raise", flags.cancel_on_raise,
                  "Stop at the first failed statement and exit 1 naming it");
  // allow_extra_args(false): one value per --header, so a following FILE is
  // not swallowed as another header.
  fetch->add_option("--header", flags.headers, "Default header 'Name: value' (repeatable)")
      ->allow_extra_args(false);
  fetch->add_option("--base-url", flags.base_url, "Prefix for statements whose url is a path");
  fetch->add_option("--timeout", flags.timeout_s, "Per-attempt timeout in seconds (0 = none)")
      ->capture_default_str()
      ->check(CLI::Range(0.0, 4294967.0));
  fetch->add_option("--retries", flags.retries, "Retries per statement (attempts = retries + 1)")
      ->capture_default_str()
      ->check(CLI::Range(0, 1000));
  fetch->add_option("--log-level", flags.log_level,
                    "10..50 or debug, info, warning, error, critical")
      ->capture_default_str();
  fetch->add_option("--io-threads", flags.io_threads,
                    "I/O threads of the embedded worker (0 = one per core)")
      ->capture_default_str();

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    // --help and --version are "errors" with exit code 0 in CLI11.
    return app.exit(e) == 0 ? kExitOk : kExitUsage;
  }
  return RunFetch(flags);
}
