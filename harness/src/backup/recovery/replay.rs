//! Replaying a journal a killed quiesce left: the next `quiesce backup` on the VM undoes
//! what the journal names and the VM still shows, with the job's own undo
//! ([`child_snapshot::recover`], [`saved_state::return_to`]), before anything else. A VM
//! paused to finish a merge is resumed once the merge is done. An in-place restore is not
//! undone but finished ([`RollForward`]): its disks may be half-written, and only writing
//! the backup into them again makes them whole.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Mutex;

use serde_json::{json, Value};

use super::{journal_path, read, remove, Before, Identity, InPlaceRecord, JournalError, Leftovers, Liveness};
use crate::backup::child_snapshot::{self, SnapshotSettings, Undo};
use crate::backup::runstate::{self, RunState};
use crate::backup::saved_state::{self, qmp};
use crate::backup::{attached, BackupError};
use crate::qemu::Machine;
use crate::sys::deadline;
use crate::timeline::Timeline;

#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    /// The journal folder could not be read, or a journal not removed.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// QEMU's pid could not be learnt from its QMP socket, so quiesce cannot tell whether
    /// the journal is this VM's: nothing was touched and the journal is kept.
    #[error("VM {vm}: a recovery journal ({journal}) names this QMP socket, but QEMU's pid could not be learnt from it, so quiesce cannot tell whether it is the same QEMU; nothing was touched")]
    UnknownPid { vm: String, journal: PathBuf },
    /// The journal says quiesce froze the guest, and no agent socket was given to check and
    /// thaw it: nothing was touched and the journal is kept. Give `--agent`.
    #[error("VM {vm}: a killed quiesce may have left the guest frozen; give its agent socket (--agent {}) so quiesce can thaw it; nothing was touched", .agent.as_deref().map_or("SOCKET".into(), |a| a.display().to_string()))]
    AgentNeeded { vm: String, agent: Option<PathBuf> },
    /// Undoing the leftovers failed: the VM may still be frozen, stopped or on an overlay.
    /// The journal is kept; run quiesce again, or look at the VM (the error says where).
    #[error("VM {vm}: undoing what a killed quiesce left ({left}) failed: {error}; the journal {journal} is kept")]
    Undo { vm: String, left: Leftovers, journal: PathBuf, error: Box<BackupError> },
    /// A killed quiesce left an in-place restore half-done, and it could not be finished:
    /// its backup is gone, refused or no longer verifies, or writing it failed. The VM's
    /// disks may be half-written, so it is left paused (never resumed on them) and the
    /// journal is kept. Restore it in place again, from this backup once it is whole or
    /// from another (that restore takes the journal over), or remove the VM.
    #[error("VM {vm}: a killed quiesce left an in-place restore of VM {} from {} half-done, and it cannot be finished: {why}\n  the VM is left paused: its disks may be half-written, so it must not run on them; restore it in place again (from this backup once it verifies, or from another), and the journal {journal} is kept until then", .restore.vm, .restore.backup.display())]
    InPlaceUnfinished { vm: String, restore: InPlaceRecord, before: Before, journal: PathBuf, why: RollForwardError },
}

/// Why an in-place restore could not be finished (the verify layer's error, boxed).
pub type RollForwardError = Box<dyn std::error::Error + Send + Sync>;

/// Finishes an in-place restore a killed quiesce left, as the restore itself would have:
/// the backup's VM `restore` opened and verified, written into the VM's disks again (the
/// write is idempotent), the VM put back in use and resumed if it ran (`before`); returns
/// the disks written, or None for a VM found running (the restore was killed before its
/// pause, so nothing was written). On an error the VM must be left paused. In-place restores belong to
/// a higher layer ([`crate::verify`]), which hands this in.
pub type RollForward = for<'a> fn(&'a Machine, &'a InPlaceRecord, &'a Before) -> RollingForward<'a>;

/// A roll forward under way (see [`RollForward`]).
pub type RollingForward<'a> = Pin<Box<dyn Future<Output = Result<Option<Vec<String>>, RollForwardError>> + 'a>>;

/// One thing a replay found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// The guest agent said frozen: the guest was thawed.
    Thawed,
    /// A merge a killed quiesce had started was still running in QEMU: it was cancelled
    /// (its overlay stays on top, and is merged again).
    CommitCancelled { job: String },
    /// The overlay was still on top of its disk: merged back (block-commit) and removed.
    Merged { disk: String, overlay: String },
    /// The overlay was in QEMU but not on top (the snapshot never happened): removed.
    OverlayRemoved { overlay: String, file: PathBuf },
    /// The overlay's file only was left (QEMU had not opened it yet): removed.
    OverlayFileRemoved { file: PathBuf },
    /// A node of the overlay's name holds another file: not quiesce's, left alone.
    LeftAlone { node: String },
    /// The merge reserve file was removed.
    ReserveRemoved { file: PathBuf },
    /// The VM was still in the state a Saved State left it (`status`): put back as it was.
    BackFromSavedState { status: String },
    /// The migration settings a save changes were not as before: put back.
    MigrationSettingsPutBack,
    /// The VM was still paused by quiesce to finish a merge: once merged, resumed.
    ResumedAfterMerge,
    /// An in-place restore was finished: the backup's `disks` written again, the VM reset,
    /// and resumed if it was running before (`resumed`).
    RolledForward { backup: PathBuf, disks: Vec<String>, resumed: bool },
    /// The in-place restore was killed before it paused the VM: nothing was written, and
    /// the VM, running, was left alone.
    InPlaceNeverBegan { backup: PathBuf },
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Step::Thawed => f.write_str("guest was frozen: thawed"),
            Step::CommitCancelled { job } => write!(f, "merge {job} still running: cancelled"),
            Step::Merged { disk, overlay } => write!(f, "overlay {overlay} still on disk {disk}: merged and removed"),
            Step::OverlayRemoved { overlay, file } => {
                write!(f, "overlay {overlay} ({}) not in use: removed", file.display())
            }
            Step::OverlayFileRemoved { file } => write!(f, "overlay file {} removed", file.display()),
            Step::LeftAlone { node } => write!(f, "node {node} holds another file: not quiesce's, left alone"),
            Step::ReserveRemoved { file } => write!(f, "merge reserve {} removed", file.display()),
            Step::BackFromSavedState { status } => write!(f, "VM left {status} by a Saved State: put back"),
            Step::MigrationSettingsPutBack => f.write_str("migration settings changed by the save: put back"),
            Step::ResumedAfterMerge => f.write_str("VM paused to finish a merge: merged, then resumed"),
            Step::RolledForward { backup, disks, resumed } => write!(
                f,
                "in-place restore finished: disks {} written again from {} (identical to it, block for block), the VM reset and {}",
                disks.join(", "),
                backup.display(),
                if *resumed { "resumed" } else { "left paused, as it was" }
            ),
            Step::InPlaceNeverBegan { backup } => write!(
                f,
                "in-place restore from {} killed before it paused the VM: nothing written, the VM left running",
                backup.display()
            ),
        }
    }
}

/// What the replay found for a VM.
#[derive(Debug)]
pub enum Found {
    /// No journal names this VM's QMP socket.
    Nothing,
    /// A journal of another QEMU (gone, or another process now): removed; no VM touched.
    Stale { journal: PathBuf, vm: Identity, liveness: Liveness, left: Leftovers },
    /// A file quiesce cannot read: moved aside (`moved_to`); no VM touched.
    Unreadable { journal: PathBuf, moved_to: PathBuf, why: String },
    /// This VM's journal: what it named, and what was done (nothing, when the VM showed
    /// none of it any more). The journal was removed.
    Undone { journal: PathBuf, left: Leftovers, steps: Vec<Step> },
}

impl std::fmt::Display for Found {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Found::Nothing => f.write_str("no recovery journal"),
            Found::Stale { journal, vm, liveness, left } => {
                let why = match liveness {
                    Liveness::Gone => format!("its QEMU (pid {}) is gone", vm.pid),
                    Liveness::Live => format!("its QEMU (pid {}) still runs, but not behind this socket", vm.pid),
                    Liveness::OtherProcess => format!("pid {} is another process now", vm.pid),
                };
                write!(
                    f,
                    "stale recovery journal {} of another QEMU ({why}; it named: {left}): removed, no VM touched",
                    journal.display()
                )
            }
            Found::Unreadable { journal, moved_to, why } => write!(
                f,
                "unreadable recovery journal {} ({why}): moved to {}, no VM touched",
                journal.display(),
                moved_to.display()
            ),
            Found::Undone { journal, left, steps } => {
                let done: Vec<String> = steps.iter().map(Step::to_string).collect();
                let done = if done.is_empty() { "none of it was left".to_owned() } else { done.join("; ") };
                write!(f, "recovery journal {} of a killed quiesce named {left}: {done}", journal.display())
            }
        }
    }
}

/// Finds the journal of the VM behind `qmp` (attached as `m`) and, if it is this very QEMU
/// process, undoes what it names that the VM still shows (an in-place restore is finished
/// with `forward`); a journal of another QEMU is removed and nothing is touched. Runs
/// before anything else is done to the VM.
pub async fn replay(
    m: &Machine,
    qmp_socket: &Path,
    tl: &Timeline,
    forward: RollForward,
) -> Result<Found, RecoveryError> {
    let path = journal_path(qmp_socket)?;
    if std::fs::symlink_metadata(&path).is_err() {
        return Ok(Found::Nothing);
    }
    let rec = match read(&path) {
        Ok(r) => r,
        Err(JournalError::Unreadable { why, .. }) => {
            let moved_to = path.with_extension("unreadable");
            std::fs::rename(&path, &moved_to).map_err(|source| JournalError::Io { path: path.clone(), source })?;
            return Ok(Found::Unreadable { journal: path, moved_to, why });
        }
        Err(e) => return Err(e.into()),
    };
    let unknown = || RecoveryError::UnknownPid { vm: m.name().to_owned(), journal: path.clone() };
    let now = Identity::of(qmp_socket, m.pid(), m.name()).filter(|_| m.pid() != 0).ok_or_else(unknown)?;
    if !rec.vm.same_process(&now) {
        remove(&path)?;
        let liveness = rec.vm.liveness();
        return Ok(Found::Stale { journal: path, vm: rec.vm, liveness, left: rec.left });
    }
    if let Some(restore) = &rec.left.in_place {
        let step = "finish the in-place restore a killed quiesce left";
        return match tl.step(Some(m.name()), step, forward(m, restore, &rec.before)).await {
            Ok(done) => {
                remove(&path)?;
                let backup = restore.backup.clone();
                let step = match done {
                    Some(disks) => Step::RolledForward { backup, disks, resumed: rec.before.running },
                    None => Step::InPlaceNeverBegan { backup },
                };
                Ok(Found::Undone { journal: path, left: rec.left, steps: vec![step] })
            }
            Err(why) => Err(RecoveryError::InPlaceUnfinished {
                vm: m.name().to_owned(),
                restore: restore.clone(),
                before: rec.before.clone(),
                journal: path,
                why,
            }),
        };
    }
    let failed = |error: BackupError| RecoveryError::Undo {
        vm: m.name().to_owned(),
        left: rec.left.clone(),
        journal: path.clone(),
        error: Box::new(error),
    };
    let steps = tl.step(Some(m.name()), "recover what a killed quiesce left", undo(m, &rec)).await;
    let steps = match steps {
        Ok(s) => s,
        Err(RecoveryError::Undo { error, .. }) => return Err(failed(*error)),
        Err(e) => return Err(e),
    };
    remove(&path)?;
    Ok(Found::Undone { journal: path, left: rec.left, steps })
}

/// An undo error, its journal and leftovers filled in by [`replay`].
fn wrap(vm: &str) -> impl Fn(BackupError) -> RecoveryError + '_ {
    move |error| RecoveryError::Undo {
        vm: vm.to_owned(),
        left: Leftovers::default(),
        journal: PathBuf::new(),
        error: Box::new(error),
    }
}

async fn undo(m: &Machine, rec: &super::Record) -> Result<Vec<Step>, RecoveryError> {
    let fail = wrap(m.name());
    let mut steps = Vec::new();
    let frozen = if rec.left.frozen {
        let agent =
            m.agent().map_err(|_| RecoveryError::AgentNeeded { vm: m.name().to_owned(), agent: rec.agent.clone() })?;
        let status =
            agent.execute_raw("guest-fsfreeze-status", Value::Null, deadline::AGENT_COMMAND).await.map_err(|e| {
                fail(BackupError::Agent { vm: m.name().to_owned(), step: "guest-fsfreeze-status".into(), error: e })
            })?;
        status == json!("frozen")
    } else {
        false
    };
    if frozen {
        steps.push(Step::Thawed);
    }
    let disks: Vec<&str> = rec.left.overlays.iter().map(|o| o.disk.as_str()).collect();
    steps.extend(cancel_commits(m, &disks).await.map_err(&fail)?);
    let nodes = qmp(m, "query-named-block-nodes", json!({"flat": true})).await.map_err(&fail)?;
    let nodes = nodes.as_array().cloned().unwrap_or_default();
    let blocks = qmp(m, "query-block", Value::Null).await.map_err(&fail)?;
    let on_top =
        |node: &str| blocks.as_array().into_iter().flatten().any(|b| b["inserted"]["node-name"].as_str() == Some(node));
    let mut overlays = Vec::new();
    for o in &rec.left.overlays {
        let named = nodes.iter().find(|n| n["node-name"].as_str() == Some(o.node.as_str()));
        match named {
            Some(n) if opens(n, &o.file) => {
                steps.push(if on_top(&o.node) {
                    Step::Merged { disk: o.disk.clone(), overlay: o.node.clone() }
                } else {
                    Step::OverlayRemoved { overlay: o.node.clone(), file: o.file.clone() }
                });
                overlays.push((o.clone(), true));
            }
            Some(_) => steps.push(Step::LeftAlone { node: o.node.clone() }),
            // Never opened by QEMU (or already removed): only its file may be left, and it is
            // removed only if no node of QEMU's holds it.
            None if o.file.exists() && !nodes.iter().any(|n| opens(n, &o.file)) => {
                steps.push(Step::OverlayFileRemoved { file: o.file.clone() });
                overlays.push((o.clone(), false));
            }
            None => {}
        }
    }
    let reserve = rec.left.reserve.clone().filter(|r| r.exists());
    if let Some(r) = &reserve {
        steps.push(Step::ReserveRemoved { file: r.clone() });
    }
    let log = Mutex::new(Undo::from_journal(overlays, frozen, reserve));
    if !log.lock().unwrap_or_else(|e| e.into_inner()).is_clean() {
        // The undo a failed job runs; the snapshot folder plays no part in it.
        child_snapshot::recover(m, &SnapshotSettings::new(Path::new(".")), &log).await.map_err(&fail)?;
    }
    if rec.left.saving {
        if let Some(status) = left_by_saved_state(m, rec).await.map_err(&fail)? {
            let caps = attached::capabilities(m).await.map_err(&fail)?;
            saved_state::return_to(m, &before(rec), &caps).await.map_err(&fail)?;
            steps.push(Step::BackFromSavedState { status });
        }
    }
    if let Some(was) = &rec.migration {
        if attached::MigrationSettings::read(m).await.map_err(&fail)? != *was {
            was.put_back(m).await.map_err(&fail)?;
            steps.push(Step::MigrationSettingsPutBack);
        }
    }
    // Last: the overlays are merged by now, so the guest runs on its own disks again. Only
    // a VM that ran before, and is paused now (not stopped for another reason), is resumed.
    if rec.left.merge_paused && rec.before.running {
        let now = runstate::query(m).await.map_err(|e| fail(BackupError::step(m.name(), "query-status", e)))?;
        if !now.running && now.state == qapi::qmp::RunState::paused {
            crate::backup::merge::resume(m).await.map_err(&fail)?;
            steps.push(Step::ResumedAfterMerge);
        }
    }
    Ok(steps)
}

/// Pure: whether block node `n` (of `query-named-block-nodes`) opens `file`. An overlay
/// added with no backing yet is named by QEMU in its `json:` form
/// (`json:{"backing": null, "driver": "qcow2", "file": {"driver": "file", "filename": ...}}`).
pub fn opens(n: &Value, file: &Path) -> bool {
    let Some(name) = n["file"].as_str() else { return false };
    let file = file.to_string_lossy();
    if name == file {
        return true;
    }
    let Some(spec) = name.strip_prefix("json:").and_then(|j| serde_json::from_str::<Value>(j).ok()) else {
        return false;
    };
    spec["file"]["filename"].as_str() == Some(&*file) || spec["file"].as_str() == Some(&*file)
}

/// The run state the journal recorded, as the job's undo takes it.
fn before(rec: &super::Record) -> RunState {
    let fallback = if rec.before.running { qapi::qmp::RunState::running } else { qapi::qmp::RunState::paused };
    let state = serde_json::from_value(json!(rec.before.status)).unwrap_or(fallback);
    RunState { running: rec.before.running, status: rec.before.status.clone(), state }
}

/// QEMU's status if the VM is still as a Saved State leaves it: a VM that ran stopped (or
/// its state saved), or a paused one with its disks inactive. A VM that runs again, or
/// was paused by someone else with its disks active, is not touched.
async fn left_by_saved_state(m: &Machine, rec: &super::Record) -> Result<Option<String>, BackupError> {
    use qapi::qmp::RunState as S;
    let now = runstate::query(m).await.map_err(|e| BackupError::step(m.name(), "query-status", e))?;
    let inactive =
        runstate::inactive_nodes(m).await.map_err(|e| BackupError::step(m.name(), "query block nodes", e))?;
    let left = if rec.before.running {
        matches!(now.state, S::paused | S::postmigrate | S::finish_migrate) && !now.running
    } else {
        !inactive.is_empty()
    };
    Ok(left.then_some(now.status))
}

/// Cancels merges of the journal's disks that a killed quiesce left running in QEMU (its
/// job ids are `commit-DISK`), so that the overlays can be merged again.
async fn cancel_commits(m: &Machine, disks: &[&str]) -> Result<Vec<Step>, BackupError> {
    let jobs = qmp(m, "query-block-jobs", Value::Null).await?;
    let mut steps = Vec::new();
    for j in jobs.as_array().into_iter().flatten() {
        let Some(id) = j["device"].as_str().filter(|id| disks.iter().any(|d| *id == format!("commit-{d}"))) else {
            continue;
        };
        let _ = m.qmp().events().drain("BLOCK_JOB_CANCELLED");
        let _ = m.qmp().events().drain("BLOCK_JOB_COMPLETED");
        qmp(m, "block-job-cancel", json!({"device": id, "force": true})).await?;
        let is_job = |d: &Value| d["device"] == id;
        tokio::select! {
            r = m.qmp().wait_event("BLOCK_JOB_CANCELLED", is_job, deadline::BLOCK_MERGE) => r.map(drop),
            r = m.qmp().wait_event("BLOCK_JOB_COMPLETED", is_job, deadline::BLOCK_MERGE) => r.map(drop),
        }
        .map_err(|e| BackupError::step(m.name(), &format!("wait for {id} to cancel"), m.qmp_err(e)))?;
        steps.push(Step::CommitCancelled { job: id.to_owned() });
    }
    Ok(steps)
}
