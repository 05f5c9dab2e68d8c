//! Whether a QEMU holds an image for writing, read from the file locks QEMU takes on it.
//! It tells a disk in use from a free one (a restore in place refuses the former), and an
//! active disk from an inactive one where QEMU does not report activity (before 10.0): an
//! inactive node, on the source of a completed migration, gives up its write permission
//! and with it its locks, which is what lets the destination take the image over.

use std::os::fd::AsRawFd;
use std::path::Path;

/// True if another process holds `path` the way a running QEMU holds its disks: writing to
/// it, or refusing other writers. QEMU says so with open-file-description locks on single
/// bytes of the file (block/file-posix.c): byte 100 + n while it uses permission n, byte
/// 200 + n while it refuses to share it, and writing is permission 1. Asked with
/// F_OFD_GETLK, which takes no lock.
pub fn held_for_writing(path: &Path) -> bool {
    const QEMU_WRITES: i64 = 101;
    const QEMU_REFUSES_WRITERS: i64 = 201;
    let Ok(file) = std::fs::File::open(path) else { return false };
    [QEMU_WRITES, QEMU_REFUSES_WRITERS].into_iter().any(|byte| {
        let mut lock = libc::flock {
            l_type: libc::F_WRLCK as libc::c_short,
            l_whence: libc::SEEK_SET as libc::c_short,
            l_start: byte,
            l_len: 1,
            l_pid: 0,
        };
        let asked = nix::fcntl::fcntl(file.as_raw_fd(), nix::fcntl::FcntlArg::F_OFD_GETLK(&mut lock));
        asked.is_ok() && lock.l_type != libc::F_UNLCK as libc::c_short
    })
}
