//! `btfs log` and `btfs restore`: the versions of a path this node knows
//! (the current one and those `history=` kept), and an old one brought back
//! as a new version, its content fetched from a member that still keeps it
//! when it is not here.

use std::time::Duration;

use btfs_core::{FileKind, FileRecord, RelPath, Timestamp, Wanted};
use serde::{Deserialize, Serialize};

use crate::NodeHandle;

/// How long a restore waits for content held elsewhere (the control
/// socket gives a request a minute).
const RESTORE_FETCH_TIMEOUT: Duration = Duration::from_secs(50);
/// Hex digits a `--version` prefix needs at least.
const MIN_VERSION_PREFIX: usize = 6;

/// One version of a path, as `btfs log` lists it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LogEntry {
    /// The path's version now (live, or the delete).
    pub current: bool,
    /// A delete (no content).
    pub deleted: bool,
    /// When the version was made (its ctime, by its author's clock), in
    /// seconds since the epoch.
    pub made: i64,
    /// When this node saw it replaced (history items only).
    pub superseded: Option<i64>,
    /// The node that made it (hex) and, if known, its member id.
    pub author: String,
    pub author_member: Option<String>,
    pub size: u64,
    /// blake3 of the content (hex), for `--version`.
    pub content: Option<String>,
    /// The content is an object on this node.
    pub held_here: bool,
    /// Members known to hold it in full (besides its author).
    pub holders: Vec<String>,
}

/// Which version a restore brings back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pick {
    /// The newest version whose content is not the path's content now
    /// (the one before an overwrite, the last before a delete).
    Previous,
    /// The newest version made at or before this time.
    At(Timestamp),
    /// The version whose content hash starts with these hex digits.
    Version(String),
}

/// What a restore did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Restored {
    pub path: String,
    pub content: String,
    pub size: u64,
    /// The content was fetched from members first.
    pub fetched: bool,
}

/// The versions of `path` with content, newest first: the live one, then
/// history's.
fn versions(current: Option<&FileRecord>, history: &[btfs_store::HistoryItem]) -> Vec<FileRecord> {
    let mut out: Vec<FileRecord> = current
        .filter(|r| r.kind == FileKind::File && !r.deleted)
        .cloned()
        .into_iter()
        .collect();
    out.extend(
        history
            .iter()
            .filter(|i| i.record.kind == FileKind::File && !i.record.deleted)
            .map(|i| i.record.clone()),
    );
    out
}

/// Chooses the version `pick` names among `versions` (newest first).
fn choose(
    pick: &Pick,
    current: Option<&FileRecord>,
    versions: &[FileRecord],
) -> Result<FileRecord, String> {
    let now_content = current.filter(|r| !r.deleted).and_then(|r| r.content);
    match pick {
        Pick::Previous => versions
            .iter()
            .find(|r| r.content != now_content)
            .cloned()
            .ok_or_else(|| "no earlier version is known here (is history= on?)".to_owned()),
        Pick::At(t) => versions
            .iter()
            .filter(|r| r.ctime <= *t)
            .max_by_key(|r| r.ctime)
            .cloned()
            .ok_or_else(|| "no version made at or before that time is known here".to_owned()),
        Pick::Version(prefix) => {
            let prefix = prefix.to_ascii_lowercase();
            if prefix.len() < MIN_VERSION_PREFIX || !prefix.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!(
                    "--version takes at least {MIN_VERSION_PREFIX} hex digits of a content hash (see btfs log)"
                ));
            }
            let mut found = versions
                .iter()
                .filter(|r| r.content.is_some_and(|c| c.to_hex().starts_with(&prefix)));
            let first = found
                .next()
                .cloned()
                .ok_or_else(|| format!("no version with content {prefix}… is known here"))?;
            if found.any(|r| r.content != first.content) {
                return Err(format!(
                    "{prefix}… names more than one version: give more digits"
                ));
            }
            Ok(first)
        }
    }
}

impl NodeHandle {
    /// The versions of `path` this node knows, newest first. `may(mode,
    /// uid, gid, want)` must grant search on every directory above it that
    /// still exists.
    pub fn log(
        &self,
        path: &str,
        may: impl Fn(u32, u32, u32, u32) -> bool,
    ) -> Result<Vec<LogEntry>, String> {
        let rel = RelPath::parse(path).map_err(|e| format!("{path}: {e}"))?;
        self.may_search_above(&rel, &may)?;
        let store = self.fs.store();
        let current = store.get(&rel).map_err(|e| format!("{path}: {e}"))?;
        let history = store.history_of(&rel).map_err(|e| format!("{path}: {e}"))?;
        if current.is_none() && history.is_empty() {
            return Err(format!("{path}: no such file, and no history of it here"));
        }
        let entry = |r: &FileRecord, current: bool, superseded: Option<Timestamp>| LogEntry {
            current,
            deleted: r.deleted,
            made: r.ctime.secs,
            superseded: superseded.map(|t| t.secs),
            author: r.author.to_hex(),
            author_member: self.engine.member_of(&r.author).map(|m| m.to_string()),
            size: r.size,
            content: r.content.filter(|_| !r.deleted).map(|c| c.to_hex()),
            held_here: !r.deleted && self.fs.holds(r),
            holders: r
                .content
                .filter(|_| !r.deleted)
                .map(|c| {
                    self.engine
                        .holders_of(&c)
                        .iter()
                        .map(ToString::to_string)
                        .collect()
                })
                .unwrap_or_default(),
        };
        let mut out = Vec::new();
        if let Some(e) = current.as_ref().filter(|e| !e.is_derived()) {
            out.push(entry(&e.record, true, None));
        }
        out.extend(
            history
                .iter()
                .map(|i| entry(&i.record, false, Some(i.superseded))),
        );
        Ok(out)
    }

    /// Brings a version of `path` back as a new version at `to` (default:
    /// `path`), fetching its content first if it is not here. The caller
    /// must be able to search the directories above both paths, read the
    /// version, and write the directory it goes into.
    pub async fn restore(
        &self,
        path: &str,
        pick: Pick,
        to: Option<&str>,
        may: impl Fn(u32, u32, u32, u32) -> bool,
    ) -> Result<Restored, String> {
        let rel = RelPath::parse(path).map_err(|e| format!("{path}: {e}"))?;
        let to_s = to.unwrap_or(path);
        let target = RelPath::parse(to_s).map_err(|e| format!("{to_s}: {e}"))?;
        if target.is_root() {
            return Err("a file cannot be restored over the root directory".to_owned());
        }
        self.may_search_above(&rel, &may)?;
        self.may_search_above(&target, &may)?;
        let store = self.fs.store();
        let current = store
            .get(&rel)
            .map_err(|e| format!("{path}: {e}"))?
            .filter(|e| !e.is_derived())
            .map(|e| e.record);
        let history = store.history_of(&rel).map_err(|e| format!("{path}: {e}"))?;
        let all = versions(current.as_ref(), &history);
        let old = choose(&pick, current.as_ref(), &all).map_err(|e| format!("{path}: {e}"))?;
        if !may(old.mode, old.uid, old.gid, 4) {
            return Err(format!("{path}: permission denied (reading that version)"));
        }
        // The directory it goes into, if it exists: writable by the caller.
        let mut dir = target.parent();
        while let Some(d) = dir {
            if let Ok(Some(e)) = store.get_live(&d) {
                if !may(e.record.mode, e.record.uid, e.record.gid, 3) {
                    return Err(format!("{to_s}: permission denied"));
                }
                break;
            }
            dir = d.parent();
        }
        let mut fetched = false;
        if !self.fs.holds(&old) {
            let want = Wanted::of(path.to_owned(), &old)
                .ok_or_else(|| format!("{path}: that version has no torrent to fetch"))?;
            match tokio::time::timeout(RESTORE_FETCH_TIMEOUT, self.engine.fetch(want)).await {
                Ok(Ok(())) => fetched = true,
                Ok(Err(e)) => {
                    return Err(format!(
                        "{path}: its content is not here and no member gave it: {e}"
                    ));
                }
                Err(_) => {
                    return Err(format!(
                        "{path}: its content did not arrive within {RESTORE_FETCH_TIMEOUT:?}: try again (what came is kept)"
                    ));
                }
            }
        }
        let fs = self.fs.clone();
        let same = target == rel;
        let made = tokio::task::spawn_blocking(move || fs.restore(&old, &target, same))
            .await
            .map_err(|e| format!("{to_s}: {e}"))?
            .map_err(|e| match e {
                btfs_fs::FsError::Exists => format!("{to_s}: exists: choose another --to"),
                e => format!("{to_s}: {e}"),
            })?;
        Ok(Restored {
            path: to_s.to_owned(),
            content: made.content.map(|c| c.to_hex()).unwrap_or_default(),
            size: made.size,
            fetched,
        })
    }

    /// Search permission on every live directory above `rel`.
    fn may_search_above(
        &self,
        rel: &RelPath,
        may: &impl Fn(u32, u32, u32, u32) -> bool,
    ) -> Result<(), String> {
        let mut dir = rel.parent();
        while let Some(d) = dir {
            if let Some(e) = self
                .fs
                .store()
                .get_live(&d)
                .map_err(|e| format!("{rel}: {e}"))?
                && !may(e.record.mode, e.record.uid, e.record.gid, 1)
            {
                return Err(format!("{rel}: permission denied"));
            }
            dir = d.parent();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use btfs_core::{ContentId, NodeId, Owner};

    use super::*;

    fn rec(byte: u8, ctime: i64) -> FileRecord {
        let owner = Owner {
            mode: 0o644,
            uid: 0,
            gid: 0,
        };
        let mut r = FileRecord::new_file(
            owner,
            NodeId([1; 32]),
            Timestamp {
                secs: ctime,
                nanos: 0,
            },
        );
        r.content = Some(ContentId::of(&[byte]));
        r.size = 1;
        r
    }

    #[test]
    fn a_pick_names_the_version_an_operator_means() {
        let now = rec(3, 30);
        let all = vec![now.clone(), rec(2, 20), rec(1, 10)];
        let prev = choose(&Pick::Previous, Some(&now), &all).unwrap();
        assert_eq!(prev.content, Some(ContentId::of(&[2])));
        // Deleted: the last version before the delete.
        let mut tomb = now.clone();
        tomb.deleted = true;
        let all_deleted = vec![rec(3, 30), rec(2, 20)];
        let last = choose(&Pick::Previous, Some(&tomb), &all_deleted).unwrap();
        assert_eq!(last.content, Some(ContentId::of(&[3])));
        let at = choose(
            &Pick::At(Timestamp { secs: 25, nanos: 0 }),
            Some(&now),
            &all,
        )
        .unwrap();
        assert_eq!(at.content, Some(ContentId::of(&[2])));
        assert!(choose(&Pick::At(Timestamp { secs: 5, nanos: 0 }), Some(&now), &all).is_err());
        let hex = ContentId::of(&[1]).to_hex();
        let v = choose(&Pick::Version(hex[..8].to_uppercase()), Some(&now), &all).unwrap();
        assert_eq!(v.content, Some(ContentId::of(&[1])));
        assert!(choose(&Pick::Version(hex[..3].into()), Some(&now), &all).is_err());
        assert!(choose(&Pick::Version("zzzzzzzz".into()), Some(&now), &all).is_err());
        assert!(choose(&Pick::Previous, Some(&now), std::slice::from_ref(&now)).is_err());
    }
}
