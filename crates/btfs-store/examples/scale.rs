//! The metadata store at scale: writes `DIRS` x `FILES` entries (default
//! 10,000 x 100 = 1,000,000 files, each with content, one signed version
//! and a log number) into a sled store, closes it, and opens it again in
//! fresh processes: after the clean close, after a crash (no close: the
//! indexes are rebuilt), and cleanly again. Prints time and memory.
//!
//! `cargo run --release -p btfs-store --example scale -- [DIR] [DIRS] [FILES]`
//! (DIR: a directory to create the store in, default a temporary one).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use btfs_core::{ContentId, FileRecord, NodeId, Owner, RelPath, Timestamp};
use btfs_store::{Change, Entry, Store, StoreError, Version};

const NODE: NodeId = NodeId([3; 32]);
const OWNER: Owner = Owner {
    mode: 0o644,
    uid: 0,
    gid: 0,
};

/// A field of /proc/self/status, in KiB.
fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap_or(0)
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// Opens, waiting for the lock of a process that just exited.
fn open(dir: &Path) -> Store<btfs_store::SledBackend> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match Store::open_sled(dir) {
            Err(StoreError::Locked(_)) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50))
            }
            other => return other.unwrap(),
        }
    }
}

fn write(dir: &Path, dirs: u32, files: u32) {
    let store = open(dir);
    let now = Timestamp::now();
    let started = Instant::now();
    let root = RelPath::root();
    store
        .write(vec![Change::Put(
            root.clone(),
            Entry::new(1, FileRecord::new_dir(OWNER, NODE, now)),
        )])
        .unwrap();
    for d in 0..dirs {
        let dpath = root.join(&format!("d{d:04}")).unwrap();
        let mut batch = vec![Change::Put(
            dpath.clone(),
            versioned(
                store.alloc_ino().unwrap(),
                FileRecord::new_dir(OWNER, NODE, now),
            ),
        )];
        for f in 0..files {
            let n = d * files + f;
            let mut r = FileRecord::new_file(OWNER, NODE, now);
            r.size = u64::from(n % 4096);
            r.content = Some(ContentId::of(&n.to_be_bytes()));
            batch.push(Change::Put(
                dpath.join(&format!("f{n:06}")).unwrap(),
                versioned(store.alloc_ino().unwrap(), r),
            ));
        }
        store.write(batch).unwrap();
    }
    let took = started.elapsed();
    let close = Instant::now();
    store.close().unwrap();
    println!(
        "write: {} entries in {:.1} s ({:.1} us/entry), close {} ms, RSS {} (peak {})",
        u64::from(dirs) * u64::from(files + 1) + 1,
        took.as_secs_f64(),
        took.as_secs_f64() * 1e6 / f64::from(dirs * (files + 1)),
        close.elapsed().as_millis(),
        mib(status_kib("VmRSS:")),
        mib(status_kib("VmHWM:")),
    );
}

fn versioned(ino: u64, record: FileRecord) -> Entry {
    let mut e = Entry::new(ino, record.clone());
    e.sync.versions = vec![Version {
        record,
        signature: vec![7; 64],
    }];
    e
}

/// One open in this process: `close` says whether it ends cleanly.
fn reopen(dir: &Path, label: &str, close: bool) {
    let before = status_kib("VmRSS:");
    let started = Instant::now();
    let store = open(dir);
    let took = started.elapsed();
    let rss = status_kib("VmRSS:");
    let s = Instant::now();
    let stats = store.stats().unwrap();
    let stats_took = s.elapsed();
    // A few reads through the persisted indexes.
    let s = Instant::now();
    let mut found = 0;
    for ino in (2..1_000_000u64).step_by(9973) {
        found += usize::from(store.get_ino(ino).unwrap().is_some());
    }
    let log = store.log_since(500_000, 1000).unwrap().len();
    let reads = s.elapsed();
    println!(
        "open ({label}): {:.3} s, RSS {} before, {} after open (peak {}); stats() {} us: {} files {} dirs; {found} get_ino + log_since({log}) in {} ms",
        took.as_secs_f64(),
        mib(before),
        mib(rss),
        mib(status_kib("VmHWM:")),
        stats_took.as_micros(),
        stats.files,
        stats.dirs,
        reads.as_millis(),
    );
    if close {
        store.close().unwrap();
    }
}

fn du(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| {
                    let m = e.metadata().unwrap();
                    if m.is_dir() { du(&e.path()) } else { m.len() }
                })
                .sum()
        })
        .unwrap_or(0)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("--write") => {
            return write(
                Path::new(&args[1]),
                args[2].parse().unwrap(),
                args[3].parse().unwrap(),
            );
        }
        Some("--open") => return reopen(Path::new(&args[1]), &args[2], args[3] == "close"),
        _ => {}
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = args
        .first()
        .map_or_else(|| tmp.path().join("db"), |d| Path::new(d).to_path_buf());
    let dirs = args.get(1).map_or("10000", String::as_str);
    let files = args.get(2).map_or("100", String::as_str);
    let me = std::env::current_exe().unwrap();
    let run = |a: &[&str]| {
        let st = Command::new(&me).args(a).status().unwrap();
        assert!(st.success());
    };
    let d = dir.to_str().unwrap();
    run(&["--write", d, dirs, files]);
    println!("on disk: {}", mib(du(&dir) / 1024));
    run(&["--open", d, "after a clean close", "crash"]);
    run(&["--open", d, "after a crash: rebuild", "close"]);
    run(&["--open", d, "after a clean close", "close"]);
    println!("on disk: {}", mib(du(&dir) / 1024));
}
