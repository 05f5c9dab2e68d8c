//! Block-level proof that two disk images hold the same guest-visible bytes, or the first
//! byte at which they do not: a restored disk against the backup-point image, in any format
//! QEMU reads (qcow2 and its backing chains, raw, vpc, vhdx).
//!
//! Only data is read. Each image's allocation (its map) says what is data, what reads as
//! zeros and where the data lies; the union of both images' data extents is compared, and
//! what is zero in both is skipped. A region that is data in one image and a hole in the
//! other is still read: data that is all zeros equals a hole.
//!
//! The maps come from quiesce's own readers (`inspect`), with no process started: qcow2
//! L1/L2 tables and backing chains ([`qcow2`]), raw files' holes, and the block allocation
//! tables of dynamic VHD (vpc) and VHDX images ([`alloc`]; QEMU's vhdx driver reports no
//! allocation at all, and its vpc driver no host offsets). Each reader is bounds-checked,
//! fuzzed, and vouches only for layouts it knows: for anything else (encryption, an
//! external data file, subclusters, a differencing VHD or VHDX, a VHDX log to replay, a
//! fixed VHD, a backing format QEMU would probe, a table it finds wrong) `qemu-img info
//! --backing-chain` and `qemu-img map -U` give the map, as they did for every image
//! before: two qemu-img processes per image were a fixed 20-45 ms of a compare that now
//! takes 45-70 ms on a warm 1 GiB pair.
//!
//! Bytes come from where they are cheapest to get, soundly:
//! - raw images, uncompressed qcow2 clusters (no external data file, no encryption), and
//!   the blocks a VHD's or VHDX's table places in its file, are compared in place in the
//!   file that holds them (the layer of the backing chain the map names), mapped into
//!   memory ([`crate::sys::Mapped`]): the page cache's own pages, with no copy. Reading
//!   them into buffers with `pread` instead took 0.1-0.2 s for a warm 1 GiB pair where
//!   the mapping takes about 0.06 s, and that copy was all of `qemu-img compare`'s time. A
//!   file that shrinks meanwhile fails the compare ([`BlockCompareError::Changed`]);
//! - everything else (compressed clusters, what our readers leave to QEMU) through a
//!   `qemu-storage-daemon` NBD export on a unix socket in a private folder (one I/O thread
//!   per export), read by a small client of our own ([`nbd`]), one connection per worker
//!   and image, several reads in flight on each. Bytes through NBD are copied three
//!   times (daemon reads, socket write, socket read): `quiesce-bench block-compare`
//!   measures that path at 7-17 times the mapped one, so it is used only where needed.
//!
//! Workers compare chunks of both images in parallel (byte for byte: both sides are in
//! memory, so a memcmp is cheaper than hashing them); the first differing byte is exact.
//! Images in use by a running QEMU can be compared (`-U`, `force-share`); what is read is
//! then whatever the files hold at that moment.

pub mod alloc;
mod inspect;
pub mod map;
mod nbd;
pub mod qcow2;
pub mod tools;
mod work;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use self::inspect::Inspect;
use self::map::Map;
use self::tools::{ExportSpec, Server};
use self::work::{Layer, WorkerError};
use crate::qemu::DiskFormat;
use crate::sys::{deadline, ToolError};

/// What to read an image through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadPath {
    /// The image file where that is sound, the NBD export otherwise (the default).
    Auto,
    /// Everything through the NBD export (for measurements and as a cross-check).
    ExportOnly,
}

#[derive(Debug, Clone)]
pub struct Options {
    /// Bytes compared per work item; pieces never cross a multiple of it.
    pub chunk: u64,
    /// Threads comparing chunks (each with its own NBD connections).
    pub workers: usize,
    pub read_path: ReadPath,
    /// Deadline for each qemu-img run (`info`, `map`).
    pub tool_timeout: Duration,
    /// Deadline of each NBD exchange: the handshake, sending a batch of requests, and each
    /// reply from when we start waiting for it.
    pub io_timeout: Duration,
    /// NBD reads in flight at once on each connection.
    pub nbd_depth: usize,
    /// Bytes per NBD read request (capped by the server's maximum).
    pub nbd_request: u32,
}

impl Default for Options {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Options {
            chunk: 2 << 20,
            workers: cores.clamp(2, 8),
            read_path: ReadPath::Auto,
            tool_timeout: deadline::QEMU_IMG_MAP,
            io_timeout: deadline::NBD_EXCHANGE,
            // Four 512 KiB reads in flight per 2 MiB chunk: the daemon reads the next while
            // it sends one. Measured on 2 cores: within the noise of one 2 MiB read at a
            // time once the daemon's buffers are reused (0.49-0.54 s against 0.53-0.58 s
            // for two 1 GiB vhdx), a little ahead on compressed qcow2, and never worse.
            nbd_depth: 4,
            nbd_request: 512 << 10,
        }
    }
}

/// The outcome of [`compare`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockComparison {
    /// Same virtual size and the same bytes.
    pub identical: bool,
    /// The first byte offset at which the images differ. With different sizes and an equal
    /// shared part, that is the smaller size (where one image ends).
    pub first_difference: Option<u64>,
    /// Virtual sizes of A and B.
    pub size: (u64, u64),
    /// Bytes read from each image and compared (stops early at a difference).
    pub bytes_compared: u64,
    /// Bytes of the shared size that are zero in both images, so not read.
    pub bytes_skipped: u64,
    /// File names of A and B, for messages.
    pub names: (String, String),
    /// A's cluster (qcow2) or block (vhdx, vpc) size, if it has one.
    pub cluster_size: Option<u64>,
}

impl fmt::Display for BlockComparison {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (a, b) = self.size;
        if self.identical {
            return write!(
                f,
                "identical: {} of data compared, {} zero in both",
                human(self.bytes_compared),
                human(self.bytes_skipped)
            );
        }
        if a != b {
            write!(f, "sizes differ: '{}' is {a} bytes, '{}' is {b} bytes; ", self.names.0, self.names.1)?;
        }
        match self.first_difference {
            Some(at) if at < a.min(b) => {
                write!(f, "differ at byte {at}")?;
                if let Some(c) = self.cluster_size.filter(|&c| c > 0) {
                    write!(f, " (cluster {:#x} of '{}', {} clusters)", at / c * c, self.names.0, human(c))?;
                }
                Ok(())
            }
            _ => write!(f, "the first {} bytes are identical", a.min(b)),
        }
    }
}

/// "12 MiB", "1.5 GiB", "512 bytes".
fn human(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} bytes");
    }
    let mut v = bytes as f64 / 1024.0;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if v.fract() == 0.0 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BlockCompareError {
    /// The private folder for the NBD socket and the daemon's log could not be made.
    #[error("comparing disk images: a private folder for sockets and tool output: {0}")]
    TempDir(std::io::Error),
    /// `qemu-img info` or `map` of an image did not give its answer: it could not run, ran
    /// past [`Options::tool_timeout`], or failed (the image is missing, damaged, or not of
    /// the format given); qemu-img's own words end the message.
    #[error("{image}: {step}: {error}")]
    Failed { image: PathBuf, step: &'static str, error: ToolError },
    /// qemu-img answered with something we cannot use (bad JSON, an impossible map).
    #[error("{image}: {step}: {problem}")]
    BadOutput { image: PathBuf, step: &'static str, problem: String },
    /// An image file could not be opened to read its data straight from it.
    #[error("{image}: {error}")]
    Open { image: PathBuf, error: std::io::Error },
    /// Reading an image file at an offset its map gave failed (the file shrank, or the
    /// disk under it failed).
    #[error("{image}: reading {len} bytes at host offset {offset}: {error}")]
    Read { image: PathBuf, offset: u64, len: u64, error: std::io::Error },
    /// qemu-storage-daemon, which exports the images read through QEMU, could not start.
    #[error("could not start qemu-storage-daemon to export the images over NBD: {0}")]
    Server(std::io::Error),
    /// Reading through the NBD export failed; the daemon's state and log follow.
    #[error("{image}: reading through NBD ({step}): {error}; {evidence}")]
    Nbd { image: PathBuf, step: String, error: String, evidence: String },
    /// The export and qemu-img disagree on the image's size: the image changed while it
    /// was compared.
    #[error("{image}: the NBD export is {export} bytes but qemu-img says {expected}")]
    ExportSize { image: PathBuf, export: u64, expected: u64 },
    /// A page of an image file could not be read while it was compared: the file shrank
    /// (another program changed it meanwhile) or the disk under it failed. No result is
    /// given; compare it again once nothing writes to it.
    #[error(
        "{image}: the file changed or could not be read while it was compared (a page past its end, or an I/O error)"
    )]
    Changed { image: PathBuf },
    /// A comparison thread panicked (a bug in quiesce); the panic's message follows.
    #[error("a comparison worker panicked: {0}")]
    Worker(String),
}

/// Compares the guest-visible content of `a` and `b` with the default [`Options`].
pub fn compare(a: &Path, a_fmt: DiskFormat, b: &Path, b_fmt: DiskFormat) -> Result<BlockComparison, BlockCompareError> {
    compare_with(a, a_fmt, b, b_fmt, &Options::default())
}

/// One image as the comparison sees it.
struct Image<'p> {
    path: &'p Path,
    format: DiskFormat,
    name: String,
    export: &'static str,
    map: Map,
    cluster_size: Option<u64>,
    /// The files of the backing chain (0 is the image itself) whose extents are read
    /// straight from the file; None for layers read through the export.
    layers: Vec<Option<Layer>>,
}

/// Compares with explicit options.
pub fn compare_with(
    a: &Path,
    a_fmt: DiskFormat,
    b: &Path,
    b_fmt: DiskFormat,
    opts: &Options,
) -> Result<BlockComparison, BlockCompareError> {
    // Our own readers first: they answer in well under a millisecond for the usual image,
    // where the two qemu-img runs per image took 20-45 ms (on 2 loaded cores).
    let own = |path, format, export| match opts.read_path {
        ReadPath::Auto => inspect::own(path, format, export),
        ReadPath::ExportOnly => None,
    };
    let (ia, ib) = match (own(a, a_fmt, "a"), own(b, b_fmt, "b")) {
        (Some(ia), Some(ib)) => (Ok(ia), Ok(ib)),
        (Some(ia), None) => (Ok(ia), Inspect::start(b, b_fmt, opts, "b").and_then(|i| i.finish(opts.read_path))),
        (None, Some(ib)) => (Inspect::start(a, a_fmt, opts, "a").and_then(|i| i.finish(opts.read_path)), Ok(ib)),
        // All four qemu-img runs at once: they are independent and mostly start-up time.
        // Each image's two are read on a thread of their own, so neither waits on a full pipe.
        (None, None) => std::thread::scope(|s| {
            let ia = s.spawn(|| Inspect::start(a, a_fmt, opts, "a")?.finish(opts.read_path));
            let ib = Inspect::start(b, b_fmt, opts, "b").and_then(|i| i.finish(opts.read_path));
            (ia.join().unwrap_or_else(|p| Err(BlockCompareError::Worker(panic_text(&p)))), ib)
        }),
    };
    let images = [ia?, ib?];

    // Each worker holds two buffers of a chunk: keep them between a page and 64 MiB.
    let plan = map::plan(&images[0].map, &images[1].map, opts.chunk.clamp(4096, 64 << 20));
    let exports: Vec<ExportSpec> = images
        .iter()
        .filter(|i| i.map.needs_export() && !plan.pieces.is_empty())
        .map(|i| ExportSpec { name: i.export, path: i.path, format: i.format })
        .collect();
    // The private folder for the daemon's socket and log, only if a daemon is needed.
    let dir = if exports.is_empty() {
        None
    } else {
        Some(tempfile::Builder::new().prefix("quiesce-blockcmp-").tempdir().map_err(BlockCompareError::TempDir)?)
    };
    let mut server = match &dir {
        Some(dir) => Some(Server::start(dir.path(), &exports).map_err(BlockCompareError::Server)?),
        None => None,
    };

    let outcome = work::run(&images, &plan.pieces, server.as_ref().map(|s| s.socket.as_path()), opts);
    let outcome = match outcome {
        Err(WorkerError::Nbd { image, step, error }) => {
            let evidence = server.as_mut().map(|s| s.evidence(deadline::STORAGE_DAEMON_EXIT)).unwrap_or_default();
            return Err(BlockCompareError::Nbd { image, step, error, evidence });
        }
        Err(WorkerError::Other(e)) => return Err(e),
        Ok(o) => o,
    };
    drop(server);

    let (sa, sb) = (images[0].map.size, images[1].map.size);
    let first_difference = outcome.first_difference.or((sa != sb).then_some(sa.min(sb)));
    Ok(BlockComparison {
        identical: first_difference.is_none(),
        first_difference,
        size: (sa, sb),
        bytes_compared: outcome.compared,
        bytes_skipped: plan.zero_in_both,
        names: (images[0].name.clone(), images[1].name.clone()),
        cluster_size: images[0].cluster_size,
    })
}

/// What a panicking thread said.
fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    let what = p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned());
    what.unwrap_or_else(|| "unknown".into())
}

#[cfg(test)]
mod tests;
