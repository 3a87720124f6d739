#include "rate_limiter.h"

#include <algorithm>

namespace gatherer::broker {
namespace {

using std::chrono::milliseconds;
using std::chrono::nanoseconds;

constexpr nanoseconds kBackoffFirst = std::chrono::seconds(1);
constexpr nanoseconds kBackoffMax = std::chrono::seconds(60);
// Grants logged even before a key has windows, so that limits learned
// later count what was already sent.
constexpr std::size_t kMinLog = 64;

// An endpoint's learned key ignores the parts of its path that look like
// ids (a segment holding a digit, or 16 characters or more), so that
// /matches/EUW1_123 and /matches/EUW1_456 share one method limit.
void AppendTemplate(std::string& out, std::string_view path) {
  if (const auto q = path.find_first_of("?#"); q != std::string_view::npos) path = path.substr(0, q);
  while (!path.empty()) {
    path.remove_prefix(1);  // '/'
    const auto end = path.find('/');
    const std::string_view seg = path.substr(0, end);
    out += '/';
    const bool id = seg.size() >= 16 || std::any_of(seg.begin(), seg.end(), [](char c) { return c >= '0' && c <= '9'; });
    if (id) out += "{}";
    else out += seg;
    path = end == std::string_view::npos ? std::string_view() : path.substr(end);
  }
}

}  // namespace

nanoseconds RateLimiter::Margin(std::uint32_t window_ms) {
  return milliseconds(5) + std::chrono::microseconds(static_cast<std::int64_t>(window_ms) * 10);
}

RateTime RateLimiter::Key::recent(std::size_t i) const {
  const std::size_t cap = log.size();
  // The latest is just before head (head is the next slot to write).
  return log[(head + cap - 1 - i) % cap];
}

RateLimiter::Key* RateLimiter::key(std::string_view name) {
  auto it = keys_.find(std::string(name));
  if (it == keys_.end()) {
    it = keys_.emplace(std::string(name), Key{}).first;
    it->second.name = it->first;
  }
  return &it->second;
}

void RateLimiter::acquire(Key* k) { ++k->refs; }
void RateLimiter::release(Key* k) {
  if (k->refs > 0) --k->refs;
}

bool RateLimiter::declare(Key* k, const RateWindows& windows) {
  bool changed = false;
  for (const RateWindow& w : windows) {
    if (w.count == 0 || w.window_ms == 0) continue;
    auto same = std::find_if(k->windows.begin(), k->windows.end(),
                             [&](const RateWindow& x) { return x.window_ms == w.window_ms; });
    if (same == k->windows.end()) {
      if (k->windows.size() >= kMaxRateWindows) continue;
      k->windows.push_back(w);
      changed = true;
    } else if (w.count < same->count) {
      same->count = w.count;
      changed = true;
    }
  }
  if (!changed) return false;
  std::sort(k->windows.begin(), k->windows.end(),
            [](const RateWindow& a, const RateWindow& b) { return a.window_ms < b.window_ms; });
  const RateWindow& shortest = k->windows.front();
  k->gap = (milliseconds(shortest.window_ms) + Margin(shortest.window_ms)) / shortest.count;
  // What went before the windows were known is paced from too.
  if (k->used > 0) k->tat = std::max(k->tat, k->last_grant + k->gap);
  // The log holds as many answers as the largest count; the latest are kept.
  std::size_t capacity = kMinLog;
  for (const auto& w : k->windows) capacity = std::max<std::size_t>(capacity, w.count);
  if (capacity != k->log.size()) {
    std::vector<RateTime> log(capacity);
    const std::size_t keep = std::min<std::size_t>(k->filled, capacity);
    for (std::size_t i = 0; i < keep; ++i) log[keep - 1 - i] = k->recent(i);
    k->log = std::move(log);
    k->filled = keep;
    k->head = keep % capacity;
  }
  return true;
}

RateTime RateLimiter::ready_at(const Key* k, RateTime now) const {
  RateTime at = k->paused_until;
  if (k->windows.empty()) return at;
  // Pacing: one grant per gap.
  if (k->tat > at) at = k->tat;
  for (const RateWindow& w : k->windows) {
    const auto span = milliseconds(w.window_ms) + Margin(w.window_ms);
    // Requests in flight fill the window until W after their answers, which
    // come at `now` at the earliest.
    if (k->in_flight >= w.count) {
      at = std::max(at, now + span);
      continue;
    }
    const std::size_t need = w.count - k->in_flight;
    if (k->filled < need) continue;
    // Of the answered ones, the need-th most recent must have left the window.
    const RateTime free = k->recent(need - 1) + span;
    if (free > at) at = free;
  }
  return at;
}

void RateLimiter::record(Key* k, RateTime now) {
  ++k->used;
  k->last_used = now;
  if (k->log.empty()) k->log.resize(kMinLog);
  // A grant up to a little late keeps the schedule (the loop wakes on whole
  // milliseconds); after an idle spell the schedule starts again from now.
  const auto slack = std::min<nanoseconds>(milliseconds(2), k->gap / 4);
  k->tat = std::max(k->tat, now - slack) + k->gap;
  k->last_grant = now;
  ++k->in_flight;
}

void RateLimiter::answered(Key* k, RateTime now) {
  if (k->in_flight > 0) --k->in_flight;
  if (k->log.empty()) k->log.resize(kMinLog);
  // Kept nondecreasing whatever the caller's clock did.
  if (k->filled > 0) now = std::max(now, k->recent(0));
  k->log[k->head] = now;
  k->head = (k->head + 1) % k->log.size();
  if (k->filled < k->log.size()) ++k->filled;
  k->last_used = std::max(k->last_used, now);
}

void RateLimiter::pause(Key* k, RateTime until) {
  if (until > k->paused_until) k->paused_until = until;
  k->last_used = std::max(k->last_used, until);
}

RateTime RateLimiter::backoff(Key* k, RateTime now) {
  // Doubles while 429s keep coming within the last backoff; starts over after.
  if (k->backoff.count() == 0 || now > k->paused_until + k->backoff) {
    k->backoff = kBackoffFirst;
  } else {
    k->backoff = std::min(k->backoff * 2, kBackoffMax);
  }
  pause(k, now + k->backoff);
  return k->paused_until;
}

void RateLimiter::count_throttled(Key* k) { ++k->throttled; }

RateKeyStats RateLimiter::stats(const Key* k) const {
  return RateKeyStats{k->name, k->windows, k->used, k->throttled, k->paused_until};
}

std::vector<RateKeyStats> RateLimiter::all_stats() const {
  std::vector<RateKeyStats> out;
  out.reserve(keys_.size());
  for (const auto& [name, k] : keys_) out.push_back(stats(&k));
  std::sort(out.begin(), out.end(), [](const auto& a, const auto& b) { return a.key < b.key; });
  return out;
}

std::vector<RateKeyStats> RateLimiter::busiest(std::size_t n) const {
  std::vector<const Key*> all;
  all.reserve(keys_.size());
  for (const auto& [name, k] : keys_) all.push_back(&k);
  n = std::min(n, all.size());
  std::partial_sort(all.begin(), all.begin() + static_cast<std::ptrdiff_t>(n), all.end(),
                    [](const Key* a, const Key* b) {
                      return a->used != b->used ? a->used > b->used : a->name < b->name;
                    });
  std::vector<RateKeyStats> out;
  out.reserve(n);
  for (std::size_t i = 0; i < n; ++i) out.push_back(stats(all[i]));
  return out;
}

void RateLimiter::collect(RateTime now) {
  for (auto it = keys_.begin(); it != keys_.end();) {
    const Key& k = it->second;
    const auto longest = k.windows.empty() ? milliseconds(0) : milliseconds(k.windows.back().window_ms);
    if (k.refs == 0 && now > std::max(k.paused_until, k.last_used) + longest + kBackoffMax) {
      it = keys_.erase(it);
    } else {
      ++it;
    }
  }
}

// ---- SessionRate -----------------------------------------------------------

SessionRate::SessionRate(const SessionSettings& settings, const std::vector<RateRule>& broker_defaults)
    : base_url_(settings.base_url),
      max_attempts_(std::max<std::uint32_t>(settings.max_attempts, 1)),
      learn_(settings.learn_rate_limits) {
  const auto& rules = settings.rate_limits.empty() ? broker_defaults : settings.rate_limits;
  for (const RateRule& r : rules) {
    if (r.path.empty()) {
      for (const auto& w : r.windows) host_windows_.push_back(w);
    } else {
      named_.push_back(r);
    }
  }
}

SessionRate::~SessionRate() {
  if (limiter_ == nullptr) return;
  answered_all(last_now_);
  for (auto& [name, k] : cache_) limiter_->release(k);
}

RateLimiter::Key* SessionRate::cached(const std::string& name, const RateWindows* declare) {
  auto it = cache_.find(name);
  if (it != cache_.end()) return it->second;
  RateLimiter::Key* k = limiter_->key(name);
  limiter_->acquire(k);
  if (declare != nullptr) limiter_->declare(k, *declare);
  cache_.emplace(name, k);
  return k;
}

bool SessionRate::keys_of(const protocol::HeldStatement& s, Keys& out) {
  const std::string_view method = s.method();
  std::string_view url = s.url();
  if (!url.empty() && url.front() == '/') {
    scratch_.assign(base_url_);
    while (!scratch_.empty() && scratch_.back() == '/') scratch_.pop_back();
    scratch_ += url;
    url = scratch_;
  }
  std::string_view host, path;
  if (!SplitUrl(url, host, path)) return false;
  // Keys are spelled "host H", "rule NAME H", "endpoint METHOD TEMPLATE H".
  std::string& name = name_;
  name.assign("host ");
  for (char c : host) name += static_cast<char>(c >= 'A' && c <= 'Z' ? c - 'A' + 'a' : c);
  host_.assign(name, 5);
  const std::string& host_copy = host_;
  out.size = 0;
  out.keys[out.size++] = cached(name, &host_windows_);
  for (const RateRule& r : named_) {
    if (out.size == out.keys.size()) break;
    if (!r.method.empty() && r.method != method) continue;
    if (!MatchRatePath(r.path, path)) continue;
    name.assign("rule ").append(r.name).append(" ").append(host_copy);
    out.keys[out.size++] = cached(name, &r.windows);
  }
  if (out.size == 1 && learn_) {
    name.assign("endpoint ").append(method).append(" ");
    AppendTemplate(name, path);
    name.append(" ").append(host_copy);
    out.keys[out.size++] = cached(name, nullptr);
  }
  return true;
}

RateTime SessionRate::take(std::deque<protocol::HeldStatement>& pending, std::size_t n, RateTime now,
                           std::vector<protocol::HeldStatement>& out) {
  last_now_ = std::max(last_now_, now);
  RateTime wake = kNever;
  std::size_t taken = 0;
  for (auto it = pending.begin(); it != pending.end() && taken < n;) {
    if (!not_before_.empty()) {
      if (auto nb = not_before_.find(it->index); nb != not_before_.end()) {
        if (nb->second > now) {  // a retry still waiting out its backoff
          wake = std::min(wake, nb->second);
          ++it;
          continue;
        }
        not_before_.erase(nb);
      }
    }
    Keys keys;
    if (keys_of(*it, keys)) {
      // Back in the queue while its earlier request was never answered (a
      // lease lost on a path that did not say so): that one is given up.
      if (!granted_.empty()) answered(it->index, now);
      RateTime at = RateTime::min();
      for (std::size_t i = 0; i < keys.size; ++i) at = std::max(at, limiter_->ready_at(keys.keys[i], now));
      if (at > now) {  // waits; the statements behind it are looked at all the same
        wake = std::min(wake, at);
        Wait& w = waits_[it->index];
        if (!w.waiting) {
          w.waiting = true;
          w.since = now;
        }
        ++it;
        continue;
      }
      for (std::size_t i = 0; i < keys.size; ++i) limiter_->record(keys.keys[i], now);
      granted_.emplace(it->index, keys);
      // What it waited and met so far travels with it (§3.8.8).
      if (auto w = waits_.find(it->index); w != waits_.end()) {
        if (w->second.waiting) w->second.total += now - w->second.since;
        w->second.waiting = false;
        it->rate_wait_us = static_cast<std::uint64_t>(
            std::chrono::duration_cast<std::chrono::microseconds>(w->second.total).count());
      }
      if (auto t = throttles_.find(it->index); t != throttles_.end()) it->throttled = t->second;
    }
    out.push_back(std::move(*it));
    it = pending.erase(it);
    ++taken;
  }
  return wake;
}

void SessionRate::answered(std::uint64_t index, RateTime now) {
  last_now_ = std::max(last_now_, now);
  auto g = granted_.find(index);
  if (g == granted_.end()) return;
  for (std::size_t i = 0; i < g->second.size; ++i) limiter_->answered(g->second.keys[i], now);
  granted_.erase(g);
}

void SessionRate::answered_all(RateTime now) {
  last_now_ = std::max(last_now_, now);
  for (const auto& [index, keys] : granted_) {
    for (std::size_t i = 0; i < keys.size; ++i) limiter_->answered(keys.keys[i], last_now_);
  }
  granted_.clear();
}

bool SessionRate::learn(protocol::HeldStatement& ws, const RateReport& report, RateTime now) {
  Keys keys;
  const bool keyed = keys_of(ws, keys);
  RateLimiter::Key* method = keyed ? keys.method() : nullptr;
  if (keyed && !report.app.empty()) limiter_->declare(keys.host(), report.app);
  if (!report.method.empty() && method != nullptr) limiter_->declare(method, report.method);
  if (report.retry) {
    // A 5xx or a broken connection, handed back with the worker's backoff:
    // the next attempt is granted against the keys like the first.
    if (ws.attempts + 1 >= max_attempts_) return false;  // the worker should have kept it: forwarded
    ++ws.attempts;
    not_before_[ws.index] = now + milliseconds(report.retry_after_ms);
    return true;
  }
  if (!keyed) return false;
  if (!report.throttled) {
    // A reset with nothing remaining, without a 429, pauses the host.
    if (report.retry_after_ms > 0) limiter_->pause(keys.host(), now + milliseconds(report.retry_after_ms));
    return false;
  }
  RateLimiter::Key* hit = report.type == RateLimitType::kMethod && method != nullptr ? method : keys.host();
  limiter_->count_throttled(hit);
  if (report.retry_after_ms > 0) {
    limiter_->pause(hit, now + milliseconds(report.retry_after_ms));
  } else {
    limiter_->backoff(hit, now);
  }
  std::uint32_t& count = throttles_[ws.index];
  ++count;
  if (count < max_attempts_) return true;
  throttles_.erase(ws.index);
  return false;
}

std::vector<RateKeyStats> SessionRate::stats() const {
  std::vector<RateKeyStats> out;
  for (const auto& [name, k] : cache_) out.push_back(limiter_->stats(k));
  std::sort(out.begin(), out.end(), [](const auto& a, const auto& b) { return a.key < b.key; });
  return out;
}

}  // namespace gatherer::broker
