//! Block-level proof that two disk images hold the same guest-visible bytes, or the first
//! byte at which they do not: a restored disk against the backup-point image, in any format
//! QEMU reads (qcow2 and its backing chains, raw, vpc, vhdx).
//!
//! Only data is read. `qemu-img map -U` gives each image's allocation; the union of both
//! images' data extents is compared, and what is zero in both is skipped. A region that is
//! data in one image and a hole in the other is still read: data that is all zeros equals
//! a hole.
//!
//! VHD (vpc) and VHDX images with no backing file are mapped from their own block
//! allocation tables instead ([`alloc`]): QEMU's vhdx driver reports no allocation at all,
//! and its vpc driver no host offsets, so `qemu-img map` would have every VHDX byte read
//! through NBD. qemu-img map runs for them only if their tables cannot be read (a
//! differencing disk, a VHDX log to replay, a fixed VHD).
//!
//! Bytes come from where they are cheapest to get, soundly:
//! - raw images, uncompressed qcow2 clusters (no external data file, no encryption), and
//!   the blocks a VHD's or VHDX's table places in its file, are read straight from the
//!   file that holds them at the host offset the map gives; for
//!   a backing chain the map's `depth` names the layer, whose file `qemu-img info
//!   --backing-chain` names;
//! - everything else (compressed clusters, layers we cannot open) through a
//!   `qemu-storage-daemon` NBD export on a unix socket in a private folder (one I/O thread
//!   per export), read by a small client of our own ([`nbd`]), one connection per worker
//!   and image, several reads in flight on each.
//!
//! `quiesce-bench block-compare` measures both paths against `qemu-img compare`: on a
//! 1 GiB qcow2 pair with ~500 MiB of data, a warm page cache and 2 cores, the file path
//! takes ~0.1 s and the NBD path ~0.3 s; a 1 GiB vhdx pair, read whole through NBD
//! (QEMU's vhdx driver reports neither holes nor host offsets), ~0.55 s, where it took
//! ~2 s while the daemon allocated a fresh buffer for every request (see
//! [`tools::Server`]). Bytes through NBD are still copied three times (daemon reads, socket
//! write, socket read) against once from the file, so the file is used wherever it is
//! sound.
//!
//! Workers compare chunks of both images in parallel (byte for byte: both sides are in
//! memory, so a memcmp is cheaper than hashing them); the first differing byte is exact.
//! Images in use by a running QEMU can be compared (`-U`, `force-share`); what is read is
//! then whatever the files hold at that moment.

pub mod alloc;
pub mod map;
mod nbd;
pub mod tools;

use std::fmt;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use self::map::{Map, Source};
use self::nbd::Client;
use self::tools::{ExportSpec, Server};
use crate::qemu::programs::QemuProgram;
use crate::qemu::DiskFormat;
use crate::sys::{deadline, Output, Running, Tool, ToolError};

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
    layers: Vec<Option<File>>,
}

/// Compares with explicit options.
pub fn compare_with(
    a: &Path,
    a_fmt: DiskFormat,
    b: &Path,
    b_fmt: DiskFormat,
    opts: &Options,
) -> Result<BlockComparison, BlockCompareError> {
    let dir = tempfile::Builder::new().prefix("quiesce-blockcmp-").tempdir().map_err(BlockCompareError::TempDir)?;
    // All four qemu-img runs at once: they are independent and mostly start-up time. Each
    // image's two are read on a thread of their own, so neither waits on a full pipe.
    let (ia, ib) = std::thread::scope(|s| {
        let ia = s.spawn(|| Inspect::start(a, a_fmt, opts, "a")?.finish(opts.read_path));
        let ib = Inspect::start(b, b_fmt, opts, "b").and_then(|i| i.finish(opts.read_path));
        (ia.join().unwrap_or_else(|p| Err(BlockCompareError::Worker(panic_text(&p)))), ib)
    });
    let images = [ia?, ib?];

    // Each worker holds two buffers of a chunk: keep them between a page and 64 MiB.
    let plan = map::plan(&images[0].map, &images[1].map, opts.chunk.clamp(4096, 64 << 20));
    let exports: Vec<ExportSpec> = images
        .iter()
        .filter(|i| i.map.needs_export() && !plan.pieces.is_empty())
        .map(|i| ExportSpec { name: i.export, path: i.path, format: i.format })
        .collect();
    let mut server = if exports.is_empty() {
        None
    } else {
        Some(Server::start(dir.path(), &exports).map_err(BlockCompareError::Server)?)
    };

    let outcome = run_workers(&images, &plan.pieces, server.as_ref().map(|s| s.socket.as_path()), opts);
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

/// `qemu-img info` and `qemu-img map` of one image, running.
struct Inspect<'p> {
    path: &'p Path,
    format: DiskFormat,
    export: &'static str,
    info: Running<'static>,
    /// qemu-img map, unless the image's own tables are to be read first.
    map: Option<Running<'static>>,
    opts: Options,
}

impl<'p> Inspect<'p> {
    fn start(
        path: &'p Path,
        format: DiskFormat,
        opts: &Options,
        export: &'static str,
    ) -> Result<Self, BlockCompareError> {
        let f = format.driver().as_ref();
        let info = spawn(
            path,
            opts,
            "qemu-img info",
            &[
                "info".as_ref(),
                "-U".as_ref(),
                "--backing-chain".as_ref(),
                "--output=json".as_ref(),
                "-f".as_ref(),
                f,
                path.as_os_str(),
            ],
        )?;
        // VHD and VHDX: their own tables say more than qemu-img map would; it runs only
        // if they cannot be read (see `alloc`).
        let own_table = opts.read_path == ReadPath::Auto && alloc_reader(format).is_some();
        let map = if own_table { None } else { Some(spawn_map(path, format, opts)?) };
        Ok(Inspect { path, format, export, info, map, opts: opts.clone() })
    }

    fn finish(self, read_path: ReadPath) -> Result<Image<'p>, BlockCompareError> {
        let path = self.path;
        let failed = |step, error| BlockCompareError::Failed { image: path.to_owned(), step, error };
        let info = self.info.wait().and_then(Output::into_success).map_err(|e| failed("qemu-img info", e))?.stdout;
        let bad = |step, problem: String| BlockCompareError::BadOutput { image: path.to_owned(), step, problem };
        let chain: Vec<serde_json::Value> =
            serde_json::from_slice(&info).map_err(|e| bad("qemu-img info", format!("not a list of images: {e}")))?;
        if chain.is_empty() || chain.len() > MAX_CHAIN {
            return Err(bad("qemu-img info", format!("a backing chain of {} images", chain.len())));
        }
        let size = chain[0]["virtual-size"].as_u64().ok_or_else(|| bad("qemu-img info", "no virtual-size".into()))?;
        let cluster_size = chain[0]["cluster-size"].as_u64();
        let name = path.file_name().map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned());
        let image = |map, layers| Image {
            path,
            format: self.format,
            name: name.clone(),
            export: self.export,
            map,
            cluster_size,
            layers,
        };

        if self.map.is_none() {
            if let Some((read_table, step)) = alloc_reader(self.format).filter(|_| chain.len() == 1) {
                let file =
                    File::open(path).map_err(|error| BlockCompareError::Open { image: path.to_owned(), error })?;
                if let Some(map) = read_table(&file, size).map_err(|p| bad(step, p))? {
                    return Ok(image(map, vec![Some(file)]));
                }
            }
        }
        let map = match self.map {
            Some(running) => running,
            None => spawn_map(path, self.format, &self.opts)?,
        };
        let map = map.wait().and_then(Output::into_success).map_err(|e| failed("qemu-img map", e))?.stdout;
        let layers: Vec<Option<File>> = chain
            .iter()
            .enumerate()
            .map(|(depth, layer)| {
                // The image itself is opened by the path we were given; backing files by the
                // name qemu-img opened them by (relative to the same working folder).
                let file = if depth == 0 { Some(path) } else { layer["filename"].as_str().map(Path::new) };
                let expected = if depth == 0 { Some(self.format.driver()) } else { None };
                match file {
                    Some(file) if read_path == ReadPath::Auto && stores_verbatim(layer, expected) => {
                        File::open(file).ok()
                    }
                    _ => None,
                }
            })
            .collect();
        let trust: Vec<Option<u64>> =
            layers.iter().map(|f| f.as_ref().and_then(|f| f.metadata().ok()).map(|m| m.len())).collect();
        let map = map::parse(&map, size, &trust).map_err(|p| bad("qemu-img map", p))?;
        Ok(image(map, layers))
    }
}

/// Reads the allocation of an image of `format` from its own tables, if quiesce can
/// ([`alloc`]), and the name of that step for errors.
type TableReader = fn(&File, u64) -> Result<Option<Map>, String>;
fn alloc_reader(format: DiskFormat) -> Option<(TableReader, &'static str)> {
    match format {
        DiskFormat::Vhdx => Some((|f, size| alloc::vhdx(f, size), "VHDX block allocation table")),
        DiskFormat::Vpc => Some((|f, size| alloc::vhd(f, size), "VHD block allocation table")),
        DiskFormat::Qcow2 | DiskFormat::Raw => None,
    }
}

fn spawn(
    path: &Path,
    opts: &Options,
    step: &'static str,
    args: &[&std::ffi::OsStr],
) -> Result<Running<'static>, BlockCompareError> {
    Tool::new(QemuProgram::Img.path(), opts.tool_timeout)
        .args(args)
        .stdout_cap(tools::MAX_OUTPUT)
        .spawn()
        .map_err(|error| BlockCompareError::Failed { image: path.to_owned(), step, error })
}

fn spawn_map(path: &Path, format: DiskFormat, opts: &Options) -> Result<Running<'static>, BlockCompareError> {
    let f = format.driver().as_ref();
    spawn(
        path,
        opts,
        "qemu-img map",
        &["map".as_ref(), "-U".as_ref(), "--output=json".as_ref(), "-f".as_ref(), f, path.as_os_str()],
    )
}

/// Backing chains longer than this are refused.
const MAX_CHAIN: usize = 4096;

/// True if a layer (one entry of `qemu-img info --backing-chain`) keeps guest data verbatim
/// at the host offsets its map gives: raw, and qcow2 whose data is neither in an external
/// file nor encrypted. `expected` is the format the layer must have, if known.
fn stores_verbatim(layer: &serde_json::Value, expected: Option<&str>) -> bool {
    let format = layer["format"].as_str().unwrap_or("");
    if expected.is_some_and(|e| e != format) || layer["encrypted"].as_bool().unwrap_or(false) {
        return false;
    }
    let data = &layer["format-specific"]["data"];
    match format {
        "raw" => true,
        "qcow2" => data.get("data-file").is_none() && data.get("encrypt").is_none(),
        _ => false,
    }
}

/// What a panicking thread said.
fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    let what = p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned());
    what.unwrap_or_else(|| "unknown".into())
}

/// What the workers found.
struct Outcome {
    first_difference: Option<u64>,
    compared: u64,
}

/// Why a comparison worker stopped; the caller turns it into a [`BlockCompareError`].
enum WorkerError {
    /// An NBD failure: the caller adds the daemon's evidence.
    Nbd { image: PathBuf, step: String, error: String },
    /// Any other failure, already in the words a user gets.
    Other(BlockCompareError),
}

/// Compares `pieces` (sorted) on `opts.workers` threads. Pieces are taken in order; once a
/// difference is known, pieces after it are skipped, while every piece before it is still
/// compared, so the smallest difference found is the first one.
fn run_workers(
    images: &[Image; 2],
    pieces: &[(u64, u64)],
    socket: Option<&Path>,
    opts: &Options,
) -> Result<Outcome, WorkerError> {
    let next = AtomicUsize::new(0);
    let first = AtomicU64::new(u64::MAX);
    let compared = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let error: Mutex<Option<WorkerError>> = Mutex::new(None);
    let workers = opts.workers.clamp(1, 64).min(pieces.len().max(1));
    let chunk = pieces.iter().map(|p| p.1).max().unwrap_or(0) as usize;
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                s.spawn(|| {
                    let mut readers = [Reader::new(&images[0], socket, opts), Reader::new(&images[1], socket, opts)];
                    let (mut ba, mut bb) = (vec![0u8; chunk], vec![0u8; chunk]);
                    while !stop.load(Ordering::Relaxed) {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(&(start, len)) = pieces.get(i) else { break };
                        if start >= first.load(Ordering::Relaxed) {
                            break;
                        }
                        let (da, db) = (&mut ba[..len as usize], &mut bb[..len as usize]);
                        let read = readers[0].read(start, da).and_then(|()| readers[1].read(start, db));
                        if let Err(e) = read {
                            stop.store(true, Ordering::Relaxed);
                            error.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
                            break;
                        }
                        compared.fetch_add(len, Ordering::Relaxed);
                        if let Some(at) = map::first_difference(da, db) {
                            first.fetch_min(start + at as u64, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        for h in handles {
            if let Err(p) = h.join() {
                let e = WorkerError::Other(BlockCompareError::Worker(panic_text(&*p)));
                error.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
            }
        }
    });
    if let Some(e) = error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    let f = first.load(Ordering::Relaxed);
    Ok(Outcome { first_difference: (f != u64::MAX).then_some(f), compared: compared.load(Ordering::Relaxed) })
}

/// Reads one image's guest bytes for one worker: zeros, the file, or its own NBD connection
/// (made when first needed).
struct Reader<'a> {
    image: &'a Image<'a>,
    socket: Option<&'a Path>,
    opts: &'a Options,
    nbd: Option<Client>,
}

impl<'a> Reader<'a> {
    fn new(image: &'a Image<'a>, socket: Option<&'a Path>, opts: &'a Options) -> Self {
        Reader { image, socket, opts, nbd: None }
    }

    fn read(&mut self, start: u64, buf: &mut [u8]) -> Result<(), WorkerError> {
        let image = self.image;
        for run in image.map.runs(start, buf.len() as u64) {
            let dst = &mut buf[(run.start - start) as usize..(run.start - start + run.len) as usize];
            match run.source {
                Source::Zero => dst.fill(0),
                Source::File { layer, offset } => {
                    let file = image.layers.get(layer).and_then(Option::as_ref).ok_or_else(|| {
                        WorkerError::Other(BlockCompareError::Worker("a file extent with no open file".into()))
                    })?;
                    file.read_exact_at(dst, offset).map_err(|error| {
                        WorkerError::Other(BlockCompareError::Read {
                            image: image.path.to_owned(),
                            offset,
                            len: run.len,
                            error,
                        })
                    })?;
                }
                Source::Export => {
                    let nbd_err = |step: String, e: nbd::NbdError| WorkerError::Nbd {
                        image: image.path.to_owned(),
                        step,
                        error: e.to_string(),
                    };
                    if self.nbd.is_none() {
                        let socket = self.socket.ok_or_else(|| {
                            WorkerError::Other(BlockCompareError::Worker("an export extent with no server".into()))
                        })?;
                        let mut c = Client::connect(socket, image.export, self.opts.io_timeout)
                            .map_err(|e| nbd_err("connect and open the export".into(), e))?;
                        c.set_pipeline(nbd::Pipeline { depth: self.opts.nbd_depth, request: self.opts.nbd_request });
                        if c.size != image.map.size {
                            return Err(WorkerError::Other(BlockCompareError::ExportSize {
                                image: image.path.to_owned(),
                                export: c.size,
                                expected: image.map.size,
                            }));
                        }
                        self.nbd = Some(c);
                    }
                    if let Some(c) = self.nbd.as_mut() {
                        c.read_at(run.start, dst)
                            .map_err(|e| nbd_err(format!("read {} bytes at {}", run.len, run.start), e))?;
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
