//! Runs one scenario: makes its disks, boots its VMs and starts their workloads, chooses each
//! VM's method from the six conditions, takes the backup, checks the VMs came back as they
//! were, restores (loading the saved state, or booting from the backed-up disks), and runs
//! the checks. It turns the scenario's data into library calls; the work is done below.
//!
//! This file is the run itself, in order; each part of it is a module of its own (see the
//! module graph in `scenario/mod.rs`).

mod after_backup;
mod ctx;
mod disk_checks;
mod error;
mod faults;
mod host_faults;
mod restore;
mod rollback;
mod setup;
mod windows;
mod windows_app;
#[cfg(test)]
mod windows_app_tests;
#[cfg(test)]
mod windows_peer;
mod windows_rollback;
#[cfg(test)]
mod windows_rollback_tests;
#[cfg(all(test, feature = "vm-tests"))]
mod windows_set_tests;
#[cfg(test)]
mod windows_tests;

use std::path::Path;
use std::time::Instant;

use super::format::{Expect, FaultKind, Scenario};
use super::report::{DiskReport, Report};
use crate::backup::job::Choice;
use crate::backup::set::{self, Member, SetError, SetOutcome};
use crate::backup::{Backup, Method};
use crate::interrupt::Interrupt;
use crate::qemu::caps;
use crate::qemu::config::default_qemu_binary;
use crate::timeline::Timeline;

pub use ctx::RunOptions;
use ctx::{RunCtx, Vm};
use error::{io, step};
pub use error::{At, DiskPlace, Interruption, RunError};
pub use windows::skip_reason;

/// Runs `s` and reports what happened; a failure is in the report, not a panic.
pub async fn run(s: &Scenario, opts: &RunOptions, progress: &mut dyn FnMut(&str)) -> Report {
    let tl = Timeline::new();
    let started = Instant::now();
    let mut report = Report { scenario: s.name.clone(), description: s.file.description.clone(), ..Default::default() };
    if let Some(why) = skip_reason(s) {
        // Neither passed nor failed: nothing was booted.
        report.skipped = Some(why);
        return report;
    }
    let result = run_inner(s, opts, &tl, &mut report, progress).await;
    if let Err(e @ RunError::NoAppWriter { .. }) = &result {
        // Found only once the guest was up: skipped all the same, its checks discarded.
        let (scenario, description) = (s.name.clone(), s.file.description.clone());
        return Report { scenario, description, skipped: Some(e.to_string()), ..Default::default() };
    }
    report.steps = tl.steps();
    report.duration_ms = started.elapsed().as_secs_f64() * 1000.0;
    report.passed = result.is_ok() && report.checks.iter().all(|c| c.passed);
    report.error = result.err().map(|e| e.to_string());
    report
}

async fn run_inner(
    s: &Scenario,
    opts: &RunOptions,
    tl: &Timeline,
    report: &mut Report,
    progress: &mut dyn FnMut(&str),
) -> Result<(), RunError> {
    let caps = caps::probe(&default_qemu_binary()).await.map_err(RunError::Probe)?;
    // A compatibility profile is part of what ran: "10.0.2 as 8.2".
    report.qemu_version = match caps.profile {
        Some(p) => format!("{} as {p}", caps.version),
        None => caps.version.clone(),
    };
    let at = || At::run("creating the work folder");
    std::fs::create_dir_all(&opts.work_dir).map_err(io(at(), &opts.work_dir))?;
    let work = tempfile::Builder::new()
        .prefix(&format!("{}-", s.name))
        .tempdir_in(&opts.work_dir)
        .map_err(io(at(), &opts.work_dir))?;
    // Held while the run lasts: a run folder whose lock is free was left by a killed run.
    let _lock = super::stale::claim(work.path()).map_err(io(at(), work.path()))?;
    let mut ctx = RunCtx { s, opts, tl, caps: &caps, work: work.path(), report, progress };
    // Before the VMs, so dropped after them: their disks may live on these.
    let _volumes = host_faults::before_boot(s, work.path())?;

    let mut vms = Vec::new();
    for spec in s.vms() {
        if ctx.interrupted() {
            return Err(RunError::Interrupted(Interruption::WhileBooting));
        }
        ctx.say(&format!("booting {}", spec.name.get_ref()));
        let vm = tl.step(Some(spec.name.get_ref()), "boot and prepare", setup::prepare_vm(&mut ctx, spec)).await?;
        ctx.report.accel = vm.guest.accel.accel.as_str().to_owned();
        ctx.report.vms.push(setup::vm_report(&vm));
        vms.push(vm);
    }

    if let Some(rb) = &s.file.rollback {
        let vm = vms.pop().expect("a rollback scenario has one VM");
        return rollback::run(&mut ctx, rb.get_ref(), vm).await;
    }
    let full_target = s.any_fault(FaultKind::BackupTargetFull);
    // Mounted for the rest of the run: the backup lives on it.
    let _small = if full_target { Some(faults::SmallTmpfs::mount(&work.path().join("target"))?) } else { None };
    let vanishing = host_faults::vanishing_target(s, work.path())?;
    let path = match &vanishing {
        Some((_, path)) => path.clone(),
        None if full_target => work.path().join("target").join("backup"),
        None => work.path().join("backup"),
    };
    let backup = backup(&mut ctx, &mut vms, &path).await?;
    for vm in &vms {
        host_faults::after_job(&mut ctx, vm).await?;
    }
    let Some(backup) = backup else { return Ok(()) };

    for vm in &vms {
        let entry = backup.vm(vm.name());
        let method = entry.map(|b| b.method).unwrap_or(Method::SavedState);
        let until_continued = entry.and_then(|b| b.state.as_ref()).map_or(&[][..], |s| &s.inactive_until_continued);
        after_backup::after_backup_checks(vm, method, until_continued, ctx.report).await?;
    }
    if ctx.interrupted() {
        return Err(RunError::Interrupted(Interruption::AfterBackup));
    }
    if let Some(rspec) = &s.file.restore {
        let reopened = Backup::open(&backup.path).map_err(step("reopening the backup"))?;
        let bad = reopened.verify().map_err(step("verifying the backup"))?;
        ctx.report.check("*", "backup-checksums", bad.is_empty(), format!("{} files differ", bad.len()));
        for vm in &vms {
            ctx.say(&format!("restoring {}", vm.name()));
            restore::restore_and_check(&mut ctx, vm, &reopened, rspec).await?;
        }
    }
    if opts.keep_backup {
        ctx.keep_backup(&backup.path, At::run("keeping the backup"))?;
    }
    Ok(())
}

/// Takes the backup of every VM and records what it did. Returns the backup, or nothing
/// when the job ended as the scenario expected it to without one (refused, failed,
/// interrupted), after checking that nothing changed.
async fn backup(ctx: &mut RunCtx<'_>, vms: &mut [Vm], backup_path: &Path) -> Result<Option<Backup>, RunError> {
    let s = ctx.s;
    ctx.say("backing up");
    // A scenario-local interruption: the CLI's (SIGINT) is forwarded to it, and a fault can
    // fire it without ending the whole run.
    let local = Interrupt::new();
    let forward = ctx.opts.interrupt.clone().map(|outer| {
        let local = local.clone();
        tokio::spawn(async move {
            outer.fired().await;
            local.trigger();
        })
    });
    for vm in vms.iter_mut() {
        vm.journal_before = setup::journal_lines_before(vm).await?;
    }
    let mut members: Vec<Member> = vms.iter().map(|vm| faults::member(s, vm, s.backup().method())).collect();
    for (vm, member) in vms.iter().zip(members.iter_mut()) {
        host_faults::adjust(s, vm, ctx.work, member);
    }
    for vm in vms.iter() {
        faults::arm_guest(s, vm).await?;
        host_faults::arm(s, vm).await?;
    }
    let outcome = set::run(&members, ctx.caps, backup_path, ctx.tl, &local).await;
    if let Some(f) = forward {
        f.abort();
    }
    ctx.report.excluded = match &outcome {
        Ok(o) => o.excluded.clone(),
        Err(_) => vec![],
    };
    match (outcome, s.backup().expect) {
        (Ok(o), Expect::Success) => Ok(Some(record_success(ctx.report, o))),
        (Ok(_), expect) => {
            let detail = format!("the backup succeeded, but the scenario expects it {expect:?}");
            ctx.report.check("*", "backup-outcome", false, detail);
            Ok(None)
        }
        (Err(SetError::Refused { reasons, choices, .. }), Expect::Refused) => {
            for (vm, choice) in &choices {
                record_choice(ctx.report, vm, choice);
            }
            ctx.report.check("*", "backup-refused", true, reasons);
            after_backup::nothing_changed(ctx, vms, backup_path, &[]).await?;
            Ok(None)
        }
        (Err(e @ SetError::Failed { .. }), Expect::Failed)
        | (Err(e @ SetError::Interrupted { .. }), Expect::Interrupted) => {
            let put_back = faults::every_vm_put_back(s, &e);
            ctx.report.check("*", "backup-failed-as-expected", true, e.to_string());
            ctx.report.check("*", "every-vm-put-back", put_back, "see backup-failed-as-expected");
            ctx.report.failure = match &e {
                SetError::Failed { vm, phase, .. } => Some(format!("{vm} in {phase}")),
                SetError::Interrupted { phase, .. } => Some(format!("interrupted in {phase}")),
                _ => None,
            };
            after_backup::nothing_changed(ctx, vms, backup_path, &e.inactive_until_continued()).await?;
            Ok(None)
        }
        (Err(e), _) => Err(step("backup")(e)),
    }
}

/// Records a backup that succeeded: each VM's method and why, its timings and backed-up
/// disks, and the VMs it had nothing to back up for.
fn record_success(report: &mut Report, o: SetOutcome) -> Backup {
    for (vm, choice) in &o.choices {
        record_choice(report, vm, choice);
    }
    for vb in &o.backup.manifest.vms {
        if let Some(r) = report.vm_mut(&vb.name) {
            r.timings = Some(vb.timings.clone());
            r.backup_disks = DiskReport::of_backup(vb);
        }
    }
    for v in &o.skipped {
        report.check(v, "skipped-nothing-the-host-can-back-up", true, "all its disks are pass-through or iSCSI");
    }
    o.backup
}

fn record_choice(report: &mut Report, vm: &str, choice: &Choice) {
    if let Some(r) = report.vm_mut(vm) {
        r.method = Some(choice.method.as_str().into());
        r.method_reason = Some(choice.reason.clone());
        r.conditions = choice.conditions.iter().map(|v| (v.condition.name().to_owned(), v.outcome)).collect();
    }
}
