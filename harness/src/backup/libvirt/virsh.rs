//! `virsh`, run with a deadline per command: the one way quiesce talks to libvirt (see the
//! notes of [`super`] for why it is virsh and not the C API).

use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

use crate::sys::{Tool, ToolError};

/// A virsh command that does no bulk work (`domstate`, `dumpxml`, `domfsthaw`): libvirt
/// answers in milliseconds, or in a second or two when it must ask the guest agent.
pub const COMMAND: Duration = Duration::from_secs(30);
/// Past a virsh command's own `--timeout` (given to `blockcommit` and
/// `qemu-agent-command`), the time virsh needs to give up and say so.
pub const OWN_TIMEOUT_MARGIN: Duration = Duration::from_secs(10);
/// At most this much of virsh's stdout is read (a domain's XML is well under it).
const STDOUT_CAP: usize = super::domain::MAX_XML_BYTES + 1;

/// How virsh failed.
#[derive(Debug, thiserror::Error)]
pub enum VirshError {
    /// virsh is not installed (package libvirt-clients).
    #[error("virsh is not installed: install libvirt's client (apt-get install libvirt-clients)")]
    NotInstalled,
    /// libvirt refused the command or failed it; `stderr` holds libvirt's own words
    /// (a domain that does not exist, a daemon that is not running, an agent that is not
    /// connected...).
    #[error("`virsh {args}` failed ({status}): {stderr}")]
    Failed { args: String, status: String, stderr: String },
    /// virsh did not finish in time and was killed. The operation may still go on inside
    /// libvirtd: the put-back reads the domain's XML rather than trusting what was asked.
    #[error("`virsh {args}` did not finish within {waited:?}")]
    Timeout { args: String, waited: Duration },
    /// virsh could not be run, or answered something that is not what it prints.
    #[error("`virsh {args}`: {why}")]
    Other { args: String, why: String },
}

/// virsh on one connection.
#[derive(Debug, Clone)]
pub struct Virsh {
    program: PathBuf,
    connect: Option<String>,
}

impl Virsh {
    /// virsh from `$PATH`, on `connect` (libvirt's own default URI when None).
    pub fn new(connect: Option<String>) -> Result<Virsh, VirshError> {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let program = std::env::split_paths(&path)
            .chain([PathBuf::from("/usr/bin")])
            .map(|d| d.join("virsh"))
            .find(|p| p.is_file())
            .ok_or(VirshError::NotInstalled)?;
        Ok(Virsh { program, connect })
    }

    fn tool(&self, args: &[&str], timeout: Duration) -> Tool<'static> {
        let mut tool = Tool::new(&self.program, timeout).arg("-q").stdout_cap(STDOUT_CAP);
        if let Some(uri) = &self.connect {
            tool = tool.args(["-c", uri]);
        }
        tool.args(args)
    }

    /// Runs `virsh -q [-c URI] args` within `timeout`; its stdout.
    pub async fn run(&self, args: &[&str], timeout: Duration) -> Result<String, VirshError> {
        Self::answer(args, self.tool(args, timeout).run_async().await)
    }

    /// [`Virsh::run`] on this thread (for a clean-up in `Drop`).
    pub fn run_blocking(&self, args: &[&str], timeout: Duration) -> Result<String, VirshError> {
        Self::answer(args, self.tool(args, timeout).run())
    }

    fn answer(args: &[&str], r: Result<crate::sys::Output, ToolError>) -> Result<String, VirshError> {
        let shown = args.join(" ");
        match r {
            Ok(out) => Ok(out.stdout_text()),
            Err(ToolError::Failed { status, stderr, .. }) => {
                Err(VirshError::Failed { args: shown, status: status.to_string(), stderr: stderr.trim().to_owned() })
            }
            Err(ToolError::TimedOut { waited, .. }) => Err(VirshError::Timeout { args: shown, waited }),
            Err(e) => Err(VirshError::Other { args: shown, why: e.to_string() }),
        }
    }

    /// One guest agent command through libvirt (`virsh qemu-agent-command`), given
    /// `timeout` inside libvirt and a little more outside; its `return` value.
    pub async fn agent(&self, domain: &str, command: &str, timeout: Duration) -> Result<Value, VirshError> {
        self.agent_json(domain, &serde_json::json!({ "execute": command }), timeout).await
    }

    /// [`Virsh::agent`] with arguments: `cmd` is the whole `{"execute", "arguments"}`.
    pub async fn agent_json(&self, domain: &str, cmd: &Value, timeout: Duration) -> Result<Value, VirshError> {
        let secs = timeout.as_secs().max(1).to_string();
        let json = cmd.to_string();
        let out =
            self.run(&["qemu-agent-command", domain, &json, "--timeout", &secs], timeout + OWN_TIMEOUT_MARGIN).await?;
        let reply: Value = serde_json::from_str(out.trim()).map_err(|e| VirshError::Other {
            args: format!("qemu-agent-command {domain} {json}"),
            why: format!("the agent's reply is not JSON: {e}"),
        })?;
        Ok(reply.get("return").cloned().unwrap_or(Value::Null))
    }
}
