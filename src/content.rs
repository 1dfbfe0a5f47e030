//! Content between nodes: the BitTorrent engine wired to the filesystem
//! (`ContentSource`) and to the mesh (`Network`: member streams and
//! metainfo requests).

use std::{
    collections::{HashMap, HashSet},
    io,
    net::{IpAddr, SocketAddr},
    path::Path,
    sync::{Arc, Mutex, MutexGuard, OnceLock, atomic::Ordering},
    time::{Duration, Instant},
};

use btfs_core::{ContentId, FileRecord, InfoHash, NodeId, RelPath};
use btfs_fs::{ContentSource, Done, Wanted};
use btfs_mesh::Mesh;
use btfs_torrent::{BoxIo, Engine, Network, PeerIo, QuickAck, RelayFuture};
use futures::StreamExt;
use libp2p_identity::{Keypair, PeerId};
use tokio::net::TcpStream;
use tokio_util::compat::FuturesAsyncReadCompatExt;
use tracing::{debug, info, warn};

use crate::mesh::{Counters, Rpc, peer_of};

/// Peer-wire streams from members served at once (each is one BitTorrent
/// connection; librqbit keeps at most 128 per torrent).
const MAX_PEER_STREAMS: usize = 1024;

/// Connecting a direct peer wire: TCP and the noise handshake.
const WIRE_CONNECT: Duration = Duration::from_secs(3);

/// After a direct wire to a member fails, its peer wires go through the mesh
/// for this long before a direct one is tried again; the wait doubles with
/// each failure in a row (a port closed by a firewall), up to `WIRE_RETRY_MAX`.
const WIRE_RETRY: Duration = Duration::from_secs(60);
const WIRE_RETRY_MAX: Duration = Duration::from_secs(3600);

/// How long a member's peer wires go through the mesh after `failures`
/// direct wires to it failed in a row.
fn wire_retry(failures: u32) -> Duration {
    WIRE_RETRY
        .saturating_mul(1 << failures.saturating_sub(1).min(16))
        .min(WIRE_RETRY_MAX)
}

/// Which files are fetched in full as soon as their record arrives.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Prefetch {
    None,
    All,
    Globs(Vec<glob::Pattern>),
}

impl Prefetch {
    pub(crate) fn matches(&self, path: &RelPath) -> bool {
        match self {
            Prefetch::None => false,
            Prefetch::All => true,
            Prefetch::Globs(g) => {
                let p = path.to_string();
                let p = p.trim_start_matches('/');
                let name = p.rsplit('/').next().unwrap_or(p);
                g.iter().any(|g| g.matches(p) || g.matches(name))
            }
        }
    }
}

/// The filesystem's content source: the engine, once started.
#[derive(Debug)]
pub(crate) struct Content {
    engine: OnceLock<(Arc<Engine>, tokio::runtime::Handle)>,
    prefetch: Prefetch,
}

impl Content {
    pub(crate) fn new(prefetch: Prefetch) -> Self {
        Self {
            engine: OnceLock::new(),
            prefetch,
        }
    }

    pub(crate) fn set(&self, engine: Arc<Engine>, rt: tokio::runtime::Handle) {
        let _ = self.engine.set((engine, rt));
    }

    pub(crate) fn engine(&self) -> Option<&Arc<Engine>> {
        self.engine.get().map(|(e, _)| e)
    }

    /// A record arrived from another node: prefetch its content if the
    /// policy says so.
    pub(crate) fn arrived(&self, path: &RelPath, r: &FileRecord) {
        let Some(engine) = self.engine() else {
            return;
        };
        if self.prefetch.matches(path)
            && let Some(wanted) = Wanted::of(path.to_string(), r)
        {
            engine.prefetch(wanted);
        }
    }
}

fn not_started() -> io::Error {
    io::Error::other("the BitTorrent engine is not running")
}

impl ContentSource for Content {
    fn publish(&self, content: &ContentId, file: &Path, size: u64) -> io::Result<Option<InfoHash>> {
        let engine = self.engine().ok_or_else(not_started)?;
        Ok(Some(engine.publish(content, file, size)?))
    }

    fn read(&self, wanted: Wanted, offset: u64, len: u32, done: Done<Vec<u8>>) {
        let Some((engine, rt)) = self.engine.get() else {
            return done(Err(not_started()));
        };
        let engine = engine.clone();
        rt.spawn(async move { done(engine.read(wanted, offset, len).await) });
    }

    fn opened(&self, content: &ContentId) {
        if let Some(engine) = self.engine() {
            engine.touch(content);
        }
    }

    fn fetch(&self, wanted: Wanted, done: Done<()>) {
        let Some((engine, rt)) = self.engine.get() else {
            return done(Err(not_started()));
        };
        let engine = engine.clone();
        rt.spawn(async move {
            let label = wanted.path.clone();
            let r = engine.fetch(wanted).await;
            if let Err(e) = &r {
                warn!(path = %label, "fetching for a writer failed: {e}");
            }
            // The answer opens the file, which may copy it: off the runtime.
            tokio::task::spawn_blocking(move || done(r.map_err(io::Error::from)));
        });
    }
}

/// How members' peer wires are secured (see `btfs_mesh::wire`).
pub(crate) struct WireConfig {
    pub keypair: Keypair,
    /// Derived from the cluster and its pre-shared key.
    pub prologue: Vec<u8>,
    /// `bt_wire=direct`: dial members' BitTorrent listeners.
    pub direct: bool,
    /// `bt_congestion=`: the TCP congestion control of direct wires.
    pub congestion: btfs_torrent::congestion::Congestion,
}

/// What this node knows of a connected member's direct wire.
#[derive(Debug, Default)]
struct WirePeer {
    /// The member's IP as its mesh connection sees it.
    ip: Option<IpAddr>,
    /// Where it takes direct wires (`None`: not known, or mesh only).
    addr: Option<SocketAddr>,
    /// Until when it is reached through the mesh after a failure.
    failed_until: Option<Instant>,
    /// Direct wires to it that failed in a row.
    failures: u32,
}

/// The mesh as the engine sees it.
pub(crate) struct MeshNet {
    pub(crate) mesh: Mesh,
    connected: Arc<Mutex<HashSet<PeerId>>>,
    /// Holdings changes for the gossip task.
    holdings: tokio::sync::mpsc::Sender<(Vec<ContentId>, Vec<ContentId>)>,
    wire: Arc<WireConfig>,
    /// Connected members' direct wires.
    wires: Arc<Mutex<HashMap<PeerId, WirePeer>>>,
    counters: Arc<Counters>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Where to dial a member's direct wire: the port it gave, on the IP its
/// mesh connection comes from. The IP it gives is never dialled: a member
/// could otherwise point every node at any address and port.
fn wire_addr(advertised: SocketAddr, seen: Option<IpAddr>) -> Option<SocketAddr> {
    match advertised.port() {
        0 => None,
        port => seen.map(|ip| SocketAddr::new(ip, port)),
    }
}

impl MeshNet {
    pub(crate) fn new(
        mesh: Mesh,
        connected: Arc<Mutex<HashSet<PeerId>>>,
        holdings: tokio::sync::mpsc::Sender<(Vec<ContentId>, Vec<ContentId>)>,
        wire: WireConfig,
        counters: Arc<Counters>,
    ) -> Self {
        Self {
            mesh,
            connected,
            holdings,
            wire: Arc::new(wire),
            wires: Arc::default(),
            counters,
        }
    }

    fn connected(&self) -> Vec<PeerId> {
        lock(&self.connected).iter().copied().collect()
    }

    /// A member came up: asks it where it takes direct wires.
    pub(crate) fn peer_up(&self, peer: PeerId, ip: Option<IpAddr>) {
        lock(&self.wires).insert(
            peer,
            WirePeer {
                ip,
                ..WirePeer::default()
            },
        );
        if !self.wire.direct {
            return;
        }
        let (mesh, wires) = (self.mesh.clone(), self.wires.clone());
        tokio::spawn(async move {
            let Ok(req) = postcard::to_allocvec(&Rpc::Wire) else {
                return;
            };
            let answer = match mesh.request(peer, req).await {
                Ok(a) => a,
                Err(e) => return debug!(%peer, "no direct wire address: {e}"),
            };
            let advertised = postcard::from_bytes::<Option<SocketAddr>>(&answer)
                .ok()
                .flatten();
            if let Some(w) = lock(&wires).get_mut(&peer) {
                w.addr = advertised.and_then(|a| wire_addr(a, w.ip));
                debug!(%peer, addr = ?w.addr, "member's direct wire");
            }
        });
    }

    pub(crate) fn peer_down(&self, peer: &PeerId) {
        lock(&self.wires).remove(peer);
    }

    /// The member's direct wire address, unless it failed lately.
    fn direct_addr(&self, peer: &PeerId) -> Option<SocketAddr> {
        if !self.wire.direct {
            return None;
        }
        let wires = lock(&self.wires);
        let w = wires.get(peer)?;
        match w.failed_until {
            Some(t) if Instant::now() < t => None,
            _ => w.addr,
        }
    }

    /// Bridges the streams members open to this node into the engine.
    pub(crate) async fn serve(mesh: Mesh, engine: Arc<Engine>) {
        let mut incoming = match mesh.incoming_streams() {
            Ok(i) => i,
            Err(e) => return warn!("no member streams: {e}"),
        };
        let permits = Arc::new(tokio::sync::Semaphore::new(MAX_PEER_STREAMS));
        while let Some((peer, stream)) = incoming.next().await {
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                warn!(%peer, "{MAX_PEER_STREAMS} peer-wire streams open: refusing another");
                continue;
            };
            debug!(%peer, "member opened a peer-wire stream");
            let engine = engine.clone();
            tokio::spawn(async move {
                engine
                    .accept(Box::new(stream.compat()), peer.to_string())
                    .await;
                drop(permit);
            });
        }
    }
}

/// A direct peer wire as the engine's peer stream: its relay seals and
/// opens in place (`Wire::relay`) instead of copying through a buffer.
struct DirectWire(btfs_mesh::wire::Wire<TcpStream>);

impl PeerIo for DirectWire {
    fn relay<'a>(&'a mut self, local: &'a mut QuickAck) -> RelayFuture<'a> {
        Box::pin(self.0.relay(local.socket()))
    }
}

impl tokio::io::AsyncRead for DirectWire {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for DirectWire {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl Network for MeshNet {
    fn members(&self) -> Vec<String> {
        self.connected().iter().map(ToString::to_string).collect()
    }

    fn member_of(&self, node: &NodeId) -> Option<String> {
        peer_of(node).map(|p| p.to_string())
    }

    fn dial(
        &self,
        member: String,
    ) -> std::pin::Pin<Box<dyn Future<Output = io::Result<BoxIo>> + Send>> {
        let mesh = self.mesh.clone();
        let (wire, wires, counters) =
            (self.wire.clone(), self.wires.clone(), self.counters.clone());
        let peer: Option<PeerId> = member.parse().ok();
        let direct = peer.and_then(|p| self.direct_addr(&p));
        Box::pin(async move {
            let peer =
                peer.ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not a peer id"))?;
            if let Some(addr) = direct {
                let connect = async {
                    let tcp = TcpStream::connect(addr).await?;
                    tcp.set_nodelay(true)?;
                    // Checked when the engine started (its listener).
                    if let Err(e) = wire.congestion.apply(&tcp) {
                        debug!(%peer, "direct wire keeps the system's congestion control: {e}");
                    }
                    btfs_mesh::wire::connect(&wire.keypair, &wire.prologue, tcp, peer).await
                };
                let failed = match tokio::time::timeout(WIRE_CONNECT, connect).await {
                    Ok(Ok(w)) => {
                        counters.wires_direct.fetch_add(1, Ordering::Relaxed);
                        if let Some(w) = lock(&wires).get_mut(&peer) {
                            w.failures = 0;
                        }
                        return Ok(Box::new(DirectWire(w)) as BoxIo);
                    }
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => format!("no handshake within {WIRE_CONNECT:?}"),
                };
                if let Some(w) = lock(&wires).get_mut(&peer) {
                    w.failures += 1;
                    let wait = wire_retry(w.failures);
                    w.failed_until = Some(Instant::now() + wait);
                    info!(%peer, %addr, "direct peer wire failed, going through the mesh for {wait:?}: {failed}");
                }
            }
            let s = mesh
                .open_stream(peer)
                .await
                .map_err(|e| io::Error::new(io::ErrorKind::ConnectionRefused, e.to_string()))?;
            counters.wires_mesh.fetch_add(1, Ordering::Relaxed);
            Ok(Box::new(s.compat()) as BoxIo)
        })
    }

    fn is_member_ip(&self, ip: IpAddr) -> bool {
        self.wire.direct
            && lock(&self.wires)
                .values()
                .any(|w| w.ip == Some(ip) || w.addr.is_some_and(|a| a.ip() == ip))
    }

    fn accept_wire(
        &self,
        conn: TcpStream,
    ) -> std::pin::Pin<Box<dyn Future<Output = io::Result<(BoxIo, String)>> + Send>> {
        let (wire, connected) = (self.wire.clone(), self.connected.clone());
        Box::pin(async move {
            let (peer, w) = btfs_mesh::wire::accept(&wire.keypair, &wire.prologue, conn).await?;
            if !lock(&connected).contains(&peer) {
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!("{peer} is not a connected member"),
                ));
            }
            Ok((Box::new(DirectWire(w)) as BoxIo, peer.to_string()))
        })
    }

    fn announce(&self, held: Vec<ContentId>, dropped: Vec<ContentId>) {
        if self.holdings.try_send((held, dropped)).is_err() {
            debug!("holdings queue full: an announcement is dropped");
        }
    }

    fn metainfo(
        &self,
        torrent: InfoHash,
        first: Option<String>,
    ) -> std::pin::Pin<Box<dyn Future<Output = Option<Vec<u8>>> + Send>> {
        let mesh = self.mesh.clone();
        let mut peers: Vec<PeerId> = first.and_then(|f| f.parse().ok()).into_iter().collect();
        let connected = self.connected();
        if let Some(f) = peers.first().copied()
            && !connected.contains(&f)
        {
            peers.clear();
        }
        let first = peers.first().copied();
        peers.extend(connected.into_iter().filter(|p| Some(*p) != first));
        Box::pin(async move {
            let req = postcard::to_allocvec(&Rpc::Metainfo(torrent.0)).ok()?;
            for p in peers {
                match mesh.request(p, req.clone()).await {
                    Ok(b) if !b.is_empty() => return Some(b),
                    Ok(_) => debug!(peer = %p, %torrent, "member does not have the metainfo"),
                    Err(e) => debug!(peer = %p, %torrent, "metainfo request failed: {e}"),
                }
            }
            None
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direct_wires_are_dialled_at_the_port_given_on_the_address_seen() {
        let seen: IpAddr = "10.0.0.7".parse().unwrap();
        let any: SocketAddr = "0.0.0.0:4411".parse().unwrap();
        assert_eq!(
            wire_addr(any, Some(seen)),
            Some("10.0.0.7:4411".parse().unwrap())
        );
        assert_eq!(wire_addr(any, None), None);
        let lo: SocketAddr = "127.0.0.1:4411".parse().unwrap();
        assert_eq!(
            wire_addr(lo, Some(seen)),
            Some("10.0.0.7:4411".parse().unwrap())
        );
        // Another address is not dialled: only its port is taken.
        let given: SocketAddr = "192.168.1.2:5000".parse().unwrap();
        assert_eq!(
            wire_addr(given, Some(seen)),
            Some("10.0.0.7:5000".parse().unwrap())
        );
        assert_eq!(wire_addr("10.0.0.7:0".parse().unwrap(), Some(seen)), None);
    }

    #[test]
    fn failed_direct_wires_wait_longer_each_time_up_to_an_hour() {
        assert_eq!(wire_retry(1), WIRE_RETRY);
        assert_eq!(wire_retry(2), WIRE_RETRY * 2);
        assert_eq!(wire_retry(3), WIRE_RETRY * 4);
        assert_eq!(wire_retry(7), WIRE_RETRY_MAX);
        assert_eq!(wire_retry(u32::MAX), WIRE_RETRY_MAX);
    }
}
