//! `btfs`: the command-line front end and daemon of the btfs filesystem.

mod control;
mod daemon;
mod history;
mod keys;
mod man;
mod options;
mod pins;
mod status;
mod watch;

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
  history=DURATION  keep superseded and deleted versions this long, for btfs log/restore (default off; e.g. 7d)
  metrics=IP:PORT   serve Prometheus/OpenMetrics text at http://IP:PORT/metrics (default off; loopback only
                    unless metrics_public=on is also given)
  allow_other | noallow_other   let every user use the mount (default allow_other)
  ro, nosuid, nodev, noexec, sync, dirsync   as for any filesystem
  _netdev, nofail, defaults, noauto, x-*, comment=...   accepted and ignored (for mount(8)/systemd)
  remount           mount -o remount,OPTS MNT: change members=, peers=, peers_file=, up_rate=, down_rate=, cache_size=, prefetch=, read_timeout= live";

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
    /// Pin files or directories (recursive): their content, and every
    /// later version's, is fetched to this node in full and never evicted
    /// by cache_size=. `btfs status` lists the pins.
    Pin {
        /// Files or directories in btfs mounts, which the caller may read.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Unpin paths pinned with `btfs pin`: their content is cached like any
    /// other again.
    Unpin {
        /// Paths given to `btfs pin` (they may be gone since).
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// List the versions of PATH this node knows, newest first: the current
    /// one and those kept by the history= mount option (also of deleted
    /// paths), with when, who, size, content hash, and where they are held.
    Log {
        /// A file in a btfs mount (it may have been deleted).
        path: PathBuf,
        /// One JSON array instead of text.
        #[arg(long, env = "BTFS_JSON")]
        json: bool,
    },
    /// Bring back a version of PATH (by default the one before the current
    /// content, or the last before a delete) as a new version, which
    /// replicates like any write. Content not held here is fetched from a
    /// member that still keeps it.
    Restore {
        /// A file in a btfs mount (it may have been deleted).
        path: PathBuf,
        /// The version current at this time: 2026-12-03T18:00:00Z (UTC) or a
        /// duration ago (90m, 2d).
        #[arg(long, conflicts_with = "version", value_name = "TIME")]
        at: Option<String>,
        /// The version whose content hash starts with these hex digits (at
        /// least 6; see btfs log).
        #[arg(long, value_name = "HASH")]
        version: Option<String>,
        /// Restore to this path instead (it must not exist).
        #[arg(long, value_name = "NEWPATH")]
        to: Option<PathBuf>,
    },
    /// Show what the daemon serving MOUNTPOINT is doing.
    Status {
        mountpoint: PathBuf,
        /// One JSON object instead of text.
        #[arg(long, env = "BTFS_JSON")]
        json: bool,
        /// Redraw live until Ctrl-C, with progress bars for fetches; without
        /// a terminal, print a snapshot every interval (with --json, one
        /// object a line).
        #[arg(short, long)]
        watch: bool,
        /// Time between two snapshots of --watch (e.g. 500ms, 2s; default 1s).
        #[arg(long, requires = "watch", value_name = "DURATION", value_parser = humantime::parse_duration)]
        interval: Option<std::time::Duration>,
    },
    /// Write the manual pages btfs.1 and mount.btfs.8 into DIR (for
    /// mount-helpers/install.sh).
    #[command(hide = true)]
    Manpages { dir: PathBuf },
    /// Print the completion script for SHELL (for mount-helpers/install.sh).
    #[command(hide = true)]
    Completions { shell: clap_complete::Shell },
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
            let joined = options.join(",");
            if options::is_remount(&joined) {
                // `mount -o remount` through mount.btfs: the daemon changes
                // what can change live.
                return control::remount(&mountpoint, &joined).map(drop);
            }
            let opts = options::MountOpts::parse(&joined)?;
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
        Command::Log { path, json } => history::log(&path, json),
        Command::Restore {
            path,
            at,
            version,
            to,
        } => history::restore(&path, at.as_deref(), version, to.as_deref()),
        Command::Pin { paths } => pins::run(&paths, true),
        Command::Unpin { paths } => pins::run(&paths, false),
        Command::Manpages { dir } => man::write_pages(&dir),
        Command::Completions { shell } => man::write_completions(shell),
        Command::Status {
            mountpoint,
            json,
            watch: true,
            interval,
        } => watch::run(
            &mountpoint,
            interval.unwrap_or(watch::DEFAULT_INTERVAL),
            json,
        ),
        Command::Status {
            mountpoint, json, ..
        } => {
            let v = control::query_status(&mountpoint)?;
            if json {
                println!("{v}");
            } else {
                let status: NodeStatus = serde_json::from_value(v)
                    .context("the daemon sent a status this btfs cannot read")?;
                print!("{}", status::render(&status));
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
