//! btfs content over BitTorrent: the librqbit adapter.
//!
//! * **Publish.** Committed content gets a torrent derived from its bytes
//!   alone (`meta`), kept under `bt/torrents/`. Nothing goes live: a node
//!   brings a torrent up only while it is needed (`engine`).
//! * **Lazy reads.** A read of content held elsewhere adds its torrent with
//!   nothing selected and reads the range through librqbit's streaming API,
//!   so only the pieces that reads touch are fetched. Sequential readers get
//!   a bounded read-ahead; a prefetch policy fetches whole files instead.
//! * **Members only.** librqbit listens on loopback; its outgoing connections
//!   go through an in-process SOCKS5 server to synthetic addresses, one per
//!   mesh member, that the daemon carries over libp2p streams (`bridge`).
//!   Incoming streams, and direct connections from networks opted in with
//!   `bt_allow=`, are bridged to the loopback listener once their handshake
//!   names a torrent this node holds.

mod bridge;
pub mod congestion;
mod engine;
pub mod meta;

use std::io;

use btfs_core::InfoHash;

pub use bridge::{BoxIo, Cidr, PeerIo, QuickAck, RelayFuture};
pub use engine::{Engine, EngineConfig, FetchStatus, Network, ObjectPath, Status};
pub use meta::Metainfo;

/// Everything the content layer can fail with.
#[derive(Debug, thiserror::Error)]
pub enum TorrentError {
    #[error("empty content has no torrent")]
    Empty,
    #[error("the file changed while it was hashed: {expected} bytes expected, {found} found")]
    SizeChanged { expected: u64, found: u64 },
    #[error("invalid metainfo: {0}")]
    BadMetainfo(String),
    #[error("encoding metainfo: {0}")]
    Encode(String),
    #[error("no member sent the metainfo of torrent {0}")]
    NoMetainfo(InfoHash),
    #[error("BitTorrent session: {0}")]
    Session(String),
    #[error("the downloaded content does not match its id {0}")]
    Mismatch(String),
    #[error("no progress for {0:?}: no reachable member holds the missing pieces")]
    Stalled(std::time::Duration),
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl TorrentError {
    fn encode(e: impl std::fmt::Display) -> Self {
        Self::Encode(e.to_string())
    }

    fn session(e: impl std::fmt::Display) -> Self {
        Self::Session(e.to_string())
    }
}

impl From<TorrentError> for io::Error {
    fn from(e: TorrentError) -> Self {
        match e {
            TorrentError::Io(io) => io,
            TorrentError::Stalled(_) => io::Error::new(io::ErrorKind::TimedOut, e.to_string()),
            other => io::Error::other(other.to_string()),
        }
    }
}
