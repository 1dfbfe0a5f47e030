//! Metadata store of a btfs node.
//!
//! The store keeps one [`Entry`] per path (live records and tombstones), and
//! three indexes derived from them, persisted beside them so that opening a
//! store costs nothing in the size of the namespace: inode number to path,
//! log number to path, and the reference count of each content object. The
//! counts over the tree ([`Stats`]) are kept in memory and written when the
//! store is closed.
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
//! ## Indexes and crashes
//!
//! One change to an entry is several single-key writes, ordered so that any
//! prefix of them errs on the safe side:
//!
//! 1. before the entry: a reference to its new content is counted, and
//!    the index keys of its new inode and log numbers are written;
//! 2. the entry;
//! 3. after the entry: the reference to its old content is dropped, and the
//!    index keys of its old numbers are removed.
//!
//! So a reference count may be too high after a crash (an object kept too
//! long), never too low (an object deleted under a live file); an index key
//! may name an entry that no longer has that number, which every reader
//! checks. Besides, [`Store::close`] writes a clean-shutdown marker (with the
//! counters) that [`Store::open`] removes: opening a store without it, after
//! a crash, rebuilds the indexes and the counters from one scan of the
//! entries, and renumbers an inode left on two live paths.
//!
//! Key layout:
//!
//! | key                               | value                      |
//! |-----------------------------------|----------------------------|
//! | `e`                               | root entry                 |
//! | `e` parent `\0` name              | entry of `parent/name`     |
//! | `i` ino, `l` seq, `r` content     | indexes (see `index.rs`)   |
//! | `m` name                          | node-local metadata        |
//! | `h` path `\0` time content        | a superseded version (`history`) |
//!
//! Children of a directory are therefore one prefix scan, in name order.
//!
//! ## Replication state
//!
//! An entry carries, besides the record the path shows here, the path's
//! maximal *signed* versions ([`Replication::versions`]): what the node relays to
//! others and merges with what it receives. Every change to them gives the
//! entry the next number of this node's log ([`Replication::seq`]); peers ask for
//! "everything after number N" (anti-entropy). The log is the `l` index,
//! checked against the entries it names. Numbers are reserved in blocks,
//! like inode numbers, so that they never go back.
//!
//! Some entries are *derived*, not replicated ([`Derived`]): conflict copies
//! and directories kept because something inside them survived a delete.
//! Every node derives the same ones from the same versions.

mod backend;
mod error;
mod history;
mod index;

use std::sync::{
    Mutex, MutexGuard,
    atomic::{AtomicBool, AtomicU64, Ordering},
};

pub use backend::{Backend, MemBackend, SledBackend};
use btfs_core::{ContentId, FileKind, FileRecord, RelPath};
pub use error::StoreError;
pub use history::{HistoryItem, HistoryStats, MAX_LOG};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

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
/// Present while the store is closed cleanly: its value is a [`Closed`].
const META_CLEAN: &[u8] = b"clean";
/// Layout of the persisted indexes that a [`Closed`] marker vouches for;
/// a marker of another layout is not trusted (the indexes are rebuilt).
const INDEX_LAYOUT: u32 = 1;
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
    pub(crate) fn content_ref(&self) -> Option<ContentId> {
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

/// What a clean close leaves for the next open.
#[derive(Debug, Serialize, Deserialize)]
struct Closed {
    layout: u32,
    stats: Stats,
}

/// The store's in-memory state: counters, and the number blocks reserved.
#[derive(Debug, Default)]
struct State {
    /// Next inode number to hand out, and the end of the reserved block.
    next_ino: u64,
    reserved_end: u64,
    /// Last sequence number handed out, and the end of the reserved block.
    seq: u64,
    seq_end: u64,
    stats: Stats,
    /// The clean-shutdown marker is on disk: the next write removes it first.
    marked_clean: bool,
    /// What the version history holds (read at open).
    history: history::Held,
}

/// The metadata store over a backend.
#[derive(Debug)]
pub struct Store<B> {
    backend: B,
    state: Mutex<State>,
    /// The newest log number whose entry is written: log readers stop there,
    /// so that a number whose index key is written but whose entry is not
    /// yet (a write under way) is never read as "changed again".
    published: AtomicU64,
    index_id: u64,
    /// `history=` is on: superseded versions are kept (see `history.rs`).
    history_on: AtomicBool,
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
            state: Mutex::new(State {
                next_ino: ROOT_INO + 1,
                reserved_end: ROOT_INO + 1,
                ..State::default()
            }),
            published: AtomicU64::new(0),
            index_id: fresh_index_id(),
            history_on: AtomicBool::new(false),
        }
    }
}

impl<B: Backend> Store<B> {
    /// Opens the store. After a clean close this reads a few keys; after a
    /// crash (no clean-shutdown marker) it rebuilds the indexes and counters
    /// from one scan of the entries and repairs inode numbers that an
    /// interrupted rename left on two live paths.
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
        let closed = backend
            .get(&meta_key(META_CLEAN))?
            .and_then(|v| decode::<Closed>("clean marker", &v).ok())
            .filter(|c| c.layout == INDEX_LAYOUT);
        let (state, duplicates) = match closed {
            Some(closed) => {
                // From here on a crash must be noticed: the marker goes first.
                backend.set(meta_key(META_CLEAN), None)?;
                let state = State {
                    // Every number up to the reserved ends may have been
                    // handed out, and none beyond them.
                    next_ino: stored_next,
                    reserved_end: stored_next,
                    seq: stored_seq,
                    seq_end: stored_seq,
                    stats: closed.stats,
                    marked_clean: false,
                    history: history::scan(&backend, &mut Vec::new())?,
                };
                (state, Vec::new())
            }
            None => {
                // A marker of another layout would vouch for what it does not know.
                backend.set(meta_key(META_CLEAN), None)?;
                let started = std::time::Instant::now();
                // History items keep their content as entries do.
                let mut history_refs = Vec::new();
                let history = history::scan(&backend, &mut history_refs)?;
                let r = index::rebuild(&backend, history_refs)?;
                info!(
                    entries = r.stats.files + r.stats.dirs + r.stats.symlinks + r.stats.tombstones,
                    repaired = r.repaired,
                    ms = started.elapsed().as_millis() as u64,
                    "metadata store was not closed cleanly: rebuilt its indexes"
                );
                let next = stored_next.max(r.max_ino + 1);
                let seq = stored_seq.max(r.max_seq);
                let state = State {
                    next_ino: next,
                    reserved_end: next,
                    seq,
                    seq_end: seq,
                    stats: r.stats,
                    marked_clean: false,
                    history,
                };
                (state, r.duplicates)
            }
        };
        let store = Self {
            backend,
            published: AtomicU64::new(state.seq),
            state: Mutex::new(state),
            index_id,
            history_on: AtomicBool::new(false),
        };
        for (path, mut e) in duplicates {
            let fresh = store.alloc_ino()?;
            warn!(%path, old = e.ino, new = fresh, "inode number on two paths (interrupted rename): renumbered");
            e.ino = fresh;
            // The inode index never named this path for the old number.
            index::set_path(&store.backend, index::ino_key(fresh), &path)?;
            store.backend.set(entry_key(&path), Some(encode(&e)?))?;
        }
        Ok(store)
    }

    fn state(&self) -> Result<MutexGuard<'_, State>> {
        self.state.lock().map_err(|_| StoreError::Poisoned)
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

    /// Path and entry (live or not) that inode `ino` names in the index,
    /// if the entry there still has that number.
    fn indexed(&self, ino: u64) -> Result<Option<(RelPath, Entry)>> {
        let Some(v) = self.backend.get(&index::ino_key(ino))? else {
            return Ok(None);
        };
        let path = index::path_of_value(&v)?;
        Ok(self.get(&path)?.filter(|e| e.ino == ino).map(|e| (path, e)))
    }

    /// The path that inode `ino` currently has.
    pub fn path_of(&self, ino: u64) -> Result<Option<RelPath>> {
        if ino == ROOT_INO {
            return Ok(Some(RelPath::root()));
        }
        Ok(self.indexed(ino)?.map(|(p, _)| p))
    }

    /// Path and live entry of inode `ino`.
    pub fn get_ino(&self, ino: u64) -> Result<Option<(RelPath, Entry)>> {
        if ino == ROOT_INO {
            let root = RelPath::root();
            return Ok(self
                .get_live(&root)?
                .filter(|e| e.ino == ino)
                .map(|e| (root, e)));
        }
        Ok(self.indexed(ino)?.filter(|(_, e)| e.is_live()))
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
        let mut st = self.state()?;
        if st.next_ino >= st.reserved_end {
            let end = st.next_ino + INO_BLOCK;
            self.backend
                .set(meta_key(META_NEXT_INO), Some(end.to_be_bytes().to_vec()))?;
            st.reserved_end = end;
        }
        let ino = st.next_ino;
        st.next_ino += 1;
        Ok(ino)
    }

    fn next_seq(&self, st: &mut State) -> Result<u64> {
        if st.seq >= st.seq_end {
            let end = st.seq + SEQ_BLOCK;
            self.backend
                .set(meta_key(META_NEXT_SEQ), Some(end.to_be_bytes().to_vec()))?;
            st.seq_end = end;
        }
        st.seq += 1;
        Ok(st.seq)
    }

    /// The id of this store's log (peers name it when they ask for a delta).
    pub fn index_id(&self) -> u64 {
        self.index_id
    }

    /// The newest sequence number handed out and written (0: none).
    pub fn max_seq(&self) -> Result<u64> {
        Ok(self.published.load(Ordering::Acquire))
    }

    /// Entries whose versions changed after `since`, oldest change first, at
    /// most `limit` numbers. A number whose entry changed again meanwhile
    /// comes with `None` (its new number comes later).
    pub fn log_since(&self, since: u64, limit: usize) -> Result<Vec<LogItem>> {
        let upto = self.published.load(Ordering::Acquire);
        let numbered = index::log_range(&self.backend, since, upto, limit)?;
        let mut out = Vec::with_capacity(numbered.len());
        for (seq, path) in numbered {
            let e = self.get(&path)?.filter(|e| e.sync.seq == seq);
            out.push((seq, e.map(|e| (path, e))));
        }
        Ok(out)
    }

    /// How many live files reference content `c` (never fewer than there
    /// are: see the module docs).
    pub fn refcount(&self, c: &ContentId) -> Result<u64> {
        index::refcount(&self.backend, c)
    }

    /// Applies `changes` in order, one store write each (see the module docs
    /// for what a crash in the middle keeps). Returns the content objects that
    /// no live entry references any more (the caller may delete them once the
    /// store is flushed).
    pub fn write(&self, changes: Vec<Change>) -> Result<Vec<ContentId>> {
        let mut st = self.state()?;
        let mut released = Vec::new();
        for change in changes {
            let (path, new) = match change {
                Change::Put(p, e) => (p, Some(e)),
                Change::Remove(p) => (p, None),
            };
            self.apply(&mut st, &path, new, &mut released)?;
        }
        // A content released and re-referenced within the batch is not free.
        released.sort();
        released.dedup();
        let mut free = Vec::with_capacity(released.len());
        for c in released {
            if index::refcount(&self.backend, &c)? == 0 {
                free.push(c);
            }
        }
        Ok(free)
    }

    /// One change, in the order the module docs give. Pushes the content
    /// whose last reference this dropped.
    fn apply(
        &self,
        st: &mut State,
        path: &RelPath,
        mut new: Option<Entry>,
        released: &mut Vec<ContentId>,
    ) -> Result<()> {
        if st.marked_clean {
            self.backend.set(meta_key(META_CLEAN), None)?;
            st.marked_clean = false;
        }
        let key = entry_key(path);
        let old: Option<Entry> = self
            .backend
            .get(&key)?
            .map(|v| decode("entry", &v))
            .transpose()?;
        let old_ref = old.as_ref().and_then(Entry::content_ref);
        let old_seq = old.as_ref().map_or(0, |o| o.sync.seq);
        let old_ino = old
            .as_ref()
            .filter(|o| index::has_indexed_ino(o))
            .map(|o| o.ino);
        // Before the entry: the old version's history item (its content
        // reference first, as for any entry).
        if self.history_on()
            && let Some(o) = &old
            && let Some(c) = history::superseded(o, new.as_ref())
        {
            self.keep_history(st, path, o, c)?;
        }
        if let Some(e) = new.as_mut() {
            let same = old
                .as_ref()
                .is_some_and(|o| o.sync.versions == e.sync.versions);
            e.sync.seq = match (old_seq, same) {
                _ if e.sync.versions.is_empty() => 0,
                (s, true) if s != 0 => s,
                _ => self.next_seq(st)?,
            };
            // Before the entry: what it needs to be found and kept.
            if let Some(c) = e.content_ref()
                && old_ref != Some(c)
            {
                index::add_ref(&self.backend, &c)?;
            }
            if index::has_indexed_ino(e) && old_ino != Some(e.ino) {
                index::set_path(&self.backend, index::ino_key(e.ino), path)?;
            }
            if e.sync.seq != 0 && e.sync.seq != old_seq {
                index::set_path(&self.backend, index::log_key(e.sync.seq), path)?;
            }
        }
        self.backend
            .set(key, new.as_ref().map(encode).transpose()?)?;
        let new_ref = new.as_ref().and_then(Entry::content_ref);
        let new_seq = new.as_ref().map_or(0, |e| e.sync.seq);
        let new_ino = new.as_ref().map(|e| e.ino);
        if new_seq != 0 {
            self.published.fetch_max(new_seq, Ordering::AcqRel);
        }
        // After the entry: what only the old entry needed.
        if let Some(ino) = old_ino.filter(|i| new_ino != Some(*i)) {
            // Only if it names this path: a rename pointed it elsewhere.
            let k = index::ino_key(ino);
            if self.backend.get(&k)?.as_deref() == Some(path.as_str().as_bytes()) {
                self.backend.set(k, None)?;
            }
        }
        if old_seq != 0 && old_seq != new_seq {
            // Log numbers are never reused: this key named this path.
            self.backend.set(index::log_key(old_seq), None)?;
        }
        if let Some(c) = old_ref.filter(|c| new_ref != Some(*c))
            && index::drop_ref(&self.backend, &c)?
        {
            released.push(c);
        }
        if let Some(o) = &old {
            index::tally(&mut st.stats, o, false);
        }
        if let Some(e) = &new {
            index::tally(&mut st.stats, e, true);
        }
        Ok(())
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
        // Read page by page: only the expired keys are kept.
        let mut candidates: Vec<Vec<u8>> = Vec::new();
        index::for_each(&self.backend, b"e", |k, v| {
            if decode::<Entry>("entry", &v).is_ok_and(|e| expired(&e)) {
                candidates.push(k);
            }
            Ok(())
        })?;
        let mut st = self.state()?;
        let mut removed = 0;
        let mut released = Vec::new();
        for key in candidates {
            let still = self
                .backend
                .get(&key)?
                .map(|v| decode::<Entry>("entry", &v))
                .transpose()?;
            if still.as_ref().is_some_and(expired) {
                self.apply(&mut st, &path_of_key(&key)?, None, &mut released)?;
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

    /// Counts over every entry, kept as entries are written (no scan).
    pub fn stats(&self) -> Result<Stats> {
        Ok(self.state()?.stats)
    }

    /// Makes everything written so far survive a crash of the process.
    pub fn flush(&self) -> Result<()> {
        self.backend.flush()
    }

    /// Flushes, and marks the store closed cleanly so that the next
    /// [`Store::open`] trusts its indexes instead of rebuilding them. Call
    /// at shutdown, once nothing else will write; a write after it is still
    /// safe (it removes the marker first), only the next open scans again.
    pub fn close(&self) -> Result<()> {
        let mut st = self.state()?;
        let closed = Closed {
            layout: INDEX_LAYOUT,
            stats: st.stats,
        };
        // Written after every index write: a crash before the flush that
        // loses one of those loses the marker too (a prefix survives).
        self.backend
            .set(meta_key(META_CLEAN), Some(encode(&closed)?))?;
        st.marked_clean = true;
        self.backend.flush()
    }
}

#[cfg(test)]
mod index_tests;
#[cfg(test)]
mod tests;
