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
# This script is self-contained: the guest's /init, /sbin/init, shutdown
# wrappers, fsfreeze hook and quiesce-app are written from here-documents
# below.  It needs no root privileges (no loop mounts, no mknod, no chroot)
# and produces the same bytes for the same package versions (see README.md,
# "Reproducibility").
#
# Host packages needed (Debian 12 / bookworm):
#   apt dpkg coreutils findutils sed grep gzip e2fsprogs (mkfs.ext4, debugfs)
#   cpio            <- not installed on a minimal Debian 12: apt-get install cpio
# apt must see bookworm, bookworm-security and bookworm-backports (for
# qemu-guest-agent 10.0.x) and `apt-get update` must have been run.
# busybox (for depmod, unxz and the applet list) is the one from the downloaded
# busybox-static .deb, run on the host (static x86_64 binary).
#
# Environment knobs (all optional):
#   QUIESCE_DEB_CACHE       folder to keep/reuse downloaded .deb files
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
need_tool mkfs.ext4 e2fsprogs
need_tool debugfs e2fsprogs
need_tool e2fsck e2fsprogs
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
CMDLINE="console=ttyS0 root=/dev/vda rootfstype=ext4 rw panic=-1 quiet"
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

APT_OPTS=""
if [ "$(id -u)" = 0 ]; then
    # apt drops to the _apt user for downloads; it may not be able to write
    # to our folder.  Downloads are verified against the signed index anyway.
    APT_OPTS="-o APT::Sandbox::User=root"
fi
export DEBIAN_FRONTEND=noninteractive

pkg_hint() {
    cat >&2 <<EOF
$prog: Debian package '$1' could not be resolved/downloaded.
  - run 'apt-get update' (as root) so that the package lists are current;
  - the apt sources must include bookworm, bookworm-updates, bookworm-security
    and bookworm-backports, e.g. /etc/apt/sources.list.d/backports.sources:
        Types: deb
        URIs: http://deb.debian.org/debian
        Suites: bookworm-backports
        Components: main
        Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
}

# fetch SPEC -> prints path of the .deb in $CACHE (reused when the hash matches)
fetch() {
    spec=$1
    # shellcheck disable=SC2086
    if ! uris=$(apt-get download --print-uris $APT_OPTS "$spec" 2>"$W/apt.err"); then
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
        # shellcheck disable=SC2086
        if ! (cd "$CACHE" && apt-get download -q $APT_OPTS "$spec") >"$W/apt.log" 2>&1 \
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

ALL_SPECS="$KPKG busybox-static qemu-guest-agent/$QGA_RELEASE $ROOT_PKGS"
# resolve everything first, so a missing package fails before any download
for spec in $ALL_SPECS; do
    # shellcheck disable=SC2086
    if ! apt-get download --print-uris $APT_OPTS "$spec" >/dev/null 2>"$W/apt.err"; then
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

put "$I/init" <<'EOF'
#!/bin/sh
# quiesce initrd /init: load storage/filesystem modules, mount root=, switch_root.
export PATH=/bin
mount -t proc -o nosuid,nodev,noexec proc /proc
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
mount -t devtmpfs -o mode=0755,nosuid devtmpfs /dev
[ -c /dev/console ] && exec </dev/console >/dev/console 2>&1

fail() {
    echo "QUIESCE-INITRD-FAILED: $*"
    sync
    sleep 1
    poweroff -f
    echo o > /proc/sysrq-trigger
    while :; do sleep 3600; done
}

root=/dev/vda fstype=ext4 flags='' mode=rw init=/sbin/init wait=10
modules=$(cat /etc/initrd-modules)
set -f
for arg in $(cat /proc/cmdline); do
    case $arg in
        root=*) root=${arg#root=} ;;
        rootfstype=*) fstype=${arg#rootfstype=} ;;
        rootflags=*) flags=${arg#rootflags=} ;;
        rootwait=*) wait=${arg#rootwait=} ;;
        ro) mode=ro ;;
        rw) mode=rw ;;
        init=*) init=${arg#init=} ;;
        quiesce.modules=*) modules=$(echo "${arg#quiesce.modules=}" | tr , ' ') ;;
    esac
done
set +f

for m in $modules; do
    modprobe "$m" || echo "quiesce-initrd: warning: cannot load module $m"
done

dev=
i=0
while [ "$i" -lt $((wait * 10)) ]; do
    case $root in
        UUID=*|LABEL=*) dev=$(findfs "$root" 2>/dev/null) || dev= ;;
        /dev/*) dev=$root ;;
        *) fail "unsupported root=$root (use /dev/..., UUID=... or LABEL=...)" ;;
    esac
    [ -n "$dev" ] && [ -b "$dev" ] && break
    dev=
    i=$((i + 1))
    sleep 0.1
done
[ -n "$dev" ] || fail "root device $root did not appear within ${wait}s"
mount -t "$fstype" -o "$mode${flags:+,$flags}" "$dev" /newroot \
    || fail "cannot mount root $dev (type $fstype, options $mode${flags:+,$flags})"
[ -x "/newroot$init" ] || fail "$init not found or not executable on root $dev"
for d in dev proc sys; do
    [ -d "/newroot/$d" ] || fail "/$d missing on root $dev"
done
mount --move /dev /newroot/dev
mount --move /proc /newroot/proc
mount --move /sys /newroot/sys
exec switch_root /newroot "$init"
EOF
chmod 0755 "$I/init"

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

# /etc
echo quiesce-guest | put "$R/etc/hostname"
put "$R/etc/hosts" <<'EOF'
127.0.0.1	localhost
127.0.1.1	quiesce-guest
::1		localhost ip6-localhost ip6-loopback
EOF
put "$R/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
EOF
put "$R/etc/group" <<'EOF'
root:x:0:
nogroup:x:65534:
EOF
put "$R/etc/shadow" <<'EOF'
root:*:19000:0:99999:7:::
nobody:*:19000:0:99999:7:::
EOF
chmod 0640 "$R/etc/shadow"
put "$R/etc/fstab" <<'EOF'
/dev/vda	/	ext4	rw	0	1
EOF
ln -s ../proc/self/mounts "$R/etc/mtab"
put "$R/etc/profile" <<'EOF'
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root
EOF
put "$R/etc/nsswitch.conf" <<'EOF'
passwd: files
group: files
shadow: files
hosts: files
EOF
put "$R/etc/os-release" <<EOF
PRETTY_NAME="quiesce test guest (Debian 12 packages, kernel $KVER)"
NAME="quiesce-guest"
ID=quiesce-guest
ID_LIKE=debian
VERSION_ID="1"
EOF
put "$R/etc/quiesce-packages.lock" < "$W/packages.lock"

# The hook shipped by qemu-guest-agent needs bash: on its syslog path (taken
# on the very first run, before its log file exists) it uses ${PIPESTATUS[0]},
# which busybox sh rejects, so the first freeze fails.  A POSIX sh rewrite: run
# the executables in fsfreeze-hook.d (sorted) with freeze|thaw and log to
# /var/log/qga-fsfreeze-hook.log.  Unlike upstream (which always exits 0), a
# script that fails "freeze" vetoes it, as a failing VSS writer fails the
# shadow copy: the scripts that already ran get "thaw" (in reverse), and the
# hook exits with that status, so qemu-ga's guest-fsfreeze-freeze returns
# "fsfreeze hook has failed with status N" and freezes nothing.  "thaw" runs
# every script and always exits 0: a thaw must not be refused.
put "$R/etc/qemu/fsfreeze-hook" <<'EOF'
#!/bin/sh
# fsfreeze-hook for qemu-ga -F (quiesce test guest; POSIX rewrite of QEMU's
# scripts/qemu-guest-agent/fsfreeze-hook).  Called with "freeze" before the
# filesystems are frozen and with "thaw" after they are thawed.
LOGFILE=/var/log/qga-fsfreeze-hook.log
FSFREEZE_D=$(dirname -- "$0")/fsfreeze-hook.d

log_message() {
    printf '%s: %s\n' "$(date)" "$*" >> "$LOGFILE" 2>/dev/null \
        || logger -t qemu-ga-freeze-hook "$*" 2>/dev/null
}

[ -d "$FSFREEZE_D" ] || exit 0
done_list=
for file in "$FSFREEZE_D"/*; do
    case $file in
        *~|*.bak|*.orig|*.rpmnew|*.rpmorig|*.rpmsave|*.sample|*.dpkg-old|*.dpkg-new|*.dpkg-tmp|*.dpkg-dist|*.dpkg-bak|*.dpkg-backup|*.dpkg-remove)
            continue ;;
    esac
    [ -f "$file" ] && [ -x "$file" ] || continue
    log_message "Executing $file $*"
    "$file" "$@" >> "$LOGFILE" 2>&1
    status=$?
    if [ "$status" -eq 0 ]; then
        log_message "$file finished successfully"
        done_list="$file $done_list"
        continue
    fi
    log_message "Error: $file finished with status=$status"
    if [ "${1:-}" = freeze ]; then
        for undo in $done_list; do
            log_message "Veto: thawing $undo"
            "$undo" thaw >> "$LOGFILE" 2>&1
        done
        exit "$status"
    fi
done
exit 0
EOF
chmod 0755 "$R/etc/qemu/fsfreeze-hook"

# quiesce-app: the guest's "VSS writer" (a sqlite3 bank with a writer that commits
# transfers continuously, and a consistency check for restored copies), plus the
# fsfreeze-hook.d script that pauses its writers around guest-fsfreeze-freeze/-thaw.
put "$R/usr/bin/quiesce-app" <<'QUIESCE_APP_EOF'
#!/bin/sh
# quiesce-app -- the test guest's "VSS writer": a tiny bank in SQLite (WAL mode)
# with a writer that commits one transfer after another, and a consistency
# check for databases restored from a backup.  See README.md of the guest image.
#
#   quiesce-app start DIR     create DIR/app.db if missing, start a writer on it,
#                             return after its first commit; prints the writer's pid
#   quiesce-app stop DIR      stop that writer (bounded wait); prints "stopped transfers=N"
#   quiesce-app status DIR    "running pid=P transfers=N" or "stopped transfers=N"
#   quiesce-app check DIR     "consistent transfers=N total=T" (exit 0) or
#                             "inconsistent: REASON" (exit 1); never writes to DIR
#   quiesce-app freeze|thaw   pause every running writer at a transaction boundary
#                             (checkpointed, acknowledged) / resume them; this is
#                             what /etc/qemu/fsfreeze-hook.d/quiesce-app runs
#
# Data model (the seed and the transfer rule are fixed, so the output only
# depends on N):
#   accounts(id 1..10, balance 1000 each at seed time)
#   transfer i (i = 1, 2, ...) moves amount(i) from src(i) to dst(i):
#     src    = (i*7919) % 10 + 1
#     dst    = ((i*7919) % 10 + 1 + i % 9) % 10 + 1      (never equal to src)
#     amount = (i*7919) % 97 + 1                          (1..97; balances may go negative)
#   one transaction = BEGIN IMMEDIATE; 2 x UPDATE accounts; INSERT INTO transfers(seq=i,...); COMMIT
# Environment: QUIESCE_APP_DELAY (seconds between transactions, default 0),
#   QUIESCE_APP_PAUSE_WAIT (seconds freeze waits for all writers to
#   acknowledge, default 2).
export PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C
umask 022

RUNDIR=${QUIESCE_APP_RUNDIR:-/run/quiesce-app}
ACCOUNTS=10
SEED_BALANCE=1000
TOTAL=$((ACCOUNTS * SEED_BALANCE))
DELAY=${QUIESCE_APP_DELAY:-0}
PAUSE_WAIT=${QUIESCE_APP_PAUSE_WAIT:-2}
case $PAUSE_WAIT in '' | *[!0-9]*) PAUSE_WAIT=2 ;; esac
# the transfer rule, as SQL over the column seq (must match cmd_writer's loop)
R_SRC="((seq*7919)%$ACCOUNTS+1)"
R_DST="(((seq*7919)%$ACCOUNTS+1+seq%$((ACCOUNTS - 1)))%$ACCOUNTS+1)"
R_AMT="((seq*7919)%97+1)"
case $0 in
    */*) SELF=$0 ;;
    *) SELF=$(command -v "$0" 2>/dev/null || echo /usr/bin/quiesce-app) ;;
esac

die() { printf 'quiesce-app: %s\n' "$*" >&2; exit 2; }
usage() {
    echo "usage: quiesce-app start|stop|status|check DIR   or   quiesce-app freeze|thaw" >&2
    exit 2
}
# TICKS = uptime in 1/100 s (no fork)
ticks() { read -r _u _rest < /proc/uptime; TICKS=$((${_u%.*} * 100 + 1${_u#*.} - 100)); }
secs() { printf '%d.%02d' $(($1 / 100)) $(($1 % 100)); }

# set the per-writer file names for NAME
set_name() {
    NAME=$1
    PIDF=$RUNDIR/$NAME.pid      # writer pid; written after its first commit
    SEQF=$RUNDIR/$NAME.seq      # last committed transfer (written after each commit)
    PAUSEF=$RUNDIR/$NAME.pause  # freeze request: contains a token
    ACKF=$RUNDIR/$NAME.paused   # writer's answer: "TOKEN N", idle and checkpointed
    STOPF=$RUNDIR/$NAME.stop    # stop request
    LOGF=$RUNDIR/$NAME.log      # writer log (tmpfs: never blocks on a frozen fs)
    INF=$RUNDIR/$NAME.in        # fifos to the writer's sqlite3
    OUTF=$RUNDIR/$NAME.out
}
# DIR -> DIR (canonical), DB, NAME (DIR with '/' and odd characters as '_')
resolve_dir() {
    [ -n "$1" ] || usage
    [ -d "$1" ] || die "no such directory: $1"
    DIR=$(cd "$1" && pwd -P) || die "cannot enter $1"
    DB=$DIR/app.db
    n=$(printf '%s' "$DIR" | sed 's|^/*||; s|[^A-Za-z0-9._-]|_|g; s|^\.|_|')
    set_name "${n:-_root}"
}
# is WPID (from the pid file) a live writer?
writer_pid() {
    WPID=
    read -r _p 2>/dev/null < "$PIDF" || return 1
    case $_p in '' | *[!0-9]*) return 1 ;; esac
    case $(tr '\0' ' ' 2>/dev/null < "/proc/$_p/cmdline") in
        *"${SELF##*/} _writer "*) WPID=$_p ;;
        *) return 1 ;;   # gone, a zombie, or a recycled pid
    esac
}
# copy DB (+ -wal / -journal, never -shm) to a private folder in /tmp, so that
# reading it (WAL recovery included) never writes to DIR
snapshot() {
    SNAP=$(mktemp -d /tmp/quiesce-app.XXXXXX) || return 1
    trap 'rm -rf "$SNAP"' EXIT
    cp "$DB" "$SNAP/app.db" || return 1
    for _x in -wal -journal; do
        if [ -f "$DB$_x" ]; then cp "$DB$_x" "$SNAP/app.db$_x" || return 1; fi
    done
}
# number of transfers in a database no writer is using
stopped_count() {
    [ -f "$DB" ] || die "no database $DB"
    snapshot || die "cannot copy $DB to /tmp"
    _n=$(sqlite3 -batch -cmd '.timeout 5000' "$SNAP/app.db" 'SELECT count(*) FROM transfers;' 2>&1) \
        || die "cannot read $DB: $_n"
    rm -rf "$SNAP"
    echo "$_n"
}

seed_db() {
    _tmp=$DIR/.app.db.seed.$$
    rm -f "$_tmp" "$_tmp-journal" "$_tmp-wal" "$_tmp-shm"
    sqlite3 -bail -batch "$_tmp" >/dev/null <<EOF || { rm -f "$_tmp" "$_tmp-journal"; die "cannot create $DB"; }
PRAGMA journal_mode=DELETE;
BEGIN;
CREATE TABLE meta(key TEXT PRIMARY KEY, value NOT NULL);
INSERT INTO meta VALUES ('accounts', $ACCOUNTS), ('seed_balance', $SEED_BALANCE),
  ('rule', 'src=$R_SRC dst=$R_DST amount=$R_AMT');
CREATE TABLE accounts(id INTEGER PRIMARY KEY, balance INTEGER NOT NULL);
WITH RECURSIVE a(id) AS (SELECT 1 UNION ALL SELECT id + 1 FROM a WHERE id < $ACCOUNTS)
  INSERT INTO accounts SELECT id, $SEED_BALANCE FROM a;
CREATE TABLE transfers(seq INTEGER PRIMARY KEY, src INTEGER NOT NULL, dst INTEGER NOT NULL,
  amount INTEGER NOT NULL);
COMMIT;
PRAGMA journal_mode=WAL;
EOF
    mv -f "$_tmp" "$DB" || die "cannot rename $_tmp"
    sync
}

cmd_start() {
    [ $# -eq 1 ] || usage
    mkdir -p "$1" || die "cannot create $1"
    resolve_dir "$1"
    case $DELAY in '' | *[!0-9.]*) die "QUIESCE_APP_DELAY must be a number of seconds" ;; esac
    mkdir -p "$RUNDIR" || die "cannot create $RUNDIR"
    if writer_pid; then die "a writer already runs on $DIR (pid $WPID)"; fi
    rm -f "$PIDF" "$SEQF" "$PAUSEF" "$ACKF" "$STOPF" "$INF" "$OUTF"
    [ -e "$DB" ] || seed_db
    setsid "$SELF" _writer "$DIR" </dev/null >>"$LOGF" 2>&1 &
    _spawned=$!
    ticks; _end=$((TICKS + 3000))
    until writer_pid; do
        if ! kill -0 "$_spawned" 2>/dev/null && ! writer_pid; then
            die "writer failed to start: $(tail -n 3 "$LOGF" 2>/dev/null | tr '\n' ' ')"
        fi
        ticks
        if [ "$TICKS" -gt "$_end" ]; then
            kill -KILL "$_spawned" 2>/dev/null
            die "writer made no commit within 30s: $(tail -n 3 "$LOGF" 2>/dev/null | tr '\n' ' ')"
        fi
        sleep 0.02
    done
    echo "$WPID"
}

# ---- the writer (runs detached: setsid, stdio on the log)
wlog() { read -r _u _rest < /proc/uptime; printf '[%s] writer %s: %s\n' "$_u" "$$" "$*"; }
wfail() {
    wlog "error: $*"
    rm -f "$PIDF" "$ACKF" "$STOPF" "$INF" "$OUTF"
    exit 1
}
# send SQL to sqlite3 and read one line of output
ask() {
    printf '%s\n' "$1" >&3 || wfail "sqlite3 is gone (write failed)"
    read -r REPLY <&4 || wfail "sqlite3 exited (see the errors above)"
}
# idle at a transaction boundary until the pause file goes away
pause_loop() {
    read -r _tok 2>/dev/null < "$PAUSEF" || return 0   # gone, or being written
    [ -n "$_tok" ] || return 0
    # the last commit is on disk (synchronous=FULL); also move the WAL into
    # app.db and truncate it, so the frozen image needs no WAL replay.  A
    # reader (a live "check") can make the checkpoint busy: wait for it at most
    # 0.3 s, then go on (busy=1 in the log; the data is still safe in the WAL).
    printf '%s\n' ".timeout 300" >&3
    ask "PRAGMA wal_checkpoint(TRUNCATE);"
    _ck=$REPLY
    printf '%s\n' ".timeout 10000" >&3
    echo "$_tok $i" > "$ACKF"
    wlog "paused at transfers=$i (checkpoint busy|log|done=$_ck)"
    while [ -e "$PAUSEF" ] && [ ! -e "$STOPF" ]; do
        sleep 0.02
        read -r _t2 2>/dev/null < "$PAUSEF" || break
        # a new freeze request while still paused: acknowledge it too
        if [ -n "$_t2" ] && [ "$_t2" != "$_tok" ]; then
            _tok=$_t2
            echo "$_tok $i" > "$ACKF"
        fi
    done
    rm -f "$ACKF"
    wlog "resumed at transfers=$i"
}
cmd_writer() {
    resolve_dir "$1"
    trap '' PIPE HUP INT
    rm -f "$INF" "$OUTF"
    mkfifo "$INF" "$OUTF" || wfail "mkfifo failed"
    sqlite3 -bail -batch -noheader -list "$DB" <"$INF" >"$OUTF" &
    _sq=$!
    exec 3>"$INF" 4<"$OUTF"
    rm -f "$INF" "$OUTF"
    ask "PRAGMA journal_mode=WAL;"
    [ "$REPLY" = wal ] || wfail "cannot switch $DB to WAL (got '$REPLY')"
    printf '%s\n' ".timeout 10000" "PRAGMA synchronous=FULL;" >&3
    ask "SELECT coalesce(max(seq), 0) FROM transfers;"
    case $REPLY in '' | *[!0-9]*) wfail "unexpected reply '$REPLY'" ;; esac
    i=$REPLY
    wlog "started on $DB at transfers=$i (sqlite3 pid $_sq, WAL, synchronous=FULL, delay ${DELAY}s)"
    while [ ! -e "$STOPF" ]; do
        if [ -e "$PAUSEF" ]; then
            pause_loop
            continue
        fi
        _n=$((i + 1))
        _s=$((_n * 7919 % ACCOUNTS))
        _d=$(((_s + 1 + _n % (ACCOUNTS - 1)) % ACCOUNTS + 1))
        _s=$((_s + 1))
        _a=$((_n * 7919 % 97 + 1))
        ask "BEGIN IMMEDIATE; UPDATE accounts SET balance = balance - $_a WHERE id = $_s; UPDATE accounts SET balance = balance + $_a WHERE id = $_d; INSERT INTO transfers(seq, src, dst, amount) VALUES ($_n, $_s, $_d, $_a); COMMIT; SELECT $_n;"
        [ "$REPLY" = "$_n" ] || wfail "unexpected reply '$REPLY' to transfer $_n"
        i=$_n
        echo "$i" > "$SEQF"
        [ -e "$PIDF" ] || echo "$$" > "$PIDF"
        [ "$DELAY" = 0 ] || sleep "$DELAY"
    done
    exec 3>&-        # EOF: sqlite3 checkpoints, removes the WAL and exits
    wait "$_sq"
    wlog "stopped at transfers=$i (sqlite3 exit status $?)"
    rm -f "$PIDF" "$ACKF"
}

cmd_stop() {
    [ $# -eq 1 ] || usage
    resolve_dir "$1"
    if writer_pid; then
        _pid=$WPID
        : > "$STOPF"
        ticks; _end=$((TICKS + 1000))
        while writer_pid; do
            ticks
            if [ "$TICKS" -gt "$_end" ]; then
                echo "quiesce-app: writer $_pid did not stop within 10s; killing it" >&2
                kill -KILL "-$_pid" "$_pid" 2>/dev/null
                sleep 1
                if writer_pid; then die "cannot stop writer $_pid"; fi
                break
            fi
            sleep 0.02
        done
    fi
    rm -f "$PIDF" "$SEQF" "$ACKF" "$STOPF" "$INF" "$OUTF"
    echo "stopped transfers=$(stopped_count)"
}

cmd_status() {
    [ $# -eq 1 ] || usage
    resolve_dir "$1"
    if writer_pid; then
        _k=0
        until read -r _n 2>/dev/null < "$SEQF" && [ -n "$_n" ]; do
            _k=$((_k + 1))
            [ "$_k" -lt 50 ] || die "writer $WPID has no $SEQF"
            sleep 0.01
        done
        echo "running pid=$WPID transfers=$_n"
    else
        echo "stopped transfers=$(stopped_count)"
    fi
}

inconsistent() { printf 'inconsistent: %s\n' "$*"; exit 1; }
cmd_check() {
    [ $# -eq 1 ] || usage
    [ -d "$1" ] || inconsistent "no such directory: $1"
    resolve_dir "$1"
    [ -f "$DB" ] || inconsistent "no database $DB"
    if writer_pid; then
        # live database: one read transaction in place sees a committed snapshot
        _db=$DB _ro=-readonly
    else
        snapshot || inconsistent "cannot copy $DB to /tmp"
        _db=$SNAP/app.db _ro=
    fi
    _ic=$(sqlite3 -batch $_ro -cmd '.timeout 5000' "$_db" 'PRAGMA integrity_check;' 2>&1) \
        || inconsistent "cannot read database: $(printf '%s\n' "$_ic" | head -n 1)"
    [ "$_ic" = ok ] || inconsistent "integrity_check: $(printf '%s\n' "$_ic" | head -n 1)"
    _res=$(sqlite3 -batch $_ro -cmd '.timeout 5000' "$_db" 2>&1 <<EOF
WITH
 t(n, lo, hi) AS (SELECT count(*), coalesce(min(seq), 0), coalesce(max(seq), 0) FROM transfers),
 bad(s) AS (SELECT min(seq) FROM transfers
            WHERE src IS NOT $R_SRC OR dst IS NOT $R_DST OR amount IS NOT $R_AMT),
 a(n, lo, hi, total) AS (SELECT count(*), coalesce(min(id), 0), coalesce(max(id), 0),
                         coalesce(sum(balance), 0) FROM accounts),
 flow(id, d) AS (SELECT id, sum(d) FROM (SELECT src AS id, -amount AS d FROM transfers
                 UNION ALL SELECT dst, amount FROM transfers) GROUP BY id),
 diff(id, have, want) AS (SELECT x.id, x.balance, $SEED_BALANCE + coalesce(f.d, 0)
                          FROM accounts x LEFT JOIN flow f ON f.id = x.id
                          WHERE x.balance IS NOT $SEED_BALANCE + coalesce(f.d, 0)
                          ORDER BY x.id LIMIT 1)
SELECT CASE
 WHEN a.n != $ACCOUNTS OR a.lo != 1 OR a.hi != $ACCOUNTS
  THEN 'accounts has ' || a.n || ' rows with ids ' || a.lo || '..' || a.hi || ', expected ids 1..$ACCOUNTS'
 WHEN t.n > 0 AND (t.lo != 1 OR t.hi != t.n)
  THEN 'transfers.seq is not 1..N without gaps (' || t.n || ' rows, seq ' || t.lo || '..' || t.hi || ')'
 WHEN bad.s IS NOT NULL
  THEN 'transfer seq=' || bad.s || ' does not follow the transfer rule'
 WHEN a.total != $TOTAL
  THEN 'sum of balances is ' || a.total || ', expected $TOTAL'
 WHEN EXISTS (SELECT 1 FROM diff)
  THEN (SELECT 'account ' || id || ' has balance ' || have || ', replaying transfers 1..' || t.n
        || ' from the seed gives ' || want FROM diff)
 ELSE 'ok ' || t.n || ' ' || a.total
END FROM t, bad, a;
EOF
) || inconsistent "query failed: $(printf '%s\n' "$_res" | head -n 1)"
    case $_res in
        "ok "*)
            set -- $_res
            echo "consistent transfers=$2 total=$3"
            exit 0 ;;
        *) inconsistent "$_res" ;;
    esac
}

# ---- fsfreeze hook side: pause / resume every running writer
hlog() { echo "quiesce-app $*"; }
cmd_freeze() {
    ticks; _t0=$TICKS
    _pending=
    for _f in "$RUNDIR"/*.pid; do
        [ -f "$_f" ] || continue
        _n=${_f##*/}
        set_name "${_n%.pid}"
        writer_pid || continue
        read -r _tok < /proc/sys/kernel/random/uuid
        echo "$_tok" > "$PAUSEF"
        _pending="$_pending $NAME:$WPID:$_tok"
    done
    if [ -z "$_pending" ]; then
        hlog "freeze: no writer running"
        return 0
    fi
    _end=$((_t0 + PAUSE_WAIT * 100))
    while [ -n "$_pending" ]; do
        _left=
        for _e in $_pending; do
            set_name "${_e%%:*}"
            _r=${_e#*:}; _pid=${_r%%:*}; _tok=${_r#*:}
            _t= _seq=
            read -r _t _seq 2>/dev/null < "$ACKF"
            ticks
            if [ "$_t" = "$_tok" ]; then
                hlog "freeze: writer $NAME (pid $_pid) paused at transfers=$_seq after $(secs $((TICKS - _t0)))s"
            elif ! writer_pid; then
                hlog "freeze: writer $NAME (pid $_pid) exited"
            else
                _left="$_left $_e"
            fi
        done
        _pending=$_left
        [ -n "$_pending" ] || break
        if [ "$TICKS" -ge "$_end" ]; then
            for _e in $_pending; do
                _r=${_e#*:}
                hlog "freeze: WARNING: writer ${_e%%:*} (pid ${_r%%:*}) did not acknowledge the pause within ${PAUSE_WAIT}s; freezing anyway"
            done
            break
        fi
        sleep 0.01
    done
    return 0
}
cmd_thaw() {
    for _f in "$RUNDIR"/*.pause; do
        [ -f "$_f" ] || continue
        _n=${_f##*/}
        set_name "${_n%.pause}"
        rm -f "$PAUSEF"
        if writer_pid; then
            hlog "thaw: writer $NAME (pid $WPID) resumed"
        fi
    done
    return 0
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case $cmd in
    start) cmd_start "$@" ;;
    stop) cmd_stop "$@" ;;
    status) cmd_status "$@" ;;
    check) cmd_check "$@" ;;
    freeze) cmd_freeze ;;
    thaw) cmd_thaw ;;
    _writer) cmd_writer "$@" ;;
    *) usage ;;
esac
QUIESCE_APP_EOF
put "$R/etc/qemu/fsfreeze-hook.d/quiesce-app" <<'EOF'
#!/bin/sh
# Called by /etc/qemu/fsfreeze-hook with "freeze" (before the filesystems are
# frozen) or "thaw" (after they are thawed): pause every running quiesce-app
# writer at a transaction boundary (checkpointed, acknowledged; waits at most
# ~2 s in all) or resume them.  Output goes to the hook's log.  Exits 0.
case ${1:-} in
    freeze|thaw) /usr/bin/quiesce-app "$1" ;;
esac
exit 0
EOF
chmod 0755 "$R/usr/bin/quiesce-app" "$R/etc/qemu/fsfreeze-hook.d/quiesce-app"

put "$R/sbin/init" <<'EOF'
#!/bin/sh
# /sbin/init of the quiesce test guest (PID 1): mount the API filesystems,
# start qemu-ga on the virtio-serial port org.qemu.guest_agent.0, print
# QUIESCE-GUEST-READY on the console, then reap children forever.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TERM=linux
umask 022
PORT_NAME=org.qemu.guest_agent.0
PIDFILE=/run/qemu-ga.pid
LOG=/var/log/qemu-ga.log

mounted() { grep -q "^[^ ]* $1 " /proc/mounts 2>/dev/null; }
[ -e /proc/self ] || mount -t proc -o nosuid,nodev,noexec proc /proc
mounted /sys || mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
mounted /dev || mount -t devtmpfs -o mode=0755,nosuid devtmpfs /dev
[ -c /dev/console ] && exec </dev/console >/dev/console 2>&1
mkdir -p /dev/pts /dev/shm
mounted /dev/pts || mount -t devpts -o nosuid,noexec,gid=5,mode=620,ptmxmode=000 devpts /dev/pts
mounted /dev/shm || mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /dev/shm
mounted /run || mount -t tmpfs -o nosuid,nodev,mode=0755 tmpfs /run
mounted /tmp || mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /tmp
mount -o remount,rw / || echo "quiesce-init: warning: cannot remount / rw"
mkdir -p /run/lock /run/qemu-ga
ln -sf /proc/self/fd /dev/fd 2>/dev/null
ln -sf /proc/self/fd/0 /dev/stdin 2>/dev/null
ln -sf /proc/self/fd/1 /dev/stdout 2>/dev/null
ln -sf /proc/self/fd/2 /dev/stderr 2>/dev/null
hostname quiesce-guest
ifconfig lo 127.0.0.1 up 2>/dev/null

# No udevd runs, but qemu-ga reads disk serials (guest-get-fsinfo, guest-get-disks) from
# the udev database: write the entries udev would have written for each virtio disk, so
# the host can map guest filesystems to its disks by serial.
mkdir -p /run/udev/data
for b in /sys/block/vd*; do
    [ -r "$b/serial" ] && [ -r "$b/dev" ] || continue
    s=$(cat "$b/serial")
    [ -n "$s" ] || continue
    printf 'I:1\nE:ID_SERIAL=%s\nE:ID_SERIAL_SHORT=%s\n' "$s" "$s" > "/run/udev/data/b$(cat "$b/dev")"
done

fatal() {
    echo "QUIESCE-GUEST-FAILED: $*"
    sync
    poweroff -f
}

# find the agent's virtio-serial port (udev is not running, so create the
# /dev/virtio-ports/<name> symlink ourselves)
port=
i=0
while [ "$i" -lt 100 ]; do
    for n in /sys/class/virtio-ports/*/name; do
        [ -r "$n" ] || continue
        if [ "$(cat "$n")" = "$PORT_NAME" ]; then
            d=${n%/name}
            port=/dev/${d##*/}
        fi
    done
    [ -n "$port" ] && [ -c "$port" ] && break
    port=
    i=$((i + 1))
    sleep 0.1
done
[ -n "$port" ] || fatal "no virtio-serial port named $PORT_NAME (check -device virtserialport,name=$PORT_NAME)"
mkdir -p /dev/virtio-ports
ln -sf "../${port#/dev/}" "/dev/virtio-ports/$PORT_NAME"
AGENT_DEV=/dev/virtio-ports/$PORT_NAME

agent_pid=
start_agent() {
    qemu-ga -m virtio-serial -p "$AGENT_DEV" -F/etc/qemu/fsfreeze-hook \
        -t /run/qemu-ga -l "$LOG" </dev/null &
    agent_pid=$!
    echo "$agent_pid" > "$PIDFILE"
}

# the agent is "up" once it holds the port open
agent_up() {
    for fd in /proc/"$agent_pid"/fd/*; do
        case $(readlink "$fd" 2>/dev/null) in
            "$port") return 0 ;;
        esac
    done
    return 1
}

shutdown_signal() {
    /sbin/quiesce-shutdown "$1"
}
trap 'shutdown_signal poweroff' USR2
trap 'shutdown_signal halt' USR1
trap 'shutdown_signal reboot' TERM
trap '' INT HUP

start_agent
i=0
while ! agent_up; do
    kill -0 "$agent_pid" 2>/dev/null \
        || fatal "qemu-ga exited during start-up; log: $(tail -n 5 "$LOG" 2>/dev/null)"
    i=$((i + 1))
    [ "$i" -lt 300 ] || fatal "qemu-ga did not open $AGENT_DEV within 15s"
    sleep 0.05
done
echo QUIESCE-GUEST-READY

# PID 1 duty: reap orphans (wait blocks in waitpid(-1)) and keep the agent alive
while :; do
    wait
    if ! kill -0 "$agent_pid" 2>/dev/null; then
        if [ ! -e /run/quiesce-shutdown ]; then
            echo "quiesce-init: qemu-ga (pid $agent_pid) exited; restarting it"
            sleep 1
            start_agent
        else
            # shutting down: quiesce-shutdown kills everything, including
            # this sleep; keep the shell's "Killed" job message off the console
            exec >/dev/null 2>&1
            sleep 1
        fi
    fi
done
EOF

put "$R/sbin/quiesce-shutdown" <<'EOF'
#!/bin/sh
# quiesce-shutdown poweroff|reboot|halt
# Returns at once; in the background: stop all processes, sync, remount /
# read-only and power off (halt also powers off: a halted VM would only hang).
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
action=${1:-poweroff}
case $action in
    poweroff|halt) flag=poweroff sysrq=o ;;
    reboot) flag=reboot sysrq=b ;;
    *) echo "usage: $0 poweroff|reboot|halt" >&2; exit 2 ;;
esac
: > /run/quiesce-shutdown 2>/dev/null
(
    trap '' TERM HUP INT
    sleep 0.2
    echo "quiesce-guest: $action" > /dev/console
    kill -TERM -1 2>/dev/null
    sleep 0.5
    kill -KILL -1 2>/dev/null
    sync
    mount -o remount,ro / 2>/dev/null
    sync
    busybox "$flag" -f
    echo "$sysrq" > /proc/sysrq-trigger
) </dev/null >/dev/null 2>&1 &
exit 0
EOF

put "$R/sbin/shutdown" <<'EOF'
#!/bin/sh
# shutdown [-P|-h|-r|-H|-c] [TIME] [MESSAGE]  (qemu-ga runs "/sbin/shutdown -P +0 msg")
action=poweroff
for a in "$@"; do
    case $a in
        -c) exit 0 ;;
        -r|--reboot) action=reboot ;;
        -H|--halt) action=halt ;;
        -P|-h|--poweroff) action=poweroff ;;
    esac
done
exec /sbin/quiesce-shutdown "$action"
EOF
for a in poweroff reboot halt; do
    printf '#!/bin/sh\nexec /sbin/quiesce-shutdown %s\n' "$a" | put "$R/sbin/$a"
done
chmod 0755 "$R/sbin/init" "$R/sbin/quiesce-shutdown" "$R/sbin/shutdown" \
    "$R/sbin/poweroff" "$R/sbin/reboot" "$R/sbin/halt"

# busybox applets, for every name not already taken by a real program or by
# one of the scripts above (symlinks are created last: nothing above may
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
cat > "$W/mke2fs.conf" <<'EOF'
[defaults]
	base_features = sparse_super,large_file,filetype,resize_inode,dir_index,ext_attr
	default_mntopts = acl,user_xattr
	enable_periodic_fsck = 0
	blocksize = 4096
	inode_size = 256
	inode_ratio = 16384

[fs_types]
	small = {
		inode_ratio = 16384
	}
	ext4 = {
		features = has_journal,extent,huge_file,flex_bg,metadata_csum,64bit,dir_nlink,extra_isize
	}
EOF
rm -f "$W/root.img"
E2FSPROGS_FAKE_TIME=$SDE MKE2FS_CONFIG=$W/mke2fs.conf \
    mkfs.ext4 -q -F -t ext4 -L "$FS_LABEL" -U "$FS_UUID" -m 0 \
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
E2FSPROGS_FAKE_TIME=$SDE debugfs -w -f "$W/debugfs.cmds" "$W/root.img" >"$W/debugfs.log" 2>&1 \
    || { tail -n 20 "$W/debugfs.log" >&2; die "debugfs fix-up failed"; }
if grep -v '^debugfs[ :]' "$W/debugfs.log" | grep -q .; then
    grep -v '^debugfs[ :]' "$W/debugfs.log" | head -n 20 >&2
    die "debugfs fix-up reported errors"
fi
E2FSPROGS_FAKE_TIME=$SDE e2fsck -fn "$W/root.img" >"$W/fsck.log" 2>&1 \
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
