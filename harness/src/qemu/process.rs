//! A QEMU process: its own process group, killed when the harness dies (PDEATHSIG), and
//! waited for through a pidfd so every wait has a deadline and none is a sleep loop.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

pub struct QemuProcess {
    child: Child,
    pidfd: OwnedFd,
    status: Option<ExitStatus>,
}

impl QemuProcess {
    /// Starts `program` with `args`, letting it inherit `keep_fds`; its stderr and stdout
    /// go to `output`.
    pub fn spawn(program: &str, args: &[String], keep_fds: &[RawFd], output: &Path) -> std::io::Result<Self> {
        let out = File::create(output)?;
        let mut cmd = Command::new(program);
        cmd.args(args).stdin(Stdio::null()).stdout(out.try_clone()?).stderr(out).process_group(0);
        let parent = std::process::id() as libc::pid_t;
        let keep: Vec<RawFd> = keep_fds.to_vec();
        // SAFETY: only async-signal-safe calls (fcntl, prctl, getppid) run between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                for &fd in &keep {
                    let flags = libc::fcntl(fd, libc::F_GETFD);
                    if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                // Dies with the thread that spawned it; spawn from long-lived threads only.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::getppid() != parent {
                    // The harness died before prctl took effect.
                    libc::_exit(1);
                }
                Ok(())
            });
        }
        let child = cmd.spawn()?;
        let pidfd = pidfd_open(child.id() as libc::pid_t)?;
        Ok(Self { child, pidfd, status: None })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn pidfd(&self) -> RawFd {
        self.pidfd.as_raw_fd()
    }

    /// The exit status if QEMU has exited (reaping it), without blocking.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// Blocks until QEMU exits or `timeout` passes.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if let Some(s) = self.try_status() {
            return Some(s);
        }
        let mut pfd = libc::pollfd { fd: self.pidfd(), events: libc::POLLIN, revents: 0 };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n > 0 {
            self.try_status()
        } else {
            None
        }
    }

    /// Waits asynchronously for QEMU to exit, up to `timeout`.
    pub async fn wait_async(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if let Some(s) = self.try_status() {
            return Some(s);
        }
        let fd = self.pidfd.try_clone().ok()?;
        // SAFETY: `fd` is an OwnedFd moved into the AsyncFd, so it stays open and unchanged
        // for the AsyncFd's whole life.
        let afd =
            unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }.ok()?;
        let _ = tokio::time::timeout(timeout, afd.readable()).await;
        self.try_status()
    }

    pub fn signal_group(&self, sig: Signal) {
        // ESRCH just means the group is gone already.
        let _ = killpg(Pid::from_raw(self.child.id() as i32), sig);
    }

    /// SIGTERM, then SIGKILL, each with a grace period; then reaps. Never leaves a zombie.
    pub fn terminate(&mut self, grace: Duration) -> Option<ExitStatus> {
        if let Some(s) = self.try_status() {
            return Some(s);
        }
        self.signal_group(Signal::SIGTERM);
        if let Some(s) = self.wait_timeout(grace) {
            return Some(s);
        }
        self.signal_group(Signal::SIGKILL);
        self.status = self.child.wait().ok();
        self.status
    }
}

impl Drop for QemuProcess {
    fn drop(&mut self) {
        if self.try_status().is_none() {
            self.signal_group(Signal::SIGKILL);
            self.status = self.child.wait().ok();
        }
    }
}

fn pidfd_open(pid: libc::pid_t) -> std::io::Result<OwnedFd> {
    // SAFETY: a plain syscall; on success the kernel hands us a new fd that we then own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}
