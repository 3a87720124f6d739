// gatherer: fetch statements read as JSON Lines (or bare URLs) and write the
// responses as JSON Lines in input order (DESIGN §2 "CLI").
//
//   gatherer fetch [FILE|-] [--workers N] [--broker tcp://host:port] ...
//
// Exit status: 0 all statements succeeded, 1 some failed (or the stream threw:
// --cancel-on-raise, broker unavailable), 2 usage error or invalid input
// (nothing fetched). Thin by design: reading, parsing and formatting live in
// jsonl.cc.
//
// Big jobs run in bounded memory (DESIGN §2): neither the input nor the
// output is ever held whole. A first pass reads and validates every line,
// keeping only a count, so an invalid line 900,000 still costs no request;
// a second pass over the same bytes (the file sought back, or a temporary
// copy of a pipe) feeds Gatherer::stream, and each response is written as
// soon as all earlier ones are.

#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <optional>
#include <stdexcept>
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

// Output is flushed in chunks this big: one fwrite per MiB keeps syscalls
// rare while a reader downstream still sees lines as they come.
constexpr std::size_t kFlushBytes = 1u << 20;

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
  double broker_timeout_s = 60;
};

void PrintError(const std::string& message) { std::fprintf(stderr, "gatherer: %s\n", message.c_str()); }

// Builds Options from flags; on failure prints why and returns false.
bool BuildOptions(const FetchFlags& flags, gatherer::Options& options) {
  options.broker = flags.broker;
  options.workers = flags.workers;
  options.cancel_on_raise = flags.cancel_on_raise;
  options.embedded_io_threads = flags.io_threads;
  options.broker_timeout = std::chrono::milliseconds(std::llround(flags.broker_timeout_s * 1000));
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

// Thrown from the statement source when the second pass cannot read what the
// first one validated. It leaves through Stream::next(), and destroying the
// unfinished stream cancels what was already sent.
class InputError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

int RunFetch(const FetchFlags& flags) {
  gatherer::Options options;
  if (!BuildOptions(flags, options)) return kExitUsage;

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
  auto input = gatherer::cli::TwoPassInput::Open(in);
  if (!input) {
    PrintError(input.error().message());
    return kExitFailed;
  }

  // Pass 1, before a Gatherer exists: a bad line costs no request and no session.
  auto count = gatherer::cli::CountValidStatements((*input)->reader(), options.settings);
  if (!count) {
    PrintError(input_name + ": " + count.error().message());
    return count.error().code() == gatherer::StatusCode::kInvalidArgument ? kExitUsage : kExitFailed;
  }
  if (*count == 0) return kExitOk;
  if (gatherer::Status s = (*input)->rewind(); !s.ok()) {
    PrintError(input_name + ": " + s.message());
    return kExitFailed;
  }

  // Pass 2. Lines appended to a file since pass 1 were never validated, so
  // the source stops at the count; fewer lines means the input changed.
  std::uint64_t fed = 0;
  gatherer::cli::LineReader& reader = (*input)->reader();
  auto source = [&](gatherer::Statement& out) {
    if (fed == *count) return false;
    auto got = gatherer::cli::ReadStatement(reader, out);
    if (!got) throw InputError(input_name + " changed after validation: " + got.error().message());
    if (*got) ++fed;
    return *got;
  };

  // Holds at most one chunk: what was written before an error stays written
  // (the exit status says the run failed); the unflushed rest is dropped, so
  // a run that fails early, like --cancel-on-raise on a bad first few
  // statements, prints nothing.
  std::string out;
  out.reserve(kFlushBytes + (kFlushBytes >> 2));
  bool any_failed = false;
  try {
    gatherer::Gatherer gatherer(std::move(options));
    gatherer::Stream stream = gatherer.stream(source, gatherer::Order::kInput);
    while (std::optional<gatherer::Indexed> item = stream.next()) {
      any_failed = any_failed || !item->response.ok();
      gatherer::cli::AppendResponseJson(out, item->index, item->response);
      if (out.size() >= kFlushBytes) {
        if (!WriteAll(out)) {
          PrintError(std::string("writing stdout: ") + std::strerror(errno));
          return kExitFailed;
        }
        out.clear();
      }
    }
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
  if (!WriteAll(out) || std::fflush(stdout) != 0) {
    PrintError(std::string("writing stdout: ") + std::strerror(errno));
    return kExitFailed;
  }
  if (fed != *count) {
    PrintError(input_name + " changed after validation: " + std::to_string(*count) +
               " statements validated, " + std::to_string(fed) + " read back");
    return kExitFailed;
  }
  return any_failed ? kExitFailed : kExitOk;
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
  fetch->add_option("--broker-timeout", flags.broker_timeout_s,
                    "Seconds without a word from the broker before the run fails; dropped "
                    "connections in between are recovered")
      ->capture_default_str()
      ->check(CLI::Range(1.0, 86400.0));
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
