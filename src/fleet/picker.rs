//! The picker: which node a model request should go to, as a pure function of the nodes'
//! views (`fleet::view`). No I/O, no clocks of its own (the caller passes `now`), no
//! logging: a front calls it per request and acts on the answer; the node still decides
//! its own admission, so a pick from a stale view costs at most a retry on the next node.
//!
//! Tiers, best first ([`Reason`]); within a tier the smaller key wins:
//! 1. `ready`: the model is loaded on the node: fewest of its requests in flight + queued,
//!    then the provider's queue;
//! 2. `loading`: a load of it is under way there: fewest waiting + in flight;
//! 3. `pending`: the front already sent a load of it there ([`Pending`]) and the views do
//!    not show it yet, or the node's view shows requests for it waiting there (the node
//!    loads it for them: a load elsewhere would be a second one); the front's own choice
//!    first (fleet single-flight, below);
//! 4. `load`: the node's admission would load it now: the eviction policy the node itself
//!    runs ([`crate::lifecycle::policy::plan_load`]) on the view's table, so the picker
//!    never counts on evicting a pinned model or one with requests in flight or waiting,
//!    respects `max_models_loaded`, the memory budget and the free memory (unloads under
//!    way count as done: they end by themselves and are no eviction of the front's making).
//!    Fewest evictions,
//!    then the fewest MiB evicted (less to load again elsewhere), then the least queued;
//! 5. `queued`: it would wait there (everything in the way is busy): the least queued;
//! 6. `unfit`: the node's admission would refuse it (larger than the budget). Still
//!    listed, last, so the front can forward to one and relay the node's own error.
//!
//! Nodes that are down, whose view is missing or names no such provider, or whose provider
//! is unreachable are left out.
//!
//! **Ties** are broken by rendezvous (highest random weight) hashing of the affinity key
//! with the node's name: the node with the highest `mix(key, name)` first. When nodes come
//! and go only the keys that hashed to them move. The key is the conversation's
//! ([`affinity_key`]): its next turns go to the node that has its prompt cached; without
//! one, the model's name: every front picks the same node for the same model among equals.
//! Hashes are FNV-1a and SplitMix64, fixed: picks do not change with a library upgrade.
//!
//! **Fleet single-flight**: a burst of requests for a model no node has loaded must load it
//! once, on one node. The views lag (a node shows `loading` only once its actor started
//! it), and the first forwarded request changes the chosen node's queue, which could make
//! the next pick another node. So the front keeps a [`Pending`]: when the best pick is
//! `load` (or `queued`: that node loads it once room frees), it records model → node with
//! an expiry; later picks of that model rank that node
//! `pending` (above `load`) until a view shows the model loading or ready somewhere
//! (then those tiers rank it) or the entry expires (a load that never showed: pick again).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;

use super::view::{NodeView, ProviderView};
use crate::lifecycle::policy::{self, Limits, Plan, Residency, Resident};
use crate::lifecycle::ModelStatus;

const MIB: u64 = 1 << 20;

/// Why a node is where it is in the ranking: a label for the front's metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Reason {
    Ready,
    Loading,
    Pending,
    Load,
    Queued,
    Unfit,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Ready => "ready",
            Reason::Loading => "loading",
            Reason::Pending => "pending",
            Reason::Load => "load",
            Reason::Queued => "queued",
            Reason::Unfit => "unfit",
        }
    }
}

/// One node as the front knows it.
#[derive(Clone, Copy, Debug)]
pub struct Node<'a> {
    /// The front's name for it (hashed for ties: keep it stable).
    pub name: &'a str,
    /// Whether the front counts it in rotation (answering its polls).
    pub up: bool,
    /// Its latest view, if any came.
    pub view: Option<&'a NodeView>,
    /// The provider of that view the pool's requests go to.
    pub provider: &'a str,
}

/// One ranked node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pick {
    /// Index into the `nodes` given to [`pick`].
    pub node: usize,
    pub reason: Reason,
    /// Ranked above the next node only by the affinity hash (same tier, same key), with a
    /// conversation key given.
    pub affinity: bool,
    /// `load`: the models the node would unload for it, in its order.
    pub evicts: Vec<String>,
}

impl Pick {
    /// The label for the front's "routed by reason" metric: `affinity` when the hash chose
    /// among equals, else the tier.
    pub fn label(&self) -> &'static str {
        if self.affinity {
            "affinity"
        } else {
            self.reason.as_str()
        }
    }
}

/// The front's record of loads it sent and the views do not show yet (see the module doc).
#[derive(Clone, Debug)]
pub struct Pending {
    ttl: Duration,
    /// Model → (node name, when the choice expires).
    chosen: HashMap<String, (String, Instant)>,
}

impl Pending {
    /// `ttl`: how long a choice holds without a view showing the load; about a few poll
    /// intervals plus how long the node takes to start it.
    pub fn new(ttl: Duration) -> Self {
        Pending {
            ttl,
            chosen: HashMap::new(),
        }
    }

    /// The node chosen to load `model`, while the choice holds.
    pub fn chosen(&self, model: &str, now: Instant) -> Option<&str> {
        self.chosen
            .get(model)
            .filter(|(_, until)| now < *until)
            .map(|(node, _)| node.as_str())
    }

    /// After a pick the front acts on: the best node will load the model (`load` now, or
    /// `queued`: once room frees there) → remember it (the expiry runs from the first
    /// choice: a repeat `pending` does not extend it); `ready` or `loading` → the load
    /// shows, forget the choice.
    pub fn record(&mut self, model: &str, picks: &[Pick], nodes: &[Node<'_>], now: Instant) {
        let Some(best) = picks.first() else {
            return;
        };
        match best.reason {
            Reason::Load | Reason::Queued => {
                if let Some(n) = nodes.get(best.node) {
                    self.chosen
                        .insert(model.to_string(), (n.name.to_string(), now + self.ttl));
                }
            }
            Reason::Ready | Reason::Loading => {
                self.chosen.remove(model);
            }
            Reason::Pending | Reason::Unfit => {}
        }
    }

    /// Forgets `model`'s choice (the node refused the load: pick again).
    pub fn clear(&mut self, model: &str) {
        self.chosen.remove(model);
    }

    /// Drops expired choices (call now and then: entries are otherwise dropped only when
    /// their model is picked again).
    pub fn prune(&mut self, now: Instant) {
        self.chosen.retain(|_, (_, until)| now < *until);
    }

    pub fn len(&self) -> usize {
        self.chosen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.chosen.is_empty()
    }
}

/// Ranks `nodes` for a request for `model` (best first); see the module doc. `affinity`:
/// the conversation's key ([`affinity_key`]), if it has one.
pub fn pick(
    model: &str,
    affinity: Option<u64>,
    nodes: &[Node<'_>],
    pending: &Pending,
    now: Instant,
) -> Vec<Pick> {
    let eligible: Vec<(usize, &ProviderView, &NodeView)> = nodes
        .iter()
        .enumerate()
        .filter(|(_, n)| n.up)
        .filter_map(|(i, n)| {
            let view = n.view?;
            let p = view.provider(n.provider)?;
            p.reachable.then_some((i, p, view))
        })
        .collect();
    // The model's size where a node knows it (a node that never saw it counts the same).
    let known_size = eligible
        .iter()
        .filter_map(|(_, p, _)| p.model(model).and_then(|m| m.memory_mb))
        .max();
    let shows_load = eligible.iter().any(|(_, p, _)| {
        p.model(model)
            .is_some_and(|m| matches!(m.state, ModelStatus::Ready | ModelStatus::Loading))
    });
    let chosen = pending.chosen(model, now).filter(|_| !shows_load);
    let tie_key = affinity.unwrap_or_else(|| fnv1a(model.as_bytes()));

    let mut ranked: Vec<(Reason, [u64; 3], u64, Pick)> = eligible
        .iter()
        .map(|&(i, p, view)| {
            let (reason, key, evicts) = place(model, p, view, known_size);
            let (reason, key) = match chosen {
                Some(name) if name == nodes[i].name && reason != Reason::Unfit => {
                    (Reason::Pending, [0; 3])
                }
                _ => (reason, key),
            };
            let score = mix(tie_key ^ fnv1a(nodes[i].name.as_bytes()));
            let pick = Pick {
                node: i,
                reason,
                affinity: false,
                evicts,
            };
            (reason, key, score, pick)
        })
        .collect();
    ranked.sort_by(|a, b| (a.0, a.1, b.2).cmp(&(b.0, b.1, a.2)));
    let mut picks: Vec<Pick> = Vec::with_capacity(ranked.len());
    for k in 0..ranked.len() {
        let tied_with_next = ranked
            .get(k + 1)
            .is_some_and(|next| (next.0, next.1) == (ranked[k].0, ranked[k].1));
        let mut p = ranked[k].3.clone();
        p.affinity = affinity.is_some() && tied_with_next;
        picks.push(p);
    }
    picks
}

/// A node's tier and key for `model` (see the module doc).
fn place(
    model: &str,
    p: &ProviderView,
    view: &NodeView,
    known_size: Option<u64>,
) -> (Reason, [u64; 3], Vec<String>) {
    let provider_queued = u64::from(p.queued);
    if let Some(m) = p.model(model) {
        let busy = u64::from(m.in_flight) + u64::from(m.queued);
        match m.state {
            ModelStatus::Ready => return (Reason::Ready, [busy, provider_queued, 0], vec![]),
            ModelStatus::Loading => return (Reason::Loading, [busy, provider_queued, 0], vec![]),
            // Requests for it wait there (for room): the node loads it for them whatever
            // the front does next, so a load elsewhere would be a second one. Joining them
            // is single-flight that outlives `Pending`'s expiry (a wait for room can last
            // up to the node's `queue.aging`). Ranked after the front's own choice.
            ModelStatus::Unloaded | ModelStatus::Unloading if m.queued > 0 => {
                return (Reason::Pending, [1, provider_queued, 0], vec![]);
            }
            ModelStatus::Unloaded | ModelStatus::Unloading | ModelStatus::Error => {}
        }
    }
    let residents: Vec<Resident> = p
        .models
        .iter()
        .filter(|m| m.model != model)
        .filter_map(|m| {
            let residency = match m.state {
                ModelStatus::Loading => Residency::Loading,
                ModelStatus::Ready => Residency::Ready,
                ModelStatus::Unloading => Residency::Unloading,
                ModelStatus::Unloaded | ModelStatus::Error => return None,
            };
            Some(Resident {
                name: &m.model,
                residency,
                // Waiting requests keep a model as surely as running ones: the node's
                // actor serves its queue before it evicts for a newcomer.
                active: m.in_flight.saturating_add(m.queued),
                pinned: m.pinned,
                last_used: m.last_used,
                size_bytes: m.memory_mb.map(|mb| mb * MIB),
            })
        })
        .collect();
    let limits = Limits {
        max_models_loaded: p.max_models_loaded,
        memory_budget: p.memory_budget_mb.map(|mb| mb * MIB),
        available: (view.memory.total_mb > 0).then_some(view.memory.available_mb * MIB),
    };
    let size = p
        .model(model)
        .and_then(|m| m.memory_mb)
        .or(known_size)
        .map(|mb| mb * MIB);
    let in_flight: u64 = p.models.iter().map(|m| u64::from(m.in_flight)).sum();
    let mut plan = policy::plan_load(size, &residents, limits);
    if plan == Plan::Wait
        && residents
            .iter()
            .any(|r| r.residency == Residency::Unloading)
    {
        // The node waits for its unloads under way, which end by themselves: as good as a
        // load for the front (the unloads are not evictions it causes). Plan as if done.
        let freed: u64 = residents
            .iter()
            .filter(|r| r.residency == Residency::Unloading)
            .filter_map(|r| r.size_bytes)
            .sum();
        let staying: Vec<Resident> = residents
            .iter()
            .filter(|r| r.residency != Residency::Unloading)
            .cloned()
            .collect();
        let after = Limits {
            available: limits.available.map(|a| a + freed),
            ..limits
        };
        if let done @ (Plan::Load | Plan::Evict(_)) = policy::plan_load(size, &staying, after) {
            plan = done;
        }
    }
    match plan {
        Plan::Load => (Reason::Load, [0, 0, provider_queued], vec![]),
        Plan::Evict(victims) => {
            let mb: u64 = victims
                .iter()
                .filter_map(|v| p.model(v).and_then(|m| m.memory_mb))
                .sum();
            let n = victims.len() as u64;
            let names = victims.into_iter().map(str::to_string).collect();
            (Reason::Load, [n, mb, provider_queued], names)
        }
        Plan::Wait => (Reason::Queued, [provider_queued, in_flight, 0], vec![]),
        Plan::Refuse(_) => (Reason::Unfit, [provider_queued, in_flight, 0], vec![]),
    }
}

/// Which request body a conversation comes in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyShape {
    /// OpenAI chat completions (`/v1/chat/completions`) and Ollama chat (`/api/chat`):
    /// `messages`.
    Chat,
    /// Ollama generate (`/api/generate`): `system`, `prompt`, `context`.
    Generate,
    /// Anthropic Messages (`/v1/messages`): top-level `system`, `messages`.
    Messages,
    /// OpenAI Responses (`/v1/responses`): `instructions`, `input`.
    Responses,
}

impl BodyShape {
    /// The shape of a request to `path`, if it carries a conversation.
    pub fn of_path(path: &str) -> Option<Self> {
        match path {
            "/v1/chat/completions" | "/api/chat" | "/api/v1/chat" => Some(BodyShape::Chat),
            "/api/generate" => Some(BodyShape::Generate),
            "/v1/messages" => Some(BodyShape::Messages),
            "/v1/responses" => Some(BodyShape::Responses),
            _ => None,
        }
    }
}

/// How many bytes of a generate prompt, and how many `context` tokens, the key reads.
const PROMPT_PREFIX: usize = 512;
const CONTEXT_PREFIX: usize = 64;

/// The conversation's affinity key: a stable hash of its opening (the system prompt and
/// the messages up to and including the first user message), which stays the same as the
/// conversation grows, so its next turns go where its prompt is cached. `None` when the
/// body carries no conversation. The model is not part of it (the picker ranks per model).
///
/// Per shape: chat and Messages hash the system prompt and the messages through the first
/// `user` one; Responses hashes `instructions` and the `input` items through the first
/// `user` message (a string `input` is the whole opening; with `previous_response_id` the
/// earlier turns live on the provider and the key covers only what the request carries);
/// generate hashes `system` and the first [`CONTEXT_PREFIX`] tokens of `context` when the
/// client sends one (later turns), else the first [`PROMPT_PREFIX`] bytes of `prompt`: a
/// first turn and its follow-up therefore get different keys (Ollama's `context` is
/// tokens, not the prompt's text).
pub fn affinity_key(shape: BodyShape, body: &[u8]) -> Option<u64> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let obj = v.as_object()?;
    let mut h = Fnv::new();
    let mut any = false;
    let mut put = |h: &mut Fnv, tag: &str, v: &Value| {
        h.write(tag.as_bytes());
        h.write(&[0]);
        h.write(v.to_string().as_bytes());
        h.write(&[0]);
        any = true;
    };
    // The items through the first user message.
    let opening = |h: &mut Fnv, put: &mut dyn FnMut(&mut Fnv, &str, &Value), items: &[Value]| {
        for item in items {
            put(h, "item", item);
            if item.get("role").and_then(Value::as_str) == Some("user") {
                break;
            }
        }
    };
    match shape {
        BodyShape::Chat => {
            let messages = obj.get("messages")?.as_array()?;
            opening(&mut h, &mut put, messages);
        }
        BodyShape::Messages => {
            if let Some(system) = obj.get("system") {
                put(&mut h, "system", system);
            }
            let messages = obj.get("messages")?.as_array()?;
            opening(&mut h, &mut put, messages);
        }
        BodyShape::Responses => {
            if let Some(instructions) = obj.get("instructions") {
                put(&mut h, "system", instructions);
            }
            match obj.get("input")? {
                Value::Array(items) => opening(&mut h, &mut put, items),
                input => put(&mut h, "item", input),
            }
        }
        BodyShape::Generate => {
            if let Some(system) = obj.get("system") {
                put(&mut h, "system", system);
            }
            match obj.get("context").and_then(Value::as_array) {
                Some(tokens) if !tokens.is_empty() => {
                    let head = &tokens[..tokens.len().min(CONTEXT_PREFIX)];
                    put(&mut h, "context", &Value::Array(head.to_vec()));
                }
                _ => {
                    let prompt = obj.get("prompt").and_then(Value::as_str)?;
                    let mut end = prompt.len().min(PROMPT_PREFIX);
                    while !prompt.is_char_boundary(end) {
                        end -= 1;
                    }
                    put(&mut h, "prompt", &Value::String(prompt[..end].to_string()));
                }
            }
        }
    }
    any.then(|| mix(h.finish()))
}

/// FNV-1a, 64 bits: fixed forever, so keys and picks survive upgrades.
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h = Fnv::new();
    h.write(bytes);
    h.finish()
}

/// SplitMix64's finalizer: spreads FNV's weak low bits over the whole word.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests;
