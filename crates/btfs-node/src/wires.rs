//! The mesh as the BitTorrent engine sees it (`btfs_torrent::Network`):
//! connected members, peer wires to them (direct noise-secured TCP, or
//! streams inside the mesh when that fails), holdings announcements and
//! metainfo requests.

use std::{
    collections::{HashMap, HashSet},
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use btfs_core::{ContentId, InfoHash, NodeId};
use btfs_mesh::Mesh;
use btfs_torrent::{BoxIo, Engine, MemberId, Network, PeerIo, QuickAck, RelayFuture};
use futures::StreamExt;
use libp2p_identity::{Keypair, PeerId};
use parking_lot::Mutex;
use tokio::{net::TcpStream, sync::mpsc};
use tokio_util::{compat::FuturesAsyncReadCompatExt, sync::CancellationToken};
use tracing::{debug, info, warn};

use crate::{holdings::Change, membership::peer_of, replicate::Counters, rpc::Rpc};

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
    /// The zone it told (`zone=`), forgotten with it.
    zone: Option<String>,
}

/// The mesh as the engine sees it.
pub(crate) struct MeshNet {
    mesh: Mesh,
    connected: Arc<Mutex<HashSet<PeerId>>>,
    /// Holdings changes for the gossip task.
    holdings: mpsc::Sender<Change>,
    wire: Arc<WireConfig>,
    /// Connected members' direct wires.
    wires: Arc<Mutex<HashMap<PeerId, WirePeer>>>,
    counters: Arc<Counters>,
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

impl std::fmt::Debug for MeshNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshNet")
            .field("direct", &self.wire.direct)
            .finish_non_exhaustive()
    }
}

impl MeshNet {
    pub(crate) fn new(
        mesh: Mesh,
        connected: Arc<Mutex<HashSet<PeerId>>>,
        holdings: mpsc::Sender<Change>,
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

    pub(crate) fn wire_direct(&self) -> bool {
        self.wire.direct
    }

    fn connected(&self) -> Vec<PeerId> {
        self.connected.lock().iter().copied().collect()
    }

    /// A member came up: asks it where it takes direct wires (a task of
    /// `tasks`, ended by `cancel`).
    pub(crate) fn peer_up(
        &self,
        peer: PeerId,
        ip: Option<IpAddr>,
        tasks: &tokio_util::task::TaskTracker,
        cancel: &CancellationToken,
    ) {
        self.wires.lock().insert(
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
        let ask = async move {
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
            if let Some(w) = wires.lock().get_mut(&peer) {
                w.addr = advertised.and_then(|a| wire_addr(a, w.ip));
                debug!(%peer, addr = ?w.addr, "member's direct wire");
            }
        };
        let cancel = cancel.clone();
        tasks.spawn(async move { cancel.run_until_cancelled(ask).await });
    }

    pub(crate) fn peer_down(&self, peer: &PeerId) {
        self.wires.lock().remove(peer);
    }

    /// A connected member told its zone (after its `peer_up`: the mesh
    /// sends them in that order). One not connected is not recorded.
    pub(crate) fn peer_zone(&self, peer: &PeerId, zone: Option<btfs_mesh::Zone>) {
        if let Some(w) = self.wires.lock().get_mut(peer) {
            w.zone = zone.map(|z| z.to_string());
        }
    }

    /// The member's direct wire address, unless it failed lately.
    fn direct_addr(&self, peer: &PeerId) -> Option<SocketAddr> {
        if !self.wire.direct {
            return None;
        }
        let wires = self.wires.lock();
        let w = wires.get(peer)?;
        match w.failed_until {
            Some(t) if Instant::now() < t => None,
            _ => w.addr,
        }
    }

    /// Bridges the streams members open to this node into the engine,
    /// until the node stops.
    pub(crate) async fn serve(
        mesh: Mesh,
        engine: Arc<Engine>,
        tasks: tokio_util::task::TaskTracker,
        cancel: CancellationToken,
    ) {
        let mut incoming = match mesh.incoming_streams() {
            Ok(i) => i,
            Err(e) => return warn!("no member streams: {e}"),
        };
        let permits = Arc::new(tokio::sync::Semaphore::new(MAX_PEER_STREAMS));
        loop {
            let next = tokio::select! {
                n = incoming.next() => n,
                () = cancel.cancelled() => None,
            };
            let Some((peer, stream)) = next else { return };
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                warn!(%peer, "{MAX_PEER_STREAMS} peer-wire streams open: refusing another");
                continue;
            };
            debug!(%peer, "member opened a peer-wire stream");
            let (engine, cancel) = (engine.clone(), cancel.clone());
            tasks.spawn(async move {
                cancel
                    .run_until_cancelled(engine.accept(Box::new(stream.compat()), peer))
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
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for DirectWire {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl Network for MeshNet {
    fn members(&self) -> Vec<MemberId> {
        self.connected()
    }

    fn member_of(&self, node: &NodeId) -> Option<MemberId> {
        peer_of(node)
    }

    fn dial(&self, peer: MemberId) -> BoxFuture<io::Result<BoxIo>> {
        let mesh = self.mesh.clone();
        let (wire, wires, counters) =
            (self.wire.clone(), self.wires.clone(), self.counters.clone());
        let direct = self.direct_addr(&peer);
        Box::pin(async move {
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
                        if let Some(w) = wires.lock().get_mut(&peer) {
                            w.failures = 0;
                        }
                        return Ok(Box::new(DirectWire(w)) as BoxIo);
                    }
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => format!("no handshake within {WIRE_CONNECT:?}"),
                };
                if let Some(w) = wires.lock().get_mut(&peer) {
                    w.failures += 1;
                    let wait = wire_retry(w.failures);
                    w.failed_until = Some(Instant::now() + wait);
                    info!(%peer, %addr, "direct peer wire failed, going through the mesh for {wait:?}: {failed}");
                }
            }
            let s = mesh
                .open_stream(peer)
                .await
                .map_err(|e| io::Error::new(io::ErrorKind::ConnectionRefused, e))?;
            counters.wires_mesh.fetch_add(1, Ordering::Relaxed);
            Ok(Box::new(s.compat()) as BoxIo)
        })
    }

    fn is_member_ip(&self, ip: IpAddr) -> bool {
        self.wire.direct
            && self
                .wires
                .lock()
                .values()
                .any(|w| w.ip == Some(ip) || w.addr.is_some_and(|a| a.ip() == ip))
    }

    fn accept_wire(&self, conn: TcpStream) -> BoxFuture<io::Result<(BoxIo, MemberId)>> {
        let (wire, connected) = (self.wire.clone(), self.connected.clone());
        Box::pin(async move {
            let (peer, w) = btfs_mesh::wire::accept(&wire.keypair, &wire.prologue, conn).await?;
            if !connected.lock().contains(&peer) {
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!("{peer} is not a connected member"),
                ));
            }
            Ok((Box::new(DirectWire(w)) as BoxIo, peer))
        })
    }

    fn zone_of(&self, member: &MemberId) -> Option<String> {
        self.wires.lock().get(member).and_then(|w| w.zone.clone())
    }

    fn announce(&self, held: Vec<ContentId>, dropped: Vec<ContentId>) {
        if self.holdings.try_send((held, dropped)).is_err() {
            debug!("holdings queue full: an announcement is dropped");
        }
    }

    fn metainfo(&self, torrent: InfoHash, first: Option<MemberId>) -> BoxFuture<Option<Vec<u8>>> {
        let mesh = self.mesh.clone();
        let connected = self.connected();
        let first = first.filter(|f| connected.contains(f));
        let peers: Vec<PeerId> = first
            .into_iter()
            .chain(connected.into_iter().filter(|p| Some(*p) != first))
            .collect();
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
