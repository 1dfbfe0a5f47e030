//! Attributes: what the kernel is told about an inode (`getattr`), and the
//! changes it asks for (`setattr`: mode, owner, times, truncation).

use std::{fs::Metadata, os::unix::fs::MetadataExt, time::SystemTime};

use btfs_core::{FileKind, Timestamp};
use btfs_store::{Backend, Change, Entry};
use fuser::{FileAttr, FileType, INodeNo, TimeOrNow};

use super::Shared;
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
        let (path, entry) = self.entry_of(ino)?;
        let staging = st.staging.as_ref().map(|s| s.file.metadata()).transpose()?;
        build_attr(&entry, path.is_none(), staging.as_ref())
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
        let kills_setid = |e: &Entry| e.record.mode & (libc::S_ISUID | libc::S_ISGID) != 0;
        if changes.is_metadata_only_noop()
            && !(changes.size.is_some()
                && changes.caller_uid != 0
                && self.entry_of(ino).is_ok_and(|(_, e)| kills_setid(&e)))
        {
            return self.getattr(ino);
        }
        {
            let _ns = self.ns.lock();
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
            self.inodes.stale_cache.lock().insert(ino);
            Ok(())
        })
    }

    pub(super) fn statfs(&self) -> Result<nix::sys::statvfs::Statvfs> {
        nix::sys::statvfs::statvfs(&self.cfg.state_dir).map_err(|e| FsError::Io(e.into()))
    }
}
