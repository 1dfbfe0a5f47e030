//! Version vectors: the happened-before relation between versions of a record.

use std::{cmp::Ordering, collections::BTreeMap};

use serde::{Deserialize, Serialize};

use crate::NodeId;

/// A version vector maps each node that ever changed a record to the number of
/// changes it made. It orders versions of one path by causality:
///
/// * `a == b`: the same version.
/// * `a < b`: `b` descends from `a` (`b` saw every change `a` saw, and more).
/// * `a > b`: `a` descends from `b`.
/// * `a.partial_cmp(&b) == None`: concurrent, neither saw the other's changes
///   (a conflict, decided by the merge rules).
///
/// Missing entries count as zero, so the empty vector precedes every other one.
/// [`VersionVector::merge`] takes the entry-wise maximum; it is commutative,
/// associative and idempotent, and the result is at least both inputs.
///
/// Representation: zero counters are never stored by [`increment`] or
/// [`merge`]; a decoded vector may hold anything, so vectors from peers are
/// checked with [`VersionVector::check`] (entries, counters, no zeros).
///
/// [`increment`]: VersionVector::increment
/// [`merge`]: VersionVector::merge
#[derive(Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct VersionVector(BTreeMap<NodeId, u64>);

/// Most entries (nodes that changed a path) a vector from a peer may name.
/// Honest vectors name the nodes that edited one path; a cluster where more
/// than this many nodes edit the same path would see their records refused.
pub const MAX_VERSION_ENTRIES: usize = 64;

/// Largest counter a vector from a peer may hold: far above any honest count
/// (2^48 changes of one path), far below `u64::MAX`, so that an increment of
/// any accepted vector is strictly greater than it (never a saturated tie).
pub const MAX_COUNTER: u64 = 1 << 48;

/// Why a vector from a peer is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum VersionError {
    #[error("the version vector has {0} entries (at most {MAX_VERSION_ENTRIES})")]
    TooManyEntries(usize),
    #[error("a version counter of {0} exceeds {MAX_COUNTER}")]
    CounterTooLarge(u64),
    #[error("the version vector stores a zero counter")]
    ZeroCounter,
}

impl VersionError {
    /// A fixed description, for errors that carry a `&'static str`.
    pub fn reason(self) -> &'static str {
        match self {
            Self::TooManyEntries(_) => "the version vector has too many entries",
            Self::CounterTooLarge(_) => "a version counter exceeds the largest allowed",
            Self::ZeroCounter => "the version vector stores a zero counter",
        }
    }
}

impl VersionVector {
    pub fn new() -> Self {
        Self::default()
    }

    /// Changes `node` has made (0 if none).
    pub fn get(&self, node: &NodeId) -> u64 {
        self.0.get(node).copied().unwrap_or(0)
    }

    /// Records one more change by `node`. The counter saturates at
    /// `u64::MAX` (the result then equals the input in that entry instead of
    /// exceeding it); vectors that passed [`check`](Self::check) hold at most
    /// [`MAX_COUNTER`], so incrementing them always gives a greater vector.
    pub fn increment(&mut self, node: NodeId) {
        let slot = self.0.entry(node).or_insert(0);
        *slot = slot.saturating_add(1);
    }

    /// Makes `node`'s counter exceed `than` by one, in one step, unless it
    /// already does (saturating like [`increment`](Self::increment)).
    pub fn increment_past(&mut self, node: NodeId, than: u64) {
        let slot = self.0.entry(node).or_insert(0);
        *slot = (*slot).max(than.saturating_add(1));
    }

    /// By-value form of [`increment`](Self::increment).
    pub fn incremented(mut self, node: NodeId) -> Self {
        self.increment(node);
        self
    }

    /// Entry-wise maximum with `other` (zero counters of `other` are not
    /// copied).
    pub fn merge(&mut self, other: &VersionVector) {
        for (node, &n) in other.0.iter().filter(|(_, n)| **n > 0) {
            let slot = self.0.entry(*node).or_insert(0);
            *slot = (*slot).max(n);
        }
    }

    /// By-value form of [`merge`](Self::merge).
    pub fn merged(mut self, other: &VersionVector) -> Self {
        self.merge(other);
        self
    }

    /// True if neither vector descends from the other.
    pub fn is_concurrent(&self, other: &VersionVector) -> bool {
        self.partial_cmp(other).is_none()
    }

    /// Iterates `(node, counter)` pairs in node order (zero entries never stored).
    pub fn iter(&self) -> impl Iterator<Item = (&NodeId, &u64)> {
        self.0.iter().filter(|(_, n)| **n > 0)
    }

    pub fn is_empty(&self) -> bool {
        self.0.values().all(|n| *n == 0)
    }

    /// Entries stored, zero counters included (a decoded vector may hold them).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Every node the vector names, zero counters included.
    pub fn nodes(&self) -> impl Iterator<Item = &NodeId> {
        self.0.keys()
    }

    /// Checks what a peer's vector may hold: at most [`MAX_VERSION_ENTRIES`]
    /// entries, none zero, none above [`MAX_COUNTER`].
    pub fn check(&self) -> Result<(), VersionError> {
        if self.0.len() > MAX_VERSION_ENTRIES {
            return Err(VersionError::TooManyEntries(self.0.len()));
        }
        for &n in self.0.values() {
            if n == 0 {
                return Err(VersionError::ZeroCounter);
            }
            if n > MAX_COUNTER {
                return Err(VersionError::CounterTooLarge(n));
            }
        }
        Ok(())
    }
}

impl PartialOrd for VersionVector {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        let mut less = false;
        let mut greater = false;
        for node in self.0.keys().chain(other.0.keys()) {
            match self.get(node).cmp(&other.get(node)) {
                Ordering::Less => less = true,
                Ordering::Greater => greater = true,
                Ordering::Equal => {}
            }
            if less && greater {
                return None;
            }
        }
        Some(match (less, greater) {
            (false, false) => Ordering::Equal,
            (true, false) => Ordering::Less,
            _ => Ordering::Greater,
        })
    }
}

impl std::fmt::Debug for VersionVector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map()
            .entries(self.iter().map(|(k, v)| (k.short(), v)))
            .finish()
    }
}

/// Builds a [`VersionVector`] in tests: `vv![a => 1, b => 2]`.
#[cfg(test)]
macro_rules! vv {
    ($($node:expr => $n:expr),* $(,)?) => {{
        #[allow(unused_mut)]
        let mut v = VersionVector::new();
        $( for _ in 0..$n { v.increment($node); } )*
        v
    }};
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn node(i: u8) -> NodeId {
        NodeId([i; 32])
    }

    #[test]
    fn orders_by_causality() {
        let (a, b) = (node(1), node(2));
        assert_eq!(vv![].partial_cmp(&vv![]), Some(Ordering::Equal));
        assert!(vv![] < vv![a => 1]);
        assert!(vv![a => 1] < vv![a => 2]);
        assert!(vv![a => 1] < vv![a => 1, b => 1]);
        assert!(vv![a => 2, b => 1] > vv![a => 1, b => 1]);
        assert!(vv![a => 1].is_concurrent(&vv![b => 1]));
        assert!(vv![a => 2, b => 1].is_concurrent(&vv![a => 1, b => 2]));
        assert_eq!(vv![a => 1].merged(&vv![b => 1]), vv![a => 1, b => 1]);
    }

    fn arb_vv() -> impl Strategy<Value = VersionVector> {
        proptest::collection::btree_map(0u8..4, 0u64..4, 0..4).prop_map(|m| {
            let mut v = VersionVector::new();
            for (n, c) in m {
                for _ in 0..c {
                    v.increment(node(n));
                }
            }
            v
        })
    }

    #[test]
    fn check_refuses_oversized_vectors_inflated_counters_and_zeros() {
        let a = node(1);
        assert_eq!(vv![a => 3].check(), Ok(()));
        let mut wide = VersionVector::new();
        for i in 0..=MAX_VERSION_ENTRIES {
            let mut id = [0; 32];
            id[..8].copy_from_slice(&(i as u64).to_be_bytes());
            wide.increment(NodeId(id));
        }
        assert_eq!(
            wide.check(),
            Err(VersionError::TooManyEntries(MAX_VERSION_ENTRIES + 1))
        );
        let at_cap = VersionVector(BTreeMap::from([(a, MAX_COUNTER)]));
        assert_eq!(at_cap.check(), Ok(()));
        assert!(
            at_cap.clone().incremented(a) > at_cap,
            "an increment of an accepted vector is greater"
        );
        let inflated = VersionVector(BTreeMap::from([(a, MAX_COUNTER + 1)]));
        assert_eq!(
            inflated.check(),
            Err(VersionError::CounterTooLarge(MAX_COUNTER + 1))
        );
        let zero = VersionVector(BTreeMap::from([(a, 0)]));
        assert_eq!(zero.check(), Err(VersionError::ZeroCounter));
        assert_eq!(vv![].merged(&zero).len(), 0, "merge copies no zero counter");
    }

    #[test]
    fn increment_saturates_at_u64_max() {
        let a = node(1);
        let full = VersionVector(BTreeMap::from([(a, u64::MAX)]));
        assert_eq!(full.clone().incremented(a), full);
        assert_eq!(full.clone().merged(&vv![a => 2]), full);
    }

    proptest! {
        #[test]
        fn merge_is_commutative_associative_idempotent(a in arb_vv(), b in arb_vv(), c in arb_vv()) {
            prop_assert_eq!(a.clone().merged(&b), b.clone().merged(&a));
            prop_assert_eq!(a.clone().merged(&b).merged(&c), a.clone().merged(&b.clone().merged(&c)));
            prop_assert_eq!(a.clone().merged(&a), a.clone());
        }

        #[test]
        fn merge_is_an_upper_bound(a in arb_vv(), b in arb_vv()) {
            let m = a.clone().merged(&b);
            prop_assert!(m >= a && m >= b);
        }

        #[test]
        fn order_is_antisymmetric_and_increment_dominates(a in arb_vv(), b in arb_vv(), n in 0u8..4) {
            let ab = a.partial_cmp(&b);
            prop_assert_eq!(ab.map(Ordering::reverse), b.partial_cmp(&a));
            prop_assert!(a.clone().incremented(node(n)) > a);
        }
    }

    #[test]
    fn increment_past_takes_one_step_however_far() {
        let a = NodeId([1; 32]);
        let mut v = VersionVector::new().incremented(a);
        v.increment_past(a, 1 << 47);
        assert_eq!(v.get(&a), (1 << 47) + 1);
        v.increment_past(a, 3);
        assert_eq!(v.get(&a), (1 << 47) + 1, "never lowers a counter");
        v.increment_past(a, u64::MAX);
        assert_eq!(v.get(&a), u64::MAX);
    }
}
