//! The inode table: the state of inodes with open handles (staging file,
//! passthrough backing, writers), inodes the kernel still knows after their
//! path went (orphans), and the deletion of objects nothing uses any more.

use std::{
    collections::{HashMap, HashSet},
    fs::File,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use btfs_core::{ContentId, RelPath};
use btfs_store::{Backend, Entry};
use fuser::BackingId;
use parking_lot::{Mutex, RwLock};
use tracing::{error, warn};

use super::{Shared, attrs::PendingAttrs};
use crate::{error::Result, objects::Staging};

/// Which file an inode's passthrough backing id refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Target {
    /// The object file itself: readers only, and no other inode uses that
    /// object as its backing file (see `Inodes::backed_objects`).
    Object(ContentId),
    /// The inode's private staging file.
    Staging,
}

/// Per-inode state while the inode has open handles.
#[derive(Debug, Default)]
pub(super) struct OpenInode {
    pub(super) writers: u32,
    /// The staging file holds writes that no commit has recorded yet.
    pub(super) uncommitted: bool,
    /// Handles served in the kernel's cached mode (not passthrough).
    pub(super) cached: u32,
    pub(super) staging: Option<Staging>,
    /// Version and content the staging file started from: a commit over a
    /// version that arrived meanwhile from another node is concurrent with
    /// it (a conflict), not its successor.
    pub(super) base: Option<(btfs_core::VersionVector, Option<ContentId>)>,
    pub(super) backing: Option<(Target, Arc<BackingId>)>,
    /// A writer called fsync: the commit makes the new version durable
    /// (object and metadata on disk) before it completes, not within the
    /// store's flush interval.
    pub(super) sync_on_commit: bool,
    /// Attribute changes made while writers hold the file open, for the
    /// next commit (see [`PendingAttrs`]).
    pub(super) attrs: Option<PendingAttrs>,
    /// The staging file is a delta over the committed object (see
    /// [`super::ranged`]); also in `InodeCell::ranged`.
    pub(super) ranged: Option<Arc<super::ranged::Ranged>>,
    /// A promotion's intent and delta file (see `ObjectStore::promote`),
    /// deleted once its version is committed.
    pub(super) promoted: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

#[derive(Debug, Default)]
pub(super) struct InodeCell {
    /// Open handles plus opens in progress; the cell leaves the map at zero.
    pub(super) pins: AtomicUsize,
    pub(super) state: Mutex<OpenInode>,
    /// The file holding the inode's newest bytes once a writer has opened it
    /// (the staging file, which stays valid after it is installed as the
    /// object). Cached-mode reads use it, so they see the writers' data.
    pub(super) current: RwLock<Option<Arc<File>>>,
    /// The range-staged writes, for reads and writes (held shared by a
    /// write while it lands, exclusively while the stage becomes a full
    /// copy).
    pub(super) ranged: RwLock<Option<Arc<super::ranged::Ranged>>>,
}

/// The maps of inodes (lock 3 of the order in [`super`]: each held shortly).
#[derive(Debug, Default)]
pub(super) struct Inodes {
    pub(super) open: Mutex<HashMap<u64, Arc<InodeCell>>>,
    /// Entries of inodes that were unlinked or replaced while the kernel still
    /// knew them, until it forgets them; their content is kept meanwhile.
    pub(super) orphans: Mutex<HashMap<u64, Entry>>,
    /// Orphans made by a remote version (a delete or a replacement) while the
    /// inode was open, with their path: a write in progress there survives
    /// as a concurrent version when it is closed.
    pub(super) remote_replaced: Mutex<HashMap<u64, RelPath>>,
    /// Unlinked inodes the kernel forgot while a handle was still open (its
    /// FORGET can overtake the RELEASE): cleaned up when the last one goes.
    pub(super) forgotten: Mutex<HashSet<u64>>,
    /// Objects used as a passthrough backing file, with the number of inodes
    /// doing so (kept at most 1: a second inode gets the cached mode).
    pub(super) backed_objects: Mutex<HashMap<ContentId, usize>>,
    /// Inodes whose content changed outside the kernel's page cache
    /// (passthrough writes): their next cached open must not keep the cache.
    pub(super) stale_cache: Mutex<HashSet<u64>>,
}

impl Inodes {
    /// The state of `ino` if it has open handles.
    pub(super) fn cell(&self, ino: u64) -> Option<Arc<InodeCell>> {
        self.open.lock().get(&ino).cloned()
    }

    /// One inode fewer uses object `c` as its passthrough backing file.
    pub(super) fn unback_object(&self, c: &ContentId) {
        let mut backed = self.backed_objects.lock();
        if let Some(n) = backed.get_mut(c) {
            *n -= 1;
            if *n == 0 {
                backed.remove(c);
            }
        }
    }

    /// Keeps an unlinked entry reachable by inode number until the kernel
    /// forgets it (it may still open it, as with any unlinked-but-open file).
    pub(super) fn mark_unlinked(&self, entry: &Entry) {
        self.orphans.lock().insert(entry.ino, entry.clone());
    }
}

impl<B: Backend> Shared<B> {
    pub(super) fn pin(&self, ino: u64) -> Arc<InodeCell> {
        let mut open = self.inodes.open.lock();
        let cell = open.entry(ino).or_default().clone();
        cell.pins.fetch_add(1, Ordering::SeqCst);
        cell
    }

    pub(super) fn unpin(&self, ino: u64) {
        let mut open = self.inodes.open.lock();
        let Some(cell) = open.get(&ino) else { return };
        if cell.pins.fetch_sub(1, Ordering::SeqCst) != 1 {
            return;
        }
        let cell = open.remove(&ino);
        let forgotten = self.inodes.forgotten.lock().remove(&ino);
        drop(open);
        if let Some(cell) = cell {
            self.close_inode(ino, &cell);
        }
        // The kernel forgot it meanwhile: its orphan goes now.
        if forgotten {
            self.forget(ino);
        }
    }

    /// The last handle of `ino` is gone: its backing and staging files.
    fn close_inode(&self, ino: u64, cell: &InodeCell) {
        let mut st = cell.state.lock();
        if let Some((Target::Object(c), _)) = st.backing.take() {
            self.inodes.unback_object(&c);
        }
        // The last handle is gone. A staging file left behind is a clean
        // private copy (already committed), an unlinked file's data, or writes
        // whose commit failed: those are kept aside, never deleted.
        let orphan = self.inodes.orphans.lock().contains_key(&ino);
        // Writes kept as ranges are made whole before they are kept aside.
        if st.ranged.is_some()
            && st.uncommitted
            && !orphan
            && let Err(e) = self.materialize(cell, &mut st)
        {
            error!(ino, "could not make a range-staged version whole: {e}");
        }
        *cell.ranged.write() = None;
        st.ranged = None;
        let Some(staging) = st.staging.take() else {
            return;
        };
        if st.uncommitted && !orphan {
            match self.objects.rescue(&staging.path, ino) {
                Ok(kept) => error!(
                    ino,
                    "a version could not be committed; its data is kept in {}",
                    kept.display()
                ),
                Err(e) => error!(
                    ino,
                    "a version could not be committed and its data could not be kept aside \
                     either ({e}); it is still at {}",
                    staging.path.display()
                ),
            }
        } else if let Err(e) = self.objects.discard_staging(&staging.path) {
            warn!(
                ino,
                "could not delete staging file {}: {e}",
                staging.path.display()
            );
        }
    }

    /// The kernel dropped inode `ino`: an orphan's content may now be deleted.
    pub(super) fn forget(&self, ino: u64) {
        {
            let open = self.inodes.open.lock();
            if open.contains_key(&ino) {
                self.inodes.forgotten.lock().insert(ino);
                return;
            }
        }
        let _ns = self.ns.lock();
        self.inodes.remote_replaced.lock().remove(&ino);
        let Some(orphan) = self.inodes.orphans.lock().remove(&ino) else {
            return;
        };
        if let Some(c) = orphan.record.content {
            self.gc(vec![c]);
        }
    }

    /// Queues objects that no entry references any more. They are deleted by
    /// [`FsHandle::collect_garbage`](super::FsHandle::collect_garbage) only
    /// after the store change that released them is durable: a crash may roll
    /// the store back to a version that still needs them.
    pub(super) fn gc(&self, released: Vec<ContentId>) {
        self.pending_gc.lock().extend(released);
    }

    pub(super) fn collect_garbage(&self) -> Result<usize> {
        let pending = std::mem::take(&mut *self.pending_gc.lock());
        if pending.is_empty() {
            return Ok(0);
        }
        self.store.flush()?;
        let _ns = self.ns.lock();
        let orphans = self.inodes.orphans.lock();
        let mut deleted = 0;
        for c in pending {
            let in_use = self.store.refcount(&c)? > 0
                || orphans.values().any(|o| o.record.content == Some(c));
            if in_use {
                continue;
            }
            self.outboards.remove(&c);
            match self.objects.remove(&c) {
                Ok(()) => deleted += 1,
                Err(e) => warn!(content = %c.short(), "could not delete unreferenced object: {e}"),
            }
        }
        Ok(deleted)
    }
}
