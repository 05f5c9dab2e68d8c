//! The state a filesystem was left in, read from its own metadata: whether it was quiesced
//! (frozen or cleanly unmounted) when its image was taken, or would need a replay of its
//! journal to be mounted.
//!
//! - **ext4**: the superblock's `needs_recovery` flag (INCOMPAT_RECOVER) and the start of
//!   the journal's log (`s_start` in the jbd2 superblock, 0 when the log is empty). A mounted
//!   ext4 keeps `needs_recovery` set on disk while it is mounted; `ext4_freeze` flushes the
//!   journal (which empties the log) and clears it before the filesystem is frozen, and an
//!   unmount does the same. So a snapshot of a frozen ext4 has both clear, and a copy of a
//!   live one has the flag set.
//! - **NTFS**: the dirty flag of `$Volume` (`$VOLUME_INFORMATION`). It means "chkdsk is
//!   due", not "in use": ntfs-3g never sets it while a volume is mounted (measured; see
//!   `tests/host/manifest.rs`), so it cannot tell a live copy from a quiesced one. The state of
//!   `$LogFile` (its restart area), which could, is not read: the `ntfs` crate does not
//!   parse it. NTFS quiescence is therefore not checked.
//!
//! The bytes are untrusted: every offset is bounded by the volume ([`Window`]) and every
//! number is checked before it is used; damage is an error that says what was damaged.

use ntfs::structured_values::NtfsVolumeFlags;
use ntfs::Ntfs;

use super::Window;

/// What the superblock and journal of an ext2/3/4 volume say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ext4State {
    /// The names of the features set, of those this reader knows (see [`FEATURES`]), in
    /// the order of that table.
    pub features: Vec<&'static str>,
    /// INCOMPAT_RECOVER: the journal must be replayed before the filesystem is mounted.
    pub needs_recovery: bool,
    /// `s_state`: bit 0 "cleanly unmounted or mounted clean", bit 1 "errors detected".
    pub state: u16,
    pub journal: Journal,
    /// The block size, in bytes.
    pub block_size: u64,
}

/// The journal of an ext volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Journal {
    /// No journal (ext2): nothing tells a frozen filesystem from a live one.
    None,
    /// A journal on another device, which is not in this image.
    External,
    /// The journal inside the filesystem: where its log starts (0 when it is empty, so
    /// nothing is left to replay) and the sequence number of its next transaction.
    Internal { start: u32, sequence: u32 },
}

/// Whether an ext volume was quiesced when its image was taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Quiesced {
    /// `needs_recovery` clear and the journal's log empty: frozen or unmounted cleanly.
    Clean,
    /// A replay of the journal is needed: `why` says what shows it.
    NeedsReplay { why: String },
    /// It cannot be told: the volume has no journal in this image.
    Unknown { why: String },
}

impl Ext4State {
    /// Whether feature `name` (as mke2fs calls it) is set.
    pub fn has(&self, name: &str) -> bool {
        self.features.contains(&name)
    }

    /// Whether the volume was quiesced, from its superblock and journal.
    pub fn quiesced(&self) -> Quiesced {
        match (self.needs_recovery, self.journal) {
            (_, Journal::None) => Quiesced::Unknown { why: "no journal".into() },
            (_, Journal::External) => Quiesced::Unknown { why: "its journal is on another device".into() },
            (true, Journal::Internal { start, .. }) => {
                Quiesced::NeedsReplay { why: format!("needs_recovery is set (journal log starts at block {start})") }
            }
            (false, Journal::Internal { start: 0, .. }) => Quiesced::Clean,
            (false, Journal::Internal { start, .. }) => Quiesced::NeedsReplay {
                why: format!("needs_recovery is clear, but the journal's log is not empty (starts at block {start})"),
            },
        }
    }
}

/// The ext feature bits this reader names: (field, bit, name as mke2fs spells it).
pub const FEATURES: &[(Field, u32, &str)] = &[
    (Field::Compat, 0x4, "has_journal"),
    (Field::Compat, 0x8, "ext_attr"),
    (Field::Compat, 0x10, "resize_inode"),
    (Field::Compat, 0x20, "dir_index"),
    (Field::Incompat, 0x2, "filetype"),
    (Field::Incompat, 0x4, "needs_recovery"),
    (Field::Incompat, 0x8, "journal_dev"),
    (Field::Incompat, 0x10, "meta_bg"),
    (Field::Incompat, 0x40, "extent"),
    (Field::Incompat, 0x80, "64bit"),
    (Field::Incompat, 0x100, "mmp"),
    (Field::Incompat, 0x200, "flex_bg"),
    (Field::Incompat, 0x2000, "metadata_csum_seed"),
    (Field::Incompat, 0x4000, "large_dir"),
    (Field::Incompat, 0x8000, "inline_data"),
    (Field::Incompat, 0x10000, "encrypt"),
    (Field::RoCompat, 0x1, "sparse_super"),
    (Field::RoCompat, 0x2, "large_file"),
    (Field::RoCompat, 0x8, "huge_file"),
    (Field::RoCompat, 0x10, "uninit_bg"),
    (Field::RoCompat, 0x20, "dir_nlink"),
    (Field::RoCompat, 0x40, "extra_isize"),
    (Field::RoCompat, 0x400, "metadata_csum"),
    (Field::RoCompat, 0x10000, "orphan_present"),
];

/// The superblock field a feature bit lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    Compat,
    Incompat,
    RoCompat,
}

const INCOMPAT_RECOVER: u32 = 0x4;
const INCOMPAT_JOURNAL_DEV: u32 = 0x8;
const INCOMPAT_64BIT: u32 = 0x80;
const COMPAT_HAS_JOURNAL: u32 = 0x4;
const EXTENTS_FL: u32 = 0x80000;
const EXTENT_MAGIC: u16 = 0xF30A;
const JBD2_MAGIC: u32 = 0xC03B_3998;
/// An extent tree deeper than this is damage (the kernel allows 5 levels).
const MAX_DEPTH: u16 = 5;

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// Reads `len` bytes at byte `at` of the volume, naming `what` if that fails.
fn read(w: &Window, at: u64, len: usize, what: &str) -> Result<Vec<u8>, String> {
    let mut buf = vec![0u8; len];
    w.read_at(at, &mut buf).map_err(|e| format!("could not read {what}: {e}"))?;
    Ok(buf)
}

/// The byte offset of block `block`, if it lies inside the volume.
fn block_at(w: &Window, block: u64, block_size: u64, what: &str) -> Result<u64, String> {
    block
        .checked_mul(block_size)
        .filter(|&at| at.checked_add(block_size).is_some_and(|end| end <= w.len()))
        .ok_or_else(|| format!("{what} (block {block}) lies past the end of the volume: the filesystem is damaged"))
}

/// Reads the state of the ext2/3/4 filesystem in `w`.
pub fn ext4(w: &Window) -> Result<Ext4State, String> {
    let sb = read(w, 1024, 1024, "the superblock")?;
    if le16(&sb, 0x38) != 0xEF53 {
        return Err("no ext2/3/4 superblock (bad magic)".into());
    }
    let log = le32(&sb, 0x18);
    if log > 6 {
        return Err(format!("the superblock is damaged (block size 2^{} bytes)", u64::from(log) + 10));
    }
    let block_size = 1024u64 << log;
    let (compat, incompat, ro) = (le32(&sb, 0x5C), le32(&sb, 0x60), le32(&sb, 0x64));
    let features = FEATURES
        .iter()
        .filter(|(field, bit, _)| {
            let v = match field {
                Field::Compat => compat,
                Field::Incompat => incompat,
                Field::RoCompat => ro,
            };
            v & bit != 0
        })
        .map(|(_, _, name)| *name)
        .collect();
    let journal = if compat & COMPAT_HAS_JOURNAL == 0 {
        Journal::None
    } else if le32(&sb, 0xE4) != 0 || incompat & INCOMPAT_JOURNAL_DEV != 0 {
        Journal::External
    } else {
        let ino = le32(&sb, 0xE0);
        let first = journal_block(w, &sb, block_size, incompat, ino)?;
        let at = block_at(w, first, block_size, "the journal's superblock")?;
        let jsb = read(w, at, 1024, "the journal's superblock")?;
        if be32(&jsb, 0) != JBD2_MAGIC || !matches!(be32(&jsb, 4), 3 | 4) {
            return Err(format!("inode {ino} holds no journal superblock: the filesystem is damaged"));
        }
        Journal::Internal { start: be32(&jsb, 0x1C), sequence: be32(&jsb, 0x18) }
    };
    Ok(Ext4State {
        features,
        needs_recovery: incompat & INCOMPAT_RECOVER != 0,
        state: le16(&sb, 0x3A),
        journal,
        block_size,
    })
}

/// The physical block holding logical block 0 of the journal's inode `ino`.
fn journal_block(w: &Window, sb: &[u8], block_size: u64, incompat: u32, ino: u32) -> Result<u64, String> {
    let ipg = le32(sb, 0x28);
    if ino == 0 || ipg == 0 {
        return Err(format!("the superblock is damaged (journal inode {ino}, {ipg} inodes per group)"));
    }
    let group = u64::from((ino - 1) / ipg);
    let index = u64::from((ino - 1) % ipg);
    let rev = le32(sb, 0x4C);
    let inode_size = if rev == 0 { 128 } else { u64::from(le16(sb, 0x58)) };
    let desc_size = if incompat & INCOMPAT_64BIT != 0 { u64::from(le16(sb, 0xFE)) } else { 32 };
    if !(128..=block_size).contains(&inode_size) || !(32..=1024).contains(&desc_size) {
        return Err(format!("the superblock is damaged (inodes of {inode_size} bytes, descriptors of {desc_size})"));
    }
    // The descriptor table starts in the block after the superblock's.
    let gdt = u64::from(le32(sb, 0x14)) + 1;
    let gdt_at = block_at(w, gdt, block_size, "the group descriptor table")?;
    let desc_at = group
        .checked_mul(desc_size)
        .and_then(|o| o.checked_add(gdt_at))
        .ok_or("the group descriptor table is damaged")?;
    let desc = read(w, desc_at, desc_size as usize, "a group descriptor")?;
    let mut table = u64::from(le32(&desc, 0x8));
    if desc_size >= 64 {
        table |= u64::from(le32(&desc, 0x28)) << 32;
    }
    let table_at = block_at(w, table, block_size, "the journal inode's table")?;
    let inode_at = index.checked_mul(inode_size).and_then(|o| o.checked_add(table_at)).ok_or("damaged inode table")?;
    let inode = read(w, inode_at, 128, "the journal's inode")?;
    let i_block = &inode[0x28..0x28 + 60];
    if le32(&inode, 0x20) & EXTENTS_FL == 0 {
        // Block map: the first of the twelve direct pointers.
        return Ok(u64::from(le32(i_block, 0)));
    }
    let mut node = i_block.to_vec();
    for _ in 0..=MAX_DEPTH {
        if le16(&node, 0) != EXTENT_MAGIC {
            return Err("the journal's extent tree is damaged (bad magic)".into());
        }
        let entries = usize::from(le16(&node, 2));
        let depth = le16(&node, 6);
        if depth > MAX_DEPTH || 12 + entries * 12 > node.len() || entries == 0 {
            return Err("the journal's extent tree is damaged".into());
        }
        // The entries are sorted by logical block; the first covers block 0 of a journal.
        let e = &node[12..24];
        if depth == 0 {
            if le32(e, 0) != 0 {
                return Err("the journal does not start at its first block".into());
            }
            return Ok(u64::from(le32(e, 8)) | (u64::from(le16(e, 6)) << 32));
        }
        let leaf = u64::from(le32(e, 4)) | (u64::from(le16(e, 8)) << 32);
        let at = block_at(w, leaf, block_size, "a block of the journal's extent tree")?;
        node = read(w, at, block_size as usize, "a block of the journal's extent tree")?;
    }
    Err("the journal's extent tree is deeper than any ext4 makes".into())
}

/// What `$Volume` of an NTFS volume says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NtfsState {
    /// The volume is marked for chkdsk (damage was seen, or it is being repaired).
    pub dirty: bool,
    pub version: (u8, u8),
}

/// Reads the state of the NTFS volume in `w`.
pub fn ntfs(mut w: Window) -> Result<NtfsState, String> {
    let fs = Ntfs::new(&mut w).map_err(|e| format!("the filesystem is damaged ({e})"))?;
    let info = fs.volume_info(&mut w).map_err(|e| format!("$Volume could not be read ({e})"))?;
    Ok(NtfsState {
        dirty: info.flags().contains(NtfsVolumeFlags::IS_DIRTY),
        version: (info.major_version(), info.minor_version()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(needs_recovery: bool, journal: Journal) -> Ext4State {
        Ext4State { features: vec![], needs_recovery, state: 1, journal, block_size: 4096 }
    }

    #[test]
    fn quiesced_reads_the_flag_and_the_log() {
        let clean = Journal::Internal { start: 0, sequence: 7 };
        let busy = Journal::Internal { start: 12, sequence: 7 };
        assert_eq!(state(false, clean).quiesced(), Quiesced::Clean);
        assert!(matches!(state(true, clean).quiesced(), Quiesced::NeedsReplay { .. }));
        assert!(matches!(state(true, busy).quiesced(), Quiesced::NeedsReplay { .. }));
        let Quiesced::NeedsReplay { why } = state(false, busy).quiesced() else { panic!() };
        assert!(why.contains("not empty"), "{why}");
        assert!(matches!(state(false, Journal::None).quiesced(), Quiesced::Unknown { .. }));
    }

    fn window(bytes: &[u8]) -> Window {
        let mut f = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut f, bytes).unwrap();
        Window::new(std::sync::Arc::new(f), 0, bytes.len() as u64)
    }

    /// A superblock with the magic, 4 KiB blocks, a journal in inode 8, and `fill` elsewhere.
    fn superblock(fill: impl FnMut(usize) -> u8) -> Vec<u8> {
        let mut bytes: Vec<u8> = (0..64 << 10).map(fill).collect();
        let mut put = |at: usize, v: &[u8]| bytes[1024 + at..1024 + at + v.len()].copy_from_slice(v);
        put(0x38, &0xEF53u16.to_le_bytes());
        put(0x18, &2u32.to_le_bytes());
        put(0x5C, &COMPAT_HAS_JOURNAL.to_le_bytes());
        put(0x60, &0u32.to_le_bytes());
        put(0xE4, &0u32.to_le_bytes());
        put(0xE0, &8u32.to_le_bytes());
        bytes
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        // The journal's inode table points past the end of this 64 KiB volume.
        let mut bytes = superblock(|_| 0);
        bytes[1024 + 0x28..1024 + 0x2C].copy_from_slice(&8192u32.to_le_bytes());
        bytes[1024 + 0x4C..1024 + 0x50].copy_from_slice(&1u32.to_le_bytes());
        bytes[1024 + 0x58..1024 + 0x5A].copy_from_slice(&256u16.to_le_bytes());
        bytes[4096 + 0x8..4096 + 0xC].copy_from_slice(&1000u32.to_le_bytes());
        let e = ext4(&window(&bytes)).unwrap_err();
        assert!(e.contains("past the end of the volume"), "{e}");
        // Whatever the rest holds, an answer and never a panic.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..200 {
            let bytes = superblock(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x % 7) as u8 * 37
            });
            let _ = ext4(&window(&bytes));
        }
        assert!(ext4(&window(&[])).unwrap_err().contains("superblock"));
    }
}
