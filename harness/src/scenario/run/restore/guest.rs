//! The checks inside a restored guest, through its agent: e2fsck of the data disks before
//! a fresh boot mounts them, the root disk's token, the boot and counter a saved state
//! continues, the seeded files, the journal and the app; then the faults that truncate a
//! restored file from inside the guest.

use super::super::super::format::{Check, FaultKind, Filesystem, Scenario};
use super::super::super::report::Report;
use super::super::ctx::{verdict, RunCtx, Vm, PROGRESS, ROOT_TOKEN};
use super::super::error::{on, RunError};
use super::quiesced::{self, HostFacts};
use super::Restoring;
use crate::backup::{Method, VmBackup};
use crate::qemu::GuestAgent;
use crate::sys::{deadline, shell_quote};
use crate::verify::{self, Restored};
use crate::workload;

/// What the checks in the guest look at: the scenario, its VM, its backup (so how it was
/// restored), what the host read from the backup, and the checks the scenario asks for.
struct Asked<'a> {
    s: &'a Scenario,
    vm: &'a Vm,
    vb: &'a VmBackup,
    method: Method,
    facts: &'a HostFacts,
    checks: &'a [Check],
}

impl Asked<'_> {
    fn wants(&self, check: Check) -> bool {
        self.checks.contains(&check)
    }
}

/// Runs the checks inside the restored guest, then the faults that truncate its files.
/// Returns the files truncated (disk, path), which the manifest comparison must name.
pub(super) async fn checks(
    ctx: &mut RunCtx<'_>,
    r: &Restoring<'_>,
    facts: &HostFacts,
    restored: &Restored,
) -> Result<Vec<(String, String)>, RunError> {
    let vm = r.vm;
    let asked = Asked { s: ctx.s, vm, vb: &r.vb, method: r.vb.method, facts, checks: r.checks() };
    let rname = restored.machine.name();
    let agent = restored.machine.agent().map_err(on(rname, "the restored guest's agent"))?;
    agent
        .wait_ready(deadline::AGENT_AFTER_RESUME)
        .await
        .map_err(on(rname, "waiting for the restored guest's agent"))?;
    if vm.spec.is_windows() {
        super::super::windows::restored_checks(ctx, vm, asked.method, asked.checks, restored, agent).await?;
        return Ok(vec![]);
    }
    if asked.method == Method::ChildSnapshot {
        if asked.wants(Check::GuestFsck) {
            guest_fsck(vm, agent, rname, ctx.report).await?;
        }
        // A fresh boot on the backup's disks: they are mounted here for the first time.
        // Asked, each ext4 disk's first mount is watched for a journal replay.
        let watched = asked.wants(Check::AutoRecoverable);
        if watched {
            quiesced::auto_recoverable(ctx, r, agent, rname).await?;
        }
        for d in vm.spec.disks.iter().map(|d| d.get_ref()) {
            if watched && d.filesystem == Filesystem::Ext4 {
                continue;
            }
            if let Some(fstype) = d.filesystem.guest_type().filter(|_| d.mount) {
                workload::mount_disk(agent, d.name.get_ref(), fstype)
                    .await
                    .map_err(on(rname, "mounting a restored disk"))?;
            }
        }
    }
    let name = vm.name();
    if asked.wants(Check::RootFromBackup) {
        // Unreadable reads as missing: the check fails, naming the file.
        let got = workload::read_file(agent, ROOT_TOKEN).await.unwrap_or_default();
        let ok = vm.root_token.as_deref().is_some_and(|t| got.trim() == t);
        let detail = format!("{ROOT_TOKEN} written before the backup is there: {ok}");
        ctx.report.check(name, "root-from-backup", ok, detail);
    }
    for check in asked.checks {
        guest_check(*check, &asked, agent, rname, ctx.report).await?;
    }
    let mut truncated = Vec::new();
    for f in ctx.s.faults(name, FaultKind::TruncateInRestore) {
        let (disk, path) = f.file();
        let file = format!("/mnt/{disk}{path}");
        crate::qemu::exec::sh(
            agent,
            &format!("s=$(stat -c %s {file}) && truncate -s $((s / 2)) {file} && sync", file = shell_quote(&file)),
            deadline::guest_exec(),
        )
        .await
        .map_err(on(rname, "truncating a restored file"))?;
        truncated.push((disk, path));
    }
    Ok(truncated)
}

/// `e2fsck -fn` of every ext4 data disk, inside the restored guest, before it mounts them.
async fn guest_fsck(vm: &Vm, agent: &GuestAgent, rname: &str, report: &mut Report) -> Result<(), RunError> {
    let mut bad = Vec::new();
    let disks = vm.ext4_disks();
    for disk in &disks {
        let r = verify::guest::fsck_ext4(agent, disk, deadline::GUEST_FSCK)
            .await
            .map_err(on(rname, "e2fsck in the restored guest"))?;
        if !r.clean() {
            bad.push(format!("{disk} ({}, exit {}): {}", r.device, r.exit_code, r.tail));
        }
    }
    let detail =
        if bad.is_empty() { format!("{} ext4 data disks clean in the guest", disks.len()) } else { bad.join("; ") };
    // Reported under the name the scenario asks for it by.
    report.check(vm.name(), "guest-fsck", bad.is_empty(), detail);
    Ok(())
}

/// One check of the scenario's, if it is one made inside the guest and applies to the VM
/// as it was restored.
async fn guest_check(
    check: Check,
    asked: &Asked<'_>,
    agent: &GuestAgent,
    rname: &str,
    report: &mut Report,
) -> Result<(), RunError> {
    let (vm, method) = (asked.vm, asked.method);
    let name = vm.name();
    match check {
        // Checked on the host, or before the guest ran, or as the disks were mounted.
        Check::DisksMatchBackup
        | Check::FsckClean
        | Check::ManifestMatchesBackup
        | Check::BlocksMatchBackup
        | Check::GuestFsck
        | Check::RootFromBackup
        | Check::FsQuiesced
        | Check::JournalCutAtFreeze
        | Check::AutoRecoverable => {}
        // A disk-only backup boots afresh: there is no boot or counter to continue.
        Check::SameBoot | Check::CounterContinues if method == Method::ChildSnapshot => {}
        Check::CounterContinues if vm.counter_before.is_none() => {}
        Check::SameBoot => {
            let now = workload::boot_id(agent).await.map_err(on(rname, "reading boot_id"))?;
            let same = Some(&now) == vm.boot_id.as_ref();
            let detail = if same { "boot_id unchanged".into() } else { format!("boot_id {now}") };
            report.check(name, "same-boot", same, detail);
        }
        Check::CounterContinues => {
            let before = vm.counter_before.unwrap_or(0);
            let c = workload::read_counter(agent).await.map_err(on(rname, "reading the counter"))?;
            let moves = workload::wait_counter_above(agent, c, PROGRESS).await.is_ok();
            let detail = format!("{c} >= {before} read before the backup, and moving: {moves}");
            report.check(name, "counter-continues", c >= before && moves, detail);
        }
        Check::FilesMatchSeed => {
            let mut bad = Vec::new();
            let mut n = 0;
            for d in vm.spec.disks.iter().map(|d| d.get_ref()).filter(|d| d.mount) {
                for (path, want) in &d.files {
                    n += 1;
                    let got = workload::read_file(agent, &format!("/mnt/{}/{path}", d.name.get_ref())).await;
                    if got.as_deref().ok() != Some(want.as_str()) {
                        bad.push(format!("{}:{path}", d.name.get_ref()));
                    }
                }
            }
            report.check(name, "files-match-seed", bad.is_empty(), format!("{n} files, differing: {bad:?}"));
        }
        Check::JournalIntact => match &vm.journal {
            // In a set, a check applies to the VMs that run its workload.
            None => {}
            Some(path) => {
                let j = workload::check_journal(agent, path).await.map_err(on(rname, "checking the journal"))?;
                let detail = format!("{} lines, first break {:?}", j.lines, j.first_break);
                report.check(name, "journal-intact", j.intact(), detail);
            }
        },
        Check::AppConsistent => match &vm.app {
            None => {}
            Some(dir) if method == Method::SavedState => {
                // Same boot: the writer runs on; stop it so the check sees a settled store.
                crate::qemu::exec::sh(agent, &format!("quiesce-app stop {dir}"), deadline::guest_exec())
                    .await
                    .map_err(on(rname, "stopping the app"))?;
                let r = workload::check_app(agent, dir).await.map_err(on(rname, "checking the app"))?;
                verdict(asked.s, report, name, check, r.is_consistent(), r.to_string());
            }
            Some(dir) => {
                let r = workload::check_app(agent, dir).await.map_err(on(rname, "checking the app"))?;
                let (ok, detail) = app_at_freeze(asked, dir, &r);
                verdict(asked.s, report, name, check, ok, detail);
            }
        },
    }
    Ok(())
}

/// A frozen backup's app: the writer acknowledged the freeze at transfer N with its WAL
/// emptied; the backup's WAL is empty (read on the host before anything opened the
/// database); and the restored database, consistent by the app's own check, holds exactly
/// N transfers. A crash-consistent copy fails one of these: no acknowledgement, a WAL
/// left to replay, or another number.
fn app_at_freeze(asked: &Asked<'_>, dir: &str, check: &workload::AppCheck) -> (bool, String) {
    let mut bad = Vec::new();
    let ack = asked.vb.freeze.as_ref().and_then(|f| f.ack("quiesce-app", dir));
    match (ack, &asked.vb.freeze) {
        (Some(a), _) if !a.checkpointed => bad.push(format!("the writer paused at {} with its WAL not emptied", a.seq)),
        (Some(_), _) => {}
        (None, Some(f)) => {
            bad.push(format!("no acknowledgement from quiesce-app on {dir} at this freeze ({})", f.summary()))
        }
        (None, None) => bad.push("the backup has no freeze record".into()),
    }
    match &asked.facts.app_wal {
        Some(Ok(0)) => {}
        Some(Ok(n)) => bad.push(format!("the backup's WAL holds {n} bytes to replay")),
        Some(Err(why)) => bad.push(format!("the backup's WAL could not be read: {why}")),
        None => bad.push("the backup's WAL was not read".into()),
    }
    match check {
        workload::AppCheck::Consistent { transfers, .. } => {
            if let Some(a) = ack.filter(|a| a.seq != *transfers) {
                bad.push(format!(
                    "the restored database holds {transfers} transfers, the writer acknowledged {}",
                    a.seq
                ));
            }
        }
        other => bad.push(format!("the app's own check: {other}")),
    }
    let restored = check.to_string();
    let acked = ack.map_or("none".into(), |a| format!("transfers={} (WAL emptied: {})", a.seq, a.checkpointed));
    let wal = match &asked.facts.app_wal {
        Some(Ok(n)) => format!("{n} bytes"),
        _ => "?".into(),
    };
    let detail = format!("acknowledged at the freeze: {acked}; backup's WAL: {wal}; restored: {restored}");
    if bad.is_empty() {
        (true, detail)
    } else {
        (false, format!("{}; {detail}", bad.join("; ")))
    }
}
