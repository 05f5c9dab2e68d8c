//! What a Windows guest's agent says when VSS fails, as types. qemu-ga's Windows freeze
//! goes through VSS (its requester and the "QEMU Guest Agent VSS Provider"), and each of
//! its failures comes back as an error text that starts with a fixed prefix, after which
//! Windows' own message may follow. [`parse`] is the one place that reads those texts; the
//! rest of quiesce matches on [`VssFailure`], and reports keep the agent's own words.
//!
//! The prefixes are qemu-ga 10.0.2's (`qga/commands-win32.c`, `qga/vss-win32.c`,
//! `qga/vss-win32/requester.cpp`). NEVER SEEN FROM A LIVE WINDOWS GUEST: they are tested
//! with a scripted agent replaying them (see `backup/windows_peer_tests.rs`).

use std::time::Duration;

use serde_json::json;

use crate::qemu::{AgentError, GuestAgent};

/// A VSS failure, as the agent reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VssFailure {
    /// `fsfreeze not possible as VSS failed to initialize`: qga-vss.dll did not load or the
    /// provider is not registered (from freeze, status and thaw alike). Nothing can freeze.
    InitFailed,
    /// `failed to add <volume> to snapshot set`: a volume (a freeze-list entry, or one VSS
    /// cannot snapshot) was refused; the whole freeze fails.
    AddVolume,
    /// `timeout when try to receive Frozen event from VSS provider`: the provider did not
    /// say "frozen" within the requester's 60 s.
    FrozenEventTimeout,
    /// `couldn't receive Frozen event from VSS provider`.
    FrozenEventNotReceived,
    /// `DoSnapshotSet exited without Frozen event`: VSS gave up before the freeze point
    /// (most often a writer that failed).
    SnapshotSetWithoutFrozen,
    /// `failed to gather writer metadata`: a VSS writer did not answer.
    GatherWriterMetadata,
    /// `failed to gather writer status`.
    GatherWriterStatus,
    /// `failed to prepare for backup`.
    PrepareForBackup,
    /// `failed to do snapshot set`.
    DoSnapshotSet,
    /// `failed to add component`: a writer's component could not join the snapshot.
    AddComponent,
    /// Thaw: `couldn't hold writes: fsfreeze is limited up to 10 seconds`. Windows let the
    /// guest's writes go on after 10 s, while the host was still snapshotting: the
    /// snapshot is not consistent, and the VM's backup has failed.
    HoldLimitExceeded,
    /// Thaw: `unexpected error in VSS provider`.
    ProviderError,
    /// Thaw: `failed to complete backup`: VSS could not finish the backup it began.
    CompleteBackup,
}

/// Each failure's prefix, in the agent's words. Longest-first is not needed: no prefix is
/// a prefix of another.
const PREFIXES: &[(&str, VssFailure)] = &[
    ("fsfreeze not possible as VSS failed to initialize", VssFailure::InitFailed),
    ("failed to add ", VssFailure::AddVolume),
    ("timeout when try to receive Frozen event from VSS provider", VssFailure::FrozenEventTimeout),
    ("couldn't receive Frozen event from VSS provider", VssFailure::FrozenEventNotReceived),
    ("DoSnapshotSet exited without Frozen event", VssFailure::SnapshotSetWithoutFrozen),
    ("failed to gather writer metadata", VssFailure::GatherWriterMetadata),
    ("failed to gather writer status", VssFailure::GatherWriterStatus),
    ("failed to prepare for backup", VssFailure::PrepareForBackup),
    ("failed to do snapshot set", VssFailure::DoSnapshotSet),
    ("failed to add component", VssFailure::AddComponent),
    ("couldn't hold writes: fsfreeze is limited up to 10 seconds", VssFailure::HoldLimitExceeded),
    ("unexpected error in VSS provider", VssFailure::ProviderError),
    ("failed to complete backup", VssFailure::CompleteBackup),
];

impl VssFailure {
    /// What it means for the backup, for a person.
    pub fn meaning(self) -> &'static str {
        match self {
            VssFailure::InitFailed => "VSS cannot be used in this guest (qemu-ga's VSS provider is not registered or did not load)",
            VssFailure::AddVolume => "VSS refused a volume of the snapshot set",
            VssFailure::FrozenEventTimeout | VssFailure::FrozenEventNotReceived => {
                "VSS did not reach its freeze point in time"
            }
            VssFailure::SnapshotSetWithoutFrozen => "VSS gave up before its freeze point (a writer failed)",
            VssFailure::GatherWriterMetadata | VssFailure::GatherWriterStatus => "a VSS writer did not answer",
            VssFailure::PrepareForBackup | VssFailure::DoSnapshotSet | VssFailure::AddComponent => {
                "VSS could not start the snapshot"
            }
            VssFailure::HoldLimitExceeded => {
                "Windows held the guest's writes for at most 10 s and then let them go on during the snapshot, so it is not consistent"
            }
            VssFailure::ProviderError => "qemu-ga's VSS provider failed while holding writes",
            VssFailure::CompleteBackup => "VSS could not complete the backup",
        }
    }
}

/// A VSS failure and the agent's whole text (with Windows' own message, if any).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: the agent said: {text}", failure.meaning())]
pub struct VssError {
    pub failure: VssFailure,
    /// The agent's words, unchanged.
    pub text: String,
    /// For [`VssFailure::AddVolume`]: the volume named, as the agent named it.
    pub volume: Option<String>,
}

/// The VSS failure an agent error text reports, if it is one. The one function that reads
/// these texts.
pub fn parse(desc: &str) -> Option<VssError> {
    let text = desc.trim();
    // "failed to add component" starts like "failed to add <volume>": the longer one wins.
    let (prefix, failure) = PREFIXES.iter().filter(|(p, _)| text.starts_with(p)).max_by_key(|(p, _)| p.len())?;
    let volume = (*failure == VssFailure::AddVolume)
        .then(|| text[prefix.len()..].split(" to snapshot set").next().map(str::to_owned))
        .flatten()
        .filter(|_| text.contains(" to snapshot set"));
    if *failure == VssFailure::AddVolume && volume.is_none() {
        return None;
    }
    Some(VssError { failure: *failure, text: text.to_owned(), volume })
}

/// The VSS failure inside an agent error, if the agent refused a command with one.
pub fn of_agent_error(e: &AgentError) -> Option<VssError> {
    match e {
        AgentError::Command { desc, .. } => parse(desc),
        _ => None,
    }
}

/// The backup error for an agent failure in a step of the method: a VSS failure (Windows)
/// as [`BackupError::Vss`](super::BackupError::Vss), in the agent's words; anything else
/// as the agent's error.
pub(crate) fn agent_failure(vm: &str, step: &str, e: AgentError) -> super::BackupError {
    match of_agent_error(&e) {
        Some(error) => super::BackupError::Vss { vm: vm.to_owned(), step: step.to_owned(), error },
        None => super::BackupError::Agent { vm: vm.to_owned(), step: step.to_owned(), error: e },
    }
}

/// What the agent says of a command it refuses while the guest is frozen, the same on
/// Windows as on Linux: `Command X has been disabled: the command is not allowed`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DisabledWhileFrozen {
    pub command: String,
}

/// Whether `e` is the agent refusing a command because the guest is frozen.
pub fn disabled_while_frozen(e: &AgentError) -> Option<DisabledWhileFrozen> {
    let AgentError::Command { desc, .. } = e else { return None };
    let rest = desc.strip_prefix("Command ")?;
    let (command, why) = rest.split_once(" has been disabled")?;
    why.contains("not allowed").then(|| DisabledWhileFrozen { command: command.to_owned() })
}

/// A name `guest-fsfreeze-freeze-list` takes on Windows: a drive as `C:\` (with its
/// trailing backslash), or a volume GUID path for a volume without a letter.
pub fn freeze_list_name(mountpoint: &str, volume_name: &str) -> String {
    let m = mountpoint.trim();
    let letter = m.len() >= 2 && m.as_bytes()[0].is_ascii_alphabetic() && m.as_bytes()[1] == b':';
    if letter {
        format!("{}:\\", m[..1].to_ascii_uppercase())
    } else {
        // "System Reserved" and other unlettered volumes are named by their GUID path.
        let mut v = volume_name.trim().to_owned();
        if !v.ends_with('\\') {
            v.push('\\');
        }
        v
    }
}

/// Freezes only the volumes named (`C:\`, `\\?\Volume{GUID}\`). One invalid entry fails
/// the whole command, as [`VssFailure::AddVolume`]. Returns how many were frozen.
pub async fn freeze_list(agent: &GuestAgent, names: &[String], deadline: Duration) -> Result<i64, FreezeListError> {
    let reply = agent.execute_raw("guest-fsfreeze-freeze-list", json!({ "mountpoints": names }), deadline).await;
    match reply {
        Ok(v) => v.as_i64().ok_or(FreezeListError::Reply(v.to_string())),
        Err(e) => Err(match of_agent_error(&e) {
            Some(vss) => FreezeListError::Vss(vss),
            None => FreezeListError::Agent(e),
        }),
    }
}

/// Why a freeze of named volumes failed.
#[derive(Debug, thiserror::Error)]
pub enum FreezeListError {
    /// VSS refused (the agent thawed by itself before answering): nothing is frozen.
    #[error(transparent)]
    Vss(VssError),
    /// The agent refused otherwise, failed, or did not answer; it may still be freezing.
    #[error(transparent)]
    Agent(AgentError),
    /// The agent answered with something other than a count.
    #[error("guest-fsfreeze-freeze-list answered {0}, not a number of volumes")]
    Reply(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_prefix_is_recognised_with_the_words_kept() {
        for (prefix, failure) in PREFIXES {
            let text = match failure {
                VssFailure::AddVolume => {
                    "failed to add C:\\ to snapshot set: The parameter is incorrect. (0x80070057)".to_owned()
                }
                _ => format!("{prefix}: Windows says why (0x8004230f)"),
            };
            let got = parse(&text).unwrap_or_else(|| panic!("{text}"));
            assert_eq!((got.failure, got.text.as_str()), (*failure, text.as_str()));
        }
        let add = parse("failed to add \\\\?\\Volume{6b1c3a2e-0000}\\ to snapshot set").unwrap();
        assert_eq!(add.volume.as_deref(), Some("\\\\?\\Volume{6b1c3a2e-0000}\\"));
        assert_eq!(parse("failed to add component: x").unwrap().failure, VssFailure::AddComponent);
        // Linux's errors are not VSS's.
        assert!(parse("fsfreeze hook has failed with status 1").is_none());
        assert!(parse("failed to freeze /: Operation not supported").is_none());
        assert!(parse("failed to add something else").is_none());
    }

    #[test]
    fn the_hold_limit_reads_as_a_failed_snapshot() {
        let e = parse("couldn't hold writes: fsfreeze is limited up to 10 seconds").unwrap();
        assert_eq!(e.failure, VssFailure::HoldLimitExceeded);
        assert!(e.to_string().contains("not consistent"), "{e}");
        assert!(e.to_string().ends_with("the agent said: couldn't hold writes: fsfreeze is limited up to 10 seconds"));
    }

    #[test]
    fn refusals_while_frozen_are_typed() {
        let e = AgentError::Command {
            command: "guest-exec".into(),
            class: "GenericError".into(),
            desc: "Command guest-exec has been disabled: the command is not allowed".into(),
        };
        assert_eq!(disabled_while_frozen(&e), Some(DisabledWhileFrozen { command: "guest-exec".into() }));
        let other = AgentError::Command { command: "x".into(), class: "GenericError".into(), desc: "nope".into() };
        assert!(disabled_while_frozen(&other).is_none());
    }

    #[test]
    fn freeze_list_names_have_their_windows_form() {
        assert_eq!(freeze_list_name("c:", "\\\\?\\Volume{a}\\"), "C:\\");
        assert_eq!(freeze_list_name("D:\\", "\\\\?\\Volume{b}\\"), "D:\\");
        assert_eq!(freeze_list_name("System Reserved", "\\\\?\\Volume{c}"), "\\\\?\\Volume{c}\\");
    }
}
