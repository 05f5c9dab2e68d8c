#!/bin/sh
# Runs quiesce's checks and tests the way CI does. Needs ci/setup-debian.sh first.
# The end-to-end tests boot real guests (TCG where KVM does not work), so they need the
# guest image: `quiesce doctor` builds it once into the cache and reports the accelerator.
# They are behind the vm-tests feature (plain `cargo test` leaves them out); this runs all.
set -eu
cd "$(dirname "$0")/.."

export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
export INSTA_UPDATE=no

if cargo fmt --version >/dev/null 2>&1 && cargo clippy --version >/dev/null 2>&1; then
    echo "==> cargo fmt --check"
    cargo fmt --all -- --check
    echo "==> cargo clippy"
    cargo clippy --workspace --all-targets --all-features --locked -- -D warnings
else
    echo "==> skipping fmt and clippy: this toolchain has no rustfmt/clippy"
fi
echo "==> shellcheck"
# Every shell script of the guest image recipe (build.sh and the guest's programs under
# rootfs/ and initrd/) and of CI, found by its #!/bin/sh line so that a new one is checked
# without being listed here. -S warning: a warning fails CI, info and style notes do not.
# A missing shellcheck fails too: a lint that skips itself would pass with scripts broken.
if ! command -v shellcheck >/dev/null 2>&1; then
    echo "shellcheck is not installed: apt-get install shellcheck (ci/setup-debian.sh does)" >&2
    exit 1
fi
scripts=$(find guest-images ci .ci -type f -exec awk 'FNR == 1 && /^#!\/bin\/sh/ { print FILENAME }' {} + | sort)
[ -n "$scripts" ] || { echo "shellcheck: found no scripts to check" >&2; exit 1; }
# shellcheck disable=SC2086 # one path per word: no script path has a blank
shellcheck -S warning $scripts
echo "==> cargo test --no-run (building the tests, with the guest tests)"
cargo test --workspace --locked --all-features --no-run
echo "==> quiesce doctor"
# The quiesce binary the test build has just made (the guest tests run it too). `cargo run`
# would build quiesce and half its dependencies a second time, with other features (no
# vm-tests, no dev-dependencies' tokio), for the same program.
QUIESCE_BIN="${CARGO_TARGET_DIR:-target}/debug/quiesce"
export QUIESCE_BIN
"$QUIESCE_BIN" doctor
echo "==> cargo test (with the guest tests)"
# The fuzz targets (harness/tests/fuzz) share this many seconds; a plain `cargo test`
# gives them 4.
export QUIESCE_FUZZ_SECS="${QUIESCE_FUZZ_SECS:-60}"
# --no-fail-fast: a red run should show every failing test binary, not only the first.
cargo test --workspace --locked --no-fail-fast --all-features

left=$(pgrep -a qemu-system || true)
if [ -n "$left" ]; then
    echo "QEMU processes were left behind by the tests:" >&2
    echo "$left" >&2
    exit 1
fi
echo "==> all checks passed"
