//! The lab's scenarios. Each builds its cluster from empty state, runs, and
//! returns a `Report` (one table, one CSV, the targets); the lab is torn
//! down when the scenario returns or panics.

use std::{
    fs,
    io::Read,
    path::Path,
    sync::{Arc, Barrier, mpsc},
    time::{Duration, Instant},
};

use crate::{
    baseline,
    common::pattern,
    net::{Bytes, Lab, Topology, WanSpec, ZoneSpec},
    report::{Report, max, median, mib, secs},
};

const MIB: u64 = 1 << 20;

/// How the lab runs: sizes and bounds of the quick subset, or the full ones.
#[derive(Debug, Clone)]
pub(crate) struct Opts {
    pub(crate) quick: bool,
    /// Run the HTTP and libtorrent baselines too.
    pub(crate) baselines: bool,
    /// Cluster sizes of the fan-out.
    pub(crate) sizes: Vec<usize>,
}

/// Seconds one link at `mbit` takes to carry `bytes`.
fn link_secs(bytes: u64, mbit: u32) -> f64 {
    bytes as f64 * 8.0 / (f64::from(mbit) * 1e6)
}

/// Writes `data` as `name` on `writer`'s mount and waits until every node
/// of `readers` lists it with its full size.
fn publish(lab: &Lab, writer: usize, readers: &[usize], name: &str, data: &[u8]) -> Duration {
    let t0 = Instant::now();
    fs::write(lab.nodes[writer].path(name), data).expect("write into the writer's mount");
    for &r in readers {
        let p = lab.nodes[r].path(name);
        while fs::metadata(&p).map(|m| m.len()).ok() != Some(data.len() as u64) {
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "{name} not listed on node {r} after 60 s"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    t0.elapsed()
}

/// Reads `path` in full (1 MiB reads); its blake3 and the longest single
/// read.
fn read_whole(path: &Path) -> std::io::Result<(blake3::Hash, Duration)> {
    let mut f = fs::File::open(path)?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; MIB as usize];
    let mut worst = Duration::ZERO;
    loop {
        let t = Instant::now();
        let n = f.read(&mut buf)?;
        worst = worst.max(t.elapsed());
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok((h.finalize(), worst))
}

/// Kills and restarts during a fan-out.
#[derive(Debug, Clone, Default)]
struct Churn {
    /// Readers killed with SIGKILL and mounted again, and when (seconds
    /// after the readers started).
    readers: Vec<(usize, f64)>,
    /// Kill and restart the writer once one reader holds the whole file.
    writer: bool,
}

/// A btfs fan-out's outcome.
#[derive(Debug)]
struct FanRun {
    done: Vec<(usize, Duration)>,
    worst_read: Duration,
    bytes: Vec<Bytes>,
    crossed: Vec<(u64, u64)>,
    /// Readers whose read was cut by a crash of their own node.
    interrupted: Vec<usize>,
}

/// `readers` read `name` (already listed) in full at once; `churn` kills
/// and restarts nodes meanwhile. Every reader must end with `want`.
fn btfs_fanout(
    lab: &mut Lab,
    writer: usize,
    readers: &[usize],
    name: &str,
    want: blake3::Hash,
    churn: &Churn,
    limit: Duration,
) -> FanRun {
    let before = lab.bytes();
    let crossed_before = lab.crossed();
    let go = Arc::new(Barrier::new(readers.len() + 1));
    let (tx, rx) = mpsc::channel::<(usize, Duration, Duration, bool)>();
    for &r in readers {
        let (path, go, tx) = (lab.nodes[r].path(name), go.clone(), tx.clone());
        std::thread::spawn(move || {
            go.wait();
            let t0 = Instant::now();
            let mut worst = Duration::ZERO;
            let mut cut = false;
            loop {
                match read_whole(&path) {
                    Ok((h, w)) => {
                        assert_eq!(h, want, "node {r} read other bytes");
                        worst = worst.max(w);
                        break;
                    }
                    Err(e) => {
                        // Its own node crashed (the lab restarts it): read
                        // again, from the start, once it is back.
                        cut = true;
                        if t0.elapsed() > limit {
                            panic!("node {r}: {e}");
                        }
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
            let _ = tx.send((r, t0.elapsed(), worst, cut));
        });
    }
    go.wait();
    let t0 = Instant::now();
    let mut done: Vec<(usize, Duration)> = Vec::new();
    let mut worst_read = Duration::ZERO;
    let mut interrupted = Vec::new();
    let mut kills = churn.readers.clone();
    kills.sort_by(|a, b| a.1.total_cmp(&b.1));
    let mut writer_due = churn.writer;
    while done.len() < readers.len() {
        if let Some(&(victim, at)) = kills.first()
            && t0.elapsed().as_secs_f64() >= at
        {
            kills.remove(0);
            println!(
                "  churn: kill -9 node {victim} at {:.1} s, mount again",
                t0.elapsed().as_secs_f64()
            );
            lab.nodes[victim].kill9();
            lab.nodes[victim].mount();
        }
        if writer_due && !done.is_empty() {
            writer_due = false;
            println!(
                "  churn: kill -9 the writer at {:.1} s (node {} holds the file), mount again",
                t0.elapsed().as_secs_f64(),
                done[0].0
            );
            lab.nodes[writer].kill9();
            lab.nodes[writer].mount();
        }
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok((r, t, w, cut)) => {
                done.push((r, t));
                worst_read = worst_read.max(w);
                if cut {
                    interrupted.push(r);
                }
            }
            Err(_) => assert!(
                t0.elapsed() < limit,
                "readers not done after {limit:?}: done {done:?}"
            ),
        }
    }
    let after = lab.bytes();
    let crossed: Vec<(u64, u64)> = lab
        .crossed()
        .iter()
        .zip(&crossed_before)
        .map(|(a, b)| (a.0 - b.0, a.1 - b.1))
        .collect();
    FanRun {
        done,
        worst_read,
        bytes: after.iter().zip(&before).map(|(a, b)| *a - *b).collect(),
        crossed,
        interrupted,
    }
}

/// All readers done, slowest/median, from `done`.
fn spread(done: &[(usize, Duration)]) -> (f64, f64) {
    let t: Vec<f64> = done.iter().map(|d| d.1.as_secs_f64()).collect();
    let m = median(&t);
    (max(&t), if m > 0.0 { max(&t) / m } else { 0.0 })
}

fn per_node_csv(
    rep: &mut Report,
    tag: &str,
    system: &str,
    lab: &Lab,
    writer: usize,
    done: &[(usize, Duration)],
    bytes: &[Bytes],
) {
    for (i, b) in bytes.iter().enumerate() {
        let role = if i == writer { "writer" } else { "reader" };
        let t = done
            .iter()
            .find(|d| d.0 == i)
            .map_or(String::new(), |d| secs(d.1));
        rep.csv(vec![
            tag.into(),
            system.into(),
            i.to_string(),
            lab.topo.zones[lab.nodes[i].zone].name.clone(),
            role.into(),
            t,
            b.rx.to_string(),
            b.tx.to_string(),
        ]);
    }
}

const NODE_CSV: &[&str] = &[
    "run", "system", "node", "zone", "role", "done_s", "rx_bytes", "tx_bytes",
];

/// Scenario 1: one writer, N−1 readers of the same file at once, every link
/// at the same rate; btfs, then HTTP and libtorrent on the same lab.
pub(crate) fn fanout(o: &Opts) -> (Report, Vec<(usize, f64, f64, f64)>) {
    // The quick subset reads 64 MiB too: a smaller file takes less time
    // than librqbit's idle request loop sleeps (up to 5 s, see
    // docs/BENCHMARKS.md), and measures that sleep, not the swarm. Its
    // bound fails a fall-back to a central-server pattern (every reader
    // served by the writer alone: (N−1) × S/B).
    let (size, mbit) = (64 * MIB, 80);
    let bound = |n: usize| if o.quick { (n - 1) as f64 } else { 1.25 };
    let mut rep = Report::new(
        "fanout",
        &[
            "nodes",
            "S/B s",
            "btfs ×S/B",
            "slowest/median",
            "HTTP ×S/B",
            "libtorrent ×S/B",
            "writer sent ×S",
            "readers sent ×S",
            "most received ×S",
        ],
        NODE_CSV,
    );
    let sb = link_secs(size, mbit);
    rep.note(format!(
        "S = {} MiB, every link capped at {mbit} Mbit/s both ways (tc tbf); S/B = {sb:.2} s",
        size / MIB
    ));
    let mut points = Vec::new();
    for &n in &o.sizes {
        let mut lab = Lab::build(&Topology::flat(n, mbit), "");
        lab.mount_all();
        let data = pattern(n as u64, size as usize);
        let want = blake3::hash(&data);
        let src_dir = lab.file("src");
        fs::create_dir_all(&src_dir).expect("src dir");
        let src = src_dir.join("image.bin");
        fs::write(&src, &data).expect("source copy");
        let readers: Vec<usize> = (1..n).collect();
        publish(&lab, 0, &readers, "image.bin", &data);
        let limit = Duration::from_secs_f64(sb * 20.0 + 60.0);
        let run = btfs_fanout(
            &mut lab,
            0,
            &readers,
            "image.bin",
            want,
            &Churn::default(),
            limit,
        );
        lab.umount_all();
        let (all, ratio) = spread(&run.done);
        per_node_csv(
            &mut rep,
            &format!("n{n}"),
            "btfs",
            &lab,
            0,
            &run.done,
            &run.bytes,
        );
        let (http, lt) = if !o.baselines {
            (None, None)
        } else {
            let b0 = lab.bytes();
            let h = baseline::http(
                &lab,
                0,
                &readers,
                &src,
                Duration::from_secs_f64(sb * 3.0 * n as f64 + 60.0),
            );
            let hb: Vec<Bytes> = lab.bytes().iter().zip(&b0).map(|(a, b)| *a - *b).collect();
            per_node_csv(&mut rep, &format!("n{n}"), "http", &lab, 0, &h.done, &hb);
            let b0 = lab.bytes();
            let l = baseline::swarm(&lab, 0, &readers, &src, limit);
            let lb: Vec<Bytes> = lab.bytes().iter().zip(&b0).map(|(a, b)| *a - *b).collect();
            per_node_csv(
                &mut rep,
                &format!("n{n}"),
                "libtorrent",
                &lab,
                0,
                &l.done,
                &lb,
            );
            (Some(spread(&h.done).0 / sb), Some(spread(&l.done).0 / sb))
        };
        let s = size as f64;
        let readers_sent: u64 = readers.iter().map(|&r| run.bytes[r].tx).sum();
        let most_rx = readers.iter().map(|&r| run.bytes[r].rx).max().unwrap_or(0);
        let fmt = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.2}"));
        rep.row(vec![
            n.to_string(),
            format!("{sb:.2}"),
            format!("{:.2}", all / sb),
            format!("{ratio:.2}"),
            fmt(http),
            fmt(lt),
            format!("{:.2}", run.bytes[0].tx as f64 / s),
            format!("{:.2}", readers_sent as f64 / s),
            format!("{:.2}", most_rx as f64 / s),
        ]);
        rep.at_most(
            format!("N={n}: all readers done, × S/B"),
            all / sb,
            bound(n),
        );
        if !o.quick {
            rep.at_most(format!("N={n}: slowest / median reader"), ratio, 1.2);
        }
        points.push((n, all / sb, http.unwrap_or(0.0), lt.unwrap_or(0.0)));
    }
    (rep, points)
}

/// Scenario 4: a fan-out with readers and the writer killed (-9) and
/// mounted again meanwhile.
pub(crate) fn churn(o: &Opts) -> Report {
    let (n, size, mbit) = if o.quick {
        (4, 32 * MIB, 80)
    } else {
        (6, 1024 * MIB, 200)
    };
    let sb = link_secs(size, mbit);
    let mut lab = Lab::build(&Topology::flat(n, mbit), "");
    lab.mount_all();
    let read_timeout = 30.0;
    let data = pattern(7, size as usize);
    let want = blake3::hash(&data);
    let readers: Vec<usize> = (1..n).collect();
    publish(&lab, 0, &readers, "big.bin", &data);
    drop(data);
    let churn = Churn {
        readers: vec![(1, sb * 0.25), (2, sb * 0.5)],
        writer: true,
    };
    let limit = Duration::from_secs_f64(sb * 20.0 + 120.0);
    let run = btfs_fanout(&mut lab, 0, &readers, "big.bin", want, &churn, limit);
    let mut rep = Report::new(
        "churn",
        &[
            "node",
            "role",
            "done s",
            "received MiB",
            "received ×S",
            "sent MiB",
        ],
        NODE_CSV,
    );
    rep.note(format!(
        "{n} nodes, S = {} MiB at {mbit} Mbit/s (S/B = {sb:.1} s); nodes 1 and 2 killed at {:.1} s and {:.1} s, the writer once one reader held the file; every reader's blake3 matched",
        size / MIB,
        sb * 0.25,
        sb * 0.5
    ));
    for (i, b) in run.bytes.iter().enumerate() {
        let role = match i {
            0 => "writer (killed once)",
            1 | 2 => "reader, killed",
            _ => "reader",
        };
        let t = run
            .done
            .iter()
            .find(|d| d.0 == i)
            .map_or("-".into(), |d| secs(d.1));
        rep.row(vec![
            i.to_string(),
            role.into(),
            t,
            mib(b.rx),
            format!("{:.2}", b.rx as f64 / size as f64),
            mib(b.tx),
        ]);
    }
    per_node_csv(&mut rep, "churn", "btfs", &lab, 0, &run.done, &run.bytes);
    let (all, _) = spread(&run.done);
    rep.at_most(
        "longest single read, s (read_timeout)",
        run.worst_read.as_secs_f64(),
        read_timeout,
    );
    // Pieces kept over the crash: a restarted reader does not fetch the
    // file again from the start. It may fetch again what reached it in the
    // last second before the kill (the pieces fetched are written down
    // every second) and what was in flight (1 MiB a connection), besides
    // the duplicates every reader of a fan-out receives (up to 1.25 × S in
    // the full runs, see docs/BENCHMARKS.md).
    let lost = f64::from(mbit) * 1e6 / 8.0 + ((n - 1) as u64 * MIB) as f64;
    let kept_bound = 1.25 + lost / size as f64;
    for v in [1usize, 2] {
        rep.at_most(
            format!("node {v} (killed, restarted) received × S"),
            run.bytes[v].rx as f64 / size as f64,
            kept_bound,
        );
    }
    if o.quick {
        rep.at_most("all readers done, × S/B", all / sb, 2.0 * 3.0);
    }
    rep.note(format!(
        "readers whose read was cut by their crash: {:?}",
        run.interrupted
    ));
    rep
}

/// Scenario 2: two zones of three nodes, a WAN 10× slower than in-zone
/// links; a file written in zone 1 is read at once by all of zone 2.
pub(crate) fn zones(o: &Opts) -> Report {
    let size = 32 * MIB;
    let (fast, slow) = (200, 20);
    let topo = |zone_option| Topology {
        zones: vec![
            ZoneSpec {
                name: "dc1".into(),
                nodes: 3,
                mbit: fast,
            },
            ZoneSpec {
                name: "dc2".into(),
                nodes: 3,
                mbit: fast,
            },
        ],
        wans: vec![WanSpec {
            a: 0,
            b: 1,
            mbit: slow,
        }],
        zone_option,
    };
    let t_slow = link_secs(size, slow);
    let mut rep = Report::new(
        "zones",
        &[
            "zone=",
            "dc2 done s",
            "× one slow-link transfer",
            "WAN dc1→dc2 MiB",
            "WAN ×S",
            "dc2 nodes received MiB",
        ],
        NODE_CSV,
    );
    rep.note(format!(
        "dc1 and dc2: three nodes each at {fast} Mbit/s, joined by a router at {slow} Mbit/s; S = {} MiB; one slow-link transfer = {t_slow:.2} s",
        size / MIB
    ));
    let modes: &[bool] = if o.quick { &[true] } else { &[false, true] };
    for &zoned in modes {
        let mut lab = Lab::build(&topo(zoned), "");
        lab.mount_all();
        if zoned {
            check_zones_in_status(&lab, &mut rep);
        }
        let data = pattern(11, size as usize);
        let want = blake3::hash(&data);
        let readers = [3usize, 4, 5];
        publish(&lab, 0, &readers, "dataset.bin", &data);
        let limit = Duration::from_secs_f64(t_slow * 10.0 + 60.0);
        let run = btfs_fanout(
            &mut lab,
            0,
            &readers,
            "dataset.bin",
            want,
            &Churn::default(),
            limit,
        );
        let (all, _) = spread(&run.done);
        let crossed = run.crossed[0].0;
        let tag = if zoned { "zoned" } else { "no zone" };
        per_node_csv(&mut rep, tag, "btfs", &lab, 0, &run.done, &run.bytes);
        rep.csv(vec![
            tag.into(),
            "btfs".into(),
            "wan".into(),
            "dc1-dc2".into(),
            "router".into(),
            String::new(),
            run.crossed[0].1.to_string(),
            crossed.to_string(),
        ]);
        let rx: Vec<String> = readers.iter().map(|&r| mib(run.bytes[r].rx)).collect();
        rep.row(vec![
            if zoned { "yes".into() } else { "no".into() },
            format!("{all:.2}"),
            format!("{:.2}", all / t_slow),
            mib(crossed),
            format!("{:.2}", crossed as f64 / size as f64),
            rx.join(", "),
        ]);
        if zoned {
            rep.at_most(
                "bytes crossing the WAN, × S",
                crossed as f64 / size as f64,
                1.15,
            );
            rep.at_most("dc2 done, × one slow-link transfer", all / t_slow, 1.3);
        }
    }
    rep
}

/// `btfs status` names every peer's zone.
fn check_zones_in_status(lab: &Lab, rep: &mut Report) {
    let st = lab.nodes[3].status();
    let peers = st["peers"].as_array().cloned().unwrap_or_default();
    let zones: Vec<String> = peers
        .iter()
        .filter(|p| p["connected"] == true)
        .map(|p| p["zone"].as_str().unwrap_or("-").to_owned())
        .collect();
    let named = zones.iter().filter(|z| *z == "dc1" || *z == "dc2").count();
    rep.note(format!(
        "btfs status on node 3 names its peers' zones: {zones:?}"
    ));
    assert_eq!(
        named,
        zones.len(),
        "btfs status should show every peer's zone: {st}"
    );
}

/// Scenario 3: three zones, A–C slow, A–B and B–C fast: a file written in A
/// and read in B and C reaches C mostly through B.
pub(crate) fn reflow(_o: &Opts) -> Report {
    let size = 64 * MIB;
    let (zone, fast, slow) = (200, 100, 10);
    let topo = Topology {
        zones: vec![
            ZoneSpec {
                name: "a".into(),
                nodes: 1,
                mbit: zone,
            },
            ZoneSpec {
                name: "b".into(),
                nodes: 2,
                mbit: zone,
            },
            ZoneSpec {
                name: "c".into(),
                nodes: 2,
                mbit: zone,
            },
        ],
        wans: vec![
            WanSpec {
                a: 0,
                b: 1,
                mbit: fast,
            },
            WanSpec {
                a: 1,
                b: 2,
                mbit: fast,
            },
            WanSpec {
                a: 0,
                b: 2,
                mbit: slow,
            },
        ],
        zone_option: true,
    };
    let mut lab = Lab::build(&topo, "");
    lab.mount_all();
    let data = pattern(13, size as usize);
    let want = blake3::hash(&data);
    let readers = [1usize, 2, 3, 4];
    publish(&lab, 0, &readers, "build.tar", &data);
    let t_fast = link_secs(size, fast);
    let limit = Duration::from_secs_f64(link_secs(size, slow) * 5.0 + 60.0);
    let run = btfs_fanout(
        &mut lab,
        0,
        &readers,
        "build.tar",
        want,
        &Churn::default(),
        limit,
    );
    let mut rep = Report::new(
        "reflow",
        &[
            "link",
            "Mbit/s",
            "MiB one way",
            "MiB the other",
            "× S (one way)",
        ],
        NODE_CSV,
    );
    let names = ["A–B", "B–C", "A–C"];
    for (w, (ab, ba)) in run.crossed.iter().enumerate() {
        rep.row(vec![
            names[w].into(),
            lab.wans[w].mbit.to_string(),
            mib(*ab),
            mib(*ba),
            format!("{:.2}", *ab as f64 / size as f64),
        ]);
    }
    per_node_csv(&mut rep, "reflow", "btfs", &lab, 0, &run.done, &run.bytes);
    let c_done = run
        .done
        .iter()
        .filter(|d| lab.nodes[d.0].zone == 2)
        .map(|d| d.1.as_secs_f64())
        .fold(0.0, f64::max);
    let into_c_fast = run.crossed[1].0 as f64;
    let into_c_slow = run.crossed[2].0 as f64;
    rep.note(format!(
        "zones a (1 node), b and c (2 each) at {zone} Mbit/s; A–B and B–C {fast} Mbit/s, A–C {slow} Mbit/s; S = {} MiB; fast path = {t_fast:.2} s; C done after {c_done:.2} s",
        size / MIB
    ));
    rep.at_least(
        "share of C's bytes that came through B",
        into_c_fast / (into_c_fast + into_c_slow).max(1.0),
        0.8,
    );
    rep.at_most("C done, × the fast path's time", c_done / t_fast, 1.3);
    rep
}

/// Scenario 5: small files end to end, and a tree copied in with rsync and
/// read cold on two other nodes.
pub(crate) fn small(o: &Opts) -> Report {
    let mut rep = Report::new(
        "small",
        &["case", "files", "p50 ms", "max ms", "total s"],
        &["case", "file", "ms"],
    );
    // Files one by one between two fresh nodes, as a user would try it.
    let mut lab = Lab::build(&Topology::flat(2, 1000), "");
    lab.mount_all();
    let counts: &[usize] = if o.quick { &[10] } else { &[10, 1000] };
    for &count in counts {
        let mut ms = Vec::new();
        let t_all = Instant::now();
        for i in 0..count {
            let name = format!("small-{count}-{i}.bin");
            let data = pattern(1000 + i as u64, MIB as usize);
            let want = blake3::hash(&data);
            let t0 = Instant::now();
            fs::write(lab.nodes[0].path(&name), &data).expect("write");
            let p = lab.nodes[1].path(&name);
            while fs::metadata(&p).map(|m| m.len()).ok() != Some(MIB) {
                assert!(t0.elapsed() < Duration::from_secs(30), "{name} not listed");
                std::thread::sleep(Duration::from_millis(1));
            }
            let (h, _) = read_whole(&p).expect("read a small file");
            assert_eq!(h, want);
            let t = t0.elapsed().as_secs_f64() * 1000.0;
            rep.csv(vec![
                format!("files{count}"),
                i.to_string(),
                format!("{t:.1}"),
            ]);
            ms.push(t);
        }
        rep.row(vec![
            "write, list, read in full (after close)".into(),
            count.to_string(),
            format!("{:.0}", median(&ms)),
            format!("{:.0}", max(&ms)),
            secs(t_all.elapsed()),
        ]);
        rep.at_most(format!("{count} files: p50 ms"), median(&ms), 100.0);
        rep.at_most(format!("{count} files: max ms"), max(&ms), 200.0);
    }
    drop(lab);
    // The tree: many files of mixed sizes (600 files, 167 MiB in full),
    // copied into one node and read on two others.
    let mut lab = Lab::build(&Topology::flat(3, 1000), "");
    lab.mount_all();
    let (files, total) = if o.quick {
        (60, 16 * MIB)
    } else {
        (600, 167 * MIB)
    };
    let src = lab.file("tree");
    make_tree(&src, files, total);
    let t0 = Instant::now();
    let dest = lab.nodes[0].path("tree");
    crate::net::sh(
        "rsync",
        &[
            "-a",
            &format!("{}/", src.display()),
            &dest.to_string_lossy(),
        ],
    );
    let copied = t0.elapsed();
    let last = format!("d{}/f{}.bin", (files - 1) % 10, files - 1);
    let t_list = Instant::now();
    for r in [1usize, 2] {
        let p = lab.nodes[r].path("tree").join(&last);
        while !p.exists() {
            assert!(
                t_list.elapsed() < Duration::from_secs(60),
                "tree not listed on node {r}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let listed = t_list.elapsed();
    let t_read = Instant::now();
    let diffs: Vec<_> = [1usize, 2]
        .iter()
        .map(|&r| {
            std::process::Command::new("diff")
                .arg("-r")
                .arg(&src)
                .arg(lab.nodes[r].path("tree"))
                .spawn()
                .expect("diff")
        })
        .collect();
    for mut d in diffs {
        assert!(
            d.wait().expect("diff").success(),
            "the tree read on another node differs"
        );
    }
    let read = t_read.elapsed();
    rep.row(vec![
        format!("rsync -a a tree into node 0 ({} MiB)", total / MIB),
        files.to_string(),
        "-".into(),
        "-".into(),
        secs(copied),
    ]);
    rep.row(vec![
        "  …all listed on nodes 1 and 2, after the copy ended".into(),
        files.to_string(),
        "-".into(),
        "-".into(),
        secs(listed),
    ]);
    rep.row(vec![
        "  …read cold on nodes 1 and 2 at once (diff -r)".into(),
        files.to_string(),
        "-".into(),
        "-".into(),
        secs(read),
    ]);
    rep.csv(vec![
        "tree_copy".into(),
        String::new(),
        format!("{:.1}", copied.as_secs_f64() * 1000.0),
    ]);
    rep.csv(vec![
        "tree_listed".into(),
        String::new(),
        format!("{:.1}", listed.as_secs_f64() * 1000.0),
    ]);
    rep.csv(vec![
        "tree_read".into(),
        String::new(),
        format!("{:.1}", read.as_secs_f64() * 1000.0),
    ]);
    let bound = 10.0 * total as f64 / (167 * MIB) as f64;
    rep.at_most(
        "tree read cold on two nodes at once, s",
        read.as_secs_f64(),
        bound,
    );
    rep.note("links capped at 1000 Mbit/s");
    rep
}

/// `files` files in ten directories, sizes spread around the mean, `total`
/// bytes in all.
fn make_tree(dir: &Path, files: usize, total: u64) {
    let mean = total / files as u64;
    let mut left = total;
    for i in 0..files {
        let d = dir.join(format!("d{}", i % 10));
        fs::create_dir_all(&d).expect("tree dir");
        // From a tenth to almost twice the mean, the last takes the rest.
        let size = if i + 1 == files {
            left
        } else {
            (mean / 10 + (i as u64 * 7919) % (mean * 17 / 10)).min(left)
        };
        left -= size;
        fs::write(
            d.join(format!("f{i}.bin")),
            pattern(5000 + i as u64, size as usize),
        )
        .expect("tree file");
    }
}

/// Scenario 6: a whole-file read after a small read receives about S.
pub(crate) fn waste(o: &Opts) -> Report {
    let size = if o.quick { 64 * MIB } else { 256 * MIB };
    let mut lab = Lab::build(&Topology::flat(2, 1000), "");
    lab.mount_all();
    let data = pattern(17, size as usize);
    let want = blake3::hash(&data);
    publish(&lab, 0, &[1], "vm.img", &data);
    drop(data);
    let before = lab.bytes();
    let p = lab.nodes[1].path("vm.img");
    let mut f = fs::File::open(&p).expect("open");
    let mut small = vec![0u8; 4096];
    f.read_exact(&mut small).expect("first 4 KiB");
    drop(f);
    let t0 = Instant::now();
    let (h, _) = read_whole(&p).expect("read in full");
    let took = t0.elapsed();
    assert_eq!(h, want);
    let b: Vec<Bytes> = lab
        .bytes()
        .iter()
        .zip(&before)
        .map(|(a, b)| *a - *b)
        .collect();
    let mut rep = Report::new(
        "waste",
        &[
            "S MiB",
            "reader received MiB",
            "× S",
            "writer sent MiB",
            "read s",
        ],
        NODE_CSV,
    );
    rep.row(vec![
        (size / MIB).to_string(),
        mib(b[1].rx),
        format!("{:.3}", b[1].rx as f64 / size as f64),
        mib(b[0].tx),
        secs(took),
    ]);
    per_node_csv(&mut rep, "waste", "btfs", &lab, 0, &[(1, took)], &b);
    rep.at_most(
        "reader received × S (framing and encryption included)",
        b[1].rx as f64 / size as f64,
        1.03,
    );
    rep.note("two nodes, links at 1000 Mbit/s, a 4 KiB read then the whole file");
    rep
}

/// Scenario 7: `up_rate=` and `down_rate=` hold while the cluster is busy.
pub(crate) fn throttle(o: &Opts) -> Report {
    let size = if o.quick { 128 * MIB } else { 512 * MIB };
    let (up, down) = (6u64 * MIB, 3u64 * MIB);
    let window = Duration::from_secs(if o.quick { 10 } else { 30 });
    let mut lab = Lab::build(&Topology::flat(3, 1000), "");
    lab.nodes[0]
        .opts
        .push_str(&format!(",up_rate={}M", up / MIB));
    lab.nodes[1]
        .opts
        .push_str(&format!(",down_rate={}M", down / MIB));
    lab.mount_all();
    let data = pattern(19, size as usize);
    publish(&lab, 0, &[1, 2], "stream.bin", &data);
    drop(data);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut readers = Vec::new();
    for r in [1usize, 2] {
        let (p, stop) = (lab.nodes[r].path("stream.bin"), stop.clone());
        readers.push(std::thread::spawn(move || {
            let Ok(mut f) = fs::File::open(&p) else {
                return;
            };
            let mut buf = vec![0u8; MIB as usize];
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match f.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        }));
    }
    // Past the start, then one window.
    std::thread::sleep(Duration::from_secs(5));
    let b0 = lab.bytes();
    let t0 = Instant::now();
    std::thread::sleep(window);
    let b1 = lab.bytes();
    let secs_w = t0.elapsed().as_secs_f64();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    lab.umount_all();
    for r in readers {
        let _ = r.join();
    }
    let b: Vec<Bytes> = b1.iter().zip(&b0).map(|(a, b)| *a - *b).collect();
    let up_got = b[0].tx as f64 / secs_w;
    let down_got = b[1].rx as f64 / secs_w;
    let mut rep = Report::new(
        "throttle",
        &["node", "option", "set MiB/s", "measured MiB/s", "ratio"],
        NODE_CSV,
    );
    let m = (1u64 << 20) as f64;
    rep.row(vec![
        "0 (writer)".into(),
        "up_rate".into(),
        format!("{}", up / MIB),
        format!("{:.2}", up_got / m),
        format!("{:.3}", up_got / up as f64),
    ]);
    rep.row(vec![
        "1 (reader)".into(),
        "down_rate".into(),
        format!("{}", down / MIB),
        format!("{:.2}", down_got / m),
        format!("{:.3}", down_got / down as f64),
    ]);
    rep.row(vec![
        "2 (reader)".into(),
        "-".into(),
        "-".into(),
        format!(
            "{:.2} in, {:.2} out",
            b[2].rx as f64 / secs_w / m,
            b[2].tx as f64 / secs_w / m
        ),
        "-".into(),
    ]);
    per_node_csv(&mut rep, "throttle", "btfs", &lab, 0, &[], &b);
    rep.at_most(
        "up_rate: |measured/set − 1|",
        (up_got / up as f64 - 1.0).abs(),
        0.10,
    );
    rep.at_most(
        "down_rate: |measured/set − 1|",
        (down_got / down as f64 - 1.0).abs(),
        0.10,
    );
    rep.note(format!(
        "three nodes at 1000 Mbit/s, both readers reading a {} MiB file; window {:.0} s after 5 s of warm-up; link bytes include framing",
        size / MIB,
        secs_w
    ));
    rep
}
