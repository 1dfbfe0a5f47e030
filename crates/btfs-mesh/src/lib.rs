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
//!
//! Modules: `config` (settings, topics, limits), `handle` (the handle, its
//! commands and events), `swarm` (transport and behaviour), `event_loop`,
//! `peers` (known peers, bootstrap addresses, dial backoff), `presence`
//! (members announcing their addresses), `discovery` (mDNS that heals
//! itself), `error`, `zone` (zone names, and how members tell theirs in
//! the identify agent version), and [`wire`] (direct peer wires).

mod config;
mod discovery;
mod error;
mod event_loop;
mod handle;
mod peers;
mod presence;
mod swarm;
pub mod wire;
mod zone;

/// Mesh addresses, as `MeshConfig` takes them.
pub use libp2p::Multiaddr;

pub use config::{MAX_GOSSIP, MeshConfig, Topic, Validator};
pub use error::MeshError;
pub use handle::{MdnsStatus, Mesh, MeshEvent, PeerInfo, Responder};
pub use zone::{MAX_ZONE_LEN, Zone, ZoneError};

use std::sync::Arc;

use tokio::sync::mpsc;
use tracing::info;

use crate::{
    config::{COMMAND_CAP, EVENT_CAP},
    error::protocol,
    event_loop::EventLoop,
    presence::Presence,
};

/// Starts the mesh on the current tokio runtime. Returns the handle, the
/// event receiver and the event loop's task.
pub fn start(
    cfg: MeshConfig,
) -> Result<(Mesh, mpsc::Receiver<MeshEvent>, tokio::task::JoinHandle<()>), MeshError> {
    start_in_zone(cfg, None)
}

/// [`start`], telling the members that this node is in `zone` (they see it
/// as [`MeshEvent::PeerZone`] and in [`PeerInfo::zone`]). The zone is an
/// argument of its own, not a [`MeshConfig`] field, so that code building
/// a `MeshConfig` without one (the hostile-member tests) keeps compiling.
pub fn start_in_zone(
    cfg: MeshConfig,
    zone: Option<Zone>,
) -> Result<(Mesh, mpsc::Receiver<MeshEvent>, tokio::task::JoinHandle<()>), MeshError> {
    let mut swarm = swarm::build_swarm(&cfg, zone.as_ref())?;
    let topics: Vec<_> = Topic::ALL
        .iter()
        .map(|t| (*t, t.ident(&cfg.cluster)))
        .collect();
    let presence = Presence::new(&cfg.cluster);
    for t in topics.iter().map(|(_, t)| t).chain([presence.topic()]) {
        swarm
            .behaviour_mut()
            .gossipsub
            .subscribe(t)
            .map_err(|e| MeshError::Transport(Box::new(e)))?;
    }
    for addr in &cfg.listen {
        swarm
            .listen_on(addr.clone())
            .map_err(|e| MeshError::Listen(addr.clone(), e))?;
    }
    let local = *swarm.local_peer_id();
    let streams = swarm.behaviour().streams.new_control();
    let stream_protocol = protocol(&cfg.cluster, "bt/1")?;
    info!(peer = %local, psk = %cfg.psk.fingerprint(), cluster = %cfg.cluster, zone = ?zone.as_ref().map(Zone::as_str), "mesh starting");
    let (cmd_tx, cmd_rx) = mpsc::channel(COMMAND_CAP);
    let (ev_tx, ev_rx) = mpsc::channel(EVENT_CAP);
    let mut registry = libp2p::metrics::Registry::default();
    let metrics = libp2p::metrics::Metrics::new(&mut registry);
    let event_loop = EventLoop::new(swarm, &cfg, topics, presence, cmd_rx, ev_tx, metrics);
    let task = tokio::spawn(event_loop.run());
    Ok((
        Mesh::new(local, cmd_tx, streams, stream_protocol, Arc::new(registry)),
        ev_rx,
        task,
    ))
}

#[cfg(test)]
mod tests;
