//! Attributes: what the kernel is told about an inode (`getattr`), and the
//! changes it asks for (`setattr`: mode, owner, times, truncation).

use std::{fs::Metadata, os::unix::fs::MetadataExt, time::SystemTime};

use btfs_core::{FileKind, FileRecord, Timestamp};
use btfs_store::{Backend, Change, Entry};
use fuser::{FileAttr, FileType, INodeNo, TimeOrNow};

use super::{Shared, inodes::OpenInode};
use crate::error::{FsError, Result};

pub(super) fn file_type(kind: FileKind) -> FileType {
    match kind {
        FileKind::File => FileType::RegularFile,
        FileKind::Dir => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
    }
}

fn resolve_time(t: TimeOrNow, now: SystemTime) -> SystemTime {
    match t {
        TimeOrNow::SpecificTime(t) => t,
        TimeOrNow::Now => now,
    }
}

/// Kernel attributes of an entry; `staging` is the open staging file, whose
/// size and times are newer than the record's.
pub(super) fn build_attr(
    entry: &Entry,
    unlinked: bool,
    staging: Option<&Metadata>,
) -> Result<FileAttr> {
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
pub(super) struct AttrChanges {
    /// Who asks (set-id bits survive a truncate by root).
    pub(super) caller_uid: u32,
    pub(super) mode: Option<u32>,
    pub(super) uid: Option<u32>,
    pub(super) gid: Option<u32>,
    pub(super) size: Option<u64>,
    pub(super) atime: Option<TimeOrNow>,
    pub(super) mtime: Option<TimeOrNow>,
    pub(super) ctime: Option<SystemTime>,
}

/// Attribute changes (`chmod`, `chown`, `atime`) of a file that writers
/// hold open, kept with the inode (`OpenInode::attrs`) instead of being
/// stored as versions of their own: the version committed when the last
/// writer closes carries them.
///
/// An archive extractor or a copy sets the mode, owner and times of every
/// file it writes before closing it (`tar`: `utimensat`, `fchown`, `fchmod`
/// on the open file). Each as a version of its own was a signed store write
/// and an announcement per call, three more per file than the two (create,
/// content) that a new file needs, for versions nobody else can use: the
/// content they describe is not published until the close.
///
/// Durability is that of the writes they accompany: like the bytes, they
/// reach the store with the commit, or at once when a handle of the inode
/// is `fsync`ed ([`Shared::write_pending_attrs`]), and a crash before
/// either loses them with the unsynced bytes. Other nodes see them with the
/// new content. Every local reader sees them at once: `getattr` lays them
/// over the stored record. The modification time needs no such care: it is
/// set on the staging file, whose time the commit records.
#[derive(Debug, Clone, Default)]
pub(super) struct PendingAttrs {
    mode: u32,
    uid: u32,
    gid: u32,
    atime: Option<Timestamp>,
    /// When they were last changed (the record's ctime).
    changed: Timestamp,
}

impl PendingAttrs {
    /// Lays the changes over `record`.
    pub(super) fn apply(&self, record: &mut FileRecord) {
        record.mode = self.mode;
        record.uid = self.uid;
        record.gid = self.gid;
        if let Some(a) = self.atime {
            record.atime = a;
        }
        record.ctime = record.ctime.max(self.changed);
    }
}

/// Applies `changes` to `record` as Linux would: mode, owner (killing the
/// set-id bits, see below), times.
fn change_record(
    record: &mut FileRecord,
    changes: &AttrChanges,
    mtime: Option<SystemTime>,
    atime: Option<SystemTime>,
) {
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
    if record.kind == FileKind::File && changes.mode.is_none() && (chown || truncate_unprivileged) {
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

impl<B: Backend> Shared<B> {
    /// Attributes of `ino`. The store entry is read while the inode's state is
    /// locked, so that a commit in progress is seen either whole or not at all.
    pub(super) fn getattr(&self, ino: u64) -> Result<FileAttr> {
        let Some(cell) = self.inodes.cell(ino) else {
            let (path, entry) = self.entry_of(ino)?;
            return build_attr(&entry, path.is_none(), None);
        };
        let st = cell.state.lock();
        let (path, mut entry) = self.entry_of(ino)?;
        if let Some(p) = &st.attrs {
            p.apply(&mut entry.record);
        }
        let staging = st.staging.as_ref().map(|s| s.file.metadata()).transpose()?;
        build_attr(&entry, path.is_none(), staging.as_ref())
    }

    /// The mode of `ino` as its readers see it (attribute changes still
    /// pending included).
    fn effective_mode(&self, ino: u64) -> Result<u32> {
        let (_, mut entry) = self.entry_of(ino)?;
        if let Some(cell) = self.inodes.cell(ino)
            && let Some(p) = &cell.state.lock().attrs
        {
            p.apply(&mut entry.record);
        }
        Ok(entry.record.mode)
    }

    /// Keeps `changes` with the inode when writers hold it open (see
    /// [`PendingAttrs`]); returns the attributes they give, or `None` when
    /// no writer holds it (the caller stores them).
    fn defer_attrs(
        &self,
        ino: u64,
        changes: &AttrChanges,
        now: SystemTime,
        atime: Option<SystemTime>,
    ) -> Result<Option<FileAttr>> {
        let Some(cell) = self.inodes.cell(ino) else {
            return Ok(None);
        };
        let mut st = cell.state.lock();
        // The commit runs under this lock once the last writer is gone: a
        // change kept while one is here is in that commit.
        let Some(staging) = st.staging.as_ref().filter(|_| st.writers > 0) else {
            return Ok(None);
        };
        let meta = staging.file.metadata()?;
        let (path, mut entry) = self.entry_of(ino)?;
        let mut record = entry.record.clone();
        if let Some(p) = &st.attrs {
            p.apply(&mut record);
        }
        // The modification time is the staging file's (set by the caller).
        change_record(&mut record, changes, None, atime);
        let pending = PendingAttrs {
            mode: record.mode,
            uid: record.uid,
            gid: record.gid,
            atime: atime
                .map(Timestamp::from)
                .or(st.attrs.as_ref().and_then(|p| p.atime)),
            changed: Timestamp::from(now),
        };
        pending.apply(&mut entry.record);
        st.attrs = Some(pending);
        build_attr(&entry, path.is_none(), Some(&meta)).map(Some)
    }

    /// Stores the attribute changes kept with an open inode as a version
    /// now (its `fsync`: they must survive a crash from then on).
    pub(super) fn write_pending_attrs(&self, ino: u64, st: &mut OpenInode) -> Result<()> {
        let Some(p) = st.attrs.clone() else {
            return Ok(());
        };
        {
            let _ns = self.ns.lock();
            let (path, entry) = self.entry_of(ino)?;
            let mut record = entry.record.next_version(self.node(), p.changed);
            p.apply(&mut record);
            let entry = Entry::new(ino, record);
            match path {
                Some(path) => {
                    self.write_announced(vec![Change::Put(path, entry)], 1)?;
                }
                None => self.inodes.mark_unlinked(&entry),
            }
        }
        st.attrs = None;
        Ok(())
    }

    pub(super) fn setattr(&self, ino: u64, changes: AttrChanges) -> Result<FileAttr> {
        let now = SystemTime::now();
        // Content-side changes first, on the staging file, outside `ns`.
        if let Some(size) = changes.size {
            self.truncate(ino, size)?;
        }
        let mtime = changes.mtime.map(|t| resolve_time(t, now));
        let atime = changes.atime.map(|t| resolve_time(t, now));
        if (mtime.is_some() || atime.is_some())
            && let Some(cell) = self.inodes.cell(ino)
            && let Some(s) = &cell.state.lock().staging
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
        let kills_setid = |mode: u32| mode & (libc::S_ISUID | libc::S_ISGID) != 0;
        if changes.is_metadata_only_noop()
            && !(changes.size.is_some()
                && changes.caller_uid != 0
                && self.effective_mode(ino).is_ok_and(kills_setid))
        {
            return self.getattr(ino);
        }
        if let Some(attr) = self.defer_attrs(ino, &changes, now, atime)? {
            return Ok(attr);
        }
        {
            let _ns = self.ns.lock();
            let (path, entry) = self.entry_of(ino)?;
            let mut record = entry.record.next_version(self.node(), Timestamp::from(now));
            change_record(&mut record, &changes, mtime, atime);
            let entry = Entry::new(ino, record);
            match path {
                Some(path) => {
                    self.write_announced(vec![Change::Put(path, entry)], 1)?;
                }
                None => self.inodes.mark_unlinked(&entry),
            }
        }
        self.getattr(ino)
    }

    /// An unprivileged writer opens a set-user-ID or set-group-ID file: the
    /// bits go now, as Linux clears them on such a write (with passthrough
    /// the daemon never sees the writes themselves). A set-group-ID bit
    /// without group execute (mandatory locking) stays, as on Linux.
    pub(super) fn kill_setid_for_writer(&self, ino: u64, caller_uid: u32) -> Result<()> {
        let (_, entry) = self.entry_of(ino)?;
        let mode = self.effective_mode(ino)?;
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
        let cell = self.pin(ino);
        let done = (|| {
            let st = &mut *cell.state.lock();
            if let Some(r) = &st.ranged {
                r.truncate(size)?;
                if st.writers == 0 {
                    self.commit(ino, st, true)?;
                }
                return Ok(());
            }
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
            st.base = Some((current.record.version.clone(), current.record.content));
            match from {
                // A large file: the cut is a range stage, no copy.
                Some(c) if self.wants_ranged(&c, false, false) => {
                    self.make_ranged(&cell, st, c, current.record.torrent)?;
                    if let Some(r) = &st.ranged {
                        r.truncate(size)?;
                    }
                }
                _ => {
                    let staging = self.objects.new_staging(from.as_ref())?;
                    staging.file.set_len(size)?;
                    st.staging = Some(staging);
                }
            }
            self.commit(ino, st, true)?;
            // Any page cache of the old content is stale now.
            self.inodes.stale_cache.lock().insert(ino);
            Ok(())
        })();
        self.unpin(ino);
        done
    }

    pub(super) fn statfs(&self) -> Result<nix::sys::statvfs::Statvfs> {
        nix::sys::statvfs::statvfs(&self.cfg.state_dir).map_err(|e| FsError::Io(e.into()))
    }
}
