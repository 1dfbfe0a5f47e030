//! Metadata store of a btfs node.
//!
//! The store keeps one [`Entry`] per path (live records and tombstones), an index
//! from local inode numbers to paths, and a reference count per content object.
//! It is written against a small ordered key-value [`Backend`]: [`SledBackend`]
//! in the daemon, [`MemBackend`] in tests. Every [`Store::write`] is applied
//! atomically, so a crash leaves either the whole change or none of it.
//!
//! Key layout (one keyspace, so that one atomic batch covers every index):
//!
//! | key                               | value                      |
//! |-----------------------------------|----------------------------|
//! | `e`                               | root entry                 |
//! | `e` parent `\0` name              | entry of `parent/name`     |
//! | `i` ino (u64, big-endian)         | path                       |
//! | `r` content id (32 bytes)         | reference count (u64, BE)  |
//! | `m` name                          | node-local metadata        |
//!
//! Children of a directory are therefore one prefix scan, in name order.

mod backend;
mod error;

use std::{
    collections::{BTreeMap, HashMap},
    sync::Mutex,
};

pub use backend::{Backend, MemBackend, SledBackend};
use btfs_core::{ContentId, FileKind, FileRecord, RelPath};
pub use error::StoreError;
use serde::{Deserialize, Serialize};

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Inode number of the root directory.
pub const ROOT_INO: u64 = 1;
/// Inode number given to tombstones (they have no local inode).
pub const NO_INO: u64 = 0;
/// Inode numbers are reserved in blocks so that allocation rarely writes.
const INO_BLOCK: u64 = 1024;
const META_NEXT_INO: &[u8] = b"next_ino";

/// A path's record plus the node-local inode number that the kernel sees.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub ino: u64,
    pub record: FileRecord,
}

impl Entry {
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

/// One step of an atomic [`Store::write`].
#[derive(Debug, Clone)]
pub enum Change {
    /// Stores `entry` at the path, replacing what was there.
    Put(RelPath, Entry),
    /// Forgets the path entirely (tombstone collection).
    Remove(RelPath),
}

/// Counts over the live tree.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub tombstones: u64,
    /// Sum of live file sizes.
    pub bytes: u64,
}

/// The metadata store over a backend.
#[derive(Debug)]
pub struct Store<B> {
    backend: B,
    /// Next inode number to hand out, and the end of the reserved block.
    inos: Mutex<(u64, u64)>,
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

fn children_prefix(dir: &RelPath) -> Vec<u8> {
    let mut k = vec![b'e'];
    k.extend_from_slice(dir.as_str().as_bytes());
    k.push(0);
    k
}

fn ino_key(ino: u64) -> Vec<u8> {
    let mut k = vec![b'i'];
    k.extend_from_slice(&ino.to_be_bytes());
    k
}

fn ref_key(c: &ContentId) -> Vec<u8> {
    let mut k = vec![b'r'];
    k.extend_from_slice(c.as_bytes());
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
        // A fresh in-memory backend cannot fail to open.
        Self {
            backend: MemBackend::default(),
            inos: Mutex::new((ROOT_INO + 1, ROOT_INO + 1)),
        }
    }
}

impl<B: Backend> Store<B> {
    pub fn open(backend: B) -> Result<Self> {
        let next = match backend.get(&meta_key(META_NEXT_INO))? {
            Some(v) => decode_u64(&v)?,
            None => ROOT_INO + 1,
        };
        Ok(Self {
            backend,
            inos: Mutex::new((next, next)),
        })
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
        match self.backend.get(&ino_key(ino))? {
            None => Ok(None),
            Some(v) => {
                let s = std::str::from_utf8(&v)
                    .map_err(|_| StoreError::Corrupt(format!("inode {ino}: path not UTF-8")))?;
                RelPath::parse(s)
                    .map(Some)
                    .map_err(|e| StoreError::Corrupt(format!("inode {ino}: {e}")))
            }
        }
    }

    /// Path and live entry of inode `ino`.
    pub fn get_ino(&self, ino: u64) -> Result<Option<(RelPath, Entry)>> {
        let Some(path) = self.path_of(ino)? else {
            return Ok(None);
        };
        Ok(self.get_live(&path)?.map(|e| (path, e)))
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

    /// Every path at or below `dir` with its entry (tombstones included), parents
    /// before children.
    pub fn subtree(&self, dir: &RelPath) -> Result<Vec<(RelPath, Entry)>> {
        let mut out = Vec::new();
        if let Some(e) = self.get(dir)? {
            out.push((dir.clone(), e));
        }
        let mut i = 0;
        while i < out.len() {
            let (path, entry) = (out[i].0.clone(), out[i].1.record.kind);
            if entry == FileKind::Dir {
                for (name, child) in self.live_children_and_tombstones(&path)? {
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

    fn live_children_and_tombstones(&self, dir: &RelPath) -> Result<Vec<(String, Entry)>> {
        self.children(dir, None, usize::MAX)
    }

    /// A fresh inode number, never handed out before by this store.
    pub fn alloc_ino(&self) -> Result<u64> {
        let mut guard = self.inos.lock().map_err(|_| StoreError::Poisoned)?;
        let (next, reserved_end) = &mut *guard;
        if *next >= *reserved_end {
            let end = *next + INO_BLOCK;
            self.backend.apply(vec![(
                meta_key(META_NEXT_INO),
                Some(end.to_be_bytes().to_vec()),
            )])?;
            *reserved_end = end;
        }
        let ino = *next;
        *next += 1;
        Ok(ino)
    }

    /// How many live files reference content `c`.
    pub fn refcount(&self, c: &ContentId) -> Result<u64> {
        self.backend
            .get(&ref_key(c))?
            .map(|v| decode_u64(&v))
            .transpose()
            .map(|n| n.unwrap_or(0))
    }

    /// Applies `changes` atomically and in order. Returns the content objects
    /// that no live entry references any more (the caller may delete them).
    pub fn write(&self, changes: Vec<Change>) -> Result<Vec<ContentId>> {
        let mut writes: BTreeMap<Vec<u8>, Option<Vec<u8>>> = BTreeMap::new();
        let mut ref_delta: HashMap<ContentId, i64> = HashMap::new();
        let current =
            |writes: &BTreeMap<Vec<u8>, Option<Vec<u8>>>, key: &[u8]| match writes.get(key) {
                Some(v) => Ok(v.clone()),
                None => self.backend.get(key),
            };

        for change in changes {
            let (path, new) = match change {
                Change::Put(p, e) => (p, Some(e)),
                Change::Remove(p) => (p, None),
            };
            let key = entry_key(&path);
            let old: Option<Entry> = current(&writes, &key)?
                .map(|v| decode("entry", &v))
                .transpose()?;

            if let Some(c) = old.as_ref().and_then(Entry::content_ref) {
                *ref_delta.entry(c).or_default() -= 1;
            }
            if let Some(c) = new.as_ref().and_then(Entry::content_ref) {
                *ref_delta.entry(c).or_default() += 1;
            }

            let old_ino = old.as_ref().map_or(NO_INO, |e| e.ino);
            let new_ino = new.as_ref().map_or(NO_INO, |e| e.ino);
            if old_ino != NO_INO && old_ino != ROOT_INO && old_ino != new_ino {
                // Drop the index only if it still points here: in a rename the
                // inode may already have moved to its new path in this batch.
                let ik = ino_key(old_ino);
                if current(&writes, &ik)?.as_deref() == Some(path.as_str().as_bytes()) {
                    writes.insert(ik, None);
                }
            }
            if new_ino != NO_INO && new_ino != ROOT_INO {
                writes.insert(ino_key(new_ino), Some(path.as_str().as_bytes().to_vec()));
            }
            writes.insert(key, new.as_ref().map(encode).transpose()?);
        }

        let mut released = Vec::new();
        for (c, delta) in ref_delta {
            if delta == 0 {
                continue;
            }
            let before = self.refcount(&c)?;
            let after = i64::try_from(before)
                .unwrap_or(i64::MAX)
                .saturating_add(delta)
                .max(0)
                .unsigned_abs();
            if after == 0 {
                released.push(c);
                writes.insert(ref_key(&c), None);
            } else {
                writes.insert(ref_key(&c), Some(after.to_be_bytes().to_vec()));
            }
        }
        self.backend.apply(writes.into_iter().collect())?;
        Ok(released)
    }

    /// Node-local metadata value.
    pub fn meta(&self, name: &str) -> Result<Option<Vec<u8>>> {
        self.backend.get(&meta_key(name.as_bytes()))
    }

    pub fn set_meta(&self, name: &str, value: &[u8]) -> Result<()> {
        self.backend
            .apply(vec![(meta_key(name.as_bytes()), Some(value.to_vec()))])
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
