//! Copying one disk into the backup, shared by both methods: the image as the guest sees it
//! (through its chain) becomes a standalone image of the disk's own format, so a VHD or VHDX
//! disk is backed up as a VHD or VHDX. Optionally read back against the source.

use std::path::Path;

use super::faults::Faults;
use super::manifest::DiskEntry;
use super::BackupError;
use crate::image::qemu_img;
use crate::qemu::DiskConfig;

/// Copies `disk` into `dir` (blocking). Sizes and hashes are filled in later, off the
/// VM's critical path.
pub fn copy_disk(vm: &str, disk: &DiskConfig, dir: &Path, verify: bool) -> Result<DiskEntry, BackupError> {
    let img = |error| BackupError::Image { vm: vm.to_owned(), disk: disk.node_name.clone(), error };
    let file = format!("{}.{}", disk.node_name, disk.format.extension());
    let dst = dir.join(&file);
    qemu_img::convert(&disk.path, disk.format, &dst, disk.format).map_err(img)?;
    if verify && !qemu_img::identical(&disk.path, disk.format, &dst, disk.format).map_err(img)? {
        return Err(BackupError::CaptureMismatch { vm: vm.to_owned(), disk: disk.node_name.clone() });
    }
    let virtual_size = qemu_img::virtual_size(&dst).map_err(img)?;
    Ok(DiskEntry {
        node_name: disk.node_name.clone(),
        format: disk.format,
        virtual_size,
        file,
        bytes: 0,
        sha256: String::new(),
    })
}

/// Copies several disks on a blocking thread, striking `faults` between them. Dropping the
/// future (an interruption) kills and reaps the `qemu-img` under way before the drop
/// returns, so the undo that follows finds no helper holding the VM's images.
pub async fn copy_disks(
    vm: &str,
    disks: Vec<DiskConfig>,
    dir: &Path,
    verify: bool,
    faults: Faults,
) -> Result<Vec<DiskEntry>, BackupError> {
    let (vm_owned, dir) = (vm.to_owned(), dir.to_owned());
    let copy_all = move || {
        let mut out = Vec::new();
        for (i, d) in disks.iter().enumerate() {
            out.push(copy_disk(&vm_owned, d, &dir, verify)?);
            faults.after_disk_copied(i);
        }
        Ok(out)
    };
    crate::sys::blocking_tools(copy_all)
        .await
        .map_err(|e| BackupError::io(vm, "copy the disks", std::io::Error::other(e)))?
}
