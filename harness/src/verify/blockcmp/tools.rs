//! The external processes a comparison runs besides `qemu-img` (which it runs as
//! [`sys::Tool`](crate::sys::Tool)s): `qemu-storage-daemon` exporting images over NBD on a
//! unix socket in a private folder, owned by a guard that stops and reaps it on every path.

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;

use crate::qemu::programs::QemuProgram;
use crate::qemu::DiskFormat;
use crate::sys::{deadline, Child, Spawn};

/// Stdout of a tool larger than this is refused (a map of a huge, fragmented disk).
pub const MAX_OUTPUT: usize = 1 << 30;

/// At most `cap` bytes of a text file, lossily decoded ("" if it cannot be read).
fn read_capped(path: &Path, cap: u64) -> String {
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
    process: Option<Child>,
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
        let out = File::create(&log)?;
        // PDEATHSIG: the daemon ends inside the comparison, on the thread that started it.
        let process = Spawn::new("env")
            .arg(tunables)
            .arg(QemuProgram::StorageDaemon.path())
            .args(args)
            .stdout(out.try_clone()?)
            .stderr(out)
            .keep_fd(fd)
            .die_with_parent()
            .spawn()?;
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
            p.terminate(deadline::STORAGE_DAEMON_STOP);
        }
    }
}
