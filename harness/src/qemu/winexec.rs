//! Running a program in a Windows guest through `guest-exec`, where qemu-ga's Windows build
//! differs from Linux's (qemu-ga 10.0.2, `qga/commands-win32.c`):
//!
//! - there is no merged stdout/stderr capture: both are always captured apart;
//! - an exit code of 0xC0000000 or more (an NTSTATUS: a crash, an access violation) comes
//!   back as `signal`, not `exitcode`, so it is read back as [`WinExit::Status`];
//! - `env`, when given, *replaces* the whole environment, so `SystemRoot` and `PATH` are
//!   always put back (without `SystemRoot` most programs cannot even load their DLLs);
//! - output is in the OEM code page (437 on an en-US guest) with CRLF line ends: it is
//!   decoded from that code page and its line ends made `\n`;
//! - programs run as LocalSystem.
//!
//! NEVER RUN AGAINST A LIVE WINDOWS GUEST: tested against a scripted agent replaying those
//! replies.

use std::time::Duration;

use base64::Engine;
use qapi::qga::{guest_exec, guest_exec_status, GuestExecCaptureOutput};
use tokio::time::Instant;

use super::exec::MAX_OUTPUT;
use super::qga::{AgentError, GuestAgent};

/// Where Windows is, and the PATH a LocalSystem process has, put back whenever `env` is
/// given (qemu-ga passes the given environment as the whole environment).
pub const SYSTEM_ROOT: &str = "C:\\Windows";
pub const DEFAULT_PATH: &str =
    "C:\\Windows\\system32;C:\\Windows;C:\\Windows\\System32\\Wbem;C:\\Windows\\System32\\WindowsPowerShell\\v1.0\\";
/// Windows PowerShell, present on every Windows this project targets.
pub const POWERSHELL: &str = "C:\\Windows\\System32\\WindowsPowerShell\\v1.0\\powershell.exe";

/// How a Windows program ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WinExit {
    /// It returned this exit code (below 0xC0000000).
    Code(u32),
    /// It ended with this NTSTATUS (0xC0000000 and up: an exception, e.g. 0xC0000005, an
    /// access violation), which qemu-ga reports as a signal.
    Status(u32),
}

impl WinExit {
    pub fn success(self) -> bool {
        self == WinExit::Code(0)
    }
}

impl std::fmt::Display for WinExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WinExit::Code(c) => write!(f, "exit code {c}"),
            WinExit::Status(s) => write!(f, "NTSTATUS 0x{s:08X}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WinOutput {
    pub exit: WinExit,
    /// Decoded from the OEM code page, `\r\n` made `\n`.
    pub stdout: String,
    pub stderr: String,
    pub truncated: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum WinExecError {
    /// The agent refused, failed or did not answer (while the guest is frozen it refuses
    /// guest-exec: see [`crate::backup::vss::disabled_while_frozen`]).
    #[error("guest-exec {program}: {source}")]
    Agent { program: String, source: AgentError },
    /// The program was still running at the deadline; it is left running in the guest.
    #[error("guest-exec {program} still running after {waited:?}")]
    Timeout { program: String, waited: Duration },
    /// The agent's status reply says the program exited but gives neither an exit code nor
    /// a status: a reply that does not fit what qemu-ga sends.
    #[error("guest-exec {program}: exited without an exit code or status")]
    NoExitCode { program: String },
    /// The program ended unsuccessfully; its stderr (or stdout, when stderr is empty) follows.
    #[error("guest-exec {program} ended with {exit}: {output}")]
    Failed { program: String, exit: WinExit, output: String },
}

/// The environment passed to the guest: `env`, with `SystemRoot` and `PATH` added unless
/// the caller set them. None when the caller gives no environment (the agent's is kept).
pub fn environment(env: Option<&[(&str, &str)]>) -> Option<Vec<String>> {
    let env = env?;
    let has = |k: &str| env.iter().any(|(n, _)| n.eq_ignore_ascii_case(k));
    let mut out: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    if !has("SystemRoot") {
        out.push(format!("SystemRoot={SYSTEM_ROOT}"));
    }
    if !has("PATH") {
        out.push(format!("PATH={DEFAULT_PATH}"));
    }
    Some(out)
}

/// Code page 437's characters 0x80-0xFF (the en-US OEM code page), by Unicode's mapping.
const CP437_HIGH: &str = "ÇüéâäàåçêëèïîìÄÅÉæÆôöòûùÿÖÜ¢£¥₧ƒáíóúñÑªº¿⌐¬½¼¡«»░▒▓│┤╡╢╖╕╣║╗╝╜╛┐└┴┬├─┼╞╟╚╔╩╦╠═╬╧╨╤╥╙╘╒╓╫╪┘┌█▄▌▐▀αßΓπΣσµτΦΘΩδ∞φε∩≡±≥≤⌠⌡÷≈°∙·√ⁿ²■\u{a0}";

/// Output of a Windows program: OEM code page 437 to text, CRLF to LF.
pub fn decode_oem(bytes: &[u8]) -> String {
    let high: Vec<char> = CP437_HIGH.chars().collect();
    let text: String = bytes.iter().map(|&b| if b < 0x80 { b as char } else { high[(b - 0x80) as usize] }).collect();
    text.replace("\r\n", "\n")
}

fn decode_exit(exitcode: Option<i64>, signal: Option<i64>) -> Option<WinExit> {
    match (exitcode, signal) {
        (_, Some(s)) => Some(WinExit::Status(s as u32)),
        (Some(c), None) if (c as u32) >= 0xC000_0000 => Some(WinExit::Status(c as u32)),
        (Some(c), None) => Some(WinExit::Code(c as u32)),
        (None, None) => None,
    }
}

/// Runs `program` with `args` in the Windows guest, within `timeout`. `env`, if given, is
/// completed with `SystemRoot` and `PATH`.
pub async fn run(
    agent: &GuestAgent,
    program: &str,
    args: &[&str],
    env: Option<&[(&str, &str)]>,
    timeout: Duration,
) -> Result<WinOutput, WinExecError> {
    let err = |source| WinExecError::Agent { program: program.to_owned(), source };
    let deadline = Instant::now() + timeout;
    let start = guest_exec {
        path: program.to_owned(),
        arg: Some(args.iter().map(|s| s.to_string()).collect()),
        // Separate stdout and stderr: the Windows agent has no merged capture.
        capture_output: Some(GuestExecCaptureOutput::flag(true)),
        env: environment(env),
        input_data: None,
    };
    let pid = agent.execute_within(start, Duration::from_secs(30).min(timeout)).await.map_err(err)?.pid;
    let mut interval = Duration::from_millis(50);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let status =
            agent.execute_within(guest_exec_status { pid }, left.max(Duration::from_secs(1))).await.map_err(err)?;
        if status.exited {
            let exit = decode_exit(status.exitcode, status.signal)
                .ok_or_else(|| WinExecError::NoExitCode { program: program.to_owned() })?;
            let mut truncated = status.out_truncated.unwrap_or(false) || status.err_truncated.unwrap_or(false);
            let mut field = |data: Option<Vec<u8>>| {
                let mut b = data.unwrap_or_default();
                if b.len() > MAX_OUTPUT {
                    b.truncate(MAX_OUTPUT);
                    truncated = true;
                }
                decode_oem(&b)
            };
            let stdout = field(status.out_data);
            let stderr = field(status.err_data);
            return Ok(WinOutput { exit, stdout, stderr, truncated });
        }
        if left.is_zero() {
            return Err(WinExecError::Timeout { program: program.to_owned(), waited: timeout });
        }
        tokio::time::sleep(interval.min(left)).await;
        interval = (interval * 2).min(Duration::from_millis(500));
    }
}

/// Runs a PowerShell script in the guest, passed as `-EncodedCommand` (UTF-16LE, base64),
/// so no quoting of the guest's command line can change it. Its output is made UTF-8 by
/// the script itself. A failure is [`WinExecError::Failed`].
pub async fn powershell(agent: &GuestAgent, script: &str, timeout: Duration) -> Result<String, WinExecError> {
    let full = format!(
        "$ErrorActionPreference = 'Stop'; $ProgressPreference = 'SilentlyContinue'; \
         [Console]::OutputEncoding = [System.Text.Encoding]::ASCII; {script}"
    );
    let utf16: Vec<u8> = full.encode_utf16().flat_map(|u| u.to_le_bytes()).collect();
    let encoded = base64::engine::general_purpose::STANDARD.encode(utf16);
    let args = ["-NoProfile", "-NonInteractive", "-ExecutionPolicy", "Bypass", "-EncodedCommand", &encoded];
    let out = run(agent, POWERSHELL, &args, None, timeout).await?;
    if !out.exit.success() {
        let output = if out.stderr.trim().is_empty() { out.stdout } else { out.stderr };
        return Err(WinExecError::Failed {
            program: "powershell".into(),
            exit: out.exit,
            output: output.trim().to_owned(),
        });
    }
    Ok(out.stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ntstatus_exits_come_back_as_signals() {
        assert_eq!(decode_exit(Some(0), None), Some(WinExit::Code(0)));
        assert_eq!(decode_exit(Some(3), None), Some(WinExit::Code(3)));
        // qemu-ga puts an exit code >= 0xC0000000 in "signal" (as a signed 32-bit value or not).
        assert_eq!(decode_exit(None, Some(0xC000_0005)), Some(WinExit::Status(0xC000_0005)));
        assert_eq!(decode_exit(None, Some(-1073741819)), Some(WinExit::Status(0xC000_0005)));
        assert_eq!(WinExit::Status(0xC000_0005).to_string(), "NTSTATUS 0xC0000005");
        assert_eq!(decode_exit(None, None), None);
    }

    #[test]
    fn env_keeps_system_root_and_path() {
        assert_eq!(environment(None), None);
        let e = environment(Some(&[("QUIESCE", "1")])).unwrap();
        assert_eq!(e[0], "QUIESCE=1");
        assert!(e.contains(&"SystemRoot=C:\\Windows".to_owned()));
        assert!(e.iter().any(|v| v.starts_with("PATH=C:\\Windows\\system32;")));
        let own = environment(Some(&[("Path", "C:\\x"), ("SYSTEMROOT", "D:\\W")])).unwrap();
        assert_eq!(own, vec!["Path=C:\\x", "SYSTEMROOT=D:\\W"]);
    }

    #[test]
    fn oem_output_is_decoded_and_crlf_made_lf() {
        assert_eq!(CP437_HIGH.chars().count(), 128);
        // "Größe: 5 ±1\r\n" as cp437 bytes.
        let bytes = [b'G', b'r', 0x94, 0xe1, b'e', b':', b' ', b'5', b' ', 0xf1, b'1', b'\r', b'\n'];
        assert_eq!(decode_oem(&bytes), "Größe: 5 ±1\n");
    }
}
