//! The per-path metadata record that every node stores and (later) gossips.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::{ContentId, InfoHash, NodeId, VersionVector};

/// What a path holds. btfs stores regular files, directories and symbolic links
/// only: hard links, device nodes, FIFOs and sockets are refused at the mount
/// (see the fs crate) because they cannot mean the same thing on every node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum FileKind {
    File,
    Dir,
    Symlink,
}

/// Wall-clock time with nanoseconds, signed so that pre-1970 times survive.
///
/// A *valid* timestamp ([`Timestamp::is_valid`]) has `nanos` below one second
/// and `secs` within [`Timestamp::MIN_SECS`]`..=`[`Timestamp::MAX_SECS`]
/// (years -6060 to 9999 or so): records from peers must carry valid ones, and
/// local times are clamped into that range when converted.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
pub struct Timestamp {
    pub secs: i64,
    pub nanos: u32,
}

impl Timestamp {
    /// Nanoseconds in a second: a valid `nanos` is below it.
    pub const NANOS_PER_SEC: u32 = 1_000_000_000;
    /// Latest valid second: 9999-12-31 23:59:59 UTC.
    pub const MAX_SECS: i64 = 253_402_300_799;
    /// Earliest valid second: as far before the epoch as `MAX_SECS` is after.
    pub const MIN_SECS: i64 = -Self::MAX_SECS;
    /// The latest valid timestamp.
    pub const MAX: Self = Self {
        secs: Self::MAX_SECS,
        nanos: Self::NANOS_PER_SEC - 1,
    };
    /// The earliest valid timestamp.
    pub const MIN: Self = Self {
        secs: Self::MIN_SECS,
        nanos: 0,
    };

    pub fn now() -> Self {
        SystemTime::now().into()
    }

    /// True if `nanos` is below a second and `secs` within the valid range.
    pub fn is_valid(self) -> bool {
        self.nanos < Self::NANOS_PER_SEC && (Self::MIN_SECS..=Self::MAX_SECS).contains(&self.secs)
    }

    /// The nearest valid timestamp: `secs` saturates at the range's ends
    /// ([`Timestamp::MAX`], [`Timestamp::MIN`]) and `nanos` at 999,999,999.
    pub fn clamped(self) -> Self {
        if self.secs > Self::MAX_SECS {
            Self::MAX
        } else if self.secs < Self::MIN_SECS {
            Self::MIN
        } else {
            Self {
                secs: self.secs,
                nanos: self.nanos.min(Self::NANOS_PER_SEC - 1),
            }
        }
    }

    /// The time as a `SystemTime`; total: an invalid timestamp is first
    /// [`clamped`](Self::clamped), and a time the platform cannot represent
    /// (none on Linux, whose `SystemTime` spans ±2^63 seconds) gives the epoch.
    pub fn to_system_time(self) -> SystemTime {
        let t = self.clamped();
        let secs = Duration::from_secs(t.secs.unsigned_abs());
        let whole = if t.secs >= 0 {
            UNIX_EPOCH.checked_add(secs)
        } else {
            UNIX_EPOCH.checked_sub(secs)
        };
        whole
            .and_then(|w| w.checked_add(Duration::from_nanos(u64::from(t.nanos))))
            .unwrap_or(UNIX_EPOCH)
    }
}

impl From<SystemTime> for Timestamp {
    /// Clamped into the valid range, so that local records are always valid.
    fn from(t: SystemTime) -> Self {
        match t.duration_since(UNIX_EPOCH) {
            Ok(d) => Self {
                secs: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
                nanos: d.subsec_nanos(),
            },
            Err(e) => {
                let d = e.duration();
                let mut secs = -i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
                let mut nanos = d.subsec_nanos();
                if nanos > 0 {
                    secs -= 1;
                    nanos = Self::NANOS_PER_SEC - nanos;
                }
                Self { secs, nanos }
            }
        }
        .clamped()
    }
}

/// Metadata of one path: the unit of storage and replication.
///
/// A deleted path keeps its record as a *tombstone* (`deleted == true`) so that
/// the delete itself has a version and can win or lose against concurrent edits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    pub kind: FileKind,
    /// Size in bytes (content length for files, target length for symlinks).
    pub size: u64,
    /// Permission bits, `0o7777` at most (the kind carries the file type).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: Timestamp,
    pub atime: Timestamp,
    pub ctime: Timestamp,
    /// blake3 of the bytes, for files.
    pub content: Option<ContentId>,
    /// The content of the version this one was derived from: lets a merge
    /// tell an edit that started from the content another node holds (not a
    /// conflict) from two edits of the same ancestor (a conflict).
    pub prev_content: Option<ContentId>,
    /// The BitTorrent swarm that carries `content` between nodes (files with
    /// content, empty files excepted). Set when the content is committed.
    pub torrent: Option<InfoHash>,
    /// Link target, for symlinks.
    pub target: Option<String>,
    pub version: VersionVector,
    /// The node that made this version.
    pub author: NodeId,
    pub deleted: bool,
}

/// Owner and permissions given to a new record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

impl FileRecord {
    fn new(kind: FileKind, owner: Owner, author: NodeId, now: Timestamp) -> Self {
        Self {
            kind,
            size: 0,
            mode: owner.mode & 0o7777,
            uid: owner.uid,
            gid: owner.gid,
            mtime: now,
            atime: now,
            ctime: now,
            content: None,
            prev_content: None,
            torrent: None,
            target: None,
            version: VersionVector::new().incremented(author),
            author,
            deleted: false,
        }
    }

    /// A new, empty regular file.
    pub fn new_file(owner: Owner, author: NodeId, now: Timestamp) -> Self {
        let mut r = Self::new(FileKind::File, owner, author, now);
        r.content = Some(ContentId::empty());
        r
    }

    pub fn new_dir(owner: Owner, author: NodeId, now: Timestamp) -> Self {
        Self::new(FileKind::Dir, owner, author, now)
    }

    pub fn new_symlink(target: String, owner: Owner, author: NodeId, now: Timestamp) -> Self {
        let mut r = Self::new(FileKind::Symlink, owner, author, now);
        r.size = target.len() as u64;
        r.target = Some(target);
        r
    }

    pub fn is_live(&self) -> bool {
        !self.deleted
    }

    /// The next local version of this record: `author` bumps its counter and
    /// becomes the author, and ctime moves to `now`. Field changes follow.
    pub fn next_version(&self, author: NodeId, now: Timestamp) -> Self {
        let mut r = self.clone();
        r.prev_content = self.content;
        r.version.increment(author);
        r.author = author;
        r.ctime = now;
        r
    }

    /// Turns a record into the tombstone that succeeds it.
    pub fn tombstone(&self, author: NodeId, now: Timestamp) -> Self {
        let mut r = self.next_version(author, now);
        r.deleted = true;
        r.content = None;
        r.torrent = None;
        r.target = None;
        r.size = 0;
        r
    }

    /// A record that replaces `previous` (typically a tombstone) at the same
    /// path: it descends from it so that it wins everywhere the old one is known.
    pub fn succeeding(mut self, previous: &FileRecord) -> Self {
        self.version.merge(&previous.version);
        self.version.increment(self.author);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: NodeId = NodeId([1; 32]);
    const B: NodeId = NodeId([2; 32]);
    const OWNER: Owner = Owner {
        mode: 0o100644,
        uid: 1,
        gid: 2,
    };

    #[test]
    fn only_live_files_with_a_torrent_are_wanted_from_other_nodes() {
        let now = Timestamp::now();
        let mut f = FileRecord::new_file(OWNER, A, now);
        assert_eq!(
            Wanted::of("f".into(), &f),
            None,
            "an empty file travels in its record"
        );
        f.content = Some(ContentId::of(b"data"));
        f.size = 4;
        f.torrent = Some(InfoHash([9; 20]));
        let w = Wanted::of("f".into(), &f).unwrap();
        assert_eq!(
            (w.content, w.torrent, w.size, w.author),
            (ContentId::of(b"data"), InfoHash([9; 20]), 4, A)
        );
        assert_eq!(Wanted::of("f".into(), &f.tombstone(B, now)), None);
        assert_eq!(
            Wanted::of("d".into(), &FileRecord::new_dir(OWNER, A, now)),
            None
        );
    }

    #[test]
    fn timestamps_round_trip_before_and_after_epoch() {
        for t in [
            UNIX_EPOCH + Duration::new(1_700_000_000, 5),
            UNIX_EPOCH - Duration::new(100, 250),
            UNIX_EPOCH,
        ] {
            assert_eq!(Timestamp::from(t).to_system_time(), t);
        }
        assert_eq!(
            Timestamp::from(UNIX_EPOCH - Duration::new(1, 1)),
            Timestamp {
                secs: -2,
                nanos: 999_999_999
            }
        );
    }

    #[test]
    fn timestamps_out_of_range_are_invalid_and_clamp() {
        assert!(Timestamp::MAX.is_valid() && Timestamp::MIN.is_valid());
        assert!(Timestamp::now().is_valid());
        for bad in [
            Timestamp {
                secs: 0,
                nanos: 1_000_000_000,
            },
            Timestamp {
                secs: Timestamp::MAX_SECS + 1,
                nanos: 0,
            },
            Timestamp {
                secs: Timestamp::MIN_SECS - 1,
                nanos: 0,
            },
            Timestamp {
                secs: i64::MAX,
                nanos: u32::MAX,
            },
            Timestamp {
                secs: i64::MIN,
                nanos: 0,
            },
        ] {
            assert!(!bad.is_valid(), "{bad:?}");
            assert!(bad.clamped().is_valid(), "{bad:?}");
        }
        assert_eq!(
            Timestamp {
                secs: 5,
                nanos: u32::MAX
            }
            .clamped(),
            Timestamp {
                secs: 5,
                nanos: 999_999_999
            }
        );
        let far = UNIX_EPOCH + Duration::from_secs(1 << 40);
        assert_eq!(Timestamp::from(far), Timestamp::MAX, "local times clamp");
    }

    proptest::proptest! {
        #[test]
        fn to_system_time_is_total(secs in proptest::prelude::any::<i64>(), nanos in proptest::prelude::any::<u32>()) {
            let t = Timestamp { secs, nanos };
            let st = t.to_system_time();
            // Valid timestamps round-trip; any other lands on the clamped one.
            proptest::prop_assert_eq!(Timestamp::from(st), t.clamped());
        }
    }

    #[test]
    fn to_system_time_is_total_at_the_extremes() {
        for secs in [i64::MAX, i64::MIN, i64::MAX - 1, i64::MIN + 1, 0, -1] {
            for nanos in [0, 999_999_999, 1_000_000_000, u32::MAX] {
                let t = Timestamp { secs, nanos };
                assert_eq!(Timestamp::from(t.to_system_time()), t.clamped());
            }
        }
    }

    #[test]
    fn versions_descend_and_tombstones_supersede() {
        let now = Timestamp::now();
        let f = FileRecord::new_file(OWNER, A, now);
        assert_eq!(f.mode, 0o644, "file type bits are stripped");
        assert_eq!(f.content, Some(ContentId::empty()));
        let g = f.next_version(B, now);
        assert!(g.version > f.version);
        assert_eq!(g.author, B);
        let t = g.tombstone(A, now);
        assert!(t.deleted && t.version > g.version && t.content.is_none());
        let reborn = FileRecord::new_dir(OWNER, B, now).succeeding(&t);
        assert!(reborn.version > t.version && reborn.is_live());
    }
}

/// What a new version was made from, when it was written in place over a
/// version held where it was written: the content it changed and which of
/// its bytes, so that only the pieces that changed are hashed again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Update<'a> {
    /// The content the writer started from.
    pub base: ContentId,
    /// That content's swarm, when it has one.
    pub base_torrent: Option<InfoHash>,
    /// Bytes `[0, base_kept)` of the new content equal the base's, except
    /// in `changed` (a truncation below the base's length lowers it).
    pub base_kept: u64,
    /// Ranges `[start, end)` written since, sorted and disjoint.
    pub changed: &'a [(u64, u64)],
}

/// What a node needs to get a file's content from the nodes that hold it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    /// The path, for log lines and status.
    pub path: String,
    pub content: ContentId,
    pub torrent: InfoHash,
    pub size: u64,
    /// The node that wrote this content: it holds it, unless it is down.
    pub author: NodeId,
}

impl Wanted {
    /// The content of a live file record that travels between nodes (one
    /// with a torrent; empty files have none).
    pub fn of(path: String, r: &FileRecord) -> Option<Self> {
        match (r.kind, r.deleted, r.content, r.torrent) {
            (FileKind::File, false, Some(content), Some(torrent)) => Some(Self {
                path,
                content,
                torrent,
                size: r.size,
                author: r.author,
            }),
            _ => None,
        }
    }
}
