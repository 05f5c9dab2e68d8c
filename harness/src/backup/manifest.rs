//! The backup manifest: everything needed to check a backup and restore it later, on
//! another day, without the harness run that made it.
//!
//! A manifest is read from a folder that may come from anywhere (a colleague, a CI
//! artifact), so reading one is bounded ([`MAX_MANIFEST_BYTES`]) and every file it names is
//! a plain relative name inside its VM's folder (see [`Manifest::named_files`] and
//! `folder::paths`, which checks them against the folder itself).

use serde::{Deserialize, Serialize};

use crate::qemu::DiskFormat;

/// The format this quiesce writes. 2: every file of a VM's folder besides its disks and
/// its state (the kernel and initrd under `boot/`) is listed in [`VmBackup::files`] with its
/// checksum. 1 had no such list, so its boot files cannot be checked.
pub const FORMAT_VERSION: u32 = 2;

/// The oldest format this quiesce still reads: a format-1 backup opens and verifies, with
/// a warning that its boot files are unchecked.
pub const OLDEST_FORMAT: u32 = 1;

/// A manifest.json larger than this is refused unread. A VM's entry is a few KiB, so this
/// holds a set of about a thousand VMs; nothing quiesce writes comes near it.
pub const MAX_MANIFEST_BYTES: u64 = 4 << 20;

/// Why the bytes of a manifest.json are not a manifest this quiesce can read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    /// The file is not JSON, or not of a manifest's shape (a field missing or of the wrong
    /// type): it is damaged, or was not written by quiesce. `why` is serde's reason.
    #[error("{why}")]
    Shape { why: String },
    /// The manifest has no `format_version`, or one that is not a whole number.
    #[error("it has no format_version (a whole number)")]
    NoVersion,
    /// Written by a quiesce with another manifest format: a newer one, or one too old.
    #[error("manifest format {found}; this quiesce reads formats {OLDEST_FORMAT} to {FORMAT_VERSION}")]
    Version { found: u64 },
    /// Two VMs have one name, so they would share one folder: the manifest was edited.
    #[error("two VMs are named {name:?}")]
    DuplicateVm { name: String },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub format_version: u32,
    pub quiesce_version: String,
    pub qemu_version: String,
    pub created_unix: u64,
    pub vms: Vec<VmBackup>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    SavedState,
    ChildSnapshot,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::SavedState => "saved-state",
            Method::ChildSnapshot => "child-snapshot",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VmBackup {
    pub name: String,
    pub method: Method,
    /// Why this method was used, in words a person understands.
    pub method_reason: String,
    /// The Child VM Snapshot conditions, as evaluated (empty when Saved State was forced).
    #[serde(default)]
    pub conditions: Vec<super::conditions::Verdict>,
    /// What the VM was doing when the backup began ("running" or "paused" in the file).
    pub run_state_before: super::runstate::Activity,
    pub machine: MachineSpec,
    pub disks: Vec<DiskEntry>,
    /// The RAM and device state (Saved State only).
    pub state: Option<StateEntry>,
    /// Disks the host could not back up (pass-through, iSCSI). A restore attaches blank
    /// disks in their place, so the machine has the same devices.
    #[serde(default)]
    pub excluded: Vec<ExcludedDisk>,
    pub timings: Timings,
    /// Child VM Snapshot: what the guest's writers acknowledged at the freeze.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub freeze: Option<super::freeze_log::FreezeRecord>,
    /// Every other file of the VM's folder (the kernel and initrd under `boot/`), with its
    /// checksum. Empty in format 1, whose boot files are therefore unchecked.
    #[serde(default)]
    pub files: Vec<FileEntry>,
}

/// A file of a VM's folder that is neither a disk nor the saved state.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FileEntry {
    /// Relative to the VM's folder in the backup.
    pub file: String,
    pub bytes: u64,
    pub sha256: String,
}

/// The machine and device configuration a restore must reproduce.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MachineSpec {
    pub machine_type: String,
    /// A saved state restores only under the accelerator (and CPU model) that made it.
    pub accel: crate::qemu::Accel,
    pub memory_mib: u32,
    pub cpus: u32,
    pub agent: bool,
    /// Kernel and initrd are kept in the backup (files relative to the VM's folder).
    pub kernel: String,
    pub initrd: String,
    pub append: String,
    /// Every disk's node name, in device order (backed up or not).
    #[serde(default)]
    pub disk_order: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ExcludedDisk {
    pub node_name: String,
    pub virtual_size: u64,
    pub why: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DiskEntry {
    pub node_name: String,
    pub format: DiskFormat,
    pub virtual_size: u64,
    /// Relative to the VM's folder in the backup.
    pub file: String,
    pub bytes: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StateEntry {
    pub file: String,
    pub bytes: u64,
    pub sha256: String,
    /// Migration capabilities the restore must set the same way.
    pub mapped_ram: bool,
    pub multifd_channels: Option<u8>,
    /// The disks of a paused VM that its QEMU left inactive after the save, because it
    /// cannot make them active without running the VM (no `blockdev-set-active` before QEMU
    /// 10.0): they become active when the VM is continued. Empty otherwise.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inactive_until_continued: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Timings {
    /// How long the VM was not running because of the backup (none if it was paused).
    pub downtime_ms: Option<f64>,
    pub save_ms: Option<f64>,
    pub save_mb_per_s: Option<f64>,
    pub capture_ms: f64,
    /// Child VM Snapshot: from sending the freeze until the thaw returned.
    pub freeze_window_ms: Option<f64>,
    /// The host's share of that window: from the freeze returning until the thaw was sent.
    #[serde(default)]
    pub freeze_host_ms: Option<f64>,
    /// Child VM Snapshot: merging the overlay back into the live image.
    #[serde(default)]
    pub merge_ms: Option<f64>,
    /// Child VM Snapshot: whether the merge caught up with the guest by itself, or the VM
    /// was paused to finish it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merge_outcome: Option<super::merge::MergeOutcome>,
}

/// Which entry of a VM's manifest names a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// A backed-up disk, by its node name.
    Disk(String),
    /// The saved RAM and device state.
    State,
    /// The kernel the machine boots (its spec's `kernel`).
    Kernel,
    /// The initrd the machine boots (its spec's `initrd`).
    Initrd,
    /// Another file of the VM's folder ([`VmBackup::files`]).
    File,
}

impl std::fmt::Display for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Entry::Disk(node) => write!(f, "disk {node}"),
            Entry::State => f.write_str("saved state"),
            Entry::Kernel => f.write_str("kernel"),
            Entry::Initrd => f.write_str("initrd"),
            Entry::File => f.write_str("file"),
        }
    }
}

/// One file a manifest names, and the checksum it gives (none for the machine's kernel and
/// initrd, which are checksummed as [`Entry::File`]s, or not at all in format 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Named<'a> {
    pub vm: &'a str,
    pub entry: Entry,
    /// Relative to the VM's folder.
    pub file: &'a str,
    pub checksum: Option<(u64, &'a str)>,
}

impl Manifest {
    /// Reads the bytes of a manifest.json: its format version first, so a newer format is
    /// refused as such rather than as a damaged file, then the whole.
    pub fn from_json(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        #[derive(Deserialize)]
        struct Probe {
            format_version: Option<serde_json::Value>,
        }
        let shape = |e: serde_json::Error| ManifestError::Shape {
            why: crate::qemu::message::snippet(e.to_string().as_bytes()),
        };
        let probe: Probe = serde_json::from_slice(bytes).map_err(shape)?;
        let found =
            probe.format_version.as_ref().and_then(serde_json::Value::as_u64).ok_or(ManifestError::NoVersion)?;
        if !(u64::from(OLDEST_FORMAT)..=u64::from(FORMAT_VERSION)).contains(&found) {
            return Err(ManifestError::Version { found });
        }
        let manifest: Manifest = serde_json::from_slice(bytes).map_err(shape)?;
        for (i, vm) in manifest.vms.iter().enumerate() {
            if manifest.vms[..i].iter().any(|v| v.name == vm.name) {
                return Err(ManifestError::DuplicateVm { name: crate::qemu::message::snippet(vm.name.as_bytes()) });
            }
        }
        Ok(manifest)
    }

    /// Every file the manifest names, VM by VM: disks, state, kernel, initrd, other files.
    pub fn named_files(&self) -> impl Iterator<Item = Named<'_>> {
        self.vms.iter().flat_map(VmBackup::named_files)
    }
}

impl VmBackup {
    /// Every file this VM's entry names: disks, state, kernel, initrd, other files.
    pub fn named_files(&self) -> impl Iterator<Item = Named<'_>> {
        let vm = self.name.as_str();
        let disks = self.disks.iter().map(move |d| Named {
            vm,
            entry: Entry::Disk(d.node_name.clone()),
            file: &d.file,
            checksum: Some((d.bytes, &d.sha256)),
        });
        let state = self.state.iter().map(move |s| Named {
            vm,
            entry: Entry::State,
            file: &s.file,
            checksum: Some((s.bytes, &s.sha256)),
        });
        // A VM the firmware boots from its own disk (a Windows guest) has no kernel or
        // initrd: its manifest names none, and there is no file to check.
        let firmware = self.machine.kernel.is_empty() && self.machine.initrd.is_empty();
        let boot = [(Entry::Kernel, &self.machine.kernel), (Entry::Initrd, &self.machine.initrd)]
            .into_iter()
            .filter(move |_| !firmware)
            .map(move |(entry, file)| Named { vm, entry, file, checksum: None });
        let files = self.files.iter().map(move |f| Named {
            vm,
            entry: Entry::File,
            file: &f.file,
            checksum: Some((f.bytes, &f.sha256)),
        });
        disks.chain(state).chain(boot).chain(files)
    }
}

/// A backup of VM "vm1" (Saved State of a running q35 TCG guest) with these disks, for
/// unit tests that need a manifest to work on.
#[cfg(test)]
pub(crate) fn sample_vm(disks: Vec<DiskEntry>) -> VmBackup {
    VmBackup {
        name: "vm1".into(),
        method: Method::SavedState,
        method_reason: "test".into(),
        conditions: vec![],
        run_state_before: super::runstate::Activity::Running,
        machine: MachineSpec {
            machine_type: "q35".into(),
            accel: crate::qemu::Accel::Tcg,
            memory_mib: 256,
            cpus: 1,
            agent: true,
            kernel: "boot/vmlinuz".into(),
            initrd: "boot/initrd.img".into(),
            append: "".into(),
            disk_order: disks.iter().map(|d| d.node_name.clone()).collect(),
        },
        disks,
        state: None,
        excluded: vec![],
        timings: Timings::default(),
        freeze: None,
        files: vec![],
    }
}
