//! Data disks for scenarios, made on the host without root: an ext4 filesystem populated
//! with `mkfs.ext4 -d` from a staging folder, then converted to the disk's format. The
//! filesystem UUID and times are fixed, so the same scenario makes the same disk.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::qemu_img::{self, QemuImgError};
use crate::qemu::DiskFormat;

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Filesystem {
    #[default]
    None,
    Ext4,
    /// FAT32 (no seeded files): a filesystem that cannot be snapshotted consistently.
    Vfat,
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

#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    #[error("disk {disk}: {error}")]
    Io { disk: String, error: std::io::Error },
    #[error("disk {disk}: {tool} failed: {stderr}")]
    Mkfs { disk: String, tool: &'static str, stderr: String },
    #[error("disk {disk}: {error}")]
    Image { disk: String, error: QemuImgError },
}

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
        Filesystem::Vfat => {
            let volid = &fixed_uuid(&seed.name)[..8];
            let out = Command::new("mkfs.vfat")
                .args(["-F", "32", "-i", volid, "-n", &seed.name.to_uppercase().chars().take(11).collect::<String>()])
                .arg(&raw)
                .env("SOURCE_DATE_EPOCH", SEED_TIME)
                .output()
                .map_err(|e| SeedError::Mkfs {
                    disk: seed.name.clone(),
                    tool: "mkfs.vfat (dosfstools)",
                    stderr: e.to_string(),
                })?;
            if !out.status.success() {
                let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
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
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", &seed.name, "-U", &uuid, "-E"])
        .arg(format!("root_owner=0:0,hash_seed={uuid}"))
        .arg("-d")
        .arg(&root)
        .arg(raw)
        .env("E2FSPROGS_FAKE_TIME", SEED_TIME)
        .env("MKE2FS_CONFIG", "/dev/null")
        .output()
        .map_err(io)?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        return Err(SeedError::Mkfs { disk: seed.name.clone(), tool: "mkfs.ext4", stderr });
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
mod tests {
    use super::*;

    #[test]
    fn dynamic_and_vfat_disks() {
        let dir = tempfile::tempdir().unwrap();
        let mut seed = DiskSeed {
            name: "ldm".into(),
            format: DiskFormat::Qcow2,
            size: 8 << 20,
            filesystem: Filesystem::None,
            files: Default::default(),
            partitioning: Partitioning::MbrDynamic,
        };
        let p = create(dir.path(), &seed).unwrap();
        let head = crate::image::partition::read_head(&p, DiskFormat::Qcow2).unwrap();
        assert!(crate::image::partition::parse(&head).dynamic_reason().is_some());
        seed.name = "usb".into();
        seed.partitioning = Partitioning::None;
        seed.filesystem = Filesystem::Vfat;
        seed.size = 40 << 20;
        let p = create(dir.path(), &seed).unwrap();
        let head = crate::image::partition::read_head(&p, DiskFormat::Qcow2).unwrap();
        assert_eq!(&head[82..87], b"FAT32");
    }

    #[test]
    fn uuid_is_stable_and_well_formed() {
        let u = fixed_uuid("data");
        assert_eq!(u, fixed_uuid("data"));
        assert_ne!(u, fixed_uuid("other"));
        assert_eq!(u.len(), 36);
        assert_eq!(u.split('-').map(str::len).collect::<Vec<_>>(), vec![8, 4, 4, 4, 12]);
    }

    #[test]
    fn seeded_ext4_disks_are_reproducible_in_every_format() {
        let dir = tempfile::tempdir().unwrap();
        for format in [DiskFormat::Raw, DiskFormat::Qcow2, DiskFormat::Vpc, DiskFormat::Vhdx] {
            let seed = DiskSeed {
                name: "data".into(),
                format,
                size: 16 << 20,
                filesystem: Filesystem::Ext4,
                files: [("a/b.txt".to_owned(), "hello\n".to_owned())].into(),
                partitioning: Partitioning::None,
            };
            let a = dir.path().join("a");
            let b = dir.path().join("b");
            std::fs::create_dir_all(&a).unwrap();
            std::fs::create_dir_all(&b).unwrap();
            let pa = create(&a, &seed).unwrap();
            let pb = create(&b, &seed).unwrap();
            assert!(qemu_img::identical(&pa, format, &pb, format).unwrap(), "{format:?}");
            assert!(qemu_img::virtual_size(&pa).unwrap() >= 16 << 20);
            std::fs::remove_dir_all(&a).unwrap();
            std::fs::remove_dir_all(&b).unwrap();
        }
    }
}
