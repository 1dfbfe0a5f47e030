//! The btfs node: everything a mounted cluster member runs, between the
//! filesystem (`btfs_fs`) and the binary's CLI.
//!
//! * [`replicate`]: records out (paced gossip) and in (gossip, anti-entropy).
//! * [`holdings`]: which member holds which content, gossiped.
//! * [`wires`]: the mesh as the BitTorrent engine sees it (members, peer
//!   wires, metainfo requests).
//! * [`content`]: the engine as the filesystem sees it, and prefetch.
//! * [`loops`]: the node's long-lived tasks and the event routing.
//! * [`membership`]: `members=` and `peers_file=`, and record admission.
//! * [`status`]: `btfs status` as one typed value.
//!
//! [`Node::start`] builds the parts in order (store, mesh, engine, content,
//! filesystem), then connects them and starts the node's tasks; every task
//! is owned by the [`Node`], and [`Node::shutdown`] ends them in order.

mod content;
mod error;
mod generate;
mod history;
mod holdings;
mod loops;
mod membership;
mod metrics;
mod pins;
mod reconfigure;
mod replicate;
mod rpc;
mod status;
mod transport;
mod wires;

#[cfg(test)]
mod tests;

use std::{
    collections::HashSet, net::SocketAddr, num::NonZeroU32, path::PathBuf, sync::Arc,
    time::Duration,
};

use btfs_core::{FileRecord, NodeId, RelPath};
use btfs_fs::{Announced, BtfsFs, FsConfig, FsHandle, ObjectStore};
use btfs_mesh::MeshConfig;
use btfs_store::{SledBackend, Store};
use btfs_sync::SignedRecord;
use btfs_torrent::{Cidr, Engine, EngineConfig, congestion::Congestion};
use libp2p_identity::{Keypair, PeerId};
use tokio::{
    sync::{mpsc, watch},
    task::JoinSet,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, info, warn};

pub use btfs_metrics;
pub use content::{Content, Prefetch};
pub use error::NodeError;
pub use generate::{Generate, GenerateError, MAX_GENERATE_DIRS, MAX_GENERATE_FILES};
pub use history::{LogEntry, Pick, Restored};
pub use membership::Membership;
pub use pins::{MAX_PINS, PinError, PinStatus};
pub use reconfigure::{Reconfigure, ReconfigureError, Reconfigured};
pub use replicate::Counters;
pub use status::{MeshView, NodeInfo, NodeStatus, RecordCounts};
pub use transport::{NetEvent, Reply, Transport};

use crate::{
    holdings::HOLDINGS_QUEUE,
    loops::{ContentPlane, collect, event_loop, mesh_view, periodic_sync, validator},
    replicate::{Replicator, publish_loop},
    wires::{MeshNet, WireConfig},
};

/// New record versions waiting to be gossiped; beyond this the announcer
/// reads them back from the store's log (paced, not dropped).
pub const ANNOUNCE_CAP: usize = 4096;
/// Whole-file fetches (prefetch policy, read-ahead of a directory being
/// walked) running at once.
const PREFETCH_PARALLEL: usize = 4;
/// How long a stopping node waits for its short tasks once the engine has
/// stopped (they end within milliseconds; this bounds a stuck one).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

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
    /// `history=`: how long superseded and deleted versions keep their
    /// content (`None`: not kept).
    pub history: Option<Duration>,
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
    /// `zone=`: this node's datacenter or rack, told to the members; a
    /// file is fetched from other zones about once per zone. `None`: no
    /// zone, every member is dialled as before.
    pub zone: Option<btfs_mesh::Zone>,
    /// What `btfs status` says about this daemon.
    pub info: NodeInfo,
}

/// A running node: owns every task it started.
#[derive(Debug)]
pub struct Node {
    /// The parts `btfs status` reads, which are also the node's handles.
    parts: NodeHandle,
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

/// This node's signer of records.
pub(crate) fn signer(cluster: String, keypair: Keypair) -> btfs_fs::Signer {
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
        let (pins, pin_queue) = pins::Pins::open(state).map_err(NodeError::Pins)?;

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
        let (mesh, mesh_events, mesh_task) =
            btfs_mesh::start_in_zone(mesh_cfg, cfg.zone.clone()).map_err(NodeError::Mesh)?;
        let mesh_metrics = mesh.metrics().clone();

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
            member: peer_id,
            zone: cfg.zone.as_ref().map(ToString::to_string),
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
            tasks.clone(),
            cfg.prefetch.clone(),
            pins.clone(),
        ));
        let (announce_tx, announce_rx) = mpsc::channel::<Announced>(ANNOUNCE_CAP);
        let announce_gauge = announce_tx.downgrade();
        let fs_metrics = Arc::new(btfs_metrics::FsMetrics::default());
        let fs_cfg = FsConfig {
            announce: Some(announce_tx),
            signer: Some(signer(cfg.cluster.clone(), cfg.keypair.clone())),
            content: Some(content.clone()),
            node: id,
            passthrough: cfg.passthrough,
            ttl: cfg.ttl,
            state_dir: state.clone(),
            history: cfg.history.is_some(),
            metrics: Some(fs_metrics.clone()),
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
        if cfg.history.is_some() {
            // History's content stays inside its window, whatever
            // cache_size says: it may be the only copy left.
            let store = handle.store().clone();
            engine.add_keep(Box::new(move |c| store.history_has(c)));
        }

        // The tasks that connect them.
        let rep = Arc::new(Replicator::new(
            mesh.clone(),
            handle.clone(),
            cfg.cluster.clone(),
            membership.clone(),
            counters.clone(),
            connected,
            Some(content.clone()),
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
            handle.clone(),
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
        engine.add_keep(pins.keep());
        loops.spawn(pins::pin_loop(
            pins.clone(),
            handle.clone(),
            engine.clone(),
            pin_queue,
            cancel.clone(),
        ));
        let (view_tx, view) = watch::channel(MeshView::default());
        loops.spawn(mesh_view(mesh.clone(), view_tx, cancel.clone()));
        let live = Arc::new(reconfigure::Live {
            mesh: mesh.clone(),
            membership,
            content,
            engine: engine.clone(),
            options: parking_lot::RwLock::new(cfg.info.options.clone()),
            applying: tokio::sync::Mutex::new(()),
        });
        loops.spawn(MeshNet::serve(
            mesh,
            engine.clone(),
            tasks.clone(),
            cancel.clone(),
        ));
        loops.spawn(collect(
            handle.clone(),
            cfg.tombstone_retention,
            cfg.history,
            cancel.clone(),
        ));

        let node = Node {
            parts: NodeHandle {
                id,
                peer_id,
                info: cfg.info,
                fs: handle,
                engine,
                counters,
                view,
                announce: announce_gauge,
                fs_metrics,
                mesh_metrics,
                pins,
                live,
            },
            loops,
            tasks,
            cancel,
            mesh_task,
        };
        match node.parts.fs.recover_synced() {
            Ok(0) => {}
            Ok(recovered) => info!(recovered, "versions synced before a crash were committed"),
            Err(e) => {
                node.shutdown().await;
                return Err(NodeError::Recover(e));
            }
        }
        Ok((node, fs))
    }

    pub fn id(&self) -> NodeId {
        self.parts.id
    }

    pub fn fs(&self) -> &FsHandle<SledBackend> {
        &self.parts.fs
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.parts.engine
    }

    /// A cheap handle for the control socket (`btfs status`, `btfs
    /// torrent`); it answers for as long as it is held, so the binary stops
    /// its control socket before the node.
    pub fn handle(&self) -> NodeHandle {
        self.parts.clone()
    }

    /// Stops the node's tasks in order: the loops first (nothing new is
    /// applied, gossiped or answered; the short tasks that watch the same
    /// token end too), then the engine (it keeps what partial torrents
    /// fetched, and the reads and fetches still waiting on it end), then
    /// whatever short task is left, and last the mesh. The store is flushed
    /// by the caller, which owns the filesystem.
    pub async fn shutdown(mut self) {
        self.cancel.cancel();
        while let Some(r) = self.loops.join_next().await {
            if let Err(e) = r {
                warn!("a node task failed: {e}");
            }
        }
        self.parts.engine.stop().await;
        self.tasks.close();
        if tokio::time::timeout(SHUTDOWN_GRACE, self.tasks.wait())
            .await
            .is_err()
        {
            warn!(
                left = self.tasks.len(),
                "tasks still running {SHUTDOWN_GRACE:?} after the engine stopped: not waited for"
            );
        }
        self.mesh_task.abort();
        let _ = self.mesh_task.await;
        debug!("node stopped");
    }
}

/// A running node's parts, as the control socket uses them.
#[derive(Debug, Clone)]
pub struct NodeHandle {
    id: NodeId,
    peer_id: PeerId,
    info: NodeInfo,
    fs: FsHandle<SledBackend>,
    engine: Arc<Engine>,
    counters: Arc<Counters>,
    view: watch::Receiver<MeshView>,
    /// The announce queue, for its depth (weak: it does not keep the
    /// queue open).
    announce: mpsc::WeakSender<Announced>,
    /// FUSE operation latency (`metrics=`, see [`metrics`]).
    fs_metrics: Arc<btfs_metrics::FsMetrics>,
    /// libp2p's own metrics, recorded by the mesh.
    mesh_metrics: Arc<btfs_metrics::Registry>,
    /// Pinned paths (`btfs pin`).
    pins: Arc<pins::Pins>,
    /// What `mount -o remount` changes (see [`NodeHandle::reconfigure`]).
    live: Arc<reconfigure::Live>,
}

impl NodeHandle {
    /// Makes a slice of a generated namespace (`btfs generate`), off the
    /// runtime's threads; returns how many records were written.
    pub async fn generate(&self, req: Generate) -> Result<u64, GenerateError> {
        let fs = self.fs.clone();
        tokio::task::spawn_blocking(move || req.run(&fs))
            .await
            .unwrap_or_else(|e| Err(GenerateError::Task(e.to_string())))
    }

    /// Changes the settings `mount -o remount` may change, without
    /// unmounting: the files named are read and checked first, and a
    /// refused change leaves everything as it was (see `reconfigure`).
    pub async fn reconfigure(&self, req: Reconfigure) -> Result<Reconfigured, ReconfigureError> {
        self.live.reconfigure(req).await
    }

    /// What `btfs status` shows.
    pub fn status(&self) -> Result<NodeStatus, btfs_fs::FsError> {
        Ok(NodeStatus {
            info: NodeInfo {
                options: self.live.options.read().clone(),
                ..self.info.clone()
            },
            node_id: self.id.to_hex(),
            peer_id: self.peer_id.to_string(),
            fs: self.fs.status()?,
            mesh: self.view.borrow().clone(),
            records: RecordCounts {
                announce_queued: self
                    .announce
                    .upgrade()
                    .map_or(0, |tx| (tx.max_capacity() - tx.capacity()) as u64),
                ..RecordCounts::from(&*self.counters)
            },
            bittorrent: self.engine.status(),
            pins: self.pins.list(),
        })
    }

    /// Pins `path` (`btfs pin`): its content, and every later version's, is
    /// fetched in full and never evicted. The caller must be able to read
    /// it (`may` as for [`torrent`](Self::torrent)). Returns what is under
    /// it now.
    pub async fn pin(
        &self,
        path: String,
        may: impl Fn(u32, u32, u32, u32) -> bool + Send + 'static,
    ) -> Result<PinStatus, PinError> {
        let (pins, fs) = (self.pins.clone(), self.fs.clone());
        tokio::task::spawn_blocking(move || pins.pin(&fs, &path, may))
            .await
            .unwrap_or_else(|e| Err(PinError::Task(e.to_string())))
    }

    /// Unpins `path` (`btfs unpin`): its content becomes a cache entry like
    /// any other.
    pub async fn unpin(
        &self,
        path: String,
        may: impl Fn(u32, u32, u32, u32) -> bool + Send + 'static,
    ) -> Result<(), PinError> {
        let (pins, fs) = (self.pins.clone(), self.fs.clone());
        tokio::task::spawn_blocking(move || pins.unpin(&fs, &path, may))
            .await
            .unwrap_or_else(|e| Err(PinError::Task(e.to_string())))
    }

    /// The pinned paths and how much of each is held here.
    pub fn pins(&self) -> Vec<PinStatus> {
        self.pins.list()
    }

    /// The `.torrent` of the file at `path` (`btfs torrent`), if `may`
    /// grants the caller search permission on every directory above it and
    /// read permission on the file, as the kernel would decide. `may(mode,
    /// uid, gid, want)` checks a mask of 4 read, 2 write, 1 search.
    pub async fn torrent(
        &self,
        path: &str,
        may: impl Fn(u32, u32, u32, u32) -> bool,
    ) -> Result<Vec<u8>, String> {
        let want = self.exportable(path, may)?;
        match self.engine.metainfo(&want).await {
            Ok(m) => Ok(m.bytes.to_vec()),
            Err(e) => Err(format!("{path}: {e}")),
        }
    }

    fn exportable(
        &self,
        path: &str,
        may: impl Fn(u32, u32, u32, u32) -> bool,
    ) -> Result<btfs_core::Wanted, String> {
        let rel = RelPath::parse(path).map_err(|e| format!("{path}: {e}"))?;
        let live = |p: &RelPath| {
            self.fs
                .store()
                .get_live(p)
                .map_err(|e| format!("{path}: {e}"))?
                .ok_or_else(|| format!("{path}: no such file"))
        };
        let mut dir = rel.parent();
        while let Some(d) = dir {
            let r = live(&d)?.record;
            if !may(r.mode, r.uid, r.gid, 1) {
                return Err(format!("{path}: permission denied"));
            }
            dir = d.parent();
        }
        let entry = live(&rel)?;
        let r = &entry.record;
        if !may(r.mode, r.uid, r.gid, 4) {
            return Err(format!("{path}: permission denied"));
        }
        match btfs_core::Wanted::of(path.to_owned(), r) {
            Some(w) => Ok(w),
            None if r.kind != btfs_core::FileKind::File => {
                Err(format!("{path}: not a regular file"))
            }
            None if r.size == 0 => Err(format!("{path}: an empty file has no torrent")),
            None => Err(format!("{path}: this version has no torrent")),
        }
    }
}
