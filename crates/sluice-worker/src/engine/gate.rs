//! The barrier between delivery windows (an exactly-once transaction's, see
//! `delivery/exactly_once.rs`): dispatchers hold it shared while they register a batch
//! (never while they wait for room in a worker lane: see `engine/dispatch.rs`); the
//! window's end holds it exclusively while it drains and commits.

use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::{Notify, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// The barrier. tokio's lock is fair: once the window's end waits to close it, no new
/// dispatch starts. A window may also admit at most a budget of records (see
/// [`WindowGate::set_budget`]); a dispatch past it waits for the next window.
#[derive(Debug)]
pub struct WindowGate {
    lock: RwLock<()>,
    /// Records admitted in the current window.
    admitted: AtomicUsize,
    /// Most records one window admits (`usize::MAX`: no limit).
    budget: AtomicUsize,
    /// A new window began.
    reopened: Notify,
}

impl Default for WindowGate {
    fn default() -> Self {
        WindowGate {
            lock: RwLock::new(()),
            admitted: AtomicUsize::new(0),
            budget: AtomicUsize::new(usize::MAX),
            reopened: Notify::new(),
        }
    }
}

impl WindowGate {
    /// Dispatch one batch of `records` (shared). The first batch of a window is always
    /// admitted, so a budget smaller than a batch still makes progress.
    pub async fn enter(&self, records: usize) -> RwLockReadGuard<'_, ()> {
        loop {
            let reopened = self.reopened.notified();
            tokio::pin!(reopened);
            reopened.as_mut().enable();
            let inside = self.lock.read().await;
            let budget = self.budget.load(Ordering::Acquire);
            let before = self.admitted.fetch_add(records, Ordering::AcqRel);
            if before == 0 || before.saturating_add(records) <= budget {
                return inside;
            }
            self.admitted.fetch_sub(records, Ordering::AcqRel);
            drop(inside);
            reopened.await;
        }
    }

    /// Stop dispatch (exclusive), once every dispatch in progress has registered its batch.
    pub async fn close(&self) -> RwLockWriteGuard<'_, ()> {
        self.lock.write().await
    }

    /// Records admitted in the current window.
    pub fn admitted(&self) -> usize {
        self.admitted.load(Ordering::Acquire)
    }

    /// The window ended (call while holding [`WindowGate::close`]'s guard): the next one
    /// admits from zero.
    pub fn next_window(&self) {
        self.admitted.store(0, Ordering::Release);
        self.reopened.notify_waiters();
    }

    /// Admit at most `records` per window (`None`: no limit).
    pub fn set_budget(&self, records: Option<usize>) {
        self.budget
            .store(records.unwrap_or(usize::MAX), Ordering::Release);
    }

    /// The current budget (`None`: no limit).
    pub fn budget(&self) -> Option<usize> {
        let b = self.budget.load(Ordering::Acquire);
        (b != usize::MAX).then_some(b)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    /// The gate: once the coordinator waits to close it, a new dispatch waits until the
    /// window committed; a dispatch in progress finishes first.
    #[tokio::test]
    async fn the_gate_lets_dispatch_in_progress_finish_and_holds_new_dispatch() {
        let gate = Arc::new(WindowGate::default());
        let order = Arc::new(std::sync::Mutex::new(Vec::new()));
        let inside = gate.enter(1).await;
        let (g2, o2) = (gate.clone(), order.clone());
        let closer = tokio::spawn(async move {
            let _closed = g2.close().await;
            o2.lock().unwrap().push("commit");
            tokio::time::sleep(Duration::from_millis(20)).await;
        });
        tokio::task::yield_now().await;
        assert!(
            !closer.is_finished(),
            "a dispatch in progress holds the barrier"
        );
        let (g3, o3) = (gate.clone(), order.clone());
        let late = tokio::spawn(async move {
            let _in = g3.enter(1).await;
            o3.lock().unwrap().push("late dispatch");
        });
        tokio::task::yield_now().await;
        assert!(order.lock().unwrap().is_empty());
        drop(inside);
        closer.await.unwrap();
        late.await.unwrap();
        assert_eq!(*order.lock().unwrap(), ["commit", "late dispatch"]);
    }

    /// N8: a window admits at most its budget; what is past it waits for the next window
    /// (the first batch of a window always goes in).
    #[tokio::test]
    async fn a_window_admits_at_most_its_budget_and_the_rest_waits_for_the_next() {
        let gate = Arc::new(WindowGate::default());
        gate.set_budget(Some(600));
        drop(gate.enter(512).await);
        let g2 = gate.clone();
        let late = tokio::spawn(async move {
            drop(g2.enter(512).await);
        });
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            !late.is_finished(),
            "past the budget: waits for the next window"
        );
        {
            let _closed = gate.close().await;
            gate.next_window();
        }
        late.await.unwrap();
        assert_eq!(gate.admitted(), 512);
        gate.set_budget(Some(100));
        {
            let _closed = gate.close().await;
            gate.next_window();
        }
        drop(gate.enter(512).await);
        assert_eq!(
            gate.admitted(),
            512,
            "the first batch of a window always goes in"
        );
    }
}
