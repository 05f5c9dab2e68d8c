//! Merging a Child VM Snapshot's overlay back into its disk, and the two ways that goes
//! wrong in production: the snapshot volume fills up, and a merge that never catches up
//! with a busy guest.
//!
//! - **A full snapshot volume.** The guest's writes land in the overlays until they are
//!   merged. When the overlays' volume is full, QEMU holds the failed write and pauses the
//!   VM (`werror=enospc`: the guest never sees the error; see `qemu::launch`), and reports
//!   `BLOCK_IO_ERROR` with `nospace`. Merging needs room too (each new cluster of the
//!   overlay becomes a new cluster of the disk), so before the snapshot a **merge reserve**
//!   file is allocated in the snapshot folder and released just before any merge. A VM
//!   found paused for space fails its backup ([`super::BackupError::SnapshotVolumeFull`]):
//!   its overlays are merged, the reserve giving the room, and it is continued, which
//!   retries the held writes on its own disks.
//! - **A merge that does not converge.** An active commit reports `BLOCK_JOB_READY` only
//!   once it has caught up with the guest's writes. It runs at a bounded rate
//!   ([`super::child_snapshot::SnapshotSettings::merge_speed`]) so that it does not starve
//!   the guest's own I/O, and must catch up within
//!   [`super::child_snapshot::SnapshotSettings::merge_converge`]. If it has not, the VM is
//!   paused, the rate limit lifted, the merge finished, and the VM continued: a short,
//!   measured pause ([`MergeOutcome::PausedToFinish`]) instead of an overlay that is never
//!   merged. The pause is undone on every path; for a VM quiesce did not start it is
//!   written to the recovery journal before the `stop`, so that a quiesce killed during it
//!   leaves the next run enough to merge and resume ([`super::recovery`]).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::saved_state::qmp;
use super::BackupError;
use crate::qemu::Machine;
use crate::sys::deadline;

/// How a VM's overlays were merged back, in its backup's timings and the JSON report.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum MergeOutcome {
    /// Every active commit caught up with the guest's writes by itself; the guest ran on.
    Converged,
    /// A commit had not caught up with the guest's writes by the convergence deadline: the
    /// VM was paused for `paused_ms` while the commit finished at full speed.
    PausedToFinish { paused_ms: f64 },
}

impl MergeOutcome {
    /// The outcome of merging several disks: the pauses add up.
    pub fn then(self, next: MergeOutcome) -> MergeOutcome {
        match (self, next) {
            (MergeOutcome::Converged, n) => n,
            (s, MergeOutcome::Converged) => s,
            (MergeOutcome::PausedToFinish { paused_ms: a }, MergeOutcome::PausedToFinish { paused_ms: b }) => {
                MergeOutcome::PausedToFinish { paused_ms: a + b }
            }
        }
    }
}

/// The file that holds the merge reserve of VM `vm` in `snapshot_dir`.
pub fn reserve_path(snapshot_dir: &Path, vm: &str) -> PathBuf {
    snapshot_dir.join(format!("{vm}-merge-reserve"))
}

/// Allocates `bytes` of real space (not a sparse file) at `path`, for the merge to use
/// later. A volume too full to hold it refuses the backup before anything is frozen.
pub fn make_reserve(vm: &str, path: &Path, bytes: u64) -> Result<(), BackupError> {
    let io = |e| BackupError::io(vm, &format!("allocate the merge reserve {}", path.display()), e);
    let f = std::fs::OpenOptions::new().write(true).create_new(true).open(path).map_err(io)?;
    let len = i64::try_from(bytes).unwrap_or(i64::MAX);
    if let Err(e) =
        nix::fcntl::fallocate(std::os::fd::AsRawFd::as_raw_fd(&f), nix::fcntl::FallocateFlags::empty(), 0, len)
    {
        drop(f);
        let _ = std::fs::remove_file(path);
        return Err(io(std::io::Error::from(e)));
    }
    Ok(())
}

/// The disks (QEMU device names) QEMU has paused the VM for because their volume is full.
pub async fn paused_for_space(m: &Machine) -> Result<Vec<String>, BackupError> {
    let blocks = qmp(m, "query-block", Value::Null).await?;
    Ok(blocks
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|b| b["io-status"] == "nospace")
                .map(|b| b["qdev"].as_str().or(b["device"].as_str()).unwrap_or("?").to_owned())
                .collect()
        })
        .unwrap_or_default())
}

/// How one commit is run: its rate limit, how long it may take to catch up with the guest
/// before the VM is paused, and how long the rest may take.
#[derive(Debug, Clone, Copy)]
pub struct CommitLimits {
    pub speed: Option<u64>,
    pub converge: Duration,
    pub finish: Duration,
}

/// Told, before the VM is paused to finish a merge (`true`) and once it is resumed
/// (`false`): the recovery journal's hook. An error before the pause refuses the pause.
pub type Pausing<'a> = dyn Fn(bool) -> Result<(), BackupError> + Send + Sync + 'a;

/// Commits overlay node `overlay` into disk `base`, whose node in QEMU is `base_node` (the
/// same name for a VM quiesce started; one QEMU made up for a VM it did not start).
pub async fn commit(
    m: &Machine,
    base: &str,
    base_node: &str,
    overlay: &str,
    limits: CommitLimits,
    pausing: &Pausing<'_>,
) -> Result<MergeOutcome, BackupError> {
    let job = format!("commit-{base}");
    let _ = m.qmp().events().drain("BLOCK_JOB_READY");
    let _ = m.qmp().events().drain("BLOCK_JOB_COMPLETED");
    let mut args = json!({"job-id": job, "device": overlay, "base-node": base_node});
    if let Some(speed) = limits.speed {
        args["speed"] = json!(speed);
    }
    qmp(m, "block-commit", args).await?;
    let is_job = |d: &Value| d["device"] == job.as_str();
    // A commit that fails (its target cannot be written) ends without ever being ready:
    // that is an error at once, not a merge that did not converge.
    let first = tokio::select! {
        r = m.qmp().wait_event("BLOCK_JOB_READY", is_job, limits.converge) => r.map(|_| None),
        e = m.qmp().wait_event("BLOCK_JOB_COMPLETED", is_job, limits.converge) => e.map(Some),
    };
    match first {
        Ok(None) => {
            complete(m, base, &job, limits.finish).await?;
            Ok(MergeOutcome::Converged)
        }
        Ok(Some(ended)) => {
            let error = ended.data["error"].as_str().unwrap_or("the commit ended before it caught up").to_owned();
            Err(BackupError::Merge { vm: m.name().to_owned(), disk: base.to_owned(), error })
        }
        Err(crate::qemu::QmpError::Event(crate::qemu::WaitError::Timeout { .. })) => {
            finish_paused(m, base, &job, limits.finish, pausing).await
        }
        Err(e) => Err(step(m, "wait for the commit of", base, e)),
    }
}

fn step(m: &Machine, what: &str, base: &str, e: crate::qemu::QmpError) -> BackupError {
    BackupError::step(m.name(), &format!("{what} {base}"), m.qmp_err(e))
}

/// Pivots a commit that is ready and waits for it to end.
async fn complete(m: &Machine, base: &str, job: &str, within: Duration) -> Result<(), BackupError> {
    qmp(m, "job-complete", json!({"id": job})).await?;
    let is_job = |d: &Value| d["device"] == job;
    let done = m
        .qmp()
        .wait_event("BLOCK_JOB_COMPLETED", is_job, within)
        .await
        .map_err(|e| step(m, "wait for the pivot of", base, e))?;
    if let Some(err) = done.data["error"].as_str() {
        return Err(BackupError::Merge { vm: m.name().to_owned(), disk: base.to_owned(), error: err.to_owned() });
    }
    Ok(())
}

/// The commit did not converge in time: pause the VM so the guest stops writing, lift the
/// rate limit, finish, and continue the VM whatever happened.
async fn finish_paused(
    m: &Machine,
    base: &str,
    job: &str,
    within: Duration,
    pausing: &Pausing<'_>,
) -> Result<MergeOutcome, BackupError> {
    let running = super::runstate::query(m).await.map_err(|e| BackupError::step(m.name(), "query-status", e))?.running;
    let t = Instant::now();
    if running {
        // Journaled first: a quiesce killed from here on leaves a paused VM to resume.
        pausing(true)?;
        let _ = m.qmp().events().drain("STOP");
        qmp(m, "stop", Value::Null).await?;
        m.qmp()
            .wait_event("STOP", |_| true, deadline::COMMAND_EVENT)
            .await
            .map_err(|e| step(m, "wait for STOP before merging", base, e))?;
        // Test-only: the recovery tests kill quiesce here, the VM paused, the merge unfinished.
        crate::timeline::hold_point(Some(m.name()), &format!("finish the merge of {base} paused")).await;
    }
    let finished = async {
        qmp(m, "block-job-set-speed", json!({"device": job, "speed": 0})).await?;
        let is_job = |d: &Value| d["device"] == job;
        m.qmp()
            .wait_event("BLOCK_JOB_READY", is_job, within)
            .await
            .map_err(|e| step(m, "wait (paused) for the commit of", base, e))?;
        complete(m, base, job, within).await
    }
    .await;
    // Continued on every path: a merge that failed even so must not leave the guest paused.
    let resumed = if running { resume(m).await } else { Ok(()) };
    let paused_ms = t.elapsed().as_secs_f64() * 1000.0;
    // Resumed: the journal no longer names the pause (a VM still paused keeps it named).
    let noted = if running && resumed.is_ok() { pausing(false) } else { Ok(()) };
    finished?;
    resumed?;
    noted?;
    Ok(MergeOutcome::PausedToFinish { paused_ms })
}

/// Continues a VM paused to finish a merge, and waits for QEMU to say it runs.
pub(crate) async fn resume(m: &Machine) -> Result<(), BackupError> {
    let _ = m.qmp().events().drain("RESUME");
    qmp(m, "cont", Value::Null).await?;
    m.qmp()
        .wait_event("RESUME", |_| true, deadline::COMMAND_EVENT)
        .await
        .map_err(|e| BackupError::step(m.name(), "wait for RESUME after the merge", m.qmp_err(e)))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::MergeOutcome::{self, *};

    #[test]
    fn pauses_add_up_over_disks() {
        assert_eq!(Converged.then(Converged), Converged);
        assert_eq!(Converged.then(PausedToFinish { paused_ms: 2.0 }), PausedToFinish { paused_ms: 2.0 });
        assert_eq!(
            PausedToFinish { paused_ms: 1.0 }.then(PausedToFinish { paused_ms: 2.0 }),
            PausedToFinish { paused_ms: 3.0 }
        );
    }

    #[test]
    fn the_outcome_is_typed_in_json() {
        let j = serde_json::to_value(PausedToFinish { paused_ms: 5.0 }).unwrap();
        assert_eq!(j, serde_json::json!({"kind": "paused-to-finish", "paused_ms": 5.0}));
        let back: MergeOutcome = serde_json::from_value(j).unwrap();
        assert_eq!(back, PausedToFinish { paused_ms: 5.0 });
    }
}
