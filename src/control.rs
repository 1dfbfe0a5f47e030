//! The daemon's control socket: `btfs status` (and later commands) talk to a
//! running daemon over a Unix socket named after its mountpoint.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt},
    net::UnixListener,
    sync::Semaphore,
};
use tracing::{debug, warn};

/// Connections served at once; more wait in the listen backlog.
const MAX_CLIENTS: usize = 16;
/// Longest request line accepted (a path is at most 4096 bytes).
const MAX_REQUEST: usize = 8192;
/// A client that does not finish its exchange in this time is dropped.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// A request that may ask other members (`torrent`) gets this long.
const SLOW_CLIENT_TIMEOUT: Duration = Duration::from_secs(60);

/// Answers a request that takes arguments from `Caller` (`torrent PATH`:
/// the `.torrent` of a file, as hex; `generate ...`: how many records were
/// made), or an error.
pub(crate) type RequestFn = Arc<
    dyn Fn(String, Caller) -> std::pin::Pin<Box<dyn Future<Output = serde_json::Value> + Send>>
        + Send
        + Sync,
>;

/// Who is on the other end of a control connection (`SO_PEERCRED`), for
/// requests that name a path: they get only what the file's permissions
/// would let them read.
#[derive(Debug, Clone)]
pub(crate) struct Caller {
    pub uid: u32,
    /// The primary group and the supplementary ones (from `/proc`).
    pub gids: Vec<u32>,
}

impl Caller {
    fn of(stream: &tokio::net::UnixStream) -> std::io::Result<Self> {
        let cred = stream.peer_cred()?;
        let mut gids = vec![cred.gid()];
        if let Some(pid) = cred.pid() {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            if let Some(line) = status.lines().find(|l| l.starts_with("Groups:")) {
                gids.extend(
                    line["Groups:".len()..]
                        .split_whitespace()
                        .filter_map(|g| g.parse::<u32>().ok()),
                );
            }
        }
        Ok(Self {
            uid: cred.uid(),
            gids,
        })
    }

    /// Whether the permission bits `mode` of a file owned by `uid`:`gid`
    /// grant this caller `want` (a mask of 4 read, 2 write, 1 search).
    pub(crate) fn may(&self, mode: u32, uid: u32, gid: u32, want: u32) -> bool {
        if self.uid == 0 {
            return want & 1 == 0 || mode & 0o111 != 0;
        }
        let bits = if self.uid == uid {
            mode >> 6
        } else if self.gids.contains(&gid) {
            mode >> 3
        } else {
            mode
        };
        bits & want == want
    }
}

/// Creates the directory of control sockets, private to this user (0700).
/// An existing one must belong to this user; its mode is set to 0700.
pub(crate) fn create_run_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("control socket directory {}", dir.display()))?;
    let meta = std::fs::symlink_metadata(dir)
        .with_context(|| format!("control socket directory {}", dir.display()))?;
    let me = nix::unistd::geteuid().as_raw();
    if !meta.is_dir() || meta.uid() != me {
        bail!(
            "control socket directory {} is not a directory owned by uid {me} (owner {}): remove it or set BTFS_RUN_DIR",
            dir.display(),
            meta.uid()
        );
    }
    if meta.mode() & 0o777 != 0o700 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("control socket directory {}", dir.display()))?;
    }
    Ok(())
}

/// Directory of control sockets: `$BTFS_RUN_DIR`, else `/run/btfs` for root,
/// else `$XDG_RUNTIME_DIR/btfs`, else `/tmp/btfs-UID`. The daemon makes it
/// private (see [`create_run_dir`]); its socket is 0600.
pub(crate) fn run_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("BTFS_RUN_DIR") {
        return PathBuf::from(d);
    }
    let uid = nix::unistd::geteuid();
    if uid.is_root() {
        return PathBuf::from("/run/btfs");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) => PathBuf::from(d).join("btfs"),
        None => PathBuf::from(format!("/tmp/btfs-{uid}")),
    }
}

/// The control socket of the daemon serving `mountpoint` (a canonical path).
pub(crate) fn socket_path(mountpoint: &Path) -> PathBuf {
    let h = blake3::hash(mountpoint.as_os_str().as_encoded_bytes());
    run_dir().join(format!("{}.sock", &h.to_hex()[..16]))
}

/// The requests a daemon answers, by their first word: `status`,
/// `torrent PATH`, `generate ...`, and whatever other layers register.
/// Each gets the rest of the line (empty if none) and the caller.
pub(crate) type Handlers = std::collections::HashMap<&'static str, RequestFn>;

/// Answers requests until the task is dropped.
pub(crate) async fn serve(listener: UnixListener, handlers: Handlers) {
    let handlers = Arc::new(handlers);
    let permits = Arc::new(Semaphore::new(MAX_CLIENTS));
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                warn!("control socket accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let handlers = handlers.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let caller = match Caller::of(&stream) {
                Ok(c) => c,
                Err(e) => {
                    warn!("control socket: no credentials for a client: {e}");
                    return;
                }
            };
            let exchange = async {
                let (read, mut write) = stream.into_split();
                let mut line = String::new();
                let mut reader = tokio::io::BufReader::new(read).take(MAX_REQUEST as u64);
                reader.read_line(&mut line).await?;
                let line = line.trim_end_matches('\n');
                let (verb, args) = line.split_once(' ').unwrap_or((line, ""));
                let reply = match handlers.get(verb) {
                    Some(h) => h(args.to_owned(), caller).await,
                    None => serde_json::json!({ "error": format!("unknown request {line:?}") }),
                };
                let mut out = serde_json::to_vec(&reply).map_err(std::io::Error::other)?;
                out.push(b'\n');
                write.write_all(&out).await
            };
            match tokio::time::timeout(SLOW_CLIENT_TIMEOUT, exchange).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => debug!("control client: {e}"),
                Err(_) => debug!("control client timed out"),
            }
        });
    }
}

/// Asks the daemon serving `mountpoint` to make one slice of a generated
/// namespace (see `btfs_node::Generate`); returns how many records it made.
pub(crate) fn query_generate(mountpoint: &Path, args: &str) -> Result<u64> {
    let canonical = std::fs::canonicalize(mountpoint)
        .with_context(|| format!("{} is not accessible", mountpoint.display()))?;
    let v = query(&canonical, &format!("generate {args}"), SLOW_CLIENT_TIMEOUT)?;
    v["records"]
        .as_u64()
        .context("the daemon sent a generate reply without a count")
}

/// A remount waits this long for the daemon: it reads the files named and
/// the mesh applies the change (bounded there by `MESH_CHANGE_TIMEOUT`).
const REMOUNT_TIMEOUT: Duration = Duration::from_secs(15);

/// `mount -o remount,OPTIONS MOUNTPOINT` (mount.btfs runs `btfs mount
/// NAME MOUNTPOINT -o remount,...`): asks the daemon serving `mountpoint`
/// to change `options` live. It refuses, changing nothing, when one of them
/// cannot change live or a file named cannot be read.
pub(crate) fn remount(mountpoint: &Path, options: &str) -> Result<serde_json::Value> {
    let canonical = std::fs::canonicalize(mountpoint)
        .with_context(|| format!("{} is not accessible", mountpoint.display()))?;
    if options.contains('\n') {
        bail!("mount options with a newline cannot be sent");
    }
    query(
        &canonical,
        &format!("reconfigure {options}"),
        REMOUNT_TIMEOUT,
    )
}

/// Asks the daemon serving `mountpoint` for its status.
pub(crate) fn query_status(mountpoint: &Path) -> Result<serde_json::Value> {
    let canonical = std::fs::canonicalize(mountpoint)
        .with_context(|| format!("{} is not accessible", mountpoint.display()))?;
    query(&canonical, "status", CLIENT_TIMEOUT)
}

/// Where `path` is: the root of the btfs mount it lies in and the path
/// relative to that root (empty for the root itself). With `gone_ok` the
/// path may no longer exist (a deleted file's history, an unpin): its
/// deepest existing ancestor is made canonical and the missing names are
/// appended as given.
pub(crate) fn locate(path: &Path, gone_ok: bool) -> Result<(PathBuf, String)> {
    let canonical = match std::fs::canonicalize(path) {
        Ok(c) => c,
        Err(e) if !gone_ok || e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("{} is not accessible", path.display()));
        }
        Err(_) => canonical_gone(path)?,
    };
    let (root, rel) = canonical
        .ancestors()
        .find(|a| socket_path(a).exists())
        .and_then(|root| Some((root, canonical.strip_prefix(root).ok()?)))
        .ok_or_else(|| anyhow::anyhow!("{} is not in a btfs mount", canonical.display()))?;
    let rel = rel
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("{} is not valid UTF-8", rel.display()))?;
    if rel.contains('\n') {
        bail!("{rel:?}: a path with a newline cannot be sent to the daemon");
    }
    Ok((root.to_owned(), rel.to_owned()))
}

/// `path` made absolute and canonical although it does not exist.
fn canonical_gone(path: &Path) -> Result<PathBuf> {
    let absolute = std::path::absolute(path)
        .with_context(|| format!("{} is not accessible", path.display()))?;
    let mut missing = Vec::new();
    let mut at = absolute.as_path();
    loop {
        match std::fs::canonicalize(at) {
            Ok(mut c) => {
                for name in missing.iter().rev() {
                    c.push(name);
                }
                return Ok(c);
            }
            Err(_) => match (at.parent(), at.components().next_back()) {
                (Some(parent), Some(std::path::Component::Normal(name))) => {
                    missing.push(name.to_owned());
                    at = parent;
                }
                _ => bail!("{} is not accessible", path.display()),
            },
        }
    }
}

/// The `.torrent` of a file in a btfs mount.
pub(crate) fn query_torrent(file: &Path) -> Result<Vec<u8>> {
    let (root, rel) = locate(file, false)?;
    if rel.is_empty() {
        bail!("{} is a btfs mount, not a file in it", root.display());
    }
    let root = root.as_path();
    let v = query(root, &format!("torrent {rel}"), SLOW_CLIENT_TIMEOUT)?;
    let hex = v["torrent"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("the daemon sent no torrent"))?;
    hex::decode(hex).context("the daemon sent a malformed torrent")
}

pub(crate) fn query(
    canonical: &Path,
    request: &str,
    timeout: Duration,
) -> Result<serde_json::Value> {
    let sock = socket_path(canonical);
    let mut stream = UnixStream::connect(&sock).map_err(|e| {
        anyhow::anyhow!(
            "no btfs daemon answers for {} ({}: {e}); is it mounted?",
            canonical.display(),
            sock.display()
        )
    })?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.write_all(format!("{request}\n").as_bytes())?;
    let mut line = String::new();
    BufReader::new(stream)
        .read_line(&mut line)
        .context("reading the daemon's reply")?;
    let v: serde_json::Value =
        serde_json::from_str(&line).context("the daemon sent a malformed reply")?;
    if let Some(err) = v.get("error").and_then(|e| e.as_str()) {
        bail!("{err}");
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::Caller;

    #[test]
    fn a_caller_gets_what_the_permission_bits_grant_it() {
        let user = Caller {
            uid: 1000,
            gids: vec![1000, 27],
        };
        // Owner, group (primary and supplementary), others.
        assert!(user.may(0o600, 1000, 0, 4));
        assert!(!user.may(0o060, 1000, 1000, 4), "the owner's bits decide");
        assert!(user.may(0o040, 0, 27, 4));
        assert!(!user.may(0o004 | 0o600, 0, 5, 2));
        assert!(user.may(0o004, 0, 5, 4));
        assert!(!user.may(0o640, 0, 5, 4));
        assert!(user.may(0o711, 0, 0, 1) && !user.may(0o700, 0, 0, 1));
        let root = Caller {
            uid: 0,
            gids: vec![0],
        };
        assert!(root.may(0o000, 5, 5, 4));
        assert!(!root.may(0o600, 5, 5, 1) && root.may(0o100, 5, 5, 1));
    }
}
