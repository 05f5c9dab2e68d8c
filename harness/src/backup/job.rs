//! Backing up one VM into a backup folder: choosing its method from the six conditions,
//! running that method, and recording the result in the manifest. (Sets of VMs and the
//! writer phases build on this.)

use std::path::Path;
use std::sync::Mutex;

use qapi::qmp::{query_migrate, MigrationInfo};
use serde::Deserialize;

use super::child_snapshot::{self, SnapshotSettings, Undo};
use super::conditions::{self, Verdict};
use super::faults::Faults;
use super::folder::BackupWriter;
use super::manifest::{MachineSpec, Method, VmBackup};
use super::runstate;
use super::saved_state::{self, SaveSettings};
use super::BackupError;
use crate::qemu::caps::Capabilities;
use crate::qemu::{Machine, MachineConfig};
use crate::sys::deadline;
use crate::timeline::Timeline;

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum MethodChoice {
    /// Child VM Snapshot when all six conditions hold, else Saved State.
    #[default]
    Auto,
    /// Child VM Snapshot or nothing: refused, touching nothing, if a condition fails.
    ChildSnapshot,
    SavedState,
}

/// The method a VM gets, why, and the conditions as evaluated.
#[derive(Debug, Clone)]
pub struct Choice {
    pub method: Method,
    pub reason: String,
    pub conditions: Vec<Verdict>,
}

pub async fn choose(
    m: &Machine,
    choice: MethodChoice,
    snapshot_dir: &Path,
    tl: &Timeline,
) -> Result<Choice, BackupError> {
    if choice == MethodChoice::SavedState {
        return saved_state_possible(m, "saved-state was chosen".into(), vec![]).await;
    }
    let verdicts = tl
        .step(Some(m.name()), "check the six conditions", async {
            Ok::<_, BackupError>(conditions::evaluate(m, snapshot_dir, deadline::condition_agent_command()).await)
        })
        .await?;
    match (conditions::failures(&verdicts), choice) {
        (None, _) => Ok(Choice {
            method: Method::ChildSnapshot,
            reason: "all six Child VM Snapshot conditions hold".into(),
            conditions: verdicts,
        }),
        (Some(failed), MethodChoice::ChildSnapshot) => {
            Err(BackupError::Refused { vm: m.name().to_owned(), reasons: failed, conditions: verdicts })
        }
        (Some(failed), _) => saved_state_possible(m, format!("fell back to Saved State: {failed}"), verdicts).await,
    }
}

/// Saved State, unless QEMU would refuse to save this VM: some image formats (VHD, VHDX,
/// VDI...) block migration, so `migrate` would fail after the other VMs of the job were
/// already saved or frozen. Refused here, before anything is touched, with QEMU's reasons.
async fn saved_state_possible(
    m: &Machine,
    reason: String,
    conditions: Vec<conditions::Verdict>,
) -> Result<Choice, BackupError> {
    let info = m
        .qmp()
        .execute_within(query_migrate {}, deadline::QMP_COMMAND)
        .await
        .map_err(|e| BackupError::step(m.name(), "query-migrate", m.qmp_err(e)))?;
    let blocked = migration_blockers(&info);
    if !blocked.is_empty() {
        let reasons = format!("{reason}, but QEMU cannot save this VM: {}", blocked.join("; "));
        return Err(BackupError::Refused { vm: m.name().to_owned(), reasons, conditions });
    }
    Ok(Choice { method: Method::SavedState, reason, conditions })
}

/// QEMU's reasons that a migration (and so a save) is impossible now (`blocked-reasons`,
/// QEMU 6.0+; absent when nothing blocks it), each cut to a readable length.
pub fn migration_blockers(info: &MigrationInfo) -> Vec<String> {
    let reasons = info.blocked_reasons.as_deref().unwrap_or_default();
    reasons.iter().map(|r| crate::qemu::message::snippet(r.as_bytes())).collect()
}

/// The machine configuration a restore needs, with kernel and initrd copied into `dir/boot`
/// so the backup restores without the image cache that booted the VM.
pub fn machine_spec(m: &Machine, dir: &Path) -> Result<MachineSpec, BackupError> {
    machine_spec_of(m.name(), m.config(), dir)
}

/// [`machine_spec`] from a configuration alone (a libvirt domain's, read from its XML). A
/// firmware boot (a Windows guest) boots its own disk: there is nothing to copy. A kernel
/// boot without an initrd copies the kernel alone.
pub fn machine_spec_of(vm: &str, cfg: &MachineConfig, dir: &Path) -> Result<MachineSpec, BackupError> {
    let firmware = cfg.boot.is_firmware();
    let has_initrd = !cfg.boot.initrd.as_os_str().is_empty();
    if !firmware {
        let boot = dir.join("boot");
        std::fs::create_dir_all(&boot).map_err(|e| BackupError::io(vm, "create the boot folder", e))?;
        for (from, to) in [(&cfg.boot.kernel, "vmlinuz"), (&cfg.boot.initrd, "initrd.img")] {
            if !from.as_os_str().is_empty() {
                std::fs::copy(from, boot.join(to)).map_err(|e| BackupError::io(vm, "copy the kernel and initrd", e))?;
            }
        }
    }
    Ok(MachineSpec {
        machine_type: cfg.machine_type.clone(),
        accel: cfg.accel,
        memory_mib: cfg.memory_mib,
        cpus: cfg.cpus,
        agent: cfg.agent,
        kernel: if firmware { "".into() } else { "boot/vmlinuz".into() },
        initrd: if firmware || !has_initrd { "".into() } else { "boot/initrd.img".into() },
        append: cfg.boot.append.clone(),
        disk_order: cfg.disks.iter().map(|d| d.node_name.clone()).collect(),
    })
}

/// Everything a backup of one VM needs besides the VM.
pub struct JobSettings<'a> {
    pub caps: &'a Capabilities,
    pub save: SaveSettings,
    pub snapshot: SnapshotSettings,
    /// Test-only fault injection; [`Faults::default`] injects none.
    pub faults: Faults,
}

/// Backs `m` up by `choice.method` into `writer`. For Child VM Snapshot, `undo` records
/// what was done, so an interrupted backup can be put right with [`child_snapshot::recover`].
pub async fn backup(
    m: &Machine,
    choice: &Choice,
    settings: &JobSettings<'_>,
    writer: &mut BackupWriter,
    tl: &Timeline,
    undo: &Mutex<Undo>,
) -> Result<VmBackup, BackupError> {
    let dir = writer.vm_dir(m.name())?;
    let machine = machine_spec(m, &dir)?;
    let (before, disks, state, timings, freeze) = match choice.method {
        Method::SavedState => {
            let saved = saved_state::save(m, settings.caps, &settings.save, &settings.faults, &dir, tl).await?;
            (saved.before, saved.disks, Some(saved.state), saved.timings, None)
        }
        Method::ChildSnapshot => {
            let before = runstate::query(m).await.map_err(|e| BackupError::step(m.name(), "query-status", e))?;
            let snap = child_snapshot::snapshot(m, &settings.snapshot, &settings.faults, &dir, tl, undo).await?;
            (before, snap.disks, None, snap.timings, Some(snap.freeze))
        }
    };
    let vm = VmBackup {
        name: m.name().to_owned(),
        method: choice.method,
        method_reason: choice.reason.clone(),
        conditions: choice.conditions.clone(),
        run_state_before: before.activity(),
        machine,
        disks,
        state,
        excluded: vec![],
        timings,
        freeze,
        files: vec![],
    };
    writer.add(vm.clone());
    Ok(vm)
}

/// Backs `m` up with the Saved State method into `writer` (no condition checks).
pub async fn saved_state(
    m: &Machine,
    caps: &Capabilities,
    settings: &SaveSettings,
    reason: &str,
    writer: &mut BackupWriter,
    tl: &Timeline,
) -> Result<VmBackup, BackupError> {
    let choice = Choice { method: Method::SavedState, reason: reason.to_owned(), conditions: vec![] };
    let js = JobSettings {
        caps,
        save: settings.clone(),
        snapshot: SnapshotSettings::new(Path::new(".")),
        faults: Faults::default(),
    };
    backup(m, &choice, &js, writer, tl, &Mutex::new(Undo::default())).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(reply: serde_json::Value) -> Result<MigrationInfo, serde_json::Error> {
        serde_json::from_value(reply)
    }

    #[test]
    fn migration_blockers_are_read_from_query_migrate() {
        // As QEMU 10.0 answers with a VHDX disk attached (recorded).
        let blocked = info(
            serde_json::json!({"blocked-reasons": ["The vhdx format used by node 'd0' does not support live migration"]}),
        );
        assert_eq!(
            migration_blockers(&blocked.unwrap()),
            vec!["The vhdx format used by node 'd0' does not support live migration"]
        );
        assert!(migration_blockers(&info(serde_json::json!({})).unwrap()).is_empty());
        // A reply of the wrong shape is an error of its own, not "nothing blocks it".
        assert!(info(serde_json::json!({"blocked-reasons": "garbage"})).is_err());
    }
}
