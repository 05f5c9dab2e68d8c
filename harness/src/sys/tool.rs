//! Helper programs run to their end within a deadline: `qemu-img`, `e2fsck`, `debugfs`,
//! `mkfs.*`, a guest image's build script.
//!
//! One thread waits for the child and reads its stdout and stderr at once (one `poll` over
//! its pidfd and both pipes), so a child that fills one pipe while we wait on the other
//! cannot stall, and the deadline covers the whole run. Stdout is kept whole up to a cap;
//! stderr, which says why a tool failed, is kept as its last [`STDERR_TAIL`] bytes. A child
//! that runs past its deadline or prints past the cap is killed with its whole process group.

use std::ffi::OsStr;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::process::{ChildStderr, ChildStdout, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::poll::{PollFd, PollFlags};

use super::child::{poll_timeout, Child, Spawn};

/// Stdout kept by default. The tools we run print a few KiB; `qemu-img map` of a large,
/// fragmented disk prints more, and its caller raises the cap.
pub const DEFAULT_STDOUT_CAP: usize = 16 << 20;
/// The end of stderr kept: enough for any tool's complaint, bounded whatever it prints.
pub const STDERR_TAIL: usize = 64 << 10;

/// Why a tool did not give us its output. Every variant names the command that was run.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    /// The program could not be started: it is not installed (or not on PATH), not
    /// executable, or the system refused a new process.
    #[error("could not run {program} (`{command}`): {source}")]
    Spawn { program: String, command: String, source: std::io::Error },
    /// The program ran past its deadline and was killed, with everything it started. The
    /// image or host it worked on is likely stuck (a hung disk, a held lock) or far larger
    /// than the deadline allows for.
    #[error("`{command}` did not finish within {waited:?}; it was killed")]
    TimedOut { program: String, command: String, waited: Duration },
    /// The program ran and reported failure; `stderr` is the end of what it said.
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed { program: String, command: String, status: ExitStatus, stderr: String },
    /// The program printed more than the caller accepts (a damaged or unexpectedly huge
    /// input); it was killed.
    #[error("`{command}` printed more than {cap} bytes, more than we accept; it was killed")]
    OutputTooLarge { program: String, command: String, cap: usize },
    /// Waiting for the program or reading its output failed in the system; it was killed.
    #[error("`{command}`: waiting for it or reading its output failed: {source}; it was killed")]
    Io { program: String, command: String, source: std::io::Error },
}

impl ToolError {
    /// The program that was run, as it was named.
    pub fn program(&self) -> &str {
        match self {
            ToolError::Spawn { program, .. }
            | ToolError::TimedOut { program, .. }
            | ToolError::Failed { program, .. }
            | ToolError::OutputTooLarge { program, .. }
            | ToolError::Io { program, .. } => program,
        }
    }

    /// The whole command line, quoted for a shell.
    pub fn command(&self) -> &str {
        match self {
            ToolError::Spawn { command, .. }
            | ToolError::TimedOut { command, .. }
            | ToolError::Failed { command, .. }
            | ToolError::OutputTooLarge { command, .. }
            | ToolError::Io { command, .. } => command,
        }
    }
}

/// What a finished tool left: how it exited, its stdout, and the end of its stderr.
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    /// The last [`STDERR_TAIL`] bytes of stderr, lossily decoded.
    pub stderr: String,
    program: String,
    command: String,
}

impl Output {
    /// The exit code, None if a signal ended it.
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    pub fn command(&self) -> &str {
        &self.command
    }

    /// This run if it succeeded, else [`ToolError::Failed`].
    pub fn into_success(self) -> Result<Output, ToolError> {
        if self.status.success() {
            Ok(self)
        } else {
            Err(self.into_failure())
        }
    }

    /// This run as a failure, for an exit status the caller does not accept.
    pub fn into_failure(self) -> ToolError {
        ToolError::Failed {
            program: self.program,
            command: self.command,
            status: self.status,
            stderr: self.stderr.trim().to_owned(),
        }
    }
}

/// A tool to run: a program, its arguments, and how long it may take.
pub struct Tool<'a> {
    spawn: Spawn,
    timeout: Duration,
    /// None when stdout goes to a file instead.
    stdout_cap: Option<usize>,
    on_stderr_line: Option<&'a mut dyn FnMut(&str)>,
}

impl<'a> Tool<'a> {
    /// `program`, which must finish within `timeout` of its start.
    pub fn new(program: impl AsRef<OsStr>, timeout: Duration) -> Tool<'a> {
        Tool { spawn: Spawn::new(program), timeout, stdout_cap: Some(DEFAULT_STDOUT_CAP), on_stderr_line: None }
    }

    /// Killed when the thread that runs it exits ([`Spawn::die_with_parent`]): for a tool
    /// that must not go on behind a killed quiesce. Run it from the thread that waits for it.
    pub fn die_with_parent(mut self) -> Self {
        self.spawn = self.spawn.die_with_parent();
        self
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.spawn = self.spawn.arg(arg);
        self
    }

    pub fn args<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(mut self, args: I) -> Self {
        self.spawn = self.spawn.args(args);
        self
    }

    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.spawn = self.spawn.env(key, value);
        self
    }

    pub fn current_dir(mut self, dir: impl AsRef<Path>) -> Self {
        self.spawn = self.spawn.current_dir(dir);
        self
    }

    /// Stdout longer than `bytes` makes the run fail with [`ToolError::OutputTooLarge`].
    pub fn stdout_cap(mut self, bytes: usize) -> Self {
        self.stdout_cap = Some(bytes);
        self
    }

    /// Sends stdout to `file` instead of capturing it (a build log).
    pub fn stdout_to(mut self, file: File) -> Self {
        self.spawn = self.spawn.stdout(file);
        self.stdout_cap = None;
        self
    }

    /// Calls `f` with each line of stderr as it comes (progress), besides keeping its end.
    pub fn on_stderr_line(mut self, f: &'a mut dyn FnMut(&str)) -> Self {
        self.on_stderr_line = Some(f);
        self
    }

    /// The command line, quoted for a shell.
    pub fn command_line(&self) -> String {
        self.spawn.command_line()
    }

    /// Starts it; [`Running::wait`] collects it. The deadline runs from now.
    pub fn spawn(self) -> Result<Running<'a>, ToolError> {
        let (program, command) = (self.spawn.program(), self.spawn.command_line());
        let mut spawn = self.spawn.stderr(Stdio::piped());
        if self.stdout_cap.is_some() {
            spawn = spawn.stdout(Stdio::piped());
        }
        if is_abandoned() {
            return Err(ToolError::Io { program, command, source: std::io::ErrorKind::Interrupted.into() });
        }
        let started = Instant::now();
        let mut child = match spawn.spawn() {
            Ok(c) => c,
            Err(source) => return Err(ToolError::Spawn { program, command, source }),
        };
        Ok(Running {
            waiting: Waiting {
                stdout: child.take_stdout(),
                stderr: child.take_stderr(),
                child,
                program,
                command,
                timeout: self.timeout,
                deadline: started + self.timeout,
                stdout_cap: self.stdout_cap.unwrap_or(0),
                abandoned: abandoned_fd(),
            },
            on_stderr_line: self.on_stderr_line,
        })
    }

    /// Runs it to its end, whatever its exit status: for tools whose exit code is an answer
    /// (`qemu-img compare`, `e2fsck`).
    pub fn output(self) -> Result<Output, ToolError> {
        self.spawn()?.wait()
    }

    /// Runs it to its end; an exit status other than success is [`ToolError::Failed`].
    pub fn run(self) -> Result<Output, ToolError> {
        self.output()?.into_success()
    }
}

impl Tool<'static> {
    /// [`Tool::output`] for async code: the tool is waited for on a blocking thread, so the
    /// runtime's workers are not held up. Dropping the future stops the tool (its group is
    /// killed and it is reaped) before the drop returns, as [`blocking_tools`] does. (Its stderr is
    /// not given line by line: [`Tool::on_stderr_line`] is for blocking runs.)
    pub async fn output_async(self) -> Result<Output, ToolError> {
        let (program, command) = (self.spawn.program(), self.spawn.command_line());
        let waiting = self.spawn()?.waiting;
        let waited = blocking_tools(move || {
            let mut waiting = waiting;
            waiting.abandoned = abandoned_fd();
            waiting.wait(None)
        })
        .await;
        waited.unwrap_or_else(|e| Err(ToolError::Io { program, command, source: std::io::Error::other(e) }))
    }

    /// [`Tool::run`] for async code, as [`Tool::output_async`] runs it.
    pub async fn run_async(self) -> Result<Output, ToolError> {
        self.output_async().await?.into_success()
    }
}

thread_local! {
    /// On a thread running [`blocking_tools`] work: the read end of the pipe whose write end the
    /// awaiting future holds. It hangs up when that future is dropped.
    static ABANDONED: std::cell::RefCell<Option<OwnedFd>> = const { std::cell::RefCell::new(None) };
}

/// A copy of this thread's [`ABANDONED`] fd, if it runs [`blocking_tools`] work.
fn abandoned_fd() -> Option<OwnedFd> {
    ABANDONED.with(|a| a.borrow().as_ref().and_then(|fd| fd.try_clone().ok()))
}

/// True if this thread runs [`blocking_tools`] work whose future was dropped.
fn is_abandoned() -> bool {
    ABANDONED.with(|a| a.borrow().as_ref().is_some_and(|fd| super::child::readable(fd.as_fd(), Duration::ZERO)))
}

/// Runs blocking work that starts tools (`qemu-img convert` of a VM's disk) on a blocking
/// thread, tied to the future that awaits it. Dropping that future (an interruption)
/// stops every tool the work runs, killed and reaped, and refuses it new ones; the drop
/// returns only once the work has returned, or after [`deadline::KILLED_EXIT`].
///
/// Why the drop waits: a plain `spawn_blocking` goes on after its future is dropped, and a
/// tool it runs goes on holding what it opened. A `qemu-img convert` reading a saved VM's
/// image holds its lock, so the undo's `cont` that follows the interruption failed with
/// `Failed to get "write" lock` and left the VM paused. Whoever drops this future may
/// touch what its tools touched as soon as the drop returns.
pub async fn blocking_tools<T, F>(work: F) -> Result<T, tokio::task::JoinError>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    /// Held by the future: hangs up the pipe, then waits for the work to end.
    struct Held {
        write_end: Option<OwnedFd>,
        ended: std::sync::mpsc::Receiver<()>,
    }
    impl Drop for Held {
        fn drop(&mut self) {
            drop(self.write_end.take());
            // Disconnected once the work has returned (at once if it has already). A
            // bounded block of this thread: a killed tool is reaped within KILLED_EXIT.
            let _ = self.ended.recv_timeout(super::deadline::KILLED_EXIT);
        }
    }
    /// Clears the thread's fd when the work ends, even by a panic (the thread is reused).
    struct OnThread;
    impl Drop for OnThread {
        fn drop(&mut self) {
            ABANDONED.with(|a| a.borrow_mut().take());
        }
    }
    let (read_end, write_end) = match nix::unistd::pipe2(OFlag::O_CLOEXEC) {
        Ok(p) => p,
        // No pipe to be had (out of fds): the work runs unscoped rather than not at all;
        // its tools are still killed at their deadlines.
        Err(_) => return tokio::task::spawn_blocking(work).await,
    };
    let (ended_tx, ended) = std::sync::mpsc::channel::<()>();
    let _held = Held { write_end: Some(write_end), ended };
    tokio::task::spawn_blocking(move || {
        let _ended = ended_tx;
        ABANDONED.with(|a| *a.borrow_mut() = Some(read_end));
        let _clear = OnThread;
        work()
    })
    .await
}

/// A tool that was started. Dropping it kills its process group and reaps it.
pub struct Running<'a> {
    waiting: Waiting,
    on_stderr_line: Option<&'a mut dyn FnMut(&str)>,
}

impl Running<'_> {
    /// Waits for the tool to end, reading its output, until its deadline. Any exit status
    /// is an [`Output`]; [`Output::into_success`] refuses a failure.
    pub fn wait(self) -> Result<Output, ToolError> {
        self.waiting.wait(self.on_stderr_line)
    }
}

/// What waiting for a started tool needs, apart from the caller's stderr callback (which
/// may not leave the caller's thread).
struct Waiting {
    stdout: Option<ChildStdout>,
    stderr: Option<ChildStderr>,
    child: Child,
    program: String,
    command: String,
    timeout: Duration,
    deadline: Instant,
    stdout_cap: usize,
    /// The read end of a pipe whose write end an async caller holds ([`blocking_tools`]): it
    /// hangs up when the caller stops waiting, and the tool is then killed.
    abandoned: Option<OwnedFd>,
}

impl Waiting {
    fn wait(mut self, mut on_line: Option<&mut dyn FnMut(&str)>) -> Result<Output, ToolError> {
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        let mut line = Vec::new();
        let mut buf = vec![0u8; 64 << 10];
        let mut status = None;
        loop {
            if status.is_none() {
                // Once it has exited, what it left running is killed, so its pipes close.
                status = self.child.try_status();
            }
            if status.is_some() && self.stdout.is_none() && self.stderr.is_none() {
                break;
            }
            let left = self.deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                self.child.kill();
                return Err(ToolError::TimedOut { program: self.program, command: self.command, waited: self.timeout });
            }
            let ready = {
                let mut fds = Vec::with_capacity(3);
                if status.is_none() {
                    fds.push(PollFd::new(self.child.pidfd(), PollFlags::POLLIN));
                }
                let out_at = self.stdout.as_ref().map(|p| {
                    fds.push(PollFd::new(p.as_fd(), PollFlags::POLLIN));
                    fds.len() - 1
                });
                let err_at = self.stderr.as_ref().map(|p| {
                    fds.push(PollFd::new(p.as_fd(), PollFlags::POLLIN));
                    fds.len() - 1
                });
                let abandoned_at = self.abandoned.as_ref().map(|p| {
                    fds.push(PollFd::new(p.as_fd(), PollFlags::POLLIN));
                    fds.len() - 1
                });
                match nix::poll::poll(&mut fds, poll_timeout(left)) {
                    Ok(_) | Err(Errno::EINTR) => {
                        // Flags nix does not know count as ready: the read will tell.
                        let ready = |at: Option<usize>| at.is_some_and(|i| fds[i].any().unwrap_or(true));
                        Ok((ready(out_at), ready(err_at), ready(abandoned_at)))
                    }
                    Err(e) => Err(e),
                }
            }
            .map_err(std::io::Error::from);
            let (out_ready, err_ready, abandoned) = match ready {
                Ok(r) => r,
                Err(e) => return Err(self.io_failure(e)),
            };
            if abandoned {
                // Nobody waits for the result any more: the caller's future was dropped.
                return Err(self.io_failure(std::io::ErrorKind::Interrupted.into()));
            }
            if out_ready {
                match read_some(self.stdout.as_mut(), &mut buf) {
                    Ok(0) => self.stdout = None,
                    Ok(n) if stdout.len() + n > self.stdout_cap => {
                        self.child.kill();
                        return Err(ToolError::OutputTooLarge {
                            program: self.program,
                            command: self.command,
                            cap: self.stdout_cap,
                        });
                    }
                    Ok(n) => stdout.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(self.io_failure(e)),
                }
            }
            if err_ready {
                match read_some(self.stderr.as_mut(), &mut buf) {
                    Ok(0) => {
                        self.stderr = None;
                        if !line.is_empty() {
                            emit(&mut on_line, &std::mem::take(&mut line));
                        }
                    }
                    Ok(n) => {
                        stderr.extend_from_slice(&buf[..n]);
                        if stderr.len() > 2 * STDERR_TAIL {
                            stderr.drain(..stderr.len() - STDERR_TAIL);
                        }
                        if on_line.is_some() {
                            for &b in &buf[..n] {
                                if b == b'\n' {
                                    emit(&mut on_line, &std::mem::take(&mut line));
                                } else {
                                    line.push(b);
                                }
                            }
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(self.io_failure(e)),
                }
            }
        }
        let status = status.expect("the loop ends once the tool has exited");
        let tail = &stderr[stderr.len().saturating_sub(STDERR_TAIL)..];
        Ok(Output {
            status,
            stdout,
            stderr: String::from_utf8_lossy(tail).into_owned(),
            program: self.program,
            command: self.command,
        })
    }

    fn io_failure(mut self, source: std::io::Error) -> ToolError {
        self.child.kill();
        ToolError::Io { program: self.program, command: self.command, source }
    }
}

/// Gives one line of stderr to the caller's callback, if it gave one.
fn emit(on_line: &mut Option<&mut dyn FnMut(&str)>, bytes: &[u8]) {
    if let Some(f) = on_line.as_mut() {
        f(&String::from_utf8_lossy(bytes));
    }
}

fn read_some(pipe: Option<&mut impl Read>, buf: &mut [u8]) -> std::io::Result<usize> {
    match pipe {
        Some(p) => p.read(buf),
        None => Ok(0),
    }
}
