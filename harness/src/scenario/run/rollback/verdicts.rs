//! What a rollback cycle reports: the differences and the block comparisons as check
//! details, and whether the changes the cycle made show on the disk. Pure functions of what
//! was read, kept apart from the steps that read it.

use crate::image::manifest::Change;
use crate::verify::blockcmp::BlockComparison;

/// Differences listed in a check's detail before the rest are only counted.
const MAX_LINES: usize = 20;

/// A change the cycle makes to the data, as the manifest comparison must show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Made {
    Added,
    Changed,
    Removed,
}

/// The differences as `quiesce diff` prints them, the first few of them.
pub(super) fn changes_text(changes: &[Change]) -> String {
    if changes.is_empty() {
        return "no differences".into();
    }
    let mut lines: Vec<String> = changes.iter().take(MAX_LINES).map(|c| c.to_string()).collect();
    if changes.len() > MAX_LINES {
        lines.push(format!("... and {} more", changes.len() - MAX_LINES));
    }
    lines.join("; ")
}

/// Whether all restored disks are identical to the backup's, and a detail naming every
/// difference's offset.
pub(super) fn blocks_text(results: &[(String, BlockComparison)]) -> (bool, String) {
    let differ: Vec<String> =
        results.iter().filter(|(_, r)| !r.identical).map(|(disk, r)| format!("disk {disk}: {r}")).collect();
    if differ.is_empty() {
        let names: Vec<&str> = results.iter().map(|(d, _)| d.as_str()).collect();
        (true, format!("{} identical to the backup", names.join(", ")))
    } else {
        (false, differ.join("; "))
    }
}

/// Whether every change the cycle made shows among the differences between the backup
/// point and the changed disk (and there are some), and a detail naming what was not seen.
pub(super) fn made_seen(made: &[(Made, String)], changes: &[Change]) -> (bool, String) {
    let missing: Vec<String> = made
        .iter()
        .filter(|(how, path)| {
            !changes.iter().any(|ch| {
                ch.path() == Some(path.as_str())
                    && matches!(
                        (how, ch),
                        (Made::Added, Change::Added { .. })
                            | (Made::Changed, Change::Changed { .. })
                            | (Made::Removed, Change::Removed { .. })
                    )
            })
        })
        .map(|(how, path)| format!("{how:?} {path}").to_lowercase())
        .collect();
    let detail = if missing.is_empty() {
        changes_text(changes)
    } else {
        format!("not seen on the disk: {}; the differences: {}", missing.join(", "), changes_text(changes))
    };
    (!changes.is_empty() && missing.is_empty(), detail)
}
