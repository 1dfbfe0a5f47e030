//! Who belongs to the cluster: the `members=` file, the `peers_file=`
//! bootstrap list, and the check every record passes on its way in.

use std::{collections::HashSet, net::SocketAddr, path::Path, sync::Arc};

use btfs_core::NodeId;
use btfs_sync::SignedRecord;
use libp2p_identity::{PeerId, PublicKey, ed25519};
use parking_lot::RwLock;

use crate::NodeError;

/// The mesh address of `IP:PORT`.
pub(crate) fn multiaddr(a: SocketAddr) -> String {
    match a {
        SocketAddr::V4(v4) => format!("/ip4/{}/tcp/{}", v4.ip(), v4.port()),
        SocketAddr::V6(v6) => format!("/ip6/{}/tcp/{}", v6.ip(), v6.port()),
    }
}

/// The lines of a list file that carry something (`#` starts a comment).
fn entries(text: &str) -> impl Iterator<Item = &str> {
    text.lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
}

/// Bootstrap peers from `peers_file=`: one `IP:PORT` (or multiaddr) a line,
/// `#` comments allowed.
pub(crate) fn read_peers_file(path: &Path) -> Result<Vec<String>, NodeError> {
    let text = std::fs::read_to_string(path).map_err(|source| NodeError::PeersFile {
        path: path.to_owned(),
        source,
    })?;
    entries(&text)
        .map(|l| {
            if l.starts_with('/') {
                Ok(l.to_owned())
            } else {
                l.parse::<SocketAddr>()
                    .map(multiaddr)
                    .map_err(|source| NodeError::PeersLine {
                        path: path.to_owned(),
                        line: l.to_owned(),
                        source,
                    })
            }
        })
        .collect()
}

/// Admitted members and former ones.
pub(crate) type MemberSets = (HashSet<PeerId>, HashSet<PeerId>);

/// Peers from `members=`: one peer id a line, admitted; `removed PEER_ID`
/// for a former member, refused, whose id may still stand in the version
/// vectors of the paths it once changed. Returns (members, former).
pub(crate) fn read_members(path: &Path) -> Result<MemberSets, NodeError> {
    let text = std::fs::read_to_string(path).map_err(|source| NodeError::MembersFile {
        path: path.to_owned(),
        source,
    })?;
    let (mut members, mut former) = (HashSet::new(), HashSet::new());
    for l in entries(&text) {
        let (set, id) = match l.strip_prefix("removed ") {
            Some(id) => (&mut former, id.trim()),
            None => (&mut members, l),
        };
        let p = id
            .parse::<PeerId>()
            .map_err(|source| NodeError::MembersLine {
                path: path.to_owned(),
                line: l.to_owned(),
                source,
            })?;
        set.insert(p);
    }
    if let Some(both) = members.intersection(&former).next() {
        return Err(NodeError::MemberTwice {
            path: path.to_owned(),
            peer: *both,
        });
    }
    Ok((members, former))
}

/// The libp2p peer id of a node id (its ed25519 public key).
pub(crate) fn peer_of(node: &NodeId) -> Option<PeerId> {
    ed25519::PublicKey::try_from_bytes(&node.0)
        .ok()
        .map(|k| PublicKey::from(k).to_peer_id())
}

/// The member sets in force (`None`: every key holder).
type Current = Option<Arc<MemberSets>>;

/// Who may author records: everyone holding the key, or the `members=` list;
/// and whose ids may stand in a record's version vector: those, and the
/// members marked `removed`. Clones share one list, which `mount -o
/// remount,members=` replaces ([`Membership::replace`]): every check after
/// that (gossip, anti-entropy) uses the new one.
#[derive(Debug, Clone, Default)]
pub struct Membership(Arc<RwLock<Current>>);

impl Membership {
    /// Everyone who holds the key.
    pub fn open() -> Self {
        Self(Arc::new(RwLock::new(None)))
    }

    /// Only `members`; `former` may still stand in version vectors.
    pub fn listed(members: HashSet<PeerId>, former: HashSet<PeerId>) -> Self {
        Self(Arc::new(RwLock::new(Some(Arc::new((members, former))))))
    }

    /// Replaces the list for every clone (a list read from a `members=`
    /// file, or every key holder).
    pub(crate) fn replace(&self, sets: Option<MemberSets>) {
        *self.0.write() = sets.map(Arc::new);
    }

    /// The list in force (cheap: the sets are shared).
    fn current(&self) -> Current {
        self.0.read().clone()
    }

    /// The admitted members, when the list is closed.
    pub(crate) fn members(&self) -> Option<HashSet<PeerId>> {
        self.current().map(|m| m.0.clone())
    }

    fn admits(&self, n: &NodeId) -> bool {
        match (&self.current(), peer_of(n)) {
            (None, _) => true,
            (Some(m), Some(p)) => m.0.contains(&p),
            (Some(_), None) => false,
        }
    }

    fn knows(&self, n: &NodeId) -> bool {
        match (&self.current(), peer_of(n)) {
            (None, _) => true,
            (Some(m), Some(p)) => m.0.contains(&p) || m.1.contains(&p),
            (Some(_), None) => false,
        }
    }

    /// Checks a signed record against this membership (see
    /// [`SignedRecord::verify_with`]).
    pub fn verify(&self, cluster: &str, r: &SignedRecord) -> Result<(), btfs_sync::WireError> {
        r.verify_with(cluster, |n| self.admits(n), |n| self.knows(n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use libp2p_identity::Keypair;

    #[test]
    fn removed_members_may_stand_in_vectors_but_neither_connect_nor_author() {
        let ids: Vec<(PeerId, NodeId)> = (0..3)
            .map(|_| {
                let kp = Keypair::generate_ed25519();
                let node = btfs_sync::wire::node_id(&kp).unwrap();
                (kp.public().to_peer_id(), node)
            })
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("members");
        std::fs::write(&file, format!("{} # a\nremoved {}\n\n", ids[0].0, ids[1].0)).unwrap();
        let (members, former) = read_members(&file).unwrap();
        assert_eq!((members.len(), former.len()), (1, 1));
        let m = Membership::listed(members, former);
        assert!(m.admits(&ids[0].1) && m.knows(&ids[0].1));
        assert!(!m.admits(&ids[1].1) && m.knows(&ids[1].1));
        assert!(!m.admits(&ids[2].1) && !m.knows(&ids[2].1));
        let open = Membership::open();
        assert!(open.admits(&ids[2].1) && open.knows(&ids[2].1));
        // A replaced list holds for every clone at once.
        let clone = m.clone();
        m.replace(Some((HashSet::from([ids[1].0]), HashSet::from([ids[0].0]))));
        assert!(!clone.admits(&ids[0].1) && clone.knows(&ids[0].1));
        assert!(clone.admits(&ids[1].1));
        m.replace(None);
        assert!(clone.admits(&ids[2].1));

        std::fs::write(&file, format!("{0}\nremoved {0}\n", ids[0].0)).unwrap();
        let err = read_members(&file).unwrap_err().to_string();
        assert!(err.contains("both as a member and as removed"), "{err}");
        std::fs::write(&file, "removed nonsense\n").unwrap();
        let err = read_members(&file).unwrap_err().to_string();
        assert!(err.contains("is not a peer id"), "{err}");
    }

    /// The README's first command mounts without `listen=`: the default must
    /// be a mesh address libp2p accepts (it once was a bare `IP:PORT`).
    #[test]
    fn listen_addresses_become_valid_multiaddrs() {
        let a = multiaddr("0.0.0.0:4410".parse().unwrap());
        assert_eq!(a, "/ip4/0.0.0.0/tcp/4410");
        a.parse::<btfs_mesh::Multiaddr>().unwrap();
        let v6 = multiaddr("[::1]:9".parse().unwrap());
        v6.parse::<btfs_mesh::Multiaddr>().unwrap();
    }
}
