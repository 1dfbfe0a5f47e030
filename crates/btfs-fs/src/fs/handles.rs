//! Open file and directory handles: the handle table, opening a file (which
//! decides its inode's I/O mode), and the reads, writes and syncs served here.

use std::{
    collections::HashMap,
    fs::File,
    io,
    os::unix::fs::FileExt,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
};

use btfs_core::{ContentId, FileKind, RelPath};
use btfs_store::{Backend, ROOT_INO};
use fuser::{BackingId, FileType, FopenFlags};
use parking_lot::Mutex;
use tracing::{debug, warn};

use super::{
    Shared,
    attrs::file_type,
    inodes::{InodeCell, OpenInode, Target},
};
use crate::{
    content::{ContentSource, Wanted},
    error::{FsError, Result},
};

#[derive(Debug)]
pub(super) struct Handle {
    pub(super) ino: u64,
    /// For reads: the object opened; for writers: the staging file. `None`
    /// for a reader of content that other nodes hold (`remote`).
    pub(super) file: Option<Arc<File>>,
    pub(super) writable: bool,
    /// Opened `O_SYNC` or `O_DSYNC`: each write served here is synced (the
    /// kernel syncs passthrough writes itself).
    sync_writes: bool,
    pub(super) cached: bool,
    /// Content read through the content source until it arrives here.
    remote: Option<Wanted>,
    /// The object of `remote`, once it arrived.
    arrived: OnceLock<Arc<File>>,
}

/// How a read is answered.
pub(super) enum ReadFrom {
    Here(Vec<u8>),
    /// By the content source, asynchronously.
    Remote(Arc<dyn ContentSource>, Wanted),
}

#[derive(Debug)]
pub(super) struct DirItem {
    pub(super) ino: u64,
    pub(super) kind: FileType,
    pub(super) name: String,
}

/// The handle maps (lock 3 of the order in [`super`]: each held shortly).
/// File and directory handles share one numbering.
#[derive(Debug)]
pub(super) struct Handles {
    files: Mutex<HashMap<u64, Arc<Handle>>>,
    dirs: Mutex<HashMap<u64, Arc<Vec<DirItem>>>>,
    next_fh: AtomicU64,
    /// Content already handed to the source's read-ahead lately.
    read_ahead: Mutex<Recent>,
}

/// Files after an opened remote one, in name order, fetched ahead: a tree
/// being walked (`diff -r`, `cp -r`, `tar c`) reads them next, and fetching
/// a few at once hides each file's set-up (metainfo, connections) behind
/// the others'.
const READ_AHEAD_FILES: usize = 8;
/// Only files up to this size are read ahead (a walk over large files gains
/// nothing from fetching the next one whole meanwhile).
const READ_AHEAD_MAX_SIZE: u64 = 8 << 20;
/// Content ids remembered as read ahead, the oldest forgotten first.
const READ_AHEAD_REMEMBERED: usize = 4096;

/// A bounded set of recently seen content ids, oldest forgotten first.
#[derive(Debug, Default)]
struct Recent {
    set: std::collections::HashSet<ContentId>,
    order: std::collections::VecDeque<ContentId>,
}

impl Recent {
    /// Whether `c` is new (and remembers it).
    fn insert(&mut self, c: ContentId) -> bool {
        if !self.set.insert(c) {
            return false;
        }
        self.order.push_back(c);
        while self.order.len() > READ_AHEAD_REMEMBERED {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        true
    }
}

impl Handles {
    pub(super) fn new() -> Self {
        Self {
            files: Mutex::new(HashMap::new()),
            dirs: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            read_ahead: Mutex::new(Recent::default()),
        }
    }

    fn add(&self, h: Handle) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.files.lock().insert(fh, Arc::new(h));
        fh
    }

    pub(super) fn get(&self, fh: u64) -> Result<Arc<Handle>> {
        self.files
            .lock()
            .get(&fh)
            .cloned()
            .ok_or(FsError::BadHandle)
    }

    pub(super) fn remove(&self, fh: u64) -> Result<Arc<Handle>> {
        self.files.lock().remove(&fh).ok_or(FsError::BadHandle)
    }

    /// Open file handles.
    pub(super) fn len(&self) -> usize {
        self.files.lock().len()
    }

    fn add_dir(&self, items: Vec<DirItem>) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.dirs.lock().insert(fh, Arc::new(items));
        fh
    }

    pub(super) fn dir_items(&self, fh: u64) -> Result<Arc<Vec<DirItem>>> {
        self.dirs.lock().get(&fh).cloned().ok_or(FsError::BadHandle)
    }

    pub(super) fn remove_dir(&self, fh: u64) {
        self.dirs.lock().remove(&fh);
    }
}

impl<B: Backend> Shared<B> {
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
    pub(super) fn open_handle(
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
            let mut st = cell.state.lock();
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
                if let (Some(p), Some(source)) = (&path, &self.cfg.content) {
                    self.read_ahead(p, source);
                }
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
                let fh = self.handles.add(Handle {
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
            if writable {
                if st.staging.is_none() {
                    st.base = Some((entry.record.version.clone(), entry.record.content));
                    // Not under passthrough readers: the kernel refuses an
                    // open without passthrough on an inode that has them.
                    if st.backing.is_none() && self.wants_ranged(&content, truncate, sync_writes) {
                        self.make_ranged(&cell, &mut st, content, entry.record.torrent)?;
                    }
                }
                if sync_writes {
                    // Acknowledged writes need a file a restart can commit.
                    self.materialize(&cell, &mut st)?;
                }
                match st.ranged.clone() {
                    Some(r) => {
                        if truncate {
                            r.truncate(0)?;
                        }
                        st.uncommitted = true;
                    }
                    None => self.ensure_staging(&cell, &mut st, content, truncate)?,
                }
                if sync_writes {
                    // Every write is acknowledged as durable: the staging
                    // file must survive a crash from the first one on.
                    self.sync_staging(ino, &mut st, flags & libc::O_SYNC != libc::O_SYNC)?;
                    // The file's own record too (a create just before).
                    self.store.flush()?;
                }
            }
            // A range-staged writer is served here (the daemon keeps its
            // ranges); it counts as cached, so no passthrough open joins it.
            let ranged_writer = writable && st.ranged.is_some();
            let mut passthrough = !ranged_writer
                && (st.backing.is_some()
                    || (st.cached == 0
                        && self.passthrough.load(Ordering::Relaxed)
                        && (writable
                            || st.staging.is_some()
                            || !self.inodes.backed_objects.lock().contains_key(&content))));
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
                            *self
                                .inodes
                                .backed_objects
                                .lock()
                                .entry(content)
                                .or_default() += 1;
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
            if ranged_writer {
                // No page cache of the delta's partial view: every read and
                // write of this handle comes here.
                fopen |= FopenFlags::FOPEN_DIRECT_IO;
            }
            if cached {
                st.cached += 1;
                let changed = self.inodes.stale_cache.lock().remove(&ino);
                if !changed && st.staging.is_none() {
                    fopen |= FopenFlags::FOPEN_KEEP_CACHE;
                }
            } else if writable {
                // The kernel's page cache does not see passthrough writes.
                self.inodes.stale_cache.lock().insert(ino);
            }
            if writable {
                st.writers += 1;
            }
            let fh = self.handles.add(Handle {
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
        // A staging file made empty here needs no truncation (on a
        // journalled filesystem that is a transaction per created file).
        let mut empty = false;
        if st.staging.is_none() {
            let staging = match &mut st.backing {
                Some((target @ Target::Object(_), _)) => {
                    let detached = {
                        let _ns = self.ns.lock();
                        self.objects.detach(&content)?
                    };
                    *target = Target::Staging;
                    self.inodes.unback_object(&content);
                    detached
                }
                _ => {
                    // Truncating: a new empty file, nothing copied.
                    empty = truncate;
                    self.objects.new_staging((!truncate).then_some(&content))?
                }
            };
            *cell.current.write() = Some(staging.file.clone());
            st.staging = Some(staging);
        }
        if truncate
            && !empty
            && let Some(s) = &st.staging
        {
            s.file.set_len(0)?;
        }
        st.uncommitted = true;
        Ok(())
    }

    pub(super) fn read(&self, fh: u64, offset: u64, size: u32) -> Result<ReadFrom> {
        let h = self.handles.get(fh)?;
        let cell = self.inodes.cell(h.ino);
        // Range-staged: the writes over the base.
        if let Some(r) = cell.as_ref().and_then(|c| c.ranged.read().clone()) {
            return Ok(ReadFrom::Here(r.read(offset, u64::from(size))?));
        }
        // A reader opened before a writer reads the writer's file from then on.
        let current = cell.and_then(|c| c.current.read().clone());
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

    pub(super) fn write(&self, fh: u64, offset: u64, data: &[u8]) -> Result<u32> {
        let h = self.handles.get(fh)?;
        if !h.writable {
            return Err(FsError::BadHandle);
        }
        let cell = self.inodes.cell(h.ino);
        if let Some(cell) = &cell {
            {
                let ranged = cell.ranged.read();
                if let Some(r) = ranged.as_ref()
                    && r.write(offset, data)?
                {
                    return Ok(data.len() as u32);
                }
            }
            // Too many ranges (or none): a full copy takes the writes.
            if cell.ranged.read().is_some() {
                self.materialize(cell, &mut cell.state.lock())?;
            }
        }
        // The inode's file (a range stage turned full copy replaced the one
        // this handle was opened with).
        let file = cell
            .and_then(|c| c.current.read().clone())
            .or_else(|| h.file.clone())
            .ok_or(FsError::BadHandle)?;
        file.write_all_at(data, offset)?;
        if h.sync_writes {
            file.sync_data()?;
        }
        Ok(data.len() as u32)
    }

    /// Allocates or deallocates space of a writer's file (`fallocate(2)`
    /// `mode` flags).
    pub(super) fn fallocate(&self, fh: u64, offset: u64, length: u64, mode: i32) -> Result<()> {
        let h = self.handles.get(fh)?;
        if !h.writable {
            return Err(FsError::BadHandle);
        }
        let flags = nix::fcntl::FallocateFlags::from_bits_truncate(mode);
        let (off, len) = (
            i64::try_from(offset).map_err(|_| FsError::Invalid("offset too large"))?,
            i64::try_from(length).map_err(|_| FsError::Invalid("length too large"))?,
        );
        let cell = self.inodes.cell(h.ino);
        if let Some(cell) = &cell
            && cell.ranged.read().is_some()
        {
            self.materialize(cell, &mut cell.state.lock())?;
        }
        let file = cell
            .and_then(|c| c.current.read().clone())
            .or_else(|| h.file.clone())
            .ok_or(FsError::BadHandle)?;
        nix::fcntl::fallocate(&*file, flags, off, len).map_err(|e| FsError::Io(e.into()))
    }

    /// Flushes a writer's staging data and the metadata store. The version
    /// being written is committed when its last writer closes; that commit
    /// is then made durable before it completes. Attribute changes kept for
    /// that commit (see `PendingAttrs`) are stored now, through any handle
    /// of the inode: `fsync` covers the inode's metadata too.
    pub(super) fn fsync(&self, fh: Option<u64>, datasync: bool) -> Result<()> {
        if let Some(fh) = fh {
            let h = self.handles.get(fh)?;
            if let Some(cell) = self.inodes.cell(h.ino) {
                let mut st = cell.state.lock();
                self.write_pending_attrs(h.ino, &mut st)?;
                if h.writable {
                    // A sync marker needs a file a restart can commit.
                    self.materialize(&cell, &mut st)?;
                    self.sync_staging(h.ino, &mut st, datasync)?;
                }
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

    /// Hands the source the next `READ_AHEAD_FILES` files after `path` in
    /// its directory, in name order, that are small, not here, and not
    /// handed over lately (`READ_AHEAD_FILES`). Never blocks on the
    /// network: the source queues them.
    fn read_ahead(&self, path: &RelPath, source: &Arc<dyn ContentSource>) {
        let (Some(name), dir) = (
            path.file_name(),
            path.parent().unwrap_or_else(RelPath::root),
        ) else {
            return;
        };
        let Ok(next) = self.store.children(&dir, Some(name), READ_AHEAD_FILES) else {
            return;
        };
        for (n, e) in next {
            let r = &e.record;
            let Some(content) = r.content else { continue };
            if !e.is_live()
                || r.kind != FileKind::File
                || r.size > READ_AHEAD_MAX_SIZE
                || self.objects.object_path(&content).exists()
                || !self.handles.read_ahead.lock().insert(content)
            {
                continue;
            }
            let Ok(p) = dir.join(&n) else { continue };
            if let Some(w) = Wanted::of(p.to_string(), r) {
                debug!(path = %w.path, "reading ahead");
                source.read_ahead(w);
            }
        }
    }

    /// Lists directory `ino` for a new directory handle: `.`, `..` and its
    /// live children, as they are now.
    pub(super) fn opendir(&self, ino: u64) -> Result<u64> {
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
        Ok(self.handles.add_dir(items))
    }
}
