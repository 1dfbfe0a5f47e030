//! The lab's cluster on this one machine: zones (one bridge each), nodes (a
//! network namespace each, with one veth into its zone's bridge, capped in
//! both directions with `tc tbf`), WAN links (a router namespace with one
//! capped veth into each of two bridges), byte counters on every link, and a
//! teardown that leaves nothing behind.
//!
//! Addresses: zone `z` is `10.232.z.0/24`; node `i` of the lab is
//! `10.232.z.(i+1)`; the router of WAN link `w` is `10.232.z.(200+w)` on each
//! of its two bridges. Bridges have no address on the host, so traffic stays
//! between the lab's own namespaces.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use crate::common::{btfs, btfs_bin};

/// The mesh's listen port on every node.
pub(crate) const PORT: u16 = 4410;

/// A zone: its nodes' link rate, and how many nodes.
#[derive(Debug, Clone)]
pub(crate) struct ZoneSpec {
    pub(crate) name: String,
    pub(crate) nodes: usize,
    pub(crate) mbit: u32,
}

/// A WAN link between zones `a` and `b`.
#[derive(Debug, Clone)]
pub(crate) struct WanSpec {
    pub(crate) a: usize,
    pub(crate) b: usize,
    pub(crate) mbit: u32,
}

/// What a scenario's cluster looks like: one table of zones and links.
#[derive(Debug, Clone)]
pub(crate) struct Topology {
    pub(crate) zones: Vec<ZoneSpec>,
    pub(crate) wans: Vec<WanSpec>,
    /// Mount every node with `zone=` its zone's name.
    pub(crate) zone_option: bool,
}

impl Topology {
    /// `n` nodes on one bridge, every link at `mbit`.
    pub(crate) fn flat(n: usize, mbit: u32) -> Self {
        Self {
            zones: vec![ZoneSpec {
                name: "dc1".into(),
                nodes: n,
                mbit,
            }],
            wans: Vec::new(),
            zone_option: false,
        }
    }
}

/// Everything a lab made, for teardown (also from the signal handler).
#[derive(Debug, Default, Clone)]
pub(crate) struct Resources {
    pub(crate) mounts: Vec<PathBuf>,
    pub(crate) namespaces: Vec<String>,
    pub(crate) bridges: Vec<String>,
    pub(crate) dir: Option<PathBuf>,
}

/// The labs alive now, by id: the Ctrl-C handler tears them all down.
pub(crate) static LIVE: Mutex<BTreeMap<u32, Resources>> = Mutex::new(BTreeMap::new());
static NEXT: AtomicU32 = AtomicU32::new(0);

fn record(id: u32, f: impl FnOnce(&mut Resources)) {
    let mut live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
    f(live.entry(id).or_default());
}

/// Runs a command; panics with its output if it fails.
pub(crate) use crate::common::run_ok as sh;

fn quiet(cmd: &str, args: &[&str]) -> bool {
    Command::new(cmd)
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Caps egress of `dev` (inside `ns` if given) at `mbit`.
fn shape(ns: Option<&str>, dev: &str, mbit: u32) {
    // About 25 ms of traffic, at least 32 KiB (tbf needs a burst of at
    // least one timer tick's worth).
    let burst = (u64::from(mbit) * 1_000_000 / 8 / 40).max(32 << 10);
    let (rate, burst) = (format!("{mbit}mbit"), format!("{burst}"));
    let tc = [
        "qdisc", "add", "dev", dev, "root", "tbf", "rate", &rate, "burst", &burst, "latency",
        "200ms",
    ];
    match ns {
        Some(ns) => {
            let mut args = vec!["netns", "exec", ns, "tc"];
            args.extend_from_slice(&tc);
            sh("ip", &args);
        }
        None => {
            sh("tc", &tc);
        }
    }
}

/// A link's byte counters, read on its host end (which sees the other
/// direction: what it transmits, the namespace receives).
fn host_counters(dev: &str) -> (u64, u64) {
    let read = |what: &str| {
        fs::read_to_string(format!("/sys/class/net/{dev}/statistics/{what}_bytes"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    };
    (read("rx"), read("tx"))
}

/// One node: a namespace on a zone's bridge, and its btfs mount.
#[derive(Debug)]
pub(crate) struct Node {
    pub(crate) i: usize,
    pub(crate) zone: usize,
    pub(crate) ns: String,
    pub(crate) addr: String,
    host_end: String,
    pub(crate) mnt: PathBuf,
    pub(crate) state: PathBuf,
    /// The options it is mounted with (`mount -o`).
    pub(crate) opts: String,
    pub(crate) mounted: bool,
}

/// Bytes a link carried, as seen from the namespace's side.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Bytes {
    pub(crate) rx: u64,
    pub(crate) tx: u64,
}

impl std::ops::Sub for Bytes {
    type Output = Bytes;
    fn sub(self, o: Bytes) -> Bytes {
        Bytes {
            rx: self.rx.saturating_sub(o.rx),
            tx: self.tx.saturating_sub(o.tx),
        }
    }
}

impl Node {
    /// What its link carried so far (received, sent by the node).
    pub(crate) fn bytes(&self) -> Bytes {
        let (host_rx, host_tx) = host_counters(&self.host_end);
        Bytes {
            rx: host_tx,
            tx: host_rx,
        }
    }

    /// The file `rel` in its mount.
    pub(crate) fn path(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    /// Mounts it as an operator would: `mount -t btfs` through mount.btfs,
    /// in its network namespace (`nsenter --net`: the mount is visible on
    /// the host).
    pub(crate) fn mount(&mut self) {
        let out = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.ns))
            .args(["mount", "-t", "btfs", "lab"])
            .arg(&self.mnt)
            .args(["-o", &self.opts])
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mount -t btfs in {}: {}{}\n{}",
            self.ns,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log_tail(40)
        );
        self.mounted = true;
    }

    /// `umount`, as an operator would (the daemon flushes and exits).
    pub(crate) fn umount(&mut self) {
        if !self.mounted {
            return;
        }
        if !quiet("umount", &[&self.mnt.to_string_lossy()]) {
            quiet("umount", &["-l", &self.mnt.to_string_lossy()]);
        }
        self.mounted = false;
        self.wait_no_daemon(Duration::from_secs(20));
    }

    /// Kills its daemon with SIGKILL and clears the dead mount.
    pub(crate) fn kill9(&mut self) {
        for pid in ns_pids(&self.ns) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        self.wait_no_daemon(Duration::from_secs(10));
        quiet("umount", &["-l", &self.mnt.to_string_lossy()]);
        self.mounted = false;
    }

    fn wait_no_daemon(&self, limit: Duration) {
        let start = Instant::now();
        while !ns_pids(&self.ns).is_empty() && start.elapsed() < limit {
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `btfs status --json` of its mount.
    pub(crate) fn status(&self) -> serde_json::Value {
        let out = btfs(&["status", &self.mnt.to_string_lossy(), "--json"]);
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
    }

    pub(crate) fn connected_peers(&self) -> usize {
        self.status()["peers"]
            .as_array()
            .map_or(0, |p| p.iter().filter(|p| p["connected"] == true).count())
    }

    pub(crate) fn log_tail(&self, lines: usize) -> String {
        let log = fs::read_to_string(self.state.join("btfs.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(lines).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }
}

/// Pids of the processes in namespace `ns`.
pub(crate) fn ns_pids(ns: &str) -> Vec<i32> {
    Command::new("ip")
        .args(["netns", "pids", ns])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// A WAN link: a router namespace between two zones.
#[derive(Debug)]
pub(crate) struct Wan {
    pub(crate) mbit: u32,
    /// Host ends of its legs into bridge `a` and bridge `b`.
    leg_a: String,
    leg_b: String,
}

impl Wan {
    /// Bytes that crossed from its first zone to its second, and back.
    pub(crate) fn crossed(&self) -> (u64, u64) {
        // What the bridge sends into a leg goes to the router.
        (host_counters(&self.leg_a).1, host_counters(&self.leg_b).1)
    }
}

/// A cluster of btfs nodes (not mounted until `mount_all`).
#[derive(Debug)]
pub(crate) struct Lab {
    id: u32,
    pub(crate) topo: Topology,
    pub(crate) nodes: Vec<Node>,
    pub(crate) wans: Vec<Wan>,
    pub(crate) dir: PathBuf,
    pub(crate) key: PathBuf,
}

impl Lab {
    /// Builds the namespaces, bridges, routers and caps of `topo`; every
    /// node gets an empty state directory and `extra` mount options.
    pub(crate) fn build(topo: &Topology, extra: &str) -> Lab {
        crate::common::require_fuse();
        let id = (std::process::id() % 1000) * 100 + NEXT.fetch_add(1, Ordering::SeqCst) % 100;
        let dir = std::env::temp_dir().join(format!("btfs-lab-{id}"));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("lab dir");
        record(id, |r| r.dir = Some(dir.clone()));
        let key = dir.join("swarm.key");
        let out = btfs(&["keygen", &key.to_string_lossy()]);
        assert!(out.status.success(), "btfs keygen: {out:?}");
        let mut lab = Lab {
            id,
            topo: topo.clone(),
            nodes: Vec::new(),
            wans: Vec::new(),
            dir,
            key,
        };
        for z in 0..topo.zones.len() {
            let br = format!("btfs-b{id}z{z}");
            record(id, |r| r.bridges.push(br.clone()));
            sh("ip", &["link", "add", &br, "type", "bridge"]);
            sh("ip", &["link", "set", &br, "up"]);
        }
        for (z, zone) in topo.zones.iter().enumerate() {
            for _ in 0..zone.nodes {
                lab.add_node(z, zone.mbit);
            }
        }
        for (w, spec) in topo.wans.iter().enumerate() {
            lab.add_wan(w, spec);
        }
        // Bootstrap across zones: mDNS does not cross a router.
        let seeds: Vec<String> = topo
            .zones
            .iter()
            .enumerate()
            .filter_map(|(z, _)| lab.nodes.iter().find(|n| n.zone == z))
            .map(|n| format!("{}:{PORT}", n.addr))
            .collect();
        for node in &mut lab.nodes {
            let mut opts = format!(
                "key={},listen={}:{PORT},state={},mdns=on",
                lab.key.display(),
                node.addr,
                node.state.display()
            );
            let others: Vec<&String> = seeds
                .iter()
                .filter(|s| !s.starts_with(&format!("{}:", node.addr)))
                .collect();
            if topo.zones.len() > 1 && !others.is_empty() {
                let list: Vec<&str> = others.iter().map(|s| s.as_str()).collect();
                opts.push_str(&format!(",peers={}", list.join("/")));
            }
            if topo.zone_option {
                opts.push_str(&format!(",zone={}", topo.zones[node.zone].name));
            }
            opts.push_str(extra);
            node.opts = opts;
        }
        lab
    }

    fn add_node(&mut self, z: usize, mbit: u32) {
        let i = self.nodes.len();
        let id = self.id;
        let ns = format!("btfs-lab{id}-n{i}");
        let host_end = format!("btfs-n{id}-{i}");
        let addr = format!("10.232.{z}.{}", i + 1);
        record(id, |r| r.namespaces.push(ns.clone()));
        sh("ip", &["netns", "add", &ns]);
        sh("ip", &["-n", &ns, "link", "set", "lo", "up"]);
        sh(
            "ip",
            &[
                "link", "add", &host_end, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ],
        );
        let br = format!("btfs-b{id}z{z}");
        sh("ip", &["link", "set", &host_end, "master", &br, "up"]);
        sh(
            "ip",
            &[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                "eth0",
            ],
        );
        sh("ip", &["-n", &ns, "link", "set", "eth0", "up"]);
        sh(
            "ip",
            &["-n", &ns, "route", "add", "224.0.0.0/4", "dev", "eth0"],
        );
        shape(None, &host_end, mbit);
        shape(Some(&ns), "eth0", mbit);
        let home = self.dir.join(format!("n{i}"));
        let mnt = home.join("mnt");
        fs::create_dir_all(&mnt).expect("mountpoint");
        record(id, |r| r.mounts.push(mnt.clone()));
        self.nodes.push(Node {
            i,
            zone: z,
            ns,
            addr,
            host_end,
            mnt,
            state: home.join("state"),
            opts: String::new(),
            mounted: false,
        });
    }

    fn add_wan(&mut self, w: usize, spec: &WanSpec) {
        let id = self.id;
        let ns = format!("btfs-lab{id}-w{w}");
        record(id, |r| r.namespaces.push(ns.clone()));
        sh("ip", &["netns", "add", &ns]);
        sh("ip", &["-n", &ns, "link", "set", "lo", "up"]);
        sh(
            "ip",
            &[
                "netns",
                "exec",
                &ns,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
            ],
        );
        let mut legs = Vec::new();
        for (side, z) in [("a", spec.a), ("b", spec.b)] {
            let host_end = format!("btfs-w{id}-{w}{side}");
            let inside = format!("leg{side}");
            sh(
                "ip",
                &[
                    "link", "add", &host_end, "type", "veth", "peer", "name", &inside, "netns", &ns,
                ],
            );
            sh(
                "ip",
                &[
                    "link",
                    "set",
                    &host_end,
                    "master",
                    &format!("btfs-b{id}z{z}"),
                    "up",
                ],
            );
            let addr = format!("10.232.{z}.{}/24", 200 + w);
            sh("ip", &["-n", &ns, "addr", "add", &addr, "dev", &inside]);
            sh("ip", &["-n", &ns, "link", "set", &inside, "up"]);
            shape(None, &host_end, spec.mbit);
            shape(Some(&ns), &inside, spec.mbit);
            legs.push(host_end);
        }
        // Routes: each side's nodes reach the other side through this router.
        for node in &self.nodes {
            let other = if node.zone == spec.a {
                spec.b
            } else if node.zone == spec.b {
                spec.a
            } else {
                continue;
            };
            sh(
                "ip",
                &[
                    "-n",
                    &node.ns,
                    "route",
                    "add",
                    &format!("10.232.{other}.0/24"),
                    "via",
                    &format!("10.232.{}.{}", node.zone, 200 + w),
                ],
            );
        }
        self.wans.push(Wan {
            mbit: spec.mbit,
            leg_a: legs[0].clone(),
            leg_b: legs[1].clone(),
        });
    }

    /// Mounts every node, then waits until each is connected to every
    /// other (mDNS in a zone, bootstrap peers across).
    pub(crate) fn mount_all(&mut self) {
        for node in &mut self.nodes {
            node.mount();
        }
        self.wait_connected(Duration::from_secs(30));
    }

    /// Waits until every mounted node is connected to every other mounted
    /// one.
    pub(crate) fn wait_connected(&self, limit: Duration) {
        let up: Vec<&Node> = self.nodes.iter().filter(|n| n.mounted).collect();
        let want = up.len().saturating_sub(1);
        let start = Instant::now();
        loop {
            let counts: Vec<usize> = up.iter().map(|n| n.connected_peers()).collect();
            if counts.iter().all(|c| *c >= want) {
                return;
            }
            assert!(
                start.elapsed() < limit,
                "nodes not all connected after {limit:?}: {counts:?}\n{}",
                up[0].log_tail(40)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub(crate) fn umount_all(&mut self) {
        for node in &mut self.nodes {
            node.umount();
        }
    }

    /// Every node's link counters now.
    pub(crate) fn bytes(&self) -> Vec<Bytes> {
        self.nodes.iter().map(Node::bytes).collect()
    }

    /// Bytes each WAN link carried (a→b, b→a) now.
    pub(crate) fn crossed(&self) -> Vec<(u64, u64)> {
        self.wans.iter().map(Wan::crossed).collect()
    }

    /// A path in the lab's own directory (not in any mount).
    pub(crate) fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if node.mounted && std::thread::panicking() {
                eprintln!(
                    "--- last lines of the log of node {} ---\n{}",
                    node.i,
                    node.log_tail(60)
                );
            }
        }
        // `BTFS_LAB_LOGS=DIR` keeps every node's log.
        if let Some(dir) = std::env::var_os("BTFS_LAB_LOGS") {
            let dir = PathBuf::from(dir);
            let _ = fs::create_dir_all(&dir);
            for node in &self.nodes {
                let _ = fs::copy(
                    node.state.join("btfs.log"),
                    dir.join(format!("lab{}-n{}.log", self.id, node.i)),
                );
            }
        }
        let res = LIVE
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
        if let Some(res) = res {
            teardown(&res);
        }
    }
}

/// Removes everything in `res`: unmounts (the daemons flush and exit), kills
/// whatever is left in the namespaces, deletes them and the bridges, and
/// the lab's directory.
pub(crate) fn teardown(res: &Resources) {
    for mnt in &res.mounts {
        if is_mounted(mnt) && !quiet("umount", &[&mnt.to_string_lossy()]) {
            quiet("umount", &["-l", &mnt.to_string_lossy()]);
        }
    }
    let start = Instant::now();
    while res.namespaces.iter().any(|ns| !ns_pids(ns).is_empty())
        && start.elapsed() < Duration::from_secs(10)
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    for ns in &res.namespaces {
        for pid in ns_pids(ns) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
    for mnt in &res.mounts {
        if is_mounted(mnt) {
            quiet("umount", &["-l", &mnt.to_string_lossy()]);
        }
    }
    for ns in &res.namespaces {
        quiet("ip", &["netns", "del", ns]);
    }
    for br in &res.bridges {
        quiet("ip", &["link", "del", br]);
    }
    if let Some(dir) = &res.dir {
        let _ = fs::remove_dir_all(dir);
    }
}

fn is_mounted(p: &Path) -> bool {
    let p = p.to_string_lossy();
    fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(&*p))
}

/// Tears down every lab alive (the Ctrl-C handler).
pub(crate) fn teardown_all() {
    let all: Vec<Resources> = {
        let mut live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
        std::mem::take(&mut *live).into_values().collect()
    };
    for res in &all {
        teardown(res);
    }
}

/// `/sbin/mount.btfs` for this run, pointing at the binary under test
/// (whatever was there is put back when dropped).
#[derive(Debug)]
pub(crate) struct Helper {
    backup: Option<Vec<u8>>,
}

const HELPER: &str = "/sbin/mount.btfs";

impl Helper {
    pub(crate) fn install() -> Helper {
        let backup = fs::read(HELPER).ok();
        let script = include_str!("../../mount-helpers/mount.btfs")
            .replace("BTFS=/usr/local/bin/btfs", &format!("BTFS={}", btfs_bin()));
        fs::write(HELPER, script).expect("install /sbin/mount.btfs");
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(HELPER, fs::Permissions::from_mode(0o755)).expect("chmod helper");
        *HELPER_BACKUP.lock().unwrap_or_else(|e| e.into_inner()) = Some(backup.clone());
        Helper { backup }
    }
}

/// What `/sbin/mount.btfs` was before the lab (for the Ctrl-C handler).
pub(crate) static HELPER_BACKUP: Mutex<Option<Option<Vec<u8>>>> = Mutex::new(None);

pub(crate) fn restore_helper(backup: &Option<Vec<u8>>) {
    match backup {
        Some(b) => {
            let _ = fs::write(HELPER, b);
        }
        None => {
            let _ = fs::remove_file(HELPER);
        }
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        restore_helper(&self.backup);
        HELPER_BACKUP
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
    }
}
