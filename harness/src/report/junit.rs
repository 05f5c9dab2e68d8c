//! `quiesce run --junit FILE`: one test case per scenario, for the CI system's test view.
//!
//! A failed scenario's message names the first failing check (or the run's error), the VM
//! and the evidence folder; its text adds every failed check, the differences found and
//! the JSON report. A skipped scenario is skipped, with its reason.

use std::path::Path;
use std::time::Duration;

use quick_junit::{NonSuccessKind, TestCase, TestCaseStatus, TestSuite};

use super::model::{FirstFailure, ScenarioReport, Status};
use super::text::cut;
use super::Entry;

/// The class name of every test case: CI systems group test cases by it.
pub const CLASSNAME: &str = "quiesce.scenarios";
/// A message is shown in one line of a CI page; the full story is in the text below it.
const MESSAGE_MAX: usize = 400;

/// The JUnit report of `entries`; paths in it are `report_dir`-based, as the run wrote them.
pub fn of(entries: &[Entry], report_dir: &Path) -> quick_junit::Report {
    let mut suite = TestSuite::new(CLASSNAME);
    let mut total = Duration::ZERO;
    for e in entries {
        let r = &e.report;
        let time = seconds(r.duration_ms);
        total += time;
        let status = match r.status() {
            Status::Passed => TestCaseStatus::success(),
            Status::Skipped => {
                let mut s = TestCaseStatus::skipped();
                s.set_message(r.skipped.clone().unwrap_or_default());
                s
            }
            Status::Failed => failed(e, report_dir),
        };
        let mut case = TestCase::new(r.scenario.as_str(), status);
        case.set_classname(CLASSNAME).set_time(time);
        suite.add_test_case(case);
    }
    suite.set_time(total);
    let mut report = quick_junit::Report::new("quiesce");
    report.set_time(total).add_test_suite(suite);
    report
}

fn failed(e: &Entry, report_dir: &Path) -> TestCaseStatus {
    let r = &e.report;
    let first = r.first_failure().unwrap_or(FirstFailure::Unexplained);
    let (kind, ty) = match first {
        FirstFailure::Check(_) => (NonSuccessKind::Failure, "check"),
        // A run that stopped with an error is a failure too: it did not prove its backup.
        FirstFailure::Error { .. } | FirstFailure::Unexplained => (NonSuccessKind::Failure, "error"),
    };
    let evidence: Vec<String> = e.evidence.iter().map(|ev| report_dir.join(&ev.dir).display().to_string()).collect();
    let evidence_text = if evidence.is_empty() {
        "none kept (no machine failed); the JSON report has the timeline".to_owned()
    } else {
        evidence.join(", ")
    };
    let json = report_dir.join(format!("{}.json", r.scenario)).display().to_string();
    let vm = vm_of(r);
    let message = format!(
        "{}: {}; VM: {vm}; evidence: {evidence_text}",
        first.headline(),
        cut(first.detail().lines().next().unwrap_or(""), MESSAGE_MAX),
    );
    let mut text =
        format!("{}\n{}\n\nVM: {vm}\nevidence: {evidence_text}\nreport: {json}\n", first.headline(), first.detail());
    for ev in &e.evidence {
        text.push_str(&format!("  {}: {}\n", ev.dir.display(), ev.why));
    }
    let failed: Vec<_> = r.checks.iter().filter(|c| !c.passed).collect();
    if !failed.is_empty() {
        text.push_str("\nfailed checks:\n");
        for c in failed {
            text.push_str(&format!("  {} on {}: {}\n", c.check, c.vm, c.detail));
        }
    }
    if let Some(err) = &r.error {
        text.push_str(&format!("\nerror: {err}\n"));
    }
    for m in r.manifests.iter().filter(|m| !m.differences.is_empty()) {
        text.push_str(&format!("\n{}/{}: the restored disk differs from the backup point:\n", m.vm, m.disk));
        for line in &m.differences {
            text.push_str(&format!("  {line}\n"));
        }
    }
    let mut s = TestCaseStatus::non_success(kind);
    s.set_message(message).set_type(ty).set_description(text);
    s
}

/// The VM a failed scenario's first failure concerns; for a check of the whole job, all of
/// the job's VMs.
pub fn vm_of(r: &ScenarioReport) -> String {
    match r.first_failure().as_ref().and_then(FirstFailure::vm) {
        Some(vm) => vm.to_owned(),
        None if r.vms.is_empty() => "none (no VM was booted)".into(),
        None => format!("the whole job ({})", r.vms.iter().map(|v| v.name.as_str()).collect::<Vec<_>>().join(", ")),
    }
}

/// A report's duration as a JUnit time (a negative or broken number counts as none).
fn seconds(ms: f64) -> Duration {
    Duration::try_from_secs_f64(ms / 1000.0).unwrap_or(Duration::ZERO)
}

#[cfg(test)]
mod tests {
    use super::super::{Entry, Evidence};
    use super::*;

    fn entry(json: &str, evidence: Vec<Evidence>) -> Entry {
        Entry { report: serde_json::from_str(json).unwrap(), evidence }
    }

    #[test]
    fn one_case_per_scenario_with_status_message_and_time() {
        let entries = [
            entry(r#"{"scenario":"ok","passed":true,"duration_ms":1500}"#, vec![]),
            entry(
                r#"{"scenario":"bad","passed":false,"duration_ms":2500,
                 "checks":[{"vm":"vm1","check":"blocks-match-backup","passed":false,"detail":"differ at byte 4096"}],
                 "manifests":[{"vm":"vm1","disk":"data","differences":["~ /ledger.txt content"]}]}"#,
                vec![Evidence { dir: "artifacts/bad/vm1-x1".into(), why: "QEMU exited".into() }],
            ),
            entry(r#"{"scenario":"win","passed":false,"skipped":"no Windows image in the cache"}"#, vec![]),
        ];
        let xml = of(&entries, Path::new("quiesce-reports")).to_string().unwrap();
        let back = quick_junit::Report::deserialize_from_str(&xml).unwrap();
        let cases = &back.test_suites[0].test_cases;
        assert_eq!(cases.len(), 3);
        assert_eq!(cases[0].classname.as_ref().map(|c| c.as_str()), Some(CLASSNAME));
        assert_eq!(cases[0].time, Some(Duration::from_millis(1500)));
        match &cases[1].status {
            TestCaseStatus::NonSuccess {
                kind: NonSuccessKind::Failure,
                message: Some(m),
                description: Some(d),
                ..
            } => {
                let m = m.as_str();
                assert!(m.starts_with("check blocks-match-backup failed on vm1: differ at byte 4096"), "{m}");
                assert!(m.contains("VM: vm1") && m.contains("evidence: quiesce-reports/artifacts/bad/vm1-x1"), "{m}");
                let d = d.as_str();
                assert!(d.contains("report: quiesce-reports/bad.json") && d.contains("~ /ledger.txt content"), "{d}");
            }
            other => panic!("{other:?}"),
        }
        match &cases[2].status {
            TestCaseStatus::Skipped { message: Some(m), .. } => assert_eq!(m.as_str(), "no Windows image in the cache"),
            other => panic!("{other:?}"),
        }
        assert_eq!((back.tests, back.failures, back.skipped), (3, 1, 1));
    }
}
