//! The typed description of a machine to launch. It is plain data: a scenario or a test
//! builds one, and [`super::launch`] turns it into a QEMU command line.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// A disk image format, named as QEMU's block driver names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    Qcow2,
    Raw,
    /// VHD, which QEMU calls `vpc`.
    Vpc,
    Vhdx,
}

impl DiskFormat {
    pub fn driver(self) -> &'static str {
        match self {
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Raw => "raw",
            DiskFormat::Vpc => "vpc",
            DiskFormat::Vhdx => "vhdx",
        }
    }

    /// The usual file name extension of an image of this format.
    pub fn extension(self) -> &'static str {
        match self {
            DiskFormat::Vpc => "vhd",
            other => other.driver(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiskConfig {
    /// The block node name, also the guest-visible serial (so guest and host agree on names).
    pub node_name: String,
    pub path: PathBuf,
    pub format: DiskFormat,
    #[serde(default)]
    pub read_only: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KernelBoot {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub append: String,
}

impl KernelBoot {
    /// No kernel: the firmware (SeaBIOS) boots the first disk, as a Windows guest boots.
    pub fn firmware() -> Self {
        KernelBoot { kernel: PathBuf::new(), initrd: PathBuf::new(), append: String::new() }
    }

    pub fn is_firmware(&self) -> bool {
        self.kernel.as_os_str().is_empty()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MachineConfig {
    /// A short name used in file names, logs and errors.
    pub name: String,
    pub qemu_binary: PathBuf,
    pub machine_type: String,
    pub accel: Accel,
    pub memory_mib: u32,
    pub cpus: u32,
    pub boot: KernelBoot,
    pub disks: Vec<DiskConfig>,
    /// Wire up a virtio-serial port for qemu-guest-agent.
    pub agent: bool,
    /// Start with the vCPUs stopped (`-S`).
    pub start_paused: bool,
    /// Start waiting for an incoming migration (`-incoming defer`).
    pub incoming_defer: bool,
    /// Where evidence of a failed machine is kept.
    pub artifacts_dir: PathBuf,
}

impl MachineConfig {
    /// A machine with the defaults quiesce's own guest needs; disks are added by the caller.
    pub fn new(name: &str, accel: Accel, boot: KernelBoot) -> Self {
        Self {
            name: name.to_owned(),
            qemu_binary: PathBuf::from(default_qemu_binary()),
            machine_type: "q35".to_owned(),
            accel,
            memory_mib: 512,
            cpus: 1,
            boot,
            disks: Vec::new(),
            agent: true,
            start_paused: false,
            incoming_defer: false,
            artifacts_dir: default_artifacts_dir(),
        }
    }
}

/// The emulator to run: `$QUIESCE_QEMU`, else `qemu-system-x86_64` on PATH (see
/// [`super::programs`]).
pub fn default_qemu_binary() -> String {
    super::programs::QemuProgram::System.path().to_string_lossy().into_owned()
}

/// `$QUIESCE_ARTIFACTS`, else `quiesce-artifacts` in the current folder.
pub fn default_artifacts_dir() -> PathBuf {
    std::env::var_os("QUIESCE_ARTIFACTS").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("quiesce-artifacts"))
}
