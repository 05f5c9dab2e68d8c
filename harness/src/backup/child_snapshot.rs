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
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::manifest::{DiskEntry, Timings};
use super::saved_state::{extension, qmp};
use super::BackupError;
use crate::image::qemu_img;
use crate::qemu::{DiskConfig, Machine};
use crate::timeline::Timeline;

#[derive(Debug, Clone)]
pub struct SnapshotSettings {
    /// Where the overlays go; must be on the disks' host volume (a condition checks it).
    pub snapshot_dir: PathBuf,
    /// The freeze must return within this; well inside VSS's 10 s hold limit.
    pub freeze_deadline: Duration,
    pub thaw_deadline: Duration,
    pub merge_deadline: Duration,
    /// Re-read each copied image against the frozen one (`qemu-img compare`).
    pub verify_capture: bool,
}

impl SnapshotSettings {
    pub fn new(snapshot_dir: &Path) -> Self {
        Self {
            snapshot_dir: snapshot_dir.to_owned(),
            freeze_deadline: Duration::from_secs(8),
            thaw_deadline: Duration::from_secs(10),
            merge_deadline: Duration::from_secs(300),
            verify_capture: true,
        }
    }
}

#[derive(Debug, Clone)]
struct Overlay {
    disk: DiskConfig,
    node: String,
    path: PathBuf,
    added: bool,
}

/// What has been done to the VM so far, so that it can be undone.
#[derive(Debug, Default)]
pub struct Undo {
    overlays: Vec<Overlay>,
    /// A freeze was sent and no thaw has succeeded since.
    frozen: bool,
    /// The transaction succeeded: the VM writes to the overlays until they are merged.
    snapshotted: bool,
}

impl Undo {
    /// True when nothing is left to undo.
    pub fn is_clean(&self) -> bool {
        !self.frozen && !self.snapshotted && self.overlays.is_empty()
    }
}

#[derive(Debug, Clone)]
pub struct Snapshotted {
    pub disks: Vec<DiskEntry>,
    pub timings: Timings,
}

fn lock(u: &Mutex<Undo>) -> std::sync::MutexGuard<'_, Undo> {
    u.lock().unwrap_or_else(|e| e.into_inner())
}

/// Backs up `m`'s disks into `dir`. On error the VM is put back (thawed, merged, overlays
/// removed) before returning; if that fails too, the error says so.
pub async fn snapshot(
    m: &Machine,
    settings: &SnapshotSettings,
    dir: &Path,
    tl: &Timeline,
    undo: &Mutex<Undo>,
) -> Result<Snapshotted, BackupError> {
    match snapshot_inner(m, settings, dir, tl, undo).await {
        Ok(s) => Ok(s),
        Err(e) => match tl.step(Some(m.name()), "undo", recover(m, settings, undo)).await {
            Ok(()) => Err(e),
            Err(undo_err) => {
                Err(BackupError::UndoFailed { vm: m.name().to_owned(), error: Box::new(e), undo: Box::new(undo_err) })
            }
        },
    }
}

async fn snapshot_inner(
    m: &Machine,
    settings: &SnapshotSettings,
    dir: &Path,
    tl: &Timeline,
    undo: &Mutex<Undo>,
) -> Result<Snapshotted, BackupError> {
    let vm = Some(m.name());
    tl.step(vm, "prepare overlays", prepare_overlays(m, settings, undo)).await?;
    let agent = m.agent().map_err(|e| BackupError::step(m.name(), "guest agent", e))?;

    let t_freeze = Instant::now();
    lock(undo).frozen = true;
    let frozen = tl
        .step(vm, "freeze", async {
            agent.execute_raw("guest-fsfreeze-freeze", Value::Null, settings.freeze_deadline).await.map_err(|e| {
                BackupError::Agent { vm: m.name().to_owned(), step: "guest-fsfreeze-freeze".into(), error: e }
            })
        })
        .await;
    let t_frozen = Instant::now();
    let snap = match frozen {
        Ok(_) => tl.step(vm, "snapshot all disks (transaction)", transaction(m, undo)).await,
        Err(e) => Err(e),
    };
    let t_thaw = Instant::now();
    // Thaw whatever happened above; a failure here is reported, and recover() tries again.
    tl.step(vm, "thaw", thaw(m, settings, undo)).await?;
    let window = t_freeze.elapsed();
    snap?;
    let host_ms = (t_thaw - t_frozen).as_secs_f64() * 1000.0;

    let t = Instant::now();
    let mut disks = tl.step(vm, "copy frozen images", copy_out(m, settings, dir, undo)).await?;
    let capture_ms = t.elapsed().as_secs_f64() * 1000.0;
    let t = Instant::now();
    tl.step(vm, "merge overlays (active commit)", merge(m, settings, undo)).await?;
    let merge_ms = t.elapsed().as_secs_f64() * 1000.0;
    tl.step(vm, "hash the backup files", hash(m.name(), dir, &mut disks)).await?;
    Ok(Snapshotted {
        disks,
        timings: Timings {
            capture_ms,
            freeze_window_ms: Some(window.as_secs_f64() * 1000.0),
            freeze_host_ms: Some(host_ms),
            merge_ms: Some(merge_ms),
            ..Default::default()
        },
    })
}

async fn prepare_overlays(m: &Machine, settings: &SnapshotSettings, undo: &Mutex<Undo>) -> Result<(), BackupError> {
    for d in m.config().disks.clone() {
        let node = format!("{}-snap", d.node_name);
        let path = settings.snapshot_dir.join(format!("{}-{}-overlay.qcow2", m.name(), d.node_name));
        let img = |error| BackupError::Image { vm: m.name().to_owned(), disk: d.node_name.clone(), error };
        let size = qemu_img::virtual_size(&d.path).map_err(img)?;
        lock(undo).overlays.push(Overlay { disk: d.clone(), node: node.clone(), path: path.clone(), added: false });
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

async fn transaction(m: &Machine, undo: &Mutex<Undo>) -> Result<(), BackupError> {
    let actions: Vec<Value> = lock(undo)
        .overlays
        .iter()
        .map(|o| json!({"type": "blockdev-snapshot", "data": {"node": o.disk.node_name, "overlay": o.node}}))
        .collect();
    qmp(m, "transaction", json!({ "actions": actions })).await?;
    lock(undo).snapshotted = true;
    Ok(())
}

async fn thaw(m: &Machine, settings: &SnapshotSettings, undo: &Mutex<Undo>) -> Result<(), BackupError> {
    if !lock(undo).frozen {
        return Ok(());
    }
    let agent = m.agent().map_err(|e| BackupError::step(m.name(), "guest agent", e))?;
    agent
        .execute_raw("guest-fsfreeze-thaw", Value::Null, settings.thaw_deadline)
        .await
        .map_err(|e| BackupError::Agent { vm: m.name().to_owned(), step: "guest-fsfreeze-thaw".into(), error: e })?;
    lock(undo).frozen = false;
    Ok(())
}

/// Copies each frozen image (now read-only under its overlay) in its own format.
async fn copy_out(
    m: &Machine,
    settings: &SnapshotSettings,
    dir: &Path,
    undo: &Mutex<Undo>,
) -> Result<Vec<DiskEntry>, BackupError> {
    let disks: Vec<DiskConfig> = lock(undo).overlays.iter().map(|o| o.disk.clone()).collect();
    let vm = m.name().to_owned();
    let dir = dir.to_owned();
    let verify = settings.verify_capture;
    tokio::task::spawn_blocking(move || {
        disks
            .iter()
            .map(|d| {
                let img = |error| BackupError::Image { vm: vm.clone(), disk: d.node_name.clone(), error };
                let file = format!("{}.{}", d.node_name, extension(d.format));
                let dst = dir.join(&file);
                qemu_img::convert(&d.path, d.format, &dst, d.format).map_err(img)?;
                if verify && !qemu_img::identical(&d.path, d.format, &dst, d.format).map_err(img)? {
                    return Err(BackupError::CaptureMismatch { vm: vm.clone(), disk: d.node_name.clone() });
                }
                let virtual_size = qemu_img::virtual_size(&dst).map_err(img)?;
                Ok(DiskEntry {
                    node_name: d.node_name.clone(),
                    format: d.format,
                    virtual_size,
                    file,
                    bytes: 0,
                    sha256: String::new(),
                })
            })
            .collect()
    })
    .await
    .map_err(|e| BackupError::io(m.name(), "copy the frozen images", std::io::Error::other(e)))?
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

/// Commits every overlay back into its disk (active commit, then pivot), then removes the
/// overlay nodes and files. Afterwards the VM runs on its original images.
async fn merge(m: &Machine, settings: &SnapshotSettings, undo: &Mutex<Undo>) -> Result<(), BackupError> {
    let overlays = lock(undo).overlays.clone();
    if lock(undo).snapshotted {
        for o in &overlays {
            commit_one(m, o, settings.merge_deadline).await?;
        }
        lock(undo).snapshotted = false;
    }
    remove_overlays(m, undo).await
}

async fn commit_one(m: &Machine, o: &Overlay, deadline: Duration) -> Result<(), BackupError> {
    let job = format!("commit-{}", o.disk.node_name);
    let step = |what: &str, e| BackupError::step(m.name(), &format!("{what} {}", o.disk.node_name), m.qmp_err(e));
    let _ = m.qmp().events().drain("BLOCK_JOB_READY");
    let _ = m.qmp().events().drain("BLOCK_JOB_COMPLETED");
    qmp(m, "block-commit", json!({"job-id": job, "device": o.node, "base-node": o.disk.node_name})).await?;
    let is_job = |d: &Value| d["device"] == job.as_str();
    m.qmp().wait_event("BLOCK_JOB_READY", is_job, deadline).await.map_err(|e| step("wait for the commit of", e))?;
    qmp(m, "job-complete", json!({"id": job})).await?;
    let done = m
        .qmp()
        .wait_event("BLOCK_JOB_COMPLETED", is_job, deadline)
        .await
        .map_err(|e| step("wait for the pivot of", e))?;
    if let Some(err) = done.data["error"].as_str() {
        return Err(BackupError::Merge {
            vm: m.name().to_owned(),
            disk: o.disk.node_name.clone(),
            error: err.to_owned(),
        });
    }
    Ok(())
}

async fn remove_overlays(m: &Machine, undo: &Mutex<Undo>) -> Result<(), BackupError> {
    let overlays = std::mem::take(&mut lock(undo).overlays);
    let mut first_err = None;
    for o in &overlays {
        if o.added {
            if let Err(e) = qmp(m, "blockdev-del", json!({"node-name": o.node})).await {
                first_err.get_or_insert(e);
            }
        }
        if let Err(e) = std::fs::remove_file(&o.path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                first_err.get_or_insert(BackupError::io(m.name(), "remove an overlay file", e));
            }
        }
    }
    first_err.map_or(Ok(()), Err)
}

/// Puts the VM back after an error or an interruption: thaws it, merges whatever was
/// snapshotted and removes the overlays. Safe to call when nothing needs undoing.
pub async fn recover(m: &Machine, settings: &SnapshotSettings, undo: &Mutex<Undo>) -> Result<(), BackupError> {
    let thawed = thaw(m, settings, undo).await;
    let merged = merge(m, settings, undo).await;
    thawed.and(merged)
}
