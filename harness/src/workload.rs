//! Small guest workloads that make a backup's correctness visible.
//!
//! - The **counter** lives in RAM (`/run`, a tmpfs): a restored Saved State continues it.
//! - The **journal writer** appends sequence numbers to a file on a data disk: after a
//!   backup every number is there exactly once, so nothing was lost or replayed.
//!
//! Both are started detached (`setsid`) through guest-exec and write their first value
//! before guest-exec returns, so a read right after the start never races them.

use std::fmt;
use std::time::Duration;

use crate::qemu::exec::{self, ExecError};
use crate::qemu::GuestAgent;
use crate::sys::{deadline, shell_quote};

/// Mounts the disk whose serial (the host's node name) is `serial` at `/mnt/<serial>`.
/// Without udev in the guest, the disk is found through sysfs.
pub async fn mount_disk(agent: &GuestAgent, serial: &str, fstype: &str) -> Result<String, ExecError> {
    exec::sh(agent, &mount_script(serial, fstype), deadline::guest_exec()).await?;
    Ok(format!("/mnt/{serial}"))
}

/// The guest shell script [`mount_disk`] runs, for guests reached another way (the
/// benchmarks' libvirt guests).
pub fn mount_script(serial: &str, fstype: &str) -> String {
    let (mnt, serial_word) = (shell_quote(&format!("/mnt/{serial}")), shell_quote(serial));
    let fstype = shell_quote(fstype);
    format!(
        "dev=; for b in /sys/block/vd*; do [ \"$(cat $b/serial 2>/dev/null)\" = {serial_word} ] && dev=/dev/${{b##*/}}; done; \
         [ -n \"$dev\" ] || {{ echo no disk with serial {serial_word} >&2; exit 1; }}; \
         mkdir -p {mnt} && mount -t {fstype} $dev {mnt}"
    )
}

/// Reads a file in the guest (bounded by guest-exec's output limit).
pub async fn read_file(agent: &GuestAgent, path: &str) -> Result<String, ExecError> {
    exec::sh(agent, &format!("cat {}", shell_quote(path)), deadline::guest_exec()).await
}

/// Stops qemu-ga in the guest with SIGSTOP: installed but not answering, like a hung
/// integration service. Confirmed from the host: returns once a ping goes unanswered.
pub async fn stop_agent(agent: &GuestAgent, deadline: Duration) -> Result<(), crate::qemu::AgentError> {
    let stop = qapi::qga::guest_exec {
        path: "/bin/sh".into(),
        arg: Some(vec!["-c".into(), "kill -STOP $PPID".into()]),
        capture_output: None,
        env: None,
        input_data: None,
    };
    // The shell's parent is qemu-ga itself; the reply to guest-exec may or may not get out
    // before it stops, so it is given a short wait and not relied on: the silence is.
    let _ = agent.execute_within(stop, Duration::from_secs(2)).await;
    agent.wait_silent(deadline).await
}

/// Where qemu-ga (started with `-t /run/qemu-ga`) marks the guest frozen. It makes the file
/// after the freeze hook and before FIFREEZE, and removes it on thaw.
const AGENT_FROZEN_MARK: &str = "/run/qemu-ga/qga.state.isfrozen";

/// Starts a watcher in the guest that stops qemu-ga (SIGSTOP) once the next freeze has been
/// answered, and lets it go on after `silence`. Answered means: the frozen mark exists and
/// the agent's main thread is back in poll(2) (syscall 7), which it enters only after the
/// FIFREEZE calls and the reply. The watcher gives up after a minute without a freeze.
pub async fn stop_agent_after_next_freeze(agent: &GuestAgent, silence: Duration) -> Result<(), ExecError> {
    let script = format!(
        "setsid sh -c 'p=$(cat /run/qemu-ga.pid); n=0; \
         until [ -e {AGENT_FROZEN_MARK} ] && read s rest < /proc/$p/syscall && [ \"$s\" = 7 ]; do \
           n=$((n+1)); [ $n -gt 60000 ] && exit 1; usleep 1000; done; \
         kill -STOP $p; sleep {secs}; kill -CONT $p' </dev/null >/dev/null 2>&1 &",
        secs = silence.as_secs().max(1)
    );
    exec::sh(agent, &script, deadline::guest_exec()).await.map(drop)
}

/// Starts the guest's transactional app (a VSS-writer analogue) on a mounted data folder.
pub async fn start_app(agent: &GuestAgent, dir: &str) -> Result<(), ExecError> {
    exec::sh(agent, &format!("quiesce-app start {dir}"), deadline::guest_exec()).await.map(drop)
}

/// The app's own consistency check on `dir` (it never writes there).
pub async fn check_app(agent: &GuestAgent, dir: &str) -> Result<AppCheck, ExecError> {
    let out =
        exec::run(agent, &["/bin/sh", "-c", &format!("quiesce-app check {dir} 2>&1")], deadline::APP_CHECK).await?;
    Ok(AppCheck::parse(out.exit_code, &out.stdout))
}

/// The app's writer on `dir`, as `quiesce-app status` tells it.
pub async fn app_status(agent: &GuestAgent, dir: &str) -> Result<AppStatus, ExecError> {
    let out = exec::sh(agent, &format!("quiesce-app status {dir}"), deadline::guest_exec()).await?;
    Ok(AppStatus::parse(&out))
}

/// What `quiesce-app check` found. Its exit code and last line are the app's documented
/// protocol (its usage text, in the guest image): read once, by [`AppCheck::parse`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AppCheck {
    /// `consistent transfers=N total=T` (exit 0): every committed transfer is there and the
    /// balances add up, so the store is one the app itself could have left.
    Consistent { transfers: u64, total: i64 },
    /// `inconsistent: REASON` (exit 1): the store is torn, as an unquiesced copy can be.
    Inconsistent { reason: String },
    /// Any other answer: the check itself could not run (no database, sqlite3 failed; the
    /// app exits 2) or said something outside its protocol. `said` is its last line.
    NotChecked { exit_code: i64, said: String },
}

impl AppCheck {
    /// The check's answer from its exit code and output (stdout and stderr together).
    pub fn parse(exit_code: i64, output: &str) -> AppCheck {
        let said = output.lines().last().unwrap_or("").trim();
        let consistent = || {
            let rest = said.strip_prefix("consistent ")?;
            let (transfers, total) = rest.split_once(' ')?;
            Some(AppCheck::Consistent {
                transfers: transfers.strip_prefix("transfers=")?.parse().ok()?,
                total: total.strip_prefix("total=")?.parse().ok()?,
            })
        };
        let answer = match exit_code {
            0 => consistent(),
            1 => said.strip_prefix("inconsistent: ").map(|r| AppCheck::Inconsistent { reason: r.to_owned() }),
            _ => None,
        };
        answer.unwrap_or_else(|| AppCheck::NotChecked { exit_code, said: said.to_owned() })
    }

    pub fn is_consistent(&self) -> bool {
        matches!(self, AppCheck::Consistent { .. })
    }
}

/// The app's own words, as reports show them.
impl fmt::Display for AppCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AppCheck::Consistent { transfers, total } => write!(f, "consistent transfers={transfers} total={total}"),
            AppCheck::Inconsistent { reason } => write!(f, "inconsistent: {reason}"),
            AppCheck::NotChecked { said, .. } => f.write_str(said),
        }
    }
}

/// The app's writer, from `quiesce-app status` (its documented protocol), read by
/// [`AppStatus::parse`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AppStatus {
    /// `running pid=P transfers=N`: the writer runs and has committed N transfers.
    Running { pid: u32, transfers: u64 },
    /// `stopped transfers=N`: no writer runs; N transfers are in the store.
    Stopped { transfers: u64 },
    /// A line outside the protocol, as it was: no writer is known to run.
    Unknown { said: String },
}

impl AppStatus {
    pub fn parse(output: &str) -> AppStatus {
        let said = output.trim();
        let count = |w: &str| w.strip_prefix("transfers=")?.parse().ok();
        let words: Vec<&str> = said.split_whitespace().collect();
        let status = match words[..] {
            ["running", pid, transfers] => pid
                .strip_prefix("pid=")
                .and_then(|p| p.parse().ok())
                .zip(count(transfers))
                .map(|(pid, transfers)| AppStatus::Running { pid, transfers }),
            ["stopped", transfers] => count(transfers).map(|transfers| AppStatus::Stopped { transfers }),
            _ => None,
        };
        status.unwrap_or_else(|| AppStatus::Unknown { said: said.to_owned() })
    }

    /// The transfers committed, if the app said.
    pub fn transfers(&self) -> Option<u64> {
        match self {
            AppStatus::Running { transfers, .. } | AppStatus::Stopped { transfers } => Some(*transfers),
            AppStatus::Unknown { .. } => None,
        }
    }
}

/// Starts the RAM counter, ticking about every 20 ms.
pub async fn start_counter(agent: &GuestAgent) -> Result<(), ExecError> {
    exec::sh(
        agent,
        "echo 0 > /run/counter && setsid sh -c 'i=0; while :; do i=$((i+1)); echo $i > /run/c.tmp; \
         mv /run/c.tmp /run/counter; usleep 20000; done' </dev/null >/dev/null 2>&1 &",
        deadline::guest_exec(),
    )
    .await
    .map(drop)
}

pub async fn read_counter(agent: &GuestAgent) -> Result<u64, ExecError> {
    let out = exec::sh(agent, "cat /run/counter", deadline::guest_exec()).await?;
    Ok(out.trim().parse().unwrap_or(0))
}

/// Waits (in the guest, under `timeout`) until the counter is above `value`; returns it.
/// A counter that never moves means the guest is not running.
pub async fn wait_counter_above(agent: &GuestAgent, value: u64, timeout: Duration) -> Result<u64, ExecError> {
    let script = format!("while [ \"$(cat /run/counter)\" -le {value} ]; do usleep 10000; done; cat /run/counter");
    let out = exec::sh(agent, &script, timeout).await?;
    Ok(out.trim().parse().unwrap_or(0))
}

/// The guest's boot id: the same value proves a restore continued the same boot.
pub async fn boot_id(agent: &GuestAgent) -> Result<String, ExecError> {
    Ok(exec::sh(agent, "cat /proc/sys/kernel/random/boot_id", deadline::guest_exec()).await?.trim().to_owned())
}

/// Starts appending 1, 2, 3, ... (one per line) to `path`, syncing every 20 lines. Each
/// line is also logged to [`JOURNAL_ACKS`] (in guest RAM) as `N ISSUED ACKED`: the guest's
/// uptime before the write was issued and after it returned, so that a line can be placed
/// against a freeze's instants in the guest's freeze log.
pub async fn start_journal(agent: &GuestAgent, path: &str) -> Result<(), ExecError> {
    let script = format!(
        "echo 1 > {path} && sync && read u _ < /proc/uptime && echo \"1 $u $u\" > {JOURNAL_ACKS} && \
         setsid sh -c 'i=1; while :; do i=$((i+1)); read a _ < /proc/uptime; echo $i >> {path}; \
         read b _ < /proc/uptime; echo \"$i $a $b\" >> {JOURNAL_ACKS}; \
         [ $((i % 20)) -eq 0 ] && sync; usleep 5000; done' </dev/null >/dev/null 2>&1 & \
         echo $! > /run/journal.pid"
    );
    exec::sh(agent, &script, deadline::guest_exec()).await.map(drop)
}

/// Stops the journal writer, leaving its file complete up to its last line.
pub async fn stop_journal(agent: &GuestAgent) -> Result<(), ExecError> {
    stop_background(agent, "/run/journal.pid").await
}

/// Stops a writer started with `setsid` (so its pid names its process group), waits in the
/// guest until no process of the group is left to hold its files open, and syncs. The
/// wait is bounded by the command's deadline.
pub async fn stop_background(agent: &GuestAgent, pidfile: &str) -> Result<(), ExecError> {
    let script =
        format!("p=$(cat {pidfile}) && kill -TERM -$p && while kill -0 -$p 2>/dev/null; do usleep 10000; done; sync");
    exec::sh(agent, &script, deadline::guest_exec()).await.map(drop)
}

/// Checks a journal: every number from 1 to its last, once each, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalCheck {
    pub lines: u64,
    /// The first line that breaks the sequence, and what it held.
    pub first_break: Option<(u64, String)>,
}

impl JournalCheck {
    pub fn intact(&self) -> bool {
        self.first_break.is_none() && self.lines > 0
    }

    /// How many of the first `before` lines (those written before a job) were not read back
    /// in place: missing at the end, or at or after the first break.
    pub fn lost_of(&self, before: u64) -> u64 {
        let good = self.first_break.as_ref().map_or(self.lines, |(at, _)| at.saturating_sub(1));
        before.saturating_sub(good.min(self.lines))
    }
}

/// Reads the journal back from the disk, not from the guest's page cache: after a sync the
/// caches are dropped, so a write that is not on the VM's current disks cannot be seen.
pub async fn check_journal(agent: &GuestAgent, path: &str) -> Result<JournalCheck, ExecError> {
    // The check runs in the guest: only its verdict crosses the agent, not the file.
    let script = format!(
        "sync && echo 3 > /proc/sys/vm/drop_caches && awk 'BEGIN{{b=\"\"}} {{ if (b == \"\" && $0 != NR) b = NR \" \" $0 }} END {{ print NR; print b }}' {path}"
    );
    let out = exec::sh(agent, &script, deadline::guest_exec()).await?;
    Ok(parse_journal_verdict(&out))
}

fn parse_journal_verdict(out: &str) -> JournalCheck {
    let mut lines = out.lines();
    let n = lines.next().and_then(|l| l.trim().parse().ok()).unwrap_or(0);
    let first_break = lines.next().filter(|l| !l.trim().is_empty()).map(|l| {
        let (at, held) = l.split_once(' ').unwrap_or((l, ""));
        (at.parse().unwrap_or(0), held.to_owned())
    });
    JournalCheck { lines: n, first_break }
}

/// Where the journal writer logs when each line was issued and acknowledged (a tmpfs).
pub const JOURNAL_ACKS: &str = "/run/journal.acks";

/// The journal's lines placed against a freeze, from [`JOURNAL_ACKS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JournalAtFreeze {
    /// The last line whose write returned before the freeze began: it and every line
    /// before it must be in the frozen image.
    pub acked_before_freeze: u64,
    /// The first line whose write returned after the thaw: it and every line after it
    /// must not be (a write held by the freeze returns only after the thaw).
    pub first_acked_after_thaw: Option<u64>,
    /// Lines issued between the freeze's start and the thaw's end, which may or may not
    /// have made it in before the filesystems froze.
    pub in_window: u64,
}

/// Places the journal's lines against a freeze that began at `freeze_cs` and ended at
/// `thaw_cs` (guest uptime, centiseconds). Only the verdict crosses the agent.
pub async fn journal_at_freeze(agent: &GuestAgent, freeze_cs: u64, thaw_cs: u64) -> Result<JournalAtFreeze, ExecError> {
    let at = |cs: u64| format!("{}.{:02}", cs / 100, cs % 100);
    let script = format!(
        "awk -v f={f} -v t={t} '$3 < f {{ b = $1 }} $3 > t && a == \"\" {{ a = $1 }} $2 >= f && $2 <= t {{ w++ }} \
         END {{ print b + 0; print a; print w + 0 }}' {JOURNAL_ACKS}",
        f = at(freeze_cs),
        t = at(thaw_cs)
    );
    let out = exec::sh(agent, &script, deadline::guest_exec()).await?;
    let mut lines = out.lines().map(str::trim);
    let mut num = || lines.next().and_then(|l| l.parse::<u64>().ok());
    Ok(JournalAtFreeze {
        acked_before_freeze: num().unwrap_or(0),
        first_acked_after_thaw: num(),
        in_window: num().unwrap_or(0),
    })
}

/// A journal as read from a disk image: lines 1..=`lines` in order, or where it breaks.
pub fn journal_of(content: &[u8]) -> JournalCheck {
    let text = String::from_utf8_lossy(content);
    let mut n = 0u64;
    let mut first_break = None;
    for (i, line) in text.split_terminator('\n').enumerate() {
        n = i as u64 + 1;
        if first_break.is_none() && line.parse::<u64>().ok() != Some(n) {
            first_break = Some((n, line.chars().take(40).collect()));
        }
    }
    if first_break.is_none() && !content.is_empty() && !content.ends_with(b"\n") {
        first_break = Some((n, "(no end of line)".into()));
    }
    JournalCheck { lines: n, first_break }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journals_read_from_an_image() {
        assert_eq!(journal_of(b"1\n2\n3\n"), JournalCheck { lines: 3, first_break: None });
        assert_eq!(journal_of(b"1\n2\n4\n").first_break, Some((3, "4".into())));
        assert_eq!(journal_of(b"1\n2\n\0\0\0\n").first_break, Some((3, "\0\0\0".into())));
        assert_eq!(journal_of(b"1\n2").first_break, Some((2, "(no end of line)".into())));
        assert!(!journal_of(b"").intact());
    }

    #[test]
    fn the_app_check_is_read_from_its_exit_code_and_last_line() {
        let check = AppCheck::parse(0, "some noise\nconsistent transfers=1207 total=10000\n");
        assert_eq!(check, AppCheck::Consistent { transfers: 1207, total: 10000 });
        assert!(check.is_consistent());
        assert_eq!(check.to_string(), "consistent transfers=1207 total=10000");
        let torn = AppCheck::parse(1, "inconsistent: total 9913, expected 10000\n");
        assert_eq!(torn, AppCheck::Inconsistent { reason: "total 9913, expected 10000".into() });
        assert_eq!(torn.to_string(), "inconsistent: total 9913, expected 10000");
        // The check could not run, or its words and exit code disagree: never consistent.
        for (code, out) in [
            (2, "quiesce-app: no database /mnt/data/app.db\n"),
            (1, "consistent transfers=3 total=10000"),
            (0, "inconsistent: x"),
            (0, "consistent transfers=many total=10000"),
            (0, "consistently wrong"),
            (0, ""),
        ] {
            let c = AppCheck::parse(code, out);
            assert!(matches!(c, AppCheck::NotChecked { .. }), "{code} {out:?}: {c:?}");
            assert_eq!(c.to_string(), out.trim());
        }
    }

    #[test]
    fn the_app_status_is_read_from_its_line() {
        assert_eq!(AppStatus::parse("running pid=412 transfers=88\n"), AppStatus::Running { pid: 412, transfers: 88 });
        assert_eq!(AppStatus::parse("stopped transfers=7"), AppStatus::Stopped { transfers: 7 });
        assert_eq!(AppStatus::parse("stopped transfers=7").transfers(), Some(7));
        for odd in ["", "running", "running pid=x transfers=1", "runningpid=1 transfers=1", "stopped 7"] {
            assert_eq!(AppStatus::parse(odd), AppStatus::Unknown { said: odd.into() }, "{odd:?}");
        }
    }

    #[test]
    fn the_mount_script_finds_the_disk_by_serial_and_quotes_it() {
        let s = mount_script("data2", "ext4");
        assert!(s.contains("= data2 ]") && s.ends_with("mount -t ext4 $dev /mnt/data2"), "{s}");
        let odd = mount_script("it's", "ext4");
        assert!(odd.contains(r"= 'it'\''s' ]") && odd.ends_with(r"$dev '/mnt/it'\''s'"), "{odd}");
    }

    #[test]
    fn journal_verdicts() {
        assert_eq!(parse_journal_verdict("120\n\n"), JournalCheck { lines: 120, first_break: None });
        assert!(parse_journal_verdict("120\n").intact());
        assert_eq!(parse_journal_verdict("9\n5 7\n").first_break, Some((5, "7".into())));
        assert!(!parse_journal_verdict("").intact());
    }

    #[test]
    fn lines_lost_count_what_was_there_before() {
        let whole = parse_journal_verdict("120\n\n");
        assert_eq!(whole.lost_of(100), 0);
        assert_eq!(whole.lost_of(130), 10, "the disk ends before the last line written");
        let broken = parse_journal_verdict("150\n91 7\n");
        assert_eq!(broken.lost_of(100), 10, "lines 91..=100 are not in place");
        assert_eq!(broken.lost_of(50), 0, "a break after the job's start loses nothing from before it");
        assert_eq!(parse_journal_verdict("").lost_of(5), 5);
    }
}
