//! Partition tables read from the first sectors of a disk, enough to tell a basic disk from
//! a Windows dynamic (LDM) one: an MBR partition of type 0x42, or a GPT entry of the LDM
//! metadata or data type. Pure functions over bytes, so they are unit tested; the bytes come
//! from [`read_head`], which reads through QEMU's own drivers (any format, any chain).

use std::path::Path;

use crate::qemu::programs::QemuProgram;
use crate::qemu::DiskFormat;
use crate::sys::{deadline, Tool, ToolError};

/// Bytes needed to see an MBR, a GPT header and 128 GPT entries (LBA 0 to 33).
pub const HEAD_BYTES: usize = 34 * 512;

const LDM_METADATA: &str = "5808c8aa-7e8f-42e0-85d2-e1e90434cfb3";
const LDM_DATA: &str = "af9b60a0-1431-4f62-bc68-3311714a69ad";
const MBR_DYNAMIC: u8 = 0x42;
const MBR_GPT_PROTECTIVE: u8 = 0xee;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Table {
    /// No MBR signature: an unpartitioned disk (a filesystem on the whole disk, or blank).
    None,
    Mbr {
        types: Vec<u8>,
    },
    Gpt {
        types: Vec<String>,
    },
}

impl Table {
    /// Why this disk is dynamic, or None if it is basic.
    pub fn dynamic_reason(&self) -> Option<String> {
        match self {
            Table::None => None,
            Table::Mbr { types } => types
                .iter()
                .position(|&t| t == MBR_DYNAMIC)
                .map(|i| format!("MBR partition {} has type 0x42 (Windows dynamic disk)", i + 1)),
            Table::Gpt { types } => types.iter().position(|t| t == LDM_METADATA || t == LDM_DATA).map(|i| {
                let kind = if types[i] == LDM_METADATA { "metadata" } else { "data" };
                format!("GPT partition {} has the LDM {kind} type (Windows dynamic disk)", i + 1)
            }),
        }
    }
}

/// Parses the partition table from the first [`HEAD_BYTES`] of a disk (fewer is tolerated).
pub fn parse(head: &[u8]) -> Table {
    if head.len() < 512 || head[510] != 0x55 || head[511] != 0xaa {
        return Table::None;
    }
    let types: Vec<u8> = (0..4).map(|i| head[446 + i * 16 + 4]).filter(|&t| t != 0).collect();
    if types.contains(&MBR_GPT_PROTECTIVE) {
        if let Some(gpt) = parse_gpt(head) {
            return gpt;
        }
    }
    Table::Mbr { types }
}

fn le32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn le64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

fn parse_gpt(head: &[u8]) -> Option<Table> {
    let hdr = head.get(512..1024)?;
    if &hdr[0..8] != b"EFI PART" {
        return None;
    }
    let entries_lba = le64(hdr, 72)?;
    let count = le32(hdr, 80)? as usize;
    let size = le32(hdr, 84)? as usize;
    if size < 128 || entries_lba == 0 {
        return None;
    }
    let start = usize::try_from(entries_lba).ok()?.checked_mul(512)?;
    let mut types = Vec::new();
    for i in 0..count.min(128) {
        let Some(e) = start.checked_add(i * size).and_then(|o| head.get(o..o + 16)) else { break };
        if e.iter().all(|&b| b == 0) {
            continue;
        }
        types.push(guid(e));
    }
    Some(Table::Gpt { types })
}

/// A GPT GUID in its usual text form (the first three fields are little-endian).
fn guid(b: &[u8]) -> String {
    format!(
        "{:08x}-{:04x}-{:04x}-{:02x}{:02x}-{}",
        u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        u16::from_le_bytes([b[4], b[5]]),
        u16::from_le_bytes([b[6], b[7]]),
        b[8],
        b[9],
        hex::encode(&b[10..16])
    )
}

/// Writes a GUID in GPT's on-disk byte order.
pub fn guid_bytes(text: &str) -> [u8; 16] {
    let hexs: String = text.chars().filter(|c| *c != '-').collect();
    let raw = hex::decode(hexs).expect("a well-formed GUID");
    let mut out = [0u8; 16];
    out[0..4].copy_from_slice(&[raw[3], raw[2], raw[1], raw[0]]);
    out[4..6].copy_from_slice(&[raw[5], raw[4]]);
    out[6..8].copy_from_slice(&[raw[7], raw[6]]);
    out[8..16].copy_from_slice(&raw[8..16]);
    out
}

/// An MBR with one partition of type `ptype` covering the disk after the first MiB.
pub fn mbr_with(ptype: u8, disk_bytes: u64) -> [u8; 512] {
    let mut m = [0u8; 512];
    let e = 446;
    m[e + 4] = ptype;
    m[e + 8..e + 12].copy_from_slice(&2048u32.to_le_bytes());
    let sectors = (disk_bytes / 512).saturating_sub(2048).min(u32::MAX as u64) as u32;
    m[e + 12..e + 16].copy_from_slice(&sectors.to_le_bytes());
    m[510] = 0x55;
    m[511] = 0xaa;
    m
}

/// The first [`HEAD_BYTES`] of the disk as the guest sees them, read through QEMU's block
/// layer (`qemu-io -U`, so a disk in use can be read).
pub fn read_head(path: &Path, format: DiskFormat) -> Result<Vec<u8>, ToolError> {
    read_bytes(path, format, 0, HEAD_BYTES)
}

/// `len` bytes of the disk from `offset` as the guest sees them (fewer at its end), read
/// through QEMU's block layer (`qemu-io -U`, so a disk in use can be read). For the few
/// bytes a check looks at, not for bulk reads.
pub fn read_bytes(path: &Path, format: DiskFormat, offset: u64, len: usize) -> Result<Vec<u8>, ToolError> {
    let out = Tool::new(QemuProgram::Io.path(), deadline::QEMU_IMG_METADATA)
        .args(["-U", "-r", "-f", format.driver(), "-c", &format!("read -v {offset} {len}")])
        .arg(path)
        .run()?;
    Ok(parse_hexdump(&out.stdout_text()))
}

/// Parses `qemu-io read -v` output: lines of `OFFSET:  xx xx ... (16 bytes)  ascii`.
fn parse_hexdump(text: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for line in text.lines() {
        let Some((off, rest)) = line.split_once(':') else { continue };
        if usize::from_str_radix(off.trim(), 16).is_err() {
            continue;
        }
        for tok in rest.split_whitespace().take(16) {
            match u8::from_str_radix(tok, 16) {
                Ok(b) if tok.len() == 2 => out.push(b),
                _ => break,
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpt_with(type_guid: &str) -> Vec<u8> {
        let mut d = vec![0u8; HEAD_BYTES];
        d[..512].copy_from_slice(&mbr_with(MBR_GPT_PROTECTIVE, 1 << 30));
        d[512..520].copy_from_slice(b"EFI PART");
        d[512 + 72..512 + 80].copy_from_slice(&2u64.to_le_bytes());
        d[512 + 80..512 + 84].copy_from_slice(&128u32.to_le_bytes());
        d[512 + 84..512 + 88].copy_from_slice(&128u32.to_le_bytes());
        let basic = guid_bytes("ebd0a0a2-b9e5-4433-87c0-68b6b72699c7");
        d[1024..1040].copy_from_slice(&basic);
        d[1024 + 128..1024 + 144].copy_from_slice(&guid_bytes(type_guid));
        d
    }

    #[test]
    fn blank_and_unpartitioned_disks_are_basic() {
        assert_eq!(parse(&[0u8; HEAD_BYTES]), Table::None);
        assert_eq!(parse(&[]), Table::None);
        assert!(parse(&[0u8; 100]).dynamic_reason().is_none());
    }

    #[test]
    fn mbr_type_0x42_is_dynamic() {
        let t = parse(&mbr_with(0x42, 64 << 20));
        assert_eq!(t, Table::Mbr { types: vec![0x42] });
        assert!(t.dynamic_reason().unwrap().contains("0x42"));
        assert!(parse(&mbr_with(0x83, 64 << 20)).dynamic_reason().is_none());
        assert!(parse(&mbr_with(0x07, 64 << 20)).dynamic_reason().is_none());
    }

    #[test]
    fn gpt_ldm_types_are_dynamic() {
        let t = parse(&gpt_with(LDM_METADATA));
        assert!(t.dynamic_reason().unwrap().contains("LDM metadata"), "{t:?}");
        assert!(parse(&gpt_with(LDM_DATA)).dynamic_reason().unwrap().contains("partition 2"));
        let linux = parse(&gpt_with("0fc63daf-8483-4772-8e79-3d69d8477de4"));
        assert!(linux.dynamic_reason().is_none(), "{linux:?}");
        assert!(matches!(linux, Table::Gpt { ref types } if types.len() == 2));
    }

    #[test]
    fn hostile_gpt_headers_do_not_panic() {
        let mut d = gpt_with(LDM_DATA);
        d[512 + 72..512 + 80].copy_from_slice(&u64::MAX.to_le_bytes());
        let _ = parse(&d);
        let mut d = gpt_with(LDM_DATA);
        d[512 + 84..512 + 88].copy_from_slice(&u32::MAX.to_le_bytes());
        let _ = parse(&d);
        let _ = parse(&d[..600]);
    }

    #[test]
    fn guid_round_trips() {
        assert_eq!(guid(&guid_bytes(LDM_DATA)), LDM_DATA);
    }

    #[test]
    fn hexdump_parses() {
        let text = "00000000:  eb 63 90 00 00 00 00 00 00 00 00 00 00 00 00 00  .c..............\n\
                    00000010:  01 02  ..\nread 18/18 bytes at offset 0\n";
        assert_eq!(parse_hexdump(text)[..4], [0xeb, 0x63, 0x90, 0x00]);
        assert_eq!(parse_hexdump(text).len(), 18);
    }
}
