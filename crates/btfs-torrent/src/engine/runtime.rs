//! librqbit's own runtime: one thread, current-thread flavour.

use std::time::Duration;

use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::TorrentError;

/// librqbit's own runtime: one thread, current-thread flavour.
///
/// On a multi-thread runtime librqbit writes every received 16 KiB chunk
/// (and reads every chunk it sends) inside `block_in_place`, which hands the
/// worker's other tasks to another thread each time; on a current-thread
/// runtime it makes these calls inline, much faster (see
/// docs/BENCHMARKS.md). The daemon's runtime keeps the bridges, the mesh and
/// FUSE answers, on the other cores.
pub(super) struct BtRuntime {
    handle: tokio::runtime::Handle,
    stop: CancellationToken,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl BtRuntime {
    pub(super) fn start() -> std::io::Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = rt.handle().clone();
        let stop = CancellationToken::new();
        let until = stop.clone();
        let thread = std::thread::Builder::new()
            .name("btfs-bt".into())
            .spawn(move || {
                rt.block_on(until.cancelled());
                // What librqbit left running is dropped, not awaited.
                rt.shutdown_timeout(Duration::from_secs(1));
            })?;
        Ok(Self {
            handle,
            stop,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Runs `f` on librqbit's runtime (it keeps running if the caller
    /// gives up on it).
    pub(super) async fn run<F>(&self, f: F) -> Result<F::Output, TorrentError>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handle.spawn(f).await.map_err(TorrentError::Runtime)
    }

    /// Stops the runtime and waits (at most a few seconds) for its thread.
    /// (Dropping it stops it too, without waiting.)
    pub(super) async fn stop(&self) {
        self.stop.cancel();
        let Some(thread) = self.thread.lock().take() else {
            return;
        };
        let joined = tokio::task::spawn_blocking(move || thread.join());
        if tokio::time::timeout(Duration::from_secs(3), joined)
            .await
            .is_err()
        {
            warn!("librqbit's runtime did not stop within 3 s");
        }
    }
}

impl Drop for BtRuntime {
    /// An engine that failed to start, or was dropped unstopped, does not
    /// leave the thread behind.
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
