//! Range reads of content held elsewhere: only the pieces a read touches
//! are fetched, within the read deadline; a read that stalls brings its
//! torrent up again.

use std::{
    fs,
    io::{self, SeekFrom},
    os::unix::fs::FileExt,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use btfs_core::Wanted;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tracing::{debug, warn};

use super::{
    Engine,
    live::{Dial, Live, Need},
};
use crate::TorrentError;

/// A stream read during which the torrent receives nothing for this long,
/// with no peer connected, brings the torrent up again, with the members
/// connected now: librqbit can give up on a peer for the life of a
/// torrent. Adding the torrent again (fastresume keeps its pieces) costs
/// about 100 ms.
const STALL_RETRY: Duration = Duration::from_millis(1500);
/// The same with a peer connected. librqbit's request loop sleeps up to 5 s
/// once it finds nothing to ask for (after a read's stream is dropped, see
/// `READ_REQUEST_WINDOW`), and a new stream does not wake it; over a live
/// connection the first block of a piece comes within milliseconds. Each
/// further stall of the same read doubles it, up to `STALL_RETRY`.
const STALL_QUIET: Duration = Duration::from_millis(300);
/// How often a waiting read looks at what its torrent received.
const STALL_CHECK: Duration = Duration::from_millis(50);
/// Blocks a rate-limited node is given to receive before a read counts as
/// stalled (`down_rate=`): librqbit asks for one 16 KiB block at a time
/// when the limiter allows.
const STALL_BLOCKS: u64 = 4;
/// A read this large at the start of a file brings its torrent up with the
/// window of a whole-file fetch: that is how whole-file readers (`cp`,
/// `cat`, checksums) begin, and they are followed after `SEQUENTIAL_AFTER`
/// bytes. Other sequential readers get the window when they are followed,
/// by bringing the torrent up again (some 100 ms; its pieces are kept).
const WHOLE_FILE_READ: u64 = 128 << 10;
/// How long a read waits on its zone. A torrent that dials its zone only
/// (another member of the zone fetches the file across, or a member of it
/// holds it: `holders::dial_order`) and still stalls this long after the
/// read began is brought up again dialling every member, so that zones
/// never make a read fail: the zone's fetcher fetches the whole file in
/// its own order, and a read far into a large file, or one whose fetcher
/// cannot help, would otherwise wait for it. Past this, the pieces the read
/// needs cross zones twice. At most half of `read_timeout`, so that the
/// fallback has time to work.
const ZONE_PATIENCE: Duration = Duration::from_secs(5);

impl Engine {
    /// Reads `len` bytes at `offset` of content held elsewhere, fetching only
    /// the pieces needed, within the read deadline.
    pub async fn read(self: Arc<Self>, want: Wanted, offset: u64, len: u32) -> io::Result<Vec<u8>> {
        let deadline = self.settings.read_timeout();
        let started = Instant::now();
        match tokio::time::timeout(deadline, self.read_inner(&want, offset, len)).await {
            Ok(Ok(data)) => {
                self.metrics
                    .first_byte
                    .observe(started.elapsed().as_secs_f64());
                Ok(data)
            }
            Ok(Err(e)) => {
                self.metrics.read_errors.inc();
                warn!(path = %want.path, offset, "read failed: {e}");
                Err(e.into())
            }
            Err(_) => {
                self.metrics.read_timeouts.inc();
                warn!(path = %want.path, offset, "read timed out after {deadline:?}: no reachable member sent the bytes");
                Err(io::Error::new(io::ErrorKind::TimedOut, "read timed out"))
            }
        }
    }

    async fn read_inner(
        self: &Arc<Self>,
        want: &Wanted,
        offset: u64,
        len: u32,
    ) -> Result<Vec<u8>, TorrentError> {
        let end = want.size.min(offset.saturating_add(u64::from(len)));
        if offset >= end {
            return Ok(Vec::new());
        }
        let object = (self.cfg.object_path)(&want.content);
        if object.exists() {
            return pread(object, offset, end).await;
        }
        let started = Instant::now();
        let mut quiet = self.stall_quiet();
        let meta = match self.live_of(&want.torrent) {
            Some(l) if l.meta.content == want.content => l.meta.clone(),
            _ => self.metainfo(want).await?,
        };
        let mut dial = Dial::Zone;
        loop {
            let whole = offset == 0 && end - offset >= WHOLE_FILE_READ.min(want.size);
            let in_use = self
                .bring_up(
                    meta.clone(),
                    &want.path,
                    self.net.member_of(&want.author),
                    whole,
                    Need::Local,
                    dial,
                )
                .await?;
            let up = started.elapsed();
            let live = in_use.live.clone();
            self.note_read(&live, offset, end);
            let pieces = live.pieces_of(offset, end);
            if live.has(&self.session, pieces.clone()) {
                let path = live.data.lock().clone();
                let read = match pread(path, offset, end).await {
                    // Installed meanwhile: the partial file is the object now.
                    Err(TorrentError::Io(e)) if e.kind() == io::ErrorKind::NotFound => {
                        pread(object.clone(), offset, end).await
                    }
                    r => r,
                };
                self.install_if_whole(&live);
                return read;
            }
            let read = async {
                let mut s = live
                    .handle
                    .clone()
                    .stream(0)
                    .await
                    .map_err(TorrentError::session)?;
                s.seek(SeekFrom::Start(offset)).await?;
                let mut buf = vec![0u8; (end - offset) as usize];
                s.read_exact(&mut buf).await?;
                // Dropped at once: an open stream keeps librqbit fetching
                // 32 MiB ahead, and keeps idle peers connected.
                Ok::<_, TorrentError>(buf)
            };
            match unless_stalled(&live, quiet, read).await {
                Some(Ok(buf)) => {
                    live.mark(pieces);
                    debug!(path = %want.path, offset, ?up, total = ?started.elapsed(), "fetched a range");
                    self.install_if_whole(&live);
                    return Ok(buf);
                }
                // A whole-file fetch of the same content (read-ahead, the
                // prefetch policy) finished and installed the object: the
                // file the stream read from has moved there.
                Some(Err(_)) if object.exists() => return pread(object, offset, end).await,
                // The torrent was brought up again by another reader.
                Some(Err(_)) if !self.is_current(&live) => continue,
                Some(Err(e)) => return Err(e),
                None => {
                    if live.zone_only && started.elapsed() >= self.zone_patience() {
                        debug!(path = %want.path, offset, "read stalled within the zone: bringing the torrent up again with every member");
                        dial = Dial::Everyone;
                    } else {
                        debug!(path = %want.path, offset, ?quiet, "read stalled: bringing the torrent up again");
                    }
                    quiet = (quiet * 2).min(STALL_RETRY.max(quiet));
                    self.restart(&live).await;
                }
            }
        }
    }

    /// How long a read waits with nothing received over a live connection
    /// before it counts as stalled (`STALL_QUIET`, longer under `down_rate=`).
    fn stall_quiet(&self) -> Duration {
        let limited = self.settings.down_rate().map_or(Duration::ZERO, |r| {
            Duration::from_millis(STALL_BLOCKS * (16 << 10) * 1000 / u64::from(r.get()))
        });
        STALL_QUIET.max(limited)
    }

    /// How long a read waits on its zone (`ZONE_PATIENCE`).
    fn zone_patience(&self) -> Duration {
        ZONE_PATIENCE.min(self.settings.read_timeout() / 2)
    }
}

/// Waits for `read`, unless `live` stalls first (`None`): it receives
/// nothing for `quiet` while a peer is connected, or for `STALL_RETRY`
/// (at least) while none is. Bytes received for any reader of the torrent
/// count: they show its request loop is awake.
async fn unless_stalled<T>(
    live: &Live,
    quiet: Duration,
    read: impl Future<Output = T>,
) -> Option<T> {
    let probe = || {
        live.handle.live().map(|l| {
            let s = l.stats_snapshot();
            (s.fetched_bytes, s.peer_stats.live > 0)
        })
    };
    let mut seen = probe().map_or(0, |(fetched, _)| fetched);
    let mut since = Instant::now();
    let mut tick = tokio::time::interval(STALL_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(read);
    loop {
        tokio::select! {
            r = &mut read => return Some(r),
            _ = tick.tick() => {
                let (fetched, connected) = probe().unwrap_or((seen, false));
                if fetched != seen {
                    (seen, since) = (fetched, Instant::now());
                } else if since.elapsed() >= if connected { quiet } else { STALL_RETRY.max(quiet) } {
                    return None;
                }
            }
        }
    }
}

async fn pread(path: PathBuf, offset: u64, end: u64) -> Result<Vec<u8>, TorrentError> {
    tokio::task::spawn_blocking(move || -> io::Result<Vec<u8>> {
        let f = fs::File::open(&path)?;
        let mut buf = vec![0u8; (end - offset) as usize];
        f.read_exact_at(&mut buf, offset)?;
        Ok(buf)
    })
    .await
    .map_err(io::Error::other)?
    .map_err(TorrentError::Io)
}
