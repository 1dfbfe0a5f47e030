//! Merging replicated records: what a node keeps for a path, and what it shows.
//!
//! A node keeps, per path, the *maximal* versions it knows ([`Versions`]): the
//! records that no other known record of that path descends from. Adding a
//! record is a join on this set (commutative, associative, idempotent), so two
//! nodes that have received the same records hold the same `Versions`, whatever
//! the order, duplication or delay of delivery. What a path shows is a pure
//! function of its `Versions` ([`resolve`]), so such nodes also show the same
//! names with the same contents.
//!
//! Rules of [`resolve`] when a path has concurrent versions:
//! * A live version beats a tombstone: a modification survives a delete.
//! * A directory beats a file or symlink; concurrent directory versions need no
//!   copy (their entries merge path by path).
//! * A version whose edit started from another's content (`prev_content`)
//!   supersedes that content: no conflict.
//! * Otherwise the newest version wins (mtime, then the larger author id, then
//!   the rest of the record, for a total order). Every other version with
//!   different data is shown as a conflict copy
//!   `NAME.btfs-conflict-YYYYMMDD-HHMMSS-<author8>.EXT` (its own mtime, UTC, and
//!   author), except when the path is itself a conflict copy: never a copy of a
//!   copy.
//!
//! A conflict copy is *derived*, not a stored record: every node computes the
//! same one. A node that edits a conflicted path must first store its copies as
//! records of their own, because the edit descends from every version and so
//! ends the conflict (see [`Versions::joined_version`]).
//!
//! ## The cap on concurrent versions
//!
//! A path keeps at most [`MAX_VERSIONS`] versions: honest concurrency is one
//! or two versions per node that edited the path while apart, but a member can
//! sign any number of pairwise concurrent vectors. Past the cap the version
//! evicted is the lowest-ranked one of the author that has the most versions
//! (its *fair share* is exceeded first), so one author's flood evicts only its
//! own versions while other authors keep theirs; [`Versions::insert_keeping`]
//! also never evicts the local node's newest version. The eviction order of
//! a set depends only on the set (not on arrival order), so nodes that receive
//! the same concurrent versions keep the same ones. (A version that an evicted
//! one descends from may still be kept where it arrived after the eviction;
//! honest paths stay far below the cap, where none of this applies.)

use std::cmp::Ordering;

use crate::{FileKind, FileRecord, NodeId, RelPath, Timestamp, VersionVector};

/// Most versions kept for one path (maximal versions that are pairwise
/// concurrent). Also the most records anti-entropy sends for one path.
pub const MAX_VERSIONS: usize = 32;

/// The maximal versions of one path, in a canonical order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Versions(Vec<FileRecord>);

/// A total order on records: newest first by mtime, then author, then every
/// other field. Deterministic on every node.
fn rank(a: &FileRecord, b: &FileRecord) -> Ordering {
    let vv = |r: &FileRecord| r.version.iter().map(|(n, c)| (*n, *c)).collect::<Vec<_>>();
    a.mtime
        .cmp(&b.mtime)
        .then_with(|| a.author.cmp(&b.author))
        .then_with(|| a.content.cmp(&b.content))
        .then_with(|| a.kind.cmp(&b.kind))
        .then_with(|| a.deleted.cmp(&b.deleted))
        .then_with(|| a.size.cmp(&b.size))
        .then_with(|| (a.mode, a.uid, a.gid).cmp(&(b.mode, b.uid, b.gid)))
        .then_with(|| a.target.cmp(&b.target))
        .then_with(|| a.prev_content.cmp(&b.prev_content))
        .then_with(|| (a.atime, a.ctime).cmp(&(b.atime, b.ctime)))
        .then_with(|| vv(a).cmp(&vv(b)))
}

impl Versions {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn records(&self) -> &[FileRecord] {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// More than one maximal version: the path is in conflict (or a delete
    /// raced a modification).
    pub fn is_concurrent(&self) -> bool {
        self.0.len() > 1
    }

    /// Adds a record. Returns false if it changed nothing (already known, a
    /// known version descends from it, or it is evicted at once by the cap on
    /// versions, see the module docs).
    pub fn insert(&mut self, r: FileRecord) -> bool {
        self.insert_capped(r, None)
    }

    /// [`insert`](Self::insert) on the node `local`: the cap never evicts
    /// `local`'s newest version (its own edit is never lost to a flood of
    /// concurrent versions).
    pub fn insert_keeping(&mut self, r: FileRecord, local: &NodeId) -> bool {
        self.insert_capped(r, Some(local))
    }

    fn insert_capped(&mut self, r: FileRecord, local: Option<&NodeId>) -> bool {
        if self.0.iter().any(|e| *e == r || e.version > r.version) {
            return false;
        }
        let before = self.0.len();
        self.0
            .retain(|e| e.version.partial_cmp(&r.version) != Some(Ordering::Less));
        let superseded = self.0.len() < before;
        let mut at = Some(self.0.partition_point(|e| rank(e, &r) == Ordering::Less));
        if let Some(i) = at {
            self.0.insert(i, r);
        }
        let mut evicted = 0;
        while self.0.len() > MAX_VERSIONS {
            let Some(victim) = self.victim(local) else {
                break;
            };
            self.0.remove(victim);
            evicted += 1;
            at = match at {
                Some(i) if i == victim => None,
                Some(i) if victim < i => Some(i - 1),
                other => other,
            };
        }
        superseded || at.is_some() || evicted > 1
    }

    /// The version the cap evicts first: the one with the most versions of
    /// its author ranked above it (the lowest of the author with the most),
    /// then the lowest-ranked; never `local`'s newest. `None` if only that
    /// one is left.
    fn victim(&self, local: Option<&NodeId>) -> Option<usize> {
        let mut worst: Option<(usize, usize)> = None;
        for (i, r) in self.0.iter().enumerate() {
            // Same-author versions ranked above (the vector is in rank order).
            let above = self.0[i + 1..]
                .iter()
                .filter(|o| o.author == r.author)
                .count();
            if above == 0 && local == Some(&r.author) {
                continue;
            }
            // Strictly more: among equals the first, lowest-ranked, one wins.
            if worst.is_none_or(|(_, n)| above > n) {
                worst = Some((i, above));
            }
        }
        worst.map(|(i, _)| i)
    }

    /// Adds every record of `other`.
    pub fn merge(&mut self, other: &Versions) {
        for r in &other.0 {
            self.insert(r.clone());
        }
    }

    /// The version vector that descends from every version: a local edit of
    /// this path extends it (and so supersedes all of them).
    pub fn joined_version(&self) -> VersionVector {
        self.0
            .iter()
            .fold(VersionVector::new(), |v, r| v.merged(&r.version))
    }
}

impl FromIterator<FileRecord> for Versions {
    fn from_iter<I: IntoIterator<Item = FileRecord>>(iter: I) -> Self {
        let mut v = Versions::new();
        for r in iter {
            v.insert(r);
        }
        v
    }
}

/// What one path shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolution<'a> {
    /// The version shown at the path; `None` if it is deleted.
    pub shown: Option<&'a FileRecord>,
    /// Losing versions, each shown under its conflict-copy name (a sibling of
    /// the path).
    pub copies: Vec<(String, &'a FileRecord)>,
}

/// Decides what `path` shows, given its maximal versions.
pub fn resolve<'a>(path: &RelPath, versions: &'a Versions) -> Resolution<'a> {
    let live: Vec<&FileRecord> = versions.0.iter().filter(|r| r.is_live()).collect();
    // Versions whose content another live version's edit started from are
    // superseded by it (unless that leaves nothing: edits that undo each other).
    let superseded = |r: &FileRecord| {
        live.iter().any(|o| {
            o.prev_content.is_some() && o.prev_content == r.content && o.content != r.content
        })
    };
    let mut candidates: Vec<&FileRecord> =
        live.iter().copied().filter(|r| !superseded(r)).collect();
    if candidates.is_empty() {
        candidates = live;
    }
    let winner = candidates.iter().copied().max_by(|a, b| {
        let dir = |r: &FileRecord| r.kind == FileKind::Dir;
        dir(a).cmp(&dir(b)).then_with(|| rank(a, b))
    });
    let Some(winner) = winner else {
        return Resolution {
            shown: None,
            copies: Vec::new(),
        };
    };
    let mut copies: Vec<(String, &FileRecord)> = Vec::new();
    if let Some(name) = path.file_name().filter(|n| !is_conflict_copy(n)) {
        for r in candidates.iter().copied().filter(|r| *r != winner) {
            let same_data =
                r.kind == winner.kind && r.content == winner.content && r.target == winner.target;
            if r.kind == FileKind::Dir || same_data {
                continue;
            }
            let copy = conflict_copy_name(name, r);
            if !copies.iter().any(|(n, _)| *n == copy) {
                copies.push((copy, r));
            }
        }
    }
    Resolution {
        shown: Some(winner),
        copies,
    }
}

const MARK: &str = ".btfs-conflict-";

/// `report.txt` lost by `loser` -> `report.btfs-conflict-20261121-093000-1a2b3c4d.txt`.
/// A leading dot is part of the stem (`.bashrc.btfs-conflict-…`).
pub fn conflict_copy_name(name: &str, loser: &FileRecord) -> String {
    let (stem, ext) = match name.rfind('.') {
        Some(i) if i > 0 => (&name[..i], &name[i..]),
        _ => (name, ""),
    };
    let (date, time) = utc(loser.mtime);
    let mut out = format!("{stem}{MARK}{date}-{time}-{}{ext}", loser.author.short());
    // Keep within the name limit by trimming the stem, never the marker.
    while out.len() > crate::MAX_NAME_LEN && !stem.is_empty() {
        let cut = stem.len().saturating_sub(out.len() - crate::MAX_NAME_LEN);
        let cut = (0..=cut)
            .rev()
            .find(|i| stem.is_char_boundary(*i))
            .unwrap_or(0);
        out = format!(
            "{}{MARK}{date}-{time}-{}{ext}",
            &stem[..cut],
            loser.author.short()
        );
        if cut == 0 {
            break;
        }
    }
    out
}

/// True for names made by [`conflict_copy_name`].
pub fn is_conflict_copy(name: &str) -> bool {
    let Some(at) = name.find(MARK) else {
        return false;
    };
    let tail = &name.as_bytes()[at + MARK.len()..];
    tail.len() >= 24
        && tail[..8].iter().all(u8::is_ascii_digit)
        && tail[8] == b'-'
        && tail[9..15].iter().all(u8::is_ascii_digit)
        && tail[15] == b'-'
        && tail[16..24].iter().all(u8::is_ascii_hexdigit)
}

/// `YYYYMMDD` and `HHMMSS` of a timestamp, in UTC (proleptic Gregorian).
fn utc(t: Timestamp) -> (String, String) {
    let days = t.secs.div_euclid(86_400);
    let secs = t.secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (
        format!("{year:04}{month:02}{day:02}"),
        format!("{:02}{:02}{:02}", secs / 3600, secs / 60 % 60, secs % 60),
    )
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::{ContentId, NodeId, Owner};

    const OWNER: Owner = Owner {
        mode: 0o644,
        uid: 0,
        gid: 0,
    };

    fn node(i: u8) -> NodeId {
        NodeId([i; 32])
    }

    fn at(secs: i64) -> Timestamp {
        Timestamp { secs, nanos: 0 }
    }

    fn file(author: u8, secs: i64, data: &[u8]) -> FileRecord {
        let mut r = FileRecord::new_file(OWNER, node(author), at(secs));
        r.content = Some(ContentId::of(data));
        r
    }

    fn edit(base: &FileRecord, author: u8, secs: i64, data: &[u8]) -> FileRecord {
        let mut r = base.next_version(node(author), at(secs));
        r.content = Some(ContentId::of(data));
        r.mtime = at(secs);
        r
    }

    fn p(s: &str) -> RelPath {
        RelPath::parse(s).unwrap()
    }

    #[test]
    fn names_of_conflict_copies() {
        let r = file(0xab, 1_763_717_400, b"x"); // 2025-11-21 09:30:00 UTC
        for (name, copy) in [
            (
                "report.txt",
                "report.btfs-conflict-20251121-093000-abababab.txt",
            ),
            (
                "Makefile",
                "Makefile.btfs-conflict-20251121-093000-abababab",
            ),
            (".bashrc", ".bashrc.btfs-conflict-20251121-093000-abababab"),
            (
                "a.tar.gz",
                "a.tar.btfs-conflict-20251121-093000-abababab.gz",
            ),
        ] {
            assert_eq!(conflict_copy_name(name, &r), copy);
        }
        assert!(is_conflict_copy(&conflict_copy_name("report.txt", &r)));
        assert!(!is_conflict_copy("report.txt"));
        assert!(!is_conflict_copy("x.btfs-conflict-2025"));
        let long = "n".repeat(250) + ".txt";
        let copy = conflict_copy_name(&long, &r);
        assert!(copy.len() <= crate::MAX_NAME_LEN && is_conflict_copy(&copy));
        assert_eq!(utc(at(0)), ("19700101".into(), "000000".into()));
        assert_eq!(utc(at(-1)), ("19691231".into(), "235959".into()));
        assert_eq!(utc(at(951_782_400)), ("20000229".into(), "000000".into()));
    }

    #[test]
    fn descendants_replace_ancestors_and_concurrent_edits_conflict() {
        let base = file(1, 100, b"v1");
        let a = edit(&base, 1, 200, b"from a");
        let b = edit(&base, 2, 300, b"from b");
        let v: Versions = [base.clone(), a.clone()].into_iter().collect();
        assert_eq!(
            v.records(),
            std::slice::from_ref(&a),
            "a descends from base"
        );

        let v: Versions = [a.clone(), b.clone(), base].into_iter().collect();
        assert!(v.is_concurrent());
        let res = resolve(&p("d/report.txt"), &v);
        assert_eq!(res.shown, Some(&b), "newer mtime wins");
        assert_eq!(res.copies.len(), 1);
        assert_eq!(res.copies[0].1, &a);
        assert!(
            res.copies[0].0.starts_with("report.btfs-conflict-")
                && res.copies[0].0.ends_with(".txt")
        );

        // A copy of a copy is never made.
        let res = resolve(&p(&res.copies[0].0.clone()), &v);
        assert!(res.copies.is_empty());

        // An edit descending from both ends the conflict.
        let mut merged = v.clone();
        let mut fix = edit(&b, 1, 400, b"merged");
        fix.version = v.joined_version().incremented(node(1));
        merged.insert(fix.clone());
        assert_eq!(merged.records(), [fix]);
    }

    #[test]
    fn modification_survives_delete_and_started_from_is_not_a_conflict() {
        let base = file(1, 100, b"v1");
        let deleted = base.tombstone(node(1), at(500));
        let modified = edit(&base, 2, 200, b"v2");
        let v: Versions = [deleted.clone(), modified.clone()].into_iter().collect();
        let res = resolve(&p("f"), &v);
        assert_eq!(res.shown, Some(&modified));
        assert!(res.copies.is_empty());
        let gone: Versions = [deleted].into_iter().collect();
        assert_eq!(resolve(&p("f"), &gone).shown, None);

        // A chmod on one node, a content edit on another that started from the
        // same content: the edit supersedes, no copy.
        let mut chmod = base.next_version(node(1), at(300));
        chmod.mode = 0o600;
        chmod.mtime = at(300);
        let content_edit = edit(&base, 2, 200, b"v2");
        let v: Versions = [chmod, content_edit.clone()].into_iter().collect();
        assert!(v.is_concurrent());
        let res = resolve(&p("f"), &v);
        assert_eq!(
            res.shown,
            Some(&content_edit),
            "the edit builds on the chmod's content"
        );
        assert!(res.copies.is_empty(), "{:?}", res.copies);
    }

    #[test]
    fn a_directory_beats_a_file_which_becomes_a_copy() {
        let dir = FileRecord::new_dir(OWNER, node(1), at(100));
        let f = file(2, 900, b"data");
        let v: Versions = [dir.clone(), f.clone()].into_iter().collect();
        let res = resolve(&p("x"), &v);
        assert_eq!(res.shown, Some(&dir));
        assert_eq!(res.copies, vec![(conflict_copy_name("x", &f), &f)]);
    }

    /// A version by `author` concurrent with every other one made by this
    /// helper with another `k` (or another author): `{author: k, Z: 1000 - k}`.
    fn concurrent(author: u8, k: u64, secs: i64) -> FileRecord {
        let mut r = file(author, secs, &[author, k as u8]);
        let mut v = VersionVector::new();
        for _ in 0..k {
            v.increment(node(author));
        }
        for _ in 0..(1000 - k) {
            v.increment(node(0xee));
        }
        r.version = v;
        r
    }

    #[test]
    fn a_flood_of_concurrent_versions_is_capped_and_other_authors_keep_theirs() {
        let honest = [concurrent(1, 500, 100), concurrent(2, 500, 90)];
        // The flood ranks above everything (mtimes in the future).
        let flood: Vec<FileRecord> = (1..=MAX_VERSIONS as u64 + 20)
            .map(|k| concurrent(9, k, 10_000 + k as i64))
            .collect();
        let forward: Versions = honest.iter().chain(&flood).cloned().collect();
        let backward: Versions = flood.iter().rev().chain(&honest).cloned().collect();
        assert_eq!(forward.records().len(), MAX_VERSIONS);
        assert_eq!(forward, backward, "arrival order does not matter");
        for h in &honest {
            assert!(forward.records().contains(h), "{h:?} was evicted");
        }
        // The flood's newest versions are the ones kept.
        assert!(forward.records().contains(flood.last().unwrap()));
        assert!(!forward.records().contains(&flood[0]));
        // A flood version evicted at once changes nothing.
        let mut v = forward.clone();
        assert!(!v.insert(concurrent(9, 999, 10_000)));
        assert_eq!(v, forward);
    }

    #[test]
    fn the_local_nodes_newest_version_is_never_evicted() {
        // As many authors as the cap allows and more, one version each, all
        // newer than the local node's version.
        let local = concurrent(1, 500, 1);
        let others: Vec<FileRecord> = (2..=MAX_VERSIONS as u8 + 10)
            .map(|a| concurrent(a, 500, 1_000 + i64::from(a)))
            .collect();
        let mut plain = Versions::new();
        let mut kept = Versions::new();
        for r in std::iter::once(&local).chain(&others) {
            plain.insert(r.clone());
            kept.insert_keeping(r.clone(), &node(1));
        }
        assert_eq!(plain.records().len(), MAX_VERSIONS);
        assert_eq!(kept.records().len(), MAX_VERSIONS);
        assert!(!plain.records().contains(&local), "lowest-ranked: evicted");
        assert!(kept.records().contains(&local), "the local version stays");
        // Its older versions are not protected, only the newest.
        let newer_local = concurrent(1, 501, 2);
        assert!(kept.insert_keeping(newer_local.clone(), &node(1)));
        assert!(kept.records().contains(&newer_local) && !kept.records().contains(&local));
    }

    proptest! {
        #[test]
        fn capped_versions_do_not_depend_on_arrival_order(
            picks in proptest::collection::vec((1u8..6, 1u64..200, 0i64..50), 0..80),
            seed in any::<u64>(),
            local in 1u8..6,
        ) {
            let records: Vec<FileRecord> = picks.iter().map(|&(a, k, t)| concurrent(a, k, t)).collect();
            let mut shuffled = records.clone();
            let mut x = seed | 1;
            for i in (1..shuffled.len()).rev() {
                x ^= x << 13; x ^= x >> 7; x ^= x << 17;
                shuffled.swap(i, (x % (i as u64 + 1)) as usize);
            }
            let a: Versions = records.iter().cloned().collect();
            let b: Versions = shuffled.iter().cloned().collect();
            prop_assert!(a.records().len() <= MAX_VERSIONS);
            prop_assert_eq!(&a, &b);
            let (mut c, mut d) = (Versions::new(), Versions::new());
            for r in &records { c.insert_keeping(r.clone(), &node(local)); }
            for r in &shuffled { d.insert_keeping(r.clone(), &node(local)); }
            prop_assert_eq!(&c, &d);
            // The local node's newest version (by rank) is kept.
            let newest_local = records.iter().filter(|r| r.author == node(local))
                .max_by(|x, y| rank(x, y));
            if let Some(n) = newest_local {
                prop_assert!(c.records().contains(n));
            }
        }
    }

    /// Histories of edits by three nodes that sync at random: every record
    /// they produce, in production order.
    fn arb_history() -> impl Strategy<Value = Vec<FileRecord>> {
        #[derive(Debug, Clone)]
        enum Step {
            Edit(u8, u8),
            Delete(u8),
            Sync(u8, u8),
        }
        let step = prop_oneof![
            4 => (0u8..3, 0u8..4).prop_map(|(n, d)| Step::Edit(n, d)),
            1 => (0u8..3).prop_map(Step::Delete),
            3 => (0u8..3, 0u8..3).prop_map(|(a, b)| Step::Sync(a, b)),
        ];
        proptest::collection::vec(step, 1..24).prop_map(|steps| {
            let base = file(0, 1, b"base");
            let mut views: Vec<Versions> = (0..3)
                .map(|_| [base.clone()].into_iter().collect())
                .collect();
            let mut out = vec![base];
            for (t, s) in steps.into_iter().enumerate() {
                let t = 10 + t as i64;
                match s {
                    Step::Edit(n, d) => {
                        let v = &mut views[n as usize];
                        let last = v.records().last().cloned().unwrap();
                        let mut r = edit(&last, n + 1, t, &[d]);
                        r.version = v.joined_version().incremented(node(n + 1));
                        v.insert(r.clone());
                        out.push(r);
                    }
                    Step::Delete(n) => {
                        let v = &mut views[n as usize];
                        let last = v.records().last().cloned().unwrap();
                        let mut r = last.tombstone(node(n + 1), at(t));
                        r.version = v.joined_version().incremented(node(n + 1));
                        v.insert(r.clone());
                        out.push(r);
                    }
                    Step::Sync(a, b) => {
                        let from = views[a as usize].clone();
                        views[b as usize].merge(&from);
                    }
                }
            }
            out
        })
    }

    proptest! {
        #[test]
        fn any_delivery_order_with_duplicates_gives_the_same_result(
            history in arb_history(),
            seed in any::<u64>(),
        ) {
            let reference: Versions = history.iter().cloned().collect();
            // Shuffle and duplicate deterministically from the seed.
            let mut delivered: Vec<FileRecord> = history.iter().chain(history.iter().step_by(2)).cloned().collect();
            let mut x = seed | 1;
            for i in (1..delivered.len()).rev() {
                x ^= x << 13; x ^= x >> 7; x ^= x << 17;
                delivered.swap(i, (x % (i as u64 + 1)) as usize);
            }
            let other: Versions = delivered.into_iter().collect();
            prop_assert_eq!(&other, &reference);
            let path = p("dir/file.txt");
            prop_assert_eq!(resolve(&path, &other), resolve(&path, &reference));
        }

        #[test]
        fn merge_is_commutative_associative_idempotent(
            h in arb_history(), split1 in 0usize..30, split2 in 0usize..30,
        ) {
            let n = h.len();
            let (i, j) = (split1.min(n), split2.min(n));
            let (lo, hi) = (i.min(j), i.max(j));
            let a: Versions = h[..lo].iter().cloned().collect();
            let b: Versions = h[lo..hi].iter().cloned().collect();
            let c: Versions = h[hi..].iter().cloned().collect();
            let mut ab = a.clone(); ab.merge(&b);
            let mut ba = b.clone(); ba.merge(&a);
            prop_assert_eq!(&ab, &ba);
            let mut ab_c = ab.clone(); ab_c.merge(&c);
            let mut bc = b.clone(); bc.merge(&c);
            let mut a_bc = a.clone(); a_bc.merge(&bc);
            prop_assert_eq!(&ab_c, &a_bc);
            let mut aa = a.clone(); aa.merge(&a);
            prop_assert_eq!(aa, a);
        }

        #[test]
        fn no_live_version_disappears(history in arb_history()) {
            let v: Versions = history.into_iter().collect();
            let path = p("file.txt");
            let res = resolve(&path, &v);
            let live: Vec<_> = v.records().iter().filter(|r| r.is_live()).collect();
            if !live.is_empty() {
                prop_assert!(res.shown.is_some(), "a live version always shows");
            }
            for r in live {
                let shown = res.shown.is_some_and(|s| s.content == r.content);
                let copied = res.copies.iter().any(|(_, c)| c.content == r.content);
                let superseded = v.records().iter().any(|o| o.is_live() && o.prev_content.is_some() && o.prev_content == r.content);
                prop_assert!(shown || copied || superseded, "version lost: {r:?}");
            }
        }
    }
}
