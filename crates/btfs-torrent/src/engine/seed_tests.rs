//! Seeded fetches between two running engines (librqbit on loopback, each
//! engine the other's only member, their peer wires in-memory pipes): a
//! node that held the old version fetches only the pieces that changed.

use std::sync::OnceLock;

use super::{live, seed, *};
use crate::meta::{MIN_PIECE, Metainfo};
use btfs_core::Update;

/// One member: the other engine.
struct Pair {
    me: MemberId,
    other: MemberId,
    peer: OnceLock<Arc<Engine>>,
}

impl Network for Pair {
    fn members(&self) -> Vec<MemberId> {
        vec![self.other]
    }
    fn member_of(&self, _: &NodeId) -> Option<MemberId> {
        Some(self.other)
    }
    fn dial(&self, m: MemberId) -> BoxFuture<io::Result<BoxIo>> {
        let peer = self.peer.get().cloned().filter(|_| m == self.other);
        let me = self.me;
        Box::pin(async move {
            let peer = peer.ok_or_else(|| io::Error::other("not a member"))?;
            let (ours, theirs) = tokio::io::duplex(1 << 20);
            tokio::spawn(peer.accept(Box::new(theirs), me));
            Ok(Box::new(ours) as BoxIo)
        })
    }
    fn metainfo(&self, ih: InfoHash, _: Option<MemberId>) -> BoxFuture<Option<Vec<u8>>> {
        let m = self.peer.get().and_then(|p| p.local_metainfo(&ih));
        Box::pin(async move { m })
    }
    fn announce(&self, _: Vec<ContentId>, _: Vec<ContentId>) {}
    fn is_member_ip(&self, _: IpAddr) -> bool {
        false
    }
    fn accept_wire(&self, _: TcpStream) -> BoxFuture<io::Result<(BoxIo, MemberId)>> {
        Box::pin(async { Err(io::Error::other("a test double")) })
    }
    fn zone_of(&self, _: &MemberId) -> Option<String> {
        None
    }
}

/// Two engines that know each other.
async fn pair(a: &Path, b: &Path) -> (Arc<Engine>, Arc<Engine>) {
    let (ma, mb) = (MemberId::random(), MemberId::random());
    let net_a = Arc::new(Pair {
        me: ma,
        other: mb,
        peer: OnceLock::new(),
    });
    let net_b = Arc::new(Pair {
        me: mb,
        other: ma,
        peer: OnceLock::new(),
    });
    let ea = Engine::start(super::test_config(a, 8, ma, None), net_a.clone())
        .await
        .unwrap();
    let eb = Engine::start(super::test_config(b, 8, mb, None), net_b.clone())
        .await
        .unwrap();
    let _ = net_a.peer.set(eb.clone());
    let _ = net_b.peer.set(ea.clone());
    (ea, eb)
}

/// Pseudo-random bytes (xorshift), distinct for each `seed`.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// `data` as an object of `engine`, published: what a record names.
fn object(engine: &Engine, data: &[u8], path: &str) -> (Wanted, PathBuf) {
    let content = ContentId::from(blake3::hash(data));
    let file = (engine.cfg.object_path)(&content);
    fs::write(&file, data).unwrap();
    let torrent = engine.publish(&content, &file, data.len() as u64).unwrap();
    let want = Wanted {
        path: path.into(),
        content,
        torrent,
        size: data.len() as u64,
        author: NodeId([1; 32]),
    };
    (want, file)
}

fn downloaded(engine: &Engine) -> u64 {
    engine.status().bytes_downloaded
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_that_held_the_old_version_fetches_only_the_changed_piece() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, b) = pair(da.path(), db.path()).await;
    let p = MIN_PIECE as usize;
    let old = noise(32 * p, 1);
    let mut new = old.clone();
    for byte in &mut new[17 * p + 100..17 * p + 200] {
        *byte ^= 0x5a;
    }
    // A wrote both versions, the new one in place: one piece hashed.
    let (old_want, _) = object(&a, &old, "f");
    let new_c = ContentId::from(blake3::hash(&new));
    let new_file = (a.cfg.object_path)(&new_c);
    fs::write(&new_file, &new).unwrap();
    let changed = [(17 * p as u64 + 100, 17 * p as u64 + 200)];
    let update = Update {
        base: old_want.content,
        base_torrent: Some(old_want.torrent),
        base_kept: old.len() as u64,
        changed: &changed,
    };
    let new_ih = a
        .publish_update(&new_c, &new_file, new.len() as u64, &update)
        .unwrap();
    let full = Metainfo::build(&new_c, &new_file, new.len() as u64, 1).unwrap();
    assert_eq!(new_ih, full.info_hash, "the torrent a full hash gives");
    let new_want = Wanted {
        content: new_c,
        torrent: new_ih,
        size: new.len() as u64,
        ..old_want.clone()
    };

    // B held the old version; the new one supersedes it.
    let (_, b_old) = object(&b, &old, "f");
    let adopted = tokio::task::spawn_blocking({
        let (b, b_old, old_want, new_want) =
            (b.clone(), b_old.clone(), old_want.clone(), new_want.clone());
        move || b.adopt_seed(&b_old, &old_want, &new_want)
    })
    .await
    .unwrap();
    assert!(adopted);
    assert!(!b_old.exists());
    let partial = b.cfg.dir.join("partial").join(new_c.to_hex());
    assert!(partial.exists());
    assert!(seed::marker_path(&b.cfg.dir, &new_c).exists());
    // Adopted once only: the new content is partial here now.
    fs::write(&b_old, &old).unwrap();
    let again = tokio::task::spawn_blocking({
        let (b, b_old, old_want, new_want) =
            (b.clone(), b_old.clone(), old_want.clone(), new_want.clone());
        move || b.adopt_seed(&b_old, &old_want, &new_want)
    })
    .await
    .unwrap();
    assert!(!again);
    fs::remove_file(&b_old).unwrap();

    let before = downloaded(&b);
    let started = std::time::Instant::now();
    b.fetch(new_want.clone()).await.unwrap();
    let took = started.elapsed();
    let got = downloaded(&b) - before;
    let installed = (b.cfg.object_path)(&new_c);
    assert_eq!(fs::read(&installed).unwrap(), new);
    assert!(!seed::marker_path(&b.cfg.dir, &new_c).exists());
    eprintln!(
        "seeded fetch: {got} bytes downloaded of {} ({} pieces of {p}) in {took:?}",
        new.len(),
        new.len() / p
    );
    assert!(
        got >= p as u64 && got <= 2 * p as u64,
        "{got} bytes for one changed piece of {p}"
    );

    // Without a seed, the same fetch takes the whole file.
    let mut other = new.clone();
    other[3 * p] ^= 1;
    let (other_want, _) = object(&a, &other, "g");
    let before = downloaded(&b);
    b.fetch(other_want).await.unwrap();
    let whole = downloaded(&b) - before;
    eprintln!("unseeded fetch: {whole} bytes downloaded");
    assert!(whole >= other.len() as u64);

    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seed_is_declined_when_small_in_use_or_over_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let me = MemberId::random();
    let net = Arc::new(Pair {
        me,
        other: MemberId::random(),
        peer: OnceLock::new(),
    });
    let p = MIN_PIECE as usize;
    let mut cfg = super::test_config(dir.path(), 8, me, None);
    cfg.cache_size = Some(5 * p as u64);
    let e = Engine::start(cfg, net).await.unwrap();
    let adopt = |file: &Path, old: &Wanted, new: Wanted| {
        let (e, file, old) = (e.clone(), file.to_path_buf(), old.clone());
        tokio::task::spawn_blocking(move || e.adopt_seed(&file, &old, &new))
    };
    let old = noise(4 * p, 7);
    let (old_want, file) = object(&e, &old, "f");
    let new_want = |size: usize| Wanted {
        content: ContentId([size as u8; 32]),
        torrent: InfoHash([size as u8; 20]),
        size: size as u64,
        ..old_want.clone()
    };
    // Too small a new version.
    assert!(!adopt(&file, &old_want, new_want(p)).await.unwrap());
    // Over the cache: 2 pieces partial already, 4 of seed, 5 of cache.
    let filler = e.cfg.dir.join("partial").join(ContentId([9; 32]).to_hex());
    fs::write(&filler, noise(2 * p, 8)).unwrap();
    assert!(!adopt(&file, &old_want, new_want(4 * p)).await.unwrap());
    fs::remove_file(&filler).unwrap();
    // A torrent of the old version live: it seeds the same file.
    let meta = Arc::new(
        Metainfo::parse(
            e.local_metainfo(&old_want.torrent).unwrap(),
            &old_want.torrent,
        )
        .unwrap(),
    );
    let on = e
        .bring_up(meta, "f", None, false, live::Need::Local, live::Dial::Zone)
        .await
        .unwrap();
    assert!(!adopt(&file, &old_want, new_want(4 * p)).await.unwrap());
    assert!(file.exists());
    // Once idle, it is retired and the file taken.
    drop(on);
    assert!(adopt(&file, &old_want, new_want(4 * p)).await.unwrap());
    assert!(!file.exists());
    assert!(e.live_of(&old_want.torrent).is_none());
    e.stop().await;
}
