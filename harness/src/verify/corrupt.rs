//! Deliberate corruption of a restored disk, to prove the verification catches it: one byte
//! of a file's data flipped underneath the filesystem (its size, times and metadata stay
//! as they were, so only the content can give it away).
//!
//! The byte is written through the restored QEMU's own block layer (HMP `qemu-io` on the
//! device's backend, then a flush) while the VM sits before its first instruction: the
//! overlay is the one QEMU holds, so nothing writes behind its back and its caches stay
//! right. Where the file's data lies is read from the backup's image on the host with
//! e2fsprogs (ext4 only).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::json;

use crate::image::manifest;
use crate::qemu::{DiskFormat, Machine};

const T: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum CorruptError {
    #[error("reading {image}: {error}")]
    Image { image: String, error: manifest::ManifestError },
    #[error("locating {path} in {image}: {tool}: {detail}")]
    Locate { image: String, path: String, tool: &'static str, detail: String },
    #[error("writing the flipped byte through QEMU ({vm}, disk {disk}): {detail}")]
    Write { vm: String, disk: String, detail: String },
}

/// Where a file's first data byte is on an ext4 disk, in bytes from the disk's start, and
/// the byte found there.
pub fn locate_ext4(image: &Path, format: DiskFormat, path: &str) -> Result<(u64, u8), CorruptError> {
    let shown = image.display().to_string();
    let locate = |tool, detail: String| CorruptError::Locate { image: shown.clone(), path: path.into(), tool, detail };
    let dir =
        tempfile::Builder::new().prefix("quiesce-corrupt-").tempdir().map_err(|e| locate("tempdir", e.to_string()))?;
    let raw = dir.path().join("disk.raw");
    manifest::to_raw(image, format, &raw).map_err(|error| CorruptError::Image { image: shown.clone(), error })?;
    let run = |tool: &'static str, args: &[&str]| -> Result<String, CorruptError> {
        let out = Command::new(tool).args(args).arg(&raw).output().map_err(|e| locate(tool, e.to_string()))?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            return Err(locate(tool, String::from_utf8_lossy(&out.stderr).trim().to_owned()));
        }
        Ok(text)
    };
    let header = run("dumpe2fs", &["-h"])?;
    let block_size: u64 = header
        .lines()
        .find_map(|l| l.strip_prefix("Block size:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| locate("dumpe2fs", "no \"Block size\" line".into()))?;
    // bmap of logical block 0: the physical block holding the file's first bytes (0 if the
    // file has none, or keeps its data inline).
    let bmap = run("debugfs", &["-R", &format!("bmap \"{path}\" 0")])?;
    let block: u64 = bmap
        .lines()
        .rev()
        .find_map(|l| l.trim().parse().ok())
        .ok_or_else(|| locate("debugfs", format!("bmap printed {:?}", bmap.trim())))?;
    if block == 0 {
        return Err(locate("debugfs", "the file has no data block (empty, or inline data)".into()));
    }
    let offset = block * block_size;
    let mut byte = [0u8];
    std::os::unix::fs::FileExt::read_exact_at(
        &std::fs::File::open(&raw).map_err(|e| locate("read", e.to_string()))?,
        &mut byte,
        offset,
    )
    .map_err(|e| locate("read", e.to_string()))?;
    Ok((offset, byte[0]))
}

/// Writes `value` at `offset` of disk `disk` of a restored machine that has not run yet,
/// through QEMU's block layer, and flushes it to the image file.
pub async fn write_byte(m: &Machine, disk: &str, offset: u64, value: u8) -> Result<(), CorruptError> {
    let err = |detail: String| CorruptError::Write { vm: m.name().into(), disk: disk.into(), detail };
    // The device's own BlockBackend: a second writer on the node would be refused. On PCI
    // the backend is the proxy's child; a virtio-mmio device (microvm) is its own backend.
    let pci = format!("{disk}-dev/virtio-backend");
    let probe = json!({"command-line": format!("qemu-io -d {pci} \"flush\"")});
    let on_pci = m.qmp().execute_raw("human-monitor-command", probe, T).await.map_err(|e| err(e.to_string()))?;
    let dev = if on_pci.as_str().unwrap_or_default().trim().is_empty() { pci } else { format!("{disk}-dev") };
    for cmd in [format!("write -P {value:#04x} {offset} 1"), "flush".to_owned()] {
        let line = format!("qemu-io -d {dev} \"{cmd}\"");
        let out = m
            .qmp()
            .execute_raw("human-monitor-command", json!({"command-line": line}), T)
            .await
            .map_err(|e| err(e.to_string()))?;
        // HMP reports failure as text; qemu-io's own output for a write is a short summary.
        let text = out.as_str().unwrap_or_default();
        if text.contains("rror") || text.contains("onflict") || text.contains("failed") {
            return Err(err(format!("{line}: {}", text.trim())));
        }
    }
    Ok(())
}
