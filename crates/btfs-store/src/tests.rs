//! Model-based test: random operations against the sled store (with reopens)
//! and against a plain `BTreeMap` model must agree on every observation.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};

use btfs_core::{NodeId, Owner, Timestamp};
use proptest::prelude::*;

use super::*;

const NODE: NodeId = NodeId([7; 32]);
const OWNER: Owner = Owner {
    mode: 0o644,
    uid: 0,
    gid: 0,
};
const PATHS: &[&str] = &["a", "b", "d", "d/x", "d/y", "d/e", "d/e/z"];

#[derive(Debug, Clone)]
enum Op {
    Create {
        path: usize,
        dir: bool,
        content: u8,
    },
    Delete {
        path: usize,
    },
    Rename {
        from: usize,
        to: usize,
        index_first: bool,
    },
    SetContent {
        path: usize,
        content: u8,
    },
    Forget {
        path: usize,
    },
    Reopen,
    /// A reopen after [`Store::close`]: the indexes are trusted, not rebuilt.
    CleanReopen,
    /// A rename cut short by a crash: only its first write (the new path)
    /// reached the store, then the store is reopened.
    CrashedRename {
        from: usize,
        to: usize,
    },
}

fn arb_op() -> impl Strategy<Value = Op> {
    let p = 0..PATHS.len();
    prop_oneof![
        4 => (p.clone(), any::<bool>(), 0u8..3).prop_map(|(path, dir, content)| Op::Create { path, dir, content }),
        2 => p.clone().prop_map(|path| Op::Delete { path }),
        2 => (p.clone(), p.clone(), any::<bool>()).prop_map(|(from, to, index_first)| Op::Rename { from, to, index_first }),
        2 => (p.clone(), 0u8..3).prop_map(|(path, content)| Op::SetContent { path, content }),
        1 => p.clone().prop_map(|path| Op::Forget { path }),
        1 => Just(Op::Reopen),
        1 => Just(Op::CleanReopen),
        1 => (p.clone(), p.clone()).prop_map(|(from, to)| Op::CrashedRename { from, to }),
    ]
}

fn path(i: usize) -> RelPath {
    RelPath::parse(PATHS[i]).unwrap()
}

fn content(i: u8) -> ContentId {
    ContentId::of(&[i])
}

fn check(store: &Store<SledBackend>, model: &BTreeMap<RelPath, Entry>) {
    let mut inos = BTreeSet::new();
    for e in model.values().filter(|e| e.is_live()) {
        assert!(inos.insert(e.ino), "inode {} on two live paths", e.ino);
    }
    for p in PATHS.iter().map(|p| RelPath::parse(p).unwrap()) {
        assert_eq!(
            store.get(&p).unwrap().as_ref(),
            model.get(&p),
            "entry at {p}"
        );
    }
    for (p, e) in model.iter().filter(|(_, e)| e.is_live()) {
        assert_eq!(
            store.path_of(e.ino).unwrap().as_ref(),
            Some(p),
            "inode {}",
            e.ino
        );
        assert_eq!(
            store.get_ino(e.ino).unwrap().map(|(q, _)| q).as_ref(),
            Some(p)
        );
    }
    for c in 0..3 {
        let expected = model
            .values()
            .filter(|e| {
                e.is_live()
                    && e.record.content == Some(content(c))
                    && e.record.kind == FileKind::File
            })
            .count() as u64;
        assert_eq!(
            store.refcount(&content(c)).unwrap(),
            expected,
            "refcount of {c}"
        );
    }
    let d = RelPath::parse("d").unwrap();
    let listed: Vec<String> = store
        .live_children(&d)
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    let expected: Vec<String> = model
        .iter()
        .filter(|(p, e)| e.is_live() && p.parent().as_ref() == Some(&d))
        .map(|(p, _)| p.file_name().unwrap().to_owned())
        .collect();
    assert_eq!(listed, expected);
    assert_eq!(store.has_live_children(&d).unwrap(), !expected.is_empty());
    let mut stats = Stats::default();
    for e in model.values() {
        crate::index::tally(&mut stats, e, true);
    }
    // The model has no root entry; the store has none either here.
    assert_eq!(store.stats().unwrap(), stats);
}

/// Reopens after a drop; sled's background threads release the file lock
/// shortly after the last handle is dropped.
fn reopen(dir: &std::path::Path) -> Store<SledBackend> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match Store::open_sled(dir) {
            Err(StoreError::Locked(_)) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(10))
            }
            other => return other.unwrap(),
        }
    }
}

fn run(ops: Vec<Op>) {
    let dir = tempfile::tempdir().unwrap();
    let mut store = reopen(dir.path());
    let mut model: BTreeMap<RelPath, Entry> = BTreeMap::new();
    let mut seen_inos = BTreeSet::new();
    let now = Timestamp { secs: 1, nanos: 0 };
    for op in ops {
        match op {
            Op::Create {
                path: i,
                dir: is_dir,
                content: c,
            } => {
                let p = path(i);
                if model.get(&p).is_some_and(Entry::is_live) {
                    continue;
                }
                let mut record = if is_dir {
                    FileRecord::new_dir(OWNER, NODE, now)
                } else {
                    let mut r = FileRecord::new_file(OWNER, NODE, now);
                    r.content = Some(content(c));
                    r
                };
                if let Some(old) = model.get(&p) {
                    record = record.succeeding(&old.record);
                }
                let ino = store.alloc_ino().unwrap();
                assert!(seen_inos.insert(ino), "inode {ino} handed out twice");
                let e = Entry::new(ino, record);
                store
                    .write(vec![Change::Put(p.clone(), e.clone())])
                    .unwrap();
                model.insert(p, e);
            }
            Op::Delete { path: i } => {
                let p = path(i);
                let Some(old) = model.get(&p).filter(|e| e.is_live()).cloned() else {
                    continue;
                };
                let e = Entry::new(NO_INO, old.record.tombstone(NODE, now));
                let released = store
                    .write(vec![Change::Put(p.clone(), e.clone())])
                    .unwrap();
                model.insert(p, e);
                for c in released {
                    assert!(!model.values().any(|e| e.is_live()
                        && e.record.content == Some(c)
                        && e.record.kind == FileKind::File));
                }
            }
            Op::Rename {
                from,
                to,
                index_first,
            } => {
                let (pf, pt) = (path(from), path(to));
                let Some(old) = model.get(&pf).filter(|e| e.is_live()).cloned() else {
                    continue;
                };
                if pf == pt || model.get(&pt).is_some_and(Entry::is_live) {
                    continue;
                }
                let tomb = Entry::new(NO_INO, old.record.tombstone(NODE, now));
                let mut moved = old.clone();
                if let Some(prev) = model.get(&pt) {
                    moved.record = moved.record.succeeding(&prev.record);
                }
                let mut changes = vec![
                    Change::Put(pf.clone(), tomb.clone()),
                    Change::Put(pt.clone(), moved.clone()),
                ];
                if index_first {
                    changes.reverse();
                }
                store.write(changes).unwrap();
                model.insert(pf, tomb);
                model.insert(pt, moved);
            }
            Op::SetContent {
                path: i,
                content: c,
            } => {
                let p = path(i);
                let Some(mut e) = model
                    .get(&p)
                    .filter(|e| e.is_live() && e.record.kind == FileKind::File)
                    .cloned()
                else {
                    continue;
                };
                e.record = e.record.next_version(NODE, now);
                e.record.content = Some(content(c));
                store
                    .write(vec![Change::Put(p.clone(), e.clone())])
                    .unwrap();
                model.insert(p, e);
            }
            Op::Forget { path: i } => {
                let p = path(i);
                store.write(vec![Change::Remove(p.clone())]).unwrap();
                model.remove(&p);
            }
            Op::Reopen => {
                store.flush().unwrap();
                drop(store);
                store = reopen(dir.path());
            }
            Op::CleanReopen => {
                store.close().unwrap();
                drop(store);
                store = reopen(dir.path());
            }
            Op::CrashedRename { from, to } => {
                let (pf, pt) = (path(from), path(to));
                let Some(old) = model.get(&pf).filter(|e| e.is_live()).cloned() else {
                    continue;
                };
                if pf == pt || model.get(&pt).is_some_and(Entry::is_live) {
                    continue;
                }
                store.write(vec![Change::Put(pt.clone(), old)]).unwrap();
                store.flush().unwrap();
                drop(store);
                store = reopen(dir.path());
                // Both paths survive; reopening gave one of them a new inode.
                let (a, b) = (
                    store.get(&pf).unwrap().unwrap(),
                    store.get(&pt).unwrap().unwrap(),
                );
                assert!(a.is_live() && b.is_live());
                assert_ne!(a.ino, b.ino);
                for e in [&a, &b] {
                    seen_inos.insert(e.ino);
                }
                model.insert(pf, a);
                model.insert(pt, b);
            }
        }
        check(&store, &model);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn sled_store_matches_model(ops in proptest::collection::vec(arb_op(), 1..40)) {
        run(ops);
    }
}

#[test]
fn second_open_of_the_same_dir_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let _first = Store::open_sled(dir.path()).unwrap();
    // The holder (this process) is alive: refused without waiting for it.
    let started = std::time::Instant::now();
    let err = Store::open_sled(dir.path()).unwrap_err();
    assert!(started.elapsed() < crate::backend::EXITING_HOLDER_PATIENCE);
    assert!(matches!(err, StoreError::Locked(_)), "{err:?}");
    assert!(err.to_string().contains("in use by another btfs process"));
}

#[test]
fn memory_twin_behaves_like_sled_for_children_and_stats() {
    let store = Store::in_memory();
    let now = Timestamp::now();
    let mut batch = Vec::new();
    for name in ["b", "a", "c"] {
        let mut r = FileRecord::new_file(OWNER, NODE, now);
        r.size = 10;
        let ino = store.alloc_ino().unwrap();
        batch.push(Change::Put(
            RelPath::parse(name).unwrap(),
            Entry::new(ino, r),
        ));
    }
    store.write(batch).unwrap();
    let names: Vec<_> = store
        .live_children(&RelPath::root())
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(names, ["a", "b", "c"]);
    let stats = store.stats().unwrap();
    assert_eq!((stats.files, stats.bytes), (3, 30));
    assert_eq!(store.refcount(&ContentId::empty()).unwrap(), 3);
}

#[test]
fn old_tombstones_are_collected_and_live_entries_never() {
    let store = Store::in_memory();
    let t = |secs| Timestamp { secs, nanos: 0 };
    let live = FileRecord::new_file(OWNER, NODE, t(10));
    let old = live.tombstone(NODE, t(100));
    let recent = live.tombstone(NODE, t(5000));
    let ino = store.alloc_ino().unwrap();
    store
        .write(vec![
            Change::Put(RelPath::parse("live").unwrap(), Entry::new(ino, live)),
            Change::Put(RelPath::parse("old").unwrap(), Entry::new(NO_INO, old)),
            Change::Put(
                RelPath::parse("d/recent").unwrap(),
                Entry::new(NO_INO, recent),
            ),
        ])
        .unwrap();
    assert_eq!(store.collect_tombstones(t(1000)).unwrap(), 1);
    assert!(
        store
            .get(&RelPath::parse("old").unwrap())
            .unwrap()
            .is_none()
    );
    assert!(
        store
            .get(&RelPath::parse("d/recent").unwrap())
            .unwrap()
            .is_some()
    );
    assert!(
        store
            .get_live(&RelPath::parse("live").unwrap())
            .unwrap()
            .is_some()
    );
    assert_eq!(store.collect_tombstones(t(1000)).unwrap(), 0);
}

/// An entry carrying `record` as its only signed version.
fn versioned(ino: u64, record: FileRecord) -> Entry {
    let mut e = Entry::new(ino, record.clone());
    e.sync.versions = vec![Version {
        record,
        signature: vec![1, 2, 3],
    }];
    e
}

#[test]
fn the_log_numbers_version_changes_and_never_goes_back() {
    let dir = tempfile::tempdir().unwrap();
    let now = Timestamp {
        secs: 100,
        nanos: 0,
    };
    let (a, b) = (RelPath::parse("a").unwrap(), RelPath::parse("b").unwrap());
    let index;
    {
        let store = Store::open_sled(dir.path()).unwrap();
        index = store.index_id();
        let ra = FileRecord::new_file(OWNER, NODE, now);
        let rb = FileRecord::new_file(OWNER, NODE, now);
        store
            .write(vec![
                Change::Put(a.clone(), versioned(2, ra.clone())),
                Change::Put(b.clone(), versioned(3, rb)),
            ])
            .unwrap();
        let log = store.log_since(0, 10).unwrap();
        assert_eq!(
            log.iter()
                .map(|(s, e)| (*s, e.as_ref().unwrap().0.clone()))
                .collect::<Vec<_>>(),
            [(1, a.clone()), (2, b.clone())]
        );
        // A change that keeps the versions (a directory time, an inode
        // number) keeps the number; a new version takes the next one.
        let mut same = store.get(&a).unwrap().unwrap();
        same.record.atime = Timestamp { secs: 7, nanos: 0 };
        store.write(vec![Change::Put(a.clone(), same)]).unwrap();
        assert_eq!(store.max_seq().unwrap(), 2);
        let next = ra.next_version(NODE, now);
        store
            .write(vec![Change::Put(a.clone(), versioned(2, next))])
            .unwrap();
        let log = store.log_since(1, 10).unwrap();
        assert_eq!(
            log.iter()
                .map(|(s, e)| (*s, e.as_ref().unwrap().0.clone()))
                .collect::<Vec<_>>(),
            [(2, b.clone()), (3, a.clone())]
        );
        assert!(store.log_since(3, 10).unwrap().is_empty());
        // Entries without versions are not in the log.
        let local = RelPath::parse("local").unwrap();
        store
            .write(vec![Change::Put(
                local,
                Entry::new(4, FileRecord::new_file(OWNER, NODE, now)),
            )])
            .unwrap();
        assert_eq!(store.max_seq().unwrap(), 3);
        store.flush().unwrap();
    }
    let store = Store::open_sled(dir.path()).unwrap();
    assert_eq!(store.index_id(), index, "the log survives a restart");
    assert_eq!(store.log_since(0, 10).unwrap().len(), 2);
    let later = FileRecord::new_file(OWNER, NODE, now);
    store
        .write(vec![Change::Put(b.clone(), versioned(3, later))])
        .unwrap();
    assert!(
        store.max_seq().unwrap() > 3,
        "numbers after a restart are new ones"
    );
    // A collected tombstone leaves the log.
    let tomb = store.get(&b).unwrap().unwrap().record.tombstone(NODE, now);
    store
        .write(vec![Change::Put(b.clone(), versioned(NO_INO, tomb))])
        .unwrap();
    store
        .collect_tombstones(Timestamp {
            secs: 1000,
            nanos: 0,
        })
        .unwrap();
    let log = store.log_since(0, 10).unwrap();
    assert_eq!(log.len(), 1);
    assert_eq!(log[0].1.as_ref().unwrap().0, a);
}

/// The process that took the store's lock is gone but the lock lives on in
/// a process that inherited it, as in a killed daemon whose last threads
/// are still closing its files: the open waits for the release.
#[test]
fn an_open_waits_for_a_lock_whose_taker_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    drop(reopen(dir.path()));
    let db = dir.path().join("db");
    // flock(1) locks fd 9 and exits; `sleep`, holding fd 9, outlives the shell.
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg("exec 9>>\"$1\"; flock -x 9 || exit 1; sleep 1 >/dev/null 2>&1 & echo $!")
        .arg("sh")
        .arg(&db)
        .stdout(std::process::Stdio::piped())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let holder: u32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    let alive = |pid: u32| !crate::backend::process_is_exiting(pid);
    assert!(alive(holder), "the lock's holder runs while we open");
    let store = Store::open_sled(dir.path()).unwrap();
    assert!(!alive(holder), "the open waited for the holder to exit");
    drop(store);
}
