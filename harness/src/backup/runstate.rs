//! What a VM was doing before a backup, and putting it back.

use std::time::Duration;

use serde_json::{json, Value};

use crate::qemu::{Machine, MachineError};

const T: Duration = Duration::from_secs(30);

/// A VM's run state as the backup sees it: running, or not (paused, or saved and waiting).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunState {
    pub running: bool,
    /// QEMU's own word for it (running, paused, postmigrate, ...).
    pub status: String,
}

impl RunState {
    /// "running" or "paused", as reports and fixtures show it.
    pub fn label(&self) -> &'static str {
        if self.running {
            "running"
        } else {
            "paused"
        }
    }
}

pub async fn query(m: &Machine) -> Result<RunState, MachineError> {
    let v = m.qmp().execute_raw("query-status", Value::Null, T).await.map_err(|e| m.qmp_err(e))?;
    Ok(RunState {
        running: v["running"].as_bool().unwrap_or(false),
        status: v["status"].as_str().unwrap_or("unknown").to_owned(),
    })
}

/// Waits (polling query-status, under `deadline`) until QEMU has left the transient
/// migration states. QEMU sends MIGRATION `completed` while still in finish-migrate, and no
/// event marks the move on, so a `cont` sent at once may be refused.
pub async fn settle(m: &Machine, deadline: Duration) -> Result<RunState, MachineError> {
    let until = tokio::time::Instant::now() + deadline;
    let mut pause = Duration::from_millis(5);
    loop {
        let st = query(m).await?;
        if !matches!(st.status.as_str(), "finish-migrate" | "inmigrate") || tokio::time::Instant::now() >= until {
            return Ok(st);
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// Names of block nodes QEMU reports as inactive (after a completed save, all of them).
pub async fn inactive_nodes(m: &Machine) -> Result<Vec<String>, MachineError> {
    let nodes =
        m.qmp().execute_raw("query-named-block-nodes", json!({"flat": true}), T).await.map_err(|e| m.qmp_err(e))?;
    Ok(nodes
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[])
        .iter()
        .filter(|n| n["active"] == json!(false))
        .filter_map(|n| n["node-name"].as_str().map(str::to_owned))
        .collect())
}
