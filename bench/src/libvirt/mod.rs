//! libvirt for the benchmarks' comparisons (`virsh save` / `virsh restore`, and
//! `virsh snapshot-create-as --disk-only --quiesce`), with no systemd: the daemon is started
//! by hand and stopped again.
//!
//! - If a libvirtd already listens on `/run/libvirt/libvirt-sock`, it is used as it is and
//!   left running. Otherwise `libvirtd --daemon` is started with its own config, whose
//!   `unix_sock_dir` is a private folder, and reached as `qemu:///system?socket=...`.
//!   `--daemon` returns once the sockets listen, and libvirtd accepts clients only after its
//!   drivers are up, so the first `virsh` simply waits in the socket's backlog: no polling.
//! - It runs in a mount namespace of its own (`unshare --mount`), where its own `qemu.conf`
//!   is bind-mounted over `/etc/libvirt/qemu.conf` (guest output to files, so no virtlogd;
//!   no per-domain namespaces). Nothing outside that namespace changes.
//! - Where KVM is unusable (the harness chose TCG), `/dev/kvm` is masked in that namespace.
//!   Otherwise libvirt 9.0 never trusts its capability cache: QEMU's probe reports KVM
//!   enabled (it can open /dev/kvm as root), while libvirt finds /dev/kvm inaccessible to the
//!   `libvirt-qemu` user, calls the cache outdated, and re-probes QEMU (4 to 12 s under TCG)
//!   on every `virsh create`, `save` and `restore` (seen in its debug log).
//! - The daemon is stopped through a pidfd (SIGTERM, then SIGKILL), so the signal can only
//!   reach the process that was started. Domains are transient (`virsh create`), destroyed
//!   before the daemon stops, and their QEMU is killed through its own pidfd if it is
//!   somehow still there. Both are held as [`quiesce::sys::Process`]es, and every program run here
//!   (virsh, `unshare ... libvirtd`) is a [`quiesce::sys::Tool`] with a deadline: the library's
//!   process runner, so this crate has no `unsafe` of its own.
//! - On request ([`StartOptions::agent_debug_log`]) the daemon started here logs its guest
//!   agent traffic at debug level, with millisecond timestamps; [`freeze_window`] reads
//!   libvirt's freeze and thaw out of that log.

mod daemon;
mod domain;
mod log;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use base64::Engine;
use quiesce::sys::{deadline, Process, Tool, ToolError};
use serde_json::{json, Value};

use self::daemon::Daemon;
pub use self::daemon::{find_program, StartOptions};
pub use self::domain::{domain_xml, DataDisk, DomainSpec};
pub use self::log::{freeze_window, FreezeWindow, LogError};

const QEMU_RUN_DIR: &str = "/run/libvirt/qemu";
const QEMU_LOG_DIR: &str = "/var/log/libvirt/qemu";
const INSTALL_HINT: &str = "apt-get install -y libvirt-daemon-system libvirt-clients";

// How long each libvirt wait may take. Waits of the kinds the library has (a guest agent
// command, a QEMU after SIGTERM, a process after SIGKILL) use its `sys::deadline`; these are
// the waits only libvirt has.

/// A virsh command that does no bulk work (`domstate`, `destroy`, `domfsfreeze`,
/// `domblklist`...): libvirt answers in milliseconds, or in a second or two when it must
/// ask the guest agent.
const VIRSH_COMMAND: Duration = Duration::from_secs(30);
/// `virsh create`: libvirt builds QEMU's command line, starts QEMU and connects to its
/// monitor, a few seconds under TCG.
const VIRSH_CREATE: Duration = Duration::from_secs(60);
/// Past a virsh command's own `--timeout` (given to `blockcommit` and
/// `qemu-agent-command`), the time virsh needs to give up and say so.
const VIRSH_OWN_TIMEOUT_MARGIN: Duration = Duration::from_secs(10);
/// One `guest-ping` while the guest boots: short, so an agent that comes up is found soon
/// after it does.
const AGENT_PING_ATTEMPT: Duration = Duration::from_secs(5);
/// A domain's QEMU exiting after `virsh destroy`, which kills it and returns once libvirt
/// has seen it go: at once, unless QEMU is stuck flushing a disk.
const DOMAIN_QEMU_EXIT: Duration = Duration::from_secs(10);
/// A libvirtd started here, after SIGTERM: it closes its connections and exits in well
/// under a second; one that does not is killed.
const LIBVIRTD_STOP: Duration = Duration::from_secs(10);

/// What can go wrong with libvirt in a benchmark. A benchmark reports it as the libvirt
/// comparison "not measured" and goes on with its own numbers; whatever was started is
/// destroyed and stopped all the same.
#[derive(Debug, thiserror::Error)]
pub enum LibvirtError {
    /// A program or file libvirt needs is missing (virsh, libvirtd, unshare,
    /// /etc/libvirt/qemu.conf): install libvirt, or run with `--no-libvirt`.
    #[error("libvirt is not installed ({program} not found); install it with `{INSTALL_HINT}`")]
    NotInstalled { program: String },
    /// libvirtd could not be started here, or did not answer once started; `why` holds what
    /// it printed and the errors in its log. Starting it needs root (mount namespaces).
    #[error("could not start {daemon}: {why}")]
    Start { daemon: String, why: String },
    /// A virsh command failed; `stderr` holds libvirt's own words.
    #[error("`virsh {args}` failed ({status}): {stderr}")]
    Virsh { args: String, status: String, stderr: String },
    /// A virsh command missed its deadline and was killed.
    #[error("`virsh {args}` did not finish within {waited:?}")]
    Timeout { args: String, waited: Duration },
    /// A file of the run (configuration, domain XML, overlay, log) could not be written or
    /// read, or a domain's QEMU would not exit.
    #[error("could not {what}: {source}")]
    Io { what: String, source: std::io::Error },
    /// The domain's guest agent never answered: the guest did not boot (its serial tail is
    /// attached) or the domain stopped.
    #[error("libvirt domain {domain}: the guest agent did not answer within {waited:?}\nserial tail:\n{serial}")]
    AgentNotReady { domain: String, waited: Duration, serial: String },
    /// A command in the libvirt guest failed, or the domain was not as expected after a
    /// libvirt operation (`what` says which).
    #[error("libvirt domain {domain}: guest-exec {what}")]
    GuestExec { domain: String, what: String },
    /// libvirt's freeze window could not be read from its log for this domain's snapshot.
    #[error("libvirt domain {domain}: {source}")]
    FreezeLog { domain: String, source: LogError },
}

fn io(what: &str) -> impl FnOnce(std::io::Error) -> LibvirtError + '_ {
    move |source| LibvirtError::Io { what: what.to_owned(), source }
}

fn read_pid(path: &Path) -> Option<u32> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// A libvirt connection, with the daemons this run started (if any) and the domains it
/// created. [`Libvirt::stop`] (or Drop) destroys the domains and stops the daemons.
pub struct Libvirt {
    virsh: PathBuf,
    uri: String,
    /// How libvirt was reached, for the report.
    pub how: String,
    daemons: Vec<Daemon>,
    /// Each domain created, with its QEMU once its pid is known.
    domains: Mutex<Vec<(String, Option<Process>)>>,
    stopped: bool,
    /// The daemon's log file, if this run started the daemon.
    log: Option<PathBuf>,
    // Last: removed after the daemons that use it have stopped.
    dir: tempfile::TempDir,
}

impl Libvirt {
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// The log of the daemon this run started (none when a running one was used).
    pub fn log_path(&self) -> Option<&Path> {
        self.log.as_deref()
    }

    /// A private folder for this run's domain files (overlay, serial log, XML).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// virsh on this connection, which must finish within `timeout`.
    fn virsh_tool(&self, args: &[&str], timeout: Duration) -> Tool<'static> {
        Tool::new(&self.virsh, timeout).args(["-q", "-c", &self.uri]).args(args)
    }

    /// Runs virsh and returns its stdout; a non-zero exit is an error with its stderr.
    pub async fn virsh(&self, args: &[&str], timeout: Duration) -> Result<String, LibvirtError> {
        let shown = args.join(" ");
        match self.virsh_tool(args, timeout).run_async().await {
            Ok(out) => Ok(out.stdout_text()),
            Err(ToolError::Failed { status, stderr, .. }) => {
                Err(LibvirtError::Virsh { args: shown, status: status.to_string(), stderr })
            }
            Err(ToolError::TimedOut { waited, .. }) => Err(LibvirtError::Timeout { args: shown, waited }),
            Err(e) => Err(LibvirtError::Io { what: "run virsh".into(), source: std::io::Error::other(e) }),
        }
    }

    /// The QEMU libvirt runs for `domain`, held by pidfd, if its pid file names a live one.
    fn domain_qemu(domain: &str) -> Option<Process> {
        read_pid(&Path::new(QEMU_RUN_DIR).join(format!("{domain}.pid"))).and_then(|p| Process::open(p).ok())
    }

    /// Remembers a domain's QEMU (by pidfd) so that nothing of it outlives the run.
    fn track(&self, name: &str) {
        let fd = Self::domain_qemu(name);
        let mut doms = self.domains.lock().unwrap_or_else(|e| e.into_inner());
        doms.retain(|(n, _)| n != name);
        doms.push((name.to_owned(), fd));
    }

    /// Starts a transient domain.
    pub async fn create(&self, spec: &DomainSpec) -> Result<(), LibvirtError> {
        let xml = self.dir().join(format!("{}.xml", spec.name));
        fs::write(&xml, domain_xml(spec)).map_err(io("write the domain XML"))?;
        // Tracked before it starts too, so a failure half-way still destroys it.
        self.domains.lock().unwrap_or_else(|e| e.into_inner()).push((spec.name.clone(), None));
        self.virsh(&["create", &xml.to_string_lossy()], VIRSH_CREATE).await?;
        self.track(&spec.name);
        Ok(())
    }

    /// `virsh save`; the domain is gone afterwards.
    pub async fn save(&self, domain: &str, file: &Path, timeout: Duration) -> Result<(), LibvirtError> {
        self.virsh(&["save", domain, &file.to_string_lossy()], timeout).await.map(drop)
    }

    /// `virsh restore`; the domain runs again (it was running when saved).
    pub async fn restore(&self, domain: &str, file: &Path, timeout: Duration) -> Result<(), LibvirtError> {
        let r = self.virsh(&["restore", &file.to_string_lossy()], timeout).await;
        self.track(domain);
        r.map(drop)
    }

    pub async fn state(&self, domain: &str) -> Result<DomainState, LibvirtError> {
        Ok(DomainState::parse(&self.virsh(&["domstate", domain], VIRSH_COMMAND).await?))
    }

    /// Destroys a domain this run created and waits (on its pidfd) until its QEMU is gone.
    /// If that fails, the domain stays tracked, for [`Libvirt::stop`] to try again.
    pub async fn destroy(&self, domain: &str) -> Result<(), LibvirtError> {
        self.virsh(&["destroy", domain], VIRSH_COMMAND).await?;
        let qemu = {
            let mut doms = self.domains.lock().unwrap_or_else(|e| e.into_inner());
            let i = doms.iter().position(|(n, _)| n == domain);
            i.map(|i| doms.remove(i)).and_then(|(_, p)| p)
        };
        if let Some(qemu) = qemu {
            // The waits block on the pidfd: off the runtime's workers.
            let (qemu, gone) = tokio::task::spawn_blocking(move || {
                let gone = stop_domain_qemu(&qemu);
                (qemu, gone)
            })
            .await
            .map_err(|e| LibvirtError::Io { what: format!("stop libvirt domain {domain}"), source: e.into() })?;
            if !gone {
                self.domains.lock().unwrap_or_else(|e| e.into_inner()).push((domain.to_owned(), Some(qemu)));
                return Err(LibvirtError::Io {
                    what: format!("stop the QEMU of libvirt domain {domain}"),
                    source: std::io::Error::other("it would not exit"),
                });
            }
        }
        let _ = fs::remove_file(Path::new(QEMU_LOG_DIR).join(format!("{domain}.log")));
        Ok(())
    }

    /// `virsh snapshot-create-as DOMAIN NAME --disk-only --quiesce --atomic --no-metadata`:
    /// libvirt freezes the guest through its agent, puts a new overlay on every disk (named
    /// after the disk's image with `.NAME` for its extension) and thaws. Nothing is recorded
    /// as a snapshot: the domain simply runs on the new overlays.
    pub async fn snapshot_disk_only(&self, domain: &str, name: &str, timeout: Duration) -> Result<(), LibvirtError> {
        self.virsh(
            &["snapshot-create-as", domain, name, "--disk-only", "--quiesce", "--atomic", "--no-metadata"],
            timeout,
        )
        .await
        .map(drop)
    }

    /// `virsh domfsfreeze`, then `virsh domfsthaw`, which is tried even if the freeze failed.
    pub async fn freeze_thaw(&self, domain: &str) -> Result<(), LibvirtError> {
        let frozen = self.virsh(&["domfsfreeze", domain], VIRSH_COMMAND).await;
        let thawed = self.virsh(&["domfsthaw", domain], VIRSH_COMMAND).await;
        frozen.and(thawed).map(drop)
    }

    /// Each disk's target (vda, ...) and the image at the top of its chain.
    pub async fn disks(&self, domain: &str) -> Result<Vec<(String, PathBuf)>, LibvirtError> {
        let out = self.virsh(&["domblklist", domain, "--details"], VIRSH_COMMAND).await?;
        Ok(parse_domblklist(&out))
    }

    /// Merges the top image of `target` into the image right under it and pivots to that:
    /// `virsh blockcommit --active --shallow --pivot`. `--shallow` matters: without it
    /// libvirt commits into the deepest image of the chain (a shared base image too).
    pub async fn commit_top(&self, domain: &str, target: &str, timeout: Duration) -> Result<(), LibvirtError> {
        let secs = timeout.as_secs().max(1).to_string();
        self.virsh(
            &["blockcommit", domain, target, "--active", "--shallow", "--pivot", "--timeout", &secs],
            timeout + VIRSH_OWN_TIMEOUT_MARGIN,
        )
        .await
        .map(drop)
    }

    /// One guest-agent command through libvirt, which waits `timeout` (whole seconds, at
    /// least one) for the agent; the reply's `return` value.
    pub async fn agent(&self, domain: &str, cmd: &Value, timeout: Duration) -> Result<Value, LibvirtError> {
        let secs = timeout.as_secs().max(1);
        let out = self
            .virsh(
                &["qemu-agent-command", domain, &cmd.to_string(), "--timeout", &secs.to_string()],
                Duration::from_secs(secs) + VIRSH_OWN_TIMEOUT_MARGIN,
            )
            .await?;
        let v: Value = serde_json::from_str(out.trim()).map_err(|e| LibvirtError::GuestExec {
            domain: domain.to_owned(),
            what: format!("reply is not JSON ({e}): {}", quiesce::qemu::message::snippet(out.as_bytes())),
        })?;
        Ok(v["return"].clone())
    }

    /// Waits until the domain's guest agent answers, failing early if the domain stops.
    pub async fn wait_agent(&self, domain: &str, serial_log: &Path, timeout: Duration) -> Result<(), LibvirtError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut interval = Duration::from_millis(100);
        loop {
            match self.agent(domain, &json!({"execute": "guest-ping"}), AGENT_PING_ATTEMPT).await {
                Ok(_) => return Ok(()),
                Err(LibvirtError::Virsh { .. }) | Err(LibvirtError::Timeout { .. }) => {}
                Err(e) => return Err(e),
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            // A state that cannot be read (or is blank) is not taken for a stopped domain.
            let state = self.state(domain).await.ok();
            let stopped = matches!(&state, Some(DomainState::Other(s)) if !s.is_empty());
            if left.is_zero() || stopped {
                let state = state.map_or_else(|| "unknown".to_owned(), |s| s.to_string());
                let serial = fs::read_to_string(serial_log).unwrap_or_default();
                let serial = quiesce::qemu::serial::tail_of(&serial, 20);
                return Err(LibvirtError::AgentNotReady {
                    domain: domain.to_owned(),
                    waited: timeout,
                    serial: format!("(domain state: {state})\n{serial}"),
                });
            }
            // The agent has no readiness event through libvirt; poll it under the deadline.
            tokio::time::sleep(interval.min(left)).await;
            interval = (interval * 2).min(Duration::from_millis(500));
        }
    }

    /// Runs a shell script in the guest through guest-exec and returns its stdout.
    pub async fn guest_sh(&self, domain: &str, script: &str, timeout: Duration) -> Result<String, LibvirtError> {
        let gerr = |what: String| LibvirtError::GuestExec { domain: domain.to_owned(), what };
        let cmd = json!({"execute": "guest-exec", "arguments": {
            "path": "/bin/sh", "arg": ["-c", script], "capture-output": true}});
        let started = self.agent(domain, &cmd, deadline::AGENT_COMMAND).await?;
        let pid = started["pid"].as_i64().ok_or_else(|| gerr(format!("gave no pid: {started}")))?;
        let deadline = tokio::time::Instant::now() + timeout;
        let mut interval = Duration::from_millis(50);
        loop {
            let status = json!({"execute": "guest-exec-status", "arguments": {"pid": pid}});
            let st = self.agent(domain, &status, deadline::AGENT_COMMAND).await?;
            if st["exited"].as_bool() == Some(true) {
                let field = |n: &str| {
                    let b = base64::engine::general_purpose::STANDARD
                        .decode(st[format!("{n}-data")].as_str().unwrap_or(""))
                        .unwrap_or_default();
                    String::from_utf8_lossy(&b[..b.len().min(quiesce::qemu::exec::MAX_OUTPUT)]).into_owned()
                };
                let code = st["exitcode"].as_i64().or_else(|| st["signal"].as_i64().map(|s| 128 + s)).unwrap_or(-1);
                if code != 0 {
                    return Err(gerr(format!("exited with {code}; stderr: {}", field("err").trim())));
                }
                return Ok(field("out"));
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return Err(gerr(format!("still running after {timeout:?}")));
            }
            // guest-exec has no completion event; poll its status under the deadline.
            tokio::time::sleep(interval.min(left)).await;
            interval = (interval * 2).min(Duration::from_millis(300));
        }
    }

    /// Destroys every domain this run created, makes sure their QEMU is gone, and stops the
    /// daemons this run started. Returns what could not be cleaned up.
    pub fn stop(&mut self) -> Vec<String> {
        if self.stopped {
            return Vec::new();
        }
        self.stopped = true;
        let mut problems = Vec::new();
        let doms = std::mem::take(&mut *self.domains.lock().unwrap_or_else(|e| e.into_inner()));
        for (name, qemu) in doms {
            // Errors are expected here (a saved domain no longer exists); the pidfd check decides.
            let _ = self.virsh_tool(&["destroy", &name], VIRSH_COMMAND).output();
            let gone = match qemu.or_else(|| Self::domain_qemu(&name)) {
                Some(qemu) => stop_domain_qemu(&qemu),
                None => true,
            };
            if gone {
                // libvirt keeps each domain's QEMU output; a benchmark domain's is of no use later.
                let _ = fs::remove_file(Path::new(QEMU_LOG_DIR).join(format!("{name}.log")));
            } else {
                problems.push(format!("the QEMU of libvirt domain {name} would not exit"));
            }
        }
        while let Some(d) = self.daemons.pop() {
            if !d.process.terminate(LIBVIRTD_STOP) {
                problems.push(format!("{} (pid {}) would not exit", d.name, d.process.pid()));
            }
        }
        problems
    }
}

impl Drop for Libvirt {
    fn drop(&mut self) {
        for p in self.stop() {
            eprintln!("quiesce-bench: libvirt clean-up: {p}");
        }
    }
}

/// Waits for a destroyed domain's QEMU to exit, and stops it if it does not (SIGTERM, then
/// SIGKILL); true once it is gone. Blocks.
fn stop_domain_qemu(qemu: &Process) -> bool {
    qemu.wait_exit(DOMAIN_QEMU_EXIT) || qemu.terminate(deadline::QEMU_QUIT)
}

/// A domain's state, as `virsh domstate` prints it: one line, libvirt's word for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DomainState {
    /// `running`.
    Running,
    /// Any other state (`paused`, `shut off`, `crashed`, ...), in libvirt's words.
    Other(String),
}

impl DomainState {
    pub fn parse(out: &str) -> DomainState {
        match out.trim() {
            "running" => DomainState::Running,
            other => DomainState::Other(other.to_owned()),
        }
    }
}

impl std::fmt::Display for DomainState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DomainState::Running => f.write_str("running"),
            DomainState::Other(s) => f.write_str(s),
        }
    }
}

/// `virsh -q domblklist --details` lines: type, device, target, source. Disks with no
/// source (`-`) are left out.
fn parse_domblklist(out: &str) -> Vec<(String, PathBuf)> {
    out.lines()
        .filter_map(|l| {
            let mut rest = l.trim_start();
            let mut fields = Vec::new();
            for _ in 0..3 {
                let end = rest.find(char::is_whitespace)?;
                fields.push(&rest[..end]);
                rest = rest[end..].trim_start();
            }
            let source = rest.trim_end();
            (!source.is_empty() && source != "-").then(|| (fields[2].to_owned(), PathBuf::from(source)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domain_states() {
        assert_eq!(DomainState::parse("running\n\n"), DomainState::Running);
        assert_eq!(DomainState::parse("shut off\n"), DomainState::Other("shut off".into()));
        assert_eq!(DomainState::parse("shut off\n").to_string(), "shut off");
    }

    #[test]
    fn domblklist_details() {
        let out =
            " file   disk     vda      /tmp/a b/root.s1\n file   cdrom    sda      -\n\n file disk vdb /d.qcow2\n";
        assert_eq!(
            parse_domblklist(out),
            vec![("vda".to_owned(), PathBuf::from("/tmp/a b/root.s1")), ("vdb".to_owned(), PathBuf::from("/d.qcow2"))]
        );
    }
}
