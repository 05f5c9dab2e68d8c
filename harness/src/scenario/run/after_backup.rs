//! The checks after a backup job, on the live VMs: each VM is back as it was. After a
//! backup that succeeded, every VM runs as before, on its own disks, its workloads on with
//! nothing lost; after one that was refused or failed, nothing at all changed: no backup
//! folder, no overlay, every VM in its run state, thawed, its writers writing.

use std::path::Path;
use std::time::{Duration, Instant};

use qapi::qga::GuestFsfreezeStatus;

use super::super::format::{AgentState, FaultKind};
use super::super::report::{JournalReport, Report};
use super::ctx::{label, RunCtx, Vm, PROGRESS};
use super::error::{on, RunError};
use crate::backup::{runstate, Method};
use crate::qemu::{GuestAgent, Machine};
use crate::sys::deadline;
use crate::workload::{self, AppStatus};

/// The VM is back as it was: same run state, disks active and its own (no overlay left),
/// workloads running on with nothing lost. `until_continued`: the disks the backup says
/// its QEMU left inactive until the VM is continued (a paused VM, QEMU before 10.0).
pub(super) async fn after_backup_checks(
    vm: &Vm,
    method: Method,
    until_continued: &[String],
    report: &mut Report,
) -> Result<(), RunError> {
    let m = &vm.guest.machine;
    let name = vm.name();
    let st = runstate::query(m).await.map_err(vm.fail("query-status"))?;
    if let Some(r) = report.vm_mut(name) {
        r.state_after_backup = Some(st.label().into());
    }
    let want = label(vm.spec.state);
    report.check(
        name,
        "state-restored-after-backup",
        st.label() == want,
        format!("{want} before, {} after ({})", st.label(), st.status),
    );
    let inactive = runstate::inactive_nodes(m).await.map_err(vm.fail("query block nodes"))?;
    if until_continued.is_empty() {
        report.check(name, "disks-active-after-backup", inactive.is_empty(), format!("inactive: {inactive:?}"));
    } else {
        // What the backup says must be what QEMU shows, on a VM still paused.
        let (mut said, mut seen) = (until_continued.to_vec(), inactive.clone());
        said.sort();
        seen.sort();
        report.check(
            name,
            "disks-inactive-until-continued",
            said == seen && !st.running,
            format!("the backup says {said:?} stay inactive until the VM is continued; inactive: {seen:?}"),
        );
    }
    if method == Method::ChildSnapshot {
        let (ok, detail) = own_images(m).await?;
        report.check(name, "overlays-merged", ok, detail);
    }
    if !st.running || vm.spec.agent == AgentState::Stopped {
        return Ok(());
    }
    let agent = m.agent().map_err(vm.fail("the guest agent"))?;
    if vm.counter_before.is_some() {
        let now = super::windows::read_counter(vm, agent).await?;
        let moved = super::windows::wait_counter_above(vm, agent, now).await;
        report.check(
            name,
            "runs-on-after-backup",
            moved.is_ok(),
            format!("counter moved on from {now}: {}", moved.is_ok()),
        );
    }
    if let Some(path) = &vm.journal {
        let (ok, detail) = journal_kept(vm, path, report).await?;
        report.check(name, "nothing-lost-after-backup", ok, detail);
    }
    if vm.spec.is_windows() && vm.app.is_some() {
        super::windows_app::after_backup(vm, agent, method, report).await?;
    }
    Ok(())
}

/// A refused or failed backup must leave everything as it was: no backup (not even a
/// partial folder), no overlays, every VM in its run state, thawed, nothing lost.
/// `until_continued`: the VMs put back with their disks inactive until they are continued
/// (paused, on a QEMU before 10.0).
pub(super) async fn nothing_changed(
    ctx: &mut RunCtx<'_>,
    vms: &[Vm],
    backup_path: &Path,
    until_continued: &[String],
) -> Result<(), RunError> {
    let report = &mut *ctx.report;
    let parent = backup_path.parent().unwrap_or(Path::new("."));
    let partial = names_in(parent, |n| n.contains("backup"));
    report.check("*", "no-backup-written", partial.is_empty(), format!("{partial:?}"));
    for vm in vms {
        let m = &vm.guest.machine;
        let name = vm.name();
        if ctx.s.has_fault(name, FaultKind::QemuKilledAfterPrepare) {
            let mut dead = m.qmp().is_closed();
            if !dead {
                dead =
                    m.qmp().execute_raw("query-status", serde_json::Value::Null, deadline::QMP_COMMAND).await.is_err();
            }
            report.check(name, "killed-vm-reported", dead, "its QEMU was killed by the fault; it cannot be put back");
            continue;
        }
        let overlays =
            names_in(&vm.snapshot_dir(ctx.s), |n| n.ends_with("-overlay.qcow2") || n.ends_with("-merge-reserve"));
        report.check(name, "no-overlays-left", overlays.is_empty(), format!("{overlays:?}"));
        let (own, detail) = own_images(m).await?;
        report.check(name, "on-its-own-images", own, detail);
        let st = runstate::query(m).await.map_err(vm.fail("query-status"))?;
        let want = label(vm.spec.state);
        report.check(name, "state-unchanged", st.label() == want, format!("{want} before, {} after", st.label()));
        let inactive = runstate::inactive_nodes(m).await.map_err(vm.fail("query block nodes"))?;
        if until_continued.iter().any(|v| v == name) {
            let detail =
                format!("put back paused with its disks inactive until it is continued; inactive: {inactive:?}");
            report.check(name, "disks-inactive-until-continued", !inactive.is_empty() && !st.running, detail);
        } else {
            report.check(name, "disks-active", inactive.is_empty(), format!("inactive: {inactive:?}"));
        }
        if let Some(r) = report.vm_mut(name) {
            r.state_after_backup = Some(st.label().into());
        }
        if !st.running || vm.spec.agent == AgentState::Stopped {
            continue;
        }
        let agent = m.agent().map_err(vm.fail("the guest agent"))?;
        let status = agent
            .execute_within(qapi::qga::guest_fsfreeze_status {}, deadline::AGENT_COMMAND)
            .await
            .map_err(vm.fail("guest-fsfreeze-status"))?;
        let thawed = status == GuestFsfreezeStatus::thawed;
        report.check(name, "guest-thawed", thawed, format!("guest-fsfreeze-status: {status:?}"));
        if let Some(path) = &vm.journal {
            let (ok, detail) = journal_kept(vm, path, report).await?;
            report.check(name, "nothing-lost", ok, detail);
        }
        if let Some(dir) = &vm.app {
            let (moves, detail) = if vm.spec.is_windows() {
                super::windows_app::app_writes_on(vm, agent).await?
            } else {
                app_commits_on(vm, agent, dir).await?
            };
            report.check(name, "app-writes-on", moves, detail);
        }
    }
    Ok(())
}

/// The names in folder `dir` that `keep` keeps (none if it cannot be read: then nothing
/// was left there either).
fn names_in(dir: &Path, keep: impl Fn(&str) -> bool) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| keep(n)).collect())
        .unwrap_or_default()
}

/// Whether the app's writer commits new transfers: a writer left paused by a freeze hook
/// (no thaw after a failed freeze) stands still.
async fn app_commits_on(vm: &Vm, agent: &GuestAgent, dir: &str) -> Result<(bool, String), RunError> {
    let transfers = || async {
        let status = workload::app_status(agent, dir).await.map_err(vm.fail("reading the app's status"))?;
        Ok::<_, RunError>((matches!(status, AppStatus::Running { .. }), status.transfers().unwrap_or(0)))
    };
    let (running, first) = transfers().await?;
    if !running {
        return Ok((false, format!("the writer is not running ({first} transfers)")));
    }
    let deadline = Instant::now() + PROGRESS;
    loop {
        let (_, now) = transfers().await?;
        if now > first {
            return Ok((true, "the writer commits on".into()));
        }
        if Instant::now() > deadline {
            return Ok((false, format!("no transfer committed in {}s (stuck at {first})", PROGRESS.as_secs())));
        }
        // A poll, not a synchronisation: the writer commits every few ms when it runs.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Reads the journal back from the VM's disks after the job: every line written before it
/// must be there, in sequence, and so must every line written during it (the sequence has
/// no gap up to the last line read). The count lost goes into the report and the fixture.
async fn journal_kept(vm: &Vm, path: &str, report: &mut Report) -> Result<(bool, String), RunError> {
    let j = super::windows::journal_now(vm, path).await?;
    let before = vm.journal_before.unwrap_or(0);
    let lost = j.lost_of(before);
    if let Some(r) = report.vm_mut(vm.name()) {
        r.journal = Some(JournalReport { before_job: vm.journal_before, read_back: j.lines, lost });
    }
    let detail = format!(
        "{} lines read back from disk ({} written before the job), {lost} lost, first break {:?}",
        j.lines, before, j.first_break
    );
    Ok((j.intact() && lost == 0, detail))
}

/// True if `qdev` (query-block's QOM path of a block backend, or a device id) is the device
/// quiesce attached disk `node` to: the device with id `<node>-dev` (see `qemu::launch`),
/// or its backend, a child in the QOM tree under it.
fn held_by(qdev: &str, node: &str) -> bool {
    let id = format!("{node}-dev");
    qdev.split('/').any(|part| part == id)
}

/// True if every disk is back on its own image file and no overlay file is left beside it.
async fn own_images(m: &Machine) -> Result<(bool, String), RunError> {
    let blocks = m
        .qmp()
        .execute_within(qapi::qmp::query_block {}, deadline::QMP_COMMAND)
        .await
        .map_err(on(m.name(), "query-block"))?;
    let mut wrong = Vec::new();
    for d in &m.config().disks {
        let file = blocks
            .iter()
            .find(|b| b.qdev.as_deref().is_some_and(|q| held_by(q, &d.node_name)))
            .and_then(|b| b.inserted.as_ref())
            .map_or("?", |i| i.file.as_str());
        if Path::new(file) != d.path {
            wrong.push(format!("{} on {file}", d.node_name));
        }
    }
    Ok((wrong.is_empty(), if wrong.is_empty() { "every disk is on its own image".into() } else { wrong.join(", ") }))
}

#[cfg(test)]
mod tests {
    use super::held_by;

    #[test]
    fn a_disk_is_found_by_its_device_in_the_qom_path() {
        assert!(held_by("/machine/peripheral/data-dev/virtio-backend", "data"));
        assert!(held_by("data-dev", "data"));
        assert!(!held_by("/machine/peripheral/data-dev/virtio-backend", "dat"));
        assert!(!held_by("/machine/peripheral/xdata-dev/virtio-backend", "data"));
        assert!(!held_by("/machine/peripheral/root-dev/virtio-backend", "data"));
    }
}
