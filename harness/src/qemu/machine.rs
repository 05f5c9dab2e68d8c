//! The machine guard. A [`Machine`] owns one QEMU process, its private run folder and its
//! connections. Dropping it always stops QEMU (quit, then SIGTERM, then SIGKILL), reaps it
//! and removes the folder; if the machine failed or the thread is panicking, the evidence
//! is copied out first.
//!
//! A machine can also be *attached* ([`super::attach`]): a QEMU someone else started,
//! reached through its own QMP (and agent) sockets. Such a machine owns no process: it
//! never quits, signals or kills that QEMU, and dropping it only closes the connections.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream as StdUnixStream};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::Mutex;
use std::time::Duration;

use serde_json::json;
use tokio::net::UnixStream;

use super::config::{DiskConfig, MachineConfig};
use super::launch::{self, Fds};
use super::process::QemuProcess;
use super::qga::{AgentError, GuestAgent};
use super::qmp::{Qmp, QmpError};
use super::serial::{tail_of, SerialLog};
use super::transcript::Transcript;
use crate::sys::deadline;

#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    /// QEMU could not be started: the binary is missing or not executable (see
    /// `QUIESCE_QEMU`), or the system refused a new process.
    #[error("could not start {program} for machine {name}: {source}")]
    Spawn { name: String, program: String, source: std::io::Error },
    /// The machine's private run folder or its sockets could not be made (a full or
    /// read-only temporary folder).
    #[error("machine {name}: could not set up its run folder or sockets: {source}")]
    Setup { name: String, source: std::io::Error },
    /// QEMU exited (or never greeted): most often it refused an argument; what it said,
    /// its command line and the guest's serial output show why, and the evidence folder
    /// keeps them.
    #[error("QEMU for machine {name} exited ({status}).\ncommand: {cmdline}\nQEMU said:\n{output}\nserial tail:\n{serial}\nevidence: {evidence}")]
    Exited { name: String, status: String, cmdline: String, output: String, serial: String, evidence: String },
    /// A QMP command failed or went unanswered.
    #[error("machine {name}: {source}")]
    Qmp { name: String, source: QmpError },
    /// A guest agent command failed or went unanswered.
    #[error("machine {name}: {source}")]
    Agent { name: String, source: AgentError },
    /// The guest agent never answered while QEMU kept running: the guest did not boot, or
    /// its agent did not start; the serial tail shows how far the guest got.
    #[error("machine {name}: the guest agent did not answer within {waited:?}.\nserial tail:\n{serial}")]
    AgentNotReady { name: String, waited: Duration, serial: String },
    /// The machine was configured without an agent channel, and something needs the agent.
    #[error("machine {name} has no guest agent channel configured")]
    NoAgent { name: String },
    /// The guest was asked to power off and QEMU did not exit in time; it is killed when
    /// the machine is dropped.
    #[error("machine {name}: QEMU did not exit within {waited:?} after the guest was asked to power off")]
    ShutdownTimeout { name: String, waited: Duration },
    /// The machine is a QEMU quiesce did not start (attached by its sockets): quiesce does
    /// not power it off, stop or kill it; `what` was refused.
    #[error("machine {name} was not started by quiesce: it does not {what} it")]
    NotOurs { name: String, what: &'static str },
}

/// Whose QEMU process a machine is.
enum Owner {
    /// Started by quiesce: stopped and reaped when the machine is dropped.
    Started(QemuProcess),
    /// Started by someone else: watched by pidfd when its pid is known (the QMP socket's
    /// peer), never signalled.
    Attached(Option<crate::sys::Process>),
}

pub struct Machine {
    // Field order is drop order: connections go before the process and the run folder.
    qmp: Qmp,
    agent: Option<GuestAgent>,
    serial: SerialLog,
    /// A blocking handle on the QMP socket so Drop can send `quit` without a runtime.
    qmp_sync: StdUnixStream,
    process: Owner,
    cfg: MachineConfig,
    /// For an attached machine, the name QEMU gives each disk's node where it is not the
    /// disk's own name (QEMU made it up, `#block123`, or it is not a valid node name).
    qemu_nodes: Vec<(String, String)>,
    /// For an attached machine, the serial each disk shows the guest (None: it has none).
    guest_serials: Option<Vec<Option<String>>>,
    cmdline: String,
    failure: Mutex<Option<String>>,
    /// TESTS ONLY: a scripted peer stands in for this machine's agent (`stand_in`).
    #[cfg(test)]
    stand_in: bool,
    run_dir: tempfile::TempDir,
}

struct Sockets {
    listeners: Vec<UnixListener>,
    qmp: StdUnixStream,
    agent: Option<StdUnixStream>,
    fds: Fds,
}

fn bind_and_connect(dir: &Path, name: &str) -> std::io::Result<(UnixListener, StdUnixStream)> {
    let path = dir.join(name);
    let listener = UnixListener::bind(&path)?;
    // Queued in the backlog until QEMU accepts it: no wait for QEMU to create anything.
    let stream = StdUnixStream::connect(&path)?;
    Ok((listener, stream))
}

fn open_sockets(dir: &Path, agent: bool) -> std::io::Result<Sockets> {
    let (ql, qmp) = bind_and_connect(dir, "qmp.sock")?;
    let (al, agent) = if agent {
        let (l, s) = bind_and_connect(dir, "qga.sock")?;
        (Some(l), Some(s))
    } else {
        (None, None)
    };
    let fds = Fds { qmp: ql.as_raw_fd(), agent: al.as_ref().map(|l| l.as_raw_fd()) };
    let listeners = [Some(ql), al].into_iter().flatten().collect();
    Ok(Sockets { listeners, qmp, agent, fds })
}

fn to_tokio(s: StdUnixStream) -> std::io::Result<UnixStream> {
    s.set_nonblocking(true)?;
    UnixStream::from_std(s)
}

impl Machine {
    /// Starts QEMU and connects QMP. The guest agent channel is opened but not awaited;
    /// call [`Machine::wait_agent`] for that.
    ///
    /// QEMU is killed if the thread that launched it exits (PDEATHSIG), so launch from a
    /// runtime worker or the main thread, never from `spawn_blocking`.
    pub async fn launch(cfg: MachineConfig) -> Result<Machine, MachineError> {
        let name = cfg.name.clone();
        let setup = |source| MachineError::Setup { name: name.clone(), source };
        let run_dir = tempfile::Builder::new().prefix(&format!("quiesce-{}-", cfg.name)).tempdir().map_err(setup)?;
        // tempfile makes it 0700 already; say so explicitly, the sockets live here.
        std::fs::set_permissions(run_dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o700)).map_err(setup)?;
        // Tests only: a scripted peer may stand in for this machine's agent (a Windows
        // guest, which cannot run where quiesce is tested); then QEMU gets no agent port.
        #[cfg(test)]
        let stand_in = if cfg.agent { super::stand_in::channel_for(&cfg.name) } else { None };
        #[cfg(not(test))]
        let stand_in: Option<UnixStream> = None;
        let socks = open_sockets(run_dir.path(), cfg.agent && stand_in.is_none()).map_err(setup)?;
        let serial = SerialLog::new(&run_dir.path().join("serial.log"));
        let args = launch::qemu_args(&cfg, socks.fds, serial.path());
        let program = cfg.qemu_binary.to_string_lossy().into_owned();
        let cmdline = crate::sys::shell_line(&program, &args);
        let keep: Vec<i32> = socks.listeners.iter().map(|l| l.as_raw_fd()).collect();
        let mut process = QemuProcess::spawn(&program, &args, &keep, &run_dir.path().join("qemu.out"))
            .map_err(|source| MachineError::Spawn { name: name.clone(), program: program.clone(), source })?;
        drop(socks.listeners);

        let transcript = Transcript::create(&run_dir.path().join("transcript.log")).map_err(setup)?;
        transcript.note("harness", &format!("pid {} {cmdline}", process.pid()));
        let qmp_sync = socks.qmp.try_clone().map_err(setup)?;
        // `quit` is written on this socket from Drop: if QEMU no longer reads it (hung), the
        // write gives up after a second, and SIGTERM follows under `deadline::QEMU_QUIT`.
        qmp_sync.set_write_timeout(Some(Duration::from_secs(1))).map_err(setup)?;
        #[cfg(test)]
        let standing_in = stand_in.is_some();
        let agent = match (socks.agent, stand_in) {
            (Some(s), _) => Some(GuestAgent::new(to_tokio(s).map_err(setup)?, transcript.clone())),
            (None, Some(s)) => Some(GuestAgent::new(s, transcript.clone())),
            (None, None) => None,
        };
        let qmp = match Qmp::connect(to_tokio(socks.qmp).map_err(setup)?, transcript, deadline::qmp_connect()).await {
            Ok(q) => q,
            Err(e) => {
                // Most often QEMU refused its arguments and exited; say what it printed.
                let status = process
                    .wait_timeout(deadline::QEMU_FAILED_START_EXIT)
                    .or_else(|| process.terminate(deadline::QEMU_QUIT));
                let output = std::fs::read_to_string(run_dir.path().join("qemu.out")).unwrap_or_default();
                let evidence = super::evidence::keep(&cfg, run_dir.path(), &cmdline, &e.to_string())
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|e| format!("(could not be kept: {e})"));
                return Err(MachineError::Exited {
                    name,
                    status: status.map(|s| s.to_string()).unwrap_or_else(|| format!("did not exit; {e}")),
                    cmdline,
                    output: tail_of(&output, 30),
                    serial: serial.tail(20),
                    evidence,
                });
            }
        };
        Ok(Machine {
            qmp,
            agent,
            serial,
            qmp_sync,
            process: Owner::Started(process),
            cfg,
            qemu_nodes: vec![],
            guest_serials: None,
            cmdline,
            failure: Mutex::new(None),
            #[cfg(test)]
            stand_in: standing_in,
            run_dir,
        })
    }

    /// A machine over a QEMU someone else started, already connected (see
    /// [`super::attach`]). `qemu_nodes` maps a disk's name to QEMU's node name where they
    /// differ; `guest_serials` is each disk's serial as the guest sees it.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn attached(
        cfg: MachineConfig,
        qmp: Qmp,
        qmp_sync: StdUnixStream,
        agent: Option<GuestAgent>,
        process: Option<crate::sys::Process>,
        qemu_nodes: Vec<(String, String)>,
        guest_serials: Vec<Option<String>>,
        describe: String,
        run_dir: tempfile::TempDir,
    ) -> Machine {
        Machine {
            qmp,
            agent,
            serial: SerialLog::new(&run_dir.path().join("serial.log")),
            qmp_sync,
            process: Owner::Attached(process),
            cfg,
            qemu_nodes,
            guest_serials: Some(guest_serials),
            cmdline: describe,
            failure: Mutex::new(None),
            #[cfg(test)]
            stand_in: false,
            run_dir,
        }
    }

    /// True for a QEMU quiesce did not start: it is never quit, stopped or killed.
    pub fn is_attached(&self) -> bool {
        matches!(self.process, Owner::Attached(_))
    }

    /// The node name QEMU knows `disk` by (its own name, unless the machine is attached and
    /// QEMU named the node otherwise).
    pub fn qemu_node<'a>(&'a self, disk: &'a DiskConfig) -> &'a str {
        self.qemu_nodes.iter().find(|(d, _)| *d == disk.node_name).map_or(disk.node_name.as_str(), |(_, n)| n)
    }

    /// The serials the guest sees on this machine's disks, to tell its filesystems on them
    /// from others. None when some disk has no serial, so the guest cannot tell which
    /// disks are ours: then every filesystem the guest reports counts.
    pub fn guest_serials(&self) -> Option<Vec<String>> {
        match &self.guest_serials {
            None => Some(self.cfg.disks.iter().map(|d| d.node_name.clone()).collect()),
            Some(s) => s.iter().cloned().collect(),
        }
    }

    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    pub fn config(&self) -> &MachineConfig {
        &self.cfg
    }

    pub fn qmp(&self) -> &Qmp {
        &self.qmp
    }

    pub fn agent(&self) -> Result<&GuestAgent, MachineError> {
        self.agent.as_ref().ok_or_else(|| MachineError::NoAgent { name: self.cfg.name.clone() })
    }

    /// Puts a scripted agent on a machine launched without an agent channel: the one place
    /// a scripted peer stands in for a guest's agent (a Windows guest, which cannot run
    /// here), with real QEMU under it (`backup/windows_peer_tests.rs`).
    #[cfg(test)]
    pub(crate) fn attach_scripted_agent(&mut self, agent: GuestAgent) {
        self.agent = Some(agent);
    }

    pub fn serial(&self) -> &SerialLog {
        &self.serial
    }

    pub fn run_dir(&self) -> &Path {
        self.run_dir.path()
    }

    /// QEMU's pid (0 for an attached QEMU whose pid could not be learnt).
    pub fn pid(&self) -> u32 {
        match &self.process {
            Owner::Started(p) => p.pid(),
            Owner::Attached(p) => p.as_ref().map_or(0, |p| p.pid()),
        }
    }

    pub fn cmdline(&self) -> &str {
        &self.cmdline
    }

    /// Wraps a QMP error with this machine's name.
    pub fn qmp_err(&self, source: QmpError) -> MachineError {
        MachineError::Qmp { name: self.cfg.name.clone(), source }
    }

    pub fn agent_err(&self, source: AgentError) -> MachineError {
        MachineError::Agent { name: self.cfg.name.clone(), source }
    }

    /// Waits until the guest agent answers, failing early if QEMU exits meanwhile.
    pub async fn wait_agent(&mut self, timeout: Duration) -> Result<(), MachineError> {
        let agent = self.agent.as_ref().ok_or_else(|| MachineError::NoAgent { name: self.cfg.name.clone() })?;
        let exited = match &mut self.process {
            Owner::Started(process) => tokio::select! {
                r = agent.wait_ready(timeout) => match r {
                    Ok(()) => return Ok(()),
                    Err(AgentError::NotResponding { .. }) => false,
                    // The channel broke (a reset, an end of stream): most often QEMU itself
                    // is ending, as when the guest panics at boot (panic=-1 and -no-reboot
                    // make a panic end QEMU). Its exit, its output and the serial tail say
                    // why; the bare socket error would not.
                    Err(source @ (AgentError::Io(_) | AgentError::Disconnected { .. })) => {
                        if process.wait_async(deadline::QEMU_QUIT).await.is_none() {
                            return Err(MachineError::Agent { name: self.cfg.name.clone(), source });
                        }
                        true
                    }
                    Err(source) => return Err(MachineError::Agent { name: self.cfg.name.clone(), source }),
                },
                // None is the timeout: QEMU is still running, the agent just never answered.
                status = process.wait_async(timeout) => status.is_some(),
            },
            Owner::Attached(_) => match agent.wait_ready(timeout).await {
                Ok(()) => return Ok(()),
                Err(AgentError::NotResponding { .. }) => false,
                Err(source) => return Err(MachineError::Agent { name: self.cfg.name.clone(), source }),
            },
        };
        if exited || !self.is_running() {
            return Err(self.exited_error("QEMU exited while waiting for the guest agent"));
        }
        self.mark_failed("guest agent never answered");
        Err(MachineError::AgentNotReady { name: self.cfg.name.clone(), waited: timeout, serial: self.serial.tail(20) })
    }

    /// Asks the guest to power off through the agent and waits for QEMU to exit.
    pub async fn shutdown(&mut self, timeout: Duration) -> Result<ExitStatus, MachineError> {
        let Owner::Started(_) = self.process else {
            return Err(MachineError::NotOurs { name: self.cfg.name.clone(), what: "power off" });
        };
        let agent = self.agent()?;
        agent
            .execute_no_reply("guest-shutdown", json!({"mode": "powerdown"}), timeout)
            .await
            .map_err(|e| self.agent_err(e))?;
        // Tests only: a scripted peer cannot power QEMU off, so QEMU is told to quit, as the
        // guest's power-off would end it (QEMU flushes and closes the disks either way).
        #[cfg(test)]
        if self.stand_in {
            let _ = self.qmp.execute_raw("quit", json!({}), timeout).await;
        }
        let Owner::Started(process) = &mut self.process else { unreachable!("checked above") };
        match process.wait_async(timeout).await {
            #[cfg(test)]
            Some(status) if self.stand_in => {
                // What the peer's guest wrote, on its disks now that QEMU has let go of them.
                super::stand_in::powered_off(&self.cfg);
                Ok(status)
            }
            Some(status) => Ok(status),
            None => {
                self.mark_failed("guest did not power off");
                Err(MachineError::ShutdownTimeout { name: self.cfg.name.clone(), waited: timeout })
            }
        }
    }

    /// True while the QEMU process is alive.
    pub fn is_running(&mut self) -> bool {
        match &mut self.process {
            Owner::Started(p) => p.try_status().is_none(),
            Owner::Attached(p) => p.as_ref().is_none_or(|p| !p.has_exited()),
        }
    }

    /// Kills QEMU at once (SIGKILL), as a fault would. The guard still cleans up. An
    /// attached QEMU is never killed: this does nothing to it and returns None.
    pub fn kill(&mut self) -> Option<ExitStatus> {
        match &mut self.process {
            Owner::Started(p) => p.kill(),
            Owner::Attached(_) => None,
        }
    }

    /// Marks the machine as failed, so Drop keeps its evidence.
    pub fn mark_failed(&self, why: &str) {
        let mut f = self.failure.lock().unwrap_or_else(|e| e.into_inner());
        f.get_or_insert_with(|| why.to_owned());
    }

    /// Copies the evidence out now and returns the folder.
    pub fn keep_evidence(&self, why: &str) -> std::io::Result<PathBuf> {
        super::evidence::keep(&self.cfg, self.run_dir.path(), &self.cmdline, why)
    }

    fn exited_error(&mut self, why: &str) -> MachineError {
        self.mark_failed(why);
        let status = match &mut self.process {
            Owner::Started(p) => p.try_status().map(|s| s.to_string()),
            Owner::Attached(p) => p.as_ref().filter(|p| p.has_exited()).map(|_| "exited (not ours to reap)".into()),
        }
        .unwrap_or_else(|| "still running".into());
        let output = std::fs::read_to_string(self.run_dir.path().join("qemu.out")).unwrap_or_default();
        MachineError::Exited {
            name: self.cfg.name.clone(),
            status,
            cmdline: self.cmdline.clone(),
            output: tail_of(&output, 30),
            serial: self.serial.tail(20),
            evidence: "kept when the machine is dropped".into(),
        }
    }

    fn stop_qemu(&mut self) {
        // A QEMU someone else started is left running: only the connections close.
        let Owner::Started(process) = &mut self.process else { return };
        if process.try_status().is_some() {
            return;
        }
        // A leading newline ends any half-written command a cancelled future left behind.
        let _ = self.qmp_sync.write_all(b"\n{\"execute\":\"quit\"}\n");
        if process.wait_timeout(deadline::QEMU_QUIT).is_none() {
            process.terminate(deadline::QEMU_QUIT);
        }
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        self.stop_qemu();
        let why = if std::thread::panicking() {
            Some("the thread holding the machine panicked".to_owned())
        } else {
            self.failure.lock().unwrap_or_else(|e| e.into_inner()).take()
        };
        if let Some(why) = why {
            match self.keep_evidence(&why) {
                Ok(dir) => {
                    eprintln!("quiesce: machine {} failed ({why}); evidence kept in {}", self.cfg.name, dir.display())
                }
                Err(e) => {
                    eprintln!("quiesce: machine {} failed ({why}); its evidence could not be kept: {e}", self.cfg.name)
                }
            }
        }
    }
}
