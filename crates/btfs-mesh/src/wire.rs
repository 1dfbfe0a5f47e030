//! Direct peer wires: a connection between two members outside the mesh
//! connection, for bulk data (the BitTorrent peer wire).
//!
//! Streams inside the mesh connection pay for the pre-shared key's XSalsa20
//! on every byte, on top of noise. A direct wire runs the same noise XX
//! handshake libp2p uses, on its own connection, and binds it to the cluster
//! through the handshake's prologue: a value derived from the pre-shared key,
//! so a peer without the key cannot complete it. The caller then admits only
//! the members it is connected to through the mesh.

use std::io;

use futures::{AsyncRead, AsyncWrite};
use libp2p::{
    PeerId,
    core::upgrade::{InboundConnectionUpgrade, OutboundConnectionUpgrade},
    identity::Keypair,
    noise,
};

/// An encrypted, authenticated direct wire over `T`.
pub type Wire<T> = noise::Output<T>;

/// The noise prologue of a cluster's direct wires: derived from the cluster
/// name and the pre-shared key (its text form), never the key itself.
pub fn prologue(cluster: &str, psk_text: &str) -> Vec<u8> {
    let mut h = blake3::Hasher::new_derive_key("btfs 1 direct peer wire prologue");
    h.update(&(cluster.len() as u64).to_le_bytes());
    h.update(cluster.as_bytes());
    h.update(psk_text.as_bytes());
    h.finalize().as_bytes().to_vec()
}

fn config(keypair: &Keypair, prologue: &[u8]) -> io::Result<noise::Config> {
    Ok(noise::Config::new(keypair)
        .map_err(io::Error::other)?
        .with_prologue(prologue.to_vec()))
}

fn refused(e: noise::Error) -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!("noise handshake: {e}"),
    )
}

/// Secures `io`, a connection this node opened to `expected`; fails unless
/// the other end proves it is `expected` and knows the prologue.
pub async fn connect<T>(
    keypair: &Keypair,
    prologue: &[u8],
    io: T,
    expected: PeerId,
) -> io::Result<Wire<T>>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (peer, wire) = config(keypair, prologue)?
        .upgrade_outbound(io, "/noise")
        .await
        .map_err(refused)?;
    if peer != expected {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("the wire reached {peer}, not {expected}"),
        ));
    }
    Ok(wire)
}

/// Secures `io`, a connection another node opened to this one; returns who
/// it proved to be. Admitting it is the caller's decision.
pub async fn accept<T>(keypair: &Keypair, prologue: &[u8], io: T) -> io::Result<(PeerId, Wire<T>)>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    config(keypair, prologue)?
        .upgrade_inbound(io, "/noise")
        .await
        .map_err(refused)
}

#[cfg(test)]
mod tests {
    use futures::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    async fn pair(
        server_prologue: Vec<u8>,
        client_prologue: Vec<u8>,
        expected: Option<PeerId>,
    ) -> (io::Result<(PeerId, Vec<u8>)>, io::Result<()>) {
        let (a, b) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
        let expected = expected.unwrap_or(a.public().to_peer_id());
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let server = tokio::spawn(async move {
            use tokio_util::compat::TokioAsyncReadCompatExt;
            let (s, _) = l.accept().await.unwrap();
            let (peer, mut w) = accept(&a, &server_prologue, s.compat()).await?;
            let mut got = vec![0u8; 5];
            w.read_exact(&mut got).await?;
            Ok((peer, got))
        });
        let client = async {
            use tokio_util::compat::TokioAsyncReadCompatExt;
            let s = tokio::net::TcpStream::connect(addr).await?;
            let mut w = connect(&b, &client_prologue, s.compat(), expected).await?;
            w.write_all(b"hello").await?;
            w.flush().await?;
            Ok(())
        };
        let c = client.await;
        let s = tokio::time::timeout(std::time::Duration::from_secs(5), server)
            .await
            .unwrap()
            .unwrap();
        (s, c)
    }

    #[tokio::test]
    async fn members_with_the_same_key_talk_and_learn_who_is_at_the_other_end() {
        let p = prologue("c", "key");
        let (s, c) = pair(p.clone(), p, None).await;
        c.unwrap();
        let (_, got) = s.unwrap();
        assert_eq!(got, b"hello");
    }

    #[tokio::test]
    async fn another_key_or_cluster_cannot_complete_the_handshake() {
        assert_ne!(prologue("c", "key"), prologue("c", "other"));
        assert_ne!(prologue("c", "key"), prologue("d", "key"));
        let (s, c) = pair(prologue("c", "key"), prologue("c", "other"), None).await;
        assert!(s.is_err() || c.is_err());
        assert!(
            s.is_err(),
            "the server read data from a peer with another key"
        );
    }

    #[tokio::test]
    async fn a_wire_that_reaches_someone_else_is_refused() {
        let p = prologue("c", "key");
        let stranger = Keypair::generate_ed25519().public().to_peer_id();
        let (_, c) = pair(p.clone(), p, Some(stranger)).await;
        assert_eq!(c.unwrap_err().kind(), io::ErrorKind::PermissionDenied);
    }
}
