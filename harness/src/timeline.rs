//! One timeline per run. Every layer records its steps here (start, end, VM, outcome);
//! reports and fixtures are views of it.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    Ok,
    Failed {
        error: String,
    },
    /// The step's future was dropped before it finished (Ctrl-C, or a sibling failed).
    Interrupted,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Step {
    /// The VM the step worked on, or none for job-wide steps.
    pub vm: Option<String>,
    pub name: String,
    pub start_ms: f64,
    pub end_ms: f64,
    pub outcome: Outcome,
}

#[derive(Clone)]
pub struct Timeline {
    inner: Arc<Inner>,
}

struct Inner {
    start: Instant,
    steps: Mutex<Vec<Step>>,
}

impl Default for Timeline {
    fn default() -> Self {
        Self::new()
    }
}

impl Timeline {
    pub fn new() -> Self {
        Self { inner: Arc::new(Inner { start: Instant::now(), steps: Mutex::new(Vec::new()) }) }
    }

    fn now_ms(&self) -> f64 {
        self.inner.start.elapsed().as_secs_f64() * 1000.0
    }

    /// Runs `fut` as a named step and records how it ended.
    pub async fn step<T, E: std::fmt::Display>(
        &self,
        vm: Option<&str>,
        name: &str,
        fut: impl Future<Output = Result<T, E>>,
    ) -> Result<T, E> {
        trace(vm, name);
        hold_if_asked(vm, name).await;
        let mut guard = StepGuard { tl: self, vm, name, start_ms: self.now_ms(), done: false };
        let result = fut.await;
        guard.done = true;
        let outcome = match &result {
            Ok(_) => Outcome::Ok,
            Err(e) => Outcome::Failed { error: e.to_string() },
        };
        self.push(vm, name, guard.start_ms, outcome);
        result
    }

    /// Records a step that took no time of its own (a phase boundary, a decision).
    pub fn mark(&self, vm: Option<&str>, name: &str) {
        let t = self.now_ms();
        self.push(vm, name, t, Outcome::Ok);
    }

    fn push(&self, vm: Option<&str>, name: &str, start_ms: f64, outcome: Outcome) {
        let step = Step { vm: vm.map(str::to_owned), name: name.to_owned(), start_ms, end_ms: self.now_ms(), outcome };
        self.inner.steps.lock().unwrap_or_else(|e| e.into_inner()).push(step);
    }

    pub fn steps(&self) -> Vec<Step> {
        self.inner.steps.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// With `QUIESCE_TRACE_STEPS` set, every step is written to stderr as it starts
/// (`quiesce-step: VM: NAME`): a marker another program can wait for, such as the test
/// that kills quiesce mid-backup.
fn trace(vm: Option<&str>, name: &str) {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if *ON.get_or_init(|| std::env::var_os("QUIESCE_TRACE_STEPS").is_some()) {
        eprintln!("quiesce-step: {}: {name}", vm.unwrap_or("(job)"));
    }
}

/// A point inside a step where a test may hold quiesce (see [`hold_if_asked`]), for code
/// that runs no step of its own there; traced like a step's start.
pub async fn hold_point(vm: Option<&str>, name: &str) {
    trace(vm, name);
    hold_if_asked(vm, name).await;
}

/// Test-only: with `QUIESCE_TEST_HOLD_AT="VM: STEP"`, that step never starts: quiesce
/// writes `quiesce-held: VM: STEP` to stderr and waits there for good. The tests that kill
/// quiesce with SIGKILL at a precise point of a backup (the guest frozen, the VM stopped)
/// use it, so they need no sleep to get there; nothing else sets it.
async fn hold_if_asked(vm: Option<&str>, name: &str) {
    static AT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let at = AT.get_or_init(|| std::env::var("QUIESCE_TEST_HOLD_AT").ok());
    let here = format!("{}: {name}", vm.unwrap_or("(job)"));
    if at.as_deref() == Some(here.as_str()) {
        eprintln!("quiesce-held: {here}");
        std::future::pending::<()>().await;
    }
}

struct StepGuard<'a> {
    tl: &'a Timeline,
    vm: Option<&'a str>,
    name: &'a str,
    start_ms: f64,
    done: bool,
}

impl Drop for StepGuard<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.tl.push(self.vm, self.name, self.start_ms, Outcome::Interrupted);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn records_ok_failed_and_interrupted_steps() {
        let tl = Timeline::new();
        tl.step(Some("vm1"), "ok", async { Ok::<_, String>(()) }).await.unwrap();
        tl.step(None, "bad", async { Err::<(), _>("boom".to_owned()) }).await.unwrap_err();
        let pending = tl.step(Some("vm2"), "slow", std::future::pending::<Result<(), String>>());
        let _ = tokio::time::timeout(std::time::Duration::from_millis(1), pending).await;
        let steps = tl.steps();
        assert_eq!(steps.len(), 3);
        assert_eq!(steps[0].outcome, Outcome::Ok);
        assert_eq!(steps[1].outcome, Outcome::Failed { error: "boom".into() });
        assert_eq!((steps[2].vm.as_deref(), &steps[2].outcome), (Some("vm2"), &Outcome::Interrupted));
        assert!(steps.iter().all(|s| s.end_ms >= s.start_ms));
    }
}
