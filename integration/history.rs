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
