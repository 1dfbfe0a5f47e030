//! Requests between members, over the mesh's request-response protocol.

use btfs_sync::antientropy::SyncRequest;
use serde::{Deserialize, Serialize};

/// Requests between members.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Rpc {
    /// Anti-entropy: records stored since.
    Sync(SyncRequest),
    /// The `.torrent` of an info hash (empty answer: not here).
    Metainfo([u8; 20]),
    /// Where the peer takes direct peer wires: an `Option<SocketAddr>`
    /// (`None`: only through the mesh, `bt_wire=mesh`).
    Wire,
}
