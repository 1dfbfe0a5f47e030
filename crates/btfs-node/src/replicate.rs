//! Replication of records: new local versions go out as paced gossip
//! batches; gossip received (already checked by the transport's validator)
//! is applied; anti-entropy pulls what a peer stored since the last round
//! (its log, page by page) when the peer comes up and every
//! `SYNC_INTERVAL`, and answers the same requests from this node's log.
//! Every synced record is verified again, since records are relayed.
//! Progress per peer is kept in the store, so a restart asks only for what
//! is new.

use std::{
    collections::HashSet,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use btfs_fs::{Announced, FsHandle};
use btfs_mesh::{MeshError, Topic};
use btfs_store::{Backend, Store, Version};
use btfs_sync::{
    MAX_BATCH, MAX_RECORD, SignedRecord,
    antientropy::{self, Log, Next, Progress, SyncRequest, SyncResponse},
};
use libp2p_identity::PeerId;
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, info, warn};

use crate::{Content, error_chain, membership::Membership, rpc::Rpc, transport::Transport};

/// Least time between two gossip messages: a burst of changes goes out as
/// full batches at this pace (about 50 messages, some 8,000 records, a second).
const GOSSIP_PACE: Duration = Duration::from_millis(20);
/// Pages of records one sync round asks a peer for at most.
const MAX_PAGES_PER_ROUND: usize = 256;
/// How often every connected peer is asked for what it stored since.
pub(crate) const SYNC_INTERVAL: Duration = Duration::from_secs(15);

/// Record counts, for `btfs status`.
#[derive(Debug, Default)]
pub struct Counters {
    /// Local versions gossiped.
    pub published: AtomicU64,
    /// Records received by gossip.
    pub received: AtomicU64,
    /// Records received by anti-entropy.
    pub synced: AtomicU64,
    /// Records refused (bad shape, signature, unknown author...), by
    /// anti-entropy, or as gossip messages by the mesh's validator (one a
    /// message).
    pub refused: AtomicU64,
    /// Records stored next to a concurrent version (conflicts seen).
    pub merged: AtomicU64,
    /// Completed anti-entropy rounds.
    pub syncs: AtomicU64,
    /// Peer wires this node opened straight to a member.
    pub wires_direct: AtomicU64,
    /// Peer wires this node opened as streams inside the mesh.
    pub wires_mesh: AtomicU64,
}

/// Why a sync round stopped early.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PullError {
    #[error("sync request")]
    Request(#[source] MeshError),
    #[error("malformed sync response")]
    Malformed(#[source] btfs_sync::WireError),
    #[error("record log")]
    Store(#[from] btfs_store::StoreError),
    #[error("encoding")]
    Encode(#[from] postcard::Error),
}

/// This node's store as an anti-entropy log.
struct StoreLog<'a, B: Backend>(&'a Store<B>);

impl<B: Backend> Log for StoreLog<'_, B> {
    fn index_id(&self) -> u64 {
        self.0.index_id()
    }

    fn max_seq(&self) -> u64 {
        self.0.max_seq().unwrap_or(0)
    }

    fn since(&self, since: u64, limit: usize) -> Vec<(u64, Vec<SignedRecord>)> {
        match self.0.log_since(since, limit) {
            Ok(page) => page
                .into_iter()
                .map(|(seq, e)| {
                    let records = e
                        .map(|(path, e)| {
                            e.sync
                                .versions
                                .into_iter()
                                .map(|v| SignedRecord {
                                    path: path.clone(),
                                    record: v.record,
                                    signature: v.signature,
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    (seq, records)
                })
                .collect(),
            Err(e) => {
                warn!("could not read the record log: {e}");
                Vec::new()
            }
        }
    }
}

fn progress_key(peer: &PeerId) -> String {
    format!("progress/{peer}")
}

/// Replication's state, shared by the node's tasks.
pub(crate) struct Replicator<T, B> {
    pub(crate) net: T,
    pub(crate) fs: FsHandle<B>,
    cluster: String,
    membership: Membership,
    pub(crate) counters: Arc<Counters>,
    /// Peers with an anti-entropy round under way.
    syncing: Mutex<HashSet<PeerId>>,
    /// Connected peers (shared with the content side).
    pub(crate) connected: Arc<Mutex<HashSet<PeerId>>>,
    /// Where arrived records go for the prefetch policy (`None`: no content).
    content: Option<Arc<Content>>,
    /// Sync rounds and answers under way.
    tasks: TaskTracker,
    cancel: CancellationToken,
}

impl<T, B> std::fmt::Debug for Replicator<T, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replicator")
            .field("cluster", &self.cluster)
            .finish_non_exhaustive()
    }
}

impl<T: Transport, B: Backend> Replicator<T, B> {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        net: T,
        fs: FsHandle<B>,
        cluster: String,
        membership: Membership,
        counters: Arc<Counters>,
        connected: Arc<Mutex<HashSet<PeerId>>>,
        content: Option<Arc<Content>>,
        tasks: TaskTracker,
        cancel: CancellationToken,
    ) -> Self {
        Self {
            net,
            fs,
            cluster,
            membership,
            counters,
            syncing: Mutex::new(HashSet::new()),
            connected,
            content,
            tasks,
            cancel,
        }
    }

    /// Applies verified records in order, off the runtime's threads.
    pub(crate) async fn apply(&self, records: Vec<SignedRecord>) {
        let fs = self.fs.clone();
        let counters = self.counters.clone();
        let content = self.content.clone();
        let done = tokio::task::spawn_blocking(move || {
            for r in records {
                let path = r.path.clone();
                let version = Version {
                    record: r.record.clone(),
                    signature: r.signature,
                };
                let applied = fs.apply_remote(r.path, version);
                if let (Ok(btfs_fs::Applied::Stored | btfs_fs::Applied::Merged), Some(c)) =
                    (&applied, &content)
                {
                    c.arrived(&path, &r.record);
                }
                match applied {
                    Ok(btfs_fs::Applied::Merged) => {
                        counters.merged.fetch_add(1, Ordering::Relaxed);
                        info!(%path, "concurrent versions: conflict resolved deterministically");
                    }
                    Ok(btfs_fs::Applied::Blocked) => {
                        warn!(%path, "a file stands where this record's parent directory should be: not applied yet");
                    }
                    Ok(outcome) => debug!(%path, ?outcome, "remote record"),
                    Err(e) => warn!(%path, "could not apply a remote record: {e}"),
                }
            }
        })
        .await;
        if let Err(e) = done {
            warn!("apply task failed: {e}");
        }
    }

    /// A gossip batch of records (the transport delivers only payloads its
    /// validator accepted).
    pub(crate) async fn gossip(&self, source: PeerId, data: &[u8]) {
        let Ok(batch) = SignedRecord::decode_batch(data) else {
            return;
        };
        debug!(%source, records = batch.len(), "gossip");
        self.counters
            .received
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        self.apply(batch).await;
    }

    pub(crate) fn peer_up(self: &Arc<Self>, peer: PeerId) {
        self.connected.lock().insert(peer);
        self.sync_soon(peer);
    }

    pub(crate) fn peer_down(&self, peer: &PeerId) {
        self.connected.lock().remove(peer);
    }

    /// Starts a round with every connected peer.
    pub(crate) fn sync_all(self: &Arc<Self>) {
        let peers: Vec<PeerId> = self.connected.lock().iter().copied().collect();
        for p in peers {
            self.sync_soon(p);
        }
    }

    /// Starts an anti-entropy round with `peer` unless one is under way.
    pub(crate) fn sync_soon(self: &Arc<Self>, peer: PeerId) {
        if !self.syncing.lock().insert(peer) {
            return;
        }
        let me = self.clone();
        self.tasks.spawn(async move {
            match me.cancel.run_until_cancelled(me.pull(peer)).await {
                Some(Ok(n)) => {
                    me.counters.syncs.fetch_add(1, Ordering::Relaxed);
                    if n > 0 {
                        info!(%peer, records = n, "anti-entropy: caught up");
                    }
                }
                Some(Err(e)) => debug!(%peer, "anti-entropy round failed: {}", error_chain(&e)),
                None => {}
            }
            me.syncing.lock().remove(&peer);
        });
    }

    /// Pulls what `peer` stored since the last round, page by page; returns
    /// how many records came.
    async fn pull(&self, peer: PeerId) -> Result<usize, PullError> {
        let store = self.fs.store().clone();
        let key = progress_key(&peer);
        let mut progress: Progress = store
            .meta(&key)?
            .and_then(|b| postcard::from_bytes(&b).ok())
            .unwrap_or_default();
        let mut total = 0;
        // A peer decides how many pages there are: a round takes a bounded
        // number, and the next round goes on from the progress kept.
        for _ in 0..MAX_PAGES_PER_ROUND {
            let req = postcard::to_allocvec(&Rpc::Sync(progress.request()))?;
            let bytes = self
                .net
                .request(peer, req)
                .await
                .map_err(PullError::Request)?;
            let resp = match SyncResponse::decode(&bytes) {
                Ok(r) => r,
                Err(e) => {
                    self.counters.refused.fetch_add(1, Ordering::Relaxed);
                    warn!(%peer, "refused a sync response: {e}");
                    return Err(PullError::Malformed(e));
                }
            };
            let mut good = Vec::with_capacity(resp.records.len());
            for r in &resp.records {
                match self.membership.verify(&self.cluster, r) {
                    Ok(()) => good.push(r.clone()),
                    Err(e) => {
                        self.counters.refused.fetch_add(1, Ordering::Relaxed);
                        warn!(%peer, "refused a synced record: {e}");
                    }
                }
            }
            total += good.len();
            self.counters
                .synced
                .fetch_add(good.len() as u64, Ordering::Relaxed);
            self.apply(good).await;
            let next = progress.on_response(&resp);
            store.set_meta(&key, &postcard::to_allocvec(&progress)?)?;
            if next == Next::Done {
                return Ok(total);
            }
        }
        debug!(%peer, pages = MAX_PAGES_PER_ROUND, "sync round ended at its page limit; the next goes on");
        Ok(total)
    }

    /// Answers a peer's sync request from the store's log.
    pub(crate) async fn answer(&self, req: SyncRequest) -> Vec<u8> {
        let store = self.fs.store().clone();
        let resp =
            tokio::task::spawn_blocking(move || antientropy::answer(&StoreLog(&store), &req)).await;
        match resp.map(|r| postcard::to_allocvec(&r)) {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => {
                warn!("could not encode a sync response: {e}");
                Vec::new()
            }
            Err(e) => {
                warn!("sync answer task failed: {e}");
                Vec::new()
            }
        }
    }
}

/// Gossips new local versions in paced batches, until the announcements
/// end or the node stops.
pub(crate) async fn publish_loop<T: Transport>(
    net: T,
    mut announce: mpsc::Receiver<Announced>,
    counters: Arc<Counters>,
    cancel: CancellationToken,
) {
    let mut pace = tokio::time::interval(GOSSIP_PACE);
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let encode = |a: Announced| {
        SignedRecord {
            path: a.path,
            record: a.version.record,
            signature: a.version.signature,
        }
        .encode()
    };
    loop {
        let first = tokio::select! {
            a = announce.recv() => a,
            () = cancel.cancelled() => None,
        };
        let Some(first) = first else { return };
        let mut batch = Vec::new();
        let mut bytes = 0;
        let mut next = Some(first);
        while let Some(a) = next.take() {
            match encode(a) {
                Ok(b) => {
                    bytes += b.len() + 4;
                    batch.push(b);
                }
                Err(e) => warn!("could not encode a record for gossip: {e}"),
            }
            if bytes + MAX_RECORD + 4 > MAX_BATCH {
                break;
            }
            next = announce.try_recv().ok();
        }
        if batch.is_empty() {
            continue;
        }
        let n = batch.len() as u64;
        let Ok(msg) = SignedRecord::encode_batch(&batch) else {
            continue;
        };
        pace.tick().await;
        match net.publish(Topic::Records, msg).await {
            Ok(()) => {
                counters.published.fetch_add(n, Ordering::Relaxed);
            }
            // Alone: the records stay in the store for anti-entropy.
            Err(MeshError::NoPeers) => {}
            Err(e) => debug!("gossip failed: {e}"),
        }
    }
}
