//! `btfs generate`: fills a namespace with empty files as real signed
//! records, made by the daemon as changes through the mount would be (each
//! one signed, merged, stored, logged and announced), without the mount's
//! per-file system calls. The lab uses it to build namespaces of a million
//! files in a minute; an operator can use it to try a cluster at scale.
//!
//! A request names a slice of the tree (`dirs` directories from `first`
//! on, `files` files each, under `under`), so that a big namespace is made
//! in many short requests, each bounded in time and size.

use btfs_core::{FileKind, FileRecord, Owner, RelPath, Timestamp};
use btfs_fs::FsHandle;
use btfs_store::Backend;

/// Directories one request may create at most.
pub const MAX_GENERATE_DIRS: u64 = 1_000;
/// Files per directory at most.
pub const MAX_GENERATE_FILES: u64 = 10_000;

/// What one `generate` request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generate {
    /// The directory the slice goes under (created if missing).
    pub under: RelPath,
    /// The first directory number (directories are `dNNNNNN`).
    pub first: u64,
    /// How many directories.
    pub dirs: u64,
    /// How many empty files in each (`fNNNNNN`).
    pub files: u64,
}

/// Why a `generate` request was refused or stopped.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error(
        "at most {MAX_GENERATE_DIRS} directories and {MAX_GENERATE_FILES} files in each per request"
    )]
    TooBig,
    #[error("a file stands at {0}")]
    NotDir(RelPath),
    #[error(transparent)]
    Fs(#[from] btfs_fs::FsError),
    #[error(transparent)]
    Store(#[from] btfs_store::StoreError),
    #[error(transparent)]
    Path(#[from] btfs_core::PathError),
    #[error("generate task failed: {0}")]
    Task(String),
}

impl Generate {
    /// Parses `UNDER FIRST DIRS FILES` (the control request's arguments).
    pub fn parse(args: &str) -> Option<Self> {
        let mut it = args.split(' ');
        let under = RelPath::parse(it.next()?).ok()?;
        let first = it.next()?.parse().ok()?;
        let dirs = it.next()?.parse().ok()?;
        let files = it.next()?.parse().ok()?;
        it.next().is_none().then_some(Self {
            under,
            first,
            dirs,
            files,
        })
    }

    /// Makes the slice; returns how many records were written (existing
    /// directories and files are left as they are).
    pub(crate) fn run<B: Backend>(&self, fs: &FsHandle<B>) -> Result<u64, GenerateError> {
        if self.dirs > MAX_GENERATE_DIRS || self.files > MAX_GENERATE_FILES {
            return Err(GenerateError::TooBig);
        }
        let me = fs.node();
        let owner = |mode| Owner {
            mode,
            uid: 0,
            gid: 0,
        };
        let mut made = 0;
        // Makes `path` a directory unless it is one; 1 if it was made.
        let ensure_dir = |path: &RelPath| -> Result<u64, GenerateError> {
            match fs.store().get_live(path)? {
                Some(e) if e.record.kind == FileKind::Dir => Ok(0),
                Some(_) => Err(GenerateError::NotDir(path.clone())),
                None => {
                    let r = FileRecord::new_dir(owner(0o755), me, Timestamp::now());
                    fs.commit_local(path.clone(), r)?;
                    Ok(1)
                }
            }
        };
        let mut parents = Vec::new();
        let mut p = self.under.clone();
        while let Some((parent, _)) = p.split() {
            parents.push(p.clone());
            p = parent;
        }
        for dir in parents.iter().rev() {
            made += ensure_dir(dir)?;
        }
        for d in self.first..self.first.saturating_add(self.dirs) {
            let dir = self.under.join(&format!("d{d:06}"))?;
            made += ensure_dir(&dir)?;
            for f in 0..self.files {
                let path = dir.join(&format!("f{f:06}"))?;
                if fs.store().get(&path)?.is_some() {
                    continue;
                }
                let r = FileRecord::new_file(owner(0o644), me, Timestamp::now());
                fs.commit_local(path, r)?;
                made += 1;
            }
        }
        Ok(made)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_strictly() {
        let g = Generate::parse("gen 10 2 3").unwrap();
        assert_eq!(
            g,
            Generate {
                under: RelPath::parse("gen").unwrap(),
                first: 10,
                dirs: 2,
                files: 3
            }
        );
        assert!(Generate::parse("gen 10 2").is_none());
        assert!(Generate::parse("gen 10 2 3 4").is_none());
        assert!(Generate::parse("../x 1 2 3").is_none());
        assert!(Generate::parse("gen -1 2 3").is_none());
    }
}
