//! The `fuser::Filesystem` implementation.
//!
//! # Data path
//! Opening a file for writing gives its inode a *staging* file: a private copy of
//! the committed object (or an empty file for `O_TRUNC` and new files). Every
//! handle of that inode, readers included, then sees the staging file, so POSIX
//! read-after-write holds across handles. When the last writable handle is
//! released the staging file is hashed (blake3), moved into the object store
//! and the path's record is committed with one atomic store write. Objects are
//! immutable; a later version is a new object, and objects that no record
//! references any more are deleted.
//!
//! Reads and writes use FUSE passthrough when the kernel grants it: the kernel
//! then talks to the object or staging file directly. The kernel requires every
//! passthrough handle of an inode to use the same backing file, so a handle
//! whose file differs from the inode's current backing file is opened with
//! `FOPEN_DIRECT_IO` and served here instead. Content not yet on this node is
//! read through the content source, also with `FOPEN_DIRECT_IO`: its bytes
//! are cached once, in the file the fetch writes, not a second time here.
//!
//! # Locks (taken in this order, never the other way round)
//! 1. an inode's state (`InodeCell::state`): staging file, backing file, writers;
//!    held across local file IO of that inode only (copy, hash);
//! 2. `ns`: serialises changes to the metadata store; held only around store
//!    reads and writes and object install/delete, never across hashing or copies;
//! 3. the maps of open inodes, handles and directory listings (short);
//! 4. an inode's `unlinked` snapshot (leaf).
//!
//! Reads of metadata (lookup, getattr, readdir) take no lock but the short map
//! locks, so a slow operation on one file never stalls the others; the session
//! also runs several dispatch threads.

use std::{
    collections::{HashMap, HashSet},
    ffi::OsStr,
    fs::{File, Metadata},
    io,
    os::unix::fs::{FileExt, MetadataExt},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, MutexGuard, OnceLock, RwLock,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        mpsc::{SyncSender, TrySendError},
    },
    time::{Duration, SystemTime},
};

use btfs_core::{ContentId, FileKind, FileRecord, InfoHash, NodeId, Owner, RelPath, Timestamp};
use btfs_store::{Backend, Change, Entry, NO_INO, ROOT_INO, Stats, Store};
use fuser::{
    BackingId, Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite,
    Request, TimeOrNow, WriteFlags,
};
use serde::Serialize;
use tracing::{debug, error, info, warn};

/// Threads that hash and commit closed files.
const COMMIT_WORKERS: usize = 2;
/// Closed writers waiting for a commit worker; beyond this, closing commits
/// on the dispatch thread itself.
const COMMIT_QUEUE: usize = 256;

mod replica;

pub use replica::{Announced, Applied};

use crate::{
    content::{ContentSource, Wanted},
    error::{FsError, Result, errno},
    objects::{ObjectStore, Staging, hash_file},
};

/// Settings of one mounted filesystem.
#[derive(Debug, Clone)]
pub struct FsConfig {
    /// This node's identity, the author of local changes.
    pub node: NodeId,
    /// Ask the kernel for FUSE passthrough (needs root and Linux 6.9+).
    pub passthrough: bool,
    /// How long the kernel may cache entries and attributes.
    pub ttl: Duration,
    /// The state directory (for `statfs`).
    pub state_dir: PathBuf,
    /// Where new versions of records are announced, for replication (`None`
    /// on a node without a mesh). When it is full the announcement is
    /// dropped: anti-entropy delivers the record later.
    pub announce: Option<tokio::sync::mpsc::Sender<Announced>>,
    /// Signs new local versions as this node (`None`: unsigned, no mesh).
    pub signer: Option<Signer>,
    /// Where content held by other nodes comes from (`None`: nowhere, reads
    /// of such content fail with EIO).
    pub content: Option<Arc<dyn ContentSource>>,
}

/// Signs a record at a path as this node.
pub type SignFn =
    dyn Fn(&RelPath, &FileRecord) -> std::result::Result<Vec<u8>, String> + Send + Sync;

#[derive(Clone)]
pub struct Signer(pub Arc<SignFn>);

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Signer")
    }
}

/// Invalidations waiting for the kernel.
const INVAL_QUEUE: usize = 4096;

/// What `btfs status` reports about the filesystem layer.
#[derive(Debug, Clone, Serialize)]
pub struct FsStatus {
    pub open_handles: usize,
    pub open_files: usize,
    pub passthrough: bool,
    pub commits: u64,
    pub commit_failures: u64,
    /// Released objects waiting for the next garbage collection.
    pub pending_gc: usize,
    #[serde(flatten)]
    pub tree: Stats,
}

/// Which file an inode's passthrough backing id refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    /// The object file itself: readers only, and no other inode uses that
    /// object as its backing file (see `Shared::backed_objects`).
    Object(ContentId),
    /// The inode's private staging file.
    Staging,
}

/// Per-inode state while the inode has open handles.
#[derive(Debug, Default)]
struct OpenInode {
    writers: u32,
    /// The staging file holds writes that no commit has recorded yet.
    uncommitted: bool,
    /// Handles served in the kernel's cached mode (not passthrough).
    cached: u32,
    staging: Option<Staging>,
    /// Version and content the staging file started from: a commit over a
    /// version that arrived meanwhile from another node is concurrent with
    /// it (a conflict), not its successor.
    base: Option<(btfs_core::VersionVector, Option<ContentId>)>,
    backing: Option<(Target, Arc<BackingId>)>,
    /// A writer called fsync: the commit makes the new version durable
    /// (object and metadata on disk) before it completes, not within the
    /// store's flush interval.
    sync_on_commit: bool,
}

#[derive(Debug, Default)]
struct InodeCell {
    /// Open handles plus opens in progress; the cell leaves the map at zero.
    pins: AtomicUsize,
    state: Mutex<OpenInode>,
    /// The file holding the inode's newest bytes once a writer has opened it
    /// (the staging file, which stays valid after it is installed as the
    /// object). Cached-mode reads use it, so they see the writers' data.
    current: RwLock<Option<Arc<File>>>,
}

#[derive(Debug)]
struct Handle {
    ino: u64,
    /// For reads: the object opened; for writers: the staging file. `None`
    /// for a reader of content that other nodes hold (`remote`).
    file: Option<Arc<File>>,
    writable: bool,
    /// Opened `O_SYNC` or `O_DSYNC`: each write served here is synced (the
    /// kernel syncs passthrough writes itself).
    sync_writes: bool,
    cached: bool,
    /// Content read through the content source until it arrives here.
    remote: Option<Wanted>,
    /// The object of `remote`, once it arrived.
    arrived: OnceLock<Arc<File>>,
}

/// How a read is answered.
enum ReadFrom {
    Here(Vec<u8>),
    /// By the content source, asynchronously.
    Remote(Arc<dyn ContentSource>, Wanted),
}

#[derive(Debug)]
struct DirItem {
    ino: u64,
    kind: FileType,
    name: String,
}

/// State shared by the dispatch threads and the daemon (for status).
#[derive(Debug)]
struct Shared<B> {
    store: Arc<Store<B>>,
    objects: ObjectStore,
    cfg: FsConfig,
    ns: Mutex<()>,
    open: Mutex<HashMap<u64, Arc<InodeCell>>>,
    handles: Mutex<HashMap<u64, Arc<Handle>>>,
    dirs: Mutex<HashMap<u64, Arc<Vec<DirItem>>>>,
    /// Entries of inodes that were unlinked or replaced while the kernel still
    /// knew them, until it forgets them; their content is kept meanwhile.
    orphans: Mutex<HashMap<u64, Entry>>,
    /// Orphans made by a remote version (a delete or a replacement) while the
    /// inode was open, with their path: a write in progress there survives
    /// as a concurrent version when it is closed.
    remote_replaced: Mutex<HashMap<u64, RelPath>>,
    /// Unlinked inodes the kernel forgot while a handle was still open (its
    /// FORGET can overtake the RELEASE): cleaned up when the last one goes.
    forgotten: Mutex<HashSet<u64>>,
    /// Releases of writers waiting for a commit worker.
    commit_queue: Mutex<Option<SyncSender<Arc<Handle>>>>,
    commit_workers: Mutex<Vec<std::thread::JoinHandle<()>>>,
    /// Objects used as a passthrough backing file, with the number of inodes
    /// doing so (kept at most 1: a second inode gets the cached mode).
    backed_objects: Mutex<HashMap<ContentId, usize>>,
    /// Objects released by store writes, deleted once those writes are durable.
    pending_gc: Mutex<Vec<ContentId>>,
    /// Inodes whose content changed outside the kernel's page cache
    /// (passthrough writes): their next cached open must not keep the cache.
    stale_cache: Mutex<HashSet<u64>>,
    next_fh: AtomicU64,
    passthrough: AtomicBool,
    /// Kernel cache invalidations, sent by their own thread once mounted.
    inval_tx: Mutex<Option<SyncSender<replica::Inval>>>,
    commits: AtomicU64,
    commit_failures: AtomicU64,
    announce_dropped: AtomicU64,
}

/// The filesystem handed to fuser.
#[derive(Debug)]
pub struct BtfsFs<B> {
    shared: Arc<Shared<B>>,
}

/// A handle on a live filesystem, for status queries from the daemon.
#[derive(Debug)]
pub struct FsHandle<B> {
    shared: Arc<Shared<B>>,
}

impl<B> Clone for FsHandle<B> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic in another dispatch thread must not take the whole mount down:
    // the protected data is kept consistent by each critical section itself.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn file_type(kind: FileKind) -> FileType {
    match kind {
        FileKind::File => FileType::RegularFile,
        FileKind::Dir => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
    }
}

fn name_str(name: &OsStr) -> Result<&str> {
    name.to_str()
        .ok_or(FsError::BadName(btfs_core::PathError::NotUtf8))
}

fn resolve_time(t: TimeOrNow, now: SystemTime) -> SystemTime {
    match t {
        TimeOrNow::SpecificTime(t) => t,
        TimeOrNow::Now => now,
    }
}

impl<B: Backend> BtfsFs<B> {
    /// Builds the filesystem over an opened store and object store, creating
    /// the root directory on first use and deleting unreferenced objects.
    pub fn new(store: Arc<Store<B>>, objects: ObjectStore, cfg: FsConfig) -> Result<Self> {
        if store.get(&RelPath::root())?.is_none() {
            let owner = Owner {
                mode: 0o755,
                uid: 0,
                gid: 0,
            };
            let record = FileRecord::new_dir(owner, cfg.node, Timestamp::now());
            store.write(vec![Change::Put(
                RelPath::root(),
                Entry::new(ROOT_INO, record),
            )])?;
        }
        let swept = objects.sweep(|c| store.refcount(c).map(|n| n > 0).unwrap_or(true))?;
        if swept > 0 {
            warn!(
                swept,
                "objects that no record references (left by a crash, or the metadata database was lost or replaced) were moved to {}: delete them once the tree is known to be whole",
                objects.quarantine_dir().display()
            );
        }
        let shared = Arc::new(Shared {
            store,
            objects,
            cfg,
            ns: Mutex::new(()),
            open: Mutex::new(HashMap::new()),
            handles: Mutex::new(HashMap::new()),
            dirs: Mutex::new(HashMap::new()),
            orphans: Mutex::new(HashMap::new()),
            remote_replaced: Mutex::new(HashMap::new()),
            forgotten: Mutex::new(HashSet::new()),
            pending_gc: Mutex::new(Vec::new()),
            backed_objects: Mutex::new(HashMap::new()),
            commit_queue: Mutex::new(None),
            commit_workers: Mutex::new(Vec::new()),
            stale_cache: Mutex::new(HashSet::new()),
            next_fh: AtomicU64::new(1),
            passthrough: AtomicBool::new(false),
            inval_tx: Mutex::new(None),
            commits: AtomicU64::new(0),
            commit_failures: AtomicU64::new(0),
            announce_dropped: AtomicU64::new(0),
        });
        shared.start_committers()?;
        Ok(Self { shared })
    }

    pub fn handle(&self) -> FsHandle<B> {
        FsHandle {
            shared: self.shared.clone(),
        }
    }
}

impl<B: Backend> FsHandle<B> {
    /// Commits the versions whose writers' `fsync` was acknowledged before a
    /// crash but which were never committed (the file was still open). Call
    /// once at start, before mounting and once content can be published.
    /// Data that cannot be committed is kept under `rescued/`, with a log
    /// line. Returns how many versions were recovered.
    pub fn recover_synced(&self) -> Result<usize> {
        self.shared.recover_synced()
    }

    pub fn status(&self) -> Result<FsStatus> {
        let s = &self.shared;
        Ok(FsStatus {
            open_handles: lock(&s.handles).len(),
            open_files: lock(&s.open).len(),
            passthrough: s.passthrough.load(Ordering::Relaxed),
            commits: s.commits.load(Ordering::Relaxed),
            commit_failures: s.commit_failures.load(Ordering::Relaxed),
            pending_gc: lock(&s.pending_gc).len(),
            tree: s.store.stats()?,
        })
    }

    /// Makes committed metadata durable (called on shutdown).
    pub fn flush(&self) -> Result<()> {
        Ok(self.shared.store.flush()?)
    }

    /// Lets the filesystem tell the kernel about changes it did not make
    /// (remote records). Set once, after mounting.
    pub fn set_notifier(&self, notifier: fuser::Notifier) -> io::Result<()> {
        let mut slot = lock(&self.shared.inval_tx);
        if slot.is_some() {
            return Ok(());
        }
        let (tx, rx) = std::sync::mpsc::sync_channel(INVAL_QUEUE);
        std::thread::Builder::new()
            .name("btfs-inval".into())
            .spawn(move || replica::run_invalidations(notifier, rx))?;
        *slot = Some(tx);
        Ok(())
    }

    /// Applies a verified version from another node (see [`replica`]).
    pub fn apply_remote(&self, path: RelPath, version: btfs_store::Version) -> Result<Applied> {
        self.shared.apply_remote(path, version)
    }

    /// The store, for replication (its log) and status.
    /// Where the object store keeps (or would keep) `content`.
    pub fn object_path(&self, content: &ContentId) -> PathBuf {
        self.shared.objects.object_path(content)
    }

    pub fn store(&self) -> &Arc<Store<B>> {
        &self.shared.store
    }

    /// Forgets deletes older than `retention`; returns how many.
    pub fn collect_tombstones(&self, retention: Duration) -> Result<usize> {
        let cutoff = SystemTime::now()
            .checked_sub(retention)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        Ok(self.shared.store.collect_tombstones(cutoff.into())?)
    }

    /// Makes the store durable, then deletes the objects that it no longer
    /// references. The daemon calls this periodically; returns how many
    /// objects were deleted.
    pub fn collect_garbage(&self) -> Result<usize> {
        self.shared.collect_garbage()
    }
}

impl<B: Backend> Shared<B> {
    fn recover_synced(&self) -> Result<usize> {
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

    fn node(&self) -> NodeId {
        self.cfg.node
    }

    // ----- inode cells -------------------------------------------------------

    fn pin(&self, ino: u64) -> Arc<InodeCell> {
        let mut open = lock(&self.open);
        let cell = open.entry(ino).or_default().clone();
        cell.pins.fetch_add(1, Ordering::SeqCst);
        cell
    }

    fn unpin(&self, ino: u64) {
        let mut open = lock(&self.open);
        let Some(cell) = open.get(&ino) else { return };
        if cell.pins.fetch_sub(1, Ordering::SeqCst) != 1 {
            return;
        }
        let cell = open.remove(&ino);
        let forgotten = lock(&self.forgotten).remove(&ino);
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
        let mut st = lock(&cell.state);
        if let Some((Target::Object(c), _)) = st.backing.take() {
            self.unback_object(&c);
        }
        // The last handle is gone. A staging file left behind is a clean
        // private copy (already committed), an unlinked file's data, or writes
        // whose commit failed: those are kept aside, never deleted.
        let orphan = lock(&self.orphans).contains_key(&ino);
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

    /// One inode fewer uses object `c` as its passthrough backing file.
    fn unback_object(&self, c: &ContentId) {
        let mut backed = lock(&self.backed_objects);
        if let Some(n) = backed.get_mut(c) {
            *n -= 1;
            if *n == 0 {
                backed.remove(c);
            }
        }
    }

    fn cell(&self, ino: u64) -> Option<Arc<InodeCell>> {
        lock(&self.open).get(&ino).cloned()
    }

    /// Runs `f` on the state of `ino`, pinning it meanwhile.
    fn with_state<T>(&self, ino: u64, f: impl FnOnce(&mut OpenInode) -> Result<T>) -> Result<T> {
        let cell = self.pin(ino);
        let r = f(&mut lock(&cell.state));
        self.unpin(ino);
        r
    }

    /// Keeps an unlinked entry reachable by inode number until the kernel
    /// forgets it (it may still open it, as with any unlinked-but-open file).
    fn mark_unlinked(&self, entry: &Entry) {
        lock(&self.orphans).insert(entry.ino, entry.clone());
    }

    /// The kernel dropped inode `ino`: an orphan's content may now be deleted.
    fn forget(&self, ino: u64) {
        {
            let open = lock(&self.open);
            if open.contains_key(&ino) {
                lock(&self.forgotten).insert(ino);
                return;
            }
        }
        let _ns = lock(&self.ns);
        lock(&self.remote_replaced).remove(&ino);
        let Some(orphan) = lock(&self.orphans).remove(&ino) else {
            return;
        };
        if let Some(c) = orphan.record.content {
            self.gc(vec![c]);
        }
    }

    // ----- lookups -----------------------------------------------------------

    fn dir_path(&self, ino: u64) -> Result<(RelPath, Entry)> {
        let (path, entry) = self.store.get_ino(ino)?.ok_or(FsError::NotFound)?;
        if entry.record.kind != FileKind::Dir {
            return Err(FsError::NotDir);
        }
        Ok((path, entry))
    }

    fn child_path(&self, parent: u64, name: &OsStr) -> Result<(RelPath, Entry, RelPath)> {
        let (dir, dir_entry) = self.dir_path(parent)?;
        let path = dir.join(name_str(name)?)?;
        Ok((dir, dir_entry, path))
    }

    /// The entry of `ino`, also for a file that was unlinked while open.
    fn entry_of(&self, ino: u64) -> Result<(Option<RelPath>, Entry)> {
        if let Some((p, e)) = self.store.get_ino(ino)? {
            return Ok((Some(p), e));
        }
        match lock(&self.orphans).get(&ino) {
            Some(e) => Ok((None, e.clone())),
            None => Err(FsError::NotFound),
        }
    }

    /// Attributes of `ino`. The store entry is read while the inode's state is
    /// locked, so that a commit in progress is seen either whole or not at all.
    fn getattr(&self, ino: u64) -> Result<FileAttr> {
        let Some(cell) = self.cell(ino) else {
            let (path, entry) = self.entry_of(ino)?;
            return build_attr(&entry, path.is_none(), None);
        };
        let st = lock(&cell.state);
        let (path, entry) = self.entry_of(ino)?;
        let staging = st.staging.as_ref().map(|s| s.file.metadata()).transpose()?;
        build_attr(&entry, path.is_none(), staging.as_ref())
    }

    fn lookup(&self, parent: u64, name: &OsStr) -> Result<FileAttr> {
        let (_, _, path) = self.child_path(parent, name)?;
        let entry = self.store.get_live(&path)?.ok_or(FsError::NotFound)?;
        self.getattr(entry.ino)
    }

    // ----- namespace changes -------------------------------------------------

    /// Owner of a new entry in `dir`: setgid directories pass their group on.
    fn owner_in(req: &Request, dir: &Entry, mode: u32, umask: u32, is_dir: bool) -> Owner {
        let mut mode = mode & !umask & 0o7777;
        let sgid_dir = dir.record.mode & libc::S_ISGID != 0;
        if sgid_dir && is_dir {
            mode |= libc::S_ISGID;
        }
        Owner {
            mode,
            uid: req.uid(),
            gid: if sgid_dir { dir.record.gid } else { req.gid() },
        }
    }

    /// The parent's change for a new or removed child: mtime and ctime move, the
    /// version does not (directory times are derived, not edited).
    fn touch_dir(dir: &RelPath, entry: &Entry, now: Timestamp) -> Change {
        let mut e = entry.clone();
        e.record.mtime = now;
        e.record.ctime = now;
        Change::Put(dir.clone(), e)
    }

    /// Queues objects that no entry references any more. They are deleted by
    /// [`FsHandle::collect_garbage`] only after the store change that released
    /// them is durable: a crash may roll the store back to a version that
    /// still needs them.
    fn gc(&self, released: Vec<ContentId>) {
        lock(&self.pending_gc).extend(released);
    }

    fn collect_garbage(&self) -> Result<usize> {
        let pending = std::mem::take(&mut *lock(&self.pending_gc));
        if pending.is_empty() {
            return Ok(0);
        }
        self.store.flush()?;
        let _ns = lock(&self.ns);
        let orphans = lock(&self.orphans);
        let mut deleted = 0;
        for c in pending {
            let in_use = self.store.refcount(&c)? > 0
                || orphans.values().any(|o| o.record.content == Some(c));
            if in_use {
                continue;
            }
            match self.objects.remove(&c) {
                Ok(()) => deleted += 1,
                Err(e) => warn!(content = %c.short(), "could not delete unreferenced object: {e}"),
            }
        }
        Ok(deleted)
    }

    /// Creates `record` at `parent/name`; returns the new entry.
    fn create_entry(
        &self,
        parent: u64,
        name: &OsStr,
        make: impl FnOnce(&Entry) -> FileRecord,
    ) -> Result<Entry> {
        let _ns = lock(&self.ns);
        let (dir, dir_entry, path) = self.child_path(parent, name)?;
        let previous = self.store.get(&path)?;
        if previous.as_ref().is_some_and(Entry::is_live) {
            return Err(FsError::Exists);
        }
        let mut record = make(&dir_entry);
        if let Some(prev) = previous {
            record = record.succeeding(&prev.record);
        }
        let entry = Entry::new(self.store.alloc_ino()?, record);
        let now = entry.record.ctime;
        self.write_announced(
            vec![
                Change::Put(path, entry.clone()),
                Self::touch_dir(&dir, &dir_entry, now),
            ],
            1,
        )?;
        Ok(entry)
    }

    fn remove_entry(&self, parent: u64, name: &OsStr, want_dir: bool) -> Result<()> {
        let released;
        let entry;
        let mut inval = replica::Inval::default();
        {
            let _ns = lock(&self.ns);
            let (dir, dir_entry, path) = self.child_path(parent, name)?;
            entry = self.store.get_live(&path)?.ok_or(FsError::NotFound)?;
            match (want_dir, entry.record.kind == FileKind::Dir) {
                (true, false) => return Err(FsError::NotDir),
                (false, true) => return Err(FsError::IsDir),
                (true, true) if self.store.has_live_children(&path)? => {
                    return Err(FsError::NotEmpty);
                }
                _ => {}
            }
            let now = Timestamp::now();
            let tomb = Entry::new(NO_INO, entry.record.tombstone(self.node(), now));
            released = self.write_announced(
                vec![
                    Change::Put(path, tomb),
                    Self::touch_dir(&dir, &dir_entry, now),
                ],
                1,
            )?;
            self.mark_unlinked(&entry);
            self.gc(released);
            self.prune_implicit(dir, &mut inval)?;
        }
        self.invalidate(inval);
        Ok(())
    }

    fn rename(
        &self,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: RenameFlags,
    ) -> Result<()> {
        if flags.intersects(RenameFlags::RENAME_EXCHANGE | RenameFlags::RENAME_WHITEOUT) {
            return Err(FsError::Invalid(
                "RENAME_EXCHANGE and RENAME_WHITEOUT are not supported",
            ));
        }
        let _ns = lock(&self.ns);
        let (src_dir, src_dir_entry, src) = self.child_path(parent, name)?;
        let (dst_dir, dst_dir_entry, dst) = self.child_path(newparent, newname)?;
        let moving = self.store.get_live(&src)?.ok_or(FsError::NotFound)?;
        if src == dst {
            return Ok(());
        }
        let is_dir = moving.record.kind == FileKind::Dir;
        if is_dir && dst.is_within(&src) {
            return Err(FsError::IntoItself);
        }
        let replaced = self.store.get(&dst)?;
        if let Some(old) = replaced.as_ref().filter(|e| e.is_live()) {
            if flags.contains(RenameFlags::RENAME_NOREPLACE) {
                return Err(FsError::Exists);
            }
            match (is_dir, old.record.kind == FileKind::Dir) {
                (true, false) => return Err(FsError::NotDir),
                (false, true) => return Err(FsError::IsDir),
                (true, true) if self.store.has_live_children(&dst)? => {
                    return Err(FsError::NotEmpty);
                }
                _ => {}
            }
        }

        let now = Timestamp::now();
        let node = self.node();
        // Every live path below the source moves: a record (same inode, same
        // content) where it goes, and a tombstone where it was. All new records
        // are written before any tombstone, so a crash part-way leaves copies,
        // never losses (the store renumbers duplicated inodes on open).
        let mut changes = Vec::new();
        let mut tombstones = Vec::new();
        let moved: Vec<(RelPath, Entry)> = if is_dir {
            self.store
                .subtree(&src)?
                .into_iter()
                .filter(|(_, e)| e.is_live())
                .collect()
        } else {
            vec![(src.clone(), moving.clone())]
        };
        for (old_path, entry) in moved {
            let new_path = old_path
                .rebase(&src, &dst)
                .ok_or(FsError::BadName(btfs_core::PathError::PathTooLong))?;
            let previous = if new_path == dst {
                replaced.clone()
            } else {
                self.store.get(&new_path)?
            };
            let mut record = entry.record.next_version(node, now);
            if let Some(prev) = &previous {
                record = record.succeeding(&prev.record);
            }
            tombstones.push(Change::Put(
                old_path,
                Entry::new(NO_INO, entry.record.tombstone(node, now)),
            ));
            changes.push(Change::Put(new_path, Entry::new(entry.ino, record)));
        }
        // Children's tombstones before their directory's: a node applying
        // them in order never sees a directory delete while it has entries.
        tombstones.reverse();
        changes.extend(tombstones);
        let versioned = changes.len();
        if let Some(old) = replaced.as_ref().filter(|e| e.is_live()) {
            self.mark_unlinked(old);
        }
        // Neither parent lies in the moved set (a directory cannot move into
        // itself), so their entries read above are current.
        changes.push(Self::touch_dir(&src_dir, &src_dir_entry, now));
        if dst_dir != src_dir {
            changes.push(Self::touch_dir(&dst_dir, &dst_dir_entry, now));
        }
        let released = self.write_announced(changes, versioned)?;
        self.gc(released);
        let mut inval = replica::Inval::default();
        if src_dir != dst_dir {
            self.prune_implicit(src_dir, &mut inval)?;
        }
        drop(_ns);
        self.invalidate(inval);
        Ok(())
    }

    /// Writes `changes` and announces the new versions among them (the
    /// first `versioned`; parent-directory time updates are not versions).
    fn write_announced(&self, changes: Vec<Change>, versioned: usize) -> Result<Vec<ContentId>> {
        let mut announced = Vec::new();
        let changes = self.version_changes(changes, versioned, &mut announced)?;
        let released = self.store.write(changes)?;
        if let Some(tx) = &self.cfg.announce {
            for a in announced {
                if tx.try_send(a).is_err() {
                    self.announce_dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        Ok(released)
    }

    // ----- content -----------------------------------------------------------

    /// Opens a handle on `ino`. `open_backing` registers a passthrough backing
    /// file with the kernel (it comes from the reply being answered).
    ///
    /// The kernel fixes one I/O mode per inode while it has open files: every
    /// open of an inode in passthrough mode must use the same backing file, and
    /// passthrough and cached opens cannot mix. So the first open decides and
    /// later opens follow:
    /// * a writer gets passthrough to the inode's private staging file;
    /// * a reader gets passthrough to the object file, unless another inode
    ///   already uses that object (same content) as its backing file, in which
    ///   case it gets the cached mode;
    /// * a writer arriving at an inode whose readers use the object detaches
    ///   that file from the object store (a copy takes its place), making it
    ///   the inode's staging file, so that the object stays immutable.
    fn open_handle(
        &self,
        ino: u64,
        flags: i32,
        open_backing: &dyn Fn(&File) -> io::Result<BackingId>,
    ) -> Result<(u64, FopenFlags, Option<Arc<BackingId>>)> {
        let writable = flags & libc::O_ACCMODE != libc::O_RDONLY;
        let truncate = writable && flags & libc::O_TRUNC != 0;
        let sync_writes = writable && flags & libc::O_DSYNC != 0;
        let cell = self.pin(ino);
        let opened = (|| {
            let mut st = lock(&cell.state);
            // Read under the state lock: a commit in progress finishes first.
            let (path, entry) = self.entry_of(ino)?;
            match entry.record.kind {
                FileKind::File => {}
                FileKind::Dir => return Err(FsError::IsDir),
                FileKind::Symlink => return Err(FsError::Invalid("not a regular file")),
            }
            let content = entry.record.content.unwrap_or_else(ContentId::empty);
            // Metadata arrived from another node; its bytes did not. A writer
            // that truncates needs none of them; a reader reads them through
            // the content source; any other writer waits for all of them.
            if !truncate
                && content != ContentId::empty()
                && !self.objects.object_path(&content).exists()
            {
                let path = path
                    .as_ref()
                    .map_or_else(|| format!("inode {ino}"), |p| p.to_string());
                let (Some(source), Some(wanted)) =
                    (&self.cfg.content, Wanted::of(path, &entry.record))
                else {
                    warn!(ino, content = %content.short(), "content is not on this node and no node can send it: EIO");
                    return Err(FsError::ContentUnavailable);
                };
                if writable || st.backing.is_some() || st.staging.is_some() {
                    return Err(FsError::Fetch(Box::new((source.clone(), wanted))));
                }
                st.cached += 1;
                let fh = self.add_handle(Handle {
                    ino,
                    file: None,
                    writable,
                    sync_writes: false,
                    cached: true,
                    remote: Some(wanted),
                    arrived: OnceLock::new(),
                });
                // Direct IO: the bytes already sit in the page cache of the
                // file librqbit writes; a second copy in this inode's cache
                // doubled the memory and cost a quarter of the throughput of a
                // whole-file read. Still counted as `cached`: a shared mmap
                // puts the inode in caching mode (FUSE_DIRECT_IO_ALLOW_MMAP),
                // so no passthrough open may join it meanwhile.
                return Ok((fh, FopenFlags::FOPEN_DIRECT_IO, None));
            }
            if let (false, Some(source)) = (writable, &self.cfg.content) {
                source.opened(&content);
            }
            let mut passthrough = st.backing.is_some()
                || (st.cached == 0
                    && self.passthrough.load(Ordering::Relaxed)
                    && (writable
                        || st.staging.is_some()
                        || !lock(&self.backed_objects).contains_key(&content)));
            if writable {
                if st.staging.is_none() {
                    st.base = Some((entry.record.version.clone(), entry.record.content));
                }
                self.ensure_staging(&cell, &mut st, content, truncate)?;
                if sync_writes {
                    // Every write is acknowledged as durable: the staging
                    // file must survive a crash from the first one on.
                    self.sync_staging(ino, &mut st, flags & libc::O_SYNC != libc::O_SYNC)?;
                    // The file's own record too (a create just before).
                    self.store.flush()?;
                }
            }
            if passthrough && st.backing.is_none() {
                let (file, target) = match &st.staging {
                    Some(s) => (s.file.clone(), Target::Staging),
                    None => (
                        Arc::new(self.objects.open_object_rw(&content)?),
                        Target::Object(content),
                    ),
                };
                match open_backing(&file) {
                    Ok(id) => {
                        if target == Target::Object(content) {
                            *lock(&self.backed_objects).entry(content).or_default() += 1;
                        }
                        st.backing = Some((target, Arc::new(id)));
                    }
                    Err(e) => {
                        debug!(ino, "passthrough refused, serving data here: {e}");
                        passthrough = false;
                    }
                }
            }
            let backing = if passthrough {
                st.backing.as_ref().map(|(_, id)| id.clone())
            } else {
                None
            };
            let mut fopen = FopenFlags::empty();
            let file = match (&st.staging, writable) {
                (Some(s), true) => s.file.clone(),
                _ => Arc::new(self.objects.open_object(&content)?),
            };
            let cached = backing.is_none();
            if cached {
                st.cached += 1;
                let changed = lock(&self.stale_cache).remove(&ino);
                if !changed && st.staging.is_none() {
                    fopen |= FopenFlags::FOPEN_KEEP_CACHE;
                }
            } else if writable {
                // The kernel's page cache does not see passthrough writes.
                lock(&self.stale_cache).insert(ino);
            }
            if writable {
                st.writers += 1;
            }
            let fh = self.add_handle(Handle {
                ino,
                file: Some(file),
                writable,
                sync_writes,
                cached,
                remote: None,
                arrived: OnceLock::new(),
            });
            Ok((fh, fopen, backing))
        })();
        if opened.is_err() {
            self.unpin(ino);
        }
        opened
    }

    /// Gives the inode a staging file for a writer: a copy of `content` (or an
    /// empty file), or, when passthrough readers use the object file, that
    /// very file detached from the object store.
    fn ensure_staging(
        &self,
        cell: &InodeCell,
        st: &mut OpenInode,
        content: ContentId,
        truncate: bool,
    ) -> Result<()> {
        if st.staging.is_none() {
            let staging = match &mut st.backing {
                Some((target @ Target::Object(_), _)) => {
                    let detached = {
                        let _ns = lock(&self.ns);
                        self.objects.detach(&content)?
                    };
                    *target = Target::Staging;
                    self.unback_object(&content);
                    detached
                }
                _ => self.objects.new_staging((!truncate).then_some(&content))?,
            };
            *cell.current.write().unwrap_or_else(|p| p.into_inner()) = Some(staging.file.clone());
            st.staging = Some(staging);
        }
        if truncate && let Some(s) = &st.staging {
            s.file.set_len(0)?;
        }
        st.uncommitted = true;
        Ok(())
    }

    /// Closes handle `fh`. A writer's release goes to the commit workers, so
    /// that hashing a large file never occupies a dispatch thread; when their
    /// queue is full it runs here (backpressure on the closing application).
    fn release(self: &Arc<Self>, fh: u64) -> Result<()> {
        let handle = lock(&self.handles).remove(&fh).ok_or(FsError::BadHandle)?;
        if handle.writable {
            let queue = lock(&self.commit_queue).clone();
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
        if let Some(cell) = self.cell(ino) {
            let mut st = lock(&cell.state);
            if handle.cached {
                st.cached -= 1;
            }
            if handle.writable {
                st.writers -= 1;
                if st.writers == 0 {
                    // Other handles (readers) still open besides this one?
                    let shared = cell.pins.load(Ordering::SeqCst) > 1;
                    if let Err(e) = self.commit(ino, &mut st, shared) {
                        self.commit_failures.fetch_add(1, Ordering::Relaxed);
                        error!(ino, "could not commit the new version of a file: {e}");
                    }
                }
            }
        }
        drop(handle);
        self.unpin(ino);
    }

    /// Starts the commit workers.
    fn start_committers(self: &Arc<Self>) -> io::Result<()> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Arc<Handle>>(COMMIT_QUEUE);
        let rx = Arc::new(Mutex::new(rx));
        let mut workers = lock(&self.commit_workers);
        for i in 0..COMMIT_WORKERS {
            let (shared, rx) = (self.clone(), rx.clone());
            workers.push(
                std::thread::Builder::new()
                    .name(format!("btfs-commit-{i}"))
                    .spawn(move || {
                        loop {
                            let next = lock(&rx).recv();
                            match next {
                                Ok(handle) => shared.finish_release(handle),
                                Err(_) => return, // queue closed and drained
                            }
                        }
                    })?,
            );
        }
        *lock(&self.commit_queue) = Some(tx);
        Ok(())
    }

    /// Closes the commit queue and waits until every queued commit is done.
    fn stop_committers(&self) {
        lock(&self.commit_queue).take();
        let workers = std::mem::take(&mut *lock(&self.commit_workers));
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
    fn commit(&self, ino: u64, st: &mut OpenInode, shared: bool) -> Result<()> {
        let installed = self.commit_staging(ino, st, shared)?;
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
        let resurrect = match lock(&self.orphans).get(&ino) {
            None => None,
            Some(orphan) => match lock(&self.remote_replaced).get(&ino) {
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
        let keep_private = shared && st.backing.is_some();
        let meta = staging.file.metadata()?;
        let content = match hash_file(&staging.path, meta.len()) {
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
            self.publish(ino, &content, &staging.path, meta.len())
        };
        let _ns = lock(&self.ns);
        let durable = st.sync_on_commit;
        let installed = if keep_private {
            self.objects.install_copy(&staging.path, &content, durable)
        } else {
            self.objects.install(&staging.path, &content, durable)
        };
        let installed_from = if keep_private {
            st.staging = Some(staging);
            None
        } else {
            // The file is an object now: a later open must not reuse it as its
            // backing file (a writer would write into the object).
            st.backing = None;
            Some(staging.path)
        };
        installed?;
        let me = self.node();
        if let Some((path, orphan)) = resurrect {
            let (base, base_content) = st.base.clone().unwrap_or_default();
            if base_content == Some(content) {
                // Opened for writing but unchanged: the remote version stands.
                self.gc(vec![content]);
                return Ok(installed_from);
            }
            let mut record = orphan.record.next_version(me, Timestamp::now());
            record.torrent = torrent;
            record.content = Some(content);
            record.size = meta.len();
            record.mtime = Timestamp::from(meta.modified()?);
            drop(_ns);
            lock(&self.remote_replaced).remove(&ino);
            warn!(%path, "another node removed or replaced this file while it was open for writing here: the write is kept as a concurrent version");
            return self
                .commit_concurrent(path, record, (&base, base_content), &orphan.record)
                .map(|()| installed_from);
        }
        let Some((path, entry)) = self.store.get_ino(ino)? else {
            // Removed while we hashed: nothing may reference the object.
            debug!(ino, "commit: the inode is gone");
            self.gc(vec![content]);
            return Ok(installed_from);
        };
        let mtime = Timestamp::from(meta.modified()?);
        let r = &entry.record;
        if r.content == Some(content) && r.size == meta.len() && r.mtime == mtime {
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
            return self
                .commit_concurrent(path, record, (&base, base_content), &current)
                .map(|()| installed_from);
        }
        let released = self.write_announced(vec![Change::Put(path, Entry::new(ino, record))], 1)?;
        drop(_ns);
        if st.sync_on_commit {
            // Durable before it is counted: `btfs status` may be read, and
            // the daemon killed, the moment the counter moves.
            self.store.flush()?;
            st.sync_on_commit = false;
        }
        self.gc(released);
        self.commits.fetch_add(1, Ordering::Relaxed);
        Ok(installed_from)
    }

    /// Makes committed content available to other nodes: its swarm, or
    /// `None` (no content source, empty content, or a failure, logged: the
    /// version stands, and other nodes cannot read it until it is written
    /// again).
    fn publish(&self, ino: u64, content: &ContentId, file: &Path, size: u64) -> Option<InfoHash> {
        let source = self.cfg.content.as_ref()?;
        if size == 0 {
            return None;
        }
        match source.publish(content, file, size) {
            Ok(t) => t,
            Err(e) => {
                error!(ino, content = %content.short(), "could not publish new content for other nodes: {e}");
                None
            }
        }
    }

    fn add_handle(&self, h: Handle) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        lock(&self.handles).insert(fh, Arc::new(h));
        fh
    }

    fn handle(&self, fh: u64) -> Result<Arc<Handle>> {
        lock(&self.handles)
            .get(&fh)
            .cloned()
            .ok_or(FsError::BadHandle)
    }

    fn read(&self, fh: u64, offset: u64, size: u32) -> Result<ReadFrom> {
        let h = self.handle(fh)?;
        // A reader opened before a writer reads the writer's file from then on.
        let current = self
            .cell(h.ino)
            .and_then(|c| c.current.read().unwrap_or_else(|p| p.into_inner()).clone());
        let file = match (&current, &h.file, &h.remote) {
            (Some(f), _, _) | (None, Some(f), _) => f,
            (None, None, Some(wanted)) => match h.arrived.get() {
                Some(f) => f,
                None => match self.objects.open_object(&wanted.content) {
                    // Fetched meanwhile (by this reader or another): kept
                    // for this handle's later reads.
                    Ok(f) => h.arrived.get_or_init(|| Arc::new(f)),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        let source = self
                            .cfg
                            .content
                            .clone()
                            .ok_or(FsError::ContentUnavailable)?;
                        return Ok(ReadFrom::Remote(source, wanted.clone()));
                    }
                    Err(e) => return Err(e.into()),
                },
            },
            (None, None, None) => return Err(FsError::BadHandle),
        };
        let mut buf = vec![0u8; size as usize];
        let mut filled = 0;
        while filled < buf.len() {
            match file.read_at(&mut buf[filled..], offset + filled as u64) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        buf.truncate(filled);
        Ok(ReadFrom::Here(buf))
    }

    fn write(&self, fh: u64, offset: u64, data: &[u8]) -> Result<u32> {
        let h = self.handle(fh)?;
        if !h.writable {
            return Err(FsError::BadHandle);
        }
        let file = h.file.as_ref().ok_or(FsError::BadHandle)?;
        file.write_all_at(data, offset)?;
        if h.sync_writes {
            file.sync_data()?;
        }
        Ok(data.len() as u32)
    }

    fn setattr(&self, ino: u64, changes: AttrChanges) -> Result<FileAttr> {
        let now = SystemTime::now();
        // Content-side changes first, on the staging file, outside `ns`.
        if let Some(size) = changes.size {
            self.truncate(ino, size)?;
        }
        let mtime = changes.mtime.map(|t| resolve_time(t, now));
        let atime = changes.atime.map(|t| resolve_time(t, now));
        if (mtime.is_some() || atime.is_some())
            && let Some(cell) = self.cell(ino)
            && let Some(s) = &lock(&cell.state).staging
        {
            let mut times = std::fs::FileTimes::new();
            if let Some(m) = mtime {
                times = times.set_modified(m);
            }
            if let Some(a) = atime {
                times = times.set_accessed(a);
            }
            s.file.set_times(times)?;
        }
        let kills_setid = |e: &Entry| e.record.mode & (libc::S_ISUID | libc::S_ISGID) != 0;
        if changes.is_metadata_only_noop()
            && !(changes.size.is_some()
                && changes.caller_uid != 0
                && self.entry_of(ino).is_ok_and(|(_, e)| kills_setid(&e)))
        {
            return self.getattr(ino);
        }
        {
            let _ns = lock(&self.ns);
            let (path, entry) = self.entry_of(ino)?;
            let mut record = entry.record.next_version(self.node(), Timestamp::from(now));
            if let Some(mode) = changes.mode {
                record.mode = mode & 0o7777;
            }
            if let Some(uid) = changes.uid {
                record.uid = uid;
            }
            if let Some(gid) = changes.gid {
                record.gid = gid;
            }
            // The kernel leaves killing set-id bits to us (FUSE_HANDLE_KILLPRIV),
            // saving a GETATTR round trip on every chown: do what Linux does.
            let chown = changes.uid.is_some() || changes.gid.is_some();
            let truncate_unprivileged = changes.size.is_some() && changes.caller_uid != 0;
            if record.kind == FileKind::File
                && changes.mode.is_none()
                && (chown || truncate_unprivileged)
            {
                record.mode &= !libc::S_ISUID;
                if record.mode & libc::S_IXGRP != 0 {
                    record.mode &= !libc::S_ISGID;
                }
            }
            if let Some(m) = mtime {
                record.mtime = m.into();
            }
            if let Some(a) = atime {
                record.atime = a.into();
            }
            let entry = Entry::new(ino, record);
            match path {
                Some(path) => {
                    self.write_announced(vec![Change::Put(path, entry)], 1)?;
                }
                None => self.mark_unlinked(&entry),
            }
        }
        self.getattr(ino)
    }

    /// An unprivileged writer opens a set-user-ID or set-group-ID file: the
    /// bits go now, as Linux clears them on such a write (with passthrough
    /// the daemon never sees the writes themselves). A set-group-ID bit
    /// without group execute (mandatory locking) stays, as on Linux.
    fn kill_setid_for_writer(&self, ino: u64, caller_uid: u32) -> Result<()> {
        let (_, entry) = self.entry_of(ino)?;
        let mode = entry.record.mode;
        let mut kept = mode & !libc::S_ISUID;
        if mode & libc::S_IXGRP != 0 {
            kept &= !libc::S_ISGID;
        }
        if entry.record.kind != FileKind::File || kept == mode {
            return Ok(());
        }
        self.setattr(
            ino,
            AttrChanges {
                caller_uid,
                mode: Some(kept),
                uid: None,
                gid: None,
                size: None,
                atime: None,
                mtime: None,
                ctime: None,
            },
        )
        .map(drop)
    }

    /// Sets the length of `ino`: on the staging file if it is open for writing,
    /// else as a new committed version.
    fn truncate(&self, ino: u64, size: u64) -> Result<()> {
        let (_, entry) = self.entry_of(ino)?;
        match entry.record.kind {
            FileKind::File => {}
            FileKind::Dir => return Err(FsError::IsDir),
            FileKind::Symlink => return Err(FsError::Invalid("not a regular file")),
        }
        self.with_state(ino, |st| {
            if let Some(s) = &st.staging {
                s.file.set_len(size)?;
                // Without a writer (a clean private copy kept for readers, or a
                // release still queued) nobody else will commit this change.
                if st.writers == 0 {
                    self.commit(ino, st, true)?;
                }
                return Ok(());
            }
            // Re-read under the state lock: a commit may have finished meanwhile.
            let (_, current) = self.entry_of(ino)?;
            let from = if size == 0 {
                None
            } else {
                current.record.content
            };
            let staging = self.objects.new_staging(from.as_ref())?;
            staging.file.set_len(size)?;
            st.staging = Some(staging);
            st.base = Some((current.record.version.clone(), current.record.content));
            self.commit(ino, st, true)?;
            // Any page cache of the old content is stale now.
            lock(&self.stale_cache).insert(ino);
            Ok(())
        })
    }

    fn opendir(&self, ino: u64) -> Result<u64> {
        let (path, entry) = self.dir_path(ino)?;
        let parent_ino = match path.parent() {
            Some(p) => self.store.get_live(&p)?.map_or(ROOT_INO, |e| e.ino),
            None => ROOT_INO,
        };
        let mut items = vec![
            DirItem {
                ino: entry.ino,
                kind: FileType::Directory,
                name: ".".into(),
            },
            DirItem {
                ino: parent_ino,
                kind: FileType::Directory,
                name: "..".into(),
            },
        ];
        items.extend(
            self.store
                .live_children(&path)?
                .into_iter()
                .map(|(name, e)| DirItem {
                    ino: e.ino,
                    kind: file_type(e.record.kind),
                    name,
                }),
        );
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        lock(&self.dirs).insert(fh, Arc::new(items));
        Ok(fh)
    }

    fn dir_items(&self, fh: u64) -> Result<Arc<Vec<DirItem>>> {
        lock(&self.dirs).get(&fh).cloned().ok_or(FsError::BadHandle)
    }

    fn statfs(&self) -> Result<nix::sys::statvfs::Statvfs> {
        nix::sys::statvfs::statvfs(&self.cfg.state_dir).map_err(|e| FsError::Io(e.into()))
    }

    /// Flushes a writer's staging data and the metadata store. The version
    /// being written is committed when its last writer closes; that commit
    /// is then made durable before it completes.
    fn fsync(&self, fh: Option<u64>, datasync: bool) -> Result<()> {
        if let Some(fh) = fh {
            let h = self.handle(fh)?;
            if h.writable
                && let Some(cell) = self.cell(h.ino)
            {
                self.sync_staging(h.ino, &mut lock(&cell.state), datasync)?;
            }
        }
        self.store.flush()?;
        Ok(())
    }

    /// Puts the inode's staging file on disk with a sync marker, so that its
    /// bytes survive a crash even while the file stays open (they are
    /// committed at the next start), and makes its next commit durable.
    fn sync_staging(&self, ino: u64, st: &mut OpenInode, datasync: bool) -> Result<()> {
        if let Some(staging) = &st.staging {
            self.objects.mark_synced(staging, ino, datasync)?;
            st.sync_on_commit = true;
        }
        Ok(())
    }
}

/// Kernel attributes of an entry; `staging` is the open staging file, whose
/// size and times are newer than the record's.
fn build_attr(entry: &Entry, unlinked: bool, staging: Option<&Metadata>) -> Result<FileAttr> {
    let r = &entry.record;
    let mut size = r.size;
    let mut blocks = size.div_ceil(512);
    let mut mtime = r.mtime.to_system_time();
    let mut ctime = r.ctime.to_system_time();
    if let (FileKind::File, Some(meta)) = (r.kind, staging) {
        size = meta.len();
        blocks = meta.blocks();
        mtime = meta.modified()?;
        let staged_ctime = Timestamp {
            secs: meta.ctime(),
            nanos: meta.ctime_nsec() as u32,
        };
        ctime = ctime.max(staged_ctime.to_system_time());
    }
    Ok(FileAttr {
        ino: INodeNo(entry.ino),
        size,
        blocks,
        atime: r.atime.to_system_time(),
        mtime,
        ctime,
        crtime: r.ctime.to_system_time(),
        kind: file_type(r.kind),
        perm: (r.mode & 0o7777) as u16,
        nlink: match (unlinked, r.kind) {
            (true, _) => 0,
            (false, FileKind::Dir) => 2,
            (false, _) => 1,
        },
        uid: r.uid,
        gid: r.gid,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    })
}

/// The attribute changes of one `setattr` call.
#[derive(Debug, Default)]
struct AttrChanges {
    /// Who asks (set-id bits survive a truncate by root).
    caller_uid: u32,
    mode: Option<u32>,
    uid: Option<u32>,
    gid: Option<u32>,
    size: Option<u64>,
    atime: Option<TimeOrNow>,
    mtime: Option<TimeOrNow>,
    ctime: Option<SystemTime>,
}

impl AttrChanges {
    fn is_metadata_only_noop(&self) -> bool {
        self.mode.is_none()
            && self.uid.is_none()
            && self.gid.is_none()
            && self.atime.is_none()
            && self.mtime.is_none()
            && self.ctime.is_none()
    }
}

impl<B: Backend> BtfsFs<B> {
    /// Creates the entry that `make` builds in `parent` and answers the
    /// kernel with its attributes (mkdir, mknod, symlink).
    fn create_and_reply(
        &self,
        op: &str,
        parent: INodeNo,
        name: &OsStr,
        reply: ReplyEntry,
        make: impl FnOnce(&Entry, NodeId, Timestamp) -> FileRecord,
    ) {
        let s = &self.shared;
        let result = s
            .create_entry(parent.0, name, |dir| make(dir, s.node(), Timestamp::now()))
            .and_then(|e| build_attr(&e, false, None));
        match result {
            Ok(attr) => reply.entry(&s.cfg.ttl, &attr, Generation(0)),
            Err(e) => reply.error(fail(op, &e)),
        }
    }
}

/// Logs a failed operation at a level that fits its errno.
fn fail(op: &str, e: &FsError) -> Errno {
    let code = errno(e);
    match e {
        FsError::Io(_) | FsError::Store(_) | FsError::Stale | FsError::ContentUnavailable => {
            error!("{op}: {e}")
        }
        FsError::Unsupported(_) | FsError::NotSupported(_) => info!("{op}: {e}"),
        _ => debug!("{op}: {e}"),
    }
    code
}

impl<B: Backend> fuser::Filesystem for BtfsFs<B> {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        let wanted = InitFlags::FUSE_ATOMIC_O_TRUNC
            | InitFlags::FUSE_DO_READDIRPLUS
            | InitFlags::FUSE_READDIRPLUS_AUTO
            | InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_AUTO_INVAL_DATA
            | InitFlags::FUSE_EXPORT_SUPPORT
            | InitFlags::FUSE_HANDLE_KILLPRIV;
        if let Err(missing) = config.add_capabilities(wanted) {
            debug!(?missing, "kernel lacks some optional capabilities");
        }
        // Asked alone: `add_capabilities` adds nothing of a set the kernel
        // lacks a part of. Without it (kernels before 6.6) a shared mmap of a
        // file still being fetched fails with ENODEV; private ones work.
        if config
            .add_capabilities(InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP)
            .is_err()
        {
            debug!("kernel cannot mmap direct-IO files shared");
        }
        let s = &self.shared;
        if s.cfg.passthrough {
            let granted = config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
                && config.set_max_stack_depth(1).is_ok();
            s.passthrough.store(granted, Ordering::Relaxed);
            if !granted {
                warn!("kernel refused FUSE passthrough; file data will be served by the daemon");
            }
        }
        info!(
            passthrough = s.passthrough.load(Ordering::Relaxed),
            "filesystem initialised"
        );
        Ok(())
    }

    fn destroy(&mut self) {
        self.shared.stop_committers();
        if let Err(e) = self
            .shared
            .collect_garbage()
            .and_then(|_| Ok(self.shared.store.flush()?))
        {
            error!("could not flush the metadata store: {e}");
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, _nlookup: u64) {
        self.shared.forget(ino.0);
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.shared.lookup(parent.0, name) {
            Ok(attr) => reply.entry(&self.shared.cfg.ttl, &attr, Generation(0)),
            Err(e) => reply.error(fail("lookup", &e)),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.shared.getattr(ino.0) {
            Ok(attr) => reply.attr(&self.shared.cfg.ttl, &attr),
            Err(e) => reply.error(fail("getattr", &e)),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let changes = AttrChanges {
            caller_uid: req.uid(),
            mode,
            uid,
            gid,
            size,
            atime,
            mtime,
            ctime,
        };
        match self.shared.setattr(ino.0, changes) {
            Ok(attr) => reply.attr(&self.shared.cfg.ttl, &attr),
            Err(e) => reply.error(fail("setattr", &e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.shared.entry_of(ino.0) {
            Ok((_, e)) => match &e.record.target {
                Some(t) => reply.data(t.as_bytes()),
                None => reply.error(Errno::EINVAL),
            },
            Err(e) => reply.error(fail("readlink", &e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        if mode & libc::S_IFMT != libc::S_IFREG && mode & libc::S_IFMT != 0 {
            let e = FsError::Unsupported("device nodes, FIFOs and sockets");
            return reply.error(fail("mknod", &e));
        }
        self.create_and_reply("mknod", parent, name, reply, |dir, node, now| {
            FileRecord::new_file(
                Shared::<B>::owner_in(req, dir, mode, umask, false),
                node,
                now,
            )
        });
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        self.create_and_reply("mkdir", parent, name, reply, |dir, node, now| {
            FileRecord::new_dir(
                Shared::<B>::owner_in(req, dir, mode, umask, true),
                node,
                now,
            )
        });
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.shared.remove_entry(parent.0, name, false) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(fail("unlink", &e)),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.shared.remove_entry(parent.0, name, true) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(fail("rmdir", &e)),
        }
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let target = match target.to_str() {
            None => Err(FsError::BadName(btfs_core::PathError::NotUtf8)),
            Some(t) if t.len() > btfs_core::MAX_PATH_LEN => {
                Err(FsError::BadName(btfs_core::PathError::PathTooLong))
            }
            Some(t) => Ok(t.to_owned()),
        };
        match target {
            Ok(t) => {
                self.create_and_reply("symlink", parent, link_name, reply, |dir, node, now| {
                    let mut owner = Shared::<B>::owner_in(req, dir, 0o777, 0, false);
                    owner.mode = 0o777;
                    FileRecord::new_symlink(t, owner, node, now)
                })
            }
            Err(e) => reply.error(fail("symlink", &e)),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        match self
            .shared
            .rename(parent.0, name, newparent.0, newname, flags)
        {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(fail("rename", &e)),
        }
    }

    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _newparent: INodeNo,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        reply.error(fail("link", &FsError::Unsupported("hard links")));
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let s = &self.shared;
        if flags.0 & libc::O_ACCMODE != libc::O_RDONLY
            && req.uid() != 0
            && let Err(e) = s.kill_setid_for_writer(ino.0, req.uid())
        {
            return reply.error(fail("open", &e));
        }
        let result = s.open_handle(ino.0, flags.0, &|f| reply.open_backing(f));
        match result {
            Err(FsError::Fetch(fetch)) => {
                // A writer of content held elsewhere: open once it is here.
                let (source, wanted) = *fetch;
                let s = s.clone();
                let path = wanted.path.clone();
                source.fetch(
                    wanted,
                    Box::new(move |fetched| {
                        let opened = fetched.map_err(FsError::Io).and_then(|()| {
                            s.open_handle(ino.0, flags.0, &|f| reply.open_backing(f))
                        });
                        match opened {
                            Ok((fh, fopen, Some(b))) => {
                                reply.opened_passthrough(FileHandle(fh), fopen, &b)
                            }
                            Ok((fh, fopen, None)) => reply.opened(FileHandle(fh), fopen),
                            Err(e) => {
                                warn!(%path, "open for writing after fetching failed: {e}");
                                reply.error(fail("open", &e))
                            }
                        }
                    }),
                );
            }
            Ok((fh, fopen, Some(backing))) => {
                reply.opened_passthrough(FileHandle(fh), fopen, &backing)
            }
            Ok((fh, fopen, None)) => reply.opened(FileHandle(fh), fopen),
            Err(e) => reply.error(fail("open", &e)),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let s = &self.shared;
        let result = s
            .create_entry(parent.0, name, |dir| {
                FileRecord::new_file(
                    Shared::<B>::owner_in(req, dir, mode, umask, false),
                    s.node(),
                    Timestamp::now(),
                )
            })
            .and_then(|entry| {
                // A new file is empty: truncating skips copying the empty object.
                let opened =
                    s.open_handle(entry.ino, flags | libc::O_TRUNC, &|f| reply.open_backing(f))?;
                Ok((build_attr(&entry, false, None)?, opened))
            });
        let ttl = s.cfg.ttl;
        match result {
            Ok((attr, (fh, fopen, Some(b)))) => {
                reply.created_passthrough(&ttl, &attr, Generation(0), FileHandle(fh), fopen, &b)
            }
            Ok((attr, (fh, fopen, None))) => {
                reply.created(&ttl, &attr, Generation(0), FileHandle(fh), fopen)
            }
            Err(e) => reply.error(fail("create", &e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.shared.read(fh.0, offset, size) {
            Ok(ReadFrom::Here(data)) => reply.data(&data),
            Ok(ReadFrom::Remote(source, wanted)) => source.read(
                wanted,
                offset,
                size,
                Box::new(move |r| match r {
                    Ok(data) => reply.data(&data),
                    Err(e) => reply.error(errno(&FsError::Io(e))),
                }),
            ),
            Err(e) => reply.error(fail("read", &e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.shared.write(fh.0, offset, data) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(fail("write", &e)),
        }
    }

    /// Nothing happens at close(2) that could fail: versions are committed at
    /// release, which the kernel does not report to the application. Answering
    /// ENOSYS once makes the kernel stop sending FLUSH, saving a round trip on
    /// every close.
    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        match self.shared.release(fh.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(fail("release", &e)),
        }
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.shared.fsync(Some(fh.0), datasync) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(fail("fsync", &e)),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.shared.opendir(ino.0) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(fail("opendir", &e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        match self.shared.dir_items(fh.0) {
            Ok(items) => {
                for (i, item) in items.iter().enumerate().skip(offset as usize) {
                    if reply.add(INodeNo(item.ino), (i + 1) as u64, item.kind, &item.name) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(fail("readdir", &e)),
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let s = &self.shared;
        let items = match s.dir_items(fh.0) {
            Ok(items) => items,
            Err(e) => return reply.error(fail("readdirplus", &e)),
        };
        for (i, item) in items.iter().enumerate().skip(offset as usize) {
            // Entries that vanished since opendir are skipped, not failed.
            let Ok(attr) = s.getattr(item.ino) else {
                continue;
            };
            if reply.add(
                INodeNo(item.ino),
                (i + 1) as u64,
                &item.name,
                &s.cfg.ttl,
                &attr,
                Generation(0),
            ) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        lock(&self.shared.dirs).remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.shared.fsync(None, datasync) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(fail("fsyncdir", &e)),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.shared.statfs() {
            Ok(st) => reply.statfs(
                st.blocks(),
                st.blocks_free(),
                st.blocks_available(),
                st.files(),
                st.files_free(),
                st.block_size() as u32,
                btfs_core::MAX_NAME_LEN as u32,
                st.fragment_size() as u32,
            ),
            Err(e) => reply.error(fail("statfs", &e)),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let result = self.shared.handle(fh.0).and_then(|h| {
            if !h.writable {
                return Err(FsError::BadHandle);
            }
            let flags = nix::fcntl::FallocateFlags::from_bits_truncate(mode);
            let (off, len) = (
                i64::try_from(offset).map_err(|_| FsError::Invalid("offset too large"))?,
                i64::try_from(length).map_err(|_| FsError::Invalid("length too large"))?,
            );
            let file = h.file.as_ref().ok_or(FsError::BadHandle)?;
            nix::fcntl::fallocate(&**file, flags, off, len).map_err(|e| FsError::Io(e.into()))
        });
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(fail("fallocate", &e)),
        }
    }
}
