//! Backing up one VM into a backup folder by a chosen method, and recording it in the
//! manifest. (Sets of VMs and the writer phases build on this.)

use std::path::Path;

use super::folder::BackupWriter;
use super::manifest::{MachineSpec, Method, VmBackup};
use super::saved_state::{self, SaveSettings};
use super::BackupError;
use crate::qemu::caps::Capabilities;
use crate::qemu::Machine;
use crate::timeline::Timeline;

/// The machine configuration a restore needs, with kernel and initrd copied into `dir/boot`
/// so the backup restores without the image cache that booted the VM.
pub fn machine_spec(m: &Machine, dir: &Path) -> Result<MachineSpec, BackupError> {
    let cfg = m.config();
    let boot = dir.join("boot");
    std::fs::create_dir_all(&boot).map_err(|e| BackupError::io(m.name(), "create the boot folder", e))?;
    for (from, to) in [(&cfg.boot.kernel, "vmlinuz"), (&cfg.boot.initrd, "initrd.img")] {
        std::fs::copy(from, boot.join(to)).map_err(|e| BackupError::io(m.name(), "copy the kernel and initrd", e))?;
    }
    Ok(MachineSpec {
        machine_type: cfg.machine_type.clone(),
        accel: cfg.accel,
        memory_mib: cfg.memory_mib,
        cpus: cfg.cpus,
        agent: cfg.agent,
        kernel: "boot/vmlinuz".into(),
        initrd: "boot/initrd.img".into(),
        append: cfg.boot.append.clone(),
    })
}

/// Backs `m` up with the Saved State method into `writer`.
pub async fn saved_state(
    m: &Machine,
    caps: &Capabilities,
    settings: &SaveSettings,
    reason: &str,
    writer: &mut BackupWriter,
    tl: &Timeline,
) -> Result<VmBackup, BackupError> {
    let dir = writer.vm_dir(m.name())?;
    let machine = machine_spec(m, &dir)?;
    let saved = saved_state::save(m, caps, settings, &dir, tl).await?;
    let vm = VmBackup {
        name: m.name().to_owned(),
        method: Method::SavedState,
        method_reason: reason.to_owned(),
        run_state_before: saved.before.label().to_owned(),
        machine,
        disks: saved.disks,
        state: Some(saved.state),
        timings: saved.timings,
    };
    writer.add(vm.clone());
    Ok(vm)
}
