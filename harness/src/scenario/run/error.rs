//! Why a scenario run stopped before its checks were done. A failed check is not an error
//! (it is in the report, and the run goes on); an error is the run being unable to go on.
//!
//! Each variant wraps the lower layer's own typed error with where it happened ([`At`]: the
//! VM, the rollback cycle, the step), so the report's `error` reads as "where: what".

use std::fmt;
use std::path::PathBuf;

use super::super::format::SizeError;
use crate::backup::set::SetError;
use crate::backup::FolderError;
use crate::image::fsck::FsckError;
use crate::image::manifest::ManifestError;
use crate::image::qemu_img::QemuImgError;
use crate::image::seed::SeedError;
use crate::qemu::caps::CapsError;
use crate::qemu::exec::ExecError;
use crate::qemu::winexec::WinExecError;
use crate::qemu::{AgentError, MachineError, QmpError};
use crate::sys::ToolError;
use crate::testguest::GuestError;
use crate::verify::blockcmp::BlockCompareError;
use crate::verify::corrupt::CorruptError;
use crate::verify::guest_windows::ChkdskError;
use crate::verify::RestoreError;
use crate::windows::app::AppError;
use crate::windows::guest::WindowsGuestError;
use crate::windows::workload::UnregisterError;

/// Where in the run something failed: the VM it was done to (if any), the rollback cycle
/// (if any), and the step, as a person would name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct At {
    pub vm: Option<String>,
    pub cycle: Option<u32>,
    pub step: &'static str,
}

impl At {
    /// A step of the run as a whole (no VM of its own).
    pub fn run(step: &'static str) -> Self {
        At { vm: None, cycle: None, step }
    }

    /// A step done to VM `vm` (a scenario VM, or a restored one).
    pub fn vm(vm: &str, step: &'static str) -> Self {
        At { vm: Some(vm.to_owned()), cycle: None, step }
    }
}

impl fmt::Display for At {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.vm, self.cycle) {
            (Some(vm), Some(n)) => write!(f, "VM {vm}, rollback cycle {n}, {}", self.step),
            (Some(vm), None) => write!(f, "VM {vm}: {}", self.step),
            (None, Some(n)) => write!(f, "rollback cycle {n}, {}", self.step),
            (None, None) => f.write_str(self.step),
        }
    }
}

/// Where the run was when an interruption (SIGINT, SIGTERM) stopped it between steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interruption {
    /// While the VMs were booting: no backup was started.
    WhileBooting,
    /// After the backup, before any restore.
    AfterBackup,
    /// Between rollback cycles: `n` of `of` was not started.
    BeforeCycle { n: u32, of: u32 },
}

impl fmt::Display for Interruption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Interruption::WhileBooting => f.write_str("interrupted while booting; no backup was started"),
            Interruption::AfterBackup => f.write_str("interrupted after the backup; the restore was not started"),
            Interruption::BeforeCycle { n, of } => write!(f, "interrupted before rollback cycle {n} of {of}"),
        }
    }
}

/// Where a disk the run needs was not found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskPlace {
    /// The backup does not hold it (the job left it out, or it was never backed up).
    Backup,
    /// The restore did not give it back.
    Restored,
    /// The scenario's VM has no such disk.
    Vm,
}

impl fmt::Display for DiskPlace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DiskPlace::Backup => "the backup has",
            DiskPlace::Restored => "the restore gave back",
            DiskPlace::Vm => "the VM has",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// QEMU could not be started to learn its version and capabilities; nothing was booted.
    /// Is QEMU installed (`qemu-system-x86_64`)?
    #[error("probing QEMU: {0}")]
    Probe(#[source] CapsError),
    /// A folder or file of the run could not be made, kept or removed (the work folder, a
    /// VM's folder, the kept backup). The path and the system's reason say why.
    #[error("{at}: {}: {source}", path.display())]
    Io { at: At, path: PathBuf, source: std::io::Error },
    /// The `backup-target-full` fault mounts a small tmpfs as the backup target, which
    /// takes root. Run this scenario as root, or leave it out.
    #[error("the backup-target-full fault mounts a small tmpfs and needs root: {stderr}")]
    NeedsRoot { stderr: String },
    /// The run was interrupted between steps; every VM it started is stopped as it ends.
    #[error("{0}")]
    Interrupted(Interruption),
    /// A disk size the scenario check let through could not be read (a bug in the check).
    #[error("{at}: {source}")]
    Size { at: At, source: SizeError },
    /// A data disk of the scenario could not be made (its image, filesystem or seeded files).
    #[error("{at}: {source}")]
    Seed { at: At, source: SeedError },
    /// A scenario VM did not boot to a guest agent that answers; the error carries QEMU's
    /// output and the serial log's tail.
    #[error("{at}: {source}")]
    Boot { at: At, source: GuestError },
    /// A Windows VM did not boot to ready (no image, no KVM, its agent or VSS never
    /// answered); the error says which, with the machine's evidence.
    #[error("{at}: {source}")]
    WindowsBoot { at: At, source: WindowsGuestError },
    /// A PowerShell workload, check or fault run in a Windows guest failed or outlasted its
    /// deadline; PowerShell's own words are in the error.
    #[error("{at}: {source}")]
    WindowsGuest { at: At, source: WinExecError },
    /// The `vss-provider-unregistered` fault could not take VSS away from the guest.
    #[error("{at}: {source}")]
    VssFault { at: At, source: UnregisterError },
    /// `chkdsk` could not be run in a restored Windows guest (a volume with errors is a
    /// failed check, not this).
    #[error("{at}: {source}")]
    Chkdsk { at: At, source: ChkdskError },
    /// The Windows application-writer hook (`app-hook.ps1`, SQL Server's VSS writer) could
    /// not be run or answered what it never answers; its words are in the error.
    #[error("{at}: {source}")]
    WindowsApp { at: At, source: AppError },
    /// The scenario's `app` workload on a Windows VM needs a user-installed VSS writer
    /// (SQL Server Express), and the image has none. Not a failure: the run reports the
    /// scenario SKIPPED with this text, which says how to add one.
    #[error(
        "VM {vm}: the app workload needs a VSS writer, and this Windows image has none: install SQL Server \
             Express in the image (see guest-images/windows/README.md, \"The application writer\"); \
             app-hook.ps1 -Action detect said \"absent\""
    )]
    NoAppWriter { vm: String },
    /// The scenario asks for something of a Windows VM that this quiesce does not do yet;
    /// the error says what.
    #[error("{at}: not wired for a Windows VM yet: {what}")]
    NotForWindows { at: At, what: &'static str },
    /// A QEMU machine failed a step (QEMU exited, QMP failed, the agent is missing or did
    /// not answer); the error carries the machine's evidence.
    #[error("{at}: {source}")]
    Machine { at: At, source: MachineError },
    /// A QMP command failed or got no reply in time (the VM may have died).
    #[error("{at}: {source}")]
    Qmp { at: At, source: QmpError },
    /// A guest agent command failed or got no reply in time; a guest asked to freeze may
    /// still be frozen until it answers.
    #[error("{at}: {source}")]
    Agent { at: At, source: AgentError },
    /// A command run in the guest (a workload, a check, a fault) failed or outlasted its
    /// deadline; its exit code and stderr are in the error.
    #[error("{at}: {source}")]
    Guest { at: At, source: ExecError },
    /// The backup failed, was refused or was interrupted when the scenario expected it to
    /// succeed (or it failed in a way the scenario did not expect). The error says which VM
    /// failed in which phase, and how each VM was put back.
    #[error("{at}: {source}")]
    Backup { at: At, source: SetError },
    /// The backup folder just written could not be opened or its checksums read.
    #[error("{at}: {source}")]
    Folder { at: At, source: FolderError },
    /// Restoring a VM from the backup failed (to a new VM, or in place); the error says
    /// which step, and for an in-place restore, which of the VM's disks were written.
    #[error("{at}: {source}")]
    Restore { at: At, source: RestoreError },
    /// `qemu-img` failed on a disk image (comparing a restored disk with the backup's).
    #[error("{at}: {source}")]
    Image { at: At, source: QemuImgError },
    /// `e2fsck` could not be run on a backed-up disk (a dirty filesystem is a failed check,
    /// not this).
    #[error("{at}: {source}")]
    Fsck { at: At, source: FsckError },
    /// A disk's file manifest could not be read (the image or its filesystem is unreadable,
    /// or larger than the reader's limits).
    #[error("{at}: {source}")]
    Manifest { at: At, source: ManifestError },
    /// Two images could not be compared block by block (a tool failed or timed out; a
    /// difference is a failed check, not this).
    #[error("{at}: {source}")]
    Blocks { at: At, source: BlockCompareError },
    /// A fault that corrupts a restored disk could not find or write its byte.
    #[error("{at}: {source}")]
    Corrupt { at: At, source: CorruptError },
    /// A program the run starts on the host (`mount` for the small backup target) could
    /// not start or outlasted its deadline; the error names the command.
    #[error("{at}: {source}")]
    Tool { at: At, source: ToolError },
    /// A worker thread that reads whole images panicked or was cancelled.
    #[error("{at}: {source}")]
    Thread { at: At, source: tokio::task::JoinError },
    /// The backup has no record of a VM the scenario backed up.
    #[error("{at}: the backup has no VM {vm}")]
    VmNotBackedUp { at: At, vm: String },
    /// A disk the run needs is not where it must be (the backup left it out, the restore did
    /// not give it back, or the VM lacks it).
    #[error("{at}: {place} no disk {disk}")]
    NoDisk { at: At, place: DiskPlace, disk: String },
    /// The backup succeeded but recorded no method choice for the VM (a bug below).
    #[error("{at}: the backup made no choice for it")]
    NoChoice { at: At },
    /// A rollback disk has fewer than two seeded files left after `ignore`: each cycle
    /// changes one and removes another. (The scenario check rejects this before booting.)
    #[error(
        "rollback cycles change one seeded file and remove another each cycle: disk {disk} needs at least two \
         seeded files that are not ignored"
    )]
    TooFewFiles { disk: String },
}

/// A lower layer's error, and how the run wraps it with where it happened.
pub trait Cause {
    fn at(self, at: At) -> RunError;
}

macro_rules! causes {
    ($($ty:ty => $variant:ident),* $(,)?) => {
        $(impl Cause for $ty {
            fn at(self, at: At) -> RunError {
                RunError::$variant { at, source: self }
            }
        })*
    };
}

causes! {
    SizeError => Size,
    SeedError => Seed,
    GuestError => Boot,
    MachineError => Machine,
    QmpError => Qmp,
    AgentError => Agent,
    ExecError => Guest,
    SetError => Backup,
    FolderError => Folder,
    RestoreError => Restore,
    QemuImgError => Image,
    FsckError => Fsck,
    ManifestError => Manifest,
    BlockCompareError => Blocks,
    CorruptError => Corrupt,
    ToolError => Tool,
    tokio::task::JoinError => Thread,
    WindowsGuestError => WindowsBoot,
    WinExecError => WindowsGuest,
    UnregisterError => VssFault,
    ChkdskError => Chkdsk,
    AppError => WindowsApp,
}

/// Wraps a lower error with a step of the run as a whole: `.map_err(step("..."))`.
pub fn step<E: Cause>(step: &'static str) -> impl FnOnce(E) -> RunError {
    move |e| e.at(At::run(step))
}

/// Wraps a lower error with a step done to VM `vm`: `.map_err(on(name, "..."))`.
pub fn on<'a, E: Cause>(vm: &'a str, step: &'static str) -> impl FnOnce(E) -> RunError + 'a {
    move |e| e.at(At::vm(vm, step))
}

/// Wraps an I/O error with where it happened and the path it was about:
/// `.map_err(io(At::run("..."), &path))`.
pub fn io(at: At, path: &std::path::Path) -> impl FnOnce(std::io::Error) -> RunError + '_ {
    move |source| RunError::Io { at, path: path.to_owned(), source }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_say_where_then_what() {
        let io = || std::io::Error::from(std::io::ErrorKind::NotFound);
        let e = RunError::Io { at: At::run("keeping the backup"), path: "/w/b".into(), source: io() };
        assert_eq!(e.to_string(), format!("keeping the backup: /w/b: {}", io()));
        let at = At { vm: Some("vm1".into()), cycle: Some(3), step: "backup" };
        assert_eq!(
            RunError::NoChoice { at }.to_string(),
            "VM vm1, rollback cycle 3, backup: the backup made no choice for it"
        );
        let at = At::vm("vm1", "reading the backup point's manifests");
        let e = RunError::NoDisk { at, place: DiskPlace::Backup, disk: "data".into() };
        assert_eq!(e.to_string(), "VM vm1: reading the backup point's manifests: the backup has no disk data");
        // The texts of an interrupted run are the ones it always had.
        assert_eq!(
            RunError::Interrupted(Interruption::WhileBooting).to_string(),
            "interrupted while booting; no backup was started"
        );
        let e = RunError::Interrupted(Interruption::BeforeCycle { n: 2, of: 5 });
        assert_eq!(e.to_string(), "interrupted before rollback cycle 2 of 5");
    }
}
