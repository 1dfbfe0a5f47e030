//! In-process tests of replication: two or three nodes, each with an
//! in-memory store and the node's own replication tasks, on an in-memory
//! network (`memnet`). What the network-namespace tests check for records,
//! here without namespaces, daemons or mounts.

mod memnet;
mod replication;

use std::{sync::Arc, time::Duration};

use btfs_core::{FileRecord, NodeId, Owner, RelPath, Timestamp};
use btfs_fs::{BtfsFs, FsConfig, FsHandle, ObjectStore};
use btfs_store::{MemBackend, Store, Version};
use libp2p_identity::{Keypair, PeerId};
use tokio::{sync::mpsc, task::JoinSet};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    Counters, Membership, RecordCounts,
    loops::{event_loop, validator},
    replicate::{Replicator, publish_loop},
};
use memnet::{MemNet, MemTransport};

pub(crate) const CLUSTER: &str = "test";

/// One node: a store, a filesystem handle, its replication tasks.
pub(crate) struct TestNode {
    pub keypair: Keypair,
    pub peer: PeerId,
    pub id: NodeId,
    pub fs: FsHandle<MemBackend>,
    pub rep: Arc<Replicator<MemTransport, MemBackend>>,
    pub counters: Arc<Counters>,
    loops: JoinSet<()>,
    tasks: TaskTracker,
    cancel: CancellationToken,
    _fs: BtfsFs<MemBackend>,
    _dir: tempfile::TempDir,
}

impl TestNode {
    /// A node with a new identity on `net`, admitting `membership`.
    pub(crate) fn start(net: &Arc<MemNet>, membership: Membership) -> Self {
        Self::start_as(net, Keypair::generate_ed25519(), membership)
    }

    pub(crate) fn start_as(net: &Arc<MemNet>, keypair: Keypair, membership: Membership) -> Self {
        Self::start_on(net, keypair, membership, Arc::new(Store::in_memory()))
    }

    /// A node on a store it kept (a restart).
    pub(crate) fn start_on(
        net: &Arc<MemNet>,
        keypair: Keypair,
        membership: Membership,
        store: Arc<Store<MemBackend>>,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let id = btfs_sync::wire::node_id(&keypair).unwrap();
        let peer = keypair.public().to_peer_id();
        let objects = ObjectStore::open(dir.path()).unwrap();
        let (announce, announce_rx) = mpsc::channel(crate::ANNOUNCE_CAP);
        let fs = BtfsFs::new(
            store,
            objects,
            FsConfig {
                node: id,
                passthrough: false,
                ttl: Duration::from_secs(1),
                state_dir: dir.path().to_owned(),
                announce: Some(announce),
                signer: Some(crate::signer(CLUSTER.into(), keypair.clone())),
                content: None,
                history: false,
                metrics: None,
            },
        )
        .unwrap();
        let handle = fs.handle();
        let counters = Arc::new(Counters::default());
        let validate = validator(CLUSTER.into(), membership.clone(), counters.clone());
        let (transport, events) = net.join(peer, validate);
        let (tasks, cancel) = (TaskTracker::new(), CancellationToken::new());
        let rep = Arc::new(Replicator::new(
            transport.clone(),
            handle.clone(),
            CLUSTER.into(),
            membership,
            counters.clone(),
            Arc::default(),
            None,
            tasks.clone(),
            cancel.clone(),
        ));
        let mut loops = JoinSet::new();
        loops.spawn(publish_loop(
            transport,
            handle.clone(),
            announce_rx,
            counters.clone(),
            cancel.clone(),
        ));
        loops.spawn(event_loop(
            events,
            rep.clone(),
            None,
            tasks.clone(),
            cancel.clone(),
        ));
        Self {
            keypair,
            peer,
            id,
            fs: handle,
            rep,
            counters,
            loops,
            tasks,
            cancel,
            _fs: fs,
            _dir: dir,
        }
    }

    /// A version made here, as the filesystem makes one at commit: signed,
    /// stored, announced (past a full queue, read back from the log).
    pub(crate) fn commit(&self, path: &str, record: FileRecord) -> Version {
        self.fs.commit_local(rel(path), record).unwrap()
    }

    /// A new file (or a new version over what this node holds at `path`).
    pub(crate) fn write(&self, path: &str, content: u8) -> Version {
        let now = Timestamp::now();
        let mut r = match self.live(path) {
            Some(old) => old.next_version(self.id, now),
            None => FileRecord::new_file(owner(), self.id, now),
        };
        r.size = u64::from(content) + 1;
        r.content = Some(btfs_core::ContentId([content; 32]));
        self.commit(path, r)
    }

    pub(crate) fn mkdir(&self, path: &str) -> Version {
        self.commit(
            path,
            FileRecord::new_dir(owner(), self.id, Timestamp::now()),
        )
    }

    pub(crate) fn delete(&self, path: &str) -> Version {
        let old = self.live(path).expect("deleting a live path");
        self.commit(path, old.tombstone(self.id, Timestamp::now()))
    }

    /// The live record at `path`, if any.
    pub(crate) fn live(&self, path: &str) -> Option<FileRecord> {
        let p = rel(path);
        self.fs.store().get_live(&p).unwrap().map(|e| e.record)
    }

    /// Every live path with its content, size and how many concurrent
    /// versions it holds (more than one: in conflict), sorted.
    pub(crate) fn tree(&self) -> Vec<(String, Option<btfs_core::ContentId>, u64, usize)> {
        let mut out = Vec::new();
        let mut dirs = vec![RelPath::root()];
        while let Some(d) = dirs.pop() {
            for (name, e) in self.fs.store().children(&d, None, usize::MAX).unwrap() {
                let r = e.record;
                if !r.is_live() {
                    continue;
                }
                let p = d.join(&name).unwrap();
                if r.kind == btfs_core::FileKind::Dir {
                    dirs.push(p.clone());
                }
                out.push((p.to_string(), r.content, r.size, e.sync.versions.len()));
            }
        }
        out.sort();
        out
    }

    pub(crate) fn counts(&self) -> RecordCounts {
        RecordCounts::from(&*self.counters)
    }

    /// Stops the node's tasks and takes it off the network (a crash, as
    /// far as the others see it); returns what a restart needs.
    pub(crate) async fn stop(mut self, net: &MemNet) -> (Keypair, Arc<Store<MemBackend>>) {
        net.leave(self.peer).await;
        self.cancel.cancel();
        while self.loops.join_next().await.is_some() {}
        self.tasks.close();
        self.tasks.wait().await;
        (self.keypair, self.fs.store().clone())
    }
}

/// A test's `/a/b` as a path in the tree.
fn rel(path: &str) -> RelPath {
    RelPath::parse(path.trim_start_matches('/')).unwrap()
}

fn owner() -> Owner {
    Owner {
        mode: 0o644,
        uid: 0,
        gid: 0,
    }
}

/// Waits until `check` holds, or fails naming `what`.
pub(crate) async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not within 20 s: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
