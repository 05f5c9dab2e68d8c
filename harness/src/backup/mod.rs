//! Backups: the two methods, the backup folder and its manifest.

pub mod attached;
pub mod capture;
pub mod child_snapshot;
pub mod conditions;
pub mod faults;
pub mod folder;
pub mod freeze_log;
pub mod job;
pub mod libvirt;
pub mod manifest;
pub mod merge;
pub mod passthrough;
pub mod recovery;
pub mod runstate;
pub mod saved_state;
pub mod set;
pub mod vss;

#[cfg(test)]
mod windows_peer_tests;

pub use faults::Faults;
pub use folder::{Backup, BackupWriter, FolderError};
pub use manifest::{Manifest, Method, VmBackup};

use crate::image::qemu_img::QemuImgError;
use crate::qemu::MachineError;

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// QEMU refused or did not answer a step of the backup (a QMP command, an event that
    /// never came), or the VM's QEMU is gone; the step and QEMU's own words say which.
    #[error("VM {vm}: {step}: {error}")]
    Step { vm: String, step: String, error: MachineError },
    /// Saving the VM's state failed or was cancelled; `desc` is QEMU's reason.
    #[error("VM {vm}: the save ended {status}: {desc}")]
    Migration { vm: String, status: String, desc: String },
    /// `qemu-img` could not read, copy or compare a disk image.
    #[error("VM {vm}, disk {disk}: {error}")]
    Image { vm: String, disk: String, error: QemuImgError },
    /// quiesce's own copy of a raw disk could not read the image, write the copy (a full
    /// target says "No space left on device"), or finish within its deadline; the partial
    /// copy was removed.
    #[error("VM {vm}, disk {disk}: {error}")]
    Copy { vm: String, disk: String, error: crate::image::copy::CopyError },
    /// The copy read back differs from the image it was taken from: the backup of this disk
    /// cannot be trusted (the source changed under the copy, or the target is faulty).
    #[error("VM {vm}, disk {disk}: the captured copy differs from the VM's image at the save point")]
    CaptureMismatch { vm: String, disk: String },
    /// A file of the backup or an overlay could not be written, read or removed.
    #[error("VM {vm}: could not {what}: {error}")]
    Io { vm: String, what: String, error: std::io::Error },
    /// This QEMU cannot do what the method needs (too old, or missing a feature).
    #[error("VM {vm}: {what}")]
    Unsupported { vm: String, what: String },
    /// The guest agent refused, failed or did not answer a step (freeze, thaw); the step
    /// says whether the guest may still be frozen.
    #[error("VM {vm}: {step}: {error}")]
    Agent { vm: String, step: String, error: crate::qemu::AgentError },
    /// A Windows guest's VSS failed the freeze or the thaw; the agent's own words follow.
    /// A thaw saying writes could be held for 10 s only means the snapshot is not
    /// consistent: the VM's backup has failed (and with it the whole set).
    #[error("VM {vm}: {step}: {error}")]
    Vss { vm: String, step: String, error: vss::VssError },
    /// QEMU's `block-commit` of an overlay back into its disk failed; the VM still writes
    /// to the overlay, which is kept.
    #[error("VM {vm}, disk {disk}: merging the overlay back failed: {error}")]
    Merge { vm: String, disk: String, error: String },
    /// The snapshot volume (where the overlays are) filled up while the guest wrote during
    /// the backup: QEMU paused the VM, holding its writes. The backup has failed; the
    /// overlays were merged (into the room the merge reserve kept) and the VM continued,
    /// which wrote the held writes to its own disks. Give the snapshot folder more room.
    #[error("VM {vm}: the snapshot volume is full: QEMU paused the VM for space on {disks:?}")]
    SnapshotVolumeFull { vm: String, disks: Vec<String> },
    /// Child VM Snapshot was demanded but a condition failed, or Saved State is impossible
    /// for this VM; nothing was touched. `conditions` holds every verdict.
    #[error("VM {vm}: Child VM Snapshot was required, but: {reasons}")]
    Refused { vm: String, reasons: String, conditions: Vec<conditions::Verdict> },
    /// After a save the VM's disks were not made active again: the VM cannot write to them
    /// until they are (QEMU's `blockdev-set-active`, or continuing the VM).
    #[error("VM {vm}: block nodes still inactive after returning to the prior state: {nodes:?}")]
    StillInactive { vm: String, nodes: Vec<String> },
    /// The backup failed and putting the VM back failed too: the VM may be left frozen,
    /// paused or on an overlay, and needs a person to look at it.
    #[error("{error}\n  and then returning VM {vm} to its prior state failed too: {undo}")]
    UndoFailed { vm: String, error: Box<BackupError>, undo: Box<BackupError> },
    /// The backup folder could not be created, written or committed.
    #[error(transparent)]
    Folder(#[from] FolderError),
}

impl BackupError {
    pub fn step(vm: &str, step: &str, error: MachineError) -> Self {
        BackupError::Step { vm: vm.to_owned(), step: step.to_owned(), error }
    }

    pub fn io(vm: &str, what: &str, error: std::io::Error) -> Self {
        BackupError::Io { vm: vm.to_owned(), what: what.to_owned(), error }
    }
}
