//! The scenario file format (`scenarios/*.toml`): plain structs, deserialized with serde,
//! then checked. Every mistake, whether TOML syntax, an unknown key, a wrong type or an
//! impossible value, is reported as `file:line:column: what is wrong, what was expected`,
//! before anything is booted.
//!
//! `spec` holds the file's types, `check` what serde cannot check, `own` the images users
//! bring (their paths checked last, as that reads files), `bounds` what a file may hold
//! before it is parsed, and this file reads a file and turns every mistake into a
//! [`ScenarioError`] at its line and column.

mod bounds;
mod check;
mod own;
mod spec;
#[cfg(test)]
mod tests;
mod windows;

use std::ops::Range;
use std::path::{Path, PathBuf};

pub use bounds::MAX_ITEMS;
pub use own::{ImageSpec, OwnImage, OwnOs, Resolved};
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

/// A scenario file larger than this is refused unread: the largest in scenarios/ is a few
/// KiB, and a file is input (a colleague's, one a program wrote) that must not make the
/// harness read without limit.
pub const MAX_FILE_BYTES: u64 = 1 << 20;

/// At most this much of a mistake's message is shown: serde repeats a wrong value in it,
/// and a value can be as long as the file.
const MAX_MESSAGE: usize = 1000;

pub fn load(path: &Path) -> Result<Scenario, ScenarioError> {
    let unreadable = |why: String| ScenarioError { file: path.to_owned(), line: 0, column: 0, message: why };
    let file = std::fs::File::open(path).map_err(|e| unreadable(format!("cannot read the scenario: {e}")))?;
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut std::io::Read::take(file, MAX_FILE_BYTES + 1), &mut bytes)
        .map_err(|e| unreadable(format!("cannot read the scenario: {e}")))?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(unreadable(format!("the scenario is larger than {MAX_FILE_BYTES} bytes; no scenario needs that")));
    }
    let text = String::from_utf8(bytes).map_err(|e| unreadable(format!("cannot read the scenario: {e}")))?;
    parse(path, &text)
}

pub fn parse(path: &Path, text: &str) -> Result<Scenario, ScenarioError> {
    let at = |span: Option<Range<usize>>, message: String| {
        let (line, column) = span.map(|s| line_col(text, s.start)).unwrap_or((1, 1));
        ScenarioError { file: path.to_owned(), line, column, message: bounded(message) }
    };
    // `load` refuses a larger file unread; text given here directly is held to the same.
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err(at(None, format!("the scenario is larger than {MAX_FILE_BYTES} bytes; no scenario needs that")));
    }
    bounds::check(text).map_err(|(offset, message)| at(Some(offset..offset + 1), message))?;
    let mut file: ScenarioFile = toml::from_str(text).map_err(|e| {
        // toml has no words for some mistakes (a value missing at the end of the file).
        let message = match e.message() {
            "" => "the TOML is malformed here: a value, key or table was expected".to_owned(),
            m => m.to_owned(),
        };
        at(e.span(), message)
    })?;
    let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    check::check(&file).map_err(|(span, msg)| at(Some(span), msg))?;
    // Last, as it reads files: an own image's paths, against the scenario's folder.
    let dir = path.parent().unwrap_or(Path::new(""));
    own::resolve(&mut file, dir).map_err(|(span, msg)| at(Some(span), msg))?;
    Ok(Scenario { name, path: path.to_owned(), file })
}

/// The message, cut (at a character) to [`MAX_MESSAGE`] bytes and marked as cut.
fn bounded(mut message: String) -> String {
    if message.len() > MAX_MESSAGE {
        let mut end = MAX_MESSAGE;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        let len = message.len();
        message.truncate(end);
        message.push_str(&format!("… (a message of {len} bytes)"));
    }
    message
}

/// 1-based line and column of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map(|l| l.chars().count()).unwrap_or(0) + 1;
    (line, column)
}
