//! The live cap and the per-member bounds on a running engine (librqbit on
//! loopback, no members).

use std::collections::HashSet;

use super::{
    live::{Dial, Need},
    *,
};
use crate::{
    limits::{Key, MAX_WIRES_PER_MEMBER, Remote},
    meta::Metainfo,
};

struct NoMembers;

impl Network for NoMembers {
    fn members(&self) -> Vec<MemberId> {
        Vec::new()
    }
    fn member_of(&self, _: &NodeId) -> Option<MemberId> {
        None
    }
    fn dial(&self, _: MemberId) -> BoxFuture<io::Result<BoxIo>> {
        Box::pin(async { Err(io::Error::other("no members")) })
    }
    fn metainfo(&self, _: InfoHash, _: Option<MemberId>) -> BoxFuture<Option<Vec<u8>>> {
        Box::pin(async { None })
    }
    fn announce(&self, _: Vec<ContentId>, _: Vec<ContentId>) {}
    fn is_member_ip(&self, _: IpAddr) -> bool {
        false
    }
    fn accept_wire(&self, _: TcpStream) -> BoxFuture<io::Result<(BoxIo, MemberId)>> {
        Box::pin(async { Err(io::Error::other("no members")) })
    }
    fn zone_of(&self, _: &MemberId) -> Option<String> {
        None
    }
}

/// A member, for `held`.
fn member(m: MemberId) -> Remote {
    Remote::Member(m)
}

async fn engine(dir: &Path, max_live: usize) -> Arc<Engine> {
    let cfg = super::test_config(dir, max_live, MemberId::random(), None);
    Engine::start(cfg, Arc::new(NoMembers)).await.unwrap()
}

/// Content `n` as an object here, published: its info hash.
fn object(engine: &Engine, n: u8) -> InfoHash {
    let data = vec![n; 40_000];
    let content = ContentId::from(blake3::hash(&data));
    let file = (engine.cfg.object_path)(&content);
    fs::write(&file, &data).unwrap();
    engine.publish(&content, &file, data.len() as u64).unwrap()
}

fn live_set(engine: &Engine) -> HashSet<InfoHash> {
    engine.live.lock().keys().copied().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_cap_retires_the_least_recently_used_idle_torrent_and_refuses_members_when_all_are_busy()
 {
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(dir.path(), 2).await;
    let [a, b, c] = [1, 2, 3].map(|n| object(&engine, n));
    let [m1, m2, m3] = [(); 3].map(|()| member(MemberId::random()));

    // Two idle torrents, `a` used least recently.
    drop(engine.held(a, &m1).await.expect("a comes up"));
    tokio::time::sleep(Duration::from_millis(5)).await;
    drop(engine.held(b, &m1).await.expect("b comes up"));
    assert_eq!(live_set(&engine), HashSet::from([a, b]));

    // A third: `a` is retired, not `b`.
    let on_c = engine.held(c, &m2).await.expect("c comes up");
    assert_eq!(live_set(&engine), HashSet::from([b, c]));

    // Both in use by members' connections: a member's handshake for `a`
    // is refused, and counted.
    let on_b = engine.held(b, &m2).await.expect("b is live");
    assert!(engine.held(a, &m3).await.is_none());
    assert_eq!(engine.status().live_refused, 1);
    assert_eq!(live_set(&engine), HashSet::from([b, c]));

    // A local read is not: it retires the least recently used torrent that
    // only members use (`c`: `b` was used since).
    let meta_a = Arc::new(Metainfo::parse(engine.local_metainfo(&a).unwrap(), &a).unwrap());
    let read_a = engine
        .bring_up(meta_a, "a", None, false, Need::Local, Dial::Zone)
        .await
        .expect("local reads take priority");
    assert_eq!(live_set(&engine), HashSet::from([a, b]));

    // With every live torrent in local use, a local read goes over the cap.
    let meta_b = Arc::new(Metainfo::parse(engine.local_metainfo(&b).unwrap(), &b).unwrap());
    let read_b = engine
        .bring_up(meta_b, "b", None, false, Need::Local, Dial::Zone)
        .await
        .unwrap();
    let meta_c = Arc::new(Metainfo::parse(engine.local_metainfo(&c).unwrap(), &c).unwrap());
    let read_c = engine
        .bring_up(meta_c, "c", None, false, Need::Local, Dial::Zone)
        .await
        .unwrap();
    assert_eq!(live_set(&engine), HashSet::from([a, b, c]));
    let s = engine.status();
    assert_eq!((s.live_torrents, s.max_live, s.live_refused), (3, 2, 1));

    drop((on_b, on_c, read_a, read_b, read_c));
    engine.stop().await;
}

/// A peer connection that sends nothing (its handshake never comes).
fn silent() -> (BoxIo, tokio::io::DuplexStream) {
    let (ours, theirs) = tokio::io::duplex(1024);
    (Box::new(ours), theirs)
}

async fn until(mut cond: impl FnMut() -> bool) {
    tokio::time::timeout(Duration::from_secs(5), async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await
    .expect("in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_is_refused_connections_past_its_share_and_others_are_not() {
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(dir.path(), 8).await;
    let (member_a, member_b) = (MemberId::random(), MemberId::random());
    let mut far_ends = Vec::new();
    for _ in 0..MAX_WIRES_PER_MEMBER {
        let (io, far) = silent();
        far_ends.push(far);
        tokio::spawn(engine.clone().accept(io, member_a));
    }
    let held = |m: MemberId| {
        let e = engine.clone();
        move || e.limits.members.held_by(&Key::Member(m))
    };
    let held_a = held(member_a);
    until(|| held_a() == MAX_WIRES_PER_MEMBER).await;

    // One more from A: refused at once.
    let (io, _far) = silent();
    tokio::time::timeout(Duration::from_secs(1), engine.clone().accept(io, member_a))
        .await
        .expect("refused without waiting for a handshake");
    assert_eq!(engine.status().member_conns_refused, 1);

    // B's is not.
    let (io, far_b) = silent();
    let b = tokio::spawn(engine.clone().accept(io, member_b));
    let held_b = held(member_b);
    until(|| held_b() == 1).await;
    assert_eq!(engine.status().member_conns_refused, 1);

    // Closed connections give their slots back.
    drop(far_ends);
    drop(far_b);
    b.await.unwrap();
    until(|| held_a() == 0).await;
    engine.stop().await;
}
