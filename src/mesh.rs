//! The cluster mesh in the daemon: configuration from the mount options, and
//! the tasks around it.
//!
//! * New local versions are gossiped in batches (one message carries up to
//!   `MAX_BATCH` bytes of records), paced so that a burst of thousands of
//!   changes does not overflow gossipsub's queues.
//! * Gossip received is verified by the mesh's validator (every record of a
//!   batch: shape, signature, membership) before it is applied.
//! * Anti-entropy pulls what a peer stored since the last sync (its log,
//!   page by page) when the peer comes up and every `SYNC_INTERVAL`; every
//!   record is verified again, since records are relayed. Progress per peer
//!   is kept in the store, so a restart asks only for what is new.

use std::{
    collections::HashSet,
    net::SocketAddr,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result, bail};
use btfs_core::{ContentId, NodeId};
use btfs_fs::{Announced, FsHandle};
use btfs_mesh::{Mesh, MeshConfig, MeshError, MeshEvent, PeerInfo, Topic};
use btfs_store::{SledBackend, Store, Version};
use btfs_sync::{
    MAX_BATCH, MAX_RECORD, SignedRecord,
    antientropy::{self, Log, Next, Progress, SyncRequest, SyncResponse},
};
use libp2p_identity::{Keypair, PeerId, PublicKey, ed25519};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use crate::{
    content::{Content, MeshNet},
    daemon::MountPlan,
};

/// Requests between members.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Rpc {
    /// Anti-entropy: records stored since.
    Sync(SyncRequest),
    /// The `.torrent` of an info hash (empty answer: not here).
    Metainfo([u8; 20]),
    /// Where the peer takes direct peer wires: an `Option<SocketAddr>`
    /// (`None`: only through the mesh, `bt_wire=mesh`).
    Wire,
}

/// A holdings announcement: content the sender now holds in full, and
/// content it no longer holds. Gossiped on its own topic; the sender is the
/// (signed) gossip source.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct Holdings {
    pub held: Vec<ContentId>,
    pub dropped: Vec<ContentId>,
    /// When it was sent (ms since the epoch): gossipsub drops a payload it
    /// has seen, and an announcement repeated for a new member is the same
    /// list.
    pub at: u64,
}

/// Content ids one holdings message carries at most (32 KiB of ids).
const MAX_HOLDINGS: usize = 1024;
/// The bytes of the largest holdings message (ids, lengths and time).
const MAX_HOLDINGS_BYTES: usize = MAX_HOLDINGS * 32 + 64;
/// Holdings changes waiting to be gossiped; more are dropped (they are
/// hints: readers fall back to every member).
pub(crate) const HOLDINGS_QUEUE: usize = 1024;
/// Holdings changes waiting in the gossip task at most; beyond, new ones are
/// dropped with a log line (hints again).
const MAX_PENDING_HOLDINGS: usize = 200_000;
/// Least time between two holdings messages.
const HOLDINGS_PACE: Duration = Duration::from_millis(100);
/// When a member comes up, this node announces all it holds this much later:
/// time for gossipsub to learn the member's subscriptions, and for members
/// coming up together (a cluster restarting) to share one announcement.
const HOLDINGS_SETTLE: Duration = Duration::from_secs(2);

impl Holdings {
    fn is_empty(&self) -> bool {
        self.held.is_empty() && self.dropped.is_empty()
    }

    /// Adds a change; the latest word on a content id wins. Past
    /// `MAX_PENDING_HOLDINGS` the change is dropped.
    fn add(&mut self, (held, dropped): (Vec<ContentId>, Vec<ContentId>)) {
        if self.held.len() + self.dropped.len() + held.len() + dropped.len() > MAX_PENDING_HOLDINGS
        {
            return debug!(
                held = held.len(),
                dropped = dropped.len(),
                "holdings backlog full: a change is not announced"
            );
        }
        if !dropped.is_empty() {
            let gone: HashSet<&ContentId> = dropped.iter().collect();
            self.held.retain(|c| !gone.contains(c));
        }
        if !held.is_empty() && !self.dropped.is_empty() {
            let back: HashSet<&ContentId> = held.iter().collect();
            self.dropped.retain(|c| !back.contains(c));
        }
        self.held.extend(held);
        self.dropped.extend(dropped);
    }

    /// Takes at most `n` entries off the front.
    fn take(&mut self, n: usize) -> Holdings {
        let h = self.held.len().min(n);
        let d = self.dropped.len().min(n - h);
        Holdings {
            held: self.held.drain(..h).collect(),
            dropped: self.dropped.drain(..d).collect(),
            at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
        }
    }

    /// Decodes a member's holdings message: bytes bounded first (postcard
    /// allocates no more than the input holds), then the entry count.
    fn decode(bytes: &[u8]) -> Result<Self> {
        if bytes.len() > MAX_HOLDINGS_BYTES {
            bail!("holdings message of {} bytes", bytes.len());
        }
        let h: Holdings = postcard::from_bytes(bytes).context("malformed holdings")?;
        if h.held.len() + h.dropped.len() > MAX_HOLDINGS {
            bail!("holdings message with more than {MAX_HOLDINGS} entries");
        }
        Ok(h)
    }
}

/// How often the status view of the mesh is refreshed.
const PEERS_REFRESH: Duration = Duration::from_millis(250);
/// Least time between two gossip messages: a burst of changes goes out as
/// full batches at this pace (about 50 messages, some 8,000 records, a second).
const GOSSIP_PACE: Duration = Duration::from_millis(20);
/// Pages of records one sync round asks a peer for at most.
const MAX_PAGES_PER_ROUND: usize = 256;
/// How often every connected peer is asked for what it stored since.
const SYNC_INTERVAL: Duration = Duration::from_secs(15);

/// What `btfs status` shows about the mesh.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct PeersView {
    pub peers: Vec<PeerInfo>,
    pub listen: Vec<String>,
    pub mdns: btfs_mesh::MdnsStatus,
}

fn multiaddr(a: SocketAddr) -> String {
    match a {
        SocketAddr::V4(v4) => format!("/ip4/{}/tcp/{}", v4.ip(), v4.port()),
        SocketAddr::V6(v6) => format!("/ip6/{}/tcp/{}", v6.ip(), v6.port()),
    }
}

/// Bootstrap peers from `peers_file=`: one `IP:PORT` (or multiaddr) a line,
/// `#` comments allowed.
fn read_peers_file(path: &Path) -> Result<Vec<String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("peers file {}", path.display()))?;
    text.lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .map(|l| {
            if l.starts_with('/') {
                Ok(l.to_owned())
            } else {
                l.parse::<SocketAddr>()
                    .map(multiaddr)
                    .with_context(|| format!("peers file {}: {l:?} is not IP:PORT", path.display()))
            }
        })
        .collect()
}

/// Peers from `members=`: one peer id a line, admitted; `removed PEER_ID`
/// for a former member, refused, whose id may still stand in the version
/// vectors of the paths it once changed. Returns (members, former).
fn read_members(path: &Path) -> Result<(HashSet<PeerId>, HashSet<PeerId>)> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("members file {}", path.display()))?;
    let (mut members, mut former) = (HashSet::new(), HashSet::new());
    for l in text
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
    {
        let (set, id) = match l.strip_prefix("removed ") {
            Some(id) => (&mut former, id.trim()),
            None => (&mut members, l),
        };
        match id.parse::<PeerId>() {
            Ok(p) => {
                set.insert(p);
            }
            Err(e) => bail!(
                "members file {}: {l:?} is not a peer id or `removed PEER_ID` ({e})",
                path.display()
            ),
        }
    }
    if let Some(both) = members.intersection(&former).next() {
        bail!(
            "members file {}: {both} is listed both as a member and as removed",
            path.display()
        );
    }
    Ok((members, former))
}

/// The libp2p peer id of a node id (its ed25519 public key).
pub(crate) fn peer_of(node: &NodeId) -> Option<PeerId> {
    ed25519::PublicKey::try_from_bytes(&node.0)
        .ok()
        .map(|k| PublicKey::from(k).to_peer_id())
}

/// Who may author records: everyone holding the key, or the `members=` list;
/// and whose ids may stand in a record's version vector: those, and the
/// members marked `removed`.
#[derive(Debug, Clone)]
pub(crate) struct Membership(Option<Arc<(HashSet<PeerId>, HashSet<PeerId>)>>);

impl Membership {
    fn admits(&self, n: &NodeId) -> bool {
        match (&self.0, peer_of(n)) {
            (None, _) => true,
            (Some(m), Some(p)) => m.0.contains(&p),
            (Some(_), None) => false,
        }
    }

    fn knows(&self, n: &NodeId) -> bool {
        match (&self.0, peer_of(n)) {
            (None, _) => true,
            (Some(m), Some(p)) => m.0.contains(&p) || m.1.contains(&p),
            (Some(_), None) => false,
        }
    }

    /// Checks a signed record against this membership (see
    /// [`SignedRecord::verify_with`]).
    fn verify(&self, cluster: &str, r: &SignedRecord) -> Result<(), btfs_sync::WireError> {
        r.verify_with(cluster, |n| self.admits(n), |n| self.knows(n))
    }
}

/// What [`config`] decides before the mesh starts.
#[derive(Debug)]
pub(crate) struct MeshSetup {
    pub cfg: MeshConfig,
    pub membership: Membership,
    /// The record counters: the gossip validator counts what it refuses.
    pub counters: Arc<Counters>,
}

/// The mesh's configuration, who is admitted, and the record counters.
pub(crate) fn config(plan: &MountPlan, keypair: Keypair) -> Result<MeshSetup> {
    let o = &plan.opts;
    let listen = multiaddr(o.mesh_listen());
    let mut bootstrap: Vec<String> = o.peers.iter().copied().map(multiaddr).collect();
    if let Some(f) = &o.peers_file {
        bootstrap.extend(read_peers_file(f)?);
    }
    let members = o.members.as_deref().map(read_members).transpose()?;
    let membership = Membership(members.clone().map(Arc::new));
    let members = members.map(|(m, _)| m);
    let cluster = plan.name.clone();
    let admitted = membership.clone();
    let counters = Arc::new(Counters::default());
    let refused = counters.clone();
    let validate = Arc::new(move |source: &PeerId, topic: Topic, bytes: &[u8]| {
        let checked = match topic {
            Topic::Records => SignedRecord::decode_batch(bytes)
                .and_then(|batch| batch.iter().try_for_each(|r| admitted.verify(&cluster, r)))
                .map_err(anyhow::Error::from),
            Topic::Holdings => Holdings::decode(bytes).map(drop),
        };
        match checked {
            Ok(()) => true,
            Err(e) => {
                refused.refused.fetch_add(1, Ordering::Relaxed);
                warn!(%source, ?topic, "refused gossip: {e:#}");
                false
            }
        }
    });
    let parse = |a: &str| a.parse().with_context(|| format!("mesh address {a}"));
    let cfg = MeshConfig {
        cluster: plan.name.clone(),
        keypair,
        psk: plan.psk,
        listen: vec![parse(&listen)?],
        bootstrap: bootstrap.iter().map(|a| parse(a)).collect::<Result<_>>()?,
        mdns: o.mdns,
        members,
        validate,
    };
    Ok(MeshSetup {
        cfg,
        membership,
        counters,
    })
}

/// Record counts, for `btfs status`.
#[derive(Debug, Default)]
pub(crate) struct Counters {
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

/// This node's store as an anti-entropy log.
struct StoreLog<'a>(&'a Store<SledBackend>);

impl Log for StoreLog<'_> {
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

/// Shared by the mesh tasks.
struct Replicator {
    mesh: Mesh,
    fs: FsHandle<SledBackend>,
    cluster: String,
    membership: Membership,
    counters: Arc<Counters>,
    /// Peers with an anti-entropy round under way.
    syncing: std::sync::Mutex<HashSet<PeerId>>,
    connected: Arc<std::sync::Mutex<HashSet<PeerId>>>,
    content: Arc<Content>,
    /// An announcement of all holdings is due.
    reannounce_due: std::sync::atomic::AtomicBool,
    /// Whether this node takes direct peer wires (`bt_wire=direct`).
    wire_direct: bool,
}

fn progress_key(peer: &PeerId) -> String {
    format!("progress/{peer}")
}

impl Replicator {
    /// Applies verified records in order, off the runtime's threads.
    async fn apply(&self, records: Vec<SignedRecord>) {
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
                if let Ok(btfs_fs::Applied::Stored | btfs_fs::Applied::Merged) = applied {
                    content.arrived(&path, &r.record);
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

    /// A member came up: announce all this node holds, soon (one
    /// announcement for the members that come up meanwhile).
    fn reannounce_soon(self: &Arc<Self>) {
        let Some(engine) = self.content.engine().cloned() else {
            return;
        };
        if self.reannounce_due.swap(true, Ordering::AcqRel) {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(HOLDINGS_SETTLE).await;
            me.reannounce_due.store(false, Ordering::Release);
            let _ = tokio::task::spawn_blocking(move || engine.announce_holdings()).await;
        });
    }

    /// Starts an anti-entropy round with `peer` unless one is under way.
    fn sync_soon(self: &Arc<Self>, peer: PeerId) {
        if !self.lock_syncing().insert(peer) {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            match me.pull(peer).await {
                Ok(n) => {
                    me.counters.syncs.fetch_add(1, Ordering::Relaxed);
                    if n > 0 {
                        info!(%peer, records = n, "anti-entropy: caught up");
                    }
                }
                Err(e) => debug!(%peer, "anti-entropy round failed: {e:#}"),
            }
            me.lock_syncing().remove(&peer);
        });
    }

    fn lock_syncing(&self) -> std::sync::MutexGuard<'_, HashSet<PeerId>> {
        self.syncing.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_connected(&self) -> std::sync::MutexGuard<'_, HashSet<PeerId>> {
        self.connected.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Pulls what `peer` stored since the last round, page by page; returns
    /// how many records came.
    async fn pull(&self, peer: PeerId) -> Result<usize> {
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
            let bytes = self.mesh.request(peer, req).await?;
            let resp = match SyncResponse::decode(&bytes) {
                Ok(r) => r,
                Err(e) => {
                    self.counters.refused.fetch_add(1, Ordering::Relaxed);
                    warn!(%peer, "refused a sync response: {e}");
                    return Err(e).context("malformed sync response");
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
    async fn answer(&self, data: Vec<u8>) -> Vec<u8> {
        let req = match postcard::from_bytes::<Rpc>(&data) {
            Ok(Rpc::Sync(req)) => req,
            Ok(Rpc::Wire) => {
                let addr = self
                    .content
                    .engine()
                    .filter(|_| self.wire_direct)
                    .and_then(|e| e.listen_addr());
                return postcard::to_allocvec(&addr).unwrap_or_default();
            }
            Ok(Rpc::Metainfo(ih)) => {
                let Some(engine) = self.content.engine() else {
                    return Vec::new();
                };
                let ih = btfs_core::InfoHash(ih);
                let bytes = engine.local_metainfo(&ih).unwrap_or_default();
                if !bytes.is_empty() {
                    engine.warm(ih, "metainfo request".into());
                }
                return bytes;
            }
            Err(_) => return Vec::new(),
        };
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

/// Gossips new local versions in paced batches.
async fn publish_loop(
    mesh: Mesh,
    mut announce: mpsc::Receiver<Announced>,
    counters: Arc<Counters>,
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
    while let Some(first) = announce.recv().await {
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
        match mesh.publish(msg).await {
            Ok(()) => {
                counters.published.fetch_add(n, Ordering::Relaxed);
            }
            // Alone: the records stay in the store for anti-entropy.
            Err(MeshError::NoPeers) => {}
            Err(e) => debug!("gossip failed: {e}"),
        }
    }
}

/// Gossips this node's holdings changes in paced messages of at most
/// `MAX_HOLDINGS` entries (a long list, such as all a node holds when a
/// member joins, goes out over several).
async fn holdings_loop(mesh: Mesh, mut changes: mpsc::Receiver<(Vec<ContentId>, Vec<ContentId>)>) {
    let mut pace = tokio::time::interval(HOLDINGS_PACE);
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pending = Holdings::default();
    loop {
        if pending.is_empty() {
            match changes.recv().await {
                Some(c) => pending.add(c),
                None => return,
            }
        }
        pace.tick().await;
        while let Ok(c) = changes.try_recv() {
            pending.add(c);
        }
        let Ok(bytes) = postcard::to_allocvec(&pending.take(MAX_HOLDINGS)) else {
            continue;
        };
        match mesh.publish_to(Topic::Holdings, bytes).await {
            Ok(()) | Err(MeshError::NoPeers) => {}
            Err(e) => debug!("holdings gossip failed: {e}"),
        }
    }
}

/// Starts the mesh and its tasks on the current runtime. Returns the status
/// view, refreshed every second, and the record counters.
pub(crate) fn start(
    MeshSetup {
        cfg,
        membership,
        counters,
    }: MeshSetup,
    announce: mpsc::Receiver<Announced>,
    fs: FsHandle<SledBackend>,
    content: Arc<Content>,
    wire_direct: bool,
    wire_congestion: btfs_torrent::congestion::Congestion,
) -> Result<(watch::Receiver<PeersView>, Arc<Counters>, Arc<MeshNet>)> {
    let cluster = cfg.cluster.clone();
    let wire = crate::content::WireConfig {
        keypair: cfg.keypair.clone(),
        prologue: btfs_mesh::wire::prologue(&cfg.cluster, &cfg.psk.to_string()),
        direct: wire_direct,
        congestion: wire_congestion,
    };
    let (mesh, mut events, _task) = btfs_mesh::start(cfg).context("mesh")?;
    tokio::spawn(publish_loop(mesh.clone(), announce, counters.clone()));
    let rep = Arc::new(Replicator {
        mesh: mesh.clone(),
        fs,
        cluster,
        membership,
        counters: counters.clone(),
        syncing: std::sync::Mutex::new(HashSet::new()),
        connected: Arc::new(std::sync::Mutex::new(HashSet::new())),
        content,
        reannounce_due: std::sync::atomic::AtomicBool::new(false),
        wire_direct,
    });
    let (holdings_tx, holdings_rx) = mpsc::channel(HOLDINGS_QUEUE);
    tokio::spawn(holdings_loop(mesh.clone(), holdings_rx));
    let net = Arc::new(MeshNet::new(
        mesh.clone(),
        rep.connected.clone(),
        holdings_tx,
        wire,
        counters.clone(),
    ));
    let events_rep = rep.clone();
    let events_net = net.clone();
    tokio::spawn(async move {
        let (rep, net) = (events_rep, events_net);
        while let Some(event) = events.recv().await {
            match event {
                MeshEvent::PeerUp(p, ip) => {
                    info!(peer = %p, "peer up");
                    rep.lock_connected().insert(p);
                    net.peer_up(p, ip);
                    rep.sync_soon(p);
                    rep.reannounce_soon();
                }
                MeshEvent::PeerDown(p) => {
                    info!(peer = %p, "peer down");
                    rep.lock_connected().remove(&p);
                    net.peer_down(&p);
                }
                MeshEvent::Gossip {
                    topic: Topic::Holdings,
                    source,
                    data,
                } => {
                    let (Ok(h), Some(engine)) = (Holdings::decode(&data), rep.content.engine())
                    else {
                        continue;
                    };
                    debug!(%source, held = h.held.len(), dropped = h.dropped.len(), "holdings");
                    engine.note_holdings(&source.to_string(), &h.held, &h.dropped);
                }
                MeshEvent::Gossip {
                    topic: Topic::Records,
                    source,
                    data,
                } => {
                    // The mesh delivers only payloads its validator accepted.
                    let Ok(batch) = SignedRecord::decode_batch(&data) else {
                        continue;
                    };
                    debug!(%source, records = batch.len(), "gossip");
                    rep.counters
                        .received
                        .fetch_add(batch.len() as u64, Ordering::Relaxed);
                    rep.apply(batch).await;
                }
                MeshEvent::Request {
                    peer,
                    data,
                    responder,
                } => {
                    let rep = rep.clone();
                    tokio::spawn(async move {
                        let answer = rep.answer(data).await;
                        if let Err(e) = responder.respond(answer).await {
                            debug!(%peer, "could not answer a sync request: {e}");
                        }
                    });
                }
            }
        }
    });
    let periodic = rep.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(SYNC_INTERVAL);
        tick.tick().await;
        loop {
            tick.tick().await;
            let peers: Vec<PeerId> = periodic.lock_connected().iter().copied().collect();
            for p in peers {
                periodic.sync_soon(p);
            }
        }
    });
    let (tx, rx) = watch::channel(PeersView::default());
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(PEERS_REFRESH);
        loop {
            tick.tick().await;
            let (Ok(peers), Ok(listen), Ok(mdns)) = (
                mesh.peers().await,
                mesh.listen_addrs().await,
                mesh.mdns_status().await,
            ) else {
                return;
            };
            let view = PeersView {
                peers,
                listen: listen.iter().map(ToString::to_string).collect(),
                mdns,
            };
            if tx.send(view).is_err() {
                return;
            }
        }
    });
    Ok((rx, counters, net))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(n: u8) -> ContentId {
        ContentId([n; 32])
    }

    #[test]
    fn holdings_keep_the_latest_word_and_go_out_in_bounded_messages() {
        let mut h = Holdings::default();
        h.add((vec![c(1), c(2)], vec![]));
        h.add((vec![], vec![c(1)]));
        h.add((vec![c(3)], vec![]));
        assert_eq!(h.held, vec![c(2), c(3)]);
        assert_eq!(h.dropped, vec![c(1)]);
        h.add((vec![c(1)], vec![]));
        assert!(h.dropped.is_empty(), "held again after the drop");

        let mut big = Holdings::default();
        big.add(((0..=255u8).cycle().take(2500).map(c).collect(), vec![c(9)]));
        let mut sent = 0;
        while !big.is_empty() {
            let msg = big.take(MAX_HOLDINGS);
            let bytes = postcard::to_allocvec(&msg).unwrap();
            assert!(bytes.len() <= btfs_mesh::MAX_GOSSIP);
            let back = Holdings::decode(&bytes).unwrap();
            sent += back.held.len() + back.dropped.len();
        }
        assert_eq!(sent, 2501);
        let too_many = Holdings {
            held: vec![c(0); MAX_HOLDINGS + 1],
            ..Holdings::default()
        };
        assert!(Holdings::decode(&postcard::to_allocvec(&too_many).unwrap()).is_err());
    }

    #[test]
    fn removed_members_may_stand_in_vectors_but_neither_connect_nor_author() {
        let ids: Vec<(PeerId, NodeId)> = (0..3)
            .map(|_| {
                let kp = Keypair::generate_ed25519();
                let node = btfs_sync::wire::node_id(&kp).unwrap();
                (kp.public().to_peer_id(), node)
            })
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("members");
        std::fs::write(&file, format!("{} # a\nremoved {}\n\n", ids[0].0, ids[1].0)).unwrap();
        let (members, former) = read_members(&file).unwrap();
        assert_eq!((members.len(), former.len()), (1, 1));
        let m = Membership(Some(Arc::new((members, former))));
        assert!(m.admits(&ids[0].1) && m.knows(&ids[0].1));
        assert!(!m.admits(&ids[1].1) && m.knows(&ids[1].1));
        assert!(!m.admits(&ids[2].1) && !m.knows(&ids[2].1));
        let open = Membership(None);
        assert!(open.admits(&ids[2].1) && open.knows(&ids[2].1));

        std::fs::write(&file, format!("{0}\nremoved {0}\n", ids[0].0)).unwrap();
        let err = read_members(&file).unwrap_err().to_string();
        assert!(err.contains("both as a member and as removed"), "{err}");
        std::fs::write(&file, "removed nonsense\n").unwrap();
        let err = read_members(&file).unwrap_err().to_string();
        assert!(err.contains("is not a peer id"), "{err}");
    }

    proptest::proptest! {

        /// A member's holdings bytes, any of them: decoded or refused,
        /// never a panic, never more than the bound.
        #[test]
        fn holdings_from_any_bytes_are_bounded(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..4096)) {
            if let Ok(h) = Holdings::decode(&bytes) {
                proptest::prop_assert!(h.held.len() + h.dropped.len() <= MAX_HOLDINGS);
            }
        }

        /// Mutations of a real message: the same.
        #[test]
        fn mutated_holdings_are_bounded(at in 0usize..200, byte in proptest::prelude::any::<u8>(), cut in 0usize..200) {
            let mut h = Holdings::default();
            h.add((vec![c(1), c(2), c(3)], vec![c(4)]));
            let mut bytes = postcard::to_allocvec(&h.take(MAX_HOLDINGS)).unwrap();
            let i = at % bytes.len();
            bytes[i] = byte;
            bytes.truncate(bytes.len() - cut % bytes.len());
            if let Ok(h) = Holdings::decode(&bytes) {
                proptest::prop_assert!(h.held.len() + h.dropped.len() <= MAX_HOLDINGS);
            }
        }
    }

    /// The README's first command mounts without `listen=`: the default must
    /// be a mesh address libp2p accepts (it once was a bare `IP:PORT`).
    #[test]
    fn the_default_listen_address_is_a_valid_multiaddr() {
        let a = multiaddr(crate::options::MountOpts::default().mesh_listen());
        assert_eq!(a, "/ip4/0.0.0.0/tcp/4410");
        a.parse::<btfs_mesh::Multiaddr>().unwrap();
        let v6 = multiaddr("[::1]:9".parse().unwrap());
        v6.parse::<btfs_mesh::Multiaddr>().unwrap();
    }
}
