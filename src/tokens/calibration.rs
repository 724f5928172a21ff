//! The learned ratio between what a provider reports for a prompt and our estimate of it, per
//! (provider, model). Outer map by provider (few), inner by model, so lookups by `&str` pairs
//! allocate nothing; each update holds one shard lock for a few float operations.

use std::collections::HashMap;
use std::ops::RangeInclusive;

use dashmap::DashMap;

/// Estimates below this are ignored: a short prompt is mostly template tokens (default system
/// prompts, date lines) that differ per model, so its ratio says little about the tokenizer.
pub const CALIBRATION_MIN_ESTIMATE: u64 = 64;

/// Ratios outside this range are ignored as absurd (a prompt served from cache, truncated to
/// the context, or a mismatched pair).
pub const CALIBRATION_RATIO_RANGE: RangeInclusive<f64> = 0.25..=4.0;

/// Weight of a new sample once 8 samples were seen; before that each sample weighs
/// 1/n, so the ratio is the plain mean of the first samples and then an exponential moving
/// average over about the last 10.
pub const CALIBRATION_ALPHA: f64 = 0.1;

/// Samples before the gate applies.
const WARMUP: u64 = 8;

/// After warm-up, a sample more than this factor away from the learned ratio (either way) is
/// ignored: a partly cached or truncated prompt, not the tokenizer.
const GATE: f64 = 2.0;

/// This many gated samples in a row mean the model changed under its name (a new `ollama
/// pull`, another quantization with another template): the entry starts over from the last one.
const RESET_AFTER: u32 = 8;

/// Models learned per provider at most: only models the provider answered for get here, but
/// a provider that answers any name (llama-server with one model) would let clients grow the
/// table; past this, a model not learned yet is not learned (its ratio stays 1.0).
pub const CALIBRATION_MODELS_MAX: usize = 1024;

#[derive(Default)]
pub(super) struct CalibrationTable {
    providers: DashMap<Box<str>, HashMap<Box<str>, Entry>>,
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    ratio: f64,
    /// Accepted samples since the entry was created or reset.
    samples: u64,
    /// Gated samples since the last accepted one.
    gated_in_row: u32,
}

impl Default for Entry {
    fn default() -> Self {
        Self {
            ratio: 1.0,
            samples: 0,
            gated_in_row: 0,
        }
    }
}

impl Entry {
    fn observe(&mut self, ratio: f64) {
        let band = self.ratio / GATE..=self.ratio * GATE;
        if self.samples >= WARMUP && !band.contains(&ratio) {
            self.gated_in_row += 1;
            if self.gated_in_row < RESET_AFTER {
                return;
            }
            *self = Self::default();
        }
        self.gated_in_row = 0;
        self.samples += 1;
        let alpha = (1.0 / self.samples as f64).max(CALIBRATION_ALPHA);
        self.ratio += alpha * (ratio - self.ratio);
    }
}

impl CalibrationTable {
    pub(super) fn observe(&self, provider: &str, model: &str, estimated: u64, reported: u64) {
        if estimated < CALIBRATION_MIN_ESTIMATE {
            return;
        }
        let ratio = reported as f64 / estimated as f64;
        if !CALIBRATION_RATIO_RANGE.contains(&ratio) {
            return;
        }
        let update = |models: &mut HashMap<Box<str>, Entry>| {
            let full = models.len() >= CALIBRATION_MODELS_MAX;
            match models.get_mut(model) {
                Some(entry) => entry.observe(ratio),
                None if full => {}
                None => models.entry(model.into()).or_default().observe(ratio),
            }
        };
        if let Some(mut models) = self.providers.get_mut(provider) {
            update(&mut models);
            return;
        }
        update(&mut self.providers.entry(provider.into()).or_default());
    }

    fn entry(&self, provider: &str, model: &str) -> Option<Entry> {
        self.providers.get(provider)?.get(model).copied()
    }

    pub(super) fn ratio(&self, provider: &str, model: &str) -> f64 {
        self.entry(provider, model).map_or(1.0, |e| e.ratio)
    }

    pub(super) fn samples(&self, provider: &str, model: &str) -> u64 {
        self.entry(provider, model).map_or(0, |e| e.samples)
    }

    /// Every learned ratio, for saving.
    pub(super) fn export(&self) -> Vec<super::Calibration> {
        let mut out = Vec::new();
        for p in self.providers.iter() {
            for (model, e) in p.value() {
                out.push(super::Calibration {
                    provider: p.key().to_string(),
                    model: model.to_string(),
                    ratio: e.ratio,
                    samples: e.samples,
                });
            }
        }
        out
    }

    /// Takes saved ratios back (after a restart); absurd ones are skipped.
    pub(super) fn import(&self, rows: &[super::Calibration]) {
        for r in rows {
            if !CALIBRATION_RATIO_RANGE.contains(&r.ratio) || r.samples == 0 {
                continue;
            }
            self.providers
                .entry(r.provider.as_str().into())
                .or_default()
                .insert(
                    r.model.as_str().into(),
                    Entry {
                        ratio: r.ratio,
                        samples: r.samples,
                        gated_in_row: 0,
                    },
                );
        }
    }

    /// Number of (provider, model) entries.
    pub(super) fn len(&self) -> usize {
        self.providers.iter().map(|models| models.len()).sum()
    }
}
