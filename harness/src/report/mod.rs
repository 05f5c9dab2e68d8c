//! What a run leaves for people and CI, made from the scenarios' JSON reports: the JUnit
//! file, the HTML page (`index.html` in the report folder, self-contained, with an SVG
//! timeline per VM), and the summary table.
//!
//! | module | what it is | uses |
//! |---|---|---|
//! | `html` | the page | `svg`, `summary`, `lanes`, `model`, `text` |
//! | `junit` | the JUnit file | `model`, `text` |
//! | `summary` | the table, one row per VM and method | `lanes`, `model`, `text` |
//! | `svg` | a VM's timeline, drawn | `lanes`, `text` |
//! | `lanes` | what a VM's timeline shows, from its steps | `model` |
//! | `model` | a JSON report as the pages read it; a scenario's status | (lower layers) |
//! | `text` | escaping, durations | — |

mod html;
pub mod junit;
pub mod lanes;
pub mod model;
pub mod summary;
mod svg;
pub mod text;

use std::path::{Path, PathBuf};

pub use model::{ScenarioReport, Status};

/// The page's file name in the report folder.
pub const INDEX: &str = "index.html";
/// A JSON report larger than this is not one quiesce wrote (the largest are some 100 KiB).
const MAX_JSON: u64 = 64 << 20;
/// Of a failed machine's `why.txt`, the page and the JUnit text show this much.
const MAX_WHY: usize = 2000;

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// A report file or folder could not be read; the path says which.
    #[error("{path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    /// A file in the report folder is not a scenario report quiesce wrote; move it away or
    /// delete it.
    #[error("{path}: not a quiesce scenario report: {source}")]
    Parse { path: PathBuf, source: serde_json::Error },
    /// A file in the report folder is far larger than any report quiesce writes.
    #[error("{path}: {size} bytes, more than a scenario report can be ({MAX_JSON} at most)")]
    TooLarge { path: PathBuf, size: u64 },
    /// The page or the JUnit file could not be written; the path says where.
    #[error("writing {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    /// The JUnit report could not be serialized (a bug: say so).
    #[error("writing the JUnit report: {0}")]
    Junit(#[from] quick_junit::SerializeError),
}

/// A scenario's report with the evidence its failed machines left.
#[derive(Debug, Clone)]
pub struct Entry {
    pub report: ScenarioReport,
    pub evidence: Vec<Evidence>,
}

/// One failed machine's evidence folder.
#[derive(Debug, Clone, PartialEq)]
pub struct Evidence {
    /// Relative to the report folder: `artifacts/SCENARIO/MACHINE-xxxxxx`.
    pub dir: PathBuf,
    /// Why it was kept (its `why.txt`, cut short).
    pub why: String,
}

/// Where the evidence of `scenario`'s failed machines goes under the report folder.
pub fn artifacts_dir(report_dir: &Path, scenario: &str) -> PathBuf {
    report_dir.join("artifacts").join(scenario)
}

/// The report as the pages read it: through its JSON, as a file in the report folder holds it.
pub fn view(report: &crate::scenario::Report) -> Result<ScenarioReport, serde_json::Error> {
    serde_json::from_value(serde_json::to_value(report)?)
}

/// Pairs each report with the evidence folders found for it under `report_dir`.
pub fn entries(report_dir: &Path, reports: Vec<ScenarioReport>) -> Vec<Entry> {
    reports
        .into_iter()
        .map(|report| {
            let evidence = evidence(report_dir, &report.scenario);
            Entry { report, evidence }
        })
        .collect()
}

/// The evidence folders of `scenario`, by name. A folder that cannot be listed has none.
fn evidence(report_dir: &Path, scenario: &str) -> Vec<Evidence> {
    let rel = Path::new("artifacts").join(scenario);
    let Ok(dir) = std::fs::read_dir(report_dir.join(&rel)) else { return vec![] };
    let mut out: Vec<Evidence> = dir
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| {
            let why = std::fs::read(e.path().join("why.txt")).unwrap_or_default();
            let why = String::from_utf8_lossy(&why[..why.len().min(MAX_WHY * 4)]);
            Evidence { dir: rel.join(e.file_name()), why: text::cut(why.trim(), MAX_WHY) }
        })
        .collect();
    out.sort_by(|a, b| a.dir.cmp(&b.dir));
    out
}

/// Every scenario report (`*.json`) in `dir`, by file name.
pub fn load_dir(dir: &Path) -> Result<Vec<ScenarioReport>, ReportError> {
    let read = |source| ReportError::Read { path: dir.to_owned(), source };
    let mut files: Vec<PathBuf> =
        std::fs::read_dir(dir).map_err(read)?.map(|e| e.map(|e| e.path()).map_err(read)).collect::<Result<_, _>>()?;
    files.retain(|p| p.extension().is_some_and(|e| e == "json") && p.is_file());
    files.sort();
    files.iter().map(|p| load(p)).collect()
}

/// One scenario report, bounded in size.
pub fn load(path: &Path) -> Result<ScenarioReport, ReportError> {
    let read = |source| ReportError::Read { path: path.to_owned(), source };
    let size = std::fs::metadata(path).map_err(read)?.len();
    if size > MAX_JSON {
        return Err(ReportError::TooLarge { path: path.to_owned(), size });
    }
    let bytes = std::fs::read(path).map_err(read)?;
    let r: ScenarioReport =
        serde_json::from_slice(&bytes).map_err(|source| ReportError::Parse { path: path.to_owned(), source })?;
    if r.scenario.is_empty() {
        let source = serde::de::Error::missing_field("scenario");
        return Err(ReportError::Parse { path: path.to_owned(), source });
    }
    Ok(r)
}

/// Writes `report_dir/index.html` and returns its path.
pub fn write_html(report_dir: &Path, entries: &[Entry]) -> Result<PathBuf, ReportError> {
    let path = report_dir.join(INDEX);
    std::fs::write(&path, html::page(entries)).map_err(|source| ReportError::Write { path: path.clone(), source })?;
    Ok(path)
}

/// Writes the JUnit report of `entries` to `path`.
pub fn write_junit(path: &Path, report_dir: &Path, entries: &[Entry]) -> Result<(), ReportError> {
    let xml = junit::of(entries, report_dir).to_string()?;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|source| ReportError::Write { path: parent.to_owned(), source })?;
    }
    std::fs::write(path, xml).map_err(|source| ReportError::Write { path: path.to_owned(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_reports_and_finds_evidence() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("b.json"), r#"{"scenario":"b","passed":true}"#).unwrap();
        std::fs::write(dir.path().join("a.json"), r#"{"scenario":"a","passed":false}"#).unwrap();
        std::fs::write(dir.path().join("notes.txt"), "not a report").unwrap();
        let ev = artifacts_dir(dir.path(), "a").join("vm1-abc");
        std::fs::create_dir_all(&ev).unwrap();
        std::fs::write(ev.join("why.txt"), "QEMU exited\n").unwrap();
        let reports = load_dir(dir.path()).unwrap();
        assert_eq!(reports.iter().map(|r| r.scenario.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        let entries = entries(dir.path(), reports);
        assert_eq!(entries[0].evidence, [Evidence { dir: "artifacts/a/vm1-abc".into(), why: "QEMU exited".into() }]);
        assert!(entries[1].evidence.is_empty());
    }

    #[test]
    fn a_file_that_is_no_report_is_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("x.json"), r#"{"name":"x"}"#).unwrap();
        let e = load_dir(dir.path()).unwrap_err().to_string();
        assert!(e.contains("x.json: not a quiesce scenario report"), "{e}");
        std::fs::write(dir.path().join("x.json"), "[1,").unwrap();
        assert!(matches!(load_dir(dir.path()), Err(ReportError::Parse { .. })));
    }

    #[test]
    fn the_in_memory_report_reads_back_as_its_json() {
        let mut r = crate::scenario::Report { scenario: "s".into(), passed: true, ..Default::default() };
        r.check("vm1", "same-boot", true, "same");
        let v = view(&r).unwrap();
        assert_eq!((v.scenario.as_str(), v.status(), v.checks.len()), ("s", Status::Passed, 1));
    }
}
