//! The Saved State method: the VM's RAM and device state are saved to a file with QMP
//! `migrate` to a `file:` URI, its disks are captured while it is saved, and it goes back
//! to what it was doing before: running stays running, paused stays paused.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::folder::sha256_file;
use super::manifest::{DiskEntry, StateEntry, Timings};
use super::runstate::{self, RunState};
use super::BackupError;
use crate::image::qemu_img;
use crate::qemu::caps::Capabilities;
use crate::qemu::Machine;
use crate::timeline::Timeline;

const T: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct SaveSettings {
    /// Bytes per second. QEMU's default throttles a save to a file about 10x here.
    pub max_bandwidth: u64,
    /// Channels for multifd; used only together with mapped-ram.
    pub multifd_channels: u8,
    /// Deadline for the migration itself.
    pub migrate_deadline: Duration,
    /// Re-read each captured disk against the VM's own image (`qemu-img compare`).
    pub verify_capture: bool,
}

impl Default for SaveSettings {
    fn default() -> Self {
        Self {
            max_bandwidth: 1 << 40,
            multifd_channels: 2,
            migrate_deadline: Duration::from_secs(300),
            verify_capture: true,
        }
    }
}

/// How the state file is written; decided from what this QEMU can do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    pub mapped_ram: bool,
    pub multifd_channels: Option<u8>,
}

impl Plan {
    pub fn for_qemu(caps: &Capabilities, settings: &SaveSettings) -> Self {
        // multifd to a file needs mapped-ram (fixed offsets per page); without it, one stream.
        let multifd = caps.mapped_ram && caps.multifd && settings.multifd_channels > 1;
        Plan { mapped_ram: caps.mapped_ram, multifd_channels: multifd.then_some(settings.multifd_channels) }
    }

    pub fn from_state(s: &StateEntry) -> Self {
        Plan { mapped_ram: s.mapped_ram, multifd_channels: s.multifd_channels }
    }

    /// Sets the migration capabilities and parameters on a machine (source or destination).
    pub async fn apply(&self, m: &Machine, max_bandwidth: Option<u64>) -> Result<(), BackupError> {
        let mut caps = vec![json!({"capability": "events", "state": true})];
        if self.mapped_ram {
            caps.push(json!({"capability": "mapped-ram", "state": true}));
        }
        caps.push(json!({"capability": "multifd", "state": self.multifd_channels.is_some()}));
        qmp(m, "migrate-set-capabilities", json!({ "capabilities": caps })).await?;
        let mut params = json!({});
        if let Some(bw) = max_bandwidth {
            params["max-bandwidth"] = json!(bw);
        }
        if let Some(n) = self.multifd_channels {
            params["multifd-channels"] = json!(n);
        }
        if params != json!({}) {
            qmp(m, "migrate-set-parameters", params).await?;
        }
        Ok(())
    }
}

pub(super) async fn qmp(m: &Machine, cmd: &str, args: Value) -> Result<Value, BackupError> {
    m.qmp().execute_raw(cmd, args, T).await.map_err(|e| BackupError::step(m.name(), cmd, m.qmp_err(e)))
}

/// What a save produced.
#[derive(Debug, Clone)]
pub struct Saved {
    pub before: RunState,
    pub state: StateEntry,
    pub disks: Vec<DiskEntry>,
    pub timings: Timings,
}

/// Saves `m` into `dir` (state file and disks). Whatever happens, the VM is returned to the
/// run state it had before; an error says what failed and whether the return worked.
pub async fn save(
    m: &Machine,
    caps: &Capabilities,
    settings: &SaveSettings,
    dir: &Path,
    tl: &Timeline,
) -> Result<Saved, BackupError> {
    let vm = Some(m.name());
    let before = tl
        .step(vm, "record run state", async {
            runstate::query(m).await.map_err(|e| BackupError::step(m.name(), "query-status", e))
        })
        .await?;
    let stopped_at = Instant::now();
    let result = save_while_stopped(m, caps, settings, dir, tl, &before).await;
    let back = tl.step(vm, "return to prior state", return_to(m, &before, caps)).await;
    let downtime = before.running.then(|| stopped_at.elapsed().as_secs_f64() * 1000.0);
    match (result, back) {
        (Ok(mut saved), Ok(())) => {
            saved.timings.downtime_ms = downtime;
            // Hashing needs only the copies, so it runs after the VM is back, not in its downtime.
            tl.step(vm, "hash the backup files", hash_files(m.name(), dir, &mut saved)).await?;
            Ok(saved)
        }
        (Ok(_), Err(e)) => Err(e),
        (Err(e), Ok(())) => Err(e),
        (Err(e), Err(undo)) => {
            Err(BackupError::UndoFailed { vm: m.name().to_owned(), error: Box::new(e), undo: Box::new(undo) })
        }
    }
}

async fn save_while_stopped(
    m: &Machine,
    caps: &Capabilities,
    settings: &SaveSettings,
    dir: &Path,
    tl: &Timeline,
    before: &RunState,
) -> Result<Saved, BackupError> {
    let vm = Some(m.name());
    if !caps.file_migration {
        return Err(BackupError::Unsupported {
            vm: m.name().to_owned(),
            what: format!("QEMU {} cannot migrate to a file: URI (8.2 or newer is needed)", caps.version),
        });
    }
    if before.running {
        tl.step(vm, "stop", async {
            qmp(m, "stop", Value::Null).await?;
            m.qmp()
                .wait_event("STOP", |_| true, T)
                .await
                .map_err(|e| BackupError::step(m.name(), "wait for STOP", m.qmp_err(e)))
        })
        .await?;
    }
    let plan = Plan::for_qemu(caps, settings);
    plan.apply(m, Some(settings.max_bandwidth)).await?;
    let state_path = dir.join("state.bin");
    let t = Instant::now();
    tl.step(vm, "save state (migrate to file)", migrate_to_file(m, &state_path, settings.migrate_deadline)).await?;
    let save_secs = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let disks = tl.step(vm, "capture disks", capture_disks(m, dir, settings.verify_capture)).await?;
    let capture_ms = t.elapsed().as_secs_f64() * 1000.0;
    let bytes = std::fs::metadata(&state_path).map_err(|e| BackupError::io(m.name(), "stat the state file", e))?.len();
    let state = StateEntry {
        file: "state.bin".into(),
        bytes,
        sha256: String::new(),
        mapped_ram: plan.mapped_ram,
        multifd_channels: plan.multifd_channels,
    };
    let timings = Timings {
        downtime_ms: None,
        save_ms: Some(save_secs * 1000.0),
        save_mb_per_s: Some(migrated_bytes(m).await.unwrap_or(bytes) as f64 / 1e6 / save_secs.max(1e-6)),
        capture_ms,
        ..Default::default()
    };
    Ok(Saved { before: before.clone(), state, disks, timings })
}

/// Fills in the sizes and sha256 of the state file and the captured disks.
pub(super) async fn hash_files(vm: &str, dir: &Path, saved: &mut Saved) -> Result<(), BackupError> {
    let mut files: Vec<String> = saved.disks.iter().map(|d| d.file.clone()).collect();
    files.push(saved.state.file.clone());
    let dir = dir.to_owned();
    let hashes = tokio::task::spawn_blocking(move || {
        files.iter().map(|f| sha256_file(&dir.join(f))).collect::<Result<Vec<_>, _>>()
    })
    .await
    .map_err(|e| BackupError::io(vm, "hash the backup files", std::io::Error::other(e)))?
    .map_err(|e| BackupError::io(vm, "hash the backup files", e))?;
    let mut it = hashes.into_iter();
    for d in saved.disks.iter_mut() {
        (d.sha256, d.bytes) = it.next().expect("one hash per file");
    }
    (saved.state.sha256, saved.state.bytes) = it.next().expect("one hash per file");
    Ok(())
}

/// RAM bytes the last migration moved, as QEMU counts them.
async fn migrated_bytes(m: &Machine) -> Option<u64> {
    let info = m.qmp().execute_raw("query-migrate", Value::Null, T).await.ok()?;
    info["ram"]["transferred"].as_u64()
}

async fn migrate_to_file(m: &Machine, path: &Path, deadline: Duration) -> Result<(), BackupError> {
    let _ = m.qmp().events().drain("MIGRATION");
    qmp(m, "migrate", json!({"uri": format!("file:{}", path.display())})).await?;
    let ev = m
        .qmp()
        .wait_event(
            "MIGRATION",
            |d| matches!(d["status"].as_str(), Some("completed" | "failed" | "cancelled")),
            deadline,
        )
        .await
        .map_err(|e| BackupError::step(m.name(), "wait for the save to complete", m.qmp_err(e)))?;
    if ev.data["status"] != "completed" {
        let info = m.qmp().execute_raw("query-migrate", Value::Null, T).await.unwrap_or(Value::Null);
        return Err(BackupError::Migration {
            vm: m.name().to_owned(),
            status: ev.data["status"].as_str().unwrap_or("?").to_owned(),
            desc: info["error-desc"].as_str().unwrap_or("QEMU gave no reason").to_owned(),
        });
    }
    Ok(())
}

/// Copies each disk as it stands at the save point. QEMU has flushed and inactivated them,
/// so reading the image files now sees exactly what the saved guest saw.
async fn capture_disks(m: &Machine, dir: &Path, verify: bool) -> Result<Vec<DiskEntry>, BackupError> {
    let mut out = Vec::new();
    let disks = m.config().disks.clone();
    let vm = m.name().to_owned();
    for d in disks {
        let file = format!("{}.{}", d.node_name, extension(d.format));
        let dst = dir.join(&file);
        let src = d.path.clone();
        let vm2 = vm.clone();
        let entry = tokio::task::spawn_blocking(move || -> Result<DiskEntry, BackupError> {
            let img = |e| BackupError::Image { vm: vm2.clone(), disk: d.node_name.clone(), error: e };
            qemu_img::convert(&src, d.format, &dst, d.format).map_err(img)?;
            if verify && !qemu_img::identical(&src, d.format, &dst, d.format).map_err(img)? {
                return Err(BackupError::CaptureMismatch { vm: vm2.clone(), disk: d.node_name.clone() });
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
        .await
        .map_err(|e| BackupError::io(&vm, "capture a disk", std::io::Error::other(e)))??;
        out.push(entry);
    }
    Ok(out)
}

pub fn extension(f: crate::qemu::DiskFormat) -> &'static str {
    use crate::qemu::DiskFormat::*;
    match f {
        Qcow2 => "qcow2",
        Raw => "raw",
        Vpc => "vhd",
        Vhdx => "vhdx",
    }
}

/// Puts the VM back in `before`: cancels a save still under way, reactivates the disks,
/// and resumes it if it was running. Also the undo after a failure or an interruption.
pub async fn return_to(m: &Machine, before: &RunState, caps: &Capabilities) -> Result<(), BackupError> {
    let info = qmp(m, "query-migrate", Value::Null).await?;
    if matches!(info["status"].as_str(), Some("setup" | "active" | "device" | "pre-switchover")) {
        qmp(m, "migrate_cancel", Value::Null).await?;
        m.qmp()
            .wait_event("MIGRATION", |d| matches!(d["status"].as_str(), Some("cancelled" | "completed" | "failed")), T)
            .await
            .map_err(|e| BackupError::step(m.name(), "wait for the save to cancel", m.qmp_err(e)))?;
    }
    let now = runstate::query(m).await.map_err(|e| BackupError::step(m.name(), "query-status", e))?;
    if before.running && !now.running {
        // `cont` also reactivates disks that a completed save inactivated.
        qmp(m, "cont", Value::Null).await?;
        m.qmp()
            .wait_event("RESUME", |_| true, T)
            .await
            .map_err(|e| BackupError::step(m.name(), "wait for RESUME", m.qmp_err(e)))?;
    } else if !before.running {
        let inactive =
            runstate::inactive_nodes(m).await.map_err(|e| BackupError::step(m.name(), "query block nodes", e))?;
        if !inactive.is_empty() {
            if !caps.blockdev_set_active {
                return Err(BackupError::Unsupported {
                    vm: m.name().to_owned(),
                    what: format!(
                        "QEMU {} cannot reactivate the disks of a paused VM (blockdev-set-active is 10.0+); \
                         they become active again when the VM is continued",
                        caps.version
                    ),
                });
            }
            qmp(m, "blockdev-set-active", json!({"active": true})).await?;
        }
    }
    let inactive =
        runstate::inactive_nodes(m).await.map_err(|e| BackupError::step(m.name(), "query block nodes", e))?;
    if !inactive.is_empty() {
        return Err(BackupError::StillInactive { vm: m.name().to_owned(), nodes: inactive });
    }
    Ok(())
}
