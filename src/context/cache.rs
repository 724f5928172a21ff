//! The summary cache: a summary of evicted messages, keyed by a stable hash of (model,
//! summarizer prompt tag, the exact messages), kept in a bounded in-memory LRU in front of an
//! optional redb file, so the next turn of the same conversation, also after a restart, makes
//! no summarizer call for an unchanged prefix.
//!
//! It owns storage only: deciding what to summarize, and calling the summarizer, live elsewhere.
//! The disk tier is best effort: a read or write error, or a value that does not decode, is
//! logged and treated as a miss; nothing here fails a request.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// At most this many summaries stay on disk; past it, the oldest by [`Summary::created`] go.
/// A summary is a few KiB, so the file stays in the hundreds of MiB at worst.
pub const DISK_MAX_ENTRIES: u64 = 100_000;

/// The file name inside a cache directory (`[compaction] cache_dir`).
pub const FILE_NAME: &str = "summaries.redb";

/// redb's page cache. Its default is 1 GiB; lookups here are point reads of small values, so a
/// little suffices and the proxy stays small next to the models it serves.
const DISK_PAGE_CACHE_BYTES: usize = 8 << 20;

/// The first bytes of every redb file (redb's `MAGICNUMBER`, file format 2).
const REDB_MAGIC: &[u8; 9] = b"redb\x1a\x0a\xa9\x0d\x0a";

/// Prefixed to every hashed key; bump it if the key layout below ever changes.
const KEY_DOMAIN: &[u8] = b"llm-warden summary key v1\0";

/// Summary key -> the [`Summary`] as JSON. JSON keeps a stored value readable across added
/// optional fields; a value that no longer decodes is a miss, not an error.
pub(super) const SUMMARIES: TableDefinition<&[u8; 32], &[u8]> =
    TableDefinition::new("summaries_v1");
/// (created, key) -> (): the age index the disk bound evicts from, oldest first.
const BY_CREATED: TableDefinition<(u64, &[u8; 32]), ()> =
    TableDefinition::new("summaries_by_created_v1");

// === SummaryKey ===

/// The key of one summary: a stable hash of (model, the exact summarized messages as raw JSON
/// bytes in order, and a `version`/prompt tag so a changed summarizer prompt does not reuse old
/// summaries).
///
/// SHA-256 over a length-prefixed encoding: the domain tag, then the model, the prompt tag and
/// each message, each as its byte length (u64, little endian) followed by its bytes, with the
/// message count before the messages. Lengths make the encoding unambiguous (`["ab", "c"]` and
/// `["a", "bc"]` differ), and the hash is the same on every build and platform, as a key kept on
/// disk must be (std's `DefaultHasher` promises neither).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SummaryKey([u8; 32]);

impl SummaryKey {
    /// `messages` are each message's raw JSON bytes, exactly as they will be replaced.
    pub fn new(model: &str, prompt_tag: &str, messages: &[&[u8]]) -> Self {
        fn field(hash: &mut Sha256, bytes: &[u8]) {
            hash.update((bytes.len() as u64).to_le_bytes());
            hash.update(bytes);
        }
        let mut hash = Sha256::new();
        hash.update(KEY_DOMAIN);
        field(&mut hash, model.as_bytes());
        field(&mut hash, prompt_tag.as_bytes());
        hash.update((messages.len() as u64).to_le_bytes());
        for message in messages {
            field(&mut hash, message);
        }
        Self(hash.finalize().into())
    }

    /// Lowercase hex, 64 characters.
    pub fn to_hex(&self) -> String {
        let mut hex = String::with_capacity(64);
        for byte in self.0 {
            // Writing to a String cannot fail.
            let _ = write!(hex, "{byte:02x}");
        }
        hex
    }
}

// === Summary, CacheStats, CacheError ===

/// One summary and what it replaces.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    pub text: String,
    /// How many messages it replaces.
    pub messages: u32,
    /// Estimated tokens of the messages it replaces, and of the summary itself.
    pub tokens_before: u64,
    pub tokens_after: u64,
    /// Unix seconds when made.
    pub created: u64,
}

/// Counters for `/status`.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct CacheStats {
    pub memory_hits: u64,
    pub disk_hits: u64,
    pub misses: u64,
    /// Summaries in memory now.
    pub entries: usize,
    /// The disk store's file, if one is attached.
    pub path: Option<String>,
}

/// Opening the disk store failed; each message names the path.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cannot create the summary cache directory {}: {source}", .path.display())]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("summary cache {} is already open (another llm-warden, or another cache in this process, holds its lock)", .path.display())]
    AlreadyOpen { path: PathBuf },
    #[error("summary cache {} exists and is not a redb file; not touching it (delete it, or choose another compaction.cache_dir)", .path.display())]
    NotAStore { path: PathBuf },
    #[error("cannot open summary cache {}: {source}", .path.display())]
    Open {
        path: PathBuf,
        source: Box<redb::DatabaseError>,
    },
    #[error("cannot prepare summary cache {}: {source}", .path.display())]
    Prepare {
        path: PathBuf,
        source: Box<redb::Error>,
    },
}

/// Any redb error, boxed: redb's own `Error` is 144 bytes, and these paths are cold.
#[derive(Debug)]
struct DiskError(Box<redb::Error>);

// One impl per redb error type met here: a blanket `impl<E: Into<redb::Error>>` would overlap
// the reflexive `From<T> for T`.
macro_rules! disk_error_from {
    ($($error:ty),*) => {$(
        impl From<$error> for DiskError {
            fn from(error: $error) -> Self {
                Self(Box::new(error.into()))
            }
        }
    )*};
}
disk_error_from!(
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

impl std::fmt::Display for DiskError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

// === SummaryCache ===

/// Bounded in-memory LRU in front of an optional on-disk store. Cheap to clone (one `Arc`);
/// clones share both tiers and the counters. Thread-safe.
///
/// Disk I/O never runs on the async I/O threads: `get` and `put` check the memory tier
/// synchronously (a short `std` mutex section, never held across an await) and hand the store
/// to `spawn_blocking`. redb serializes write transactions itself; reads run beside them.
#[derive(Clone)]
pub struct SummaryCache {
    inner: Arc<Inner>,
}

struct Inner {
    memory: Mutex<MemoryTier>,
    /// `None`: memory only. The `Database` holds an exclusive lock on its file until the last
    /// clone of this cache (and any blocking task still using it) is gone.
    disk: Option<Disk>,
    memory_hits: AtomicU64,
    disk_hits: AtomicU64,
    misses: AtomicU64,
}

struct Disk {
    db: Database,
    path: PathBuf,
    max_entries: u64,
}

impl SummaryCache {
    /// Memory only (tests, or when the disk store cannot be opened). `capacity` 0 keeps
    /// nothing.
    pub fn in_memory(capacity: usize) -> Self {
        Self::build(capacity, None)
    }

    /// Memory plus a redb file at `path` (its directories are created; an absent or empty file
    /// becomes a new store). Errors if it cannot be opened: another process (or another cache
    /// in this one) holds it, permission denied, not a redb file. Blocks while opening, which
    /// may include redb's repair after an unclean shutdown: call it at startup.
    pub fn open(path: &Path, capacity: usize) -> Result<Self, CacheError> {
        Self::open_bounded(path, capacity, DISK_MAX_ENTRIES)
    }

    /// [`open`](Self::open), and on failure log a warning naming the path and the error and
    /// fall back to memory only.
    pub fn open_or_memory(path: &Path, capacity: usize) -> Self {
        Self::open(path, capacity).unwrap_or_else(|error| {
            tracing::warn!(
                path = %path.display(),
                %error,
                "summary cache: no disk store, summaries are kept in memory only"
            );
            Self::in_memory(capacity)
        })
    }

    /// `dirs::data_dir()/llm-warden/summaries.redb` (e.g. `~/.local/share/llm-warden/` on
    /// Linux, `~/Library/Application Support/llm-warden/` on macOS); `./.llm-warden/summaries.redb`
    /// where the platform has no data directory (no `$HOME`).
    pub fn default_path() -> PathBuf {
        match dirs::data_dir() {
            Some(data) => data.join("llm-warden"),
            None => PathBuf::from(".llm-warden"),
        }
        .join(FILE_NAME)
    }

    /// `open` with a chosen disk bound (tests use a small one).
    pub(super) fn open_bounded(
        path: &Path,
        capacity: usize,
        max_entries: u64,
    ) -> Result<Self, CacheError> {
        if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| CacheError::CreateDir {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        check_is_store_or_empty(path)?;
        let db = Database::builder()
            .set_cache_size(DISK_PAGE_CACHE_BYTES)
            .create(path)
            .map_err(|source| match source {
                redb::DatabaseError::DatabaseAlreadyOpen => CacheError::AlreadyOpen {
                    path: path.to_path_buf(),
                },
                source => CacheError::Open {
                    path: path.to_path_buf(),
                    source: Box::new(source),
                },
            })?;
        // Create both tables now, so a read never meets a missing table.
        create_tables(&db).map_err(|DiskError(source)| CacheError::Prepare {
            path: path.to_path_buf(),
            source,
        })?;
        let disk = Disk {
            db,
            path: path.to_path_buf(),
            max_entries,
        };
        Ok(Self::build(capacity, Some(disk)))
    }

    fn build(capacity: usize, disk: Option<Disk>) -> Self {
        Self {
            inner: Arc::new(Inner {
                memory: Mutex::new(MemoryTier::new(capacity)),
                disk,
                memory_hits: AtomicU64::new(0),
                disk_hits: AtomicU64::new(0),
                misses: AtomicU64::new(0),
            }),
        }
    }

    /// Memory first, then disk; a disk hit is promoted into memory.
    pub async fn get(&self, key: &SummaryKey) -> Option<Summary> {
        if let Some(found) = self.inner.memory().get(key) {
            self.inner.memory_hits.fetch_add(1, Relaxed);
            return Some(found);
        }
        let found = match &self.inner.disk {
            Some(_) => {
                let inner = Arc::clone(&self.inner);
                let key = *key;
                let read = tokio::task::spawn_blocking(move || inner.read_disk(&key)).await;
                match read {
                    Ok(Ok(found)) => found,
                    Ok(Err(error)) => {
                        tracing::warn!(key = %key.to_hex(), %error, "summary cache: disk read failed");
                        None
                    }
                    Err(error) => {
                        tracing::warn!(key = %key.to_hex(), %error, "summary cache: disk read task failed");
                        None
                    }
                }
            }
            None => None,
        };
        match found {
            Some(summary) => {
                self.inner.disk_hits.fetch_add(1, Relaxed);
                self.inner.memory().insert(*key, summary.clone());
                Some(summary)
            }
            None => {
                self.inner.misses.fetch_add(1, Relaxed);
                None
            }
        }
    }

    /// Into both tiers; returns once the disk write is committed. Disk errors are logged, not
    /// returned: the summary is still in memory.
    pub async fn put(&self, key: SummaryKey, summary: Summary) {
        let encoded = match (&self.inner.disk, serde_json::to_vec(&summary)) {
            (None, _) => None,
            (Some(_), Ok(bytes)) => Some(bytes),
            (Some(_), Err(error)) => {
                tracing::warn!(key = %key.to_hex(), %error, "summary cache: cannot encode summary");
                None
            }
        };
        let created = summary.created;
        self.inner.memory().insert(key, summary);
        let Some(bytes) = encoded else { return };
        let inner = Arc::clone(&self.inner);
        let write =
            tokio::task::spawn_blocking(move || inner.write_disk(&key, created, &bytes)).await;
        match write {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                tracing::warn!(key = %key.to_hex(), %error, "summary cache: disk write failed");
            }
            Err(error) => {
                tracing::warn!(key = %key.to_hex(), %error, "summary cache: disk write task failed");
            }
        }
    }

    pub fn stats(&self) -> CacheStats {
        CacheStats {
            memory_hits: self.inner.memory_hits.load(Relaxed),
            disk_hits: self.inner.disk_hits.load(Relaxed),
            misses: self.inner.misses.load(Relaxed),
            entries: self.inner.memory().len(),
            path: self
                .inner
                .disk
                .as_ref()
                .map(|disk| disk.path.display().to_string()),
        }
    }
}

impl Inner {
    fn memory(&self) -> MutexGuard<'_, MemoryTier> {
        // No section under this lock can leave the tier half-updated, so a poisoned lock
        // (a panic elsewhere while holding it) still guards a consistent tier.
        self.memory.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Blocking. `Ok(None)` for absent, and for a value that does not decode (logged at debug).
    fn read_disk(&self, key: &SummaryKey) -> Result<Option<Summary>, DiskError> {
        let Some(disk) = &self.disk else {
            return Ok(None);
        };
        let txn = disk.db.begin_read()?;
        let table = txn.open_table(SUMMARIES)?;
        let Some(value) = table.get(&key.0)? else {
            return Ok(None);
        };
        Ok(decode(key, value.value()))
    }

    /// Blocking. Insert or replace, keep the age index in step, and drop the oldest past the
    /// bound, all in one committed (fsynced) transaction.
    fn write_disk(&self, key: &SummaryKey, created: u64, bytes: &[u8]) -> Result<(), DiskError> {
        let Some(disk) = &self.disk else {
            return Ok(());
        };
        let txn = disk.db.begin_write()?;
        {
            let mut summaries = txn.open_table(SUMMARIES)?;
            let mut by_created = txn.open_table(BY_CREATED)?;
            let replaced = summaries
                .insert(&key.0, bytes)?
                .and_then(|old| decode(key, old.value()))
                .map(|old| old.created);
            if let Some(old_created) = replaced {
                by_created.remove((old_created, &key.0))?;
            }
            by_created.insert((created, &key.0), ())?;
            while summaries.len()? > disk.max_entries {
                let Some((oldest, ())) = pop_oldest(&mut by_created)? else {
                    break;
                };
                // An index entry is stale if its summary was since replaced by a newer one
                // whose old value did not decode; skip it rather than drop the newer one.
                let current = summaries
                    .get(&oldest.1)?
                    .and_then(|value| decode(&SummaryKey(oldest.1), value.value()))
                    .map(|summary| summary.created);
                if current.is_none_or(|created| created == oldest.0) {
                    summaries.remove(&oldest.1)?;
                }
            }
        }
        txn.commit()?;
        Ok(())
    }
}

/// redb 2.2 `create` re-initializes a non-empty file that lacks its magic number, contrary
/// to its docs (fixed in 2.5, whose MSRV is above ours): refuse such a file rather than
/// overwrite whatever a mistyped path points at. Absent and empty files are fine.
fn check_is_store_or_empty(path: &Path) -> Result<(), CacheError> {
    use std::io::Read as _;
    let mut head = Vec::with_capacity(REDB_MAGIC.len());
    let read = std::fs::File::open(path)
        .and_then(|file| file.take(REDB_MAGIC.len() as u64).read_to_end(&mut head));
    match read {
        Ok(_) if head.is_empty() || head == REDB_MAGIC => Ok(()),
        Ok(_) => Err(CacheError::NotAStore {
            path: path.to_path_buf(),
        }),
        // Absent, a directory, no permission: `create` reports these with their cause.
        Err(_) => Ok(()),
    }
}

fn create_tables(db: &Database) -> Result<(), DiskError> {
    let txn = db.begin_write()?;
    txn.open_table(SUMMARIES)?;
    txn.open_table(BY_CREATED)?;
    txn.commit()?;
    Ok(())
}

type AgeEntry = ((u64, [u8; 32]), ());

fn pop_oldest(
    by_created: &mut redb::Table<'_, (u64, &'static [u8; 32]), ()>,
) -> Result<Option<AgeEntry>, DiskError> {
    Ok(by_created.pop_first()?.map(|(entry, _)| {
        let (created, key) = entry.value();
        ((created, *key), ())
    }))
}

fn decode(key: &SummaryKey, bytes: &[u8]) -> Option<Summary> {
    match serde_json::from_slice(bytes) {
        Ok(summary) => Some(summary),
        Err(error) => {
            tracing::debug!(key = %key.to_hex(), %error, "summary cache: stored value does not decode; treated as a miss");
            None
        }
    }
}

// === MemoryTier ===

/// A plain LRU: entries with the tick of their last use, and the ticks in order. Both maps
/// always hold the same keys.
struct MemoryTier {
    capacity: usize,
    tick: u64,
    entries: HashMap<SummaryKey, (Summary, u64)>,
    by_use: BTreeMap<u64, SummaryKey>,
}

impl MemoryTier {
    fn new(capacity: usize) -> Self {
        Self {
            capacity,
            tick: 0,
            entries: HashMap::new(),
            by_use: BTreeMap::new(),
        }
    }

    fn len(&self) -> usize {
        self.entries.len()
    }

    fn next_tick(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }

    /// A hit becomes the most recently used.
    fn get(&mut self, key: &SummaryKey) -> Option<Summary> {
        let tick = self.next_tick();
        let (summary, used) = self.entries.get_mut(key)?;
        self.by_use.remove(used);
        *used = tick;
        self.by_use.insert(tick, *key);
        Some(summary.clone())
    }

    fn insert(&mut self, key: SummaryKey, summary: Summary) {
        if self.capacity == 0 {
            return;
        }
        let tick = self.next_tick();
        if let Some((_, used)) = self.entries.insert(key, (summary, tick)) {
            self.by_use.remove(&used);
        }
        self.by_use.insert(tick, key);
        while self.entries.len() > self.capacity {
            let Some((_, oldest)) = self.by_use.pop_first() else {
                break;
            };
            self.entries.remove(&oldest);
        }
    }
}
