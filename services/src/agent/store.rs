//! The agent's key-value store: the five KVP pools, bounded, persisted in one file.
//!
//! The host may set, read, delete and enumerate entries in every pool but the auto pool,
//! which the agent fills itself (the guest's name, OS and addresses, as Linux's KVP daemon
//! reports them, plus vmlink's time-offset key) and the host may only read. Each pool holds
//! at most [`MAX_ENTRIES`] entries, so a host cannot make the agent grow without bound; a
//! set past that is refused and changes nothing.
//!
//! The file is text, one entry per line after a version line:
//!
//! ```text
//! vmlink-kvp 1
//! 0<TAB>HostName<TAB>build-07
//! 1<TAB>Role<TAB>web
//! ```
//!
//! Fields are separated by a tab (`<TAB>` above); a tab, a newline, a carriage return and a backslash in a
//! key or value are written `\t`, `\n`, `\r` and `\\`. Every change is written to a
//! temporary file beside it and renamed over it, so a crash leaves the old or the new
//! store, never half of one. The auto pool is not persisted: it is recomputed.

use std::fmt::Write as _;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::kvp::KvpPool;

/// The most entries a pool holds.
pub const MAX_ENTRIES: usize = 1024;

/// The first line of a store file.
const HEADER: &str = "vmlink-kvp 1";

/// The pools, in wire order.
pub const POOLS: [KvpPool; 5] = [
    KvpPool::External,
    KvpPool::Guest,
    KvpPool::Auto,
    KvpPool::AutoExternal,
    KvpPool::AutoInternal,
];

/// Why the store refused a change or could not load or save.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The auto pool is the agent's own: the host may only read it.
    #[error("the auto pool is read-only")]
    ReadOnly,
    /// The pool holds [`MAX_ENTRIES`] entries already.
    #[error("the {pool:?} pool is full ({max} entries)")]
    Full {
        /// The pool.
        pool: KvpPool,
        /// Its limit.
        max: usize,
    },
    /// The store file is not one this agent wrote.
    #[error("{path}: line {line}: {what}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The 1-based line.
        line: usize,
        /// What is wrong with it.
        what: &'static str,
    },
    /// Reading or writing the file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
}

/// The five pools, each an ordered list of (key, value); keys are unique within a pool.
#[derive(Debug, Default)]
pub struct KvpStore {
    pools: [Vec<(String, String)>; 5],
    path: Option<PathBuf>,
}

impl KvpStore {
    /// An empty store that is not persisted.
    pub fn in_memory() -> Self {
        Self::default()
    }

    /// The store persisted at `path`: loaded if the file exists, created at the first
    /// change otherwise.
    pub fn open(path: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let path = path.into();
        let mut store = Self {
            pools: Default::default(),
            path: Some(path.clone()),
        };
        match fs::read_to_string(&path) {
            Ok(text) => store.load(&path, &text)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(StoreError::Io { path, source }),
        }
        Ok(store)
    }

    fn load(&mut self, path: &Path, text: &str) -> Result<(), StoreError> {
        let corrupt = |line, what| StoreError::Corrupt {
            path: path.to_path_buf(),
            line,
            what,
        };
        let mut lines = text.lines();
        if lines.next() != Some(HEADER) {
            return Err(corrupt(1, "not a vmlink KVP store (bad version line)"));
        }
        for (i, line) in lines.enumerate() {
            let n = i + 2;
            let mut fields = line.split('\t');
            let (Some(pool), Some(key), Some(value), None) =
                (fields.next(), fields.next(), fields.next(), fields.next())
            else {
                return Err(corrupt(n, "not three tab-separated fields"));
            };
            let pool = pool
                .parse::<u8>()
                .ok()
                .and_then(|p| KvpPool::try_from(p).ok())
                .filter(|p| *p != KvpPool::Auto)
                .ok_or_else(|| corrupt(n, "unknown or automatic pool"))?;
            let key = unescape(key).ok_or_else(|| corrupt(n, "bad escape in the key"))?;
            let value = unescape(value).ok_or_else(|| corrupt(n, "bad escape in the value"))?;
            let entries = &mut self.pools[pool as usize];
            if entries.len() >= MAX_ENTRIES {
                return Err(corrupt(n, "more entries in a pool than the limit"));
            }
            if entries.iter().any(|(k, _)| *k == key) {
                return Err(corrupt(n, "a key twice in one pool"));
            }
            entries.push((key, value));
        }
        Ok(())
    }

    /// The value of `key` in `pool`.
    pub fn get(&self, pool: KvpPool, key: &str) -> Option<&str> {
        self.pools[pool as usize]
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The entry at `index` in `pool` (KVP's enumerate), in insertion order.
    pub fn entry(&self, pool: KvpPool, index: usize) -> Option<(&str, &str)> {
        self.pools[pool as usize]
            .get(index)
            .map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// How many entries `pool` holds.
    pub fn len(&self, pool: KvpPool) -> usize {
        self.pools[pool as usize].len()
    }

    /// True when no pool holds anything.
    pub fn is_empty(&self) -> bool {
        self.pools.iter().all(Vec::is_empty)
    }

    /// Sets `key` in `pool` for the host, and saves; the auto pool refuses.
    pub fn set(&mut self, pool: KvpPool, key: &str, value: &str) -> Result<(), StoreError> {
        if pool == KvpPool::Auto {
            return Err(StoreError::ReadOnly);
        }
        let before = self.pools[pool as usize].clone();
        self.put(pool, key, value)?;
        self.save_or(pool, before)
    }

    /// Saves; if that fails, puts `pool` back as it was, so a refused change changes
    /// nothing.
    fn save_or(&mut self, pool: KvpPool, before: Vec<(String, String)>) -> Result<(), StoreError> {
        let saved = self.save();
        if saved.is_err() {
            self.pools[pool as usize] = before;
        }
        saved
    }

    /// Deletes `key` from `pool` for the host, and saves; false when it was not there.
    pub fn delete(&mut self, pool: KvpPool, key: &str) -> Result<bool, StoreError> {
        if pool == KvpPool::Auto {
            return Err(StoreError::ReadOnly);
        }
        let Some(i) = self.pools[pool as usize].iter().position(|(k, _)| k == key) else {
            return Ok(false);
        };
        let before = self.pools[pool as usize].clone();
        self.pools[pool as usize].remove(i);
        self.save_or(pool, before)?;
        Ok(true)
    }

    /// Sets `key` in the auto pool: the agent's own values, not persisted.
    pub fn set_auto(&mut self, key: &str, value: &str) -> Result<(), StoreError> {
        self.put(KvpPool::Auto, key, value)
    }

    fn put(&mut self, pool: KvpPool, key: &str, value: &str) -> Result<(), StoreError> {
        let entries = &mut self.pools[pool as usize];
        if let Some((_, v)) = entries.iter_mut().find(|(k, _)| k == key) {
            value.clone_into(v);
            return Ok(());
        }
        if entries.len() >= MAX_ENTRIES {
            return Err(StoreError::Full {
                pool,
                max: MAX_ENTRIES,
            });
        }
        entries.push((key.to_owned(), value.to_owned()));
        Ok(())
    }

    /// Writes every pool but the auto pool to the file, through a temporary file renamed
    /// over it. Nothing when the store is in memory.
    pub fn save(&self) -> Result<(), StoreError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let mut text = String::from(HEADER);
        text.push('\n');
        for pool in POOLS.into_iter().filter(|p| *p != KvpPool::Auto) {
            for (k, v) in &self.pools[pool as usize] {
                let _ = writeln!(text, "{}\t{}\t{}", pool as u8, escape(k), escape(v));
            }
        }
        let io = |source| StoreError::Io {
            path: path.clone(),
            source,
        };
        let mut tmp = path.clone().into_os_string();
        tmp.push(".tmp");
        fs::write(&tmp, text).map_err(io)?;
        fs::rename(&tmp, path).map_err(io)
    }
}

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
    out
}

fn unescape(s: &str) -> Option<String> {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        out.push(match chars.next()? {
            '\\' => '\\',
            't' => '\t',
            'n' => '\n',
            'r' => '\r',
            _ => return None,
        });
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vmlink-kvp-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("temp dir");
        dir
    }

    #[test]
    fn entries_survive_a_reopen_escapes_and_all() {
        let dir = temp_dir("reopen");
        let path = dir.join("kvp");
        let mut store = KvpStore::open(&path).expect("new store");
        store
            .set(KvpPool::External, "a\tb", "line\nnext\\")
            .expect("set");
        store.set(KvpPool::Guest, "Role", "web").expect("set");
        store.set(KvpPool::Guest, "Role", "db").expect("overwrite");
        store.set_auto("OSName", "Linux").expect("auto");
        drop(store);
        let store = KvpStore::open(&path).expect("reopen");
        assert_eq!(store.get(KvpPool::External, "a\tb"), Some("line\nnext\\"));
        assert_eq!(store.get(KvpPool::Guest, "Role"), Some("db"));
        assert_eq!(store.len(KvpPool::Guest), 1);
        // The auto pool is recomputed, never read back.
        assert_eq!(store.get(KvpPool::Auto, "OSName"), None);
        fs::remove_dir_all(dir).expect("clean up");
    }

    #[test]
    fn the_auto_pool_is_read_only_to_the_host() {
        let mut store = KvpStore::in_memory();
        store.set_auto("OSName", "Linux").expect("agent sets");
        assert!(matches!(
            store.set(KvpPool::Auto, "OSName", "x"),
            Err(StoreError::ReadOnly)
        ));
        assert!(matches!(
            store.delete(KvpPool::Auto, "OSName"),
            Err(StoreError::ReadOnly)
        ));
        assert_eq!(store.get(KvpPool::Auto, "OSName"), Some("Linux"));
    }

    #[test]
    fn a_full_pool_refuses_and_keeps_what_it_has() {
        let mut store = KvpStore::in_memory();
        for i in 0..MAX_ENTRIES {
            store
                .set(KvpPool::External, &format!("k{i}"), "v")
                .expect("room");
        }
        assert!(matches!(
            store.set(KvpPool::External, "one more", "v"),
            Err(StoreError::Full { .. })
        ));
        // Overwriting an existing key still works; other pools are not affected.
        store.set(KvpPool::External, "k0", "w").expect("overwrite");
        store.set(KvpPool::Guest, "k", "v").expect("other pool");
        assert_eq!(store.len(KvpPool::External), MAX_ENTRIES);
        assert_eq!(store.entry(KvpPool::External, 0), Some(("k0", "w")));
    }

    #[test]
    fn a_change_that_cannot_be_saved_changes_nothing() {
        let dir = temp_dir("unsaved");
        let path = dir.join("kvp");
        let mut store = KvpStore::open(&path).expect("new store");
        store.set(KvpPool::Guest, "kept", "1").expect("set");
        // A directory where the temporary file would go: every save now fails.
        fs::create_dir(dir.join("kvp.tmp")).expect("block the temporary file");
        assert!(matches!(
            store.set(KvpPool::Guest, "new", "2"),
            Err(StoreError::Io { .. })
        ));
        assert!(matches!(
            store.set(KvpPool::Guest, "kept", "changed"),
            Err(StoreError::Io { .. })
        ));
        assert!(matches!(
            store.delete(KvpPool::Guest, "kept"),
            Err(StoreError::Io { .. })
        ));
        assert_eq!(store.get(KvpPool::Guest, "new"), None);
        assert_eq!(store.get(KvpPool::Guest, "kept"), Some("1"));
        fs::remove_dir_all(dir).expect("clean up");
    }

    #[test]
    fn delete_and_enumerate() {
        let mut store = KvpStore::in_memory();
        store.set(KvpPool::Guest, "a", "1").expect("set");
        store.set(KvpPool::Guest, "b", "2").expect("set");
        assert!(store.delete(KvpPool::Guest, "a").expect("delete"));
        assert!(!store.delete(KvpPool::Guest, "a").expect("second delete"));
        assert_eq!(store.entry(KvpPool::Guest, 0), Some(("b", "2")));
        assert_eq!(store.entry(KvpPool::Guest, 1), None);
    }

    #[test]
    fn a_corrupt_file_is_a_typed_error_naming_the_line() {
        let dir = temp_dir("corrupt");
        let path = dir.join("kvp");
        for (text, line) in [
            ("something else\n", 1),
            ("vmlink-kvp 1\n0\tk\n", 2),
            ("vmlink-kvp 1\n0\tk\tv\n7\tk\tv\n", 3),
            ("vmlink-kvp 1\n2\tOSName\tLinux\n", 2),
            ("vmlink-kvp 1\n0\tk\\q\tv\n", 2),
            ("vmlink-kvp 1\n0\tk\tv\n0\tk\tw\n", 3),
        ] {
            fs::write(&path, text).expect("write");
            match KvpStore::open(&path) {
                Err(StoreError::Corrupt { line: l, .. }) => assert_eq!(l, line, "{text:?}"),
                other => panic!("{text:?}: {other:?}"),
            }
        }
        fs::remove_dir_all(dir).expect("clean up");
    }
}
