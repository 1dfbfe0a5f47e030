//! The cluster mesh in the daemon: configuration from the mount options, and
//! the tasks around it. Records do not replicate yet (issue 3): this brings
//! the private mesh up, keeps members connected and reports them in status.

use std::{
    collections::HashSet,
    net::SocketAddr,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result, bail};
use btfs_core::{FileRecord, NodeId, RelPath};
use btfs_fs::FsHandle;
use btfs_mesh::{MeshConfig, MeshError, MeshEvent, PeerInfo};
use btfs_store::SledBackend;
use btfs_sync::SignedRecord;
use libp2p_identity::{Keypair, PeerId, PublicKey, ed25519};
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use crate::{daemon::MountPlan, options::DEFAULT_LISTEN};

/// How often the status view of the mesh is refreshed.
const PEERS_REFRESH: Duration = Duration::from_secs(1);

/// What `btfs status` shows about the mesh.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct PeersView {
    pub peers: Vec<PeerInfo>,
    pub listen: Vec<String>,
}

fn multiaddr(a: SocketAddr) -> String {
    match a {
        SocketAddr::V4(v4) => format!("/ip4/{}/tcp/{}", v4.ip(), v4.port()),
        SocketAddr::V6(v6) => format!("/ip6/{}/tcp/{}", v6.ip(), v6.port()),
    }
}

/// Bootstrap peers from `peers_file=`: one `IP:PORT` (or multiaddr) a line,
/// `#` comments allowed.
fn read_peers_file(path: &Path) -> Result<Vec<String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("peers file {}", path.display()))?;
    text.lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .map(|l| {
            if l.starts_with('/') {
                Ok(l.to_owned())
            } else {
                l.parse::<SocketAddr>()
                    .map(multiaddr)
                    .with_context(|| format!("peers file {}: {l:?} is not IP:PORT", path.display()))
            }
        })
        .collect()
}

/// Admitted peers from `members=`: one peer id a line.
fn read_members(path: &Path) -> Result<HashSet<PeerId>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("members file {}", path.display()))?;
    let mut out = HashSet::new();
    for l in text
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
    {
        match l.parse::<PeerId>() {
            Ok(p) => {
                out.insert(p);
            }
            Err(e) => bail!(
                "members file {}: {l:?} is not a peer id ({e})",
                path.display()
            ),
        }
    }
    Ok(out)
}

/// The libp2p peer id of a node id (its ed25519 public key).
fn peer_of(node: &NodeId) -> Option<PeerId> {
    ed25519::PublicKey::try_from_bytes(&node.0)
        .ok()
        .map(|k| PublicKey::from(k).to_peer_id())
}

pub(crate) fn config(plan: &MountPlan, keypair: Keypair) -> Result<MeshConfig> {
    let o = &plan.opts;
    let listen = o
        .listen
        .map_or_else(|| DEFAULT_LISTEN.to_owned(), multiaddr);
    let mut bootstrap: Vec<String> = o.peers.iter().copied().map(multiaddr).collect();
    if let Some(f) = &o.peers_file {
        bootstrap.extend(read_peers_file(f)?);
    }
    let members = o.members.as_deref().map(read_members).transpose()?;
    let cluster = plan.name.clone();
    let admitted = members.clone();
    let validate = Arc::new(move |_: &PeerId, bytes: &[u8]| {
        let member = |n: &NodeId| match (&admitted, peer_of(n)) {
            (None, _) => true,
            (Some(m), Some(p)) => m.contains(&p),
            (Some(_), None) => false,
        };
        match SignedRecord::decode(bytes).and_then(|r| r.verify(&cluster, member)) {
            Ok(()) => true,
            Err(e) => {
                info!("refused a record: {e}");
                false
            }
        }
    });
    let parse = |a: &str| a.parse().with_context(|| format!("mesh address {a}"));
    Ok(MeshConfig {
        cluster: plan.name.clone(),
        keypair,
        psk: plan.psk,
        listen: vec![parse(&listen)?],
        bootstrap: bootstrap.iter().map(|a| parse(a)).collect::<Result<_>>()?,
        mdns: o.mdns,
        members,
        validate,
    })
}

/// Records gossiped and received (validated), for `btfs status`.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub published: AtomicU64,
    pub received: AtomicU64,
}

/// Starts the mesh and its tasks on the current runtime: new local versions
/// from `announce` are signed and gossiped. Returns the status view,
/// refreshed every second, and the record counters.
pub(crate) fn start(
    cfg: MeshConfig,
    mut announce: mpsc::Receiver<(RelPath, FileRecord)>,
    fs: FsHandle<SledBackend>,
) -> Result<(watch::Receiver<PeersView>, Arc<Counters>)> {
    let (keypair, cluster) = (cfg.keypair.clone(), cfg.cluster.clone());
    let (mesh, mut events, _task) = btfs_mesh::start(cfg).context("mesh")?;
    let counters = Arc::new(Counters::default());
    let publisher = mesh.clone();
    let published = counters.clone();
    tokio::spawn(async move {
        while let Some((path, record)) = announce.recv().await {
            let bytes = match SignedRecord::sign(&cluster, path, record, &keypair)
                .and_then(|r| r.encode())
            {
                Ok(b) => b,
                Err(e) => {
                    warn!("could not sign a record: {e}");
                    continue;
                }
            };
            match publisher.publish(bytes).await {
                Ok(()) => {
                    published.published.fetch_add(1, Ordering::Relaxed);
                }
                // Alone: the record stays in the store for anti-entropy.
                Err(MeshError::NoPeers) => {}
                Err(e) => debug!("gossip failed: {e}"),
            }
        }
    });
    let received = counters.clone();
    tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            match event {
                MeshEvent::PeerUp(p) => info!(peer = %p, "peer up"),
                MeshEvent::PeerDown(p) => info!(peer = %p, "peer down"),
                MeshEvent::Gossip { source, data } => {
                    received.received.fetch_add(1, Ordering::Relaxed);
                    // The mesh delivers only payloads its validator accepted.
                    let Ok(r) = SignedRecord::decode(&data) else {
                        continue;
                    };
                    let path = r.path.clone();
                    let fs = fs.clone();
                    match tokio::task::spawn_blocking(move || fs.apply_remote(r.path, r.record))
                        .await
                    {
                        Ok(Ok(outcome)) => debug!(%source, %path, ?outcome, "remote record"),
                        Ok(Err(e)) => warn!(%source, %path, "could not apply a remote record: {e}"),
                        Err(e) => warn!("apply task failed: {e}"),
                    }
                }
                MeshEvent::Request { responder, .. } => {
                    let _ = responder.respond(Vec::new()).await;
                }
            }
        }
    });
    let (tx, rx) = watch::channel(PeersView::default());
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(PEERS_REFRESH);
        loop {
            tick.tick().await;
            let (Ok(peers), Ok(listen)) = (mesh.peers().await, mesh.listen_addrs().await) else {
                return;
            };
            let view = PeersView {
                peers,
                listen: listen.iter().map(ToString::to_string).collect(),
            };
            if tx.send(view).is_err() {
                return;
            }
        }
    });
    Ok((rx, counters))
}
