//! Runs a program in the guest through `guest-exec`. The agent has no completion event, so
//! the status is polled, with a growing interval, under one deadline. Output is bounded:
//! the guest is untrusted.

use std::time::Duration;

use base64::Engine;
use serde_json::{json, Value};
use tokio::time::Instant;

use super::qga::{AgentError, GuestAgent};

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
    #[error("guest-exec {argv:?}: {source}")]
    Agent { argv: Vec<String>, source: AgentError },
    #[error("guest-exec {argv:?} still running after {waited:?}")]
    Timeout { argv: Vec<String>, waited: Duration },
    #[error("guest-exec {argv:?}: malformed status reply: {reply}")]
    Malformed { argv: Vec<String>, reply: String },
    #[error("guest-exec {argv:?} exited with {exit_code}; stderr: {stderr}")]
    Failed { argv: Vec<String>, exit_code: i64, stderr: String },
}

/// Runs `argv` in the guest and waits for it to finish, up to `timeout`.
pub async fn run(agent: &GuestAgent, argv: &[&str], timeout: Duration) -> Result<ExecOutput, ExecError> {
    let argv_owned: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
    let agent_err = |source| ExecError::Agent { argv: argv_owned.clone(), source };
    let deadline = Instant::now() + timeout;
    let started = agent
        .execute_raw(
            "guest-exec",
            json!({"path": argv[0], "arg": &argv[1..], "capture-output": true}),
            Duration::from_secs(10).min(timeout),
        )
        .await
        .map_err(agent_err)?;
    let pid = started["pid"].as_i64().ok_or_else(|| ExecError::Malformed {
        argv: argv_owned.clone(),
        reply: crate::qemu::message::snippet(started.to_string().as_bytes()),
    })?;
    let mut interval = Duration::from_millis(10);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let status =
            agent.execute_raw("guest-exec-status", json!({"pid": pid}), left.max(Duration::from_secs(1))).await;
        let status = status.map_err(agent_err)?;
        if status["exited"].as_bool() == Some(true) {
            return Ok(decode(&status));
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

fn decode(status: &Value) -> ExecOutput {
    let mut truncated = false;
    let mut field = |name: &str| {
        let b64 = status[format!("{name}-data")].as_str().unwrap_or("");
        truncated |= status[format!("{name}-truncated")].as_bool().unwrap_or(false);
        let mut bytes = base64::engine::general_purpose::STANDARD.decode(b64).unwrap_or_default();
        if bytes.len() > MAX_OUTPUT {
            bytes.truncate(MAX_OUTPUT);
            truncated = true;
        }
        String::from_utf8_lossy(&bytes).into_owned()
    };
    let stdout = field("out");
    let stderr = field("err");
    // A signal death has no exit code; report it as 128+signal like a shell would.
    let exit_code = status["exitcode"].as_i64().or_else(|| status["signal"].as_i64().map(|s| 128 + s)).unwrap_or(-1);
    ExecOutput { exit_code, stdout, stderr, truncated }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_output_and_signals() {
        let s = json!({"exited": true, "exitcode": 0, "out-data": "aGkK", "err-data": ""});
        assert_eq!(decode(&s), ExecOutput { exit_code: 0, stdout: "hi\n".into(), stderr: "".into(), truncated: false });
        let s = json!({"exited": true, "signal": 9, "out-truncated": true});
        let d = decode(&s);
        assert_eq!(d.exit_code, 137);
        assert!(d.truncated);
    }

    #[test]
    fn bad_base64_is_empty_not_a_panic() {
        let s = json!({"exited": true, "exitcode": 1, "out-data": "!!!not base64"});
        assert_eq!(decode(&s).stdout, "");
    }
}
