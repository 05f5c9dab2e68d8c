//! The backup on disk: a folder a person can read, with a manifest. It is written under a
//! temporary name beside its final path and renamed into place only when complete, so a
//! failed backup never looks like a good one; an unfinished writer removes its files.
//!
//! A backup folder is also input from elsewhere, so [`Backup::open`] trusts nothing in it:
//! the manifest is bounded, and every file it names must be a plain relative name that
//! leads to a regular file inside the folder with no symbolic link on the way ([`paths`]).
//! Every file of a VM's folder is in the manifest with its checksum; [`Backup::check`]
//! re-hashes them all and names any file the manifest does not list.

pub mod paths;
mod verify;

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::manifest::{Entry, FileEntry, Manifest, ManifestError, VmBackup, FORMAT_VERSION, MAX_MANIFEST_BYTES};
use paths::{PathProblem, Resolve};
pub use verify::{Found, Mismatch, Verification, Warning, MAX_UNEXPECTED_LISTED};

#[derive(Debug, thiserror::Error)]
pub enum FolderError {
    /// A file or folder of the backup could not be created, written, synced or read (a full
    /// or read-only target, missing permissions, a file the manifest lists that is gone).
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
    #[error(
        "backup {path} has manifest format {found}; this quiesce reads formats {} to {FORMAT_VERSION}",
        super::manifest::OLDEST_FORMAT
    )]
    Version { path: PathBuf, found: u64 },
    /// The manifest names a file by a path that could lead outside the backup's folder (an
    /// absolute path, a `..`, a symbolic link) or to something that is not a regular file.
    /// The backup is refused as a whole, and nothing was read through that path: a backup is
    /// input from elsewhere and may not make quiesce read, hash or restore a host file.
    #[error("backup {backup}: {}{entry} is {file:?}, which is refused: {problem}", vm_prefix(.vm))]
    UnsafePath { backup: PathBuf, vm: Option<String>, entry: Named, file: String, problem: PathProblem },
    /// The manifest names a file for the machine to boot (kernel, initrd) without a checksum
    /// for it: the backup's format promises one, so the manifest was edited or damaged.
    #[error("backup {backup}: VM {vm}'s {entry} {file:?} has no checksum in the manifest")]
    Unchecksummed { backup: PathBuf, vm: String, entry: Entry, file: String },
}

/// What in a manifest names a refused path: the VM's own name (its folder), or one of its
/// files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Named {
    VmName,
    File(Entry),
}

impl std::fmt::Display for Named {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Named::VmName => f.write_str("the VM name"),
            Named::File(e) => write!(f, "the {e}"),
        }
    }
}

fn vm_prefix(vm: &Option<String>) -> String {
    vm.as_deref().map(|v| format!("VM {}: ", crate::qemu::message::snippet(v.as_bytes()))).unwrap_or_default()
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

    /// Lists every other file of each VM's folder in the manifest with its checksum (the
    /// kernel and initrd, and anything else written there), writes the manifest and renames
    /// the folder into place.
    pub fn commit(mut self) -> Result<Backup, FolderError> {
        for vm in &mut self.vms {
            let dir = self.tmp.path().join("vms").join(&vm.name);
            vm.files = other_files(&dir, vm)?;
        }
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

/// Every file below a VM's folder that is neither a disk nor the state, hashed, in name
/// order. These are few and small (the kernel and initrd), so hashing them here costs
/// little; the big files were hashed as they were captured.
fn other_files(dir: &Path, vm: &VmBackup) -> Result<Vec<FileEntry>, FolderError> {
    let listed: Vec<&str> =
        vm.disks.iter().map(|d| d.file.as_str()).chain(vm.state.iter().map(|s| s.file.as_str())).collect();
    let mut found = Vec::new();
    walk_files(dir, "", &mut found)?;
    found.sort();
    let mut out = Vec::new();
    for rel in found.into_iter().filter(|f| !listed.contains(&f.as_str())) {
        let path = dir.join(&rel);
        let (sha256, bytes) = sha256_file(&path).map_err(io(&path))?;
        out.push(FileEntry { file: rel, bytes, sha256 });
    }
    Ok(out)
}

/// The regular files below `dir`, as `/`-joined names under `prefix`. The writer made this
/// tree, so anything but files and folders is a bug, and is refused rather than listed.
fn walk_files(dir: &Path, prefix: &str, out: &mut Vec<String>) -> Result<(), FolderError> {
    if !dir.exists() {
        return Ok(());
    }
    for e in std::fs::read_dir(dir).map_err(io(dir))? {
        let e = e.map_err(io(dir))?;
        let name = e.file_name().into_string().map_err(|n| FolderError::Io {
            path: dir.join(&n),
            source: std::io::Error::other("a file name of the backup is not UTF-8"),
        })?;
        let rel = if prefix.is_empty() { name } else { format!("{prefix}/{name}") };
        let t = e.file_type().map_err(io(&e.path()))?;
        if t.is_dir() {
            walk_files(&e.path(), &rel, out)?;
        } else if t.is_file() {
            out.push(rel);
        } else {
            return Err(FolderError::Io {
                path: e.path(),
                source: std::io::Error::other("not a regular file or folder"),
            });
        }
    }
    Ok(())
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

/// A name from the manifest, cut to a readable length for an error message.
fn shown(name: &str) -> String {
    crate::qemu::message::snippet(name.as_bytes())
}

impl Backup {
    /// Opens the backup at `path`, trusting nothing in it: manifest.json is read only if it
    /// is a regular file (no link) of at most [`MAX_MANIFEST_BYTES`], and every VM name and
    /// file name in it must lead inside the folder ([`paths`]); a file that is missing is
    /// left for [`Backup::check`] to report. An error touches nothing outside the folder.
    pub fn open(path: &Path) -> Result<Backup, FolderError> {
        let not_a_backup = |why: String| FolderError::NotABackup { path: path.to_owned(), why };
        let file = paths::open_beneath(path, "manifest.json").map_err(|e| match e {
            Resolve::Refused(problem) => not_a_backup(problem.to_string()),
            Resolve::Io(e) => not_a_backup(e.to_string()),
        })?;
        let mut bytes = Vec::new();
        file.take(MAX_MANIFEST_BYTES + 1).read_to_end(&mut bytes).map_err(|e| not_a_backup(e.to_string()))?;
        if bytes.len() as u64 > MAX_MANIFEST_BYTES {
            return Err(not_a_backup(format!("it is larger than {MAX_MANIFEST_BYTES} bytes")));
        }
        let manifest = Manifest::from_json(&bytes).map_err(|e| match e {
            ManifestError::Version { found } => FolderError::Version { path: path.to_owned(), found },
            other => not_a_backup(other.to_string()),
        })?;
        let backup = Backup { path: path.to_owned(), manifest };
        backup.check_names()?;
        Ok(backup)
    }

    /// Every VM name and file name of the manifest: plain, and (where it exists) reached
    /// inside the folder with no link on the way. Kernel and initrd need a checksum from
    /// format 2 on.
    fn check_names(&self) -> Result<(), FolderError> {
        for vm in &self.manifest.vms {
            paths::plain_name(&vm.name).map_err(|problem| FolderError::UnsafePath {
                backup: self.path.clone(),
                vm: None,
                entry: Named::VmName,
                file: shown(&vm.name),
                problem,
            })?;
        }
        // Every name is checked before anything else is said of the manifest: a refused
        // path is the first thing a person must know.
        for n in self.manifest.named_files() {
            // A missing or unreadable file is said by the check, file by file.
            if let Err(e @ FolderError::UnsafePath { .. }) = self.resolve(n.vm, &n.entry, n.file) {
                return Err(e);
            }
        }
        if self.manifest.format_version >= 2 {
            for n in self.manifest.named_files().filter(|n| matches!(n.entry, Entry::Kernel | Entry::Initrd)) {
                if !self.vm(n.vm).is_some_and(|v| v.files.iter().any(|f| f.file == n.file)) {
                    return Err(FolderError::Unchecksummed {
                        backup: self.path.clone(),
                        vm: shown(n.vm),
                        entry: n.entry,
                        file: shown(n.file),
                    });
                }
            }
        }
        Ok(())
    }

    /// Opens `file` of VM `vm` (named by `entry`) through the checked walk.
    fn resolve(&self, vm: &str, entry: &Entry, file: &str) -> Result<File, FolderError> {
        let refused = |problem| FolderError::UnsafePath {
            backup: self.path.clone(),
            vm: Some(vm.to_owned()),
            entry: Named::File(entry.clone()),
            file: shown(file),
            problem,
        };
        paths::plain_name(vm).map_err(|problem| FolderError::UnsafePath {
            backup: self.path.clone(),
            vm: None,
            entry: Named::VmName,
            file: shown(vm),
            problem,
        })?;
        paths::plain_relative(file).map_err(refused)?;
        paths::open_beneath(&self.path, &format!("vms/{vm}/{file}")).map_err(|e| match e {
            Resolve::Refused(problem) => refused(problem),
            Resolve::Io(source) => FolderError::Io { path: self.vm_dir(vm).join(file), source },
        })
    }

    /// The path of `file` of VM `vm` (named by `entry`), for a program that opens it by name
    /// (QEMU, qemu-img): checked again now, as [`Backup::open`] did, and it must exist.
    pub fn file_path(&self, vm: &str, entry: &Entry, file: &str) -> Result<PathBuf, FolderError> {
        self.resolve(vm, entry, file)?;
        Ok(self.vm_dir(vm).join(file))
    }

    pub fn vm(&self, name: &str) -> Option<&VmBackup> {
        self.manifest.vms.iter().find(|v| v.name == name)
    }

    pub fn vm_dir(&self, name: &str) -> PathBuf {
        self.path.join("vms").join(name)
    }

    /// Re-hashes every file the manifest lists; returns the ones that differ. (The files
    /// the manifest does not list are in [`Backup::check`]'s warnings.)
    pub fn verify(&self) -> Result<Vec<Mismatch>, FolderError> {
        Ok(self.check()?.mismatches)
    }
}

/// The sha256 (hex) and length of a file.
pub fn sha256_file(path: &Path) -> std::io::Result<(String, u64)> {
    sha256_of(File::open(path)?)
}

/// The sha256 (hex) and length of `f`, which is then made durable (fdatasync): for a file
/// just written, the hash reads the host's cache, not the device.
pub(super) fn sha256_and_sync(f: File) -> std::io::Result<(String, u64)> {
    let f2 = f.try_clone()?;
    let out = sha256_of(f)?;
    f2.sync_data()?;
    Ok(out)
}

/// The sha256 (hex) and length of what is left to read in `f`.
fn sha256_of(mut f: File) -> std::io::Result<(String, u64)> {
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
mod tests;
