//! Scenarios with a Windows VM (`image = "windows"`). With no Windows image built, such a
//! scenario is SKIPPED, with the command that builds the image: never passed, never
//! failed. The summary, the JSON report (`skipped`) and the test harness count it so.
//!
//! With an image built, it runs: the VM boots from the cached image under its own overlay
//! ([`crate::windows::guest`]: the install's machine and firmware, ready when its agent
//! answers and VSS is ready, under the Windows deadlines), its data disks get fixed drive
//! letters (`D:`, `E:`... in the scenario's order), its workloads are the recipe's
//! PowerShell scripts run through [`crate::qemu::winexec`] ([`crate::windows::workload`]),
//! the journal's "nothing lost" is read from the data disk on the host (the guest flushes
//! the volume, the VM is paused, the image is read with quiesce's own NTFS reader, the VM
//! continues), and a restore is checked with `chkdsk` (read-only) in place of `e2fsck`.
//! The `app` workload (a user-supplied VSS writer: SQL Server) is in `windows_app.rs`.
//!
//! NEVER RUN AGAINST A LIVE WINDOWS GUEST: no Windows guest can run where this was written.
//! `windows_tests.rs` drives this path through the real runner with a scripted agent
//! standing in for Windows' qemu-ga over a real QEMU that boots no OS; what a scripted
//! agent cannot show (PowerShell, VSS, chkdsk, NTFS written by Windows) is untried.

use std::path::PathBuf;

use super::super::format::{AgentState, Check, FaultKind, Filesystem, Scenario, VmSpec, VmState};
use super::ctx::{RunCtx, Vm, PROGRESS};
use super::error::{on, At, Cause, RunError};
use crate::backup::Method;
use crate::image::fsread::ntfs_file;
use crate::qemu::{DiskFormat, GuestAgent, Machine};
use crate::sys::deadline;
use crate::testguest::TestGuest;
use crate::verify::{guest_windows, Restored};
use crate::windows::workload::{self as win, JOURNAL_FILE, JOURNAL_MAX};
use crate::workload::{self, JournalCheck};

/// Why the scenario cannot run here, if it cannot: it has a Windows VM and no Windows image
/// is built. (An `app` workload with no VSS writer in the image is skipped too, but only
/// the booted guest can say so: see `windows_app.rs`.)
pub fn skip_reason(s: &Scenario) -> Option<String> {
    // A Windows image the user brings needs no built one.
    if !s.vms().any(|v| v.is_windows() && v.image.get_ref().own().is_none()) {
        return None;
    }
    match crate::windows::guest::image() {
        None => Some(format!(
            "no Windows guest image is built; build it on a KVM host with `{}` (20-60 min), then run scenarios/windows/",
            crate::image::windows::BUILD_COMMAND
        )),
        Some(_) => None,
    }
}

/// The drive letter of data disk `disk` of a Windows VM: its place among the VM's NTFS
/// disks (`D:` first).
pub(super) fn letter(spec: &VmSpec, disk: &str) -> Option<char> {
    let ntfs = spec.disks.iter().map(|d| d.get_ref()).filter(|d| d.filesystem == Filesystem::Ntfs);
    ntfs.enumerate().find(|(_, d)| d.name.get_ref() == disk).and_then(|(i, _)| win::drive_letter(i))
}

fn not_for_windows(name: &str, what: &'static str) -> RunError {
    RunError::NotForWindows { at: At::vm(name, "preparing a Windows VM"), what }
}

/// Gives every NTFS data disk its drive letter (idempotent: a restored guest keeps them).
pub(super) async fn assign_letters(spec: &VmSpec, agent: &GuestAgent, name: &str) -> Result<(), RunError> {
    for d in spec.disks.iter().map(|d| d.get_ref()).filter(|d| d.filesystem == Filesystem::Ntfs) {
        let disk = d.name.get_ref();
        let l = letter(spec, disk).ok_or_else(|| not_for_windows(name, "more than 23 NTFS data disks"))?;
        win::assign_letter(agent, disk, l).await.map_err(on(name, "giving a data disk its drive letter"))?;
    }
    Ok(())
}

/// Sets a booted Windows VM up as the scenario declares it: drive letters, the boot id,
/// the counter and the journal, the agent stopped, the run paused.
pub(super) async fn prepare(ctx: &RunCtx<'_>, spec: &VmSpec, guest: TestGuest, dir: PathBuf) -> Result<Vm, RunError> {
    let name = spec.name.get_ref();
    let wants = |c| ctx.s.file.restore.as_ref().is_some_and(|r| r.checks.get_ref().contains(&c));
    if wants(Check::RootFromBackup) || wants(Check::FsckClean) {
        return Err(not_for_windows(
            name,
            "root-from-backup and fsck-clean (e2fsck on the host); use guest-fsck (chkdsk)",
        ));
    }
    let agent = guest.machine.agent().map_err(on(name, "the guest agent"))?;
    assign_letters(spec, agent, name).await?;
    let boot_id = Some(win::boot_id(agent).await.map_err(on(name, "reading the boot id"))?);
    let mut counter_before = None;
    if *spec.workload.counter.get_ref() {
        win::start_counter(agent).await.map_err(on(name, "starting the counter"))?;
        counter_before =
            Some(win::wait_counter_above(agent, 0, PROGRESS).await.map_err(on(name, "reading the counter"))?);
    }
    let mut journal = None;
    if let Some(disk) = &spec.workload.journal {
        let l = letter(spec, disk.get_ref())
            .ok_or_else(|| not_for_windows(name, "a journal on a data disk that is not NTFS"))?;
        let path = win::journal_path(l);
        win::start_journal(agent, &path).await.map_err(on(name, "starting the journal"))?;
        journal = Some(path);
    }
    let (app, app_since) = match &spec.workload.app {
        Some(disk) => {
            let (dir, since) = super::windows_app::start_app(spec, agent, disk.get_ref()).await?;
            (Some(dir), Some(since))
        }
        None => (None, None),
    };
    if spec.agent == AgentState::Stopped {
        win::stop_agent(agent, deadline::AGENT_COMMAND).await.map_err(on(name, "stopping the QEMU-GA service"))?;
    }
    if spec.state == VmState::Paused {
        super::setup::pause(&guest.machine).await?;
    }
    Ok(Vm {
        spec: spec.clone(),
        guest,
        dir,
        boot_id,
        counter_before,
        journal,
        journal_before: None,
        app,
        app_since,
        root_token: None,
    })
}

/// Arms the faults that live in a Windows guest: VSS's provider unregistered. The Linux
/// guest's freeze-hook faults have no Windows form.
pub(super) async fn arm_guest(s: &Scenario, vm: &Vm) -> Result<(), RunError> {
    let name = vm.name();
    let linux_only = [
        FaultKind::AgentHangsInFreeze,
        FaultKind::AgentFreezeFails,
        FaultKind::AgentStopsAfterFreeze,
        FaultKind::TruncateInRestore,
    ];
    if linux_only.iter().any(|k| s.has_fault(name, *k)) {
        return Err(not_for_windows(name, "freeze-hook and in-guest truncation faults (Linux guest only)"));
    }
    if s.has_fault(name, FaultKind::VssProviderUnregistered) {
        let agent = vm.guest.machine.agent().map_err(vm.fail("the guest agent"))?;
        win::unregister_vss_provider(agent, crate::windows::deadline::BOOT)
            .await
            .map_err(vm.fail("unregistering the VSS provider"))?;
    }
    Ok(())
}

/// The counter now, from either guest.
pub(super) async fn read_counter(vm: &Vm, agent: &GuestAgent) -> Result<u64, RunError> {
    if vm.spec.is_windows() {
        win::read_counter(agent).await.map_err(vm.fail("reading the counter"))
    } else {
        workload::read_counter(agent).await.map_err(vm.fail("reading the counter"))
    }
}

/// Waits until the counter of either guest is above `value`.
pub(super) async fn wait_counter_above(vm: &Vm, agent: &GuestAgent, value: u64) -> Result<u64, RunError> {
    if vm.spec.is_windows() {
        win::wait_counter_above(agent, value, PROGRESS).await.map_err(vm.fail("waiting for the counter"))
    } else {
        workload::wait_counter_above(agent, value, PROGRESS).await.map_err(vm.fail("waiting for the counter"))
    }
}

/// The journal as the live VM's disk holds it: for Linux, read in the guest with its caches
/// dropped; for Windows, read on the host from the data disk's image.
pub(super) async fn journal_now(vm: &Vm, path: &str) -> Result<JournalCheck, RunError> {
    let m = &vm.guest.machine;
    if !vm.spec.is_windows() {
        let agent = m.agent().map_err(vm.fail("the guest agent"))?;
        return workload::check_journal(agent, path).await.map_err(vm.fail("checking the journal"));
    }
    journal_of(vm, m, path).await
}

/// A Windows VM's journal as machine `m` (the VM, or a restore of it) holds it on its data
/// disk, read on the host.
pub(super) async fn journal_of(vm: &Vm, m: &Machine, path: &str) -> Result<JournalCheck, RunError> {
    let agent = m.agent().map_err(on(m.name(), "the guest agent"))?;
    let disk = vm.spec.workload.journal.as_ref().map(|d| d.get_ref().as_str()).unwrap_or("");
    let d = m.config().disks.iter().find(|d| d.node_name == disk).ok_or_else(|| RunError::NoDisk {
        at: At::vm(m.name(), "reading the journal on the host"),
        place: super::DiskPlace::Vm,
        disk: disk.to_owned(),
    })?;
    journal_from_host(m, agent, path, d.path.clone(), d.format).await
}

/// Reads a Windows guest's journal from the disk, bypassing the guest's cache: the guest
/// flushes the journal's volume, QEMU is paused (which drains and flushes its own caches
/// into the image file), the image is read on the host (`qemu-img convert -U`, then
/// quiesce's NTFS reader), and QEMU continues, whatever the read gave.
async fn journal_from_host(
    m: &Machine,
    agent: &GuestAgent,
    path: &str,
    image: PathBuf,
    format: DiskFormat,
) -> Result<JournalCheck, RunError> {
    let name = m.name();
    win::flush_journal(agent, path).await.map_err(on(name, "flushing the journal's volume"))?;
    let was_running = crate::backup::runstate::query(m).await.map_err(on(name, "query-status"))?.running;
    if was_running {
        super::setup::pause(m).await?;
    }
    let read = tokio::task::spawn_blocking(move || {
        ntfs_file::read_from_image(&image, format, &format!("/{JOURNAL_FILE}"), JOURNAL_MAX)
    })
    .await;
    // Never leave the guest paused: it continues before any error of the read is looked at.
    if was_running {
        crate::verify::restore::resume(m).await.map_err(on(name, "continuing after the journal was read"))?;
    }
    let bytes = match read {
        Ok(r) => r.map_err(on(name, "reading the journal on the host"))?,
        Err(thread) => return Err(thread.at(At::vm(name, "reading the journal on the host"))),
    };
    Ok(win::journal_verdict(&bytes))
}

/// Boots a restored Windows VM (a Child VM Snapshot restore, left stopped before its first
/// instruction) until its agent answers and VSS is ready.
pub(super) async fn boot_restored(m: &mut Machine) -> Result<(), RunError> {
    let name = m.name().to_owned();
    crate::verify::restore::resume(m).await.map_err(on(&name, "starting the restored VM"))?;
    crate::windows::ready::wait_ready(m, crate::windows::deadline::BOOT).await.map_err(|error| RunError::WindowsBoot {
        at: At::vm(&name, "booting the restored VM"),
        source: crate::windows::guest::WindowsGuestError::NotReady {
            minutes: crate::windows::deadline::BOOT.as_secs() / 60,
            error,
        },
    })
}

/// The checks inside a restored Windows guest: `chkdsk` of its NTFS data disks (a fresh
/// boot), the boot and counter a saved state continues, the seeded files read back in the
/// guest, and the journal read back from the restored disk on the host. `agent` is the
/// restored guest's, answering already.
pub(super) async fn restored_checks(
    ctx: &mut RunCtx<'_>,
    vm: &Vm,
    method: Method,
    checks: &[Check],
    restored: &Restored,
    agent: &GuestAgent,
) -> Result<(), RunError> {
    let name = vm.name();
    let rname = restored.machine.name();
    if method == Method::ChildSnapshot {
        assign_letters(&vm.spec, agent, rname).await?;
    }
    for check in checks {
        match check {
            Check::GuestFsck if method == Method::ChildSnapshot => {
                let mut bad = Vec::new();
                let mut n = 0;
                for d in vm.spec.disks.iter().map(|d| d.get_ref()).filter(|d| d.filesystem == Filesystem::Ntfs) {
                    let Some(l) = letter(&vm.spec, d.name.get_ref()) else { continue };
                    n += 1;
                    let r = guest_windows::chkdsk_readonly(agent, &format!("{l}:"), crate::windows::deadline::CHKDSK)
                        .await
                        .map_err(on(rname, "chkdsk in the restored guest"))?;
                    if !r.clean() {
                        bad.push(format!("{} ({}, {}): {}", d.name.get_ref(), r.volume, r.exit, r.tail));
                    }
                }
                let detail = if bad.is_empty() {
                    format!("{n} NTFS data disks clean (chkdsk, read-only)")
                } else {
                    bad.join("; ")
                };
                ctx.report.check(name, "guest-fsck", bad.is_empty(), detail);
            }
            Check::SameBoot if method == Method::SavedState => {
                let now = win::boot_id(agent).await.map_err(on(rname, "reading the boot id"))?;
                let same = Some(&now) == vm.boot_id.as_ref();
                let detail = if same { "boot id unchanged".into() } else { format!("boot id {now}") };
                ctx.report.check(name, "same-boot", same, detail);
            }
            Check::CounterContinues if method == Method::SavedState && vm.counter_before.is_some() => {
                let before = vm.counter_before.unwrap_or(0);
                let c = win::read_counter(agent).await.map_err(on(rname, "reading the counter"))?;
                let moves = win::wait_counter_above(agent, c, PROGRESS).await.is_ok();
                let detail = format!("{c} >= {before} read before the backup, and moving: {moves}");
                ctx.report.check(name, "counter-continues", c >= before && moves, detail);
            }
            Check::FilesMatchSeed => {
                let mut bad = Vec::new();
                let mut n = 0;
                for d in vm.spec.disks.iter().map(|d| d.get_ref()).filter(|d| d.filesystem == Filesystem::Ntfs) {
                    let Some(l) = letter(&vm.spec, d.name.get_ref()) else { continue };
                    for (path, want) in &d.files {
                        n += 1;
                        let file = format!("{l}:\\{}", path.replace('/', "\\"));
                        let got = win::read_file(agent, &file).await;
                        if got.as_deref().ok() != Some(want.as_bytes()) {
                            bad.push(format!("{}:{path}", d.name.get_ref()));
                        }
                    }
                }
                ctx.report.check(name, "files-match-seed", bad.is_empty(), format!("{n} files, differing: {bad:?}"));
            }
            Check::JournalIntact => {
                let (Some(path), Some(disk)) = (&vm.journal, &vm.spec.workload.journal) else { continue };
                let image = restored.disks.iter().find(|(n, _)| n == disk.get_ref()).map(|(_, p)| p.clone());
                let image = image.ok_or_else(|| RunError::NoDisk {
                    at: At::vm(rname, "reading the restored journal"),
                    place: super::DiskPlace::Restored,
                    disk: disk.get_ref().clone(),
                })?;
                let j = journal_from_host(&restored.machine, agent, path, image, DiskFormat::Qcow2).await?;
                let detail = format!(
                    "{} lines read from the restored disk on the host, first break {:?}",
                    j.lines, j.first_break
                );
                ctx.report.check(name, "journal-intact", j.intact(), detail);
            }
            Check::AppConsistent => super::windows_app::consistent(vm, agent, rname, ctx.report).await?,
            // Checked on the host or before the guest ran, refused at setup, or not
            // applying to this restore (a fresh boot continues no boot, a saved state has
            // nothing to fsck before mounting).
            _ => {}
        }
    }
    Ok(())
}
