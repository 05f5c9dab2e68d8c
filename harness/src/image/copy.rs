//! quiesce's own copy of a raw image, with its proof, in one pass over the data: for the
//! frozen images a backup copies out, where `qemu-img convert`, then hashing the copy, then
//! `qemu-img compare` read the data three times.
//!
//! Three stages run at once, each on its own thread, handing 8 MiB chunks down the line:
//!
//! 1. the reader reads the source's data extents (SEEK_DATA / SEEK_HOLE, so holes are never
//!    read) with O_DIRECT, in large requests: a cold, buffered read of a 2 GiB file took
//!    6.3 s here (4.2 s of it the kernel's, filling the page cache), O_DIRECT 2.1-2.5 s.
//!    The source is read once, and left out of the host's cache;
//! 2. the writer writes each chunk at its offset in the copy, leaving out 4 KiB blocks of
//!    zeros, so the copy is as sparse as the source (as `qemu-img convert` makes it);
//! 3. the prover reads each written range of the copy back (from the host's cache, where the
//!    write just put it), compares it with what was read from the source, and hashes it in
//!    file order, holes included: the sha256 of the copy as it stands on disk, which the
//!    manifest records. Then it asks the kernel to write the range back (and drop it from
//!    the cache) at once, so the final fdatasync finds little left to write.
//!
//! The copy is written through the host's cache on purpose: with O_DIRECT writes the proof
//! would have to read the copy back from the device, and this host's disk shares one
//! bandwidth between reads and writes (a 2 GiB read and a 2 GiB write at once took as long
//! as one after the other, 4.6 s). A 2 GiB copy took 7.8-8.0 s that way, against 5.1-5.6 s
//! through the cache (release build, one run each, load average 3-5).
//!
//! The proof is the copy read back, not what the writer meant to write: a byte that differs
//! in the copy (a wrong offset, a short write, a hole where data belongs, a byte changed
//! under the writer) fails the copy with [`CopyError::Differs`], and a copy of the wrong
//! length too. It is as strong as `qemu-img compare` against the frozen source, which reads
//! the same source through the same SEEK_DATA map, but reads the source once instead of
//! twice.
//!
//! Every stage stops at the copy's deadline or when the caller's `cancel` flag is set (an
//! interrupted job), within one chunk; a copy that fails or stops removes what it wrote.

use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// Bytes per chunk: large requests are what make O_DIRECT reads fast (a cold 2 GiB file
/// read with dd here: 2.9 s in 1 MiB requests, 2.5 s in 8 MiB, 2.1 s in 32 MiB).
const CHUNK: usize = 8 << 20;
/// Chunks in flight between the stages (48 MiB of buffers).
const BUFFERS: usize = 6;
/// O_DIRECT's alignment of buffers, offsets and lengths (the largest logical block size).
const ALIGN: usize = 4096;
/// The granularity at which zeros are left unwritten (as `qemu-img convert -S 4k`).
const ZERO_BLOCK: usize = 4096;

/// Why a copy failed. The partial copy has been removed in every case.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// The source image could not be opened, mapped (SEEK_DATA) or read.
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    /// The copy could not be created, written or made durable; on a full target the error
    /// is "No space left on device".
    #[error("writing {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    /// The copy, read back, is not what was read from the source: it differs at byte
    /// `offset`, or has another length. The copy cannot be trusted (a faulty target, or
    /// something writing to it).
    #[error("the copy {path}, read back, differs from its source at byte {offset}")]
    Differs { path: PathBuf, offset: u64 },
    /// The copy ran past its deadline and was stopped (a stuck or very slow disk).
    #[error("copying to {path} took longer than {after:?} and was stopped")]
    TimedOut { path: PathBuf, after: Duration },
    /// The copy was stopped by its caller (an interrupted job).
    #[error("copying to {path} was stopped: the job was interrupted")]
    Cancelled { path: PathBuf },
}

/// A finished copy: its length, the sha256 (hex) of its content read back, and the bytes
/// of data actually read from the source (its holes left out).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copied {
    pub bytes: u64,
    pub sha256: String,
    pub data_read: u64,
}

/// True if [`copy_raw`] can copy the raw image at `path`: a regular file (a block device
/// has no SEEK_DATA map and no holes to keep; `qemu-img` copies those).
pub fn can_copy(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file())
}

/// Copies the raw image `src` to a new file `dst` (which must not exist), proved and made
/// durable (fdatasync), within `deadline`; stops early once `cancel` is set. On any error
/// `dst` is removed.
pub fn copy_raw(src: &Path, dst: &Path, deadline: Duration, cancel: &AtomicBool) -> Result<Copied, CopyError> {
    copy_with(src, dst, deadline, cancel, &|_, _| {})
}

/// [`copy_raw`], calling `after_write(copy, offset)` after each chunk is written and before it
/// is read back: tests change the copy there, to watch the proof fail.
pub(crate) fn copy_with(
    src: &Path,
    dst: &Path,
    deadline: Duration,
    cancel: &AtomicBool,
    after_write: &(dyn Fn(&File, u64) + Sync),
) -> Result<Copied, CopyError> {
    let out = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(dst)
        .map_err(|source| CopyError::Write { path: dst.to_owned(), source })?;
    let copied = Copy { src, dst, until: Instant::now() + deadline, deadline, cancel, failed: AtomicBool::new(false) }
        .run(&out, after_write);
    if copied.is_err() {
        drop(out);
        let _ = std::fs::remove_file(dst);
    }
    copied
}

/// One copy under way, shared by its stages.
struct Copy<'a> {
    src: &'a Path,
    dst: &'a Path,
    until: Instant,
    deadline: Duration,
    cancel: &'a AtomicBool,
    /// Set by a stage that failed, so the others stop at their next chunk.
    failed: AtomicBool,
}

/// A stretch of the source, in file order: data read into a buffer, or a hole.
enum Piece {
    Data { offset: u64, len: usize, buf: Buffer },
    Hole { offset: u64, len: u64 },
}

/// A chunk buffer whose usable part starts at an O_DIRECT-aligned address (found, not
/// forced: the crate has no `unsafe`).
struct Buffer {
    raw: Vec<u8>,
    at: usize,
}

impl Buffer {
    fn new() -> Self {
        let raw = vec![0u8; CHUNK + ALIGN];
        let at = raw.as_ptr().align_offset(ALIGN);
        Buffer { raw, at }
    }
    fn get(&self, len: usize) -> &[u8] {
        &self.raw[self.at..self.at + len]
    }
    fn get_mut(&mut self, len: usize) -> &mut [u8] {
        &mut self.raw[self.at..self.at + len]
    }
}

impl Copy<'_> {
    fn run(&self, out: &File, after_write: &(dyn Fn(&File, u64) + Sync)) -> Result<Copied, CopyError> {
        let read_err = |source| CopyError::Read { path: self.src.to_owned(), source };
        let input = open_source(self.src).map_err(read_err)?;
        let len = input.metadata().map_err(read_err)?.len();
        // The copy's length first: what is never written stays a hole.
        out.set_len(len).map_err(|source| self.write_err(source))?;
        let (free_tx, free_rx) = sync_channel::<Buffer>(BUFFERS);
        for _ in 0..BUFFERS {
            free_tx.send(Buffer::new()).expect("the receiver is here");
        }
        let (read_tx, read_rx) = sync_channel::<Piece>(BUFFERS);
        let (written_tx, written_rx) = sync_channel::<Piece>(BUFFERS);
        let (read, written, proved) = std::thread::scope(|s| {
            let reader = s.spawn(|| self.fail_others(self.read(&input, len, free_rx, read_tx)));
            let writer = s.spawn(|| self.fail_others(self.write(out, read_rx, written_tx, after_write)));
            let proved = self.fail_others(self.prove(out, written_rx, free_tx));
            (reader.join(), writer.join(), proved)
        });
        let read = read.unwrap_or_else(|p| std::panic::resume_unwind(p));
        let written = written.unwrap_or_else(|p| std::panic::resume_unwind(p));
        let (data_read, (sha256, proved_len)) = match (read, written, proved) {
            (Ok(r), Ok(()), Ok(p)) => (r, p),
            (r, w, p) => {
                // The stage that failed says why; the others only stopped because it did.
                let errors = [r.err(), w.err(), p.err()].into_iter().flatten();
                let mut errors: Vec<CopyError> = errors.collect();
                let at = errors.iter().position(|e| !matches!(e, CopyError::Cancelled { .. })).unwrap_or(0);
                return Err(errors.swap_remove(at));
            }
        };
        out.sync_data().map_err(|source| self.write_err(source))?;
        let now = out.metadata().map_err(|source| self.write_err(source))?.len();
        if proved_len != len || now != len {
            return Err(CopyError::Differs { path: self.dst.to_owned(), offset: proved_len.min(now) });
        }
        Ok(Copied { bytes: len, sha256, data_read })
    }

    fn fail_others<T>(&self, r: Result<T, CopyError>) -> Result<T, CopyError> {
        if r.is_err() {
            self.failed.store(true, Ordering::SeqCst);
        }
        r
    }

    fn write_err(&self, source: std::io::Error) -> CopyError {
        CopyError::Write { path: self.dst.to_owned(), source }
    }

    /// Err if the copy must stop: its deadline passed, its caller cancelled it, or another
    /// stage failed (that stage's error is the one reported).
    fn go_on(&self) -> Result<(), CopyError> {
        if self.cancel.load(Ordering::SeqCst) || self.failed.load(Ordering::SeqCst) {
            return Err(CopyError::Cancelled { path: self.dst.to_owned() });
        }
        if Instant::now() >= self.until {
            return Err(CopyError::TimedOut { path: self.dst.to_owned(), after: self.deadline });
        }
        Ok(())
    }

    /// The reader: every data extent of the source in order, in chunks, and the holes
    /// between them. Returns the bytes read.
    fn read(&self, input: &File, len: u64, free: Receiver<Buffer>, tx: SyncSender<Piece>) -> Result<u64, CopyError> {
        let read_err = |source| CopyError::Read { path: self.src.to_owned(), source };
        let (mut at, mut total) = (0u64, 0u64);
        let mut buffered: Option<File> = None;
        while at < len {
            self.go_on()?;
            let (data, end) = extent(input, at, len).map_err(read_err)?;
            if !data {
                tx.send(Piece::Hole { offset: at, len: end - at }).map_err(|_| self.stopped())?;
                at = end;
                continue;
            }
            while at < end {
                self.go_on()?;
                let mut buf = free.recv().map_err(|_| self.stopped())?;
                let n = (end - at).min(CHUNK as u64) as usize;
                let into = buf.get_mut(n.next_multiple_of(ALIGN));
                match read_full(buffered.as_ref().unwrap_or(input), into, at, n) {
                    // O_DIRECT refused this offset or length (a filesystem with another
                    // alignment): the rest is read through the cache.
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) && buffered.is_none() => {
                        let plain = File::open(self.src).map_err(read_err)?;
                        read_full(&plain, into, at, n).map_err(read_err)?;
                        buffered = Some(plain);
                    }
                    r => r.map_err(read_err)?,
                }
                tx.send(Piece::Data { offset: at, len: n, buf }).map_err(|_| self.stopped())?;
                (at, total) = (at + n as u64, total + n as u64);
            }
        }
        Ok(total)
    }

    /// The writer: each chunk at its offset, runs of zero blocks left out.
    fn write(
        &self,
        out: &File,
        rx: Receiver<Piece>,
        tx: SyncSender<Piece>,
        after_write: &(dyn Fn(&File, u64) + Sync),
    ) -> Result<(), CopyError> {
        for piece in rx {
            self.go_on()?;
            if let Piece::Data { offset, len, buf } = &piece {
                let data = buf.get(*len);
                for (from, to) in nonzero_runs(data) {
                    out.write_all_at(&data[from..to], offset + from as u64).map_err(|e| self.write_err(e))?;
                }
                after_write(out, *offset);
            }
            tx.send(piece).map_err(|_| self.stopped())?;
        }
        Ok(())
    }

    /// The prover: each stretch of the copy read back in file order, compared with the
    /// source's, and hashed. Returns the hash and the length proved.
    fn prove(&self, out: &File, rx: Receiver<Piece>, free: SyncSender<Buffer>) -> Result<(String, u64), CopyError> {
        let mut h = Sha256::new();
        let mut back = Buffer::new();
        let mut proved = 0u64;
        for piece in rx {
            self.go_on()?;
            let (offset, len) = match &piece {
                Piece::Data { offset, len, .. } => (*offset, *len as u64),
                Piece::Hole { offset, len } => (*offset, *len),
            };
            if offset != proved {
                return Err(CopyError::Differs { path: self.dst.to_owned(), offset: proved });
            }
            let mut at = offset;
            while at < offset + len {
                let n = (offset + len - at).min(CHUNK as u64) as usize;
                let got = back.get_mut(n);
                read_full(out, got, at, n).map_err(|e| self.write_err(e))?;
                let want: &[u8] = match &piece {
                    Piece::Data { buf, .. } => buf.get(n),
                    Piece::Hole { .. } => &ZEROS[..n.min(ZEROS.len())],
                };
                if let Some(i) = first_difference(got, want) {
                    return Err(CopyError::Differs { path: self.dst.to_owned(), offset: at + i as u64 });
                }
                h.update(&*got);
                at += n as u64;
            }
            proved += len;
            if let Piece::Data { offset, len, buf } = piece {
                // Start writing it back now, and drop it from the cache once written.
                let _ = rustix::fs::fadvise(
                    out.as_fd(),
                    offset,
                    std::num::NonZeroU64::new(len as u64),
                    rustix::fs::Advice::DontNeed,
                );
                let _ = free.send(buf);
            }
        }
        Ok((hex::encode(h.finalize()), proved))
    }

    fn stopped(&self) -> CopyError {
        // A stage's neighbour hung up: it failed or stopped, and says why itself.
        CopyError::Cancelled { path: self.dst.to_owned() }
    }
}

/// A hole's worth of zeros to compare with, per chunk.
static ZEROS: [u8; CHUNK] = [0u8; CHUNK];

/// The source, with O_DIRECT where its filesystem allows it (tmpfs before Linux 6.6 does not).
fn open_source(path: &Path) -> std::io::Result<File> {
    match OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(path) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => File::open(path),
        other => other,
    }
}

/// Whether `at` is in data, and where that data (or hole) ends, at most `len`.
fn extent(f: &File, at: u64, len: u64) -> std::io::Result<(bool, u64)> {
    use rustix::fs::{seek, SeekFrom};
    let next_data = match seek(f.as_fd(), SeekFrom::Data(at)) {
        Ok(d) => d,
        // No data past `at`: the rest is a hole.
        Err(e) if e == rustix::io::Errno::NXIO => return Ok((false, len)),
        Err(e) => return Err(e.into()),
    };
    if next_data > at {
        return Ok((false, next_data.min(len)));
    }
    let hole = seek(f.as_fd(), SeekFrom::Hole(at)).map_err(std::io::Error::from)?;
    // O_DIRECT wants aligned offsets: an extent end inside a block rounds up to the block
    // (the hole after it reads as zeros, so reading it as data changes nothing).
    Ok((true, (hole.next_multiple_of(ALIGN as u64)).min(len)))
}

/// Reads `n` bytes at `offset` into `buf` (which may be longer, for O_DIRECT's alignment):
/// a short read before `n` is an error, as the file's length was read before.
fn read_full(f: &File, buf: &mut [u8], offset: u64, n: usize) -> std::io::Result<()> {
    let mut done = 0;
    while done < n {
        match f.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => return Err(std::io::Error::new(ErrorKind::UnexpectedEof, "the image is shorter than it was")),
            Ok(k) => done += k,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The byte ranges of `data` to write: runs of [`ZERO_BLOCK`]s holding a non-zero byte.
fn nonzero_runs(data: &[u8]) -> Vec<(usize, usize)> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (i, block) in data.chunks(ZERO_BLOCK).enumerate() {
        if is_zero(block) {
            continue;
        }
        let (from, to) = (i * ZERO_BLOCK, i * ZERO_BLOCK + block.len());
        match runs.last_mut() {
            Some(last) if last.1 == from => last.1 = to,
            _ => runs.push((from, to)),
        }
    }
    runs
}

fn is_zero(b: &[u8]) -> bool {
    // 64-byte ORs vectorise; most data blocks end at their first 64 bytes.
    b.chunks(64).all(|c| c.iter().fold(0u8, |a, &x| a | x) == 0)
}

/// The first index where `a` and `b` differ, if they do.
fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    if a == b {
        return None;
    }
    Some(a.iter().zip(b).position(|(x, y)| x != y).unwrap_or(a.len().min(b.len())))
}

#[cfg(test)]
mod tests;
