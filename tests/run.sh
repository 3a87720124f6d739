#!/usr/bin/env bash
# All tests on a fresh Debian 12 machine (as root): install, then build and run
# the whole ctest suite three times: release, ASan+UBSan, TSan; then fuzz
# every decoder for FUZZ_SECONDS per target (tests/fuzz/run.sh, default 30).
# PRESETS="release" FUZZ_SECONDS=0 bash tests/run.sh runs a subset.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/install-deps
for preset in ${PRESETS:-release asan tsan}; do
  echo "=== $preset: build"
  cmake --preset "$preset" >/dev/null
  cmake --build --preset "$preset"
  echo "=== $preset: test"
  ctest --preset "$preset"
done
bash tests/fuzz/run.sh
