//! Saved State's disk capture without copying in the VM's downtime, as Hyper-V does it with
//! a shadow copy: while the VM is stopped after its save, one QMP `transaction` puts a qcow2
//! overlay on every disk; the VM goes back to its prior run state; then the frozen images
//! under the overlays are copied out (hashed as they are written), proved against their
//! copies, and the overlays are merged back with Child VM Snapshot's own machinery.
//!
//! It needs `blockdev-set-active` (QEMU 10.0): a completed save leaves the disks inactive,
//! QEMU will not put an active overlay over an inactive node, and without that command only
//! `cont` reactivates them, which would let the guest write before the snapshot. The caller
//! probes for it and otherwise copies while the VM is stopped, as before.

use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

use serde_json::json;

use super::{qmp, return_to, with_undo, Prepared, SaveSettings};
use crate::backup::capture;
use crate::backup::child_snapshot::{self, SnapshotSettings, Undo};
use crate::backup::manifest::DiskEntry;
use crate::backup::{runstate, BackupError};
use crate::qemu::caps::Capabilities;
use crate::qemu::{DiskConfig, Machine};
use crate::sys::deadline;
use crate::timeline::Timeline;

/// What the capture produced: the copies (hashed), how long copying took, and the guest's
/// downtime (None for a VM that was paused before).
pub(super) struct Captured {
    pub(super) disks: Vec<DiskEntry>,
    pub(super) capture_ms: f64,
    pub(super) downtime_ms: Option<f64>,
}

/// The overlays' settings: in `settings.overlay_dir`, else the VM's run folder (which goes
/// with the VM, whatever happens), and the same exclusions as the save.
fn overlay_settings(m: &Machine, settings: &SaveSettings) -> SnapshotSettings {
    let mut s = SnapshotSettings::new(settings.overlay_dir.as_deref().unwrap_or(m.run_dir()));
    s.exclude = settings.exclude.clone();
    s
}

/// The disks the backup captures.
fn captured_disks(m: &Machine, settings: &SaveSettings) -> Vec<DiskConfig> {
    m.config().disks.iter().filter(|d| !settings.exclude.contains(&d.node_name)).cloned().collect()
}

/// Makes the saved VM's disks active again while it stays stopped, so overlays can go on
/// top of them; the guest cannot write until it is continued.
async fn activate(m: &Machine) -> Result<(), BackupError> {
    // QEMU reports the save completed while still in finish-migrate.
    runstate::settle(m, deadline::QMP_COMMAND).await.map_err(|e| BackupError::step(m.name(), "query-status", e))?;
    qmp(m, "blockdev-set-active", json!({"active": true})).await?;
    Ok(())
}

/// PostSnapshot of a saved VM: overlays in one transaction while it is still stopped, back
/// to its prior run state, then the copy, its proof and the merge. `undo` logs the
/// overlays, so a job interrupted here merges them back ([`child_snapshot::recover`]). On
/// an error the overlays are merged and the VM is in its prior state before returning.
pub(super) async fn capture(
    m: &Machine,
    caps: &Capabilities,
    settings: &SaveSettings,
    dir: &Path,
    tl: &Timeline,
    p: &Prepared,
    undo: &Mutex<Undo>,
) -> Result<Captured, BackupError> {
    let vm = Some(m.name());
    let snap = overlay_settings(m, settings);
    let held = async {
        tl.step(vm, "activate the disks (still stopped)", activate(m)).await?;
        tl.step(vm, "prepare overlays", child_snapshot::prepare_overlays(m, &snap, None, undo)).await?;
        tl.step(vm, "snapshot all disks (transaction)", child_snapshot::transaction(m, None, undo)).await
    }
    .await;
    // With blockdev-set-active the disks are active again whatever the run state.
    let back = tl.step(vm, "return to prior state", return_to(m, &p.before, caps)).await.map(drop);
    let downtime_ms = p.before.running.then(|| p.stopped_at.elapsed().as_secs_f64() * 1000.0);
    match (held, back) {
        (Ok(()), Ok(())) => {}
        (Err(e), Ok(())) | (Ok(()), Err(e)) => return Err(merge_back(m, &snap, undo, tl, e).await),
        (Err(e), Err(u)) => return Err(with_undo(m, merge_back(m, &snap, undo, tl, e).await, Err(u))),
    }
    let t = Instant::now();
    let disks = captured_disks(m, settings);
    let after = async {
        let copies =
            tl.step(vm, "copy frozen images", capture::copy_disks_hashed(m.name(), disks.clone(), dir)).await?;
        let capture_ms = t.elapsed().as_secs_f64() * 1000.0;
        if settings.verify_capture {
            tl.step(vm, "verify the copies", capture::prove_copies(m.name(), disks, dir, &copies)).await?;
        }
        tl.step(vm, "merge overlays (active commit)", child_snapshot::merge(m, &snap, undo)).await?;
        Ok(Captured { disks: copies, capture_ms, downtime_ms })
    }
    .await;
    match after {
        Ok(c) => Ok(c),
        Err(e) => Err(merge_back(m, &snap, undo, tl, e).await),
    }
}

/// The undo after `e`: the overlays merged and removed (nothing to thaw: the guest was never
/// frozen). The VM's run state is put back by the caller's undo, or was already.
async fn merge_back(
    m: &Machine,
    snap: &SnapshotSettings,
    undo: &Mutex<Undo>,
    tl: &Timeline,
    e: BackupError,
) -> BackupError {
    let merged = tl.step(Some(m.name()), "undo: merge overlays", child_snapshot::recover(m, snap, undo)).await;
    with_undo(m, e, merged)
}
