//! `mount -t btfs`, fstab and `umount` through mount(8) and the installed
//! helper. Installs mount.btfs into /sbin for the test (restoring whatever was
//! there) and btfs into a temporary directory.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use common::{require_fuse, wait_exit};

struct Installed {
    helper: PathBuf,
    backup: Option<Vec<u8>>,
    _bindir: tempfile::TempDir,
}

impl Installed {
    fn new() -> Self {
        let helper = PathBuf::from("/sbin/mount.btfs");
        let backup = fs::read(&helper).ok();
        let bindir = tempfile::tempdir().unwrap();
        // Point the install at the binary cargo built for this test run.
        fs::copy(common::btfs_bin(), bindir.path().join("btfs")).unwrap();
        let script = fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/mount-helpers/mount.btfs"
        ))
        .unwrap();
        let script = script.replace(
            "BTFS=/usr/local/bin/btfs",
            &format!("BTFS={}/btfs", bindir.path().display()),
        );
        fs::write(&helper, script).unwrap();
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&helper, fs::Permissions::from_mode(0o755)).unwrap();
        Self {
            helper,
            backup,
            _bindir: bindir,
        }
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        match &self.backup {
            Some(b) => fs::write(&self.helper, b).unwrap(),
            None => fs::remove_file(&self.helper).unwrap(),
        }
    }
}

fn run(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"))
}

fn mounts_at(mnt: &Path) -> Vec<String> {
    fs::read_to_string("/proc/mounts")
        .unwrap()
        .lines()
        .filter(|l| l.split(' ').nth(1) == mnt.to_str())
        .map(str::to_owned)
        .collect()
}

fn daemon_pid(mnt: &Path) -> u32 {
    let out = run(
        common::btfs_bin(),
        &["status", mnt.to_str().unwrap(), "--json"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["pid"].as_u64().unwrap() as u32
}

fn umount(mnt: &Path) {
    let pid = daemon_pid(mnt);
    let out = run("umount", &[mnt.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "umount: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_exit(pid, std::time::Duration::from_secs(30));
    assert!(mounts_at(mnt).is_empty());
}

#[test]
fn mount_t_btfs_fstab_and_umount() {
    require_fuse();
    let _installed = Installed::new();
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let m = mnt.to_str().unwrap();
    let key = dir.path().join("swarm.key");
    assert!(
        run(common::btfs_bin(), &["keygen", key.to_str().unwrap()])
            .status
            .success()
    );
    let opts = format!(
        "key={},state={},listen=127.0.0.1:0,mdns=off",
        key.display(),
        dir.path().join("state").display()
    );

    // mount -t btfs
    let out = run("mount", &["-t", "btfs", "demo", m, "-o", &opts]);
    assert!(
        out.status.success(),
        "mount -t btfs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines = mounts_at(&mnt);
    assert_eq!(lines.len(), 1);
    assert!(
        lines[0].starts_with(&format!("demo {m} fuse.btfs ")),
        "{}",
        lines[0]
    );
    fs::write(mnt.join("kept"), b"across mounts").unwrap();
    umount(&mnt);

    // --fake mounts nothing; a bad key mounts nothing and says why.
    let out = run("mount", &["-f", "-t", "btfs", "demo", m, "-o", &opts]);
    assert!(out.status.success());
    assert!(mounts_at(&mnt).is_empty());
    let bad = dir.path().join("bad.key");
    fs::write(&bad, "nonsense").unwrap();
    let out = run(
        "mount",
        &[
            "-t",
            "btfs",
            "demo",
            m,
            "-o",
            &format!("key={}", bad.display()),
        ],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a valid swarm key"));
    assert!(mounts_at(&mnt).is_empty());

    // An fstab line, mounted twice with `mount -a`: one mount, same tree.
    let fstab = dir.path().join("fstab");
    fs::write(
        &fstab,
        format!("demo {m} btfs {opts},_netdev,nofail,x-systemd.automount 0 0\n"),
    )
    .unwrap();
    for _ in 0..2 {
        let out = run("mount", &["-T", fstab.to_str().unwrap(), "-a"]);
        assert!(
            out.status.success(),
            "mount -a: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(mounts_at(&mnt).len(), 1, "mount -a must not mount twice");
    }
    assert_eq!(fs::read(mnt.join("kept")).unwrap(), b"across mounts");
    umount(&mnt);
}
