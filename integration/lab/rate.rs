//! Scenario "rate": one node's small-file rate, as a user meets it first.
//!
//! * untar: a tarball of `FILES` x 4 KiB files (distinct random contents, in
//!   `DIRS` directories) is unpacked with `tar xf` and then `sync` is run,
//!   timed together, into the node's mount and into a plain directory of
//!   the filesystem that holds the node's state (the lab directory), in
//!   alternating order, medians kept. The ratio native/btfs is the speed of
//!   btfs as a fraction of native; `sync` counts the writeback on both sides
//!   (btfs's objects and metadata are on that same filesystem).
//! * creates: `FILES` open/write 4 KiB/close from this process, no sync,
//!   into the mount: files per second.
//!
//! btfs commits a closed file on its commit workers, after `close` returned;
//! "committed" columns time until every file is committed (open_files 0), so
//! that a backlog left behind the measured commands shows.

use std::{
    fs,
    io::Write,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use crate::{
    common::pattern,
    net::{Lab, Node, Topology},
    report::{Report, median},
    scenarios::Opts,
};

/// Files in the tarball and in the create loop.
const FILES: usize = 2000;
/// Bytes of each file.
const FILE_SIZE: usize = 4096;
/// Directories the tarball's files are spread over.
const DIRS: usize = 8;
/// Timed runs of each case on each side (full lab; quick: `QUICK_RUNS`).
const RUNS: usize = 3;
const QUICK_RUNS: usize = 1;
/// Target: btfs untar + sync at least this fraction of native speed.
const UNTAR_RATIO: f64 = 0.6;
/// Target: creates per second into one node, without sync.
const CREATE_RATE: f64 = 2000.0;
/// How often the node's status is read while waiting for its commits: each
/// read counts the whole tree (a scan), so polling faster slows the commits.
const STATUS_POLL: Duration = Duration::from_millis(50);
/// How long a node may take to commit what was written (else: a hang).
const SETTLE_LIMIT: Duration = Duration::from_secs(120);

/// Runs `cmd args`, panicking with its output on failure.
fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Waits until the node has committed every closed file and deleted what
/// it released (so that nothing of one run spills into the next).
fn settle(node: &Node) {
    let t0 = Instant::now();
    loop {
        let s = node.status();
        let fs = if s.get("fs").is_some() { &s["fs"] } else { &s };
        if fs["open_files"] == 0 && fs["pending_gc"] == 0 {
            return;
        }
        assert!(
            t0.elapsed() < SETTLE_LIMIT,
            "node not settled after {SETTLE_LIMIT:?}: {s}"
        );
        std::thread::sleep(STATUS_POLL);
    }
}

/// Waits until every closed file is committed; the time it took.
fn committed(node: &Node) -> Duration {
    let t0 = Instant::now();
    loop {
        let s = node.status();
        let fs = if s.get("fs").is_some() { &s["fs"] } else { &s };
        if fs["open_files"] == 0 {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < SETTLE_LIMIT,
            "files not committed after {SETTLE_LIMIT:?}: {s}"
        );
        std::thread::sleep(STATUS_POLL);
    }
}

/// The tarball: `FILES` distinct random 4 KiB files in `DIRS` directories.
fn make_tarball(lab: &Lab) -> PathBuf {
    let src = lab.file("rate-src");
    for i in 0..FILES {
        let dir = src.join(format!("d{}", i % DIRS));
        fs::create_dir_all(&dir).expect("tarball dir");
        fs::write(
            dir.join(format!("f{i:05}.bin")),
            pattern(7_000 + i as u64, FILE_SIZE),
        )
        .expect("tarball file");
    }
    let tar = lab.file("rate.tar");
    run(
        "tar",
        &[
            "cf",
            &tar.to_string_lossy(),
            "-C",
            &src.to_string_lossy(),
            ".",
        ],
    );
    fs::remove_dir_all(&src).expect("remove the tarball's source");
    tar
}

/// `FILES` creates of 4 KiB each into `dir`, from this process.
fn creates(dir: &Path) {
    let data: Vec<Vec<u8>> = (0..FILES)
        .map(|i| pattern(90_000 + i as u64, FILE_SIZE))
        .collect();
    for (i, d) in data.iter().enumerate() {
        let mut f = fs::File::create(dir.join(format!("c{i:05}"))).expect("create");
        f.write_all(d).expect("write");
    }
}

/// One side of a case: where it writes, and whether it is btfs.
#[derive(Clone, Copy, PartialEq)]
enum Side {
    Native,
    Btfs,
}

pub(crate) fn rate(o: &Opts) -> Report {
    let runs = if o.quick { QUICK_RUNS } else { RUNS };
    let mut lab = Lab::build(&Topology::flat(1, 1000), "");
    lab.mount_all();
    let tar = make_tarball(&lab);
    let tar_s = tar.to_string_lossy().to_string();
    let node = &lab.nodes[0];

    // untar + sync, alternating which side goes first.
    let mut untar = [Vec::new(), Vec::new()];
    let mut untar_committed = Vec::new();
    let mut create = [Vec::new(), Vec::new()];
    let mut create_committed = Vec::new();
    for r in 0..runs {
        let order = if r % 2 == 0 {
            [Side::Native, Side::Btfs]
        } else {
            [Side::Btfs, Side::Native]
        };
        for side in order {
            let dir = match side {
                Side::Native => lab.file(&format!("native-untar-{r}")),
                Side::Btfs => node.path(&format!("untar-{r}")),
            };
            fs::create_dir_all(&dir).expect("untar dir");
            if side == Side::Btfs {
                settle(node);
            }
            run("sync", &[]);
            let t0 = Instant::now();
            run("tar", &["xf", &tar_s, "-C", &dir.to_string_lossy()]);
            run("sync", &[]);
            let took = t0.elapsed();
            let n = fs::read_dir(dir.join("d0")).expect("untarred").count();
            assert_eq!(n, FILES / DIRS, "files untarred into {}", dir.display());
            if side == Side::Btfs {
                untar_committed.push((took + committed(node)).as_secs_f64());
            }
            untar[side as usize].push(took.as_secs_f64());
            println!(
                "  untar+sync {} run {r}: {:.2} s",
                if side == Side::Btfs { "btfs" } else { "native" },
                took.as_secs_f64()
            );
        }
        for side in order {
            let dir = match side {
                Side::Native => lab.file(&format!("native-creates-{r}")),
                Side::Btfs => node.path(&format!("creates-{r}")),
            };
            fs::create_dir_all(&dir).expect("creates dir");
            if side == Side::Btfs {
                settle(node);
            }
            run("sync", &[]);
            let t0 = Instant::now();
            creates(&dir);
            let took = t0.elapsed();
            if side == Side::Btfs {
                create_committed.push((took + committed(node)).as_secs_f64());
            }
            create[side as usize].push(took.as_secs_f64());
            println!(
                "  creates {} run {r}: {:.2} s",
                if side == Side::Btfs { "btfs" } else { "native" },
                took.as_secs_f64()
            );
        }
    }
    settle(node);
    let status = node.status();

    let mut rep = Report::new(
        "rate",
        &[
            "case",
            "files",
            "native s",
            "btfs s",
            "btfs committed s",
            "native/btfs",
            "btfs files/s",
            "best native s",
            "best btfs s",
        ],
        &["case", "side", "run", "secs"],
    );
    for (case, times) in [("untar+sync", &untar), ("creates", &create)] {
        for (side, v) in [("native", &times[0]), ("btfs", &times[1])] {
            for (r, t) in v.iter().enumerate() {
                rep.csv(vec![
                    case.into(),
                    side.into(),
                    r.to_string(),
                    format!("{t:.4}"),
                ]);
            }
        }
    }
    let (un, ub) = (median(&untar[0]), median(&untar[1]));
    let (cn, cb) = (median(&create[0]), median(&create[1]));
    let (uc, cc) = (median(&untar_committed), median(&create_committed));
    let files = FILES as f64;
    let best = |v: &[f64]| format!("{:.2}", v.iter().copied().fold(f64::INFINITY, f64::min));
    rep.row(vec![
        "tar xf + sync".into(),
        FILES.to_string(),
        format!("{un:.2}"),
        format!("{ub:.2}"),
        format!("{uc:.2}"),
        format!("{:.2}", un / ub),
        format!("{:.0}", files / ub),
        best(&untar[0]),
        best(&untar[1]),
    ]);
    rep.row(vec![
        "open/write/close, no sync".into(),
        FILES.to_string(),
        format!("{cn:.2}"),
        format!("{cb:.2}"),
        format!("{cc:.2}"),
        format!("{:.2}", cn / cb),
        format!("{:.0}", files / cb),
        best(&create[0]),
        best(&create[1]),
    ]);
    let min = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
    rep.note(format!(
        "best runs: untar + sync native/btfs {:.2}, creates native/btfs {:.2}",
        min(&untar[0]) / min(&untar[1]),
        min(&create[0]) / min(&create[1])
    ));
    rep.at_least("untar + sync, native/btfs", un / ub, UNTAR_RATIO);
    rep.at_least("creates into one node, files/s", files / cb, CREATE_RATE);
    rep.note(format!(
        "{FILES} files of {FILE_SIZE} B, median of {runs} run(s) each, sides alternating; \
         native: a directory of the lab dir's filesystem (the node's state is there too); \
         committed: until btfs has committed every closed file"
    ));
    rep.note(
        "on ext4 without a journal (this VM's root) creating a file skips over every inode \
         of its group deleted in the last 60-360 s (recently_deleted() in the inode \
         allocator), one buffer lookup each: right after a mass delete (a lab's teardown) \
         either side can be several times slower; the best run of each side shows it",
    );
    let fs_status = if status.get("fs").is_some() {
        &status["fs"]
    } else {
        &status
    };
    rep.note(format!(
        "node: {} commits, {} commit failures",
        fs_status["commits"], fs_status["commit_failures"]
    ));
    lab.umount_all();
    rep
}
