//! Ordered key-value backends for the [`Store`](crate::Store).

use std::{collections::BTreeMap, ops::Bound, path::Path, sync::Mutex};

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

/// sled 0.34: one tree of single-key writes (see the crate docs for why not batches).
#[derive(Debug)]
pub struct SledBackend {
    db: sled::Db,
}

impl SledBackend {
    pub fn open(dir: &Path) -> Result<Self> {
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
        Ok(Self { db })
    }
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
        match value {
            Some(v) => self.db.insert(key, v).map(drop).map_err(sled_err),
            None => self.db.remove(key).map(drop).map_err(sled_err),
        }
    }

    fn flush(&self) -> Result<()> {
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
