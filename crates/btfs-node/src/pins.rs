//! Pinned paths (`btfs pin`): files and directories, recursive, whose
//! content this node holds in full whatever `cache_size=` says, so that
//! they read at local speed (and with every other member gone).
//!
//! * The set of pins is a file of the state dir, one relative path a line
//!   (`/` for the root), rewritten whole (temp file, fsync, rename) at each
//!   change, so that a crash leaves the old list or the new one.
//! * A fetch task ([`pin_loop`]) walks the pinned trees in the store and
//!   fetches every file whose content is not here, a few at a time and
//!   awaited (a large directory is paced, nothing is dropped); a record that
//!   arrives under a pin ([`Pins::arrived`]) is queued to it at once. The
//!   walk runs again when pins change, when the fetches of a batch are
//!   done (at most every [`PIN_RECOUNT_GAP`]), and every
//!   [`PIN_SWEEP_EVERY`], which retries what failed.
//! * The engine's cache never evicts content a live record under a pin
//!   names ([`Pins::keep`]): the set of that content is rebuilt by each walk
//!   and grows as records arrive, so the eviction pass asks a hash set.

use std::{
    collections::{BTreeSet, HashMap, HashSet, VecDeque},
    fs, io,
    io::Write as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use btfs_core::{ContentId, FileKind, FileRecord, RelPath, Wanted};
use btfs_fs::FsHandle;
use btfs_store::{Backend, Entry, StoreError};
use btfs_torrent::Engine;
use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};
use tokio::{
    sync::{Notify, mpsc},
    task::JoinSet,
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Most paths pinned at once: each arrived record is checked against every
/// pin, and each walk visits every pinned tree.
pub const MAX_PINS: usize = 1024;
/// Whole-file fetches of pinned content running at once (beside the
/// prefetch policy's and readers' own).
const PIN_FETCH_PARALLEL: usize = 4;
/// Arrived records under a pin waiting for the fetch task; past this the
/// next walk finds them instead (nothing is dropped).
const PIN_QUEUE: usize = 1024;
/// How often the pinned trees are walked when nothing else asks: retries
/// fetches that failed, and refreshes the counts `btfs status` shows.
const PIN_SWEEP_EVERY: Duration = Duration::from_secs(60);
/// Least time between two walks that only count again (after a batch of
/// fetches): a stream of new files under a large pin does not walk it for
/// each file.
const PIN_RECOUNT_GAP: Duration = Duration::from_secs(5);
/// A pinned file whose fetch failed (no holder online, stalled) is not
/// tried again before this long.
const PIN_RETRY_AFTER: Duration = Duration::from_secs(30);
/// The file of pins in the state dir.
const PINS_FILE: &str = "pins";

/// Why a pin or unpin was refused.
#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error("{path}: {source}")]
    BadPath {
        path: String,
        #[source]
        source: btfs_core::PathError,
    },
    #[error("{0}: a path with a newline cannot be pinned")]
    Newline(String),
    #[error("{0}: no such file or directory")]
    Missing(String),
    #[error("{0}: permission denied")]
    Denied(String),
    #[error("{0}: only files and directories can be pinned")]
    Kind(String),
    #[error("{MAX_PINS} paths are pinned already: unpin one first")]
    TooMany,
    #[error("{0}: not pinned")]
    NotPinned(String),
    #[error("{path}: not pinned itself, but under the pin {pin}: unpin that")]
    Covered { path: String, pin: String },
    #[error("pins file {}", path.display())]
    File {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: {source}")]
    Store {
        path: String,
        #[source]
        source: StoreError,
    },
    #[error("pin task: {0}")]
    Task(String),
}

/// One pin as `btfs status` shows it: what is under it, and how much of it
/// this node holds in full (as of the last walk).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinStatus {
    /// The pinned path, relative to the mount (`/` for the root).
    pub path: String,
    /// Live files under it, and their bytes.
    pub files: u64,
    pub bytes: u64,
    /// Of those, the ones held here in full.
    pub files_held: u64,
    pub bytes_held: u64,
}

impl PinStatus {
    /// Every file under the pin is held here.
    pub fn complete(&self) -> bool {
        self.files_held == self.files
    }
}

/// The node's pins and what the fetch task and the cache need of them.
#[derive(Debug)]
pub(crate) struct Pins {
    file: PathBuf,
    paths: RwLock<BTreeSet<RelPath>>,
    /// Held while the set changes and its file is written.
    change: Mutex<()>,
    /// Content of live files under a pin: never evicted.
    kept: RwLock<HashSet<ContentId>>,
    /// Content added to `kept` by arrivals since the walk under way began
    /// (the walk may have passed their directory before they were stored).
    recent: Mutex<HashSet<ContentId>>,
    /// Counts per pin, from the last walk.
    counts: Mutex<HashMap<RelPath, PinStatus>>,
    queue: mpsc::Sender<Wanted>,
    /// Asks the fetch task for a walk (coalesced).
    sweep: Notify,
}

/// How a pin is shown: relative to the mount, `/` for the root.
fn shown(p: &RelPath) -> String {
    if p.is_root() {
        "/".to_owned()
    } else {
        p.as_str().to_owned()
    }
}

/// A path as the control socket sends it and the file keeps it (relative,
/// `/` or empty for the root).
fn parse(s: &str) -> Result<RelPath, PinError> {
    if s.contains('\n') {
        return Err(PinError::Newline(s.to_owned()));
    }
    let rel = s.strip_prefix('/').unwrap_or(s);
    RelPath::parse(rel).map_err(|source| PinError::BadPath {
        path: s.to_owned(),
        source,
    })
}

impl Pins {
    /// Reads the pins kept in `state_dir` (none if there is no file yet); a
    /// line that is not a path is logged and skipped, as are lines past
    /// [`MAX_PINS`]. Returns the receiver of the fetch task's queue.
    pub(crate) fn open(state_dir: &Path) -> Result<(Arc<Self>, mpsc::Receiver<Wanted>), PinError> {
        let file = state_dir.join(PINS_FILE);
        let mut paths = BTreeSet::new();
        match fs::read_to_string(&file) {
            Ok(text) => {
                for (i, line) in text.lines().enumerate() {
                    if line.is_empty() {
                        continue;
                    }
                    match parse(line) {
                        Ok(_) if paths.len() >= MAX_PINS => {
                            warn!(file = %file.display(), line = i + 1, "more than {MAX_PINS} pins: the rest are ignored");
                            break;
                        }
                        Ok(p) => {
                            paths.insert(p);
                        }
                        Err(e) => {
                            warn!(file = %file.display(), line = i + 1, "not a pin, skipped: {e}")
                        }
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(PinError::File { path: file, source }),
        }
        if !paths.is_empty() {
            info!(pins = paths.len(), "pinned paths read");
        }
        let (queue, rx) = mpsc::channel(PIN_QUEUE);
        let pins = Arc::new(Self {
            file,
            paths: RwLock::new(paths),
            change: Mutex::new(()),
            kept: RwLock::default(),
            recent: Mutex::default(),
            counts: Mutex::default(),
            queue,
            sweep: Notify::new(),
        });
        Ok((pins, rx))
    }

    /// The engine's keep predicate: content of a live file under a pin.
    pub(crate) fn keep(self: &Arc<Self>) -> btfs_torrent::Keep {
        let pins = self.clone();
        Box::new(move |c: &ContentId| pins.kept.read().contains(c))
    }

    /// Whether `path` is at or below a pin.
    fn covers(&self, path: &RelPath) -> Option<RelPath> {
        self.paths
            .read()
            .iter()
            .find(|p| path.is_within(p))
            .cloned()
    }

    /// A record from another node was stored: if it is under a pin, its
    /// content is kept from now on and fetched in full. Returns whether it
    /// was (then no other policy needs to fetch it).
    pub(crate) fn arrived(&self, path: &RelPath, r: &FileRecord) -> bool {
        if self.paths.read().is_empty() || self.covers(path).is_none() {
            return false;
        }
        let Some(wanted) = Wanted::of(path.to_string(), r) else {
            return false;
        };
        self.kept.write().insert(wanted.content);
        self.recent.lock().insert(wanted.content);
        if self.queue.try_send(wanted).is_err() {
            // The next walk finds it.
            self.sweep.notify_one();
        }
        true
    }

    /// Pins `path` (a file or directory that exists, which the caller may
    /// read: `may(mode, uid, gid, want)` as for `btfs torrent`). Returns
    /// what is under it now; its missing content is fetched by the task.
    pub(crate) fn pin<B: Backend>(
        &self,
        fs: &FsHandle<B>,
        path: &str,
        may: impl Fn(u32, u32, u32, u32) -> bool,
    ) -> Result<PinStatus, PinError> {
        let rel = parse(path)?;
        let entry = accessible(fs, &rel, &may)?.ok_or_else(|| PinError::Missing(shown(&rel)))?;
        if !matches!(entry.record.kind, FileKind::File | FileKind::Dir) {
            return Err(PinError::Kind(shown(&rel)));
        }
        {
            let _change = self.change.lock();
            let mut next = self.paths.read().clone();
            if next.insert(rel.clone()) {
                if next.len() > MAX_PINS {
                    return Err(PinError::TooMany);
                }
                self.write(&next)?;
                *self.paths.write() = next;
                info!(path = %shown(&rel), "pinned");
            }
        }
        let walked = walk(fs, &rel).map_err(|source| PinError::Store {
            path: shown(&rel),
            source,
        })?;
        self.kept.write().extend(walked.contents.iter().copied());
        self.recent.lock().extend(walked.contents);
        self.counts.lock().insert(rel, walked.status.clone());
        self.sweep.notify_one();
        Ok(walked.status)
    }

    /// Unpins `path`: a pin itself (not a path under one). If the path still
    /// exists, the caller must be able to read it.
    pub(crate) fn unpin<B: Backend>(
        &self,
        fs: &FsHandle<B>,
        path: &str,
        may: impl Fn(u32, u32, u32, u32) -> bool,
    ) -> Result<(), PinError> {
        let rel = parse(path)?;
        match accessible(fs, &rel, &may) {
            Ok(_) | Err(PinError::Missing(_)) => {}
            Err(e) => return Err(e),
        }
        let _change = self.change.lock();
        let mut next = self.paths.read().clone();
        if !next.remove(&rel) {
            return Err(match self.covers(&rel) {
                Some(pin) => PinError::Covered {
                    path: shown(&rel),
                    pin: shown(&pin),
                },
                None => PinError::NotPinned(shown(&rel)),
            });
        }
        self.write(&next)?;
        *self.paths.write() = next;
        self.counts.lock().remove(&rel);
        info!(path = %shown(&rel), "unpinned");
        // The walk rebuilds the content kept.
        self.sweep.notify_one();
        Ok(())
    }

    /// The pins, with their counts as of the last walk.
    pub(crate) fn list(&self) -> Vec<PinStatus> {
        let counts = self.counts.lock();
        self.paths
            .read()
            .iter()
            .map(|p| {
                counts.get(p).cloned().unwrap_or_else(|| PinStatus {
                    path: shown(p),
                    ..PinStatus::default()
                })
            })
            .collect()
    }

    /// Writes `paths` as the file of pins: a temp file, synced, renamed
    /// over the old one, and the directory synced.
    fn write(&self, paths: &BTreeSet<RelPath>) -> Result<(), PinError> {
        let err = |source| PinError::File {
            path: self.file.clone(),
            source,
        };
        let tmp = self.file.with_extension("tmp");
        let mut text = String::new();
        for p in paths {
            text.push_str(&shown(p));
            text.push('\n');
        }
        let mut f = fs::File::create(&tmp).map_err(err)?;
        f.write_all(text.as_bytes()).map_err(err)?;
        f.sync_all().map_err(err)?;
        drop(f);
        fs::rename(&tmp, &self.file).map_err(err)?;
        if let Some(dir) = self.file.parent() {
            fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(err)?;
        }
        Ok(())
    }

    /// Walks every pin: refreshes the counts and the content kept, and
    /// returns the files to fetch (each content once; a pin inside another
    /// is walked for its counts only).
    fn sweep<B: Backend>(&self, fs: &FsHandle<B>) -> Result<Vec<Wanted>, StoreError> {
        self.recent.lock().clear();
        let pins: Vec<RelPath> = self.paths.read().iter().cloned().collect();
        let mut contents = HashSet::new();
        let mut missing = Vec::new();
        let mut seen = HashSet::new();
        let mut counts = HashMap::new();
        for p in &pins {
            let walked = walk(fs, p)?;
            let nested = pins.iter().any(|q| q != p && p.is_within(q));
            if !nested {
                for w in walked.missing {
                    if seen.insert(w.content) {
                        missing.push(w);
                    }
                }
                contents.extend(walked.contents);
            }
            counts.insert(p.clone(), walked.status);
        }
        contents.extend(self.recent.lock().drain());
        *self.kept.write() = contents;
        // Pins changed during the walk keep the counts they have.
        let now: BTreeSet<RelPath> = self.paths.read().clone();
        let mut held = self.counts.lock();
        held.retain(|p, _| now.contains(p));
        for (p, c) in counts {
            if now.contains(&p) {
                held.insert(p, c);
            }
        }
        Ok(missing)
    }
}

/// The live entry at `rel` if the caller may search every directory above
/// it and read it; `Ok(None)` if there is none.
fn accessible<B: Backend>(
    fs: &FsHandle<B>,
    rel: &RelPath,
    may: &impl Fn(u32, u32, u32, u32) -> bool,
) -> Result<Option<Entry>, PinError> {
    let store = fs.store();
    let live = |p: &RelPath| {
        store.get_live(p).map_err(|source| PinError::Store {
            path: shown(rel),
            source,
        })
    };
    let mut dir = rel.parent();
    while let Some(d) = dir {
        let Some(e) = live(&d)? else {
            return Err(PinError::Missing(shown(rel)));
        };
        if !may(e.record.mode, e.record.uid, e.record.gid, 1) {
            return Err(PinError::Denied(shown(rel)));
        }
        dir = d.parent();
    }
    let Some(e) = live(rel)? else {
        return Err(PinError::Missing(shown(rel)));
    };
    if !may(e.record.mode, e.record.uid, e.record.gid, 4) {
        return Err(PinError::Denied(shown(rel)));
    }
    Ok(Some(e))
}

/// What one walk of a pinned tree found.
struct Walked {
    status: PinStatus,
    /// Content of its live files.
    contents: HashSet<ContentId>,
    /// Its files whose content is not held here and can be fetched.
    missing: Vec<Wanted>,
}

/// Walks the live files at or below `pin`.
fn walk<B: Backend>(fs: &FsHandle<B>, pin: &RelPath) -> Result<Walked, StoreError> {
    let mut out = Walked {
        status: PinStatus {
            path: shown(pin),
            ..PinStatus::default()
        },
        contents: HashSet::new(),
        missing: Vec::new(),
    };
    for (path, entry) in fs.store().subtree(pin)? {
        let r = &entry.record;
        if !entry.is_live() || r.kind != FileKind::File {
            continue;
        }
        out.status.files += 1;
        out.status.bytes += r.size;
        let held = match r.content {
            _ if r.size == 0 => true,
            Some(c) => {
                out.contents.insert(c);
                fs.object_path(&c).exists()
            }
            None => false,
        };
        if held {
            out.status.files_held += 1;
            out.status.bytes_held += r.size;
        } else if let Some(w) = Wanted::of(path.to_string(), r) {
            out.missing.push(w);
        }
    }
    Ok(out)
}

/// The node's task that fetches pinned content: arrivals first, then what
/// the walks find, [`PIN_FETCH_PARALLEL`] at a time, each awaited.
pub(crate) async fn pin_loop<B: Backend>(
    pins: Arc<Pins>,
    fs: FsHandle<B>,
    engine: Arc<Engine>,
    mut queue: mpsc::Receiver<Wanted>,
    cancel: CancellationToken,
) {
    let mut running: JoinSet<(Wanted, Result<(), btfs_torrent::TorrentError>)> = JoinSet::new();
    let mut in_flight: HashSet<ContentId> = HashSet::new();
    let mut waiting: VecDeque<Wanted> = VecDeque::new();
    let mut failed: HashMap<ContentId, Instant> = HashMap::new();
    // The first tick is at once: the walk at start.
    let mut tick = tokio::time::interval(PIN_SWEEP_EVERY);
    let mut due = false;
    // A batch of fetches done asks for a walk (to count again), at most
    // one per `PIN_RECOUNT_GAP`.
    let mut recount = false;
    let mut last_walk = tokio::time::Instant::now();
    loop {
        while running.len() < PIN_FETCH_PARALLEL
            && let Some(w) = waiting.pop_front()
        {
            if in_flight.contains(&w.content)
                || failed
                    .get(&w.content)
                    .is_some_and(|t| t.elapsed() < PIN_RETRY_AFTER)
                || fs.object_path(&w.content).exists()
            {
                continue;
            }
            in_flight.insert(w.content);
            let engine = engine.clone();
            running.spawn(async move {
                let r = engine.fetch(w.clone()).await;
                (w, r)
            });
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            Some(w) = queue.recv(), if waiting.len() < PIN_QUEUE => waiting.push_back(w),
            Some(done) = running.join_next() => {
                match done {
                    Ok((w, r)) => {
                        in_flight.remove(&w.content);
                        match r {
                            Ok(()) if fs.object_path(&w.content).exists() => {
                                failed.remove(&w.content);
                                debug!(path = %w.path, "pinned content fetched");
                            }
                            // Done elsewhere or not at all: not again at once.
                            Ok(()) => {
                                failed.insert(w.content, Instant::now());
                            }
                            Err(e) => {
                                if failed.insert(w.content, Instant::now()).is_none() {
                                    warn!(path = %w.path, "fetching pinned content failed (tried again later): {e}");
                                }
                            }
                        }
                    }
                    Err(e) => warn!("a fetch of pinned content failed: {e}"),
                }
                if running.is_empty() {
                    in_flight.clear();
                    // A batch is done: count again, and find what it missed.
                    recount |= waiting.is_empty();
                }
            }
            _ = pins.sweep.notified() => due = true,
            _ = tick.tick() => due = true,
            _ = tokio::time::sleep_until(last_walk + PIN_RECOUNT_GAP), if recount => due = true,
        }
        if due && waiting.is_empty() {
            (due, recount, last_walk) = (false, false, tokio::time::Instant::now());
            let (p, f) = (pins.clone(), fs.clone());
            match tokio::task::spawn_blocking(move || p.sweep(&f)).await {
                Ok(Ok(missing)) => {
                    if !missing.is_empty() {
                        debug!(files = missing.len(), "pinned files to fetch");
                    }
                    waiting.extend(missing);
                }
                Ok(Err(e)) => warn!("walking the pinned paths: {e}"),
                Err(e) => warn!("walking the pinned paths: {e}"),
            }
            failed.retain(|_, t| t.elapsed() < PIN_RETRY_AFTER);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn the_pins_file_survives_a_restart_and_bad_lines_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(PINS_FILE), "a/b\n/\n\n../up\nc\n").unwrap();
        let (pins, _rx) = Pins::open(dir.path()).unwrap();
        let listed: Vec<String> = pins.list().into_iter().map(|p| p.path).collect();
        assert_eq!(listed, ["/", "a/b", "c"]);
        pins.write(&pins.paths.read().clone()).unwrap();
        assert_eq!(
            fs::read_to_string(dir.path().join(PINS_FILE)).unwrap(),
            "/\na/b\nc\n"
        );
        assert!(!dir.path().join("pins.tmp").exists());
    }

    /// A filesystem over an in-memory store holding `docs/` (0755, uid 1)
    /// with `docs/a` (content not held here), `docs/empty` and
    /// `docs/secret/b` (`secret` is 0700, uid 1).
    fn tree(dir: &Path) -> (btfs_fs::BtfsFs<btfs_store::MemBackend>, Vec<ContentId>) {
        use btfs_core::{InfoHash, NodeId, Owner, Timestamp};
        let node = NodeId([7; 32]);
        let fs = btfs_fs::BtfsFs::new(
            Arc::new(btfs_store::Store::in_memory()),
            btfs_fs::ObjectStore::open(dir).unwrap(),
            btfs_fs::FsConfig {
                node,
                passthrough: false,
                ttl: Duration::from_secs(1),
                state_dir: dir.to_owned(),
                announce: None,
                signer: None,
                content: None,
                history: false,
                metrics: None,
            },
        )
        .unwrap();
        let h = fs.handle();
        let (now, p) = (Timestamp::now(), |s| RelPath::parse(s).unwrap());
        let owner = |mode| Owner {
            mode,
            uid: 1,
            gid: 1,
        };
        let dir_rec = |mode| FileRecord::new_dir(owner(mode), node, now);
        h.commit_local(p("docs"), dir_rec(0o755)).unwrap();
        h.commit_local(p("docs/secret"), dir_rec(0o700)).unwrap();
        let mut contents = Vec::new();
        for (i, name) in ["docs/a", "docs/secret/b"].into_iter().enumerate() {
            let mut r = FileRecord::new_file(owner(0o644), node, now);
            let c = ContentId::of(name.as_bytes());
            (r.size, r.content, r.torrent) =
                (10 + i as u64, Some(c), Some(InfoHash([i as u8; 20])));
            h.commit_local(p(name), r).unwrap();
            contents.push(c);
        }
        let empty = FileRecord::new_file(owner(0o644), node, now);
        h.commit_local(p("docs/empty"), empty).unwrap();
        (fs, contents)
    }

    #[test]
    fn a_pin_counts_what_is_under_it_and_keeps_it_until_unpinned() {
        let dir = tempfile::tempdir().unwrap();
        let (fs, contents) = tree(dir.path());
        let h = fs.handle();
        let (pins, _rx) = Pins::open(dir.path()).unwrap();
        let anyone = |_, _, _, _| true;
        // Other users may not read below `secret`.
        let other = |mode: u32, _, _, want: u32| (mode & 0o7) & want == want;
        let keep = pins.keep();

        let s = pins.pin(&h, "docs", anyone).unwrap();
        assert_eq!(
            (s.files, s.files_held, s.bytes, s.bytes_held),
            (3, 1, 21, 0)
        );
        assert!(contents.iter().all(&keep), "pinned content is kept");
        let missing = pins.sweep(&h).unwrap();
        let mut paths: Vec<&str> = missing.iter().map(|w| w.path.as_str()).collect();
        paths.sort_unstable();
        assert_eq!(paths, ["/docs/a", "/docs/secret/b"]);
        // Again: nothing new; the file lists it once.
        pins.pin(&h, "/docs", anyone).unwrap();
        assert_eq!(
            fs::read_to_string(dir.path().join(PINS_FILE)).unwrap(),
            "docs\n"
        );

        for (path, who, want) in [
            (
                "nothing",
                anyone as fn(u32, u32, u32, u32) -> bool,
                "nothing: no such file or directory",
            ),
            (
                "docs/nothing/x",
                anyone,
                "docs/nothing/x: no such file or directory",
            ),
            ("docs/secret/b", other, "docs/secret/b: permission denied"),
        ] {
            assert_eq!(pins.pin(&h, path, who).unwrap_err().to_string(), want);
        }
        assert_eq!(
            pins.unpin(&h, "docs/a", anyone).unwrap_err().to_string(),
            "docs/a: not pinned itself, but under the pin docs: unpin that"
        );
        assert!(matches!(pins.unpin(&h, "docs", other), Ok(())));
        assert!(pins.list().is_empty());
        assert!(pins.sweep(&h).unwrap().is_empty());
        assert!(
            !keep(&contents[0]),
            "unpinned content is a cache entry again"
        );
        assert_eq!(fs::read_to_string(dir.path().join(PINS_FILE)).unwrap(), "");
    }

    #[test]
    fn a_path_is_covered_by_a_pin_above_it_only() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(PINS_FILE), "photos\n").unwrap();
        let (pins, _rx) = Pins::open(dir.path()).unwrap();
        let p = |s| RelPath::parse(s).unwrap();
        assert!(pins.covers(&p("photos")).is_some());
        assert!(pins.covers(&p("photos/2024/a.jpg")).is_some());
        assert!(pins.covers(&p("photos2/a.jpg")).is_none());
        assert!(pins.covers(&p("")).is_none());
        assert!(matches!(parse("a\nb"), Err(PinError::Newline(_))));
        assert!(matches!(parse("a/../b"), Err(PinError::BadPath { .. })));
        assert!(parse("/").unwrap().is_root());
    }
}
