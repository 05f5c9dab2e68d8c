//! The `dd` baseline: how fast this filesystem takes a file of a given size, written
//! sequentially in 1 MiB blocks from `/dev/zero`. With `conv=fsync` dd calls fsync before
//! it exits, so the time includes the flush to the device; without it, dd stops at the
//! page cache, as QEMU's save to a `file:` URI does (QEMU 10.0 does not fsync the state
//! file: checked with strace).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use quiesce::sys::{Tool, ToolError};

/// Why the dd baseline could not be measured.
#[derive(Debug, thiserror::Error)]
pub enum DdError {
    /// dd could not be started (coreutils missing?), missed its deadline and was killed (the
    /// filesystem is far slower than expected), or failed (a full filesystem, usually); the
    /// error names the command and holds what dd said.
    #[error(transparent)]
    Run(#[from] ToolError),
    /// The file dd wrote could not be removed.
    #[error("removing {path}: {source}")]
    Remove { path: PathBuf, source: std::io::Error },
}

/// One timed dd run.
#[derive(Debug, Clone, Copy)]
pub struct DdRun {
    pub bytes: u64,
    pub secs: f64,
}

impl DdRun {
    pub fn mb_per_s(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.secs.max(1e-9)
    }
}

/// The command line, as it is printed in the report.
pub fn cmdline(path: &Path, mib: u64, fsync: bool) -> String {
    let conv = if fsync { " conv=fsync" } else { "" };
    format!("dd if=/dev/zero of={} bs=1M count={mib}{conv} status=none", path.display())
}

/// Writes `mib` MiB to `path` (with `conv=fsync` if `fsync`), times it, and removes the file.
pub async fn write(path: &Path, mib: u64, fsync: bool, timeout: Duration) -> Result<DdRun, DdError> {
    let dd = Tool::new("dd", timeout)
        .arg("if=/dev/zero")
        .arg(format!("of={}", path.display()))
        .args(["bs=1M".to_owned(), format!("count={mib}"), "status=none".to_owned()])
        .args(fsync.then_some("conv=fsync"));
    let started = Instant::now();
    let out = dd.output_async().await;
    let secs = started.elapsed().as_secs_f64();
    let removed = std::fs::remove_file(path);
    out?.into_success()?;
    removed.map_err(|source| DdError::Remove { path: path.to_owned(), source })?;
    Ok(DdRun { bytes: mib << 20, secs })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn dd_writes_times_and_removes_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dd.bin");
        let run = write(&path, 2, true, Duration::from_secs(60)).await.unwrap();
        assert_eq!(run.bytes, 2 << 20);
        assert!(run.secs > 0.0 && !path.exists());
        // A failure is dd's own, with its command line and words.
        let e = write(&dir.path().join("no/such/dir/dd.bin"), 1, false, Duration::from_secs(60)).await.unwrap_err();
        assert!(matches!(&e, DdError::Run(ToolError::Failed { .. })), "{e:?}");
        assert!(e.to_string().contains("dd if=/dev/zero"), "{e}");
    }
}
