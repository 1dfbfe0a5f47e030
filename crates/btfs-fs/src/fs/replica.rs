//! Replication on the filesystem side: what a path shows given the signed
//! versions a node holds for it, and how local changes become versions.
//!
//! A path's entry keeps its maximal signed versions; what the path *shows* is
//! [`btfs_core::resolve`] of them, so every node that holds the same versions
//! shows the same tree:
//! * the winning version at the path itself;
//! * each losing concurrent version as a *derived* conflict copy next to it
//!   (`NAME.btfs-conflict-…`), unless a real record holds that name;
//! * a deleted directory that still holds live entries (a create raced the
//!   delete) as a derived, implicit directory, and so are missing parents of a
//!   record that arrives before them.
//!
//! A local change of a path descends from *all* its versions, so it ends a
//! conflict everywhere; its conflict copies are first written as records of
//! their own (authored here), so that they outlive the conflict that made
//! them. A local change of a derived entry makes it a real record.

use std::ffi::OsStr;

use btfs_core::{FileKind, FileRecord, Owner, RelPath, VersionVector, Versions, resolve};
use btfs_store::{Backend, Change, Derived, Entry, NO_INO, ROOT_INO, Replication, Version};
use fuser::INodeNo;
use tracing::{debug, warn};

use super::Shared;
use crate::{
    Wanted,
    error::{ErrorChain, Result},
};

/// Superseded objects kept as seeds for the versions that replaced them
/// (until collected): bounds the map, not disk (the source bounds that).
const MAX_SEEDS: usize = 4096;
/// Smaller content is fetched whole anyway: no seed.
const SEED_MIN: u64 = 1 << 20;

/// A new local version, for the mesh to gossip.
#[derive(Debug, Clone)]
pub struct Announced {
    pub path: RelPath,
    pub version: Version,
}

/// What happened to a remote record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// Stored; it supersedes what this node held.
    Stored,
    /// Stored next to a concurrent version: the path is in conflict (and
    /// shows a conflict copy, unless the versions agree).
    Merged,
    /// Ignored: this node already holds it or a version that descends from it.
    Older,
    /// Not stored: a file or symlink stands where its parent directory should
    /// be. It stays with its author and arrives again with a later sync.
    Blocked,
}

/// Kernel caches to drop once the namespace lock is released.
#[derive(Debug, Default)]
pub(super) struct Inval {
    entries: Vec<(u64, String)>,
    inodes: Vec<u64>,
}

/// The directory shown where only deletes (or nothing) are known but live
/// entries exist below: owner and mode of the newest version if it was a
/// directory, and no version of its own (a local change of it descends from
/// the path's versions, see `version_changes`).
fn implicit_dir(base: Option<&FileRecord>, child: &FileRecord) -> FileRecord {
    match base {
        Some(b) => {
            let mut r = b.clone();
            if r.kind != FileKind::Dir {
                r.mode = 0o755;
            }
            r.kind = FileKind::Dir;
            r.deleted = false;
            r.content = None;
            r.prev_content = None;
            r.torrent = None;
            r.target = None;
            r.size = 0;
            r
        }
        None => {
            let owner = Owner {
                mode: 0o755,
                uid: child.uid,
                gid: child.gid,
            };
            let mut r = FileRecord::new_dir(owner, child.author, child.mtime);
            r.version = VersionVector::new();
            r
        }
    }
}

fn versions_of(signed: &[Version]) -> Versions {
    signed.iter().map(|v| v.record.clone()).collect()
}

fn sibling(path: &RelPath, name: &str) -> Option<RelPath> {
    path.parent()?.join(name).ok()
}

impl<B: Backend> Shared<B> {
    fn sign(&self, path: &RelPath, record: &FileRecord) -> Vec<u8> {
        let Some(signer) = &self.cfg.signer else {
            return Vec::new();
        };
        match (signer.0)(path, record) {
            Ok(sig) => sig,
            Err(e) => {
                warn!(
                    %path,
                    "could not sign a new version (peers will refuse it): {}",
                    ErrorChain(&*e)
                );
                Vec::new()
            }
        }
    }

    /// Turns the first `versioned` changes (new local versions) into signed
    /// versions that descend from everything the path held, preceded by the
    /// records of the conflict copies they end. Called under `ns`.
    pub(super) fn version_changes(
        &self,
        changes: Vec<Change>,
        versioned: usize,
        announced: &mut Vec<Announced>,
    ) -> Result<Vec<Change>> {
        let node = self.node();
        let mut out = Vec::with_capacity(changes.len());
        for (i, change) in changes.into_iter().enumerate() {
            let (path, mut entry) = match change {
                Change::Put(path, entry) if i < versioned => (path, entry),
                other => {
                    out.push(other);
                    continue;
                }
            };
            if let Some(old) = self.store.get(&path)? {
                let held = versions_of(&old.sync.versions);
                for (name, _) in resolve(&path, &held).copies {
                    let Some(copy_path) = sibling(&path, &name) else {
                        continue;
                    };
                    let Some(copy) = self
                        .store
                        .get(&copy_path)?
                        .filter(|e| e.sync.derived == Some(Derived::ConflictCopy))
                    else {
                        continue;
                    };
                    let record = copy.record.next_version(node, entry.record.ctime);
                    out.push(self.signed_put(copy_path, copy.ino, record, announced));
                }
                let v = &mut entry.record.version;
                for o in held.records() {
                    v.merge(&o.version);
                }
                if held.records().iter().any(|o| o.version >= *v) {
                    v.increment(node);
                }
            }
            out.push(self.signed_put(path, entry.ino, entry.record, announced));
        }
        Ok(out)
    }

    fn signed_put(
        &self,
        path: RelPath,
        ino: u64,
        record: FileRecord,
        announced: &mut Vec<Announced>,
    ) -> Change {
        let version = Version {
            signature: self.sign(&path, &record),
            record: record.clone(),
        };
        announced.push(Announced {
            path: path.clone(),
            version: version.clone(),
        });
        Change::Put(
            path,
            Entry {
                ino,
                record,
                sync: Replication::new(vec![version], None),
            },
        )
    }

    /// Commits `record`, written from `base` (the version and content the
    /// writer started from) while `current` (another node's version, or
    /// what it replaced) arrived: the record is given a version concurrent
    /// with `current`, stored next to it and announced, so both are kept.
    pub(super) fn commit_concurrent(
        &self,
        path: RelPath,
        mut record: FileRecord,
        (base, base_content): (&VersionVector, Option<btfs_core::ContentId>),
        current: &FileRecord,
    ) -> Result<()> {
        // Above every local version (a chmod of the open file, say), but
        // not above the other node's.
        let me = self.node();
        let mut v = base.clone();
        v.increment_past(me, current.version.get(&me));
        record.version = v;
        record.prev_content = base_content;
        let version = Version {
            signature: self.sign(&path, &record),
            record,
        };
        let before = self.store.max_seq()?;
        self.apply_remote(path.clone(), version.clone())?;
        self.announce(Announced { path, version }, before);
        self.committer
            .commits
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Stores a version made on this node outside the mount (the lab's
    /// generator, tests): signed as this node, applied as any version is,
    /// and announced.
    pub(super) fn commit_local(&self, path: RelPath, record: FileRecord) -> Result<Version> {
        let version = Version {
            signature: self.sign(&path, &record),
            record,
        };
        let before = self.store.max_seq()?;
        let applied = self.apply_remote(path.clone(), version.clone())?;
        if matches!(applied, Applied::Stored | Applied::Merged) {
            self.announce(
                Announced {
                    path,
                    version: version.clone(),
                },
                before,
            );
        }
        Ok(version)
    }

    /// Applies a verified version from another node.
    pub(super) fn apply_remote(&self, path: RelPath, incoming: Version) -> Result<Applied> {
        let mut inval = Inval::default();
        let outcome = {
            let _ns = self.ns.lock();
            let current = self.store.get(&path)?;
            let held = current
                .as_ref()
                .map(|e| e.sync.versions.clone())
                .unwrap_or_default();
            let mut versions = versions_of(&held);
            if !versions.insert_keeping(incoming.record.clone(), &self.node()) {
                return Ok(Applied::Older);
            }
            let signed: Vec<Version> = versions
                .records()
                .iter()
                .filter_map(|r| {
                    held.iter()
                        .chain(std::iter::once(&incoming))
                        .find(|v| v.record == *r)
                        .cloned()
                })
                .collect();
            let merged = versions.is_concurrent();
            if !self.show(&path, current, signed, &mut inval)? {
                return Ok(Applied::Blocked);
            }
            if merged {
                Applied::Merged
            } else {
                Applied::Stored
            }
        };
        self.invalidate(inval);
        self.adopt_seeds();
        Ok(outcome)
    }

    /// Hands the objects that remote versions superseded (see `note_seed`)
    /// to the content source now, before the new version is first read:
    /// once the store no longer needs them (flushed), out of the object
    /// store under `ns`, then offered outside it (the source may wait on
    /// its own locks). Declined ones are deleted.
    fn adopt_seeds(&self) {
        let seeds: Vec<_> = self.pending_seeds.lock().drain().collect();
        if seeds.is_empty() {
            return;
        }
        let Some(source) = self.cfg.content.clone() else {
            return;
        };
        if let Err(e) = self.store.flush() {
            warn!("could not flush the store before reusing superseded content: {e}");
            return;
        }
        for (old, (old_w, new_w)) in seeds {
            let taken = {
                let _ns = self.ns.lock();
                let unused = self.store.refcount(&old).is_ok_and(|n| n == 0)
                    && !self.inodes.backed_objects.lock().contains_key(&old)
                    && !self
                        .inodes
                        .orphans
                        .lock()
                        .values()
                        .any(|o| o.record.content == Some(old))
                    && !self.objects.object_path(&new_w.content).exists();
                if !unused {
                    continue;
                }
                match self.objects.take_out(&old) {
                    Ok(p) => p,
                    Err(e) => {
                        debug!(content = %old.short(), "superseded content not reused: {e}");
                        continue;
                    }
                }
            };
            self.outboards.remove(&old);
            if source.adopt_seed(&taken, &old_w, &new_w) {
                debug!(path = %new_w.path, "the old version starts the new one's fetch");
            } else if let Err(e) = std::fs::remove_file(&taken) {
                warn!(
                    "could not delete superseded content {}: {e}",
                    taken.display()
                );
            }
        }
    }

    /// A remote version replaces a file whose content is here with content
    /// that is not: the old object is offered to the content source as the
    /// start of the new one's fetch when it is collected (`MAX_SEEDS`).
    fn note_seed(&self, path: &RelPath, before: Option<&Entry>, record: &FileRecord) {
        let Some(before) = before else { return };
        let (Some(old), Some(new)) = (before.record.content, record.content) else {
            return;
        };
        if old == new
            || self.cfg.content.is_none()
            || self.inodes.cell(before.ino).is_some()
            || record.size < SEED_MIN
            || !record.is_live()
            || self.objects.object_path(&new).exists()
            || !self.objects.object_path(&old).exists()
        {
            return;
        }
        let (Some(old_w), Some(new_w)) = (
            Wanted::of(path.to_string(), &before.record),
            Wanted::of(path.to_string(), record),
        ) else {
            return;
        };
        let mut seeds = self.pending_seeds.lock();
        if seeds.len() < MAX_SEEDS {
            seeds.insert(old, (old_w, new_w));
        }
    }

    fn ino_of_dir(&self, dir: &RelPath) -> Result<u64> {
        if dir.is_root() {
            return Ok(ROOT_INO);
        }
        Ok(self.store.get_live(dir)?.map_or(NO_INO, |e| e.ino))
    }

    /// Notes that the name `path` changed for the kernel.
    fn inval_name(&self, path: &RelPath, inval: &mut Inval) -> Result<()> {
        if let Some((dir, name)) = path.split() {
            let parent = self.ino_of_dir(&dir)?;
            if parent != NO_INO {
                inval.entries.push((parent, name.to_owned()));
                inval.inodes.push(parent);
            }
        }
        Ok(())
    }

    /// Stores `signed` as the versions of `path` and updates what the path,
    /// its conflict copies and its parents show. Returns false (and stores
    /// nothing) if a file stands where a parent directory should be.
    fn show(
        &self,
        path: &RelPath,
        current: Option<Entry>,
        signed: Vec<Version>,
        inval: &mut Inval,
    ) -> Result<bool> {
        let versions = versions_of(&signed);
        let res = resolve(path, &versions);
        let live_before = current.as_ref().filter(|e| e.is_live());
        let mut derived = None;
        let record = match res.shown {
            Some(r) => r.clone(),
            None => {
                let newest = versions.records().last();
                let keeps_children = live_before
                    .is_some_and(|e| e.record.kind == FileKind::Dir && !path.is_root())
                    && self.store.has_live_children(path)?;
                match newest {
                    Some(t) if keeps_children => {
                        derived = Some(Derived::ImplicitDir);
                        implicit_dir(Some(t), t)
                    }
                    Some(t) => t.clone(),
                    None => return Ok(true),
                }
            }
        };
        if record.is_live() && !self.ensure_parents(path, &record, inval)? {
            return Ok(false);
        }
        let ino = match live_before {
            _ if !record.is_live() => NO_INO,
            Some(e) if e.record.kind == record.kind => e.ino,
            _ if path.is_root() => ROOT_INO,
            _ => self.store.alloc_ino()?,
        };
        let old_copies: Vec<String> = current
            .as_ref()
            .map(|e| {
                let held = versions_of(&e.sync.versions);
                resolve(path, &held)
                    .copies
                    .into_iter()
                    .map(|(n, _)| n)
                    .collect()
            })
            .unwrap_or_default();
        self.note_seed(path, live_before, &record);
        let mut changes = vec![Change::Put(
            path.clone(),
            Entry {
                ino,
                record,
                sync: Replication::new(signed.clone(), derived),
            },
        )];
        let mut replaced: Vec<(RelPath, Entry)> = Vec::new();
        if let Some(o) = live_before.filter(|o| o.ino != ino) {
            replaced.push((path.clone(), o.clone()));
        }
        if let Some(o) = live_before {
            inval.inodes.push(o.ino);
        }
        // Conflict copies that the versions call for, where no real record
        // holds the name.
        for (name, loser) in &res.copies {
            let Some(copy_path) = sibling(path, name) else {
                continue;
            };
            let existing = self.store.get(&copy_path)?;
            let ino = match &existing {
                Some(e) if e.sync.derived == Some(Derived::ConflictCopy) => {
                    if e.record == **loser {
                        continue;
                    }
                    if e.record.kind == loser.kind {
                        e.ino
                    } else {
                        replaced.push((copy_path.clone(), e.clone()));
                        self.store.alloc_ino()?
                    }
                }
                Some(_) => continue,
                None => self.store.alloc_ino()?,
            };
            if let Some(e) = &existing {
                inval.inodes.push(e.ino);
            }
            changes.push(Change::Put(
                copy_path.clone(),
                Entry {
                    ino,
                    record: (*loser).clone(),
                    sync: Replication::new(Vec::new(), Some(Derived::ConflictCopy)),
                },
            ));
            self.inval_name(&copy_path, inval)?;
        }
        // Copies of a conflict that has ended go, unless something made them real.
        for name in old_copies {
            if res.copies.iter().any(|(n, _)| *n == name) {
                continue;
            }
            let Some(copy_path) = sibling(path, &name) else {
                continue;
            };
            if let Some(e) = self
                .store
                .get(&copy_path)?
                .filter(|e| e.sync.derived == Some(Derived::ConflictCopy))
            {
                replaced.push((copy_path.clone(), e.clone()));
                inval.inodes.push(e.ino);
                changes.push(Change::Remove(copy_path.clone()));
                self.inval_name(&copy_path, inval)?;
            }
        }
        let released = self.store.write(changes)?;
        // A replaced inode that is open keeps working until closed (the
        // kernel forgets it then); one that is not open just goes.
        for (p, o) in replaced {
            let open = self.inodes.cell(o.ino).is_some();
            debug!(path = %p, ino = o.ino, open, "a remote version replaced an inode");
            if open {
                self.inodes.mark_unlinked(&o);
                self.inodes.remote_replaced.lock().insert(o.ino, p);
            }
        }
        self.gc(released);
        self.inval_name(path, inval)?;
        if live_before.is_some()
            && let Some(parent) = path.parent()
            && self.store.get_live(path)?.is_none()
        {
            self.prune_implicit(parent, inval)?;
        }
        Ok(true)
    }

    /// Makes sure every ancestor of `path` shows as a directory, adding
    /// implicit ones where only deletes (or nothing) are known. Returns false
    /// if a file or symlink is in the way.
    fn ensure_parents(
        &self,
        path: &RelPath,
        child: &FileRecord,
        inval: &mut Inval,
    ) -> Result<bool> {
        let mut missing = Vec::new();
        let mut cur = path.parent();
        while let Some(dir) = cur {
            if dir.is_root() {
                break;
            }
            match self.store.get(&dir)? {
                Some(e) if e.is_live() && e.record.kind == FileKind::Dir => break,
                Some(e) if e.is_live() => return Ok(false),
                other => {
                    cur = dir.parent();
                    missing.push((dir, other));
                }
            }
        }
        for (dir, old) in missing.into_iter().rev() {
            let (base, versions) = match old {
                Some(e) => (Some(e.record), e.sync.versions),
                None => (None, Vec::new()),
            };
            let entry = Entry {
                ino: self.store.alloc_ino()?,
                record: implicit_dir(base.as_ref(), child),
                sync: Replication::new(versions, Some(Derived::ImplicitDir)),
            };
            self.store.write(vec![Change::Put(dir.clone(), entry)])?;
            self.inval_name(&dir, inval)?;
        }
        Ok(true)
    }

    /// An implicit directory with nothing live left inside shows what its
    /// versions say again (a delete, or nothing); so may its parents then.
    pub(super) fn prune_implicit(&self, dir: RelPath, inval: &mut Inval) -> Result<()> {
        let mut cur = Some(dir);
        while let Some(dir) = cur {
            if dir.is_root() {
                return Ok(());
            }
            let Some(e) = self.store.get(&dir)? else {
                return Ok(());
            };
            if e.sync.derived != Some(Derived::ImplicitDir) || self.store.has_live_children(&dir)? {
                return Ok(());
            }
            let versions = versions_of(&e.sync.versions);
            let change = match versions.records().last() {
                Some(newest) => Change::Put(
                    dir.clone(),
                    Entry {
                        ino: NO_INO,
                        record: newest.clone(),
                        sync: Replication::new(e.sync.versions.clone(), None),
                    },
                ),
                None => Change::Remove(dir.clone()),
            };
            inval.inodes.push(e.ino);
            self.store.write(vec![change])?;
            self.inval_name(&dir, inval)?;
            cur = dir.parent();
        }
        Ok(())
    }

    /// Tells the kernel what changed behind its back, from the invalidation
    /// thread: a notification sent while the kernel holds a directory lock
    /// for a request in progress (a local rename that empties an implicit
    /// directory, say) would wait for that request, and so for us.
    pub(super) fn invalidate(&self, mut inval: Inval) {
        if inval.entries.is_empty() && inval.inodes.is_empty() {
            return;
        }
        inval.inodes.sort_unstable();
        inval.inodes.dedup();
        inval.inodes.retain(|i| *i != NO_INO);
        self.inodes
            .stale_cache
            .lock()
            .extend(inval.inodes.iter().copied());
        if let Some(tx) = self.inval_tx.lock().as_ref() {
            // Full: the kernel's caches expire with the entry TTL anyway.
            let _ = tx.try_send(inval);
        }
    }
}

/// The thread that sends the kernel its invalidations.
pub(super) fn run_invalidations(n: fuser::Notifier, rx: std::sync::mpsc::Receiver<Inval>) {
    for inval in rx {
        for (parent, name) in inval.entries {
            let _ = n.inval_entry(INodeNo(parent), OsStr::new(&name));
        }
        for ino in inval.inodes {
            let _ = n.inval_inode(INodeNo(ino), 0, 0);
        }
    }
}

#[cfg(test)]
mod tests {
    //! What a node shows must depend only on the set of records it received,
    //! never on their order or repetition: two filesystems fed the same
    //! records in different orders show the same tree (names, kinds, sizes,
    //! contents, modes), conflict copies and implicit directories included.

    #![allow(clippy::unwrap_used)]

    use std::{collections::BTreeMap, sync::Arc, time::Duration};

    use btfs_core::{ContentId, FileRecord, NodeId, Owner, RelPath, Timestamp, Versions};
    use btfs_store::{MemBackend, Store, Version};
    use proptest::prelude::*;

    use crate::{BtfsFs, FsConfig, FsHandle, ObjectStore};

    const OWNER: Owner = Owner {
        mode: 0o644,
        uid: 0,
        gid: 0,
    };
    /// `d` is a directory; the others are files (two inside `d`).
    const PATHS: &[&str] = &["d", "d/f", "d/g", "h"];

    fn node(i: u8) -> NodeId {
        NodeId([i + 1; 32])
    }

    #[derive(Debug, Clone)]
    enum Step {
        Write { n: u8, p: usize, data: u8 },
        Delete { n: u8, p: usize },
        Sync { from: u8, to: u8 },
    }

    /// Records made by three nodes that edit and sync at random.
    fn arb_records() -> impl Strategy<Value = Vec<(RelPath, FileRecord)>> {
        let step = prop_oneof![
            4 => (0u8..3, 0..PATHS.len(), 0u8..3).prop_map(|(n, p, data)| Step::Write { n, p, data }),
            2 => (0u8..3, 0..PATHS.len()).prop_map(|(n, p)| Step::Delete { n, p }),
            3 => (0u8..3, 0u8..3).prop_map(|(from, to)| Step::Sync { from, to }),
        ];
        proptest::collection::vec(step, 1..30).prop_map(|steps| {
            let paths: Vec<RelPath> = PATHS.iter().map(|p| RelPath::parse(p).unwrap()).collect();
            let mut views: Vec<BTreeMap<usize, Versions>> = vec![BTreeMap::new(); 3];
            let mut out = Vec::new();
            for (t, s) in steps.into_iter().enumerate() {
                let now = Timestamp {
                    secs: 1_000 + t as i64 / 2,
                    nanos: 0,
                };
                match s {
                    Step::Write { n, p, data } => {
                        let held = views[n as usize].entry(p).or_default();
                        let mut r = if p == 0 {
                            FileRecord::new_dir(OWNER, node(n), now)
                        } else {
                            let mut r = FileRecord::new_file(OWNER, node(n), now);
                            r.content = Some(ContentId::of(&[data]));
                            r.size = 1;
                            r.prev_content = held
                                .records()
                                .iter()
                                .rev()
                                .find(|r| r.is_live())
                                .and_then(|r| r.content);
                            r
                        };
                        r.version = held.joined_version().incremented(node(n));
                        held.insert(r.clone());
                        out.push((paths[p].clone(), r));
                    }
                    Step::Delete { n, p } => {
                        let held = views[n as usize].entry(p).or_default();
                        let Some(last) = held.records().last().cloned() else {
                            continue;
                        };
                        let mut r = last.tombstone(node(n), now);
                        r.version = held.joined_version().incremented(node(n));
                        held.insert(r.clone());
                        out.push((paths[p].clone(), r));
                    }
                    Step::Sync { from, to } => {
                        let src = views[from as usize].clone();
                        for (p, v) in src {
                            views[to as usize].entry(p).or_default().merge(&v);
                        }
                    }
                }
            }
            out
        })
    }

    fn new_fs() -> (FsHandle<MemBackend>, BtfsFs<MemBackend>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let cfg = FsConfig {
            node: NodeId([9; 32]),
            passthrough: false,
            ttl: Duration::from_secs(1),
            state_dir: dir.path().to_path_buf(),
            announce: None,
            signer: None,
            content: None,
            history: false,
            metrics: None,
        };
        let objects = ObjectStore::open(dir.path()).unwrap();
        let fs = BtfsFs::new(Arc::new(Store::in_memory()), objects, cfg).unwrap();
        (fs.handle(), fs, dir)
    }

    type Shown = BTreeMap<String, (btfs_core::FileKind, u64, Option<ContentId>, u32)>;

    fn shown(h: &FsHandle<MemBackend>) -> Shown {
        let store = h.store();
        let mut out = BTreeMap::new();
        let mut stack = vec![RelPath::root()];
        while let Some(dir) = stack.pop() {
            for (name, e) in store.live_children(&dir).unwrap() {
                let p = dir.join(&name).unwrap();
                if e.record.kind == btfs_core::FileKind::Dir {
                    stack.push(p.clone());
                }
                let r = &e.record;
                out.insert(p.to_string(), (r.kind, r.size, r.content, r.mode));
            }
        }
        out
    }

    fn deliver(h: &FsHandle<MemBackend>, records: &[(RelPath, FileRecord)]) {
        for (p, r) in records {
            h.apply_remote(
                p.clone(),
                Version {
                    record: r.clone(),
                    signature: Vec::new(),
                },
            )
            .unwrap();
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
        #[test]
        fn the_tree_depends_on_the_records_not_their_order(
            records in arb_records(),
            seed in any::<u64>(),
        ) {
            let (a, _fa, _da) = new_fs();
            let (b, _fb, _db) = new_fs();
            deliver(&a, &records);
            // Another order, with every other record delivered twice.
            let mut shuffled: Vec<_> = records.iter().chain(records.iter().step_by(2)).cloned().collect();
            let mut x = seed | 1;
            for i in (1..shuffled.len()).rev() {
                x ^= x << 13; x ^= x >> 7; x ^= x << 17;
                shuffled.swap(i, (x % (i as u64 + 1)) as usize);
            }
            deliver(&b, &shuffled);
            let (ta, tb) = (shown(&a), shown(&b));
            prop_assert_eq!(&ta, &tb);
            // Every live version that no other supersedes shows somewhere:
            // nothing is lost.
            for (p, r) in records.iter().filter(|(_, r)| r.is_live() && r.kind == btfs_core::FileKind::File) {
                let held: Versions = records.iter().filter(|(q, _)| q == p).map(|(_, r)| r.clone()).collect();
                if !held.records().contains(r) { continue; }
                let superseded = held.records().iter().any(|o| o.is_live() && o.prev_content.is_some() && o.prev_content == r.content && o.content != r.content);
                let visible = ta.values().any(|v| v.2 == r.content);
                prop_assert!(visible || superseded, "lost {} {:?}\n{:#?}", p, r, ta);
            }
        }
    }
}
