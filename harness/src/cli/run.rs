//! `quiesce run`: runs scenario files, shows progress, prints a summary table, and writes a
//! JSON report per scenario.

use std::path::PathBuf;

use super::progress::Progress;
use super::{CliResult, EXIT_FAILED, EXIT_INTERRUPTED};
use quiesce::interrupt::Interrupt;
use quiesce::qemu::accel::AccelChoice;
use quiesce::scenario::shard::{self, Shard};
use quiesce::scenario::{self, Report, RunOptions};

/// Exit code for scenario files with mistakes (nothing was booted).
const EXIT_BAD_SCENARIO: i32 = 2;

pub async fn run(
    paths: Vec<PathBuf>,
    report_dir: PathBuf,
    keep_backups: bool,
    shard: Option<Shard>,
    accel: Option<AccelChoice>,
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
    // SIGINT and SIGTERM fire the run's interruption: a backup under way puts every VM back
    // (thawed, resumed, overlays merged) before the run stops.
    let interrupt = Interrupt::new();
    let signals = {
        let interrupt = interrupt.clone();
        tokio::spawn(async move {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
            }
            interrupt.trigger();
        })
    };
    let opts = RunOptions {
        accel,
        artifacts_dir: Some(report_dir.join("artifacts")),
        work_dir: report_dir.join("work"),
        keep_backup: keep_backups,
        interrupt: Some(interrupt.clone()),
    };
    let mut reports = Vec::new();
    let mut p = Progress::new();
    for s in &scenarios {
        let report = scenario::run(s, &opts, &mut |m: &str| p.step(m)).await;
        let path = report_dir.join(format!("{}.json", s.name));
        std::fs::write(&path, serde_json::to_vec_pretty(&report)?).map_err(|e| format!("{}: {e}", path.display()))?;
        p.step(&format!("{}: {}", s.name, if report.passed { "passed" } else { "FAILED" }));
        reports.push(report);
        if interrupt.is_triggered() {
            break;
        }
    }
    signals.abort();
    p.finish();
    print_summary(&reports);
    println!("reports: {}", report_dir.display());
    if interrupt.is_triggered() {
        eprintln!("quiesce: interrupted; every VM was put back before its machine was stopped (see the report)");
        return Ok(EXIT_INTERRUPTED);
    }
    Ok(if reports.iter().all(|r| r.passed) { 0 } else { EXIT_FAILED })
}

fn ms(v: Option<f64>) -> String {
    v.map(|v| format!("{:.0} ms", v)).unwrap_or_else(|| "-".into())
}

fn print_summary(reports: &[Report]) {
    println!(
        "{:<36} {:<7} {:<15} {:>10} {:>10} {:>10} {:>8}",
        "SCENARIO", "RESULT", "METHOD", "DOWNTIME", "SAVE MB/s", "RESTORE", "TIME"
    );
    for r in reports {
        let vm = r.vms.first();
        let t = vm.and_then(|v| v.timings.as_ref());
        println!(
            "{:<36} {:<7} {:<15} {:>10} {:>10} {:>10} {:>7.1}s",
            r.scenario,
            if r.passed { "pass" } else { "FAIL" },
            vm.and_then(|v| v.method.as_deref()).unwrap_or("-"),
            ms(t.and_then(|t| t.downtime_ms)),
            t.and_then(|t| t.save_mb_per_s).map(|v| format!("{v:.0}")).unwrap_or_else(|| "-".into()),
            ms(r.restores.first().map(|x| x.restore_ms)),
            r.duration_ms / 1000.0
        );
    }
    for r in reports.iter().filter(|r| !r.passed) {
        println!("\n{} failed:", r.scenario);
        if let Some(e) = &r.error {
            println!("  error: {e}");
        }
        for c in r.checks.iter().filter(|c| !c.passed) {
            println!("  check {} on {}: {}", c.check, c.vm, c.detail);
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

pub async fn verify(path: PathBuf) -> CliResult {
    let backup = quiesce::backup::Backup::open(&path)?;
    let bad = tokio::task::block_in_place(|| backup.verify())?;
    let files: usize = backup.manifest.vms.iter().map(|v| v.disks.len() + usize::from(v.state.is_some())).sum();
    if bad.is_empty() {
        println!("{}: {} VMs, {files} files, all checksums match", path.display(), backup.manifest.vms.len());
        return Ok(0);
    }
    for m in &bad {
        println!("MISMATCH {}: expected sha256 {}, found {}", m.file.display(), m.expected, m.found);
    }
    println!("{}: {} of {files} files differ from the manifest", path.display(), bad.len());
    Ok(EXIT_FAILED)
}
