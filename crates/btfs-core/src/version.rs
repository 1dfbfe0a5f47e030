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
#[derive(Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct VersionVector(BTreeMap<NodeId, u64>);

impl VersionVector {
    pub fn new() -> Self {
        Self::default()
    }

    /// Changes `node` has made (0 if none).
    pub fn get(&self, node: &NodeId) -> u64 {
        self.0.get(node).copied().unwrap_or(0)
    }

    /// Records one more change by `node`.
    pub fn increment(&mut self, node: NodeId) {
        let slot = self.0.entry(node).or_insert(0);
        *slot = slot.saturating_add(1);
    }

    /// By-value form of [`increment`](Self::increment).
    pub fn incremented(mut self, node: NodeId) -> Self {
        self.increment(node);
        self
    }

    /// Entry-wise maximum with `other`.
    pub fn merge(&mut self, other: &VersionVector) {
        for (node, &n) in &other.0 {
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
}
