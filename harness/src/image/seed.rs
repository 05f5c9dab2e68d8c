//! Data disks for scenarios, made on the host without root: an ext4 filesystem populated
//! with `mkfs.ext4 -d` from a staging folder, or an NTFS one made by `mkntfs` and filled by
//! `ntfscp` (ntfs-3g), then converted to the disk's format. The filesystem UUID (NTFS: the
//! volume serial number) and times are fixed where the tools allow, so the same scenario
//! makes the same disk (NTFS: the same files and serial; see [`mkfs_ntfs`]).

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::qemu_img::{self, QemuImgError};
use crate::qemu::DiskFormat;
use crate::sys::{deadline, Output, Tool, ToolError};

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Filesystem {
    #[default]
    None,
    Ext4,
    /// FAT32 (no seeded files): a filesystem that cannot be snapshotted consistently.
    Vfat,
    /// NTFS made by mkntfs (ntfs-3g), mounted in the Linux guest with ntfs3.
    Ntfs,
}

impl Filesystem {
    /// The type the guest mounts it as, if it has a filesystem.
    pub fn guest_type(self) -> Option<&'static str> {
        match self {
            Filesystem::None => None,
            Filesystem::Ext4 => Some("ext4"),
            Filesystem::Vfat => Some("vfat"),
            Filesystem::Ntfs => Some("ntfs3"),
        }
    }
}

/// A partition table written on an otherwise blank disk.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Partitioning {
    #[default]
    None,
    /// One MBR partition of type 0x42: a Windows dynamic (LDM) disk.
    MbrDynamic,
}

#[derive(Debug, Clone)]
pub struct DiskSeed {
    pub name: String,
    pub format: DiskFormat,
    pub size: u64,
    pub filesystem: Filesystem,
    pub files: BTreeMap<String, String>,
    pub partitioning: Partitioning,
}

impl DiskSeed {
    /// An unpartitioned ext4 disk with no files (add them to `files`).
    pub fn ext4(name: &str, format: DiskFormat, size: u64) -> Self {
        DiskSeed {
            name: name.to_owned(),
            format,
            size,
            filesystem: Filesystem::Ext4,
            files: BTreeMap::new(),
            partitioning: Partitioning::None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    /// Staging the disk's files or writing its image on the host failed (a full or
    /// read-only folder).
    #[error("disk {disk}: {error}")]
    Io { disk: String, error: std::io::Error },
    /// A filesystem tool ran and refused or failed; `stderr` is what it said about it.
    #[error("disk {disk}: {tool} failed: {stderr}")]
    Mkfs { disk: String, tool: &'static str, stderr: String },
    /// A filesystem tool could not run to its end: it could not start, or ran past its
    /// deadline and was killed.
    #[error("disk {disk}: {error}")]
    Tool { disk: String, error: ToolError },
    /// The raw disk could not be converted to the disk's format (qemu-img failed).
    #[error("disk {disk}: {error}")]
    Image { disk: String, error: QemuImgError },
    /// A tool the seed needs is not installed; install the named Debian package.
    #[error("disk {disk}: {tool} is not installed (Debian package {package})")]
    MissingTool { disk: String, tool: &'static str, package: &'static str },
    /// The seed asks for something this filesystem's tools cannot make.
    #[error("disk {disk}: {reason}")]
    Unsupported { disk: String, reason: String },
    /// mkntfs made a volume whose boot sectors are not as expected, so its serial number
    /// could not be set; nothing was written.
    #[error("disk {disk}: cannot set the NTFS volume serial number: {reason}")]
    BootSector { disk: String, reason: String },
}

/// Runs a filesystem tool of `package` for `seed` to its end, whatever its exit status.
fn run_tool(seed: &DiskSeed, tool: Tool, name: &'static str, package: &'static str) -> Result<Output, SeedError> {
    tool.output().map_err(|error| match &error {
        ToolError::Spawn { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            SeedError::MissingTool { disk: seed.name.clone(), tool: name, package }
        }
        _ => SeedError::Tool { disk: seed.name.clone(), error },
    })
}

/// The features of a seeded ext4, on top of mke2fs's built-in base (sparse_super,
/// large_file, filetype, resize_inode, dir_index): Debian's `ext4` feature set, which the
/// guest image's root filesystem has too (guest-images/linux/mke2fs.conf).
pub const EXT4_FEATURES: [&str; 9] =
    ["has_journal", "ext_attr", "extent", "huge_file", "flex_bg", "metadata_csum", "64bit", "dir_nlink", "extra_isize"];

/// A fixed time for every seeded filesystem (2025-01-01), so seeds are reproducible.
const SEED_TIME: &str = "1735689600";

/// Creates the disk in `dir` and returns its path.
pub fn create(dir: &Path, seed: &DiskSeed) -> Result<PathBuf, SeedError> {
    let io = |error| SeedError::Io { disk: seed.name.clone(), error };
    let img = |error| SeedError::Image { disk: seed.name.clone(), error };
    let ext = seed.format.extension();
    let path = dir.join(format!("{}.{ext}", seed.name));
    let staging = tempfile::Builder::new().prefix("seed-").tempdir_in(dir).map_err(io)?;
    let raw = if seed.format == DiskFormat::Raw { path.clone() } else { staging.path().join("disk.raw") };
    std::fs::File::create(&raw).and_then(|f| f.set_len(seed.size)).map_err(io)?;
    match seed.filesystem {
        Filesystem::None => {
            if seed.partitioning == Partitioning::MbrDynamic {
                use std::io::Write;
                let mbr = crate::image::partition::mbr_with(0x42, seed.size);
                std::fs::OpenOptions::new().write(true).open(&raw).and_then(|mut f| f.write_all(&mbr)).map_err(io)?;
            }
        }
        Filesystem::Ext4 => mkfs_ext4(seed, staging.path(), &raw)?,
        Filesystem::Ntfs => mkfs_ntfs(seed, staging.path(), &raw)?,
        Filesystem::Vfat => {
            let volid = &fixed_uuid(&seed.name)[..8];
            let label: String = seed.name.to_uppercase().chars().take(11).collect();
            let mkfs = Tool::new("mkfs.vfat", deadline::MKFS)
                .args(["-F", "32", "-i", volid, "-n", &label])
                .arg(&raw)
                .env("SOURCE_DATE_EPOCH", SEED_TIME);
            let out = run_tool(seed, mkfs, "mkfs.vfat", "dosfstools")?;
            if !out.status.success() {
                let stderr = out.stderr.trim().to_owned();
                return Err(SeedError::Mkfs { disk: seed.name.clone(), tool: "mkfs.vfat", stderr });
            }
        }
    }
    if seed.format != DiskFormat::Raw {
        qemu_img::convert(&raw, DiskFormat::Raw, &path, seed.format).map_err(img)?;
    }
    Ok(path)
}

fn mkfs_ext4(seed: &DiskSeed, staging: &Path, raw: &Path) -> Result<(), SeedError> {
    let io = |error| SeedError::Io { disk: seed.name.clone(), error };
    let root = staging.join("root");
    std::fs::create_dir(&root).map_err(io)?;
    for (rel, content) in &seed.files {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap_or(&root)).map_err(io)?;
        std::fs::write(&p, content).map_err(io)?;
    }
    let uuid = fixed_uuid(&seed.name);
    // The host's /etc/mke2fs.conf is ignored (MKE2FS_CONFIG=/dev/null), so the features,
    // block and inode sizes are given here: the same on every host, and those of a real
    // ext4 (a journal above all: without one there is no replay to prove or to rule out).
    let mkfs = Tool::new("mkfs.ext4", deadline::MKFS)
        .args(["-q", "-F", "-L", &seed.name, "-U", &uuid, "-b", "4096", "-I", "256", "-i", "16384", "-O"])
        .arg(EXT4_FEATURES.join(","))
        .arg("-E")
        // Inode tables and the journal written out now, so the guest's kernel has no lazy
        // initialisation of its own to do on the disk later (writes no one asked for).
        .arg(format!("root_owner=0:0,hash_seed={uuid},lazy_itable_init=0,lazy_journal_init=0,nodiscard"))
        .arg("-d")
        .arg(&root)
        .arg(raw)
        .env("E2FSPROGS_FAKE_TIME", SEED_TIME)
        .env("MKE2FS_CONFIG", "/dev/null");
    let out = run_tool(seed, mkfs, "mkfs.ext4", "e2fsprogs")?;
    if !out.status.success() {
        let stderr = out.stderr.trim().to_owned();
        return Err(SeedError::Mkfs { disk: seed.name.clone(), tool: "mkfs.ext4", stderr });
    }
    fix_ext4_times(seed, &root, raw)
}

/// `mkfs.ext4 -d` copies each staged file's times, ctime included, which no one can set:
/// seeds made a second apart would differ. Every seeded inode gets the fixed time instead.
fn fix_ext4_times(seed: &DiskSeed, root: &Path, raw: &Path) -> Result<(), SeedError> {
    let mut paths = vec!["/".to_owned()];
    for rel in seed.files.keys() {
        let mut at = String::new();
        for part in rel.split('/') {
            at = format!("{at}/{part}");
            if !paths.contains(&at) {
                paths.push(at.clone());
            }
        }
    }
    let cmds: String = paths
        .iter()
        .flat_map(|p| ["atime", "mtime", "ctime", "crtime"].map(|f| format!("sif \"{p}\" {f} @{SEED_TIME}\n")))
        .collect();
    let cmd_file = root.with_file_name("debugfs.cmds");
    std::fs::write(&cmd_file, cmds).map_err(|error| SeedError::Io { disk: seed.name.clone(), error })?;
    let debugfs = Tool::new("debugfs", deadline::DEBUGFS)
        .arg("-w")
        .arg("-f")
        .arg(&cmd_file)
        .arg(raw)
        .env("E2FSPROGS_FAKE_TIME", SEED_TIME);
    let out = run_tool(seed, debugfs, "debugfs", "e2fsprogs")?;
    // debugfs exits 0 even when a request fails (a path not found, the filesystem not
    // opened): its status only counts requests it does not know. So what it did is read back
    // from the image instead of taken from its words, which are only passed on to the user.
    let failed = |why: String| SeedError::Mkfs {
        disk: seed.name.clone(),
        tool: "debugfs",
        stderr: format!("{why} (debugfs said: {})", out.stderr.trim()),
    };
    if !out.status.success() {
        return Err(failed(format!("exited with {}", out.status)));
    }
    let seed_time: i64 = SEED_TIME.parse().expect("a number");
    let fs = ext4_view::Ext4::load_from_path(raw).map_err(|e| failed(format!("the filesystem cannot be read: {e}")))?;
    for p in &paths {
        let m = fs.metadata(p.as_str()).map_err(|e| failed(format!("{p}: {e}")))?;
        // ext4-view does not show ctime; it is set by the same request line as the three it
        // shows, so a path whose request failed shows in these.
        let times = [Some(m.accessed()), Some(m.modified()), m.created()];
        if times.iter().any(|t| t.is_none_or(|t| t.seconds() != seed_time)) {
            return Err(failed(format!("{p} kept times other than {SEED_TIME}")));
        }
    }
    Ok(())
}

/// NTFS through ntfs-3g's tools, none of which needs root or a mount:
///
/// - `mkntfs -T` ("zero time") makes a volume whose every byte depends only on its size and
///   label (it also seeds mkntfs's random numbers with that time, so the serial and GUIDs are
///   fixed); the serial number is then replaced by one derived from the disk's name
///   ([`set_ntfs_serial`]), so two disks differ as their ext4 or FAT counterparts do;
/// - each file is copied into the root folder by `ntfscp -t` (modification time from the
///   staging file, set to [`SEED_TIME`]). ntfscp stamps the other three NTFS times with the
///   current time, so a seeded NTFS disk is reproducible in its files, names, sizes, content
///   and serial (its manifest), not byte for byte.
///
/// Files in subfolders are refused: ntfs-3g makes folders only through its FUSE driver,
/// which needs root (or a setuid helper) and `/dev/fuse`.
fn mkfs_ntfs(seed: &DiskSeed, staging: &Path, raw: &Path) -> Result<(), SeedError> {
    let io = |error| SeedError::Io { disk: seed.name.clone(), error };
    // Checked before anything is made, so a bad seed fails fast and names the file.
    let mut folded = BTreeSet::new();
    for name in seed.files.keys() {
        check_ntfs_name(name).map_err(|reason| SeedError::Unsupported { disk: seed.name.clone(), reason })?;
        // ntfs-3g looks names up ignoring case, so "A.txt" would overwrite "a.txt".
        if !folded.insert(name.to_lowercase()) {
            return Err(SeedError::Unsupported {
                disk: seed.name.clone(),
                reason: format!("file {name:?} differs from another only in case, which NTFS names do not tell apart"),
            });
        }
    }
    let mkntfs = ntfs_tool(seed, "mkntfs")?;
    // -Q: no zeroing or bad-sector scan; -F: the target is a file, not a block device;
    // -s, -p, -H, -S: the sector size and BIOS geometry mkntfs cannot ask a file for (it
    // would guess these same values and warn about each); a data disk is never booted.
    let make = Tool::new(mkntfs, deadline::MKFS)
        .args(["-Q", "-F", "-q", "-T", "-s", "512", "-p", "0", "-H", "0", "-S", "0", "-L", &seed.name])
        .arg(raw);
    let out = run_tool(seed, make, "mkntfs", "ntfs-3g")?;
    if !out.status.success() {
        // Left out: its notes that the target is a file, which -F asked for.
        let stderr = out
            .stderr
            .lines()
            .filter(|l| !l.ends_with("is not a block device.") && *l != "mkntfs forced anyway.")
            .collect::<Vec<_>>()
            .join("\n");
        return Err(SeedError::Mkfs { disk: seed.name.clone(), tool: "mkntfs", stderr });
    }
    set_ntfs_serial(raw, ntfs_serial(&seed.name))
        .map_err(|reason| SeedError::BootSector { disk: seed.name.clone(), reason })?;
    if seed.files.is_empty() {
        return Ok(());
    }
    let ntfscp = ntfs_tool(seed, "ntfscp")?;
    let src = staging.join("file");
    let seed_time = std::time::UNIX_EPOCH + std::time::Duration::from_secs(SEED_TIME.parse().expect("a number"));
    for (name, content) in &seed.files {
        std::fs::write(&src, content).map_err(io)?;
        std::fs::File::options().write(true).open(&src).and_then(|f| f.set_modified(seed_time)).map_err(io)?;
        let copy = Tool::new(&ntfscp, deadline::MKFS).args(["-q", "-t"]).arg(raw).arg(&src).arg(name);
        let out = run_tool(seed, copy, "ntfscp", "ntfs-3g")?;
        if !out.status.success() {
            let stderr = format!("{name}: {}", out.stderr.trim());
            return Err(SeedError::Mkfs { disk: seed.name.clone(), tool: "ntfscp", stderr });
        }
    }
    Ok(())
}

/// Why a seed file's name cannot be copied into an NTFS root folder by ntfscp, if it cannot.
fn check_ntfs_name(name: &str) -> Result<(), String> {
    if name.contains('/') {
        return Err(format!(
            "file {name:?} is in a subfolder: NTFS disks are seeded with ntfscp (ntfs-3g), which cannot \
             make folders without mounting the volume (FUSE, as root); put the file in the root folder, \
             or make the folder from the guest"
        ));
    }
    if name.is_empty() || name == "." || name == ".." {
        return Err(format!("file name {name:?} is not a file name"));
    }
    // The system files ($MFT, $Bitmap, ...) live in the root folder: ntfscp would overwrite them.
    if name.starts_with('$') {
        return Err(format!("file {name:?}: names starting with $ are NTFS system files in the root folder"));
    }
    // NTFS names are at most 255 UTF-16 units; these characters are not allowed by Windows.
    if name.encode_utf16().count() > 255 || name.chars().any(|c| c < ' ' || "\\:*?\"<>|".contains(c)) {
        return Err(format!("file {name:?} is not a valid Windows file name"));
    }
    Ok(())
}

/// An ntfs-3g tool, found on PATH or in the sbin folders (mkntfs and ntfscp are installed in
/// /usr/sbin, which is not on an ordinary user's PATH on Debian).
fn ntfs_tool(seed: &DiskSeed, tool: &'static str) -> Result<PathBuf, SeedError> {
    let on_path = std::env::var_os("PATH").into_iter().flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>());
    on_path
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(tool))
        .find(|p| p.is_file())
        .ok_or(SeedError::MissingTool { disk: seed.name.clone(), tool, package: "ntfs-3g" })
}

/// The NTFS volume serial number for a disk: the first 64 bits of its [`fixed_uuid`], so
/// blkid shows the same hex digits as that UUID starts with.
fn ntfs_serial(name: &str) -> u64 {
    let hex = fixed_uuid(name).replace('-', "");
    u64::from_str_radix(&hex[..16], 16).expect("fixed_uuid is hex")
}

/// Where the NTFS boot sector keeps the volume serial number (8 bytes, little-endian).
const NTFS_SERIAL_AT: usize = 0x48;

/// Writes `serial` into the NTFS boot sector of the volume in `raw` and into its backup copy.
/// mkntfs has no option for it. The boot sector (NTFS's BIOS parameter block) holds the OEM
/// id "NTFS    " at 3, bytes per sector at 0x0B (u16) and the volume's sector count at 0x28
/// (u64); mkntfs keeps the device's last sector out of that count and writes the backup boot
/// sector there, its last 512 bytes (`(count + 1) * bytes_per_sector - 512`). Neither copy
/// has a checksum over the serial (the field at 0x50 is unused and zero). The backup must
/// be identical to the primary before it is changed, or nothing is written.
fn set_ntfs_serial(raw: &Path, serial: u64) -> Result<(), String> {
    let f = std::fs::OpenOptions::new().read(true).write(true).open(raw).map_err(|e| e.to_string())?;
    let len = f.metadata().map_err(|e| e.to_string())?.len();
    let mut boot = [0u8; 512];
    f.read_exact_at(&mut boot, 0).map_err(|e| format!("reading the boot sector: {e}"))?;
    if &boot[3..11] != b"NTFS    " {
        return Err("the boot sector has no NTFS signature".into());
    }
    let bytes_per_sector = u64::from(u16::from_le_bytes([boot[0x0B], boot[0x0C]]));
    let sectors = u64::from_le_bytes(boot[0x28..0x30].try_into().expect("8 bytes"));
    let backup_at = sectors
        .checked_add(1)
        .and_then(|n| n.checked_mul(bytes_per_sector))
        .and_then(|end| end.checked_sub(512))
        .filter(|at| *at >= 512 && at + 512 <= len)
        .ok_or_else(|| format!("the boot sector's size ({sectors} sectors of {bytes_per_sector} bytes) does not fit the {len}-byte volume"))?;
    let mut backup = [0u8; 512];
    f.read_exact_at(&mut backup, backup_at).map_err(|e| format!("reading the backup boot sector: {e}"))?;
    if backup != boot {
        return Err(format!("no backup boot sector equal to the primary one at byte {backup_at}"));
    }
    let bytes = serial.to_le_bytes();
    for at in [0, backup_at] {
        f.write_all_at(&bytes, at + NTFS_SERIAL_AT as u64)
            .map_err(|e| format!("writing the serial at byte {at}: {e}"))?;
    }
    Ok(())
}

/// A UUID derived from the disk's name.
fn fixed_uuid(name: &str) -> String {
    let h = Sha256::digest(format!("quiesce-seed:{name}").as_bytes());
    let x = hex::encode(&h[..16]);
    format!("{}-{}-4{}-8{}-{}", &x[0..8], &x[8..12], &x[13..16], &x[17..20], &x[20..32])
}

#[cfg(test)]
mod tests;
