//! One progress line on stderr: rewritten in place on a terminal, plain lines otherwise
//! (CI logs).

use std::io::{IsTerminal, Write};
use std::time::Instant;

pub struct Progress {
    tty: bool,
    start: Instant,
    shown: bool,
}

impl Progress {
    pub fn new() -> Self {
        Self { tty: std::io::stderr().is_terminal(), start: Instant::now(), shown: false }
    }

    pub fn step(&mut self, what: &str) {
        let t = self.start.elapsed().as_secs_f64();
        let mut err = std::io::stderr().lock();
        if self.tty {
            let _ = write!(err, "\r\x1b[K[{t:5.1}s] {what}");
            self.shown = true;
        } else {
            let _ = writeln!(err, "[{t:5.1}s] {what}");
        }
        let _ = err.flush();
    }

    /// Ends the in-place line so normal output starts on a fresh line.
    pub fn finish(&mut self) {
        if self.tty && self.shown {
            let _ = write!(std::io::stderr(), "\r\x1b[K");
            self.shown = false;
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}
