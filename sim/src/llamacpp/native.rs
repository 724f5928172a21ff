//! The per-model routes that do not generate: `/props`, `/slots`, `/slots/{id}?action=`,
//! `/metrics`, `/tokenize`, `/detokenize` and `/apply-template`. In router mode they reach
//! the model's instance through the same routing as generation (`?model=` or body `model`).

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use http::{Response, StatusCode};
use serde_json::Value;

use super::generate::{content_text, generation_params};
use super::state::{Instance, Slot};
use super::wire::{obj, ok, Fail, J};
use super::{Handled, LlamaCppSim, Req, BUILD_INFO};
use crate::common::{respond, tokenize, SimBody};

/// Beginning-of-sequence id, prepended by `/tokenize` with `add_special`.
const BOS: u32 = 1;
/// Bytes of KV cache per token in a slot file (`n_written`), and of its header.
const BYTES_PER_TOKEN: u64 = 8192;
const FILE_HEADER: u64 = 36;
/// The chat template reported in `/props` (ChatML, what `/apply-template` renders).
const CHAT_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + \
    '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt \
    %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// Where a model's file lives (`model_path`, router `args`).
pub(super) fn model_path(name: &str) -> String {
    format!("/models/{name}.gguf")
}

impl LlamaCppSim {
    fn slot_json(&self, inst: &Instance, id: usize, slot: &Slot) -> J {
        obj! {
            "id" => id,
            "n_ctx" => inst.n_ctx,
            "speculative" => false,
            "is_processing" => slot.busy,
            "id_task" => slot.id_task,
            "n_prompt_tokens" => slot.n_prompt,
            "n_prompt_tokens_processed" => slot.n_prompt - slot.n_cached,
            "n_prompt_tokens_cache" => slot.n_cached,
            "params" => generation_params(false),
            "next_token" => vec![obj! {
                "has_next_token" => true,
                "has_new_line" => false,
                "n_remain" => -1i32,
                "n_decoded" => 0u32,
            }],
        }
    }

    /// `/props` of a model (single mode, or a router child), as a current build answers.
    pub(super) fn props(&self, inst: &Instance) -> Response<SimBody> {
        let m = &inst.model;
        ok(&obj! {
            "default_generation_settings" => obj! {
                "params" => generation_params(false),
                "n_ctx" => inst.n_ctx,
            },
            "total_slots" => self.cfg.parallel.max(1),
            "model_alias" => m.name.as_str(),
            "model_ftype" => m.quantization.as_str(),
            "model_path" => model_path(&m.name),
            "modalities" => obj! {"vision" => false, "video" => false, "audio" => false},
            "endpoint_slots" => true,
            "endpoint_props" => false,
            "endpoint_metrics" => self.cfg.metrics,
            "ui" => true,
            "ui_settings" => obj! {},
            "chat_template" => CHAT_TEMPLATE,
            "chat_template_caps" => obj! {
                "supports_string_content" => true,
                "supports_system_role" => true,
                "supports_tool_calls" => false,
                "supports_tools" => false,
            },
            "bos_token" => "<|im_start|>",
            "eos_token" => "<|im_end|>",
            "build_info" => BUILD_INFO,
            "is_sleeping" => false,
            "cors_proxy_enabled" => false,
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
            .map(|(i, s)| self.slot_json(inst, i, s))
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
        let gauge = |a: &std::sync::atomic::AtomicUsize| a.load(Ordering::SeqCst).to_string();
        let metrics: [(&str, &str, &str, String); 12] = [
            ("counter", "prompt_tokens_total", "Number of prompt tokens processed, excluding cached tokens", prompt.to_string()),
            ("counter", "prompt_tokens_cached_total", "Number of prompt tokens reused from the cache", load(&inst.prompt_tokens_cached_total).to_string()),
            ("counter", "prompt_seconds_total", "Total time spent processing prompts", fmt_f(prompt as f64 * 0.0005)),
            ("counter", "tokens_predicted_total", "Number of generation tokens processed", predicted.to_string()),
            ("counter", "tokens_predicted_seconds_total", "Total time spent generating tokens", fmt_f(predicted as f64 * per_token_s)),
            ("counter", "n_decode_total", "Total number of llama_decode() calls, excluding speculative decoding and multimodal decoding", load(&inst.decode_total).to_string()),
            ("counter", "n_tokens_max", "Largest observed sequence length (prompt + generation)", load(&inst.n_tokens_max).to_string()),
            ("gauge", "prompt_tokens_seconds", "Average prompt throughput in tokens/s", fmt_f(if prompt > 0 { 2000.0 } else { 0.0 })),
            ("gauge", "predicted_tokens_seconds", "Average generation throughput in tokens/s", fmt_f(if predicted > 0 { 1.0 / per_token_s } else { 0.0 })),
            ("gauge", "requests_processing", "Number of requests processing", gauge(&inst.processing)),
            ("gauge", "requests_deferred", "Number of requests deferred", gauge(&inst.deferred)),
            ("gauge", "n_busy_slots_per_decode", "Average number of busy slots per llama_decode() call", "1".to_string()),
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
        // A current build accepts any number here: a slot it does not have saves nothing.
        let Ok(id) = id.parse::<usize>() else {
            return Err(Fail::invalid("Invalid slot ID"));
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
                    "n_written" => FILE_HEADER + n as u64 * BYTES_PER_TOKEN,
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
                        "Unable to restore slot: No available space in KV cache or invalid slot \
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
                    "n_read" => FILE_HEADER + n as u64 * BYTES_PER_TOKEN,
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
