//! Content between nodes as the filesystem sees it: the BitTorrent engine
//! behind `btfs_fs::ContentSource`, and the prefetch policy applied to
//! records as they arrive.

use std::{io, path::Path, sync::Arc};

use btfs_core::{ContentId, FileRecord, InfoHash, RelPath};
use btfs_fs::{ContentSource, Done, Wanted};
use btfs_torrent::Engine;
use tokio_util::task::TaskTracker;
use tracing::warn;

use crate::pins::Pins;

/// Which files are fetched in full as soon as their record arrives.
#[derive(Debug, Clone, PartialEq)]
pub enum Prefetch {
    None,
    All,
    Globs(Vec<glob::Pattern>),
}

impl Prefetch {
    pub fn matches(&self, path: &RelPath) -> bool {
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

impl std::fmt::Display for Prefetch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Prefetch::None => f.write_str("none"),
            Prefetch::All => f.write_str("all"),
            Prefetch::Globs(g) => {
                let globs: Vec<&str> = g.iter().map(|p| p.as_str()).collect();
                f.write_str(&globs.join(","))
            }
        }
    }
}

/// The filesystem's content source: the engine, on the node's runtime.
/// Reads and fetches run as tasks of the node (FUSE threads are not the
/// runtime's, hence the handle).
#[derive(Debug)]
pub struct Content {
    engine: Arc<Engine>,
    rt: tokio::runtime::Handle,
    tasks: TaskTracker,
    /// `prefetch=`, which `mount -o remount` may change (see
    /// [`Content::set_prefetch`]).
    prefetch: parking_lot::RwLock<Prefetch>,
    /// Pinned paths: what arrives under them is fetched whatever `prefetch`.
    pins: Arc<Pins>,
}

impl Content {
    pub(crate) fn new(
        engine: Arc<Engine>,
        rt: tokio::runtime::Handle,
        tasks: TaskTracker,
        prefetch: Prefetch,
        pins: Arc<Pins>,
    ) -> Self {
        Self {
            engine,
            rt,
            tasks,
            prefetch: parking_lot::RwLock::new(prefetch),
            pins,
        }
    }

    /// `prefetch=` from now on: records that arrive after this follow it.
    pub(crate) fn set_prefetch(&self, p: Prefetch) {
        *self.prefetch.write() = p;
    }

    /// A record arrived from another node: fetch its content whole if it
    /// is under a pin (the pins' own paced fetches), else prefetch it if
    /// the policy says so.
    pub(crate) fn arrived(&self, path: &RelPath, r: &FileRecord) {
        if self.pins.arrived(path, r) {
            return;
        }
        if self.prefetch.read().matches(path)
            && let Some(wanted) = Wanted::of(path.to_string(), r)
        {
            self.engine.prefetch(wanted);
        }
    }
}

impl ContentSource for Content {
    fn publish(&self, content: &ContentId, file: &Path, size: u64) -> io::Result<Option<InfoHash>> {
        Ok(Some(self.engine.publish(content, file, size)?))
    }

    fn publish_update(
        &self,
        content: &ContentId,
        file: &Path,
        size: u64,
        update: &btfs_fs::Update<'_>,
    ) -> io::Result<Option<InfoHash>> {
        Ok(Some(
            self.engine.publish_update(content, file, size, update)?,
        ))
    }

    fn adopt_seed(&self, file: &Path, old: &Wanted, new: &Wanted) -> bool {
        self.engine.adopt_seed(file, old, new)
    }

    fn read(&self, wanted: Wanted, offset: u64, len: u32, done: Done<Vec<u8>>) {
        let engine = self.engine.clone();
        self.tasks.spawn_on(
            async move { done(engine.read(wanted, offset, len).await) },
            &self.rt,
        );
    }

    fn read_ahead(&self, wanted: Wanted) {
        self.engine.prefetch(wanted);
    }

    fn opened(&self, content: &ContentId) {
        self.engine.touch(content);
    }

    fn fetch(&self, wanted: Wanted, done: Done<()>) {
        let engine = self.engine.clone();
        let fetch = async move {
            let label = wanted.path.clone();
            let r = engine.fetch(wanted).await;
            if let Err(e) = &r {
                warn!(path = %label, "fetching for a writer failed: {e}");
            }
            // The answer opens the file, which may copy it: off the runtime.
            tokio::task::spawn_blocking(move || done(r.map_err(io::Error::from)));
        };
        self.tasks.spawn_on(fetch, &self.rt);
    }
}
