#!/bin/sh
# Proves that the guest image recipe does not depend on the host's apt or e2fsprogs: it
# builds guest-images/linux in a private mount namespace where the host's apt
# configuration, sources, lists, caches and keyrings are empty folders and its mke2fs,
# debugfs and e2fsck cannot run, and compares every output byte for byte with a reference
# build made the ordinary way. An Ubuntu host, which has no Debian sources at all, is in
# the same place as this namespace.
#
#   sh ci/recipe-independence.sh [REFERENCE]
#
# REFERENCE: the folder of an image built as usual (`quiesce image path linux`); without
# it, a reference is built first, outside the namespace. Needs root (or unprivileged user
# namespaces) and util-linux's unshare. Downloads are shared through $QUIESCE_DEB_CACHE
# (default: a folder of its own, removed at the end).
set -eu
cd "$(dirname "$0")/.."
recipe=$PWD/guest-images/linux
work=$(mktemp -d "${TMPDIR:-/tmp}/quiesce-recipe-XXXXXX")
trap 'rm -rf "$work"' EXIT INT TERM
debs=${QUIESCE_DEB_CACHE:-$work/debs}
export QUIESCE_DEB_CACHE="$debs"

if [ $# -ge 1 ]; then
    reference=$1
else
    echo "==> building the reference image the ordinary way"
    sh "$recipe/build.sh" "$work/reference" 2>"$work/reference.log" \
        || { tail -n 20 "$work/reference.log" >&2; exit 1; }
    reference=$work/reference
fi
[ -f "$reference/root.img" ] || { echo "recipe-independence: $reference holds no built image" >&2; exit 1; }

if [ "$(id -u)" = 0 ]; then as_root=""; else as_root="--map-root-user"; fi
echo "==> building it again with the host's apt state and e2fsprogs hidden"
: > "$work/not-a-program"
# shellcheck disable=SC2016 # expanded by the inner shell, inside the namespace
unshare $as_root --mount --propagation private sh -eu -c '
    for d in /etc/apt /var/lib/apt /var/cache/apt /usr/share/keyrings; do
        if [ -d "$d" ]; then mount -t tmpfs -o size=1m,mode=0755 none "$d"; fi
    done
    for t in mke2fs mkfs.ext4 debugfs e2fsck; do
        for d in /sbin /usr/sbin; do
            if [ -e "$d/$t" ] && [ ! -L "$d/$t" ]; then mount --bind "$1" "$d/$t"; fi
        done
    done
    # The proof that the hiding took: the host sees no apt source and cannot run mke2fs.
    if [ -n "$(ls -A /etc/apt)" ] || mke2fs -V >/dev/null 2>&1; then
        echo "recipe-independence: the host apt state or mke2fs is still visible" >&2; exit 1
    fi
    sh "$2/build.sh" "$3"
' sh "$work/not-a-program" "$recipe" "$work/isolated" 2>"$work/isolated.log" \
    || { tail -n 20 "$work/isolated.log" >&2; exit 1; }

status=0
for f in vmlinuz initrd.img root.img cmdline packages.lock kernel-release; do
    a=$(sha256sum < "$reference/$f" | cut -d' ' -f1)
    b=$(sha256sum < "$work/isolated/$f" | cut -d' ' -f1)
    if [ "$a" = "$b" ]; then
        echo "same      $f $a"
    else
        echo "DIFFERENT $f: reference $a, without the host's apt $b" >&2
        status=1
    fi
done
if [ "$status" != 0 ]; then
    echo "recipe-independence: the image depends on the host (package versions: diff the two packages.lock)" >&2
    diff "$reference/packages.lock" "$work/isolated/packages.lock" >&2 || true
    exit 1
fi
echo "==> the recipe gives the same image without the host's apt sources"
