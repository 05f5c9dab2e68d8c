//! The scenario file format (`scenarios/*.toml`): plain structs, deserialized with serde,
//! then checked. Every mistake, whether TOML syntax, an unknown key, a wrong type or an
//! impossible value, is reported as `file:line:column: what is wrong, what was expected`,
//! before anything is booted.
//!
//! `spec` holds the file's types, `check` what serde cannot check, and this file reads a
//! file and turns every mistake into a [`ScenarioError`] at its line and column.

mod check;
mod spec;
#[cfg(test)]
mod tests;
mod windows;

use std::ops::Range;
use std::path::{Path, PathBuf};

pub use spec::*;

/// A mistake in a scenario file, at the line and column it was written (0:0 when the file
/// could not be read at all). Nothing was booted.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
#[error("{}:{line}:{column}: {message}", file.display())]
pub struct ScenarioError {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

pub fn load(path: &Path) -> Result<Scenario, ScenarioError> {
    let text = std::fs::read_to_string(path).map_err(|e| ScenarioError {
        file: path.to_owned(),
        line: 0,
        column: 0,
        message: format!("cannot read the scenario: {e}"),
    })?;
    parse(path, &text)
}

pub fn parse(path: &Path, text: &str) -> Result<Scenario, ScenarioError> {
    let at = |span: Option<Range<usize>>, message: String| {
        let (line, column) = span.map(|s| line_col(text, s.start)).unwrap_or((1, 1));
        ScenarioError { file: path.to_owned(), line, column, message }
    };
    let file: ScenarioFile = toml::from_str(text).map_err(|e| at(e.span(), e.message().to_owned()))?;
    let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    check::check(&file).map_err(|(span, msg)| at(Some(span), msg))?;
    Ok(Scenario { name, path: path.to_owned(), file })
}

/// 1-based line and column of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map(|l| l.chars().count()).unwrap_or(0) + 1;
    (line, column)
}
