//! The recovery journal of a libvirt domain: what `quiesce backup --libvirt` is about to
//! change in it, written to disk before the change, so that a quiesce killed with SIGKILL
//! (no undo can run) leaves enough behind for the next `quiesce backup --libvirt` (or
//! `quiesce recover --libvirt`) on that domain to undo it ([`replay`]).
//!
//! quiesce changes a domain only through libvirt: the snapshot or checkpoint that puts an
//! overlay on each disk (libvirt freezes and thaws the guest, or pauses and continues it,
//! inside that one call), then `blockcommit` back. So the journal is written once before
//! that call (the overlays, and that libvirt was asked to freeze or pause), once after it
//! (the call returned: libvirt thawed and continued), and removed when the domain is back
//! on its own images. A paused domain's Saved State puts no overlay on and leaves it
//! paused: nothing to undo, no journal.
//!
//! The journals are files of their own kind, in `libvirt-journals/` beside the QMP VMs'
//! `journals/` ([`crate::backup::recovery`]), written the same way (temporary file, fsync,
//! rename, fsync of the folder): a reader sees the old journal or the new one.
//!
//! **Which domain.** A journal is named after the connection URI as libvirt states it
//! (`virsh uri`, so `qemu:///system` given or defaulted is one journal) and the domain's
//! UUID; both are in it and must match. The libvirtd instance is told apart by its URI (a
//! second daemon has a socket of its own, so a URI of its own), and not by the daemon's
//! process or the host's boot: a restarted libvirtd reconnects to the same QEMU, still on
//! quiesce's overlays, and a persistent domain that was restarted (or the host rebooted)
//! runs on them too, since libvirt wrote them into its definition. What proves the
//! leftovers are still there is the domain itself: a disk whose source is an overlay the
//! journal names (named after the killed quiesce's pid, so no other run's). A journal whose
//! domain is gone, or shows none of it, is stale: reported, removed, and nothing touched.
//!
//! A journal is read as untrusted input: bounded in size, checked field by field, every
//! path absolute and without `..`, and an overlay only one named as quiesce names its
//! overlays (`VM-TARGET-quiesce-overlay-PID.qcow2`, PID the writer's).

mod replay;

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use sha2::Digest;

use super::virsh::{self, Virsh, VirshError};
use crate::backup::recovery::{self, JournalError};

pub use replay::{replay, status, Found, RecoveryError, Stale, Status, Step};

/// The format of a journal; another number is refused, clearly.
pub const VERSION: u32 = 1;
const MAX_OVERLAYS: usize = super::domain::MAX_DISKS;
const MAX_TEXT: usize = 4096;

/// Where the libvirt domains' journals are.
pub fn journal_dir() -> Result<PathBuf, JournalError> {
    Ok(recovery::state_dir()?.join("libvirt-journals"))
}

/// The journal file of domain `uuid` on connection `uri` (as [`canonical_uri`] gives it).
pub fn journal_path(uri: &str, uuid: &str) -> Result<PathBuf, JournalError> {
    let mut h = sha2::Sha256::new();
    h.update(uri.as_bytes());
    h.update([0]);
    h.update(uuid.to_ascii_lowercase().as_bytes());
    Ok(journal_dir()?.join(format!("{}.json", &hex::encode(h.finalize())[..16])))
}

/// The connection's URI as libvirt states it (`virsh uri`): the default connection and the
/// same URI given by hand are one.
pub async fn canonical_uri(virsh: &Virsh) -> Result<String, VirshError> {
    Ok(virsh.run(&["uri"], virsh::COMMAND).await?.trim().to_owned())
}

/// The domain's UUID, from libvirt.
pub async fn uuid_of(virsh: &Virsh, domain: &str) -> Result<String, VirshError> {
    Ok(virsh.run(&["domuuid", domain], virsh::COMMAND).await?.trim().to_ascii_lowercase())
}

/// One domain of one libvirt daemon (see the module's comment for why these).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DomainId {
    /// The connection, as libvirt states it.
    pub uri: String,
    pub uuid: String,
    /// Its name, for people and for a domain that is gone: not part of the match.
    pub name: String,
}

/// An overlay quiesce puts (or is about to put) on one disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OverlayRecord {
    /// libvirt's target (`vda`).
    pub target: String,
    /// The disk's own image, under the overlay: where it is merged into.
    pub image: PathBuf,
    pub overlay: PathBuf,
}

/// A journal as it is on disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    pub version: u32,
    pub domain: DomainId,
    /// The quiesce process that wrote it (its pid is in the overlays' names).
    pub writer_pid: u32,
    /// libvirt's word for the domain's state before the backup (`running`, `paused`).
    pub before: String,
    /// The snapshot's name given to libvirt (`quiesce-PID`); with `--no-metadata` libvirt
    /// keeps no record of it, but one left under this name is removed.
    pub snapshot: String,
    pub overlays: Vec<OverlayRecord>,
    /// libvirt was asked to freeze the guest (`--quiesce`) and the call has not returned.
    pub freezing: bool,
    /// libvirt was asked to pause the running domain for a checkpoint and the call has not
    /// returned.
    pub pausing: bool,
}

fn plain(what: &str, s: &str, max: usize) -> Result<(), String> {
    if s.is_empty() || s.len() > max || !s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        return Err(format!("{what} {s:?} is not a plain name"));
    }
    Ok(())
}

fn text(what: &str, s: &str) -> Result<(), String> {
    if s.len() > MAX_TEXT || s.chars().any(char::is_control) {
        return Err(format!("{what} is longer than {MAX_TEXT} bytes or holds control characters"));
    }
    Ok(())
}

fn absolute(what: &str, p: &Path) -> Result<(), String> {
    text(what, &p.to_string_lossy())?;
    if !p.is_absolute() || p.components().any(|c| c == std::path::Component::ParentDir) {
        return Err(format!("{what} {} is not an absolute path without ..", p.display()));
    }
    Ok(())
}

/// The end of the name quiesce gives the overlay of disk `target` in run `pid`
/// ([`super::member::choose`]).
pub fn overlay_suffix(target: &str, pid: u32) -> String {
    format!("-{target}-quiesce-overlay-{pid}.qcow2")
}

impl Record {
    /// Checks the bounds a journal quiesce wrote keeps; `Err` names the first one broken.
    pub fn check(&self) -> Result<(), String> {
        if self.version != VERSION {
            return Err(format!("version {} (this quiesce reads version {VERSION})", self.version));
        }
        let id = &self.domain;
        if id.uri.is_empty() {
            return Err("no connection URI".into());
        }
        text("the connection URI", &id.uri)?;
        text("the domain's name", &id.name)?;
        let hex_dashes = id.uuid.len() == 36
            && id
                .uuid
                .char_indices()
                .all(|(i, c)| if [8, 13, 18, 23].contains(&i) { c == '-' } else { c.is_ascii_hexdigit() });
        if !hex_dashes {
            return Err(format!("the UUID {:?} is not one", id.uuid));
        }
        plain("the run state", &self.before, 32)?;
        if self.snapshot != format!("quiesce-{}", self.writer_pid) {
            return Err(format!(
                "the snapshot {:?} is not one quiesce names (quiesce-{})",
                self.snapshot, self.writer_pid
            ));
        }
        if self.overlays.len() > MAX_OVERLAYS {
            return Err(format!("{} overlays (at most {MAX_OVERLAYS})", self.overlays.len()));
        }
        for o in &self.overlays {
            plain("a disk target", &o.target, 32)?;
            absolute("a disk image", &o.image)?;
            absolute("an overlay", &o.overlay)?;
            let suffix = overlay_suffix(&o.target, self.writer_pid);
            let named = o.overlay.file_name().is_some_and(|n| {
                let n = n.to_string_lossy();
                n.len() > suffix.len() && n.ends_with(&suffix)
            });
            if !named || o.overlay == o.image {
                return Err(format!(
                    "the overlay {} is not a file quiesce makes (a name ending {suffix})",
                    o.overlay.display()
                ));
            }
        }
        Ok(())
    }

    /// What the journal names, in words.
    pub fn leftovers(&self) -> String {
        let mut parts: Vec<String> = self
            .overlays
            .iter()
            .map(|o| format!("overlay {} on disk {} (over {})", o.overlay.display(), o.target, o.image.display()))
            .collect();
        if self.freezing {
            parts.push("a freeze by libvirt under way".into());
        }
        if self.pausing {
            parts.push("a pause by libvirt for the checkpoint under way".into());
        }
        if parts.is_empty() {
            return "nothing changed yet".into();
        }
        parts.join(", ")
    }
}

/// Reads and checks the journal at `path`.
pub fn read(path: &Path) -> Result<Record, JournalError> {
    let bad = |why: String| JournalError::Unreadable { path: path.to_owned(), why };
    let text = recovery::read_bounded(path)?;
    let rec: Record = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    rec.check().map_err(bad)?;
    Ok(rec)
}

/// Each journal file found, and what reading it gave.
pub type Listed = recovery::ListedOf<Record>;

/// The journal folder and every journal in it, read and checked; read only.
pub fn list() -> Result<(PathBuf, Listed), JournalError> {
    recovery::list_in(journal_dir()?, read)
}

/// Removes the journal at `path`; one that is not there is fine.
pub use recovery::remove;

/// The journal of one domain during one backup.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    record: Mutex<Record>,
}

impl Journal {
    /// The journal of `domain` (in state `before`), whose disks get `overlays` in the
    /// snapshot `quiesce-PID`; nothing is written until [`Journal::before_call`].
    pub fn new(domain: DomainId, before: String, overlays: Vec<OverlayRecord>) -> Result<Journal, JournalError> {
        let path = journal_path(&domain.uri, &domain.uuid)?;
        let writer_pid = std::process::id();
        let record = Record {
            version: VERSION,
            domain,
            writer_pid,
            before,
            snapshot: format!("quiesce-{writer_pid}"),
            overlays,
            freezing: false,
            pausing: false,
        };
        record.check().map_err(|why| JournalError::Unreadable { path: path.clone(), why })?;
        Ok(Journal { path, record: Mutex::new(record) })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Durably records the overlays, and whether libvirt is about to freeze the guest or
    /// pause the domain: written before libvirt's call.
    pub fn before_call(&self, freezing: bool, pausing: bool) -> Result<(), JournalError> {
        self.write(|r| {
            r.freezing = freezing;
            r.pausing = pausing;
        })
    }

    /// libvirt's call returned: it thawed and continued the domain; the overlays stay.
    pub fn call_returned(&self) -> Result<(), JournalError> {
        self.write(|r| {
            r.freezing = false;
            r.pausing = false;
        })
    }

    fn write(&self, change: impl FnOnce(&mut Record)) -> Result<(), JournalError> {
        let mut r = self.record.lock().unwrap_or_else(|e| e.into_inner());
        change(&mut r);
        let bytes = serde_json::to_vec_pretty(&*r)
            .map_err(|e| JournalError::Io { path: self.path.clone(), source: std::io::Error::other(e) })?;
        recovery::write_file_durably(&self.path, &bytes)
    }

    /// Removes the journal: the domain is back on its own images.
    pub fn clear(&self) -> Result<(), JournalError> {
        remove(&self.path)
    }
}

#[cfg(test)]
mod tests;
