//! Fetched content as a cache: its use is marked, and it is kept under
//! `cache_size` by evicting the least recently used content that another
//! connected member holds.

use std::{
    collections::HashSet, fs, io, num::NonZeroU32, os::unix::fs::MetadataExt, sync::Arc,
    time::Duration,
};

use btfs_core::ContentId;
use tracing::{info, warn};

use super::{Engine, seed};
use crate::MemberId;

/// How often the cache is measured against `cache_size`.
const CACHE_EVERY: Duration = Duration::from_secs(5);

impl Engine {
    /// Marks fetched content as just used (a local open of its object).
    pub fn touch(&self, content: &ContentId) {
        let marker = self.cfg.dir.join("fetched").join(content.to_hex());
        if let Ok(f) = fs::File::options().write(true).open(&marker) {
            let _ = f.set_modified(std::time::SystemTime::now());
        }
    }

    /// Adds a predicate naming content the cache must keep (pinned, or
    /// inside the history window). It is asked off the runtime, during an
    /// eviction pass, for the candidates only; it must not call the engine.
    pub fn add_keep(&self, keep: super::Keep) {
        self.keep.lock().push(keep);
    }

    /// Whether a [`add_keep`](Self::add_keep) predicate claims `c`.
    fn kept(&self, c: &ContentId) -> bool {
        self.keep.lock().iter().any(|k| k(c))
    }

    /// `cache_size=` from now on (`mount -o remount`): the keeper's next
    /// pass, at once, measures against it; `None` keeps everything.
    pub fn set_cache_size(&self, limit: Option<u64>) {
        self.settings.set_cache_size(limit);
    }

    /// `read_timeout=` from now on: reads and fetches that start after
    /// this wait that long (those already waiting keep their deadline).
    pub fn set_read_timeout(&self, d: Duration) {
        self.settings.set_read_timeout(d);
    }

    /// `up_rate=` / `down_rate=` from now on (`None`: unlimited), for
    /// every torrent, live or not: librqbit's session limiters are shared.
    pub fn set_rates(&self, up: Option<NonZeroU32>, down: Option<NonZeroU32>) {
        self.session.ratelimits.set_upload_bps(up);
        self.session.ratelimits.set_download_bps(down);
        self.settings.set_down_rate(down);
    }

    /// Keeps fetched content (objects fetched here, and partial content)
    /// under `cache_size` bytes: least recently used first, only content
    /// that a connected member holds, never content in use. Follows the
    /// live value: it waits while none is set, and measures against a new
    /// one at once.
    pub(super) async fn keep_cache(self: Arc<Self>) {
        let mut tick = tokio::time::interval(CACHE_EVERY);
        let mut limits = self.settings.watch_cache_size();
        let mut warned = false;
        loop {
            let current = *limits.borrow_and_update();
            let Some(limit) = current else {
                tokio::select! {
                    _ = self.cancel.cancelled() => return,
                    changed = limits.changed() => if changed.is_err() { return },
                }
                tick.reset_immediately();
                continue;
            };
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = tick.tick() => {}
                changed = limits.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    warned = false;
                    tick.reset_immediately();
                    continue;
                }
            }
            let this = self.clone();
            let members: HashSet<MemberId> = self.net.members().into_iter().collect();
            let in_use: HashSet<ContentId> =
                self.live.lock().values().map(|l| l.meta.content).collect();
            let r = tokio::task::spawn_blocking(move || this.evict(limit, &members, &in_use)).await;
            match r {
                Ok(Ok(over)) if over > 0 && !warned => {
                    warned = true;
                    warn!(
                        over,
                        "fetched content exceeds cache_size, but the rest is in use or held by no connected member"
                    );
                }
                Ok(Ok(0)) => warned = false,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => warn!("cache: {e}"),
                Err(e) => warn!("cache task: {e}"),
            }
        }
    }

    /// One eviction pass; returns the bytes still over `limit`.
    fn evict(
        &self,
        limit: u64,
        members: &HashSet<MemberId>,
        in_use: &HashSet<ContentId>,
    ) -> io::Result<u64> {
        // (last use, bytes, content, object or partial file, marker, holder known)
        let mut items = Vec::new();
        for (c, e) in content_files(&self.cfg.dir.join("fetched"))? {
            let object = (self.cfg.object_path)(&c);
            let Ok(meta) = fs::metadata(&object) else {
                // Collected by the filesystem (no record uses it any more).
                let _ = fs::remove_file(e.path());
                continue;
            };
            // The marker names the member it was fetched from (`install`).
            let author = fs::read_to_string(e.path()).unwrap_or_default();
            let used = e.metadata()?.modified()?;
            let held = author
                .trim()
                .parse::<MemberId>()
                .is_ok_and(|a| members.contains(&a))
                || self
                    .holders
                    .lock()
                    .of(&c)
                    .iter()
                    .any(|m| members.contains(m));
            items.push((used, meta.len(), c, object, Some(e.path()), held));
        }
        for (c, e) in content_files(&self.cfg.dir.join("partial"))? {
            let meta = e.metadata()?;
            // Partial content was fetched from members: they hold it.
            items.push((
                meta.modified()?,
                meta.blocks() * 512,
                c,
                e.path(),
                None,
                true,
            ));
        }
        let mut total: u64 = items.iter().map(|i| i.1).sum();
        let mut dropped = Vec::new();
        items.sort_by_key(|i| i.0);
        for (_, bytes, c, file, marker, held) in items {
            if total <= limit {
                break;
            }
            if !held || in_use.contains(&c) || self.kept(&c) {
                continue;
            }
            match fs::remove_file(&file) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            match &marker {
                Some(m) => {
                    let _ = fs::remove_file(m);
                }
                // A seed's marker goes with it (`seed`).
                None => {
                    let _ = fs::remove_file(seed::marker_path(&self.cfg.dir, &c));
                }
            }
            total -= bytes;
            self.metrics.evictions.inc();
            self.metrics.evicted_bytes.inc_by(bytes);
            if marker.is_some() {
                dropped.push(c);
            }
            info!(content = %c.short(), bytes, "evicted from the cache (another member holds it)");
        }
        self.metrics
            .cache_bytes
            .set(i64::try_from(total).unwrap_or(i64::MAX));
        if !dropped.is_empty() {
            self.net.announce(Vec::new(), dropped);
        }
        Ok(total.saturating_sub(limit))
    }
}

/// The files of `dir` named by a content id (other names are skipped).
fn content_files(dir: &std::path::Path) -> io::Result<Vec<(ContentId, fs::DirEntry)>> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir)? {
        let e = e?;
        let id = e
            .file_name()
            .to_str()
            .and_then(|n| ContentId::from_hex(n).ok());
        if let Some(c) = id {
            out.push((c, e));
        }
    }
    Ok(out)
}
