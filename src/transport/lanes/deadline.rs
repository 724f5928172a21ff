//! Per-request timeouts on a lane without a tokio timer per request.
//!
//! `proxy.response_timeout` guards every proxied request. As `tokio::time::timeout` it cost
//! each request a timer registered in the runtime's wheel and removed again (callgrind,
//! proxied `GET` at one client: about 800 of 17,700 instructions, with the wheel's work in
//! every park). Here a lane keeps its requests' deadlines in a slab and one timer armed at
//! the earliest: taking a deadline is a clock read and a slab slot, dropping it frees the
//! slot, and the timer moves only when a deadline earlier than the armed one comes in (with
//! one timeout for all requests, never) or when it fires, which scans the slab (the lane's
//! requests in flight) once.
//!
//! Off a lane (a test's runtime, the main runtime) [`within`] is `tokio::time::timeout`.

use std::cell::RefCell;
use std::future::Future;
use std::pin::{pin, Pin};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// `fut`'s output, or `Err(())` when it takes longer than `limit`. Pinned by the caller: a
/// request's future is kilobytes, and moving it in here cost a copy each request.
pub async fn within<F: Future>(limit: Duration, mut fut: Pin<&mut F>) -> Result<F::Output, ()> {
    if !super::on_lane() {
        return tokio::time::timeout(limit, fut).await.map_err(|_| ());
    }
    let mut deadline = Deadline::after(limit);
    std::future::poll_fn(|cx| {
        if let Poll::Ready(out) = fut.as_mut().poll(cx) {
            return Poll::Ready(Ok(out));
        }
        Pin::new(&mut deadline).poll(cx).map(Err)
    })
    .await
}

/// The lane's deadlines.
#[derive(Default)]
struct Table {
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    /// What the driver's timer is armed at.
    armed: Option<Instant>,
}

struct Slot {
    when: Instant,
    fired: bool,
    waker: Option<Waker>,
}

thread_local! {
    static TABLE: RefCell<Table> = RefCell::new(Table::default());
    /// Wakes the lane's driver when a deadline earlier than its timer comes in.
    static REARM: std::sync::Arc<Notify> = std::sync::Arc::new(Notify::new());
}

/// One request's deadline on this lane; freed when dropped.
struct Deadline {
    key: usize,
}

impl Deadline {
    fn after(limit: Duration) -> Deadline {
        let when = Instant::now() + limit;
        TABLE.with(|t| {
            let mut t = t.borrow_mut();
            let slot = Some(Slot {
                when,
                fired: false,
                waker: None,
            });
            let key = match t.free.pop() {
                Some(k) => {
                    t.slots[k] = slot;
                    k
                }
                None => {
                    t.slots.push(slot);
                    t.slots.len() - 1
                }
            };
            if t.armed.is_none_or(|armed| when < armed) {
                t.armed = Some(when);
                REARM.with(|n| n.notify_one());
            }
            Deadline { key }
        })
    }
}

impl Future for Deadline {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        TABLE.with(|t| {
            let mut t = t.borrow_mut();
            let Some(slot) = t.slots.get_mut(self.key).and_then(Option::as_mut) else {
                return Poll::Ready(());
            };
            if slot.fired {
                return Poll::Ready(());
            }
            match &slot.waker {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => slot.waker = Some(cx.waker().clone()),
            }
            Poll::Pending
        })
    }
}

impl Drop for Deadline {
    fn drop(&mut self) {
        // The thread's table may be gone already when a lane's runtime drops its tasks at
        // the thread's end.
        let _ = TABLE.try_with(|t| {
            let mut t = t.borrow_mut();
            if let Some(slot) = t.slots.get_mut(self.key) {
                *slot = None;
                t.free.push(self.key);
            }
        });
    }
}

/// Runs on each lane for its life: fires the deadlines that passed, then sleeps until the
/// earliest one left (or until a nearer one comes in).
pub(super) async fn drive() {
    let rearm = REARM.with(std::sync::Arc::clone);
    loop {
        let next = TABLE.with(|t| t.borrow().armed);
        let woken = pin!(rearm.notified());
        match next {
            Some(at) => {
                tokio::select! {
                    () = tokio::time::sleep_until(at) => {}
                    () = woken => continue,
                }
            }
            None => {
                woken.await;
                continue;
            }
        }
        let now = Instant::now();
        TABLE.with(|t| {
            let mut t = t.borrow_mut();
            let mut earliest: Option<Instant> = None;
            for slot in t.slots.iter_mut().flatten() {
                if slot.fired {
                    continue;
                }
                if slot.when <= now {
                    slot.fired = true;
                    if let Some(w) = slot.waker.take() {
                        w.wake();
                    }
                } else if earliest.is_none_or(|e| slot.when < e) {
                    earliest = Some(slot.when);
                }
            }
            t.armed = earliest;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This test's thread stands in for a lane: marked as one, with the driver running on
    /// its (paused) runtime.
    fn be_a_lane() {
        super::super::ON_LANE.with(|l| l.set(true));
        tokio::spawn(drive());
    }

    fn live_slots() -> usize {
        TABLE.with(|t| t.borrow().slots.iter().flatten().count())
    }

    #[tokio::test(start_paused = true)]
    async fn on_a_lane_a_slow_future_times_out_at_its_limit_and_a_quick_one_does_not() {
        be_a_lane();
        let never = || std::future::pending::<()>();
        let started = Instant::now();
        let slow = within(Duration::from_millis(150), pin!(never())).await;
        assert_eq!(slow, Err(()));
        assert_eq!(started.elapsed(), Duration::from_millis(150));
        let quick = within(Duration::from_millis(150), pin!(async { 7 })).await;
        assert_eq!(quick, Ok(7));
        // An earlier deadline after a later one: the timer moves to it, and back.
        let started = Instant::now();
        let (mut n1, mut n2) = (pin!(never()), pin!(never()));
        let a = async {
            let r = within(Duration::from_millis(400), n1.as_mut()).await;
            (r, started.elapsed())
        };
        let b = async {
            let r = within(Duration::from_millis(100), n2.as_mut()).await;
            (r, started.elapsed())
        };
        let (a, b) = tokio::join!(a, b);
        assert_eq!(a, (Err(()), Duration::from_millis(400)));
        assert_eq!(b, (Err(()), Duration::from_millis(100)));
        assert_eq!(live_slots(), 0, "every deadline's slot is freed");
    }

    #[tokio::test(start_paused = true)]
    async fn off_a_lane_it_is_tokios_timeout() {
        let started = Instant::now();
        let r = within(
            Duration::from_millis(10),
            pin!(std::future::pending::<()>()),
        )
        .await;
        assert_eq!(r, Err(()));
        assert_eq!(started.elapsed(), Duration::from_millis(10));
        assert_eq!(
            within(Duration::from_secs(1), pin!(async { 1 })).await,
            Ok(1)
        );
        assert_eq!(live_slots(), 0, "tokio's timer, not the lane's table");
    }
}
