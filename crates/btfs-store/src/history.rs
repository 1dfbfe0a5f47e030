//! Version history (`history=DURATION`): the file versions this node saw
//! superseded or deleted, kept with their content for a window instead of
//! being collected.
//!
//! When history is on ([`Store::set_history`]), a change that replaces a
//! live file's content (a new version, a delete, a rename away) first
//! writes a [`HistoryItem`] naming the old record under
//! `h` path `\0` superseded-at (8 bytes BE, nanoseconds) content, and
//! counts one more reference to the old content in the `r` index: the
//! object stays until [`Store::collect_history`] drops the item once the
//! window has passed. The reference is counted before the entry changes,
//! like every reference (see the crate docs), and the rebuild after a
//! crash counts history items as it counts entries.
//!
//! A node keeps the history of versions it did not hold too (it learnt
//! their records): `btfs log` shows them, and a restore fetches their
//! content from a member that still keeps it.

use btfs_core::{ContentId, FileKind, FileRecord, RelPath, Timestamp};
use serde::{Deserialize, Serialize};

use crate::{Backend, Entry, Result, State, Store, StoreError, decode, encode, index};

pub(crate) const HISTORY_PREFIX: u8 = b'h';

/// Versions of one path listed at most (`btfs log`): the newest first, the
/// oldest dropped beyond it.
pub const MAX_LOG: usize = 10_000;

/// One superseded or deleted version of a file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryItem {
    /// The version's record as this node had it (content, size, author,
    /// times, torrent).
    pub record: FileRecord,
    /// When this node saw it replaced (its own clock).
    pub superseded: Timestamp,
}

/// What history holds, for status: item count and the sum of their sizes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryStats {
    pub versions: u64,
    pub bytes: u64,
}

/// What history holds, in memory: the counts, and the content each item
/// keeps (with how many items keep it), so that the cache's keep rule
/// costs one lookup.
#[derive(Debug, Default)]
pub(crate) struct Held {
    pub(crate) stats: HistoryStats,
    pub(crate) contents: std::collections::HashMap<ContentId, u32>,
}

impl Held {
    fn add(&mut self, item: &HistoryItem) {
        self.stats.versions += 1;
        self.stats.bytes += item.record.size;
        if let Some(c) = item_ref(item) {
            *self.contents.entry(c).or_default() += 1;
        }
    }

    fn remove(&mut self, item: &HistoryItem) {
        self.stats.versions = self.stats.versions.saturating_sub(1);
        self.stats.bytes = self.stats.bytes.saturating_sub(item.record.size);
        if let Some(c) = item_ref(item)
            && let std::collections::hash_map::Entry::Occupied(mut o) = self.contents.entry(c)
        {
            *o.get_mut() -= 1;
            if *o.get() == 0 {
                o.remove();
            }
        }
    }
}

fn nanos(t: Timestamp) -> u64 {
    u64::try_from(t.secs)
        .unwrap_or(0)
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::from(t.nanos))
}

fn path_prefix(path: &RelPath) -> Vec<u8> {
    let mut k = Vec::with_capacity(path.as_str().len() + 2);
    k.push(HISTORY_PREFIX);
    k.extend_from_slice(path.as_str().as_bytes());
    k.push(0);
    k
}

pub(crate) fn history_key(path: &RelPath, at: Timestamp, c: &ContentId) -> Vec<u8> {
    let mut k = path_prefix(path);
    k.extend_from_slice(&nanos(at).to_be_bytes());
    k.extend_from_slice(c.as_bytes());
    k
}

/// The path an `h` key names.
fn path_of_history_key(key: &[u8]) -> Result<RelPath> {
    let rest = key.get(1..).unwrap_or_default();
    let end = rest
        .iter()
        .position(|b| *b == 0)
        .ok_or_else(|| StoreError::Corrupt("history key without a path end".into()))?;
    let s = std::str::from_utf8(&rest[..end])
        .map_err(|_| StoreError::Corrupt("history key not UTF-8".into()))?;
    if s.is_empty() {
        return Ok(RelPath::root());
    }
    RelPath::parse(s).map_err(|e| StoreError::Corrupt(format!("history key: {e}")))
}

/// The content a history item keeps alive.
pub(crate) fn item_ref(item: &HistoryItem) -> Option<ContentId> {
    match (item.record.kind, item.record.deleted) {
        (FileKind::File, false) => item.record.content,
        _ => None,
    }
}

/// Whether replacing `old` by `new` at a path supersedes a version history
/// keeps: a live file whose content goes (changed, deleted, renamed away).
pub(crate) fn superseded(old: &Entry, new: Option<&Entry>) -> Option<ContentId> {
    if old.is_derived() {
        return None;
    }
    let c = old.content_ref()?;
    let same = new.is_some_and(|n| n.content_ref() == Some(c));
    (!same).then_some(c)
}

/// Reads every history item: what they hold, and (for the rebuild) the
/// content references they count, pushed to `refs`.
pub(crate) fn scan<B: Backend>(backend: &B, refs: &mut Vec<ContentId>) -> Result<Held> {
    let mut held = Held::default();
    index::for_each(backend, &[HISTORY_PREFIX], |_, v| {
        let item: HistoryItem = decode("history item", &v)?;
        held.add(&item);
        if let Some(c) = item_ref(&item) {
            refs.push(c);
        }
        Ok(())
    })?;
    Ok(held)
}

impl<B: Backend> Store<B> {
    /// Turns history on or off. Off, no new item is written; the items
    /// kept go at the next [`collect_history`](Self::collect_history).
    pub fn set_history(&self, on: bool) {
        self.history_on
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether superseded versions are kept (`history=`).
    pub fn history_on(&self) -> bool {
        self.history_on.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// What history holds now.
    pub fn history_stats(&self) -> Result<HistoryStats> {
        Ok(self.state()?.history.stats)
    }

    /// Writes the history item for `old` being replaced at `path`, with
    /// its reference, before the entry changes (see the module docs).
    pub(crate) fn keep_history(
        &self,
        st: &mut State,
        path: &RelPath,
        old: &Entry,
        c: ContentId,
    ) -> Result<()> {
        let item = HistoryItem {
            record: old.record.clone(),
            superseded: Timestamp::now(),
        };
        index::add_ref(&self.backend, &c)?;
        self.backend
            .set(history_key(path, item.superseded, &c), Some(encode(&item)?))?;
        st.history.add(&item);
        Ok(())
    }

    /// The superseded and deleted versions of `path` this node knows, the
    /// newest first, [`MAX_LOG`] at most.
    pub fn history_of(&self, path: &RelPath) -> Result<Vec<HistoryItem>> {
        let mut out = Vec::new();
        index::for_each(&self.backend, &path_prefix(path), |_, v| {
            out.push(decode("history item", &v)?);
            Ok(())
        })?;
        out.reverse();
        out.truncate(MAX_LOG);
        Ok(out)
    }

    /// Whether some history item keeps content `c` (the cache's keep
    /// rule: history's content is never evicted inside its window).
    pub fn history_has(&self, c: &ContentId) -> bool {
        self.state()
            .is_ok_and(|st| st.history.contents.contains_key(c))
    }

    /// Drops the history items superseded before `cutoff` and their
    /// references; returns the content no entry or item references any
    /// more (the caller deletes it once the store is flushed).
    pub fn collect_history(&self, cutoff: Timestamp) -> Result<Vec<ContentId>> {
        let limit = nanos(cutoff);
        let mut expired: Vec<(Vec<u8>, HistoryItem)> = Vec::new();
        index::for_each(&self.backend, &[HISTORY_PREFIX], |k, v| {
            let item: HistoryItem = decode("history item", &v)?;
            if nanos(item.superseded) < limit {
                // Checked it names a path (a corrupt key is reported).
                path_of_history_key(&k)?;
                expired.push((k, item));
            }
            Ok(())
        })?;
        let mut st = self.state()?;
        let mut released = Vec::new();
        for (k, item) in expired {
            self.backend.set(k, None)?;
            st.history.remove(&item);
            if let Some(c) = item_ref(&item)
                && index::drop_ref(&self.backend, &c)?
            {
                released.push(c);
            }
        }
        released.sort();
        released.dedup();
        Ok(released)
    }
}
