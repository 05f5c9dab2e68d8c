//! The bench crate's only `unsafe`: holding libvirt's processes (libvirtd, each domain's
//! QEMU, a virsh run from Drop) by pidfd, so a signal can only reach the process meant and
//! every wait has a deadline.
//!
//! Kept apart on purpose: the library is getting one process module at its bottom (pidfd,
//! process groups, a deadline on every wait) that will hold the workspace's only `unsafe`;
//! once it is in, these functions go and the benchmarks use it.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

pub(super) fn pidfd_open(pid: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: a plain syscall; on success the kernel hands us a new fd that we then own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

pub(super) fn pidfd_signal(fd: &OwnedFd, sig: i32) -> std::io::Result<()> {
    // SAFETY: a plain syscall on a pidfd we own; no siginfo is passed.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_send_signal, fd.as_raw_fd(), sig, std::ptr::null::<u8>(), 0) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        // ESRCH: it has exited already.
        if e.raw_os_error() != Some(libc::ESRCH) {
            return Err(e);
        }
    }
    Ok(())
}

/// True once the process behind `fd` has exited, waiting up to `timeout`.
pub(super) fn pidfd_wait(fd: &OwnedFd, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut pfd, 1, ms) > 0 }
}

/// SIGTERM, then SIGKILL; true if the process is gone.
pub(super) fn terminate(fd: &OwnedFd, grace: Duration) -> bool {
    if pidfd_wait(fd, Duration::ZERO) {
        return true;
    }
    let _ = pidfd_signal(fd, libc::SIGTERM);
    if pidfd_wait(fd, grace) {
        return true;
    }
    let _ = pidfd_signal(fd, libc::SIGKILL);
    pidfd_wait(fd, Duration::from_secs(5))
}

/// Runs a command to completion from a non-async context (Drop), killing it at the deadline.
pub(super) fn run_blocking(
    cmd: &mut std::process::Command,
    timeout: Duration,
) -> Result<std::process::ExitStatus, String> {
    let mut child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    let fd = pidfd_open(child.id() as i32).map_err(|e| e.to_string())?;
    if !pidfd_wait(&fd, timeout) {
        let _ = child.kill();
        let _ = child.wait();
        return Err(format!("did not finish within {timeout:?}"));
    }
    child.wait().map_err(|e| e.to_string())
}
