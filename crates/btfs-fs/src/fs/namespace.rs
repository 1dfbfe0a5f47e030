//! The namespace: lookups by name and inode, and the changes of the tree
//! that the kernel asks for (create, unlink, rmdir, rename), each written to
//! the store in one atomic write under `ns` and announced to other nodes.

use std::{ffi::OsStr, sync::atomic::Ordering};

use btfs_core::{ContentId, FileKind, FileRecord, Owner, RelPath, Timestamp};
use btfs_store::{Backend, Change, Entry, NO_INO};
use fuser::{FileAttr, RenameFlags, Request};

use super::{Shared, replica};
use crate::error::{FsError, Result};

fn name_str(name: &OsStr) -> Result<&str> {
    name.to_str()
        .ok_or(FsError::BadName(btfs_core::PathError::NotUtf8))
}

impl<B: Backend> Shared<B> {
    pub(super) fn dir_path(&self, ino: u64) -> Result<(RelPath, Entry)> {
        let (path, entry) = self.store.get_ino(ino)?.ok_or(FsError::NotFound)?;
        if entry.record.kind != FileKind::Dir {
            return Err(FsError::NotDir);
        }
        Ok((path, entry))
    }

    pub(super) fn child_path(
        &self,
        parent: u64,
        name: &OsStr,
    ) -> Result<(RelPath, Entry, RelPath)> {
        let (dir, dir_entry) = self.dir_path(parent)?;
        let path = dir.join(name_str(name)?)?;
        Ok((dir, dir_entry, path))
    }

    /// The entry of `ino`, also for a file that was unlinked while open.
    pub(super) fn entry_of(&self, ino: u64) -> Result<(Option<RelPath>, Entry)> {
        if let Some((p, e)) = self.store.get_ino(ino)? {
            return Ok((Some(p), e));
        }
        match self.inodes.orphans.lock().get(&ino) {
            Some(e) => Ok((None, e.clone())),
            None => Err(FsError::NotFound),
        }
    }

    pub(super) fn lookup(&self, parent: u64, name: &OsStr) -> Result<FileAttr> {
        let (_, _, path) = self.child_path(parent, name)?;
        let entry = self.store.get_live(&path)?.ok_or(FsError::NotFound)?;
        self.getattr(entry.ino)
    }

    // ----- namespace changes -------------------------------------------------

    /// Owner of a new entry in `dir`: setgid directories pass their group on.
    pub(super) fn owner_in(
        req: &Request,
        dir: &Entry,
        mode: u32,
        umask: u32,
        is_dir: bool,
    ) -> Owner {
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

    /// Creates `record` at `parent/name`; returns the new entry.
    pub(super) fn create_entry(
        &self,
        parent: u64,
        name: &OsStr,
        make: impl FnOnce(&Entry) -> FileRecord,
    ) -> Result<Entry> {
        let _ns = self.ns.lock();
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

    pub(super) fn remove_entry(&self, parent: u64, name: &OsStr, want_dir: bool) -> Result<()> {
        let released;
        let entry;
        let mut inval = replica::Inval::default();
        {
            let _ns = self.ns.lock();
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
            self.inodes.mark_unlinked(&entry);
            self.gc(released);
            self.prune_implicit(dir, &mut inval)?;
        }
        self.invalidate(inval);
        Ok(())
    }

    pub(super) fn rename(
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
        let _ns = self.ns.lock();
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
            self.inodes.mark_unlinked(old);
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
    pub(super) fn write_announced(
        &self,
        changes: Vec<Change>,
        versioned: usize,
    ) -> Result<Vec<ContentId>> {
        let mut announced = Vec::new();
        let changes = self.version_changes(changes, versioned, &mut announced)?;
        let before = self.store.max_seq()?;
        let released = self.store.write(changes)?;
        for a in announced {
            self.announce(a, before);
        }
        Ok(released)
    }

    /// Queues `a` for gossip. A full queue does not lose it: the versions
    /// written after log number `before` are left for the announcer to read
    /// back from the log (paced, not dropped, and never waiting for
    /// anti-entropy).
    pub(super) fn announce(&self, a: replica::Announced, before: u64) {
        if let Some(tx) = &self.cfg.announce
            && tx.try_send(a).is_err()
        {
            self.announce_backlog.fetch_min(before, Ordering::AcqRel);
        }
    }
}
