//! `mount -o remount,OPTIONS`: the real mount(8) path, through the helper
//! installed as `/sbin/mount.fuse.btfs` (mount(8) looks for the helper of
//! the type the kernel shows, `fuse.btfs`, on a remount).

use std::{
    fs,
    io::{Read, Seek, SeekFrom},
    path::{Path, PathBuf},
    process::{Command, Output},
    time::{Duration, Instant},
};

use super::{Net, NsNode, PORT, eventually, keygen};
use crate::common::{btfs_bin, pattern};

/// How soon a removed member must show as disconnected.
const CUT_WITHIN: Duration = Duration::from_secs(2);

/// One test at a time has the helper installed.
static INSTALLED: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The helper installed for the test under both names mount(8) may look
/// for (the old ones restored after).
struct Helper {
    installed: Vec<(PathBuf, Option<Vec<u8>>)>,
    _bindir: tempfile::TempDir,
    _one: std::sync::MutexGuard<'static, ()>,
}

impl Helper {
    fn install() -> Self {
        let one = INSTALLED.lock().unwrap_or_else(|e| e.into_inner());
        let bindir = tempfile::tempdir().unwrap();
        fs::copy(btfs_bin(), bindir.path().join("btfs")).unwrap();
        let script = fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/mount-helpers/mount.btfs"
        ))
        .unwrap()
        .replace(
            "BTFS=/usr/local/bin/btfs",
            &format!("BTFS={}/btfs", bindir.path().display()),
        );
        let mut installed = Vec::new();
        for name in ["/sbin/mount.btfs", "/sbin/mount.fuse.btfs"] {
            let path = PathBuf::from(name);
            installed.push((path.clone(), fs::read(&path).ok()));
            fs::write(&path, &script).unwrap();
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
        }
        Self {
            installed,
            _bindir: bindir,
            _one: one,
        }
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        for (path, old) in &self.installed {
            let _ = match old {
                Some(b) => fs::write(path, b),
                None => fs::remove_file(path),
            };
        }
    }
}

/// `mount -o remount,OPTS MNT` (mount(8), the helper, the control socket).
fn remount(mnt: &Path, opts: &str) -> Output {
    Command::new("mount")
        .args(["-o", &format!("remount,{opts}"), mnt.to_str().unwrap()])
        .output()
        .unwrap()
}

fn peer_id(n: &NsNode) -> String {
    n.status()["peer_id"].as_str().unwrap().to_owned()
}

fn connected_to(n: &NsNode, peer: &str) -> bool {
    n.status()["peers"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["id"] == peer && p["connected"] == true)
}

/// B admits A and C; C admits everyone. B keeps a file from A open, then a
/// remount drops A from B's members: A is cut off at once, its new records
/// are refused on B (C still relays them), and the open file reads on.
#[test]
fn a_remount_that_removes_a_member_cuts_it_off_while_a_file_stays_open() {
    let keys = tempfile::tempdir().unwrap();
    let key = keygen(keys.path(), "cluster.key");
    let mut net = Net::new();
    let mut nodes = net.start_nodes(2, &key, ",mdns=on");
    let (pa, pc) = (peer_id(&nodes[0]), peer_id(&nodes[1]));
    let members = keys.path().join("members");
    fs::write(&members, format!("{pa}\n{pc}\n")).unwrap();
    let (ns, addr) = net.add();
    nodes.push(NsNode::start(
        &ns,
        &addr,
        &key,
        &format!(",mdns=on,members={}", members.display()),
    ));
    let (a, c, b) = (&nodes[0], &nodes[1], &nodes[2]);
    let pb = peer_id(b);
    eventually(Duration::from_secs(30), "all three connected", || {
        nodes.iter().all(|n| n.connected_peers() == 2)
    });

    // A file from A, read whole on B and kept open.
    let bytes = pattern(21, 3 << 20);
    fs::write(a.mnt.join("from-a"), &bytes).unwrap();
    eventually(Duration::from_secs(15), "A's file on B", || {
        fs::metadata(b.mnt.join("from-a")).map(|m| m.len()).ok() == Some(bytes.len() as u64)
    });
    let mut open = fs::File::open(b.mnt.join("from-a")).unwrap();
    let mut first = Vec::new();
    open.read_to_end(&mut first).unwrap();
    assert!(first == bytes, "B read A's file");

    // The remount, through mount(8) and the installed helper.
    let _helper = Helper::install();
    let dropped = keys.path().join("members-without-a");
    fs::write(&dropped, format!("{pb}\n{pc}\nremoved {pa}\n")).unwrap();
    let refused_before = b.counter("records_refused");
    let started = Instant::now();
    let out = remount(&b.mnt, &format!("members={}", dropped.display()));
    assert!(
        out.status.success(),
        "mount -o remount: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    eventually(CUT_WITHIN, "A disconnected from B", || {
        !connected_to(b, &pa)
    });
    let cut = started.elapsed();
    eprintln!(
        "A cut off from B {:.0} ms after the remount began",
        cut.as_secs_f64() * 1000.0
    );
    assert!(connected_to(b, &pc), "C stays connected to B");
    assert_eq!(
        b.status()["options"]["members"],
        dropped.to_str().unwrap(),
        "status shows the new members file"
    );

    // A's new record reaches C, and C relays it (gossip and anti-entropy):
    // B refuses it.
    fs::write(a.mnt.join("after"), b"written by a removed member").unwrap();
    eventually(Duration::from_secs(15), "A's new file on C", || {
        c.mnt.join("after").exists()
    });
    let t = Instant::now();
    eventually(Duration::from_secs(45), "B refuses A's new record", || {
        b.counter("records_refused") > refused_before
    });
    eprintln!(
        "B refused A's record {:.1} s after C had it",
        t.elapsed().as_secs_f64()
    );
    assert!(
        !b.mnt.join("after").exists(),
        "A's new file must not appear on B"
    );
    assert!(!connected_to(b, &pa), "A stays cut off");

    // The file B had open reads on, with the same bytes.
    open.seek(SeekFrom::Start(0)).unwrap();
    let mut again = Vec::new();
    open.read_to_end(&mut again).unwrap();
    assert!(
        again == bytes,
        "the open file reads the same after the remount"
    );
    drop(open);
    // C's own writes still reach B.
    fs::write(c.mnt.join("from-c"), b"still a member").unwrap();
    eventually(Duration::from_secs(15), "C's file on B", || {
        b.mnt.join("from-c").exists()
    });
}

/// One node: live options show in `btfs status --json` at once; a remount
/// naming an option that cannot change live is refused with one line and
/// changes nothing, not even the live options it also names.
#[test]
fn live_options_show_in_status_and_the_others_are_refused_in_one_line() {
    let keys = tempfile::tempdir().unwrap();
    let key = keygen(keys.path(), "cluster.key");
    let mut net = Net::new();
    let nodes = net.start_nodes(1, &key, ",mdns=off");
    let n = &nodes[0];
    let _helper = Helper::install();
    let options = || n.status()["options"].clone();
    let before = options();

    let out = remount(&n.mnt, "listen=10.9.9.9:4410,up_rate=1M,state=/elsewhere");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].contains("cannot change live: listen, state"),
        "{err}"
    );
    assert_eq!(options(), before, "a refused remount changes nothing");

    // The current value of a fixed option is no change.
    let same = format!(
        "listen={}:{PORT},up_rate=1M,cache_size=64M,read_timeout=7s",
        n.addr
    );
    let out = remount(&n.mnt, &same);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let o = options();
    assert_eq!(o["up_rate"], 1 << 20);
    assert_eq!(o["cache_size"], 64u64 << 20);
    assert_eq!(o["read_timeout_secs"], 7.0);
    assert_eq!(o["listen"], before["listen"]);

    // A members file that does not parse: refused, nothing changed.
    let bad = keys.path().join("bad-members");
    fs::write(&bad, "not a peer id\n").unwrap();
    let out = remount(&n.mnt, &format!("members={},down_rate=2M", bad.display()));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is not a peer id"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(options()["down_rate"], serde_json::Value::Null);
    assert_eq!(options()["members"], serde_json::Value::Null);

    // `btfs mount NAME MNT -o remount,...` does the same without mount(8).
    let out = Command::new(btfs_bin())
        .args([
            "mount",
            "cluster",
            n.mnt.to_str().unwrap(),
            "-o",
            "remount,prefetch=*.iso",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(options()["prefetch"], "*.iso");
    assert_eq!(options()["up_rate"], 1 << 20, "earlier changes stay");
}
