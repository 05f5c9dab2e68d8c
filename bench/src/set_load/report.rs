//! The set-load benchmark's report: per VM count, whether the set held, its phases, its
//! longest freeze window and downtime, the ratios against the smallest set of the same
//! run, and what failed where a count did not hold.

use std::fmt::Write;

use super::{CountResult, CountRun, Measured, DATA_DISK, VFAT_DISK};

fn secs(x: Option<f64>) -> String {
    x.map_or_else(|| "-".to_owned(), |ms| format!("{:.1}", ms / 1000.0))
}

fn worst(x: &Option<(f64, String)>) -> String {
    x.as_ref().map_or_else(|| "-".to_owned(), |(ms, vm)| format!("{:.2} ({vm})", ms / 1000.0))
}

fn ratio(x: Option<f64>, base: Option<f64>) -> String {
    match (x, base) {
        (Some(x), Some(b)) if b > 0.0 => format!("{:.2}x", x / b),
        _ => "-".to_owned(),
    }
}

fn measured(r: &CountRun) -> Option<&Measured> {
    match &r.result {
        CountResult::Ran { measured, .. } => Some(measured),
        CountResult::TimedOut { .. } => None,
    }
}

pub fn render(accel: &str, qemu: &str, memory_mib: u32, runs: &[CountRun]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "quiesce-bench set-load: {accel}, QEMU {qemu}, {} CPUs on the host", cpus());
    let _ = writeln!(
        s,
        "one job per count: VMs of {memory_mib} MiB, 1 vCPU, each with a journal writer on a {DATA_DISK} ext4 disk; \
         odd VMs also mount a {VFAT_DISK} vfat disk (Saved State, running), even VMs go by Child VM Snapshot; \
         the last VM's QEMU is SIGKILLed between PrepareForSnapshot and PostSnapshot, so every job must end \
         with no backup, every other VM put back, nothing lost"
    );
    let _ = writeln!(s);
    let _ = writeln!(s, "seconds; freeze = freeze sent .. thaw returned; downtime = stop .. running again");
    let _ = writeln!(
        s,
        "{:>4}  {:<5}  {:>6}  {:>6}  {:>7}  {:>6}  {:>5}  {:>6}  {:<20}  {:<20}  {:>5}  {:>11}",
        "VMs",
        "holds",
        "boot",
        "conds",
        "Prepare",
        "Post",
        "undo",
        "job",
        "longest freeze",
        "longest downtime",
        "lost",
        "load 1m"
    );
    for r in runs {
        let holds = if r.held() { "yes" } else { "NO" };
        let load = format!("{:.1}..{:.1}", r.load.0, r.load.1);
        match &r.result {
            CountResult::Ran { measured: m, lost, .. } => {
                let _ = writeln!(
                    s,
                    "{:>4}  {:<5}  {:>6}  {:>6}  {:>7}  {:>6}  {:>5}  {:>6}  {:<20}  {:<20}  {:>5}  {:>11}",
                    r.count,
                    holds,
                    secs(m.boot),
                    secs(m.conditions),
                    secs(m.prepare),
                    secs(m.post),
                    secs(m.undo),
                    secs(m.job),
                    worst(&m.freeze),
                    worst(&m.downtime),
                    lost,
                    load
                );
            }
            CountResult::TimedOut { .. } => {
                let _ = writeln!(s, "{:>4}  {:<5}  (the run did not finish: see below){:>62}", r.count, holds, load);
            }
        }
    }

    // Like for like: the smallest count of this run that was measured is the baseline.
    if let Some(base) = runs.iter().find_map(|r| measured(r).map(|m| (r.count, m))) {
        let (bn, b) = base;
        let _ = writeln!(s);
        let _ = writeln!(s, "ratios against the {bn}-VM set of this run (same VMs, same machine, same minutes):");
        let _ = writeln!(
            s,
            "{:>4}  {:>8}  {:>7}  {:>7}  {:>7}  {:>15}  {:>17}",
            "VMs", "VMs", "Prepare", "Post", "job", "longest freeze", "longest downtime"
        );
        let first = |x: &Option<(f64, String)>| x.as_ref().map(|(v, _)| *v);
        for r in runs {
            let Some(m) = measured(r) else { continue };
            let _ = writeln!(
                s,
                "{:>4}  {:>8}  {:>7}  {:>7}  {:>7}  {:>15}  {:>17}",
                r.count,
                format!("{:.2}x", r.count as f64 / bn as f64),
                ratio(m.prepare, b.prepare),
                ratio(m.post, b.post),
                ratio(m.job, b.job),
                ratio(first(&m.freeze), first(&b.freeze)),
                ratio(first(&m.downtime), first(&b.downtime)),
            );
        }
    }

    let _ = writeln!(s);
    for r in runs {
        let _ = write!(s, "{} VMs ({:.0} s in all): ", r.count, r.wall_s);
        if let Some(why) = &r.retried {
            let _ = write!(s, "second attempt (the first stopped before the job: {why}); ");
        }
        match &r.result {
            CountResult::Ran { measured: m, failed_checks, error, booted, fell_back, .. } => {
                let _ = writeln!(
                    s,
                    "{booted} of {} booted; {} freeze windows and {} downtimes measured; {}",
                    r.count,
                    m.freezes,
                    m.downtimes,
                    if r.held() {
                        "held: no backup, every check passed".to_owned()
                    } else {
                        format!("{} checks failed", failed_checks.len())
                    }
                );
                for f in fell_back {
                    let _ = writeln!(s, "  fell back to Saved State: {f}");
                }
                if let Some(e) = error {
                    let _ = writeln!(s, "  stopped by: {}", e.replace('\n', "\n    "));
                }
                for c in failed_checks {
                    let _ = writeln!(s, "  failed: {c}");
                }
            }
            CountResult::TimedOut { after, step } => {
                let _ = writeln!(
                    s,
                    "the run's own deadline ({} s for this count) fired while it was at: {step}",
                    after.as_secs()
                );
            }
        }
    }
    let _ = writeln!(s);
    match runs.iter().filter(|r| r.held()).map(|r| r.count).max() {
        Some(n) => {
            let _ = writeln!(s, "largest set that held on this machine in this run: {n} VMs");
        }
        None => {
            let _ = writeln!(s, "no set held on this machine in this run");
        }
    }
    s
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(0, |n| n.get())
}
