//! Progress on stderr while a command works. On a terminal: one line, rewritten in place,
//! with the scenario, its current step and the time each has taken so far (a ticker keeps
//! the times moving while a step runs). In CI (stderr not a terminal, or `CI` set): plain
//! lines, each scenario's together, and on GitHub Actions folded into a group of its own.
//! Each scenario ends with a line of its own that stays: its result and time.

use std::io::{IsTerminal, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How often the terminal line is redrawn while a step runs.
const TICK: Duration = Duration::from_millis(250);

pub struct Progress {
    state: Arc<Mutex<State>>,
    ticker: Option<tokio::task::JoinHandle<()>>,
}

struct State {
    tty: bool,
    /// GitHub Actions folds the lines between `::group::` and `::endgroup::`.
    github: bool,
    start: Instant,
    scenario: Option<Scenario>,
    /// With -j: the scenarios running now, and since when; (finished, of) so far.
    running: Vec<(String, Instant)>,
    tally: (usize, usize),
    /// A line is on the terminal that the next write must replace.
    shown: bool,
}

struct Scenario {
    name: String,
    n: usize,
    of: usize,
    started: Instant,
    step: String,
    step_started: Instant,
}

impl Progress {
    pub fn new() -> Self {
        let ci = std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false" && v != "0");
        let github = std::env::var_os("GITHUB_ACTIONS").is_some_and(|v| v == "true");
        let state = State {
            tty: std::io::stderr().is_terminal() && !ci,
            github,
            start: Instant::now(),
            scenario: None,
            running: Vec::new(),
            tally: (0, 0),
            shown: false,
        };
        Self { state: Arc::new(Mutex::new(state)), ticker: None }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Scenario `n` of `of` begins. On a terminal, a ticker keeps its line's times moving.
    pub fn begin(&mut self, name: &str, n: usize, of: usize) {
        let now = Instant::now();
        let mut st = self.lock();
        st.scenario =
            Some(Scenario { name: name.to_owned(), n, of, started: now, step: "starting".into(), step_started: now });
        if st.tty {
            st.draw();
        } else {
            let mut err = std::io::stderr().lock();
            if st.github {
                let _ = writeln!(err, "::group::[{n}/{of}] {name}");
            }
            let _ = writeln!(err, "[{n}/{of}] {name}");
        }
        drop(st);
        self.tick();
    }

    /// What is being done now. A scenario's runner says `NAME: what`; the name is already
    /// on the line, so it is left out.
    pub fn step(&mut self, what: &str) {
        let mut st = self.lock();
        let t = st.start.elapsed().as_secs_f64();
        let Some(sc) = st.scenario.as_mut() else {
            // Not in a scenario (doctor, vm, image): a line of its own, or the line replaced.
            if st.tty {
                st.put(&format!("[{t:5.1}s] {what}"));
            } else {
                let _ = writeln!(std::io::stderr(), "[{t:5.1}s] {what}");
            }
            return;
        };
        let what = what.strip_prefix(sc.name.as_str()).and_then(|w| w.strip_prefix(": ")).unwrap_or(what);
        sc.step = what.to_owned();
        sc.step_started = Instant::now();
        let line = format!("  [{:6.1}s] {}", sc.started.elapsed().as_secs_f64(), sc.step);
        if st.tty {
            st.draw();
        } else {
            let _ = writeln!(std::io::stderr(), "{line}");
        }
    }

    /// The scenario ended: its result (`passed`, `FAILED`, `skipped`) stays on a line of its own.
    pub fn end(&mut self, result: &str) {
        let mut st = self.lock();
        let Some(sc) = st.scenario.take() else { return };
        let line = format!("[{}/{}] {}: {result} ({:.1}s)", sc.n, sc.of, sc.name, sc.started.elapsed().as_secs_f64());
        st.clear();
        let mut err = std::io::stderr().lock();
        if st.github && !st.tty {
            let _ = writeln!(err, "::endgroup::");
        }
        let _ = writeln!(err, "{line}");
    }

    /// With -j: a scenario began. Nothing stays on screen for it until it has finished; on a
    /// terminal, one line, rewritten in place, names the ones running.
    pub fn started(&mut self, name: &str, of: usize) {
        let mut st = self.lock();
        st.tally.1 = of;
        st.running.push((name.to_owned(), Instant::now()));
        if st.tty {
            st.draw();
        }
        drop(st);
        self.tick();
    }

    /// With -j: a scenario ended, the `done`-th of `of` to do so; its line stays.
    pub fn finished(&mut self, name: &str, done: usize, of: usize, result: &str, secs: f64) {
        let mut st = self.lock();
        st.running.retain(|(n, _)| n != name);
        st.tally = (done, of);
        st.clear();
        let _ = writeln!(std::io::stderr().lock(), "[{done}/{of}] {name}: {result} ({secs:.1}s)");
        if st.tty && !st.running.is_empty() {
            st.draw();
        }
    }

    /// On a terminal, a ticker keeps the times on the line moving.
    fn tick(&mut self) {
        if self.lock().tty && self.ticker.is_none() && tokio::runtime::Handle::try_current().is_ok() {
            let state = Arc::clone(&self.state);
            self.ticker = Some(tokio::spawn(async move {
                let mut every = tokio::time::interval(TICK);
                loop {
                    every.tick().await;
                    let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
                    if st.scenario.is_some() || !st.running.is_empty() {
                        st.draw();
                    }
                }
            }));
        }
    }

    /// Ends the in-place line so normal output starts on a fresh line.
    pub fn finish(&mut self) {
        if let Some(t) = self.ticker.take() {
            t.abort();
        }
        self.lock().clear();
    }
}

impl State {
    /// Redraws the scenario's line: where it is, its step, and how long each has run.
    fn draw(&mut self) {
        if self.scenario.is_none() && !self.running.is_empty() {
            let (done, of) = self.tally;
            let names: Vec<String> =
                self.running.iter().map(|(n, since)| format!("{n} ({:.0}s)", since.elapsed().as_secs_f64())).collect();
            let line =
                format!("[{done}/{of} done, {:.0}s] running: {}", self.start.elapsed().as_secs_f64(), names.join(", "));
            self.put(&line);
            return;
        }
        let Some(sc) = &self.scenario else { return };
        let line = format!(
            "[{}/{} {:.1}s] {}: {} ({:.1}s)",
            sc.n,
            sc.of,
            sc.started.elapsed().as_secs_f64(),
            sc.name,
            sc.step,
            sc.step_started.elapsed().as_secs_f64()
        );
        self.put(&line);
    }

    /// Replaces the terminal line with `line`, cut to the terminal's width (a wrapped line
    /// could not be replaced).
    fn put(&mut self, line: &str) {
        let width = std::env::var("COLUMNS").ok().and_then(|c| c.parse::<usize>().ok()).unwrap_or(100).max(20);
        let line = fit(line, width - 1);
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r\x1b[K{line}");
        let _ = err.flush();
        self.shown = true;
    }

    fn clear(&mut self) {
        if self.tty && self.shown {
            let _ = write!(std::io::stderr(), "\r\x1b[K");
            self.shown = false;
        }
    }
}

/// At most `width` characters of `line` (an ellipsis marks a cut).
fn fit(line: &str, width: usize) -> String {
    if line.chars().count() <= width {
        return line.to_owned();
    }
    let mut s: String = line.chars().take(width.saturating_sub(1)).collect();
    s.push('…');
    s
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::fit;

    #[test]
    fn a_line_is_cut_to_the_terminal() {
        assert_eq!(fit("abcdef", 6), "abcdef");
        assert_eq!(fit("abcdefg", 6), "abcde…");
    }
}
