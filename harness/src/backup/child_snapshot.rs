//! The Child VM Snapshot method. The guest agent freezes the guest's filesystems, one QMP
//! `transaction` puts a qcow2 overlay on top of every disk at once, and the guest is thawed.
//! The frozen images underneath are then copied out as the backup, and the overlays are
//! merged back with an active `block-commit`, so the VM runs on its own images and keeps
//! every write it made meanwhile.
//!
//! The overlays are created and added to QEMU before the freeze, so only the transaction
//! runs while the guest is frozen. Every step is written to an [`Undo`] log first; on an
//! error, and after an interruption, [`recover`] thaws the guest, merges what was
//! snapshotted and removes the overlays.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use qapi::qga::{guest_fsfreeze_freeze, guest_fsfreeze_thaw};
use qapi::qmp::query_block;
use serde_json::{json, Value};

use super::faults::{Faults, UNCREATABLE_OVERLAY};
use super::freeze_log::{self, FreezeRecord};
use super::manifest::{DiskEntry, Timings};
use super::merge::{self, CommitLimits, MergeOutcome};
use super::recovery;
use super::saved_state::{qmp, qmp_typed};
use super::BackupError;
use crate::image::qemu_img;
use crate::interrupt::Interrupt;
use crate::qemu::{DiskConfig, Machine};
use crate::sys::deadline;
use crate::timeline::Timeline;

#[derive(Debug, Clone)]
pub struct SnapshotSettings {
    /// Where the overlays go; must be on the disks' host volume (a condition checks it).
    pub snapshot_dir: PathBuf,
    /// The freeze must return within this ([`deadline::GUEST_FREEZE`] unless changed).
    pub freeze_deadline: Duration,
    pub thaw_deadline: Duration,
    /// What the end of a merge may take once it has caught up (or once the VM is paused).
    pub merge_deadline: Duration,
    /// How long an active commit may take to catch up with the guest's writes before the
    /// VM is paused for the rest of the merge ([`deadline::BLOCK_MERGE`] unless changed).
    pub merge_converge: Duration,
    /// The merge's rate limit in bytes per second (QMP `speed`), so that it leaves the
    /// guest's own I/O room; none means as fast as it goes.
    pub merge_speed: Option<u64>,
    /// Bytes allocated in the snapshot folder before the snapshot and released before the
    /// merge, so that overlays that filled their volume can still be merged (see `merge`).
    pub merge_reserve: u64,
    /// Re-read each copied image against the frozen one (`qemu-img compare`).
    pub verify_capture: bool,
    /// Disks (node names) the host cannot back up (pass-through, iSCSI): left out.
    pub exclude: Vec<String>,
}

impl SnapshotSettings {
    pub fn new(snapshot_dir: &Path) -> Self {
        Self {
            snapshot_dir: snapshot_dir.to_owned(),
            freeze_deadline: deadline::GUEST_FREEZE,
            thaw_deadline: deadline::GUEST_THAW,
            merge_deadline: deadline::BLOCK_MERGE,
            merge_converge: deadline::BLOCK_MERGE,
            merge_speed: None,
            merge_reserve: DEFAULT_MERGE_RESERVE,
            verify_capture: true,
            exclude: vec![],
        }
    }
}

/// The merge reserve unless changed: room for 64 MiB of clusters new to the disks.
pub const DEFAULT_MERGE_RESERVE: u64 = 64 << 20;

#[derive(Debug, Clone)]
struct Overlay {
    disk: DiskConfig,
    /// The node QEMU attaches the disk's device to: the overlay goes on it, and is merged
    /// into it.
    base_node: String,
    node: String,
    path: PathBuf,
    added: bool,
}

/// What has been done to the VM so far, so that it can be undone.
#[derive(Debug, Default)]
pub struct Undo {
    overlays: Vec<Overlay>,
    /// The merge reserve's file, until it is released.
    reserve: Option<PathBuf>,
    /// A freeze was sent and no thaw has succeeded since.
    frozen: bool,
    /// The transaction succeeded: the VM writes to the overlays until they are merged.
    snapshotted: bool,
    /// A recovery put the VM back from a state that was not clean.
    recovered: bool,
    /// Saved State: the VM is (about to be) stopped and saved, and not back yet. Only the
    /// recovery journal reads it; the job's undo compares run states.
    saving: bool,
    /// The VM is (about to be) paused to finish a merge that did not converge. Only the
    /// recovery journal reads it; the merge resumes the VM on every path itself.
    merge_paused: bool,
    /// For a VM quiesce did not start: the journal each change is written to first, so that
    /// the next run can undo it if this one is killed ([`recovery`]).
    journal: Option<Arc<recovery::Journal>>,
}

impl Undo {
    /// True when nothing is left to undo.
    pub fn is_clean(&self) -> bool {
        !self.frozen && !self.snapshotted && self.overlays.is_empty() && self.reserve.is_none()
    }

    /// True when a recovery already undid something (thawed, merged or removed overlays).
    pub fn recovered(&self) -> bool {
        self.recovered
    }

    /// A log whose changes are written to `journal` before they are made.
    pub fn journaled(journal: Option<Arc<recovery::Journal>>) -> Self {
        Undo { journal, ..Default::default() }
    }

    /// What is left to undo, as the journal records it.
    fn leftovers(&self) -> recovery::Leftovers {
        recovery::Leftovers {
            frozen: self.frozen,
            saving: self.saving,
            overlays: self
                .overlays
                .iter()
                .map(|o| recovery::OverlayRecord {
                    disk: o.disk.node_name.clone(),
                    base_node: o.base_node.clone(),
                    node: o.node.clone(),
                    file: o.path.clone(),
                })
                .collect(),
            reserve: self.reserve.clone(),
            merge_paused: self.merge_paused,
            in_place: None,
        }
    }

    /// A log rebuilt from a journal a killed quiesce left ([`recovery::replay`]): the
    /// overlays QEMU still has (`added`) or whose files are still there, a guest found
    /// frozen, the reserve; [`recover`] then undoes them as after a failure.
    pub(super) fn from_journal(
        overlays: Vec<(recovery::OverlayRecord, bool)>,
        frozen: bool,
        reserve: Option<PathBuf>,
    ) -> Self {
        let overlays = overlays
            .into_iter()
            .map(|(o, added)| Overlay {
                disk: DiskConfig {
                    node_name: o.disk,
                    path: PathBuf::new(),
                    format: crate::qemu::DiskFormat::Qcow2,
                    read_only: false,
                },
                base_node: o.base_node,
                node: o.node,
                path: o.file,
                added,
            })
            .collect();
        Undo { overlays, frozen, reserve, snapshotted: true, ..Default::default() }
    }
}

/// Writes the log to the VM's recovery journal, if it keeps one: called after a change is
/// logged and before it is made, so a SIGKILL between the two leaves it in the journal.
pub(super) fn journal(m: &Machine, undo: &Mutex<Undo>) -> Result<(), BackupError> {
    let u = lock(undo);
    let Some(j) = &u.journal else { return Ok(()) };
    j.write(u.leftovers())
        .map_err(|e| BackupError::io(m.name(), "write the recovery journal", std::io::Error::other(e)))
}

/// Saved State's hook: the VM is about to be stopped and saved (`true`, written to the
/// journal before it is), or is back in its prior state (`false`).
pub(super) fn note_saving(m: &Machine, undo: &Mutex<Undo>, saving: bool) -> Result<(), BackupError> {
    lock(undo).saving = saving;
    journal(m, undo)
}

/// The merge's hook: the VM is about to be paused to finish a merge (`true`, written to the
/// journal before the `stop`), or is resumed (`false`).
fn note_merge_paused(m: &Machine, undo: &Mutex<Undo>, paused: bool) -> Result<(), BackupError> {
    lock(undo).merge_paused = paused;
    journal(m, undo)
}

#[derive(Debug, Clone)]
pub struct Snapshotted {
    pub disks: Vec<DiskEntry>,
    pub timings: Timings,
    /// What the guest's writers acknowledged at the freeze (see [`freeze_log`]).
    pub freeze: FreezeRecord,
}

pub(super) fn lock(u: &Mutex<Undo>) -> std::sync::MutexGuard<'_, Undo> {
    u.lock().unwrap_or_else(|e| e.into_inner())
}

/// A VM after PrepareForSnapshot: one overlay per disk took its writes from the snapshot
/// point on, and the guest is thawed. The images under the overlays are the backup.
#[derive(Debug, Clone)]
pub struct Frozen {
    window_ms: f64,
    host_ms: f64,
    freeze: FreezeRecord,
}

/// Backs up `m`'s disks into `dir`, with `faults` injected. On error the VM is put back
/// (thawed, merged, overlays removed) before returning; if that fails too, the error says so.
pub async fn snapshot(
    m: &Machine,
    settings: &SnapshotSettings,
    faults: &Faults,
    dir: &Path,
    tl: &Timeline,
    undo: &Mutex<Undo>,
) -> Result<Snapshotted, BackupError> {
    // Nothing races a one-VM backup against an interruption, so firing this one stops nothing.
    let frozen = prepare(m, settings, faults, &Interrupt::new(), tl, undo).await?;
    post(m, settings, faults, dir, tl, undo, frozen).await
}

async fn undo_after(
    m: &Machine,
    settings: &SnapshotSettings,
    undo: &Mutex<Undo>,
    tl: &Timeline,
    e: BackupError,
) -> BackupError {
    match tl.step(Some(m.name()), "undo", recover(m, settings, undo)).await {
        Ok(()) => e,
        Err(u) => BackupError::UndoFailed { vm: m.name().to_owned(), error: Box::new(e), undo: Box::new(u) },
    }
}

/// PrepareForSnapshot: overlays made and added, the guest frozen, every disk snapshotted
/// in one transaction, the guest thawed. On an error everything is undone first.
/// `interrupt` is the job's interruption, which only a fault in `faults` fires.
pub async fn prepare(
    m: &Machine,
    settings: &SnapshotSettings,
    faults: &Faults,
    interrupt: &Interrupt,
    tl: &Timeline,
    undo: &Mutex<Undo>,
) -> Result<Frozen, BackupError> {
    match prepare_inner(m, settings, faults, interrupt, tl, undo).await {
        Ok(f) => Ok(f),
        Err(e) => Err(undo_after(m, settings, undo, tl, e).await),
    }
}

/// PostSnapshot: the frozen images are copied out, and the overlays merged back.
pub async fn post(
    m: &Machine,
    settings: &SnapshotSettings,
    faults: &Faults,
    dir: &Path,
    tl: &Timeline,
    undo: &Mutex<Undo>,
    frozen: Frozen,
) -> Result<Snapshotted, BackupError> {
    match post_inner(m, settings, faults, dir, tl, undo, frozen).await {
        Ok(s) => Ok(s),
        Err(e) => Err(undo_after(m, settings, undo, tl, e).await),
    }
}

async fn prepare_inner(
    m: &Machine,
    settings: &SnapshotSettings,
    faults: &Faults,
    interrupt: &Interrupt,
    tl: &Timeline,
    undo: &Mutex<Undo>,
) -> Result<Frozen, BackupError> {
    let vm = Some(m.name());
    let faulty = faults.uncreatable_overlay_for(m);
    tl.step(vm, "prepare overlays", prepare_overlays(m, settings, faulty.as_deref(), undo)).await?;
    let agent = m.agent().map_err(|e| BackupError::step(m.name(), "guest agent", e))?;

    // This freeze's first line in the guest's freeze log; what the hooks write after it is
    // read back after the thaw. A guest that keeps no log is backed up all the same.
    let id = freeze_id(m);
    let begun = freeze_log::begin(agent, &id, settings.freeze_deadline).await;
    let t_freeze = Instant::now();
    let frozen = if faults.skip_freeze {
        tl.mark(vm, "freeze not sent (fault: skip-freeze)");
        Ok(())
    } else {
        lock(undo).frozen = true;
        journal(m, undo)?;
        tl.step(vm, "freeze", async {
            agent
                .execute_within(guest_fsfreeze_freeze {}, settings.freeze_deadline)
                .await
                .map(drop)
                .map_err(|e| super::vss::agent_failure(m.name(), "guest-fsfreeze-freeze", e))
        })
        .await
    };
    let t_frozen = Instant::now();
    if frozen.is_ok() {
        faults.after_freeze(agent, interrupt, settings.freeze_deadline).await;
        // Let an interruption be seen here, between the freeze and the thaw.
        tokio::task::yield_now().await;
    }
    let snap = match frozen {
        Ok(_) => tl.step(vm, "snapshot all disks (transaction)", transaction(m, faulty.as_deref(), undo)).await,
        Err(e) => Err(e),
    };
    let t_thaw = Instant::now();
    // Thaw whatever happened above; a failure here is reported, and recover() tries again.
    let thawed = tl.step(vm, "thaw", thaw(m, settings, undo)).await;
    let window = t_freeze.elapsed();
    snap?;
    thawed?;
    let freeze = match begun {
        Ok(()) => {
            let read = freeze_log::read(agent, &id, settings.thaw_deadline);
            tl.step(vm, "read the writers' acknowledgements", async { Ok::<_, BackupError>(read.await) }).await?
        }
        Err(why) => FreezeRecord { id, unreadable: Some(why), ..Default::default() },
    };
    Ok(Frozen { window_ms: window.as_secs_f64() * 1000.0, host_ms: (t_thaw - t_frozen).as_secs_f64() * 1000.0, freeze })
}

/// An id for one freeze of `m` that no other freeze has: the guest's log is shared by
/// every backup of the VM, and a freeze's records are those after its own id.
fn freeze_id(m: &Machine) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let name: String = m.name().chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect();
    format!("{name}-{}-{nanos}", std::process::id())
}

async fn post_inner(
    m: &Machine,
    settings: &SnapshotSettings,
    faults: &Faults,
    dir: &Path,
    tl: &Timeline,
    undo: &Mutex<Undo>,
    frozen: Frozen,
) -> Result<Snapshotted, BackupError> {
    let vm = Some(m.name());
    faults.before_copy(m, tl).await;
    let t = Instant::now();
    let mut disks = tl.step(vm, "copy frozen images", copy_out(m, settings, faults, dir, undo)).await?;
    let capture_ms = t.elapsed().as_secs_f64() * 1000.0;
    // A VM paused on a full snapshot volume fails its backup (the undo merges and resumes
    // it); so does one that filled it during the merge.
    no_volume_full(m).await?;
    let t = Instant::now();
    let outcome = tl.step(vm, "merge overlays (active commit)", merge(m, settings, undo)).await?;
    let merge_ms = t.elapsed().as_secs_f64() * 1000.0;
    no_volume_full(m).await?;
    if let MergeOutcome::PausedToFinish { .. } = outcome {
        tl.mark(vm, "merge did not converge: finished with the VM paused");
    }
    tl.step(vm, "hash the backup files", hash(m.name(), dir, &mut disks)).await?;
    Ok(Snapshotted {
        disks,
        timings: Timings {
            capture_ms,
            freeze_window_ms: Some(frozen.window_ms),
            freeze_host_ms: Some(frozen.host_ms),
            merge_ms: Some(merge_ms),
            merge_outcome: Some(outcome),
            ..Default::default()
        },
        freeze: frozen.freeze,
    })
}

/// Makes and adds an overlay for each disk but the excluded ones and `faulty` (whose
/// snapshot the transaction asks QEMU to make itself, at a path that cannot be created).
pub(super) async fn prepare_overlays(
    m: &Machine,
    settings: &SnapshotSettings,
    faulty: Option<&str>,
    undo: &Mutex<Undo>,
) -> Result<(), BackupError> {
    let disks: Vec<DiskConfig> =
        m.config().disks.iter().filter(|d| !settings.exclude.contains(&d.node_name)).cloned().collect();
    if settings.merge_reserve > 0 {
        let path = merge::reserve_path(&settings.snapshot_dir, m.name());
        // Journaled before it is made; an undo of one never made finds no file, which is fine.
        lock(undo).reserve = Some(path.clone());
        journal(m, undo)?;
        merge::make_reserve(m.name(), &path, settings.merge_reserve)?;
    }
    for d in disks {
        if faulty == Some(d.node_name.as_str()) {
            continue;
        }
        let node = format!("{}-snap", d.node_name);
        let path = settings.snapshot_dir.join(format!("{}-{}-overlay.qcow2", m.name(), d.node_name));
        let img = |error| BackupError::Image { vm: m.name().to_owned(), disk: d.node_name.clone(), error };
        let size = qemu_img::virtual_size(&d.path).map_err(img)?;
        let base_node = m.qemu_node(&d).to_owned();
        lock(undo).overlays.push(Overlay {
            disk: d.clone(),
            base_node,
            node: node.clone(),
            path: path.clone(),
            added: false,
        });
        journal(m, undo)?;
        qemu_img::create_overlay_unsafe(&d.path, d.format, size, &path).map_err(img)?;
        // No backing here: blockdev-snapshot attaches the live node as the backing.
        qmp(
            m,
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": node, "backing": null,
                   "file": {"driver": "file", "filename": path}}),
        )
        .await?;
        if let Some(o) = lock(undo).overlays.iter_mut().find(|o| o.node == node) {
            o.added = true;
        }
    }
    Ok(())
}

pub(super) async fn transaction(m: &Machine, faulty: Option<&str>, undo: &Mutex<Undo>) -> Result<(), BackupError> {
    let mut actions: Vec<Value> = lock(undo)
        .overlays
        .iter()
        .map(|o| json!({"type": "blockdev-snapshot", "data": {"node": o.base_node, "overlay": o.node}}))
        .collect();
    if let Some(disk) = faulty {
        actions.push(json!({"type": "blockdev-snapshot-sync", "data": {
            "node-name": disk, "snapshot-node-name": format!("{disk}-snap"), "format": "qcow2",
            "snapshot-file": UNCREATABLE_OVERLAY}}));
    }
    // Logged before it is sent: if this future is dropped mid-way, recovery must look.
    lock(undo).snapshotted = true;
    qmp(m, "transaction", json!({ "actions": actions })).await?;
    Ok(())
}

async fn thaw(m: &Machine, settings: &SnapshotSettings, undo: &Mutex<Undo>) -> Result<(), BackupError> {
    if !lock(undo).frozen {
        return Ok(());
    }
    let agent = m.agent().map_err(|e| BackupError::step(m.name(), "guest agent", e))?;
    let step = "guest-fsfreeze-thaw (until it answers, the guest may stay frozen)";
    agent
        .execute_within(guest_fsfreeze_thaw {}, settings.thaw_deadline)
        .await
        .map_err(|e| super::vss::agent_failure(m.name(), step, e))?;
    lock(undo).frozen = false;
    // Best effort: a journal still saying "frozen" only makes a replay ask the agent.
    let _ = journal(m, undo);
    Ok(())
}

/// Copies each frozen image (now read-only under its overlay) in its own format.
async fn copy_out(
    m: &Machine,
    settings: &SnapshotSettings,
    faults: &Faults,
    dir: &Path,
    undo: &Mutex<Undo>,
) -> Result<Vec<DiskEntry>, BackupError> {
    let disks: Vec<DiskConfig> = lock(undo).overlays.iter().map(|o| o.disk.clone()).collect();
    super::capture::copy_disks(m.name(), disks, dir, settings.verify_capture, faults.clone()).await
}

/// Fails if QEMU paused the VM because the snapshot volume is full.
async fn no_volume_full(m: &Machine) -> Result<(), BackupError> {
    let disks = merge::paused_for_space(m).await?;
    if disks.is_empty() {
        return Ok(());
    }
    Err(BackupError::SnapshotVolumeFull { vm: m.name().to_owned(), disks })
}

async fn hash(vm: &str, dir: &Path, disks: &mut [DiskEntry]) -> Result<(), BackupError> {
    for d in disks.iter_mut() {
        let p = dir.join(&d.file);
        let (h, n) = tokio::task::spawn_blocking(move || super::folder::sha256_file(&p))
            .await
            .map_err(|e| BackupError::io(vm, "hash a backup file", std::io::Error::other(e)))?
            .map_err(|e| BackupError::io(vm, "hash a backup file", e))?;
        (d.sha256, d.bytes) = (h, n);
    }
    Ok(())
}

/// Commits every overlay that is active back into its disk (active commit, then pivot),
/// then removes the overlay nodes and files. Afterwards the VM runs on its original images.
///
/// What is active is asked of QEMU, not taken from the log: an interruption can land after
/// QEMU ran the transaction but before the log recorded it.
pub(super) async fn merge(
    m: &Machine,
    settings: &SnapshotSettings,
    undo: &Mutex<Undo>,
) -> Result<MergeOutcome, BackupError> {
    release_reserve(m, undo)?;
    let overlays = lock(undo).overlays.clone();
    if overlays.is_empty() {
        lock(undo).snapshotted = false;
        return Ok(MergeOutcome::Converged);
    }
    let active = active_roots(m).await?;
    let limits = CommitLimits {
        speed: settings.merge_speed,
        converge: settings.merge_converge,
        finish: settings.merge_deadline,
    };
    let mut outcome = MergeOutcome::Converged;
    let pausing = |paused| note_merge_paused(m, undo, paused);
    for o in overlays.iter().filter(|o| active.contains(&o.node)) {
        outcome = outcome.then(merge::commit(m, &o.disk.node_name, &o.base_node, &o.node, limits, &pausing).await?);
    }
    lock(undo).snapshotted = false;
    remove_overlays(m, undo).await?;
    Ok(outcome)
}

/// Frees the merge reserve, giving the merge its room. Kept in the log if it cannot be.
pub(super) fn release_reserve(m: &Machine, undo: &Mutex<Undo>) -> Result<(), BackupError> {
    let Some(path) = lock(undo).reserve.take() else { return Ok(()) };
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            lock(undo).reserve = Some(path);
            Err(BackupError::io(m.name(), "release the merge reserve", e))
        }
        _ => Ok(()),
    }
}

/// The node names attached to the VM's devices right now.
async fn active_roots(m: &Machine) -> Result<Vec<String>, BackupError> {
    let blocks = qmp_typed(m, query_block {}).await?;
    Ok(blocks.into_iter().filter_map(|b| b.inserted?.node_name).collect())
}

/// Deletes the overlay nodes, then their files. A file is deleted only once QEMU no longer
/// holds its node; one that is still in use stays in the log, for a later attempt.
pub(super) async fn remove_overlays(m: &Machine, undo: &Mutex<Undo>) -> Result<(), BackupError> {
    let overlays = lock(undo).overlays.clone();
    let mut first_err = None;
    let mut kept = Vec::new();
    for o in overlays {
        if o.added {
            if let Err(e) = qmp(m, "blockdev-del", json!({"node-name": o.node})).await {
                first_err.get_or_insert(e);
                kept.push(o);
                continue;
            }
        }
        if let Err(e) = std::fs::remove_file(&o.path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                first_err.get_or_insert(BackupError::io(m.name(), "remove an overlay file", e));
            }
        }
    }
    lock(undo).overlays = kept;
    first_err.map_or(Ok(()), Err)
}

/// Puts the VM back after an error or an interruption: thaws it, merges whatever was
/// snapshotted and removes the overlays. Safe to call when nothing needs undoing.
pub async fn recover(m: &Machine, settings: &SnapshotSettings, undo: &Mutex<Undo>) -> Result<(), BackupError> {
    let dirty = !lock(undo).is_clean();
    let thawed = thaw(m, settings, undo).await;
    let merged = merge(m, settings, undo).await.map(drop);
    let done = thawed.and(merged);
    if dirty && done.is_ok() {
        lock(undo).recovered = true;
    }
    done
}
