//! `btfs status` as one typed value: built by the daemon, sent as JSON over
//! the control socket, read back by the CLI. The JSON keeps the field names
//! it always had (the parts are flattened into one object).

use std::{path::PathBuf, sync::atomic::Ordering};

use btfs_fs::FsStatus;
use btfs_mesh::{MdnsStatus, PeerInfo};
use serde::{Deserialize, Serialize};

use crate::replicate::Counters;

/// What the daemon tells about itself: given by the binary at start.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct NodeInfo {
    pub name: String,
    pub mountpoint: PathBuf,
    pub state_dir: PathBuf,
    pub key_file: PathBuf,
    pub key_fingerprint: String,
    /// The mount options in force, as `btfs status --json` has always shown
    /// them (an object of option names).
    pub options: serde_json::Value,
    pub pid: u32,
    pub version: String,
}

/// Record counts (see [`Counters`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordCounts {
    pub records_published: u64,
    pub records_received: u64,
    pub records_synced: u64,
    pub records_refused: u64,
    pub records_merged: u64,
    pub sync_rounds: u64,
    pub peer_wires_direct: u64,
    pub peer_wires_mesh: u64,
}

impl From<&Counters> for RecordCounts {
    fn from(c: &Counters) -> Self {
        let n = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        Self {
            records_published: n(&c.published),
            records_received: n(&c.received),
            records_synced: n(&c.synced),
            records_refused: n(&c.refused),
            records_merged: n(&c.merged),
            sync_rounds: n(&c.syncs),
            peer_wires_direct: n(&c.wires_direct),
            peer_wires_mesh: n(&c.wires_mesh),
        }
    }
}

/// What the mesh looks like, refreshed by a task of the node.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MeshView {
    pub peers: Vec<PeerInfo>,
    pub listen: Vec<String>,
    pub mdns: MdnsStatus,
}

/// Everything `btfs status` shows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeStatus {
    #[serde(flatten)]
    pub info: NodeInfo,
    /// This node's id (the author of its records), hex.
    pub node_id: String,
    /// Its libp2p peer id (what `members=` lists).
    pub peer_id: String,
    #[serde(flatten)]
    pub fs: FsStatus,
    #[serde(flatten)]
    pub mesh: MeshView,
    #[serde(flatten)]
    pub records: RecordCounts,
    #[serde(flatten)]
    pub bittorrent: btfs_torrent::Status,
}
