//! The faults backup products meet in production, injected by real mechanisms on the host
//! and in the guest: a snapshot volume that fills up while the guest writes during the
//! copy-out, a merge a busy guest outpaces, and a backup target that vanishes mid-copy.
//! (A quiesce killed mid-backup is `scenario::stale` and its test.)
//!
//! Each needs a small tmpfs (root, to mount it), a writer in the guest started by a freeze
//! hook on the thaw (so that its writes land in the overlays), and checks after the job
//! that prove what the guest saw acknowledged is on its own disks.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::super::format::{FaultKind, Scenario};
use super::ctx::{RunCtx, Vm};
use super::error::{io, At, Cause, RunError};
use crate::backup::merge::MergeOutcome;
use crate::backup::set::Member;
use crate::qemu::exec;
use crate::sys::{deadline, Tool, ToolError};
use crate::workload;

/// The room the VM's volume keeps free beyond the merge reserve once the guest is set up:
/// far less than the writer writes after the thaw, so the overlays fill it.
const VOLUME_HEADROOM: u64 = 16 << 20;
/// What the filler overwrites after the thaw (a file written before the backup, so its
/// clusters exist in the disk, and merging them needs no new room there).
const FILL_MIB: u32 = 48;
/// A merge's rate limit when the guest is to outpace it: far below what the writer writes
/// (4 MiB at a time, with direct I/O, over and over; several MiB/s even under TCG).
const SLOW_MERGE: u64 = 128 << 10;
/// How long that merge may take to catch up before the VM is paused to finish it.
const SHORT_CONVERGE: Duration = Duration::from_secs(10);
/// How long the guest's filler may take to finish its writes after the job (it waited in
/// a paused VM, then writes the rest).
const FILLER_ENDS: Duration = Duration::from_secs(120);

/// A tmpfs mounted for the run, unmounted (lazily) on drop unless it is gone already.
pub(super) struct Tmpfs(PathBuf);

impl Tmpfs {
    pub fn mount(at: &Path, size: &str) -> Result<Self, RunError> {
        std::fs::create_dir_all(at).map_err(io(At::run("creating a tmpfs mount point"), at))?;
        let opts = format!("size={size},mode=0700");
        let mount = Tool::new("mount", deadline::MOUNT).args(["-t", "tmpfs", "-o", &opts, "quiesce-fault"]).arg(at);
        match mount.run() {
            Ok(_) => Ok(Tmpfs(at.to_owned())),
            // mount refuses a user who is not root.
            Err(ToolError::Failed { stderr, .. }) => Err(RunError::NeedsRoot { stderr }),
            Err(e) => Err(e.at(At::run("mounting a tmpfs"))),
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // The backup-target-vanishes fault unmounted it already.
        if !is_mount_point(&self.0) {
            return;
        }
        if let Err(e) = Tool::new("umount", deadline::MOUNT).arg("-l").arg(&self.0).run() {
            eprintln!("quiesce: a fault's tmpfs stays mounted at {}: {e}", self.0.display());
        }
    }
}

/// Whether `path` is a mount point now.
fn is_mount_point(path: &Path) -> bool {
    super::super::stale::mount_points().iter().any(|m| m == path)
}

/// Mounts what must exist before the VMs boot: a tmpfs as the folder of each VM whose
/// snapshot volume is to fill (its disks and overlays on one volume, so the Child VM
/// Snapshot condition holds). Kept for the rest of the run.
pub(super) fn before_boot(s: &Scenario, work: &Path) -> Result<Vec<Tmpfs>, RunError> {
    let mut mounts = Vec::new();
    for spec in s.vms() {
        if s.has_fault(spec.name.get_ref(), FaultKind::SnapshotVolumeFull) {
            mounts.push(Tmpfs::mount(&work.join(spec.name.get_ref()), "1g")?);
        }
    }
    Ok(mounts)
}

/// Where the backup goes when its target is to vanish, with the tmpfs it lives on.
pub(super) fn vanishing_target(s: &Scenario, work: &Path) -> Result<Option<(Tmpfs, PathBuf)>, RunError> {
    if !s.any_fault(FaultKind::BackupTargetVanishes) {
        return Ok(None);
    }
    let at = work.join("target");
    Ok(Some((Tmpfs::mount(&at, "1g")?, at.join("backup"))))
}

/// Sets the faults of this file on a VM's set member.
pub(super) fn adjust(s: &Scenario, vm: &Vm, work: &Path, member: &mut Member<'_>) {
    let has = |kind| s.has_fault(vm.name(), kind);
    member.faults.wait_for_full_snapshot_volume = has(FaultKind::SnapshotVolumeFull);
    if has(FaultKind::BackupTargetVanishes) {
        member.faults.target_vanishes = Some(work.join("target"));
    }
    if has(FaultKind::MergeDoesNotConverge) {
        member.snapshot.merge_speed = Some(SLOW_MERGE);
        member.snapshot.merge_converge = SHORT_CONVERGE;
    }
}

/// Sets up the guest side before the backup: the file the filler overwrites and the
/// writers the thaw starts; then leaves the VM's volume only a little room.
pub(super) async fn arm(s: &Scenario, vm: &Vm) -> Result<(), RunError> {
    let agent = vm.guest.machine.agent().map_err(vm.fail("the guest agent"))?;
    let data = vm.journal.as_deref().and_then(|j| j.strip_suffix("/journal")).unwrap_or("/mnt/data").to_owned();
    if s.has_fault(vm.name(), FaultKind::SnapshotVolumeFull) {
        let prep = format!(
            "dd if=/dev/urandom of={data}/fill-src bs=1M count={FILL_MIB} 2>/dev/null && \
             dd if=/dev/zero of={data}/fill bs=1M count={FILL_MIB} 2>/dev/null && sync"
        );
        let wait = deadline::under_load(deadline::GUEST_WRITE_DATA);
        exec::sh(agent, &prep, wait).await.map_err(vm.fail("writing the filler's files"))?;
        // Direct I/O with fsync: each write dd sees succeed is on the VM's disk, not in a cache.
        let fill = format!(
            "dd if={data}/fill-src of={data}/fill bs=1M conv=notrunc,fsync oflag=direct 2>/run/fill.err; echo $? > /run/fill.rc"
        );
        install_thaw_hook(vm, "zz-quiesce-fill", &fill, "/run/fill.pid").await?;
        shrink_volume(vm)?;
    }
    if s.has_fault(vm.name(), FaultKind::MergeDoesNotConverge) {
        // Its source is made now, so that the thaw starts the writing itself at once.
        let prep = "dd if=/dev/urandom of=/run/busy-src bs=1M count=4 2>/dev/null";
        exec::sh(agent, prep, deadline::guest_exec()).await.map_err(vm.fail("writing the busy writer's source"))?;
        let busy = format!(
            "i=0; while :; do dd if=/run/busy-src of={data}/busy bs=1M count=4 seek=$((i % 8 * 4)) conv=notrunc \
             oflag=direct 2>/dev/null; i=$((i+1)); done"
        );
        install_thaw_hook(vm, "zz-quiesce-busy", &busy, "/run/busy.pid").await?;
    }
    Ok(())
}

/// Installs a freeze hook that, on the first thaw, starts `script` in its own session
/// (its pid in `pidfile`), so that its writes go to the overlays.
async fn install_thaw_hook(vm: &Vm, name: &str, script: &str, pidfile: &str) -> Result<(), RunError> {
    let agent = vm.guest.machine.agent().map_err(vm.fail("the guest agent"))?;
    let path = format!("/etc/qemu/fsfreeze-hook.d/{name}");
    let body = format!(
        "#!/bin/sh\n[ \"$1\" = thaw ] || exit 0\n[ -e {pidfile} ] && exit 0\n\
         setsid sh -c '{script}' </dev/null >/dev/null 2>&1 &\necho $! > {pidfile}\nexit 0\n"
    );
    let install = format!("cat > {path} <<'QUIESCE_HOOK'\n{body}QUIESCE_HOOK\nchmod 755 {path}");
    exec::sh(agent, &install, deadline::guest_exec()).await.map_err(vm.fail("installing a thaw hook"))?;
    Ok(())
}

/// Leaves the VM's volume the merge reserve and [`VOLUME_HEADROOM`] of room.
fn shrink_volume(vm: &Vm) -> Result<(), RunError> {
    let at = || At::vm(vm.name(), "measuring the VM's volume");
    let st = nix::sys::statvfs::statvfs(&vm.dir).map_err(|e| io(at(), &vm.dir)(std::io::Error::from(e)))?;
    let used = (st.blocks() - st.blocks_free()) * st.fragment_size();
    let size = used + crate::backup::child_snapshot::DEFAULT_MERGE_RESERVE + VOLUME_HEADROOM;
    Tool::new("mount", deadline::MOUNT)
        .args(["-o", &format!("remount,size={size}")])
        .arg(&vm.dir)
        .run()
        .map_err(|e| e.at(At::vm(vm.name(), "shrinking the VM's volume")))?;
    Ok(())
}

/// After the job: the guest's writers are done or stopped, and what they saw succeed is
/// on the VM's disks; the merge's outcome is the one the fault leads to.
pub(super) async fn after_job(ctx: &mut RunCtx<'_>, vm: &Vm) -> Result<(), RunError> {
    let s = ctx.s;
    let agent = vm.guest.machine.agent().map_err(vm.fail("the guest agent"))?;
    let data = vm.journal.as_deref().and_then(|j| j.strip_suffix("/journal")).unwrap_or("/mnt/data").to_owned();
    if s.has_fault(vm.name(), FaultKind::SnapshotVolumeFull) {
        // The filler's writes waited in the paused VM and went on after it was continued:
        // it must end having seen every write succeed, and read back (from the disk, the
        // caches dropped) exactly what it wrote.
        let script = format!(
            "while [ ! -s /run/fill.rc ]; do usleep 50000; done; rc=$(cat /run/fill.rc); sync; \
             echo 3 > /proc/sys/vm/drop_caches; if cmp -s {data}/fill-src {data}/fill; then s=same; else s=differ; fi; \
             echo \"$rc $s\""
        );
        let out = exec::sh(agent, &script, FILLER_ENDS).await.map_err(vm.fail("waiting for the filler"))?;
        let ok = out.trim() == "0 same";
        let detail = format!("dd exit status and the file read back from disk: {}", out.trim());
        ctx.report.check(vm.name(), "acknowledged-writes-on-disk", ok, detail);
    }
    if s.has_fault(vm.name(), FaultKind::MergeDoesNotConverge) {
        workload::stop_background(agent, "/run/busy.pid").await.map_err(vm.fail("stopping the busy writer"))?;
        let outcome =
            ctx.report.vms.iter().find(|r| r.name == vm.name()).and_then(|r| r.timings.as_ref()?.merge_outcome);
        let paused = matches!(outcome, Some(MergeOutcome::PausedToFinish { .. }));
        ctx.report.check(vm.name(), "merge-paused-to-finish", paused, format!("{outcome:?}"));
    }
    Ok(())
}
