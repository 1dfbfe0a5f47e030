//! Ordered key-value backends for the [`Store`](crate::Store).

use std::{
    collections::BTreeMap,
    ops::Bound,
    path::Path,
    sync::Mutex,
    time::{Duration, Instant},
};

use crate::{Result, StoreError};

/// An ordered byte-keyed map with atomic batches.
pub trait Backend: Send + Sync + 'static {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>>;

    /// Up to `limit` pairs whose key starts with `prefix`, in key order, starting
    /// strictly after `after` when given.
    fn scan(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>>;

    /// Sets (`Some`) or removes (`None`) one key. Writes are recovered in
    /// order after a crash: a prefix of them survives.
    fn set(&self, key: Vec<u8>, value: Option<Vec<u8>>) -> Result<()>;

    /// Makes applied writes survive a crash of the process.
    fn flush(&self) -> Result<()>;
}

/// Disk space kept allocated ahead of the end of sled's log file. sled
/// 0.34 stops for good at its first failed write (an I/O error in its
/// flusher poisons the whole database), and file data written through
/// FUSE passthrough never reaches the daemon, so nothing can stop a writer
/// from filling the disk. With these blocks allocated in advance
/// (`fallocate` keeping the file's size), the store's next writes land in
/// space already held, even on a full disk: the delete that frees the
/// space can be recorded.
pub(crate) const STORE_RESERVE: u64 = 4 << 20;
/// Writes between two checks of the reservation.
const RESERVE_CHECK_EVERY: u64 = 256;

/// sled 0.34: one tree of single-key writes (see the crate docs for why not batches).
#[derive(Debug)]
pub struct SledBackend {
    db: sled::Db,
    /// sled's log file, for its reservation (`None`: not found).
    log: Option<std::fs::File>,
    /// Where the reservation ends, and writes since the last check.
    reserved_to: std::sync::atomic::AtomicU64,
    writes: std::sync::atomic::AtomicU64,
}

impl SledBackend {
    /// Opens (or creates) the store in `dir`. When another process holds
    /// the store's lock but is exiting (killed, its threads still closing
    /// their files), waits up to [`EXITING_HOLDER_PATIENCE`] for the lock;
    /// a live holder is refused at once with [`StoreError::Locked`].
    pub fn open(dir: &Path) -> Result<Self> {
        let deadline = Instant::now() + EXITING_HOLDER_PATIENCE;
        let mut logged = false;
        loop {
            match Self::try_open(dir) {
                Err(StoreError::Locked(_))
                    if Instant::now() < deadline && lock_holder_is_exiting(&dir.join("db")) =>
                {
                    if !logged {
                        tracing::info!(
                            dir = %dir.display(),
                            "metadata store is still locked by an exiting process; waiting for it"
                        );
                        logged = true;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                other => return other,
            }
        }
    }

    fn try_open(dir: &Path) -> Result<Self> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(64 << 20)
            .flush_every_ms(Some(500))
            .open()
            .map_err(|e| match e {
                sled::Error::Io(io) if io.to_string().contains("could not acquire lock") => {
                    StoreError::Locked(dir.to_path_buf())
                }
                other => sled_err(other),
            })?;
        let log = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join("db"))
            .ok();
        let backend = Self {
            db,
            log,
            reserved_to: 0.into(),
            writes: 0.into(),
        };
        backend.reserve();
        Ok(backend)
    }

    /// Keeps [`STORE_RESERVE`] allocated past the end of the log file (a
    /// failure, on a disk already full, is logged: the next check tries
    /// again).
    fn reserve(&self) {
        use std::sync::atomic::Ordering;
        let Some(file) = &self.log else { return };
        let Ok(size) = file.metadata().map(|m| m.len()) else {
            return;
        };
        if size + STORE_RESERVE / 2 <= self.reserved_to.load(Ordering::Relaxed) {
            return;
        }
        match nix::fcntl::fallocate(
            file,
            nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
            i64::try_from(size).unwrap_or(i64::MAX),
            STORE_RESERVE as i64,
        ) {
            Ok(()) => self
                .reserved_to
                .store(size + STORE_RESERVE, Ordering::Relaxed),
            Err(e) => tracing::warn!(
                "could not keep {} MiB of disk for the metadata store: {e}",
                STORE_RESERVE >> 20
            ),
        }
    }
}

/// How long [`SledBackend::open`] waits for a lock held by an exiting process.
pub(crate) const EXITING_HOLDER_PATIENCE: Duration = Duration::from_secs(10);

/// Whether the process holding the `flock` on `file` is exiting: gone,
/// a zombie, or with SIGKILL pending. A process killed with -9 keeps its
/// files open until its last thread has exited; its restart must not fail
/// for that. False when the holder is alive or cannot be told.
fn lock_holder_is_exiting(file: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(file) else {
        return false;
    };
    let Ok(locks) = std::fs::read_to_string("/proc/locks") else {
        return false;
    };
    match flock_holder(&locks, meta.ino()) {
        // Released between our attempt and now: try again.
        None => true,
        Some(pid) if pid == std::process::id() => false,
        Some(pid) => process_is_exiting(pid),
    }
}

/// The pid holding a `FLOCK` on inode `ino`, from the text of `/proc/locks`
/// (`1: FLOCK  ADVISORY  WRITE 1234 00:2f:5678 0 EOF`). Lines of waiters
/// (`1: -> FLOCK ...`) are skipped.
fn flock_holder(locks: &str, ino: u64) -> Option<u32> {
    locks.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [_, "FLOCK", _, _, pid, dev_ino, ..] = fields.as_slice() else {
            return None;
        };
        let lock_ino: u64 = dev_ino.rsplit(':').next()?.parse().ok()?;
        (lock_ino == ino).then(|| pid.parse().ok()).flatten()
    })
}

pub(crate) fn process_is_exiting(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return true;
    };
    let state = stat
        .rsplit(')')
        .next()
        .and_then(|rest| rest.split_whitespace().next());
    if matches!(state, None | Some("Z") | Some("X") | Some("x")) {
        return true;
    }
    // SIGKILL (9) pending for the whole group: bit 8 of ShdPnd.
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            let hex = status.lines().find_map(|l| l.strip_prefix("ShdPnd:"))?;
            u64::from_str_radix(hex.trim(), 16).ok()
        })
        .is_some_and(|pending| pending & (1 << 8) != 0)
}

fn sled_err(e: sled::Error) -> StoreError {
    match e {
        sled::Error::Io(io) => StoreError::Io(io),
        sled::Error::Corruption { .. } => StoreError::Corrupt(e.to_string()),
        other => StoreError::Backend(other.to_string()),
    }
}

impl Backend for SledBackend {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.db.get(key).map_err(sled_err)?.map(|v| v.to_vec()))
    }

    fn scan(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let start = match after {
            Some(a) => Bound::Excluded(a.to_vec()),
            None => Bound::Included(prefix.to_vec()),
        };
        let mut out = Vec::new();
        for item in self.db.range::<Vec<u8>, _>((start, Bound::Unbounded)) {
            let (k, v) = item.map_err(sled_err)?;
            if !k.starts_with(prefix) || out.len() >= limit {
                break;
            }
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    fn set(&self, key: Vec<u8>, value: Option<Vec<u8>>) -> Result<()> {
        let n = self
            .writes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if n % RESERVE_CHECK_EVERY == RESERVE_CHECK_EVERY - 1 {
            self.reserve();
        }
        match value {
            Some(v) => self.db.insert(key, v).map(drop).map_err(sled_err),
            None => self.db.remove(key).map(drop).map_err(sled_err),
        }
    }

    fn flush(&self) -> Result<()> {
        self.reserve();
        self.db.flush().map(|_| ()).map_err(sled_err)
    }
}

/// The in-memory twin, for tests and tools.
#[derive(Debug, Default)]
pub struct MemBackend {
    map: Mutex<BTreeMap<Vec<u8>, Vec<u8>>>,
}

impl Backend for MemBackend {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let map = self.map.lock().map_err(|_| StoreError::Poisoned)?;
        Ok(map.get(key).cloned())
    }

    fn scan(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let map = self.map.lock().map_err(|_| StoreError::Poisoned)?;
        let start = match after {
            Some(a) => Bound::Excluded(a.to_vec()),
            None => Bound::Included(prefix.to_vec()),
        };
        Ok(map
            .range((start, Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(prefix))
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn set(&self, key: Vec<u8>, value: Option<Vec<u8>>) -> Result<()> {
        let mut map = self.map.lock().map_err(|_| StoreError::Poisoned)?;
        match value {
            Some(v) => map.insert(key, v),
            None => map.remove(&key),
        };
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod lock_tests {
    use super::*;

    const LOCKS: &str = "\
1: POSIX  ADVISORY  WRITE 77 00:2f:5678 0 EOF
2: FLOCK  ADVISORY  WRITE 4242 00:2f:1234 0 EOF
2: -> FLOCK  ADVISORY  WRITE 99 00:2f:1234 0 EOF
3: FLOCK  ADVISORY  WRITE 31 fd:01:1234567 0 EOF
";

    #[test]
    fn the_flock_holder_is_found_by_inode_and_waiters_and_posix_locks_are_skipped() {
        assert_eq!(flock_holder(LOCKS, 1234), Some(4242));
        assert_eq!(flock_holder(LOCKS, 1234567), Some(31));
        assert_eq!(
            flock_holder(LOCKS, 5678),
            None,
            "a POSIX lock is not sled's"
        );
        assert_eq!(flock_holder(LOCKS, 1), None);
    }

    #[test]
    fn a_live_process_is_not_exiting_and_a_gone_or_zombie_one_is() {
        assert!(!process_is_exiting(std::process::id()));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        // Not yet reaped: a zombie once it has run.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !process_is_exiting(pid) {
            assert!(
                Instant::now() < deadline,
                "child {pid} never became a zombie"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        child.wait().unwrap();
        assert!(process_is_exiting(pid), "a reaped process is gone");
    }
}
