//! The content-addressed object store and the staging area for open writers.
//!
//! `objects/<2 hex>/<64 hex>` holds committed content, named by its blake3 hash;
//! an object is never modified after it is installed. `staging/` holds the
//! private copies that open writers modify.
//!
//! A staging file whose writer called `fsync` (or opened it `O_SYNC`/`O_DSYNC`)
//! gets a *sync marker* beside it, `<name>.sync`, naming its inode; marker,
//! file data and directory entries are on disk before the `fsync` returns.
//! On start, a marked staging file is handed back for recovery (see
//! [`ObjectStore::take_synced`]): acknowledged bytes are never dropped. Other
//! staging files are deleted, so a crash before a commit of unsynced writes
//! leaves the previous version behind, as a local filesystem may.

use std::{
    fs::{self, File, OpenOptions},
    io,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
};

use btfs_core::ContentId;

/// A staging file being written by open handles.
#[derive(Debug)]
pub(crate) struct Staging {
    pub(crate) path: PathBuf,
    pub(crate) file: std::sync::Arc<File>,
}

/// The object file of `c` under the objects directory.
fn object_path_in(objects: &Path, c: &ContentId) -> PathBuf {
    let hex = c.to_hex();
    objects.join(&hex[..2]).join(hex)
}

#[derive(Debug)]
pub struct ObjectStore {
    objects: PathBuf,
    staging: PathBuf,
    counter: AtomicU64,
}

impl ObjectStore {
    /// Opens the store under `state_dir`. Leftover staging files stay until
    /// [`take_synced`](Self::take_synced) sorts them.
    pub fn open(state_dir: &Path) -> io::Result<Self> {
        let objects = state_dir.join("objects");
        let staging = state_dir.join("staging");
        fs::create_dir_all(&objects)?;
        fs::create_dir_all(&staging)?;
        // New staging names start past every leftover one.
        let mut next = 0;
        for e in fs::read_dir(&staging)? {
            let name = e?.file_name();
            let stem = name.to_str().and_then(|n| n.split('.').next());
            if let Some(n) = stem.and_then(|h| u64::from_str_radix(h, 16).ok()) {
                next = next.max(n.saturating_add(1));
            }
        }
        Ok(Self {
            objects,
            staging,
            counter: AtomicU64::new(next),
        })
    }

    /// Sorts the staging files a previous run left: those with a sync marker
    /// (their writer's `fsync` was acknowledged) are returned with the inode
    /// the marker names, for recovery; the others, and markers whose file is
    /// gone, are deleted. Call once, before any file is opened.
    pub(crate) fn take_synced(&self) -> io::Result<Vec<SyncedStaging>> {
        let mut synced = Vec::new();
        let mut unmarked = Vec::new();
        for e in fs::read_dir(&self.staging)? {
            let path = e?.path();
            match path.extension().and_then(|x| x.to_str()) {
                Some(SYNC_MARKER) => {
                    let file = path.with_extension("");
                    let ino = fs::read_to_string(&path)
                        .ok()
                        .and_then(|t| t.trim().parse::<u64>().ok());
                    match (file.exists(), ino) {
                        (true, Some(ino)) => synced.push(SyncedStaging { path: file, ino }),
                        (true, None) => synced.push(SyncedStaging {
                            path: file,
                            ino: NO_INODE,
                        }),
                        (false, _) => fs::remove_file(&path)?,
                    }
                }
                _ => unmarked.push(path),
            }
        }
        for path in unmarked {
            if !synced.iter().any(|s| s.path == path) {
                fs::remove_file(&path)?;
            }
        }
        synced.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(synced)
    }

    /// Marks staging file `staging` of inode `ino` as holding acknowledged
    /// bytes: its data, the marker and both directory entries are on disk
    /// when this returns. A marked file is recovered after a crash.
    pub(crate) fn mark_synced(
        &self,
        staging: &Staging,
        ino: u64,
        datasync: bool,
    ) -> io::Result<()> {
        let (file, staging) = (&staging.file, &staging.path);
        if datasync {
            file.sync_data()?;
        } else {
            file.sync_all()?;
        }
        let marker = marker_path(staging);
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&marker)
        {
            Ok(mut m) => {
                io::Write::write_all(&mut m, format!("{ino}\n").as_bytes())?;
                m.sync_all()?;
                File::open(&self.staging)?.sync_all()
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Deletes a staging file that is no longer needed, and its marker.
    pub(crate) fn discard_staging(&self, staging: &Path) -> io::Result<()> {
        for p in [staging.to_path_buf(), marker_path(staging)] {
            match fs::remove_file(&p) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        Ok(())
    }

    pub fn object_path(&self, c: &ContentId) -> PathBuf {
        object_path_in(&self.objects, c)
    }

    /// Where objects live, as a function that outlives this store (for the
    /// content engine, built before the filesystem that owns the store).
    pub fn path_fn(&self) -> impl Fn(&ContentId) -> PathBuf + Send + Sync + 'static {
        let objects = self.objects.clone();
        move |c| object_path_in(&objects, c)
    }

    /// Opens committed content for reading. The empty object is created on
    /// demand, since empty files never pass through a staging file.
    pub fn open_object(&self, c: &ContentId) -> io::Result<File> {
        let path = self.object_path(c);
        match File::open(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound && *c == ContentId::empty() => {
                fs::create_dir_all(path.parent().unwrap_or(&self.objects))?;
                File::create(&path)?;
                File::open(&path)
            }
            other => other,
        }
    }

    /// Opens an object read-write, to register it as a passthrough backing
    /// file (the kernel only writes through it for handles opened for
    /// writing, which are never given an object's backing file).
    pub(crate) fn open_object_rw(&self, c: &ContentId) -> io::Result<File> {
        self.open_object(c)?;
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(self.object_path(c))
    }

    /// Takes object `c`'s file out of the store, leaving an identical copy in
    /// its place (atomically, by exchanging the two names), and returns the
    /// original as a staging file. Used when a writer opens a file whose
    /// passthrough readers are bound to the object's inode on disk.
    pub(crate) fn detach(&self, c: &ContentId) -> io::Result<Staging> {
        let object = self.object_path(c);
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let path = self.staging.join(format!("{n:016x}"));
        fs::copy(&object, &path)?;
        if let Err(e) = nix::fcntl::renameat2(
            nix::fcntl::AT_FDCWD,
            &path,
            nix::fcntl::AT_FDCWD,
            &object,
            nix::fcntl::RenameFlags::RENAME_EXCHANGE,
        ) {
            let _ = fs::remove_file(&path);
            return Err(e.into());
        }
        let file = OpenOptions::new().read(true).write(true).open(&path)?;
        Ok(Staging {
            path,
            file: std::sync::Arc::new(file),
        })
    }

    /// A new staging file, empty or holding a copy of `from`.
    pub(crate) fn new_staging(&self, from: Option<&ContentId>) -> io::Result<Staging> {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let path = self.staging.join(format!("{n:016x}"));
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        if let Some(c) = from {
            let mut src = self.open_object(c)?;
            // std::io::copy uses copy_file_range, which reflinks where the
            // filesystem can.
            if let Err(e) = io::copy(&mut src, &mut file) {
                let _ = fs::remove_file(&path);
                return Err(e);
            }
        }
        Ok(Staging {
            path,
            file: std::sync::Arc::new(file),
        })
    }

    /// Moves a finished staging file into place as object `c` (or drops it if
    /// that content is already stored). `durable`: the object's data and
    /// name are on disk when this returns, and the staging file stays (as a
    /// second name of the object) with its sync marker, so that a crash
    /// before the record is durable still finds it: the caller discards it
    /// ([`discard_staging`](Self::discard_staging)) once the record is.
    pub(crate) fn install(&self, staging: &Path, c: &ContentId, durable: bool) -> io::Result<()> {
        let dest = self.object_path(c);
        let place = |dest: &Path| {
            if durable {
                fs::hard_link(staging, dest)
            } else {
                fs::rename(staging, dest)
            }
        };
        if dest.exists() {
            if !durable {
                fs::remove_file(staging)?;
            }
        } else if let Err(e) = place(&dest) {
            if e.kind() != io::ErrorKind::NotFound {
                return Err(e);
            }
            self.create_fan_out(&dest, durable)?;
            place(&dest)?;
        }
        if durable { make_durable(&dest) } else { Ok(()) }
    }

    /// Installs a copy of a staging file as object `c`; the staging file
    /// stays. `durable` as for [`install`](Self::install).
    pub(crate) fn install_copy(
        &self,
        staging: &Path,
        c: &ContentId,
        durable: bool,
    ) -> io::Result<()> {
        let dest = self.object_path(c);
        if !dest.exists() {
            self.create_fan_out(&dest, durable)?;
            let n = self.counter.fetch_add(1, Ordering::Relaxed);
            let tmp = self.staging.join(format!("{n:016x}.copy"));
            if let Err(e) = fs::copy(staging, &tmp).and_then(|_| fs::rename(&tmp, &dest)) {
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
        }
        if durable { make_durable(&dest) } else { Ok(()) }
    }

    /// Creates the fan-out directory of object path `dest`; `durable`: its
    /// own entry is on disk too.
    fn create_fan_out(&self, dest: &Path, durable: bool) -> io::Result<()> {
        let dir = dest.parent().unwrap_or(&self.objects);
        if dir.exists() {
            return Ok(());
        }
        fs::create_dir_all(dir)?;
        if durable {
            File::open(&self.objects)?.sync_all()?;
        }
        Ok(())
    }

    /// Moves the data of a version that could not be committed to
    /// `rescued/` beside the objects, where an operator can recover it.
    pub(crate) fn rescue(&self, staging: &Path, ino: u64) -> io::Result<PathBuf> {
        let dir = self.objects.with_file_name("rescued");
        fs::create_dir_all(&dir)?;
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let dest = dir.join(format!("{secs}-inode{ino}-{n}"));
        fs::rename(staging, &dest)?;
        self.discard_staging(staging)?;
        Ok(dest)
    }

    /// Deletes object `c` (open descriptors keep working).
    pub fn remove(&self, c: &ContentId) -> io::Result<()> {
        match fs::remove_file(self.object_path(c)) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }

    /// Where [`sweep`](Self::sweep) puts objects that no record references.
    pub fn quarantine_dir(&self) -> PathBuf {
        self.objects.with_file_name("quarantine")
    }

    /// Moves every object that `referenced` rejects to
    /// [`quarantine_dir`](Self::quarantine_dir), never deleting it: a lost or
    /// replaced metadata database must not wipe content that may exist
    /// nowhere else. Returns how many were moved.
    pub fn sweep(&self, referenced: impl Fn(&ContentId) -> bool) -> io::Result<usize> {
        let quarantine = self.quarantine_dir();
        let mut removed = 0;
        for fan in fs::read_dir(&self.objects)? {
            let fan = fan?;
            if !fan.file_type()?.is_dir() {
                continue;
            }
            for obj in fs::read_dir(fan.path())? {
                let obj = obj?;
                let keep = obj
                    .file_name()
                    .to_str()
                    .and_then(|n| ContentId::from_hex(n).ok())
                    .is_some_and(|c| referenced(&c));
                if !keep {
                    if removed == 0 {
                        fs::create_dir_all(&quarantine)?;
                    }
                    fs::rename(obj.path(), quarantine.join(obj.file_name()))?;
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }
}

/// The extension of a sync marker.
const SYNC_MARKER: &str = "sync";
/// The inode of a marker that could not be read: recovered into `rescued/`.
pub(crate) const NO_INODE: u64 = 0;

fn marker_path(staging: &Path) -> PathBuf {
    staging.with_extension(SYNC_MARKER)
}

/// A staging file left by a previous run whose writer's `fsync` was
/// acknowledged: its bytes must be committed or kept, never dropped.
#[derive(Debug)]
pub(crate) struct SyncedStaging {
    pub(crate) path: PathBuf,
    /// The inode whose writer synced it ([`NO_INODE`] if unknown).
    pub(crate) ino: u64,
}

/// Files up to this size are hashed on the calling thread from one read;
/// larger ones are memory-mapped and hashed on all cores.
const SMALL_FILE: u64 = 1 << 20;

/// blake3 of a file's bytes.
pub(crate) fn hash_file(path: &Path, len: u64) -> io::Result<ContentId> {
    if len <= SMALL_FILE {
        return Ok(ContentId::of(&fs::read(path)?));
    }
    let mut hasher = blake3::Hasher::new();
    hasher.update_mmap_rayon(path)?;
    Ok(hasher.finalize().into())
}

/// blake3 of the first `len` bytes of a staging file (its length when the
/// caller looked). A small one is read through the descriptor already open,
/// not opened again by name: a commit of a tree of small files is mostly
/// such calls.
pub(crate) fn hash_staging(staging: &Staging, len: u64) -> io::Result<ContentId> {
    if len > SMALL_FILE {
        return hash_file(&staging.path, len);
    }
    let mut buf = vec![0u8; len as usize];
    let mut filled = 0;
    while filled < buf.len() {
        match std::os::unix::fs::FileExt::read_at(&*staging.file, &mut buf[filled..], filled as u64)
        {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(filled);
    Ok(ContentId::of(&buf))
}

/// Puts the data of the file at `path`, and its entry in its directory, on
/// disk.
fn make_durable(path: &Path) -> io::Result<()> {
    File::open(path)?.sync_all()?;
    match path.parent() {
        Some(dir) => File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn staging_commits_into_an_immutable_deduplicated_object() {
        let dir = tempfile::tempdir().unwrap();
        let store = ObjectStore::open(dir.path()).unwrap();
        let s = store.new_staging(None).unwrap();
        (&*s.file).write_all(b"hello").unwrap();
        let c = hash_file(&s.path, 5).unwrap();
        assert_eq!(c, ContentId::of(b"hello"));
        store.install(&s.path, &c, false).unwrap();
        assert_eq!(fs::read(store.object_path(&c)).unwrap(), b"hello");

        // Copy-on-write staging from the object, then the same content again.
        let copy = store.new_staging(Some(&c)).unwrap();
        assert_eq!(fs::read(&copy.path).unwrap(), b"hello");
        store.install(&copy.path, &c, false).unwrap();
        assert!(!copy.path.exists(), "duplicate staging is dropped");

        // Durable installs, by rename and by copy, give the same objects.
        for (i, by_copy) in [(0u8, false), (1, true)] {
            let s = store.new_staging(None).unwrap();
            (&*s.file).write_all(&[i; 3]).unwrap();
            let c = hash_file(&s.path, 3).unwrap();
            if by_copy {
                store.install_copy(&s.path, &c, true).unwrap();
                assert!(s.path.exists(), "a copy leaves the staging file");
            } else {
                store.install(&s.path, &c, true).unwrap();
            }
            assert_eq!(fs::read(store.object_path(&c)).unwrap(), [i; 3]);
            store.remove(&c).unwrap();
        }

        assert_eq!(store.sweep(|_| true).unwrap(), 0);
        assert_eq!(store.sweep(|_| false).unwrap(), 1);
        assert!(!store.object_path(&c).exists());
        assert_eq!(
            fs::read(store.quarantine_dir().join(c.to_hex())).unwrap(),
            b"hello",
            "an unreferenced object is kept aside, not deleted"
        );
        assert_eq!(
            store
                .open_object(&ContentId::empty())
                .unwrap()
                .metadata()
                .unwrap()
                .len(),
            0
        );
    }

    #[test]
    fn reopening_discards_unsynced_staging_and_hands_back_synced_staging() {
        let dir = tempfile::tempdir().unwrap();
        let store = ObjectStore::open(dir.path()).unwrap();
        let plain = store.new_staging(None).unwrap();
        let synced = store.new_staging(None).unwrap();
        (&*synced.file).write_all(b"acknowledged").unwrap();
        store.mark_synced(&synced, 42, true).unwrap();
        store.mark_synced(&synced, 42, false).unwrap();
        // A marker whose file went (installed and discarded half-way).
        let gone = store.new_staging(None).unwrap();
        store.mark_synced(&gone, 7, true).unwrap();
        fs::remove_file(&gone.path).unwrap();
        drop(store);

        let store = ObjectStore::open(dir.path()).unwrap();
        let left = store.take_synced().unwrap();
        assert_eq!(left.len(), 1, "{left:?}");
        assert_eq!(
            (left[0].path.clone(), left[0].ino),
            (synced.path.clone(), 42)
        );
        assert_eq!(fs::read(&left[0].path).unwrap(), b"acknowledged");
        assert!(!plain.path.exists());
        assert!(!marker_path(&gone.path).exists());
        // New staging files never reuse a leftover's name.
        let fresh = store.new_staging(None).unwrap();
        assert!(fresh.path != synced.path && fresh.path != plain.path);

        // A durable install keeps the staging file until it is discarded.
        let c = hash_file(&synced.path, 12).unwrap();
        store.install(&synced.path, &c, true).unwrap();
        assert!(synced.path.exists() && store.object_path(&c).exists());
        store.discard_staging(&synced.path).unwrap();
        assert!(!synced.path.exists() && !marker_path(&synced.path).exists());
        assert_eq!(fs::read(store.object_path(&c)).unwrap(), b"acknowledged");
        assert!(store.take_synced().unwrap().is_empty());
    }
}
