//! A program a test starts and watches: one of its outputs is read line by line on a thread
//! of its own, so the test can wait, under a deadline, for the line that says the program
//! got where the test wants to act on it (a hold point, a step done, a domain running),
//! then kill or interrupt it there. Everything it said is kept for the test's messages.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::process::Stdio;
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use quiesce::sys::{Child, Spawn};

/// Which of the program's outputs is watched; the other goes to /dev/null.
#[derive(Clone, Copy)]
pub enum Output {
    Stdout,
    Stderr,
}

pub struct Watched {
    pub child: Child,
    lines: Receiver<String>,
    /// Every line read so far.
    pub seen: String,
}

impl Watched {
    pub fn start(spawn: Spawn, output: Output) -> Watched {
        let spawn = match output {
            Output::Stdout => spawn.stdout(Stdio::piped()).stderr(Stdio::null()),
            Output::Stderr => spawn.stdout(Stdio::null()).stderr(Stdio::piped()),
        };
        let mut child = spawn.spawn().expect("the watched program starts");
        let pipe: Box<dyn Read + Send> = match output {
            Output::Stdout => Box::new(child.take_stdout().expect("piped stdout")),
            Output::Stderr => Box::new(child.take_stderr().expect("piped stderr")),
        };
        let (tx, lines) = channel();
        // Ends at the pipe's end (the program exited) or when the test drops the receiver.
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Watched { child, lines, seen: String::new() }
    }

    fn take(&mut self, line: &str) {
        self.seen.push_str(line);
        self.seen.push('\n');
    }

    /// Reads lines until one satisfies `found` and returns it. If none comes within
    /// `within` (or the program ends first), the program is killed and the test fails,
    /// saying it waited for `what` and showing all the program said.
    pub fn until(&mut self, what: &str, within: Duration, found: impl Fn(&str) -> bool) -> String {
        let start = Instant::now();
        loop {
            let Ok(line) = self.lines.recv_timeout(within.saturating_sub(start.elapsed())) else {
                self.child.kill();
                panic!("the program never said {what} within {within:?}; it said:\n{}", self.seen);
            };
            self.take(&line);
            if found(&line) {
                return line;
            }
        }
    }

    /// Kills it with SIGKILL, checks that this is what it died of, and returns all it said.
    pub fn kill(mut self) -> String {
        let status = self.child.kill().expect("the program dies of SIGKILL");
        assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(9), "{}", self.seen);
        eprintln!("{}", self.seen);
        self.seen
    }

    /// After the program ended: the lines still in the pipe, read for at most `within`.
    pub fn drain(&mut self, within: Duration) {
        while let Ok(line) = self.lines.recv_timeout(within) {
            self.take(&line);
        }
    }
}
