//! The QMP event queue. Waiting for an event also finds one that arrived before the wait
//! began (as QEMU's python `event_wait` does), so no event is missed between a command and
//! the wait for its consequence.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::Notify;
use tokio::time::Instant;

/// Events kept before the oldest are dropped; a runaway guest cannot exhaust memory.
const CAPACITY: usize = 4096;

#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub name: String,
    pub data: Value,
    /// QEMU's own timestamp, seconds since the epoch.
    pub timestamp: Option<f64>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum WaitError {
    /// The event did not come in time: what it marks did not happen, or not yet.
    #[error("no {name} event within {waited:?}")]
    Timeout { name: String, waited: Duration },
    /// QEMU closed the connection (exited or crashed) before the event came.
    #[error("the connection closed before a {name} event came")]
    Closed { name: String },
}

#[derive(Default)]
struct State {
    events: VecDeque<Event>,
    dropped: u64,
    closed: bool,
}

#[derive(Default)]
pub struct EventQueue {
    state: Mutex<State>,
    notify: Notify,
}

impl EventQueue {
    pub fn push(&self, event: Event) {
        let mut st = self.lock();
        if st.events.len() == CAPACITY {
            st.events.pop_front();
            st.dropped += 1;
        }
        st.events.push_back(event);
        drop(st);
        self.notify.notify_waiters();
    }

    /// Marks the stream as ended: waiters fail at once instead of running to their deadline.
    pub fn close(&self) {
        self.lock().closed = true;
        self.notify.notify_waiters();
    }

    /// A copy of every queued event, oldest first.
    pub fn snapshot(&self) -> Vec<Event> {
        self.lock().events.iter().cloned().collect()
    }

    /// Removes and returns all queued events with this name.
    pub fn drain(&self, name: &str) -> Vec<Event> {
        let mut st = self.lock();
        let (hit, keep): (VecDeque<Event>, VecDeque<Event>) = st.events.drain(..).partition(|e| e.name == name);
        st.events = keep;
        hit.into()
    }

    /// Waits for the first event named `name` whose data satisfies `matches`, including
    /// events that are already queued, and removes it from the queue.
    pub async fn wait(
        &self,
        name: &str,
        matches: impl Fn(&Value) -> bool,
        timeout: Duration,
    ) -> Result<Event, WaitError> {
        let deadline = Instant::now() + timeout;
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut st = self.lock();
                if let Some(i) = st.events.iter().position(|e| e.name == name && matches(&e.data)) {
                    return Ok(st.events.remove(i).expect("index from position"));
                }
                if st.closed {
                    return Err(WaitError::Closed { name: name.to_owned() });
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(WaitError::Timeout { name: name.to_owned(), waited: timeout });
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic elsewhere while holding the lock leaves plain data behind; keep using it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::sync::Arc;

    fn ev(name: &str, data: Value) -> Event {
        Event { name: name.into(), data, timestamp: None }
    }

    #[tokio::test]
    async fn finds_an_event_that_came_before_the_wait() {
        let q = EventQueue::default();
        q.push(ev("STOP", json!({})));
        let got = q.wait("STOP", |_| true, Duration::from_millis(10)).await.unwrap();
        assert_eq!(got.name, "STOP");
        // It was consumed: a second wait needs a second event.
        assert!(q.wait("STOP", |_| true, Duration::from_millis(10)).await.is_err());
    }

    #[tokio::test]
    async fn match_filters_on_data() {
        let q = EventQueue::default();
        q.push(ev("JOB_STATUS_CHANGE", json!({"id": "a", "status": "running"})));
        q.push(ev("JOB_STATUS_CHANGE", json!({"id": "a", "status": "ready"})));
        let got = q.wait("JOB_STATUS_CHANGE", |d| d["status"] == "ready", Duration::from_millis(10)).await.unwrap();
        assert_eq!(got.data["status"], "ready");
        assert_eq!(q.snapshot().len(), 1);
    }

    #[tokio::test]
    async fn wakes_on_a_later_event() {
        let q = Arc::new(EventQueue::default());
        let q2 = q.clone();
        let waiter = tokio::spawn(async move { q2.wait("RESUME", |_| true, Duration::from_secs(5)).await });
        tokio::task::yield_now().await;
        q.push(ev("RESUME", Value::Null));
        assert_eq!(waiter.await.unwrap().unwrap().name, "RESUME");
    }

    #[tokio::test]
    async fn timeout_names_what_was_awaited() {
        let q = EventQueue::default();
        let err = q.wait("SHUTDOWN", |_| true, Duration::from_millis(5)).await.unwrap_err();
        assert_eq!(err.to_string(), "no SHUTDOWN event within 5ms");
    }

    #[tokio::test]
    async fn close_fails_waiters_at_once() {
        let q = Arc::new(EventQueue::default());
        let q2 = q.clone();
        let waiter = tokio::spawn(async move { q2.wait("X", |_| true, Duration::from_secs(60)).await });
        tokio::task::yield_now().await;
        q.close();
        assert_eq!(waiter.await.unwrap().unwrap_err(), WaitError::Closed { name: "X".into() });
    }

    #[test]
    fn capacity_is_bounded() {
        let q = EventQueue::default();
        for i in 0..CAPACITY + 10 {
            q.push(ev("E", json!(i)));
        }
        let all = q.snapshot();
        assert_eq!(all.len(), CAPACITY);
        assert_eq!(all[0].data, json!(10));
    }
}
