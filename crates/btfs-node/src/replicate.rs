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
    /// When the last one completed, in milliseconds since the Unix epoch
    /// (0: none yet): metrics show the time since (`btfs_antientropy_lag`).
    pub last_sync_ms: AtomicU64,
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
    #[error("sync task failed: {0}")]
    Task(String),
}

/// What one anti-entropy round did.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Round {
    /// Records received.
    records: usize,
    /// It stopped at its page limit: the peer has more.
    more: bool,
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
                Some(Ok(round)) => {
                    me.counters.syncs.fetch_add(1, Ordering::Relaxed);
                    me.counters
                        .last_sync_ms
                        .store(crate::metrics::unix_ms(), Ordering::Relaxed);
                    me.syncing.lock().remove(&peer);
                    if round.more {
                        // A big log (a join): the next round goes on at once,
                        // not at the next interval.
                        debug!(%peer, records = round.records, "anti-entropy: more to come");
                        me.sync_soon(peer);
                    } else if round.records > 0 {
                        info!(%peer, records = round.records, "anti-entropy: caught up");
                    }
                    return;
                }
                Some(Err(e)) => debug!(%peer, "anti-entropy round failed: {}", error_chain(&e)),
                None => {}
            }
            me.syncing.lock().remove(&peer);
        });
    }

    /// Pulls what `peer` stored since the last round, page by page; returns
    /// how many records came.
    async fn pull(&self, peer: PeerId) -> Result<Round, PullError> {
        let store = self.fs.store().clone();
        let key = progress_key(&peer);
        let mut progress: Progress = store
            .meta(&key)?
            .and_then(|b| postcard::from_bytes(&b).ok())
            .unwrap_or_default();
        let mut total = 0;
        // A peer decides how many pages there are: a round takes a bounded
        // number, and the next round goes on from the progress kept. Two
        // stages: while one page is applied, the next is fetched and
        // checked.
        let mut resp = self.fetch(peer, progress.request()).await?;
        let mut next = progress.on_response(&resp);
        let mut good = self
            .check_page(peer, std::mem::take(&mut resp.records))
            .await?;
        for _ in 0..MAX_PAGES_PER_ROUND {
            let apply = async {
                let n = good.len();
                let t = std::time::Instant::now();
                self.apply(good).await;
                debug!(%peer, records = n, took = ?t.elapsed(), "sync page applied");
                n
            };
            let Next::Continue(req) = next else {
                total += apply.await;
                store.set_meta(&key, &postcard::to_allocvec(&progress)?)?;
                return Ok(Round {
                    records: total,
                    more: false,
                });
            };
            let ahead = async {
                let t = std::time::Instant::now();
                let mut resp = self.fetch(peer, req).await?;
                let fetched = t.elapsed();
                let mut p = progress;
                let next = p.on_response(&resp);
                let good = self
                    .check_page(peer, std::mem::take(&mut resp.records))
                    .await?;
                debug!(%peer, records = good.len(), ?fetched, checked = ?t.elapsed() - fetched, "sync page fetched");
                Ok::<_, PullError>((p, next, good))
            };
            let (n, ahead) = tokio::join!(apply, ahead);
            total += n;
            // Kept only once applied: a restart asks again for what was not.
            store.set_meta(&key, &postcard::to_allocvec(&progress)?)?;
            (progress, next, good) = ahead?;
        }
        debug!(%peer, pages = MAX_PAGES_PER_ROUND, "sync round ended at its page limit; the next goes on");
        Ok(Round {
            records: total,
            more: true,
        })
    }

    /// Asks `peer` for one page of its log.
    async fn fetch(&self, peer: PeerId, req: SyncRequest) -> Result<SyncResponse, PullError> {
        let req = postcard::to_allocvec(&Rpc::Sync(req))?;
        let bytes = self
            .net
            .request(peer, req)
            .await
            .map_err(PullError::Request)?;
        SyncResponse::decode(&bytes).map_err(|e| {
            self.counters.refused.fetch_add(1, Ordering::Relaxed);
            warn!(%peer, "refused a sync response: {e}");
            PullError::Malformed(e)
        })
    }

    /// The records of a sync page worth applying: those this node does not
    /// already hold (a peer's log relays what this node sent it: no need to
    /// check those again), verified on every core, off the runtime's
    /// threads. Refused ones are counted and logged.
    async fn check_page(
        &self,
        peer: PeerId,
        records: Vec<SignedRecord>,
    ) -> Result<Vec<SignedRecord>, PullError> {
        self.counters
            .synced
            .fetch_add(records.len() as u64, Ordering::Relaxed);
        let store = self.fs.store().clone();
        let fresh = tokio::task::spawn_blocking(move || {
            records
                .into_iter()
                .filter(|r| !holds(&store, r))
                .collect::<Vec<_>>()
        })
        .await
        .map_err(|e| PullError::Task(e.to_string()))?;
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let chunk = fresh.len().div_ceil(threads).max(VERIFY_CHUNK_MIN);
        let mut parts = Vec::new();
        let mut rest = fresh;
        while !rest.is_empty() {
            let tail = rest.split_off(chunk.min(rest.len()));
            let part = std::mem::replace(&mut rest, tail);
            let (membership, cluster) = (self.membership.clone(), self.cluster.clone());
            parts.push(tokio::task::spawn_blocking(move || {
                part.into_iter()
                    .map(|r| {
                        let v = membership.verify(&cluster, &r);
                        (r, v)
                    })
                    .collect::<Vec<_>>()
            }));
        }
        let mut good = Vec::new();
        for part in parts {
            let part = part.await.map_err(|e| PullError::Task(e.to_string()))?;
            for (r, v) in part {
                match v {
                    Ok(()) => good.push(r),
                    Err(e) => {
                        self.counters.refused.fetch_add(1, Ordering::Relaxed);
                        warn!(%peer, "refused a synced record: {e}");
                    }
                }
            }
        }
        Ok(good)
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

/// Whether the store holds exactly this version (signature too) at its
/// path: then it was verified when it first came.
fn holds<B: Backend>(store: &Store<B>, r: &SignedRecord) -> bool {
    store.get(&r.path).ok().flatten().is_some_and(|e| {
        e.sync
            .versions
            .iter()
            .any(|v| v.record == r.record && v.signature == r.signature)
    })
}

/// Records one verifying thread takes at least (below it, a thread costs
/// more than it saves).
const VERIFY_CHUNK_MIN: usize = 64;

/// Log entries read per step when the announcer catches up from the log.
const BACKLOG_PAGE: usize = 512;

/// Gossips new local versions in paced batches, until the announcements
/// end or the node stops. Versions whose announcement did not fit in the
/// queue are read back from the store's log (see
/// [`FsHandle::take_announce_backlog`]) and go out at the same pace: a
/// burst larger than the queue is paced, never left to anti-entropy.
pub(crate) async fn publish_loop<T: Transport, B: Backend>(
    net: T,
    fs: FsHandle<B>,
    mut announce: mpsc::Receiver<Announced>,
    counters: Arc<Counters>,
    cancel: CancellationToken,
) {
    let mut out = Publisher {
        net,
        counters,
        pace: tokio::time::interval(GOSSIP_PACE),
        batch: Vec::new(),
        bytes: 0,
    };
    out.pace
        .set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if let Some(since) = fs.take_announce_backlog() {
            if cancel
                .run_until_cancelled(catch_up(&fs, since, &mut out))
                .await
                .is_none()
            {
                return;
            }
            continue;
        }
        let first = tokio::select! {
            a = announce.recv() => a,
            () = cancel.cancelled() => None,
        };
        let Some(first) = first else { return };
        let mut next = Some(first);
        while let Some(a) = next.take() {
            if out.push(a) {
                break;
            }
            next = announce.try_recv().ok();
        }
        out.send().await;
    }
}

/// The batch being filled, and where it goes.
struct Publisher<T> {
    net: T,
    counters: Arc<Counters>,
    pace: tokio::time::Interval,
    batch: Vec<Vec<u8>>,
    bytes: usize,
}

impl<T: Transport> Publisher<T> {
    /// Adds `a`; true when the batch is full.
    fn push(&mut self, a: Announced) -> bool {
        let r = SignedRecord {
            path: a.path,
            record: a.version.record,
            signature: a.version.signature,
        };
        match r.encode() {
            Ok(b) => {
                self.bytes += b.len() + 4;
                self.batch.push(b);
            }
            Err(e) => warn!("could not encode a record for gossip: {e}"),
        }
        self.bytes + MAX_RECORD + 4 > MAX_BATCH
    }

    /// Sends the batch, at most one message per `GOSSIP_PACE`.
    async fn send(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.batch);
        self.bytes = 0;
        let n = batch.len() as u64;
        let Ok(msg) = SignedRecord::encode_batch(&batch) else {
            return;
        };
        self.pace.tick().await;
        match self.net.publish(Topic::Records, msg).await {
            Ok(()) => {
                self.counters.published.fetch_add(n, Ordering::Relaxed);
            }
            // Alone: the records stay in the store for anti-entropy.
            Err(MeshError::NoPeers) => {}
            Err(e) => debug!("gossip failed: {e}"),
        }
    }
}

/// Announces this node's versions written after log number `since`, read
/// back from the log page by page, up to the log's end as it is now.
async fn catch_up<T: Transport, B: Backend>(
    fs: &FsHandle<B>,
    mut since: u64,
    out: &mut Publisher<T>,
) {
    let me = fs.node();
    let store = fs.store().clone();
    let Ok(end) = store.max_seq() else { return };
    debug!(since, end, "announcing a backlog from the log");
    while since < end {
        let s = store.clone();
        let page = match tokio::task::spawn_blocking(move || s.log_since(since, BACKLOG_PAGE)).await
        {
            Ok(Ok(page)) => page,
            Ok(Err(e)) => {
                warn!("could not read the record log for announcing: {e}");
                return;
            }
            Err(e) => {
                warn!("log read task failed: {e}");
                return;
            }
        };
        let Some(last) = page.last().map(|(seq, _)| *seq) else {
            return;
        };
        for (seq, item) in page {
            if seq > end {
                break;
            }
            let Some((path, entry)) = item else { continue };
            for version in entry.sync.versions {
                if version.record.author == me
                    && out.push(Announced {
                        path: path.clone(),
                        version,
                    })
                {
                    out.send().await;
                }
            }
        }
        out.send().await;
        since = last;
    }
}
