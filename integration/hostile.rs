//! A member gone bad. It holds the cluster key and a member identity, runs
//! the mesh protocol from a namespace of its own, and sends what each test
//! gives it: by gossip, in its answers to anti-entropy and to metainfo
//! requests, and as requests of its own. Throughout, the node it attacks
//! must stay up and responsive (a `stat` of an unrelated file answers
//! within 100 ms), refuse or bound the input with a log line and a
//! `btfs status` counter, and lose no honest record or content.
//!
//! Each attack also carries a control, an honest record from the same
//! member, which must arrive: it proves that the attack was delivered.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, atomic::AtomicBool},
};

use btfs_core::{ContentId, FileRecord, InfoHash, NodeId, Owner, RelPath, Timestamp};
use btfs_sync::{SignedRecord, antientropy::SyncResponse};
use libp2p_identity::Keypair;

use super::*;

const CLUSTER: &str = "cluster";
/// How long a `stat` of an unrelated file may take while under attack.
const RESPONSIVE: Duration = Duration::from_millis(100);
/// `Rpc` variants, as postcard numbers them (src/mesh.rs).
const RPC_SYNC: u8 = 0;
const RPC_METAINFO: u8 = 1;

/// The member gone bad: its identity.
struct Hostile {
    keypair: Keypair,
    node: NodeId,
}

impl Hostile {
    fn new() -> Self {
        let keypair = Keypair::generate_ed25519();
        let node = btfs_sync::wire::node_id(&keypair).unwrap();
        Self { keypair, node }
    }

    fn peer_id(&self) -> String {
        self.keypair.public().to_peer_id().to_string()
    }

    /// A well-formed file record authored by this member.
    fn file(&self, size: u64) -> FileRecord {
        let owner = Owner {
            mode: 0o644,
            uid: 0,
            gid: 0,
        };
        let mut r = FileRecord::new_file(owner, self.node, Timestamp::now());
        r.content = Some(ContentId::of(&size.to_le_bytes()));
        r.size = size;
        r
    }

    /// Signs `record` at `path` with none of [`SignedRecord::sign`]'s
    /// checks, as a member running other code can.
    fn sign(&self, path: &str, record: FileRecord) -> SignedRecord {
        let path = RelPath::parse(path).unwrap();
        let bytes = btfs_sync::wire::signed_bytes(CLUSTER, &path, &record).unwrap();
        SignedRecord {
            signature: self.keypair.sign(&bytes).unwrap(),
            path,
            record,
        }
    }
}

/// What the hostile member sends.
#[derive(Default)]
struct Attack {
    /// Records it gossips, each in a batch of its own, every 300 ms.
    gossip: Vec<SignedRecord>,
    /// Gossip messages it sends as they are, every 300 ms.
    gossip_batches: Vec<Vec<u8>>,
    /// Its answer to every anti-entropy request: these records.
    sync: Vec<SignedRecord>,
    /// Its answers to metainfo requests, by info hash.
    metainfo: HashMap<InfoHash, Vec<u8>>,
    /// Metainfo requests it sends for each info hash it hears of, at once.
    flood_metainfo: usize,
    /// Direct peer wires it opens to the target's BitTorrent port.
    wires: Wires,
}

/// Peer wires the hostile member opens, each held open until the attack
/// stops (or the target closes it).
#[derive(Default)]
struct Wires {
    /// For each info hash it hears of: wires whose BitTorrent handshake
    /// names it, then not a byte more.
    per_info_hash: usize,
    /// Wires that finish the noise handshake, then send nothing at all.
    silent: usize,
    /// How long the target took to close each silent wire.
    closed_after: Arc<Mutex<Vec<Duration>>>,
}

/// What the attacker needs to open direct wires to the target.
#[derive(Clone)]
struct WireKit {
    keypair: Keypair,
    prologue: Vec<u8>,
    addr: std::net::SocketAddr,
    target: libp2p_identity::PeerId,
}

impl WireKit {
    /// A secured wire to the target, or `None` if it refuses.
    async fn open(&self) -> Option<btfs_mesh::wire::Wire<tokio::net::TcpStream>> {
        let tcp = tokio::net::TcpStream::connect(self.addr).await.ok()?;
        btfs_mesh::wire::connect(&self.keypair, &self.prologue, tcp, self.target)
            .await
            .ok()
    }

    /// Opens a wire that names `ih` (if any) and then stays quiet, until
    /// the target closes it or `stop`; returns how long it stayed open.
    async fn hold(self, ih: Option<InfoHash>, stop: Arc<AtomicBool>) -> Option<Duration> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // The target admits a wire once it counts this member as connected,
        // which may be a moment after this side saw the connection.
        let mut w = None;
        for _ in 0..50 {
            w = self.open().await;
            if w.is_some() || stop.load(Ordering::SeqCst) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let mut w = w?;
        let opened = Instant::now();
        if let Some(ih) = ih {
            let mut hs = vec![19u8];
            hs.extend_from_slice(b"BitTorrent protocol");
            hs.extend_from_slice(&[0; 8]);
            hs.extend_from_slice(&ih.0);
            hs.extend_from_slice(b"-XX0001-hostilepeer!");
            w.write_all(&hs).await.ok()?;
            w.flush().await.ok()?;
        }
        let mut buf = vec![0u8; 1 << 16];
        while !stop.load(Ordering::SeqCst) {
            let read = tokio::time::timeout(Duration::from_millis(200), w.read(&mut buf)).await;
            if let Ok(Ok(0) | Err(_)) = read {
                return Some(opened.elapsed());
            }
        }
        None
    }
}

/// A node under attack, with what it runs on. Fields drop in order: the
/// node before its namespaces.
struct Scene {
    target: NsNode,
    /// The attacker's namespace.
    attacker_ns: String,
    _net: Net,
    _keys: tempfile::TempDir,
    stop: Arc<AtomicBool>,
    attacker: Option<std::thread::JoinHandle<()>>,
    watcher: Option<std::thread::JoinHandle<Duration>>,
}

impl Scene {
    /// Starts a node (with `extra` mount options, given the attacker's peer
    /// id) holding one honest file, and `attack` against it from `hostile`.
    fn start(hostile: &Hostile, attack: Attack, extra: impl FnOnce(&str) -> String) -> Self {
        let keys = tempfile::tempdir().unwrap();
        let key = keygen(keys.path(), "cluster.key");
        let mut net = Net::new();
        let target = net
            .start_nodes(1, &key, &format!(",mdns=off{}", extra(&hostile.peer_id())))
            .pop()
            .unwrap();
        std::fs::write(target.mnt.join("honest.txt"), b"honest bytes").unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let watcher = {
            let (path, stop) = (target.mnt.join("honest.txt"), stop.clone());
            std::thread::spawn(move || slowest_stat(&path, &stop))
        };
        let (ns, addr) = net.add();
        let psk: libp2p_pnet::PreSharedKey =
            std::fs::read_to_string(&key).unwrap().parse().unwrap();
        let dial = format!("/ip4/{}/tcp/{PORT}", target.addr);
        let keypair = hostile.keypair.clone();
        let attacker = {
            let stop = stop.clone();
            in_namespace(&ns.clone(), move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(run_attack(keypair, psk, addr, dial, attack, stop));
            })
        };
        Self {
            target,
            attacker_ns: ns,
            _net: net,
            _keys: keys,
            stop,
            attacker: Some(attacker),
            watcher: Some(watcher),
        }
    }

    /// Waits until `what` holds of the target (30 s at most).
    fn until(&self, what: &str, mut check: impl FnMut(&NsNode) -> bool) {
        eventually(Duration::from_secs(30), what, || check(&self.target));
    }

    /// Stops the attack; checks that the node answered a `stat` of an
    /// unrelated file within [`RESPONSIVE`] throughout, and that its honest
    /// file is intact.
    fn finish(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(a) = self.attacker.take() {
            a.join().unwrap();
        }
        let slowest = self.watcher.take().unwrap().join().unwrap();
        assert!(
            slowest < RESPONSIVE,
            "a stat of an unrelated file took {slowest:?} under attack"
        );
        assert_eq!(
            std::fs::read(self.target.mnt.join("honest.txt")).unwrap(),
            b"honest bytes"
        );
        assert!(self.target.status()["pid"].as_u64().is_some());
    }
}

impl Drop for Scene {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Stats `path` until `stop`; returns the slowest answer. A slow one is
/// asked again at once, twice: only three slow answers in a row count (a
/// single one can be this 2-core machine's scheduler, not the node).
fn slowest_stat(path: &Path, stop: &AtomicBool) -> Duration {
    let mut slowest = Duration::ZERO;
    while !stop.load(Ordering::SeqCst) {
        let mut best = Duration::MAX;
        for _ in 0..3 {
            let t = Instant::now();
            std::fs::metadata(path).unwrap();
            best = best.min(t.elapsed());
            if best < RESPONSIVE {
                break;
            }
        }
        slowest = slowest.max(best);
        std::thread::sleep(Duration::from_millis(10));
    }
    slowest
}

/// The hostile member's loop: joins the mesh, then sends `attack` until
/// `stop`.
async fn run_attack(
    keypair: Keypair,
    psk: libp2p_pnet::PreSharedKey,
    addr: String,
    dial: String,
    attack: Attack,
    stop: Arc<AtomicBool>,
) {
    let cfg = btfs_mesh::MeshConfig {
        cluster: CLUSTER.into(),
        keypair,
        psk,
        listen: vec![format!("/ip4/{addr}/tcp/{PORT}").parse().unwrap()],
        bootstrap: vec![dial.parse().unwrap()],
        mdns: false,
        members: None,
        validate: Arc::new(|_, _, _| true),
    };
    let prologue = btfs_mesh::wire::prologue(CLUSTER, &cfg.psk.to_string());
    let (keypair, target_ip) = (
        cfg.keypair.clone(),
        dial.split('/').nth(2).unwrap().to_owned(),
    );
    let (mesh, mut events, _task) = btfs_mesh::start(cfg).unwrap();
    let mut kit: Option<WireKit> = None;
    let batches: Vec<Vec<u8>> = attack
        .gossip
        .iter()
        .map(|r| SignedRecord::encode_batch(&[postcard::to_allocvec(r).unwrap()]).unwrap())
        .collect();
    let batches = [batches, attack.gossip_batches.clone()].concat();
    let page = postcard::to_allocvec(&SyncResponse {
        index: 1,
        from: 0,
        upto: attack.sync.len() as u64,
        max: attack.sync.len() as u64,
        records: attack.sync.clone(),
    })
    .unwrap();
    let flooded = Arc::new(Mutex::new(std::collections::HashSet::new()));
    let mut tick = tokio::time::interval(Duration::from_millis(300));
    while !stop.load(Ordering::SeqCst) {
        tokio::select! {
            ev = events.recv() => match ev {
                Some(btfs_mesh::MeshEvent::Request { data, responder, .. }) => {
                    let answer = match data.first() {
                        Some(&RPC_SYNC) => page.clone(),
                        Some(&RPC_METAINFO) if data.len() == 21 => {
                            let ih = InfoHash(data[1..].try_into().unwrap());
                            attack.metainfo.get(&ih).cloned().unwrap_or_default()
                        }
                        _ => postcard::to_allocvec(&None::<std::net::SocketAddr>).unwrap(),
                    };
                    let _ = responder.respond(answer).await;
                }
                Some(btfs_mesh::MeshEvent::PeerUp(peer, _)) => {
                    let k = WireKit {
                        keypair: keypair.clone(),
                        prologue: prologue.clone(),
                        addr: format!("{target_ip}:{}", PORT + 1).parse().unwrap(),
                        target: peer,
                    };
                    for _ in 0..attack.wires.silent {
                        let (k, stop, closed) = (k.clone(), stop.clone(), attack.wires.closed_after.clone());
                        tokio::spawn(async move {
                            if let Some(d) = k.hold(None, stop).await {
                                closed.lock().unwrap().push(d);
                            }
                        });
                    }
                    kit = Some(k);
                }
                Some(btfs_mesh::MeshEvent::Gossip { source, data, .. }) => {
                    let Ok(batch) = SignedRecord::decode_batch(&data) else { continue };
                    for r in batch {
                        let Some(ih) = r.record.torrent else { continue };
                        if !flooded.lock().unwrap().insert(ih) {
                            continue;
                        }
                        if let Some(k) = &kit {
                            for _ in 0..attack.wires.per_info_hash {
                                tokio::spawn(k.clone().hold(Some(ih), stop.clone()));
                            }
                        }
                        let mut req = vec![RPC_METAINFO];
                        req.extend_from_slice(&ih.0);
                        for _ in 0..attack.flood_metainfo {
                            let (mesh, req) = (mesh.clone(), req.clone());
                            tokio::spawn(async move {
                                let _ = mesh.request(source, req).await;
                            });
                        }
                    }
                }
                Some(_) => {}
                None => return,
            },
            _ = tick.tick() => {
                for b in &batches {
                    let _ = mesh.publish(b.clone()).await;
                }
            }
        }
    }
}

/// Records refused so far by the target.
fn refused(n: &NsNode) -> u64 {
    n.counter("records_refused")
}

/// The forged records of a test, and the control that must arrive: sent
/// by gossip and by anti-entropy both; then the forged paths must be
/// absent, the refusals counted and logged with `why`.
fn refuse_records(hostile: &Hostile, forged: Vec<SignedRecord>, extra: &str, why: &str) {
    let control = hostile.sign("control.txt", hostile.file(1));
    let synced_control = hostile.sign("synced-control.txt", hostile.file(2));
    let mut gossip = forged.clone();
    gossip.push(control);
    let mut sync = forged.clone();
    sync.push(synced_control);
    let extra = extra.to_owned();
    let mut scene = Scene::start(
        hostile,
        Attack {
            gossip,
            sync,
            ..Attack::default()
        },
        |peer| extra.replace("{hostile}", peer),
    );
    scene.until("the controls, by gossip and by sync", |t| {
        t.mnt.join("control.txt").exists() && t.mnt.join("synced-control.txt").exists()
    });
    // Gossip is refused a message at a time, anti-entropy a record at a time.
    scene.until("every forged record refused both ways", |t| {
        refused(t) > forged.len() as u64
    });
    scene.finish();
    let target = &scene.target;
    for r in &forged {
        assert!(
            !target.mnt.join(r.path.as_str()).exists(),
            "{} must not be written",
            r.path
        );
    }
    let log = target.log();
    assert!(log.contains("refused gossip"), "{log}");
    assert!(log.contains("refused a synced record"), "{log}");
    assert!(log.contains(why), "no {why:?} in the log:\n{log}");
}

#[test]
fn hostile_timestamps_out_of_range_are_refused() {
    let h = Hostile::new();
    let mut nanos = h.file(10);
    nanos.mtime.nanos = 1_000_000_000;
    let mut far = h.file(10);
    far.mtime.secs = i64::MAX - 1;
    let mut before = h.file(10);
    before.ctime.secs = i64::MIN;
    refuse_records(
        &h,
        vec![
            h.sign("nanos.txt", nanos),
            h.sign("far-future.txt", far),
            h.sign("far-past.txt", before),
        ],
        "",
        "is out of range",
    );
}

#[test]
fn hostile_inflated_version_counters_are_refused() {
    let h = Hostile::new();
    let honest = NodeId([7; 32]);
    let mut max = h.file(10);
    max.version.increment_past(h.node, u64::MAX - 1);
    let mut other = h.file(10);
    other.version.increment_past(honest, btfs_core::MAX_COUNTER);
    refuse_records(
        &h,
        vec![h.sign("pinned.txt", max), h.sign("inflated.txt", other)],
        "",
        "a version counter exceeds the largest allowed",
    );
}

#[test]
fn hostile_oversized_version_vectors_are_refused() {
    let h = Hostile::new();
    let mut wide = h.file(10);
    for i in 0..=btfs_core::MAX_VERSION_ENTRIES {
        let mut id = [0u8; 32];
        id[..8].copy_from_slice(&(i as u64).to_le_bytes());
        wide.version.increment(NodeId(id));
    }
    refuse_records(
        &h,
        vec![h.sign("wide.txt", wide)],
        "",
        "the version vector has too many entries",
    );
}

#[test]
fn hostile_invented_node_ids_are_refused_when_members_are_set() {
    let h = Hostile::new();
    let mut invented = h.file(10);
    invented.version.increment(NodeId([9; 32]));
    // The members file names the hostile member: it is one.
    let dir = tempfile::tempdir().unwrap();
    let members = dir.path().join("members");
    std::fs::write(&members, format!("{}\n", h.peer_id())).unwrap();
    let extra = format!(",members={}", members.display());
    refuse_records(
        &h,
        vec![h.sign("invented.txt", invented)],
        &extra,
        "not a member of the cluster",
    );
}

#[test]
fn hostile_records_over_the_size_limit_are_refused() {
    let h = Hostile::new();
    let owner = Owner {
        mode: 0o777,
        uid: 0,
        gid: 0,
    };
    let huge = FileRecord::new_symlink(
        "x".repeat(btfs_sync::MAX_RECORD + 1),
        owner,
        h.node,
        Timestamp::now(),
    );
    // Gossip refuses the message (the mesh's own size limit may drop it
    // before the validator); anti-entropy refuses the page that holds it.
    let mut scene = Scene::start(
        &h,
        Attack {
            gossip: vec![
                h.sign("huge-link", huge.clone()),
                h.sign("control.txt", h.file(1)),
            ],
            sync: vec![h.sign("huge-link", huge)],
            ..Attack::default()
        },
        |_| String::new(),
    );
    scene.until("the control", |t| t.mnt.join("control.txt").exists());
    scene.until("the oversized record refused", |t| refused(t) >= 1);
    scene.finish();
    let target = &scene.target;
    assert!(std::fs::symlink_metadata(target.mnt.join("huge-link")).is_err());
    let log = target.log();
    assert!(log.contains("refused a sync response"), "{log}");
}

/// A change made to a good torrent.
type Change = Box<dyn FnOnce(&mut librqbit::TorrentMetaV1Owned)>;

/// A torrent built over real bytes, then changed by `change` and encoded
/// again: its bytes and the info hash of the changed info dictionary.
fn forged_torrent(
    content: &ContentId,
    data: &[u8],
    change: impl FnOnce(&mut librqbit::TorrentMetaV1Owned),
) -> (Vec<u8>, InfoHash) {
    use librqbit::CloneToOwned;
    use librqbit_sha1_wrapper::ISha1;
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), data).unwrap();
    let m =
        btfs_torrent::meta::Metainfo::build(content, file.path(), data.len() as u64, 1).unwrap();
    let mut t = librqbit::torrent_from_bytes(&m.bytes)
        .unwrap()
        .clone_to_owned(None);
    change(&mut t);
    let mut raw = Vec::new();
    librqbit_bencode::bencode_serialize_to_writer(&t.info.data, &mut raw).unwrap();
    let mut h = librqbit_sha1_wrapper::Sha1::new();
    h.update(&raw);
    let mut bytes = Vec::new();
    librqbit_bencode::bencode_serialize_to_writer(&t, &mut bytes).unwrap();
    (bytes, InfoHash(h.finish()))
}

#[test]
fn hostile_torrents_with_bad_piece_length_count_or_size_are_refused() {
    let h = Hostile::new();
    let data = common::pattern(3, 600 << 10);
    let content = ContentId::of(&data);
    let big = 1u64 << 40;
    let cases: Vec<(&str, u64, Change)> = vec![
        // One-byte pieces of a 1 TiB file: a 2^40-entry bitfield.
        (
            "piece-length-one.bin",
            big,
            Box::new(move |t| {
                t.info.data.piece_length = 1;
                t.info.data.length = Some(big);
            }),
        ),
        (
            "piece-length-zero.bin",
            600 << 10,
            Box::new(|t| t.info.data.piece_length = 0),
        ),
        (
            "piece-count.bin",
            600 << 10,
            Box::new(|t| {
                let p = t.info.data.pieces.as_ref()[..20].to_vec();
                t.info.data.pieces = p.into();
            }),
        ),
        // The torrent is of other bytes than the record says.
        ("size.bin", 123, Box::new(|_| {})),
    ];
    let mut attack = Attack::default();
    let mut names = Vec::new();
    for (name, size, change) in cases {
        let (bytes, ih) = forged_torrent(&content, &data, change);
        let mut r = h.file(size);
        r.content = Some(content);
        r.torrent = Some(ih);
        attack.gossip.push(h.sign(name, r));
        attack.metainfo.insert(ih, bytes);
        names.push(name);
    }
    attack.gossip.push(h.sign("control.txt", h.file(1)));
    let mut scene = Scene::start(&h, attack, |_| String::new());
    scene.until("the records listed", |t| {
        names.iter().all(|n| t.mnt.join(n).exists())
    });
    for n in &names {
        let path = scene.target.mnt.join(n);
        let t = Instant::now();
        let mut buf = vec![0u8; 4096];
        let err = std::fs::File::open(&path)
            .and_then(|mut f| std::io::Read::read(&mut f, &mut buf))
            .expect_err(n);
        assert_eq!(err.raw_os_error(), Some(libc::EIO), "{n}: {err}");
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{n}: {:?}",
            t.elapsed()
        );
    }
    scene.until("every forged torrent refused", |t| {
        t.counter("metainfo_refused") >= names.len() as u64
    });
    scene.finish();
    let target = &scene.target;
    let log = target.log();
    assert!(log.contains("refused a member's metainfo"), "{log}");
}

#[test]
fn a_flood_of_metainfo_requests_is_bounded() {
    let h = Hostile::new();
    let mut scene = Scene::start(
        &h,
        Attack {
            gossip: vec![h.sign("control.txt", h.file(1))],
            flood_metainfo: 400,
            ..Attack::default()
        },
        |_| String::new(),
    );
    scene.until("the control", |t| t.mnt.join("control.txt").exists());
    // Files whose records reach the attacker, which asks for their
    // torrents 400 times each, all at once.
    for i in 0..24u64 {
        std::fs::write(
            scene.target.mnt.join(format!("f{i}")),
            common::pattern(i, 300 << 10),
        )
        .unwrap();
    }
    scene.until("warm requests bounded", |t| t.counter("warm_refused") > 0);
    scene.finish();
    let target = &scene.target;
    for i in 0..24u64 {
        assert!(
            std::fs::read(target.mnt.join(format!("f{i}"))).unwrap()
                == common::pattern(i, 300 << 10)
        );
    }
    let log = target.log();
    assert!(
        log.contains("being brought up for members' requests already"),
        "{log}"
    );
}

#[test]
fn hostile_handshakes_naming_many_info_hashes_are_bounded() {
    let h = Hostile::new();
    let mut scene = Scene::start(
        &h,
        Attack {
            gossip: vec![h.sign("control.txt", h.file(1))],
            wires: Wires {
                // First, more wires at once than a member's share (64):
                // each holds its slot until it is closed for saying nothing.
                silent: 80,
                // Then, once those are gone, 3 wires naming each torrent it
                // hears of, held open: 8 torrents, with max_torrents=4.
                per_info_hash: 3,
                ..Wires::default()
            },
            ..Attack::default()
        },
        |_| ",max_torrents=4".into(),
    );
    scene.until("the control", |t| t.mnt.join("control.txt").exists());
    scene.until("wires past the member's share refused", |t| {
        t.counter("member_conns_refused") > 0
    });
    scene.until("the silent wires closed", |t| {
        t.counter("bridges_idle_closed") >= 64
    });
    // Files whose records reach the attacker, which then names each one's
    // torrent in wires it holds open: more torrents than may be live.
    for i in 0..8u64 {
        std::fs::write(
            scene.target.mnt.join(format!("f{i}")),
            common::pattern(i, 300 << 10),
        )
        .unwrap();
    }
    let mut most_live = 0;
    scene.until("torrents past max_torrents refused", |t| {
        let s = t.status();
        most_live = most_live.max(s["live_torrents"].as_u64().unwrap());
        s["live_refused"].as_u64().unwrap() + s["member_bring_ups_refused"].as_u64().unwrap() > 0
    });
    assert!(
        most_live <= 4,
        "{most_live} torrents live with max_torrents=4"
    );
    // A local read still gets its torrent.
    std::fs::write(scene.target.mnt.join("local"), b"local bytes").unwrap();
    assert_eq!(
        std::fs::read(scene.target.mnt.join("f0")).unwrap(),
        common::pattern(0, 300 << 10)
    );
    scene.finish();
}

#[test]
fn hostile_idle_connections_are_closed() {
    let h = Hostile::new();
    let closed = Arc::new(Mutex::new(Vec::new()));
    let mut scene = Scene::start(
        &h,
        Attack {
            gossip: vec![h.sign("control.txt", h.file(1))],
            wires: Wires {
                silent: 8,
                closed_after: closed.clone(),
                ..Wires::default()
            },
            ..Attack::default()
        },
        |_| String::new(),
    );
    scene.until("the control", |t| t.mnt.join("control.txt").exists());
    // Plain TCP connections that never speak, next to the silent wires.
    let addr = format!("{}:{}", scene.target.addr, PORT + 1);
    let raw: Vec<_> = (0..8)
        .map(|_| {
            let ns = scene.attacker_ns.clone();
            let addr = addr.clone();
            in_namespace(&ns, move || {
                let t = Instant::now();
                let mut c = std::net::TcpStream::connect(&addr).unwrap();
                c.set_read_timeout(Some(Duration::from_secs(40))).unwrap();
                let n = std::io::Read::read(&mut c, &mut [0u8; 16]).unwrap_or(0);
                (n, t.elapsed())
            })
        })
        .collect();
    scene.until("the silent wires closed", |_| {
        closed.lock().unwrap().len() == 8
    });
    for d in closed.lock().unwrap().iter() {
        assert!(
            *d < Duration::from_secs(25),
            "a silent wire stayed open {d:?}"
        );
    }
    for r in raw {
        let (n, d) = r.join().unwrap();
        assert_eq!(n, 0, "the target sent bytes to a silent connection");
        assert!(
            d < Duration::from_secs(25),
            "a silent connection stayed open {d:?}"
        );
    }
    scene.until("the closes counted", |t| {
        t.counter("bridges_idle_closed") >= 16
    });
    scene.finish();
}

/// Records signed and then changed, claiming another member as author,
/// naming a path outside the tree, or sharing a gossip message with a
/// forgery: none is stored, the honest ones around them are.
#[test]
fn forged_records_from_a_peer_holding_the_key_are_refused() {
    let h = Hostile::new();
    let other = Hostile::new();
    let passwd_before = std::fs::read("/etc/passwd").unwrap();
    // Signed, then changed.
    let mut tampered = h.sign("tampered.txt", h.file(1));
    tampered.record.size = 4096;
    // Claims another member as its author.
    let mut stolen = h.sign("stolen.txt", h.file(1));
    stolen.record.author = other.node;
    stolen.record.version.increment(other.node);
    // A path that escapes the tree: the encoding of a record whose path
    // field says `../etc/passwd` (a RelPath cannot hold it).
    #[derive(serde::Serialize)]
    struct Raw {
        path: String,
        record: FileRecord,
        #[serde(with = "serde_bytes")]
        signature: Vec<u8>,
    }
    let traversal = postcard::to_allocvec(&Raw {
        path: "../etc/passwd".into(),
        record: h.file(1),
        signature: h.sign("x", h.file(1)).signature,
    })
    .unwrap();
    let enc = |r: &SignedRecord| postcard::to_allocvec(r).unwrap();
    let batch = |rs: &[Vec<u8>]| SignedRecord::encode_batch(rs).unwrap();
    let mut scene = Scene::start(
        &h,
        Attack {
            // The control: an honest record from this member.
            gossip: vec![h.sign("from-test-peer.txt", h.file(1))],
            gossip_batches: vec![
                batch(&[enc(&tampered)]),
                batch(&[enc(&stolen)]),
                batch(&[traversal]),
                // One good record next to a forged one: the batch goes whole.
                batch(&[
                    enc(&h.sign("with-a-forged-neighbour.txt", h.file(1))),
                    enc(&tampered),
                ]),
            ],
            sync: vec![
                tampered.clone(),
                stolen.clone(),
                h.sign("synced.txt", h.file(2)),
            ],
            ..Attack::default()
        },
        |_| String::new(),
    );
    scene.until("the honest records (gossip and sync)", |t| {
        t.mnt.join("from-test-peer.txt").exists() && t.mnt.join("synced.txt").exists()
    });
    scene.until("the forgeries refused", |t| refused(t) >= 6);
    scene.finish();
    let m = &scene.target.mnt;
    for name in ["tampered.txt", "stolen.txt", "with-a-forged-neighbour.txt"] {
        assert!(!m.join(name).exists(), "{name} must not be written");
    }
    assert_eq!(std::fs::read("/etc/passwd").unwrap(), passwd_before);
    let names: std::collections::BTreeSet<String> = std::fs::read_dir(m)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        ["from-test-peer.txt", "honest.txt", "synced.txt"]
            .map(String::from)
            .into(),
    );
    let log = scene.target.log();
    assert!(log.contains("refused gossip"), "{log}");
    assert!(log.contains("bad signature"), "{log}");
    assert!(log.contains("malformed"), "{log}");
}
