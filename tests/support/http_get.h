#pragma once
// A plain GET with libcurl, for tests that read an HTTP endpoint of a
// Gatherer process (/metrics, a Prometheus query). Link CURL::libcurl.

#include <curl/curl.h>

#include <string>

namespace gatherer::testing {

// The body of GET `url`; "" on any failure or a status other than 200.
// Gives up after 2 s.
inline std::string HttpGet(const std::string& url) {
  std::string body;
  CURL* easy = curl_easy_init();
  if (!easy) return body;
  curl_easy_setopt(easy, CURLOPT_URL, url.c_str());
  curl_easy_setopt(easy, CURLOPT_TIMEOUT_MS, 2000L);
  curl_easy_setopt(easy, CURLOPT_WRITEFUNCTION, +[](char* p, size_t size, size_t n, void* out) {
    static_cast<std::string*>(out)->append(p, size * n);
    return size * n;
  });
  curl_easy_setopt(easy, CURLOPT_WRITEDATA, &body);
  long status = 0;
  if (curl_easy_perform(easy) != CURLE_OK) body.clear();
  curl_easy_getinfo(easy, CURLINFO_RESPONSE_CODE, &status);
  curl_easy_cleanup(easy);
  return status == 200 ? body : std::string();
}

}  // namespace gatherer::testing
