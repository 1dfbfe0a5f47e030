//! What `btfs status` reports about the filesystem layer.

use std::sync::atomic::Ordering;

use btfs_store::{Backend, Stats};
use serde::{Deserialize, Serialize};

use super::Shared;
use crate::error::Result;

/// What `btfs status` reports about the filesystem layer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FsStatus {
    pub open_handles: usize,
    pub open_files: usize,
    pub passthrough: bool,
    pub commits: u64,
    pub commit_failures: u64,
    /// Released objects waiting for the next garbage collection.
    pub pending_gc: usize,
    /// Superseded and deleted versions kept by `history=`, and the sum of
    /// their sizes (content shared between versions counted once each).
    #[serde(default)]
    pub history_versions: u64,
    #[serde(default)]
    pub history_bytes: u64,
    #[serde(flatten)]
    pub tree: Stats,
}

impl<B: Backend> Shared<B> {
    pub(super) fn status(&self) -> Result<FsStatus> {
        let history = self.store.history_stats()?;
        Ok(FsStatus {
            open_handles: self.handles.len(),
            open_files: self.inodes.open.lock().len(),
            passthrough: self.passthrough.load(Ordering::Relaxed),
            commits: self.committer.commits.load(Ordering::Relaxed),
            commit_failures: self.committer.failures.load(Ordering::Relaxed),
            pending_gc: self.pending_gc.lock().len(),
            history_versions: history.versions,
            history_bytes: history.bytes,
            tree: self.store.stats()?,
        })
    }
}
