//! The faults a scenario injects into its backup, by real mechanisms: the backup job's own
//! fault settings (set here, in the one function that builds a set member), freeze hooks
//! in the guest (added, or the app's made non-executable), a watcher that stops the
//! guest's agent, and a backup target too small to hold the backup. Faults on a restored disk belong to the restore (`restore.rs`).
//!
//! Everything that knows how `backup::set` takes its faults, and how it reports what it
//! could not put back, is in this file, so that a change there is a change here only.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::super::format::{Attach, FaultKind, MethodChoice, Scenario};
use super::ctx::Vm;
use super::error::{io, At, Cause, RunError};
use crate::backup::child_snapshot::SnapshotSettings;
use crate::backup::saved_state::SaveSettings;
use crate::backup::set::{Member, SetError, Undone};
use crate::backup::Faults;
use crate::sys::{deadline, Tool, ToolError};
use crate::workload;

/// How long `hold-past-vss-limit` keeps the guest frozen: past VSS's 10 s hold.
const HOLD_PAST_VSS_LIMIT: Duration = Duration::from_secs(12);

/// The set member for one VM: its method, where its overlays go, and its faults.
pub(super) fn member<'a>(s: &Scenario, vm: &'a Vm, method: MethodChoice) -> Member<'a> {
    let name = vm.name();
    let mut snapshot = SnapshotSettings::new(&vm.snapshot_dir(s));
    if vm.spec.is_windows() {
        // VSS takes far longer than a Linux freeze (crate::windows::deadline says why).
        (snapshot.freeze_deadline, snapshot.thaw_deadline) =
            (crate::windows::deadline::FREEZE, crate::windows::deadline::THAW);
    }
    if let Some(ms) = &s.backup().freeze_deadline_ms {
        snapshot.freeze_deadline = Duration::from_millis(*ms.get_ref());
    }
    let has = |kind| s.has_fault(name, kind);
    Member {
        machine: &vm.guest.machine,
        method,
        snapshot,
        save: SaveSettings::default(),
        declared_iscsi: vm
            .spec
            .disks
            .iter()
            .map(|d| d.get_ref())
            .filter(|d| d.attach == Attach::Iscsi)
            .map(|d| d.name.get_ref().clone())
            .collect(),
        faults: Faults {
            transaction_fails: has(FaultKind::TransactionFails),
            save_fails: has(FaultKind::SaveFails),
            interrupt_after_freeze: has(FaultKind::InterruptAfterFreeze),
            sigint_after_freeze: has(FaultKind::SigintAfterFreeze),
            agent_stops_after_freeze: has(FaultKind::AgentStopsAfterFreeze),
            kill_after_prepare: has(FaultKind::QemuKilledAfterPrepare),
            skip_freeze: has(FaultKind::SkipFreeze),
            hold_frozen_for: has(FaultKind::HoldPastVssLimit).then_some(HOLD_PAST_VSS_LIMIT),
            // Set by `host_faults::adjust`.
            ..Faults::default()
        },
        // quiesce started this VM: it dies with quiesce (PDEATHSIG), nothing to journal.
        journal: None,
    }
}

/// Whether a failed or interrupted backup put every VM back. A VM whose QEMU a fault
/// killed cannot be put back, and is left out; every other one must be.
pub(super) fn every_vm_put_back(s: &Scenario, e: &SetError) -> bool {
    let undone = match e {
        SetError::Failed { undone, .. } | SetError::Interrupted { undone, .. } => &undone[..],
        _ => &[],
    };
    undone
        .iter()
        .filter(|(vm, _)| !s.has_fault(vm, FaultKind::QemuKilledAfterPrepare))
        .all(|(_, what)| !matches!(what, Undone::CouldNotPutBack(_)))
}

/// Installs the faults that live in a VM's guest before the backup starts: freeze hooks
/// that hang or veto the freeze, and the watcher that stops the agent after it froze.
pub(super) async fn arm_guest(s: &Scenario, vm: &Vm) -> Result<(), RunError> {
    if vm.spec.is_windows() {
        return super::windows::arm_guest(s, vm).await;
    }
    if s.has_fault(vm.name(), FaultKind::AgentHangsInFreeze) {
        install_hook(vm, "zz-quiesce-hang", "[ \"$1\" = freeze ] && sleep 11\nexit 0").await?;
    }
    if s.has_fault(vm.name(), FaultKind::AgentFreezeFails) {
        // Sorted after the app's hook, so the app is paused first and the veto must resume
        // it: the undo is what puts the writer back to work.
        let veto = "[ \"$1\" = freeze ] || exit 0\necho \"quiesce fault: this writer vetoes the freeze\" >&2\nexit 1";
        install_hook(vm, "zz-quiesce-veto", veto).await?;
    }
    if s.has_fault(vm.name(), FaultKind::SkipFreezeHooks) {
        // The hook stays in place, but the freeze hook runs only executable scripts: the
        // app is left out of the freeze, as a VSS writer that does not take part.
        let agent = vm.guest.machine.agent().map_err(vm.fail("the guest agent"))?;
        crate::qemu::exec::sh(agent, &format!("chmod a-x {APP_HOOK}"), deadline::guest_exec())
            .await
            .map_err(vm.fail("making the app's freeze hook non-executable"))?;
    }
    if s.has_fault(vm.name(), FaultKind::AgentStopsAfterFreeze) {
        // Silent for longer than the thaw may wait, so the thaw times out; the undo's own
        // wait outlasts it.
        let silence = SnapshotSettings::new(&vm.dir).thaw_deadline + Duration::from_secs(2);
        let agent = vm.guest.machine.agent().map_err(vm.fail("the guest agent"))?;
        workload::stop_agent_after_next_freeze(agent, silence)
            .await
            .map_err(vm.fail("starting the agent-stopping watcher"))?;
    }
    Ok(())
}

/// The test guest's freeze hook that pauses quiesce-app (guest-images/linux/rootfs).
const APP_HOOK: &str = "/etc/qemu/fsfreeze-hook.d/quiesce-app";

/// Installs a fault's freeze hook in the guest: `body` (printf escapes) after `#!/bin/sh`.
/// One that sleeps past the freeze deadline hangs the agent in guest-fsfreeze-freeze; one
/// that fails vetoes the freeze, as a failing VSS writer does.
async fn install_hook(vm: &Vm, name: &str, body: &str) -> Result<(), RunError> {
    let agent = vm.guest.machine.agent().map_err(vm.fail("the guest agent"))?;
    let path = format!("/etc/qemu/fsfreeze-hook.d/{name}");
    let script = format!("printf '#!/bin/sh\\n{body}\\n' > {path} && chmod 755 {path}");
    crate::qemu::exec::sh(agent, &script, deadline::guest_exec())
        .await
        .map_err(vm.fail("installing a fault's freeze hook"))?;
    Ok(())
}

/// A 48 MiB tmpfs: big enough to start a backup, too small to finish one. Unmounted on drop.
pub(super) struct SmallTmpfs(PathBuf);

impl SmallTmpfs {
    pub fn mount(at: &Path) -> Result<Self, RunError> {
        std::fs::create_dir_all(at).map_err(io(At::run("creating the small backup target"), at))?;
        let mount = Tool::new("mount", deadline::MOUNT)
            .args(["-t", "tmpfs", "-o", "size=48m,mode=0700", "quiesce-full-target"])
            .arg(at);
        match mount.run() {
            Ok(_) => Ok(SmallTmpfs(at.to_owned())),
            // mount refuses a user who is not root.
            Err(ToolError::Failed { stderr, .. }) => Err(RunError::NeedsRoot { stderr }),
            Err(e) => Err(e.at(At::run("mounting a small tmpfs"))),
        }
    }
}

impl Drop for SmallTmpfs {
    fn drop(&mut self) {
        // Lazy, so a file still open somewhere cannot keep the mount alive.
        if let Err(e) = Tool::new("umount", deadline::MOUNT).arg("-l").arg(&self.0).run() {
            eprintln!("quiesce: the small backup target stays mounted: {e}");
        }
    }
}
