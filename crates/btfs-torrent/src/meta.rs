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

use btfs_core::{ContentId, InfoHash};
use librqbit::{ByteBufOwned, TorrentMetaV1Info, TorrentMetaV1Owned, torrent_from_bytes};
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
        if size == 0 {
            return Err(TorrentError::Empty);
        }
        let piece_length = piece_length(size);
        let pieces = hash_pieces(file, size, piece_length, threads)?;
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
        bencode_serialize_to_writer(&info, &mut raw).map_err(TorrentError::encode)?;
        let id = Id20::new(sha1(&raw));
        let meta = TorrentMetaV1Owned {
            announce: None,
            announce_list: vec![],
            info: WithRawBytes {
                data: info,
                raw_bytes: ByteBufOwned::from(raw),
            },
            comment: None,
            created_by: Some(b"btfs"[..].into()),
            encoding: None,
            publisher: None,
            publisher_url: None,
            creation_date: None,
            info_hash: id,
        };
        let mut bytes = Vec::new();
        bencode_serialize_to_writer(&meta, &mut bytes).map_err(TorrentError::encode)?;
        Ok(Self {
            info_hash: InfoHash(id.0),
            bytes,
            piece_length,
            size,
            content: *content,
        })
    }

    /// Parses a `.torrent` received from another node and checks that it is
    /// the torrent of `expected` (its info hash) and of `content`.
    pub fn parse(bytes: Vec<u8>, expected: &InfoHash) -> Result<Self, TorrentError> {
        let t = torrent_from_bytes(&bytes).map_err(|e| TorrentError::BadMetainfo(e.to_string()))?;
        if t.info_hash.0 != expected.0 {
            return Err(TorrentError::BadMetainfo(format!(
                "info hash {} is not the one asked for ({expected})",
                hex::encode(t.info_hash.0)
            )));
        }
        let info = &t.info.data;
        let name = info
            .name
            .as_ref()
            .and_then(|n| std::str::from_utf8(n.as_ref()).ok())
            .and_then(|n| ContentId::from_hex(n).ok())
            .ok_or_else(|| TorrentError::BadMetainfo("name is not a content id".into()))?;
        let (Some(size), None) = (info.length, &info.files) else {
            return Err(TorrentError::BadMetainfo(
                "not a single-file torrent".into(),
            ));
        };
        let piece_length = info.piece_length;
        Ok(Self {
            info_hash: *expected,
            piece_length,
            size,
            content: name,
            bytes,
        })
    }

    /// Number of pieces.
    pub fn pieces(&self) -> u64 {
        self.size.div_ceil(u64::from(self.piece_length))
    }
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

#[cfg(test)]
mod tests {
    use std::io::Write;

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
            Err(TorrentError::BadMetainfo(_))
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
}
