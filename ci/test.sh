#!/bin/sh
# Runs quiesce's checks and tests the way CI does. Needs ci/setup-debian.sh first.
# The end-to-end tests boot real guests (TCG where KVM does not work), so they need the
# guest image: `quiesce doctor` builds it once into the cache and reports the accelerator.
set -eu
cd "$(dirname "$0")/.."

export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
export INSTA_UPDATE=no

if cargo fmt --version >/dev/null 2>&1 && cargo clippy --version >/dev/null 2>&1; then
    echo "==> cargo fmt --check"
    cargo fmt --all -- --check
    echo "==> cargo clippy"
    cargo clippy --workspace --all-targets --locked -- -D warnings
else
    echo "==> skipping fmt and clippy: this toolchain has no rustfmt/clippy"
fi
echo "==> quiesce doctor"
cargo run --locked -q -p quiesce -- doctor
echo "==> cargo test"
# --no-fail-fast: a red run should show every failing test binary, not only the first.
cargo test --workspace --locked --no-fail-fast

left=$(pgrep -a qemu-system || true)
if [ -n "$left" ]; then
    echo "QEMU processes were left behind by the tests:" >&2
    echo "$left" >&2
    exit 1
fi
echo "==> all checks passed"
