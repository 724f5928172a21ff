//! The data plane's threads ("lanes"): one single-threaded tokio runtime per core, as nginx
//! runs one event loop per worker process.
//!
//! A provider listener accepts on the main runtime and hands each connection to a lane, in
//! turn; from then on everything that connection does runs on that lane's one thread: the
//! client connection, the handler, and the upstream connections it opens (the pool keeps
//! a lane's idle connections apart, see `transport::pool`). A request and its stream never cross
//! threads.
//!
//! Why: on tokio's multi-thread runtime the client side and the upstream side of a proxied
//! request are two tasks (hyper runs each upstream connection as its own task) that wake
//! each other across workers. Measured before this change (2-core VM, `benches/compare.sh`,
//! proxy CPU per request relative to nginx with one worker): a stream of 8 chunks 2.93×, a
//! chat at one client 1.87×; the same build with `TOKIO_WORKER_THREADS=1` 2.41× and 1.35×.
//! strace of a stream showed 6.6 eventfd writes and 2.7 futex calls a stream, all
//! cross-thread wakes. On a lane a wake is a push onto the thread's own queue.
//!
//! Everything else (lifecycle actors, provider polls, the monitor, the admin API and
//! dashboard) stays on the main runtime; a lane talks to it through the same channels and
//! atomics as before, which work across runtimes.
//!
//! Shutdown: the connections are drained by the accept loop that owns them (their tasks run
//! on the lanes but belong to its `JoinSet`); a lane's thread ends when the last handle to
//! the [`Lanes`] is dropped, dropping whatever is still running on it.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

pub mod deadline;

thread_local! {
    static LANE: Cell<usize> = const { Cell::new(0) };
    static ON_LANE: Cell<bool> = const { Cell::new(false) };
}

/// The index of the lane this thread runs (0 on any other thread).
pub fn current() -> usize {
    LANE.with(Cell::get)
}

/// Whether this thread is a lane's.
pub fn on_lane() -> bool {
    ON_LANE.with(Cell::get)
}

/// The lanes' count when none is configured: one per core.
pub fn default_count() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Keeps a timer due within a second on the lane, so that the timers the data plane sets
/// (a connection's wait for its next request head, the lane's deadline timer), all further
/// out, never wake the lane's driver: tokio's timer writes to the driver's eventfd whenever
/// a timer is set earlier than the one the driver last parked on, and with none nearer than
/// those, every request did when each set its own (strace: one `write` and one extra
/// `epoll_wait` a request).
async fn heartbeat() {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
    }
}

/// The running lanes; cheap to clone. The threads end when the last clone is dropped.
#[derive(Clone)]
pub struct Lanes {
    inner: Arc<Inner>,
}

struct Inner {
    handles: Vec<Handle>,
    next: AtomicUsize,
    /// Dropped with the lanes: each thread's runtime then stops.
    _stops: Vec<oneshot::Sender<()>>,
}

impl Lanes {
    /// Starts `n` lanes (at least one), each a thread with its own runtime.
    pub fn start(n: usize) -> std::io::Result<Lanes> {
        let n = n.max(1);
        let mut handles = Vec::with_capacity(n);
        let mut stops = Vec::with_capacity(n);
        for i in 0..n {
            let (stop, stopped) = oneshot::channel::<()>();
            let (handle_tx, handle_rx) = std::sync::mpsc::sync_channel(1);
            std::thread::Builder::new()
                .name(format!("warden-lane-{i}"))
                .spawn(move || {
                    LANE.with(|l| l.set(i));
                    ON_LANE.with(|l| l.set(true));
                    let rt = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt,
                        Err(e) => {
                            let _ = handle_tx.send(Err(e));
                            return;
                        }
                    };
                    let _ = handle_tx.send(Ok(rt.handle().clone()));
                    rt.block_on(async {
                        tokio::select! {
                            _ = stopped => {}
                            () = heartbeat() => {}
                            () = deadline::drive() => {}
                        }
                    });
                    // Connections still open were given their grace by the accept loop;
                    // blocking work (a disk write of the summary cache) gets a moment.
                    rt.shutdown_timeout(Duration::from_secs(1));
                })?;
            let handle = handle_rx
                .recv()
                .map_err(|_| std::io::Error::other("a lane thread ended before it started"))??;
            handles.push(handle);
            stops.push(stop);
        }
        Ok(Lanes {
            inner: Arc::new(Inner {
                handles,
                next: AtomicUsize::new(0),
                _stops: stops,
            }),
        })
    }

    /// How many lanes run.
    pub fn len(&self) -> usize {
        self.inner.handles.len()
    }

    /// Never: there is at least one lane.
    pub fn is_empty(&self) -> bool {
        self.inner.handles.is_empty()
    }

    /// The lane for the next connection (round robin).
    pub fn next(&self) -> &Handle {
        let i = self.inner.next.fetch_add(1, Relaxed) % self.inner.handles.len();
        &self.inner.handles[i]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connections_go_round_robin_and_each_lane_is_one_thread() {
        let lanes = Lanes::start(2).unwrap();
        let mut seen = Vec::new();
        for _ in 0..4 {
            let h = lanes.next();
            let (lane, thread) = h
                .spawn(async {
                    // A task spawned from a lane stays on that lane.
                    tokio::spawn(async { (current(), std::thread::current().id()) })
                        .await
                        .unwrap()
                })
                .await
                .unwrap();
            seen.push((lane, thread));
        }
        assert_eq!(
            seen.iter().map(|s| s.0).collect::<Vec<_>>(),
            vec![0, 1, 0, 1]
        );
        assert_eq!(seen[0].1, seen[2].1);
        assert_eq!(seen[1].1, seen[3].1);
        assert_ne!(seen[0].1, seen[1].1);
        assert_ne!(seen[0].1, std::thread::current().id());
    }

    #[tokio::test]
    async fn dropping_the_lanes_stops_their_threads() {
        let lanes = Lanes::start(1).unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        // A task that never ends: it is dropped with the lane's runtime, and so is `tx`.
        lanes.next().spawn(async move {
            let _tx = tx;
            std::future::pending::<()>().await
        });
        drop(lanes);
        assert!(rx.await.is_err(), "the lane's task was dropped");
    }
}
