//! Small guest workloads that make a backup's correctness visible.
//!
//! - The **counter** lives in RAM (`/run`, a tmpfs): a restored Saved State continues it.
//! - The **journal writer** appends sequence numbers to a file on a data disk: after a
//!   backup every number is there exactly once, so nothing was lost or replayed.
//!
//! Both are started detached (`setsid`) through guest-exec and write their first value
//! before guest-exec returns, so a read right after the start never races them.

use std::time::Duration;

use crate::qemu::exec::{self, ExecError};
use crate::qemu::GuestAgent;

const T: Duration = Duration::from_secs(30);

/// Mounts the disk whose serial (the host's node name) is `serial` at `/mnt/<serial>`.
/// Without udev in the guest, the disk is found through sysfs.
pub async fn mount_disk(agent: &GuestAgent, serial: &str, fstype: &str) -> Result<String, ExecError> {
    let mnt = format!("/mnt/{serial}");
    let script = format!(
        "dev=; for b in /sys/block/vd*; do [ \"$(cat $b/serial 2>/dev/null)\" = '{serial}' ] && dev=/dev/${{b##*/}}; done; \
         [ -n \"$dev\" ] || {{ echo 'no disk with serial {serial}' >&2; exit 1; }}; \
         mkdir -p {mnt} && mount -t {fstype} $dev {mnt}"
    );
    exec::sh(agent, &script, T).await?;
    Ok(mnt)
}

/// Reads a file in the guest (bounded by guest-exec's output limit).
pub async fn read_file(agent: &GuestAgent, path: &str) -> Result<String, ExecError> {
    exec::sh(agent, &format!("cat '{}'", path.replace('\'', "'\\''")), T).await
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
    // The shell's parent is qemu-ga itself; the reply to guest-exec may or may not get out.
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
    exec::sh(agent, &script, T).await.map(drop)
}

/// Starts the guest's transactional app (a VSS-writer analogue) on a mounted data folder.
pub async fn start_app(agent: &GuestAgent, dir: &str) -> Result<(), ExecError> {
    exec::sh(agent, &format!("quiesce-app start {dir}"), T).await.map(drop)
}

/// The app's own consistency check on `dir`: Ok(line) when consistent, Err(line) if not.
pub async fn check_app(agent: &GuestAgent, dir: &str) -> Result<Result<String, String>, ExecError> {
    let out = exec::run(agent, &["/bin/sh", "-c", &format!("quiesce-app check {dir} 2>&1")], Duration::from_secs(120))
        .await?;
    let line = out.stdout.lines().last().unwrap_or("").trim().to_owned();
    Ok(if out.success() && line.starts_with("consistent") { Ok(line) } else { Err(line) })
}

/// Starts the RAM counter, ticking about every 20 ms.
pub async fn start_counter(agent: &GuestAgent) -> Result<(), ExecError> {
    exec::sh(
        agent,
        "echo 0 > /run/counter && setsid sh -c 'i=0; while :; do i=$((i+1)); echo $i > /run/c.tmp; \
         mv /run/c.tmp /run/counter; usleep 20000; done' </dev/null >/dev/null 2>&1 &",
        T,
    )
    .await
    .map(drop)
}

pub async fn read_counter(agent: &GuestAgent) -> Result<u64, ExecError> {
    let out = exec::sh(agent, "cat /run/counter", T).await?;
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
    Ok(exec::sh(agent, "cat /proc/sys/kernel/random/boot_id", T).await?.trim().to_owned())
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
    exec::sh(agent, &script, T).await.map(drop)
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
    exec::sh(agent, &script, T).await.map(drop)
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
    let out = exec::sh(agent, &script, T).await?;
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

/// The transfer count of the app's check line ("consistent transfers=N total=T").
pub fn transfers_in(check_line: &str) -> Option<u64> {
    check_line.split_whitespace().find_map(|w| w.strip_prefix("transfers="))?.parse().ok()
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
    let out = exec::sh(agent, &script, T).await?;
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
    fn transfer_counts_of_check_lines() {
        assert_eq!(transfers_in("consistent transfers=1712 total=10000"), Some(1712));
        assert_eq!(transfers_in("inconsistent: transfers.seq is not 1..N"), None);
        assert_eq!(transfers_in("consistent transfers=x"), None);
    }

    #[test]
    fn journals_read_from_an_image() {
        assert_eq!(journal_of(b"1\n2\n3\n"), JournalCheck { lines: 3, first_break: None });
        assert_eq!(journal_of(b"1\n2\n4\n").first_break, Some((3, "4".into())));
        assert_eq!(journal_of(b"1\n2\n\0\0\0\n").first_break, Some((3, "\0\0\0".into())));
        assert_eq!(journal_of(b"1\n2").first_break, Some((2, "(no end of line)".into())));
        assert!(!journal_of(b"").intact());
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
