//! `btfs mount`: check everything that can be checked, fork, mount, serve.
//!
//! The foreground process validates the options, the key and the paths, then
//! forks before any thread exists or sled is opened (both break across fork).
//! It exits 0 only when the child reports that the mount is live, and with the
//! child's one-line reason otherwise.

use std::{
    fs,
    io::{Read, Write},
    os::unix::fs::{DirBuilderExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::{Context, Result, bail};
use btfs_fs::{BtfsFs, MountOptions};
use btfs_node::{Node, NodeConfig, NodeInfo};
use nix::unistd::ForkResult;
use tracing::{error, info};

use crate::{
    control, keys,
    options::{MountOpts, default_state_dir, validate_cluster_name},
};

/// Runtime worker threads: the mesh, the peer-wire bridges and FUSE
/// answers. (librqbit runs on a thread of its own, see `btfs_torrent`.)
const RUNTIME_THREADS: usize = 2;

/// Where the BitTorrent listener for standard clients binds: `bt_listen=`,
/// else the mesh's address with the next port (any port when the mesh's is
/// chosen by the system).
fn bt_listen(plan: &MountPlan) -> std::net::SocketAddr {
    if let Some(a) = plan.opts.bt_listen {
        return a;
    }
    let mesh = plan.opts.mesh_listen();
    let port = if mesh.port() == 0 {
        0
    } else {
        mesh.port().wrapping_add(1)
    };
    std::net::SocketAddr::new(mesh.ip(), port)
}

/// Everything `btfs mount` decided before forking.
#[derive(Debug)]
pub(crate) struct MountPlan {
    pub name: String,
    pub mountpoint: PathBuf,
    pub state_dir: PathBuf,
    pub key_path: PathBuf,
    pub key_fingerprint: String,
    pub psk: libp2p_pnet::PreSharedKey,
    pub opts: MountOpts,
}

/// Validates the request and prepares the state directory and key.
/// Refuses a state dir that another user owns or may write: it holds the
/// node's identity, its store and every object.
fn check_state_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = fs::metadata(dir)?;
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me {
        bail!(
            "state dir {} belongs to uid {}, not to this user (uid {me}): chown it or choose another",
            dir.display(),
            meta.uid()
        );
    }
    if meta.mode() & 0o022 != 0 {
        bail!(
            "state dir {} may be written by other users (mode {:o}): run `chmod 700 {}`",
            dir.display(),
            meta.mode() & 0o7777,
            dir.display()
        );
    }
    Ok(())
}

pub(crate) fn prepare(name: &str, mountpoint: &Path, opts: MountOpts) -> Result<MountPlan> {
    validate_cluster_name(name)?;
    let mountpoint = btfs_fs::check_mountpoint(mountpoint)?;

    let state_dir = match &opts.state {
        Some(dir) => {
            if !dir.exists() {
                let parent = dir
                    .parent()
                    .filter(|p| !p.as_os_str().is_empty())
                    .unwrap_or(Path::new("."));
                if !parent.is_dir() {
                    bail!(
                        "state dir {} cannot be created: its parent {} does not exist",
                        dir.display(),
                        parent.display()
                    );
                }
            }
            dir.clone()
        }
        None => default_state_dir(name),
    };
    if state_dir.exists() && !state_dir.is_dir() {
        bail!("state dir {} is not a directory", state_dir.display());
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&state_dir)
        .with_context(|| format!("state dir {} cannot be created", state_dir.display()))?;
    let state_dir = fs::canonicalize(&state_dir)?;
    check_state_dir(&state_dir)?;
    if state_dir.starts_with(&mountpoint) {
        bail!(
            "state dir {} must not lie inside the mountpoint {}",
            state_dir.display(),
            mountpoint.display()
        );
    }

    let (key_path, key) = match &opts.key {
        Some(k) => (k.clone(), keys::read_swarm_key(k)?),
        None => {
            let k = state_dir.join("swarm.key");
            let key = if k.exists() {
                keys::read_swarm_key(&k)?
            } else {
                keys::write_new_swarm_key(&k, false)?
            };
            (k, key)
        }
    };
    Ok(MountPlan {
        name: name.to_owned(),
        mountpoint,
        state_dir,
        key_path,
        key_fingerprint: key.fingerprint().to_string(),
        psk: key,
        opts,
    })
}

/// Reports the start-up outcome to the waiting foreground process.
struct Ready(Option<fs::File>);

impl Ready {
    fn send(&mut self, outcome: &Result<()>) {
        if let Some(mut pipe) = self.0.take() {
            let msg = match outcome {
                Ok(()) => "OK\n".to_owned(),
                Err(e) => format!("ERR {}\n", crate::describe(e)),
            };
            let _ = pipe.write_all(msg.as_bytes());
        }
    }
}

fn init_logging(log: Option<fs::File>) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match log {
        Some(_) => builder.with_ansi(false).with_writer(std::io::stderr).init(),
        None => builder.with_writer(std::io::stderr).init(),
    }
}

/// Mounts and serves until unmounted. Without `foreground`, returns in the
/// parent (exit status decided by the child's report) and serves in the child.
pub(crate) fn run(plan: MountPlan, foreground: bool) -> Result<()> {
    if foreground {
        init_logging(None);
        return serve(&plan, Ready(None));
    }
    let log_path = plan.state_dir.join("btfs.log");
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("cannot open log file {}", log_path.display()))?;
    let (read_end, write_end) = nix::unistd::pipe()?;
    // SAFETY: no thread has been started yet (checked by the callers' design:
    // only argument parsing and file reads happen before this point).
    match unsafe { nix::unistd::fork() }? {
        ForkResult::Parent { .. } => {
            drop(write_end);
            let mut reply = String::new();
            let _ = fs::File::from(read_end).read_to_string(&mut reply);
            match reply.lines().next() {
                Some("OK") => Ok(()),
                Some(err) => bail!("{}", err.trim_start_matches("ERR ")),
                None => bail!(
                    "the btfs daemon exited during start-up; see {}",
                    log_path.display()
                ),
            }
        }
        ForkResult::Child => {
            drop(read_end);
            nix::unistd::setsid()?;
            let devnull = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")?;
            nix::unistd::dup2_stdin(&devnull)?;
            nix::unistd::dup2_stdout(&devnull)?;
            nix::unistd::dup2_stderr(&log)?;
            init_logging(Some(log));
            let result = serve(&plan, Ready(Some(fs::File::from(write_end))));
            if let Err(e) = &result {
                error!("{}", crate::describe(e));
            }
            std::process::exit(i32::from(result.is_err()));
        }
    }
}

fn serve(plan: &MountPlan, mut ready: Ready) -> Result<()> {
    let started = start(plan);
    let (session, listener_path, rt, node, control) = match started {
        Ok(s) => s,
        Err(e) => {
            let r = Err(e);
            ready.send(&r);
            return r;
        }
    };
    info!(name = %plan.name, mountpoint = %plan.mountpoint.display(), node = %node.id().short(), key = %plan.key_fingerprint, "mounted");
    ready.send(&Ok(()));

    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let fuse = std::thread::Builder::new()
        .name("fuse-session".into())
        .spawn(move || {
            let r = session.run();
            let _ = done_tx.send(());
            r
        })?;
    let mountpoint = plan.mountpoint.clone();
    rt.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let stop = |why: &str| {
            info!("{why}: unmounting {}", mountpoint.display());
            if let Err(e) = btfs_fs::unmount(&mountpoint) {
                error!("unmount failed: {e}");
            }
        };
        tokio::select! {
            _ = term.recv() => stop("SIGTERM"),
            _ = int.recv() => stop("SIGINT"),
            _ = done_rx => info!("unmounted"),
        }
        anyhow::Ok(())
    })?;
    // The session ends once the kernel has let go of the mount (after the
    // last open file of a lazily unmounted filesystem is closed).
    let fuse_result = fuse
        .join()
        .map_err(|_| anyhow::anyhow!("the FUSE session thread panicked"))?;
    // The node's tasks end in order; the engine keeps what partial torrents
    // fetched (their bitfields) for the next start.
    control.abort();
    let fs = node.fs().clone();
    rt.block_on(node.shutdown());
    // What is left is librqbit's own (it has a runtime of its own) and
    // blocking work already handed off: not waited for past this.
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
    let _ = fs::remove_file(&listener_path);
    fs.collect_garbage()
        .context("flushing the metadata store")?;
    // Closed cleanly: the next start opens the store without a rebuild of
    // its indexes (a write after this, by a task still finishing, undoes
    // the mark and the next start rebuilds).
    fs.close().context("closing the metadata store")?;
    fuse_result.context("FUSE session")?;
    info!("stopped");
    Ok(())
}

type Started = (
    fuser::Session<BtfsFs<btfs_store::SledBackend>>,
    PathBuf,
    tokio::runtime::Runtime,
    Node,
    tokio::task::JoinHandle<()>,
);

/// Raises this process's open-file limit to its hard limit: live torrents,
/// wires and open files each take descriptors, and their caps are set
/// below the limit. Returns the limit in force.
fn raise_open_files() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => hard,
            Err(e) => {
                tracing::warn!(soft, hard, "could not raise the open-file limit: {e}");
                soft
            }
        },
        Ok((soft, _)) => soft,
        Err(e) => {
            tracing::warn!("could not read the open-file limit: {e}");
            1024
        }
    }
}

/// Live torrents at once: `max_torrents=` (default
/// [`btfs_torrent::DEFAULT_MAX_LIVE`]), kept to a quarter of the open-file
/// limit (each holds files, and wires need descriptors too).
fn max_live(asked: Option<usize>, open_files: u64) -> usize {
    let room = usize::try_from(open_files / 4).unwrap_or(usize::MAX).max(1);
    let want = asked.unwrap_or(btfs_torrent::DEFAULT_MAX_LIVE);
    if want > room {
        tracing::warn!(
            want,
            room,
            open_files,
            "max_torrents is lowered to a quarter of the open-file limit"
        );
    }
    want.min(room)
}

/// What the node needs from the plan.
fn node_config(plan: &MountPlan, keypair: libp2p_identity::Keypair, open_files: u64) -> NodeConfig {
    let o = &plan.opts;
    NodeConfig {
        cluster: plan.name.clone(),
        psk: plan.psk,
        keypair,
        state_dir: plan.state_dir.clone(),
        listen: o.mesh_listen(),
        peers: o.peers.clone(),
        peers_file: o.peers_file.clone(),
        mdns: o.mdns,
        members: o.members.clone(),
        passthrough: o.passthrough,
        ttl: o.ttl,
        tombstone_retention: o.tombstone_retention,
        history: o.history,
        bt_listen: bt_listen(plan),
        bt_allow: o.bt_allow.clone(),
        wire_direct: o.bt_wire_direct,
        congestion: o.bt_congestion.clone(),
        read_timeout: o.read_timeout,
        up_rate: o.up_rate,
        down_rate: o.down_rate,
        cache_size: o.cache_size,
        max_live: max_live(o.max_torrents, open_files),
        prefetch: o.prefetch.clone(),
        zone: o.zone.clone(),
        info: NodeInfo {
            name: plan.name.clone(),
            mountpoint: plan.mountpoint.clone(),
            state_dir: plan.state_dir.clone(),
            key_file: plan.key_path.clone(),
            key_fingerprint: plan.key_fingerprint.clone(),
            options: o.effective(),
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            zone: o.zone.as_ref().map(ToString::to_string),
        },
    }
}

fn start(plan: &MountPlan) -> Result<Started> {
    let open_files = raise_open_files();
    info!(open_files, "open-file limit");
    let (keypair, _) = keys::load_or_create_identity(&plan.state_dir.join("identity.key"))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(RUNTIME_THREADS)
        .thread_name("btfs-rt")
        .enable_all()
        .build()?;
    // `metrics=`: bound before anything starts, so that a taken address
    // fails the mount at once.
    let metrics = match plan.opts.metrics {
        Some(addr) => {
            let _guard = rt.enter();
            Some(btfs_node::btfs_metrics::server::Endpoint::bind(addr)?)
        }
        None => None,
    };
    let (node, fs) = rt.block_on(Node::start(node_config(plan, keypair, open_files)))?;
    if let Some(endpoint) = metrics {
        rt.spawn(endpoint.serve(node.handle().metrics().shared()));
    }
    match mount_and_listen(plan, &rt, &node, fs) {
        Ok((session, sock, control)) => Ok((session, sock, rt, node, control)),
        Err(e) => {
            rt.block_on(node.shutdown());
            Err(e)
        }
    }
}

/// `reconfigure OPTIONS` (`mount -o remount,OPTIONS`): root or the mount's
/// owner changes the live options (`options::LIVE`); a change to any other
/// is refused with one line naming them all, and nothing changes. `opts`
/// are the options in force, kept current here.
fn reconfigure(handle: btfs_node::NodeHandle, opts: MountOpts) -> control::RequestFn {
    let current = Arc::new(tokio::sync::Mutex::new(opts));
    Arc::new(move |args: String, caller: control::Caller| {
        let (handle, current) = (handle.clone(), current.clone());
        Box::pin(async move {
            let owner = nix::unistd::geteuid().as_raw();
            if caller.uid != 0 && caller.uid != owner {
                return serde_json::json!({ "error": "only root or the mount's owner may remount it" });
            }
            let mut cur = current.lock().await;
            let r = match cur.remount(&args) {
                Ok(r) => r,
                Err(e) => return serde_json::json!({ "error": crate::describe(&e) }),
            };
            if !r.refused.is_empty() {
                return serde_json::json!({ "error": format!(
                    "cannot change live: {} (unmount and mount again)",
                    r.refused.join(", ")
                ) });
            }
            match handle.reconfigure(r.request()).await {
                Ok(done) => {
                    info!(options = %args, "remounted");
                    *cur = r.opts;
                    serde_json::json!({ "reconfigured": done })
                }
                Err(e) => {
                    serde_json::json!({ "error": format!("remount: {}", btfs_node::error_chain(&e)) })
                }
            }
        })
    })
}

/// Mounts the node's filesystem and opens its control socket.
fn mount_and_listen(
    plan: &MountPlan,
    rt: &tokio::runtime::Runtime,
    node: &Node,
    fs: BtfsFs<btfs_store::SledBackend>,
) -> Result<(
    fuser::Session<BtfsFs<btfs_store::SledBackend>>,
    PathBuf,
    tokio::task::JoinHandle<()>,
)> {
    let sock = control::socket_path(&plan.mountpoint);
    if let Some(dir) = sock.parent() {
        control::create_run_dir(dir)?;
    }
    let _ = fs::remove_file(&sock);
    let listener = {
        let _guard = rt.enter();
        tokio::net::UnixListener::bind(&sock)
            .with_context(|| format!("control socket {}", sock.display()))?
    };
    fs::set_permissions(&sock, fs::Permissions::from_mode(0o600))
        .with_context(|| format!("control socket {}", sock.display()))?;

    let session = btfs_fs::mount(
        fs,
        &MountOptions {
            fsname: plan.name.clone(),
            mountpoint: plan.mountpoint.clone(),
            threads: plan.opts.threads,
            flags: plan.opts.flags,
            allow_other: plan.opts.allow_other,
        },
    )?;
    node.fs()
        .set_notifier(session.notifier())
        .context("starting the kernel-invalidation thread")?;
    let handle = node.handle();
    let mut handlers = control::Handlers::new();
    let status_of = handle.clone();
    handlers.insert(
        "status",
        Arc::new(move |_: String, _: control::Caller| {
            let v = match status_of.status() {
                Ok(s) => serde_json::to_value(s)
                    .unwrap_or_else(|e| serde_json::json!({ "error": e.to_string() })),
                Err(e) => serde_json::json!({ "error": e.to_string() }),
            };
            Box::pin(async move { v })
        }),
    );
    let generate_on = handle.clone();
    let generate: control::RequestFn = Arc::new(move |args: String, caller: control::Caller| {
        let handle = generate_on.clone();
        Box::pin(async move {
            if caller.uid != 0 {
                return serde_json::json!({ "error": "btfs generate: only root may fill the namespace" });
            }
            let Some(req) = btfs_node::Generate::parse(&args) else {
                return serde_json::json!({ "error": format!("btfs generate: bad request {args:?}") });
            };
            match handle.generate(req).await {
                Ok(n) => serde_json::json!({ "records": n }),
                Err(e) => serde_json::json!({ "error": format!("btfs generate: {e}") }),
            }
        })
    });
    // `btfs pin`/`unpin PATH`: the caller must be able to read the path.
    for verb in ["pin", "unpin"] {
        let on = handle.clone();
        let f: control::RequestFn = Arc::new(move |path: String, caller: control::Caller| {
            let handle = on.clone();
            Box::pin(async move {
                let may = move |mode, uid, gid, want| caller.may(mode, uid, gid, want);
                let r = if verb == "pin" {
                    handle.pin(path, may).await.map(|s| serde_json::json!(s))
                } else {
                    handle
                        .unpin(path, may)
                        .await
                        .map(|()| serde_json::json!({}))
                };
                r.unwrap_or_else(|e| serde_json::json!({ "error": e.to_string() }))
            })
        });
        handlers.insert(verb, f);
    }
    let pins_of = handle.clone();
    handlers.insert(
        "pins",
        Arc::new(move |_: String, _: control::Caller| {
            let v = serde_json::json!(pins_of.pins());
            Box::pin(async move { v })
        }),
    );
    handlers.insert(
        "reconfigure",
        reconfigure(handle.clone(), plan.opts.clone()),
    );
    let torrent: control::RequestFn = Arc::new(move |path: String, caller: control::Caller| {
        let handle = handle.clone();
        Box::pin(async move {
            let may = |mode, uid, gid, want| caller.may(mode, uid, gid, want);
            match handle.torrent(&path, may).await {
                Ok(bytes) => serde_json::json!({ "torrent": hex::encode(&bytes) }),
                Err(e) => serde_json::json!({ "error": e }),
            }
        })
    });
    crate::history::handlers(&node.handle(), &mut handlers);
    handlers.insert("torrent", torrent);
    handlers.insert("generate", generate);
    let control = rt.spawn(control::serve(listener, handlers));
    Ok((session, sock, control))
}
