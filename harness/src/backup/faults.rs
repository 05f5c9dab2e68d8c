//! Fault injection, for tests and scenario files only. Each switch makes one real mechanism
//! fail at one point of a backup (a transaction QEMU cannot carry out, a save target that
//! does not exist, a signal, a killed QEMU), so that the undo paths are proven against real
//! QEMU and a real guest agent.
//!
//! The switches are kept apart from the methods' settings: a production backup passes
//! [`Faults::default`], which injects nothing, and its settings cannot carry a fault by
//! mistake. Every method is given the member's `Faults` the same way and reads only the
//! switches that concern it.

use std::path::PathBuf;
use std::time::Duration;

use crate::interrupt::Interrupt;
use crate::qemu::{GuestAgent, Machine};
use crate::sys::{deadline, Tool};
use crate::timeline::Timeline;

/// How long a faulty Child VM Snapshot waits, before its copy-out, for the guest's writer to
/// fill the snapshot volume: the writer needs a few seconds under TCG on a shared CPU.
const VOLUME_FILLS_WITHIN: Duration = Duration::from_secs(120);

/// Where a faulty Child VM Snapshot asks QEMU to create an overlay: a folder that does not exist.
pub(super) const UNCREATABLE_OVERLAY: &str = "/nonexistent-quiesce-fault/overlay.qcow2";
/// Where a faulty Saved State writes the VM's state: a folder that does not exist.
pub(super) const UNWRITABLE_STATE: &str = "/nonexistent-quiesce-fault/state.bin";

/// The faults to inject into one VM's backup. The default injects none.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Faults {
    /// Child VM Snapshot: the transaction also asks QEMU for an overlay of the VM's last disk
    /// at a path that cannot be created, so the whole transaction fails (and, being atomic,
    /// changes nothing). With several disks, the others' snapshots are rolled back with it.
    pub transaction_fails: bool,
    /// Saved State: the state is written to a folder that does not exist, so `migrate` fails.
    pub save_fails: bool,
    /// Child VM Snapshot: the job's interruption fires right after the guest is frozen.
    pub interrupt_after_freeze: bool,
    /// Child VM Snapshot: this process gets a real SIGINT right after the guest is frozen
    /// (for the CLI, whose handler turns it into the interruption).
    pub sigint_after_freeze: bool,
    /// Child VM Snapshot: the guest stops its agent right after the freeze (a watcher in
    /// the guest does it); the backup waits until the agent is silent before going on.
    pub agent_stops_after_freeze: bool,
    /// Backup sets: this VM's QEMU is killed between PrepareForSnapshot and PostSnapshot.
    pub kill_after_prepare: bool,
    /// Child VM Snapshot: everything as usual, but no freeze is sent, so the guest is never
    /// quiesced and the images are a crash-consistent copy of a live guest. It proves that
    /// the consistency checks fail on such a copy (they must, every time).
    pub skip_freeze: bool,
    /// Child VM Snapshot: the host holds the guest frozen this long before the transaction
    /// (past Windows VSS's 10 s hold limit, its thaw reports that writes went on).
    pub hold_frozen_for: Option<Duration>,
    /// Child VM Snapshot: before the copy-out, wait until QEMU pauses the VM because the
    /// snapshot volume is full (a writer in the guest fills it after the thaw), so that the
    /// volume is full while the images are copied out.
    pub wait_for_full_snapshot_volume: bool,
    /// Child VM Snapshot: the backup target, a mount point, vanishes (lazily unmounted)
    /// after the VM's first disk has been copied, before the next one.
    pub target_vanishes: Option<PathBuf>,
}

impl Faults {
    /// The disk whose snapshot is made to fail, if the transaction is to fail.
    pub(super) fn uncreatable_overlay_for(&self, m: &Machine) -> Option<String> {
        if !self.transaction_fails {
            return None;
        }
        m.config().disks.last().map(|d| d.node_name.clone())
    }

    /// Strikes the faults due right after a successful freeze. `interrupt` is the job's
    /// interruption; `wait` bounds the wait for the agent to fall silent.
    pub(super) async fn after_freeze(&self, agent: &GuestAgent, interrupt: &Interrupt, wait: Duration) {
        if self.interrupt_after_freeze {
            interrupt.trigger();
        }
        if self.sigint_after_freeze {
            let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGINT);
        }
        if let Some(hold) = self.hold_frozen_for {
            tokio::time::sleep(hold).await;
        }
        if self.agent_stops_after_freeze {
            // Had the fault not fired, the backup succeeds and the scenario says so.
            let _ = agent.wait_silent(wait).await;
        }
    }

    /// Strikes the faults due before a Child VM Snapshot's copy-out.
    pub(super) async fn before_copy(&self, m: &Machine, tl: &Timeline) {
        if !self.wait_for_full_snapshot_volume {
            return;
        }
        let full = |d: &serde_json::Value| d["nospace"] == true;
        let waited = m.qmp().wait_event("BLOCK_IO_ERROR", full, VOLUME_FILLS_WITHIN).await;
        // Had the volume not filled, the backup succeeds and the scenario says so.
        if waited.is_ok() {
            tl.mark(Some(m.name()), "fault: snapshot volume full (QEMU paused the VM)");
        }
    }

    /// Strikes the faults due after disk number `index` (from 0) of a VM was copied out.
    pub(super) fn after_disk_copied(&self, index: usize) {
        if let (0, Some(target)) = (index, &self.target_vanishes) {
            // Lazily, as a yanked USB disk or a dropped share goes: the path is gone at once.
            if let Err(e) = Tool::new("umount", deadline::MOUNT).arg("-l").arg(target).run() {
                eprintln!("quiesce: fault: the backup target did not vanish: {e}");
            }
        }
    }

    /// Strikes the faults due between PrepareForSnapshot and PostSnapshot.
    pub(super) fn after_prepare(&self, m: &Machine, tl: &Timeline) {
        if self.kill_after_prepare {
            tl.mark(Some(m.name()), "fault: QEMU killed");
            // Killing through the process group, as a crash would.
            let _ =
                nix::sys::signal::killpg(nix::unistd::Pid::from_raw(m.pid() as i32), nix::sys::signal::Signal::SIGKILL);
        }
    }
}
