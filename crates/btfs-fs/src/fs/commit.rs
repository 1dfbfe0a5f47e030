//! The commit pipeline: a writer's release goes to the commit workers, which
//! hash the inode's staging file, install it as an object, publish it for
//! other nodes and commit the path's new record in one store write.

use std::{
    io,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
        mpsc::{SyncSender, TrySendError},
    },
    thread::JoinHandle,
};

use btfs_core::{ContentId, FileKind, InfoHash, Timestamp};
use btfs_store::{Backend, Change, Entry};
use parking_lot::Mutex;
use tracing::{debug, error, info, warn};

use super::{Shared, handles::Handle, inodes::OpenInode, ranged::RangedRest};
use crate::{
    content::Update,
    error::Result,
    objects::{Staging, hash_staging},
    outboard::{Outboard, SUBTREE},
};

/// Threads that hash and commit closed files.
const COMMIT_WORKERS: usize = 2;
/// Closed writers waiting for a commit worker; beyond this, closing commits
/// on the dispatch thread itself.
const COMMIT_QUEUE: usize = 256;

/// The commit workers, their queue and what they count.
#[derive(Debug, Default)]
pub(super) struct Committer {
    /// Releases of writers waiting for a commit worker.
    queue: Mutex<Option<SyncSender<Arc<Handle>>>>,
    workers: Mutex<Vec<JoinHandle<()>>>,
    /// Versions committed (for status).
    pub(super) commits: AtomicU64,
    /// Commits that failed (for status).
    pub(super) failures: AtomicU64,
}

impl<B: Backend> Shared<B> {
    pub(super) fn recover_synced(&self) -> Result<usize> {
        let mut recovered = 0;
        for left in self.objects.take_synced()? {
            let target = match self.store.get_ino(left.ino)? {
                Some((path, e)) if e.record.kind == FileKind::File && e.record.is_live() => {
                    Some(path)
                }
                _ => None,
            };
            let mut st = OpenInode {
                uncommitted: true,
                sync_on_commit: true,
                ..OpenInode::default()
            };
            if let Some(path) = &target {
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&left.path)?;
                st.staging = Some(Staging {
                    path: left.path.clone(),
                    file: Arc::new(file),
                });
                match self.commit(left.ino, &mut st, false) {
                    Ok(()) if st.staging.is_none() => {
                        info!(%path, "committed a version whose fsync was acknowledged before a crash");
                        recovered += 1;
                        continue;
                    }
                    Ok(()) => {}
                    Err(e) => {
                        error!(%path, "could not commit a version synced before a crash: {e}")
                    }
                }
            }
            let what = target.map_or_else(|| format!("inode {}", left.ino), |p| p.to_string());
            match self.objects.rescue(&left.path, left.ino) {
                Ok(kept) => warn!(
                    "data synced before a crash ({what}) has no file to go to any more; it is kept in {}",
                    kept.display()
                ),
                Err(e) => error!(
                    "data synced before a crash ({what}) could not be kept aside ({e}); it is still at {}",
                    left.path.display()
                ),
            }
        }
        Ok(recovered)
    }

    /// Closes handle `fh`. A writer's release goes to the commit workers, so
    /// that hashing a large file never occupies a dispatch thread; when their
    /// queue is full it runs here (backpressure on the closing application).
    pub(super) fn release(self: &Arc<Self>, fh: u64) -> Result<()> {
        let handle = self.handles.remove(fh)?;
        if handle.writable {
            let queue = self.committer.queue.lock().clone();
            let rejected = match queue {
                Some(tx) => match tx.try_send(handle) {
                    Ok(()) => return Ok(()),
                    Err(TrySendError::Full(h) | TrySendError::Disconnected(h)) => h,
                },
                None => handle,
            };
            self.finish_release(rejected);
            return Ok(());
        }
        self.finish_release(handle);
        Ok(())
    }

    /// Accounts for a closed handle and commits when it was the last writer.
    fn finish_release(&self, handle: Arc<Handle>) {
        let ino = handle.ino;
        if let Some(cell) = self.inodes.cell(ino) {
            let mut st = cell.state.lock();
            if handle.cached {
                st.cached -= 1;
            }
            if handle.writable {
                st.writers -= 1;
                if st.writers == 0 {
                    // Other handles (readers) still open besides this one?
                    let shared = cell.pins.load(Ordering::SeqCst) > 1;
                    if let Err(e) = self.commit(ino, &mut st, shared) {
                        self.committer.failures.fetch_add(1, Ordering::Relaxed);
                        error!(ino, "could not commit the new version of a file: {e}");
                    }
                }
            }
        }
        drop(handle);
        self.unpin(ino);
    }

    /// Starts the commit workers.
    pub(super) fn start_committers(self: &Arc<Self>) -> io::Result<()> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Arc<Handle>>(COMMIT_QUEUE);
        let rx = Arc::new(Mutex::new(rx));
        let mut workers = self.committer.workers.lock();
        for i in 0..COMMIT_WORKERS {
            let (shared, rx) = (self.clone(), rx.clone());
            workers.push(
                std::thread::Builder::new()
                    .name(format!("btfs-commit-{i}"))
                    .spawn(move || {
                        loop {
                            let next = rx.lock().recv();
                            match next {
                                Ok(handle) => shared.finish_release(handle),
                                Err(_) => return, // queue closed and drained
                            }
                        }
                    })?,
            );
        }
        *self.committer.queue.lock() = Some(tx);
        Ok(())
    }

    /// Closes the commit queue and waits until every queued commit is done.
    pub(super) fn stop_committers(&self) {
        self.committer.queue.lock().take();
        let workers = std::mem::take(&mut *self.committer.workers.lock());
        for w in workers {
            if w.join().is_err() {
                error!("a commit worker panicked");
            }
        }
    }

    /// Turns the inode's staging file into the committed version of its path.
    /// Called with the inode's state locked and no writer left.
    ///
    /// The staging file normally becomes the object by a rename. While
    /// passthrough readers still use it as their backing file it is copied
    /// instead: it must stay private to this inode, since objects are shared
    /// by every path with the same content.
    pub(super) fn commit(&self, ino: u64, st: &mut OpenInode, shared: bool) -> Result<()> {
        let installed = self.commit_staging(ino, st, shared)?;
        // A promoted base is the new version now: its intent may go once
        // the record is durable (until then a crash must finish it, since
        // the old version's object is gone).
        if st.promoted.is_some() {
            self.store.flush()?;
        }
        if let Some((intent, delta)) = st.promoted.take() {
            for p in [intent, delta] {
                if let Err(e) = self.objects.discard_staging(&p) {
                    warn!(ino, "could not delete {}: {e}", p.display());
                }
            }
        }
        if st.sync_on_commit {
            self.store.flush()?;
            st.sync_on_commit = false;
        }
        // The version is as durable as its writer asked: the staging file's
        // second name and its sync marker may go.
        if let Some(path) = installed
            && let Err(e) = self.objects.discard_staging(&path)
        {
            warn!(ino, "could not delete staging file {}: {e}", path.display());
        }
        st.uncommitted = false;
        st.base = match &st.staging {
            // Kept for readers: the next writer starts from what was committed.
            Some(_) => self
                .store
                .get_ino(ino)?
                .map(|(_, e)| (e.record.version, e.record.content)),
            None => None,
        };
        Ok(())
    }

    /// Returns the staging file's path when it was installed as the object
    /// (by a link, for a durable commit; its sync marker may remain): the
    /// caller discards it once the version is durable.
    fn commit_staging(
        &self,
        ino: u64,
        st: &mut OpenInode,
        shared: bool,
    ) -> Result<Option<PathBuf>> {
        let Some(staging) = st.staging.take() else {
            return Ok(None);
        };
        // Unlinked while open: the data goes with the last handle, unless
        // another node's version removed the file while it was being written
        // here (then the write survives, see below).
        let resurrect = match self.inodes.orphans.lock().get(&ino) {
            None => None,
            Some(orphan) => match self.inodes.remote_replaced.lock().get(&ino) {
                Some(path) if st.base.is_some() => Some((path.clone(), orphan.clone())),
                other => {
                    debug!(
                        ino,
                        remote = other.is_some(),
                        base = st.base.is_some(),
                        "commit of an unlinked file skipped"
                    );
                    st.staging = Some(staging);
                    return Ok(None);
                }
            },
        };
        // A range-staged file: hashed where it changed, made whole.
        let (staging, ranged) = match st.ranged.clone() {
            None => (staging, None),
            Some(r) => {
                st.staging = Some(staging);
                let done = self.commit_ranged(ino, st, &r)?;
                st.ranged = None;
                if let Some(cell) = self.inodes.cell(ino) {
                    *cell.ranged.write() = None;
                }
                match done {
                    Some(rc) => (rc.staging, Some(rc.rest)),
                    None => {
                        // Opened for writing, nothing written: no new
                        // version, but attributes changed meanwhile are.
                        if let Some(delta) = st.staging.take()
                            && let Err(e) = self.objects.discard_staging(&delta.path)
                        {
                            warn!(
                                ino,
                                "could not delete a delta file {}: {e}",
                                delta.path.display()
                            );
                        }
                        self.write_pending_attrs(ino, st)?;
                        return Ok(None);
                    }
                }
            }
        };
        // A private staging file in use as a backing file must stay private
        // (a range-staged inode has no passthrough backing).
        let keep_private = ranged.is_none() && shared && st.backing.is_some();
        let meta = staging.file.metadata()?;
        let hashed = match &ranged {
            Some(rc) => Ok((rc.content, rc.outboard.clone())),
            None if meta.len() > SUBTREE => {
                Outboard::of_file(&staging.file, meta.len()).and_then(|o| match o.root() {
                    Some(c) => Ok((c, Some(o))),
                    None => Err(io::Error::other("no root for a multi-subtree file")),
                })
            }
            None => hash_staging(&staging, meta.len()).map(|c| (c, None)),
        };
        let (content, outboard) = match hashed {
            Ok(c) => c,
            Err(e) => {
                st.staging = Some(staging);
                return Err(e.into());
            }
        };
        // Published from the staging file, before the namespace lock: hashing
        // a large file must not stall other operations.
        let unchanged = matches!(&st.base, Some((_, Some(c))) if *c == content);
        let torrent = if unchanged {
            None
        } else {
            self.publish(ino, &content, &staging.path, meta.len(), ranged.as_ref())
        };
        let _ns = self.ns.lock();
        let durable = st.sync_on_commit;
        let installed = if keep_private {
            self.objects.install_copy(&staging.path, &content, durable)
        } else {
            self.objects.install(&staging.path, &content, durable)
        };
        if installed.is_ok() {
            if let Some(o) = &outboard {
                self.outboards.put(&content, o);
            }
            // Readers served here read the new object from now on.
            if ranged.is_some()
                && let Some(cell) = self.inodes.cell(ino)
                && let Ok(f) = self.objects.open_object(&content)
            {
                *cell.current.write() = Some(Arc::new(f));
            }
        }
        let installed_from = if keep_private {
            st.staging = Some(staging);
            None
        } else {
            // The file is an object now: a later open must not reuse it as its
            // backing file (a writer would write into the object).
            st.backing = None;
            // Only a durable install leaves the staging name (and its sync
            // marker) behind; otherwise the rename took the name and no
            // marker was ever made (markers come with `sync_on_commit`).
            durable.then_some(staging.path)
        };
        installed?;
        let me = self.node();
        if let Some((path, orphan)) = resurrect {
            let (base, base_content) = st.base.clone().unwrap_or_default();
            if base_content == Some(content) {
                // Opened for writing but unchanged: the remote version stands.
                st.attrs = None;
                self.gc(vec![content]);
                return Ok(installed_from);
            }
            let mut record = orphan.record.next_version(me, Timestamp::now());
            record.torrent = torrent;
            record.content = Some(content);
            record.size = meta.len();
            record.mtime = Timestamp::from(meta.modified()?);
            let pending = st.attrs.take();
            if let Some(p) = &pending {
                p.apply(&mut record);
            }
            drop(_ns);
            self.inodes.remote_replaced.lock().remove(&ino);
            warn!(%path, "another node removed or replaced this file while it was open for writing here: the write is kept as a concurrent version");
            let done = self.commit_concurrent(path, record, (&base, base_content), &orphan.record);
            if done.is_err() {
                st.attrs = pending;
            }
            return done.map(|()| installed_from);
        }
        let Some((path, entry)) = self.store.get_ino(ino)? else {
            // Removed while we hashed: nothing may reference the object.
            debug!(ino, "commit: the inode is gone");
            st.attrs = None;
            self.gc(vec![content]);
            return Ok(installed_from);
        };
        let mtime = Timestamp::from(meta.modified()?);
        let r = &entry.record;
        if r.content == Some(content)
            && r.size == meta.len()
            && r.mtime == mtime
            && st.attrs.is_none()
        {
            return Ok(installed_from);
        }
        let mut record = r.next_version(self.node(), Timestamp::now());
        record.torrent = match r.torrent {
            Some(t) if r.content == Some(content) => Some(t),
            _ => torrent,
        };
        record.content = Some(content);
        record.size = meta.len();
        record.mtime = mtime;
        // Attribute changes made while it was open are part of this version
        // (kept back until now, see `PendingAttrs`).
        let pending = st.attrs.take();
        if let Some(p) = &pending {
            p.apply(&mut record);
        }
        if let Some((base, base_content)) = &st.base
            && r.version.iter().any(|(n, c)| *n != me && *c > base.get(n))
        {
            // Another node's version arrived while this one was being
            // written: both are kept (the path shows a conflict copy). Local
            // changes meanwhile (a chmod on the open file) are not a conflict.
            let (base, base_content) = (base.clone(), *base_content);
            let current = r.clone();
            drop(_ns);
            info!(%path, "a remote version arrived while the file was open for writing: keeping both");
            let done = self.commit_concurrent(path, record, (&base, base_content), &current);
            if done.is_err() {
                st.attrs = pending;
            }
            return done.map(|()| installed_from);
        }
        let released =
            match self.write_announced(vec![Change::Put(path, Entry::new(ino, record))], 1) {
                Ok(r) => r,
                Err(e) => {
                    // Still pending: the next commit or fsync stores them.
                    st.attrs = pending;
                    return Err(e);
                }
            };
        drop(_ns);
        if st.sync_on_commit {
            // Durable before it is counted: `btfs status` may be read, and
            // the daemon killed, the moment the counter moves.
            self.store.flush()?;
            st.sync_on_commit = false;
        }
        self.gc(released);
        self.committer.commits.fetch_add(1, Ordering::Relaxed);
        Ok(installed_from)
    }

    /// Makes committed content available to other nodes: its swarm, or
    /// `None` (no content source, empty content, or a failure, logged: the
    /// version stands, and other nodes cannot read it until it is written
    /// again).
    fn publish(
        &self,
        ino: u64,
        content: &ContentId,
        file: &Path,
        size: u64,
        ranged: Option<&RangedRest>,
    ) -> Option<InfoHash> {
        let source = self.cfg.content.as_ref()?;
        if size == 0 {
            return None;
        }
        let published = match ranged {
            Some(r) => source.publish_update(
                content,
                file,
                size,
                &Update {
                    base: r.base,
                    base_torrent: r.base_torrent,
                    base_kept: r.kept,
                    changed: &r.changed,
                },
            ),
            None => source.publish(content, file, size),
        };
        match published {
            Ok(t) => t,
            Err(e) => {
                error!(ino, content = %content.short(), "could not publish new content for other nodes: {e}");
                None
            }
        }
    }
}
