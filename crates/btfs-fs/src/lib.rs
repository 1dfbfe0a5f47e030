//! The FUSE adapter of btfs: turns kernel requests into store and object
//! operations.
//!
//! * Metadata lives in the [`btfs_store::Store`]; inode numbers are stored there
//!   too, so they are stable across remounts.
//! * Committed content lives in the [`ObjectStore`] and is read through FUSE
//!   passthrough where the kernel allows it.
//! * Writers work on a staging copy of the file; when the last writable handle
//!   is released the copy is hashed, installed as a new object and the record
//!   is committed in one store write (see [`fs`]).

pub mod content;
mod error;
pub mod fs;
pub mod mount;
mod objects;
mod outboard;

pub use content::{ContentSource, Done, Update, Wanted};
pub use error::{FsError, SignError, errno};
pub use fs::{Announced, Applied, BtfsFs, FsConfig, FsHandle, FsStatus, Signer};
pub use mount::{MountError, MountOptions, check_mountpoint, mount, mounted_at, unmount};
pub use objects::ObjectStore;
