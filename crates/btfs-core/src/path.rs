//! Paths inside a btfs tree.
//!
//! A [`RelPath`] is the replicated identity of a file: relative to the mount root,
//! `/`-separated, UTF-8, with no empty, `.` or `..` component and no NUL byte. The
//! root is the empty path. Every path that reaches the store, from the kernel or
//! (later) from a peer, is validated here first.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Longest name of one component, in bytes (as on ext4).
pub const MAX_NAME_LEN: usize = 255;
/// Longest whole path, in bytes (PATH_MAX less the terminating NUL).
pub const MAX_PATH_LEN: usize = 4095;

/// Why a path or name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("empty name")]
    Empty,
    #[error("name {0:?} is reserved")]
    Reserved(String),
    #[error("name contains '/' or NUL")]
    BadByte,
    #[error("name is longer than {MAX_NAME_LEN} bytes")]
    NameTooLong,
    #[error("path is longer than {MAX_PATH_LEN} bytes")]
    PathTooLong,
    #[error("path is absolute")]
    Absolute,
    #[error("name is not valid UTF-8")]
    NotUtf8,
}

/// Checks one path component.
pub fn validate_name(name: &str) -> Result<(), PathError> {
    if name.is_empty() {
        return Err(PathError::Empty);
    }
    if name == "." || name == ".." {
        return Err(PathError::Reserved(name.to_owned()));
    }
    if name.bytes().any(|b| b == b'/' || b == 0) {
        return Err(PathError::BadByte);
    }
    if name.len() > MAX_NAME_LEN {
        return Err(PathError::NameTooLong);
    }
    Ok(())
}

/// A validated path relative to the root of the tree; the root is `""`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
#[serde(try_from = "String", into = "String")]
pub struct RelPath(String);

impl RelPath {
    /// The root directory.
    pub fn root() -> Self {
        Self(String::new())
    }

    /// Validates a `/`-separated relative path.
    pub fn parse(s: &str) -> Result<Self, PathError> {
        if s.is_empty() {
            return Ok(Self::root());
        }
        if s.starts_with('/') {
            return Err(PathError::Absolute);
        }
        if s.len() > MAX_PATH_LEN {
            return Err(PathError::PathTooLong);
        }
        s.split('/').try_for_each(validate_name)?;
        Ok(Self(s.to_owned()))
    }

    /// Validates raw bytes (as the kernel hands names over) and parses them.
    pub fn parse_bytes(b: &[u8]) -> Result<Self, PathError> {
        Self::parse(std::str::from_utf8(b).map_err(|_| PathError::NotUtf8)?)
    }

    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The child `name` of this directory.
    pub fn join(&self, name: &str) -> Result<Self, PathError> {
        validate_name(name)?;
        let joined = if self.is_root() {
            name.to_owned()
        } else {
            format!("{}/{}", self.0, name)
        };
        if joined.len() > MAX_PATH_LEN {
            return Err(PathError::PathTooLong);
        }
        Ok(Self(joined))
    }

    /// Parent directory and last component; `None` for the root.
    pub fn split(&self) -> Option<(RelPath, &str)> {
        if self.is_root() {
            return None;
        }
        Some(match self.0.rfind('/') {
            Some(i) => (Self(self.0[..i].to_owned()), &self.0[i + 1..]),
            None => (Self::root(), self.0.as_str()),
        })
    }

    pub fn parent(&self) -> Option<RelPath> {
        self.split().map(|(p, _)| p)
    }

    pub fn file_name(&self) -> Option<&str> {
        self.split().map(|(_, n)| n)
    }

    /// True if `self` is `dir` or lies below it.
    pub fn is_within(&self, dir: &RelPath) -> bool {
        dir.is_root()
            || self.0 == dir.0
            || (self.0.starts_with(&dir.0) && self.0.as_bytes().get(dir.0.len()) == Some(&b'/'))
    }

    /// Moves `self` from below `from` to below `to` (`from/x/y` -> `to/x/y`).
    /// `None` if `self` is not within `from` or the result is too long.
    pub fn rebase(&self, from: &RelPath, to: &RelPath) -> Option<RelPath> {
        if !self.is_within(from) {
            return None;
        }
        let rest = if from.is_root() {
            self.0.as_str()
        } else {
            self.0[from.0.len()..].trim_start_matches('/')
        };
        let s = match (to.is_root(), rest.is_empty()) {
            (_, true) => to.0.clone(),
            (true, false) => rest.to_owned(),
            (false, false) => format!("{}/{}", to.0, rest),
        };
        (s.len() <= MAX_PATH_LEN).then_some(Self(s))
    }

    /// Number of components (0 for the root).
    pub fn depth(&self) -> usize {
        if self.is_root() {
            0
        } else {
            self.0.split('/').count()
        }
    }
}

impl TryFrom<String> for RelPath {
    type Error = PathError;
    fn try_from(s: String) -> Result<Self, PathError> {
        Self::parse(&s)
    }
}

impl From<RelPath> for String {
    fn from(p: RelPath) -> String {
        p.0
    }
}

impl fmt::Display for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "/{}", self.0)
    }
}

impl fmt::Debug for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn accepts_ordinary_paths_and_refuses_escapes() {
        assert!(RelPath::parse("a/b.txt").is_ok());
        assert!(RelPath::parse("").is_ok_and(|p| p.is_root()));
        assert_eq!(RelPath::parse("/etc/passwd"), Err(PathError::Absolute));
        assert_eq!(
            RelPath::parse("../etc/passwd"),
            Err(PathError::Reserved("..".into()))
        );
        assert_eq!(
            RelPath::parse("a/./b"),
            Err(PathError::Reserved(".".into()))
        );
        assert_eq!(RelPath::parse("a//b"), Err(PathError::Empty));
        assert_eq!(RelPath::parse("a/"), Err(PathError::Empty));
        assert_eq!(RelPath::parse("a\0b"), Err(PathError::BadByte));
        assert_eq!(
            RelPath::parse(&"x".repeat(256)),
            Err(PathError::NameTooLong)
        );
        assert_eq!(RelPath::parse_bytes(b"\xff"), Err(PathError::NotUtf8));
        let long = vec!["d".repeat(200); 21].join("/");
        assert_eq!(RelPath::parse(&long), Err(PathError::PathTooLong));
    }

    #[test]
    fn split_join_rebase() {
        let p = RelPath::parse("a/b/c").unwrap();
        let (parent, name) = p.split().unwrap();
        assert_eq!(parent.as_str(), "a/b");
        assert_eq!(name, "c");
        assert_eq!(parent.join(name).unwrap(), p);
        assert_eq!(RelPath::parse("c").unwrap().parent(), Some(RelPath::root()));
        assert!(p.is_within(&RelPath::parse("a").unwrap()));
        assert!(
            !RelPath::parse("ab")
                .unwrap()
                .is_within(&RelPath::parse("a").unwrap())
        );
        let moved = p
            .rebase(
                &RelPath::parse("a").unwrap(),
                &RelPath::parse("z/y").unwrap(),
            )
            .unwrap();
        assert_eq!(moved.as_str(), "z/y/b/c");
        let to_root = p.rebase(&RelPath::parse("a").unwrap(), &RelPath::root());
        assert_eq!(to_root.unwrap().as_str(), "b/c");
    }

    proptest! {
        #[test]
        fn join_then_split_is_identity(names in proptest::collection::vec("[a-zA-Z0-9._-]{1,20}", 0..6)) {
            let mut p = RelPath::root();
            for n in &names {
                match p.join(n) {
                    Ok(q) => p = q,
                    Err(_) => { prop_assert!(n == "." || n == ".."); return Ok(()); }
                }
            }
            prop_assert_eq!(p.depth(), names.len());
            prop_assert_eq!(RelPath::parse(p.as_str()).unwrap(), p.clone());
        }
    }
}
