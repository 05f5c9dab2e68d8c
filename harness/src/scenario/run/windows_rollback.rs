//! Rollback cycles of a Windows VM: what `rollback.rs` does in the Linux guest, done in the
//! Windows one. The cycle itself (backups, restores to a new VM and in place, the block and
//! manifest comparisons on the host) is the same code for both; only what touches the
//! guest differs:
//!
//! - the data is changed by PowerShell on the data disk's drive letter (a file added, a
//!   seeded one appended to, another removed, a folder made), then the volume is flushed
//!   (`Write-VolumeCache`), as `sync` does in Linux;
//! - a fresh boot (a Child VM Snapshot restored) waits for the agent and VSS, then gives
//!   the data disks their letters again, in place of mounting them;
//! - the boot id, the journal (read on the host) and the workloads are the Windows ones;
//! - the deadlines are Windows': a VSS freeze may take 90 s, a shutdown minutes.
//!
//! NEVER RUN AGAINST A LIVE WINDOWS GUEST. `windows_rollback_tests.rs` drives the cycles
//! through the real runner with a scripted agent; see there for what that cannot show.

use std::time::Duration;

use super::ctx::Vm;
use super::error::{At, Cause, RunError};
use crate::qemu::{GuestAgent, Machine};
use crate::windows::deadline;
use crate::windows::workload::{self as win, ps_quote};
use crate::workload::JournalCheck;

/// How long a Windows guest gets to power off: it stops its services first.
pub const SHUTDOWN: Duration = deadline::SHUTDOWN;
/// The freeze and thaw around reading a running VM's disk: VSS's deadlines.
pub const FREEZE: Duration = deadline::FREEZE;
pub const THAW: Duration = deadline::THAW;

/// The drive letter of data disk `disk` of the VM.
fn root_of(vm: &Vm, disk: &str, at: impl Fn() -> At) -> Result<String, RunError> {
    let letter = super::windows::letter(&vm.spec, disk)
        .ok_or(RunError::NotForWindows { at: at(), what: "rollback cycles on a data disk that is not NTFS" })?;
    Ok(format!("{letter}:\\"))
}

/// The PowerShell that changes the data disk at `root` for cycle `n`: adds `rollback-N.txt`,
/// appends a line to `change`, removes `remove`, makes folder `rollback-N`, and flushes the
/// volume. Paths are the data disk's, `/` separated, as the scenario seeds them.
pub fn mutate_script(root: &str, n: u32, change: &str, remove: &str) -> String {
    let p = |rel: &str| ps_quote(&format!("{root}{}", rel.replace('/', "\\")));
    let letter = root.chars().next().unwrap_or('D');
    format!(
        "[IO.File]::WriteAllText({added}, \"added in cycle {n}`n\"); \
         [IO.File]::AppendAllText({change}, \"changed in cycle {n}`n\"); \
         Remove-Item -LiteralPath {remove}; \
         New-Item -ItemType Directory -Path {dir} | Out-Null; \
         Write-VolumeCache -DriveLetter {letter}",
        added = p(&format!("rollback-{n}.txt")),
        change = p(change),
        remove = p(remove),
        dir = p(&format!("rollback-{n}")),
    )
}

/// Changes the data as `mutate_script` says, in the guest.
pub(super) async fn mutate(
    vm: &Vm,
    agent: &GuestAgent,
    disk: &str,
    n: u32,
    change: &str,
    remove: &str,
    at: impl Fn() -> At,
) -> Result<(), RunError> {
    let root = root_of(vm, disk, &at)?;
    crate::qemu::winexec::powershell(agent, &mutate_script(&root, n, change, remove), deadline::POWERSHELL)
        .await
        .map(drop)
        .map_err(|e| e.at(at()))
}

/// After a fresh boot: the data disks get their drive letters again (Windows keeps them by
/// volume, so this is most often nothing to do).
pub(super) async fn after_fresh_boot(vm: &Vm, agent: &GuestAgent, machine: &str) -> Result<(), RunError> {
    super::windows::assign_letters(&vm.spec, agent, machine).await
}

/// The journal on machine `m`'s data disk, read on the host (the guest flushes it first).
pub(super) async fn journal(vm: &Vm, m: &Machine, path: &str) -> Result<JournalCheck, RunError> {
    super::windows::journal_of(vm, m, path).await
}

/// The boot id of a Windows guest.
pub(super) async fn boot_id(agent: &GuestAgent, at: impl Fn() -> At) -> Result<String, RunError> {
    win::boot_id(agent).await.map_err(|e| e.at(at()))
}

/// Starts the VM's workloads again after a fresh boot.
pub(super) async fn restart_workloads(vm: &Vm, agent: &GuestAgent, at: impl Fn() -> At) -> Result<(), RunError> {
    if *vm.spec.workload.counter.get_ref() {
        win::start_counter(agent).await.map_err(|e| e.at(at()))?;
    }
    if let Some(path) = &vm.journal {
        win::start_journal(agent, path).await.map_err(|e| e.at(at()))?;
    }
    if let Some(dir) = &vm.app {
        crate::windows::app::start(agent, dir).await.map(drop).map_err(|e| e.at(at()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_cycles_changes_are_quoted_for_powershell_on_the_data_disks_letter() {
        let s = super::mutate_script("D:\\", 2, "a.txt", "it's/c.txt");
        assert!(s.contains("WriteAllText('D:\\rollback-2.txt', \"added in cycle 2`n\")"), "{s}");
        assert!(s.contains("AppendAllText('D:\\a.txt', \"changed in cycle 2`n\")"), "{s}");
        assert!(s.contains("Remove-Item -LiteralPath 'D:\\it''s\\c.txt'"), "{s}");
        assert!(s.contains("New-Item -ItemType Directory -Path 'D:\\rollback-2'"), "{s}");
        assert!(s.ends_with("Write-VolumeCache -DriveLetter D"), "{s}");
    }
}
