//! The checks that tell a quiesced backup from a crash-consistent copy, and that prove a
//! crash-consistent one recovers:
//!
//! - `fs-quiesced`: every filesystem of a Child VM Snapshot backup was frozen, read from
//!   its superblock and journal on the host ([`crate::image::fsread::state`]);
//! - `journal-cut-at-freeze`: the journal workload in the backup's image ends between the
//!   last line acknowledged before the freeze and the first acknowledged after the thaw,
//!   by the guest's own clock (its freeze log and the writer's acknowledgements);
//! - the host's half of `app-consistent`: the size of the app's WAL in the backup's image,
//!   read before anything opens the database (opening it would replay the WAL);
//! - `auto-recoverable`: the backup's ext4 data disks mount clean in a guest booted on
//!   them alone, a crash-consistent one after a journal replay the kernel reports.
//!
//! An image that cannot be read makes its check fail with the reason, never the run: on a
//! copy of a live guest the reading itself may be what goes wrong.

use super::super::super::format::{Check, Filesystem};
use super::super::ctx::{verdict, RunCtx, Vm};
use super::super::disk_checks;
use super::super::error::{on, RunError};
use super::Restoring;
use crate::backup::freeze_log::{secs, FreezeRecord};
use crate::backup::{Backup, Method, VmBackup};
use crate::image::fsread::state::Quiesced;
use crate::image::inspect::{FileRead, FsState, RawImage};
use crate::sys::deadline;
use crate::verify::{self, restore, RestoreOptions};
use crate::workload::{self, JournalAtFreeze};

/// The largest journal file this check reads from an image.
const MAX_JOURNAL: u64 = 64 << 20;

/// What the host read from the backup before the restore, for the checks in the guest.
#[derive(Debug, Default)]
pub(super) struct HostFacts {
    /// The size of the app's WAL in the backup's image (Err: why it could not be read).
    pub app_wal: Option<Result<u64, String>>,
}

/// Runs the host's checks of a backup's quiescence that the scenario asks for.
pub(super) async fn host_checks(ctx: &mut RunCtx<'_>, r: &Restoring<'_>) -> Result<HostFacts, RunError> {
    let mut facts = HostFacts::default();
    if r.vb.method != Method::ChildSnapshot {
        return Ok(facts);
    }
    if r.wants(Check::FsQuiesced) {
        let states = disk_checks::fs_quiesced(r.backup, &r.vb);
        let (ok, detail) = ctx.tl.step(Some(r.name()), "read the backup's filesystem states", states).await?;
        verdict(ctx.s, ctx.report, r.name(), Check::FsQuiesced, ok, detail);
    }
    if r.wants(Check::JournalCutAtFreeze) {
        if let Some(path) = &r.vm.journal {
            let (ok, detail) = journal_cut(r, path).await?;
            verdict(ctx.s, ctx.report, r.name(), Check::JournalCutAtFreeze, ok, detail);
        }
    }
    if r.wants(Check::AppConsistent) {
        if let Some(disk) = r.vm.spec.workload.app.as_ref().map(|a| a.get_ref().clone()) {
            // The app keeps its store on the root filesystem, or at a data disk's top.
            let path = if disk == "root" { "/var/lib/quiesce-app/app.db-wal" } else { "/app.db-wal" };
            let read = file_in_backup(r.backup, &r.vb, &disk, path, 0).await;
            facts.app_wal = Some(read.map(|f| f.map_or(0, |f| f.size)));
        }
    }
    Ok(facts)
}

/// Reads `path` (0 `max`: its size only) from the ext filesystem of `disk` in the backup,
/// off the runtime; None if it is not there. Any failure is the reason, as text.
async fn file_in_backup(
    backup: &Backup,
    vb: &VmBackup,
    disk: &str,
    path: &str,
    max: u64,
) -> Result<Option<FileRead>, String> {
    let d = vb.disks.iter().find(|d| d.node_name == disk).ok_or_else(|| format!("the backup has no disk {disk}"))?;
    let (image, format, path) = (backup.vm_dir(&vb.name).join(&d.file), d.format, path.to_owned());
    tokio::task::spawn_blocking(move || RawImage::open(&image, format)?.ext4_file(&path, max))
        .await
        .map_err(|e| format!("reading {disk}: {e}"))?
        .map_err(|e| format!("reading {disk}: {e}"))
}

/// The journal in the backup against the guest's clock: every line acknowledged before
/// the freeze began is there, none acknowledged after the thaw ended is.
async fn journal_cut(r: &Restoring<'_>, path: &str) -> Result<(bool, String), RunError> {
    let freeze = r.vb.freeze.as_ref();
    let (Some(f), Some(t)) = (freeze.and_then(|f| f.freeze_cs), freeze.and_then(|f| f.thaw_cs)) else {
        let why = freeze.map_or("the backup has no freeze record".into(), FreezeRecord::summary);
        return Ok((false, format!("no freeze to place the journal against: {why}")));
    };
    let agent = r.vm.guest.machine.agent().map_err(r.vm.fail("the guest agent"))?;
    let at =
        workload::journal_at_freeze(agent, f, t).await.map_err(r.vm.fail("reading the journal's acknowledgements"))?;
    let disk = r.vm.spec.workload.journal.as_ref().map(|j| j.get_ref().clone()).unwrap_or_default();
    let in_fs = path.strip_prefix(&format!("/mnt/{disk}")).unwrap_or(path);
    let content = match file_in_backup(r.backup, &r.vb, &disk, in_fs, MAX_JOURNAL).await {
        Ok(Some(f)) => f.content,
        Ok(None) => return Ok((false, format!("{disk}:{in_fs} is not in the backup"))),
        Err(why) => return Ok((false, why)),
    };
    Ok(judge_journal(&workload::journal_of(&content), &at, f, t))
}

fn judge_journal(j: &workload::JournalCheck, at: &JournalAtFreeze, f: u64, t: u64) -> (bool, String) {
    let k = j.lines;
    let mut bad = Vec::new();
    if let Some((line, held)) = &j.first_break {
        bad.push(format!("the backup's journal breaks at line {line} ({held:?})"));
    }
    if at.acked_before_freeze > k {
        bad.push(format!(
            "lines {}..={} were acknowledged before the freeze and are missing",
            k + 1,
            at.acked_before_freeze
        ));
    }
    if let Some(a) = at.first_acked_after_thaw.filter(|a| *a <= k) {
        bad.push(format!("lines {a}..={k} were acknowledged after the thaw and are in the backup"));
    }
    let after = at.first_acked_after_thaw.map_or("none yet".into(), |a| a.to_string());
    let detail = format!(
        "backup holds lines 1..={k}; acknowledged before the freeze ({}): 1..={}; first acknowledged after \
         the thaw ({}): {after}; {} lines issued while the freeze was under way{}",
        secs(f),
        at.acked_before_freeze,
        secs(t),
        at.in_window,
        if bad.is_empty() { String::new() } else { format!(": {}", bad.join("; ")) }
    );
    (bad.is_empty(), detail)
}

/// The host's word on an ext4 data disk of the backup: whether it needs a replay.
async fn needs_replay(r: &Restoring<'_>, disk: &str) -> Result<bool, String> {
    let d = r.vb.disks.iter().find(|d| d.node_name == disk).ok_or_else(|| format!("the backup has no disk {disk}"))?;
    let (image, format) = (r.backup.vm_dir(&r.vb.name).join(&d.file), d.format);
    let states = tokio::task::spawn_blocking(move || RawImage::open(&image, format)?.states())
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    match states.iter().find_map(|v| match &v.fs {
        FsState::Ext4(s) => Some(s.quiesced()),
        _ => None,
    }) {
        Some(Quiesced::Clean) => Ok(false),
        Some(Quiesced::NeedsReplay { .. }) => Ok(true),
        Some(Quiesced::Unknown { why }) => Err(why),
        None => Err("no ext4 filesystem".into()),
    }
}

/// `auto-recoverable` for each mounted ext4 data disk of the VM, in `agent`'s guest, which
/// booted on the backup's disks and has not mounted them yet (it mounts them).
pub(super) async fn auto_recoverable(
    ctx: &mut RunCtx<'_>,
    r: &Restoring<'_>,
    agent: &crate::qemu::GuestAgent,
    rname: &str,
) -> Result<(), RunError> {
    for d in r.vm.spec.disks.iter().map(|d| d.get_ref()).filter(|d| d.mount) {
        if d.filesystem != Filesystem::Ext4 {
            continue;
        }
        let disk = d.name.get_ref();
        let host = needs_replay(r, disk).await;
        let rec = verify::guest::recover_ext4(agent, disk, deadline::GUEST_FSCK)
            .await
            .map_err(on(rname, "mounting a backed-up disk"))?;
        let what = if rec.replayed { "journal replayed" } else { "no replay needed" };
        let agrees = host.as_ref().is_ok_and(|h| *h == rec.replayed);
        let host_text = match &host {
            Ok(true) => "the host read needs_recovery set".to_owned(),
            Ok(false) => "the host read it frozen clean".to_owned(),
            Err(why) => format!("the host could not read its state: {why}"),
        };
        let kernel = rec.kernel.iter().map(|k| k.trim()).collect::<Vec<_>>().join(" | ");
        let detail = format!(
            "{} ({}): {host_text}; mounted: {}; kernel: {kernel}; e2fsck -fn after: {}",
            rec.disk,
            rec.device,
            rec.mounted,
            rec.fsck_exit.map_or("not run".into(), |c| format!("exit {c} {}", rec.fsck_tail.replace('\n', " / ")))
        );
        ctx.report.check(r.name(), &format!("auto-recoverable {disk}: {what}"), rec.recovered() && agrees, detail);
    }
    Ok(())
}

/// `auto-recoverable` for a Saved State backup: its disks booted on their own, in a new VM
/// that never sees the saved state, as a Child VM Snapshot restore boots.
pub(super) async fn boot_disks_alone(ctx: &mut RunCtx<'_>, r: &Restoring<'_>) -> Result<(), RunError> {
    let name = r.name();
    let mut ro = RestoreOptions::named(&format!("{name}-disks-alone"));
    ro.artifacts_dir = ctx.opts.artifacts_dir.clone();
    ro.resume = true;
    let booted =
        restore::boot(r.backup, name, &ro, ctx.tl).await.map_err(on(name, "booting the backup's disks alone"))?;
    let agent = booted.machine.agent().map_err(on(&ro.name, "the guest agent"))?;
    agent.wait_ready(deadline::boot_to_agent()).await.map_err(on(&ro.name, "waiting for the guest agent"))?;
    auto_recoverable(ctx, r, agent, &ro.name).await
}

/// With a fault that must make checks fail, each such check the scenario lists must have
/// run on the VM: one that did not would let the scenario pass having proved nothing.
pub(super) fn defeated_checks_ran(ctx: &mut RunCtx<'_>, vm: &Vm) {
    let s = ctx.s;
    let Some(r) = &s.file.restore else { return };
    for check in r.checks.get_ref() {
        let Some(fault) = s.defeated_by(vm.name(), *check) else { continue };
        let name = format!("{} catches {}", check.name(), fault.name());
        if !ctx.report.checks.iter().any(|c| c.vm == vm.name() && c.check == name) {
            ctx.report.check(vm.name(), &name, false, "the check did not run on this VM (no workload for it?)");
        }
    }
}

/// Whether the backup's disks get a boot of their own: a Saved State backup's, when the
/// scenario asks for `auto-recoverable` (a Child VM Snapshot restore is that boot already).
pub(super) fn wants_disks_alone(r: &Restoring<'_>) -> bool {
    r.vb.method == Method::SavedState && r.wants(Check::AutoRecoverable)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::JournalCheck;

    #[test]
    fn the_journal_must_end_between_the_freeze_and_the_thaw() {
        let at = JournalAtFreeze { acked_before_freeze: 100, first_acked_after_thaw: Some(131), in_window: 30 };
        let whole = |k| JournalCheck { lines: k, first_break: None };
        for k in [100, 115, 130] {
            assert!(judge_journal(&whole(k), &at, 1000, 1200).0, "{k}");
        }
        let (ok, detail) = judge_journal(&whole(99), &at, 1000, 1200);
        assert!(!ok && detail.contains("lines 100..=100 were acknowledged before the freeze"), "{detail}");
        let (ok, detail) = judge_journal(&whole(131), &at, 1000, 1200);
        assert!(!ok && detail.contains("lines 131..=131 were acknowledged after the thaw"), "{detail}");
        let broken = JournalCheck { lines: 120, first_break: Some((117, "\0\0".into())) };
        assert!(!judge_journal(&broken, &at, 1000, 1200).0);
        let none_after = JournalAtFreeze { first_acked_after_thaw: None, ..at };
        assert!(judge_journal(&whole(140), &none_after, 1000, 1200).0);
    }
}
