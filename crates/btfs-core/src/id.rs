use std::fmt;

use serde::{Deserialize, Serialize};

/// Error parsing a hex identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid identifier {0:?}: expected 64 hex digits")]
pub struct IdParseError(pub String);

macro_rules! id32 {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        pub struct $name(pub [u8; 32]);

        impl $name {
            /// The raw bytes.
            pub fn as_bytes(&self) -> &[u8; 32] {
                &self.0
            }

            /// Full lower-case hex form (64 characters).
            pub fn to_hex(&self) -> String {
                hex::encode(self.0)
            }

            /// Parses the 64-character hex form.
            pub fn from_hex(s: &str) -> Result<Self, IdParseError> {
                let mut out = [0u8; 32];
                hex::decode_to_slice(s, &mut out).map_err(|_| IdParseError(s.to_owned()))?;
                Ok(Self(out))
            }

            /// First 8 hex digits, for logs and conflict-copy names.
            pub fn short(&self) -> String {
                hex::encode(&self.0[..4])
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.to_hex())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.short())
            }
        }
    };
}

id32!(
    /// Identity of a node: its ed25519 public key.
    NodeId
);
id32!(
    /// Identity of file content: the blake3 hash of its bytes.
    ContentId
);

impl ContentId {
    /// Content id of a byte slice.
    pub fn of(bytes: &[u8]) -> Self {
        Self(*blake3::hash(bytes).as_bytes())
    }

    /// Content id of the empty file.
    pub fn empty() -> Self {
        Self::of(&[])
    }
}

impl From<blake3::Hash> for ContentId {
    fn from(h: blake3::Hash) -> Self {
        Self(*h.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_and_short_form() {
        let id = ContentId::of(b"hello");
        assert_eq!(ContentId::from_hex(&id.to_hex()), Ok(id));
        assert_eq!(id.short().len(), 8);
        assert!(id.to_hex().starts_with(&id.short()));
        assert!(ContentId::from_hex("zz").is_err());
    }
}

/// Identity of a BitTorrent swarm: the SHA-1 of a torrent's `info` dictionary
/// (BitTorrent v1). btfs derives it from the content alone, so identical content
/// written on two nodes is one swarm.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct InfoHash(pub [u8; 20]);

impl InfoHash {
    /// Full lower-case hex form (40 characters).
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for InfoHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for InfoHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "InfoHash({})", hex::encode(&self.0[..4]))
    }
}
