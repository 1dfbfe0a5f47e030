//! Whole files: fetches into the object store (asked for, or queued by the
//! prefetch policy), followers that fetch ahead of sequential readers, and
//! installs of content whose every piece is here.

use std::{
    collections::HashSet,
    fs, io,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use btfs_core::{ContentId, InfoHash, Wanted};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use tokio::io::AsyncSeekExt as _;

use super::{
    Engine, holders,
    holders::fetches_across,
    live::{Dial, Live, Need},
    write_atomic,
};
use crate::{MemberId, TorrentError, limits::Remote, meta::Metainfo};

/// Prefetches waiting for a worker; more are dropped with a log line (the
/// file is still fetched when it is first read).
pub(super) const PREFETCH_QUEUE: usize = 4096;
/// Bytes read in order after which a reader counts as sequential: the rest
/// of the file is then fetched in the background (at full speed, as a
/// whole-file fetch) for as long as the reader keeps reading.
const SEQUENTIAL_AFTER: u64 = 1 << 20;
/// A sequential reader idle this long stops its background fetch. (Keeping
/// a librqbit stream open for read-ahead instead stalls: once its 32 MiB
/// window is fetched, idle peers stay connected and librqbit's request loop
/// sleeps up to 5 s before serving the next read.)
const FOLLOW_IDLE: Duration = Duration::from_secs(3);
/// How far ahead of a sequential reader the page cache of the file being
/// fetched is filled in, and in what steps (see `warm_ahead`).
const WARM_AHEAD: u64 = 64 << 20;
const WARM_STEP: u64 = 4 << 20;
const WARM_EVERY: Duration = Duration::from_millis(5);
/// Whole-file fetches for this node's zone at once (each started by a
/// member of the zone connecting for content this node fetches across,
/// see `fetch_for_zone`); more members' requests meanwhile start none.
const MAX_ZONE_FETCHES: usize = 4;
/// How long the metainfo of a fetch for the zone is waited for (asked of
/// the member that connected for it, in the same zone).
const ZONE_METAINFO_TIMEOUT: Duration = Duration::from_secs(5);

impl Engine {
    /// Fetches the whole content into the object store.
    pub async fn fetch(&self, want: Wanted) -> Result<(), TorrentError> {
        let object = (self.cfg.object_path)(&want.content);
        if object.exists() {
            return Ok(());
        }
        let started = Instant::now();
        let meta = self.metainfo(&want).await?;
        let mut dial = Dial::Zone;
        loop {
            let in_use = self
                .bring_up(
                    meta.clone(),
                    &want.path,
                    self.net.member_of(&want.author),
                    true,
                    Need::Local,
                    dial,
                )
                .await?;
            let live = in_use.live.clone();
            if !live.on(|s| s.fetch_started()) {
                return Ok(());
            }
            let result = self.fetch_live(&live).await;
            live.on(|s| s.fetch_ended());
            match result {
                // Its zone could not serve it (see `holders::dial_order`):
                // once more, from every member, as with no zone.
                Err(TorrentError::Stalled(_)) if live.zone_only && dial == Dial::Zone => {
                    debug!(path = %want.path, "whole-file fetch stalled within the zone: fetching from every member");
                    dial = Dial::Everyone;
                    drop(in_use);
                    self.restart(&live).await;
                }
                r => {
                    if r.is_ok() && object.exists() {
                        self.metrics
                            .whole_file
                            .observe(started.elapsed().as_secs_f64());
                    }
                    return r;
                }
            }
        }
    }

    /// Fetches the whole file of `ih` for this node's zone, in the
    /// background, when `from`, a member of the zone, connects for it, the
    /// content is not complete here, and this node is the zone's fetcher
    /// for it (`holders::fetches_across`). The zone's other members dial
    /// their zone only, and get the file from this one as it arrives, even
    /// if nobody here reads it. At most one such fetch per
    /// torrent, `MAX_ZONE_FETCHES` at once, each ending with the engine.
    /// The metainfo, if not kept here, is asked of `from` (it has it: it
    /// connected for the torrent), checked against `ih`, and kept only if
    /// the fetch is this node's to make.
    pub(super) async fn fetch_for_zone(self: &Arc<Self>, ih: InfoHash, from: &MemberId) {
        let Some(zone) = self.cfg.zone.as_deref() else {
            return;
        };
        if self.net.zone_of(from).as_deref() != Some(zone) {
            return;
        }
        let live = self.live_of(&ih);
        if live
            .as_ref()
            .is_some_and(|l| l.is_complete() || l.state().fetching())
            || self.zone_fetches.lock().contains(&ih)
        {
            return;
        }
        let (meta, asked) = match live {
            Some(l) => (l.meta.clone(), false),
            None => match self.zone_metainfo(ih, from).await {
                Some(m) => m,
                None => return,
            },
        };
        if (self.cfg.object_path)(&meta.content).exists() {
            return;
        }
        let members = self.net.members();
        let in_zone = self.in_zone(&members).unwrap_or_default();
        let known = self.holders.lock().of(&meta.content).to_vec();
        if !fetches_across(&meta.content, &self.cfg.member, &in_zone, &known) {
            return;
        }
        // Kept only now: a member that is not the zone's fetcher keeps no
        // metainfo for content it does not hold.
        if asked && let Err(e) = write_atomic(&self.torrent_path(&ih), &meta.bytes) {
            return warn!(torrent = %ih, "could not keep the metainfo: {e}");
        }
        let Some(slot) = ZoneFetch::take(self, ih) else {
            return debug!(torrent = %ih, "{MAX_ZONE_FETCHES} fetches for the zone under way: not this one");
        };
        let label = format!("torrent {ih} (for zone {zone})");
        // Brought up before the member's connection is served, so that
        // it joins the torrent being fetched (a torrent brought up for the
        // connection alone would be added again for the fetch, closing it).
        let in_use = match self
            .bring_up(meta, &label, None, true, Need::Peer, Dial::Zone)
            .await
        {
            Ok(u) => u,
            Err(e) => return debug!(torrent = %ih, "no fetch for the zone: {e}"),
        };
        let live = in_use.live.clone();
        if !live.on(|s| !s.fetching() && s.fetch_started()) {
            return;
        }
        debug!(torrent = %ih, member = %from, "fetching across zones for this node's zone");
        let this = self.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let fetched = tokio::select! {
                _ = this.cancel.cancelled() => None,
                r = this.fetch_live(&live) => Some(r),
            };
            live.on(|s| s.fetch_ended());
            drop(in_use);
            match fetched {
                Some(Ok(())) => debug!(torrent = %ih, "fetched for the zone"),
                Some(Err(e)) => debug!(torrent = %ih, "fetch for the zone: {e}"),
                None => {}
            }
        });
    }

    /// The metainfo of `ih` kept here, else asked of `from` (then of the
    /// other members) within `ZONE_METAINFO_TIMEOUT` and checked against
    /// `ih`; with whether it was asked. Asking counts as a bring-up on
    /// `from`'s behalf (`MEMBER_BRING_UP_BURST`): a member cannot make
    /// this node ask for metainfo faster than it may bring torrents up.
    async fn zone_metainfo(&self, ih: InfoHash, from: &MemberId) -> Option<(Arc<Metainfo>, bool)> {
        let (bytes, asked) = match self.local_metainfo(&ih) {
            Some(b) => (b, false),
            None => {
                let key = Remote::Member(*from).key();
                if !self.limits.bring_ups.try_take(&key, Instant::now()) {
                    self.limits
                        .member_bring_ups_refused
                        .fetch_add(1, Ordering::Relaxed);
                    return None;
                }
                let ask = self.net.metainfo(ih, Some(*from));
                match tokio::time::timeout(ZONE_METAINFO_TIMEOUT, ask).await {
                    Ok(Some(b)) => (b, true),
                    _ => {
                        debug!(torrent = %ih, member = %from, "no metainfo to fetch for the zone");
                        return None;
                    }
                }
            }
        };
        match Metainfo::parse(bytes, &ih) {
            Ok(m) => Some((Arc::new(m), asked)),
            Err(e) => {
                if asked {
                    self.metainfo_refused.fetch_add(1, Ordering::Relaxed);
                }
                warn!(torrent = %ih, "refused metainfo for a fetch for the zone: {e}");
                None
            }
        }
    }

    async fn fetch_live(&self, live: &Arc<Live>) -> Result<(), TorrentError> {
        self.select(live, HashSet::from([0usize])).await?;
        let _steer = self.steer(live).await;
        // No deadline on the whole file, only on progress.
        let stall = self.settings.read_timeout();
        let mut last = (Instant::now(), 0u64);
        loop {
            tokio::select! {
                done = live.handle.wait_until_completed() => {
                    done.map_err(TorrentError::session)?;
                    break;
                }
                _ = tokio::time::sleep(Duration::from_secs(1)) => {
                    let have = live.handle.live().map_or(0, |l| l.get_approx_have_bytes());
                    if have != last.1 {
                        last = (Instant::now(), have);
                    } else if last.0.elapsed() > stall {
                        return Err(TorrentError::Stalled(stall));
                    }
                }
            }
        }
        self.install(live).await
    }

    /// Where this node's whole-file fetch of `live` begins, while the
    /// result is held: a librqbit stream left open at a place of its own
    /// in the file, so that members fetching the same file at once (the
    /// whole cluster reading a new image) start from different parts of
    /// it and trade them, instead of all asking its holder for the same
    /// first pieces. librqbit fetches a stream's next 32 MiB first, then
    /// the rest in order. The place is this node's rank for the content
    /// (rendezvous hashing, as for zones) among itself and the members
    /// connected now that do not hold it (its author, announced holders);
    /// `None` (start at the beginning) when no such member is connected,
    /// or at rank 0.
    pub(super) async fn steer(&self, live: &Live) -> Option<impl Sized + use<>> {
        let content = &live.meta.content;
        // Members that hold it whole fetch nothing: no place for them.
        let holders: Vec<MemberId> = self.holders.lock().of(content).to_vec();
        let members: Vec<MemberId> = self
            .net
            .members()
            .into_iter()
            .filter(|m| Some(*m) != live.holder && !holders.contains(m))
            .collect();
        if members.is_empty() {
            return None;
        }
        let mine = holders::rank(content, &self.cfg.member);
        let below = members
            .iter()
            .filter(|m| **m != self.cfg.member && holders::rank(content, m) < mine)
            .count();
        let slots = members.len() + 1;
        let pieces = live.meta.piece_count().ok()?;
        let piece = pieces * below / slots;
        if piece == 0 {
            return None;
        }
        let offset = piece as u64 * u64::from(live.meta.piece_length);
        let mut stream = live.handle.clone().stream(0).await.ok()?;
        stream.seek(std::io::SeekFrom::Start(offset)).await.ok()?;
        debug!(path = %live.label.lock(), offset, "whole-file fetch starts at its own place");
        Some(stream)
    }

    /// Selects the files of `live` that librqbit fetches.
    async fn select(&self, live: &Live, files: HashSet<usize>) -> Result<(), TorrentError> {
        let (session, handle) = (self.session.clone(), live.handle.clone());
        self.bt
            .run(async move { session.update_only_files(&handle, &files).await })
            .await?
            .map_err(TorrentError::session)
    }

    /// Installs content whose every piece reads have seen (readers that
    /// read it all, in whatever order, leave a whole object behind).
    pub(super) fn install_if_whole(self: &Arc<Self>, live: &Arc<Live>) {
        if live.is_complete() || !live.has_every_piece() {
            return;
        }
        if !live.on(|s| s.install_queued()) {
            return;
        }
        let (this, live) = (self.clone(), live.clone());
        tokio::spawn(async move {
            if let Err(e) = this.install(&live).await {
                warn!(path = %live.label.lock(), "fetched content not installed: {e}");
            }
            live.on(|s| s.install_ended());
        });
    }

    /// Moves complete, verified content into the object store.
    async fn install(&self, live: &Arc<Live>) -> Result<(), TorrentError> {
        let _one = live.install_lock.lock().await;
        if live.is_complete() {
            return Ok(());
        }
        let from = live.data.lock().clone();
        let content = live.meta.content;
        let to = (self.cfg.object_path)(&content);
        let installed = to.clone();
        tokio::task::spawn_blocking(move || -> Result<(), TorrentError> {
            let mut h = blake3::Hasher::new();
            h.update_mmap_rayon(&from)?;
            let got = ContentId::from(h.finalize());
            if got != content {
                return Err(TorrentError::Mismatch(content.to_hex()));
            }
            if let Some(dir) = to.parent() {
                fs::create_dir_all(dir)?;
            }
            // librqbit keeps its descriptor: it seeds the object from now on.
            fs::rename(&from, &to)?;
            Ok(())
        })
        .await
        .map_err(|e| TorrentError::Io(io::Error::other(e)))??;
        *live.data.lock() = installed;
        live.on(|s| s.installed());
        // Fetched content is cache: its marker names who else holds it, and
        // its mtime is its last use.
        let marker = self.cfg.dir.join("fetched").join(content.to_hex());
        let holder = live.holder.map(|m| m.to_string()).unwrap_or_default();
        if let Err(e) = fs::write(&marker, holder) {
            warn!("could not record fetched content for the cache: {e}");
        }
        let _ = fs::remove_file(self.resume_path(&live.meta.info_hash));
        info!(path = %live.label.lock(), content = %content.short(), "fetched in full: seeding it");
        self.net.announce(vec![content], Vec::new());
        Ok(())
    }

    /// Queues a whole-file fetch (prefetch policy); never blocks.
    pub fn prefetch(&self, want: Wanted) {
        if (self.cfg.object_path)(&want.content).exists() {
            return;
        }
        if let Err(e) = self.prefetch_tx.try_send(want) {
            let label = match &e {
                mpsc::error::TrySendError::Full(w) | mpsc::error::TrySendError::Closed(w) => {
                    w.path.clone()
                }
            };
            warn!(path = %label, "prefetch queue full: fetched when first read instead");
        }
    }

    pub(super) async fn prefetcher(
        self: Arc<Self>,
        rx: Arc<tokio::sync::Mutex<mpsc::Receiver<Wanted>>>,
    ) {
        loop {
            let next = tokio::select! {
                _ = self.cancel.cancelled() => return,
                w = async { rx.lock().await.recv().await } => w,
            };
            let Some(want) = next else { return };
            let label = want.path.clone();
            match self.fetch(want).await {
                Ok(()) => debug!(path = %label, "prefetched"),
                Err(e) => warn!(path = %label, "prefetch failed: {e}"),
            }
        }
    }

    /// Tracks sequential reading; past `SEQUENTIAL_AFTER` bytes in order,
    /// starts a background fetch that follows the reader.
    pub(super) fn note_read(self: &Arc<Self>, live: &Arc<Live>, offset: u64, end: u64) {
        let run = {
            let mut seq = live.sequential.lock();
            seq.1 = if seq.0 == offset {
                seq.1 + (end - offset)
            } else {
                0
            };
            seq.0 = end;
            seq.2 = Instant::now();
            seq.1
        };
        if run >= SEQUENTIAL_AFTER && live.on(|s| s.sequential_reader()) {
            tokio::spawn(self.clone().follow(live.clone()));
        }
    }

    /// Fetches the rest of the file while its sequential reader keeps
    /// reading; stops `FOLLOW_IDLE` after its last read.
    async fn follow(self: Arc<Self>, live: Arc<Live>) {
        let label = live.label.lock().clone();
        let in_use = match self
            .bring_up(
                live.meta.clone(),
                &label,
                live.holder,
                true,
                Need::Local,
                live.dial,
            )
            .await
        {
            Ok(u) => u,
            Err(e) => {
                live.on(|s| s.follower_stopped());
                return debug!(path = %label, "background fetch: {e:#}");
            }
        };
        let live = in_use.live.clone();
        // Brought up again meanwhile (a stalled read), it may not know.
        live.on(|s| s.follower_attached());
        debug!(path = %live.label.lock(), "sequential reader: fetching ahead in the background");
        let all = HashSet::from([0usize]);
        if let Err(e) = self.select(&live, all).await {
            live.on(|s| s.follower_stopped());
            return debug!("background fetch: {e:#}");
        }
        let _steer = self.steer(&live).await;
        // Stops the warmer however this task ends, dropped at shutdown
        // included: a blocking task that never ends would hold up the
        // runtime's shutdown.
        let warming = StopOnDrop(Arc::new(AtomicBool::new(true)));
        let warmer = tokio::task::spawn_blocking({
            let (live, warming) = (live.clone(), warming.0.clone());
            move || warm_ahead(&live, &warming)
        });
        let completed = loop {
            tokio::select! {
                done = live.handle.wait_until_completed() => break done.is_ok(),
                _ = tokio::time::sleep(Duration::from_millis(500)) => {
                    if live.sequential.lock().2.elapsed() > FOLLOW_IDLE {
                        break false;
                    }
                }
            }
        };
        drop(warming);
        let _ = warmer.await;
        if completed {
            if let Err(e) = self.install(&live).await {
                warn!(path = %live.label.lock(), "fetched content not installed: {e}");
            }
        } else if !live.state().fetching()
            && let Err(e) = self.select(&live, HashSet::new()).await
        {
            debug!("stopping a background fetch: {e:#}");
        }
        live.on(|s| s.follower_stopped());
    }
}

/// A slot of `Engine::zone_fetches`: the torrent is fetched for the zone
/// until it is dropped.
struct ZoneFetch {
    engine: Arc<Engine>,
    ih: InfoHash,
}

impl ZoneFetch {
    /// A slot for `ih`, unless it has one or `MAX_ZONE_FETCHES` are taken.
    fn take(engine: &Arc<Engine>, ih: InfoHash) -> Option<Self> {
        let mut taken = engine.zone_fetches.lock();
        if taken.len() >= MAX_ZONE_FETCHES || !taken.insert(ih) {
            return None;
        }
        Some(Self {
            engine: engine.clone(),
            ih,
        })
    }
}

impl Drop for ZoneFetch {
    fn drop(&mut self) {
        self.engine.zone_fetches.lock().remove(&self.ih);
    }
}

/// Clears its flag when dropped.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// Fills in the page cache of `live`'s file up to `WARM_AHEAD` past its
/// sequential reader, `WARM_STEP` at a time, until `warming` goes false.
///
/// librqbit writes each received chunk on its one thread, and a chunk that
/// lands on a page not yet in the page cache costs that thread the page's
/// allocation (on a VM whose memory the host backs lazily, a fault in the
/// host too: seconds per GiB, see docs/BENCHMARKS.md). Readahead of the
/// part of the file about to be written (holes read as zeros) moves that
/// cost to this thread; librqbit then writes into pages that are there. It
/// only reads, so it cannot disturb what librqbit wrote.
fn warm_ahead(live: &Live, warming: &AtomicBool) {
    use nix::fcntl::{PosixFadviseAdvice, posix_fadvise};
    let path = live.data.lock().clone();
    let Ok(file) = fs::File::open(&path) else {
        return;
    };
    let size = live.meta.size;
    let mut warmed = 0u64;
    while warming.load(Ordering::Acquire) {
        let at = live.sequential.lock().0;
        if at != u64::MAX {
            warmed = warmed.max(at);
            let to = at.saturating_add(WARM_AHEAD).min(size);
            while warmed < to {
                let n = WARM_STEP.min(to - warmed);
                let (Ok(off), Ok(len)) = (i64::try_from(warmed), i64::try_from(n)) else {
                    return;
                };
                if posix_fadvise(&file, off, len, PosixFadviseAdvice::POSIX_FADV_WILLNEED).is_err()
                {
                    return;
                }
                warmed += n;
            }
        }
        std::thread::sleep(WARM_EVERY);
    }
}
