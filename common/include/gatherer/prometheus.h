#pragma once
// Prometheus text exposition (format 0.0.4) helpers shared by the broker's
// and the worker's /metrics: a label value escaped, and a metric's HELP and
// TYPE lines.
//
// Pure functions; safe from any thread.

#include <string>
#include <string_view>

namespace gatherer {

// `value` as a label value: backslash, double quote and newline escaped.
inline std::string PrometheusLabel(std::string_view value) {
  std::string out;
  out.reserve(value.size());
  for (char c : value) {
    if (c == '\n') {
      out += "\\n";
      continue;
    }
    if (c == '\\' || c == '"') out += '\\';
    out += c;
  }
  return out;
}

// Appends "# HELP name help" and "# TYPE name type" to `out`.
inline void PrometheusHeader(std::string& out, std::string_view name, std::string_view type, std::string_view help) {
  out.append("# HELP ").append(name).append(" ").append(help).append("\n# TYPE ").append(name).append(" ")
      .append(type).append("\n");
}

}  // namespace gatherer
