//! What a VM's timeline shows, worked out from the steps of its report: the writer phases
//! of each backup job, the freeze window, the downtime, the copies, the restores, and every
//! step of the VM. Drawing it is `svg`'s business; this is the arithmetic, tested alone.
//!
//! The steps are found by the names the library records them under (the same names the
//! scenario fixtures list, which a test here checks, so a renamed step cannot quietly drop
//! out of the picture).

use super::model::{is_restore_of, ScenarioReport};
use crate::timeline::{Outcome, Step};

/// The writer phases of a backup job, in order (job-wide steps, with no VM).
pub const PHASES: [&str; 4] = ["PrepareForSnapshot", "Freeze", "Thaw", "PostSnapshot"];
/// Child VM Snapshot: the guest's filesystems are frozen from the start of this step...
const FREEZE: &str = "freeze";
/// ...until the end of this one (or of the undo's thaw, when the job failed in between).
const THAW: [&str; 2] = ["thaw", "undo: thaw and merge"];
/// Saved State: a running VM stops here...
const STOP: &str = "stop";
/// ...and runs again at the end of this (or of the undo's, when the job failed).
const RESUMED: [&str; 2] = ["return to prior state", "undo: return to prior state"];
/// The backup's bytes being written: RAM and device state, disks, frozen images.
const COPIES: [&str; 3] = ["save state (migrate to file)", "copy frozen images", LEGACY_CAPTURE];
/// Saved State's disk copy in reports written before issue 11, which `quiesce report` may
/// still be given; the library no longer records it.
const LEGACY_CAPTURE: &str = "capture disks";
/// The restore itself, on a machine of its own or onto the VM's own disks: until the
/// restored VM is there (what the guest does after that is the checks' business).
const RESTORE: [&str; 6] = [
    "load state (incoming migration)",
    "launch from the backup's disks",
    "launch restore target",
    "write the backup's disks back",
    "launch on its own disks",
    "resume",
];

/// A timeline's rows, top to bottom.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    Phases,
    FreezeWindow,
    Downtime,
    Copy,
    Restore,
    Steps,
}

impl Lane {
    pub const ALL: [Lane; 6] =
        [Lane::Phases, Lane::FreezeWindow, Lane::Downtime, Lane::Copy, Lane::Restore, Lane::Steps];

    /// Its name in the page: the row's label and its class.
    pub fn label(self) -> &'static str {
        match self {
            Lane::Phases => "writer phases",
            Lane::FreezeWindow => "freeze window",
            Lane::Downtime => "downtime",
            Lane::Copy => "copy",
            Lane::Restore => "restore",
            Lane::Steps => "all steps",
        }
    }

    pub fn class(self) -> &'static str {
        match self {
            Lane::Phases => "phases",
            Lane::FreezeWindow => "freeze-window",
            Lane::Downtime => "downtime",
            Lane::Copy => "copy",
            Lane::Restore => "restore",
            Lane::Steps => "steps",
        }
    }
}

/// What a bar stands for, which decides its colour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// One of the four writer phases (its index in [`PHASES`]).
    Phase(usize),
    FreezeWindow,
    /// Saved State: the VM stopped.
    Stopped,
    /// Child VM Snapshot: the freeze window, which is the downtime that matters there.
    FrozenDowntime,
    Copy,
    Restore,
    Step,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Bar {
    pub lane: Lane,
    pub kind: Kind,
    /// What it is ("freeze window", a step's name).
    pub name: String,
    pub start_ms: f64,
    pub end_ms: f64,
    /// How the step (or the one that ended the interval) ended.
    pub outcome: Outcome,
}

impl Bar {
    pub fn ms(&self) -> f64 {
        (self.end_ms - self.start_ms).max(0.0)
    }
}

/// One VM's timeline: its bars and the span the axis covers.
#[derive(Debug, Clone, PartialEq)]
pub struct VmTimeline {
    pub vm: String,
    pub from_ms: f64,
    pub to_ms: f64,
    pub bars: Vec<Bar>,
}

impl VmTimeline {
    pub fn lane(&self, lane: Lane) -> impl Iterator<Item = &Bar> {
        self.bars.iter().filter(move |b| b.lane == lane)
    }
}

/// The timeline of `vm` in `r`. The axis starts at the first writer phase (booting the
/// guest takes far longer than the backup and would squeeze it out of sight), or at the
/// VM's first step when no job began; it ends with the last bar.
pub fn of_vm(r: &ScenarioReport, vm: &str) -> VmTimeline {
    let own: Vec<&Step> = r.steps.iter().filter(|s| s.vm.as_deref() == Some(vm)).collect();
    let mut bars = Vec::new();
    for s in r.steps.iter().filter(|s| s.vm.is_none()) {
        if let Some(i) = PHASES.iter().position(|p| *p == s.name) {
            bars.push(bar(Lane::Phases, Kind::Phase(i), s.name.clone(), s, s));
        }
    }
    for (start, end) in intervals(&own, |s| s.name == FREEZE, |s| THAW.contains(&s.name.as_str())) {
        bars.push(bar(Lane::FreezeWindow, Kind::FreezeWindow, "freeze window".into(), start, end));
        bars.push(bar(Lane::Downtime, Kind::FrozenDowntime, "downtime: the freeze window".into(), start, end));
    }
    for (start, end) in intervals(&own, |s| s.name == STOP, |s| RESUMED.contains(&s.name.as_str())) {
        bars.push(bar(Lane::Downtime, Kind::Stopped, "downtime: the VM stopped".into(), start, end));
    }
    for s in &own {
        if COPIES.contains(&s.name.as_str()) {
            bars.push(bar(Lane::Copy, Kind::Copy, s.name.clone(), s, s));
        }
        if RESTORE.contains(&s.name.as_str()) {
            bars.push(bar(Lane::Restore, Kind::Restore, format!("in place: {}", s.name), s, s));
        }
        bars.push(bar(Lane::Steps, Kind::Step, s.name.clone(), s, s));
    }
    let restored =
        |s: &&Step| s.vm.as_deref().is_some_and(|m| is_restore_of(m, vm)) && RESTORE.contains(&s.name.as_str());
    for s in r.steps.iter().filter(restored) {
        let machine = s.vm.as_deref().unwrap_or_default();
        bars.push(bar(Lane::Restore, Kind::Restore, format!("{machine}: {}", s.name), s, s));
    }
    let first_phase = bars.iter().filter(|b| b.lane == Lane::Phases).map(|b| b.start_ms).reduce(f64::min);
    let from_ms = first_phase.or_else(|| own.first().map(|s| s.start_ms)).unwrap_or(0.0);
    // The axis ends with the last restore (or whatever the job got to): what the guests did
    // after that is checking, in the steps row only, and would squeeze the rest.
    let key = bars.iter().filter(|b| b.lane != Lane::Steps).map(|b| b.end_ms).reduce(f64::max);
    let to_ms = key.or_else(|| bars.iter().map(|b| b.end_ms).reduce(f64::max)).unwrap_or(from_ms).max(from_ms);
    bars.retain(|b| b.end_ms >= from_ms && b.start_ms <= to_ms);
    for b in &mut bars {
        b.start_ms = b.start_ms.max(from_ms);
        b.end_ms = b.end_ms.min(to_ms);
    }
    VmTimeline { vm: vm.to_owned(), from_ms, to_ms, bars }
}

fn bar(lane: Lane, kind: Kind, name: String, start: &Step, end: &Step) -> Bar {
    Bar { lane, kind, name, start_ms: start.start_ms, end_ms: end.end_ms, outcome: end.outcome.clone() }
}

/// Each interval from a step that `opens` to the next one that `closes`; an opening step
/// with no close (the job stopped there) is an interval of its own.
fn intervals<'a>(
    steps: &[&'a Step],
    opens: impl Fn(&Step) -> bool,
    closes: impl Fn(&Step) -> bool,
) -> Vec<(&'a Step, &'a Step)> {
    let mut out = Vec::new();
    let mut open: Option<&Step> = None;
    for s in steps {
        if opens(s) {
            if let Some(o) = open.take() {
                out.push((o, o));
            }
            open = Some(s);
        } else if closes(s) {
            if let Some(o) = open.take() {
                out.push((o, *s));
            }
        }
    }
    out.extend(open.map(|o| (o, o)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(vm: Option<&str>, name: &str, start_ms: f64, end_ms: f64) -> Step {
        Step { vm: vm.map(str::to_owned), name: name.into(), start_ms, end_ms, outcome: Outcome::Ok }
    }

    #[test]
    fn child_snapshot_freeze_window_is_its_downtime_and_boot_is_left_out() {
        let r = ScenarioReport {
            steps: vec![
                step(Some("vm1"), "boot and prepare", 0.0, 9000.0),
                step(Some("vm1"), "prepare overlays", 10_000.0, 10_100.0),
                step(Some("vm1"), "freeze", 10_100.0, 10_150.0),
                step(Some("vm1"), "snapshot all disks (transaction)", 10_150.0, 10_200.0),
                step(Some("vm1"), "thaw", 10_200.0, 10_260.0),
                step(None, "PrepareForSnapshot", 10_000.0, 10_270.0),
                step(None, "Freeze", 10_270.0, 10_270.0),
                step(None, "Thaw", 10_270.0, 10_270.0),
                step(Some("vm1"), "copy frozen images", 10_280.0, 11_000.0),
                step(None, "PostSnapshot", 10_275.0, 12_000.0),
                step(Some("vm1-restored"), "launch from the backup's disks", 13_000.0, 13_500.0),
                step(Some("vm10-restored"), "launch from the backup's disks", 13_000.0, 19_500.0),
                // The restored guest's checks come after the restore; the axis ends before.
                step(Some("vm1-restored"), "boot", 13_500.0, 30_000.0),
                step(Some("vm1"), "compare blocks with the backup", 13_000.0, 31_000.0),
            ],
            ..Default::default()
        };
        let t = of_vm(&r, "vm1");
        assert_eq!((t.from_ms, t.to_ms), (10_000.0, 13_500.0));
        let freeze: Vec<f64> = t.lane(Lane::FreezeWindow).map(Bar::ms).collect();
        assert_eq!(freeze, [160.0]);
        let down: Vec<(Kind, f64)> = t.lane(Lane::Downtime).map(|b| (b.kind, b.ms())).collect();
        assert_eq!(down, [(Kind::FrozenDowntime, 160.0)]);
        assert_eq!(t.lane(Lane::Phases).count(), 4);
        assert_eq!(t.lane(Lane::Copy).map(|b| b.name.as_str()).collect::<Vec<_>>(), ["copy frozen images"]);
        assert_eq!(t.lane(Lane::Restore).count(), 1, "vm10's restore is not vm1's");
        assert!(t.lane(Lane::Steps).all(|b| b.name != "boot and prepare"), "before the axis");
        let compare = t.lane(Lane::Steps).find(|b| b.name == "compare blocks with the backup").unwrap();
        assert_eq!((compare.start_ms, compare.end_ms), (13_000.0, 13_500.0), "cut at the axis end");
    }

    #[test]
    fn saved_state_downtime_runs_from_stop_to_return_and_a_failed_job_still_shows() {
        let r = ScenarioReport {
            steps: vec![
                step(Some("vm1"), "stop", 100.0, 110.0),
                step(Some("vm1"), "save state (migrate to file)", 110.0, 900.0),
                step(Some("vm1"), "copy frozen images", 950.0, 1200.0),
                step(Some("vm1"), "return to prior state", 1200.0, 1250.0),
                // A second job that failed after its freeze: no thaw, the undo thawed.
                step(Some("vm1"), "freeze", 2000.0, 2010.0),
                step(Some("vm1"), "undo: thaw and merge", 2500.0, 2600.0),
                step(Some("vm1"), "freeze", 3000.0, 3010.0),
            ],
            ..Default::default()
        };
        let t = of_vm(&r, "vm1");
        assert_eq!(t.from_ms, 100.0, "no phases: the axis starts with the VM's first step");
        let down: Vec<(Kind, f64)> = t.lane(Lane::Downtime).map(|b| (b.kind, b.ms())).collect();
        assert_eq!(down, [(Kind::FrozenDowntime, 600.0), (Kind::FrozenDowntime, 10.0), (Kind::Stopped, 1150.0)]);
        assert_eq!(t.lane(Lane::Copy).count(), 2);
    }

    /// The names this module looks for are the ones the library records: every one of them
    /// appears in the scenario fixtures, which list each scenario's steps.
    #[test]
    fn the_step_names_it_reads_are_the_ones_the_fixtures_list() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios/snapshots");
        let mut all = String::new();
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            all.push_str(&std::fs::read_to_string(e.path()).unwrap());
        }
        let listed = |name: &str| {
            all.lines().any(|l| {
                let item = l.trim_start().trim_start_matches("- ").trim_matches('"');
                item == name || item.strip_prefix(name).is_some_and(|t| t.starts_with(" ("))
            })
        };
        let names = PHASES
            .iter()
            .chain([FREEZE, STOP].iter())
            .chain(THAW.iter())
            .chain(RESUMED.iter())
            .chain(COPIES.iter().filter(|n| **n != LEGACY_CAPTURE))
            .chain(RESTORE.iter());
        for name in names {
            assert!(listed(name), "no scenario fixture lists a step {name:?}: was it renamed?");
        }
    }
}
