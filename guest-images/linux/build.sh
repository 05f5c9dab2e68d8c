#!/bin/sh
# build.sh OUTDIR -- build the quiesce Linux test guest from Debian packages.
#
# Outputs (in OUTDIR):
#   vmlinuz        Debian 6.12 kernel (cloud-amd64 flavour by default)
#   initrd.img     gzip'ed newc cpio: static busybox + the modules needed to
#                  mount the root disk; /init mounts root= and switch_roots
#   root.img       raw ext4 image (256 MiB, sparse): busybox, qemu-guest-agent
#                  + libs, e2fsprogs + libs, sqlite3 + libs, all kernel modules,
#                  /sbin/init, /usr/bin/quiesce-app (+ its fsfreeze hook)
#   cmdline        recommended kernel command line
#   packages.lock  "name version" of every Debian package used (sorted), plus
#                  "@kernel-release <uname -r>" as the first line
#   kernel-release uname -r of the kernel
#
# The guest's own programs and configuration are real files beside this
# script: rootfs/ holds what lands in root.img at the same path (/sbin/init,
# the shutdown wrappers, the fsfreeze hook, quiesce-app, /etc), and initrd/
# what lands in the initramfs (/init).  This script keeps only the build: it
# needs no root privileges (no loop mounts, no mknod, no chroot) and produces
# the same bytes for the same package versions (see README.md,
# "Reproducibility").
#
# Host packages needed (Debian 12 or Ubuntu 24.04):
#   apt dpkg coreutils findutils sed grep gzip
#   cpio            <- not installed on a minimal Debian 12: apt-get install cpio
# The packages come from Debian bookworm (with -updates, -security and
# -backports, for qemu-guest-agent 10.0.x) through the recipe's own apt: its
# own sources list, archive keys (debian-archive-bookworm.asc, beside this
# script), lists, cache and an empty dpkg status, under the .deb cache. The
# host's apt sources, pins, configuration and installed packages play no part,
# so an Ubuntu host builds the same image as a Debian one.
# busybox (for depmod, unxz and the applet list) is the one from the downloaded
# busybox-static .deb, and mkfs.ext4, debugfs and e2fsck the ones from the
# downloaded e2fsprogs, run on the host through the image's own ld.so: the
# host's e2fsprogs release cannot change root.img.
#
# Environment knobs (all optional):
#   QUIESCE_DEB_CACHE       folder to keep/reuse downloaded .deb files (and the
#                           recipe's apt lists, under apt/)
#   QUIESCE_DEBIAN_MIRROR   Debian mirror (default http://deb.debian.org/debian)
#   QUIESCE_DEBIAN_SECURITY Debian security mirror (default http://deb.debian.org/debian-security)
#   QUIESCE_KERNEL_FLAVOUR  cloud-amd64 (default) or amd64
#   QUIESCE_KERNEL_PACKAGE  exact kernel package, e.g. linux-image-6.12.117+deb12-cloud-amd64
#                           (default: what the linux-image-6.12-<flavour> meta-package depends on)
#   QUIESCE_QGA_RELEASE     apt release for qemu-guest-agent (default bookworm-backports)
#   QUIESCE_ROOT_SIZE       size of root.img for mkfs.ext4 (default 256M)
#   SOURCE_DATE_EPOCH       timestamp for every file/filesystem (default 1735689600 = 2025-01-01)
set -eu
umask 022
export LC_ALL=C TZ=UTC
unset CDPATH GREP_OPTIONS 2>/dev/null || true

prog=build.sh
say() { printf '==> %s\n' "$*" >&2; }
die() { printf '%s: error: %s\n' "$prog" "$*" >&2; exit 1; }
# write stdin to a file, never through an existing symlink
put() { rm -f "$1"; cat > "$1"; }

[ $# -eq 1 ] || die "usage: sh build.sh OUTDIR"
# the recipe folder: rootfs/, initrd/ and mke2fs.conf are read from it
HERE=$(cd "$(dirname "$0")" && pwd) || die "cannot find the folder of $0"

# ---------------------------------------------------------------- guest files
# Modes of the files under rootfs/ and initrd/; every other file there gets 0644.
# They are set here, never taken from the recipe folder: quiesce unpacks the recipe
# embedded in its binary, which keeps no modes, and a checkout may have any umask.
# A file that starts with #! must be listed, so that no guest program can land
# without its executable bit.
GUEST_MODES='
initrd/init                                 0755
rootfs/etc/qemu/fsfreeze-hook               0755
rootfs/etc/qemu/fsfreeze-hook.d/quiesce-app 0755
rootfs/etc/shadow                           0640
rootfs/sbin/halt                            0755
rootfs/sbin/init                            0755
rootfs/sbin/poweroff                        0755
rootfs/sbin/quiesce-shutdown                0755
rootfs/sbin/reboot                          0755
rootfs/sbin/shutdown                        0755
rootfs/usr/bin/quiesce-app                  0755
'
guest_mode() { # TREE/PATH -> its mode in GUEST_MODES, or nothing
    printf '%s\n' "$GUEST_MODES" | while read -r p m; do
        if [ "$p" = "$1" ]; then echo "$m"; break; fi
    done
}
# install_guest_files TREE DEST: every file of $HERE/TREE to the same path under DEST
install_guest_files() {
    [ -d "$HERE/$1" ] || die "the recipe has no $1/ folder (in $HERE)"
    odd=$(cd "$HERE/$1" && find . ! -type f ! -type d | head -n 1)
    [ -z "$odd" ] || die "$1/${odd#./} is not a plain file (the recipe holds files only)"
    (cd "$HERE/$1" && find . -type f) | sort | while read -r f; do
        f=${f#./}
        mode=$(guest_mode "$1/$f")
        if [ -z "$mode" ]; then
            [ "$(head -c 2 "$HERE/$1/$f")" != '#!' ] \
                || die "$1/$f is a program: give it its mode in GUEST_MODES"
            mode=0644
        fi
        mkdir -p "$2/$(dirname "$f")"
        put "$2/$f" < "$HERE/$1/$f"
        chmod "$mode" "$2/$f"
    done
    printf '%s\n' "$GUEST_MODES" | while read -r p m; do
        case $p in
            "$1"/*) [ -f "$HERE/$p" ] || die "GUEST_MODES lists $p, which the recipe does not have" ;;
        esac
    done
}

# ---------------------------------------------------------------- host tools
need_tool() { # tool package
    command -v "$1" >/dev/null 2>&1 && return 0
    for d in /usr/sbin /sbin; do
        if [ -x "$d/$1" ]; then PATH="$PATH:$d"; export PATH; return 0; fi
    done
    die "host tool '$1' not found: install the Debian package '$2' (apt-get install $2)"
}
need_tool apt-get apt
need_tool apt-cache apt
need_tool dpkg-deb dpkg
need_tool cpio cpio
need_tool gzip gzip
need_tool find findutils
need_tool sort coreutils
need_tool sha256sum coreutils
need_tool touch coreutils
need_tool sed sed
need_tool grep grep
cpio --help 2>/dev/null | grep -q -- '--reproducible' \
    || die "cpio does not support --reproducible: install GNU cpio >= 2.12 (apt-get install cpio)"

# ---------------------------------------------------------------- settings
SDE=${SOURCE_DATE_EPOCH:-1735689600}
case $SDE in ''|*[!0-9]*) die "SOURCE_DATE_EPOCH must be a number of seconds";; esac
[ "$SDE" -gt 0 ] || die "SOURCE_DATE_EPOCH must be > 0 (E2FSPROGS_FAKE_TIME ignores 0)"
KFLAV=${QUIESCE_KERNEL_FLAVOUR:-cloud-amd64}
QGA_RELEASE=${QUIESCE_QGA_RELEASE:-bookworm-backports}
ROOT_SIZE=${QUIESCE_ROOT_SIZE:-256M}
# Fixed identifiers so that two builds give the same bytes.
FS_UUID=5143e515-c0de-4a11-9e57-000000000001
HASH_SEED=5143e515-c0de-4a11-9e57-000000000002
FS_LABEL=quiesce-root
# no_timer_check: the kernel's early check that the 8254 timer reaches the IO-APIC times a
# busy loop; under TCG on a loaded host the vCPU is starved during it, the check fails
# ("MP-BIOS bug: 8254 timer not connected to IO-APIC"), and the kernel wires the timer a
# way that then never ticks: the boot stalls (RCU stall, no agent within 90 s). Seen with
# two scenarios at once on a 2-core host at a load of 20. Cloud images pass it for the
# same reason; QEMU's timer is known to work, so there is nothing to check.
CMDLINE="console=ttyS0 root=/dev/vda rootfstype=ext4 rw panic=-1 quiet no_timer_check"
# Modules the initrd loads (those built into the kernel are skipped).
# Only what mounting root needs: the rest (xfs, vfat, ntfs3, ...) is on root.img and
# loads on demand when something mounts such a filesystem. Loading xfs at boot alone
# cost about 1.3 s under TCG.
INITRD_MODULES="virtio_pci virtio_blk virtio_console crc32c_generic libcrc32c ext4"
# Debian packages installed into root.img, besides busybox-static and the
# kernel.  The library set is checked after extraction: every ELF file in
# /bin /sbin /usr/bin /usr/sbin must resolve all its libraries inside the image.
ROOT_PKGS="libc6 libgcc-s1 libglib2.0-0 libpcre2-8-0 libnuma1 libudev1 liburing2 e2fsprogs libext2fs2 libcom-err2 libss2 libblkid1 libuuid1"
# sqlite3 CLI for /usr/bin/quiesce-app (readline-common, a Depends of
# libreadline8, is only data the CLI does not need in batch mode)
ROOT_PKGS="$ROOT_PKGS sqlite3 libsqlite3-0 libreadline8 libtinfo6 zlib1g"

mkdir -p "$1"
OUT=$(cd "$1" && pwd)
W=$(mktemp -d "$OUT/.work.XXXXXX")
if [ -n "${QUIESCE_DEB_CACHE:-}" ]; then
    mkdir -p "$QUIESCE_DEB_CACHE"
    CACHE=$(cd "$QUIESCE_DEB_CACHE" && pwd)
    KEEP_CACHE=1
else
    CACHE=$OUT/.debs
    mkdir -p "$CACHE"
    KEEP_CACHE=0
fi
cleanup() {
    rc=$?
    chmod -R u+rwx "$W" 2>/dev/null || true
    rm -rf "$W"
    if [ "$KEEP_CACHE" = 0 ]; then rm -rf "$CACHE"; fi
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

# ---------------------------------------------------------------- apt state
# The recipe's own apt (see the top of this file). APT_CONFIG is read before
# anything else, so it can turn off the host's apt.conf.d, sources, pins and
# trusted keys; -o on the command line would come too late for those.
MIRROR=${QUIESCE_DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY=${QUIESCE_DEBIAN_SECURITY:-http://deb.debian.org/debian-security}
KEYRING=$HERE/debian-archive-bookworm.asc
[ -f "$KEYRING" ] || die "the recipe has no debian-archive-bookworm.asc (in $HERE)"
A=$CACHE/apt
mkdir -p "$A/empty" "$A/lists/partial" "$A/archives/partial" "$A/log"
: > "$A/status"
put "$A/sources.list" <<EOF
deb [signed-by=$KEYRING] $MIRROR bookworm main
deb [signed-by=$KEYRING] $MIRROR bookworm-updates main
deb [signed-by=$KEYRING] $SECURITY bookworm-security main
deb [signed-by=$KEYRING] $MIRROR bookworm-backports main
EOF
put "$A/apt.conf" <<EOF
Dir::Etc::main "/dev/null";
Dir::Etc::parts "$A/empty";
Dir::Etc::sourcelist "$A/sources.list";
Dir::Etc::sourceparts "$A/empty";
Dir::Etc::preferences "/dev/null";
Dir::Etc::preferencesparts "$A/empty";
Dir::Etc::trusted "/dev/null";
Dir::Etc::trustedparts "$A/empty";
Dir::State "$A";
Dir::State::lists "$A/lists/";
Dir::State::status "$A/status";
Dir::Cache "$A";
Dir::Cache::archives "$A/archives/";
Dir::Log "$A/log";
APT::Architecture "amd64";
APT::Architectures { "amd64"; };
Acquire::Languages "none";
EOF
if [ "$(id -u)" = 0 ]; then
    # apt drops to the _apt user for downloads; it may not be able to write
    # to our folder.  Downloads are verified against the signed index anyway.
    echo 'APT::Sandbox::User "root";' >> "$A/apt.conf"
fi
APT_CONFIG=$A/apt.conf
export APT_CONFIG
export DEBIAN_FRONTEND=noninteractive

pkg_hint() {
    cat >&2 <<EOF
$prog: Debian package '$1' could not be resolved/downloaded from the recipe's
own apt sources ($A/sources.list: bookworm, bookworm-updates,
bookworm-security and bookworm-backports at $MIRROR and $SECURITY).
  - the mirror may be out of reach: set QUIESCE_DEBIAN_MIRROR and
    QUIESCE_DEBIAN_SECURITY, or http_proxy;
  - an old version may have left the mirror: rebuild to take the current one.
EOF
}

say "updating the recipe's own package lists"
if ! apt-get update -q >"$W/apt-update.log" 2>&1; then
    cat "$W/apt-update.log" >&2
    die "apt-get update of the recipe's own sources failed (see above)"
fi

# fetch SPEC -> prints path of the .deb in $CACHE (reused when the hash matches)
fetch() {
    spec=$1
    if ! uris=$(apt-get download --print-uris "$spec" 2>"$W/apt.err"); then
        cat "$W/apt.err" >&2; pkg_hint "$spec"; exit 1
    fi
    [ -n "$uris" ] || { cat "$W/apt.err" >&2; pkg_hint "$spec"; exit 1; }
    # shellcheck disable=SC2086
    set -- $uris
    file=$2; hash=$4
    case $hash in
        SHA256:*) sum=${hash#SHA256:} ;;
        *) sum="" ;;
    esac
    if [ -f "$CACHE/$file" ] && [ -n "$sum" ] \
        && [ "$(sha256sum < "$CACHE/$file" | cut -d' ' -f1)" = "$sum" ]; then
        :
    else
        rm -f "$CACHE/$file"
        if ! (cd "$CACHE" && apt-get download -q "$spec") >"$W/apt.log" 2>&1 \
            || [ ! -f "$CACHE/$file" ]; then
            cat "$W/apt.log" >&2; pkg_hint "$spec"; exit 1
        fi
        if [ -n "$sum" ] && [ "$(sha256sum < "$CACHE/$file" | cut -d' ' -f1)" != "$sum" ]; then
            die "checksum mismatch for $file"
        fi
    fi
    printf '%s\n' "$CACHE/$file"
}

# ---------------------------------------------------------------- resolve
say "resolving package versions"
if [ -n "${QUIESCE_KERNEL_PACKAGE:-}" ]; then
    KPKG=$QUIESCE_KERNEL_PACKAGE
else
    META=linux-image-6.12-$KFLAV
    KPKG=$(apt-cache depends "$META" 2>/dev/null \
        | sed -n 's/^ *Depends: \(linux-image-6\.12\.[^ ]*\)$/\1/p' | sort | tail -n 1)
    [ -n "$KPKG" ] || { pkg_hint "$META"; exit 1; }
fi
KVER=${KPKG#linux-image-}
case $KVER in
    ''|*[!A-Za-z0-9.+~_-]*) die "unexpected kernel release '$KVER' (from package $KPKG)" ;;
esac

ALL_SPECS="$KPKG busybox-static qemu-guest-agent/$QGA_RELEASE $ROOT_PKGS"
# resolve everything first, so a missing package fails before any download
for spec in $ALL_SPECS; do
    if ! apt-get download --print-uris "$spec" >/dev/null 2>"$W/apt.err"; then
        cat "$W/apt.err" >&2; pkg_hint "$spec"; exit 1
    fi
done

say "downloading packages into $CACHE"
: > "$W/debs"
for spec in $ALL_SPECS; do
    deb=$(fetch "$spec")
    printf '%s\n' "$deb" >> "$W/debs"
done
deb_of() { grep "/$1_[^/]*\.deb\$" "$W/debs" | head -n 1; }

# ---------------------------------------------------------------- extract
say "extracting packages"
mkdir -p "$W/kernel" "$W/bb" "$W/root"
dpkg-deb -x "$(deb_of "$KPKG")" "$W/kernel"
dpkg-deb -x "$(deb_of busybox-static)" "$W/bb"
BB=$W/bb/bin/busybox
[ -x "$BB" ] || die "busybox-static .deb has no bin/busybox"
"$BB" true 2>/dev/null || die "cannot run the downloaded static busybox on this host (needs x86_64 Linux)"
[ -f "$W/kernel/boot/vmlinuz-$KVER" ] || die "$KPKG has no /boot/vmlinuz-$KVER"
[ -d "$W/kernel/lib/modules/$KVER" ] || die "$KPKG has no /lib/modules/$KVER"
KCONFIG=$W/kernel/boot/config-$KVER
for opt in VIRTIO_PCI VIRTIO_BLK VIRTIO_CONSOLE EXT4_FS XFS_FS VFAT_FS NTFS3_FS DEVTMPFS BLK_DEV_INITRD RD_GZIP; do
    grep -q "^CONFIG_$opt=[ym]" "$KCONFIG" \
        || die "kernel $KVER lacks CONFIG_$opt (try QUIESCE_KERNEL_FLAVOUR=amd64)"
done

# package lock: name + version read from the .deb files themselves
{
    printf '@kernel-release %s\n' "$KVER"
    while read -r deb; do
        printf '%s %s\n' "$(dpkg-deb -f "$deb" Package)" "$(dpkg-deb -f "$deb" Version)"
    done < "$W/debs" | sort -u
} > "$W/packages.lock"
QGA_VER=$(grep '^qemu-guest-agent ' "$W/packages.lock" | cut -d' ' -f2)
if command -v qemu-system-x86_64 >/dev/null 2>&1; then
    hostq=$(qemu-system-x86_64 --version 2>/dev/null | sed -n '1s/.*version \([0-9.]*\).*/\1/p')
    case $QGA_VER in
        *:"$hostq"[+~-]*|"$hostq"[+~-]*) ;;
        *) say "note: guest agent $QGA_VER differs from host QEMU $hostq" ;;
    esac
fi

# modules.dep/.alias/.symbols built with the busybox depmod of the guest
# (sorted, so the result does not depend on the host's readdir order); the
# guest's modprobe is busybox's, which reads the text modules.dep.
depmod_tree() { # base
    "$BB" depmod -b "$1" "$KVER"
    for f in modules.dep modules.alias modules.symbols; do
        if [ -f "$1/lib/modules/$KVER/$f" ]; then
            sort "$1/lib/modules/$KVER/$f" > "$W/sorted.tmp"
            mv "$W/sorted.tmp" "$1/lib/modules/$KVER/$f"
        fi
    done
}

# Every package of the root image lands in one tree (they do not overlap).
for spec in "qemu-guest-agent" $ROOT_PKGS; do
    dpkg-deb -x "$(deb_of "$spec")" "$W/root"
done

# ---------------------------------------------------------------- initrd
say "building initrd.img"
I=$W/initrd
mkdir -p "$I/bin" "$I/dev" "$I/proc" "$I/sys" "$I/newroot" "$I/run" "$I/tmp" "$I/etc" "$I/lib/modules/$KVER"
cp "$BB" "$I/bin/busybox"
for a in $("$BB" --list); do
    [ "$a" = busybox ] || ln -s busybox "$I/bin/$a"
done
ln -s bin "$I/sbin"
KM=$W/kernel/lib/modules/$KVER
cp "$KM/modules.builtin" "$KM/modules.order" "$I/lib/modules/$KVER/"
[ -f "$KM/modules.builtin.modinfo" ] && cp "$KM/modules.builtin.modinfo" "$I/lib/modules/$KVER/"
# Debian ships the modules as .ko.xz; busybox modprobe/insmod cannot load
# compressed modules (the kernel can, but only through finit_module with a
# flag busybox does not use), so decompress them here.
find "$KM" -name '*.ko.xz' -exec "$BB" unxz {} +
if find "$KM" -name '*.ko.*' | grep -q .; then
    die "kernel $KVER has modules in an unsupported compression: $(find "$KM" -name '*.ko.*' | head -n 1)"
fi
# full dependency information of the kernel (also used for root.img)
depmod_tree "$W/kernel"
DEP=$KM/modules.dep
: > "$I/etc/initrd-modules"
: > "$W/initrd-files"
for m in $INITRD_MODULES; do
    mu=$(printf '%s' "$m" | tr - _)
    # file names may use '-' or '_' (nls_iso8859-1.ko.xz)
    rx=$(printf '%s' "$mu" | sed 's/_/[-_]/g')
    line=$(grep -E "^([^:]*/)?$rx\.ko(\.[a-z]+)?:" "$DEP" | head -n 1 || true)
    if [ -z "$line" ]; then
        if grep -qE "(^|/)$rx\.ko\$" "$KM/modules.builtin"; then
            continue   # built into the kernel
        fi
        die "kernel $KVER has no module '$m' (neither built-in nor loadable)"
    fi
    printf '%s\n' "$mu" >> "$I/etc/initrd-modules"
    printf '%s\n' "$line" | tr -d ':' | tr ' ' '\n' | grep . >> "$W/initrd-files"
done
sort -u "$W/initrd-files" | while read -r f; do
    mkdir -p "$I/lib/modules/$KVER/$(dirname "$f")"
    cp "$KM/$f" "$I/lib/modules/$KVER/$f"
done
depmod_tree "$I"

install_guest_files initrd "$I"

find "$I" -exec touch -h -d "@$SDE" {} +
(cd "$I" && find . -print0 | sort -z \
    | cpio --null --create --format=newc --reproducible --owner=0:0 --quiet) \
    | gzip -9 -n > "$W/initrd.img"

# ---------------------------------------------------------------- root fs
say "staging root filesystem"
R=$W/root
# drop documentation and init-system glue we do not use
rm -rf "$R/usr/share/doc" "$R/usr/share/man" "$R/usr/share/info" "$R/usr/share/lintian" \
    "$R/usr/share/locale" "$R/usr/share/bug" "$R/etc/init.d" "$R/lib/systemd" "$R/lib/udev" \
    "$R/etc/cron.d" "$R/usr/lib/x86_64-linux-gnu/e2fsprogs" "$R/sbin/e2scrub" \
    "$R/sbin/e2scrub_all" "$R/usr/share/lintian"
rmdir "$R/usr/share" 2>/dev/null || true
for d in bin sbin usr/bin usr/sbin dev proc sys run tmp mnt root home etc/qemu/fsfreeze-hook.d \
    var/log var/tmp var/lib lib/modules; do
    mkdir -p "$R/$d"
done
chmod 1777 "$R/tmp" "$R/var/tmp"
chmod 0700 "$R/root"
ln -s ../run "$R/var/run"
ln -s ../run/lock "$R/var/lock"
cp -R "$KM" "$R/lib/modules/$KVER"

# the guest's own files (rootfs/), then what depends on this build
install_guest_files rootfs "$R"
sed -i "s|@KERNEL_RELEASE@|$KVER|g" "$R/etc/os-release"
if grep -q @KERNEL_RELEASE@ "$R/etc/os-release"; then die "rootfs/etc/os-release: placeholder left"; fi
ln -s ../proc/self/mounts "$R/etc/mtab"
put "$R/etc/quiesce-packages.lock" < "$W/packages.lock"

# busybox applets, for every name not already taken by a real program or by
# one of the guest files above (symlinks are created last: nothing above may
# write through a symlink pointing to /bin/busybox on the host)
put "$R/bin/busybox" < "$BB"
chmod 0755 "$R/bin/busybox"
"$BB" --list-full | while read -r p; do
    case $p in
        */*) ;;
        *) continue ;;          # linuxrc
    esac
    [ -e "$R/$p" ] || [ -L "$R/$p" ] || ln -s /bin/busybox "$R/$p"
done

# every dynamically linked program must find its libraries inside the image
say "checking shared libraries"
LDSO=$R/lib64/ld-linux-x86-64.so.2
LIBPATH=$R/lib/x86_64-linux-gnu:$R/usr/lib/x86_64-linux-gnu
ldso_real=$R/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2
[ -f "$ldso_real" ] || die "libc6 has no dynamic loader"
for f in "$R"/usr/sbin/* "$R"/sbin/* "$R"/usr/bin/* "$R"/bin/*; do
    [ -f "$f" ] && [ ! -L "$f" ] || continue
    case $(head -c 4 "$f" | od -An -c | tr -d ' ') in
        177ELF) ;;
        *) continue ;;
    esac
    # ld.so --verify: 0 = dynamically linked, 1 = static (busybox: --list would crash)
    rc=0
    "$ldso_real" --verify "$f" >/dev/null 2>&1 || rc=$?
    case $rc in
        0) ;;
        1) continue ;;
        *) die "${f#"$R"} is an ELF file the image's ld.so cannot handle (--verify status $rc)" ;;
    esac
    if ! out=$("$ldso_real" --inhibit-cache --library-path "$LIBPATH" --list "$f" 2>&1); then
        die "cannot resolve libraries of ${f#"$R"}: $out"
    fi
    case $out in
        *"not found"*) die "missing library for ${f#"$R"}: $(printf '%s\n' "$out" | grep 'not found')" ;;
    esac
    # ld.so still falls back to the host's /lib/x86_64-linux-gnu after
    # --library-path: every library must come from the image
    outside=$(printf '%s\n' "$out" | sed -n 's/^[[:space:]]*\([^ ]*\) => \(\/[^ ]*\) (.*$/\1 => \2/p' \
        | grep -vF " => $R/" || true)
    [ -z "$outside" ] || die "${f#"$R"} needs a library that is not in the image (add its package to ROOT_PKGS): $outside"
done
[ -L "$LDSO" ] || [ -f "$LDSO" ] || die "no /lib64/ld-linux-x86-64.so.2"

# e2fs TOOL ARGS...: runs the image's own e2fsprogs on the host, through the
# image's ld.so and libraries (checked above), so that the host's e2fsprogs
# (another release on another distribution) cannot change root.img.
e2fs() {
    tool=$R/sbin/$1
    shift
    [ -f "$tool" ] || die "e2fsprogs has no ${tool#"$R"}"
    "$ldso_real" --inhibit-cache --library-path "$LIBPATH" "$tool" "$@"
}

say "building root.img"
case $ROOT_SIZE in
    *[kK]) size_k=${ROOT_SIZE%?} ;;
    *[mM]) size_k=$((${ROOT_SIZE%?} * 1024)) ;;
    *[gG]) size_k=$((${ROOT_SIZE%?} * 1024 * 1024)) ;;
    *) die "QUIESCE_ROOT_SIZE must be a number with K, M or G suffix (got '$ROOT_SIZE')" ;;
esac
used_k=$(du -sk "$R" | cut -f1)
# keep room for ext4 metadata (~10%) and some free space for the tests
if [ $((used_k * 100 / 75)) -gt "$size_k" ]; then
    die "root files need ${used_k} KiB, too much for QUIESCE_ROOT_SIZE=$ROOT_SIZE (the amd64 flavour needs about 1G)"
fi
find "$R" -exec touch -h -d "@$SDE" {} +
rm -f "$W/root.img"
# mke2fs.conf: our own, so that the host's /etc/mke2fs.conf cannot change the image
E2FSPROGS_FAKE_TIME=$SDE MKE2FS_CONFIG=$HERE/mke2fs.conf \
    e2fs mke2fs -q -F -t ext4 -L "$FS_LABEL" -U "$FS_UUID" -m 0 \
    -E "root_owner=0:0,hash_seed=$HASH_SEED,lazy_itable_init=0,lazy_journal_init=0,nodiscard" \
    -d "$R" "$W/root.img" "$ROOT_SIZE" >/dev/null
# mkfs.ext4 -d copies owner and ctime/crtime of the staging files: force
# root:root and the fixed timestamp on every inode (works without root).
(cd "$R" && find . | sort) | while read -r p; do
    p=${p#.}
    [ -n "$p" ] || p=/
    for fld in uid gid; do printf 'sif "%s" %s 0\n' "$p" "$fld"; done
    for fld in atime mtime ctime crtime; do printf 'sif "%s" %s @%s\n' "$p" "$fld" "$SDE"; done
done > "$W/debugfs.cmds"
E2FSPROGS_FAKE_TIME=$SDE e2fs debugfs -w -f "$W/debugfs.cmds" "$W/root.img" >"$W/debugfs.log" 2>&1 \
    || { tail -n 20 "$W/debugfs.log" >&2; die "debugfs fix-up failed"; }
if grep -v '^debugfs[ :]' "$W/debugfs.log" | grep -q .; then
    grep -v '^debugfs[ :]' "$W/debugfs.log" | head -n 20 >&2
    die "debugfs fix-up reported errors"
fi
E2FSPROGS_FAKE_TIME=$SDE e2fs e2fsck -fn "$W/root.img" >"$W/fsck.log" 2>&1 \
    || { cat "$W/fsck.log" >&2; die "root.img fails e2fsck"; }

# ---------------------------------------------------------------- outputs
say "writing outputs to $OUT"
cp "$W/kernel/boot/vmlinuz-$KVER" "$W/vmlinuz"
printf '%s\n' "$CMDLINE" > "$W/cmdline"
printf '%s\n' "$KVER" > "$W/kernel-release"
for f in vmlinuz initrd.img root.img cmdline packages.lock kernel-release; do
    chmod 0644 "$W/$f"
    touch -d "@$SDE" "$W/$f"
    mv -f "$W/$f" "$OUT/$f"
done
say "done: kernel $KVER, qemu-guest-agent $QGA_VER"
