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

/// Size of the large file the in-place crash tests change.
const LARGE: usize = 64 << 20;

/// Writes at various offsets of a `LARGE` file, unaligned, one running past
/// its end (the file grows); `round` varies the offsets and bytes.
fn in_place_writes(round: u64) -> Vec<(u64, Vec<u8>)> {
    const MIB: u64 = 1 << 20;
    let shift = round * 4099;
    vec![
        (MIB + 5 + shift, pattern(round << 8 | 1, 2 << 20)),
        (30 * MIB + 4097 + shift, pattern(round << 8 | 2, 1 << 20)),
        (7 + shift, pattern(round << 8 | 3, 3)),
        (60 * MIB + 3 + shift, pattern(round << 8 | 4, 3 << 20)),
        (
            LARGE as u64 - 100 - shift,
            pattern(round << 8 | 5, (1 << 20) + 1),
        ),
    ]
}

/// `data` with `writes` applied, as a file would hold it.
fn apply(data: &mut Vec<u8>, writes: &[(u64, Vec<u8>)]) {
    for (off, bytes) in writes {
        let (start, end) = (*off as usize, *off as usize + bytes.len());
        if data.len() < end {
            data.resize(end, 0);
        }
        data[start..end].copy_from_slice(bytes);
    }
}

/// Opens `path` for writing in place (no `O_TRUNC`) and makes `writes`.
fn write_in_place(path: &Path, writes: &[(u64, Vec<u8>)], flags: i32) -> fs::File {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let f = fs::OpenOptions::new()
        .write(true)
        .custom_flags(flags)
        .open(path)
        .unwrap();
    for (off, bytes) in writes {
        f.write_all_at(bytes, *off).unwrap();
    }
    f
}

/// Bytes the files under `dir` take on disk.
fn disk_usage(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).into_iter().flatten().flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                stack.push(e.path());
            }
            total += m.blocks() * 512;
        }
    }
    total
}

/// A node holding `data` as the committed file `name`, cleanly remounted.
fn node_with_large_file(name: &str, data: &[u8]) -> Node {
    let mut node = Node::start();
    fs::write(node.path(name), data).unwrap();
    node.remount();
    assert_eq!(
        common::hash_file(&node.path(name)).unwrap(),
        (data.len() as u64, blake3::hash(data))
    );
    node
}

/// The length and blake3 of `name` on `node`; a read error fails the test
/// with the node's log.
fn read_hash(node: &Node, name: &str, what: &str) -> (u64, blake3::Hash) {
    common::hash_file(&node.path(name))
        .unwrap_or_else(|e| panic!("{what}: reading {name}: {e}\n{}", node.log()))
}

fn assert_holds(node: &Node, name: &str, want: &[u8], what: &str) {
    let got = read_hash(node, name, what);
    assert!(
        got == (want.len() as u64, blake3::hash(want)),
        "{what}: {name} reads {} bytes of another content ({} wanted)\n{}",
        got.0,
        want.len(),
        node.log()
    );
}

fn assert_staging_empty(node: &Node, what: &str) {
    let left: Vec<_> = fs::read_dir(node.state.join("staging"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "{what}: staging holds {left:?}");
}

/// A large file opened for writing in place (range-staged, issue 20), written
/// at several offsets and never closed nor synced, when the daemon is
/// killed: the next start shows the previous version exactly, and nothing of
/// the lost writes stays in the state directory. A write and close after
/// that commits as usual.
#[test]
fn sigkill_during_an_unsynced_in_place_write_of_a_large_file_keeps_the_previous_version() {
    let name = "large.bin";
    let mut want = pattern(70, LARGE);
    let mut node = node_with_large_file(name, &want);
    for round in 0..3u64 {
        let before = disk_usage(&node.state);
        let writes = in_place_writes(round);
        let written: u64 = writes.iter().map(|(_, b)| b.len() as u64).sum();
        let f = write_in_place(&node.path(name), &writes, 0);
        node.kill9();
        drop(f);
        node.mount();
        let what = format!("round {round}");
        assert_holds(&node, name, &want, &what);
        assert_staging_empty(&node, &what);
        let after = disk_usage(&node.state);
        eprintln!(
            "{what}: state dir {before} bytes before the writes, {after} after the restart ({written} bytes written)"
        );
        assert!(
            after < before + written,
            "{what}: the state dir grew from {before} to {after} bytes"
        );
    }
    // Writing in place and closing still commits.
    let writes = in_place_writes(9);
    drop(write_in_place(&node.path(name), &writes, 0));
    apply(&mut want, &writes);
    assert_holds(&node, name, &want, "after a write and close");
    node.remount();
    assert_holds(&node, name, &want, "after a clean remount");
}

/// The same, with the writes acknowledged by `fsync`, `fdatasync` or
/// `O_DSYNC` before the daemon is killed, the file still open: the next start
/// commits them as the file's version (the fsync contract holds for a
/// range-staged large file too).
#[test]
fn fsynced_in_place_writes_of_a_large_file_still_open_survive_sigkill() {
    let name = "large.bin";
    let mut want = pattern(71, LARGE);
    let mut node = node_with_large_file(name, &want);
    for round in 0..3u64 {
        let writes = in_place_writes(round);
        let flags = if round == 2 { libc::O_DSYNC } else { 0 };
        let f = write_in_place(&node.path(name), &writes, flags);
        match round {
            0 => f.sync_all().unwrap(),
            1 => f.sync_data().unwrap(),
            _ => {} // every O_DSYNC write was acknowledged as durable
        }
        apply(&mut want, &writes);
        node.kill9();
        drop(f);
        node.mount();
        let what = format!("round {round}");
        assert_holds(&node, name, &want, &what);
        assert_staging_empty(&node, &what);
        node.remount();
        assert_holds(&node, name, &want, &format!("{what}, remounted"));
    }
    assert!(!node.state.join("rescued").exists());
}

/// Rounds of `sigkill_around_the_commit_of_a_large_in_place_write_keeps_one_whole_version`.
const COMMIT_KILL_ROUNDS: u32 = 20;
/// The shortest non-zero delay between the close and the kill; it doubles
/// every two rounds (each delay is used twice: without, then with fsync),
/// from inside a commit of a few changed MiB to past the hashing of a whole
/// `LARGE` file and the metadata store's half-second flush.
const COMMIT_KILL_FIRST_DELAY: Duration = Duration::from_millis(5);

/// There is no failpoint to stop a commit half way, so the daemon is killed
/// at spread delays after the close of a large in-place write (the commit
/// runs on a worker after the close returns). After each restart the file
/// is one whole version, never a mix, and staging is empty: without fsync
/// the version before the write or the one after; with fsync before the
/// close, the one after (its bytes were acknowledged).
#[test]
fn sigkill_around_the_commit_of_a_large_in_place_write_keeps_one_whole_version() {
    let name = "large.bin";
    let mut current = pattern(72, LARGE);
    let mut node = node_with_large_file(name, &current);
    let (mut kept_old, mut kept_new) = (0, 0);
    for round in 0..COMMIT_KILL_ROUNDS {
        let synced = round % 2 == 1;
        let writes = in_place_writes(u64::from(round));
        let mut next = current.clone();
        apply(&mut next, &writes);
        let f = write_in_place(&node.path(name), &writes, 0);
        if synced {
            f.sync_all().unwrap();
        }
        drop(f);
        let delay = match round / 2 {
            0 => Duration::ZERO,
            n => COMMIT_KILL_FIRST_DELAY * (1 << (n - 1)),
        };
        std::thread::sleep(delay);
        node.kill9();
        node.mount();
        let what = format!("round {round} (killed {delay:?} after the close, synced: {synced})");
        let got = read_hash(&node, name, &what);
        if got == (next.len() as u64, blake3::hash(&next)) {
            kept_new += 1;
            current = next;
        } else {
            assert!(
                !synced && got == (current.len() as u64, blake3::hash(&current)),
                "{what}: {name} is {} ({} bytes)\n{}",
                if synced {
                    "not the synced version"
                } else {
                    "neither version"
                },
                got.0,
                node.log()
            );
            kept_old += 1;
        }
        assert_staging_empty(&node, &what);
    }
    eprintln!(
        "killed around the commit: {kept_old} rounds kept the old version, {kept_new} the new"
    );
}
