//! A qemu-guest-agent client. The agent answers one request at a time, and older agents
//! do not echo ids, so after a timeout or a cancelled command a late reply could be taken
//! for the answer to the next request. The client therefore resynchronises with
//! `guest-sync-delimited` (0xFF-framed, with a fresh id) before the first command and
//! whenever a command did not end with its own reply: a timeout, garbage, or a caller that
//! dropped the future mid-flight. The guest is untrusted: lines are bounded and every reply
//! is parsed without panics.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::time::Instant;

use super::framing::{Frame, LineReader, DELIMITER};
use super::message::{self, Message};
use super::transcript::Transcript;
use crate::sys::deadline;

/// Bound on one agent reply line; guest-exec output is capped well below this.
pub const MAX_REPLY: usize = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The agent answered with an error: it refused the command (disabled, unknown, not
    /// allowed while frozen) or the command failed in the guest; `desc` is its reason.
    #[error("guest agent {command} failed: {class}: {desc}")]
    Command { command: String, class: String, desc: String },
    /// The agent answered the resync but not this command in time: it may be hung in the
    /// command (a freeze hook that never returns), or the guest is overloaded.
    #[error("guest agent gave no reply to {command} within {waited:?}")]
    Timeout { command: String, waited: Duration },
    /// Nothing answered on the agent's channel: qemu-ga is not running, is stopped, or the
    /// guest has not booted that far.
    #[error("guest agent did not answer guest-sync-delimited within {waited:?} (is qemu-ga running in the guest?)")]
    NotResponding { waited: Duration },
    /// The channel closed: QEMU exited or the serial port was removed.
    #[error("guest agent channel closed during {command}")]
    Disconnected { command: String },
    /// The guest sent a reply longer than this client accepts; it was discarded unread.
    #[error("guest agent reply to {command} is longer than {max} bytes ({len}); discarded")]
    ReplyTooLong { command: String, len: usize, max: usize },
    /// The guest sent something that is not a reply (not JSON, or of no known shape).
    #[error("guest agent reply to {command} is malformed ({why}): {text}")]
    Malformed { command: String, why: &'static str, text: String },
    /// The reply is JSON but does not fit QEMU's schema for the command (a missing field, an
    /// unknown enum value): it is not used, and the raw reply is shown.
    #[error("guest agent reply to {command} does not fit the qapi types ({error}); raw reply: {raw}")]
    UnexpectedReply { command: String, raw: Value, error: String },
    /// The command's arguments could not be encoded as JSON (a bug here, not in the guest).
    #[error("could not encode the arguments of {command}: {error}")]
    Encode { command: String, error: String },
    /// Reading or writing the agent's socket failed.
    #[error("guest agent channel: {0}")]
    Io(#[from] std::io::Error),
}

impl AgentError {
    /// True when the agent's answer (or silence) may leave the stream out of step.
    fn desyncs(&self) -> bool {
        !matches!(self, AgentError::Command { .. } | AgentError::UnexpectedReply { .. } | AgentError::Encode { .. })
    }
}

struct Channel {
    lines: LineReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    in_sync: bool,
}

pub struct GuestAgent {
    chan: tokio::sync::Mutex<Channel>,
    transcript: Transcript,
    next_id: AtomicU64,
    max_reply: usize,
}

impl GuestAgent {
    pub fn new(stream: UnixStream, transcript: Transcript) -> Self {
        Self::with_max_reply(stream, transcript, MAX_REPLY)
    }

    pub fn with_max_reply(stream: UnixStream, transcript: Transcript, max_reply: usize) -> Self {
        let (read, writer) = stream.into_split();
        // Ids only need to differ from those of earlier clients of the same agent, whose
        // late replies may still be queued in the channel.
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos() as u64 ^ (std::process::id() as u64) << 20)
            .unwrap_or(1);
        Self {
            chan: tokio::sync::Mutex::new(Channel { lines: LineReader::new(read, max_reply), writer, in_sync: false }),
            transcript,
            next_id: AtomicU64::new(seed % (1 << 40)),
            max_reply,
        }
    }

    /// Waits until the agent answers a sync, retrying while it is not yet up.
    /// Each attempt is bounded, so a guest that boots late is found soon after it is ready.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<(), AgentError> {
        let deadline = Instant::now() + timeout;
        let mut chan = self.chan.lock().await;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(AgentError::NotResponding { waited: timeout });
            }
            match self.sync(&mut chan, left.min(deadline::AGENT_SYNC_ATTEMPT)).await {
                Ok(()) => return Ok(()),
                Err(AgentError::NotResponding { .. }) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Runs a typed command the agent answers at once, within [`deadline::AGENT_COMMAND`].
    pub async fn execute<C: qapi::Command>(&self, cmd: C) -> Result<C::Ok, AgentError> {
        self.execute_within(cmd, deadline::AGENT_COMMAND).await
    }

    pub async fn execute_within<C: qapi::Command>(&self, cmd: C, timeout: Duration) -> Result<C::Ok, AgentError> {
        let args = serde_json::to_value(&cmd)
            .map_err(|e| AgentError::Encode { command: C::NAME.to_owned(), error: e.to_string() })?;
        let raw = self.execute_raw(C::NAME, args, timeout).await?;
        serde_json::from_value(raw.clone()).map_err(|e| AgentError::UnexpectedReply {
            command: C::NAME.to_owned(),
            raw,
            error: e.to_string(),
        })
    }

    /// Runs any command by name; the deadline covers the resync (if needed) and the reply.
    pub async fn execute_raw(&self, command: &str, arguments: Value, timeout: Duration) -> Result<Value, AgentError> {
        let deadline = Instant::now() + timeout;
        let mut chan = self.chan.lock().await;
        if !chan.in_sync {
            self.sync(&mut chan, timeout).await?;
        }
        // Out of step until our reply is read: if this future is dropped after the send (an
        // interrupted job), the next command resyncs instead of taking this reply as its own.
        chan.in_sync = false;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.send(&mut chan, command, &arguments, Some(id)).await?;
        let result = self.read_reply(&mut chan, command, id, deadline, timeout).await;
        chan.in_sync = !result.as_ref().is_err_and(AgentError::desyncs);
        result
    }

    /// Waits until a `guest-ping` goes unanswered for [`deadline::AGENT_SILENCE`]: the agent
    /// was stopped or hangs.
    /// Errors if it still answers at `deadline`.
    pub async fn wait_silent(&self, deadline: Duration) -> Result<(), AgentError> {
        let until = Instant::now() + deadline;
        loop {
            match self.execute_within(qapi::qga::guest_ping {}, deadline::AGENT_SILENCE).await {
                Err(AgentError::Timeout { .. } | AgentError::NotResponding { .. }) => return Ok(()),
                _ if Instant::now() >= until => {
                    return Err(AgentError::Timeout {
                        command: "guest-ping (expected no answer)".into(),
                        waited: deadline,
                    })
                }
                _ => continue,
            }
        }
    }

    /// Sends a command that gives no reply when it succeeds (guest-shutdown, guest-suspend-*).
    pub async fn execute_no_reply(&self, command: &str, arguments: Value, timeout: Duration) -> Result<(), AgentError> {
        let mut chan = self.chan.lock().await;
        if !chan.in_sync {
            self.sync(&mut chan, timeout).await?;
        }
        // Any error reply would arrive unasked-for later, so resync before the next command.
        chan.in_sync = false;
        self.send(&mut chan, command, &arguments, None).await
    }

    async fn send(
        &self,
        chan: &mut Channel,
        command: &str,
        arguments: &Value,
        id: Option<u64>,
    ) -> Result<(), AgentError> {
        let mut msg = json!({ "execute": command });
        if let Some(id) = id {
            msg["id"] = json!(id);
        }
        if !arguments.is_null() && arguments != &json!({}) {
            msg["arguments"] = arguments.clone();
        }
        let mut line = serde_json::to_vec(&msg).expect("a serde_json::Value always encodes");
        self.transcript.record("qga", "->", &line);
        line.push(b'\n');
        chan.writer.write_all(&line).await?;
        Ok(())
    }

    /// Reads up to our reply. A reply naming another request's id is a late answer to an
    /// earlier, dropped request (an agent that echoes ids lets us tell), and is skipped.
    async fn read_reply(
        &self,
        chan: &mut Channel,
        command: &str,
        id: u64,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<Value, AgentError> {
        let ours = |reply_id: &Option<Value>| reply_id.as_ref().is_none_or(|r| r.as_u64() == Some(id));
        loop {
            let frame = match tokio::time::timeout_at(deadline, chan.lines.next_frame()).await {
                Err(_) => return Err(AgentError::Timeout { command: command.to_owned(), waited: timeout }),
                Ok(Err(e)) => return Err(e.into()),
                Ok(Ok(None)) => return Err(AgentError::Disconnected { command: command.to_owned() }),
                Ok(Ok(Some(f))) => f,
            };
            let line = match frame {
                // A late sync reply's sentinel: the line after it is not ours either, and only
                // a resync can tell what is, so the caller sees an error and the stream resyncs.
                Frame::Delimiter => {
                    return Err(AgentError::Malformed {
                        command: command.to_owned(),
                        why: "unexpected 0xFF delimiter",
                        text: String::new(),
                    })
                }
                Frame::TooLong { len } => {
                    return Err(AgentError::ReplyTooLong { command: command.to_owned(), len, max: self.max_reply })
                }
                Frame::Line(l) => l,
            };
            self.transcript.record("qga", "<-", &line);
            return match message::parse(&line) {
                Message::Return { id, .. } | Message::Error { id, .. } if !ours(&id) => {
                    self.transcript.note("qga", "skipped a late reply to an earlier request");
                    continue;
                }
                Message::Return { value, .. } => Ok(value),
                Message::Error { class, desc, .. } => {
                    Err(AgentError::Command { command: command.to_owned(), class, desc })
                }
                Message::Unknown { text, why } => Err(AgentError::Malformed { command: command.to_owned(), why, text }),
                Message::Event { .. } | Message::Greeting(_) => Err(AgentError::Malformed {
                    command: command.to_owned(),
                    why: "an event or greeting where a reply belongs",
                    text: message::snippet(&line),
                }),
            };
        }
    }

    /// One guest-sync-delimited exchange: a 0xFF to reset the agent's parser, the request,
    /// then everything is discarded up to the reply's own 0xFF and a return of our id.
    async fn sync(&self, chan: &mut Channel, timeout: Duration) -> Result<(), AgentError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let deadline = Instant::now() + timeout;
        let mut line = vec![DELIMITER];
        line.extend_from_slice(
            format!("{{\"execute\":\"guest-sync-delimited\",\"arguments\":{{\"id\":{id}}}}}\n").as_bytes(),
        );
        self.transcript.record("qga", "->", &line[1..line.len() - 1]);
        chan.writer.write_all(&line).await?;
        let mut after_delimiter = false;
        loop {
            let frame = match tokio::time::timeout_at(deadline, chan.lines.next_frame()).await {
                Err(_) => return Err(AgentError::NotResponding { waited: timeout }),
                Ok(Err(e)) => return Err(e.into()),
                Ok(Ok(None)) => return Err(AgentError::Disconnected { command: "guest-sync-delimited".into() }),
                Ok(Ok(Some(f))) => f,
            };
            match frame {
                Frame::Delimiter => after_delimiter = true,
                Frame::TooLong { len } => {
                    self.transcript.note("qga", &format!("discarded {len} bytes while resyncing"));
                    after_delimiter = false;
                }
                Frame::Line(l) => {
                    self.transcript.record("qga", "<-", &l);
                    let ours = after_delimiter
                        && matches!(message::parse(&l), Message::Return { value, .. } if value.as_u64() == Some(id));
                    if ours {
                        chan.in_sync = true;
                        return Ok(());
                    }
                    after_delimiter = false;
                }
            }
        }
    }
}
