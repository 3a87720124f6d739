// curl-multi-baseline: the floor of per-request cost that Gatherer is compared
// with (README, "Benchmarks"). One thread, one CURLM, `concurrency` easy handles recycled
// (each keeps its options; only the URL and body target change per transfer),
// connections reused through the multi's connection cache, bodies written in
// input order as soon as each is next (one that finished early waits, and is
// freed once written, as Gatherer's output does); --cacert FILE trusts that CA
// for https. Reads URLs one per line from stdin; prints
//   ok <n> failed <f> seconds <s> req_per_s <r> p50_ms <a> p99_ms <b>
// on stderr (p50/p99 of per-transfer time, CURLINFO_TOTAL_TIME_T, nearest
// rank) and, with --print, the bodies on stdout, one a line. Exit 1 if any
// transfer failed or was not a 200.
#include <curl/curl.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <string>
#include <vector>

namespace {
struct Slot {
  CURL* easy = nullptr;
  std::size_t index = 0;
  std::string* body = nullptr;
};

size_t Write(char* data, size_t size, size_t n, void* user) {
  auto* slot = static_cast<Slot*>(user);
  if (slot->body->empty()) {
    // One allocation when the length is known, as Gatherer's worker does.
    curl_off_t length = -1;
    if (curl_easy_getinfo(slot->easy, CURLINFO_CONTENT_LENGTH_DOWNLOAD_T, &length) == CURLE_OK && length > 0) {
      slot->body->reserve(static_cast<std::size_t>(length));
    }
  }
  slot->body->append(data, size * n);
  return size * n;
}

// Nearest-rank percentile in milliseconds of microsecond samples.
double PercentileMs(std::vector<curl_off_t> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const auto rank = static_cast<std::size_t>(std::ceil(p * static_cast<double>(v.size())));
  return static_cast<double>(v[std::max<std::size_t>(rank, 1) - 1]) / 1000.0;
}
}  // namespace

int main(int argc, char** argv) {
  long concurrency = 256;
  bool print = false;
  const char* cacert = nullptr;  // https: the trusted CA, in place of the system's
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--concurrency") == 0 && i + 1 < argc) concurrency = std::atol(argv[++i]);
    else if (std::strcmp(argv[i], "--print") == 0) print = true;
    else if (std::strcmp(argv[i], "--cacert") == 0 && i + 1 < argc) cacert = argv[++i];
  }
  if (concurrency < 1) {
    std::fprintf(stderr, "curl-multi-baseline: --concurrency must be >= 1\n");
    return 2;
  }
  std::vector<std::string> urls;
  for (std::string line; std::getline(std::cin, line);) {
    if (!line.empty()) urls.push_back(line);
  }
  curl_global_init(CURL_GLOBAL_DEFAULT);
  CURLM* multi = curl_multi_init();
  curl_multi_setopt(multi, CURLMOPT_MAXCONNECTS, concurrency);
  std::vector<std::string> bodies(urls.size());
  std::vector<bool> finished(urls.size(), false);
  std::size_t written = 0;  // bodies before this index are written and freed
  std::vector<long> status(urls.size(), 0);
  std::vector<curl_off_t> micros(urls.size(), 0);
  std::vector<Slot> slots(static_cast<std::size_t>(concurrency));
  std::vector<Slot*> free_slots;
  for (auto& s : slots) {
    s.easy = curl_easy_init();
    curl_easy_setopt(s.easy, CURLOPT_WRITEFUNCTION, Write);
    curl_easy_setopt(s.easy, CURLOPT_PRIVATE, &s);
    curl_easy_setopt(s.easy, CURLOPT_WRITEDATA, &s);
    curl_easy_setopt(s.easy, CURLOPT_NOSIGNAL, 1L);
    // libcurl's defaults otherwise: HTTP/2 where TLS offers it (ALPN). Over
    // https it waits for a connection that may multiplex, as Gatherer's worker
    // does, rather than opening one per transfer while the first handshake runs.
    if (cacert != nullptr) {
      curl_easy_setopt(s.easy, CURLOPT_CAINFO, cacert);
      curl_easy_setopt(s.easy, CURLOPT_PIPEWAIT, 1L);
    }
    free_slots.push_back(&s);
  }
  const auto start = std::chrono::steady_clock::now();
  std::size_t next = 0, done = 0, failed = 0;
  auto start_one = [&](Slot* s) {
    s->index = next++;
    curl_easy_setopt(s->easy, CURLOPT_URL, urls[s->index].c_str());
    s->body = &bodies[s->index];
    curl_multi_add_handle(multi, s->easy);
  };
  while (done < urls.size()) {
    while (!free_slots.empty() && next < urls.size()) {
      start_one(free_slots.back());
      free_slots.pop_back();
    }
    int running = 0;
    curl_multi_perform(multi, &running);
    int left = 0;
    while (CURLMsg* msg = curl_multi_info_read(multi, &left)) {
      if (msg->msg != CURLMSG_DONE) continue;
      Slot* s = nullptr;
      curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, &s);
      curl_easy_getinfo(msg->easy_handle, CURLINFO_RESPONSE_CODE, &status[s->index]);
      curl_easy_getinfo(msg->easy_handle, CURLINFO_TOTAL_TIME_T, &micros[s->index]);
      if (msg->data.result != CURLE_OK || status[s->index] != 200) ++failed;
      curl_multi_remove_handle(multi, msg->easy_handle);
      finished[s->index] = true;
      free_slots.push_back(s);
      ++done;
    }
    for (; written < urls.size() && finished[written]; ++written) {
      if (print) std::fwrite(bodies[written].data(), 1, bodies[written].size(), stdout), std::fputc('\n', stdout);
      std::string().swap(bodies[written]);
    }
    // Wait only when nothing can be started: polling right after completions
    // would sleep on an idle multi while free slots wait for new transfers.
    const bool can_start = !free_slots.empty() && next < urls.size();
    if (done < urls.size() && !can_start) curl_multi_poll(multi, nullptr, 0, 100, nullptr);
  }
  std::fflush(stdout);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::fprintf(stderr, "ok %zu failed %zu seconds %.3f req_per_s %.0f p50_ms %.3f p99_ms %.3f\n",
               urls.size() - failed, failed, secs, static_cast<double>(urls.size()) / secs,
               PercentileMs(micros, 0.50), PercentileMs(micros, 0.99));
  for (auto& s : slots) curl_easy_cleanup(s.easy);
  curl_multi_cleanup(multi);
  return failed ? 1 : 0;
}
