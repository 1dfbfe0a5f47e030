//! Against Syncthing (issue 19, scenario 4): the same four-node cluster on
//! the same capped links, once with btfs mounted, once with Debian's
//! `syncthing` daemons (one per namespace, configured by hand: static
//! addresses, `fsWatcherDelayS=1`, nothing that leaves the lab). Measured
//! the same way on both: from the moment node 0 starts writing until every
//! other node reads the right bytes (blake3), for one new 1 MiB file and
//! for a batch of small files spread over many directories.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::{
    baseline::in_ns,
    common::pattern,
    net::{Lab, Topology, ns_pids},
    report::{Report, median, mib, secs},
    scenarios::Opts,
};

/// Every node's link, both ways, for both systems: 1 MiB takes 84 ms on one
/// link, so the writer's uplink is a real bound (the single file to three
/// readers from the writer alone: 0.25 s) without hiding a 1 s watcher.
const MBIT: u32 = 100;
/// Nodes: one writer, three that must end with every byte.
const NODES: usize = 4;
/// The single file.
const ONE: usize = 1 << 20;
/// How many times the single file is measured (full lab); the median counts.
const RUNS: usize = 3;
/// The batch (full lab; `BATCH_QUICK` in the quick subset).
const BATCH: usize = 10_000;
/// The batch in the quick subset.
const BATCH_QUICK: usize = 1_000;
/// Size of each file of the batch.
const SMALL: usize = 1 << 10;
/// Directories the batch is spread over.
const DIRS: usize = 100;
/// A reader gives up (the scenario fails: a hang) after this long for the
/// single file...
const ONE_LIMIT: Duration = Duration::from_secs(60);
/// ... and after this long for the batch.
const BATCH_LIMIT: Duration = Duration::from_secs(900);
/// Between two polls of a reader's pending files: short next to the
/// times measured (a second for Syncthing's watcher alone).
const POLL: Duration = Duration::from_millis(5);

/// Syncthing's sync port, on each node's lab address.
const ST_PORT: u16 = 22000;
/// Syncthing's GUI and REST port, on 127.0.0.1 inside each namespace.
const GUI_PORT: u16 = 8384;
/// The Syncthing folder's id, the same on every node.
const FOLDER: &str = "lab";
/// Syncthing daemons must be up, connected to every other and idle within
/// this.
const ST_READY_LIMIT: Duration = Duration::from_secs(90);

/// One measured system's numbers.
#[derive(Debug)]
struct Measures {
    /// The single file, each run.
    one: Vec<Timing>,
    batch: Timing,
}

pub(crate) fn syncthing(o: &Opts) -> Report {
    let version = syncthing_version();
    let runs = if o.quick { 1 } else { RUNS };
    let batch = if o.quick { BATCH_QUICK } else { BATCH };
    let mut rep = Report::new(
        "syncthing",
        &[
            "system",
            "measure",
            "s",
            "listed s",
            "node 0 sent MiB",
            "each run / detail",
        ],
        &[
            "system",
            "measure",
            "run",
            "s",
            "listed_s",
            "node0_sent_bytes",
        ],
    );

    // Syncthing first: if btfs hangs, Syncthing's numbers are printed.
    let st = {
        let lab = Lab::build(&Topology::flat(NODES, MBIT), "");
        let daemons = Daemons::start(&lab);
        daemons.wait_ready();
        let roots = daemons.folders.clone();
        measure("Syncthing", &lab, &roots, runs, batch)
    };

    let btfs = {
        let mut lab = Lab::build(&Topology::flat(NODES, MBIT), "");
        lab.mount_all();
        let roots: Vec<PathBuf> = lab.nodes.iter().map(|n| n.mnt.clone()).collect();
        measure("btfs", &lab, &roots, runs, batch)
    };
    let per_run =
        |m: &Measures| -> Vec<f64> { m.one.iter().map(|t| t.done.as_secs_f64()).collect() };
    let one_label = format!("1 MiB file, complete on the {} others", NODES - 1);
    let batch_label = format!(
        "{batch} files of {} KiB in {DIRS} dirs, complete on the {} others",
        SMALL >> 10,
        NODES - 1
    );
    for (name, m) in [("btfs", &btfs), ("Syncthing", &st)] {
        let each = per_run(m);
        let listed: Vec<f64> = m.one.iter().map(|t| t.listed.as_secs_f64()).collect();
        let sent: Vec<f64> = m.one.iter().map(|t| t.sent as f64).collect();
        rep.row(vec![
            name.into(),
            format!("{one_label} (median)"),
            format!("{:.2}", median(&each)),
            format!("{:.2}", median(&listed)),
            mib(median(&sent) as u64),
            each.iter()
                .map(|t| format!("{t:.2}"))
                .collect::<Vec<_>>()
                .join(", "),
        ]);
        for (i, t) in m.one.iter().enumerate() {
            rep.csv(vec![
                name.into(),
                "one".into(),
                i.to_string(),
                format!("{:.3}", t.done.as_secs_f64()),
                format!("{:.3}", t.listed.as_secs_f64()),
                t.sent.to_string(),
            ]);
        }
    }
    for (name, m) in [("btfs", &btfs), ("Syncthing", &st)] {
        rep.row(vec![
            name.into(),
            batch_label.clone(),
            secs(m.batch.done),
            secs(m.batch.listed),
            mib(m.batch.sent),
            format!("written on node 0 in {} s", secs(m.batch.written)),
        ]);
        rep.csv(vec![
            name.into(),
            format!("batch{batch}"),
            "0".into(),
            format!("{:.3}", m.batch.done.as_secs_f64()),
            format!("{:.3}", m.batch.listed.as_secs_f64()),
            m.batch.sent.to_string(),
        ]);
    }
    let one_ratio = median(&per_run(&st)) / median(&per_run(&btfs));
    let batch_ratio = st.batch.done.as_secs_f64() / btfs.batch.done.as_secs_f64();
    rep.at_least(
        "btfs ahead, 1 MiB file (Syncthing time / btfs time)",
        one_ratio,
        5.0,
    );
    rep.at_least(
        format!("btfs ahead, {batch} files (Syncthing time / btfs time)"),
        batch_ratio,
        1.0,
    );
    rep.note(format!(
        "{NODES} nodes, every link capped at {MBIT} Mbit/s both ways (tc tbf); \
         times from node 0's first write until every other node reads the right bytes (blake3), \
         and until every other node lists every file with its size (a stat: no content fetched); \
         one warm-up file synced before measuring, on both"
    ));
    rep.note(format!(
        "{version}: static addresses, fsWatcherEnabled, fsWatcherDelayS=1; no discovery, relays, NAT, \
         usage or crash reports, upgrades; GUI on 127.0.0.1 in each namespace"
    ));
    rep
}

/// `syncthing --version`, or a panic saying to install it.
fn syncthing_version() -> String {
    match Command::new("syncthing").arg("--version").output() {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" "),
        _ => panic!(
            "the syncthing scenario needs Debian's syncthing (1.19 or later): \
             `apt-get install syncthing` (.ci/run installs it)"
        ),
    }
}

/// Measures one system whose node `i` shares the directory `roots[i]`:
/// the single file `runs` times, then the batch. Node 0 writes.
fn measure(system: &str, lab: &Lab, roots: &[PathBuf], runs: usize, batch: usize) -> Measures {
    let (writer, readers) = (&roots[0], &roots[1..]);
    // What node 0's link sent during one write-and-wait.
    let timed = |files: &[(String, Vec<u8>)], limit| {
        let before = lab.nodes[0].bytes().tx;
        let mut t = write_and_wait(writer, readers, files, limit);
        t.sent = lab.nodes[0].bytes().tx.saturating_sub(before);
        t
    };
    // Warm-up: the first file after start-up pays for connections and
    // whatever else is lazy, on both systems; not what is compared.
    let warm = vec![("warm-up.bin".to_owned(), pattern(7, SMALL))];
    let t = timed(&warm, ONE_LIMIT);
    println!(
        "  {system}: warm-up file everywhere after {} s",
        secs(t.done)
    );
    let mut one = Vec::new();
    for run in 0..runs {
        let files = vec![(format!("one-{run}.bin"), pattern(40 + run as u64, ONE))];
        let t = timed(&files, ONE_LIMIT);
        println!(
            "  {system}: 1 MiB file, run {run}: listed everywhere after {} s, read after {} s; node 0 sent {} MiB",
            secs(t.listed),
            secs(t.done),
            mib(t.sent)
        );
        one.push(t);
    }
    // Directory by directory, as a copy writes them and a walk reads them
    // (the pollers read in this order too).
    let per_dir = batch.div_ceil(DIRS);
    let files: Vec<(String, Vec<u8>)> = (0..batch)
        .map(|k| {
            (
                format!("batch/d{:02}/f{:04}.bin", k / per_dir, k % per_dir),
                pattern(1_000_000 + k as u64, SMALL),
            )
        })
        .collect();
    let t = timed(&files, BATCH_LIMIT);
    println!(
        "  {system}: {batch} small files: written in {} s, listed everywhere after {} s, read after {} s; node 0 sent {} MiB",
        secs(t.written),
        secs(t.listed),
        secs(t.done),
        mib(t.sent)
    );
    Measures { one, batch: t }
}

/// One write-and-wait, from node 0's first write.
#[derive(Debug, Clone, Copy)]
struct Timing {
    /// Node 0 done writing.
    written: Duration,
    /// Every other node lists every file with its full size.
    listed: Duration,
    /// Every other node reads every file's bytes.
    done: Duration,
    /// Bytes node 0's link sent meanwhile.
    sent: u64,
}

/// Writes `files` (relative path, bytes) under `writer` while one thread
/// per reader polls its copy of each.
fn write_and_wait(
    writer: &Path,
    readers: &[PathBuf],
    files: &[(String, Vec<u8>)],
    limit: Duration,
) -> Timing {
    let want: Vec<Want> = files
        .iter()
        .map(|(p, d)| Want {
            rel: p.as_str(),
            len: d.len() as u64,
            hash: blake3::hash(d),
        })
        .collect();
    let t0 = Instant::now();
    std::thread::scope(|s| {
        let pollers: Vec<_> = readers
            .iter()
            .map(|root| {
                let want = &want;
                s.spawn(move || poll_until_all(root, want, t0, limit))
            })
            .collect();
        for (rel, data) in files {
            let p = writer.join(rel);
            if let Some(dir) = p.parent() {
                fs::create_dir_all(dir).expect("a directory on the writer");
            }
            fs::write(&p, data).expect("write on the writer");
        }
        let written = t0.elapsed();
        let (mut listed, mut done) = (Duration::ZERO, Duration::ZERO);
        for h in pollers {
            let (l, d) = h.join().expect("a reader's poller");
            listed = listed.max(l);
            done = done.max(d);
        }
        Timing {
            written,
            listed,
            done,
            sent: 0,
        }
    })
}

/// A file a reader must end with.
#[derive(Debug)]
struct Want<'a> {
    rel: &'a str,
    len: u64,
    hash: blake3::Hash,
}

/// Polls `root` until every file of `want` is listed with its full size
/// and, at once on another thread, until every file reads with its hash (a
/// file is read once it is listed); when all were listed, and when all
/// read right, from `t0`. Panics after `limit` (a hang), saying what is
/// missing.
fn poll_until_all(
    root: &Path,
    want: &[Want<'_>],
    t0: Instant,
    limit: Duration,
) -> (Duration, Duration) {
    let listed = |w: &Want<'_>| fs::metadata(root.join(w.rel)).is_ok_and(|m| m.len() == w.len);
    std::thread::scope(|s| {
        // Listing alone (a stat does not fetch content): the metadata's
        // share of the time.
        let lister = s.spawn(|| {
            let mut pending: Vec<&Want<'_>> = want.iter().collect();
            loop {
                pending.retain(|w| !listed(w));
                if pending.is_empty() || t0.elapsed() > limit {
                    return t0.elapsed();
                }
                std::thread::sleep(POLL);
            }
        });
        let mut pending: Vec<&Want<'_>> = want.iter().collect();
        loop {
            pending.retain(|w| {
                !(listed(w) && fs::read(root.join(w.rel)).is_ok_and(|d| blake3::hash(&d) == w.hash))
            });
            if pending.is_empty() {
                break;
            }
            if t0.elapsed() > limit {
                let unlisted = pending.iter().filter(|w| !listed(w)).count();
                panic!(
                    "{}: {} of {} files without their bytes after {limit:?} ({unlisted} of them not listed), first {}",
                    root.display(),
                    pending.len(),
                    want.len(),
                    pending[0].rel
                );
            }
            std::thread::sleep(POLL);
        }
        let done = t0.elapsed();
        (lister.join().expect("a reader's lister"), done)
    })
}

/// The lab's Syncthing daemons, one per node; killed when dropped (before
/// the lab tears its namespaces down), on a panic too.
struct Daemons {
    kids: Vec<Child>,
    namespaces: Vec<String>,
    /// Each node's shared folder.
    folders: Vec<PathBuf>,
    /// Each node's GUI API key.
    keys: Vec<String>,
    ids: Vec<String>,
    logs: Vec<PathBuf>,
}

impl Drop for Daemons {
    fn drop(&mut self) {
        for c in &mut self.kids {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Whatever else runs in these namespaces (nothing should).
        for ns in &self.namespaces {
            for pid in ns_pids(ns) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        if std::thread::panicking() {
            for (i, log) in self.logs.iter().enumerate() {
                let text = fs::read_to_string(log).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(30).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                eprintln!(
                    "--- last lines of Syncthing's log on node {i} ---\n{}",
                    tail.join("\n")
                );
            }
        }
    }
}

impl Daemons {
    /// Generates each node's keys, writes every config (all four devices,
    /// one folder shared by all), starts a daemon in each namespace.
    fn start(lab: &Lab) -> Daemons {
        let homes: Vec<PathBuf> = (0..lab.nodes.len())
            .map(|i| lab.dir.join(format!("n{i}")).join("syncthing"))
            .collect();
        let mut ids = Vec::new();
        for home in &homes {
            let home_arg = format!("--home={}", home.display());
            crate::net::sh(
                "syncthing",
                &[
                    "generate",
                    &home_arg,
                    "--no-default-folder",
                    "--skip-port-probing",
                ],
            );
            let id = crate::net::sh("syncthing", &["serve", "--device-id", &home_arg]);
            ids.push(id.trim().to_owned());
        }
        let folders: Vec<PathBuf> = (0..lab.nodes.len())
            .map(|i| lab.dir.join(format!("n{i}")).join("shared"))
            .collect();
        let keys: Vec<String> = (0..lab.nodes.len())
            .map(|i| format!("btfs-lab-syncthing-{i}"))
            .collect();
        for (i, node) in lab.nodes.iter().enumerate() {
            // The folder and its marker exist before start: Syncthing
            // refuses a folder without its marker.
            fs::create_dir_all(folders[i].join(".stfolder")).expect("the shared folder");
            let devices: String = lab
                .nodes
                .iter()
                .zip(&ids)
                .map(|(n, id)| {
                    device_xml(id, &n.i.to_string(), &format!("tcp://{}:{ST_PORT}", n.addr))
                })
                .collect();
            let folder_devices: String = ids
                .iter()
                .map(|id| format!("            <device id=\"{id}\" introducedBy=\"\"></device>\n"))
                .collect();
            let config = config_xml(&folders[i], &folder_devices, &devices, &node.addr, &keys[i]);
            fs::write(homes[i].join("config.xml"), config).expect("syncthing config");
        }
        let mut d = Daemons {
            kids: Vec::new(),
            namespaces: lab.nodes.iter().map(|n| n.ns.clone()).collect(),
            folders,
            keys,
            ids,
            logs: Vec::new(),
        };
        for (i, node) in lab.nodes.iter().enumerate() {
            let log_path = lab.dir.join(format!("n{i}")).join("syncthing.log");
            let log = fs::File::create(&log_path).expect("syncthing log");
            let err = log.try_clone().expect("syncthing log");
            d.logs.push(log_path);
            let kid = in_ns(&node.ns, "syncthing")
                .arg("serve")
                .arg(format!("--home={}", homes[i].display()))
                .args(["--no-browser", "--no-restart", "--no-upgrade"])
                .env("HOME", &homes[i])
                .env("STNOUPGRADE", "1")
                .stdin(Stdio::null())
                .stdout(log)
                .stderr(err)
                .spawn()
                .expect("start syncthing");
            d.kids.push(kid);
        }
        d
    }

    /// `GET /rest/PATH` of node `i`'s daemon, from inside its namespace.
    fn rest(&self, i: usize, path: &str) -> serde_json::Value {
        let out = in_ns(&self.namespaces[i], "curl")
            .args(["-s", "--max-time", "2", "-H"])
            .arg(format!("X-API-Key: {}", self.keys[i]))
            .arg(format!("http://127.0.0.1:{GUI_PORT}/rest/{path}"))
            .output();
        match out {
            Ok(o) if o.status.success() => {
                serde_json::from_slice(&o.stdout).unwrap_or(serde_json::Value::Null)
            }
            _ => serde_json::Value::Null,
        }
    }

    /// Waits until every daemon is connected to every other and its folder
    /// is idle (scanned, nothing to pull).
    fn wait_ready(&self) {
        let start = Instant::now();
        loop {
            let states: Vec<(usize, String)> = (0..self.ids.len())
                .map(|i| {
                    let conns = self.rest(i, "system/connections");
                    let connected = self
                        .ids
                        .iter()
                        .enumerate()
                        .filter(|(j, id)| {
                            *j != i && conns["connections"][id.as_str()]["connected"] == true
                        })
                        .count();
                    let status = self.rest(i, &format!("db/status?folder={FOLDER}"));
                    (
                        connected,
                        status["state"].as_str().unwrap_or("?").to_owned(),
                    )
                })
                .collect();
            let want = self.ids.len() - 1;
            if states.iter().all(|(c, s)| *c == want && s == "idle") {
                println!(
                    "  Syncthing: {} daemons connected and idle after {} s",
                    self.ids.len(),
                    secs(start.elapsed())
                );
                return;
            }
            assert!(
                start.elapsed() < ST_READY_LIMIT,
                "Syncthing daemons not connected and idle after {ST_READY_LIMIT:?}: \
                 (peers connected, folder state) per node: {states:?}"
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

/// One `<device>` of the configuration: a lab node at its static address.
fn device_xml(id: &str, name: &str, addr: &str) -> String {
    format!(
        r#"    <device id="{id}" name="node{name}" compression="metadata" introducer="false" skipIntroductionRemovals="false" introducedBy="">
        <address>{addr}</address>
        <paused>false</paused>
        <autoAcceptFolders>false</autoAcceptFolders>
        <maxSendKbps>0</maxSendKbps>
        <maxRecvKbps>0</maxRecvKbps>
        <maxRequestKiB>0</maxRequestKiB>
        <untrusted>false</untrusted>
        <remoteGUIPort>0</remoteGUIPort>
    </device>
"#
    )
}

/// A node's whole configuration (Syncthing 1.19's, config version 36):
/// Syncthing's defaults but for the folder's watcher delay, the static
/// addresses, and every option that would reach outside the lab (global
/// and local discovery, relays, NAT and STUN, usage and crash reports,
/// upgrades) turned off. `setLowPriority` is off too: on a shared machine
/// a niced Syncthing would be measured against an un-niced btfs.
fn config_xml(folder: &Path, folder_devices: &str, devices: &str, addr: &str, key: &str) -> String {
    let folder = folder.display();
    format!(
        r#"<configuration version="36">
    <folder id="{FOLDER}" label="{FOLDER}" path="{folder}" type="sendreceive" rescanIntervalS="3600" fsWatcherEnabled="true" fsWatcherDelayS="1" ignorePerms="false" autoNormalize="true">
        <filesystemType>basic</filesystemType>
{folder_devices}        <minDiskFree unit="%">1</minDiskFree>
        <versioning>
            <cleanupIntervalS>3600</cleanupIntervalS>
            <fsPath></fsPath>
            <fsType>basic</fsType>
        </versioning>
        <copiers>0</copiers>
        <pullerMaxPendingKiB>0</pullerMaxPendingKiB>
        <hashers>0</hashers>
        <order>random</order>
        <ignoreDelete>false</ignoreDelete>
        <scanProgressIntervalS>0</scanProgressIntervalS>
        <pullerPauseS>0</pullerPauseS>
        <maxConflicts>10</maxConflicts>
        <disableSparseFiles>false</disableSparseFiles>
        <disableTempIndexes>false</disableTempIndexes>
        <paused>false</paused>
        <weakHashThresholdPct>25</weakHashThresholdPct>
        <markerName>.stfolder</markerName>
        <copyOwnershipFromParent>false</copyOwnershipFromParent>
        <modTimeWindowS>0</modTimeWindowS>
        <maxConcurrentWrites>2</maxConcurrentWrites>
        <disableFsync>false</disableFsync>
        <blockPullOrder>standard</blockPullOrder>
        <copyRangeMethod>standard</copyRangeMethod>
        <caseSensitiveFS>false</caseSensitiveFS>
        <junctionsAsDirs>false</junctionsAsDirs>
    </folder>
{devices}    <gui enabled="true" tls="false" debugging="false">
        <address>127.0.0.1:{GUI_PORT}</address>
        <apikey>{key}</apikey>
        <theme>default</theme>
    </gui>
    <ldap></ldap>
    <options>
        <listenAddress>tcp://{addr}:{ST_PORT}</listenAddress>
        <globalAnnounceServer>default</globalAnnounceServer>
        <globalAnnounceEnabled>false</globalAnnounceEnabled>
        <localAnnounceEnabled>false</localAnnounceEnabled>
        <localAnnouncePort>21027</localAnnouncePort>
        <localAnnounceMCAddr>[ff12::8384]:21027</localAnnounceMCAddr>
        <maxSendKbps>0</maxSendKbps>
        <maxRecvKbps>0</maxRecvKbps>
        <reconnectionIntervalS>60</reconnectionIntervalS>
        <relaysEnabled>false</relaysEnabled>
        <relayReconnectIntervalM>10</relayReconnectIntervalM>
        <startBrowser>false</startBrowser>
        <natEnabled>false</natEnabled>
        <natLeaseMinutes>60</natLeaseMinutes>
        <natRenewalMinutes>30</natRenewalMinutes>
        <natTimeoutSeconds>10</natTimeoutSeconds>
        <urAccepted>-1</urAccepted>
        <urSeen>3</urSeen>
        <urUniqueID></urUniqueID>
        <urURL>https://data.syncthing.net/newdata</urURL>
        <urPostInsecurely>false</urPostInsecurely>
        <urInitialDelayS>1800</urInitialDelayS>
        <restartOnWakeup>false</restartOnWakeup>
        <autoUpgradeIntervalH>0</autoUpgradeIntervalH>
        <upgradeToPreReleases>false</upgradeToPreReleases>
        <keepTemporariesH>24</keepTemporariesH>
        <cacheIgnoredFiles>false</cacheIgnoredFiles>
        <progressUpdateIntervalS>5</progressUpdateIntervalS>
        <limitBandwidthInLan>false</limitBandwidthInLan>
        <minHomeDiskFree unit="%">1</minHomeDiskFree>
        <releasesURL>https://upgrades.syncthing.net/meta.json</releasesURL>
        <overwriteRemoteDeviceNamesOnConnect>false</overwriteRemoteDeviceNamesOnConnect>
        <tempIndexMinBlocks>10</tempIndexMinBlocks>
        <trafficClass>0</trafficClass>
        <setLowPriority>false</setLowPriority>
        <maxFolderConcurrency>0</maxFolderConcurrency>
        <crashReportingURL>https://crash.syncthing.net/newcrash</crashReportingURL>
        <crashReportingEnabled>false</crashReportingEnabled>
        <stunKeepaliveStartS>0</stunKeepaliveStartS>
        <stunKeepaliveMinS>0</stunKeepaliveMinS>
        <stunServer>default</stunServer>
        <databaseTuning>auto</databaseTuning>
        <maxConcurrentIncomingRequestKiB>0</maxConcurrentIncomingRequestKiB>
        <announceLANAddresses>false</announceLANAddresses>
        <sendFullIndexOnUpgrade>false</sendFullIndexOnUpgrade>
        <connectionLimitEnough>0</connectionLimitEnough>
        <connectionLimitMax>0</connectionLimitMax>
        <insecureAllowOldTLSVersions>false</insecureAllowOldTLSVersions>
    </options>
</configuration>
"#
    )
}
