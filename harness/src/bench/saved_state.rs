//! `quiesce bench saved-state`: saves a guest whose RAM is mostly filled with
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

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::dd::{self, DdError};
use super::fill;
use super::libvirt::{self, DomainSpec, Libvirt, LibvirtError};
use crate::backup::saved_state::{Plan, SaveSettings};
use crate::backup::{job, runstate, BackupError, BackupWriter, FolderError};
use crate::image::qemu_img;
use crate::image::GuestImage;
use crate::qemu::caps::{self, CapsError};
use crate::qemu::exec::{self, ExecError};
use crate::qemu::{Accel, DiskFormat, Machine, MachineError, QmpError};
use crate::testguest::{self, GuestError, GuestOptions};
use crate::timeline::{Outcome, Timeline};
use crate::verify::{restore, RestoreError, RestoreOptions};

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub accel: Option<crate::qemu::accel::AccelChoice>,
    /// Guest RAM to fill, in MiB.
    pub memory_mib: u32,
    /// Where state files and dd output go (the filesystem being measured).
    pub work_dir: std::path::PathBuf,
    /// Run the libvirt comparison (needs libvirt installed; its daemon is started by hand).
    pub libvirt: bool,
}

/// Each measurement is taken this many times; the median is reported.
pub const ROUNDS: usize = 5;
const VM: &str = "bench";
const SAVE_STEP: &str = "save state (migrate to file)";
const LOAD_STEP: &str = "load state (incoming migration)";
const T: Duration = Duration::from_secs(30);

/// Goals from the issue.
const GOAL_VS_DEFAULTS: f64 = 5.0;
const GOAL_VS_LIBVIRT: f64 = 0.5;
const GOAL_VS_DD: f64 = 0.9;

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("work folder {path}: {source}")]
    WorkDir { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Caps(#[from] CapsError),
    #[error("booting the benchmark guest: {0}")]
    Guest(#[from] GuestError),
    #[error("the benchmark guest's agent: {0}")]
    Agent(MachineError),
    #[error("filling the guest's RAM: {0}")]
    Fill(#[from] ExecError),
    #[error("filling the guest's RAM: the fill script printed no size: {0:?}")]
    FillOutput(String),
    #[error("plain migrate with QEMU's defaults: {0}")]
    Defaults(MachineError),
    #[error("plain migrate with QEMU's defaults ended {status}: {desc}")]
    DefaultsFailed { status: String, desc: String },
    #[error("VM {VM} after the plain migrate: {0}")]
    NotRunning(String),
    #[error(transparent)]
    Backup(#[from] BackupError),
    #[error(transparent)]
    Folder(#[from] FolderError),
    #[error(transparent)]
    Restore(#[from] RestoreError),
    #[error("the restored guest's agent: {0}")]
    RestoredAgent(MachineError),
    #[error("the timeline of round {round} has no completed `{step}` step")]
    NoStep { round: usize, step: &'static str },
    #[error("our backup has no state file")]
    NoState,
    #[error("dd baseline: {0}")]
    Dd(#[from] DdError),
    #[error("{path}: {source}")]
    Stat { path: PathBuf, source: std::io::Error },
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

/// The middle value (mean of the two middle ones for an even count).
pub fn median(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn median_u64(xs: &[u64]) -> u64 {
    median(&xs.iter().map(|&x| x as f64).collect::<Vec<_>>()).round() as u64
}

/// Bytes a file really occupies (mapped-ram state files are sparse: zero pages are holes).
fn allocated(path: &Path) -> Result<u64, BenchError> {
    let md = std::fs::metadata(path).map_err(|source| BenchError::Stat { path: path.to_owned(), source })?;
    Ok(md.blocks() * 512)
}

/// Flushes everything dirty on the host, so no measurement pays for an earlier one's writes.
async fn settle() {
    // SAFETY: sync(2) has no arguments and cannot fail.
    let _ = tokio::task::spawn_blocking(|| unsafe { libc::sync() }).await;
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

/// "ext4 on /dev/vda at /": the filesystem holding `path`, from /proc/self/mounts.
pub(super) fn filesystem_of(path: &Path) -> String {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 3).then(|| (f[0], f[1].replace("\\040", " "), f[2]))
        })
        .filter(|(_, mnt, _)| path.starts_with(mnt))
        .max_by_key(|(_, mnt, _)| mnt.len())
        .map(|(dev, mnt, ty)| format!("{ty} on {dev} at {mnt}"))
        .unwrap_or_else(|| "filesystem unknown".into())
}

struct Ours {
    save: Vec<f64>,
    save_bytes: Vec<u64>,
    whole: Vec<f64>,
    downtime: Vec<f64>,
    capture: Vec<f64>,
    /// fdatasync of the state file once the backup has returned: what was left unwritten.
    flush: Vec<f64>,
    restore: Vec<f64>,
    /// The restore's `load state (incoming migration)` step.
    load: Vec<f64>,
}

struct LibvirtNumbers {
    how: String,
    fill_mib: u32,
    save: Vec<f64>,
    restore: Vec<f64>,
    bytes: Vec<u64>,
}

enum LibvirtOutcome {
    Skipped,
    Failed(String),
    Done(LibvirtNumbers),
}

struct Report {
    memory_mib: u32,
    accel: String,
    qemu: String,
    plan: Plan,
    max_bandwidth: u64,
    work_dir: String,
    fill_mib: u32,
    fill_secs: f64,
    default_bandwidth: Option<u64>,
    defaults: Vec<f64>,
    defaults_bytes: Vec<u64>,
    ours: Ours,
    dd_cmd: String,
    /// With conv=fsync.
    dd: Vec<f64>,
    /// Without: the page cache only.
    dd_cached: Vec<f64>,
    dd_bytes: u64,
    libvirt: LibvirtOutcome,
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
    let qemu_bin = crate::qemu::config::default_qemu_binary();
    let caps = caps::probe(&qemu_bin).await?;
    let settings = SaveSettings::default();
    let plan = Plan::for_qemu(&caps, &settings);
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
    let out = exec::sh(agent, &script, Duration::from_secs(600)).await?;
    let fill_secs = t.elapsed().as_secs_f64();
    let fill_mib = fill::parse_filled(&out).ok_or_else(|| BenchError::FillOutput(out.clone()))?;

    // 2. QEMU's defaults, first, while the machine's migration settings are untouched.
    let params = m.qmp().execute_raw("query-migrate-parameters", Value::Null, T).await.map_err(qmp_def(m))?;
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
        agent.wait_ready(T).await.map_err(|e| BenchError::RestoredAgent(restored.machine.agent_err(e)))?;
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
    Ok(render(&report))
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
        .execute_raw("migrate-set-capabilities", json!({"capabilities": [{"capability": "events", "state": true}]}), T)
        .await
        .map_err(&q)?;
    let t = Instant::now();
    crate::backup::saved_state::migrate_to_file(m, path, deadline).await?;
    let secs = t.elapsed().as_secs_f64();
    // QEMU sends `completed` while still in finish-migrate; `cont` before it moves on fails.
    let now = runstate::settle(m, T).await.map_err(BenchError::Defaults)?;
    if now.status == "finish-migrate" {
        return Err(BenchError::NotRunning(format!("still {} {T:?} after the save completed", now.status)));
    }
    // Postmigrate, disks inactive: `cont` reactivates them and runs the guest again.
    let _ = m.qmp().events().drain("RESUME");
    m.qmp().execute_raw("cont", Value::Null, T).await.map_err(&q)?;
    m.qmp().wait_event("RESUME", |_| true, T).await.map_err(&q)?;
    let now = runstate::query(m).await.map_err(BenchError::Defaults)?;
    if !now.running {
        return Err(BenchError::NotRunning(format!("{} after `cont`, not running", now.status)));
    }
    Ok(secs)
}

/// What the libvirt guest is made of and where its files go.
struct LibvirtRun<'a> {
    image: &'a GuestImage,
    accel: Accel,
    memory_mib: u32,
    /// What our guest was filled with; the libvirt guest gets the same.
    fill_mib: u32,
    dir: &'a Path,
    deadline: Duration,
}

/// Boots the same guest under libvirt, fills it the same way, and times `virsh save` and
/// `virsh restore`. The daemon is stopped whatever happens.
async fn libvirt_phase(run: &LibvirtRun<'_>, progress: &mut dyn FnMut(&str)) -> Result<LibvirtNumbers, String> {
    // Where KVM does not work, libvirt must not see /dev/kvm (see bench::libvirt).
    let mask_kvm = run.accel != Accel::Kvm && Path::new("/dev/kvm").exists();
    let mut lv = Libvirt::start(mask_kvm, progress).await.map_err(|e| e.to_string())?;
    let result = libvirt_rounds(&lv, run, progress).await;
    progress("destroying the libvirt domain and stopping the daemons");
    // Blocking (virsh destroy, waits on pidfds): off the runtime's workers.
    let (lv, problems) = tokio::task::spawn_blocking(move || {
        let problems = lv.stop();
        (lv, problems)
    })
    .await
    .map_err(|e| format!("libvirt clean-up panicked: {e}"))?;
    let mut numbers = result.map_err(|e| e.to_string())?;
    if !problems.is_empty() {
        return Err(format!("clean-up failed: {}", problems.join("; ")));
    }
    numbers.how = lv.how.clone();
    Ok(numbers)
}

async fn libvirt_rounds(
    lv: &Libvirt,
    run: &LibvirtRun<'_>,
    progress: &mut dyn FnMut(&str),
) -> Result<LibvirtNumbers, LibvirtError> {
    let LibvirtRun { image, accel, memory_mib, fill_mib: target, dir: rd, deadline } = *run;
    let name = format!("quiesce-bench-{}", std::process::id());
    let overlay = lv.dir().join("root.qcow2");
    qemu_img::create_overlay(&image.root, DiskFormat::Raw, &overlay)
        .map_err(|e| LibvirtError::Io { what: "create the root overlay".into(), source: std::io::Error::other(e) })?;
    let qemu = crate::qemu::config::default_qemu_binary();
    let emulator =
        if qemu.starts_with('/') { PathBuf::from(&qemu) } else { libvirt::find_program(&qemu).unwrap_or(qemu.into()) };
    let serial_log = lv.dir().join("serial.log");
    let spec = DomainSpec {
        name: name.clone(),
        kvm: accel == Accel::Kvm,
        emulator,
        memory_mib,
        cpus: 1,
        kernel: image.kernel.clone(),
        initrd: image.initrd.clone(),
        cmdline: image.cmdline.clone(),
        overlay,
        backing: image.root.clone(),
        backing_format: "raw".into(),
        data_disks: vec![],
        serial_log: serial_log.clone(),
    };
    progress(&format!("booting the same guest under libvirt ({name})"));
    lv.create(&spec).await?;
    lv.wait_agent(&name, &serial_log, testguest::AGENT_DEADLINE).await?;
    progress(&format!("filling {target} MiB of the libvirt guest's RAM"));
    let out =
        lv.guest_sh(&name, &fill::script(target, fill::headroom_mib(memory_mib)), Duration::from_secs(600)).await?;
    let fill_mib = fill::parse_filled(&out).ok_or_else(|| LibvirtError::GuestExec {
        domain: name.clone(),
        what: format!("the fill script printed no size: {out:?}"),
    })?;
    let mut n = LibvirtNumbers { how: String::new(), fill_mib, save: vec![], restore: vec![], bytes: vec![] };
    for i in 0..ROUNDS {
        let file = rd.join(format!("virsh-{i}.save"));
        progress(&format!("virsh save, {}/{ROUNDS}", i + 1));
        settle().await;
        let t = Instant::now();
        lv.save(&name, &file, deadline).await?;
        n.save.push(t.elapsed().as_secs_f64());
        n.bytes.push(std::fs::metadata(&file).map(|m| m.blocks() * 512).unwrap_or(0));
        progress(&format!("virsh restore, {}/{ROUNDS}", i + 1));
        settle().await;
        let t = Instant::now();
        lv.restore(&name, &file, deadline).await?;
        n.restore.push(t.elapsed().as_secs_f64());
        let _ = std::fs::remove_file(&file);
        let state = lv.state(&name).await?;
        if state != "running" {
            return Err(LibvirtError::GuestExec {
                domain: name.clone(),
                what: format!("is {state} after virsh restore, not running"),
            });
        }
    }
    // Not timed: the restored guest's agent answers.
    lv.wait_agent(&name, &serial_log, T).await?;
    Ok(n)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1 << 20)
}

fn runs(xs: &[f64]) -> String {
    let v: Vec<String> = xs.iter().map(|x| format!("{x:.3}")).collect();
    format!("[{}]", v.join(" "))
}

pub(super) fn goal(met: bool) -> &'static str {
    if met {
        "goal met"
    } else {
        "goal missed"
    }
}

fn render(r: &Report) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let o = &r.ours;
    let save = median(&o.save);
    let save_bytes = median_u64(&o.save_bytes);
    let mbps = |bytes: u64, secs: f64| bytes as f64 / 1e6 / secs;
    let ours_mbps = mbps(save_bytes, save);
    let dd_mbps = mbps(r.dd_bytes, median(&r.dd));
    let cached_mbps = mbps(r.dd_bytes, median(&r.dd_cached));
    let defaults = median(&r.defaults);
    let plan = match (r.plan.mapped_ram, r.plan.multifd_channels) {
        (true, Some(n)) => format!("mapped-ram + multifd ({n} channels)"),
        (true, None) => "mapped-ram, one channel".to_owned(),
        (false, _) => "stream format (no mapped-ram in this QEMU)".to_owned(),
    };
    let bw = |b: u64| format!("{:.0} MiB/s", mib(b));
    let _ = writeln!(s, "quiesce bench saved-state: {} MiB guest, {}, QEMU {}", r.memory_mib, r.accel, r.qemu);
    let _ = writeln!(
        s,
        "guest RAM: {} MiB of random, non-repeating data in a tmpfs (filled in {:.1} s); {ROUNDS} rounds each, medians",
        r.fill_mib, r.fill_secs
    );
    let _ = writeln!(s, "work dir: {}", r.work_dir);
    let _ = writeln!(s, "ours: {plan}, max-bandwidth {}", bw(r.max_bandwidth));
    let _ = writeln!(s);
    let _ = writeln!(s, "raw numbers: median, then every run (seconds)");
    let line = |s: &mut String, what: &str, xs: &[f64], extra: String| {
        let _ = writeln!(s, "  {what:<42} {:>7.3} s  {}{extra}", median(xs), runs(xs));
    };
    line(
        &mut s,
        "ours: save state (migrate to file)",
        &o.save,
        format!("  {:.0} MiB, {ours_mbps:.0} MB/s", mib(save_bytes)),
    );
    line(&mut s, "ours: fdatasync of the state file, after", &o.flush, "  (what was still unwritten)".into());
    line(&mut s, "ours: whole backup (save + disk capture)", &o.whole, String::new());
    line(&mut s, "ours: guest downtime", &o.downtime, String::new());
    line(&mut s, "ours: disk capture (with verification)", &o.capture, String::new());
    line(&mut s, "ours: restore (QEMU launch to running)", &o.restore, String::new());
    line(&mut s, "ours: restore, of which loading the state", &o.load, String::new());
    line(&mut s, "dd, conv=fsync", &r.dd, format!("  {:.0} MiB, {dd_mbps:.0} MB/s", mib(r.dd_bytes)));
    line(
        &mut s,
        "dd, no fsync (page cache)",
        &r.dd_cached,
        format!("  {:.0} MiB, {cached_mbps:.0} MB/s", mib(r.dd_bytes)),
    );
    let _ = writeln!(s, "      {}", r.dd_cmd);
    let def_bw = r.default_bandwidth.map(bw).unwrap_or_else(|| "unknown".into());
    line(
        &mut s,
        "QEMU defaults: migrate to file:",
        &r.defaults,
        format!("  {:.0} MiB; max-bandwidth {def_bw}, stream format, live", mib(median_u64(&r.defaults_bytes))),
    );
    match &r.libvirt {
        LibvirtOutcome::Done(l) => {
            line(&mut s, "virsh save", &l.save, format!("  {:.0} MiB", mib(median_u64(&l.bytes))));
            line(&mut s, "virsh restore", &l.restore, String::new());
        }
        LibvirtOutcome::Skipped => {
            let _ = writeln!(s, "  virsh save / restore: skipped (--no-libvirt)");
        }
        LibvirtOutcome::Failed(why) => {
            let _ = writeln!(s, "  virsh save / restore: not measured: {why}");
        }
    }
    let _ = writeln!(s);
    let _ = writeln!(s, "ratios");
    let tp = ours_mbps / dd_mbps;
    let _ = writeln!(
        s,
        "  1. our save throughput / dd's (conv=fsync)     {tp:>6.2}x   (goal >= {GOAL_VS_DD}x: {})",
        goal(tp >= GOAL_VS_DD)
    );
    let _ = writeln!(
        s,
        "     for reference, our save / dd without fsync     {:>6.2}x   (both end in the page cache)",
        ours_mbps / cached_mbps
    );
    let faster = defaults / save;
    let _ = writeln!(
        s,
        "  2. our save time / QEMU defaults'              {:>6.3}    ({faster:.1}x faster; goal >= {GOAL_VS_DEFAULTS}x faster: {})",
        save / defaults,
        goal(faster >= GOAL_VS_DEFAULTS)
    );
    match &r.libvirt {
        LibvirtOutcome::Done(l) => {
            let sv = save / median(&l.save);
            let rs = median(&o.restore) / median(&l.restore);
            let _ = writeln!(
                s,
                "  3. our save time / virsh save's                {sv:>6.3}    (goal <= {GOAL_VS_LIBVIRT}: {})",
                goal(sv <= GOAL_VS_LIBVIRT)
            );
            let _ = writeln!(
                s,
                "     our restore time / virsh restore's          {rs:>6.3}    (goal <= {GOAL_VS_LIBVIRT}: {})",
                goal(rs <= GOAL_VS_LIBVIRT)
            );
            let _ = writeln!(
                s,
                "     for reference, our whole backup / virsh save   {:>6.3}    (both on disk when they return)",
                median(&o.whole) / median(&l.save)
            );
            let _ = writeln!(s);
            let _ = writeln!(s, "libvirt: {}", l.how);
            let _ = writeln!(
                s,
                "libvirt guest: same kernel, initrd and cmdline, qcow2 overlay over root.img (raw), {} MiB, 1 vCPU; \
                 filled with {} MiB the same way",
                r.memory_mib, l.fill_mib
            );
        }
        LibvirtOutcome::Skipped => {
            let _ = writeln!(s, "  3. vs virsh save / restore: skipped (--no-libvirt)");
        }
        LibvirtOutcome::Failed(why) => {
            let _ = writeln!(s, "  3. vs virsh save / restore: not measured: {why}");
        }
    }
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "notes: QEMU does not fsync a file: migration (checked with strace on 10.0.2), so our save step \
         ends in the page cache;\n  the backup's own fsyncs (capture, manifest) leave the state file on disk \
         when the whole backup returns (the fdatasync after it found {:.3} s of work).",
        median(&o.flush)
    );
    if matches!(r.libvirt, LibvirtOutcome::Done(_)) {
        let _ = writeln!(
            s,
            "  virsh save writes through libvirt_iohelper, which fdatasyncs the file before virsh returns."
        );
    }
    let _ = writeln!(s, "  Every measured file is removed (and the removal synced) before the next measurement.");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
        assert_eq!(median_u64(&[10, 30, 20]), 20);
    }

    fn report(libvirt: LibvirtOutcome) -> Report {
        Report {
            memory_mib: 1024,
            accel: "TCG".into(),
            qemu: "10.0.2".into(),
            plan: Plan { mapped_ram: true, multifd_channels: Some(2) },
            max_bandwidth: 1 << 40,
            work_dir: "/w (ext4 on /dev/vda at /)".into(),
            fill_mib: 768,
            fill_secs: 5.0,
            default_bandwidth: Some(128 << 20),
            defaults: vec![6.0, 6.2, 6.1],
            defaults_bytes: vec![800 << 20; 3],
            ours: Ours {
                save: vec![0.5, 0.6, 0.4],
                save_bytes: vec![800 << 20; 3],
                whole: vec![3.0; 3],
                downtime: vec![2.0; 3],
                capture: vec![1.0; 3],
                flush: vec![0.5; 3],
                restore: vec![1.0; 3],
                load: vec![0.5; 3],
            },
            dd_cmd: "dd ...".into(),
            dd: vec![1.0; 3],
            dd_cached: vec![0.25; 3],
            dd_bytes: 800 << 20,
            libvirt,
        }
    }

    #[test]
    fn report_prints_every_ratio_with_its_goal() {
        let l = LibvirtNumbers {
            how: "started by hand".into(),
            fill_mib: 768,
            save: vec![1.0; 3],
            restore: vec![3.0; 3],
            bytes: vec![800 << 20; 3],
        };
        let text = render(&report(LibvirtOutcome::Done(l)));
        let flat = text.split_whitespace().collect::<Vec<_>>().join(" ");
        for want in [
            "our save throughput / dd's (conv=fsync) 2.00x (goal >= 0.9x: goal met)",
            "our save / dd without fsync 0.50x",
            "our whole backup / virsh save 3.000",
            "our save time / QEMU defaults' 0.082 (12.2x faster; goal >= 5x faster: goal met)",
            "our save time / virsh save's 0.500 (goal <= 0.5: goal met)",
            "our restore time / virsh restore's 0.333 (goal <= 0.5: goal met)",
        ] {
            assert!(flat.contains(want), "missing {want:?} in\n{text}");
        }
    }

    #[test]
    fn report_says_why_libvirt_is_missing() {
        let text = render(&report(LibvirtOutcome::Failed("libvirt is not installed".into())));
        assert!(text.contains("3. vs virsh save / restore: not measured: libvirt is not installed"), "{text}");
        let text = render(&report(LibvirtOutcome::Skipped));
        assert!(text.contains("skipped (--no-libvirt)"), "{text}");
    }
}
