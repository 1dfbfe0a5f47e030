//! Signed records.
//!
//! A record is signed by its author's ed25519 key over a canonical encoding of
//! (domain tag, cluster name, path, record): the cluster name binds it to one
//! cluster, the path to one name. The author's node id *is* its public key, so
//! verification needs no key exchange; membership is the caller's decision.
//! Decoding validates the path (no absolute, `..`, empty or NUL components, no
//! over-long names) and the record's shape before anything else looks at it.
//!
//! Everything a record says is bounded before it is used: its encoding (at
//! most [`MAX_RECORD`] bytes, on every path in), its timestamps
//! ([`Timestamp::is_valid`]), its version vector ([`VersionVector::check`]:
//! [`MAX_VERSION_ENTRIES`] entries, counters up to [`MAX_COUNTER`], no zeros)
//! and, when membership is restricted, every node its vector names.
//!
//! [`VersionVector::check`]: btfs_core::VersionVector::check
//! [`MAX_VERSION_ENTRIES`]: btfs_core::MAX_VERSION_ENTRIES
//! [`MAX_COUNTER`]: btfs_core::MAX_COUNTER

use btfs_core::{FileKind, FileRecord, MAX_PATH_LEN, NodeId, RelPath, Timestamp};
use libp2p_identity::{Keypair, PublicKey, ed25519};
use serde::{Deserialize, Serialize};

/// Largest encoded record accepted: far below the gossip frame limit, and
/// generous for metadata (a record is a few hundred bytes).
pub const MAX_RECORD: usize = 16 * 1024;
/// Largest gossip message (a batch of records): below gossipsub's 65,536-byte
/// frame limit with room for its own framing and signature.
pub const MAX_BATCH: usize = 48 * 1024;
const DOMAIN: &str = "btfs-record-v1";
/// Authors whose decoded keys are kept (a cluster has far fewer); past it
/// the cache starts over.
const MAX_CACHED_AUTHORS: usize = 4096;

/// Decoded public keys by node id. Decoding a key (a point decompression)
/// costs about a quarter of a verification, and a sync page holds
/// thousands of records by a handful of authors. The key is a function of
/// the id's bytes alone, so one cache serves every cluster and caller.
static AUTHOR_KEYS: std::sync::LazyLock<
    std::sync::Mutex<std::collections::HashMap<NodeId, PublicKey>>,
> = std::sync::LazyLock::new(Default::default);

/// The public key of `author`, decoded once.
fn author_key(author: &NodeId) -> Result<PublicKey, WireError> {
    let mut keys = AUTHOR_KEYS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(k) = keys.get(author) {
        return Ok(k.clone());
    }
    let key = PublicKey::from(
        ed25519::PublicKey::try_from_bytes(&author.0)
            .map_err(|_| WireError::BadAuthorKey(*author))?,
    );
    if keys.len() >= MAX_CACHED_AUTHORS {
        keys.clear();
    }
    keys.insert(*author, key.clone());
    Ok(key)
}

/// Why a record was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("record of {0} bytes exceeds {MAX_RECORD}")]
    TooLarge(usize),
    #[error("malformed record: {0}")]
    Malformed(String),
    #[error("record for {path} is inconsistent: {why}")]
    Inconsistent { path: String, why: &'static str },
    #[error("author {0:?} is not an ed25519 key")]
    BadAuthorKey(NodeId),
    #[error("bad signature on {path} by {author:?}")]
    BadSignature { path: String, author: NodeId },
    #[error("author {0:?} is not a member of the cluster")]
    UnknownAuthor(NodeId),
    #[error("the version vector names {0:?}, not a member of the cluster")]
    UnknownNode(NodeId),
    #[error("cannot sign: {0}")]
    Signing(String),
}

/// A record for one path, with its author's signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedRecord {
    pub path: RelPath,
    pub record: FileRecord,
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

#[derive(Serialize)]
struct Signed<'a> {
    domain: &'a str,
    cluster: &'a str,
    path: &'a RelPath,
    record: &'a FileRecord,
}

/// The bytes a record's signature covers: the cluster, the path and the
/// record. Public for test peers that forge records as a hostile member
/// would (signing them without [`SignedRecord::sign`]'s checks).
pub fn signed_bytes(
    cluster: &str,
    path: &RelPath,
    record: &FileRecord,
) -> Result<Vec<u8>, WireError> {
    postcard::to_allocvec(&Signed {
        domain: DOMAIN,
        cluster,
        path,
        record,
    })
    .map_err(|e| WireError::Malformed(e.to_string()))
}

/// The node id of a keypair: its ed25519 public key.
pub fn node_id(keypair: &Keypair) -> Result<NodeId, WireError> {
    let public = keypair
        .public()
        .try_into_ed25519()
        .map_err(|e| WireError::Signing(e.to_string()))?;
    Ok(NodeId(public.to_bytes()))
}

/// Checks what a record says about itself, whoever signed it.
fn check_shape(path: &RelPath, r: &FileRecord) -> Result<(), WireError> {
    let bad = |why| {
        Err(WireError::Inconsistent {
            path: path.to_string(),
            why,
        })
    };
    if r.mode & !0o7777 != 0 {
        return bad("mode has bits beyond 0o7777");
    }
    if let Err(e) = r.version.check() {
        return bad(e.reason());
    }
    if r.version.get(&r.author) == 0 {
        return bad("the author has no entry in the version vector");
    }
    let times: [(Timestamp, &'static str); 3] = [
        (r.mtime, "mtime is out of range"),
        (r.atime, "atime is out of range"),
        (r.ctime, "ctime is out of range"),
    ];
    if let Some((_, why)) = times.iter().find(|(t, _)| !t.is_valid()) {
        return bad(why);
    }
    if path.is_root() && (r.kind != FileKind::Dir || r.deleted) {
        return bad("the root must be a live directory");
    }
    match (r.deleted, r.kind) {
        (true, _) if r.content.is_some() || r.target.is_some() => bad("a tombstone carries data"),
        (true, _) => Ok(()),
        (false, FileKind::File) if r.content.is_none() || r.target.is_some() => {
            bad("a file needs a content id and no link target")
        }
        (false, FileKind::Symlink) => match &r.target {
            None => bad("a symlink needs a target"),
            Some(t) if t.is_empty() || t.len() > MAX_PATH_LEN || t.contains('\0') => {
                bad("a symlink target must be 1 to 4095 bytes without NUL")
            }
            Some(_) if r.content.is_some() => bad("a symlink carries a content id"),
            Some(_) => Ok(()),
        },
        (false, FileKind::Dir) if r.content.is_some() || r.target.is_some() => {
            bad("a directory carries data")
        }
        _ => Ok(()),
    }
}

impl SignedRecord {
    /// Signs `record` at `path` as `keypair`, which must be the record's author.
    pub fn sign(
        cluster: &str,
        path: RelPath,
        record: FileRecord,
        keypair: &Keypair,
    ) -> Result<Self, WireError> {
        if node_id(keypair)? != record.author {
            return Err(WireError::Signing(
                "the keypair is not the record's author".into(),
            ));
        }
        check_shape(&path, &record)?;
        let signature = keypair
            .sign(&signed_bytes(cluster, &path, &record)?)
            .map_err(|e| WireError::Signing(e.to_string()))?;
        Ok(Self {
            path,
            record,
            signature,
        })
    }

    /// Checks size, shape, membership and signature: `is_member` must admit
    /// the author and every node the version vector names.
    pub fn verify(
        &self,
        cluster: &str,
        is_member: impl Fn(&NodeId) -> bool,
    ) -> Result<(), WireError> {
        self.verify_with(cluster, &is_member, &is_member)
    }

    /// [`verify`](Self::verify) with two membership tests: `may_author` for
    /// the author, `may_appear` for the other nodes of the version vector
    /// (a wider set, say members and former members, since vectors keep the
    /// ids of every node that ever changed the path).
    pub fn verify_with(
        &self,
        cluster: &str,
        may_author: impl Fn(&NodeId) -> bool,
        may_appear: impl Fn(&NodeId) -> bool,
    ) -> Result<(), WireError> {
        // The limit gossip enforces on the bytes, whatever path the record
        // came by (a sync response carries records decoded in place).
        self.encode()?;
        check_shape(&self.path, &self.record)?;
        let author = self.record.author;
        if !may_author(&author) {
            return Err(WireError::UnknownAuthor(author));
        }
        if let Some(n) = self
            .record
            .version
            .nodes()
            .find(|n| **n != author && !may_appear(n))
        {
            return Err(WireError::UnknownNode(*n));
        }
        let key = author_key(&author)?;
        let msg = signed_bytes(cluster, &self.path, &self.record)?;
        if key.verify(&msg, &self.signature) {
            Ok(())
        } else {
            Err(WireError::BadSignature {
                path: self.path.to_string(),
                author,
            })
        }
    }

    pub fn encode(&self) -> Result<Vec<u8>, WireError> {
        let bytes = postcard::to_allocvec(self).map_err(|e| WireError::Malformed(e.to_string()))?;
        if bytes.len() > MAX_RECORD {
            return Err(WireError::TooLarge(bytes.len()));
        }
        Ok(bytes)
    }

    /// A gossip message carrying `records` (each already encoded by
    /// [`encode`](Self::encode)). The caller keeps it under [`MAX_BATCH`].
    pub fn encode_batch(records: &[Vec<u8>]) -> Result<Vec<u8>, WireError> {
        let batch: Vec<&serde_bytes::Bytes> =
            records.iter().map(|r| serde_bytes::Bytes::new(r)).collect();
        postcard::to_allocvec(&batch).map_err(|e| WireError::Malformed(e.to_string()))
    }

    /// Decodes a gossip message; every record in it must decode (verify them
    /// before use).
    pub fn decode_batch(bytes: &[u8]) -> Result<Vec<Self>, WireError> {
        if bytes.len() > MAX_BATCH {
            return Err(WireError::TooLarge(bytes.len()));
        }
        let batch: Vec<serde_bytes::ByteBuf> = decode_exact(bytes)?;
        batch.iter().map(|b| Self::decode(b)).collect()
    }

    /// Decodes untrusted bytes (the path is validated while decoding); call
    /// [`verify`](Self::verify) before using the record.
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        if bytes.len() > MAX_RECORD {
            return Err(WireError::TooLarge(bytes.len()));
        }
        decode_exact(bytes)
    }
}

/// Decodes all of `bytes` (trailing bytes are refused). The caller bounds
/// `bytes` first: postcard allocates no more than the input holds, besides
/// serde's preallocation of a sequence, itself capped at 1 MiB.
pub(crate) fn decode_exact<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, WireError> {
    match postcard::take_from_bytes(bytes) {
        Ok((v, [])) => Ok(v),
        Ok((_, rest)) => Err(WireError::Malformed(format!(
            "{} trailing bytes",
            rest.len()
        ))),
        Err(e) => Err(WireError::Malformed(e.to_string())),
    }
}

/// Signs without checking the shape: what a hostile member can do, for tests
/// of the checks on the receiving side.
#[cfg(test)]
pub(crate) fn sign_unchecked(
    cluster: &str,
    path: RelPath,
    record: FileRecord,
    keypair: &Keypair,
) -> SignedRecord {
    #![allow(clippy::unwrap_used)]
    let signature = keypair
        .sign(&signed_bytes(cluster, &path, &record).unwrap())
        .unwrap();
    SignedRecord {
        path,
        record,
        signature,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::collections::BTreeMap;

    use btfs_core::{
        ContentId, MAX_COUNTER, MAX_VERSION_ENTRIES, Owner, VersionError, VersionVector,
    };
    use proptest::prelude::*;

    use super::*;

    const OWNER: Owner = Owner {
        mode: 0o644,
        uid: 0,
        gid: 0,
    };

    fn keyed() -> (Keypair, NodeId) {
        let k = Keypair::generate_ed25519();
        let id = node_id(&k).unwrap();
        (k, id)
    }

    fn file(author: NodeId) -> FileRecord {
        let mut r = FileRecord::new_file(OWNER, author, Timestamp { secs: 1, nanos: 0 });
        r.content = Some(ContentId::of(b"data"));
        r.size = 4;
        r
    }

    #[test]
    fn signed_records_round_trip_and_verify() {
        let (k, id) = keyed();
        let s = SignedRecord::sign("c", RelPath::parse("a/b").unwrap(), file(id), &k).unwrap();
        let back = SignedRecord::decode(&s.encode().unwrap()).unwrap();
        assert_eq!(back, s);
        assert_eq!(back.verify("c", |_| true), Ok(()));
        assert_eq!(
            back.verify("c", |_| false),
            Err(WireError::UnknownAuthor(id))
        );
        assert!(matches!(
            back.verify("other-cluster", |_| true),
            Err(WireError::BadSignature { .. })
        ));
    }

    #[test]
    fn tampering_is_detected() {
        let (k, id) = keyed();
        let s = SignedRecord::sign("c", RelPath::parse("a").unwrap(), file(id), &k).unwrap();
        let mut moved = s.clone();
        moved.path = RelPath::parse("b").unwrap();
        assert!(matches!(
            moved.verify("c", |_| true),
            Err(WireError::BadSignature { .. })
        ));
        let mut grown = s.clone();
        grown.record.size = 5;
        assert!(matches!(
            grown.verify("c", |_| true),
            Err(WireError::BadSignature { .. })
        ));
        // Claiming another author: the signature does not match that key.
        let (_, other) = keyed();
        let mut stolen = s;
        stolen.record.author = other;
        stolen.record.version.increment(other);
        assert!(matches!(
            stolen.verify("c", |_| true),
            Err(WireError::BadSignature { .. })
        ));
    }

    #[test]
    fn hostile_paths_and_shapes_are_refused() {
        let (k, id) = keyed();
        let s = SignedRecord::sign("c", RelPath::parse("x").unwrap(), file(id), &k).unwrap();
        let bytes = s.encode().unwrap();
        // Rewrite the path bytes in the encoding: "x" -> "/" and "." are refused
        // while decoding, before any signature check.
        for evil in [&b"/"[..], b"."] {
            let mut forged = bytes.clone();
            let at = forged.iter().position(|b| *b == b'x').unwrap();
            forged[at] = evil[0];
            assert!(
                matches!(SignedRecord::decode(&forged), Err(WireError::Malformed(_))),
                "{evil:?}"
            );
        }
        // A batch with one forged record is refused whole.
        let good = s.encode().unwrap();
        let mut bad = good.clone();
        let at = bad.iter().position(|b| *b == b'x').unwrap();
        bad[at] = b'/';
        let batch = SignedRecord::encode_batch(&[good.clone(), good.clone()]).unwrap();
        assert_eq!(SignedRecord::decode_batch(&batch).unwrap().len(), 2);
        let batch = SignedRecord::encode_batch(&[good, bad]).unwrap();
        assert!(SignedRecord::decode_batch(&batch).is_err());

        let mut long = bytes.clone();
        long.resize(MAX_RECORD + 1, 0);
        assert_eq!(
            SignedRecord::decode(&long),
            Err(WireError::TooLarge(MAX_RECORD + 1))
        );

        let mut no_content = file(id);
        no_content.content = None;
        assert!(matches!(
            SignedRecord::sign("c", RelPath::parse("x").unwrap(), no_content, &k),
            Err(WireError::Inconsistent { .. })
        ));
        let mut wide_mode = file(id);
        wide_mode.mode = 0o170_644;
        assert!(matches!(
            SignedRecord::sign("c", RelPath::parse("x").unwrap(), wide_mode, &k),
            Err(WireError::Inconsistent { .. })
        ));
        let (other_key, _) = keyed();
        assert!(matches!(
            SignedRecord::sign("c", RelPath::parse("x").unwrap(), file(id), &other_key),
            Err(WireError::Signing(_))
        ));
    }

    /// `r`, forged by its author (signed without the shape check), must be
    /// refused by the receiver with the reason `why`, and refused by `sign`.
    fn refused(k: &Keypair, r: FileRecord, why: &str) {
        let path = RelPath::parse("x").unwrap();
        let forged = sign_unchecked("c", path.clone(), r.clone(), k);
        match forged.verify("c", |_| true) {
            Err(WireError::Inconsistent { why: w, .. }) => assert_eq!(w, why),
            other => panic!("{why}: {other:?}"),
        }
        // Over the wire too: decoding succeeds, verification does not.
        let back = SignedRecord::decode(&forged.encode().unwrap()).unwrap();
        assert!(back.verify("c", |_| true).is_err());
        assert!(matches!(
            SignedRecord::sign("c", path, r, k),
            Err(WireError::Inconsistent { .. })
        ));
    }

    #[test]
    fn a_record_with_nanos_out_of_range_is_refused() {
        let (k, id) = keyed();
        for nanos in [1_000_000_000, u32::MAX] {
            let bad = Timestamp { secs: 1, nanos };
            let mut r = file(id);
            r.mtime = bad;
            refused(&k, r, "mtime is out of range");
            let mut r = file(id);
            r.atime = bad;
            refused(&k, r, "atime is out of range");
            let mut r = file(id);
            r.ctime = bad;
            refused(&k, r, "ctime is out of range");
        }
        let mut edge = file(id);
        edge.mtime = Timestamp {
            secs: 1,
            nanos: 999_999_999,
        };
        let s = sign_unchecked("c", RelPath::parse("x").unwrap(), edge, &k);
        assert_eq!(s.verify("c", |_| true), Ok(()));
    }

    #[test]
    fn a_record_with_secs_near_i64_max_is_refused() {
        let (k, id) = keyed();
        for secs in [
            i64::MAX,
            i64::MAX - 1,
            i64::MIN,
            i64::MIN + 1,
            Timestamp::MAX_SECS + 1,
            Timestamp::MIN_SECS - 1,
        ] {
            let mut r = file(id);
            r.mtime = Timestamp { secs, nanos: 0 };
            refused(&k, r, "mtime is out of range");
            let mut r = file(id);
            r.ctime = Timestamp { secs, nanos: 0 };
            refused(&k, r, "ctime is out of range");
        }
        for t in [Timestamp::MAX, Timestamp::MIN] {
            let mut r = file(id);
            (r.mtime, r.atime, r.ctime) = (t, t, t);
            let s = SignedRecord::sign("c", RelPath::parse("x").unwrap(), r, &k).unwrap();
            assert_eq!(s.verify("c", |_| true), Ok(()));
            // What every node then does with it cannot panic.
            let _ = s.record.mtime.to_system_time();
        }
    }

    #[test]
    fn a_vector_with_too_many_entries_is_refused() {
        let (k, id) = keyed();
        let mut r = file(id);
        for _ in 0..MAX_VERSION_ENTRIES {
            r.version.increment(keyed().1);
        }
        assert_eq!(r.version.len(), MAX_VERSION_ENTRIES + 1);
        refused(&k, r.clone(), VersionError::TooManyEntries(0).reason());
        // At the limit it passes.
        let mut ok = file(id);
        for _ in 1..MAX_VERSION_ENTRIES {
            ok.version.increment(keyed().1);
        }
        assert!(SignedRecord::sign("c", RelPath::parse("x").unwrap(), ok, &k).is_ok());
    }

    /// A vector with exactly these entries, as a peer can send it.
    fn vector(entries: &[(NodeId, u64)]) -> VersionVector {
        let map: BTreeMap<NodeId, u64> = entries.iter().copied().collect();
        postcard::from_bytes(&postcard::to_allocvec(&map).unwrap()).unwrap()
    }

    #[test]
    fn a_vector_with_an_inflated_counter_is_refused() {
        let (k, id) = keyed();
        let (_, other) = keyed();
        let why = VersionError::CounterTooLarge(0).reason();
        for entries in [
            vec![(id, u64::MAX)],
            vec![(id, MAX_COUNTER + 1)],
            vec![(id, 1), (other, u64::MAX)],
            vec![(id, 1), (other, MAX_COUNTER + 1)],
        ] {
            let mut r = file(id);
            r.version = vector(&entries);
            refused(&k, r, why);
        }
        // At the cap it passes, and an honest increment is strictly greater.
        let mut r = file(id);
        r.version = vector(&[(id, 1), (other, MAX_COUNTER)]);
        let next = r.version.clone().incremented(other);
        assert!(next > r.version);
        assert!(SignedRecord::sign("c", RelPath::parse("x").unwrap(), r, &k).is_ok());
    }

    #[test]
    fn a_vector_with_a_zero_counter_is_refused() {
        let (k, id) = keyed();
        let (_, other) = keyed();
        let mut r = file(id);
        r.version = vector(&[(id, 1), (other, 0)]);
        refused(&k, r, VersionError::ZeroCounter.reason());
    }

    #[test]
    fn a_vector_naming_a_non_member_is_refused_when_members_are_set() {
        let (k, id) = keyed();
        let (_, member) = keyed();
        let (_, stranger) = keyed();
        let path = RelPath::parse("x").unwrap();
        let mut r = file(id);
        r.version = vector(&[(id, 2), (member, 1), (stranger, 1)]);
        let s = SignedRecord::sign("c", path.clone(), r, &k).unwrap();
        let members = [id, member];
        assert_eq!(
            s.verify("c", |n| members.contains(n)),
            Err(WireError::UnknownNode(stranger))
        );
        // Open membership admits it; so does a wider set for the vector.
        assert_eq!(s.verify("c", |_| true), Ok(()));
        assert_eq!(
            s.verify_with(
                "c",
                |n| members.contains(n),
                |n| *n == stranger || members.contains(n)
            ),
            Ok(())
        );
        // The author must still pass the narrower test.
        assert_eq!(
            s.verify_with("c", |n| *n == member, |_| true),
            Err(WireError::UnknownAuthor(id))
        );
        let mut clean = file(id);
        clean.version = vector(&[(id, 2), (member, 1)]);
        let s = SignedRecord::sign("c", path, clean, &k).unwrap();
        assert_eq!(s.verify("c", |n| members.contains(n)), Ok(()));
    }

    #[test]
    fn a_record_over_the_size_limit_is_refused_by_verify() {
        let (k, id) = keyed();
        let s = SignedRecord::sign("c", RelPath::parse("x").unwrap(), file(id), &k).unwrap();
        let mut big = s.clone();
        big.signature.resize(MAX_RECORD, 7);
        assert!(matches!(
            big.verify("c", |_| true),
            Err(WireError::TooLarge(n)) if n > MAX_RECORD
        ));
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let (k, id) = keyed();
        let s = SignedRecord::sign("c", RelPath::parse("x").unwrap(), file(id), &k).unwrap();
        let mut bytes = s.encode().unwrap();
        bytes.push(0);
        assert!(matches!(
            SignedRecord::decode(&bytes),
            Err(WireError::Malformed(_))
        ));
        let mut batch = SignedRecord::encode_batch(&[s.encode().unwrap()]).unwrap();
        batch.push(0);
        assert!(SignedRecord::decode_batch(&batch).is_err());
    }

    /// Whatever decodes must verify or fail without panicking, and a record
    /// that verifies has a valid shape.
    fn check_decoded(r: &SignedRecord) {
        let _ = r.verify("c", |_| false);
        if r.verify("c", |_| true).is_ok() {
            assert!(r.record.mtime.is_valid() && r.record.version.check().is_ok());
        }
        let _ = r.record.mtime.to_system_time();
        let _ = r.record.atime.to_system_time();
        let _ = r.record.ctime.to_system_time();
    }

    proptest! {

        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            if let Ok(r) = SignedRecord::decode(&bytes) {
                check_decoded(&r);
            }
            if let Ok(batch) = SignedRecord::decode_batch(&bytes) {
                batch.iter().for_each(check_decoded);
            }
        }

        #[test]
        fn decoding_mutated_records_never_panics(
            edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
            cut in any::<usize>(),
        ) {
            let k = Keypair::ed25519_from_bytes([3; 32]).unwrap();
            let id = node_id(&k).unwrap();
            let s = SignedRecord::sign("c", RelPath::parse("d/x").unwrap(), file(id), &k).unwrap();
            let mut bytes = s.encode().unwrap();
            for (at, b) in edits {
                let i = at % bytes.len();
                bytes[i] = b;
            }
            let batch = SignedRecord::encode_batch(&[bytes.clone(), s.encode().unwrap()]).unwrap();
            bytes.truncate(bytes.len() - cut % 4);
            if let Ok(r) = SignedRecord::decode(&bytes) {
                check_decoded(&r);
            }
            if let Ok(batch) = SignedRecord::decode_batch(&batch) {
                batch.iter().for_each(check_decoded);
            }
        }
    }
}
