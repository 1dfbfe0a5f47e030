//! Content between nodes: the BitTorrent engine wired to the filesystem
//! (`ContentSource`) and to the mesh (`Network`: member streams and
//! metainfo requests).

use std::{
    collections::HashSet,
    io,
    path::Path,
    sync::{Arc, Mutex, OnceLock},
};

use btfs_core::{ContentId, FileRecord, InfoHash, NodeId, RelPath};
use btfs_fs::{ContentSource, Done, Wanted};
use btfs_mesh::Mesh;
use btfs_torrent::{BoxIo, Engine, Network};
use futures::StreamExt;
use libp2p_identity::PeerId;
use tokio_util::compat::FuturesAsyncReadCompatExt;
use tracing::{debug, warn};

use crate::mesh::{Rpc, peer_of};

/// Peer-wire streams from members served at once (each is one BitTorrent
/// connection; librqbit keeps at most 128 per torrent).
const MAX_PEER_STREAMS: usize = 1024;

/// Which files are fetched in full as soon as their record arrives.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Prefetch {
    None,
    All,
    Globs(Vec<glob::Pattern>),
}

impl Prefetch {
    pub(crate) fn matches(&self, path: &RelPath) -> bool {
        match self {
            Prefetch::None => false,
            Prefetch::All => true,
            Prefetch::Globs(g) => {
                let p = path.to_string();
                let p = p.trim_start_matches('/');
                let name = p.rsplit('/').next().unwrap_or(p);
                g.iter().any(|g| g.matches(p) || g.matches(name))
            }
        }
    }
}

/// The filesystem's content source: the engine, once started.
#[derive(Debug)]
pub(crate) struct Content {
    engine: OnceLock<(Arc<Engine>, tokio::runtime::Handle)>,
    prefetch: Prefetch,
}

impl Content {
    pub(crate) fn new(prefetch: Prefetch) -> Self {
        Self {
            engine: OnceLock::new(),
            prefetch,
        }
    }

    pub(crate) fn set(&self, engine: Arc<Engine>, rt: tokio::runtime::Handle) {
        let _ = self.engine.set((engine, rt));
    }

    pub(crate) fn engine(&self) -> Option<&Arc<Engine>> {
        self.engine.get().map(|(e, _)| e)
    }

    /// A record arrived from another node: prefetch its content if the
    /// policy says so.
    pub(crate) fn arrived(&self, path: &RelPath, r: &FileRecord) {
        let Some(engine) = self.engine() else {
            return;
        };
        if self.prefetch.matches(path)
            && let Some(wanted) = Wanted::of(path.to_string(), r)
        {
            engine.prefetch(wanted);
        }
    }
}

fn not_started() -> io::Error {
    io::Error::other("the BitTorrent engine is not running")
}

impl ContentSource for Content {
    fn publish(&self, content: &ContentId, file: &Path, size: u64) -> io::Result<Option<InfoHash>> {
        let engine = self.engine().ok_or_else(not_started)?;
        Ok(Some(engine.publish(content, file, size)?))
    }

    fn read(&self, wanted: Wanted, offset: u64, len: u32, done: Done<Vec<u8>>) {
        let Some((engine, rt)) = self.engine.get() else {
            return done(Err(not_started()));
        };
        let engine = engine.clone();
        rt.spawn(async move { done(engine.read(wanted, offset, len).await) });
    }

    fn opened(&self, content: &ContentId) {
        if let Some(engine) = self.engine() {
            engine.touch(content);
        }
    }

    fn fetch(&self, wanted: Wanted, done: Done<()>) {
        let Some((engine, rt)) = self.engine.get() else {
            return done(Err(not_started()));
        };
        let engine = engine.clone();
        rt.spawn(async move {
            let label = wanted.path.clone();
            let r = engine.fetch(wanted).await;
            if let Err(e) = &r {
                warn!(path = %label, "fetching for a writer failed: {e}");
            }
            // The answer opens the file, which may copy it: off the runtime.
            tokio::task::spawn_blocking(move || done(r.map_err(io::Error::from)));
        });
    }
}

/// The mesh as the engine sees it.
pub(crate) struct MeshNet {
    pub(crate) mesh: Mesh,
    pub(crate) connected: Arc<Mutex<HashSet<PeerId>>>,
    /// Holdings changes for the gossip task.
    pub(crate) holdings: tokio::sync::mpsc::Sender<(Vec<ContentId>, Vec<ContentId>)>,
}

impl MeshNet {
    fn connected(&self) -> Vec<PeerId> {
        self.connected
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .copied()
            .collect()
    }

    /// Bridges the streams members open to this node into the engine.
    pub(crate) async fn serve(mesh: Mesh, engine: Arc<Engine>) {
        let mut incoming = match mesh.incoming_streams() {
            Ok(i) => i,
            Err(e) => return warn!("no member streams: {e}"),
        };
        let permits = Arc::new(tokio::sync::Semaphore::new(MAX_PEER_STREAMS));
        while let Some((peer, stream)) = incoming.next().await {
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                warn!(%peer, "{MAX_PEER_STREAMS} peer-wire streams open: refusing another");
                continue;
            };
            debug!(%peer, "member opened a peer-wire stream");
            let engine = engine.clone();
            tokio::spawn(async move {
                engine
                    .accept(Box::new(stream.compat()), peer.to_string())
                    .await;
                drop(permit);
            });
        }
    }
}

impl Network for MeshNet {
    fn members(&self) -> Vec<String> {
        self.connected().iter().map(ToString::to_string).collect()
    }

    fn member_of(&self, node: &NodeId) -> Option<String> {
        peer_of(node).map(|p| p.to_string())
    }

    fn dial(
        &self,
        member: String,
    ) -> std::pin::Pin<Box<dyn Future<Output = io::Result<BoxIo>> + Send>> {
        let mesh = self.mesh.clone();
        Box::pin(async move {
            let peer: PeerId = member
                .parse()
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "not a peer id"))?;
            let s = mesh
                .open_stream(peer)
                .await
                .map_err(|e| io::Error::new(io::ErrorKind::ConnectionRefused, e.to_string()))?;
            Ok(Box::new(s.compat()) as BoxIo)
        })
    }

    fn announce(&self, held: Vec<ContentId>, dropped: Vec<ContentId>) {
        if self.holdings.try_send((held, dropped)).is_err() {
            debug!("holdings queue full: an announcement is dropped");
        }
    }

    fn metainfo(
        &self,
        torrent: InfoHash,
        first: Option<String>,
    ) -> std::pin::Pin<Box<dyn Future<Output = Option<Vec<u8>>> + Send>> {
        let mesh = self.mesh.clone();
        let mut peers: Vec<PeerId> = first.and_then(|f| f.parse().ok()).into_iter().collect();
        let connected = self.connected();
        if let Some(f) = peers.first().copied()
            && !connected.contains(&f)
        {
            peers.clear();
        }
        let first = peers.first().copied();
        peers.extend(connected.into_iter().filter(|p| Some(*p) != first));
        Box::pin(async move {
            let req = postcard::to_allocvec(&Rpc::Metainfo(torrent.0)).ok()?;
            for p in peers {
                match mesh.request(p, req.clone()).await {
                    Ok(b) if !b.is_empty() => return Some(b),
                    Ok(_) => debug!(peer = %p, %torrent, "member does not have the metainfo"),
                    Err(e) => debug!(peer = %p, %torrent, "metainfo request failed: {e}"),
                }
            }
            None
        })
    }
}
