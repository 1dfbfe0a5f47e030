//! The peers a node knows (found by mDNS, presence or a connection) and its
//! bootstrap addresses, and when to dial them: each on its own exponential
//! backoff, reset when a connection to it is up. mDNS neither dials nor
//! re-announces after a short outage, so these redials are what reconnects.

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

use backon::{BackoffBuilder, ExponentialBackoff};
use libp2p::{Multiaddr, PeerId, multiaddr::Protocol, swarm::dial_opts::DialOpts};
use tracing::debug;

use crate::{
    config::{RETRY as DIAL_BACKOFF, RETRY_MAX as BACKOFF_MAX},
    handle::PeerInfo,
    zone::Zone,
};

/// How often unconnected peers and bootstrap addresses are considered for a
/// redial.
pub(crate) const REDIAL_TICK: Duration = Duration::from_secs(1);
/// Longest delay between redials of a member lost in the last
/// [`LOST_MEMBER_WINDOW`]: a partition that heals is seen within it (a
/// dead link's connection is closed by the ping timeout; without this
/// cap the next redial could be up to `RETRY_MAX` after the heal).
pub(crate) const LOST_MEMBER_RETRY: Duration = Duration::from_secs(2);
/// How long after losing its last connection a member is redialled at
/// least every [`LOST_MEMBER_RETRY`]; later, on the plain backoff.
pub(crate) const LOST_MEMBER_WINDOW: Duration = Duration::from_secs(600);
/// Addresses kept for one peer (mDNS and presence add to them).
pub(crate) const MAX_ADDRS_PER_PEER: usize = 8;
/// Peers kept that are not connected (every admitted key holder can make
/// new identities; the map must not grow with them).
const MAX_KNOWN: usize = 4096;

/// Whether `a` is an address a member may be dialled at: one IP (not
/// unspecified, multicast or broadcast) and one non-zero TCP port, optionally
/// followed by a peer id. Nothing else (no DNS, no relays).
pub(crate) fn dialable(a: &Multiaddr) -> bool {
    let mut it = a.iter();
    let ip_ok = match it.next() {
        Some(Protocol::Ip4(ip)) => !(ip.is_unspecified() || ip.is_multicast() || ip.is_broadcast()),
        Some(Protocol::Ip6(ip)) => !(ip.is_unspecified() || ip.is_multicast()),
        _ => false,
    };
    let tcp_ok = matches!(it.next(), Some(Protocol::Tcp(port)) if port != 0);
    let rest_ok = match it.next() {
        None => true,
        Some(Protocol::P2p(_)) => it.next().is_none(),
        Some(_) => false,
    };
    ip_ok && tcp_ok && rest_ok
}

/// The delays between dials of one peer or address ([`DIAL_BACKOFF`]).
struct DialBackoff(ExponentialBackoff);

impl DialBackoff {
    fn new() -> Self {
        Self(DIAL_BACKOFF.build())
    }

    /// The delay after this dial (the schedule never ends).
    fn next_delay(&mut self) -> Duration {
        self.0.next().unwrap_or(BACKOFF_MAX)
    }

    /// Starts the schedule again at `config::RETRY_MIN`.
    fn reset(&mut self) {
        *self = Self::new();
    }
}

/// A peer found by mDNS, presence or a connection.
struct Known {
    addrs: Vec<Multiaddr>,
    connections: usize,
    last_seen: Instant,
    backoff: DialBackoff,
    next_dial: Instant,
    /// The zone it told, while connected (identify runs again on every
    /// new connection, and a restarted member may have moved).
    zone: Option<Zone>,
    /// When its last connection closed (`None`: connected, or never was).
    lost_at: Option<Instant>,
}

impl Known {
    fn new(now: Instant) -> Self {
        Self {
            addrs: Vec::new(),
            connections: 0,
            last_seen: now,
            backoff: DialBackoff::new(),
            next_dial: now,
            zone: None,
            lost_at: None,
        }
    }
}

/// A bootstrap address (its peer is not known in advance).
struct Bootstrap {
    addr: Multiaddr,
    backoff: DialBackoff,
    next_dial: Instant,
}

/// The known peers and the bootstrap addresses of one node.
pub(crate) struct Peers {
    known: HashMap<PeerId, Known>,
    bootstrap: Vec<Bootstrap>,
}

impl Peers {
    /// No peer known yet; every bootstrap address due at `now`.
    pub(crate) fn new(bootstrap: &[Multiaddr], now: Instant) -> Self {
        Self {
            known: HashMap::new(),
            bootstrap: bootstrap
                .iter()
                .map(|a| Bootstrap {
                    addr: a.clone(),
                    backoff: DialBackoff::new(),
                    next_dial: now,
                })
                .collect(),
        }
    }

    /// Records `peer` (and `addr`), within `MAX_KNOWN` peers and
    /// `MAX_ADDRS_PER_PEER` addresses each (the newest kept).
    pub(crate) fn learn(&mut self, peer: PeerId, addr: Option<Multiaddr>, now: Instant) {
        if !self.known.contains_key(&peer) && self.known.len() >= MAX_KNOWN {
            debug!(%peer, "not recorded: {MAX_KNOWN} peers known already");
            return;
        }
        let k = self.known.entry(peer).or_insert_with(|| Known::new(now));
        if let Some(addr) = addr.filter(|a| !k.addrs.contains(a)) {
            if k.addrs.len() >= MAX_ADDRS_PER_PEER {
                k.addrs.remove(0);
            }
            k.addrs.push(addr);
        }
    }

    /// A connection to `peer` at `remote` is up (`dialed` if this node
    /// dialled it), and it has `connections` now: its backoff, and that of
    /// a bootstrap address it was reached at, start again.
    pub(crate) fn connected(
        &mut self,
        peer: PeerId,
        remote: &Multiaddr,
        dialed: bool,
        connections: usize,
        now: Instant,
    ) {
        self.learn(peer, dialed.then(|| remote.clone()), now);
        // A connection is recorded even beyond `MAX_KNOWN`.
        let k = self.known.entry(peer).or_insert_with(|| Known::new(now));
        k.connections = connections;
        k.last_seen = now;
        k.lost_at = None;
        k.backoff.reset();
        for b in &mut self.bootstrap {
            if b.addr == *remote {
                b.backoff.reset();
            }
        }
    }

    /// A connection to `peer` is gone; `connections` are left. With the
    /// last one its zone is forgotten.
    pub(crate) fn disconnected(&mut self, peer: &PeerId, connections: usize, now: Instant) {
        if let Some(k) = self.known.get_mut(peer) {
            k.connections = connections;
            k.last_seen = now;
            if connections == 0 {
                k.zone = None;
                k.lost_at = Some(now);
            }
        }
    }

    /// A connected `peer` told `zone`. Returns whether that changes what
    /// is known of it (a peer not connected is not recorded: its zone
    /// would outlive the connection that told it).
    pub(crate) fn set_zone(&mut self, peer: &PeerId, zone: Option<Zone>) -> bool {
        match self.known.get_mut(peer) {
            Some(k) if k.connections > 0 && k.zone != zone => {
                k.zone = zone;
                true
            }
            _ => false,
        }
    }

    /// Forgets `peer` (no longer a member): it is neither dialled nor
    /// shown any more.
    pub(crate) fn forget(&mut self, peer: &PeerId) {
        self.known.remove(peer);
    }

    /// Replaces the bootstrap addresses (`mount -o remount,peers=`): an
    /// address kept keeps its backoff, a new one is due at `now`. Returns
    /// how many are new.
    pub(crate) fn set_bootstrap(&mut self, addrs: &[Multiaddr], now: Instant) -> usize {
        let mut old: Vec<Bootstrap> = std::mem::take(&mut self.bootstrap);
        let mut added = 0;
        for a in addrs {
            if self.bootstrap.iter().any(|b| b.addr == *a) {
                continue;
            }
            match old.iter().position(|b| b.addr == *a) {
                Some(i) => self.bootstrap.push(old.swap_remove(i)),
                None => {
                    added += 1;
                    self.bootstrap.push(Bootstrap {
                        addr: a.clone(),
                        backoff: DialBackoff::new(),
                        next_dial: now,
                    });
                }
            }
        }
        added
    }

    /// `peer` was heard from.
    pub(crate) fn heard_from(&mut self, peer: &PeerId, now: Instant) {
        if let Some(k) = self.known.get_mut(peer) {
            k.last_seen = now;
        }
    }

    /// Whether at least one connection to `peer` is up.
    pub(crate) fn is_connected(&self, peer: &PeerId) -> bool {
        self.known.get(peer).is_some_and(|k| k.connections > 0)
    }

    /// Every known peer, by id, as `btfs status` shows them.
    pub(crate) fn info(&self, now: Instant) -> Vec<PeerInfo> {
        let mut peers: Vec<PeerInfo> = self
            .known
            .iter()
            .map(|(id, k)| PeerInfo {
                id: id.to_string(),
                addresses: k.addrs.iter().map(ToString::to_string).collect(),
                connected: k.connections > 0,
                last_seen_secs: now.duration_since(k.last_seen).as_secs(),
                zone: k.zone.as_ref().map(ToString::to_string),
            })
            .collect();
        peers.sort_by(|a, b| a.id.cmp(&b.id));
        peers
    }

    /// The dials due at `now`: known members that are not connected (never
    /// `local`), and bootstrap addresses no connected member is known at.
    /// Each one dialled waits for its next backoff step.
    ///
    /// Every dial takes a new local port. With the default (the listen port
    /// reused), two members that find each other in the same instant dial
    /// 4410 to 4410 both ways: TCP merges that into one connection on which
    /// both sides act as the dialer, the handshake fails on both, and the
    /// retries, one backoff step later on both sides, collide again.
    pub(crate) fn due(&mut self, now: Instant, local: PeerId) -> Vec<DialOpts> {
        let connected_addrs: HashSet<Multiaddr> = self
            .known
            .values()
            .filter(|k| k.connections > 0)
            .flat_map(|k| k.addrs.iter().cloned())
            .collect();
        let mut dials = Vec::new();
        for (peer, k) in &mut self.known {
            if k.connections > 0 || k.next_dial > now || k.addrs.is_empty() || *peer == local {
                continue;
            }
            dials.push(
                DialOpts::peer_id(*peer)
                    .addresses(k.addrs.clone())
                    .allocate_new_port()
                    .build(),
            );
            let mut delay = k.backoff.next_delay();
            if k.lost_at
                .is_some_and(|t| now.duration_since(t) < LOST_MEMBER_WINDOW)
            {
                delay = delay.min(LOST_MEMBER_RETRY);
            }
            k.next_dial = now + delay;
        }
        for b in &mut self.bootstrap {
            if b.next_dial > now || connected_addrs.contains(&b.addr) {
                continue;
            }
            dials.push(
                DialOpts::unknown_peer_id()
                    .address(b.addr.clone())
                    .allocate_new_port()
                    .build(),
            );
            b.next_dial = now + b.backoff.next_delay();
        }
        dials
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RETRY_MIN as BACKOFF_MIN;

    fn addr(port: u16) -> Multiaddr {
        format!("/ip4/10.0.0.1/tcp/{port}").parse().unwrap()
    }

    /// The seconds after `t0`, up to `secs`, at which dials were due.
    fn dials_at(peers: &mut Peers, t0: Instant, secs: u64) -> Vec<u64> {
        let local = PeerId::random();
        (0..=secs)
            .filter(|s| !peers.due(t0 + Duration::from_secs(*s), local).is_empty())
            .collect()
    }

    fn gaps(at: &[u64]) -> Vec<u64> {
        at.windows(2).map(|w| w[1] - w[0]).collect()
    }

    #[test]
    fn the_dial_backoff_doubles_from_one_second_to_thirty() {
        let mut b = DialBackoff::new();
        let delays: Vec<u64> = (0..8).map(|_| b.next_delay().as_secs()).collect();
        assert_eq!(delays, vec![1, 2, 4, 8, 16, 30, 30, 30]);
        b.reset();
        assert_eq!(b.next_delay(), BACKOFF_MIN);
    }

    #[test]
    fn an_unconnected_peer_is_redialled_after_1_2_4_8_16_30_30_seconds() {
        let t0 = Instant::now();
        let mut peers = Peers::new(&[], t0);
        peers.learn(PeerId::random(), Some(addr(4410)), t0);
        let at = dials_at(&mut peers, t0, 100);
        assert_eq!(at, vec![0, 1, 3, 7, 15, 31, 61, 91]);
        assert_eq!(gaps(&at), vec![1, 2, 4, 8, 16, 30, 30]);
    }

    #[test]
    fn a_lost_member_is_redialled_every_two_seconds_for_ten_minutes_then_on_the_backoff() {
        let t0 = Instant::now();
        let mut peers = Peers::new(&[], t0);
        let peer = PeerId::random();
        peers.connected(peer, &addr(4410), true, 1, t0);
        peers.disconnected(&peer, 0, t0);
        let at = dials_at(&mut peers, t0, 30);
        assert_eq!(gaps(&at), vec![1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2]);
        // Past the window, the schedule is the plain one (30 s by now).
        let late = t0 + LOST_MEMBER_WINDOW + Duration::from_secs(1);
        let at = dials_at(&mut peers, late, 100);
        assert_eq!(gaps(&at), vec![30, 30, 30]);
    }

    #[test]
    fn a_bootstrap_address_is_redialled_on_the_same_schedule() {
        let t0 = Instant::now();
        let mut peers = Peers::new(&[addr(4410)], t0);
        let at = dials_at(&mut peers, t0, 100);
        assert_eq!(gaps(&at), vec![1, 2, 4, 8, 16, 30, 30]);
    }

    #[test]
    fn a_connection_starts_the_backoff_again() {
        let t0 = Instant::now();
        let mut peers = Peers::new(&[], t0);
        let peer = PeerId::random();
        peers.learn(peer, Some(addr(4410)), t0);
        assert_eq!(dials_at(&mut peers, t0, 8), vec![0, 1, 3, 7]);
        let t1 = t0 + Duration::from_secs(9);
        peers.connected(peer, &addr(4410), true, 1, t1);
        assert!(peers.is_connected(&peer));
        assert!(dials_at(&mut peers, t1, 20).is_empty(), "a connected peer");
        peers.disconnected(&peer, 0, t1);
        // The dial already planned (at 15 s), then 1 s, 2 s later and every
        // 2 s (a member just lost: `LOST_MEMBER_RETRY`).
        assert_eq!(dials_at(&mut peers, t0, 22), vec![15, 16, 18, 20, 22]);
    }

    #[test]
    fn a_zone_is_kept_while_connected_and_forgotten_with_the_last_connection() {
        let t0 = Instant::now();
        let mut peers = Peers::new(&[], t0);
        let peer = PeerId::random();
        let dc1 = Zone::new("dc1").ok();
        assert!(!peers.set_zone(&peer, dc1.clone()), "not known");
        peers.learn(peer, Some(addr(4410)), t0);
        assert!(!peers.set_zone(&peer, dc1.clone()), "not connected");
        peers.connected(peer, &addr(4410), true, 1, t0);
        assert!(peers.set_zone(&peer, dc1.clone()));
        assert!(!peers.set_zone(&peer, dc1.clone()), "unchanged");
        assert_eq!(peers.info(t0)[0].zone.as_deref(), Some("dc1"));
        peers.connected(peer, &addr(4410), true, 2, t0);
        peers.disconnected(&peer, 1, t0);
        assert_eq!(peers.info(t0)[0].zone.as_deref(), Some("dc1"), "one left");
        peers.disconnected(&peer, 0, t0);
        assert_eq!(peers.info(t0)[0].zone, None);
        peers.connected(peer, &addr(4410), true, 1, t0);
        assert!(peers.set_zone(&peer, dc1), "told again");
        assert!(peers.set_zone(&peer, None), "moved out of every zone");
    }

    #[test]
    fn new_bootstrap_addresses_are_due_at_once_and_kept_ones_keep_their_backoff() {
        let t0 = Instant::now();
        let mut peers = Peers::new(&[addr(1)], t0);
        let local = PeerId::random();
        assert_eq!(peers.due(t0, local).len(), 1);
        assert_eq!(peers.set_bootstrap(&[addr(1), addr(2), addr(2)], t0), 1);
        // addr(1) waits for its backoff; addr(2) is dialled now.
        assert_eq!(peers.due(t0, local).len(), 1);
        assert_eq!(peers.set_bootstrap(&[addr(2)], t0), 0);
        assert_eq!(peers.bootstrap.len(), 1);
        let p = PeerId::random();
        peers.learn(p, Some(addr(3)), t0);
        peers.forget(&p);
        assert!(peers.info(t0).is_empty());
    }

    #[test]
    fn the_local_peer_and_peers_without_addresses_are_never_dialled() {
        let t0 = Instant::now();
        let mut peers = Peers::new(&[], t0);
        let local = PeerId::random();
        peers.learn(local, Some(addr(4410)), t0);
        peers.learn(PeerId::random(), None, t0);
        assert!(peers.due(t0, local).is_empty());
    }
}
