//! The errors of the mesh ([`MeshError`]) and how their causes are shown.

use libp2p::{Multiaddr, PeerId, StreamProtocol, TransportError, request_response};

use crate::config::MAX_GOSSIP;

/// A cause of a [`MeshError`] of any type.
type Cause = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Errors of the mesh. Each keeps its cause as its `source`; the message
/// shows it as well.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error("cannot build the mesh transport: {0}")]
    Transport(#[source] Cause),
    #[error("cannot listen on {0}: {chain}", chain = error_chain(.1))]
    Listen(Multiaddr, #[source] TransportError<std::io::Error>),
    #[error("gossip payload of {0} bytes exceeds the {MAX_GOSSIP}-byte limit")]
    TooLarge(usize),
    #[error("no member is connected")]
    NoPeers,
    #[error("publish failed: {0}")]
    Publish(#[source] Cause),
    #[error("request to {0} failed: {1}")]
    Request(PeerId, #[source] request_response::OutboundFailure),
    #[error("stream to {0} failed: {1}")]
    Stream(PeerId, #[source] libp2p_stream::OpenStreamError),
    #[error("the mesh has stopped")]
    Stopped,
}

/// A cluster name that makes no valid protocol name.
#[derive(Debug, thiserror::Error)]
#[error("protocol name for cluster {cluster:?}: {source}")]
pub(crate) struct ProtocolName {
    pub(crate) cluster: String,
    #[source]
    pub(crate) source: libp2p::swarm::InvalidProtocol,
}

/// The protocol `/btfs/{cluster}/{what}`.
pub(crate) fn protocol(cluster: &str, what: &str) -> Result<StreamProtocol, MeshError> {
    StreamProtocol::try_from_owned(format!("/btfs/{cluster}/{what}")).map_err(|source| {
        MeshError::Transport(Box::new(ProtocolName {
            cluster: cluster.to_owned(),
            source,
        }))
    })
}

/// An error and its sources on one line (libp2p's own messages are terse).
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
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

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use request_response::OutboundFailure;

    use super::*;

    #[test]
    fn messages_show_the_cause_which_stays_the_source() {
        let addr: Multiaddr = "/ip4/127.0.0.1/tcp/1".parse().unwrap();
        let in_use = std::io::Error::new(std::io::ErrorKind::AddrInUse, "address in use");
        let e = MeshError::Listen(addr, TransportError::Other(in_use));
        assert_eq!(
            e.to_string(),
            "cannot listen on /ip4/127.0.0.1/tcp/1: address in use"
        );
        assert!(
            e.source()
                .is_some_and(|s| s.is::<TransportError<std::io::Error>>())
        );

        let peer = PeerId::random();
        let e = MeshError::Request(peer, OutboundFailure::Timeout);
        assert_eq!(
            e.to_string(),
            format!("request to {peer} failed: {}", OutboundFailure::Timeout)
        );
        assert!(e.source().is_some_and(|s| s.is::<OutboundFailure>()));

        let e = MeshError::Transport("incoming streams already taken".into());
        assert_eq!(
            e.to_string(),
            "cannot build the mesh transport: incoming streams already taken"
        );
    }
}
