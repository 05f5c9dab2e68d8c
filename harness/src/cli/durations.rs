//! `quiesce durations`: how long each scenario took, read from a run's JSON reports, merged
//! into the durations file that `quiesce run --shard` balances its shares by.

use std::path::PathBuf;

use super::CliResult;
use quiesce::scenario::shard::Durations;

/// A report larger than this is not one of ours; it is skipped.
const MAX_REPORT_BYTES: u64 = 64 << 20;

pub fn run(report_dir: PathBuf, write: Option<PathBuf>) -> CliResult {
    let mut found = Durations::default();
    let entries = std::fs::read_dir(&report_dir).map_err(|e| format!("{}: {e}", report_dir.display()))?;
    let mut paths: Vec<PathBuf> =
        entries.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "json")).collect();
    paths.sort();
    for path in paths {
        if std::fs::metadata(&path).map(|m| m.len() > MAX_REPORT_BYTES).unwrap_or(true) {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(&path) else { continue };
        // Only the two fields this needs; anything else in the folder is not a report.
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else { continue };
        let (Some(name), Some(ms)) = (v["scenario"].as_str(), v["duration_ms"].as_f64()) else { continue };
        let plain = !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if plain && ms.is_finite() && ms >= 0.0 {
            found.0.insert(name.to_owned(), (ms / 100.0).round() / 10.0);
        }
    }
    if found.0.is_empty() {
        eprintln!("quiesce: no scenario reports in {}", report_dir.display());
        return Ok(super::EXIT_FAILED);
    }
    match write {
        None => print!("{}", found.render()),
        Some(file) => {
            let mut all = Durations::load(&file)?;
            let n = found.0.len();
            all.0.extend(found.0);
            std::fs::write(&file, all.render()).map_err(|e| format!("{}: {e}", file.display()))?;
            println!("{}: {n} scenario(s) updated, {} in all", file.display(), all.0.len());
        }
    }
    Ok(0)
}
