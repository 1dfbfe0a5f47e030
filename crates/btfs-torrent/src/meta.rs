//! Torrents made from content alone, so that every node that holds the same
//! bytes derives the same swarm.
//!
//! librqbit's `create_torrent` is not used: it hashes on one thread, always
//! picks 2 MiB pieces, emits one hash too many when the length is a multiple
//! of the piece length (strict clients reject that) and cannot set the
//! `private` flag. The info dictionary here is librqbit's own type, encoded by
//! its bencode crate and hashed by its SHA-1 wrapper; only the pieces are
//! hashed on several threads.

use std::{fs::File, path::Path, thread};

use btfs_core::{ContentId, InfoHash, Wanted};
use librqbit::{ByteBufOwned, TorrentMetaV1, TorrentMetaV1Info, torrent_from_bytes};
use librqbit_bencode::{WithRawBytes, bencode_serialize_to_writer};
use librqbit_core::hash_id::Id20;
use librqbit_sha1_wrapper::{self as sha1w, ISha1};

use crate::TorrentError;

/// Smallest piece: below this, per-piece overhead dominates.
pub const MIN_PIECE: u32 = 256 << 10;
/// Largest piece: a lazy read fetches at least one whole piece.
pub const MAX_PIECE: u32 = 4 << 20;
/// Pieces a torrent aims at (more only for files over 8 GiB).
pub const TARGET_PIECES: u64 = 2000;
/// Largest content a torrent may carry (16 TiB).
pub const MAX_SIZE: u64 = 16 << 40;
/// Most pieces a torrent may have: `MAX_SIZE` in `MAX_PIECE` pieces, what
/// `piece_length` gives for the largest content.
pub const MAX_PIECES: u64 = MAX_SIZE / MAX_PIECE as u64;
/// Largest `.torrent` accepted, checked before it is decoded: a hash per
/// piece for `MAX_PIECES` pieces and room for the rest of the dictionaries.
pub const MAX_METAINFO_BYTES: usize = MAX_PIECES as usize * 20 + (64 << 10);

/// The piece length for content of `size` bytes: the power of two between
/// `MIN_PIECE` and `MAX_PIECE` that gives the number of pieces nearest to
/// `TARGET_PIECES` (at most 1.5 times as many). Smaller pieces make a lazy
/// read fetch less; the count bounds the metainfo (20 bytes a piece).
pub fn piece_length(size: u64) -> u32 {
    let want = size.div_ceil(TARGET_PIECES).max(1);
    let upper = want.next_power_of_two();
    let lower = upper / 2;
    let pick = if lower > 0 && want * 2 <= lower * 3 {
        lower
    } else {
        upper
    };
    pick.clamp(u64::from(MIN_PIECE), u64::from(MAX_PIECE)) as u32
}

/// A torrent of one piece of content.
#[derive(Debug, Clone)]
pub struct Metainfo {
    pub info_hash: InfoHash,
    /// The whole `.torrent` file.
    pub bytes: Vec<u8>,
    pub piece_length: u32,
    pub size: u64,
    /// The content the torrent carries (also its file name).
    pub content: ContentId,
}

impl Metainfo {
    /// The torrent of `size` bytes of `content` held in `file`, hashed on up
    /// to `threads` threads.
    pub fn build(
        content: &ContentId,
        file: &Path,
        size: u64,
        threads: usize,
    ) -> Result<Self, TorrentError> {
        check_size(size)?;
        Self::build_with(content, file, size, threads, piece_length(size))
    }

    /// `build` with a given piece length (checked against the bounds).
    pub(crate) fn build_with(
        content: &ContentId,
        file: &Path,
        size: u64,
        threads: usize,
        piece_length: u32,
    ) -> Result<Self, TorrentError> {
        check_geometry(size, piece_length)?;
        let pieces = hash_pieces(file, size, piece_length, threads)?;
        Self::of_pieces(content, size, piece_length, pieces)
    }

    /// The torrent of content written in place over `base` (the torrent of
    /// the content the writer started from, when kept here): bytes
    /// `[0, base_kept)` of `file` equal the base's except in `changed`
    /// (ranges `[start, end)`, in any order). Returns it with the number of
    /// pieces whose hash was taken from `base` instead of hashed.
    ///
    /// The base's piece length is kept while it is within the bounds for
    /// `size` (`sticky_piece_length`): a truncation or an append that moved
    /// the piece length would move every piece boundary, and then every
    /// piece would differ. A piece's hash is the base's when, at that piece
    /// length, the piece lies below `base_kept` and the base's size, is a
    /// full piece in the new size too, and meets no changed range; every
    /// other piece is read from `file` (on up to `threads` threads). The
    /// result is the torrent `file` hashed in full at that piece length
    /// gives (a property test holds it to that). Without a base, `build`.
    pub fn build_update(
        content: &ContentId,
        file: &Path,
        size: u64,
        threads: usize,
        base: Option<&Metainfo>,
        base_kept: u64,
        changed: &[(u64, u64)],
    ) -> Result<(Self, u64), TorrentError> {
        let Some(base) = base else {
            return Ok((Self::build(content, file, size, threads)?, 0));
        };
        check_size(size)?;
        let pl = sticky_piece_length(base.piece_length, size);
        let n = check_geometry(size, pl)?;
        let base_hashes = if base.piece_length == pl {
            base.piece_hashes()?
        } else {
            Vec::new()
        };
        let p = u64::from(pl);
        let n_us = usize::try_from(n).map_err(|_| TorrentError::TooManyPieces {
            pieces: n,
            max: MAX_PIECES,
        })?;
        // Pieces a changed range meets.
        let mut dirty = vec![false; n_us];
        for &(start, end) in changed {
            if start >= end || start >= size {
                continue;
            }
            let (first, last) = (start / p, (end.min(size) - 1) / p);
            for d in &mut dirty[first as usize..=last as usize] {
                *d = true;
            }
        }
        let kept = base_kept.min(base.size);
        let mut hashes = vec![[0u8; 20]; n_us];
        let mut todo = Vec::new();
        for (i, h) in hashes.iter_mut().enumerate() {
            let end = (i as u64 + 1) * p;
            match base_hashes.get(i) {
                Some(b) if end <= kept && end <= size && !dirty[i] => *h = *b,
                _ => todo.push(i as u64),
            }
        }
        let reused = n - todo.len() as u64;
        if reused == 0 {
            return Ok((Self::build_with(content, file, size, threads, pl)?, 0));
        }
        let file = File::open(file)?;
        let len = file.metadata()?.len();
        if len != size {
            return Err(TorrentError::SizeChanged {
                expected: size,
                found: len,
            });
        }
        let fresh = hash_pieces_at(&file, size, pl, &todo, threads)?;
        for (i, h) in todo.iter().zip(fresh) {
            hashes[*i as usize] = h;
        }
        let meta = Self::of_pieces(content, size, pl, hashes.concat())?;
        Ok((meta, reused))
    }

    /// The torrent of `size` bytes of `content` whose pieces hash to
    /// `pieces` (20 bytes each, in order).
    fn of_pieces(
        content: &ContentId,
        size: u64,
        piece_length: u32,
        pieces: Vec<u8>,
    ) -> Result<Self, TorrentError> {
        let info = TorrentMetaV1Info::<ByteBufOwned> {
            name: Some(content.to_hex().into_bytes().into()),
            pieces: pieces.into(),
            piece_length,
            length: Some(size),
            attr: None,
            sha1: None,
            symlink_path: None,
            md5sum: None,
            files: None,
            // No PEX, no DHT, no metadata exchange: peers come from the mesh.
            private: true,
        };
        let mut raw = Vec::new();
        bencode_serialize_to_writer(&info, &mut raw).map_err(TorrentError::Encode)?;
        let id = Id20::new(sha1(&raw));
        let info = WithRawBytes {
            data: info,
            raw_bytes: ByteBufOwned::from(raw),
        };
        let bytes = encode(info, id)?;
        Ok(Self {
            info_hash: InfoHash(id.0),
            bytes,
            piece_length,
            size,
            content: *content,
        })
    }

    /// The SHA-1 of every piece, in order, read from the `.torrent`.
    pub fn piece_hashes(&self) -> Result<Vec<[u8; 20]>, TorrentError> {
        let t = torrent_from_bytes(&self.bytes).map_err(TorrentError::BadMetainfo)?;
        let pieces: &[u8] = t.info.data.pieces.as_ref();
        let expected = self.pieces();
        let found = (pieces.len() / 20) as u64;
        if !pieces.len().is_multiple_of(20) || found != expected {
            return Err(TorrentError::PieceCountMismatch { found, expected });
        }
        Ok(pieces
            .chunks_exact(20)
            .map(|c| {
                let mut h = [0u8; 20];
                h.copy_from_slice(c);
                h
            })
            .collect())
    }

    /// Parses a `.torrent` received from another node (or kept here) and
    /// checks that it is the torrent of `expected` (its info hash) and a
    /// torrent btfs could have made: one file named by its content id, a
    /// bounded size, a power-of-two piece length within `MIN_PIECE..=
    /// MAX_PIECE`, exactly one hash per piece and a canonical, private info
    /// dictionary. The bytes are bounded (`MAX_METAINFO_BYTES`) before they
    /// are decoded. Fields outside the info dictionary (trackers, comments)
    /// are dropped: the result's `bytes` are encoded here, as `build` does.
    pub fn parse(bytes: Vec<u8>, expected: &InfoHash) -> Result<Self, TorrentError> {
        if bytes.len() > MAX_METAINFO_BYTES {
            return Err(TorrentError::MetainfoTooLarge {
                len: bytes.len(),
                max: MAX_METAINFO_BYTES,
            });
        }
        let t = torrent_from_bytes(&bytes).map_err(TorrentError::BadMetainfo)?;
        let found = InfoHash(t.info_hash.0);
        if found != *expected {
            return Err(TorrentError::WrongInfoHash {
                expected: *expected,
                found,
            });
        }
        let (content, size, piece_length) = check_info(&t.info.data)?;
        // The info dictionary must be exactly what `build` encodes for these
        // fields: no other keys, no other encoding.
        let mut raw = Vec::new();
        bencode_serialize_to_writer(&t.info.data, &mut raw).map_err(TorrentError::Encode)?;
        if raw != t.info.raw_bytes.as_ref() {
            return Err(TorrentError::NonCanonicalInfo);
        }
        let bytes = encode(t.info, t.info_hash)?;
        Ok(Self {
            info_hash: found,
            piece_length,
            size,
            content,
            bytes,
        })
    }

    /// `parse`, for the torrent a file record names: the info hash, the
    /// content and the size must all be the record's.
    pub fn parse_wanted(bytes: Vec<u8>, want: &Wanted) -> Result<Self, TorrentError> {
        let meta = Self::parse(bytes, &want.torrent)?;
        if meta.content != want.content || meta.size != want.size {
            return Err(TorrentError::WrongContent {
                torrent: want.torrent,
                found: meta.content,
                found_size: meta.size,
                content: want.content,
                size: want.size,
            });
        }
        Ok(meta)
    }

    /// Number of pieces (0 for a piece length of 0, which neither `build`
    /// nor `parse` makes).
    pub fn pieces(&self) -> u64 {
        match std::num::NonZeroU64::new(u64::from(self.piece_length)) {
            Some(pl) => self.size.div_ceil(pl.get()),
            None => 0,
        }
    }

    /// Number of pieces, once the size and the piece length are checked
    /// against the bounds `parse` enforces (at most `MAX_PIECES`): what code
    /// that allocates per piece uses.
    pub fn piece_count(&self) -> Result<usize, TorrentError> {
        let n = check_geometry(self.size, self.piece_length)?;
        usize::try_from(n).map_err(|_| TorrentError::TooManyPieces {
            pieces: n,
            max: MAX_PIECES,
        })
    }
}

/// The outer dictionary of every torrent made or accepted here: the info
/// dictionary and `created by`, nothing else (no trackers).
fn encode<'a, B>(
    info: WithRawBytes<TorrentMetaV1Info<B>, B>,
    id: Id20,
) -> Result<Vec<u8>, TorrentError>
where
    B: serde::Serialize + From<&'a [u8]>,
{
    let meta = TorrentMetaV1 {
        announce: None,
        announce_list: vec![],
        info,
        comment: None,
        created_by: Some(B::from(&b"btfs"[..])),
        encoding: None,
        publisher: None,
        publisher_url: None,
        creation_date: None,
        info_hash: id,
    };
    let mut bytes = Vec::new();
    bencode_serialize_to_writer(&meta, &mut bytes).map_err(TorrentError::Encode)?;
    Ok(bytes)
}

/// Checks the size and the piece length of a torrent against the bounds;
/// returns its number of pieces (at most `MAX_PIECES`).
fn check_geometry(size: u64, piece_length: u32) -> Result<u64, TorrentError> {
    if size == 0 || size > MAX_SIZE {
        return Err(TorrentError::LengthOutOfBounds {
            length: size,
            max: MAX_SIZE,
        });
    }
    if !piece_length.is_power_of_two() || !(MIN_PIECE..=MAX_PIECE).contains(&piece_length) {
        return Err(TorrentError::BadPieceLength {
            found: piece_length,
            min: MIN_PIECE,
            max: MAX_PIECE,
        });
    }
    let n = size.div_ceil(u64::from(piece_length));
    if n > MAX_PIECES {
        return Err(TorrentError::TooManyPieces {
            pieces: n,
            max: MAX_PIECES,
        });
    }
    Ok(n)
}

/// Refuses empty content and content over `MAX_SIZE`.
fn check_size(size: u64) -> Result<(), TorrentError> {
    if size == 0 {
        return Err(TorrentError::Empty);
    }
    if size > MAX_SIZE {
        return Err(TorrentError::LengthOutOfBounds {
            length: size,
            max: MAX_SIZE,
        });
    }
    Ok(())
}

/// The piece length of a new version of `size` bytes made from a version
/// whose torrent has pieces of `base`: `base` while it is within the bounds
/// for that size (`check_geometry`), else `piece_length(size)`. A version
/// changed in place keeps its piece boundaries, so that its unchanged
/// pieces keep their hashes (here) and their bytes (on the nodes that held
/// the version before, see `engine::seed`).
pub fn sticky_piece_length(base: u32, size: u64) -> u32 {
    if check_geometry(size, base).is_ok() {
        base
    } else {
        piece_length(size)
    }
}

/// Checks every field of a received info dictionary that btfs relies on;
/// returns its content, size and piece length.
fn check_info<B: AsRef<[u8]>>(
    info: &TorrentMetaV1Info<B>,
) -> Result<(ContentId, u64, u32), TorrentError> {
    if info.files.is_some() {
        return Err(TorrentError::MultiFile);
    }
    let size = info.length.ok_or(TorrentError::MissingLength)?;
    let n = check_geometry(size, info.piece_length)?;
    let pieces = info.pieces.as_ref().len();
    if pieces % 20 != 0 {
        return Err(TorrentError::PiecesNotMultipleOf20 { len: pieces });
    }
    let found = (pieces / 20) as u64;
    if found != n {
        return Err(TorrentError::PieceCountMismatch { found, expected: n });
    }
    // The name is the file librqbit writes (in `partial/` or the object
    // store): exactly the content id as `ContentId::to_hex` spells it.
    let content = info
        .name
        .as_ref()
        .and_then(|n| std::str::from_utf8(n.as_ref()).ok())
        .and_then(|n| ContentId::from_hex(n).ok().filter(|c| c.to_hex() == n))
        .ok_or(TorrentError::BadName)?;
    if !info.private {
        return Err(TorrentError::NotPrivate);
    }
    // Fields librqbit acts on (a symlink, file attributes) that btfs never
    // sets.
    for (present, field) in [
        (info.attr.is_some(), "attr"),
        (info.sha1.is_some(), "sha1"),
        (info.symlink_path.is_some(), "symlink path"),
        (info.md5sum.is_some(), "md5sum"),
    ] {
        if present {
            return Err(TorrentError::UnexpectedInfoField(field));
        }
    }
    Ok((content, size, info.piece_length))
}

fn sha1(data: &[u8]) -> [u8; 20] {
    let mut h = sha1w::Sha1::new();
    h.update(data);
    h.finish()
}

/// SHA-1 of every piece, in order; contiguous runs of pieces on each thread.
fn hash_pieces(
    file: &Path,
    size: u64,
    piece_length: u32,
    threads: usize,
) -> Result<Vec<u8>, TorrentError> {
    let file = File::open(file)?;
    let len = file.metadata()?.len();
    if len != size {
        return Err(TorrentError::SizeChanged {
            expected: size,
            found: len,
        });
    }
    let pl = u64::from(piece_length);
    let n = size.div_ceil(pl);
    if n == 1 {
        return hash_one_piece(&file, size);
    }
    let threads = (threads.max(1) as u64).min(n);
    let per = n.div_ceil(threads);
    // SAFETY: the file is content being committed or an object: nothing
    // writes it while it is hashed (a change of length is caught above and
    // a change of bytes would only give a torrent that fails verification).
    let map = unsafe { memmap2::Mmap::map(&file)? };
    let _ = map.advise(memmap2::Advice::Sequential);
    let hashes = thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let map = &map;
                scope.spawn(move || -> std::io::Result<Vec<u8>> {
                    let (first, last) = (t * per, ((t + 1) * per).min(n));
                    let mut out = Vec::with_capacity(((last - first) * 20) as usize);
                    for p in first..last {
                        let off = (p * pl) as usize;
                        let this = (size - p * pl).min(pl) as usize;
                        out.extend_from_slice(&sha1(&map[off..off + this]));
                    }
                    Ok(out)
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| {
                w.join()
                    .unwrap_or_else(|_| Err(std::io::Error::other("hashing thread panicked")))
            })
            .collect::<std::io::Result<Vec<_>>>()
    })?;
    Ok(hashes.concat())
}

/// The hash of content that fits in one piece (every file up to
/// `MIN_PIECE`: most files of a source tree), read on the calling thread.
/// A thread and a memory map per small file cost more than the hashing:
/// the unmap alone interrupts every CPU to flush its TLB, and committing a
/// tree of small files is a stream of such calls.
fn hash_one_piece(file: &File, size: u64) -> Result<Vec<u8>, TorrentError> {
    use std::io::Read;
    let mut buf = Vec::with_capacity(size as usize);
    // One byte more than expected: a file that grew meanwhile is caught.
    file.take(size + 1).read_to_end(&mut buf)?;
    if buf.len() as u64 != size {
        return Err(TorrentError::SizeChanged {
            expected: size,
            found: buf.len() as u64,
        });
    }
    Ok(sha1(&buf).to_vec())
}

/// The SHA-1 of pieces `which` (indices, in any order) of `size` bytes at
/// `piece_length` in `file`, in the order asked, read with `pread` on up to
/// `threads` threads (contiguous runs of `which` each): for a few pieces of
/// a large file, where a map of the whole file would be more work than the
/// reads.
pub(crate) fn hash_pieces_at(
    file: &File,
    size: u64,
    piece_length: u32,
    which: &[u64],
    threads: usize,
) -> std::io::Result<Vec<[u8; 20]>> {
    use std::os::unix::fs::FileExt;
    let pl = u64::from(piece_length);
    let hash_run = |run: &[u64]| -> std::io::Result<Vec<[u8; 20]>> {
        let mut buf = vec![0u8; piece_length as usize];
        let mut out = Vec::with_capacity(run.len());
        for &p in run {
            let off = p.saturating_mul(pl);
            if off >= size {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("piece {p} lies past the end ({size} bytes)"),
                ));
            }
            let this = (size - off).min(pl) as usize;
            file.read_exact_at(&mut buf[..this], off)?;
            out.push(sha1(&buf[..this]));
        }
        Ok(out)
    };
    let threads = threads.max(1).min(which.len());
    if threads <= 1 {
        return hash_run(which);
    }
    let per = which.len().div_ceil(threads);
    let hashes = thread::scope(|scope| {
        let workers: Vec<_> = which
            .chunks(per)
            .map(|run| scope.spawn(move || hash_run(run)))
            .collect();
        workers
            .into_iter()
            .map(|w| {
                w.join()
                    .unwrap_or_else(|_| Err(std::io::Error::other("hashing thread panicked")))
            })
            .collect::<std::io::Result<Vec<_>>>()
    })?;
    Ok(hashes.concat())
}

/// The SHA-1 of `data`.
pub(crate) fn sha1_of(data: &[u8]) -> [u8; 20] {
    sha1(data)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use librqbit::{CloneToOwned, TorrentMetaV1Owned};
    use librqbit_bencode::{BencodeValue, BencodeValueOwned};

    use super::*;

    #[test]
    fn piece_length_keeps_pieces_near_the_target() {
        assert_eq!(piece_length(1), MIN_PIECE);
        assert_eq!(piece_length(256 << 20), 256 << 10);
        assert_eq!(piece_length(1 << 30), 512 << 10);
        assert_eq!(piece_length(3 << 29), 1 << 20);
        assert_eq!(piece_length(20 << 30), MAX_PIECE);
        for size in [1u64, 4095, 1 << 20, 3 << 28, 1 << 32, 7 << 30] {
            let pl = u64::from(piece_length(size));
            assert!(pl.is_power_of_two());
            assert!(size.div_ceil(pl) <= TARGET_PIECES * 3 / 2 || pl == u64::from(MAX_PIECE));
        }
    }

    fn file_of(len: usize) -> (tempfile::NamedTempFile, ContentId, Vec<u8>) {
        let data: Vec<u8> = (0..len).map(|i| (i * 7 + i / 251) as u8).collect();
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&data).unwrap();
        (f, ContentId::of(&data), data)
    }

    #[test]
    fn a_torrent_is_a_function_of_the_content_with_one_hash_per_piece() {
        // An exact multiple of the piece length: librqbit's own creator adds
        // a hash for an empty last piece there.
        for len in [
            1usize,
            1000,
            256 << 10,
            (256 << 10) * 3,
            (256 << 10) * 3 + 17,
        ] {
            let (f, c, data) = file_of(len);
            let one = Metainfo::build(&c, f.path(), len as u64, 1).unwrap();
            let four = Metainfo::build(&c, f.path(), len as u64, 4).unwrap();
            assert_eq!(one.bytes, four.bytes, "threads must not change the torrent");
            let parsed = Metainfo::parse(one.bytes.clone(), &one.info_hash).unwrap();
            assert_eq!(parsed.content, c);
            assert_eq!(parsed.size, len as u64);
            let t = torrent_from_bytes(&one.bytes).unwrap();
            let pieces: &[u8] = t.info.data.pieces.as_ref();
            assert_eq!(pieces.len() as u64, one.pieces() * 20);
            assert!(t.info.data.private);
            // Each hash is the SHA-1 of its piece.
            let pl = one.piece_length as usize;
            for (i, chunk) in data.chunks(pl).enumerate() {
                assert_eq!(&pieces[i * 20..i * 20 + 20], &sha1(chunk));
            }
        }
    }

    #[test]
    fn a_torrent_for_other_content_or_another_hash_is_refused() {
        let (f, c, _) = file_of(5000);
        let m = Metainfo::build(&c, f.path(), 5000, 2).unwrap();
        let other = InfoHash([7; 20]);
        assert!(matches!(
            Metainfo::parse(m.bytes.clone(), &other),
            Err(TorrentError::WrongInfoHash { expected, found })
                if expected == other && found == m.info_hash
        ));
        let mut corrupt = m.bytes.clone();
        let at = corrupt.len() / 2;
        corrupt[at] ^= 1;
        assert!(Metainfo::parse(corrupt, &m.info_hash).is_err());
        assert!(matches!(
            Metainfo::build(&c, f.path(), 4999, 1),
            Err(TorrentError::SizeChanged { .. })
        ));
    }

    // ----- hostile metainfo ------------------------------------------------------

    /// A good torrent of three and a bit pieces.
    fn good() -> Metainfo {
        let len = (256 << 10) * 3 + 17;
        let (f, c, _) = file_of(len);
        Metainfo::build(&c, f.path(), len as u64, 2).unwrap()
    }

    /// `m` decoded, changed by `change` and encoded again (the info hash is
    /// that of the changed info dictionary); returns the bytes and that hash.
    fn mutated(m: &Metainfo, change: impl FnOnce(&mut TorrentMetaV1Owned)) -> (Vec<u8>, InfoHash) {
        let mut t = torrent_from_bytes(&m.bytes).unwrap().clone_to_owned(None);
        change(&mut t);
        let mut raw = Vec::new();
        bencode_serialize_to_writer(&t.info.data, &mut raw).unwrap();
        let ih = InfoHash(sha1(&raw));
        let mut bytes = Vec::new();
        bencode_serialize_to_writer(&t, &mut bytes).unwrap();
        (bytes, ih)
    }

    fn parse_mutated(
        m: &Metainfo,
        change: impl FnOnce(&mut TorrentMetaV1Owned),
    ) -> Result<Metainfo, TorrentError> {
        let (bytes, ih) = mutated(m, change);
        Metainfo::parse(bytes, &ih)
    }

    #[test]
    fn an_unchanged_reencoding_is_accepted_as_is() {
        let m = good();
        let (bytes, ih) = mutated(&m, |_| {});
        assert_eq!((&bytes, ih), (&m.bytes, m.info_hash));
        let p = Metainfo::parse(bytes, &ih).unwrap();
        assert_eq!(p.bytes, m.bytes);
        assert_eq!(
            (p.size, p.piece_length, p.content),
            (m.size, m.piece_length, m.content)
        );
        assert_eq!(p.piece_count().unwrap() as u64, m.pieces());
    }

    #[test]
    fn piece_length_zero_is_refused() {
        let r = parse_mutated(&good(), |t| t.info.data.piece_length = 0);
        assert!(matches!(
            r,
            Err(TorrentError::BadPieceLength { found: 0, .. })
        ));
    }

    #[test]
    fn piece_length_one_on_a_large_file_is_refused() {
        // 1 TiB in 1-byte pieces would be 2^40 pieces; the hashes stay few.
        let r = parse_mutated(&good(), |t| {
            t.info.data.piece_length = 1;
            t.info.data.length = Some(1 << 40);
        });
        assert!(matches!(
            r,
            Err(TorrentError::BadPieceLength { found: 1, .. })
        ));
    }

    #[test]
    fn piece_length_not_a_power_of_two_or_out_of_range_is_refused() {
        for pl in [
            MIN_PIECE + 1,
            3 << 18,
            MIN_PIECE / 2,
            MAX_PIECE * 2,
            u32::MAX,
        ] {
            let r = parse_mutated(&good(), |t| t.info.data.piece_length = pl);
            assert!(
                matches!(r, Err(TorrentError::BadPieceLength { found, .. }) if found == pl),
                "{pl}: {r:?}"
            );
        }
    }

    #[test]
    fn piece_count_mismatch_is_refused() {
        let m = good();
        let r = parse_mutated(&m, |t| {
            let p: &[u8] = t.info.data.pieces.as_ref();
            t.info.data.pieces = p[..p.len() - 20].to_vec().into();
        });
        assert!(matches!(
            r,
            Err(TorrentError::PieceCountMismatch {
                found: 3,
                expected: 4
            })
        ));
        let r = parse_mutated(&m, |t| {
            let mut p = t.info.data.pieces.as_ref().to_vec();
            p.extend_from_slice(&[0; 20]);
            t.info.data.pieces = p.into();
        });
        assert!(matches!(
            r,
            Err(TorrentError::PieceCountMismatch {
                found: 5,
                expected: 4
            })
        ));
        // The length of another number of pieces.
        let r = parse_mutated(&m, |t| t.info.data.length = Some(1 << 30));
        assert!(matches!(
            r,
            Err(TorrentError::PieceCountMismatch {
                found: 4,
                expected: 4096
            })
        ));
    }

    #[test]
    fn pieces_not_a_multiple_of_20_is_refused() {
        let r = parse_mutated(&good(), |t| {
            let p: &[u8] = t.info.data.pieces.as_ref();
            t.info.data.pieces = p[..p.len() - 1].to_vec().into();
        });
        assert!(matches!(
            r,
            Err(TorrentError::PiecesNotMultipleOf20 { len: 79 })
        ));
    }

    #[test]
    fn oversized_metainfo_is_refused() {
        // Outside the info dictionary, so the info hash stays right: only
        // the byte bound refuses it.
        let m = good();
        let (bytes, ih) = mutated(&m, |t| {
            t.comment = Some(vec![b'x'; MAX_METAINFO_BYTES].into());
        });
        assert_eq!(ih, m.info_hash);
        let len = bytes.len();
        assert!(matches!(
            Metainfo::parse(bytes, &ih),
            Err(TorrentError::MetainfoTooLarge { len: l, max: MAX_METAINFO_BYTES }) if l == len
        ));
    }

    #[test]
    fn size_over_bound_is_refused() {
        let r = parse_mutated(&good(), |t| {
            t.info.data.piece_length = MAX_PIECE;
            t.info.data.length = Some(MAX_SIZE + 1);
        });
        assert!(matches!(
            r,
            Err(TorrentError::LengthOutOfBounds { length, max: MAX_SIZE }) if length == MAX_SIZE + 1
        ));
        let r = parse_mutated(&good(), |t| t.info.data.length = Some(u64::MAX));
        assert!(matches!(r, Err(TorrentError::LengthOutOfBounds { .. })));
    }

    #[test]
    fn size_zero_or_missing_is_refused() {
        let r = parse_mutated(&good(), |t| t.info.data.length = Some(0));
        assert!(matches!(
            r,
            Err(TorrentError::LengthOutOfBounds { length: 0, .. })
        ));
        let r = parse_mutated(&good(), |t| t.info.data.length = None);
        assert!(matches!(r, Err(TorrentError::MissingLength)));
    }

    #[test]
    fn multi_file_is_refused() {
        let r = parse_mutated(&good(), |t| {
            let length = t.info.data.length.take().unwrap();
            t.info.data.files = Some(vec![librqbit::TorrentMetaV1File {
                length,
                path: vec![b"a"[..].into()],
                attr: None,
                sha1: None,
                symlink_path: None,
            }]);
        });
        assert!(matches!(r, Err(TorrentError::MultiFile)));
        // A `files` list next to a length is no better.
        let r = parse_mutated(&good(), |t| t.info.data.files = Some(vec![]));
        assert!(matches!(r, Err(TorrentError::MultiFile)));
    }

    #[test]
    fn a_name_that_is_not_the_content_id_is_refused() {
        let m = good();
        let upper = m.content.to_hex().to_uppercase();
        for name in [
            None,
            Some(b"../../etc/passwd".to_vec()),
            Some(upper.into_bytes()),
            Some(m.content.to_hex().as_bytes()[1..].to_vec()),
            Some(vec![0xff; 64]),
        ] {
            let r = parse_mutated(&m, |t| t.info.data.name = name.map(Into::into));
            assert!(matches!(r, Err(TorrentError::BadName)), "{r:?}");
        }
    }

    #[test]
    fn a_public_torrent_is_refused() {
        let r = parse_mutated(&good(), |t| t.info.data.private = false);
        assert!(matches!(r, Err(TorrentError::NotPrivate)));
    }

    #[test]
    fn extra_info_fields_are_refused() {
        let r = parse_mutated(&good(), |t| {
            t.info.data.symlink_path = Some(vec![b"etc"[..].into(), b"passwd"[..].into()]);
        });
        assert!(matches!(
            r,
            Err(TorrentError::UnexpectedInfoField("symlink path"))
        ));
        let r = parse_mutated(&good(), |t| t.info.data.attr = Some(b"x"[..].into()));
        assert!(matches!(r, Err(TorrentError::UnexpectedInfoField("attr"))));
        let r = parse_mutated(&good(), |t| t.info.data.md5sum = Some(b"x"[..].into()));
        assert!(matches!(
            r,
            Err(TorrentError::UnexpectedInfoField("md5sum"))
        ));
    }

    #[test]
    fn unknown_info_keys_are_refused() {
        // Keys the typed decoder skips: found by encoding the info
        // dictionary again.
        let m = good();
        let mut t: BencodeValueOwned = librqbit_bencode::dyn_from_bytes(&m.bytes).unwrap();
        let BencodeValue::Dict(outer) = &mut t else {
            panic!("not a dictionary")
        };
        let info = outer.get_mut(&ByteBufOwned::from(&b"info"[..])).unwrap();
        let BencodeValue::Dict(d) = info else {
            panic!("info is not a dictionary")
        };
        d.insert(b"x-extra"[..].into(), BencodeValue::Integer(1));
        let mut raw = Vec::new();
        bencode_serialize_to_writer(&*info, &mut raw).unwrap();
        let ih = InfoHash(sha1(&raw));
        let mut bytes = Vec::new();
        bencode_serialize_to_writer(&t, &mut bytes).unwrap();
        assert!(matches!(
            Metainfo::parse(bytes, &ih),
            Err(TorrentError::NonCanonicalInfo)
        ));
    }

    #[test]
    fn trackers_and_comments_are_dropped() {
        let m = good();
        let (bytes, ih) = mutated(&m, |t| {
            t.announce = Some(b"http://tracker.example/announce"[..].into());
            t.announce_list = vec![vec![b"udp://tracker.example:1"[..].into()]];
            t.comment = Some(b"hello"[..].into());
        });
        assert_eq!(ih, m.info_hash);
        assert_ne!(bytes, m.bytes);
        let p = Metainfo::parse(bytes, &ih).unwrap();
        assert_eq!(p.bytes, m.bytes);
    }

    #[test]
    fn a_torrent_of_other_content_or_size_than_wanted_is_refused() {
        let m = good();
        let want = Wanted {
            path: "f".into(),
            content: m.content,
            torrent: m.info_hash,
            size: m.size,
            author: btfs_core::NodeId([1; 32]),
        };
        assert!(Metainfo::parse_wanted(m.bytes.clone(), &want).is_ok());
        let other = Wanted {
            size: m.size + 1,
            ..want.clone()
        };
        assert!(matches!(
            Metainfo::parse_wanted(m.bytes.clone(), &other),
            Err(TorrentError::WrongContent { .. })
        ));
        let other = Wanted {
            content: ContentId([9; 32]),
            ..want.clone()
        };
        assert!(matches!(
            Metainfo::parse_wanted(m.bytes.clone(), &other),
            Err(TorrentError::WrongContent { .. })
        ));
        let other = Wanted {
            torrent: InfoHash([9; 20]),
            ..want
        };
        assert!(matches!(
            Metainfo::parse_wanted(m.bytes.clone(), &other),
            Err(TorrentError::WrongInfoHash { .. })
        ));
    }

    #[test]
    fn build_refuses_content_over_the_bound() {
        let (f, c, _) = file_of(10);
        assert!(matches!(
            Metainfo::build(&c, f.path(), MAX_SIZE + 1, 1),
            Err(TorrentError::LengthOutOfBounds { .. })
        ));
    }

    #[test]
    fn the_bounds_hold_for_the_largest_torrent_built() {
        let pl = piece_length(MAX_SIZE);
        assert_eq!(pl, MAX_PIECE);
        assert_eq!(MAX_SIZE.div_ceil(u64::from(pl)), MAX_PIECES);
        assert_eq!(check_geometry(MAX_SIZE, pl).unwrap(), MAX_PIECES);
        // Its hashes and the rest of a btfs torrent fit the byte bound.
        assert!(MAX_PIECES as usize * 20 + 200 <= MAX_METAINFO_BYTES);
    }

    #[test]
    fn piece_count_checks_a_metainfo_made_by_hand() {
        let mut m = good();
        m.piece_length = 0;
        assert_eq!(m.pieces(), 0);
        assert!(matches!(
            m.piece_count(),
            Err(TorrentError::BadPieceLength { .. })
        ));
        m.piece_length = MIN_PIECE;
        m.size = MAX_SIZE;
        assert!(matches!(
            m.piece_count(),
            Err(TorrentError::TooManyPieces { .. })
        ));
    }

    #[test]
    fn a_piece_length_other_than_the_one_for_the_size_is_accepted() {
        // A version written in place keeps its base's piece length
        // (`sticky_piece_length`): other nodes must accept it.
        let len = 3 << 20;
        let (f, c, _) = file_of(len);
        assert_ne!(piece_length(len as u64), MAX_PIECE);
        let m = Metainfo::build_with(&c, f.path(), len as u64, 2, MAX_PIECE).unwrap();
        let p = Metainfo::parse(m.bytes.clone(), &m.info_hash).unwrap();
        assert_eq!((p.piece_length, p.pieces()), (MAX_PIECE, 1));
        let want = Wanted {
            path: "f".into(),
            content: c,
            torrent: m.info_hash,
            size: len as u64,
            author: btfs_core::NodeId([1; 32]),
        };
        assert_eq!(
            Metainfo::parse_wanted(m.bytes.clone(), &want)
                .unwrap()
                .piece_length,
            MAX_PIECE
        );
        // Out of bounds, it is not built.
        assert!(matches!(
            Metainfo::build_with(&c, f.path(), len as u64, 2, MIN_PIECE / 2),
            Err(TorrentError::BadPieceLength { .. })
        ));
    }

    #[test]
    fn the_bases_piece_length_is_kept_while_within_the_bounds() {
        assert_eq!(sticky_piece_length(MAX_PIECE, 10), MAX_PIECE);
        assert_eq!(sticky_piece_length(MIN_PIECE, 4 << 30), MIN_PIECE);
        let most = u64::from(MIN_PIECE) * MAX_PIECES;
        assert_eq!(sticky_piece_length(MIN_PIECE, most), MIN_PIECE);
        assert_eq!(
            sticky_piece_length(MIN_PIECE, most + 1),
            piece_length(most + 1)
        );
        for bad in [0, 3 << 19, MIN_PIECE / 2, MAX_PIECE * 2] {
            assert_eq!(sticky_piece_length(bad, 1 << 30), piece_length(1 << 30));
        }
    }

    #[test]
    fn an_update_hashes_only_the_pieces_it_must() {
        let p = MIN_PIECE as usize;
        let (base_file, base_c, base) = file_of(10 * p);
        let base_m = Metainfo::build(&base_c, base_file.path(), base.len() as u64, 2).unwrap();
        let mut new = base.clone();
        new[4 * p + 9] ^= 1;
        new.extend(vec![5u8; p / 2]);
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&new).unwrap();
        let c = ContentId::of(&new);
        let changed = [
            (4 * p as u64 + 9, 4 * p as u64 + 10),
            (10 * p as u64, 11 * p as u64),
        ];
        let (m, reused) = Metainfo::build_update(
            &c,
            f.path(),
            new.len() as u64,
            2,
            Some(&base_m),
            base.len() as u64,
            &changed,
        )
        .unwrap();
        assert_eq!(reused, 9);
        let full = Metainfo::build(&c, f.path(), new.len() as u64, 3).unwrap();
        assert_eq!(m.bytes, full.bytes);
        assert_eq!(m.info_hash, full.info_hash);
        // Without a base: the full build.
        let (m, reused) =
            Metainfo::build_update(&c, f.path(), new.len() as u64, 2, None, 0, &[]).unwrap();
        assert_eq!((m.info_hash, reused), (full.info_hash, 0));
    }

    /// What holds of every metainfo `parse` accepts.
    fn assert_invariants(m: &Metainfo, asked: &InfoHash) {
        assert_eq!(m.info_hash, *asked);
        assert!(m.piece_length.is_power_of_two());
        assert!((MIN_PIECE..=MAX_PIECE).contains(&m.piece_length));
        assert!(m.size > 0 && m.size <= MAX_SIZE);
        assert!(m.pieces() <= MAX_PIECES);
        assert_eq!(m.piece_count().unwrap() as u64, m.pieces());
        assert!(m.bytes.len() <= MAX_METAINFO_BYTES);
        let t = torrent_from_bytes(&m.bytes).unwrap();
        assert_eq!(t.info_hash.0, asked.0);
        let pieces: &[u8] = t.info.data.pieces.as_ref();
        assert_eq!(pieces.len() as u64, m.pieces() * 20);
        assert_eq!(t.info.data.length, Some(m.size));
        assert!(t.info.data.files.is_none() && t.info.data.private);
        assert!(t.announce.is_none() && t.announce_list.is_empty());
        // Parsing what `parse` gives back gives the same.
        let again = Metainfo::parse(m.bytes.clone(), asked).unwrap();
        assert_eq!(again.bytes, m.bytes);
    }

    /// A metainfo's hash as the parser computes it, when it decodes at all.
    fn decoded_hash(bytes: &[u8]) -> Option<InfoHash> {
        torrent_from_bytes(bytes)
            .ok()
            .map(|t| InfoHash(t.info_hash.0))
    }

    mod props {
        use proptest::prelude::*;

        use super::*;

        fn good_one() -> &'static Metainfo {
            static GOOD: std::sync::OnceLock<Metainfo> = std::sync::OnceLock::new();
            GOOD.get_or_init(good)
        }

        /// Pieces of the mutated info dictionary: the right number of
        /// hashes, one more or one less, or any short byte string.
        #[derive(Debug, Clone)]
        enum Pieces {
            Right,
            More,
            Fewer,
            Bytes(Vec<u8>),
        }

        fn piece_lengths() -> impl Strategy<Value = u32> {
            prop_oneof![
                4 => (18u32..=22).prop_map(|s| 1 << s),
                1 => Just(0u32),
                1 => Just(1u32),
                1 => any::<u32>(),
                1 => MIN_PIECE - 2..MIN_PIECE + 2,
            ]
        }

        fn lengths() -> impl Strategy<Value = Option<u64>> {
            prop_oneof![
                4 => (0u64..64 << 20).prop_map(Some),
                1 => (MAX_SIZE - 2..MAX_SIZE + 2).prop_map(Some),
                1 => any::<u64>().prop_map(Some),
                1 => Just(None),
            ]
        }

        fn pieces() -> impl Strategy<Value = Pieces> {
            prop_oneof![
                4 => Just(Pieces::Right),
                1 => Just(Pieces::More),
                1 => Just(Pieces::Fewer),
                1 => proptest::collection::vec(any::<u8>(), 0..200).prop_map(Pieces::Bytes),
            ]
        }

        /// A change to a file written in place.
        #[derive(Debug, Clone)]
        enum Op {
            /// Bytes at an offset (past the end: the gap reads as zeros).
            Write { at: u64, len: u64, seed: u8 },
            /// A cut to a fraction (in 1/256) of the size.
            Truncate(u8),
            /// Zeros appended.
            Extend(u64),
        }

        fn ops() -> impl Strategy<Value = Vec<Op>> {
            let p = u64::from(MIN_PIECE);
            let op = prop_oneof![
                6 => (0..13 * p, 1..2 * p, any::<u8>())
                    .prop_map(|(at, len, seed)| Op::Write { at, len, seed }),
                1 => any::<u8>().prop_map(Op::Truncate),
                1 => (0..3 * p).prop_map(Op::Extend),
            ];
            proptest::collection::vec(op, 0..6)
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(64))]

            /// `build_update` gives exactly the torrent of the new file
            /// hashed in full at the piece length it chose (the base's while
            /// in bounds), whatever was written, cut or appended.
            #[test]
            fn an_update_is_the_torrent_of_the_new_bytes(
                base_len in 1u64..12 * u64::from(MIN_PIECE),
                base_pl in prop_oneof![Just(MIN_PIECE), Just(MIN_PIECE * 2), Just(MAX_PIECE)],
                ops in ops(),
                with_base in prop::bool::weighted(0.9),
                threads in 1usize..4,
            ) {
                let (base_file, base_c, base) = file_of(base_len as usize);
                let base_m =
                    Metainfo::build_with(&base_c, base_file.path(), base_len, 2, base_pl).unwrap();
                let mut data = base.clone();
                let mut kept = base_len;
                let mut changed = Vec::new();
                for op in ops {
                    match op {
                        Op::Write { at, len, seed } => {
                            let end = (at + len) as usize;
                            if data.len() < end {
                                data.resize(end, 0);
                            }
                            for (i, b) in data[at as usize..end].iter_mut().enumerate() {
                                *b = seed.wrapping_add((i * 31) as u8);
                            }
                            changed.push((at, at + len));
                        }
                        Op::Truncate(frac) => {
                            let to = data.len() * usize::from(frac) / 256;
                            data.truncate(to);
                            kept = kept.min(to as u64);
                        }
                        Op::Extend(by) => data.resize(data.len() + by as usize, 0),
                    }
                }
                if data.is_empty() {
                    data.push(1);
                    changed.push((0, 1));
                }
                let size = data.len() as u64;
                let mut f = tempfile::NamedTempFile::new().unwrap();
                f.write_all(&data).unwrap();
                let c = ContentId::of(&data);
                let base = with_base.then_some(&base_m);
                let (m, reused) =
                    Metainfo::build_update(&c, f.path(), size, threads, base, kept, &changed)
                        .unwrap();
                let pl = if with_base {
                    sticky_piece_length(base_pl, size)
                } else {
                    piece_length(size)
                };
                let full = Metainfo::build_with(&c, f.path(), size, 1, pl).unwrap();
                prop_assert_eq!(m.piece_length, pl);
                prop_assert_eq!(&m.bytes, &full.bytes);
                prop_assert!(reused <= m.pieces());
                prop_assert!(with_base || reused == 0);
            }

            #[test]
            fn arbitrary_bytes_never_panic(
                bytes in proptest::collection::vec(any::<u8>(), 0..512),
                ih in any::<[u8; 20]>(),
            ) {
                if let Ok(m) = Metainfo::parse(bytes.clone(), &InfoHash(ih)) {
                    assert_invariants(&m, &InfoHash(ih));
                }
                if let Some(ih) = decoded_hash(&bytes)
                    && let Ok(m) = Metainfo::parse(bytes, &ih)
                {
                    assert_invariants(&m, &ih);
                }
            }

            #[test]
            fn byte_mutations_of_a_good_metainfo_never_panic(
                edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..6),
            ) {
                let m = good_one();
                let mut bytes = m.bytes.clone();
                for (at, byte, op) in edits {
                    let i = at.index(bytes.len().max(1));
                    match op {
                        0 if i < bytes.len() => bytes[i] = byte,
                        1 => bytes.insert(i.min(bytes.len()), byte),
                        _ => bytes.truncate(i),
                    }
                }
                for ih in [Some(m.info_hash), decoded_hash(&bytes)].into_iter().flatten() {
                    if let Ok(p) = Metainfo::parse(bytes.clone(), &ih) {
                        assert_invariants(&p, &ih);
                    }
                }
            }

            #[test]
            fn field_mutations_are_refused_exactly_when_out_of_bounds(
                piece_length in piece_lengths(),
                length in lengths(),
                pieces in pieces(),
                private in prop::bool::weighted(0.9),
                multi in prop::bool::weighted(0.1),
                bad_name in prop::bool::weighted(0.1),
            ) {
                let m = good_one();
                // The hashes the length and piece length call for, when few.
                let right = match (length, piece_length) {
                    (Some(l), pl) if pl > 0 => l.div_ceil(u64::from(pl)),
                    _ => 0,
                };
                let count = |n: u64| usize::try_from(n.min(4096)).unwrap() * 20;
                let hashes = match &pieces {
                    Pieces::Right => vec![7u8; count(right)],
                    Pieces::More => vec![7u8; count(right + 1)],
                    Pieces::Fewer => vec![7u8; count(right.saturating_sub(1))],
                    Pieces::Bytes(b) => b.clone(),
                };
                let (bytes, ih) = mutated(m, |t| {
                    let i = &mut t.info.data;
                    i.piece_length = piece_length;
                    i.length = length;
                    i.pieces = hashes.clone().into();
                    i.private = private;
                    if multi {
                        i.files = Some(vec![]);
                    }
                    if bad_name {
                        i.name = Some(b"x"[..].into());
                    }
                });
                let valid = !multi
                    && !bad_name
                    && private
                    && length.is_some_and(|l| l > 0 && l <= MAX_SIZE)
                    && piece_length.is_power_of_two()
                    && (MIN_PIECE..=MAX_PIECE).contains(&piece_length)
                    && hashes.len() as u64 == right * 20;
                match Metainfo::parse(bytes, &ih) {
                    Ok(p) => {
                        prop_assert!(valid, "accepted {piece_length} {length:?} {}", hashes.len());
                        assert_invariants(&p, &ih);
                        prop_assert_eq!(Some(p.size), length);
                        prop_assert_eq!(p.piece_length, piece_length);
                    }
                    Err(e) => prop_assert!(!valid, "refused a valid metainfo: {e}"),
                }
            }
        }
    }
}
