//! The node view of this node (`GET /node`, `GET /node?watch=1`): built from the state's
//! owners on each read (`fleet::view` has its types and the pure parts). Here, not in
//! `fleet`, because it reads the whole state, which holds the fronts (`fleet::front`).

use std::sync::Arc;

use tokio::sync::watch;

use crate::fleet::view::{
    memory_of, provider_of, sse_event, NodeView, ProviderHead, FORMAT, KEEP_ALIVE, MIN_EVENT_GAP,
};
use crate::state::AppState;

/// The view's `seq`: the owners' change counter plus every provider's use sequence (the
/// lease fast path's changes, which it counts there and does not ring).
pub fn seq(state: &AppState) -> u64 {
    state.providers.iter().fold(state.changes.seq(), |n, p| {
        n.wrapping_add(p.lifecycle.uses())
    })
}

/// The node's view now. `seq` is read first, so the view is at least as new as it.
pub async fn build(state: &AppState) -> NodeView {
    let seq = seq(state);
    let memory = memory_of(&state.monitor.latest());
    let mut providers = Vec::with_capacity(state.providers.len());
    for p in state.providers.iter() {
        let views = p.lifecycle.snapshot().await;
        let head = ProviderHead {
            name: p.config.name.clone(),
            kind: p.config.kind.as_str().to_string(),
            listen: p.listen.to_string(),
            reachable: p.reachable(),
            managed: p.managed(),
            max_models_loaded: p.config.max_models_loaded,
        };
        providers.push(provider_of(
            head,
            p.config.memory_threshold,
            &memory,
            views,
            |m| p.lifecycle.runner(m),
        ));
    }
    NodeView {
        format: FORMAT,
        seq,
        started_at: state.started_at.clone(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        memory,
        providers,
    }
}

/// The SSE stream of `/node?watch=1`: one `data:` event with the whole view at once, then
/// one each time it changed (at most one per [`MIN_EVENT_GAP`]), a `: keep-alive` comment
/// every [`KEEP_ALIVE`] without one, until the client leaves or the node stops. Frames go
/// to `out`; the task ends when its receiver is dropped.
pub async fn stream(
    state: Arc<AppState>,
    out: tokio::sync::mpsc::Sender<bytes::Bytes>,
    mut stop: watch::Receiver<bool>,
) {
    let mut sent: Option<NodeView> = None;
    // When the last bytes went out: the keep-alive counts from there, however often the
    // stream wakes without a change to send.
    let mut last_out = tokio::time::Instant::now();
    loop {
        let view = build(&state).await;
        let seen = view.seq;
        let content = view.content();
        if sent.as_ref() != Some(&content) {
            if out.send(sse_event(&view)).await.is_err() {
                return;
            }
            last_out = tokio::time::Instant::now();
            sent = Some(content);
            // Coalesce: whatever changes meanwhile goes in the next event.
            tokio::select! {
                _ = tokio::time::sleep(MIN_EVENT_GAP) => {}
                _ = out.closed() => return,
                _ = stopped(&mut stop) => return,
            }
        }
        tokio::select! {
            _ = state.changes.wait_for(|| (seq(&state) != seen).then_some(())) => {}
            _ = tokio::time::sleep_until(last_out + KEEP_ALIVE) => {
                if out.send(bytes::Bytes::from_static(b": keep-alive\n\n")).await.is_err() {
                    return;
                }
                last_out = tokio::time::Instant::now();
            }
            _ = out.closed() => return,
            _ = stopped(&mut stop) => return,
        }
    }
}

/// Until `stop` turns true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await.map(|_| ());
}
