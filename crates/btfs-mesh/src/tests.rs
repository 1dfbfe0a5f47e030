//! Meshes on loopback, in one process (mDNS needs real interfaces: the
//! namespace tests in integration/ cover it).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{sync::Arc, time::Duration};

use libp2p::{PeerId, identity::Keypair, pnet::PreSharedKey};
use tokio::sync::mpsc;

use super::*;

const WAIT: Duration = Duration::from_secs(20);

fn psk(b: u8) -> PreSharedKey {
    PreSharedKey::new([b; 32])
}

fn config(key: PreSharedKey, bootstrap: Vec<Multiaddr>) -> MeshConfig {
    MeshConfig {
        cluster: "test".into(),
        keypair: Keypair::generate_ed25519(),
        psk: key,
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
        bootstrap,
        mdns: false,
        members: None,
        validate: Arc::new(|_, _, data| !data.starts_with(b"forged")),
    }
}

async fn addr_of(mesh: &Mesh) -> Multiaddr {
    tokio::time::timeout(WAIT, async {
        loop {
            if let Some(a) = mesh.listen_addrs().await.unwrap().into_iter().next() {
                return a;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("listening")
}

async fn next_event(
    rx: &mut mpsc::Receiver<MeshEvent>,
    want: impl Fn(&MeshEvent) -> bool,
) -> MeshEvent {
    tokio::time::timeout(WAIT, async {
        loop {
            let e = rx.recv().await.expect("mesh running");
            if want(&e) {
                return e;
            }
        }
    })
    .await
    .expect("event in time")
}

/// Publishes until the gossip gets through (subscriptions are exchanged just
/// after connecting, and publishing before that has no receiver).
async fn publish_until_sent(mesh: &Mesh, data: &[u8]) {
    tokio::time::timeout(WAIT, async {
        loop {
            match mesh.publish(data.to_vec()).await {
                Ok(()) => return,
                Err(MeshError::NoPeers) => tokio::time::sleep(Duration::from_millis(50)).await,
                Err(e) => panic!("publish: {e}"),
            }
        }
    })
    .await
    .expect("a subscribed peer in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_with_the_key_gossip_and_answer_requests() {
    let (a, mut a_rx, _ta) = start(config(psk(1), vec![])).unwrap();
    let a_addr = addr_of(&a).await;
    let (b, mut b_rx, _tb) = start(config(psk(1), vec![a_addr])).unwrap();

    next_event(
        &mut a_rx,
        |e| matches!(e, MeshEvent::PeerUp(p, _) if *p == b.local_peer_id()),
    )
    .await;
    publish_until_sent(&a, b"record one").await;
    let got = next_event(&mut b_rx, |e| matches!(e, MeshEvent::Gossip { .. })).await;
    let MeshEvent::Gossip {
        topic,
        source,
        data,
    } = got
    else {
        unreachable!()
    };
    assert_eq!(
        (topic, source, data.as_slice()),
        (Topic::Records, a.local_peer_id(), &b"record one"[..])
    );

    // Request-response: B asks A, A answers.
    let asker = b.clone();
    let a_id = a.local_peer_id();
    let ask = tokio::spawn(async move { asker.request(a_id, b"summary?".to_vec()).await });
    let MeshEvent::Request {
        peer,
        data,
        responder,
    } = next_event(&mut a_rx, |e| matches!(e, MeshEvent::Request { .. })).await
    else {
        unreachable!()
    };
    assert_eq!(
        (peer, data.as_slice()),
        (b.local_peer_id(), &b"summary?"[..])
    );
    responder.respond(b"here".to_vec()).await.unwrap();
    assert_eq!(ask.await.unwrap().unwrap(), b"here");

    let peers = b.peers().await.unwrap();
    assert_eq!(peers.len(), 1);
    assert!(peers[0].connected && peers[0].id == a.local_peer_id().to_string());
    assert!(matches!(
        a.publish(vec![0; MAX_GOSSIP + 1]).await,
        Err(MeshError::TooLarge(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_payloads_are_neither_delivered_nor_forwarded() {
    // A line A - B - C: C hears A only through B.
    let (a, mut a_rx, _ta) = start(config(psk(2), vec![])).unwrap();
    let a_addr = addr_of(&a).await;
    let (b, mut b_rx, _tb) = start(config(psk(2), vec![a_addr])).unwrap();
    let b_addr = addr_of(&b).await;
    let (c, mut c_rx, _tc) = start(config(psk(2), vec![b_addr])).unwrap();
    next_event(&mut a_rx, |e| matches!(e, MeshEvent::PeerUp(..))).await;
    next_event(&mut c_rx, |e| matches!(e, MeshEvent::PeerUp(..))).await;

    publish_until_sent(&a, b"forged record").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    publish_until_sent(&a, b"good record").await;
    for rx in [&mut b_rx, &mut c_rx] {
        let MeshEvent::Gossip { data, .. } =
            next_event(rx, |e| matches!(e, MeshEvent::Gossip { .. })).await
        else {
            unreachable!()
        };
        assert_eq!(data, b"good record", "the forged payload never arrives");
    }
    drop((b, c));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_another_key_never_connects() {
    let (a, mut a_rx, _ta) = start(config(psk(3), vec![])).unwrap();
    let a_addr = addr_of(&a).await;
    let (intruder, mut i_rx, _ti) = start(config(psk(4), vec![a_addr])).unwrap();
    // Several redial rounds (backoff 1 s, 2 s) without a connection.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(intruder.peers().await.unwrap().iter().all(|p| !p.connected));
    assert!(
        a.peers().await.unwrap().is_empty(),
        "the intruder is not even known"
    );
    assert!(matches!(
        intruder.publish(b"hello".to_vec()).await,
        Err(MeshError::NoPeers)
    ));
    assert!(
        a_rx.try_recv().is_err() && i_rx.try_recv().is_err(),
        "no events either side"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_peer_is_redialled() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let addr: Multiaddr = format!("/ip4/127.0.0.1/tcp/{port}").parse().unwrap();
    let mut a_cfg = config(psk(5), vec![]);
    a_cfg.listen = vec![addr.clone()];
    let (a, _a_rx, a_task) = start(a_cfg.clone()).unwrap();
    let (_b, mut b_rx, _tb) = start(config(psk(5), vec![addr])).unwrap();
    next_event(&mut b_rx, |e| matches!(e, MeshEvent::PeerUp(..))).await;

    // A goes away (every handle dropped ends its loop) and comes back.
    drop(a);
    a_task.await.unwrap();
    next_event(&mut b_rx, |e| matches!(e, MeshEvent::PeerDown(_))).await;
    let (a2, _a2_rx, _t2) = start(a_cfg).unwrap();
    let up = next_event(&mut b_rx, |e| matches!(e, MeshEvent::PeerUp(..))).await;
    assert!(matches!(up, MeshEvent::PeerUp(p, _) if p == a2.local_peer_id()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_that_name_only_one_other_are_introduced_by_presence() {
    let (a, _a_rx, _ta) = start(config(psk(1), vec![])).unwrap();
    let a_addr = addr_of(&a).await;
    let (b, _b_rx, _tb) = start(config(psk(1), vec![a_addr.clone()])).unwrap();
    let (c, _c_rx, _tc) = start(config(psk(1), vec![a_addr])).unwrap();
    let connected_to = |m: Mesh, other: PeerId| async move {
        m.peers()
            .await
            .unwrap()
            .iter()
            .any(|p| p.connected && p.id == other.to_string())
    };
    tokio::time::timeout(WAIT, async {
        while !(connected_to(b.clone(), c.local_peer_id()).await
            && connected_to(c.clone(), b.local_peer_id()).await)
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("B and C connected through A's relay of their announcements");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_tell_their_zones_and_a_node_without_one_tells_none() {
    let dc1 = Zone::new("dc1").unwrap();
    let (a, _a_rx, _ta) = start_in_zone(config(psk(6), vec![]), Some(dc1.clone())).unwrap();
    let a_addr = addr_of(&a).await;
    let (b, mut b_rx, _tb) = start(config(psk(6), vec![a_addr])).unwrap();
    let told = next_event(&mut b_rx, |e| matches!(e, MeshEvent::PeerZone(..))).await;
    assert!(
        matches!(told, MeshEvent::PeerZone(p, Some(ref z)) if p == a.local_peer_id() && *z == dc1)
    );
    let peers = b.peers().await.unwrap();
    assert_eq!(peers[0].zone.as_deref(), Some("dc1"));
    // A has no zone of B's to tell: B told none.
    let b_seen_by_a = a.peers().await.unwrap();
    assert!(b_seen_by_a.iter().all(|p| p.zone.is_none()));
}
