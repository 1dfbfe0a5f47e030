//! `history=`, `btfs log` and `btfs restore` on one node, through a real
//! FUSE mount (the two-node restore is in integration/history.rs).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::{Node, btfs, btfs_err as fails, btfs_ok as ok};

fn log_json(node: &Node, rel: &str) -> Vec<serde_json::Value> {
    let out = ok(&["log", node.path(rel).to_str().unwrap(), "--json"]);
    serde_json::from_str(out.lines().next().unwrap()).unwrap()
}

/// Writes `data` to `rel` and waits until it is the path's committed
/// version (a close is committed shortly after; a version overwritten
/// before its commit is never one).
fn write_version(node: &Node, rel: &str, data: &[u8]) {
    std::fs::write(node.path(rel), data).unwrap();
    let want = blake3::hash(data).to_hex();
    let deadline = Instant::now() + Duration::from_secs(10);
    while log_json(node, rel)[0]["content"].as_str() != Some(want.as_str()) {
        assert!(Instant::now() < deadline, "{rel} was not committed");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn history_versions(node: &Node) -> u64 {
    node.status()["history_versions"].as_u64().unwrap()
}

#[test]
fn overwritten_and_deleted_files_are_listed_and_restored_with_their_bytes() {
    let node = Node::start_with("history=1h");
    let f = node.path("f.txt");
    let (v1, v2) = (b"first version\n".repeat(1000), b"second\n".to_vec());
    write_version(&node, "f.txt", &v1);
    write_version(&node, "f.txt", &v2);
    std::fs::create_dir(node.path("d")).unwrap();
    let g = node.path("d/g.bin");
    let g1 = common::pattern(7, 3 << 20);
    write_version(&node, "d/g.bin", &g1);
    std::fs::remove_file(&g).unwrap();
    std::fs::remove_dir(node.path("d")).unwrap();

    // The log: current first, then history, with content hashes.
    let log = log_json(&node, "f.txt");
    assert_eq!(log[0]["current"], true);
    assert_eq!(log[0]["size"], v2.len() as u64);
    assert_eq!(log[1]["current"], false);
    assert_eq!(log[1]["size"], v1.len() as u64);
    assert_eq!(
        log[1]["content"].as_str().unwrap(),
        blake3::hash(&v1).to_hex().as_str()
    );
    assert_eq!(log[1]["held_here"], true);
    let text = ok(&["log", f.to_str().unwrap()]);
    assert!(
        text.contains("(current)") && text.contains("here"),
        "{text}"
    );
    // A deleted path under a deleted directory is listed too.
    let glog = log_json(&node, "d/g.bin");
    assert_eq!(glog[0]["deleted"], true, "{glog:?}");
    assert_eq!(glog[1]["size"], g1.len() as u64);
    // The empty files that creating them made are versions too.
    assert_eq!(history_versions(&node), 4);

    // Restore the overwritten file (default: the version before).
    ok(&["restore", f.to_str().unwrap()]);
    assert_eq!(std::fs::read(&f).unwrap(), v1);
    // The restore is a version too: the second one comes back by hash.
    let hash2 = blake3::hash(&v2).to_hex();
    ok(&["restore", f.to_str().unwrap(), "--version", &hash2[..10]]);
    assert_eq!(std::fs::read(&f).unwrap(), v2);
    // The deleted file, and its directory with it.
    ok(&["restore", g.to_str().unwrap()]);
    assert_eq!(std::fs::read(&g).unwrap(), g1);
    // To another path, which must not exist.
    let copy = node.path("f-v1.txt");
    let hash1 = blake3::hash(&v1).to_hex();
    ok(&[
        "restore",
        f.to_str().unwrap(),
        "--version",
        &hash1[..8],
        "--to",
        copy.to_str().unwrap(),
    ]);
    assert_eq!(std::fs::read(&copy).unwrap(), v1);
    assert_eq!(std::fs::read(&f).unwrap(), v2, "the source is untouched");
    let err = fails(&[
        "restore",
        f.to_str().unwrap(),
        "--to",
        copy.to_str().unwrap(),
    ]);
    assert!(err.contains("exists"), "{err}");
    // --at: the version current an hour from now is the newest.
    let err = fails(&[
        "restore",
        f.to_str().unwrap(),
        "--at",
        "2000-01-01T00:00:00Z",
    ]);
    assert!(err.contains("no version made at or before"), "{err}");
    let err = fails(&["restore", f.to_str().unwrap(), "--version", "abc"]);
    assert!(err.contains("at least 6 hex digits"), "{err}");

    // All of it survives a restart (the items and their objects).
    let mut node = node;
    node.remount();
    assert_eq!(log_json(&node, "f.txt").len(), 5);
    ok(&["restore", f.to_str().unwrap(), "--version", &hash1[..8]]);
    assert_eq!(std::fs::read(&f).unwrap(), v1);
}

#[test]
fn without_history_nothing_is_kept_and_a_restore_says_why() {
    let node = Node::start();
    let f = node.path("f");
    write_version(&node, "f", b"one");
    write_version(&node, "f", b"two");
    assert_eq!(log_json(&node, "f").len(), 1);
    let err = fails(&["restore", f.to_str().unwrap()]);
    assert!(err.contains("history="), "{err}");
    let err = fails(&["log", node.path("never").to_str().unwrap()]);
    assert!(err.contains("no such file"), "{err}");
    let err = fails(&["log", "/tmp"]);
    assert!(err.contains("not in a btfs mount"), "{err}");
}

#[test]
fn history_past_its_window_is_collected_with_its_objects() {
    let node = Node::start_with("history=2s");
    let v1 = common::pattern(1, 1 << 20);
    write_version(&node, "f", &v1);
    write_version(&node, "f", b"new");
    let hex = blake3::hash(&v1).to_hex();
    let object = node
        .state
        .join("objects")
        .join(&hex[..2])
        .join(hex.as_str());
    assert_eq!(history_versions(&node), 2, "the empty file, then v1");
    assert!(
        object.exists(),
        "kept inside the window: {}",
        object.display()
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while history_versions(&node) > 0 || object.exists() {
        assert!(
            Instant::now() < deadline,
            "history past its window was not collected"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(log_json(&node, "f").len(), 1);
}

#[test]
fn the_space_history_holds_shows_in_status_and_in_metrics() {
    use std::io::{Read, Write};
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let node = Node::start_with(&format!("history=7d,metrics=127.0.0.1:{port}"));
    let v1 = common::pattern(3, 100_000);
    write_version(&node, "f", &v1);
    write_version(&node, "f", b"x");
    let status = node.status();
    // The empty file made by the create, then v1.
    assert_eq!(status["history_versions"], 2);
    assert_eq!(status["history_bytes"], v1.len() as u64);
    assert_eq!(status["options"]["history_secs"], 7 * 86_400);
    let text = String::from_utf8(btfs(&["status", node.mnt.to_str().unwrap()]).stdout).unwrap();
    assert!(text.contains("history      2 versions"), "{text}");
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(c, "GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n").unwrap();
    let mut scrape = String::new();
    c.read_to_string(&mut scrape).unwrap();
    let line = format!("btfs_history_bytes {}", v1.len());
    assert!(
        scrape.lines().any(|l| l == line),
        "no {line:?} in:\n{scrape}"
    );
    assert!(
        scrape.lines().any(|l| l == "btfs_history_versions 2"),
        "{scrape}"
    );
}
