//! `e2fsck -fn` of an ext4 disk image on the host, read through QEMU's drivers (any format,
//! any chain), with no mount and no root: the "auto-recoverable" check of a backup image.

use std::path::Path;

use super::qemu_img::{self, QemuImgError};
use crate::qemu::DiskFormat;
use crate::sys::{deadline, Tool, ToolError};

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
    /// The image could not be read as a raw disk for e2fsck (qemu-img failed on it).
    #[error(transparent)]
    Image(#[from] QemuImgError),
    /// e2fsck could not run or did not finish (it is in Debian's e2fsprogs). Its verdict
    /// on the filesystem, even a bad one, is no error: it is in [`FsckResult`].
    #[error(transparent)]
    Tool(#[from] ToolError),
    /// A temporary folder for the raw copy could not be made.
    #[error("e2fsck: a temporary folder for the raw disk: {0}")]
    Io(#[from] std::io::Error),
}

pub fn ext4(path: &Path, format: DiskFormat) -> Result<FsckResult, FsckError> {
    let dir = tempfile::Builder::new().prefix("quiesce-fsck-").tempdir()?;
    let raw = dir.path().join("disk.raw");
    qemu_img::convert(path, format, &raw, DiskFormat::Raw)?;
    // Its exit code is the verdict, so any code is an answer.
    let out = Tool::new("e2fsck", deadline::E2FSCK).args(["-f", "-n"]).arg(&raw).output()?;
    let text = format!("{}{}", out.stdout_text(), out.stderr);
    let lines: Vec<&str> = text.lines().collect();
    let exit_code = out.code().unwrap_or(-1);
    Ok(FsckResult { clean: exit_code == 0, exit_code, tail: lines[lines.len().saturating_sub(5)..].join("\n") })
}
