//! Anti-entropy: bringing a peer up to date with the records it lacks.
//!
//! Every node numbers the records it stores, in the order it stores them,
//! with a local sequence number; the numbering belongs to one incarnation of
//! its store, named by an index id. A node remembers, per peer, which index it
//! has read and up to which sequence number. Syncing asks "everything after
//! sequence N of index I", answered in pages, so a sync after a short absence
//! costs what changed, not the size of the tree (Syncthing's delta indexes).
//!
//! Claims from peers are untrusted: a request naming another index, or a
//! sequence number beyond what the answering node has, gets the whole log from
//! the start (a full resync); so does a response that goes backwards. Records
//! themselves are checked by the caller ([`SignedRecord::verify`]) before they
//! are stored. Nothing here does IO: [`answer`] and [`Progress::on_response`]
//! are plain functions over a [`Log`].
//!
//! What a peer decides, and its bound:
//! * in a request: the index (any value: a mismatch means a full resync) and
//!   the sequence number (beyond our newest: a full resync); the answer is
//!   one page at most whatever they say;
//! * in a response: the bytes ([`MAX_RESPONSE`], checked before decoding by
//!   [`SyncResponse::decode`]); the records' number
//!   ([`MAX_RESPONSE_RECORDS`]: a page, plus one path's versions) and each
//!   record's encoding ([`MAX_RECORD`], as gossip; [`SignedRecord::verify`]
//!   checks it too); the records themselves (verified by the caller); the
//!   numbers `from`, `upto`, `max` (checked against each other by
//!   [`Progress::on_response`]; they only steer what we ask that same peer).
//!
//! [`MAX_RECORD`]: crate::MAX_RECORD

use btfs_core::MAX_VERSIONS;
use serde::{Deserialize, Serialize};

use crate::{MAX_RECORD, SignedRecord, WireError, wire::decode_exact};

/// Records per response page.
pub const PAGE_RECORDS: usize = 2_000;
/// Bytes of records per response page: well below request-response's 10 MiB
/// cap, which truncates larger answers instead of refusing them.
pub const PAGE_BYTES: usize = 4 << 20;
/// Records one response carries at most: a page, and the versions of the
/// path that completes it (a path's versions travel together).
pub const MAX_RESPONSE_RECORDS: usize = PAGE_RECORDS + MAX_VERSIONS;
/// Largest encoded response: a page of records (a path's versions, at most
/// `MAX_VERSIONS * MAX_RECORD`, fit in one page) and the numbers around it.
pub const MAX_RESPONSE: usize = PAGE_BYTES + 64;

const _: () = assert!(MAX_VERSIONS * MAX_RECORD <= PAGE_BYTES);

/// A node's numbered record log.
pub trait Log {
    /// Identifies this incarnation of the store (a new one restarts numbering).
    fn index_id(&self) -> u64;
    /// The sequence number of the newest stored record (0: none).
    fn max_seq(&self) -> u64;
    /// Stored records with a sequence number above `since`, oldest first, for
    /// at most `limit` numbers. One number may carry several records (the
    /// concurrent versions of one path), sent together, or none (a number
    /// superseded while reading).
    fn since(&self, since: u64, limit: usize) -> Vec<(u64, Vec<SignedRecord>)>;
}

/// "Send me what you stored after `since` in index `index`."
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncRequest {
    /// The index the asker has read from before; `None` asks for everything.
    pub index: Option<u64>,
    pub since: u64,
}

/// One page of records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncResponse {
    /// The answering node's index id.
    pub index: u64,
    /// The sequence number this page starts after (0 for a full resync).
    pub from: u64,
    /// The sequence number of the last record in this page (`from` if empty).
    pub upto: u64,
    /// The answering node's newest sequence number.
    pub max: u64,
    pub records: Vec<SignedRecord>,
}

impl SyncResponse {
    /// True when the asker is up to date after this page.
    pub fn complete(&self) -> bool {
        self.upto >= self.max
    }

    pub fn encode(&self) -> Result<Vec<u8>, WireError> {
        let bytes = postcard::to_allocvec(self).map_err(|e| WireError::Malformed(e.to_string()))?;
        if bytes.len() > MAX_RESPONSE {
            return Err(WireError::TooLarge(bytes.len()));
        }
        Ok(bytes)
    }

    /// Decodes a peer's response: at most [`MAX_RESPONSE`] bytes, at most
    /// [`MAX_RESPONSE_RECORDS`] records, each encoded in at most
    /// [`MAX_RECORD`] bytes (the gossip limit). A response that breaks one is
    /// refused whole; the records still need [`SignedRecord::verify`].
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        if bytes.len() > MAX_RESPONSE {
            return Err(WireError::TooLarge(bytes.len()));
        }
        let resp: Self = decode_exact(bytes)?;
        if resp.records.len() > MAX_RESPONSE_RECORDS {
            return Err(WireError::Malformed(format!(
                "a sync response with {} records (at most {MAX_RESPONSE_RECORDS})",
                resp.records.len()
            )));
        }
        for r in &resp.records {
            r.encode()?;
        }
        Ok(resp)
    }
}

/// Answers a request from `log`, one page at a time.
pub fn answer(log: &impl Log, req: &SyncRequest) -> SyncResponse {
    let index = log.index_id();
    let max = log.max_seq();
    // Another index, or a claim to have read more than exists: start over.
    let from = match req.index {
        Some(i) if i == index && req.since <= max => req.since,
        _ => 0,
    };
    let mut records = Vec::new();
    let mut bytes = 0;
    let mut upto = from;
    for (seq, group) in log.since(from, PAGE_RECORDS) {
        // What a peer would refuse is not sent: records over the size limit,
        // versions of one path beyond the cap (the newest-ranked are kept:
        // a log lists them in `Versions` order).
        let sized: Vec<(SignedRecord, usize)> = group
            .into_iter()
            .filter_map(|r| r.encode().ok().map(|b| (r, b.len())))
            .collect();
        let skip = sized.len().saturating_sub(MAX_VERSIONS);
        let group: Vec<(SignedRecord, usize)> = sized.into_iter().skip(skip).collect();
        let size: usize = group.iter().map(|(_, n)| n).sum();
        if !records.is_empty() && (bytes + size > PAGE_BYTES || records.len() >= PAGE_RECORDS) {
            break;
        }
        bytes += size;
        upto = seq;
        records.extend(group.into_iter().map(|(r, _)| r));
    }
    SyncResponse {
        index,
        from,
        upto,
        max,
        records,
    }
}

/// What a node remembers about reading one peer's log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub index: Option<u64>,
    pub received: u64,
}

/// What to do after a response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Ask for the next page.
    Continue(SyncRequest),
    /// Up to date with this peer.
    Done,
}

impl Progress {
    pub fn request(&self) -> SyncRequest {
        SyncRequest {
            index: self.index,
            since: self.received,
        }
    }

    /// Records how far a response (whose records the caller has stored)
    /// brought us. An answer that contradicts itself resets the progress, so
    /// the next sync with that peer is a full one.
    pub fn on_response(&mut self, resp: &SyncResponse) -> Next {
        let consistent = resp.from <= resp.upto
            && resp.upto <= resp.max
            && (resp.records.is_empty() || resp.upto > resp.from)
            && resp.records.len() <= MAX_RESPONSE_RECORDS;
        if !consistent {
            *self = Progress::default();
            return Next::Done;
        }
        self.index = Some(resp.index);
        self.received = resp.upto;
        // A page that brings nothing new ends this round (no endless loop on
        // a peer that keeps answering empty pages).
        if resp.complete() || resp.upto == resp.from {
            Next::Done
        } else {
            Next::Continue(self.request())
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::collections::BTreeMap;

    use btfs_core::{ContentId, FileRecord, NodeId, Owner, RelPath, Timestamp, Versions};
    use libp2p_identity::Keypair;
    use proptest::prelude::*;

    use super::*;
    use crate::wire::node_id;

    /// An in-memory node: a log of stored records and the merged state.
    struct Replica {
        key: Keypair,
        id: NodeId,
        index: u64,
        log: Vec<(u64, SignedRecord)>,
        state: BTreeMap<RelPath, Versions>,
        progress: BTreeMap<usize, Progress>,
    }

    impl Log for Replica {
        fn index_id(&self) -> u64 {
            self.index
        }
        fn max_seq(&self) -> u64 {
            self.log.last().map_or(0, |(s, _)| *s)
        }
        fn since(&self, since: u64, limit: usize) -> Vec<(u64, Vec<SignedRecord>)> {
            self.log
                .iter()
                .filter(|(s, _)| *s > since)
                .take(limit)
                .map(|(s, r)| (*s, vec![r.clone()]))
                .collect()
        }
    }

    impl Replica {
        fn new(seed: u8) -> Self {
            let key = Keypair::ed25519_from_bytes([seed; 32]).unwrap();
            let id = node_id(&key).unwrap();
            Self {
                key,
                id,
                index: u64::from(seed),
                log: Vec::new(),
                state: BTreeMap::new(),
                progress: BTreeMap::new(),
            }
        }

        /// Stores a verified record; logs it if it changed the state.
        fn store(&mut self, r: SignedRecord) {
            r.verify("sim", |_| true).unwrap();
            if self
                .state
                .entry(r.path.clone())
                .or_default()
                .insert(r.record.clone())
            {
                let seq = self.max_seq() + 1;
                self.log.push((seq, r));
            }
        }

        fn edit(&mut self, path: &RelPath, data: u8, t: i64) {
            let owner = Owner {
                mode: 0o644,
                uid: 0,
                gid: 0,
            };
            let mut r = FileRecord::new_file(owner, self.id, Timestamp { secs: t, nanos: 0 });
            r.content = Some(ContentId::of(&[data]));
            r.version = self
                .state
                .get(path)
                .map(Versions::joined_version)
                .unwrap_or_default()
                .incremented(self.id);
            let signed = SignedRecord::sign("sim", path.clone(), r, &self.key).unwrap();
            self.store(signed);
        }

        /// A restarted store with a fresh index (the records survive, the
        /// numbering does not).
        fn reindex(&mut self, new_index: u64) {
            self.index = new_index;
            for (i, (seq, _)) in self.log.iter_mut().enumerate() {
                *seq = i as u64 + 1;
            }
        }
    }

    /// One page from `b` to `a`; returns whether `a` is done with `b`.
    fn sync_page(nodes: &mut [Replica], a: usize, b: usize) -> bool {
        let req = nodes[a]
            .progress
            .get(&b)
            .copied()
            .unwrap_or_default()
            .request();
        let resp = answer(&nodes[b], &req);
        for r in resp.records.clone() {
            nodes[a].store(r);
        }
        let next = nodes[a].progress.entry(b).or_default().on_response(&resp);
        next == Next::Done
    }

    fn sync_fully(nodes: &mut [Replica], a: usize, b: usize) {
        for _ in 0..10_000 {
            if sync_page(nodes, a, b) {
                return;
            }
        }
        panic!("sync never finished");
    }

    #[derive(Debug, Clone)]
    enum Op {
        Edit { node: usize, path: u8, data: u8 },
        SyncPage { a: usize, b: usize },
        Reindex { node: usize },
    }

    fn arb_op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0usize..3, 0u8..3, any::<u8>()).prop_map(|(node, path, data)| Op::Edit { node, path, data }),
            3 => (0usize..3, 0usize..3).prop_map(|(a, b)| Op::SyncPage { a, b }),
            1 => (0usize..3).prop_map(|node| Op::Reindex { node }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
        #[test]
        fn replicas_converge_whatever_syncs_happened_before(ops in proptest::collection::vec(arb_op(), 0..60)) {
            let mut nodes: Vec<Replica> = (1..=3).map(Replica::new).collect();
            let paths: Vec<RelPath> = ["a", "b", "d/c"].iter().map(|p| RelPath::parse(p).unwrap()).collect();
            let mut next_index = 100;
            for (t, op) in ops.into_iter().enumerate() {
                match op {
                    Op::Edit { node, path, data } => nodes[node].edit(&paths[path as usize], data, t as i64),
                    Op::SyncPage { a, b } if a != b => { sync_page(&mut nodes, a, b); }
                    Op::SyncPage { .. } => {}
                    Op::Reindex { node } => { next_index += 1; nodes[node].reindex(next_index); }
                }
            }
            // Two rounds of full pairwise syncs reach every node.
            for _ in 0..2 {
                for a in 0..3 {
                    for b in 0..3 {
                        if a != b { sync_fully(&mut nodes, a, b); }
                    }
                }
            }
            prop_assert_eq!(&nodes[0].state, &nodes[1].state);
            prop_assert_eq!(&nodes[1].state, &nodes[2].state);
        }
    }

    #[test]
    fn second_sync_sends_only_what_changed_and_lies_force_a_full_resync() {
        let mut nodes: Vec<Replica> = (1..=2).map(Replica::new).collect();
        let p = RelPath::parse("f").unwrap();
        for i in 0..5 {
            nodes[1].edit(&RelPath::parse(&format!("f{i}")).unwrap(), i, i64::from(i));
        }
        sync_fully(&mut nodes, 0, 1);
        nodes[1].edit(&p, 9, 100);
        let req = nodes[0].progress[&1].request();
        let delta = answer(&nodes[1], &req);
        assert_eq!(delta.records.len(), 1, "only the new record");
        // A request claiming more than exists, or naming another index, is
        // answered from the start.
        let max = nodes[1].max_seq();
        for lie in [
            SyncRequest {
                index: Some(2),
                since: max + 10,
            },
            SyncRequest {
                index: Some(77),
                since: 3,
            },
        ] {
            let full = answer(&nodes[1], &lie);
            assert_eq!((full.from, full.records.len()), (0, 6));
        }
        // A response that contradicts itself resets progress.
        let mut progress = nodes[0].progress[&1];
        let bogus = SyncResponse {
            index: 2,
            from: 5,
            upto: 3,
            max: 6,
            records: vec![],
        };
        assert_eq!(progress.on_response(&bogus), Next::Done);
        assert_eq!(progress, Progress::default());
    }

    /// A log whose every number carries the given groups.
    struct Groups(Vec<Vec<SignedRecord>>);

    impl Log for Groups {
        fn index_id(&self) -> u64 {
            7
        }
        fn max_seq(&self) -> u64 {
            self.0.len() as u64
        }
        fn since(&self, since: u64, limit: usize) -> Vec<(u64, Vec<SignedRecord>)> {
            (since.min(self.0.len() as u64)..self.0.len() as u64)
                .take(limit)
                .map(|i| (i + 1, self.0[i as usize].clone()))
                .collect()
        }
    }

    fn signed(seed: u8, path: &str, k: u64, target_len: usize) -> SignedRecord {
        let key = Keypair::ed25519_from_bytes([seed; 32]).unwrap();
        let id = node_id(&key).unwrap();
        let owner = Owner {
            mode: 0o777,
            uid: 0,
            gid: 0,
        };
        let t = Timestamp { secs: 1, nanos: 0 };
        let mut r = FileRecord::new_symlink("t".repeat(target_len), owner, id, t);
        for _ in 1..k {
            r.version.increment(id);
        }
        SignedRecord::sign("c", RelPath::parse(path).unwrap(), r, &key).unwrap()
    }

    #[test]
    fn anti_entropy_refuses_records_over_the_size_limit() {
        let good = signed(1, "f", 1, 1);
        let mut big = good.clone();
        big.signature.resize(MAX_RECORD + 1, 0);
        let resp = SyncResponse {
            index: 1,
            from: 0,
            upto: 2,
            max: 2,
            records: vec![good.clone(), big.clone()],
        };
        let bytes = postcard::to_allocvec(&resp).unwrap();
        assert!(matches!(
            SyncResponse::decode(&bytes),
            Err(WireError::TooLarge(n)) if n > MAX_RECORD
        ));
        // Were it decoded anyway, verification refuses it too.
        assert!(matches!(
            big.verify("c", |_| true),
            Err(WireError::TooLarge(_))
        ));
        // An answering node does not send such a record.
        let log = Groups(vec![vec![big], vec![good.clone()]]);
        let page = answer(
            &log,
            &SyncRequest {
                index: None,
                since: 0,
            },
        );
        assert_eq!((page.records, page.upto), (vec![good], 2));
    }

    #[test]
    fn a_response_with_too_many_records_is_refused() {
        let r = signed(1, "f", 1, 1);
        let resp = SyncResponse {
            index: 1,
            from: 0,
            upto: 1,
            max: 1,
            records: vec![r; MAX_RESPONSE_RECORDS + 1],
        };
        let bytes = postcard::to_allocvec(&resp).unwrap();
        assert!(bytes.len() <= MAX_RESPONSE);
        assert!(matches!(
            SyncResponse::decode(&bytes),
            Err(WireError::Malformed(_))
        ));
        let mut progress = Progress {
            index: Some(1),
            received: 0,
        };
        assert_eq!(progress.on_response(&resp), Next::Done);
        assert_eq!(progress, Progress::default());
    }

    #[test]
    fn a_response_over_the_byte_limit_is_refused_before_decoding() {
        let bytes = vec![0; MAX_RESPONSE + 1];
        assert_eq!(
            SyncResponse::decode(&bytes),
            Err(WireError::TooLarge(MAX_RESPONSE + 1))
        );
        // A length prefix claiming more records than the bytes hold fails
        // (serde preallocates at most 1 MiB for it, postcard reads no further).
        let mut lying = postcard::to_allocvec(&(1u64, 0u64, 1u64, 1u64)).unwrap();
        lying.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x0f]);
        assert!(SyncResponse::decode(&lying).is_err());
    }

    #[test]
    fn answers_send_at_most_max_versions_of_a_path_and_fit_the_limits() {
        // One path with more versions than the cap, then many large records.
        let flood: Vec<SignedRecord> = (1..=MAX_VERSIONS as u64 + 10)
            .map(|k| signed(1, "f", k, 1))
            .collect();
        let mut groups = vec![flood.clone()];
        for i in 0..1_100 {
            groups.push(vec![signed(
                2,
                &format!("p{i}/{}", "n".repeat(200)),
                1,
                4_000,
            )]);
        }
        let log = Groups(groups);
        let mut req = SyncRequest {
            index: None,
            since: 0,
        };
        let mut progress = Progress::default();
        let mut pages = 0;
        loop {
            let page = answer(&log, &req);
            let bytes = page.encode().unwrap();
            let back = SyncResponse::decode(&bytes).unwrap();
            assert_eq!(back, page);
            if pages == 0 {
                assert_eq!(
                    &page.records[..MAX_VERSIONS],
                    &flood[10..],
                    "the last (highest-ranked) versions of the path"
                );
            }
            pages += 1;
            match progress.on_response(&back) {
                Next::Continue(next) => req = next,
                Next::Done => break,
            }
        }
        assert!(pages > 1, "the byte limit splits the log into pages");
        assert_eq!(progress.received, 1_101);
    }

    proptest! {

        #[test]
        fn decoding_arbitrary_responses_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            if let Ok(resp) = SyncResponse::decode(&bytes) {
                for r in &resp.records {
                    let _ = r.verify("c", |_| true);
                }
                let _ = Progress::default().on_response(&resp);
            }
        }

        #[test]
        fn decoding_mutated_responses_never_panics(
            edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        ) {
            let resp = SyncResponse {
                index: 3,
                from: 1,
                upto: 3,
                max: 9,
                records: vec![signed(1, "a/b", 2, 3), signed(2, "c", 1, 5)],
            };
            let mut bytes = resp.encode().unwrap();
            for (at, b) in edits {
                let i = at % bytes.len();
                bytes[i] = b;
            }
            if let Ok(resp) = SyncResponse::decode(&bytes) {
                for r in &resp.records {
                    let _ = r.verify("c", |_| true);
                }
                let _ = Progress::default().on_response(&resp);
            }
        }

        #[test]
        fn any_request_gets_a_bounded_answer(index in proptest::option::of(0u64..10), since in any::<u64>()) {
            let log = Groups((0..5).map(|i| vec![signed(1, &format!("f{i}"), 1, 1)]).collect());
            let resp = answer(&log, &SyncRequest { index, since });
            prop_assert!(resp.from <= resp.upto && resp.upto <= resp.max);
            prop_assert!(SyncResponse::decode(&resp.encode().unwrap()).is_ok());
        }
    }
}
