//! The fixture of a scenario: the stable part of its report (steps taken, VM states before
//! and after, the method and why, the restored disks, the checks). Times, paths and
//! run-specific numbers are left out, so a fixture changes only when behaviour does.

use std::collections::BTreeMap;

use serde::Serialize;

use super::report::Report;

#[derive(Debug, Serialize, PartialEq)]
pub struct Fixture {
    pub scenario: String,
    pub passed: bool,
    pub error: Option<String>,
    /// Which VM failed in which phase, for a backup expected to fail.
    pub failure: Option<String>,
    pub vms: Vec<VmFixture>,
    /// Disks left out of the backup: "vm/disk kind (found by)".
    pub excluded: Vec<String>,
    /// Per VM, the steps in order, with their outcome when it was not ok.
    pub steps: BTreeMap<String, Vec<String>>,
    /// Per "vm/disk", the backup point's files (path, type, size, mode, content hash).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub manifests: BTreeMap<String, Vec<String>>,
    /// Per "vm/disk", how the restored disk differs from the backup point.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub differences: BTreeMap<String, Vec<String>>,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct VmFixture {
    pub name: String,
    pub state_before: String,
    pub state_after_backup: Option<String>,
    pub method: Option<String>,
    pub method_reason: Option<String>,
    pub conditions: BTreeMap<String, crate::backup::conditions::Outcome>,
    pub disks: Vec<String>,
    pub backup_disks: Vec<String>,
    pub state_after_restore: Option<String>,
    pub checks: BTreeMap<String, bool>,
    /// Journal lines written before the job and missing after it (the other counts depend
    /// on timing and stay in the JSON report).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub journal_lines_lost: Option<u64>,
}

pub fn of(report: &Report) -> Fixture {
    let vms = report
        .vms
        .iter()
        .map(|v| VmFixture {
            name: v.name.clone(),
            state_before: v.state_before.clone(),
            state_after_backup: v.state_after_backup.clone(),
            method: v.method.clone(),
            method_reason: v.method_reason.clone(),
            conditions: v.conditions.iter().cloned().collect(),
            disks: v.disks.iter().map(|d| format!("{} {} {}", d.name, d.format, d.virtual_size)).collect(),
            backup_disks: v
                .backup_disks
                .iter()
                .map(|d| format!("{} {} {}", d.name, d.format, d.virtual_size))
                .collect(),
            state_after_restore: report.restores.iter().find(|r| r.vm == v.name).map(|r| r.state_after_restore.clone()),
            checks: report
                .checks
                .iter()
                .filter(|c| c.vm == v.name || c.vm == "*")
                .map(|c| (c.check.clone(), c.passed))
                .collect(),
            journal_lines_lost: v.journal.as_ref().map(|j| j.lost),
        })
        .collect();
    let mut steps: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for s in &report.steps {
        let vm = s.vm.clone().unwrap_or_else(|| "(job)".into());
        let text = match &s.outcome {
            crate::timeline::Outcome::Ok => s.name.clone(),
            crate::timeline::Outcome::Failed { .. } => format!("{} (failed)", s.name),
            crate::timeline::Outcome::Interrupted => format!("{} (interrupted)", s.name),
        };
        steps.entry(vm).or_default().push(text);
    }
    let excluded = report
        .excluded
        .iter()
        .map(|e| format!("{}/{} {:?}: {} ({})", e.vm, e.disk, e.kind, e.advice, e.found_by))
        .collect();
    let key = |m: &super::report::ManifestReport| format!("{}/{}", m.vm, m.disk);
    let manifests = report.manifests.iter().map(|m| (key(m), m.entries.clone())).collect();
    let differences = report
        .manifests
        .iter()
        .filter(|m| !m.differences.is_empty())
        .map(|m| (key(m), m.differences.clone()))
        .collect();
    Fixture {
        scenario: report.scenario.clone(),
        passed: report.passed,
        error: report.error.clone(),
        failure: report.failure.clone(),
        vms,
        excluded,
        steps,
        manifests,
        differences,
    }
}
