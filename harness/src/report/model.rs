//! A scenario's JSON report as the report pages read it: only what they show, every field
//! defaulted. The pages are made from the JSON (not from the in-memory value), so `quiesce
//! report DIR` rebuilds exactly what `quiesce run` wrote, and a report written by another
//! version of quiesce, with fields more or fewer, still renders.

use serde::{Deserialize, Deserializer};

use crate::backup::conditions::Outcome as ConditionOutcome;
use crate::backup::manifest::Timings;
use crate::backup::Method;
use crate::timeline::{Outcome, Step};

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct ScenarioReport {
    pub scenario: String,
    pub description: String,
    pub passed: bool,
    /// Why the scenario was not run; such a scenario is neither passed nor failed.
    pub skipped: Option<String>,
    pub error: Option<String>,
    /// For a backup expected to fail: which VM failed in which phase.
    pub failure: Option<String>,
    pub accel: String,
    pub qemu_version: String,
    pub vms: Vec<Vm>,
    pub restores: Vec<Restore>,
    pub checks: Vec<Check>,
    pub manifests: Vec<Manifest>,
    pub excluded: Vec<Excluded>,
    pub backup_path: Option<String>,
    pub steps: Vec<Step>,
    pub duration_ms: f64,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Vm {
    pub name: String,
    pub state_before: String,
    pub state_after_backup: Option<String>,
    /// The methods its backups used, in order: one for a backup job, one per cycle for
    /// rollback cycles (the JSON holds them as one comma-separated text).
    #[serde(rename = "method", deserialize_with = "methods")]
    pub methods: Vec<Method>,
    pub method_reason: Option<String>,
    /// The six conditions as evaluated, in order.
    pub conditions: Vec<(String, ConditionOutcome)>,
    pub timings: Option<Timings>,
    pub journal: Option<Journal>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Journal {
    pub before_job: Option<u64>,
    pub read_back: u64,
    pub lost: u64,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Restore {
    pub vm: String,
    pub state_after_restore: String,
    pub restore_ms: f64,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Check {
    pub vm: String,
    pub check: String,
    pub passed: bool,
    pub detail: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Manifest {
    pub vm: String,
    pub disk: String,
    /// `quiesce diff` lines; empty when the restored disk matches the backup point.
    pub differences: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Excluded {
    pub vm: String,
    pub disk: String,
    pub found_by: String,
    pub advice: String,
}

/// `"child-snapshot, saved-state"` (or null) as the methods it names.
fn methods<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Method>, D::Error> {
    let text: Option<String> = Option::deserialize(d)?;
    text.iter()
        .flat_map(|t| t.split(','))
        .map(str::trim)
        .filter(|m| !m.is_empty())
        .map(|m| Method::deserialize(serde::de::value::StrDeserializer::<D::Error>::new(m)))
        .collect()
}

/// How a scenario ended, for people and for CI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Passed,
    Failed,
    /// Not run (the reason is in the report); neither passed nor failed.
    Skipped,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Passed => "passed",
            Status::Failed => "failed",
            Status::Skipped => "skipped",
        }
    }
}

/// The first thing that went wrong in a failed scenario.
#[derive(Debug, Clone, PartialEq)]
pub enum FirstFailure<'a> {
    /// A check that did not pass (checks are recorded in the order they ran).
    Check(&'a Check),
    /// The run stopped with an error; `vm` is the VM of the first step that failed.
    Error { error: &'a str, vm: Option<&'a str> },
    /// The report says it did not pass and names nothing (an older or cut-short report).
    Unexplained,
}

impl FirstFailure<'_> {
    /// The VM it concerns, if one ("*" checks concern the whole job).
    pub fn vm(&self) -> Option<&str> {
        match self {
            FirstFailure::Check(c) if c.vm != "*" => Some(&c.vm),
            FirstFailure::Error { vm, .. } => *vm,
            _ => None,
        }
    }

    /// One line: what failed, where.
    pub fn headline(&self) -> String {
        match self {
            FirstFailure::Check(c) if c.vm == "*" => format!("check {} failed", c.check),
            FirstFailure::Check(c) => format!("check {} failed on {}", c.check, c.vm),
            FirstFailure::Error { vm: Some(vm), .. } => format!("the run stopped with an error on {vm}"),
            FirstFailure::Error { vm: None, .. } => "the run stopped with an error".into(),
            FirstFailure::Unexplained => "the scenario did not pass (the report names no check or error)".into(),
        }
    }

    /// What was seen: the check's detail or the error.
    pub fn detail(&self) -> &str {
        match self {
            FirstFailure::Check(c) => &c.detail,
            FirstFailure::Error { error, .. } => error,
            FirstFailure::Unexplained => "",
        }
    }
}

impl ScenarioReport {
    pub fn status(&self) -> Status {
        match (&self.skipped, self.passed) {
            (Some(_), _) => Status::Skipped,
            (None, true) => Status::Passed,
            (None, false) => Status::Failed,
        }
    }

    /// The first failed check, else the run's error; none for a scenario that did not fail.
    pub fn first_failure(&self) -> Option<FirstFailure<'_>> {
        if self.status() != Status::Failed {
            return None;
        }
        if let Some(c) = self.checks.iter().find(|c| !c.passed) {
            return Some(FirstFailure::Check(c));
        }
        match &self.error {
            Some(error) => {
                let vm = self
                    .steps
                    .iter()
                    .find(|s| s.outcome != Outcome::Ok && s.vm.is_some())
                    .and_then(|s| s.vm.as_deref());
                Some(FirstFailure::Error { error, vm })
            }
            None => Some(FirstFailure::Unexplained),
        }
    }

    /// The restores of `vm`: to a new VM (`vm-restored`, `vm-restored-N`) and in place.
    pub fn restores_of<'a>(&'a self, vm: &'a str) -> impl Iterator<Item = &'a Restore> + 'a {
        self.restores.iter().filter(move |r| {
            r.vm == vm || is_restore_of(&r.vm, vm) || r.vm.strip_prefix(vm).is_some_and(|t| t.starts_with(" (in place"))
        })
    }
}

/// Whether `machine` is a VM restored from `vm`'s backup (`vm-restored`, `vm-restored-3`).
pub fn is_restore_of(machine: &str, vm: &str) -> bool {
    machine.strip_prefix(vm).and_then(|t| t.strip_prefix("-restored")).is_some_and(|t| {
        t.is_empty() || t.strip_prefix('-').is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> ScenarioReport {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn methods_of_a_rollback_are_read_as_a_list() {
        let r = parse(r#"{"vms":[{"name":"vm1","method":"child-snapshot, saved-state, child-snapshot"}]}"#);
        assert_eq!(r.vms[0].methods, [Method::ChildSnapshot, Method::SavedState, Method::ChildSnapshot]);
        let r = parse(r#"{"vms":[{"name":"vm1","method":null}]}"#);
        assert!(r.vms[0].methods.is_empty());
        assert!(serde_json::from_str::<ScenarioReport>(r#"{"vms":[{"method":"teleport"}]}"#).is_err());
    }

    #[test]
    fn status_and_first_failure() {
        let skipped = parse(r#"{"scenario":"w","passed":false,"skipped":"no Windows image"}"#);
        assert_eq!((skipped.status(), skipped.first_failure()), (Status::Skipped, None));
        let failed = parse(
            r#"{"passed":false,"error":"boom","checks":[
                {"vm":"vm1","check":"a","passed":true,"detail":""},
                {"vm":"vm2","check":"b","passed":false,"detail":"differs at byte 7"}]}"#,
        );
        let first = failed.first_failure().unwrap();
        assert_eq!((first.vm(), first.detail()), (Some("vm2"), "differs at byte 7"));
        assert_eq!(first.headline(), "check b failed on vm2");
        let errored = parse(
            r#"{"passed":false,"error":"QEMU exited","steps":[
                {"vm":"vm1","name":"boot","start_ms":0,"end_ms":1,"outcome":"ok"},
                {"vm":"vm2","name":"boot","start_ms":0,"end_ms":2,"outcome":{"failed":{"error":"QEMU exited"}}}]}"#,
        );
        assert_eq!(errored.first_failure(), Some(FirstFailure::Error { error: "QEMU exited", vm: Some("vm2") }));
        assert_eq!(parse(r#"{"passed":false}"#).first_failure(), Some(FirstFailure::Unexplained));
        assert_eq!(parse(r#"{"passed":true}"#).first_failure(), None);
    }

    #[test]
    fn restores_are_matched_to_their_vm() {
        assert!(is_restore_of("vm1-restored", "vm1"));
        assert!(is_restore_of("vm1-restored-12", "vm1"));
        assert!(!is_restore_of("vm1-restored-", "vm1"));
        assert!(!is_restore_of("vm10-restored", "vm1"));
        assert!(!is_restore_of("vm1-restoredx", "vm1"));
        let r = parse(
            r#"{"restores":[{"vm":"vm1-restored-1"},{"vm":"vm1 (in place, cycle 1)"},{"vm":"vm10-restored"},{"vm":"vm1"}]}"#,
        );
        assert_eq!(r.restores_of("vm1").count(), 3);
    }
}
