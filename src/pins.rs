//! `btfs pin PATH...` and `btfs unpin PATH...`: each path is resolved to
//! its mount (as `btfs torrent` does) and sent to that mount's daemon,
//! which checks that the caller may read it.

use std::{
    path::{Component, Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use btfs_node::PinStatus;

use crate::{control, status::human_bytes};

/// A pin walks the pinned tree in the store before it answers: a large
/// tree gets this long.
const PIN_TIMEOUT: Duration = Duration::from_secs(60);

/// Pins (`pin`) or unpins each of `paths`; every path is tried, and the
/// command fails if any did.
pub(crate) fn run(paths: &[PathBuf], pin: bool) -> Result<()> {
    let mut failed = 0;
    for path in paths {
        match one(path, pin) {
            Ok(line) => println!("{line}"),
            Err(e) => {
                eprintln!("btfs: {}", crate::describe(&e));
                failed += 1;
            }
        }
    }
    match failed {
        0 => Ok(()),
        n => bail!(
            "{n} of {} paths not {}",
            paths.len(),
            if pin { "pinned" } else { "unpinned" }
        ),
    }
}

fn one(path: &Path, pin: bool) -> Result<String> {
    let (root, rel) = resolve(path, pin)?;
    let shown = path.display();
    if pin {
        let v = control::query(&root, &format!("pin {rel}"), PIN_TIMEOUT)?;
        let s: PinStatus = serde_json::from_value(v)
            .context("the daemon sent a pin reply this btfs cannot read")?;
        let fetch = s.files - s.files_held;
        Ok(format!(
            "pinned {shown}: {} files ({}), {}",
            s.files,
            human_bytes(s.bytes),
            if fetch == 0 {
                "all held here".to_owned()
            } else {
                format!(
                    "{fetch} being fetched ({})",
                    human_bytes(s.bytes - s.bytes_held)
                )
            }
        ))
    } else {
        control::query(&root, &format!("unpin {rel}"), PIN_TIMEOUT)?;
        Ok(format!("unpinned {shown}"))
    }
}

/// The mount root of `path` and the path relative to it (empty for the
/// root). A pin's path must exist; an unpin's may be gone (its deepest
/// existing directory is resolved, the rest appended).
fn resolve(path: &Path, must_exist: bool) -> Result<(PathBuf, String)> {
    let canonical = match std::fs::canonicalize(path) {
        Ok(c) => c,
        Err(e) if must_exist || e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("{} is not accessible", path.display()));
        }
        Err(_) => resolve_gone(path)?,
    };
    let (root, rel) = canonical
        .ancestors()
        .find(|a| control::socket_path(a).exists())
        .and_then(|root| Some((root, canonical.strip_prefix(root).ok()?)))
        .ok_or_else(|| anyhow::anyhow!("{} is not in a btfs mount", canonical.display()))?;
    let rel = rel
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("{} is not valid UTF-8", rel.display()))?;
    if rel.contains('\n') {
        bail!("{rel:?}: a path with a newline cannot be pinned");
    }
    Ok((root.to_owned(), rel.to_owned()))
}

/// `path` made absolute and canonical although it does not exist: its
/// deepest existing ancestor canonicalized, the missing names appended.
fn resolve_gone(path: &Path) -> Result<PathBuf> {
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
                (Some(parent), Some(Component::Normal(name))) => {
                    missing.push(name.to_owned());
                    at = parent;
                }
                _ => bail!("{} is not accessible", path.display()),
            },
        }
    }
}
