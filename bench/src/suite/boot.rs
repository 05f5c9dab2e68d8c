//! Where a boot of quiesce's test guest spends its time until the agent answers, read from
//! the guest's own clocks: its uptime, the kernel's log (its time stamps count from the
//! kernel's first tick) and the start time the kernel keeps for qemu-ga. With the host's
//! time from QEMU's launch to the agent's answer, that splits a boot into five:
//!
//! 1. before the kernel's clock starts: QEMU starting, the firmware, loading the kernel
//!    and initrd (the host's boot time less the guest's uptime at the answer);
//! 2. the kernel, to `Run /init as init process` (it then runs the initrd's /init);
//! 3. the initrd (modules, waiting for the root device) to the root mounted (`EXT4-fs (vda):
//!    mounted filesystem`);
//! 4. the root's init to starting qemu-ga;
//! 5. qemu-ga's start to its answer to quiesce's first sync.
//!
//! (PID 1's own start time would not do for 2: PID 1 is forked as a kernel thread early in
//! the kernel's boot and only later runs /init.) The guest's uptime is read by `guest-exec`
//! just after the answer; half the host's time for that exec is taken off, so the split is
//! good to the agent's start-up of one command (tens of milliseconds).

use std::time::{Duration, Instant};

use quiesce::qemu::accel::AccelChoice;
use quiesce::qemu::exec;
use quiesce::sys::deadline;
use quiesce::testguest::{self, GuestOptions};

/// The kernel's clock ticks per second for user space (`USER_HZ`): 100 on every Linux
/// architecture, whatever the kernel's own HZ (`/proc/<pid>/stat`'s start times count in it).
const USER_HZ: f64 = 100.0;

/// One boot, split (seconds).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BootSplit {
    pub total: f64,
    pub before_kernel: f64,
    pub kernel: f64,
    pub initrd: f64,
    pub to_agent_start: f64,
    pub agent_answer: f64,
}

/// What the guest said, parsed (seconds after the kernel's first tick): its uptime, when
/// the kernel ran /init, when the root was mounted, and when qemu-ga started.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GuestClocks {
    pub uptime: f64,
    pub run_init: f64,
    pub root_mounted: f64,
    pub agent_start: f64,
}

/// Why the guest's clocks could not be read from its answer (the guest is untrusted: a
/// line that does not parse is refused, not guessed).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("reading the guest's clocks: {0}")]
pub struct ClockError(String);

/// The shell run in the guest (busybox): its uptime, the two lines of the kernel's log, and
/// qemu-ga's stat.
pub const SCRIPT: &str = "read -r up _ < /proc/uptime; echo \"uptime $up\"; \
    echo \"init $(dmesg | grep -m1 'Run .* as init process')\"; \
    echo \"root $(dmesg | grep -m1 'EXT4-fs (vda): mounted filesystem')\"; \
    for d in /proc/[0-9]*; do read -r c < \"$d/comm\" 2>/dev/null || continue; \
    [ \"$c\" = qemu-ga ] && read -r s < \"$d/stat\" && echo \"agent $s\"; done; true";

/// The time stamp of a kernel log line, `[    2.945959] Run /init as init process`.
fn log_time(line: &str) -> Result<f64, ClockError> {
    line.trim_start()
        .strip_prefix('[')
        .and_then(|r| r.split_once(']'))
        .and_then(|(t, _)| t.trim().parse::<f64>().ok())
        .filter(|t| t.is_finite() && *t >= 0.0)
        .ok_or_else(|| ClockError(format!("no kernel time stamp in {line:?} (is the kernel's printk time off?)")))
}

/// The start time (field 22) of a `/proc/<pid>/stat` line, in seconds after boot. The
/// command name (field 2) is in parentheses and may hold blanks, so fields are counted
/// after its closing one.
fn start_time(stat: &str) -> Result<f64, ClockError> {
    let rest =
        stat.rsplit_once(')').map(|(_, r)| r).ok_or_else(|| ClockError(format!("no command name in {stat:?}")))?;
    // Field 3 (the state) is the first after the name, so field 22 is the 20th.
    let ticks: u64 = rest
        .split_whitespace()
        .nth(19)
        .and_then(|f| f.parse().ok())
        .ok_or_else(|| ClockError(format!("no start time in {stat:?}")))?;
    Ok(ticks as f64 / USER_HZ)
}

/// Parses [`SCRIPT`]'s output.
pub fn parse(out: &str) -> Result<GuestClocks, ClockError> {
    let line = |key: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix(' ')))
            .ok_or_else(|| ClockError(format!("the guest printed no {key:?} line")))
    };
    let uptime: f64 = line("uptime")?
        .trim()
        .parse()
        .ok()
        .filter(|u: &f64| u.is_finite() && *u >= 0.0)
        .ok_or_else(|| ClockError("the uptime is not a number of seconds".into()))?;
    let clocks = GuestClocks {
        uptime,
        run_init: log_time(line("init")?)?,
        root_mounted: log_time(line("root")?)?,
        agent_start: start_time(line("agent")?)?,
    };
    // Ticks of 10 ms: the agent's start may round below the mount's time stamp.
    if clocks.run_init > clocks.root_mounted
        || clocks.root_mounted > clocks.agent_start + 0.01
        || clocks.agent_start > clocks.uptime
    {
        return Err(ClockError(format!("the guest's times are out of order: {clocks:?}")));
    }
    Ok(clocks)
}

/// Splits a boot of `total` seconds (host), whose guest read `clocks` `read_after` seconds
/// after the answer.
pub fn split(total: f64, clocks: GuestClocks, read_after: f64) -> BootSplit {
    let uptime_at_answer = (clocks.uptime - read_after).max(clocks.agent_start);
    BootSplit {
        total,
        before_kernel: (total - uptime_at_answer).max(0.0),
        kernel: clocks.run_init,
        initrd: clocks.root_mounted - clocks.run_init,
        to_agent_start: (clocks.agent_start - clocks.root_mounted).max(0.0),
        agent_answer: uptime_at_answer - clocks.agent_start,
    }
}

/// Boots the test guest `rounds` times, one after another, and splits each boot.
pub async fn measure(
    rounds: usize,
    accel: Option<AccelChoice>,
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<BootSplit>, Box<dyn std::error::Error>> {
    let mut splits = Vec::new();
    for i in 0..rounds {
        progress(&format!("boot {} of {rounds}: splitting the boot", i + 1));
        let mut opts = GuestOptions::named(&format!("boot-split-{}", i + 1));
        opts.accel = accel;
        let guest = testguest::boot(opts, progress).await?;
        let answered = Instant::now();
        let out = exec::sh(guest.machine.agent()?, SCRIPT, deadline::guest_exec()).await?;
        let read_after = answered.elapsed().min(Duration::from_secs(5)).as_secs_f64() / 2.0;
        splits.push(split(guest.boot_time.as_secs_f64(), parse(&out)?, read_after));
    }
    Ok(splits)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stat(comm: &str, start: u64) -> String {
        let mut f: Vec<String> = vec!["S".into()];
        f.extend((4..22).map(|i| i.to_string()));
        f.push(start.to_string());
        f.extend(["9".into(), "10".into()]);
        format!("1 ({comm}) {}", f.join(" "))
    }

    #[test]
    fn a_stat_line_gives_its_start_time_even_with_blanks_in_the_name() {
        assert_eq!(start_time(&stat("init", 123)), Ok(1.23));
        assert_eq!(start_time(&stat("a) b", 250)), Ok(2.5));
        assert!(start_time("1 (init) S 2 3").is_err());
        assert!(start_time("no name").is_err());
    }

    #[test]
    fn the_guest_answer_is_parsed_and_bounded() {
        let answer = |up: &str| {
            format!(
                "uptime {up}\ninit [    1.100000] Run /init as init process\n\
                 root [    1.600000] EXT4-fs (vda): mounted filesystem 5143e515 r/w\nagent {}\n",
                stat("qemu-ga", 350)
            )
        };
        let c = parse(&answer("4.20")).unwrap();
        assert_eq!(c, GuestClocks { uptime: 4.2, run_init: 1.1, root_mounted: 1.6, agent_start: 3.5 });
        let s = split(5.0, c, 0.2);
        let near = |a: f64, b: f64| (a - b).abs() < 1e-9;
        assert!(near(s.before_kernel, 1.0) && near(s.kernel, 1.1) && near(s.initrd, 0.5), "{s:?}");
        assert!(near(s.to_agent_start, 1.9) && near(s.agent_answer, 0.5), "{s:?}");
        // Lines missing, numbers that are not, a log without time stamps, and times out of
        // order are refused.
        assert!(parse("uptime 4.2\n").is_err());
        assert!(parse(&answer("NaN")).is_err());
        assert!(parse(&answer("4.20").replace("[    1.100000] ", "")).is_err());
        assert!(parse(&answer("2.0")).is_err());
    }
}
