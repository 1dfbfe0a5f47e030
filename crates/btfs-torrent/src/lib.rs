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
mod limits;
pub mod meta;

use std::io;

use btfs_core::{ContentId, InfoHash};

pub use bridge::{BoxIo, Cidr, CidrError, PeerIo, QuickAck, RelayFuture};
pub use engine::{
    Engine, EngineConfig, FetchStatus, Keep, MAX_TRAFFIC_PEERS, Network, OTHER_PEERS, ObjectPath,
    PeerTraffic, Status,
};
/// A mesh member, as the [`Network`] names it: its libp2p peer id (shown
/// in base58, as libp2p shows it).
pub use libp2p_identity::PeerId as MemberId;
pub use limits::DEFAULT_MAX_LIVE;
pub use meta::Metainfo;

/// An error from librqbit (its errors are `anyhow` errors, which convert to
/// this), kept as the cause of a [`TorrentError`].
pub type SessionCause = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything the content layer can fail with.
#[derive(Debug, thiserror::Error)]
pub enum TorrentError {
    #[error("empty content has no torrent")]
    Empty,
    #[error("the file changed while it was hashed: {expected} bytes expected, {found} found")]
    SizeChanged { expected: u64, found: u64 },
    #[error("invalid metainfo: {0}")]
    BadMetainfo(#[source] librqbit_bencode::DeserializeError),
    #[error("invalid metainfo: {len} bytes, over the {max}-byte bound")]
    MetainfoTooLarge { len: usize, max: usize },
    #[error("invalid metainfo: info hash {found}, not the {expected} asked for")]
    WrongInfoHash { expected: InfoHash, found: InfoHash },
    #[error("invalid metainfo: a `files` list (only single-file torrents are accepted)")]
    MultiFile,
    #[error("invalid metainfo: no `length`")]
    MissingLength,
    #[error("invalid metainfo: `length` {length} is not within 1..={max}")]
    LengthOutOfBounds { length: u64, max: u64 },
    #[error("invalid metainfo: `piece length` {found} is not a power of two within {min}..={max}")]
    BadPieceLength { found: u32, min: u32, max: u32 },
    #[error("invalid metainfo: {pieces} pieces, over the bound of {max}")]
    TooManyPieces { pieces: u64, max: u64 },
    #[error("invalid metainfo: `pieces` is {len} bytes, not a multiple of 20")]
    PiecesNotMultipleOf20 { len: usize },
    #[error(
        "invalid metainfo: `pieces` holds {found} hashes, `length` and `piece length` make {expected} pieces"
    )]
    PieceCountMismatch { found: u64, expected: u64 },
    #[error("invalid metainfo: `name` is not a content id (64 lowercase hex digits)")]
    BadName,
    #[error("invalid metainfo: the info dictionary has `{0}`, which btfs torrents do not have")]
    UnexpectedInfoField(&'static str),
    #[error("invalid metainfo: the info dictionary is not `private`")]
    NotPrivate,
    #[error(
        "invalid metainfo: the info dictionary has keys or an encoding btfs torrents do not have"
    )]
    NonCanonicalInfo,
    #[error("torrent {torrent} carries {found} ({found_size} bytes), not {content} ({size} bytes)")]
    WrongContent {
        torrent: InfoHash,
        found: ContentId,
        found_size: u64,
        content: ContentId,
        size: u64,
    },
    #[error("encoding metainfo: {0}")]
    Encode(#[source] librqbit_bencode::SerializeError),
    #[error("no member sent the metainfo of torrent {0}")]
    NoMetainfo(InfoHash),
    #[error("BitTorrent session: {0}")]
    Session(#[source] SessionCause),
    /// librqbit did not do what this crate expects of it (no listener, a
    /// torrent added as list-only).
    #[error("BitTorrent session: {0}")]
    SessionUnexpected(&'static str),
    /// A task on librqbit's runtime failed (it panicked, or the runtime
    /// stopped).
    #[error("BitTorrent session: BitTorrent runtime: {0}")]
    Runtime(#[source] tokio::task::JoinError),
    #[error("the downloaded content does not match its id {0}")]
    Mismatch(String),
    #[error("no progress for {0:?}: no reachable member holds the missing pieces")]
    Stalled(std::time::Duration),
    #[error("{live} torrents are live and in use: no room for another")]
    NoRoom { live: usize },
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl TorrentError {
    fn session(e: impl Into<SessionCause>) -> Self {
        Self::Session(e.into())
    }
}

impl From<TorrentError> for io::Error {
    /// The error itself, its text as before, and its cause kept.
    fn from(e: TorrentError) -> Self {
        match e {
            TorrentError::Io(io) => io,
            TorrentError::Stalled(_) => io::Error::new(io::ErrorKind::TimedOut, e),
            other => io::Error::other(other),
        }
    }
}
