//! What every part of a run shares: its options, the context value the parts are handed
//! (instead of long argument lists), the state of each scenario VM, and the deadlines.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::super::format::{Check, Filesystem, Scenario, VmSpec, VmState};
use super::super::report::Report;
use super::error::{io, At, Cause, RunError};
use crate::interrupt::Interrupt;
use crate::qemu::accel::AccelChoice;
use crate::qemu::caps::Capabilities;
use crate::testguest::TestGuest;
use crate::timeline::Timeline;

/// A scenario's workload showing progress: the counter moving on, the app committing a
/// transfer. Both move every few milliseconds while the guest runs. (Every other wait of a
/// run is one of `sys::deadline`'s.)
pub(super) const PROGRESS: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub accel: Option<AccelChoice>,
    pub artifacts_dir: Option<PathBuf>,
    /// Where disks and the backup are made while the scenario runs.
    pub work_dir: PathBuf,
    /// Keep the backup (in `work_dir`) instead of removing it at the end.
    pub keep_backup: bool,
    /// The run's interruption (the CLI fires it on SIGINT/SIGTERM).
    pub interrupt: Option<Interrupt>,
}

/// One run of one scenario, as every part of it sees it.
pub(super) struct RunCtx<'a> {
    pub s: &'a Scenario,
    pub opts: &'a RunOptions,
    pub tl: &'a Timeline,
    pub caps: &'a Capabilities,
    /// This run's own folder under `opts.work_dir` (removed when the run ends).
    pub work: &'a Path,
    pub report: &'a mut Report,
    pub progress: &'a mut dyn FnMut(&str),
}

impl RunCtx<'_> {
    /// Tells the person running it what the run is doing now.
    pub fn say(&mut self, what: &str) {
        (self.progress)(&format!("{}: {what}", self.s.name));
    }

    /// Whether the run's interruption (SIGINT, SIGTERM) has fired.
    pub fn interrupted(&self) -> bool {
        self.opts.interrupt.as_ref().is_some_and(|i| i.is_triggered())
    }

    /// Moves the backup at `path` to where `--keep-backups` keeps it, and reports where.
    pub fn keep_backup(&mut self, path: &Path, at: At) -> Result<(), RunError> {
        let kept = self.opts.work_dir.join(format!("{}-backup", self.s.name));
        // A backup kept by an earlier run of the same scenario gives way to this one.
        let _ = std::fs::remove_dir_all(&kept);
        std::fs::rename(path, &kept).map_err(io(at, &kept))?;
        self.report.backup_path = Some(kept.display().to_string());
        Ok(())
    }
}

/// Everything known about one VM of the scenario while it runs.
pub(super) struct Vm {
    pub spec: VmSpec,
    pub guest: TestGuest,
    /// The folder of its disks, and the default snapshot location.
    pub dir: PathBuf,
    pub boot_id: Option<String>,
    pub counter_before: Option<u64>,
    pub journal: Option<String>,
    /// Journal lines on disk just before the job: all must be there afterwards.
    pub journal_before: Option<u64>,
    pub app: Option<String>,
    /// Windows: the guest's UTC time when the app's writer (SQL Server) started; its
    /// freeze events are looked for from then on.
    pub app_since: Option<String>,
    /// Written to the root disk before the backup, for `root-from-backup`.
    pub root_token: Option<String>,
}

impl Vm {
    pub fn name(&self) -> &str {
        self.spec.name.get_ref()
    }

    /// Wraps a lower error with a step done to this VM: `.map_err(vm.fail("..."))`.
    pub fn fail<E: Cause>(&self, step: &'static str) -> impl FnOnce(E) -> RunError + '_ {
        move |e| e.at(At::vm(self.name(), step))
    }

    /// The names of its ext4 data disks.
    pub fn ext4_disks(&self) -> Vec<String> {
        self.spec
            .disks
            .iter()
            .map(|d| d.get_ref())
            .filter(|d| d.filesystem == Filesystem::Ext4)
            .map(|d| d.name.get_ref().clone())
            .collect()
    }

    /// Where its overlays go: the scenario's `snapshot_dir`, else beside its disks.
    pub fn snapshot_dir(&self, s: &Scenario) -> PathBuf {
        s.backup().snapshot_dir.as_ref().map(|d| PathBuf::from(d.get_ref())).unwrap_or_else(|| self.dir.clone())
    }
}

/// Records how `check` went on VM `vm`: under its own name, or, when a fault of the
/// scenario is there to make it fail, as "CHECK catches FAULT", passed when it failed.
pub(super) fn verdict(s: &Scenario, report: &mut Report, vm: &str, check: Check, ok: bool, detail: impl Into<String>) {
    match s.defeated_by(vm, check) {
        Some(fault) => report.check(vm, &format!("{} catches {}", check.name(), fault.name()), !ok, detail),
        None => report.check(vm, check.name(), ok, detail),
    }
}

/// A run state as reports and fixtures show it.
pub(super) fn label(s: VmState) -> &'static str {
    match s {
        VmState::Running => "running",
        VmState::Paused => "paused",
    }
}

/// Where a restore's guest finds the token written before the backup.
pub(super) const ROOT_TOKEN: &str = "/root/quiesce-root-token";
