//! Seeds: a version held here that a newer version (not here) superseded,
//! kept as the start of the newer version's fetch, so that only the pieces
//! that differ travel.
//!
//! The filesystem hands the old object over (`adopt_seed`) instead of
//! deleting it. It becomes `partial/<new content>`, with a marker
//! `resume/<new content>.seed` naming the version it holds. The marker is
//! named by content, as the partial file is: the cache evicts partial files
//! by content and removes the marker with them. When a torrent of the new
//! content is added (`Engine::add`), the marker turns into the bitfield of
//! the pieces the seed already has (`seed_bitfield`), and librqbit resumes
//! from it as from any partial fetch.
//!
//! Invariant: a piece is claimed only when its bytes are proven to be the
//! new version's: read and SHA-1 checked against the new torrent, or, for a
//! whole piece of the old version, its hash in the old torrent equal to the
//! new one (the old object is that torrent's content, checked by blake3
//! when it was installed, and its pieces hash as that torrent says: it was
//! hashed here when published, or verified piece by piece when fetched).
//! librqbit's fastresume still spot-checks claimed pieces when it loads the
//! bitfield and hashes everything again if one fails.

use std::{
    collections::HashSet,
    fs, io,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use btfs_core::{ContentId, InfoHash, Wanted};
use tracing::{debug, info, warn};

use super::{Engine, write_atomic};
use crate::{
    TorrentError,
    meta::{MIN_PIECE, Metainfo, hash_pieces_at, sha1_of},
};

/// Smallest new version a seed is kept for: below two pieces, fetching it
/// whole costs about as much as comparing.
const MIN_SEED_SIZE: u64 = 2 * MIN_PIECE as u64;

/// The marker of a seed: the version `partial/<new content>` holds.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Marker {
    content: ContentId,
    torrent: InfoHash,
    size: u64,
}

impl Marker {
    fn encode(&self) -> String {
        format!("{}\n{}\n{}\n", self.content, self.torrent, self.size)
    }

    fn decode(text: &str) -> Option<Self> {
        let mut lines = text.lines();
        let content = ContentId::from_hex(lines.next()?).ok()?;
        let mut ih = [0u8; 20];
        hex::decode_to_slice(lines.next()?, &mut ih).ok()?;
        let size = lines.next()?.parse().ok()?;
        Some(Self {
            content,
            torrent: InfoHash(ih),
            size,
        })
    }
}

/// The marker of the seed of `content` (`dir` is the engine's state dir).
pub(super) fn marker_path(dir: &Path, content: &ContentId) -> PathBuf {
    dir.join("resume")
        .join(format!("{}.seed", content.to_hex()))
}

/// Why a version was not adopted as a seed (logged at debug).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Declined {
    Small,
    Same,
    Here,
    Live,
    WrongSize,
    CacheFull,
}

impl Engine {
    /// A version held here (`old`, its object at `file`, referenced no more)
    /// was superseded by `new`, which is not here: takes `file` as the
    /// start of `new`'s fetch (see the module doc). Blocking (it moves the
    /// file, waiting for torrents being brought up meanwhile): not from an
    /// async context. Returns whether it took the file; if not, the caller
    /// deletes it.
    ///
    /// Declined when `new` is under `MIN_SEED_SIZE`, here already (an
    /// object or partial), live, or when a torrent of `old` is live (it
    /// seeds the same inode: writing the new version into it would make it
    /// serve bytes its torrent does not have), and when the seed would take
    /// the partial content over `cache_size`.
    pub fn adopt_seed(&self, file: &Path, old: &Wanted, new: &Wanted) -> bool {
        match self.try_adopt(file, old, new) {
            Ok(Ok(())) => {
                info!(path = %new.path, old = %old.content.short(), new = %new.content.short(), "kept the version superseded here as the start of the new one's fetch");
                true
            }
            Ok(Err(Declined::Small)) => false,
            Ok(Err(why)) => {
                info!(path = %new.path, ?why, "superseded version not kept as a seed");
                false
            }
            Err(e) => {
                warn!(path = %new.path, "could not keep the superseded version as a seed: {e}");
                false
            }
        }
    }

    fn try_adopt(
        &self,
        file: &Path,
        old: &Wanted,
        new: &Wanted,
    ) -> io::Result<Result<(), Declined>> {
        if new.size < MIN_SEED_SIZE {
            return Ok(Err(Declined::Small));
        }
        if new.content == old.content {
            return Ok(Err(Declined::Same));
        }
        // No torrent is added meanwhile: one of `new` would find the seed
        // half made, one of `old` would open the file being taken.
        let _adding = self.adding.blocking_lock();
        let partial = self.cfg.dir.join("partial").join(new.content.to_hex());
        let object = (self.cfg.object_path)(&new.content);
        if object.exists() || partial.symlink_metadata().is_ok() {
            return Ok(Err(Declined::Here));
        }
        let held = fs::metadata(file)?;
        if held.len() != old.size {
            return Ok(Err(Declined::WrongSize));
        }
        if let Some(limit) = self.settings.cache_size() {
            let used = partial_bytes(&self.cfg.dir.join("partial"))?;
            if used.saturating_add(held.blocks() * 512) > limit {
                return Ok(Err(Declined::CacheFull));
            }
        }
        // A torrent of the old version seeds this very file: one in use
        // (a member fetching it) keeps it; an idle one (live for
        // `IDLE_LIVE` after its last use, as after this node fetched it)
        // is retired now, as the reaper would.
        let idle = {
            let mut live = self.live.lock();
            let busy = live.values().any(|l| {
                l.meta.content == new.content
                    || (l.meta.content == old.content && !l.usage().idle())
            });
            if busy {
                return Ok(Err(Declined::Live));
            }
            let of_old: Vec<InfoHash> = live
                .iter()
                .filter(|(_, l)| l.meta.content == old.content)
                .map(|(ih, _)| *ih)
                .collect();
            of_old
                .iter()
                .filter_map(|ih| live.remove(ih))
                .collect::<Vec<_>>()
        };
        for l in idle {
            debug!(torrent = %l.meta.info_hash, "retiring the superseded version's torrent to keep its file as a seed");
            futures::executor::block_on(self.retire(&l));
        }
        let marker = marker_path(&self.cfg.dir, &new.content);
        let m = Marker {
            content: old.content,
            torrent: old.torrent,
            size: old.size,
        };
        write_atomic(&marker, m.encode().as_bytes())?;
        // A link, then the unlink: never replaces a partial file that
        // appeared meanwhile (a link fails on an existing name).
        if let Err(e) = fs::hard_link(file, &partial) {
            let _ = fs::remove_file(&marker);
            return Err(e);
        }
        if let Err(e) = fs::remove_file(file) {
            let _ = fs::remove_file(&partial);
            let _ = fs::remove_file(&marker);
            return Err(e);
        }
        // Its last use, for the cache: now, not the old version's.
        if let Ok(f) = fs::File::options().write(true).open(&partial) {
            let _ = f.set_modified(SystemTime::now());
        }
        Ok(Ok(()))
    }

    /// The pieces of `meta` that the seed at `data` (partial content) has,
    /// when `data` is a seed (its marker is here). The marker is gone after:
    /// the bitfield is kept as the torrent's pieces (`resume/`).
    pub(super) async fn seed_bits(&self, meta: &Arc<Metainfo>, data: &Path) -> Seeded {
        let marker_at = marker_path(&self.cfg.dir, &meta.content);
        let marker = match fs::read_to_string(&marker_at) {
            Ok(t) => Marker::decode(&t),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Seeded::No,
            Err(e) => {
                warn!(torrent = %meta.info_hash, "seed marker unreadable: {e}");
                None
            }
        };
        let found = match marker {
            Some(marker) => {
                // The old version's torrent, if kept here and its.
                let old = fs::read(self.torrent_path(&marker.torrent))
                    .ok()
                    .and_then(|b| Metainfo::parse(b, &marker.torrent).ok())
                    .filter(|o| o.content == marker.content && o.size == marker.size);
                let (new, data) = (meta.clone(), data.to_path_buf());
                let threads = self.cfg.hash_threads;
                let started = Instant::now();
                let r = tokio::task::spawn_blocking(move || {
                    seed_bitfield(&data, &new, old.as_ref(), marker.size, threads)
                })
                .await
                .map_err(|e| TorrentError::Io(io::Error::other(e)))
                .and_then(|r| r);
                match r {
                    Ok(s) => {
                        info!(
                            torrent = %meta.info_hash,
                            claimed = s.claimed,
                            pieces = s.pieces,
                            by_hash = s.by_hash,
                            read = s.read,
                            ms = started.elapsed().as_millis() as u64,
                            "fetch starts from the version held here before"
                        );
                        if let Err(e) = write_atomic(&self.resume_path(&meta.info_hash), &s.bits) {
                            warn!(torrent = %meta.info_hash, "could not keep the seed's pieces: {e}");
                        }
                        Seeded::Bits(s.bits)
                    }
                    Err(e) => {
                        warn!(torrent = %meta.info_hash, "could not find the seed's pieces: {e}");
                        Seeded::Failed
                    }
                }
            }
            None => Seeded::Failed,
        };
        let _ = fs::remove_file(&marker_at);
        found
    }
}

/// Whether partial content is a seed, and what it has.
pub(super) enum Seeded {
    /// Not a seed: its kept bitfield (if any) says what it has.
    No,
    /// A seed with these pieces (a bitfield, as librqbit keeps it).
    Bits(Vec<u8>),
    /// A seed whose pieces could not be found: it has none that can be
    /// claimed (a bitfield kept for the content before is not its).
    Failed,
}

/// What `seed_bitfield` found.
#[derive(Debug)]
pub(super) struct SeedPieces {
    /// The bitfield (a bit a piece, most significant first).
    pub(super) bits: Vec<u8>,
    pub(super) pieces: usize,
    pub(super) claimed: usize,
    /// Claimed by comparing hashes, not read.
    pub(super) by_hash: usize,
    /// Read and checked (claimed or not).
    pub(super) read: usize,
}

/// How a piece of the new version is found in a seed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Plan {
    /// A whole piece of the old version, at the same piece length, whose
    /// hash the old torrent gives: equal to the new hash, or not.
    Compared(bool),
    /// Within the old version's bytes but not comparable: read it.
    Read,
    /// Past the old version's end: zeros (the file was extended), so
    /// claimed if the new piece is zeros.
    Zeros,
}

/// How each piece of `new` (pieces of `p` bytes, `new_size` in all) is
/// found in a seed that holds `old_len` bytes of the old version, whose
/// torrent at the same piece length hashes to `old_hashes`, if known.
fn plan(
    new_hashes: &[[u8; 20]],
    p: u64,
    new_size: u64,
    old_len: u64,
    old_hashes: Option<&[[u8; 20]]>,
) -> Vec<Plan> {
    new_hashes
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let (start, end) = (i as u64 * p, (i as u64 + 1) * p);
            let whole_in_both = end <= old_len && end <= new_size;
            match old_hashes.and_then(|o| o.get(i)) {
                // Two whole pieces at the same place with unequal hashes
                // differ: reading it would not find it.
                Some(o) if whole_in_both => Plan::Compared(o == h),
                _ if start < old_len => Plan::Read,
                _ => Plan::Zeros,
            }
        })
        .collect()
}

/// The pieces of `new` that the seed at `data` (the old version, `old_size`
/// bytes, whose torrent `old` is when kept here) has, once the file is cut
/// or extended to `new`'s size. See `plan`; pieces read are read on up to
/// `threads` threads.
pub(super) fn seed_bitfield(
    data: &Path,
    new: &Metainfo,
    old: Option<&Metainfo>,
    old_size: u64,
    threads: usize,
) -> Result<SeedPieces, TorrentError> {
    let file = fs::File::options().read(true).write(true).open(data)?;
    let old_len = file.metadata()?.len();
    // A file of another length than the marker says is not the old version
    // in full: its torrent says nothing of it.
    let old = old.filter(|o| o.size == old_len && old_size == old_len);
    file.set_len(new.size)?;
    let new_hashes = new.piece_hashes()?;
    let p = u64::from(new.piece_length);
    let old_hashes = match old {
        Some(o) if o.piece_length == new.piece_length => Some(o.piece_hashes()?),
        _ => None,
    };
    let plan = plan(
        &new_hashes,
        p,
        new.size,
        old_len.min(new.size),
        old_hashes.as_deref(),
    );
    let mut have = vec![false; plan.len()];
    let mut to_read = Vec::new();
    let mut zero_hashes: Vec<(u64, [u8; 20])> = Vec::new();
    let mut by_hash = 0;
    for (i, step) in plan.iter().enumerate() {
        match step {
            Plan::Compared(equal) => {
                have[i] = *equal;
                by_hash += usize::from(*equal);
            }
            Plan::Read => to_read.push(i as u64),
            Plan::Zeros => {
                let len = (new.size - i as u64 * p).min(p);
                let zero = match zero_hashes.iter().find(|(l, _)| *l == len) {
                    Some((_, h)) => *h,
                    None => {
                        let h = sha1_of(&vec![0u8; len as usize]);
                        zero_hashes.push((len, h));
                        h
                    }
                };
                have[i] = zero == new_hashes[i];
            }
        }
    }
    let read = hash_pieces_at(&file, new.size, new.piece_length, &to_read, threads)?;
    for (i, h) in to_read.iter().zip(read) {
        let i = *i as usize;
        have[i] = h == new_hashes[i];
    }
    let mut bits = vec![0u8; have.len().div_ceil(8)];
    for (i, h) in have.iter().enumerate() {
        if *h {
            bits[i / 8] |= 0x80 >> (i % 8);
        }
    }
    Ok(SeedPieces {
        bits,
        pieces: have.len(),
        claimed: have.iter().filter(|h| **h).count(),
        by_hash,
        read: to_read.len(),
    })
}

/// Bytes the files of the partial directory take (as the cache counts
/// them).
fn partial_bytes(dir: &Path) -> io::Result<u64> {
    let mut total = 0u64;
    for e in fs::read_dir(dir)? {
        let meta = e?.metadata()?;
        if meta.is_file() {
            total = total.saturating_add(meta.blocks() * 512);
        }
    }
    Ok(total)
}

/// The torrents the seeds of `dir` start from (kept by the sweep while the
/// seed is there); removes the markers older than `min_age` whose seed is
/// gone (evicted, or deleted with a crash between the marker and the seed).
pub(super) fn sweep_markers(dir: &Path, min_age: Duration) -> io::Result<HashSet<InfoHash>> {
    let now = SystemTime::now();
    let mut keep = HashSet::new();
    for e in fs::read_dir(dir.join("resume"))? {
        let e = e?;
        let name = e.file_name();
        let Some(content) = name
            .to_str()
            .and_then(|n| n.strip_suffix(".seed"))
            .and_then(|c| ContentId::from_hex(c).ok())
        else {
            continue;
        };
        let seed = dir.join("partial").join(content.to_hex());
        if seed.exists() {
            if let Some(m) = fs::read_to_string(e.path())
                .ok()
                .and_then(|t| Marker::decode(&t))
            {
                keep.insert(m.torrent);
            }
            continue;
        }
        let age = now
            .duration_since(e.metadata()?.modified()?)
            .unwrap_or_default();
        if age >= min_age {
            let _ = fs::remove_file(e.path());
        }
    }
    Ok(keep)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn a_marker_reads_back() {
        let m = Marker {
            content: ContentId([3; 32]),
            torrent: InfoHash([4; 20]),
            size: 1 << 40,
        };
        assert_eq!(Marker::decode(&m.encode()), Some(m));
        assert_eq!(Marker::decode("x\ny\n1\n"), None);
        assert_eq!(Marker::decode(""), None);
    }

    /// Pseudo-random bytes (xorshift), distinct for each `seed`.
    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn torrent_of(dir: &Path, name: &str, data: &[u8], pl: u32) -> Metainfo {
        let f = dir.join(name);
        fs::write(&f, data).unwrap();
        let c = ContentId::from(blake3::hash(data));
        Metainfo::build_with(&c, &f, data.len() as u64, 2, pl).unwrap()
    }

    /// The pieces of `new` whose bytes the seed (after its cut or
    /// extension) truly has.
    fn truly(seed: &[u8], new: &[u8], p: usize) -> Vec<bool> {
        let mut s = seed.to_vec();
        s.resize(new.len(), 0);
        new.chunks(p)
            .zip(s.chunks(p))
            .map(|(a, b)| a == b)
            .collect()
    }

    fn bits_of(s: &SeedPieces) -> Vec<bool> {
        (0..s.pieces)
            .map(|i| s.bits[i / 8] & (0x80 >> (i % 8)) != 0)
            .collect()
    }

    /// Every case: the seed claims exactly the pieces it truly has, and
    /// with the old torrent at the same piece length reads only the pieces
    /// hashes cannot decide.
    #[test]
    fn a_seed_claims_exactly_the_pieces_it_has() {
        let dir = tempfile::tempdir().unwrap();
        let p = MIN_PIECE as usize;
        let old = noise(32 * p, 1);
        let mut one_changed = old.clone();
        one_changed[17 * p + 100] ^= 0xff;
        let mut appended = old.clone();
        appended.extend(noise(p + 12345, 2));
        let mut zeros_appended = old.clone();
        zeros_appended.resize(old.len() + 3 * p + 5, 0);
        let halved = old[..16 * p + 777].to_vec();
        let rewritten = noise(32 * p, 3);
        let cases: [(&str, &[u8], usize); 5] = [
            ("one piece changed", &one_changed, 0),
            ("appended", &appended, 0),
            ("zeros appended", &zeros_appended, 0),
            ("halved", &halved, 1),
            ("rewritten", &rewritten, 0),
        ];
        let old_meta = torrent_of(dir.path(), "old", &old, MIN_PIECE);
        for (name, new, reads) in cases {
            let new_meta = torrent_of(dir.path(), "new", new, MIN_PIECE);
            let want = truly(&old, new, p);
            for (with_old, threads) in [(true, 1), (true, 3), (false, 2)] {
                let seed = dir.path().join("seed");
                fs::write(&seed, &old).unwrap();
                let o = with_old.then_some(&old_meta);
                let s = seed_bitfield(&seed, &new_meta, o, old.len() as u64, threads).unwrap();
                assert_eq!(bits_of(&s), want, "{name}, old torrent: {with_old}");
                assert_eq!(fs::metadata(&seed).unwrap().len(), new.len() as u64);
                if with_old {
                    assert_eq!(s.read, reads, "{name}: pieces read");
                } else {
                    assert_eq!(s.by_hash, 0);
                }
            }
        }
    }

    #[test]
    fn an_old_torrent_of_another_piece_length_or_size_is_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let p = MIN_PIECE as usize;
        let old = noise(8 * p, 4);
        let mut new = old.clone();
        new[3 * p] ^= 1;
        let new_meta = torrent_of(dir.path(), "new", &new, MIN_PIECE);
        let other_pl = torrent_of(dir.path(), "old", &old, MIN_PIECE * 2);
        let seed = dir.path().join("seed");
        fs::write(&seed, &old).unwrap();
        let s = seed_bitfield(&seed, &new_meta, Some(&other_pl), old.len() as u64, 2).unwrap();
        assert_eq!((s.by_hash, s.read, s.claimed), (0, 8, 7));
        // A seed shorter than the marker says: everything it has is read.
        let old_meta = torrent_of(dir.path(), "old", &old, MIN_PIECE);
        let mut f = fs::File::create(&seed).unwrap();
        f.write_all(&old[..5 * p]).unwrap();
        drop(f);
        let s = seed_bitfield(&seed, &new_meta, Some(&old_meta), old.len() as u64, 2).unwrap();
        assert_eq!((s.by_hash, s.read, s.claimed), (0, 5, 4));
        assert_eq!(bits_of(&s), truly(&old[..5 * p], &new, p));
    }

    #[test]
    fn markers_keep_their_torrents_while_the_seed_is_there() {
        let dir = tempfile::tempdir().unwrap();
        for sub in ["resume", "partial"] {
            fs::create_dir(dir.path().join(sub)).unwrap();
        }
        let (here, gone) = (ContentId([1; 32]), ContentId([2; 32]));
        for (c, ih) in [(here, 7u8), (gone, 8)] {
            let m = Marker {
                content: ContentId([9; 32]),
                torrent: InfoHash([ih; 20]),
                size: 5,
            };
            fs::write(marker_path(dir.path(), &c), m.encode()).unwrap();
        }
        fs::write(dir.path().join("partial").join(here.to_hex()), b"x").unwrap();
        let young = sweep_markers(dir.path(), Duration::from_secs(60)).unwrap();
        assert_eq!(young, HashSet::from([InfoHash([7; 20])]));
        assert!(marker_path(dir.path(), &gone).exists(), "young: kept");
        let old = sweep_markers(dir.path(), Duration::ZERO).unwrap();
        assert_eq!(old, HashSet::from([InfoHash([7; 20])]));
        assert!(!marker_path(dir.path(), &gone).exists());
        assert!(marker_path(dir.path(), &here).exists());
    }
}
