//! The guest's serial console: written to a log file as it arrives, with the recent part
//! kept in memory so the harness can wait for a line (with a deadline) and quote the tail
//! in errors.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::UnixStream;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// How much of the console is kept in memory for waits and error messages.
const KEPT: usize = 256 << 10;

#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    #[error("{what:?} did not appear on the serial console within {waited:?}; last lines:\n{tail}")]
    Timeout { what: String, waited: Duration, tail: String },
    #[error("the serial console closed (QEMU exited) before {what:?} appeared; last lines:\n{tail}")]
    Closed { what: String, tail: String },
}

#[derive(Default)]
struct State {
    text: String,
    closed: bool,
}

struct Shared {
    state: Mutex<State>,
    notify: Notify,
}

pub struct SerialConsole {
    shared: Arc<Shared>,
    path: PathBuf,
    task: JoinHandle<()>,
}

impl SerialConsole {
    pub fn spawn(mut stream: UnixStream, log: &Path) -> std::io::Result<Self> {
        let mut file = File::create(log)?;
        let shared = Arc::new(Shared { state: Mutex::new(State::default()), notify: Notify::new() });
        let s = shared.clone();
        let task = tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            loop {
                let n = match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                // The log is evidence, best effort; the in-memory copy drives the waits.
                let _ = file.write_all(&buf[..n]);
                let mut st = s.state.lock().unwrap_or_else(|e| e.into_inner());
                st.text.push_str(&String::from_utf8_lossy(&buf[..n]));
                if st.text.len() > KEPT {
                    let mut cut = st.text.len() - KEPT / 2;
                    while !st.text.is_char_boundary(cut) {
                        cut += 1;
                    }
                    st.text.drain(..cut);
                }
                drop(st);
                s.notify.notify_waiters();
            }
            s.state.lock().unwrap_or_else(|e| e.into_inner()).closed = true;
            s.notify.notify_waiters();
        });
        Ok(Self { shared, path: log.to_owned(), task })
    }

    pub fn log_path(&self) -> &Path {
        &self.path
    }

    /// Waits until `needle` has appeared anywhere in the kept console output.
    pub async fn wait_for(&self, needle: &str, timeout: Duration) -> Result<(), SerialError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.shared.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let st = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
                if st.text.contains(needle) {
                    return Ok(());
                }
                if st.closed {
                    return Err(SerialError::Closed { what: needle.to_owned(), tail: tail_of(&st.text, 20) });
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(SerialError::Timeout { what: needle.to_owned(), waited: timeout, tail: self.tail(20) });
            }
        }
    }

    pub fn contains(&self, needle: &str) -> bool {
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner()).text.contains(needle)
    }

    /// The last `lines` lines of the console.
    pub fn tail(&self, lines: usize) -> String {
        tail_of(&self.shared.state.lock().unwrap_or_else(|e| e.into_inner()).text, lines)
    }
}

impl Drop for SerialConsole {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub fn tail_of(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn waits_for_a_line_and_logs_everything() {
        let dir = tempfile::tempdir().unwrap();
        let (mut a, b) = UnixStream::pair().unwrap();
        let con = SerialConsole::spawn(b, &dir.path().join("serial.log")).unwrap();
        a.write_all(b"booting\nQUIESCE-GUEST").await.unwrap();
        a.write_all(b"-READY\n").await.unwrap();
        con.wait_for("QUIESCE-GUEST-READY", Duration::from_secs(5)).await.unwrap();
        drop(a);
        let err = con.wait_for("never", Duration::from_secs(5)).await.unwrap_err();
        assert!(matches!(err, SerialError::Closed { .. }), "{err}");
        assert_eq!(std::fs::read_to_string(con.log_path()).unwrap(), "booting\nQUIESCE-GUEST-READY\n");
        assert_eq!(con.tail(1), "QUIESCE-GUEST-READY");
    }
}
