//! The backup on disk: a folder a person can read, with a manifest. It is written under a
//! temporary name beside its final path and renamed into place only when complete, so a
//! failed backup never looks like a good one; an unfinished writer removes its files.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::manifest::{Manifest, VmBackup, FORMAT_VERSION};

#[derive(Debug, thiserror::Error)]
pub enum FolderError {
    /// A file or folder of the backup could not be created, written, synced or read (a full
    /// or read-only target, missing permissions).
    #[error("backup {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// A backup is never written over another: the path is taken.
    #[error("backup {0} already exists; choose another path or remove it")]
    Exists(PathBuf),
    /// The folder has no manifest that this program can read: it is not a backup, or an
    /// unfinished or damaged one.
    #[error("{path} is not a quiesce backup (no readable manifest.json: {why})")]
    NotABackup { path: PathBuf, why: String },
    /// The backup was written by a version of quiesce with another manifest format.
    #[error("backup {path} has manifest format {found}; this quiesce reads format {FORMAT_VERSION}")]
    Version { path: PathBuf, found: u32 },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> FolderError + '_ {
    move |source| FolderError::Io { path: path.to_owned(), source }
}

/// A backup being written.
pub struct BackupWriter {
    final_path: PathBuf,
    tmp: tempfile::TempDir,
    vms: Vec<VmBackup>,
    qemu_version: String,
}

impl BackupWriter {
    pub fn create(final_path: &Path, qemu_version: &str) -> Result<Self, FolderError> {
        if final_path.exists() {
            return Err(FolderError::Exists(final_path.to_owned()));
        }
        let parent = final_path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent).map_err(io(parent))?;
        let name = final_path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "backup".into());
        let tmp =
            tempfile::Builder::new().prefix(&format!(".{name}.partial-")).tempdir_in(parent).map_err(io(parent))?;
        Ok(Self { final_path: final_path.to_owned(), tmp, vms: Vec::new(), qemu_version: qemu_version.to_owned() })
    }

    /// The (new) folder for one VM's files.
    pub fn vm_dir(&self, vm: &str) -> Result<PathBuf, FolderError> {
        let d = self.tmp.path().join("vms").join(vm);
        std::fs::create_dir_all(&d).map_err(io(&d))?;
        Ok(d)
    }

    pub fn add(&mut self, vm: VmBackup) {
        self.vms.push(vm);
    }

    /// Writes the manifest and renames the folder into place.
    pub fn commit(self) -> Result<Backup, FolderError> {
        let manifest = Manifest {
            format_version: FORMAT_VERSION,
            quiesce_version: env!("CARGO_PKG_VERSION").to_owned(),
            qemu_version: self.qemu_version,
            created_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            vms: self.vms,
        };
        let mpath = self.tmp.path().join("manifest.json");
        let json = serde_json::to_vec_pretty(&manifest).expect("plain data encodes");
        std::fs::write(&mpath, json).map_err(io(&mpath))?;
        // QEMU does not fsync a `file:` migration, and qemu-img need not either: everything
        // is made durable here, before the rename makes the backup look complete.
        sync_tree(self.tmp.path())?;
        let tmp = self.tmp.keep();
        if let Err(e) = std::fs::rename(&tmp, &self.final_path) {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(FolderError::Io { path: self.final_path, source: e });
        }
        if let Some(parent) = self.final_path.parent().filter(|p| !p.as_os_str().is_empty()) {
            File::open(parent).and_then(|f| f.sync_all()).map_err(io(parent))?;
        }
        Ok(Backup { path: self.final_path, manifest })
    }
}

/// fsyncs every file and folder below `dir`, and `dir` itself.
fn sync_tree(dir: &Path) -> Result<(), FolderError> {
    for e in std::fs::read_dir(dir).map_err(io(dir))? {
        let p = e.map_err(io(dir))?.path();
        if p.is_dir() {
            sync_tree(&p)?;
        } else {
            File::open(&p).and_then(|f| f.sync_all()).map_err(io(&p))?;
        }
    }
    File::open(dir).and_then(|f| f.sync_all()).map_err(io(dir))
}

/// A finished backup.
#[derive(Debug, Clone)]
pub struct Backup {
    pub path: PathBuf,
    pub manifest: Manifest,
}

/// One file whose checksum did not match.
#[derive(Debug, Clone, PartialEq)]
pub struct Mismatch {
    pub file: PathBuf,
    pub expected: String,
    pub found: String,
}

impl Backup {
    pub fn open(path: &Path) -> Result<Backup, FolderError> {
        let mpath = path.join("manifest.json");
        let bytes =
            std::fs::read(&mpath).map_err(|e| FolderError::NotABackup { path: path.to_owned(), why: e.to_string() })?;
        let probe: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| FolderError::NotABackup { path: path.to_owned(), why: e.to_string() })?;
        let found = probe["format_version"].as_u64().unwrap_or(0) as u32;
        if found != FORMAT_VERSION {
            return Err(FolderError::Version { path: path.to_owned(), found });
        }
        let manifest = serde_json::from_value(probe)
            .map_err(|e| FolderError::NotABackup { path: path.to_owned(), why: e.to_string() })?;
        Ok(Backup { path: path.to_owned(), manifest })
    }

    pub fn vm(&self, name: &str) -> Option<&VmBackup> {
        self.manifest.vms.iter().find(|v| v.name == name)
    }

    pub fn vm_dir(&self, name: &str) -> PathBuf {
        self.path.join("vms").join(name)
    }

    /// Re-hashes every file the manifest lists; returns the ones that differ.
    pub fn verify(&self) -> Result<Vec<Mismatch>, FolderError> {
        let mut bad = Vec::new();
        for vm in &self.manifest.vms {
            let dir = self.vm_dir(&vm.name);
            let files =
                vm.disks.iter().map(|d| (&d.file, &d.sha256)).chain(vm.state.iter().map(|s| (&s.file, &s.sha256)));
            for (file, expected) in files {
                let path = dir.join(file);
                let found = match sha256_file(&path) {
                    Ok((h, _)) => h,
                    Err(e) => format!("unreadable: {e}"),
                };
                if &found != expected {
                    bad.push(Mismatch { file: path, expected: expected.clone(), found });
                }
            }
        }
        Ok(bad)
    }
}

/// The sha256 (hex) and length of a file.
pub fn sha256_file(path: &Path) -> std::io::Result<(String, u64)> {
    let mut f = File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf)?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    Ok((hex::encode(h.finalize()), n))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::manifest::DiskEntry;
    use crate::qemu::DiskFormat;

    fn vm(dir: &Path) -> VmBackup {
        std::fs::write(dir.join("d.raw"), b"disk bytes").unwrap();
        let (sha256, bytes) = sha256_file(&dir.join("d.raw")).unwrap();
        let d = DiskEntry {
            node_name: "d".into(),
            format: DiskFormat::Raw,
            virtual_size: 10,
            file: "d.raw".into(),
            bytes,
            sha256,
        };
        crate::backup::manifest::sample_vm(vec![d])
    }

    #[test]
    fn commit_renames_into_place_and_verify_catches_a_flipped_byte() {
        let root = tempfile::tempdir().unwrap();
        let path = root.path().join("b1");
        let mut w = BackupWriter::create(&path, "10.0.2").unwrap();
        let d = w.vm_dir("vm1").unwrap();
        assert!(!path.exists(), "nothing is at the final path before commit");
        w.add(vm(&d));
        let b = w.commit().unwrap();
        let reopened = Backup::open(&path).unwrap();
        assert_eq!(reopened.manifest, b.manifest);
        assert!(reopened.verify().unwrap().is_empty());
        std::fs::write(path.join("vms/vm1/d.raw"), b"disk bytez").unwrap();
        let bad = reopened.verify().unwrap();
        assert_eq!(bad.len(), 1);
        assert!(bad[0].file.ends_with("vms/vm1/d.raw"));
        assert!(BackupWriter::create(&path, "x").is_err(), "an existing backup is never overwritten");
    }

    #[test]
    fn an_abandoned_writer_leaves_nothing() {
        let root = tempfile::tempdir().unwrap();
        let w = BackupWriter::create(&root.path().join("b2"), "10.0.2").unwrap();
        std::fs::write(w.vm_dir("vm1").unwrap().join("state.bin"), b"partial").unwrap();
        drop(w);
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 0);
    }

    #[test]
    fn open_rejects_other_folders_and_versions() {
        let root = tempfile::tempdir().unwrap();
        assert!(matches!(Backup::open(root.path()), Err(FolderError::NotABackup { .. })));
        std::fs::write(root.path().join("manifest.json"), br#"{"format_version": 99}"#).unwrap();
        assert!(matches!(Backup::open(root.path()), Err(FolderError::Version { found: 99, .. })));
    }
}
