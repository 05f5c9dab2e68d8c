//! Deliberate corruption of a restored disk, to prove the verification catches it: one byte
//! of a file's data flipped underneath the filesystem (its size, times and metadata stay
//! as they were, so only the content can give it away).
//!
//! The byte is written through the restored QEMU's own block layer (HMP `qemu-io` on the
//! device's backend, then a flush) while the VM sits before its first instruction: the
//! overlay is the one QEMU holds, so nothing writes behind its back and its caches stay
//! right. Where the file's data lies is read from the backup's image on the host with
//! e2fsprogs (ext4 only).
//!
//! Why HMP and not a writable NBD export of the node: the guest's virtio-blk device does
//! not share write permission on its node (QEMU's default, `share-rw=off`), so
//! `block-export-add` with `writable` is refused with a permission conflict, and a device's
//! sharing cannot change while it exists. qemu-io on the device's own backend is the one
//! writer QEMU allows. HMP answers only its own errors ("Device ... not found"): qemu-io
//! prints its results, failures included ("write failed: ..."), on QEMU's stdout. So the
//! reply must be empty, and the write is then proven by reading the byte back from the
//! image file after the flush: the outcome is a byte compared, not text searched.

use std::path::Path;

use crate::image::{manifest, partition};
use crate::qemu::{DiskFormat, Machine};
use crate::sys::{deadline, Tool, ToolError};

#[derive(Debug, thiserror::Error)]
pub enum CorruptError {
    /// The backup's image could not be read as a raw disk to find the file in.
    #[error("reading {image}: {error}")]
    Image { image: String, error: manifest::ManifestError },
    /// The file's first data byte could not be found: e2fsprogs failed, the file is not
    /// there, or it has no data block of its own (empty, or inline data).
    #[error("locating {path} in {image}: {tool}: {detail}")]
    Locate { image: String, path: String, tool: &'static str, detail: String },
    /// dumpe2fs or debugfs could not run to its end.
    #[error("locating {path} in {image}: {error}")]
    Tool { image: String, path: String, error: ToolError },
    /// The restored VM's QEMU refused the write or the flush; `detail` is what it answered.
    #[error("writing the flipped byte through QEMU ({vm}, disk {disk}): {detail}")]
    Write { vm: String, disk: String, detail: String },
    /// QEMU took the write, but the image file does not hold the byte afterwards (the write
    /// failed inside QEMU, which says so only on its own output), or could not be read.
    #[error("writing the flipped byte through QEMU ({vm}, disk {disk}): {detail}")]
    NotWritten { vm: String, disk: String, detail: String },
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
        let out = Tool::new(tool, deadline::DEBUGFS)
            .args(args)
            .arg(&raw)
            .run()
            .map_err(|error| CorruptError::Tool { image: shown.clone(), path: path.into(), error })?;
        Ok(out.stdout_text())
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
/// through QEMU's block layer, flushes it to the image file, and reads it back from there.
pub async fn write_byte(m: &Machine, disk: &str, offset: u64, value: u8) -> Result<(), CorruptError> {
    let err = |detail: String| CorruptError::Write { vm: m.name().into(), disk: disk.into(), detail };
    let not_written = |detail: String| CorruptError::NotWritten { vm: m.name().into(), disk: disk.into(), detail };
    let file = m
        .config()
        .disks
        .iter()
        .find(|d| d.node_name == disk)
        .ok_or_else(|| err(format!("the machine has no disk {disk:?}")))?;
    // The device's own BlockBackend (a second writer on the node would be refused), by the
    // QOM path QEMU reports for the backend holding the disk's node: on PCI the proxy's
    // child, on virtio-mmio (microvm) the device itself.
    let blocks = m
        .qmp()
        .execute_within(qapi::qmp::query_block {}, deadline::QMP_COMMAND)
        .await
        .map_err(|e| err(format!("query-block: {e}")))?;
    let dev = blocks
        .into_iter()
        .filter(|b| b.inserted.as_ref().and_then(|i| i.node_name.as_deref()) == Some(disk))
        .find_map(|b| b.qdev)
        .ok_or_else(|| err(format!("no device holds node {disk:?} (query-block)")))?;
    qemu_io(m, &dev, &format!("write -P {value:#04x} {offset} 1")).await.map_err(err)?;
    qemu_io(m, &dev, "flush").await.map_err(err)?;
    let (path, format) = (file.path.clone(), file.format);
    let found = tokio::task::spawn_blocking(move || partition::read_bytes(&path, format, offset, 1))
        .await
        .map_err(|e| not_written(format!("reading the byte back: {e}")))?
        .map_err(|e| not_written(format!("reading the byte back: {e}")))?;
    match found.as_slice() {
        [b] if *b == value => Ok(()),
        other => Err(not_written(format!(
            "after the write and flush, byte {offset} of {} holds {other:02x?}, not {value:#04x}",
            file.path.display()
        ))),
    }
}

/// Runs one qemu-io command on the device backend `dev` through HMP. An empty reply means
/// HMP ran it; any reply is HMP's own error, returned whole.
async fn qemu_io(m: &Machine, dev: &str, cmd: &str) -> Result<(), String> {
    let line = format!("qemu-io -d {dev} \"{cmd}\"");
    let hmp = qapi::qmp::human_monitor_command { command_line: line.clone(), cpu_index: None };
    let reply = m.qmp().execute_within(hmp, deadline::QMP_COMMAND).await.map_err(|e| format!("{line}: {e}"))?;
    match reply.trim() {
        "" => Ok(()),
        said => Err(format!("{line}: {said}")),
    }
}
