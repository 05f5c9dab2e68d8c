//! The suite benchmark's report: each command whole and by stage, the goals met or missed,
//! and the boot split.

use std::fmt::Write;

use super::boot::BootSplit;
use super::timed::{MarkKind, Timed};
use super::{SuiteRun, GOAL_MAIN, GOAL_TEST, GOAL_WARM};
use crate::stats::{goal, median, runs};

/// `10 min 17 s`; under a minute, `41.2 s`.
pub fn duration(secs: f64) -> String {
    if secs < 60.0 {
        return format!("{secs:.1} s");
    }
    let s = secs.round() as u64;
    format!("{} min {} s", s / 60, s % 60)
}

/// A command's parts, as stages: a part's own `==> ` stages when it printed them, else
/// cargo's compile then the rest when cargo said `Finished`, else the part whole.
fn stages(parts: &[Timed]) -> Vec<(String, f64)> {
    let mut out = Vec::new();
    for t in parts {
        let own = t.stages();
        if !own.is_empty() {
            let first = t.marks.iter().find(|m| m.kind == MarkKind::Stage).map_or(0.0, |m| m.at);
            if first >= 0.05 {
                out.push((format!("{}: before its first stage", t.part), first));
            }
            out.extend(own);
        } else if let Some(done) = t.first(MarkKind::CargoFinished) {
            out.push(("compiling".to_owned(), done));
            out.push((format!("{}: after compiling", t.part), t.secs - done));
        } else {
            out.push((t.part.clone(), t.secs));
        }
    }
    out
}

/// The whole of a command: the sum of its parts, and whether every part passed; None if a
/// part never ran (one before it failed).
fn whole(parts: &[Timed], expected: usize) -> Option<(f64, bool)> {
    (parts.len() == expected).then(|| (parts.iter().map(|t| t.secs).sum(), parts.iter().all(Timed::ok)))
}

fn result(parts: &[Timed]) -> String {
    match parts.iter().find(|t| !t.ok()) {
        Some(t) => format!("FAILED in `{}` (log: {})", t.part, t.log.display()),
        None => parts.iter().rev().find_map(Timed::counts).unwrap_or("passed").to_owned(),
    }
}

fn goal_line(s: &mut String, what: &str, limit: f64, took: Option<(f64, bool)>) {
    let l = duration(limit);
    let _ = match took {
        Some((t, true)) => {
            writeln!(s, "  {what} <= {l}: {} ({:.2}x the goal: {})", duration(t), t / limit, goal(t <= limit))
        }
        // A command that ran to its end but failed (a scenario failed) has a time, and
        // misses its goal whatever the time.
        Some((t, false)) => {
            writeln!(s, "  {what} <= {l}: {} ({:.2}x the goal), but it failed: {}", duration(t), t / limit, goal(false))
        }
        None => writeln!(s, "  {what} <= {l}: not measured, the command did not run to its end ({})", goal(false)),
    };
}

fn command_rows(s: &mut String, name: &str, line: &str, parts: &[Timed], expected: usize) {
    if parts.is_empty() {
        let _ = writeln!(s, "| {name} | not run | | |");
        return;
    }
    let took = parts.iter().map(|t| t.secs).sum::<f64>();
    let _ = writeln!(s, "| {name}: `{line}` | **{}** | | {} |", duration(took), result(parts));
    for (stage, secs) in stages(parts) {
        let _ = writeln!(s, "| | {} | {stage} | |", duration(secs));
    }
    if parts.len() < expected {
        let _ = writeln!(s, "| | | (the parts after the failed one did not run) | |");
    }
}

/// One part of a boot, read from a split.
type Part = fn(&BootSplit) -> f64;

fn boot_lines(s: &mut String, boots: &[BootSplit]) {
    let col = |f: fn(&BootSplit) -> f64| boots.iter().map(f).collect::<Vec<f64>>();
    let total = median(&col(|b| b.total));
    let _ = writeln!(
        s,
        "boot of the test guest to a ready agent, median of {} boots: {total:.2} s {}",
        boots.len(),
        runs(&col(|b| b.total))
    );
    let parts: [(&str, Part); 5] = [
        ("QEMU, the firmware and loading the kernel and initrd (before the kernel's clock)", |b| b.before_kernel),
        ("the kernel, to running /init", |b| b.kernel),
        ("the initrd, to the root mounted", |b| b.initrd),
        ("the root's init, to starting qemu-ga", |b| b.to_agent_start),
        ("qemu-ga starting, to its answer", |b| b.agent_answer),
    ];
    for (what, f) in parts {
        let m = median(&col(f));
        let _ = writeln!(s, "  {m:6.2} s ({:4.1}%) {what} {}", 100.0 * m / total, runs(&col(f)));
    }
}

pub fn render(r: &SuiteRun) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "quiesce-bench suite: the README's two commands, each in a fresh clone of {}{} with an empty image cache; \
         {} cores; load average (1 min) {:.1} at the start, {:.1} at the end",
        r.commit,
        if r.dirty { " (the checkout has uncommitted changes, which are not measured)" } else { "" },
        r.cores,
        r.load.0,
        r.load.1
    );
    let _ = writeln!(s, "not fresh: the cargo registry (crates already downloaded) and the installed packages; a new machine adds their downloads\n");
    let _ = writeln!(s, "| command | time | stage | result |\n|---|---|---|---|");
    let main_n = r.commands.main.parts.len();
    command_rows(&mut s, "main command", &r.commands.main.line, &r.main, main_n);
    command_rows(&mut s, "warm run (same clone, all built)", r.commands.main.last_part(), &r.warm, 1);
    command_rows(&mut s, "test command", &r.commands.test.line, &r.test, r.commands.test.parts.len());
    let _ = writeln!(s, "\ngoals (issue 11), on this machine:");
    goal_line(&mut s, "the main command from a fresh clone, image build included", GOAL_MAIN, whole(&r.main, main_n));
    goal_line(
        &mut s,
        "the test command from a fresh clone",
        GOAL_TEST,
        if r.test.is_empty() { None } else { whole(&r.test, r.commands.test.parts.len()) },
    );
    goal_line(&mut s, "the warm run", GOAL_WARM, whole(&r.warm, 1));
    if let Some(t) = &r.boot_times {
        let _ = writeln!(
            s,
            "\nthe last run's scenarios: {} of scenario time, {} of it VM-time in steps that boot a VM \
             (`boot and prepare`, a restore's boot; the VMs of one scenario boot at once)",
            duration(t.scenarios),
            duration(t.booting)
        );
        let (cold, loaded) = (median(&t.cold), median(&t.loaded));
        let _ = writeln!(
            s,
            "restored VMs, launch to ready, medians: by a cold boot to the agent {cold:.2} s ({} restores), \
             by loading a saved state {loaded:.2} s ({}): {:.2}x, what a VM started from a booted template would cost",
            t.cold.len(),
            t.loaded.len(),
            loaded / cold
        );
    }
    if !r.boots.is_empty() {
        s.push('\n');
        boot_lines(&mut s, &r.boots);
    }
    if let Some(e) = &r.boot_error {
        let _ = writeln!(s, "\nthe boots could not be split: {e}");
    }
    let _ = write!(s, "\nlogs (every line with its second): {}", r.logs.display());
    s
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;
    use std::path::PathBuf;

    use super::*;
    use crate::suite::readme;
    use crate::suite::timed::Mark;

    fn part(part: &str, secs: f64, marks: &[(f64, MarkKind, &str)], ok: bool) -> Timed {
        let outcome = if ok {
            Ok(())
        } else {
            Err(quiesce::sys::ToolError::Failed {
                program: "env".into(),
                command: part.into(),
                status: std::process::ExitStatus::from_raw(1 << 8),
                stderr: "broken".into(),
            })
        };
        Timed {
            part: part.into(),
            secs,
            marks: marks.iter().map(|&(at, kind, line)| Mark { at, kind, line: line.into() }).collect(),
            log: PathBuf::from(format!("/logs/{part}.log")),
            outcome,
        }
    }

    fn run(test_ok: bool) -> SuiteRun {
        let readme = "## Two commands\n```sh\nsetup && cargo run -- run scenarios/\nsetup && sh ci/test.sh\n```\n";
        let counts = "36 passed, 0 failed, 10 skipped";
        SuiteRun {
            commands: readme::commands(readme).unwrap(),
            commit: "abc".into(),
            dirty: false,
            cores: 2,
            main: vec![
                part("setup", 3.0, &[], true),
                part(
                    "cargo run -- run scenarios/",
                    400.0,
                    &[(170.0, MarkKind::CargoFinished, "Finished"), (399.0, MarkKind::Counts, counts)],
                    true,
                ),
            ],
            warm: vec![part("cargo run -- run scenarios/", 290.0, &[(0.5, MarkKind::CargoFinished, "Finished")], true)],
            test: vec![
                part("setup", 3.0, &[], true),
                part(
                    "sh ci/test.sh",
                    600.0,
                    &[(0.0, MarkKind::Stage, "==> cargo fmt --check"), (5.0, MarkKind::Stage, "==> cargo clippy")],
                    test_ok,
                ),
            ],
            boot_times: None,
            boots: Vec::new(),
            boot_error: None,
            load: (0.5, 2.0),
            logs: PathBuf::from("/logs"),
        }
    }

    #[test]
    fn each_goal_is_printed_met_or_missed_and_each_command_by_stage() {
        let text = render(&run(true));
        assert!(text.contains("image build included <= 7 min 0 s: 6 min 43 s (0.96x the goal: goal met)"), "{text}");
        assert!(text.contains("the warm run <= 5 min 0 s: 4 min 50 s (0.97x the goal: goal met)"), "{text}");
        assert!(
            text.contains("the test command from a fresh clone <= 8 min 0 s: 10 min 3 s (1.26x the goal: goal missed)"),
            "{text}"
        );
        assert!(text.contains("| | 2 min 50 s | compiling | |"), "{text}");
        assert!(text.contains("| | 9 min 55 s | cargo clippy | |"), "{text}");
        assert!(
            text.contains("| main command: `setup && cargo run -- run scenarios/` | **6 min 43 s** | | 36 passed, 0 failed, 10 skipped |"),
            "{text}"
        );
        // A command that failed is no time against its goal.
        let failed = render(&run(false));
        assert!(failed.contains("<= 8 min 0 s: 10 min 3 s (1.26x the goal), but it failed: goal missed"), "{failed}");
        assert!(failed.contains("FAILED in `sh ci/test.sh` (log: /logs/sh ci/test.sh.log)"), "{failed}");
    }

    #[test]
    fn durations_read_as_minutes_and_seconds() {
        assert_eq!(duration(41.23), "41.2 s");
        assert_eq!(duration(617.0), "10 min 17 s");
    }
}
