//! The libp2p side of the mesh: the transport (TCP, pnet with the cluster's
//! pre-shared key, noise, yamux), the combined [`Behaviour`] and the swarm
//! built from them.

use std::time::Duration;

use libp2p::{
    Swarm, SwarmBuilder, Transport, allow_block_list,
    core::upgrade::Version,
    gossipsub, identify, mdns, noise, ping,
    pnet::PnetConfig,
    request_response::{self, ProtocolSupport},
    swarm::{NetworkBehaviour, behaviour::toggle::Toggle},
    tcp, yamux,
};
use serde::{Deserialize, Serialize};

use crate::{
    config::MeshConfig,
    discovery,
    error::{MeshError, protocol},
    zone::{self, Zone},
};

/// How often each connection is pinged, and how long a ping may take. A
/// link that stopped carrying anything (a partition keeps TCP connections
/// open, retransmitting on a doubling backoff) is closed after its second
/// failed ping (libp2p reports a connection's first failure silently):
/// about 12 s. Its member is then redialled every `LOST_MEMBER_RETRY`, so a
/// heal is seen within seconds instead of at TCP's next retransmission.
const PING_INTERVAL: Duration = Duration::from_secs(2);
const PING_TIMEOUT: Duration = Duration::from_secs(4);

/// Opaque bytes on the request-response protocol.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Payload(#[serde(with = "serde_bytes")] pub(crate) Vec<u8>);

/// Everything a member speaks.
#[derive(NetworkBehaviour)]
pub(crate) struct Behaviour {
    pub(crate) members: Toggle<allow_block_list::Behaviour<allow_block_list::AllowedPeers>>,
    pub(crate) gossipsub: gossipsub::Behaviour,
    pub(crate) mdns: Toggle<discovery::SupervisedMdns>,
    pub(crate) rpc: request_response::cbor::Behaviour<Payload, Payload>,
    pub(crate) identify: identify::Behaviour,
    pub(crate) ping: ping::Behaviour,
    /// Raw byte streams between members (the BitTorrent peer wire).
    pub(crate) streams: libp2p_stream::Behaviour,
}

/// The swarm of a node with `cfg`, not yet subscribed or listening.
/// Its identify agent version tells `zone` to the members.
pub(crate) fn build_swarm(
    cfg: &MeshConfig,
    zone: Option<&Zone>,
) -> Result<Swarm<Behaviour>, MeshError> {
    let psk = cfg.psk;
    let rpc_protocol = protocol(&cfg.cluster, "sync/1")?;
    let identify_protocol = format!("/btfs/{}/1", cfg.cluster);
    let agent = zone::agent_version(zone);
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
        .map_err(|e| MeshError::Transport(Box::new(e)))?
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
                    .build()?;
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
                    identify: identify::Behaviour::new(
                        identify::Config::new(identify_protocol, key.public())
                            .with_agent_version(agent),
                    ),
                    ping: ping::Behaviour::new(
                        ping::Config::new()
                            .with_interval(PING_INTERVAL)
                            .with_timeout(PING_TIMEOUT),
                    ),
                    streams: libp2p_stream::Behaviour::new(),
                })
            },
        )
        .map_err(|e| MeshError::Transport(Box::new(e)))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(3600)))
        .build();
    Ok(swarm)
}
