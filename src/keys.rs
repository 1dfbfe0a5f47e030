//! The cluster's pre-shared key (swarm.key) and the node's identity.

use std::{fs, io::Write, os::unix::fs::OpenOptionsExt, path::Path};

use anyhow::{Context, Result, bail};
use btfs_core::NodeId;
use libp2p_identity::Keypair;
use libp2p_pnet::PreSharedKey;

/// Writes a new random 256-bit key in the IPFS/libp2p `swarm.key` format.
pub(crate) fn write_new_swarm_key(path: &Path, force: bool) -> Result<PreSharedKey> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("no system randomness: {e}"))?;
    let key = PreSharedKey::new(bytes);
    let mut opts = fs::OpenOptions::new();
    opts.write(true).mode(0o600);
    if force {
        opts.create(true).truncate(true);
    } else {
        opts.create_new(true);
    }
    let mut f = opts.open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::AlreadyExists => {
            anyhow::anyhow!(
                "{} already exists (use --force to replace it)",
                path.display()
            )
        }
        _ => anyhow::anyhow!("cannot create key file {}: {e}", path.display()),
    })?;
    writeln!(f, "{key}").with_context(|| format!("writing {}", path.display()))?;
    f.sync_all()?;
    Ok(key)
}

/// Reads and validates a swarm key file.
pub(crate) fn read_swarm_key(path: &Path) -> Result<PreSharedKey> {
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!(
                "key file {} does not exist (create one with `btfs keygen {}`)",
                path.display(),
                path.display()
            )
        }
        Err(e) => bail!("key file {} cannot be read: {e}", path.display()),
    };
    let key = text.parse::<PreSharedKey>().map_err(|e| {
        anyhow::anyhow!("key file {} is not a valid swarm key ({e:?}); expected the three lines `/key/swarm/psk/1.0.0/`, `/base16/` and 64 hex digits", path.display())
    })?;
    check_private(path, "key file")?;
    Ok(key)
}

/// Refuses a secret that another user could read or replace: it must belong
/// to this user (or root) and be closed to group and others, as ssh asks
/// of its keys.
pub(crate) fn check_private(path: &Path, what: &str) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta =
        fs::metadata(path).with_context(|| format!("{what} {} cannot be read", path.display()))?;
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me && meta.uid() != 0 {
        bail!(
            "{what} {} belongs to uid {}, not to this user (uid {me}) or root: chown it",
            path.display(),
            meta.uid()
        );
    }
    if meta.mode() & 0o077 != 0 {
        bail!(
            "{what} {} is open to other users (mode {:o}): run `chmod 600 {}`",
            path.display(),
            meta.mode() & 0o7777,
            path.display()
        );
    }
    Ok(())
}

/// Loads the node's ed25519 identity from `path`, creating it on first use.
pub(crate) fn load_or_create_identity(path: &Path) -> Result<(Keypair, NodeId)> {
    let keypair = match fs::read(path) {
        Ok(bytes) => {
            check_private(path, "identity file")?;
            Keypair::from_protobuf_encoding(&bytes)
                .with_context(|| format!("identity file {} is corrupt", path.display()))?
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let kp = Keypair::generate_ed25519();
            let bytes = kp
                .to_protobuf_encoding()
                .context("encoding a new identity")?;
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .with_context(|| format!("creating identity file {}", path.display()))?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            kp
        }
        Err(e) => bail!("identity file {} cannot be read: {e}", path.display()),
    };
    let node = btfs_sync::wire::node_id(&keypair)
        .map_err(|e| anyhow::anyhow!("identity file {}: {e}", path.display()))?;
    Ok((keypair, node))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keygen_output_parses_and_bad_files_are_explained() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("swarm.key");
        let key = write_new_swarm_key(&p, false).unwrap();
        assert_eq!(
            read_swarm_key(&p).unwrap().fingerprint().to_string(),
            key.fingerprint().to_string()
        );
        let again = write_new_swarm_key(&p, false).unwrap_err().to_string();
        assert!(again.contains("already exists"), "{again}");

        fs::write(&p, "not a key\n").unwrap();
        let err = read_swarm_key(&p).unwrap_err().to_string();
        assert!(err.contains("is not a valid swarm key"), "{err}");
        let missing = read_swarm_key(&dir.path().join("nope"))
            .unwrap_err()
            .to_string();
        assert!(missing.contains("does not exist"), "{missing}");
    }

    #[test]
    fn identity_is_stable_across_loads() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("identity.key");
        let (_, a) = load_or_create_identity(&p).unwrap();
        let (_, b) = load_or_create_identity(&p).unwrap();
        assert_eq!(a, b);
    }
}
