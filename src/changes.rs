//! A change counter that owners bump when something they publish changes, and that readers
//! wait on: the node view's sequence number and its change stream (`fleet::view`).
//!
//! Why not a `watch` channel: the lease fast path (`lifecycle::gate`) wakes it on every
//! lease taken and given back, and `watch::Sender::send_modify` takes a write lock shared by
//! every request. Here the fast path only [`Changes::wake`]s: one load of a word that
//! changes when an SSE client comes or goes, and a wake-up only while one listens. Its own
//! count is the lifecycle's use sequence, which it bumps anyway, and which the node view
//! adds to this counter ([`Changes::ring`]: the actors after a change of their table, the
//! monitor's samples).
//!
//! The sum may rise without a visible change (a lease taken and given back between two
//! reads, a poll that stamped models): readers compare what they build, the number only
//! says "look again".

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::SeqCst};

use tokio::sync::Notify;

/// Rung by owners, waited on by readers. Shared as `Arc<Changes>`.
#[derive(Debug, Default)]
pub struct Changes {
    seq: AtomicU64,
    listeners: AtomicUsize,
    notify: Notify,
}

impl Changes {
    pub fn new() -> Self {
        Self::default()
    }

    /// Something an owner publishes changed: count it and wake the listeners.
    pub fn ring(&self) {
        self.seq.fetch_add(1, SeqCst);
        self.wake();
    }

    /// Wakes the listeners, for an owner that counts its changes itself (with a `SeqCst`
    /// increment before this call, which a woken listener then sees).
    pub fn wake(&self) {
        if self.listeners.load(SeqCst) > 0 {
            self.notify.notify_waiters();
        }
    }

    /// How many times it was rung: read it before reading what it guards, and the state
    /// read is at least as new as the number.
    pub fn seq(&self) -> u64 {
        self.seq.load(SeqCst)
    }

    /// Waits until the counter differs from `seen` (at once if it already does), and
    /// answers the new value.
    pub async fn changed(&self, seen: u64) -> u64 {
        self.wait_for(|| Some(self.seq()).filter(|now| *now != seen))
            .await
    }

    /// Waits until `check` answers `Some` (asked at once, then after each ring or wake),
    /// for a reader whose number adds other owners' counters to this one.
    pub async fn wait_for<T>(&self, mut check: impl FnMut() -> Option<T>) -> T {
        let _listening = Listening::new(&self.listeners);
        loop {
            let notified = self.notify.notified();
            let mut notified = std::pin::pin!(notified);
            // Registered before the counters are read: a change after this read wakes it.
            notified.as_mut().enable();
            if let Some(v) = check() {
                return v;
            }
            notified.await;
        }
    }
}

/// Counts a waiter while it waits, so that [`Changes::ring`] wakes only when one does.
struct Listening<'a>(&'a AtomicUsize);

impl<'a> Listening<'a> {
    fn new(n: &'a AtomicUsize) -> Self {
        n.fetch_add(1, SeqCst);
        Listening(n)
    }
}

impl Drop for Listening<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn a_ring_wakes_a_waiter_and_a_seen_change_answers_at_once() {
        let c = Arc::new(Changes::new());
        assert_eq!(c.seq(), 0);
        c.ring();
        assert_eq!(c.changed(0).await, 1, "already changed since 0: no wait");
        let waiter = tokio::spawn({
            let c = c.clone();
            async move { c.changed(1).await }
        });
        // Ring until the waiter has seen it (it may not have registered yet: then the
        // counter it reads already differs).
        tokio::task::yield_now().await;
        c.ring();
        let got = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .expect("joined");
        assert_eq!(got, 2);
        assert_eq!(c.listeners.load(SeqCst), 0, "the waiter unregistered");
    }
}
