//! The `dd` baseline: how fast this filesystem takes a file of a given size, written
//! sequentially in 1 MiB blocks from `/dev/zero`. With `conv=fsync` dd calls fsync before
//! it exits, so the time includes the flush to the device; without it, dd stops at the
//! page cache, as QEMU's save to a `file:` URI does (QEMU 10.0 does not fsync the state
//! file: checked with strace).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Why the dd baseline could not be measured.
#[derive(Debug, thiserror::Error)]
pub enum DdError {
    /// dd could not be started (coreutils missing?) or waited for.
    #[error("could not start dd: {0}")]
    Spawn(std::io::Error),
    /// dd missed its deadline and was killed: the filesystem is far slower than expected.
    #[error("`{cmdline}` did not finish within {waited:?}")]
    Timeout { cmdline: String, waited: Duration },
    /// dd failed; `stderr` says why (a full filesystem, usually).
    #[error("`{cmdline}` failed ({status}): {stderr}")]
    Failed { cmdline: String, status: String, stderr: String },
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
    let line = cmdline(path, mib, fsync);
    let started = Instant::now();
    let child = tokio::process::Command::new("dd")
        .arg("if=/dev/zero")
        .arg(format!("of={}", path.display()))
        .args(["bs=1M".to_owned(), format!("count={mib}"), "status=none".to_owned()])
        .args(fsync.then_some("conv=fsync"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(DdError::Spawn)?;
    let out = match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Err(_) => return Err(DdError::Timeout { cmdline: line, waited: timeout }),
        Ok(r) => r.map_err(DdError::Spawn)?,
    };
    let secs = started.elapsed().as_secs_f64();
    let removed = std::fs::remove_file(path);
    if !out.status.success() {
        return Err(DdError::Failed {
            cmdline: line,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    removed.map_err(|source| DdError::Remove { path: path.to_owned(), source })?;
    Ok(DdRun { bytes: mib << 20, secs })
}
