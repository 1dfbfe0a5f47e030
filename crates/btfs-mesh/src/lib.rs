//! The private mesh of a btfs cluster (libp2p 0.57).
//!
//! Transport: TCP, wrapped in pnet with the cluster's pre-shared key, then noise
//! and yamux. A node without the key cannot complete a handshake, so it sees
//! nothing and is seen by nobody. Discovery: mDNS on the LAN (optional) and
//! static bootstrap addresses, redialled with backoff. No DHT, no relay.
//!
//! The mesh carries opaque bytes; what they mean (signed records, sync
//! messages) is the caller's business:
//! * [`Mesh::publish`] gossips to every member (gossipsub, one topic per
//!   cluster; payloads are checked by [`MeshConfig::validate`] on every hop
//!   before they are delivered or forwarded);
//! * [`Mesh::request`] asks one peer and waits for its answer
//!   (request-response, CBOR framing).
//!
//! Shape: a cloneable handle ([`Mesh`]) sends commands with oneshot replies to
//! an event loop that owns the swarm; the loop sends [`MeshEvent`]s to one
//! receiver. Every channel is bounded. The loop ends when every handle is
//! dropped.

mod discovery;
pub mod wire;

/// Mesh addresses, as `MeshConfig` takes them.
pub use libp2p::Multiaddr;

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    str::FromStr,
    sync::Arc,
    time::{Duration, Instant},
};

use futures::StreamExt;
use libp2p::{
    PeerId, StreamProtocol, Swarm, SwarmBuilder, Transport, allow_block_list,
    core::upgrade::Version,
    gossipsub, identify,
    identity::Keypair,
    mdns,
    multiaddr::Protocol,
    noise, ping,
    pnet::{PnetConfig, PreSharedKey},
    request_response::{self, OutboundRequestId, ProtocolSupport, ResponseChannel},
    swarm::{NetworkBehaviour, SwarmEvent, behaviour::toggle::Toggle, dial_opts::DialOpts},
    tcp, yamux,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

/// Commands waiting for the event loop.
const COMMAND_CAP: usize = 256;
/// Events waiting for the caller; the loop waits when it is full.
const EVENT_CAP: usize = 1024;
/// Answers to inbound requests waiting to be sent.
const RESPONSE_CAP: usize = 256;
/// Largest gossip payload accepted by `publish`: well below gossipsub's
/// 65,536-byte frame limit, which the receiver applies to the whole frame
/// (an oversized frame silently stalls the connection).
pub const MAX_GOSSIP: usize = 60 * 1024;
/// How often unconnected peers and bootstrap addresses are considered for a
/// redial.
const REDIAL_TICK: Duration = Duration::from_secs(1);
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Addresses kept for one peer (mDNS and presence add to them).
const MAX_ADDRS_PER_PEER: usize = 8;
/// Peers kept that are not connected (every admitted key holder can make
/// new identities; the map must not grow with them).
const MAX_KNOWN: usize = 4096;
/// Presence announcements go out at most this often (one is due whenever a
/// member subscribes, so that newcomers learn of everyone).
const PRESENCE_MIN_GAP: Duration = Duration::from_secs(1);
/// And at least this often, so that a member that missed one learns later.
const PRESENCE_INTERVAL: Duration = Duration::from_secs(60);
/// Largest presence announcement accepted.
const MAX_PRESENCE: usize = 2048;

/// Errors of the mesh.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error("cannot build the mesh transport: {0}")]
    Transport(String),
    #[error("cannot listen on {0}: {1}")]
    Listen(Multiaddr, String),
    #[error("gossip payload of {0} bytes exceeds the {MAX_GOSSIP}-byte limit")]
    TooLarge(usize),
    #[error("no member is connected")]
    NoPeers,
    #[error("publish failed: {0}")]
    Publish(String),
    #[error("request to {0} failed: {1}")]
    Request(PeerId, String),
    #[error("stream to {0} failed: {1}")]
    Stream(PeerId, String),
    #[error("the mesh has stopped")]
    Stopped,
}

/// An error and its sources on one line (libp2p's own messages are terse).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !text.is_empty() && !out.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
        source = s.source();
    }
    if out.is_empty() {
        format!("{e:?}")
    } else {
        out
    }
}

/// Decides whether a gossip payload from `source` on a topic may be
/// delivered and forwarded (e.g. checks a record's signature and author).
pub type Validator = Arc<dyn Fn(&PeerId, Topic, &[u8]) -> bool + Send + Sync>;

/// The gossip topics of a cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Topic {
    /// Signed metadata records.
    Records,
    /// Which content a member holds (hints for finding peers).
    Holdings,
}

impl Topic {
    const ALL: [Topic; 2] = [Topic::Records, Topic::Holdings];

    fn ident(self, cluster: &str) -> gossipsub::IdentTopic {
        let name = match self {
            Topic::Records => "records",
            Topic::Holdings => "holdings",
        };
        gossipsub::IdentTopic::new(format!("btfs/{cluster}/{name}/1"))
    }
}

/// Settings of one node's mesh.
#[derive(Clone)]
pub struct MeshConfig {
    /// Cluster name: part of the topic and protocol names, so that two
    /// clusters never mix even on one network.
    pub cluster: String,
    pub keypair: Keypair,
    pub psk: PreSharedKey,
    /// Addresses to listen on, e.g. `/ip4/0.0.0.0/tcp/4001`.
    pub listen: Vec<Multiaddr>,
    /// Static peers to dial (and redial) in other subnets or datacenters.
    pub bootstrap: Vec<Multiaddr>,
    /// Discover peers on the LAN with mDNS.
    pub mdns: bool,
    /// If set, only these peers may connect (the key alone admits any holder).
    pub members: Option<HashSet<PeerId>>,
    pub validate: Validator,
}

impl std::fmt::Debug for MeshConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshConfig")
            .field("cluster", &self.cluster)
            .field("peer", &self.keypair.public().to_peer_id())
            .field("psk", &self.psk.fingerprint().to_string())
            .field("listen", &self.listen)
            .field("bootstrap", &self.bootstrap)
            .field("mdns", &self.mdns)
            .finish_non_exhaustive()
    }
}

/// Opaque bytes on the request-response protocol.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Payload(#[serde(with = "serde_bytes")] Vec<u8>);

#[derive(NetworkBehaviour)]
struct Behaviour {
    members: Toggle<allow_block_list::Behaviour<allow_block_list::AllowedPeers>>,
    gossipsub: gossipsub::Behaviour,
    mdns: Toggle<discovery::SupervisedMdns>,
    rpc: request_response::cbor::Behaviour<Payload, Payload>,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    /// Raw byte streams between members (the BitTorrent peer wire).
    streams: libp2p_stream::Behaviour,
}

/// What the mesh tells its owner.
#[derive(Debug)]
pub enum MeshEvent {
    /// A validated gossip payload.
    Gossip {
        topic: Topic,
        source: PeerId,
        data: Vec<u8>,
    },
    /// A peer asks something; answer with [`Responder::respond`].
    Request {
        peer: PeerId,
        data: Vec<u8>,
        responder: Responder,
    },
    /// The first connection to a peer is up (time to sync with it), with
    /// the peer's IP address as that connection sees it.
    PeerUp(PeerId, Option<IpAddr>),
    /// The last connection to a peer is gone.
    PeerDown(PeerId),
}

/// Answers one inbound request.
#[derive(Debug)]
pub struct Responder {
    id: u64,
    tx: mpsc::Sender<(u64, Vec<u8>)>,
}

impl Responder {
    pub async fn respond(self, data: Vec<u8>) -> Result<(), MeshError> {
        self.tx
            .send((self.id, data))
            .await
            .map_err(|_| MeshError::Stopped)
    }
}

/// A connected or known peer, as `btfs status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct PeerInfo {
    pub id: String,
    pub addresses: Vec<String>,
    pub connected: bool,
    /// Seconds since the peer was last connected or heard from.
    pub last_seen_secs: u64,
}

/// Whether mDNS runs and where, as `btfs status` shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MdnsStatus {
    /// `mdns=on`.
    pub enabled: bool,
    /// At least one instance is alive (asking and answering).
    pub running: bool,
    /// The IPv4 addresses of the interfaces it was last started on.
    pub interfaces: Vec<String>,
    /// Instances alive: one per interface address it runs on.
    pub instances: usize,
    /// Nodes it has found and not expired (members or not).
    pub discovered: usize,
    /// Times it was restarted because it had found no member.
    pub restarts: u64,
}

enum Command {
    Publish(Topic, Vec<u8>, oneshot::Sender<Result<(), MeshError>>),
    Request(PeerId, Vec<u8>, oneshot::Sender<Result<Vec<u8>, MeshError>>),
    Peers(oneshot::Sender<Vec<PeerInfo>>),
    ListenAddrs(oneshot::Sender<Vec<Multiaddr>>),
    Mdns(oneshot::Sender<MdnsStatus>),
}

/// Handle on a running mesh.
#[derive(Clone)]
pub struct Mesh {
    local: PeerId,
    commands: mpsc::Sender<Command>,
    streams: libp2p_stream::Control,
    stream_protocol: StreamProtocol,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Command::Publish(..) => "Publish",
            Command::Request(..) => "Request",
            Command::Peers(..) => "Peers",
            Command::ListenAddrs(..) => "ListenAddrs",
            Command::Mdns(..) => "Mdns",
        })
    }
}

impl std::fmt::Debug for Mesh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mesh")
            .field("local", &self.local)
            .finish_non_exhaustive()
    }
}

impl Mesh {
    pub fn local_peer_id(&self) -> PeerId {
        self.local
    }

    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, MeshError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(make(tx))
            .await
            .map_err(|_| MeshError::Stopped)?;
        rx.await.map_err(|_| MeshError::Stopped)
    }

    /// Gossips `data` to the cluster. `NoPeers` is normal while alone: the
    /// caller keeps the data and anti-entropy delivers it later.
    pub async fn publish(&self, data: Vec<u8>) -> Result<(), MeshError> {
        self.publish_to(Topic::Records, data).await
    }

    /// Gossips `data` on `topic`.
    pub async fn publish_to(&self, topic: Topic, data: Vec<u8>) -> Result<(), MeshError> {
        if data.len() > MAX_GOSSIP {
            return Err(MeshError::TooLarge(data.len()));
        }
        self.call(|tx| Command::Publish(topic, data, tx)).await?
    }

    /// Sends `data` to `peer` and waits for its answer (bounded by the
    /// protocol's request timeout).
    pub async fn request(&self, peer: PeerId, data: Vec<u8>) -> Result<Vec<u8>, MeshError> {
        self.call(|tx| Command::Request(peer, data, tx)).await?
    }

    pub async fn peers(&self) -> Result<Vec<PeerInfo>, MeshError> {
        self.call(Command::Peers).await
    }

    pub async fn listen_addrs(&self) -> Result<Vec<Multiaddr>, MeshError> {
        self.call(Command::ListenAddrs).await
    }

    /// Whether mDNS runs, and on which interfaces.
    pub async fn mdns_status(&self) -> Result<MdnsStatus, MeshError> {
        self.call(Command::Mdns).await
    }

    /// Opens a byte stream to a connected member (encrypted by the mesh's
    /// connection; the member accepts it through `incoming_streams`).
    pub async fn open_stream(&self, peer: PeerId) -> Result<libp2p::Stream, MeshError> {
        self.streams
            .clone()
            .open_stream(peer, self.stream_protocol.clone())
            .await
            .map_err(|e| MeshError::Stream(peer, e.to_string()))
    }

    /// The byte streams members open to this node. Can be taken once.
    pub fn incoming_streams(&self) -> Result<libp2p_stream::IncomingStreams, MeshError> {
        self.streams
            .clone()
            .accept(self.stream_protocol.clone())
            .map_err(|_| MeshError::Transport("incoming streams already taken".into()))
    }
}

struct Known {
    addrs: Vec<Multiaddr>,
    connections: usize,
    last_seen: Instant,
    backoff: Duration,
    next_dial: Instant,
}

impl Known {
    fn new(now: Instant) -> Self {
        Self {
            addrs: Vec::new(),
            connections: 0,
            last_seen: now,
            backoff: BACKOFF_MIN,
            next_dial: now,
        }
    }
}

struct Bootstrap {
    addr: Multiaddr,
    backoff: Duration,
    next_dial: Instant,
}

struct EventLoop {
    swarm: Swarm<Behaviour>,
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
    known: HashMap<PeerId, Known>,
    bootstrap: Vec<Bootstrap>,
    /// Restarts mDNS until it finds someone (`None` with `mdns=off`).
    mdns: Option<discovery::Supervisor>,
    /// Members announce their own listen addresses here, signed by
    /// gossipsub, so that a member that knows one other learns them all.
    presence: gossipsub::IdentTopic,
    presence_due: bool,
    presence_last: Option<Instant>,
}

/// First line of a presence announcement, before its time stamp.
const PRESENCE_HEADER: &str = "btfs-presence/1";

/// Whether `a` is an address a member may be dialled at: one IP (not
/// unspecified, multicast or broadcast) and one non-zero TCP port, optionally
/// followed by a peer id. Nothing else (no DNS, no relays).
fn dialable(a: &Multiaddr) -> bool {
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

/// The addresses of a presence announcement (peer ids stripped), or `None`
/// if anything in it is malformed, too long or not [`dialable`].
fn parse_presence(data: &[u8]) -> Option<Vec<Multiaddr>> {
    if data.len() > MAX_PRESENCE {
        return None;
    }
    let text = std::str::from_utf8(data).ok()?;
    let mut lines = text.split('\n');
    let stamp = lines
        .next()?
        .strip_prefix(PRESENCE_HEADER)?
        .strip_prefix(' ')?;
    stamp.parse::<u64>().ok()?;
    let mut addrs = Vec::new();
    for line in lines {
        let a = Multiaddr::from_str(line).ok()?;
        if !dialable(&a) || addrs.len() == MAX_ADDRS_PER_PEER {
            return None;
        }
        addrs.push(a.iter().take(2).collect());
    }
    (!addrs.is_empty()).then_some(addrs)
}

fn protocol(cluster: &str, what: &str) -> Result<StreamProtocol, MeshError> {
    StreamProtocol::try_from_owned(format!("/btfs/{cluster}/{what}"))
        .map_err(|e| MeshError::Transport(format!("protocol name for cluster {cluster:?}: {e}")))
}

fn build_swarm(cfg: &MeshConfig) -> Result<Swarm<Behaviour>, MeshError> {
    let psk = cfg.psk;
    let t = |e: &dyn std::fmt::Display| MeshError::Transport(e.to_string());
    let rpc_protocol = protocol(&cfg.cluster, "sync/1")?;
    let identify_protocol = format!("/btfs/{}/1", cfg.cluster);
    let members = cfg.members.clone();
    let use_mdns = cfg.mdns;
    let swarm = SwarmBuilder::with_existing_identity(cfg.keypair.clone())
        .with_tokio()
        .with_other_transport(
            |key| -> Result<_, Box<dyn std::error::Error + Send + Sync>> {
                let noise = noise::Config::new(key)?;
                Ok(
                    tcp::tokio::Transport::new(tcp::Config::default().nodelay(true))
                        .and_then(move |socket, _| PnetConfig::new(psk).handshake(socket))
                        .upgrade(Version::V1Lazy)
                        .authenticate(noise)
                        .multiplex(yamux::Config::default()),
                )
            },
        )
        .map_err(|e| t(&e))?
        .with_behaviour(
            |key| -> Result<Behaviour, Box<dyn std::error::Error + Send + Sync>> {
                let gossip_cfg = gossipsub::ConfigBuilder::default()
                    .heartbeat_initial_delay(Duration::from_millis(100))
                    .heartbeat_interval(Duration::from_secs(1))
                    .flood_publish(true)
                    .max_transmit_size(65_536)
                    .validation_mode(gossipsub::ValidationMode::Strict)
                    .validate_messages()
                    .message_id_fn(|m: &gossipsub::Message| {
                        gossipsub::MessageId::from(blake3::hash(&m.data).as_bytes().to_vec())
                    })
                    .build()
                    .map_err(|e| e.to_string())?;
                let gossipsub = gossipsub::Behaviour::new(
                    gossipsub::MessageAuthenticity::Signed(key.clone()),
                    gossip_cfg,
                )?;
                let mdns = if use_mdns {
                    Some(discovery::SupervisedMdns::new(
                        mdns::Config {
                            ttl: Duration::from_secs(60),
                            query_interval: Duration::from_secs(5),
                            ..mdns::Config::default()
                        },
                        key.public().to_peer_id(),
                    )?)
                } else {
                    None
                };
                let members = members.map(|m| {
                    let mut b =
                        allow_block_list::Behaviour::<allow_block_list::AllowedPeers>::default();
                    for p in m {
                        b.allow_peer(p);
                    }
                    b
                });
                Ok(Behaviour {
                    members: members.into(),
                    gossipsub,
                    mdns: mdns.into(),
                    rpc: request_response::cbor::Behaviour::new(
                        [(rpc_protocol, ProtocolSupport::Full)],
                        request_response::Config::default()
                            .with_request_timeout(Duration::from_secs(30)),
                    ),
                    identify: identify::Behaviour::new(identify::Config::new(
                        identify_protocol,
                        key.public(),
                    )),
                    ping: ping::Behaviour::new(
                        ping::Config::new()
                            .with_interval(Duration::from_secs(5))
                            .with_timeout(Duration::from_secs(10)),
                    ),
                    streams: libp2p_stream::Behaviour::new(),
                })
            },
        )
        .map_err(|e| t(&e))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(3600)))
        .build();
    Ok(swarm)
}

/// Starts the mesh on the current tokio runtime. Returns the handle, the
/// event receiver and the event loop's task.
pub fn start(
    cfg: MeshConfig,
) -> Result<(Mesh, mpsc::Receiver<MeshEvent>, tokio::task::JoinHandle<()>), MeshError> {
    let mut swarm = build_swarm(&cfg)?;
    let topics: Vec<_> = Topic::ALL
        .iter()
        .map(|t| (*t, t.ident(&cfg.cluster)))
        .collect();
    let presence = gossipsub::IdentTopic::new(format!("btfs/{}/presence/1", cfg.cluster));
    for t in topics.iter().map(|(_, t)| t).chain([&presence]) {
        swarm
            .behaviour_mut()
            .gossipsub
            .subscribe(t)
            .map_err(|e| MeshError::Transport(e.to_string()))?;
    }
    for addr in &cfg.listen {
        swarm
            .listen_on(addr.clone())
            .map_err(|e| MeshError::Listen(addr.clone(), error_chain(&e)))?;
    }
    let local = *swarm.local_peer_id();
    let streams = swarm.behaviour().streams.new_control();
    let stream_protocol = protocol(&cfg.cluster, "bt/1")?;
    info!(peer = %local, psk = %cfg.psk.fingerprint(), cluster = %cfg.cluster, "mesh starting");
    let (cmd_tx, cmd_rx) = mpsc::channel(COMMAND_CAP);
    let (ev_tx, ev_rx) = mpsc::channel(EVENT_CAP);
    let (resp_tx, resp_rx) = mpsc::channel(RESPONSE_CAP);
    let now = Instant::now();
    let event_loop = EventLoop {
        swarm,
        topics,
        validate: cfg.validate.clone(),
        members: cfg.members.clone(),
        commands: cmd_rx,
        events: ev_tx,
        responses_tx: resp_tx,
        responses: resp_rx,
        inbound: HashMap::new(),
        next_inbound: 0,
        outbound: HashMap::new(),
        known: HashMap::new(),
        bootstrap: cfg
            .bootstrap
            .iter()
            .map(|a| Bootstrap {
                addr: a.clone(),
                backoff: BACKOFF_MIN,
                next_dial: now,
            })
            .collect(),
        mdns: cfg
            .mdns
            .then(|| discovery::Supervisor::new(now, discovery::multicast_interfaces())),
        presence,
        presence_due: true,
        presence_last: None,
    };
    let task = tokio::spawn(event_loop.run());
    Ok((
        Mesh {
            local,
            commands: cmd_tx,
            streams,
            stream_protocol,
        },
        ev_rx,
        task,
    ))
}

impl EventLoop {
    async fn run(mut self) {
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
                    if self.presence_last.is_none_or(|t| now >= t + PRESENCE_INTERVAL) {
                        self.presence_due = true;
                    }
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
                    let _ = reply.send(Err(MeshError::Publish(format!("no topic {topic:?}"))));
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
                    Err(e) => Err(MeshError::Publish(e.to_string())),
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
                let now = Instant::now();
                let mut peers: Vec<PeerInfo> = self
                    .known
                    .iter()
                    .map(|(id, k)| PeerInfo {
                        id: id.to_string(),
                        addresses: k.addrs.iter().map(ToString::to_string).collect(),
                        connected: k.connections > 0,
                        last_seen_secs: now.duration_since(k.last_seen).as_secs(),
                    })
                    .collect();
                peers.sort_by(|a, b| a.id.cmp(&b.id));
                let _ = reply.send(peers);
            }
            Command::ListenAddrs(reply) => {
                let _ = reply.send(self.swarm.listeners().cloned().collect());
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
            .filter(|p| self.known.get(p).is_some_and(|k| k.connections > 0))
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
        if !self.presence_due
            || self
                .presence_last
                .is_some_and(|t| now < t + PRESENCE_MIN_GAP)
        {
            return;
        }
        let all: Vec<&Multiaddr> = self.swarm.listeners().filter(|a| dialable(a)).collect();
        // Loopback only where there is nothing else (one machine, tests):
        // elsewhere it would send members to their own machine.
        let loopback = |a: &Multiaddr| match a.iter().next() {
            Some(Protocol::Ip4(ip)) => ip.is_loopback(),
            Some(Protocol::Ip6(ip)) => ip.is_loopback(),
            _ => false,
        };
        let only_loopback = all.iter().all(|a| loopback(a));
        let addrs: Vec<String> = all
            .into_iter()
            .filter(|a| only_loopback || !loopback(a))
            .take(MAX_ADDRS_PER_PEER)
            .map(ToString::to_string)
            .collect();
        if addrs.is_empty() {
            return;
        }
        // The stamp makes every announcement a new gossip message (ids are
        // content hashes).
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis();
        let data = format!("{PRESENCE_HEADER} {stamp}\n{}", addrs.join("\n"));
        match self
            .swarm
            .behaviour_mut()
            .gossipsub
            .publish(self.presence.clone(), data.into_bytes())
        {
            Ok(_) | Err(gossipsub::PublishError::Duplicate) => {
                self.presence_due = false;
                self.presence_last = Some(now);
            }
            // Nobody to tell yet: a subscription will make it due again.
            Err(gossipsub::PublishError::NoPeersSubscribedToTopic) => {}
            Err(e) => debug!("presence not published: {e}"),
        }
    }

    /// A member's presence announcement: checked, then its addresses are
    /// learnt and dialled. Returns whether it was valid.
    fn presence_received(&mut self, source: PeerId, data: &[u8]) -> bool {
        let Some(addrs) = parse_presence(data) else {
            return false;
        };
        if source == *self.swarm.local_peer_id() || !self.admitted(&source) {
            return true;
        }
        for a in addrs {
            self.learn(source, Some(a));
        }
        self.redial();
        true
    }

    async fn emit(&mut self, event: MeshEvent) {
        if self.events.send(event).await.is_err() {
            debug!("mesh event receiver dropped");
        }
    }

    /// Records `peer` (and `addr`), within `MAX_KNOWN` peers and
    /// `MAX_ADDRS_PER_PEER` addresses each (the newest kept).
    fn learn(&mut self, peer: PeerId, addr: Option<Multiaddr>) -> Option<&mut Known> {
        let now = Instant::now();
        if !self.known.contains_key(&peer) && self.known.len() >= MAX_KNOWN {
            debug!(%peer, "not recorded: {MAX_KNOWN} peers known already");
            return None;
        }
        let k = self.known.entry(peer).or_insert_with(|| Known::new(now));
        if let Some(addr) = addr.filter(|a| !k.addrs.contains(a)) {
            if k.addrs.len() >= MAX_ADDRS_PER_PEER {
                k.addrs.remove(0);
            }
            k.addrs.push(addr);
        }
        Some(k)
    }

    async fn swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => info!(%address, "mesh listening"),
            SwarmEvent::ConnectionEstablished {
                peer_id,
                endpoint,
                num_established,
                ..
            } => {
                let remote = endpoint.get_remote_address().clone();
                let dialed = endpoint.is_dialer();
                self.learn(peer_id, dialed.then_some(remote.clone()));
                // A connection is recorded even beyond `MAX_KNOWN`.
                let k = self
                    .known
                    .entry(peer_id)
                    .or_insert_with(|| Known::new(Instant::now()));
                k.connections = num_established.get() as usize;
                k.last_seen = Instant::now();
                k.backoff = BACKOFF_MIN;
                for b in &mut self.bootstrap {
                    if b.addr == remote {
                        b.backoff = BACKOFF_MIN;
                    }
                }
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
                if let Some(k) = self.known.get_mut(&peer_id) {
                    k.connections = num_established as usize;
                    k.last_seen = Instant::now();
                }
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
        match event {
            BehaviourEvent::Gossipsub(gossipsub::Event::Subscribed { topic, .. })
                if topic == self.presence.hash() =>
            {
                // A newcomer (or a reconnection): tell it who this node is.
                self.presence_due = true;
                self.announce_if_due(Instant::now());
            }
            BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            }) if message.topic == self.presence.hash() => {
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
                for (peer, addr) in list {
                    if peer == local || !self.admitted(&peer) {
                        continue;
                    }
                    self.learn(peer, Some(addr));
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
                        let responder = Responder {
                            id,
                            tx: self.responses_tx.clone(),
                        };
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
                    let _ = reply.send(Err(MeshError::Request(peer, error.to_string())));
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
            BehaviourEvent::Identify(identify::Event::Received { peer_id, .. }) => {
                if let Some(k) = self.known.get_mut(&peer_id) {
                    k.last_seen = Instant::now();
                }
            }
            _ => {}
        }
    }

    /// Dials known members that are not connected, and bootstrap addresses,
    /// each with its own exponential backoff. mDNS neither dials nor
    /// re-announces after a short outage, so this is what reconnects.
    ///
    /// Every dial takes a new local port. With the default (the listen port
    /// reused), two members that find each other in the same instant dial
    /// 4410 to 4410 both ways: TCP merges that into one connection on which
    /// both sides act as the dialer, the handshake fails on both, and the
    /// retries, one backoff step later on both sides, collide again.
    fn redial(&mut self) {
        let now = Instant::now();
        let local = *self.swarm.local_peer_id();
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
            k.next_dial = now + k.backoff;
            k.backoff = (k.backoff * 2).min(BACKOFF_MAX);
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
            b.next_dial = now + b.backoff;
            b.backoff = (b.backoff * 2).min(BACKOFF_MAX);
        }
        for d in dials {
            if let Err(e) = self.swarm.dial(d) {
                debug!("dial not started: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests;
