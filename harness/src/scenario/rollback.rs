//! Rollback cycles: back the VM up (the scenario's methods taken in turn), change the
//! guest's data, restore the backup to a new VM and then in place onto the VM's own disks,
//! and verify both against the backup point, over and over. The VM runs on from each
//! in-place restore into the next cycle, so drift would accumulate and show.
//!
//! A cycle proves, for both restores: every restored disk holds the backup's bytes before
//! the guest runs (blocks; a difference names its offset), and the data disk's files after
//! the guest ran equal the backup point's (manifests; a difference names its path). It also
//! proves that the data really changed in between, or it would prove nothing.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use super::format::{MethodChoice, RollbackSpec, Scenario};
use super::report::{DiskReport, Report, RestoreReport};
use super::runner::{member, RunError, RunOptions, Vm};
use crate::backup::set;
use crate::backup::{runstate, Backup, Method, VmBackup};
use crate::image::manifest::{self, Change, Limits, Manifest};
use crate::interrupt::Interrupt;
use crate::qemu::caps::Capabilities;
use crate::qemu::exec::{self, ExecError};
use crate::qemu::{DiskFormat, Machine};
use crate::timeline::Timeline;
use crate::verify::{blockcmp, restore, RestoreOptions};
use crate::workload;

const T: Duration = Duration::from_secs(30);
/// A clean power-off of the test guest takes about a second; this leaves room for a loaded host.
const SHUTDOWN: Duration = Duration::from_secs(60);
/// Freezing or thawing the guest to read a disk of the running VM (VSS holds writes at most 10 s).
const FREEZE: Duration = Duration::from_secs(10);
/// Differences listed in a check's detail before the rest are only counted.
const MAX_LINES: usize = 20;

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

    /// An error of this cycle, naming the VM, the cycle and the step.
    fn err<E: std::fmt::Display>(&self, step: &str) -> impl FnOnce(E) -> RunError + '_ {
        let step = step.to_owned();
        move |e| RunError(format!("VM {}, rollback cycle {}, {step}: {e}", self.vm, self.n))
    }
}

/// A change the cycle makes to the data, as the manifest comparison must show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Made {
    Added,
    Changed,
    Removed,
}

#[allow(clippy::too_many_arguments)]
pub(super) async fn run(
    s: &Scenario,
    spec: &RollbackSpec,
    mut vm: Vm,
    caps: &Capabilities,
    work: &Path,
    opts: &RunOptions,
    tl: &Timeline,
    report: &mut Report,
    progress: &mut dyn FnMut(&str),
) -> Result<(), RunError> {
    let name = vm.name().to_owned();
    let disk = spec.disk.get_ref().as_str();
    let ignore = spec.ignore.as_slice();
    let (change, remove) = files_to_change(&vm, disk, ignore)?;
    let methods = spec.methods.get_ref();
    let cycles = *spec.cycles.get_ref();
    let interrupt = opts.interrupt.clone().unwrap_or_default();
    let backups = work.join("backups");
    let mut used = Vec::new();
    for n in 1..=cycles {
        if interrupt.is_triggered() {
            return Err(RunError(format!("interrupted before rollback cycle {n} of {cycles}")));
        }
        let choice = methods[(n as usize - 1) % methods.len()];
        let c = Cycle { n, vm: name.clone(), disk, ignore };
        let label = choice_label(choice);
        progress(&format!("{}: cycle {n} of {cycles} ({label})", s.name));
        tl.mark(Some(&name), &format!("cycle {n}: {label}"));

        // 1. The backup, and the backup point's files on the data disk.
        let backup =
            backup(&c, s, &vm, choice, caps, &backups.join(format!("cycle-{n}")), &interrupt, tl, report).await?;
        let vb = backup.vm(&name).ok_or_else(|| RunError(format!("cycle {n}: the backup has no VM {name}")))?.clone();
        used.push(vb.method.as_str());
        if let Some(r) = report.vm_mut(&name) {
            r.method = Some(used.join(", "));
        }
        let entry = vb.disks.iter().find(|d| d.node_name == disk).ok_or_else(|| {
            RunError(format!("VM {name}, rollback cycle {n}: the backup has no disk {disk} (it was left out?)"))
        })?;
        let point = tl
            .step(
                Some(&name),
                "read the backup point's manifest",
                read_manifest(backup.vm_dir(&name).join(&entry.file), entry.format),
            )
            .await
            .map_err(c.err("reading the backup point's manifest"))?;

        // 2. Change the data on the live VM.
        let made = tl
            .step(Some(&name), "change the data", mutate(&c, &vm, &change, &remove))
            .await
            .map_err(c.err("changing the data in the guest"))?;

        // 3. Restore to a new VM; 4. restore in place, onto the VM's own disks.
        new_vm(&c, &vm, &backup, &vb, &point, opts, tl, report).await?;
        in_place(&c, &mut vm, &backup, &vb, &point, &made, opts, tl, report).await?;

        // The cycle is verified: its backup is no longer needed (but for the last, if kept).
        if opts.keep_backup && n == cycles {
            let kept = opts.work_dir.join(format!("{}-backup", s.name));
            let _ = std::fs::remove_dir_all(&kept);
            std::fs::rename(&backup.path, &kept).map_err(c.err("keeping the backup"))?;
            report.backup_path = Some(kept.display().to_string());
        } else {
            std::fs::remove_dir_all(&backup.path).map_err(c.err("removing the cycle's backup"))?;
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
    let d = vm
        .spec
        .disks
        .iter()
        .map(|d| d.get_ref())
        .find(|d| d.name.get_ref() == disk)
        .ok_or_else(|| RunError(format!("VM {} has no disk {disk}", vm.name())))?;
    let files: Vec<&String> = d.files.keys().filter(|p| !manifest::ignored(&format!("/{p}"), ignore)).collect();
    match (files.first(), files.last()) {
        (Some(first), Some(last)) if files.len() >= 2 => Ok(((*first).clone(), (*last).clone())),
        _ => Err(RunError(format!(
            "rollback cycles change one seeded file and remove another each cycle: disk {disk} needs at least two \
             seeded files that are not ignored"
        ))),
    }
}

/// Backs the VM up by `method` and checks that it got that method and runs on.
#[allow(clippy::too_many_arguments)]
async fn backup(
    c: &Cycle<'_>,
    s: &Scenario,
    vm: &Vm,
    method: MethodChoice,
    caps: &Capabilities,
    path: &Path,
    interrupt: &Interrupt,
    tl: &Timeline,
    report: &mut Report,
) -> Result<Backup, RunError> {
    let outcome = set::run(&[member(s, vm, method)], caps, path, tl, interrupt).await.map_err(c.err("backup"))?;
    let choice =
        outcome.choices.iter().find(|(v, _)| *v == c.vm).map(|(_, ch)| ch.clone()).ok_or_else(|| {
            RunError(format!("VM {}, rollback cycle {}: the backup made no choice for it", c.vm, c.n))
        })?;
    let st = runstate::query(&vm.guest.machine).await.map_err(c.err("query-status after the backup"))?;
    let want = match method {
        MethodChoice::SavedState => Method::SavedState,
        _ => Method::ChildSnapshot,
    };
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
async fn mutate(c: &Cycle<'_>, vm: &Vm, change: &str, remove: &str) -> Result<Vec<(Made, String)>, String> {
    let n = c.n;
    let added = format!("rollback-{n}.txt");
    let dir = format!("rollback-{n}");
    let script = format!(
        "set -e; cd {mnt}; printf 'added in cycle {n}\\n' > {added}; printf 'changed in cycle {n}\\n' >> {change}; \
         rm {remove}; mkdir {dir}; sync",
        mnt = quote(&format!("/mnt/{}", c.disk)),
        added = quote(&added),
        change = quote(change),
        remove = quote(remove),
        dir = quote(&dir),
    );
    let agent = vm.guest.machine.agent().map_err(|e| e.to_string())?;
    exec::sh(agent, &script, T).await.map_err(|e| e.to_string())?;
    Ok(vec![
        (Made::Added, format!("/{added}")),
        (Made::Changed, format!("/{change}")),
        (Made::Removed, format!("/{remove}")),
        (Made::Added, format!("/{dir}")),
    ])
}

/// A shell word.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// The manifest of a disk image, read on the host (off the runtime).
async fn read_manifest(path: PathBuf, format: DiskFormat) -> Result<Manifest, String> {
    tokio::task::spawn_blocking(move || {
        manifest::read_image(&path, format, &Limits::default()).map_err(|e| format!("{}: {e}", path.display()))
    })
    .await
    .map_err(|e| format!("reading a manifest: {e}"))?
}

/// The differences as `quiesce diff` prints them, the first few of them.
fn changes_text(changes: &[Change]) -> String {
    if changes.is_empty() {
        return "no differences".into();
    }
    let mut lines: Vec<String> = changes.iter().take(MAX_LINES).map(|c| c.to_string()).collect();
    if changes.len() > MAX_LINES {
        lines.push(format!("... and {} more", changes.len() - MAX_LINES));
    }
    lines.join("; ")
}

/// One disk to compare: its name, the restored image and the backup's image.
struct Pair {
    disk: String,
    restored: (PathBuf, DiskFormat),
    backup: (PathBuf, DiskFormat),
}

/// Compares each restored disk with the backup's image, block by block (off the runtime).
/// Returns whether all are identical, and a detail naming every difference's offset.
async fn compare_blocks(pairs: Vec<Pair>) -> Result<(bool, String), String> {
    tokio::task::spawn_blocking(move || {
        let mut differ = Vec::new();
        for p in &pairs {
            let r = blockcmp::compare(&p.restored.0, p.restored.1, &p.backup.0, p.backup.1)
                .map_err(|e| format!("disk {}: {e}", p.disk))?;
            if !r.identical {
                differ.push(format!("disk {}: {r}", p.disk));
            }
        }
        let names: Vec<&str> = pairs.iter().map(|p| p.disk.as_str()).collect();
        Ok(if differ.is_empty() {
            (true, format!("{} identical to the backup", names.join(", ")))
        } else {
            (false, differ.join("; "))
        })
    })
    .await
    .map_err(|e| format!("comparing blocks: {e}"))?
}

/// Mounts the VM's data disks after a fresh boot, as the scenario's VM had them.
async fn mount_disks(vm: &Vm, agent: &crate::qemu::GuestAgent) -> Result<(), ExecError> {
    for d in &vm.spec.disks {
        let d = d.get_ref();
        if let Some(fstype) = d.filesystem.guest_type() {
            workload::mount_disk(agent, d.name.get_ref(), fstype).await?;
        }
    }
    Ok(())
}

/// The journal's own check, as a report check of this cycle (if the VM writes one).
async fn journal_check(
    c: &Cycle<'_>,
    vm: &Vm,
    agent: &crate::qemu::GuestAgent,
    what: &str,
    report: &mut Report,
) -> Result<(), RunError> {
    let Some(path) = &vm.journal else { return Ok(()) };
    let j = workload::check_journal(agent, path).await.map_err(c.err("checking the journal"))?;
    report.check(&c.vm, &c.check(what), j.intact(), format!("{} lines, first break {:?}", j.lines, j.first_break));
    Ok(())
}

/// Restores the backup to a new VM and verifies it: blocks before the guest runs, then the
/// data disk's files once it ran and was shut down cleanly.
#[allow(clippy::too_many_arguments)]
async fn new_vm(
    c: &Cycle<'_>,
    vm: &Vm,
    backup: &Backup,
    vb: &VmBackup,
    point: &Manifest,
    opts: &RunOptions,
    tl: &Timeline,
    report: &mut Report,
) -> Result<(), RunError> {
    let rname = format!("{}-restored-{}", c.vm, c.n);
    let mut ro = RestoreOptions::named(&rname);
    ro.artifacts_dir = opts.artifacts_dir.clone();
    ro.resume = false;
    let mut restored = match vb.method {
        Method::SavedState => restore::saved_state(backup, &c.vm, &ro, tl).await,
        Method::ChildSnapshot => restore::boot(backup, &c.vm, &ro, tl).await,
    }
    .map_err(c.err("restoring to a new VM"))?;

    let pairs = vb
        .disks
        .iter()
        .map(|d| {
            let overlay = restored.disks.iter().find(|(n, _)| *n == d.node_name).map(|(_, p)| p.clone());
            overlay.map(|o| Pair {
                disk: d.node_name.clone(),
                restored: (o, DiskFormat::Qcow2),
                backup: (backup.vm_dir(&c.vm).join(&d.file), d.format),
            })
        })
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| RunError(format!("VM {rname}: a backed-up disk was not restored")))?;
    let (same, detail) = tl
        .step(Some(&rname), "compare blocks with the backup", compare_blocks(pairs))
        .await
        .map_err(c.err("comparing the new VM's disks with the backup"))?;
    report.check(&c.vm, &c.check("new-vm-blocks"), same, detail);

    let m = &mut restored.machine;
    run_restored(c, m, vb, &rname, tl).await?;
    let agent = m.agent().map_err(c.err("the new VM's agent"))?;
    if vb.method == Method::ChildSnapshot {
        mount_disks(vm, agent).await.map_err(c.err("mounting the new VM's data disks"))?;
    }
    journal_check(c, vm, agent, "new-vm-journal", report).await?;
    let state_after_restore = runstate::query(m).await.map_err(c.err("query-status"))?.label().to_owned();
    tl.step(Some(&rname), "shut down", m.shutdown(SHUTDOWN)).await.map_err(c.err("shutting the new VM down"))?;

    let overlay = restored
        .disks
        .iter()
        .find(|(n, _)| n == c.disk)
        .map(|(_, p)| p.clone())
        .ok_or_else(|| RunError(format!("VM {rname}: no restored disk {}", c.disk)))?;
    let after = tl
        .step(Some(&rname), "read the data disk's manifest", read_manifest(overlay, DiskFormat::Qcow2))
        .await
        .map_err(c.err("reading the new VM's data disk"))?;
    let changes = manifest::diff(point, &after, c.ignore);
    report.check(&c.vm, &c.check("new-vm-manifest"), changes.is_empty(), changes_text(&changes));
    report.restores.push(RestoreReport { vm: rname, state_after_restore, restore_ms: restored.restore_ms });
    Ok(())
}

/// Runs a restored VM left stopped: resumes a saved state that was running, or boots a
/// disk-only restore until its agent answers; then waits for the agent either way.
async fn run_restored(c: &Cycle<'_>, m: &mut Machine, vb: &VmBackup, who: &str, tl: &Timeline) -> Result<(), RunError> {
    match vb.method {
        Method::SavedState => {
            if vb.run_state_before == "running" {
                tl.step(Some(who), "resume", restore::resume(m)).await.map_err(c.err("resuming"))?;
            }
        }
        Method::ChildSnapshot => {
            tl.step(Some(who), "boot", async {
                restore::resume(m).await?;
                m.wait_agent(restore::BOOT_DEADLINE).await.map_err(|error| crate::verify::RestoreError::Machine {
                    vm: who.to_owned(),
                    step: "boot".into(),
                    error,
                })
            })
            .await
            .map_err(c.err("booting"))?;
        }
    }
    m.agent().map_err(c.err("the guest agent"))?.wait_ready(T).await.map_err(c.err("waiting for the guest agent"))
}

/// Restores the backup in place: stops the VM, checks that the data really changed, writes
/// the backup back onto the VM's own disks and starts it on them, and verifies it as the new
/// VM was verified. The VM then runs on into the next cycle.
#[allow(clippy::too_many_arguments)]
async fn in_place(
    c: &Cycle<'_>,
    vm: &mut Vm,
    backup: &Backup,
    vb: &VmBackup,
    point: &Manifest,
    made: &[(Made, String)],
    opts: &RunOptions,
    tl: &Timeline,
    report: &mut Report,
) -> Result<(), RunError> {
    let name = c.vm.as_str();
    // A clean power-off: the guest's writes are on the disk files, and QEMU has exited (and
    // been reaped) so that nothing holds them.
    tl.step(Some(name), "shut down", vm.guest.machine.shutdown(SHUTDOWN))
        .await
        .map_err(c.err("shutting the VM down for the in-place restore"))?;

    // The changes must be on the VM's disk, or the cycle would prove nothing.
    let own = vm
        .guest
        .machine
        .config()
        .disks
        .iter()
        .find(|d| d.node_name == c.disk)
        .cloned()
        .ok_or_else(|| RunError(format!("VM {name} has no disk {}", c.disk)))?;
    let live = tl
        .step(Some(name), "read the changed data disk's manifest", read_manifest(own.path.clone(), own.format))
        .await
        .map_err(c.err("reading the changed data disk"))?;
    let changes = manifest::diff(point, &live, c.ignore);
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
        changes_text(&changes)
    } else {
        format!("not seen on the disk: {}; the differences: {}", missing.join(", "), changes_text(&changes))
    };
    report.check(name, &c.check("mutated"), !changes.is_empty() && missing.is_empty(), detail);

    let target = vm.guest.machine.config().clone();
    let mut ro = RestoreOptions::named(name);
    ro.artifacts_dir = opts.artifacts_dir.clone();
    ro.resume = false;
    let restored = restore::in_place(backup, name, &target, &ro, tl).await.map_err(c.err("restoring in place"))?;
    // The old guard's QEMU has exited and was reaped by `shutdown`; dropping the guard now
    // only removes its run folder. The restored machine is the live VM from here on.
    drop(std::mem::replace(&mut vm.guest.machine, restored.machine));

    // Blocks, before the guest runs.
    let pairs = vb
        .disks
        .iter()
        .zip(&restored.disks)
        .map(|(d, own)| Pair {
            disk: d.node_name.clone(),
            restored: (own.path.clone(), own.format),
            backup: (backup.vm_dir(name).join(&d.file), d.format),
        })
        .collect();
    let (same, detail) = tl
        .step(Some(name), "compare blocks with the backup", compare_blocks(pairs))
        .await
        .map_err(c.err("comparing the VM's own disks with the backup"))?;
    report.check(name, &c.check("in-place-blocks"), same, detail);

    run_restored(c, &mut vm.guest.machine, vb, name, tl).await?;
    let agent = vm.guest.machine.agent().map_err(c.err("the guest agent"))?;
    match vb.method {
        Method::SavedState => {
            // The saved state continues the boot it was saved in, workloads and mounts included.
            let now = workload::boot_id(agent).await.map_err(c.err("reading boot_id"))?;
            let same = Some(&now) == vm.boot_id.as_ref();
            report.check(
                name,
                &c.check("in-place-same-boot"),
                same,
                if same { "boot_id unchanged".to_owned() } else { format!("boot_id {now}") },
            );
            journal_check(c, vm, agent, "in-place-journal", report).await?;
        }
        Method::ChildSnapshot => {
            // A fresh boot: mount the disks, check the journal as the backup froze it, then
            // start the workloads again.
            mount_disks(vm, agent).await.map_err(c.err("mounting the data disks"))?;
            vm.boot_id = Some(workload::boot_id(agent).await.map_err(c.err("reading boot_id"))?);
            journal_check(c, vm, agent, "in-place-journal", report).await?;
            tl.step(Some(name), "start the workloads", restart_workloads(vm, agent))
                .await
                .map_err(c.err("starting the workloads again"))?;
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
    let own = restored
        .disks
        .iter()
        .find(|d| d.node_name == c.disk)
        .cloned()
        .ok_or_else(|| RunError(format!("VM {name}: no disk {} was restored", c.disk)))?;
    let after = tl
        .step(
            Some(name),
            "read the data disk's manifest (frozen)",
            read_frozen(&vm.guest.machine, own.path, own.format),
        )
        .await
        .map_err(c.err("reading the data disk of the restored VM"))?;
    let changes = manifest::diff(point, &after, c.ignore);
    report.check(name, &c.check("in-place-manifest"), changes.is_empty(), changes_text(&changes));
    let state_after_restore = runstate::query(&vm.guest.machine).await.map_err(c.err("query-status"))?;
    report.restores.push(RestoreReport {
        vm: format!("{name} (in place, cycle {})", c.n),
        state_after_restore: state_after_restore.label().to_owned(),
        restore_ms: restored.restore_ms,
    });
    Ok(())
}

/// Starts the VM's workloads again after a fresh boot.
async fn restart_workloads(vm: &Vm, agent: &crate::qemu::GuestAgent) -> Result<(), ExecError> {
    if vm.spec.workload.counter {
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
async fn read_frozen(m: &Machine, path: PathBuf, format: DiskFormat) -> Result<Manifest, String> {
    let agent = m.agent().map_err(|e| e.to_string())?;
    let frozen = agent.execute_raw("guest-fsfreeze-freeze", Value::Null, FREEZE).await;
    let read = match frozen {
        Ok(_) => read_manifest(path, format).await,
        Err(e) => Err(format!("guest-fsfreeze-freeze: {e}")),
    };
    // Thawed whether the freeze answered or not: a freeze that timed out may have happened.
    match agent.execute_raw("guest-fsfreeze-thaw", Value::Null, FREEZE).await {
        Ok(_) => read,
        Err(e) => Err(format!("guest-fsfreeze-thaw failed, the guest may be left frozen: {e}")),
    }
}
