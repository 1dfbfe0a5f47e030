//! Fetches for a zone on a running engine (librqbit on loopback; the one
//! member of the zone is a test double that only answers metainfo).

use std::sync::atomic::Ordering;

use parking_lot::Mutex;

use super::{holders::zone_fetcher, *};
use crate::{limits::Remote, meta::Metainfo};

/// One other member, in zone `dc1`, that has the metainfo of `meta`.
struct OneMember {
    member: Mutex<MemberId>,
    meta: Mutex<Option<Vec<u8>>>,
    asked: AtomicU64,
}

impl Network for OneMember {
    fn members(&self) -> Vec<MemberId> {
        vec![*self.member.lock()]
    }
    fn member_of(&self, _: &NodeId) -> Option<MemberId> {
        None
    }
    fn dial(&self, _: MemberId) -> BoxFuture<io::Result<BoxIo>> {
        Box::pin(async { Err(io::Error::other("a test double")) })
    }
    fn metainfo(&self, _: InfoHash, _: Option<MemberId>) -> BoxFuture<Option<Vec<u8>>> {
        self.asked.fetch_add(1, Ordering::Relaxed);
        let m = self.meta.lock().clone();
        Box::pin(async move { m })
    }
    fn announce(&self, _: Vec<ContentId>, _: Vec<ContentId>) {}
    fn is_member_ip(&self, _: IpAddr) -> bool {
        false
    }
    fn accept_wire(&self, _: TcpStream) -> BoxFuture<io::Result<(BoxIo, MemberId)>> {
        Box::pin(async { Err(io::Error::other("a test double")) })
    }
    fn zone_of(&self, m: &MemberId) -> Option<String> {
        (*m == *self.member.lock()).then(|| "dc1".to_owned())
    }
}

async fn start(dir: &Path, me: MemberId, net: Arc<OneMember>) -> Arc<Engine> {
    let cfg = super::test_config(dir, 8, me, Some("dc1".into()));
    Engine::start(cfg, net).await.unwrap()
}

/// The metainfo of content that is not here (its file is elsewhere).
fn content_elsewhere(dir: &Path) -> Metainfo {
    let data = vec![7u8; 40_000];
    let content = ContentId::from(blake3::hash(&data));
    let file = dir.join("elsewhere");
    fs::write(&file, &data).unwrap();
    Metainfo::build(&content, &file, data.len() as u64, 1).unwrap()
}

/// A member that, with this node, makes `me` the zone's fetcher of
/// `content` (`true`) or not.
fn member_making(content: &ContentId, me: &MemberId, fetcher: bool) -> MemberId {
    loop {
        let m = MemberId::random();
        if (zone_fetcher(content, me, &[m]) == *me) == fetcher {
            return m;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_zones_fetcher_fetches_what_a_member_of_its_zone_connects_for_and_no_one_else_does() {
    let dir = tempfile::tempdir().unwrap();
    let meta = content_elsewhere(dir.path());
    let ih = meta.info_hash;
    let me = MemberId::random();
    let not_fetcher = member_making(&meta.content, &me, true);
    let net = Arc::new(OneMember {
        member: Mutex::new(not_fetcher),
        meta: Mutex::new(Some(meta.bytes.to_vec())),
        asked: AtomicU64::new(0),
    });
    let engine = start(dir.path(), me, net.clone()).await;

    // A member of another zone (not `dc1`): nothing is fetched, nothing
    // asked, and the torrent is unknown here.
    assert!(
        engine
            .held(ih, &Remote::Member(MemberId::random()))
            .await
            .is_none()
    );
    assert_eq!(net.asked.load(Ordering::Relaxed), 0);

    // The member of the zone: this node is the fetcher. The metainfo is
    // asked of it and kept, the whole file is being fetched, and the
    // member's connection joins that torrent.
    let on = engine
        .held(ih, &Remote::Member(not_fetcher))
        .await
        .expect("the member joins the fetch");
    assert!(on.live.state().fetching());
    assert!(engine.zone_fetches.lock().contains(&ih));
    assert!(engine.local_metainfo(&ih).is_some());
    // Connecting again starts no second fetch.
    let again = engine.held(ih, &Remote::Member(not_fetcher)).await.unwrap();
    assert!(Arc::ptr_eq(&on.live, &again.live));
    assert_eq!(engine.zone_fetches.lock().len(), 1);
    drop((on, again));
    engine.stop().await;
    tokio::time::timeout(Duration::from_secs(5), async {
        while !engine.zone_fetches.lock().is_empty() {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await
    .expect("the fetch ends with the engine");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_is_not_the_zones_fetcher_fetches_nothing_for_it_and_keeps_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let meta = content_elsewhere(dir.path());
    let ih = meta.info_hash;
    let me = MemberId::random();
    let fetcher = member_making(&meta.content, &me, false);
    let net = Arc::new(OneMember {
        member: Mutex::new(fetcher),
        meta: Mutex::new(Some(meta.bytes.to_vec())),
        asked: AtomicU64::new(0),
    });
    let engine = start(dir.path(), me, net.clone()).await;
    assert!(engine.held(ih, &Remote::Member(fetcher)).await.is_none());
    assert_eq!(net.asked.load(Ordering::Relaxed), 1);
    assert!(engine.zone_fetches.lock().is_empty());
    assert!(engine.local_metainfo(&ih).is_none(), "not kept");
    assert!(engine.live_of(&ih).is_none());
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metainfo_that_is_not_the_torrents_starts_no_fetch_for_the_zone() {
    let dir = tempfile::tempdir().unwrap();
    let meta = content_elsewhere(dir.path());
    let me = MemberId::random();
    let other = member_making(&meta.content, &me, true);
    let net = Arc::new(OneMember {
        member: Mutex::new(other),
        meta: Mutex::new(Some(b"d4:infod6:lengthi1eee".to_vec())),
        asked: AtomicU64::new(0),
    });
    let engine = start(dir.path(), me, net.clone()).await;
    let ih = meta.info_hash;
    assert!(engine.held(ih, &Remote::Member(other)).await.is_none());
    assert_eq!(engine.status().metainfo_refused, 1);
    assert!(engine.zone_fetches.lock().is_empty());
    assert!(engine.local_metainfo(&ih).is_none());
    engine.stop().await;
}
