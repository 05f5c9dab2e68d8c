//! The `app` workload of a Windows VM: a user-supplied VSS writer driven through the
//! recipe's hook ([`crate::windows::app`], `app-hook.ps1`). SQL Server Express is the one
//! it knows. With none in the image the scenario is SKIPPED ([`RunError::NoAppWriter`]),
//! never passed and never failed. With one, the runner checks what the Linux guest's app
//! checks, in SQL Server's own terms:
//!
//! - `app-writes-on`: after the backup (and after a failed one) the writer commits rows;
//! - `app-froze-by-vss` (Child VM Snapshot): SQL Server logged 3197 "I/O is frozen on
//!   database quiesce" and then 3198 "I/O was resumed" since the writer started: its VSS
//!   writer took part in the freeze (a PowerShell appender has no writer, so it cannot);
//! - `app-consistent` (restore): `DBCC CHECKDB` of the restored database is clean.
//!
//! NEVER RUN AGAINST A LIVE WINDOWS GUEST, NOR AGAINST SQL SERVER. `windows_tests.rs` drives
//! it with a scripted agent answering the hook as SQL Server would (and as a guest without
//! it would); the hook itself, SQL Server's events and CHECKDB are untried.

use std::time::{Duration, Instant};

use super::super::format::{Filesystem, VmSpec};
use super::ctx::{Vm, PROGRESS};
use super::error::{on, At, RunError};
use crate::backup::Method;
use crate::qemu::GuestAgent;
use crate::scenario::Report;
use crate::windows::app::{self, Writer};
use crate::windows::workload as win;

/// Where the app keeps its database: the root of the data disk `disk` (`D:\`), or
/// `C:\quiesce-app` for `app = "root"`.
fn app_dir(spec: &VmSpec, disk: &str) -> Result<String, RunError> {
    if disk == "root" {
        return Ok("C:\\quiesce-app".into());
    }
    let name = spec.name.get_ref();
    let ntfs = spec.disks.iter().map(|d| d.get_ref()).filter(|d| d.filesystem == Filesystem::Ntfs);
    let letter = ntfs.enumerate().find(|(_, d)| d.name.get_ref() == disk).and_then(|(i, _)| win::drive_letter(i));
    let letter = letter.ok_or(RunError::NotForWindows {
        at: At::vm(name, "preparing a Windows VM"),
        what: "an app on a data disk that is not NTFS",
    })?;
    Ok(format!("{letter}:\\"))
}

/// Finds the VSS writer and starts the app on `disk`. Returns its folder and the guest's
/// time it started; with no writer in the image, [`RunError::NoAppWriter`] (a skip).
pub(super) async fn start_app(spec: &VmSpec, agent: &GuestAgent, disk: &str) -> Result<(String, String), RunError> {
    let name = spec.name.get_ref();
    let dir = app_dir(spec, disk)?;
    match app::detect(agent).await.map_err(on(name, "looking for the app's VSS writer"))? {
        Writer::Absent => Err(RunError::NoAppWriter { vm: name.clone() }),
        Writer::SqlServer { .. } => {
            let since = app::start(agent, &dir).await.map_err(on(name, "starting the app"))?;
            Ok((dir, since))
        }
    }
}

/// Whether the writer commits rows on: polled until the count grows, or [`PROGRESS`] passes.
pub(super) async fn app_writes_on(vm: &Vm, agent: &GuestAgent) -> Result<(bool, String), RunError> {
    let first = app::rows(agent).await.map_err(vm.fail("reading the app's rows"))?;
    let until = Instant::now() + PROGRESS;
    loop {
        let now = app::rows(agent).await.map_err(vm.fail("reading the app's rows"))?;
        if now > first {
            return Ok((true, format!("SQL Server commits on: {first} then {now} rows")));
        }
        if Instant::now() > until {
            return Ok((false, format!("no row committed in {}s (stuck at {first})", PROGRESS.as_secs())));
        }
        // A poll of the writer's progress, not a synchronisation: it inserts every 20 ms.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// After a backup that succeeded: the writer writes on, and, for a Child VM Snapshot, its
/// VSS writer logged the freeze and the resume.
pub(super) async fn after_backup(
    vm: &Vm,
    agent: &GuestAgent,
    method: Method,
    report: &mut Report,
) -> Result<(), RunError> {
    let name = vm.name();
    if method == Method::ChildSnapshot {
        let events = app::events(agent).await.map_err(vm.fail("reading SQL Server's freeze events"))?;
        let since = vm.app_since.as_deref().unwrap_or("");
        let (ok, detail) = app::froze_and_resumed(&events, since);
        report.check(name, "app-froze-by-vss", ok, detail);
    }
    let (moves, detail) = app_writes_on(vm, agent).await?;
    report.check(name, "app-writes-on", moves, detail);
    Ok(())
}

/// `app-consistent` in a restored guest: `DBCC CHECKDB` of the restored database.
pub(super) async fn consistent(vm: &Vm, agent: &GuestAgent, rname: &str, report: &mut Report) -> Result<(), RunError> {
    let Some(dir) = &vm.app else { return Ok(()) };
    let verdict = app::check(agent, dir).await.map_err(on(rname, "DBCC CHECKDB in the restored guest"))?;
    let detail = match &verdict {
        None => format!("DBCC CHECKDB('{}') clean on the restored {dir}", app::DATABASE),
        Some(said) => format!("DBCC CHECKDB('{}'): {said}", app::DATABASE),
    };
    report.check(vm.name(), "app-consistent", verdict.is_none(), detail);
    Ok(())
}
