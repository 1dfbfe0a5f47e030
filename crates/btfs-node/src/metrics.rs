//! The node's metrics (`metrics=IP:PORT`): one registry holding the
//! instruments that count for metrics alone (FUSE operation latency, fetch
//! latency, the cache: `btfs_metrics`) and a collector that reads, at each
//! scrape, the counters `btfs status` already shows (records, commits,
//! queues, torrents) and the engine's bytes per peer. Nothing is counted
//! twice, and nothing is counted only while served.
//!
//! Names are `btfs_...`; counters end in `_total`, units are in the name
//! (`_seconds`, `_bytes`), as OpenMetrics has them.

use std::{
    collections::BTreeMap,
    sync::atomic::Ordering,
    time::{SystemTime, UNIX_EPOCH},
};

use btfs_metrics::{
    Metrics,
    collect::{counter, counters, gauge},
    prometheus_client::{
        collector::Collector,
        encoding::DescriptorEncoder,
        metrics::{MetricType, gauge::ConstGauge},
        registry::Unit,
    },
};

use crate::NodeHandle;

/// Milliseconds since the Unix epoch (0 before it).
pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl NodeHandle {
    /// The node's registry: what `GET /metrics` shows.
    pub fn metrics(&self) -> Metrics {
        let mut m = Metrics::default();
        self.fs_metrics.register(&mut m.registry);
        self.engine.metrics().register(&mut m.registry);
        m.registry
            .register_collector(Box::new(NodeCollector { node: self.clone() }));
        m.extra.push(self.mesh_metrics.clone());
        m
    }
}

impl NodeHandle {
    /// New local versions waiting in the announce queue.
    fn announce_queued(&self) -> usize {
        self.announce
            .upgrade()
            .map_or(0, |tx| tx.max_capacity() - tx.capacity())
    }
}

/// Reads the node's counters at scrape time.
#[derive(Debug)]
struct NodeCollector {
    node: NodeHandle,
}

fn to_i64(v: impl TryInto<i64>) -> i64 {
    v.try_into().unwrap_or(i64::MAX)
}

/// Encodes a gauge family: one value per label set.
fn gauges<L: btfs_metrics::prometheus_client::encoding::EncodeLabelSet>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    values: &[(L, i64)],
) -> Result<(), std::fmt::Error> {
    use btfs_metrics::prometheus_client::encoding::EncodeMetric;
    let mut family = enc.encode_descriptor(name, help, unit, MetricType::Gauge)?;
    for (labels, v) in values {
        ConstGauge::new(*v).encode(family.encode_family(labels)?)?;
    }
    Ok(())
}

impl Collector for NodeCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let n = &self.node;
        let c = &n.counters;
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);

        // Records and anti-entropy.
        counters(
            &mut enc,
            "btfs_records",
            "Records published (local versions gossiped), received by gossip, synced by anti-entropy, refused",
            None,
            &[
                ([("event", "published")], load(&c.published)),
                ([("event", "received")], load(&c.received)),
                ([("event", "synced")], load(&c.synced)),
                ([("event", "refused")], load(&c.refused)),
            ],
        )?;
        counter(
            &mut enc,
            "btfs_conflicts",
            "Records stored next to a concurrent version (conflicts resolved)",
            None,
            load(&c.merged),
        )?;
        counter(
            &mut enc,
            "btfs_antientropy_rounds",
            "Completed anti-entropy rounds",
            None,
            load(&c.syncs),
        )?;
        let last = load(&c.last_sync_ms);
        if last > 0 {
            gauge(
                &mut enc,
                "btfs_antientropy_lag",
                "Time since the last completed anti-entropy round",
                Some(&Unit::Seconds),
                to_i64(unix_ms().saturating_sub(last) / 1000),
            )?;
        }
        counters(
            &mut enc,
            "btfs_peer_wires",
            "Peer wires this node opened, straight to a member or inside the mesh",
            None,
            &[
                ([("via", "direct")], load(&c.wires_direct)),
                ([("via", "mesh")], load(&c.wires_mesh)),
            ],
        )?;

        // The filesystem (its status reads the store's statistics).
        if let Ok(fs) = n.fs.status() {
            counter(
                &mut enc,
                "btfs_commits",
                "Versions committed by writers",
                None,
                fs.commits,
            )?;
            counter(
                &mut enc,
                "btfs_commit_failures",
                "Commits that failed",
                None,
                fs.commit_failures,
            )?;
            gauge(
                &mut enc,
                "btfs_open_files",
                "Files open through the mount",
                None,
                to_i64(fs.open_files),
            )?;
            gauge(
                &mut enc,
                "btfs_open_handles",
                "File and directory handles open",
                None,
                to_i64(fs.open_handles),
            )?;
            gauges(
                &mut enc,
                "btfs_tree_entries",
                "Entries of the tree, by kind",
                None,
                &[
                    ([("kind", "file")], to_i64(fs.tree.files)),
                    ([("kind", "dir")], to_i64(fs.tree.dirs)),
                    ([("kind", "symlink")], to_i64(fs.tree.symlinks)),
                    ([("kind", "tombstone")], to_i64(fs.tree.tombstones)),
                ],
            )?;
            gauge(
                &mut enc,
                "btfs_tree",
                "Bytes of the files of the tree",
                Some(&Unit::Bytes),
                to_i64(fs.tree.bytes),
            )?;
            gauges(
                &mut enc,
                "btfs_queue_depth",
                "Work waiting: new versions to announce, whole-file fetches for a prefetch worker, released objects for the next collection",
                None,
                &[
                    ([("queue", "announce")], to_i64(n.announce_queued())),
                    ([("queue", "prefetch")], to_i64(n.engine.prefetch_queued())),
                    ([("queue", "pending_gc")], to_i64(fs.pending_gc)),
                ],
            )?;
            gauge(
                &mut enc,
                "btfs_history",
                "Bytes of the superseded and deleted versions history= keeps",
                Some(&Unit::Bytes),
                to_i64(fs.history_bytes),
            )?;
            gauge(
                &mut enc,
                "btfs_history_versions",
                "Superseded and deleted versions history= keeps",
                None,
                to_i64(fs.history_versions),
            )?;
        }

        // The engine.
        let bt = n.engine.status();
        gauge(
            &mut enc,
            "btfs_live_torrents",
            "Torrents live now",
            None,
            to_i64(bt.live_torrents),
        )?;
        gauge(
            &mut enc,
            "btfs_max_live_torrents",
            "The cap on live torrents",
            None,
            to_i64(bt.max_live),
        )?;
        gauge(
            &mut enc,
            "btfs_fetches_in_progress",
            "Files being fetched or read from members now",
            None,
            to_i64(bt.fetches.len()),
        )?;
        gauge(
            &mut enc,
            "btfs_known_holdings",
            "(content, member) pairs members announced holding",
            None,
            to_i64(bt.known_holdings),
        )?;
        counters(
            &mut enc,
            "btfs_torrent_payload",
            "Payload bytes librqbit moved (pieces), both ways",
            Some(&Unit::Bytes),
            &[
                ([("direction", "down")], bt.bytes_downloaded),
                ([("direction", "up")], bt.bytes_uploaded),
            ],
        )?;
        counters(
            &mut enc,
            "btfs_refused",
            "Requests and connections refused by the engine's bounds, by bound",
            None,
            &[
                ([("what", "warm")], bt.warm_refused),
                ([("what", "metainfo")], bt.metainfo_refused),
                ([("what", "live")], bt.live_refused),
                ([("what", "member_conns")], bt.member_conns_refused),
                ([("what", "member_bring_ups")], bt.member_bring_ups_refused),
                ([("what", "idle_closed")], bt.bridges_idle_closed),
                ([("what", "socks")], bt.socks_refused),
            ],
        )?;
        // Pins (`btfs pin`) go here once the node has them: a gauge
        // `btfs_pins` and `btfs_pinned_bytes`.

        // Bytes per peer and per zone (peer connections, BitTorrent
        // messages included).
        let traffic = n.engine.peer_traffic();
        let mut per_peer = Vec::with_capacity(traffic.len() * 2);
        let mut per_zone: BTreeMap<(String, &'static str), u64> = BTreeMap::new();
        for t in &traffic {
            for (dir, v) in [("up", t.up), ("down", t.down)] {
                per_peer.push((
                    [
                        ("peer", t.peer.clone()),
                        ("zone", t.zone.clone()),
                        ("direction", dir.to_owned()),
                    ],
                    v,
                ));
                *per_zone.entry((t.zone.clone(), dir)).or_default() += v;
            }
        }
        counters(
            &mut enc,
            "btfs_peer",
            "Bytes moved with each peer (member, or a bt_allow client's address), by direction",
            Some(&Unit::Bytes),
            &per_peer,
        )?;
        let per_zone: Vec<_> = per_zone
            .into_iter()
            .map(|((zone, dir), v)| ([("zone", zone), ("direction", dir.to_owned())], v))
            .collect();
        counters(
            &mut enc,
            "btfs_zone",
            "Bytes moved with the peers of each zone (empty: no zone), by direction",
            Some(&Unit::Bytes),
            &per_zone,
        )?;
        gauge(
            &mut enc,
            "btfs_peers_connected",
            "Members connected now",
            None,
            to_i64(n.view.borrow().peers.iter().filter(|p| p.connected).count()),
        )?;
        Ok(())
    }
}
