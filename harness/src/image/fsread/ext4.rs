//! ext2/3/4 through the `ext4-view` crate: a read-only, pure-Rust reader that checks
//! metadata checksums and replays the journal in memory. Directories are walked from the
//! root; regular files are hashed with BLAKE3 as they are read.

use ext4_view::{Ext4, Ext4Error, FileType};

use super::{escape_name, Walk, Window};
use crate::image::manifest::{Entry, FsKind, FsManifest, ManifestError};

const BUF: usize = 256 << 10;

/// Reads the filesystem in `window` into a manifest.
pub fn read(window: Window, partition: Option<u32>, walk: &mut Walk) -> Result<FsManifest, ManifestError> {
    walk.start(partition, FsKind::Ext4);
    precheck(&window).map_err(|e| walk.fs_error("/", e))?;
    let fs = Ext4::load(Box::new(window)).map_err(|e| walk.fs_error("/", why(e)))?;
    let label = fs.label().as_bytes().split(|&b| b == 0).next().map(escape_name).unwrap_or_default();
    let uuid = fs.uuid().to_string();
    let root = fs.metadata("/").map_err(|e| walk.fs_error("/", why(e)))?;
    walk.push(Entry::dir("/", root.mode().into()))?;
    let mut buf = vec![0u8; BUF];
    // (path in the filesystem's bytes, path as shown); the root is shown as "".
    let mut stack = vec![(b"/".to_vec(), String::new())];
    while let Some((dir, shown)) = stack.pop() {
        let shown_dir = if shown.is_empty() { "/" } else { &shown };
        let entries = match fs.read_dir(dir.as_slice()) {
            Ok(entries) => entries,
            Err(Ext4Error::Encrypted) => {
                walk.annotate(shown_dir, "encrypted: not listed");
                continue;
            }
            Err(e) => return Err(walk.fs_error(shown_dir, why(e))),
        };
        for de in entries {
            let de = de.map_err(|e| walk.fs_error(shown_dir, why(e)))?;
            let name = de.file_name();
            if name == "." || name == ".." {
                continue;
            }
            let path = format!("{shown}/{}", escape_name(name.as_ref()));
            let mut raw = dir.clone();
            if raw.len() > 1 {
                raw.push(b'/');
            }
            raw.extend_from_slice(name.as_ref());
            // The inode, not the directory entry, says what this is.
            let md = de.metadata().map_err(|e| walk.fs_error(&path, why(e)))?;
            let mode = u32::from(md.mode());
            let ftype = md.file_type();
            let entry = if ftype.is_dir() {
                stack.push((raw, path.clone()));
                Entry::dir(&path, mode)
            } else if ftype.is_regular_file() {
                let size = md.len();
                match hash_file(&fs, &raw, &path, size, walk, &mut buf)? {
                    Some(hash) => Entry::file(&path, size, mode, hash),
                    None => Entry::unread(&path, size, mode, "encrypted: content not read"),
                }
            } else if ftype.is_symlink() {
                let target = fs.read_link(raw.as_slice()).map_err(|e| walk.fs_error(&path, why(e)))?;
                Entry::symlink(&path, md.len(), mode, escape_target(target.as_ref()))
            } else {
                Entry::other(&path, mode, other_kind(ftype))
            };
            walk.push(entry)?;
        }
    }
    Ok(FsManifest { partition, kind: FsKind::Ext4, label, uuid, entries: walk.take() })
}

fn hash_file(
    fs: &Ext4,
    raw: &[u8],
    path: &str,
    size: u64,
    walk: &mut Walk,
    buf: &mut [u8],
) -> Result<Option<String>, ManifestError> {
    let mut f = match fs.open(raw) {
        Ok(f) => f,
        Err(Ext4Error::Encrypted) => return Ok(None),
        Err(e) => return Err(walk.fs_error(path, why(e))),
    };
    walk.charge(path, size)?;
    let mut h = blake3::Hasher::new();
    let mut total = 0u64;
    loop {
        // `read_bytes` stops at a block boundary; fill the buffer before hashing it.
        let mut filled = 0;
        while filled < buf.len() {
            let n = f.read_bytes(&mut buf[filled..]).map_err(|e| walk.fs_error(path, why(e)))?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 {
            break;
        }
        h.update(&buf[..filled]);
        total += filled as u64;
    }
    if total != size {
        return Err(walk.fs_error(path, format!("read {total} bytes of a file of {size}")));
    }
    Ok(Some(h.finalize().to_hex().to_string()))
}

/// Checks the superblock against the volume before the reader sizes anything by it: a
/// filesystem larger than its volume is a truncated image (or a damaged superblock), and the
/// number of block groups (which the reader allocates for up front) must fit the volume.
fn precheck(w: &Window) -> Result<(), String> {
    let mut sb = [0u8; 1024];
    w.read_at(1024, &mut sb).map_err(|e| format!("could not read the superblock ({e})"))?;
    let le32 = |o: usize| u64::from(u32::from_le_bytes(sb[o..o + 4].try_into().expect("4 bytes")));
    let log = le32(0x18);
    if log > 6 {
        return Err(format!("the superblock is damaged (block size 2^{} bytes)", log + 10));
    }
    let block = 1024u64 << log;
    let mut blocks = le32(0x4);
    if le32(0x60) & 0x80 != 0 {
        blocks |= le32(0x150) << 32;
    }
    let fs_bytes = u128::from(blocks) * u128::from(block);
    if fs_bytes > u128::from(w.len()) {
        return Err(format!(
            "the filesystem ({fs_bytes} bytes) is larger than its volume ({} bytes): \
             the image is truncated, or its superblock is damaged",
            w.len()
        ));
    }
    let groups = blocks.saturating_sub(le32(0x14)).div_ceil(le32(0x20).max(1));
    let most = w.len() / (256 << 10) + 1;
    if groups > most {
        return Err(format!("the superblock is damaged (it claims {groups} block groups; this volume holds {most})"));
    }
    Ok(())
}

/// A symlink target keeps its slashes; other bytes are escaped as names are.
fn escape_target(bytes: &[u8]) -> String {
    bytes.split(|&b| b == b'/').map(escape_name).collect::<Vec<_>>().join("/")
}

fn other_kind(t: FileType) -> &'static str {
    if t.is_fifo() {
        "fifo"
    } else if t.is_socket() {
        "socket"
    } else if t.is_char_dev() {
        "char-device"
    } else if t.is_block_dev() {
        "block-device"
    } else {
        "unknown"
    }
}

/// The reader's error, with a word for the user on what it means.
fn why(e: Ext4Error) -> String {
    match e {
        Ext4Error::Corrupt(_) => format!("the filesystem is damaged ({e})"),
        Ext4Error::Incompatible(_) => format!("the filesystem uses a feature this reader does not support ({e})"),
        Ext4Error::Io(_) => format!("could not read the disk ({e})"),
        _ => e.to_string(),
    }
}
