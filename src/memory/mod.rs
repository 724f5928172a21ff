//! Per-model memory buffers: what a loaded model's memory is made of (weights, KV cache,
//! working buffers), split out of the one total the provider reports, in MB for `/status`
//! (docs/design.md: `MemoryAllocation`). Pure arithmetic: fetching the numbers (`/api/ps`,
//! `/api/tags`, `/api/show` via [`crate::providers::ops::show`]) and keeping the peak
//! between polls is the caller's job.
//!
//! # The buffers and where each number comes from
//!
//! - **allocated** = what the provider reports for the loaded model: Ollama `/api/ps` `size`
//!   (bytes in RAM and VRAM together; `size_vram` is the GPU part of the same total; recent
//!   builds report what the runner measured, older ones their load-time estimate).
//!   LM Studio reports only `size_bytes`, the file on disk, so there allocated = model and
//!   the other buffers are 0 unless the caller adds a KV estimate to what it passes.
//! - **model** (weights) = the model's size on disk (Ollama `/api/tags` `size`, LM Studio
//!   `size_bytes`). GGUF weights are loaded as stored, so the file size is what they take
//!   (a few MB of file header are counted as weights).
//! - **context** (KV cache) = an estimate from the architecture in Ollama's `/api/show`
//!   `model_info`, by the formula Ollama uses for its own memory estimate
//!   (`fs/ggml/ggml.go`, `GraphSize`) and llama.cpp allocates:
//!
//!   ```text
//!   KV bytes = block_count × context × slots × head_count_kv × (key_length + value_length)
//!              × bytes per element
//!   ```
//!
//!   with `key_length` / `value_length` = `<arch>.attention.key_length` / `value_length` when
//!   present, else `embedding_length / head_count` (integer division, as Ollama does);
//!   `context` = the loaded context per slot (`/api/ps` `context_length`, which is per slot:
//!   Ollama starts its runner with `-c context × slots -np slots`); `slots` =
//!   `OLLAMA_NUM_PARALLEL`, which the provider's `num_parallel` setting mirrors (default 1;
//!   LM Studio reports `loaded_instances[].config.parallel`, which wins); bytes per element
//!   from the provider's `kv_cache_type` setting, which mirrors `OLLAMA_KV_CACHE_TYPE`
//!   (default f16 = 2; see [`kv_bytes_per_element`] and [`KvLayout`]). Neither is inferred
//!   from the loaded size: what the size holds beyond the weights is the KV cache *and* the
//!   compute graph and runner overhead, which no provider reports apart, so 2 slots at f16,
//!   4 at q8_0 and 1 slot plus a 500 MB graph can look alike. Example, Llama 3.2 3B at 4096
//!   tokens, one slot: 2 × 28 × 4096 × 8 × 128 × 2 B = 448 MiB. The simulator computes its
//!   `/api/ps` `size` as weights + exactly this KV cache (f16, one slot), so for its models
//!   the split is exact and working = 0.
//! - **working** = the rest of the reported total: compute graph, output buffers, the
//!   runner's own overhead (not measured here; the `/api/ps` example row in
//!   docs/providers.md §1.5, llama3.2 at 4096, leaves 1018 MB).
//! - **used** = model + the KV cache the tokens actually in context fill
//!   ([`Geometry::kv_bytes_for_tokens`]) + working. llama.cpp allocates the whole cache at
//!   load; `used` says how much of it holds tokens.
//! - **peak** = the largest `used` seen since the model was loaded; the caller carries it
//!   from one call to the next.
//!
//! # When something is unknown
//!
//! - No geometry (not Ollama, `/api/show` failed or lacks the keys) or no loaded context:
//!   context = 0, and everything the provider reports beyond the weights is working.
//! - No weights size: context is estimated as usual (capped at the total) and model = the
//!   rest; working = 0, since weights and working buffers cannot be told apart then.
//! - Reported smaller than the weights (a stale catalogue, or a provider that counts less
//!   than the file): model = the whole report, context = working = 0. Buffers never
//!   add up to more than allocated: the KV estimate is capped at what is left after the
//!   weights, which also absorbs the over-estimate for sliding-window layers (Gemma,
//!   gpt-oss) that cache fewer tokens than the formula counts.
//!
//! # Units
//!
//! MB here means MiB (2^20 bytes), rounded **up**: `allocated_mb`, `used_mb` and `peak_mb`
//! are never under-reported. The buffers are rounded cumulatively (model = ⌈model⌉,
//! context = ⌈model + context⌉ − ⌈model⌉, working = ⌈allocated⌉ − ⌈model + context⌉), so
//! they always sum to `allocated_mb` exactly; each differs from its own bytes by less than
//! 1 MB either way (a buffer under 1 MiB may show as 0).

use serde_json::Value;

#[cfg(test)]
pub(crate) mod tests;

pub mod batch;

/// Bytes in a MiB, the unit of every `*_mb` field.
pub const MIB: u64 = 1 << 20;

/// f16, Ollama's default KV cache type: the bytes per element [`allocation`] assumes.
pub const F16_BYTES_PER_ELEMENT: f64 = 2.0;

/// How a provider lays out its KV cache: parallel slots (each holds the loaded context) and
/// the bytes of one element. Ollama reports neither: `/api/ps` `context_length` is the
/// context of one slot (it starts its runner with `-c num_ctx × OLLAMA_NUM_PARALLEL -np
/// OLLAMA_NUM_PARALLEL` and `--cache-type-k/v OLLAMA_KV_CACHE_TYPE`: `llm/llama_server.go`),
/// so they come from the provider's settings (`num_parallel`, `kv_cache_type`), mirroring
/// those environment variables; LM Studio reports each instance's `parallel`, which wins.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct KvLayout {
    pub slots: u64,
    pub bytes_per_element: f64,
}

impl Default for KvLayout {
    /// Ollama's defaults: one slot, f16.
    fn default() -> Self {
        KvLayout {
            slots: 1,
            bytes_per_element: F16_BYTES_PER_ELEMENT,
        }
    }
}

/// The KV cache types a provider setting may name (`OLLAMA_KV_CACHE_TYPE`'s values).
pub const KV_CACHE_TYPES: [&str; 4] = ["f16", "q8_0", "q4_0", "f32"];

/// Bytes per KV cache element for an `OLLAMA_KV_CACHE_TYPE` (`f16`, `q8_0`, `q4_0`, `f32`),
/// as Ollama's own estimate counts them (`kvCacheBytesPerElement`): 2, 1, 0.5 and 4; any
/// other name is f16. ggml's real block sizes are a little larger for the quantized types
/// (q8_0 34 bytes per 32 elements = 1.0625, q4_0 18 per 32 = 0.5625); pass those to
/// [`Geometry::kv_bytes`] directly to count the blocks' scales.
pub fn kv_bytes_per_element(cache_type: &str) -> f64 {
    match cache_type {
        "q8_0" => 1.0,
        "q4_0" => 0.5,
        "f32" => 4.0,
        _ => F16_BYTES_PER_ELEMENT,
    }
}

/// What the KV estimate needs from `/api/show` model_info.
#[derive(Clone, Debug, PartialEq)]
pub struct Geometry {
    /// `general.architecture`, the prefix of every other key (`llama`, `qwen2`...).
    pub arch: String,
    /// `<arch>.block_count`: transformer layers, each with its own K and V.
    pub block_count: u64,
    /// `<arch>.attention.head_count` (query heads); the smallest, if given per layer.
    pub head_count: u64,
    /// `<arch>.attention.head_count_kv` (grouped-query attention shares K/V heads); the
    /// largest, if given per layer; `head_count` if absent (plain multi-head attention, as
    /// llama.cpp assumes).
    pub head_count_kv: u64,
    /// `<arch>.embedding_length`.
    pub embedding_length: u64,
    /// `<arch>.attention.key_length`: the K head size, when it is not embedding / heads.
    pub key_length: Option<u64>,
    /// `<arch>.attention.value_length`: the V head size, likewise.
    pub value_length: Option<u64>,
    /// `<arch>.context_length`: the trained maximum context.
    pub context_length: Option<u64>,
    /// `<arch>.vocab_size`, when the model file has it (the output layer's width).
    pub vocab_size: Option<u64>,
}

impl Geometry {
    /// From Ollama's `/api/show` answer (the whole JSON; reads `model_info` and
    /// `general.architecture`). `None` when the architecture, `block_count`, `head_count` or
    /// `embedding_length` is missing or not a number, or `head_count` is 0 with no
    /// `key_length` and `value_length` to stand in for embedding / heads. A key given per
    /// layer (an array) is read as its smallest (`head_count`) or largest
    /// (`head_count_kv`) entry, as Ollama does, skipping the zeros of layers without
    /// attention (hybrid recurrent models; every block is then counted as attention, an
    /// over-estimate that [`allocation`] caps). Non-verbose `/api/show` answers may replace
    /// long arrays with `null`, which reads as missing.
    pub fn from_show(show: &Value) -> Option<Self> {
        let info = show.get("model_info")?;
        let arch = info.get("general.architecture")?.as_str()?.to_string();
        let key = |k: &str| info.get(format!("{arch}.{k}"));
        let scalar = |k: &str| key(k).and_then(Value::as_u64);
        let per_layer = |k: &str, pick: fn(u64, u64) -> u64| {
            key(k).and_then(|v| match v {
                Value::Array(items) => items
                    .iter()
                    .filter_map(Value::as_u64)
                    .filter(|&n| n > 0)
                    .reduce(pick),
                v => v.as_u64(),
            })
        };
        let head_count = per_layer("attention.head_count", u64::min)?;
        let geometry = Geometry {
            block_count: scalar("block_count")?,
            head_count,
            head_count_kv: per_layer("attention.head_count_kv", u64::max).unwrap_or(head_count),
            embedding_length: scalar("embedding_length")?,
            key_length: scalar("attention.key_length"),
            value_length: scalar("attention.value_length"),
            context_length: scalar("context_length"),
            vocab_size: scalar("vocab_size"),
            arch,
        };
        let dims_known = geometry.key_length.is_some() && geometry.value_length.is_some();
        (geometry.head_count > 0 || dims_known).then_some(geometry)
    }

    /// The K head size: `key_length`, else embedding / heads.
    pub fn key_dim(&self) -> u64 {
        self.key_length.unwrap_or_else(|| self.default_head_dim())
    }

    /// The V head size: `value_length`, else embedding / heads.
    pub fn value_dim(&self) -> u64 {
        self.value_length.unwrap_or_else(|| self.default_head_dim())
    }

    fn default_head_dim(&self) -> u64 {
        self.embedding_length
            .checked_div(self.head_count)
            .unwrap_or(0)
    }

    /// KV cache bytes for `context` tokens per slot × `slots`, at `bytes_per_element` (2.0
    /// for f16, 1.0 for q8_0, 0.5625 for q4_0 with its block scales; see
    /// [`kv_bytes_per_element`]). Rounded up to a whole byte; saturates at `u64::MAX`.
    pub fn kv_bytes(&self, context: u64, slots: u64, bytes_per_element: f64) -> u64 {
        let head_dims = u128::from(self.key_dim()) + u128::from(self.value_dim());
        let elements = [self.block_count, context, slots, self.head_count_kv]
            .into_iter()
            .fold(head_dims, |n, x| n.saturating_mul(u128::from(x)));
        // Exact in f64 for any real model (< 2^53 elements); `as` saturates.
        (elements as f64 * bytes_per_element).ceil() as u64
    }

    /// Bytes the KV cache holds for `tokens` tokens actually in context (one slot; for
    /// several slots pass the tokens of all of them, a token costs the same in any slot).
    pub fn kv_bytes_for_tokens(&self, tokens: u64, bytes_per_element: f64) -> u64 {
        self.kv_bytes(tokens, 1, bytes_per_element)
    }
}

/// docs/design.md: MemoryAllocation, in MB (what /status shows per model under `memory`).
/// MB = MiB rounded up; the buffers sum to `allocated_mb` (see the module doc).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Allocation {
    /// What the provider reports for the loaded model.
    pub allocated_mb: u64,
    /// Weights + the KV cache the tokens in context fill + working buffers.
    pub used_mb: u64,
    /// The largest `used_mb` since the model was loaded.
    pub peak_mb: u64,
    pub buffers: Buffers,
}

/// What `allocated_mb` is made of.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Buffers {
    /// Weights.
    pub model_mb: u64,
    /// KV cache for the loaded context × slots.
    pub context_mb: u64,
    /// Everything else: compute graph, output buffers, overhead.
    pub working_mb: u64,
}

/// Splits what the provider reports for a loaded model into buffers:
/// `reported_bytes` = /api/ps `size` (or LM Studio's size), `weights_bytes` = size on disk
/// (/api/tags `size`), `context` = loaded context length (per slot), `kv` = the slots
/// (Ollama's OLLAMA_NUM_PARALLEL; 0 counts as 1) and bytes per element (its
/// OLLAMA_KV_CACHE_TYPE), `tokens_in_context` = tokens currently held (for `used`, all
/// slots together), `geometry` if known.
///
/// allocated = reported; model = weights (capped at reported); context = KV estimate for
/// the slots at the cache type (capped so model + context <= reported); working = reported − model − context;
/// used = model + KV for tokens_in_context (capped at context) + working; peak =
/// max(`previous_peak_mb`, used), so pass 0 when the model was loaded anew. Unknown
/// weights, geometry or context: see the module doc.
pub fn allocation(
    reported_bytes: u64,
    weights_bytes: Option<u64>,
    context: Option<u64>,
    kv: KvLayout,
    tokens_in_context: u64,
    geometry: Option<&Geometry>,
    previous_peak_mb: u64,
) -> Allocation {
    let bpe = kv.bytes_per_element;
    let kv_estimate = match (geometry, context) {
        (Some(g), Some(ctx)) => g.kv_bytes(ctx, kv.slots.max(1), bpe),
        _ => 0,
    };
    let (model, kv) = match weights_bytes {
        Some(w) => {
            let model = w.min(reported_bytes);
            (model, kv_estimate.min(reported_bytes - model))
        }
        None => {
            let kv = kv_estimate.min(reported_bytes);
            (reported_bytes - kv, kv)
        }
    };
    let working = reported_bytes - model - kv;
    // With no KV estimate (kv = 0) nothing can be said to be unused: used = reported.
    let kv_used = geometry.map_or(0, |g| g.kv_bytes_for_tokens(tokens_in_context, bpe).min(kv));
    let used = model + kv_used + working;
    let used_mb = mb(used);
    Allocation {
        allocated_mb: mb(reported_bytes),
        used_mb,
        peak_mb: previous_peak_mb.max(used_mb),
        buffers: Buffers {
            model_mb: mb(model),
            context_mb: mb(model + kv) - mb(model),
            working_mb: mb(reported_bytes) - mb(model + kv),
        },
    }
}

/// Bytes → MiB, rounded up.
pub fn mb(bytes: u64) -> u64 {
    bytes.div_ceil(MIB)
}

// === the proxy's table of per-model facts ===

/// What the poller learns about each model's memory, per provider: sizes on disk, geometry
/// (fetched once per model from `/api/show`), and the latest allocation with its peak.
/// Written by the poller, read by `/status`; no request path touches it.
#[derive(Debug, Default)]
pub struct MemoryTable {
    providers: Vec<ProviderMemory>,
}

#[derive(Debug, Default)]
struct ProviderMemory {
    weights: dashmap::DashMap<Box<str>, u64>,
    /// `None` once asked and the provider could not say: not asked again.
    geometry: dashmap::DashMap<Box<str>, Option<Geometry>>,
    allocations: dashmap::DashMap<Box<str>, Allocation>,
}

impl MemoryTable {
    pub fn new(providers: usize) -> Self {
        MemoryTable {
            providers: (0..providers).map(|_| ProviderMemory::default()).collect(),
        }
    }

    /// Sizes on disk, from a catalogue.
    pub fn set_weights(&self, provider: usize, sizes: &[(String, u64)]) {
        if let Some(p) = self.providers.get(provider) {
            for (m, s) in sizes {
                p.weights.insert(m.as_str().into(), *s);
            }
        }
    }

    /// Whether the provider's catalogue lists `model`.
    pub fn listed(&self, provider: usize, model: &str) -> bool {
        self.providers
            .get(provider)
            .is_some_and(|p| p.weights.contains_key(model))
    }

    /// `model`'s geometry: `None` if never asked, `Some(None)` if the provider could not say.
    pub fn geometry(&self, provider: usize, model: &str) -> Option<Option<Geometry>> {
        self.providers
            .get(provider)?
            .geometry
            .get(model)
            .map(|g| g.clone())
    }

    pub fn set_geometry(&self, provider: usize, model: &str, g: Option<Geometry>) {
        if let Some(p) = self.providers.get(provider) {
            p.geometry.insert(model.into(), g);
        }
    }

    /// `model`'s geometry on Ollama provider `provider`, asking its `/api/show` the first
    /// time; the answer (or that there is none) is kept. The one place the proxy asks.
    pub async fn geometry_or_fetch(
        &self,
        provider: usize,
        client: &crate::providers::UpstreamClient,
        upstream: &crate::providers::Upstream,
        model: &str,
    ) -> Option<Geometry> {
        if let Some(known) = self.geometry(provider, model) {
            return known;
        }
        let show = crate::providers::ops::show(client, upstream, model).await;
        // What the provider answered is kept; a failure only for a model its catalogue lists
        // (a name it does not have, a client's invention, must leave nothing behind).
        let remember = show.is_ok() || self.listed(provider, model);
        let g = show.ok().and_then(|v| Geometry::from_show(&v));
        if remember {
            self.set_geometry(provider, model, g.clone());
        }
        g
    }

    /// Recomputes the allocation of a loaded model from what the provider reported (its KV
    /// cache laid out as `kv` says); the peak carries over while the model stays loaded.
    pub fn update(
        &self,
        provider: usize,
        model: &str,
        reported_bytes: u64,
        context: Option<u64>,
        kv: KvLayout,
        tokens_in_context: u64,
    ) {
        let Some(p) = self.providers.get(provider) else {
            return;
        };
        let weights = p.weights.get(model).map(|w| *w);
        let geometry = p.geometry.get(model).and_then(|g| g.clone());
        let peak = p.allocations.get(model).map_or(0, |a| a.peak_mb);
        let a = allocation(
            reported_bytes,
            weights,
            context,
            kv,
            tokens_in_context,
            geometry.as_ref(),
            peak,
        );
        p.allocations.insert(model.into(), a);
    }

    /// The model is no longer loaded: its allocation (and peak) go.
    pub fn forget(&self, provider: usize, loaded: &[&str]) {
        if let Some(p) = self.providers.get(provider) {
            p.allocations.retain(|k, _| loaded.contains(&&**k));
        }
    }

    pub fn allocation(&self, provider: usize, model: &str) -> Option<Allocation> {
        self.providers
            .get(provider)?
            .allocations
            .get(model)
            .map(|a| a.clone())
    }

    /// What every loaded model of every provider holds, MB.
    pub fn allocated_mb(&self) -> u64 {
        self.providers
            .iter()
            .flat_map(|p| {
                p.allocations
                    .iter()
                    .map(|a| a.allocated_mb)
                    .collect::<Vec<_>>()
            })
            .sum()
    }
}
