//! Copying one disk into the backup, shared by both methods: the image as the guest sees it
//! (through its chain) becomes a standalone image of the disk's own format, so a VHD or VHDX
//! disk is backed up as a VHD or VHDX. Optionally read back against the source.

use std::future::Future;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::faults::Faults;
use super::manifest::DiskEntry;
use super::BackupError;
use crate::image::{copy, qemu_img};
use crate::qemu::{DiskConfig, DiskFormat};
use crate::sys::deadline;

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

/// A disk copied into the backup, hashed and durable; `proved` if the copy was proved as it
/// was made, so [`prove_copies`] has nothing left to read for it.
#[derive(Debug, Clone)]
pub struct HashedCopy {
    pub entry: DiskEntry,
    pub proved: bool,
}

/// True if `disk` is copied by quiesce's own copy ([`crate::image::copy`]): a raw image in a
/// regular file. Other formats need QEMU's drivers, and stay with `qemu-img convert`.
fn own_copy(disk: &DiskConfig) -> bool {
    disk.format == DiskFormat::Raw && copy::can_copy(&disk.path)
}

/// Copies `disk` into `dir` and fills in its size and sha256, reading the data from the
/// source once and never back from the device. A raw image is copied by quiesce's own
/// copy, which proves the copy as it writes it (the copy read back from the host's cache
/// against what was read from the source), hashes it on the way and leaves the source out
/// of the host's cache; it stops once `cancel` is set. Any other format goes through
/// `qemu-img convert`, and the copy is hashed and made durable (fdatasync) at once, while
/// its pages are still cached; its proof is [`prove_copy`], which needs no VM downtime when
/// the source is frozen under an overlay.
pub fn copy_disk_hashed(
    vm: &str,
    disk: &DiskConfig,
    dir: &Path,
    cancel: &AtomicBool,
) -> Result<HashedCopy, BackupError> {
    if own_copy(disk) {
        let file = format!("{}.{}", disk.node_name, disk.format.extension());
        let copied = copy::copy_raw(&disk.path, &dir.join(&file), deadline::QEMU_IMG_COPY, cancel)
            .map_err(|e| copy_error(vm, disk, e))?;
        let entry = DiskEntry {
            node_name: disk.node_name.clone(),
            format: disk.format,
            // A raw image's virtual size is its length.
            virtual_size: copied.bytes,
            file,
            bytes: copied.bytes,
            sha256: copied.sha256,
        };
        return Ok(HashedCopy { entry, proved: true });
    }
    let mut entry = copy_disk(vm, disk, dir, false)?;
    let dst = dir.join(&entry.file);
    let io = |e| BackupError::io(vm, "hash and sync a copied disk", e);
    let f = std::fs::File::open(&dst).map_err(io)?;
    let (sha256, bytes) = super::folder::sha256_and_sync(f).map_err(io)?;
    (entry.sha256, entry.bytes) = (sha256, bytes);
    Ok(HashedCopy { entry, proved: false })
}

/// A failed copy of our own as a backup error: a copy that read back other than its source
/// is a [`BackupError::CaptureMismatch`], as when `qemu-img compare` finds it.
fn copy_error(vm: &str, disk: &DiskConfig, e: copy::CopyError) -> BackupError {
    match e {
        copy::CopyError::Differs { .. } => {
            BackupError::CaptureMismatch { vm: vm.to_owned(), disk: disk.node_name.clone() }
        }
        error => BackupError::Copy { vm: vm.to_owned(), disk: disk.node_name.clone(), error },
    }
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

/// Runs `work` as [`crate::sys::blocking_tools`] does (its tools killed and reaped if this
/// future is dropped), handing it a flag that is set when the future is dropped, before that
/// drop waits for the work to return: quiesce's own copy stops at it within a chunk, so an
/// interrupted job's undo finds no copy still reading the VM's images.
async fn blocking_cancellable<T, F>(work: F) -> Result<T, tokio::task::JoinError>
where
    F: FnOnce(&AtomicBool) -> T + Send + 'static,
    T: Send + 'static,
{
    /// Sets the flag in its own drop, which runs before its fields' (the work's future).
    struct CancelOnDrop<G> {
        cancel: Arc<AtomicBool>,
        work: std::pin::Pin<Box<G>>,
    }
    impl<G> Drop for CancelOnDrop<G> {
        fn drop(&mut self) {
            self.cancel.store(true, Ordering::SeqCst);
        }
    }
    impl<G: Future> Future for CancelOnDrop<G> {
        type Output = G::Output;
        fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<G::Output> {
            self.work.as_mut().poll(cx)
        }
    }
    let cancel = Arc::new(AtomicBool::new(false));
    let flag = cancel.clone();
    CancelOnDrop { cancel, work: Box::pin(crate::sys::blocking_tools(move || work(&flag))) }.await
}

/// [`copy_disk_hashed`] for several disks, on a blocking thread that stops if this future is
/// dropped (an interrupted job): its `qemu-img` is killed and reaped, its own copy stopped,
/// so no copy holds an image's lock when the undo puts the VM back.
pub async fn copy_disks_checked(vm: &str, disks: Vec<DiskConfig>, dir: &Path) -> Result<Vec<HashedCopy>, BackupError> {
    let (vm_owned, dir) = (vm.to_owned(), dir.to_owned());
    blocking_cancellable(move |cancel| disks.iter().map(|d| copy_disk_hashed(&vm_owned, d, &dir, cancel)).collect())
        .await
        .map_err(|e| BackupError::io(vm, "copy the disks", std::io::Error::other(e)))?
}

/// [`copy_disks_checked`], the copies' manifest entries only (those not proved as they were
/// made are not proved).
pub async fn copy_disks_hashed(vm: &str, disks: Vec<DiskConfig>, dir: &Path) -> Result<Vec<DiskEntry>, BackupError> {
    Ok(copy_disks_checked(vm, disks, dir).await?.into_iter().map(|c| c.entry).collect())
}

/// [`prove_copy`] for each of `disks` (in the order of `copies`) whose copy is not proved
/// yet, on a blocking thread; its `qemu-img compare` dies with this future, as in
/// [`copy_disks_checked`].
pub async fn prove_copies(
    vm: &str,
    disks: Vec<DiskConfig>,
    dir: &Path,
    copies: &[HashedCopy],
) -> Result<(), BackupError> {
    let (vm_owned, dir, copies) = (vm.to_owned(), dir.to_owned(), copies.to_vec());
    crate::sys::blocking_tools(move || {
        disks
            .iter()
            .zip(&copies)
            .filter(|(_, c)| !c.proved)
            .try_for_each(|(d, c)| prove_copy(&vm_owned, d, &dir, &c.entry))
    })
    .await
    .map_err(|e| BackupError::io(vm, "verify the copied disks", std::io::Error::other(e)))?
}

#[cfg(test)]
mod tests;
