//! One file's content read from an NTFS volume on the host: how the Windows journal's
//! "nothing lost" check reads the data disk, so that the guest's cache cannot answer for
//! the disk (the guest flushes the volume first; the VM is paused while the host reads).
//! The path is looked up component by component in the directory indexes, names compared
//! as Windows compares them for ASCII (case-insensitively); DOS 8.3 names are not matched.

use std::path::Path;
use std::sync::Arc;

use ntfs::structured_values::NtfsFileNamespace;
use ntfs::{Ntfs, NtfsAttributeFlags, NtfsReadSeek};

use super::{escape_utf16, volumes, Window};
use crate::image::manifest::{self, FsKind, ManifestError};
use crate::qemu::DiskFormat;

const BUF: usize = 64 << 10;

/// The content of `path` (`/journal`, `/dir/file`) in the NTFS volume `window`, at most
/// `max` bytes (a larger file is an error: the guest is untrusted).
pub fn read_file(window: Window, partition: Option<u32>, path: &str, max: u64) -> Result<Vec<u8>, ManifestError> {
    let err = |error: String| ManifestError::Filesystem { partition, kind: FsKind::Ntfs, path: path.to_owned(), error };
    let damaged = |e: ntfs::NtfsError| err(format!("the filesystem is damaged or not supported ({e})"));
    let mut r = window;
    let ntfs = Ntfs::new(&mut r).map_err(damaged)?;
    let mut file = ntfs.root_directory(&mut r).map_err(damaged)?;
    for name in path.split('/').filter(|c| !c.is_empty()) {
        if !file.is_directory() {
            return Err(err(format!("{name:?} is looked up in something that is not a directory")));
        }
        let index = file.directory_index(&mut r).map_err(damaged)?;
        let mut entries = index.entries();
        let mut found = None;
        while let Some(ie) = entries.next(&mut r) {
            let ie = ie.map_err(damaged)?;
            let Some(key) = ie.key() else { continue };
            let key = key.map_err(damaged)?;
            if key.namespace() != NtfsFileNamespace::Dos
                && escape_utf16(key.name().u16_iter()).eq_ignore_ascii_case(name)
            {
                found = Some(ie.to_file(&ntfs, &mut r).map_err(damaged)?);
                break;
            }
        }
        file = found.ok_or_else(|| err(format!("no {name:?} there")))?;
    }
    if file.is_directory() {
        return Err(err("a directory, not a file".into()));
    }
    let item = file.data(&mut r, "").ok_or_else(|| err("no unnamed data stream".into()))?.map_err(damaged)?;
    let attr = item.to_attribute().map_err(damaged)?;
    let size = attr.value_length();
    if attr.flags().intersects(NtfsAttributeFlags::COMPRESSED | NtfsAttributeFlags::ENCRYPTED) {
        return Err(err("compressed or encrypted: its content cannot be read on the host".into()));
    }
    if size > max {
        return Err(err(format!("{size} bytes, more than the {max} this reads")));
    }
    let mut value = attr.value(&mut r).map_err(damaged)?;
    let mut out = Vec::with_capacity(size as usize);
    let mut buf = vec![0u8; BUF];
    loop {
        let n = value.read(&mut r, &mut buf).map_err(damaged)?;
        if n == 0 {
            break;
        }
        if out.len() as u64 + n as u64 > size {
            return Err(err(format!("the data stream runs past its size of {size} bytes")));
        }
        out.extend_from_slice(&buf[..n]);
    }
    Ok(out)
}

/// The content of `path` in the first NTFS volume of the disk image `image` (read through
/// QEMU's drivers with `-U`, so a disk a running QEMU holds can be read: pause it first,
/// and what is read is what the image file holds).
pub fn read_from_image(image: &Path, format: DiskFormat, path: &str, max: u64) -> Result<Vec<u8>, ManifestError> {
    let io = |error| ManifestError::Io { path: std::env::temp_dir(), error };
    let dir = tempfile::Builder::new().prefix("quiesce-hostread-").tempdir().map_err(io)?;
    let raw = dir.path().join("disk.raw");
    manifest::to_raw(image, format, &raw)?;
    let io = |error| ManifestError::Io { path: raw.clone(), error };
    let file = Arc::new(std::fs::File::open(&raw).map_err(io)?);
    let disk_len = file.metadata().map_err(io)?.len();
    let read = |at: u64, buf: &mut [u8]| std::os::unix::fs::FileExt::read_exact_at(&*file, buf, at);
    for v in volumes::find(&read, disk_len)? {
        if matches!(volumes::probe(&read, &v)?, volumes::Content::Ntfs) {
            let window = Window::new(file.clone(), v.offset, v.len);
            return read_file(window, v.partition, path, max);
        }
    }
    Err(ManifestError::Filesystem {
        partition: None,
        kind: FsKind::Ntfs,
        path: path.to_owned(),
        error: format!("{} holds no NTFS volume", image.display()),
    })
}
