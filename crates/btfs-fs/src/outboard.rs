//! blake3 outboards: the chaining value of every `SUBTREE` bytes of an
//! object, kept beside the object store, so that a new version written in
//! place over it is hashed by rehashing only the subtrees it changed and
//! merging the rest (blake3 is a tree hash; `blake3::hazmat` exposes its
//! nodes).
//!
//! An outboard is a cache: a missing or unreadable one is rebuilt from the
//! object (one full read), and one that does not match its object's length
//! is ignored. It never decides what content is: the root it gives is the
//! content id only because the subtrees were hashed from those very bytes.

use std::{
    fs::{self, File},
    io,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    thread,
};

use blake3::hazmat::{
    ChainingValue, HasherExt, Mode, merge_subtrees_non_root, merge_subtrees_root,
};
use btfs_core::ContentId;

/// Bytes per kept chaining value: 1 MiB (1024 blake3 chunks, a power of two,
/// as a subtree must be). 4 GiB of content has a 128 KiB outboard.
pub(crate) const SUBTREE: u64 = 1 << 20;

/// Threads that hash subtrees of one file.
const HASH_THREADS: usize = 4;

/// Chaining values of the subtrees of `len` bytes of content, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Outboard {
    pub(crate) len: u64,
    pub(crate) cvs: Vec<ChainingValue>,
}

/// How many subtrees `len` bytes have.
pub(crate) fn subtrees(len: u64) -> u64 {
    len.div_ceil(SUBTREE)
}

/// The chaining value of subtree `index`, whose bytes are `data` (all of
/// them: `SUBTREE` bytes, or fewer for the last subtree).
pub(crate) fn subtree_cv(index: u64, data: &[u8]) -> ChainingValue {
    let mut h = blake3::Hasher::new();
    h.set_input_offset(index * SUBTREE);
    h.update(data);
    h.finalize_non_root()
}

impl Outboard {
    /// The content id of the content, from the chaining values alone;
    /// `None` for content of one subtree or less (no parent node: hash the
    /// bytes themselves).
    pub(crate) fn root(&self) -> Option<ContentId> {
        if self.len <= SUBTREE || self.cvs.len() as u64 != subtrees(self.len) {
            return None;
        }
        let left = blake3::hazmat::left_subtree_len(self.len);
        let l = self.node(0, left);
        let r = self.node(left, self.len - left);
        Some(merge_subtrees_root(&l, &r, Mode::Hash).into())
    }

    /// The chaining value of the tree node over bytes `[start, start + len)`
    /// (a node of blake3's tree: `start` a multiple of `SUBTREE`).
    fn node(&self, start: u64, len: u64) -> ChainingValue {
        if len <= SUBTREE {
            return self.cvs[(start / SUBTREE) as usize];
        }
        let left = blake3::hazmat::left_subtree_len(len);
        let l = self.node(start, left);
        let r = self.node(start + left, len - left);
        merge_subtrees_non_root(&l, &r, Mode::Hash)
    }

    /// Hashes `len` bytes of `file` into an outboard, on several threads.
    pub(crate) fn of_file(file: &File, len: u64) -> io::Result<Self> {
        let n = subtrees(len);
        let mut cvs = vec![[0u8; 32]; n as usize];
        let threads = (HASH_THREADS as u64).min(n).max(1);
        let per = n.div_ceil(threads) as usize;
        thread::scope(|scope| {
            let workers: Vec<_> = cvs
                .chunks_mut(per.max(1))
                .enumerate()
                .map(|(t, out)| {
                    scope.spawn(move || -> io::Result<()> {
                        let mut buf = vec![0u8; SUBTREE as usize];
                        for (k, cv) in out.iter_mut().enumerate() {
                            let i = (t * per + k) as u64;
                            let this = (len - i * SUBTREE).min(SUBTREE) as usize;
                            file.read_exact_at(&mut buf[..this], i * SUBTREE)?;
                            *cv = subtree_cv(i, &buf[..this]);
                        }
                        Ok(())
                    })
                })
                .collect();
            workers.into_iter().try_for_each(|w| {
                w.join()
                    .unwrap_or_else(|_| Err(io::Error::other("hashing thread panicked")))
            })
        })?;
        Ok(Self { len, cvs })
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + self.cvs.len() * 32);
        out.extend_from_slice(&self.len.to_le_bytes());
        for cv in &self.cvs {
            out.extend_from_slice(cv);
        }
        out
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        let (len, rest) = bytes.split_first_chunk::<8>()?;
        let len = u64::from_le_bytes(*len);
        if rest.len() as u64 != subtrees(len).checked_mul(32)? {
            return None;
        }
        let cvs = rest
            .chunks_exact(32)
            .map(|c| {
                let mut cv = [0u8; 32];
                cv.copy_from_slice(c);
                cv
            })
            .collect();
        Some(Self { len, cvs })
    }
}

/// Where the outboards of objects are kept: `outboard/<content hex>`.
#[derive(Debug, Clone)]
pub(crate) struct Outboards {
    dir: PathBuf,
}

impl Outboards {
    pub(crate) fn open(state_dir: &Path) -> io::Result<Self> {
        let dir = state_dir.join("outboard");
        fs::create_dir_all(&dir)?;
        Ok(Self { dir })
    }

    fn path(&self, c: &ContentId) -> PathBuf {
        self.dir.join(c.to_hex())
    }

    /// The kept outboard of `c` if it is there and of `len` bytes.
    pub(crate) fn get(&self, c: &ContentId, len: u64) -> Option<Outboard> {
        let bytes = fs::read(self.path(c)).ok()?;
        Outboard::decode(&bytes).filter(|o| o.len == len)
    }

    /// The outboard of object `c` (`len` bytes in `file`): kept, or hashed
    /// now and kept (after checking that it is `c`'s).
    pub(crate) fn get_or_hash(&self, c: &ContentId, file: &File, len: u64) -> io::Result<Outboard> {
        if let Some(o) = self.get(c, len) {
            return Ok(o);
        }
        let o = Outboard::of_file(file, len)?;
        if o.root() != Some(*c) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("object {} does not hash to its name", c.short()),
            ));
        }
        self.put(c, &o);
        Ok(o)
    }

    /// Keeps `o` as `c`'s outboard (best effort: it is a cache).
    pub(crate) fn put(&self, c: &ContentId, o: &Outboard) {
        let path = self.path(c);
        let tmp = path.with_extension("tmp");
        if fs::write(&tmp, o.encode())
            .and_then(|()| fs::rename(&tmp, &path))
            .is_err()
        {
            let _ = fs::remove_file(&tmp);
        }
    }

    /// Forgets `c`'s outboard (its object went).
    pub(crate) fn remove(&self, c: &ContentId) {
        let _ = fs::remove_file(self.path(c));
    }

    /// Deletes the outboards whose object is not here (left by a crash
    /// between an object's deletion and its outboard's).
    pub(crate) fn sweep(&self, here: impl Fn(&ContentId) -> bool) -> io::Result<usize> {
        let mut removed = 0;
        for e in fs::read_dir(&self.dir)? {
            let e = e?;
            let keep = e
                .file_name()
                .to_str()
                .and_then(|n| ContentId::from_hex(n).ok())
                .is_some_and(|c| here(&c));
            if !keep {
                fs::remove_file(e.path())?;
                removed += 1;
            }
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn outboard_of(data: &[u8]) -> Outboard {
        let len = data.len() as u64;
        let cvs = (0..subtrees(len))
            .map(|i| {
                let s = (i * SUBTREE) as usize;
                let e = ((i + 1) * SUBTREE).min(len) as usize;
                subtree_cv(i, &data[s..e])
            })
            .collect();
        Outboard { len, cvs }
    }

    #[test]
    fn the_root_of_the_subtrees_is_the_blake3_of_the_bytes() {
        for len in [
            SUBTREE + 1,
            SUBTREE + 1023,
            2 * SUBTREE,
            2 * SUBTREE + 1024,
            3 * SUBTREE + 5,
            5 * SUBTREE,
            7 * SUBTREE + 4097,
        ] {
            let data: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            let o = outboard_of(&data);
            assert_eq!(o.root(), Some(ContentId::of(&data)), "len {len}");
        }
        assert_eq!(
            outboard_of(&[7u8; 100]).root(),
            None,
            "one subtree has no root node"
        );
    }

    #[test]
    fn a_file_hashes_to_the_same_outboard_and_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..(9 * SUBTREE + 77)).map(|i| (i % 253) as u8).collect();
        let p = dir.path().join("f");
        fs::write(&p, &data).unwrap();
        let f = File::open(&p).unwrap();
        let o = Outboard::of_file(&f, data.len() as u64).unwrap();
        assert_eq!(o, outboard_of(&data));
        let obs = Outboards::open(dir.path()).unwrap();
        let c = ContentId::of(&data);
        assert_eq!(obs.get_or_hash(&c, &f, data.len() as u64).unwrap(), o);
        assert_eq!(obs.get(&c, data.len() as u64), Some(o.clone()));
        assert_eq!(obs.get(&c, 5), None, "another length is not this outboard");
        // An object that is not what its name says is refused.
        let other = ContentId::of(b"other");
        assert!(obs.get_or_hash(&other, &f, data.len() as u64).is_err());
        obs.remove(&c);
        assert_eq!(obs.get(&c, data.len() as u64), None);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// Changing some subtrees and rehashing only those gives the hash
        /// of the changed bytes.
        #[test]
        fn rehashing_changed_subtrees_gives_the_new_root(
            len in (SUBTREE + 1)..(6 * SUBTREE),
            writes in prop::collection::vec((0u64..(6 * SUBTREE), 1usize..5000, any::<u8>()), 1..6),
        ) {
            let mut data: Vec<u8> = (0..len).map(|i| (i % 241) as u8).collect();
            let mut o = outboard_of(&data);
            for (off, n, b) in writes {
                let off = off % len;
                let end = (off + n as u64).min(len);
                data[off as usize..end as usize].fill(b);
                for i in off / SUBTREE..=(end - 1) / SUBTREE {
                    let s = (i * SUBTREE) as usize;
                    let e = ((i + 1) * SUBTREE).min(len) as usize;
                    o.cvs[i as usize] = subtree_cv(i, &data[s..e]);
                }
            }
            prop_assert_eq!(o.root(), Some(ContentId::of(&data)));
        }
    }
}
