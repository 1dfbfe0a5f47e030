//! Content over BitTorrent: lazy range reads, failover between holders,
//! corrupt pieces, no holder, non-members, standard clients, prefetch.

use std::{
    io::Read,
    os::unix::fs::FileExt,
    time::{Duration, Instant},
};

use super::*;

/// Bytes the node's namespace received on its link (counted by the kernel,
/// at the host end of its veth).
fn rx_bytes(node: &NsNode) -> u64 {
    let (id, i) = node.ns.strip_prefix("btfs-").unwrap().split_once('-').unwrap();
    let host_end = format!("btfs-v{id}-{i}");
    std::fs::read_to_string(format!("/sys/class/net/{host_end}/statistics/tx_bytes"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

fn write_file(path: &Path, data: &[u8]) {
    std::fs::write(path, data).unwrap();
}

fn wait_listed(path: &Path, size: u64) {
    eventually(Duration::from_secs(20), "the file listed with its size", || {
        std::fs::metadata(path).map(|m| m.len()).ok() == Some(size)
    });
}

fn same_bytes(path: &Path, want: &[u8]) -> bool {
    let mut got = Vec::with_capacity(want.len());
    std::fs::File::open(path)
        .and_then(|mut f| f.read_to_end(&mut got))
        .map(|_| got == want)
        .unwrap_or(false)
}

#[test]
fn a_read_on_another_node_fetches_only_the_pieces_it_touches() {
    let (_keys, _net, nodes) = connected_cluster(2);
    let (a, b) = (&nodes[0], &nodes[1]);
    let data = common::pattern(256, 256 << 20);
    write_file(&a.mnt.join("big.bin"), &data);
    wait_listed(&b.mnt.join("big.bin"), data.len() as u64);

    let before = rx_bytes(b);
    let f = std::fs::File::open(b.mnt.join("big.bin")).unwrap();
    let mut buf = vec![0u8; 4096];
    let off = 128 << 20;
    let started = Instant::now();
    f.read_exact_at(&mut buf, off as u64).unwrap();
    let latency = started.elapsed();
    assert_eq!(buf, data[off..off + 4096]);
    // Let anything still in flight land before counting.
    std::thread::sleep(Duration::from_secs(2));
    let received = rx_bytes(b) - before;
    eprintln!("4 KiB read at 128 MiB: {latency:?}, {received} bytes received by B");
    // Pieces are 256 KiB here: a few pieces, far from the file.
    assert!(received < 4 << 20, "B received {received} bytes for a 4 KiB read");

    let started = Instant::now();
    assert!(same_bytes(&b.mnt.join("big.bin"), &data), "the whole file differs on B");
    eprintln!("full read: {:?}", started.elapsed());
    if std::env::var_os("BTFS_TEST_LOGS").is_some() {
        eprintln!("{}", b.log());
    }
}
