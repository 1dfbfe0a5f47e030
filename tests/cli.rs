//! The `btfs` command line: keys, mount errors, status.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{fs, path::Path, process::Command};

use common::{Node, btfs, btfs_bin, require_fuse};

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
    // A valid key that other users can read, and a state dir they can write.
    let open_key = dir.path().join("open.key");
    assert!(
        btfs(&["keygen", open_key.to_str().unwrap()])
            .status
            .success()
    );
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&open_key, fs::Permissions::from_mode(0o644)).unwrap();
    assert_mount_fails(
        &[
            "mount",
            "c",
            m,
            "-o",
            &format!("key={},state={}", open_key.display(), state.display()),
        ],
        &mnt,
        "is open to other users (mode 644): run `chmod 600",
    );
    let open_state = dir.path().join("open-state");
    fs::create_dir(&open_state).unwrap();
    fs::set_permissions(&open_state, fs::Permissions::from_mode(0o777)).unwrap();
    assert_mount_fails(
        &[
            "mount",
            "c",
            m,
            "-o",
            &format!("state={}", open_state.display()),
        ],
        &mnt,
        "may be written by other users (mode 777)",
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
    assert!(text.contains("mdns         off"), "{text}");

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

/// The control socket is the daemon's: 0600 in a 0700 directory, so another
/// local user can neither ask for a status nor for any file's torrent.
#[test]
fn the_control_socket_is_private_to_the_daemons_user() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let node = Node::start();
    let run = Path::new("/run/btfs");
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(run), 0o700, "{}", run.display());
    let socks: Vec<_> = std::fs::read_dir(run)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "sock"))
        .collect();
    assert!(!socks.is_empty());
    for s in &socks {
        assert_eq!(mode(s), 0o600, "{}", s.display());
        assert_eq!(std::fs::metadata(s).unwrap().uid(), 0);
    }
    // The mount itself is open to all (allow_other); the socket is not.
    let parent = node.mnt.parent().unwrap();
    std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = Command::new("setpriv")
        .args([
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            btfs_bin(),
        ])
        .args(["status", node.mnt.to_str().unwrap()])
        .env("BTFS_RUN_DIR", run)
        .output()
        .expect("setpriv (util-linux)");
    assert!(!out.status.success(), "another user got a status");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no btfs daemon answers") && err.contains("Permission denied"),
        "{err}"
    );
}
