#!/bin/sh
# Sets up a Debian 12 (bookworm) machine for quiesce: QEMU 10 from bookworm-backports
# (bookworm's own 7.2 has neither file: migration nor mapped-ram), the host tools the
# guest image recipe uses, and a Rust toolchain if none is on PATH. Idempotent. Run as root.
set -eu

if [ "$(id -u)" != 0 ]; then
    echo "ci/setup-debian.sh: run as root (sudo ci/setup-debian.sh)" >&2
    exit 1
fi
. /etc/os-release
if [ "${VERSION_CODENAME:-}" != bookworm ]; then
    echo "ci/setup-debian.sh: written for Debian 12 (bookworm); this is ${PRETTY_NAME:-unknown}." >&2
    echo "  On Ubuntu 24.04: apt-get install qemu-system-x86 qemu-utils qemu-guest-agent cpio e2fsprogs xz-utils kmod busybox-static" >&2
    echo "  (QEMU 8.2 there has no mapped-ram; quiesce probes and falls back). See guest-images/linux/README.md." >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
if ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
    echo "==> adding bookworm-backports"
    cat > /etc/apt/sources.list.d/quiesce-backports.sources <<'SOURCES'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
fi

echo "==> apt-get update"
apt-get update -q >/dev/null
echo "==> installing QEMU 10 from bookworm-backports"
apt-get install -y -q -t bookworm-backports qemu-system-x86 qemu-utils qemu-guest-agent >/dev/null
echo "==> installing host tools (guest image recipe, disk seeding, NTFS, a C compiler for blake3, shellcheck)"
apt-get install -y -q cpio e2fsprogs dosfstools ntfs-3g xz-utils kmod gzip ca-certificates gcc libc6-dev shellcheck >/dev/null
echo "==> installing the Windows image tools (xorriso, mtools, wimtools, msitools, p7zip-full)"
apt-get install -y -q xorriso mtools wimtools msitools p7zip-full >/dev/null
echo "==> installing Chromium and xmllint (the HTML report's browser test, the JUnit schema check)"; apt-get install -y -q chromium libxml2-utils >/dev/null

if ! command -v cargo >/dev/null 2>&1; then
    # Debian 12 ships a current Rust as cargo-web/rustc-web (bookworm's plain cargo is too old).
    echo "==> installing Rust (cargo-web, rustc-web)"
    apt-get install -y -q cargo-web rustc-web rust-web-clippy rustfmt-web gcc libc6-dev >/dev/null
fi

qemu-system-x86_64 --version | head -1
cargo --version
