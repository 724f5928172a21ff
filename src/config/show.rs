//! The effective config written back as TOML (`llm-warden check-config`): every key with the
//! value in force, defaults filled in, in the file's own units, so the output is itself a
//! valid config that loads to the same values.

use std::time::Duration;

use toml::{Table, Value};

use super::{Config, OverflowPolicy, PressureAction, QueuePolicy};

fn duration(d: Duration) -> Value {
    Value::String(humantime::format_duration(d).to_string().replace(' ', ""))
}

fn size(bytes: u64) -> Value {
    let s = if bytes > 0 && bytes.is_multiple_of(1 << 30) {
        format!("{}GiB", bytes >> 30)
    } else if bytes > 0 && bytes.is_multiple_of(1 << 20) {
        format!("{}MiB", bytes >> 20)
    } else if bytes > 0 && bytes.is_multiple_of(1 << 10) {
        format!("{}KiB", bytes >> 10)
    } else {
        format!("{bytes}B")
    };
    Value::String(s)
}

fn int(n: impl Into<i64>) -> Value {
    Value::Integer(n.into())
}

fn strings(list: &[String]) -> Value {
    Value::Array(list.iter().map(|x| Value::String(x.clone())).collect())
}

fn s(v: impl Into<String>) -> Value {
    Value::String(v.into())
}

fn table<const N: usize>(entries: [(&str, Value); N]) -> Value {
    Value::Table(
        entries
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
    )
}

pub(super) fn overflow_name(p: OverflowPolicy) -> &'static str {
    match p {
        OverflowPolicy::Summarize => "summarize",
        OverflowPolicy::TruncateOldest => "truncate_oldest",
        OverflowPolicy::Reject => "reject",
        OverflowPolicy::Passthrough => "passthrough",
    }
}

impl Config {
    /// Every setting in force, as a TOML document that loads back to the same values.
    pub fn to_toml(&self) -> String {
        let mut doc = Table::new();
        // Secrets from the environment are not written out; those from the file are, since
        // the output stands for the file.
        let file_secret = |t: &super::Secret| (!t.from_env).then(|| s(t.expose()));
        let mut admin = Table::new();
        admin.insert("listen".into(), s(self.admin.listen.to_string()));
        if let Some(t) = self.admin.token.as_ref().and_then(file_secret) {
            admin.insert("token".into(), t);
        }
        if !self.admin.allowed_hosts.is_empty() {
            admin.insert("allowed_hosts".into(), strings(&self.admin.allowed_hosts));
        }
        doc.insert("admin".into(), Value::Table(admin));
        let p = &self.proxy;
        doc.insert(
            "proxy".into(),
            table([
                ("max_request_body", size(p.max_request_body)),
                ("connect_timeout", duration(p.connect_timeout)),
                ("response_timeout", duration(p.response_timeout)),
                ("max_connections", int(p.max_connections)),
                ("header_read_timeout", duration(p.header_read_timeout)),
                ("body_read_timeout", duration(p.body_read_timeout)),
                ("shutdown_grace", duration(p.shutdown_grace)),
            ]),
        );
        let providers = self
            .providers
            .iter()
            .map(|p| {
                let mut t = Table::new();
                t.insert("name".into(), s(p.name.clone()));
                t.insert("kind".into(), s(p.kind.as_str()));
                t.insert("listen".into(), s(p.listen.to_string()));
                t.insert("upstream".into(), s(p.upstream.to_string()));
                t.insert("poll_interval".into(), duration(p.poll_interval));
                t.insert("max_models_loaded".into(), int(p.max_models_loaded));
                t.insert("memory_threshold".into(), Value::Float(p.memory_threshold));
                if p.slot_save {
                    t.insert("slot_save".into(), Value::Boolean(true));
                }
                let keys: Vec<Value> = p.api_keys.iter().filter_map(file_secret).collect();
                if !keys.is_empty() {
                    t.insert("api_keys".into(), Value::Array(keys));
                }
                if let Some(k) = p.upstream_api_key.as_ref().and_then(file_secret) {
                    t.insert("upstream_api_key".into(), k);
                }
                if !p.allowed_hosts.is_empty() {
                    t.insert("allowed_hosts".into(), strings(&p.allowed_hosts));
                }
                if p.num_parallel != 1 {
                    t.insert("num_parallel".into(), int(p.num_parallel));
                }
                if p.kv_cache_type != "f16" {
                    t.insert("kv_cache_type".into(), s(p.kv_cache_type.clone()));
                }
                Value::Table(t)
            })
            .collect();
        doc.insert("providers".into(), Value::Array(providers));
        if !self.pools.is_empty() {
            let pools = self
                .pools
                .iter()
                .map(|p| {
                    let nodes = p
                        .nodes
                        .iter()
                        .map(|n| {
                            let mut t = Table::new();
                            t.insert("name".into(), s(n.name.clone()));
                            t.insert("url".into(), s(n.url.to_string()));
                            t.insert("admin".into(), s(n.admin.to_string()));
                            if let Some(k) = n.token.as_ref().and_then(file_secret) {
                                t.insert("token".into(), k);
                            }
                            Value::Table(t)
                        })
                        .collect();
                    table([
                        ("name", s(p.name.clone())),
                        ("kind", s(p.kind.as_str())),
                        ("listen", s(p.listen.to_string())),
                        ("poll_interval", duration(p.poll_interval)),
                        ("nodes", Value::Array(nodes)),
                    ])
                })
                .collect();
            doc.insert("pools".into(), Value::Array(pools));
        }
        if let Some(e) = &self.epp {
            doc.insert(
                "epp".into(),
                table([
                    ("listen", s(e.listen.to_string())),
                    ("pool", s(e.pool.clone())),
                ]),
            );
        }
        doc.insert(
            "limits".into(),
            table([
                ("max_models_loaded", int(self.limits.max_models_loaded)),
                (
                    "memory_threshold",
                    Value::Float(self.limits.memory_threshold),
                ),
                (
                    "inactivity_timeout",
                    duration(self.limits.inactivity_timeout),
                ),
                (
                    "unload_on_shutdown",
                    Value::Boolean(self.limits.unload_on_shutdown),
                ),
            ]),
        );
        doc.insert(
            "queue".into(),
            table([
                ("max_waiting", int(self.queue.max_waiting)),
                ("timeout", duration(self.queue.timeout)),
                (
                    "policy",
                    s(match self.queue.policy {
                        QueuePolicy::Grouped => "grouped",
                        QueuePolicy::Fifo => "fifo",
                    }),
                ),
                ("aging", duration(self.queue.aging)),
            ]),
        );
        let b = &self.buffers;
        doc.insert(
            "buffers".into(),
            table([
                (
                    "context",
                    table([
                        ("initial", int(b.context_initial)),
                        ("max", int(b.context_max)),
                        (
                            "compression_threshold",
                            Value::Float(b.compression_threshold),
                        ),
                    ]),
                ),
                (
                    "working",
                    table([
                        ("initial", int(b.working_initial)),
                        ("max", int(b.working_max)),
                        (
                            "optimization_threshold",
                            Value::Float(b.optimization_threshold),
                        ),
                    ]),
                ),
            ]),
        );
        let m = &self.memory_pressure;
        doc.insert(
            "memory_pressure".into(),
            table([
                ("warning", Value::Float(m.warning)),
                ("critical", Value::Float(m.critical)),
                (
                    "action",
                    s(match m.action {
                        PressureAction::Compress => "compress",
                        PressureAction::Unload => "unload",
                        PressureAction::Cache => "cache",
                    }),
                ),
                ("hysteresis", Value::Float(m.hysteresis)),
                ("sample_interval", duration(m.sample_interval)),
                ("gpu", Value::Boolean(m.gpu)),
            ]),
        );
        let c = &self.compaction;
        let mut ct = Table::new();
        ct.insert("on_overflow".into(), s(overflow_name(c.on_overflow)));
        ct.insert("prune".into(), Value::Boolean(c.prune));
        if let Some(p) = &c.summarizer_provider {
            ct.insert("summarizer_provider".into(), s(p.clone()));
        }
        if let Some(m) = &c.summarizer_model {
            ct.insert("summarizer_model".into(), s(m.clone()));
        }
        ct.insert("summarizer_timeout".into(), duration(c.summarizer_timeout));
        ct.insert("summary_max_tokens".into(), int(c.summary_max_tokens));
        ct.insert(
            "keep_recent_share".into(),
            Value::Float(c.keep_recent_share),
        );
        ct.insert("reply_reserve".into(), int(c.reply_reserve));
        if let Some(d) = &c.cache_dir {
            ct.insert("cache_dir".into(), s(d.display().to_string()));
        }
        ct.insert("cache_entries".into(), int(c.cache_entries));
        ct.insert(
            "normalize_num_ctx".into(),
            Value::Boolean(c.normalize_num_ctx),
        );
        if let Some(t) = &c.tokenizer {
            ct.insert("tokenizer".into(), s(t.clone()));
        }
        doc.insert("compaction".into(), Value::Table(ct));
        let mut models = Table::new();
        for (name, o) in &self.models {
            let mut t = Table::new();
            if let Some(d) = o.inactivity_timeout {
                t.insert("inactivity_timeout".into(), duration(d));
            }
            if o.pinned {
                t.insert("pinned".into(), Value::Boolean(true));
            }
            if let Some(m) = o.memory {
                t.insert("memory".into(), size(m));
            }
            if let Some(tk) = &o.tokenizer {
                t.insert("tokenizer".into(), s(tk.clone()));
            }
            if let Some(w) = o.context_window {
                t.insert("context_window".into(), int(w));
            }
            if let Some(x) = o.compression_threshold {
                t.insert("compression_threshold".into(), Value::Float(x));
            }
            if let Some(p) = o.on_overflow {
                t.insert("on_overflow".into(), s(overflow_name(p)));
            }
            if let Some(p) = o.prune {
                t.insert("prune".into(), Value::Boolean(p));
            }
            models.insert(name.clone(), Value::Table(t));
        }
        if !models.is_empty() {
            doc.insert("models".into(), Value::Table(models));
        }
        toml::to_string(&doc).unwrap_or_else(|e| format!("# cannot write the config: {e}\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::super::load_str;

    #[test]
    fn the_effective_config_loads_back_to_itself() {
        let text = "[limits]\ninactivity_timeout = \"90s\"\n[proxy]\nmax_request_body = \"3MiB\"\n\
                    [[providers]]\nkind = \"llamacpp\"\nslot_save = true\n\
                    [models.\"llama3.2\"]\npinned = true\nmemory = \"2GiB\"\non_overflow = \"reject\"\ncontext_window = 8192\n";
        let first = load_str(text).expect("valid");
        let shown = first.to_toml();
        let again = load_str(&shown).unwrap_or_else(|e| panic!("{e}\n{shown}"));
        assert_eq!(again.to_toml(), shown);
        assert!(shown.contains("inactivity_timeout = \"1m30s\""), "{shown}");
        assert!(shown.contains("max_request_body = \"3MiB\""), "{shown}");
        assert!(shown.contains("slot_save = true"), "{shown}");
        assert!(shown.contains("kind = \"llamacpp\""), "{shown}");
        // Defaults filled in.
        let defaults = load_str("").expect("defaults").to_toml();
        assert!(defaults.contains("[[providers]]") && defaults.contains("policy = \"grouped\""));
        assert_eq!(load_str(&defaults).expect("reloads").to_toml(), defaults);
    }
}
