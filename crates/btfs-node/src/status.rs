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
    /// `zone=`: this node's zone (`null`: none). Each member's is in
    /// `peers` (`PeerInfo::zone`).
    #[serde(default)]
    pub zone: Option<String>,
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
    /// New local versions waiting in the announce queue now (a gauge; past
    /// the queue's capacity they wait in the store's log instead).
    #[serde(default)]
    pub announce_queued: u64,
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
            announce_queued: 0,
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
    /// Pinned paths (`btfs pin`), with how much of each is held here.
    #[serde(default)]
    pub pins: Vec<crate::PinStatus>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `btfs status --json` is an interface (scripts and the benchmarks read
    /// it): one flat object with the names it has always had.
    #[test]
    fn status_json_keeps_its_field_names_and_reads_back() {
        let status = NodeStatus {
            info: NodeInfo {
                name: "demo".into(),
                options: serde_json::json!({ "mdns": false }),
                pid: 7,
                zone: Some("dc1".into()),
                ..NodeInfo::default()
            },
            node_id: "ab".into(),
            peer_id: "12D3".into(),
            fs: FsStatus {
                open_handles: 1,
                open_files: 2,
                passthrough: true,
                commits: 3,
                commit_failures: 0,
                pending_gc: 4,
                history_versions: 6,
                history_bytes: 7,
                tree: btfs_store::Stats {
                    files: 5,
                    ..Default::default()
                },
            },
            mesh: MeshView {
                peers: vec![PeerInfo {
                    id: "12D3peer".into(),
                    addresses: vec!["/ip4/10.0.0.2/tcp/4410".into()],
                    connected: true,
                    last_seen_secs: 1,
                    zone: Some("dc2".into()),
                }],
                ..MeshView::default()
            },
            records: RecordCounts {
                records_synced: 6,
                ..Default::default()
            },
            bittorrent: btfs_torrent::Status::default(),
            pins: Vec::new(),
        };
        let v = serde_json::to_value(&status).unwrap();
        let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort_unstable();
        let mut want = vec![
            "name",
            "mountpoint",
            "state_dir",
            "key_file",
            "key_fingerprint",
            "options",
            "pid",
            "version",
            "zone",
            "node_id",
            "peer_id",
            "open_handles",
            "open_files",
            "passthrough",
            "commits",
            "commit_failures",
            "pending_gc",
            "files",
            "dirs",
            "symlinks",
            "tombstones",
            "bytes",
            "peers",
            "listen",
            "mdns",
            "records_published",
            "records_received",
            "records_synced",
            "records_refused",
            "records_merged",
            "announce_queued",
            "sync_rounds",
            "peer_wires_direct",
            "peer_wires_mesh",
            "bittorrent_listen",
            "bytes_downloaded",
            "bytes_uploaded",
            "live_torrents",
            "known_holdings",
            "warm_refused",
            "metainfo_refused",
            "max_live",
            "live_refused",
            "member_conns_refused",
            "member_bring_ups_refused",
            "bridges_idle_closed",
            "socks_refused",
            "fetches",
            "pins",
            "history_versions",
            "history_bytes",
        ];
        want.sort_unstable();
        assert_eq!(keys, want);
        assert_eq!(v["open_files"], 2);
        assert_eq!(v["files"], 5);
        assert_eq!(v["mdns"]["enabled"], false);
        assert_eq!(v["zone"], "dc1");
        let mut peer_keys: Vec<&str> = v["peers"][0]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        peer_keys.sort_unstable();
        assert_eq!(
            peer_keys,
            ["addresses", "connected", "id", "last_seen_secs", "zone"]
        );
        assert_eq!(v["peers"][0]["zone"], "dc2");
        // No zone is `null`, not a missing key; a status without the key
        // (an older daemon) still reads back.
        let mut none = status.clone();
        none.info.zone = None;
        assert_eq!(
            serde_json::to_value(&none).unwrap()["zone"],
            serde_json::Value::Null
        );
        let mut old = v.clone();
        old.as_object_mut().unwrap().remove("zone");
        old["peers"][0].as_object_mut().unwrap().remove("zone");
        let read: NodeStatus = serde_json::from_value(old).unwrap();
        assert_eq!(
            (read.info.zone, read.mesh.peers[0].zone.clone()),
            (None, None)
        );
        let back: NodeStatus = serde_json::from_value(v).unwrap();
        assert_eq!(back.records.records_synced, 6);
        assert_eq!(back.fs.tree.files, 5);
        assert_eq!(back.info.options["mdns"], false);
    }
}
