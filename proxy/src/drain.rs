//! Graceful shutdown. On SIGTERM the proxy says it is no longer ready (`/ready` fails at
//! once, so no new peer traffic is sent its way) but keeps carrying traffic: the app's
//! in-flight and new outbound requests still work while it shuts down — its shutdown
//! hooks often make calls (linkerd2#10379, istio#7136). The proxy exits when the app's
//! traffic has drained (no open app connection, no request or tunnel in flight) or
//! when the grace period ends, whichever comes first.
//!
//! Work in progress holds an [`Active`] guard; dropping the last one while draining
//! wakes the waiter (after ztunnel's RAII drain).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tokio::sync::Notify;

/// Shared shutdown state: whether the proxy is draining, and how much work is open.
#[derive(Debug, Default)]
pub struct Drain {
    draining: AtomicBool,
    active: AtomicUsize,
    idle: Notify,
}

impl Drain {
    /// Marks the proxy as draining: `/ready` fails from now on.
    pub fn start(&self) {
        self.draining.store(true, Ordering::SeqCst);
        self.idle.notify_waiters();
    }

    /// Whether [`Drain::start`] was called.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Counts one piece of work (an app connection, a request, a tunnel) until the
    /// guard is dropped.
    pub fn track(self: &Arc<Self>) -> Active {
        self.active.fetch_add(1, Ordering::SeqCst);
        Active(self.clone())
    }

    /// The work open now.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }

    /// Resolves once no work is open.
    pub async fn idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.active() == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// One piece of open work; see [`Drain::track`].
#[derive(Debug)]
pub struct Active(Arc<Drain>);

impl Drop for Active {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn idle_waits_for_the_last_guard() {
        let drain = Arc::new(Drain::default());
        let (a, b) = (drain.track(), drain.track());
        drain.start();
        assert!(drain.is_draining());
        let waiter = tokio::spawn({
            let drain = drain.clone();
            async move { drain.idle().await }
        });
        drop(a);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(b);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("idle once the last guard is gone")
            .unwrap();
    }
}
