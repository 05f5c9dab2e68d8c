//! The allocation of a qcow2 image with no backing file, read from its own L1 and L2
//! tables, and of a raw file from its holes (`SEEK_DATA`/`SEEK_HOLE`, as QEMU's file
//! driver asks): what `qemu-img info` and `qemu-img map` would say, without starting them
//! (two processes per image were a fixed 20-45 ms of a compare that otherwise takes
//! 60-150 ms on a warm 1 GiB pair).
//!
//! Untrusted input, read as [`super::alloc`] reads VHD and VHDX: every field is checked
//! before use, and what the parser cannot vouch for is left to QEMU:
//! - an image QEMU reads differently from a plain one (a backing file, encryption, an
//!   external data file, subclusters, an unknown incompatible feature, a version other than
//!   2 or 3, the corrupt flag) gives `Ok(None)`: the caller asks qemu-img instead;
//! - a cluster only QEMU can produce (compressed), or whose entry it might read differently
//!   from us (reserved bits set, an unaligned offset, an L2 table outside the file, the
//!   zero flag in a version 2 image), or whose data lies past the end of the file, is
//!   [`Source::Export`]: read through QEMU's driver, which reads it or fails as it should;
//! - impossible sizes and tables are errors naming the field.
//!
//! The layout is the one docs/interop/qcow2.txt in QEMU's tree describes.

use std::fs::File;

use super::alloc::{read, ReadAt};
use super::map::{push, Extent, Map, Source, MAX_EXTENTS};

/// QEMU's limits: clusters of 512 bytes to 2 MiB, an L1 table of at most 32 MiB.
const MIN_CLUSTER_BITS: u32 = 9;
const MAX_CLUSTER_BITS: u32 = 21;
const MAX_L1_BYTES: u64 = 32 << 20;

/// Bits of an L1 or L2 entry that hold the host offset.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const COMPRESSED: u64 = 1 << 62;
const ZERO: u64 = 1;
/// Bits 1-8 and 56-61 of a standard L2 entry, and 1-8 and 56-62 of an L1 entry: reserved.
const L2_RESERVED: u64 = 0x3f00_0000_0000_01fe;
const L1_RESERVED: u64 = 0x7f00_0000_0000_01fe;

/// Incompatible feature bits we read as QEMU does: dirty (0; only refcounts may be stale)
/// and the compression type (3; only compressed clusters use it, and those go to QEMU).
const KNOWN_INCOMPATIBLE: u64 = 1 | (1 << 3);

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// A qcow2 image as the comparison needs it.
#[derive(Debug, PartialEq, Eq)]
pub struct Qcow2 {
    pub cluster_size: u64,
    /// Its own clusters; those it leaves to its backing file are [`Source::Zero`] here and
    /// listed in `from_backing`.
    pub map: Map,
    pub backing: Option<Backing>,
    /// Sorted, disjoint `(start, len)` ranges whose bytes come from the backing file (none
    /// without one).
    pub from_backing: Vec<(u64, u64)>,
}

/// The backing file a qcow2 header names, with the format its header extension names.
#[derive(Debug, PartialEq, Eq)]
pub struct Backing {
    pub name: Vec<u8>,
    pub format: Vec<u8>,
}

/// Header extension types: the end of the list, and the backing file's format.
const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// QEMU refuses backing file names longer than this.
const MAX_BACKING_NAME: u32 = 1023;

/// The map of a qcow2 image, or None if QEMU must read it (see the module's text).
pub fn qcow2(f: &(impl ReadAt + ?Sized)) -> Result<Option<Qcow2>, String> {
    let file_len = f.size().map_err(|e| format!("qcow2: the file's length: {e}"))?;
    let h = read(f, 0, 72, "qcow2 header")?;
    if &h[0..4] != b"QFI\xfb" {
        return Err("qcow2: no 'QFI\\xfb' magic at the start".into());
    }
    let version = be32(&h, 4);
    if version != 2 && version != 3 {
        return Ok(None);
    }
    let (backing, bits, size) = (be64(&h, 8), be32(&h, 20), be64(&h, 24));
    let (crypt, l1_entries, l1_at) = (be32(&h, 32), u64::from(be32(&h, 36)), be64(&h, 40));
    if crypt != 0 {
        return Ok(None);
    }
    if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&bits) {
        return Err(format!("qcow2: cluster_bits {bits}, not from {MIN_CLUSTER_BITS} to {MAX_CLUSTER_BITS}"));
    }
    let cluster = 1u64 << bits;
    let mut header_len = 72u64;
    if version == 3 {
        let v3 = read(f, 72, 32, "qcow2 version 3 header")?;
        let incompatible = be64(&v3, 0);
        if incompatible & !KNOWN_INCOMPATIBLE != 0 {
            return Ok(None); // Corrupt, external data file, subclusters, or unknown.
        }
        header_len = u64::from(be32(&v3, 28));
    }
    let backing = if backing == 0 {
        None
    } else {
        let Some(b) = backing_file(f, backing, be32(&h, 16), header_len, cluster)? else { return Ok(None) };
        Some(b)
    };
    let l2_entries = cluster / 8;
    // Each L1 entry covers an L2 table's worth of clusters.
    let per_l1 = l2_entries * cluster;
    let needed = size.div_ceil(per_l1);
    if l1_entries < needed {
        return Err(format!("qcow2: the L1 table has {l1_entries} entries, {needed} are needed for {size} bytes"));
    }
    if needed * 8 > MAX_L1_BYTES {
        return Err(format!("qcow2: an L1 table of {} bytes, more than QEMU's {MAX_L1_BYTES}", needed * 8));
    }
    if size.div_ceil(cluster) > MAX_EXTENTS as u64 {
        return Ok(None); // More clusters than a map of ours holds: qemu-img map merges them.
    }
    if l1_at % cluster != 0 {
        return Err(format!("qcow2: the L1 table's offset {l1_at} is not a multiple of the cluster size {cluster}"));
    }
    let l1 = read(f, l1_at, (needed * 8) as usize, "qcow2 L1 table")?;

    let mut m = Map { size, extents: Vec::new() };
    let mut l2 = vec![0u8; cluster as usize];
    // L2 tables already read: one the L1 table names twice is not a layout QEMU writes, and
    // would let a small file describe a huge map; such ranges go to QEMU.
    let mut seen = std::collections::HashSet::new();
    let mut from_backing: Vec<(u64, u64)> = Vec::new();
    for i in 0..needed as usize {
        let entry = be64(&l1, i * 8);
        let start = i as u64 * per_l1;
        let span = per_l1.min(size - start);
        let l2_at = entry & OFFSET_MASK;
        if entry & L1_RESERVED != 0 || l2_at % cluster != 0 {
            push(&mut m.extents, Extent { start, len: span, source: Source::Export });
            continue;
        }
        if l2_at == 0 {
            // No L2 table: every cluster under it is unallocated (the backing file's, or zeros).
            push(&mut m.extents, Extent { start, len: span, source: Source::Zero });
            add_range(&mut from_backing, start, span);
            continue;
        }
        if l2_at.checked_add(cluster).is_none_or(|end| end > file_len)
            || !seen.insert(l2_at)
            || f.read_exact_at(&mut l2, l2_at).is_err()
        {
            push(&mut m.extents, Extent { start, len: span, source: Source::Export });
            continue;
        }
        for j in 0..span.div_ceil(cluster) as usize {
            let at = start + j as u64 * cluster;
            let len = cluster.min(size - at);
            let source = match cluster_source(be64(&l2, j * 8), version, cluster, len, file_len) {
                Some(source) => source,
                None => {
                    add_range(&mut from_backing, at, len);
                    Source::Zero
                }
            };
            push(&mut m.extents, Extent { start: at, len, source });
        }
    }
    if backing.is_none() {
        from_backing.clear();
    }
    Ok(Some(Qcow2 { cluster_size: cluster, map: m, backing, from_backing }))
}

/// Appends `[start, start + len)` to sorted ranges, merging it into the last if it follows.
fn add_range(ranges: &mut Vec<(u64, u64)>, start: u64, len: u64) {
    match ranges.last_mut() {
        Some((s, l)) if *s + *l == start => *l += len,
        _ => ranges.push((start, len)),
    }
}

/// The backing file's name and the format its header extension names; None if QEMU would
/// have to work either out (no format given: QEMU probes it) or the name is not plain.
fn backing_file(
    f: &(impl ReadAt + ?Sized),
    at: u64,
    len: u32,
    header_len: u64,
    cluster: u64,
) -> Result<Option<Backing>, String> {
    if len == 0 || len > MAX_BACKING_NAME {
        return Err(format!("qcow2: a backing file name of {len} bytes"));
    }
    let name = read(f, at, len as usize, "qcow2 backing file name")?;
    // Header extensions follow the header, within the first cluster.
    let mut pos = header_len;
    let mut format = None;
    while pos + 8 <= cluster {
        let e = read(f, pos, 8, "qcow2 header extension")?;
        let (kind, n) = (be32(&e, 0), u64::from(be32(&e, 4)));
        if kind == EXT_END {
            break;
        }
        if pos + 8 + n > cluster {
            return Err(format!("qcow2: header extension {kind:#x} of {n} bytes runs past the first cluster"));
        }
        if kind == EXT_BACKING_FORMAT {
            format = Some(read(f, pos + 8, n as usize, "qcow2 backing format")?);
        }
        pos += 8 + n.div_ceil(8) * 8;
    }
    Ok(format.map(|format| Backing { name, format }))
}

/// Where one guest cluster's bytes are, from its L2 entry; None if it is unallocated (the
/// backing file's, or zeros without one).
fn cluster_source(entry: u64, version: u32, cluster: u64, len: u64, file_len: u64) -> Option<Source> {
    if entry & COMPRESSED != 0 {
        return Some(Source::Export);
    }
    if entry & ZERO != 0 {
        // Version 3's zero flag; in version 2 the bit is reserved, and QEMU decides.
        return Some(if version == 3 { Source::Zero } else { Source::Export });
    }
    let offset = entry & OFFSET_MASK;
    if entry & L2_RESERVED != 0 || offset % cluster != 0 {
        return Some(Source::Export);
    }
    if offset == 0 {
        return None;
    }
    if offset.checked_add(len).is_none_or(|end| end > file_len) {
        return Some(Source::Export);
    }
    Some(Source::File { layer: 0, offset })
}

/// The map of a raw file: its data where the filesystem has data, zeros in its holes. None
/// if it is not a regular file (a block device: qemu-img knows its size).
pub fn raw(f: &File) -> Result<Option<Map>, String> {
    use rustix::fs::{seek, SeekFrom};
    let meta = f.metadata().map_err(|e| format!("raw: the file's length: {e}"))?;
    if !meta.is_file() {
        return Ok(None);
    }
    let size = meta.len();
    let mut m = Map { size, extents: Vec::new() };
    let mut pos = 0u64;
    while pos < size {
        // The next data at or after pos, and the hole after it; a file that changes meanwhile
        // is read as it then is, and anything odd ends the walk with the rest as data.
        let data = match seek(f, SeekFrom::Data(pos)) {
            Ok(d) => d.min(size),
            Err(rustix::io::Errno::NXIO) => size,
            Err(_) => pos,
        };
        if data > pos {
            push(&mut m.extents, Extent { start: pos, len: data - pos, source: Source::Zero });
        }
        if data >= size {
            break;
        }
        let hole = match seek(f, SeekFrom::Hole(data)) {
            Ok(h) if h > data => h.min(size),
            _ => size,
        };
        push(&mut m.extents, Extent { start: data, len: hole - data, source: Source::File { layer: 0, offset: data } });
        if m.extents.len() > MAX_EXTENTS {
            return Ok(None);
        }
        pos = hole;
    }
    Ok(Some(m))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLUSTER: u64 = 65536;

    /// A version 3 qcow2 of `size` bytes with 64 KiB clusters: header, L1 at one cluster,
    /// one L2 table at two, then the data clusters given as (guest cluster, L2 entry).
    fn image(size: u64, entries: &[(usize, u64)]) -> Vec<u8> {
        let mut img = vec![0u8; 3 * CLUSTER as usize];
        img[0..4].copy_from_slice(b"QFI\xfb");
        img[4..8].copy_from_slice(&3u32.to_be_bytes());
        img[20..24].copy_from_slice(&16u32.to_be_bytes());
        img[24..32].copy_from_slice(&size.to_be_bytes());
        img[36..40].copy_from_slice(&1u32.to_be_bytes());
        img[40..48].copy_from_slice(&CLUSTER.to_be_bytes());
        img[100..104].copy_from_slice(&104u32.to_be_bytes());
        let l1 = CLUSTER as usize;
        img[l1..l1 + 8].copy_from_slice(&((2 * CLUSTER) | (1 << 63)).to_be_bytes());
        for &(k, e) in entries {
            let at = 2 * CLUSTER as usize + k * 8;
            img[at..at + 8].copy_from_slice(&e.to_be_bytes());
        }
        img
    }

    fn per_l1() -> u64 {
        CLUSTER / 8 * CLUSTER
    }

    fn ext(start: u64, len: u64, source: Source) -> Extent {
        Extent { start, len, source }
    }

    #[test]
    fn clusters_map_to_their_offsets_zero_flags_and_qemu() {
        let mut img =
            image(8 * CLUSTER, &[(1, 3 * CLUSTER), (2, 4 * CLUSTER), (4, 1), (5, COMPRESSED | (5 * CLUSTER))]);
        img.resize(5 * CLUSTER as usize, 7);
        let q = qcow2(&img[..]).unwrap().unwrap();
        assert_eq!(q.cluster_size, CLUSTER);
        assert_eq!(
            q.map.extents,
            vec![
                ext(0, CLUSTER, Source::Zero),
                ext(CLUSTER, 2 * CLUSTER, Source::File { layer: 0, offset: 3 * CLUSTER }),
                ext(3 * CLUSTER, 2 * CLUSTER, Source::Zero),
                ext(5 * CLUSTER, CLUSTER, Source::Export),
                ext(6 * CLUSTER, 2 * CLUSTER, Source::Zero),
            ]
        );
    }

    #[test]
    fn what_qemu_might_read_otherwise_goes_to_qemu() {
        let mut img = image(4 * CLUSTER, &[(0, 9 * CLUSTER), (1, 3 * CLUSTER + 512), (2, (3 * CLUSTER) | 2)]);
        img.resize(4 * CLUSTER as usize, 0);
        let q = qcow2(&img[..]).unwrap().unwrap();
        // Past the end of the file, unaligned, a reserved bit: all through QEMU.
        assert_eq!(q.map.extents, vec![ext(0, 3 * CLUSTER, Source::Export), ext(3 * CLUSTER, CLUSTER, Source::Zero)]);
        // Version 2's reserved bit 0.
        let mut v2 = image(CLUSTER, &[(0, 1)]);
        v2[4..8].copy_from_slice(&2u32.to_be_bytes());
        assert_eq!(qcow2(&v2[..]).unwrap().unwrap().map.extents, vec![ext(0, CLUSTER, Source::Export)]);
        // Two L1 entries naming one L2 table: the second range goes to QEMU.
        let mut twice = image(2 * per_l1(), &[(0, 3 * CLUSTER)]);
        twice[CLUSTER as usize + 8..CLUSTER as usize + 16].copy_from_slice(&(2 * CLUSTER).to_be_bytes());
        twice[36..40].copy_from_slice(&2u32.to_be_bytes());
        twice.resize(4 * CLUSTER as usize, 0);
        let m = qcow2(&twice[..]).unwrap().unwrap().map;
        assert_eq!(m.extents[0], ext(0, CLUSTER, Source::File { layer: 0, offset: 3 * CLUSTER }));
        assert_eq!(m.extents.last(), Some(&ext(per_l1(), per_l1(), Source::Export)));
        // An L2 table outside the file.
        let mut far = image(CLUSTER, &[]);
        far[CLUSTER as usize..CLUSTER as usize + 8].copy_from_slice(&(64 * CLUSTER).to_be_bytes());
        assert_eq!(qcow2(&far[..]).unwrap().unwrap().map.extents, vec![ext(0, CLUSTER, Source::Export)]);
        // A backing file of a format QEMU would probe, encryption, an external data file,
        // the corrupt flag, subclusters: QEMU reads the whole image.
        let mut probe = image(CLUSTER, &[]);
        probe[8..16].copy_from_slice(&4096u64.to_be_bytes());
        probe[16..20].copy_from_slice(&4u32.to_be_bytes());
        probe[4096..4100].copy_from_slice(b"base");
        assert_eq!(qcow2(&probe[..]), Ok(None));
        for (at, value) in [(32, 1u64 << 32), (72, 1 << 2), (72, 1 << 1), (72, 1 << 4)] {
            let mut i = image(CLUSTER, &[]);
            i[at..at + 8].copy_from_slice(&value.to_be_bytes());
            assert_eq!(qcow2(&i[..]), Ok(None), "field at {at} = {value:#x}");
        }
    }

    #[test]
    fn a_backing_file_with_its_format_gets_the_unallocated_clusters() {
        let mut img = image(4 * CLUSTER, &[(1, 3 * CLUSTER), (2, 1)]);
        img.resize(4 * CLUSTER as usize, 0);
        img[8..16].copy_from_slice(&4096u64.to_be_bytes());
        img[16..20].copy_from_slice(&8u32.to_be_bytes());
        img[4096..4104].copy_from_slice(b"base.img");
        img[104..108].copy_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
        img[108..112].copy_from_slice(&5u32.to_be_bytes());
        img[112..117].copy_from_slice(b"qcow2");
        let q = qcow2(&img[..]).unwrap().unwrap();
        assert_eq!(q.backing, Some(Backing { name: b"base.img".to_vec(), format: b"qcow2".to_vec() }));
        // Cluster 0 and 3 are unallocated; 2 has the zero flag, which hides the backing file.
        assert_eq!(q.from_backing, vec![(0, CLUSTER), (3 * CLUSTER, CLUSTER)]);
        // An extension that runs past the first cluster is an error.
        img[108..112].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(qcow2(&img[..]).unwrap_err().contains("past the first cluster"));
    }

    #[test]
    fn impossible_headers_are_errors() {
        let err = |img: &[u8]| qcow2(img).unwrap_err();
        assert!(err(&[0u8; 100]).contains("magic"));
        assert!(err(b"QFI\xfb").contains("past the end"));
        let mut bits = image(CLUSTER, &[]);
        bits[20..24].copy_from_slice(&40u32.to_be_bytes());
        assert!(err(&bits).contains("cluster_bits 40"));
        let mut small = image(CLUSTER, &[]);
        small[24..32].copy_from_slice(&(1u64 << 40).to_be_bytes());
        assert!(err(&small).contains("the L1 table has 1 entries"));
        let mut huge = image(CLUSTER, &[]);
        huge[24..32].copy_from_slice(&(1u64 << 52).to_be_bytes());
        huge[36..40].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(err(&huge).contains("more than QEMU's"));
        let mut l1 = image(CLUSTER, &[]);
        l1[40..48].copy_from_slice(&(1u64 << 50).to_be_bytes());
        assert!(err(&l1).contains("L1 table"));
    }
}
