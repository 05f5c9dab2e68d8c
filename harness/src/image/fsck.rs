//! `e2fsck -fn` of an ext4 disk image on the host, read through QEMU's drivers (any format,
//! any chain), with no mount and no root: the "auto-recoverable" check of a backup image.

use std::path::Path;
use std::process::Command;

use super::qemu_img::{self, QemuImgError};
use crate::qemu::DiskFormat;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsckResult {
    pub clean: bool,
    /// e2fsck's exit code (0 clean; 4 errors left uncorrected; 8 operational error).
    pub exit_code: i32,
    /// The last lines of what it said.
    pub tail: String,
}

#[derive(Debug, thiserror::Error)]
pub enum FsckError {
    #[error(transparent)]
    Image(#[from] QemuImgError),
    #[error("e2fsck: {0}")]
    Io(#[from] std::io::Error),
}

pub fn ext4(path: &Path, format: DiskFormat) -> Result<FsckResult, FsckError> {
    let dir = tempfile::Builder::new().prefix("quiesce-fsck-").tempdir()?;
    let raw = dir.path().join("disk.raw");
    qemu_img::convert(path, format, &raw, DiskFormat::Raw)?;
    let out = Command::new("e2fsck").args(["-f", "-n"]).arg(&raw).output()?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let lines: Vec<&str> = text.lines().collect();
    let exit_code = out.status.code().unwrap_or(-1);
    Ok(FsckResult { clean: exit_code == 0, exit_code, tail: lines[lines.len().saturating_sub(5)..].join("\n") })
}
