//! Bytes moved per peer, for metrics: every bridged peer connection is
//! counted by the kernel on librqbit's loopback socket (`TCP_INFO`), read
//! when asked and once more when the connection ends. Nothing is added to
//! the relays' hot paths (they may splice, or be the wire's own).

use std::{
    collections::HashMap,
    os::fd::{AsFd, AsRawFd, OwnedFd},
    sync::Arc,
};

use parking_lot::Mutex;

use super::Engine;
use crate::{MemberId, bridge::QuickAck, limits::Remote};

/// Peers whose totals are kept apart; traffic of peers past this (standard
/// clients of a wide `bt_allow=`) is counted under [`OTHER_PEERS`].
pub const MAX_TRAFFIC_PEERS: usize = 1024;
/// The peer label of traffic past `MAX_TRAFFIC_PEERS`.
pub const OTHER_PEERS: &str = "other";

/// Bytes moved with one peer: totals of its connections.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerTraffic {
    /// The member's peer id, or a standard client's IP address.
    pub peer: String,
    /// The zone the member told (`zone=`), empty if none.
    pub zone: String,
    /// Bytes sent to it and received from it (BitTorrent messages).
    pub up: u64,
    pub down: u64,
}

#[derive(Debug, Default)]
struct Table {
    /// Ended connections' totals, by peer: (zone, up, down).
    ended: HashMap<String, (String, u64, u64)>,
    /// Open connections: whom each is with (peer, zone), and a copy of
    /// librqbit's loopback socket.
    open: HashMap<usize, (String, String, OwnedFd)>,
    next: usize,
}

/// Per-peer totals of the engine's peer connections.
#[derive(Debug, Clone, Default)]
pub(super) struct Traffic(Arc<Mutex<Table>>);

/// A counted connection: counted to its end when dropped.
#[derive(Debug)]
pub(super) struct Counted {
    table: Traffic,
    key: usize,
}

impl Drop for Counted {
    fn drop(&mut self) {
        let mut t = self.table.0.lock();
        if let Some((peer, zone, open)) = t.open.remove(&self.key) {
            let (up, down) = moved(&open).unwrap_or_default();
            add(&mut t.ended, peer, zone, up, down);
        }
    }
}

fn add(
    ended: &mut HashMap<String, (String, u64, u64)>,
    peer: String,
    zone: String,
    up: u64,
    down: u64,
) {
    let peer = if ended.contains_key(&peer) || ended.len() < MAX_TRAFFIC_PEERS {
        peer
    } else {
        OTHER_PEERS.to_owned()
    };
    let e = ended.entry(peer).or_insert_with(|| (zone.clone(), 0, 0));
    e.0 = zone;
    e.1 += up;
    e.2 += down;
}

impl Traffic {
    /// Counts the connection of `local` (librqbit's end of it) as traffic
    /// with `peer`, until the result is dropped. `None` if the socket
    /// could not be copied (it then goes uncounted).
    pub(super) fn count(&self, local: &QuickAck, peer: String, zone: String) -> Option<Counted> {
        let socket = local.socket().as_fd().try_clone_to_owned().ok()?;
        let mut t = self.0.lock();
        let key = t.next;
        t.next = t.next.wrapping_add(1);
        t.open.insert(key, (peer, zone, socket));
        Some(Counted {
            table: self.clone(),
            key,
        })
    }

    /// Every peer's totals, open connections included.
    fn snapshot(&self) -> Vec<PeerTraffic> {
        let t = self.0.lock();
        let mut all = t.ended.clone();
        for (peer, zone, socket) in t.open.values() {
            let (up, down) = moved(socket).unwrap_or_default();
            add(&mut all, peer.clone(), zone.clone(), up, down);
        }
        let mut out: Vec<PeerTraffic> = all
            .into_iter()
            .map(|(peer, (zone, up, down))| PeerTraffic {
                peer,
                zone,
                up,
                down,
            })
            .collect();
        out.sort_by(|a, b| a.peer.cmp(&b.peer));
        out
    }
}

/// Bytes a connection moved, from librqbit's loopback socket: what it
/// sent us went up to the peer, what we sent it came down from the peer.
fn moved(socket: &OwnedFd) -> Option<(u64, u64)> {
    let (acked, received) = crate::limits::loopback_moved(socket.as_raw_fd())?;
    Some((received, acked))
}

impl Engine {
    /// Bytes moved with each peer since the engine started (metrics:
    /// `btfs_peer_bytes_total`).
    pub fn peer_traffic(&self) -> Vec<PeerTraffic> {
        self.traffic.snapshot()
    }

    /// Whole-file fetches waiting for a prefetch worker.
    pub fn prefetch_queued(&self) -> usize {
        self.prefetch_tx.max_capacity() - self.prefetch_tx.capacity()
    }

    /// What metrics count of the engine (fetch latency, read failures,
    /// the cache).
    pub fn metrics(&self) -> &btfs_metrics::EngineMetrics {
        &self.metrics
    }

    /// Starts counting a connection with `from` (see [`Traffic::count`]).
    pub(super) fn count_traffic(&self, local: &QuickAck, from: &Remote) -> Option<Counted> {
        let (peer, zone) = match from {
            Remote::Member(m) => (m.to_string(), self.net.zone_of(m)),
            Remote::Client(a) => (a.ip().to_canonical().to_string(), None),
            Remote::Named(n) => (n.clone(), None),
        };
        self.traffic.count(local, peer, zone.unwrap_or_default())
    }

    /// [`count_traffic`](Self::count_traffic) of a member.
    pub(super) fn count_member_traffic(
        &self,
        local: &QuickAck,
        member: MemberId,
    ) -> Option<Counted> {
        self.count_traffic(local, &Remote::Member(member))
    }
}
