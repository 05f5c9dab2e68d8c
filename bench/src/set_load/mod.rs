//! `quiesce-bench set-load`: how far one backup set goes on this machine. Hyper-V backs up
//! every VM of a host in one job; this runs one job over 2, 4, 8 and 12 VMs of 256 MiB (by
//! default), mixed methods, each VM with a journal writer, and a fault in the last VM, and
//! measures the job's phases, the longest freeze window and the longest downtime against
//! the VM count.
//!
//! Each count is one scenario run (the same runner and checks as `quiesce run`), generated
//! by [`scenario_text`]:
//!
//! - VM `k` (from 1) runs the journal writer on an ext4 data disk. Odd `k` also has a vfat
//!   disk mounted, which fails the condition "every filesystem supports snapshots", so
//!   `auto` backs it up by **Saved State** while it runs (its downtime is real); even `k`
//!   goes by **Child VM Snapshot** (its freeze window is real). The last VM of an even count
//!   is a Child VM Snapshot one.
//! - **The fault**: the last VM's QEMU is SIGKILLed between PrepareForSnapshot and
//!   PostSnapshot (`qemu-killed-after-prepare`), as a VM that crashes mid-job. Every other VM
//!   finishes its PostSnapshot (copy-out, merge, resume), then the job drops the whole
//!   backup: it must end with **nothing**: no backup folder, every other VM thawed, on its
//!   own images with no overlay left, in its run state, its journal read back from disk
//!   with nothing lost; the killed one reported. Those are the runner's own checks, listed
//!   per count; a count **holds** when its run passed all of them.
//!
//! What is measured comes from the run's timeline: each job phase (the six conditions,
//! PrepareForSnapshot, PostSnapshot, the undo after the failure), the longest freeze
//! window (a Child VM Snapshot's freeze sent .. thaw returned) and the longest downtime (a
//! Saved State's stop .. the VM running again). Each is printed with its ratio against the
//! smallest set of the same run, like for like: same VMs, same machine, same minutes.
//! Nothing is asserted.
//!
//! Deadlines: every wait inside the run is one of the library's, each sized for a loaded
//! host; a deadline that fires fails the run with an error naming what it waited for, which
//! is printed. The run of one count as a whole has a deadline that grows with the count
//! ([`count_deadline`]); if it fires, the run is dropped (its guards stop every VM) and the
//! step it was in is printed as what it waited for.

mod report;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use quiesce::backup::conditions::Outcome as Condition;
use quiesce::qemu::accel::AccelChoice;
use quiesce::scenario::{self, Report as RunReport, RunOptions};
use quiesce::timeline::{Outcome, Step};

use crate::stats::loadavg;

pub use self::report::render;

/// The VM counts of the series, from the issue.
pub const DEFAULT_COUNTS: [usize; 4] = [2, 4, 8, 12];
/// RAM per VM, from the issue.
pub const DEFAULT_MEMORY_MIB: u32 = 256;
/// The largest count accepted: each VM is a QEMU process with its RAM, and its disks.
pub const MAX_COUNT: usize = 32;
/// The journal's ext4 disk and the Saved State VMs' vfat disk (as in the scenarios).
pub(crate) const DATA_DISK: &str = "32M";
pub(crate) const VFAT_DISK: &str = "40M";

/// The whole run of one count: booting each VM (the library allows 90 s for one to reach
/// its agent), the job, and the checks after it, with room for a host loaded by others.
/// Past it the run is stuck, not slow.
pub fn count_deadline(count: usize) -> Duration {
    Duration::from_secs(300 + 180 * count as u64)
}

#[derive(Debug, Clone)]
pub struct SetLoadOptions {
    pub accel: Option<AccelChoice>,
    /// The set sizes, run in this order.
    pub counts: Vec<usize>,
    pub memory_mib: u32,
    /// Folder for the runs' disks and backups; each run's own folder inside it is removed.
    pub work_dir: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum SetLoadError {
    /// A VM count is not one the benchmark can run.
    #[error("a set of {0} VMs: counts run from 1 to {MAX_COUNT}")]
    BadCount(usize),
    /// The generated scenario did not parse: a bug in the benchmark.
    #[error("the generated scenario for {count} VMs does not parse: {error}")]
    Scenario { count: usize, error: String },
    /// Ctrl-C stopped the run.
    #[error("interrupted; every VM this run started has been stopped")]
    Interrupted,
}

/// The scenario of a set of `count` VMs with `memory_mib` each (see the module's text).
pub fn scenario_text(count: usize, memory_mib: u32) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "description = \"set-load: {count} VMs of {memory_mib} MiB in one job, mixed methods, each with a journal \
         writer; the last VM's QEMU is killed between PrepareForSnapshot and PostSnapshot. The job must end with \
         no backup, every other VM put back, nothing lost.\"\n"
    );
    for k in 1..=count {
        let _ = writeln!(s, "[[vm]]\nname = \"{}\"\nmemory_mib = {memory_mib}", vm_name(k));
        let _ = writeln!(s, "workload = {{ journal = \"data\" }}\n");
        let _ = writeln!(
            s,
            "[[vm.disk]]\nname = \"data\"\nformat = \"qcow2\"\nsize = \"{DATA_DISK}\"\nfilesystem = \"ext4\"\n"
        );
        if saved_state(k) {
            let _ = writeln!(
                s,
                "[[vm.disk]]\nname = \"usb\"\nformat = \"qcow2\"\nsize = \"{VFAT_DISK}\"\nfilesystem = \"vfat\"\n"
            );
        }
    }
    let _ = writeln!(s, "[[fault]]\nvm = \"{}\"\nkind = \"qemu-killed-after-prepare\"\n", vm_name(count));
    let _ = writeln!(s, "[backup]\nmethod = \"auto\"\nexpect = \"failed\"");
    s
}

/// VM `k`'s name: sorted as numbers sort.
pub fn vm_name(k: usize) -> String {
    format!("vm{k:02}")
}

/// Whether VM `k` (from 1) is backed up by Saved State (its vfat disk rules out a Child VM
/// Snapshot).
pub fn saved_state(k: usize) -> bool {
    k % 2 == 1
}

/// What one count's run gave.
#[derive(Debug, Clone)]
pub struct CountRun {
    pub count: usize,
    /// The load average (1 min) before and after the run.
    pub load: (f64, f64),
    pub wall_s: f64,
    pub result: CountResult,
    /// Why a first attempt was run again: a VM failed to boot before the job began.
    pub retried: Option<String>,
}

#[derive(Debug, Clone)]
pub enum CountResult {
    /// The run ended; `measured` is read from its timeline, `failed_checks` names every
    /// check that did not pass, `error` what stopped the run (a deadline names its wait).
    /// `fell_back` names each VM planned for Child VM Snapshot that went by Saved State
    /// instead, with the condition that failed (under load, an agent too slow to answer).
    Ran {
        measured: Box<Measured>,
        failed_checks: Vec<String>,
        error: Option<String>,
        booted: usize,
        lost: u64,
        fell_back: Vec<String>,
    },
    /// The run's own deadline fired while it was in `step`.
    TimedOut { after: Duration, step: String },
}

impl CountRun {
    /// The set held: it ended all or nothing, every check passed, nothing lost.
    pub fn held(&self) -> bool {
        matches!(&self.result, CountResult::Ran { failed_checks, error: None, booted, lost: 0, .. }
            if failed_checks.is_empty() && *booted == self.count)
    }
}

/// Times read from a run's timeline, in milliseconds; `None` where the run never got there.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Measured {
    /// Booting every VM and starting its writer, one after another.
    pub boot: Option<f64>,
    /// The six conditions, VM after VM, before PrepareForSnapshot.
    pub conditions: Option<f64>,
    pub prepare: Option<f64>,
    pub post: Option<f64>,
    /// From the end of the last phase to the end of the last undo step.
    pub undo: Option<f64>,
    /// From the first condition checked to the last undo step: the whole job.
    pub job: Option<f64>,
    /// The longest freeze window and its VM, and how many were measured.
    pub freeze: Option<(f64, String)>,
    pub freezes: usize,
    /// The longest Saved State downtime and its VM, and how many were measured.
    pub downtime: Option<(f64, String)>,
    pub downtimes: usize,
}

fn vm_steps<'a>(steps: &'a [Step], vm: &'a str) -> impl Iterator<Item = &'a Step> {
    steps.iter().filter(move |s| s.vm.as_deref() == Some(vm))
}

fn span(first: Option<&Step>, last: Option<&Step>) -> Option<f64> {
    Some(last?.end_ms - first?.start_ms)
}

/// Reads the phase times, freeze windows and downtimes from a run's steps.
pub fn measure(steps: &[Step]) -> Measured {
    let job = |name: &str| steps.iter().find(|s| s.vm.is_none() && s.name == name);
    let boots: Vec<&Step> = steps.iter().filter(|s| s.name == "boot and prepare").collect();
    let conds: Vec<&Step> = steps.iter().filter(|s| s.name == "check the six conditions").collect();
    let prepare = job("PrepareForSnapshot");
    let post = job("PostSnapshot");
    let last_phase = post.or(prepare);
    let undos: Vec<&Step> = steps
        .iter()
        .filter(|s| s.vm.is_some() && s.name.starts_with("undo") && last_phase.is_some_and(|p| s.end_ms >= p.end_ms))
        .collect();
    let last_undo = undos.iter().copied().max_by(|a, b| a.end_ms.total_cmp(&b.end_ms));
    let mut m = Measured {
        boot: span(boots.first().copied(), boots.last().copied()),
        // Up to PrepareForSnapshot's start: the conditions and the run state, VM after VM.
        conditions: match (conds.first(), prepare) {
            (Some(c), Some(p)) => Some(p.start_ms - c.start_ms),
            (Some(c), None) => conds.last().map(|l| l.end_ms - c.start_ms),
            (None, _) => None,
        },
        prepare: prepare.map(|p| p.end_ms - p.start_ms),
        post: post.map(|p| p.end_ms - p.start_ms),
        undo: last_phase.zip(last_undo).map(|(p, u)| u.end_ms - p.end_ms),
        job: span(conds.first().copied(), last_undo.or(last_phase)),
        ..Default::default()
    };
    let mut vms: Vec<&str> = steps.iter().filter_map(|s| s.vm.as_deref()).collect();
    vms.sort();
    vms.dedup();
    for vm in vms {
        let ok = |s: &&Step| s.outcome == Outcome::Ok;
        let freeze = vm_steps(steps, vm).find(|s| s.name == "freeze");
        let thaw = vm_steps(steps, vm).filter(ok).find(|s| s.name == "thaw");
        if let (Some(f), Some(t)) = (freeze, thaw) {
            m.freezes += 1;
            let w = t.end_ms - f.start_ms;
            if m.freeze.as_ref().is_none_or(|(x, _)| w > *x) {
                m.freeze = Some((w, vm.to_owned()));
            }
        }
        let stop = vm_steps(steps, vm).filter(ok).find(|s| s.name == "stop");
        let back = vm_steps(steps, vm)
            .filter(ok)
            .find(|s| s.name == "return to prior state" || s.name == "undo: return to prior state");
        if let (Some(a), Some(b)) = (stop, back) {
            m.downtimes += 1;
            let d = b.end_ms - a.start_ms;
            if m.downtime.as_ref().is_none_or(|(x, _)| d > *x) {
                m.downtime = Some((d, vm.to_owned()));
            }
        }
    }
    m
}

/// What one run's report says of the set.
fn judge(r: &RunReport) -> CountResult {
    let failed_checks = r.checks.iter().filter(|c| !c.passed).map(|c| format!("{} {}: {}", c.vm, c.check, c.detail));
    let lost = r.vms.iter().filter_map(|v| v.journal.as_ref()).map(|j| j.lost).sum();
    CountResult::Ran {
        fell_back: fell_back(r),
        measured: Box::new(measure(&r.steps)),
        failed_checks: failed_checks.collect(),
        error: r.error.clone(),
        booted: r.steps.iter().filter(|s| s.name == "boot and prepare" && s.outcome == Outcome::Ok).count(),
        lost,
    }
}

/// The VMs planned for Child VM Snapshot whose conditions failed, each with the first
/// failed condition and its reason, so a run under load says why it measured fewer freeze
/// windows than planned.
fn fell_back(r: &RunReport) -> Vec<String> {
    r.vms
        .iter()
        .enumerate()
        .filter(|(i, _)| !saved_state(i + 1))
        .filter_map(|(_, v)| {
            let (name, _) = v.conditions.iter().find(|(_, o)| *o == Condition::Failed)?;
            let why = v.method_reason.as_deref().unwrap_or("no reason recorded");
            Some(format!("{}: {name} failed ({why})", v.name))
        })
        .collect()
}

/// Runs the series and returns the text to print. Ctrl-C stops it; the VMs of the run in
/// progress are stopped and its folder removed on the way out (guards, when it is dropped).
pub async fn run(opts: &SetLoadOptions, progress: &mut dyn FnMut(&str)) -> Result<String, Box<dyn std::error::Error>> {
    for &n in &opts.counts {
        if n == 0 || n > MAX_COUNT {
            return Err(SetLoadError::BadCount(n).into());
        }
    }
    let mut runs = Vec::new();
    let mut meta = (String::new(), String::new());
    for &n in &opts.counts {
        let text = scenario_text(n, opts.memory_mib);
        let name = format!("set-load-{n}");
        let s = scenario::parse(Path::new(&format!("{name}.toml")), &text)
            .map_err(|e| SetLoadError::Scenario { count: n, error: e.to_string() })?;
        let ro = RunOptions {
            accel: opts.accel,
            artifacts_dir: None,
            work_dir: opts.work_dir.clone(),
            keep_backup: false,
            interrupt: None,
        };
        let mut retried = None;
        loop {
            let load0 = loadavg();
            let t = Instant::now();
            // The step the run is in, for the deadline's message.
            let mut last = String::from("(starting)");
            let limit = count_deadline(n);
            let outcome = {
                let mut p = |s: &str| {
                    last = s.to_owned();
                    progress(&format!("{n} VMs: {s}"));
                };
                tokio::select! {
                    r = tokio::time::timeout(limit, scenario::run(&s, &ro, &mut p)) => r.ok(),
                    _ = tokio::signal::ctrl_c() => return Err(SetLoadError::Interrupted.into()),
                }
            };
            let result = match outcome {
                Some(r) => {
                    meta = (r.accel.to_uppercase(), r.qemu_version.clone());
                    judge(&r)
                }
                None => CountResult::TimedOut { after: limit, step: last },
            };
            let run =
                CountRun { count: n, load: (load0, loadavg()), wall_s: t.elapsed().as_secs_f64(), result, retried };
            // A VM that failed to boot (under TCG on a loaded host, an agent channel reset
            // now and then) is no verdict on the set: the count is run once more, and the
            // report says so and why. A second failure stands.
            match (&run.result, &run.retried) {
                (CountResult::Ran { booted, error: Some(e), .. }, None) if *booted < n => {
                    retried = Some(format!("{booted} of {n} booted: {}", e.replace('\n', " ")));
                }
                _ => {
                    runs.push(run);
                    break;
                }
            }
        }
    }
    let _ = std::fs::remove_dir(&opts.work_dir);
    Ok(render(&meta.0, &meta.1, opts.memory_mib, &runs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(vm: Option<&str>, name: &str, start: f64, end: f64) -> Step {
        Step { vm: vm.map(str::to_owned), name: name.into(), start_ms: start, end_ms: end, outcome: Outcome::Ok }
    }

    #[test]
    fn every_count_parses_with_mixed_methods_and_the_fault_on_the_last_vm() {
        for n in DEFAULT_COUNTS {
            let text = scenario_text(n, DEFAULT_MEMORY_MIB);
            let s = scenario::parse(Path::new("x.toml"), &text).unwrap_or_else(|e| panic!("{n}: {e}\n{text}"));
            assert_eq!(s.vms().count(), n);
            assert_eq!(text.matches("filesystem = \"vfat\"").count(), n.div_ceil(2), "{text}");
            assert!(text.contains(&format!("vm = \"{}\"\nkind = \"qemu-killed-after-prepare\"", vm_name(n))));
            assert!(!saved_state(n), "the last VM of an even set is a Child VM Snapshot");
        }
    }

    #[test]
    fn phases_freeze_windows_and_downtimes_from_the_steps() {
        let steps = vec![
            step(Some("vm01"), "boot and prepare", 0.0, 100.0),
            step(Some("vm02"), "boot and prepare", 100.0, 200.0),
            step(Some("vm01"), "check the six conditions", 200.0, 210.0),
            step(Some("vm02"), "check the six conditions", 210.0, 220.0),
            step(None, "PrepareForSnapshot", 230.0, 300.0),
            step(Some("vm01"), "stop", 231.0, 232.0),
            step(Some("vm02"), "freeze", 240.0, 250.0),
            step(Some("vm02"), "thaw", 260.0, 270.0),
            step(None, "PostSnapshot", 300.0, 400.0),
            step(Some("vm01"), "return to prior state", 350.0, 361.0),
            step(Some("vm02"), "undo: thaw and merge", 400.0, 450.0),
        ];
        let m = measure(&steps);
        assert_eq!(m.boot, Some(200.0));
        assert_eq!(m.conditions, Some(30.0));
        assert_eq!(m.prepare, Some(70.0));
        assert_eq!(m.post, Some(100.0));
        assert_eq!(m.undo, Some(50.0));
        assert_eq!(m.job, Some(250.0));
        assert_eq!(m.freeze, Some((30.0, "vm02".into())));
        assert_eq!(m.downtime, Some((130.0, "vm01".into())));
        assert_eq!((m.freezes, m.downtimes), (1, 1));
    }

    #[test]
    fn a_failed_thaw_is_no_freeze_window_and_the_deadline_grows_with_the_count() {
        let mut thaw = step(Some("vm02"), "thaw", 260.0, 270.0);
        thaw.outcome = Outcome::Failed { error: "timed out".into() };
        let m = measure(&[step(Some("vm02"), "freeze", 240.0, 250.0), thaw]);
        assert_eq!((m.freeze, m.freezes), (None, 0));
        assert!(count_deadline(12) > count_deadline(2));
    }
}
