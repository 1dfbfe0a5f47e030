//! Mounting without fusermount: btfs opens `/dev/fuse` and calls mount(2)
//! itself, then hands the descriptor to fuser with `Session::from_fd`.
//!
//! Doing the mount ourselves means the session owns no mount, so fuser 0.18.0's
//! unmount-on-drop (which, after an external `umount`, unmounts whatever is at
//! the path by then, possibly a new instance) never runs.

use std::{
    fs::OpenOptions,
    os::{
        fd::{AsRawFd, OwnedFd},
        unix::fs::MetadataExt,
    },
    path::{Path, PathBuf},
};

use fuser::{Config, Filesystem, Session, SessionACL};
use nix::mount::{MntFlags, MsFlags};

/// How to mount one filesystem.
#[derive(Debug, Clone)]
pub struct MountOptions {
    /// Source shown in /proc/mounts (keep it equal to the fstab spec so that
    /// `mount -a` sees the filesystem as mounted).
    pub fsname: String,
    pub mountpoint: PathBuf,
    /// FUSE dispatch threads.
    pub threads: usize,
    /// Extra mount(2) flags (`nosuid`, `nodev` are always set).
    pub flags: MsFlags,
    /// Let every user use the mount (the kernel still checks permissions).
    pub allow_other: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("cannot open /dev/fuse: {0} (is the fuse module loaded and are you root?)")]
    DevFuse(std::io::Error),
    #[error("mountpoint {0} does not exist")]
    NoMountpoint(PathBuf),
    #[error("mountpoint {0} is not a directory")]
    NotADirectory(PathBuf),
    #[error("mountpoint {0} is busy: {1} is already mounted there")]
    Busy(PathBuf, String),
    #[error("mount(2) of {0} failed: {1}")]
    Mount(PathBuf, nix::Error),
    #[error("FUSE handshake failed: {0}")]
    Handshake(std::io::Error),
    #[error("cannot inspect {0}: {1}")]
    Inspect(PathBuf, std::io::Error),
}

/// What is mounted at `path`, according to /proc/self/mountinfo.
pub fn mounted_at(path: &Path) -> Result<Option<String>, std::io::Error> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    let want = path.to_string_lossy();
    Ok(info.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(' ').collect();
        let target = fields.get(4)?.replace("\\040", " ");
        if target != want {
            return None;
        }
        let sep = fields.iter().position(|f| *f == "-")?;
        let fstype = fields.get(sep + 1)?;
        let source = fields.get(sep + 2)?;
        Some(format!("{source} ({fstype})"))
    }))
}

/// Checks that `mountpoint` can take a new mount: an existing directory with
/// nothing mounted on it. Returns its canonical path.
pub fn check_mountpoint(mountpoint: &Path) -> Result<PathBuf, MountError> {
    let canonical = match std::fs::canonicalize(mountpoint) {
        Ok(p) => p,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(MountError::NoMountpoint(mountpoint.to_path_buf()));
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            // A dead FUSE daemon left its mount behind.
            return Err(MountError::Busy(
                mountpoint.to_path_buf(),
                "a disconnected FUSE filesystem".into(),
            ));
        }
        Err(e) => return Err(MountError::Inspect(mountpoint.to_path_buf(), e)),
    };
    let meta =
        std::fs::metadata(&canonical).map_err(|e| MountError::Inspect(canonical.clone(), e))?;
    if !meta.is_dir() {
        return Err(MountError::NotADirectory(canonical));
    }
    if let Some(what) =
        mounted_at(&canonical).map_err(|e| MountError::Inspect(canonical.clone(), e))?
    {
        return Err(MountError::Busy(canonical, what));
    }
    Ok(canonical)
}

/// Mounts `fs` and completes the FUSE handshake. The returned session is live:
/// run it (`Session::run`) to serve requests until the filesystem is unmounted.
pub fn mount<FS: Filesystem>(fs: FS, opts: &MountOptions) -> Result<Session<FS>, MountError> {
    let mountpoint = check_mountpoint(&opts.mountpoint)?;
    let dev = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .map_err(MountError::DevFuse)?;
    let fd: OwnedFd = dev.into();
    let root_mode = std::fs::metadata(&mountpoint)
        .map_err(|e| MountError::Inspect(mountpoint.clone(), e))?
        .mode()
        & libc::S_IFMT;
    let mut data = format!(
        "fd={},rootmode={:o},user_id={},group_id={},default_permissions",
        fd.as_raw_fd(),
        root_mode,
        nix::unistd::geteuid(),
        nix::unistd::getegid(),
    );
    if opts.allow_other {
        data.push_str(",allow_other");
    }
    let flags = opts.flags | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    nix::mount::mount(
        Some(opts.fsname.as_str()),
        &mountpoint,
        Some("fuse.btfs"),
        flags,
        Some(data.as_str()),
    )
    .map_err(|e| MountError::Mount(mountpoint.clone(), e))?;

    let mut config = Config::default();
    config.n_threads = Some(opts.threads.max(1));
    let acl = if opts.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    Session::from_fd(fs, fd, acl, config).map_err(|e| {
        let _ = unmount(&mountpoint);
        MountError::Handshake(e)
    })
}

/// Detaches the filesystem at `mountpoint`; the session then ends.
pub fn unmount(mountpoint: &Path) -> nix::Result<()> {
    nix::mount::umount2(mountpoint, MntFlags::MNT_DETACH)
}
