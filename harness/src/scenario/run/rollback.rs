//! Rollback cycles: back the VM up (the scenario's methods taken in turn), change the
//! guest's data, restore the backup to a new VM and then in place onto the VM's own disks,
//! and verify both against the backup point, over and over. The VM runs on from each
//! in-place restore into the next cycle, so drift would accumulate and show.
//!
//! A cycle proves, for both restores: every restored disk holds the backup's bytes before
//! the guest runs (blocks; a difference names its offset), and the data disk's files after
//! the guest ran equal the backup point's (manifests; a difference names its path). It also
//! proves that the data really changed in between, or it would prove nothing, and that a
//! Child VM Snapshot's filesystems were frozen clean (`fs-quiesced`).

use std::path::Path;
use std::time::Duration;

use super::super::format::{MethodChoice, RollbackSpec};
use super::super::report::{DiskReport, Report, RestoreReport};
use super::ctx::{RunCtx, Vm};
use super::disk_checks::{self, Pair};
use super::error::{io, At, Cause, DiskPlace, Interruption, RunError};
use super::faults::member;
use super::windows_rollback;
use crate::backup::set;
use crate::backup::{runstate, Backup, Method, VmBackup};
use crate::image::manifest::{self, Manifest};
use crate::qemu::exec::{self, ExecError};
use crate::qemu::{DiskFormat, GuestAgent, Machine};
use crate::sys::{deadline, shell_quote};
use crate::timeline::Timeline;
use crate::verify::{restore, RestoreError, RestoreOptions};
use crate::workload;
use verdicts::{blocks_text, changes_text, made_seen, Made};

mod verdicts;

/// One cycle: its number (from 1), and what every step of it reports against.
struct Cycle<'a> {
    n: u32,
    vm: String,
    disk: &'a str,
    ignore: &'a [String],
}

impl Cycle<'_> {
    fn check(&self, what: &str) -> String {
        format!("cycle-{}-{what}", self.n)
    }

    /// Where in this cycle a step is: the VM, the cycle and the step.
    fn at(&self, step: &'static str) -> At {
        At { vm: Some(self.vm.clone()), cycle: Some(self.n), step }
    }

    /// Wraps a lower error of this cycle with the VM, the cycle and the step.
    fn fail<E: Cause>(&self, step: &'static str) -> impl FnOnce(E) -> RunError + '_ {
        move |e| e.at(self.at(step))
    }
}

/// A cycle's backup: the folder, the VM's part of it, and the backup point's files on the
/// data disk.
struct Point {
    backup: Backup,
    vb: VmBackup,
    files: Manifest,
}

/// Runs the scenario's rollback cycles on its one VM.
pub(super) async fn run(ctx: &mut RunCtx<'_>, spec: &RollbackSpec, mut vm: Vm) -> Result<(), RunError> {
    let name = vm.name().to_owned();
    let disk = spec.disk.get_ref().as_str();
    let ignore = spec.ignore.as_slice();
    let (change, remove) = files_to_change(&vm, disk, ignore)?;
    let methods = spec.methods.get_ref();
    let cycles = *spec.cycles.get_ref();
    let backups = ctx.work.join("backups");
    let mut used = Vec::new();
    for n in 1..=cycles {
        if ctx.interrupted() {
            return Err(RunError::Interrupted(Interruption::BeforeCycle { n, of: cycles }));
        }
        let choice = methods[(n as usize - 1) % methods.len()];
        let c = Cycle { n, vm: name.clone(), disk, ignore };
        let label = choice_label(choice);
        ctx.say(&format!("cycle {n} of {cycles} ({label})"));
        ctx.tl.mark(Some(&name), &format!("cycle {n}: {label}"));

        // 1. The backup, and the backup point's files on the data disk.
        let backup = backup(&c, ctx, &vm, choice, &backups.join(format!("cycle-{n}"))).await?;
        let vb = backup
            .vm(&name)
            .ok_or_else(|| RunError::VmNotBackedUp { at: c.at("the backup"), vm: name.clone() })?
            .clone();
        used.push(vb.method.as_str());
        if let Some(r) = ctx.report.vm_mut(&name) {
            r.method = Some(used.join(", "));
        }
        // A Child VM Snapshot claims a quiesced backup: every filesystem in it frozen clean.
        // Not for Windows: NTFS is judged only by its dirty flag, which proves nothing
        // either way, so the check could never pass there (the thaw's answer is the proof:
        // a hold past VSS's 10 s fails the backup).
        if vb.method == Method::ChildSnapshot && !vm.spec.is_windows() {
            let states = disk_checks::fs_quiesced(&backup, &vb);
            let (ok, detail) = ctx.tl.step(Some(&name), "read the backup's filesystem states", states).await?;
            ctx.report.check(&name, &c.check("fs-quiesced"), ok, detail);
        }
        let at = "reading the backup point's manifest";
        let entry = vb.disks.iter().find(|d| d.node_name == disk).ok_or_else(|| RunError::NoDisk {
            at: c.at(at),
            place: DiskPlace::Backup,
            disk: disk.to_owned(),
        })?;
        let image = backup.vm_dir(&name).join(&entry.file);
        let files = ctx
            .tl
            .step(Some(&name), "read the backup point's manifest", disk_checks::read(&image, entry.format, c.at(at)))
            .await?;
        let point = Point { backup, vb, files };

        // 2. Change the data on the live VM.
        let made = ctx.tl.step(Some(&name), "change the data", mutate(&c, &vm, &change, &remove)).await?;

        // 3. Restore to a new VM; 4. restore in place, onto the VM's own disks.
        new_vm(&c, ctx, &vm, &point).await?;
        in_place(&c, ctx, &mut vm, &point, &made).await?;

        // The cycle is verified: its backup is no longer needed (but for the last, if kept).
        if ctx.opts.keep_backup && n == cycles {
            ctx.keep_backup(&point.backup.path, c.at("keeping the backup"))?;
        } else {
            let path = &point.backup.path;
            std::fs::remove_dir_all(path).map_err(io(c.at("removing the cycle's backup"), path))?;
        }
    }
    Ok(())
}

fn choice_label(c: MethodChoice) -> &'static str {
    match c {
        MethodChoice::Auto => "auto",
        MethodChoice::ChildSnapshot => "child-snapshot",
        MethodChoice::SavedState => "saved-state",
    }
}

/// The seeded files each cycle changes (the first) and removes (the last), by path in the
/// data disk's filesystem. The restores bring both back, so every cycle finds them again.
fn files_to_change(vm: &Vm, disk: &str, ignore: &[String]) -> Result<(String, String), RunError> {
    let d = vm.spec.disks.iter().map(|d| d.get_ref()).find(|d| d.name.get_ref() == disk).ok_or_else(|| {
        RunError::NoDisk { at: At::vm(vm.name(), "rollback cycles"), place: DiskPlace::Vm, disk: disk.to_owned() }
    })?;
    let files: Vec<&String> = d.files.keys().filter(|p| !manifest::ignored(&format!("/{p}"), ignore)).collect();
    match (files.first(), files.last()) {
        (Some(first), Some(last)) if files.len() >= 2 => Ok(((*first).clone(), (*last).clone())),
        _ => Err(RunError::TooFewFiles { disk: disk.to_owned() }),
    }
}

/// Backs the VM up by `method` and checks that it got that method and runs on.
async fn backup(
    c: &Cycle<'_>,
    ctx: &mut RunCtx<'_>,
    vm: &Vm,
    method: MethodChoice,
    path: &Path,
) -> Result<Backup, RunError> {
    let interrupt = ctx.opts.interrupt.clone().unwrap_or_default();
    let outcome =
        set::run(&[member(ctx.s, vm, method)], ctx.caps, path, ctx.tl, &interrupt).await.map_err(c.fail("backup"))?;
    let choice = outcome
        .choices
        .iter()
        .find(|(v, _)| *v == c.vm)
        .map(|(_, ch)| ch.clone())
        .ok_or_else(|| RunError::NoChoice { at: c.at("backup") })?;
    let st = runstate::query(&vm.guest.machine).await.map_err(c.fail("query-status after the backup"))?;
    let want = match method {
        MethodChoice::SavedState => Method::SavedState,
        _ => Method::ChildSnapshot,
    };
    let report = &mut *ctx.report;
    report.check(
        &c.vm,
        &c.check("backup"),
        choice.method == want && st.running,
        format!("{}: {}; {} after the backup", choice.method.as_str(), choice.reason, st.label()),
    );
    if let Some(r) = report.vm_mut(&c.vm) {
        r.state_after_backup = Some(st.label().into());
        r.method_reason = Some("rollback cycles take the scenario's methods in turn".into());
        if r.conditions.is_empty() {
            r.conditions =
                choice.conditions.iter().map(|v| (v.condition.name().to_owned(), v.outcome)).collect::<Vec<_>>();
        }
        if let (true, Some(vb)) = (r.backup_disks.is_empty(), outcome.backup.vm(&c.vm)) {
            r.timings = Some(vb.timings.clone());
            r.backup_disks = DiskReport::of_backup(vb);
        }
    }
    Ok(outcome.backup)
}

/// Changes the data disk, the same way for the same cycle: adds a file, changes a seeded
/// one, removes another, makes a folder, and syncs. Returns the changes made.
async fn mutate(c: &Cycle<'_>, vm: &Vm, change: &str, remove: &str) -> Result<Vec<(Made, String)>, RunError> {
    let n = c.n;
    let added = format!("rollback-{n}.txt");
    let dir = format!("rollback-{n}");
    let step = "changing the data in the guest";
    let agent = vm.guest.machine.agent().map_err(c.fail(step))?;
    if vm.spec.is_windows() {
        windows_rollback::mutate(vm, agent, c.disk, n, change, remove, || c.at(step)).await?;
    } else {
        mutate_linux(c, agent, &added, &dir, change, remove).await?;
    }
    Ok(vec![
        (Made::Added, format!("/{added}")),
        (Made::Changed, format!("/{change}")),
        (Made::Removed, format!("/{remove}")),
        (Made::Added, format!("/{dir}")),
    ])
}

/// The changes of [`mutate`] in the Linux guest, by shell.
async fn mutate_linux(
    c: &Cycle<'_>,
    agent: &GuestAgent,
    added: &str,
    dir: &str,
    change: &str,
    remove: &str,
) -> Result<(), RunError> {
    let n = c.n;
    let script = format!(
        "set -e; cd {mnt}; printf 'added in cycle {n}\\n' > {added}; printf 'changed in cycle {n}\\n' >> {change}; \
         rm {remove}; mkdir {dir}; sync",
        mnt = shell_quote(&format!("/mnt/{}", c.disk)),
        added = shell_quote(added),
        change = shell_quote(change),
        remove = shell_quote(remove),
        dir = shell_quote(dir),
    );
    let step = "changing the data in the guest";
    exec::sh(agent, &script, deadline::guest_exec()).await.map_err(c.fail(step)).map(drop)
}

/// Mounts the VM's data disks after a fresh boot, as the scenario's VM had them (a Windows
/// VM's get their drive letters again).
async fn after_fresh_boot(c: &Cycle<'_>, vm: &Vm, agent: &GuestAgent, machine: &str) -> Result<(), RunError> {
    if vm.spec.is_windows() {
        return windows_rollback::after_fresh_boot(vm, agent, machine).await;
    }
    mount_disks(vm, agent).await.map_err(c.fail("mounting the data disks"))
}

async fn mount_disks(vm: &Vm, agent: &GuestAgent) -> Result<(), ExecError> {
    for d in &vm.spec.disks {
        let d = d.get_ref();
        if let Some(fstype) = d.filesystem.guest_type() {
            workload::mount_disk(agent, d.name.get_ref(), fstype).await?;
        }
    }
    Ok(())
}

/// The journal's own check, as a report check of this cycle (if the VM writes one).
async fn journal_check(c: &Cycle<'_>, vm: &Vm, m: &Machine, what: &str, report: &mut Report) -> Result<(), RunError> {
    let Some(path) = &vm.journal else { return Ok(()) };
    let j = if vm.spec.is_windows() {
        windows_rollback::journal(vm, m, path).await?
    } else {
        let agent = m.agent().map_err(c.fail("the guest agent"))?;
        workload::check_journal(agent, path).await.map_err(c.fail("checking the journal"))?
    };
    report.check(&c.vm, &c.check(what), j.intact(), format!("{} lines, first break {:?}", j.lines, j.first_break));
    Ok(())
}

/// Restores the backup to a new VM and verifies it: blocks before the guest runs, then the
/// data disk's files once it ran and was shut down cleanly.
async fn new_vm(c: &Cycle<'_>, ctx: &mut RunCtx<'_>, vm: &Vm, p: &Point) -> Result<(), RunError> {
    let rname = format!("{}-restored-{}", c.vm, c.n);
    let mut ro = RestoreOptions::named(&rname);
    ro.artifacts_dir = ctx.opts.artifacts_dir.clone();
    ro.resume = false;
    let mut restored = match p.vb.method {
        Method::SavedState => restore::saved_state(&p.backup, &c.vm, &ro, ctx.tl).await,
        Method::ChildSnapshot => restore::boot(&p.backup, &c.vm, &ro, ctx.tl).await,
    }
    .map_err(c.fail("restoring to a new VM"))?;

    let step = "comparing the new VM's disks with the backup";
    let overlay =
        |disk: &str| restored.disks.iter().find(|(n, _)| n == disk).map(|(_, path)| (path.clone(), DiskFormat::Qcow2));
    let pairs = Pair::of(&p.backup, &p.vb, || c.at(step), overlay)?;
    let results = ctx
        .tl
        .step(Some(&rname), "compare blocks with the backup", disk_checks::compare_blocks(pairs, c.at(step)))
        .await?;
    let (same, detail) = blocks_text(&results);
    ctx.report.check(&c.vm, &c.check("new-vm-blocks"), same, detail);

    let m = &mut restored.machine;
    run_restored(c, m, &p.vb, &rname, ctx.tl, vm.spec.is_windows()).await?;
    let agent = m.agent().map_err(c.fail("the new VM's agent"))?;
    if p.vb.method == Method::ChildSnapshot {
        after_fresh_boot(c, vm, agent, &rname).await?;
    }
    journal_check(c, vm, m, "new-vm-journal", ctx.report).await?;
    let state_after_restore = runstate::query(m).await.map_err(c.fail("query-status"))?.label().to_owned();
    ctx.tl
        .step(Some(&rname), "shut down", m.shutdown(shutdown_deadline(vm)))
        .await
        .map_err(c.fail("shutting the new VM down"))?;

    let step = "reading the new VM's data disk";
    let overlay = restored
        .disks
        .iter()
        .find(|(n, _)| n == c.disk)
        .map(|(_, p)| p.clone())
        .ok_or_else(|| RunError::NoDisk { at: c.at(step), place: DiskPlace::Restored, disk: c.disk.to_owned() })?;
    let after = ctx
        .tl
        .step(Some(&rname), "read the data disk's manifest", disk_checks::read(&overlay, DiskFormat::Qcow2, c.at(step)))
        .await?;
    let changes = manifest::diff(&p.files, &after, c.ignore);
    ctx.report.check(&c.vm, &c.check("new-vm-manifest"), changes.is_empty(), changes_text(&changes));
    ctx.report.restores.push(RestoreReport { vm: rname, state_after_restore, restore_ms: restored.restore_ms });
    Ok(())
}

/// Runs a restored VM left stopped: resumes a saved state that was running, or boots a
/// disk-only restore until its agent answers; then waits for the agent either way.
async fn run_restored(
    c: &Cycle<'_>,
    m: &mut Machine,
    vb: &VmBackup,
    who: &str,
    tl: &Timeline,
    windows: bool,
) -> Result<(), RunError> {
    match vb.method {
        // A fresh Windows boot is ready when its agent answers and VSS is ready.
        Method::ChildSnapshot if windows => tl.step(Some(who), "boot", super::windows::boot_restored(m)).await?,
        Method::SavedState => {
            if vb.run_state_before == runstate::Activity::Running {
                tl.step(Some(who), "resume", restore::resume(m)).await.map_err(c.fail("resuming"))?;
            }
        }
        Method::ChildSnapshot => {
            tl.step(Some(who), "boot", async {
                restore::resume(m).await?;
                m.wait_agent(deadline::boot_to_agent()).await.map_err(|error| RestoreError::Machine {
                    vm: who.to_owned(),
                    step: "boot".into(),
                    error,
                })
            })
            .await
            .map_err(c.fail("booting"))?;
        }
    }
    let agent = m.agent().map_err(c.fail("the guest agent"))?;
    agent.wait_ready(deadline::AGENT_AFTER_RESUME).await.map_err(c.fail("waiting for the guest agent"))
}

/// Restores the backup in place: stops the VM, checks that the data really changed, writes
/// the backup back onto the VM's own disks and starts it on them, and verifies it as the new
/// VM was verified. The VM then runs on into the next cycle.
async fn in_place(
    c: &Cycle<'_>,
    ctx: &mut RunCtx<'_>,
    vm: &mut Vm,
    p: &Point,
    made: &[(Made, String)],
) -> Result<(), RunError> {
    let name = c.vm.as_str();
    let tl = ctx.tl;
    // A clean power-off: the guest's writes are on the disk files, and QEMU has exited (and
    // been reaped) so that nothing holds them.
    tl.step(Some(name), "shut down", vm.guest.machine.shutdown(shutdown_deadline(vm)))
        .await
        .map_err(c.fail("shutting the VM down for the in-place restore"))?;

    // The changes must be on the VM's disk, or the cycle would prove nothing.
    let step = "reading the changed data disk";
    let own = vm
        .guest
        .machine
        .config()
        .disks
        .iter()
        .find(|d| d.node_name == c.disk)
        .cloned()
        .ok_or_else(|| RunError::NoDisk { at: c.at(step), place: DiskPlace::Vm, disk: c.disk.to_owned() })?;
    let live = tl
        .step(Some(name), "read the changed data disk's manifest", disk_checks::read(&own.path, own.format, c.at(step)))
        .await?;
    let changes = manifest::diff(&p.files, &live, c.ignore);
    let (changed, detail) = made_seen(made, &changes);
    ctx.report.check(name, &c.check("mutated"), changed, detail);

    let target = vm.guest.machine.config().clone();
    let mut ro = RestoreOptions::named(name);
    ro.artifacts_dir = ctx.opts.artifacts_dir.clone();
    ro.resume = false;
    let restored = restore::in_place(&p.backup, name, &target, &ro, tl).await.map_err(c.fail("restoring in place"))?;
    // The old guard's QEMU has exited and was reaped by `shutdown`; dropping the guard now
    // only removes its run folder. The restored machine is the live VM from here on.
    drop(std::mem::replace(&mut vm.guest.machine, restored.machine));

    // Blocks, before the guest runs.
    let step = "comparing the VM's own disks with the backup";
    let own_disk = |disk: &str| restored.disks.iter().find(|d| d.node_name == disk).map(|d| (d.path.clone(), d.format));
    let pairs = Pair::of(&p.backup, &p.vb, || c.at(step), own_disk)?;
    let results =
        tl.step(Some(name), "compare blocks with the backup", disk_checks::compare_blocks(pairs, c.at(step))).await?;
    let (same, detail) = blocks_text(&results);
    ctx.report.check(name, &c.check("in-place-blocks"), same, detail);

    let windows = vm.spec.is_windows();
    run_restored(c, &mut vm.guest.machine, &p.vb, name, tl, windows).await?;
    let agent = vm.guest.machine.agent().map_err(c.fail("the guest agent"))?;
    match p.vb.method {
        Method::SavedState => {
            // The saved state continues the boot it was saved in, workloads and mounts included.
            let now = boot_id(c, vm, agent).await?;
            let same = Some(&now) == vm.boot_id.as_ref();
            let detail = if same { "boot_id unchanged".to_owned() } else { format!("boot_id {now}") };
            ctx.report.check(name, &c.check("in-place-same-boot"), same, detail);
            journal_check(c, vm, &vm.guest.machine, "in-place-journal", ctx.report).await?;
        }
        Method::ChildSnapshot => {
            // A fresh boot: mount the disks, check the journal as the backup froze it, then
            // start the workloads again.
            after_fresh_boot(c, vm, agent, name).await?;
            vm.boot_id = Some(boot_id(c, vm, agent).await?);
            journal_check(c, vm, &vm.guest.machine, "in-place-journal", ctx.report).await?;
            if vm.spec.is_windows() {
                let at = || c.at("starting the workloads again");
                tl.step(Some(name), "start the workloads", windows_rollback::restart_workloads(vm, agent, at)).await?;
            } else {
                tl.step(Some(name), "start the workloads", restart_workloads(vm, agent))
                    .await
                    .map_err(c.fail("starting the workloads again"))?;
            }
        }
    }

    // The data disk's files after the guest ran. The VM must run on into the next cycle, so
    // they are read from its disk while it runs, under a guest freeze, rather than by
    // shutting it down and booting it again: a second boot would cost as much as the rest
    // of the cycle under TCG, and would end the boot a saved state continued, so the next
    // cycle would never back up a VM restored from a saved state. The freeze makes the read
    // sound: the guest flushes its filesystems and QEMU its image metadata before it returns,
    // and nothing is written until the thaw. The journal and the app run on meanwhile
    // (they wait on the freeze), so their files are among the scenario's `ignore`.
    let step = "reading the data disk of the restored VM";
    let own = restored.disks.iter().find(|d| d.node_name == c.disk).cloned().ok_or_else(|| RunError::NoDisk {
        at: c.at(step),
        place: DiskPlace::Restored,
        disk: c.disk.to_owned(),
    })?;
    let after = tl
        .step(
            Some(name),
            "read the data disk's manifest (frozen)",
            read_frozen(&vm.guest.machine, &own.path, own.format, freeze_deadlines(vm), || c.at(step)),
        )
        .await?;
    let changes = manifest::diff(&p.files, &after, c.ignore);
    ctx.report.check(name, &c.check("in-place-manifest"), changes.is_empty(), changes_text(&changes));
    let state_after_restore = runstate::query(&vm.guest.machine).await.map_err(c.fail("query-status"))?;
    ctx.report.restores.push(RestoreReport {
        vm: format!("{name} (in place, cycle {})", c.n),
        state_after_restore: state_after_restore.label().to_owned(),
        restore_ms: restored.restore_ms,
    });
    Ok(())
}

/// Starts the VM's workloads again after a fresh boot.
async fn restart_workloads(vm: &Vm, agent: &GuestAgent) -> Result<(), ExecError> {
    if *vm.spec.workload.counter.get_ref() {
        workload::start_counter(agent).await?;
    }
    if let Some(path) = &vm.journal {
        workload::start_journal(agent, path).await?;
    }
    if let Some(dir) = &vm.app {
        workload::start_app(agent, dir).await?;
    }
    Ok(())
}

/// The manifest of a disk of a running VM, read on the host while the guest's filesystems
/// are frozen. The guest is thawed on every path that returns.
async fn read_frozen(
    m: &Machine,
    path: &Path,
    format: DiskFormat,
    (freeze, thaw): (Duration, Duration),
    at: impl Fn() -> At,
) -> Result<Manifest, RunError> {
    let agent = m.agent().map_err(|e| e.at(at()))?;
    let frozen = agent.execute_within(qapi::qga::guest_fsfreeze_freeze {}, freeze).await;
    let read = match frozen {
        Ok(_) => disk_checks::read(path, format, at()).await,
        Err(e) => Err(e.at(At { step: "guest-fsfreeze-freeze", ..at() })),
    };
    // Thawed whether the freeze answered or not: a freeze that timed out may have happened.
    match agent.execute_within(qapi::qga::guest_fsfreeze_thaw {}, thaw).await {
        Ok(_) => read,
        Err(e) => Err(e.at(At { step: "guest-fsfreeze-thaw failed, the guest may be left frozen", ..at() })),
    }
}

/// How long the VM's guest gets to power off.
fn shutdown_deadline(vm: &Vm) -> Duration {
    if vm.spec.is_windows() {
        windows_rollback::SHUTDOWN
    } else {
        deadline::GUEST_SHUTDOWN
    }
}

/// The freeze and thaw deadlines of the VM's guest (VSS's for Windows).
fn freeze_deadlines(vm: &Vm) -> (Duration, Duration) {
    if vm.spec.is_windows() {
        (windows_rollback::FREEZE, windows_rollback::THAW)
    } else {
        (deadline::GUEST_FREEZE, deadline::GUEST_THAW)
    }
}

/// The guest's boot id, from either guest.
async fn boot_id(c: &Cycle<'_>, vm: &Vm, agent: &GuestAgent) -> Result<String, RunError> {
    if vm.spec.is_windows() {
        windows_rollback::boot_id(agent, || c.at("reading the boot id")).await
    } else {
        workload::boot_id(agent).await.map_err(c.fail("reading boot_id"))
    }
}
