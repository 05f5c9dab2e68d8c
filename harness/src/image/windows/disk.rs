//! A Windows guest's boot disk as the host reads it: an MBR with a small NTFS "System
//! Reserved" partition (the boot files) and the NTFS volume Windows runs from (C:). The
//! answer file lays it out so (`guest-images/windows/autounattend.xml`); the file
//! manifests read both, and this picks the one a person means by "the Windows disk".

use crate::image::manifest::{FsKind, FsManifest, Manifest};

/// The label Windows Setup gives the boot partition.
pub const SYSTEM_RESERVED: &str = "System Reserved";

/// The Windows volume of a disk's manifest: its NTFS filesystem that is not System
/// Reserved (the first, if there were several).
pub fn windows_volume(m: &Manifest) -> Option<&FsManifest> {
    m.filesystems.iter().find(|f| f.kind == FsKind::Ntfs && f.label != SYSTEM_RESERVED)
}

/// The System Reserved volume, if the disk has one.
pub fn system_reserved(m: &Manifest) -> Option<&FsManifest> {
    m.filesystems.iter().find(|f| f.kind == FsKind::Ntfs && f.label == SYSTEM_RESERVED)
}
