//! Multi-node scenarios: real daemons, each in its own network namespace
//! (`btfs-…`), joined by a bridge, mounted in the host's mount namespace with
//! `nsenter --net` (an `ip netns exec` mount would be invisible outside).
//! Every namespace, link and mount a test makes is removed when it ends,
//! passing or failing. Traffic stays on the bridge: the bridge has no address
//! on the host, and mDNS multicast only crosses the namespaces' veths.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use common::{btfs, btfs_bin, require_fuse, run_ok, wait_exit};

static NEXT_NET: AtomicU32 = AtomicU32::new(0);
const PORT: u16 = 4410;

/// A bridge and namespaces attached to it.
struct Net {
    id: String,
    subnet: u32,
    namespaces: Vec<String>,
}

impl Net {
    fn new() -> Self {
        require_fuse();
        let n = NEXT_NET.fetch_add(1, Ordering::SeqCst);
        let id = format!("{}{n}", std::process::id() % 10_000);
        let net = Net {
            subnet: 100 + (std::process::id() % 100) * 2 + n,
            id,
            namespaces: Vec::new(),
        };
        run_ok("ip", &["link", "add", &net.bridge(), "type", "bridge"]);
        run_ok("ip", &["link", "set", &net.bridge(), "up"]);
        net
    }

    fn bridge(&self) -> String {
        format!("btfs-br{}", self.id)
    }

    /// Adds namespace number `i` (address 10.231.SUBNET.i+1) and returns its name and address.
    fn add(&mut self) -> (String, String) {
        let i = self.namespaces.len();
        let ns = format!("btfs-{}-{i}", self.id);
        let host_end = format!("btfs-v{}-{i}", self.id);
        let addr = format!("10.231.{}.{}", self.subnet % 250, i + 1);
        run_ok("ip", &["netns", "add", &ns]);
        self.namespaces.push(ns.clone());
        run_ok(
            "ip",
            &[
                "link", "add", &host_end, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ],
        );
        run_ok(
            "ip",
            &["link", "set", &host_end, "master", &self.bridge(), "up"],
        );
        let inside = |args: &[&str]| {
            let mut full = vec!["-n", ns.as_str()];
            full.extend_from_slice(args);
            run_ok("ip", &full);
        };
        inside(&["addr", "add", &format!("{addr}/24"), "dev", "eth0"]);
        inside(&["link", "set", "eth0", "up"]);
        inside(&["link", "set", "lo", "up"]);
        inside(&["route", "add", "224.0.0.0/4", "dev", "eth0"]);
        (ns, addr)
    }
}

impl Net {
    /// `n` new namespaces, each running a node with `key` and `extra` options.
    fn start_nodes(&mut self, n: usize, key: &Path, extra: &str) -> Vec<NsNode> {
        (0..n)
            .map(|_| {
                let (ns, addr) = self.add();
                NsNode::start(&ns, &addr, key, extra)
            })
            .collect()
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in &self.namespaces {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge()])
            .status();
    }
}

/// A daemon running in a namespace, mounted on the host.
struct NsNode {
    mnt: PathBuf,
    addr: String,
    pid: u32,
    _dir: tempfile::TempDir,
}

impl NsNode {
    fn start(ns: &str, addr: &str, key: &Path, extra: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("btfs-ns-")
            .tempdir()
            .unwrap();
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let opts = format!(
            "key={},state={},listen={addr}:{PORT}{extra}",
            key.display(),
            dir.path().join("state").display()
        );
        let out = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{ns}"))
            .args([
                btfs_bin(),
                "mount",
                "cluster",
                mnt.to_str().unwrap(),
                "-o",
                &opts,
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mount in {ns}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut node = NsNode {
            mnt,
            addr: addr.to_owned(),
            pid: 0,
            _dir: dir,
        };
        node.pid = node.status()["pid"].as_u64().unwrap() as u32;
        node
    }

    fn status(&self) -> serde_json::Value {
        let out = btfs(&["status", self.mnt.to_str().unwrap(), "--json"]);
        assert!(
            out.status.success(),
            "status: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn connected_peers(&self) -> usize {
        self.status()["peers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["connected"] == true)
            .count()
    }

    fn node_id(&self) -> String {
        self.status()["node_id"].as_str().unwrap().to_owned()
    }
}

impl Drop for NsNode {
    fn drop(&mut self) {
        if Command::new("umount")
            .arg(&self.mnt)
            .status()
            .map(|s| !s.success())
            .unwrap_or(true)
        {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
        wait_exit(self.pid, Duration::from_secs(30));
    }
}

fn keygen(dir: &Path, name: &str) -> PathBuf {
    let key = dir.join(name);
    assert!(btfs(&["keygen", key.to_str().unwrap()]).status.success());
    key
}

/// Waits until `check` holds, failing with `what` after `timeout`.
fn eventually(timeout: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn mdns_alone_connects_three_members_who_gossip_and_never_a_node_with_another_key() {
    let keys = tempfile::tempdir().unwrap();
    let key = keygen(keys.path(), "cluster.key");
    let other_key = keygen(keys.path(), "other.key");
    let mut net = Net::new();
    let nodes = net.start_nodes(3, &key, ",mdns=on");
    let (ns, addr) = net.add();
    let stranger = NsNode::start(&ns, &addr, &other_key, ",mdns=on");

    eventually(
        Duration::from_secs(30),
        "every member connected to the two others",
        || nodes.iter().all(|n| n.connected_peers() == 2),
    );
    // A change on one member is signed and gossiped to the others.
    std::fs::write(nodes[0].mnt.join("hello.txt"), b"hi").unwrap();
    eventually(
        Duration::from_secs(15),
        "the record gossiped to both members",
        || {
            nodes[1..]
                .iter()
                .all(|n| n.status()["records_received"].as_u64().unwrap() >= 1)
        },
    );
    assert!(nodes[0].status()["records_published"].as_u64().unwrap() >= 1);
    // The stranger is on the same bridge and is discovered, but its
    // handshakes fail: a few more seconds change nothing, and it hears nothing.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(stranger.connected_peers(), 0);
    assert_eq!(stranger.status()["records_received"], 0);
    let stranger_id = stranger.node_id();
    for n in &nodes {
        assert_eq!(n.connected_peers(), 2);
        let peers = n.status()["peers"].clone();
        assert!(
            peers
                .as_array()
                .unwrap()
                .iter()
                .all(|p| p["connected"] == false || p["id"] != stranger_id.as_str()),
            "{peers}"
        );
    }
}

#[test]
fn bootstrap_peers_alone_connect_members_across_subnets() {
    let keys = tempfile::tempdir().unwrap();
    let key = keygen(keys.path(), "cluster.key");
    let mut net = Net::new();
    let (ns, addr) = net.add();
    let hub = NsNode::start(&ns, &addr, &key, ",mdns=off");
    let spokes = net.start_nodes(2, &key, &format!(",mdns=off,peers={}:{PORT}", hub.addr));
    eventually(
        Duration::from_secs(30),
        "the hub connected to both spokes",
        || hub.connected_peers() == 2,
    );
    for s in &spokes {
        assert_eq!(
            s.connected_peers(),
            1,
            "a spoke knows only the hub (no mDNS, no peer exchange)"
        );
    }
}

#[test]
fn changes_on_one_member_show_on_the_others() {
    let keys = tempfile::tempdir().unwrap();
    let key = keygen(keys.path(), "cluster.key");
    let mut net = Net::new();
    let nodes = net.start_nodes(2, &key, ",mdns=on");
    eventually(Duration::from_secs(30), "both members connected", || {
        nodes.iter().all(|n| n.connected_peers() == 1)
    });
    let (a, b) = (&nodes[0].mnt, &nodes[1].mnt);
    let wait =
        |what: &str, check: &dyn Fn() -> bool| eventually(Duration::from_secs(10), what, check);

    std::fs::create_dir(a.join("dir")).unwrap();
    std::fs::write(a.join("dir/file.txt"), b"twelve bytes").unwrap();
    wait("the file listed on B", &|| b.join("dir/file.txt").exists());
    wait("its size on B", &|| {
        std::fs::metadata(b.join("dir/file.txt"))
            .map(|m| m.len())
            .ok()
            == Some(12)
    });
    // Its bytes are on A only: a read on B fails clearly (EIO), no hang.
    let err = std::fs::read(b.join("dir/file.txt")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");

    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        a.join("dir/file.txt"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    wait("chmod on B", &|| {
        std::fs::metadata(b.join("dir/file.txt"))
            .map(|m| m.permissions().mode() & 0o777)
            .ok()
            == Some(0o600)
    });
    std::fs::rename(a.join("dir/file.txt"), a.join("dir/renamed.txt")).unwrap();
    wait("rename on B", &|| {
        b.join("dir/renamed.txt").exists() && !b.join("dir/file.txt").exists()
    });
    std::fs::OpenOptions::new()
        .write(true)
        .open(a.join("dir/renamed.txt"))
        .unwrap()
        .set_len(3)
        .unwrap();
    wait("truncate on B", &|| {
        std::fs::metadata(b.join("dir/renamed.txt"))
            .map(|m| m.len())
            .ok()
            == Some(3)
    });
    // A directory rename moves everything below it.
    std::fs::create_dir_all(a.join("dir/sub")).unwrap();
    std::fs::write(a.join("dir/sub/deep"), b"x").unwrap();
    wait("the subtree on B", &|| b.join("dir/sub/deep").exists());
    std::fs::rename(a.join("dir/sub"), a.join("moved")).unwrap();
    wait("the moved subtree on B", &|| {
        b.join("moved/deep").exists() && !b.join("dir/sub").exists()
    });
    std::fs::remove_file(a.join("moved/deep")).unwrap();
    std::fs::remove_dir(a.join("moved")).unwrap();
    wait("the moved subtree deleted on B", &|| {
        !b.join("moved").exists()
    });
    std::fs::remove_file(a.join("dir/renamed.txt")).unwrap();
    wait("delete on B", &|| !b.join("dir/renamed.txt").exists());
    std::fs::remove_dir(a.join("dir")).unwrap();
    wait("rmdir on B", &|| !b.join("dir").exists());
    // And the other way round.
    std::fs::write(b.join("from-b"), b"").unwrap();
    wait("B's file on A", &|| a.join("from-b").exists());
}
