//! libvirt's freeze window, read from its debug log of the guest agent traffic: when it sent
//! `guest-fsfreeze-freeze` and `guest-fsfreeze-thaw`, and when each returned.

use serde_json::Value;
use time::format_description::BorrowedFormatItem;
use time::macros::format_description;
use time::OffsetDateTime;

/// Why a freeze window could not be read from libvirt's log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LogError {
    /// libvirt's log has no line sending this agent command: the daemon was not started
    /// here with its agent traffic at debug level, or libvirt never sent the command
    /// (`virsh` failed before the freeze, or after it without thawing).
    #[error("no `{0}` sent in libvirt's log")]
    NotSent(&'static str),
    /// The command was sent but no reply was logged on the same thread: the agent did not
    /// answer, or the log was cut off.
    #[error("no reply to `{0}` in libvirt's log")]
    NoReply(&'static str),
    /// libvirt logged a failed reply (`ret` other than 0): the guest did not freeze or thaw.
    #[error("`{command}` failed in libvirt's log (ret={ret})")]
    Failed { command: &'static str, ret: String },
}

/// libvirt's freeze and thaw of one `--quiesce` snapshot, read from its debug log of the
/// agent traffic. Times are milliseconds since the epoch, as libvirt stamps its log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FreezeWindow {
    /// `guest-fsfreeze-freeze` handed to the agent channel.
    pub freeze_sent_ms: i64,
    /// Its reply received.
    pub freeze_returned_ms: i64,
    /// `guest-fsfreeze-thaw` handed to the agent channel.
    pub thaw_sent_ms: i64,
    /// Its reply received.
    pub thaw_returned_ms: i64,
    /// The freeze's reply: how many filesystems the guest froze.
    pub frozen: Option<u64>,
}

impl FreezeWindow {
    /// From sending the freeze until the thaw returned.
    pub fn window_ms(&self) -> f64 {
        (self.thaw_returned_ms - self.freeze_sent_ms) as f64
    }
    /// The guest's own freeze: from sending it until it returned.
    pub fn guest_freeze_ms(&self) -> f64 {
        (self.freeze_returned_ms - self.freeze_sent_ms) as f64
    }
    /// The host's share: from the freeze returning until the thaw was sent.
    pub fn host_ms(&self) -> f64 {
        (self.thaw_sent_ms - self.freeze_returned_ms) as f64
    }
    pub fn thaw_ms(&self) -> f64 {
        (self.thaw_returned_ms - self.thaw_sent_ms) as f64
    }
}

/// One line of libvirt's log: `2026-11-28 06:56:13.891+0000: 13552: debug : func:1039 : msg`.
struct LogLine<'a> {
    ms: i64,
    thread: &'a str,
    func: &'a str,
    msg: &'a str,
}

fn parse_log_line(line: &str) -> Option<LogLine<'_>> {
    let ms = parse_log_time(line.get(..28)?)?;
    let rest = line.get(28..)?.strip_prefix(": ")?;
    let (thread, rest) = rest.split_once(": ")?;
    let (_level, rest) = rest.split_once(" : ")?;
    let (func, msg) = rest.split_once(" : ")?;
    Some(LogLine { ms, thread, func: func.split(':').next()?, msg })
}

/// libvirt's time stamp, always UTC written as `+0000`: `2026-11-28 06:56:13.891+0000`.
const STAMP: &[BorrowedFormatItem<'static>] = format_description!(
    "[year]-[month]-[day] [hour]:[minute]:[second].[subsecond digits:3][offset_hour sign:mandatory][offset_minute]"
);

/// A libvirt time stamp to milliseconds since the epoch.
fn parse_log_time(s: &str) -> Option<i64> {
    let t = OffsetDateTime::parse(s, STAMP).ok()?;
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok()
}

const AGENT_COMMAND: &str = "qemuAgentCommandFull";

/// Finds the first freeze in `log` (the part of the daemon's log written during one
/// snapshot) and the thaw after it.
pub fn freeze_window(log: &str) -> Result<FreezeWindow, LogError> {
    let lines: Vec<LogLine> = log.lines().filter_map(parse_log_line).collect();
    let sent = |command: &'static str, from: usize| {
        let needle = format!("\"execute\":\"{command}\"");
        lines[from..]
            .iter()
            .position(|l| l.func == AGENT_COMMAND && l.msg.starts_with("Send command") && l.msg.contains(&needle))
            .map(|i| from + i)
            .ok_or(LogError::NotSent(command))
    };
    let returned = |command: &'static str, from: usize| {
        let thread = lines[from].thread;
        let i = lines[from + 1..]
            .iter()
            .position(|l| l.func == AGENT_COMMAND && l.thread == thread && l.msg.starts_with("Receive command reply"))
            .map(|i| from + 1 + i)
            .ok_or(LogError::NoReply(command))?;
        match lines[i].msg.split_once("ret=").map(|(_, r)| r.split_whitespace().next().unwrap_or("")) {
            Some("0") => Ok(i),
            other => Err(LogError::Failed { command, ret: other.unwrap_or("?").to_owned() }),
        }
    };
    let f = sent("guest-fsfreeze-freeze", 0)?;
    let fr = returned("guest-fsfreeze-freeze", f)?;
    let t = sent("guest-fsfreeze-thaw", fr)?;
    let tr = returned("guest-fsfreeze-thaw", t)?;
    // The agent's reply, logged by the I/O thread between the send and its return.
    let frozen = lines[f..fr].iter().find_map(|l| {
        let json = l.msg.strip_prefix("Line [")?.strip_suffix(']')?;
        serde_json::from_str::<Value>(json).ok()?["return"].as_u64()
    });
    Ok(FreezeWindow {
        freeze_sent_ms: lines[f].ms,
        freeze_returned_ms: lines[fr].ms,
        thaw_sent_ms: lines[t].ms,
        thaw_returned_ms: lines[tr].ms,
        frozen,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_times() {
        assert_eq!(parse_log_time("1970-01-01 00:00:00.000+0000"), Some(0));
        assert_eq!(parse_log_time("2026-11-28 06:56:13.891+0000"), Some(1_795_848_973_891));
        assert_eq!(parse_log_time("2026-11-28 07:56:13.891+0100"), Some(1_795_848_973_891));
        assert_eq!(parse_log_time("2024-02-29 23:59:59.999-0030"), Some(1_709_251_199_999 + 1_800_000));
        assert_eq!(parse_log_time("2026-11-28 06:56:13,891+0000"), None);
        assert_eq!(parse_log_time("garbage"), None);
    }

    /// Lines as libvirt 9.0 wrote them during `snapshot-create-as --quiesce` (one disk).
    const LOG: &str = r#"2026-11-28 06:56:13.747+0000: 13552: debug : qemuAgentGuestSyncSend:823 : Sending guest-sync command with ID: 1795848973747
2026-11-28 06:56:13.891+0000: 13552: debug : qemuAgentCommandFull:1039 : Send command '{"execute":"guest-fsfreeze-freeze"}' for write, seconds = -2
2026-11-28 06:56:14.093+0000: 13583: debug : qemuAgentIOProcessLine:214 : Line [{"return": 2}]
2026-11-28 06:56:14.093+0000: 13583: debug : qemuAgentIOProcessData:294 : Total used 14 bytes out of 14 available in buffer
2026-11-28 06:56:14.093+0000: 13552: debug : qemuAgentCommandFull:1043 : Receive command reply ret=0 rxObject=0x7fe8bc01d1e0
 fd=-1
2026-11-28 06:56:14.200+0000: 13552: debug : qemuAgentCommandFull:1039 : Send command '{"execute":"guest-fsfreeze-thaw"}' for write, seconds = -2
2026-11-28 06:56:14.310+0000: 13583: debug : qemuAgentIOProcessLine:214 : Line [{"return": 2}]
2026-11-28 06:56:14.320+0000: 13552: debug : qemuAgentCommandFull:1043 : Receive command reply ret=0 rxObject=0x7fe8bc003d00
"#;

    #[test]
    fn freeze_window_from_the_log() {
        let w = freeze_window(LOG).unwrap();
        assert_eq!(w.frozen, Some(2));
        assert_eq!((w.guest_freeze_ms(), w.host_ms(), w.thaw_ms(), w.window_ms()), (202.0, 107.0, 120.0, 429.0));
        let no_thaw: String = LOG.lines().take(6).map(|l| format!("{l}\n")).collect();
        assert_eq!(freeze_window(&no_thaw).unwrap_err(), LogError::NotSent("guest-fsfreeze-thaw"));
        let failed = LOG.replacen("reply ret=0", "reply ret=-1", 1);
        let e = freeze_window(&failed).unwrap_err();
        assert_eq!(e, LogError::Failed { command: "guest-fsfreeze-freeze", ret: "-1".into() });
        assert_eq!(e.to_string(), "`guest-fsfreeze-freeze` failed in libvirt's log (ret=-1)");
        assert_eq!(freeze_window(""), Err(LogError::NotSent("guest-fsfreeze-freeze")));
    }
}
