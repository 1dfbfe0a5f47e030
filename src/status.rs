//! The text of `btfs status`: what an operator reads about one node, also
//! redrawn by `btfs status --watch` (see `watch.rs`).

use std::fmt::Write as _;

use btfs_node::NodeStatus;

/// `writeln!` into a `String`, which cannot fail: its `fmt::Result` is
/// always `Ok`, so it is dropped here rather than at every line.
macro_rules! outln {
    ($out:expr, $($arg:tt)*) => {
        let _ = writeln!($out, $($arg)*);
    };
}

/// `1.5 MiB`: binary units, one decimal, exact below 1 KiB.
pub(crate) fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// `[#######.........]  43%`
pub(crate) fn progress_bar(done: u64, total: u64, width: usize) -> String {
    let frac = if total == 0 {
        1.0
    } else {
        (done as f64 / total as f64).min(1.0)
    };
    let filled = (frac * width as f64).round() as usize;
    format!(
        "[{}{}] {:>3}%",
        "#".repeat(filled),
        ".".repeat(width - filled),
        (frac * 100.0).floor() as u64
    )
}

/// The text of `btfs status`: one snapshot of a node.
pub(crate) fn render(v: &NodeStatus) -> String {
    render_with(v, true)
}

/// The same text without the fetches' progress lines: `btfs status --watch`
/// on a terminal draws those as live bars of its own.
pub(crate) fn render_without_fetches(v: &NodeStatus) -> String {
    render_with(v, false)
}

fn render_with(v: &NodeStatus, fetches: bool) -> String {
    let mut out = String::new();
    let (i, f, r, bt) = (&v.info, &v.fs, &v.records, &v.bittorrent);
    outln!(out, "btfs {} on {}", i.name, i.mountpoint.display());
    outln!(out, "  node         {}", v.node_id);
    outln!(out, "  zone         {}", i.zone.as_deref().unwrap_or("-"));
    outln!(out, "  peer id      {} (for members=)", v.peer_id);
    outln!(out, "  state        {}", i.state_dir.display());
    outln!(
        out,
        "  key          {} (fingerprint {})",
        i.key_file.display(),
        i.key_fingerprint
    );
    outln!(
        out,
        "  files        {} ({}), {} directories, {} symlinks, {} tombstones",
        f.tree.files,
        human_bytes(f.tree.bytes),
        f.tree.dirs,
        f.tree.symlinks,
        f.tree.tombstones
    );
    outln!(
        out,
        "  open         {} handles on {} files",
        f.open_handles,
        f.open_files
    );
    outln!(
        out,
        "  commits      {} ({} failed)",
        f.commits,
        f.commit_failures
    );
    let window = v.info.options["history_secs"]
        .as_u64()
        .map(|s| humantime::format_duration(std::time::Duration::from_secs(s)).to_string());
    match window {
        Some(w) => {
            outln!(
                out,
                "  history      {} versions ({}) kept for {w}",
                f.history_versions,
                human_bytes(f.history_bytes)
            );
        }
        None if f.history_versions > 0 => {
            outln!(
                out,
                "  history      off ({} versions still kept, going)",
                f.history_versions
            );
        }
        None => {
            outln!(out, "  history      off");
        }
    }
    outln!(
        out,
        "  passthrough  {}",
        if f.passthrough { "on" } else { "off" }
    );
    let listen = if v.mesh.listen.is_empty() {
        "-".to_owned()
    } else {
        v.mesh.listen.join(", ")
    };
    outln!(out, "  mesh         listening on {listen}");
    let mdns = &v.mesh.mdns;
    let mdns_line = if !mdns.enabled {
        "off".to_owned()
    } else if mdns.running {
        format!(
            "running on {} ({} found, {} restarts)",
            mdns.interfaces.join(", "),
            mdns.discovered,
            mdns.restarts
        )
    } else {
        format!(
            "not running on any interface yet ({} restarts; see the log)",
            mdns.restarts
        )
    };
    outln!(out, "  mdns         {mdns_line}");
    outln!(
        out,
        "  records      {} published, {} received by gossip, {} by sync ({} sync rounds), {} conflicts merged, {} refused",
        r.records_published,
        r.records_received,
        r.records_synced,
        r.sync_rounds,
        r.records_merged,
        r.records_refused
    );
    let peers = &v.mesh.peers;
    let connected = peers.iter().filter(|p| p.connected).count();
    outln!(
        out,
        "  peers        {connected} connected, {} known",
        peers.len()
    );
    for p in peers {
        let zone = p
            .zone
            .as_deref()
            .map_or_else(String::new, |z| format!(" zone {z}"));
        outln!(
            out,
            "    {} {} {}{zone} (last seen {} s ago)",
            if p.connected { "*" } else { " " },
            p.id,
            p.addresses.first().map_or("-", String::as_str),
            p.last_seen_secs
        );
    }
    outln!(
        out,
        "  bittorrent   {} (members over the mesh), {} live torrents, {} holdings known, {} down, {} up",
        bt.bittorrent_listen.as_deref().unwrap_or("-"),
        bt.live_torrents,
        bt.known_holdings,
        human_bytes(bt.bytes_downloaded),
        human_bytes(bt.bytes_uploaded)
    );
    for f in bt.fetches.iter().filter(|_| fetches) {
        outln!(
            out,
            "    {} {} {}/{}{}",
            progress_bar(f.have, f.size, 24),
            f.path,
            human_bytes(f.have),
            human_bytes(f.size),
            if f.full { " (whole file)" } else { "" }
        );
    }
    if v.pins.is_empty() {
        outln!(out, "  pins         none");
    } else {
        outln!(out, "  pins         {}", v.pins.len());
    }
    for p in &v.pins {
        outln!(
            out,
            "    /{}  {}/{} files, {}/{} held",
            p.path.trim_start_matches('/'),
            p.files_held,
            p.files,
            human_bytes(p.bytes_held),
            human_bytes(p.bytes)
        );
    }
    outln!(out, "  options      {}", options_line(&i.options));
    outln!(out, "  daemon       pid {}, version {}", i.pid, i.version);
    out
}

/// The options in force (`mount -o remount` changes some), as
/// `name=value` pairs; unset ones are left out.
fn options_line(o: &serde_json::Value) -> String {
    let Some(o) = o.as_object() else {
        return "-".to_owned();
    };
    let set: Vec<String> = o
        .iter()
        .filter_map(|(k, v)| match v {
            serde_json::Value::Null => None,
            serde_json::Value::Array(a) if a.is_empty() => None,
            serde_json::Value::String(s) => Some(format!("{k}={s}")),
            other => Some(format!("{k}={other}")),
        })
        .collect();
    set.join(" ")
}
