//! Pure core of btfs: identifiers, file records, version vectors and path rules.
//!
//! Nothing in this crate performs IO. Every other layer (store, fs adapter, mesh,
//! torrent adapter) speaks in these types, so that the rules that decide what a
//! node shows (which paths are valid, which version of a record wins) live in one
//! place and can be tested exhaustively.

mod id;
pub mod merge;
mod path;
mod record;
mod version;

pub use id::{ContentId, IdParseError, InfoHash, NodeId};
pub use merge::{
    MAX_VERSIONS, Resolution, Versions, conflict_copy_name, is_conflict_copy, resolve,
};
pub use path::{MAX_NAME_LEN, MAX_PATH_LEN, PathError, RelPath, validate_name};
pub use record::{FileKind, FileRecord, Owner, Timestamp, Update, Wanted};
pub use version::{MAX_COUNTER, MAX_VERSION_ENTRIES, VersionError, VersionVector};
