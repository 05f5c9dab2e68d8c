//! `quiesce bench freeze-window`: how long a Child VM Snapshot keeps the guest frozen, with
//! 1 disk (the root disk) and with 4 (root and three ext4 data disks, mounted in the guest),
//! beside libvirt's `virsh snapshot-create-as --disk-only --quiesce --atomic --no-metadata`
//! on the same guest in the same run.
//!
//! Three things are measured, each [`DEFAULT_ROUNDS`] times (medians are compared):
//!
//! 1. **Ours**: the Child VM Snapshot's PrepareForSnapshot (overlays made and added before
//!    the freeze; freeze; one `transaction` of `blockdev-snapshot`; thaw), then its
//!    PostSnapshot (copy out, active commit), as [`child_snapshot::prepare`] and
//!    [`child_snapshot::post`] do it. The window and the host's share are the backup's own
//!    `Timings`; the guest's freeze and the thaw are its timeline steps.
//! 2. **Bare**, on the same guest as ours: freeze, one `transaction` of
//!    `blockdev-snapshot-sync` (QEMU creates the overlays while the guest is frozen), thaw,
//!    over raw QMP/QGA; merged back with an active `block-commit` after each run. This is
//!    the baseline when libvirt cannot run, and a reference otherwise.
//! 3. **libvirt**: the same guest under a libvirtd started by hand (see [`super::libvirt`]):
//!    same kernel, initrd, command line, root image (under a qcow2 overlay), data disks made
//!    from the same seeds, RAM, vCPU, virtio-blk serials and agent channel. The whole
//!    `virsh` command is timed; the freeze window and its parts come from the daemon's
//!    debug log of the agent traffic (millisecond stamps): the freeze sent, its reply, the
//!    thaw sent, its reply. After each run every disk's new overlay is merged into the image
//!    under it (`virsh blockcommit --active --shallow --pivot`) and removed, so each run
//!    starts from the same chains, as ours does after its own active commit.
//!
//! For each disk count both guests are up at once; each round runs ours, bare and libvirt
//! back to back in a rotating order (the guest not being measured sits idle), so a busy host
//! weighs on all three alike. Before the rounds each guest is frozen and thawed once,
//! untimed: the first freeze after boot is slower, and would fall on whoever goes first.
//!
//! Nothing is asserted: the goals are printed as met or missed beside each ratio.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use serde_json::{json, Value};

use super::libvirt::{self, DataDisk, DomainSpec, Libvirt, LibvirtError, StartOptions};
use super::saved_state::{filesystem_of, goal, median};
use crate::backup::child_snapshot::{self, SnapshotSettings, Undo};
use crate::backup::job::{self, MethodChoice};
use crate::backup::BackupError;
use crate::image::seed::{self, DiskSeed, Filesystem, Partitioning, SeedError};
use crate::image::{qemu_img, recipe, GuestImage};
use crate::qemu::exec::ExecError;
use crate::qemu::{Accel, DiskConfig, DiskFormat, Machine, MachineError};
use crate::testguest::{self, GuestError, GuestOptions};
use crate::timeline::{Outcome, Timeline};
use crate::workload;

#[derive(Debug, Clone)]
pub struct FreezeOptions {
    pub accel: Option<crate::qemu::accel::AccelChoice>,
    /// Runs of each measurement; the median is compared.
    pub rounds: usize,
    /// Run the libvirt comparison (needs libvirt installed; its daemon is started by hand).
    pub libvirt: bool,
}

pub const DEFAULT_ROUNDS: usize = 5;
/// Disks per guest: the root disk alone, then root and three data disks.
pub const DISK_COUNTS: [usize; 2] = [1, 4];
const DATA_DISK_BYTES: u64 = 64 << 20;
const MEMORY_MIB: u32 = 512;

/// Goals from the issue: our host share at most a quarter of libvirt's, our window below it.
const GOAL_HOST: f64 = 0.25;
const GOAL_WINDOW: f64 = 1.0;

const T: Duration = Duration::from_secs(30);
/// As the Child VM Snapshot's own deadlines.
const FREEZE_DEADLINE: Duration = Duration::from_secs(8);
const THAW_DEADLINE: Duration = Duration::from_secs(10);
const SNAPSHOT_DEADLINE: Duration = Duration::from_secs(60);
const COMMIT_DEADLINE: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum FreezeBenchError {
    #[error("could not {what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("making a data disk: {0}")]
    Seed(#[from] SeedError),
    #[error("booting the benchmark guest: {0}")]
    Guest(#[from] GuestError),
    #[error("the benchmark guest's agent: {0}")]
    Agent(MachineError),
    #[error("mounting a data disk in the guest: {0}")]
    Mount(ExecError),
    #[error(transparent)]
    Backup(#[from] BackupError),
    #[error("the Child VM Snapshot did not report {0}")]
    NoTiming(&'static str),
    #[error("the timeline of a Child VM Snapshot has no completed `{0}` step")]
    NoStep(&'static str),
    #[error("the Child VM Snapshot left something to undo after it returned")]
    NotClean,
    #[error("bare freeze + transaction + thaw: {0}")]
    Bare(String),
    #[error("the untimed freeze and thaw before the rounds: {0}")]
    WarmUp(String),
    #[error(
        "the cached guest image {path} changed during the run ({what}); rebuild it with `quiesce image build linux`"
    )]
    ImageChanged { path: PathBuf, what: String },
    #[error("interrupted; every VM and daemon this run started has been stopped")]
    Interrupted,
}

fn io(what: &str) -> impl FnOnce(std::io::Error) -> FreezeBenchError + '_ {
    move |source| FreezeBenchError::Io { what: what.to_owned(), source }
}

/// Runs the benchmark and returns the text to print. Ctrl-C stops it; what it started is
/// stopped and removed on the way out (the guards do that when the future is dropped).
pub async fn run(opts: &FreezeOptions, progress: &mut dyn FnMut(&str)) -> Result<String, Box<dyn std::error::Error>> {
    tokio::select! {
        r = run_inner(opts, progress) => Ok(r?),
        _ = tokio::signal::ctrl_c() => Err(FreezeBenchError::Interrupted.into()),
    }
}

/// One kind of measurement, every run, in milliseconds.
#[derive(Debug, Clone, Default)]
struct Series {
    /// From sending the freeze until the thaw returned.
    window: Vec<f64>,
    /// From sending the freeze until it returned: the guest's own freeze.
    freeze: Vec<f64>,
    /// From the freeze returning until the thaw was sent.
    host: Vec<f64>,
    /// From sending the thaw until it returned.
    thaw: Vec<f64>,
    /// Ours: PrepareForSnapshot; libvirt: the whole virsh command. Empty for bare.
    whole: Vec<f64>,
}

#[derive(Debug, Clone)]
struct LibvirtCase {
    series: Series,
    /// The freeze's reply (filesystems frozen), from the log.
    frozen: Option<u64>,
}

#[derive(Debug, Clone)]
enum LibvirtOutcome {
    Skipped,
    Failed(String),
    Done(LibvirtCase),
}

#[derive(Debug, Clone)]
struct Case {
    disks: usize,
    ours: Series,
    bare: Series,
    /// What the bare freeze replied on our guest (filesystems frozen).
    frozen: Option<u64>,
    libvirt: LibvirtOutcome,
}

struct Report {
    accel: String,
    qemu: String,
    rounds: usize,
    files: String,
    cases: Vec<Case>,
    /// How libvirt was reached, when it ran.
    libvirt_how: Option<String>,
    /// What libvirt's clean-up could not do.
    cleanup: Option<String>,
}

/// The seed of data disk `k` (1-based): the same on both sides.
fn data_seed(k: usize) -> DiskSeed {
    DiskSeed {
        name: format!("data{k}"),
        format: DiskFormat::Qcow2,
        size: DATA_DISK_BYTES,
        filesystem: Filesystem::Ext4,
        files: [("hello.txt".to_owned(), format!("data disk {k}\n"))].into(),
        partitioning: Partitioning::None,
    }
}

/// What identifies the cached root image's content on disk, to prove nothing wrote to it.
fn stamp(path: &Path) -> Result<(u64, SystemTime), FreezeBenchError> {
    let md = std::fs::metadata(path).map_err(io("read the cached root image's metadata"))?;
    Ok((md.len(), md.modified().map_err(io("read the cached root image's mtime"))?))
}

async fn run_inner(opts: &FreezeOptions, progress: &mut dyn FnMut(&str)) -> Result<String, FreezeBenchError> {
    let rounds = opts.rounds.max(1);
    // Everything of ours goes in here and is removed with it; libvirt's files go in its own
    // temporary folder, in the same parent folder.
    let run_dir = tempfile::Builder::new().prefix("quiesce-freeze-").tempdir().map_err(io("make a work folder"))?;
    let rd = run_dir.path();

    // Started once our first guest is up (it settles the accelerator), then kept for both
    // disk counts. Dropped (domains destroyed, daemon stopped) on every way out.
    let mut lv = if opts.libvirt { LvState::NotYet } else { LvState::Skipped };
    // Both sides boot overlays over the cached root image; it must come out untouched.
    let root = recipe::ensure("linux", false, progress).map_err(GuestError::from)?.root;
    let before = stamp(&root)?;
    let mut cases = Vec::new();
    let mut seen = None;
    for n in DISK_COUNTS {
        let (case, accel, qemu) = measure(opts, n, rounds, rd, &mut lv, progress).await?;
        seen.get_or_insert((accel, qemu));
        cases.push(case);
    }
    let (accel, qemu) = seen.expect("DISK_COUNTS is not empty");

    let mut libvirt_how = None;
    let mut cleanup = None;
    if let LvState::Up(l) = std::mem::replace(&mut lv, LvState::Skipped) {
        progress("stopping libvirtd");
        libvirt_how = Some(l.how.clone());
        // Blocking (virsh destroy, waits on pidfds): off the runtime's workers.
        let problems = tokio::task::spawn_blocking(move || {
            let mut l = l;
            l.stop()
        })
        .await
        .unwrap_or_else(|e| vec![format!("libvirt clean-up panicked: {e}")]);
        if !problems.is_empty() {
            cleanup = Some(problems.join("; "));
        }
    }
    let after = stamp(&root)?;
    if after != before {
        return Err(FreezeBenchError::ImageChanged {
            path: root,
            what: format!("size/mtime {before:?} before, {after:?} after"),
        });
    }

    let parent = rd.parent().unwrap_or(rd);
    let report = Report {
        accel: accel.as_str().to_uppercase(),
        qemu,
        rounds,
        files: format!("{} ({})", parent.display(), filesystem_of(parent)),
        cases,
        libvirt_how,
        cleanup,
    };
    drop(run_dir);
    Ok(render(&report))
}

/// libvirt across the run.
enum LvState {
    Skipped,
    NotYet,
    Failed(String),
    Up(Libvirt),
}

/// How long a completed step of `tl` took, in milliseconds.
fn step_ms(tl: &Timeline, name: &'static str) -> Result<f64, FreezeBenchError> {
    let s = tl
        .steps()
        .into_iter()
        .rev()
        .find(|s| s.name == name && s.outcome == Outcome::Ok)
        .ok_or(FreezeBenchError::NoStep(name))?;
    Ok(s.end_ms - s.start_ms)
}

/// Boots our guest with `n` disks and the same guest under libvirt, then measures ours,
/// the bare baseline and libvirt in turn, each round in a different order, so that a busy
/// host weighs on all three alike. Only the guest being measured does anything; the other
/// sits idle.
async fn measure(
    opts: &FreezeOptions,
    n: usize,
    rounds: usize,
    rd: &Path,
    lv: &mut LvState,
    progress: &mut dyn FnMut(&str),
) -> Result<(Case, Accel, String), FreezeBenchError> {
    let dir = rd.join(format!("{n}-disks"));
    std::fs::create_dir(&dir).map_err(io("make a folder for the guest's disks"))?;
    let mut extra = Vec::new();
    for k in 1..n {
        let s = data_seed(k);
        let path = seed::create(&dir, &s)?;
        extra.push(DiskConfig { node_name: s.name, path, format: DiskFormat::Qcow2, read_only: false });
    }
    let mut g = GuestOptions::named(&format!("freeze{n}"));
    g.accel = opts.accel;
    g.memory_mib = MEMORY_MIB;
    g.extra_disks = extra;
    g.disk_dir = Some(dir.clone());
    let guest = testguest::boot(g, progress).await?;
    let m = &guest.machine;
    let qemu = m.qmp().version().map(|(a, b, c)| format!("{a}.{b}.{c}")).unwrap_or_else(|| "(unknown)".into());
    let agent = m.agent().map_err(FreezeBenchError::Agent)?;
    for k in 1..n {
        workload::mount_disk(agent, &data_seed(k).name, "ext4").await.map_err(FreezeBenchError::Mount)?;
    }
    // The guest must qualify for a Child VM Snapshot, as a backup job would check.
    let tl = Timeline::new();
    job::choose(m, MethodChoice::ChildSnapshot, &dir, &tl).await?;

    if matches!(lv, LvState::NotYet) {
        // Where KVM does not work, libvirt must not see /dev/kvm (see bench::libvirt).
        let mask_kvm = guest.accel.accel != Accel::Kvm && Path::new("/dev/kvm").exists();
        *lv = match Libvirt::start_with(StartOptions { mask_kvm, agent_debug_log: true }, progress).await {
            Ok(l) => LvState::Up(l),
            Err(e) => LvState::Failed(e.to_string()),
        };
    }
    // The domain and its numbers while it is measured; `libvirt` says why it is not.
    let mut libvirt = LibvirtOutcome::Skipped;
    let mut domain = None;
    let mut libvirt_failed = None;
    match &*lv {
        LvState::Skipped | LvState::NotYet => {}
        LvState::Failed(why) => libvirt = LibvirtOutcome::Failed(why.clone()),
        LvState::Up(l) => match domain_up(l, &guest.image, guest.accel.accel, n, progress).await {
            Ok(d) => domain = Some((d, LibvirtCase { series: Series::default(), frozen: None })),
            Err(e) => libvirt = LibvirtOutcome::Failed(e.to_string()),
        },
    }

    // The first freeze after boot is slower (cold caches, the freeze hook's first run): each
    // guest gets one untimed freeze and thaw, so no side pays for it in its first round.
    progress(&format!("{}: one untimed freeze and thaw of each guest", disks_label(n)));
    warm_up(m).await?;
    if let (LvState::Up(l), Some((d, _))) = (&*lv, &domain) {
        if let Err(e) = l.freeze_thaw(&d.name).await {
            libvirt_failed = Some(format!("untimed freeze and thaw: {e}"));
        }
    }

    let settings = SnapshotSettings::new(&dir);
    let (mut ours, mut bare, mut frozen) = (Series::default(), Series::default(), None);
    for i in 0..rounds {
        for k in 0..3 {
            match (i + k) % 3 {
                0 => {
                    progress(&format!("{}: quiesce Child VM Snapshot, {}/{rounds}", disks_label(n), i + 1));
                    ours_round(m, &settings, &dir.join(format!("backup-{i}")), &mut ours).await?;
                }
                1 => {
                    progress(&format!("{}: bare freeze + transaction + thaw, {}/{rounds}", disks_label(n), i + 1));
                    frozen = bare_round(m, &dir, i, &mut bare).await?.or(frozen);
                }
                _ => {
                    let (LvState::Up(l), Some((d, c)), None) = (&*lv, &mut domain, &libvirt_failed) else { continue };
                    progress(&format!("{}: virsh snapshot-create-as --quiesce, {}/{rounds}", disks_label(n), i + 1));
                    if let Err(e) = libvirt_round(l, d, i, c).await {
                        libvirt_failed = Some(e.to_string());
                    }
                }
            }
        }
    }
    if let (LvState::Up(l), Some((d, c))) = (&*lv, domain) {
        libvirt = match (l.destroy(&d.name).await, libvirt_failed) {
            (_, Some(why)) => LibvirtOutcome::Failed(why),
            (Ok(()), None) => LibvirtOutcome::Done(c),
            (Err(e), None) => LibvirtOutcome::Failed(format!("destroying the domain: {e}")),
        };
        let _ = std::fs::remove_dir_all(&d.dir);
    }
    let accel = guest.accel.accel;
    drop(guest);
    std::fs::remove_dir_all(&dir).map_err(io("remove the guest's disks"))?;
    Ok((Case { disks: n, ours, bare, frozen, libvirt }, accel, qemu))
}

/// One freeze and thaw through our agent client (thawed even if the freeze failed).
async fn warm_up(m: &Machine) -> Result<(), FreezeBenchError> {
    let agent = m.agent().map_err(FreezeBenchError::Agent)?;
    let frozen = agent.execute_raw("guest-fsfreeze-freeze", Value::Null, FREEZE_DEADLINE).await;
    let thawed = agent.execute_raw("guest-fsfreeze-thaw", Value::Null, THAW_DEADLINE).await;
    let warm = |what: &str, e: crate::qemu::AgentError| FreezeBenchError::WarmUp(format!("{what}: {e}"));
    frozen.map_err(|e| warm("guest-fsfreeze-freeze", e))?;
    thawed.map_err(|e| warm("guest-fsfreeze-thaw", e))?;
    Ok(())
}

/// One Child VM Snapshot into `backup`, which is removed afterwards.
async fn ours_round(
    m: &Machine,
    settings: &SnapshotSettings,
    backup: &Path,
    s: &mut Series,
) -> Result<(), FreezeBenchError> {
    std::fs::create_dir(backup).map_err(io("make a backup folder"))?;
    let tl = Timeline::new();
    let undo = Mutex::new(Undo::default());
    let t = Instant::now();
    let (faults, interrupt) = (crate::backup::Faults::default(), crate::interrupt::Interrupt::new());
    let frozen = child_snapshot::prepare(m, settings, &faults, &interrupt, &tl, &undo).await?;
    let prepare_ms = t.elapsed().as_secs_f64() * 1000.0;
    let snap = child_snapshot::post(m, settings, backup, &tl, &undo, frozen).await?;
    std::fs::remove_dir_all(backup).map_err(io("remove a backup folder"))?;
    if !undo.lock().unwrap_or_else(|e| e.into_inner()).is_clean() {
        return Err(FreezeBenchError::NotClean);
    }
    s.window.push(snap.timings.freeze_window_ms.ok_or(FreezeBenchError::NoTiming("freeze_window_ms"))?);
    s.host.push(snap.timings.freeze_host_ms.ok_or(FreezeBenchError::NoTiming("freeze_host_ms"))?);
    s.freeze.push(step_ms(&tl, "freeze")?);
    s.thaw.push(step_ms(&tl, "thaw")?);
    s.whole.push(prepare_ms);
    Ok(())
}

/// Freeze, one transaction of `blockdev-snapshot-sync` (QEMU creates each overlay then),
/// thaw; then every overlay is merged back and removed. Returns the freeze's reply.
async fn bare_round(m: &Machine, dir: &Path, i: usize, s: &mut Series) -> Result<Option<u64>, FreezeBenchError> {
    let bare = |what: &str, e: &dyn std::fmt::Display| FreezeBenchError::Bare(format!("{what}: {e}"));
    let agent = m.agent().map_err(FreezeBenchError::Agent)?;
    let overlays: Vec<(String, String, PathBuf)> = m
        .config()
        .disks
        .iter()
        .map(|d| {
            let node = d.node_name.clone();
            (node.clone(), format!("{node}-bare{i}"), dir.join(format!("bare-{node}-{i}.qcow2")))
        })
        .collect();
    let actions: Vec<Value> = overlays
        .iter()
        .map(|(node, snap, path)| {
            json!({"type": "blockdev-snapshot-sync", "data": {
                "node-name": node, "snapshot-file": path, "snapshot-node-name": snap, "format": "qcow2"}})
        })
        .collect();

    let t0 = Instant::now();
    let frozen = agent.execute_raw("guest-fsfreeze-freeze", Value::Null, FREEZE_DEADLINE).await;
    let t1 = Instant::now();
    let snapped = match &frozen {
        Ok(_) => m.qmp().execute_raw("transaction", json!({ "actions": actions }), T).await.map(drop),
        Err(_) => Ok(()),
    };
    let t2 = Instant::now();
    // Thawed whatever happened above (a failed freeze may have frozen some filesystems).
    let thawed = agent.execute_raw("guest-fsfreeze-thaw", Value::Null, THAW_DEADLINE).await;
    let t3 = Instant::now();
    // The transaction is atomic: every overlay is on, or none; merge what is on.
    let merged = bare_merge(m, &overlays).await;
    let frozen = frozen.map_err(|e| bare("guest-fsfreeze-freeze", &e))?;
    snapped.map_err(|e| bare("transaction", &m.qmp_err(e)))?;
    thawed.map_err(|e| bare("guest-fsfreeze-thaw", &e))?;
    merged?;
    let ms = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1000.0;
    s.window.push(ms(t0, t3));
    s.freeze.push(ms(t0, t1));
    s.host.push(ms(t1, t2));
    s.thaw.push(ms(t2, t3));
    Ok(frozen.as_u64())
}

/// Commits each active bare overlay into the node under it (active commit, then pivot),
/// and removes the overlay files.
async fn bare_merge(m: &Machine, overlays: &[(String, String, PathBuf)]) -> Result<(), FreezeBenchError> {
    let q = |what: &str, e| FreezeBenchError::Bare(format!("{what}: {}", m.qmp_err(e)));
    let blocks = m.qmp().execute_raw("query-block", Value::Null, T).await.map_err(|e| q("query-block", e))?;
    let active: Vec<&str> = blocks
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[])
        .iter()
        .filter_map(|b| b["inserted"]["node-name"].as_str())
        .collect();
    for (node, snap, _) in overlays.iter().filter(|(_, snap, _)| active.contains(&snap.as_str())) {
        let job = format!("bare-commit-{node}");
        let _ = m.qmp().events().drain("BLOCK_JOB_READY");
        let _ = m.qmp().events().drain("BLOCK_JOB_COMPLETED");
        m.qmp()
            .execute_raw("block-commit", json!({"job-id": job, "device": snap, "base-node": node}), T)
            .await
            .map_err(|e| q("block-commit", e))?;
        let is_job = |d: &Value| d["device"] == job.as_str();
        m.qmp().wait_event("BLOCK_JOB_READY", is_job, COMMIT_DEADLINE).await.map_err(|e| q("commit ready", e))?;
        m.qmp().execute_raw("job-complete", json!({"id": job}), T).await.map_err(|e| q("job-complete", e))?;
        let done =
            m.qmp().wait_event("BLOCK_JOB_COMPLETED", is_job, COMMIT_DEADLINE).await.map_err(|e| q("pivot", e))?;
        if let Some(err) = done.data["error"].as_str() {
            return Err(FreezeBenchError::Bare(format!("merging {snap} into {node}: {err}")));
        }
    }
    // QEMU made these nodes itself; once pivoted away from, nothing holds them and they go.
    let nodes = m
        .qmp()
        .execute_raw("query-named-block-nodes", json!({"flat": true}), T)
        .await
        .map_err(|e| q("query-named-block-nodes", e))?;
    let left: Vec<&str> = nodes
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[])
        .iter()
        .filter_map(|n| n["node-name"].as_str())
        .filter(|n| overlays.iter().any(|(_, snap, _)| snap == n))
        .collect();
    if !left.is_empty() {
        return Err(FreezeBenchError::Bare(format!("overlay nodes still open after the merge: {left:?}")));
    }
    for (_, _, path) in overlays {
        if let Err(e) = std::fs::remove_file(path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                return Err(FreezeBenchError::Io { what: format!("remove {}", path.display()), source: e });
            }
        }
    }
    Ok(())
}

/// The mount script of [`workload::mount_disk`], for a guest reached through libvirt.
fn mount_script(serial: &str, fstype: &str) -> String {
    let mnt = format!("/mnt/{serial}");
    format!(
        "dev=; for b in /sys/block/vd*; do [ \"$(cat $b/serial 2>/dev/null)\" = '{serial}' ] && dev=/dev/${{b##*/}}; done; \
         [ -n \"$dev\" ] || {{ echo 'no disk with serial {serial}' >&2; exit 1; }}; \
         mkdir -p {mnt} && mount -t {fstype} $dev {mnt}"
    )
}

fn lv_io(what: &str) -> impl FnOnce(std::io::Error) -> LibvirtError + '_ {
    move |source| LibvirtError::Io { what: what.to_owned(), source }
}

/// The part of the daemon's log written since `offset`.
fn read_log_from(path: &Path, offset: u64) -> Result<String, LibvirtError> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).map_err(lv_io("open libvirtd's log"))?;
    f.seek(SeekFrom::Start(offset)).map_err(lv_io("read libvirtd's log"))?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf).map_err(lv_io("read libvirtd's log"))?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// A libvirt domain being measured.
#[derive(Debug)]
struct Domain {
    name: String,
    /// Its disks and files.
    dir: PathBuf,
    /// Each disk's target and image when it started; every run returns to these.
    chains: Vec<(String, PathBuf)>,
}

/// Boots the same guest under libvirt with `n` disks and mounts its data disks.
async fn domain_up(
    lv: &Libvirt,
    image: &GuestImage,
    accel: Accel,
    n: usize,
    progress: &mut dyn FnMut(&str),
) -> Result<Domain, LibvirtError> {
    let name = format!("quiesce-freeze-{}-{n}", std::process::id());
    let dir = lv.dir().join(format!("{n}-disks"));
    std::fs::create_dir(&dir).map_err(lv_io("make a folder for the domain's disks"))?;
    let overlay = dir.join("root.qcow2");
    qemu_img::create_overlay(&image.root, DiskFormat::Raw, &overlay)
        .map_err(|e| LibvirtError::Io { what: "create the root overlay".into(), source: std::io::Error::other(e) })?;
    let mut data_disks = Vec::new();
    for k in 1..n {
        let s = data_seed(k);
        let path = seed::create(&dir, &s)
            .map_err(|e| LibvirtError::Io { what: "create a data disk".into(), source: std::io::Error::other(e) })?;
        data_disks.push(DataDisk { serial: s.name, path, format: "qcow2".into() });
    }
    let qemu = crate::qemu::config::default_qemu_binary();
    let emulator =
        if qemu.starts_with('/') { PathBuf::from(&qemu) } else { libvirt::find_program(&qemu).unwrap_or(qemu.into()) };
    let serial_log = dir.join("serial.log");
    let spec = DomainSpec {
        name: name.clone(),
        kvm: accel == Accel::Kvm,
        emulator,
        memory_mib: MEMORY_MIB,
        cpus: 1,
        kernel: image.kernel.clone(),
        initrd: image.initrd.clone(),
        cmdline: image.cmdline.clone(),
        overlay,
        backing: image.root.clone(),
        backing_format: "raw".into(),
        data_disks: data_disks.clone(),
        serial_log: serial_log.clone(),
    };
    progress(&format!("{}: booting the same guest under libvirt ({name})", disks_label(n)));
    lv.create(&spec).await?;
    lv.wait_agent(&name, &serial_log, testguest::AGENT_DEADLINE).await?;
    for d in &data_disks {
        lv.guest_sh(&name, &mount_script(&d.serial, "ext4"), T).await?;
    }
    let chains = lv.disks(&name).await?;
    Ok(Domain { name, dir, chains })
}

/// One timed `virsh snapshot-create-as --disk-only --quiesce --atomic --no-metadata`, its
/// window read from the daemon's log; then every new overlay is merged into the image
/// under it and removed, so the next run starts from the same chains.
async fn libvirt_round(lv: &Libvirt, d: &Domain, i: usize, c: &mut LibvirtCase) -> Result<(), LibvirtError> {
    let name = &d.name;
    let offset = match lv.log_path() {
        Some(p) => std::fs::metadata(p).map_err(lv_io("read libvirtd's log"))?.len(),
        None => 0,
    };
    let t = Instant::now();
    lv.snapshot_disk_only(name, &format!("freeze{i}"), SNAPSHOT_DEADLINE).await?;
    let whole = t.elapsed().as_secs_f64() * 1000.0;
    let window = match lv.log_path() {
        Some(p) => Some(
            libvirt::freeze_window(&read_log_from(p, offset)?)
                .map_err(|what| LibvirtError::GuestExec { domain: name.clone(), what })?,
        ),
        None => None,
    };
    let on = lv.disks(name).await?;
    for (target, _) in &on {
        lv.commit_top(name, target, COMMIT_DEADLINE).await?;
    }
    let now = lv.disks(name).await?;
    if now != d.chains {
        return Err(LibvirtError::GuestExec {
            domain: name.clone(),
            what: format!("after blockcommit the disks are {now:?}, not {:?}", d.chains),
        });
    }
    for (_, top) in on.iter().filter(|(_, p)| p.starts_with(&d.dir) && !d.chains.iter().any(|(_, c)| c == p)) {
        std::fs::remove_file(top).map_err(lv_io("remove a merged libvirt overlay"))?;
    }
    let s = &mut c.series;
    s.whole.push(whole);
    if let Some(w) = window {
        s.window.push(w.window_ms());
        s.freeze.push(w.guest_freeze_ms());
        s.host.push(w.host_ms());
        s.thaw.push(w.thaw_ms());
        c.frozen = w.frozen.or(c.frozen);
    }
    Ok(())
}

fn ms_runs(xs: &[f64]) -> String {
    let v: Vec<String> = xs.iter().map(|x| format!("{x:.1}")).collect();
    format!("[{}]", v.join(" "))
}

fn disks_label(n: usize) -> String {
    if n == 1 {
        "1 disk (root)".to_owned()
    } else {
        format!("{n} disks (root + {} data)", n - 1)
    }
}

fn render(r: &Report) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(s, "quiesce bench freeze-window: {}, QEMU {}, {} runs each, medians", r.accel, r.qemu, r.rounds);
    let _ = writeln!(
        s,
        "guest: the test guest, {MEMORY_MIB} MiB, 1 vCPU; ext4 root on vda; data disks: {} MiB qcow2, ext4, \
         mounted at /mnt/dataN",
        DATA_DISK_BYTES >> 20
    );
    let _ = writeln!(s, "disk images and overlays in: {}", r.files);
    let _ = writeln!(s);
    let _ = writeln!(s, "raw numbers: median, then every run (ms)");
    let line = |s: &mut String, what: &str, xs: &[f64]| {
        if !xs.is_empty() {
            let _ = writeln!(s, "  {what:<60} {:>7.1}  {}", median(xs), ms_runs(xs));
        }
    };
    let parts = |s: &mut String, who: &str, x: &Series| {
        line(s, &format!("{who}: freeze window (freeze sent .. thaw returned)"), &x.window);
        line(s, &format!("{who}:   guest's freeze (freeze sent .. returned)"), &x.freeze);
        line(s, &format!("{who}:   host share (freeze returned .. thaw sent)"), &x.host);
        line(s, &format!("{who}:   thaw (sent .. returned)"), &x.thaw);
    };
    for c in &r.cases {
        let _ = writeln!(s, " {}", disks_label(c.disks));
        parts(&mut s, "ours", &c.ours);
        line(&mut s, "ours: PrepareForSnapshot (overlays, freeze, transaction, thaw)", &c.ours.whole);
        parts(&mut s, "bare", &c.bare);
        match &c.libvirt {
            LibvirtOutcome::Done(l) => {
                line(&mut s, "libvirt: virsh snapshot-create-as (whole command)", &l.series.whole);
                if l.series.window.is_empty() {
                    let _ =
                        writeln!(s, "  libvirt: freeze window: not measured (libvirtd was not started here, no log)");
                }
                parts(&mut s, "libvirt", &l.series);
            }
            LibvirtOutcome::Skipped => {
                let _ = writeln!(s, "  libvirt: skipped (--no-libvirt)");
            }
            LibvirtOutcome::Failed(why) => {
                let _ = writeln!(s, "  libvirt: not measured: {why}");
            }
        }
        let frozen = |f: Option<u64>| f.map_or("?".to_owned(), |n| n.to_string());
        let lv_frozen = match &c.libvirt {
            LibvirtOutcome::Done(l) => format!(", libvirt's {}", frozen(l.frozen)),
            _ => String::new(),
        };
        let _ = writeln!(s, "  filesystems frozen (the freeze's reply): our guest {}{lv_frozen}", frozen(c.frozen));
    }
    let _ = writeln!(s);
    let _ = writeln!(s, "ratios (medians)");
    let ratio = |s: &mut String, label: &str, what: String, x: f64, goal_text: Option<String>| {
        let what = format!("{label}: {what}");
        let _ = writeln!(s, "  {what:<62} {x:>6.3}{}", goal_text.map(|g| format!("  ({g})")).unwrap_or_default());
    };
    for c in &r.cases {
        let label = disks_label(c.disks);
        let (base, name) = match &c.libvirt {
            LibvirtOutcome::Done(l) if !l.series.window.is_empty() => (&l.series, "libvirt's"),
            _ => (&c.bare, "bare's"),
        };
        let host = median(&c.ours.host) / median(&base.host);
        let window = median(&c.ours.window) / median(&base.window);
        let host_goal = format!("goal <= {GOAL_HOST}: {}", goal(host <= GOAL_HOST));
        let window_goal = format!("goal < {GOAL_WINDOW}: {}", goal(window < GOAL_WINDOW));
        ratio(&mut s, &label, format!("our host share / {name} host share"), host, Some(host_goal));
        ratio(&mut s, &label, format!("our window / {name} window"), window, Some(window_goal));
    }
    if r.cases.iter().any(|c| matches!(c.libvirt, LibvirtOutcome::Done(_))) {
        let _ = writeln!(s, "  for reference:");
    }
    for c in &r.cases {
        let label = disks_label(c.disks);
        if let LibvirtOutcome::Done(l) = &c.libvirt {
            if !l.series.window.is_empty() {
                let host = median(&c.ours.host) / median(&c.bare.host);
                let window = median(&c.ours.window) / median(&c.bare.window);
                ratio(&mut s, &label, "our host share / bare's host share".into(), host, None);
                ratio(&mut s, &label, "our window / bare's window".into(), window, None);
            }
            let whole = median(&c.ours.whole) / median(&l.series.whole);
            ratio(&mut s, &label, "our PrepareForSnapshot / virsh's whole command".into(), whole, None);
        }
    }
    let _ = writeln!(s);
    let _ = writeln!(s, "notes:");
    let _ = writeln!(
        s,
        "  ours: overlays are made and added before the freeze; freeze; one transaction of blockdev-snapshot; \
         thaw.\n  bare: freeze; one transaction of blockdev-snapshot-sync (QEMU creates every overlay while the \
         guest is frozen); thaw;\n  on the same guest as ours. Both merge back with an active block-commit after \
         each run."
    );
    let lv_ran = r.libvirt_how.is_some();
    let _ = writeln!(
        s,
        "  Each round runs ours, bare{} back to back, in a rotating order{}.\n  Before the rounds, each guest \
         is frozen and thawed once, untimed (its first freeze after boot is slower).",
        if lv_ran { " and libvirt" } else { "" },
        if lv_ran { "; the guest not being measured sits idle" } else { "" },
    );
    if let Some(how) = &r.libvirt_how {
        let _ = writeln!(
            s,
            "  libvirt: window and its parts from libvirtd's log (millisecond stamps), where only qemu.qemu_agent \
             is at debug level\n  (a few lines per agent command; the monitor is not logged). After each run, every \
             disk's new overlay is merged into\n  the image under it with `virsh blockcommit --active --shallow --pivot` \
             and removed, so each run starts from the same chains.\n  The whole command includes starting virsh and \
             connecting.\n  libvirt guest: same kernel, initrd, cmdline, root.img (raw) under a qcow2 overlay, data \
             disks from the same seeds, RAM, vCPU,\n  virtio-blk serials and agent channel.\n  libvirt: {how}"
        );
    }
    if let Some(why) = &r.cleanup {
        let _ = writeln!(s, "  WARNING: libvirt's clean-up failed: {why}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(window: f64, host: f64) -> Series {
        Series {
            window: vec![window; 3],
            freeze: vec![window - host - 5.0; 3],
            host: vec![host; 3],
            thaw: vec![5.0; 3],
            whole: vec![window * 2.0; 3],
        }
    }

    fn report(libvirt: LibvirtOutcome) -> Report {
        Report {
            accel: "TCG".into(),
            qemu: "10.0.2".into(),
            rounds: 3,
            files: "/tmp/x (ext4 on /dev/vda at /)".into(),
            cases: vec![
                Case {
                    disks: 1,
                    ours: series(40.0, 2.0),
                    bare: series(60.0, 20.0),
                    frozen: Some(1),
                    libvirt: libvirt.clone(),
                },
                Case { disks: 4, ours: series(200.0, 30.0), bare: series(250.0, 80.0), frozen: Some(4), libvirt },
            ],
            libvirt_how: None,
            cleanup: None,
        }
    }

    #[test]
    fn report_prints_both_ratios_for_both_disk_counts_with_goals() {
        let l = LibvirtCase { series: series(100.0, 40.0), frozen: Some(1) };
        let text = render(&report(LibvirtOutcome::Done(l)));
        let flat = text.split_whitespace().collect::<Vec<_>>().join(" ");
        for want in [
            "1 disk (root): our host share / libvirt's host share 0.050 (goal <= 0.25: goal met)",
            "1 disk (root): our window / libvirt's window 0.400 (goal < 1: goal met)",
            "4 disks (root + 3 data): our host share / libvirt's host share 0.750 (goal <= 0.25: goal missed)",
            "4 disks (root + 3 data): our window / libvirt's window 2.000 (goal < 1: goal missed)",
            "1 disk (root): our host share / bare's host share 0.100",
            "our PrepareForSnapshot / virsh's whole command 0.400",
            "filesystems frozen (the freeze's reply): our guest 4, libvirt's 1",
        ] {
            assert!(flat.contains(want), "missing {want:?} in\n{text}");
        }
    }

    #[test]
    fn without_libvirt_the_goals_are_against_the_bare_baseline() {
        let text = render(&report(LibvirtOutcome::Failed("libvirt is not installed".into())));
        let flat = text.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(flat.contains("libvirt: not measured: libvirt is not installed"), "{text}");
        assert!(
            flat.contains("1 disk (root): our host share / bare's host share 0.100 (goal <= 0.25: goal met)"),
            "{text}"
        );
        assert!(
            flat.contains("4 disks (root + 3 data): our window / bare's window 0.800 (goal < 1: goal met)"),
            "{text}"
        );
        let text = render(&report(LibvirtOutcome::Skipped));
        assert!(text.contains("skipped (--no-libvirt)"), "{text}");
    }

    #[test]
    fn mount_script_finds_the_disk_by_serial() {
        let s = mount_script("data2", "ext4");
        assert!(s.contains("= 'data2' ]") && s.ends_with("mount -t ext4 $dev /mnt/data2"), "{s}");
    }
}
