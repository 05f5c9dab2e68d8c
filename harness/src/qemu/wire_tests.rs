//! Both clients against a scripted peer on a socketpair. Real QEMU is used everywhere it
//! can serve; these cases (garbage, over-long lines, replies from a future QEMU) are ones
//! a real QEMU or agent will not produce on demand. The peer's helpers serve the layers
//! above too, for the same kind of case.

use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use super::qga::{AgentError, GuestAgent};
use super::qmp::{Qmp, QmpError};
use super::transcript::Transcript;

fn transcript() -> (tempfile::TempDir, Transcript) {
    let dir = tempfile::tempdir().unwrap();
    let t = Transcript::create(&dir.path().join("transcript")).unwrap();
    (dir, t)
}

/// Reads one request line written by the client (skipping a leading 0xFF).
pub(crate) async fn request(peer: &mut BufReader<UnixStream>) -> Value {
    let mut buf = Vec::new();
    peer.read_until(b'\n', &mut buf).await.unwrap();
    let start = buf.iter().position(|&b| b != 0xFF).unwrap_or(0);
    serde_json::from_slice(&buf[start..]).unwrap()
}

async fn answer_sync(peer: &mut BufReader<UnixStream>, extra_before: &[u8]) {
    let req = request(peer).await;
    assert_eq!(req["execute"], "guest-sync-delimited");
    let id = &req["arguments"]["id"];
    let mut out = extra_before.to_vec();
    out.push(0xFF);
    out.extend_from_slice(format!("{{\"return\": {id}}}\n").as_bytes());
    peer.get_mut().write_all(&out).await.unwrap();
}

/// An agent client and the scripted peer at the other end of its channel.
fn agent_pair(max_reply: usize) -> (GuestAgent, BufReader<UnixStream>, tempfile::TempDir) {
    let (a, b) = UnixStream::pair().unwrap();
    let (dir, t) = transcript();
    (GuestAgent::with_max_reply(a, t, max_reply), BufReader::new(b), dir)
}

#[tokio::test]
async fn agent_resync_discards_stale_replies_and_garbage() {
    let (agent, mut peer, _d) = agent_pair(super::qga::MAX_REPLY);
    let server = async {
        // Stale replies of an earlier client, a half line, then our sync reply.
        answer_sync(&mut peer, b"{\"return\": 99}\n{\"return\": {\"version\": \"x\"}}\n{\"retu").await;
        let req = request(&mut peer).await;
        assert_eq!(req["execute"], "guest-ping");
        peer.get_mut().write_all(b"{\"return\": {}}\n").await.unwrap();
    };
    let client = agent.execute_raw("guest-ping", Value::Null, Duration::from_secs(5));
    let (_, got) = tokio::join!(server, client);
    assert_eq!(got.unwrap(), json!({}));
}

#[tokio::test]
async fn agent_skips_a_reply_that_names_another_request() {
    let (agent, mut peer, _d) = agent_pair(super::qga::MAX_REPLY);
    let server = async {
        answer_sync(&mut peer, b"").await;
        let req = request(&mut peer).await;
        let id = req["id"].as_u64().expect("commands carry an id");
        let stale = format!("{{\"return\": 0, \"id\": {}}}\n{{\"return\": \"thawed\", \"id\": {id}}}\n", id + 7);
        peer.get_mut().write_all(stale.as_bytes()).await.unwrap();
    };
    let client = agent.execute_raw("guest-fsfreeze-status", Value::Null, Duration::from_secs(5));
    let (_, got) = tokio::join!(server, client);
    assert_eq!(got.unwrap(), json!("thawed"));
}

#[tokio::test]
async fn agent_over_long_reply_is_refused_then_recovered() {
    let (agent, mut peer, _d) = agent_pair(1024);
    let server = async {
        answer_sync(&mut peer, b"").await;
        request(&mut peer).await;
        let mut huge = vec![b'A'; 100_000];
        huge.push(b'\n');
        peer.get_mut().write_all(&huge).await.unwrap();
        // The client must resync before its next command.
        answer_sync(&mut peer, b"").await;
        request(&mut peer).await;
        peer.get_mut().write_all(b"{\"return\": {}}\n").await.unwrap();
    };
    let client = async {
        let first = agent.execute_raw("guest-info", Value::Null, Duration::from_secs(5)).await;
        assert!(matches!(first, Err(AgentError::ReplyTooLong { len: 100_000, max: 1024, .. })), "{first:?}");
        agent.execute_raw("guest-ping", Value::Null, Duration::from_secs(5)).await
    };
    let (_, got) = tokio::join!(server, client);
    assert_eq!(got.unwrap(), json!({}));
}

#[tokio::test]
async fn agent_non_json_is_an_error_not_a_panic() {
    let (agent, mut peer, _d) = agent_pair(super::qga::MAX_REPLY);
    let server = async {
        answer_sync(&mut peer, b"").await;
        request(&mut peer).await;
        peer.get_mut().write_all(b"\x00\x9f\x92\x96 ceci n'est pas du JSON\n").await.unwrap();
    };
    let client = agent.execute_raw("guest-info", Value::Null, Duration::from_secs(5));
    let (_, got) = tokio::join!(server, client);
    assert!(matches!(got, Err(AgentError::Malformed { why: "not JSON", .. })), "{got:?}");
}

#[tokio::test]
async fn agent_unknown_enum_reaches_caller_as_raw_json() {
    let (agent, mut peer, _d) = agent_pair(super::qga::MAX_REPLY);
    let server = async {
        answer_sync(&mut peer, b"").await;
        request(&mut peer).await;
        peer.get_mut().write_all(b"{\"return\": \"half-frozen\"}\n").await.unwrap();
    };
    let client = agent.execute(qapi::qga::guest_fsfreeze_status {});
    let (_, got) = tokio::join!(server, client);
    match got {
        Err(AgentError::UnexpectedReply { raw, command, .. }) => {
            assert_eq!(raw, json!("half-frozen"));
            assert_eq!(command, "guest-fsfreeze-status");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn agent_silence_is_a_timeout_naming_the_command() {
    let (a, _b) = UnixStream::pair().unwrap();
    let (_d, t) = transcript();
    let agent = GuestAgent::new(a, t);
    let err = agent.wait_ready(Duration::from_millis(300)).await.unwrap_err();
    assert!(matches!(err, AgentError::NotResponding { .. }), "{err:?}");
    assert!(err.to_string().contains("guest-sync-delimited"));
}

/// A connected QMP client and the scripted peer at the other end.
pub(crate) async fn qmp_pair() -> (Qmp, BufReader<UnixStream>, tempfile::TempDir) {
    qmp_pair_after(b"").await
}

/// Answers the next QMP command with `{"return": <value>}` (raw JSON text), under its id.
pub(crate) async fn answer_once(peer: &mut BufReader<UnixStream>, value: &str) {
    let req = request(peer).await;
    let id = &req["id"];
    peer.get_mut().write_all(format!("{{\"return\": {value}, \"id\": {id}}}\n").as_bytes()).await.unwrap();
}

/// A connected client; the peer sends `before` ahead of the greeting.
async fn qmp_pair_after(before: &[u8]) -> (Qmp, BufReader<UnixStream>, tempfile::TempDir) {
    let (a, b) = UnixStream::pair().unwrap();
    let (d, t) = transcript();
    let mut peer = BufReader::new(b);
    let mut first = before.to_vec();
    first.extend_from_slice(
        b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 2, \"minor\": 0, \"major\": 10}, \"package\": \"\"}, \"capabilities\": []}}\n",
    );
    peer.get_mut().write_all(&first).await.unwrap();
    let server = async {
        let req = request(&mut peer).await;
        assert_eq!(req["execute"], "qmp_capabilities");
        let id = &req["id"];
        peer.get_mut().write_all(format!("{{\"return\": {{}}, \"id\": {id}}}\n").as_bytes()).await.unwrap();
    };
    let (_, qmp) = tokio::join!(server, Qmp::connect(a, t, Duration::from_secs(5)));
    let qmp = qmp.unwrap();
    assert_eq!(qmp.version(), Some((10, 0, 2)));
    (qmp, peer, d)
}

/// QEMU 10.0 once sent RESUME ahead of its greeting (a guest starting as the connection
/// opened); the event is kept, and the connection comes up.
#[tokio::test]
async fn qmp_event_before_the_greeting_is_queued() {
    let resume = b"{\"timestamp\": {\"seconds\": 1795864676, \"microseconds\": 332413}, \"event\": \"RESUME\"}\n";
    let (qmp, _peer, _d) = qmp_pair_after(resume).await;
    let events = qmp.events().snapshot();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].name, "RESUME");
}

#[tokio::test]
async fn qmp_unknown_event_is_queued_raw_and_replies_match_ids() {
    let (qmp, mut peer, _d) = qmp_pair().await;
    let server = async {
        let req = request(&mut peer).await;
        let id = &req["id"];
        // An event no schema knows, garbage, a reply to nobody, then ours.
        let out = format!(
            "{{\"event\": \"QUIESCE_FUTURE\", \"data\": {{\"k\": 1}}, \"timestamp\": {{\"seconds\": 1, \"microseconds\": 0}}}}\nnot json\n{{\"return\": {{}}, \"id\": 424242}}\n{{\"return\": {{\"running\": true, \"status\": \"running\"}}, \"id\": {id}}}\n"
        );
        peer.get_mut().write_all(out.as_bytes()).await.unwrap();
    };
    let client = qmp.execute(qapi::qmp::query_status {});
    let (_, got) = tokio::join!(server, client);
    assert!(got.unwrap().running);
    let ev = qmp.wait_event("QUIESCE_FUTURE", |d| d["k"] == 1, Duration::from_secs(1)).await.unwrap();
    assert_eq!(ev.timestamp, Some(1.0));
}

#[tokio::test]
async fn qmp_unknown_enum_value_reaches_caller_as_raw_json() {
    let (qmp, mut peer, _d) = qmp_pair().await;
    let server = async {
        let req = request(&mut peer).await;
        let id = &req["id"];
        let out =
            format!("{{\"return\": {{\"running\": false, \"status\": \"hibernating-on-the-moon\"}}, \"id\": {id}}}\n");
        peer.get_mut().write_all(out.as_bytes()).await.unwrap();
    };
    let (_, got) = tokio::join!(server, qmp.execute(qapi::qmp::query_status {}));
    match got {
        Err(QmpError::UnexpectedReply { raw, .. }) => assert_eq!(raw["status"], "hibernating-on-the-moon"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn qmp_error_carries_class_and_arguments() {
    let (qmp, mut peer, _d) = qmp_pair().await;
    let server = async {
        let req = request(&mut peer).await;
        let id = &req["id"];
        let out = format!(
            "{{\"error\": {{\"class\": \"DeviceNotFound\", \"desc\": \"Device 'nope' not found\"}}, \"id\": {id}}}\n"
        );
        peer.get_mut().write_all(out.as_bytes()).await.unwrap();
    };
    let call = qmp.execute_raw("block_resize", json!({"device": "nope", "size": 1}), Duration::from_secs(5));
    let (_, got) = tokio::join!(server, call);
    let err = got.unwrap_err();
    assert_eq!(err.class(), Some("DeviceNotFound"));
    let text = err.to_string();
    assert!(text.contains("block_resize") && text.contains("\"nope\""), "{text}");
}

#[tokio::test]
async fn qmp_timeout_and_disconnect_are_distinct() {
    let (qmp, peer, _d) = qmp_pair().await;
    let err = qmp.execute_raw("query-status", Value::Null, Duration::from_millis(50)).await.unwrap_err();
    assert!(matches!(err, QmpError::Timeout { .. }), "{err:?}");
    drop(peer);
    let err = qmp.execute_raw("query-status", Value::Null, Duration::from_secs(5)).await.unwrap_err();
    assert!(matches!(err, QmpError::Disconnected { .. } | QmpError::Io(_)), "{err:?}");
    let err = qmp.wait_event("STOP", |_| true, Duration::from_secs(5)).await.unwrap_err();
    assert!(matches!(err, QmpError::Event(super::WaitError::Closed { .. })), "{err:?}");
}
