//! Replication between in-process nodes: what the network-namespace tests
//! check for records (gossip, anti-entropy, partitions, membership), without
//! namespaces.

use std::{collections::HashSet, sync::Arc};

use super::{CLUSTER, TestNode, eventually, memnet::MemNet};
use crate::Membership;

async fn linked(n: usize) -> (Arc<MemNet>, Vec<TestNode>) {
    let net = Arc::new(MemNet::default());
    let nodes: Vec<TestNode> = (0..n)
        .map(|_| TestNode::start(&net, Membership::open()))
        .collect();
    for i in 0..n {
        for j in i + 1..n {
            net.link(nodes[i].peer, nodes[j].peer).await;
        }
    }
    (net, nodes)
}

fn same_trees(nodes: &[TestNode]) -> bool {
    let first = nodes[0].tree();
    nodes.iter().all(|n| n.tree() == first)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_on_one_node_show_on_the_others_by_gossip() {
    let (_net, nodes) = linked(3).await;
    nodes[0].mkdir("/d");
    nodes[0].write("/d/a", 1);
    nodes[1].write("/b", 2);
    eventually("every node holds the three paths", || {
        nodes.iter().all(|n| n.tree().len() == 3)
    })
    .await;
    assert!(same_trees(&nodes));
    nodes[2].write("/d/a", 7);
    nodes[2].delete("/b");
    eventually("the edit and the delete reached every node", || {
        nodes
            .iter()
            .all(|n| n.live("/b").is_none() && n.live("/d/a").is_some_and(|r| r.size == 8))
    })
    .await;
    assert!(same_trees(&nodes));
    // Nothing here came by anti-entropy alone: gossip carried it.
    assert!(nodes.iter().all(|n| n.counts().records_received > 0));
    assert!(nodes.iter().all(|n| n.counts().records_refused == 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_node_catches_up_by_anti_entropy_and_later_asks_only_for_what_is_new() {
    let net = Arc::new(MemNet::default());
    let a = TestNode::start(&net, Membership::open());
    for i in 0..100u8 {
        a.write(&format!("/f{i}"), i);
    }
    let b = TestNode::start(&net, Membership::open());
    net.link(a.peer, b.peer).await;
    eventually("B holds A's hundred files", || b.tree().len() == 100).await;
    assert_eq!(
        b.counts().records_synced,
        100,
        "the first round brought all"
    );

    net.unlink(a.peer, b.peer).await;
    for i in 0..5u8 {
        a.write(&format!("/new{i}"), i);
    }
    net.link(a.peer, b.peer).await;
    eventually("B holds the five new files", || b.tree().len() == 105).await;
    assert_eq!(
        b.counts().records_synced,
        105,
        "the second round asked only for what was new"
    );
    assert!(same_trees(&[a, b]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_heals_into_one_tree_that_keeps_both_sides_of_a_clash() {
    let (net, nodes) = linked(3).await;
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    a.write("/shared", 1);
    a.write("/victim", 1);
    eventually("the base tree everywhere", || {
        c.tree().len() == 2 && b.tree().len() == 2
    })
    .await;

    net.unlink(c.peer, a.peer).await;
    net.unlink(c.peer, b.peer).await;
    a.write("/shared", 2);
    a.delete("/victim");
    b.write("/b-only", 3);
    c.write("/shared", 4);
    c.mkdir("/c-dir");
    c.write("/c-dir/x", 5);
    assert!(c.live("/b-only").is_none(), "C is cut off");
    net.link(c.peer, a.peer).await;
    net.link(c.peer, b.peer).await;

    eventually("identical trees on all three", || {
        same_trees(&nodes) && a.live("/c-dir/x").is_some() && c.live("/b-only").is_some()
    })
    .await;
    let tree = a.tree();
    let shared = tree
        .iter()
        .find(|e| e.0.trim_start_matches('/') == "shared")
        .expect("/shared");
    assert_eq!(shared.3, 2, "both sides of the clash are kept: {tree:?}");
    assert!(nodes.iter().map(|n| n.counts().records_merged).sum::<u64>() > 0);
    // The delete raced nothing: it wins everywhere.
    assert!(nodes.iter().all(|n| n.live("/victim").is_none()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_of_a_node_outside_the_member_list_are_refused_by_gossip_and_by_sync() {
    let net = Arc::new(MemNet::default());
    let keys: Vec<_> = (0..3)
        .map(|_| libp2p_identity::Keypair::generate_ed25519())
        .collect();
    let members: HashSet<_> = keys[..2].iter().map(|k| k.public().to_peer_id()).collect();
    let listed = Membership::listed(members, HashSet::new());
    let a = TestNode::start_as(&net, keys[0].clone(), listed.clone());
    let b = TestNode::start_as(&net, keys[1].clone(), listed);
    let outsider = TestNode::start_as(&net, keys[2].clone(), Membership::open());
    outsider.write("/before", 1);
    net.link(a.peer, b.peer).await;
    net.link(a.peer, outsider.peer).await;
    outsider.write("/after", 2);
    a.write("/ok", 3);
    eventually("B holds A's file", || b.live("/ok").is_some()).await;
    eventually("A refused the outsider's gossip and synced records", || {
        a.counts().records_refused >= 2
    })
    .await;
    assert!(a.live("/before").is_none() && a.live("/after").is_none());
    assert!(b.live("/before").is_none() && b.live("/after").is_none());
    // The outsider, who admits everyone, took A's record.
    eventually("the outsider holds A's file", || {
        outsider.live("/ok").is_some()
    })
    .await;
    assert_eq!(CLUSTER, "test");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_past_the_announce_queue_is_paced_by_gossip_not_left_to_anti_entropy() {
    let (_net, nodes) = linked(2).await;
    // The round every link starts is over before the burst.
    eventually("B's first round is over", || {
        nodes[1].counts().sync_rounds >= 1
    })
    .await;
    let rounds = nodes[1].counts().sync_rounds;
    let burst = crate::ANNOUNCE_CAP * 2 + 300;
    for i in 0..burst {
        nodes[0].write(&format!("/burst-{i}"), (i % 251) as u8);
    }
    // No anti-entropy round is started here (the harness runs no periodic
    // one): everything must come by gossip, the overflow read back from the
    // writer's log.
    eventually("B holds the whole burst", || nodes[1].tree().len() == burst).await;
    assert!(same_trees(&nodes));
    let c = nodes[1].counts();
    assert_eq!(c.sync_rounds, rounds, "no anti-entropy round ran");
    assert_eq!(c.records_synced, 0, "nothing came by anti-entropy");
    assert!(c.records_received >= burst as u64, "{c:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_stopped_and_restarted_during_writes_converges_asking_only_for_what_is_new() {
    let (net, mut nodes) = linked(2).await;
    for i in 0..20u8 {
        nodes[0].write(&format!("/a{i}"), i);
        nodes[1].write(&format!("/b{i}"), i);
    }
    eventually("both hold the forty files", || {
        nodes.iter().all(|n| n.tree().len() == 40)
    })
    .await;
    let b = nodes.pop().unwrap();
    // A round after the writes: B's progress with A is where A's log ends.
    let rounds = b.counts().sync_rounds;
    eventually("a sync round of B with A", || {
        b.rep.sync_all();
        b.counts().sync_rounds > rounds
    })
    .await;
    let (keypair, store) = b.stop(&net).await;
    for i in 0..10u8 {
        nodes[0].write(&format!("/a{i}"), i + 100);
        nodes[0].write(&format!("/late{i}"), i);
    }
    let b = TestNode::start_on(&net, keypair, Membership::open(), store);
    assert_eq!(b.tree().len(), 40, "the store survived the restart");
    net.link(nodes[0].peer, b.peer).await;
    eventually("the restarted node caught up", || {
        b.tree().len() == 50 && b.live("/a3").is_some_and(|r| r.size == 104)
    })
    .await;
    // The progress kept in the store: the round asked for the twenty
    // changes made meanwhile, not for the whole log.
    assert_eq!(b.counts().records_synced, 20);
    nodes.push(b);
    assert!(same_trees(&nodes));
}
