//! The summary cache: key stability, the memory LRU, the redb store across reopens, its bound,
//! its lock, and the fallbacks to memory. Disk tests each use their own directory under the
//! system temp dir, removed on drop.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use super::cache::*;

// === helpers ===

/// A fresh directory, removed (with its contents) when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("llm-warden-test-{name}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        Self(dir)
    }

    fn file(&self) -> PathBuf {
        // A subdirectory, so `open` has to create it.
        self.0.join("store").join(FILE_NAME)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn key(n: u32) -> SummaryKey {
    let message = format!(r#"{{"role":"user","content":"message {n}"}}"#);
    SummaryKey::new("llama3", "v1", &[message.as_bytes()])
}

fn summary(text: &str, created: u64) -> Summary {
    Summary {
        text: text.to_string(),
        messages: 3,
        tokens_before: 1200,
        tokens_after: 80,
        created,
    }
}

fn open(path: &Path, capacity: usize) -> SummaryCache {
    SummaryCache::open(path, capacity).expect("open summary cache")
}

// === keys ===

#[test]
fn key_of_a_fixed_input_is_a_fixed_hex_string() {
    let key = SummaryKey::new(
        "llama3.1:8b",
        "summary-v1",
        &[
            br#"{"role":"user","content":"hi"}"#,
            br#"{"role":"assistant","content":"hello"}"#,
        ],
    );
    // Checked against an independent SHA-256 of the documented encoding (Python's hashlib).
    // A change here means every summary on every disk stops matching.
    assert_eq!(
        key.to_hex(),
        "44f9cbdcf0389db4b940bc9e83afef24486d40dc1b6fe8f608defe789f2755f5"
    );
    assert_eq!(key.to_hex().len(), 64);
}

#[test]
fn key_changes_with_each_part_of_its_input() {
    let a: &[u8] = br#"{"role":"user","content":"a"}"#;
    let b: &[u8] = br#"{"role":"user","content":"b"}"#;
    let base = SummaryKey::new("m", "v1", &[a, b]);
    let cases: &[(&str, SummaryKey)] = &[
        ("other model", SummaryKey::new("n", "v1", &[a, b])),
        ("other prompt tag", SummaryKey::new("m", "v2", &[a, b])),
        ("messages swapped", SummaryKey::new("m", "v1", &[b, a])),
        ("one message fewer", SummaryKey::new("m", "v1", &[a])),
        ("one message more", SummaryKey::new("m", "v1", &[a, b, b])),
        ("no messages", SummaryKey::new("m", "v1", &[])),
        (
            "messages joined",
            SummaryKey::new("m", "v1", &[&[a, b].concat()]),
        ),
        (
            "model and tag boundary",
            SummaryKey::new("mv", "1", &[a, b]),
        ),
        (
            "whitespace in a message",
            SummaryKey::new("m", "v1", &[a, br#"{"role": "user","content":"b"}"#]),
        ),
    ];
    assert_eq!(
        base,
        SummaryKey::new("m", "v1", &[a, b]),
        "same input, same key"
    );
    for (what, other) in cases {
        assert_ne!(base, *other, "{what}");
    }
    assert_ne!(
        SummaryKey::new("m", "v1", &[b"ab", b"c"]),
        SummaryKey::new("m", "v1", &[b"a", b"bc"]),
        "message boundaries count"
    );
    assert_ne!(
        SummaryKey::new("m", "v1", &[]),
        SummaryKey::new("m", "v1", &[b""]),
        "an empty message is a message"
    );
}

// === memory ===

#[tokio::test]
async fn memory_keeps_its_capacity_and_evicts_the_least_recently_used() {
    let cache = SummaryCache::in_memory(2);
    cache.put(key(1), summary("one", 1)).await;
    cache.put(key(2), summary("two", 2)).await;
    // Using 1 makes 2 the least recently used.
    assert_eq!(cache.get(&key(1)).await, Some(summary("one", 1)));
    cache.put(key(3), summary("three", 3)).await;

    assert_eq!(cache.get(&key(2)).await, None, "2 was evicted");
    assert_eq!(cache.get(&key(1)).await, Some(summary("one", 1)));
    assert_eq!(cache.get(&key(3)).await, Some(summary("three", 3)));
    // Replacing keeps one entry per key.
    cache.put(key(3), summary("three again", 4)).await;
    assert_eq!(cache.get(&key(3)).await, Some(summary("three again", 4)));
    assert_eq!(
        cache.stats(),
        CacheStats {
            memory_hits: 4,
            disk_hits: 0,
            misses: 1,
            entries: 2,
            path: None,
        }
    );
}

#[tokio::test]
async fn memory_capacity_zero_keeps_nothing() {
    let cache = SummaryCache::in_memory(0);
    cache.put(key(1), summary("one", 1)).await;
    assert_eq!(cache.get(&key(1)).await, None);
    assert_eq!(cache.stats().entries, 0);
    assert_eq!(cache.stats().misses, 1);
}

#[tokio::test]
async fn clones_share_entries_and_counters() {
    let cache = SummaryCache::in_memory(4);
    let clone = cache.clone();
    clone.put(key(1), summary("one", 1)).await;
    assert_eq!(cache.get(&key(1)).await, Some(summary("one", 1)));
    assert_eq!(clone.stats().memory_hits, 1);
}

// === disk ===

#[tokio::test]
async fn summary_survives_a_reopen_and_counts_as_a_disk_hit() {
    let dir = TempDir::new("reopen");
    let path = dir.file();
    {
        let cache = open(&path, 8);
        cache.put(key(1), summary("one", 1)).await;
        assert_eq!(cache.stats().path, Some(path.display().to_string()));
    }
    let cache = open(&path, 8);
    assert_eq!(cache.stats().entries, 0, "memory starts empty");
    assert_eq!(cache.get(&key(1)).await, Some(summary("one", 1)));
    assert_eq!(cache.get(&key(2)).await, None);
    // The disk hit was promoted: the next get is a memory hit.
    assert_eq!(cache.get(&key(1)).await, Some(summary("one", 1)));
    let stats = cache.stats();
    assert_eq!(
        (
            stats.memory_hits,
            stats.disk_hits,
            stats.misses,
            stats.entries
        ),
        (1, 1, 1, 1)
    );
}

#[tokio::test]
async fn replacing_a_summary_on_disk_keeps_the_newest() {
    let dir = TempDir::new("replace");
    let path = dir.file();
    {
        let cache = open(&path, 8);
        cache.put(key(1), summary("old", 1)).await;
        cache.put(key(1), summary("new", 9)).await;
    }
    assert_eq!(open(&path, 8).get(&key(1)).await, Some(summary("new", 9)));
}

#[tokio::test]
async fn disk_bound_drops_the_oldest_by_created() {
    let dir = TempDir::new("bound");
    let path = dir.file();
    {
        // Memory capacity 0, so every get below reads the disk.
        let cache = SummaryCache::open_bounded(&path, 0, 3).expect("open");
        // Inserted out of age order; key 1 is replaced with a newer age before the bound bites.
        for (n, created) in [(1, 10), (2, 50), (3, 20), (1, 60), (4, 40), (5, 30)] {
            cache.put(key(n), summary(&format!("s{n}"), created)).await;
        }
    }
    let cache = SummaryCache::open_bounded(&path, 0, 3).expect("reopen");
    let mut kept = Vec::new();
    for n in 1..=5 {
        if let Some(found) = cache.get(&key(n)).await {
            kept.push((n, found.created));
        }
    }
    // Of created 60 (key 1), 50, 20, 40, 30 the three newest stay.
    assert_eq!(kept, vec![(1, 60), (2, 50), (4, 40)]);
}

#[tokio::test]
async fn corrupt_value_on_disk_is_a_miss() {
    let dir = TempDir::new("corrupt");
    let path = dir.file();
    drop(open(&path, 8));
    {
        let db = redb::Database::create(&path).expect("open with redb");
        let txn = db.begin_write().expect("write txn");
        {
            let mut table = txn.open_table(super::cache::SUMMARIES).expect("table");
            let raw: [u8; 32] = hex_bytes(&key(1).to_hex());
            table.insert(&raw, b"{not json".as_slice()).expect("insert");
        }
        txn.commit().expect("commit");
    }
    let cache = open(&path, 8);
    assert_eq!(cache.get(&key(1)).await, None);
    assert_eq!(cache.stats().misses, 1);
    // A put over it repairs the entry.
    cache.put(key(1), summary("one", 1)).await;
    drop(cache);
    assert_eq!(open(&path, 8).get(&key(1)).await, Some(summary("one", 1)));
}

fn hex_bytes(hex: &str) -> [u8; 32] {
    let mut out = [0; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("hex");
    }
    out
}

// === opening, and falling back ===

#[tokio::test]
async fn second_open_of_an_open_file_fails_and_open_or_memory_falls_back() {
    let dir = TempDir::new("locked");
    let path = dir.file();
    let first = open(&path, 8);

    let err = SummaryCache::open(&path, 8)
        .err()
        .expect("second open fails");
    assert!(matches!(err, CacheError::AlreadyOpen { .. }), "{err:?}");
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );

    let fallback = SummaryCache::open_or_memory(&path, 8);
    assert_eq!(fallback.stats().path, None);
    fallback.put(key(1), summary("one", 1)).await;
    assert_eq!(fallback.get(&key(1)).await, Some(summary("one", 1)));

    // Once every clone of the first is gone, the file opens again.
    let clone = first.clone();
    drop(first);
    assert!(
        SummaryCache::open(&path, 8).is_err(),
        "a clone still holds it"
    );
    drop(clone);
    assert!(SummaryCache::open(&path, 8).is_ok());
}

#[tokio::test]
async fn unusable_paths_fail_to_open_and_fall_back_to_memory() {
    let dir = TempDir::new("unusable");
    // A regular file where a directory should be: create_dir_all fails, even as root.
    let file = dir.0.join("a-file");
    std::fs::write(&file, b"x").expect("write");
    // A file that is not a redb store (redb 2.2 alone would re-initialize it).
    let garbage = dir.0.join("garbage.redb");
    std::fs::write(&garbage, vec![0x5a; 8192]).expect("write");

    let cases: &[(&str, PathBuf)] = &[
        ("parent is a file", file.join("sub").join(FILE_NAME)),
        ("not a redb file", garbage.clone()),
        ("a directory", dir.0.clone()),
    ];
    for (what, path) in cases {
        let err = SummaryCache::open(path, 4).err();
        let err = err.unwrap_or_else(|| panic!("{what}: open should fail"));
        assert!(
            err.to_string().contains(&dir.0.display().to_string()),
            "{what}: message names the path: {err}"
        );
        let cache = SummaryCache::open_or_memory(path, 4);
        assert_eq!(cache.stats().path, None, "{what}");
        cache.put(key(1), summary("one", 1)).await;
        assert_eq!(cache.get(&key(1)).await, Some(summary("one", 1)), "{what}");
    }
    assert!(matches!(
        SummaryCache::open(&garbage, 4),
        Err(CacheError::NotAStore { .. })
    ));
    assert_eq!(
        std::fs::read(&garbage).expect("read"),
        vec![0x5a; 8192],
        "left untouched"
    );
}

#[test]
fn default_path_ends_in_llm_warden_summaries() {
    let path = SummaryCache::default_path();
    assert!(
        path.ends_with(Path::new("llm-warden").join(FILE_NAME))
            || path.ends_with(Path::new(".llm-warden").join(FILE_NAME)),
        "{}",
        path.display()
    );
}
