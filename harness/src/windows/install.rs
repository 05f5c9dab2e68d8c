//! Runs the unattended Windows install in QEMU and watches it: the phase, each line the
//! guest writes to COM1 as it comes, and the elapsed time against the deadline. It ends
//! when QEMU exits (the guest powers itself off after its first logon), with the ready line
//! the first-logon script wrote, or with evidence: the serial log, QEMU's output, the
//! command line, and a QMP `screendump` of the screen at the moment it failed.
//!
//! NEVER RUN WITH A REAL WINDOWS ISO (see [`crate::windows`]).

use std::io::{Read, Seek, SeekFrom};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::image::windows::plan::{self, InstallPlan};
use crate::qemu::process::QemuProcess;
use crate::qemu::{Qmp, Transcript};
use crate::sys::deadline as sysdeadline;

/// The line the first-logon script writes to COM1 when the guest is ready.
pub const READY_MARK: &str = "QUIESCE-WINDOWS-READY";
/// The line it writes instead when provisioning failed.
pub const FAILED_MARK: &str = "QUIESCE-WINDOWS-FAILED";
/// How often the serial log is read for new lines while QEMU runs: the wait itself is on
/// QEMU's exit (a pidfd), this only bounds how late a line is shown.
const SHOW_EVERY: Duration = Duration::from_secs(2);
/// A serial line longer than this is cut (the guest is untrusted).
const MAX_LINE: usize = 512;

/// Why the install did not produce a ready guest. Each keeps its evidence folder.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// QEMU could not be started (see `QUIESCE_QEMU`), or its run folder not made.
    #[error("could not start QEMU for the Windows install: {0}")]
    Spawn(std::io::Error),
    /// The first-logon script reported a failure on COM1 (its words follow); the guest's
    /// own log is C:\quiesce\firstlogon.log inside the half-built disk.
    #[error("the guest's provisioning failed: {line}\nevidence: {evidence}")]
    ProvisioningFailed { line: String, evidence: String },
    /// The install ran past its deadline: Setup is stuck (a missing driver shows as a disk
    /// picker on the screenshot) or the host is too slow; QEMU was stopped.
    #[error("the Windows install did not finish within {waited:?}; QEMU was stopped.\nlast serial lines:\n{serial}\nevidence (serial log, screenshot): {evidence}")]
    TimedOut { waited: Duration, serial: String, evidence: String },
    /// QEMU exited before the guest wrote its ready line: QEMU refused an argument, or the
    /// guest powered off or crashed during Setup.
    #[error("QEMU exited ({status}) before the guest was ready.\nQEMU said:\n{output}\nlast serial lines:\n{serial}\nevidence: {evidence}")]
    ExitedEarly { status: String, output: String, serial: String, evidence: String },
}

/// What the install tells the person waiting for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// A new line on COM1.
    Serial(String),
    /// The time so far, against the deadline (sent about every 2 s).
    Elapsed { elapsed: Duration, deadline: Duration },
}

/// Reads the lines appended to the serial log since the last call.
struct SerialFollower {
    path: PathBuf,
    offset: u64,
    partial: Vec<u8>,
    all: Vec<String>,
}

impl SerialFollower {
    fn new(path: &Path) -> Self {
        Self { path: path.to_owned(), offset: 0, partial: Vec::new(), all: Vec::new() }
    }

    fn poll(&mut self) -> Vec<String> {
        let Ok(mut f) = std::fs::File::open(&self.path) else { return vec![] };
        if f.seek(SeekFrom::Start(self.offset)).is_err() {
            return vec![];
        }
        let mut buf = Vec::new();
        let _ = f.take(1 << 20).read_to_end(&mut buf);
        self.offset += buf.len() as u64;
        self.partial.extend_from_slice(&buf);
        let mut lines = Vec::new();
        while let Some(at) = self.partial.iter().position(|&b| b == b'\n') {
            let raw: Vec<u8> = self.partial.drain(..=at).collect();
            let mut line = String::from_utf8_lossy(&raw).trim_end_matches(['\r', '\n']).to_owned();
            let mut cut = MAX_LINE.min(line.len());
            while !line.is_char_boundary(cut) {
                cut -= 1;
            }
            line.truncate(cut);
            if !line.trim().is_empty() {
                lines.push(line);
            }
        }
        if self.partial.len() > MAX_LINE * 4 {
            self.partial.clear();
        }
        self.all.extend(lines.iter().cloned());
        lines
    }

    fn tail(&self, n: usize) -> String {
        self.all[self.all.len().saturating_sub(n)..].join("\n")
    }
}

/// The ready or failed line among the guest's serial lines.
pub fn verdict(lines: &[String]) -> Option<Result<String, String>> {
    lines.iter().find_map(|l| {
        if let Some(at) = l.find(READY_MARK) {
            Some(Ok(l[at..].to_owned()))
        } else {
            l.find(FAILED_MARK).map(|at| Err(l[at..].to_owned()))
        }
    })
}

/// Keeps what a failed install leaves: the serial log, QEMU's output, the command line,
/// and the screenshot if one was taken. Returns the folder.
fn keep_evidence(run_dir: &Path, artifacts: &Path, cmdline: &str, why: &str) -> String {
    let kept = (|| -> std::io::Result<PathBuf> {
        std::fs::create_dir_all(artifacts)?;
        let dir = tempfile::Builder::new().prefix("windows-install-").tempdir_in(artifacts)?.keep();
        for name in ["serial.log", "qemu.out", "screen.ppm", "transcript.log"] {
            let from = run_dir.join(name);
            if from.exists() {
                std::fs::copy(&from, dir.join(name))?;
            }
        }
        std::fs::write(dir.join("cmdline.sh"), format!("{cmdline}\n"))?;
        std::fs::write(dir.join("why.txt"), format!("{why}\n"))?;
        Ok(dir)
    })();
    match kept {
        Ok(d) => d.display().to_string(),
        Err(e) => format!("(could not be kept: {e})"),
    }
}

/// Asks QEMU for a picture of the screen, into `run_dir/screen.ppm`. Best effort: a QEMU
/// that does not answer leaves no picture, and the failure is reported all the same.
async fn screendump(run_dir: &Path) {
    let Ok(stream) = StdUnixStream::connect(run_dir.join("qmp.sock")) else { return };
    let Ok(()) = stream.set_nonblocking(true) else { return };
    let Ok(stream) = tokio::net::UnixStream::from_std(stream) else { return };
    let Ok(t) = Transcript::create(&run_dir.join("transcript.log")) else { return };
    let Ok(qmp) = Qmp::connect(stream, t, sysdeadline::qmp_connect()).await else { return };
    let file = run_dir.join("screen.ppm");
    let _ = qmp.execute_raw("screendump", serde_json::json!({"filename": file}), sysdeadline::QMP_COMMAND).await;
}

/// Runs the install described by `p` (whose paths live in `run_dir`), for at most
/// `deadline`. Returns the guest's ready line.
pub async fn run(
    p: &InstallPlan,
    run_dir: &Path,
    artifacts: &Path,
    deadline: Duration,
    progress: &mut dyn FnMut(Progress),
) -> Result<String, InstallError> {
    let args = plan::qemu_args(p);
    let program = p.qemu_binary.to_string_lossy().into_owned();
    let cmdline = crate::sys::shell_line(&program, &args);
    let mut qemu = QemuProcess::spawn(&program, &args, &[], &run_dir.join("qemu.out")).map_err(InstallError::Spawn)?;
    let started = Instant::now();
    let mut serial = SerialFollower::new(&p.serial_log);
    let status = loop {
        let left = deadline.saturating_sub(started.elapsed());
        if let Some(status) = qemu.wait_async(left.min(SHOW_EVERY)).await {
            break status;
        }
        for line in serial.poll() {
            progress(Progress::Serial(line));
        }
        progress(Progress::Elapsed { elapsed: started.elapsed(), deadline });
        if started.elapsed() >= deadline {
            screendump(run_dir).await;
            qemu.terminate(sysdeadline::QEMU_QUIT);
            let why = format!("the install did not finish within {deadline:?}");
            return Err(InstallError::TimedOut {
                waited: deadline,
                serial: serial.tail(20),
                evidence: keep_evidence(run_dir, artifacts, &cmdline, &why),
            });
        }
    };
    for line in serial.poll() {
        progress(Progress::Serial(line));
    }
    match verdict(&serial.all) {
        Some(Ok(ready)) => Ok(ready),
        Some(Err(line)) => {
            Err(InstallError::ProvisioningFailed { evidence: keep_evidence(run_dir, artifacts, &cmdline, &line), line })
        }
        None => {
            let output = std::fs::read_to_string(run_dir.join("qemu.out")).unwrap_or_default();
            let why = format!("QEMU exited ({status}) before the ready line");
            Err(InstallError::ExitedEarly {
                status: status.to_string(),
                output: crate::qemu::serial::tail_of(&output, 30),
                serial: serial.tail(20),
                evidence: keep_evidence(run_dir, artifacts, &cmdline, &why),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_lines_are_followed_and_the_verdict_found() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("serial.log");
        std::fs::write(&log, "quiesce: phase: installing the virtio guest tools\r\nquiesce: QUIESCE-WIN").unwrap();
        let mut f = SerialFollower::new(&log);
        assert_eq!(f.poll(), vec!["quiesce: phase: installing the virtio guest tools"]);
        assert!(verdict(&f.all).is_none());
        let mut more = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
        std::io::Write::write_all(&mut more, b"DOWS-READY build=20348 qemu-ga=109.1.0 vss=ok\r\n").unwrap();
        assert_eq!(f.poll().len(), 1);
        assert_eq!(verdict(&f.all), Some(Ok("QUIESCE-WINDOWS-READY build=20348 qemu-ga=109.1.0 vss=ok".into())));
        let failed = vec!["quiesce: QUIESCE-WINDOWS-FAILED msiexec exited with 1603".to_owned()];
        assert_eq!(verdict(&failed), Some(Err("QUIESCE-WINDOWS-FAILED msiexec exited with 1603".into())));
    }
}
