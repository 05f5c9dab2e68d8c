//! QMP on a real guest: run state and the event queue.

use std::time::Duration;

use qapi::qmp::{cont, query_status, stop, RunState};

use crate::common;

#[tokio::test]
async fn stop_and_cont_emit_events_the_waits_see() {
    let guest = common::boot("qmp-events").await;
    let qmp = guest.machine.qmp();
    let status = qmp.execute(query_status {}).await.unwrap();
    assert!(status.running && matches!(status.status, RunState::running));

    qmp.execute(stop {}).await.unwrap();
    // The event came before the wait began; the wait must still see it.
    qmp.wait_event("STOP", |_| true, Duration::from_secs(10)).await.unwrap();
    assert!(matches!(qmp.execute(query_status {}).await.unwrap().status, RunState::paused));

    qmp.execute(cont {}).await.unwrap();
    qmp.wait_event("RESUME", |_| true, Duration::from_secs(10)).await.unwrap();
    assert!(qmp.execute(query_status {}).await.unwrap().running);
}

#[tokio::test]
async fn qemu_errors_carry_their_class() {
    let guest = common::boot("qmp-errors").await;
    let err = guest
        .machine
        .qmp()
        .execute_raw(
            "block_resize",
            serde_json::json!({"node-name": "no-such-node", "size": 1 << 20}),
            Duration::from_secs(10),
        )
        .await
        .unwrap_err();
    assert_eq!(err.class(), Some("GenericError"), "{err}");
    assert!(err.to_string().contains("no-such-node"), "{err}");
}
