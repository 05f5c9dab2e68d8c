//! `quiesce report DIR`: rebuilds the page of a report folder (and, with `--junit`, the
//! JUnit file) from the JSON reports in it, as `quiesce run` would have written them.

use std::path::PathBuf;

use super::CliResult;
use quiesce::report;

pub fn run(dir: PathBuf, junit: Option<PathBuf>) -> CliResult {
    let reports = report::load_dir(&dir)?;
    if reports.is_empty() {
        return Err(format!("{}: no scenario reports (*.json) in it", dir.display()).into());
    }
    let entries = report::entries(&dir, reports.clone());
    let page = report::write_html(&dir, &entries)?;
    if let Some(j) = &junit {
        report::write_junit(j, &dir, &entries)?;
    }
    super::run::print_summary(&dir, &reports);
    println!("report: {}", page.display());
    if let Some(j) = &junit {
        println!("JUnit: {}", j.display());
    }
    Ok(0)
}
