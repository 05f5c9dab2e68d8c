//! A process quiesce did not start as its child, but must still be able to wait for and
//! stop: a daemon that forked away from the program we ran (`libvirtd --daemon`), or a VM
//! that daemon started. It is held by a pidfd, opened from its pid as soon as that pid is
//! known, so every signal reaches that process and no other (even once its pid is reused),
//! and every wait for it is a `poll` with a deadline.
//!
//! Unlike a [`Child`](super::Child), it is not ours to reap, and dropping it does nothing
//! to it: whoever started it reaps it, and the caller decides when to stop it.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::Duration;

use nix::sys::signal::Signal;

use super::child::{pidfd_open, readable};
use super::deadline;

/// A process held by a pidfd. See the module documentation.
pub struct Process {
    pid: u32,
    pidfd: OwnedFd,
}

impl Process {
    /// Holds process `pid`. Fails if it has exited already (and been reaped by its parent)
    /// or the kernel has no pidfds (older than 5.3).
    pub fn open(pid: u32) -> std::io::Result<Process> {
        Ok(Process { pid, pidfd: pidfd_open(pid)? })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// True if it has exited, without waiting.
    pub fn has_exited(&self) -> bool {
        self.wait_exit(Duration::ZERO)
    }

    /// True once it has exited, waiting up to `timeout` for that.
    pub fn wait_exit(&self, timeout: Duration) -> bool {
        readable(self.pidfd.as_fd(), timeout)
    }

    /// Sends it `sig`. A process that has exited already is not an error.
    pub fn signal(&self, sig: Signal) -> std::io::Result<()> {
        match pidfd_send_signal(&self.pidfd, sig) {
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(()),
            r => r,
        }
    }

    /// SIGTERM, `grace` to exit, then SIGKILL and [`deadline::KILLED_EXIT`]; true if it is
    /// gone.
    pub fn terminate(&self, grace: Duration) -> bool {
        if self.has_exited() {
            return true;
        }
        let _ = self.signal(Signal::SIGTERM);
        if self.wait_exit(grace) {
            return true;
        }
        let _ = self.signal(Signal::SIGKILL);
        self.wait_exit(deadline::KILLED_EXIT)
    }
}

/// Sends `sig` to the process behind `pidfd`.
#[allow(unsafe_code)]
fn pidfd_send_signal(pidfd: &OwnedFd, sig: Signal) -> std::io::Result<()> {
    // SAFETY: pidfd_send_signal takes an fd we own (open for the whole call), a signal
    // number, a null siginfo (the kernel then fills in a plain kill's) and no flags; it
    // writes no memory of ours.
    let r = unsafe {
        libc::syscall(libc::SYS_pidfd_send_signal, pidfd.as_raw_fd(), sig as libc::c_int, std::ptr::null::<u8>(), 0)
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
