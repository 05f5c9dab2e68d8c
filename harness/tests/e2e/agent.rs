//! The guest agent on a real guest: what it reports, and freeze/thaw.

use std::time::Duration;

use qapi::qga::{guest_fsfreeze_freeze, guest_fsfreeze_status, guest_fsfreeze_thaw, guest_info, GuestFsfreezeStatus};

use crate::common;

#[tokio::test]
async fn agent_lists_fsfreeze_as_enabled() {
    let guest = common::boot("agent-info").await;
    let info = guest.machine.agent().unwrap().execute(guest_info {}).await.unwrap();
    for name in ["guest-fsfreeze-freeze", "guest-fsfreeze-thaw", "guest-get-fsinfo", "guest-exec"] {
        let cmd = info.supported_commands.iter().find(|c| c.name == name);
        assert!(cmd.is_some_and(|c| c.enabled), "{name} not enabled: {cmd:?}");
    }
    assert!(info.version.starts_with("10."), "guest agent version {}", info.version);
}

#[tokio::test]
async fn freeze_status_thaw_status() {
    let guest = common::boot("agent-freeze").await;
    let agent = guest.machine.agent().unwrap();
    let frozen = agent.execute_within(guest_fsfreeze_freeze {}, Duration::from_secs(10)).await.unwrap();
    assert!(frozen >= 1, "froze {frozen} filesystems");
    assert!(matches!(agent.execute(guest_fsfreeze_status {}).await.unwrap(), GuestFsfreezeStatus::frozen));
    let thawed = agent.execute(guest_fsfreeze_thaw {}).await.unwrap();
    assert_eq!(thawed, frozen);
    assert!(matches!(agent.execute(guest_fsfreeze_status {}).await.unwrap(), GuestFsfreezeStatus::thawed));
}

#[tokio::test]
async fn fsinfo_reports_the_root_disk_by_its_serial() {
    let guest = common::boot("agent-fsinfo").await;
    let agent = guest.machine.agent().unwrap();
    let fs = agent.execute_raw("guest-get-fsinfo", serde_json::Value::Null, Duration::from_secs(10)).await.unwrap();
    let root = fs.as_array().unwrap().iter().find(|f| f["mountpoint"] == "/").expect("/ in guest-get-fsinfo");
    assert_eq!(root["type"], "ext4");
    assert_eq!(root["disk"][0]["serial"], "root", "{root}");
}

/// A caller that drops a command after it was sent (as an interrupted job does) must not
/// shift the replies: the late answer to the dropped thaw is not taken for the status.
#[tokio::test]
async fn a_dropped_command_does_not_shift_the_replies() {
    let guest = common::boot("agent-dropped").await;
    let agent = guest.machine.agent().unwrap();
    agent.execute(guest_info {}).await.unwrap();
    // A zero timeout polls the command once, which sends it, then drops it unanswered.
    let dropped = tokio::time::timeout(Duration::ZERO, agent.execute(guest_fsfreeze_thaw {})).await;
    assert!(dropped.is_err(), "the thaw was answered before it was dropped: {dropped:?}");
    let status = agent.execute(guest_fsfreeze_status {}).await.unwrap();
    assert!(matches!(status, GuestFsfreezeStatus::thawed));
    let info = agent.execute(guest_info {}).await.unwrap();
    assert!(info.version.starts_with("10."));
}
