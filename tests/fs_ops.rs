//! Filesystem behaviour through a real FUSE mount, with std::fs and syscalls.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    collections::BTreeMap,
    fs::{self, File, OpenOptions},
    io::{Read, Seek, SeekFrom, Write},
    os::unix::fs::{FileExt, MetadataExt, PermissionsExt},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, UNIX_EPOCH},
};

use common::{Node, pattern, run_ok};

fn errno_of(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

fn files_round_trip(node: &Node) {
    let p = node.path("hello.txt");
    fs::write(&p, b"hello world").unwrap();
    assert_eq!(fs::read(&p).unwrap(), b"hello world");
    assert_eq!(fs::metadata(&p).unwrap().len(), 11);

    // Append, then overwrite in place, then truncate by O_TRUNC.
    OpenOptions::new()
        .append(true)
        .open(&p)
        .unwrap()
        .write_all(b"!!")
        .unwrap();
    assert_eq!(fs::read(&p).unwrap(), b"hello world!!");
    let f = OpenOptions::new().write(true).open(&p).unwrap();
    f.write_all_at(b"J", 0).unwrap();
    drop(f);
    assert_eq!(fs::read(&p).unwrap(), b"Jello world!!");
    fs::write(&p, b"short").unwrap();
    assert_eq!(fs::read(&p).unwrap(), b"short");

    // Read-after-write across two handles of one file.
    let mut a = OpenOptions::new().read(true).write(true).open(&p).unwrap();
    let b = File::open(&p).unwrap();
    a.seek(SeekFrom::End(0)).unwrap();
    a.write_all(b" and more").unwrap();
    let mut buf = vec![0; 14];
    b.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"short and more");
    drop((a, b));

    // Sparse write far into the file.
    let f = OpenOptions::new().write(true).open(&p).unwrap();
    f.write_all_at(b"tail", 1 << 20).unwrap();
    drop(f);
    let data = fs::read(&p).unwrap();
    assert_eq!(data.len(), (1 << 20) + 4);
    assert!(data[14..1 << 20].iter().all(|b| *b == 0));
    assert_eq!(&data[1 << 20..], b"tail");

    // An empty file.
    File::create(node.path("empty")).unwrap();
    assert_eq!(fs::read(node.path("empty")).unwrap(), b"");
}

#[test]
fn files_write_read_append_and_truncate() {
    files_round_trip(&Node::start());
}

#[test]
fn files_without_passthrough_use_the_daemon_data_path() {
    let node = Node::start_with("passthrough=off");
    assert_eq!(node.status()["passthrough"], false);
    files_round_trip(&node);
}

#[test]
fn attributes_chmod_chown_truncate_and_times() {
    let node = Node::start();
    let p = node.path("f");
    fs::write(&p, b"0123456789").unwrap();
    let ino = fs::metadata(&p).unwrap().ino();

    fs::set_permissions(&p, fs::Permissions::from_mode(0o640)).unwrap();
    assert_eq!(fs::metadata(&p).unwrap().mode() & 0o7777, 0o640);
    std::os::unix::fs::chown(&p, Some(1234), Some(5678)).unwrap();
    let m = fs::metadata(&p).unwrap();
    assert_eq!((m.uid(), m.gid()), (1234, 5678));

    // chown clears set-user-id, and set-group-id when group-executable.
    for (before, after) in [(0o4755, 0o755), (0o6755, 0o755), (0o2745, 0o2745)] {
        fs::set_permissions(&p, fs::Permissions::from_mode(before)).unwrap();
        std::os::unix::fs::chown(&p, Some(1234), None).unwrap();
        assert_eq!(
            fs::metadata(&p).unwrap().mode() & 0o7777,
            after,
            "chown of {before:o}"
        );
    }
    fs::set_permissions(&p, fs::Permissions::from_mode(0o640)).unwrap();

    // truncate(2) without an open handle, then ftruncate on one.
    File::options()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(4)
        .unwrap();
    assert_eq!(fs::read(&p).unwrap(), b"0123");
    nix::unistd::truncate(&p, 2).unwrap();
    assert_eq!(fs::read(&p).unwrap(), b"01");
    nix::unistd::truncate(&p, 6).unwrap();
    assert_eq!(fs::read(&p).unwrap(), b"01\0\0\0\0");

    // utimens, also while the file is open for writing (cp -p style).
    let t = UNIX_EPOCH + Duration::new(1_000_000_000, 123_456_789);
    File::options()
        .write(true)
        .open(&p)
        .unwrap()
        .set_modified(t)
        .unwrap();
    assert_eq!(fs::metadata(&p).unwrap().modified().unwrap(), t);
    let f = File::options().write(true).open(&p).unwrap();
    f.write_all_at(b"x", 0).unwrap();
    let t2 = UNIX_EPOCH + Duration::from_secs(1_500_000_000);
    f.set_times(fs::FileTimes::new().set_modified(t2).set_accessed(t2))
        .unwrap();
    drop(f);
    let m = fs::metadata(&p).unwrap();
    assert_eq!(m.modified().unwrap(), t2);
    assert_eq!(m.accessed().unwrap(), t2);
    assert_eq!(fs::read(&p).unwrap(), b"x1\0\0\0\0");
    assert_eq!(
        m.ino(),
        ino,
        "inode numbers do not change with new versions"
    );

    // Writes move mtime forward.
    let before = fs::metadata(&p).unwrap().modified().unwrap();
    fs::write(&p, b"new").unwrap();
    assert!(fs::metadata(&p).unwrap().modified().unwrap() > before);
}

#[test]
fn directories_mkdir_rmdir_and_listing() {
    let node = Node::start();
    fs::create_dir_all(node.path("a/b/c")).unwrap();
    for name in ["z", "y", "x"] {
        fs::write(node.path(&format!("a/{name}")), name).unwrap();
    }
    let names: Vec<String> = fs::read_dir(node.path("a"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(sorted, ["b", "x", "y", "z"]);
    let e = fs::read_dir(node.path("a"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    assert!(e.file_type().is_ok());

    assert_eq!(
        errno_of(&fs::remove_dir(node.path("a/b")).unwrap_err()),
        libc::ENOTEMPTY
    );
    assert_eq!(
        errno_of(&fs::create_dir(node.path("a/b")).unwrap_err()),
        libc::EEXIST
    );
    assert_eq!(
        errno_of(&fs::read_dir(node.path("a/x")).unwrap_err()),
        libc::ENOTDIR
    );
    assert_eq!(
        errno_of(&fs::remove_file(node.path("a/b")).unwrap_err()),
        libc::EISDIR
    );
    fs::remove_dir(node.path("a/b/c")).unwrap();
    fs::remove_dir(node.path("a/b")).unwrap();
    assert!(!node.path("a/b").exists());
    assert_eq!(
        errno_of(&fs::metadata(node.path("nope")).unwrap_err()),
        libc::ENOENT
    );
    let long = "n".repeat(256);
    assert_eq!(
        errno_of(&fs::write(node.path(&long), b"").unwrap_err()),
        libc::ENAMETOOLONG
    );

    // A removed name can be created again, as another kind.
    fs::remove_file(node.path("a/x")).unwrap();
    fs::create_dir(node.path("a/x")).unwrap();
    assert!(fs::metadata(node.path("a/x")).unwrap().is_dir());
}

#[test]
fn rename_replaces_atomically_and_moves_directories() {
    let node = Node::start();
    fs::write(node.path("src"), b"new").unwrap();
    fs::write(node.path("dst"), b"old").unwrap();
    let ino = fs::metadata(node.path("src")).unwrap().ino();
    fs::rename(node.path("src"), node.path("dst")).unwrap();
    assert_eq!(fs::read(node.path("dst")).unwrap(), b"new");
    assert_eq!(
        fs::metadata(node.path("dst")).unwrap().ino(),
        ino,
        "rename keeps the inode"
    );
    assert!(!node.path("src").exists());

    // RENAME_NOREPLACE refuses to replace; RENAME_EXCHANGE is refused.
    fs::write(node.path("other"), b"o").unwrap();
    let noreplace = nix::fcntl::renameat2(
        nix::fcntl::AT_FDCWD,
        &node.path("other"),
        nix::fcntl::AT_FDCWD,
        &node.path("dst"),
        nix::fcntl::RenameFlags::RENAME_NOREPLACE,
    );
    assert_eq!(noreplace, Err(nix::errno::Errno::EEXIST));
    nix::fcntl::renameat2(
        nix::fcntl::AT_FDCWD,
        &node.path("other"),
        nix::fcntl::AT_FDCWD,
        &node.path("fresh"),
        nix::fcntl::RenameFlags::RENAME_NOREPLACE,
    )
    .unwrap();

    // Directory with contents, into another directory.
    fs::create_dir_all(node.path("d1/sub")).unwrap();
    fs::write(node.path("d1/sub/f"), b"deep").unwrap();
    fs::write(node.path("d1/g"), b"g").unwrap();
    fs::create_dir(node.path("d2")).unwrap();
    let sub_ino = fs::metadata(node.path("d1/sub/f")).unwrap().ino();
    fs::rename(node.path("d1"), node.path("d2/moved")).unwrap();
    assert_eq!(fs::read(node.path("d2/moved/sub/f")).unwrap(), b"deep");
    assert_eq!(fs::read(node.path("d2/moved/g")).unwrap(), b"g");
    assert_eq!(
        fs::metadata(node.path("d2/moved/sub/f")).unwrap().ino(),
        sub_ino
    );
    assert!(!node.path("d1").exists());
    assert_eq!(
        errno_of(&fs::rename(node.path("d2"), node.path("d2/moved/inside")).unwrap_err()),
        libc::EINVAL
    );
    // Directory over an empty directory; not over a non-empty one.
    fs::create_dir(node.path("empty")).unwrap();
    fs::rename(node.path("d2/moved/sub"), node.path("empty")).unwrap();
    assert_eq!(fs::read(node.path("empty/f")).unwrap(), b"deep");
    fs::create_dir(node.path("d3")).unwrap();
    assert_eq!(
        errno_of(&fs::rename(node.path("d3"), node.path("d2")).unwrap_err()),
        libc::ENOTEMPTY
    );
}

#[test]
fn symlinks_store_their_target() {
    let node = Node::start();
    fs::write(node.path("target"), b"t").unwrap();
    std::os::unix::fs::symlink("target", node.path("link")).unwrap();
    std::os::unix::fs::symlink("/absolute/elsewhere", node.path("abs")).unwrap();
    assert_eq!(
        fs::read_link(node.path("link")).unwrap(),
        Path::new("target")
    );
    assert_eq!(fs::read(node.path("link")).unwrap(), b"t");
    assert!(
        fs::symlink_metadata(node.path("abs"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_eq!(
        fs::read_link(node.path("abs")).unwrap(),
        Path::new("/absolute/elsewhere")
    );
}

#[test]
fn unsupported_kinds_fail_with_clear_errnos() {
    let node = Node::start();
    fs::write(node.path("f"), b"x").unwrap();
    let link = fs::hard_link(node.path("f"), node.path("hard")).unwrap_err();
    assert_eq!(errno_of(&link), libc::EPERM, "hard links are refused");
    let fifo = nix::unistd::mkfifo(
        &node.path("fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    );
    assert_eq!(fifo, Err(nix::errno::Errno::EPERM), "FIFOs are refused");
    let dev = nix::sys::stat::mknod(
        &node.path("dev"),
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o644),
        nix::sys::stat::makedev(1, 3),
    );
    assert_eq!(
        dev,
        Err(nix::errno::Errno::EPERM),
        "device nodes are refused"
    );
    let c = std::ffi::CString::new(node.path("f").to_str().unwrap()).unwrap();
    let rc = unsafe { libc::setxattr(c.as_ptr(), c"user.k".as_ptr(), b"v".as_ptr().cast(), 1, 0) };
    assert_eq!(rc, -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::EOPNOTSUPP)
    );
    // Nothing was left behind by the refused operations.
    let names: Vec<_> = fs::read_dir(&node.mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["f"]);
}

#[test]
fn statfs_reports_the_state_filesystem() {
    let node = Node::start();
    let mounted = nix::sys::statvfs::statvfs(&node.mnt).unwrap();
    let state = nix::sys::statvfs::statvfs(&node.state).unwrap();
    assert_eq!(mounted.blocks(), state.blocks());
    assert!(mounted.blocks_available() > 0);
    assert_eq!(mounted.name_max(), 255);
}

#[test]
fn tree_contents_and_inodes_survive_remount() {
    let mut node = Node::start();
    fs::create_dir_all(node.path("etc/conf.d")).unwrap();
    let mut expected = BTreeMap::new();
    for i in 0..50u64 {
        let rel = format!("etc/conf.d/file{i}");
        let data = pattern(i, (i as usize) * 997);
        fs::write(node.path(&rel), &data).unwrap();
        expected.insert(rel, data);
    }
    std::os::unix::fs::symlink("conf.d/file1", node.path("etc/link")).unwrap();
    fs::set_permissions(node.path("etc"), fs::Permissions::from_mode(0o750)).unwrap();
    let inodes: BTreeMap<_, _> = expected
        .keys()
        .map(|k| (k.clone(), fs::metadata(node.path(k)).unwrap().ino()))
        .collect();
    let mtime = fs::metadata(node.path("etc/conf.d/file7"))
        .unwrap()
        .modified()
        .unwrap();

    node.remount();

    for (rel, data) in &expected {
        assert_eq!(&fs::read(node.path(rel)).unwrap(), data, "{rel}");
        assert_eq!(
            fs::metadata(node.path(rel)).unwrap().ino(),
            inodes[rel],
            "inode of {rel}"
        );
    }
    assert_eq!(
        fs::read_link(node.path("etc/link")).unwrap(),
        Path::new("conf.d/file1")
    );
    assert_eq!(
        fs::metadata(node.path("etc")).unwrap().mode() & 0o7777,
        0o750
    );
    assert_eq!(
        fs::metadata(node.path("etc/conf.d/file7"))
            .unwrap()
            .modified()
            .unwrap(),
        mtime
    );
    // New files after a remount get fresh inode numbers.
    fs::write(node.path("new"), b"n").unwrap();
    let new_ino = fs::metadata(node.path("new")).unwrap().ino();
    assert!(!inodes.values().any(|i| *i == new_ino));
}

#[test]
fn atomic_save_is_seen_whole_by_readers() {
    let node = Node::start();
    let target = node.path("doc.txt");
    let version = |v: u32| format!("version {v:05}\n").repeat(200 + (v as usize % 7) * 100);
    fs::write(&target, version(0)).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (stop, target) = (stop.clone(), target.clone());
        std::thread::spawn(move || {
            let mut reads = 0;
            while !stop.load(Ordering::Relaxed) {
                let data = fs::read_to_string(&target).expect("target always exists");
                let first = data.lines().next().expect("never empty").to_owned();
                let v: u32 = first.trim_start_matches("version ").parse().unwrap();
                let want = version(v);
                assert!(
                    data == want,
                    "torn read of version {v}: {} bytes, expected {}",
                    data.len(),
                    want.len()
                );
                reads += 1;
            }
            reads
        })
    };
    for v in 1..=60 {
        let tmp = node.path(".doc.txt.swp");
        let mut f = File::create(&tmp).unwrap();
        f.write_all(version(v).as_bytes()).unwrap();
        f.sync_all().unwrap();
        drop(f);
        fs::rename(&tmp, &target).unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    assert!(reader.join().unwrap() > 0);
    assert_eq!(fs::read_to_string(&target).unwrap(), version(60));
    assert!(!node.path(".doc.txt.swp").exists());
}

#[test]
fn two_thousand_small_files() {
    let mut node = Node::start();
    fs::create_dir(node.path("many")).unwrap();
    for i in 0..2000u64 {
        fs::write(
            node.path(&format!("many/f{i:04}")),
            pattern(i, 64 + (i as usize % 4096)),
        )
        .unwrap();
    }
    let count = fs::read_dir(node.path("many")).unwrap().count();
    assert_eq!(count, 2000);
    node.remount();
    for i in (0..2000u64).step_by(7) {
        assert_eq!(
            fs::read(node.path(&format!("many/f{i:04}"))).unwrap(),
            pattern(i, 64 + (i as usize % 4096))
        );
    }
    assert_eq!(node.status()["files"], 2000);
    fs::remove_dir_all(node.path("many")).unwrap();
    assert!(!node.path("many").exists());
    assert_eq!(node.status()["files"], 0);
}

fn random_reads_of_large_file(node: &Node) {
    const SIZE: usize = 64 << 20;
    let data = pattern(42, SIZE);
    let p = node.path("big.bin");
    let mut f = File::create(&p).unwrap();
    for chunk in data.chunks(1 << 20) {
        f.write_all(chunk).unwrap();
    }
    drop(f);
    assert_eq!(fs::metadata(&p).unwrap().len(), SIZE as u64);
    let f = File::open(&p).unwrap();
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    for _ in 0..500 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let off = (x % SIZE as u64) as usize;
        let len = ((x >> 40) as usize % 300_000).min(SIZE - off);
        let mut buf = vec![0u8; len];
        f.read_exact_at(&mut buf, off as u64).unwrap();
        assert!(buf == data[off..off + len], "mismatch at {off}+{len}");
    }
    let mut all = Vec::new();
    File::open(&p).unwrap().read_to_end(&mut all).unwrap();
    assert!(all == data);
}

#[test]
fn large_file_read_back_at_random_offsets() {
    random_reads_of_large_file(&Node::start());
}

#[test]
fn large_file_read_back_at_random_offsets_without_passthrough() {
    random_reads_of_large_file(&Node::start_with("passthrough=off"));
}

#[test]
fn open_unlinked_files_keep_working_until_closed() {
    let node = Node::start();
    let p = node.path("ghost");
    fs::write(&p, b"still here").unwrap();
    let reader = File::open(&p).unwrap();
    let writer = OpenOptions::new()
        .read(true)
        .write(true)
        .open(node.path("ghost"))
        .unwrap();
    fs::remove_file(&p).unwrap();
    assert!(!p.exists());
    let mut buf = vec![0; 10];
    reader.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"still here");
    writer.write_all_at(b"STILL", 0).unwrap();
    writer.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"STILL here");
    assert_eq!(writer.metadata().unwrap().nlink(), 0);
    drop((reader, writer));
    // Nothing reappears and the name is free again.
    assert!(!p.exists());
    fs::write(&p, b"new").unwrap();
    assert_eq!(fs::read(&p).unwrap(), b"new");
}

#[test]
fn replaced_and_deleted_content_is_collected() {
    let node = Node::start();
    let objects = |node: &Node| -> usize {
        walk(&node.state.join("objects"))
            .into_iter()
            .filter(|p| p.is_file())
            .count()
    };
    // Released objects are deleted within a second or so (after the store is
    // flushed, and after the kernel forgets unlinked inodes).
    let expect_objects = |n: usize| {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while objects(&node) != n {
            assert!(
                std::time::Instant::now() < deadline,
                "expected {n} objects, have {}",
                objects(&node)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    for v in 0..5u64 {
        fs::write(node.path("f"), pattern(v, 10_000)).unwrap();
    }
    fs::write(node.path("g"), pattern(4, 10_000)).unwrap(); // same content as f: one object
    expect_objects(1);
    fs::remove_file(node.path("f")).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    expect_objects(1);
    fs::remove_file(node.path("g")).unwrap();
    expect_objects(0);
    assert_eq!(fs::read_dir(node.state.join("staging")).unwrap().count(), 0);
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn mmap_and_concurrent_writers() {
    let node = Node::start();
    let p = node.path("m");
    fs::write(&p, vec![b'a'; 8192]).unwrap();
    // Shared writable mapping: changes land in the file.
    let f = OpenOptions::new().read(true).write(true).open(&p).unwrap();
    unsafe {
        let len = std::num::NonZeroUsize::new(8192).unwrap();
        let ptr = nix::sys::mman::mmap(
            None,
            len,
            nix::sys::mman::ProtFlags::PROT_READ | nix::sys::mman::ProtFlags::PROT_WRITE,
            nix::sys::mman::MapFlags::MAP_SHARED,
            &f,
            0,
        )
        .unwrap();
        std::ptr::write_bytes(ptr.as_ptr().cast::<u8>(), b'z', 10);
        nix::sys::mman::msync(ptr, 8192, nix::sys::mman::MsFlags::MS_SYNC).unwrap();
        nix::sys::mman::munmap(ptr, 8192).unwrap();
    }
    drop(f);
    let data = fs::read(&p).unwrap();
    assert_eq!(&data[..11], b"zzzzzzzzzza");

    // Several threads writing their own files at once.
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let dir = node.mnt.clone();
            std::thread::spawn(move || {
                for i in 0..50u64 {
                    let p = dir.join(format!("t{t}-{i}"));
                    fs::write(&p, pattern(t * 100 + i, 5000)).unwrap();
                    assert_eq!(fs::read(&p).unwrap(), pattern(t * 100 + i, 5000));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(fs::read_dir(&node.mnt).unwrap().count(), 201);
}

#[test]
fn writers_next_to_readers_never_change_shared_content() {
    let node = Node::start();
    let (a, b) = (node.path("a"), node.path("b"));
    fs::write(&a, b"same bytes").unwrap();
    fs::write(&b, b"same bytes").unwrap(); // one object for both paths
    let read_a = File::open(&a).unwrap();
    let read_b = File::open(&b).unwrap();
    let mut buf = [0u8; 10];
    read_a.read_exact_at(&mut buf, 0).unwrap();
    read_b.read_exact_at(&mut buf, 0).unwrap();

    let writer = OpenOptions::new().write(true).open(&a).unwrap();
    writer.write_all_at(b"SAME", 0).unwrap();
    read_a.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"SAME bytes", "a reader sees writes to its own file");
    read_b.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(
        &buf, b"same bytes",
        "another path with the same content is untouched"
    );
    drop(writer);

    assert_eq!(fs::read(&a).unwrap(), b"SAME bytes");
    assert_eq!(fs::read(&b).unwrap(), b"same bytes");
    drop((read_a, read_b));
    assert_eq!(fs::read(&b).unwrap(), b"same bytes");
    fs::write(node.path("c"), b"same bytes").unwrap();
    assert_eq!(fs::read(node.path("c")).unwrap(), b"same bytes");
}

#[test]
fn ordinary_tools_copy_archive_and_sync_trees() {
    let mut node = Node::start();
    // A source tree with nested directories, a symlink, modes and times.
    let src = tempfile::tempdir().unwrap();
    let s = src.path();
    fs::create_dir_all(s.join("a/b/c")).unwrap();
    for i in 0..30u64 {
        fs::write(
            s.join(format!("a/b/f{i}")),
            pattern(i, 1000 + i as usize * 3000),
        )
        .unwrap();
    }
    fs::write(s.join("a/b/c/script.sh"), b"#!/bin/sh\necho hi\n").unwrap();
    fs::set_permissions(s.join("a/b/c/script.sh"), fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink("b/f1", s.join("a/link")).unwrap();
    let t = UNIX_EPOCH + Duration::from_secs(1_600_000_000);
    File::options()
        .write(true)
        .open(s.join("a/b/f2"))
        .unwrap()
        .set_modified(t)
        .unwrap();

    let m = node.mnt.clone();
    let (sa, ms) = (format!("{}/a", s.display()), m.to_str().unwrap().to_owned());
    run_ok("cp", &["-a", &sa, &format!("{ms}/cp")]);
    run_ok(
        "tar",
        &[
            "-C",
            s.to_str().unwrap(),
            "-cf",
            &format!("{ms}/a.tar"),
            "a",
        ],
    );
    fs::create_dir(m.join("untar")).unwrap();
    run_ok(
        "tar",
        &["-C", &format!("{ms}/untar"), "-xf", &format!("{ms}/a.tar")],
    );
    run_ok("rsync", &["-a", &format!("{sa}/"), &format!("{ms}/rsync/")]);
    // rsync again after a change: it replaces files through temporary names.
    fs::write(s.join("a/b/f3"), b"changed").unwrap();
    run_ok(
        "rsync",
        &["-a", "--delete", &format!("{sa}/"), &format!("{ms}/rsync/")],
    );

    node.remount();
    for copy in ["cp", "untar/a", "rsync"] {
        let d = m.join(copy);
        for i in [0u64, 7, 29] {
            assert_eq!(
                fs::read(d.join(format!("b/f{i}"))).unwrap(),
                pattern(i, 1000 + i as usize * 3000),
                "{copy}"
            );
        }
        assert_eq!(
            fs::read_link(d.join("link")).unwrap(),
            Path::new("b/f1"),
            "{copy}"
        );
        let script = fs::metadata(d.join("b/c/script.sh")).unwrap();
        assert_eq!(script.mode() & 0o777, 0o755, "{copy}");
        assert_eq!(
            fs::metadata(d.join("b/f2")).unwrap().modified().unwrap(),
            t,
            "{copy}"
        );
    }
    assert_eq!(fs::read(m.join("rsync/b/f3")).unwrap(), b"changed");
    run_ok("diff", &["-r", &sa, &format!("{ms}/rsync")]);
}

#[test]
fn a_full_disk_gives_enospc_and_keeps_committed_files() {
    common::require_fuse();
    // The node's state on a 16 MiB tmpfs.
    let dir = tempfile::tempdir().unwrap();
    let small = dir.path().join("small");
    fs::create_dir(&small).unwrap();
    run_ok(
        "mount",
        &[
            "-t",
            "tmpfs",
            "-o",
            "size=16m",
            "tmpfs",
            small.to_str().unwrap(),
        ],
    );
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _tmpfs = Unmount(small.clone());
    let mut node = Node::start_with(&format!("state={}", small.join("state").display()));

    let keep = pattern(1, 1 << 20);
    fs::write(node.path("keep"), &keep).unwrap();
    let err = fs::write(node.path("huge"), pattern(2, 64 << 20)).unwrap_err();
    assert_eq!(errno_of(&err), libc::ENOSPC, "{err}");
    assert_eq!(fs::read(node.path("keep")).unwrap(), keep);
    assert!(node.status()["pid"].is_u64(), "the daemon survives");
    // Room again once the partial file is removed and its object collected
    // (after the store is flushed, within a second or two).
    let _ = fs::remove_file(node.path("huge"));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while {
        let st = nix::sys::statvfs::statvfs(&node.mnt).unwrap();
        st.blocks_available() * st.fragment_size() < 8 << 20
    } {
        assert!(
            std::time::Instant::now() < deadline,
            "space was never freed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    fs::write(node.path("after"), b"fits").unwrap();
    node.remount();
    assert_eq!(fs::read(node.path("keep")).unwrap(), keep);
    assert_eq!(fs::read(node.path("after")).unwrap(), b"fits");
}

/// A write by an unprivileged user clears the set-user-ID bit, and the
/// set-group-ID bit of a group-executable file, as Linux does (pjdfstest's C
/// `chmod/12.t`); root's writes keep them. The daemon sees no passthrough
/// write, so this must hold with passthrough too.
#[test]
fn an_unprivileged_write_clears_set_id_bits() {
    let node = Node::start();
    let parent = node.mnt.parent().unwrap();
    fs::set_permissions(parent, fs::Permissions::from_mode(0o755)).unwrap();
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    for (set, left) in [(0o6777, 0o0777), (0o4777, 0o0777), (0o2767, 0o2767)] {
        let f = node.path("setid");
        fs::write(&f, b"x").unwrap();
        fs::set_permissions(&f, fs::Permissions::from_mode(set)).unwrap();
        // Root writes: the bits stay.
        fs::OpenOptions::new().append(true).open(&f).unwrap();
        assert_eq!(mode(&f), set);
        let out = std::process::Command::new("setpriv")
            .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
            .args(["sh", "-c", "printf y >> \"$0\""])
            .arg(&f)
            .output()
            .expect("setpriv (util-linux)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(fs::read(&f).unwrap(), b"xy");
        assert_eq!(mode(&f), left, "after a write by nobody to a {set:o} file");
        fs::remove_file(&f).unwrap();
    }
}

/// Allocated bytes of the files under `dir` (a sparse delta counts only
/// what was written).
fn allocated_under(dir: &Path) -> u64 {
    let mut total = 0;
    for e in fs::read_dir(dir).unwrap() {
        let m = e.unwrap().metadata().unwrap();
        if m.is_file() {
            total += m.blocks() * 512;
        }
    }
    total
}

#[test]
fn large_files_change_in_place_without_a_copy() {
    let mut node = Node::start();
    let p = node.path("image.bin");
    let size = 24usize << 20;
    let mut model = pattern(7, size);
    fs::write(&p, &model).unwrap();
    let check = |model: &[u8], what: &str| {
        let got = fs::read(&p).unwrap();
        assert_eq!(got.len(), model.len(), "{what}: length");
        assert!(got == model, "{what}: bytes differ");
    };
    let commits = |node: &Node| node.status()["commits"].as_u64().unwrap();

    // A reader that had the file open before a writer sees the writes, as
    // on a local filesystem. With passthrough the kernel allows no other
    // kind of open beside it, so that writer gets a full private copy (the
    // object file itself, detached); without, the daemon serves both.
    let early = File::open(&p).unwrap();
    let mut first = vec![0u8; 4096];
    early.read_exact_at(&mut first, 10 << 20).unwrap();
    assert!(first == model[10 << 20..(10 << 20) + 4096]);
    let w = OpenOptions::new().write(true).open(&p).unwrap();
    w.write_all_at(&[0xAB; 4096], 10 << 20).unwrap();
    let mut again = vec![0u8; 4096];
    early.read_exact_at(&mut again, 10 << 20).unwrap();
    assert_eq!(again, vec![0xAB; 4096], "an earlier reader sees the writes");
    drop(w);
    model[10 << 20..(10 << 20) + 4096].fill(0xAB);
    drop(early);
    check(&model, "a write while a reader had the file open");

    // That writer's private copy goes when the inode's last handle does:
    // the kernel sends the release after close(2) returns.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while fs::read_dir(node.state.join("staging")).unwrap().count() > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the private copy of a closed file stays in staging"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // Opened for writing, a write in the middle: no copy while it is open,
    // and the writer and a reader opened after it read the new bytes.
    let f = OpenOptions::new().read(true).write(true).open(&p).unwrap();
    let patch = pattern(8, 1 << 20);
    f.write_all_at(&patch, 10 << 20).unwrap();
    model[10 << 20..11 << 20].copy_from_slice(&patch);
    let staged = allocated_under(&node.state.join("staging"));
    assert!(
        staged < 4 << 20,
        "a 1 MiB write into a 24 MiB file staged {staged} bytes, not just the write"
    );
    let mut buf = vec![0u8; 2 << 20];
    f.read_exact_at(&mut buf, 9 << 20).unwrap();
    assert!(
        buf == model[9 << 20..11 << 20],
        "the writer reads its writes over the old bytes"
    );
    let r = File::open(&p).unwrap();
    r.read_exact_at(&mut buf, (10 << 20) - 5).unwrap();
    assert!(
        buf == model[(10 << 20) - 5..(12 << 20) - 5],
        "a reader sees the writes"
    );
    drop((f, r));
    check(&model, "overwrite in the middle");

    // Small unaligned writes at the start, the middle and the last byte.
    let f = OpenOptions::new().write(true).open(&p).unwrap();
    for (off, data) in [
        (5usize, &b"abc"[..]),
        ((20 << 20) + 7, &[9u8; 10_000][..]),
        (size - 1, &b"Z"[..]),
    ] {
        f.write_all_at(data, off as u64).unwrap();
        model[off..off + data.len()].copy_from_slice(data);
    }
    drop(f);
    check(&model, "small unaligned writes");

    // Append 1 MiB.
    let tail = pattern(9, 1 << 20);
    OpenOptions::new()
        .append(true)
        .open(&p)
        .unwrap()
        .write_all(&tail)
        .unwrap();
    model.extend_from_slice(&tail);
    check(&model, "append");

    // Cut below a subtree boundary, grow past the old end (a hole of
    // zeros), then a byte past that: all through one writer.
    let f = OpenOptions::new().read(true).write(true).open(&p).unwrap();
    f.set_len((13 << 20) + 333).unwrap();
    model.truncate((13 << 20) + 333);
    f.set_len(30 << 20).unwrap();
    model.resize(30 << 20, 0);
    f.write_all_at(b"!", 31 << 20).unwrap();
    model.resize((31 << 20) + 1, 0);
    model[31 << 20] = b'!';
    f.read_exact_at(&mut buf, (13 << 20) - 1000).unwrap();
    assert!(
        buf == model[(13 << 20) - 1000..(15 << 20) - 1000],
        "a cut then a hole read as zeros"
    );
    drop(f);
    check(&model, "truncate, extend and a write past the end");

    // A truncate by path, with no writer open.
    nix::unistd::truncate(&p, 20 << 20).unwrap();
    model.truncate(20 << 20);
    check(&model, "truncate by path");

    // Opened for writing and closed unwritten: no new version.
    let before = commits(&node);
    drop(OpenOptions::new().write(true).open(&p).unwrap());
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(commits(&node), before, "an unwritten open made a version");
    check(&model, "open and close");

    // What was committed survives a remount, and nothing is left staged.
    node.remount();
    check(&model, "after a remount");
    assert_eq!(
        fs::read_dir(node.state.join("staging")).unwrap().count(),
        0,
        "staging files left behind"
    );
}
