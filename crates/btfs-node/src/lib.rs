//! The btfs node: everything a mounted cluster member runs, between the
//! filesystem (`btfs_fs`) and the binary's CLI.
//!
//! * [`replicate`]: records out (paced gossip) and in (gossip, anti-entropy).
//! * [`holdings`]: which member holds which content, gossiped.
//! * [`wires`]: the mesh as the BitTorrent engine sees it (members, peer
//!   wires, metainfo requests).
//! * [`content`]: the engine as the filesystem sees it, and prefetch.
//! * [`membership`]: `members=` and `peers_file=`, and record admission.
//! * [`status`]: `btfs status` as one typed value.
//!
//! [`Node::start`] builds the parts in order (store, mesh, engine, content,
//! filesystem), then connects them and starts the node's tasks; every task
//! is owned by the [`Node`], and [`Node::shutdown`] ends them in order.

mod content;
mod error;
mod holdings;
mod membership;
mod replicate;
mod rpc;
mod status;
mod transport;
mod wires;

#[cfg(test)]
mod tests;

use std::{
    collections::HashSet,
    net::SocketAddr,
    num::NonZeroU32,
    path::PathBuf,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use btfs_core::{FileRecord, NodeId, RelPath};
use btfs_fs::{Announced, BtfsFs, FsConfig, FsHandle, ObjectStore};
use btfs_mesh::{Mesh, MeshConfig, Topic};
use btfs_store::{Backend, SledBackend, Store};
use btfs_sync::SignedRecord;
use btfs_torrent::{Cidr, Engine, EngineConfig, congestion::Congestion};
use libp2p_identity::{Keypair, PeerId};
use tokio::{
    sync::{mpsc, watch},
    task::JoinSet,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, info, warn};

pub use content::{Content, Prefetch};
pub use error::NodeError;
pub use membership::Membership;
pub use replicate::Counters;
pub use status::{MeshView, NodeInfo, NodeStatus, RecordCounts};
pub use transport::{NetEvent, Reply, Transport};

use crate::{
    holdings::{HOLDINGS_QUEUE, HOLDINGS_SETTLE, Holdings},
    replicate::{Replicator, SYNC_INTERVAL, publish_loop},
    rpc::Rpc,
    wires::{MeshNet, WireConfig},
};

/// New record versions waiting to be signed and gossiped; beyond this they
/// are left to anti-entropy.
pub const ANNOUNCE_CAP: usize = 4096;
/// Whole-file fetches (prefetch policy) running at once.
const PREFETCH_PARALLEL: usize = 2;
/// How often the status view of the mesh is refreshed.
const PEERS_REFRESH: Duration = Duration::from_millis(250);
/// How often expired tombstones are looked for.
const TOMBSTONE_INTERVAL: Duration = Duration::from_secs(600);
/// How often released objects are deleted (after the store is flushed).
const GC_INTERVAL: Duration = Duration::from_secs(1);

/// Everything a node needs to start, decided by the binary from its
/// options.
#[derive(Debug)]
pub struct NodeConfig {
    /// The cluster's name (part of every topic and signature).
    pub cluster: String,
    pub psk: libp2p_pnet::PreSharedKey,
    /// This node's identity.
    pub keypair: Keypair,
    /// Where the store, objects and engine state live.
    pub state_dir: PathBuf,
    /// The mesh's listen address.
    pub listen: SocketAddr,
    /// Static bootstrap peers, and a file of more.
    pub peers: Vec<SocketAddr>,
    pub peers_file: Option<PathBuf>,
    pub mdns: bool,
    /// `members=`: the admitted members (`None`: every holder of the key).
    pub members: Option<PathBuf>,
    pub passthrough: bool,
    pub ttl: Duration,
    pub tombstone_retention: Duration,
    /// The BitTorrent listener, and who besides members may use it.
    pub bt_listen: SocketAddr,
    pub bt_allow: Vec<Cidr>,
    /// `bt_wire=direct`: members' peer wires go straight over TCP.
    pub wire_direct: bool,
    pub congestion: Congestion,
    pub read_timeout: Duration,
    pub up_rate: Option<NonZeroU32>,
    pub down_rate: Option<NonZeroU32>,
    pub cache_size: Option<u64>,
    pub max_live: usize,
    pub prefetch: Prefetch,
    /// What `btfs status` says about this daemon.
    pub info: NodeInfo,
}

/// A running node: owns every task it started.
#[derive(Debug)]
pub struct Node {
    id: NodeId,
    peer_id: PeerId,
    info: NodeInfo,
    fs: FsHandle<SledBackend>,
    engine: Arc<Engine>,
    counters: Arc<Counters>,
    view: watch::Receiver<MeshView>,
    /// The long-lived loops.
    loops: JoinSet<()>,
    /// Short tasks the loops start (sync rounds, answers, member streams).
    tasks: TaskTracker,
    cancel: CancellationToken,
    mesh_task: tokio::task::JoinHandle<()>,
}

/// The mesh address a node listens on for `IP:PORT`.
pub fn mesh_address(a: SocketAddr) -> Result<btfs_mesh::Multiaddr, NodeError> {
    error::parse_multiaddr(&membership::multiaddr(a))
}

/// An error and its sources on one line; a source whose text the line
/// already shows is not repeated.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !text.is_empty() && !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// The mesh's gossip validator: every record of a batch checked (shape,
/// signature, membership), holdings bounded; refusals counted.
fn validator(
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
struct ContentPlane {
    net: Arc<MeshNet>,
    engine: Arc<Engine>,
    /// An announcement of all holdings is due.
    reannounce_due: std::sync::atomic::AtomicBool,
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
async fn event_loop<T: Transport, B: Backend, E: Into<NetEvent>>(
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
async fn periodic_sync<T: Transport, B: Backend>(
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
async fn mesh_view(mesh: Mesh, tx: watch::Sender<MeshView>, cancel: CancellationToken) {
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
async fn collect<B: Backend>(fs: FsHandle<B>, retention: Duration, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(GC_INTERVAL);
    let mut tombstones = tokio::time::interval(TOMBSTONE_INTERVAL);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
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

/// This node's signer of records.
fn signer(cluster: String, keypair: Keypair) -> btfs_fs::Signer {
    btfs_fs::Signer(Arc::new(move |path: &RelPath, record: &FileRecord| {
        SignedRecord::sign(&cluster, path.clone(), record.clone(), &keypair)
            .map(|s| s.signature)
            .map_err(Into::into)
    }))
}

impl Node {
    /// Starts a node on the current (multi-thread) runtime: opens the
    /// store, starts the mesh, then the engine over the mesh, then the
    /// filesystem over the engine, and last the tasks that connect them.
    /// Returns the node and the filesystem to mount.
    pub async fn start(cfg: NodeConfig) -> Result<(Node, BtfsFs<SledBackend>), NodeError> {
        let state = &cfg.state_dir;
        let id = btfs_sync::wire::node_id(&cfg.keypair).map_err(NodeError::Identity)?;
        let peer_id = cfg.keypair.public().to_peer_id();
        let db = state.join("db");
        let store = Arc::new(Store::open_sled(&db).map_err(|source| NodeError::Store {
            path: db.clone(),
            source,
        })?);
        let objects = ObjectStore::open(state).map_err(|source| NodeError::Objects {
            path: state.clone(),
            source,
        })?;

        // The mesh: who is admitted, where to listen and whom to dial.
        let mut bootstrap: Vec<String> = cfg
            .peers
            .iter()
            .copied()
            .map(membership::multiaddr)
            .collect();
        if let Some(f) = &cfg.peers_file {
            bootstrap.extend(membership::read_peers_file(f)?);
        }
        let membership = match cfg.members.as_deref() {
            Some(path) => {
                let (members, former) = membership::read_members(path)?;
                Membership::listed(members, former)
            }
            None => Membership::open(),
        };
        let counters = Arc::new(Counters::default());
        let mesh_cfg = MeshConfig {
            cluster: cfg.cluster.clone(),
            keypair: cfg.keypair.clone(),
            psk: cfg.psk,
            listen: vec![mesh_address(cfg.listen)?],
            bootstrap: bootstrap
                .iter()
                .map(|a| error::parse_multiaddr(a))
                .collect::<Result<_, _>>()?,
            mdns: cfg.mdns,
            members: membership.members(),
            validate: validator(cfg.cluster.clone(), membership.clone(), counters.clone()),
        };
        let wire = WireConfig {
            keypair: cfg.keypair.clone(),
            prologue: btfs_mesh::wire::prologue(&cfg.cluster, &cfg.psk.to_string()),
            direct: cfg.wire_direct,
            congestion: cfg.congestion.clone(),
        };
        let (mesh, mesh_events, mesh_task) = btfs_mesh::start(mesh_cfg).map_err(NodeError::Mesh)?;

        // The engine, over the mesh.
        let (tasks, cancel) = (TaskTracker::new(), CancellationToken::new());
        let mut loops = JoinSet::new();
        let (holdings_tx, holdings_rx) = mpsc::channel(HOLDINGS_QUEUE);
        let connected: Arc<parking_lot::Mutex<HashSet<PeerId>>> = Arc::default();
        let net = Arc::new(MeshNet::new(
            mesh.clone(),
            Arc::clone(&connected),
            holdings_tx,
            wire,
            counters.clone(),
        ));
        let engine_cfg = EngineConfig {
            dir: state.join("bt"),
            object_path: Arc::new(objects.path_fn()),
            listen: cfg.bt_listen,
            allow: cfg.bt_allow.clone(),
            read_timeout: cfg.read_timeout,
            up_rate: cfg.up_rate,
            down_rate: cfg.down_rate,
            hash_threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
            prefetch_parallel: PREFETCH_PARALLEL,
            cache_size: cfg.cache_size,
            wire_congestion: cfg.congestion.clone(),
            max_live: cfg.max_live,
        };
        let engine = match Engine::start(engine_cfg, net.clone()).await {
            Ok(e) => e,
            Err(e) => {
                mesh_task.abort();
                return Err(NodeError::Engine(e));
            }
        };

        // The filesystem, over the engine.
        let content = Arc::new(Content::new(
            engine.clone(),
            tokio::runtime::Handle::current(),
            cfg.prefetch.clone(),
        ));
        let (announce_tx, announce_rx) = mpsc::channel::<Announced>(ANNOUNCE_CAP);
        let fs_cfg = FsConfig {
            announce: Some(announce_tx),
            signer: Some(signer(cfg.cluster.clone(), cfg.keypair.clone())),
            content: Some(content.clone()),
            node: id,
            passthrough: cfg.passthrough,
            ttl: cfg.ttl,
            state_dir: state.clone(),
        };
        let started = BtfsFs::new(store, objects, fs_cfg).map_err(NodeError::Fs);
        let fs = match started {
            Ok(fs) => fs,
            Err(e) => {
                engine.stop().await;
                mesh_task.abort();
                return Err(e);
            }
        };
        let handle = fs.handle();

        // The tasks that connect them.
        let rep = Arc::new(Replicator::new(
            mesh.clone(),
            handle.clone(),
            cfg.cluster.clone(),
            membership,
            counters.clone(),
            connected,
            Some(content),
            tasks.clone(),
            cancel.clone(),
        ));
        let plane = Arc::new(ContentPlane {
            net,
            engine: engine.clone(),
            reannounce_due: false.into(),
        });
        loops.spawn(publish_loop(
            mesh.clone(),
            announce_rx,
            counters.clone(),
            cancel.clone(),
        ));
        loops.spawn(holdings::holdings_loop(
            mesh.clone(),
            holdings_rx,
            cancel.clone(),
        ));
        loops.spawn(event_loop(
            mesh_events,
            rep.clone(),
            Some(plane),
            tasks.clone(),
            cancel.clone(),
        ));
        loops.spawn(periodic_sync(rep, cancel.clone()));
        let (view_tx, view) = watch::channel(MeshView::default());
        loops.spawn(mesh_view(mesh.clone(), view_tx, cancel.clone()));
        loops.spawn(MeshNet::serve(
            mesh,
            engine.clone(),
            tasks.clone(),
            cancel.clone(),
        ));
        loops.spawn(collect(
            handle.clone(),
            cfg.tombstone_retention,
            cancel.clone(),
        ));

        let recovered = handle.recover_synced().map_err(NodeError::Recover)?;
        if recovered > 0 {
            info!(recovered, "versions synced before a crash were committed");
        }
        Ok((
            Node {
                id,
                peer_id,
                info: cfg.info,
                fs: handle,
                engine,
                counters,
                view,
                loops,
                tasks,
                cancel,
                mesh_task,
            },
            fs,
        ))
    }

    pub fn id(&self) -> NodeId {
        self.id
    }

    pub fn fs(&self) -> &FsHandle<SledBackend> {
        &self.fs
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// What `btfs status` shows, for as long as the caller wants it (the
    /// control socket outlives nothing: it is stopped before the node).
    pub fn reporter(&self) -> Reporter {
        Reporter {
            id: self.id,
            peer_id: self.peer_id,
            info: self.info.clone(),
            fs: self.fs.clone(),
            engine: self.engine.clone(),
            counters: self.counters.clone(),
            view: self.view.clone(),
        }
    }

    /// Stops the node's tasks in order: the loops first (nothing new is
    /// applied, gossiped or answered), then the short tasks they started,
    /// then the engine (it keeps what partial torrents fetched), and last
    /// the mesh. The store is flushed by the caller, which owns the
    /// filesystem.
    pub async fn shutdown(mut self) {
        self.cancel.cancel();
        while let Some(r) = self.loops.join_next().await {
            if let Err(e) = r {
                warn!("a node task failed: {e}");
            }
        }
        self.tasks.close();
        self.tasks.wait().await;
        self.engine.stop().await;
        self.mesh_task.abort();
        let _ = self.mesh_task.await;
        debug!("node stopped");
    }
}

/// Builds `btfs status` from a running node's parts.
#[derive(Debug, Clone)]
pub struct Reporter {
    id: NodeId,
    peer_id: PeerId,
    info: NodeInfo,
    fs: FsHandle<SledBackend>,
    engine: Arc<Engine>,
    counters: Arc<Counters>,
    view: watch::Receiver<MeshView>,
}

impl Reporter {
    /// What `btfs status` shows.
    pub fn status(&self) -> Result<NodeStatus, btfs_fs::FsError> {
        Ok(NodeStatus {
            info: self.info.clone(),
            node_id: self.id.to_hex(),
            peer_id: self.peer_id.to_string(),
            fs: self.fs.status()?,
            mesh: self.view.borrow().clone(),
            records: RecordCounts::from(&*self.counters),
            bittorrent: self.engine.status(),
        })
    }
}
