//! Bounds on what members can make this node hold.
//!
//! A member is trusted with content, not with this node's resources: each
//! handshake naming a torrent held here brings it up, and each peer
//! connection holds descriptors and a relay. The bounds:
//!
//! * **Live torrents** ([`DEFAULT_MAX_LIVE`], `EngineConfig::max_live`).
//!   Bringing one more up first retires the least recently used idle one
//!   ([`lru_victim`]); a member's handshake that finds none idle is refused.
//!   Local reads and fetches are never refused: they may retire a torrent
//!   that only members' connections use, and past that go over the cap by
//!   the torrents they use at once (the local workload bounds those).
//! * **Peer connections per member** ([`MAX_WIRES_PER_MEMBER`], and
//!   [`MAX_WIRES_PER_HOST`] on the BitTorrent listener before a member is
//!   known): one member cannot take the node's connection caps.
//! * **Bring-ups per member** ([`MEMBER_BRING_UP_BURST`],
//!   [`MEMBER_BRING_UP_RATE`]): torrents are added one at a time, reads
//!   included, so one member's handshakes cannot keep the node adding.
//! * **Idle bridges** ([`BRIDGE_IDLE`]): a relay that moves nothing is
//!   closed.

use std::{
    collections::HashMap,
    fmt,
    hash::Hash,
    io,
    net::{IpAddr, SocketAddr},
    num::NonZeroU32,
    os::fd::{AsRawFd, RawFd},
    sync::{
        Arc,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use parking_lot::Mutex;

use crate::{
    MemberId,
    bridge::{PeerIo, QuickAck},
};

/// The engine's settings that `mount -o remount` changes while it runs
/// (the rest of `EngineConfig` is fixed at start): read where they are
/// used, so that a change applies to the next read, fetch or cache pass.
/// The rate limits themselves live in librqbit's session (set there too).
#[derive(Debug)]
pub(crate) struct LiveSettings {
    read_timeout_ms: AtomicU64,
    /// `down_rate=` in bytes/s; 0: none.
    down_rate: AtomicU32,
    /// `cache_size=`: the cache keeper follows it.
    cache_size: tokio::sync::watch::Sender<Option<u64>>,
}

impl LiveSettings {
    pub(crate) fn new(
        read_timeout: Duration,
        down_rate: Option<NonZeroU32>,
        cache_size: Option<u64>,
    ) -> Self {
        Self {
            read_timeout_ms: AtomicU64::new(duration_ms(read_timeout)),
            down_rate: AtomicU32::new(down_rate.map_or(0, NonZeroU32::get)),
            cache_size: tokio::sync::watch::Sender::new(cache_size),
        }
    }

    pub(crate) fn read_timeout(&self) -> Duration {
        Duration::from_millis(self.read_timeout_ms.load(Ordering::Relaxed))
    }

    pub(crate) fn set_read_timeout(&self, d: Duration) {
        self.read_timeout_ms
            .store(duration_ms(d), Ordering::Relaxed);
    }

    pub(crate) fn down_rate(&self) -> Option<NonZeroU32> {
        NonZeroU32::new(self.down_rate.load(Ordering::Relaxed))
    }

    pub(crate) fn set_down_rate(&self, r: Option<NonZeroU32>) {
        self.down_rate
            .store(r.map_or(0, NonZeroU32::get), Ordering::Relaxed);
    }

    pub(crate) fn cache_size(&self) -> Option<u64> {
        *self.cache_size.borrow()
    }

    pub(crate) fn set_cache_size(&self, limit: Option<u64>) {
        self.cache_size.send_replace(limit);
    }

    /// Follows `cache_size` (the keeper waits on it while it is unset).
    pub(crate) fn watch_cache_size(&self) -> tokio::sync::watch::Receiver<Option<u64>> {
        self.cache_size.subscribe()
    }
}

/// A duration in whole milliseconds, at least 1 (a zero read timeout would
/// fail every read).
fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// Torrents live at once unless `EngineConfig::max_live` says otherwise.
/// Each costs librqbit an open file, piece state and a 100 ms stats loop
/// on its one thread: 512 of them are some 5,000 wake-ups a second there,
/// and their files with `MAX_DIRECT_WIRES` bridged connections (three
/// descriptors each: the wire, our loopback end, librqbit's) stay under
/// 4,096 descriptors, a common hard limit. A node uses far fewer at once
/// (a torrent is retired 30 s after its last use); the cap only bites when
/// members' handshakes name many torrents.
pub const DEFAULT_MAX_LIVE: usize = 512;

/// Peer connections (mesh streams and direct wires, bridged or still in
/// their handshake) one member may have open here at once. librqbit opens
/// one connection per torrent to a member, and drops it after 10 s with
/// nothing received (its read timeout), so this is some 64 torrents a
/// member is fetching from this node at once. A sixteenth of the listener's
/// `MAX_DIRECT_WIRES` and of the daemon's peer-stream cap (1024 each): one
/// member cannot take them all.
pub(crate) const MAX_WIRES_PER_MEMBER: usize = 64;

/// Connections one host (IP address) may hold on the BitTorrent listener,
/// counted from accept, before its noise handshake names the member: room
/// for four members behind one address, a quarter of `MAX_DIRECT_WIRES`.
pub(crate) const MAX_WIRES_PER_HOST: usize = 4 * MAX_WIRES_PER_MEMBER;

/// Torrents one member's handshakes (and metainfo requests) may bring up in
/// a burst, and per second after it. Adding a torrent holds the engine's
/// one add lock, reads included, for tens of milliseconds (more for a
/// partial one): an unbounded member could keep every read of this node
/// waiting behind its adds while churning torrents through the live cap. A
/// member reading many small files from here cold stays within this (its
/// torrents are added once, then stay live while used); a refused
/// connection is retried by the member's librqbit.
pub(crate) const MEMBER_BRING_UP_BURST: u32 = 64;
pub(crate) const MEMBER_BRING_UP_RATE: u32 = 16;

/// A bridged peer connection that moves no byte either way for this long is
/// closed. librqbit sends a keep-alive after 120 s with nothing else to
/// send (`keep_alive_interval`, librqbit 9.1 `peer_connection.rs`) and drops
/// a peer that sends nothing for 10 s (`read_write_timeout`), so a relay
/// with a live librqbit on either end moves bytes well within this; one that
/// does not is half-closed or held open by a peer that sends nothing.
pub(crate) const BRIDGE_IDLE: Duration = Duration::from_secs(180);

/// Checks of a relay's progress per idle period: it is closed between
/// `idle` and `idle * (1 + 1/IDLE_CHECKS)` after its last byte.
const IDLE_CHECKS: u32 = 6;

/// Bring-up buckets kept before the full ones (as good as new) are
/// forgotten.
const BUCKETS_KEPT: usize = 4096;

/// Whom a peer connection (and the torrent it brings up) is for: what the
/// engine's logs name, and what its bounds count under [`Remote::key`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Remote {
    /// A member, over a mesh stream or a direct wire.
    Member(MemberId),
    /// A standard BitTorrent client from a `bt_allow=` network, by its
    /// address.
    Client(SocketAddr),
    /// Whatever the caller of `Engine::warm` named (the daemon names what
    /// asked, not a member).
    Named(String),
}

/// The key a peer connection is bounded under: the member (its peer id), or
/// for a standard client the client's IP address (each connection has its
/// own port).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Key {
    Member(MemberId),
    Host(IpAddr),
    Named(String),
}

impl Remote {
    pub(crate) fn key(&self) -> Key {
        match self {
            Self::Member(m) => Key::Member(*m),
            Self::Client(a) => Key::Host(a.ip().to_canonical()),
            // A name that is an address counts as that address's host.
            Self::Named(n) => match n.parse::<SocketAddr>() {
                Ok(a) => Key::Host(a.ip().to_canonical()),
                Err(_) => Key::Named(n.clone()),
            },
        }
    }
}

impl fmt::Display for Remote {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Member(m) => m.fmt(f),
            Self::Client(a) => a.fmt(f),
            Self::Named(n) => n.fmt(f),
        }
    }
}

/// Counts of what each key holds, at most `max` each.
#[derive(Debug)]
pub(crate) struct Slots<K: Hash + Eq> {
    max: usize,
    held: Arc<Mutex<HashMap<K, usize>>>,
}

/// One of a key's [`Slots`], given back when dropped.
#[derive(Debug)]
pub(crate) struct Slot<K: Hash + Eq> {
    held: Arc<Mutex<HashMap<K, usize>>>,
    key: K,
}

impl<K: Hash + Eq + Clone> Slots<K> {
    pub(crate) fn new(max: usize) -> Self {
        Self {
            max,
            held: Arc::default(),
        }
    }

    /// A slot for `key`, unless it holds `max` already.
    pub(crate) fn try_acquire(&self, key: &K) -> Option<Slot<K>> {
        let mut held = self.held.lock();
        if held.get(key).copied().unwrap_or(0) >= self.max {
            return None;
        }
        *held.entry(key.clone()).or_insert(0) += 1;
        Some(Slot {
            held: self.held.clone(),
            key: key.clone(),
        })
    }

    #[cfg(test)]
    pub(crate) fn held_by(&self, key: &K) -> usize {
        self.held.lock().get(key).copied().unwrap_or(0)
    }
}

impl<K: Hash + Eq> Drop for Slot<K> {
    fn drop(&mut self) {
        let mut held = self.held.lock();
        if let Some(n) = held.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                held.remove(&self.key);
            }
        }
    }
}

/// A token bucket per key: `burst` at once, `per_sec` a second after.
#[derive(Debug)]
pub(crate) struct Buckets<K> {
    burst: f64,
    per_sec: f64,
    /// Tokens left, as of when.
    by_key: Mutex<HashMap<K, (f64, Instant)>>,
}

impl<K: Hash + Eq + Clone> Buckets<K> {
    pub(crate) fn new(burst: u32, per_sec: u32) -> Self {
        Self {
            burst: f64::from(burst),
            per_sec: f64::from(per_sec),
            by_key: Mutex::default(),
        }
    }

    fn refilled(&self, tokens: f64, at: Instant, now: Instant) -> f64 {
        let more = now.saturating_duration_since(at).as_secs_f64() * self.per_sec;
        (tokens + more).min(self.burst)
    }

    /// Takes a token of `key`'s bucket, if it has one.
    pub(crate) fn try_take(&self, key: &K, now: Instant) -> bool {
        let mut by_key = self.by_key.lock();
        if by_key.len() >= BUCKETS_KEPT && !by_key.contains_key(key) {
            by_key.retain(|_, (tokens, at)| self.refilled(*tokens, *at, now) < self.burst);
        }
        let (tokens, at) = by_key.entry(key.clone()).or_insert((self.burst, now));
        let have = self.refilled(*tokens, *at, now);
        *at = now;
        if have >= 1.0 {
            *tokens = have - 1.0;
            true
        } else {
            *tokens = have;
            false
        }
    }
}

/// What a live torrent is used for, to choose which to retire.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Usage {
    pub(crate) last_used: Instant,
    /// Users of any kind: reads, fetches, bridged peer connections.
    pub(crate) users: usize,
    /// Users on this node's behalf (reads, fetches, followers).
    pub(crate) local_users: usize,
    /// A whole-file fetch or an install is under way.
    pub(crate) busy: bool,
}

impl Usage {
    /// Nothing uses it: the reaper retires it after `IDLE_LIVE`.
    pub(crate) fn idle(&self) -> bool {
        self.users == 0 && !self.busy
    }

    /// Only members' connections use it (it seeds).
    fn seeding_only(&self) -> bool {
        self.local_users == 0 && !self.busy
    }
}

/// The live torrent to retire to make room for one more: the least
/// recently used idle one; for a local use (`local`), failing that, the
/// least recently used one that only members' connections use (retiring it
/// closes them). `None`: every one is in use (locally, for a local use).
pub(crate) fn lru_victim<K>(items: impl IntoIterator<Item = (K, Usage)>, local: bool) -> Option<K> {
    let mut idle: Option<(K, Instant)> = None;
    let mut seeding: Option<(K, Instant)> = None;
    for (k, u) in items {
        let slot = if u.idle() {
            &mut idle
        } else if local && u.seeding_only() {
            &mut seeding
        } else {
            continue;
        };
        if slot.as_ref().is_none_or(|(_, t)| u.last_used < *t) {
            *slot = Some((k, u.last_used));
        }
    }
    idle.or(seeding).map(|(k, _)| k)
}

/// The counters of refusals and closes that `btfs status` shows, and the
/// per-member bounds.
#[derive(Debug)]
pub(crate) struct Limits {
    /// Peer connections per member (or standard client address).
    pub(crate) members: Slots<Key>,
    /// Connections per host (canonical IP address) on the BitTorrent
    /// listener.
    pub(crate) hosts: Slots<IpAddr>,
    /// Torrents brought up for each member's handshakes.
    pub(crate) bring_ups: Buckets<Key>,
    pub(crate) live_refused: AtomicU64,
    pub(crate) member_conns_refused: AtomicU64,
    pub(crate) member_bring_ups_refused: AtomicU64,
    pub(crate) bridges_idle_closed: AtomicU64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            members: Slots::new(MAX_WIRES_PER_MEMBER),
            hosts: Slots::new(MAX_WIRES_PER_HOST),
            bring_ups: Buckets::new(MEMBER_BRING_UP_BURST, MEMBER_BRING_UP_RATE),
            live_refused: AtomicU64::new(0),
            member_conns_refused: AtomicU64::new(0),
            member_bring_ups_refused: AtomicU64::new(0),
            bridges_idle_closed: AtomicU64::new(0),
        }
    }
}

/// How a relay ended.
#[derive(Debug)]
pub(crate) enum Relayed {
    /// Both directions ended: bytes sent to the peer and received from it.
    Ended(io::Result<(u64, u64)>),
    /// Nothing moved either way for the idle period: closed.
    Idle,
}

/// Relays `io` and `local` ([`PeerIo::relay`], whichever way the stream
/// relays) until both directions end, or until no byte has moved either way
/// for `idle`.
///
/// Progress is read off the loopback socket (`TCP_INFO`: bytes it received
/// from librqbit, bytes librqbit acknowledged), which every relayed byte
/// crosses, so relays that read the socket themselves (a direct wire's)
/// are watched too. Where the kernel does not say, the relay is never
/// counted idle.
pub(crate) async fn relay_until_idle(
    io: &mut dyn PeerIo,
    local: &mut QuickAck,
    idle: Duration,
) -> Relayed {
    let fd = local.socket().as_raw_fd();
    let every = (idle / IDLE_CHECKS).max(Duration::from_millis(1));
    let mut moved = loopback_moved(fd);
    let mut quiet_since = tokio::time::Instant::now();
    let mut check = tokio::time::interval_at(quiet_since + every, every);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut relay = io.relay(local);
    loop {
        tokio::select! {
            r = &mut relay => return Relayed::Ended(r),
            _ = check.tick() => {
                let now = loopback_moved(fd);
                if now.is_none() || now != moved {
                    moved = now;
                    quiet_since = tokio::time::Instant::now();
                } else if quiet_since.elapsed() >= idle {
                    return Relayed::Idle;
                }
            }
        }
    }
}

/// Bytes a TCP socket's peer acknowledged and bytes it received.
pub(crate) fn loopback_moved(fd: RawFd) -> Option<(u64, u64)> {
    use nix::libc;
    let mut info = std::mem::MaybeUninit::<libc::tcp_info>::zeroed();
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::tcp_info>()).ok()?;
    // SAFETY: `fd` is an open socket the caller borrows for as long as it
    // calls this (a `QuickAck`'s, or a connection's kept by `traffic`);
    // `info` has room for `len` bytes.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    // Kernels before 4.1 have neither counter.
    let need = std::mem::offset_of!(libc::tcp_info, tcpi_bytes_received) + 8;
    if r != 0 || usize::try_from(len).map_or(true, |l| l < need) {
        return None;
    }
    // SAFETY: zeroed, then partly filled in by the kernel; every field is
    // an integer.
    let info = unsafe { info.assume_init() };
    Some((info.tcpi_bytes_acked, info.tcpi_bytes_received))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::{TcpListener, TcpStream},
    };

    fn usage(ago_ms: u64, users: usize, local_users: usize, busy: bool) -> Usage {
        Usage {
            last_used: Instant::now()
                .checked_sub(Duration::from_millis(ago_ms))
                .unwrap_or_else(Instant::now),
            users,
            local_users,
            busy,
        }
    }

    #[test]
    fn the_least_recently_used_idle_torrent_goes_first() {
        let v = vec![
            ("recent", usage(10, 0, 0, false)),
            ("oldest idle", usage(5_000, 0, 0, false)),
            ("older but read", usage(9_000, 1, 1, false)),
            ("older but fetching", usage(9_000, 1, 1, true)),
            ("older but seeding", usage(9_000, 2, 0, false)),
        ];
        assert_eq!(lru_victim(v.clone(), false), Some("oldest idle"));
        assert_eq!(lru_victim(v, true), Some("oldest idle"));
    }

    #[test]
    fn members_are_refused_when_every_torrent_is_in_use_but_local_reads_retire_seeders() {
        let v = vec![
            ("read", usage(9_000, 1, 1, false)),
            ("seeding", usage(5_000, 3, 0, false)),
            ("seeding, newer", usage(10, 1, 0, false)),
            ("installing", usage(9_000, 0, 0, true)),
        ];
        assert_eq!(lru_victim(v.clone(), false), None);
        assert_eq!(lru_victim(v, true), Some("seeding"));
        let all_local = vec![
            ("a", usage(9_000, 1, 1, false)),
            ("b", usage(1, 2, 1, false)),
        ];
        assert_eq!(lru_victim(all_local, true), None);
    }

    #[test]
    fn slots_bound_each_key_and_come_back_when_dropped() {
        let s = Slots::new(MAX_WIRES_PER_MEMBER);
        let held: Vec<Slot<&str>> = (0..MAX_WIRES_PER_MEMBER)
            .map(|_| s.try_acquire(&"a").expect("within the bound"))
            .collect();
        assert!(s.try_acquire(&"a").is_none(), "one over the bound");
        let b = s.try_acquire(&"b");
        assert!(b.is_some(), "another member is not refused");
        drop(held.into_iter().next());
        assert!(s.try_acquire(&"a").is_some());
        drop(b);
        assert_eq!(s.held_by(&"b"), 0);
        assert!(s.held.lock().get("b").is_none(), "empty keys are forgotten");
    }

    #[test]
    fn standard_clients_are_bounded_by_address_members_by_name() {
        let client = |a: &str| Remote::Client(a.parse().unwrap());
        let host = |a: &str| Key::Host(a.parse().unwrap());
        assert_eq!(client("10.0.0.7:51234").key(), host("10.0.0.7"));
        assert_eq!(client("[::ffff:10.0.0.7]:1").key(), host("10.0.0.7"));
        let m = MemberId::random();
        assert_eq!(Remote::Member(m).key(), Key::Member(m));
        // Logs name them as before: the peer id in base58, the address.
        assert_eq!(Remote::Member(m).to_string(), m.to_base58());
        assert_eq!(client("10.0.0.7:51234").to_string(), "10.0.0.7:51234");
        // What `warm` is told: a name, unless it is an address.
        let named = |n: &str| Remote::Named(n.into()).key();
        assert_eq!(
            named("metainfo request"),
            Key::Named("metainfo request".into())
        );
        assert_eq!(named("10.0.0.7:1"), host("10.0.0.7"));
    }

    #[test]
    fn bring_ups_are_a_burst_then_a_rate() {
        let b = Buckets::new(4, 2);
        let t0 = Instant::now();
        assert!((0..4).all(|_| b.try_take(&"m", t0)));
        assert!(!b.try_take(&"m", t0));
        assert!(b.try_take(&"other", t0), "each member has its own");
        let later = t0 + Duration::from_millis(500);
        assert!(b.try_take(&"m", later), "2 a second: one after 500 ms");
        assert!(!b.try_take(&"m", later));
        let much_later = t0 + Duration::from_secs(3600);
        assert!(
            (0..4).all(|_| b.try_take(&"m", much_later)),
            "never over the burst"
        );
        assert!(!b.try_take(&"m", much_later));
    }

    /// A peer stream in memory.
    impl PeerIo for tokio::io::DuplexStream {}

    /// librqbit's end and ours of a loopback connection.
    async fn loopback() -> (TcpStream, QuickAck) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (ours, _) = l.accept().await.unwrap();
        (client, QuickAck::new(ours))
    }

    #[tokio::test]
    async fn an_idle_relay_is_closed_and_a_busy_one_is_not() {
        let idle = Duration::from_millis(300);
        // Nothing moves: closed after the idle period, not long after.
        let (_librqbit, mut local) = loopback().await;
        let (mut peer, _far) = tokio::io::duplex(1 << 16);
        let started = tokio::time::Instant::now();
        let r = relay_until_idle(&mut peer, &mut local, idle).await;
        assert!(matches!(r, Relayed::Idle), "{r:?}");
        let took = started.elapsed();
        assert!(took >= idle && took < idle * 3, "{took:?}");

        // A byte each way every 100 ms for 1 s: carried to its end.
        let (mut librqbit, mut local) = loopback().await;
        let (mut peer, mut far) = tokio::io::duplex(1 << 16);
        let talk = tokio::spawn(async move {
            let mut b = [0u8; 1];
            for i in 0..10u8 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if i % 2 == 0 {
                    far.write_all(&[i]).await.unwrap();
                    librqbit.read_exact(&mut b).await.unwrap();
                } else {
                    librqbit.write_all(&[i]).await.unwrap();
                    far.read_exact(&mut b).await.unwrap();
                }
                assert_eq!(b[0], i);
            }
        });
        let r = tokio::time::timeout(
            Duration::from_secs(5),
            relay_until_idle(&mut peer, &mut local, idle),
        )
        .await
        .expect("the relay ends when both ends close");
        match r {
            Relayed::Ended(Ok((up, down))) => assert_eq!((up, down), (5, 5)),
            other => panic!("{other:?}"),
        }
        talk.await.unwrap();
    }
}
