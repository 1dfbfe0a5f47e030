//! The node's long-lived loops and what they share: the gossip validator,
//! the event loop that routes the transport's events to replication and to
//! the content side, periodic anti-entropy, the status view of the mesh,
//! and the collector of released objects and expired tombstones.

use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use btfs_fs::FsHandle;
use btfs_mesh::{Mesh, Topic};
use btfs_store::Backend;
use btfs_sync::SignedRecord;
use btfs_torrent::Engine;
use libp2p_identity::PeerId;
use tokio::sync::{mpsc, watch};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, info, warn};

use crate::{
    Counters, Membership, MeshView, NetEvent, Transport, error_chain,
    holdings::{HOLDINGS_SETTLE, Holdings},
    replicate::{Replicator, SYNC_INTERVAL},
    rpc::Rpc,
    wires::MeshNet,
};

/// How often the status view of the mesh is refreshed.
const PEERS_REFRESH: Duration = Duration::from_millis(250);
/// How often expired tombstones are looked for.
const TOMBSTONE_INTERVAL: Duration = Duration::from_secs(600);
/// How often released objects are deleted (after the store is flushed).
const GC_INTERVAL: Duration = Duration::from_secs(1);
/// Bounds of how often history past its window is collected.
const HISTORY_MIN_INTERVAL: Duration = Duration::from_secs(1);
const HISTORY_MAX_INTERVAL: Duration = Duration::from_secs(60);

/// The mesh's gossip validator: every record of a batch checked (shape,
/// signature, membership), holdings bounded; refusals counted.
pub(crate) fn validator(
    cluster: String,
    membership: Membership,
    counters: Arc<Counters>,
) -> btfs_mesh::Validator {
    Arc::new(move |source: &PeerId, topic: Topic, bytes: &[u8]| {
        let checked = match topic {
            Topic::Records => SignedRecord::decode_batch(bytes)
                .and_then(|batch| {
                    batch
                        .iter()
                        .try_for_each(|r| membership.verify(&cluster, r))
                })
                .map_err(|e| error_chain(&e)),
            Topic::Holdings => Holdings::decode(bytes)
                .map(drop)
                .map_err(|e| error_chain(&e)),
        };
        match checked {
            Ok(()) => true,
            Err(e) => {
                counters.refused.fetch_add(1, Ordering::Relaxed);
                warn!(%source, ?topic, "refused gossip: {e}");
                false
            }
        }
    })
}

/// The content side of the node's events: holdings, direct wires and
/// metainfo requests.
#[derive(Debug)]
pub(crate) struct ContentPlane {
    pub(crate) net: Arc<MeshNet>,
    pub(crate) engine: Arc<Engine>,
    /// An announcement of all holdings is due.
    pub(crate) reannounce_due: std::sync::atomic::AtomicBool,
}

impl ContentPlane {
    /// A member came up: announce all this node holds, soon (one
    /// announcement for the members that come up meanwhile).
    fn reannounce_soon(self: &Arc<Self>, tasks: &TaskTracker, cancel: &CancellationToken) {
        if self.reannounce_due.swap(true, Ordering::AcqRel) {
            return;
        }
        let (me, cancel) = (self.clone(), cancel.clone());
        tasks.spawn(async move {
            if cancel
                .run_until_cancelled(tokio::time::sleep(HOLDINGS_SETTLE))
                .await
                .is_none()
            {
                return;
            }
            me.reannounce_due.store(false, Ordering::Release);
            let engine = me.engine.clone();
            let _ = tokio::task::spawn_blocking(move || engine.announce_holdings()).await;
        });
    }

    fn holdings(&self, source: PeerId, data: &[u8]) {
        let Ok(h) = Holdings::decode(data) else {
            return;
        };
        debug!(%source, held = h.held.len(), dropped = h.dropped.len(), "holdings");
        self.engine.note_holdings(&source, &h.held, &h.dropped);
    }

    fn answer_wire(&self) -> Vec<u8> {
        let addr = self
            .net
            .wire_direct()
            .then(|| self.engine.listen_addr())
            .flatten();
        postcard::to_allocvec(&addr).unwrap_or_default()
    }

    fn answer_metainfo(&self, ih: [u8; 20]) -> Vec<u8> {
        let ih = btfs_core::InfoHash(ih);
        let bytes = self.engine.local_metainfo(&ih).unwrap_or_default();
        if !bytes.is_empty() {
            self.engine.warm(ih, "metainfo request".into());
        }
        bytes
    }
}

/// Routes the transport's events to replication and to the content side
/// (`None` in tests of records alone), until the events end or the node
/// stops.
pub(crate) async fn event_loop<T: Transport, B: Backend, E: Into<NetEvent>>(
    mut events: mpsc::Receiver<E>,
    rep: Arc<Replicator<T, B>>,
    content: Option<Arc<ContentPlane>>,
    tasks: TaskTracker,
    cancel: CancellationToken,
) {
    loop {
        let event = tokio::select! {
            e = events.recv() => e,
            () = cancel.cancelled() => None,
        };
        let Some(event) = event else { return };
        match event.into() {
            NetEvent::PeerUp(p, ip) => {
                info!(peer = %p, "peer up");
                rep.peer_up(p);
                if let Some(c) = &content {
                    c.net.peer_up(p, ip, &tasks, &cancel);
                    c.reannounce_soon(&tasks, &cancel);
                }
            }
            NetEvent::PeerDown(p) => {
                info!(peer = %p, "peer down");
                rep.peer_down(&p);
                if let Some(c) = &content {
                    c.net.peer_down(&p);
                }
            }
            NetEvent::PeerZone(p, zone) => {
                debug!(peer = %p, zone = ?zone.as_ref().map(|z| z.as_str()), "peer's zone");
                if let Some(c) = &content {
                    c.net.peer_zone(&p, zone);
                }
            }
            NetEvent::Gossip {
                topic: Topic::Holdings,
                source,
                data,
            } => {
                if let Some(c) = &content {
                    c.holdings(source, &data);
                }
            }
            NetEvent::Gossip {
                topic: Topic::Records,
                source,
                data,
            } => rep.gossip(source, &data).await,
            NetEvent::Request { peer, data, reply } => {
                let (rep, content) = (rep.clone(), content.clone());
                let cancel = cancel.clone();
                tasks.spawn(async move {
                    let answer = async {
                        match postcard::from_bytes::<Rpc>(&data) {
                            Ok(Rpc::Sync(req)) => rep.answer(req).await,
                            Ok(Rpc::Wire) => content.map(|c| c.answer_wire()).unwrap_or_default(),
                            Ok(Rpc::Metainfo(ih)) => {
                                content.map(|c| c.answer_metainfo(ih)).unwrap_or_default()
                            }
                            Err(_) => Vec::new(),
                        }
                    };
                    let Some(answer) = cancel.run_until_cancelled(answer).await else {
                        return;
                    };
                    if let Err(e) = reply.send(answer).await {
                        debug!(%peer, "could not answer a sync request: {e}");
                    }
                });
            }
        }
    }
}

/// Asks every connected peer for what it stored since, every
/// `SYNC_INTERVAL`.
pub(crate) async fn periodic_sync<T: Transport, B: Backend>(
    rep: Arc<Replicator<T, B>>,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(SYNC_INTERVAL);
    tick.tick().await;
    while cancel.run_until_cancelled(tick.tick()).await.is_some() {
        rep.sync_all();
    }
}

/// Refreshes the status view of the mesh.
pub(crate) async fn mesh_view(mesh: Mesh, tx: watch::Sender<MeshView>, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(PEERS_REFRESH);
    while cancel.run_until_cancelled(tick.tick()).await.is_some() {
        let (Ok(peers), Ok(listen), Ok(mdns)) = (
            mesh.peers().await,
            mesh.listen_addrs().await,
            mesh.mdns_status().await,
        ) else {
            return;
        };
        let view = MeshView {
            peers,
            listen: listen.iter().map(ToString::to_string).collect(),
            mdns,
        };
        if tx.send(view).is_err() {
            return;
        }
    }
}

/// Deletes released objects every `GC_INTERVAL`, and forgets expired
/// tombstones every `TOMBSTONE_INTERVAL`.
/// How often history past its window is looked for: a tenth of the
/// window, between [`HISTORY_MIN_INTERVAL`] and [`HISTORY_MAX_INTERVAL`]
/// (each look reads every history item).
fn history_interval(window: Option<Duration>) -> Duration {
    window
        .map_or(HISTORY_MAX_INTERVAL, |w| w / 10)
        .clamp(HISTORY_MIN_INTERVAL, HISTORY_MAX_INTERVAL)
}

pub(crate) async fn collect<B: Backend>(
    fs: FsHandle<B>,
    retention: Duration,
    history: Option<Duration>,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(GC_INTERVAL);
    let mut tombstones = tokio::time::interval(TOMBSTONE_INTERVAL);
    let mut past_window = tokio::time::interval(history_interval(history));
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
            _ = past_window.tick() => {
                // What it releases goes at the next garbage collection.
                let h = fs.clone();
                match tokio::task::spawn_blocking(move || h.collect_history(history)).await {
                    Ok(Ok(n)) if n > 0 => debug!(released = n, "history past its window forgotten"),
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => warn!("history collection failed: {e}"),
                    Err(e) => warn!("history collection task failed: {e}"),
                }
                continue;
            }
            _ = tombstones.tick() => {
                let h = fs.clone();
                match tokio::task::spawn_blocking(move || h.collect_tombstones(retention)).await {
                    Ok(Ok(n)) if n > 0 => info!(collected = n, "forgot expired tombstones"),
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => warn!("tombstone collection failed: {e}"),
                    Err(e) => warn!("tombstone collection task failed: {e}"),
                }
                continue;
            }
        }
        let h = fs.clone();
        match tokio::task::spawn_blocking(move || h.collect_garbage()).await {
            Ok(Ok(n)) if n > 0 => debug!(deleted = n, "collected unreferenced objects"),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => warn!("garbage collection failed: {e}"),
            Err(e) => warn!("garbage collection task failed: {e}"),
        }
    }
}
