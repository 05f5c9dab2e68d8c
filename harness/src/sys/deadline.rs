//! Every deadline quiesce puts on a wait, one per kind of wait, named for what it bounds.
//!
//! A deadline is how long quiesce believes the wait can honestly take, with room for a
//! loaded 2-core host running guests under TCG; past it, something is stuck, and the caller
//! says what it waited for. Waits whose length the user may choose (the freeze and thaw
//! windows, a migration, a block job) are settings of their own; their defaults are here,
//! at the end.
//!
//! Every wait in the crate (and in the benchmarks) takes one of these, or a setting that
//! defaults to one. What is left elsewhere is local to one protocol and says why where it
//! is written: a retry's pause, a poll's interval, a grace on top of another deadline.

use std::time::Duration;

// --- QEMU and its guest -------------------------------------------------------------------

/// A QMP command that QEMU answers at once (`query-*`, `cont`, `stop`, `migrate-incoming`,
/// `human-monitor-command`...). QEMU answers these in milliseconds; its main loop can be
/// held a few seconds by a slow storage call or a starved vCPU thread under TCG.
pub const QMP_COMMAND: Duration = Duration::from_secs(30);

/// An event a command just caused (`RESUME` after `cont`, `STOP` after `stop`, `MIGRATION`
/// after `migrate_cancel`): QEMU sends it as part of handling the command, so it takes as
/// long as a command.
pub const COMMAND_EVENT: Duration = QMP_COMMAND;

/// Connecting to a QEMU that was just started and reading its QMP greeting: QEMU greets once
/// it has parsed its arguments and opened its disks, under a second here.
pub const QMP_CONNECT: Duration = Duration::from_secs(20);

/// [`QMP_CONNECT`] for a QEMU starting now, stretched by [`under_load`]: starting QEMU
/// (loading it, parsing its arguments, its first QMP reply) takes CPU time like any other
/// program (20 s ran out on the capability probe's machine-less QEMU in a CI run at two
/// scenarios at once).
pub fn qmp_connect() -> Duration {
    under_load(QMP_CONNECT)
}

/// Reading the QMP greeting of a QEMU that is already running (`quiesce backup --qmp`): it
/// greets at once on accept, so a socket silent this long is not a free QMP monitor.
pub const QMP_ATTACH_GREETING: Duration = Duration::from_secs(5);

/// A QEMU whose QMP greeting failed, exiting by itself: it is most often exiting already,
/// on an argument it refused, and only its exit status and words are wanted.
pub const QEMU_FAILED_START_EXIT: Duration = Duration::from_secs(2);

/// QEMU honouring `quit`, and then SIGTERM, when a machine is dropped: it flushes its disks
/// and exits in well under a second; a QEMU that needs longer is killed.
pub const QEMU_QUIT: Duration = Duration::from_secs(3);

/// A short command in the guest through the agent (`guest-exec` of a small script, and the
/// status polls until it ends): the guest runs it in milliseconds, and under TCG with a
/// busy workload in a few seconds.
pub const GUEST_EXEC: Duration = Duration::from_secs(30);

/// [`GUEST_EXEC`] for a command starting now, stretched by [`under_load`]: the guest's
/// share of a core shrinks as the host's load grows (30 s fired on starting the guest app
/// at a load of 15 on 2 cores, eight scenarios at once, while the guest was only slow).
pub fn guest_exec() -> Duration {
    under_load(GUEST_EXEC)
}

/// Writing a scenario's data in the guest (`dd` of tens of MiB from `/dev/urandom` and
/// `sync`, as a fault's filler does): a few seconds under TCG; the guest's CPU share shrinks
/// with the host's load, so callers stretch it with [`under_load`] (30 s fired at a load of
/// 13 on 2 cores with six scenarios at once, while `dd` was only slow).
pub const GUEST_WRITE_DATA: Duration = Duration::from_secs(60);

/// A guest agent command that the agent answers at once (`guest-ping`,
/// `guest-fsfreeze-status`, `guest-get-fsinfo`, starting a `guest-exec`...).
pub const AGENT_COMMAND: Duration = Duration::from_secs(30);

/// One `guest-sync` sent to an agent that may not be up yet: short, so an agent that comes
/// up is found soon after it does; the caller retries until its own deadline.
pub const AGENT_SYNC_ATTEMPT: Duration = Duration::from_secs(1);

/// A `guest-ping` unanswered this long means the agent is stopped or hung: a live agent
/// answers in milliseconds.
pub const AGENT_SILENCE: Duration = Duration::from_secs(1);

/// An agent command asked while checking a backup's conditions. Short on purpose: a hung
/// agent is itself a finding (the agent cannot freeze), and must not hold the job up.
pub const CONDITION_AGENT_COMMAND: Duration = Duration::from_secs(3);

/// [`CONDITION_AGENT_COMMAND`] for questions asked now, stretched by [`under_load`]: an
/// agent on a loaded host answers late without being hung (3 s fired at a load of 15 on 2
/// cores, and the VM fell back to Saved State for an agent that was only slow).
pub fn condition_agent_command() -> Duration {
    under_load(CONDITION_AGENT_COMMAND)
}

/// A guest booting to an agent that answers (the test guest, or a VM restored from a disk-only
/// backup): about 5 s under TCG; this leaves room for a loaded CI machine.
pub const BOOT_TO_AGENT: Duration = Duration::from_secs(90);

/// [`BOOT_TO_AGENT`] for a boot starting now, scaled by [`under_load`]: the guests a set
/// has already booted run their workloads while the next one boots, and under TCG each
/// takes a core's share. A fixed 90 s fired on the 5th to 8th VM of a set at a load of 25
/// on 2 cores (`quiesce-bench set-load`) while the guest was only slow, not stuck.
pub fn boot_to_agent() -> Duration {
    under_load(BOOT_TO_AGENT)
}

/// The most a deadline is stretched by the host's load: past this the host is not loaded
/// but overcommitted, and the wait should fire and say so.
pub const MAX_LOAD_FACTOR: f64 = 8.0;

/// `base` stretched by the host's 1-minute load average per core (`/proc/loadavg`), never
/// shortened, at most [`MAX_LOAD_FACTOR`] times: a wait for work that needs CPU time takes
/// longer in wall time when more runnable threads share the cores.
pub fn under_load(base: Duration) -> Duration {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|l| l.parse::<f64>().ok()));
    scaled(base, load.unwrap_or(0.0), cores)
}

/// The arithmetic of [`under_load`]: `base` times the load per core, within 1..=[`MAX_LOAD_FACTOR`].
pub fn scaled(base: Duration, load: f64, cores: usize) -> Duration {
    let per_core = if load.is_finite() { load / cores.max(1) as f64 } else { 0.0 };
    base.mul_f64(per_core.clamp(1.0, MAX_LOAD_FACTOR))
}

/// A guest's agent answering again once its VM runs on (resumed from a saved state, or
/// thawed and merged): the agent was never stopped, only the VM, so a few seconds.
pub const AGENT_AFTER_RESUME: Duration = Duration::from_secs(30);

/// A clean power-off of the test guest (`system_powerdown` to QEMU's exit): about a second;
/// this leaves room for a loaded host.
pub const GUEST_SHUTDOWN: Duration = Duration::from_secs(60);

/// `e2fsck -fn` of a data disk inside a guest: a few seconds for 64 MiB under TCG.
pub const GUEST_FSCK: Duration = Duration::from_secs(120);

/// The guest app's own consistency check (`quiesce-app check`): it copies its database and
/// sums it with sqlite3, a few seconds under TCG.
pub const APP_CHECK: Duration = Duration::from_secs(120);

/// A boot of the guest kernel under KVM, probing whether KVM works: a working KVM boots to
/// the kernel's deliberate panic in about a second.
pub const KVM_PROBE_BOOT: Duration = Duration::from_secs(6);

/// The KVM probe's QEMU after SIGTERM: it has finished, or hangs in KVM and is killed.
pub const KVM_PROBE_STOP: Duration = Duration::from_millis(200);

/// `qemu-system-* --version`, which prints a line and exits.
pub const QEMU_VERSION: Duration = Duration::from_secs(10);

// --- helper tools on images -----------------------------------------------------------------

/// `qemu-img` on an image's metadata (`info`, `create`, `check`) and `qemu-io` reading a
/// disk's first sectors: headers and tables only, milliseconds to a second for any image.
pub const QEMU_IMG_METADATA: Duration = Duration::from_secs(60);

/// `qemu-img map` of one image: it walks every allocation table, which takes seconds on a
/// large, fragmented image.
pub const QEMU_IMG_MAP: Duration = Duration::from_secs(300);

/// `qemu-img convert` and `compare`: they read (and write) whole disks, so their time grows
/// with the data. Scenario disks (at most 1 GiB) copy in seconds; this leaves room for
/// images of tens of GiB given on the command line, at the speed of a slow disk.
pub const QEMU_IMG_COPY: Duration = Duration::from_secs(15 * 60);

/// `e2fsck -fn` of a disk: it reads every inode and directory, seconds for a scenario disk.
pub const E2FSCK: Duration = Duration::from_secs(300);

/// One `debugfs` or `dumpe2fs` session on a disk image (reading a superblock, mapping a
/// file's block, setting a few inodes' times): milliseconds.
pub const DEBUGFS: Duration = Duration::from_secs(60);

/// Making and filling a seeded filesystem (`mkfs.ext4 -d`, `mkfs.vfat`, `mkntfs`, one
/// `ntfscp`): a second for the small disks scenarios seed.
pub const MKFS: Duration = Duration::from_secs(120);

/// `mount` or `umount` of a tmpfs (the small backup target a fault makes): in memory,
/// milliseconds.
pub const MOUNT: Duration = Duration::from_secs(30);

/// Building a guest image from its recipe: downloading its Debian packages (the first time)
/// and making its root filesystem. A minute or two here; a slow mirror may take far longer.
pub const IMAGE_BUILD: Duration = Duration::from_secs(30 * 60);

// --- processes ------------------------------------------------------------------------------

/// A process after SIGKILL: the kernel ends it at once unless it is stuck in an
/// uninterruptible wait (a dead NFS server, a failing disk). Past this it is left to be
/// reaped by a thread of its own, so the caller is not held up and no zombie is left.
pub const KILLED_EXIT: Duration = Duration::from_secs(10);

/// `qemu-storage-daemon` after SIGTERM, when a block comparison is done with it: it closes
/// its exports and exits at once.
pub const STORAGE_DAEMON_STOP: Duration = Duration::from_secs(5);

/// Seeing whether `qemu-storage-daemon` has exited, for the evidence of an NBD failure (a
/// daemon that hung up on us is usually exiting already).
pub const STORAGE_DAEMON_EXIT: Duration = Duration::from_secs(2);

/// One NBD exchange with `qemu-storage-daemon` (the handshake, sending a batch of reads,
/// each reply): it reads at most a few MiB of a local image for it.
pub const NBD_EXCHANGE: Duration = Duration::from_secs(60);

// --- defaults of the waits a setting may change -----------------------------------------------

/// `guest-fsfreeze-freeze`: the agent runs the freeze hooks (the app pauses at a transaction
/// boundary) and freezes each filesystem. Well inside VSS's 10 s hold limit; a guest that
/// needs more is reported as failing to freeze.
pub const GUEST_FREEZE: Duration = Duration::from_secs(8);

/// `guest-fsfreeze-thaw`: thawing, then the thaw hooks (the app resumes).
pub const GUEST_THAW: Duration = Duration::from_secs(10);

/// A block job merging an overlay back into its disk (`block-commit` to READY, then
/// COMPLETED): the writes made during a backup, seconds for scenario disks.
pub const BLOCK_MERGE: Duration = Duration::from_secs(300);

/// A VM's state migrated to or from a file (Saved State, and its restore): RAM at the
/// disk's speed, seconds for scenario guests.
pub const STATE_FILE_MIGRATION: Duration = Duration::from_secs(300);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loaded_host_stretches_a_deadline_and_an_idle_one_never_shortens_it() {
        let base = Duration::from_secs(90);
        assert_eq!(scaled(base, 0.3, 2), base, "an idle host keeps the base");
        assert_eq!(scaled(base, 6.0, 2), Duration::from_secs(270), "load 6 on 2 cores: 3x");
        assert_eq!(scaled(base, 25.0, 2), base.mul_f64(MAX_LOAD_FACTOR), "capped");
        assert_eq!(scaled(base, f64::NAN, 2), base, "an unreadable load keeps the base");
        assert_eq!(scaled(base, 4.0, 0), base.mul_f64(4.0), "no core count reads as one");
        assert!(boot_to_agent() >= BOOT_TO_AGENT);
    }
}
