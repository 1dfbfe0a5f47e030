//! Scenario 5, tombstones and history over time: with tombstone retention
//! at its minimum (24 h) and a simulated clock, what deletes and overwrites
//! leave behind frees its space. Superseded versions' objects go at once
//! (nothing references them), deleted files' objects once the delete is
//! stored, and the tombstones once the retention has passed: the entry and
//! object counts of both nodes return to their baseline.
//!
//! The clock: both nodes are remounted (a clean stop and start) with
//! libfaketime preloaded, their wall clock 25 h ahead (their monotonic
//! clock left alone). A node looks for expired tombstones when it starts
//! and every `TOMBSTONE_INTERVAL` after, so the restart is the collection.

use std::{
    fs,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use crate::{
    common::{btfs_bin, pattern},
    net::{Lab, Node, Topology},
    report::{Report, mib},
    scenarios::Opts,
};

/// libfaketime as Debian installs it (`apt-get install libfaketime`).
const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";
/// How far ahead the simulated clock runs: past the minimum retention (24 h).
const CLOCK_AHEAD: &str = "+25h";
/// The minimum tombstone retention (src/options.rs).
const RETENTION: &str = "24h";
/// How long each step may take before the scenario gives up.
const STEP_LIMIT: Duration = Duration::from_secs(120);

/// Entry counts from `btfs status --json`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Counts {
    files: u64,
    dirs: u64,
    tombstones: u64,
    objects: u64,
    object_bytes: u64,
    db_bytes: u64,
}

impl Counts {
    /// The node's counts, `None` while its status cannot be read.
    fn try_of(node: &Node) -> Option<Counts> {
        let s = node.status();
        let n = |k: &str| s[k].as_u64();
        let (objects, object_bytes) = tree_size(&node.state.join("objects"));
        Some(Counts {
            files: n("files")?,
            dirs: n("dirs")?,
            tombstones: n("tombstones")?,
            objects,
            object_bytes,
            db_bytes: tree_size(&node.state.join("db")).1,
        })
    }

    fn of(node: &Node) -> Counts {
        let t0 = Instant::now();
        loop {
            if let Some(c) = Self::try_of(node) {
                return c;
            }
            assert!(
                t0.elapsed() < STEP_LIMIT,
                "gc: no status from node {}",
                node.i
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn entries(&self) -> u64 {
        self.files + self.dirs + self.tombstones
    }
}

/// Regular files under `dir` and their bytes.
fn tree_size(dir: &Path) -> (u64, u64) {
    let Ok(rd) = fs::read_dir(dir) else {
        return (0, 0);
    };
    let mut out = (0, 0);
    for e in rd.flatten() {
        let Ok(m) = e.metadata() else { continue };
        if m.is_dir() {
            let (n, b) = tree_size(&e.path());
            out = (out.0 + n, out.1 + b);
        } else if m.is_file() {
            out = (out.0 + 1, out.1 + m.len());
        }
    }
    out
}

/// Polls `done` until it holds, at most [`STEP_LIMIT`]; the time it took.
fn wait_for(what: &str, lab: &Lab, mut done: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    while !done() {
        assert!(
            t0.elapsed() < STEP_LIMIT,
            "gc: {what}: not after {} s\nnode 0:\n{}\nnode 1:\n{}",
            STEP_LIMIT.as_secs(),
            lab.nodes[0].log_tail(20),
            lab.nodes[1].log_tail(20)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    t0.elapsed()
}

/// Mounts `node` as `Node::mount` does, its daemon's wall clock
/// [`CLOCK_AHEAD`]. Runs `btfs mount` as `mount.btfs` would: mount(8)
/// removes `LD_PRELOAD` from the environment of its helpers.
fn mount_ahead(node: &mut Node) {
    let out = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", node.ns))
        .args([btfs_bin(), "mount", "lab"])
        .arg(&node.mnt)
        .args(["-o", &node.opts])
        .env("LD_PRELOAD", LIBFAKETIME)
        .env("FAKETIME", CLOCK_AHEAD)
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
        .env("DONT_FAKE_MONOTONIC", "1")
        .env("NO_FAKE_STAT", "1")
        .output()
        .expect("run mount");
    assert!(
        out.status.success(),
        "btfs mount (clock {CLOCK_AHEAD}) in {}: {}{}\n{}",
        node.ns,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        node.log_tail(40)
    );
    node.mounted = true;
}

fn row(rep: &mut Report, step: &str, node: usize, c: &Counts) {
    rep.row(vec![
        step.into(),
        node.to_string(),
        c.files.to_string(),
        c.dirs.to_string(),
        c.tombstones.to_string(),
        c.objects.to_string(),
        mib(c.object_bytes),
        mib(c.db_bytes),
    ]);
    rep.csv(vec![
        step.into(),
        node.to_string(),
        c.files.to_string(),
        c.dirs.to_string(),
        c.tombstones.to_string(),
        c.objects.to_string(),
        c.object_bytes.to_string(),
        c.db_bytes.to_string(),
    ]);
}

pub(crate) fn gc(o: &Opts) -> Report {
    assert!(
        Path::new(LIBFAKETIME).exists(),
        "gc: the simulated clock needs libfaketime ({LIBFAKETIME}): apt-get install libfaketime"
    );
    // Files, of which every `OVERWRITTEN_EVERY`th is rewritten `REWRITES`
    // times (superseded versions).
    let (n, size) = if o.quick { (200, 4096) } else { (2000, 16384) };
    const OVERWRITTEN_EVERY: usize = 4;
    const REWRITES: usize = 3;
    let mut rep = Report::new(
        "gc",
        &[
            "step",
            "node",
            "files",
            "dirs",
            "tombstones",
            "objects",
            "object MiB",
            "db MiB",
        ],
        &[
            "step",
            "node",
            "files",
            "dirs",
            "tombstones",
            "objects",
            "object_bytes",
            "db_bytes",
        ],
    );
    let mut lab = Lab::build(
        &Topology::flat(2, 1000),
        &format!(",tombstone_retention={RETENTION}"),
    );
    lab.mount_all();
    let base: Vec<Counts> = lab.nodes.iter().map(Counts::of).collect();
    for (i, c) in base.iter().enumerate() {
        row(&mut rep, "baseline", i, c);
    }

    // Files with content, some rewritten: node 0 writes, node 1 reads all.
    let t_write = Instant::now();
    fs::create_dir(lab.nodes[0].path("gc")).expect("mkdir gc");
    let mut want = Vec::with_capacity(n);
    for i in 0..n {
        let p = lab.nodes[0].path(&format!("gc/f{i:05}"));
        let rounds = if i % OVERWRITTEN_EVERY == 0 {
            1 + REWRITES
        } else {
            1
        };
        let mut data = Vec::new();
        for r in 0..rounds {
            data = pattern((i * 10 + r) as u64 + 1, size);
            fs::write(&p, &data).expect("write into node 0's mount");
        }
        want.push(blake3::hash(&data));
    }
    let written = t_write.elapsed();
    let versions = n + n.div_ceil(OVERWRITTEN_EVERY) * REWRITES;
    wait_for("node 1 lists every file", &lab, || {
        Counts::try_of(&lab.nodes[1]).is_some_and(|c| c.files >= base[1].files + n as u64)
    });
    let t_read = Instant::now();
    for (i, h) in want.iter().enumerate() {
        let p = lab.nodes[1].path(&format!("gc/f{i:05}"));
        let t0 = Instant::now();
        loop {
            // A rewrite may still be on its way: read until the last one.
            let got = fs::read(&p).map(|d| blake3::hash(&d));
            if got.as_ref().ok() == Some(h) {
                break;
            }
            assert!(t0.elapsed() < STEP_LIMIT, "gc/f{i:05} on node 1: {got:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let read = t_read.elapsed();
    // Superseded versions free their objects without waiting for anything.
    wait_for("superseded objects deleted on both nodes", &lab, || {
        (0..2).all(|i| {
            Counts::try_of(&lab.nodes[i]).is_some_and(|c| c.objects <= base[i].objects + n as u64)
        })
    });
    let full: Vec<Counts> = lab.nodes.iter().map(Counts::of).collect();
    for (i, c) in full.iter().enumerate() {
        row(&mut rep, "written, read", i, c);
        rep.at_most(
            format!("node {i}: objects after {versions} versions of {n} files, over baseline"),
            c.objects as f64 - base[i].objects as f64,
            n as f64,
        );
    }

    // Delete everything on node 0.
    let t_del = Instant::now();
    for i in 0..n {
        fs::remove_file(lab.nodes[0].path(&format!("gc/f{i:05}"))).expect("rm");
    }
    fs::remove_dir(lab.nodes[0].path("gc")).expect("rmdir gc");
    wait_for("the deletes reach node 1 and its objects go", &lab, || {
        Counts::try_of(&lab.nodes[1]).is_some_and(|c| {
            c.files == base[1].files && c.dirs == base[1].dirs && c.objects <= base[1].objects
        })
    });
    wait_for("node 0's objects go", &lab, || {
        Counts::try_of(&lab.nodes[0]).is_some_and(|c| c.objects <= base[0].objects)
    });
    let deleted_in = t_del.elapsed();
    let deleted: Vec<Counts> = lab.nodes.iter().map(Counts::of).collect();
    for (i, c) in deleted.iter().enumerate() {
        row(&mut rep, "deleted", i, c);
    }

    // Each node pulls the other's log past the deletes (the echoes of its
    // own): a node that would pull them only after collecting its own
    // tombstones would store them again (see the note).
    let rounds = |i: usize| lab.nodes[i].status()["sync_rounds"].as_u64();
    let before: Vec<Option<u64>> = (0..2).map(rounds).collect();
    wait_for("two anti-entropy rounds after the deletes", &lab, || {
        (0..2).all(|i| {
            rounds(i)
                .zip(before[i])
                .is_some_and(|(now, then)| now >= then + 2)
        })
    });

    // The clock moves past the retention: a clean stop, a start 25 h later.
    let t_restart = Instant::now();
    for node in &mut lab.nodes {
        node.umount();
    }
    for node in &mut lab.nodes {
        mount_ahead(node);
    }
    lab.wait_connected(Duration::from_secs(30));
    let collected_in = wait_for("tombstones collected on both nodes", &lab, || {
        (0..2).all(|i| {
            Counts::try_of(&lab.nodes[i]).is_some_and(|c| c.tombstones <= base[i].tombstones)
        })
    });
    let restarted = t_restart.elapsed();
    let after: Vec<Counts> = lab.nodes.iter().map(Counts::of).collect();
    for (i, c) in after.iter().enumerate() {
        row(&mut rep, &format!("clock {CLOCK_AHEAD}"), i, c);
        rep.at_most(
            format!("node {i}: tombstones over baseline after the retention"),
            c.tombstones as f64 - base[i].tombstones as f64,
            0.0,
        );
        rep.at_most(
            format!("node {i}: entries over baseline after the retention"),
            c.entries() as f64 - base[i].entries() as f64,
            0.0,
        );
        rep.at_most(
            format!("node {i}: objects over baseline"),
            c.objects as f64 - base[i].objects as f64,
            0.0,
        );
        rep.at_most(
            format!("node {i}: object bytes over baseline"),
            c.object_bytes as f64 - base[i].object_bytes as f64,
            0.0,
        );
    }
    rep.note(format!(
        "2 nodes, tombstone_retention={RETENTION} (the minimum); {n} files of {size} B in gc/, every {OVERWRITTEN_EVERY}th rewritten {REWRITES} times ({versions} versions), written on node 0 in {:.1} s, read on node 1 in {:.1} s; all deleted on node 0, the deletes and objects gone on both in {:.1} s",
        written.as_secs_f64(),
        read.as_secs_f64(),
        deleted_in.as_secs_f64(),
    ));
    rep.note(format!(
        "simulated clock: both nodes unmounted and mounted again with libfaketime, wall clock {CLOCK_AHEAD}; tombstones collected {:.1} s after the restart ({:.1} s with it)",
        collected_in.as_secs_f64(),
        restarted.as_secs_f64(),
    ));
    rep.note(
        "before the clock moves, each node runs two anti-entropy rounds after the deletes: without them, a node that pulls the other's log only after its restart receives its own deletes back (the other node's copies, numbered in its log) and stores them again as tombstones until the next collection; apply_remote could refuse tombstones older than the retention",
    );
    rep.note(format!(
        "sled on disk (node 0, node 1): baseline {} / {} MiB, full {} / {} MiB, deleted {} / {} MiB, collected {} / {} MiB: sled reuses freed log segments for later writes rather than shrinking its file, so the db size is reported, not bounded",
        mib(base[0].db_bytes),
        mib(base[1].db_bytes),
        mib(full[0].db_bytes),
        mib(full[1].db_bytes),
        mib(deleted[0].db_bytes),
        mib(deleted[1].db_bytes),
        mib(after[0].db_bytes),
        mib(after[1].db_bytes),
    ));
    rep
}
