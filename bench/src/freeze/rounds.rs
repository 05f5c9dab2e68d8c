//! The freeze-window benchmark's own two measurements on our guest: a Child VM Snapshot as
//! quiesce makes it, and the bare freeze + `transaction` + thaw baseline.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use quiesce::backup::child_snapshot::{self, SnapshotSettings, Undo};
use quiesce::qemu::Machine;
use quiesce::sys::deadline;
use quiesce::timeline::Timeline;
use serde_json::{json, Value};

use super::{io, step_ms, FreezeBenchError, Series};

/// One freeze and thaw through our agent client (thawed even if the freeze failed).
pub(super) async fn warm_up(m: &Machine) -> Result<(), FreezeBenchError> {
    let agent = m.agent().map_err(FreezeBenchError::Agent)?;
    let frozen = agent.execute_raw("guest-fsfreeze-freeze", Value::Null, deadline::GUEST_FREEZE).await;
    let thawed = agent.execute_raw("guest-fsfreeze-thaw", Value::Null, deadline::GUEST_THAW).await;
    let warm = |what: &str, e: quiesce::qemu::AgentError| FreezeBenchError::WarmUp(format!("{what}: {e}"));
    frozen.map_err(|e| warm("guest-fsfreeze-freeze", e))?;
    thawed.map_err(|e| warm("guest-fsfreeze-thaw", e))?;
    Ok(())
}

/// One Child VM Snapshot into `backup`, which is removed afterwards.
pub(super) async fn ours_round(
    m: &Machine,
    settings: &SnapshotSettings,
    backup: &Path,
    s: &mut Series,
) -> Result<(), FreezeBenchError> {
    std::fs::create_dir(backup).map_err(io("make a backup folder"))?;
    let tl = Timeline::new();
    let undo = Mutex::new(Undo::default());
    let t = Instant::now();
    // A production backup: no fault injected, nothing to interrupt it.
    let (faults, interrupt) = (quiesce::backup::Faults::default(), quiesce::interrupt::Interrupt::new());
    let frozen = child_snapshot::prepare(m, settings, &faults, &interrupt, &tl, &undo).await?;
    let prepare_ms = t.elapsed().as_secs_f64() * 1000.0;
    let snap = child_snapshot::post(m, settings, &faults, backup, &tl, &undo, frozen).await?;
    std::fs::remove_dir_all(backup).map_err(io("remove a backup folder"))?;
    if !undo.lock().unwrap_or_else(|e| e.into_inner()).is_clean() {
        return Err(FreezeBenchError::NotClean);
    }
    s.window.push(snap.timings.freeze_window_ms.ok_or(FreezeBenchError::NoTiming("freeze_window_ms"))?);
    s.host.push(snap.timings.freeze_host_ms.ok_or(FreezeBenchError::NoTiming("freeze_host_ms"))?);
    s.freeze.push(step_ms(&tl, "freeze")?);
    s.thaw.push(step_ms(&tl, "thaw")?);
    s.whole.push(prepare_ms);
    Ok(())
}

/// Freeze, one transaction of `blockdev-snapshot-sync` (QEMU creates each overlay then),
/// thaw; then every overlay is merged back and removed. Returns the freeze's reply.
pub(super) async fn bare_round(
    m: &Machine,
    dir: &Path,
    i: usize,
    s: &mut Series,
) -> Result<Option<u64>, FreezeBenchError> {
    let bare = |what: &str, e: &dyn std::fmt::Display| FreezeBenchError::Bare(format!("{what}: {e}"));
    let agent = m.agent().map_err(FreezeBenchError::Agent)?;
    let overlays: Vec<(String, String, PathBuf)> = m
        .config()
        .disks
        .iter()
        .map(|d| {
            let node = d.node_name.clone();
            (node.clone(), format!("{node}-bare{i}"), dir.join(format!("bare-{node}-{i}.qcow2")))
        })
        .collect();
    let actions: Vec<Value> = overlays
        .iter()
        .map(|(node, snap, path)| {
            json!({"type": "blockdev-snapshot-sync", "data": {
                "node-name": node, "snapshot-file": path, "snapshot-node-name": snap, "format": "qcow2"}})
        })
        .collect();

    let t0 = Instant::now();
    let frozen = agent.execute_raw("guest-fsfreeze-freeze", Value::Null, deadline::GUEST_FREEZE).await;
    let t1 = Instant::now();
    let snapped = match &frozen {
        Ok(_) => {
            m.qmp().execute_raw("transaction", json!({ "actions": actions }), deadline::QMP_COMMAND).await.map(drop)
        }
        Err(_) => Ok(()),
    };
    let t2 = Instant::now();
    // Thawed whatever happened above (a failed freeze may have frozen some filesystems).
    let thawed = agent.execute_raw("guest-fsfreeze-thaw", Value::Null, deadline::GUEST_THAW).await;
    let t3 = Instant::now();
    // The transaction is atomic: every overlay is on, or none; merge what is on.
    let merged = bare_merge(m, &overlays).await;
    let frozen = frozen.map_err(|e| bare("guest-fsfreeze-freeze", &e))?;
    snapped.map_err(|e| bare("transaction", &m.qmp_err(e)))?;
    thawed.map_err(|e| bare("guest-fsfreeze-thaw", &e))?;
    merged?;
    let ms = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1000.0;
    s.window.push(ms(t0, t3));
    s.freeze.push(ms(t0, t1));
    s.host.push(ms(t1, t2));
    s.thaw.push(ms(t2, t3));
    Ok(frozen.as_u64())
}

/// Commits each active bare overlay into the node under it (active commit, then pivot),
/// and removes the overlay files.
async fn bare_merge(m: &Machine, overlays: &[(String, String, PathBuf)]) -> Result<(), FreezeBenchError> {
    let q = |what: &str, e| FreezeBenchError::Bare(format!("{what}: {}", m.qmp_err(e)));
    let blocks = m
        .qmp()
        .execute_raw("query-block", Value::Null, deadline::QMP_COMMAND)
        .await
        .map_err(|e| q("query-block", e))?;
    let active: Vec<&str> = blocks
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[])
        .iter()
        .filter_map(|b| b["inserted"]["node-name"].as_str())
        .collect();
    for (node, snap, _) in overlays.iter().filter(|(_, snap, _)| active.contains(&snap.as_str())) {
        let job = format!("bare-commit-{node}");
        let _ = m.qmp().events().drain("BLOCK_JOB_READY");
        let _ = m.qmp().events().drain("BLOCK_JOB_COMPLETED");
        m.qmp()
            .execute_raw(
                "block-commit",
                json!({"job-id": job, "device": snap, "base-node": node}),
                deadline::QMP_COMMAND,
            )
            .await
            .map_err(|e| q("block-commit", e))?;
        let is_job = |d: &Value| d["device"] == job.as_str();
        m.qmp().wait_event("BLOCK_JOB_READY", is_job, deadline::BLOCK_MERGE).await.map_err(|e| q("commit ready", e))?;
        m.qmp()
            .execute_raw("job-complete", json!({"id": job}), deadline::QMP_COMMAND)
            .await
            .map_err(|e| q("job-complete", e))?;
        let done = m
            .qmp()
            .wait_event("BLOCK_JOB_COMPLETED", is_job, deadline::BLOCK_MERGE)
            .await
            .map_err(|e| q("pivot", e))?;
        if let Some(err) = done.data["error"].as_str() {
            return Err(FreezeBenchError::Bare(format!("merging {snap} into {node}: {err}")));
        }
    }
    // QEMU made these nodes itself; once pivoted away from, nothing holds them and they go.
    let nodes = m
        .qmp()
        .execute_raw("query-named-block-nodes", json!({"flat": true}), deadline::QMP_COMMAND)
        .await
        .map_err(|e| q("query-named-block-nodes", e))?;
    let left: Vec<&str> = nodes
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[])
        .iter()
        .filter_map(|n| n["node-name"].as_str())
        .filter(|n| overlays.iter().any(|(_, snap, _)| snap == n))
        .collect();
    if !left.is_empty() {
        return Err(FreezeBenchError::Bare(format!("overlay nodes still open after the merge: {left:?}")));
    }
    for (_, _, path) in overlays {
        if let Err(e) = std::fs::remove_file(path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                return Err(FreezeBenchError::Io { what: format!("remove {}", path.display()), source: e });
            }
        }
    }
    Ok(())
}
