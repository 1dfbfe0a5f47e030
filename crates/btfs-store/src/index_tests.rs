//! The persisted indexes and counters against a recomputation from the
//! entries: after random writes, after every crash prefix of a write, and
//! the clean reopen that reads none of them.

#![allow(clippy::unwrap_used)]

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering as AtomicOrdering},
    },
};

use btfs_core::{NodeId, Owner, Timestamp};
use proptest::prelude::*;

use super::*;

const NODE: NodeId = NodeId([9; 32]);
const OWNER: Owner = Owner {
    mode: 0o644,
    uid: 0,
    gid: 0,
};
const PATHS: &[&str] = &["a", "b", "c", "d", "d/x", "d/y", "d/e/z"];

type Write = (Vec<u8>, Option<Vec<u8>>);

#[derive(Debug, Default)]
struct Inner {
    map: Mutex<BTreeMap<Vec<u8>, Vec<u8>>>,
    /// Every write since the last `take_writes`.
    writes: Mutex<Vec<Write>>,
    /// Scans of the entries (`e` prefix).
    entry_scans: AtomicUsize,
}

/// A shared in-memory backend that records its writes and counts the
/// scans of the entries; clones share the data (a "reopen" is a new store
/// over a clone).
#[derive(Debug, Clone, Default)]
struct TestBackend(Arc<Inner>);

impl TestBackend {
    fn from_map(map: BTreeMap<Vec<u8>, Vec<u8>>) -> Self {
        let b = Self::default();
        *b.0.map.lock().unwrap() = map;
        b
    }

    fn snapshot(&self) -> BTreeMap<Vec<u8>, Vec<u8>> {
        self.0.map.lock().unwrap().clone()
    }

    fn take_writes(&self) -> Vec<Write> {
        std::mem::take(&mut *self.0.writes.lock().unwrap())
    }

    fn entry_scans(&self) -> usize {
        self.0.entry_scans.load(AtomicOrdering::SeqCst)
    }
}

impl Backend for TestBackend {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.0.map.lock().unwrap().get(key).cloned())
    }

    fn scan(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        if prefix.first() == Some(&b'e') {
            self.0.entry_scans.fetch_add(1, AtomicOrdering::SeqCst);
        }
        let map = self.0.map.lock().unwrap();
        let start = match after {
            Some(a) => std::ops::Bound::Excluded(a.to_vec()),
            None => std::ops::Bound::Included(prefix.to_vec()),
        };
        Ok(map
            .range((start, std::ops::Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(prefix))
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn set(&self, key: Vec<u8>, value: Option<Vec<u8>>) -> Result<()> {
        self.0
            .writes
            .lock()
            .unwrap()
            .push((key.clone(), value.clone()));
        let mut map = self.0.map.lock().unwrap();
        match value {
            Some(v) => map.insert(key, v),
            None => map.remove(&key),
        };
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }
}

/// What the indexes and counters should be, computed from the entries
/// alone, the way the in-memory indexes of old were.
#[derive(Debug, Default, PartialEq, Eq)]
struct Derivation {
    inos: BTreeMap<u64, String>,
    log: BTreeMap<u64, String>,
    refs: BTreeMap<ContentId, u64>,
    stats: Stats,
}

fn entries(map: &BTreeMap<Vec<u8>, Vec<u8>>) -> Vec<(RelPath, Entry)> {
    map.iter()
        .filter(|(k, _)| k.first() == Some(&b'e'))
        .map(|(k, v)| (path_of_key(k).unwrap(), decode("entry", v).unwrap()))
        .collect()
}

fn recompute(map: &BTreeMap<Vec<u8>, Vec<u8>>) -> Derivation {
    let mut d = Derivation::default();
    for (path, e) in entries(map) {
        if e.ino != NO_INO && e.ino != ROOT_INO {
            d.inos.insert(e.ino, path.as_str().to_owned());
        }
        if e.sync.seq != 0 {
            d.log.insert(e.sync.seq, path.as_str().to_owned());
        }
        if let Some(c) = e.content_ref() {
            *d.refs.entry(c).or_default() += 1;
        }
        if !e.is_live() {
            d.stats.tombstones += 1;
            continue;
        }
        match e.record.kind {
            FileKind::File => {
                d.stats.files += 1;
                d.stats.bytes += e.record.size;
            }
            FileKind::Dir => d.stats.dirs += 1,
            FileKind::Symlink => d.stats.symlinks += 1,
        }
    }
    d
}

/// The indexes as persisted, with the counters the store holds.
fn persisted(map: &BTreeMap<Vec<u8>, Vec<u8>>, stats: Stats) -> Derivation {
    let number = |k: &[u8]| u64::from_be_bytes(k[1..].try_into().unwrap());
    let text = |v: &[u8]| String::from_utf8(v.to_vec()).unwrap();
    let mut d = Derivation {
        stats,
        ..Derivation::default()
    };
    for (k, v) in map {
        match k[0] {
            b'i' => {
                d.inos.insert(number(k), text(v));
            }
            b'l' => {
                d.log.insert(number(k), text(v));
            }
            b'r' => {
                let c = ContentId(k[1..].try_into().unwrap());
                d.refs
                    .insert(c, u64::from_be_bytes(v[..].try_into().unwrap()));
            }
            _ => {}
        }
    }
    d
}

#[derive(Debug, Clone)]
enum Op {
    /// A file (with content `content`), a directory, or a symlink at a path:
    /// keeps the live inode there, else takes a fresh one.
    Put {
        path: usize,
        kind: u8,
        content: u8,
        size: u8,
        versioned: bool,
    },
    /// A touch that keeps the versions (and so the log number).
    Touch {
        path: usize,
    },
    Delete {
        path: usize,
        versioned: bool,
    },
    /// New path first, then the old path's tombstone (or the reverse).
    Rename {
        from: usize,
        to: usize,
        new_first: bool,
    },
    Forget {
        path: usize,
    },
    CleanReopen,
    CrashReopen,
}

fn arb_op() -> impl Strategy<Value = Op> {
    let p = 0..PATHS.len();
    prop_oneof![
        5 => (p.clone(), 0u8..3, 0u8..3, any::<u8>(), any::<bool>()).prop_map(
            |(path, kind, content, size, versioned)| Op::Put { path, kind, content, size, versioned }
        ),
        1 => p.clone().prop_map(|path| Op::Touch { path }),
        2 => (p.clone(), any::<bool>()).prop_map(|(path, versioned)| Op::Delete { path, versioned }),
        2 => (p.clone(), p.clone(), any::<bool>()).prop_map(|(from, to, new_first)| Op::Rename { from, to, new_first }),
        1 => p.clone().prop_map(|path| Op::Forget { path }),
        1 => Just(Op::CleanReopen),
        1 => Just(Op::CrashReopen),
    ]
}

fn path(i: usize) -> RelPath {
    RelPath::parse(PATHS[i]).unwrap()
}

fn now() -> Timestamp {
    Timestamp { secs: 50, nanos: 0 }
}

fn with_versions(mut e: Entry, versioned: bool) -> Entry {
    if versioned {
        e.sync.versions = vec![Version {
            record: e.record.clone(),
            signature: vec![1],
        }];
    }
    e
}

/// The changes of `op` against the store's current entries (empty when it
/// does not apply), or `None` for a reopen.
fn changes(store: &Store<TestBackend>, op: &Op) -> Option<Vec<Change>> {
    let live = |p: &RelPath| store.get_live(p).unwrap();
    Some(match *op {
        Op::Put {
            path: i,
            kind,
            content,
            size,
            versioned,
        } => {
            let p = path(i);
            let old = store.get(&p).unwrap();
            let mut record = match kind {
                0 => {
                    let mut r = FileRecord::new_file(OWNER, NODE, now());
                    r.content = Some(ContentId::of(&[content]));
                    r.size = u64::from(size);
                    r
                }
                1 => FileRecord::new_dir(OWNER, NODE, now()),
                _ => FileRecord::new_symlink("t".into(), OWNER, NODE, now()),
            };
            if let Some(o) = &old {
                record = record.succeeding(&o.record);
            }
            let ino = match old.as_ref().filter(|o| o.is_live()) {
                Some(o) => o.ino,
                None => store.alloc_ino().unwrap(),
            };
            vec![Change::Put(
                p,
                with_versions(Entry::new(ino, record), versioned),
            )]
        }
        Op::Touch { path: i } => {
            let p = path(i);
            let Some(mut e) = store.get(&p).unwrap() else {
                return Some(Vec::new());
            };
            e.record.atime = Timestamp { secs: 99, nanos: 0 };
            vec![Change::Put(p, e)]
        }
        Op::Delete { path: i, versioned } => {
            let p = path(i);
            let Some(old) = live(&p) else {
                return Some(Vec::new());
            };
            let tomb = Entry::new(NO_INO, old.record.tombstone(NODE, now()));
            vec![Change::Put(p, with_versions(tomb, versioned))]
        }
        Op::Rename {
            from,
            to,
            new_first,
        } => {
            let (pf, pt) = (path(from), path(to));
            let Some(old) = live(&pf) else {
                return Some(Vec::new());
            };
            if pf == pt || live(&pt).is_some() {
                return Some(Vec::new());
            }
            let tomb = Entry::new(NO_INO, old.record.tombstone(NODE, now()));
            let mut moved = old.clone();
            if let Some(prev) = store.get(&pt).unwrap() {
                moved.record = moved.record.succeeding(&prev.record);
            }
            moved.sync.versions.clear();
            let moved = with_versions(moved, true);
            let mut c = vec![Change::Put(pt, moved), Change::Put(pf, tomb)];
            if !new_first {
                c.reverse();
            }
            c
        }
        Op::Forget { path: i } => vec![Change::Remove(path(i))],
        Op::CleanReopen | Op::CrashReopen => return None,
    })
}

fn assert_derived(store: &Store<TestBackend>) {
    let map = store.backend().snapshot();
    let stats = store.stats().unwrap();
    assert_eq!(persisted(&map, stats), recompute(&map));
}

fn run_writes(ops: Vec<Op>) {
    let backend = TestBackend::default();
    let mut store = Store::open(backend.clone()).unwrap();
    for op in &ops {
        match changes(&store, op) {
            Some(c) => {
                let released = store.write(c).unwrap();
                for c in released {
                    assert_eq!(store.refcount(&c).unwrap(), 0);
                }
            }
            None => {
                if matches!(op, Op::CleanReopen) {
                    store.close().unwrap();
                }
                drop(store);
                store = Store::open(backend.clone()).unwrap();
            }
        }
        assert_derived(&store);
        for (p, e) in entries(&backend.snapshot()) {
            if e.is_live() && e.ino != ROOT_INO {
                assert_eq!(store.get_ino(e.ino).unwrap().map(|(q, _)| q), Some(p));
            }
        }
        let log = store.log_since(0, usize::MAX).unwrap();
        assert!(log.iter().all(|(_, e)| e.is_some()), "no stale log numbers");
    }
    // What the writes maintained is what a rebuild from the entries makes.
    store.close().unwrap();
    let kept = backend.snapshot();
    let mut crashed = kept.clone();
    crashed.remove(&meta_key(META_CLEAN));
    let rebuilt = Store::open(TestBackend::from_map(crashed)).unwrap();
    assert_eq!(rebuilt.stats().unwrap(), store.stats().unwrap());
    let strip = |m: BTreeMap<Vec<u8>, Vec<u8>>| -> BTreeMap<Vec<u8>, Vec<u8>> {
        m.into_iter().filter(|(k, _)| k[0] != b'm').collect()
    };
    assert_eq!(strip(rebuilt.backend().snapshot()), strip(kept));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn indexes_and_counters_after_random_writes_equal_a_rebuild(
        ops in proptest::collection::vec(arb_op(), 1..60)
    ) {
        run_writes(ops);
    }

    /// Every prefix of the backend writes of one `write` (a crash in its
    /// middle) under-counts no content, keeps every entry's log number
    /// readable, and reopens (rebuilding) to indexes equal to a
    /// recomputation, with every entry of the prefix still there.
    #[test]
    fn a_crash_in_the_middle_of_a_write_undercounts_nothing_and_loses_nothing(
        setup in proptest::collection::vec(arb_op(), 0..30),
        last in proptest::collection::vec(arb_op(), 1..4),
    ) {
        let backend = TestBackend::default();
        let store = Store::open(backend.clone()).unwrap();
        for op in &setup {
            if let Some(c) = changes(&store, op) {
                store.write(c).unwrap();
            }
        }
        let before = backend.snapshot();
        let mut batch = Vec::new();
        for op in &last {
            batch.extend(changes(&store, op).unwrap_or_default());
        }
        backend.take_writes();
        store.write(batch).unwrap();
        let writes = backend.take_writes();
        for k in 0..=writes.len() {
            let mut map = before.clone();
            for (key, value) in writes[..k].iter().cloned() {
                match value {
                    Some(v) => map.insert(key, v),
                    None => map.remove(&key),
                };
            }
            // Before any repair: no content has fewer references counted
            // than live files hold, and every log number is indexed.
            let on_disk = persisted(&map, Stats::default());
            let truth = recompute(&map);
            for (c, n) in &truth.refs {
                let counted = on_disk.refs.get(c).copied().unwrap_or(0);
                prop_assert!(counted >= *n, "prefix {k}: {c:?} counted {counted} < {n}");
            }
            for (seq, p) in &truth.log {
                prop_assert_eq!(on_disk.log.get(seq), Some(p), "prefix {}: log {}", k, seq);
            }
            // Reopened: rebuilt, and nothing of the prefix lost.
            let reopened = Store::open(TestBackend::from_map(map.clone())).unwrap();
            assert_derived(&reopened);
            let after = entries(&reopened.backend().snapshot());
            let had = entries(&map);
            prop_assert_eq!(after.len(), had.len());
            for ((p, e), (q, f)) in had.iter().zip(&after) {
                prop_assert_eq!(p, q);
                prop_assert_eq!(&e.record, &f.record);
            }
            for (p, e) in &after {
                if e.is_live() && e.ino != ROOT_INO {
                    let found = reopened.get_ino(e.ino).unwrap().map(|(q, _)| q);
                    prop_assert_eq!(found.as_ref(), Some(p));
                }
            }
        }
    }
}

#[test]
fn a_clean_reopen_scans_no_entry_and_a_crashed_one_rebuilds() {
    let backend = TestBackend::default();
    let store = Store::open(backend.clone()).unwrap();
    let mut batch = Vec::new();
    for i in 0..50u8 {
        let mut r = FileRecord::new_file(OWNER, NODE, now());
        r.content = Some(ContentId::of(&[i % 7]));
        r.size = u64::from(i);
        let e = with_versions(Entry::new(store.alloc_ino().unwrap(), r), true);
        batch.push(Change::Put(RelPath::parse(&format!("f{i}")).unwrap(), e));
    }
    store.write(batch).unwrap();
    let stats = store.stats().unwrap();
    let max_seq = store.max_seq().unwrap();
    store.close().unwrap();
    drop(store);

    let scans = backend.entry_scans();
    let store = Store::open(backend.clone()).unwrap();
    assert_eq!(backend.entry_scans(), scans, "a clean open reads no entry");
    assert_eq!(store.stats().unwrap(), stats);
    assert!(store.max_seq().unwrap() >= max_seq);
    assert_eq!(store.log_since(0, 100).unwrap().len(), 50);
    assert_eq!(store.refcount(&ContentId::of(&[0])).unwrap(), 8);
    // Opened, the marker is gone: a crash now (no close) is noticed.
    let e = store.get(&RelPath::parse("f3").unwrap()).unwrap().unwrap();
    let tomb = Entry::new(NO_INO, e.record.tombstone(NODE, now()));
    store
        .write(vec![Change::Put(RelPath::parse("f3").unwrap(), tomb)])
        .unwrap();
    drop(store);
    let store = Store::open(backend.clone()).unwrap();
    assert!(backend.entry_scans() > scans, "a crashed store is rebuilt");
    assert_eq!(store.stats().unwrap().files, 49);
    assert_eq!(store.stats().unwrap().tombstones, 1);
    assert_derived(&store);

    // A write after close takes the marker away before it lands.
    store.close().unwrap();
    store
        .write(vec![Change::Remove(RelPath::parse("f3").unwrap())])
        .unwrap();
    assert!(
        store
            .backend()
            .get(&meta_key(META_CLEAN))
            .unwrap()
            .is_none()
    );
    drop(store);
    let scans = backend.entry_scans();
    let store = Store::open(backend.clone()).unwrap();
    assert!(backend.entry_scans() > scans);
    assert_eq!(store.stats().unwrap().tombstones, 0);
}

#[test]
fn a_store_of_the_old_layout_is_indexed_on_first_open() {
    // Entries only, as the stores of before the persisted indexes: no
    // marker, so the first open builds every index.
    let backend = TestBackend::default();
    let store = Store::open(backend.clone()).unwrap();
    let mut r = FileRecord::new_file(OWNER, NODE, now());
    r.content = Some(ContentId::of(b"x"));
    store
        .write(vec![Change::Put(
            RelPath::parse("f").unwrap(),
            with_versions(Entry::new(7, r), true),
        )])
        .unwrap();
    let entries_only: BTreeMap<_, _> = backend
        .snapshot()
        .into_iter()
        .filter(|(k, _)| k[0] == b'e' || k[0] == b'm')
        .collect();
    let old = TestBackend::from_map(entries_only);
    let store = Store::open(old).unwrap();
    assert_derived(&store);
    assert_eq!(
        store.get_ino(7).unwrap().map(|(p, _)| p),
        Some(RelPath::parse("f").unwrap())
    );
    assert_eq!(store.refcount(&ContentId::of(b"x")).unwrap(), 1);
    assert_eq!(store.stats().unwrap().files, 1);
}

/// A log number whose index key is written but whose entry is not yet is
/// not served: readers stop at the last number written.
#[test]
fn the_log_is_read_up_to_the_last_entry_written() {
    let store = Store::in_memory();
    let e = with_versions(
        Entry::new(
            store.alloc_ino().unwrap(),
            FileRecord::new_file(OWNER, NODE, now()),
        ),
        true,
    );
    store
        .write(vec![Change::Put(RelPath::parse("a").unwrap(), e)])
        .unwrap();
    assert_eq!(store.max_seq().unwrap(), 1);
    // What a write under way has done before its entry: the key of its
    // next number.
    store
        .backend()
        .set(index::log_key(2), Some(b"b".to_vec()))
        .unwrap();
    let log = store.log_since(0, 10).unwrap();
    assert_eq!(log.len(), 1, "{log:?}");
    assert!(store.log_since(1, 10).unwrap().is_empty());
}

#[test]
fn history_keeps_superseded_and_deleted_content_until_collected_and_a_rebuild_counts_it() {
    let backend = TestBackend::default();
    let store = Store::open(backend.clone()).unwrap();
    let f = RelPath::parse("f").unwrap();
    let put = |store: &Store<TestBackend>, byte: u8, ino: u64| {
        let mut r = FileRecord::new_file(OWNER, NODE, now());
        r.content = Some(ContentId::of(&[byte]));
        r.size = u64::from(byte) + 1;
        let e = with_versions(Entry::new(ino, r), true);
        store.write(vec![Change::Put(f.clone(), e)]).unwrap()
    };
    let ino = store.alloc_ino().unwrap();
    // Off: a superseded version is released at once, and not listed.
    put(&store, 1, ino);
    assert_eq!(put(&store, 2, ino), vec![ContentId::of(&[1])]);
    assert!(store.history_of(&f).unwrap().is_empty());

    store.set_history(true);
    assert!(put(&store, 3, ino).is_empty(), "kept by history");
    assert_eq!(store.refcount(&ContentId::of(&[2])).unwrap(), 1);
    // A metadata-only change (same content) is not a version of history.
    let e = store.get(&f).unwrap().unwrap();
    let mut chmod = e.clone();
    chmod.record.mode = 0o600;
    store.write(vec![Change::Put(f.clone(), chmod)]).unwrap();
    let e = store.get(&f).unwrap().unwrap();
    let tomb = Entry::new(NO_INO, e.record.tombstone(NODE, now()));
    assert!(
        store
            .write(vec![Change::Put(f.clone(), tomb)])
            .unwrap()
            .is_empty()
    );
    let log = store.history_of(&f).unwrap();
    let contents: Vec<_> = log.iter().map(|i| i.record.content).collect();
    assert_eq!(
        contents,
        vec![Some(ContentId::of(&[3])), Some(ContentId::of(&[2]))],
        "newest first"
    );
    assert_eq!(
        store.history_stats().unwrap(),
        HistoryStats {
            versions: 2,
            bytes: 3 + 4
        }
    );
    assert!(store.history_has(&ContentId::of(&[2])));
    assert!(!store.history_has(&ContentId::of(&[1])));

    // A crash (no close): the rebuild counts history's references.
    drop(store);
    let store = Store::open(backend.clone()).unwrap();
    assert_eq!(store.refcount(&ContentId::of(&[2])).unwrap(), 1);
    assert_eq!(store.refcount(&ContentId::of(&[3])).unwrap(), 1);
    assert_eq!(store.history_stats().unwrap().versions, 2);

    // Collected before the window: nothing; after it: both released.
    let past = Timestamp { secs: 1, nanos: 0 };
    assert!(store.collect_history(past).unwrap().is_empty());
    let future = Timestamp {
        secs: Timestamp::now().secs + 10,
        nanos: 0,
    };
    let mut released = store.collect_history(future).unwrap();
    released.sort();
    let mut want = vec![ContentId::of(&[2]), ContentId::of(&[3])];
    want.sort();
    assert_eq!(released, want);
    assert!(store.history_of(&f).unwrap().is_empty());
    assert_eq!(store.history_stats().unwrap(), HistoryStats::default());
    assert!(!store.history_has(&ContentId::of(&[2])));
    store.close().unwrap();
    drop(store);
    let store = Store::open(backend).unwrap();
    assert_eq!(store.history_stats().unwrap(), HistoryStats::default());
}
