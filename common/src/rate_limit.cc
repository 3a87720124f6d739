#include "gatherer/rate_limit.h"

#include <algorithm>
#include <charconv>
#include <cstdio>
#include <ctime>

#include "gatherer/strings.h"

namespace gatherer {
namespace {

bool IsDigits(std::string_view s) {
  return !s.empty() && std::all_of(s.begin(), s.end(), [](char c) { return c >= '0' && c <= '9'; });
}

// Unsigned decimal, at most 18 digits.
std::optional<std::uint64_t> ParseUint(std::string_view s) {
  s = Trim(s);
  if (!IsDigits(s) || s.size() > 18) return std::nullopt;
  std::uint64_t v = 0;
  std::from_chars(s.data(), s.data() + s.size(), v);
  return v;
}

// Seconds with up to 3 decimals, as milliseconds.
std::optional<std::uint64_t> ParseSecondsMs(std::string_view s) {
  s = Trim(s);
  const auto dot = s.find('.');
  auto whole = ParseUint(s.substr(0, dot));
  if (!whole || *whole > kMaxRateWindowMs) return std::nullopt;
  std::uint64_t ms = *whole * 1000;
  if (dot != std::string_view::npos) {
    std::string_view frac = s.substr(dot + 1);
    if (!IsDigits(frac) || frac.size() > 3) return std::nullopt;
    std::uint64_t f = 0;
    std::from_chars(frac.data(), frac.data() + frac.size(), f);
    for (std::size_t i = frac.size(); i < 3; ++i) f *= 10;
    ms += f;
  }
  return ms;
}

// Calls f(piece) for each piece of `s` split at `sep`.
template <typename F>
void Split(std::string_view s, char sep, F&& f) {
  while (true) {
    const auto at = s.find(sep);
    f(s.substr(0, at));
    if (at == std::string_view::npos) return;
    s.remove_prefix(at + 1);
  }
}

// Riot style "20:1,100:120" as advertised (whole seconds); malformed pairs
// are skipped, so a server's odd value never fails a response.
RateWindows ParseAdvertised(std::string_view value) {
  RateWindows out;
  Split(value, ',', [&](std::string_view pair) {
    const auto colon = pair.find(':');
    if (colon == std::string_view::npos || out.size() >= kMaxRateWindows) return;
    auto count = ParseUint(pair.substr(0, colon));
    auto ms = ParseSecondsMs(pair.substr(colon + 1));
    if (count && ms && *count > 0 && *count <= kMaxRateCount && *ms > 0 && *ms <= kMaxRateWindowMs) {
      out.push_back({static_cast<std::uint32_t>(*count), static_cast<std::uint32_t>(*ms)});
    }
  });
  return out;
}

std::uint32_t ClampMs(std::uint64_t ms) { return static_cast<std::uint32_t>(std::min<std::uint64_t>(ms, kMaxRateWindowMs)); }

// An HTTP-date (RFC 9110 §5.6.7), in the three forms a recipient must read:
//   IMF-fixdate  "Sun, 06 Nov 1994 08:49:37 GMT"
//   RFC 850      "Sunday, 06-Nov-94 08:49:37 GMT" (a two-digit year: 70-99
//                is 19xx, the rest 20xx)
//   asctime      "Sun Nov  6 08:49:37 1994"
std::optional<std::int64_t> ParseHttpDate(std::string_view s) {
  static constexpr std::string_view kMonths[] = {"Jan", "Feb", "Mar", "Apr", "May", "Jun",
                                                 "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"};
  // "08:49:37" at `t`, the rest already read.
  const auto make = [&](std::string_view day, std::string_view month, std::uint64_t year,
                        std::string_view t) -> std::optional<std::int64_t> {
    while (!day.empty() && day.front() == ' ') day.remove_prefix(1);
    auto d = ParseUint(day);
    auto hh = ParseUint(t.substr(0, 2));
    auto mm = ParseUint(t.substr(3, 2));
    auto ss = ParseUint(t.substr(6, 2));
    int m = -1;
    for (int i = 0; i < 12; ++i) {
      if (month == kMonths[i]) m = i;
    }
    if (!d || !hh || !mm || !ss || m < 0 || t.size() != 8 || t[2] != ':' || t[5] != ':' || *d < 1 || *d > 31 ||
        *hh > 23 || *mm > 59 || *ss > 60) {
      return std::nullopt;
    }
    std::tm tm{};
    tm.tm_mday = static_cast<int>(*d);
    tm.tm_mon = m;
    tm.tm_year = static_cast<int>(year) - 1900;
    tm.tm_hour = static_cast<int>(*hh);
    tm.tm_min = static_cast<int>(*mm);
    tm.tm_sec = static_cast<int>(*ss);
    return static_cast<std::int64_t>(timegm(&tm));
  };
  s = Trim(s);
  const auto comma = s.find(", ");
  if (comma == std::string_view::npos) {
    // asctime: "Sun Nov  6 08:49:37 1994"
    if (s.size() != 24 || s[3] != ' ' || s[7] != ' ' || s[10] != ' ' || s[19] != ' ') return std::nullopt;
    auto year = ParseUint(s.substr(20, 4));
    if (!year) return std::nullopt;
    return make(s.substr(8, 2), s.substr(4, 3), *year, s.substr(11, 8));
  }
  s.remove_prefix(comma + 2);
  if (s.size() == 24 && s.substr(20) == " GMT" && s[2] == ' ' && s[6] == ' ' && s[11] == ' ') {
    // "06 Nov 1994 08:49:37 GMT"
    auto year = ParseUint(s.substr(7, 4));
    if (!year) return std::nullopt;
    return make(s.substr(0, 2), s.substr(3, 3), *year, s.substr(12, 8));
  }
  if (s.size() == 22 && s.substr(18) == " GMT" && s[2] == '-' && s[6] == '-' && s[9] == ' ') {
    // "06-Nov-94 08:49:37 GMT"
    auto yy = ParseUint(s.substr(7, 2));
    if (!yy) return std::nullopt;
    return make(s.substr(0, 2), s.substr(3, 3), *yy + (*yy >= 70 ? 1900 : 2000), s.substr(10, 8));
  }
  return std::nullopt;
}

// A reset value: delta-seconds, or (when over ten years) a Unix time.
std::optional<std::uint64_t> ResetMs(std::string_view value, std::int64_t now_unix) {
  auto v = ParseUint(value);
  if (!v) return std::nullopt;
  if (*v > 315'360'000) {
    const auto at = static_cast<std::int64_t>(*v);
    return at > now_unix ? static_cast<std::uint64_t>(at - now_unix) * 1000 : 0;
  }
  return *v * 1000;
}

// Parameters of one IETF list member: `"name";q=100;w=60` or `limit=100`.
struct Params {
  std::optional<std::uint64_t> q, w, r, t;
};
Params ParseParams(std::string_view member) {
  Params p;
  Split(member, ';', [&](std::string_view param) {
    param = Trim(param);
    const auto eq = param.find('=');
    if (eq == std::string_view::npos) return;
    const std::string_view key = Trim(param.substr(0, eq));
    const auto value = ParseUint(param.substr(eq + 1));
    if (key == "q" || key == "limit") p.q = value;
    else if (key == "w") p.w = value;
    else if (key == "r" || key == "remaining") p.r = value;
    else if (key == "t" || key == "reset") p.t = value;
  });
  return p;
}

void AddWindow(RateWindows& out, std::uint64_t count, std::uint64_t seconds) {
  if (count == 0 || count > kMaxRateCount || seconds == 0 || seconds * 1000 > kMaxRateWindowMs) return;
  if (out.size() >= kMaxRateWindows) return;
  const RateWindow w{static_cast<std::uint32_t>(count), static_cast<std::uint32_t>(seconds * 1000)};
  if (std::find(out.begin(), out.end(), w) == out.end()) out.push_back(w);
}

}  // namespace

std::optional<RateWindows> ParseRateWindows(std::string_view text) {
  RateWindows out;
  bool ok = !Trim(text).empty();
  Split(text, ',', [&](std::string_view pair) {
    const auto colon = pair.find(':');
    if (!ok || colon == std::string_view::npos) {
      ok = false;
      return;
    }
    auto count = ParseUint(pair.substr(0, colon));
    auto ms = ParseSecondsMs(pair.substr(colon + 1));
    if (!count || !ms || *count == 0 || *count > kMaxRateCount || *ms == 0 || *ms > kMaxRateWindowMs ||
        out.size() >= kMaxRateWindows) {
      ok = false;
      return;
    }
    out.push_back({static_cast<std::uint32_t>(*count), static_cast<std::uint32_t>(*ms)});
  });
  if (!ok) return std::nullopt;
  return out;
}

std::string FormatRateWindows(const RateWindows& windows) {
  std::string out;
  for (const auto& w : windows) {
    if (!out.empty()) out += ',';
    out += std::to_string(w.count) + ':' + std::to_string(w.window_ms / 1000);
    if (const auto ms = w.window_ms % 1000; ms != 0) {
      char buf[4];
      std::snprintf(buf, sizeof buf, "%03u", ms);
      std::string frac(buf);
      while (frac.back() == '0') frac.pop_back();
      out += '.' + frac;
    }
  }
  return out;
}

std::optional<RateRule> ParseRateRule(std::string_view text) {
  text = Trim(text);
  RateRule rule;
  const auto space = text.rfind(' ');
  if (space == std::string_view::npos) {
    auto windows = ParseRateWindows(text);
    if (!windows) return std::nullopt;
    rule.windows = std::move(*windows);
    return rule;
  }
  auto windows = ParseRateWindows(text.substr(space + 1));
  if (!windows) return std::nullopt;
  rule.windows = std::move(*windows);
  std::string_view head = Trim(text.substr(0, space));
  if (const auto eq = head.find('='); eq != std::string_view::npos) {
    rule.name = Trim(head.substr(0, eq));
    head = Trim(head.substr(eq + 1));
    if (rule.name.empty()) return std::nullopt;
  }
  if (const auto sp = head.find(' '); sp != std::string_view::npos) {
    rule.method = head.substr(0, sp);
    head = Trim(head.substr(sp + 1));
    if (!std::all_of(rule.method.begin(), rule.method.end(), [](char c) { return c >= 'A' && c <= 'Z'; })) {
      return std::nullopt;
    }
  }
  if (head.empty() || head.front() != '/' || head.find(' ') != std::string_view::npos) return std::nullopt;
  rule.path = head;
  if (rule.name.empty()) rule.name = rule.method.empty() ? rule.path : rule.method + " " + rule.path;
  return rule;
}

bool MatchRatePath(std::string_view pattern, std::string_view path) {
  if (const auto q = path.find_first_of("?#"); q != std::string_view::npos) path = path.substr(0, q);
  while (true) {
    if (pattern == "/**") return true;
    if (pattern.empty() || path.empty()) return pattern.empty() && path.empty();
    if (pattern.front() != '/' || path.front() != '/') return false;
    pattern.remove_prefix(1);
    path.remove_prefix(1);
    const auto pe = pattern.find('/');
    const auto qe = path.find('/');
    const std::string_view ps = pattern.substr(0, pe), qs = path.substr(0, qe);
    const bool wildcard = ps == "*" || (ps.size() >= 2 && ps.front() == '{' && ps.back() == '}');
    if (wildcard ? qs.empty() : ps != qs) return false;
    pattern = pe == std::string_view::npos ? std::string_view() : pattern.substr(pe);
    path = qe == std::string_view::npos ? std::string_view() : path.substr(qe);
  }
}

bool SplitUrl(std::string_view url, std::string_view& host, std::string_view& path) {
  const auto scheme = url.find("://");
  if (scheme == std::string_view::npos) return false;
  std::string_view rest = url.substr(scheme + 3);
  const auto end = rest.find_first_of("/?#");
  host = rest.substr(0, end);
  if (const auto at = host.rfind('@'); at != std::string_view::npos) host.remove_prefix(at + 1);
  path = end == std::string_view::npos ? std::string_view("/") : rest.substr(end);
  if (!path.empty() && path.front() != '/') path = "/";
  return !host.empty();
}

std::optional<std::uint64_t> ParseRetryAfter(std::string_view value, std::int64_t now_unix) {
  value = Trim(value);
  if (IsDigits(value)) {
    if (value.size() > 9) return std::uint64_t{999'999'999} * 1000;
    return *ParseUint(value) * 1000;
  }
  auto when = ParseHttpDate(value);
  if (!when) return std::nullopt;
  return *when > now_unix ? static_cast<std::uint64_t>(*when - now_unix) * 1000 : 0;
}

std::optional<RateReport> ParseRateHeaders(int status, const Headers& headers, std::int64_t now_unix) {
  // The common case first: a response with no header of interest costs one
  // pass of cheap prefix checks and no allocation.
  auto relevant = [](std::string_view n) {
    return EqualsIgnoreCase(n, "Retry-After") || (n.size() >= 9 && (EqualsIgnoreCase(n.substr(0, 9), "RateLimit") ||
                                                                  EqualsIgnoreCase(n.substr(0, 9), "X-RateLim"))) ||
           (n.size() > 6 && (EqualsIgnoreCase(n.substr(0, 6), "X-App-") || EqualsIgnoreCase(n.substr(0, 6), "X-Meth") ||
                             EqualsIgnoreCase(n.substr(0, 6), "X-Rate")));
  };
  if (status != 429 && std::none_of(headers.begin(), headers.end(), [&](const auto& h) { return relevant(h.first); })) {
    return std::nullopt;
  }
  RateReport report;
  report.throttled = status == 429;
  std::optional<std::uint64_t> retry_after, limit, remaining, reset, window;
  for (const auto& [name, value] : headers) {
    if (EqualsIgnoreCase(name, "Retry-After")) {
      retry_after = ParseRetryAfter(value, now_unix);
    } else if (EqualsIgnoreCase(name, "X-App-Rate-Limit")) {
      report.app = ParseAdvertised(value);
    } else if (EqualsIgnoreCase(name, "X-Method-Rate-Limit")) {
      report.method = ParseAdvertised(value);
    } else if (EqualsIgnoreCase(name, "X-Rate-Limit-Type")) {
      const std::string_view t = Trim(value);
      if (EqualsIgnoreCase(t, "application")) report.type = RateLimitType::kApplication;
      else if (EqualsIgnoreCase(t, "method")) report.type = RateLimitType::kMethod;
      else if (EqualsIgnoreCase(t, "service")) report.type = RateLimitType::kService;
    } else if (EqualsIgnoreCase(name, "RateLimit-Limit") || EqualsIgnoreCase(name, "X-RateLimit-Limit")) {
      // "100" or "100, 100;w=60" (older drafts carry the policy here).
      Split(value, ',', [&](std::string_view member) {
        const auto semi = member.find(';');
        auto count = ParseUint(member.substr(0, semi));
        if (!count) return;
        if (!limit) limit = count;
        if (semi != std::string_view::npos) {
          const Params p = ParseParams(member.substr(semi));
          if (p.w) AddWindow(report.app, *count, *p.w);
        }
      });
    } else if (EqualsIgnoreCase(name, "RateLimit-Remaining") || EqualsIgnoreCase(name, "X-RateLimit-Remaining")) {
      remaining = ParseUint(value);
    } else if (EqualsIgnoreCase(name, "RateLimit-Reset") || EqualsIgnoreCase(name, "X-RateLimit-Reset")) {
      reset = ResetMs(value, now_unix);
    } else if (EqualsIgnoreCase(name, "X-RateLimit-Window") || EqualsIgnoreCase(name, "RateLimit-Window")) {
      window = ParseUint(value);
    } else if (EqualsIgnoreCase(name, "RateLimit-Policy")) {
      // `100;w=60` or `"burst";q=100;w=60`, comma-separated.
      Split(value, ',', [&](std::string_view member) {
        const auto semi = member.find(';');
        if (semi == std::string_view::npos) return;
        const Params p = ParseParams(member.substr(semi));
        auto count = p.q ? p.q : ParseUint(member.substr(0, semi));
        if (count && p.w) AddWindow(report.app, *count, *p.w);
      });
    } else if (EqualsIgnoreCase(name, "RateLimit")) {
      // `limit=100, remaining=0, reset=30` or `"burst";r=0;t=30`.
      Params all;
      Split(value, ',', [&](std::string_view member) {
        const Params p = ParseParams(member);
        const auto semi = member.find(';');
        if (semi == std::string_view::npos && member.find('=') != std::string_view::npos) {
          if (p.q) all.q = p.q;
          if (p.r) all.r = p.r;
          if (p.t) all.t = p.t;
        } else {
          if (p.r && (!all.r || *p.r < *all.r)) {
            all.r = p.r;
            all.t = p.t;
          }
        }
      });
      if (all.q && !limit) limit = all.q;
      if (all.r) remaining = all.r;
      if (all.t) reset = *all.t * 1000;
    }
  }
  if (limit && window && report.app.empty()) AddWindow(report.app, *limit, *window);
  if (retry_after) report.retry_after_ms = ClampMs(*retry_after);
  // Nothing left until the reset: the same as a Retry-After of the reset.
  if (!retry_after && remaining && *remaining == 0 && reset) report.retry_after_ms = ClampMs(*reset);
  if (!report.throttled && report.retry_after_ms == 0 && report.app.empty() && report.method.empty()) {
    return std::nullopt;
  }
  return report;
}

}  // namespace gatherer
