//! Metadata store of a btfs node.
//!
//! The store keeps one [`Entry`] per path (live records and tombstones). Entries
//! are the only thing persisted; the index from local inode numbers to paths
//! and the reference count of each content object are derived from them, kept
//! in memory and rebuilt by one scan when the store is opened.
//!
//! It is written against a small ordered key-value [`Backend`]: [`SledBackend`]
//! in the daemon, [`MemBackend`] in tests. Each change is one single-key write:
//! sled batches and transactions each force a synchronous log write (measured:
//! about 10x the CPU of plain inserts), while plain inserts are logged in order
//! and a crash recovers a prefix of them. [`Store::write`] therefore applies its
//! changes in order, and callers order multi-step changes so that every prefix
//! loses nothing (a rename writes the new path before the old path's
//! tombstone). What a prefix can leave behind, two live paths with one inode
//! number, is repaired when the store is opened.
//!
//! Key layout:
//!
//! | key                               | value                      |
//! |-----------------------------------|----------------------------|
//! | `e`                               | root entry                 |
//! | `e` parent `\0` name              | entry of `parent/name`     |
//! | `m` name                          | node-local metadata        |
//!
//! Children of a directory are therefore one prefix scan, in name order.
//!
//! ## Replication state
//!
//! An entry carries, besides the record the path shows here, the path's
//! maximal *signed* versions ([`Replication::versions`]): what the node relays to
//! others and merges with what it receives. Every change to them gives the
//! entry the next number of this node's log ([`Replication::seq`]); peers ask for
//! "everything after number N" (anti-entropy). The log is the entries
//! themselves, ordered by that number: an in-memory index rebuilt on open, so
//! that it can never disagree with them after a crash. Numbers are reserved
//! in blocks, like inode numbers, so that they never go back.
//!
//! Some entries are *derived*, not replicated ([`Derived`]): conflict copies
//! and directories kept because something inside them survived a delete.
//! Every node derives the same ones from the same versions.

mod backend;
mod error;

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Mutex, MutexGuard},
};

pub use backend::{Backend, MemBackend, SledBackend};
use btfs_core::{ContentId, FileKind, FileRecord, RelPath};
pub use error::StoreError;
use serde::{Deserialize, Serialize};
use tracing::warn;

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Inode number of the root directory.
pub const ROOT_INO: u64 = 1;
/// Inode number given to tombstones (they have no local inode).
pub const NO_INO: u64 = 0;
/// Inode numbers are reserved in blocks so that allocation rarely writes.
const INO_BLOCK: u64 = 1024;
const META_NEXT_INO: &[u8] = b"next_ino";
const META_NEXT_SEQ: &[u8] = b"next_seq";
const META_INDEX_ID: &[u8] = b"index_id";
/// Log numbers are reserved in blocks too.
const SEQ_BLOCK: u64 = 4096;

/// One signed version of a path's record, as its author made it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Version {
    pub record: FileRecord,
    /// The author's signature (empty on a node without a mesh).
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

/// Why an entry exists without a record of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Derived {
    /// A losing concurrent version of a sibling path, shown under its
    /// conflict-copy name.
    ConflictCopy,
    /// A directory whose versions are deleted (or not known yet) but that
    /// holds live entries, which survive the delete.
    ImplicitDir,
}

/// Replication state of an entry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replication {
    /// The path's maximal versions, in `btfs_core::Versions` order. Empty for
    /// a path that has no replicated record (derived, or a node-local root).
    pub versions: Vec<Version>,
    /// Position in this node's log; 0 for entries with no versions. Set by
    /// [`Store::write`].
    pub seq: u64,
    pub derived: Option<Derived>,
}

/// One number of the log: the path and entry it names, or `None` if the
/// entry changed again since (its new number comes later).
pub type LogItem = (u64, Option<(RelPath, Entry)>);

/// A path's record plus the node-local inode number that the kernel sees.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub ino: u64,
    pub record: FileRecord,
    pub sync: Replication,
}

impl Replication {
    /// Replication state with these versions; the log number is set when
    /// the entry is written.
    pub fn new(versions: Vec<Version>, derived: Option<Derived>) -> Self {
        Self {
            versions,
            seq: 0,
            derived,
        }
    }
}

impl Entry {
    /// An entry with no replication state yet.
    pub fn new(ino: u64, record: FileRecord) -> Self {
        Self {
            ino,
            record,
            sync: Replication::default(),
        }
    }

    pub fn is_derived(&self) -> bool {
        self.sync.derived.is_some()
    }

    pub fn is_live(&self) -> bool {
        self.record.is_live()
    }

    /// The content object this entry keeps alive, if any.
    fn content_ref(&self) -> Option<ContentId> {
        match (&self.record.kind, self.record.deleted) {
            (FileKind::File, false) => self.record.content,
            _ => None,
        }
    }
}

/// One step of a [`Store::write`].
// Changes live for one write call, a handful at a time: boxing buys nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Change {
    /// Stores `entry` at the path, replacing what was there.
    Put(RelPath, Entry),
    /// Forgets the path entirely (tombstone collection).
    Remove(RelPath),
}

/// Counts over the live tree.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Stats {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub tombstones: u64,
    /// Sum of live file sizes.
    pub bytes: u64,
}

/// Indexes derived from the entries.
#[derive(Debug, Default)]
struct Indexes {
    paths: HashMap<u64, RelPath>,
    refs: HashMap<ContentId, u64>,
    /// Next inode number to hand out, and the end of the reserved block.
    next_ino: u64,
    reserved_end: u64,
    /// The log: entries with versions, by sequence number.
    log: BTreeMap<u64, RelPath>,
    /// Last sequence number handed out, and the end of the reserved block.
    seq: u64,
    seq_end: u64,
}

impl Indexes {
    fn add(&mut self, path: &RelPath, e: &Entry) {
        if let Some(c) = e.content_ref() {
            *self.refs.entry(c).or_default() += 1;
        }
        if e.ino != NO_INO && e.ino != ROOT_INO {
            self.paths.insert(e.ino, path.clone());
        }
        if e.sync.seq != 0 {
            self.log.insert(e.sync.seq, path.clone());
        }
    }

    /// Returns the content released if this was its last reference.
    fn remove(&mut self, path: &RelPath, e: &Entry) -> Option<ContentId> {
        if e.ino != NO_INO && self.paths.get(&e.ino) == Some(path) {
            self.paths.remove(&e.ino);
        }
        if e.sync.seq != 0 && self.log.get(&e.sync.seq) == Some(path) {
            self.log.remove(&e.sync.seq);
        }
        let c = e.content_ref()?;
        let n = self.refs.get_mut(&c)?;
        *n -= 1;
        if *n == 0 {
            self.refs.remove(&c);
            return Some(c);
        }
        None
    }
}

/// The metadata store over a backend.
#[derive(Debug)]
pub struct Store<B> {
    backend: B,
    idx: Mutex<Indexes>,
    index_id: u64,
}

fn entry_key(path: &RelPath) -> Vec<u8> {
    let mut k = vec![b'e'];
    if let Some((parent, name)) = path.split() {
        k.extend_from_slice(parent.as_str().as_bytes());
        k.push(0);
        k.extend_from_slice(name.as_bytes());
    }
    k
}

fn path_of_key(key: &[u8]) -> Result<RelPath> {
    let rest = key.get(1..).unwrap_or_default();
    let s =
        std::str::from_utf8(rest).map_err(|_| StoreError::Corrupt("entry key not UTF-8".into()))?;
    let joined = match s.split_once('\0') {
        None if s.is_empty() => String::new(),
        None => {
            return Err(StoreError::Corrupt(format!(
                "entry key {s:?} has no separator"
            )));
        }
        Some(("", name)) => name.to_owned(),
        Some((parent, name)) => format!("{parent}/{name}"),
    };
    RelPath::parse(&joined).map_err(|e| StoreError::Corrupt(format!("entry key {joined:?}: {e}")))
}

fn children_prefix(dir: &RelPath) -> Vec<u8> {
    let mut k = vec![b'e'];
    k.extend_from_slice(dir.as_str().as_bytes());
    k.push(0);
    k
}

fn meta_key(name: &[u8]) -> Vec<u8> {
    let mut k = vec![b'm'];
    k.extend_from_slice(name);
    k
}

fn decode<T: for<'de> Deserialize<'de>>(what: &'static str, bytes: &[u8]) -> Result<T> {
    postcard::from_bytes(bytes).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    postcard::to_allocvec(v).map_err(|e| StoreError::Corrupt(format!("encode: {e}")))
}

/// An id for a new log: distinct across stores and incarnations.
fn fresh_index_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    h.finish()
}

fn decode_u64(bytes: &[u8]) -> Result<u64> {
    let arr: [u8; 8] = bytes
        .try_into()
        .map_err(|_| StoreError::Corrupt("counter is not 8 bytes".into()))?;
    Ok(u64::from_be_bytes(arr))
}

impl Store<SledBackend> {
    /// Opens (or creates) the sled store in `dir`.
    pub fn open_sled(dir: &std::path::Path) -> Result<Self> {
        Self::open(SledBackend::open(dir)?)
    }
}

impl Store<MemBackend> {
    /// A fresh store in memory.
    pub fn in_memory() -> Self {
        Self {
            backend: MemBackend::default(),
            idx: Mutex::new(Indexes {
                next_ino: ROOT_INO + 1,
                reserved_end: ROOT_INO + 1,
                ..Indexes::default()
            }),
            index_id: fresh_index_id(),
        }
    }
}

impl<B: Backend> Store<B> {
    /// Opens the store: rebuilds the indexes from the entries and repairs
    /// inode numbers that an interrupted rename left on two live paths.
    pub fn open(backend: B) -> Result<Self> {
        let stored_next = match backend.get(&meta_key(META_NEXT_INO))? {
            Some(v) => decode_u64(&v)?,
            None => ROOT_INO + 1,
        };
        let stored_seq = match backend.get(&meta_key(META_NEXT_SEQ))? {
            Some(v) => decode_u64(&v)?,
            None => 0,
        };
        let index_id = match backend.get(&meta_key(META_INDEX_ID))? {
            Some(v) => decode_u64(&v)?,
            None => {
                let id = fresh_index_id();
                backend.set(meta_key(META_INDEX_ID), Some(id.to_be_bytes().to_vec()))?;
                id
            }
        };
        let mut idx = Indexes::default();
        let mut duplicates = Vec::new();
        let mut max_ino = ROOT_INO;
        for (k, v) in backend.scan(b"e", None, usize::MAX)? {
            let path = path_of_key(&k)?;
            let e: Entry = decode("entry", &v)?;
            max_ino = max_ino.max(e.ino);
            if e.is_live() && e.ino != ROOT_INO && idx.paths.contains_key(&e.ino) {
                duplicates.push((path, e));
                continue;
            }
            idx.add(&path, &e);
        }
        let next = stored_next.max(max_ino + 1);
        idx.next_ino = next;
        idx.reserved_end = next;
        // Everything up to the reserved end may have been handed out.
        let seq = stored_seq.max(idx.log.keys().next_back().copied().unwrap_or(0));
        idx.seq = seq;
        idx.seq_end = seq;
        let store = Self {
            backend,
            idx: Mutex::new(idx),
            index_id,
        };
        for (path, mut e) in duplicates {
            let fresh = store.alloc_ino()?;
            warn!(%path, old = e.ino, new = fresh, "inode number on two paths (interrupted rename): renumbered");
            e.ino = fresh;
            store.backend.set(entry_key(&path), Some(encode(&e)?))?;
            store.idx()?.add(&path, &e);
        }
        Ok(store)
    }

    fn idx(&self) -> Result<MutexGuard<'_, Indexes>> {
        self.idx.lock().map_err(|_| StoreError::Poisoned)
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The entry at `path`, live or tombstone.
    pub fn get(&self, path: &RelPath) -> Result<Option<Entry>> {
        self.backend
            .get(&entry_key(path))?
            .map(|v| decode("entry", &v))
            .transpose()
    }

    /// The live entry at `path`.
    pub fn get_live(&self, path: &RelPath) -> Result<Option<Entry>> {
        Ok(self.get(path)?.filter(Entry::is_live))
    }

    /// The path that inode `ino` currently has.
    pub fn path_of(&self, ino: u64) -> Result<Option<RelPath>> {
        if ino == ROOT_INO {
            return Ok(Some(RelPath::root()));
        }
        Ok(self.idx()?.paths.get(&ino).cloned())
    }

    /// Path and live entry of inode `ino`.
    pub fn get_ino(&self, ino: u64) -> Result<Option<(RelPath, Entry)>> {
        let Some(path) = self.path_of(ino)? else {
            return Ok(None);
        };
        Ok(self
            .get_live(&path)?
            .filter(|e| e.ino == ino)
            .map(|e| (path, e)))
    }

    /// Up to `limit` entries directly below `dir` (tombstones included), in name
    /// order, starting after the name `after`.
    pub fn children(
        &self,
        dir: &RelPath,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Entry)>> {
        let prefix = children_prefix(dir);
        let after_key = after.map(|name| {
            let mut k = prefix.clone();
            k.extend_from_slice(name.as_bytes());
            k
        });
        self.backend
            .scan(&prefix, after_key.as_deref(), limit)?
            .into_iter()
            .map(|(k, v)| {
                let name = std::str::from_utf8(&k[prefix.len()..])
                    .map_err(|_| StoreError::Corrupt("entry name not UTF-8".into()))?
                    .to_owned();
                Ok((name, decode("entry", &v)?))
            })
            .collect()
    }

    /// Every live entry directly below `dir`, in name order.
    pub fn live_children(&self, dir: &RelPath) -> Result<Vec<(String, Entry)>> {
        const PAGE: usize = 4096;
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = self.children(dir, after.as_deref(), PAGE)?;
            let full = page.len() == PAGE;
            after = page.last().map(|(n, _)| n.clone());
            out.extend(page.into_iter().filter(|(_, e)| e.is_live()));
            if !full {
                return Ok(out);
            }
        }
    }

    /// True if `dir` has at least one live child.
    pub fn has_live_children(&self, dir: &RelPath) -> Result<bool> {
        const PAGE: usize = 256;
        let mut after: Option<String> = None;
        loop {
            let page = self.children(dir, after.as_deref(), PAGE)?;
            if page.iter().any(|(_, e)| e.is_live()) {
                return Ok(true);
            }
            if page.len() < PAGE {
                return Ok(false);
            }
            after = page.last().map(|(n, _)| n.clone());
        }
    }

    /// Every path at or below `dir` with its entry (tombstones included),
    /// parents before children.
    pub fn subtree(&self, dir: &RelPath) -> Result<Vec<(RelPath, Entry)>> {
        let mut out = Vec::new();
        if let Some(e) = self.get(dir)? {
            out.push((dir.clone(), e));
        }
        let mut i = 0;
        while i < out.len() {
            let (path, kind) = (out[i].0.clone(), out[i].1.record.kind);
            if kind == FileKind::Dir {
                for (name, child) in self.children(&path, None, usize::MAX)? {
                    let child_path = path
                        .join(&name)
                        .map_err(|e| StoreError::Corrupt(format!("bad name {name:?}: {e}")))?;
                    out.push((child_path, child));
                }
            }
            i += 1;
        }
        Ok(out)
    }

    /// A fresh inode number, never handed out before by this store.
    pub fn alloc_ino(&self) -> Result<u64> {
        let mut idx = self.idx()?;
        if idx.next_ino >= idx.reserved_end {
            let end = idx.next_ino + INO_BLOCK;
            self.backend
                .set(meta_key(META_NEXT_INO), Some(end.to_be_bytes().to_vec()))?;
            idx.reserved_end = end;
        }
        let ino = idx.next_ino;
        idx.next_ino += 1;
        Ok(ino)
    }

    fn next_seq(&self, idx: &mut Indexes) -> Result<u64> {
        if idx.seq >= idx.seq_end {
            let end = idx.seq + SEQ_BLOCK;
            self.backend
                .set(meta_key(META_NEXT_SEQ), Some(end.to_be_bytes().to_vec()))?;
            idx.seq_end = end;
        }
        idx.seq += 1;
        Ok(idx.seq)
    }

    /// The id of this store's log (peers name it when they ask for a delta).
    pub fn index_id(&self) -> u64 {
        self.index_id
    }

    /// The newest sequence number handed out (0: none).
    pub fn max_seq(&self) -> Result<u64> {
        Ok(self.idx()?.seq)
    }

    /// Entries whose versions changed after `since`, oldest change first, at
    /// most `limit` numbers. A number whose entry changed again meanwhile
    /// comes with `None` (its new number comes later).
    pub fn log_since(&self, since: u64, limit: usize) -> Result<Vec<LogItem>> {
        let paths: Vec<(u64, RelPath)> = {
            let idx = self.idx()?;
            idx.log
                .range(since.saturating_add(1)..)
                .take(limit)
                .map(|(s, p)| (*s, p.clone()))
                .collect()
        };
        let mut out = Vec::with_capacity(paths.len());
        for (seq, path) in paths {
            let e = self.get(&path)?.filter(|e| e.sync.seq == seq);
            out.push((seq, e.map(|e| (path, e))));
        }
        Ok(out)
    }

    /// How many live files reference content `c`.
    pub fn refcount(&self, c: &ContentId) -> Result<u64> {
        Ok(self.idx()?.refs.get(c).copied().unwrap_or(0))
    }

    /// Applies `changes` in order, one store write each (see the module docs
    /// for what a crash in the middle keeps). Returns the content objects that
    /// no live entry references any more (the caller may delete them once the
    /// store is flushed).
    pub fn write(&self, changes: Vec<Change>) -> Result<Vec<ContentId>> {
        let mut idx = self.idx()?;
        let mut released = Vec::new();
        for change in changes {
            let (path, new) = match change {
                Change::Put(p, e) => (p, Some(e)),
                Change::Remove(p) => (p, None),
            };
            let key = entry_key(&path);
            let old: Option<Entry> = self
                .backend
                .get(&key)?
                .map(|v| decode("entry", &v))
                .transpose()?;
            let mut new = new;
            if let Some(e) = new.as_mut() {
                let same = old
                    .as_ref()
                    .is_some_and(|o| o.sync.versions == e.sync.versions);
                e.sync.seq = match (&old, same) {
                    _ if e.sync.versions.is_empty() => 0,
                    (Some(o), true) if o.sync.seq != 0 => o.sync.seq,
                    _ => self.next_seq(&mut idx)?,
                };
            }
            self.backend
                .set(key, new.as_ref().map(encode).transpose()?)?;
            if let Some(c) = old.as_ref().and_then(|o| idx.remove(&path, o)) {
                released.push(c);
            }
            if let Some(e) = &new {
                idx.add(&path, e);
            }
        }
        // A content released and re-referenced within the batch is not free.
        released.retain(|c| !idx.refs.contains_key(c));
        released.sort();
        released.dedup();
        Ok(released)
    }

    /// Forgets tombstones whose delete happened before `cutoff` (their
    /// ctime). Each one is checked again under the write lock, so a path that
    /// was re-created meanwhile is never touched. Returns how many went.
    pub fn collect_tombstones(&self, cutoff: btfs_core::Timestamp) -> Result<usize> {
        let expired = |e: &Entry| {
            !e.is_live()
                && e.record.ctime < cutoff
                && e.sync.versions.iter().all(|v| v.record.ctime < cutoff)
        };
        let candidates: Vec<Vec<u8>> = self
            .backend
            .scan(b"e", None, usize::MAX)?
            .into_iter()
            .filter(|(_, v)| decode::<Entry>("entry", v).is_ok_and(|e| expired(&e)))
            .map(|(k, _)| k)
            .collect();
        let mut idx = self.idx()?;
        let mut removed = 0;
        for key in candidates {
            let still = self
                .backend
                .get(&key)?
                .map(|v| decode::<Entry>("entry", &v))
                .transpose()?;
            if let Some(e) = still.filter(expired) {
                self.backend.set(key.clone(), None)?;
                idx.remove(&path_of_key(&key)?, &e);
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Node-local metadata value.
    pub fn meta(&self, name: &str) -> Result<Option<Vec<u8>>> {
        self.backend.get(&meta_key(name.as_bytes()))
    }

    pub fn set_meta(&self, name: &str, value: &[u8]) -> Result<()> {
        self.backend
            .set(meta_key(name.as_bytes()), Some(value.to_vec()))
    }

    /// Counts over every entry (a full scan: for status, not hot paths).
    pub fn stats(&self) -> Result<Stats> {
        let mut s = Stats::default();
        for (_, v) in self.backend.scan(b"e", None, usize::MAX)? {
            let e: Entry = decode("entry", &v)?;
            if !e.is_live() {
                s.tombstones += 1;
                continue;
            }
            match e.record.kind {
                FileKind::File => {
                    s.files += 1;
                    s.bytes += e.record.size;
                }
                FileKind::Dir => s.dirs += 1,
                FileKind::Symlink => s.symlinks += 1,
            }
        }
        Ok(s)
    }

    /// Makes everything written so far survive a crash of the process.
    pub fn flush(&self) -> Result<()> {
        self.backend.flush()
    }
}

#[cfg(test)]
mod tests;
