//! Thin, typed calls of `qemu-img`. Overlays always name their backing format: QEMU must
//! never probe a format.

use std::path::Path;
use std::process::Command;

use crate::qemu::DiskFormat;

#[derive(Debug, thiserror::Error)]
pub enum QemuImgError {
    #[error("could not run qemu-img: {0}")]
    Spawn(std::io::Error),
    #[error("`qemu-img {args}` failed ({status}): {stderr}")]
    Failed { args: String, status: String, stderr: String },
    #[error("`qemu-img {args}` printed JSON we could not read: {error}")]
    Json { args: String, error: String },
}

fn run(args: &[&std::ffi::OsStr]) -> Result<Vec<u8>, QemuImgError> {
    let out = Command::new("qemu-img").args(args).output().map_err(QemuImgError::Spawn)?;
    if !out.status.success() {
        return Err(QemuImgError::Failed {
            args: args.iter().map(|a| a.to_string_lossy()).collect::<Vec<_>>().join(" "),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(out.stdout)
}

/// Creates a qcow2 overlay at `path` over `base`, whose format is given explicitly.
pub fn create_overlay(base: &Path, base_format: DiskFormat, path: &Path) -> Result<(), QemuImgError> {
    run(&[
        "create".as_ref(),
        "-q".as_ref(),
        "-f".as_ref(),
        "qcow2".as_ref(),
        "-F".as_ref(),
        base_format.driver().as_ref(),
        "-b".as_ref(),
        base.as_os_str(),
        path.as_os_str(),
    ])?;
    Ok(())
}

/// `qemu-img info` as JSON; `-U` so an image in use by a running QEMU can be inspected.
pub fn info(path: &Path) -> Result<serde_json::Value, QemuImgError> {
    let out = run(&["info".as_ref(), "-U".as_ref(), "--output=json".as_ref(), path.as_os_str()])?;
    serde_json::from_slice(&out)
        .map_err(|e| QemuImgError::Json { args: format!("info {}", path.display()), error: e.to_string() })
}
