//! mDNS that heals itself.
//!
//! libp2p-mdns starts one instance (a socket pair and a query timer) per
//! interface address when its interface watcher reports that address, and
//! never again: if the report is lost or the instance cannot open its sockets,
//! the node neither asks nor answers, and nothing retries. Its spawned
//! instances are detached tasks that outlive the behaviour.
//!
//! So the mesh runs it inside [`SupervisedMdns`]: the behaviour and every task
//! it spawns live on a small runtime of their own, which makes the running
//! instances countable and a restart complete (the old runtime, with all its
//! instances and sockets, is shut down). [`Supervisor`] is the IO-free policy,
//! fed once a tick with what the node can see: its multicast-capable IPv4
//! addresses, the instances alive, and the members mDNS has found. Until mDNS
//! has found a member, it restarts on a backoff (1 s doubling to 30 s, then
//! every 30 s); each restart is a fresh watcher, fresh instances and an
//! immediate query.
//!
//! Why a re-query matters even when instances run: an instance stops probing
//! at its first valid answer and then asks only every `query_interval`. At a
//! simultaneous start, the first answer may come from one node (or from a
//! node with another key) while the others' answers were missed (they had no
//! instance yet, or their swarm had not yet reported its listen address), so
//! the rest would be found only at the next query.

use std::{
    collections::BTreeSet,
    io,
    net::Ipv4Addr,
    sync::atomic::{AtomicU64, Ordering},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use backon::{BackoffBuilder, ExponentialBackoff};
use libp2p::{
    Multiaddr, PeerId,
    core::transport::ListenerId,
    core::{Endpoint, transport::PortUse},
    mdns,
    swarm::{
        ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler, THandlerInEvent,
        THandlerOutEvent, ToSwarm, behaviour::NewListenAddr, dummy,
    },
};

use crate::config::{RETRY, RETRY_MAX};

/// Restarts logged at info level (the backoff phase); later ones at debug.
pub(crate) const LOUD_RESTARTS: u64 = 6;
/// Restarts that must find no instance alive before "mDNS cannot run" is
/// logged (instances open their sockets just after a restart).
const FAILED_RESTARTS_BEFORE_WARNING: u32 = 2;

/// What the supervisor wants done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Action {
    /// Replace the behaviour: fresh watcher, fresh instances, a query now.
    Restart,
    /// Log once, at warn level: mDNS cannot run on any interface.
    WarnCannotRun(&'static str),
    /// Log once, at info level: mDNS runs again after a warning.
    Recovered,
}

/// What the node sees of mDNS at one tick.
#[derive(Debug, Clone, Default)]
pub(crate) struct Observation {
    /// Up, multicast-capable, non-loopback IPv4 addresses.
    pub interfaces: BTreeSet<Ipv4Addr>,
    /// Instances of the current behaviour that are alive.
    pub instances: usize,
    /// Members the current behaviour has found that are connected (a node
    /// found with another key does not count: the key is what makes a
    /// member).
    pub members: usize,
}

/// The restart policy (no IO, no clock of its own).
#[derive(Debug)]
pub(crate) struct Supervisor {
    started_on: BTreeSet<Ipv4Addr>,
    /// The delays of the restarts to come: its first one (`config::RETRY_MIN`) is
    /// taken when the schedule starts, for the first restart.
    backoff: ExponentialBackoff,
    next_restart: Instant,
    restarts: u64,
    /// Restarts in a row after which no instance was alive.
    failed_restarts: u32,
    warned: bool,
}

impl Supervisor {
    /// A supervisor for a behaviour just started on `interfaces`.
    pub(crate) fn new(now: Instant, interfaces: BTreeSet<Ipv4Addr>) -> Self {
        let mut backoff = RETRY.build();
        let first = Self::next_delay(&mut backoff);
        Self {
            started_on: interfaces,
            backoff,
            next_restart: now + first,
            restarts: 0,
            failed_restarts: 0,
            warned: false,
        }
    }

    /// The next delay of `backoff` (the schedule never ends).
    fn next_delay(backoff: &mut ExponentialBackoff) -> Duration {
        backoff.next().unwrap_or(RETRY_MAX)
    }

    /// Starts the schedule again; returns its first delay (`config::RETRY_MIN`).
    fn reset_backoff(&mut self) -> Duration {
        self.backoff = RETRY.build();
        Self::next_delay(&mut self.backoff)
    }

    /// Restarts so far.
    pub(crate) fn restarts(&self) -> u64 {
        self.restarts
    }

    /// The interfaces the running behaviour was started on.
    pub(crate) fn started_on(&self) -> &BTreeSet<Ipv4Addr> {
        &self.started_on
    }

    pub(crate) fn handle(&mut self, now: Instant, seen: &Observation) -> Vec<Action> {
        let mut actions = Vec::new();
        if seen.interfaces.is_empty() {
            // Nothing to run on; start at once when an interface comes.
            self.started_on.clear();
            self.reset_backoff();
            if !self.warned {
                self.warned = true;
                actions.push(Action::WarnCannotRun(
                    "no up, multicast-capable IPv4 interface (it starts when one comes up)",
                ));
            }
            return actions;
        }
        if seen.instances > 0 {
            self.failed_restarts = 0;
            if self.warned {
                self.warned = false;
                actions.push(Action::Recovered);
            }
        }
        let new_interface = !seen.interfaces.is_subset(&self.started_on);
        let healthy = seen.instances > 0 && seen.members > 0;
        if new_interface {
            self.reset_backoff();
            self.restart(now, seen, &mut actions);
        } else if healthy {
            self.next_restart = now + self.reset_backoff();
        } else if now >= self.next_restart {
            self.restart(now, seen, &mut actions);
        }
        actions
    }

    fn restart(&mut self, now: Instant, seen: &Observation, actions: &mut Vec<Action>) {
        if seen.instances == 0 && self.restarts > 0 {
            self.failed_restarts += 1;
            if self.failed_restarts >= FAILED_RESTARTS_BEFORE_WARNING && !self.warned {
                self.warned = true;
                actions.push(Action::WarnCannotRun(
                    "no instance could be started on any interface (see the libp2p_mdns errors)",
                ));
            }
        }
        self.started_on = seen.interfaces.clone();
        self.restarts += 1;
        self.next_restart = now + Self::next_delay(&mut self.backoff);
        actions.push(Action::Restart);
    }
}

/// The node's up, multicast-capable, non-loopback IPv4 addresses (where
/// libp2p-mdns can run: it is configured for IPv4).
pub(crate) fn multicast_interfaces() -> BTreeSet<Ipv4Addr> {
    use nix::net::if_::InterfaceFlags as F;
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return BTreeSet::new();
    };
    addrs
        .filter(|a| {
            a.flags.contains(F::IFF_UP | F::IFF_MULTICAST) && !a.flags.contains(F::IFF_LOOPBACK)
        })
        .filter_map(|a| a.address?.as_sockaddr_in().map(|s| s.ip()))
        .collect()
}

/// Runtimes made so far (their threads are named `btfs-mdns-N`).
static GENERATION: AtomicU64 = AtomicU64::new(0);

/// One libp2p-mdns behaviour and the runtime that holds all its tasks.
struct Running {
    inner: mdns::tokio::Behaviour,
    rt: Option<tokio::runtime::Runtime>,
    generation: u64,
}

impl Drop for Running {
    fn drop(&mut self) {
        // Never blocks, so it is safe inside the mesh's own task.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// libp2p-mdns, restartable: see the module documentation.
pub(crate) struct SupervisedMdns {
    local: PeerId,
    config: mdns::Config,
    /// The swarm's listen addresses, replayed into each new behaviour (it
    /// answers queries with them).
    listen: Vec<Multiaddr>,
    running: Running,
}

impl SupervisedMdns {
    pub(crate) fn new(config: mdns::Config, local: PeerId) -> io::Result<Self> {
        Ok(Self {
            running: Self::start(&config, local)?,
            local,
            config,
            listen: Vec::new(),
        })
    }

    fn start(config: &mdns::Config, local: PeerId) -> io::Result<Running> {
        let generation = GENERATION.fetch_add(1, Ordering::Relaxed);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(format!("btfs-mdns-{generation}"))
            .enable_all()
            .build()?;
        let inner = {
            let _in = rt.enter();
            mdns::tokio::Behaviour::new(config.clone(), local)?
        };
        Ok(Running {
            inner,
            rt: Some(rt),
            generation,
        })
    }

    /// Replaces the behaviour with a fresh one; the old one's instances and
    /// sockets are gone when this returns.
    pub(crate) fn restart(&mut self) -> io::Result<()> {
        let mut fresh = Self::start(&self.config, self.local)?;
        for addr in &self.listen {
            fresh
                .inner
                .on_swarm_event(FromSwarm::NewListenAddr(NewListenAddr {
                    listener_id: ListenerId::next(),
                    addr,
                }));
        }
        self.running = fresh;
        tracing::debug!(
            thread = format!("btfs-mdns-{}", self.running.generation),
            "mDNS restarted on a runtime of its own"
        );
        Ok(())
    }

    /// Instances alive (one per interface address it runs on).
    pub(crate) fn instances(&self) -> usize {
        self.running
            .rt
            .as_ref()
            .map_or(0, |rt| rt.metrics().num_alive_tasks())
    }

    /// Nodes found and not expired (a node with several addresses is
    /// listed once for each).
    pub(crate) fn discovered(&self) -> impl Iterator<Item = &PeerId> {
        self.running.inner.discovered_nodes()
    }
}

impl NetworkBehaviour for SupervisedMdns {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = mdns::Event;

    fn handle_established_inbound_connection(
        &mut self,
        _: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        _: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(dummy::ConnectionHandler)
    }

    fn handle_pending_outbound_connection(
        &mut self,
        connection_id: ConnectionId,
        maybe_peer: Option<PeerId>,
        addresses: &[Multiaddr],
        effective_role: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        self.running.inner.handle_pending_outbound_connection(
            connection_id,
            maybe_peer,
            addresses,
            effective_role,
        )
    }

    fn handle_established_outbound_connection(
        &mut self,
        _: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(dummy::ConnectionHandler)
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        match &event {
            FromSwarm::NewListenAddr(e) if !self.listen.contains(e.addr) => {
                self.listen.push(e.addr.clone());
            }
            FromSwarm::ExpiredListenAddr(e) => self.listen.retain(|a| a != e.addr),
            _ => {}
        }
        self.running.inner.on_swarm_event(event);
    }

    fn on_connection_handler_event(
        &mut self,
        _: PeerId,
        _: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        match event {}
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        let Running { inner, rt, .. } = &mut self.running;
        // Instances are spawned from here: onto the behaviour's own runtime.
        let _in = rt.as_ref().map(|rt| rt.enter());
        inner.poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ifaces(n: u8) -> BTreeSet<Ipv4Addr> {
        (1..=n).map(|i| Ipv4Addr::new(10, 0, 0, i)).collect()
    }

    fn seen(interfaces: u8, instances: usize, members: usize) -> Observation {
        Observation {
            interfaces: ifaces(interfaces),
            instances,
            members,
        }
    }

    fn restarts_at(sup: &mut Supervisor, t0: Instant, secs: u64, o: &Observation) -> Vec<u64> {
        (0..=secs)
            .filter(|s| {
                sup.handle(t0 + Duration::from_secs(*s), o)
                    .contains(&Action::Restart)
            })
            .collect()
    }

    #[test]
    fn a_silent_mdns_restarts_on_a_doubling_backoff_then_every_thirty_seconds() {
        let t0 = Instant::now();
        let mut sup = Supervisor::new(t0, ifaces(1));
        let at = restarts_at(&mut sup, t0, 130, &seen(1, 1, 0));
        assert_eq!(at, vec![1, 3, 7, 15, 31, 61, 91, 121]);
    }

    #[test]
    fn a_healthy_mdns_is_left_alone_and_a_later_silence_starts_the_backoff_again() {
        let t0 = Instant::now();
        let mut sup = Supervisor::new(t0, ifaces(2));
        assert!(restarts_at(&mut sup, t0, 100, &seen(2, 2, 3)).is_empty());
        let t1 = t0 + Duration::from_secs(101);
        // The last healthy tick was a second before t1.
        assert_eq!(restarts_at(&mut sup, t1, 4, &seen(2, 2, 0)), vec![0, 2]);
    }

    #[test]
    fn a_new_interface_restarts_at_once() {
        let t0 = Instant::now();
        let mut sup = Supervisor::new(t0, ifaces(1));
        assert!(sup.handle(t0, &seen(1, 1, 1)).is_empty());
        assert_eq!(sup.handle(t0, &seen(2, 1, 1)), vec![Action::Restart]);
        assert_eq!(sup.started_on(), &ifaces(2));
        // Losing one is not a reason to restart.
        assert!(sup.handle(t0, &seen(1, 1, 1)).is_empty());
    }

    #[test]
    fn no_interface_warns_once_and_the_first_one_to_come_starts_mdns() {
        let t0 = Instant::now();
        let mut sup = Supervisor::new(t0, BTreeSet::new());
        let none = seen(0, 0, 0);
        let warns = |a: &[Action]| a.iter().any(|a| matches!(a, Action::WarnCannotRun(_)));
        assert!(warns(&sup.handle(t0, &none)));
        for s in 1..100 {
            assert!(sup.handle(t0 + Duration::from_secs(s), &none).is_empty());
        }
        let t1 = t0 + Duration::from_secs(100);
        assert_eq!(sup.handle(t1, &seen(1, 0, 0)), vec![Action::Restart]);
        assert_eq!(
            sup.handle(t1, &seen(1, 1, 0)),
            vec![Action::Recovered],
            "running again"
        );
    }

    #[test]
    fn instances_that_never_start_are_warned_about_once() {
        let t0 = Instant::now();
        let mut sup = Supervisor::new(t0, ifaces(1));
        let dead = seen(1, 0, 0);
        let mut warnings = 0;
        for s in 0..200 {
            warnings += sup
                .handle(t0 + Duration::from_secs(s), &dead)
                .iter()
                .filter(|a| matches!(a, Action::WarnCannotRun(_)))
                .count();
        }
        assert_eq!(warnings, 1);
        assert!(sup.restarts() >= 8, "it keeps trying");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_restart_leaves_no_instance_or_thread_of_the_old_behaviour() {
        let local = libp2p::identity::Keypair::generate_ed25519()
            .public()
            .to_peer_id();
        let mut m = SupervisedMdns::new(mdns::Config::default(), local).unwrap();
        // The names of mDNS runtime threads (no other test here makes one).
        let threads = || {
            let mut names: Vec<String> = std::fs::read_dir("/proc/self/task")
                .unwrap()
                .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
                .map(|name| name.trim().to_owned())
                .filter(|name| name.starts_with("btfs-mdns-"))
                .collect();
            names.sort();
            names
        };
        // Old runtimes shut down in the background, and a new thread names
        // itself once it runs: wait (a loaded machine may take a while) for
        // exactly the current runtime's thread.
        async fn settle(threads: impl Fn() -> Vec<String>, want: &[String]) {
            let deadline = Instant::now() + Duration::from_secs(20);
            while threads() != want && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let current = |m: &SupervisedMdns| vec![format!("btfs-mdns-{}", m.running.generation)];
        settle(threads, &current(&m)).await;
        assert_eq!(threads(), current(&m));
        for _ in 0..5 {
            m.restart().unwrap();
        }
        settle(threads, &current(&m)).await;
        assert_eq!(threads(), current(&m), "the old runtimes' threads are gone");
        assert_eq!(
            m.instances(),
            0,
            "no instance before the behaviour is polled"
        );
    }
}
