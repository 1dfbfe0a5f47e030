//! `btfs pin PATH...` and `btfs unpin PATH...`: each path is resolved to
//! its mount (as `btfs torrent` does) and sent to that mount's daemon,
//! which checks that the caller may read it.

use std::{
    path::{Path, PathBuf},
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
    let (root, rel) = control::locate(path, !pin)?;
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
