//! Errors of the filesystem layer and their one mapping to errno.

use std::sync::Arc;

use btfs_core::PathError;
use btfs_store::StoreError;
use fuser::Errno;

use crate::content::{ContentSource, Wanted};

/// Everything a filesystem operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("no such file or directory")]
    NotFound,
    #[error("file exists")]
    Exists,
    #[error("not a directory")]
    NotDir,
    #[error("is a directory")]
    IsDir,
    #[error("directory not empty")]
    NotEmpty,
    #[error("invalid name: {0}")]
    BadName(#[from] PathError),
    #[error("a directory cannot be moved into itself")]
    IntoItself,
    #[error("{0} are not supported by btfs")]
    Unsupported(&'static str),
    #[error("operation not supported: {0}")]
    NotSupported(&'static str),
    #[error("invalid argument: {0}")]
    Invalid(&'static str),
    #[error("unknown file handle")]
    BadHandle,
    #[error("file was removed while in use")]
    Stale,
    #[error("the content of this file is not on this node")]
    ContentUnavailable,
    /// The operation needs the whole content, which other nodes hold: the
    /// caller fetches it first (a FUSE handler hands its reply over).
    #[error("the content of {} must be fetched first", .0.1.path)]
    Fetch(Box<(Arc<dyn ContentSource>, Wanted)>),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

pub(crate) type Result<T, E = FsError> = std::result::Result<T, E>;

/// Why a [`Signer`](crate::Signer) could not sign a record: any error, its
/// causes kept.
pub type SignError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Shows an error with its causes, `error: cause: …`, for a log line. A
/// cause whose text its parent's already shows is not repeated.
pub(crate) struct ErrorChain<'a>(pub(crate) &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut shown = self.0.to_string();
        f.write_str(&shown)?;
        let mut cause = self.0.source();
        while let Some(c) = cause {
            let text = c.to_string();
            if !shown.contains(&text) {
                write!(f, ": {text}")?;
            }
            shown = text;
            cause = c.source();
        }
        Ok(())
    }
}

/// The errno an application sees for each error. Exhaustive on purpose: a new
/// variant must decide its errno here.
pub fn errno(e: &FsError) -> Errno {
    match e {
        FsError::NotFound => Errno::ENOENT,
        FsError::Exists => Errno::EEXIST,
        FsError::NotDir => Errno::ENOTDIR,
        FsError::IsDir => Errno::EISDIR,
        FsError::NotEmpty => Errno::ENOTEMPTY,
        FsError::BadName(p) => match p {
            PathError::NameTooLong | PathError::PathTooLong => Errno::ENAMETOOLONG,
            PathError::NotUtf8 => Errno::from_i32(libc::EILSEQ),
            PathError::Empty
            | PathError::Reserved(_)
            | PathError::BadByte
            | PathError::Absolute => Errno::EINVAL,
        },
        FsError::IntoItself => Errno::EINVAL,
        FsError::Unsupported(_) => Errno::EPERM,
        FsError::NotSupported(_) => Errno::from_i32(libc::EOPNOTSUPP),
        FsError::Invalid(_) => Errno::EINVAL,
        FsError::BadHandle => Errno::EBADF,
        FsError::Stale => Errno::from_i32(libc::ESTALE),
        FsError::ContentUnavailable => Errno::EIO,
        // Only reaches an application when the fetch could not be started.
        FsError::Fetch(_) => Errno::EIO,
        FsError::Store(s) => match s {
            StoreError::Io(io) => io_errno(io),
            StoreError::Locked(_)
            | StoreError::Backend(_)
            | StoreError::Corrupt(_)
            | StoreError::Poisoned => Errno::EIO,
        },
        FsError::Io(io) => io_errno(io),
    }
}

fn io_errno(io: &std::io::Error) -> Errno {
    match io.raw_os_error() {
        Some(code) if code > 0 => Errno::from_i32(code),
        _ => Errno::EIO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_the_errno_applications_expect() {
        assert_eq!(errno(&FsError::NotFound), Errno::ENOENT);
        assert_eq!(
            errno(&FsError::BadName(PathError::NameTooLong)),
            Errno::ENAMETOOLONG
        );
        assert_eq!(errno(&FsError::Unsupported("hard links")), Errno::EPERM);
        let full = std::io::Error::from_raw_os_error(libc::ENOSPC);
        assert_eq!(errno(&FsError::Io(full)), Errno::ENOSPC);
        assert_eq!(errno(&FsError::Io(std::io::Error::other("x"))), Errno::EIO);
    }

    #[test]
    fn a_chain_shows_each_cause_once() {
        #[derive(Debug, thiserror::Error)]
        enum Outer {
            #[error("cannot sign")]
            Hides(#[source] std::io::Error),
            #[error("cannot sign: {0}")]
            Shows(#[source] std::io::Error),
        }
        let hides: SignError = Box::new(Outer::Hides(std::io::Error::other("no key")));
        assert_eq!(ErrorChain(&*hides).to_string(), "cannot sign: no key");
        let shows: SignError = Box::new(Outer::Shows(std::io::Error::other("no key")));
        assert_eq!(ErrorChain(&*shows).to_string(), "cannot sign: no key");
        let plain: SignError = "no key".into();
        assert_eq!(ErrorChain(&*plain).to_string(), "no key");
    }
}
