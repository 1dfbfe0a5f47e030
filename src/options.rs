//! The `-o` mount options, as given on the command line, by mount(8) or in fstab.

use std::{net::SocketAddr, num::NonZeroU32, path::PathBuf, time::Duration};

use anyhow::{Result, bail};
use btfs_torrent::{Cidr, congestion::Congestion};
use nix::mount::MsFlags;

use btfs_mesh::Zone;
use btfs_node::Prefetch;

/// Options that take a value.
const VALUED: &[&str] = &[
    "key",
    "state",
    "listen",
    "peers",
    "peers_file",
    "members",
    "mdns",
    "threads",
    "passthrough",
    "ttl",
    "tombstone_retention",
    "history",
    "bt_listen",
    "bt_allow",
    "bt_wire",
    "bt_congestion",
    "read_timeout",
    "prefetch",
    "up_rate",
    "down_rate",
    "cache_size",
    "max_torrents",
    "zone",
    "metrics",
    "metrics_public",
];

/// Options that only mount(8), systemd or the kernel care about.
const IGNORED: &[&str] = &[
    "defaults",
    "auto",
    "noauto",
    "user",
    "nouser",
    "users",
    "_netdev",
    "nofail",
    "rw",
    "async",
    "atime",
    "noatime",
    "relatime",
    "norelatime",
    "strictatime",
    "nodiratime",
    "diratime",
    "suid",
    "dev",
    "exec",
    "loud",
    "silent",
];

/// Parsed mount options. Every field documents what `None` means.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct MountOpts {
    /// `key=FILE`: the cluster's swarm key. `None`: `<state>/swarm.key`, created
    /// on first use.
    pub key: Option<PathBuf>,
    /// `state=DIR`: where the node keeps its store. `None`: the default for the
    /// cluster name (see [`default_state_dir`]).
    pub state: Option<PathBuf>,
    /// `listen=IP:PORT`: where the mesh listens. `None`: [`DEFAULT_LISTEN`]
    /// (see [`MountOpts::mesh_listen`]).
    pub listen: Option<SocketAddr>,
    /// `peers=IP:PORT/IP:PORT`: static bootstrap peers (other subnets).
    pub peers: Vec<SocketAddr>,
    /// `peers_file=FILE`: more bootstrap peers, one `IP:PORT` a line.
    pub peers_file: Option<PathBuf>,
    /// `mdns=on|off`: discover members on the LAN. Off unless asked: mDNS is
    /// plain UDP outside the key and advertises peer ids and ports to the LAN.
    pub mdns: bool,
    /// `members=FILE`: the node ids admitted (one libp2p peer id a line).
    /// `None`: every holder of the key.
    pub members: Option<PathBuf>,
    /// `threads=N`: FUSE dispatch threads.
    pub threads: usize,
    /// `passthrough=on|off`: kernel passthrough for file data.
    pub passthrough: bool,
    /// `ttl=SECONDS`: kernel cache lifetime of entries and attributes.
    pub ttl: Duration,
    /// `allow_other` (default) / `noallow_other`.
    pub allow_other: bool,
    /// `ro`, `nosuid`, `nodev`, `noexec`, `sync`, `dirsync`.
    pub flags: MsFlags,
    /// `tombstone_retention=DURATION` (`36h`, `7d`…): how long a delete is
    /// remembered so that it can win against older copies; 24 h at least.
    pub tombstone_retention: Duration,
    /// `history=DURATION|off` (`7d`, `12h`…): how long superseded and
    /// deleted versions keep their content (`btfs log`, `btfs restore`).
    /// `None` (default): not kept.
    pub history: Option<Duration>,
    /// `bt_listen=IP:PORT`: the BitTorrent listener for standard clients
    /// from `bt_allow` networks. `None`: the mesh's IP, the mesh's port + 1
    /// (or any port when the mesh's is 0).
    pub bt_listen: Option<SocketAddr>,
    /// `bt_allow=CIDR/CIDR`: networks whose standard BitTorrent clients may
    /// download. Empty: members only.
    pub bt_allow: Vec<Cidr>,
    /// `bt_wire=direct|mesh`: how members carry the peer wire. `direct`
    /// (default): a TCP connection to the member's `bt_listen` port,
    /// authenticated and encrypted with noise, open only to connected members,
    /// falling back to mesh streams when it cannot be reached. `mesh`: always
    /// streams inside the mesh connection (one port between nodes; the
    /// pre-shared key's cipher on top of noise, about 15 % of the CPU of a
    /// transfer).
    pub bt_wire_direct: bool,
    /// `bt_congestion=NAME|system`: the TCP congestion control of direct
    /// wires and of connections to `bt_listen` (default cubic: on short round trips BBR paces the peer wire's
    /// bursts; `system` keeps the system's default, e.g. for long lossy
    /// links). btfs's loopback legs are always unpaced.
    pub bt_congestion: Congestion,
    /// `read_timeout=DURATION`: how long a read of remote content waits.
    pub read_timeout: Duration,
    /// `prefetch=none|all|GLOB,GLOB`: files fetched in full on arrival.
    pub prefetch: Prefetch,
    /// `up_rate=` / `down_rate=` (bytes/s, `k`, `M`, `G` are powers of 1024).
    pub up_rate: Option<NonZeroU32>,
    pub down_rate: Option<NonZeroU32>,
    /// `cache_size=SIZE` (`k`, `M`, `G`, `T`): fetched content kept before
    /// the least recently used goes. `None`: everything is kept.
    pub cache_size: Option<u64>,
    /// `max_torrents=N`: torrents live at once (seeding or fetching); past
    /// it the least recently used idle one is retired. `None`: 512, and
    /// never more than a quarter of the open-file limit.
    pub max_torrents: Option<usize>,
    /// `zone=NAME`: this node's datacenter or rack (1 to 32 letters,
    /// digits, `.`, `_`, `-`). Members of a zone fetch a file from other
    /// zones about once between them. `None`: no zone, every member is
    /// fetched from alike.
    pub zone: Option<Zone>,
    /// `metrics=IP:PORT`: serve OpenMetrics text at `/metrics` (`None`:
    /// off). A non-loopback address needs `metrics_public=on` as well.
    pub metrics: Option<SocketAddr>,
    pub metrics_public: bool,
}

/// Sizes and rates: `k`, `M`, `G`, `T` are powers of 1024 (`500M`,
/// `20G`, `1.5T`, `512 KiB`), a bare number is bytes.
fn size_of(v: &str) -> Option<u64> {
    parse_size::Config::new().with_binary().parse_size(v).ok()
}

/// Parses `500M`, `20G`, `1T` or a bare number of bytes.
fn parse_size(option: &str, v: &str) -> Result<u64> {
    size_of(v).ok_or_else(|| {
        anyhow::anyhow!("mount option {option}={v}: expected a size, e.g. 500M, 20G, 1T")
    })
}

/// librqbit's rate limiter takes 16 KiB at a time: a lower limit stalls.
pub(crate) const MIN_RATE: u64 = 16 << 10;

/// Parses `512k`, `10M`, `1G` or a bare number of bytes per second.
pub(crate) fn parse_rate(option: &str, v: &str) -> Result<NonZeroU32> {
    let n = size_of(v).ok_or_else(|| {
        anyhow::anyhow!("mount option {option}={v}: expected bytes per second, e.g. 512k, 10M, 1G")
    })?;
    if n < MIN_RATE {
        bail!(
            "mount option {option}={v}: at least 16k (16384 bytes/s); lower limits stall BitTorrent transfers"
        );
    }
    let n =
        u32::try_from(n).map_err(|_| anyhow::anyhow!("mount option {option}={v}: at most 3G"))?;
    NonZeroU32::new(n).ok_or_else(|| anyhow::anyhow!("mount option {option}={v}: must not be 0"))
}

/// Parses `bt_allow=10.0.0.0/8/192.168.1.0/24` (networks joined by `/`; a
/// bare address is one host).
fn parse_allow(v: &str) -> Result<Vec<Cidr>> {
    let parts: Vec<&str> = v.split('/').filter(|p| !p.is_empty()).collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < parts.len() {
        let ip = parts[i];
        let cidr = match parts.get(i + 1) {
            Some(bits) if bits.parse::<u8>().is_ok() => {
                i += 2;
                format!("{ip}/{bits}")
            }
            _ => {
                i += 1;
                ip.to_owned()
            }
        };
        out.push(cidr.parse::<Cidr>().map_err(|e| {
            anyhow::anyhow!("mount option bt_allow={v}: {e} (expected CIDR/CIDR, e.g. 10.0.0.0/8/192.168.1.0/24)")
        })?);
    }
    Ok(out)
}

fn parse_glob(v: &str) -> Result<glob::Pattern> {
    glob::Pattern::new(v)
        .map_err(|e| anyhow::anyhow!("mount option prefetch: {v:?} is not a glob: {e}"))
}

/// Where the mesh listens when `listen=` is not given: every address, port 4410.
pub(crate) const DEFAULT_LISTEN: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(
    std::net::Ipv4Addr::UNSPECIFIED,
    4410,
));

/// Parses `IP:PORT` with a message that names the option.
fn socket_addr(option: &str, v: &str) -> Result<SocketAddr> {
    v.parse().map_err(|_| {
        anyhow::anyhow!("mount option {option}={v}: expected IP:PORT, e.g. 10.0.0.1:4410")
    })
}

/// The shortest tombstone retention: a node offline for less than this
/// never brings a deleted file back.
pub(crate) const MIN_TOMBSTONE_RETENTION: Duration = Duration::from_secs(24 * 3600);

/// Parses `90s`, `30m`, `36h`, `7d`, `1h30m` (a bare number is seconds).
pub(crate) fn parse_duration(v: &str) -> Option<Duration> {
    if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
        return v.parse().ok().map(Duration::from_secs);
    }
    humantime::parse_duration(v).ok()
}

impl Default for MountOpts {
    fn default() -> Self {
        Self {
            key: None,
            state: None,
            listen: None,
            peers: Vec::new(),
            peers_file: None,
            mdns: false,
            members: None,
            threads: 4,
            passthrough: true,
            ttl: Duration::from_secs(1),
            allow_other: true,
            flags: MsFlags::empty(),
            tombstone_retention: MIN_TOMBSTONE_RETENTION,
            history: None,
            bt_listen: None,
            bt_allow: Vec::new(),
            bt_wire_direct: true,
            bt_congestion: Congestion::default(),
            read_timeout: Duration::from_secs(30),
            prefetch: Prefetch::None,
            up_rate: None,
            down_rate: None,
            cache_size: None,
            max_torrents: None,
            zone: None,
            metrics: None,
            metrics_public: false,
        }
    }
}

fn on_off(name: &str, v: &str) -> Result<bool> {
    match v {
        "on" | "yes" | "true" | "1" => Ok(true),
        "off" | "no" | "false" | "0" => Ok(false),
        _ => bail!("mount option {name}={v}: expected on or off"),
    }
}

impl MountOpts {
    /// The options in force, defaults filled in, as `btfs status` shows
    /// them (`options`).
    pub(crate) fn effective(&self) -> serde_json::Value {
        let prefetch = self.prefetch.to_string();
        serde_json::json!({
            "listen": self.mesh_listen().to_string(),
            "mdns": self.mdns,
            "members": self.members,
            "threads": self.threads,
            "passthrough": self.passthrough,
            "ttl_secs": self.ttl.as_secs_f64(),
            "allow_other": self.allow_other,
            "tombstone_retention_secs": self.tombstone_retention.as_secs(),
            "history_secs": self.history.map(|h| h.as_secs()),
            "bt_wire": if self.bt_wire_direct { "direct" } else { "mesh" },
            "bt_congestion": self.bt_congestion.to_string(),
            "bt_allow": self.bt_allow.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
            "read_timeout_secs": self.read_timeout.as_secs_f64(),
            "prefetch": prefetch,
            "up_rate": self.up_rate.map(|r| r.get()),
            "down_rate": self.down_rate.map(|r| r.get()),
            "cache_size": self.cache_size,
            "max_torrents": self.max_torrents,
            "zone": self.zone.as_ref().map(Zone::as_str),
            "metrics": self.metrics.map(|a| a.to_string()),
        })
    }

    /// Where the mesh listens: `listen=`, else [`DEFAULT_LISTEN`].
    pub(crate) fn mesh_listen(&self) -> SocketAddr {
        self.listen.unwrap_or(DEFAULT_LISTEN)
    }

    /// Parses a comma-separated option string (several `-o` are joined).
    pub(crate) fn parse(s: &str) -> Result<Self> {
        Ok(Self::default().parse_onto(s)?.0)
    }

    /// The options of `s` set over `self`; also returns the name of each
    /// option `s` gives, in order (ignored ones included).
    fn parse_onto(self, s: &str) -> Result<(Self, Vec<String>)> {
        let mut o = self;
        let mut given = Vec::new();
        // A `peers=` replaces the list it is set over (several in `s` add up).
        let mut peers_replaced = false;
        // `prefetch=GLOB,GLOB`: the globs after the first are bare options.
        let mut in_prefetch = false;
        for opt in s.split(',').map(str::trim).filter(|x| !x.is_empty()) {
            let (name, value) = match opt.split_once('=') {
                Some((n, v)) => (n, Some(v)),
                None => (opt, None),
            };
            if in_prefetch
                && value.is_none()
                && !IGNORED.contains(&name)
                && !matches!(
                    name,
                    "allow_other"
                        | "noallow_other"
                        | "ro"
                        | "nosuid"
                        | "nodev"
                        | "noexec"
                        | "sync"
                        | "dirsync"
                )
                && let Prefetch::Globs(g) = &mut o.prefetch
            {
                g.push(parse_glob(name)?);
                continue;
            }
            in_prefetch = false;
            given.push(name.to_owned());
            match (name, value) {
                ("bt_listen", Some(v)) => o.bt_listen = Some(socket_addr(name, v)?),
                ("bt_allow", Some(v)) => o.bt_allow = parse_allow(v)?,
                ("bt_wire", Some(v)) => {
                    o.bt_wire_direct = match v {
                        "direct" => true,
                        "mesh" => false,
                        _ => bail!("mount option bt_wire={v}: expected direct or mesh"),
                    }
                }
                ("bt_congestion", Some(v)) => {
                    o.bt_congestion = v
                        .parse()
                        .map_err(|e| anyhow::anyhow!("mount option bt_congestion={v}: {e}"))?
                }
                ("read_timeout", Some(v)) => {
                    o.read_timeout = parse_duration(v)
                        .filter(|d| !d.is_zero())
                        .ok_or_else(|| anyhow::anyhow!("mount option read_timeout={v}: expected a duration, e.g. 30s or 2m"))?
                }
                ("prefetch", Some("none")) => o.prefetch = Prefetch::None,
                ("prefetch", Some("all")) => o.prefetch = Prefetch::All,
                ("prefetch", Some(v)) => {
                    o.prefetch = Prefetch::Globs(vec![parse_glob(v)?]);
                    in_prefetch = true;
                }
                ("up_rate", Some(v)) => o.up_rate = Some(parse_rate(name, v)?),
                ("down_rate", Some(v)) => o.down_rate = Some(parse_rate(name, v)?),
                ("cache_size", Some(v)) => o.cache_size = Some(parse_size(name, v)?),
                ("max_torrents", Some(v)) => {
                    o.max_torrents = Some(
                        v.parse()
                            .ok()
                            .filter(|n| (1..=1_000_000).contains(n))
                            .ok_or_else(|| {
                                anyhow::anyhow!(
                                    "mount option max_torrents={v}: expected 1 to 1000000"
                                )
                            })?,
                    )
                }
                ("zone", Some(v)) => {
                    o.zone = Some(
                        v.parse()
                            .map_err(|e| anyhow::anyhow!("mount option zone={v}: {e}"))?,
                    )
                }
                ("metrics", Some(v)) => o.metrics = Some(socket_addr(name, v)?),
                ("metrics_public", Some(v)) => o.metrics_public = on_off(name, v)?,
                ("key", Some(v)) => o.key = Some(PathBuf::from(v)),
                ("state", Some(v)) => o.state = Some(PathBuf::from(v)),
                ("listen", Some(v)) => o.listen = Some(socket_addr(name, v)?),
                ("peers", Some(v)) => {
                    if !peers_replaced {
                        o.peers.clear();
                        peers_replaced = true;
                    }
                    for p in v.split('/').filter(|p| !p.is_empty()) {
                        o.peers.push(socket_addr(name, p)?);
                    }
                }
                ("peers_file", Some(v)) => o.peers_file = Some(PathBuf::from(v)),
                ("members", Some(v)) => o.members = Some(PathBuf::from(v)),
                ("mdns", Some(v)) => o.mdns = on_off(name, v)?,
                ("threads", Some(v)) => {
                    o.threads =
                        v.parse()
                            .ok()
                            .filter(|n| (1..=64).contains(n))
                            .ok_or_else(|| {
                                anyhow::anyhow!("mount option threads={v}: expected 1 to 64")
                            })?
                }
                ("passthrough", Some(v)) => o.passthrough = on_off(name, v)?,
                ("ttl", Some(v)) => {
                    let secs: f64 = v
                        .parse()
                        .ok()
                        .filter(|s: &f64| s.is_finite() && (0.0..=3600.0).contains(s))
                        .ok_or_else(|| {
                            anyhow::anyhow!("mount option ttl={v}: expected seconds, 0 to 3600")
                        })?;
                    o.ttl = Duration::from_secs_f64(secs);
                }
                ("tombstone_retention", Some(v)) => {
                    o.tombstone_retention = parse_duration(v)
                        .filter(|d| *d >= MIN_TOMBSTONE_RETENTION)
                        .ok_or_else(|| {
                            anyhow::anyhow!(
                                "mount option tombstone_retention={v}: expected a duration of at least 24h (e.g. 36h, 7d)"
                            )
                        })?
                }
                ("history", Some("off" | "none" | "0")) => o.history = None,
                ("history", Some(v)) => {
                    o.history = Some(parse_duration(v).filter(|d| *d >= Duration::from_secs(1)).ok_or_else(|| {
                        anyhow::anyhow!(
                            "mount option history={v}: expected a duration (e.g. 12h, 7d) or off"
                        )
                    })?)
                }
                ("allow_other", None) => o.allow_other = true,
                ("noallow_other", None) => o.allow_other = false,
                ("ro", None) => o.flags |= MsFlags::MS_RDONLY,
                ("nosuid", None) => o.flags |= MsFlags::MS_NOSUID,
                ("nodev", None) => o.flags |= MsFlags::MS_NODEV,
                ("noexec", None) => o.flags |= MsFlags::MS_NOEXEC,
                ("sync", None) => o.flags |= MsFlags::MS_SYNCHRONOUS,
                ("dirsync", None) => o.flags |= MsFlags::MS_DIRSYNC,
                (n, _) if IGNORED.contains(&n) || n.starts_with("x-") || n == "comment" => {}
                (n, None)
                    if VALUED.contains(&n) =>
                {
                    bail!("mount option {n} needs a value ({n}=...)")
                }
                _ => bail!("unknown mount option {opt:?} (see `btfs mount --help`)"),
            }
        }
        // Metrics tell who the members are and what moves: the network sees
        // them only when asked for in so many words.
        if let Some(a) = o.metrics
            && !a.ip().is_loopback()
            && !o.metrics_public
        {
            bail!(
                "mount option metrics={a}: not a loopback address; add metrics_public=on to serve metrics to the network"
            );
        }
        Ok((o, given))
    }
}

/// Options `mount -o remount` changes on a running node.
pub(crate) const LIVE: &[&str] = &[
    "members",
    "peers",
    "peers_file",
    "up_rate",
    "down_rate",
    "cache_size",
    "prefetch",
    "read_timeout",
];

/// What mount(8) passes back on a remount besides the caller's options:
/// the kernel's options of the FUSE mount and the VFS flags (none of them
/// the daemon's to change; `ro`/`rw` are looked at on their own).
const REMOUNT_PASSED: &[&str] = &[
    "remount",
    "user_id",
    "group_id",
    "default_permissions",
    "rootmode",
    "fd",
    "blksize",
    "max_read",
    "nosuid",
    "nodev",
    "noexec",
    "sync",
    "dirsync",
    "lazytime",
    "nolazytime",
    "mand",
    "nomand",
];

/// Whether an option string asks for a remount (`mount -o remount,...`).
pub(crate) fn is_remount(s: &str) -> bool {
    s.split(',').any(|o| o.trim() == "remount")
}

/// `mount -o remount,OPTIONS` against the options in force.
#[derive(Debug)]
pub(crate) struct Remount {
    /// The options in force once it is applied.
    pub opts: MountOpts,
    /// The live options it gives (see [`LIVE`]).
    pub live: Vec<&'static str>,
    /// Options it changes that cannot change live.
    pub refused: Vec<String>,
}

impl MountOpts {
    /// The value of option `name` as it compares between two sets of
    /// options (`None`: not an option that holds a value here).
    fn value_of(&self, name: &str) -> Option<String> {
        Some(match name {
            "key" => format!("{:?}", self.key),
            "state" => format!("{:?}", self.state),
            "listen" => format!("{:?}", self.listen),
            "mdns" => format!("{:?}", self.mdns),
            "threads" => format!("{:?}", self.threads),
            "passthrough" => format!("{:?}", self.passthrough),
            "ttl" => format!("{:?}", self.ttl),
            "allow_other" | "noallow_other" => format!("{:?}", self.allow_other),
            "ro" | "rw" => format!("{:?}", self.flags.contains(MsFlags::MS_RDONLY)),
            "tombstone_retention" => format!("{:?}", self.tombstone_retention),
            "history" => format!("{:?}", self.history),
            "bt_listen" => format!("{:?}", self.bt_listen),
            "bt_allow" => format!("{:?}", self.bt_allow),
            "bt_wire" => format!("{:?}", self.bt_wire_direct),
            "bt_congestion" => format!("{:?}", self.bt_congestion),
            "max_torrents" => format!("{:?}", self.max_torrents),
            "zone" => format!("{:?}", self.zone),
            "metrics" => format!("{:?}", self.metrics),
            "metrics_public" => format!("{:?}", self.metrics_public),
            _ => return None,
        })
    }

    /// Reads `mount -o remount,OPTIONS` (as mount(8) passes it, the
    /// kernel's options included) over the options in force. An option
    /// given with its current value is no change; one that cannot change
    /// live and differs is named in [`Remount::refused`].
    pub(crate) fn remount(&self, s: &str) -> Result<Remount> {
        let mut kept = Vec::new();
        let mut refused: Vec<String> = Vec::new();
        let ro = self.flags.contains(MsFlags::MS_RDONLY);
        for opt in s.split(',').map(str::trim).filter(|x| !x.is_empty()) {
            let name = opt.split_once('=').map_or(opt, |(n, _)| n);
            match name {
                "ro" if !ro => refused.push("ro".into()),
                "rw" if ro => refused.push("rw".into()),
                "ro" | "rw" => {}
                n if REMOUNT_PASSED.contains(&n) => {}
                _ => kept.push(opt),
            }
        }
        let (opts, given) = self.clone().parse_onto(&kept.join(","))?;
        let mut live = Vec::new();
        for name in &given {
            if let Some(l) = LIVE.iter().find(|l| **l == name.as_str()) {
                if !live.contains(l) {
                    live.push(*l);
                }
                continue;
            }
            if IGNORED.contains(&name.as_str()) || name.starts_with("x-") || name == "comment" {
                continue;
            }
            let changed = match (self.value_of(name), opts.value_of(name)) {
                (Some(a), Some(b)) => a != b,
                // An option this table does not know: refused unless the
                // whole set is unchanged.
                _ => format!("{self:?}") != format!("{opts:?}"),
            };
            if changed && !refused.contains(name) {
                refused.push(name.clone());
            }
        }
        Ok(Remount {
            opts,
            live,
            refused,
        })
    }
}

impl Remount {
    /// What the node is asked to change.
    pub(crate) fn request(&self) -> btfs_node::Reconfigure {
        let o = &self.opts;
        let given = |n: &str| self.live.contains(&n);
        btfs_node::Reconfigure {
            members: if given("members") {
                o.members.clone()
            } else {
                None
            },
            bootstrap: (given("peers") || given("peers_file"))
                .then(|| (o.peers.clone(), o.peers_file.clone())),
            rates: (given("up_rate") || given("down_rate")).then_some((o.up_rate, o.down_rate)),
            cache_size: given("cache_size").then_some(o.cache_size),
            prefetch: given("prefetch").then(|| o.prefetch.clone()),
            read_timeout: given("read_timeout").then_some(o.read_timeout),
            options: Some(o.effective()),
        }
    }
}

/// `/var/lib/btfs/NAME` for root, `~/.local/share/btfs/NAME` otherwise.
pub(crate) fn default_state_dir(name: &str) -> PathBuf {
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/var/lib/btfs").join(name);
    }
    let base = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    base.join("btfs").join(name)
}

/// Checks a cluster name: it names the fstab source, the gossip topic and the
/// protocol, so it is kept to a portable alphabet.
pub(crate) fn validate_cluster_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        && !name.starts_with(['.', '-']);
    if !ok {
        bail!("cluster name {name:?} is not valid: use 1 to 64 letters, digits, '.', '_' or '-'");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fstab_style_options() {
        let o = MountOpts::parse("rw,key=/etc/btfs/swarm.key,state=/var/lib/btfs,_netdev,nofail,x-systemd.automount,threads=2,ro,noatime").unwrap();
        assert_eq!(o.key, Some(PathBuf::from("/etc/btfs/swarm.key")));
        assert_eq!(o.state, Some(PathBuf::from("/var/lib/btfs")));
        assert_eq!(o.threads, 2);
        assert!(o.flags.contains(MsFlags::MS_RDONLY));
        let m = MountOpts::parse(
            "peers=10.0.0.2:4410/10.0.1.3:4410,mdns=off,members=/etc/btfs/members",
        )
        .unwrap();
        assert_eq!(m.peers.len(), 2);
        assert!(!m.mdns);
        assert_eq!(m.members, Some(PathBuf::from("/etc/btfs/members")));
        assert!(
            MountOpts::parse("peers=10.0.0.2")
                .unwrap_err()
                .to_string()
                .contains("expected IP:PORT")
        );
        let l = MountOpts::parse("listen=10.0.0.1:4001,passthrough=off").unwrap();
        assert_eq!(l.listen, Some("10.0.0.1:4001".parse().unwrap()));
        assert!(!l.passthrough);
        assert_eq!(MountOpts::parse("").unwrap().history, None);
        assert_eq!(
            MountOpts::parse("history=7d").unwrap().history,
            Some(Duration::from_secs(7 * 86_400))
        );
        assert_eq!(MountOpts::parse("history=off").unwrap().history, None);
        assert!(MountOpts::parse("history=soon").is_err());
        let r = MountOpts::parse("tombstone_retention=7d").unwrap();
        assert_eq!(r.tombstone_retention, Duration::from_secs(7 * 86_400));
        assert_eq!(parse_duration("90m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("12"), Some(Duration::from_secs(12)));
        assert_eq!(parse_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("1x"), None);
        assert_eq!(parse_duration(""), None);
    }

    #[test]
    fn parses_content_options() {
        let o = MountOpts::parse(
            "bt_listen=10.0.0.1:4411,bt_allow=10.1.0.0/16/192.168.7.9,read_timeout=5s,up_rate=16k,down_rate=10M,prefetch=images/*.iso,*.img,ro",
        )
        .unwrap();
        assert_eq!(o.bt_listen, Some("10.0.0.1:4411".parse().unwrap()));
        assert!(o.bt_wire_direct);
        assert!(!MountOpts::parse("bt_wire=mesh").unwrap().bt_wire_direct);
        assert_eq!(o.bt_congestion, Congestion::Named("cubic".into()));
        assert_eq!(
            MountOpts::parse("bt_congestion=system")
                .unwrap()
                .bt_congestion,
            Congestion::System
        );
        assert_eq!(
            MountOpts::parse("bt_congestion=bbr").unwrap().bt_congestion,
            Congestion::Named("bbr".into())
        );
        assert_eq!(o.bt_allow.len(), 2);
        assert!(o.bt_allow[0].contains("10.1.2.3".parse().unwrap()));
        assert!(o.bt_allow[1].contains("192.168.7.9".parse().unwrap()));
        assert_eq!(o.read_timeout, Duration::from_secs(5));
        assert_eq!(o.up_rate.map(|r| r.get()), Some(16 << 10));
        assert_eq!(o.down_rate.map(|r| r.get()), Some(10 << 20));
        assert_eq!(
            MountOpts::parse("max_torrents=40").unwrap().max_torrents,
            Some(40)
        );
        assert_eq!(
            MountOpts::parse("cache_size=20G").unwrap().cache_size,
            Some(20 << 30)
        );
        assert!(o.flags.contains(MsFlags::MS_RDONLY));
        let path = |p: &str| btfs_core::RelPath::parse(p).unwrap();
        assert!(o.prefetch.matches(&path("images/a.iso")));
        assert!(o.prefetch.matches(&path("disks/b.img")));
        assert!(!o.prefetch.matches(&path("notes.txt")));
        assert_eq!(
            MountOpts::parse("prefetch=all").unwrap().prefetch,
            Prefetch::All
        );
        assert!(!MountOpts::parse("").unwrap().prefetch.matches(&path("a")));
    }

    #[test]
    fn rejects_bad_options_with_a_reason() {
        for (opt, why) in [
            ("frobnicate", "unknown mount option"),
            ("listen=nowhere", "expected IP:PORT"),
            ("threads=0", "expected 1 to 64"),
            ("passthrough=maybe", "expected on or off"),
            ("key", "needs a value"),
            ("tombstone_retention=2h", "at least 24h"),
            ("tombstone_retention=soon", "at least 24h"),
            ("up_rate=10k", "at least 16k"),
            ("down_rate=1000", "at least 16k"),
            ("down_rate=fast", "expected bytes per second"),
            ("up_rate=5G", "at most 3G"),
            ("bt_allow=10.0.0.0/40", "prefix length"),
            ("bt_allow=everyone", "not an IP address"),
            ("bt_wire=udp", "expected direct or mesh"),
            ("bt_congestion=BBR!", "not a congestion control name"),
            ("read_timeout=0", "expected a duration"),
            ("prefetch=[", "not a glob"),
            ("cache_size=lots", "expected a size"),
            ("max_torrents=0", "expected 1 to 1000000"),
            ("zone", "needs a value"),
            ("zone=", "is not valid: use 1 to 32 letters"),
            ("zone=dc 1", "is not valid"),
            ("zone=dc/1", "is not valid"),
            ("zone=dc1=a", "is not valid"),
            ("zone=zoné", "is not valid"),
            ("zone=abcdefghijklmnopqrstuvwxyz0123456", "is not valid"),
        ] {
            let err = MountOpts::parse(opt).unwrap_err().to_string();
            assert!(err.contains(why), "{opt}: {err}");
        }
        assert!(validate_cluster_name("shared").is_ok());
        assert!(validate_cluster_name("a/b").is_err());
        assert!(validate_cluster_name("").is_err());
    }

    #[test]
    fn metrics_are_off_by_default_and_loopback_unless_made_public() {
        assert_eq!(MountOpts::default().metrics, None);
        let o = MountOpts::parse("metrics=127.0.0.1:9100").unwrap();
        assert_eq!(o.metrics, Some("127.0.0.1:9100".parse().unwrap()));
        assert_eq!(o.effective()["metrics"], "127.0.0.1:9100");
        assert!(MountOpts::parse("metrics=[::1]:9100").is_ok());
        let e = MountOpts::parse("metrics=10.0.0.1:9100")
            .unwrap_err()
            .to_string();
        assert!(e.contains("metrics_public=on"), "{e}");
        let o = MountOpts::parse("metrics=0.0.0.0:9100,metrics_public=on").unwrap();
        assert_eq!(o.metrics, Some("0.0.0.0:9100".parse().unwrap()));
        assert!(MountOpts::parse("metrics=localhost").is_err());
    }

    #[test]
    fn a_zone_is_a_short_portable_name_and_none_by_default() {
        assert_eq!(MountOpts::default().zone, None);
        assert_eq!(
            MountOpts::parse("ro").unwrap().effective()["zone"],
            serde_json::Value::Null
        );
        for name in [
            "dc1",
            "eu-west_2.rack-7",
            "abcdefghijklmnopqrstuvwxyz012345",
        ] {
            let o = MountOpts::parse(&format!("zone={name},ro")).unwrap();
            assert_eq!(o.zone.as_ref().map(Zone::as_str), Some(name));
            assert_eq!(o.effective()["zone"], name);
        }
    }

    /// What mount(8) passes on `mount -o remount,up_rate=1M /mnt` (seen
    /// with util-linux 2.38): the kernel's options, then the caller's.
    #[test]
    fn a_remount_changes_live_options_and_names_the_others() {
        let cur = MountOpts::parse("listen=127.0.0.1:0,members=/a,peers=10.0.0.1:1").unwrap();
        let passed =
            "rw,nosuid,nodev,relatime,remount,user_id=0,group_id=0,default_permissions,allow_other";
        let r = cur
            .remount(&format!(
                "{passed},up_rate=1M,cache_size=10M,peers=10.0.0.2:2"
            ))
            .unwrap();
        assert!(r.refused.is_empty(), "{:?}", r.refused);
        assert_eq!(r.live, ["up_rate", "cache_size", "peers"]);
        assert_eq!(r.opts.up_rate.map(|r| r.get()), Some(1 << 20));
        assert_eq!(r.opts.peers, ["10.0.0.2:2".parse().unwrap()]);
        assert_eq!(r.opts.members, cur.members);
        let req = r.request();
        assert_eq!(req.cache_size, Some(Some(10 << 20)));
        assert!(req.members.is_none() && req.read_timeout.is_none());
        // The current value is no change; others are named, once each.
        let r = cur
            .remount("remount,listen=127.0.0.1:0,listen=10.0.0.1:5,state=/x,zone=dc2,ro,threads=4")
            .unwrap();
        assert_eq!(r.refused, ["ro", "listen", "state", "zone"]);
        assert!(cur.remount("remount,frobnicate").is_err());
        assert!(is_remount("rw,remount,up_rate=1M") && !is_remount("rw,remounted"));
    }

    /// The README's first command mounts without `listen=`: the default must
    /// be a mesh address libp2p accepts (it once was a bare `IP:PORT`).
    #[test]
    fn the_default_listen_address_is_a_valid_multiaddr() {
        let a = btfs_node::mesh_address(MountOpts::default().mesh_listen()).unwrap();
        assert_eq!(a.to_string(), "/ip4/0.0.0.0/tcp/4410");
    }
}
