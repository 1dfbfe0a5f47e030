//! Kept `.torrent` files: publishing new content, the metainfo of content
//! held elsewhere (kept here, or asked of members), and the sweep of those
//! whose content is no longer here.

use std::{
    collections::HashSet,
    fs, io,
    path::{Path, PathBuf},
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use btfs_core::{ContentId, InfoHash, Update, Wanted};
use tracing::{debug, warn};

use super::{Engine, ObjectPath, seed, write_atomic};
use crate::{TorrentError, meta::Metainfo};

/// How often `.torrent` files of content no longer here are looked for...
const SWEEP_EVERY: Duration = Duration::from_secs(600);
/// ... and how old they must be: a publish writes its torrent before the
/// object is installed, and a read before its partial file exists.
const SWEEP_MIN_AGE: Duration = Duration::from_secs(3600);

impl Engine {
    /// Builds and keeps the torrent of new content (blocking: it hashes the
    /// file). Nothing goes live: a member that wants the content brings it up.
    pub fn publish(
        &self,
        content: &ContentId,
        file: &Path,
        size: u64,
    ) -> Result<InfoHash, TorrentError> {
        let meta = Metainfo::build(content, file, size, self.cfg.hash_threads)?;
        let path = self.torrent_path(&meta.info_hash);
        if !path.exists() {
            write_atomic(&path, &meta.bytes)?;
        }
        Ok(meta.info_hash)
    }

    /// As [`publish`](Self::publish), for content written in place over
    /// `update.base`: when the base's torrent is kept here (and is the
    /// base's), its piece length is kept and the hashes of the pieces the
    /// writer did not touch are taken from it (`Metainfo::build_update`),
    /// so that a small change to a large file hashes little. Otherwise the
    /// file is hashed in full.
    pub fn publish_update(
        &self,
        content: &ContentId,
        file: &Path,
        size: u64,
        update: &Update<'_>,
    ) -> Result<InfoHash, TorrentError> {
        let base = update.base_torrent.and_then(|ih| {
            let bytes = fs::read(self.torrent_path(&ih)).ok()?;
            match Metainfo::parse(bytes, &ih) {
                Ok(m) if m.content == update.base => Some(m),
                Ok(m) => {
                    warn!(torrent = %ih, carries = %m.content.short(), base = %update.base.short(), "the base's torrent carries other content: hashing the new version in full");
                    None
                }
                Err(e) => {
                    warn!(torrent = %ih, "the base's torrent is unusable ({e}): hashing the new version in full");
                    None
                }
            }
        });
        let (meta, reused) = Metainfo::build_update(
            content,
            file,
            size,
            self.cfg.hash_threads,
            base.as_ref(),
            update.base_kept,
            update.changed,
        )?;
        debug!(content = %content.short(), pieces = meta.pieces(), reused, "published a version written in place");
        let path = self.torrent_path(&meta.info_hash);
        if !path.exists() {
            write_atomic(&path, &meta.bytes)?;
        }
        Ok(meta.info_hash)
    }

    pub(super) fn torrent_path(&self, ih: &InfoHash) -> PathBuf {
        self.cfg.dir.join("torrents").join(format!("{ih}.torrent"))
    }

    /// The `.torrent` of `ih` if this node has it (to answer members).
    pub fn local_metainfo(&self, ih: &InfoHash) -> Option<Vec<u8>> {
        fs::read(self.torrent_path(ih)).ok()
    }

    /// The `.torrent` of a file: kept here, or asked from members.
    pub async fn metainfo(&self, want: &Wanted) -> Result<Arc<Metainfo>, TorrentError> {
        let path = self.torrent_path(&want.torrent);
        // Checked in full (bounds, info hash, content and size) before it is
        // kept: a member's bytes are hostile until then.
        let meta = match fs::read(&path) {
            Ok(bytes) => Metainfo::parse_wanted(bytes, want)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let bytes = self
                    .net
                    .metainfo(want.torrent, self.net.member_of(&want.author))
                    .await
                    .ok_or(TorrentError::NoMetainfo(want.torrent))?;
                let meta = Metainfo::parse_wanted(bytes, want).inspect_err(|e| {
                    self.metainfo_refused.fetch_add(1, Ordering::Relaxed);
                    warn!(path = %want.path, torrent = %want.torrent, "refused a member's metainfo: {e}");
                })?;
                write_atomic(&path, &meta.bytes)?;
                meta
            }
            Err(e) => return Err(e.into()),
        };
        Ok(Arc::new(meta))
    }

    /// Deletes, every `SWEEP_EVERY`, the kept `.torrent` files (and piece
    /// bitfields) of content that is neither an object nor partial here any
    /// more: overwritten or deleted files, evicted content.
    pub(super) async fn sweep(self: Arc<Self>) {
        let mut tick = tokio::time::interval(SWEEP_EVERY);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            let live: HashSet<InfoHash> = self.live.lock().keys().copied().collect();
            let this = self.clone();
            let swept = tokio::task::spawn_blocking(move || {
                // The torrents seeds start from (their pieces are compared
                // when the seed's torrent comes up) stay while the seeds do.
                let mut keep = live;
                keep.extend(seed::sweep_markers(&this.cfg.dir, SWEEP_MIN_AGE)?);
                let stale =
                    stale_torrents(&this.cfg.dir, &this.cfg.object_path, &keep, SWEEP_MIN_AGE)?;
                for ih in &stale {
                    fs::remove_file(this.torrent_path(ih))?;
                    let _ = fs::remove_file(this.resume_path(ih));
                }
                Ok::<_, io::Error>(stale.len())
            })
            .await;
            match swept {
                Ok(Ok(0)) => {}
                Ok(Ok(n)) => debug!(
                    torrents = n,
                    "deleted the torrents of content no longer here"
                ),
                Ok(Err(e)) => warn!("torrent sweep: {e}"),
                Err(e) => warn!("torrent sweep task: {e}"),
            }
        }
    }
}

/// The kept torrents (in `dir/torrents`) of content that is neither an object
/// nor partial (in `dir/partial`), not live, and older than `min_age`.
fn stale_torrents(
    dir: &Path,
    object_path: &ObjectPath,
    live: &HashSet<InfoHash>,
    min_age: Duration,
) -> io::Result<Vec<InfoHash>> {
    let now = std::time::SystemTime::now();
    let mut out = Vec::new();
    for e in fs::read_dir(dir.join("torrents"))? {
        let e = e?;
        let mut ih = [0u8; 20];
        let named = e
            .file_name()
            .to_str()
            .and_then(|n| n.strip_suffix(".torrent"))
            .is_some_and(|h| hex::decode_to_slice(h, &mut ih).is_ok());
        let ih = InfoHash(ih);
        if !named || live.contains(&ih) {
            continue;
        }
        let modified = e.metadata()?.modified()?;
        if now.duration_since(modified).unwrap_or_default() < min_age {
            continue;
        }
        // A file that does not parse is left for a person to look at.
        let Ok(meta) = Metainfo::parse(fs::read(e.path())?, &ih) else {
            continue;
        };
        let here = object_path(&meta.content).exists()
            || dir.join("partial").join(meta.content.to_hex()).exists();
        if !here {
            out.push(ih);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn torrents_of_content_no_longer_here_are_stale_once_old_enough() {
        let dir = tempfile::tempdir().unwrap();
        let objects = dir.path().join("objects");
        for sub in ["torrents", "partial", "objects"] {
            fs::create_dir(dir.path().join(sub)).unwrap();
        }
        let object_path: ObjectPath = {
            let objects = objects.clone();
            Arc::new(move |c: &ContentId| objects.join(c.to_hex()))
        };
        // Three contents: one an object here, one partial, one gone.
        let mut metas = Vec::new();
        for i in 0..3u8 {
            let data = vec![i; 300_000];
            let content = ContentId::from(blake3::hash(&data));
            let file = dir.path().join(format!("f{i}"));
            fs::write(&file, &data).unwrap();
            let m = Metainfo::build(&content, &file, data.len() as u64, 1).unwrap();
            fs::write(
                dir.path()
                    .join("torrents")
                    .join(format!("{}.torrent", m.info_hash)),
                &m.bytes,
            )
            .unwrap();
            metas.push(m);
        }
        fs::write(objects.join(metas[0].content.to_hex()), b"x").unwrap();
        fs::write(
            dir.path().join("partial").join(metas[1].content.to_hex()),
            b"x",
        )
        .unwrap();
        let none = HashSet::new();
        let stale = stale_torrents(dir.path(), &object_path, &none, Duration::ZERO).unwrap();
        assert_eq!(stale, vec![metas[2].info_hash]);
        // Young, or live: kept.
        let young =
            stale_torrents(dir.path(), &object_path, &none, Duration::from_secs(60)).unwrap();
        assert!(young.is_empty());
        let live = HashSet::from([metas[2].info_hash]);
        assert!(
            stale_torrents(dir.path(), &object_path, &live, Duration::ZERO)
                .unwrap()
                .is_empty()
        );
    }
}
