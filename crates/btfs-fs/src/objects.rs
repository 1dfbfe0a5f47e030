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
    /// Opens the store under `state_dir`, finishing the promotions a crash
    /// interrupted. Leftover staging files stay until
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
        let store = Self {
            objects,
            staging,
            counter: AtomicU64::new(next),
        };
        // Before anything looks at the objects (the unreferenced-object
        // sweep): a promotion's files are in flux until it is finished.
        store.redo_promotions()?;
        Ok(store)
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

    /// Prepares taking object `base` out of the store to become, with the
    /// writes in `delta` applied, the file of a new version (a
    /// *promotion*: no copy). Before the object is touched, the delta's
    /// data and an intent naming everything needed to finish are on disk,
    /// so that a crash from there on is finished at the next start
    /// ([`redo_promotions`]) rather than leaving the object torn. Then
    /// [`PreparedPromotion::take`] moves the object (or `cancel` drops the
    /// intent).
    pub(crate) fn prepare_promotion(
        &self,
        delta: &Staging,
        intent: &Promotion,
    ) -> io::Result<PreparedPromotion> {
        delta.file.sync_data()?;
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let path = self.staging.join(format!("{n:016x}"));
        let intent_path = self.staging.join(format!("{n:016x}.{PROMOTE}"));
        let text = intent.encode(&delta.path, &path);
        {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&intent_path)?;
            io::Write::write_all(&mut f, text.as_bytes())?;
            f.sync_all()?;
        }
        File::open(&self.staging)?.sync_all()?;
        Ok(PreparedPromotion {
            object: self.object_path(&intent.base),
            path,
            intent: intent_path,
        })
    }

    /// Finishes the promotions a crash interrupted: the base object (or
    /// the half-written file taken from it) gets the delta's writes again
    /// and is left as a synced staging file of its inode, which recovery
    /// then commits. A version is never left torn.
    fn redo_promotions(&self) -> io::Result<()> {
        for e in fs::read_dir(&self.staging)? {
            let intent = e?.path();
            if intent.extension().and_then(|x| x.to_str()) != Some(PROMOTE) {
                continue;
            }
            match self.redo_promotion(&intent) {
                Ok(()) => {}
                Err(e) => tracing::error!(
                    "could not finish a change interrupted by a crash ({}): {e}",
                    intent.display()
                ),
            }
            fs::remove_file(&intent)?;
        }
        Ok(())
    }

    fn redo_promotion(&self, intent: &Path) -> io::Result<()> {
        let p = Promotion::decode(&fs::read_to_string(intent)?)
            .ok_or_else(|| io::Error::other("unreadable promotion intent"))?;
        let (delta, target) = (self.staging.join(&p.delta), self.staging.join(&p.target));
        let complete = if target.exists() {
            false
        } else if self.object_path(&p.base).exists() {
            fs::rename(self.object_path(&p.base), &target)?;
            false
        } else if self.object_path(&p.new).exists() {
            // Installed; its record may not be durable: out of the store
            // (the unreferenced-object sweep would set it aside), recovery
            // installs it again.
            fs::rename(self.object_path(&p.new), &target)?;
            true
        } else {
            return Err(io::Error::other(
                "neither the old nor the new content is here",
            ));
        };
        if !complete {
            let file = OpenOptions::new().read(true).write(true).open(&target)?;
            let src = File::open(&delta)?;
            file.set_len(p.kept.min(p.len))?;
            file.set_len(p.len)?;
            let mut buf = vec![0u8; 1 << 20];
            for (s, e) in &p.ranges {
                let mut at = *s;
                while at < *e {
                    let n = (e - at).min(buf.len() as u64) as usize;
                    std::os::unix::fs::FileExt::read_exact_at(&src, &mut buf[..n], at)?;
                    std::os::unix::fs::FileExt::write_all_at(&file, &buf[..n], at)?;
                    at += n as u64;
                }
            }
            file.sync_all()?;
            if hash_file(&target, p.len)? != p.new {
                tracing::warn!(
                    "a change finished after a crash does not hash to the content it was to be ({})",
                    target.display()
                );
            }
        }
        let _ = fs::remove_file(&delta);
        let marker = marker_path(&target);
        fs::write(&marker, format!("{}\n", p.ino))?;
        File::open(&marker)?.sync_all()?;
        File::open(&self.staging)?.sync_all()?;
        tracing::info!(
            ino = p.ino,
            "finishing a change of a large file interrupted by a crash"
        );
        Ok(())
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

    /// Moves object `c` out of the store to a new name in `staging/` (for
    /// the caller to hand on or delete; deleted at the next start if left).
    pub(crate) fn take_out(&self, c: &ContentId) -> io::Result<PathBuf> {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let path = self.staging.join(format!("{n:016x}"));
        fs::rename(self.object_path(c), &path)?;
        Ok(path)
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
/// Extension of a promotion intent in `staging/`.
const PROMOTE: &str = "promote";

/// A promotion whose intent is on disk (see
/// [`ObjectStore::prepare_promotion`]).
#[derive(Debug)]
pub(crate) struct PreparedPromotion {
    object: PathBuf,
    path: PathBuf,
    pub(crate) intent: PathBuf,
}

impl PreparedPromotion {
    /// Moves the base object out of the store: the returned file is the
    /// new version's, to be written.
    pub(crate) fn take(&self) -> io::Result<Staging> {
        fs::rename(&self.object, &self.path)?;
        let file = match OpenOptions::new().read(true).write(true).open(&self.path) {
            Ok(f) => f,
            Err(e) => {
                // Back into the store before the intent may go.
                fs::rename(&self.path, &self.object)?;
                return Err(e);
            }
        };
        Ok(Staging {
            path: self.path.clone(),
            file: std::sync::Arc::new(file),
        })
    }

    /// Gives the promotion up before `take`.
    pub(crate) fn cancel(self) {
        let _ = fs::remove_file(&self.intent);
    }
}

/// What finishing a promotion needs: the inode, the base and new content,
/// the new length, how much of the base is kept, and the delta's ranges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Promotion {
    pub(crate) ino: u64,
    pub(crate) base: ContentId,
    pub(crate) new: ContentId,
    pub(crate) len: u64,
    pub(crate) kept: u64,
    pub(crate) ranges: Vec<(u64, u64)>,
    /// File names in `staging/` (filled by `encode`'s caller).
    delta: String,
    target: String,
}

impl Promotion {
    pub(crate) fn new(
        ino: u64,
        base: ContentId,
        new: ContentId,
        len: u64,
        kept: u64,
        ranges: Vec<(u64, u64)>,
    ) -> Self {
        Self {
            ino,
            base,
            new,
            len,
            kept,
            ranges,
            delta: String::new(),
            target: String::new(),
        }
    }

    fn encode(&self, delta: &Path, target: &Path) -> String {
        let name = |p: &Path| {
            p.file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_owned()
        };
        let mut t = format!(
            "{}\n{}\n{}\n{}\n{}\n{}\n{}\n",
            self.ino,
            self.base.to_hex(),
            self.new.to_hex(),
            self.len,
            self.kept,
            name(delta),
            name(target)
        );
        for (s, e) in &self.ranges {
            t.push_str(&format!("{s} {e}\n"));
        }
        t
    }

    fn decode(t: &str) -> Option<Self> {
        let mut l = t.lines();
        let ino = l.next()?.parse().ok()?;
        let base = ContentId::from_hex(l.next()?).ok()?;
        let new = ContentId::from_hex(l.next()?).ok()?;
        let len = l.next()?.parse().ok()?;
        let kept = l.next()?.parse().ok()?;
        let delta = l.next()?.to_owned();
        let target = l.next()?.to_owned();
        // Names of files in staging/ only.
        if delta.contains('/') || target.contains('/') || delta.is_empty() || target.is_empty() {
            return None;
        }
        let mut ranges = Vec::new();
        for line in l {
            let (s, e) = line.split_once(' ')?;
            ranges.push((s.parse().ok()?, e.parse().ok()?));
        }
        Some(Self {
            ino,
            base,
            new,
            len,
            kept,
            ranges,
            delta,
            target,
        })
    }
}
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
    use std::{io::Write, os::unix::fs::FileExt};

    use super::*;

    /// A promotion interrupted at each step is finished at the next open:
    /// the inode's staging file holds the new content, marked for recovery.
    #[test]
    fn an_interrupted_promotion_is_finished_at_the_next_start() {
        // 0: before the base was taken; 1: taken, nothing applied;
        // 2: half applied; 3: installed as the new object already.
        for step in 0..4 {
            let dir = tempfile::tempdir().unwrap();
            let store = ObjectStore::open(dir.path()).unwrap();
            let base: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
            let base_id = ContentId::of(&base);
            let s = store.new_staging(None).unwrap();
            fs::write(&s.path, &base).unwrap();
            store.install(&s.path, &base_id, false).unwrap();
            // New content: a write at 1000, cut to 200,000, grown to 250,000.
            let mut new = base.clone();
            new[1000..1010].fill(7);
            new.truncate(200_000);
            new.resize(250_000, 0);
            let new_id = ContentId::of(&new);
            let delta = store.new_staging(None).unwrap();
            delta.file.set_len(250_000).unwrap();
            delta.file.write_all_at(&[7u8; 10], 1000).unwrap();
            let intent = Promotion::new(42, base_id, new_id, 250_000, 200_000, vec![(1000, 1010)]);
            if step == 0 {
                // The intent is written, the rename did not happen.
                let prepared = store.prepare_promotion(&delta, &intent).unwrap();
                assert!(prepared.intent.exists());
            } else {
                let taken = store
                    .prepare_promotion(&delta, &intent)
                    .unwrap()
                    .take()
                    .unwrap();
                if step >= 2 {
                    taken.file.write_all_at(&[7u8; 5], 1000).unwrap();
                    taken.file.set_len(200_000).unwrap();
                }
                if step == 3 {
                    taken.file.write_all_at(&[7u8; 10], 1000).unwrap();
                    taken.file.set_len(250_000).unwrap();
                    store.install(&taken.path, &new_id, false).unwrap();
                }
            }
            drop(store);
            let store = ObjectStore::open(dir.path()).unwrap();
            let synced = store.take_synced().unwrap();
            assert_eq!(synced.len(), 1, "step {step}");
            assert_eq!(synced[0].ino, 42);
            assert!(
                fs::read(&synced[0].path).unwrap() == new,
                "step {step}: the new content"
            );
            let left: Vec<_> = fs::read_dir(dir.path().join("staging"))
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert_eq!(
                left.len(),
                2,
                "step {step}: the file and its marker only: {left:?}"
            );
        }
    }

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
