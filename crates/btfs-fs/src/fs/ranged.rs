//! Range staging: a writer of a large file held here writes into a sparse
//! *delta* file at the same offsets, and the inode keeps which ranges it
//! wrote; the committed object stays as it is underneath. Opening costs no
//! copy, and the commit hashes (and copies, if it must) only what changed.
//!
//! The daemon must see every write to know the ranges, so range-staged
//! writers are served here (`FOPEN_DIRECT_IO`), not by passthrough: a write
//! pays a round trip to the daemon, which is the trade for not copying and
//! rehashing the whole file. The kernel allows no open without passthrough
//! on an inode that has passthrough opens, so an inode whose readers use
//! passthrough gets a full copy instead (and readers opened beside a
//! range-staged writer are served here too: it counts as cached).
//!
//! The delta file's length is always the file's length, so its size and
//! modification time are the file's, as for a full staging file.

use std::{collections::BTreeMap, fs::File, io, os::unix::fs::FileExt, sync::Arc};

use blake3::hazmat::ChainingValue;
use btfs_core::ContentId;
use btfs_store::Backend;
use parking_lot::Mutex;
use tracing::{debug, warn};

use super::{
    Shared,
    inodes::{InodeCell, OpenInode},
};
use crate::{
    error::Result,
    objects::{Promotion, Staging},
    outboard::{Outboard, SUBTREE, subtree_cv, subtrees},
};

/// Files from this size up, opened for writing without `O_TRUNC` while
/// their content is here, are range-staged. Below it a copy costs less
/// than a write served by the daemon.
pub(crate) const RANGED_MIN: u64 = 4 << 20;

/// Most disjoint ranges kept for one file; a writer scattering more small
/// writes than this gets a full private copy instead (bounded memory).
pub(crate) const MAX_RANGES: usize = 1 << 16;

/// The written ranges of a range-staged file and how much of the base
/// still shows through.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct RangeMap {
    /// start -> end of each written range: disjoint, not touching.
    dirty: BTreeMap<u64, u64>,
    /// The base's bytes `[0, kept)` show where nothing was written; bytes
    /// at and past `kept` that were not written are zeros (a truncation
    /// lowers it, an extension leaves a hole).
    kept: u64,
    /// Anything written or truncated since the open.
    changed: bool,
}

/// Where the bytes of one piece of a read come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Seg {
    Delta(u64, u64),
    Base(u64, u64),
    Zero(u64),
}

impl RangeMap {
    pub(crate) fn new(base_len: u64) -> Self {
        Self {
            dirty: BTreeMap::new(),
            kept: base_len,
            changed: false,
        }
    }

    pub(crate) fn kept(&self) -> u64 {
        self.kept
    }

    pub(crate) fn changed(&self) -> bool {
        self.changed
    }

    pub(crate) fn len(&self) -> usize {
        self.dirty.len()
    }

    /// The written ranges, in order.
    pub(crate) fn ranges(&self) -> Vec<(u64, u64)> {
        self.dirty.iter().map(|(s, e)| (*s, *e)).collect()
    }

    /// Notes a write of `[start, end)`.
    pub(crate) fn insert(&mut self, start: u64, end: u64) {
        self.changed = true;
        if start >= end {
            return;
        }
        let (mut s, mut e) = (start, end);
        // Ranges that overlap or touch [s, e) merge into it.
        let touching: Vec<(u64, u64)> = self
            .dirty
            .range(..=e)
            .rev()
            .take_while(|(_, re)| **re >= s)
            .map(|(a, b)| (*a, *b))
            .collect();
        for (a, b) in touching {
            self.dirty.remove(&a);
            s = s.min(a);
            e = e.max(b);
        }
        self.dirty.insert(s, e);
    }

    /// The file's length became `len`.
    pub(crate) fn truncate(&mut self, len: u64) {
        self.changed = true;
        self.kept = self.kept.min(len);
        let cut: Vec<(u64, u64)> = self
            .dirty
            .range(..)
            .filter(|(_, e)| **e > len)
            .map(|(s, e)| (*s, *e))
            .collect();
        for (s, _) in cut {
            self.dirty.remove(&s);
            if s < len {
                self.dirty.insert(s, len);
            }
        }
    }

    /// Whether `[start, end)` meets a written range.
    pub(crate) fn touches(&self, start: u64, end: u64) -> bool {
        self.dirty
            .range(..end)
            .next_back()
            .is_some_and(|(_, e)| *e > start)
    }

    /// Whether the writes cover all of `[0, len)` (the delta is the whole
    /// file then).
    pub(crate) fn covers(&self, len: u64) -> bool {
        len == 0 || self.dirty.get(&0).is_some_and(|e| *e >= len)
    }

    /// Where the bytes `[off, off + n)` of a file of `len` bytes come from.
    pub(crate) fn segments(&self, off: u64, n: u64, len: u64) -> Vec<Seg> {
        let end = off.saturating_add(n).min(len);
        let mut out = Vec::new();
        let mut at = off;
        while at < end {
            // The written range holding `at`, or the next one.
            let here = self
                .dirty
                .range(..=at)
                .next_back()
                .filter(|(_, e)| **e > at)
                .map(|(s, e)| (*s, *e));
            if let Some((_, e)) = here {
                let to = e.min(end);
                out.push(Seg::Delta(at, to - at));
                at = to;
                continue;
            }
            let next = self
                .dirty
                .range(at..)
                .next()
                .map_or(end, |(s, _)| (*s).min(end));
            if at < self.kept {
                let to = next.min(self.kept);
                out.push(Seg::Base(at, to - at));
                at = to;
            } else {
                out.push(Seg::Zero(next - at));
                at = next;
            }
        }
        out
    }
}

/// A range-staged inode: its base object, the delta file and the map.
#[derive(Debug)]
pub(crate) struct Ranged {
    pub(crate) base: ContentId,
    pub(crate) base_len: u64,
    /// The base's swarm (its piece hashes are reused by the publisher).
    pub(crate) base_torrent: Option<btfs_core::InfoHash>,
    pub(crate) base_file: Arc<File>,
    /// The delta file (the inode's staging file).
    pub(crate) delta: Arc<File>,
    pub(crate) map: Mutex<RangeMap>,
}

impl Ranged {
    pub(crate) fn new(base: ContentId, base_file: File, delta: &Staging) -> io::Result<Self> {
        let base_len = base_file.metadata()?.len();
        delta.file.set_len(base_len)?;
        Ok(Self {
            base,
            base_len,
            base_torrent: None,
            base_file: Arc::new(base_file),
            delta: delta.file.clone(),
            map: Mutex::new(RangeMap::new(base_len)),
        })
    }

    /// The file's current length.
    pub(crate) fn len(&self) -> io::Result<u64> {
        Ok(self.delta.metadata()?.len())
    }

    /// Writes `data` at `off`. Refused (`Ok(false)`) when the map is full:
    /// the caller turns the file into a full copy and writes there.
    pub(crate) fn write(&self, off: u64, data: &[u8]) -> io::Result<bool> {
        let end = off.saturating_add(data.len() as u64);
        // Checked first: a write that does not fit must land nowhere.
        {
            let map = self.map.lock();
            if map.len() >= MAX_RANGES && !map.touches(off, end.max(off + 1)) {
                return Ok(false);
            }
        }
        self.delta.write_all_at(data, off)?;
        self.map.lock().insert(off, end);
        Ok(true)
    }

    /// The file's length becomes `len`.
    pub(crate) fn truncate(&self, len: u64) -> io::Result<()> {
        let mut map = self.map.lock();
        map.truncate(len);
        self.delta.set_len(len)
    }

    /// Reads up to `n` bytes at `off` (short only at the end of the file).
    pub(crate) fn read(&self, off: u64, n: u64) -> io::Result<Vec<u8>> {
        let len = self.len()?;
        let segs = self.map.lock().segments(off, n, len);
        self.read_segments(&segs)
    }

    fn read_segments(&self, segs: &[Seg]) -> io::Result<Vec<u8>> {
        let total: u64 = segs
            .iter()
            .map(|s| match s {
                Seg::Delta(_, n) | Seg::Base(_, n) | Seg::Zero(n) => *n,
            })
            .sum();
        let mut out = vec![0u8; total as usize];
        let mut at = 0usize;
        for s in segs {
            match *s {
                Seg::Delta(o, n) => read_full(&self.delta, &mut out[at..at + n as usize], o)?,
                Seg::Base(o, n) => read_full(&self.base_file, &mut out[at..at + n as usize], o)?,
                Seg::Zero(_) => {}
            }
            at += match s {
                Seg::Delta(_, n) | Seg::Base(_, n) | Seg::Zero(n) => *n as usize,
            };
        }
        Ok(out)
    }

    /// Writes the file's bytes that differ from the base's (and the zeros
    /// of base bytes cut off) into `target`, which holds the base's bytes;
    /// then gives it the file's length. `target` then holds the file.
    pub(crate) fn apply_to(&self, target: &File, map: &RangeMap, len: u64) -> io::Result<()> {
        // Cut first: base bytes past `kept` are zeros now unless written.
        target.set_len(map.kept().min(len))?;
        target.set_len(len)?;
        let mut buf = vec![0u8; COPY_BUF];
        for (s, e) in map.ranges() {
            let mut at = s;
            while at < e {
                let n = (e - at).min(COPY_BUF as u64) as usize;
                read_full(&self.delta, &mut buf[..n], at)?;
                target.write_all_at(&buf[..n], at)?;
                at += n as u64;
            }
        }
        Ok(())
    }
}

/// Bytes copied at a time from the delta.
const COPY_BUF: usize = 1 << 20;

/// Fills `buf` from `file` at `off`; past the end of the file, zeros.
fn read_full(file: &File, buf: &mut [u8], off: u64) -> io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read_at(&mut buf[filled..], off + filled as u64) {
            Ok(0) => {
                buf[filled..].fill(0);
                return Ok(());
            }
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        Write(u64, Vec<u8>),
        Truncate(u64),
    }

    fn ops() -> impl Strategy<Value = Vec<Op>> {
        prop::collection::vec(
            prop_oneof![
                3 => (0u64..300, prop::collection::vec(any::<u8>(), 1..40))
                    .prop_map(|(o, d)| Op::Write(o, d)),
                1 => (0u64..320).prop_map(Op::Truncate),
            ],
            0..25,
        )
    }

    proptest! {
        /// A range-staged file reads, and applies onto a copy of its base,
        /// exactly as a plain file given the same writes and truncations.
        #[test]
        fn a_range_staged_file_is_the_same_as_a_written_copy(
            base in prop::collection::vec(any::<u8>(), 0..256),
            ops in ops(),
            reads in prop::collection::vec((0u64..330, 0u64..80), 1..8),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let bp = dir.path().join("base");
            std::fs::write(&bp, &base).unwrap();
            let dp = dir.path().join("delta");
            let delta = Staging {
                path: dp.clone(),
                file: Arc::new(std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&dp).unwrap()),
            };
            let r = Ranged::new(ContentId::of(&base), File::open(&bp).unwrap(), &delta).unwrap();
            let mut model = base.clone();
            for op in &ops {
                match op {
                    Op::Write(o, d) => {
                        prop_assert!(r.write(*o, d).unwrap());
                        let end = *o as usize + d.len();
                        if model.len() < end {
                            model.resize(end, 0);
                        }
                        model[*o as usize..end].copy_from_slice(d);
                    }
                    Op::Truncate(l) => {
                        r.truncate(*l).unwrap();
                        model.resize(*l as usize, 0);
                    }
                }
            }
            prop_assert_eq!(r.len().unwrap(), model.len() as u64);
            for (o, n) in reads {
                let got = r.read(o, n).unwrap();
                let s = (o as usize).min(model.len());
                let e = (o + n).min(model.len() as u64) as usize;
                prop_assert_eq!(&got[..], &model[s..e.max(s)]);
            }
            let map = r.map.lock().clone();
            prop_assert_eq!(map.changed(), !ops.is_empty());
            let tp = dir.path().join("target");
            std::fs::copy(&bp, &tp).unwrap();
            let t = std::fs::OpenOptions::new().read(true).write(true).open(&tp).unwrap();
            r.apply_to(&t, &map, model.len() as u64).unwrap();
            prop_assert_eq!(std::fs::read(&tp).unwrap(), model.clone());
            if map.covers(model.len() as u64) {
                prop_assert_eq!(std::fs::read(&dp).unwrap(), model);
            }
        }

        #[test]
        fn written_ranges_stay_disjoint_and_sorted(
            writes in prop::collection::vec((0u64..1000, 1u64..50), 0..40),
        ) {
            let mut m = RangeMap::new(0);
            let mut covered = vec![false; 1100];
            for (o, n) in writes {
                m.insert(o, o + n);
                covered[o as usize..(o + n) as usize].fill(true);
            }
            let rs = m.ranges();
            for w in rs.windows(2) {
                prop_assert!(w[0].1 < w[1].0, "disjoint and not touching: {:?}", rs);
            }
            for (i, c) in covered.iter().enumerate() {
                let i = i as u64;
                prop_assert_eq!(*c, m.touches(i, i + 1));
            }
        }
    }
}

/// What a range-staged commit produced: the new content, the file that
/// holds it (to install), and what the publisher may reuse.
#[derive(Debug)]
pub(super) struct RangedCommit {
    /// The new content's bytes, a full file now (the delta itself when the
    /// writes covered the whole file, else a copy of the base with the
    /// writes applied).
    pub(super) staging: Staging,
    pub(super) rest: RangedRest,
}

/// The rest of a range-staged commit, for the publisher.
#[derive(Debug)]
pub(super) struct RangedRest {
    pub(super) content: ContentId,
    pub(super) outboard: Option<Outboard>,
    pub(super) base: ContentId,
    pub(super) base_torrent: Option<btfs_core::InfoHash>,
    pub(super) kept: u64,
    pub(super) changed: Vec<(u64, u64)>,
}

/// Subtrees rehashed on this many threads at most.
const REHASH_THREADS: usize = 4;

impl<B: Backend> Shared<B> {
    /// Whether a writer opening `content` (`truncate`: with `O_TRUNC`) gets
    /// range staging rather than a full copy.
    pub(super) fn wants_ranged(&self, content: &ContentId, truncate: bool, sync: bool) -> bool {
        !truncate
            && !sync
            && *content != ContentId::empty()
            && std::fs::metadata(self.objects.object_path(content))
                .is_ok_and(|m| m.len() >= RANGED_MIN)
    }

    /// Gives the inode an empty delta over object `content`.
    pub(super) fn make_ranged(
        &self,
        cell: &InodeCell,
        st: &mut OpenInode,
        content: ContentId,
        torrent: Option<btfs_core::InfoHash>,
    ) -> Result<()> {
        let base_file = self.objects.open_object(&content)?;
        let delta = self.objects.new_staging(None)?;
        let mut r = match Ranged::new(content, base_file, &delta) {
            Ok(r) => r,
            Err(e) => {
                let _ = self.objects.discard_staging(&delta.path);
                return Err(e.into());
            }
        };
        r.base_torrent = torrent;
        let r = Arc::new(r);
        *cell.current.write() = None;
        *cell.ranged.write() = Some(r.clone());
        st.staging = Some(delta);
        st.ranged = Some(r);
        st.uncommitted = true;
        Ok(())
    }

    /// Turns a range-staged inode into one with a full private copy (for
    /// what ranges cannot express: `fsync` markers, `fallocate`, too many
    /// ranges). Waits for writes in flight.
    pub(super) fn materialize(&self, cell: &InodeCell, st: &mut OpenInode) -> Result<()> {
        let mut slot = cell.ranged.write();
        let Some(r) = st.ranged.take() else {
            return Ok(());
        };
        let map = r.map.lock().clone();
        let len = r.len()?;
        let mtime = r.delta.metadata()?.modified()?;
        let full = self.objects.new_staging(Some(&r.base))?;
        let done = r
            .apply_to(&full.file, &map, len)
            .and_then(|()| full.file.set_modified(mtime));
        if let Err(e) = done {
            let _ = self.objects.discard_staging(&full.path);
            st.ranged = Some(r);
            return Err(e.into());
        }
        *cell.current.write() = Some(full.file.clone());
        *slot = None;
        if let Some(delta) = st.staging.replace(full)
            && let Err(e) = self.objects.discard_staging(&delta.path)
        {
            warn!(
                "could not delete a delta file {}: {e}",
                delta.path.display()
            );
        }
        debug!(base = %r.base.short(), ranges = map.len(), "range staging turned into a full copy");
        Ok(())
    }

    /// Hashes a range-staged inode's new content (only the subtrees that
    /// changed) and puts it in a full file. `None` when nothing changed:
    /// the delta is discarded and the version stands.
    pub(super) fn commit_ranged(
        &self,
        ino: u64,
        st: &mut OpenInode,
        r: &Ranged,
    ) -> Result<Option<RangedCommit>> {
        let map = r.map.lock().clone();
        let len = r.len()?;
        if !map.changed() && len == r.base_len {
            return Ok(None);
        }
        let (content, outboard) = if len <= SUBTREE {
            (ContentId::of(&r.read(0, len)?), None)
        } else {
            let base = if r.base_len > SUBTREE {
                Some(
                    self.outboards
                        .get_or_hash(&r.base, &r.base_file, r.base_len)?,
                )
            } else {
                None
            };
            let n = subtrees(len);
            let mut cvs = vec![[0u8; 32]; n as usize];
            let mut todo = Vec::new();
            for (i, cv) in cvs.iter_mut().enumerate() {
                let (s, e) = (i as u64 * SUBTREE, (i as u64 + 1) * SUBTREE);
                match &base {
                    Some(b) if e <= map.kept() && e <= len && !map.touches(s, e) => {
                        *cv = b.cvs[i];
                    }
                    _ => todo.push(i),
                }
            }
            let hashed = self.rehash(r, &todo, len)?;
            for (i, cv) in todo.iter().zip(hashed) {
                cvs[*i] = cv;
            }
            let o = Outboard { len, cvs };
            let root = o
                .root()
                .ok_or_else(|| io::Error::other("no root for a multi-subtree file"))?;
            debug!(
                subtrees = n,
                rehashed = todo.len(),
                "range-staged content hashed"
            );
            (root, Some(o))
        };
        // The new content as a full file.
        let delta = st
            .staging
            .take()
            .ok_or_else(|| io::Error::other("range staging without a delta file"))?;
        let staging = if map.covers(len) {
            delta
        } else if let Some(taken) = self.try_promote(ino, st, r, &delta, content, &map, len)? {
            st.promoted = Some((taken.1, delta.path));
            taken.0
        } else {
            let mtime = r.delta.metadata()?.modified()?;
            let full = match self.objects.new_staging(Some(&r.base)) {
                Ok(f) => f,
                Err(e) => {
                    st.staging = Some(delta);
                    return Err(e.into());
                }
            };
            let applied = r
                .apply_to(&full.file, &map, len)
                .and_then(|()| full.file.set_modified(mtime));
            if let Err(e) = applied {
                let _ = self.objects.discard_staging(&full.path);
                st.staging = Some(delta);
                return Err(e.into());
            }
            if let Err(e) = self.objects.discard_staging(&delta.path) {
                warn!(
                    "could not delete a delta file {}: {e}",
                    delta.path.display()
                );
            }
            full
        };
        Ok(Some(RangedCommit {
            staging,
            rest: RangedRest {
                content,
                outboard,
                base: r.base,
                base_torrent: r.base_torrent,
                kept: map.kept(),
                changed: map.ranges(),
            },
        }))
    }

    /// Makes the base object itself the new version's file when nothing
    /// else can see it change: no other path holds that content, no
    /// passthrough reader uses it, and no unlinked inode keeps it. The
    /// writes are applied in place, under an intent that a restart
    /// finishes (see `ObjectStore::promote`). `None`: copy instead.
    #[allow(clippy::too_many_arguments)]
    fn try_promote(
        &self,
        ino: u64,
        st: &OpenInode,
        r: &Ranged,
        delta: &Staging,
        content: ContentId,
        map: &RangeMap,
        len: u64,
    ) -> Result<Option<(Staging, std::path::PathBuf)>> {
        // Cheap checks first, then the intent on disk (outside `ns`: it
        // syncs), then the checks again and the move under `ns`.
        // History keeps the old version's object: it is copied, never
        // turned into the new one.
        if st.backing.is_some()
            || self.objects.object_path(&content).exists()
            || self.store.history_on()
        {
            return Ok(None);
        }
        let intent = Promotion::new(ino, r.base, content, len, map.kept(), map.ranges());
        let prepared = self.objects.prepare_promotion(delta, &intent)?;
        let taken = {
            let _ns = self.ns.lock();
            let alone = self.store.refcount(&r.base)? == 1
                && !self.inodes.backed_objects.lock().contains_key(&r.base)
                && !self
                    .inodes
                    .orphans
                    .lock()
                    .values()
                    .any(|o| o.record.content == Some(r.base));
            if !alone {
                drop(_ns);
                prepared.cancel();
                return Ok(None);
            }
            match prepared.take() {
                Ok(f) => (f, prepared.intent),
                Err(e) => {
                    prepared.cancel();
                    return Err(e.into());
                }
            }
        };
        let mtime = r.delta.metadata()?.modified()?;
        r.apply_to(&taken.0.file, map, len)?;
        taken.0.file.set_modified(mtime)?;
        self.outboards.remove(&r.base);
        debug!(base = %r.base.short(), "the old object became the new version's file");
        Ok(Some(taken))
    }

    /// Chaining values of subtrees `which` of the range-staged file.
    fn rehash(&self, r: &Ranged, which: &[usize], len: u64) -> io::Result<Vec<ChainingValue>> {
        if which.is_empty() {
            return Ok(Vec::new());
        }
        let threads = REHASH_THREADS.min(which.len());
        let per = which.len().div_ceil(threads);
        std::thread::scope(|scope| {
            let workers: Vec<_> = which
                .chunks(per)
                .map(|part| {
                    scope.spawn(move || -> io::Result<Vec<ChainingValue>> {
                        part.iter()
                            .map(|&i| {
                                let off = i as u64 * SUBTREE;
                                let data = r.read(off, SUBTREE.min(len - off))?;
                                Ok(subtree_cv(i as u64, &data))
                            })
                            .collect()
                    })
                })
                .collect();
            let mut out = Vec::with_capacity(which.len());
            for w in workers {
                out.extend(
                    w.join()
                        .unwrap_or_else(|_| Err(io::Error::other("hashing thread panicked")))?,
                );
            }
            Ok(out)
        })
    }
}
