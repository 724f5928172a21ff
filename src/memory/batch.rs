//! `num_batch` from a memory budget (`buffers.working`, under memory pressure).
//!
//! `buffers.working` is memory (MB); `num_batch` is tokens. The compute buffers llama.cpp
//! allocates grow with the batch. Ollama's own estimate (`fs/ggml/ggml.go`, `GraphSize`, for
//! a fully offloaded llama-style model) is 4 bytes × batch × the larger of
//! `1 + 4·embedding + context·(1 + heads)` (attention scores) and `embedding + vocabulary`
//! (the output logits). So `num_batch` = the largest power of two whose buffers fit
//! `buffers.working.initial`, between 32 and Ollama's default 512 (at 512 or more nothing is
//! sent). The geometry comes from `/api/show` (asked once per model); `<arch>.vocab_size`
//! when present, else 128 Ki entries (the size of Llama 3's; Qwen's 152k is close). Without
//! a geometry `num_batch` is left to the provider. Llama 3.2 3B at 2048 tokens: 4 × (3072 +
//! 128256) = 513 KiB a token, so 256 MB gives `num_batch` 256 (half the default's buffers).

use super::Geometry;

/// Ollama's default `num_batch`.
pub const DEFAULT_BATCH: u64 = 512;
/// The smallest `num_batch` the proxy asks for.
pub const MIN_BATCH: u64 = 32;
/// Vocabulary assumed when `/api/show` does not give one.
pub const ASSUMED_VOCAB: u64 = 128 * 1024;

/// Bytes of compute buffer per token of batch (Ollama's `GraphSize`, see the module doc).
pub fn batch_bytes_per_token(g: &Geometry, context: u64) -> u64 {
    let attention = 1 + 4 * g.embedding_length + context * (1 + g.head_count);
    let output = g.embedding_length + g.vocab_size.unwrap_or(ASSUMED_VOCAB);
    4 * attention.max(output)
}

/// The `num_batch` whose compute buffers fit `budget` bytes; `None` when the default does.
pub fn batch_for(g: &Geometry, context: u64, budget: u64) -> Option<u64> {
    let per_token = batch_bytes_per_token(g, context).max(1);
    let fits = budget / per_token;
    if fits >= DEFAULT_BATCH {
        return None;
    }
    // The largest power of two not above `fits`, within [MIN_BATCH, DEFAULT_BATCH).
    let pow2 = if fits == 0 {
        0
    } else {
        1u64 << (63 - fits.leading_zeros())
    };
    Some(pow2.max(MIN_BATCH))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MIB;

    fn llama32_3b() -> Geometry {
        Geometry::from_show(&crate::memory::tests::llama32_3b_show()).expect("geometry")
    }

    fn qwen25_7b() -> Geometry {
        Geometry::from_show(&crate::memory::tests::qwen25_7b_show()).expect("geometry")
    }

    #[test]
    fn bytes_per_batch_token_by_hand() {
        // Llama 3.2 3B: the logits dominate at 2048: 4 × (3072 + 128256) = 525,312.
        assert_eq!(batch_bytes_per_token(&llama32_3b(), 2048), 525_312);
        // At 32k the attention scores do: 4 × (1 + 4·3072 + 32768·25) = 3,325,956.
        assert_eq!(batch_bytes_per_token(&llama32_3b(), 32_768), 3_325_956);
        // Qwen 2.5 7B without vocab_size: 4 × (3584 + 131072) = 538,624.
        assert_eq!(batch_bytes_per_token(&qwen25_7b(), 2048), 538_624);
    }

    #[test]
    fn batch_is_a_power_of_two_that_fits() {
        let g = llama32_3b();
        // 256 MiB / 525,312 B = 511 tokens -> 256.
        assert_eq!(batch_for(&g, 2048, 256 * MIB), Some(256));
        // 512 MiB fits 1022: the default 512 does, nothing is sent.
        assert_eq!(batch_for(&g, 2048, 512 * MIB), None);
        // 64 MiB fits 127 -> 64; 1 MiB fits 1 -> the floor 32.
        assert_eq!(batch_for(&g, 2048, 64 * MIB), Some(64));
        assert_eq!(batch_for(&g, 2048, MIB), Some(MIN_BATCH));
        assert_eq!(batch_for(&g, 2048, 0), Some(MIN_BATCH));
    }
}
