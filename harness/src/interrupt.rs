//! An interruption of a run (the CLI wires SIGINT and SIGTERM to it). Work that must not be
//! left half-done (a frozen guest, a saved VM, an unmerged overlay) races its steps against
//! it and, when it fires, puts every VM back before returning.

use std::sync::Arc;

use tokio::sync::watch;

#[derive(Clone)]
pub struct Interrupt {
    tx: Arc<watch::Sender<bool>>,
}

impl std::fmt::Debug for Interrupt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Interrupt({})", self.is_triggered())
    }
}

impl Default for Interrupt {
    fn default() -> Self {
        Self::new()
    }
}

impl Interrupt {
    pub fn new() -> Self {
        Self { tx: Arc::new(watch::channel(false).0) }
    }

    pub fn trigger(&self) {
        self.tx.send_replace(true);
    }

    pub fn is_triggered(&self) -> bool {
        *self.tx.borrow()
    }

    /// Completes once the interruption has fired (at once if it already has).
    pub async fn fired(&self) {
        let mut rx = self.tx.subscribe();
        // The sender lives as long as self, so this only ends when the value is true.
        let _ = rx.wait_for(|v| *v).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn fires_for_waiters_before_and_after() {
        let i = Interrupt::new();
        let j = i.clone();
        let waiter = tokio::spawn(async move { j.fired().await });
        tokio::task::yield_now().await;
        i.trigger();
        waiter.await.unwrap();
        i.fired().await;
        assert!(i.is_triggered());
    }
}
