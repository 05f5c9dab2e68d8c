//! Backups: the two methods, the backup folder and its manifest.

pub mod capture;
pub mod child_snapshot;
pub mod conditions;
pub mod folder;
pub mod job;
pub mod manifest;
pub mod passthrough;
pub mod runstate;
pub mod saved_state;
pub mod set;

pub use folder::{Backup, BackupWriter, FolderError};
pub use manifest::{Manifest, Method, VmBackup};

use crate::image::qemu_img::QemuImgError;
use crate::qemu::MachineError;

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("VM {vm}: {step}: {error}")]
    Step { vm: String, step: String, error: MachineError },
    #[error("VM {vm}: the save ended {status}: {desc}")]
    Migration { vm: String, status: String, desc: String },
    #[error("VM {vm}, disk {disk}: {error}")]
    Image { vm: String, disk: String, error: QemuImgError },
    #[error("VM {vm}, disk {disk}: the captured copy differs from the VM's image at the save point")]
    CaptureMismatch { vm: String, disk: String },
    #[error("VM {vm}: could not {what}: {error}")]
    Io { vm: String, what: String, error: std::io::Error },
    #[error("VM {vm}: {what}")]
    Unsupported { vm: String, what: String },
    #[error("VM {vm}: {step}: {error}")]
    Agent { vm: String, step: String, error: crate::qemu::AgentError },
    #[error("VM {vm}, disk {disk}: merging the overlay back failed: {error}")]
    Merge { vm: String, disk: String, error: String },
    #[error("VM {vm}: Child VM Snapshot was required, but: {reasons}")]
    Refused { vm: String, reasons: String, conditions: Vec<conditions::Verdict> },
    #[error("VM {vm}: block nodes still inactive after returning to the prior state: {nodes:?}")]
    StillInactive { vm: String, nodes: Vec<String> },
    #[error("{error}\n  and then returning VM {vm} to its prior state failed too: {undo}")]
    UndoFailed { vm: String, error: Box<BackupError>, undo: Box<BackupError> },
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
