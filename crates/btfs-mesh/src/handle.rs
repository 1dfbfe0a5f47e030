//! The caller's side of a running mesh: the cloneable [`Mesh`] handle, which
//! sends the event loop [`Command`]s with oneshot replies, the
//! [`MeshEvent`]s the loop sends back, and what status queries return.

use std::{collections::HashSet, net::IpAddr, sync::Arc};

use libp2p::{Multiaddr, PeerId, StreamProtocol};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::{
    config::{MAX_GOSSIP, Topic},
    error::MeshError,
    zone::Zone,
};

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
    /// A connected peer told its zone (or that it has none, or one that
    /// is not valid: `None`), after its `PeerUp` and whenever it changes.
    /// A zone is forgotten with the peer's last connection (`PeerDown`).
    PeerZone(PeerId, Option<Zone>),
}

/// Answers one inbound request.
#[derive(Debug)]
pub struct Responder {
    id: u64,
    tx: mpsc::Sender<(u64, Vec<u8>)>,
}

impl Responder {
    /// Answers inbound request `id` through `tx` (read by the event loop).
    pub(crate) fn new(id: u64, tx: mpsc::Sender<(u64, Vec<u8>)>) -> Self {
        Self { id, tx }
    }

    pub async fn respond(self, data: Vec<u8>) -> Result<(), MeshError> {
        self.tx
            .send((self.id, data))
            .await
            .map_err(|_| MeshError::Stopped)
    }
}

/// A connected or known peer, as `btfs status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerInfo {
    pub id: String,
    pub addresses: Vec<String>,
    pub connected: bool,
    /// Seconds since the peer was last connected or heard from.
    pub last_seen_secs: u64,
    /// The zone it told (`zone=`), while it is connected.
    #[serde(default)]
    pub zone: Option<String>,
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

/// What a handle asks of the event loop, with where to send the answer.
pub(crate) enum Command {
    Publish(Topic, Vec<u8>, oneshot::Sender<Result<(), MeshError>>),
    Request(PeerId, Vec<u8>, oneshot::Sender<Result<Vec<u8>, MeshError>>),
    Peers(oneshot::Sender<Vec<PeerInfo>>),
    ListenAddrs(oneshot::Sender<Vec<Multiaddr>>),
    Mdns(oneshot::Sender<MdnsStatus>),
    /// New members (`None`: every key holder); answers the peers cut off.
    SetMembers(Option<HashSet<PeerId>>, oneshot::Sender<Vec<PeerId>>),
    /// New bootstrap addresses; answers how many are new.
    SetBootstrap(Vec<Multiaddr>, oneshot::Sender<usize>),
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Command::Publish(..) => "Publish",
            Command::Request(..) => "Request",
            Command::Peers(..) => "Peers",
            Command::ListenAddrs(..) => "ListenAddrs",
            Command::Mdns(..) => "Mdns",
            Command::SetMembers(..) => "SetMembers",
            Command::SetBootstrap(..) => "SetBootstrap",
        })
    }
}

/// Handle on a running mesh.
#[derive(Clone)]
pub struct Mesh {
    local: PeerId,
    /// libp2p's own metrics, recorded by the event loop.
    metrics: Arc<libp2p::metrics::Registry>,
    commands: mpsc::Sender<Command>,
    streams: libp2p_stream::Control,
    stream_protocol: StreamProtocol,
}

impl Mesh {
    /// libp2p's own metrics (connections and swarm events,
    /// gossipsub, identify, ping), for the node's `GET /metrics`.
    pub fn metrics(&self) -> &Arc<libp2p::metrics::Registry> {
        &self.metrics
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
    /// A handle on the event loop that reads `commands`.
    pub(crate) fn new(
        local: PeerId,
        commands: mpsc::Sender<Command>,
        streams: libp2p_stream::Control,
        stream_protocol: StreamProtocol,
        metrics: Arc<libp2p::metrics::Registry>,
    ) -> Self {
        Self {
            local,
            metrics,
            commands,
            streams,
            stream_protocol,
        }
    }

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

    /// Admits only `members` from now on (`None`: every holder of the
    /// key), as `mount -o remount,members=` asks: a connected peer that is
    /// no longer admitted is disconnected at once and forgotten, and its
    /// gossip is refused. Returns the peers cut off.
    pub async fn set_members(
        &self,
        members: Option<HashSet<PeerId>>,
    ) -> Result<Vec<PeerId>, MeshError> {
        self.call(|tx| Command::SetMembers(members, tx)).await
    }

    /// Replaces the bootstrap addresses (`peers=`, `peers_file=`): new ones
    /// are dialled at once. Returns how many are new.
    pub async fn set_bootstrap(&self, addrs: Vec<Multiaddr>) -> Result<usize, MeshError> {
        self.call(|tx| Command::SetBootstrap(addrs, tx)).await
    }

    /// Opens a byte stream to a connected member (encrypted by the mesh's
    /// connection; the member accepts it through `incoming_streams`).
    pub async fn open_stream(&self, peer: PeerId) -> Result<libp2p::Stream, MeshError> {
        self.streams
            .clone()
            .open_stream(peer, self.stream_protocol.clone())
            .await
            .map_err(|e| MeshError::Stream(peer, e))
    }

    /// The byte streams members open to this node. Can be taken once.
    pub fn incoming_streams(&self) -> Result<libp2p_stream::IncomingStreams, MeshError> {
        self.streams
            .clone()
            .accept(self.stream_protocol.clone())
            .map_err(|_| MeshError::Transport("incoming streams already taken".into()))
    }
}
