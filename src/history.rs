//! `btfs log PATH` and `btfs restore PATH`: the client side (paths in a
//! mount, possibly deleted ones, resolved to the mount and a relative path),
//! and the daemon's request handlers.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use anyhow::{Context, Result, bail};
use btfs_node::{LogEntry, NodeHandle, Pick, Restored};
use serde::{Deserialize, Serialize};

use crate::control;

/// A restore may fetch the content from members first (the daemon bounds
/// the fetch below this).
const RESTORE_TIMEOUT: Duration = Duration::from_secs(60);
/// Listing a path's versions reads the store only.
const LOG_TIMEOUT: Duration = Duration::from_secs(10);

/// A restore request, one JSON line on the control socket.
#[derive(Debug, Serialize, Deserialize)]
struct RestoreRequest {
    path: String,
    /// Seconds since the epoch (`--at`).
    at: Option<i64>,
    /// Hex prefix of a content hash (`--version`).
    version: Option<String>,
    to: Option<String>,
}

/// `path` (which may no longer exist) as its mount and the path relative
/// to it; the mount itself is refused.
fn in_mount(path: &Path) -> Result<(PathBuf, String)> {
    let (root, rel) = control::locate(path, true)?;
    if rel.is_empty() {
        bail!("{} is the mount itself, not a file in it", root.display());
    }
    Ok((root, rel))
}

/// `--at`: RFC 3339 (`2026-12-03T18:00:00Z`, `2026-12-03 18:00:00`, UTC)
/// or a duration ago (`90m`, `2h`, `1d`).
pub(crate) fn parse_at(v: &str) -> Result<i64> {
    let t = if let Ok(d) = humantime::parse_duration(v) {
        SystemTime::now()
            .checked_sub(d)
            .ok_or_else(|| anyhow::anyhow!("--at {v}: too far back"))?
    } else {
        humantime::parse_rfc3339_weak(v).map_err(|_| {
            anyhow::anyhow!(
                "--at {v}: expected a time (2026-12-03T18:00:00Z, UTC) or a duration ago (90m, 2d)"
            )
        })?
    };
    Ok(t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX)))
}

fn when(secs: i64) -> String {
    u64::try_from(secs).map_or_else(
        |_| "-".to_owned(),
        |s| {
            humantime::format_rfc3339_seconds(SystemTime::UNIX_EPOCH + Duration::from_secs(s))
                .to_string()
        },
    )
}

/// `btfs log PATH`.
pub(crate) fn log(path: &Path, json: bool) -> Result<()> {
    let (root, rel) = in_mount(path)?;
    let v = control::query(&root, &format!("log {rel}"), LOG_TIMEOUT)?;
    if json {
        println!("{}", v["versions"]);
        return Ok(());
    }
    let entries: Vec<LogEntry> = serde_json::from_value(v["versions"].clone())
        .context("the daemon sent a log this btfs cannot read")?;
    println!(
        "{:<12}  {:<20}  {:<20}  {:<10}  {:>10}  where",
        "version", "made (UTC)", "replaced (UTC)", "author", "size"
    );
    for e in entries {
        let version = if e.deleted {
            "deleted".to_owned()
        } else {
            e.content
                .as_deref()
                .map_or("-", |c| &c[..12.min(c.len())])
                .to_owned()
        };
        let replaced = match (e.current, e.superseded) {
            (true, _) => "(current)".to_owned(),
            (false, Some(s)) => when(s),
            (false, None) => "-".to_owned(),
        };
        let mut place = Vec::new();
        if e.held_here {
            place.push("here".to_owned());
        }
        if !e.deleted {
            if let Some(m) = &e.author_member {
                place.push(format!("author {}", short(m)));
            }
            place.extend(e.holders.iter().map(|h| short(h)));
        }
        println!(
            "{:<12}  {:<20}  {:<20}  {:<10}  {:>10}  {}",
            version,
            when(e.made),
            replaced,
            &e.author[..8.min(e.author.len())],
            if e.deleted {
                "-".to_owned()
            } else {
                crate::status::human_bytes(e.size)
            },
            if place.is_empty() {
                "-".to_owned()
            } else {
                place.join(", ")
            }
        );
    }
    Ok(())
}

/// The tail of a peer id, as `btfs status` shows members.
fn short(peer: &str) -> String {
    let n = peer.len();
    peer[n.saturating_sub(8)..].to_owned()
}

/// `btfs restore PATH [--at TIME | --version HASH] [--to NEWPATH]`.
pub(crate) fn restore(
    path: &Path,
    at: Option<&str>,
    version: Option<String>,
    to: Option<&Path>,
) -> Result<()> {
    let (root, rel) = in_mount(path)?;
    let to = match to {
        Some(t) => {
            let (to_root, to_rel) = in_mount(t)?;
            if to_root != root {
                bail!(
                    "--to {}: not in the same mount as {}",
                    t.display(),
                    path.display()
                );
            }
            Some(to_rel)
        }
        None => None,
    };
    let req = RestoreRequest {
        path: rel,
        at: at.map(parse_at).transpose()?,
        version,
        to,
    };
    let line = serde_json::to_string(&req)?;
    let v = control::query(&root, &format!("restore {line}"), RESTORE_TIMEOUT)?;
    let r: Restored =
        serde_json::from_value(v).context("the daemon sent a reply this btfs cannot read")?;
    eprintln!(
        "restored {} ({}, content {}){}",
        root.join(&r.path).display(),
        crate::status::human_bytes(r.size),
        &r.content[..12.min(r.content.len())],
        if r.fetched {
            ", fetched from members"
        } else {
            ""
        }
    );
    Ok(())
}

/// The daemon's `log` and `restore` handlers.
pub(crate) fn handlers(node: &NodeHandle, into: &mut control::Handlers) {
    let h = node.clone();
    into.insert(
        "log",
        Arc::new(move |path: String, caller: control::Caller| {
            let v = match h.log(&path, |m, u, g, w| caller.may(m, u, g, w)) {
                Ok(versions) => serde_json::json!({ "versions": versions }),
                Err(e) => serde_json::json!({ "error": e }),
            };
            Box::pin(async move { v })
        }),
    );
    let h = node.clone();
    into.insert(
        "restore",
        Arc::new(move |args: String, caller: control::Caller| {
            let h = h.clone();
            Box::pin(async move {
                let req: RestoreRequest = match serde_json::from_str(&args) {
                    Ok(r) => r,
                    Err(e) => return serde_json::json!({ "error": format!("btfs restore: bad request: {e}") }),
                };
                let pick = match (req.at, req.version) {
                    (Some(_), Some(_)) => {
                        return serde_json::json!({ "error": "--at and --version exclude each other" });
                    }
                    (Some(at), None) => Pick::At(btfs_core::Timestamp { secs: at, nanos: 999_999_999 }),
                    (None, Some(v)) => Pick::Version(v),
                    (None, None) => Pick::Previous,
                };
                let may = |m, u, g, w| caller.may(m, u, g, w);
                match h.restore(&req.path, pick, req.to.as_deref(), may).await {
                    Ok(r) => serde_json::to_value(r).unwrap_or_else(|e| serde_json::json!({ "error": e.to_string() })),
                    Err(e) => serde_json::json!({ "error": e }),
                }
            })
        }),
    );
}
