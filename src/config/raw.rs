//! The TOML document as written: every key optional, unknown keys refused. Only
//! `validate` in the parent module reads these types.
//!
//! [`read`] turns the text into a [`RawConfig`] without stopping at the first unknown key or
//! wrong type: each one is noted with its key path and line, taken out of the document, and
//! the rest read again, so one bad entry hides nothing else. Only a TOML syntax error ends it.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::Problem;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default, expecting = "a table")]
pub(super) struct RawConfig {
    pub(super) admin: RawAdmin,
    pub(super) proxy: RawProxy,
    pub(super) providers: Option<Vec<RawProvider>>,
    pub(super) pools: Option<Vec<RawPool>>,
    pub(super) epp: Option<RawEpp>,
    pub(super) limits: RawLimits,
    pub(super) queue: RawQueue,
    pub(super) buffers: RawBuffers,
    pub(super) memory_pressure: RawPressure,
    pub(super) compaction: RawCompaction,
    pub(super) models: BTreeMap<String, RawModel>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default, expecting = "a table")]
pub(super) struct RawAdmin {
    pub(super) listen: Option<String>,
    pub(super) token: Option<String>,
    pub(super) allowed_hosts: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default, expecting = "a table")]
pub(super) struct RawProxy {
    pub(super) max_request_body: Option<String>,
    pub(super) connect_timeout: Option<String>,
    pub(super) response_timeout: Option<String>,
    pub(super) max_connections: Option<u32>,
    pub(super) header_read_timeout: Option<String>,
    pub(super) body_read_timeout: Option<String>,
    pub(super) shutdown_grace: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default, expecting = "a table")]
pub(super) struct RawProvider {
    pub(super) name: Option<String>,
    /// Required; `validate` says so when it is missing.
    pub(super) kind: Option<String>,
    pub(super) listen: Option<String>,
    pub(super) upstream: Option<String>,
    pub(super) poll_interval: Option<String>,
    pub(super) max_models_loaded: Option<u32>,
    pub(super) memory_threshold: Option<f64>,
    pub(super) slot_save: Option<bool>,
    pub(super) api_keys: Option<Vec<String>>,
    pub(super) upstream_api_key: Option<String>,
    pub(super) allowed_hosts: Option<Vec<String>>,
    pub(super) num_parallel: Option<u32>,
    pub(super) kv_cache_type: Option<String>,
}

/// `[[pools]]`: a front over llm-warden nodes (the `fleet` module).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default, expecting = "a table")]
pub(super) struct RawPool {
    pub(super) name: Option<String>,
    pub(super) kind: Option<String>,
    pub(super) listen: Option<String>,
    pub(super) poll_interval: Option<String>,
    pub(super) nodes: Option<Vec<RawNode>>,
}

/// `[epp]`: the endpoint picker for Envoy (the `fleet` module).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default, expecting = "a table")]
pub(super) struct RawEpp {
    pub(super) listen: Option<String>,
    pub(super) pool: Option<String>,
}

/// One node of a pool: `{ url, admin, token }` (other tools rely on these names).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default, expecting = "a table")]
pub(super) struct RawNode {
    pub(super) name: Option<String>,
    pub(super) url: Option<String>,
    pub(super) admin: Option<String>,
    pub(super) token: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default, expecting = "a table")]
pub(super) struct RawLimits {
    pub(super) max_models_loaded: Option<u32>,
    pub(super) memory_threshold: Option<f64>,
    pub(super) inactivity_timeout: Option<String>,
    pub(super) unload_on_shutdown: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default, expecting = "a table")]
pub(super) struct RawQueue {
    pub(super) max_waiting: Option<u32>,
    pub(super) timeout: Option<String>,
    pub(super) policy: Option<String>,
    pub(super) aging: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default, expecting = "a table")]
pub(super) struct RawBuffers {
    pub(super) context: RawContextBuffer,
    pub(super) working: RawWorkingBuffer,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default, expecting = "a table")]
pub(super) struct RawContextBuffer {
    pub(super) initial: Option<u32>,
    pub(super) max: Option<u32>,
    pub(super) compression_threshold: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default, expecting = "a table")]
pub(super) struct RawWorkingBuffer {
    pub(super) initial: Option<u32>,
    pub(super) max: Option<u32>,
    pub(super) optimization_threshold: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default, expecting = "a table")]
pub(super) struct RawPressure {
    pub(super) warning: Option<f64>,
    pub(super) critical: Option<f64>,
    pub(super) action: Option<String>,
    pub(super) hysteresis: Option<f64>,
    pub(super) sample_interval: Option<String>,
    pub(super) gpu: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default, expecting = "a table")]
pub(super) struct RawCompaction {
    pub(super) on_overflow: Option<String>,
    pub(super) prune: Option<bool>,
    pub(super) summarizer_provider: Option<String>,
    pub(super) summarizer_model: Option<String>,
    pub(super) summarizer_timeout: Option<String>,
    pub(super) summary_max_tokens: Option<u32>,
    pub(super) keep_recent_share: Option<f64>,
    pub(super) reply_reserve: Option<u32>,
    pub(super) cache_dir: Option<String>,
    pub(super) cache_entries: Option<u32>,
    pub(super) normalize_num_ctx: Option<bool>,
    pub(super) tokenizer: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default, expecting = "a table")]
pub(super) struct RawModel {
    pub(super) inactivity_timeout: Option<String>,
    pub(super) pinned: Option<bool>,
    pub(super) memory: Option<String>,
    pub(super) tokenizer: Option<String>,
    pub(super) context_window: Option<u32>,
    pub(super) compression_threshold: Option<f64>,
    pub(super) on_overflow: Option<String>,
    pub(super) prune: Option<bool>,
}

// === reading, every problem at once ===

/// One step of a key path: a table's key or an array's index.
#[derive(Clone, Debug, PartialEq)]
enum Step {
    Key(String),
    Index(usize),
}

/// Structural problems one document may produce before reading stops: each costs one more
/// pass over the document, and nobody reads past the first screenful anyway.
const MAX_PROBLEMS: usize = 100;

/// Reads `text` into a [`RawConfig`], with every unknown key and every value of the wrong
/// type as a [`Problem`] (in the order they appear in the file). The entry at each problem's
/// path is left out of the `RawConfig` (a `[[providers]]` entry that is not a table becomes
/// an empty one, so the indices of the others stay). `Err`: the problems when the document
/// cannot be read at all (a TOML syntax error: one problem).
pub(super) fn read(text: &str) -> Result<(RawConfig, Vec<Problem>), Vec<Problem>> {
    let mut doc: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        vec![Problem {
            path: String::new(),
            message: format!(
                "{}{}",
                e.message(),
                line_suffix(text, e.span().map(|s| s.start))
            ),
        }]
    })?;
    // The same text with its places kept, only to say on which line a problem is.
    let placed = toml_edit::ImDocument::parse(text).ok();
    let mut found: Vec<(Option<usize>, Problem)> = Vec::new();
    let outcome = loop {
        let value = toml::Value::Table(doc.clone());
        let e = match serde_path_to_error::deserialize::<_, RawConfig>(value) {
            Ok(raw) => break Ok(raw),
            Err(e) => e,
        };
        let steps = steps(e.path());
        let start = placed.as_ref().and_then(|d| place(d, &steps));
        let message = suggest(e.inner().message());
        found.push((
            start,
            Problem {
                path: show(&steps),
                message: format!("{message}{}", line_suffix(text, start)),
            },
        ));
        // Taking the entry out must change the document, or the next pass would fail the
        // same way.
        if found.len() >= MAX_PROBLEMS || !prune(&mut doc, &steps) {
            break Err(());
        }
    };
    // Stable: problems at one place keep the order they were found in.
    found.sort_by_key(|(at, _)| at.unwrap_or(usize::MAX));
    let problems = found.into_iter().map(|(_, p)| p).collect();
    match outcome {
        Ok(raw) => Ok((raw, problems)),
        Err(()) => Err(problems),
    }
}

/// ` (line N)` for a byte offset into `text`, else nothing.
fn line_suffix(text: &str, at: Option<usize>) -> String {
    at.map(|at| {
        let line = text.as_bytes()[..at.min(text.len())]
            .iter()
            .filter(|b| **b == b'\n')
            .count()
            + 1;
        format!(" (line {line})")
    })
    .unwrap_or_default()
}

fn steps(path: &serde_path_to_error::Path) -> Vec<Step> {
    use serde_path_to_error::Segment;
    path.iter()
        .map_while(|s| match s {
            Segment::Map { key } => Some(Step::Key(key.clone())),
            Segment::Seq { index } => Some(Step::Index(*index)),
            Segment::Enum { .. } | Segment::Unknown => None,
        })
        .collect()
}

/// A path as `validate` writes them: `providers[1].kind`, `models."llama3.2:3b".memory`.
fn show(steps: &[Step]) -> String {
    let mut out = String::new();
    for (n, step) in steps.iter().enumerate() {
        match step {
            Step::Index(i) => out.push_str(&format!("[{i}]")),
            Step::Key(k) => {
                if n > 0 {
                    out.push('.');
                }
                let bare = !k.is_empty()
                    && k.chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'));
                let model_name = n == 1 && steps[0] == Step::Key("models".into());
                if bare && !model_name {
                    out.push_str(k);
                } else {
                    out.push_str(&format!("{k:?}"));
                }
            }
        }
    }
    out
}

/// Where the deepest part of `steps` that is in the document starts (byte offset).
fn place(doc: &toml_edit::ImDocument<&str>, steps: &[Step]) -> Option<usize> {
    let mut item = doc.as_item();
    let mut at = None;
    for step in steps {
        let (key, next) = match step {
            Step::Key(k) => match item.as_table_like().and_then(|t| t.get_key_value(k)) {
                Some((key, next)) => (key.span(), next),
                None => break,
            },
            Step::Index(i) => match item.get(*i) {
                Some(next) => (None, next),
                None => break,
            },
        };
        item = next;
        at = key.or_else(|| item.span()).map(|s| s.start).or(at);
    }
    at
}

/// Takes the entry at `steps` out of `doc`; whether anything changed. An array's element goes
/// with its whole array (`api_keys = ["a", 5]`: the key is reported, not half read), except a
/// `[[providers]]` entry, which becomes an empty table so later entries keep their index.
fn prune(doc: &mut toml::Table, steps: &[Step]) -> bool {
    let Some((last, parents)) = steps.split_last() else {
        return false;
    };
    let Some((first, rest)) = parents.split_first() else {
        return match last {
            Step::Key(k) => doc.remove(k).is_some(),
            Step::Index(_) => false,
        };
    };
    let parent = match first {
        Step::Key(k) => doc.get_mut(k),
        Step::Index(_) => None,
    };
    let parent = rest.iter().try_fold(parent, |v, step| {
        Some(match (v, step) {
            (Some(toml::Value::Table(t)), Step::Key(k)) => t.get_mut(k),
            (Some(toml::Value::Array(a)), Step::Index(i)) => a.get_mut(*i),
            _ => return None,
        })
    });
    match (parent.flatten(), last) {
        (Some(toml::Value::Table(t)), Step::Key(k)) => t.remove(k).is_some(),
        (Some(toml::Value::Array(a)), Step::Index(i))
            if parents == [Step::Key("providers".into())] =>
        {
            match a.get_mut(*i) {
                Some(toml::Value::Table(t)) if t.is_empty() => false,
                Some(v) => {
                    *v = toml::Value::Table(toml::Table::new());
                    true
                }
                None => false,
            }
        }
        (Some(toml::Value::Array(_)), Step::Index(_)) => prune(doc, parents),
        _ => false,
    }
}

/// serde's "unknown field `x`, expected one of `a`, `b`" with the nearest known key named
/// first, when one is close enough to be a typo.
fn suggest(message: &str) -> String {
    let parts = message
        .strip_prefix("unknown field `")
        .and_then(|rest| rest.split_once("`, expected "));
    let nearest = parts.and_then(|(field, expected)| {
        expected
            .split('`')
            .skip(1)
            .step_by(2)
            .map(|known| (edit_distance(field, known), known))
            .min()
            .filter(|(d, _)| *d <= (field.chars().count() / 3).max(1))
    });
    match (parts, nearest) {
        (Some((field, expected)), Some((_, known))) => {
            format!("unknown field `{field}` (did you mean `{known}`?), expected {expected}")
        }
        _ => message.to_string(),
    }
}

/// Levenshtein distance, case-insensitive (keys are short).
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.to_lowercase().chars().collect();
    let b: Vec<char> = b.to_lowercase().chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let next = (diagonal + usize::from(ca != cb))
                .min(row[j] + 1)
                .min(row[j + 1] + 1);
            diagonal = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}
