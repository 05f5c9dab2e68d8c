#!/bin/sh
# Runs the Saved State and paused-VM scenarios under the QEMU 8.2 compatibility profile
# (QUIESCE_QEMU_COMPAT=8.2): the code paths of Ubuntu 24.04's QEMU, on this QEMU. They are
# found, not listed: every scenario file that asks for Saved State or has a paused VM.
# Each must pass by its checks (or be skipped, saying why); fixtures are not compared (a
# paused VM's disks stay inactive after a save on 8.2, which the fixtures, made on 10.0,
# do not show). Needs the guest image (ci/test.sh builds it).
set -eu
cd "$(dirname "$0")/.."
files=$(grep -l -e '^method = "saved-state"' -e '^state = "paused"' scenarios/*.toml | sort)
[ -n "$files" ] || { echo "qemu-8.2: found no Saved State or paused-VM scenario" >&2; exit 1; }
reports=target/quiesce-reports-8.2
rm -rf "$reports"
echo "==> scenarios under the QEMU 8.2 profile:" $files
log=$(mktemp)
trap 'rm -f "$log" "$log.status"' EXIT INT TERM
# $QUIESCE_BIN: a quiesce already built (.ci/run passes ci/test.sh's); else cargo builds one.
if [ -n "${QUIESCE_BIN:-}" ]; then set -- "$QUIESCE_BIN"; else set -- cargo run -q --locked -p quiesce --; fi
# Shown as it goes (tee), its exit status kept aside: a pipe would hide it.
# shellcheck disable=SC2086 # one path per word: no scenario file name has a blank
{ QUIESCE_QEMU_COMPAT=8.2 "$@" run --report-dir "$reports" \
    --junit "$reports/junit.xml" $files 2>&1 || echo "$?" >"$log.status"; } | tee "$log"
status=$(cat "$log.status" 2>/dev/null || echo 0)
# quiesce's own count line ("N passed, N failed, N skipped"), as the closing line.
counts=$(grep -E '^[0-9]+ passed, [0-9]+ failed, [0-9]+ skipped$' "$log" | tail -n 1)
echo "qemu-8.2: ${counts:-0 passed, 1 failed}"
exit "$status"
