//! The lease fast path: a request for a model that is ready takes its lease with one atomic
//! compare-and-swap, without a round trip to the actor.
//!
//! Measured before this existed (callgrind and strace on the release build, `POST /api/chat`
//! one at a time): every request asked the actor for its lease and told it when done, two
//! hops between tasks that usually ran on different worker threads, so each request also
//! paid about three `futex` wake-ups and one `eventfd` write, and the actor's share of the
//! proxy's instructions was 7%. Pass-through requests, which take no lease, had none.
//!
//! Each model has a [`Gate`]: one word holding an `OPEN` bit and the count of leases taken
//! through it. The actor alone opens and closes it, after every event: open exactly when a
//! new request could be granted at once ([`Actor::grantable_now`]'s rule, less models whose
//! idle timeout is zero, which must hear of every release). Requests that give Ollama's
//! `keep_alive` (a hint the actor records) go the slow way.
//!
//! How the invariants of `lifecycle` survive:
//! - **no unload while a lease is out**: an unload starts only through
//!   [`Gate::close_if_idle`], a compare-and-swap that closes the gate only if it counts no
//!   lease. From then on [`Gate::try_take`] fails, so a lease is either counted before the
//!   close (and the unload does not start) or not taken at all (and the request goes to the
//!   actor, which queues it);
//! - **the actor learns when a closed model drains**: the release that brings a closed
//!   gate's count to zero sends `Drained`; releases through an open gate send nothing,
//!   unless the gate is *watched* (a request is queued for a model it cannot have yet, under
//!   any queue policy): then its last release sends `Drained` too, and the actor schedules in
//!   that step instead of at the next poll;
//! - **the idle timer starts when the last lease drops**: each release stores its time;
//!   the actor reads it when its timer fires and, if the model was used since, sleeps
//!   until the new deadline (while leases are out it looks again one timeout later);
//! - **least recently used**: takes and releases stamp the same sequence the actor uses.
//!
//! [`Actor::grantable_now`]: super::actor

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::Event;

const OPEN: u64 = 1 << 63;
/// Set while a request waits for a model it cannot have yet: then the release that brings
/// the count to zero tells the actor even through an open gate (the model in the way may be
/// the one to evict). Without it the actor heard of an open gate's last release only at the
/// next poll or timer, and a queued request waited for it.
const WATCH: u64 = 1 << 62;
const FLAGS: u64 = OPEN | WATCH;

/// What gates of one provider share with its actor.
#[derive(Debug)]
pub(super) struct Shared {
    /// Use order: the actor's and the fast path's stamps come from this one counter.
    pub(super) seq: AtomicU64,
    /// Release times are stored as nanoseconds since this (tokio's clock, so paused time
    /// in tests applies).
    pub(super) epoch: Instant,
    pub(super) tx: mpsc::UnboundedSender<Event>,
    /// Woken on each take and give-back: the node view shows leases (`fleet::view`). Its
    /// counter is not bumped here: `seq` above rises with every take and give-back
    /// already, and the view adds it in, so the fast path pays no second shared counter.
    pub(super) changes: Option<Arc<crate::changes::Changes>>,
}

impl Shared {
    /// The next use stamp. `SeqCst` (the same `lock xadd` as `Relaxed` on x86): a waiter
    /// of [`crate::changes::Changes`] that registered after [`Shared::wake`] looked must
    /// see this increment when it reads the counter.
    pub(super) fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Stamps handed out so far.
    pub(super) fn uses(&self) -> u64 {
        self.seq.load(Ordering::SeqCst)
    }

    /// Wakes the node view's listeners, if any (a load of one shared word otherwise).
    fn wake(&self) {
        if let Some(c) = &self.changes {
            c.wake();
        }
    }
}

/// One model's fast-path state.
#[derive(Debug)]
pub(super) struct Gate {
    pub(super) model: Arc<str>,
    /// `OPEN` | leases taken through the gate and not yet released.
    word: AtomicU64,
    /// The sequence stamp of the last take or release (0: none).
    last_used: AtomicU64,
    /// When the last release through the gate happened, nanoseconds after `shared.epoch`,
    /// plus one (0: none).
    released_at: AtomicU64,
    pub(super) shared: Arc<Shared>,
}

impl Gate {
    pub(super) fn new(model: Arc<str>, shared: Arc<Shared>) -> Self {
        Gate {
            model,
            word: AtomicU64::new(0),
            last_used: AtomicU64::new(0),
            released_at: AtomicU64::new(0),
            shared,
        }
    }

    /// Takes a lease if the gate is open.
    pub(super) fn try_take(&self) -> bool {
        let mut cur = self.word.load(Ordering::Acquire);
        loop {
            if cur & OPEN == 0 {
                return false;
            }
            match self
                .word
                .compare_exchange_weak(cur, cur + 1, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    self.last_used
                        .store(self.shared.next_seq(), Ordering::Relaxed);
                    self.shared.wake();
                    return true;
                }
                Err(now) => cur = now,
            }
        }
    }

    /// Gives a lease back. True when the gate is closed or watched and this was its last
    /// lease: the actor may be waiting for that.
    pub(super) fn give_back(&self) -> bool {
        let nanos = Instant::now()
            .saturating_duration_since(self.shared.epoch)
            .as_nanos();
        self.released_at.store(
            u64::try_from(nanos).unwrap_or(u64::MAX - 1) + 1,
            Ordering::Relaxed,
        );
        self.last_used
            .store(self.shared.next_seq(), Ordering::Relaxed);
        // Release: the stores above are seen by whoever sees the smaller count.
        let before = self.word.fetch_sub(1, Ordering::AcqRel);
        self.shared.wake();
        before & !FLAGS == 1 && (before & OPEN == 0 || before & WATCH != 0)
    }

    /// Leases out through the gate.
    pub(super) fn leases(&self) -> u32 {
        u32::try_from(self.word.load(Ordering::Acquire) & !FLAGS).unwrap_or(u32::MAX)
    }

    pub(super) fn is_open(&self) -> bool {
        self.word.load(Ordering::Acquire) & OPEN != 0
    }

    pub(super) fn open(&self) {
        self.word.fetch_or(OPEN, Ordering::AcqRel);
    }

    pub(super) fn close(&self) {
        self.word.fetch_and(!OPEN, Ordering::AcqRel);
    }

    pub(super) fn is_watched(&self) -> bool {
        self.word.load(Ordering::Acquire) & WATCH != 0
    }

    /// Whether the last release must tell the actor even while the gate is open.
    pub(super) fn set_watched(&self, on: bool) {
        if on {
            self.word.fetch_or(WATCH, Ordering::AcqRel);
        } else {
            self.word.fetch_and(!WATCH, Ordering::AcqRel);
        }
    }

    /// Closes the gate if no lease is out through it; false (and the gate unchanged) if
    /// one is. The one way an unload may start.
    pub(super) fn close_if_idle(&self) -> bool {
        let mut cur = self.word.load(Ordering::Acquire);
        loop {
            if cur & !FLAGS != 0 {
                return false;
            }
            match self
                .word
                .compare_exchange_weak(cur, 0, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return true,
                Err(now) => cur = now,
            }
        }
    }

    pub(super) fn last_used(&self) -> u64 {
        self.last_used.load(Ordering::Relaxed)
    }

    /// When the last lease taken through the gate was given back.
    pub(super) fn released_at(&self) -> Option<Instant> {
        match self.released_at.load(Ordering::Acquire) {
            0 => None,
            n => Some(self.shared.epoch + std::time::Duration::from_nanos(n - 1)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate() -> (Gate, mpsc::UnboundedReceiver<Event>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            seq: AtomicU64::new(0),
            epoch: Instant::now(),
            tx,
            changes: None,
        });
        (Gate::new("m".into(), shared), rx)
    }

    #[tokio::test]
    async fn a_closed_gate_takes_nothing_and_an_open_one_counts() {
        let (g, _rx) = gate();
        assert!(!g.try_take());
        g.open();
        assert!(g.try_take() && g.try_take());
        assert_eq!(g.leases(), 2);
        assert!(!g.close_if_idle(), "two leases out");
        assert!(g.is_open(), "a failed close leaves it open");
        assert!(!g.give_back(), "open: nobody waits");
        g.close();
        assert!(!g.try_take());
        assert!(g.give_back(), "the last lease of a closed gate");
        assert_eq!(g.leases(), 0);
        assert!(g.close_if_idle());
        assert!(g.released_at().is_some());
        assert!(g.last_used() > 0);
    }

    #[tokio::test]
    async fn a_watched_open_gate_reports_its_last_release() {
        let (g, _rx) = gate();
        g.open();
        g.set_watched(true);
        assert!(g.is_open() && g.is_watched());
        assert!(g.try_take() && g.try_take());
        assert_eq!(g.leases(), 2, "the flags are not leases");
        assert!(!g.give_back(), "one lease still out");
        assert!(
            g.give_back(),
            "open but watched: the last release is reported"
        );
        g.set_watched(false);
        assert!(g.try_take());
        assert!(!g.give_back(), "open and not watched: nobody waits");
        assert!(g.close_if_idle());
        assert!(!g.is_watched() && !g.is_open());
    }

    /// Many threads take and give back while another closes the gate whenever it is idle:
    /// every close that succeeds must see zero leases, and no take may succeed on a
    /// closed gate (the count would then be non-zero while closed-and-idle was claimed).
    #[test]
    fn close_if_idle_never_races_a_take() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        let _enter = rt.enter();
        let (g, _rx) = gate();
        let g = Arc::new(g);
        let closed_idle = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let violations = Arc::new(AtomicU64::new(0));
        std::thread::scope(|s| {
            for _ in 0..3 {
                let (g, closed_idle, violations, rt) = (&g, &closed_idle, &violations, &rt);
                s.spawn(move || {
                    let _enter = rt.enter();
                    for _ in 0..20_000 {
                        if g.try_take() {
                            if closed_idle.load(Ordering::SeqCst) {
                                violations.fetch_add(1, Ordering::SeqCst);
                            }
                            g.give_back();
                        }
                    }
                });
            }
            let (g, closed_idle) = (&g, &closed_idle);
            s.spawn(move || {
                for _ in 0..20_000 {
                    g.open();
                    if g.close_if_idle() {
                        closed_idle.store(true, Ordering::SeqCst);
                        // Nothing may be taken while it is closed.
                        assert_eq!(g.leases(), 0);
                        closed_idle.store(false, Ordering::SeqCst);
                    }
                }
            });
        });
        assert_eq!(violations.load(Ordering::SeqCst), 0);
        assert_eq!(g.leases(), 0);
    }
}
