//! What a node's mesh is started with ([`MeshConfig`]), the gossip topics
//! of a cluster, and the mesh's channel capacities and size limits.

use std::{collections::HashSet, sync::Arc, time::Duration};

use backon::ExponentialBuilder;
use libp2p::{Multiaddr, PeerId, gossipsub, identity::Keypair, pnet::PreSharedKey};

/// First delay of the mesh's retries: a redial of a peer or an address, a
/// restart of mDNS while it has found no member.
pub(crate) const RETRY_MIN: Duration = Duration::from_secs(1);
/// Longest delay between retries, and their period once it is reached.
pub(crate) const RETRY_MAX: Duration = Duration::from_secs(30);
/// The mesh's retry delays: 1 s doubling to 30 s, then every 30 s, for ever.
pub(crate) const RETRY: ExponentialBuilder = ExponentialBuilder::new()
    .with_factor(2.0)
    .with_min_delay(RETRY_MIN)
    .with_max_delay(RETRY_MAX)
    .without_max_times();

/// Commands waiting for the event loop.
pub(crate) const COMMAND_CAP: usize = 256;
/// Events waiting for the caller; the loop waits when it is full.
pub(crate) const EVENT_CAP: usize = 1024;
/// Answers to inbound requests waiting to be sent.
pub(crate) const RESPONSE_CAP: usize = 256;
/// Largest gossip payload accepted by `publish`: well below gossipsub's
/// 65,536-byte frame limit, which the receiver applies to the whole frame
/// (an oversized frame silently stalls the connection).
pub const MAX_GOSSIP: usize = 60 * 1024;

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
    pub(crate) const ALL: [Topic; 2] = [Topic::Records, Topic::Holdings];

    pub(crate) fn ident(self, cluster: &str) -> gossipsub::IdentTopic {
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
