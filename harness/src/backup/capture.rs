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

/// Copies `disk` into `dir` in one pass over the data, and fills in its size and sha256:
/// the copy is hashed and made durable (fdatasync) as soon as it is written, while its
/// pages are still in the host's cache, so the data is read from the source once and
/// never read back from the device. The proof that the copy equals its source is
/// [`prove_copy`], which needs no VM downtime when the source is frozen under an overlay.
pub fn copy_disk_hashed(vm: &str, disk: &DiskConfig, dir: &Path) -> Result<DiskEntry, BackupError> {
    let mut entry = copy_disk(vm, disk, dir, false)?;
    let dst = dir.join(&entry.file);
    let io = |e| BackupError::io(vm, "hash and sync a copied disk", e);
    let f = std::fs::File::open(&dst).map_err(io)?;
    let (sha256, bytes) = super::folder::sha256_and_sync(f).map_err(io)?;
    (entry.sha256, entry.bytes) = (sha256, bytes);
    Ok(entry)
}

/// Reads `entry`'s copy in `dir` back against `disk`'s image (`qemu-img compare`): a
/// difference is [`BackupError::CaptureMismatch`].
pub fn prove_copy(vm: &str, disk: &DiskConfig, dir: &Path, entry: &DiskEntry) -> Result<(), BackupError> {
    let img = |error| BackupError::Image { vm: vm.to_owned(), disk: disk.node_name.clone(), error };
    if !qemu_img::identical(&disk.path, disk.format, &dir.join(&entry.file), disk.format).map_err(img)? {
        return Err(BackupError::CaptureMismatch { vm: vm.to_owned(), disk: disk.node_name.clone() });
    }
    Ok(())
}

/// [`copy_disk_hashed`] for several disks, on a blocking thread whose `qemu-img` is killed
/// and reaped if this future is dropped (an interrupted job), so no copy holds an image's
/// lock when the undo puts the VM back.
pub async fn copy_disks_hashed(vm: &str, disks: Vec<DiskConfig>, dir: &Path) -> Result<Vec<DiskEntry>, BackupError> {
    let (vm_owned, dir) = (vm.to_owned(), dir.to_owned());
    crate::sys::blocking_tools(move || disks.iter().map(|d| copy_disk_hashed(&vm_owned, d, &dir)).collect())
        .await
        .map_err(|e| BackupError::io(vm, "copy the disks", std::io::Error::other(e)))?
}

/// [`prove_copy`] for each of `disks` (in the order of `entries`), on a blocking thread;
/// its `qemu-img compare` dies with this future, as in [`copy_disks_hashed`].
pub async fn prove_copies(
    vm: &str,
    disks: Vec<DiskConfig>,
    dir: &Path,
    entries: &[DiskEntry],
) -> Result<(), BackupError> {
    let (vm_owned, dir, entries) = (vm.to_owned(), dir.to_owned(), entries.to_vec());
    crate::sys::blocking_tools(move || {
        disks.iter().zip(&entries).try_for_each(|(d, e)| prove_copy(&vm_owned, d, &dir, e))
    })
    .await
    .map_err(|e| BackupError::io(vm, "verify the copied disks", std::io::Error::other(e)))?
}
