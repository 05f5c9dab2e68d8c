//! The restore's guest checks inside a restored Windows guest: `chkdsk` read-only (no
//! `/f`), in place of the Linux guest's `e2fsck -fn`. Run through the Windows exec helper.
//!
//! NEVER RUN AGAINST A LIVE WINDOWS GUEST: the exit codes are chkdsk's documented ones
//! (0 no errors; 1 errors found and fixed, which a read-only run never does; 2 cleanup
//! wanted; 3 errors found and not fixed, or the volume could not be checked).

use std::time::Duration;

use crate::qemu::winexec::{self, WinExecError, WinExit};
use crate::qemu::GuestAgent;

const TAIL_LINES: usize = 5;
const CHKDSK: &str = "C:\\Windows\\System32\\chkdsk.exe";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestChkdsk {
    /// The volume checked, as `D:`.
    pub volume: String,
    pub exit: WinExit,
    pub tail: String,
}

impl GuestChkdsk {
    /// No errors found (exit code 0).
    pub fn clean(&self) -> bool {
        self.exit == WinExit::Code(0)
    }
}

/// Why the check could not be run.
#[derive(Debug, thiserror::Error)]
pub enum ChkdskError {
    /// The volume is not a drive letter with a colon (`D:`): nothing is run.
    #[error("{0:?} is not a drive letter such as D:")]
    NotAVolume(String),
    /// The agent could not run chkdsk (see the agent's words).
    #[error(transparent)]
    Exec(#[from] WinExecError),
}

/// `chkdsk X:` without `/f`, which only reads the volume.
pub async fn chkdsk_readonly(agent: &GuestAgent, volume: &str, timeout: Duration) -> Result<GuestChkdsk, ChkdskError> {
    let v = volume.trim_end_matches('\\');
    let b = v.as_bytes();
    if b.len() != 2 || !b[0].is_ascii_alphabetic() || b[1] != b':' {
        return Err(ChkdskError::NotAVolume(volume.to_owned()));
    }
    let out = winexec::run(agent, CHKDSK, &[v], None, timeout).await?;
    let lines: Vec<&str> = out.stdout.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n");
    Ok(GuestChkdsk { volume: v.to_ascii_uppercase(), exit: out.exit, tail })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_a_drive_letter_is_checked() {
        let (a, _b) = tokio::net::UnixStream::pair().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let agent = GuestAgent::new(a, crate::qemu::Transcript::create(&dir.path().join("t")).unwrap());
        for bad in ["D", "D:\\x", "& del C:", "DD:"] {
            let e = chkdsk_readonly(&agent, bad, Duration::from_millis(10)).await.unwrap_err();
            assert!(matches!(e, ChkdskError::NotAVolume(_)), "{bad}: {e}");
        }
        let r = GuestChkdsk { volume: "D:".into(), exit: WinExit::Code(3), tail: String::new() };
        assert!(!r.clean());
    }
}
