// JSON string escaping for the CLI's output lines.
#pragma once

#include <string>
#include <string_view>

namespace gatherer::cli {

// Appends `s` escaped as the inside of a JSON string (RFC 8259 §7): '"', '\\'
// and control bytes escaped (\n \r \t \b \f, else \u00XX), every other byte
// as it is, so UTF-8 stays UTF-8. With `latin1`, bytes >= 0x80 are read as
// the code points U+0080..U+00FF and written as \u00XX, which keeps the
// output valid UTF-8 for a string that is not (a Latin-1 header value).
void AppendJsonEscaped(std::string& out, std::string_view s, bool latin1);

// Whether AppendJsonEscaped would write `s` as it is in either mode: ASCII
// with no control byte, '"' or '\\', so valid UTF-8 needing no check. Header
// names and values nearly always are; one table lookup per byte.
bool WrittenAsItIs(std::string_view s);

namespace detail {
// Tests only: true makes AppendJsonEscaped take its SSE2 way where the CPU
// also has SSSE3, so that both ways are checked on one machine.
bool& BaselineEscaping();
}  // namespace detail

}  // namespace gatherer::cli
