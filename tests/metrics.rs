//! `metrics=IP:PORT` through a real mount: the endpoint serves OpenMetrics
//! text whose counters move with real writes; a non-loopback address
//! without `metrics_public=on`, and a taken address, fail the mount.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use common::{Node, btfs, require_fuse};

/// A loopback port free now (the daemon binds it a moment later).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One HTTP request; the whole answer.
fn get(addr: SocketAddr, path: &str) -> String {
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(c, "GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").unwrap();
    let mut out = String::new();
    c.read_to_string(&mut out).unwrap();
    out
}

/// The value of the sample whose name and labels are `series` exactly.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn a_scrape_shows_counters_moving_with_writes() {
    let port = free_port();
    let node = Node::start_with(&format!("metrics=127.0.0.1:{port}"));
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    assert_eq!(
        node.status()["options"]["metrics"],
        format!("127.0.0.1:{port}")
    );

    let first = get(addr, "/metrics");
    assert!(first.starts_with("HTTP/1.1 200 OK\r\n"), "{first}");
    assert!(
        first.contains("Content-Type: application/openmetrics-text; version=1.0.0; charset=utf-8"),
        "{first}"
    );
    assert!(first.ends_with("# EOF\n"), "{first}");
    for name in [
        "btfs_commits_total",
        "btfs_records_total{event=\"published\"}",
        "btfs_live_torrents",
        "btfs_queue_depth{queue=\"announce\"}",
        "btfs_antientropy_rounds_total",
    ] {
        assert!(sample(&first, name).is_some(), "{name} missing:\n{first}");
    }
    let commits = sample(&first, "btfs_commits_total").unwrap();
    let releases = sample(&first, "btfs_fuse_op_seconds_count{op=\"release\"}").unwrap_or(0.0);

    for i in 0..5 {
        std::fs::write(node.path(&format!("f{i}")), vec![i as u8; 100_000]).unwrap();
    }
    // Commits follow release, which follows close(2).
    let deadline = Instant::now() + Duration::from_secs(20);
    let second = loop {
        let text = get(addr, "/metrics");
        if sample(&text, "btfs_commits_total").unwrap() >= commits + 5.0 {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "commits did not move: {commits} before\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    // Writes themselves may bypass the daemon (FUSE passthrough): the
    // creates and releases that commit them do not.
    let moved = sample(&second, "btfs_fuse_op_seconds_count{op=\"release\"}").unwrap_or(0.0);
    assert!(
        moved >= releases + 5.0,
        "FUSE releases {releases} -> {moved}"
    );
    let creates = sample(&second, "btfs_fuse_op_seconds_count{op=\"create\"}");
    assert!(creates >= Some(5.0), "{creates:?} creates:\n{second}");
    assert_eq!(
        sample(&second, "btfs_tree_entries{kind=\"file\"}"),
        Some(5.0)
    );
    println!(
        "commits {commits} -> {}, FUSE releases {releases} -> {moved}, scrape {} bytes",
        sample(&second, "btfs_commits_total").unwrap(),
        second.len()
    );

    // Nothing else is served.
    let other = get(addr, "/");
    assert!(other.starts_with("HTTP/1.1 404"), "{other}");

    // The address is taken: a second mount with it fails, saying so.
    let dir = tempfile::tempdir().unwrap();
    let (mnt, state) = (dir.path().join("mnt"), dir.path().join("state"));
    std::fs::create_dir(&mnt).unwrap();
    let out = btfs(&[
        "mount",
        "test",
        mnt.to_str().unwrap(),
        "-o",
        &format!(
            "state={},listen=127.0.0.1:0,mdns=off,metrics=127.0.0.1:{port}",
            state.display()
        ),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a second mount on a taken metrics port succeeded"
    );
    assert!(
        err.contains(&format!("metrics=127.0.0.1:{port}: cannot listen")),
        "{err}"
    );
}

#[test]
fn a_network_address_needs_metrics_public() {
    require_fuse();
    let dir = tempfile::tempdir().unwrap();
    let (mnt, state) = (dir.path().join("mnt"), dir.path().join("state"));
    std::fs::create_dir(&mnt).unwrap();
    let out = btfs(&[
        "mount",
        "test",
        mnt.to_str().unwrap(),
        "-o",
        &format!(
            "state={},listen=127.0.0.1:0,mdns=off,metrics=192.0.2.1:9100",
            state.display()
        ),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "metrics on a network address was accepted"
    );
    assert!(
        err.contains("metrics=192.0.2.1:9100") && err.contains("metrics_public=on"),
        "{err}"
    );
    assert_eq!(
        err.trim().lines().count(),
        1,
        "the refusal is one line: {err}"
    );
}
