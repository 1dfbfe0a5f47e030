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

/// Answers `torrent PATH`: the `.torrent` of a file, as hex, or an error.
pub(crate) type TorrentFn = Arc<
    dyn Fn(String) -> std::pin::Pin<Box<dyn Future<Output = serde_json::Value> + Send>>
        + Send
        + Sync,
>;

/// Directory of control sockets: `$BTFS_RUN_DIR`, else `/run/btfs` for root,
/// else `$XDG_RUNTIME_DIR/btfs`, else `/tmp/btfs-UID`.
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

/// Answers requests until the task is dropped. `status` renders the reply.
pub(crate) async fn serve(
    listener: UnixListener,
    status: Arc<dyn Fn() -> serde_json::Value + Send + Sync>,
    torrent: TorrentFn,
) {
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
        let status = status.clone();
        let torrent = torrent.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let exchange = async {
                let (read, mut write) = stream.into_split();
                let mut line = String::new();
                let mut reader = tokio::io::BufReader::new(read).take(MAX_REQUEST as u64);
                reader.read_line(&mut line).await?;
                let line = line.trim_end_matches('\n');
                let reply = match line.split_once(' ') {
                    _ if line == "status" => status(),
                    Some(("torrent", path)) => torrent(path.to_owned()).await,
                    _ => serde_json::json!({ "error": format!("unknown request {line:?}") }),
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

/// Asks the daemon serving `mountpoint` for its status.
pub(crate) fn query_status(mountpoint: &Path) -> Result<serde_json::Value> {
    let canonical = std::fs::canonicalize(mountpoint)
        .with_context(|| format!("{} is not accessible", mountpoint.display()))?;
    query(&canonical, "status", CLIENT_TIMEOUT)
}

/// The `.torrent` of a file in a btfs mount.
pub(crate) fn query_torrent(file: &Path) -> Result<Vec<u8>> {
    let canonical = std::fs::canonicalize(file)
        .with_context(|| format!("{} is not accessible", file.display()))?;
    let (root, rel) = canonical
        .ancestors()
        .skip(1)
        .find(|a| socket_path(a).exists())
        .and_then(|root| Some((root, canonical.strip_prefix(root).ok()?)))
        .ok_or_else(|| anyhow::anyhow!("{} is not in a btfs mount", canonical.display()))?;
    let rel = rel
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("{} is not valid UTF-8", rel.display()))?;
    if rel.contains('\n') {
        bail!("{rel:?}: a path with a newline cannot be asked for");
    }
    let v = query(root, &format!("torrent {rel}"), SLOW_CLIENT_TIMEOUT)?;
    let hex = v["torrent"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("the daemon sent no torrent"))?;
    hex::decode(hex).context("the daemon sent a malformed torrent")
}

fn query(canonical: &Path, request: &str, timeout: Duration) -> Result<serde_json::Value> {
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
