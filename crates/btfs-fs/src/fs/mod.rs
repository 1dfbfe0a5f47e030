//! The `fuser::Filesystem` implementation: the [`BtfsFs`] handed to fuser,
//! the [`FsHandle`] the daemon keeps, and the state they share.
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
//!
//! # Modules
//! * `inodes`: the table of open inodes, orphans and garbage collection;
//! * `handles`: open file and directory handles, reads and writes;
//! * `commit`: the commit workers and the staging-to-object pipeline;
//! * `namespace`: lookups, creates, removes and renames;
//! * `attrs`: attributes (`getattr`, `setattr`, truncation);
//! * `ops` and `reply`: the fuser `Filesystem` impl and its answers;
//! * `status`: what `btfs status` reports;
//! * `replica`: versions from and for other nodes.

use std::{
    io,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64},
        mpsc::SyncSender,
    },
    time::{Duration, SystemTime},
};

use btfs_core::{FileRecord, NodeId, Owner, RelPath, Timestamp};
use btfs_store::{Backend, Change, Entry, ROOT_INO, Store};
use parking_lot::Mutex;
use tracing::warn;

mod attrs;
mod commit;
mod handles;
mod history;
mod inodes;
mod namespace;
mod ops;
mod ranged;
mod replica;
mod reply;
mod status;

pub use replica::{Announced, Applied};
pub use status::FsStatus;

pub use crate::error::SignError;
use crate::{content::ContentSource, error::Result, objects::ObjectStore};

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
    /// on a node without a mesh). When it is full the announcement is not
    /// sent but noted as a backlog ([`FsHandle::take_announce_backlog`]):
    /// the announcer reads it back from the store's log, at its own pace.
    pub announce: Option<tokio::sync::mpsc::Sender<Announced>>,
    /// Signs new local versions as this node (`None`: unsigned, no mesh).
    pub signer: Option<Signer>,
    /// Where content held by other nodes comes from (`None`: nowhere, reads
    /// of such content fail with EIO).
    pub content: Option<Arc<dyn ContentSource>>,
    /// `history=`: superseded and deleted versions keep their content (the
    /// window is the caller's, see [`FsHandle::collect_history`]).
    pub history: bool,
    /// FUSE operation latency, by operation (`metrics=`; `None`: not
    /// timed).
    pub metrics: Option<Arc<btfs_metrics::FsMetrics>>,
}

/// Signs a record at a path as this node.
pub type SignFn =
    dyn Fn(&RelPath, &FileRecord) -> std::result::Result<Vec<u8>, SignError> + Send + Sync;

/// Signs new local versions as this node (see [`SignFn`]); a failure is
/// logged with its causes and the version goes out unsigned.
#[derive(Clone)]
pub struct Signer(pub Arc<SignFn>);

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Signer")
    }
}

/// Invalidations waiting for the kernel.
const INVAL_QUEUE: usize = 4096;

/// State shared by the dispatch threads and the daemon (for status).
#[derive(Debug)]
struct Shared<B> {
    store: Arc<Store<B>>,
    objects: ObjectStore,
    cfg: FsConfig,
    ns: Mutex<()>,
    /// Open inodes, orphans and the per-inode sets (see [`inodes`]).
    inodes: inodes::Inodes,
    /// Open file and directory handles (see [`handles`]).
    handles: handles::Handles,
    /// The commit workers and their counters (see [`commit`]).
    committer: commit::Committer,
    /// Objects released by store writes, deleted once those writes are durable.
    pending_gc: Mutex<Vec<btfs_core::ContentId>>,
    /// blake3 outboards of large objects (see [`crate::outboard`]).
    outboards: crate::outboard::Outboards,
    /// Objects superseded by a remote version not here yet, offered to the
    /// content source as the start of that version's fetch right after the
    /// version is applied (old content -> (old, new)). At most `MAX_SEEDS`.
    pending_seeds:
        Mutex<std::collections::HashMap<btfs_core::ContentId, (crate::Wanted, crate::Wanted)>>,
    passthrough: AtomicBool,
    /// Kernel cache invalidations, sent by their own thread once mounted.
    inval_tx: Mutex<Option<SyncSender<replica::Inval>>>,
    /// The lowest log number whose announcement did not fit in the queue
    /// (`u64::MAX`: none): the announcer catches up from the log there.
    announce_backlog: AtomicU64,
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
        store.set_history(cfg.history);
        let swept = objects.sweep(|c| store.refcount(c).map(|n| n > 0).unwrap_or(true))?;
        if swept > 0 {
            warn!(
                swept,
                "objects that no record references (left by a crash, or the metadata database was lost or replaced) were moved to {}: delete them once the tree is known to be whole",
                objects.quarantine_dir().display()
            );
        }
        let outboards = crate::outboard::Outboards::open(&cfg.state_dir)?;
        if let Err(e) = outboards.sweep(|c| objects.object_path(c).exists()) {
            warn!("could not sweep the outboards of objects no longer here: {e}");
        }
        let shared = Arc::new(Shared {
            store,
            objects,
            outboards,
            pending_seeds: Mutex::new(std::collections::HashMap::new()),
            cfg,
            ns: Mutex::new(()),
            inodes: inodes::Inodes::default(),
            handles: handles::Handles::new(),
            committer: commit::Committer::default(),
            pending_gc: Mutex::new(Vec::new()),
            passthrough: AtomicBool::new(false),
            inval_tx: Mutex::new(None),
            announce_backlog: AtomicU64::new(u64::MAX),
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

    /// Where the store's log holds versions whose announcement did not
    /// fit in the queue (the log numbers after the one returned), and
    /// forgets it: the caller announces them from the log.
    pub fn take_announce_backlog(&self) -> Option<u64> {
        match self
            .shared
            .announce_backlog
            .swap(u64::MAX, std::sync::atomic::Ordering::AcqRel)
        {
            u64::MAX => None,
            since => Some(since),
        }
    }

    /// This node's id (the author of its versions).
    pub fn node(&self) -> NodeId {
        self.shared.cfg.node
    }

    pub fn status(&self) -> Result<FsStatus> {
        self.shared.status()
    }

    /// Makes committed metadata durable (called on shutdown).
    pub fn flush(&self) -> Result<()> {
        Ok(self.shared.store.flush()?)
    }

    /// Lets the filesystem tell the kernel about changes it did not make
    /// (remote records). Set once, after mounting.
    pub fn set_notifier(&self, notifier: fuser::Notifier) -> io::Result<()> {
        let mut slot = self.shared.inval_tx.lock();
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

    /// Closes the store cleanly (see `Store::close`): the next start opens
    /// it without rebuilding its indexes. Call once at shutdown, after the
    /// last change.
    pub fn close(&self) -> Result<()> {
        Ok(self.shared.store.close()?)
    }

    /// Stores `record` at `path` as a new version made on this node, as a
    /// change through the mount would: signed, merged with what the path
    /// holds, announced. For versions made outside the mount (the lab's
    /// generator of big namespaces, tests); returns the signed version.
    pub fn commit_local(&self, path: RelPath, record: FileRecord) -> Result<btfs_store::Version> {
        self.shared.commit_local(path, record)
    }

    /// The store, for replication (its log) and status.
    /// Where the object store keeps (or would keep) `content`.
    pub fn object_path(&self, content: &btfs_core::ContentId) -> PathBuf {
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
    fn node(&self) -> NodeId {
        self.cfg.node
    }
}
