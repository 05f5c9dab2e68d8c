//! NTFS through the `ntfs` crate (pure Rust, read-only). The walk starts at the root
//! directory's index and lists what a Windows user sees:
//!
//! - the system files (MFT records below 24: `$MFT`, `$Extend`, ...) are left out;
//! - a file with a long and a DOS 8.3 name is listed once, under its long name;
//! - `mode` holds the read-only, hidden and system attributes (0x1, 0x2, 0x4): NTFS has no
//!   permission bits, and the archive bit changes on every write, so it is left out;
//! - a reparse point that is a symbolic link, junction or WSL link is a `symlink` with its
//!   target; other reparse points are `other` (not followed); so is an Interix link or
//!   device (a small system file, which is how ntfs-3g writes them by default);
//! - the unnamed data stream is hashed; a compressed or encrypted one is listed with its size
//!   and a note, not hashed (this reader would hash the stored bytes, not the content).
//!   Named (alternate) data streams are not read.

use std::collections::HashSet;
use std::io::{Read, Seek};

use ntfs::structured_values::NtfsFileNamespace;
use ntfs::{Ntfs, NtfsAttributeFlags, NtfsAttributeType, NtfsFile, NtfsReadSeek};

use super::{escape_utf16, escape_utf16_path, Walk, Window};
use crate::image::manifest::{Entry, FsKind, FsManifest, ManifestError};

/// MFT records 0-15 are the system files and 16-23 are reserved; user files come after.
const FIRST_USER_RECORD: u64 = 24;
const ROOT_RECORD: u64 = 5;
const ATTRIBUTE_MASK: u32 = 0x7;
const REPARSE_POINT: u32 = 0x400;
const MAX_REPARSE: u64 = 16 << 10;
const BUF: usize = 256 << 10;

/// Reads the filesystem in `window` into a manifest.
pub fn read(window: Window, partition: Option<u32>, walk: &mut Walk) -> Result<FsManifest, ManifestError> {
    walk.start(partition, FsKind::Ntfs);
    let mut r = window;
    let ntfs = Ntfs::new(&mut r).map_err(|e| walk.fs_error("/", damaged(e)))?;
    if ntfs.size() > r.len() {
        return Err(walk.fs_error(
            "/",
            format!(
                "the filesystem ({} bytes) is larger than its volume ({} bytes): \
                 the image is truncated, or its boot sector is damaged",
                ntfs.size(),
                r.len()
            ),
        ));
    }
    let label = match ntfs.volume_name(&mut r) {
        None => String::new(),
        Some(Ok(n)) => escape_utf16(n.name().u16_iter()),
        Some(Err(e)) => return Err(walk.fs_error("/", damaged(e))),
    };
    // What blkid shows as an NTFS volume's UUID: its 64-bit serial number in hex.
    let uuid = format!("{:016X}", ntfs.serial_number());
    let root = ntfs.root_directory(&mut r).map_err(|e| walk.fs_error("/", damaged(e)))?;
    walk.push(Entry::dir("/", attributes(&root).map_err(|e| walk.fs_error("/", e))?))?;
    let mut buf = vec![0u8; BUF];
    let mut visited = HashSet::from([ROOT_RECORD]);
    let mut stack = vec![(ROOT_RECORD, String::new())];
    while let Some((record, shown)) = stack.pop() {
        let shown_dir = if shown.is_empty() { "/" } else { &shown };
        let dir = ntfs.file(&mut r, record).map_err(|e| walk.fs_error(shown_dir, damaged(e)))?;
        let index = dir.directory_index(&mut r).map_err(|e| walk.fs_error(shown_dir, damaged(e)))?;
        let mut entries = index.entries();
        while let Some(ie) = entries.next(&mut r) {
            let ie = ie.map_err(|e| walk.fs_error(shown_dir, damaged(e)))?;
            let Some(key) = ie.key() else { continue };
            let key = key.map_err(|e| walk.fs_error(shown_dir, damaged(e)))?;
            let child = ie.file_reference().file_record_number();
            if key.namespace() == NtfsFileNamespace::Dos || child < FIRST_USER_RECORD {
                continue;
            }
            let path = format!("{shown}/{}", escape_utf16(key.name().u16_iter()));
            let file = ie.to_file(&ntfs, &mut r).map_err(|e| walk.fs_error(&path, damaged(e)))?;
            let info = file.info().map_err(|e| walk.fs_error(&path, damaged(e)))?;
            let flags = info.file_attributes().bits();
            let mode = flags & ATTRIBUTE_MASK;
            let entry = if flags & REPARSE_POINT != 0 {
                match reparse_target(&file, &mut r).map_err(|e| walk.fs_error(&path, e))? {
                    Reparse::Link(target) => Entry::symlink(&path, target.len() as u64, mode, target),
                    Reparse::Other(tag) => Entry::other(&path, mode, &format!("reparse point {tag:#010x}")),
                }
            } else if file.is_directory() {
                if visited.insert(child) {
                    stack.push((child, path.clone()));
                } else {
                    return Err(walk.fs_error(&path, "the directory tree loops (a directory is listed twice)"));
                }
                Entry::dir(&path, mode)
            } else {
                data_entry(&file, &mut r, &path, mode, walk, &mut buf)?
            };
            walk.push(entry)?;
        }
    }
    Ok(FsManifest { partition, kind: FsKind::Ntfs, label, uuid, entries: walk.take() })
}

fn attributes(file: &NtfsFile) -> Result<u32, String> {
    Ok(file.info().map_err(damaged)?.file_attributes().bits() & ATTRIBUTE_MASK)
}

/// A regular file: the unnamed data stream's size and hash.
fn data_entry<T: Read + Seek>(
    file: &NtfsFile,
    r: &mut T,
    path: &str,
    mode: u32,
    walk: &mut Walk,
    buf: &mut [u8],
) -> Result<Entry, ManifestError> {
    let Some(item) = file.data(r, "") else {
        return Ok(Entry::unread(path, 0, mode, "no unnamed data stream"));
    };
    let item = item.map_err(|e| walk.fs_error(path, damaged(e)))?;
    let attr = item.to_attribute().map_err(|e| walk.fs_error(path, damaged(e)))?;
    let size = attr.value_length();
    let aflags = attr.flags();
    if aflags.contains(NtfsAttributeFlags::COMPRESSED) {
        return Ok(Entry::unread(path, size, mode, "compressed: content not read"));
    }
    if aflags.contains(NtfsAttributeFlags::ENCRYPTED) {
        return Ok(Entry::unread(path, size, mode, "encrypted: content not read"));
    }
    walk.charge(path, size)?;
    let mut value = attr.value(r).map_err(|e| walk.fs_error(path, damaged(e)))?;
    if value.len() != size {
        return Err(walk.fs_error(path, format!("data stream is {} bytes, its attribute says {size}", value.len())));
    }
    // A small system file may be an Interix link or device (how ntfs-3g stores them by
    // default): keep its bytes to look.
    let mut small = (mode & SYSTEM != 0 && size <= INTERIX_MAX).then(Vec::new);
    let mut h = blake3::Hasher::new();
    let mut total = 0u64;
    loop {
        let n = value.read(r, buf).map_err(|e| walk.fs_error(path, damaged(e)))?;
        if n == 0 {
            break;
        }
        total += n as u64;
        if total > size {
            return Err(walk.fs_error(path, format!("data stream runs past its size of {size} bytes")));
        }
        h.update(&buf[..n]);
        if let Some(s) = small.as_mut() {
            s.extend_from_slice(&buf[..n]);
        }
    }
    if total != size {
        return Err(walk.fs_error(path, format!("read {total} bytes of a data stream of {size}")));
    }
    if let Some(entry) = small.and_then(|s| interix(path, mode, &s)) {
        return Ok(entry);
    }
    Ok(Entry::file(path, size, mode, h.finalize().to_hex().to_string()))
}

const SYSTEM: u32 = 0x4;
const INTERIX_MAX: u64 = 8 + 2 * 4096;

/// An Interix symlink (`IntxLNK\x01` and a UTF-16 target) or device node, or None.
fn interix(path: &str, mode: u32, data: &[u8]) -> Option<Entry> {
    if let Some(target) = data.strip_prefix(b"IntxLNK\x01") {
        let target = escape_utf16_path(target.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])));
        return Some(Entry::symlink(path, target.len() as u64, mode, target));
    }
    match data.get(..8)? {
        b"IntxCHR\0" => Some(Entry::other(path, mode, "char-device")),
        b"IntxBLK\0" => Some(Entry::other(path, mode, "block-device")),
        _ => None,
    }
}

enum Reparse {
    Link(String),
    Other(u32),
}

const TAG_MOUNT_POINT: u32 = 0xa000_0003;
const TAG_SYMLINK: u32 = 0xa000_000c;
const TAG_LX_SYMLINK: u32 = 0xa000_001d;

fn reparse_target<T: Read + Seek>(file: &NtfsFile, r: &mut T) -> Result<Reparse, String> {
    let mut attrs = file.attributes();
    let mut data = None;
    while let Some(item) = attrs.next(r) {
        let item = item.map_err(damaged)?;
        let attr = item.to_attribute().map_err(damaged)?;
        if attr.ty().map_err(damaged)? != NtfsAttributeType::ReparsePoint {
            continue;
        }
        let len = attr.value_length();
        if len > MAX_REPARSE {
            return Err(format!("reparse point data of {len} bytes (at most {MAX_REPARSE} are read)"));
        }
        let mut value = attr.value(r).map_err(damaged)?;
        let mut bytes = vec![0u8; len as usize];
        value.read_exact(r, &mut bytes).map_err(damaged)?;
        data = Some(bytes);
        break;
    }
    let data = data.ok_or("marked as a reparse point, but has no reparse data")?;
    parse_reparse(&data)
}

/// Parses `REPARSE_DATA_BUFFER`: the link target of a symbolic link, junction or WSL link.
fn parse_reparse(d: &[u8]) -> Result<Reparse, String> {
    let bad = || "reparse data is damaged".to_owned();
    let u16_at = |at: usize| d.get(at..at + 2).map(|b| u16::from_le_bytes([b[0], b[1]]) as usize).ok_or_else(bad);
    let tag = d.get(0..4).map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes"))).ok_or_else(bad)?;
    let data_len = u16_at(4)?;
    let body = d.get(8..8 + data_len).ok_or_else(bad)?;
    let buffer_at = match tag {
        TAG_SYMLINK => 12,
        TAG_MOUNT_POINT => 8,
        TAG_LX_SYMLINK => {
            let target = body.get(4..).ok_or_else(bad)?;
            return Ok(Reparse::Link(super::escape_name(target).replace("\\x2f", "/")));
        }
        other => return Ok(Reparse::Other(other)),
    };
    let field = |at: usize| body.get(at..at + 2).map(|b| u16::from_le_bytes([b[0], b[1]]) as usize).ok_or_else(bad);
    let (subst_off, subst_len, print_off, print_len) = (field(0)?, field(2)?, field(4)?, field(6)?);
    let names = body.get(buffer_at..).ok_or_else(bad)?;
    let name = |off: usize, len: usize| -> Result<String, String> {
        let b = names.get(off..off.checked_add(len).ok_or_else(bad)?).ok_or_else(bad)?;
        Ok(escape_utf16_path(b.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]]))))
    };
    let print = name(print_off, print_len)?;
    Ok(Reparse::Link(if print.is_empty() { name(subst_off, subst_len)? } else { print }))
}

fn damaged(e: ntfs::NtfsError) -> String {
    format!("the filesystem is damaged or not supported ({e})")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn symlink_data(tag: u32, print: &str, subst: &str) -> Vec<u8> {
        let p: Vec<u8> = print.encode_utf16().flat_map(u16::to_le_bytes).collect();
        let s: Vec<u8> = subst.encode_utf16().flat_map(u16::to_le_bytes).collect();
        let mut body = Vec::new();
        body.extend((0u16).to_le_bytes());
        body.extend((s.len() as u16).to_le_bytes());
        body.extend((s.len() as u16).to_le_bytes());
        body.extend((p.len() as u16).to_le_bytes());
        if tag == TAG_SYMLINK {
            body.extend(1u32.to_le_bytes());
        }
        body.extend(&s);
        body.extend(&p);
        let mut d = tag.to_le_bytes().to_vec();
        d.extend((body.len() as u16).to_le_bytes());
        d.extend([0, 0]);
        d.extend(body);
        d
    }

    #[test]
    fn reparse_targets() {
        let d = symlink_data(TAG_SYMLINK, "..\\hello.txt", "..\\hello.txt");
        assert!(matches!(parse_reparse(&d), Ok(Reparse::Link(t)) if t == "..\\hello.txt"));
        let d = symlink_data(TAG_MOUNT_POINT, "", "\\??\\C:\\target");
        assert!(matches!(parse_reparse(&d), Ok(Reparse::Link(t)) if t == "\\??\\C:\\target"));
        let mut lx = TAG_LX_SYMLINK.to_le_bytes().to_vec();
        lx.extend(10u16.to_le_bytes());
        lx.extend([0, 0]);
        lx.extend(2u32.to_le_bytes());
        lx.extend(b"../a/b");
        assert!(matches!(parse_reparse(&lx), Ok(Reparse::Link(t)) if t == "../a/b"));
        assert!(matches!(
            parse_reparse(&0x8000_0017u32.to_le_bytes().iter().chain(&[0; 4]).copied().collect::<Vec<_>>()),
            Ok(Reparse::Other(0x8000_0017))
        ));
    }

    #[test]
    fn damaged_reparse_data_is_an_error() {
        let good = symlink_data(TAG_SYMLINK, "abc", "abc");
        for cut in 0..good.len() {
            let _ = parse_reparse(&good[..cut]);
        }
        let mut d = good.clone();
        d[8 + 4] = 0xff; // print name offset far past the buffer
        assert!(parse_reparse(&d).is_err());
        let mut d = good;
        d[4] = 0xff;
        d[5] = 0xff;
        assert!(parse_reparse(&d).is_err());
    }
}
