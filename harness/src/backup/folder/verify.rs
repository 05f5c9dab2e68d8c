//! Checking a backup against its manifest: every file it lists is re-hashed (through the
//! checked walk of [`super::paths`], so what is hashed is what was checked), and every
//! file or folder it does not list is named, as a warning.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use super::{shown, Backup, FolderError};
use crate::backup::manifest::Entry;

/// At most this many unexpected entries are named; the rest are counted. A folder from
/// elsewhere may hold millions.
pub const MAX_UNEXPECTED_LISTED: usize = 100;

/// What a check of a backup found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Verification {
    /// How many files were checked against their checksums.
    pub checked: usize,
    /// The files whose content is not what the manifest says: the backup cannot be trusted.
    pub mismatches: Vec<Mismatch>,
    /// What does not make the backup wrong, but a person should know.
    pub warnings: Vec<Warning>,
}

/// One file whose content is not what the manifest says.
#[derive(Debug, Clone, PartialEq)]
pub struct Mismatch {
    pub file: PathBuf,
    /// The sha256 the manifest gives.
    pub expected: String,
    pub found: Found,
}

/// What was found where the manifest promises a file with a checksum.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// The file, with another content: its sha256.
    Sha256(String),
    /// The file, with another length (so it was not hashed).
    Length { found: u64, expected: u64 },
    /// No file.
    Missing,
    /// A file that could not be read: the system's reason.
    Unreadable(String),
}

impl std::fmt::Display for Found {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Found::Sha256(h) => write!(f, "sha256 {h}"),
            Found::Length { found, expected } => write!(f, "{found} bytes where the manifest says {expected}"),
            Found::Missing => f.write_str("no such file"),
            Found::Unreadable(why) => write!(f, "an unreadable file ({why})"),
        }
    }
}

/// Something a check found that does not make the backup wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Warning {
    /// A file or folder in the backup that the manifest does not list (`path` relative to
    /// the backup's folder). It is not part of the backup: nothing reads it, and nothing
    /// vouches for it.
    Unexpected { path: String, kind: &'static str },
    /// More unexpected entries than [`MAX_UNEXPECTED_LISTED`], which are not named.
    MoreUnexpected { count: usize },
    /// A format-1 backup lists its VM's kernel or initrd without a checksum: the file is
    /// used by a restore but cannot be checked.
    Unchecked { vm: String, entry: Entry, file: String },
}

impl std::fmt::Display for Warning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Warning::Unexpected { path, kind } => {
                write!(f, "{path}: a {kind} the manifest does not list (not part of the backup)")
            }
            Warning::MoreUnexpected { count } => write!(f, "and {count} more entries the manifest does not list"),
            Warning::Unchecked { vm, entry, file } => {
                write!(f, "vms/{vm}/{file}: VM {vm}'s {entry} has no checksum (manifest format 1); it is not checked")
            }
        }
    }
}

impl Backup {
    /// Re-hashes every file the manifest lists with a checksum and names every file or
    /// folder it does not list. An error means the backup could not be checked at all (its
    /// folder is unreadable, or a name is refused); a file that differs, is missing or is
    /// unreadable is a [`Mismatch`].
    pub fn check(&self) -> Result<Verification, FolderError> {
        let mut v = Verification::default();
        let mut expected: BTreeSet<String> = BTreeSet::from(["manifest.json".to_owned()]);
        for n in self.manifest.named_files() {
            let rel = format!("vms/{}/{}", n.vm, n.file);
            expected.insert(rel.clone());
            let Some((bytes, sha256)) = n.checksum else {
                let listed = self.vm(n.vm).is_some_and(|vm| vm.files.iter().any(|f| f.file == n.file));
                if !listed {
                    v.warnings.push(Warning::Unchecked { vm: shown(n.vm), entry: n.entry, file: shown(n.file) });
                }
                continue;
            };
            v.checked += 1;
            let mismatch = |found| Mismatch { file: self.path.join(&rel), expected: sha256.to_owned(), found };
            let file = match self.resolve(n.vm, &n.entry, n.file) {
                Ok(f) => f,
                Err(FolderError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                    v.mismatches.push(mismatch(Found::Missing));
                    continue;
                }
                Err(FolderError::Io { source, .. }) => {
                    v.mismatches.push(mismatch(Found::Unreadable(source.to_string())));
                    continue;
                }
                Err(refused) => return Err(refused),
            };
            let len = file.metadata().map(|m| m.len());
            let found = match len {
                Ok(len) if len != bytes => Some(Found::Length { found: len, expected: bytes }),
                Ok(_) => match super::sha256_of(file) {
                    Ok((h, _)) if h == sha256 => None,
                    Ok((h, _)) => Some(Found::Sha256(h)),
                    Err(e) => Some(Found::Unreadable(e.to_string())),
                },
                Err(e) => Some(Found::Unreadable(e.to_string())),
            };
            v.mismatches.extend(found.map(mismatch));
        }
        let mut unexpected = Unexpected::default();
        unexpected.walk(&self.path, "", &expected)?;
        v.warnings.extend(unexpected.listed);
        if unexpected.more > 0 {
            v.warnings.push(Warning::MoreUnexpected { count: unexpected.more });
        }
        Ok(v)
    }
}

/// The entries of a backup's folder that its manifest does not list, bounded.
#[derive(Default)]
struct Unexpected {
    listed: Vec<Warning>,
    more: usize,
}

impl Unexpected {
    /// Walks the folder `dir` (`prefix` below the backup's root). Only folders on the way to
    /// an expected file are entered, and never through a link (`file_type` does not follow
    /// one), so the walk stays inside the backup; an unexpected folder is named once, not
    /// entered.
    fn walk(&mut self, dir: &Path, prefix: &str, expected: &BTreeSet<String>) -> Result<(), FolderError> {
        let io = |source| FolderError::Io { path: dir.to_owned(), source };
        let mut names = Vec::new();
        for e in std::fs::read_dir(dir).map_err(io)? {
            let e = e.map_err(io)?;
            names.push((e.file_name().to_string_lossy().into_owned(), e.file_type().map_err(io)?));
        }
        names.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, t) in names {
            let rel = if prefix.is_empty() { name.clone() } else { format!("{prefix}/{name}") };
            if expected.contains(&rel) {
                // Its kind was checked (a regular file, reached without a link) when hashed.
                continue;
            }
            let on_the_way = t.is_dir()
                && expected.range(format!("{rel}/")..).next().is_some_and(|e| e.starts_with(&format!("{rel}/")));
            if on_the_way {
                self.walk(&dir.join(&name), &rel, expected)?;
                continue;
            }
            if self.listed.len() < MAX_UNEXPECTED_LISTED {
                let kind = if t.is_dir() {
                    "folder"
                } else if t.is_symlink() {
                    "symbolic link"
                } else if t.is_file() {
                    "file"
                } else {
                    "special file"
                };
                self.listed.push(Warning::Unexpected { path: shown(&rel), kind });
            } else {
                self.more += 1;
            }
        }
        Ok(())
    }
}
