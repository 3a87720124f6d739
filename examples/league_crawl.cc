// league-crawl: one Gatherer, three gather() calls against the example game
// API (examples/api_server.py): the ranked league, then every entry's
// summoner, then every summoner's recent match ids, all within the API's
// rate limits (README, "Rate limits").
//
//   python3 examples/api_server.py --port 8089 &
//   build/release/examples/league-crawl http://127.0.0.1:8089 --rate-limit 20:1,100:120
//
// Options: --broker EP (default: embedded broker and worker), --rate-limit
// SPEC (repeatable; default 20:1,100:120 per host), --learn (learn the limits
// from the API's headers instead of declaring them), --players N (the first
// N entries; default all), --matches N (match ids per player, default 5).
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "gatherer/gatherer.h"

namespace {

struct Step {
  std::size_t ok = 0, failed = 0;
  std::uint64_t waited_us = 0, throttled = 0;
  void add(const gatherer::Response& r) {
    (r.ok() ? ok : failed)++;
    waited_us += r.rate_wait_us;
    throttled += r.throttled;
  }
  std::string text() const {
    char buf[160];
    std::snprintf(buf, sizeof buf, "%zu ok, %zu failed, %.1f s waited for limits in all, %llu throttled", ok, failed,
                  static_cast<double>(waited_us) / 1e6, static_cast<unsigned long long>(throttled));
    return buf;
  }
};

int Usage() {
  std::fprintf(stderr,
               "usage: league-crawl BASE_URL [--broker EP] [--rate-limit SPEC]... [--learn] [--players N] "
               "[--matches N]\n");
  return 2;
}

}  // namespace

int Crawl(int argc, char** argv);

int main(int argc, char** argv) {
  if (argc < 2 || std::string_view(argv[1]).starts_with("-")) return Usage();
  try {
    return Crawl(argc, argv);
  } catch (const gatherer::Error& e) {
    std::fprintf(stderr, "league-crawl: %s\n", e.what());
    return 1;
  }
}

int Crawl(int argc, char** argv) {
  gatherer::Options options;
  options.workers = 50;
  options.log_level = 40;
  options.settings.base_url = argv[1];
  std::size_t players = SIZE_MAX;
  int matches = 5;
  bool learn = false;
  for (int i = 2; i < argc; ++i) {
    const std::string arg = argv[i];
    const bool has_value = i + 1 < argc;
    if (arg == "--broker" && has_value) {
      options.broker = argv[++i];
    } else if (arg == "--rate-limit" && has_value) {
      auto rule = gatherer::ParseRateRule(argv[++i]);
      if (!rule) return Usage();
      options.settings.rate_limits.push_back(*rule);
    } else if (arg == "--learn") {
      learn = true;
    } else if (arg == "--players" && has_value) {
      players = std::strtoul(argv[++i], nullptr, 10);
    } else if (arg == "--matches" && has_value) {
      matches = std::atoi(argv[++i]);
    } else {
      return Usage();
    }
  }
  if (learn) {
    options.settings.learn_rate_limits = true;
  } else if (options.settings.rate_limits.empty()) {
    options.settings.rate_limits.push_back(*gatherer::ParseRateRule("20:1,100:120"));
  }

  const auto start = std::chrono::steady_clock::now();
  gatherer::Gatherer g(options);  // one Gatherer, one session, three batches

  // 1. The league.
  g.statements = {gatherer::Get("/lol/league/v4/challengerleagues/by-queue/RANKED_SOLO_5x5")};
  const auto& league = g.gather();
  if (!league[0].ok()) {
    std::fprintf(stderr, "league-crawl: league: %s\n", league[0].error->message.c_str());
    return 1;
  }
  std::vector<std::string> ids;
  const nlohmann::json parsed = nlohmann::json::parse(league[0].body);
  for (const auto& entry : parsed.at("entries")) {
    if (ids.size() == players) break;
    ids.push_back(entry.at("summonerId").get<std::string>());
  }
  std::printf("league: %zu entries taken\n", ids.size());

  // 2. Every entry's summoner.
  g.statements.clear();
  for (const auto& id : ids) g.statements.push_back(gatherer::Get("/lol/summoner/v4/summoners/" + id));
  Step summoners;
  std::vector<std::string> puuids;
  for (const auto& r : g.gather()) {
    summoners.add(r);
    if (r.ok()) puuids.push_back(nlohmann::json::parse(r.body).at("puuid").get<std::string>());
  }
  std::printf("summoners: %s\n", summoners.text().c_str());

  // 3. Every summoner's recent match ids.
  g.statements.clear();
  for (const auto& puuid : puuids) {
    g.statements.push_back(
        gatherer::Get("/lol/match/v5/matches/by-puuid/" + puuid + "/ids?count=" + std::to_string(matches)));
  }
  Step lists;
  std::size_t match_ids = 0;
  for (const auto& r : g.gather()) {
    lists.add(r);
    if (r.ok()) match_ids += nlohmann::json::parse(r.body).size();
  }
  std::printf("match lists: %s; %zu match ids\n", lists.text().c_str(), match_ids);

  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const std::size_t requests = 1 + summoners.ok + summoners.failed + lists.ok + lists.failed;
  const std::size_t failed = summoners.failed + lists.failed;
  std::printf("%zu requests in %.2f s (%.1f req/s), %zu failed\n", requests, seconds,
              static_cast<double>(requests) / seconds, failed);
  return failed == 0 ? 0 : 1;
}
