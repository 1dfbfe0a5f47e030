//! `metrics=` across two nodes: A writes, B reads; scraped over the
//! namespaces' addresses (`metrics_public=on`), B's bytes down from A and
//! A's bytes up to B move with the real transfer, and so does B's fetch
//! latency histogram.

use std::time::Duration;

use super::*;

/// The metrics port of every node here (each namespace has its own).
const METRICS_PORT: u16 = 9464;

/// A node's metrics, fetched from inside its namespace at its address.
fn scrape(node: &NsNode) -> String {
    run_ok(
        "ip",
        &[
            "netns",
            "exec",
            &node.ns,
            "curl",
            "-sS",
            "--max-time",
            "10",
            &format!("http://{}:{METRICS_PORT}/metrics", node.addr),
        ],
    )
}

/// The value of the sample whose name and labels are `series` exactly.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

fn peer_bytes(text: &str, peer: &str, direction: &str) -> f64 {
    sample(
        text,
        &format!("btfs_peer_bytes_total{{peer=\"{peer}\",zone=\"\",direction=\"{direction}\"}}"),
    )
}

#[test]
fn metrics_bytes_per_peer_and_fetch_latency_move_with_a_transfer() {
    let opts = format!(",metrics=0.0.0.0:{METRICS_PORT},metrics_public=on");
    let (_keys, _net, nodes) = cluster_with(&[opts.as_str(); 2]);
    let (a, b) = (&nodes[0], &nodes[1]);
    let (a_id, b_id) = (
        a.status()["peer_id"].as_str().unwrap().to_owned(),
        b.status()["peer_id"].as_str().unwrap().to_owned(),
    );
    let (a0, b0) = (scrape(a), scrape(b));
    let link0 = super::content::rx_bytes(b);
    let reads0 = sample(&b0, "btfs_fetch_first_byte_seconds_count");

    let size = 16usize << 20;
    let data = common::pattern(21, size);
    std::fs::write(a.mnt.join("moved.bin"), &data).unwrap();
    eventually(Duration::from_secs(20), "the file listed on B", || {
        std::fs::metadata(b.mnt.join("moved.bin"))
            .map(|m| m.len())
            .ok()
            == Some(size as u64)
    });
    assert!(std::fs::read(b.mnt.join("moved.bin")).unwrap() == data);

    // Open connections are counted as they go: no wait for them to close.
    let (a1, b1) = (scrape(a), scrape(b));
    let link = (super::content::rx_bytes(b) - link0) as f64;
    let down = peer_bytes(&b1, &a_id, "down") - peer_bytes(&b0, &a_id, "down");
    let up = peer_bytes(&a1, &b_id, "up") - peer_bytes(&a0, &b_id, "up");
    let zone_down = sample(&b1, "btfs_zone_bytes_total{zone=\"\",direction=\"down\"}");
    let reads = sample(&b1, "btfs_fetch_first_byte_seconds_count") - reads0;
    let p50ish = sample(&b1, "btfs_fetch_first_byte_seconds_sum") / reads.max(1.0);
    eprintln!(
        "{size} bytes moved: B down from A {down}, A up to B {up}, B's zone down {zone_down}, B's link received {link}; \
         {reads} remote reads on B, mean {:.1} ms",
        p50ish * 1e3
    );
    let size = size as f64;
    assert!(
        down >= size,
        "B counted {down} bytes down from A for {size}"
    );
    assert!(up >= size, "A counted {up} bytes up to B for {size}");
    // B counts what its librqbit took from A: all of it came over B's
    // link (with the wire's framing and TCP/IP), though not all the link
    // carried reached librqbit (a connection closed with bytes in flight
    // when a stalled read brings its torrent up again). Pieces can come
    // twice (a read's and a whole-file fetch's): the file's size is no
    // upper bound.
    assert!(
        down <= link,
        "B counted {down} bytes down from A, its link received {link}"
    );
    // A counts what its librqbit handed the bridges for B, the bytes in
    // flight at such a close included.
    assert!(
        up >= down * 0.9 && up <= link * 2.0,
        "A counted {up} bytes up to B, B {down} down from A, B's link {link}"
    );
    assert!(zone_down >= down);
    assert!(reads >= 1.0, "B's fetch latency histogram did not move");
    assert!(sample(&b1, "btfs_fuse_op_seconds_count{op=\"read\"}") >= 1.0);
    assert!(
        sample(&a1, "btfs_records_total{event=\"published\"}") >= 1.0,
        "A published nothing"
    );
    assert!(
        sample(&b1, "btfs_records_total{event=\"received\"}")
            + sample(&b1, "btfs_records_total{event=\"synced\"}")
            >= 1.0
    );
    assert_eq!(sample(&b1, "btfs_peers_connected"), 1.0);
    // libp2p's own metrics share the endpoint: the mesh connection and its
    // gossip are counted, and the text has one end.
    let established: f64 = b1
        .lines()
        .filter(|l| l.starts_with("libp2p_swarm_connections_established_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(established >= 1.0, "no libp2p connection counted:\n{b1}");
    assert!(
        b1.lines().any(|l| l.starts_with("libp2p_gossipsub_")),
        "no gossipsub metrics"
    );
    assert_eq!(b1.matches("# EOF").count(), 1);
    assert!(b1.trim_end().ends_with("# EOF"));
}
