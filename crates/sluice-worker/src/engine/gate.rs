//! The barrier between delivery windows (an exactly-once transaction's, see
//! `delivery/exactly_once.rs`): dispatchers hold it shared while they register and hand
//! over a batch; the window's end holds it exclusively while it drains and commits.

use tokio::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

/// The barrier. tokio's lock is fair: once the window's end waits to close it, no new
/// dispatch starts.
#[derive(Debug, Default)]
pub struct WindowGate(RwLock<()>);

impl WindowGate {
    /// Dispatch one batch (shared).
    pub async fn enter(&self) -> RwLockReadGuard<'_, ()> {
        self.0.read().await
    }

    /// Stop dispatch (exclusive), once every dispatch in progress has handed its batch over.
    pub async fn close(&self) -> RwLockWriteGuard<'_, ()> {
        self.0.write().await
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
        let inside = gate.enter().await;
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
            let _in = g3.enter().await;
            o3.lock().unwrap().push("late dispatch");
        });
        tokio::task::yield_now().await;
        assert!(order.lock().unwrap().is_empty());
        drop(inside);
        closer.await.unwrap();
        late.await.unwrap();
        assert_eq!(*order.lock().unwrap(), ["commit", "late dispatch"]);
    }
}
