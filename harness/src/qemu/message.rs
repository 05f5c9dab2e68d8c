//! Classifies one JSON line from QMP or the guest agent. Every shape QEMU or a guest can
//! send (including ones this code has never seen) maps to a variant; nothing panics.

use serde_json::Value;

#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// QMP's `{"QMP": {...}}` greeting.
    Greeting(Value),
    /// A successful reply. `id` is whatever the request carried, if anything.
    Return { id: Option<Value>, value: Value },
    /// A failed reply, with QEMU's error class kept as a string so new classes are not lost.
    Error { id: Option<Value>, class: String, desc: String },
    /// An asynchronous event. `data` is raw JSON, so unknown events are never a parse error.
    Event { name: String, data: Value, timestamp: Option<f64> },
    /// Valid JSON of no known shape, or not JSON at all.
    Unknown { text: String, why: &'static str },
}

/// At most this much of an unparseable line is kept for error messages.
const SNIPPET: usize = 200;

pub fn snippet(bytes: &[u8]) -> String {
    let end = bytes.len().min(SNIPPET);
    let mut s = String::from_utf8_lossy(&bytes[..end]).into_owned();
    if bytes.len() > SNIPPET {
        s.push_str(&format!("… ({} bytes)", bytes.len()));
    }
    s
}

pub fn parse(line: &[u8]) -> Message {
    let value: Value = match serde_json::from_slice(line) {
        Ok(v) => v,
        Err(_) => return Message::Unknown { text: snippet(line), why: "not JSON" },
    };
    let Value::Object(mut obj) = value else {
        return Message::Unknown { text: snippet(line), why: "not a JSON object" };
    };
    let id = obj.remove("id");
    if let Some(value) = obj.remove("return") {
        return Message::Return { id, value };
    }
    if let Some(err) = obj.remove("error") {
        let class = err.get("class").and_then(Value::as_str).unwrap_or("(no class)");
        let desc = err.get("desc").and_then(Value::as_str).unwrap_or("(no description)");
        return Message::Error { id, class: class.to_owned(), desc: desc.to_owned() };
    }
    if let Some(Value::String(name)) = obj.remove("event") {
        let data = obj.remove("data").unwrap_or(Value::Null);
        let timestamp = obj.get("timestamp").and_then(|t| {
            let secs = t.get("seconds")?.as_f64()?;
            let micros = t.get("microseconds")?.as_f64()?;
            Some(secs + micros / 1e6)
        });
        return Message::Event { name, data, timestamp };
    }
    if let Some(greeting) = obj.remove("QMP") {
        return Message::Greeting(greeting);
    }
    Message::Unknown { text: snippet(line), why: "no return, error, event or QMP key" }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn return_with_id() {
        let m = parse(br#"{"return": {"status": "running"}, "id": 4}"#);
        assert_eq!(m, Message::Return { id: Some(json!(4)), value: json!({"status": "running"}) });
    }

    #[test]
    fn error_keeps_unknown_class_as_text() {
        let m = parse(br#"{"error": {"class": "SomeFutureClass", "desc": "nope"}, "id": 1}"#);
        assert_eq!(m, Message::Error { id: Some(json!(1)), class: "SomeFutureClass".into(), desc: "nope".into() });
    }

    #[test]
    fn error_without_fields_does_not_panic() {
        assert!(matches!(parse(br#"{"error": 3}"#), Message::Error { .. }));
    }

    #[test]
    fn unknown_event_is_raw_json() {
        let m = parse(
            br#"{"event": "FROBNICATED", "data": {"x": [1]}, "timestamp": {"seconds": 10, "microseconds": 500000}}"#,
        );
        assert_eq!(m, Message::Event { name: "FROBNICATED".into(), data: json!({"x": [1]}), timestamp: Some(10.5) });
    }

    #[test]
    fn garbage_is_unknown() {
        assert!(matches!(parse(b"\x00\x01 not json"), Message::Unknown { why: "not JSON", .. }));
        assert!(matches!(parse(b"[1,2]"), Message::Unknown { why: "not a JSON object", .. }));
        assert!(matches!(parse(br#"{"hello": 1}"#), Message::Unknown { .. }));
        assert!(matches!(parse(br#"{"event": 5}"#), Message::Unknown { .. }));
    }

    #[test]
    fn snippet_is_bounded() {
        let s = snippet(&[b'a'; 10_000]);
        assert!(s.len() < 300, "{s}");
        assert!(s.ends_with("(10000 bytes)"));
    }
}
