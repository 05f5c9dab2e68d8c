//! The external processes a comparison runs, each owned by a guard that kills and reaps it
//! on every path: `qemu-img` (map, info) with a deadline, and `qemu-storage-daemon`
//! exporting images over NBD on a unix socket in a private folder.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde_json::json;

use crate::qemu::process::QemuProcess;
use crate::qemu::DiskFormat;

/// Output of a tool larger than this is refused (a map of a huge, fragmented disk).
pub const MAX_OUTPUT: u64 = 1 << 30;

/// How a tool run went wrong, without the image: the caller adds which image and step.
#[derive(Debug)]
pub enum ToolFailure {
    Spawn(std::io::Error),
    Timeout(Duration),
    Failed { status: String, stderr: String },
    Output(String),
}

impl std::fmt::Display for ToolFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ToolFailure::Spawn(e) => write!(f, "could not run it: {e}"),
            ToolFailure::Timeout(waited) => write!(f, "did not finish within {waited:?}; it was killed"),
            ToolFailure::Failed { status, stderr } => write!(f, "failed ({status}): {stderr}"),
            ToolFailure::Output(problem) => write!(f, "its output: {problem}"),
        }
    }
}

/// A running tool: its own process group, stdout and stderr in files of a private folder.
pub struct Tool {
    child: Child,
    pidfd: Option<OwnedFd>,
    stdout: PathBuf,
    stderr: PathBuf,
    reaped: bool,
}

impl Tool {
    /// Starts `program args`; `dir` (private, removed by the caller) takes its output as
    /// `<name>.out` and `<name>.err`.
    pub fn spawn(program: &str, args: &[&std::ffi::OsStr], dir: &Path, name: &str) -> Result<Tool, ToolFailure> {
        let (stdout, stderr) = (dir.join(format!("{name}.out")), dir.join(format!("{name}.err")));
        let out = File::create(&stdout).map_err(ToolFailure::Spawn)?;
        let err = File::create(&stderr).map_err(ToolFailure::Spawn)?;
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .spawn()
            .map_err(ToolFailure::Spawn)?;
        // Without a pidfd (an old kernel) the wait below cannot have a deadline; fail then.
        let pidfd = pidfd_open(child.id() as libc::pid_t).ok();
        Ok(Tool { child, pidfd, stdout, stderr, reaped: false })
    }

    /// Starts `program args`, waits for it up to `timeout`, and returns its stdout if it
    /// succeeded.
    pub fn run(
        program: &str,
        args: &[&std::ffi::OsStr],
        dir: &Path,
        name: &str,
        timeout: Duration,
    ) -> Result<Vec<u8>, ToolFailure> {
        let deadline = Instant::now() + timeout;
        Tool::spawn(program, args, dir, name)?.finish(deadline)
    }

    /// Waits for the tool to exit, up to `deadline`: how it ended, and its stderr (capped).
    pub fn status(mut self, deadline: Instant) -> Result<(ExitStatus, String), ToolFailure> {
        let status = self.wait(deadline)?;
        Ok((status, read_capped(&self.stderr, 64 << 10)))
    }

    /// Waits for the tool to exit, up to `deadline`; returns its stdout if it succeeded.
    pub fn finish(mut self, deadline: Instant) -> Result<Vec<u8>, ToolFailure> {
        let status = self.wait(deadline)?;
        let stderr = read_capped(&self.stderr, 64 << 10);
        if !status.success() {
            return Err(ToolFailure::Failed { status: status.to_string(), stderr: stderr.trim().to_owned() });
        }
        let len = std::fs::metadata(&self.stdout).map_err(|e| ToolFailure::Output(e.to_string()))?.len();
        if len > MAX_OUTPUT {
            return Err(ToolFailure::Output(format!("{len} bytes of output, more than the {MAX_OUTPUT} we accept")));
        }
        std::fs::read(&self.stdout).map_err(|e| ToolFailure::Output(e.to_string()))
    }

    fn wait(&mut self, deadline: Instant) -> Result<ExitStatus, ToolFailure> {
        let Some(fd) = &self.pidfd else {
            return Err(ToolFailure::Spawn(std::io::Error::other("pidfd_open failed: no way to wait with a deadline")));
        };
        let started = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().map_err(ToolFailure::Spawn)? {
                self.reaped = true;
                return Ok(s);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ToolFailure::Timeout(started.elapsed()));
            }
            let mut pfd = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
            // SAFETY: one valid pollfd for the duration of the call. EINTR just loops.
            unsafe { libc::poll(&mut pfd, 1, ms) };
        }
    }
}

impl Drop for Tool {
    fn drop(&mut self) {
        if !self.reaped && self.child.try_wait().ok().flatten().is_none() {
            // ESRCH: gone already.
            let _ = killpg(Pid::from_raw(self.child.id() as i32), Signal::SIGKILL);
            let _ = self.child.wait();
        }
    }
}

fn pidfd_open(pid: libc::pid_t) -> std::io::Result<OwnedFd> {
    // SAFETY: a plain syscall; on success the kernel hands us a new fd that we then own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the fd was just returned by the kernel and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// At most `cap` bytes of a text file, lossily decoded ("" if it cannot be read).
pub fn read_capped(path: &Path, cap: u64) -> String {
    use std::io::Read;
    let mut buf = Vec::new();
    if let Ok(f) = File::open(path) {
        let _ = f.take(cap).read_to_end(&mut buf);
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// Keeps allocations up to 32 MiB (the most glibc allows, and the largest NBD read we send)
/// out of mmap, and freed memory up to 256 MiB in the heap for the next request.
const MALLOC_TUNABLES: &str = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=268435456";

/// One image to export: its path, format and export name.
pub struct ExportSpec<'a> {
    pub name: &'a str,
    pub path: &'a Path,
    pub format: DiskFormat,
}

/// `qemu-storage-daemon` exporting images read-only over NBD.
///
/// The listening socket is made here, before the daemon starts, and handed to it by fd
/// (`addr.type=fd`): a connection made right after the spawn waits in the backlog until the
/// daemon accepts it, so no wait for readiness (and no sleep) is needed. The daemon opens the
/// images with `force-share`, so images a running QEMU holds can be read; backing files are
/// opened from each image's header, with the format it names.
pub struct Server {
    process: Option<QemuProcess>,
    pub socket: PathBuf,
    log: PathBuf,
}

impl Server {
    pub fn start(dir: &Path, exports: &[ExportSpec]) -> std::io::Result<Server> {
        let socket = dir.join("nbd.sock");
        let log = dir.join("qemu-storage-daemon.log");
        let listener = UnixListener::bind(&socket)?;
        let fd = listener.as_raw_fd();
        let mut args = Vec::new();
        for e in exports {
            let node = json!({
                "driver": e.format.driver(),
                "node-name": e.name,
                "read-only": true,
                "force-share": true,
                "file": {"driver": "file", "filename": e.path, "locking": "off"},
            });
            args.extend(["--blockdev".to_owned(), node.to_string()]);
        }
        let server = json!({"addr": {"type": "fd", "str": fd.to_string()}, "max-connections": 0});
        args.extend(["--nbd-server".to_owned(), server.to_string()]);
        for e in exports {
            // Each export gets an I/O thread of its own: otherwise the daemon serves every
            // connection to every export from its one main loop thread, so the two images
            // are never served at the same time (measured on 2 cores, two 1 GiB vhdx: 2.1 s
            // on the main loop, 1.45 s with I/O threads; after the malloc fix below the gain
            // is within the noise there, but more cores can use it).
            let iothread = format!("{}-io", e.name);
            args.extend(["--object".to_owned(), json!({"qom-type": "iothread", "id": iothread}).to_string()]);
            let export = json!({
                "type": "nbd",
                "id": e.name,
                "node-name": e.name,
                "name": e.name,
                "writable": false,
                "iothread": iothread,
            });
            args.extend(["--export".to_owned(), export.to_string()]);
        }
        // glibc's malloc hands the daemon a fresh mmap for every read buffer it allocates
        // (one per NBD request), so each request page-faults and zeroes its buffer afresh
        // and unmaps it after: that was most of the daemon's time (measured: two 1 GiB vhdx
        // images through NBD in 1.45 s, 0.55 s with buffers up to 32 MiB kept in the heap).
        // `env` sets the tunable for the daemon alone and execs it in the same process, so
        // the process group, PDEATHSIG and the inherited socket are the daemon's.
        let tunables = match std::env::var("GLIBC_TUNABLES") {
            // The caller's own tunables come last, so they win.
            Ok(theirs) if !theirs.is_empty() => format!("GLIBC_TUNABLES={MALLOC_TUNABLES}:{theirs}"),
            _ => format!("GLIBC_TUNABLES={MALLOC_TUNABLES}"),
        };
        let mut argv = vec![tunables, "qemu-storage-daemon".to_owned()];
        argv.extend(args);
        let process = QemuProcess::spawn("env", &argv, &[fd], &log)?;
        // The daemon has its own copy; ours must go, so that if it dies, connections fail
        // at once instead of waiting in a backlog nobody accepts.
        drop(listener);
        Ok(Server { process: Some(process), socket, log })
    }

    /// What the daemon printed, and how it ended if it has (waiting up to `grace` for it):
    /// the evidence for an error.
    pub fn evidence(&mut self, grace: Duration) -> String {
        let status = self.process.as_mut().and_then(|p| p.wait_timeout(grace));
        let log = read_capped(&self.log, 16 << 10);
        let how = match status {
            Some(s) => format!("qemu-storage-daemon exited ({s})"),
            None => "qemu-storage-daemon is running".to_owned(),
        };
        format!("{how}: {}", log.trim())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.terminate(Duration::from_secs(5));
        }
    }
}
