//! Scenario "large": a large file changes in place (issue 20). Node A writes
//! a file of `S` random bytes and node B reads it in full, so B holds it;
//! then A changes it in place, one operation at a time, and after each B
//! reads the new version in full. What is measured: the bytes B received
//! (everything its link carried, records and requests included), and the
//! time the operation took on A against the same command on a plain file of
//! the same size and contents on the same disk.
//!
//! The operations, in this order (the rewrite comes before the truncation so
//! that it rewrites the whole size, as its target assumes):
//!
//! * overwrite 1 MiB in the middle (`dd conv=notrunc seek=`);
//! * append 1 MiB (`dd oflag=append conv=notrunc`);
//! * rewrite every byte with new ones (`dd conv=notrunc`);
//! * truncate to `S / 2` (`truncate -s`);
//! * open for writing and close without a write (`exec 3>>F; exec 3>&-`):
//!   no new version may appear.
//!
//! "Committed" is observed in A's own `btfs status`: `records_published`
//! moves once the new version is in A's store and announced; the commit time
//! is from the command's exit to that. Sizes: `S` is 4 GiB (256 MiB in the
//! quick subset), or `BTFS_LAB_LARGE_SIZE` (`4GiB`, `268435456`...).

use std::{
    fs,
    io::{Read, Write},
    path::Path,
    process::Command,
    time::{Duration, Instant, SystemTime},
};

use crate::{
    net::{Lab, Node, Topology},
    report::{Report, mib, secs},
    scenarios::Opts,
};

const MIB: u64 = 1 << 20;
/// The link of both nodes: as fast as the lab shapes, since the wire is not
/// what is measured here (the bytes on it are).
const MBIT: u32 = 10_000;
/// `S` in the full run: the file.
const FULL_SIZE: u64 = 4 << 30;
/// `S` in the quick subset: big enough for 256 KiB pieces (1,024 of them).
const QUICK_SIZE: u64 = 256 << 20;
/// The environment variable that overrides `S`.
const SIZE_ENV: &str = "BTFS_LAB_LARGE_SIZE";
/// What an operation may cost B besides content: the new record, its
/// metainfo (20 bytes a piece), gossip, anti-entropy rounds and pings while
/// B reads; the "metadata", taken as 1 MiB.
const META: u64 = MIB;
/// Target of the rewrite of every byte: B's payload is at most this times
/// the file's size plus [`META`] (see [`Bound::Whole`] for why payload).
const REWRITE_FACTOR: f64 = 1.02;
/// Targets of the time on A, full run: open/write/close at most this times
/// the native command; the rewrite, open/write/close and commit together.
const FULL_RATIO: f64 = 3.0;
const FULL_REWRITE_RATIO: f64 = 1.3;
/// Target of the commit, full run: from the command's exit until A has
/// published the new version.
const FULL_COMMIT: Duration = Duration::from_secs(1);
/// Quick subset, on a loaded 2-core CI box: both daemons, the test and the
/// kernel's writeback share two cores, and every FUSE request waits for a
/// daemon thread to be scheduled, so a command of a few milliseconds can
/// take ten times as long with no fault of btfs. At 256 MiB even a copy of
/// the whole file on open takes only about 0.1 s, so these bounds catch a
/// hang or seconds lost, not a fall-back to whole-file work: the byte
/// bounds (strict) catch that here, the full run judges the times.
const QUICK_RATIO: f64 = 10.0;
/// The quick subset judges the rewrite by its rate instead: native writes
/// 256 MiB into the page cache in 40 to 60 ms, while every byte of A's
/// rewrite goes through the daemon (a range-staged writer is served
/// directly) and is hashed before the commit counts. Measured on this
/// 2-core VM: 1.2 to 1.6 s plus 0.15 s of commit (25 to 40 times native,
/// the same for the build before issue 21), so a ratio against native
/// is mostly the noise of a 50 ms copy. This floor (5 s for 256 MiB) still
/// catches a hang or a fall-back to whole-file work of seconds; the full
/// run judges the ratio.
const QUICK_REWRITE_MIB_S: f64 = 50.0;
const QUICK_COMMIT: Duration = Duration::from_secs(5);
/// The native time a ratio is taken against is at least this: below it,
/// starting the command (`dd`, `truncate`, `sh`) is most of what is timed
/// on both sides, and a ratio of two such times is noise. Full run / quick.
const FULL_NATIVE_FLOOR: Duration = Duration::from_millis(5);
const QUICK_NATIVE_FLOOR: Duration = Duration::from_millis(20);
/// How often A's status is read while waiting for its commit.
const POLL: Duration = Duration::from_millis(20);
/// How long a commit, a listing or a read may take before the scenario
/// calls it a hang (the old behaviour moves the whole file each time).
const LIMIT: Duration = Duration::from_secs(900);
/// After an open and close without a write: how long after the command's
/// exit to watch for a new version (its commit and several gossip
/// batches).
const QUIET: Duration = Duration::from_secs(3);
/// Block size of the generator, the hashing reads and `dd`.
const BLOCK: usize = 1 << 20;

/// The file's name in the mounts.
const NAME: &str = "large.bin";

/// `S` for this run.
fn size(o: &Opts) -> u64 {
    let s = match std::env::var(SIZE_ENV) {
        Ok(v) => parse_size::parse_size(&v).unwrap_or_else(|e| panic!("{SIZE_ENV}={v:?}: {e}")),
        Err(_) if o.quick => QUICK_SIZE,
        Err(_) => FULL_SIZE,
    };
    assert!(
        s >= 4 * MIB && s % (2 * MIB) == 0,
        "{SIZE_ENV}: a multiple of 2 MiB, at least 4 MiB (got {s})"
    );
    s
}

/// Writes `len` pseudo-random bytes (blake3's output stream under `seed`:
/// as good as random for content hashing, and fast) into a new file.
fn generate(path: &Path, len: u64, seed: u64) {
    let mut xof = blake3::Hasher::new()
        .update(&seed.to_le_bytes())
        .finalize_xof();
    let mut f = std::io::BufWriter::with_capacity(BLOCK, fs::File::create(path).expect("create"));
    let mut buf = vec![0u8; BLOCK];
    let mut left = len;
    while left > 0 {
        let n = left.min(BLOCK as u64) as usize;
        xof.fill(&mut buf[..n]);
        f.write_all(&buf[..n]).expect("write generated bytes");
        left -= n as u64;
    }
    f.flush().expect("flush generated bytes");
}

/// blake3 of a whole file, read 1 MiB at a time (through a mount too).
fn hash(path: &Path) -> blake3::Hash {
    let mut f = fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; BLOCK];
    loop {
        let n = f
            .read(&mut buf)
            .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        if n == 0 {
            return h.finalize();
        }
        h.update(&buf[..n]);
    }
}

/// Runs `cmd args` and times it (starting the process included, as on the
/// other side); panics with its output on failure.
fn timed(cmd: &str, args: &[String]) -> Duration {
    let t = Instant::now();
    let out = Command::new(cmd).args(args).output().expect("spawn");
    let took = t.elapsed();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    took
}

fn sync() {
    let ok = Command::new("sync").status().is_ok_and(|s| s.success());
    assert!(ok, "sync failed");
}

/// A counter of `btfs status --json` (0 when absent).
fn counter(node: &Node, key: &str) -> u64 {
    node.status()[key].as_u64().unwrap_or(0)
}

/// Waits until A has published a version after `before` (its
/// `records_published` counter) and has no file open.
fn wait_published(node: &Node, before: u64) {
    let t = Instant::now();
    loop {
        let s = node.status();
        if s["records_published"].as_u64().unwrap_or(0) > before && s["open_files"] == 0 {
            return;
        }
        assert!(
            t.elapsed() < LIMIT,
            "A published nothing new after {LIMIT:?}: {s}\n{}",
            node.log_tail(30)
        );
        std::thread::sleep(POLL);
    }
}

/// Waits until A has no file open (a release goes to its commit workers).
fn wait_closed(node: &Node) {
    let t = Instant::now();
    while node.status()["open_files"] != 0 {
        assert!(
            t.elapsed() < LIMIT,
            "A still has files open after {LIMIT:?}"
        );
        std::thread::sleep(POLL);
    }
}

/// Size and modification time of `path`.
fn stat(path: &Path) -> Option<(u64, SystemTime)> {
    let m = fs::metadata(path).ok()?;
    Some((m.len(), m.modified().ok()?))
}

/// Waits until `path` shows `want`.
fn wait_listed(node: &Node, path: &Path, want: (u64, SystemTime)) {
    let t = Instant::now();
    loop {
        let got = stat(path);
        if got == Some(want) {
            return;
        }
        assert!(
            t.elapsed() < LIMIT,
            "B lists {got:?}, not A's {want:?}, after {LIMIT:?}\n{}",
            node.log_tail(30)
        );
        std::thread::sleep(POLL);
    }
}

/// What B may receive for an operation, given the new version's size.
#[derive(Debug, Clone, Copy)]
enum Bound {
    /// `changed` bytes of content plus `pieces` pieces of the new version
    /// (the changed range's partial pieces at either end) plus metadata.
    Changed { changed: u64, pieces: u64 },
    /// Metadata only.
    Meta,
    /// At most `REWRITE_FACTOR` times the new size plus metadata, judged
    /// on B's payload (its engine's `bytes_downloaded`): the link's own
    /// overhead on a whole transfer (Ethernet, IP, TCP segmentation, acks)
    /// varied from 0.3 % to 3.7 % between transfers here, which judges the
    /// link, not btfs. A regression (pieces fetched twice, a second copy)
    /// shows in the payload.
    Whole,
}

impl Bound {
    /// The bound for a version of `new_size` bytes.
    fn bytes(self, new_size: u64) -> u64 {
        match self {
            Bound::Changed { changed, pieces } => {
                changed + pieces * u64::from(btfs_torrent::meta::piece_length(new_size)) + META
            }
            Bound::Meta => META,
            Bound::Whole => (new_size as f64 * REWRITE_FACTOR) as u64 + META,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Bound::Changed { pieces: 1, .. } => "1 MiB + 1 piece + meta",
            Bound::Changed { .. } => "1 MiB + 2 pieces + meta",
            Bound::Meta => "meta (1 MiB)",
            Bound::Whole => "1.02 × size + meta, of payload",
        }
    }
}

/// An operation's arguments for a given file (A's copy or the native twin).
type Args = Box<dyn Fn(&Path) -> Vec<String>>;

/// One operation: its name, the command on a given file, what B may
/// receive, and whether it makes a new version.
struct Op {
    name: &'static str,
    cmd: &'static str,
    args: Args,
    bound: Bound,
    new_version: bool,
    /// The whole file is written: its time target is on open, write, close
    /// and commit together.
    rewrite: bool,
}

/// A path as a command's argument.
fn p(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

/// The run's time bounds (full or quick) and a whole transfer's cost.
#[derive(Debug)]
struct Bounds {
    /// A's open-write-close over native.
    ratio: f64,
    /// A's open-write-close-commit over native, for the rewrite (full
    /// run); the quick subset judges its rate instead.
    rewrite: Option<f64>,
    /// Least rate of A's open-write-close-commit of the rewrite, MiB/s
    /// (quick subset).
    rewrite_rate: Option<f64>,
    commit: Duration,
    /// The least native time a ratio is taken against.
    floor: Duration,
    /// Link bytes per byte of content of the first whole transfer.
    whole: f64,
}

/// The measures of one operation.
#[derive(Debug, Default)]
struct Outcome {
    native: Duration,
    cmd: Duration,
    commit: Option<Duration>,
    listed: Option<Duration>,
    read: Duration,
    rx: u64,
    payload: u64,
    size: u64,
    /// Versions A published for an operation that must make none.
    versions: u64,
}

pub(crate) fn large(o: &Opts) -> Report {
    let s = size(o);
    let mut bounds = if o.quick {
        Bounds {
            ratio: QUICK_RATIO,
            rewrite: None,
            rewrite_rate: Some(QUICK_REWRITE_MIB_S),
            commit: QUICK_COMMIT,
            floor: QUICK_NATIVE_FLOOR,
            whole: 0.0,
        }
    } else {
        Bounds {
            ratio: FULL_RATIO,
            rewrite: Some(FULL_REWRITE_RATIO),
            rewrite_rate: None,
            commit: FULL_COMMIT,
            floor: FULL_NATIVE_FLOOR,
            whole: 0.0,
        }
    };
    let mut lab = Lab::build(&Topology::flat(2, MBIT), "");
    lab.mount_all();
    let (a, b) = (&lab.nodes[0], &lab.nodes[1]);
    let (fa, fb) = (a.path(NAME), b.path(NAME));
    // The native twin: same bytes, same commands, in the lab's directory on
    // the disk that holds both nodes' state.
    let native = lab.file("native.bin");
    let chunk1 = lab.file("chunk-overwrite");
    let chunk2 = lab.file("chunk-append");
    let rewrite_src = lab.file("rewrite-src");
    generate(&native, s, 1);
    generate(&chunk1, MIB, 2);
    generate(&chunk2, MIB, 3);
    println!("  large: S = {} MiB", s / MIB);

    // 1. A writes the file, B reads it in full.
    let published = counter(a, "records_published");
    let t = Instant::now();
    timed(
        "dd",
        &[
            format!("if={}", p(&native)),
            format!("of={}", p(&fa)),
            format!("bs={BLOCK}"),
        ],
    );
    let written = t.elapsed();
    wait_published(a, published);
    let first = stat(&fa).expect("A lists the file");
    wait_listed(b, &fb, first);
    let rx0 = b.bytes();
    let t = Instant::now();
    let hb = hash(&fb);
    let first_read = t.elapsed();
    let first_rx = (b.bytes() - rx0).rx;
    bounds.whole = first_rx as f64 / s as f64;
    let want = hash(&native);
    assert_eq!(hb, want, "B read other bytes than A wrote");
    assert_eq!(hash(&fa), want, "A reads other bytes than it wrote");
    println!(
        "  large: written on A in {}, read on B in {} ({} MiB received)",
        secs(written),
        secs(first_read),
        mib(first_rx)
    );

    // 2. The operations.
    let half_mib = s / 2 / MIB;
    let ops: Vec<Op> = vec![
        Op {
            name: "overwrite 1 MiB in the middle",
            cmd: "dd",
            args: {
                let c = chunk1.clone();
                Box::new(move |f| {
                    vec![
                        format!("if={}", p(&c)),
                        format!("of={}", p(f)),
                        "bs=1M".into(),
                        format!("seek={half_mib}"),
                        "count=1".into(),
                        "conv=notrunc".into(),
                    ]
                })
            },
            bound: Bound::Changed {
                changed: MIB,
                pieces: 2,
            },
            new_version: true,
            rewrite: false,
        },
        Op {
            name: "append 1 MiB",
            cmd: "dd",
            args: {
                let c = chunk2.clone();
                Box::new(move |f| {
                    vec![
                        format!("if={}", p(&c)),
                        format!("of={}", p(f)),
                        "bs=1M".into(),
                        "count=1".into(),
                        "oflag=append".into(),
                        "conv=notrunc".into(),
                    ]
                })
            },
            bound: Bound::Changed {
                changed: MIB,
                pieces: 1,
            },
            new_version: true,
            rewrite: false,
        },
        Op {
            name: "rewrite every byte",
            cmd: "dd",
            args: {
                let c = rewrite_src.clone();
                Box::new(move |f| {
                    vec![
                        format!("if={}", p(&c)),
                        format!("of={}", p(f)),
                        "bs=1M".into(),
                        "conv=notrunc".into(),
                    ]
                })
            },
            bound: Bound::Whole,
            new_version: true,
            rewrite: true,
        },
        Op {
            name: "truncate to S/2",
            cmd: "truncate",
            args: Box::new(move |f| vec!["-s".into(), (s / 2).to_string(), p(f)]),
            bound: Bound::Meta,
            new_version: true,
            rewrite: false,
        },
        Op {
            name: "open for writing, close, no write",
            cmd: "sh",
            args: Box::new(|f| {
                vec![
                    "-c".into(),
                    "exec 3>>\"$1\"; exec 3>&-".into(),
                    "sh".into(),
                    p(f),
                ]
            }),
            bound: Bound::Meta,
            new_version: false,
            rewrite: false,
        },
    ];

    let mut rep = Report::new(
        "large",
        &[
            "operation",
            "size MiB",
            "B received MiB",
            "target MiB",
            "B payload MiB",
            "native s",
            "A open-write-close s",
            "ratio",
            "A commit s",
            "B listed s",
            "B read s",
        ],
        &[
            "size_bytes",
            "operation",
            "new_size_bytes",
            "b_rx_bytes",
            "bound_bytes",
            "b_payload_bytes",
            "native_s",
            "a_cmd_s",
            "a_commit_s",
            "b_listed_s",
            "b_read_s",
        ],
    );
    rep.row(vec![
        "write S on A, read on B".into(),
        mib(s),
        mib(first_rx),
        "-".into(),
        "-".into(),
        "-".into(),
        secs(written),
        "-".into(),
        "-".into(),
        "-".into(),
        secs(first_read),
    ]);

    for op in &ops {
        if op.rewrite {
            // The new bytes, untimed, of the file's current size.
            let len = fs::metadata(&native).expect("native file").len();
            generate(&rewrite_src, len, 4);
        }
        // Native first, then A; writeback of what came before flushed
        // (untimed) before each.
        sync();
        let native_t = timed(op.cmd, &(op.args)(&native));
        sync();
        let before = b.bytes();
        let down = counter(b, "bytes_downloaded");
        let published = counter(a, "records_published");
        let cmd = timed(op.cmd, &(op.args)(&fa));
        let exited = Instant::now();
        let mut out = Outcome {
            native: native_t,
            cmd,
            ..Outcome::default()
        };
        if op.new_version {
            wait_published(a, published);
            out.commit = Some(exited.elapsed());
            let now = stat(&fa).expect("A lists the file");
            wait_listed(b, &fb, now);
            out.listed = Some(exited.elapsed());
        } else {
            // Nothing to wait for: watch for a version that should not come.
            wait_closed(a);
            while exited.elapsed() < QUIET && counter(a, "records_published") == published {
                std::thread::sleep(POLL);
            }
            out.versions = counter(a, "records_published") - published;
            if out.versions > 0 {
                let now = stat(&fa).expect("A lists the file");
                wait_listed(b, &fb, now);
                out.listed = Some(exited.elapsed());
            }
        }
        let t = Instant::now();
        let hb = hash(&fb);
        out.read = t.elapsed();
        let want = hash(&native);
        out.rx = (b.bytes() - before).rx;
        out.payload = counter(b, "bytes_downloaded").saturating_sub(down);
        out.size = fs::metadata(&fa).expect("A lists the file").len();
        let ha = hash(&fa);
        assert_eq!(
            ha, want,
            "{}: A's copy differs from the native twin",
            op.name
        );
        assert_eq!(hb, ha, "{}: B's copy differs from A's", op.name);
        if op.rewrite {
            let _ = fs::remove_file(&rewrite_src);
        }
        println!(
            "  large: {}: B received {} MiB, A {} (native {}), commit {}",
            op.name,
            mib(out.rx),
            secs(out.cmd),
            secs(out.native),
            out.commit.map_or("-".into(), secs)
        );
        record(&mut rep, op, &out, s, &bounds);
    }

    rep.note(format!(
        "S = {} MiB, two nodes on one {MBIT} Mbit/s link; pieces of {} KiB at S \
         (btfs_torrent::meta::piece_length of the new size in each target)",
        s / MIB,
        btfs_torrent::meta::piece_length(s) / 1024
    ));
    rep.note(format!(
        "a whole transfer (the first read on B) cost {:.4} link bytes per byte of content",
        bounds.whole
    ));
    rep.note(
        "B received: everything B's link carried from before the operation until B had read \
         the new version in full (records, requests, pings included); B payload: its \
         engine's bytes_downloaded",
    );
    rep.note(format!(
        "native: the same command on a plain file with the same bytes in the lab's directory \
         (same disk as both nodes' state), after a sync, no sync after; ratio: A's \
         open-write-close over native (rewrite: with the commit), the verdict against a \
         native time of at least {} ms",
        bounds.floor.as_millis()
    ));
    rep.note(
        "A commit: from the command's exit until A's status counts the new version published \
         (records_published) with no file open; B listed: from the command's exit until B \
         lists A's new size and mtime",
    );
    for f in [&native, &chunk1, &chunk2, &rewrite_src] {
        let _ = fs::remove_file(f);
    }
    lab.umount_all();
    rep
}

/// The row, the CSV line and the verdicts of one operation.
fn record(rep: &mut Report, op: &Op, out: &Outcome, s: u64, bounds: &Bounds) {
    let bound = op.bound.bytes(out.size);
    let a_time = if op.rewrite {
        out.cmd + out.commit.unwrap_or_default()
    } else {
        out.cmd
    };
    let ratio = a_time.as_secs_f64() / out.native.as_secs_f64();
    let floored = a_time.as_secs_f64() / out.native.max(bounds.floor).as_secs_f64();
    let opt = |d: Option<Duration>| d.map_or("-".into(), secs);
    rep.row(vec![
        op.name.into(),
        mib(out.size),
        mib(out.rx),
        format!("{} ({})", mib(bound), op.bound.label()),
        mib(out.payload),
        format!("{:.4}", out.native.as_secs_f64()),
        format!("{:.4}", out.cmd.as_secs_f64()),
        format!("{ratio:.1}"),
        opt(out.commit),
        opt(out.listed),
        secs(out.read),
    ]);
    let opt4 = |d: Option<Duration>| d.map_or(String::new(), |d| format!("{:.4}", d.as_secs_f64()));
    rep.csv(vec![
        s.to_string(),
        op.name.into(),
        out.size.to_string(),
        out.rx.to_string(),
        bound.to_string(),
        out.payload.to_string(),
        format!("{:.4}", out.native.as_secs_f64()),
        format!("{:.4}", out.cmd.as_secs_f64()),
        opt4(out.commit),
        opt4(out.listed),
        format!("{:.4}", out.read.as_secs_f64()),
    ]);
    let (what, got) = match op.bound {
        Bound::Whole => ("B payload", out.payload),
        _ => ("B received", out.rx),
    };
    rep.at_most(
        format!("{}: {what} (MiB)", op.name),
        got as f64 / MIB as f64,
        bound as f64 / MIB as f64,
    );
    if !op.new_version {
        rep.at_most(
            format!("{}: new versions published by A", op.name),
            out.versions as f64,
            0.0,
        );
    }
    if op.rewrite {
        if let Some(bound) = bounds.rewrite {
            rep.at_most(
                format!("{}: A open-write-close-commit / native", op.name),
                floored,
                bound,
            );
        }
        if let Some(least) = bounds.rewrite_rate {
            rep.at_least(
                format!("{}: A open-write-close-commit rate (MiB/s)", op.name),
                out.size as f64 / f64::from(1 << 20) / a_time.as_secs_f64(),
                least,
            );
        }
    } else {
        rep.at_most(
            format!("{}: A open-write-close / native", op.name),
            floored,
            bounds.ratio,
        );
        if let Some(c) = out.commit {
            rep.at_most(
                format!("{}: A commit (s)", op.name),
                c.as_secs_f64(),
                bounds.commit.as_secs_f64(),
            );
        }
    }
}
