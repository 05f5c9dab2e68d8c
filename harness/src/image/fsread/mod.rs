//! Reading the files of a disk image on the host, with no root, no kernel and no guest: the
//! image is a raw byte source (see [`crate::image::manifest`] for how any format becomes
//! one), [`volumes`] finds its filesystems, and [`ext4`] and [`ntfs`] walk them in pure Rust.
//!
//! Everything here reads untrusted bytes: a disk the guest wrote. Reads are bounded to the
//! volume they belong to, walks are bounded by [`Limits`], and a damaged filesystem is an
//! error naming the path where it was found, never a panic.

pub mod ext4;
pub mod ntfs;
pub mod ntfs_file;
pub mod state;
pub mod volumes;

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use super::manifest::{Entry, FsKind, Limits, ManifestError};

/// A read-only view of `len` bytes of a file starting at `base`: one volume of a raw disk.
/// Reads past its end fail (for ext4) or end (for NTFS), so a filesystem never reads another
/// partition's bytes.
pub struct Window {
    file: Arc<File>,
    base: u64,
    len: u64,
    /// Position for the `Read`/`Seek` interface.
    pos: u64,
    /// A small read-ahead: NTFS reads many short records, one system call each otherwise.
    cache: Vec<u8>,
    cache_at: u64,
}

const CHUNK: usize = 128 << 10;

impl Window {
    pub fn new(file: Arc<File>, base: u64, len: u64) -> Self {
        Self { file, base, len, pos: 0, cache: Vec::new(), cache_at: 0 }
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Reads exactly `dst.len()` bytes at `at` (relative to the volume).
    pub fn read_at(&self, at: u64, dst: &mut [u8]) -> io::Result<()> {
        let end = at.checked_add(dst.len() as u64);
        if end.is_none_or(|e| e > self.len) {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("read of {} bytes at {at} goes past the end of the volume ({} bytes)", dst.len(), self.len),
            ));
        }
        let abs = self.base.checked_add(at).ok_or_else(|| io::Error::other("offset overflows"))?;
        self.file.read_exact_at(dst, abs)
    }
}

impl ext4_view::Ext4Read for Window {
    fn read(&mut self, start_byte: u64, dst: &mut [u8]) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        self.read_at(start_byte, dst).map_err(|e| Box::new(e) as _)
    }
}

impl Read for Window {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() || self.pos >= self.len {
            return Ok(0);
        }
        let want = usize::try_from(self.len - self.pos).map_or(buf.len(), |left| left.min(buf.len()));
        if want >= CHUNK {
            self.read_at(self.pos, &mut buf[..want])?;
            self.pos += want as u64;
            return Ok(want);
        }
        let cached = self.pos >= self.cache_at && self.pos < self.cache_at + self.cache.len() as u64;
        if !cached {
            self.cache_at = self.pos - self.pos % CHUNK as u64;
            let n = usize::try_from(self.len - self.cache_at).map_or(CHUNK, |left| left.min(CHUNK));
            let mut cache = std::mem::take(&mut self.cache);
            cache.resize(n, 0);
            self.read_at(self.cache_at, &mut cache)?;
            self.cache = cache;
        }
        let off = (self.pos - self.cache_at) as usize;
        let n = want.min(self.cache.len() - off);
        buf[..n].copy_from_slice(&self.cache[off..off + n]);
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for Window {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let new = match to {
            SeekFrom::Start(n) => Some(n),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos =
            new.ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "seek before the start of the volume"))?;
        Ok(self.pos)
    }
}

/// Collects the entries of a walk and keeps it within its [`Limits`] (shared by every
/// filesystem of one disk).
pub struct Walk<'l> {
    limits: &'l Limits,
    /// Entries of every filesystem read so far (the current one's are taken with [`Walk::take`]).
    entries: Vec<Entry>,
    total_entries: usize,
    hashed: u64,
    pub(crate) partition: Option<u32>,
    pub(crate) kind: FsKind,
}

impl<'l> Walk<'l> {
    pub fn new(limits: &'l Limits) -> Self {
        Self { limits, entries: Vec::new(), total_entries: 0, hashed: 0, partition: None, kind: FsKind::Ext4 }
    }

    pub(crate) fn start(&mut self, partition: Option<u32>, kind: FsKind) {
        self.partition = partition;
        self.kind = kind;
        self.entries.clear();
    }

    pub(crate) fn push(&mut self, entry: Entry) -> Result<(), ManifestError> {
        if self.total_entries >= self.limits.max_entries {
            return Err(ManifestError::TooManyEntries {
                partition: self.partition,
                limit: self.limits.max_entries,
                at: entry.path,
            });
        }
        self.total_entries += 1;
        self.entries.push(entry);
        Ok(())
    }

    /// Counts `n` more bytes to hash for `path`, or fails if that passes the limit.
    pub(crate) fn charge(&mut self, path: &str, n: u64) -> Result<(), ManifestError> {
        self.hashed = self.hashed.saturating_add(n);
        if self.hashed > self.limits.max_hash_bytes {
            return Err(ManifestError::TooManyBytes {
                partition: self.partition,
                limit: self.limits.max_hash_bytes,
                at: path.to_owned(),
            });
        }
        Ok(())
    }

    /// Adds a note to an entry already listed (a directory found unreadable when walked).
    pub(crate) fn annotate(&mut self, path: &str, note: &str) {
        if let Some(e) = self.entries.iter_mut().rev().find(|e| e.path == path) {
            e.note = Some(note.to_owned());
        }
    }

    /// The current filesystem's entries, sorted by path.
    pub(crate) fn take(&mut self) -> Vec<Entry> {
        let mut e = std::mem::take(&mut self.entries);
        e.sort_by(|a, b| a.path.cmp(&b.path));
        e
    }

    /// A filesystem error at `path`.
    pub(crate) fn fs_error(&self, path: &str, error: impl std::fmt::Display) -> ManifestError {
        ManifestError::Filesystem {
            partition: self.partition,
            kind: self.kind,
            path: if path.is_empty() { "/".to_owned() } else { path.to_owned() },
            error: error.to_string(),
        }
    }
}

/// One name as it is shown in a manifest: UTF-8 as is; `\` doubled; bytes that are not UTF-8,
/// control characters and `/` as `\xNN`, so every name has one unambiguous, printable form.
pub fn escape_name(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            push_char(&mut out, c, true);
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

/// A UTF-16 name (NTFS) in the same form; unpaired surrogates as `\u{XXXX}`.
pub fn escape_utf16(units: impl Iterator<Item = u16>) -> String {
    utf16(units, true)
}

/// A UTF-16 path (an NTFS link target): as a name, but `\` and `/` are kept as they are.
pub fn escape_utf16_path(units: impl Iterator<Item = u16>) -> String {
    utf16(units, false)
}

fn utf16(units: impl Iterator<Item = u16>, name: bool) -> String {
    let mut out = String::new();
    for c in char::decode_utf16(units) {
        match c {
            Ok(c) => push_char(&mut out, c, name),
            Err(e) => out.push_str(&format!("\\u{{{:04x}}}", e.unpaired_surrogate())),
        }
    }
    out
}

fn push_char(out: &mut String, c: char, name: bool) {
    match c {
        '\\' if name => out.push_str("\\\\"),
        '/' if name => out.push_str("\\x2f"),
        c if c.is_control() => {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                out.push_str(&format!("\\x{b:02x}"));
            }
        }
        c => out.push(c),
    }
}

/// Runs a filesystem reader, turning a panic inside it (a parser bug met by damaged bytes)
/// into an error: one bad disk must not take the whole run down.
pub(crate) fn guarded<T>(
    partition: Option<u32>,
    kind: FsKind,
    f: impl FnOnce() -> Result<T, ManifestError>,
) -> Result<T, ManifestError> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Err(ManifestError::ReaderPanicked { partition, kind, what })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_escape_unambiguously() {
        assert_eq!(escape_name(b"plain.txt"), "plain.txt");
        assert_eq!(escape_name("naïve".as_bytes()), "naïve");
        assert_eq!(escape_name(b"a\xffb"), "a\\xffb");
        assert_eq!(escape_name(b"new\nline"), "new\\x0aline");
        assert_eq!(escape_name(b"back\\slash"), "back\\\\slash");
        assert_ne!(escape_name(b"\\xff"), escape_name(b"\xff"));
        let units: Vec<u16> = "héllo".encode_utf16().chain([0xd800]).collect();
        assert_eq!(escape_utf16(units.into_iter()), "héllo\\u{d800}");
    }

    #[test]
    fn window_stays_inside_its_volume() {
        let mut f = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut f, &(0..=255u8).cycle().take(300_000).collect::<Vec<_>>()).unwrap();
        let mut w = Window::new(Arc::new(f), 1000, 200_000);
        let mut b = [0u8; 4];
        w.read_at(0, &mut b).unwrap();
        assert_eq!(b, [(1000 % 256) as u8, (1001 % 256) as u8, (1002 % 256) as u8, (1003 % 256) as u8]);
        assert!(w.read_at(199_998, &mut b).is_err());
        assert!(w.read_at(u64::MAX - 1, &mut b).is_err());
        w.seek(SeekFrom::End(-2)).unwrap();
        let mut all = Vec::new();
        w.read_to_end(&mut all).unwrap();
        assert_eq!(all.len(), 2);
        assert!(w.seek(SeekFrom::Current(-10_000_000)).is_err());
        w.seek(SeekFrom::Start(5)).unwrap();
        let mut big = vec![0u8; 150_000];
        w.read_exact(&mut big).unwrap();
        assert_eq!(big[0], (1005 % 256) as u8);
        assert_eq!(big[149_999], ((1005 + 149_999) % 256) as u8);
    }

    #[test]
    fn panics_become_errors() {
        let r: Result<(), _> = guarded(Some(2), FsKind::Ntfs, || panic!("index out of bounds"));
        let e = r.unwrap_err();
        assert!(matches!(e, ManifestError::ReaderPanicked { .. }));
        assert!(e.to_string().contains("partition 2"), "{e}");
    }
}
