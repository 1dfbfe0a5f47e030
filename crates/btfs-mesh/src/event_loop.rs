//! The event loop that owns the swarm: it answers the handles' commands,
//! turns swarm events into [`MeshEvent`]s, validates gossip, and once a
//! tick supervises mDNS, redials and announces this node's presence.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    time::Instant,
};

use futures::StreamExt;
use libp2p::{
    PeerId, Swarm, gossipsub, identify, mdns,
    multiaddr::Protocol,
    ping,
    request_response::{self, OutboundRequestId, ResponseChannel},
    swarm::SwarmEvent,
};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::{
    config::{MeshConfig, RESPONSE_CAP, Topic, Validator},
    discovery,
    error::MeshError,
    handle::{Command, MdnsStatus, MeshEvent, Responder},
    peers::{Peers, REDIAL_TICK},
    presence::{Presence, parse_presence},
    swarm::{Behaviour, BehaviourEvent, Payload},
    zone::{Zone, zone_of_agent},
};

/// The state of a running mesh; see the module documentation.
pub(crate) struct EventLoop {
    swarm: Swarm<Behaviour>,
    /// libp2p's own metrics (connections, gossipsub, identify, ping), in
    /// the mesh's registry (see `Mesh::metrics`).
    metrics: libp2p::metrics::Metrics,
    topics: Vec<(Topic, gossipsub::IdentTopic)>,
    validate: Validator,
    members: Option<HashSet<PeerId>>,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<MeshEvent>,
    responses_tx: mpsc::Sender<(u64, Vec<u8>)>,
    responses: mpsc::Receiver<(u64, Vec<u8>)>,
    inbound: HashMap<u64, ResponseChannel<Payload>>,
    next_inbound: u64,
    outbound: HashMap<OutboundRequestId, oneshot::Sender<Result<Vec<u8>, MeshError>>>,
    peers: Peers,
    /// Restarts mDNS until it finds someone (`None` with `mdns=off`).
    mdns: Option<discovery::Supervisor>,
    /// Members announce their own listen addresses here, signed by
    /// gossipsub, so that a member that knows one other learns them all.
    presence: Presence,
}

impl EventLoop {
    /// The loop of `swarm` (subscribed to `topics` and `presence`), reading
    /// `commands` and sending `events`.
    pub(crate) fn new(
        swarm: Swarm<Behaviour>,
        cfg: &MeshConfig,
        topics: Vec<(Topic, gossipsub::IdentTopic)>,
        presence: Presence,
        commands: mpsc::Receiver<Command>,
        events: mpsc::Sender<MeshEvent>,
        metrics: libp2p::metrics::Metrics,
    ) -> Self {
        let (responses_tx, responses) = mpsc::channel(RESPONSE_CAP);
        let now = Instant::now();
        Self {
            swarm,
            metrics,
            topics,
            validate: cfg.validate.clone(),
            members: cfg.members.clone(),
            commands,
            events,
            responses_tx,
            responses,
            inbound: HashMap::new(),
            next_inbound: 0,
            outbound: HashMap::new(),
            peers: Peers::new(&cfg.bootstrap, now),
            mdns: cfg
                .mdns
                .then(|| discovery::Supervisor::new(now, discovery::multicast_interfaces())),
            presence,
        }
    }

    /// Runs until every handle is dropped.
    pub(crate) async fn run(mut self) {
        let mut redial = tokio::time::interval(REDIAL_TICK);
        redial.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                cmd = self.commands.recv() => match cmd {
                    Some(cmd) => self.command(cmd),
                    None => {
                        debug!("mesh handles dropped: stopping");
                        return;
                    }
                },
                Some((id, data)) = self.responses.recv() => {
                    if let Some(channel) = self.inbound.remove(&id) {
                        let _ = self.swarm.behaviour_mut().rpc.send_response(channel, Payload(data));
                    }
                }
                event = self.swarm.select_next_some() => self.swarm_event(event).await,
                _ = redial.tick() => {
                    let now = Instant::now();
                    self.supervise_mdns(now);
                    self.redial();
                    self.presence.tick(now);
                    self.announce_if_due(now);
                }
            }
        }
    }

    fn admitted(&self, peer: &PeerId) -> bool {
        self.members.as_ref().is_none_or(|m| m.contains(peer))
    }

    fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Publish(topic, data, reply) => {
                let Some((_, ident)) = self.topics.iter().find(|(t, _)| *t == topic) else {
                    let _ = reply.send(Err(MeshError::Publish(
                        format!("no topic {topic:?}").into(),
                    )));
                    return;
                };
                let r = self
                    .swarm
                    .behaviour_mut()
                    .gossipsub
                    .publish(ident.clone(), data);
                let _ = reply.send(match r {
                    Ok(_) => Ok(()),
                    Err(gossipsub::PublishError::NoPeersSubscribedToTopic) => {
                        Err(MeshError::NoPeers)
                    }
                    Err(gossipsub::PublishError::Duplicate) => Ok(()),
                    Err(e) => Err(MeshError::Publish(Box::new(e))),
                });
            }
            Command::Request(peer, data, reply) => {
                let id = self
                    .swarm
                    .behaviour_mut()
                    .rpc
                    .send_request(&peer, Payload(data));
                self.outbound.insert(id, reply);
            }
            Command::Peers(reply) => {
                let _ = reply.send(self.peers.info(Instant::now()));
            }
            Command::ListenAddrs(reply) => {
                let _ = reply.send(self.swarm.listeners().cloned().collect());
            }
            Command::SetMembers(members, reply) => {
                let _ = reply.send(self.set_members(members));
            }
            Command::SetBootstrap(addrs, reply) => {
                let added = self.peers.set_bootstrap(&addrs, Instant::now());
                info!(addresses = addrs.len(), added, "bootstrap peers replaced");
                self.redial();
                let _ = reply.send(added);
            }
            Command::Mdns(reply) => {
                let mut status = MdnsStatus::default();
                if let (Some(sup), Some(m)) = (&self.mdns, self.swarm.behaviour_mut().mdns.as_mut())
                {
                    status = MdnsStatus {
                        enabled: true,
                        running: m.instances() > 0,
                        interfaces: sup.started_on().iter().map(ToString::to_string).collect(),
                        instances: m.instances(),
                        discovered: m.discovered().collect::<HashSet<_>>().len(),
                        restarts: sup.restarts(),
                    };
                }
                let _ = reply.send(status);
            }
        }
    }

    /// Admits only `members` (`None`: every key holder) from now on. The
    /// allow list, when the mesh started with one, follows; a connected
    /// peer no longer admitted is disconnected and forgotten either way
    /// (a mesh started open has no allow list: its new connections are
    /// checked as they come up). Returns the peers cut off.
    fn set_members(&mut self, members: Option<HashSet<PeerId>>) -> Vec<PeerId> {
        let old = std::mem::replace(&mut self.members, members);
        if let Some(list) = self.swarm.behaviour_mut().members.as_mut() {
            match &self.members {
                Some(new) => {
                    for p in new {
                        list.allow_peer(*p);
                    }
                    for p in old.iter().flatten().filter(|p| !new.contains(p)) {
                        list.disallow_peer(*p);
                    }
                }
                // An allow list cannot say "every key holder": the
                // peers it lists stay the only ones that may connect.
                None => warn!(
                    "members= cannot be lifted on a mesh started with a list: the last list stays"
                ),
            }
        }
        let cut: Vec<PeerId> = self
            .swarm
            .connected_peers()
            .copied()
            .filter(|p| !self.admitted(p))
            .collect();
        for p in &cut {
            warn!(peer = %p, "no longer a member: disconnecting it");
            let _ = self.swarm.disconnect_peer_id(*p);
            self.peers.forget(p);
        }
        cut
    }

    /// Feeds the mDNS supervisor what the node sees, and does what it says.
    fn supervise_mdns(&mut self, now: Instant) {
        let (Some(sup), Some(m)) = (self.mdns.as_mut(), self.swarm.behaviour_mut().mdns.as_mut())
        else {
            return;
        };
        let members = m
            .discovered()
            .collect::<HashSet<_>>()
            .into_iter()
            .filter(|p| self.peers.is_connected(p))
            .count();
        let seen = discovery::Observation {
            interfaces: discovery::multicast_interfaces(),
            instances: m.instances(),
            members,
        };
        for action in sup.handle(now, &seen) {
            match action {
                discovery::Action::Restart => {
                    let n = sup.restarts();
                    if n <= discovery::LOUD_RESTARTS {
                        info!(
                            restart = n,
                            interfaces = ?seen.interfaces,
                            instances = seen.instances,
                            members = seen.members,
                            "mDNS has found no member yet: restarting it"
                        );
                    } else {
                        debug!(restart = n, "mDNS has found no member yet: restarting it");
                    }
                    if let Err(e) = m.restart() {
                        warn!("mDNS restart failed: {e}");
                    }
                }
                discovery::Action::WarnCannotRun(why) => {
                    warn!("mDNS cannot run on any interface: {why}; retrying");
                }
                discovery::Action::Recovered => {
                    info!(interfaces = ?seen.interfaces, "mDNS runs again");
                }
            }
        }
    }

    /// Publishes this node's listen addresses if an announcement is due and
    /// the last one is at least `PRESENCE_MIN_GAP` old.
    fn announce_if_due(&mut self, now: Instant) {
        let Some(data) = self.presence.announcement(now, self.swarm.listeners()) else {
            return;
        };
        match self
            .swarm
            .behaviour_mut()
            .gossipsub
            .publish(self.presence.topic().clone(), data)
        {
            Ok(_) | Err(gossipsub::PublishError::Duplicate) => self.presence.published(now),
            // Nobody to tell yet: a subscription will make it due again.
            Err(gossipsub::PublishError::NoPeersSubscribedToTopic) => {}
            Err(e) => debug!("presence not published: {e}"),
        }
    }

    /// A presence announcement from `source`, an admitted member: checked,
    /// then its addresses are learnt and dialled. Returns whether it was
    /// valid.
    fn presence_received(&mut self, source: PeerId, data: &[u8]) -> bool {
        let Some(addrs) = parse_presence(data) else {
            return false;
        };
        if source == *self.swarm.local_peer_id() {
            return true;
        }
        let now = Instant::now();
        for a in addrs {
            self.peers.learn(source, Some(a), now);
        }
        self.redial();
        true
    }

    async fn emit(&mut self, event: MeshEvent) {
        if self.events.send(event).await.is_err() {
            debug!("mesh event receiver dropped");
        }
    }

    async fn swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        libp2p::metrics::Recorder::record(&self.metrics, &event);
        match event {
            SwarmEvent::NewListenAddr { address, .. } => info!(%address, "mesh listening"),
            SwarmEvent::ConnectionEstablished {
                peer_id,
                endpoint,
                num_established,
                ..
            } => {
                if !self.admitted(&peer_id) {
                    // Only after a live `members=` change on a mesh started
                    // open (an allow list denies such a connection first).
                    debug!(peer = %peer_id, "not a member: closing its connection");
                    let _ = self.swarm.disconnect_peer_id(peer_id);
                    return;
                }
                let remote = endpoint.get_remote_address().clone();
                self.peers.connected(
                    peer_id,
                    &remote,
                    endpoint.is_dialer(),
                    num_established.get() as usize,
                    Instant::now(),
                );
                if num_established.get() == 1 {
                    info!(peer = %peer_id, %remote, "member connected");
                    let ip = remote.iter().find_map(|p| match p {
                        Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
                        Protocol::Ip6(ip) => Some(IpAddr::V6(ip)),
                        _ => None,
                    });
                    self.emit(MeshEvent::PeerUp(peer_id, ip)).await;
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established,
                cause,
                ..
            } => {
                self.peers
                    .disconnected(&peer_id, num_established as usize, Instant::now());
                if num_established == 0 {
                    info!(peer = %peer_id, ?cause, "member disconnected");
                    self.emit(MeshEvent::PeerDown(peer_id)).await;
                }
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                debug!(?peer_id, "dial failed: {error}");
            }
            SwarmEvent::IncomingConnectionError {
                send_back_addr,
                error,
                ..
            } => {
                debug!(%send_back_addr, "incoming connection failed (wrong key?): {error}");
            }
            SwarmEvent::Behaviour(event) => self.behaviour_event(event).await,
            _ => {}
        }
    }

    async fn behaviour_event(&mut self, event: BehaviourEvent) {
        use libp2p::metrics::Recorder;
        match &event {
            BehaviourEvent::Gossipsub(e) => self.metrics.record(e),
            BehaviourEvent::Identify(e) => self.metrics.record(e),
            BehaviourEvent::Ping(e) => self.metrics.record(e),
            _ => {}
        }
        match event {
            BehaviourEvent::Gossipsub(gossipsub::Event::Subscribed { topic, .. })
                if topic == self.presence.topic().hash() =>
            {
                // A newcomer (or a reconnection): tell it who this node is.
                self.presence.make_due();
                self.announce_if_due(Instant::now());
            }
            BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            }) if message.topic == self.presence.topic().hash() => {
                let source = message.source.unwrap_or(propagation_source);
                let ok = self.admitted(&source) && self.presence_received(source, &message.data);
                if !ok {
                    warn!(%source, "rejected a presence announcement");
                }
                self.swarm
                    .behaviour_mut()
                    .gossipsub
                    .report_message_validation_result(
                        &message_id,
                        &propagation_source,
                        if ok {
                            gossipsub::MessageAcceptance::Accept
                        } else {
                            gossipsub::MessageAcceptance::Reject
                        },
                    );
            }
            BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            }) => {
                let source = message.source.unwrap_or(propagation_source);
                let topic = self
                    .topics
                    .iter()
                    .find(|(_, t)| t.hash() == message.topic)
                    .map(|(t, _)| *t);
                let ok = topic.is_some_and(|topic| {
                    self.admitted(&source) && (self.validate)(&source, topic, &message.data)
                });
                let verdict = if ok {
                    gossipsub::MessageAcceptance::Accept
                } else {
                    warn!(%source, "rejected a gossip payload");
                    gossipsub::MessageAcceptance::Reject
                };
                self.swarm
                    .behaviour_mut()
                    .gossipsub
                    .report_message_validation_result(&message_id, &propagation_source, verdict);
                if let (true, Some(topic)) = (ok, topic) {
                    self.emit(MeshEvent::Gossip {
                        topic,
                        source,
                        data: message.data,
                    })
                    .await;
                }
            }
            BehaviourEvent::Mdns(mdns::Event::Discovered(list)) => {
                let local = *self.swarm.local_peer_id();
                let now = Instant::now();
                for (peer, addr) in list {
                    if peer == local || !self.admitted(&peer) {
                        continue;
                    }
                    self.peers.learn(peer, Some(addr), now);
                }
                // Members that start together find each other at once.
                self.redial();
            }
            BehaviourEvent::Rpc(request_response::Event::Message { peer, message, .. }) => {
                match message {
                    request_response::Message::Request {
                        request, channel, ..
                    } => {
                        let id = self.next_inbound;
                        self.next_inbound += 1;
                        self.inbound.insert(id, channel);
                        let responder = Responder::new(id, self.responses_tx.clone());
                        self.emit(MeshEvent::Request {
                            peer,
                            data: request.0,
                            responder,
                        })
                        .await;
                    }
                    request_response::Message::Response {
                        request_id,
                        response,
                    } => {
                        if let Some(reply) = self.outbound.remove(&request_id) {
                            let _ = reply.send(Ok(response.0));
                        }
                    }
                }
            }
            BehaviourEvent::Rpc(request_response::Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            }) => {
                if let Some(reply) = self.outbound.remove(&request_id) {
                    let _ = reply.send(Err(MeshError::Request(peer, error)));
                }
            }
            BehaviourEvent::Rpc(request_response::Event::InboundFailure {
                peer, error, ..
            }) => {
                debug!(%peer, "inbound request failed: {error}");
            }
            BehaviourEvent::Ping(ping::Event {
                peer,
                connection,
                result: Err(e),
                ..
            }) => {
                // libp2p never closes a connection whose pings fail: a dead
                // link would linger as "connected".
                warn!(%peer, "ping failed ({e}): closing the connection");
                self.swarm.close_connection(connection);
            }
            BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. }) => {
                self.peers.heard_from(&peer_id, Instant::now());
                // Bounded and checked: a zone that is not valid is none.
                let zone = zone_of_agent(&info.agent_version);
                if self.peers.set_zone(&peer_id, zone.clone()) {
                    debug!(peer = %peer_id, zone = ?zone.as_ref().map(Zone::as_str), "member's zone");
                    self.emit(MeshEvent::PeerZone(peer_id, zone)).await;
                }
            }
            _ => {}
        }
    }

    /// Dials what is due (see [`Peers::due`]): known members that are not
    /// connected, and bootstrap addresses, each on its own backoff.
    fn redial(&mut self) {
        let local = *self.swarm.local_peer_id();
        for d in self.peers.due(Instant::now(), local) {
            if let Err(e) = self.swarm.dial(d) {
                debug!("dial not started: {e}");
            }
        }
    }
}
