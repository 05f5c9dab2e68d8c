//! Runs every `scenarios/*.toml` as its own test, on real guests, and compares its outcome
//! with the insta fixture kept beside it (`scenarios/snapshots/NAME.snap`). Review changed
//! fixtures with `cargo insta review`. One more test fails on fixtures without a scenario
//! and on pending ones, so CI never carries stale or unreviewed fixtures.
//!
//! Scenarios in sub-folders (`scenarios/windows/`) keep their fixtures in their own
//! `snapshots/`. One that cannot run here (a Windows VM and no Windows image) is marked
//! ignored, so the test summary counts it as skipped, never as passed; it needs no fixture
//! until it can run.

use std::path::{Path, PathBuf};

use libtest_mimic::{Arguments, Failed, Trial};
use quiesce::scenario::{self, fixture, shard, RunOptions};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn scenarios_dir() -> PathBuf {
    root().join("scenarios")
}

/// Where the fixture of the scenario at `path` lives: `snapshots/` beside it.
fn snapshots_of(path: &Path) -> PathBuf {
    path.parent().map(Path::to_owned).unwrap_or_else(scenarios_dir).join("snapshots")
}

fn run_scenario(path: &Path) -> Result<(), Failed> {
    let s = scenario::load(path).map_err(|e| e.to_string())?;
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let opts = RunOptions {
        accel: None,
        artifacts_dir: Some(tmp.join("quiesce-artifacts")),
        work_dir: tmp.join("scenario-work"),
        keep_backup: false,
        interrupt: None,
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let report = rt.block_on(scenario::run(&s, &opts, &mut |m| eprintln!("  {m}")));
    if let Some(why) = &report.skipped {
        // Only reached with --include-ignored: a skip is not a pass, and has no fixture.
        eprintln!("scenario {} skipped: {why}", s.name);
        return Ok(());
    }
    if let Some(error) = &report.error {
        // Before the fixture's diff, which CI logs cut: the whole error, serial tail and all.
        eprintln!("scenario {} stopped with an error:\n{error}", s.name);
    }
    let fx = fixture::of(&report);
    let mut settings = insta::Settings::clone_current();
    settings.set_snapshot_path(snapshots_of(path));
    settings.set_prepend_module_to_snapshot(false);
    settings.set_omit_expression(true);
    settings.set_description(s.file.description.clone());
    // Error texts may quote temp paths and times; fixtures hold neither.
    settings.add_filter(r"/[^\s\x22'(),;]*(/tmp/|scenario-work|quiesce-)[^\s\x22'(),;]*", "[path]");
    settings.add_filter(r"\b\d+(\.\d+)?\s?(ms|s|µs)\b", "[duration]");
    settings.bind(|| insta::assert_yaml_snapshot!(s.name.as_str(), fx));
    if !report.passed {
        // The fixture matched, but a scenario that does not pass must say why in the log.
        let json = serde_json::to_string_pretty(&report).unwrap_or_default();
        return Err(format!("scenario {} did not pass: {:?}\n{json}", s.name, report.error).into());
    }
    Ok(())
}

/// Every fixture belongs to a scenario beside its folder, and none is pending review.
/// Every scenario that can run here has a fixture.
fn fixtures_are_referenced() -> Result<(), Failed> {
    let paths = scenario::discover(&scenarios_dir())?;
    let stem = |p: &Path| p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let mut problems = Vec::new();
    let mut folders: Vec<PathBuf> = paths.iter().map(|p| snapshots_of(p)).collect();
    folders.dedup();
    for dir in folders.iter().filter(|d| d.is_dir()) {
        let names: Vec<String> = paths.iter().filter(|p| &snapshots_of(p) == dir).map(|p| stem(p)).collect();
        for e in std::fs::read_dir(dir)?.flatten() {
            let file = e.file_name().to_string_lossy().into_owned();
            match file.strip_suffix(".snap") {
                Some(stem) if names.iter().any(|n| n == stem) => {}
                Some(stem) => problems.push(format!("{file}: no scenario {stem}.toml uses it (remove it)")),
                None => problems.push(format!("{file}: pending or unknown file (run `cargo insta review`)")),
            }
        }
    }
    for p in &paths {
        let n = stem(p);
        let runnable = scenario::load(p).map(|s| scenario::skip_reason(&s).is_none()).unwrap_or(true);
        if runnable && !snapshots_of(p).join(format!("{n}.snap")).exists() {
            problems.push(format!("scenario {n} has no fixture (run it with INSTA_UPDATE=always, then review)"));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("\n").into())
    }
}

fn main() {
    let args = Arguments::from_args();
    let mut trials = vec![Trial::test("fixtures_are_referenced", fixtures_are_referenced)];
    // Longest recorded first, as `quiesce run -j` starts them: the test threads take trials
    // in this order, and a long scenario started last would run on alone at the end.
    let mut paths = scenario::discover(&scenarios_dir()).expect("the scenarios folder");
    let stems: Vec<String> =
        paths.iter().map(|p| p.file_stem().unwrap_or_default().to_string_lossy().into_owned()).collect();
    let durations = shard::durations_beside(&[scenarios_dir()]).expect("scenarios/durations.txt");
    let order = shard::longest_first(&stems, &durations);
    let mut slots: Vec<Option<PathBuf>> = paths.drain(..).map(Some).collect();
    let paths: Vec<PathBuf> = order.iter().filter_map(|&i| slots[i].take()).collect();
    for path in paths {
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        // Skipped (ignored) when it cannot run here; the reason is in `quiesce run`'s report.
        let skip = scenario::load(&path).ok().and_then(|s| scenario::skip_reason(&s));
        if let Some(why) = &skip {
            eprintln!("scenario::{name} is skipped: {why}");
        }
        let trial = Trial::test(format!("scenario::{name}"), move || run_scenario(&path));
        trials.push(trial.with_ignored_flag(skip.is_some()));
    }
    libtest_mimic::run(&args, trials).exit();
}
