//! What the guest's writers acknowledged at a freeze: the host's view of VSS writer status.
//!
//! qemu-ga tells the host only that the filesystems froze; the writers quiesced by its
//! freeze hooks (as VSS writers are by VSS) answer no one. So the guest keeps a log of the
//! freezes in RAM, [`FREEZE_LOG`] (on `/run`, a tmpfs: never part of a snapshot, and
//! writable while the disks are frozen), and the Child VM Snapshot reads it back through
//! the agent right after the thaw:
//!
//! ```text
//! begin <id>                       the host, before it sends the freeze
//! freeze <uptime>                  fsfreeze-hook, before any hook.d script runs
//! ack <writer> <seq> <ckpt> <dir>  a writer paused at transaction <seq>; ckpt 1 when its
//!                                  log was checkpointed and emptied (nothing to replay)
//! noack <writer> <dir>             a writer that did not pause in time (frozen anyway)
//! thaw <uptime>                    fsfreeze-hook, after every hook.d script ran on thaw
//! ```
//!
//! `<uptime>` is the guest's `/proc/uptime` (seconds, two decimals), the clock the guest's
//! workloads stamp their own writes with. The records after this backup's `begin` line are
//! this freeze's: an `ack` there is the proof that a writer took part. A guest without the
//! log, or a freeze never sent, leaves none, and the record says so.
//!
//! The log is written by the guest: it is read with a bound, parsed without trusting it, and
//! a line that does not parse is counted, not believed.

use std::time::Duration;

use qapi::qga::{guest_file_close, guest_file_open, guest_file_read, guest_file_write};
use serde::{Deserialize, Serialize};

use crate::qemu::GuestAgent;

/// The guest's freeze log (see the module's documentation).
pub const FREEZE_LOG: &str = "/run/quiesce/freeze.log";
/// The most of the log read back; a longer one is cut to its last part.
const MAX_LOG: usize = 256 << 10;
/// Bytes asked for per `guest-file-read`.
const CHUNK: i64 = 48 << 10;
/// Records kept per freeze: more than any guest has writers.
const MAX_RECORDS: usize = 256;

/// What the guest's log says about one freeze.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct FreezeRecord {
    /// The id the backup wrote to the log before sending the freeze.
    pub id: String,
    /// Guest uptime (centiseconds) when the freeze hook started: before any writer paused
    /// and before any filesystem froze. None: no freeze hook ran for this backup.
    pub freeze_cs: Option<u64>,
    /// Guest uptime (centiseconds) when the thaw hook ended: after every filesystem thawed.
    pub thaw_cs: Option<u64>,
    /// The writers that paused for this freeze.
    #[serde(default)]
    pub acks: Vec<WriterAck>,
    /// The writers that did not pause in time (the guest froze anyway).
    #[serde(default)]
    pub missing: Vec<String>,
    /// Why the log could not be read or written, if it could not (the guest keeps none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unreadable: Option<String>,
    /// Lines after this backup's `begin` that did not parse.
    #[serde(default)]
    pub garbled: usize,
}

/// One writer's acknowledgement of a freeze.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct WriterAck {
    /// The writer's name ("quiesce-app").
    pub writer: String,
    /// Where its data lives (for quiesce-app, the folder of its database).
    pub dir: String,
    /// The last transaction it committed before it paused.
    pub seq: u64,
    /// Its log was checkpointed into its data and emptied before the freeze.
    pub checkpointed: bool,
}

impl FreezeRecord {
    /// The acknowledgement of `writer` working in `dir`, if it gave one.
    pub fn ack(&self, writer: &str, dir: &str) -> Option<&WriterAck> {
        self.acks.iter().find(|a| a.writer == writer && a.dir == dir)
    }

    /// A one-line account, for reports.
    pub fn summary(&self) -> String {
        if let Some(why) = &self.unreadable {
            return format!("no freeze log ({why})");
        }
        let Some(f) = self.freeze_cs else { return format!("no freeze hook ran for freeze {}", self.id) };
        let acks: Vec<String> = self.acks.iter().map(|a| format!("{} {} at {}", a.writer, a.dir, a.seq)).collect();
        format!(
            "froze at {}, thawed at {}; acknowledged: {}{}",
            secs(f),
            self.thaw_cs.map_or("?".into(), secs),
            if acks.is_empty() { "none".into() } else { acks.join(", ") },
            if self.missing.is_empty() {
                String::new()
            } else {
                format!("; no answer from {}", self.missing.join(", "))
            }
        )
    }
}

/// Centiseconds as seconds with two decimals, as the guest writes them.
pub fn secs(cs: u64) -> String {
    format!("{}.{:02}s", cs / 100, cs % 100)
}

/// Parses a guest uptime ("123.45") into centiseconds.
pub fn parse_uptime(s: &str) -> Option<u64> {
    let (whole, frac) = s.split_once('.').unwrap_or((s, "0"));
    if whole.is_empty()
        || frac.is_empty()
        || frac.len() > 2
        || !(whole.bytes().chain(frac.bytes())).all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let frac: u64 = format!("{frac:0<2}").parse().ok()?;
    whole.parse::<u64>().ok()?.checked_mul(100)?.checked_add(frac)
}

/// Parses the log: the records after the last `begin <id>` line (none without one).
pub fn parse(log: &str, id: &str) -> FreezeRecord {
    let mut rec = FreezeRecord { id: id.to_owned(), ..Default::default() };
    let lines: Vec<&str> = log.lines().collect();
    let Some(start) = lines.iter().rposition(|l| l.split_once(' ') == Some(("begin", id))) else {
        return rec;
    };
    for line in lines[start + 1..].iter().take(MAX_RECORDS) {
        let mut words = line.splitn(5, ' ');
        let parsed = match (words.next(), words.next(), words.next(), words.next(), words.next()) {
            (Some("freeze"), Some(t), None, ..) => parse_uptime(t).map(|t| {
                rec.freeze_cs.get_or_insert(t);
            }),
            (Some("thaw"), Some(t), None, ..) => parse_uptime(t).map(|t| rec.thaw_cs = Some(t)),
            (Some("ack"), Some(writer), Some(seq), Some(ck @ ("0" | "1")), Some(dir)) => seq.parse().ok().map(|seq| {
                let ack = WriterAck { writer: writer.into(), dir: dir.into(), seq, checkpointed: ck == "1" };
                rec.acks.push(ack);
            }),
            (Some("noack"), Some(writer), Some(dir), ..) => {
                let rest: Vec<&str> = line.splitn(3, ' ').collect();
                let dir = rest.get(2).copied().unwrap_or(dir);
                rec.missing.push(format!("{writer} {dir}"));
                Some(())
            }
            // Another backup's freeze: this one's records end here.
            (Some("begin"), ..) => break,
            _ => None,
        };
        if parsed.is_none() {
            rec.garbled += 1;
        }
    }
    rec
}

/// Writes `begin <id>` to the guest's log, before the freeze is sent.
pub async fn begin(agent: &GuestAgent, id: &str, deadline: Duration) -> Result<(), String> {
    let handle = agent
        .execute_within(guest_file_open { path: FREEZE_LOG.into(), mode: Some("a".into()) }, deadline)
        .await
        .map_err(|e| format!("opening {FREEZE_LOG}: {e}"))?;
    let line = format!("begin {id}\n").into_bytes();
    let written = agent.execute_within(guest_file_write { handle, buf_b64: line, count: None }, deadline).await;
    let closed = agent.execute_within(guest_file_close { handle }, deadline).await;
    written.map_err(|e| format!("writing {FREEZE_LOG}: {e}"))?;
    closed.map_err(|e| format!("closing {FREEZE_LOG}: {e}"))?;
    Ok(())
}

/// Reads the guest's log back and returns this backup's record of it. A log that cannot be
/// read gives a record that says why, not an error: the backup itself is sound, and the
/// checks that need the record fail, naming the reason.
pub async fn read(agent: &GuestAgent, id: &str, deadline: Duration) -> FreezeRecord {
    match read_log(agent, deadline).await {
        Ok(text) => parse(&text, id),
        Err(why) => FreezeRecord { id: id.to_owned(), unreadable: Some(why), ..Default::default() },
    }
}

async fn read_log(agent: &GuestAgent, deadline: Duration) -> Result<String, String> {
    let handle = agent
        .execute_within(guest_file_open { path: FREEZE_LOG.into(), mode: Some("r".into()) }, deadline)
        .await
        .map_err(|e| format!("opening {FREEZE_LOG}: {e}"))?;
    let mut bytes = Vec::new();
    let mut result = Ok(());
    loop {
        match agent.execute_within(guest_file_read { handle, count: Some(CHUNK) }, deadline).await {
            Ok(r) => {
                bytes.extend_from_slice(&r.buf_b64);
                // Keep the end: this backup's records are the last ones.
                if bytes.len() > MAX_LOG {
                    bytes.drain(..bytes.len() - MAX_LOG);
                }
                if r.eof || r.buf_b64.is_empty() {
                    break;
                }
            }
            Err(e) => {
                result = Err(format!("reading {FREEZE_LOG}: {e}"));
                break;
            }
        }
    }
    let _ = agent.execute_within(guest_file_close { handle }, deadline).await;
    result.map(|()| String::from_utf8_lossy(&bytes).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uptimes_parse_to_centiseconds() {
        assert_eq!(parse_uptime("123.45"), Some(12345));
        assert_eq!(parse_uptime("7.5"), Some(750));
        assert_eq!(parse_uptime("9"), Some(900));
        for bad in ["", ".5", "1.", "1.234", "-1.00", "1e3", "x.10", "99999999999999999999.00"] {
            assert_eq!(parse_uptime(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_records_after_this_backups_begin_are_its_own() {
        let log = "begin old\nfreeze 1.00\nack quiesce-app 5 1 /mnt/data\nthaw 2.00\n\
                   begin b-1\nfreeze 10.50\nack quiesce-app 42 1 /mnt/my data\nnoack quiesce-app /var/lib/x y\n\
                   ack other 7 0 /srv\nthaw 11.25\n";
        let r = parse(log, "b-1");
        assert_eq!((r.freeze_cs, r.thaw_cs), (Some(1050), Some(1125)));
        assert_eq!(r.ack("quiesce-app", "/mnt/my data").map(|a| (a.seq, a.checkpointed)), Some((42, true)));
        assert_eq!(r.ack("other", "/srv").map(|a| a.checkpointed), Some(false));
        assert_eq!(r.missing, vec!["quiesce-app /var/lib/x y"]);
        assert_eq!(r.garbled, 0);
        assert!(
            r.summary().starts_with("froze at 10.50s, thawed at 11.25s; acknowledged: quiesce-app"),
            "{}",
            r.summary()
        );
        // The old backup's records, up to the next begin.
        assert_eq!(parse(log, "old").ack("quiesce-app", "/mnt/data").map(|a| a.seq), Some(5));
    }

    #[test]
    fn no_freeze_no_record() {
        // A freeze never sent: the host's begin is the last line.
        let r = parse("begin a\nfreeze 1.00\nthaw 2.00\nbegin b\n", "b");
        assert_eq!((r.freeze_cs, r.acks.len()), (None, 0));
        assert!(r.summary().contains("no freeze hook ran"), "{}", r.summary());
        assert_eq!(parse("freeze 1.00\n", "b").freeze_cs, None, "no begin line: nothing is this backup's");
    }

    #[test]
    fn garbage_is_counted_not_believed() {
        let r = parse("begin x\nack quiesce-app many 1 /d\nack q 1 2 /d\nfreeze soon\n\u{0}\u{ff}\nthaw 3.00\n", "x");
        assert_eq!((r.acks.len(), r.freeze_cs, r.thaw_cs, r.garbled), (0, None, Some(300), 4));
        let many: String = std::iter::repeat_n("ack w 1 1 /d\n", 1000).collect();
        assert_eq!(parse(&format!("begin x\n{many}"), "x").acks.len(), MAX_RECORDS);
    }
}
