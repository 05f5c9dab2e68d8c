//! Scenarios: the file format, the runner that turns one into library calls, the report
//! it produces, and the fixture (a stable view of the report) it is compared with.

mod disk_checks;
pub mod fixture;
pub mod format;
pub mod report;
mod rollback;
pub mod runner;

pub use format::{load, parse, Scenario, ScenarioError};
pub use report::Report;
pub use runner::{run, RunOptions};

/// The scenario files in `path`: the file itself, or every `*.toml` in a folder, sorted.
pub fn discover(path: &std::path::Path) -> std::io::Result<Vec<std::path::PathBuf>> {
    if path.is_dir() {
        let mut v: Vec<_> = std::fs::read_dir(path)?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "toml"))
            .collect();
        v.sort();
        Ok(v)
    } else {
        Ok(vec![path.to_owned()])
    }
}
