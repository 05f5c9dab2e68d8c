//! What a test reads of quiesce's state folder ($QUIESCE_STATE_DIR): the recovery
//! journals in it, and what `quiesce doctor` says of them.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use quiesce::sys::Tool;

/// `quiesce doctor`'s lines about the journals in `state` (it changes nothing there).
pub fn doctor(state: &Path) -> String {
    let reports = tempfile::tempdir().unwrap();
    let o = Tool::new(env!("CARGO_BIN_EXE_quiesce"), Duration::from_secs(300))
        .args(["doctor", "--no-build", "--report-dir"])
        .arg(reports.path())
        .env("QUIESCE_STATE_DIR", state)
        .output()
        .unwrap();
    let text = o.stdout_text();
    let mut lines = Vec::new();
    let mut journal = false;
    for l in text.lines() {
        journal = l.starts_with("journal") || (journal && l.starts_with(' '));
        if journal {
            lines.push(l);
        }
    }
    eprintln!("doctor:\n{}", lines.join("\n"));
    lines.join("\n")
}

/// The files in `state`'s journal folder `kind` ("journals", "libvirt-journals").
pub fn journals_in(state: &Path, kind: &str) -> Vec<PathBuf> {
    match std::fs::read_dir(state.join(kind)) {
        Ok(d) => d.flatten().map(|e| e.path()).collect(),
        Err(_) => vec![],
    }
}
