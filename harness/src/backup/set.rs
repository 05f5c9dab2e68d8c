//! A backup of a set of VMs, as Hyper-V's VSS writer runs it: PrepareForSnapshot (every VM
//! is saved, or frozen, snapshotted and thawed), Freeze and Thaw (nothing, but recorded), and
//! PostSnapshot (saved VMs back to their prior state; snapshot images copied out and
//! overlays merged). VMs are worked on concurrently. It is all or nothing: if any VM fails
//! in any phase, or the run is interrupted, no backup is produced and every VM is put back
//! as it was.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use futures::future::join_all;

use super::child_snapshot::{self, Frozen, SnapshotSettings, Undo};
use super::faults::Faults;
use super::folder::{Backup, BackupWriter};
use super::job::{self, Choice, MethodChoice};
use super::manifest::{Method, VmBackup};
use super::passthrough::{self, Excluded};
use super::runstate::{self, RunState};
use super::saved_state::{self, SaveSettings};
use super::BackupError;
use crate::interrupt::Interrupt;
use crate::qemu::caps::Capabilities;
use crate::qemu::Machine;
use crate::timeline::Timeline;

pub struct Member<'a> {
    pub machine: &'a Machine,
    pub method: MethodChoice,
    pub snapshot: SnapshotSettings,
    pub save: SaveSettings,
    /// Disks declared to be iSCSI LUNs (in addition to those QEMU's graph shows).
    pub declared_iscsi: Vec<String>,
    /// Test-only fault injection into this VM's backup; [`Faults::default`] injects none.
    pub faults: Faults,
    /// For a VM quiesce did not start: its recovery journal, written before each change.
    pub journal: Option<std::sync::Arc<super::recovery::Journal>>,
}

/// What the job did with each VM.
#[derive(Debug, Clone)]
pub struct SetOutcome {
    pub backup: Backup,
    pub choices: Vec<(String, Choice)>,
    pub excluded: Vec<Excluded>,
    /// VMs with no disk the host can back up: reported, not failed.
    pub skipped: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum SetError {
    /// A VM failed in a phase: no backup was produced, and every VM was put back as it was
    /// (`undone` says how, per VM, and names any that could not be).
    #[error("{phase} failed: {}\nno VM was backed up; {}", naming_vm(vm, error), undone_text(.undone))]
    Failed { vm: String, phase: &'static str, error: Box<BackupError>, undone: Vec<(String, Undone)> },
    /// The run was interrupted (SIGINT, SIGTERM): no backup was produced, and every VM was
    /// put back as it was (`undone` says how, per VM, and names any that could not be).
    #[error("interrupted in {phase}; no VM was backed up; {}", undone_text(.undone))]
    Interrupted { phase: &'static str, undone: Vec<(String, Undone)> },
    /// A VM's conditions ruled out the method the job demanded, or QEMU cannot save it; the
    /// job was refused before any VM was touched.
    #[error("VM {vm}: Child VM Snapshot was required, but: {reasons}")]
    Refused { vm: String, reasons: String, choices: Vec<(String, Choice)> },
    /// The job could not start, or its backup folder could not be written; no VM was
    /// frozen or saved by then.
    #[error(transparent)]
    Backup(#[from] BackupError),
}

impl SetError {
    /// The VMs put back with their disks inactive until they are continued.
    pub fn inactive_until_continued(&self) -> Vec<String> {
        let undone = match self {
            SetError::Failed { undone, .. } | SetError::Interrupted { undone, .. } => &undone[..],
            _ => &[],
        };
        undone
            .iter()
            .filter(|(_, u)| {
                matches!(u, Undone::PutBack { steps, .. } if steps.contains(&UndoStep::DisksInactiveUntilContinued))
            })
            .map(|(vm, _)| vm.clone())
            .collect()
    }
}

/// What putting one VM back after a failed or interrupted job did.
#[derive(Debug)]
pub enum Undone {
    /// The VM is as it was before the job (`before` is its run state then); `steps` is
    /// what that took, empty when nothing needed undoing.
    PutBack { steps: Vec<UndoStep>, before: RunState },
    /// The VM could not be put back: it may be left frozen, paused, saved or on an overlay,
    /// and needs a person to look at it.
    CouldNotPutBack(BackupError),
}

/// One thing done to put a VM back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UndoStep {
    /// The guest was thawed, the overlays merged and removed, here.
    ThawedAndMerged,
    /// The same, done already by the method's own undo when it failed.
    ThawedAndMergedByItsOwnUndo,
    /// The VM came back from its saved state to the run state it had.
    BackFromSavedState,
    /// A paused VM whose QEMU cannot make its disks active without running it (before
    /// 10.0): they stay inactive until it is continued, as after a save on such a QEMU.
    DisksInactiveUntilContinued,
}

impl std::fmt::Display for UndoStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            UndoStep::ThawedAndMerged => "thawed, merged and overlays removed",
            UndoStep::ThawedAndMergedByItsOwnUndo => "thawed, merged and overlays removed by its own undo",
            UndoStep::BackFromSavedState => "back from the saved state",
            UndoStep::DisksInactiveUntilContinued => "its disks stay inactive until it is continued",
        })
    }
}

impl std::fmt::Display for Undone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Undone::PutBack { steps, before } if steps.is_empty() => write!(f, "as before ({})", before.label()),
            Undone::PutBack { steps, before } => {
                let steps: Vec<String> = steps.iter().map(UndoStep::to_string).collect();
                write!(f, "{} ({})", steps.join(", "), before.label())
            }
            Undone::CouldNotPutBack(e) => write!(f, "COULD NOT BE PUT BACK: {e}"),
        }
    }
}

fn undone_text(undone: &[(String, Undone)]) -> String {
    if undone.is_empty() {
        return "nothing needed undoing".into();
    }
    let parts: Vec<String> = undone.iter().map(|(vm, what)| format!("{vm}: {what}")).collect();
    format!("undone: {}", parts.join("; "))
}

/// The error, led by its VM's name unless it names it already.
fn naming_vm(vm: &str, error: &BackupError) -> String {
    match error {
        BackupError::Folder(_) => format!("VM {vm}: {error}"),
        _ => error.to_string(),
    }
}

/// The first VM to fail in a phase.
#[derive(Debug, thiserror::Error)]
#[error("{}", naming_vm(vm, error))]
struct VmFailure {
    vm: String,
    error: BackupError,
}

/// Per VM, what PrepareForSnapshot left to finish or undo.
enum Prepared {
    Saved(saved_state::Prepared),
    Snap(Frozen),
    /// Nothing to back up (all disks excluded).
    Skip,
}

struct Slot<'a> {
    member: &'a Member<'a>,
    before: RunState,
    choice: Choice,
    undo: Mutex<Undo>,
    dir: PathBuf,
    /// Its disks the host cannot back up.
    exclude: Vec<String>,
    prepared: Mutex<Option<Prepared>>,
}

pub async fn run(
    members: &[Member<'_>],
    caps: &Capabilities,
    path: &Path,
    tl: &Timeline,
    interrupt: &Interrupt,
) -> Result<SetOutcome, SetError> {
    let mut writer = BackupWriter::create(path, &caps.version).map_err(BackupError::from)?;
    // What each VM is doing, and which disks the host cannot see, before anything changes.
    let mut excluded = Vec::new();
    let mut slots = Vec::new();
    let mut choices = Vec::new();
    for m in members {
        let vm = m.machine.name();
        let before = runstate::query(m.machine).await.map_err(|e| BackupError::step(vm, "query-status", e))?;
        let ex = passthrough::find(m.machine, &m.declared_iscsi)
            .await
            .map_err(|e| BackupError::step(vm, "find pass-through disks", e))?;
        excluded.extend(ex.iter().cloned());
        let choice = match job::choose(m.machine, m.method, &m.snapshot.snapshot_dir, tl).await {
            Ok(c) => c,
            Err(BackupError::Refused { reasons, conditions, .. }) => {
                // A forced Child VM Snapshot whose conditions fail, or a Saved State QEMU cannot take.
                let method = if m.method == job::MethodChoice::ChildSnapshot {
                    Method::ChildSnapshot
                } else {
                    Method::SavedState
                };
                let refused = Choice { method, reason: format!("refused: {reasons}"), conditions };
                choices.push((vm.to_owned(), refused));
                return Err(SetError::Refused { vm: vm.to_owned(), reasons, choices });
            }
            Err(e) => return Err(e.into()),
        };
        choices.push((vm.to_owned(), choice.clone()));
        slots.push(Slot {
            member: m,
            before,
            choice,
            undo: Mutex::new(Undo::journaled(m.journal.clone())),
            dir: writer.vm_dir(vm).map_err(BackupError::from)?,
            exclude: ex.iter().map(|e| e.disk.clone()).collect(),
            prepared: Mutex::new(None),
        });
    }
    let skipped: Vec<String> = slots
        .iter()
        .filter(|s| s.member.machine.config().disks.iter().all(|d| s.exclude.contains(&d.node_name)))
        .map(|s| s.member.machine.name().to_owned())
        .collect();

    // PrepareForSnapshot, all VMs at once; the phase ends when every VM is done.
    let prepare = tl.step(None, "PrepareForSnapshot", async {
        let results = join_all(slots.iter().map(|s| prepare_one(s, caps, &s.exclude, &skipped, tl, interrupt))).await;
        match results
            .into_iter()
            .zip(&slots)
            .find_map(|(r, s)| r.err().map(|e| (s.member.machine.name().to_owned(), e)))
        {
            None => Ok(()),
            Some((vm, error)) => Err(VmFailure { vm, error }),
        }
    });
    // Biased, interruption first: once it has fired, no further step starts.
    let prepared = tokio::select! {
        biased;
        _ = interrupt.fired() => None,
        r = prepare => Some(r),
    };
    match prepared {
        None => {
            return Err(SetError::Interrupted { phase: "PrepareForSnapshot", undone: undo_all(&slots, caps, tl).await })
        }
        Some(Err(VmFailure { vm, error })) => {
            let undone = undo_all(&slots, caps, tl).await;
            return Err(SetError::Failed { vm, phase: "PrepareForSnapshot", error: Box::new(error), undone });
        }
        Some(Ok(())) => {}
    }
    // As in Hyper-V, the writer does nothing in these two; they are recorded all the same.
    tl.step(None, "Freeze", async { Ok::<_, SetError>(()) }).await?;
    tl.step(None, "Thaw", async { Ok::<_, SetError>(()) }).await?;
    for s in &slots {
        s.member.faults.after_prepare(s.member.machine, tl);
    }

    // PostSnapshot: every VM back to what it was doing, the images copied out.
    let post = tl.step(None, "PostSnapshot", async {
        let results = join_all(slots.iter().map(|s| post_one(s, caps, &s.exclude, tl))).await;
        let mut out = Vec::new();
        let mut first_err = None;
        for (r, s) in results.into_iter().zip(&slots) {
            match r {
                Ok(Some(vb)) => out.push(vb),
                Ok(None) => {}
                Err(error) => {
                    first_err.get_or_insert(VmFailure { vm: s.member.machine.name().to_owned(), error });
                }
            }
        }
        match first_err {
            None => Ok(out),
            Some(e) => Err(e),
        }
    });
    let done = tokio::select! {
        biased;
        _ = interrupt.fired() => None,
        r = post => Some(r),
    };
    let vms = match done {
        None => return Err(SetError::Interrupted { phase: "PostSnapshot", undone: undo_all(&slots, caps, tl).await }),
        Some(Err(VmFailure { vm, error })) => {
            // The others finished their PostSnapshot (back as before); the backup is dropped.
            let undone = undo_all(&slots, caps, tl).await;
            return Err(SetError::Failed { vm, phase: "PostSnapshot", error: Box::new(error), undone });
        }
        Some(Ok(v)) => v,
    };
    for vb in vms {
        writer.add(vb);
    }
    let backup = writer.commit().map_err(BackupError::from)?;
    Ok(SetOutcome { backup, choices, excluded, skipped })
}

async fn prepare_one(
    s: &Slot<'_>,
    caps: &Capabilities,
    exclude: &[String],
    skipped: &[String],
    tl: &Timeline,
    interrupt: &Interrupt,
) -> Result<(), BackupError> {
    let m = s.member.machine;
    if skipped.iter().any(|v| v == m.name()) {
        *s.prepared.lock().unwrap_or_else(|e| e.into_inner()) = Some(Prepared::Skip);
        return Ok(());
    }
    let p = match s.choice.method {
        Method::SavedState => {
            let mut settings = s.member.save.clone();
            settings.exclude = exclude.to_vec();
            Prepared::Saved(saved_state::prepare(m, caps, &settings, &s.member.faults, &s.dir, tl, &s.undo).await?)
        }
        Method::ChildSnapshot => {
            let mut settings = s.member.snapshot.clone();
            settings.exclude = exclude.to_vec();
            Prepared::Snap(child_snapshot::prepare(m, &settings, &s.member.faults, interrupt, tl, &s.undo).await?)
        }
    };
    *s.prepared.lock().unwrap_or_else(|e| e.into_inner()) = Some(p);
    Ok(())
}

async fn post_one(
    s: &Slot<'_>,
    caps: &Capabilities,
    exclude: &[String],
    tl: &Timeline,
) -> Result<Option<VmBackup>, BackupError> {
    let m = s.member.machine;
    let prepared = s.prepared.lock().unwrap_or_else(|e| e.into_inner()).take();
    let machine = job::machine_spec(m, &s.dir)?;
    let (disks, state, timings, freeze) = match prepared {
        None | Some(Prepared::Skip) => return Ok(None),
        Some(Prepared::Saved(p)) => {
            let mut settings = s.member.save.clone();
            settings.exclude = exclude.to_vec();
            let saved = saved_state::post(m, caps, &settings, &s.dir, tl, p, &s.undo).await?;
            (saved.disks, Some(saved.state), saved.timings, None)
        }
        Some(Prepared::Snap(f)) => {
            let mut settings = s.member.snapshot.clone();
            settings.exclude = exclude.to_vec();
            let snap = child_snapshot::post(m, &settings, &s.member.faults, &s.dir, tl, &s.undo, f).await?;
            (snap.disks, None, snap.timings, Some(snap.freeze))
        }
    };
    Ok(Some(VmBackup {
        name: m.name().to_owned(),
        method: s.choice.method,
        method_reason: s.choice.reason.clone(),
        conditions: s.choice.conditions.clone(),
        run_state_before: s.before.activity(),
        machine,
        disks,
        state,
        excluded: m
            .config()
            .disks
            .iter()
            .filter(|d| exclude.contains(&d.node_name))
            .map(|d| super::manifest::ExcludedDisk {
                node_name: d.node_name.clone(),
                virtual_size: crate::image::qemu_img::virtual_size(&d.path).unwrap_or(0),
                why: format!("pass-through or iSCSI: {}", super::passthrough::ADVICE),
            })
            .collect(),
        timings,
        freeze,
        files: vec![],
    }))
}

/// Puts every VM back as it was before the job: thawed, overlays merged and removed, run
/// state as before. Returns what was done (or why it could not be) per VM. A saved VM's
/// overlays (taken in its PostSnapshot) are in the same undo log as a snapshotted VM's, so
/// an interruption there merges them too; its step then reads "thawed, merged", the thaw
/// being nothing for a guest that was never frozen.
async fn undo_all(slots: &[Slot<'_>], caps: &Capabilities, tl: &Timeline) -> Vec<(String, Undone)> {
    let results = join_all(slots.iter().map(|s| async move {
        let m = s.member.machine;
        let name = m.name().to_owned();
        let (had_snapshot, undid_itself) = {
            let u = s.undo.lock().unwrap_or_else(|e| e.into_inner());
            (!u.is_clean(), u.recovered())
        };
        let r = async {
            let mut done = Vec::new();
            if had_snapshot {
                tl.step(
                    Some(m.name()),
                    "undo: thaw and merge",
                    child_snapshot::recover(m, &s.member.snapshot, &s.undo),
                )
                .await?;
                done.push(UndoStep::ThawedAndMerged);
            } else if undid_itself {
                done.push(UndoStep::ThawedAndMergedByItsOwnUndo);
            }
            let now = runstate::query(m).await.map_err(|e| BackupError::step(m.name(), "query-status", e))?;
            if now.running != s.before.running
                || !runstate::inactive_nodes(m).await.map(|v| v.is_empty()).unwrap_or(true)
            {
                let disks = saved_state::undo(m, caps, &s.before, tl).await?;
                done.push(UndoStep::BackFromSavedState);
                if matches!(disks, saved_state::Disks::InactiveUntilContinued(_)) {
                    done.push(UndoStep::DisksInactiveUntilContinued);
                }
            }
            Ok::<_, BackupError>(done)
        }
        .await;
        (
            name,
            match r {
                Ok(steps) => Undone::PutBack { steps, before: s.before.clone() },
                Err(e) => Undone::CouldNotPutBack(e),
            },
        )
    }))
    .await;
    results
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qemu::MachineError;

    fn was(running: bool) -> RunState {
        let (status, state) =
            if running { ("running", qapi::qmp::RunState::running) } else { ("paused", qapi::qmp::RunState::paused) };
        RunState { running, status: status.into(), state }
    }

    /// The text reports and fixtures show for each VM put back (or not).
    #[test]
    fn undone_reads_as_before() {
        let as_before = Undone::PutBack { steps: vec![], before: was(true) };
        assert_eq!(as_before.to_string(), "as before (running)");
        let steps = vec![UndoStep::ThawedAndMergedByItsOwnUndo, UndoStep::BackFromSavedState];
        let both = Undone::PutBack { steps, before: was(false) };
        assert_eq!(
            both.to_string(),
            "thawed, merged and overlays removed by its own undo, back from the saved state (paused)"
        );
        let gone = MachineError::NoAgent { name: "vm2".into() };
        let lost = Undone::CouldNotPutBack(BackupError::step("vm2", "query-status", gone));
        assert!(lost.to_string().starts_with("COULD NOT BE PUT BACK: VM vm2: query-status: "), "{lost}");
        let all = [("vm1".to_owned(), as_before), ("vm2".to_owned(), lost)];
        assert!(undone_text(&all).starts_with("undone: vm1: as before (running); vm2: COULD NOT BE PUT BACK: "));
        assert_eq!(undone_text(&[]), "nothing needed undoing");
    }
}
