//! The layers of the crate, checked: a module may use only modules of lower layers, so no
//! import cycle can form among the top-level modules. The table below is the one in the
//! crate documentation (`lib.rs`) and in DEVELOPERS.md; a change to one is a change to all.

use std::path::{Path, PathBuf};

/// Each top-level module and its layer, lowest first. A module may name `crate::X` only for
/// an `X` of a strictly lower layer (or itself): two modules of one layer do not use each
/// other.
const LAYERS: &[(&str, u32)] = &[
    // Shared by every layer above, using nothing of the crate.
    ("sys", 0),
    ("timeline", 0),
    ("interrupt", 0),
    ("qemu", 1),
    ("image", 2),
    // Guest workloads, run through the agent.
    ("workload", 2),
    ("backup", 3),
    // The test guest: a cached image booted as a machine.
    ("testguest", 3),
    ("verify", 4),
    // Windows guests: building their image, and when one is ready (over `backup::vss`).
    ("windows", 4),
    ("scenario", 5),
    // Views of the JSON reports for people and CI: JUnit, the HTML page, the summary table.
    ("report", 6),
];

fn layer(module: &str) -> Option<u32> {
    LAYERS.iter().find(|(m, _)| *m == module).map(|&(_, l)| l)
}

/// The crate's `.rs` files under `path` (a file, or a folder walked whole).
fn sources(path: &Path, out: &mut Vec<PathBuf>) {
    if path.is_dir() {
        for entry in std::fs::read_dir(path).unwrap() {
            sources(&entry.unwrap().path(), out);
        }
    } else if path.is_file() && path.extension().is_some_and(|e| e == "rs") {
        out.push(path.to_owned());
    }
}

/// The top-level modules `text` names as `crate::X`, outside comments.
fn named_modules(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    for line in text.lines().filter(|l| !l.trim_start().starts_with("//")) {
        let mut rest = line;
        while let Some(at) = rest.find("crate::") {
            rest = &rest[at + "crate::".len()..];
            let name: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            if !name.is_empty() {
                found.push(name);
            }
        }
    }
    found
}

#[test]
fn every_module_uses_only_lower_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let lib = std::fs::read_to_string(src.join("lib.rs")).unwrap();
    let mut upward = Vec::new();
    for declared in lib.lines().filter_map(|l| l.trim().strip_prefix("pub mod ")?.strip_suffix(';')) {
        let own = layer(declared).unwrap_or_else(|| panic!("module {declared} has no layer in LAYERS"));
        let mut files = Vec::new();
        sources(&src.join(declared), &mut files);
        sources(&src.join(format!("{declared}.rs")), &mut files);
        assert!(!files.is_empty(), "no source for module {declared}");
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            for used in named_modules(&text) {
                match layer(&used) {
                    Some(l) if used == declared || l < own => {}
                    Some(_) => upward.push(format!("{}: {declared} uses crate::{used}", file.display())),
                    None => upward.push(format!("{}: crate::{used} is no module with a layer", file.display())),
                }
            }
        }
    }
    assert!(upward.is_empty(), "imports against the layers:\n{}", upward.join("\n"));
}

#[test]
fn module_names_are_read_from_code_not_comments() {
    let text = "use crate::qemu::Machine;\n// crate::scenario in a comment\nlet x = crate::sys::deadline::QMP_COMMAND;";
    assert_eq!(named_modules(text), ["qemu", "sys"]);
}
