//! The Saved State method: the VM's RAM and device state are saved to a file with QMP
//! `migrate` to a `file:` URI, its disks are captured while it is saved, and it goes back
//! to what it was doing before: running stays running, paused stays paused.
//!
//! The disks are not copied in the VM's downtime: while it is stopped after the save, one
//! transaction puts an overlay on every disk, and the VM goes back at once; the frozen
//! images are copied out afterwards ([`frozen`]). A QEMU that cannot reactivate a saved
//! VM's disks without continuing it (no `blockdev-set-active`, before 10.0) copies them
//! while the VM is stopped instead.

mod frozen;

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use qapi::qmp::{query_migrate, MigrationStatus, MIGRATION};
use qapi::Enum;
use serde::Deserialize;
use serde_json::{json, Value};

use super::child_snapshot::{self, Undo};
use super::faults::{Faults, UNWRITABLE_STATE};
use super::folder::sha256_file;
use super::manifest::{DiskEntry, StateEntry, Timings};
use super::runstate::{self, RunState};
use super::BackupError;
use crate::qemu::caps::Capabilities;
use crate::qemu::Machine;
use crate::sys::deadline;
use crate::timeline::Timeline;

/// The state file's name in a VM's backup folder.
const STATE_FILE: &str = "state.bin";

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
    /// Disks (node names) the host cannot back up (pass-through, iSCSI): left out.
    pub exclude: Vec<String>,
    /// Where the overlays that take the VM's writes while its disks are copied go; None:
    /// the VM's own run folder. Must have room for what the guest writes meanwhile.
    pub overlay_dir: Option<PathBuf>,
    /// Copy (and verify) the disks while the VM is stopped, as quiesce did before: the
    /// downtime then grows with the disks. Kept so the benchmark can compare the two in one
    /// run; a backup has no reason to set it.
    pub copy_while_stopped: bool,
}

impl Default for SaveSettings {
    fn default() -> Self {
        Self {
            max_bandwidth: 1 << 40,
            multifd_channels: 2,
            migrate_deadline: deadline::STATE_FILE_MIGRATION,
            verify_capture: true,
            exclude: vec![],
            overlay_dir: None,
            copy_while_stopped: false,
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

/// Runs a QMP command the schema of the `qapi` crate lacks, or whose arguments are built
/// as JSON; an error names the command.
pub(super) async fn qmp(m: &Machine, cmd: &str, args: Value) -> Result<Value, BackupError> {
    m.qmp()
        .execute_raw(cmd, args, deadline::QMP_COMMAND)
        .await
        .map_err(|e| BackupError::step(m.name(), cmd, m.qmp_err(e)))
}

/// Runs a typed QMP command; a reply that does not fit its type is an error naming it.
pub(super) async fn qmp_typed<C: qapi::Command>(m: &Machine, cmd: C) -> Result<C::Ok, BackupError> {
    m.qmp()
        .execute_within(cmd, deadline::QMP_COMMAND)
        .await
        .map_err(|e| BackupError::step(m.name(), C::NAME, m.qmp_err(e)))
}

/// What a save produced.
#[derive(Debug, Clone)]
pub struct Saved {
    pub before: RunState,
    pub state: StateEntry,
    pub disks: Vec<DiskEntry>,
    pub timings: Timings,
}

/// A VM after PrepareForSnapshot: its RAM and device state are in the file, and it is held
/// saved (not running, disks inactive) until [`post`] or [`undo`].
#[derive(Debug)]
pub struct Prepared {
    pub before: RunState,
    plan: Plan,
    stopped_at: Instant,
    save_secs: f64,
    mb_per_s: f64,
}

/// Saves `m` into `dir` (state file and disks), with `faults` injected, and returns it to
/// its prior run state.
pub async fn save(
    m: &Machine,
    caps: &Capabilities,
    settings: &SaveSettings,
    faults: &Faults,
    dir: &Path,
    tl: &Timeline,
) -> Result<Saved, BackupError> {
    let undo = Mutex::new(Undo::default());
    let prepared = prepare(m, caps, settings, faults, dir, tl, &undo).await?;
    post(m, caps, settings, dir, tl, prepared, &undo).await
}

/// PrepareForSnapshot: records the run state, stops the VM and saves its state to
/// `dir/state.bin`. Where [`post`] will put the disks under overlays, they are made first,
/// while the VM runs, and logged in `undo`. On an error the VM is returned to its prior
/// state, and those overlays removed, before returning.
pub async fn prepare(
    m: &Machine,
    caps: &Capabilities,
    settings: &SaveSettings,
    faults: &Faults,
    dir: &Path,
    tl: &Timeline,
    undo: &Mutex<Undo>,
) -> Result<Prepared, BackupError> {
    let vm = Some(m.name());
    let before = tl
        .step(vm, "record run state", async {
            runstate::query(m).await.map_err(|e| BackupError::step(m.name(), "query-status", e))
        })
        .await?;
    let overlays = caps.blockdev_set_active && !settings.copy_while_stopped;
    if overlays {
        let made = tl.step(vm, "prepare overlays", frozen::prepare(m, settings, undo)).await;
        if let Err(e) = made {
            let discarded = tl.step(vm, "undo: remove the overlays", frozen::discard(m, undo)).await;
            return Err(with_undo(m, e, discarded));
        }
        tl.step(vm, "drop the disks' host cache", frozen::drop_host_cache(m)).await?;
    }
    let state_path = if faults.save_fails { PathBuf::from(UNWRITABLE_STATE) } else { dir.join(STATE_FILE) };
    // Journaled (for a VM quiesce did not start) before the VM is stopped.
    let saved = async {
        child_snapshot::note_saving(m, undo, true)?;
        save_state(m, caps, settings, &state_path, tl, &before).await
    };
    match saved.await {
        Ok(s) => {
            Ok(Prepared { before, plan: s.plan, stopped_at: s.stopped_at, save_secs: s.secs, mb_per_s: s.mb_per_s })
        }
        Err(e) => {
            let mut undone = self::undo(m, caps, &before, tl).await.map(drop);
            if overlays {
                let discarded = tl.step(vm, "undo: remove the overlays", frozen::discard(m, undo)).await;
                undone = undone.and(discarded);
            }
            Err(with_undo(m, e, undone))
        }
    }
}

/// PostSnapshot: captures the disks as they stand at the save point and returns the VM to
/// its prior state, then hashes what is not hashed yet. With `blockdev-set-active` the VM
/// goes back as soon as its disks are under overlays, and `undo` logs those overlays until
/// they are merged (an interrupted job merges them with [`super::child_snapshot::recover`]);
/// without it, or with `copy_while_stopped`, the disks are copied while the VM is stopped.
pub async fn post(
    m: &Machine,
    caps: &Capabilities,
    settings: &SaveSettings,
    dir: &Path,
    tl: &Timeline,
    p: Prepared,
    undo: &Mutex<Undo>,
) -> Result<Saved, BackupError> {
    let (disks, capture_ms, downtime_ms, inactive_until_continued, state_hash) =
        if caps.blockdev_set_active && !settings.copy_while_stopped {
            let c = frozen::capture(m, caps, settings, dir, tl, &p, undo).await?;
            // blockdev-set-active made them active: nothing is left inactive.
            (c.disks, c.capture_ms, c.downtime_ms, Vec::new(), c.state)
        } else {
            let (d, ms, down, nodes) = copy_while_stopped(m, caps, settings, dir, tl, &p).await?;
            (d, ms, down, nodes, None)
        };
    // Back in its prior state; best effort: a replay finds a running VM needs nothing.
    let _ = child_snapshot::note_saving(m, undo, false);
    let state_path = dir.join(STATE_FILE);
    let bytes = std::fs::metadata(&state_path).map_err(|e| BackupError::io(m.name(), "stat the state file", e))?.len();
    let (sha256, bytes) = state_hash.unwrap_or((String::new(), bytes));
    let mut saved = Saved {
        before: p.before,
        state: StateEntry {
            file: STATE_FILE.into(),
            bytes,
            sha256,
            mapped_ram: p.plan.mapped_ram,
            multifd_channels: p.plan.multifd_channels,
            inactive_until_continued,
        },
        disks,
        timings: Timings {
            downtime_ms,
            save_ms: Some(p.save_secs * 1000.0),
            save_mb_per_s: Some(p.mb_per_s),
            capture_ms,
            ..Default::default()
        },
    };
    // Hashing needs only the copies, so it runs after the VM is back, not in its downtime.
    tl.step(Some(m.name()), "hash the backup files", hash_files(m.name(), dir, &mut saved)).await?;
    Ok(saved)
}

/// Copies the disks while the VM stays stopped, then returns it to its prior state: the
/// downtime grows with the disks. Returns the copies, the copy's and the downtime's ms, and
/// the disks a QEMU before 10.0 leaves inactive until a paused VM is continued.
async fn copy_while_stopped(
    m: &Machine,
    caps: &Capabilities,
    settings: &SaveSettings,
    dir: &Path,
    tl: &Timeline,
    p: &Prepared,
) -> Result<(Vec<DiskEntry>, f64, Option<f64>, Vec<String>), BackupError> {
    let vm = Some(m.name());
    let t = Instant::now();
    let captured = tl.step(vm, "copy frozen images", capture_disks(m, dir, settings)).await;
    let capture_ms = t.elapsed().as_secs_f64() * 1000.0;
    let back = tl.step(vm, "return to prior state", return_to(m, &p.before, caps)).await;
    let downtime_ms = p.before.running.then(|| p.stopped_at.elapsed().as_secs_f64() * 1000.0);
    match (captured, back) {
        (Ok(d), Ok(Disks::Active)) => Ok((d, capture_ms, downtime_ms, Vec::new())),
        (Ok(d), Ok(Disks::InactiveUntilContinued(nodes))) => Ok((d, capture_ms, downtime_ms, nodes)),
        (Err(e), Ok(_)) | (Ok(_), Err(e)) => Err(e),
        (Err(e), Err(u)) => Err(with_undo(m, e, Err(u))),
    }
}

/// Undoes a prepared (or half-prepared) save: the VM goes back to `before`; says where its
/// disks stand.
pub async fn undo(m: &Machine, caps: &Capabilities, before: &RunState, tl: &Timeline) -> Result<Disks, BackupError> {
    tl.step(Some(m.name()), "undo: return to prior state", return_to(m, before, caps)).await
}

fn with_undo(m: &Machine, e: BackupError, undone: Result<(), BackupError>) -> BackupError {
    match undone {
        Ok(()) => e,
        Err(u) => BackupError::UndoFailed { vm: m.name().to_owned(), error: Box::new(e), undo: Box::new(u) },
    }
}

/// What [`save_state`] did: its plan, when the VM's downtime began (the stop), the seconds
/// the save took and its throughput in MB/s.
struct StateSaved {
    plan: Plan,
    stopped_at: Instant,
    secs: f64,
    mb_per_s: f64,
}

/// Stops the VM if it runs and saves its state to `state_path`.
async fn save_state(
    m: &Machine,
    caps: &Capabilities,
    settings: &SaveSettings,
    state_path: &Path,
    tl: &Timeline,
    before: &RunState,
) -> Result<StateSaved, BackupError> {
    let vm = Some(m.name());
    if !caps.file_migration {
        return Err(BackupError::Unsupported {
            vm: m.name().to_owned(),
            what: format!("QEMU {} cannot migrate to a file: URI (8.2 or newer is needed)", caps.version),
        });
    }
    // Before the stop: the capabilities and parameters need no stopped VM, and two QMP
    // round trips inside the downtime measured 0.2-0.5 s here under load.
    let plan = Plan::for_qemu(caps, settings);
    plan.apply(m, Some(settings.max_bandwidth)).await?;
    let stopped_at = Instant::now();
    if before.running {
        tl.step(vm, "stop", async {
            qmp(m, "stop", Value::Null).await?;
            m.qmp()
                .wait_event("STOP", |_| true, deadline::COMMAND_EVENT)
                .await
                .map_err(|e| BackupError::step(m.name(), "wait for STOP", m.qmp_err(e)))
        })
        .await?;
    }
    let t = Instant::now();
    // QEMU sends MIGRATION `completed` before it has finished the save: its main loop then
    // cleans the migration up, and answers no command until that is done (0.4-0.6 s was
    // measured here, under load). So the save ends with QEMU's first answer after the event.
    let saving = async {
        migrate_to_file_then(m, state_path, settings.migrate_deadline, defuse_close_flush).await?;
        Ok::<_, BackupError>(migrated_bytes(m).await.unwrap_or(0))
    };
    let bytes = tl.step(vm, "save state (migrate to file)", saving).await?;
    let secs = t.elapsed().as_secs_f64();
    Ok(StateSaved { plan, stopped_at, secs, mb_per_s: bytes as f64 / 1e6 / secs.max(1e-6) })
}

/// Fills in the sizes and sha256 of the state file and of the captured disks not hashed yet.
pub(super) async fn hash_files(vm: &str, dir: &Path, saved: &mut Saved) -> Result<(), BackupError> {
    let unhashed = |d: &&mut DiskEntry| d.sha256.is_empty();
    let mut files: Vec<String> = saved.disks.iter_mut().filter(unhashed).map(|d| d.file.clone()).collect();
    let state_unhashed = saved.state.sha256.is_empty();
    if state_unhashed {
        files.push(saved.state.file.clone());
    }
    let dir = dir.to_owned();
    let hashes = tokio::task::spawn_blocking(move || {
        files.iter().map(|f| sha256_file(&dir.join(f))).collect::<Result<Vec<_>, _>>()
    })
    .await
    .map_err(|e| BackupError::io(vm, "hash the backup files", std::io::Error::other(e)))?
    .map_err(|e| BackupError::io(vm, "hash the backup files", e))?;
    let mut it = hashes.into_iter();
    for d in saved.disks.iter_mut().filter(unhashed) {
        (d.sha256, d.bytes) = it.next().expect("one hash per file");
    }
    if state_unhashed {
        (saved.state.sha256, saved.state.bytes) = it.next().expect("one hash per file");
    }
    Ok(())
}

/// RAM bytes the last migration moved, as QEMU counts them.
async fn migrated_bytes(m: &Machine) -> Option<u64> {
    let info = qmp_typed(m, query_migrate {}).await.ok()?;
    u64::try_from(info.ram?.transferred).ok()
}

/// The status a MIGRATION event reports; None if its data does not fit QEMU's schema.
pub(crate) fn migration_status(data: &Value) -> Option<MigrationStatus> {
    MIGRATION::deserialize(data).ok().map(|e| e.status)
}

/// True for a MIGRATION event saying the migration has ended, one way or another.
pub(crate) fn migration_ended(data: &Value) -> bool {
    matches!(
        migration_status(data),
        Some(MigrationStatus::completed | MigrationStatus::failed | MigrationStatus::cancelled)
    )
}

/// `migrate` to a `file:` URI with whatever capabilities and parameters are set, waiting
/// (under `deadline`) for it to complete; a failed or cancelled save is an error with
/// QEMU's reason.
pub async fn migrate_to_file(m: &Machine, path: &Path, deadline: Duration) -> Result<(), BackupError> {
    migrate_to_file_then(m, path, deadline, |_| ()).await
}

/// [`migrate_to_file`], running `started` on the state file's path as soon as QEMU has
/// accepted the `migrate` (and so has opened and truncated the file), while it writes.
async fn migrate_to_file_then(
    m: &Machine,
    path: &Path,
    deadline: Duration,
    started: impl FnOnce(&Path),
) -> Result<(), BackupError> {
    let _ = m.qmp().events().drain("MIGRATION");
    qmp(m, "migrate", json!({"uri": format!("file:{}", path.display())})).await?;
    started(path);
    let ev = m
        .qmp()
        .wait_event("MIGRATION", migration_ended, deadline)
        .await
        .map_err(|e| BackupError::step(m.name(), "wait for the save to complete", m.qmp_err(e)))?;
    match migration_status(&ev.data) {
        Some(MigrationStatus::completed) => Ok(()),
        ended => {
            let info = qmp_typed(m, query_migrate {}).await.ok();
            Err(BackupError::Migration {
                vm: m.name().to_owned(),
                status: ended.map_or("?", |s| s.name()).to_owned(),
                desc: info.and_then(|i| i.error_desc).unwrap_or_else(|| "QEMU gave no reason".to_owned()),
            })
        }
    }
}

/// Opens and closes the state file that QEMU has just begun to write, so that ext4 writes
/// back nothing at QEMU's own close at the end of the save, inside the VM's downtime.
///
/// QEMU (8.2 and later) opens a `file:` migration's file and truncates it to its offset, 0
/// here, in the `migrate` command itself. On ext4 (auto_da_alloc, its default), truncating
/// a file to 0 arms a flush of the file's delayed-allocation pages at the next close of
/// any of its descriptors, meant for programs that rewrite a file without fsync. Left
/// alone, that close is QEMU's close of a multifd channel after the save completed, in its
/// main loop: it allocated and submitted the whole state file's writeback (~800 MB) while
/// the VM waited and QEMU answered nothing; measured 0.4 s of a 1.0 s save with strace
/// (`close(...) <0.405>`), and more when other writes keep the disk busy, which is why the
/// save step varied so (0.3-2.9 s). Closed here, just after the truncate, the flush finds
/// next to nothing written and is spent. Best effort, and harmless on any filesystem: a
/// state file that cannot be opened here costs only that time.
fn defuse_close_flush(path: &Path) {
    drop(std::fs::File::open(path));
}

/// Copies each disk as it stands at the save point. QEMU has flushed and inactivated them,
/// so reading the image files now sees exactly what the saved guest saw.
async fn capture_disks(m: &Machine, dir: &Path, settings: &SaveSettings) -> Result<Vec<DiskEntry>, BackupError> {
    let disks = m.config().disks.iter().filter(|d| !settings.exclude.contains(&d.node_name)).cloned().collect();
    super::capture::copy_disks(m.name(), disks, dir, settings.verify_capture, Faults::default()).await
}

/// Where a VM's disks stand once it is back in its prior state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disks {
    Active,
    /// A paused VM on a QEMU that cannot make its disks active without running it (before
    /// 10.0, or a compatibility profile of one): these nodes stay inactive until the VM is
    /// continued, which is what `cont` does first.
    InactiveUntilContinued(Vec<String>),
}

/// Puts the VM back in `before`: cancels a save still under way, reactivates the disks,
/// and resumes it if it was running. Also the undo after a failure or an interruption.
pub async fn return_to(m: &Machine, before: &RunState, caps: &Capabilities) -> Result<Disks, BackupError> {
    let info = qmp_typed(m, query_migrate {}).await?;
    let under_way = matches!(
        info.status,
        Some(
            MigrationStatus::setup
                | MigrationStatus::active
                | MigrationStatus::device
                | MigrationStatus::pre_switchover
        )
    );
    if under_way {
        qmp(m, "migrate_cancel", Value::Null).await?;
        m.qmp()
            .wait_event("MIGRATION", migration_ended, deadline::COMMAND_EVENT)
            .await
            .map_err(|e| BackupError::step(m.name(), "wait for the save to cancel", m.qmp_err(e)))?;
    }
    let now =
        runstate::settle(m, deadline::QMP_COMMAND).await.map_err(|e| BackupError::step(m.name(), "query-status", e))?;
    if before.running && !now.running {
        // `cont` also reactivates disks that a completed save inactivated.
        qmp(m, "cont", Value::Null).await?;
        m.qmp()
            .wait_event("RESUME", |_| true, deadline::COMMAND_EVENT)
            .await
            .map_err(|e| BackupError::step(m.name(), "wait for RESUME", m.qmp_err(e)))?;
    } else if !before.running {
        let inactive =
            runstate::inactive_nodes(m).await.map_err(|e| BackupError::step(m.name(), "query block nodes", e))?;
        if !inactive.is_empty() {
            if !caps.blockdev_set_active {
                // As QEMU before 10.0 leaves it: the VM is paused as it was, and its disks
                // are made active by the `cont` that runs it next.
                return Ok(Disks::InactiveUntilContinued(inactive));
            }
            qmp(m, "blockdev-set-active", json!({"active": true})).await?;
        }
    }
    let inactive =
        runstate::inactive_nodes(m).await.map_err(|e| BackupError::step(m.name(), "query block nodes", e))?;
    if !inactive.is_empty() {
        return Err(BackupError::StillInactive { vm: m.name().to_owned(), nodes: inactive });
    }
    Ok(Disks::Active)
}
