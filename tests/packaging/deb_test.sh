#!/usr/bin/env bash
# The .deb (cpack -G DEB) holds what an operator installs and nothing else:
# the three binaries (which run), the public headers only, the CMake package,
# systemd units for the broker and worker instances (valid to systemd-analyze),
# their settings in /etc/default as conffiles, the dependencies, and a
# postinst that creates the gatherer user. Exits 77 (skipped) without cpack
# or dpkg-deb.
#   deb_test.sh BUILD_DIR WORK_DIR
set -euo pipefail
build=$1 work=$2
command -v cpack >/dev/null && command -v dpkg-deb >/dev/null || { echo "skipped: cpack or dpkg-deb missing"; exit 77; }
rm -rf "$work" && mkdir -p "$work"
cpack --config "$build/CPackConfig.cmake" -B "$work/out" >"$work/cpack.log" 2>&1 || { cat "$work/cpack.log"; exit 1; }
deb=$(ls "$work"/out/gatherer_*.deb)
fail=0
check() { if ! eval "$2"; then echo "FAIL: $1"; fail=1; else echo "ok: $1"; fi; }
files=$(dpkg-deb -c "$deb" | awk '{print $6}')
for f in ./usr/bin/gatherer ./usr/bin/gatherer-broker ./usr/bin/gatherer-worker ./usr/bin/gatherer-ctl \
         ./usr/include/gatherer/gatherer.h ./usr/lib/cmake/gatherer/gathererConfig.cmake \
         ./lib/systemd/system/gatherer-broker.service ./lib/systemd/system/gatherer-worker@.service \
         ./etc/default/gatherer-broker ./etc/default/gatherer-worker; do
  check "contains $f" "grep -qxF '$f' <<<\"\$files\""
done
for f in protocol.h transport.h wake_fd.h curve.h broker.h worker.h; do
  check "no private header $f" "! grep -q '/include/gatherer/$f\$' <<<\"\$files\""
done
info=$(dpkg-deb -I "$deb")
check "depends on libzmq5, libmicrohttpd12 and libtcmalloc-minimal4" "grep -q 'Depends:.*libzmq5.*libmicrohttpd12.*libtcmalloc-minimal4' <<<\"\$info\""
dpkg-deb -e "$deb" "$work/control"
check "/etc/default files are conffiles" "grep -qx /etc/default/gatherer-broker '$work/control/conffiles' && grep -qx /etc/default/gatherer-worker '$work/control/conffiles'"
check "postinst creates the gatherer user" "grep -q 'adduser --system' '$work/control/postinst'"
dpkg-deb -x "$deb" "$work/root"
for b in gatherer gatherer-broker gatherer-worker gatherer-ctl; do
  check "$b runs" "'$work/root/usr/bin/$b' --help >/dev/null"
done
check "the broker unit reads /etc/default/gatherer-broker" "grep -q 'EnvironmentFile=-/etc/default/gatherer-broker' '$work/root/lib/systemd/system/gatherer-broker.service'"
if command -v systemd-analyze >/dev/null; then
  # Verified with ExecStart pointing at the unpacked binaries.
  mkdir -p "$work/units"
  sed "s|/usr/bin/|$work/root/usr/bin/|" "$work/root/lib/systemd/system/gatherer-broker.service" >"$work/units/gatherer-broker.service"
  sed "s|/usr/bin/|$work/root/usr/bin/|" "$work/root/lib/systemd/system/gatherer-worker@.service" >"$work/units/gatherer-worker@.service"
  cp "$work/units/gatherer-worker@.service" "$work/units/gatherer-worker@1.service"
  out=$(systemd-analyze verify --man=no "$work/units/gatherer-broker.service" "$work/units/gatherer-worker@1.service" 2>&1) || true
  check "systemd-analyze verify says nothing" "[ -z \"\$out\" ]" || true
  [ -z "$out" ] || echo "$out"
else
  echo "systemd-analyze missing: units not verified"
fi
exit $fail
