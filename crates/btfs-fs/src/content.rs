//! Content this node does not hold: the seam between the filesystem and the
//! transport that carries bytes between nodes (BitTorrent, in the daemon).
//!
//! The filesystem never waits on the network in a FUSE handler: a read of
//! remote bytes hands its reply to the source, which answers it later from
//! its own tasks, within its deadline.

use std::{fmt, io, path::Path};

use btfs_core::{ContentId, InfoHash};
pub use btfs_core::{Update, Wanted};

/// Receives the answer of an asynchronous content request.
pub type Done<T> = Box<dyn FnOnce(io::Result<T>) + Send>;

/// A transport for content, given to the filesystem by the daemon.
pub trait ContentSource: Send + Sync + 'static {
    /// Makes new content available to other nodes, on a worker thread at
    /// commit (`file` holds the bytes and does not change meanwhile). Returns
    /// the swarm that carries it; `None` for content that needs none.
    fn publish(&self, content: &ContentId, file: &Path, size: u64) -> io::Result<Option<InfoHash>>;

    /// As [`publish`](Self::publish), for content written in place over
    /// `update.base`: pieces outside `update.changed` and below
    /// `update.base_kept` may be taken from the base's swarm unhashed.
    fn publish_update(
        &self,
        content: &ContentId,
        file: &Path,
        size: u64,
        update: &Update<'_>,
    ) -> io::Result<Option<InfoHash>> {
        let _ = update;
        self.publish(content, file, size)
    }

    /// A version held here (`old`, an object at `file`, no longer
    /// referenced) was superseded by `new`, which is not here. The source
    /// may take the file (move it away, on this thread) as the start of
    /// `new`'s fetch, so that only the pieces that differ travel. Returns
    /// whether it took it; if not, the caller deletes it.
    fn adopt_seed(&self, file: &Path, old: &Wanted, new: &Wanted) -> bool {
        let _ = (file, old, new);
        false
    }

    /// Reads `len` bytes at `offset` of content held elsewhere and answers
    /// through `done`: the bytes (short only at the end of the content), or
    /// an error once the source's deadline has passed. Must not block.
    fn read(&self, wanted: Wanted, offset: u64, len: u32, done: Done<Vec<u8>>);

    /// Brings the whole content into the object store, then answers through
    /// `done` (on a thread that may block). Must not block.
    fn fetch(&self, wanted: Wanted, done: Done<()>);

    /// Content held here was opened for reading (a cache's last use).
    fn opened(&self, _content: &ContentId) {}

    /// The content is likely to be read soon (the next file of a directory
    /// being walked): fetch it whole in the background if there is room.
    /// Must not block; may ignore it.
    fn read_ahead(&self, _wanted: Wanted) {}
}

impl fmt::Debug for dyn ContentSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ContentSource")
    }
}
