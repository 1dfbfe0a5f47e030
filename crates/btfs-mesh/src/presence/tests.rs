//! Tests of presence announcements: what is announced, and how strictly a
//! received one is read.

use libp2p::PeerId;

use super::*;

fn addrs(list: &[&str]) -> Vec<Multiaddr> {
    list.iter().map(|a| a.parse().unwrap()).collect()
}

#[test]
fn presence_announcements_are_parsed_strictly() {
    let ok =
        parse_presence(b"btfs-presence/1 17\n/ip4/10.0.0.1/tcp/4410\n/ip6/fe80::1/tcp/1").unwrap();
    assert_eq!(ok.len(), 2);
    let with_id = format!(
        "btfs-presence/1 1\n/ip4/10.0.0.1/tcp/4410/p2p/{}",
        PeerId::random()
    );
    assert_eq!(
        parse_presence(with_id.as_bytes()).unwrap(),
        vec!["/ip4/10.0.0.1/tcp/4410".parse::<Multiaddr>().unwrap()],
        "peer ids are stripped"
    );
    let too_many = format!(
        "btfs-presence/1 1{}",
        "\n/ip4/10.0.0.1/tcp/1".repeat(MAX_ADDRS_PER_PEER + 1)
    );
    for bad in [
        &b""[..],
        b"btfs-presence/1 1",
        b"btfs-presence/1 x\n/ip4/10.0.0.1/tcp/1",
        b"btfs-presence/2 1\n/ip4/10.0.0.1/tcp/1",
        b"btfs-presence/1 1\n/ip4/0.0.0.0/tcp/1",
        b"btfs-presence/1 1\n/ip4/224.0.0.251/tcp/1",
        b"btfs-presence/1 1\n/ip4/10.0.0.1/tcp/0",
        b"btfs-presence/1 1\n/ip4/10.0.0.1/udp/1",
        b"btfs-presence/1 1\n/dns4/example.com/tcp/1",
        b"btfs-presence/1 1\n/ip4/10.0.0.1/tcp/1/ws",
        b"btfs-presence/1 1\n/ip4/10.0.0.1/tcp/1\n",
        b"btfs-presence/1 1\n\xff",
        too_many.as_bytes(),
        &vec![b'a'; MAX_PRESENCE + 1],
    ] {
        assert_eq!(
            parse_presence(bad),
            None,
            "{:?}",
            String::from_utf8_lossy(bad)
        );
    }
}

proptest::proptest! {
    #[test]
    fn presence_parsing_never_panics_and_stays_bounded(data in proptest::collection::vec(proptest::num::u8::ANY, 0..4096)) {
        if let Some(addrs) = parse_presence(&data) {
            proptest::prop_assert!(addrs.len() <= MAX_ADDRS_PER_PEER);
            proptest::prop_assert!(addrs.iter().all(dialable));
        }
    }
}

#[test]
fn an_announcement_names_the_dialable_addresses_and_loopback_only_when_alone() {
    let t0 = Instant::now();
    let p = Presence::new("test");
    let listening = addrs(&[
        "/ip4/0.0.0.0/tcp/4410",
        "/ip4/127.0.0.1/tcp/4410",
        "/ip4/10.0.0.1/tcp/4410",
    ]);
    let data = p.announcement(t0, listening.iter()).unwrap();
    assert_eq!(
        parse_presence(&data).unwrap(),
        addrs(&["/ip4/10.0.0.1/tcp/4410"])
    );
    let alone = addrs(&["/ip4/127.0.0.1/tcp/4410"]);
    let data = p.announcement(t0, alone.iter()).unwrap();
    assert_eq!(parse_presence(&data).unwrap(), alone);
    assert_eq!(
        p.announcement(t0, addrs(&["/ip4/0.0.0.0/tcp/4410"]).iter()),
        None,
        "nothing to announce"
    );
}

#[test]
fn announcements_are_due_at_most_every_second_and_at_least_every_minute() {
    let t0 = Instant::now();
    let at = |s: u64| t0 + Duration::from_secs(s);
    let listening = addrs(&["/ip4/10.0.0.1/tcp/4410"]);
    let mut p = Presence::new("test");
    assert!(
        p.announcement(t0, listening.iter()).is_some(),
        "due at start"
    );
    p.published(t0);
    p.tick(at(59));
    assert!(p.announcement(at(59), listening.iter()).is_none());
    p.make_due();
    assert!(
        p.announcement(t0, listening.iter()).is_none(),
        "a second after the last one at the earliest"
    );
    assert!(p.announcement(at(1), listening.iter()).is_some());
    p.published(at(1));
    p.tick(at(61));
    assert!(p.announcement(at(61), listening.iter()).is_some());
}
