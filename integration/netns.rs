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

/// Content over BitTorrent between these nodes.
mod content;
/// Version history and restore across nodes.
mod history;
/// A member gone bad, and what the others do about it.
mod hostile;
/// Metrics scraped while two nodes move content.
mod metrics;
/// Pinned paths complete on a node and survive cache pressure.
mod pins;
/// Options changed live with `mount -o remount`.
mod remount;
/// Members that start together find each other.
mod startup;

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
        run_ok("ip", &["-n", &ns, "link", "set", "lo", "up"]);
        self.plug(&ns, &host_end, &addr);
        (ns, addr)
    }

    /// Links namespace `ns` to the bridge (`eth0` inside, `host_end` on the
    /// host) with address `addr`/24, up, multicast routed on it.
    fn plug(&self, ns: &str, host_end: &str, addr: &str) {
        run_ok(
            "ip",
            &[
                "link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", ns,
            ],
        );
        run_ok(
            "ip",
            &["link", "set", host_end, "master", &self.bridge(), "up"],
        );
        let inside = |args: &[&str]| {
            let mut full = vec!["-n", ns];
            full.extend_from_slice(args);
            run_ok("ip", &full);
        };
        inside(&["addr", "add", &format!("{addr}/24"), "dev", "eth0"]);
        inside(&["link", "set", "eth0", "up"]);
        inside(&["route", "add", "224.0.0.0/4", "dev", "eth0"]);
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
    /// The cluster name it mounts.
    cluster: String,
    mnt: PathBuf,
    ns: String,
    addr: String,
    opts: String,
    pid: u32,
    dir: tempfile::TempDir,
}

impl NsNode {
    fn start(ns: &str, addr: &str, key: &Path, extra: &str) -> Self {
        Self::start_in(
            ns,
            addr,
            "cluster",
            &format!("key={},listen={addr}:{PORT}{extra}", key.display()),
        )
    }

    /// A node of cluster `cluster` with exactly `opts` and a state dir of
    /// its own.
    fn start_in(ns: &str, addr: &str, cluster: &str, opts: &str) -> Self {
        let mut node = Self::unmounted(ns, addr, cluster, String::new());
        node.opts = format!("{opts},state={}", node.dir.path().join("state").display());
        node.mount();
        node
    }

    /// A node with a mountpoint of its own, not mounted yet; `opts` empty:
    /// no `-o` at all.
    fn unmounted(ns: &str, addr: &str, cluster: &str, opts: String) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("btfs-ns-")
            .tempdir()
            .unwrap();
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        NsNode {
            cluster: cluster.into(),
            mnt,
            ns: ns.to_owned(),
            addr: addr.to_owned(),
            opts,
            pid: 0,
            dir,
        }
    }

    fn mount(&mut self) {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.ns)).args([
            btfs_bin(),
            "mount",
            &self.cluster,
            self.mnt.to_str().unwrap(),
        ]);
        if !self.opts.is_empty() {
            cmd.args(["-o", &self.opts]);
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "mount in {}: {}{}",
            self.ns,
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        self.pid = self.status()["pid"].as_u64().unwrap() as u32;
    }

    /// Kills the daemon (-9), clears the dead mount and mounts again on the
    /// same state.
    fn crash_and_restart(&mut self) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        wait_exit(self.pid, Duration::from_secs(10));
        run_ok("umount", &["-l", self.mnt.to_str().unwrap()]);
        self.mount();
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("state/btfs.log")).unwrap_or_default()
    }

    fn counter(&self, name: &str) -> u64 {
        self.status()[name].as_u64().unwrap_or(0)
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
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(300).collect();
            eprintln!(
                "--- last lines of the log of the node in {} ---\n{}",
                self.ns,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
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

/// A fresh key, a bridge and `n` members on it with mDNS, once every member
/// is connected to all the others. Bind the parts in this order: the nodes
/// are unmounted before the namespaces go.
fn connected_cluster(n: usize) -> (tempfile::TempDir, Net, Vec<NsNode>) {
    cluster_with(&vec![""; n])
}

/// `connected_cluster` with extra mount options for each node (`",opt=v"`).
fn cluster_with(extra: &[&str]) -> (tempfile::TempDir, Net, Vec<NsNode>) {
    let keys = tempfile::tempdir().unwrap();
    let key = keygen(keys.path(), "cluster.key");
    let mut net = Net::new();
    let nodes: Vec<NsNode> = extra
        .iter()
        .flat_map(|e| net.start_nodes(1, &key, &format!(",mdns=on{e}")))
        .collect();
    let n = nodes.len();
    eventually(Duration::from_secs(30), "every member connected", || {
        nodes.iter().all(|m| m.connected_peers() == n - 1)
    });
    (keys, net, nodes)
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
fn bootstrap_peers_alone_connect_members_and_presence_introduces_the_others() {
    let keys = tempfile::tempdir().unwrap();
    let key = keygen(keys.path(), "cluster.key");
    let mut net = Net::new();
    let (ns, addr) = net.add();
    let spokes = net.start_nodes(2, &key, &format!(",mdns=off,peers={addr}:{PORT}"));
    // The hub comes up later: the spokes redial it until it does.
    std::thread::sleep(Duration::from_secs(3));
    assert!(spokes.iter().all(|s| s.connected_peers() == 0));
    let hub = NsNode::start(&ns, &addr, &key, ",mdns=off");
    eventually(
        Duration::from_secs(30),
        "the hub connected to both spokes",
        || hub.connected_peers() == 2,
    );
    // Each spoke names only the hub; the other spoke's presence announcement,
    // relayed by the hub, introduces them.
    for s in &spokes {
        eventually(
            Duration::from_secs(10),
            "a spoke connected to both others",
            || s.connected_peers() == 2,
        );
    }
}

#[test]
fn changes_on_one_member_show_on_the_others() {
    let (_keys, _net, nodes) = connected_cluster(2);
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
    // Its bytes are on A only: B fetches them over BitTorrent when read.
    assert_eq!(
        std::fs::read(b.join("dir/file.txt")).unwrap(),
        b"twelve bytes"
    );

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

    // B is writing a file when A's edit of it arrives: closing on B keeps
    // both versions, on both nodes (no write is lost).
    std::fs::write(a.join("open.txt"), b"v1").unwrap();
    wait("open.txt on B", &|| b.join("open.txt").exists());
    let received = nodes[1].counter("records_received");
    let mut held = std::fs::File::create(b.join("open.txt")).unwrap();
    std::io::Write::write_all(&mut held, b"B's long write").unwrap();
    std::fs::write(a.join("open.txt"), b"A's edit").unwrap();
    wait("A's edit received by B", &|| {
        nodes[1].counter("records_received") > received
    });
    drop(held);
    wait("both versions on both nodes", &|| {
        let (ta, tb) = (snapshot(a), snapshot(b));
        ta == tb
            && ta
                .keys()
                .filter(|k| k.starts_with("open.btfs-conflict-"))
                .count()
                == 1
            && ta.contains_key("open.txt")
    });
    let tree = snapshot(a);
    let sizes: std::collections::BTreeSet<u64> = tree
        .iter()
        .filter(|(k, _)| k.starts_with("open."))
        .map(|(_, v)| v.1)
        .collect();
    assert_eq!(sizes, [8, 14].into(), "{tree:?}");
}

/// What a tree shows, path by path: kind, size and permissions (not times:
/// directory times are node-local, and contents may still be remote).
fn snapshot(root: &Path) -> std::collections::BTreeMap<String, (char, u64, u32)> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            let Ok(m) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            let kind = if m.is_dir() {
                stack.push(p.clone());
                'd'
            } else if m.is_symlink() {
                'l'
            } else {
                'f'
            };
            let size = if m.is_dir() { 0 } else { m.len() };
            out.insert(rel, (kind, size, m.permissions().mode() & 0o7777));
        }
    }
    out
}

fn set_link(ns: &str, up: bool) {
    run_ok(
        "ip",
        &[
            "-n",
            ns,
            "link",
            "set",
            "eth0",
            if up { "up" } else { "down" },
        ],
    );
}

#[test]
fn a_partition_heals_into_one_tree_with_both_sides_of_every_clash() {
    let (_keys, _net, nodes) = connected_cluster(3);
    let (a, b, c) = (&nodes[0].mnt, &nodes[1].mnt, &nodes[2].mnt);
    std::fs::write(a.join("shared.txt"), b"base").unwrap();
    std::fs::write(a.join("victim.txt"), b"v").unwrap();
    std::fs::create_dir(a.join("gone")).unwrap();
    std::fs::write(a.join("gone/old.txt"), b"old").unwrap();
    eventually(Duration::from_secs(15), "the base tree on C", || {
        c.join("gone/old.txt").exists() && c.join("victim.txt").exists()
    });

    // C loses its link; both sides keep writing.
    set_link(&nodes[2].ns, false);
    std::fs::write(a.join("shared.txt"), b"from the A side").unwrap();
    std::fs::remove_file(a.join("victim.txt")).unwrap();
    std::fs::remove_file(a.join("gone/old.txt")).unwrap();
    std::fs::remove_dir(a.join("gone")).unwrap();
    std::fs::write(b.join("b-only.txt"), b"b").unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    std::fs::write(c.join("shared.txt"), b"from C").unwrap();
    std::fs::write(c.join("victim.txt"), b"modified on C").unwrap();
    std::fs::write(c.join("gone/new.txt"), b"made in a deleted dir").unwrap();
    std::fs::create_dir(c.join("c-dir")).unwrap();
    std::fs::write(c.join("c-dir/x"), b"x").unwrap();
    std::thread::sleep(Duration::from_secs(3));
    assert!(!c.join("b-only.txt").exists(), "C is cut off");
    set_link(&nodes[2].ns, true);

    let mut last = Vec::new();
    eventually(
        Duration::from_secs(90),
        "identical trees on all three",
        || {
            last = nodes.iter().map(|n| snapshot(&n.mnt)).collect();
            last[0] == last[1]
                && last[1] == last[2]
                && last[0].contains_key("b-only.txt")
                && last[0].contains_key("c-dir/x")
        },
    );
    let tree = last[0].clone();
    eprintln!("converged tree: {tree:#?}");
    // Both edits of shared.txt: the newer (C's) at the name, A's as a copy.
    assert_eq!(tree["shared.txt"].1, 6, "{tree:?}");
    let copies: Vec<String> = tree
        .keys()
        .filter(|k| k.starts_with("shared.btfs-conflict-") && k.ends_with(".txt"))
        .cloned()
        .collect();
    assert_eq!(copies.len(), 1, "{tree:?}");
    assert_eq!(tree[&copies[0]].1, 15, "A's version kept as the copy");
    // A modification survives a concurrent delete.
    assert_eq!(tree["victim.txt"].1, 13);
    // A file created in a directory deleted concurrently survives, and so does
    // the directory; what the delete removed stays removed.
    assert_eq!(tree["gone"].0, 'd');
    assert!(tree.contains_key("gone/new.txt"));
    assert!(!tree.contains_key("gone/old.txt"));
    for n in &nodes {
        assert!(n.counter("records_merged") + n.counter("records_synced") > 0);
    }
    assert!(nodes.iter().any(|n| n.counter("records_merged") > 0));

    // Editing the conflicted file ends the conflict; the copy stays, as a
    // file of its own, on every node.
    std::fs::write(b.join("shared.txt"), b"merged by hand").unwrap();
    eventually(
        Duration::from_secs(20),
        "the edit and the copy everywhere",
        || {
            last = nodes.iter().map(|n| snapshot(&n.mnt)).collect();
            last[0] == last[1]
                && last[1] == last[2]
                && last[0].get("shared.txt").map(|e| e.1) == Some(14)
                && last[0].contains_key(copies[0].as_str())
        },
    );
    // The directory kept only for what survived in it goes when that goes:
    // its own record is a delete.
    std::fs::remove_file(a.join("gone/new.txt")).unwrap();
    eventually(Duration::from_secs(20), "gone/ gone everywhere", || {
        nodes.iter().all(|n| !n.mnt.join("gone").exists())
    });
    // Deleting the copy deletes it everywhere.
    std::fs::remove_file(c.join(&copies[0])).unwrap();
    eventually(Duration::from_secs(20), "the copy gone everywhere", || {
        nodes.iter().all(|n| !n.mnt.join(&copies[0]).exists())
    });
}

#[test]
fn a_node_killed_and_restarted_during_writes_converges() {
    let (_keys, _net, mut nodes) = connected_cluster(2);
    let a = nodes[0].mnt.clone();
    std::fs::create_dir(a.join("w")).unwrap();
    let writer = std::thread::spawn(move || {
        for i in 0..300 {
            std::fs::write(a.join(format!("w/f{i:03}")), format!("{i}")).unwrap();
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    // B writes too, then dies in the middle of A's burst.
    for i in 0..20 {
        std::fs::write(nodes[1].mnt.join(format!("b{i}")), b"b").unwrap();
    }
    std::thread::sleep(Duration::from_millis(800));
    nodes[1].crash_and_restart();
    writer.join().unwrap();
    let b = nodes[1].mnt.clone();
    eventually(Duration::from_secs(60), "B lists all of A's files", || {
        std::fs::read_dir(b.join("w"))
            .map(|d| d.count())
            .unwrap_or(0)
            == 300
    });
    eventually(Duration::from_secs(30), "identical trees", || {
        snapshot(&nodes[0].mnt) == snapshot(&nodes[1].mnt)
    });
    let tree = snapshot(&nodes[0].mnt);
    assert_eq!(tree.keys().filter(|k| k.starts_with("b")).count(), 20);
    assert_eq!(tree["w/f299"].1, 3);
}

/// Runs `f` on a thread inside network namespace `ns`.
fn in_namespace<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        use std::os::fd::AsRawFd;
        let file = std::fs::File::open(&path).unwrap();
        // SAFETY: plain syscall on a valid fd; it only changes this thread's
        // network namespace.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
}

/// Measured on the bridge: write+close on A until `stat` succeeds on B, over
/// 200 files; then 10,000 files created on A until both B and C list them.
/// Prints the numbers recorded in docs/BENCHMARKS.md; asserts only that
/// everything arrives.
#[test]
fn bench_replication_latency_and_bulk_listing() {
    let (_keys, _net, nodes) = connected_cluster(3);
    let (a, b, c) = (&nodes[0].mnt, &nodes[1].mnt, &nodes[2].mnt);
    std::fs::create_dir(a.join("lat")).unwrap();
    eventually(Duration::from_secs(10), "lat/ on B", || {
        b.join("lat").exists()
    });
    let mut samples = Vec::new();
    for i in 0..200 {
        let name = format!("lat/f{i}");
        let t = Instant::now();
        std::fs::write(a.join(&name), b"x").unwrap();
        let target = b.join(&name);
        while std::fs::metadata(&target).is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "{name} never arrived"
            );
            std::thread::sleep(Duration::from_micros(500));
        }
        samples.push(t.elapsed());
    }
    samples.sort();
    let p50 = samples[samples.len() / 2];
    let p99 = samples[samples.len() * 99 / 100];
    eprintln!(
        "BENCH write+close on A -> stat on B, 200 files: p50 {:.1} ms, p99 {:.1} ms (target p50 <= 100 ms: ratio {:.2})",
        p50.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3,
        p50.as_secs_f64() * 1e3 / 100.0
    );

    std::fs::create_dir(a.join("bulk")).unwrap();
    let t = Instant::now();
    for i in 0..10_000 {
        std::fs::File::create(a.join(format!("bulk/f{i:05}"))).unwrap();
    }
    let created = t.elapsed();
    let count = |m: &Path| {
        std::fs::read_dir(m.join("bulk"))
            .map(|d| d.count())
            .unwrap_or(0)
    };
    let mut listed = [None, None];
    while listed.iter().any(Option::is_none) {
        for (i, m) in [b, c].into_iter().enumerate() {
            if listed[i].is_none() && count(m) == 10_000 {
                listed[i] = Some(t.elapsed());
            }
        }
        assert!(
            t.elapsed() < Duration::from_secs(300),
            "10,000 files never all arrived"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "BENCH 10,000 files created on A in {:.1} s; listed in full on B after {:.1} s, on C after {:.1} s",
        created.as_secs_f64(),
        listed[0].unwrap().as_secs_f64(),
        listed[1].unwrap().as_secs_f64()
    );
}

/// Known to fail about one run in five when all the netns scenarios run in
/// parallel on 2 vCPUs (it passes alone): the cause is not found yet.
#[test]
fn a_write_in_progress_survives_a_remote_delete() {
    let (_keys, _net, nodes) = connected_cluster(2);
    let (a, b) = (&nodes[0].mnt, &nodes[1].mnt);
    let wait =
        |what: &str, check: &dyn Fn() -> bool| eventually(Duration::from_secs(10), what, check);
    // A deletes a file that B is writing: the write survives, everywhere.
    std::fs::write(a.join("doomed.txt"), b"v1").unwrap();
    wait("doomed.txt on B", &|| b.join("doomed.txt").exists());
    let mut held = std::fs::File::create(b.join("doomed.txt")).unwrap();
    std::io::Write::write_all(&mut held, b"still wanted").unwrap();
    std::fs::remove_file(a.join("doomed.txt")).unwrap();
    wait("the delete on B", &|| !b.join("doomed.txt").exists());
    std::io::Write::write_all(&mut held, b" after the delete").unwrap();
    drop(held);
    wait("B's write back on both nodes", &|| {
        [a, b].iter().all(|m| {
            std::fs::metadata(m.join("doomed.txt"))
                .map(|m| m.len())
                .ok()
                == Some(29)
        })
    });
}

/// The README's first command, exactly: `btfs mount NAME DIR` with no `-o`
/// at all, so every default is the one used: the state dir under
/// `/var/lib/btfs`, a key created on first use, the mesh on 0.0.0.0:4410,
/// the peer wire on the next port, no mDNS. It runs in a namespace of its
/// own (the default address listens on every interface); a second node
/// that names only its key, state and the first node in `peers=` then
/// reads a file written there, over those default ports.
#[test]
fn the_readme_first_command_mounts_a_working_node_on_the_defaults() {
    let mut net = Net::new();
    let name = format!("btfs-defaults-{}", std::process::id());
    let state = PathBuf::from("/var/lib/btfs").join(&name);
    struct RemoveState(PathBuf);
    impl Drop for RemoveState {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _cleanup = RemoveState(state.clone());
    assert!(
        !state.exists(),
        "{} is left from an earlier run",
        state.display()
    );

    let (ns, addr) = net.add();
    let mut a = NsNode::unmounted(&ns, &addr, &name, String::new());
    // Its log where `NsNode::log` looks.
    std::os::unix::fs::symlink(&state, a.dir.path().join("state")).unwrap();
    a.mount();
    let status = a.status();
    // The key was made on first use, private to root.
    use std::os::unix::fs::PermissionsExt;
    let key = state.join("swarm.key");
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{} has mode {mode:o}", key.display());
    let listen = status["listen"].to_string();
    assert!(listen.contains("/tcp/4410"), "mesh listens on {listen}");
    assert_eq!(status["mdns"]["enabled"], false, "{status}");
    assert_eq!(status["mdns"]["running"], false, "{status}");
    // Every default of the README's options table.
    assert_eq!(
        status["options"],
        serde_json::json!({
            "listen": "0.0.0.0:4410",
            "mdns": false,
            "members": null,
            "threads": 4,
            "passthrough": true,
            "ttl_secs": 1.0,
            "allow_other": true,
            "tombstone_retention_secs": 86_400,
            "history_secs": null,
            "metrics": null,
            "bt_wire": "direct",
            "bt_congestion": "cubic",
            "bt_allow": [],
            "read_timeout_secs": 30.0,
            "prefetch": "none",
            "up_rate": null,
            "down_rate": null,
            "cache_size": null,
            "max_torrents": null,
            "zone": null,
        }),
        "{status}"
    );
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    let line = mounts
        .lines()
        .find(|l| l.split(' ').nth(1) == a.mnt.to_str())
        .unwrap();
    assert!(
        line.contains("allow_other")
            && line.contains("default_permissions")
            && line.contains("nosuid"),
        "{line}"
    );
    assert_eq!(status["passthrough"], serde_json::json!(true), "{status}");
    assert_eq!(status["max_live"], serde_json::json!(512), "{status}");
    assert_eq!(
        status["bittorrent_listen"],
        serde_json::json!("0.0.0.0:4411"),
        "{status}"
    );

    std::fs::write(a.mnt.join("hello.txt"), b"hello from the defaults").unwrap();
    assert_eq!(
        std::fs::read(a.mnt.join("hello.txt")).unwrap(),
        b"hello from the defaults"
    );
    let out = btfs(&["status", a.mnt.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eventually(Duration::from_secs(10), "the write committed", || {
        a.counter("commits") >= 1
    });

    // A second member with the key the first one made reaches it on the
    // default ports: the mesh's, then the peer wire's for the content.
    let (ns_b, addr_b) = net.add();
    let b = NsNode::start_in(
        &ns_b,
        &addr_b,
        &name,
        &format!("key={},peers={}:{PORT}", key.display(), a.addr),
    );
    eventually(Duration::from_secs(30), "B lists A's file", || {
        b.mnt.join("hello.txt").exists()
    });
    assert_eq!(
        std::fs::read(b.mnt.join("hello.txt")).unwrap(),
        b"hello from the defaults"
    );
    assert!(
        b.counter("peer_wires_direct") >= 1,
        "the content came over a direct wire to the default port: {}",
        b.status()
    );
}

/// Where the file at `path` first differs from `want`, for a failure message.
fn first_difference(path: &Path, want: &[u8]) -> String {
    match std::fs::read(path) {
        Err(e) => format!("read: {e}"),
        Ok(got) => {
            let at = got
                .iter()
                .zip(want)
                .position(|(g, w)| g != w)
                .unwrap_or(got.len().min(want.len()));
            format!(
                "{} bytes, {} wanted; first difference at {at}",
                got.len(),
                want.len()
            )
        }
    }
}

/// Wire overhead allowed over the payload on B's link (IP, TCP, the noise
/// frames and the peer wire's own messages): 10 %.
const WIRE_OVERHEAD_PERCENT: u64 = 10;
/// Bytes allowed for the metadata of one change and everything else on B's
/// link while it is measured (the signed record, the new torrent's
/// metainfo, 20 bytes a piece, gossip, pings and anti-entropy rounds).
const METADATA_ALLOWANCE: u64 = 512 << 10;

/// The most B may receive for a change whose content payload is `payload`
/// bytes.
fn wire_bound(payload: u64) -> u64 {
    payload + payload * WIRE_OVERHEAD_PERCENT / 100 + METADATA_ALLOWANCE
}

/// What one change of a file cost: on A, the write (open to close) and the
/// commit after it; on B, the bytes its link received and its engine
/// counted until it read the new version whole.
#[derive(Debug)]
struct ChangeCost {
    write: Duration,
    commit: Duration,
    link: u64,
    downloaded: u64,
}

/// Runs `change` on A's mount, then checks that A and B both read `want`
/// exactly (blake3 of the whole file, each through its mount) and that B
/// ends up holding it in full (the seed of the next change).
fn change_and_check(
    a: &NsNode,
    b: &NsNode,
    name: &str,
    want: &[u8],
    change: impl FnOnce(&Path),
) -> ChangeCost {
    let want_hash = blake3::hash(want);
    let want_len = want.len() as u64;
    let (link0, dl0) = (content::rx_bytes(b), b.counter("bytes_downloaded"));
    let commits = a.counter("commits");
    let started = Instant::now();
    change(&a.mnt.join(name));
    let write = started.elapsed();
    // Polled tightly: the commit's time is reported.
    let deadline = Instant::now() + Duration::from_secs(60);
    while a.counter("commits") == commits {
        assert!(Instant::now() < deadline, "no commit on A");
        std::thread::sleep(Duration::from_millis(2));
    }
    let commit = started.elapsed() - write;
    let on_a = a.mnt.join(name);
    assert_eq!(
        common::hash_file(&on_a).unwrap(),
        (want_len, want_hash),
        "{name} on A: {}",
        first_difference(&on_a, want)
    );
    // B reads the old version (held, local) until the new record arrives.
    let on_b = b.mnt.join(name);
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let got = common::hash_file(&on_b);
        if matches!(&got, Ok(h) if *h == (want_len, want_hash)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{name} on B never read as on A (last: {got:?}): {}",
            first_difference(&on_b, want)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let object = {
        let hex = want_hash.to_hex().to_string();
        b.dir
            .path()
            .join("state/objects")
            .join(&hex[..2])
            .join(&*hex)
    };
    eventually(
        Duration::from_secs(30),
        "B holds the version in full",
        || object.exists(),
    );
    // Let anything still in flight land before counting.
    std::thread::sleep(Duration::from_secs(2));
    ChangeCost {
        write,
        commit,
        link: content::rx_bytes(b) - link0,
        downloaded: b.counter("bytes_downloaded").saturating_sub(dl0),
    }
}

/// A large file changed in place on A, in every way a program changes one
/// (issue 20): B, holding the previous version, reads each new version
/// exactly, and receives only about what changed. Every content check runs
/// first; the bounds on B's received bytes (the targets: an overwrite of
/// 1 MiB costs at most 1 MiB and two pieces, an append 1 MiB and a piece, a
/// truncation metadata only) are checked at the end, all together.
#[test]
fn a_large_file_changed_in_place_reads_the_same_on_both_nodes_and_moves_only_the_changes() {
    use std::os::unix::fs::FileExt;
    const MIB: u64 = 1 << 20;
    const SIZE: u64 = 64 * MIB;
    let (_keys, _net, nodes) = connected_cluster(2);
    let (a, b) = (&nodes[0], &nodes[1]);
    let piece = u64::from(btfs_torrent::meta::piece_length(SIZE));
    let name = "large.bin";
    let mut want = common::pattern(20, SIZE as usize);
    let mut costs: Vec<(&str, ChangeCost, Option<u64>)> = Vec::new();
    let open_rw = |p: &Path| std::fs::OpenOptions::new().write(true).open(p).unwrap();

    let cost = change_and_check(a, b, name, &want, |p| std::fs::write(p, &want).unwrap());
    costs.push(("write 64 MiB", cost, None));

    // (a) 1 MiB in the middle, in place (`dd conv=notrunc`).
    let mid = SIZE / 2 + 12_345;
    let patch = common::pattern(21, MIB as usize);
    want[mid as usize..(mid + MIB) as usize].copy_from_slice(&patch);
    let cost = change_and_check(a, b, name, &want, |p| {
        open_rw(p).write_all_at(&patch, mid).unwrap()
    });
    costs.push((
        "overwrite 1 MiB mid",
        cost,
        Some(wire_bound(MIB + 2 * piece)),
    ));

    // (b) Small unaligned writes: the start, inside, the last byte.
    let small: [(u64, Vec<u8>); 3] = [
        (5, b"abc".to_vec()),
        (20 * MIB + 7, common::pattern(22, 10 << 10)),
        (SIZE - 1, vec![0xA5]),
    ];
    for (off, bytes) in &small {
        want[*off as usize..*off as usize + bytes.len()].copy_from_slice(bytes);
    }
    let cost = change_and_check(a, b, name, &want, |p| {
        let f = open_rw(p);
        for (off, bytes) in &small {
            f.write_all_at(bytes, *off).unwrap();
        }
    });
    costs.push(("3 small writes", cost, Some(wire_bound(3 * piece))));

    // (c) Append 1 MiB.
    let tail = common::pattern(23, MIB as usize);
    want.extend_from_slice(&tail);
    let cost = change_and_check(a, b, name, &want, |p| {
        std::io::Write::write_all(
            &mut std::fs::OpenOptions::new().append(true).open(p).unwrap(),
            &tail,
        )
        .unwrap()
    });
    costs.push(("append 1 MiB", cost, Some(wire_bound(MIB + piece))));

    // (d) Truncate to about half, not on a piece boundary.
    let half = want.len() as u64 / 2 + 4321;
    assert!(!half.is_multiple_of(piece));
    want.truncate(half as usize);
    let cost = change_and_check(a, b, name, &want, |p| open_rw(p).set_len(half).unwrap());
    costs.push(("truncate to half", cost, Some(wire_bound(0))));

    // Extend with set_len: the gap reads as zeros.
    let longer = half + 3 * MIB + 7;
    want.resize(longer as usize, 0);
    let cost = change_and_check(a, b, name, &want, |p| open_rw(p).set_len(longer).unwrap());
    costs.push(("extend by 3 MiB", cost, None));

    // One byte past the end: a hole between.
    let past = longer + MIB + 3;
    want.resize(past as usize, 0);
    want.push(0x5A);
    let cost = change_and_check(a, b, name, &want, |p| {
        open_rw(p).write_all_at(&[0x5A], past).unwrap()
    });
    costs.push(("1 byte past the end", cost, None));

    // (e) A new sparse file: 100 MiB of zeros but 4 KiB at 50 MiB.
    let mut sparse = vec![0u8; 100 * MIB as usize];
    let block = common::pattern(24, 4096);
    sparse[50 * MIB as usize..50 * MIB as usize + 4096].copy_from_slice(&block);
    let cost = change_and_check(a, b, "sparse.bin", &sparse, |p| {
        let f = std::fs::File::create(p).unwrap();
        f.set_len(100 * MIB).unwrap();
        f.write_all_at(&block, 50 * MIB).unwrap();
    });
    costs.push(("sparse 100 MiB", cost, None));

    let mut over = Vec::new();
    for (what, cost, bound) in &costs {
        eprintln!(
            "BENCH {what}: A write {:.1} ms, commit {:.1} ms; B link {} bytes, engine downloaded {} bytes{}",
            cost.write.as_secs_f64() * 1e3,
            cost.commit.as_secs_f64() * 1e3,
            cost.link,
            cost.downloaded,
            bound.map(|b| format!(" (bound {b})")).unwrap_or_default()
        );
        if let Some(bound) = bound
            && cost.link > *bound
        {
            over.push(format!("{what}: {} bytes > {bound}", cost.link));
        }
    }
    assert!(
        over.is_empty(),
        "B received more than the changes (pieces of {piece} bytes): {over:?}"
    );
}
