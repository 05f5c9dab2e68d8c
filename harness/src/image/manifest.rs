//! File-level manifests of disk images, read on the host with no root, no kernel nbd and no
//! guest, and their comparison: the proof that a restored disk holds the files it should.
//!
//! The image is first made a raw byte source through QEMU's own drivers (`qemu-img convert
//! -U -O raw` to a sparse temporary file, so any format and backing chain QEMU reads works,
//! and a disk in use can be read); a raw image is read as it is. Its filesystems are found
//! ([`fsread::volumes`]) and walked in pure Rust ([`fsread::ext4`], [`fsread::ntfs`]).
//!
//! The disk is untrusted: a damaged filesystem is an error that names where it was found,
//! and a walk is bounded by [`Limits`].

mod diff;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub use self::diff::{diff, ignored, Change, Field, Ignore, PatternError, Summary};
use super::fsread::{self, volumes, Walk, Window};
use super::qemu_img::{self, qemu_img, QemuImgError};
use crate::qemu::DiskFormat;
use crate::sys::deadline;

/// The files of every filesystem quiesce reads on one disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub filesystems: Vec<FsManifest>,
    /// Volumes that hold no filesystem this reader walks (FAT, swap, blank...): listed so
    /// that a comparison can say what it did not compare.
    #[serde(default)]
    pub unread: Vec<UnreadVolume>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsManifest {
    /// The partition number (MBR: 1-4 primary, 5+ logical; GPT: slot), None for a whole disk.
    pub partition: Option<u32>,
    pub kind: FsKind,
    pub label: String,
    /// ext4: the UUID; NTFS: the 64-bit volume serial number in hex (as blkid shows it).
    pub uuid: String,
    /// Every path, sorted; the root is `/`.
    pub entries: Vec<Entry>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsKind {
    /// ext2, ext3 or ext4.
    Ext4,
    Ntfs,
}

impl std::fmt::Display for FsKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FsKind::Ext4 => "ext4",
            FsKind::Ntfs => "ntfs",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnreadVolume {
    pub partition: Option<u32>,
    pub size: u64,
    /// What it holds ("vfat", "swap"), or "unknown".
    pub content: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
    /// Fifo, socket, device, or an NTFS reparse point that is not a link (see `note`).
    Other,
}

/// One path of a filesystem.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Absolute, `/`-separated; names that are not plain UTF-8 are escaped
    /// ([`fsread::escape_name`]).
    pub path: String,
    #[serde(rename = "type")]
    pub kind: EntryKind,
    /// Files: the content length; symlinks: the target's length; directories and others: 0
    /// (a directory's on-disk size depends on its history, not its content).
    pub size: u64,
    /// ext4: the permission bits (`0o7777`); NTFS: the read-only, hidden and system attributes.
    pub mode: u32,
    /// BLAKE3 of the content, for files whose content was read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blake3: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Others: what they are ("fifo", "char-device"...); files not hashed: why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl Entry {
    pub fn dir(path: &str, mode: u32) -> Self {
        Self::new(path, EntryKind::Dir, 0, mode)
    }

    pub fn file(path: &str, size: u64, mode: u32, blake3: String) -> Self {
        Entry { blake3: Some(blake3), ..Self::new(path, EntryKind::File, size, mode) }
    }

    /// A file whose content was not read, and why.
    pub fn unread(path: &str, size: u64, mode: u32, why: &str) -> Self {
        Entry { note: Some(why.to_owned()), ..Self::new(path, EntryKind::File, size, mode) }
    }

    pub fn symlink(path: &str, size: u64, mode: u32, target: String) -> Self {
        Entry { target: Some(target), ..Self::new(path, EntryKind::Symlink, size, mode) }
    }

    pub fn other(path: &str, mode: u32, what: &str) -> Self {
        Entry { note: Some(what.to_owned()), ..Self::new(path, EntryKind::Other, 0, mode) }
    }

    fn new(path: &str, kind: EntryKind, size: u64, mode: u32) -> Self {
        let path = if path.is_empty() { "/".to_owned() } else { path.to_owned() };
        Entry { path, kind, size, mode, blake3: None, target: None, note: None }
    }
}

impl Manifest {
    /// Bytes of file content hashed to make this manifest.
    pub fn bytes_hashed(&self) -> u64 {
        self.filesystems.iter().flat_map(|f| &f.entries).filter(|e| e.blake3.is_some()).map(|e| e.size).sum()
    }

    pub fn entry_count(&self) -> usize {
        self.filesystems.iter().map(|f| f.entries.len()).sum()
    }
}

/// Bounds on reading one disk, which is untrusted input.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Paths listed, over all filesystems of the disk.
    pub max_entries: usize,
    /// File content read and hashed, over all filesystems of the disk (sparse files count
    /// their full size).
    pub max_hash_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_entries: 5_000_000, max_hash_bytes: 4 << 40 }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// qemu-img could not read the image (it is damaged, in use without sharing, or not an
    /// image of the format given), or did not finish in time.
    #[error("{path}: {error}")]
    Image { path: PathBuf, error: QemuImgError },
    /// The image, or a temporary copy of it, could not be read or written on the host.
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    /// The image is in a format quiesce does not read.
    #[error("{path} is a {format} image; quiesce reads qcow2, raw, vpc (VHD) and vhdx")]
    UnsupportedFormat { path: PathBuf, format: String },
    /// The qcow2 image's own metadata is damaged or cut short: the copy is broken.
    #[error("{path} is damaged (qemu-img check): {report}")]
    DamagedImage { path: PathBuf, report: String },
    /// The disk's partition table is damaged or impossible.
    #[error("{0}")]
    Volumes(#[from] volumes::VolumeError),
    /// A filesystem on the disk is damaged where the error says.
    #[error("{} ({kind}): {path}: {error}", place(*partition))]
    Filesystem { partition: Option<u32>, kind: FsKind, path: String, error: String },
    /// The disk holds more paths than the limit allows; raise the limit to read it.
    #[error(
        "{}: more than {limit} paths (stopped at {at}); a disk this large needs a higher Limits::max_entries",
        place(*partition)
    )]
    TooManyEntries { partition: Option<u32>, limit: usize, at: String },
    /// The disk holds more file content than the limit allows; raise the limit to read it.
    #[error(
        "{}: more than {limit} bytes of file content to hash (stopped at {at}); \
         a disk this large needs a higher Limits::max_hash_bytes",
        place(*partition)
    )]
    TooManyBytes { partition: Option<u32>, limit: u64, at: String },
    /// The filesystem reader gave up on data too damaged to make sense of.
    #[error("{} ({kind}): the reader failed on damaged data ({what}): the filesystem is damaged", place(*partition))]
    ReaderPanicked { partition: Option<u32>, kind: FsKind, what: String },
}

/// "partition 2", or "whole disk".
pub fn place(partition: Option<u32>) -> String {
    match partition {
        Some(n) => format!("partition {n}"),
        None => "whole disk".to_owned(),
    }
}

/// The format of an image, from `qemu-img info -U`. Probing is acceptable here and only
/// here: this is a read-only tool run on an image a person points it at; what runs a VM
/// always names the format. A raw image whose guest wrote an image header at its start
/// would be misread (and could name a backing file), so callers that know the format should
/// pass it instead.
pub fn probe_format(path: &Path) -> Result<DiskFormat, ManifestError> {
    let info = qemu_img::info(path).map_err(|error| ManifestError::Image { path: path.to_owned(), error })?;
    let format = info["format"].as_str().unwrap_or("unknown");
    match format {
        "qcow2" => Ok(DiskFormat::Qcow2),
        "raw" => Ok(DiskFormat::Raw),
        "vpc" => Ok(DiskFormat::Vpc),
        "vhdx" => Ok(DiskFormat::Vhdx),
        other => Err(ManifestError::UnsupportedFormat { path: path.to_owned(), format: other.to_owned() }),
    }
}

/// The guest-visible content of `src` (through its backing chain) as a sparse raw file
/// `dst`. `-U`: a disk a running QEMU holds can be read (what is read is then whatever the
/// file holds at that moment).
pub fn to_raw(src: &Path, format: DiskFormat, dst: &Path) -> Result<(), ManifestError> {
    let f = format.driver().as_ref();
    qemu_img(
        deadline::QEMU_IMG_COPY,
        &["convert".as_ref(), "-U".as_ref(), "-q".as_ref(), "-f".as_ref(), f, "-O".as_ref(), "raw".as_ref()],
    )
    .arg(src)
    .arg(dst)
    .run()
    .map_err(|e| ManifestError::Image { path: src.to_owned(), error: e.into() })?;
    Ok(())
}

/// Checks a qcow2 image's own metadata. A qcow2 file cut short still converts (QEMU reads
/// zeros past its end), so without this a truncated copy would look like a blank or damaged
/// disk. First the header's tables must lie inside the file (`qemu-img check` passes a file
/// cut just before its L1 table), then `qemu-img check`: leaked clusters (exit 3) are harmless
/// and pass; corruption (2) or a check that could not finish (1) is an error. Only the top
/// image of a chain is checked.
pub fn check_qcow2(path: &Path) -> Result<(), ManifestError> {
    let damaged = |report: String| ManifestError::DamagedImage { path: path.to_owned(), report };
    let file = File::open(path).map_err(|error| ManifestError::Io { path: path.to_owned(), error })?;
    let len = file.metadata().map_err(|error| ManifestError::Io { path: path.to_owned(), error })?.len();
    let mut hdr = [0u8; 64];
    file.read_exact_at(&mut hdr, 0).map_err(|_| damaged("shorter than a qcow2 header".into()))?;
    let be32 = |at: usize| u64::from(u32::from_be_bytes(hdr[at..at + 4].try_into().expect("4 bytes")));
    let be64 = |at: usize| u64::from_be_bytes(hdr[at..at + 8].try_into().expect("8 bytes"));
    if &hdr[0..4] != b"QFI\xfb" {
        return Err(damaged("no qcow2 magic".into()));
    }
    let cluster = 1u64.checked_shl(be32(20) as u32).unwrap_or(0);
    let tables = [("L1 table", be64(40), be32(36) * 8), ("refcount table", be64(48), be32(56) * cluster)];
    for (what, offset, size) in tables {
        if offset.checked_add(size).is_none_or(|end| end > len) {
            return Err(damaged(format!(
                "its {what} ({size} bytes at {offset}) lies past the end of the file ({len} bytes): \
                 the file is truncated"
            )));
        }
    }
    let check = ["check".as_ref(), "-U".as_ref(), "-f".as_ref(), "qcow2".as_ref(), path.as_os_str()];
    let out = qemu_img(deadline::QEMU_IMG_METADATA, &check)
        .output()
        .map_err(|e| ManifestError::Image { path: path.to_owned(), error: e.into() })?;
    match out.code() {
        Some(0) | Some(3) => Ok(()),
        _ => {
            let text = format!("{}{}", out.stderr, out.stdout_text());
            let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
            let report = lines[..lines.len().min(4)].join("; ");
            Err(ManifestError::DamagedImage { path: path.to_owned(), report })
        }
    }
}

/// The manifest of a disk image in any format quiesce handles.
pub fn read_image(path: &Path, format: DiskFormat, limits: &Limits) -> Result<Manifest, ManifestError> {
    if format == DiskFormat::Raw {
        return read_raw(path, limits);
    }
    if format == DiskFormat::Qcow2 {
        check_qcow2(path)?;
    }
    let io = |error| ManifestError::Io { path: std::env::temp_dir(), error };
    let dir = tempfile::Builder::new().prefix("quiesce-manifest-").tempdir().map_err(io)?;
    let raw = dir.path().join("disk.raw");
    to_raw(path, format, &raw)?;
    read_raw(&raw, limits)
}

/// The manifest of a raw disk image.
pub fn read_raw(path: &Path, limits: &Limits) -> Result<Manifest, ManifestError> {
    let io = |error| ManifestError::Io { path: path.to_owned(), error };
    let file = Arc::new(File::open(path).map_err(io)?);
    let disk_len = file.metadata().map_err(io)?.len();
    let read = |at: u64, buf: &mut [u8]| file.read_exact_at(buf, at);
    let mut manifest = Manifest { filesystems: Vec::new(), unread: Vec::new() };
    let mut walk = Walk::new(limits);
    for v in volumes::find(&read, disk_len)? {
        let window = Window::new(file.clone(), v.offset, v.len);
        let fs = match volumes::probe(&read, &v)? {
            volumes::Content::Ext => {
                fsread::guarded(v.partition, FsKind::Ext4, || fsread::ext4::read(window, v.partition, &mut walk))?
            }
            volumes::Content::Ntfs => {
                fsread::guarded(v.partition, FsKind::Ntfs, || fsread::ntfs::read(window, v.partition, &mut walk))?
            }
            volumes::Content::Unread(what) => {
                manifest.unread.push(UnreadVolume { partition: v.partition, size: v.len, content: what.into() });
                continue;
            }
            volumes::Content::Unknown => {
                manifest.unread.push(UnreadVolume { partition: v.partition, size: v.len, content: "unknown".into() });
                continue;
            }
        };
        manifest.filesystems.push(fs);
    }
    Ok(manifest)
}
