//! A QMP client on tokio. It uses the `qapi` crate's command and return types, but its own
//! transport: every command has an id and a deadline, events go to a queue, and anything
//! the types don't know (new events, new enum values) is kept as raw JSON.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::events::{Event, EventQueue, WaitError};
use super::framing::{Frame, LineReader};
use super::message::{self, Message};
use super::transcript::Transcript;
use crate::sys::deadline;

/// query-qmp-schema replies are a few hundred KiB; nothing legitimate comes near this.
const MAX_LINE: usize = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// QEMU refused the command; `class` and `desc` are QEMU's own, the arguments are shown.
    #[error("QMP {command} failed: {class}: {desc} (arguments: {arguments})")]
    Command { command: String, arguments: Value, class: String, desc: String },
    /// QEMU did not answer in time: it is hung or overloaded (the command may still run).
    #[error("QMP {command} got no reply within {waited:?}")]
    Timeout { command: String, waited: Duration },
    /// The connection ended before the reply came: QEMU exited or crashed.
    #[error("QMP connection closed while waiting for {command} (did QEMU exit?)")]
    Disconnected { command: String },
    /// QEMU's reply does not fit the schema the `qapi` crate knows (a newer or older QEMU);
    /// it is not used, and the raw reply is shown.
    #[error("QMP {command} replied with JSON the qapi types don't accept ({error}); raw reply: {raw}")]
    UnexpectedReply { command: String, raw: Value, error: String },
    /// The connection did not start as QMP does (no greeting in time, or not a greeting):
    /// the socket is not QEMU's monitor, or QEMU failed as it started.
    #[error("QMP greeting: {0}")]
    Greeting(String),
    /// The command's arguments could not be encoded as JSON (a bug here, not in QEMU).
    #[error("could not encode the arguments of {command}: {error}")]
    Encode { command: String, error: String },
    /// An awaited event did not come in time, or the connection closed first.
    #[error(transparent)]
    Event(#[from] WaitError),
    /// Reading or writing the monitor socket failed.
    #[error("QMP socket: {0}")]
    Io(#[from] std::io::Error),
}

impl QmpError {
    /// QEMU's error class, when QEMU itself refused the command.
    pub fn class(&self) -> Option<&str> {
        match self {
            QmpError::Command { class, .. } => Some(class),
            _ => None,
        }
    }
}

type Reply = Result<Value, (String, String)>;

struct Shared {
    pending: Mutex<HashMap<u64, oneshot::Sender<Reply>>>,
    events: EventQueue,
    transcript: Transcript,
}

pub struct Qmp {
    shared: Arc<Shared>,
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    next_id: AtomicU64,
    reader: JoinHandle<()>,
    greeting: Value,
}

impl Qmp {
    /// Reads the greeting and negotiates capabilities, all within `timeout`. Events that
    /// come before the greeting are queued: QEMU 10.0 was seen to send RESUME first when
    /// the guest starts running as the connection opens.
    pub async fn connect(stream: UnixStream, transcript: Transcript, timeout: Duration) -> Result<Self, QmpError> {
        let (read, write) = stream.into_split();
        let mut lines = LineReader::new(read, MAX_LINE);
        let shared = Arc::new(Shared {
            pending: Mutex::new(HashMap::new()),
            events: EventQueue::default(),
            transcript: transcript.clone(),
        });
        let deadline = tokio::time::Instant::now() + timeout;
        let greeting = loop {
            let frame = tokio::time::timeout_at(deadline, lines.next_frame())
                .await
                .map_err(|_| QmpError::Greeting(format!("none within {timeout:?}")))??;
            let line = match frame {
                Some(Frame::Line(l)) => l,
                other => return Err(QmpError::Greeting(format!("unexpected first frame {other:?}"))),
            };
            transcript.record("qmp", "<-", &line);
            match message::parse(&line) {
                Message::Greeting(g) => break g,
                Message::Event { name, data, timestamp } => shared.events.push(Event { name, data, timestamp }),
                other => return Err(QmpError::Greeting(format!("unexpected first message {other:?}"))),
            }
        };
        let reader = tokio::spawn(read_loop(lines, shared.clone()));
        let qmp = Qmp { shared, writer: tokio::sync::Mutex::new(write), next_id: AtomicU64::new(1), reader, greeting };
        qmp.execute_raw("qmp_capabilities", json!({}), timeout).await?;
        Ok(qmp)
    }

    /// QEMU's version as (major, minor, micro), from the greeting.
    pub fn version(&self) -> Option<(u64, u64, u64)> {
        let q = &self.greeting["version"]["qemu"];
        Some((q["major"].as_u64()?, q["minor"].as_u64()?, q["micro"].as_u64()?))
    }

    pub fn events(&self) -> &EventQueue {
        &self.shared.events
    }

    pub fn transcript(&self) -> &Transcript {
        &self.shared.transcript
    }

    /// Runs a typed command QEMU answers at once, within [`deadline::QMP_COMMAND`].
    pub async fn execute<C: qapi::Command>(&self, cmd: C) -> Result<C::Ok, QmpError> {
        self.execute_within(cmd, deadline::QMP_COMMAND).await
    }

    pub async fn execute_within<C: qapi::Command>(&self, cmd: C, timeout: Duration) -> Result<C::Ok, QmpError> {
        let args = serde_json::to_value(&cmd)
            .map_err(|e| QmpError::Encode { command: C::NAME.to_owned(), error: e.to_string() })?;
        let raw = self.execute_raw(C::NAME, args, timeout).await?;
        serde_json::from_value(raw.clone()).map_err(|e| QmpError::UnexpectedReply {
            command: C::NAME.to_owned(),
            raw,
            error: e.to_string(),
        })
    }

    /// Runs any command by name with raw JSON arguments; the reply comes back as raw JSON.
    pub async fn execute_raw(&self, command: &str, arguments: Value, timeout: Duration) -> Result<Value, QmpError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.shared.pending.lock().unwrap_or_else(|e| e.into_inner()).insert(id, tx);
        // Removes the pending entry however this future ends: reply, timeout or being dropped.
        let _cleanup = PendingGuard { shared: &self.shared, id };
        let mut msg = json!({ "execute": command, "id": id });
        if !arguments.is_null() && arguments != json!({}) {
            msg["arguments"] = arguments.clone();
        }
        let mut line = serde_json::to_vec(&msg).expect("a serde_json::Value always encodes");
        self.shared.transcript.record("qmp", "->", &line);
        line.push(b'\n');
        let send_and_wait = async {
            self.writer.lock().await.write_all(&line).await?;
            Ok::<_, std::io::Error>(rx.await)
        };
        match tokio::time::timeout(timeout, send_and_wait).await {
            Err(_) => {
                self.shared.transcript.note("qmp", &format!("{command} (id {id}) timed out after {timeout:?}"));
                Err(QmpError::Timeout { command: command.to_owned(), waited: timeout })
            }
            Ok(Err(e)) => Err(QmpError::Io(e)),
            Ok(Ok(Err(_closed))) => Err(QmpError::Disconnected { command: command.to_owned() }),
            Ok(Ok(Ok(Ok(value)))) => Ok(value),
            Ok(Ok(Ok(Err((class, desc))))) => {
                Err(QmpError::Command { command: command.to_owned(), arguments, class, desc })
            }
        }
    }

    /// Waits for an event (including one already queued); see [`EventQueue::wait`].
    pub async fn wait_event(
        &self,
        name: &str,
        matches: impl Fn(&Value) -> bool,
        timeout: Duration,
    ) -> Result<Event, QmpError> {
        Ok(self.shared.events.wait(name, matches, timeout).await?)
    }

    /// True once the connection has ended (QEMU exited or closed the socket).
    pub fn is_closed(&self) -> bool {
        self.reader.is_finished()
    }
}

impl Drop for Qmp {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

struct PendingGuard<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.shared.pending.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.id);
    }
}

async fn read_loop(mut lines: LineReader<OwnedReadHalf>, shared: Arc<Shared>) {
    loop {
        let frame = match lines.next_frame().await {
            Ok(Some(f)) => f,
            Ok(None) => {
                shared.transcript.note("qmp", "connection closed");
                break;
            }
            Err(e) => {
                shared.transcript.note("qmp", &format!("read error: {e}"));
                break;
            }
        };
        let line = match frame {
            Frame::Line(l) => l,
            Frame::TooLong { len } => {
                shared.transcript.note("qmp", &format!("dropped an over-long line of {len} bytes"));
                continue;
            }
            Frame::Delimiter => continue,
        };
        shared.transcript.record("qmp", "<-", &line);
        let (id, reply) = match message::parse(&line) {
            Message::Return { id, value } => (id, Ok(value)),
            Message::Error { id, class, desc } => (id, Err((class, desc))),
            Message::Event { name, data, timestamp } => {
                shared.events.push(Event { name, data, timestamp });
                continue;
            }
            Message::Greeting(_) | Message::Unknown { .. } => continue,
        };
        let waiter = id
            .and_then(|v| v.as_u64())
            .and_then(|id| shared.pending.lock().unwrap_or_else(|e| e.into_inner()).remove(&id));
        match waiter {
            // The caller may have given up already; that is not an error here.
            Some(tx) => drop(tx.send(reply)),
            None => shared.transcript.note("qmp", "reply to no pending command (late or unsolicited)"),
        }
    }
    shared.events.close();
    // Dropping the senders wakes every waiter with Disconnected.
    shared.pending.lock().unwrap_or_else(|e| e.into_inner()).clear();
}
