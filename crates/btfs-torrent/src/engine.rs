//! The BitTorrent engine: one librqbit session, torrents brought up on
//! demand and retired when idle.
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
//! * librqbit runs on a runtime of its own (`BtRuntime`, one thread): the
//!   session is made there, and every call that spawns its tasks (adding,
//!   deleting, selecting files) is made there.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    fs,
    io::{self, SeekFrom},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    num::NonZeroU32,
    os::unix::fs::{FileExt, MetadataExt},
    path::{Path, PathBuf},
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use btfs_core::{ContentId, InfoHash, NodeId, Wanted};
use librqbit::{
    AddTorrent, AddTorrentOptions, ConnectionOptions, ListenerMode, ListenerOptions,
    ManagedTorrent, PeerConnectionOptions, Session, SessionOptions, SessionPersistenceConfig,
    api::TorrentIdOrHash, limits::LimitsConfig,
};
use tokio::{
    io::{AsyncReadExt, AsyncSeekExt},
    net::{TcpListener, TcpStream},
    sync::mpsc,
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{
    TorrentError,
    bridge::{self, BoxIo, Cidr, PeerTable, QuickAck},
    congestion::{self, Congestion, Socket},
    limits::{
        self, BRIDGE_IDLE, Limits, MAX_WIRES_PER_HOST, MAX_WIRES_PER_MEMBER, MEMBER_BRING_UP_BURST,
        MEMBER_BRING_UP_RATE, Relayed, Usage,
    },
    meta::Metainfo,
};

/// A torrent unused for this long is retired.
const IDLE_LIVE: Duration = Duration::from_secs(30);
/// How often the cache is measured against `cache_size`.
const CACHE_EVERY: Duration = Duration::from_secs(5);
/// How often the pieces reads verified are written down.
const KEEP_HAVES_EVERY: Duration = Duration::from_secs(1);
/// How often idle torrents are looked for.
const REAP_EVERY: Duration = Duration::from_secs(5);
/// Bytes read in order after which a reader counts as sequential: the rest
/// of the file is then fetched in the background (at full speed, as a
/// whole-file fetch) for as long as the reader keeps reading.
const SEQUENTIAL_AFTER: u64 = 1 << 20;
/// A sequential reader idle this long stops its background fetch. (Keeping
/// a librqbit stream open for read-ahead instead stalls: once its 32 MiB
/// window is fetched, idle peers stay connected and librqbit's request loop
/// sleeps up to 5 s before serving the next read.)
const FOLLOW_IDLE: Duration = Duration::from_secs(3);
/// How far ahead of a sequential reader the page cache of the file being
/// fetched is filled in, and in what steps (see `warm_ahead`).
const WARM_AHEAD: u64 = 64 << 20;
const WARM_STEP: u64 = 4 << 20;
const WARM_EVERY: Duration = Duration::from_millis(5);
/// A stream read during which the torrent receives nothing for this long,
/// with no peer connected, brings the torrent up again, with the members
/// connected now: librqbit can give up on a peer for the life of a
/// torrent. Adding the torrent again (fastresume keeps its pieces) costs
/// about 100 ms.
const STALL_RETRY: Duration = Duration::from_millis(1500);
/// The same with a peer connected. librqbit's request loop sleeps up to 5 s
/// once it finds nothing to ask for (after a read's stream is dropped, see
/// `READ_REQUEST_WINDOW`), and a new stream does not wake it; over a live
/// connection the first block of a piece comes within milliseconds. Each
/// further stall of the same read doubles it, up to `STALL_RETRY`.
const STALL_QUIET: Duration = Duration::from_millis(300);
/// How often a waiting read looks at what its torrent received.
const STALL_CHECK: Duration = Duration::from_millis(50);
/// Blocks a rate-limited node is given to receive before a read counts as
/// stalled (`down_rate=`): librqbit asks for one 16 KiB block at a time
/// when the limiter allows.
const STALL_BLOCKS: u64 = 4;
/// Prefetches waiting for a worker; more are dropped with a log line (the
/// file is still fetched when it is first read).
const PREFETCH_QUEUE: usize = 4096;
/// Torrents being brought up for members' metainfo requests at once; more
/// requests meanwhile bring none up (a member decides how many it sends).
const MAX_WARMING: usize = 8;
/// librqbit's outgoing connections waiting to get an unpaced congestion
/// control; more keep the system's (see `congestion`).
const UNPACE_QUEUE: usize = 64;
/// Chunk requests (16 KiB each) librqbit keeps outstanding per peer, never
/// more than the peer's `reqq`, in a torrent fetched whole (a prefetch, a
/// followed sequential reader). librqbit's default, 128 (2 MiB), is what a
/// peer connection carries per round trip; through the wire's two bridges
/// and three TCP legs a round trip under load is long enough that 128 left
/// a full-file read window-bound (188–220 MB/s at best over two runs,
/// against 257–282 MB/s with 512). The cost: a newly needed piece (a seek
/// during a fetch) is requested after the 8 MiB already asked for.
const PEER_REQUEST_WINDOW: usize = 512;
/// The same in a torrent brought up for reads: a read asks librqbit's
/// stream for its pieces, and the stream keeps the window full with the
/// pieces after them, which arrive even though the stream is dropped as
/// soon as the read has its bytes. A 4 KiB read fetched up to 8.6 MB with
/// 512, and 2.3–2.9 MB with 128.
///
/// Invariant: the window (2 MiB) is more than `SEQUENTIAL_AFTER` and a
/// read. After a read, librqbit's request loop finds nothing to ask for
/// and sleeps up to 5 s, and a new stream does not wake it: a read that
/// needs a piece not yet asked for waits `STALL_QUIET` and brings the
/// torrent up again. A sequential reader should be followed before it
/// reads past what its first read brought. With 64 (1 MiB), a reader of
/// 256 KiB at a time from the middle of a file stalled twice.
const READ_REQUEST_WINDOW: usize = 128;
/// A read this large at the start of a file brings its torrent up with the
/// window of a whole-file fetch: that is how whole-file readers (`cp`,
/// `cat`, checksums) begin, and they are followed after `SEQUENTIAL_AFTER`
/// bytes. Other sequential readers get the window when they are followed,
/// by bringing the torrent up again (some 100 ms; its pieces are kept).
const WHOLE_FILE_READ: u64 = 128 << 10;
/// Time for a peer to send its handshake, and for a stream to a member to
/// open.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// librqbit's blocking-work semaphore: every open stream and every add holds
/// a permit (its default, 8, stalls a busy node).
const WORKER_PERMITS: usize = 256;

/// Content that members announced they hold, remembered at most (the oldest
/// go first: these are hints for finding peers, not a source of truth).
const KNOWN_HOLDINGS: usize = 100_000;

/// Connections on the BitTorrent listener (members' direct peer wires and
/// standard clients) served at once.
const MAX_DIRECT_WIRES: usize = 1024;
/// Members a torrent dials at first, its known holders first: bounds the
/// fan-out of a read in a large cluster (librqbit keeps 128 peers a torrent).
const MAX_DIALLED: usize = 64;

/// How often `.torrent` files of content no longer here are looked for...
const SWEEP_EVERY: Duration = Duration::from_secs(600);
/// ... and how old they must be: a publish writes its torrent before the
/// object is installed, and a read before its partial file exists.
const SWEEP_MIN_AGE: Duration = Duration::from_secs(3600);

/// Where the object store keeps content (the fs crate decides the layout).
pub type ObjectPath = Arc<dyn Fn(&ContentId) -> PathBuf + Send + Sync>;

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// What the engine needs from the mesh.
pub trait Network: Send + Sync + 'static {
    /// The members connected now.
    fn members(&self) -> Vec<String>;
    /// The member name of a node (the author of a record).
    fn member_of(&self, node: &NodeId) -> Option<String>;
    /// Opens a byte stream to a member's BitTorrent bridge.
    fn dial(&self, member: String) -> BoxFuture<io::Result<BoxIo>>;
    /// Asks members, `first` first, for the `.torrent` of `torrent`.
    fn metainfo(&self, torrent: InfoHash, first: Option<String>) -> BoxFuture<Option<Vec<u8>>>;
    /// Tells the members that this node now holds `held` in full and no
    /// longer holds `dropped` (a hint; may be dropped when the mesh is busy).
    fn announce(&self, held: Vec<ContentId>, dropped: Vec<ContentId>);
    /// Whether a connection from `ip` to the BitTorrent listener may be a
    /// member's direct peer wire (it comes from a connected member's host).
    fn is_member_ip(&self, ip: IpAddr) -> bool;
    /// Authenticates a member's direct peer-wire connection to the
    /// BitTorrent listener and secures it; `Ok` names the member.
    fn accept_wire(&self, conn: TcpStream) -> BoxFuture<io::Result<(BoxIo, String)>>;
}

/// The kept torrents (in `dir/torrents`) of content that is neither an object
/// nor partial (in `dir/partial`), not live, and older than `min_age`.
fn stale_torrents(
    dir: &Path,
    object_path: &ObjectPath,
    live: &HashSet<InfoHash>,
    min_age: Duration,
) -> io::Result<Vec<InfoHash>> {
    let now = std::time::SystemTime::now();
    let mut out = Vec::new();
    for e in fs::read_dir(dir.join("torrents"))? {
        let e = e?;
        let mut ih = [0u8; 20];
        let named = e
            .file_name()
            .to_str()
            .and_then(|n| n.strip_suffix(".torrent"))
            .is_some_and(|h| hex::decode_to_slice(h, &mut ih).is_ok());
        let ih = InfoHash(ih);
        if !named || live.contains(&ih) {
            continue;
        }
        let modified = e.metadata()?.modified()?;
        if now.duration_since(modified).unwrap_or_default() < min_age {
            continue;
        }
        // A file that does not parse is left for a person to look at.
        let Ok(meta) = Metainfo::parse(fs::read(e.path())?, &ih) else {
            continue;
        };
        let here = object_path(&meta.content).exists()
            || dir.join("partial").join(meta.content.to_hex()).exists();
        if !here {
            out.push(ih);
        }
    }
    Ok(out)
}

/// Who announced holding what, bounded by `KNOWN_HOLDINGS`.
#[derive(Debug, Default)]
struct Holders {
    by_content: HashMap<ContentId, Vec<String>>,
    /// First announcement order, for forgetting the oldest.
    order: VecDeque<ContentId>,
}

impl Holders {
    fn note(&mut self, member: &str, held: &[ContentId], dropped: &[ContentId]) {
        for c in held {
            let holders = self.by_content.entry(*c).or_insert_with(|| {
                self.order.push_back(*c);
                Vec::new()
            });
            if !holders.iter().any(|m| m == member) {
                holders.push(member.to_owned());
            }
        }
        for c in dropped {
            if let Some(holders) = self.by_content.get_mut(c) {
                holders.retain(|m| m != member);
            }
        }
        while self.order.len() > KNOWN_HOLDINGS {
            if let Some(old) = self.order.pop_front() {
                self.by_content.remove(&old);
            }
        }
    }

    fn of(&self, c: &ContentId) -> &[String] {
        self.by_content.get(c).map_or(&[], Vec::as_slice)
    }

    /// (content, member) pairs known.
    fn count(&self) -> usize {
        self.by_content.values().map(Vec::len).sum()
    }
}

/// The members a torrent dials, in order: the author, then the members that
/// announced holding the content, then the others; connected ones only, at
/// most `MAX_DIALLED`.
fn dial_order(first: Option<&String>, holders: &[String], members: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for m in first.into_iter().chain(holders).chain(members) {
        if out.len() == MAX_DIALLED {
            break;
        }
        if members.contains(m) && !out.contains(m) {
            out.push(m.clone());
        }
    }
    out
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
            .finish_non_exhaustive()
    }
}

/// A live torrent.
type ManagedTorrentHandle = Arc<ManagedTorrent>;

struct Live {
    handle: ManagedTorrentHandle,
    meta: Arc<Metainfo>,
    /// The file librqbit reads and writes.
    data: Mutex<PathBuf>,
    complete: AtomicBool,
    /// Pieces known to be verified here (a subset of librqbit's bitfield).
    have: Mutex<Vec<bool>>,
    last_used: Mutex<Instant>,
    /// Users of any kind (`InUse`), and those on this node's behalf.
    users: AtomicUsize,
    local_users: AtomicUsize,
    label: Mutex<String>,
    fetching: AtomicBool,
    /// Where the last read ended, the bytes read in order up to it, and
    /// when.
    sequential: Mutex<(u64, u64, Instant)>,
    /// A background fetch follows a sequential reader.
    following: AtomicBool,
    /// Added for a whole-file fetch (`PEER_REQUEST_WINDOW`), not for reads
    /// (`READ_REQUEST_WINDOW`); a complete torrent requests nothing.
    whole: bool,
    /// The member known to hold the content (its author), if any.
    holder: Option<String>,
    /// Pieces were marked since the bitfield was last kept.
    have_dirty: AtomicBool,
    /// An install into the object store is under way (`install_if_whole`);
    /// `install_lock` serializes installs from every path.
    installing: AtomicBool,
    install_lock: tokio::sync::Mutex<()>,
}

impl Live {
    fn touch(&self) {
        *lock(&self.last_used) = Instant::now();
    }

    /// What it is used for, to decide whether it can be retired.
    fn usage(&self) -> Usage {
        Usage {
            last_used: *lock(&self.last_used),
            users: self.users.load(Ordering::Acquire),
            local_users: self.local_users.load(Ordering::Acquire),
            busy: self.fetching.load(Ordering::Acquire) || self.installing.load(Ordering::Acquire),
        }
    }

    fn pieces_of(&self, offset: u64, end: u64) -> std::ops::Range<usize> {
        // Never 0 (`add` checks the metainfo); guarded all the same.
        let pl = u64::from(self.meta.piece_length.max(1));
        let index = |p: u64| usize::try_from(p).unwrap_or(usize::MAX);
        index(offset / pl)..index(end.div_ceil(pl))
    }

    /// Whether pieces `r` are verified here: known from earlier reads, or
    /// asked of librqbit (a background fetch brings pieces no read saw).
    fn has(&self, session: &Arc<Session>, r: std::ops::Range<usize>) -> bool {
        if self.complete.load(Ordering::Acquire)
            || lock(&self.have)
                .get(r.clone())
                .is_some_and(|h| h.iter().all(|b| *b))
        {
            return true;
        }
        let api = librqbit::Api::new(session.clone(), None);
        let Ok((bits, _)) = api.api_dump_haves(TorrentIdOrHash::Id(self.handle.id())) else {
            return false;
        };
        let raw = bits.as_raw_slice();
        let all = r
            .clone()
            .all(|p| raw.get(p / 8).is_some_and(|b| b & (0x80 >> (p % 8)) != 0));
        if all {
            self.mark(r);
        }
        all
    }

    fn mark(&self, r: std::ops::Range<usize>) {
        let mut have = lock(&self.have);
        for p in r {
            if let Some(h) = have.get_mut(p)
                && !*h
            {
                *h = true;
                self.have_dirty.store(true, Ordering::Release);
            }
        }
    }

    /// The pieces known here as a BitTorrent bitfield.
    fn have_bits(&self) -> Vec<u8> {
        let have = lock(&self.have);
        let mut bits = vec![0u8; have.len().div_ceil(8)];
        for (p, h) in have.iter().enumerate() {
            if *h {
                bits[p / 8] |= 0x80 >> (p % 8);
            }
        }
        bits
    }
}

/// Whom a torrent is brought up and used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Need {
    /// This node: a read, a fetch, a follower. Never refused for want of
    /// room under `max_live`: local reads take priority over members. Room
    /// is made by retiring the least recently used idle torrent, else the
    /// least recently used one only members' connections use (they are
    /// closed); with every live torrent in local use, the cap is exceeded
    /// (by at most the torrents this node reads and fetches at once).
    Local,
    /// A member's handshake or metainfo request: refused
    /// (`TorrentError::NoRoom`) when no live torrent is idle.
    Peer,
}

/// Counts a user of a live torrent for as long as it is held.
struct InUse {
    live: Arc<Live>,
    need: Need,
}

impl InUse {
    fn new(l: Arc<Live>, need: Need) -> Self {
        if need == Need::Local {
            l.local_users.fetch_add(1, Ordering::AcqRel);
        }
        l.users.fetch_add(1, Ordering::AcqRel);
        l.touch();
        Self { live: l, need }
    }
}

impl Drop for InUse {
    fn drop(&mut self) {
        self.live.touch();
        self.live.users.fetch_sub(1, Ordering::AcqRel);
        if self.need == Need::Local {
            self.live.local_users.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// What `btfs status` shows.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Status {
    pub bittorrent_listen: Option<String>,
    pub bytes_downloaded: u64,
    pub bytes_uploaded: u64,
    pub live_torrents: usize,
    /// (content, member) pairs that members announced holding.
    pub known_holdings: usize,
    /// Members' metainfo requests that brought no torrent up because
    /// [`MAX_WARMING`] were being brought up already.
    pub warm_refused: u64,
    /// Metainfo from members that failed its checks (bounds, info hash,
    /// content, size).
    pub metainfo_refused: u64,
    /// The cap on live torrents (`EngineConfig::max_live`).
    pub max_live: usize,
    /// Members' handshakes (and metainfo requests) refused because every
    /// live torrent was in use and `max_live` were live.
    pub live_refused: u64,
    /// Peer connections refused because their member had
    /// `MAX_WIRES_PER_MEMBER` open (or their host `MAX_WIRES_PER_HOST` on
    /// the BitTorrent listener).
    pub member_conns_refused: u64,
    /// Members' handshakes refused because their member brought up
    /// torrents faster than `MEMBER_BRING_UP_RATE` a second after a burst of
    /// `MEMBER_BRING_UP_BURST`.
    pub member_bring_ups_refused: u64,
    /// Peer connections closed for moving nothing: no handshake within
    /// `HANDSHAKE_TIMEOUT`, or no byte either way for `BRIDGE_IDLE`.
    pub bridges_idle_closed: u64,
    /// Connections to the loopback SOCKS5 bridge refused for want of the
    /// daemon's secret (local processes other than librqbit).
    pub socks_refused: u64,
    pub fetches: Vec<FetchStatus>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct FetchStatus {
    pub path: String,
    pub size: u64,
    pub have: u64,
    pub full: bool,
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
    /// Slots for [`warm`](Engine::warm) tasks (see [`MAX_WARMING`]).
    warming: Arc<tokio::sync::Semaphore>,
    /// Warm requests refused for want of a slot.
    warm_refused: AtomicU64,
    /// Metainfo from members that failed its checks.
    metainfo_refused: AtomicU64,
    /// Per-member bounds, and the counters of what they refused.
    limits: Limits,
    /// SOCKS5 clients refused for want of the secret.
    socks_refused: AtomicU64,
    cancel: CancellationToken,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("local", &self.local)
            .finish_non_exhaustive()
    }
}

/// librqbit's own runtime: one thread, current-thread flavour.
///
/// On a multi-thread runtime librqbit writes every received 16 KiB chunk
/// (and reads every chunk it sends) inside `block_in_place`, which hands the
/// worker's other tasks to another thread each time. Measured on two cores,
/// 1 GiB between two namespaces: 74–98 MB/s that way, 142–260 MB/s on a
/// current-thread runtime, where librqbit makes these calls inline. The
/// daemon's runtime keeps the bridges, the mesh and FUSE answers, on the
/// other cores.
struct BtRuntime {
    handle: tokio::runtime::Handle,
    stop: CancellationToken,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl BtRuntime {
    fn start() -> io::Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = rt.handle().clone();
        let stop = CancellationToken::new();
        let until = stop.clone();
        let thread = std::thread::Builder::new()
            .name("btfs-bt".into())
            .spawn(move || {
                rt.block_on(until.cancelled());
                // What librqbit left running is dropped, not awaited.
                rt.shutdown_timeout(Duration::from_secs(1));
            })?;
        Ok(Self {
            handle,
            stop,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Runs `f` on librqbit's runtime (it keeps running if the caller
    /// gives up on it).
    async fn run<F>(&self, f: F) -> Result<F::Output, TorrentError>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handle
            .spawn(f)
            .await
            .map_err(|e| TorrentError::Session(format!("BitTorrent runtime: {e}")))
    }

    /// Stops the runtime and waits (at most a few seconds) for its thread.
    /// (Dropping it stops it too, without waiting.)
    async fn stop(&self) {
        self.stop.cancel();
        let Some(thread) = lock(&self.thread).take() else {
            return;
        };
        let joined = tokio::task::spawn_blocking(move || thread.join());
        if tokio::time::timeout(Duration::from_secs(3), joined)
            .await
            .is_err()
        {
            warn!("librqbit's runtime did not stop within 3 s");
        }
    }
}

impl Drop for BtRuntime {
    /// An engine that failed to start, or was dropped unstopped, does not
    /// leave the thread behind.
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
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
                            max_request_window: Some(PEER_REQUEST_WINDOW),
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
            .ok_or_else(|| TorrentError::Session("librqbit has no listener".into()))?;
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
                format!("BitTorrent listener on {}: {e}", cfg.listen),
            )
        })?;
        cfg.wire_congestion.apply(&public)?;
        let public_addr = public.local_addr()?;
        let (prefetch_tx, prefetch_rx) = mpsc::channel(PREFETCH_QUEUE);
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
            warming: Arc::new(tokio::sync::Semaphore::new(MAX_WARMING)),
            warm_refused: AtomicU64::new(0),
            metainfo_refused: AtomicU64::new(0),
            limits: Limits::default(),
            socks_refused: AtomicU64::new(0),
            cancel: CancellationToken::new(),
            cfg,
        });
        tokio::spawn(engine.clone().serve_socks(socks, socks_secret));
        tokio::spawn(engine.clone().serve_public(public));
        tokio::spawn(engine.clone().reap());
        tokio::spawn(engine.clone().sweep());
        tokio::spawn(engine.clone().keep_haves());
        if let Some(limit) = engine.cfg.cache_size {
            tokio::spawn(engine.clone().keep_cache(limit));
        }
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
        let ids: Vec<_> = lock(&self.live).drain().map(|(_, l)| l).collect();
        for l in ids {
            self.retire(&l).await;
        }
        self.session.cancellation_token().cancel();
        self.bt.stop().await;
    }

    // ----- publish ------------------------------------------------------------

    /// Builds and keeps the torrent of new content (blocking: it hashes the
    /// file). Nothing goes live: a member that wants the content brings it up.
    pub fn publish(
        &self,
        content: &ContentId,
        file: &Path,
        size: u64,
    ) -> Result<InfoHash, TorrentError> {
        let meta = Metainfo::build(content, file, size, self.cfg.hash_threads)?;
        let path = self.torrent_path(&meta.info_hash);
        if !path.exists() {
            write_atomic(&path, &meta.bytes)?;
        }
        Ok(meta.info_hash)
    }

    fn torrent_path(&self, ih: &InfoHash) -> PathBuf {
        self.cfg.dir.join("torrents").join(format!("{ih}.torrent"))
    }

    /// The `.torrent` of `ih` if this node has it (to answer members).
    pub fn local_metainfo(&self, ih: &InfoHash) -> Option<Vec<u8>> {
        fs::read(self.torrent_path(ih)).ok()
    }

    /// The `.torrent` of a file: kept here, or asked from members.
    pub async fn metainfo(&self, want: &Wanted) -> Result<Arc<Metainfo>, TorrentError> {
        let path = self.torrent_path(&want.torrent);
        // Checked in full (bounds, info hash, content and size) before it is
        // kept: a member's bytes are hostile until then.
        let meta = match fs::read(&path) {
            Ok(bytes) => Metainfo::parse_wanted(bytes, want)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let bytes = self
                    .net
                    .metainfo(want.torrent, self.net.member_of(&want.author))
                    .await
                    .ok_or(TorrentError::NoMetainfo(want.torrent))?;
                let meta = Metainfo::parse_wanted(bytes, want).inspect_err(|e| {
                    self.metainfo_refused.fetch_add(1, Ordering::Relaxed);
                    warn!(path = %want.path, torrent = %want.torrent, "refused a member's metainfo: {e}");
                })?;
                write_atomic(&path, &meta.bytes)?;
                meta
            }
            Err(e) => return Err(e.into()),
        };
        Ok(Arc::new(meta))
    }

    // ----- live torrents ----------------------------------------------------------

    fn live_of(&self, ih: &InfoHash) -> Option<Arc<Live>> {
        lock(&self.live).get(ih).cloned()
    }

    /// The live torrent of `meta`, added if needed, in use for `need` while
    /// the result is held: seeding the object when it is here, else lazily
    /// fetching into `bt/partial/`. A torrent wanted `whole` that was
    /// brought up for reads is added again for a whole-file fetch (see
    /// `PEER_REQUEST_WINDOW`), keeping its pieces. Adding one past
    /// `max_live` first makes room (`make_room`).
    async fn bring_up(
        &self,
        meta: Arc<Metainfo>,
        label: &str,
        first: Option<String>,
        whole: bool,
        need: Need,
    ) -> Result<InUse, TorrentError> {
        let suits = |l: &Live| !whole || l.whole || l.complete.load(Ordering::Acquire);
        if let Some(l) = self.live_of(&meta.info_hash)
            && suits(&l)
        {
            return Ok(InUse::new(l, need));
        }
        let _adding = self.adding.lock().await;
        let Some(old) = self.live_of(&meta.info_hash) else {
            self.make_room(need).await?;
            let l = self.add(meta, label, first, whole, None).await?;
            return Ok(InUse::new(l, need));
        };
        if suits(&old) {
            return Ok(InUse::new(old, need));
        }
        debug!(torrent = %meta.info_hash, %label, "bringing a torrent up again for a whole-file fetch");
        lock(&self.live).remove(&meta.info_hash);
        self.retire(&old).await;
        let first = first.or_else(|| old.holder.clone());
        let l = self.add(meta, label, first, whole, Some(&old)).await?;
        Ok(InUse::new(l, need))
    }

    /// Makes room for one more live torrent under `max_live` (with the
    /// `adding` lock held): retires the least recently used torrent that
    /// `need` may take (`limits::lru_victim`), the way the reaper retires
    /// idle ones. A member's bring-up finding none is refused; a local one
    /// goes over the cap (see `Need`).
    async fn make_room(&self, need: Need) -> Result<(), TorrentError> {
        let max = self.cfg.max_live.max(1);
        loop {
            let victim = {
                let mut live = lock(&self.live);
                if live.len() < max {
                    return Ok(());
                }
                let usage = live.iter().map(|(ih, l)| (*ih, l.usage()));
                match limits::lru_victim(usage, need == Need::Local) {
                    Some(ih) => live.remove(&ih),
                    None if need == Need::Local => return Ok(()),
                    None => {
                        self.limits.live_refused.fetch_add(1, Ordering::Relaxed);
                        return Err(TorrentError::NoRoom { live: live.len() });
                    }
                }
            };
            if let Some(l) = victim {
                debug!(torrent = %l.meta.info_hash, max_live = max, "retiring the least recently used torrent to make room");
                self.retire(&l).await;
            }
        }
    }

    /// Adds the torrent of `meta` to the session (`bring_up`, under the
    /// `adding` lock). A torrent added again in place of `old` takes over
    /// what its readers did (the sequential reader and its follower).
    async fn add(
        &self,
        meta: Arc<Metainfo>,
        label: &str,
        first: Option<String>,
        whole: bool,
        old: Option<&Live>,
    ) -> Result<Arc<Live>, TorrentError> {
        let ih = meta.info_hash;
        let object = (self.cfg.object_path)(&meta.content);
        let complete = object.exists();
        let folder = if complete {
            object.parent().map(Path::to_path_buf).unwrap_or_default()
        } else {
            self.cfg.dir.join("partial")
        };
        let data = folder.join(meta.content.to_hex());
        // Fastresume: librqbit loads `<infohash>.bitv` and spot-checks it.
        let bitv = self.cfg.dir.join("session").join(format!("{ih}.bitv"));
        let resume = self.cfg.dir.join("resume").join(format!("{ih}.bitv"));
        // Bounded (`MAX_PIECES`) and nonzero piece length, checked again
        // here before anything is allocated per piece.
        let pieces = meta.piece_count()?;
        let bytes = pieces.div_ceil(8);
        let mut have = vec![false; pieces];
        if complete {
            let mut bits = vec![0xffu8; bytes];
            // Below 8: `bytes * 8` is the piece count rounded up to 8.
            let extra = (bytes * 8 - pieces) as u32;
            if let Some(last) = bits.last_mut() {
                *last = 0xffu8.checked_shl(extra).unwrap_or(0);
            }
            fs::write(&bitv, bits)?;
        } else {
            match fs::read(&resume) {
                Ok(bits) if bits.len() == bytes && data.exists() => {
                    for (p, h) in have.iter_mut().enumerate() {
                        *h = bits[p / 8] & (0x80 >> (p % 8)) != 0;
                    }
                    fs::write(&bitv, bits)?
                }
                _ => {
                    let _ = fs::remove_file(&bitv);
                    // Without a bitfield librqbit would hash the whole file
                    // on librqbit's one thread, stalling every other torrent
                    // meanwhile. Only a crash within a second of the first
                    // pieces leaves this: start over.
                    if data.exists() {
                        info!(torrent = %ih, %label, "partial content with no record of its pieces: fetching it again");
                        fs::remove_file(&data)?;
                    }
                }
            }
        }
        // A complete torrent waits for members to come (dialling them too
        // would double every connection); a partial one dials them.
        let mut peers = Vec::new();
        if !complete {
            let members = self.net.members();
            let order = {
                let holders = lock(&self.holders);
                dial_order(first.as_ref(), holders.of(&meta.content), &members)
            };
            let mut table = lock(&self.peers);
            for m in &order {
                peers.extend(table.addrs_of(m));
            }
        }
        debug!(torrent = %ih, %label, complete, peers = peers.len(), "bringing up");
        let whole = whole || complete;
        let opts = AddTorrentOptions {
            paused: false,
            // Lazy: nothing selected, reads fetch what they touch.
            only_files: if complete { None } else { Some(vec![]) },
            overwrite: true,
            output_folder: Some(folder.to_string_lossy().into_owned()),
            initial_peers: Some(peers),
            peer_opts: Some(PeerConnectionOptions {
                max_request_window: Some(if whole {
                    PEER_REQUEST_WINDOW
                } else {
                    READ_REQUEST_WINDOW
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let (session, torrent) = (self.session.clone(), meta.bytes.clone());
        let added = self
            .bt
            .run(async move {
                session
                    .add_torrent(AddTorrent::from_bytes(torrent), Some(opts))
                    .await
            })
            .await?
            .map_err(TorrentError::session)?;
        let handle = added
            .into_handle()
            .ok_or_else(|| TorrentError::Session("torrent added as list-only".into()))?;
        handle
            .wait_until_initialized()
            .await
            .map_err(TorrentError::session)?;
        let live = Arc::new(Live {
            handle,
            meta,
            data: Mutex::new(data),
            complete: AtomicBool::new(complete),
            have: Mutex::new(have),
            last_used: Mutex::new(Instant::now()),
            users: AtomicUsize::new(0),
            local_users: AtomicUsize::new(0),
            label: Mutex::new(label.to_owned()),
            fetching: AtomicBool::new(false),
            sequential: Mutex::new(
                old.map_or((u64::MAX, 0, Instant::now()), |o| *lock(&o.sequential)),
            ),
            following: AtomicBool::new(old.is_some_and(|o| o.following.load(Ordering::Acquire))),
            whole,
            holder: first,
            installing: AtomicBool::new(false),
            have_dirty: AtomicBool::new(false),
            install_lock: tokio::sync::Mutex::new(()),
        });
        lock(&self.live).insert(ih, live.clone());
        Ok(live)
    }

    /// Takes a torrent out of the session, keeping what it fetched.
    async fn retire(&self, l: &Live) {
        let ih = l.meta.info_hash;
        if let Some(s) = l.handle.live() {
            self.retired_down
                .fetch_add(s.get_downloaded_bytes(), Ordering::Relaxed);
            self.retired_up
                .fetch_add(s.get_uploaded_bytes(), Ordering::Relaxed);
        }
        if !l.complete.load(Ordering::Acquire) {
            // librqbit's bitfield (flushed lazily) joined with the pieces
            // reads saw verified: both only claim verified pieces.
            let bitv = self.cfg.dir.join("session").join(format!("{ih}.bitv"));
            let resume = self.cfg.dir.join("resume").join(format!("{ih}.bitv"));
            let bits = with_kept(&resume, with_kept(&bitv, l.have_bits()));
            if let Err(e) = write_atomic(&resume, &bits) {
                warn!(torrent = %ih, "could not keep the pieces fetched so far: {e}");
            }
        }
        let (session, id) = (self.session.clone(), l.handle.id());
        match self
            .bt
            .run(async move { session.delete(TorrentIdOrHash::Id(id), false).await })
            .await
        {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(torrent = %ih, "retiring: {e:#}"),
            Err(e) => warn!(torrent = %ih, "retiring: {e}"),
        }
    }

    /// Keeps the pieces reads verified, every `KEEP_HAVES_EVERY`, so that a
    /// crash loses at most that much (librqbit flushes its own bitfield
    /// only every 16 MiB).
    async fn keep_haves(self: Arc<Self>) {
        let mut tick = tokio::time::interval(KEEP_HAVES_EVERY);
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            let dirty: Vec<Arc<Live>> = lock(&self.live)
                .values()
                .filter(|l| {
                    !l.complete.load(Ordering::Acquire)
                        && l.have_dirty.swap(false, Ordering::AcqRel)
                })
                .cloned()
                .collect();
            for l in dirty {
                let path = self
                    .cfg
                    .dir
                    .join("resume")
                    .join(format!("{}.bitv", l.meta.info_hash));
                if let Err(e) = write_atomic(&path, &with_kept(&path, l.have_bits())) {
                    warn!(torrent = %l.meta.info_hash, "could not keep the pieces fetched so far: {e}");
                }
            }
        }
    }

    async fn reap(self: Arc<Self>) {
        let mut tick = tokio::time::interval(REAP_EVERY);
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            let _adding = self.adding.lock().await;
            let idle: Vec<Arc<Live>> = {
                let mut live = lock(&self.live);
                let idle: Vec<InfoHash> = live
                    .iter()
                    .filter(|(_, l)| {
                        let u = l.usage();
                        u.idle() && u.last_used.elapsed() > IDLE_LIVE
                    })
                    .map(|(ih, _)| *ih)
                    .collect();
                idle.iter().filter_map(|ih| live.remove(ih)).collect()
            };
            for l in idle {
                debug!(torrent = %l.meta.info_hash, "retiring an idle torrent");
                self.retire(&l).await;
            }
        }
    }

    /// Deletes, every `SWEEP_EVERY`, the kept `.torrent` files (and piece
    /// bitfields) of content that is neither an object nor partial here any
    /// more: overwritten or deleted files, evicted content.
    async fn sweep(self: Arc<Self>) {
        let mut tick = tokio::time::interval(SWEEP_EVERY);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            let live: HashSet<InfoHash> = lock(&self.live).keys().copied().collect();
            let this = self.clone();
            let swept = tokio::task::spawn_blocking(move || {
                let stale =
                    stale_torrents(&this.cfg.dir, &this.cfg.object_path, &live, SWEEP_MIN_AGE)?;
                for ih in &stale {
                    fs::remove_file(this.torrent_path(ih))?;
                    let _ = fs::remove_file(this.cfg.dir.join("resume").join(format!("{ih}.bitv")));
                }
                Ok::<_, io::Error>(stale.len())
            })
            .await;
            match swept {
                Ok(Ok(0)) => {}
                Ok(Ok(n)) => debug!(
                    torrents = n,
                    "deleted the torrents of content no longer here"
                ),
                Ok(Err(e)) => warn!("torrent sweep: {e}"),
                Err(e) => warn!("torrent sweep task: {e}"),
            }
        }
    }

    // ----- cache --------------------------------------------------------------------

    /// Marks fetched content as just used (a local open of its object).
    pub fn touch(&self, content: &ContentId) {
        let marker = self.cfg.dir.join("fetched").join(content.to_hex());
        if let Ok(f) = fs::File::options().write(true).open(&marker) {
            let _ = f.set_modified(std::time::SystemTime::now());
        }
    }

    /// Keeps fetched content (objects fetched here, and partial content)
    /// under `limit` bytes: least recently used first, only content that a
    /// connected member holds, never content in use.
    async fn keep_cache(self: Arc<Self>, limit: u64) {
        let mut tick = tokio::time::interval(CACHE_EVERY);
        let mut warned = false;
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            let this = self.clone();
            let members: HashSet<String> = self.net.members().into_iter().collect();
            let in_use: HashSet<ContentId> =
                lock(&self.live).values().map(|l| l.meta.content).collect();
            let r = tokio::task::spawn_blocking(move || this.evict(limit, &members, &in_use)).await;
            match r {
                Ok(Ok(over)) if over > 0 && !warned => {
                    warned = true;
                    warn!(
                        over,
                        "fetched content exceeds cache_size, but the rest is in use or held by no connected member"
                    );
                }
                Ok(Ok(0)) => warned = false,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => warn!("cache: {e}"),
                Err(e) => warn!("cache task: {e}"),
            }
        }
    }

    /// One eviction pass; returns the bytes still over `limit`.
    fn evict(
        &self,
        limit: u64,
        members: &HashSet<String>,
        in_use: &HashSet<ContentId>,
    ) -> io::Result<u64> {
        // (last use, bytes, content, object or partial file, marker, holder known)
        let mut items = Vec::new();
        for e in fs::read_dir(self.cfg.dir.join("fetched"))? {
            let e = e?;
            let Some(c) = e
                .file_name()
                .to_str()
                .and_then(|n| ContentId::from_hex(n).ok())
            else {
                continue;
            };
            let object = (self.cfg.object_path)(&c);
            let Ok(meta) = fs::metadata(&object) else {
                // Collected by the filesystem (no record uses it any more).
                let _ = fs::remove_file(e.path());
                continue;
            };
            let author = fs::read_to_string(e.path()).unwrap_or_default();
            let used = e.metadata()?.modified()?;
            let held = members.contains(author.trim())
                || lock(&self.holders)
                    .of(&c)
                    .iter()
                    .any(|m| members.contains(m));
            items.push((used, meta.len(), c, object, Some(e.path()), held));
        }
        for e in fs::read_dir(self.cfg.dir.join("partial"))? {
            let e = e?;
            let Some(c) = e
                .file_name()
                .to_str()
                .and_then(|n| ContentId::from_hex(n).ok())
            else {
                continue;
            };
            let meta = e.metadata()?;
            // Partial content was fetched from members: they hold it.
            items.push((
                meta.modified()?,
                meta.blocks() * 512,
                c,
                e.path(),
                None,
                true,
            ));
        }
        let mut total: u64 = items.iter().map(|i| i.1).sum();
        let mut dropped = Vec::new();
        items.sort_by_key(|i| i.0);
        for (_, bytes, c, file, marker, held) in items {
            if total <= limit {
                break;
            }
            if !held || in_use.contains(&c) {
                continue;
            }
            match fs::remove_file(&file) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            if let Some(m) = &marker {
                let _ = fs::remove_file(m);
            }
            total -= bytes;
            if marker.is_some() {
                dropped.push(c);
            }
            info!(content = %c.short(), bytes, "evicted from the cache (another member holds it)");
        }
        if !dropped.is_empty() {
            self.net.announce(Vec::new(), dropped);
        }
        Ok(total.saturating_sub(limit))
    }

    // ----- reads --------------------------------------------------------------------

    /// Reads `len` bytes at `offset` of content held elsewhere, fetching only
    /// the pieces needed, within the read deadline.
    pub async fn read(self: Arc<Self>, want: Wanted, offset: u64, len: u32) -> io::Result<Vec<u8>> {
        let deadline = self.cfg.read_timeout;
        match tokio::time::timeout(deadline, self.read_inner(&want, offset, len)).await {
            Ok(Ok(data)) => Ok(data),
            Ok(Err(e)) => {
                warn!(path = %want.path, offset, "read failed: {e}");
                Err(e.into())
            }
            Err(_) => {
                warn!(path = %want.path, offset, "read timed out after {deadline:?}: no reachable member sent the bytes");
                Err(io::Error::new(io::ErrorKind::TimedOut, "read timed out"))
            }
        }
    }

    async fn read_inner(
        self: &Arc<Self>,
        want: &Wanted,
        offset: u64,
        len: u32,
    ) -> Result<Vec<u8>, TorrentError> {
        let end = want.size.min(offset.saturating_add(u64::from(len)));
        if offset >= end {
            return Ok(Vec::new());
        }
        let object = (self.cfg.object_path)(&want.content);
        if object.exists() {
            return pread(object, offset, end).await;
        }
        let started = Instant::now();
        let mut quiet = self.stall_quiet();
        let meta = match self.live_of(&want.torrent) {
            Some(l) if l.meta.content == want.content => l.meta.clone(),
            _ => self.metainfo(want).await?,
        };
        loop {
            let whole = offset == 0 && end - offset >= WHOLE_FILE_READ.min(want.size);
            let in_use = self
                .bring_up(
                    meta.clone(),
                    &want.path,
                    self.net.member_of(&want.author),
                    whole,
                    Need::Local,
                )
                .await?;
            let up = started.elapsed();
            let live = in_use.live.clone();
            self.note_read(&live, offset, end);
            let pieces = live.pieces_of(offset, end);
            if live.has(&self.session, pieces.clone()) {
                let path = lock(&live.data).clone();
                let read = match pread(path, offset, end).await {
                    // Installed meanwhile: the partial file is the object now.
                    Err(TorrentError::Io(e)) if e.kind() == io::ErrorKind::NotFound => {
                        pread(object, offset, end).await
                    }
                    r => r,
                };
                self.install_if_whole(&live);
                return read;
            }
            let read = async {
                let mut s = live
                    .handle
                    .clone()
                    .stream(0)
                    .await
                    .map_err(TorrentError::session)?;
                s.seek(SeekFrom::Start(offset)).await?;
                let mut buf = vec![0u8; (end - offset) as usize];
                s.read_exact(&mut buf).await?;
                // Dropped at once: an open stream keeps librqbit fetching
                // 32 MiB ahead, and keeps idle peers connected.
                Ok::<_, TorrentError>(buf)
            };
            match unless_stalled(&live, quiet, read).await {
                Some(Ok(buf)) => {
                    live.mark(pieces);
                    debug!(path = %want.path, offset, ?up, total = ?started.elapsed(), "fetched a range");
                    self.install_if_whole(&live);
                    return Ok(buf);
                }
                // The torrent was brought up again by another reader.
                Some(Err(_)) if !self.is_current(&live) => continue,
                Some(Err(e)) => return Err(e),
                None => {
                    debug!(path = %want.path, offset, ?quiet, "read stalled: bringing the torrent up again");
                    quiet = (quiet * 2).min(STALL_RETRY.max(quiet));
                    self.restart(&live).await;
                }
            }
        }
    }

    /// How long a read waits with nothing received over a live connection
    /// before it counts as stalled (`STALL_QUIET`, longer under `down_rate=`).
    fn stall_quiet(&self) -> Duration {
        let limited = self.cfg.down_rate.map_or(Duration::ZERO, |r| {
            Duration::from_millis(STALL_BLOCKS * (16 << 10) * 1000 / u64::from(r.get()))
        });
        STALL_QUIET.max(limited)
    }

    fn is_current(&self, live: &Arc<Live>) -> bool {
        lock(&self.live)
            .get(&live.meta.info_hash)
            .is_some_and(|l| Arc::ptr_eq(l, live))
    }

    /// Tracks sequential reading; past `SEQUENTIAL_AFTER` bytes in order,
    /// starts a background fetch that follows the reader.
    fn note_read(self: &Arc<Self>, live: &Arc<Live>, offset: u64, end: u64) {
        let run = {
            let mut seq = lock(&live.sequential);
            seq.1 = if seq.0 == offset {
                seq.1 + (end - offset)
            } else {
                0
            };
            seq.0 = end;
            seq.2 = Instant::now();
            seq.1
        };
        if run >= SEQUENTIAL_AFTER
            && !live.complete.load(Ordering::Acquire)
            && !live.fetching.load(Ordering::Acquire)
            && !live.following.swap(true, Ordering::AcqRel)
        {
            tokio::spawn(self.clone().follow(live.clone()));
        }
    }

    /// Fetches the rest of the file while its sequential reader keeps
    /// reading; stops `FOLLOW_IDLE` after its last read.
    async fn follow(self: Arc<Self>, live: Arc<Live>) {
        let label = lock(&live.label).clone();
        let in_use = match self
            .bring_up(
                live.meta.clone(),
                &label,
                live.holder.clone(),
                true,
                Need::Local,
            )
            .await
        {
            Ok(u) => u,
            Err(e) => {
                live.following.store(false, Ordering::Release);
                return debug!(path = %label, "background fetch: {e:#}");
            }
        };
        let live = in_use.live.clone();
        // Brought up again meanwhile (a stalled read), it may not know.
        live.following.store(true, Ordering::Release);
        debug!(path = %lock(&live.label), "sequential reader: fetching ahead in the background");
        let all = HashSet::from([0usize]);
        if let Err(e) = self.select(&live, all).await {
            live.following.store(false, Ordering::Release);
            return debug!("background fetch: {e:#}");
        }
        // Stops the warmer however this task ends, dropped at shutdown
        // included: a blocking task that never ends would hold up the
        // runtime's shutdown.
        let warming = StopOnDrop(Arc::new(AtomicBool::new(true)));
        let warmer = tokio::task::spawn_blocking({
            let (live, warming) = (live.clone(), warming.0.clone());
            move || warm_ahead(&live, &warming)
        });
        let completed = loop {
            tokio::select! {
                done = live.handle.wait_until_completed() => break done.is_ok(),
                _ = tokio::time::sleep(Duration::from_millis(500)) => {
                    if lock(&live.sequential).2.elapsed() > FOLLOW_IDLE {
                        break false;
                    }
                }
            }
        };
        drop(warming);
        let _ = warmer.await;
        if completed {
            if let Err(e) = self.install(&live).await {
                warn!(path = %lock(&live.label), "fetched content not installed: {e}");
            }
        } else if !live.fetching.load(Ordering::Acquire)
            && let Err(e) = self.select(&live, HashSet::new()).await
        {
            debug!("stopping a background fetch: {e:#}");
        }
        live.following.store(false, Ordering::Release);
    }

    /// Selects the files of `live` that librqbit fetches.
    async fn select(&self, live: &Live, files: HashSet<usize>) -> Result<(), TorrentError> {
        let (session, handle) = (self.session.clone(), live.handle.clone());
        self.bt
            .run(async move { session.update_only_files(&handle, &files).await })
            .await?
            .map_err(TorrentError::session)
    }

    /// Retires `live` (if still the live torrent of its hash) so that the
    /// next use adds it again.
    async fn restart(&self, live: &Arc<Live>) {
        // Held until librqbit has let go of it: adding the same torrent
        // meanwhile would give back the handle being deleted.
        let _adding = self.adding.lock().await;
        let removed = {
            let mut map = lock(&self.live);
            match map.get(&live.meta.info_hash) {
                Some(l) if Arc::ptr_eq(l, live) => map.remove(&live.meta.info_hash),
                _ => None,
            }
        };
        if let Some(l) = removed {
            self.retire(&l).await;
        }
    }

    // ----- whole files ----------------------------------------------------------

    /// Fetches the whole content into the object store.
    pub async fn fetch(&self, want: Wanted) -> Result<(), TorrentError> {
        let object = (self.cfg.object_path)(&want.content);
        if object.exists() {
            return Ok(());
        }
        let meta = self.metainfo(&want).await?;
        let in_use = self
            .bring_up(
                meta,
                &want.path,
                self.net.member_of(&want.author),
                true,
                Need::Local,
            )
            .await?;
        let live = in_use.live.clone();
        if live.complete.load(Ordering::Acquire) {
            return Ok(());
        }
        live.fetching.store(true, Ordering::Release);
        let result = self.fetch_live(&live).await;
        live.fetching.store(false, Ordering::Release);
        result
    }

    async fn fetch_live(&self, live: &Arc<Live>) -> Result<(), TorrentError> {
        self.select(live, HashSet::from([0usize])).await?;
        // No deadline on the whole file, only on progress.
        let stall = self.cfg.read_timeout;
        let mut last = (Instant::now(), 0u64);
        loop {
            tokio::select! {
                done = live.handle.wait_until_completed() => {
                    done.map_err(TorrentError::session)?;
                    break;
                }
                _ = tokio::time::sleep(Duration::from_secs(1)) => {
                    let have = live.handle.live().map_or(0, |l| l.get_approx_have_bytes());
                    if have != last.1 {
                        last = (Instant::now(), have);
                    } else if last.0.elapsed() > stall {
                        return Err(TorrentError::Stalled(stall));
                    }
                }
            }
        }
        self.install(live).await
    }

    /// Installs content whose every piece reads have seen (readers that
    /// read it all, in whatever order, leave a whole object behind).
    fn install_if_whole(self: &Arc<Self>, live: &Arc<Live>) {
        if live.complete.load(Ordering::Acquire) || !lock(&live.have).iter().all(|h| *h) {
            return;
        }
        if live.installing.swap(true, Ordering::AcqRel) {
            return;
        }
        let (this, live) = (self.clone(), live.clone());
        tokio::spawn(async move {
            if let Err(e) = this.install(&live).await {
                warn!(path = %lock(&live.label), "fetched content not installed: {e}");
            }
            live.installing.store(false, Ordering::Release);
        });
    }

    /// Moves complete, verified content into the object store.
    async fn install(&self, live: &Arc<Live>) -> Result<(), TorrentError> {
        let _one = live.install_lock.lock().await;
        if live.complete.load(Ordering::Acquire) {
            return Ok(());
        }
        let from = lock(&live.data).clone();
        let content = live.meta.content;
        let to = (self.cfg.object_path)(&content);
        let installed = to.clone();
        tokio::task::spawn_blocking(move || -> Result<(), TorrentError> {
            let mut h = blake3::Hasher::new();
            h.update_mmap_rayon(&from)?;
            let got = ContentId::from(h.finalize());
            if got != content {
                return Err(TorrentError::Mismatch(content.to_hex()));
            }
            if let Some(dir) = to.parent() {
                fs::create_dir_all(dir)?;
            }
            // librqbit keeps its descriptor: it seeds the object from now on.
            fs::rename(&from, &to)?;
            Ok(())
        })
        .await
        .map_err(|e| TorrentError::Io(io::Error::other(e)))??;
        *lock(&live.data) = installed;
        live.complete.store(true, Ordering::Release);
        // Fetched content is cache: its marker names who else holds it, and
        // its mtime is its last use.
        let marker = self.cfg.dir.join("fetched").join(content.to_hex());
        if let Err(e) = fs::write(&marker, live.holder.as_deref().unwrap_or("")) {
            warn!("could not record fetched content for the cache: {e}");
        }
        let _ = fs::remove_file(
            self.cfg
                .dir
                .join("resume")
                .join(format!("{}.bitv", live.meta.info_hash)),
        );
        info!(path = %lock(&live.label), content = %content.short(), "fetched in full: seeding it");
        self.net.announce(vec![content], Vec::new());
        Ok(())
    }

    /// Queues a whole-file fetch (prefetch policy); never blocks.
    pub fn prefetch(&self, want: Wanted) {
        if (self.cfg.object_path)(&want.content).exists() {
            return;
        }
        if let Err(e) = self.prefetch_tx.try_send(want) {
            let label = match &e {
                mpsc::error::TrySendError::Full(w) | mpsc::error::TrySendError::Closed(w) => {
                    w.path.clone()
                }
            };
            warn!(path = %label, "prefetch queue full: fetched when first read instead");
        }
    }

    async fn prefetcher(self: Arc<Self>, rx: Arc<tokio::sync::Mutex<mpsc::Receiver<Wanted>>>) {
        loop {
            let next = tokio::select! {
                _ = self.cancel.cancelled() => return,
                w = async { rx.lock().await.recv().await } => w,
            };
            let Some(want) = next else { return };
            let label = want.path.clone();
            match self.fetch(want).await {
                Ok(()) => debug!(path = %label, "prefetched"),
                Err(e) => warn!(path = %label, "prefetch failed: {e}"),
            }
        }
    }

    // ----- peer connections ----------------------------------------------------------

    /// Serves a peer connection that arrived over the mesh (or from an
    /// allowed network): brings its torrent up if this node holds it, then
    /// hands the connection to librqbit.
    ///
    /// A member has at most `MAX_WIRES_PER_MEMBER` such connections at once
    /// (a standard client, named by its address, as many per IP address);
    /// one that moves nothing either way for `BRIDGE_IDLE` is closed.
    pub async fn accept(self: Arc<Self>, mut io: BoxIo, from: String) {
        let Some(_slot) = self.limits.members.try_acquire(&limits::member_key(&from)) else {
            self.limits
                .member_conns_refused
                .fetch_add(1, Ordering::Relaxed);
            return debug!(%from, "peer connection refused: {MAX_WIRES_PER_MEMBER} open from this member already");
        };
        let (hs, ih) = match tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            bridge::read_handshake(&mut io),
        )
        .await
        {
            Ok(Ok(x)) => x,
            Ok(Err(e)) => return debug!(%from, "peer connection refused: {e}"),
            Err(_) => {
                self.limits
                    .bridges_idle_closed
                    .fetch_add(1, Ordering::Relaxed);
                return debug!(%from, "peer connection closed: no handshake within {HANDSHAKE_TIMEOUT:?}");
            }
        };
        let ih = InfoHash(ih);
        let Some(_use) = self.held(ih, &from).await else {
            return;
        };
        let mut local = match TcpStream::connect(self.local).await {
            Ok(s) => {
                congestion::unpace(&s);
                QuickAck::new(s)
            }
            Err(e) => return warn!("librqbit listener unreachable: {e}"),
        };
        use tokio::io::AsyncWriteExt as _;
        if local.write_all(&hs).await.is_err() {
            return;
        }
        match limits::relay_until_idle(&mut *io, &mut local, BRIDGE_IDLE).await {
            Relayed::Ended(Ok((up, down))) => {
                debug!(%from, torrent = %ih, up, down, "peer connection closed")
            }
            Relayed::Ended(Err(e)) => debug!(%from, torrent = %ih, "peer connection ended: {e}"),
            Relayed::Idle => {
                self.limits
                    .bridges_idle_closed
                    .fetch_add(1, Ordering::Relaxed);
                debug!(%from, torrent = %ih, "peer connection closed: nothing moved for {BRIDGE_IDLE:?}")
            }
        }
    }

    /// The live torrent of `ih`, in use for member `from` while the result
    /// is held, brought up if this node holds its content (in full or in
    /// part), room under `max_live` allows, and `from` has not brought up
    /// more than `MEMBER_BRING_UP_BURST` lately.
    async fn held(&self, ih: InfoHash, from: &str) -> Option<InUse> {
        if let Some(l) = self.live_of(&ih) {
            return Some(InUse::new(l, Need::Peer));
        }
        let Some(bytes) = self.local_metainfo(&ih) else {
            debug!(%from, torrent = %ih, "peer wants a torrent unknown here");
            return None;
        };
        let meta = match Metainfo::parse(bytes, &ih) {
            Ok(m) => Arc::new(m),
            Err(e) => {
                warn!(torrent = %ih, "kept metainfo unusable: {e}");
                return None;
            }
        };
        let object = (self.cfg.object_path)(&meta.content);
        let partial = self.cfg.dir.join("partial").join(meta.content.to_hex());
        if !object.exists() && !partial.exists() {
            debug!(%from, torrent = %ih, "peer wants content not held here");
            return None;
        }
        if !self
            .limits
            .bring_ups
            .try_take(&limits::member_key(from), Instant::now())
        {
            self.limits
                .member_bring_ups_refused
                .fetch_add(1, Ordering::Relaxed);
            debug!(%from, torrent = %ih, "peer connection refused: this member brings torrents up faster than {MEMBER_BRING_UP_RATE} a second (after {MEMBER_BRING_UP_BURST})");
            return None;
        }
        match self
            .bring_up(meta, &format!("torrent {ih}"), None, false, Need::Peer)
            .await
        {
            Ok(u) => Some(u),
            Err(TorrentError::NoRoom { live }) => {
                debug!(%from, torrent = %ih, live, "peer connection refused: every live torrent is in use");
                None
            }
            Err(e) => {
                warn!(torrent = %ih, "could not serve a peer: {e}");
                None
            }
        }
    }

    /// Announces all content fetched in full and kept here (for members
    /// that joined since it was fetched). Blocking: reads a directory.
    pub fn announce_holdings(&self) {
        let held: Vec<ContentId> = fs::read_dir(self.cfg.dir.join("fetched"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| ContentId::from_hex(e.file_name().to_str()?).ok())
            .filter(|c| (self.cfg.object_path)(c).exists())
            .collect();
        if !held.is_empty() {
            debug!(count = held.len(), "announcing holdings");
            self.net.announce(held, Vec::new());
        }
    }

    /// A member announced content it now holds in full (`held`) or no
    /// longer holds (`dropped`).
    pub fn note_holdings(&self, member: &str, held: &[ContentId], dropped: &[ContentId]) {
        lock(&self.holders).note(member, held, dropped);
    }

    /// A member asked for the metainfo of `ih`: it is about to connect for
    /// pieces, so the torrent is brought up now if this node holds them.
    pub fn warm(self: &Arc<Self>, ih: InfoHash, from: String) {
        if lock(&self.live).contains_key(&ih) {
            return;
        }
        let Ok(slot) = self.warming.clone().try_acquire_owned() else {
            if self
                .warm_refused
                .fetch_add(1, Ordering::Relaxed)
                .is_multiple_of(1000)
            {
                warn!(%ih, "{MAX_WARMING} torrents are being brought up for members' requests already: not this one");
            }
            return;
        };
        let this = self.clone();
        tokio::spawn(async move {
            let _slot = slot;
            // Let go at once: it stays live for `IDLE_LIVE` from now.
            drop(this.held(ih, &from).await);
        });
    }

    /// librqbit's outgoing connections: SOCKS5 to a synthetic member address.
    /// Only a client with `secret` (librqbit) is served.
    async fn serve_socks(self: Arc<Self>, listener: TcpListener, secret: bridge::SocksSecret) {
        let secret = Arc::new(secret);
        let us = listener.local_addr();
        // librqbit's ends are looked up one at a time, off the runtime; the
        // lookup ends with this task (its sender goes).
        let (unpace, to_unpace) = mpsc::channel(UNPACE_QUEUE);
        tokio::task::spawn_blocking(move || congestion::unpace_each(to_unpace));
        loop {
            let (conn, from) = tokio::select! {
                _ = self.cancel.cancelled() => return,
                c = listener.accept() => match c {
                    Ok(c) => c,
                    Err(e) => { warn!("SOCKS5 bridge: {e}"); continue; }
                },
            };
            // librqbit's end carries what this node uploads to the member
            // it dialled: unpaced too (see `congestion`). Best effort: with
            // the queue full, it keeps the system's algorithm.
            if let Ok(peer) = us {
                let _ = unpace.try_send(Socket::Connected { local: from, peer });
            }
            let mut conn = QuickAck::new(conn);
            let this = self.clone();
            let secret = secret.clone();
            tokio::spawn(async move {
                let asked = tokio::time::timeout(
                    HANDSHAKE_TIMEOUT,
                    bridge::socks5_request(&mut conn, &secret),
                );
                let target = match asked.await {
                    Ok(Ok(t)) => t,
                    Ok(Err(e)) if e.kind() == io::ErrorKind::PermissionDenied => {
                        // Any local user can knock: one warning in 1000.
                        let n = this.socks_refused.fetch_add(1, Ordering::Relaxed);
                        if n.is_multiple_of(1000) {
                            return warn!(%from, refused = n + 1, "SOCKS5 bridge: client refused ({e})");
                        }
                        return debug!(%from, "{e}");
                    }
                    Ok(Err(e)) => return debug!("SOCKS5: {e}"),
                    Err(_) => return debug!("SOCKS5: no request within {HANDSHAKE_TIMEOUT:?}"),
                };
                let member = lock(&this.peers).member_at(&target).map(str::to_owned);
                let Some(member) = member else {
                    let _ = bridge::socks5_reply(&mut conn, 5).await;
                    return debug!(%target, "librqbit dialled an address that is not a member");
                };
                let dialled =
                    tokio::time::timeout(HANDSHAKE_TIMEOUT, this.net.dial(member.clone())).await;
                let mut remote = match dialled.unwrap_or_else(|_| {
                    Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no stream within 10 s",
                    ))
                }) {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = bridge::socks5_reply(&mut conn, 5).await;
                        return debug!(%member, "no stream to member: {e}");
                    }
                };
                if bridge::socks5_reply(&mut conn, 0).await.is_err() {
                    return;
                }
                if let Relayed::Idle =
                    limits::relay_until_idle(&mut *remote, &mut conn, BRIDGE_IDLE).await
                {
                    this.limits
                        .bridges_idle_closed
                        .fetch_add(1, Ordering::Relaxed);
                    debug!(%member, "outgoing peer connection closed: nothing moved for {BRIDGE_IDLE:?}");
                }
            });
        }
    }

    /// The BitTorrent listener: members' direct peer wires, and standard
    /// clients from `bt_allow=` networks. The first byte tells them apart: a
    /// BitTorrent handshake opens with 19, a member's noise handshake with
    /// the high byte of its length (0).
    async fn serve_public(self: Arc<Self>, listener: TcpListener) {
        let permits = Arc::new(tokio::sync::Semaphore::new(MAX_DIRECT_WIRES));
        loop {
            let (conn, peer) = tokio::select! {
                _ = self.cancel.cancelled() => return,
                c = listener.accept() => match c {
                    Ok(c) => c,
                    Err(e) => { warn!("BitTorrent listener: {e}"); continue; }
                },
            };
            let standard = self.cfg.allow.iter().any(|c| c.contains(peer.ip()));
            if !standard && !self.net.is_member_ip(peer.ip()) {
                debug!(%peer, "BitTorrent connection from neither a member nor bt_allow refused");
                continue;
            }
            // Before the permit: one host cannot take them all.
            let host = peer.ip().to_canonical().to_string();
            let Some(host_slot) = self.limits.hosts.try_acquire(&host) else {
                self.limits
                    .member_conns_refused
                    .fetch_add(1, Ordering::Relaxed);
                debug!(%peer, "{MAX_WIRES_PER_HOST} connections from this host on the BitTorrent listener: refusing another");
                continue;
            };
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                warn!(%peer, "{MAX_DIRECT_WIRES} connections on the BitTorrent listener: refusing another");
                continue;
            };
            let _ = conn.set_nodelay(true);
            let this = self.clone();
            tokio::spawn(async move {
                let mut first = [0u8; 1];
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, conn.peek(&mut first)).await {
                    Ok(Ok(1)) => {}
                    Err(_) => {
                        this.limits
                            .bridges_idle_closed
                            .fetch_add(1, Ordering::Relaxed);
                        return debug!(%peer, "BitTorrent listener: nothing received within {HANDSHAKE_TIMEOUT:?}");
                    }
                    _ => return debug!(%peer, "BitTorrent listener: nothing received"),
                }
                if first[0] == bridge::BT_HANDSHAKE_FIRST {
                    if standard {
                        this.accept(Box::new(conn), peer.to_string()).await;
                    } else {
                        debug!(%peer, "BitTorrent client from outside bt_allow refused");
                    }
                } else {
                    let secured =
                        tokio::time::timeout(HANDSHAKE_TIMEOUT, this.net.accept_wire(conn));
                    match secured.await {
                        Ok(Ok((io, member))) => {
                            debug!(%member, "member opened a direct peer wire");
                            this.accept(io, member).await;
                        }
                        Ok(Err(e)) => debug!(%peer, "direct peer wire refused: {e}"),
                        Err(_) => {
                            this.limits
                                .bridges_idle_closed
                                .fetch_add(1, Ordering::Relaxed);
                            debug!(%peer, "direct peer wire closed: no handshake within {HANDSHAKE_TIMEOUT:?}")
                        }
                    }
                }
                drop((permit, host_slot));
            });
        }
    }

    // ----- status ----------------------------------------------------------------

    pub fn status(&self) -> Status {
        let live: Vec<Arc<Live>> = lock(&self.live).values().cloned().collect();
        let mut s = Status {
            bittorrent_listen: self.public.map(|a| a.to_string()),
            bytes_downloaded: self.retired_down.load(Ordering::Relaxed),
            bytes_uploaded: self.retired_up.load(Ordering::Relaxed),
            live_torrents: live.len(),
            known_holdings: lock(&self.holders).count(),
            warm_refused: self.warm_refused.load(Ordering::Relaxed),
            metainfo_refused: self.metainfo_refused.load(Ordering::Relaxed),
            max_live: self.cfg.max_live.max(1),
            live_refused: self.limits.live_refused.load(Ordering::Relaxed),
            member_conns_refused: self.limits.member_conns_refused.load(Ordering::Relaxed),
            member_bring_ups_refused: self.limits.member_bring_ups_refused.load(Ordering::Relaxed),
            bridges_idle_closed: self.limits.bridges_idle_closed.load(Ordering::Relaxed),
            socks_refused: self.socks_refused.load(Ordering::Relaxed),
            fetches: Vec::new(),
        };
        for l in live {
            let stats = l.handle.live();
            if let Some(st) = &stats {
                s.bytes_downloaded += st.get_downloaded_bytes();
                s.bytes_uploaded += st.get_uploaded_bytes();
            }
            let fetching = l.fetching.load(Ordering::Acquire);
            if !l.complete.load(Ordering::Acquire)
                && (fetching || l.users.load(Ordering::Acquire) > 0)
            {
                s.fetches.push(FetchStatus {
                    path: lock(&l.label).clone(),
                    size: l.meta.size,
                    have: stats.map_or(0, |st| st.get_approx_have_bytes()),
                    full: fetching,
                });
            }
        }
        s
    }
}

/// Waits for `read`, unless `live` stalls first (`None`): it receives
/// nothing for `quiet` while a peer is connected, or for `STALL_RETRY`
/// (at least) while none is. Bytes received for any reader of the torrent
/// count: they show its request loop is awake.
async fn unless_stalled<T>(
    live: &Live,
    quiet: Duration,
    read: impl Future<Output = T>,
) -> Option<T> {
    let probe = || {
        live.handle.live().map(|l| {
            let s = l.stats_snapshot();
            (s.fetched_bytes, s.peer_stats.live > 0)
        })
    };
    let mut seen = probe().map_or(0, |(fetched, _)| fetched);
    let mut since = Instant::now();
    let mut tick = tokio::time::interval(STALL_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(read);
    loop {
        tokio::select! {
            r = &mut read => return Some(r),
            _ = tick.tick() => {
                let (fetched, connected) = probe().unwrap_or((seen, false));
                if fetched != seen {
                    (seen, since) = (fetched, Instant::now());
                } else if since.elapsed() >= if connected { quiet } else { STALL_RETRY.max(quiet) } {
                    return None;
                }
            }
        }
    }
}

async fn pread(path: PathBuf, offset: u64, end: u64) -> Result<Vec<u8>, TorrentError> {
    tokio::task::spawn_blocking(move || -> io::Result<Vec<u8>> {
        let f = fs::File::open(&path)?;
        let mut buf = vec![0u8; (end - offset) as usize];
        f.read_exact_at(&mut buf, offset)?;
        Ok(buf)
    })
    .await
    .map_err(io::Error::other)?
    .map_err(TorrentError::Io)
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

/// Clears its flag when dropped.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// Fills in the page cache of `live`'s file up to `WARM_AHEAD` past its
/// sequential reader, `WARM_STEP` at a time, until `warming` goes false.
///
/// librqbit writes each received chunk on its one thread. A chunk that lands
/// on a page not yet in the page cache costs that thread the page's
/// allocation, and on a VM whose memory the host backs lazily, a fault in
/// the host too: 2 to 4 s per GiB of fresh memory was measured here, on the
/// thread that also receives and checks every piece. Readahead of the part
/// of the file about to be written (holes read as zeros) moves that cost to
/// this thread; librqbit then writes into pages that are there. It only
/// reads, so it cannot disturb what librqbit wrote.
fn warm_ahead(live: &Live, warming: &AtomicBool) {
    use nix::fcntl::{PosixFadviseAdvice, posix_fadvise};
    let path = lock(&live.data).clone();
    let Ok(file) = fs::File::open(&path) else {
        return;
    };
    let size = live.meta.size;
    let mut warmed = 0u64;
    while warming.load(Ordering::Acquire) {
        let at = lock(&live.sequential).0;
        if at != u64::MAX {
            warmed = warmed.max(at);
            let to = at.saturating_add(WARM_AHEAD).min(size);
            while warmed < to {
                let n = WARM_STEP.min(to - warmed);
                let (Ok(off), Ok(len)) = (i64::try_from(warmed), i64::try_from(n)) else {
                    return;
                };
                if posix_fadvise(&file, off, len, PosixFadviseAdvice::POSIX_FADV_WILLNEED).is_err()
                {
                    return;
                }
                warmed += n;
            }
        }
        std::thread::sleep(WARM_EVERY);
    }
}

/// The live cap and the per-member bounds, on a running engine.
#[cfg(test)]
#[path = "engine_bounds_tests.rs"]
mod bounds_tests;

#[cfg(test)]
mod tests {
    use super::*;

    fn c(n: u8) -> ContentId {
        ContentId([n; 32])
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn torrents_of_content_no_longer_here_are_stale_once_old_enough() {
        let dir = tempfile::tempdir().unwrap();
        let objects = dir.path().join("objects");
        for sub in ["torrents", "partial", "objects"] {
            fs::create_dir(dir.path().join(sub)).unwrap();
        }
        let object_path: ObjectPath = {
            let objects = objects.clone();
            Arc::new(move |c: &ContentId| objects.join(c.to_hex()))
        };
        // Three contents: one an object here, one partial, one gone.
        let mut metas = Vec::new();
        for i in 0..3u8 {
            let data = vec![i; 300_000];
            let content = ContentId::from(blake3::hash(&data));
            let file = dir.path().join(format!("f{i}"));
            fs::write(&file, &data).unwrap();
            let m = Metainfo::build(&content, &file, data.len() as u64, 1).unwrap();
            fs::write(
                dir.path()
                    .join("torrents")
                    .join(format!("{}.torrent", m.info_hash)),
                &m.bytes,
            )
            .unwrap();
            metas.push(m);
        }
        fs::write(objects.join(metas[0].content.to_hex()), b"x").unwrap();
        fs::write(
            dir.path().join("partial").join(metas[1].content.to_hex()),
            b"x",
        )
        .unwrap();
        let none = HashSet::new();
        let stale = stale_torrents(dir.path(), &object_path, &none, Duration::ZERO).unwrap();
        assert_eq!(stale, vec![metas[2].info_hash]);
        // Young, or live: kept.
        let young =
            stale_torrents(dir.path(), &object_path, &none, Duration::from_secs(60)).unwrap();
        assert!(young.is_empty());
        let live = HashSet::from([metas[2].info_hash]);
        assert!(
            stale_torrents(dir.path(), &object_path, &live, Duration::ZERO)
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn holders_remember_announcements_and_forget_drops() {
        let mut h = Holders::default();
        h.note("b", &[c(1), c(2)], &[]);
        h.note("c", &[c(1)], &[]);
        h.note("b", &[c(1)], &[]);
        assert_eq!(h.of(&c(1)), names(&["b", "c"]).as_slice());
        h.note("b", &[], &[c(1)]);
        assert_eq!(h.of(&c(1)), names(&["c"]).as_slice());
        assert_eq!(h.of(&c(3)), &[] as &[String]);
        assert_eq!(h.count(), 2);
    }

    #[test]
    fn holders_are_bounded_and_forget_the_oldest_first() {
        let mut h = Holders::default();
        for i in 0..=KNOWN_HOLDINGS {
            let mut id = [0u8; 32];
            id[..8].copy_from_slice(&(i as u64).to_le_bytes());
            h.note("b", &[ContentId(id)], &[]);
        }
        assert_eq!(h.by_content.len(), KNOWN_HOLDINGS);
        assert!(h.of(&ContentId([0; 32])).is_empty(), "the oldest went");
    }

    #[test]
    fn dial_order_is_author_then_holders_then_the_rest_connected_only() {
        let members = names(&["m1", "m2", "author", "h1", "m3"]);
        let order = dial_order(
            Some(&"author".to_owned()),
            &names(&["gone", "h1"]),
            &members,
        );
        assert_eq!(order, names(&["author", "h1", "m1", "m2", "m3"]));
        // An author not connected is not dialled.
        let order = dial_order(Some(&"away".to_owned()), &[], &names(&["m1"]));
        assert_eq!(order, names(&["m1"]));
        // Bounded, holders kept.
        let many: Vec<String> = (0..200).map(|i| format!("m{i}")).collect();
        let order = dial_order(None, &names(&["m150"]), &many);
        assert_eq!(order.len(), MAX_DIALLED);
        assert_eq!(order[0], "m150");
    }
}
