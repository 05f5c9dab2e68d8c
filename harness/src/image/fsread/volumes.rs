//! Where the filesystems of a raw disk are: the whole disk when it holds a filesystem itself
//! or has no partition table, else the partitions of its MBR (primary and logical) or GPT.
//! Like [`crate::image::partition`], this is pure code over bytes; the bytes come from a
//! `read(offset, buf)` function, so it is tested on tables built in memory. Unlike it, it
//! returns where each partition is, and refuses tables that point past the end of the disk.

use std::collections::HashSet;

/// A byte range of the disk that may hold a filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Volume {
    /// The partition number as Linux counts them (MBR: 1-4 primary, 5+ logical; GPT: the
    /// slot number), or None for the whole disk.
    pub partition: Option<u32>,
    pub offset: u64,
    pub len: u64,
}

/// What a volume's first bytes say it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Content {
    /// ext2, ext3 or ext4 (one reader handles all three).
    Ext,
    Ntfs,
    /// A filesystem or format that is recognised but not read.
    Unread(&'static str),
    /// Nothing recognised (blank, or unknown).
    Unknown,
}

/// Why a disk's partitions could not be found. The disk is not read further: a volume
/// that cannot be placed cannot be compared or trusted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VolumeError {
    /// The disk image could not be read where its partition table or a volume's first
    /// bytes are (an I/O error, or an image shorter than its header says); the system's
    /// reason follows.
    #[error("reading the partition table: {0}")]
    Read(String),
    /// A partition table entry points past the end of the disk: the image was cut short
    /// (a copy that did not finish), or the table is damaged.
    #[error(
        "partition {partition} ({start}..{end} bytes) lies past the end of the disk ({disk_len} bytes): \
         the image is truncated, or its partition table is damaged"
    )]
    OutOfBounds { partition: u32, start: u64, end: u64, disk_len: u64 },
    /// The partition table contradicts itself (a protective MBR with no GPT behind it, a
    /// chain of logical partitions that loops): the disk is not what a partitioning tool
    /// writes, and is not read.
    #[error("the partition table is damaged: {0}")]
    Damaged(String),
}

/// Reads `buf.len()` bytes at an offset of the disk.
pub type ReadAt<'a> = dyn Fn(u64, &mut [u8]) -> std::io::Result<()> + 'a;

/// Bytes read to recognise a filesystem (the NTFS boot sector, the ext superblock).
const PROBE_BYTES: usize = 4096;
const MAX_GPT_ENTRIES: u32 = 256;
const MAX_LOGICAL: usize = 128;
const EXTENDED: [u8; 3] = [0x05, 0x0f, 0x85];
const GPT_PROTECTIVE: u8 = 0xee;

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Reads up to `n` bytes at `at`, fewer if the disk ends first.
fn read_upto(read: &ReadAt, disk_len: u64, at: u64, n: usize) -> Result<Vec<u8>, VolumeError> {
    let n = usize::try_from(disk_len.saturating_sub(at)).map_or(n, |left| left.min(n));
    let mut buf = vec![0u8; n];
    read(at, &mut buf).map_err(|e| VolumeError::Read(e.to_string()))?;
    Ok(buf)
}

/// Recognises the content of the first bytes of a volume (fewer than [`PROBE_BYTES`] is fine).
pub fn recognise(head: &[u8]) -> Content {
    let at = |o: usize, s: &[u8]| head.get(o..o + s.len()) == Some(s);
    if at(3, b"NTFS    ") {
        Content::Ntfs
    } else if at(1080, &[0x53, 0xef]) {
        Content::Ext
    } else if at(82, b"FAT32   ") || at(54, b"FAT12   ") || at(54, b"FAT16   ") || at(54, b"FAT     ") {
        Content::Unread("vfat")
    } else if at(3, b"EXFAT   ") {
        Content::Unread("exfat")
    } else if at(4086, b"SWAPSPACE2") || at(4086, b"SWAP-SPACE") {
        Content::Unread("swap")
    } else if at(0, b"XFSB") {
        Content::Unread("xfs")
    } else if at(0, b"LUKS\xba\xbe") {
        Content::Unread("LUKS (encrypted)")
    } else if head.get(65536 + 64..65536 + 72) == Some(b"_BHRfS_M") {
        Content::Unread("btrfs")
    } else {
        Content::Unknown
    }
}

/// Reads the head of a volume and recognises it.
pub fn probe(read: &ReadAt, volume: &Volume) -> Result<Content, VolumeError> {
    let n = usize::try_from(volume.len).map_or(PROBE_BYTES, |l| l.min(PROBE_BYTES));
    let mut head = vec![0u8; n];
    read(volume.offset, &mut head).map_err(|e| VolumeError::Read(e.to_string()))?;
    Ok(recognise(&head))
}

/// The volumes of a disk of `disk_len` bytes.
pub fn find(read: &ReadAt, disk_len: u64) -> Result<Vec<Volume>, VolumeError> {
    let whole = Volume { partition: None, offset: 0, len: disk_len };
    let head = read_upto(read, disk_len, 0, PROBE_BYTES)?;
    // A filesystem on the whole disk comes first: an NTFS or FAT boot sector ends in 55 aa
    // too, and what sits where an MBR's table would be is boot code.
    if recognise(&head) != Content::Unknown || head.len() < 512 || head[510..512] != [0x55, 0xaa] {
        return Ok(vec![whole]);
    }
    let entries = mbr_entries(&head[..512]);
    let Some(entries) = entries else { return Ok(vec![whole]) };
    if entries.iter().any(|e| e.ptype == GPT_PROTECTIVE) {
        for sector in [512u64, 4096] {
            if let Some(v) = gpt(read, disk_len, sector)? {
                return Ok(v);
            }
        }
        return Err(VolumeError::Damaged("the MBR is protective (GPT), but there is no GPT header".into()));
    }
    let mut out = Vec::new();
    for e in &entries {
        if e.ptype == 0 || e.sectors == 0 {
            continue;
        }
        let vol = bounded(e.number, u64::from(e.start) * 512, u64::from(e.sectors) * 512, disk_len)?;
        if EXTENDED.contains(&e.ptype) {
            logical(read, disk_len, u64::from(e.start), &mut out)?;
        } else {
            out.push(vol);
        }
    }
    out.sort_by_key(|v| v.partition);
    Ok(out)
}

fn bounded(partition: u32, start: u64, len: u64, disk_len: u64) -> Result<Volume, VolumeError> {
    match start.checked_add(len) {
        Some(end) if end <= disk_len => Ok(Volume { partition: Some(partition), offset: start, len }),
        end => Err(VolumeError::OutOfBounds { partition, start, end: end.unwrap_or(u64::MAX), disk_len }),
    }
}

struct MbrEntry {
    number: u32,
    ptype: u8,
    start: u32,
    sectors: u32,
}

/// The four entries of an MBR, or None if the status bytes say this is not a partition table.
fn mbr_entries(sector: &[u8]) -> Option<Vec<MbrEntry>> {
    let mut out = Vec::new();
    for i in 0..4 {
        let e = &sector[446 + i * 16..446 + (i + 1) * 16];
        if e[0] != 0 && e[0] != 0x80 {
            return None;
        }
        out.push(MbrEntry { number: i as u32 + 1, ptype: e[4], start: le32(e, 8), sectors: le32(e, 12) });
    }
    Some(out)
}

/// Follows the chain of extended boot records from the extended partition at `ext_start`.
fn logical(read: &ReadAt, disk_len: u64, ext_start: u64, out: &mut Vec<Volume>) -> Result<(), VolumeError> {
    let mut seen = HashSet::new();
    let mut ebr = ext_start;
    for number in 5..5 + MAX_LOGICAL as u32 {
        if !seen.insert(ebr) {
            return Err(VolumeError::Damaged(format!("the chain of logical partitions loops at sector {ebr}")));
        }
        let at = ebr.checked_mul(512).filter(|&a| a + 512 <= disk_len).ok_or_else(|| {
            VolumeError::Damaged(format!("logical partition {number}'s boot record lies past the end of the disk"))
        })?;
        let sector = read_upto(read, disk_len, at, 512)?;
        if sector[510..512] != [0x55, 0xaa] {
            return Err(VolumeError::Damaged(format!("logical partition {number}'s boot record has no signature")));
        }
        let Some(e) = mbr_entries(&sector) else {
            return Err(VolumeError::Damaged(format!("logical partition {number}'s boot record is not a table")));
        };
        if e[0].ptype != 0 && e[0].sectors != 0 {
            let start = (ebr + u64::from(e[0].start)) * 512;
            out.push(bounded(number, start, u64::from(e[0].sectors) * 512, disk_len)?);
        }
        if e[1].ptype == 0 || e[1].start == 0 {
            return Ok(());
        }
        ebr = ext_start + u64::from(e[1].start);
    }
    Err(VolumeError::Damaged(format!("more than {MAX_LOGICAL} logical partitions")))
}

/// The partitions of a GPT whose header is at LBA 1 with this sector size, or None if there
/// is no header there. The CRCs are not checked: the table is only used to find filesystems,
/// each of which is then checked by its own reader.
fn gpt(read: &ReadAt, disk_len: u64, sector: u64) -> Result<Option<Vec<Volume>>, VolumeError> {
    let hdr = read_upto(read, disk_len, sector, 512)?;
    if hdr.len() < 92 || &hdr[0..8] != b"EFI PART" {
        return Ok(None);
    }
    let entries_lba = le64(&hdr, 72);
    let count = le32(&hdr, 80);
    let size = le32(&hdr, 84);
    if !(128..=4096).contains(&size) || size % 8 != 0 {
        return Err(VolumeError::Damaged(format!("GPT entry size {size} is not valid")));
    }
    if count > MAX_GPT_ENTRIES {
        return Err(VolumeError::Damaged(format!("GPT claims {count} entries (at most {MAX_GPT_ENTRIES} are read)")));
    }
    let table_len = u64::from(count) * u64::from(size);
    let start = entries_lba.checked_mul(sector).filter(|s| s.checked_add(table_len).is_some_and(|e| e <= disk_len));
    let start =
        start.ok_or_else(|| VolumeError::Damaged("the GPT entry array lies past the end of the disk".into()))?;
    let table = read_upto(read, disk_len, start, table_len as usize)?;
    let mut out = Vec::new();
    for (i, e) in table.chunks_exact(size as usize).enumerate() {
        if e[0..16].iter().all(|&b| b == 0) {
            continue;
        }
        let number = i as u32 + 1;
        let (first, last) = (le64(e, 32), le64(e, 40));
        if last < first {
            return Err(VolumeError::Damaged(format!("GPT partition {number} ends before it starts")));
        }
        let off = first.checked_mul(sector);
        let len = (last - first).checked_add(1).and_then(|n| n.checked_mul(sector));
        match (off, len) {
            (Some(off), Some(len)) => out.push(bounded(number, off, len, disk_len)?),
            _ => {
                return Err(VolumeError::OutOfBounds { partition: number, start: first, end: u64::MAX, disk_len });
            }
        }
    }
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::partition::guid_bytes;

    fn reader(d: &[u8]) -> impl Fn(u64, &mut [u8]) -> std::io::Result<()> + '_ {
        move |at, buf| {
            let at = at as usize;
            let src = d.get(at..at + buf.len()).ok_or_else(|| std::io::Error::other("past end"))?;
            buf.copy_from_slice(src);
            Ok(())
        }
    }

    fn mbr_entry(d: &mut [u8], at: usize, slot: usize, ptype: u8, start: u32, sectors: u32) {
        let e = at + 446 + slot * 16;
        d[e + 4] = ptype;
        d[e + 8..e + 12].copy_from_slice(&start.to_le_bytes());
        d[e + 12..e + 16].copy_from_slice(&sectors.to_le_bytes());
        d[at + 510] = 0x55;
        d[at + 511] = 0xaa;
    }

    #[test]
    fn blank_and_whole_disk_filesystems() {
        let d = vec![0u8; 1 << 20];
        assert_eq!(
            find(&reader(&d), d.len() as u64).unwrap(),
            vec![Volume { partition: None, offset: 0, len: 1 << 20 }]
        );
        let mut ntfs = vec![0u8; 1 << 20];
        ntfs[3..11].copy_from_slice(b"NTFS    ");
        // Boot code where a partition table would be must not be read as one.
        ntfs[446..510].fill(0x41);
        ntfs[510] = 0x55;
        ntfs[511] = 0xaa;
        let v = find(&reader(&ntfs), ntfs.len() as u64).unwrap();
        assert_eq!(v.len(), 1);
        assert_eq!(probe(&reader(&ntfs), &v[0]).unwrap(), Content::Ntfs);
        let mut ext = vec![0u8; 1 << 20];
        ext[1080] = 0x53;
        ext[1081] = 0xef;
        assert_eq!(recognise(&ext), Content::Ext);
        assert_eq!(recognise(&[]), Content::Unknown);
    }

    #[test]
    fn mbr_primary_and_logical_partitions() {
        let mut d = vec![0u8; 8 << 20];
        mbr_entry(&mut d, 0, 0, 0x83, 2048, 2048);
        mbr_entry(&mut d, 0, 1, 0x05, 4096, 8192);
        // EBR 1 at 4096: a logical partition at +2, and the next EBR at +4096 (relative to the extended start).
        mbr_entry(&mut d, 4096 * 512, 0, 0x83, 2, 1000);
        mbr_entry(&mut d, 4096 * 512, 1, 0x05, 4096, 2000);
        mbr_entry(&mut d, 8192 * 512, 0, 0x07, 2, 500);
        let v = find(&reader(&d), d.len() as u64).unwrap();
        let got: Vec<_> = v.iter().map(|v| (v.partition.unwrap(), v.offset / 512, v.len / 512)).collect();
        assert_eq!(got, vec![(1, 2048, 2048), (5, 4098, 1000), (6, 8194, 500)]);
    }

    #[test]
    fn looping_and_truncated_tables_are_errors() {
        let mut d = vec![0u8; 4 << 20];
        mbr_entry(&mut d, 0, 0, 0x05, 2048, 4096);
        mbr_entry(&mut d, 2048 * 512, 0, 0x83, 2, 10);
        let v = find(&reader(&d), d.len() as u64).unwrap();
        assert_eq!(v.len(), 1, "a next-EBR pointer of 0 ends the chain: {v:?}");
        // EBR 2048 -> 2049 -> 2049: a loop.
        mbr_entry(&mut d, 2048 * 512, 1, 0x05, 1, 1);
        mbr_entry(&mut d, 2049 * 512, 1, 0x05, 1, 1);
        let e = find(&reader(&d), d.len() as u64).unwrap_err();
        assert!(e.to_string().contains("loops"), "{e}");
        let mut t = vec![0u8; 1 << 20];
        mbr_entry(&mut t, 0, 0, 0x83, 2048, 1 << 20);
        let e = find(&reader(&t), t.len() as u64).unwrap_err();
        assert!(matches!(e, VolumeError::OutOfBounds { partition: 1, .. }), "{e}");
        assert!(e.to_string().contains("truncated"));
        // A status byte other than 0 or 0x80 means this is no partition table.
        let mut s = t.clone();
        s[446] = 0x12;
        assert_eq!(find(&reader(&s), s.len() as u64).unwrap().len(), 1);
    }

    fn gpt_disk(first: u64, last: u64) -> Vec<u8> {
        let mut d = vec![0u8; 4 << 20];
        mbr_entry(&mut d, 0, 0, GPT_PROTECTIVE, 1, u32::MAX);
        d[512..520].copy_from_slice(b"EFI PART");
        d[512 + 72..512 + 80].copy_from_slice(&2u64.to_le_bytes());
        d[512 + 80..512 + 84].copy_from_slice(&128u32.to_le_bytes());
        d[512 + 84..512 + 88].copy_from_slice(&128u32.to_le_bytes());
        // Slot 3 (partition 3), slots 1 and 2 empty.
        let e = 1024 + 2 * 128;
        d[e..e + 16].copy_from_slice(&guid_bytes("0fc63daf-8483-4772-8e79-3d69d8477de4"));
        d[e + 32..e + 40].copy_from_slice(&first.to_le_bytes());
        d[e + 40..e + 48].copy_from_slice(&last.to_le_bytes());
        d
    }

    #[test]
    fn gpt_partitions_keep_their_slot_numbers() {
        let d = gpt_disk(2048, 4095);
        let v = find(&reader(&d), d.len() as u64).unwrap();
        assert_eq!(v, vec![Volume { partition: Some(3), offset: 2048 * 512, len: 2048 * 512 }]);
    }

    #[test]
    fn hostile_gpts_are_errors_not_panics() {
        for (first, last) in [(2048, 100_000), (4000, 10), (u64::MAX - 1, u64::MAX), (0, u64::MAX)] {
            let d = gpt_disk(first, last);
            assert!(find(&reader(&d), d.len() as u64).is_err(), "{first}..{last}");
        }
        let mut d = gpt_disk(2048, 4095);
        d[512 + 72..512 + 80].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(find(&reader(&d), d.len() as u64).is_err());
        let mut d = gpt_disk(2048, 4095);
        d[512 + 84..512 + 88].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(find(&reader(&d), d.len() as u64).is_err());
        let mut d = gpt_disk(2048, 4095);
        d[512 + 80..512 + 84].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(find(&reader(&d), d.len() as u64).is_err());
        let mut d = gpt_disk(2048, 4095);
        d[512..520].fill(0);
        assert!(find(&reader(&d), d.len() as u64).is_err(), "protective MBR with no GPT");
        assert!(find(&reader(&d[..600]), 600).is_err());
    }
}
