//! The recovery journal: what quiesce is about to change in a VM it did not start, written
//! to disk before the change, so that a quiesce killed with SIGKILL (no undo can run) leaves
//! enough behind for the next run on that VM to undo it ([`replay`]).
//!
//! One journal per VM, named after its QMP socket, in the state folder ([`state_dir`]).
//! It is written as a whole each time (temporary file, fsync, rename, fsync of the folder),
//! so a reader sees the old journal or the new one, never half of one; it is removed once
//! the VM is put back or the backup is done.
//!
//! **Which VM.** A journal acts only on the very QEMU process it was written for. The QMP
//! socket path says where to look, but a restarted QEMU reuses it; QEMU's pid (from the
//! socket's peer credentials, `SO_PEERCRED`) can be reused by the kernel; `query-uuid` is
//! all zeros unless the VM was given `-uuid`, and `-name` is neither required nor unique.
//! So a VM is the socket path, the pid, the process's start time (in clock ticks since
//! boot, from `/proc/PID/stat`: two processes with one pid never share it) and the boot's
//! id (`/proc/sys/kernel/random/boot_id`: start times restart with each boot). Anything
//! else is a stale journal: reported, removed, and no VM is touched.
//!
//! A journal is read as untrusted input: bounded in size, checked field by field, and a
//! file it names is removed only if it is one quiesce makes (an overlay or merge reserve,
//! by its name) and, for an overlay, only if QEMU does not hold it for another node.
//!
//! Besides a backup's changes, a journal names two pauses a killed quiesce would leave:
//! the VM paused to finish a merge that did not converge ([`Leftovers::merge_paused`]: the
//! replay merges, then resumes it if it ran), and an in-place restore under way
//! ([`Leftovers::in_place`]: its disks may be half-written, so the replay writes the backup
//! into them again and only then lets the VM run; it never resumes half-written disks).

mod replay;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use sha2::Digest;

use super::attached::MigrationSettings;

pub use replay::{replay, Found, RecoveryError, RollForward, RollForwardError, RollingForward, Step};

/// The format of a journal; another number is refused, clearly. Version 2 added
/// `merge_paused` and `in_place`.
pub const VERSION: u32 = 2;
/// The environment variable that overrides the state folder (tests use it).
pub const STATE_DIR_ENV: &str = "QUIESCE_STATE_DIR";
/// A journal larger than this is not one quiesce wrote.
pub const MAX_BYTES: u64 = 64 << 10;
/// Bounds on a journal's contents.
const MAX_OVERLAYS: usize = 64;
const MAX_TEXT: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// The state folder or a journal in it could not be read, written or removed.
    #[error("recovery journal {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// No state folder can be found: neither $QUIESCE_STATE_DIR, $XDG_STATE_HOME nor $HOME
    /// is set.
    #[error("no folder for recovery journals: set $XDG_STATE_HOME or $HOME (or $QUIESCE_STATE_DIR)")]
    NoStateDir,
    /// The file is not a journal this quiesce can read: too large, not JSON of its format,
    /// of another version, or with a value out of bounds. It names no VM quiesce will act on.
    #[error("recovery journal {path} is unreadable: {why}")]
    Unreadable { path: PathBuf, why: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> JournalError + '_ {
    move |source| JournalError::Io { path: path.to_owned(), source }
}

/// The per-user folder of quiesce's state: `$QUIESCE_STATE_DIR`, else
/// `$XDG_STATE_HOME/quiesce`, else `~/.local/state/quiesce`.
pub fn state_dir() -> Result<PathBuf, JournalError> {
    let var = |k| std::env::var_os(k).filter(|v: &std::ffi::OsString| !v.is_empty()).map(PathBuf::from);
    if let Some(d) = var(STATE_DIR_ENV) {
        return Ok(d);
    }
    if let Some(d) = var("XDG_STATE_HOME") {
        return Ok(d.join("quiesce"));
    }
    var("HOME").map(|h| h.join(".local/state/quiesce")).ok_or(JournalError::NoStateDir)
}

/// Where the journals are.
pub fn journal_dir() -> Result<PathBuf, JournalError> {
    Ok(state_dir()?.join("journals"))
}

/// The QMP socket as the journal names it: absolute, symlinks resolved where it exists.
pub fn socket_key(qmp: &Path) -> PathBuf {
    std::fs::canonicalize(qmp).unwrap_or_else(|_| std::path::absolute(qmp).unwrap_or_else(|_| qmp.to_owned()))
}

/// The journal file of the VM behind `qmp`.
pub fn journal_path(qmp: &Path) -> Result<PathBuf, JournalError> {
    let key = socket_key(qmp);
    let digest = sha2::Sha256::digest(key.as_os_str().as_encoded_bytes());
    Ok(journal_dir()?.join(format!("{}.json", &hex::encode(digest)[..16])))
}

/// One QEMU process, told apart from any other (see the module's comment for why these).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Identity {
    /// Its QMP socket (absolute).
    pub qmp: PathBuf,
    pub pid: u32,
    /// The process's start, in clock ticks since boot (`/proc/PID/stat`, field 22).
    pub start_ticks: u64,
    pub boot_id: String,
    /// Its `-name`, for people: not part of the match.
    pub name: String,
}

/// Whether the QEMU a journal names is still there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Liveness {
    /// The same process runs: its leftovers are still in it.
    Live,
    /// No process has that pid: the VM is gone, and its leftovers with it.
    Gone,
    /// Another process has that pid now (or the host rebooted).
    OtherProcess,
}

impl Identity {
    /// The identity of process `pid`, reached at `qmp`; None if it cannot be read.
    pub fn of(qmp: &Path, pid: u32, name: &str) -> Option<Identity> {
        Some(Identity {
            qmp: socket_key(qmp),
            pid,
            start_ticks: start_ticks(pid)?,
            boot_id: boot_id()?,
            name: name.to_owned(),
        })
    }

    /// True when `other` is this very process (the name aside).
    pub fn same_process(&self, other: &Identity) -> bool {
        self.qmp == other.qmp
            && self.pid == other.pid
            && self.start_ticks == other.start_ticks
            && self.boot_id == other.boot_id
    }

    /// Read only: whether this process still runs.
    pub fn liveness(&self) -> Liveness {
        match (start_ticks(self.pid), boot_id()) {
            (None, _) => Liveness::Gone,
            (Some(t), Some(b)) if t == self.start_ticks && b == self.boot_id => Liveness::Live,
            _ => Liveness::OtherProcess,
        }
    }
}

/// Pure: the start time (field 22) of a `/proc/PID/stat` line; None for a process that has
/// ended (a zombie, state `Z` or `X`, not yet reaped by its parent). The command name
/// (field 2) is in parentheses and may hold spaces and parentheses, so fields are counted
/// after its last `)`.
pub fn start_ticks_of(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    if matches!(fields.next()?, "Z" | "X") {
        return None;
    }
    fields.nth(18)?.parse().ok()
}

fn start_ticks(pid: u32) -> Option<u64> {
    start_ticks_of(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

fn boot_id() -> Option<String> {
    Some(std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?.trim().to_owned())
}

/// The VM's run state before quiesce changed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Before {
    pub running: bool,
    /// QEMU's word for it (running, paused, prelaunch...).
    pub status: String,
}

/// An overlay quiesce put (or is about to put) on one of the VM's disks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OverlayRecord {
    /// The disk's name in the backup.
    pub disk: String,
    /// The node QEMU attaches the disk's device to (its base, into which it is merged).
    pub base_node: String,
    /// The overlay's node and its file.
    pub node: String,
    pub file: PathBuf,
}

/// An in-place restore (`quiesce restore --in-place`) under way: which backup's VM is being
/// written onto the VM's disks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InPlaceRecord {
    /// The backup folder (absolute).
    pub backup: PathBuf,
    /// The VM's name in the backup.
    pub vm: String,
}

/// What quiesce has done, or is about to do, to the VM: what a replay must undo.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Leftovers {
    /// A freeze was (about to be) sent and no thaw has succeeded since.
    pub frozen: bool,
    /// The VM was (about to be) stopped and its state saved; it is not back yet.
    pub saving: bool,
    pub overlays: Vec<OverlayRecord>,
    /// The merge reserve file.
    pub reserve: Option<PathBuf>,
    /// The VM was (about to be) paused by quiesce to finish a merge that did not converge,
    /// and is not resumed yet.
    pub merge_paused: bool,
    /// An in-place restore was (about to be) started: the VM paused, its disks written.
    pub in_place: Option<InPlaceRecord>,
}

impl Leftovers {
    pub fn is_empty(&self) -> bool {
        !self.frozen
            && !self.saving
            && self.overlays.is_empty()
            && self.reserve.is_none()
            && !self.merge_paused
            && self.in_place.is_none()
    }
}

impl std::fmt::Display for Leftovers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        if self.frozen {
            parts.push("the guest frozen".to_owned());
        }
        if self.saving {
            parts.push("the VM stopped for Saved State".to_owned());
        }
        for o in &self.overlays {
            parts.push(format!("overlay {} ({}) on disk {} (node {})", o.node, o.file.display(), o.disk, o.base_node));
        }
        if let Some(r) = &self.reserve {
            parts.push(format!("merge reserve {}", r.display()));
        }
        if self.merge_paused {
            parts.push("the VM paused to finish a merge".to_owned());
        }
        if let Some(r) = &self.in_place {
            parts.push(format!(
                "an in-place restore of VM {} from backup {} (the VM paused, its disks maybe half-written)",
                r.vm,
                r.backup.display()
            ));
        }
        if parts.is_empty() {
            return f.write_str("nothing changed yet");
        }
        f.write_str(&parts.join(", "))
    }
}

/// A journal as it is on disk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    pub version: u32,
    pub vm: Identity,
    /// The agent socket quiesce was given, if any (the replay needs it to thaw).
    pub agent: Option<PathBuf>,
    pub before: Before,
    /// The migration settings before (a save changes some; a replay puts them back).
    pub migration: Option<MigrationSettings>,
    /// The quiesce process that wrote it.
    pub writer_pid: u32,
    pub left: Leftovers,
}

impl Record {
    /// Checks the bounds a journal quiesce wrote keeps; `why` names the first one broken.
    fn check(&self) -> Result<(), String> {
        if self.version != VERSION {
            return Err(format!("version {} (this quiesce reads version {VERSION})", self.version));
        }
        let text = |what: &str, s: &str| {
            if s.len() > MAX_TEXT {
                Err(format!("{what} is longer than {MAX_TEXT} bytes"))
            } else {
                Ok(())
            }
        };
        let node = |what: &str, s: &str| {
            text(what, s)?;
            let ok =
                !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '#'));
            if ok {
                Ok(())
            } else {
                Err(format!("{what} {s:?} is not a node name"))
            }
        };
        let file = |what: &str, p: &Path, suffix: &str| {
            text(what, &p.to_string_lossy())?;
            let named = p.file_name().is_some_and(|n| n.to_string_lossy().ends_with(suffix));
            if !p.is_absolute() || p.components().any(|c| c == std::path::Component::ParentDir) || !named {
                return Err(format!("{what} {} is not a file quiesce makes (absolute, ending {suffix})", p.display()));
            }
            Ok(())
        };
        if !self.vm.qmp.is_absolute() {
            return Err(format!("the QMP socket {} is not absolute", self.vm.qmp.display()));
        }
        text("the QMP socket", &self.vm.qmp.to_string_lossy())?;
        text("the VM's name", &self.vm.name)?;
        text("the boot id", &self.vm.boot_id)?;
        text("the run state", &self.before.status)?;
        if let Some(a) = &self.agent {
            text("the agent socket", &a.to_string_lossy())?;
        }
        if let Some(m) = &self.migration {
            m.check()?;
        }
        if self.left.overlays.len() > MAX_OVERLAYS {
            return Err(format!("{} overlays (at most {MAX_OVERLAYS})", self.left.overlays.len()));
        }
        for o in &self.left.overlays {
            node("a disk name", &o.disk)?;
            node("a base node", &o.base_node)?;
            node("an overlay node", &o.node)?;
            file("an overlay file", &o.file, "-overlay.qcow2")?;
        }
        if let Some(r) = &self.left.reserve {
            file("the merge reserve", r, "-merge-reserve")?;
        }
        if let Some(r) = &self.left.in_place {
            text("the backup folder", &r.backup.to_string_lossy())?;
            text("the backup's VM", &r.vm)?;
            let plain = r.backup.is_absolute() && !r.backup.components().any(|c| c == std::path::Component::ParentDir);
            if !plain {
                return Err(format!("the backup folder {} is not an absolute path without ..", r.backup.display()));
            }
            if r.vm.is_empty() || r.vm.chars().any(char::is_control) {
                return Err(format!("the backup's VM {:?} is not a VM name", r.vm));
            }
            // A restore's journal is a journal of its own: it names nothing of a backup's.
            let alone = Leftovers { in_place: None, ..self.left.clone() };
            if !alone.is_empty() {
                return Err("an in-place restore together with a backup's changes".into());
            }
        }
        Ok(())
    }
}

/// Pure: the version a journal's text says it is, if it is a JSON object with one; read
/// before the whole, so that a journal of another version gets that said, not a field
/// missing or unknown.
fn version_of(text: &str) -> Option<u64> {
    let v: serde_json::Value = serde_json::from_str(text).ok()?;
    v.get("version")?.as_u64()
}

/// The text of the journal file at `path`, read as untrusted: at most [`MAX_BYTES`], and
/// text. Every kind of journal (a QMP VM's, a libvirt domain's) is read through this.
pub fn read_bounded(path: &Path) -> Result<String, JournalError> {
    let bad = |why: String| JournalError::Unreadable { path: path.to_owned(), why };
    let f = std::fs::File::open(path).map_err(io(path))?;
    let len = f.metadata().map_err(io(path))?.len();
    if len > MAX_BYTES {
        return Err(bad(format!("{len} bytes (a journal is at most {MAX_BYTES})")));
    }
    let mut text = String::new();
    std::io::Read::read_to_string(&mut std::io::Read::take(f, MAX_BYTES), &mut text)
        .map_err(|e| bad(format!("not text: {e}")))?;
    Ok(text)
}

/// Reads and checks the journal at `path`.
pub fn read(path: &Path) -> Result<Record, JournalError> {
    let bad = |why: String| JournalError::Unreadable { path: path.to_owned(), why };
    let text = read_bounded(path)?;
    match version_of(&text) {
        Some(v) if v != u64::from(VERSION) => {
            return Err(bad(format!(
                "version {v}, written by another quiesce (this quiesce reads version {VERSION}): replay it with the quiesce that wrote it, or look at the VM and remove the journal by hand"
            )))
        }
        _ => {}
    }
    let rec: Record = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    rec.check().map_err(bad)?;
    Ok(rec)
}

/// Each journal file found, and what reading it gave.
pub type Listed = ListedOf<Record>;
/// Each journal file of one kind found, and what reading it gave.
pub type ListedOf<R> = Vec<(PathBuf, Result<R, JournalError>)>;

/// The journal folder and every journal in it, read and checked; read only.
pub fn list() -> Result<(PathBuf, Listed), JournalError> {
    list_in(journal_dir()?, read)
}

/// Every journal (`*.json`) in `dir`, in name order, with what `read` made of it; read only.
/// A folder that does not exist has none. Skipped: a temporary file of a write under way
/// (`.NAME.tmp-PID`) and a journal moved aside as unreadable (`*.unreadable`).
pub fn list_in<R>(
    dir: PathBuf,
    read: impl Fn(&Path) -> Result<R, JournalError>,
) -> Result<(PathBuf, ListedOf<R>), JournalError> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((dir, out)),
        Err(e) => return Err(io(&dir)(e)),
    };
    for e in entries.flatten() {
        let p = e.path();
        let hidden = p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.'));
        if hidden || p.extension().is_none_or(|x| x != "json") {
            continue;
        }
        let r = read(&p);
        out.push((p, r));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok((dir, out))
}

/// Removes the journal at `path`; one that is not there is fine.
pub fn remove(path: &Path) -> Result<(), JournalError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(path)(e)),
        _ => Ok(()),
    }
}

/// Writes `bytes` to `path` so that a crash leaves the old file or the new one: a temporary
/// file beside it, fsynced, renamed over it, and the folder fsynced (the rename is durable).
fn write_durably(path: &Path, bytes: &[u8]) -> Result<(), JournalError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let written = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.map_err(io(path))
}

/// [`write_durably`], public for the libvirt domains' journals
/// ([`super::libvirt::journal`]), which keep their files the same way. A separate fn so
/// that this module's own writer stays private.
pub fn write_file_durably(path: &Path, bytes: &[u8]) -> Result<(), JournalError> {
    write_durably(path, bytes)
}

/// The journal of one VM during one backup: written before each change to the VM (by the
/// method's undo log, [`super::child_snapshot::Undo`]), removed when the VM is put back.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    record: Mutex<Record>,
}

impl Journal {
    /// The journal of the VM `vm` (reached through `agent`, if given), in its state `before`;
    /// nothing is written until the first change.
    pub fn new(
        vm: Identity,
        agent: Option<PathBuf>,
        before: Before,
        migration: MigrationSettings,
    ) -> Result<Journal, JournalError> {
        let path = journal_path(&vm.qmp)?;
        let writer_pid = std::process::id();
        let migration = Some(migration);
        let record = Record { version: VERSION, vm, agent, before, migration, writer_pid, left: Leftovers::default() };
        Ok(Journal { path, record: Mutex::new(record) })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records `left` durably. Called before the change it names is made.
    pub fn write(&self, left: Leftovers) -> Result<(), JournalError> {
        let mut r = self.record.lock().unwrap_or_else(|e| e.into_inner());
        if r.left == left && self.path.exists() {
            return Ok(());
        }
        r.left = left;
        let bytes = serde_json::to_vec_pretty(&*r).map_err(|e| io(&self.path)(std::io::Error::other(e)))?;
        write_durably(&self.path, &bytes)
    }

    /// Removes the journal: the VM is as it was.
    pub fn clear(&self) -> Result<(), JournalError> {
        remove(&self.path)
    }

    /// The journal of an in-place restore of VM `vm_name` of `backup` onto the VM `vm`,
    /// whose run state was `before`: written at once, durably, before the VM is paused.
    pub fn in_place(vm: Identity, before: Before, backup: &Path, vm_name: &str) -> Result<Journal, JournalError> {
        let path = journal_path(&vm.qmp)?;
        let left = Leftovers {
            in_place: Some(InPlaceRecord { backup: backup.to_owned(), vm: vm_name.to_owned() }),
            ..Leftovers::default()
        };
        let record = Record {
            version: VERSION,
            vm,
            agent: None,
            before,
            migration: None,
            writer_pid: std::process::id(),
            left: Leftovers::default(),
        };
        let j = Journal { path, record: Mutex::new(record) };
        j.write(left)?;
        Ok(j)
    }
}

#[cfg(test)]
mod tests;
