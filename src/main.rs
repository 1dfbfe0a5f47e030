//! `btfs`: the command-line front end and daemon of the btfs filesystem.

mod control;
mod daemon;
mod keys;
mod options;

use std::{path::PathBuf, process::ExitCode};

use anyhow::{Context, Result};
use btfs_node::NodeStatus;
use clap::{Parser, Subcommand};

const EXAMPLES: &str = "\
Examples:
  btfs keygen /etc/btfs/swarm.key
  btfs mount shared /mnt/shared -o key=/etc/btfs/swarm.key,state=/var/lib/btfs/shared
  mount -t btfs shared /mnt/shared -o key=/etc/btfs/swarm.key     (with mount.btfs installed)
  btfs status /mnt/shared --json
  umount /mnt/shared

fstab:
  shared  /mnt/shared  btfs  key=/etc/btfs/swarm.key,state=/var/lib/btfs/shared,_netdev,nofail  0 0";

const MOUNT_HELP: &str = "\
Mount options (-o, comma-separated):
  key=FILE          cluster pre-shared key (swarm.key format); default STATE/swarm.key, created if absent
  state=DIR         node state (metadata, objects, identity, log); default /var/lib/btfs/NAME
  listen=IP:PORT    mesh listen address (default 0.0.0.0:4410)
  peers=IP:PORT/IP:PORT  static bootstrap peers (other subnets, datacenters)
  peers_file=FILE   more bootstrap peers, one IP:PORT a line
  mdns=on|off       discover members on the LAN (default off: it advertises to the whole LAN)
  members=FILE      admit only these peer ids, one a line (default: any holder of the key)
  zone=NAME         this node's datacenter or rack: a file crosses between zones about once
  threads=N         FUSE dispatch threads (default 4)
  passthrough=on|off  kernel passthrough for file data (default on; needs root, Linux 6.9+)
  ttl=SECONDS       kernel attribute/entry cache lifetime (default 1)
  tombstone_retention=DURATION  how long deletes are remembered (default and minimum 24h; e.g. 7d)
  allow_other | noallow_other   let every user use the mount (default allow_other)
  ro, nosuid, nodev, noexec, sync, dirsync   as for any filesystem
  _netdev, nofail, defaults, noauto, x-*, comment=...   accepted and ignored (for mount(8)/systemd)";

/// A FUSE filesystem replicated across a private swarm.
#[derive(Debug, Parser)]
#[command(version, about, after_help = EXAMPLES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Write a new random 256-bit pre-shared key (IPFS/libp2p swarm.key format).
    Keygen {
        /// Where to write the key (mode 0600).
        file: PathBuf,
        /// Replace an existing file.
        #[arg(long, env = "BTFS_FORCE")]
        force: bool,
    },
    /// Mount cluster NAME at MOUNTPOINT; returns once the mount is live.
    #[command(after_help = MOUNT_HELP)]
    Mount {
        /// Cluster name (also the source shown in /proc/mounts and fstab).
        name: String,
        /// An existing, empty-of-mounts directory.
        mountpoint: PathBuf,
        /// Mount options, see below. May be repeated.
        #[arg(short = 'o', long = "options", env = "BTFS_OPTIONS", value_delimiter = None)]
        options: Vec<String>,
        /// Stay in the foreground and log to stderr.
        #[arg(short, long, env = "BTFS_FOREGROUND")]
        foreground: bool,
    },
    /// Write the .torrent of a file in a mount, for standard BitTorrent
    /// clients (allowed with the bt_allow= mount option).
    Torrent {
        /// A file in a btfs mount.
        path: PathBuf,
        /// Where to write the .torrent.
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Fill MOUNTPOINT with empty files, made by its daemon as signed
    /// records (as writes through the mount would be, without their system
    /// calls): UNDER/dNNNNNN/fNNNNNN, for trying a cluster at scale (the
    /// metadata lab builds its million-file namespaces with it). Root only.
    Generate {
        mountpoint: PathBuf,
        /// Directories to make.
        #[arg(long, default_value_t = 100)]
        dirs: u64,
        /// Empty files in each directory.
        #[arg(long, default_value_t = 100)]
        files: u64,
        /// Number of the first directory (to add to a generated tree).
        #[arg(long, default_value_t = 0)]
        first: u64,
        /// The directory, relative to the mount, the tree goes under.
        #[arg(long, default_value = "generated")]
        under: String,
    },
    /// Show what the daemon serving MOUNTPOINT is doing.
    Status {
        mountpoint: PathBuf,
        /// One JSON object instead of text.
        #[arg(long, env = "BTFS_JSON")]
        json: bool,
    },
}

fn human_bytes(n: u64) -> String {
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
fn progress_bar(done: u64, total: u64, width: usize) -> String {
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

fn print_status(v: &NodeStatus) {
    let (i, f, r, bt) = (&v.info, &v.fs, &v.records, &v.bittorrent);
    println!("btfs {} on {}", i.name, i.mountpoint.display());
    println!("  node         {}", v.node_id);
    println!("  zone         {}", i.zone.as_deref().unwrap_or("-"));
    println!("  peer id      {} (for members=)", v.peer_id);
    println!("  state        {}", i.state_dir.display());
    println!(
        "  key          {} (fingerprint {})",
        i.key_file.display(),
        i.key_fingerprint
    );
    println!(
        "  files        {} ({}), {} directories, {} symlinks, {} tombstones",
        f.tree.files,
        human_bytes(f.tree.bytes),
        f.tree.dirs,
        f.tree.symlinks,
        f.tree.tombstones
    );
    println!(
        "  open         {} handles on {} files",
        f.open_handles, f.open_files
    );
    println!(
        "  commits      {} ({} failed)",
        f.commits, f.commit_failures
    );
    println!(
        "  passthrough  {}",
        if f.passthrough { "on" } else { "off" }
    );
    let listen = if v.mesh.listen.is_empty() {
        "-".to_owned()
    } else {
        v.mesh.listen.join(", ")
    };
    println!("  mesh         listening on {listen}");
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
    println!("  mdns         {mdns_line}");
    println!(
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
    println!(
        "  peers        {connected} connected, {} known",
        peers.len()
    );
    for p in peers {
        let zone = p
            .zone
            .as_deref()
            .map_or_else(String::new, |z| format!(" zone {z}"));
        println!(
            "    {} {} {}{zone} (last seen {} s ago)",
            if p.connected { "*" } else { " " },
            p.id,
            p.addresses.first().map_or("-", String::as_str),
            p.last_seen_secs
        );
    }
    println!(
        "  bittorrent   {} (members over the mesh), {} live torrents, {} holdings known, {} down, {} up",
        bt.bittorrent_listen.as_deref().unwrap_or("-"),
        bt.live_torrents,
        bt.known_holdings,
        human_bytes(bt.bytes_downloaded),
        human_bytes(bt.bytes_uploaded)
    );
    for f in &bt.fetches {
        println!(
            "    {} {} {}/{}{}",
            progress_bar(f.have, f.size, 24),
            f.path,
            human_bytes(f.have),
            human_bytes(f.size),
            if f.full { " (whole file)" } else { "" }
        );
    }
    println!("  daemon       pid {}, version {}", i.pid, i.version);
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Keygen { file, force } => {
            let key = keys::write_new_swarm_key(&file, force)?;
            eprintln!(
                "wrote {} (fingerprint {})",
                file.display(),
                key.fingerprint()
            );
            Ok(())
        }
        Command::Mount {
            name,
            mountpoint,
            options,
            foreground,
        } => {
            let opts = options::MountOpts::parse(&options.join(","))?;
            let plan = daemon::prepare(&name, &mountpoint, opts)?;
            daemon::run(plan, foreground)
        }
        Command::Torrent { path, output } => {
            let bytes = control::query_torrent(&path)?;
            std::fs::write(&output, &bytes)
                .with_context(|| format!("writing {}", output.display()))?;
            eprintln!("wrote {} ({} bytes)", output.display(), bytes.len());
            Ok(())
        }
        Command::Generate {
            mountpoint,
            dirs,
            files,
            first,
            under,
        } => {
            // Slices small enough to answer well within the control
            // socket's timeout.
            let step = (btfs_node::MAX_GENERATE_FILES * 10 / files.max(1))
                .clamp(1, btfs_node::MAX_GENERATE_DIRS);
            let started = std::time::Instant::now();
            let mut made = 0;
            let mut d = first;
            while d < first + dirs {
                let n = step.min(first + dirs - d);
                made += control::query_generate(&mountpoint, &format!("{under} {d} {n} {files}"))?;
                d += n;
            }
            eprintln!(
                "generated {made} records in {:.1} s",
                started.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Command::Status { mountpoint, json } => {
            let v = control::query_status(&mountpoint)?;
            if json {
                println!("{v}");
            } else {
                let status: NodeStatus = serde_json::from_value(v)
                    .context("the daemon sent a status this btfs cannot read")?;
                print_status(&status);
            }
            Ok(())
        }
    }
}

/// An error and its causes on one line, each cause once (some messages
/// already show their cause).
pub(crate) fn describe(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if text.is_empty() || out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("btfs: {}", describe(&e));
            ExitCode::FAILURE
        }
    }
}
