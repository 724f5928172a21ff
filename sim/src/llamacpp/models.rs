//! The model lists and the router's control routes: `GET /models` (= `/v1/models` in router
//! mode) with each model's status, `POST /models/load` and `/models/unload`, the router's own
//! `/props`; and the single-mode `/v1/models` (= `/models`) with the model's `meta`.

use std::sync::Arc;

use super::native::model_path;
use super::state::{Entry, Instance, Phase};
use super::wire::{obj, ok, Fail, J};
use super::{Handled, LlamaCppSim, Req, BUILD_INFO};
use crate::common::SimBody;
use crate::SimModel;
use http::Response;

impl LlamaCppSim {
    /// The child's model facts (`/v1/models` `meta`).
    fn meta(&self, m: &SimModel) -> J {
        obj! {
            "vocab_type" => 2u32,
            "n_vocab" => 32000u32,
            "n_ctx" => self.cfg.n_ctx.min(m.context_length).max(1),
            "n_ctx_train" => m.context_length,
            "n_embd" => if m.embedding { self.cfg.embedding_dims } else { 4096 },
            "n_params" => parameter_count(&m.parameter_size),
            "size" => m.size_bytes,
            "ftype" => m.quantization.as_str(),
        }
    }

    /// The command line the router renders for a model's child.
    fn args(&self, name: &str, port: u16) -> Vec<String> {
        [
            "/usr/local/bin/llama-server",
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--alias",
            name,
            "--ctx-size",
            &self.cfg.n_ctx.to_string(),
            "--model",
            &model_path(name),
            "--parallel",
            &self.cfg.parallel.max(1).to_string(),
        ]
        .into_iter()
        .map(str::to_string)
        .collect()
    }

    fn router_entry(&self, name: &str, e: &Entry, created: u64) -> J {
        let mut status = obj! {
            "value" => e.status(),
            "args" => self.args(name, e.port),
            "preset" => format!(
                "[{name}]\nctx-size = {}\nmodel = {}\nparallel = {}\n\n",
                self.cfg.n_ctx,
                model_path(name),
                self.cfg.parallel.max(1)
            ),
        };
        if e.instance.is_none() && e.exit_code != 0 {
            status.push("exit_code", e.exit_code);
            status.push("failed", true);
        }
        let mut entry = obj! {
            "id" => name,
            "aliases" => J::Arr(Vec::new()),
            "tags" => J::Arr(Vec::new()),
            "object" => "model",
            "owned_by" => "llamacpp",
            "created" => created,
            "status" => status,
            "architecture" => obj! {
                "input_modalities" => vec!["text"],
                "output_modalities" => vec!["text"],
            },
            "source" => "models_dir",
            "can_remove" => false,
        };
        // The child's own model info is merged in once it has reported ready.
        if e.instance.as_ref().map(|i| i.phase()) == Some(Phase::Loaded) {
            entry.push("meta", self.meta(&e.model));
        }
        entry
    }

    pub(super) fn router_models(&self) -> Response<SimBody> {
        let created = self.clock.unix_secs();
        let st = self.lock();
        let data: Vec<J> = st
            .entries
            .iter()
            .map(|(name, e)| self.router_entry(name, e, created))
            .collect();
        drop(st);
        ok(&obj! {"data" => data, "object" => "list"})
    }

    /// Single mode: the one model, with its `meta`.
    pub(super) async fn single_models(self: &Arc<Self>) -> Handled {
        let inst: Arc<Instance> = self.route(None, false, false).await?;
        let m = &inst.model;
        Ok(ok(&obj! {
            "object" => "list",
            "data" => vec![obj! {
                "id" => m.name.as_str(),
                "object" => "model",
                "created" => self.clock.unix_secs(),
                "owned_by" => "llamacpp",
                "meta" => self.meta(m),
            }],
        }))
    }

    pub(super) fn router_props(&self) -> Response<SimBody> {
        ok(&obj! {
            "role" => "router",
            "max_instances" => self.cfg.models_max,
            "models_autoload" => self.cfg.autoload,
            "model_alias" => "llama-server",
            "model_path" => "none",
            "default_generation_settings" => obj! {"params" => J::Null, "n_ctx" => 0u32},
            "ui_settings" => obj! {},
            "build_info" => BUILD_INFO,
            "cors_proxy_enabled" => false,
        })
    }

    /// `POST /models/load`: starts the load and answers at once.
    pub(super) fn load_model(self: &Arc<Self>, req: &Req) -> Handled {
        let name = req.str("model").unwrap_or_default();
        let mut st = self.lock();
        match st.entries.get(name) {
            // The handler's "model is not found" body is replaced by the HTTP layer's 404 page.
            None => return Err(Fail::not_found("model is not found")),
            Some(e) if e.instance.is_some() => {
                return Err(Fail::invalid("model is already running"))
            }
            Some(_) => {}
        }
        self.start_load(&mut st, name);
        drop(st);
        Ok(ok(&obj! {"success" => true}))
    }

    /// `POST /models/unload`: stops the child at once, busy or not.
    pub(super) fn unload_model(&self, req: &Req) -> Handled {
        let name = req.str("model").unwrap_or_default();
        let mut st = self.lock();
        match st.entries.get(name) {
            None => return Err(Fail::invalid("model is not found")),
            Some(e) if e.instance.is_none() => return Err(Fail::invalid("model is not running")),
            Some(_) => {}
        }
        self.unload_entry(&mut st, name);
        drop(st);
        Ok(ok(&obj! {"success" => true}))
    }
}

/// `7.6B` → 7 600 000 000, `137M` → 137 000 000.
fn parameter_count(size: &str) -> u64 {
    let (num, scale) = match size.chars().last() {
        Some('B' | 'b') => (&size[..size.len() - 1], 1e9),
        Some('M' | 'm') => (&size[..size.len() - 1], 1e6),
        _ => (size, 1.0),
    };
    num.parse::<f64>().map_or(0, |n| (n * scale).round() as u64)
}
