//! An in-memory network for in-process tests of replication: nodes are
//! linked and unlinked by the test, requests go to the peer's event loop
//! and come back through a oneshot, gossip is checked by the receiving
//! node's validator (as the mesh does) and delivered to every linked node.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use btfs_mesh::{MeshError, Topic, Validator};
use libp2p_identity::PeerId;
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};

use crate::{NetEvent, Reply, Transport};

/// Events waiting for a node, as in the mesh.
const EVENTS: usize = 1024;
/// Longest wait for an answer, as the mesh's request timeout.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

struct Endpoint {
    events: mpsc::Sender<NetEvent>,
    validate: Validator,
}

/// The network: who is on it, and which pairs are linked.
#[derive(Default)]
pub(crate) struct MemNet {
    nodes: Mutex<HashMap<PeerId, Endpoint>>,
    links: Mutex<HashSet<(PeerId, PeerId)>>,
}

fn pair(a: PeerId, b: PeerId) -> (PeerId, PeerId) {
    if a < b { (a, b) } else { (b, a) }
}

impl MemNet {
    /// Puts a node on the network; returns its transport and its events.
    pub(crate) fn join(
        self: &Arc<Self>,
        me: PeerId,
        validate: Validator,
    ) -> (MemTransport, mpsc::Receiver<NetEvent>) {
        let (tx, rx) = mpsc::channel(EVENTS);
        self.nodes.lock().insert(
            me,
            Endpoint {
                events: tx,
                validate,
            },
        );
        (
            MemTransport {
                me,
                net: self.clone(),
            },
            rx,
        )
    }

    /// Takes a node off the network (a crash): its links go down.
    pub(crate) async fn leave(&self, me: PeerId) {
        let linked: Vec<PeerId> = self.linked(me);
        for p in linked {
            self.unlink(me, p).await;
        }
        self.nodes.lock().remove(&me);
    }

    fn sender(&self, p: &PeerId) -> Option<mpsc::Sender<NetEvent>> {
        self.nodes.lock().get(p).map(|e| e.events.clone())
    }

    fn linked(&self, me: PeerId) -> Vec<PeerId> {
        self.links
            .lock()
            .iter()
            .filter_map(|&(a, b)| {
                if a == me {
                    Some(b)
                } else if b == me {
                    Some(a)
                } else {
                    None
                }
            })
            .collect()
    }

    /// Connects two nodes: both hear `PeerUp`.
    pub(crate) async fn link(&self, a: PeerId, b: PeerId) {
        if !self.links.lock().insert(pair(a, b)) {
            return;
        }
        for (me, other) in [(a, b), (b, a)] {
            if let Some(tx) = self.sender(&me) {
                let _ = tx.send(NetEvent::PeerUp(other, None)).await;
            }
        }
    }

    /// Cuts the link between two nodes: both hear `PeerDown`.
    pub(crate) async fn unlink(&self, a: PeerId, b: PeerId) {
        if !self.links.lock().remove(&pair(a, b)) {
            return;
        }
        for (me, other) in [(a, b), (b, a)] {
            if let Some(tx) = self.sender(&me) {
                let _ = tx.send(NetEvent::PeerDown(other)).await;
            }
        }
    }
}

/// One node's side of the in-memory network.
#[derive(Clone)]
pub(crate) struct MemTransport {
    me: PeerId,
    net: Arc<MemNet>,
}

impl Transport for MemTransport {
    async fn request(&self, peer: PeerId, data: Vec<u8>) -> Result<Vec<u8>, MeshError> {
        let linked = self.net.links.lock().contains(&pair(self.me, peer));
        let to = self.net.sender(&peer).filter(|_| linked);
        let Some(to) = to else {
            return Err(MeshError::NoPeers);
        };
        let (tx, rx) = oneshot::channel();
        let ask = NetEvent::Request {
            peer: self.me,
            data,
            reply: Reply::Local(tx),
        };
        to.send(ask).await.map_err(|_| MeshError::Stopped)?;
        match tokio::time::timeout(REQUEST_TIMEOUT, rx).await {
            Ok(Ok(answer)) => Ok(answer),
            _ => Err(MeshError::Stopped),
        }
    }

    async fn publish(&self, topic: Topic, data: Vec<u8>) -> Result<(), MeshError> {
        let peers = self.net.linked(self.me);
        if peers.is_empty() {
            return Err(MeshError::NoPeers);
        }
        for p in peers {
            let to = {
                let nodes = self.net.nodes.lock();
                nodes
                    .get(&p)
                    .filter(|e| (e.validate)(&self.me, topic, &data))
                    .map(|e| e.events.clone())
            };
            if let Some(to) = to {
                let gossip = NetEvent::Gossip {
                    topic,
                    source: self.me,
                    data: data.clone(),
                };
                let _ = to.send(gossip).await;
            }
        }
        Ok(())
    }
}
