//! Runs a program in the guest through `guest-exec`. The agent has no completion event, so
//! the status is polled, with a growing interval, under one deadline. Output is bounded:
//! the guest is untrusted.

use std::time::Duration;

use qapi::qga::{guest_exec, guest_exec_status, GuestExecCaptureOutput, GuestExecStatus};
use tokio::time::Instant;

use super::qga::{AgentError, GuestAgent};
use crate::sys::deadline;

/// At most this much of each of stdout and stderr is kept.
pub const MAX_OUTPUT: usize = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    pub exit_code: i64,
    pub stdout: String,
    pub stderr: String,
    /// True if the agent or this client cut the output short.
    pub truncated: bool,
}

impl ExecOutput {
    pub fn success(&self) -> bool {
        self.exit_code == 0
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The agent refused, failed or did not answer `guest-exec` or `guest-exec-status`, or
    /// its reply does not fit QEMU's schema; the program's fate in the guest is unknown.
    #[error("guest-exec {argv:?}: {source}")]
    Agent { argv: Vec<String>, source: AgentError },
    /// The program was still running in the guest at the deadline; it is left running there.
    #[error("guest-exec {argv:?} still running after {waited:?}")]
    Timeout { argv: Vec<String>, waited: Duration },
    /// The program ran and exited non-zero (or by a signal, as 128+signal).
    #[error("guest-exec {argv:?} exited with {exit_code}; stderr: {stderr}")]
    Failed { argv: Vec<String>, exit_code: i64, stderr: String },
}

/// Runs `argv` in the guest and waits for it to finish, up to `timeout`.
pub async fn run(agent: &GuestAgent, argv: &[&str], timeout: Duration) -> Result<ExecOutput, ExecError> {
    let argv_owned: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
    let agent_err = |source| ExecError::Agent { argv: argv_owned.clone(), source };
    let deadline = Instant::now() + timeout;
    let start = guest_exec {
        path: argv[0].to_owned(),
        arg: Some(argv_owned[1..].to_vec()),
        capture_output: Some(GuestExecCaptureOutput::flag(true)),
        env: None,
        input_data: None,
    };
    let pid = agent.execute_within(start, deadline::AGENT_COMMAND.min(timeout)).await.map_err(agent_err)?.pid;
    let mut interval = Duration::from_millis(10);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        // Past the deadline, one last look (it may have just ended), given as long as a live
        // agent takes to answer.
        let status = agent.execute_within(guest_exec_status { pid }, left.max(deadline::AGENT_SILENCE)).await;
        let status = status.map_err(agent_err)?;
        if status.exited {
            return Ok(decode(status));
        }
        if left.is_zero() {
            return Err(ExecError::Timeout { argv: argv_owned, waited: timeout });
        }
        tokio::time::sleep(interval.min(left)).await;
        interval = (interval * 2).min(Duration::from_millis(200));
    }
}

/// Runs a shell command line in the guest; a non-zero exit is an error with its stderr.
pub async fn sh(agent: &GuestAgent, script: &str, timeout: Duration) -> Result<String, ExecError> {
    let out = run(agent, &["/bin/sh", "-c", script], timeout).await?;
    if !out.success() {
        return Err(ExecError::Failed {
            argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
            exit_code: out.exit_code,
            stderr: out.stderr,
        });
    }
    Ok(out.stdout)
}

/// The output of a finished program. The agent sends it base64-encoded; the typed reply
/// has decoded it already, and a reply whose base64 is broken did not parse at all.
fn decode(status: GuestExecStatus) -> ExecOutput {
    let mut truncated = false;
    let mut field = |data: Option<Vec<u8>>, cut: Option<bool>| {
        let mut bytes = data.unwrap_or_default();
        truncated |= cut.unwrap_or(false);
        if bytes.len() > MAX_OUTPUT {
            bytes.truncate(MAX_OUTPUT);
            truncated = true;
        }
        String::from_utf8_lossy(&bytes).into_owned()
    };
    let stdout = field(status.out_data, status.out_truncated);
    let stderr = field(status.err_data, status.err_truncated);
    // A signal death has no exit code; report it as 128+signal like a shell would.
    let exit_code = status.exitcode.or_else(|| status.signal.map(|s| 128 + s)).unwrap_or(-1);
    ExecOutput { exit_code, stdout, stderr, truncated }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use serde_json::json;

    fn status(reply: serde_json::Value) -> Result<GuestExecStatus, serde_json::Error> {
        serde_json::from_value(reply)
    }

    #[test]
    fn decodes_output_and_signals() {
        let s = status(json!({"exited": true, "exitcode": 0, "out-data": "aGkK", "err-data": ""})).unwrap();
        assert_eq!(decode(s), ExecOutput { exit_code: 0, stdout: "hi\n".into(), stderr: "".into(), truncated: false });
        let d = decode(status(json!({"exited": true, "signal": 9, "out-truncated": true})).unwrap());
        assert_eq!(d.exit_code, 137);
        assert!(d.truncated);
    }

    #[test]
    fn output_is_capped() {
        let big = base64::engine::general_purpose::STANDARD.encode(vec![b'x'; MAX_OUTPUT + 10]);
        let d = decode(status(json!({"exited": true, "exitcode": 0, "out-data": big})).unwrap());
        assert_eq!(d.stdout.len(), MAX_OUTPUT);
        assert!(d.truncated);
    }

    #[test]
    fn bad_base64_is_an_error_not_a_panic() {
        assert!(status(json!({"exited": true, "exitcode": 1, "out-data": "!!!not base64"})).is_err());
        assert!(status(json!({"exited": "yes"})).is_err());
    }
}
