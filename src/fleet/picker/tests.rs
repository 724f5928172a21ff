use super::*;
use crate::fleet::view::{ModelEntry, NodeMemory, NodeView, ProviderView, FORMAT};

const GB_MB: u64 = 1024;

/// A model entry: name, state, in flight, queued, size in GB.
fn m(name: &str, state: ModelStatus, in_flight: u32, queued: u32, gb: u64) -> ModelEntry {
    ModelEntry {
        model: name.to_string(),
        state,
        in_flight,
        queued,
        context_length: None,
        num_ctx: None,
        num_batch: None,
        memory_mb: Some(gb * GB_MB),
        pinned: false,
        last_used: 0,
    }
}

fn pinned(e: ModelEntry) -> ModelEntry {
    ModelEntry { pinned: true, ..e }
}

/// A node with provider `p`: `slots` models at most, `free_gb` available, budget 64 GB.
fn node(slots: u32, free_gb: u64, models: Vec<ModelEntry>) -> NodeView {
    NodeView {
        format: FORMAT,
        seq: 1,
        started_at: String::new(),
        version: String::new(),
        memory: NodeMemory {
            total_mb: 80 * GB_MB,
            available_mb: free_gb * GB_MB,
            ..Default::default()
        },
        providers: vec![ProviderView {
            name: "p".into(),
            kind: "ollama".into(),
            listen: String::new(),
            reachable: true,
            managed: true,
            max_models_loaded: slots,
            memory_budget_mb: Some(64 * GB_MB),
            queued: models.iter().map(|m| m.queued).sum(),
            models,
        }],
    }
}

const NAMES: [&str; 4] = ["a", "b", "c", "d"];

fn nodes(views: &[NodeView]) -> Vec<Node<'_>> {
    views
        .iter()
        .zip(NAMES)
        .map(|(v, name)| Node {
            name,
            up: true,
            view: Some(v),
            provider: "p",
        })
        .collect()
}

/// The ranking as (node name, reason).
fn ranking(picks: &[Pick], nodes: &[Node<'_>]) -> Vec<(&'static str, &'static str)> {
    picks
        .iter()
        .map(|p| {
            let name = NAMES
                .iter()
                .find(|n| **n == nodes[p.node].name)
                .copied()
                .unwrap_or("?");
            (name, p.reason.as_str())
        })
        .collect()
}

/// The static name of a node (the names are `NAMES`).
fn name_of(n: &Node<'_>) -> &'static str {
    NAMES.iter().find(|x| **x == n.name).copied().unwrap_or("?")
}

fn t0() -> Instant {
    Instant::now()
}

fn rank(model: &str, views: &[NodeView]) -> Vec<(&'static str, &'static str)> {
    let ns = nodes(views);
    ranking(
        &pick(
            model,
            None,
            &ns,
            &Pending::new(Duration::from_secs(10)),
            t0(),
        ),
        &ns,
    )
}

use ModelStatus::{Loading, Ready, Unloaded, Unloading};

#[test]
fn tiers_rank_ready_then_loading_then_load_then_queued() {
    let views = [
        // a: would have to wait (its one slot is busy).
        node(1, 40, vec![m("x", Ready, 1, 0, 4)]),
        // b: loading it.
        node(2, 40, vec![m("q", Loading, 0, 2, 4)]),
        // c: has it ready.
        node(2, 40, vec![m("q", Ready, 3, 0, 4)]),
        // d: a free slot.
        node(2, 40, vec![]),
    ];
    assert_eq!(
        rank("q", &views),
        [
            ("c", "ready"),
            ("b", "loading"),
            ("d", "load"),
            ("a", "queued")
        ]
    );
}

#[test]
fn among_ready_nodes_the_fewest_in_flight_and_queued_wins() {
    let views = [
        node(2, 40, vec![m("q", Ready, 2, 1, 4)]),
        node(2, 40, vec![m("q", Ready, 1, 1, 4)]),
        node(2, 40, vec![m("q", Ready, 0, 4, 4)]),
    ];
    assert_eq!(
        rank("q", &views),
        [("b", "ready"), ("a", "ready"), ("c", "ready")]
    );
}

/// (what, the nodes, the expected ranking)
type Case = (
    &'static str,
    Vec<NodeView>,
    Vec<(&'static str, &'static str)>,
);

#[test]
fn loads_go_where_admission_evicts_least() {
    let cases: Vec<Case> = vec![
        (
            "a free slot beats an eviction",
            vec![
                node(1, 40, vec![m("x", Ready, 0, 0, 4)]),
                node(2, 40, vec![m("x", Ready, 0, 0, 4)]),
            ],
            vec![("b", "load"), ("a", "load")],
        ),
        (
            "one eviction beats two",
            vec![
                node(2, 8, vec![m("x", Ready, 0, 0, 8), m("y", Ready, 0, 0, 8)]),
                node(2, 8, vec![m("x", Ready, 0, 0, 16)]),
            ],
            vec![("b", "load"), ("a", "load")],
        ),
        (
            "the cheaper eviction wins",
            vec![
                node(1, 40, vec![m("x", Ready, 0, 0, 20)]),
                node(1, 40, vec![m("y", Ready, 0, 0, 4)]),
            ],
            vec![("b", "load"), ("a", "load")],
        ),
        (
            "never a pinned model, nor one in flight or waited for",
            vec![
                node(1, 40, vec![pinned(m("x", Ready, 0, 0, 4))]),
                node(1, 40, vec![m("x", Ready, 1, 0, 4)]),
                node(1, 40, vec![m("x", Ready, 0, 1, 4)]),
                node(1, 40, vec![m("x", Ready, 0, 0, 40)]),
            ],
            vec![
                ("d", "load"),
                ("a", "queued"),
                ("b", "queued"),
                ("c", "queued"),
            ],
        ),
        (
            "free memory counts: short everywhere but where an idle model frees it",
            vec![
                // The target's size is known where it was loaded before (4 GB).
                node(
                    4,
                    2,
                    vec![m("x", Ready, 1, 0, 8), m("q", Unloaded, 0, 0, 4)],
                ),
                node(4, 2, vec![m("x", Ready, 0, 0, 8)]),
            ],
            vec![("b", "load"), ("a", "queued")],
        ),
        (
            "an unload under way counts as freed: fits without another eviction",
            vec![
                node(1, 40, vec![m("x", Unloading, 0, 0, 4)]),
                node(1, 40, vec![m("x", Ready, 0, 0, 4)]),
            ],
            vec![("a", "load"), ("b", "load")],
        ),
        (
            "larger than the budget: unfit, listed last",
            vec![
                node(2, 40, vec![m("q", Unloaded, 0, 0, 100)]),
                node(2, 40, vec![]),
            ],
            // The size known on a then applies on b too.
            vec![("a", "unfit"), ("b", "unfit")],
        ),
    ];
    for (what, views, want) in cases {
        let got = rank("q", &views);
        // Equal keys are ordered by the hash; compare those as sets.
        if what.starts_with("larger") {
            let mut g = got.clone();
            g.sort();
            assert_eq!(g, want, "{what}");
        } else {
            assert_eq!(got, want, "{what}");
        }
    }
}

#[test]
fn the_evictions_are_named() {
    let views = [node(1, 40, vec![m("x", Ready, 0, 0, 4)])];
    let ns = nodes(&views);
    let picks = pick("q", None, &ns, &Pending::new(Duration::from_secs(1)), t0());
    assert_eq!(picks[0].evicts, ["x"]);
}

#[test]
fn nodes_down_unviewed_or_without_a_reachable_provider_are_left_out() {
    let mut unreachable = node(2, 40, vec![m("q", Ready, 0, 0, 4)]);
    unreachable.providers[0].reachable = false;
    let views = [
        node(2, 40, vec![m("q", Ready, 0, 0, 4)]),
        unreachable,
        node(2, 40, vec![m("q", Ready, 5, 0, 4)]),
        node(2, 40, vec![m("q", Ready, 0, 0, 4)]),
    ];
    let mut ns = nodes(&views);
    ns[0].up = false;
    ns[3].provider = "other";
    let picks = pick("q", None, &ns, &Pending::new(Duration::from_secs(1)), t0());
    assert_eq!(ranking(&picks, &ns), [("c", "ready")]);
    ns[2].view = None;
    assert!(pick("q", None, &ns, &Pending::new(Duration::from_secs(1)), t0()).is_empty());
}

/// Equal nodes: the conversation's key decides, the same way every time, and removing a
/// node moves only the conversations that went to it (rendezvous hashing).
#[test]
fn affinity_breaks_ties_stably_and_survives_a_node_leaving() {
    let views: Vec<NodeView> = (0..3)
        .map(|_| node(2, 40, vec![m("q", Ready, 1, 0, 4)]))
        .collect();
    let all = nodes(&views);
    let pending = Pending::new(Duration::from_secs(1));
    let first = |ns: &[Node<'_>], key: u64| {
        let p = pick("q", Some(key), ns, &pending, t0());
        (name_of(&ns[p[0].node]), p[0].label())
    };
    let mut seen = std::collections::HashSet::new();
    let mut moved = 0;
    for key in 0..300u64 {
        let key = mix(key);
        let (name, label) = first(&all, key);
        assert_eq!(label, "affinity", "a tie the hash decided");
        assert_eq!(first(&all, key).0, name, "stable");
        seen.insert(name);
        // Node c leaves: conversations on a or b stay.
        let without_c: Vec<Node<'_>> = all.iter().copied().filter(|n| n.name != "c").collect();
        let (after, _) = first(&without_c, key);
        if name == "c" {
            moved += 1;
        } else {
            assert_eq!(after, name, "key {key} moved although its node stayed");
        }
    }
    assert_eq!(seen.len(), 3, "keys spread over every node");
    assert!((50..150).contains(&moved), "about a third moved: {moved}");
    // Without a key the label is the tier, and the model's hash picks the same node.
    let p = pick("q", None, &all, &pending, t0());
    assert_eq!(p[0].label(), "ready");
    assert_eq!(pick("q", None, &all, &pending, t0())[0].node, p[0].node);
    // A node less busy wins whatever the key says.
    let mut views2 = views.clone();
    views2[1].providers[0].models[0].in_flight = 0;
    let ns2 = nodes(&views2);
    for key in 0..20 {
        let p = pick("q", Some(key), &ns2, &pending, t0());
        assert_eq!((ns2[p[0].node].name, p[0].label()), ("b", "ready"));
    }
}

/// A burst for a model no node has: one node is chosen to load it, and every later pick
/// goes there although its queue grows, until the views show the load or the choice
/// expires.
#[test]
fn a_burst_loads_once_on_one_node() {
    let ttl = Duration::from_secs(5);
    let mut pending = Pending::new(ttl);
    let start = t0();
    let mut views = vec![
        node(2, 40, vec![]),
        node(2, 40, vec![]),
        node(2, 40, vec![]),
    ];
    let ns = nodes(&views);
    let picks = pick("q", None, &ns, &pending, start);
    assert_eq!(picks[0].reason, Reason::Load);
    let chosen = name_of(&ns[picks[0].node]);
    pending.record("q", &picks, &ns, start);
    assert_eq!(pending.chosen("q", start), Some(chosen));
    drop(ns);

    // The chosen node's view now shows other requests queued (it is less attractive for a
    // load), and not yet the load itself.
    let i = NAMES.iter().position(|n| *n == chosen).expect("a node");
    views[i].providers[0].queued = 7;
    let ns = nodes(&views);
    for k in 1..20u64 {
        let now = start + Duration::from_millis(100 * k);
        let picks = pick("q", Some(k), &ns, &pending, now);
        assert_eq!(
            (ns[picks[0].node].name, picks[0].reason),
            (chosen, Reason::Pending),
            "pick {k}"
        );
        pending.record("q", &picks, &ns, now);
    }
    // Without the record, another node would have been picked.
    let fresh = pick("q", None, &ns, &Pending::new(ttl), start);
    assert_ne!(ns[fresh[0].node].name, chosen);
    let late = start + ttl;
    assert_eq!(pick("q", None, &ns, &pending, late)[0].reason, Reason::Load);
    drop(ns);

    // Expired (above): picked afresh; the repeat `pending` records did not extend it.
    assert_eq!(pending.chosen("q", late), None);

    // The view shows it loading: that tier ranks it, and the record is forgotten.
    views[i].providers[0].models.push(m("q", Loading, 0, 3, 4));
    let ns = nodes(&views);
    let now = start + Duration::from_secs(1);
    let picks = pick("q", None, &ns, &pending, now);
    assert_eq!(
        (ns[picks[0].node].name, picks[0].reason),
        (chosen, Reason::Loading)
    );
    pending.record("q", &picks, &ns, now);
    assert!(pending.is_empty());
}

#[test]
fn a_pending_choice_on_a_node_gone_down_is_passed_over_and_prune_drops_expired() {
    let mut pending = Pending::new(Duration::from_secs(5));
    let start = t0();
    let views = vec![node(2, 40, vec![]), node(2, 40, vec![])];
    let mut ns = nodes(&views);
    let picks = pick("q", None, &ns, &pending, start);
    pending.record("q", &picks, &ns, start);
    let chosen = picks[0].node;
    ns[chosen].up = false;
    let picks = pick("q", None, &ns, &pending, start);
    assert_eq!(picks.len(), 1);
    assert_eq!(picks[0].reason, Reason::Load, "the other node loads it");
    pending.clear("q");
    assert!(pending.is_empty());
    pending.record("q", &picks, &ns, start);
    pending.prune(start + Duration::from_secs(4));
    assert_eq!(pending.len(), 1);
    pending.prune(start + Duration::from_secs(5));
    assert!(pending.is_empty());
}

#[test]
fn affinity_keys_follow_the_conversation_not_its_latest_turn() {
    let key = |shape, body: &str| affinity_key(shape, body.as_bytes());
    // OpenAI / Ollama chat: the system prompt and the first user message.
    let turn1 = r#"{"model":"m","messages":[{"role":"system","content":"be brief"},{"role":"user","content":"hi"}]}"#;
    let turn2 = r#"{"model":"m","messages":[{"role":"system","content":"be brief"},{"role":"user","content":"hi"},{"role":"assistant","content":"hello"},{"role":"user","content":"more"}]}"#;
    let other = r#"{"model":"m","messages":[{"role":"system","content":"be brief"},{"role":"user","content":"bye"}]}"#;
    let k1 = key(BodyShape::Chat, turn1);
    assert!(k1.is_some());
    assert_eq!(
        k1,
        key(BodyShape::Chat, turn2),
        "the next turn keeps the key"
    );
    assert_ne!(k1, key(BodyShape::Chat, other), "another conversation");
    // Anthropic Messages: top-level system, then the messages.
    let m1 = r#"{"model":"m","system":"s","messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}]}"#;
    let m2 = r#"{"model":"m","system":"s","messages":[{"role":"user","content":[{"type":"text","text":"hi"}]},{"role":"assistant","content":"yo"},{"role":"user","content":"again"}]}"#;
    let m3 = r#"{"model":"m","system":"t","messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}]}"#;
    assert_eq!(key(BodyShape::Messages, m1), key(BodyShape::Messages, m2));
    assert_ne!(key(BodyShape::Messages, m1), key(BodyShape::Messages, m3));
    // Responses: instructions and the input items through the first user message.
    let r1 = r#"{"model":"m","instructions":"i","input":[{"role":"user","content":"hi"}]}"#;
    let r2 = r#"{"model":"m","instructions":"i","input":[{"role":"user","content":"hi"},{"type":"message","role":"assistant","content":[{"type":"output_text","text":"x"}]},{"role":"user","content":"next"}]}"#;
    assert_eq!(key(BodyShape::Responses, r1), key(BodyShape::Responses, r2));
    let s1 = r#"{"model":"m","input":"hi"}"#;
    assert!(key(BodyShape::Responses, s1).is_some());
    assert_ne!(
        key(BodyShape::Responses, s1),
        key(BodyShape::Responses, r#"{"input":"ho"}"#)
    );
    // Ollama generate: system and the prompt, or the context's first tokens.
    let g1 = r#"{"model":"m","system":"s","prompt":"once upon a time"}"#;
    let g2 = r#"{"model":"m","system":"s","prompt":"once upon a time","options":{"seed":1}}"#;
    assert_eq!(key(BodyShape::Generate, g1), key(BodyShape::Generate, g2));
    let c1 = r#"{"model":"m","prompt":"next","context":[1,2,3]}"#;
    let c2 = r#"{"model":"m","prompt":"other","context":[1,2,3,4,5]}"#;
    assert!(key(BodyShape::Generate, c1).is_some());
    assert_ne!(
        key(BodyShape::Generate, c1),
        key(BodyShape::Generate, c2),
        "prefixes differ in length"
    );
    let long: Vec<u32> = (0..100).collect();
    let mut longer = long.clone();
    longer.extend(200..300);
    let body = |ctx: &[u32]| format!(r#"{{"prompt":"p","context":{ctx:?}}}"#);
    assert_eq!(
        key(BodyShape::Generate, &body(&long)),
        key(BodyShape::Generate, &body(&longer)),
        "only the context's first tokens count"
    );
    // No conversation, or not JSON.
    assert_eq!(key(BodyShape::Chat, r#"{"model":"m"}"#), None);
    assert_eq!(key(BodyShape::Generate, r#"{"model":"m"}"#), None);
    assert_eq!(key(BodyShape::Chat, "not json"), None);
    assert_eq!(key(BodyShape::Chat, r#"{"messages":[]}"#), None);
    // The shapes by path.
    assert_eq!(
        BodyShape::of_path("/v1/chat/completions"),
        Some(BodyShape::Chat)
    );
    assert_eq!(
        BodyShape::of_path("/api/generate"),
        Some(BodyShape::Generate)
    );
    assert_eq!(
        BodyShape::of_path("/v1/messages"),
        Some(BodyShape::Messages)
    );
    assert_eq!(
        BodyShape::of_path("/v1/responses"),
        Some(BodyShape::Responses)
    );
    assert_eq!(BodyShape::of_path("/api/tags"), None);
}

#[test]
fn keys_are_fixed_across_builds() {
    // FNV-1a's published test vector, and a key that must never change: a front restarted
    // with a new build must keep sending a conversation to the same node.
    assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    let k = affinity_key(
        BodyShape::Chat,
        br#"{"messages":[{"role":"user","content":"hi"}]}"#,
    );
    assert_eq!(k, Some(PINNED_KEY));
}

const PINNED_KEY: u64 = 2_573_616_424_033_706_670;

/// Every node busy: the burst queues on one node (which loads the model when room frees),
/// not one waiting load per node.
#[test]
fn a_burst_that_must_wait_waits_on_one_node() {
    let mut pending = Pending::new(Duration::from_secs(5));
    let start = t0();
    let mut views = vec![
        node(1, 40, vec![m("x", Ready, 1, 0, 4)]),
        node(1, 40, vec![m("y", Ready, 1, 0, 4)]),
    ];
    let ns = nodes(&views);
    let picks = pick("q", None, &ns, &pending, start);
    assert_eq!(picks[0].reason, Reason::Queued);
    let chosen = name_of(&ns[picks[0].node]);
    pending.record("q", &picks, &ns, start);
    drop(ns);
    // Its queue grows: least-queued alone would now pick the other node.
    let i = NAMES.iter().position(|n| *n == chosen).expect("a node");
    views[i].providers[0].models[0].queued = 5;
    views[i].providers[0].queued = 5;
    let ns = nodes(&views);
    assert_ne!(
        name_of(&ns[pick("q", None, &ns, &Pending::new(Duration::from_secs(5)), start)[0].node]),
        chosen
    );
    let p = pick("q", None, &ns, &pending, start + Duration::from_secs(1));
    assert_eq!(
        (name_of(&ns[p[0].node]), p[0].reason),
        (chosen, Reason::Pending)
    );
}

#[test]
fn requests_waiting_on_a_node_keep_the_load_there_after_the_pending_choice_expired() {
    // a: `q` waits there for room (both residents busy); b could load it now (an idle
    // resident to evict). The front's own choice of a has expired (or never was).
    let views = [
        node(
            2,
            40,
            vec![
                m("x", Ready, 1, 0, 4),
                m("y", Ready, 1, 0, 4),
                m("q", Unloaded, 0, 3, 4),
            ],
        ),
        node(2, 40, vec![m("z", Ready, 0, 0, 4), m("w", Ready, 1, 0, 4)]),
    ];
    assert_eq!(
        rank("q", &views),
        vec![("a", "pending"), ("b", "load")],
        "a loads q for its waiters anyway: a load on b would be a second one"
    );
    // Once the waiters are gone (served, or timed out), a is an ordinary full node again.
    let mut views = views;
    views[0].providers[0].models[2].queued = 0;
    views[0].providers[0].queued = 0;
    assert_eq!(rank("q", &views), vec![("b", "load"), ("a", "queued")]);
    // The front's own pending choice still ranks first.
    let ns = nodes(&views);
    let mut pending = Pending::new(Duration::from_secs(5));
    let start = t0();
    pending
        .chosen
        .insert("q".into(), ("b".into(), start + Duration::from_secs(5)));
    let mut with_waiters = views.clone();
    with_waiters[0].providers[0].models[2].queued = 2;
    let ws = nodes(&with_waiters);
    let p = pick("q", None, &ws, &pending, start);
    assert_eq!(ranking(&p, &ws), vec![("b", "pending"), ("a", "pending")]);
    drop(ns);
}
