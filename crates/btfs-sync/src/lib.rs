//! The replication protocol of btfs, without IO.
//!
//! * [`wire`]: records as they travel between nodes, signed by their author
//!   and checked on every path in (gossip and sync alike, since records are
//!   relayed).
//! * [`antientropy`]: paged delta sync of numbered record logs, with a full
//!   resync whenever a peer's claims do not add up.

pub mod antientropy;
pub mod wire;

pub use wire::{MAX_BATCH, MAX_RECORD, SignedRecord, WireError};
