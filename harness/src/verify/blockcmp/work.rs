//! The comparison itself: pieces of the plan compared on worker threads, each image's bytes
//! taken where they are cheapest. Bytes a file holds verbatim are compared in place, in
//! the file's mapping ([`Mapped`]: the page cache's own pages, no copy; measured on a warm
//! 1 GiB qcow2 pair, 0.06 s against 0.11-0.2 s reading it into buffers with `pread`);
//! zeros are not materialised; only bytes from the NBD export (or a file that could not
//! be mapped) are read into a buffer.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use super::map::{self, Source};
use super::nbd::{self, Client};
use super::{panic_text, BlockCompareError, Image, Options};
use crate::sys::Mapped;

/// One file of an image's backing chain whose extents are read straight from it.
pub(super) struct Layer {
    pub file: File,
    /// The file mapped, if it could be (else it is read with `pread`).
    pub mapped: Option<Mapped>,
}

impl Layer {
    pub fn new(file: File) -> Layer {
        // A file that cannot be mapped is still read, a piece at a time.
        let mapped = Mapped::map(&file).ok().flatten();
        Layer { file, mapped }
    }

    /// How many bytes of the file can be read: the mapping's, else the file's length now.
    pub fn len(&self) -> Option<u64> {
        match &self.mapped {
            Some(m) => Some(m.bytes().len() as u64),
            None => self.file.metadata().ok().map(|m| m.len()),
        }
    }
}

/// Data below this is compared on the calling thread: starting workers costs more.
const SMALL: u64 = 8 << 20;

/// What the workers found.
pub(super) struct Outcome {
    pub first_difference: Option<u64>,
    pub compared: u64,
}

/// Why a comparison worker stopped; the caller turns it into a [`BlockCompareError`].
pub(super) enum WorkerError {
    /// An NBD failure: the caller adds the daemon's evidence.
    Nbd { image: PathBuf, step: String, error: String },
    /// Any other failure, already in the words a user gets.
    Other(BlockCompareError),
}

/// Compares `pieces` (sorted) on up to `opts.workers` threads. Pieces are taken in order;
/// once a difference is known, pieces after it are skipped, while every piece before it is
/// still compared, so the smallest difference found is the first one.
pub(super) fn run(
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
    let data: u64 = pieces.iter().map(|p| p.1).sum();
    let workers = if data < SMALL { 1 } else { opts.workers.clamp(1, 64).min(pieces.len().max(1)) };
    let chunk = pieces.iter().map(|p| p.1).max().unwrap_or(0) as usize;
    let work = || {
        let mut sides = [Side::new(&images[0], socket, opts), Side::new(&images[1], socket, opts)];
        let zeros = vec![0u8; chunk];
        while !stop.load(Ordering::Relaxed) {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(&(start, len)) = pieces.get(i) else { break };
            if start >= first.load(Ordering::Relaxed) {
                break;
            }
            match compare_piece(&mut sides, start, len, &zeros) {
                Err(e) => {
                    stop.store(true, Ordering::Relaxed);
                    error.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
                    break;
                }
                Ok(found) => {
                    compared.fetch_add(len, Ordering::Relaxed);
                    if let Some(at) = found {
                        first.fetch_min(at, Ordering::Relaxed);
                    }
                }
            }
        }
    };
    if workers == 1 {
        work();
    } else {
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..workers).map(|_| s.spawn(work)).collect();
            for h in handles {
                if let Err(p) = h.join() {
                    let e = WorkerError::Other(BlockCompareError::Worker(panic_text(&*p)));
                    error.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
                }
            }
        });
    }
    if let Some(e) = error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    // A page of a mapping that could not be read was compared as zeros: the result is void.
    for image in images {
        if image.layers.iter().flatten().any(|l| l.mapped.as_ref().is_some_and(Mapped::damaged)) {
            return Err(WorkerError::Other(BlockCompareError::Changed { image: image.path.to_owned() }));
        }
    }
    let f = first.load(Ordering::Relaxed);
    Ok(Outcome { first_difference: (f != u64::MAX).then_some(f), compared: compared.load(Ordering::Relaxed) })
}

/// The bytes of one run of a piece, as compared.
#[derive(Clone, Copy)]
enum Bytes<'b> {
    Zero,
    Slice(&'b [u8]),
}

/// A run of a piece: its start, length and bytes.
type Run<'b> = (u64, u64, Bytes<'b>);

/// Compares `[start, start + len)` of both images; the first differing offset, if any.
fn compare_piece<'a>(
    sides: &'a mut [Side; 2],
    start: u64,
    len: u64,
    zeros: &'a [u8],
) -> Result<Option<u64>, WorkerError> {
    let [a, b] = sides;
    a.fill(start, len)?;
    b.fill(start, len)?;
    let ra: Vec<Run> = a.runs(start, len)?;
    let rb: Vec<Run> = b.runs(start, len)?;
    // Walk both lists of runs at once, over the sub-ranges where neither changes source.
    let (mut i, mut j, mut pos) = (0, 0, start);
    let end = start + len;
    while pos < end {
        while ra[i].0 + ra[i].1 <= pos {
            i += 1;
        }
        while rb[j].0 + rb[j].1 <= pos {
            j += 1;
        }
        let stop = (ra[i].0 + ra[i].1).min(rb[j].0 + rb[j].1).min(end);
        let n = (stop - pos) as usize;
        let slice = |run: Run<'a>| -> &'a [u8] {
            match run.2 {
                Bytes::Zero => &zeros[..n],
                Bytes::Slice(s) => {
                    let off = (pos - run.0) as usize;
                    &s[off..off + n]
                }
            }
        };
        let both_zero = matches!((ra[i].2, rb[j].2), (Bytes::Zero, Bytes::Zero));
        if !both_zero {
            if let Some(at) = map::first_difference(slice(ra[i]), slice(rb[j])) {
                return Ok(Some(pos + at as u64));
            }
        }
        pos = stop;
    }
    Ok(None)
}

/// One image's guest bytes for one worker: zeros, the file's mapping, the file read into
/// a buffer, or its own NBD connection (made when first needed).
struct Side<'a> {
    image: &'a Image<'a>,
    socket: Option<&'a Path>,
    opts: &'a Options,
    nbd: Option<Client>,
    /// Bytes of the current piece that are neither zeros nor in a mapping.
    buf: Vec<u8>,
}

impl<'a> Side<'a> {
    fn new(image: &'a Image<'a>, socket: Option<&'a Path>, opts: &'a Options) -> Self {
        Side { image, socket, opts, nbd: None, buf: Vec::new() }
    }

    /// Reads what the piece needs into the buffer: its export runs, and its file runs of
    /// files that are not mapped.
    fn fill(&mut self, start: u64, len: u64) -> Result<(), WorkerError> {
        let image = self.image;
        for run in image.map.runs(start, len) {
            let at = (run.start - start) as usize;
            match run.source {
                Source::Zero => {}
                Source::File { layer, offset } => {
                    let l = layer_of(image, layer)?;
                    if l.mapped.is_none() {
                        let dst = self.buffer(len, at, run.len);
                        l.file.read_exact_at(dst, offset).map_err(|error| {
                            WorkerError::Other(BlockCompareError::Read {
                                image: image.path.to_owned(),
                                offset,
                                len: run.len,
                                error,
                            })
                        })?;
                    }
                }
                Source::Export => {
                    self.connect()?;
                    if self.buf.len() < len as usize {
                        self.buf.resize(len as usize, 0);
                    }
                    let dst = &mut self.buf[at..at + run.len as usize];
                    if let Some(c) = self.nbd.as_mut() {
                        c.read_at(run.start, dst)
                            .map_err(|e| nbd_error(image, format!("read {} bytes at {}", run.len, run.start), e))?;
                    }
                }
            }
        }
        Ok(())
    }

    /// The piece's runs, each with where its bytes are: `(start, len, bytes)`.
    fn runs(&self, start: u64, len: u64) -> Result<Vec<Run<'_>>, WorkerError> {
        let image = self.image;
        image
            .map
            .runs(start, len)
            .map(|run| {
                let at = (run.start - start) as usize;
                let n = run.len as usize;
                let bytes = match run.source {
                    Source::Zero => Bytes::Zero,
                    Source::File { layer, offset } => match &layer_of(image, layer)?.mapped {
                        Some(m) => {
                            // The map's file extents lie inside the file as it was when
                            // the map was made; a file that shrank before it was mapped
                            // changed while it was compared.
                            let from = usize::try_from(offset).ok().filter(|&o| o + n <= m.bytes().len());
                            let from = from.ok_or_else(|| {
                                WorkerError::Other(BlockCompareError::Changed { image: image.path.to_owned() })
                            })?;
                            Bytes::Slice(&m.bytes()[from..from + n])
                        }
                        None => Bytes::Slice(&self.buf[at..at + n]),
                    },
                    Source::Export => Bytes::Slice(&self.buf[at..at + n]),
                };
                Ok((run.start, run.len, bytes))
            })
            .collect()
    }

    /// The buffer, at least `piece` bytes long, and its `[at, at + n)`.
    fn buffer(&mut self, piece: u64, at: usize, n: u64) -> &mut [u8] {
        if self.buf.len() < piece as usize {
            self.buf.resize(piece as usize, 0);
        }
        &mut self.buf[at..at + n as usize]
    }

    /// Makes this worker's NBD connection to the image's export, if not made yet, and
    /// sizes the buffer for a whole chunk.
    fn connect(&mut self) -> Result<(), WorkerError> {
        let image = self.image;
        let chunk = self.opts.chunk.clamp(4096, 64 << 20) as usize;
        if self.buf.len() < chunk {
            self.buf.resize(chunk, 0);
        }
        if self.nbd.is_some() {
            return Ok(());
        }
        let socket = self
            .socket
            .ok_or_else(|| WorkerError::Other(BlockCompareError::Worker("an export extent with no server".into())))?;
        let mut c = Client::connect(socket, image.export, self.opts.io_timeout)
            .map_err(|e| nbd_error(image, "connect and open the export".into(), e))?;
        c.set_pipeline(nbd::Pipeline { depth: self.opts.nbd_depth, request: self.opts.nbd_request });
        if c.size != image.map.size {
            return Err(WorkerError::Other(BlockCompareError::ExportSize {
                image: image.path.to_owned(),
                export: c.size,
                expected: image.map.size,
            }));
        }
        self.nbd = Some(c);
        Ok(())
    }
}

fn layer_of<'i>(image: &'i Image<'_>, layer: usize) -> Result<&'i Layer, WorkerError> {
    image
        .layers
        .get(layer)
        .and_then(Option::as_ref)
        .ok_or_else(|| WorkerError::Other(BlockCompareError::Worker("a file extent with no open file".into())))
}

fn nbd_error(image: &Image<'_>, step: String, e: nbd::NbdError) -> WorkerError {
    WorkerError::Nbd { image: image.path.to_owned(), step, error: e.to_string() }
}
