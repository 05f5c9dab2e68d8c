//! What qemu-ga refuses while the guest is frozen, for real, on the Linux test guest: the
//! same refusal a Windows guest's agent gives (qemu-ga's command filter is shared code),
//! recognised by `backup::vss::disabled_while_frozen`, the one function that reads it. The
//! Windows side of it is replayed by the scripted peer in `backup/windows_peer_tests.rs`.

use std::time::Duration;

use quiesce::backup::vss;
use quiesce::qemu::exec::{self, ExecError};
use serde_json::Value;

use crate::common;

const T: Duration = Duration::from_secs(60);

#[tokio::test]
async fn guest_exec_is_disabled_while_frozen_and_allowed_again_after_the_thaw() {
    let guest = common::boot("frozen-refusals").await;
    let agent = guest.machine.agent().unwrap();
    let frozen = agent.execute_raw("guest-fsfreeze-freeze", Value::Null, T).await.unwrap();
    // Nothing below may panic before the thaw: results are kept and checked after it.
    let refused = exec::run(agent, &["/bin/true"], T).await;
    let status = agent.execute_raw("guest-fsfreeze-status", Value::Null, T).await;
    let ping = agent.execute_raw("guest-ping", Value::Null, T).await;
    agent.execute_raw("guest-fsfreeze-thaw", Value::Null, T).await.unwrap();
    assert!(frozen.as_i64().unwrap_or(0) >= 1, "{frozen}");
    match refused {
        Err(ExecError::Agent { source, .. }) => {
            let d = vss::disabled_while_frozen(&source);
            assert_eq!(d.map(|d| d.command).as_deref(), Some("guest-exec"), "{source}");
        }
        other => panic!("guest-exec while frozen: {other:?}"),
    }
    assert_eq!(status.unwrap(), "frozen");
    assert!(ping.is_ok(), "guest-ping is allowed while frozen: {ping:?}");
    let after = exec::run(agent, &["/bin/true"], T).await.unwrap();
    assert!(after.success(), "{after:?}");
}
