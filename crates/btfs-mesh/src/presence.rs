//! The presence topic: members announce their own listen addresses there,
//! signed by gossipsub, so that a member that knows one other learns them
//! all. This holds when an announcement is due, what it says, and how a
//! received one is read ([`parse_presence`]).

use std::{
    str::FromStr,
    time::{Duration, Instant},
};

use libp2p::{Multiaddr, gossipsub, multiaddr::Protocol};

use crate::peers::{MAX_ADDRS_PER_PEER, dialable};

/// Presence announcements go out at most this often (one is due whenever a
/// member subscribes, so that newcomers learn of everyone).
const PRESENCE_MIN_GAP: Duration = Duration::from_secs(1);
/// And at least this often, so that a member that missed one learns later.
const PRESENCE_INTERVAL: Duration = Duration::from_secs(60);
/// Largest presence announcement accepted.
const MAX_PRESENCE: usize = 2048;
/// First line of a presence announcement, before its time stamp.
const PRESENCE_HEADER: &str = "btfs-presence/1";

/// The presence topic of a cluster, and when this node announces itself.
pub(crate) struct Presence {
    topic: gossipsub::IdentTopic,
    due: bool,
    last: Option<Instant>,
}

impl Presence {
    /// The presence of `cluster`, an announcement due at once.
    pub(crate) fn new(cluster: &str) -> Self {
        Self {
            topic: gossipsub::IdentTopic::new(format!("btfs/{cluster}/presence/1")),
            due: true,
            last: None,
        }
    }

    pub(crate) fn topic(&self) -> &gossipsub::IdentTopic {
        &self.topic
    }

    /// An announcement is due (a member subscribed: tell it who this node
    /// is).
    pub(crate) fn make_due(&mut self) {
        self.due = true;
    }

    /// An announcement is due if the last one is `PRESENCE_INTERVAL` old.
    pub(crate) fn tick(&mut self, now: Instant) {
        if self.last.is_none_or(|t| now >= t + PRESENCE_INTERVAL) {
            self.due = true;
        }
    }

    /// The announcement of this node's `listeners` to publish at `now`, if
    /// one is due, the last one is at least `PRESENCE_MIN_GAP` old and there
    /// is an address to announce.
    pub(crate) fn announcement<'a>(
        &self,
        now: Instant,
        listeners: impl Iterator<Item = &'a Multiaddr>,
    ) -> Option<Vec<u8>> {
        if !self.due || self.last.is_some_and(|t| now < t + PRESENCE_MIN_GAP) {
            return None;
        }
        let all: Vec<&Multiaddr> = listeners.filter(|a| dialable(a)).collect();
        // Loopback only where there is nothing else (one machine, tests):
        // elsewhere it would send members to their own machine.
        let loopback = |a: &Multiaddr| match a.iter().next() {
            Some(Protocol::Ip4(ip)) => ip.is_loopback(),
            Some(Protocol::Ip6(ip)) => ip.is_loopback(),
            _ => false,
        };
        let only_loopback = all.iter().all(|a| loopback(a));
        let addrs: Vec<String> = all
            .into_iter()
            .filter(|a| only_loopback || !loopback(a))
            .take(MAX_ADDRS_PER_PEER)
            .map(ToString::to_string)
            .collect();
        if addrs.is_empty() {
            return None;
        }
        // The stamp makes every announcement a new gossip message (ids are
        // content hashes).
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis();
        Some(format!("{PRESENCE_HEADER} {stamp}\n{}", addrs.join("\n")).into_bytes())
    }

    /// The announcement went out at `now` (or was one gossip had already).
    pub(crate) fn published(&mut self, now: Instant) {
        self.due = false;
        self.last = Some(now);
    }
}

/// The addresses of a presence announcement (peer ids stripped), or `None`
/// if anything in it is malformed, too long or not [`dialable`].
pub(crate) fn parse_presence(data: &[u8]) -> Option<Vec<Multiaddr>> {
    if data.len() > MAX_PRESENCE {
        return None;
    }
    let text = std::str::from_utf8(data).ok()?;
    let mut lines = text.split('\n');
    let stamp = lines
        .next()?
        .strip_prefix(PRESENCE_HEADER)?
        .strip_prefix(' ')?;
    stamp.parse::<u64>().ok()?;
    let mut addrs = Vec::new();
    for line in lines {
        let a = Multiaddr::from_str(line).ok()?;
        if !dialable(&a) || addrs.len() == MAX_ADDRS_PER_PEER {
            return None;
        }
        addrs.push(a.iter().take(2).collect());
    }
    (!addrs.is_empty()).then_some(addrs)
}

#[cfg(test)]
mod tests;
