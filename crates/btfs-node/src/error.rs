//! What can stop a node from starting, each with its cause kept.

use std::path::PathBuf;

use btfs_mesh::{MeshError, Multiaddr};

/// A node could not start (a bad peers or members file, a mesh or engine
/// that would not come up, a store that would not open).
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("peers file {}", path.display())]
    PeersFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("peers file {}: {line:?} is not IP:PORT", path.display())]
    PeersLine {
        path: PathBuf,
        line: String,
        #[source]
        source: std::net::AddrParseError,
    },
    #[error("members file {}", path.display())]
    MembersFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("members file {}: {line:?} is not a peer id or `removed PEER_ID`", path.display())]
    MembersLine {
        path: PathBuf,
        line: String,
        #[source]
        source: libp2p_identity::ParseError,
    },
    #[error("members file {}: {peer} is listed both as a member and as removed", path.display())]
    MemberTwice {
        path: PathBuf,
        peer: libp2p_identity::PeerId,
    },
    #[error("mesh address {addr}")]
    MeshAddr {
        addr: String,
        #[source]
        source: <Multiaddr as std::str::FromStr>::Err,
    },
    #[error("the node's key is not an ed25519 key")]
    Identity(#[source] btfs_sync::WireError),
    #[error("mesh")]
    Mesh(#[source] MeshError),
    #[error("starting the BitTorrent engine")]
    Engine(#[source] btfs_torrent::TorrentError),
    #[error("metadata store in {}", path.display())]
    Store {
        path: PathBuf,
        #[source]
        source: btfs_store::StoreError,
    },
    #[error("object store in {}", path.display())]
    Objects {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("filesystem")]
    Fs(#[source] btfs_fs::FsError),
    #[error("recovering the versions synced before a crash")]
    Recover(#[source] btfs_fs::FsError),
    #[error("pinned paths")]
    Pins(#[source] crate::pins::PinError),
}

/// The listen address as the mesh takes it.
pub(crate) fn parse_multiaddr(addr: &str) -> Result<Multiaddr, NodeError> {
    addr.parse().map_err(|source| NodeError::MeshAddr {
        addr: addr.to_owned(),
        source,
    })
}
