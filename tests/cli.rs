//! The `btfs` command line: keys, mount errors, status.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{fs, path::Path};

use common::{Node, btfs, require_fuse};

fn mounted(path: &Path) -> bool {
    let target = fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    fs::read_to_string("/proc/mounts")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(1) == Some(target.to_str().unwrap()))
}

/// Runs a mount that must fail: one line of reason, non-zero, nothing mounted.
fn assert_mount_fails(args: &[&str], mnt: &Path, reason: &str) {
    let out = btfs(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "mount unexpectedly succeeded: {args:?}"
    );
    assert!(stderr.contains(reason), "expected {reason:?} in {stderr:?}");
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "one line of reason, got {stderr:?}"
    );
    assert!(
        !mounted(mnt) || reason.contains("busy"),
        "something was mounted at {}",
        mnt.display()
    );
}

#[test]
fn keygen_writes_a_swarm_key_and_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("swarm.key");
    let out = btfs(&["keygen", key.to_str().unwrap()]);
    assert!(out.status.success());
    let text = fs::read_to_string(&key).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[..2], ["/key/swarm/psk/1.0.0/", "/base16/"]);
    assert_eq!(lines[2].len(), 64);
    assert!(lines[2].bytes().all(|b| b.is_ascii_hexdigit()));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let again = btfs(&["keygen", key.to_str().unwrap()]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));
    let forced = btfs(&["keygen", "--force", key.to_str().unwrap()]);
    assert!(forced.status.success());
    assert_ne!(
        fs::read_to_string(&key).unwrap(),
        text,
        "a new key is random"
    );
}

#[test]
fn bad_mounts_give_one_line_reasons_and_mount_nothing() {
    require_fuse();
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let m = mnt.to_str().unwrap();
    let bad_key = dir.path().join("bad.key");
    fs::write(&bad_key, "/key/swarm/psk/1.0.0/\n/base16/\nnot-hex\n").unwrap();
    let state = dir.path().join("state");
    let key_opt = format!("key={},state={}", bad_key.display(), state.display());
    assert_mount_fails(
        &["mount", "c", m, "-o", &key_opt],
        &mnt,
        "is not a valid swarm key",
    );
    let missing_key = format!(
        "key={}/nope.key,state={}",
        dir.path().display(),
        state.display()
    );
    assert_mount_fails(
        &["mount", "c", m, "-o", &missing_key],
        &mnt,
        "does not exist",
    );
    assert_mount_fails(
        &[
            "mount",
            "c",
            m,
            "-o",
            "state=/nonexistent-btfs-parent/state",
        ],
        &mnt,
        "parent /nonexistent-btfs-parent does not exist",
    );
    assert_mount_fails(
        &["mount", "c", m, "-o", "frobnicate"],
        &mnt,
        "unknown mount option",
    );
    assert_mount_fails(&["mount", "bad/name", m], &mnt, "cluster name");
    let nodir = dir.path().join("absent");
    assert_mount_fails(
        &[
            "mount",
            "c",
            nodir.to_str().unwrap(),
            "-o",
            &format!("state={}", state.display()),
        ],
        &nodir,
        "does not exist",
    );

    // The mesh port is taken.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port_opt = format!(
        "state={},listen={},mdns=off",
        dir.path().join("s2").display(),
        taken.local_addr().unwrap()
    );
    assert_mount_fails(
        &["mount", "c", m, "-o", &port_opt],
        &mnt,
        "Address already in use",
    );

    // A congestion control the kernel does not have: named, with the list.
    let cc_opt = format!(
        "state={},listen=127.0.0.1:0,mdns=off,bt_congestion=nosuchcc",
        dir.path().join("s3").display()
    );
    assert_mount_fails(
        &["mount", "c", m, "-o", &cc_opt],
        &mnt,
        "TCP congestion control \"nosuchcc\" (bt_congestion=)",
    );

    // Busy: something is mounted there already (a btfs, so no double mount).
    let node = Node::start();
    let other_state = format!("state={}", dir.path().join("other").display());
    assert_mount_fails(
        &[
            "mount",
            "test",
            node.mnt.to_str().unwrap(),
            "-o",
            &other_state,
        ],
        &node.mnt,
        "is busy",
    );
    // Busy: the state dir is used by another daemon.
    let shared = format!("state={}", node.state.display());
    assert_mount_fails(
        &["mount", "c", m, "-o", &shared],
        &mnt,
        "in use by another btfs process",
    );
    assert!(
        node.status()["pid"].as_u64().is_some(),
        "the first mount still works"
    );
}

#[test]
fn status_reports_counts_in_text_and_json() {
    let node = Node::start();
    fs::create_dir(node.path("d")).unwrap();
    fs::write(node.path("d/a"), vec![1u8; 1000]).unwrap();
    fs::write(node.path("b"), vec![2u8; 24]).unwrap();
    let _open = fs::File::open(node.path("b")).unwrap();
    // Commits finish in the background shortly after close(2).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut v = node.status();
    while v["bytes"] != 1024 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
        v = node.status();
    }
    assert_eq!(v["files"], 2);
    assert_eq!(v["dirs"], 2, "root and d");
    assert_eq!(v["bytes"], 1024);
    assert_eq!(v["open_handles"], 1);
    assert_eq!(v["name"], "test");
    assert_eq!(v["node_id"].as_str().unwrap().len(), 64);
    assert!(v["peers"].as_array().unwrap().is_empty());
    let listen = v["listen"].as_array().unwrap();
    assert!(
        listen[0]
            .as_str()
            .unwrap()
            .starts_with("/ip4/127.0.0.1/tcp/"),
        "{listen:?}"
    );
    let human = btfs(&["status", node.mnt.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&human.stdout);
    assert!(text.contains("files        2 (1.0 KiB)"), "{text}");
    assert!(text.contains("open         1 handles on 1 files"), "{text}");

    let nothing = btfs(&["status", "/"]);
    assert!(!nothing.status.success());
    assert!(String::from_utf8_lossy(&nothing.stderr).contains("no btfs daemon answers"));
}

#[test]
fn node_identity_and_default_key_persist() {
    let mut node = Node::start();
    let id = node.status()["node_id"].clone();
    let key = fs::read_to_string(node.state.join("swarm.key")).unwrap();
    node.remount();
    assert_eq!(node.status()["node_id"], id);
    assert_eq!(
        fs::read_to_string(node.state.join("swarm.key")).unwrap(),
        key
    );
}

#[test]
fn help_and_version() {
    let v = btfs(&["--version"]);
    assert!(String::from_utf8_lossy(&v.stdout).starts_with("btfs "));
    let h = btfs(&["--help"]);
    let help = String::from_utf8_lossy(&h.stdout);
    assert!(
        help.contains("Examples:") && help.contains("fstab"),
        "{help}"
    );
    let mh = btfs(&["mount", "--help"]);
    assert!(String::from_utf8_lossy(&mh.stdout).contains("key=FILE"));
}
