use std::path::PathBuf;

/// Errors of the metadata store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("metadata store in {0} is in use by another btfs process")]
    Locked(PathBuf),
    #[error("metadata store I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("metadata store error: {0}")]
    Backend(String),
    #[error("metadata store is corrupt: {0}")]
    Corrupt(String),
    #[error("metadata store lock poisoned")]
    Poisoned,
}
