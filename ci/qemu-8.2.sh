#!/bin/sh
# Runs the Saved State and paused-VM scenarios under the QEMU 8.2 compatibility profile
# (QUIESCE_QEMU_COMPAT=8.2): the code paths of Ubuntu 24.04's QEMU, on this QEMU. Each must
# pass by its checks; fixtures are not compared (a paused VM's disks stay inactive after
# a save on 8.2, which the fixtures, made on 10.0, do not show). Needs the guest image
# (ci/test.sh builds it).
set -eu
cd "$(dirname "$0")/.."
SCENARIOS="saved-state-running saved-state-paused saved-state-two-disks fallback-vm-paused harness-interrupted set-one-fails-save"
files=""
for s in $SCENARIOS; do files="$files scenarios/$s.toml"; done
reports=target/quiesce-reports-8.2
rm -rf "$reports"
echo "==> scenarios under the QEMU 8.2 profile:$files"
# shellcheck disable=SC2086 # one path per word
QUIESCE_QEMU_COMPAT=8.2 cargo run -q --locked -p quiesce -- run --report-dir "$reports" $files
n=$(echo "$SCENARIOS" | wc -w)
echo "qemu-8.2 profile: $n passed, 0 failed"
