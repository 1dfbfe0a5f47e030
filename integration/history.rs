//! Version history across nodes: a node that never held an old version
//! restores it, its content fetched from the member whose history kept it,
//! and the restored version replicates back like any write.

use std::time::Duration;

use super::*;
use common::btfs_ok as ok;

fn read(path: &Path) -> Option<Vec<u8>> {
    std::fs::read(path).ok()
}

#[test]
fn an_overwritten_and_a_deleted_file_are_restored_with_identical_bytes_on_another_node() {
    let (_keys, _net, nodes) = cluster_with(&[",history=1h", ",history=1h"]);
    let (a, b) = (&nodes[0], &nodes[1]);
    let f1 = common::pattern(21, 3 << 20);
    let f2 = common::pattern(22, 1 << 20);
    let g1 = common::pattern(23, 2 << 20);
    std::fs::write(a.mnt.join("f.bin"), &f1).unwrap();
    std::fs::write(a.mnt.join("g.bin"), &g1).unwrap();
    eventually(Duration::from_secs(20), "both files listed on B", || {
        std::fs::metadata(b.mnt.join("f.bin")).map(|m| m.len()).ok() == Some(f1.len() as u64)
            && std::fs::metadata(b.mnt.join("g.bin")).map(|m| m.len()).ok() == Some(g1.len() as u64)
    });
    // B never reads them: it holds neither old version.
    std::fs::write(a.mnt.join("f.bin"), &f2).unwrap();
    std::fs::remove_file(a.mnt.join("g.bin")).unwrap();
    eventually(
        Duration::from_secs(20),
        "the overwrite and the delete on B",
        || {
            std::fs::metadata(b.mnt.join("f.bin")).map(|m| m.len()).ok() == Some(f2.len() as u64)
                && !b.mnt.join("g.bin").exists()
        },
    );

    // B's log knows the old versions, held by A only.
    let out = ok(&["log", b.mnt.join("f.bin").to_str().unwrap(), "--json"]);
    let log: Vec<serde_json::Value> = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert!(log.len() >= 2, "{log:?}");
    assert_eq!(
        log[1]["content"].as_str().unwrap(),
        blake3::hash(&f1).to_hex().as_str()
    );
    assert_eq!(log[1]["held_here"], false, "{log:?}");
    assert_eq!(log[1]["author"].as_str().unwrap(), a.node_id());

    let out = ok(&["restore", b.mnt.join("f.bin").to_str().unwrap()]);
    assert!(out.contains("fetched from members"), "{out}");
    let out = ok(&["restore", b.mnt.join("g.bin").to_str().unwrap()]);
    assert!(out.contains("fetched from members"), "{out}");
    assert_eq!(read(&b.mnt.join("f.bin")).unwrap(), f1);
    assert_eq!(read(&b.mnt.join("g.bin")).unwrap(), g1);
    // The restored versions replicate to A like any write.
    eventually(
        Duration::from_secs(30),
        "the restored versions on A",
        || {
            read(&a.mnt.join("f.bin")).as_deref() == Some(&f1[..])
                && read(&a.mnt.join("g.bin")).as_deref() == Some(&g1[..])
        },
    );
    // Kept space shows in status on both.
    assert!(a.counter("history_versions") >= 2);
    assert!(b.counter("history_bytes") > 0);
}

#[test]
fn a_restore_whose_content_no_member_kept_fails_with_a_reason_and_changes_nothing() {
    // A keeps no history: the superseded version is collected there.
    let (_keys, _net, nodes) = cluster_with(&["", ",history=1h"]);
    let (a, b) = (&nodes[0], &nodes[1]);
    let v1 = common::pattern(31, 1 << 20);
    std::fs::write(a.mnt.join("f"), &v1).unwrap();
    eventually(Duration::from_secs(20), "f listed on B", || {
        std::fs::metadata(b.mnt.join("f")).map(|m| m.len()).ok() == Some(1 << 20)
    });
    let v2 = b"second".to_vec();
    std::fs::write(a.mnt.join("f"), &v2).unwrap();
    // (Sizes only: a read would fetch the old version to B.)
    eventually(Duration::from_secs(20), "the overwrite on B", || {
        std::fs::metadata(b.mnt.join("f")).map(|m| m.len()).ok() == Some(v2.len() as u64)
    });
    let object = super::content::object_of(a, &v1);
    eventually(
        Duration::from_secs(20),
        "A collected the old version",
        || !object.exists(),
    );
    let out = btfs(&["restore", b.mnt.join("f").to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no member gave it") || err.contains("did not arrive"),
        "{err}"
    );
    assert_eq!(read(&b.mnt.join("f")).unwrap(), v2);
}

#[test]
fn cache_pressure_never_evicts_the_only_copy_of_a_version_inside_the_history_window() {
    // A keeps no history: once it overwrites f, B's copy of the old version
    // is the only one left, and B's cache is far smaller than what it reads.
    let (_keys, _net, nodes) = cluster_with(&["", ",history=1h,cache_size=4M"]);
    let (a, b) = (&nodes[0], &nodes[1]);
    let f1 = common::pattern(41, 3 << 20);
    std::fs::write(a.mnt.join("f"), &f1).unwrap();
    eventually(Duration::from_secs(20), "f listed on B", || {
        std::fs::metadata(b.mnt.join("f")).map(|m| m.len()).ok() == Some(f1.len() as u64)
    });
    assert_eq!(read(&b.mnt.join("f")).unwrap(), f1, "B fetched f");
    let v2 = b"the second version".to_vec();
    std::fs::write(a.mnt.join("f"), &v2).unwrap();
    eventually(Duration::from_secs(20), "the overwrite on B", || {
        read(&b.mnt.join("f")).as_deref() == Some(&v2[..])
    });
    let kept = super::content::object_of(b, &f1);
    assert!(kept.exists(), "B's history keeps its copy of f1");

    // Other content, read on B, fills its cache past cache_size.
    let others: Vec<Vec<u8>> = (0..3).map(|i| common::pattern(50 + i, 3 << 20)).collect();
    for (i, data) in others.iter().enumerate() {
        std::fs::write(a.mnt.join(format!("o{i}")), data).unwrap();
    }
    for (i, data) in others.iter().enumerate() {
        let p = b.mnt.join(format!("o{i}"));
        eventually(Duration::from_secs(20), "o listed on B", || {
            std::fs::metadata(&p).map(|m| m.len()).ok() == Some(data.len() as u64)
        });
        assert_eq!(read(&p).unwrap(), *data);
    }
    // The cache is measured every few seconds: unpinned, unkept content
    // goes; the old version of f stays.
    eventually(Duration::from_secs(60), "B evicted what it may", || {
        others
            .iter()
            .filter(|d| super::content::object_of(b, d).exists())
            .count()
            <= 1
    });
    assert!(kept.exists(), "cache_size evicted the only copy of f1");
    let out = ok(&["restore", b.mnt.join("f").to_str().unwrap()]);
    assert!(!out.contains("fetched from members"), "{out}");
    assert_eq!(read(&b.mnt.join("f")).unwrap(), f1);
}
