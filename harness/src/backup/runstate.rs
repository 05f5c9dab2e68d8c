//! What a VM was doing before a backup, and putting it back.

use std::time::Duration;

use qapi::qmp::{query_status, RunState as QemuRunState};
use qapi::Enum;
use serde::{Deserialize, Serialize};

use crate::qemu::compat::{self, Feature};
use crate::qemu::locks::held_for_writing;
use crate::qemu::{Machine, MachineError, Qmp, QmpError};
use crate::sys::deadline;

/// A VM's run state as the backup sees it: running, or not (paused, or saved and waiting).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunState {
    pub running: bool,
    /// QEMU's own word for it (running, paused, postmigrate, ...), as reports show it.
    pub status: String,
    /// The same, typed: what decisions are made on.
    pub state: QemuRunState,
}

/// What a VM is doing, as a backup records it and puts it back: QEMU's run state, reduced
/// to whether QEMU reports it running (paused, saved and waiting, ... are all `Paused`).
/// Serialized as "running" or "paused", as manifests, reports and fixtures show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Activity {
    Running,
    Paused,
}

impl Activity {
    /// "running" or "paused", as reports and fixtures show it.
    pub fn name(self) -> &'static str {
        match self {
            Activity::Running => "running",
            Activity::Paused => "paused",
        }
    }
}

impl RunState {
    /// Running or not, as the backup records it.
    pub fn activity(&self) -> Activity {
        if self.running {
            Activity::Running
        } else {
            Activity::Paused
        }
    }

    /// "running" or "paused", as reports and fixtures show it.
    pub fn label(&self) -> &'static str {
        self.activity().name()
    }

    /// True while QEMU is still in a migration's transient states, in which a `cont` may be
    /// refused.
    pub fn migrating(&self) -> bool {
        matches!(self.state, QemuRunState::finish_migrate | QemuRunState::inmigrate)
    }
}

pub async fn query(m: &Machine) -> Result<RunState, MachineError> {
    query_on(m.qmp()).await.map_err(|e| m.qmp_err(e))
}

/// `query-status` on a QMP connection. A reply that does not fit QEMU's schema (a missing
/// field, a run state this build does not know) is an error, never taken for "paused".
pub async fn query_on(qmp: &Qmp) -> Result<RunState, QmpError> {
    let st = qmp.execute_within(query_status {}, deadline::QMP_COMMAND).await?;
    Ok(RunState { running: st.running, status: st.status.name().to_owned(), state: st.status })
}

/// Waits (polling query-status, under `deadline`) until QEMU has left the transient
/// migration states. QEMU sends MIGRATION `completed` while still in finish-migrate, and no
/// event marks the move on, so a `cont` sent at once may be refused.
pub async fn settle(m: &Machine, deadline: Duration) -> Result<RunState, MachineError> {
    let until = tokio::time::Instant::now() + deadline;
    let mut pause = Duration::from_millis(5);
    loop {
        let st = query(m).await?;
        if !st.migrating() || tokio::time::Instant::now() >= until {
            return Ok(st);
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// `query-named-block-nodes`, read for the one field it is asked for here: `active` (QEMU
/// 10.0), which the schema the `qapi` crate was generated from (QEMU 9.1) does not have, so
/// its own `query_named_block_nodes` would drop it. The reply is still typed: a node of the
/// wrong shape is an error, not a node taken for active.
#[derive(Debug, Serialize)]
struct QueryNodeActivity {
    flat: bool,
}

/// What [`QueryNodeActivity`] reads of each block node.
#[derive(Debug, Deserialize)]
struct NodeActivity {
    #[serde(rename = "node-name")]
    node_name: Option<String>,
    /// Absent before QEMU 10.0, where a node's activity is not reported.
    active: Option<bool>,
}

impl qapi::Command for QueryNodeActivity {
    type Ok = Vec<NodeActivity>;
    const NAME: &'static str = "query-named-block-nodes";
    const ALLOW_OOB: bool = false;
}

/// Names of block nodes that are inactive (after a completed save, all of them). QEMU 10.0
/// says so itself; before it (or under an older compatibility profile) a writable disk is
/// inactive when QEMU holds no write lock on its image: an inactive node gives its locks up.
pub async fn inactive_nodes(m: &Machine) -> Result<Vec<String>, MachineError> {
    if let Some(reported) = inactive_nodes_on(m.qmp()).await.map_err(|e| m.qmp_err(e))? {
        return Ok(reported);
    }
    let disks = m.config().disks.iter().filter(|d| !d.read_only);
    Ok(disks.filter(|d| !held_for_writing(&d.path)).map(|d| d.node_name.clone()).collect())
}

/// The nodes QEMU reports inactive on a QMP connection, or None when it reports no node's
/// activity (QEMU before 10.0, or a profile of one).
pub async fn inactive_nodes_on(qmp: &Qmp) -> Result<Option<Vec<String>>, QmpError> {
    let nodes = qmp.execute_within(QueryNodeActivity { flat: true }, deadline::QMP_COMMAND).await?;
    if !compat::allows(Feature::NodeActivity) || nodes.iter().all(|n| n.active.is_none()) {
        return Ok(None);
    }
    Ok(Some(nodes.into_iter().filter(|n| n.active == Some(false)).filter_map(|n| n.node_name).collect()))
}

/// Against a scripted QMP peer: a real QEMU does not send malformed replies on demand.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::qemu::wire_tests::{answer_once, qmp_pair};

    #[tokio::test]
    async fn a_malformed_query_status_is_an_error_not_paused() {
        let malformed = [
            r#"{}"#,
            r#"{"status": "paused"}"#,
            r#"{"running": "no", "status": "paused"}"#,
            r#"{"running": false, "status": "dozing"}"#,
            r#""paused""#,
        ];
        for reply in malformed {
            let (qmp, mut peer, _d) = qmp_pair().await;
            let (_, got) = tokio::join!(answer_once(&mut peer, reply), query_on(&qmp));
            assert!(matches!(got, Err(QmpError::UnexpectedReply { .. })), "{reply} gave {got:?}");
        }
        let (qmp, mut peer, _d) = qmp_pair().await;
        let paused = r#"{"running": false, "status": "postmigrate"}"#;
        let (_, got) = tokio::join!(answer_once(&mut peer, paused), query_on(&qmp));
        let st = got.unwrap();
        assert_eq!((st.running, st.label(), st.status.as_str()), (false, "paused", "postmigrate"));
        assert!(!st.migrating());
    }

    /// A manifest keeps the words it always had ("running", "paused"), and one naming any
    /// other state is refused rather than taken for "paused".
    #[test]
    fn activity_is_written_as_before_and_read_strictly() {
        for (a, text) in [(Activity::Running, "\"running\""), (Activity::Paused, "\"paused\"")] {
            assert_eq!(serde_json::to_string(&a).unwrap(), text);
            assert_eq!(serde_json::from_str::<Activity>(text).unwrap(), a);
            assert_eq!(format!("\"{}\"", a.name()), text);
        }
        for bad in ["\"Running\"", "\"postmigrate\"", "\"\"", "true"] {
            assert!(serde_json::from_str::<Activity>(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn inactive_nodes_are_read_and_a_malformed_node_is_an_error() {
        let (qmp, mut peer, _d) = qmp_pair().await;
        // One reply is one line on the wire.
        let nodes = r#"[{"node-name": "root", "active": false}, {"node-name": "root-file", "active": true}, {"node-name": "old"}]"#;
        let (_, got) = tokio::join!(answer_once(&mut peer, nodes), inactive_nodes_on(&qmp));
        assert_eq!(got.unwrap(), Some(vec!["root".to_owned()]));
        let (qmp, mut peer, _d) = qmp_pair().await;
        let before_10 = r#"[{"node-name": "root"}, {"node-name": "root-file"}]"#;
        let (_, got) = tokio::join!(answer_once(&mut peer, before_10), inactive_nodes_on(&qmp));
        assert_eq!(got.unwrap(), None, "a QEMU that does not say is not taken to say 'active'");
        let (qmp, mut peer, _d) = qmp_pair().await;
        let bad = r#"[{"node-name": "root", "active": "no"}]"#;
        let (_, got) = tokio::join!(answer_once(&mut peer, bad), inactive_nodes_on(&qmp));
        assert!(matches!(got, Err(QmpError::UnexpectedReply { .. })), "{got:?}");
    }
}
