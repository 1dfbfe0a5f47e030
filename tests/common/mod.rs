//! Test harness: real btfs daemons on real FUSE mounts.
//!
//! Every test that uses it needs root and /dev/fuse. Without them the test
//! fails with a message saying so: a filesystem test suite that skips silently
//! proves nothing.
#![allow(dead_code, unreachable_pub)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    time::{Duration, Instant},
};

/// Fails the test loudly if this machine cannot mount FUSE filesystems.
pub fn require_fuse() {
    assert!(
        Path::new("/dev/fuse").exists(),
        "/dev/fuse is missing: btfs tests mount real filesystems (load the fuse module; CI must provide it)"
    );
    assert!(
        nix::unistd::geteuid().is_root(),
        "btfs tests mount real filesystems and must run as root"
    );
}

/// The binary under test: this build's, or `BTFS_BIN` (a benchmark of an
/// older build against this one, side by side).
pub fn btfs_bin() -> &'static str {
    static BIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        std::env::var("BTFS_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_btfs").to_owned())
    })
}

/// Runs a command, failing the test with its output if it fails; its
/// standard output.
pub fn run_ok(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e} (is it installed? .ci/run installs it)"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn btfs(args: &[&str]) -> Output {
    Command::new(btfs_bin())
        .args(args)
        .output()
        .expect("run btfs")
}

/// `btfs ARGS` that must succeed: its standard output, then its standard
/// error (commands report what they did there).
pub fn btfs_ok(args: &[&str]) -> String {
    let out = btfs(args);
    assert!(
        out.status.success(),
        "btfs {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `btfs ARGS` that must fail: its standard error.
pub fn btfs_err(args: &[&str]) -> String {
    let out = btfs(args);
    assert!(!out.status.success(), "btfs {args:?} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// One node: a state directory and a mountpoint, mounted while alive.
pub struct Node {
    pub name: String,
    pub mnt: PathBuf,
    pub state: PathBuf,
    pub extra_opts: String,
    pid: Option<u32>,
    _dir: tempfile::TempDir,
}

impl Node {
    /// A new node with its own state, mounted.
    pub fn start() -> Self {
        Self::start_with("")
    }

    pub fn start_with(extra_opts: &str) -> Self {
        require_fuse();
        let dir = tempfile::Builder::new()
            .prefix("btfs-test-")
            .tempdir()
            .expect("tempdir");
        let mnt = dir.path().join("mnt");
        let state = dir.path().join("state");
        std::fs::create_dir(&mnt).expect("mkdir mnt");
        let mut node = Self {
            name: "test".into(),
            mnt,
            state,
            extra_opts: extra_opts.to_owned(),
            pid: None,
            _dir: dir,
        };
        node.mount();
        node
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    pub fn mount(&mut self) {
        // Tests never send mDNS or listen beyond loopback unless they say so.
        let mut opts = format!("state={}", self.state.display());
        if !self.extra_opts.contains("listen=") {
            opts.push_str(",listen=127.0.0.1:0");
        }
        if !self.extra_opts.contains("mdns=") {
            opts.push_str(",mdns=off");
        }
        if !self.extra_opts.is_empty() {
            opts = format!("{opts},{}", self.extra_opts);
        }
        let out = btfs(&["mount", &self.name, self.mnt.to_str().unwrap(), "-o", &opts]);
        assert!(
            out.status.success(),
            "btfs mount failed: {}{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(self.state.join("btfs.log")).unwrap_or_default()
        );
        let pid = self.status()["pid"].as_u64().expect("pid in status") as u32;
        self.pid = Some(pid);
    }

    pub fn status(&self) -> serde_json::Value {
        let out = btfs(&["status", self.mnt.to_str().unwrap(), "--json"]);
        assert!(
            out.status.success(),
            "btfs status: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("status is JSON")
    }

    /// Unmounts and waits until the daemon has exited.
    pub fn umount(&mut self) {
        let Some(pid) = self.pid.take() else { return };
        let out = Command::new("umount")
            .arg(&self.mnt)
            .output()
            .expect("umount");
        if !out.status.success() {
            // Busy or already gone: detach so the test can clean up.
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).output();
        }
        wait_exit(pid, Duration::from_secs(30));
    }

    pub fn remount(&mut self) {
        self.umount();
        self.mount();
    }

    /// SIGKILLs the daemon, waits for it to exit and detaches its dead mount.
    pub fn kill9(&mut self) {
        if let Some(pid) = self.kill9_no_wait() {
            wait_exit(pid, Duration::from_secs(10));
        }
    }

    /// SIGKILLs the daemon and detaches its dead mount at once, while the
    /// daemon may still be exiting. Returns its pid.
    pub fn kill9_no_wait(&mut self) -> Option<u32> {
        let pid = self.pid.take()?;
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        let out = Command::new("umount")
            .arg("-l")
            .arg(&self.mnt)
            .output()
            .expect("umount");
        assert!(
            out.status.success(),
            "umount of a dead mount: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Some(pid)
    }

    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.state.join("btfs.log")).unwrap_or_default()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.umount();
    }
}

/// Waits for `pid` to exit (a zombie counts as exited: it may not be our child).
pub fn wait_exit(pid: u32, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat
            .rsplit(')')
            .next()
            .and_then(|rest| rest.split_whitespace().next());
        if matches!(state, None | Some("Z") | Some("X")) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "daemon {pid} did not exit within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Deterministic pseudo-random bytes (xorshift), for content checks.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// The length and blake3 of the whole file at `path`, read in 1 MiB calls
/// (through the mount, when `path` is in one).
pub fn hash_file(path: &Path) -> std::io::Result<(u64, blake3::Hash)> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok((len, hasher.finalize()));
        }
        hasher.update(&buf[..n]);
        len += n as u64;
    }
}
