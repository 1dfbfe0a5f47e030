//! Zones (`zone=NAME`: a datacenter, a rack): what a zone name may be, and
//! how members tell theirs to each other, in the libp2p identify agent
//! version (`btfs/<version> zone=<NAME>`). Identify already runs on every
//! connection and again when a peer changes it, so the zone costs no
//! protocol of its own; the agent string is another member's bytes, and is
//! read as hostile: bounded, and a zone that is not valid counts as none.

use std::{fmt, str::FromStr};

/// The longest zone name.
pub const MAX_ZONE_LEN: usize = 32;
/// Agent versions longer than this are not read at all (identify bounds
/// the whole message at 4 KiB; a zone needs far less).
pub(crate) const MAX_AGENT_LEN: usize = 256;
/// What an agent version starts with, before the version.
const AGENT_PREFIX: &str = "btfs/";
/// The token that carries the zone, before its name.
const ZONE_TOKEN: &str = "zone=";

/// A valid zone name: 1 to [`MAX_ZONE_LEN`] letters, digits, `.`, `_` or
/// `-` (it travels in a space-separated agent string and is shown in logs
/// and `btfs status`, so it is kept to a portable alphabet).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Zone(String);

/// A zone name that is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("zone name {0:?} is not valid: use 1 to {MAX_ZONE_LEN} letters, digits, '.', '_' or '-'")]
pub struct ZoneError(pub String);

impl Zone {
    /// Checks `name`.
    pub fn new(name: &str) -> Result<Self, ZoneError> {
        if is_valid(name) {
            Ok(Self(name.to_owned()))
        } else {
            Err(ZoneError(name.to_owned()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Zone {
    type Err = ZoneError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl fmt::Display for Zone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn is_valid(name: &str) -> bool {
    (1..=MAX_ZONE_LEN).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// The identify agent version of a node in `zone` (or in none).
pub(crate) fn agent_version(zone: Option<&Zone>) -> String {
    let base = format!("{AGENT_PREFIX}{}", env!("CARGO_PKG_VERSION"));
    match zone {
        Some(z) => format!("{base} {ZONE_TOKEN}{z}"),
        None => base,
    }
}

/// The zone a peer's agent version tells, if it is a btfs agent string of
/// at most [`MAX_AGENT_LEN`] bytes with exactly one valid `zone=` token;
/// anything else is no zone (a peer cannot get a zone it did not clearly
/// give, nor a name this node would not accept for itself).
pub(crate) fn zone_of_agent(agent: &str) -> Option<Zone> {
    if agent.len() > MAX_AGENT_LEN || !agent.starts_with(AGENT_PREFIX) {
        return None;
    }
    let mut zones = agent
        .split(' ')
        .filter_map(|token| token.strip_prefix(ZONE_TOKEN));
    let zone = zones.next()?;
    if zones.next().is_some() {
        return None;
    }
    Zone::new(zone).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zone_names_are_short_and_portable() {
        for ok in ["dc1", "rack-7", "eu_west.2", "A", &"z".repeat(MAX_ZONE_LEN)] {
            assert_eq!(Zone::new(ok).map(|z| z.to_string()), Ok(ok.to_owned()));
        }
        for bad in [
            "",
            &"z".repeat(MAX_ZONE_LEN + 1),
            "dc 1",
            "dc1,ro",
            "dc=1",
            "zoné",
            "a/b",
            "dc\n1",
        ] {
            let e = Zone::new(bad).unwrap_err();
            assert!(e.to_string().contains("is not valid"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn the_agent_version_carries_the_zone_and_reads_back() {
        let dc1 = Zone::new("dc1").unwrap();
        let agent = agent_version(Some(&dc1));
        assert!(agent.starts_with("btfs/"), "{agent}");
        assert!(agent.ends_with(" zone=dc1"), "{agent}");
        assert_eq!(zone_of_agent(&agent), Some(dc1));
        let none = agent_version(None);
        assert!(!none.contains("zone="), "{none}");
        assert_eq!(zone_of_agent(&none), None);
        let longest = Zone::new(&"z".repeat(MAX_ZONE_LEN)).unwrap();
        assert_eq!(zone_of_agent(&agent_version(Some(&longest))), Some(longest));
    }

    #[test]
    fn hostile_agent_versions_give_no_zone() {
        let long = format!("btfs/0.1.0 zone=dc1 {}", "x".repeat(MAX_AGENT_LEN));
        for agent in [
            // Not a btfs agent.
            "rust-libp2p/0.47.0",
            "zone=dc1",
            "other/1 zone=dc1",
            // Two zones, or an empty one, or one that is not valid.
            "btfs/0.1.0 zone=dc1 zone=dc2",
            "btfs/0.1.0 zone=",
            "btfs/0.1.0 zone=dc/1",
            "btfs/0.1.0 zone=dc\u{0}1",
            &format!("btfs/0.1.0 zone={}", "z".repeat(MAX_ZONE_LEN + 1)),
            // Too long as a whole, even with a valid zone in it.
            &long,
        ] {
            assert_eq!(zone_of_agent(agent), None, "{agent:?}");
        }
        // Other tokens around the zone are ignored.
        assert_eq!(
            zone_of_agent("btfs/9.9 extra zone=r7 more"),
            Some(Zone::new("r7").unwrap())
        );
    }
}

#[cfg(test)]
mod props {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Whatever a peer sends, reading it never panics, and a zone read
        /// from it is one this node would accept for itself.
        #[test]
        fn any_agent_string_gives_a_valid_zone_or_none(agent in ".{0,300}") {
            if let Some(z) = zone_of_agent(&agent) {
                prop_assert!(Zone::new(z.as_str()).is_ok());
                prop_assert!(agent.len() <= MAX_AGENT_LEN);
            }
        }

        #[test]
        fn every_valid_zone_round_trips(name in "[A-Za-z0-9._-]{1,32}") {
            let z = Zone::new(&name).unwrap();
            prop_assert_eq!(zone_of_agent(&agent_version(Some(&z))), Some(z));
        }
    }
}
