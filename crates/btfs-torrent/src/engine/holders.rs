//! What members announced they hold: remembered as hints for finding peers
//! (the order a torrent dials members in) and for eviction (content another
//! member holds may go), and this node's own announcements.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    fs,
};

use btfs_core::ContentId;
use tracing::debug;

use super::Engine;
use crate::MemberId;

/// Content that members announced they hold, remembered at most (the oldest
/// go first: these are hints for finding peers, not a source of truth).
const KNOWN_HOLDINGS: usize = 100_000;

/// Members a torrent dials at first, its known holders first: bounds the
/// fan-out of a read in a large cluster (librqbit keeps 128 peers a torrent).
const MAX_DIALLED: usize = 64;

/// Who announced holding what, bounded by `KNOWN_HOLDINGS`.
#[derive(Debug, Default)]
pub(super) struct Holders {
    by_content: HashMap<ContentId, Vec<MemberId>>,
    /// First announcement order, for forgetting the oldest.
    order: VecDeque<ContentId>,
}

impl Holders {
    fn note(&mut self, member: &MemberId, held: &[ContentId], dropped: &[ContentId]) {
        for c in held {
            let holders = self.by_content.entry(*c).or_insert_with(|| {
                self.order.push_back(*c);
                Vec::new()
            });
            if !holders.contains(member) {
                holders.push(*member);
            }
        }
        for c in dropped {
            if let Some(holders) = self.by_content.get_mut(c) {
                holders.retain(|m| m != member);
            }
        }
        while self.order.len() > KNOWN_HOLDINGS {
            if let Some(old) = self.order.pop_front() {
                self.by_content.remove(&old);
            }
        }
    }

    pub(super) fn of(&self, c: &ContentId) -> &[MemberId] {
        self.by_content.get(c).map_or(&[], Vec::as_slice)
    }

    /// (content, member) pairs known.
    pub(super) fn count(&self) -> usize {
        self.by_content.values().map(Vec::len).sum()
    }
}

/// This node's place in its zone, as a torrent's dial order sees it.
#[derive(Debug, Clone, Copy)]
pub(super) struct ZoneView<'a> {
    /// This node.
    pub(super) me: &'a MemberId,
    /// The connected members that told this node's zone (this node itself,
    /// or members not connected, are ignored).
    pub(super) in_zone: &'a [MemberId],
}

/// The members a torrent dials, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct DialOrder {
    pub(super) members: Vec<MemberId>,
    /// Members of other zones were left out: another member of this
    /// node's zone fetches the content across, or a member of it holds it.
    pub(super) zone_only: bool,
}

/// A member's rank for `content` in rendezvous hashing.
pub(super) fn rank(content: &ContentId, member: &MemberId) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(&content.0);
    h.update(&member.to_bytes());
    *h.finalize().as_bytes()
}

/// Of `me` and the `in_zone` members, the one that fetches `content` from
/// other zones for the zone: the highest blake3(content id || member id).
/// Rendezvous hashing: every member of the zone that sees the same members
/// connected picks the same one without a word exchanged, contents spread
/// evenly over the zone, and a member that comes or goes moves only the
/// contents it wins.
pub(super) fn zone_fetcher(content: &ContentId, me: &MemberId, in_zone: &[MemberId]) -> MemberId {
    std::iter::once(me)
        .chain(in_zone)
        .max_by_key(|m| rank(content, m))
        .copied()
        .unwrap_or(*me)
}

/// Whether this node fetches `content` across zones for its zone: it is the
/// zone's fetcher among the connected `in_zone` members (not empty), and
/// none of them is known to hold it (`known`: the author, members that
/// announced it), in which case the file has crossed already.
pub(super) fn fetches_across(
    content: &ContentId,
    me: &MemberId,
    in_zone: &[MemberId],
    known: &[MemberId],
) -> bool {
    let others: Vec<MemberId> = in_zone.iter().filter(|m| *m != me).copied().collect();
    !others.is_empty()
        && !known.iter().any(|k| others.contains(k))
        && zone_fetcher(content, me, &others) == *me
}

/// The members a torrent of `content` dials, in order: the author
/// (`first`), then the members that announced holding it, then the others;
/// connected ones only, at most `MAX_DIALLED`.
///
/// With a zone (`zone`, and a member of it connected), members of other
/// zones are left out (`zone_only`) unless this node is the zone's fetcher
/// for the content ([`zone_fetcher`]), so that a slow link between zones
/// carries a file about once: the fetcher dials its zone first, then the
/// others; the rest dial their zone only, the fetcher first (it fetches the
/// whole file once a member of the zone connects for it, see `listen`).
/// When the author or a holder is in the zone, the file has crossed
/// already: every member, the fetcher too, dials its zone only, holders
/// first. A read that stalls within its zone brings the torrent up again
/// without `zone` (`read`).
pub(super) fn dial_order(
    content: &ContentId,
    first: Option<&MemberId>,
    holders: &[MemberId],
    members: &[MemberId],
    zone: Option<ZoneView<'_>>,
) -> DialOrder {
    let connected: HashSet<&MemberId> = members.iter().collect();
    let mut seen = HashSet::new();
    let ranked: Vec<MemberId> = first
        .into_iter()
        .chain(holders)
        .chain(members)
        .filter(|m| connected.contains(m) && seen.insert(**m))
        .copied()
        .collect();
    let bounded = |mut members: Vec<MemberId>, zone_only| {
        members.truncate(MAX_DIALLED);
        DialOrder { members, zone_only }
    };
    let Some(z) = zone else {
        return bounded(ranked, false);
    };
    let in_zone: HashSet<&MemberId> = z
        .in_zone
        .iter()
        .filter(|m| *m != z.me && connected.contains(m))
        .collect();
    if in_zone.is_empty() {
        return bounded(ranked, false);
    }
    let (mut near, far): (Vec<MemberId>, Vec<MemberId>) =
        ranked.into_iter().partition(|m| in_zone.contains(m));
    let known: Vec<MemberId> = first.into_iter().chain(holders).copied().collect();
    if fetches_across(content, z.me, &near, &known) {
        near.extend(far);
        return bounded(near, false);
    }
    let held_in_zone = known.iter().any(|k| in_zone.contains(k));
    if !held_in_zone {
        let fetcher = zone_fetcher(content, z.me, &near);
        if let Some(i) = near.iter().position(|m| *m == fetcher) {
            let f = near.remove(i);
            near.insert(0, f);
        }
    }
    bounded(near, true)
}

impl Engine {
    /// Announces all content fetched in full and kept here (for members
    /// that joined since it was fetched). Blocking: reads a directory.
    pub fn announce_holdings(&self) {
        let held: Vec<ContentId> = fs::read_dir(self.cfg.dir.join("fetched"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| ContentId::from_hex(e.file_name().to_str()?).ok())
            .filter(|c| (self.cfg.object_path)(c).exists())
            .collect();
        if !held.is_empty() {
            debug!(count = held.len(), "announcing holdings");
            self.net.announce(held, Vec::new());
        }
    }

    /// The members known to hold `c` in full (announced holdings; a
    /// version's author holds it without announcing), for `btfs log`.
    pub fn holders_of(&self, c: &ContentId) -> Vec<MemberId> {
        self.holders.lock().of(c).to_vec()
    }

    /// The member (peer id) that node `node` runs as, if it is known.
    pub fn member_of(&self, node: &btfs_core::NodeId) -> Option<MemberId> {
        self.net.member_of(node)
    }

    /// A member announced content it now holds in full (`held`) or no
    /// longer holds (`dropped`).
    pub fn note_holdings(&self, member: &MemberId, held: &[ContentId], dropped: &[ContentId]) {
        self.holders.lock().note(member, held, dropped);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(n: u8) -> ContentId {
        ContentId([n; 32])
    }

    /// Members named for the test: the same name is the same member.
    #[derive(Default)]
    struct Names(HashMap<&'static str, MemberId>);

    impl Names {
        fn id(&mut self, name: &'static str) -> MemberId {
            *self.0.entry(name).or_insert_with(MemberId::random)
        }

        fn ids(&mut self, names: &[&'static str]) -> Vec<MemberId> {
            names.iter().map(|n| self.id(n)).collect()
        }
    }

    #[test]
    fn holders_remember_announcements_and_forget_drops() {
        let mut n = Names::default();
        let (b, cc) = (n.id("b"), n.id("c"));
        let mut h = Holders::default();
        h.note(&b, &[c(1), c(2)], &[]);
        h.note(&cc, &[c(1)], &[]);
        h.note(&b, &[c(1)], &[]);
        assert_eq!(h.of(&c(1)), n.ids(&["b", "c"]).as_slice());
        h.note(&b, &[], &[c(1)]);
        assert_eq!(h.of(&c(1)), n.ids(&["c"]).as_slice());
        assert_eq!(h.of(&c(3)), &[] as &[MemberId]);
        assert_eq!(h.count(), 2);
    }

    #[test]
    fn holders_are_bounded_and_forget_the_oldest_first() {
        let b = MemberId::random();
        let mut h = Holders::default();
        for i in 0..=KNOWN_HOLDINGS {
            let mut id = [0u8; 32];
            id[..8].copy_from_slice(&(i as u64).to_le_bytes());
            h.note(&b, &[ContentId(id)], &[]);
        }
        assert_eq!(h.by_content.len(), KNOWN_HOLDINGS);
        assert!(h.of(&ContentId([0; 32])).is_empty(), "the oldest went");
    }

    /// The order as members of no zone see it.
    fn plain(
        first: Option<&MemberId>,
        holders: &[MemberId],
        members: &[MemberId],
    ) -> Vec<MemberId> {
        let order = dial_order(&c(1), first, holders, members, None);
        assert!(!order.zone_only);
        order.members
    }

    #[test]
    fn dial_order_is_author_then_holders_then_the_rest_connected_only() {
        let mut n = Names::default();
        let members = n.ids(&["m1", "m2", "author", "h1", "m3"]);
        let order = plain(Some(&n.id("author")), &n.ids(&["gone", "h1"]), &members);
        assert_eq!(order, n.ids(&["author", "h1", "m1", "m2", "m3"]));
        // An author not connected is not dialled.
        let order = plain(Some(&n.id("away")), &[], &n.ids(&["m1"]));
        assert_eq!(order, n.ids(&["m1"]));
        // Bounded, holders kept.
        let many: Vec<MemberId> = (0..200).map(|_| MemberId::random()).collect();
        let order = plain(None, &[many[150]], &many);
        assert_eq!(order.len(), MAX_DIALLED);
        assert_eq!(order[0], many[150]);
    }

    /// A zone of `size` members (this node among them) and the content
    /// they fetch: the zone's members, its fetcher for `c(1)`, and one that
    /// is not it.
    fn zone(size: usize) -> (Vec<MemberId>, MemberId, MemberId) {
        let zone: Vec<MemberId> = (0..size).map(|_| MemberId::random()).collect();
        let fetcher = zone_fetcher(&c(1), &zone[0], &zone[1..]);
        let other = zone.iter().copied().find(|m| *m != fetcher).unwrap();
        (zone, fetcher, other)
    }

    fn others(zone: &[MemberId], me: &MemberId) -> Vec<MemberId> {
        zone.iter().filter(|m| *m != me).copied().collect()
    }

    #[test]
    fn every_member_of_a_zone_chooses_the_same_fetcher_and_contents_spread() {
        let (zone, fetcher, _) = zone(5);
        for me in &zone {
            assert_eq!(zone_fetcher(&c(1), me, &others(&zone, me)), fetcher);
            // Only the fetcher fetches across.
            assert_eq!(
                fetches_across(&c(1), me, &others(&zone, me), &[]),
                *me == fetcher
            );
        }
        let mut won = HashSet::new();
        for i in 0..=255u8 {
            won.insert(zone_fetcher(&c(i), &zone[0], &zone[1..]));
        }
        assert_eq!(won.len(), zone.len(), "each member fetches some contents");
        // Alone in its zone, a node fetches everything it reads itself, but
        // not "for the zone": there is nobody to fetch for.
        assert_eq!(zone_fetcher(&c(1), &zone[0], &[]), zone[0]);
        assert!(!fetches_across(&c(1), &zone[0], &[], &[]));
    }

    #[test]
    fn without_a_zone_or_alone_in_it_every_member_is_dialled() {
        let (zone, _, _) = zone(2);
        let other = zone[1];
        let far: Vec<MemberId> = (0..3).map(|_| MemberId::random()).collect();
        let view = ZoneView {
            me: &zone[0],
            in_zone: &[],
        };
        let order = dial_order(&c(1), Some(&far[2]), &[far[1]], &far, Some(view));
        assert_eq!(order.members, vec![far[2], far[1], far[0]]);
        assert!(!order.zone_only);
        // A member of the zone that is not connected does not count.
        let view = ZoneView {
            me: &zone[0],
            in_zone: &[MemberId::random(), other],
        };
        let order = dial_order(&c(1), None, &[], &far, Some(view));
        assert_eq!(order.members, far);
        assert!(!order.zone_only);
    }

    #[test]
    fn the_zones_fetcher_dials_its_zone_first_then_the_others() {
        let (zone, fetcher, _) = zone(4);
        let far: Vec<MemberId> = (0..3).map(|_| MemberId::random()).collect();
        let in_zone = others(&zone, &fetcher);
        let members: Vec<MemberId> = far.iter().chain(&in_zone).copied().collect();
        let view = ZoneView {
            me: &fetcher,
            in_zone: &in_zone,
        };
        // The author and a holder elsewhere come first among the others.
        let order = dial_order(&c(1), Some(&far[2]), &[far[1]], &members, Some(view));
        assert!(!order.zone_only);
        assert_eq!(order.members[..3], in_zone[..]);
        assert_eq!(order.members[3..], [far[2], far[1], far[0]]);
    }

    #[test]
    fn other_members_of_the_zone_dial_it_only_the_fetcher_first() {
        let (zone, fetcher, me) = zone(4);
        let far: Vec<MemberId> = (0..3).map(|_| MemberId::random()).collect();
        let in_zone = others(&zone, &me);
        let members: Vec<MemberId> = far.iter().chain(&in_zone).copied().collect();
        let view = ZoneView {
            me: &me,
            in_zone: &in_zone,
        };
        let order = dial_order(&c(1), Some(&far[0]), &[far[1]], &members, Some(view));
        assert!(order.zone_only);
        assert_eq!(order.members[0], fetcher);
        assert_eq!(order.members.len(), 3);
        assert!(order.members.iter().all(|m| in_zone.contains(m)));
    }

    #[test]
    fn content_held_in_the_zone_is_fetched_within_it_by_everyone() {
        let (zone, fetcher, me) = zone(4);
        let far = MemberId::random();
        let holder = *others(&zone, &fetcher).iter().find(|m| **m != me).unwrap();
        for who in [fetcher, me] {
            let in_zone = others(&zone, &who);
            let members: Vec<MemberId> = std::iter::once(far).chain(in_zone.clone()).collect();
            let view = ZoneView {
                me: &who,
                in_zone: &in_zone,
            };
            // An announced holder in the zone, or the author in it.
            for (first, holders) in [(Some(&far), vec![holder]), (Some(&holder), vec![])] {
                let order = dial_order(&c(1), first, &holders, &members, Some(view));
                assert!(order.zone_only);
                assert_eq!(order.members[0], holder, "the holder first");
                assert!(!order.members.contains(&far));
            }
            assert!(!fetches_across(&c(1), &who, &in_zone, &[holder]));
        }
    }
}
