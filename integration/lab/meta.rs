//! Metadata at cluster scale: joining a big namespace, sustained change on
//! three nodes, and a partition that heals. Files here are small or empty:
//! what is measured is records (listing, gossip, anti-entropy, merge), not
//! content transfer. See docs/BENCHMARKS.md, "Metadata at scale".

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use crate::{
    common::{btfs, pattern},
    net::{Lab, Node, Topology, ns_pids, sh},
    report::{Report, mib, secs},
    scenarios::Opts,
};

/// Link rate of every node in these scenarios: metadata is small, the links
/// are not what is measured.
const MBIT: u32 = 1000;
/// Files per generated directory (the 1,000,000 files in 10,000
/// directories).
const FILES_PER_DIR: u64 = 100;

/// Live files and directories a node's status counts.
fn tree_counts(node: &Node) -> (u64, u64) {
    let s = node.status();
    (
        s["files"].as_u64().unwrap_or(0),
        s["dirs"].as_u64().unwrap_or(0),
    )
}

/// Current and peak resident memory of the daemon in `node`'s namespace,
/// in bytes.
fn rss(node: &Node) -> (u64, u64) {
    let mut cur = 0;
    let mut peak = 0;
    for pid in ns_pids(&node.ns) {
        let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
                * 1024
        };
        cur += field("VmRSS:");
        peak += field("VmHWM:");
    }
    (cur, peak)
}

/// `find MOUNT | wc -l`, and how long it took.
fn find_count(node: &Node) -> (u64, Duration) {
    let t = Instant::now();
    let out = Command::new("find")
        .arg(&node.mnt)
        .output()
        .expect("run find");
    assert!(
        out.status.success(),
        "find {}: {}",
        node.mnt.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let n = out.stdout.iter().filter(|b| **b == b'\n').count() as u64;
    (n, t.elapsed())
}

/// Percentile `p` (0..=100) of `v`, in seconds.
fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
    v[i.min(v.len() - 1)]
}

/// Fills `node` with `dirs` x [`FILES_PER_DIR`] empty files from directory
/// number `first` on (`btfs generate`); returns how long it took.
fn generate(node: &Node, first: u64, dirs: u64) -> Duration {
    let t = Instant::now();
    let out = btfs(&[
        "generate",
        &node.mnt.to_string_lossy(),
        "--under",
        "big",
        "--first",
        &first.to_string(),
        "--dirs",
        &dirs.to_string(),
        "--files",
        &FILES_PER_DIR.to_string(),
    ]);
    assert!(
        out.status.success(),
        "btfs generate: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        node.log_tail(30)
    );
    t.elapsed()
}

/// Waits until `node` counts `want` live files, up to `limit`; returns when
/// it did, or `None`.
fn wait_files(node: &Node, want: u64, limit: Duration) -> Option<Duration> {
    let t = Instant::now();
    while t.elapsed() < limit {
        if tree_counts(node).0 >= want {
            return Some(t.elapsed());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

/// Stats random generated files on `node` until `stop`; the latencies, in
/// seconds.
fn stat_probe(mnt: PathBuf, dirs: u64, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Vec<f64>> {
    std::thread::spawn(move || {
        let mut out = Vec::new();
        let mut x: u64 = 0x2545_F491_4F6C_DD1D;
        while !stop.load(Ordering::Relaxed) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let d = x % dirs;
            let f = (x >> 32) % FILES_PER_DIR;
            let p = mnt.join(format!("big/d{d:06}/f{f:06}"));
            let t = Instant::now();
            let ok = fs::metadata(&p).is_ok();
            out.push(t.elapsed().as_secs_f64());
            assert!(ok, "stat {} failed on the serving node", p.display());
            std::thread::sleep(Duration::from_millis(5));
        }
        out
    })
}

/// Scenario 1: a new node joins a node holding a big namespace.
pub(crate) fn join(o: &Opts) -> Report {
    let files: u64 = if o.quick { 100_000 } else { 1_000_000 };
    let dirs = files / FILES_PER_DIR;
    let limit = Duration::from_secs(30);
    let rss_bound = 400u64 << 20;
    let mut rep = Report::new(
        "join",
        &["measure", "value"],
        &["files", "measure", "value"],
    );
    let mut lab = Lab::build(&Topology::flat(2, MBIT), "");
    lab.nodes[0].mount();
    let gen_time = generate(&lab.nodes[0], 0, dirs);
    let (f0, d0) = tree_counts(&lab.nodes[0]);
    assert_eq!(f0, files, "the generator made every file");
    let (rss0_before, _) = rss(&lab.nodes[0]);
    let row = |rep: &mut Report, what: &str, value: String| {
        rep.row(vec![what.to_owned(), value.clone()]);
        rep.csv(vec![files.to_string(), what.to_owned(), value]);
    };
    row(
        &mut rep,
        "generated (files, dirs)",
        format!("{f0}, {d0} in {}", secs(gen_time)),
    );

    // The join: node 1 mounts with an empty state while node 0 serves.
    let stop = Arc::new(AtomicBool::new(false));
    let probe = stat_probe(lab.nodes[0].mnt.clone(), dirs, stop.clone());
    let rx0 = lab.nodes[1].bytes();
    let t0 = Instant::now();
    lab.nodes[1].mount();
    let listed = wait_files(&lab.nodes[1], files, Duration::from_secs(600));
    let counted_at = t0.elapsed();
    let (found, find_took) = find_count(&lab.nodes[1]);
    let joined_at = t0.elapsed();
    stop.store(true, Ordering::Relaxed);
    let mut lat = probe.join().expect("stat probe");
    let join_bytes = (lab.nodes[1].bytes() - rx0).rx;
    let (found0, _) = find_count(&lab.nodes[0]);
    assert!(listed.is_some(), "node 1 never counted {files} files");
    assert_eq!(found, found0, "node 1 lists the same tree as node 0");
    let (_, peak0) = rss(&lab.nodes[0]);
    let (_, peak1) = rss(&lab.nodes[1]);
    let p99 = percentile(&mut lat, 99.0);
    row(
        &mut rep,
        "new node counts every file (status)",
        secs(counted_at),
    );
    row(
        &mut rep,
        "then `find | wc -l` matches",
        format!("{found} entries, find took {}", secs(find_took)),
    );
    row(&mut rep, "join to a full listing", secs(joined_at));
    row(&mut rep, "bytes received by the new node", mib(join_bytes));
    row(
        &mut rep,
        "serving node: stat p50 / p99 / max",
        format!(
            "{:.1} / {:.1} / {:.1} ms ({} stats)",
            percentile(&mut lat, 50.0) * 1e3,
            p99 * 1e3,
            percentile(&mut lat, 100.0) * 1e3,
            lat.len()
        ),
    );
    row(
        &mut rep,
        "RSS peak: serving / joining daemon",
        format!(
            "{} / {} (serving before the join: {})",
            mib(peak0),
            mib(peak1),
            mib(rss0_before)
        ),
    );
    rep.at_most(
        "join to a full listing (s)",
        joined_at.as_secs_f64(),
        limit.as_secs_f64(),
    );
    rep.at_most("serving node stat p99 (ms)", p99 * 1e3, 50.0);
    rep.at_most(
        "daemon RSS peak (MiB)",
        peak0.max(peak1) as f64 / (1 << 20) as f64,
        rss_bound as f64 / (1 << 20) as f64,
    );

    // A day away: node 1 stops, node 0 changes 1 % of the tree, node 1
    // comes back and must ask only for that.
    lab.nodes[1].umount();
    let extra_dirs = (dirs / 100).max(1);
    generate(&lab.nodes[0], dirs, extra_dirs);
    let extra = extra_dirs * FILES_PER_DIR;
    let rx1 = lab.nodes[1].bytes();
    let t1 = Instant::now();
    lab.nodes[1].mount();
    let back = wait_files(&lab.nodes[1], files + extra, Duration::from_secs(120));
    let back_bytes = (lab.nodes[1].bytes() - rx1).rx;
    assert!(back.is_some(), "node 1 never caught up after its restart");
    let s1 = lab.nodes[1].status();
    row(
        &mut rep,
        "restart after a day away: caught up",
        format!(
            "{} ({extra} new files, {} received; records synced {}, by gossip {})",
            secs(t1.elapsed()),
            mib(back_bytes),
            s1["records_synced"],
            s1["records_received"]
        ),
    );
    // What changed, with room for the mesh's own traffic (identify,
    // presence, holdings) and the round's requests: 3x the pro-rata bytes
    // plus 2 MiB. A full re-sync would be 100x the pro-rata share.
    let pro_rata = join_bytes as f64 * extra as f64 / files as f64;
    rep.at_most(
        "restart: bytes received (MiB)",
        back_bytes as f64 / (1 << 20) as f64,
        (3.0 * pro_rata + (2 << 20) as f64) / (1 << 20) as f64,
    );
    lab.umount_all();
    rep
}

/// Scenario 2: sustained change on three nodes.
pub(crate) fn change(o: &Opts) -> Report {
    let seconds: u64 = if o.quick { 30 } else { 120 };
    let rate: u64 = 1_000;
    let total = seconds * rate;
    let writers = 4;
    let mut rep = Report::new(
        "change",
        &["measure", "value"],
        &["seconds", "measure", "value"],
    );
    let mut lab = Lab::build(&Topology::flat(3, MBIT), "");
    lab.mount_all();
    let name = |k: u64| format!("chg/d{:04}/f{k:07}", k / 1000);
    let content = |k: u64| pattern(k, 200);
    let edited = |k: u64| pattern(k + (1 << 40), 300);
    for d in 0..total.div_ceil(1000) {
        fs::create_dir_all(lab.nodes[0].path(&format!("chg/d{d:04}"))).expect("mkdir");
    }

    // Close times on the writer, in µs since t0 (0: not yet).
    let closed: Arc<Vec<AtomicU64>> = Arc::new((0..total).map(|_| AtomicU64::new(0)).collect());
    let t0 = Instant::now() + Duration::from_millis(500);
    let mnt0 = lab.nodes[0].mnt.clone();
    let write_threads: Vec<_> = (0..writers)
        .map(|w| {
            let closed = closed.clone();
            let mnt = mnt0.clone();
            std::thread::spawn(move || {
                let mut late = 0u64;
                for k in (w..total).step_by(writers as usize) {
                    let due = t0 + Duration::from_micros(k * 1_000_000 / rate);
                    let now = Instant::now();
                    if due > now {
                        std::thread::sleep(due - now);
                    } else if now - due > Duration::from_millis(100) {
                        late += 1;
                    }
                    fs::write(mnt.join(name(k)), content(k)).expect("write on node 0");
                    let at = t0.elapsed().as_micros().max(1) as u64;
                    closed[k as usize].store(at, Ordering::Release);
                }
                late
            })
        })
        .collect();

    // Observers: node 1 (which renames k%10==0 and deletes k%10==1 once it
    // sees them) and node 2 (which edits k%10==2). Each records the delay
    // from close on node 0 to its first successful stat.
    let observe = |node: usize, only: fn(u64) -> bool, act: mpsc::Sender<u64>| {
        let closed = closed.clone();
        let mnt = lab.nodes[node].mnt.clone();
        std::thread::spawn(move || {
            let mut delays = Vec::new();
            for k in 0..total {
                if !only(k) {
                    continue;
                }
                let c = loop {
                    let c = closed[k as usize].load(Ordering::Acquire);
                    if c != 0 {
                        break c;
                    }
                    std::thread::sleep(Duration::from_micros(500));
                };
                let p = mnt.join(name(k));
                let give_up = Instant::now() + Duration::from_secs(120);
                // Seen once its closed size shows (the name alone may be
                // the create's record, before the write's; node 2 may
                // have edited it already: 300 bytes).
                while fs::metadata(&p).map_or(true, |m| m.len() < 200) {
                    assert!(
                        Instant::now() < give_up,
                        "{} never appeared on node {node}",
                        p.display()
                    );
                    std::thread::sleep(Duration::from_micros(500));
                }
                let seen = t0.elapsed().as_micros() as u64;
                delays.push(seen.saturating_sub(c) as f64 / 1e6);
                let _ = act.send(k);
            }
            delays
        })
    };
    let (act1, acts1) = mpsc::channel();
    let (act2, acts2) = mpsc::channel();
    let obs1 = observe(1, |_| true, act1);
    let obs2 = observe(2, |k| k % 10 >= 2, act2);
    let mnt1 = lab.nodes[1].mnt.clone();
    let actor1 = std::thread::spawn(move || {
        for k in acts1 {
            let p = mnt1.join(name(k));
            match k % 10 {
                0 => fs::rename(&p, mnt1.join(format!("{}.moved", name(k))))
                    .expect("rename on node 1"),
                1 => fs::remove_file(&p).expect("delete on node 1"),
                _ => {}
            }
        }
    });
    let mnt2 = lab.nodes[2].mnt.clone();
    let actor2 = std::thread::spawn(move || {
        for k in acts2 {
            if k % 10 == 2 {
                fs::write(mnt2.join(name(k)), edited(k)).expect("edit on node 2");
            }
        }
    });

    // Peak RSS and the announce queue, sampled while it runs.
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        let nodes: Vec<(String, PathBuf)> = lab
            .nodes
            .iter()
            .map(|n| (n.ns.clone(), n.mnt.clone()))
            .collect();
        std::thread::spawn(move || {
            let mut queue_peak = 0u64;
            while !stop.load(Ordering::Relaxed) {
                for (_, mnt) in &nodes {
                    let out = btfs(&["status", &mnt.to_string_lossy(), "--json"]);
                    let v: serde_json::Value =
                        serde_json::from_slice(&out.stdout).unwrap_or_default();
                    queue_peak = queue_peak.max(v["announce_queued"].as_u64().unwrap_or(0));
                }
                std::thread::sleep(Duration::from_millis(250));
            }
            queue_peak
        })
    };

    let late: u64 = write_threads
        .into_iter()
        .map(|t| t.join().expect("writer"))
        .sum();
    let wrote_in = t0.elapsed();
    let mut d1 = obs1.join().expect("observer on node 1");
    let mut d2 = obs2.join().expect("observer on node 2");
    actor1.join().expect("node 1's changes");
    actor2.join().expect("node 2's changes");
    let acted = Instant::now();

    // The expected tree, then every node must show exactly that.
    let mut want: BTreeMap<String, u64> = BTreeMap::new();
    for k in 0..total {
        match k % 10 {
            0 => want.insert(format!("{}.moved", name(k)), 200),
            1 => None,
            2 => want.insert(name(k), 300),
            _ => want.insert(name(k), 200),
        };
    }
    let listing = |mnt: &Path| -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        let Ok(dirs) = fs::read_dir(mnt.join("chg")) else {
            return out;
        };
        for d in dirs.flatten() {
            let dname = d.file_name().to_string_lossy().into_owned();
            for f in fs::read_dir(d.path()).into_iter().flatten().flatten() {
                let len = f.metadata().map(|m| m.len()).unwrap_or(0);
                out.insert(
                    format!("chg/{dname}/{}", f.file_name().to_string_lossy()),
                    len,
                );
            }
        }
        out
    };
    let mut converged = None;
    let mut last = Vec::new();
    while acted.elapsed() < Duration::from_secs(120) {
        last = lab.nodes.iter().map(|n| listing(&n.mnt)).collect();
        if last.iter().all(|l| *l == want) {
            converged = Some(acted.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    stop.store(true, Ordering::Relaxed);
    let queue_peak = sampler.join().expect("sampler");
    if converged.is_none() {
        for (i, l) in last.iter().enumerate() {
            let missing: Vec<&String> = want
                .keys()
                .filter(|k| !l.contains_key(*k))
                .take(5)
                .collect();
            let extra: Vec<&String> = l
                .keys()
                .filter(|k| !want.contains_key(*k))
                .take(5)
                .collect();
            let wrong: Vec<&String> = want
                .iter()
                .filter(|(k, v)| l.get(*k).is_some_and(|g| g != *v))
                .map(|(k, _)| k)
                .take(5)
                .collect();
            eprintln!(
                "node {i}: {} entries; missing {missing:?}, extra {extra:?}, wrong size {wrong:?}",
                l.len()
            );
        }
        panic!("the three nodes did not converge on the expected tree within 120 s");
    }
    // Content: a sample of every kind of file, read on every node (each
    // read fetches the file's bytes from a holder).
    let sample: Vec<u64> = (0..total).step_by((total / 120).max(1) as usize).collect();
    for node in &lab.nodes {
        for &k in &sample {
            let (path, data) = match k % 10 {
                0 => (format!("{}.moved", name(k)), content(k)),
                1 => continue,
                2 => (name(k), edited(k)),
                _ => (name(k), content(k)),
            };
            let got = fs::read(node.path(&path)).expect("read a sampled file");
            assert!(got == data, "{path} on node {}: wrong content", node.i);
        }
    }
    let merged: u64 = lab
        .nodes
        .iter()
        .map(|n| n.status()["records_merged"].as_u64().unwrap_or(0))
        .sum();
    let peaks: Vec<u64> = lab.nodes.iter().map(|n| rss(n).1).collect();

    let mut all: Vec<f64> = d1.iter().chain(d2.iter()).copied().collect();
    let p50 = percentile(&mut all, 50.0);
    let p99 = percentile(&mut all, 99.0);
    let row = |rep: &mut Report, what: &str, value: String| {
        rep.row(vec![what.to_owned(), value.clone()]);
        rep.csv(vec![seconds.to_string(), what.to_owned(), value]);
    };
    row(
        &mut rep,
        "files written on node 0",
        format!(
            "{total} in {} ({:.0}/s; {late} more than 100 ms behind schedule)",
            secs(wrote_in),
            total as f64 / wrote_in.as_secs_f64()
        ),
    );
    row(
        &mut rep,
        "close on node 0 to stat elsewhere: p50 / p99 / max",
        format!(
            "{:.0} / {:.0} / {:.0} ms",
            p50 * 1e3,
            p99 * 1e3,
            percentile(&mut all, 100.0) * 1e3
        ),
    );
    row(
        &mut rep,
        "  node 1 / node 2 p99",
        format!(
            "{:.0} / {:.0} ms",
            percentile(&mut d1, 99.0) * 1e3,
            percentile(&mut d2, 99.0) * 1e3
        ),
    );
    row(
        &mut rep,
        "renames, deletes (node 1), edits (node 2)",
        format!("{}, {}, {}", total / 10, total / 10, total / 10),
    );
    row(
        &mut rep,
        "every node shows the expected tree",
        format!(
            "{} after the last change ({} entries; content of {} sampled files read on each node)",
            secs(converged.unwrap_or_default()),
            want.len(),
            sample.len()
        ),
    );
    row(
        &mut rep,
        "conflicts seen (records merged)",
        merged.to_string(),
    );
    row(
        &mut rep,
        "RSS peak per daemon",
        peaks
            .iter()
            .map(|p| mib(*p))
            .collect::<Vec<_>>()
            .join(" / "),
    );
    row(&mut rep, "announce queue peak", queue_peak.to_string());
    // The target is the full run's. The quick run in the test suite shares
    // two cores between three daemons writing, applying and renaming at
    // 1,000 files a second and the test's own threads: there the writer
    // itself falls behind when the machine is busy (seen: p99 3.4 s with
    // 80 % of the files written late), so its bound catches a fall-back to
    // anti-entropy (15 s), not the machine's load.
    let p99_bound = if o.quick { 5.0 } else { 2.0 };
    rep.at_most("close-to-stat p99 (s)", p99, p99_bound);
    rep.at_most("conflicts where no writes raced", merged as f64, 0.0);
    rep.note(format!(
        "Writers: {writers} threads on node 0, paced to {rate} files/s; every listing compared in full, content sampled."
    ));
    lab.umount_all();
    rep
}

/// One node's tree under `p/`: path -> (kind, mode, size, blake3 of the
/// content for files). Content is hashed only when `hash`.
fn snapshot(mnt: &Path, hash: bool) -> BTreeMap<String, (char, u32, u64, String)> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = BTreeMap::new();
    let mut stack = vec![mnt.join("p")];
    while let Some(dir) = stack.pop() {
        let Ok(rd) = fs::read_dir(&dir) else { continue };
        for e in rd.flatten() {
            let Ok(m) = fs::symlink_metadata(e.path()) else {
                continue;
            };
            let rel = e
                .path()
                .strip_prefix(mnt)
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default();
            let kind = if m.is_dir() {
                stack.push(e.path());
                'd'
            } else if m.file_type().is_symlink() {
                'l'
            } else {
                'f'
            };
            let sum = if hash && kind == 'f' {
                fs::read(e.path())
                    .map(|b| blake3::hash(&b).to_hex().to_string())
                    .unwrap_or_else(|err| format!("unreadable: {err}"))
            } else {
                String::new()
            };
            out.insert(rel, (kind, m.permissions().mode() & 0o7777, m.len(), sum));
        }
    }
    out
}

/// Cuts (or restores) every route between the two sides of a partition.
fn cut(lab: &Lab, side_a: &[usize], on: bool) {
    let verb = if on { "add" } else { "del" };
    for &a in side_a {
        for b in (0..lab.nodes.len()).filter(|b| !side_a.contains(b)) {
            for (x, y) in [(a, b), (b, a)] {
                sh(
                    "ip",
                    &[
                        "-n",
                        &lab.nodes[x].ns,
                        "route",
                        verb,
                        "prohibit",
                        &format!("{}/32", lab.nodes[y].addr),
                    ],
                );
            }
        }
    }
}

/// Scenario 3: a partition (2/3 of five nodes; 1/2 of three in the quick
/// subset) with changes on both sides, then healed.
pub(crate) fn partition(o: &Opts) -> Report {
    let n = if o.quick { 3 } else { 5 };
    let split = if o.quick { 1 } else { 2 };
    let seconds = if o.quick { 20 } else { 60 };
    let mut rep = Report::new(
        "partition",
        &["measure", "value"],
        &["nodes", "measure", "value"],
    );
    let mut lab = Lab::build(&Topology::flat(n, MBIT), "");
    lab.mount_all();
    let side_a: Vec<usize> = (0..split).collect();
    let side_b: Vec<usize> = (split..n).collect();

    // The tree both sides start from.
    let base = |rel: &str| lab.nodes[0].path(rel);
    for d in ["p/shared", "p/base", "p/dir-a", "p/dir-b", "p/dir-b2"] {
        fs::create_dir_all(base(d)).expect("mkdir");
    }
    for i in 0..5 {
        fs::write(base(&format!("p/shared/e{i}")), pattern(i, 1000)).expect("write");
        fs::write(base(&format!("p/base/x{i}")), pattern(100 + i, 500)).expect("write");
        fs::write(base(&format!("p/base/y{i}")), pattern(200 + i, 500)).expect("write");
        fs::write(base(&format!("p/dir-a/a{i}")), pattern(300 + i, 500)).expect("write");
        fs::write(base(&format!("p/dir-b2/b{i}")), pattern(400 + i, 500)).expect("write");
    }
    let start = snapshot(&lab.nodes[0].mnt, false);
    let t = Instant::now();
    while lab
        .nodes
        .iter()
        .any(|node| snapshot(&node.mnt, false) != start)
    {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the base tree never reached every node"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    cut(&lab, &side_a, true);
    let cut_at = Instant::now();
    // Changes on both sides, spread over the partition, each on some node
    // of its side.
    let on = |side: &[usize], i: usize| lab.nodes[side[i % side.len()]].mnt.clone();
    let steps = 10;
    for s in 0..steps {
        let (a, b) = (on(&side_a, s), on(&side_b, s));
        let w = |m: &Path, rel: &str, data: Vec<u8>| fs::write(m.join(rel), data).expect("write");
        // Creates on both sides.
        w(&a, &format!("p/new-a-{s}"), pattern(1000 + s as u64, 700));
        w(&b, &format!("p/new-b-{s}"), pattern(2000 + s as u64, 700));
        match s {
            // Both sides edit the same files: clashes, kept as copies.
            0..=4 => {
                w(&a, &format!("p/shared/e{s}"), pattern(3000 + s as u64, 900));
                w(&b, &format!("p/shared/e{s}"), pattern(4000 + s as u64, 800));
            }
            // A deletes what B edits (the edit survives the delete).
            5 => {
                fs::remove_file(a.join("p/base/y0")).expect("delete on A");
                w(&b, "p/base/y0", pattern(5000, 600));
            }
            // Renames and deletes on each side.
            6 => {
                fs::rename(a.join("p/base/x0"), a.join("p/base/x0-renamed-a"))
                    .expect("rename on A");
                fs::remove_file(b.join("p/base/x1")).expect("delete on B");
            }
            // Directory renames on both sides, and a new file in the
            // directory the other side renames.
            7 => {
                fs::rename(a.join("p/dir-a"), a.join("p/dir-a-renamed")).expect("dir rename on A");
                fs::rename(b.join("p/dir-b2"), b.join("p/dir-b2-moved")).expect("dir rename on B");
            }
            8 => {
                w(&b, "p/dir-b/new-in-b", pattern(6000, 400));
                w(&a, "p/dir-b/new-in-a", pattern(6001, 400));
            }
            _ => {
                let mut perms = fs::metadata(a.join("p/base/y1"))
                    .expect("stat")
                    .permissions();
                std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o600);
                fs::set_permissions(a.join("p/base/y1"), perms).expect("chmod on A");
            }
        }
        let due = Duration::from_secs(seconds) * (s as u32 + 1) / steps as u32;
        if let Some(rest) = due.checked_sub(cut_at.elapsed()) {
            std::thread::sleep(rest);
        }
    }
    cut(&lab, &side_a, false);
    let healed = Instant::now();

    // Converged: every node lists the same tree (kind, mode, size), then
    // the same content.
    let mut listed = None;
    let mut snaps = Vec::new();
    while healed.elapsed() < Duration::from_secs(120) {
        snaps = lab
            .nodes
            .iter()
            .map(|node| snapshot(&node.mnt, false))
            .collect();
        if snaps.windows(2).all(|w| w[0] == w[1]) {
            listed = Some(healed.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let Some(listed) = listed else {
        for (i, s) in snaps.iter().enumerate() {
            eprintln!("node {i}: {:?}", s.keys().collect::<Vec<_>>());
        }
        for node in &lab.nodes {
            eprintln!("--- node {} log\n{}", node.i, node.log_tail(30));
        }
        panic!("the {n} nodes did not list the same tree within 120 s of the heal");
    };
    let hashes: Vec<_> = lab
        .nodes
        .iter()
        .map(|node| snapshot(&node.mnt, true))
        .collect();
    let same_content = healed.elapsed();
    for (i, h) in hashes.iter().enumerate().skip(1) {
        assert_eq!(h, &hashes[0], "node {i}'s content differs from node 0's");
    }
    let tree = &hashes[0];
    let copies: BTreeSet<&String> = tree
        .keys()
        .filter(|k| k.contains(".btfs-conflict-"))
        .collect();
    for i in 0..5 {
        let prefix = format!("p/shared/e{i}.btfs-conflict-");
        assert!(
            copies.iter().any(|c| c.starts_with(&prefix)),
            "the clash on p/shared/e{i} kept no conflict copy: {copies:?}"
        );
    }
    for must in [
        "p/base/y0",
        "p/base/x0-renamed-a",
        "p/dir-a-renamed/a0",
        "p/dir-b2-moved/b0",
        "p/dir-b/new-in-a",
        "p/dir-b/new-in-b",
        "p/new-a-9",
        "p/new-b-9",
    ] {
        assert!(tree.contains_key(must), "{must} is missing after the heal");
    }
    for gone in ["p/base/x1", "p/base/x0", "p/dir-a/a0", "p/dir-b2/b0"] {
        assert!(!tree.contains_key(gone), "{gone} came back after the heal");
    }
    assert_eq!(tree["p/base/y1"].1, 0o600, "the chmod on side A holds");
    let row = |rep: &mut Report, what: &str, value: String| {
        rep.row(vec![what.to_owned(), value.clone()]);
        rep.csv(vec![n.to_string(), what.to_owned(), value]);
    };
    row(
        &mut rep,
        "partition",
        format!("{side_a:?} | {side_b:?} for {}", secs(healed - cut_at)),
    );
    row(
        &mut rep,
        "every node lists the same tree (modes, sizes)",
        secs(listed),
    );
    row(
        &mut rep,
        "and the same blake3 of every file",
        secs(same_content),
    );
    row(
        &mut rep,
        "entries; conflict copies (same names on every node)",
        format!("{}; {}", tree.len(), copies.len()),
    );
    rep.at_most(
        "identical listings after the heal (s)",
        listed.as_secs_f64(),
        5.0,
    );
    rep.at_most(
        "identical content after the heal (s)",
        same_content.as_secs_f64(),
        5.0,
    );
    lab.umount_all();
    rep
}
