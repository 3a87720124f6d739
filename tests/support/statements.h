#pragma once
// Statement lists the tests send and the checks of what comes back: URLs
// that point nowhere (for peers that never fetch), GETs and POSTs mixed,
// requests to DelayHandler's /d/<i>/<ms> (tests/support/handlers.h), and
// responses "body-<i>" in input order.
//
// Thread-safety: plain functions.

#include <cstddef>
#include <functional>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "gatherer/statement.h"
#include "http_server.h"

namespace gatherer::testing {

// `n` GETs of http://127.0.0.1:1/<i>: nothing listens there, which is what a
// test wants whose raw or echoing worker never fetches.
inline std::vector<Statement> Urls(int n) {
  std::vector<Statement> out;
  for (int i = 0; i < n; ++i) out.push_back(Get("http://127.0.0.1:1/" + std::to_string(i)));
  return out;
}

// Urls(n), statement i a POST where `post(i)` says so.
inline std::vector<Statement> Mixed(int n, const std::function<bool(int)>& post) {
  std::vector<Statement> out = Urls(n);
  for (int i = 0; i < n; ++i) {
    if (post(i)) out[i].method = "POST";
  }
  return out;
}

// `n` GETs of DelayHandler's /d/<i>/<delay_ms> on `server`: each answers
// "body-<i>" after `delay_ms`.
inline std::vector<Statement> Delayed(const HttpServer& server, int n, int delay_ms) {
  std::vector<Statement> list;
  for (int i = 0; i < n; ++i) {
    std::string path = "/d/" + std::to_string(i);
    path += "/";
    path += std::to_string(delay_ms);
    list.push_back(Get(server.url(path)));
  }
  return list;
}

// `n` responses, each the "body-<i>" of DelayHandler in input order.
inline void ExpectAllBodies(const std::vector<Response>& responses, std::size_t n) {
  ASSERT_EQ(responses.size(), n);
  for (std::size_t i = 0; i < n; ++i) {
    ASSERT_TRUE(responses[i].ok()) << i << ": " << responses[i].error->message;
    ASSERT_EQ(responses[i].body, "body-" + std::to_string(i));
  }
}

}  // namespace gatherer::testing
