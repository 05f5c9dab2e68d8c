//! What a scenario run produced: a plain value, written as JSON for people and tools, and
//! the source of the scenario's fixture.

use serde::Serialize;

use crate::backup::manifest::Timings;
use crate::timeline::Step;

#[derive(Debug, Clone, Serialize, Default)]
pub struct Report {
    pub scenario: String,
    pub description: String,
    pub passed: bool,
    /// Why the scenario was not run (a Windows VM and no Windows image): neither passed
    /// nor failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
    pub error: Option<String>,
    pub accel: String,
    pub qemu_version: String,
    pub vms: Vec<VmReport>,
    pub restores: Vec<RestoreReport>,
    pub checks: Vec<CheckResult>,
    /// Disks left out of the backup because the host cannot see them.
    pub excluded: Vec<crate::backup::passthrough::Excluded>,
    /// File manifests of restored disks, with their differences from the backup point.
    pub manifests: Vec<ManifestReport>,
    /// For a backup expected to fail: which VM failed in which phase.
    pub failure: Option<String>,
    /// Where the backup was kept, if it was.
    pub backup_path: Option<String>,
    pub steps: Vec<Step>,
    pub duration_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct VmReport {
    pub name: String,
    pub state_before: String,
    pub state_after_backup: Option<String>,
    pub method: Option<String>,
    pub method_reason: Option<String>,
    /// The six conditions as evaluated.
    pub conditions: Vec<(String, crate::backup::conditions::Outcome)>,
    pub disks: Vec<DiskReport>,
    /// The disks as the backup holds them (format as stored: qcow2, raw, vpc, vhdx).
    pub backup_disks: Vec<DiskReport>,
    pub timings: Option<Timings>,
    /// The journal workload read back from disk after the job.
    pub journal: Option<JournalReport>,
}

/// Journal lines: on disk just before the job (none when the guest could not be asked),
/// read back from disk afterwards, and how many of the former were missing.
#[derive(Debug, Clone, Serialize)]
pub struct JournalReport {
    pub before_job: Option<u64>,
    pub read_back: u64,
    pub lost: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct DiskReport {
    pub name: String,
    pub format: String,
    pub virtual_size: u64,
}

impl DiskReport {
    /// The disks of a VM as its backup holds them.
    pub fn of_backup(vb: &crate::backup::VmBackup) -> Vec<DiskReport> {
        vb.disks
            .iter()
            .map(|d| DiskReport {
                name: d.node_name.clone(),
                format: d.format.driver().into(),
                virtual_size: d.virtual_size,
            })
            .collect()
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct RestoreReport {
    pub vm: String,
    pub state_after_restore: String,
    pub restore_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ManifestReport {
    pub vm: String,
    pub disk: String,
    /// The backup point's manifest, one line per path, volatile paths left out.
    pub entries: Vec<String>,
    /// How the restored disk differs from it (`quiesce diff` lines); empty when it matches.
    pub differences: Vec<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CheckResult {
    pub vm: String,
    pub check: String,
    pub passed: bool,
    /// What was seen, for a person; may hold run-specific numbers.
    pub detail: String,
}

impl Report {
    pub fn check(&mut self, vm: &str, check: &str, passed: bool, detail: impl Into<String>) {
        self.checks.push(CheckResult { vm: vm.to_owned(), check: check.to_owned(), passed, detail: detail.into() });
    }

    pub fn vm_mut(&mut self, name: &str) -> Option<&mut VmReport> {
        self.vms.iter_mut().find(|v| v.name == name)
    }
}
