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

use serde::{Deserialize, Serialize};

use crate::SignedRecord;

/// Records per response page.
pub const PAGE_RECORDS: usize = 2_000;
/// Bytes of records per response page: well below request-response's 10 MiB
/// cap, which truncates larger answers instead of refusing them.
pub const PAGE_BYTES: usize = 4 << 20;

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
        let size: usize = group
            .iter()
            .map(|r| r.encode().map_or(usize::MAX / 4, |b| b.len()))
            .sum();
        if !records.is_empty() && (bytes + size > PAGE_BYTES || records.len() >= PAGE_RECORDS) {
            break;
        }
        bytes = bytes.saturating_add(size);
        upto = seq;
        records.extend(group);
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
            && resp.records.len() <= 2 * PAGE_RECORDS;
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
}
