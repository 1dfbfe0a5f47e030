//! Holdings: which content each member holds in full, gossiped on a topic
//! of its own so that readers ask the members that have the bytes first.

use std::{collections::HashSet, time::Duration};

use btfs_core::ContentId;
use btfs_mesh::{MeshError, Topic};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::transport::Transport;

/// A holdings announcement: content the sender now holds in full, and
/// content it no longer holds. Gossiped on its own topic; the sender is the
/// (signed) gossip source.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct Holdings {
    pub held: Vec<ContentId>,
    pub dropped: Vec<ContentId>,
    /// When it was sent (ms since the epoch): gossipsub drops a payload it
    /// has seen, and an announcement repeated for a new member is the same
    /// list.
    pub at: u64,
}

/// A change to this node's holdings: (now held, no longer held).
pub(crate) type Change = (Vec<ContentId>, Vec<ContentId>);

/// Content ids one holdings message carries at most (32 KiB of ids).
pub(crate) const MAX_HOLDINGS: usize = 1024;
/// The bytes of the largest holdings message (ids, lengths and time).
const MAX_HOLDINGS_BYTES: usize = MAX_HOLDINGS * 32 + 64;
/// Holdings changes waiting to be gossiped; more are dropped (they are
/// hints: readers fall back to every member).
pub(crate) const HOLDINGS_QUEUE: usize = 1024;
/// Holdings changes waiting in the gossip task at most; beyond, new ones are
/// dropped with a log line (hints again).
const MAX_PENDING_HOLDINGS: usize = 200_000;
/// Least time between two holdings messages.
const HOLDINGS_PACE: Duration = Duration::from_millis(100);
/// When a member comes up, this node announces all it holds this much later:
/// time for gossipsub to learn the member's subscriptions, and for members
/// coming up together (a cluster restarting) to share one announcement.
pub(crate) const HOLDINGS_SETTLE: Duration = Duration::from_secs(2);

/// Why a member's holdings message was refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HoldingsError {
    #[error("holdings message of {0} bytes")]
    TooLarge(usize),
    #[error("malformed holdings")]
    Malformed(#[source] postcard::Error),
    #[error("holdings message with more than {MAX_HOLDINGS} entries")]
    TooMany,
}

impl Holdings {
    pub(crate) fn is_empty(&self) -> bool {
        self.held.is_empty() && self.dropped.is_empty()
    }

    /// Adds a change; the latest word on a content id wins. Past
    /// `MAX_PENDING_HOLDINGS` the change is dropped.
    pub(crate) fn add(&mut self, (held, dropped): Change) {
        if self.held.len() + self.dropped.len() + held.len() + dropped.len() > MAX_PENDING_HOLDINGS
        {
            return debug!(
                held = held.len(),
                dropped = dropped.len(),
                "holdings backlog full: a change is not announced"
            );
        }
        if !dropped.is_empty() {
            let gone: HashSet<&ContentId> = dropped.iter().collect();
            self.held.retain(|c| !gone.contains(c));
        }
        if !held.is_empty() && !self.dropped.is_empty() {
            let back: HashSet<&ContentId> = held.iter().collect();
            self.dropped.retain(|c| !back.contains(c));
        }
        self.held.extend(held);
        self.dropped.extend(dropped);
    }

    /// Takes at most `n` entries off the front.
    pub(crate) fn take(&mut self, n: usize) -> Holdings {
        let h = self.held.len().min(n);
        let d = self.dropped.len().min(n - h);
        Holdings {
            held: self.held.drain(..h).collect(),
            dropped: self.dropped.drain(..d).collect(),
            at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
        }
    }

    /// Decodes a member's holdings message: bytes bounded first (postcard
    /// allocates no more than the input holds), then the entry count.
    pub(crate) fn decode(bytes: &[u8]) -> Result<Self, HoldingsError> {
        if bytes.len() > MAX_HOLDINGS_BYTES {
            return Err(HoldingsError::TooLarge(bytes.len()));
        }
        let h: Holdings = postcard::from_bytes(bytes).map_err(HoldingsError::Malformed)?;
        if h.held.len() + h.dropped.len() > MAX_HOLDINGS {
            return Err(HoldingsError::TooMany);
        }
        Ok(h)
    }
}

/// Gossips this node's holdings changes in paced messages of at most
/// `MAX_HOLDINGS` entries (a long list, such as all a node holds when a
/// member joins, goes out over several).
pub(crate) async fn holdings_loop<T: Transport>(
    net: T,
    mut changes: mpsc::Receiver<Change>,
    cancel: CancellationToken,
) {
    let mut pace = tokio::time::interval(HOLDINGS_PACE);
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pending = Holdings::default();
    loop {
        if pending.is_empty() {
            let next = tokio::select! {
                c = changes.recv() => c,
                () = cancel.cancelled() => None,
            };
            match next {
                Some(c) => pending.add(c),
                None => return,
            }
        }
        tokio::select! {
            _ = pace.tick() => {}
            () = cancel.cancelled() => return,
        }
        while let Ok(c) = changes.try_recv() {
            pending.add(c);
        }
        let Ok(bytes) = postcard::to_allocvec(&pending.take(MAX_HOLDINGS)) else {
            continue;
        };
        match net.publish(Topic::Holdings, bytes).await {
            Ok(()) | Err(MeshError::NoPeers) => {}
            Err(e) => debug!("holdings gossip failed: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(n: u8) -> ContentId {
        ContentId([n; 32])
    }

    #[test]
    fn holdings_keep_the_latest_word_and_go_out_in_bounded_messages() {
        let mut h = Holdings::default();
        h.add((vec![c(1), c(2)], vec![]));
        h.add((vec![], vec![c(1)]));
        h.add((vec![c(3)], vec![]));
        assert_eq!(h.held, vec![c(2), c(3)]);
        assert_eq!(h.dropped, vec![c(1)]);
        h.add((vec![c(1)], vec![]));
        assert!(h.dropped.is_empty(), "held again after the drop");

        let mut big = Holdings::default();
        big.add(((0..=255u8).cycle().take(2500).map(c).collect(), vec![c(9)]));
        let mut sent = 0;
        while !big.is_empty() {
            let msg = big.take(MAX_HOLDINGS);
            let bytes = postcard::to_allocvec(&msg).unwrap();
            assert!(bytes.len() <= btfs_mesh::MAX_GOSSIP);
            let back = Holdings::decode(&bytes).unwrap();
            sent += back.held.len() + back.dropped.len();
        }
        assert_eq!(sent, 2501);
        let too_many = Holdings {
            held: vec![c(0); MAX_HOLDINGS + 1],
            ..Holdings::default()
        };
        assert!(Holdings::decode(&postcard::to_allocvec(&too_many).unwrap()).is_err());
    }

    proptest::proptest! {

        /// A member's holdings bytes, any of them: decoded or refused,
        /// never a panic, never more than the bound.
        #[test]
        fn holdings_from_any_bytes_are_bounded(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..4096)) {
            if let Ok(h) = Holdings::decode(&bytes) {
                proptest::prop_assert!(h.held.len() + h.dropped.len() <= MAX_HOLDINGS);
            }
        }

        /// Mutations of a real message: the same.
        #[test]
        fn mutated_holdings_are_bounded(at in 0usize..200, byte in proptest::prelude::any::<u8>(), cut in 0usize..200) {
            let mut h = Holdings::default();
            h.add((vec![c(1), c(2), c(3)], vec![c(4)]));
            let mut bytes = postcard::to_allocvec(&h.take(MAX_HOLDINGS)).unwrap();
            let i = at % bytes.len();
            bytes[i] = byte;
            bytes.truncate(bytes.len() - cut % bytes.len());
            if let Ok(h) = Holdings::decode(&bytes) {
                proptest::prop_assert!(h.held.len() + h.dropped.len() <= MAX_HOLDINGS);
            }
        }
    }
}
