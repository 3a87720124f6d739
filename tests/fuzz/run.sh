#!/usr/bin/env bash
# Builds the libFuzzer targets of tests/fuzz with Debian 12's clang 14 in
# build/fuzz and runs each for a bounded time, one after the other.
#
#   FUZZ_SECONDS=30   seconds per target (0: do nothing)
#   FUZZ_TARGETS      targets to run, default "protocol_fuzzer jsonl_fuzzer"
#
# Each target starts from a copy of its committed corpus
# (tests/fuzz/corpus/<target>) in a temporary directory, so a run never
# changes the repository. A crash, leak, timeout or failed check stops the
# script with a non-zero status; the input that caused it is kept in
# build/fuzz/artifacts/<target>/ (add it to the corpus and to a regression
# test once fixed).
#
# The other build dependencies come from .ci/install-deps; clang and the
# libFuzzer runtime are installed here if missing (as root).
set -euo pipefail
cd "$(dirname "$0")/../.."

seconds=${FUZZ_SECONDS:-30}
targets=${FUZZ_TARGETS:-protocol_fuzzer jsonl_fuzzer}
if [ "$seconds" = 0 ]; then
  echo "=== fuzz: skipped (FUZZ_SECONDS=0)"
  exit 0
fi

# clang-14 does not pull its compiler-rt (sanitizer and libFuzzer runtimes)
# without recommends; libclang-rt-14-dev holds libclang_rt.fuzzer-x86_64.a.
if ! command -v clang++-14 >/dev/null || ! compgen -G "/usr/lib/llvm-14/lib/clang/*/lib/linux/libclang_rt.fuzzer-x86_64.a" >/dev/null; then
  if [ "$(id -u)" != 0 ]; then
    echo "fuzz: clang-14 and libclang-rt-14-dev are needed (apt-get install clang-14 libclang-rt-14-dev)" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends clang-14 libclang-rt-14-dev >/dev/null
fi

build=build/fuzz
echo "=== fuzz: build"
CC=clang-14 CXX=clang++-14 cmake -S . -B "$build" -G Ninja \
  -DGATHERER_FUZZ=ON -DGATHERER_BUILD_TESTS=OFF -DCMAKE_BUILD_TYPE=Debug \
  -DCMAKE_CXX_FLAGS="-O1 -fsanitize=fuzzer-no-link,address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer" \
  >/dev/null
# shellcheck disable=SC2086
cmake --build "$build" -j2 --target $targets

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
for t in $targets; do
  echo "=== fuzz: $t, ${seconds}s"
  mkdir -p "$work/$t" "$build/artifacts/$t"
  cp tests/fuzz/corpus/"$t"/* "$work/$t"/
  # One process (libFuzzer's default; -jobs would fork and log to files);
  # 4 KiB inputs hold every message shape; an input slower than 10 s or a
  # process above 2 GiB counts as a failure.
  if "$build/tests/fuzz/$t" "$work/$t" -dict=tests/fuzz/"$t".dict \
       -max_total_time="$seconds" -max_len=4096 -timeout=10 -rss_limit_mb=2048 \
       -print_final_stats=1 -artifact_prefix="$build/artifacts/$t/" >"$work/$t.log" 2>&1; then
    grep -E '^(#[0-9]+[[:space:]]+DONE|stat::(number_of_executed_units|peak_rss_mb))' "$work/$t.log"
  else
    tail -n 80 "$work/$t.log" >&2
    echo "fuzz: $t failed; the input is in $build/artifacts/$t/" >&2
    exit 1
  fi
done
echo "=== fuzz: all targets ran ${seconds}s without a failure"
