//! `quiesce-bench freeze-window`: how long a Child VM Snapshot keeps the guest frozen, with
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
//! 3. **libvirt**: the same guest under a libvirtd started by hand (see [`crate::libvirt`]):
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

mod libvirt;
mod report;
mod rounds;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

#[cfg(doc)]
use quiesce::backup::child_snapshot;
use quiesce::backup::child_snapshot::SnapshotSettings;
use quiesce::backup::job::{self, MethodChoice};
use quiesce::backup::BackupError;
use quiesce::image::recipe;
use quiesce::image::seed::{self, DiskSeed, Filesystem, Partitioning, SeedError};
use quiesce::qemu::exec::ExecError;
use quiesce::qemu::{Accel, DiskConfig, DiskFormat, MachineError};
use quiesce::testguest::{self, GuestError, GuestOptions};
use quiesce::timeline::{Outcome, Timeline};
use quiesce::workload;

use self::libvirt::{domain_up, libvirt_round};
use self::report::{disks_label, render};
use self::rounds::{bare_round, ours_round, warm_up};
use crate::libvirt::{Libvirt, StartOptions};
use crate::stats::filesystem_of;

#[derive(Debug, Clone)]
pub struct FreezeOptions {
    pub accel: Option<quiesce::qemu::accel::AccelChoice>,
    /// Runs of each measurement; the median is compared.
    pub rounds: usize,
    /// Run the libvirt comparison (needs libvirt installed; its daemon is started by hand).
    pub libvirt: bool,
}

pub const DEFAULT_ROUNDS: usize = 5;
/// Disks per guest: the root disk alone, then root and three data disks.
pub const DISK_COUNTS: [usize; 2] = [1, 4];
pub(super) const DATA_DISK_BYTES: u64 = 64 << 20;
pub(super) const MEMORY_MIB: u32 = 512;

/// Goals from the issue: our host share at most a quarter of libvirt's, our window below it.
pub(super) const GOAL_HOST: f64 = 0.25;
pub(super) const GOAL_WINDOW: f64 = 1.0;

/// libvirt's whole `snapshot-create-as --disk-only --quiesce` (freeze, one overlay per disk,
/// thaw): as long as the freeze and thaw it waits for, and a few QMP commands. (Every other
/// wait here is one of the library's `sys::deadline`s, as the Child VM Snapshot's own.)
pub(super) const SNAPSHOT_DEADLINE: Duration = Duration::from_secs(60);

/// What stops the freeze-window benchmark. Whatever stops it, every VM, libvirt domain and
/// daemon it started is stopped and its files are removed (guards, on every path).
#[derive(Debug, thiserror::Error)]
pub enum FreezeBenchError {
    /// A file or folder of the run (under the system temporary folder) could not be made
    /// or removed.
    #[error("could not {what}: {source}")]
    Io { what: String, source: std::io::Error },
    /// A data disk could not be made from its seed (mkfs.ext4, qemu-img).
    #[error("making a data disk: {0}")]
    Seed(#[from] SeedError),
    /// The test guest did not boot, or its image could not be built or found.
    #[error("booting the benchmark guest: {0}")]
    Guest(#[from] GuestError),
    /// The guest has no agent connection to freeze it with.
    #[error("the benchmark guest's agent: {0}")]
    Agent(MachineError),
    /// A data disk could not be mounted in the guest, so a freeze would not cover it.
    #[error("mounting a data disk in the guest: {0}")]
    Mount(ExecError),
    /// quiesce's Child VM Snapshot failed: the guest did not qualify, or a step of it
    /// failed (the error says which and what was undone).
    #[error(transparent)]
    Backup(#[from] BackupError),
    /// The Child VM Snapshot returned without the timing the benchmark compares: a bug in
    /// the backup code.
    #[error("the Child VM Snapshot did not report {0}")]
    NoTiming(&'static str),
    /// The backup's timeline lacks a freeze or thaw step: a bug in the backup code.
    #[error("the timeline of a Child VM Snapshot has no completed `{0}` step")]
    NoStep(&'static str),
    /// The Child VM Snapshot returned but still had overlays to merge: a bug, and the
    /// next round would measure a different chain.
    #[error("the Child VM Snapshot left something to undo after it returned")]
    NotClean,
    /// The bare baseline (freeze, transaction, thaw, merge) failed; the guest was thawed.
    #[error("bare freeze + transaction + thaw: {0}")]
    Bare(String),
    /// The untimed freeze and thaw before the rounds failed; the guest was thawed.
    #[error("the untimed freeze and thaw before the rounds: {0}")]
    WarmUp(String),
    /// The cached root image changed while the run used it as a backing file: something
    /// wrote to it. Rebuild it before trusting any guest run.
    #[error(
        "the cached guest image {path} changed during the run ({what}); rebuild it with `quiesce image build linux`"
    )]
    ImageChanged { path: PathBuf, what: String },
    /// Ctrl-C stopped the run.
    #[error("interrupted; every VM and daemon this run started has been stopped")]
    Interrupted,
}

pub(super) fn io(what: &str) -> impl FnOnce(std::io::Error) -> FreezeBenchError + '_ {
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
pub(super) struct Series {
    /// From sending the freeze until the thaw returned.
    pub(super) window: Vec<f64>,
    /// From sending the freeze until it returned: the guest's own freeze.
    pub(super) freeze: Vec<f64>,
    /// From the freeze returning until the thaw was sent.
    pub(super) host: Vec<f64>,
    /// From sending the thaw until it returned.
    pub(super) thaw: Vec<f64>,
    /// Ours: PrepareForSnapshot; libvirt: the whole virsh command. Empty for bare.
    pub(super) whole: Vec<f64>,
}

#[derive(Debug, Clone)]
pub(super) struct LibvirtCase {
    pub(super) series: Series,
    /// The freeze's reply (filesystems frozen), from the log.
    pub(super) frozen: Option<u64>,
}

#[derive(Debug, Clone)]
pub(super) enum LibvirtOutcome {
    Skipped,
    Failed(String),
    Done(LibvirtCase),
}

#[derive(Debug, Clone)]
pub(super) struct Case {
    pub(super) disks: usize,
    pub(super) ours: Series,
    pub(super) bare: Series,
    /// What the bare freeze replied on our guest (filesystems frozen).
    pub(super) frozen: Option<u64>,
    pub(super) libvirt: LibvirtOutcome,
}

pub(super) struct Report {
    pub(super) accel: String,
    pub(super) qemu: String,
    pub(super) rounds: usize,
    pub(super) files: String,
    pub(super) cases: Vec<Case>,
    /// How libvirt was reached, when it ran.
    pub(super) libvirt_how: Option<String>,
    /// What libvirt's clean-up could not do.
    pub(super) cleanup: Option<String>,
}

/// The seed of data disk `k` (1-based): the same on both sides.
pub(super) fn data_seed(k: usize) -> DiskSeed {
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
pub(super) enum LvState {
    Skipped,
    NotYet,
    Failed(String),
    Up(Libvirt),
}

/// How long a completed step of `tl` took, in milliseconds.
pub(super) fn step_ms(tl: &Timeline, name: &'static str) -> Result<f64, FreezeBenchError> {
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
        // Where KVM does not work, libvirt must not see /dev/kvm (see crate::libvirt).
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
