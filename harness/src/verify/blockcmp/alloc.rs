//! The allocation of VHD (vpc) and VHDX images, read from their own block allocation tables
//! (BAT), because QEMU does not tell it usefully: QEMU 10.0's vhdx driver reports every
//! byte as data, with no host offset (so `qemu-img map` and NBD `base:allocation` both say
//! "all data"), and its vpc driver reports allocation but no host offset we can check.
//! With the BAT, a compare reads only the allocated blocks, straight from the file.
//!
//! The files are untrusted input: every field is bounds-checked before it is used, sizes
//! and counts are capped, and what the parser cannot vouch for is not guessed at:
//! - a layout QEMU reads differently from a plain dynamic disk (a differencing disk, a VHDX
//!   log to replay, an unknown region or metadata item marked required, a fixed VHD) gives
//!   `Ok(None)`: the caller goes through QEMU's driver (qemu-img map and NBD) instead;
//! - a block whose data would lie past the end of the file, or whose state only QEMU can
//!   interpret, is [`Source::Export`]: QEMU's driver reads it (or fails, as it should);
//! - a file that is not what it claims to be (bad signatures, checksums, impossible sizes)
//!   is an error naming the structure and the field.
//!
//! It follows what QEMU's drivers do (block/vhdx.c, block/vpc.c, and Microsoft's MS-VHDX
//! and VHD specifications): which VHDX header is current, which BAT states read as zeros,
//! where a VHD block's data starts after its sector bitmap.

use std::fs::File;
use std::os::unix::fs::FileExt;

use super::map::{Extent, Map, Source, MAX_EXTENTS};

/// What the parser reads from: a file, or bytes in memory (tests, the fuzzer).
pub trait ReadAt {
    /// The length in bytes.
    fn size(&self) -> std::io::Result<u64>;
    /// Fills `buf` from `offset`; reading past the end is an error.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()>;
}

impl ReadAt for File {
    fn size(&self) -> std::io::Result<u64> {
        Ok(self.metadata()?.len())
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }
}

impl ReadAt for [u8] {
    fn size(&self) -> std::io::Result<u64> {
        Ok(self.len() as u64)
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let start = usize::try_from(offset).ok().filter(|&s| s <= self.len());
        match start.and_then(|s| self.get(s..s.checked_add(buf.len())?)) {
            Some(src) => {
                buf.copy_from_slice(src);
                Ok(())
            }
            None => Err(std::io::ErrorKind::UnexpectedEof.into()),
        }
    }
}

/// Reads `len` bytes at `offset`, naming `what` in the error. What lies past the end of
/// the file is refused before any memory is set aside for it. (The qcow2 reader uses it too.)
pub(super) fn read(f: &(impl ReadAt + ?Sized), offset: u64, len: usize, what: &str) -> Result<Vec<u8>, String> {
    let file_len = f.size().map_err(|e| format!("{what}: the file's length: {e}"))?;
    if offset.checked_add(len as u64).is_none_or(|end| end > file_len) {
        return Err(format!("{what}: {len} bytes at {offset} lie past the end of the file ({file_len} bytes)"));
    }
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, offset).map_err(|e| format!("{what}: cannot read {len} bytes at {offset}: {e}"))?;
    Ok(buf)
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Blocks of `block` bytes covering `size`, capped so that a table is never larger than
/// what a map may hold.
fn block_count(size: u64, block: u64, what: &str) -> Result<usize, String> {
    let n = size.div_ceil(block);
    usize::try_from(n)
        .ok()
        .filter(|&n| n <= MAX_EXTENTS)
        .ok_or_else(|| format!("{what}: {n} blocks, more than the {MAX_EXTENTS} we accept"))
}

/// The map of `size` bytes in blocks of `block` bytes, block `i` read from `source(i)`;
/// a block's data must lie inside the file (`file_len`), or it is read through QEMU.
fn build(size: u64, block: u64, file_len: u64, n: usize, source: impl Fn(usize) -> Source) -> Map {
    let mut m = Map { size, extents: Vec::new() };
    for i in 0..n {
        let start = i as u64 * block;
        let len = block.min(size - start);
        let source = match source(i) {
            Source::File { layer, offset } if offset.checked_add(len).is_some_and(|e| e <= file_len) => {
                Source::File { layer, offset }
            }
            Source::File { .. } => Source::Export,
            other => other,
        };
        super::map::push(&mut m.extents, Extent { start, len, source });
    }
    m
}

// ---- VHDX (MS-VHDX) ----

/// A GUID as VHDX stores it: the first three fields little-endian, the rest as written.
const fn guid(d1: u32, d2: u16, d3: u16, d4: [u8; 8]) -> [u8; 16] {
    let a = d1.to_le_bytes();
    let b = d2.to_le_bytes();
    let c = d3.to_le_bytes();
    [a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d4[0], d4[1], d4[2], d4[3], d4[4], d4[5], d4[6], d4[7]]
}

const BAT_REGION: [u8; 16] = guid(0x2DC2_7766, 0xF623, 0x4200, [0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD, 0x4A, 0x08]);
const METADATA_REGION: [u8; 16] = guid(0x8B7C_A206, 0x4790, 0x4B9A, [0xB8, 0xFE, 0x57, 0x5F, 0x05, 0x0F, 0x88, 0x6E]);
const FILE_PARAMETERS: [u8; 16] = guid(0xCAA1_6737, 0xFA36, 0x4D43, [0xB3, 0xB6, 0x33, 0xF0, 0xAA, 0x44, 0xE7, 0x6B]);
const VIRTUAL_DISK_SIZE: [u8; 16] = guid(0x2FA5_4224, 0xCD1B, 0x4876, [0xB2, 0x11, 0x5D, 0xBE, 0xD8, 0x3B, 0xF4, 0xB8]);
const LOGICAL_SECTOR_SIZE: [u8; 16] =
    guid(0x8141_BF1D, 0xA96F, 0x4709, [0xBA, 0x47, 0xF2, 0x33, 0xA8, 0xFA, 0xAB, 0x5F]);
const PHYSICAL_SECTOR_SIZE: [u8; 16] =
    guid(0xCDA3_48C7, 0x445D, 0x4471, [0x9C, 0xC9, 0xE9, 0x88, 0x52, 0x51, 0xC5, 0x56]);
const PAGE83_DATA: [u8; 16] = guid(0xBECA_12AB, 0xB2E6, 0x4523, [0x93, 0xEF, 0xC3, 0x09, 0xE0, 0x00, 0xC7, 0x46]);
const PARENT_LOCATOR: [u8; 16] = guid(0xA8D3_5F2D, 0xB30B, 0x454D, [0xAB, 0xF7, 0xD3, 0xD8, 0x48, 0x34, 0xAB, 0x0C]);

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
/// The two headers, and the region table QEMU reads (the first; it ignores the copy).
const HEADERS: [u64; 2] = [64 * KIB, 128 * KIB];
const REGION_TABLE: u64 = 192 * KIB;

/// CRC-32C (Castagnoli, reflected), as VHDX checksums its headers and region table.
pub fn crc32c(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 { (c >> 1) ^ 0x82F6_3B78 } else { c >> 1 };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    };
    !data.iter().fold(!0u32, |c, &b| TABLE[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8))
}

/// True if `buf`'s CRC-32C, taken with its checksum field (bytes 4..8) as zeros, is that field.
fn checksum_ok(buf: &[u8]) -> bool {
    let stored = le32(buf, 4);
    let mut copy = buf.to_vec();
    copy[4..8].fill(0);
    crc32c(&copy) == stored
}

/// One VHDX header, if it is valid: its sequence number and whether it names a log.
fn vhdx_header(f: &(impl ReadAt + ?Sized), at: u64) -> Result<Option<(u64, bool)>, String> {
    let h = read(f, at, 4096, "VHDX header")?;
    if &h[0..4] != b"head" || !checksum_ok(&h) {
        return Ok(None);
    }
    let version = le16(&h, 66);
    if version != 1 {
        return Err(format!("VHDX header at {at}: version {version}, not 1"));
    }
    let log_guid = &h[48..64];
    Ok(Some((le64(&h, 8), log_guid.iter().any(|&b| b != 0))))
}

/// The map of a VHDX image of `size` bytes (the virtual size QEMU reports), or None if only
/// QEMU's driver can say what it holds (a differencing disk, a log to replay, an unknown
/// required part).
pub fn vhdx(f: &(impl ReadAt + ?Sized), size: u64) -> Result<Option<Map>, String> {
    Ok(vhdx_sized(f, Some(size))?.map(|(m, _)| m))
}

/// The map of a VHDX image, its size the one its metadata gives (which QEMU reports), and
/// its block size.
pub fn vhdx_own(f: &(impl ReadAt + ?Sized)) -> Result<Option<(Map, u64)>, String> {
    vhdx_sized(f, None)
}

fn vhdx_sized(f: &(impl ReadAt + ?Sized), size: Option<u64>) -> Result<Option<(Map, u64)>, String> {
    let file_len = f.size().map_err(|e| format!("VHDX: the file's length: {e}"))?;
    if read(f, 0, 8, "VHDX file identifier")? != b"vhdxfile" {
        return Err("VHDX: no 'vhdxfile' signature at the start".into());
    }
    // The current header is the valid one with the higher sequence number (equal is invalid).
    let (h1, h2) = (vhdx_header(f, HEADERS[0])?, vhdx_header(f, HEADERS[1])?);
    let log = match (h1, h2) {
        (Some((s1, l1)), Some((s2, l2))) if s1 != s2 => {
            if s1 > s2 {
                l1
            } else {
                l2
            }
        }
        (Some(_), Some(_)) => return Err("VHDX: both headers have the same sequence number".into()),
        (Some((_, l)), None) | (None, Some((_, l))) => l,
        (None, None) => return Err("VHDX: neither header is valid (signature or checksum)".into()),
    };
    if log {
        return Ok(None); // QEMU replays the log (or refuses a read-only open): its driver decides.
    }

    let rt = read(f, REGION_TABLE, 64 * KIB as usize, "VHDX region table")?;
    if &rt[0..4] != b"regi" || !checksum_ok(&rt) {
        return Err("VHDX: the region table's signature or checksum is wrong".into());
    }
    let entries = le32(&rt, 8) as usize;
    if entries > 2047 {
        return Err(format!("VHDX: {entries} region table entries, more than the 2047 allowed"));
    }
    let (mut bat, mut meta) = (None, None);
    for i in 0..entries {
        let e = &rt[16 + i * 32..16 + (i + 1) * 32];
        let (offset, length, required) = (le64(e, 16), u64::from(le32(e, 24)), le32(e, 28) & 1 != 0);
        if offset.checked_add(length).is_none_or(|end| end > file_len) {
            return Err(format!("VHDX: region {i} at {offset}, {length} bytes, is not inside the file"));
        }
        match <[u8; 16]>::try_from(&e[0..16]).expect("16 bytes") {
            BAT_REGION => bat = Some((offset, length)),
            METADATA_REGION => meta = Some((offset, length)),
            _ if required => return Ok(None),
            _ => {}
        }
    }
    let ((bat_at, bat_len), (meta_at, meta_len)) = match (bat, meta) {
        (Some(b), Some(m)) => (b, m),
        _ => return Err("VHDX: the region table lacks the BAT or the metadata region".into()),
    };

    let md = vhdx_metadata(f, meta_at, meta_len)?;
    let Some(md) = md else { return Ok(None) };
    let size = match size {
        Some(s) if s != md.size => return Err(format!("VHDX: the metadata says {} bytes, QEMU says {s}", md.size)),
        _ => md.size,
    };
    // One sector bitmap entry follows every `chunk_ratio` payload entries.
    let chunk_ratio = (1u64 << 23) * md.sector / md.block;
    let n = block_count(size, md.block, "VHDX")?;
    let entries_needed = if n == 0 { 0 } else { (n as u64 - 1) + (n as u64 - 1) / chunk_ratio + 1 };
    if entries_needed * 8 > bat_len {
        return Err(format!("VHDX: the BAT holds {} entries, {entries_needed} are needed", bat_len / 8));
    }
    let table = read(f, bat_at, (entries_needed * 8) as usize, "VHDX BAT")?;
    let block = md.block;
    let map = build(size, block, file_len, n, |i| {
        let idx = i + i / chunk_ratio as usize;
        let entry = le64(&table, idx * 8);
        match entry & 7 {
            // Not present, undefined, zero, unmapped (and the draft's unmapped, 5): QEMU
            // reads zeros for these in a disk with no parent.
            0 | 1 | 2 | 3 | 5 => Source::Zero,
            6 => Source::File { layer: 0, offset: entry & !(MIB - 1) },
            // Partially present (differencing only) or an unknown state: QEMU decides.
            _ => Source::Export,
        }
    });
    Ok(Some((map, block)))
}

struct VhdxMetadata {
    block: u64,
    size: u64,
    sector: u64,
}

/// The metadata items a map needs, or None for a disk with a parent or an unknown required item.
fn vhdx_metadata(f: &(impl ReadAt + ?Sized), at: u64, len: u64) -> Result<Option<VhdxMetadata>, String> {
    let hdr = read(f, at, 32, "VHDX metadata table")?;
    if &hdr[0..8] != b"metadata" {
        return Err("VHDX: no 'metadata' signature on the metadata table".into());
    }
    let count = le16(&hdr, 10) as usize;
    if count > 2047 || 32 * (count as u64 + 1) > len {
        return Err(format!("VHDX: {count} metadata entries, more than the 2047 allowed or than fit its region"));
    }
    let table = read(f, at + 32, count * 32, "VHDX metadata entries")?;
    let item = |i: usize, need: u64| -> Result<Vec<u8>, String> {
        let e = &table[i * 32..(i + 1) * 32];
        let (off, l) = (u64::from(le32(e, 16)), u64::from(le32(e, 20)));
        if l < need || off.checked_add(l).is_none_or(|end| end > len) {
            return Err(format!("VHDX: metadata item {i} ({l} bytes at {off}) is not inside its region"));
        }
        read(f, at + off, need as usize, "VHDX metadata item")
    };
    let (mut block, mut flags, mut size, mut sector) = (None, 0u32, None, None);
    for i in 0..count {
        let e = &table[i * 32..(i + 1) * 32];
        let required = le32(e, 24) & 4 != 0;
        match <[u8; 16]>::try_from(&e[0..16]).expect("16 bytes") {
            FILE_PARAMETERS => {
                let v = item(i, 8)?;
                (block, flags) = (Some(u64::from(le32(&v, 0))), le32(&v, 4));
            }
            VIRTUAL_DISK_SIZE => size = Some(le64(&item(i, 8)?, 0)),
            LOGICAL_SECTOR_SIZE => sector = Some(u64::from(le32(&item(i, 4)?, 0))),
            PARENT_LOCATOR => return Ok(None),
            PHYSICAL_SECTOR_SIZE | PAGE83_DATA => {}
            _ if required => return Ok(None),
            _ => {}
        }
    }
    let (Some(block), Some(size), Some(sector)) = (block, size, sector) else {
        return Err("VHDX: the metadata lacks the block size, the disk size or the sector size".into());
    };
    if flags & 2 != 0 {
        return Ok(None); // HasParent: a differencing disk.
    }
    if !block.is_power_of_two() || !(MIB..=256 * MIB).contains(&block) {
        return Err(format!("VHDX: block size {block}, not a power of two from 1 MiB to 256 MiB"));
    }
    if sector != 512 && sector != 4096 {
        return Err(format!("VHDX: logical sector size {sector}, not 512 or 4096"));
    }
    Ok(Some(VhdxMetadata { block, size, sector }))
}

// ---- VHD (Virtual PC / Virtual Server "vpc") ----

/// A dynamic VHD's BAT entry for a block with no data.
const VHD_UNALLOCATED: u32 = 0xFFFF_FFFF;

/// The map of a VHD image of `size` bytes (the virtual size QEMU reports, which QEMU works
/// out from the geometry or the footer's size depending on who made the image), or None
/// if it is not a dynamic disk (fixed and differencing disks go through QEMU's driver).
pub fn vhd(f: &(impl ReadAt + ?Sized), size: u64) -> Result<Option<Map>, String> {
    Ok(vhd_sized(f, Some(size))?.map(|(m, _)| m))
}

/// The map of a VHD image, its size worked out from the footer as QEMU's vpc driver does
/// with its default options: Virtual PC and QEMU's own older images ("vpc ", "qemu", and
/// any creator it does not know) are as large as their CHS geometry; images from Hyper-V
/// ("win "), QEMU with force_size ("qem2"), Disk2vhd ("d2v "), XenServer ("tap\0") and
/// XenConverter ("CTXS"), and any image whose geometry is the largest VHD can express, as
/// large as the footer's current size.
pub fn vhd_own(f: &(impl ReadAt + ?Sized)) -> Result<Option<(Map, u64)>, String> {
    vhd_sized(f, None)
}

/// The largest CHS geometry (65535 cylinders, 16 heads, 255 sectors), in sectors.
const VHD_MAX_GEOMETRY: u64 = 65535 * 16 * 255;

fn vhd_sized(f: &(impl ReadAt + ?Sized), size: Option<u64>) -> Result<Option<(Map, u64)>, String> {
    let file_len = f.size().map_err(|e| format!("VHD: the file's length: {e}"))?;
    // QEMU reads the footer's copy at the start of the file; a fixed disk has none there.
    let footer = read(f, 0, 512, "VHD footer")?;
    if &footer[0..8] != b"conectix" {
        return Ok(None);
    }
    let disk_type = be32(&footer, 60);
    if disk_type != 3 {
        return Ok(None); // 2: fixed, 4: differencing; anything else QEMU refuses itself.
    }
    let size = match size {
        Some(s) => s,
        None => {
            let chs =
                u64::from(u16::from_be_bytes([footer[56], footer[57]])) * u64::from(footer[58]) * u64::from(footer[59]);
            let by_size = matches!(&footer[28..32], b"win " | b"qem2" | b"d2v " | b"CTXS" | b"tap\0");
            if by_size || chs == VHD_MAX_GEOMETRY {
                be64(&footer, 48) / 512 * 512
            } else {
                chs * 512
            }
        }
    };
    let dyn_at = be64(&footer, 16);
    let dh = read(f, dyn_at, 1024, "VHD dynamic disk header")?;
    if &dh[0..8] != b"cxsparse" {
        return Err(format!("VHD: no 'cxsparse' signature on the dynamic disk header at {dyn_at}"));
    }
    let (table_at, entries, block) = (be64(&dh, 16), u64::from(be32(&dh, 28)), u64::from(be32(&dh, 32)));
    if !block.is_power_of_two() || block < 512 {
        return Err(format!("VHD: block size {block}, not a power of two of at least 512"));
    }
    let n = block_count(size, block, "VHD")?;
    if (n as u64) > entries {
        return Err(format!("VHD: the BAT has {entries} entries, {n} are needed for {size} bytes"));
    }
    let table = read(f, table_at, n * 4, "VHD BAT")?;
    // Each block starts with its sector bitmap, padded to whole sectors; the data follows.
    // QEMU reads a dynamic disk's data whatever the bitmap says.
    let bitmap = (block / (8 * 512)).div_ceil(512) * 512;
    let map = build(size, block, file_len, n, |i| match be32(&table, i * 4) {
        VHD_UNALLOCATED => Source::Zero,
        sector => match (u64::from(sector) * 512).checked_add(bitmap) {
            Some(offset) => Source::File { layer: 0, offset },
            None => Source::Export,
        },
    });
    Ok(Some((map, block)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BLOCK: u64 = 2 << 20;

    /// A dynamic VHD of `blocks` 2 MiB blocks, as Virtual PC lays one out: footer copy,
    /// dynamic header, BAT, then the blocks given (index, sector bitmap + data), then the
    /// footer. Checksums are left out: QEMU does not enforce them.
    fn vhd(size: u64, entries: u32, allocated: &[usize]) -> Vec<u8> {
        let mut f = vec![0u8; 512];
        f[0..8].copy_from_slice(b"conectix");
        f[16..24].copy_from_slice(&512u64.to_be_bytes());
        f[48..56].copy_from_slice(&size.to_be_bytes());
        f[60..64].copy_from_slice(&3u32.to_be_bytes());
        let mut d = vec![0u8; 1024];
        d[0..8].copy_from_slice(b"cxsparse");
        d[16..24].copy_from_slice(&1536u64.to_be_bytes());
        d[28..32].copy_from_slice(&entries.to_be_bytes());
        d[32..36].copy_from_slice(&(BLOCK as u32).to_be_bytes());
        let table_len = (entries as usize * 4).div_ceil(512) * 512;
        let mut bat = vec![0xffu8; table_len];
        let mut img = [f.clone(), d].concat();
        let data_at = 1536 + table_len;
        for (k, &i) in allocated.iter().enumerate() {
            let sector = (data_at as u64 + k as u64 * (512 + BLOCK)) / 512;
            bat[i * 4..i * 4 + 4].copy_from_slice(&(sector as u32).to_be_bytes());
        }
        img.extend_from_slice(&bat);
        for &i in allocated {
            img.extend_from_slice(&[0u8; 512]);
            img.extend(std::iter::repeat_n(i as u8 + 1, BLOCK as usize));
        }
        img.extend_from_slice(&f);
        img
    }

    #[test]
    fn a_dynamic_vhd_maps_its_allocated_blocks_after_their_bitmaps() {
        let size = 4 * BLOCK + 4096;
        let img = vhd(size, 8, &[1, 3]);
        let m = super::vhd(&img[..], size).unwrap().unwrap();
        let data = 1536 + 512 + 512; // header, dyn header, BAT (8 entries, one sector), bitmap
        assert_eq!(
            m.extents,
            vec![
                Extent { start: 0, len: BLOCK, source: Source::Zero },
                Extent { start: BLOCK, len: BLOCK, source: Source::File { layer: 0, offset: data } },
                Extent { start: 2 * BLOCK, len: BLOCK, source: Source::Zero },
                Extent { start: 3 * BLOCK, len: BLOCK, source: Source::File { layer: 0, offset: data + BLOCK + 512 } },
                Extent { start: 4 * BLOCK, len: 4096, source: Source::Zero },
            ]
        );
        // What the map points at is what the blocks hold.
        assert_eq!(img[data as usize], 2);
        assert_eq!(img[(data + BLOCK + 512) as usize], 4);
    }

    #[test]
    fn vhd_blocks_past_the_end_go_through_qemu_and_bad_tables_are_errors() {
        let size = 2 * BLOCK;
        let mut img = vhd(size, 2, &[0, 1]);
        img.truncate(img.len() - 4096); // the last block is cut short
        let m = super::vhd(&img[..], size).unwrap().unwrap();
        assert_eq!(m.extents[1].source, Source::Export);
        assert!(matches!(m.extents[0].source, Source::File { .. }));

        let err = |img: &[u8], size| super::vhd(img, size).unwrap_err();
        assert!(err(&vhd(3 * BLOCK, 2, &[]), 3 * BLOCK).contains("the BAT has 2 entries, 3 are needed"));
        let mut bad = vhd(size, 2, &[]);
        bad[512..520].copy_from_slice(b"nothere!");
        assert!(err(&bad, size).contains("no 'cxsparse' signature"));
        let mut odd = vhd(size, 2, &[]);
        odd[512 + 32..512 + 36].copy_from_slice(&3000u32.to_be_bytes());
        assert!(err(&odd, size).contains("block size 3000"));
        let mut far = vhd(size, 2, &[]);
        far[512 + 16..512 + 24].copy_from_slice(&u64::MAX.to_be_bytes());
        assert!(err(&far, size).contains("past the end of the file"));
        assert!(err(&[0u8; 100], size).contains("VHD footer"));
        // Not a dynamic disk: QEMU's driver reads it.
        let mut fixed = vhd(size, 2, &[]);
        fixed[60..64].copy_from_slice(&2u32.to_be_bytes());
        assert_eq!(super::vhd(&fixed[..], size), Ok(None));
        assert_eq!(super::vhd(&[0u8; 1024][..], size), Ok(None));
    }

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        // The check value of CRC-32C over "123456789".
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }
}
