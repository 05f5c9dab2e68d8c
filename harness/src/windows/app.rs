//! The Windows guest's application writer: the hook for a user-supplied VSS writer
//! (`guest-images/windows/media/quiesce/workloads/app-hook.ps1`, installed in
//! `C:\quiesce\workloads` by the first logon). A PowerShell appender proves crash
//! consistency only; application consistency needs a real VSS writer, and none ships with
//! Windows that a test can drive. SQL Server Express (brought by the user) is the one the
//! hook knows: its SQL Writer takes part in every VSS snapshot, its Application log shows
//! event 3197 ("I/O is frozen on database quiesce") and 3198 ("I/O was resumed on database
//! quiesce") around the freeze, and `DBCC CHECKDB` checks the restored database.
//!
//! With no SQL Server in the image, [`detect`] says [`Writer::Absent`] and the scenario is
//! reported skipped (never passed, never failed), with how to add one.
//!
//! NEVER RUN AGAINST A LIVE WINDOWS GUEST, nor against SQL Server: the hook was written
//! from SQL Server's and PowerShell's documentation; what the runner does with its
//! answers is driven in tests by a scripted agent (`scenario/run/windows_tests.rs`).

use super::deadline::POWERSHELL;
use super::workload::{ps_quote, WORKLOADS};
use crate::qemu::winexec::{self, WinExecError, WinExit};
use crate::qemu::GuestAgent;

/// The database the hook creates on the app's data disk, named in the writer's events.
pub const DATABASE: &str = "quiesce";
/// SQL Server's event "I/O is frozen on database X" (its writer's freeze).
pub const EVENT_FROZEN: u32 = 3197;
/// SQL Server's event "I/O was resumed on database X" (its writer's thaw).
pub const EVENT_RESUMED: u32 = 3198;
/// The most event lines read from the guest (the hook asks for 10; the guest is untrusted).
const MAX_EVENTS: usize = 64;
/// How much of an event line is kept.
const MAX_LINE: usize = 512;
/// The hook's exit code when no writer is installed.
const EXIT_ABSENT: u32 = 3;

/// The VSS writer the image has for the app workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Writer {
    /// No SQL Server instance: the app workload cannot run.
    Absent,
    /// SQL Server, with its instance name (`SQLEXPRESS` for Express's default).
    SqlServer { instance: String },
}

/// What the application hook could not do.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// PowerShell or the agent failed (their own words follow).
    #[error(transparent)]
    Exec(#[from] WinExecError),
    /// The hook answered something it never prints: the guest is not running the recipe's
    /// hook, or it changed. What it printed is quoted (bounded).
    #[error("app-hook.ps1 -Action {action} printed {got:?}, which it never prints")]
    Unexpected { action: &'static str, got: String },
    /// The hook found no SQL Server after `detect` had found one.
    #[error("app-hook.ps1 -Action {action}: SQL Server is gone from the guest ({output})")]
    Gone { action: &'static str, output: String },
}

fn hook(action: &str, dir: Option<&str>) -> String {
    let dir = dir.map(|d| format!(" -Dir {}", ps_quote(d))).unwrap_or_default();
    format!("& {} -Action {action}{dir}", ps_quote(&format!("{WORKLOADS}\\app-hook.ps1")))
}

fn bounded(s: &str) -> String {
    s.trim().chars().take(MAX_LINE).collect()
}

/// Runs one hook action; an "absent" exit is [`AppError::Gone`].
async fn run(agent: &GuestAgent, action: &'static str, dir: Option<&str>) -> Result<String, AppError> {
    match winexec::powershell(agent, &hook(action, dir), POWERSHELL).await {
        Ok(out) => Ok(out),
        Err(WinExecError::Failed { exit: WinExit::Code(EXIT_ABSENT), output, .. }) => {
            Err(AppError::Gone { action, output: bounded(&output) })
        }
        Err(e) => Err(e.into()),
    }
}

/// Which VSS writer the guest has for the app workload.
pub async fn detect(agent: &GuestAgent) -> Result<Writer, AppError> {
    let out = run(agent, "detect", None).await?;
    parse_detect(&out)
}

fn parse_detect(out: &str) -> Result<Writer, AppError> {
    let line = out.trim();
    if line == "absent" {
        return Ok(Writer::Absent);
    }
    match line.strip_prefix("sqlserver ") {
        Some(i) if !i.is_empty() && i.len() <= 64 && i.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') => {
            Ok(Writer::SqlServer { instance: i.to_owned() })
        }
        _ => Err(AppError::Unexpected { action: "detect", got: bounded(line) }),
    }
}

/// Creates the database on the data disk at `dir` (`D:\`) and starts the writer inserting
/// rows. Returns the guest's UTC time when it started (ISO 8601, `o` format), against which
/// the writer's freeze events are placed.
pub async fn start(agent: &GuestAgent, dir: &str) -> Result<String, AppError> {
    let out = run(agent, "start", Some(dir)).await?;
    let started = out.lines().map(str::trim).rfind(|l| !l.is_empty()).unwrap_or("");
    if !is_utc_time(started) {
        return Err(AppError::Unexpected { action: "start", got: bounded(&out) });
    }
    Ok(started.to_owned())
}

/// The rows the writer has committed so far.
pub async fn rows(agent: &GuestAgent) -> Result<u64, AppError> {
    let out = run(agent, "count", None).await?;
    out.trim().parse().map_err(|_| AppError::Unexpected { action: "count", got: bounded(&out) })
}

/// One of the writer's events, as the hook prints it: `<id> <UTC time> <message>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub id: u32,
    pub at: String,
    pub message: String,
}

/// The writer's freeze and resume events (the newest few).
pub async fn events(agent: &GuestAgent) -> Result<Vec<Event>, AppError> {
    let out = run(agent, "frozen", None).await?;
    Ok(parse_events(&out))
}

/// Parses the hook's event lines; lines of another shape, and lines past the first
/// [`MAX_EVENTS`], are left out.
pub fn parse_events(out: &str) -> Vec<Event> {
    out.lines()
        .filter_map(|l| {
            let mut parts = l.trim().splitn(3, ' ');
            let id = parts.next()?.parse().ok()?;
            let at = parts.next().filter(|t| is_utc_time(t))?.to_owned();
            Some(Event { id, at, message: bounded(parts.next().unwrap_or("")) })
        })
        .take(MAX_EVENTS)
        .collect()
}

/// `2026-12-01T18:00:00.0000000Z`: the `o` format of a UTC time, which sorts as text.
fn is_utc_time(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 28
        && b[27] == b'Z'
        && b[4] == b'-'
        && b[10] == b'T'
        && b[19] == b'.'
        && s.chars().enumerate().all(|(i, c)| matches!(i, 4 | 7 | 10 | 13 | 16 | 19 | 27) || c.is_ascii_digit())
}

/// Whether the writer took part in a freeze after `since`: a 3197 on the quiesce database
/// at or after `since`, then a 3198 on it no earlier. With the detail the report shows.
pub fn froze_and_resumed(events: &[Event], since: &str) -> (bool, String) {
    let ours = |e: &&Event| e.at.as_str() >= since && e.message.contains(&format!("database {DATABASE}"));
    let mut mine: Vec<&Event> = events.iter().filter(ours).collect();
    mine.sort_by(|a, b| a.at.cmp(&b.at));
    let frozen = mine.iter().find(|e| e.id == EVENT_FROZEN);
    let resumed = frozen.and_then(|f| mine.iter().find(|e| e.id == EVENT_RESUMED && e.at >= f.at));
    match (frozen, resumed) {
        (Some(f), Some(r)) => {
            (true, format!("SQL Server's writer: {EVENT_FROZEN} at {}, {EVENT_RESUMED} at {}", f.at, r.at))
        }
        (Some(f), None) => {
            (false, format!("{EVENT_FROZEN} at {}, but no {EVENT_RESUMED} after it: the writer was not resumed", f.at))
        }
        (None, _) => (
            false,
            format!(
                "no {EVENT_FROZEN} on database {DATABASE} since the writer started at {since} ({} events read)",
                events.len()
            ),
        ),
    }
}

/// `DBCC CHECKDB` on the restored database at `dir` (attached first if the restored
/// instance does not know it): Ok(None) when consistent, Ok(Some(what it said)) when not.
pub async fn check(agent: &GuestAgent, dir: &str) -> Result<Option<String>, AppError> {
    match run(agent, "check", Some(dir)).await {
        Ok(out) if out.trim().lines().last().map(str::trim) == Some("consistent") => Ok(None),
        Ok(out) => Err(AppError::Unexpected { action: "check", got: bounded(&out) }),
        // CHECKDB's errors make sqlcmd -b, and so the hook, fail: that is the verdict.
        Err(AppError::Exec(WinExecError::Failed { output, .. })) => Ok(Some(bounded(&output))),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hooks_answers_are_read_strictly() {
        assert_eq!(parse_detect("absent\r\n").unwrap(), Writer::Absent);
        assert_eq!(
            parse_detect("sqlserver SQLEXPRESS\r\n").unwrap(),
            Writer::SqlServer { instance: "SQLEXPRESS".into() }
        );
        assert!(parse_detect("sqlserver a;b").is_err());
        assert!(parse_detect("").is_err());
        assert!(is_utc_time("2026-12-01T18:00:00.0000000Z"));
        assert!(!is_utc_time("2026-12-01 18:00:00"));
    }

    #[test]
    fn a_freeze_counts_only_with_3197_then_3198_on_our_database_after_the_start() {
        let ev = |id, at: &str, db: &str| Event {
            id,
            at: format!("2026-12-01T18:00:{at}.0000000Z"),
            message: format!("I/O ... on database {db}. No user action is required."),
        };
        let since = "2026-12-01T18:00:10.0000000Z";
        // Newest first, as Get-WinEvent gives them.
        let good = [ev(3198, "21", "quiesce"), ev(3197, "20", "quiesce")];
        assert!(froze_and_resumed(&good, since).0);
        // Before the writer started, another database, or never resumed: not ours.
        assert!(!froze_and_resumed(&[ev(3198, "06", "quiesce"), ev(3197, "05", "quiesce")], since).0);
        assert!(!froze_and_resumed(&[ev(3198, "21", "master"), ev(3197, "20", "master")], since).0);
        assert!(!froze_and_resumed(&[ev(3197, "20", "quiesce")], since).0);
        assert!(!froze_and_resumed(&[ev(3198, "19", "quiesce"), ev(3197, "20", "quiesce")], since).0);
        let lines = "3197 2026-12-01T18:00:20.0000000Z I/O is frozen on database quiesce.\r\nnoise\r\n";
        assert_eq!(parse_events(lines).len(), 1);
    }
}
