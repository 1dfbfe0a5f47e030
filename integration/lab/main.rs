//! The cluster content lab: btfs clusters built on this one machine from
//! network namespaces, every node mounted with `mount -t btfs`, links capped
//! with `tc tbf`, zones joined by router namespaces; each scenario prints a
//! table, writes a CSV and tears everything down (on failure and on Ctrl-C
//! too). See docs/BENCHMARKS.md, "The cluster content lab".
//!
//! ```sh
//! cargo test --release --test lab                 # the quick subset (in the test suite)
//! cargo test --release --test lab -- full         # every scenario, with the baselines
//! cargo test --release --test lab -- zones churn  # some of them, full size
//! cargo test --release --test lab -- quick small  # some of them, quick sizes
//! ```
//!
//! Options after `--`: `--n 3,4,8` (fan-out cluster sizes), `--no-baselines`
//! (btfs only), `--out DIR`
//! (CSV and plot; default `target/lab`). The quick subset fails (non-zero
//! exit) when a bound is missed; the full lab reports every target met or
//! missed, and fails only when something breaks (wrong bytes, a hang).

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../tests/common/mod.rs"]
mod common;

mod baseline;
mod gc;
mod large;
mod meta;
mod net;
mod plot;
mod rate;
mod report;
mod scenarios;
mod syncthing;

use std::path::PathBuf;

use scenarios::Opts;

const ALL: &[&str] = &[
    "fanout",
    "zones",
    "reflow",
    "churn",
    "small",
    "waste",
    "throttle",
    // Metadata at scale.
    "rate",
    "join",
    "change",
    "partition",
    "syncthing",
    "gc",
    // Large files change in place (issue 20).
    "large",
];

fn main() {
    // Ctrl-C, SIGTERM, SIGHUP: tear every lab down, then exit. Blocked
    // here before any thread starts, so only the waiting thread takes them
    // (children start with an empty mask: std resets it).
    let mut set = nix::sys::signal::SigSet::empty();
    for s in [
        nix::sys::signal::Signal::SIGINT,
        nix::sys::signal::Signal::SIGTERM,
        nix::sys::signal::Signal::SIGHUP,
    ] {
        set.add(s);
    }
    set.thread_block().expect("block signals");
    std::thread::spawn(move || {
        if let Ok(sig) = set.wait() {
            eprintln!("lab: {sig}: tearing down");
            net::teardown_all();
            if let Some(b) = net::HELPER_BACKUP
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take()
            {
                net::restore_helper(&b);
            }
            std::process::exit(130);
        }
    });

    let mut args = std::env::args().skip(1);
    let mut picked: Vec<String> = Vec::new();
    let mut full = false;
    let mut force_quick = false;
    let mut sizes: Option<Vec<usize>> = None;
    let mut baselines = true;
    let mut out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("../lab");
    while let Some(a) = args.next() {
        match a.as_str() {
            "full" => full = true,
            "quick" => force_quick = true,
            "--n" => {
                let v = args.next().expect("--n LIST");
                sizes = Some(
                    v.split(',')
                        .map(|n| n.parse().expect("--n: numbers"))
                        .collect(),
                );
            }
            "--no-baselines" => baselines = false,
            "--out" => out = PathBuf::from(args.next().expect("--out DIR")),
            s if ALL.contains(&s) => picked.push(s.to_owned()),
            // cargo test's own flags (--nocapture, --test-threads...)
            // reach every test binary: not the lab's.
            s if s.starts_with('-') => {}
            s => panic!("lab: unknown scenario {s:?}; scenarios: {ALL:?}"),
        }
    }
    let quick = force_quick || (!full && picked.is_empty());
    if full {
        picked = ALL.iter().map(|s| s.to_string()).collect();
    }
    if quick && picked.is_empty() {
        picked = [
            "fanout",
            "churn",
            "zones",
            "join",
            "change",
            "partition",
            "large",
        ]
        .map(String::from)
        .to_vec();
    }
    let opts = Opts {
        quick,
        baselines: baselines && !quick,
        sizes: sizes.unwrap_or(if quick { vec![4] } else { (3..=8).collect() }),
    };
    let helper = net::Helper::install();
    println!(
        "btfs cluster lab ({}): {}",
        if quick { "quick subset" } else { "full size" },
        picked.join(", ")
    );
    let mut missed = Vec::new();
    for s in &picked {
        let started = std::time::Instant::now();
        let rep = match s.as_str() {
            "fanout" => {
                let (rep, points) = scenarios::fanout(&opts);
                if !quick {
                    let png = out.join("fanout.png");
                    match plot::fanout(&png, &points) {
                        Ok(()) => println!("plot: {}", png.display()),
                        Err(e) => eprintln!("lab: plot not drawn: {e}"),
                    }
                }
                rep
            }
            "zones" => scenarios::zones(&opts),
            "reflow" => scenarios::reflow(&opts),
            "churn" => scenarios::churn(&opts),
            "small" => scenarios::small(&opts),
            "waste" => scenarios::waste(&opts),
            "throttle" => scenarios::throttle(&opts),
            "rate" => rate::rate(&opts),
            "join" => meta::join(&opts),
            "change" => meta::change(&opts),
            "partition" => meta::partition(&opts),
            "syncthing" => syncthing::syncthing(&opts),
            "gc" => gc::gc(&opts),
            "large" => large::large(&opts),
            _ => unreachable!("checked above"),
        };
        rep.finish(&out);
        println!("({s}: {:.0} s)", started.elapsed().as_secs_f64());
        for c in rep.missed() {
            missed.push(format!("{s}: {}", c.line()));
        }
    }
    assert!(
        net::LIVE
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty(),
        "a lab was not torn down"
    );
    println!("\n# Summary");
    if missed.is_empty() {
        println!("every target met");
    } else {
        for m in &missed {
            println!("{m}");
        }
    }
    // Put back /sbin/mount.btfs before exiting (exit runs no destructor).
    drop(helper);
    if quick && !missed.is_empty() {
        eprintln!("lab: the quick subset missed {} bound(s)", missed.len());
        std::process::exit(1);
    }
}
