//! The saved-state benchmark's series of downtime against the data on the disks: for each
//! size (64 MiB, 1 GiB, 4 GiB of pseudo-random data on a raw data disk, beside the root
//! disk), a guest with filled RAM is backed up, in the same run, by
//!
//! 1. quiesce's Saved State (overlays in one transaction while the VM is stopped, the VM
//!    back, then the copy hashed as it is written, its proof and the merge);
//! 2. the method quiesce used before (`copy_while_stopped`: copy and verify while stopped);
//! 3. libvirt's user path to the same result: `virsh save`, copy the disks (`cp`, then
//!    `sync` on the copies, so it is durable as ours is), `virsh restore`. Its guest is down
//!    from the save to the end of the restore.
//!
//! Nothing is asserted: the goals are printed as met or missed.

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use quiesce::backup::saved_state::SaveSettings;
use quiesce::backup::{job, BackupWriter};
use quiesce::image::{qemu_img, GuestImage};
use quiesce::qemu::caps::Capabilities;
use quiesce::qemu::exec;
use quiesce::qemu::{Accel, DiskConfig, DiskFormat};
use quiesce::sys::{deadline, Tool};
use quiesce::testguest::{self, GuestOptions};
use quiesce::timeline::Timeline;

use super::{settle, step_secs, BenchError, BenchOptions, SAVE_STEP, VM};
use crate::dd;
use crate::fill;
use crate::libvirt::{DataDisk, DomainSpec, Libvirt, LibvirtError};
use crate::rng::XorShift;
use crate::stats::{goal, median};

/// The data sizes of the series, MiB, unless given.
pub const DEFAULT_DATA_MIB: [u64; 3] = [64, 1024, 4096];

/// Goals from issue 11.
const GOAL_FLAT: f64 = 1.2;
const GOAL_VS_SAVE: f64 = 1.3;
const GOAL_VS_LIBVIRT: f64 = 0.2;
const GOAL_VS_DD: f64 = 0.8;

/// One backup, timed.
#[derive(Debug, Clone, Default)]
pub(super) struct Round {
    pub(super) downtime: f64,
    pub(super) save: f64,
    /// From the call to the committed (durable) backup.
    pub(super) whole: f64,
    /// Bytes the backup folder occupies.
    pub(super) bytes: u64,
    /// The steps inside the downtime (from the stop to the VM running again), seconds each:
    /// what the downtime is made of.
    pub(super) window: Vec<(String, f64)>,
    /// The whole backup, step by step (top-level steps of the timeline, and the commit that
    /// makes it durable): where the time beyond the downtime goes.
    pub(super) phases: Vec<(String, f64)>,
}

/// The steps of `tl` that do not overlap an earlier one (nested steps are left out, so the
/// lengths add up), with the gaps between them, then `commit` seconds for the folder's
/// commit: the whole backup, step by step.
fn whole_steps(tl: &Timeline, commit: f64) -> Vec<(String, f64)> {
    let mut out = Vec::new();
    let mut steps = tl.steps();
    // A step is recorded when it ends, so an enclosing step comes after what it encloses:
    // by start, the longer first, each step comes before those inside it.
    steps.sort_by(|a, b| a.start_ms.total_cmp(&b.start_ms).then(b.end_ms.total_cmp(&a.end_ms)));
    let mut at = 0.0;
    for s in steps {
        if s.start_ms < at {
            continue;
        }
        if s.start_ms - at >= 1.0 {
            out.push(("(between steps)".to_owned(), (s.start_ms - at) / 1000.0));
        }
        at = s.end_ms;
        out.push((s.name.clone(), (s.end_ms - s.start_ms) / 1000.0));
    }
    out.push(("commit (sync and rename)".to_owned(), commit));
    out
}

/// The steps of `tl` from the last `stop` to the end of the `return to prior state` after
/// it, with their lengths, and the time between steps where there is any: the VM's
/// downtime, step by step.
fn window_steps(tl: &Timeline) -> Vec<(String, f64)> {
    let steps = tl.steps();
    let Some(from) = steps.iter().rposition(|s| s.name == "stop") else { return vec![] };
    let mut out = Vec::new();
    let mut at = steps[from].start_ms;
    for s in &steps[from..] {
        if s.start_ms - at >= 1.0 {
            out.push(("(between steps)".to_owned(), (s.start_ms - at) / 1000.0));
        }
        at = s.end_ms;
        out.push((s.name.clone(), (s.end_ms - s.start_ms) / 1000.0));
        if s.name == "return to prior state" {
            break;
        }
    }
    out
}

/// One point of the series.
pub(super) struct Point {
    pub(super) data_mib: u64,
    pub(super) ours: Vec<Round>,
    pub(super) before: Vec<Round>,
    /// libvirt's downtime (save, copy, restore), per round, or why it is missing.
    pub(super) libvirt: Result<Vec<f64>, String>,
    /// dd conv=fsync of as many bytes as our backup, seconds.
    pub(super) dd: f64,
    pub(super) dd_bytes: u64,
    /// `cp` of the data disk (its cache dropped first, as the backup finds it) and `sync`
    /// of the copy, seconds: reading and writing the disk's data and nothing else, where dd
    /// only writes. None if it could not be measured.
    pub(super) cp: Option<f64>,
}

/// Writes a raw disk of `data_mib` MiB of pseudo-random data and 64 MiB of zeros after it,
/// made durable, so that the first backup does not pay for its writing.
fn make_data_disk(path: &Path, data_mib: u64) -> Result<(), BenchError> {
    let err = |source| BenchError::Stat { path: path.to_owned(), source };
    let mut f = std::io::BufWriter::with_capacity(4 << 20, std::fs::File::create(path).map_err(err)?);
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15 ^ data_mib);
    let mut block = vec![0u8; 1 << 20];
    for _ in 0..data_mib {
        for c in block.chunks_exact_mut(8) {
            c.copy_from_slice(&rng.next_u64().to_le_bytes());
        }
        f.write_all(&block).map_err(err)?;
    }
    let f = f.into_inner().map_err(|e| err(e.into_error()))?;
    f.set_len((data_mib + 64) << 20).map_err(err)?;
    f.sync_all().map_err(err)
}

/// Bytes the files below `dir` occupy.
fn occupied(dir: &Path) -> u64 {
    let mut n = 0;
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        match e.metadata() {
            Ok(md) if md.is_dir() => n += occupied(&e.path()),
            Ok(md) => n += md.blocks() * 512,
            Err(_) => {}
        }
    }
    n
}

/// One Saved State backup of `m` into `path`, timed and then removed.
async fn one_backup(
    m: &quiesce::qemu::Machine,
    caps: &Capabilities,
    settings: &SaveSettings,
    path: &Path,
    round: usize,
) -> Result<Round, BenchError> {
    let tl = Timeline::new();
    settle().await;
    let t = Instant::now();
    let mut w = BackupWriter::create(path, &caps.version)?;
    let vm = job::saved_state(m, caps, settings, "benchmark", &mut w, &tl).await?;
    let c = Instant::now();
    let backup = w.commit()?;
    let commit = c.elapsed().as_secs_f64();
    let whole = t.elapsed().as_secs_f64();
    let save = step_secs(&tl, SAVE_STEP).ok_or(BenchError::NoStep { round, step: SAVE_STEP })?;
    let r = Round {
        downtime: vm.timings.downtime_ms.unwrap_or(f64::NAN) / 1000.0,
        save,
        whole,
        bytes: occupied(&backup.path),
        window: window_steps(&tl),
        phases: whole_steps(&tl, commit),
    };
    super::remove_dir(&backup.path)?;
    Ok(r)
}

/// Boots the guest with the data disk at `data`, fills its RAM, and backs it up `rounds`
/// times by each of our two methods, alternating.
async fn ours(
    opts: &BenchOptions,
    caps: &Capabilities,
    data: &Path,
    rd: &Path,
    rounds: usize,
    progress: &mut dyn FnMut(&str),
) -> Result<(Vec<Round>, Vec<Round>), BenchError> {
    let mut gopts = GuestOptions::named(VM);
    gopts.accel = opts.accel;
    gopts.memory_mib = opts.memory_mib;
    gopts.disk_dir = Some(rd.to_owned());
    gopts.extra_disks =
        vec![DiskConfig { node_name: "data".into(), path: data.to_owned(), format: DiskFormat::Raw, read_only: false }];
    let guest = testguest::boot(gopts, progress).await?;
    let m = &guest.machine;
    let agent = m.agent().map_err(BenchError::Agent)?;
    progress("filling the guest's RAM");
    let script = fill::script(fill::target_mib(opts.memory_mib), fill::headroom_mib(opts.memory_mib));
    let out = exec::sh(agent, &script, fill::FILL_DEADLINE).await?;
    fill::parse_filled(&out).ok_or_else(|| BenchError::FillOutput(out.clone()))?;
    let mut settings = SaveSettings { overlay_dir: Some(rd.to_owned()), ..SaveSettings::default() };
    let (mut now, mut before) = (Vec::new(), Vec::new());
    for i in 0..rounds {
        progress(&format!("ours, round {}/{rounds}", i + 1));
        settings.copy_while_stopped = false;
        now.push(one_backup(m, caps, &settings, &rd.join("series-backup"), i + 1).await?);
        progress(&format!("ours before issue 11 (copy while stopped), round {}/{rounds}", i + 1));
        settings.copy_while_stopped = true;
        before.push(one_backup(m, caps, &settings, &rd.join("series-backup"), i + 1).await?);
    }
    Ok((now, before))
}

/// One point of libvirt's side of the series.
struct LibvirtPoint<'a> {
    lv: &'a Libvirt,
    image: &'a GuestImage,
    accel: Accel,
    memory_mib: u32,
    data: &'a Path,
    rounds: usize,
    timeout: Duration,
}

/// libvirt's path: `virsh save`, `cp` of every disk and `sync` of the copies, `virsh
/// restore`; the guest is down for all three. Returns that time per round.
async fn libvirt_rounds(p: &LibvirtPoint<'_>, progress: &mut dyn FnMut(&str)) -> Result<Vec<f64>, LibvirtError> {
    let LibvirtPoint { lv, image, accel, memory_mib, data, rounds, timeout } = *p;
    let io = |what: &str| {
        let what = what.to_owned();
        move |source| LibvirtError::Io { what, source }
    };
    let name = format!("quiesce-series-{}", std::process::id());
    let dir = lv.dir().join("series");
    std::fs::create_dir_all(&dir).map_err(io("make the series folder"))?;
    let overlay = dir.join("root.qcow2");
    qemu_img::create_overlay(&image.root, DiskFormat::Raw, &overlay)
        .map_err(|e| LibvirtError::Io { what: "create the root overlay".into(), source: std::io::Error::other(e) })?;
    let qemu = quiesce::qemu::config::default_qemu_binary();
    let emulator = if qemu.starts_with('/') {
        PathBuf::from(&qemu)
    } else {
        crate::libvirt::find_program(&qemu).unwrap_or(qemu.into())
    };
    let serial_log = dir.join("serial.log");
    let spec = DomainSpec {
        name: name.clone(),
        kvm: accel == Accel::Kvm,
        emulator,
        memory_mib,
        cpus: 1,
        kernel: image.kernel.clone(),
        initrd: image.initrd.clone(),
        cmdline: image.cmdline.clone(),
        overlay: overlay.clone(),
        backing: image.root.clone(),
        backing_format: "raw".into(),
        data_disks: vec![DataDisk { serial: "data".into(), path: data.to_owned(), format: "raw".into() }],
        serial_log: serial_log.clone(),
    };
    progress(&format!("booting the same guest under libvirt ({name})"));
    lv.create(&spec).await?;
    let result = async {
        lv.wait_agent(&name, &serial_log, deadline::BOOT_TO_AGENT).await?;
        progress("filling the libvirt guest's RAM");
        lv.guest_sh(
            &name,
            &fill::script(fill::target_mib(memory_mib), fill::headroom_mib(memory_mib)),
            fill::FILL_DEADLINE,
        )
        .await?;
        let mut down = Vec::new();
        for i in 0..rounds {
            progress(&format!("libvirt: virsh save, cp, virsh restore, round {}/{rounds}", i + 1));
            let copies = dir.join("copies");
            std::fs::create_dir_all(&copies).map_err(io("make the copies folder"))?;
            let state = copies.join("state.save");
            settle().await;
            let t = Instant::now();
            lv.save(&name, &state, timeout).await?;
            let (root_copy, data_copy) = (copies.join("root.qcow2"), copies.join("data.raw"));
            for (from, to) in [(&overlay, &root_copy), (&data.to_owned(), &data_copy)] {
                Tool::new("cp", timeout)
                    .args(["--sparse=always".as_ref(), from.as_os_str(), to.as_os_str()])
                    .run_async()
                    .await
                    .map_err(|e| LibvirtError::Io { what: "cp a disk".into(), source: std::io::Error::other(e) })?;
            }
            Tool::new("sync", timeout)
                .args([root_copy.as_os_str(), data_copy.as_os_str()])
                .run_async()
                .await
                .map_err(|e| LibvirtError::Io { what: "sync the copies".into(), source: std::io::Error::other(e) })?;
            lv.restore(&name, &state, timeout).await?;
            down.push(t.elapsed().as_secs_f64());
            std::fs::remove_dir_all(&copies).map_err(io("remove the copies"))?;
        }
        Ok(down)
    }
    .await;
    let destroyed = lv.destroy(&name).await;
    let _ = std::fs::remove_dir_all(&dir);
    let down = result?;
    destroyed?;
    Ok(down)
}

/// Runs the series; `lv` is the libvirt daemon, if libvirt is compared.
pub(super) async fn run(
    opts: &BenchOptions,
    caps: &Capabilities,
    image: &GuestImage,
    accel: Accel,
    lv: Option<&Libvirt>,
    rd: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<Point>, BenchError> {
    let timeout = Duration::from_secs(600 + opts.data_mib.iter().max().copied().unwrap_or(0) / 8);
    let mut points = Vec::new();
    for &data_mib in &opts.data_mib {
        // In libvirt's own folder, so its QEMU may open it whatever user it runs as.
        let folder = lv.map_or(rd, |l| l.dir());
        let data = folder.join("series-data.raw");
        progress(&format!("writing {data_mib} MiB of data on the data disk"));
        tokio::task::block_in_place(|| make_data_disk(&data, data_mib))?;
        let (ours, before) = ours(opts, caps, &data, rd, opts.series_rounds, progress).await?;
        let libvirt = match lv {
            Some(lv) => {
                let p = LibvirtPoint {
                    lv,
                    image,
                    accel,
                    memory_mib: opts.memory_mib,
                    data: &data,
                    rounds: opts.series_rounds,
                    timeout,
                };
                libvirt_rounds(&p, progress).await.map_err(|e| e.to_string())
            }
            None => Err("skipped (--no-libvirt)".into()),
        };
        progress("cp and sync of the data disk, uncached");
        settle().await;
        let cp = plain_copy(&data, &rd.join("cp.raw"), timeout).await;
        std::fs::remove_file(&data).map_err(|source| BenchError::Stat { path: data.clone(), source })?;
        let dd_mib = median(&ours.iter().map(|r| r.bytes as f64).collect::<Vec<_>>()) as u64 >> 20;
        progress(&format!("dd conv=fsync of {dd_mib} MiB"));
        settle().await;
        let dd = dd::write(&rd.join("dd.bin"), dd_mib.max(1), true, timeout).await?;
        points.push(Point { data_mib, ours, before, libvirt, dd: dd.secs, dd_bytes: dd.bytes, cp });
    }
    Ok(points)
}

/// Seconds to `cp --sparse=always` `data` to `to` (the source's cache dropped first) and
/// `sync` the copy, which is then removed; None if either failed.
async fn plain_copy(data: &Path, to: &Path, timeout: Duration) -> Option<f64> {
    let f = std::fs::File::open(data).ok()?;
    f.sync_all().ok()?;
    nix::fcntl::posix_fadvise(
        std::os::fd::AsRawFd::as_raw_fd(&f),
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    )
    .ok()?;
    let t = Instant::now();
    let cp =
        Tool::new("cp", timeout).args(["--sparse=always".as_ref(), data.as_os_str(), to.as_os_str()]).run_async().await;
    let synced = match cp {
        Ok(_) => Tool::new("sync", timeout).arg(to).run_async().await.ok(),
        Err(_) => None,
    };
    let secs = t.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(to);
    synced.map(|_| secs)
}

fn med(rs: &[Round], f: impl Fn(&Round) -> f64) -> f64 {
    median(&rs.iter().map(f).collect::<Vec<_>>())
}

/// The series' table and its goals.
pub(super) fn render(points: &[Point], memory_mib: u32, rounds: usize) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "downtime against the data on the disks ({memory_mib} MiB guest, RAM filled; data disk raw, \
         pseudo-random data; {rounds} round(s) each, medians, seconds)"
    );
    let _ = writeln!(
        s,
        "  {:>9}  {:>8} {:>8} {:>8} {:>9}  {:>12}  {:>9}  {:>9} {:>9}",
        "data", "downtime", "save", "whole", "MB/s", "before: down", "libvirt", "dd fsync", "MB/s"
    );
    for p in points {
        let (down, save, whole) = (med(&p.ours, |r| r.downtime), med(&p.ours, |r| r.save), med(&p.ours, |r| r.whole));
        let bytes = med(&p.ours, |r| r.bytes as f64);
        let lv = p.libvirt.as_ref().map(|l| format!("{:.3}", median(l))).unwrap_or_else(|_| "-".into());
        let _ = writeln!(
            s,
            "  {:>5} MiB  {down:>8.3} {save:>8.3} {whole:>8.3} {:>9.0}  {:>12.3}  {lv:>9}  {:>9.3} {:>9.0}",
            p.data_mib,
            bytes / 1e6 / whole,
            med(&p.before, |r| r.downtime),
            p.dd,
            p.dd_bytes as f64 / 1e6 / p.dd
        );
    }
    let _ = writeln!(
        s,
        "  downtime: stop to running again; save: the `{SAVE_STEP}` step; whole: the backup, durable, with its \
         proof; MB/s: the backup's bytes / whole"
    );
    let _ = writeln!(s, "  before: the method before issue 11 (disks copied and verified while the VM is stopped)");
    for p in points {
        if let Some(r) = p.ours.first() {
            let parts: Vec<String> = r.window.iter().map(|(n, secs)| format!("{n} {secs:.3}")).collect();
            let _ = writeln!(s, "  downtime @{} MiB, first round, step by step: {}", p.data_mib, parts.join(", "));
        }
    }
    for p in points {
        if let Some(r) = p.ours.first() {
            let parts: Vec<String> = r.phases.iter().map(|(n, secs)| format!("{n} {secs:.3}")).collect();
            let _ = writeln!(s, "  whole @{} MiB, first round, step by step: {}", p.data_mib, parts.join(", "));
        }
    }
    let _ = writeln!(
        s,
        "  libvirt: virsh save + cp of the disks + sync of the copies + virsh restore (the guest's downtime)"
    );
    for p in points {
        if let Err(why) = &p.libvirt {
            let _ = writeln!(s, "  libvirt at {} MiB: not measured: {why}", p.data_mib);
        }
    }
    let _ = writeln!(s);
    let _ = writeln!(s, "goals");
    let (Some(first), Some(last)) = (points.first(), points.last()) else { return s };
    let flat = med(&last.ours, |r| r.downtime) / med(&first.ours, |r| r.downtime);
    let _ = writeln!(
        s,
        "  downtime @{} MiB / @{} MiB                 {flat:>6.2}x   (goal <= {GOAL_FLAT}x: {})",
        last.data_mib,
        first.data_mib,
        goal(flat <= GOAL_FLAT)
    );
    for p in points {
        let r = med(&p.ours, |r| r.downtime) / med(&p.ours, |r| r.save);
        let _ = writeln!(
            s,
            "  @{:>5} MiB: downtime / save step          {r:>6.2}x   (goal <= {GOAL_VS_SAVE}x: {})",
            p.data_mib,
            goal(r <= GOAL_VS_SAVE)
        );
    }
    match &last.libvirt {
        Ok(l) => {
            let r = med(&last.ours, |r| r.downtime) / median(l);
            let _ = writeln!(
                s,
                "  @{:>5} MiB: downtime / libvirt's          {r:>6.3}    (goal <= {GOAL_VS_LIBVIRT}: {})",
                last.data_mib,
                goal(r <= GOAL_VS_LIBVIRT)
            );
        }
        Err(why) => {
            let _ = writeln!(s, "  @{:>5} MiB: downtime / libvirt's: not measured: {why}", last.data_mib);
        }
    }
    for p in points {
        let ours = med(&p.ours, |r| r.bytes as f64) / med(&p.ours, |r| r.whole);
        let dd = p.dd_bytes as f64 / p.dd;
        let r = ours / dd;
        let _ = writeln!(
            s,
            "  @{:>5} MiB: whole backup MB/s / dd fsync's {r:>6.2}x   (goal >= {GOAL_VS_DD}x: {})",
            p.data_mib,
            goal(r >= GOAL_VS_DD)
        );
    }
    for p in points {
        let data = (p.data_mib << 20) as f64 / 1e6;
        let cp = p.cp.map_or("not measured".to_owned(), |cp| format!("{cp:.3} s, {:.0} MB/s of data", data / cp));
        let _ = writeln!(
            s,
            "  for reference, @{:>5} MiB: cp + sync of the data disk alone (source uncached, read and written): {cp}",
            p.data_mib
        );
    }
    for p in points {
        let r = med(&p.ours, |r| r.downtime) / med(&p.before, |r| r.downtime);
        let _ = writeln!(s, "  for reference, @{:>5} MiB: downtime / before issue 11's  {r:>6.3}", p.data_mib);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round(downtime: f64, save: f64) -> Round {
        Round {
            downtime,
            save,
            whole: 2.0,
            bytes: 2_000_000_000,
            window: vec![("stop".into(), 0.01)],
            phases: vec![("copy frozen images".into(), 1.0)],
        }
    }

    #[test]
    fn series_goals_are_printed_met_or_missed() {
        let p = |data_mib, down, lv: Result<Vec<f64>, String>| Point {
            data_mib,
            ours: vec![round(down, 0.5)],
            before: vec![round(down * 10.0, 0.5)],
            libvirt: lv,
            dd: 1.0,
            dd_bytes: 1_000_000_000,
            cp: None,
        };
        let text = render(&[p(64, 0.6, Ok(vec![2.0])), p(4096, 0.7, Ok(vec![10.0]))], 1024, 1);
        let flat = text.split_whitespace().collect::<Vec<_>>().join(" ");
        for want in [
            "downtime @4096 MiB / @64 MiB 1.17x (goal <= 1.2x: goal met)",
            "@ 64 MiB: downtime / save step 1.20x (goal <= 1.3x: goal met)",
            "@ 4096 MiB: downtime / save step 1.40x (goal <= 1.3x: goal missed)",
            "@ 4096 MiB: downtime / libvirt's 0.070 (goal <= 0.2: goal met)",
            "@ 4096 MiB: whole backup MB/s / dd fsync's 1.00x (goal >= 0.8x: goal met)",
            "downtime @4096 MiB, first round, step by step: stop 0.010",
            "whole @4096 MiB, first round, step by step: copy frozen images 1.000",
        ] {
            assert!(flat.contains(want), "missing {want:?} in\n{text}");
        }
        let text = render(&[p(64, 0.6, Err("skipped (--no-libvirt)".into()))], 1024, 1);
        assert!(text.contains("downtime / libvirt's: not measured: skipped (--no-libvirt)"), "{text}");
    }
}
