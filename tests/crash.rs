//! Crash safety: the daemon is killed with SIGKILL while files are being
//! written, 20 times over one state directory. After each remount every file
//! must hold one complete version (old or new), never a mix. A mount made
//! right after a kill, while the killed daemon may still be exiting, succeeds.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    fs,
    io::Write,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use common::{Node, pattern};

const ROUNDS: u64 = 20;
const WRITERS: u64 = 3;
const FILES_PER_WRITER: u64 = 4;

/// Content of version `v` of file `k`: a header naming it, then bytes that
/// depend on both, of a length that depends on both.
fn content(k: u64, v: u64) -> Vec<u8> {
    let len = 1000 + ((k * 7919 + v * 104_729) % 300_000) as usize;
    let mut out = format!("file {k} version {v} len {len}\n").into_bytes();
    out.extend(pattern(k << 32 | v, len));
    out
}

/// Checks that `data` is exactly one version of one file. A file that was
/// created but whose first content never committed is empty: its first version.
fn check_whole(path: &Path, data: &[u8]) {
    if data.is_empty() {
        return;
    }
    let nl = data
        .iter()
        .position(|b| *b == b'\n')
        .unwrap_or_else(|| panic!("{}: no header ({} bytes): torn", path.display(), data.len()));
    let header = std::str::from_utf8(&data[..nl])
        .unwrap_or_else(|_| panic!("{}: garbled header", path.display()));
    let nums: Vec<u64> = header.split(' ').filter_map(|w| w.parse().ok()).collect();
    assert_eq!(nums.len(), 3, "{}: header {header:?}", path.display());
    assert!(
        data == content(nums[0], nums[1]).as_slice(),
        "{}: torn version ({header}, {} bytes)",
        path.display(),
        data.len()
    );
}

fn writer(dir: PathBuf, w: u64, stop: Arc<AtomicBool>, written: Arc<AtomicU64>) {
    let mut v = 0u64;
    while !stop.load(Ordering::Relaxed) {
        for f in 0..FILES_PER_WRITER {
            let k = w * 100 + f;
            v += 1;
            let target = dir.join(format!("w{w}-f{f}"));
            let data = content(k, v);
            // Half the files are overwritten in place, half saved atomically.
            let result = if f % 2 == 0 {
                fs::write(&target, &data)
            } else {
                let tmp = dir.join(format!(".w{w}-f{f}.tmp"));
                fs::File::create(&tmp)
                    .and_then(|mut t| t.write_all(&data).and_then(|_| t.sync_all()))
                    .and_then(|_| fs::rename(&tmp, &target))
            };
            if result.is_err() {
                return; // the daemon is gone
            }
            written.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[test]
fn sigkill_during_writes_never_tears_a_file() {
    let mut node = Node::start();
    let mut seed: u64 = 0x9E37_79B9;
    let mut total = 0;
    for round in 0..ROUNDS {
        let stop = Arc::new(AtomicBool::new(false));
        let written = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..WRITERS)
            .map(|w| {
                let (dir, stop, written) = (node.mnt.clone(), stop.clone(), written.clone());
                std::thread::spawn(move || writer(dir, w, stop, written))
            })
            .collect();
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        std::thread::sleep(Duration::from_millis(100 + seed % 400));
        node.kill9();
        stop.store(true, Ordering::Relaxed);
        for t in threads {
            t.join().expect("writer thread");
        }
        total += written.load(Ordering::Relaxed);

        node.mount();
        let mut files = 0;
        for entry in fs::read_dir(&node.mnt).unwrap() {
            let path = entry.unwrap().path();
            check_whole(&path, &fs::read(&path).unwrap());
            files += 1;
        }
        if round > 0 {
            assert!(
                files >= WRITERS * FILES_PER_WRITER / 2,
                "round {round}: only {files} files survived"
            );
        }
        assert_eq!(
            fs::read_dir(node.state.join("staging")).unwrap().count(),
            0,
            "staging is cleared on start"
        );
    }
    assert!(total > ROUNDS, "writers made progress ({total} versions)");
}

#[test]
fn a_mount_right_after_sigkill_succeeds_and_keeps_the_files() {
    let mut node = Node::start();
    for k in 0..5u64 {
        fs::write(node.path(&format!("f{k}")), content(k, 0)).unwrap();
    }
    // A clean unmount commits and flushes them.
    node.remount();
    for round in 0..5u64 {
        // Work in flight, so the killed daemon has files to close.
        fs::write(node.path("scratch"), pattern(round, 4 << 20)).unwrap();
        let old = node.kill9_no_wait().expect("a running daemon");
        // At once: the killed daemon may still hold the metadata store.
        node.mount();
        assert_ne!(node.pid(), Some(old));
        for k in 0..5u64 {
            let path = node.path(&format!("f{k}"));
            assert!(
                fs::read(&path).unwrap() == content(k, 0),
                "{}",
                path.display()
            );
        }
    }
}

/// A version whose writer called fsync is durable once committed: a crash
/// right after the commit keeps it (without fsync, the metadata store may
/// lose the last half second of commits in a crash, as a local filesystem
/// loses unsynced writes).
#[test]
fn a_version_fsynced_before_close_survives_a_crash_right_after_its_commit() {
    let mut node = Node::start();
    for round in 0..5u64 {
        let commits = node.status()["commits"].as_u64().unwrap();
        let mut f = fs::File::create(node.path(&format!("s{round}"))).unwrap();
        f.write_all(&content(round, 1)).unwrap();
        f.sync_all().unwrap();
        drop(f);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while node.status()["commits"].as_u64().unwrap() == commits {
            assert!(std::time::Instant::now() < deadline, "no commit");
            std::thread::sleep(Duration::from_millis(2));
        }
        node.kill9();
        node.mount();
        for r in 0..=round {
            let path = node.path(&format!("s{r}"));
            assert!(
                fs::read(&path).unwrap() == content(r, 1),
                "{} lost",
                path.display()
            );
        }
    }
}

/// How many times each fsync case is crashed and checked.
const SYNC_ROUNDS: u64 = 50;

/// Bytes acknowledged by `fsync`, `fdatasync` or an `O_DSYNC` write survive
/// a SIGKILL of the daemon while the file is still open (a database or a
/// log keeps its file open): the next start commits them as the file's
/// version. Rounds alternate new files and rewrites of existing ones.
#[test]
fn fsynced_bytes_of_a_file_still_open_survive_sigkill() {
    use std::os::unix::fs::OpenOptionsExt;
    let mut node = Node::start();
    for round in 0..SYNC_ROUNDS {
        let name = format!("open{}", round % 10);
        let data = content(round, 2);
        let mut opts = fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        if round % 3 == 2 {
            opts.custom_flags(libc::O_DSYNC);
        }
        let mut f = opts.open(node.path(&name)).unwrap();
        f.write_all(&data).unwrap();
        match round % 3 {
            0 => f.sync_all().unwrap(),
            1 => f.sync_data().unwrap(),
            _ => {} // every O_DSYNC write was acknowledged as durable
        }
        node.kill9();
        drop(f);
        node.mount();
        let got = fs::read(node.path(&name)).unwrap_or_else(|e| {
            panic!("round {round}: {name}: {e}\n{}", node.log());
        });
        assert!(
            got == data,
            "round {round}: {name} lost its fsynced bytes ({} bytes, wanted {})",
            got.len(),
            data.len()
        );
        assert_eq!(
            fs::read_dir(node.state.join("staging")).unwrap().count(),
            0,
            "round {round}: recovered staging files are committed, not left"
        );
    }
    assert!(
        !node.state.join("rescued").exists(),
        "every synced file had its path to go to"
    );
}

/// `write`, `fsync`, `close`, `fsync(dir)`, then SIGKILL at once (the commit
/// of the close may still be queued): nothing is lost.
#[test]
fn a_file_written_fsynced_closed_and_its_directory_fsynced_survives_sigkill() {
    let mut node = Node::start();
    fs::create_dir(node.path("dir")).unwrap();
    for round in 0..SYNC_ROUNDS {
        let path = node.path(&format!("dir/f{}", round % 10));
        let data = content(round, 3);
        let mut f = fs::File::create(&path).unwrap();
        f.write_all(&data).unwrap();
        f.sync_all().unwrap();
        drop(f);
        fs::File::open(node.path("dir"))
            .unwrap()
            .sync_all()
            .unwrap();
        node.kill9();
        node.mount();
        assert!(
            fs::read(&path).unwrap() == data,
            "round {round}: {} lost",
            path.display()
        );
    }
}
