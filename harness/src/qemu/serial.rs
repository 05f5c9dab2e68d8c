//! The guest's serial console, written to a file by QEMU itself (`-chardev file`), so the log
//! is complete on every path, including a harness that panics or is killed. Readiness is
//! decided by the guest agent answering, not by scraping the console; the console is
//! evidence, quoted in errors.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// How much of the end of the log is read for a tail.
const TAIL_BYTES: u64 = 64 << 10;

pub struct SerialLog {
    path: PathBuf,
}

impl SerialLog {
    pub fn new(path: &Path) -> Self {
        Self { path: path.to_owned() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The last `lines` lines of the console.
    pub fn tail(&self, lines: usize) -> String {
        tail_of(&self.read_end(), lines)
    }

    fn read_end(&self) -> String {
        let Ok(mut f) = std::fs::File::open(&self.path) else { return String::new() };
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = f.seek(SeekFrom::Start(len.saturating_sub(TAIL_BYTES)));
        let mut buf = Vec::new();
        let _ = f.take(TAIL_BYTES).read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    }
}

pub fn tail_of(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().map(|l| l.trim_end_matches('\r')).collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_reads_the_end_of_a_large_log() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("serial.log");
        let mut text = "x\r\n".repeat(100_000);
        text.push_str("booting\r\nQUIESCE-GUEST-READY\r\n");
        std::fs::write(&p, text).unwrap();
        let log = SerialLog::new(&p);
        assert_eq!(log.tail(2), "booting\nQUIESCE-GUEST-READY");
        assert_eq!(SerialLog::new(&dir.path().join("none")).tail(5), "");
    }
}
