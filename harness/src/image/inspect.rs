//! Looking into one disk image on the host, as the manifests do (through QEMU's drivers, no
//! root, no guest): the state each filesystem was left in ([`fsread::state`]), and single
//! files of an ext filesystem, read without anything opening them as their program would.
//!
//! The image is made a raw byte source once ([`RawImage::open`]) and can then be asked
//! several things. Like everything under `fsread`, the bytes are untrusted.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ext4_view::Ext4;

use super::fsread::state::{self, Ext4State, NtfsState};
use super::fsread::volumes::{self, Content, VolumeError};
use super::fsread::Window;
use super::manifest::{self, place, ManifestError};
use crate::qemu::DiskFormat;

#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// The image could not be made readable on the host: qemu-img failed on it, or its
    /// qcow2 metadata is damaged.
    #[error(transparent)]
    Image(#[from] ManifestError),
    /// The raw copy of the image could not be read.
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    /// The disk's partition table is damaged or impossible.
    #[error("{0}")]
    Volumes(#[from] VolumeError),
    /// A filesystem is damaged where the error says, or uses what this reader cannot read.
    #[error("{}: {error}", place(*partition))]
    Filesystem { partition: Option<u32>, error: String },
    /// The file is larger than the caller is prepared to read.
    #[error("{path} holds {size} bytes, more than the {max} this check reads")]
    TooLarge { path: String, size: u64, max: u64 },
}

/// What one volume of a disk holds, as far as its quiescence goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeState {
    /// The partition number, or None for a whole-disk filesystem.
    pub partition: Option<u32>,
    pub fs: FsState,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FsState {
    Ext4(Ext4State),
    Ntfs(NtfsState),
    /// Something this reader does not judge ("vfat", "swap", "unknown").
    Unread(String),
}

/// A file read from an ext filesystem of the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRead {
    pub size: u64,
    /// The content; empty when only the size was asked for.
    pub content: Vec<u8>,
}

/// An image as raw bytes: the image itself if it is raw, else a sparse raw copy in a
/// temporary folder, removed on drop.
pub struct RawImage {
    file: Arc<File>,
    len: u64,
    _copy: Option<tempfile::TempDir>,
}

impl RawImage {
    /// Opens `path` (in `format`) for reading, through a raw copy unless it is raw.
    pub fn open(path: &Path, format: DiskFormat) -> Result<Self, InspectError> {
        let (raw, copy) = if format == DiskFormat::Raw {
            (path.to_owned(), None)
        } else {
            if format == DiskFormat::Qcow2 {
                manifest::check_qcow2(path)?;
            }
            let io = |error| InspectError::Io { path: std::env::temp_dir(), error };
            let dir = tempfile::Builder::new().prefix("quiesce-inspect-").tempdir().map_err(io)?;
            let raw = dir.path().join("disk.raw");
            manifest::to_raw(path, format, &raw)?;
            (raw, Some(dir))
        };
        let io = |error| InspectError::Io { path: raw.clone(), error };
        let file = File::open(&raw).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        Ok(RawImage { file: Arc::new(file), len, _copy: copy })
    }

    fn volumes(&self) -> Result<Vec<(volumes::Volume, Content)>, InspectError> {
        let read = |at: u64, buf: &mut [u8]| self.file.read_exact_at(buf, at);
        let mut out = Vec::new();
        for v in volumes::find(&read, self.len)? {
            let content = volumes::probe(&read, &v)?;
            out.push((v, content));
        }
        Ok(out)
    }

    fn window(&self, v: &volumes::Volume) -> Window {
        Window::new(self.file.clone(), v.offset, v.len)
    }

    /// The state of every volume of the disk.
    pub fn states(&self) -> Result<Vec<VolumeState>, InspectError> {
        let mut out = Vec::new();
        for (v, content) in self.volumes()? {
            let damaged = |error| InspectError::Filesystem { partition: v.partition, error };
            let fs = match content {
                Content::Ext => FsState::Ext4(state::ext4(&self.window(&v)).map_err(damaged)?),
                Content::Ntfs => {
                    let w = self.window(&v);
                    FsState::Ntfs(guarded(v.partition, || state::ntfs(w))?)
                }
                Content::Unread(what) => FsState::Unread(what.to_owned()),
                Content::Unknown => FsState::Unread("unknown".into()),
            };
            out.push(VolumeState { partition: v.partition, fs });
        }
        Ok(out)
    }

    /// The file at `path` (absolute, in the first ext filesystem of the disk), or None if
    /// there is no such file. With `max` 0 only its size is read; otherwise a file larger
    /// than `max` is an error. The filesystem's journal is replayed in memory first, as a
    /// mount would (the image is not written).
    pub fn ext4_file(&self, path: &str, max: u64) -> Result<Option<FileRead>, InspectError> {
        let Some((v, _)) = self.volumes()?.into_iter().find(|(_, c)| *c == Content::Ext) else {
            return Ok(None);
        };
        let w = self.window(&v);
        guarded(v.partition, || {
            let fs = Ext4::load(Box::new(w)).map_err(|e| e.to_string())?;
            let md = match fs.metadata(path) {
                Ok(md) => md,
                Err(ext4_view::Ext4Error::NotFound) => return Ok(None),
                Err(e) => return Err(format!("{path}: {e}")),
            };
            if !md.file_type().is_regular_file() {
                return Err(format!("{path} is not a regular file"));
            }
            let size = md.len();
            if max == 0 {
                return Ok(Some(Ok(FileRead { size, content: vec![] })));
            }
            if size > max {
                return Ok(Some(Err(InspectError::TooLarge { path: path.to_owned(), size, max })));
            }
            let content = fs.read(path).map_err(|e| format!("{path}: {e}"))?;
            Ok(Some(Ok(FileRead { size, content })))
        })?
        .transpose()
    }
}

/// Runs a reader over untrusted bytes, turning its error or its panic (a parser bug met by
/// damaged bytes) into an error of this volume.
fn guarded<T>(partition: Option<u32>, f: impl FnOnce() -> Result<T, String>) -> Result<T, InspectError> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r.map_err(|error| InspectError::Filesystem { partition, error }),
        Err(_) => Err(InspectError::Filesystem { partition, error: "the reader failed on damaged data".into() }),
    }
}
