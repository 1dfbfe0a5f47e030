//! Pinning (`btfs pin`): a pinned directory is fetched whole on the node
//! that pins it, follows new files without a read, survives `cache_size`
//! pressure that evicts unpinned content, and is let go by `btfs unpin`.

use std::{path::Path, time::Duration};

use super::*;
use common::{btfs_err, btfs_ok};
use content::{object_of, same_bytes};

fn wait_listed(path: &Path, size: u64) {
    eventually(
        Duration::from_secs(30),
        "the file listed with its size",
        || std::fs::metadata(path).map(|m| m.len()).ok() == Some(size),
    );
}

/// The pins `btfs status --json` lists: (path, files, files held).
fn pins_of(node: &NsNode) -> Vec<(String, u64, u64)> {
    node.status()["pins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["path"].as_str().unwrap().to_owned(),
                p["files"].as_u64().unwrap(),
                p["files_held"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn a_pinned_directory_is_complete_follows_new_files_and_survives_cache_pressure() {
    let (_keys, _net, nodes) = cluster_with(&["", ",cache_size=20M"]);
    let (a, b) = (&nodes[0], &nodes[1]);
    // 18 MiB pinned (24 MiB with the file that comes later), 24 MiB not:
    // together far over B's cache_size of 20 MiB.
    std::fs::create_dir_all(a.mnt.join("pinned/sub")).unwrap();
    std::fs::create_dir(a.mnt.join("other")).unwrap();
    let pinned: Vec<(&str, Vec<u8>)> = vec![
        ("pinned/a.bin", common::pattern(60, 6 << 20)),
        ("pinned/b.bin", common::pattern(61, 6 << 20)),
        ("pinned/sub/c.bin", common::pattern(62, 6 << 20)),
    ];
    let other: Vec<(String, Vec<u8>)> = (0..3)
        .map(|i| (format!("other/f{i}"), common::pattern(70 + i, 8 << 20)))
        .collect();
    for (name, data) in &pinned {
        std::fs::write(a.mnt.join(name), data).unwrap();
    }
    for (name, data) in &other {
        std::fs::write(a.mnt.join(name), data).unwrap();
    }
    for (name, data) in &pinned {
        wait_listed(&b.mnt.join(name), data.len() as u64);
    }
    assert!(pinned.iter().all(|(_, d)| !object_of(b, d).exists()));

    // Pinned: every file comes whole, without a read.
    let dir = b.mnt.join("pinned");
    let said = btfs_ok(&["pin", dir.to_str().unwrap()]);
    assert!(
        said.contains("pinned") && said.contains("3 files"),
        "{said}"
    );
    let started = Instant::now();
    eventually(
        Duration::from_secs(60),
        "every pinned file held on B",
        || pinned.iter().all(|(_, d)| object_of(b, d).exists()),
    );
    eprintln!(
        "3 pinned files of 6 MiB held on B after {:?}",
        started.elapsed()
    );
    eventually(
        Duration::from_secs(70),
        "the status counts them held",
        || pins_of(b) == [("pinned".to_owned(), 3, 3)],
    );
    let text =
        String::from_utf8_lossy(&btfs(&["status", b.mnt.to_str().unwrap()]).stdout).into_owned();
    assert!(text.contains("pinned"), "{text}");

    // A new version under the pin arrives whole, without a read.
    let new = common::pattern(63, 6 << 20);
    std::fs::write(a.mnt.join("pinned/sub/new.bin"), &new).unwrap();
    let started = Instant::now();
    eventually(
        Duration::from_secs(60),
        "the new pinned file held on B",
        || object_of(b, &new).exists(),
    );
    eprintln!(
        "a new 6 MiB file under the pin held on B after {:?}",
        started.elapsed()
    );

    // Cache pressure: unpinned content read on B is evicted, all of it
    // (24 MiB pinned already exceed 20 MiB), the pinned content is not.
    for (name, data) in &other {
        let p = b.mnt.join(name);
        wait_listed(&p, data.len() as u64);
        assert!(same_bytes(&p, data));
        eventually(Duration::from_secs(30), "read in full", || {
            object_of(b, data).exists()
        });
    }
    let started = Instant::now();
    eventually(
        Duration::from_secs(90),
        "every unpinned file evicted from B",
        || other.iter().all(|(_, d)| !object_of(b, d).exists()),
    );
    eprintln!("unpinned content evicted after {:?}", started.elapsed());
    for (name, data) in &pinned {
        assert!(
            object_of(b, data).exists(),
            "{name} was evicted while pinned"
        );
    }
    assert!(
        object_of(b, &new).exists(),
        "the new file was evicted while pinned"
    );
    assert!(
        b.log().contains("exceeds cache_size"),
        "no warning that pinned content keeps the cache over its size"
    );

    // Held here: readable with A unreachable.
    set_link(&a.ns, false);
    for (name, data) in &pinned {
        assert!(same_bytes(&b.mnt.join(name), data), "{name} differs on B");
    }
    assert!(same_bytes(&b.mnt.join("pinned/sub/new.bin"), &new));
    set_link(&a.ns, true);

    // Unpinned: listed no more, and a cache entry like any other again.
    assert!(btfs_ok(&["unpin", dir.to_str().unwrap()]).contains("unpinned"));
    assert!(pins_of(b).is_empty());
    eventually(
        Duration::from_secs(90),
        "formerly pinned content evicted",
        || {
            pinned
                .iter()
                .map(|(_, d)| d)
                .chain([&new])
                .any(|d| !object_of(b, d).exists())
        },
    );
}

#[test]
fn pins_of_bad_paths_fail_clearly_and_pins_survive_a_restart() {
    let (_keys, _net, mut nodes) = cluster_with(&[""]);
    let mnt = nodes[0].mnt.clone();
    std::fs::create_dir(mnt.join("docs")).unwrap();
    std::fs::write(mnt.join("docs/note.txt"), b"kept").unwrap();

    let outside = tempfile::tempdir().unwrap();
    let err = btfs_err(&["pin", outside.path().to_str().unwrap()]);
    assert!(err.contains("is not in a btfs mount"), "{err}");
    let missing = mnt.join("missing");
    let err = btfs_err(&["pin", missing.to_str().unwrap()]);
    assert!(
        err.contains("is not accessible") && err.contains("No such file"),
        "{err}"
    );
    let err = btfs_err(&["unpin", mnt.join("docs/note.txt").to_str().unwrap()]);
    assert!(err.contains("docs/note.txt: not pinned"), "{err}");
    // One bad path among good ones: the good ones are pinned, the command
    // fails.
    let err = btfs_err(&[
        "pin",
        mnt.join("docs").to_str().unwrap(),
        missing.to_str().unwrap(),
        mnt.to_str().unwrap(),
    ]);
    assert!(err.contains("1 of 3 paths not pinned"), "{err}");
    assert_eq!(
        pins_of(&nodes[0])
            .into_iter()
            .map(|p| p.0)
            .collect::<Vec<_>>(),
        ["/", "docs"]
    );
    let err = btfs_err(&["unpin", mnt.join("docs/note.txt").to_str().unwrap()]);
    assert!(
        err.contains("docs/note.txt: not pinned itself, but under the pin /"),
        "{err}"
    );

    // Kept in the state dir: still pinned after a crash (the tree written
    // just before it may be lost: the store was not flushed).
    nodes[0].crash_and_restart();
    let paths: Vec<String> = pins_of(&nodes[0]).into_iter().map(|p| p.0).collect();
    assert_eq!(paths, ["/", "docs"]);
    // A pinned directory that is gone can still be unpinned.
    let _ = std::fs::remove_dir_all(mnt.join("docs"));
    assert!(!mnt.join("docs").exists());
    btfs_ok(&[
        "unpin",
        mnt.join("docs").to_str().unwrap(),
        mnt.to_str().unwrap(),
    ]);
    assert!(pins_of(&nodes[0]).is_empty());
}
