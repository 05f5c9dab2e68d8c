//! The backup manifest: everything needed to check a backup and restore it later, on
//! another day, without the harness run that made it.

use serde::{Deserialize, Serialize};

use crate::qemu::DiskFormat;

pub const FORMAT_VERSION: u32 = 1;

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
    /// "running" or "paused": what the VM was doing when the backup began.
    pub run_state_before: String,
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
        run_state_before: "running".into(),
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
    }
}
