//! The node's disk caches — fetched blobs (`blobs/`) and compiled modules (`modules/`) —
//! kept under a byte budget, so a contributor's disk does not fill up with every module and
//! input the domain ever sent.
//!
//! Least recently used goes first: a file's modification time is its last use (a blob hit
//! touches it; a compiled module's time is when it was compiled, and the sandbox keeps the
//! modules in use in memory). When the caches pass the budget they are trimmed to 90 % of
//! it. A file
//! removed while a task uses it is harmless: blobs are read into memory before a run, and a
//! compiled module is loaded (mapped) before it runs. The blob cache's growth is counted as
//! it is written; the module cache, written by the sandbox, is measured again at most every
//! [`RESCAN_AFTER`] when blobs are fetched.

use std::path::{Path, PathBuf};

use stardust_proto::content::ContentId;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

/// How often, at most, the caches are measured again on disk between trims.
pub(crate) const RESCAN_AFTER: Duration = Duration::from_secs(10);

/// A byte budget over some directories.
#[derive(Debug)]
pub(crate) struct Budget {
    dirs: Vec<PathBuf>,
    limit: u64,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// Bytes in the directories, as last measured plus what was added since.
    used: u64,
    measured: Instant,
}

/// A cached file: when last used, its size, where.
struct Entry {
    used: SystemTime,
    size: u64,
    path: PathBuf,
}

impl Budget {
    /// A budget of `limit` bytes over `dirs` (measured now; trimmed if already past it).
    pub fn new(dirs: Vec<PathBuf>, limit: u64) -> Self {
        let budget = Self {
            dirs,
            limit,
            state: Mutex::new(State {
                used: 0,
                measured: Instant::now(),
            }),
        };
        budget.trim_if_over(true);
        budget
    }

    /// Bytes the caches hold, as last measured plus what was added since.
    pub fn used(&self) -> u64 {
        self.state.lock().map_or(0, |s| s.used)
    }

    /// A file of `bytes` was written to one of the directories: trims when past the budget
    /// (measuring the directories again first, at most every [`RESCAN_AFTER`]).
    pub fn added(&self, bytes: u64) {
        let rescan = match self.state.lock() {
            Ok(mut s) => {
                s.used = s.used.saturating_add(bytes);
                s.measured.elapsed() >= RESCAN_AFTER
            }
            Err(_) => true,
        };
        self.trim_if_over(rescan);
    }

    /// A cached file was used: it is now the most recently used.
    pub fn touch(path: &Path) {
        if let Ok(f) = std::fs::File::options().append(true).open(path) {
            let _ = f.set_modified(SystemTime::now());
        }
    }

    fn entries(&self) -> Vec<Entry> {
        let mut out = Vec::new();
        for dir in &self.dirs {
            let Ok(list) = std::fs::read_dir(dir) else {
                continue;
            };
            for e in list.flatten() {
                let Ok(meta) = e.metadata() else { continue };
                if meta.is_file() {
                    out.push(Entry {
                        used: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                        size: meta.len(),
                        path: e.path(),
                    });
                }
            }
        }
        out
    }

    fn trim_if_over(&self, rescan: bool) {
        let Ok(mut s) = self.state.lock() else { return };
        if !rescan && s.used <= self.limit {
            return;
        }
        let mut entries = self.entries();
        s.used = entries.iter().map(|e| e.size).sum();
        s.measured = Instant::now();
        if s.used <= self.limit {
            return;
        }
        let target = self.limit / 10 * 9;
        entries.sort_by_key(|e| e.used);
        let mut removed = 0usize;
        for e in entries {
            if s.used <= target {
                break;
            }
            if std::fs::remove_file(&e.path).is_ok() {
                s.used = s.used.saturating_sub(e.size);
                removed += 1;
            }
        }
        tracing::info!(
            removed,
            used = s.used,
            limit = self.limit,
            "trimmed the node's caches"
        );
    }
}

/// Blobs kept in memory at most, bytes.
pub(crate) const HOT_BYTES: usize = 64 << 20;

/// Larger blobs are not kept in memory.
pub(crate) const HOT_BLOB_MAX: usize = 4 << 20;

/// Blobs kept in memory at most, in number: eviction looks over all of them, so a sweep of
/// many small distinct inputs does not make every task scan thousands.
pub(crate) const HOT_ENTRIES: usize = 1024;

/// Blobs used lately, in memory, bounded by [`HOT_BYTES`] and [`HOT_ENTRIES`]; the least
/// recently used go first.
#[derive(Debug, Default)]
pub(crate) struct Hot {
    blobs: std::collections::HashMap<ContentId, (std::sync::Arc<[u8]>, u64)>,
    bytes: usize,
    clock: u64,
}

impl Hot {
    pub fn get(&mut self, id: &ContentId) -> Option<std::sync::Arc<[u8]>> {
        self.clock += 1;
        let clock = self.clock;
        self.blobs.get_mut(id).map(|(b, used)| {
            *used = clock;
            b.clone()
        })
    }

    pub fn put(&mut self, id: ContentId, bytes: std::sync::Arc<[u8]>) {
        if bytes.len() > HOT_BLOB_MAX || self.blobs.contains_key(&id) {
            return;
        }
        while self.bytes + bytes.len() > HOT_BYTES || self.blobs.len() >= HOT_ENTRIES {
            let Some(oldest) = self
                .blobs
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(id, _)| *id)
            else {
                break;
            };
            if let Some((b, _)) = self.blobs.remove(&oldest) {
                self.bytes -= b.len();
            }
        }
        self.clock += 1;
        self.bytes += bytes.len();
        self.blobs.insert(id, (bytes, self.clock));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, size: usize, age_s: u64) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, vec![7u8; size]).expect("write");
        let f = std::fs::File::options()
            .append(true)
            .open(&path)
            .expect("open");
        f.set_modified(SystemTime::now() - Duration::from_secs(age_s))
            .expect("set mtime");
        path
    }

    #[test]
    fn the_least_recently_used_files_go_first_when_past_the_budget() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (blobs, modules) = (tmp.path().join("blobs"), tmp.path().join("modules"));
        std::fs::create_dir_all(&blobs).expect("dir");
        std::fs::create_dir_all(&modules).expect("dir");
        let oldest = write(&blobs, "a", 1000, 500);
        let old_module = write(&modules, "m", 1000, 400);
        let used_lately = write(&blobs, "b", 1000, 300);
        let budget = Budget::new(vec![blobs.clone(), modules.clone()], 3000);
        assert_eq!(budget.used(), 3000, "measured at start, nothing removed");

        // A hit makes an old file the most recently used.
        Budget::touch(&used_lately);
        let newest = write(&blobs, "c", 1000, 0);
        budget.added(1000);
        // 4,000 > 3,000: trimmed to at most 2,700, oldest first.
        assert!(!oldest.exists(), "the least recently used blob is removed");
        assert!(
            !old_module.exists(),
            "a compiled module counts and goes too"
        );
        assert!(used_lately.exists() && newest.exists());
        assert_eq!(budget.used(), 2000);

        // Within the budget nothing is touched.
        write(&blobs, "d", 1000, 0);
        budget.added(1000);
        assert_eq!(budget.used(), 3000);
        assert_eq!(std::fs::read_dir(&blobs).expect("list").count(), 3);
    }

    #[test]
    fn a_cache_already_past_its_budget_is_trimmed_at_start() {
        let tmp = tempfile::tempdir().expect("tempdir");
        for (i, age) in [300u64, 200, 100].iter().enumerate() {
            write(tmp.path(), &format!("f{i}"), 1000, *age);
        }
        let budget = Budget::new(vec![tmp.path().to_path_buf()], 2000);
        assert_eq!(budget.used(), 1000);
        assert!(tmp.path().join("f2").exists(), "the newest stays");
    }

    #[test]
    fn hot_blobs_stay_within_their_bytes_least_recently_used_first() {
        let mut hot = Hot::default();
        let blob = |i: u8| -> (ContentId, std::sync::Arc<[u8]>) {
            let bytes = vec![i; HOT_BLOB_MAX];
            (ContentId::of(&bytes), bytes.into())
        };
        let first = blob(0);
        hot.put(first.0, first.1.clone());
        let n = HOT_BYTES / HOT_BLOB_MAX;
        for i in 1..n as u8 {
            let (id, b) = blob(i);
            hot.put(id, b);
        }
        // Full: the first is used again, so the second is the one to go.
        assert!(hot.get(&first.0).is_some());
        let (id, b) = blob(200);
        hot.put(id, b);
        assert!(hot.bytes <= HOT_BYTES);
        assert!(hot.get(&first.0).is_some(), "used lately: kept");
        assert!(hot.get(&blob(1).0).is_none(), "least recently used: gone");
        assert!(hot.get(&id).is_some());
        // Too large for memory: not kept.
        let big = vec![9u8; HOT_BLOB_MAX + 1];
        let big_id = ContentId::of(&big);
        hot.put(big_id, big.into());
        assert!(hot.get(&big_id).is_none());
    }

    #[test]
    fn hot_blobs_stay_within_their_count() {
        let mut hot = Hot::default();
        let ids: Vec<ContentId> = (0..HOT_ENTRIES + 10)
            .map(|i| {
                let bytes = (i as u64).to_le_bytes().to_vec();
                let id = ContentId::of(&bytes);
                hot.put(id, bytes.into());
                id
            })
            .collect();
        assert_eq!(hot.blobs.len(), HOT_ENTRIES);
        assert!(hot.get(&ids[0]).is_none(), "the oldest went first");
        assert!(hot.get(&ids[HOT_ENTRIES + 9]).is_some());
    }
}
