//! A child process that cannot be lost. It runs in a process group of its own, so one
//! signal reaches everything it started; it is watched through a pidfd, so a wait for it is
//! a `poll` with a deadline (or a readiness future), never a sleep loop; and dropping it
//! kills its group and reaps it on every path.
//!
//! The group is signalled only while the child is not yet reaped: until then its pid, which
//! is the group's id, cannot be reused by another process. When the child is seen to exit,
//! whatever it left running in its group is killed before it is reaped.

use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{ChildStderr, ChildStdout, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

use super::deadline;

/// How to start a child: a program, its arguments and environment, where its output goes,
/// and what it inherits. Its stdin is `/dev/null`; it always gets a process group of its own.
pub struct Spawn {
    cmd: std::process::Command,
    keep_fds: Vec<RawFd>,
    die_with_parent: bool,
}

impl Spawn {
    pub fn new(program: impl AsRef<OsStr>) -> Spawn {
        let mut cmd = std::process::Command::new(program);
        cmd.stdin(Stdio::null()).process_group(0);
        Spawn { cmd, keep_fds: Vec::new(), die_with_parent: false }
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Spawn {
        self.cmd.arg(arg);
        self
    }

    pub fn args<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(mut self, args: I) -> Spawn {
        self.cmd.args(args);
        self
    }

    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Spawn {
        self.cmd.env(key, value);
        self
    }

    pub fn current_dir(mut self, dir: impl AsRef<Path>) -> Spawn {
        self.cmd.current_dir(dir);
        self
    }

    pub fn stdout(mut self, to: impl Into<Stdio>) -> Spawn {
        self.cmd.stdout(to);
        self
    }

    pub fn stderr(mut self, to: impl Into<Stdio>) -> Spawn {
        self.cmd.stderr(to);
        self
    }

    /// Lets the child inherit `fd` under the same number (a listening socket QEMU is told
    /// about as `fd=N`). The caller keeps it open until [`Spawn::spawn`] returns.
    pub fn keep_fd(mut self, fd: RawFd) -> Spawn {
        self.keep_fds.push(fd);
        self
    }

    /// Kills the child (SIGKILL) when the thread that spawns it exits, so it cannot outlive
    /// a harness that dies without running its destructors. It is the *thread* that counts
    /// (PR_SET_PDEATHSIG): spawn such children from long-lived threads (a runtime worker, the
    /// main thread), never from `spawn_blocking`, whose threads end when idle.
    pub fn die_with_parent(mut self) -> Spawn {
        self.die_with_parent = true;
        self
    }

    /// The program's name as given.
    pub fn program(&self) -> String {
        self.cmd.get_program().to_string_lossy().into_owned()
    }

    /// The command line, quoted for a shell: for evidence and error messages.
    pub fn command_line(&self) -> String {
        let args: Vec<String> = self.cmd.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        super::shell_line(&self.program(), &args)
    }

    /// Starts the child. Fails if it cannot be started, or if no pidfd can be had for it (a
    /// kernel older than 5.3), since no wait on it could then have a deadline; the child is
    /// killed then.
    #[allow(unsafe_code)]
    pub fn spawn(mut self) -> std::io::Result<Child> {
        if !self.keep_fds.is_empty() || self.die_with_parent {
            let keep = std::mem::take(&mut self.keep_fds);
            let die_with_parent = self.die_with_parent;
            let parent = std::process::id() as libc::pid_t;
            // SAFETY: the hook runs in the child between fork and exec, where only
            // async-signal-safe calls are allowed: it calls fcntl, prctl, getppid and _exit,
            // reads a vector moved into it, and allocates nothing.
            unsafe {
                self.cmd.pre_exec(move || {
                    for &fd in &keep {
                        let flags = libc::fcntl(fd, libc::F_GETFD);
                        if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    if die_with_parent {
                        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        if libc::getppid() != parent {
                            // The harness died before prctl took effect.
                            libc::_exit(1);
                        }
                    }
                    Ok(())
                });
            }
        }
        let child = self.cmd.spawn()?;
        match pidfd_open(child.id()) {
            Ok(pidfd) => Ok(Child { inner: child, pidfd, status: None }),
            Err(e) => {
                let _ = killpg(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
                reap_later(child.id());
                Err(std::io::Error::new(
                    e.kind(),
                    format!("pidfd_open failed ({e}): no wait on it could have a deadline"),
                ))
            }
        }
    }
}

/// A running (or exited, not yet dropped) child. See the module documentation.
pub struct Child {
    inner: std::process::Child,
    pidfd: OwnedFd,
    /// Set once the child is reaped; from then on its group is never signalled.
    status: Option<ExitStatus>,
}

impl Child {
    pub fn pid(&self) -> u32 {
        self.inner.id()
    }

    /// Its stdout, if it was piped and not taken yet.
    pub fn take_stdout(&mut self) -> Option<ChildStdout> {
        self.inner.stdout.take()
    }

    /// Its stderr, if it was piped and not taken yet.
    pub fn take_stderr(&mut self) -> Option<ChildStderr> {
        self.inner.stderr.take()
    }

    /// Readable once the child has exited.
    pub(super) fn pidfd(&self) -> BorrowedFd<'_> {
        self.pidfd.as_fd()
    }

    /// How the child ended, if it has (reaping it), without blocking. What it left running
    /// in its group is killed first.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() && readable(self.pidfd(), Duration::ZERO) {
            // Exited but not reaped: its pid still names the group.
            self.signal_group(Signal::SIGKILL);
            self.status = self.inner.try_wait().ok().flatten();
        }
        self.status
    }

    /// Blocks until the child exits or `deadline` passes; None if it is still running.
    pub fn wait_until(&mut self, deadline: Instant) -> Option<ExitStatus> {
        loop {
            if let Some(s) = self.try_status() {
                return Some(s);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            readable(self.pidfd(), left);
        }
    }

    /// Blocks until the child exits or `timeout` passes; None if it is still running.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.wait_until(Instant::now() + timeout)
    }

    /// Waits without blocking the runtime until the child exits or `timeout` passes; None if
    /// it is still running. Dropping the future is safe: the child is left as it was.
    #[allow(unsafe_code)]
    pub async fn wait_async(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if let Some(s) = self.try_status() {
            return Some(s);
        }
        let watched = self.pidfd.try_clone().and_then(|fd| {
            // SAFETY: the fd is an OwnedFd moved into the AsyncFd, so it stays open, and is
            // the same file, for the AsyncFd's whole life.
            unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
                .map_err(std::io::Error::from)
        });
        match watched {
            Ok(fd) => {
                let _ = tokio::time::timeout(timeout, fd.readable()).await;
                self.try_status()
            }
            // A runtime without an I/O driver: the wait blocks this thread, but it still
            // waits, and for no longer than asked.
            Err(_) => self.wait_timeout(timeout),
        }
    }

    /// Sends `sig` to the child's whole process group, unless the child is reaped already.
    pub fn signal_group(&self, sig: Signal) {
        if self.status.is_none() {
            // ESRCH: the group is gone already.
            let _ = killpg(Pid::from_raw(self.inner.id() as i32), sig);
        }
    }

    /// SIGKILL to the whole group, then waits for the child; None if it did not die within
    /// [`deadline::KILLED_EXIT`] (stuck in the kernel).
    pub fn kill(&mut self) -> Option<ExitStatus> {
        if let Some(s) = self.try_status() {
            return Some(s);
        }
        self.signal_group(Signal::SIGKILL);
        self.wait_timeout(deadline::KILLED_EXIT)
    }

    /// SIGTERM to the group, `grace` to exit, then SIGKILL.
    pub fn terminate(&mut self, grace: Duration) -> Option<ExitStatus> {
        if let Some(s) = self.try_status() {
            return Some(s);
        }
        self.signal_group(Signal::SIGTERM);
        match self.wait_timeout(grace) {
            Some(s) => Some(s),
            None => self.kill(),
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if self.kill().is_none() {
            eprintln!(
                "quiesce: process {} did not die within {:?} of SIGKILL; it will be reaped when it does",
                self.pid(),
                deadline::KILLED_EXIT
            );
            reap_later(self.pid());
        }
    }
}

/// Reaps `pid` from a thread of its own, whenever it exits: for a child that could not be
/// waited for with a deadline, so that it never stays a zombie.
fn reap_later(pid: u32) {
    let spawned = std::thread::Builder::new()
        .name("quiesce-reaper".into())
        .spawn(move || nix::sys::wait::waitpid(Pid::from_raw(pid as i32), None));
    if let Err(e) = spawned {
        eprintln!("quiesce: process {pid} cannot be reaped ({e}); it stays a zombie until quiesce exits");
    }
}

/// True if `fd` is readable, waiting up to `timeout` for it.
pub(super) fn readable(fd: BorrowedFd<'_>, timeout: Duration) -> bool {
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    match nix::poll::poll(&mut fds, poll_timeout(timeout)) {
        Ok(n) if n > 0 => fds[0].any().unwrap_or(false),
        // A signal ends the poll early; callers loop to their deadline.
        Ok(_) | Err(Errno::EINTR) => false,
        Err(_) => false,
    }
}

/// A poll timeout of at least a millisecond (unless zero), so a wait never spins.
pub(super) fn poll_timeout(left: Duration) -> PollTimeout {
    if left.is_zero() {
        return PollTimeout::ZERO;
    }
    let ms = left.as_millis().clamp(1, i32::MAX as u128);
    PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)
}

/// A pidfd for `pid`: an fd that becomes readable when the process exits.
#[allow(unsafe_code)]
pub(super) fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    let pid = libc::pid_t::try_from(pid).map_err(std::io::Error::other)?;
    // SAFETY: pidfd_open takes a pid and flags, is given no memory, and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = RawFd::try_from(fd).map_err(std::io::Error::other)?;
    // SAFETY: the kernel just returned this fd, and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}
