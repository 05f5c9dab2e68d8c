//! `quiesce run`: runs scenario files, shows progress, writes a JSON report per scenario,
//! the page (`index.html`) and, with `--junit`, the JUnit file, and prints a summary table.

use std::path::{Path, PathBuf};

use super::jobs::Event;
use super::progress::Progress;
use super::{CliResult, EXIT_FAILED, EXIT_INTERRUPTED};
use quiesce::qemu::accel::AccelChoice;
use quiesce::report::{self, summary, ScenarioReport, Status};
use quiesce::scenario::shard::{self, Shard};
use quiesce::scenario::{self, RunOptions};

/// Exit code for scenario files with mistakes (nothing was booted).
const EXIT_BAD_SCENARIO: i32 = 2;

pub async fn run(
    paths: Vec<PathBuf>,
    report_dir: PathBuf,
    keep_backups: bool,
    shard: Option<Shard>,
    junit: Option<PathBuf>,
    accel: Option<AccelChoice>,
    jobs: Option<usize>,
) -> CliResult {
    let mut files = Vec::new();
    for p in &paths {
        files.extend(scenario::discover(p).map_err(|e| format!("{}: {e}", p.display()))?);
    }
    if let Some(shard) = shard {
        let all = files.len();
        let stem = |p: &PathBuf| p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        files = shard::select(files, stem, shard, &shard::durations_beside(&paths)?);
        eprintln!("quiesce: shard {shard}: {} of {all} scenario file(s)", files.len());
        if files.is_empty() {
            return Ok(0);
        }
    }
    // Every file is checked before anything boots.
    let mut scenarios = Vec::new();
    let mut bad = 0;
    for f in &files {
        match scenario::load(f) {
            Ok(s) => scenarios.push(s),
            Err(e) => {
                eprintln!("quiesce: error: {e}");
                bad += 1;
            }
        }
    }
    if bad > 0 {
        eprintln!("quiesce: {bad} scenario file(s) have mistakes; nothing was run");
        return Ok(EXIT_BAD_SCENARIO);
    }
    if scenarios.is_empty() {
        eprintln!("quiesce: no scenario files found in {paths:?}");
        return Ok(EXIT_FAILED);
    }
    std::fs::create_dir_all(&report_dir).map_err(|e| format!("{}: {e}", report_dir.display()))?;
    // A quiesce killed mid-run (SIGKILL) could undo nothing: its run folders are cleaned here.
    for left in scenario::stale::sweep(&report_dir.join("work")) {
        eprintln!("quiesce: {left}");
    }
    // SIGINT and SIGTERM fire the run's interruption: a backup under way puts every VM back
    // (thawed, resumed, overlays merged) before the run stops.
    let (interrupt, signals) = super::interrupt_on_signals();
    let of = scenarios.len();
    // Never more workers than scenarios: a single scenario keeps the step-by-step progress
    // of `-j 1`, which only makes sense while one scenario runs.
    let jobs = jobs.unwrap_or_else(|| super::jobs::jobs_for(&scenarios)).clamp(1, of.max(1));
    if jobs > 1 {
        eprintln!("quiesce: {of} scenario(s), {jobs} at a time (-j)");
    }
    let scenarios = std::sync::Arc::new(scenarios);
    let options: std::sync::Arc<super::jobs::OptionsFor> = {
        let (report_dir, interrupt) = (report_dir.clone(), interrupt.clone());
        std::sync::Arc::new(move |s: &scenario::Scenario| RunOptions {
            accel,
            // Each scenario's failed machines leave their evidence in a folder of its own,
            // so that its report can point at exactly that.
            artifacts_dir: Some(report::artifacts_dir(&report_dir, &s.name)),
            work_dir: report_dir.join("work"),
            keep_backup: keep_backups,
            interrupt: Some(interrupt.clone()),
        })
    };
    let durations = shard::durations_beside(&paths)?;
    let mut events =
        super::jobs::start(std::sync::Arc::clone(&scenarios), &durations, jobs, options, interrupt.clone());
    // In file order, whatever order they finish in; None until a scenario has ended.
    let mut done: Vec<Option<ScenarioReport>> = vec![None; of];
    let mut lost = Vec::new();
    let mut p = Progress::new();
    let mut finished = 0;
    while let Some(event) = events.recv().await {
        match event {
            Event::Started { index } if jobs == 1 => p.begin(&scenarios[index].name, index + 1, of),
            Event::Started { index } => p.started(&scenarios[index].name, of),
            Event::Step { what, .. } if jobs == 1 => p.step(&what),
            Event::Step { .. } => {}
            Event::Lost { index, why } => {
                eprintln!("quiesce: error: scenario {}: {why}", scenarios[index].name);
                lost.push(scenarios[index].name.clone());
            }
            Event::Finished { index, report } => {
                let s = &scenarios[index];
                let path = report_dir.join(format!("{}.json", s.name));
                std::fs::write(&path, serde_json::to_vec_pretty(&report)?)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                let view = report::view(&report)?;
                let result = match view.status() {
                    Status::Passed => "passed",
                    Status::Failed => "FAILED",
                    Status::Skipped => "skipped",
                };
                finished += 1;
                if jobs == 1 {
                    p.end(result);
                } else {
                    p.finished(&s.name, finished, of, result, report.duration_ms / 1000.0);
                }
                done[index] = Some(view);
                // Written after every scenario, so that a run cut short still leaves both.
                let reports: Vec<ScenarioReport> = done.iter().flatten().cloned().collect();
                write_results(&report_dir, &reports, junit.as_deref())?;
            }
        }
    }
    let reports: Vec<ScenarioReport> = done.into_iter().flatten().collect();
    signals.abort();
    p.finish();
    print_summary(&report_dir, &reports);
    println!("report: {}", report_dir.join(report::INDEX).display());
    if let Some(j) = &junit {
        println!("JUnit: {}", j.display());
    }
    if !lost.is_empty() {
        eprintln!("quiesce: {} scenario(s) ended without a report (a bug): {}", lost.len(), lost.join(", "));
    }
    if interrupt.is_triggered() {
        eprintln!("quiesce: interrupted; every VM was put back before its machine was stopped (see the report)");
        return Ok(EXIT_INTERRUPTED);
    }
    // A skipped scenario (a Windows one with no Windows image) is neither passed nor failed.
    Ok(if lost.is_empty() && reports.iter().all(|r| r.status() != Status::Failed) { 0 } else { EXIT_FAILED })
}

/// The page and the JUnit file, from the reports so far.
fn write_results(
    report_dir: &Path,
    reports: &[ScenarioReport],
    junit: Option<&Path>,
) -> Result<(), report::ReportError> {
    let entries = report::entries(report_dir, reports.to_vec());
    report::write_html(report_dir, &entries)?;
    if let Some(j) = junit {
        report::write_junit(j, report_dir, &entries)?;
    }
    Ok(())
}

/// The table, what its downtime means, the counts, and for each failed scenario what failed
/// and where its evidence is.
pub fn print_summary(report_dir: &Path, reports: &[ScenarioReport]) {
    print!("{}", summary::table(&summary::rows(reports)));
    println!("{}", summary::DOWNTIME_NOTE);
    println!("\n{}", summary::counts(reports));
    for e in report::entries(report_dir, reports.to_vec()) {
        let r = &e.report;
        if let Some(why) = &r.skipped {
            println!("{} skipped: {why}", r.scenario);
        }
        let Some(first) = r.first_failure() else { continue };
        println!("\n{} failed: {}", r.scenario, first.headline());
        for line in first.detail().lines() {
            println!("  {line}");
        }
        for ev in &e.evidence {
            println!("  evidence: {}", report_dir.join(&ev.dir).display());
        }
        for c in r.checks.iter().filter(|c| !c.passed).skip(1) {
            println!("  check {} on {}: {}", c.check, c.vm, c.detail);
        }
        if let (Some(err), report::model::FirstFailure::Check(_)) = (&r.error, &first) {
            println!("  error: {err}");
        }
        // The file-level diff, as `quiesce diff` prints it, for each disk that drifted.
        for m in r.manifests.iter().filter(|m| !m.differences.is_empty()) {
            println!("  {}/{}: the restored disk differs from the backup point:", m.vm, m.disk);
            for line in &m.differences {
                println!("    {line}");
            }
        }
    }
}

/// `quiesce verify`: every file the manifest lists is re-hashed (a backup whose names lead
/// outside its folder is refused before anything is read), and files it does not list are
/// named as warnings. Exit 0 when every checksum matches, warnings or not.
pub async fn verify(path: PathBuf) -> CliResult {
    let backup = quiesce::backup::Backup::open(&path)?;
    let v = tokio::task::block_in_place(|| backup.check())?;
    for w in &v.warnings {
        eprintln!("quiesce: warning: {w}");
    }
    let vms = backup.manifest.vms.len();
    if v.mismatches.is_empty() {
        println!("{}: {vms} VMs, {} files, all checksums match", path.display(), v.checked);
        return Ok(0);
    }
    for m in &v.mismatches {
        println!("MISMATCH {}: expected sha256 {}, found {}", m.file.display(), m.expected, m.found);
    }
    println!("{}: {} of {} files differ from the manifest", path.display(), v.mismatches.len(), v.checked);
    Ok(EXIT_FAILED)
}
