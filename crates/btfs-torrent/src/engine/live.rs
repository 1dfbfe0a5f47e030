//! Live torrents: bringing them up for a use (under the live cap), adding
//! them to librqbit, retiring them (idle, restarted, or to make room), and
//! what each knows of its pieces.

use std::{
    fs,
    ops::Range,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use btfs_core::InfoHash;
use librqbit::{
    AddTorrent, AddTorrentOptions, ManagedTorrent, PeerConnectionOptions, Session,
    api::TorrentIdOrHash,
};
use parking_lot::Mutex;
use tracing::{debug, info, warn};

use super::{
    Engine,
    holders::{ZoneView, dial_order},
    lifecycle::Lifecycle,
    seed::Seeded,
    with_kept, write_atomic,
};
use crate::{
    MemberId, TorrentError,
    limits::{self, Usage},
    meta::Metainfo,
};

/// A torrent unused for this long is retired.
pub(super) const IDLE_LIVE: Duration = Duration::from_secs(30);
/// How often the pieces reads verified are written down.
const KEEP_HAVES_EVERY: Duration = Duration::from_secs(1);
/// How often idle torrents are looked for.
const REAP_EVERY: Duration = Duration::from_secs(5);
/// Chunk requests (16 KiB each) librqbit keeps outstanding per peer, never
/// more than the peer's `reqq`, in a torrent fetched whole (a prefetch, a
/// followed sequential reader). librqbit's default, 128 (2 MiB), left a
/// full-file read window-bound through the wire's two bridges and three TCP
/// legs (see docs/BENCHMARKS.md). The cost: a newly needed piece (a seek
/// during a fetch) is requested after the 8 MiB already asked for.
pub(super) const PEER_REQUEST_WINDOW: usize = 512;
/// The same in a torrent brought up for reads: a read's stream keeps the
/// window full with the pieces after the read's, which arrive even though
/// the stream is dropped at once; a smaller window fetches less for small
/// reads (see docs/BENCHMARKS.md).
///
/// Invariant: the window (2 MiB) is more than `SEQUENTIAL_AFTER` and a
/// read. After a read, librqbit's request loop finds nothing to ask for
/// and sleeps up to 5 s, and a new stream does not wake it: a read that
/// needs a piece not yet asked for waits `STALL_QUIET` and brings the
/// torrent up again. A sequential reader should be followed before it
/// reads past what its first read brought.
const READ_REQUEST_WINDOW: usize = 128;

/// The window, in a torrent that dials two members or more, for every use.
/// librqbit picks pieces in order and asks one peer for each: a deep window
/// towards a holder whose link is shared by many readers (the writer of a
/// file the whole cluster reads) reserves pieces there that a less busy
/// member could send sooner, and librqbit then asks for them again
/// elsewhere ("steals" them) while the first copy is still coming, so the
/// busy link carries them twice. 1 MiB a connection keeps a link of a few
/// hundred Mbit/s busy at the few milliseconds a wire adds, and leaves the
/// rest of the file to whichever member has it first (see the cluster lab
/// in docs/BENCHMARKS.md).
pub(super) const SHARED_REQUEST_WINDOW: usize = 64;

/// A live torrent.
type ManagedTorrentHandle = Arc<ManagedTorrent>;

pub(super) struct Live {
    pub(super) handle: ManagedTorrentHandle,
    pub(super) meta: Arc<Metainfo>,
    /// The file librqbit reads and writes.
    pub(super) data: Mutex<PathBuf>,
    /// Its content, and what is under way on it.
    state: Mutex<Lifecycle>,
    pieces: Mutex<Pieces>,
    last_used: Mutex<Instant>,
    /// Users of any kind (`InUse`), and those on this node's behalf.
    users: AtomicUsize,
    local_users: AtomicUsize,
    pub(super) label: Mutex<String>,
    /// Where the last read ended, the bytes read in order up to it, and
    /// when.
    pub(super) sequential: Mutex<(u64, u64, Instant)>,
    /// The member known to hold the content (its author), if any.
    pub(super) holder: Option<MemberId>,
    /// Whom it was added to dial, and whether that left other zones out
    /// (`holders::dial_order`).
    pub(super) dial: Dial,
    pub(super) zone_only: bool,
    /// Serializes installs into the object store from every path.
    pub(super) install_lock: tokio::sync::Mutex<()>,
}

/// Pieces known to be verified here (a subset of librqbit's bitfield).
struct Pieces {
    have: Vec<bool>,
    /// Pieces were marked since the bitfield was last kept.
    dirty: bool,
}

impl Live {
    /// Where it stands now.
    pub(super) fn state(&self) -> Lifecycle {
        *self.state.lock()
    }

    /// Moves its lifecycle on (`event` is one of `Lifecycle`'s events).
    pub(super) fn on<R>(&self, event: impl FnOnce(&mut Lifecycle) -> R) -> R {
        event(&mut self.state.lock())
    }

    pub(super) fn is_complete(&self) -> bool {
        self.state().is_complete()
    }

    fn touch(&self) {
        *self.last_used.lock() = Instant::now();
    }

    /// What it is used for, to decide whether it can be retired.
    pub(super) fn usage(&self) -> Usage {
        Usage {
            last_used: *self.last_used.lock(),
            users: self.users.load(Ordering::Acquire),
            local_users: self.local_users.load(Ordering::Acquire),
            busy: self.state().busy(),
        }
    }

    /// Whether anything uses it now.
    pub(super) fn in_use(&self) -> bool {
        self.users.load(Ordering::Acquire) > 0
    }

    pub(super) fn pieces_of(&self, offset: u64, end: u64) -> Range<usize> {
        // Never 0 (`add` checks the metainfo); guarded all the same.
        let pl = u64::from(self.meta.piece_length.max(1));
        let index = |p: u64| usize::try_from(p).unwrap_or(usize::MAX);
        index(offset / pl)..index(end.div_ceil(pl))
    }

    /// Whether pieces `r` are verified here: known from earlier reads, or
    /// asked of librqbit (a background fetch brings pieces no read saw).
    pub(super) fn has(&self, session: &Arc<Session>, r: Range<usize>) -> bool {
        if self.is_complete()
            || self
                .pieces
                .lock()
                .have
                .get(r.clone())
                .is_some_and(|h| h.iter().all(|b| *b))
        {
            return true;
        }
        let api = librqbit::Api::new(session.clone(), None);
        let Ok((bits, _)) = api.api_dump_haves(TorrentIdOrHash::Id(self.handle.id())) else {
            return false;
        };
        let raw = bits.as_raw_slice();
        let all = r
            .clone()
            .all(|p| raw.get(p / 8).is_some_and(|b| b & (0x80 >> (p % 8)) != 0));
        if all {
            self.mark(r);
        }
        all
    }

    /// Whether reads have seen every piece verified.
    pub(super) fn has_every_piece(&self) -> bool {
        self.pieces.lock().have.iter().all(|h| *h)
    }

    pub(super) fn mark(&self, r: Range<usize>) {
        let mut pieces = self.pieces.lock();
        for p in r {
            if let Some(h) = pieces.have.get_mut(p)
                && !*h
            {
                *h = true;
                pieces.dirty = true;
            }
        }
    }

    /// Whether its pieces are to be kept now: partial, and marked since
    /// they were last kept (then they count as kept).
    fn take_dirty(&self) -> bool {
        if self.is_complete() {
            return false;
        }
        std::mem::take(&mut self.pieces.lock().dirty)
    }

    /// The pieces known here as a BitTorrent bitfield.
    fn have_bits(&self) -> Vec<u8> {
        let pieces = self.pieces.lock();
        let mut bits = vec![0u8; pieces.have.len().div_ceil(8)];
        for (p, h) in pieces.have.iter().enumerate() {
            if *h {
                bits[p / 8] |= 0x80 >> (p % 8);
            }
        }
        bits
    }
}

/// Whom a torrent is brought up and used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Need {
    /// This node: a read, a fetch, a follower. Never refused for want of
    /// room under `max_live`: local reads take priority over members. Room
    /// is made by retiring the least recently used idle torrent, else the
    /// least recently used one only members' connections use (they are
    /// closed); with every live torrent in local use, the cap is exceeded
    /// (by at most the torrents this node reads and fetches at once).
    Local,
    /// A member's handshake or metainfo request: refused
    /// (`TorrentError::NoRoom`) when no live torrent is idle.
    Peer,
}

/// Which members a partial torrent dials when it is added.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Dial {
    /// As this node's zone decides (`holders::dial_order`; every member
    /// without `zone=`).
    Zone,
    /// Every connected member, as with no zone: after a read or a fetch
    /// made no progress within the zone, so that zones never make one
    /// fail.
    Everyone,
}

/// Counts a user of a live torrent for as long as it is held.
pub(super) struct InUse {
    pub(super) live: Arc<Live>,
    need: Need,
}

impl InUse {
    fn new(l: Arc<Live>, need: Need) -> Self {
        if need == Need::Local {
            l.local_users.fetch_add(1, Ordering::AcqRel);
        }
        l.users.fetch_add(1, Ordering::AcqRel);
        l.touch();
        Self { live: l, need }
    }
}

impl Drop for InUse {
    fn drop(&mut self) {
        self.live.touch();
        self.live.users.fetch_sub(1, Ordering::AcqRel);
        if self.need == Need::Local {
            self.live.local_users.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Engine {
    pub(super) fn live_of(&self, ih: &InfoHash) -> Option<Arc<Live>> {
        self.live.lock().get(ih).cloned()
    }

    /// The live torrent of `ih` in use for a member, if it is live.
    pub(super) fn live_for_peer(&self, ih: &InfoHash) -> Option<InUse> {
        self.live_of(ih).map(|l| InUse::new(l, Need::Peer))
    }

    /// Whether `live` is still the live torrent of its hash (not retired,
    /// nor brought up again since).
    pub(super) fn is_current(&self, live: &Arc<Live>) -> bool {
        self.live
            .lock()
            .get(&live.meta.info_hash)
            .is_some_and(|l| Arc::ptr_eq(l, live))
    }

    /// The live torrent of `meta`, added if needed, in use for `need` while
    /// the result is held: seeding the object when it is here, else lazily
    /// fetching into `bt/partial/`. A torrent wanted `whole` that was
    /// brought up for reads is added again for a whole-file fetch (see
    /// `PEER_REQUEST_WINDOW`), keeping its pieces (and dialling everyone
    /// if it did). A torrent added here dials as `dial` says; one live
    /// already is used as it is. Adding one past `max_live` first makes
    /// room (`make_room`).
    pub(super) async fn bring_up(
        &self,
        meta: Arc<Metainfo>,
        label: &str,
        first: Option<MemberId>,
        whole: bool,
        need: Need,
        dial: Dial,
    ) -> Result<InUse, TorrentError> {
        let suits = |l: &Live| l.state().suits(whole);
        if let Some(l) = self.live_of(&meta.info_hash)
            && suits(&l)
        {
            return Ok(InUse::new(l, need));
        }
        let _adding = self.adding.lock().await;
        let Some(old) = self.live_of(&meta.info_hash) else {
            self.make_room(need).await?;
            let l = self.add(meta, label, first, whole, dial, None).await?;
            return Ok(InUse::new(l, need));
        };
        if suits(&old) {
            return Ok(InUse::new(old, need));
        }
        debug!(torrent = %meta.info_hash, %label, "bringing a torrent up again for a whole-file fetch");
        self.live.lock().remove(&meta.info_hash);
        self.retire(&old).await;
        let first = first.or(old.holder);
        // A torrent that fell back to every member stays so.
        let dial = if old.dial == Dial::Everyone {
            Dial::Everyone
        } else {
            dial
        };
        let l = self
            .add(meta, label, first, whole, dial, Some(&old))
            .await?;
        Ok(InUse::new(l, need))
    }

    /// Makes room for one more live torrent under `max_live` (with the
    /// `adding` lock held): retires the least recently used torrent that
    /// `need` may take (`limits::lru_victim`), the way the reaper retires
    /// idle ones. A member's bring-up finding none is refused; a local one
    /// goes over the cap (see `Need`).
    async fn make_room(&self, need: Need) -> Result<(), TorrentError> {
        let max = self.cfg.max_live.max(1);
        loop {
            let victim = {
                let mut live = self.live.lock();
                if live.len() < max {
                    return Ok(());
                }
                let usage = live.iter().map(|(ih, l)| (*ih, l.usage()));
                match limits::lru_victim(usage, need == Need::Local) {
                    Some(ih) => live.remove(&ih),
                    None if need == Need::Local => return Ok(()),
                    None => {
                        self.limits.live_refused.fetch_add(1, Ordering::Relaxed);
                        return Err(TorrentError::NoRoom { live: live.len() });
                    }
                }
            };
            if let Some(l) = victim {
                debug!(torrent = %l.meta.info_hash, max_live = max, "retiring the least recently used torrent to make room");
                self.retire(&l).await;
            }
        }
    }

    /// Adds the torrent of `meta` to the session (`bring_up`, under the
    /// `adding` lock). A torrent added again in place of `old` takes over
    /// what its readers did (the sequential reader and its follower).
    async fn add(
        &self,
        meta: Arc<Metainfo>,
        label: &str,
        first: Option<MemberId>,
        whole: bool,
        dial: Dial,
        old: Option<&Live>,
    ) -> Result<Arc<Live>, TorrentError> {
        let ih = meta.info_hash;
        let object = (self.cfg.object_path)(&meta.content);
        let complete = object.exists();
        let folder = if complete {
            object.parent().map(Path::to_path_buf).unwrap_or_default()
        } else {
            self.cfg.dir.join("partial")
        };
        let data = folder.join(meta.content.to_hex());
        // Fastresume: librqbit loads `<infohash>.bitv` and spot-checks it.
        let bitv = self.session_bitv_path(&ih);
        let resume = self.resume_path(&ih);
        // Bounded (`MAX_PIECES`) and nonzero piece length, checked again
        // here before anything is allocated per piece.
        let pieces = meta.piece_count()?;
        let bytes = pieces.div_ceil(8);
        let mut have = vec![false; pieces];
        if complete {
            let mut bits = vec![0xffu8; bytes];
            // Below 8: `bytes * 8` is the piece count rounded up to 8.
            let extra = (bytes * 8 - pieces) as u32;
            if let Some(last) = bits.last_mut() {
                *last = 0xffu8.checked_shl(extra).unwrap_or(0);
            }
            fs::write(&bitv, bits)?;
        } else {
            // A seed (a version superseded here, `seed`): its pieces are
            // found now, and kept as if fetched. Its marker is newer than
            // any kept bitfield of the content.
            let seeded = if data.exists() {
                self.seed_bits(&meta, &data).await
            } else {
                Seeded::No
            };
            let kept = match seeded {
                Seeded::No => fs::read(&resume).ok(),
                Seeded::Bits(bits) => Some(bits),
                Seeded::Failed => None,
            };
            match kept {
                Some(bits) if bits.len() == bytes && data.exists() => {
                    for (p, h) in have.iter_mut().enumerate() {
                        *h = bits[p / 8] & (0x80 >> (p % 8)) != 0;
                    }
                    fs::write(&bitv, bits)?
                }
                _ => {
                    let _ = fs::remove_file(&bitv);
                    // Kept pieces of a file that is gone (evicted) would be
                    // joined to the new file's when it is retired.
                    let _ = fs::remove_file(&resume);
                    // Without a bitfield librqbit would hash the whole file
                    // on librqbit's one thread, stalling every other torrent
                    // meanwhile. Only a crash within a second of the first
                    // pieces leaves this: start over.
                    if data.exists() {
                        info!(torrent = %ih, %label, "partial content with no record of its pieces: fetching it again");
                        fs::remove_file(&data)?;
                    }
                }
            }
        }
        // A complete torrent waits for members to come (dialling them too
        // would double every connection); a partial one dials them.
        let mut peers = Vec::new();
        let mut zone_only = false;
        let mut dialled = 0;
        if !complete {
            let members = self.net.members();
            let in_zone = match dial {
                Dial::Zone => self.in_zone(&members),
                Dial::Everyone => None,
            };
            let zone = in_zone.as_deref().map(|in_zone| ZoneView {
                me: &self.cfg.member,
                in_zone,
            });
            let order = {
                let holders = self.holders.lock();
                dial_order(
                    &meta.content,
                    first.as_ref(),
                    holders.of(&meta.content),
                    &members,
                    zone,
                )
            };
            zone_only = order.zone_only;
            dialled = order.members.len();
            let mut table = self.peers.lock();
            for m in &order.members {
                peers.extend(table.addrs_of(m));
            }
        }
        debug!(torrent = %ih, %label, complete, peers = peers.len(), zone_only, ?dial, "bringing up");
        // With several members to fetch from, one window for every use (so
        // the torrent is never added again for a whole-file fetch).
        let shared = dialled >= 2;
        let window = if shared {
            SHARED_REQUEST_WINDOW
        } else if whole {
            PEER_REQUEST_WINDOW
        } else {
            READ_REQUEST_WINDOW
        };
        let whole = whole || complete || shared;
        let opts = AddTorrentOptions {
            paused: false,
            // Lazy: nothing selected, reads fetch what they touch.
            only_files: if complete { None } else { Some(vec![]) },
            overwrite: true,
            output_folder: Some(folder.to_string_lossy().into_owned()),
            initial_peers: Some(peers),
            peer_opts: Some(PeerConnectionOptions {
                max_request_window: Some(window),
                ..Default::default()
            }),
            ..Default::default()
        };
        let (session, torrent) = (self.session.clone(), meta.bytes.clone());
        let added = self
            .bt
            .run(async move {
                session
                    .add_torrent(AddTorrent::from_bytes(torrent), Some(opts))
                    .await
            })
            .await?
            .map_err(TorrentError::session)?;
        let handle = added.into_handle().ok_or(TorrentError::SessionUnexpected(
            "torrent added as list-only",
        ))?;
        handle
            .wait_until_initialized()
            .await
            .map_err(TorrentError::session)?;
        let followed = old.is_some_and(|o| o.state().followed());
        let live = Arc::new(Live {
            handle,
            meta,
            data: Mutex::new(data),
            state: Mutex::new(Lifecycle::added(complete, whole, followed)),
            pieces: Mutex::new(Pieces { have, dirty: false }),
            last_used: Mutex::new(Instant::now()),
            users: AtomicUsize::new(0),
            local_users: AtomicUsize::new(0),
            label: Mutex::new(label.to_owned()),
            sequential: Mutex::new(
                old.map_or((u64::MAX, 0, Instant::now()), |o| *o.sequential.lock()),
            ),
            holder: first,
            dial,
            zone_only,
            install_lock: tokio::sync::Mutex::new(()),
        });
        self.live.lock().insert(ih, live.clone());
        Ok(live)
    }

    /// Of `members`, those that told this node's zone (`None` without
    /// `zone=`).
    pub(super) fn in_zone(&self, members: &[MemberId]) -> Option<Vec<MemberId>> {
        let zone = self.cfg.zone.as_deref()?;
        Some(
            members
                .iter()
                .filter(|m| self.net.zone_of(m).as_deref() == Some(zone))
                .copied()
                .collect(),
        )
    }

    /// Takes a torrent out of the session, keeping what it fetched.
    pub(super) async fn retire(&self, l: &Live) {
        let ih = l.meta.info_hash;
        if let Some(s) = l.handle.live() {
            self.retired_down
                .fetch_add(s.get_downloaded_bytes(), Ordering::Relaxed);
            self.retired_up
                .fetch_add(s.get_uploaded_bytes(), Ordering::Relaxed);
        }
        if !l.is_complete() {
            // librqbit's bitfield (flushed lazily) joined with the pieces
            // reads saw verified: both only claim verified pieces.
            let bitv = self.session_bitv_path(&ih);
            let resume = self.resume_path(&ih);
            let bits = with_kept(&resume, with_kept(&bitv, l.have_bits()));
            if let Err(e) = write_atomic(&resume, &bits) {
                warn!(torrent = %ih, "could not keep the pieces fetched so far: {e}");
            }
        }
        let (session, id) = (self.session.clone(), l.handle.id());
        match self
            .bt
            .run(async move { session.delete(TorrentIdOrHash::Id(id), false).await })
            .await
        {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(torrent = %ih, "retiring: {e:#}"),
            Err(e) => warn!(torrent = %ih, "retiring: {e}"),
        }
    }

    /// Retires `live` (if still the live torrent of its hash) so that the
    /// next use adds it again.
    pub(super) async fn restart(&self, live: &Arc<Live>) {
        // Held until librqbit has let go of it: adding the same torrent
        // meanwhile would give back the handle being deleted.
        let _adding = self.adding.lock().await;
        let removed = {
            let mut map = self.live.lock();
            match map.get(&live.meta.info_hash) {
                Some(l) if Arc::ptr_eq(l, live) => map.remove(&live.meta.info_hash),
                _ => None,
            }
        };
        if let Some(l) = removed {
            self.retire(&l).await;
        }
    }

    /// Keeps the pieces reads verified, every `KEEP_HAVES_EVERY`, so that a
    /// crash loses at most that much (librqbit flushes its own bitfield
    /// only every 16 MiB).
    pub(super) async fn keep_haves(self: Arc<Self>) {
        let mut tick = tokio::time::interval(KEEP_HAVES_EVERY);
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            let dirty: Vec<Arc<Live>> = self
                .live
                .lock()
                .values()
                .filter(|l| l.take_dirty())
                .cloned()
                .collect();
            for l in dirty {
                let path = self.resume_path(&l.meta.info_hash);
                if let Err(e) = write_atomic(&path, &with_kept(&path, l.have_bits())) {
                    warn!(torrent = %l.meta.info_hash, "could not keep the pieces fetched so far: {e}");
                }
            }
        }
    }

    /// Retires, every `REAP_EVERY`, the torrents unused for `IDLE_LIVE`.
    pub(super) async fn reap(self: Arc<Self>) {
        let mut tick = tokio::time::interval(REAP_EVERY);
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            let _adding = self.adding.lock().await;
            let idle: Vec<Arc<Live>> = {
                let mut live = self.live.lock();
                let idle: Vec<InfoHash> = live
                    .iter()
                    .filter(|(_, l)| {
                        let u = l.usage();
                        u.idle() && u.last_used.elapsed() > IDLE_LIVE
                    })
                    .map(|(ih, _)| *ih)
                    .collect();
                idle.iter().filter_map(|ih| live.remove(ih)).collect()
            };
            for l in idle {
                debug!(torrent = %l.meta.info_hash, "retiring an idle torrent");
                self.retire(&l).await;
            }
        }
    }
}
