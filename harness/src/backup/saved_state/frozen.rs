//! Saved State's disk capture without copying in the VM's downtime, as Hyper-V does it with
//! a shadow copy: while the VM is stopped after its save, one QMP `transaction` puts a qcow2
//! overlay on every disk; the VM goes back to its prior run state; then the frozen images
//! under the overlays are copied out (hashed as they are written), proved against their
//! copies, and the overlays are merged back with Child VM Snapshot's own machinery.
//!
//! Nothing that grows with the disks, or runs a program, is left in the downtime: the
//! overlays are made ([`prepare`]) and the host's cache of the disks written back and
//! dropped ([`drop_host_cache`]) before the VM is stopped, so the stopped VM waits only for
//! its save, the reactivation, the transaction and `cont`.
//!
//! It needs `blockdev-set-active` (QEMU 10.0): a completed save leaves the disks inactive,
//! QEMU will not put an active overlay over an inactive node, and without that command only
//! `cont` reactivates them, which would let the guest write before the snapshot. The caller
//! probes for it and otherwise copies while the VM is stopped, as before.

use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

use serde_json::json;

use super::{qmp, return_to, with_undo, Prepared, SaveSettings, STATE_FILE};
use crate::backup::capture;
use crate::backup::child_snapshot::{self, SnapshotSettings, Undo};
use crate::backup::manifest::DiskEntry;
use crate::backup::{runstate, BackupError};
use crate::qemu::caps::Capabilities;
use crate::qemu::{DiskConfig, Machine};
use crate::sys::deadline;
use crate::timeline::Timeline;

/// What the capture produced: the copies (hashed), how long copying took, the guest's
/// downtime (None for a VM that was paused before), and the state file's sha256 and length
/// where it was hashed beside the copy.
pub(super) struct Captured {
    pub(super) disks: Vec<DiskEntry>,
    pub(super) capture_ms: f64,
    pub(super) downtime_ms: Option<f64>,
    pub(super) state: Option<(String, u64)>,
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

/// Writes back and then drops the host's page cache of every file under the VM's disks
/// (whole backing chains), while the VM still runs: making a disk active again
/// (`blockdev-set-active`, [`activate`]) flushes each file and drops its cached pages
/// (QEMU's file driver does, so that a migration destination never reads stale pages),
/// which takes time in proportion to what is cached, and that is inside the downtime.
/// Done here first, it leaves that step only what the guest touched since. Best effort:
/// a file that cannot be opened here only costs downtime, so nothing fails on it.
pub(super) async fn drop_host_cache(m: &Machine) -> Result<(), BackupError> {
    let Ok(nodes) = qmp(m, "query-named-block-nodes", json!({"flat": true})).await else { return Ok(()) };
    let files: Vec<std::path::PathBuf> = nodes
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter(|n| n["drv"] == "file")
        .filter_map(|n| n["file"].as_str().map(std::path::PathBuf::from))
        .collect();
    let _ = tokio::task::spawn_blocking(move || {
        for f in files {
            let Ok(file) = std::fs::File::open(&f) else { continue };
            // Dirty pages are not dropped: write them back first.
            let _ = file.sync_data();
            let _ = nix::fcntl::posix_fadvise(
                std::os::fd::AsRawFd::as_raw_fd(&file),
                0,
                0,
                nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
            );
        }
    })
    .await;
    Ok(())
}

/// PrepareForSnapshot's share, while the VM still runs: makes the overlays (image files and
/// unattached nodes, logged in `undo`) that [`capture`]'s transaction will put on the
/// disks, so that the downtime holds no qemu-img run. [`discard`] removes them if the save
/// fails.
pub(super) async fn prepare(m: &Machine, settings: &SaveSettings, undo: &Mutex<Undo>) -> Result<(), BackupError> {
    child_snapshot::prepare_overlays(m, &overlay_settings(m, settings), None, undo).await
}

/// Removes overlays [`prepare`] made that no transaction used (a save that failed), and the
/// merge reserve. Nothing was snapshotted, so nothing is merged.
pub(super) async fn discard(m: &Machine, undo: &Mutex<Undo>) -> Result<(), BackupError> {
    let released = child_snapshot::release_reserve(m, undo);
    child_snapshot::remove_overlays(m, undo).await.and(released)
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
        // The state file is hashed and made durable beside the copy, off the downtime: it
        // is still in the host's cache, and its writeback overlaps the copy's.
        // Inside the copy's step, as a step of its own would change every scenario's
        // timeline.
        let (copies, state) = tl
            .step(vm, "copy frozen images", async {
                let (copies, state) = tokio::join!(
                    capture::copy_disks_checked(m.name(), disks.clone(), dir),
                    hash_state(m.name(), dir.join(STATE_FILE)),
                );
                Ok::<_, BackupError>((copies?, state?))
            })
            .await?;
        let capture_ms = t.elapsed().as_secs_f64() * 1000.0;
        if settings.verify_capture {
            tl.step(vm, "verify the copies", capture::prove_copies(m.name(), disks, dir, &copies)).await?;
        }
        tl.step(vm, "merge overlays (active commit)", child_snapshot::merge(m, &snap, undo)).await?;
        let disks = copies.into_iter().map(|c| c.entry).collect();
        Ok(Captured { disks, capture_ms, downtime_ms, state: Some(state) })
    }
    .await;
    match after {
        Ok(c) => Ok(c),
        Err(e) => Err(merge_back(m, &snap, undo, tl, e).await),
    }
}

/// The sha256 and length of the state file, which is then made durable (fdatasync).
async fn hash_state(vm: &str, path: std::path::PathBuf) -> Result<(String, u64), BackupError> {
    let io = |e| BackupError::io(vm, "hash the state file", e);
    tokio::task::spawn_blocking(move || crate::backup::folder::sha256_and_sync(std::fs::File::open(path)?))
        .await
        .map_err(|e| io(std::io::Error::other(e)))?
        .map_err(io)
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
