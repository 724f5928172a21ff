//! The actor against a fake provider that records every load and unload, and a fake memory
//! probe, on paused tokio time: boundaries are stepped to the millisecond, nothing sleeps.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::sync::{watch, Notify};
use tokio::time::{advance, Instant};

use super::*;
use crate::config::{ModelOverrides, QueueConfig, QueuePolicy};
use crate::providers::ops::{Loaded, OpError};

const GB: u64 = 1 << 30;
const MS: Duration = Duration::from_millis(1);

// === fakes ===

/// A provider that takes `load_delay` to load, records every call, and fails loads on demand.
#[derive(Default)]
struct FakeProvider {
    calls: Mutex<Vec<String>>,
    load_delay: Mutex<Duration>,
    unload_delay: Mutex<Duration>,
    fail_next: Mutex<HashMap<String, OpError>>,
    fail_next_unload: Mutex<HashMap<String, OpError>>,
    /// Called with each unload as the actor starts it.
    on_unload: Mutex<Option<UnloadCheck>>,
    /// The context a load answers it ran with (`None`: the load does not say).
    load_context: Mutex<Option<u64>>,
    /// What `/api/show` would say of every model.
    geometry: Mutex<Option<crate::memory::Geometry>>,
}

type UnloadCheck = Arc<dyn Fn(&str) + Send + Sync>;

impl FakeProvider {
    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }

    fn count(&self, call: &str) -> usize {
        self.calls().iter().filter(|c| *c == call).count()
    }

    fn fail_next(&self, model: &str, e: OpError) {
        self.fail_next.lock().unwrap().insert(model.to_string(), e);
    }
}

impl Backend for FakeProvider {
    fn load(&self, model: &str, shape: Shape) -> BoxFuture<'static, Result<Loaded, OpError>> {
        let mut call = format!("load {model}");
        if let Some(n) = shape.num_ctx {
            call.push_str(&format!(" ctx={n}"));
        }
        if let Some(n) = shape.num_batch {
            call.push_str(&format!(" batch={n}"));
        }
        self.calls.lock().unwrap().push(call);
        let delay = *self.load_delay.lock().unwrap();
        let fail = self.fail_next.lock().unwrap().remove(model);
        let context_length = shape.num_ctx.or(*self.load_context.lock().unwrap());
        let model = model.to_string();
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            match fail {
                Some(e) => Err(e),
                None => Ok(Loaded {
                    instance_id: model,
                    elapsed: delay,
                    context_length,
                    jit: false,
                }),
            }
        })
    }

    fn geometry(&self, _model: &str) -> BoxFuture<'static, Option<crate::memory::Geometry>> {
        let g = self.geometry.lock().unwrap().clone();
        Box::pin(async move { g })
    }

    fn keep(&self, model: &str, shape: Shape) -> BoxFuture<'static, Result<(), OpError>> {
        let mut call = format!("keep {model}");
        if let Some(n) = shape.num_ctx {
            call.push_str(&format!(" ctx={n}"));
        }
        self.calls.lock().unwrap().push(call);
        Box::pin(async { Ok(()) })
    }

    fn unload(&self, instance_id: &str) -> BoxFuture<'static, Result<(), OpError>> {
        let check = self.on_unload.lock().unwrap().clone();
        if let Some(check) = check {
            check(instance_id);
        }
        self.calls
            .lock()
            .unwrap()
            .push(format!("unload {instance_id}"));
        let delay = *self.unload_delay.lock().unwrap();
        let fail = self.fail_next_unload.lock().unwrap().remove(instance_id);
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            fail.map_or(Ok(()), Err)
        })
    }
}

/// Memory numbers the test sets.
struct FakeMemory(Mutex<Option<MemoryReading>>);

impl MemoryProbe for FakeMemory {
    fn read(&self) -> Option<MemoryReading> {
        *self.0.lock().unwrap()
    }
}

struct Rig {
    lc: LifecycleHandle,
    provider: Arc<FakeProvider>,
    memory: Arc<FakeMemory>,
    _stop: watch::Sender<bool>,
}

fn settings() -> Settings {
    Settings {
        provider: "p".into(),
        kind: crate::providers::ProviderKind::LmStudio,
        max_models_loaded: 3,
        memory_threshold: 0.5,
        inactivity_timeout: Duration::from_secs(600),
        queue: QueueConfig {
            max_waiting: 256,
            timeout: Duration::from_secs(120),
            policy: QueuePolicy::Grouped,
            aging: Duration::from_secs(30),
        },
        models: Default::default(),
        context_initial: 4096,
        working_initial_mb: 256,
        pressure: None,
        metrics: None,
        changes: None,
    }
}

fn start(settings: Settings) -> Rig {
    let provider = Arc::new(FakeProvider::default());
    let memory = Arc::new(FakeMemory(Mutex::new(None)));
    let (stop, stop_rx) = watch::channel(false);
    let (lc, _task) = LifecycleHandle::spawn(
        settings,
        provider.clone(),
        memory.clone(),
        Arc::new(Notify::new()),
        stop_rx,
    );
    Rig {
        lc,
        provider,
        memory,
        _stop: stop,
    }
}

impl Rig {
    async fn view(&self, model: &str) -> ModelView {
        self.lc
            .snapshot()
            .await
            .into_iter()
            .find(|v| v.model == model)
            .unwrap_or_else(|| panic!("`{model}` is in the table"))
    }

    async fn status(&self, model: &str) -> ModelStatus {
        self.view(model).await.status
    }

    async fn lease(&self, model: &str) -> Lease {
        self.lc
            .acquire(model, None, LoadAsk::default())
            .await
            .expect("a lease")
    }

    /// Lets spawned operations finish and their events reach the actor.
    async fn settle(&self) {
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
        let _ = self.lc.snapshot().await;
    }
}

/// Marks `model` pinned.
fn pin(s: &mut Settings, model: &str) {
    s.models.insert(
        model.into(),
        ModelOverrides {
            pinned: true,
            ..Default::default()
        },
    );
}

// === idle unload ===

#[tokio::test(start_paused = true)]
async fn idle_model_stays_one_tick_before_the_timeout_and_unloads_one_tick_after() {
    let rig = start(Settings {
        inactivity_timeout: Duration::from_secs(60),
        ..settings()
    });
    drop(rig.lease("a").await);
    rig.settle().await;
    advance(Duration::from_secs(60) - MS).await;
    assert_eq!(rig.status("a").await, ModelStatus::Ready);
    assert_eq!(rig.provider.calls(), ["load a"]);
    advance(2 * MS).await;
    rig.settle().await;
    assert_eq!(rig.provider.calls(), ["load a", "unload a"]);
    assert_eq!(rig.status("a").await, ModelStatus::Unloaded);
}

#[tokio::test(start_paused = true)]
async fn the_idle_timer_starts_when_the_last_lease_drops() {
    let rig = start(Settings {
        inactivity_timeout: Duration::from_secs(10),
        ..settings()
    });
    let first = rig.lease("a").await;
    let second = rig.lease("a").await;
    drop(first);
    advance(Duration::from_secs(3600)).await;
    rig.settle().await;
    assert_eq!(rig.status("a").await, ModelStatus::Ready, "a lease is out");
    assert_eq!(rig.view("a").await.leases, 1);
    drop(second);
    rig.settle().await;
    advance(Duration::from_secs(10) - MS).await;
    assert_eq!(rig.status("a").await, ModelStatus::Ready);
    advance(2 * MS).await;
    rig.settle().await;
    assert_eq!(rig.status("a").await, ModelStatus::Unloaded);
}

#[tokio::test(start_paused = true)]
async fn a_new_lease_cancels_the_idle_timer() {
    let rig = start(Settings {
        inactivity_timeout: Duration::from_secs(10),
        ..settings()
    });
    drop(rig.lease("a").await);
    advance(Duration::from_secs(9)).await;
    drop(rig.lease("a").await);
    rig.settle().await;
    advance(Duration::from_secs(9)).await;
    rig.settle().await;
    assert_eq!(
        rig.status("a").await,
        ModelStatus::Ready,
        "18 s idle in all, 9 s since"
    );
    advance(Duration::from_secs(2)).await;
    rig.settle().await;
    assert_eq!(rig.status("a").await, ModelStatus::Unloaded);
}

#[tokio::test(start_paused = true)]
async fn per_model_timeouts_pins_and_client_hints() {
    let mut s = Settings {
        inactivity_timeout: Duration::from_secs(60),
        ..settings()
    };
    s.models.insert(
        "short".into(),
        ModelOverrides {
            inactivity_timeout: Some(Duration::from_secs(5)),
            ..Default::default()
        },
    );
    pin(&mut s, "pinned");
    let rig = start(s);
    drop(rig.lease("short").await);
    drop(rig.lease("pinned").await);
    // A client's keep_alive: 0 unloads right after; -1 keeps it (until evicted).
    drop(
        rig.lc
            .acquire(
                "now",
                Some(IdleHint::After(Duration::ZERO)),
                LoadAsk::default(),
            )
            .await
            .unwrap(),
    );
    drop(
        rig.lc
            .acquire("kept", Some(IdleHint::Never), LoadAsk::default())
            .await
            .unwrap(),
    );
    rig.settle().await;
    assert_eq!(rig.status("now").await, ModelStatus::Unloaded);
    assert_eq!(rig.view("pinned").await.inactivity_timeout_s, None);
    assert_eq!(rig.view("short").await.inactivity_timeout_s, Some(5.0));
    advance(Duration::from_secs(6)).await;
    rig.settle().await;
    assert_eq!(rig.status("short").await, ModelStatus::Unloaded);
    advance(Duration::from_secs(24 * 3600)).await;
    rig.settle().await;
    assert_eq!(rig.status("pinned").await, ModelStatus::Ready);
    assert_eq!(rig.status("kept").await, ModelStatus::Ready);
    // A later request without a hint keeps the last one (as Ollama keeps a runner's).
    drop(rig.lease("kept").await);
    advance(Duration::from_secs(24 * 3600)).await;
    rig.settle().await;
    assert_eq!(rig.status("kept").await, ModelStatus::Ready);
}

// === loading ===

#[tokio::test(start_paused = true)]
async fn fifty_concurrent_first_requests_share_one_load() {
    let rig = start(settings());
    *rig.provider.load_delay.lock().unwrap() = Duration::from_millis(500);
    let started = Instant::now();
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let lc = rig.lc.clone();
            tokio::spawn(async move { lc.acquire("a", None, LoadAsk::default()).await })
        })
        .collect();
    let mut leases = Vec::new();
    for t in tasks {
        leases.push(t.await.unwrap().expect("a lease"));
    }
    assert_eq!(
        started.elapsed(),
        Duration::from_millis(500),
        "one load's time"
    );
    assert_eq!(rig.provider.calls(), ["load a"]);
    let v = rig.view("a").await;
    assert_eq!((v.leases, v.queue_depth, v.loads), (50, 0, 1));
    assert_eq!(v.load_time_ms, Some(500));
    drop(leases);
    rig.settle().await;
    assert_eq!(rig.view("a").await.leases, 0);
}

#[tokio::test(start_paused = true)]
async fn a_failed_load_fails_every_waiter_and_the_next_request_retries() {
    let rig = start(settings());
    // A model the provider lists keeps its entry (and its error) after a failed load.
    rig.lc.catalog(vec![("a".into(), 1)]);
    *rig.provider.load_delay.lock().unwrap() = Duration::from_millis(100);
    rig.provider.fail_next("a", OpError::Timeout);
    let tasks: Vec<_> = (0..5)
        .map(|_| {
            let lc = rig.lc.clone();
            tokio::spawn(async move { lc.acquire("a", None, LoadAsk::default()).await })
        })
        .collect();
    for t in tasks {
        let e = t.await.unwrap().expect_err("the load failed");
        assert!(
            matches!(
                e,
                LifecycleError::LoadFailed {
                    source: OpError::Timeout,
                    ..
                }
            ),
            "{e:?}"
        );
    }
    let v = rig.view("a").await;
    assert_eq!(
        (v.status, v.queue_depth, v.leases),
        (ModelStatus::Error, 0, 0)
    );
    assert!(v.last_error.is_some());
    drop(rig.lease("a").await);
    assert_eq!(rig.provider.count("load a"), 2);
}

#[tokio::test(start_paused = true)]
async fn an_unknown_model_is_reported_and_forgotten() {
    let rig = start(settings());
    rig.provider.fail_next(
        "nope",
        OpError::ModelNotFound {
            model: "nope".into(),
        },
    );
    let e = rig
        .lc
        .acquire("nope", None, LoadAsk::default())
        .await
        .unwrap_err();
    assert!(matches!(e, LifecycleError::NotFound { .. }), "{e:?}");
    assert!(
        rig.lc.snapshot().await.is_empty(),
        "unknown names do not pile up"
    );
    assert!(rig.lc.facts("nope").is_none());
    assert!(
        rig.lc.events().is_empty(),
        "a name the provider lacks is no load"
    );
}

#[tokio::test(start_paused = true)]
async fn invented_names_leave_no_entry_however_their_requests_end() {
    let mut s = settings();
    s.max_models_loaded = 1;
    s.queue.max_waiting = 2;
    s.queue.timeout = Duration::from_secs(5);
    let rig = start(s);
    rig.lc.catalog(vec![("listed".into(), 1)]);
    // Loads that fail for another reason than "not found" (the provider down, a timeout).
    for i in 0..50 {
        let name = format!("invented-{i}");
        rig.provider.fail_next(&name, OpError::Timeout);
        let e = rig.lc.acquire(&name, None, LoadAsk::default()).await;
        assert!(matches!(e, Err(LifecycleError::LoadFailed { .. })), "{e:?}");
        tokio::time::advance(Duration::from_millis(1)).await;
    }
    rig.provider.fail_next("listed", OpError::Timeout);
    let _ = rig.lc.acquire("listed", None, LoadAsk::default()).await;
    let views = rig.lc.snapshot().await;
    let names: Vec<&str> = views.iter().map(|v| v.model.as_str()).collect();
    let mut kept: Vec<String> = (34..50).map(|i| format!("invented-{i}")).collect();
    kept.push("listed".into());
    kept.sort();
    assert_eq!(
        names, kept,
        "the listed one, and the latest 16 failures (their errors)"
    );
    assert!(views.iter().all(|v| v.last_error.is_some()));
    assert_eq!(
        rig.lc.events().len(),
        51,
        "real failures are all in the log"
    );
    // Requests that wait behind a busy model: some time out, the rest find the queue full.
    let busy = rig.lease("listed").await;
    let waiting: Vec<_> = (0..20)
        .map(|i| {
            let lc = rig.lc.clone();
            tokio::spawn(async move {
                lc.acquire(&format!("queued-{i}"), None, LoadAsk::default())
                    .await
            })
        })
        .collect();
    for w in waiting {
        let e = w.await.unwrap().unwrap_err();
        assert!(
            matches!(
                e,
                LifecycleError::QueueFull { .. } | LifecycleError::QueueTimeout { .. }
            ),
            "{e:?}"
        );
    }
    // A client that gives up while waiting.
    let gave_up = tokio::time::timeout(
        Duration::from_secs(1),
        rig.lc.acquire("left", None, LoadAsk::default()),
    )
    .await;
    assert!(gave_up.is_err());
    rig.settle().await;
    let names: Vec<String> = rig
        .lc
        .snapshot()
        .await
        .into_iter()
        .map(|v| v.model)
        .collect();
    assert_eq!(
        names.len(),
        17,
        "nothing is left of the names that never loaded: {names:?}"
    );
    assert!(rig.lc.facts("queued-0").is_none() && rig.lc.facts("left").is_none());
    drop(busy);
}

#[tokio::test(start_paused = true)]
async fn a_caller_that_gives_up_while_waiting_leaves_nothing_behind() {
    let rig = start(settings());
    *rig.provider.load_delay.lock().unwrap() = Duration::from_secs(10);
    let r = tokio::time::timeout(
        Duration::from_secs(1),
        rig.lc.acquire("a", None, LoadAsk::default()),
    )
    .await;
    assert!(r.is_err(), "still loading");
    rig.settle().await;
    let v = rig.view("a").await;
    assert_eq!(
        (v.queue_depth, v.leases, v.status),
        (0, 0, ModelStatus::Loading)
    );
    advance(Duration::from_secs(10)).await;
    rig.settle().await;
    let v = rig.view("a").await;
    assert_eq!((v.leases, v.status), (0, ModelStatus::Ready));
}

// === limits ===

#[tokio::test(start_paused = true)]
async fn the_least_recently_used_idle_model_is_evicted() {
    let rig = start(Settings {
        max_models_loaded: 2,
        ..settings()
    });
    drop(rig.lease("a").await);
    drop(rig.lease("b").await);
    drop(rig.lease("a").await); // b is now the least recently used
    drop(rig.lease("c").await);
    assert_eq!(
        rig.provider.calls(),
        ["load a", "load b", "unload b", "load c"]
    );
    drop(rig.lease("d").await);
    assert_eq!(
        rig.provider.calls()[4..],
        ["unload a", "load d"],
        "then a, the older of a and c"
    );
}

#[tokio::test(start_paused = true)]
async fn a_model_answering_requests_is_never_evicted_and_never_unloaded() {
    let rig = start(Settings {
        max_models_loaded: 1,
        ..settings()
    });
    let busy = rig.lease("a").await;
    let lc = rig.lc.clone();
    let waiting = tokio::spawn(async move { lc.acquire("b", None, LoadAsk::default()).await });
    // An admin unload waits too.
    let lc = rig.lc.clone();
    let unload = tokio::spawn(async move { lc.unload("a").await });
    advance(Duration::from_secs(3600)).await;
    rig.settle().await;
    assert_eq!(
        rig.provider.calls(),
        ["load a"],
        "nothing unloads a busy model"
    );
    assert_eq!(rig.view("b").await.queue_depth, 1);
    assert!(!waiting.is_finished() && !unload.is_finished());
    drop(busy);
    let b = waiting.await.unwrap().expect("b once a is done");
    assert_eq!(unload.await.unwrap().unwrap().status, ModelStatus::Unloaded);
    assert_eq!(rig.provider.calls(), ["load a", "unload a", "load b"]);
    drop(b);
}

#[tokio::test(start_paused = true)]
async fn memory_admission_uses_the_providers_sizes_and_the_machines_memory() {
    let mut s = settings();
    s.models.insert(
        "huge".into(),
        ModelOverrides {
            memory: Some(40 * GB),
            ..Default::default()
        },
    );
    let rig = start(s);
    // 32 GB machine, threshold 0.5: models may take 16 GB together.
    *rig.memory.0.lock().unwrap() = Some(MemoryReading {
        total: 32 * GB,
        available: 30 * GB,
    });
    rig.lc.catalog(vec![
        ("a".into(), 6 * GB),
        ("b".into(), 6 * GB),
        ("c".into(), 6 * GB),
    ]);
    drop(rig.lease("a").await);
    drop(rig.lease("b").await);
    assert_eq!(rig.view("a").await.memory_estimate_mb, Some(6 * 1024));
    // 18 GB would pass the budget: a (least recently used) makes room, though a slot is free.
    drop(rig.lease("c").await);
    assert_eq!(
        rig.provider.calls(),
        ["load a", "load b", "unload a", "load c"]
    );
    // Larger than the whole budget: refused at once, not queued forever.
    let e = rig
        .lc
        .acquire("huge", None, LoadAsk::default())
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            LifecycleError::TooLarge {
                size_mb: 40960,
                budget_mb: 16384,
                ..
            }
        ),
        "{e:?}"
    );
    // Other programs took the RAM: 1 GB free, plus the 6 GB a's unload just freed (the
    // reading may not show it yet). a needs 6 GB and the budget needs 2: b (LRU) goes.
    *rig.memory.0.lock().unwrap() = Some(MemoryReading {
        total: 32 * GB,
        available: GB,
    });
    drop(rig.lease("a").await);
    assert_eq!(rig.provider.calls()[4..], ["unload b", "load a"]);
    // Nothing free and nothing idle: a request waits rather than fail (memory may free up).
    advance(Duration::from_secs(11)).await;
    *rig.memory.0.lock().unwrap() = Some(MemoryReading {
        total: 32 * GB,
        available: 0,
    });
    let held_a = rig.lease("a").await;
    let held_c = rig.lease("c").await;
    let lc = rig.lc.clone();
    let waiting = tokio::spawn(async move { lc.acquire("b", None, LoadAsk::default()).await });
    rig.settle().await;
    assert_eq!(rig.view("b").await.queue_depth, 1);
    assert_eq!(rig.provider.calls().len(), 6, "nothing evicted while busy");
    *rig.memory.0.lock().unwrap() = Some(MemoryReading {
        total: 32 * GB,
        available: 20 * GB,
    });
    drop(held_c);
    drop(waiting.await.unwrap().expect("room was made"));
    assert_eq!(rig.provider.calls()[6..], ["unload c", "load b"]);
    drop(held_a);
}

// === queue ===

#[tokio::test(start_paused = true)]
async fn a_full_queue_answers_at_once_with_retry_after() {
    let mut s = settings();
    s.queue.max_waiting = 2;
    let rig = start(s);
    *rig.provider.load_delay.lock().unwrap() = Duration::from_millis(2500);
    let waiting: Vec<_> = (0..2)
        .map(|_| {
            let lc = rig.lc.clone();
            tokio::spawn(async move { lc.acquire("a", None, LoadAsk::default()).await })
        })
        .collect();
    rig.settle().await;
    let e = rig
        .lc
        .acquire("a", None, LoadAsk::default())
        .await
        .unwrap_err();
    assert!(
        matches!(e, LifecycleError::QueueFull { max_waiting: 2, .. }),
        "{e:?}"
    );
    assert_eq!(e.retry_after(), Some(Duration::from_secs(1)));
    for w in waiting {
        drop(w.await.unwrap().expect("queued requests are served"));
    }
    assert_eq!(rig.view("a").await.load_time_ms, Some(2500));
}

#[tokio::test(start_paused = true)]
async fn a_request_that_waits_past_the_queue_timeout_gets_an_error() {
    let mut s = settings();
    s.queue.timeout = Duration::from_secs(10);
    s.max_models_loaded = 1;
    let rig = start(s);
    rig.lc.catalog(vec![("b".into(), 1)]);
    let busy = rig.lease("a").await;
    let started = Instant::now();
    let e = rig
        .lc
        .acquire("b", None, LoadAsk::default())
        .await
        .unwrap_err();
    assert_eq!(started.elapsed(), Duration::from_secs(10));
    assert!(matches!(e, LifecycleError::QueueTimeout { .. }), "{e:?}");
    assert!(e.retry_after().is_some());
    assert_eq!(rig.view("b").await.queue_depth, 0);
    drop(busy);
}

/// Three requests for b arrive while a is busy, then requests for a keep coming.
async fn contend(policy: QueuePolicy) -> (Rig, Vec<String>) {
    let mut s = settings();
    s.max_models_loaded = 1;
    s.queue.policy = policy;
    s.queue.aging = Duration::from_secs(30);
    let rig = start(s);
    let a1 = rig.lease("a").await;
    let lc = rig.lc.clone();
    let b = tokio::spawn(async move { lc.acquire("b", None, LoadAsk::default()).await });
    rig.settle().await;
    // Another request for a, while b waits.
    let lc = rig.lc.clone();
    let a2 = tokio::spawn(async move { lc.acquire("a", None, LoadAsk::default()).await });
    rig.settle().await;
    let granted_at_once = a2.is_finished();
    drop(a1);
    let order = if granted_at_once {
        // Grouped: a2 went ahead of b; b gets a once a2 is done too.
        drop(a2.await.unwrap().expect("a2"));
        drop(b.await.unwrap().expect("b"));
        vec!["a2 served with a loaded".to_string()]
    } else {
        // FIFO: b first, then a2 (a loaded again).
        drop(b.await.unwrap().expect("b"));
        drop(a2.await.unwrap().expect("a2"));
        vec!["a2 waited".to_string()]
    };
    (rig, order)
}

#[tokio::test(start_paused = true)]
async fn grouped_serves_a_loaded_models_requests_before_swapping_it_out() {
    let (rig, order) = contend(QueuePolicy::Grouped).await;
    assert_eq!(order, ["a2 served with a loaded"]);
    assert_eq!(rig.provider.calls(), ["load a", "unload a", "load b"]);
}

#[tokio::test(start_paused = true)]
async fn fifo_serves_in_arrival_order_and_swaps_more() {
    let (rig, order) = contend(QueuePolicy::Fifo).await;
    assert_eq!(order, ["a2 waited"]);
    assert_eq!(
        rig.provider.calls(),
        ["load a", "unload a", "load b", "unload b", "load a"]
    );
}

/// Issue 17's second bug: two models busy with one request each through their open gates,
/// a request for a third waits for a slot. It must start when the first of them goes idle
/// (its last release tells the actor), under every policy, not at the next poll or timer.
#[tokio::test(start_paused = true)]
async fn a_waiting_request_starts_when_a_model_in_its_way_goes_idle() {
    for policy in [QueuePolicy::Grouped, QueuePolicy::Fifo] {
        let mut s = settings();
        s.max_models_loaded = 2;
        s.queue.policy = policy;
        let rig = start(s);
        drop(rig.lease("a").await);
        drop(rig.lease("b").await);
        rig.settle().await;
        // Both ready and idle: these leases are taken through the open gates.
        let a = rig.lease("a").await;
        let b = rig.lease("b").await;
        assert!(matches!(a.0, LeaseFrom::Gate(_)) && matches!(b.0, LeaseFrom::Gate(_)));
        *rig.provider.load_delay.lock().unwrap() = Duration::from_millis(500);
        let asked = Instant::now();
        let lc = rig.lc.clone();
        let c = tokio::spawn(async move {
            let lease = lc.acquire("c", None, LoadAsk::default()).await;
            lease.map(|l| (l, Instant::now()))
        });
        rig.settle().await;
        assert_eq!(
            rig.view("c").await.queue_depth,
            1,
            "{policy:?}: no slot yet"
        );
        // The two requests end 950 ms later; c needs one unload (instant) and its load.
        advance(Duration::from_millis(950)).await;
        drop(a);
        let (lease, ready) = c.await.unwrap().expect("c is served");
        assert_eq!(
            ready - asked,
            Duration::from_millis(1450),
            "{policy:?}: the end of a's request plus c's load"
        );
        assert_eq!(
            rig.provider.calls(),
            ["load a", "load b", "unload a", "load c"],
            "{policy:?}"
        );
        drop((lease, b));
    }
}

/// Issue 17's first bug, at its root: the window and runner options of a load the proxy
/// made are published when the load answers, not when the next poll lists the model.
#[tokio::test(start_paused = true)]
async fn a_loads_window_is_published_when_it_answers() {
    use crate::monitor::{Level, Snapshot};
    let (tx, rx) = watch::channel(Snapshot::default());
    let rig = start(Settings {
        pressure: Some(rx),
        ..settings()
    });
    *rig.provider.load_context.lock().unwrap() = Some(512);
    assert_eq!(rig.lc.window("m"), None);
    let lease = rig.lease("m").await;
    assert_eq!(rig.lc.window("m"), Some(512), "from the load's answer");
    let facts = rig.lc.facts("m").expect("published");
    assert_eq!(facts.status, ModelStatus::Ready);
    assert_eq!(rig.lc.runner("m"), None, "loaded with the defaults");
    drop(lease);
    // A load given options by the pressure rule: published as the runner's from the moment
    // it starts.
    tx.send_modify(|s| s.pressure_level = Level::Warning);
    let lc = rig.lc.clone();
    *rig.provider.load_delay.lock().unwrap() = Duration::from_secs(1);
    let shaped = Shape {
        num_ctx: Some(2048),
        num_batch: Some(128),
    };
    let n = tokio::spawn(async move { lc.acquire("n", None, LoadAsk::Options(shaped)).await });
    rig.settle().await;
    assert_eq!(
        rig.lc.facts("n").map(|f| f.status),
        Some(ModelStatus::Loading)
    );
    assert_eq!(
        rig.lc.runner("n"),
        Some(shaped),
        "requests during the load match it"
    );
    drop(n.await.unwrap().expect("n"));
    assert_eq!(rig.lc.window("n"), Some(2048));
    // A window learned outside a load (llama-server's /props) for a model not managed.
    rig.lc.observe_window("single", 4096);
    rig.settle().await;
    assert_eq!(rig.lc.window("single"), Some(4096));
    assert!(rig.lc.snapshot().await.iter().all(|v| v.model != "single"));
}

#[tokio::test(start_paused = true)]
async fn aging_stops_a_busy_model_from_starving_another() {
    let mut s = settings();
    s.max_models_loaded = 1;
    s.queue.aging = Duration::from_secs(30);
    let rig = start(s);
    let mut a = rig.lease("a").await;
    let lc = rig.lc.clone();
    let b = tokio::spawn(async move { lc.acquire("b", None, LoadAsk::default()).await });
    rig.settle().await;
    assert_eq!(rig.view("b").await.queue_depth, 1);
    // Requests for a overlap forever; each is served at once until b has waited 30 s.
    for _ in 0..29 {
        advance(Duration::from_secs(1)).await;
        let next = rig.lease("a").await;
        drop(std::mem::replace(&mut a, next));
    }
    advance(Duration::from_secs(1)).await;
    rig.settle().await;
    let lc = rig.lc.clone();
    let late_a = tokio::spawn(async move { lc.acquire("a", None, LoadAsk::default()).await });
    rig.settle().await;
    assert!(!late_a.is_finished(), "a drains: new requests for it wait");
    assert_eq!(rig.view("a").await.queue_depth, 1);
    drop(a);
    drop(b.await.unwrap().expect("b gets its turn"));
    drop(late_a.await.unwrap().expect("then a again"));
    assert_eq!(
        rig.provider.calls(),
        ["load a", "unload a", "load b", "unload b", "load a"]
    );
}

// === the provider's view ===

#[tokio::test(start_paused = true)]
async fn models_loaded_or_unloaded_behind_the_proxys_back_are_followed() {
    let rig = start(Settings {
        max_models_loaded: 1,
        ..settings()
    });
    let seen = |m: &str| crate::providers::LoadedModel {
        model: m.into(),
        size_bytes: Some(GB),
        vram_bytes: None,
        context_length: Some(4096),
        parallel: None,
        expires: None,
    };
    rig.lc.report(vec![seen("x")], Instant::now());
    let v = rig.view("x").await;
    assert_eq!(
        (v.status, v.loaded_by),
        (ModelStatus::Ready, Some("provider"))
    );
    assert_eq!(v.memory_estimate_mb, Some(1024));
    // It counts against the limit, and is evicted like any other idle model.
    drop(rig.lease("y").await);
    assert_eq!(rig.provider.calls(), ["unload x", "load y"]);
    // The provider lost y (restart, its own timer): unloaded, and reloaded on demand.
    rig.lc.report(vec![], Instant::now());
    assert_eq!(rig.status("y").await, ModelStatus::Unloaded);
    drop(rig.lease("y").await);
    assert_eq!(rig.provider.count("load y"), 2);
}

#[tokio::test(start_paused = true)]
async fn a_poll_that_started_before_a_load_finished_does_not_undo_it() {
    let rig = start(settings());
    let polled_at = Instant::now();
    advance(MS).await;
    let lease = rig.lease("a").await;
    drop(lease);
    // The poll began before the load: its empty list is stale for `a`.
    rig.lc.report(vec![], polled_at);
    assert_eq!(rig.status("a").await, ModelStatus::Ready);
}

#[test]
fn keep_alive_values_parse_like_ollama() {
    let d = |s| Some(IdleHint::After(Duration::from_secs_f64(s)));
    for (raw, want) in [
        ("0", d(0.0)),
        ("300", d(300.0)),
        ("1.5", d(1.5)),
        ("-1", Some(IdleHint::Never)),
        (r#""5m""#, d(300.0)),
        (r#""1h30m""#, d(5400.0)),
        (r#""0s""#, d(0.0)),
        (r#""0""#, d(0.0)),
        (r#""300ms""#, d(0.3)),
        (r#""-1m""#, Some(IdleHint::Never)),
        (r#""300""#, None),
        (r#""soon""#, None),
        ("true", None),
        ("[]", None),
    ] {
        assert_eq!(parse_keep_alive(raw), want, "{raw}");
    }
}

#[tokio::test(start_paused = true)]
async fn shedding_for_memory_pressure_spares_pinned_and_busy_models() {
    let mut s = settings();
    s.max_models_loaded = 4;
    pin(&mut s, "pinned");
    let rig = start(s);
    drop(rig.lease("pinned").await);
    drop(rig.lease("old").await);
    drop(rig.lease("new").await);
    let busy = rig.lease("busy").await;
    assert_eq!(
        rig.lc.shed(false).await,
        ["old"],
        "the least recently used idle one"
    );
    rig.settle().await;
    assert_eq!(rig.lc.shed(true).await, ["new"], "every idle one left");
    rig.settle().await;
    assert!(rig.lc.shed(true).await.is_empty());
    assert_eq!(rig.status("pinned").await, ModelStatus::Ready);
    assert_eq!(rig.status("busy").await, ModelStatus::Ready);
    assert_eq!(rig.provider.count("unload busy"), 0);
    drop(busy);
}

#[tokio::test(start_paused = true)]
async fn lm_studio_loads_under_memory_pressure_get_a_smaller_context() {
    use crate::monitor::{Level, Snapshot};
    let (tx, rx) = watch::channel(Snapshot::default());
    let rig = start(Settings {
        pressure: Some(rx),
        ..settings()
    });
    drop(rig.lease("calm").await);
    tx.send_modify(|s| s.pressure_level = Level::Warning);
    drop(rig.lease("warm").await);
    tx.send_modify(|s| s.pressure_level = Level::Critical);
    drop(rig.lease("hot").await);
    assert_eq!(
        rig.provider.calls(),
        ["load calm", "load warm ctx=4096", "load hot ctx=2048"]
    );
}

/// The actor decides a load's runner options (issue 17): the request's own, capped under
/// memory pressure, `num_batch` from the model's geometry at critical; a request that cannot
/// carry options (Ollama's `/v1`) loads with the defaults; llama-server gets none.
#[tokio::test(start_paused = true)]
async fn the_actor_caps_a_loads_options_under_memory_pressure() {
    use crate::monitor::{Level, Snapshot};
    let (tx, rx) = watch::channel(Snapshot::default());
    let mut s = settings();
    s.kind = crate::providers::ProviderKind::Ollama;
    s.pressure = Some(rx);
    s.max_models_loaded = 10;
    let rig = start(s);
    // Llama 3.2 3B: 525,312 bytes of compute buffer a token of batch at 2048 tokens.
    *rig.provider.geometry.lock().unwrap() =
        crate::memory::Geometry::from_show(&crate::memory::tests::llama32_3b_show());
    let asked = |num_ctx| {
        LoadAsk::Options(Shape {
            num_ctx,
            num_batch: None,
        })
    };
    drop(
        rig.lc
            .acquire("calm", None, asked(Some(8192)))
            .await
            .unwrap(),
    );
    tx.send_modify(|s| s.pressure_level = Level::Warning);
    drop(
        rig.lc
            .acquire("warm", None, asked(Some(8192)))
            .await
            .unwrap(),
    );
    drop(
        rig.lc
            .acquire("small", None, asked(Some(1024)))
            .await
            .unwrap(),
    );
    drop(rig.lc.acquire("v1", None, LoadAsk::Defaults).await.unwrap());
    tx.send_modify(|s| s.pressure_level = Level::Critical);
    drop(rig.lc.acquire("hot", None, asked(None)).await.unwrap());
    assert_eq!(
        rig.provider.calls(),
        [
            "load calm ctx=8192",
            "load warm ctx=4096",
            "load small ctx=1024",
            "load v1",
            "load hot ctx=2048 batch=256"
        ]
    );
    // Published whole once the load answered: what requests then carry.
    assert_eq!(
        rig.lc.runner("hot"),
        Some(Shape {
            num_ctx: Some(2048),
            num_batch: Some(256)
        })
    );
    assert_eq!(rig.lc.runner("v1"), None);
    assert_eq!(
        rig.lc.runner("calm"),
        None,
        "loaded at the request's own options: nothing imposed"
    );
}

#[tokio::test(start_paused = true)]
async fn a_load_takes_its_first_waiters_options_and_publishes_them_while_they_hold() {
    use crate::monitor::{Level, Snapshot};
    // Under pressure (the cap, 4096, imposes): the request's smaller options are kept.
    let (_tx, rx) = watch::channel(Snapshot {
        pressure_level: Level::Warning,
        ..Snapshot::default()
    });
    let mut s = settings();
    s.kind = crate::providers::ProviderKind::Ollama;
    s.pressure = Some(rx);
    let rig = start(s);
    let small = Shape {
        num_ctx: Some(2048),
        num_batch: Some(256),
    };
    let lease = rig
        .lc
        .acquire("a", None, LoadAsk::Options(small))
        .await
        .expect("a lease");
    assert_eq!(rig.provider.calls(), ["load a ctx=2048 batch=256"]);
    assert_eq!(rig.lc.runner("a"), Some(small));
    // A model loaded with the defaults is not listed.
    drop(
        rig.lc
            .acquire("b", None, LoadAsk::Defaults)
            .await
            .expect("b"),
    );
    assert_eq!(rig.lc.runner("b"), None);
    // The provider's list agrees: still listed.
    let seen = |m: &str, ctx: u64| crate::providers::LoadedModel {
        model: m.into(),
        size_bytes: None,
        vram_bytes: None,
        context_length: Some(ctx),
        parallel: None,
        expires: None,
    };
    rig.lc
        .report(vec![seen("a", 2048), seen("b", 4096)], Instant::now());
    rig.settle().await;
    assert_eq!(rig.lc.runner("a"), Some(small));
    // Someone reloaded it with another context: the provider's list wins.
    rig.lc
        .report(vec![seen("a", 8192), seen("b", 4096)], Instant::now());
    rig.settle().await;
    assert_eq!(rig.lc.runner("a"), None);
    drop(lease);

    // Unloaded: forgotten; a failed load publishes nothing either.
    let c = rig
        .lc
        .acquire("c", None, LoadAsk::Options(small))
        .await
        .expect("a lease");
    assert_eq!(rig.lc.runner("c"), Some(small));
    drop(c);
    rig.lc.unload("c").await.expect("unloaded");
    assert_eq!(rig.lc.runner("c"), None);
    rig.provider.fail_next(
        "d",
        OpError::Provider {
            status: 500,
            message: "boom".into(),
        },
    );
    assert!(rig
        .lc
        .acquire("d", None, LoadAsk::Options(small))
        .await
        .is_err());
    assert_eq!(rig.lc.runner("d"), None);
}

/// Ollama reloaded a runner the proxy loaded (a `/v1` request with other options) and gave it
/// its default keep-alive: the poll sees a real deadline and the proxy says `-1` again, with
/// the options the runner now has, once per sighting; never for a model loaded behind its
/// back, nor with options that would reload the runner.
#[tokio::test(start_paused = true)]
async fn a_runner_ollama_reloaded_with_a_deadline_is_told_to_stay() {
    use crate::monitor::{Level, Snapshot};
    let (_tx, rx) = watch::channel(Snapshot {
        pressure_level: Level::Warning,
        ..Snapshot::default()
    });
    let mut s = settings();
    s.kind = crate::providers::ProviderKind::Ollama;
    s.pressure = Some(rx);
    let rig = start(s);
    let small = Shape {
        num_ctx: Some(2048),
        num_batch: None,
    };
    drop(
        rig.lc
            .acquire("a", None, LoadAsk::Options(small))
            .await
            .expect("a lease"),
    );
    let seen = |m: &str, ctx: Option<u64>, expires: bool| crate::providers::LoadedModel {
        model: m.into(),
        size_bytes: None,
        vram_bytes: None,
        context_length: ctx,
        parallel: None,
        expires: Some(expires),
    };
    let keeps = |rig: &Rig| {
        rig.provider
            .calls()
            .into_iter()
            .filter(|c| c.starts_with("keep"))
            .collect::<Vec<_>>()
    };
    // As loaded: kept forever, nothing to do.
    rig.lc
        .report(vec![seen("a", Some(2048), false)], Instant::now());
    rig.settle().await;
    assert!(keeps(&rig).is_empty());
    // The context the proxy holds is not confirmed by the list: sending it could reload
    // the runner, so nothing is sent.
    rig.lc.report(vec![seen("a", None, true)], Instant::now());
    rig.settle().await;
    assert!(keeps(&rig).is_empty());
    // Reloaded at Ollama's defaults with its 5 minutes: told -1 at the defaults.
    rig.lc
        .report(vec![seen("a", Some(8192), true)], Instant::now());
    rig.settle().await;
    assert_eq!(keeps(&rig), ["keep a"]);
    assert_eq!(rig.lc.runner("a"), None, "the list's runner is the truth");
    // The next poll sees "forever": nothing more.
    rig.lc
        .report(vec![seen("a", Some(8192), false)], Instant::now());
    rig.settle().await;
    assert_eq!(keeps(&rig), ["keep a"]);
    // A model someone else loaded, with their own keep-alive: left to them.
    rig.lc.report(
        vec![
            seen("a", Some(8192), false),
            seen("theirs", Some(4096), true),
        ],
        Instant::now(),
    );
    rig.settle().await;
    assert_eq!(keeps(&rig), ["keep a"]);
    let view = rig.lc.snapshot().await;
    assert!(view.iter().any(|m| m.model == "theirs"), "{view:?}");
}

/// A request the pressure's smaller context cannot hold asks for at least what it needs
/// (issue 19): a fresh load gets it, and a runner loaded smaller is reloaded at that size once
/// the requests holding it are done; until then neither it nor later requests take a lease
/// on the small runner, and no request is forwarded to a runner too small for it.
#[tokio::test(start_paused = true)]
async fn a_request_that_needs_more_context_than_the_cap_reshapes_the_runner() {
    use crate::monitor::{Level, Snapshot};
    let (_tx, rx) = watch::channel(Snapshot {
        pressure_level: Level::Critical,
        ..Snapshot::default()
    });
    let mut s = settings();
    s.kind = crate::providers::ProviderKind::Ollama;
    s.pressure = Some(rx);
    s.max_models_loaded = 10;
    let rig = start(s);
    let ctx = |n| Shape {
        num_ctx: Some(n),
        num_batch: None,
    };
    // Not loaded: the load gets the request's floor instead of the cap (2048).
    drop(
        rig.lc
            .acquire("fresh", None, LoadAsk::AtLeast(Shape::default(), 3072))
            .await
            .expect("a lease"),
    );
    assert_eq!(rig.lc.runner("fresh"), Some(ctx(3072)));
    // Loaded at the cap, with a request in flight.
    let small = rig
        .lc
        .acquire("a", None, LoadAsk::default())
        .await
        .expect("a lease");
    assert_eq!(rig.lc.runner("a"), Some(ctx(2048)));
    let lc = rig.lc.clone();
    let big = tokio::spawn(async move {
        lc.acquire("a", None, LoadAsk::AtLeast(ctx(2048), 4096))
            .await
    });
    rig.settle().await;
    // A later small request does not slip past on the small runner either.
    let lc = rig.lc.clone();
    let later = tokio::spawn(async move { lc.acquire("a", None, LoadAsk::default()).await });
    rig.settle().await;
    assert!(!big.is_finished() && !later.is_finished());
    assert_eq!(
        rig.provider.calls(),
        ["load fresh ctx=3072", "load a ctx=2048"],
        "nothing unloaded under the lease in flight"
    );
    drop(small);
    let big = big.await.expect("joined").expect("a lease");
    assert_eq!(
        rig.provider.calls(),
        [
            "load fresh ctx=3072",
            "load a ctx=2048",
            "unload a",
            "load a ctx=4096"
        ]
    );
    assert_eq!(rig.lc.runner("a"), Some(ctx(4096)));
    let later = later.await.expect("joined").expect("a lease");
    drop((big, later));
    // A runner large enough serves a floor at once, through the fast path.
    drop(
        rig.lc
            .acquire("a", None, LoadAsk::AtLeast(Shape::default(), 3000))
            .await
            .expect("a lease"),
    );
    assert_eq!(
        rig.provider.calls().len(),
        4,
        "no reload for a floor it meets"
    );
    let events = rig.lc.events();
    assert!(
        events.iter().any(|e| e.reason.starts_with("reshape")),
        "the unload says why: {events:?}"
    );
}

// === lifecycle events ===

#[tokio::test(start_paused = true)]
async fn loads_and_unloads_are_listed_with_their_reason_and_duration() {
    let rig = start(Settings {
        max_models_loaded: 2,
        inactivity_timeout: Duration::from_secs(60),
        ..settings()
    });
    *rig.provider.load_delay.lock().unwrap() = Duration::from_millis(250);
    *rig.provider.unload_delay.lock().unwrap() = Duration::from_millis(40);
    assert!(rig.lc.events().is_empty());

    rig.lc.load("a", LoadAsk::default()).await.expect("loaded");
    drop(rig.lease("b").await);
    rig.provider
        .fail_next_unload
        .lock()
        .unwrap()
        .insert("b".into(), OpError::Timeout);
    rig.lc.unload("b").await.expect_err("the unload fails");
    let c = rig.lease("c").await;
    // a and c loaded (b failed): d evicts a, the idle one, and then fails to load.
    rig.provider.fail_next("d", OpError::Timeout);
    rig.lc
        .acquire("d", None, LoadAsk::default())
        .await
        .expect_err("the load fails");
    let e = rig.lease("e").await;
    // c unloads once idle for 60 s.
    drop(c);
    rig.settle().await;
    advance(Duration::from_secs(60)).await;
    rig.settle().await;
    advance(Duration::from_millis(40)).await;
    rig.settle().await;
    // Memory pressure sheds e.
    drop(e);
    rig.settle().await;
    assert_eq!(rig.lc.shed(true).await, ["e"]);
    advance(Duration::from_millis(40)).await;
    rig.settle().await;

    let got: Vec<_> = rig
        .lc
        .events()
        .into_iter()
        .map(|e| {
            assert_eq!(e.provider, "p");
            assert!(humantime::parse_rfc3339(&e.at).is_ok(), "{}", e.at);
            (e.model, e.event, e.reason, e.duration_ms, e.error)
        })
        .collect();
    let timeout = Some(OpError::Timeout.to_string());
    let want: Vec<(String, &str, &str, u64, Option<String>)> = vec![
        ("a".into(), "load", "asked", 250, None),
        ("b".into(), "load", "request", 250, None),
        ("b".into(), "unload_failed", "asked", 40, timeout.clone()),
        ("c".into(), "load", "request", 250, None),
        ("a".into(), "unload", "to make room", 40, None),
        ("d".into(), "load_failed", "request", 250, timeout),
        ("e".into(), "load", "request", 250, None),
        ("c".into(), "unload", "idle", 40, None),
        ("e".into(), "unload", "memory pressure", 40, None),
    ];
    assert_eq!(got, want);
}

// === the lease fast path (gate.rs) ===

impl Rig {
    /// A lease on a ready model, checked to come through its gate, not from the actor.
    async fn gate_lease(&self, model: &str) -> Lease {
        let before = self.gate_leases(model);
        let lease = self.lease(model).await;
        assert!(matches!(lease.0, LeaseFrom::Gate(_)), "{lease:?}");
        assert_eq!(self.gate_leases(model), before + 1);
        lease
    }

    fn gate_leases(&self, model: &str) -> u32 {
        self.lc.gates.load().get(model).map_or(0, |g| g.leases())
    }
}

#[tokio::test(start_paused = true)]
async fn a_lease_through_the_gate_keeps_the_model_and_its_release_starts_the_idle_clock() {
    let rig = start(Settings {
        inactivity_timeout: Duration::from_secs(10),
        ..settings()
    });
    drop(rig.lease("a").await); // loads it; the actor grants this one
    rig.settle().await;
    let fast = rig.gate_lease("a").await;
    assert_eq!(rig.view("a").await.leases, 1, "the view counts gate leases");
    // The actor heard nothing of it, and must still not unload: it looks again later.
    advance(Duration::from_secs(3600)).await;
    rig.settle().await;
    assert_eq!(rig.status("a").await, ModelStatus::Ready);
    assert_eq!(rig.provider.calls(), ["load a"]);
    drop(fast);
    advance(Duration::from_secs(10) - MS).await;
    rig.settle().await;
    assert_eq!(rig.status("a").await, ModelStatus::Ready, "one tick early");
    advance(2 * MS).await;
    rig.settle().await;
    assert_eq!(rig.provider.calls(), ["load a", "unload a"]);
    assert_eq!(rig.status("a").await, ModelStatus::Unloaded);
    // Unloaded: the gate is closed, so the next request goes to the actor and reloads.
    let again = rig.lease("a").await;
    assert!(matches!(again.0, LeaseFrom::Actor { .. }));
    assert_eq!(rig.provider.count("load a"), 2);
}

#[tokio::test(start_paused = true)]
async fn a_model_busy_through_its_gate_is_never_evicted_and_an_unload_waits_for_it() {
    let rig = start(Settings {
        max_models_loaded: 1,
        ..settings()
    });
    drop(rig.lease("a").await);
    rig.settle().await;
    let busy = rig.gate_lease("a").await;
    let lc = rig.lc.clone();
    let waiting = tokio::spawn(async move { lc.acquire("b", None, LoadAsk::default()).await });
    let lc = rig.lc.clone();
    let unload = tokio::spawn(async move { lc.unload("a").await });
    advance(Duration::from_secs(3600)).await;
    rig.settle().await;
    assert_eq!(
        rig.provider.calls(),
        ["load a"],
        "nothing unloads a busy model"
    );
    // Asked to unload, the model takes no new lease through its gate: this request waits.
    let lc = rig.lc.clone();
    let late = tokio::spawn(async move { lc.acquire("a", None, LoadAsk::default()).await });
    rig.settle().await;
    assert!(!late.is_finished() && !waiting.is_finished() && !unload.is_finished());
    assert_eq!(rig.gate_leases("a"), 1);
    drop(busy); // the last gate lease of a closed gate: the actor hears of it
    assert_eq!(unload.await.unwrap().unwrap().status, ModelStatus::Unloaded);
    let b = waiting.await.unwrap().expect("b once a is done");
    assert_eq!(rig.provider.calls()[..3], ["load a", "unload a", "load b"]);
    drop(b);
    let a = late.await.unwrap().expect("a again, after b");
    assert_eq!(rig.provider.count("load a"), 2);
    drop(a);
}

/// Many tasks on several threads take and drop leases on two models that take turns in one
/// place: every unload the provider sees happens with no lease of that model out.
#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn no_unload_ever_happens_under_a_lease_from_either_path() {
    let rig = start(Settings {
        max_models_loaded: 1,
        inactivity_timeout: Duration::from_millis(1),
        ..settings()
    });
    let held: Arc<[std::sync::atomic::AtomicU32; 2]> = Arc::new(Default::default());
    let bad = Arc::new(std::sync::atomic::AtomicU32::new(0));
    // Each unload, as it starts, against the leases held of that model (counted after a
    // lease is had and before it drops, so never more than are out).
    let (h, b) = (held.clone(), bad.clone());
    *rig.provider.on_unload.lock().unwrap() = Some(Arc::new(move |model: &str| {
        let i = usize::from(model == "b");
        if h[i].load(std::sync::atomic::Ordering::SeqCst) > 0 {
            b.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }));
    let mut tasks = Vec::new();
    for t in 0..8usize {
        let (lc, held) = (rig.lc.clone(), held.clone());
        tasks.push(tokio::spawn(async move {
            for n in 0..200usize {
                let i = (t + n / 50) % 2;
                let lease = lc
                    .acquire(["a", "b"][i], None, LoadAsk::default())
                    .await
                    .expect("a lease");
                held[i].fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::task::yield_now().await;
                held[i].fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                drop(lease);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert!(rig.provider.count("unload a") + rig.provider.count("unload b") > 0);
    assert_eq!(bad.load(std::sync::atomic::Ordering::SeqCst), 0);
}

#[tokio::test(start_paused = true)]
async fn unloading_a_model_the_provider_lacks_is_not_found() {
    let rig = start(settings());
    // Before the catalogue is known, nothing tells them apart: not loaded.
    let v = rig.lc.unload("never-loaded:1b").await.expect("not loaded");
    assert_eq!(v.status, ModelStatus::Unloaded);
    rig.lc.catalog(vec![("have:1b".into(), 1)]);
    let e = rig.lc.unload("never-loaded:1b").await.unwrap_err();
    assert!(matches!(e, LifecycleError::NotFound { .. }), "{e:?}");
    let v = rig
        .lc
        .unload("have:1b")
        .await
        .expect("it has it, not loaded");
    assert_eq!(v.status, ModelStatus::Unloaded);
    assert!(rig.lc.snapshot().await.is_empty(), "neither left an entry");
}

// === the node view's change signal ===

/// The actor rings `changes` when what the node view shows changes (a load, a lease through
/// the actor, a release), and not for events that change none of it; the gate (fast path)
/// counts its takes and give-backs in the use sequence and wakes listeners.
#[tokio::test(start_paused = true)]
async fn the_actor_rings_and_the_gate_counts_and_wakes_when_the_view_would_change() {
    let changes = Arc::new(crate::changes::Changes::new());
    let rig = start(Settings {
        changes: Some(changes.clone()),
        ..settings()
    });
    let seq = || changes.seq() + rig.lc.uses();
    let before = changes.seq();
    let first = rig.lease("a").await;
    rig.settle().await;
    assert!(changes.seq() > before, "a load and a lease ring");
    assert_eq!(rig.status("a").await, ModelStatus::Ready);
    // A snapshot changes nothing: no ring.
    let loaded = seq();
    let _ = rig.lc.snapshot().await;
    assert_eq!(seq(), loaded);
    // The fast path: counted in the use sequence, the actor's counter untouched; a
    // listener is woken.
    let rung = changes.seq();
    let waiter = tokio::spawn({
        let (changes, lc) = (changes.clone(), rig.lc.clone());
        async move {
            changes
                .wait_for(|| (changes.seq() + lc.uses() != loaded).then_some(()))
                .await
        }
    });
    tokio::task::yield_now().await;
    let second = rig.lease("a").await;
    tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("woken by the fast path")
        .expect("joined");
    let taken = seq();
    assert!(taken > loaded, "a lease through the gate counts");
    assert_eq!(changes.seq(), rung, "without the actor");
    drop(second);
    assert!(seq() > taken, "its release counts");
    drop(first);
    rig.settle().await;
    let idle = changes.seq();
    assert_eq!(rig.view("a").await.leases, 0);
    // A waiter sees the next change: an unload.
    let waiter = tokio::spawn({
        let changes = changes.clone();
        async move { changes.changed(idle).await }
    });
    rig.lc.unload("a").await.expect("unloaded");
    let seen = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("woken by the unload")
        .expect("joined");
    assert!(seen > idle);
}
