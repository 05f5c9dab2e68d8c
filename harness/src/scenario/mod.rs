//! Scenarios: the file format, the runner that turns one into library calls, the report
//! it produces, and the fixture (a stable view of the report) it is compared with.
//!
//! The modules, and what each uses inside `scenario` (each uses only those listed after it,
//! so the graph has no cycle):
//!
//! | module | what it is | uses |
//! |---|---|---|
//! | `format` | the file: `spec` (its types), `check` (what serde cannot check) | `format::spec` |
//! | `report`, `fixture` | what a run produced, and its stable view | `report` |
//! | `run` | the run itself, in order | all of `run::*`, `stale` |
//! | `run::rollback` | rollback cycles | `faults`, `disk_checks`, `ctx`, `error` |
//! | `run::restore` | restore and its checks, in steps | `restore::guest`, `disk_checks`, `ctx`, `error` |
//! | `run::restore::guest` | the checks inside a restored guest | `ctx`, `error` |
//! | `run::after_backup` | the VMs are back as they were; nothing changed | `ctx`, `error` |
//! | `run::setup` | each VM booted as declared, its workloads started | `ctx`, `error` |
//! | `run::faults` | the set member and its faults, freeze hooks, the small tmpfs | `ctx`, `error` |
//! | `run::host_faults` | production faults: a full snapshot volume, a merge that does not converge, a vanishing target | `stale`, `ctx`, `error` |
//! | `stale` | run folders left by a killed quiesce: the run lock, the sweep | (lower layers only) |
//! | `run::disk_checks` | manifests and blocks against the backup point | `error` |
//! | `run::ctx` | options, the run's context value, each VM's state, deadlines | `error` |
//! | `run::error` | the run's typed error | (lower layers only) |
//! | `shard` | which scenarios a CI job's share holds (`--shard K/N`) | (none) |
//!
//! Every `run` module also reads `format` and writes `report`; neither knows of `run`.

pub mod fixture;
pub mod format;
pub mod report;
pub mod run;
pub mod shard;
pub mod stale;

pub use format::{load, parse, Scenario, ScenarioError};
pub use report::Report;
pub use run::{run, skip_reason, RunError, RunOptions};

/// The scenario files in `path`: the file itself, or every `*.toml` in a folder and in its
/// sub-folders (such as `windows/`; fixture folders named `snapshots` are not searched),
/// sorted.
pub fn discover(path: &std::path::Path) -> std::io::Result<Vec<std::path::PathBuf>> {
    if !path.is_dir() {
        return Ok(vec![path.to_owned()]);
    }
    let mut v = Vec::new();
    for p in std::fs::read_dir(path)?.filter_map(Result::ok).map(|e| e.path()) {
        if p.is_dir() && p.file_name().is_some_and(|n| n != "snapshots") {
            v.extend(discover(&p)?);
        } else if p.extension().is_some_and(|e| e == "toml") {
            v.push(p);
        }
    }
    v.sort();
    Ok(v)
}
