//! The replication protocol of btfs, without IO.
//!
//! [`wire`]: records as they travel between nodes, signed by their author and
//! checked on every path in (gossip and sync alike, since records are relayed).

pub mod wire;

pub use wire::{MAX_RECORD, SignedRecord, WireError};
