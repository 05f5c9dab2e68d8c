//! What a scenario may say of a Windows VM (`image = "windows"` on a `[[vm]]`): the checks
//! that only Windows VMs need, kept apart from the format's general checks.
//!
//! - Its data disks hold NTFS (or nothing): Windows does not read ext4 or seeded FAT.
//! - The Windows-only faults (`hold-past-vss-limit`, `vss-provider-unregistered`) go on
//!   Windows VMs only.
//! - A freeze deadline may reach 90 s: VSS's requester alone waits up to 60 s for its
//!   provider, and peers give a Windows freeze 60-90 s. (Linux guests keep the 10 s cap.)

use std::ops::Range;

use super::spec::*;

/// The recipe name that makes a VM a Windows VM.
pub const WINDOWS_IMAGE: &str = crate::image::windows::RECIPE;

impl VmSpec {
    /// Whether the VM runs Windows: the Windows test guest, or an own image said to.
    pub fn is_windows(&self) -> bool {
        self.image.get_ref().is_windows()
    }
}

impl FaultKind {
    /// Faults that only a Windows guest's VSS can have.
    pub fn windows_only(self) -> bool {
        matches!(self, FaultKind::HoldPastVssLimit | FaultKind::VssProviderUnregistered)
    }
}

/// The largest `freeze_deadline_ms` the scenario may set.
pub(super) fn max_freeze_deadline_ms(f: &ScenarioFile) -> u64 {
    if f.vms.iter().any(|v| v.get_ref().is_windows()) {
        90_000
    } else {
        10_000
    }
}

pub(super) fn check(f: &ScenarioFile) -> Result<(), (Range<usize>, String)> {
    for fault in &f.faults {
        let fs = fault.get_ref();
        if !fs.kind.windows_only() {
            continue;
        }
        let vm = f.vms.iter().map(|v| v.get_ref()).find(|v| v.name.get_ref() == fs.vm.get_ref());
        if vm.is_some_and(|v| !v.is_windows()) {
            return Err((
                fs.vm.span(),
                format!("this fault is a Windows VSS fault: VM {:?} is not image = \"windows\"", fs.vm.get_ref()),
            ));
        }
    }
    for vm in f.vms.iter().map(|v| v.get_ref()).filter(|v| v.is_windows()) {
        for d in &vm.disks {
            let d = d.get_ref();
            if !matches!(d.filesystem, Filesystem::Ntfs | Filesystem::None) {
                let msg = format!("disk {}: a Windows VM's data disks hold ntfs (or none)", d.name.get_ref());
                return Err((d.name.span(), msg));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    fn parse(text: &str) -> Result<super::super::Scenario, String> {
        super::super::parse(Path::new("win.toml"), text).map_err(|e| e.to_string())
    }

    const VM: &str = "description = \"w\"\n[[vm]]\nname = \"w1\"\nimage = \"windows\"\n";

    #[test]
    fn windows_vms_take_ntfs_their_faults_and_a_longer_freeze() {
        let ok = format!("{VM}[[vm.disk]]\nname = \"data\"\nformat = \"vhdx\"\nsize = \"64M\"\nfilesystem = \"ntfs\"\n\
                          [backup]\nfreeze_deadline_ms = 90000\n[[fault]]\nvm = \"w1\"\nkind = \"hold-past-vss-limit\"\n");
        let s = parse(&ok).unwrap();
        assert!(s.vms().next().unwrap().is_windows());
        let ext4 = format!(
            "{VM}[[vm.disk]]\nname = \"data\"\nformat = \"qcow2\"\nsize = \"64M\"\nfilesystem = \"ext4\"\n[backup]\n"
        );
        assert!(parse(&ext4).unwrap_err().contains("win.toml:6:8: disk data: a Windows VM's data disks hold ntfs"));
        let linux = "description = \"l\"\n[[vm]]\nname = \"l1\"\n[backup]\nfreeze_deadline_ms = 20000\n";
        assert!(parse(linux).unwrap_err().contains("expected 100 to 10000"));
        let linux_fault = "description = \"l\"\n[[vm]]\nname = \"l1\"\n[backup]\n[[fault]]\nvm = \"l1\"\nkind = \"vss-provider-unregistered\"\n";
        assert!(parse(linux_fault).unwrap_err().contains("is a Windows VSS fault"));
    }
}
