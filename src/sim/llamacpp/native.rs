//! The per-model routes that do not generate: `/props`, `/slots`, `/slots/{id}?action=`,
//! `/metrics`, `/tokenize`, `/detokenize` and `/apply-template`. In router mode they reach
//! the model's instance through the same routing as generation (`?model=` or body `model`).

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use http::{Response, StatusCode};
use serde_json::Value;

use super::generate::{content_text, generation_params};
use super::state::Instance;
use super::wire::{obj, ok, Fail, J};
use super::{Handled, LlamaCppSim, Req, BUILD_INFO};
use crate::sim::common::{respond, tokenize, SimBody};

/// Beginning-of-sequence id, prepended by `/tokenize` with `add_special`.
const BOS: u32 = 1;
/// Bytes of KV cache per token in a slot file (`n_written`).
const BYTES_PER_TOKEN: u64 = 8192;
/// The chat template reported in `/props` (ChatML, what `/apply-template` renders).
const CHAT_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + \
    '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt \
    %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// Where a model's file lives (`model_path`, router `args`).
pub(super) fn model_path(name: &str) -> String {
    format!("/models/{name}.gguf")
}

impl LlamaCppSim {
    fn slot_json(&self, inst: &Instance, id: usize, busy: bool, id_task: i64) -> J {
        obj! {
            "id" => id,
            "id_task" => if busy { id_task } else { -1 },
            "n_ctx" => inst.n_ctx,
            "speculative" => false,
            "is_processing" => busy,
            "params" => generation_params(false),
            "next_token" => obj! {
                "has_next_token" => busy,
                "has_new_line" => false,
                "n_remain" => -1i32,
                "n_decoded" => 0u32,
                "stopping_word" => "",
            },
        }
    }

    pub(super) fn props(&self, inst: &Instance) -> Response<SimBody> {
        ok(&obj! {
            "default_generation_settings" => self.slot_json(inst, 0, false, -1),
            "total_slots" => self.cfg.parallel.max(1),
            "model_path" => model_path(&inst.model.name),
            "chat_template" => CHAT_TEMPLATE,
            "chat_template_caps" => obj! {},
            "modalities" => obj! {"vision" => false, "audio" => false},
            "build_info" => BUILD_INFO,
            "is_sleeping" => false,
        })
    }

    pub(super) fn slots(&self, inst: &Instance, req: &Req) -> Handled {
        let slots = inst.lock_slots().clone();
        let fail_on_no_slot = matches!(req.param("fail_on_no_slot"), Some("1" | "true"));
        if fail_on_no_slot && slots.iter().all(|s| s.busy) {
            return Err(Fail::unavailable("no slot available"));
        }
        let items: Vec<J> = slots
            .iter()
            .enumerate()
            .map(|(i, s)| self.slot_json(inst, i, s.busy, s.id_task))
            .collect();
        Ok(ok(&J::Arr(items)))
    }

    pub(super) fn metrics(&self, inst: &Instance) -> Handled {
        if !self.cfg.metrics {
            return Err(Fail::not_supported(
                "This server does not support metrics endpoint. Start it with `--metrics`",
            ));
        }
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::SeqCst);
        let prompt = load(&inst.prompt_tokens_total);
        let predicted = load(&inst.predicted_tokens_total);
        let per_token_s = self.cfg.token_delay.as_secs_f64().max(0.001);
        let metrics: [(&str, &str, &str, String); 9] = [
            (
                "counter",
                "prompt_tokens_total",
                "Number of prompt tokens processed.",
                prompt.to_string(),
            ),
            (
                "counter",
                "prompt_seconds_total",
                "Prompt process time",
                fmt_f(prompt as f64 * 0.0005),
            ),
            (
                "counter",
                "tokens_predicted_total",
                "Number of generation tokens processed.",
                predicted.to_string(),
            ),
            (
                "counter",
                "tokens_predicted_seconds_total",
                "Predict process time",
                fmt_f(predicted as f64 * per_token_s),
            ),
            (
                "counter",
                "n_decode_total",
                "Total number of llama_decode() calls",
                load(&inst.decode_total).to_string(),
            ),
            (
                "gauge",
                "n_tokens_max",
                "Largest observed n_tokens.",
                load(&inst.n_tokens_max).to_string(),
            ),
            (
                "gauge",
                "prompt_tokens_seconds",
                "Average prompt throughput in tokens/s.",
                fmt_f(2000.0),
            ),
            (
                "gauge",
                "requests_processing",
                "Number of requests processing.",
                inst.processing.load(Ordering::SeqCst).to_string(),
            ),
            (
                "gauge",
                "requests_deferred",
                "Number of requests deferred.",
                inst.deferred.load(Ordering::SeqCst).to_string(),
            ),
        ];
        let mut text = String::new();
        for (kind, name, help, value) in metrics {
            let _ = write!(
                text,
                "# HELP llamacpp:{name} {help}\n# TYPE llamacpp:{name} {kind}\nllamacpp:{name} {value}\n"
            );
        }
        Ok(respond(StatusCode::OK, "text/plain; version=0.0.4", text))
    }

    /// `/tokenize`: `{"tokens":[ids]}`, or `[{"id","piece"}]` with `with_pieces`; as many ids
    /// as `common::count_tokens(content)`, plus the BOS with `add_special`.
    pub(super) fn tokenize(&self, req: &Req) -> Handled {
        let content = req.str("content").unwrap_or_default();
        let flag = |k: &str| req.body.get(k).and_then(Value::as_bool).unwrap_or(false);
        let pieces = split_bytes(content);
        let ids = tokenize(content);
        let mut st = self.lock();
        for (id, p) in ids.iter().zip(&pieces) {
            st.vocab
                .entry(*id)
                .or_insert_with(|| String::from_utf8_lossy(p).into_owned());
        }
        drop(st);
        let mut out: Vec<(u32, Option<&[u8]>)> = Vec::new();
        if flag("add_special") {
            out.push((BOS, None));
        }
        out.extend(ids.iter().zip(&pieces).map(|(id, p)| (*id, Some(*p))));
        let tokens: Vec<J> = if flag("with_pieces") {
            out.iter()
                .map(|(id, piece)| {
                    let piece = match piece {
                        None => J::from(""),
                        Some(p) => match std::str::from_utf8(p) {
                            Ok(s) => J::from(s),
                            // Not valid UTF-8 on its own: the bytes, as the real server does.
                            Err(_) => J::from(p.iter().map(|b| u32::from(*b)).collect::<Vec<_>>()),
                        },
                    };
                    obj! {"id" => *id, "piece" => piece}
                })
                .collect()
        } else {
            out.iter().map(|(id, _)| J::from(*id)).collect()
        };
        Ok(ok(&obj! {"tokens" => tokens}))
    }

    /// `/detokenize`: the text of ids this server has produced (`/tokenize`, replies); others
    /// are empty.
    pub(super) fn detokenize(&self, req: &Req) -> Handled {
        let ids: Vec<u32> = match req.body.get("tokens") {
            Some(Value::Array(items)) => items
                .iter()
                .filter_map(Value::as_u64)
                .map(|i| u32::try_from(i).unwrap_or(u32::MAX))
                .collect(),
            _ => Vec::new(),
        };
        let st = self.lock();
        let content: String = ids
            .iter()
            .filter_map(|id| st.vocab.get(id).map(String::as_str))
            .collect();
        drop(st);
        Ok(ok(&obj! {"content" => content}))
    }

    /// `/apply-template`: the ChatML rendering of `messages`, with the generation prompt.
    pub(super) fn apply_template(&self, req: &Req) -> Handled {
        let messages = match req.body.get("messages") {
            Some(Value::Array(m)) => m,
            _ => return Err(Fail::invalid("'messages' is required")),
        };
        let mut prompt = String::new();
        for m in messages {
            let role = m.get("role").and_then(Value::as_str).unwrap_or("user");
            let _ = write!(
                prompt,
                "<|im_start|>{role}\n{}<|im_end|>\n",
                content_text(m.get("content"))
            );
        }
        prompt.push_str("<|im_start|>assistant\n");
        Ok(ok(&obj! {"prompt" => prompt}))
    }

    /// `POST /slots/{id}?action=save|restore|erase`; needs `--slot-save-path` (`slot_save`).
    pub(super) fn slot_action(self: &Arc<Self>, req: &Req, inst: &Instance, id: &str) -> Handled {
        if !self.cfg.slot_save {
            return Err(Fail::not_supported(
                "This server does not support slots action. Start it with `--slot-save-path`",
            ));
        }
        let n_slots = inst.lock_slots().len();
        let id = match id.parse::<usize>() {
            Ok(i) if i < n_slots => i,
            _ => return Err(Fail::invalid("Invalid slot ID")),
        };
        let filename = req.str("filename").unwrap_or_default().to_string();
        let valid_name = !filename.is_empty()
            && !filename.contains(['/', '\\'])
            && filename != "."
            && filename != "..";
        let action = req.param("action").unwrap_or_default();
        if inst.lock_slots().get(id).is_some_and(|s| s.busy) && action != "erase" {
            return Err(Fail::invalid(format!("Slot {id} is busy")));
        }
        match action {
            "save" => {
                if !valid_name {
                    return Err(Fail::invalid("Invalid filename"));
                }
                let tokens = inst
                    .lock_slots()
                    .get(id)
                    .map(|s| s.tokens.clone())
                    .unwrap_or_default();
                let n = tokens.len();
                self.lock().saved.insert(filename.clone(), tokens);
                Ok(ok(&obj! {
                    "id_slot" => id,
                    "filename" => filename,
                    "n_saved" => n,
                    "n_written" => n as u64 * BYTES_PER_TOKEN,
                    "timings" => obj! {"save_ms" => n as f64 * 0.01},
                }))
            }
            "restore" => {
                if !valid_name {
                    return Err(Fail::invalid("Invalid filename"));
                }
                let saved = self.lock().saved.get(&filename).cloned();
                let Some(tokens) = saved else {
                    return Err(Fail::invalid(
                        "Unable to restore slot, no available space in KV cache or invalid slot \
                         save file",
                    ));
                };
                let n = tokens.len();
                if let Some(s) = inst.lock_slots().get_mut(id) {
                    s.tokens = tokens;
                }
                self.lock().restores += 1;
                Ok(ok(&obj! {
                    "id_slot" => id,
                    "filename" => filename,
                    "n_restored" => n,
                    "n_read" => n as u64 * BYTES_PER_TOKEN,
                    "timings" => obj! {"restore_ms" => n as f64 * 0.01},
                }))
            }
            "erase" => {
                let n = inst
                    .lock_slots()
                    .get_mut(id)
                    .map_or(0, |s| std::mem::take(&mut s.tokens).len());
                Ok(ok(&obj! {"id_slot" => id, "n_erased" => n}))
            }
            _ => Err(Fail::invalid("Invalid action")),
        }
    }
}

/// The 4-byte pieces `common::tokenize` hashes, one per token.
fn split_bytes(text: &str) -> Vec<&[u8]> {
    text.as_bytes().chunks(4).collect()
}

/// A float as Prometheus text (`1`, `0.5`).
fn fmt_f(v: f64) -> String {
    format!("{v}")
}
