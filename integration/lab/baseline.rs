//! The baselines, in the same lab on the same caps: a central HTTP server on
//! the writer (`python3 -m http.server`, readers use `curl`), and a plain
//! BitTorrent swarm of libtorrent-rasterbar sessions (`swarm.py`), peers
//! given by hand.

use std::{
    fs,
    io::{BufRead, BufReader, Write},
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use crate::net::{Lab, sh};

/// The system Python, which has Debian's python3-libtorrent (a pyenv or
/// venv `python3` on PATH may not).
const PYTHON: &str = "/usr/bin/python3";
const HTTP_PORT: u16 = 8000;
const SWARM_PORT: u16 = 6881;

/// When each reader was done, from the moment they all started.
#[derive(Debug)]
pub(crate) struct Finish {
    pub(crate) done: Vec<(usize, Duration)>,
}

/// Kills its processes when dropped.
struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A command run in namespace `ns`, with no proxy from the environment:
/// nothing here goes through a proxy, only to the lab's addresses (Syncthing
/// dials through `all_proxy`).
pub(crate) fn in_ns(ns: &str, program: &str) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns, program]);
    for v in [
        "http_proxy",
        "https_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "all_proxy",
        "ALL_PROXY",
        "no_proxy",
        "NO_PROXY",
    ] {
        c.env_remove(v);
    }
    c
}

/// The central server: the writer serves `src` over HTTP, every reader
/// fetches it at once with curl.
pub(crate) fn http(
    lab: &Lab,
    writer: usize,
    readers: &[usize],
    src: &Path,
    limit: Duration,
) -> Finish {
    let w = &lab.nodes[writer];
    let dir = src.parent().expect("file in a directory");
    let name = src.file_name().expect("file name").to_string_lossy();
    let server = in_ns(&w.ns, PYTHON)
        .args([
            "-m",
            "http.server",
            &HTTP_PORT.to_string(),
            "--bind",
            &w.addr,
        ])
        .arg("--directory")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("python3 -m http.server");
    let _server = Procs(vec![server]);
    let url = format!("http://{}:{HTTP_PORT}/{name}", w.addr);
    let probe_ns = &lab.nodes[readers[0]].ns;
    let start = Instant::now();
    loop {
        let ok = in_ns(probe_ns, "curl")
            .args(["--noproxy", "*", "-s", "-I", "--max-time", "1", &url])
            .output()
            .is_ok_and(|o| o.status.success());
        if ok {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "http.server did not start"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let size = fs::metadata(src).expect("source").len();
    let t0 = Instant::now();
    let mut kids: Vec<(usize, Child)> = readers
        .iter()
        .map(|&r| {
            let c = in_ns(&lab.nodes[r].ns, "curl")
                .args([
                    "--noproxy",
                    "*",
                    "-s",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{size_download}",
                    &url,
                ])
                .stdout(Stdio::piped())
                .spawn()
                .expect("curl");
            (r, c)
        })
        .collect();
    let mut done = Vec::new();
    while !kids.is_empty() {
        assert!(
            t0.elapsed() < limit,
            "HTTP readers not done after {limit:?}"
        );
        let mut i = 0;
        while i < kids.len() {
            if let Ok(Some(_)) = kids[i].1.try_wait() {
                let (r, c) = kids.remove(i);
                let out = c.wait_with_output().expect("curl output");
                let got: u64 = String::from_utf8_lossy(&out.stdout)
                    .trim()
                    .parse()
                    .unwrap_or(0);
                assert_eq!(got, size, "curl on node {r} fetched {got} of {size} bytes");
                done.push((r, t0.elapsed()));
            } else {
                i += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Finish { done }
}

/// The BitTorrent swarm: libtorrent on every node, the writer seeding,
/// every reader told every other node.
pub(crate) fn swarm(
    lab: &Lab,
    writer: usize,
    readers: &[usize],
    src: &Path,
    limit: Duration,
) -> Finish {
    let script = lab.file("swarm.py");
    fs::write(&script, include_str!("swarm.py")).expect("swarm.py");
    let torrent = lab.file("swarm.torrent");
    let _ = fs::remove_file(&torrent);
    // 256 KiB pieces, as btfs uses for these sizes.
    sh(
        "mktorrent",
        &[
            "-l",
            "18",
            "-o",
            &torrent.to_string_lossy(),
            &src.to_string_lossy(),
        ],
    );
    let seed_dir = src.parent().expect("file in a directory");
    let mut all: Vec<usize> = vec![writer];
    all.extend_from_slice(readers);
    let mut procs = Procs(Vec::new());
    let (tx, rx) = mpsc::channel::<(usize, &'static str)>();
    for &n in &all {
        let node = &lab.nodes[n];
        let role = if n == writer { "seed" } else { "leech" };
        let save = if n == writer {
            seed_dir.to_path_buf()
        } else {
            let d = lab.file(&format!("swarm-{n}"));
            let _ = fs::remove_dir_all(&d);
            fs::create_dir_all(&d).expect("swarm dir");
            d
        };
        let mut cmd = in_ns(&node.ns, PYTHON);
        cmd.arg(&script)
            .args([role])
            .arg(&torrent)
            .arg(&save)
            .args([node.addr.as_str(), &SWARM_PORT.to_string()]);
        // Readers are told every peer; the seed waits for them.
        if n != writer {
            for &o in &all {
                if o != n {
                    cmd.arg(&lab.nodes[o].addr);
                }
            }
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("swarm.py");
        let out = child.stdout.take().expect("stdout");
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { return };
                let what = match line.trim() {
                    "READY" => "ready",
                    "DONE" => "done",
                    _ => continue,
                };
                if tx.send((n, what)).is_err() {
                    return;
                }
            }
        });
        procs.0.push(child);
    }
    let mut ready = 0;
    while ready < all.len() {
        let (_, what) = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("libtorrent sessions did not start (is python3-libtorrent installed?)");
        if what == "ready" {
            ready += 1;
        }
    }
    let t0 = Instant::now();
    for c in &mut procs.0 {
        if let Some(stdin) = c.stdin.as_mut() {
            let _ = stdin.write_all(b"go\n");
            let _ = stdin.flush();
        }
    }
    let mut done = Vec::new();
    while done.len() < readers.len() {
        let left = limit.saturating_sub(t0.elapsed());
        let (n, what) = rx
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("libtorrent readers not done after {limit:?}"));
        if what == "done" {
            done.push((n, t0.elapsed()));
        }
    }
    for &r in readers {
        let got = lab
            .file(&format!("swarm-{r}"))
            .join(src.file_name().expect("name"));
        assert_eq!(
            fs::metadata(&got).map(|m| m.len()).ok(),
            fs::metadata(src).map(|m| m.len()).ok(),
            "libtorrent on node {r}"
        );
    }
    Finish { done }
}
