//! One part of a README command, run as a new user's shell would run it and timed: every
//! line it prints goes to a log file with the second it came at, and the lines that mark a
//! stage (cargo's `Finished`, `ci/test.sh`'s `==> ` headings, `quiesce run`'s closing
//! counts) are kept with their times, so one run of a command also gives its stages.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use quiesce::sys::{blocking_tools, Tool, ToolError};

/// A line that marks a stage, and when it came (seconds from the part's start).
#[derive(Debug, Clone, PartialEq)]
pub struct Mark {
    pub at: f64,
    pub kind: MarkKind,
    pub line: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MarkKind {
    /// cargo's `Finished ...`: what came before it was compiling.
    CargoFinished,
    /// A `ci/test.sh` stage begins: `==> cargo clippy`.
    Stage,
    /// `quiesce run`'s closing line: `36 passed, 0 failed, 10 skipped`.
    Counts,
}

/// The kind of mark `line` is, if it is one.
pub fn mark_kind(line: &str) -> Option<MarkKind> {
    let t = line.trim();
    if t.starts_with("Finished ") {
        Some(MarkKind::CargoFinished)
    } else if t.starts_with("==> ") {
        Some(MarkKind::Stage)
    } else if is_counts(t) {
        Some(MarkKind::Counts)
    } else {
        None
    }
}

/// `N passed, N failed, N skipped`, as `quiesce run` closes.
fn is_counts(t: &str) -> bool {
    let words: Vec<&str> = t.split(", ").collect();
    words.len() == 3
        && ["passed", "failed", "skipped"]
            .iter()
            .zip(&words)
            .all(|(want, w)| w.split_once(' ').is_some_and(|(n, name)| n.parse::<u32>().is_ok() && name == *want))
}

/// A part that ran to its end (whatever its exit status) or was stopped.
#[derive(Debug)]
pub struct Timed {
    pub part: String,
    pub secs: f64,
    pub marks: Vec<Mark>,
    /// Its log: every line, stdout and stderr alike, with its time.
    pub log: PathBuf,
    /// Ok if it exited 0; otherwise why not (the error names the command, the exit status
    /// and the end of what it printed).
    pub outcome: Result<(), ToolError>,
}

impl Timed {
    pub fn ok(&self) -> bool {
        self.outcome.is_ok()
    }

    /// When the first mark of `kind` came.
    pub fn first(&self, kind: MarkKind) -> Option<f64> {
        self.marks.iter().find(|m| m.kind == kind).map(|m| m.at)
    }

    /// The last counts line, if the part printed one.
    pub fn counts(&self) -> Option<&str> {
        self.marks.iter().rev().find(|m| m.kind == MarkKind::Counts).map(|m| m.line.trim())
    }

    /// Each `==> ` stage and how long it ran (to the next stage, or to the part's end).
    pub fn stages(&self) -> Vec<(String, f64)> {
        let stages: Vec<&Mark> = self.marks.iter().filter(|m| m.kind == MarkKind::Stage).collect();
        stages
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let end = stages.get(i + 1).map_or(self.secs, |n| n.at);
                (m.line.trim().trim_start_matches("==> ").to_owned(), end - m.at)
            })
            .collect()
    }
}

/// Where a part runs: the clone, and the environment a new user's shell would have there.
pub struct Place<'a> {
    pub dir: &'a Path,
    /// The image cache this run builds into (empty at first for a fresh run).
    pub cache: &'a Path,
}

/// Runs `part` with `sh -c` in `place`, killed (with all it started) after `timeout`. A
/// target folder or cache named by this process's environment is not passed on: the part
/// builds into the clone's own `target/` and `place.cache`, as on a fresh machine.
pub async fn run(part: &str, place: &Place<'_>, log: &Path, timeout: Duration) -> std::io::Result<Timed> {
    let mut file = File::create(log)?;
    let (part_owned, dir, cache, log_path) =
        (part.to_owned(), place.dir.to_owned(), place.cache.to_owned(), log.to_owned());
    let started = Instant::now();
    let (marks, outcome) = blocking_tools(move || {
        let mut marks = Vec::new();
        let mut on_line = |line: &str| {
            let at = started.elapsed().as_secs_f64();
            // A log that cannot be written loses lines, not the measurement.
            let _ = writeln!(file, "[{at:8.1}] {line}");
            if let Some(kind) = mark_kind(line) {
                marks.push(Mark { at, kind, line: line.to_owned() });
            }
        };
        // stdout joins stderr so that every line is seen, in order, as it comes.
        let script = format!("exec 1>&2\n{part_owned}");
        // die_with_parent: a benchmark killed outright takes the command's shell with it;
        // this thread is the one that waits for it, as that needs.
        let outcome = Tool::new("env", timeout)
            .die_with_parent()
            .args(["-u", "CARGO_TARGET_DIR", "-u", "CARGO_BUILD_TARGET_DIR", "-u", "QUIESCE_BIN"])
            .args(["sh", "-c", &script])
            .env("QUIESCE_CACHE_DIR", &cache)
            .env("CARGO_TERM_COLOR", "never")
            .current_dir(&dir)
            .on_stderr_line(&mut on_line)
            .run()
            .map(drop);
        (marks, outcome)
    })
    .await
    .map_err(std::io::Error::other)?;
    Ok(Timed { part: part.to_owned(), secs: started.elapsed().as_secs_f64(), marks, log: log_path, outcome })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_marks_are_cargo_finished_test_stages_and_quiesce_counts() {
        assert_eq!(
            mark_kind("    Finished `release` profile [optimized] target(s) in 2m 58s"),
            Some(MarkKind::CargoFinished)
        );
        assert_eq!(mark_kind("==> cargo clippy"), Some(MarkKind::Stage));
        assert_eq!(mark_kind("36 passed, 0 failed, 10 skipped"), Some(MarkKind::Counts));
        assert_eq!(mark_kind("test result: ok. 3 passed; 0 failed"), None);
        assert_eq!(mark_kind("x passed, 0 failed, 1 skipped"), None);
        assert_eq!(mark_kind("   Compiling quiesce v0.1.0"), None);
    }

    #[tokio::test]
    async fn a_part_is_timed_logged_and_split_at_its_marks() {
        let dir = tempfile::tempdir().unwrap();
        let place = Place { dir: dir.path(), cache: &dir.path().join("cache") };
        let log = dir.path().join("part.log");
        // stdout and stderr both reach the log and the marks; the cache is the one given.
        let script = "echo '==> one'; echo \"cache $QUIESCE_CACHE_DIR\" >&2; echo '==> two'; echo '1 passed, 0 failed, 2 skipped'";
        let t = run(script, &place, &log, Duration::from_secs(30)).await.unwrap();
        assert!(t.ok(), "{:?}", t.outcome);
        let stages: Vec<String> = t.stages().into_iter().map(|(s, _)| s).collect();
        assert_eq!(stages, ["one", "two"]);
        assert_eq!(t.counts(), Some("1 passed, 0 failed, 2 skipped"));
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(text.contains(&format!("cache {}", dir.path().join("cache").display())), "{text}");
        assert!(text.lines().all(|l| l.starts_with('[')), "{text}");
    }

    #[tokio::test]
    async fn a_failing_or_stuck_part_says_so_and_is_still_timed() {
        let dir = tempfile::tempdir().unwrap();
        let place = Place { dir: dir.path(), cache: dir.path() };
        let failed =
            run("echo broken >&2; exit 3", &place, &dir.path().join("a.log"), Duration::from_secs(30)).await.unwrap();
        assert!(
            matches!(&failed.outcome, Err(ToolError::Failed { stderr, .. }) if stderr.contains("broken")),
            "{:?}",
            failed.outcome
        );
        let stuck = run("sleep 30", &place, &dir.path().join("b.log"), Duration::from_millis(300)).await.unwrap();
        assert!(matches!(stuck.outcome, Err(ToolError::TimedOut { .. })), "{:?}", stuck.outcome);
        assert!(stuck.secs < 10.0);
    }
}
