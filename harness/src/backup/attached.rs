//! Backing up VMs quiesce did not start ([`crate::qemu::attach`]): the same set of phases,
//! methods and backup folder as a scenario's backup, plus what a person's own VM needs on
//! top. Its QEMU's capabilities are asked of that QEMU (there may be no QEMU binary here
//! to probe), and the migration settings a Saved State changes (capabilities, bandwidth,
//! channels) are put back as they were afterwards, on every path: quiesce reconfigures
//! only what the method needs, and only while it runs.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{json, Map, Value};

use super::job::MethodChoice;
use super::recovery::Journal;
use super::saved_state::{qmp, SaveSettings};
use super::set::{self, Member, SetError, SetOutcome, Undone};
use super::{child_snapshot::SnapshotSettings, BackupError, Faults};
use crate::interrupt::Interrupt;
use crate::qemu::caps::{self, Capabilities};
use crate::qemu::Machine;
use crate::timeline::Timeline;

/// The migration capabilities and parameters a save may change.
const CAPABILITIES: [&str; 3] = ["events", "mapped-ram", "multifd"];
const PARAMETERS: [&str; 2] = ["max-bandwidth", "multifd-channels"];

/// What this VM's QEMU can do, asked of it.
pub async fn capabilities(m: &Machine) -> Result<Capabilities, BackupError> {
    let version = qmp(m, "query-version", Value::Null).await?;
    let schema = qmp(m, "query-qmp-schema", Value::Null).await?;
    let migrate = qmp(m, "query-migrate-capabilities", Value::Null).await?;
    Ok(caps::from_replies(&version, &schema, &migrate))
}

/// A VM's migration settings as they were before the backup (also kept in its recovery
/// journal, so a replay puts back what a killed save changed).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrationSettings {
    capabilities: Vec<(String, bool)>,
    parameters: Map<String, Value>,
}

impl MigrationSettings {
    pub async fn read(m: &Machine) -> Result<Self, BackupError> {
        let caps = qmp(m, "query-migrate-capabilities", Value::Null).await?;
        let params = qmp(m, "query-migrate-parameters", Value::Null).await?;
        Ok(Self::from_replies(&caps, &params))
    }

    /// Pure: the settings a save may change, from QEMU's replies.
    pub fn from_replies(caps: &Value, params: &Value) -> Self {
        let capabilities = caps
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .filter_map(|c| Some((c["capability"].as_str()?.to_owned(), c["state"].as_bool()?)))
            .filter(|(c, _)| CAPABILITIES.contains(&c.as_str()))
            .collect();
        let parameters = PARAMETERS.iter().filter_map(|p| Some((p.to_string(), params.get(*p)?.clone()))).collect();
        Self { capabilities, parameters }
    }

    /// Read from a journal (untrusted): only the settings a save changes, each once, the
    /// parameters numbers; `Err` names the first that is not.
    pub fn check(&self) -> Result<(), String> {
        for (c, _) in &self.capabilities {
            if !CAPABILITIES.contains(&c.as_str()) || self.capabilities.iter().filter(|(d, _)| d == c).count() > 1 {
                return Err(format!("migration capability {c:?} is not one a save changes, or is named twice"));
            }
        }
        for (p, v) in &self.parameters {
            if !PARAMETERS.contains(&p.as_str()) || !v.is_u64() {
                return Err(format!("migration parameter {p:?} is not one a save changes, or not a number"));
            }
        }
        Ok(())
    }

    /// Sets them again. Safe when nothing changed.
    pub async fn put_back(&self, m: &Machine) -> Result<(), BackupError> {
        let caps: Vec<Value> = self.capabilities.iter().map(|(c, on)| json!({"capability": c, "state": on})).collect();
        if !caps.is_empty() {
            qmp(m, "migrate-set-capabilities", json!({ "capabilities": caps })).await?;
        }
        if !self.parameters.is_empty() {
            qmp(m, "migrate-set-parameters", Value::Object(self.parameters.clone())).await?;
        }
        Ok(())
    }
}

/// How to back up a set of attached VMs.
#[derive(Debug, Clone)]
pub struct AttachedBackup {
    pub method: MethodChoice,
    /// Where Child VM Snapshot's overlays go; by default each VM's first disk's folder (the
    /// disks' own host volume, as condition 3 asks).
    pub snapshot_dir: Option<PathBuf>,
    /// Each VM's recovery journal, in the order of the machines (none: not journaled).
    pub journals: Vec<Option<Arc<Journal>>>,
    /// Child VM Snapshot's merge: its rate limit (none: unlimited) and how long it may take
    /// to catch up before the VM is paused to finish it (none: the default).
    pub merge_speed: Option<u64>,
    pub merge_converge: Option<std::time::Duration>,
}

/// What the backup of a set of attached VMs did: the set's outcome, or its error, and for
/// each VM whether its migration settings could be put back.
pub struct AttachedOutcome {
    pub result: Result<SetOutcome, SetError>,
    /// A VM whose migration settings could not be put back, and why.
    pub settings_not_restored: Vec<(String, BackupError)>,
}

/// The folder Child VM Snapshot's overlays go to for `m`.
pub fn snapshot_dir_for(m: &Machine, chosen: Option<&Path>) -> PathBuf {
    if let Some(d) = chosen {
        return d.to_owned();
    }
    m.config()
        .disks
        .first()
        .and_then(|d| d.path.parent())
        .filter(|p| !p.as_os_str().is_empty())
        .map_or_else(|| PathBuf::from("."), Path::to_owned)
}

/// Backs up `machines` as one set into `out`, all or nothing, through the same phases as a
/// scenario's backup; `interrupt` (SIGINT) puts every VM back and leaves no backup.
pub async fn run(
    machines: &[Machine],
    how: &AttachedBackup,
    out: &Path,
    tl: &Timeline,
    interrupt: &Interrupt,
) -> Result<AttachedOutcome, BackupError> {
    let first =
        machines.first().ok_or_else(|| BackupError::Unsupported { vm: "-".into(), what: "no VM to back up".into() })?;
    let caps = capabilities(first).await?;
    let mut before = Vec::new();
    for m in machines {
        before.push(MigrationSettings::read(m).await?);
    }
    let members: Vec<Member<'_>> = machines
        .iter()
        .enumerate()
        .map(|(i, m)| Member {
            machine: m,
            method: how.method,
            snapshot: {
                let mut s = SnapshotSettings::new(&snapshot_dir_for(m, how.snapshot_dir.as_deref()));
                s.merge_speed = how.merge_speed;
                s.merge_converge = how.merge_converge.unwrap_or(s.merge_converge);
                s
            },
            save: SaveSettings::default(),
            declared_iscsi: vec![],
            faults: Faults::default(),
            journal: how.journals.get(i).cloned().flatten(),
        })
        .collect();
    let result = set::run(&members, &caps, out, tl, interrupt).await;
    clear_journals(machines, how, &result);
    let mut settings_not_restored = Vec::new();
    for (m, s) in machines.iter().zip(&before) {
        if let Err(e) = s.put_back(m).await {
            settings_not_restored.push((m.name().to_owned(), e));
        }
    }
    Ok(AttachedOutcome { result, settings_not_restored })
}

/// Removes the journal of each VM that is as it was: all of them after a backup, a refusal
/// or an error before any change; after a failure, each VM put back. A VM that could not be
/// put back keeps its journal, for the next run to try again.
fn clear_journals(machines: &[Machine], how: &AttachedBackup, result: &Result<SetOutcome, SetError>) {
    let kept: Vec<&str> = match result {
        Err(SetError::Failed { undone, .. } | SetError::Interrupted { undone, .. }) => {
            undone.iter().filter(|(_, u)| matches!(u, Undone::CouldNotPutBack(_))).map(|(vm, _)| vm.as_str()).collect()
        }
        _ => vec![],
    };
    for (m, j) in machines.iter().zip(&how.journals) {
        let Some(j) = j else { continue };
        if kept.contains(&m.name()) {
            eprintln!("quiesce: VM {}: its recovery journal {} is kept for the next run", m.name(), j.path().display());
        } else if let Err(e) = j.clear() {
            eprintln!("quiesce: VM {}: {e}", m.name());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_settings_a_save_changes_are_kept() {
        // As QEMU 10.0 answers (cut short).
        let caps = json!([{"capability": "xbzrle", "state": false}, {"capability": "events", "state": false},
                          {"capability": "multifd", "state": true}, {"capability": "mapped-ram", "state": false}]);
        let params = json!({"max-bandwidth": 134217728, "multifd-channels": 2, "downtime-limit": 300});
        let s = MigrationSettings::from_replies(&caps, &params);
        assert_eq!(
            s.capabilities,
            [("events".to_owned(), false), ("multifd".to_owned(), true), ("mapped-ram".to_owned(), false)]
        );
        assert_eq!(Value::Object(s.parameters), json!({"max-bandwidth": 134217728, "multifd-channels": 2}));
        let odd = MigrationSettings::from_replies(&json!("x"), &json!(null));
        assert!(odd.capabilities.is_empty() && odd.parameters.is_empty());
    }
}
