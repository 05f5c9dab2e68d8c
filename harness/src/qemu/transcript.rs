//! A transcript of everything said on QMP and to the guest agent, with times relative to
//! the machine's start. It is the first thing to read when a run fails.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Longer lines (query-qmp-schema, guest-exec output) are cut in the transcript only.
const MAX_LOGGED: usize = 2048;

#[derive(Clone)]
pub struct Transcript {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    start: Instant,
    out: Mutex<BufWriter<File>>,
}

impl Transcript {
    pub fn create(path: &Path) -> std::io::Result<Self> {
        let out = Mutex::new(BufWriter::new(File::create(path)?));
        Ok(Self { inner: Arc::new(Inner { path: path.to_owned(), start: Instant::now(), out }) })
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Records one line; `channel` is e.g. "qmp", `dir` is "->" (sent) or "<-" (received).
    pub fn record(&self, channel: &str, dir: &str, text: &[u8]) {
        let t = self.inner.start.elapsed().as_secs_f64();
        let shown = &text[..text.len().min(MAX_LOGGED)];
        let mut out = self.inner.out.lock().unwrap_or_else(|e| e.into_inner());
        // Transcript writes are best effort: a full disk must not fail the backup itself.
        let _ = write!(out, "{t:10.4} {channel} {dir} {}", String::from_utf8_lossy(shown));
        if text.len() > MAX_LOGGED {
            let _ = write!(out, " …({} bytes)", text.len());
        }
        let _ = writeln!(out);
        let _ = out.flush();
    }

    pub fn note(&self, channel: &str, text: &str) {
        self.record(channel, "--", text.as_bytes());
    }
}
