//! Peer connections: librqbit's outgoing ones (through the SOCKS5 bridge to
//! a member), and incoming ones (members' mesh streams and direct wires,
//! standard clients from `bt_allow=` networks), bridged to librqbit once
//! their handshake names a torrent held here.

use std::{
    io,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use btfs_core::InfoHash;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::mpsc,
};
use tracing::{debug, warn};

use super::{
    Engine,
    live::{Dial, InUse, Need},
};
use crate::{
    MemberId, TorrentError,
    bridge::{self, BoxIo, QuickAck},
    congestion::{self, Socket},
    limits::{
        self, BRIDGE_IDLE, MAX_WIRES_PER_HOST, MAX_WIRES_PER_MEMBER, MEMBER_BRING_UP_BURST,
        MEMBER_BRING_UP_RATE, Relayed, Remote,
    },
    meta::Metainfo,
};

/// Torrents being brought up for members' metainfo requests at once; more
/// requests meanwhile bring none up (a member decides how many it sends).
pub(super) const MAX_WARMING: usize = 8;
/// librqbit's outgoing connections waiting to get an unpaced congestion
/// control; more keep the system's (see `congestion`).
const UNPACE_QUEUE: usize = 64;
/// Time for a peer to send its handshake, and for a stream to a member to
/// open.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections on the BitTorrent listener (members' direct peer wires and
/// standard clients) served at once.
const MAX_DIRECT_WIRES: usize = 1024;

impl Engine {
    /// Serves a peer connection that a member opened (over the mesh, or as
    /// a direct wire): brings its torrent up if this node holds it, then
    /// hands the connection to librqbit.
    ///
    /// A member has at most `MAX_WIRES_PER_MEMBER` such connections at once;
    /// one that moves nothing either way for `BRIDGE_IDLE` is closed.
    pub async fn accept(self: Arc<Self>, io: BoxIo, from: MemberId) {
        self.serve_peer(io, Remote::Member(from)).await;
    }

    /// Serves a peer connection from a member or an allowed network (see
    /// [`accept`](Self::accept)). A standard client, named by its address,
    /// has as many connections per IP address as a member.
    async fn serve_peer(self: Arc<Self>, mut io: BoxIo, from: Remote) {
        let Some(_slot) = self.limits.members.try_acquire(&from.key()) else {
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
        let Some(in_use) = self.held(ih, &from).await else {
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
        // A member may have no piece yet, and then sends no bitfield: say so
        // for it (see `bridge::empty_bitfield`).
        if !matches!(from, Remote::Client(_))
            && let Ok(pieces) = in_use.live.meta.piece_count()
            && local
                .write_all(&bridge::empty_bitfield(pieces))
                .await
                .is_err()
        {
            return;
        }
        let _counted = self.count_traffic(&local, &from);
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

    /// The live torrent of `ih`, in use for `from` while the result is
    /// held, brought up if this node holds its content (in full or in
    /// part), room under `max_live` allows, and `from` has not brought up
    /// more than `MEMBER_BRING_UP_BURST` lately.
    ///
    /// A member of this node's zone may first start a fetch of the whole
    /// file for the zone (`fetch_for_zone`): then the torrent is live, and
    /// the member joins it.
    pub(super) async fn held(self: &Arc<Self>, ih: InfoHash, from: &Remote) -> Option<InUse> {
        if let Remote::Member(m) = from {
            self.fetch_for_zone(ih, m).await;
        }
        if let Some(u) = self.live_for_peer(&ih) {
            return Some(u);
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
        if !self.limits.bring_ups.try_take(&from.key(), Instant::now()) {
            self.limits
                .member_bring_ups_refused
                .fetch_add(1, Ordering::Relaxed);
            debug!(%from, torrent = %ih, "peer connection refused: this member brings torrents up faster than {MEMBER_BRING_UP_RATE} a second (after {MEMBER_BRING_UP_BURST})");
            return None;
        }
        match self
            .bring_up(
                meta,
                &format!("torrent {ih}"),
                None,
                false,
                Need::Peer,
                Dial::Zone,
            )
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

    /// A member asked for the metainfo of `ih`: it is about to connect for
    /// pieces, so the torrent is brought up now if this node holds them.
    /// `from` names the request in logs and in the bound on bring-ups
    /// (`MEMBER_BRING_UP_BURST`).
    pub fn warm(self: &Arc<Self>, ih: InfoHash, from: String) {
        if self.live.lock().contains_key(&ih) {
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
            drop(this.held(ih, &Remote::Named(from)).await);
        });
    }

    /// librqbit's outgoing connections: SOCKS5 to a synthetic member address.
    /// Only a client with `secret` (librqbit) is served.
    pub(super) async fn serve_socks(
        self: Arc<Self>,
        listener: TcpListener,
        secret: bridge::SocksSecret,
    ) {
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
                let member = this.peers.lock().member_at(&target);
                let Some(member) = member else {
                    let _ = bridge::socks5_reply(&mut conn, 5).await;
                    return debug!(%target, "librqbit dialled an address that is not a member");
                };
                let dialled = tokio::time::timeout(HANDSHAKE_TIMEOUT, this.net.dial(member)).await;
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
                // The two handshakes, then a bitfield for the member as it
                // may send none (see `bridge::empty_bitfield`).
                let opened = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
                    use tokio::io::AsyncWriteExt as _;
                    let (ours, ih) = bridge::read_handshake(&mut conn).await?;
                    // The wire seals frames: flush, or it waits for more.
                    remote.write_all(&ours).await?;
                    remote.flush().await?;
                    let (theirs, _) = bridge::read_handshake(&mut remote).await?;
                    conn.write_all(&theirs).await?;
                    // Not for a member known to hold it all: it sends its
                    // bitfield next, and librqbit, told first that it has
                    // nothing, could find nothing to ask it for and sleep
                    // (up to 5 s: only new pieces of its own wake it).
                    let pieces = this.live_of(&InfoHash(ih)).and_then(|l| {
                        let holds = l.holder == Some(member)
                            || this.holders.lock().of(&l.meta.content).contains(&member);
                        l.meta.piece_count().ok().filter(|_| !holds)
                    });
                    if let Some(pieces) = pieces {
                        conn.write_all(&bridge::empty_bitfield(pieces)).await?;
                    }
                    conn.flush().await?;
                    Ok::<_, io::Error>(())
                });
                match opened.await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return debug!(%member, "outgoing peer connection: {e}"),
                    Err(_) => {
                        return debug!(%member, "outgoing peer connection: no handshake within {HANDSHAKE_TIMEOUT:?}");
                    }
                }
                let _counted = this.count_member_traffic(&conn, member);
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
    pub(super) async fn serve_public(self: Arc<Self>, listener: TcpListener) {
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
            let Some(host_slot) = self.limits.hosts.try_acquire(&peer.ip().to_canonical()) else {
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
                        this.serve_peer(Box::new(conn), Remote::Client(peer)).await;
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
}
