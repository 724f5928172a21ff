//! Runner options under memory pressure: the design record's BufferConfig (docs/design.md)
//! applied to what the proxy loads. The rule is written once, here; the actor applies it to
//! every load it starts, and the data plane reads it only to predict the window a load it
//! is about to wait for will get (to fit a conversation before it takes a lease).
//!
//! | level    | a new load gets                                                         |
//! |----------|-------------------------------------------------------------------------|
//! | normal   | the provider's defaults (nothing sent)                                  |
//! | warning  | `num_ctx` = `buffers.context.initial`                                   |
//! | critical | `num_ctx` = half of that (at least 512); Ollama also a `num_batch` whose |
//! |          | compute buffers fit `buffers.working.initial` (`memory::batch`)          |
//!
//! A request's own smaller value is kept ("capped at", never raised). A request that the
//! capped context cannot hold, even compacted, is not refused for it (issue 19): the data plane
//! works out the least context that fits it (at most `buffers.context.max`) and asks for at
//! least that ([`LoadAsk::AtLeast`]); the load gets it, and a runner already loaded smaller is
//! reloaded at that size once its requests are done ("reshape", in the actor). Shrinking may
//! cost quality, never availability. LM Studio gets its
//! context through its load API (requests there cannot change a loaded model's context, and
//! have no `num_batch`); llama-server's router takes no options per load, so it gets none.
//!
//! # Why Ollama's requests carry the runner's options
//!
//! Ollama compares each request's runner options (`num_ctx`, `num_batch`, ...: the model's
//! defaults plus the request's `options`) with the loaded runner's, and reloads the model
//! when they differ (`server/sched.go`, `needsReload`). A model the proxy loaded with a
//! smaller `num_ctx` would be reloaded at the default by the next ordinary request, undoing
//! the saving and costing a load. So while such a runner is loaded, every native request for
//! it (`/api/chat`, `/api/generate`, `/api/embed`, `/api/embeddings`) is given the same
//! `options.num_ctx` / `num_batch` once it holds its lease (the runner's options are fixed
//! while a lease is out), and the response says so in `x-llm-warden-num-ctx` /
//! `x-llm-warden-num-batch` (`<sent or "default">-><forwarded>`). Models loaded with the
//! defaults (at normal pressure, or by someone else) are left alone.
//!
//! Ollama's OpenAI-compatible `/v1/*` cannot carry runner options, so a `/v1` request for a
//! model loaded smaller makes Ollama reload it at its defaults (the poll then sees the new
//! context and the actor stops publishing the smaller runner, and tells Ollama `keep_alive:
//! -1` again for it: the reloaded runner has Ollama's default keep-alive, see the actor's
//! `apply_report`). A load started for a request
//! that cannot carry options ([`LoadAsk::Defaults`]) therefore gets the provider's defaults.

use crate::memory::MIB;
use crate::monitor::Level;
use crate::providers::ProviderKind;

use super::Shape;

/// The smallest `num_ctx` the proxy asks for at critical.
pub const MIN_CONTEXT: u64 = 512;

/// What a request (or the admin API, or the summarizer) asks of a load it may start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoadAsk {
    /// It carries these runner options (none: the provider's defaults), and will carry the
    /// runner's: the load gets the smaller of these and the pressure cap.
    Options(Shape),
    /// As `Options`, and the context must be at least this many tokens: the request does
    /// not fit a smaller one (the cap is raised to it; a runner loaded smaller is reloaded).
    AtLeast(Shape, u64),
    /// It cannot carry runner options (Ollama's `/v1/*`): the provider's defaults.
    Defaults,
}

impl LoadAsk {
    /// The least context the asker can be served with, if it needs more than any.
    pub fn floor(&self) -> Option<u64> {
        match self {
            LoadAsk::AtLeast(_, floor) => Some(*floor),
            _ => None,
        }
    }

    /// Whether a runner with these options can serve the asker (`None`: any context).
    pub fn served_by(&self, runner: Shape) -> bool {
        match (self.floor(), runner.num_ctx) {
            (Some(floor), Some(n)) => n >= floor,
            _ => true,
        }
    }
}

impl Default for LoadAsk {
    fn default() -> Self {
        LoadAsk::Options(Shape::default())
    }
}

/// What memory pressure allows a new load: a context, and (Ollama) a budget for the
/// compute buffers that `num_batch` must fit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cap {
    pub num_ctx: Option<u64>,
    /// Bytes; the load's `num_batch` is chosen from the model's geometry to fit it.
    pub batch_budget: Option<u64>,
}

/// The cap at `level` for a provider of `kind`, from `buffers.context.initial` (tokens) and
/// `buffers.working.initial` (MB).
pub fn cap(kind: ProviderKind, level: Level, context_initial: u64, working_mb: u64) -> Cap {
    if kind == ProviderKind::LlamaCpp {
        return Cap::default();
    }
    match level {
        Level::Normal => Cap::default(),
        Level::Warning => Cap {
            num_ctx: Some(context_initial),
            batch_budget: None,
        },
        Level::Critical => Cap {
            num_ctx: Some((context_initial / 2).max(MIN_CONTEXT)),
            batch_budget: (kind == ProviderKind::Ollama).then_some(working_mb * MIB),
        },
    }
}

/// The context a load gets: the smaller of the cap and what was asked, raised to the least
/// that its waiters need (`floor`).
pub fn context(cap: Option<u64>, asked: Option<u64>, floor: Option<u64>) -> Option<u64> {
    match (capped(cap, asked), floor) {
        (Some(n), Some(f)) => Some(n.max(f)),
        (n, f) => n.or(f),
    }
}

/// The smaller of a cap and what was asked (`None`: no value on that side).
pub fn capped(cap: Option<u64>, asked: Option<u64>) -> Option<u64> {
    match (cap, asked) {
        (Some(c), Some(a)) => Some(a.min(c)),
        (c, a) => c.or(a),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rule_by_level_and_kind() {
        use ProviderKind::*;
        let table = [
            (Ollama, Level::Normal, None, None),
            (Ollama, Level::Warning, Some(4096), None),
            (Ollama, Level::Critical, Some(2048), Some(256 * MIB)),
            (LmStudio, Level::Warning, Some(4096), None),
            (LmStudio, Level::Critical, Some(2048), None),
            (LlamaCpp, Level::Critical, None, None),
        ];
        for (kind, level, num_ctx, batch_budget) in table {
            assert_eq!(
                cap(kind, level, 4096, 256),
                Cap {
                    num_ctx,
                    batch_budget
                },
                "{kind:?} {level:?}"
            );
        }
        assert_eq!(
            cap(Ollama, Level::Critical, 600, 1).num_ctx,
            Some(MIN_CONTEXT)
        );
    }

    #[test]
    fn capped_never_raises() {
        assert_eq!(capped(Some(2048), Some(8192)), Some(2048));
        assert_eq!(capped(Some(2048), Some(1024)), Some(1024));
        assert_eq!(capped(Some(2048), None), Some(2048));
        assert_eq!(capped(None, Some(8192)), Some(8192));
        assert_eq!(capped(None, None), None);
    }

    #[test]
    fn a_floor_raises_the_cap_and_nothing_else() {
        assert_eq!(context(Some(512), None, Some(1024)), Some(1024));
        assert_eq!(context(Some(512), Some(8192), Some(700)), Some(700));
        assert_eq!(context(Some(2048), None, Some(1024)), Some(2048));
        assert_eq!(context(Some(2048), Some(1024), None), Some(1024));
        assert_eq!(context(None, None, Some(900)), Some(900));
        assert_eq!(context(None, None, None), None);
        let ask = LoadAsk::AtLeast(Shape::default(), 1024);
        assert!(!ask.served_by(Shape {
            num_ctx: Some(512),
            num_batch: None
        }));
        assert!(ask.served_by(Shape {
            num_ctx: Some(1024),
            num_batch: None
        }));
        assert!(ask.served_by(Shape::default()), "the provider's own window");
        assert!(LoadAsk::default().served_by(Shape {
            num_ctx: Some(512),
            num_batch: None
        }));
    }
}
