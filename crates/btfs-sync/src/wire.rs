//! Signed records.
//!
//! A record is signed by its author's ed25519 key over a canonical encoding of
//! (domain tag, cluster name, path, record): the cluster name binds it to one
//! cluster, the path to one name. The author's node id *is* its public key, so
//! verification needs no key exchange; membership is the caller's decision.
//! Decoding validates the path (no absolute, `..`, empty or NUL components, no
//! over-long names) and the record's shape before anything else looks at it.

use btfs_core::{FileKind, FileRecord, MAX_PATH_LEN, NodeId, RelPath};
use libp2p_identity::{Keypair, PublicKey, ed25519};
use serde::{Deserialize, Serialize};

/// Largest encoded record accepted: far below the gossip frame limit, and
/// generous for metadata (a record is a few hundred bytes).
pub const MAX_RECORD: usize = 16 * 1024;
/// Largest gossip message (a batch of records): below gossipsub's 65,536-byte
/// frame limit with room for its own framing and signature.
pub const MAX_BATCH: usize = 48 * 1024;
const DOMAIN: &str = "btfs-record-v1";

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

fn signed_bytes(cluster: &str, path: &RelPath, record: &FileRecord) -> Result<Vec<u8>, WireError> {
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
    if r.version.get(&r.author) == 0 {
        return bad("the author has no entry in the version vector");
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

    /// Checks shape, author membership and signature.
    pub fn verify(
        &self,
        cluster: &str,
        is_member: impl Fn(&NodeId) -> bool,
    ) -> Result<(), WireError> {
        check_shape(&self.path, &self.record)?;
        let author = self.record.author;
        if !is_member(&author) {
            return Err(WireError::UnknownAuthor(author));
        }
        let key = ed25519::PublicKey::try_from_bytes(&author.0)
            .map_err(|_| WireError::BadAuthorKey(author))?;
        let msg = signed_bytes(cluster, &self.path, &self.record)?;
        if PublicKey::from(key).verify(&msg, &self.signature) {
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
        let batch: Vec<serde_bytes::ByteBuf> =
            postcard::from_bytes(bytes).map_err(|e| WireError::Malformed(e.to_string()))?;
        batch.iter().map(|b| Self::decode(b)).collect()
    }

    /// Decodes untrusted bytes (the path is validated while decoding); call
    /// [`verify`](Self::verify) before using the record.
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        if bytes.len() > MAX_RECORD {
            return Err(WireError::TooLarge(bytes.len()));
        }
        postcard::from_bytes(bytes).map_err(|e| WireError::Malformed(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use btfs_core::{ContentId, Owner, Timestamp};

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
}
