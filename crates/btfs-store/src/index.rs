//! The persisted indexes: their keys, and their rebuild from the entries
//! after a run that did not close cleanly.
//!
//! | key                     | value                                   |
//! |-------------------------|-----------------------------------------|
//! | `i` ino (8 bytes BE)    | path of the entry with that inode       |
//! | `l` seq (8 bytes BE)    | path of the entry with that log number  |
//! | `r` content id          | live files and history items referencing it (8 bytes BE) |
//!
//! Big-endian numbers make key order numeric order: the log is a range scan.

use std::collections::HashSet;

use btfs_core::{ContentId, RelPath};

use crate::{
    Backend, Entry, NO_INO, ROOT_INO, Result, Stats, StoreError, decode, decode_u64, path_of_key,
};

const INO_PREFIX: u8 = b'i';
const LOG_PREFIX: u8 = b'l';
const REF_PREFIX: u8 = b'r';

/// Pairs read per scan call when the store walks a whole prefix (the
/// rebuild, tombstone collection): bounds the memory of one walk step
/// whatever the namespace size.
pub(crate) const SCAN_PAGE: usize = 4096;

fn numbered(prefix: u8, n: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(9);
    k.push(prefix);
    k.extend_from_slice(&n.to_be_bytes());
    k
}

pub(crate) fn ino_key(ino: u64) -> Vec<u8> {
    numbered(INO_PREFIX, ino)
}

pub(crate) fn log_key(seq: u64) -> Vec<u8> {
    numbered(LOG_PREFIX, seq)
}

pub(crate) fn ref_key(c: &ContentId) -> Vec<u8> {
    let mut k = Vec::with_capacity(33);
    k.push(REF_PREFIX);
    k.extend_from_slice(c.as_bytes());
    k
}

/// The number after a one-byte prefix (`i`, `l`).
fn number_of_key(key: &[u8]) -> Result<u64> {
    decode_u64(key.get(1..).unwrap_or_default())
}

fn content_of_key(key: &[u8]) -> Result<ContentId> {
    let bytes: [u8; 32] = key
        .get(1..)
        .unwrap_or_default()
        .try_into()
        .map_err(|_| StoreError::Corrupt("reference key is not a content id".into()))?;
    Ok(ContentId(bytes))
}

/// The path an index value names.
pub(crate) fn path_of_value(v: &[u8]) -> Result<RelPath> {
    RelPath::parse_bytes(v).map_err(|e| StoreError::Corrupt(format!("index value: {e}")))
}

/// Whether an entry's inode number is in the inode index (the root's is
/// implicit, tombstones have none).
pub(crate) fn has_indexed_ino(e: &Entry) -> bool {
    e.ino != NO_INO && e.ino != ROOT_INO
}

/// Adds (`add`) or takes away an entry's share of the tree counters.
pub(crate) fn tally(s: &mut Stats, e: &Entry, add: bool) {
    let step = |n: &mut u64, by: u64| {
        *n = if add {
            n.saturating_add(by)
        } else {
            n.saturating_sub(by)
        }
    };
    if !e.is_live() {
        step(&mut s.tombstones, 1);
        return;
    }
    match e.record.kind {
        btfs_core::FileKind::File => {
            step(&mut s.files, 1);
            step(&mut s.bytes, e.record.size);
        }
        btfs_core::FileKind::Dir => step(&mut s.dirs, 1),
        btfs_core::FileKind::Symlink => step(&mut s.symlinks, 1),
    }
}

/// Calls `f` on every pair under `prefix`, [`SCAN_PAGE`] at a time.
pub(crate) fn for_each<B: Backend>(
    backend: &B,
    prefix: &[u8],
    mut f: impl FnMut(Vec<u8>, Vec<u8>) -> Result<()>,
) -> Result<()> {
    let mut after: Option<Vec<u8>> = None;
    loop {
        let page = backend.scan(prefix, after.as_deref(), SCAN_PAGE)?;
        let full = page.len() == SCAN_PAGE;
        after = page.last().map(|(k, _)| k.clone());
        for (k, v) in page {
            f(k, v)?;
        }
        if !full {
            return Ok(());
        }
    }
}

/// What one scan of the entries found.
#[derive(Debug, Default)]
pub(crate) struct Rebuilt {
    pub(crate) stats: Stats,
    pub(crate) max_ino: u64,
    pub(crate) max_seq: u64,
    /// Live entries whose inode number an entry earlier in key order holds
    /// (an interrupted rename): they need a fresh number.
    pub(crate) duplicates: Vec<(RelPath, Entry)>,
    /// Index keys written or removed because they disagreed.
    pub(crate) repaired: u64,
}

/// Rebuilds the inode, log and reference indexes and the counters from one
/// scan of the entries, then removes index keys no entry accounts for.
///
/// Memory is bounded by a few words per entry, not by the entries: the
/// inode numbers seen (for duplicates), the log numbers and the content
/// references (sorted, then matched against the `r` keys in order).
/// `refs` are references counted besides the entries' (history items').
pub(crate) fn rebuild<B: Backend>(backend: &B, mut refs: Vec<ContentId>) -> Result<Rebuilt> {
    let mut out = Rebuilt {
        max_ino: ROOT_INO,
        ..Rebuilt::default()
    };
    let mut inos: HashSet<u64> = HashSet::new();
    let mut seqs: Vec<u64> = Vec::new();
    let mut repaired = 0u64;
    // Sets a key unless it already holds the value: a rebuild over indexes
    // that are mostly right writes little.
    let mut ensure_counted = |key: Vec<u8>, value: &[u8]| -> Result<()> {
        if backend.get(&key)?.as_deref() != Some(value) {
            backend.set(key, Some(value.to_vec()))?;
            repaired += 1;
        }
        Ok(())
    };
    for_each(backend, b"e", |k, v| {
        let path = path_of_key(&k)?;
        let e: Entry = decode("entry", &v)?;
        out.max_ino = out.max_ino.max(e.ino);
        tally(&mut out.stats, &e, true);
        if let Some(c) = e.content_ref() {
            refs.push(c);
        }
        if e.sync.seq != 0 {
            out.max_seq = out.max_seq.max(e.sync.seq);
            seqs.push(e.sync.seq);
            ensure_counted(log_key(e.sync.seq), path.as_str().as_bytes())?;
        }
        if has_indexed_ino(&e) {
            if e.is_live() && inos.contains(&e.ino) {
                out.duplicates.push((path, e));
                return Ok(());
            }
            inos.insert(e.ino);
            ensure_counted(ino_key(e.ino), path.as_str().as_bytes())?;
        }
        Ok(())
    })?;

    // Keys that no entry accounts for: left by a crash between an entry's
    // write and its old keys' removal.
    let mut stale = Vec::new();
    for_each(backend, &[INO_PREFIX], |k, _| {
        if !inos.contains(&number_of_key(&k)?) {
            stale.push(k);
        }
        Ok(())
    })?;
    drop(inos);
    seqs.sort_unstable();
    for_each(backend, &[LOG_PREFIX], |k, _| {
        if seqs.binary_search(&number_of_key(&k)?).is_err() {
            stale.push(k);
        }
        Ok(())
    })?;
    drop(seqs);
    refs.sort_unstable();
    for group in refs.chunk_by(|a, b| a == b) {
        ensure_counted(ref_key(&group[0]), &(group.len() as u64).to_be_bytes())?;
    }
    for_each(backend, &[REF_PREFIX], |k, _| {
        if refs.binary_search(&content_of_key(&k)?).is_err() {
            stale.push(k);
        }
        Ok(())
    })?;
    for k in stale {
        backend.set(k, None)?;
        repaired += 1;
    }
    out.repaired = repaired;
    Ok(out)
}

/// Adds one reference to `c` (before the entry that holds it is written).
pub(crate) fn add_ref<B: Backend>(backend: &B, c: &ContentId) -> Result<()> {
    let key = ref_key(c);
    let n = match backend.get(&key)? {
        Some(v) => decode_u64(&v)?,
        None => 0,
    };
    backend.set(key, Some((n + 1).to_be_bytes().to_vec()))
}

/// Takes one reference from `c` (after the entry that held it is
/// written). Returns true if that was the last one.
pub(crate) fn drop_ref<B: Backend>(backend: &B, c: &ContentId) -> Result<bool> {
    let key = ref_key(c);
    let n = match backend.get(&key)? {
        Some(v) => decode_u64(&v)?,
        // Not counted: nothing to release (the rebuild recounts).
        None => return Ok(false),
    };
    if n <= 1 {
        backend.set(key, None)?;
        Ok(true)
    } else {
        backend.set(key, Some((n - 1).to_be_bytes().to_vec()))?;
        Ok(false)
    }
}

pub(crate) fn refcount<B: Backend>(backend: &B, c: &ContentId) -> Result<u64> {
    backend.get(&ref_key(c))?.map_or(Ok(0), |v| decode_u64(&v))
}

/// The log from `since` (exclusive) to `upto` (inclusive): at most `limit`
/// numbers with the path each names.
pub(crate) fn log_range<B: Backend>(
    backend: &B,
    since: u64,
    upto: u64,
    limit: usize,
) -> Result<Vec<(u64, RelPath)>> {
    let after = log_key(since);
    let mut out = Vec::new();
    for (k, v) in backend.scan(&[LOG_PREFIX], Some(&after), limit)? {
        let seq = number_of_key(&k)?;
        if seq > upto {
            break;
        }
        out.push((seq, path_of_value(&v)?));
    }
    Ok(out)
}

/// Points an index key at `path`.
pub(crate) fn set_path<B: Backend>(backend: &B, key: Vec<u8>, path: &RelPath) -> Result<()> {
    backend.set(key, Some(path.as_str().as_bytes().to_vec()))
}
