//! What members announced they hold: remembered as hints for finding peers
//! (the order a torrent dials members in) and for eviction (content another
//! member holds may go), and this node's own announcements.

use std::{
    collections::{HashMap, VecDeque},
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

/// The members a torrent dials, in order: the author, then the members that
/// announced holding the content, then the others; connected ones only, at
/// most `MAX_DIALLED`.
pub(super) fn dial_order(
    first: Option<&MemberId>,
    holders: &[MemberId],
    members: &[MemberId],
) -> Vec<MemberId> {
    let mut out: Vec<MemberId> = Vec::new();
    for m in first.into_iter().chain(holders).chain(members) {
        if out.len() == MAX_DIALLED {
            break;
        }
        if members.contains(m) && !out.contains(m) {
            out.push(*m);
        }
    }
    out
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

    #[test]
    fn dial_order_is_author_then_holders_then_the_rest_connected_only() {
        let mut n = Names::default();
        let members = n.ids(&["m1", "m2", "author", "h1", "m3"]);
        let order = dial_order(Some(&n.id("author")), &n.ids(&["gone", "h1"]), &members);
        assert_eq!(order, n.ids(&["author", "h1", "m1", "m2", "m3"]));
        // An author not connected is not dialled.
        let order = dial_order(Some(&n.id("away")), &[], &n.ids(&["m1"]));
        assert_eq!(order, n.ids(&["m1"]));
        // Bounded, holders kept.
        let many: Vec<MemberId> = (0..200).map(|_| MemberId::random()).collect();
        let order = dial_order(None, &[many[150]], &many);
        assert_eq!(order.len(), MAX_DIALLED);
        assert_eq!(order[0], many[150]);
    }
}
