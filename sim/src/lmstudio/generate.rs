//! Simulated generation: reply length under a token limit, pacing by `token_delay`, counting
//! of active and cancelled generations, and the pump that feeds a prepared stream to the
//! client (or fails it on request).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc;

use super::wire::round3;
use super::LmStudioSim;

pub(super) const SIMULATED_FAILURE: &str =
    "The model crashed during generation (simulated failure).";

impl LmStudioSim {
    /// Reply length and finish reason for a `max_tokens`-style limit (`-1` = unlimited).
    pub(super) fn reply_len(&self, max: Option<i64>) -> (usize, bool) {
        match max {
            Some(m) if m >= 0 && (m as u64) < self.cfg.reply_tokens as u64 => (m as usize, true),
            _ => (self.cfg.reply_tokens, false),
        }
    }

    pub(super) fn tokens_per_second(&self) -> f64 {
        if self.cfg.token_delay.is_zero() {
            1000.0
        } else {
            round3(1.0 / self.cfg.token_delay.as_secs_f64())
        }
    }

    pub(super) fn take_stream_failure(&self) -> Option<usize> {
        self.lock().fail_stream_after.take()
    }

    /// Sleeps through a non-streamed generation of `n` tokens on `instance`, counted as active.
    pub(super) async fn generate(self: &Arc<Self>, instance: &str, n: usize) {
        let mut guard = GenGuard::start(self.clone(), instance);
        if !self.cfg.token_delay.is_zero() {
            for _ in 0..n {
                tokio::time::sleep(self.cfg.token_delay).await;
            }
        }
        guard.done = true;
    }

    /// Streams `tokens` (one `token_delay` before each), then `tail`; stops when the client
    /// goes away, or sends `error` after `fail_after` tokens and ends.
    pub(super) async fn pump(
        self: &Arc<Self>,
        instance: &str,
        tx: &mpsc::Sender<Bytes>,
        tokens: Vec<Bytes>,
        tail: Vec<Bytes>,
        error: Bytes,
        fail_after: Option<usize>,
    ) {
        let mut guard = GenGuard::start(self.clone(), instance);
        for (i, token) in tokens.into_iter().enumerate() {
            if fail_after == Some(i) {
                guard.done = true;
                let _ = tx.send(error).await;
                return;
            }
            if !self.cfg.token_delay.is_zero() {
                tokio::time::sleep(self.cfg.token_delay).await;
            }
            if tx.send(token).await.is_err() {
                return;
            }
        }
        guard.done = true;
        if fail_after.is_some() {
            let _ = tx.send(error).await;
            return;
        }
        send_all(tx, tail).await;
    }
}

/// Sends `items` in order; false as soon as the client has gone away.
pub(super) async fn send_all(
    tx: &mpsc::Sender<Bytes>,
    items: impl IntoIterator<Item = Bytes>,
) -> bool {
    for b in items {
        if tx.send(b).await.is_err() {
            return false;
        }
    }
    true
}

/// Counts a generation as active, overall and on its instance (what an unload request checks);
/// on drop before `done`, counts it as cancelled.
pub(super) struct GenGuard {
    sim: Arc<LmStudioSim>,
    instance: String,
    pub(super) done: bool,
}

impl GenGuard {
    pub(super) fn start(sim: Arc<LmStudioSim>, instance: &str) -> Self {
        sim.active.fetch_add(1, Ordering::SeqCst);
        *sim.lock().busy.entry(instance.to_string()).or_default() += 1;
        GenGuard {
            sim,
            instance: instance.to_string(),
            done: false,
        }
    }
}

impl Drop for GenGuard {
    fn drop(&mut self) {
        self.sim.active.fetch_sub(1, Ordering::SeqCst);
        if !self.done {
            self.sim.cancelled.fetch_add(1, Ordering::SeqCst);
        }
        let mut st = self.sim.lock();
        if let Some(n) = st.busy.get_mut(&self.instance) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                st.busy.remove(&self.instance);
            }
        }
    }
}
