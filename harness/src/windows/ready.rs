//! When a Windows guest is ready: its agent answers, *and* VSS is ready, which the agent
//! tells through `guest-fsfreeze-status`: right after boot it can answer `fsfreeze not
//! possible as VSS failed to initialize` for a while (VSS is slow to start), and a guest
//! whose VSS provider is not registered answers that for good. Peers probe this before a
//! freeze; so does quiesce, under the Windows boot deadline.
//!
//! NEVER RUN AGAINST A LIVE WINDOWS GUEST (tested with a scripted agent).

use std::time::Duration;

use qapi::qga::guest_fsfreeze_status;
use tokio::time::Instant;

use crate::backup::vss::{self, VssError, VssFailure};
use crate::qemu::{AgentError, GuestAgent, Machine, MachineError};

/// How often VSS's readiness is asked again while it is still starting.
const RETRY: Duration = Duration::from_secs(2);

/// What one `guest-fsfreeze-status` says of VSS.
#[derive(Debug)]
pub enum Vss {
    /// The agent answered a status: VSS can freeze.
    Ready,
    /// VSS failed to initialise (maybe only not yet); the agent's words are kept.
    NotReady(VssError),
}

/// Why a Windows guest did not become ready.
#[derive(Debug, thiserror::Error)]
pub enum ReadyError {
    /// QEMU exited, or the agent never answered (see the serial tail in the error).
    #[error(transparent)]
    Machine(#[from] MachineError),
    /// The agent answers, but VSS never became ready within the deadline: the provider is
    /// not registered (`qemu-ga.exe -s vss-install` registers it) or VSS is broken.
    #[error("the guest agent answers, but VSS was not ready within {waited:?}: {error}")]
    VssNotReady { waited: Duration, error: VssError },
    /// The agent refused or failed `guest-fsfreeze-status` for another reason.
    #[error("guest-fsfreeze-status: {0}")]
    Agent(AgentError),
}

/// What a `guest-fsfreeze-status` answer says of VSS; an error that is not VSS's is passed on.
pub fn judge(reply: Result<qapi::qga::GuestFsfreezeStatus, AgentError>) -> Result<Vss, AgentError> {
    match reply {
        Ok(_) => Ok(Vss::Ready),
        Err(e) => match vss::of_agent_error(&e) {
            Some(v) if v.failure == VssFailure::InitFailed => Ok(Vss::NotReady(v)),
            _ => Err(e),
        },
    }
}

/// Asks once whether VSS is ready.
pub async fn vss_status(agent: &GuestAgent, deadline: Duration) -> Result<Vss, AgentError> {
    judge(agent.execute_within(guest_fsfreeze_status {}, deadline).await)
}

/// Waits until the agent answers and VSS is ready, within `deadline` in all.
pub async fn wait_ready(m: &mut Machine, deadline: Duration) -> Result<(), ReadyError> {
    let until = Instant::now() + deadline;
    m.wait_agent(deadline).await?;
    let agent = m.agent()?;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        match vss_status(agent, left.max(Duration::from_secs(5))).await.map_err(ReadyError::Agent)? {
            Vss::Ready => return Ok(()),
            Vss::NotReady(error) if left.is_zero() => return Err(ReadyError::VssNotReady { waited: deadline, error }),
            Vss::NotReady(_) => tokio::time::sleep(RETRY.min(left)).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vss_not_initialised_is_not_ready_and_other_errors_pass_through() {
        assert!(matches!(judge(Ok(qapi::qga::GuestFsfreezeStatus::thawed)), Ok(Vss::Ready)));
        let init = AgentError::Command {
            command: "guest-fsfreeze-status".into(),
            class: "GenericError".into(),
            desc: "fsfreeze not possible as VSS failed to initialize".into(),
        };
        assert!(matches!(judge(Err(init)), Ok(Vss::NotReady(e)) if e.failure == VssFailure::InitFailed));
        let other = AgentError::Timeout { command: "guest-fsfreeze-status".into(), waited: Duration::from_secs(1) };
        assert!(judge(Err(other)).is_err());
    }
}
