//! The BitTorrent engine: one librqbit session, torrents brought up on
//! demand and retired when idle. This module holds the engine itself, its
//! configuration, what it needs from the mesh, and its start and stop; the
//! rest is by concern:
//!
//! * `live`: live torrents (bringing them up, the live cap, retiring them),
//!   and `lifecycle`, the state of each;
//! * `publish`: kept `.torrent` files (publish, metainfo, the sweep);
//! * `read`: range reads; `fetch`: whole-file fetches, followers of
//!   sequential readers, installs, prefetches;
//! * `cache`: fetched content kept under `cache_size`; `holders`: what
//!   members announced they hold, and the order members are dialled in
//!   (zones: `zone=`);
//! * `seed`: versions superseded here kept as the start of the new
//!   version's fetch (only the pieces that differ travel);
//! * `listen`: peer connections (the SOCKS5 bridge, the BitTorrent
//!   listener, bridged streams); `status`: what `btfs status` shows;
//! * `runtime`: librqbit's own runtime.
//!
//! Invariants:
//! * A torrent is live only while it is used: a read, a fetch, a bridged
//!   peer connection, or use within the last `IDLE_LIVE`. Each live torrent
//!   costs librqbit a 100 ms stats loop and an open file; a node may hold
//!   100,000 files.
//! * At most `EngineConfig::max_live` torrents are live: one more retires
//!   the least recently used idle one first. Members' handshakes that find
//!   none idle are refused; local reads and fetches never are (see `Need`).
//!   Members' connections and bring-ups are bounded per member (`limits`).
//! * Content lives in the object store only once complete and checked
//!   against its content id (blake3); partial content lives in
//!   `bt/partial/<content>`. Objects never change: a torrent seeds an object
//!   in place.
//! * What a partial torrent has survives its retirement and restarts: its
//!   bitfield is kept in `bt/resume/` and handed back to librqbit's
//!   fastresume when it is added again (librqbit deletes its own copy with
//!   the torrent).
//! * No read waits longer than `read_timeout`: it fails with a log line
//!   naming the file.
//! * With `EngineConfig::zone`, a partial torrent dials as
//!   `holders::dial_order` decides: a member that is not its zone's
//!   fetcher of the content dials its zone only. A read or fetch that
//!   stalls within its zone brings the torrent up again with
//!   `Dial::Everyone`: zones never make a read fail.
//! * librqbit runs on a runtime of its own (`BtRuntime`, one thread): the
//!   session is made there, and every call that spawns its tasks (adding,
//!   deleting, selecting files) is made there.

mod cache;
mod fetch;
mod holders;
mod lifecycle;
mod listen;
mod live;
mod publish;
mod read;
mod runtime;
mod seed;
mod status;
mod traffic;

#[cfg(test)]
mod bounds_tests;
#[cfg(test)]
mod seed_tests;
#[cfg(test)]
mod zone_tests;

/// The configuration the engine's tests start it with: state in `dir`
/// (objects in `dir/objects`), loopback, short deadlines.
#[cfg(test)]
fn test_config(
    dir: &Path,
    max_live: usize,
    member: MemberId,
    zone: Option<String>,
) -> EngineConfig {
    let objects = dir.join("objects");
    fs::create_dir_all(&objects).expect("objects dir");
    EngineConfig {
        dir: dir.join("bt"),
        object_path: Arc::new(move |c: &ContentId| objects.join(c.to_hex())),
        listen: (std::net::Ipv4Addr::LOCALHOST, 0).into(),
        allow: Vec::new(),
        read_timeout: Duration::from_secs(5),
        up_rate: None,
        down_rate: None,
        hash_threads: 1,
        prefetch_parallel: 1,
        cache_size: None,
        wire_congestion: Congestion::default(),
        max_live,
        member,
        zone,
    }
}

use std::{
    collections::{HashMap, HashSet},
    fs, io,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    num::NonZeroU32,
    path::{Path, PathBuf},
    pin::Pin,
    sync::{Arc, atomic::AtomicU64},
    time::Duration,
};

use btfs_core::{ContentId, InfoHash, NodeId, Wanted};
use librqbit::{
    ConnectionOptions, ListenerMode, ListenerOptions, PeerConnectionOptions, Session,
    SessionOptions, SessionPersistenceConfig, limits::LimitsConfig,
};
use parking_lot::Mutex;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::mpsc,
};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use status::{FetchStatus, Status};
pub use traffic::{MAX_TRAFFIC_PEERS, OTHER_PEERS, PeerTraffic};

use crate::{
    MemberId, TorrentError,
    bridge::{self, BoxIo, Cidr, PeerTable},
    congestion::{self, Congestion, Socket},
    limits::Limits,
};
use holders::Holders;
use live::Live;
use runtime::BtRuntime;

/// librqbit's blocking-work semaphore: every open stream and every add holds
/// a permit (its default, 8, stalls a busy node).
const WORKER_PERMITS: usize = 256;

/// Where the object store keeps content (the fs crate decides the layout).
pub type ObjectPath = Arc<dyn Fn(&ContentId) -> PathBuf + Send + Sync>;

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// What the engine needs from the mesh.
pub trait Network: Send + Sync + 'static {
    /// The members connected now.
    fn members(&self) -> Vec<MemberId>;
    /// The member that is a node (the author of a record).
    fn member_of(&self, node: &NodeId) -> Option<MemberId>;
    /// Opens a byte stream to a member's BitTorrent bridge.
    fn dial(&self, member: MemberId) -> BoxFuture<io::Result<BoxIo>>;
    /// Asks members, `first` first, for the `.torrent` of `torrent`.
    fn metainfo(&self, torrent: InfoHash, first: Option<MemberId>) -> BoxFuture<Option<Vec<u8>>>;
    /// Tells the members that this node now holds `held` in full and no
    /// longer holds `dropped` (a hint; may be dropped when the mesh is busy).
    fn announce(&self, held: Vec<ContentId>, dropped: Vec<ContentId>);
    /// Whether a connection from `ip` to the BitTorrent listener may be a
    /// member's direct peer wire (it comes from a connected member's host).
    fn is_member_ip(&self, ip: IpAddr) -> bool;
    /// Authenticates a member's direct peer-wire connection to the
    /// BitTorrent listener and secures it; `Ok` names the member.
    fn accept_wire(&self, conn: TcpStream) -> BoxFuture<io::Result<(BoxIo, MemberId)>>;
    /// The zone a connected member told (`zone=`), if any.
    fn zone_of(&self, member: &MemberId) -> Option<String>;
}

#[derive(Clone)]
pub struct EngineConfig {
    /// The engine's state directory (`STATE/bt`).
    pub dir: PathBuf,
    pub object_path: ObjectPath,
    /// The listener for standard BitTorrent clients from `allow` networks
    /// (`bt_listen=`); members always come over the mesh.
    pub listen: SocketAddr,
    pub allow: Vec<Cidr>,
    pub read_timeout: Duration,
    pub up_rate: Option<NonZeroU32>,
    pub down_rate: Option<NonZeroU32>,
    pub hash_threads: usize,
    pub prefetch_parallel: usize,
    /// `cache_size=`: bytes of fetched content kept; beyond it the least
    /// recently used goes, if another member holds it. `None`: all kept.
    pub cache_size: Option<u64>,
    /// `bt_congestion=`: the TCP congestion control of wires to and from
    /// other nodes (see `congestion`).
    pub wire_congestion: Congestion,
    /// Torrents live at once ([`DEFAULT_MAX_LIVE`](crate::DEFAULT_MAX_LIVE)
    /// unless set; 0 counts as 1). Bringing one more up retires the least
    /// recently used idle one; a member's handshake that finds none idle is
    /// refused (`Status::live_refused`). Local reads and fetches are never
    /// refused: they also retire torrents that only members' connections
    /// use, and past that go over the cap by the torrents they use at once.
    pub max_live: usize,
    /// This node as the mesh names it (for choosing who of a zone fetches
    /// across zones).
    pub member: MemberId,
    /// `zone=`: this node's zone. Members of a zone fetch a file from
    /// other zones about once between them (see `holders::dial_order`).
    /// `None`: every connected member is dialled, zones or not.
    pub zone: Option<String>,
}

impl std::fmt::Debug for EngineConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineConfig")
            .field("dir", &self.dir)
            .field("listen", &self.listen)
            .field("allow", &self.allow)
            .field("read_timeout", &self.read_timeout)
            .field("wire_congestion", &self.wire_congestion)
            .field("max_live", &self.max_live)
            .field("member", &self.member)
            .field("zone", &self.zone)
            .finish_non_exhaustive()
    }
}

pub struct Engine {
    cfg: EngineConfig,
    session: Arc<Session>,
    bt: BtRuntime,
    net: Arc<dyn Network>,
    /// librqbit's loopback listener, where bridged connections go.
    local: SocketAddr,
    public: Option<SocketAddr>,
    peers: Mutex<PeerTable>,
    holders: Mutex<Holders>,
    live: Mutex<HashMap<InfoHash, Arc<Live>>>,
    adding: tokio::sync::Mutex<()>,
    prefetch_tx: mpsc::Sender<Wanted>,
    retired_down: AtomicU64,
    retired_up: AtomicU64,
    /// Slots for [`warm`](Engine::warm) tasks (see `MAX_WARMING`).
    warming: Arc<tokio::sync::Semaphore>,
    /// Warm requests refused for want of a slot.
    warm_refused: AtomicU64,
    /// Metainfo from members that failed its checks.
    metainfo_refused: AtomicU64,
    /// Per-member bounds, and the counters of what they refused.
    limits: Limits,
    /// SOCKS5 clients refused for want of the secret.
    socks_refused: AtomicU64,
    /// Torrents fetched whole for this node's zone (`listen`), at most
    /// `MAX_ZONE_FETCHES`.
    zone_fetches: Mutex<HashSet<InfoHash>>,
    /// Content the cache must never evict, whatever `cache_size` says
    /// (pinned paths, history still inside its window): each predicate is
    /// asked in turn (see [`Engine::add_keep`]).
    keep: Mutex<Vec<Keep>>,
    /// Bytes moved per peer (`traffic`), and what metrics count of the
    /// engine alone.
    traffic: traffic::Traffic,
    metrics: btfs_metrics::EngineMetrics,
    /// `read_timeout`, `down_rate` and `cache_size` as they are now
    /// (`mount -o remount` changes them; see `cache.rs`).
    settings: crate::limits::LiveSettings,
    cancel: CancellationToken,
}

/// Says whether content must stay: see [`Engine::add_keep`].
pub type Keep = Box<dyn Fn(&ContentId) -> bool + Send + Sync>;

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("local", &self.local)
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// Starts the session, the SOCKS5 bridge, the public listener and the
    /// background tasks. Must run inside a multi-thread tokio runtime.
    pub async fn start(
        cfg: EngineConfig,
        net: Arc<dyn Network>,
    ) -> Result<Arc<Self>, TorrentError> {
        for sub in ["torrents", "partial", "resume", "session", "fetched"] {
            fs::create_dir_all(cfg.dir.join(sub))?;
        }
        // Torrents are brought up on demand: nothing is restored. The
        // bitfields librqbit last flushed (a crash left them there) join the
        // kept ones.
        let session_dir = cfg.dir.join("session");
        for e in fs::read_dir(&session_dir)? {
            let e = e?;
            if !e.file_type()?.is_file() {
                continue;
            }
            let name = e.file_name();
            if name.to_string_lossy().ends_with(".bitv") {
                let kept = cfg.dir.join("resume").join(&name);
                write_atomic(&kept, &with_kept(&kept, fs::read(e.path())?))?;
                fs::remove_file(e.path())?;
            } else {
                fs::remove_file(e.path())?;
            }
        }
        let socks = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        congestion::unpace(&socks);
        let socks_addr = socks.local_addr()?;
        // Only librqbit, given the secret in its proxy URL, may use the
        // bridge: other local users could reach members' peer wires.
        let socks_secret = bridge::SocksSecret::random()?;
        let bt = BtRuntime::start()?;
        let session = bt
            .run(Session::new_with_opts(
                cfg.dir.join("partial"),
                SessionOptions {
                    dht: None,
                    disable_trackers: true,
                    disable_local_service_discovery: true,
                    listen: Some(ListenerOptions {
                        mode: ListenerMode::TcpOnly,
                        listen_addr: (Ipv4Addr::LOCALHOST, 0).into(),
                        enable_upnp_port_forwarding: false,
                        ipv4_only: true,
                        ..Default::default()
                    }),
                    connect: Some(ConnectionOptions {
                        proxy_url: Some(socks_secret.proxy_url(socks_addr)),
                        enable_tcp: true,
                        peer_opts: Some(PeerConnectionOptions {
                            max_request_window: Some(live::PEER_REQUEST_WINDOW),
                            ..Default::default()
                        }),
                    }),
                    persistence: Some(SessionPersistenceConfig::Json {
                        folder: Some(session_dir),
                    }),
                    fastresume: true,
                    runtime_worker_threads: Some(WORKER_PERMITS),
                    ratelimits: LimitsConfig {
                        upload_bps: cfg.up_rate,
                        download_bps: cfg.down_rate,
                    },
                    ipv4_only: true,
                    ..Default::default()
                },
            ))
            .await?
            .map_err(TorrentError::session)?;
        let local = session
            .listen_addr()
            .ok_or(TorrentError::SessionUnexpected("librqbit has no listener"))?;
        match tokio::task::spawn_blocking(move || congestion::unpace_ours(Socket::Listening(local)))
            .await
        {
            Ok(Ok(true)) => {}
            Ok(Ok(false)) => {
                warn!(%local, "librqbit's listener not found: it keeps the system's congestion control")
            }
            Ok(Err(e)) => {
                warn!(%local, "librqbit's listener keeps the system's congestion control: {e}")
            }
            Err(e) => warn!("looking for librqbit's listener: {e}"),
        }
        let public = TcpListener::bind(cfg.listen).await.map_err(|e| {
            io::Error::new(
                e.kind(),
                ListenError {
                    addr: cfg.listen,
                    source: e,
                },
            )
        })?;
        cfg.wire_congestion.apply(&public)?;
        let public_addr = public.local_addr()?;
        let (prefetch_tx, prefetch_rx) = mpsc::channel(fetch::PREFETCH_QUEUE);
        let engine = Arc::new(Self {
            session,
            bt,
            net,
            local,
            public: Some(public_addr),
            peers: Mutex::new(PeerTable::default()),
            holders: Mutex::new(Holders::default()),
            live: Mutex::new(HashMap::new()),
            adding: tokio::sync::Mutex::new(()),
            prefetch_tx,
            retired_down: AtomicU64::new(0),
            retired_up: AtomicU64::new(0),
            warming: Arc::new(tokio::sync::Semaphore::new(listen::MAX_WARMING)),
            warm_refused: AtomicU64::new(0),
            metainfo_refused: AtomicU64::new(0),
            limits: Limits::default(),
            socks_refused: AtomicU64::new(0),
            zone_fetches: Mutex::new(HashSet::new()),
            keep: Mutex::new(Vec::new()),
            traffic: traffic::Traffic::default(),
            metrics: btfs_metrics::EngineMetrics::default(),
            settings: crate::limits::LiveSettings::new(
                cfg.read_timeout,
                cfg.down_rate,
                cfg.cache_size,
            ),
            cancel: CancellationToken::new(),
            cfg,
        });
        tokio::spawn(engine.clone().serve_socks(socks, socks_secret));
        tokio::spawn(engine.clone().serve_public(public));
        tokio::spawn(engine.clone().reap());
        tokio::spawn(engine.clone().sweep());
        tokio::spawn(engine.clone().keep_haves());
        // Always started: `cache_size` may be set by a remount.
        tokio::spawn(engine.clone().keep_cache());
        let prefetch_rx = Arc::new(tokio::sync::Mutex::new(prefetch_rx));
        for _ in 0..engine.cfg.prefetch_parallel.max(1) {
            tokio::spawn(engine.clone().prefetcher(prefetch_rx.clone()));
        }
        info!(bittorrent = %public_addr, loopback = %local, "BitTorrent engine started");
        Ok(engine)
    }

    /// The BitTorrent listener (members' direct peer wires, standard
    /// clients).
    pub fn listen_addr(&self) -> Option<SocketAddr> {
        self.public
    }

    /// Stops the background tasks and the session.
    pub async fn stop(&self) {
        self.cancel.cancel();
        let ids: Vec<_> = self.live.lock().drain().map(|(_, l)| l).collect();
        for l in ids {
            self.retire(&l).await;
        }
        self.session.cancellation_token().cancel();
        self.bt.stop().await;
    }

    /// Where the pieces of the partial torrent `ih` are kept between its
    /// lives (`bt/resume/`).
    fn resume_path(&self, ih: &InfoHash) -> PathBuf {
        self.cfg.dir.join("resume").join(format!("{ih}.bitv"))
    }

    /// Where librqbit's fastresume looks for the pieces of `ih`
    /// (`bt/session/`).
    fn session_bitv_path(&self, ih: &InfoHash) -> PathBuf {
        self.cfg.dir.join("session").join(format!("{ih}.bitv"))
    }
}

/// The BitTorrent listener could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("BitTorrent listener on {addr}: {source}")]
struct ListenError {
    addr: SocketAddr,
    #[source]
    source: io::Error,
}

/// `bits` joined with the bitfield kept at `path`, when it is one of the
/// same torrent: every bitfield here claims only verified pieces, so their
/// union does too.
fn with_kept(path: &Path, mut bits: Vec<u8>) -> Vec<u8> {
    if let Ok(old) = fs::read(path)
        && old.len() == bits.len()
    {
        bits.iter_mut().zip(old).for_each(|(b, o)| *b |= o);
    }
    bits
}

fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, data)?;
    fs::rename(&tmp, path)
}
