//! Version history (`history=DURATION`) as the filesystem serves it: the
//! window's collection, and a restore that brings an old version back as a
//! new one. The store keeps the items (see `btfs_store`'s `history.rs`).

use std::time::{Duration, SystemTime};

use btfs_core::{FileKind, FileRecord, Owner, RelPath, Timestamp};
use btfs_store::Backend;

use super::FsHandle;
use crate::error::{FsError, Result};

/// Directories a restore re-creates above its target at most (deleted
/// with the file); a deeper missing tree is refused.
const MAX_RESTORE_PARENTS: usize = 64;

impl<B: Backend> FsHandle<B> {
    /// Forgets history items older than `window` (all of them when history
    /// is off, `None`) and queues the content only they kept for the next
    /// garbage collection. Returns how many objects were released.
    pub fn collect_history(&self, window: Option<Duration>) -> Result<usize> {
        let cutoff = match window {
            Some(w) => SystemTime::now()
                .checked_sub(w)
                .unwrap_or(SystemTime::UNIX_EPOCH),
            // Everything, including items written a moment ago.
            None => SystemTime::now() + Duration::from_secs(3600),
        };
        let released = self.shared.store.collect_history(cutoff.into())?;
        let n = released.len();
        self.shared.gc(released);
        Ok(n)
    }

    /// Whether the content of `record` is an object here.
    pub fn holds(&self, record: &FileRecord) -> bool {
        match record.content {
            Some(c) => record.size == 0 || self.shared.objects.object_path(&c).exists(),
            None => false,
        }
    }

    /// Stores `old` (a version from history, or a current one) at `to` as
    /// a new version made here: it descends from whatever `to` holds (a
    /// newer version, a tombstone), so it wins everywhere, and replicates
    /// like any write. Missing parent directories are made again. The
    /// content must be held here ([`holds`](Self::holds)): the caller
    /// fetches it first. `to` must not be a live path other than the one
    /// the version came from (`same_path`). Returns the new record.
    pub fn restore(&self, old: &FileRecord, to: &RelPath, same_path: bool) -> Result<FileRecord> {
        if old.kind != FileKind::File || old.deleted || old.content.is_none() {
            return Err(FsError::Invalid("only a version of a file can be restored"));
        }
        if !self.holds(old) {
            return Err(FsError::ContentUnavailable);
        }
        let me = self.node();
        let now = Timestamp::now();
        self.ensure_parents(to)?;
        let current = self.shared.store.get(to)?;
        if let Some(e) = &current
            && e.is_live()
        {
            if !same_path {
                return Err(FsError::Exists);
            }
            if e.record.kind != FileKind::File {
                return Err(FsError::IsDir);
            }
        }
        let mut r = old.clone();
        r.deleted = false;
        r.author = me;
        r.ctime = now;
        r.version = btfs_core::VersionVector::new();
        r.prev_content = None;
        if let Some(e) = &current {
            r.prev_content = e.record.content;
            r.version.merge(&e.record.version);
            for v in &e.sync.versions {
                r.version.merge(&v.record.version);
            }
        }
        r.version.increment(me);
        let version = self.shared.commit_local(to.clone(), r)?;
        Ok(version.record)
    }

    /// Makes the missing directories above `path` again (deleted with the
    /// file being restored), as this node, owned by root, mode 0755.
    fn ensure_parents(&self, path: &RelPath) -> Result<()> {
        let mut missing = Vec::new();
        let mut dir = path.parent();
        while let Some(d) = dir {
            match self.shared.store.get_live(&d)? {
                Some(e) if e.record.kind == FileKind::Dir => break,
                Some(_) => return Err(FsError::NotDir),
                None => missing.push(d.clone()),
            }
            if missing.len() > MAX_RESTORE_PARENTS {
                return Err(FsError::Invalid("too many missing parent directories"));
            }
            dir = d.parent();
        }
        for d in missing.into_iter().rev() {
            let owner = Owner {
                mode: 0o755,
                uid: 0,
                gid: 0,
            };
            let mut r = FileRecord::new_dir(owner, self.node(), Timestamp::now());
            if let Some(old) = self.shared.store.get(&d)? {
                r = r.succeeding(&old.record);
                for v in &old.sync.versions {
                    r.version.merge(&v.record.version);
                }
            }
            self.shared.commit_local(d, r)?;
        }
        Ok(())
    }
}
