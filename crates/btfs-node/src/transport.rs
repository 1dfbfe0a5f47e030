//! The seam between replication and the network: what the node asks of the
//! mesh (requests, gossip) and what it hears from it (peers, gossip,
//! requests). The mesh implements it for real; the tests have an in-memory
//! network of their own (`tests::memnet`).

use std::net::IpAddr;

use btfs_mesh::{Mesh, MeshError, MeshEvent, Responder, Topic, Zone};
use libp2p_identity::PeerId;
use tokio::sync::oneshot;

/// What the node hears from its transport.
#[derive(Debug)]
pub enum NetEvent {
    /// A validated gossip payload.
    Gossip {
        topic: Topic,
        source: PeerId,
        data: Vec<u8>,
    },
    /// A peer asks something; answer through `reply`.
    Request {
        peer: PeerId,
        data: Vec<u8>,
        reply: Reply,
    },
    /// The first connection to a peer is up, with the peer's IP as that
    /// connection sees it.
    PeerUp(PeerId, Option<IpAddr>),
    /// The last connection to a peer is gone.
    PeerDown(PeerId),
    /// A connected peer told its zone (`None`: none, or one not valid).
    PeerZone(PeerId, Option<Zone>),
}

/// Where the answer to a request goes.
#[derive(Debug)]
pub enum Reply {
    Mesh(Responder),
    Local(oneshot::Sender<Vec<u8>>),
}

impl Reply {
    pub async fn send(self, data: Vec<u8>) -> Result<(), MeshError> {
        match self {
            Reply::Mesh(r) => r.respond(data).await,
            Reply::Local(tx) => tx.send(data).map_err(|_| MeshError::Stopped),
        }
    }
}

impl From<MeshEvent> for NetEvent {
    fn from(e: MeshEvent) -> Self {
        match e {
            MeshEvent::Gossip {
                topic,
                source,
                data,
            } => NetEvent::Gossip {
                topic,
                source,
                data,
            },
            MeshEvent::Request {
                peer,
                data,
                responder,
            } => NetEvent::Request {
                peer,
                data,
                reply: Reply::Mesh(responder),
            },
            MeshEvent::PeerUp(p, ip) => NetEvent::PeerUp(p, ip),
            MeshEvent::PeerDown(p) => NetEvent::PeerDown(p),
            MeshEvent::PeerZone(p, zone) => NetEvent::PeerZone(p, zone),
        }
    }
}

/// What replication asks of the network.
pub trait Transport: Clone + Send + Sync + 'static {
    /// Asks `peer` and waits for its answer.
    fn request(
        &self,
        peer: PeerId,
        data: Vec<u8>,
    ) -> impl Future<Output = Result<Vec<u8>, MeshError>> + Send;

    /// Gossips `data` on `topic` to every member.
    fn publish(
        &self,
        topic: Topic,
        data: Vec<u8>,
    ) -> impl Future<Output = Result<(), MeshError>> + Send;
}

impl Transport for Mesh {
    async fn request(&self, peer: PeerId, data: Vec<u8>) -> Result<Vec<u8>, MeshError> {
        Mesh::request(self, peer, data).await
    }

    async fn publish(&self, topic: Topic, data: Vec<u8>) -> Result<(), MeshError> {
        self.publish_to(topic, data).await
    }
}
