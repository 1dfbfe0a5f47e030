//! `mount -o remount,OPTIONS`: the settings a running node changes without
//! unmounting: the member list, the bootstrap peers, the transfer rates,
//! the cache size, the prefetch policy and the read timeout.
//!
//! Everything that can fail (reading and parsing the files named) is done
//! first; only then is anything changed, so that a refused change leaves
//! the node as it was. Open files are never touched: a change applies to
//! the next record checked, dial made, read started or cache pass.

use std::{net::SocketAddr, num::NonZeroU32, path::PathBuf, sync::Arc, time::Duration};

use btfs_mesh::{Mesh, MeshError, Multiaddr};
use btfs_torrent::Engine;
use parking_lot::RwLock;
use serde::Serialize;
use tracing::info;

use crate::{Content, NodeError, Prefetch, error, membership, membership::Membership};

/// How long the mesh may take to apply a change (it answers within
/// milliseconds unless its event loop is stuck or stopped).
const MESH_CHANGE_TIMEOUT: Duration = Duration::from_secs(5);

/// What a remount changes; `None` leaves a setting as it is.
#[derive(Debug, Clone, Default)]
pub struct Reconfigure {
    /// `members=FILE`: the file is read again (also when its path is the
    /// same as before: the point is usually its new content).
    pub members: Option<PathBuf>,
    /// `peers=` / `peers_file=`: the bootstrap addresses from now on (the
    /// file is read again).
    pub bootstrap: Option<(Vec<SocketAddr>, Option<PathBuf>)>,
    /// `up_rate=` / `down_rate=` from now on (`None` inside: unlimited).
    pub rates: Option<(Option<NonZeroU32>, Option<NonZeroU32>)>,
    /// `cache_size=` from now on.
    pub cache_size: Option<Option<u64>>,
    /// `prefetch=` from now on (records that arrive after the change).
    pub prefetch: Option<Prefetch>,
    /// `read_timeout=` for reads that start after the change.
    pub read_timeout: Option<Duration>,
    /// The options in force once applied, as `btfs status` shows them
    /// (`NodeInfo::options`); `None`: as they were.
    pub options: Option<serde_json::Value>,
}

/// What a remount did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Reconfigured {
    /// Peers disconnected because they are no longer members.
    pub disconnected: Vec<String>,
    /// Members admitted now (`None`: every key holder).
    pub members: Option<usize>,
    /// Bootstrap addresses not dialled before.
    pub new_bootstrap: usize,
}

/// A remount that was refused; nothing was changed.
#[derive(Debug, thiserror::Error)]
pub enum ReconfigureError {
    #[error("{0}")]
    File(#[from] NodeError),
    #[error("the mesh did not apply the change: {0}")]
    Mesh(#[source] MeshError),
    #[error("the mesh did not apply the change within {MESH_CHANGE_TIMEOUT:?}")]
    MeshTimeout,
}

/// The parts of a running node a remount changes, shared by the node's
/// handles.
#[derive(Debug)]
pub(crate) struct Live {
    pub(crate) mesh: Mesh,
    pub(crate) membership: Membership,
    pub(crate) content: Arc<Content>,
    pub(crate) engine: Arc<Engine>,
    /// The options `btfs status` shows (`NodeInfo::options`), kept current.
    pub(crate) options: RwLock<serde_json::Value>,
    /// One remount at a time: each one's checks hold until it has applied.
    pub(crate) applying: tokio::sync::Mutex<()>,
}

impl Live {
    /// Checks everything `req` names, then applies it all.
    pub(crate) async fn reconfigure(
        &self,
        req: Reconfigure,
    ) -> Result<Reconfigured, ReconfigureError> {
        let _one = self.applying.lock().await;
        // Checks: the files are read and parsed before anything changes.
        let members = match &req.members {
            Some(path) => Some(membership::read_members(path)?),
            None => None,
        };
        let bootstrap = match &req.bootstrap {
            Some((peers, file)) => Some(bootstrap_of(peers, file.as_ref())?),
            None => None,
        };

        let mut done = Reconfigured::default();
        if let Some(sets) = members {
            let admitted = sets.0.clone();
            done.members = Some(admitted.len());
            // Records first: from here on nothing of a removed member is
            // accepted, even on a connection the mesh has yet to close.
            self.membership.replace(Some(sets));
            let cut = mesh_call(self.mesh.set_members(Some(admitted))).await?;
            done.disconnected = cut.iter().map(ToString::to_string).collect();
        }
        if let Some(addrs) = bootstrap {
            done.new_bootstrap = mesh_call(self.mesh.set_bootstrap(addrs)).await?;
        }
        if let Some((up, down)) = req.rates {
            self.engine.set_rates(up, down);
        }
        if let Some(limit) = req.cache_size {
            self.engine.set_cache_size(limit);
        }
        if let Some(d) = req.read_timeout {
            self.engine.set_read_timeout(d);
        }
        if let Some(p) = req.prefetch {
            self.content.set_prefetch(p);
        }
        if let Some(o) = req.options {
            *self.options.write() = o;
        }
        info!(
            members = ?done.members,
            disconnected = ?done.disconnected,
            new_bootstrap = done.new_bootstrap,
            "reconfigured"
        );
        Ok(done)
    }
}

/// The mesh addresses of `peers` and of the lines of `file`.
fn bootstrap_of(peers: &[SocketAddr], file: Option<&PathBuf>) -> Result<Vec<Multiaddr>, NodeError> {
    let mut out: Vec<String> = peers.iter().copied().map(membership::multiaddr).collect();
    if let Some(f) = file {
        out.extend(membership::read_peers_file(f)?);
    }
    out.iter().map(|a| error::parse_multiaddr(a)).collect()
}

async fn mesh_call<T>(
    call: impl Future<Output = Result<T, MeshError>>,
) -> Result<T, ReconfigureError> {
    match tokio::time::timeout(MESH_CHANGE_TIMEOUT, call).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(ReconfigureError::Mesh(e)),
        Err(_) => Err(ReconfigureError::MeshTimeout),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_peers_file_is_refused_with_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("peers");
        std::fs::write(&f, "10.0.0.2:4410\n# comment\n/ip4/10.0.0.3/tcp/4410\n").unwrap();
        let peers = ["10.0.0.1:4410".parse().unwrap()];
        let addrs = bootstrap_of(&peers, Some(&f)).unwrap();
        assert_eq!(addrs.len(), 3);
        std::fs::write(&f, "nowhere\n").unwrap();
        let err = bootstrap_of(&peers, Some(&f)).unwrap_err().to_string();
        assert!(err.contains("nowhere"), "{err}");
        let missing = dir.path().join("missing");
        assert!(bootstrap_of(&peers, Some(&missing)).is_err());
    }
}
