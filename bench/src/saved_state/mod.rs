//! `quiesce-bench saved-state`: saves a guest whose RAM is mostly filled with
//! incompressible data, and prints, from this one run on this one machine, how quiesce's
//! Saved State compares with three baselines:
//!
//! 1. `dd` writing a file of the same size to the same filesystem (`conv=fsync`);
//! 2. a plain QMP `migrate` to a `file:` URI with QEMU's default settings, same guest;
//! 3. libvirt's `virsh save` / `virsh restore` of an identical guest (same kernel, initrd,
//!    root image, RAM, vCPUs and agent channel), with libvirtd started by hand.
//!
//! Each measurement is repeated [`ROUNDS`] times and the median is used. Nothing is
//! asserted: the goals are printed as met or missed beside each ratio.
//!
//! Both sides are treated alike: the same guest image, RAM and fill; each round saves the
//! guest, drops it, restores it into a new QEMU, and the restored guest is saved next; the
//! host is synced, and the previous measured file removed, before every timed operation.
//!
//! Our save time is the `save state (migrate to file)` step of the timeline: the part that
//! compares with `virsh save`, whose file holds only RAM and device state. The whole backup
//! (run state, stop, save, disk capture and its verification, return, hashing) is printed
//! too. Our restore time is from launching QEMU to the guest running again, as
//! `virsh restore` does it.

mod libvirt;
mod report;
mod series;

pub use self::series::DEFAULT_DATA_MIB;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use quiesce::backup::saved_state::{Plan, SaveSettings};
use quiesce::backup::{job, runstate, BackupError, BackupWriter, FolderError};
use quiesce::qemu::caps::{self, CapsError};
use quiesce::qemu::exec::{self, ExecError};
use quiesce::qemu::{Machine, MachineError, QmpError};
use quiesce::sys::deadline;
use quiesce::testguest::{self, GuestError, GuestOptions};
use quiesce::timeline::{Outcome, Timeline};
use quiesce::verify::{restore, RestoreError, RestoreOptions};
use serde_json::{json, Value};

use self::libvirt::{libvirt_phase, LibvirtRun};
use self::report::{render, LibvirtOutcome, Ours, Report};
use crate::dd::{self, DdError};
use crate::fill;
use crate::stats::{filesystem_of, median_u64};

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub accel: Option<quiesce::qemu::accel::AccelChoice>,
    /// Guest RAM to fill, in MiB.
    pub memory_mib: u32,
    /// Where state files and dd output go (the filesystem being measured).
    pub work_dir: std::path::PathBuf,
    /// Run the libvirt comparison (needs libvirt installed; its daemon is started by hand).
    pub libvirt: bool,
    /// The series of downtime against disk data: the MiB of data of each point (empty: no
    /// series).
    pub data_mib: Vec<u64>,
    /// Backups per method at each point of the series; medians are printed.
    pub series_rounds: usize,
    /// Only the series: skip the save/restore rounds against dd, QEMU's defaults and virsh.
    pub series_only: bool,
}

/// Each measurement is taken this many times; the median is reported.
pub const ROUNDS: usize = 5;
const VM: &str = "bench";
const SAVE_STEP: &str = "save state (migrate to file)";
const LOAD_STEP: &str = "load state (incoming migration)";

/// What stops the saved-state benchmark. Whatever stops it, every VM and daemon it started
/// is stopped and its files are removed (guards, on every path).
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The work folder (`--work-dir`) could not be made or used: it must be writable and
    /// hold a few times the guest's RAM.
    #[error("work folder {path}: {source}")]
    WorkDir { path: PathBuf, source: std::io::Error },
    /// QEMU's capabilities could not be probed (QEMU missing or not starting).
    #[error(transparent)]
    Caps(#[from] CapsError),
    /// The test guest did not boot, or its image could not be built or found.
    #[error("booting the benchmark guest: {0}")]
    Guest(#[from] GuestError),
    /// The guest has no agent connection to fill its RAM with.
    #[error("the benchmark guest's agent: {0}")]
    Agent(MachineError),
    /// The RAM fill script failed in the guest.
    #[error("filling the guest's RAM: {0}")]
    Fill(#[from] ExecError),
    /// The RAM fill script ran but did not say how much it filled: the guest printed
    /// something unexpected.
    #[error("filling the guest's RAM: the fill script printed no size: {0:?}")]
    FillOutput(String),
    /// The plain migrate with QEMU's defaults (a baseline) failed.
    #[error("plain migrate with QEMU's defaults: {0}")]
    Defaults(MachineError),
    /// The guest did not run again after the plain migrate, so the rounds after it would
    /// measure a stopped guest.
    #[error("VM {VM} after the plain migrate: {0}")]
    NotRunning(String),
    /// quiesce's Saved State backup failed (the error says which step).
    #[error(transparent)]
    Backup(#[from] BackupError),
    /// The backup folder could not be written or committed.
    #[error(transparent)]
    Folder(#[from] FolderError),
    /// quiesce's restore of the saved state failed.
    #[error(transparent)]
    Restore(#[from] RestoreError),
    /// The restored guest's agent did not answer: the restore did not bring it back alive.
    #[error("the restored guest's agent: {0}")]
    RestoredAgent(MachineError),
    /// The timeline lacks the step whose time is compared: a bug in the backup or restore
    /// code.
    #[error("the timeline of round {round} has no completed `{step}` step")]
    NoStep { round: usize, step: &'static str },
    /// The backup holds no state file: a bug in the Saved State backup.
    #[error("our backup has no state file")]
    NoState,
    /// The dd baseline failed.
    #[error("dd baseline: {0}")]
    Dd(#[from] DdError),
    /// A file of the run could not be read, synced or removed.
    #[error("{path}: {source}")]
    Stat { path: PathBuf, source: std::io::Error },
    /// Ctrl-C stopped the run.
    #[error("interrupted; every VM and daemon this run started has been stopped")]
    Interrupted,
}

/// Runs the benchmark and returns the text to print. Ctrl-C stops it; what it started is
/// stopped and removed on the way out (the guards do that when the future is dropped).
pub async fn run(opts: &BenchOptions, progress: &mut dyn FnMut(&str)) -> Result<String, Box<dyn std::error::Error>> {
    tokio::select! {
        r = run_inner(opts, progress) => Ok(r?),
        _ = tokio::signal::ctrl_c() => Err(BenchError::Interrupted.into()),
    }
}

/// Bytes a file really occupies (mapped-ram state files are sparse: zero pages are holes).
fn allocated(path: &Path) -> Result<u64, BenchError> {
    let md = std::fs::metadata(path).map_err(|source| BenchError::Stat { path: path.to_owned(), source })?;
    Ok(md.blocks() * 512)
}

/// Flushes everything dirty on the host, so no measurement pays for an earlier one's writes.
async fn settle() {
    let _ = tokio::task::spawn_blocking(nix::unistd::sync).await;
}

fn remove_dir(path: &Path) -> Result<(), BenchError> {
    std::fs::remove_dir_all(path).map_err(|source| BenchError::Stat { path: path.to_owned(), source })
}

/// The guest being backed up: the booted one, then each restored one.
enum Source {
    Booted(testguest::TestGuest),
    /// A restored guest and the backup folder holding its disks' backing files.
    Restored(restore::Restored, PathBuf),
    Gone,
}

impl Source {
    fn machine(&self) -> &Machine {
        match self {
            Source::Booted(g) => &g.machine,
            Source::Restored(r, _) => &r.machine,
            Source::Gone => unreachable!("a round always has a guest to save"),
        }
    }

    /// Stops the guest (its QEMU and overlays go) and removes the backup it came from.
    fn dismiss(&mut self) -> Result<(), BenchError> {
        if let Source::Restored(r, dir) = std::mem::replace(self, Source::Gone) {
            drop(r);
            remove_dir(&dir)?;
        }
        Ok(())
    }
}

/// How long a completed step of `tl` took, in seconds.
fn step_secs(tl: &Timeline, name: &str) -> Option<f64> {
    let s = tl.steps().into_iter().rev().find(|s| s.name == name && s.outcome == Outcome::Ok)?;
    Some((s.end_ms - s.start_ms) / 1000.0)
}

/// Times an fdatasync of `path`.
async fn fdatasync(path: &Path) -> Result<f64, BenchError> {
    let p = path.to_owned();
    let t = Instant::now();
    tokio::task::spawn_blocking(move || std::fs::File::open(&p).and_then(|f| f.sync_data()))
        .await
        .map_err(|e| BenchError::Stat { path: path.to_owned(), source: std::io::Error::other(e) })?
        .map_err(|source| BenchError::Stat { path: path.to_owned(), source })?;
    Ok(t.elapsed().as_secs_f64())
}

async fn run_inner(opts: &BenchOptions, progress: &mut dyn FnMut(&str)) -> Result<String, BenchError> {
    let werr = |path: &Path| {
        let path = path.to_owned();
        move |source| BenchError::WorkDir { path, source }
    };
    let created = !opts.work_dir.exists();
    std::fs::create_dir_all(&opts.work_dir).map_err(werr(&opts.work_dir))?;
    let work = std::fs::canonicalize(&opts.work_dir).map_err(werr(&opts.work_dir))?;
    // Everything this run writes goes in here and is removed with it.
    let run_dir = tempfile::Builder::new().prefix("run-").tempdir_in(&work).map_err(werr(&work))?;
    let rd = run_dir.path();

    progress("probing QEMU's capabilities");
    let qemu_bin = quiesce::qemu::config::default_qemu_binary();
    let caps = caps::probe(&qemu_bin).await?;
    let settings = SaveSettings::default();
    let plan = Plan::for_qemu(&caps, &settings);
    if opts.series_only {
        let text = series_text(opts, &caps, rd, progress).await?;
        drop(run_dir);
        if created {
            let _ = std::fs::remove_dir(&work);
        }
        return Ok(text);
    }
    // Local to this benchmark: its saves include one with QEMU's default (throttled)
    // bandwidth, and all write the guest's RAM, so the deadline grows with it: 2 minutes,
    // and a second per 4 MiB.
    let migrate_deadline = Duration::from_secs(120 + u64::from(opts.memory_mib) / 4);

    let mut gopts = GuestOptions::named(VM);
    gopts.accel = opts.accel;
    gopts.memory_mib = opts.memory_mib;
    let guest = testguest::boot(gopts, progress).await?;
    let image = guest.image.clone();
    let accel = guest.accel.accel;
    let m = &guest.machine;
    let agent = m.agent().map_err(BenchError::Agent)?;

    progress(&format!("filling {} MiB of the guest's RAM", fill::target_mib(opts.memory_mib)));
    let t = Instant::now();
    let script = fill::script(fill::target_mib(opts.memory_mib), fill::headroom_mib(opts.memory_mib));
    let out = exec::sh(agent, &script, fill::FILL_DEADLINE).await?;
    let fill_secs = t.elapsed().as_secs_f64();
    let fill_mib = fill::parse_filled(&out).ok_or_else(|| BenchError::FillOutput(out.clone()))?;

    // 2. QEMU's defaults, first, while the machine's migration settings are untouched.
    let params = m
        .qmp()
        .execute_raw("query-migrate-parameters", Value::Null, deadline::QMP_COMMAND)
        .await
        .map_err(qmp_def(m))?;
    let default_bandwidth = params["max-bandwidth"].as_u64();
    let mut defaults = Vec::new();
    let mut defaults_bytes = Vec::new();
    for i in 0..ROUNDS {
        progress(&format!("plain migrate with QEMU's defaults, {}/{ROUNDS}", i + 1));
        let path = rd.join(format!("defaults-{i}.state"));
        settle().await;
        defaults.push(plain_migrate(m, &path, migrate_deadline).await?);
        defaults_bytes.push(allocated(&path)?);
        let _ = std::fs::remove_file(&path);
    }

    // Ours: the Saved State backup as quiesce makes it.
    let mut ours = Ours {
        save: vec![],
        save_bytes: vec![],
        whole: vec![],
        downtime: vec![],
        capture: vec![],
        flush: vec![],
        restore: vec![],
        load: vec![],
    };
    // As with virsh, each round saves the guest, then restores it into a new QEMU once the
    // saved one is gone, and the restored guest is the one saved in the next round. So both
    // restores start with the saved guest's memory just freed, and neither shares the CPUs.
    let mut source = Source::Booted(guest);
    for i in 0..ROUNDS {
        progress(&format!("quiesce Saved State backup, {}/{ROUNDS}", i + 1));
        let tl = Timeline::new();
        let path = rd.join(format!("ours-{i}"));
        let mut w = BackupWriter::create(&path, &caps.version)?;
        settle().await;
        let t = Instant::now();
        let vm = job::saved_state(source.machine(), &caps, &settings, "benchmark", &mut w, &tl).await?;
        let backup = w.commit()?;
        ours.whole.push(t.elapsed().as_secs_f64());
        ours.save.push(step_secs(&tl, SAVE_STEP).ok_or(BenchError::NoStep { round: i + 1, step: SAVE_STEP })?);
        let state = backup.vm_dir(VM).join(&vm.state.as_ref().ok_or(BenchError::NoState)?.file);
        ours.save_bytes.push(allocated(&state)?);
        ours.flush.push(fdatasync(&state).await?);
        ours.downtime.push(vm.timings.downtime_ms.unwrap_or(f64::NAN) / 1000.0);
        ours.capture.push(vm.timings.capture_ms / 1000.0);
        // The saved guest goes (and with it the backup its disks came from, if any).
        source.dismiss()?;

        progress(&format!("quiesce restore, {}/{ROUNDS}", i + 1));
        settle().await;
        let tl = Timeline::new();
        let restored = restore::saved_state(&backup, VM, &RestoreOptions::named(VM), &tl).await?;
        ours.restore.push(restored.restore_ms / 1000.0);
        ours.load.push(step_secs(&tl, LOAD_STEP).ok_or(BenchError::NoStep { round: i + 1, step: LOAD_STEP })?);
        // Not timed: the restored guest is alive and its agent answers.
        let agent = restored.machine.agent().map_err(BenchError::RestoredAgent)?;
        agent
            .wait_ready(deadline::AGENT_AFTER_RESUME)
            .await
            .map_err(|e| BenchError::RestoredAgent(restored.machine.agent_err(e)))?;
        // Its state file is read; its disks stay, as the restored guest's backing files.
        std::fs::remove_file(&state).map_err(|source| BenchError::Stat { path: state.clone(), source })?;
        source = Source::Restored(restored, backup.path.clone());
    }
    source.dismiss()?;

    // 1. dd, writing as many bytes as our state file occupies.
    let dd_mib = median_u64(&ours.save_bytes).div_ceil(1 << 20);
    let dd_path = rd.join("dd.bin");
    // Like every measured file here, each dd file is removed before the next measurement
    // (and the removal synced), so each writer starts from the same filesystem state: on
    // this host, writing into fresh space rather than just-freed space was up to 10x slower
    // (350 MiB into the page cache: 0.06 s vs 0.85 s).
    let (mut dd_secs, mut dd_cached) = (Vec::new(), Vec::new());
    for i in 0..ROUNDS {
        progress(&format!("dd baseline, {}/{ROUNDS}", i + 1));
        settle().await;
        dd_secs.push(dd::write(&dd_path, dd_mib, true, migrate_deadline).await?.secs);
        settle().await;
        dd_cached.push(dd::write(&dd_path, dd_mib, false, migrate_deadline).await?.secs);
    }

    // 3. libvirt.
    let libvirt = if opts.libvirt {
        let run = LibvirtRun {
            image: &image,
            accel,
            memory_mib: opts.memory_mib,
            fill_mib,
            dir: rd,
            deadline: migrate_deadline,
        };
        match libvirt_phase(&run, progress).await {
            Ok(n) => LibvirtOutcome::Done(n),
            Err(e) => LibvirtOutcome::Failed(e.to_string()),
        }
    } else {
        LibvirtOutcome::Skipped
    };

    let series = if opts.data_mib.is_empty() { String::new() } else { series_text(opts, &caps, rd, progress).await? };
    let report = Report {
        memory_mib: opts.memory_mib,
        accel: accel.as_str().to_uppercase(),
        qemu: caps.version.clone(),
        plan,
        max_bandwidth: settings.max_bandwidth,
        work_dir: format!("{} ({})", work.display(), filesystem_of(&work)),
        fill_mib,
        fill_secs,
        default_bandwidth,
        defaults,
        defaults_bytes,
        ours,
        dd_cmd: dd::cmdline(&work.join("run-*/dd.bin"), dd_mib, true),
        dd: dd_secs,
        dd_cached,
        dd_bytes: dd_mib << 20,
        libvirt,
    };
    drop(run_dir);
    if created {
        // Only if it is empty: nothing but this run's files is ever removed.
        let _ = std::fs::remove_dir(&work);
    }
    Ok(format!("{}{}{series}", render(&report), if series.is_empty() { "" } else { "\n" }))
}

/// Runs the series of downtime against disk data (with libvirt's path, unless
/// `--no-libvirt`) and returns its report.
async fn series_text(
    opts: &BenchOptions,
    caps: &caps::Capabilities,
    rd: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<String, BenchError> {
    let image = quiesce::image::recipe::ensure("linux", false, progress).map_err(GuestError::from)?;
    let accel = testguest::accel_for(&image, opts.accel)?.accel;
    let mut lv = None;
    let mut lv_failed = None;
    if opts.libvirt {
        let mask_kvm = accel != quiesce::qemu::Accel::Kvm && Path::new("/dev/kvm").exists();
        match crate::libvirt::Libvirt::start(mask_kvm, progress).await {
            Ok(l) => lv = Some(l),
            Err(e) => lv_failed = Some(e.to_string()),
        }
    }
    let points = series::run(opts, caps, &image, accel, lv.as_ref(), rd, progress).await;
    if let Some(lv) = lv {
        progress("stopping the libvirt daemon");
        let _ = tokio::task::spawn_blocking(move || {
            let mut lv = lv;
            lv.stop()
        })
        .await;
    }
    let mut points = points?;
    if let Some(why) = lv_failed {
        for p in &mut points {
            p.libvirt = Err(why.clone());
        }
    }
    Ok(series::render(&points, opts.memory_mib, opts.series_rounds))
}

fn qmp_def(m: &Machine) -> impl Fn(QmpError) -> BenchError + '_ {
    move |e| BenchError::Defaults(m.qmp_err(e))
}

/// A plain `migrate` to a `file:` URI of the running guest, with QEMU's default settings
/// (only the `events` capability is set, so completion is an event). Timed from the
/// command to the MIGRATION `completed` event; the guest is then continued.
async fn plain_migrate(m: &Machine, path: &Path, deadline: Duration) -> Result<f64, BenchError> {
    let q = qmp_def(m);
    m.qmp()
        .execute_raw(
            "migrate-set-capabilities",
            json!({"capabilities": [{"capability": "events", "state": true}]}),
            deadline::QMP_COMMAND,
        )
        .await
        .map_err(&q)?;
    let t = Instant::now();
    quiesce::backup::saved_state::migrate_to_file(m, path, deadline).await?;
    let secs = t.elapsed().as_secs_f64();
    // QEMU sends `completed` while still in finish-migrate; `cont` before it moves on fails.
    let now = runstate::settle(m, deadline::QMP_COMMAND).await.map_err(BenchError::Defaults)?;
    if now.status == "finish-migrate" {
        return Err(BenchError::NotRunning(format!(
            "still {} {:?} after the save completed",
            now.status,
            deadline::QMP_COMMAND
        )));
    }
    // Postmigrate, disks inactive: `cont` reactivates them and runs the guest again.
    let _ = m.qmp().events().drain("RESUME");
    m.qmp().execute_raw("cont", Value::Null, deadline::QMP_COMMAND).await.map_err(&q)?;
    m.qmp().wait_event("RESUME", |_| true, deadline::COMMAND_EVENT).await.map_err(&q)?;
    let now = runstate::query(m).await.map_err(BenchError::Defaults)?;
    if !now.running {
        return Err(BenchError::NotRunning(format!("{} after `cont`, not running", now.status)));
    }
    Ok(secs)
}
