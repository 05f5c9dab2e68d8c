//! Scenarios with a Windows VM (`image = "windows"`). With no Windows image built, such a
//! scenario is SKIPPED, with the command that builds the image: never passed, never
//! failed. The summary, the JSON report (`skipped`) and the test harness count it so.
//!
//! With an image built, the scenario is still skipped for now, saying why: booting the
//! Windows guest in a scenario (firmware boot from the cached disk, readiness with VSS,
//! the PowerShell workloads, chkdsk on restore) is not wired into the runner yet. The
//! pieces it would use are in [`crate::windows`], [`crate::qemu::winexec`],
//! [`crate::backup::vss`] and the recipe's workloads; none has met a live Windows guest.

use super::super::format::Scenario;
use crate::image::windows::{cache, BUILD_COMMAND};

/// Why the scenario cannot run here, if it cannot: it has a Windows VM and no Windows image
/// is built, or the runner cannot boot one yet.
pub fn skip_reason(s: &Scenario) -> Option<String> {
    if !s.vms().any(|v| v.is_windows()) {
        return None;
    }
    Some(match cache::latest() {
        None => format!(
            "no Windows guest image is built; build it on a KVM host with `{BUILD_COMMAND}` (20-60 min), then run scenarios/windows/"
        ),
        Some(img) => format!(
            "a Windows guest image is built ({}), but this quiesce cannot yet boot it in a scenario (see scenario/run/windows.rs)",
            img.dir.display()
        ),
    })
}
