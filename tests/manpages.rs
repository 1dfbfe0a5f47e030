//! The operator's view of btfs outside the filesystem: the manual pages
//! btfs(1) and mount.btfs(8) rendered by man(1), the shell completions,
//! mount-helpers/install.sh putting them in place, and `btfs status --watch`
//! on a real mount.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    io::Read,
    path::Path,
    process::{Command, Output, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use common::{Node, btfs, btfs_bin};

/// How long a watch may take to show its snapshots, or to end.
const WATCH_DEADLINE: Duration = Duration::from_secs(30);

/// `man -l PAGE` as a reader at an 80-column terminal sees it, in ASCII.
fn man(page: &Path) -> String {
    let out = Command::new("man")
        .arg("-l")
        .arg(page)
        .env("MANPAGER", "cat")
        .env("MANWIDTH", "80")
        .env("LC_ALL", "C")
        .output()
        .expect("man (man-db; .ci/run installs it)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "man -l {}: {stderr}", page.display());
    assert!(
        stderr.trim().is_empty(),
        "man -l {} warned: {stderr}",
        page.display()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn assert_has(text: &str, wanted: &[&str], what: &str) {
    for w in wanted {
        assert!(text.contains(w), "{what} lacks {w:?}:\n{text}");
    }
}

/// Checks what a reader of each page needs: its name line, the synopsis,
/// the commands and the mount options.
fn check_pages(btfs_1: &Path, mount_8: &Path) {
    let page = man(btfs_1);
    assert_has(
        &page,
        &[
            "BTFS(1)",
            "NAME",
            "btfs - A FUSE filesystem",
            "SYNOPSIS",
            "COMMANDS",
            "btfs mount NAME MOUNTPOINT [-o, --options OPTIONS]",
            "btfs status MOUNTPOINT",
            "-w, --watch",
            "--interval DURATION",
            "MOUNT OPTIONS",
            "members=FILE",
            "state=DIR",
            "tombstone_retention=DURATION",
            "EXAMPLES",
            "SEE ALSO",
        ],
        "btfs(1)",
    );
    assert!(
        !page.contains("manpages") && !page.contains("completions"),
        "the hidden commands stay out of btfs(1):\n{page}"
    );
    let page = man(mount_8);
    assert_has(
        &page,
        &[
            "MOUNT.BTFS(8)",
            "mount.btfs - mount a btfs filesystem",
            "SYNOPSIS",
            "mount.btfs NAME MOUNTPOINT [-o OPTIONS]",
            "-f     Fake",
            "MOUNT OPTIONS",
            "members=FILE",
            "key=FILE",
            "allow_other | noallow_other",
            "fstab",
            "btfs(1)",
        ],
        "mount.btfs(8)",
    );
}

#[test]
fn both_manual_pages_are_generated_and_man_renders_them() {
    let dir = tempfile::tempdir().unwrap();
    let pages = dir.path().join("pages");
    ok(
        &btfs(&["manpages", pages.to_str().unwrap()]),
        "btfs manpages",
    );
    check_pages(&pages.join("btfs.1"), &pages.join("mount.btfs.8"));
}

#[test]
fn completion_scripts_are_produced_and_bash_accepts_its_own() {
    let bash = ok(&btfs(&["completions", "bash"]), "btfs completions bash");
    assert_has(&bash, &["complete", "btfs", "status", "--watch"], "bash");
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("btfs.bash");
    std::fs::write(&script, &bash).unwrap();
    ok(
        &Command::new("bash")
            .arg("-n")
            .arg(&script)
            .output()
            .unwrap(),
        "bash -n on the completion script",
    );
    let zsh = ok(&btfs(&["completions", "zsh"]), "btfs completions zsh");
    assert!(zsh.starts_with("#compdef btfs"), "{zsh}");
    assert_has(&zsh, &["status", "--watch", "--interval"], "zsh");
    let out = btfs(&["completions", "tcsh"]);
    assert!(!out.status.success(), "an unknown shell is refused");
}

#[test]
fn install_sh_puts_binary_helper_pages_and_completions_under_destdir() {
    let dest = tempfile::tempdir().unwrap();
    let out = Command::new("bash")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/mount-helpers/install.sh"
        ))
        .env("DESTDIR", dest.path())
        .env("PREFIX", "/opt/btfs")
        .env("BTFS_BIN", btfs_bin())
        .output()
        .unwrap();
    ok(&out, "install.sh");
    let d = dest.path();
    let at = |p: &str| d.join(p.trim_start_matches('/'));
    for f in [
        "/opt/btfs/bin/btfs",
        "/sbin/mount.btfs",
        // mount -o remount finds the helper by the mount's type, fuse.btfs.
        "/sbin/mount.fuse.btfs",
        "/opt/btfs/share/man/man1/btfs.1",
        "/opt/btfs/share/man/man8/mount.btfs.8",
        "/opt/btfs/share/bash-completion/completions/btfs",
        "/opt/btfs/share/zsh/site-functions/_btfs",
    ] {
        assert!(at(f).is_file(), "install.sh did not install {f}");
    }
    // The helper names the binary where it will be, not where it was staged.
    let helper = std::fs::read_to_string(at("/sbin/mount.btfs")).unwrap();
    assert!(helper.contains("\nBTFS=/opt/btfs/bin/btfs\n"), "{helper}");
    check_pages(
        &at("/opt/btfs/share/man/man1/btfs.1"),
        &at("/opt/btfs/share/man/man8/mount.btfs.8"),
    );
    let bash =
        std::fs::read_to_string(at("/opt/btfs/share/bash-completion/completions/btfs")).unwrap();
    assert!(bash.contains("complete"), "{bash}");
}

/// A `btfs status --watch` child with its stdout collected as it comes.
struct Watch {
    child: std::process::Child,
    out: Arc<Mutex<String>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Watch {
    fn start(mnt: &Path, interval: &str) -> Self {
        let mut child = Command::new(btfs_bin())
            .args([
                "status",
                mnt.to_str().unwrap(),
                "--watch",
                "--interval",
                interval,
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = Arc::new(Mutex::new(String::new()));
        let mut stdout = child.stdout.take().unwrap();
        let sink = out.clone();
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Self {
            child,
            out,
            reader: Some(reader),
        }
    }

    /// Snapshots printed so far: each starts with a `--- ` line.
    fn snapshots(&self) -> usize {
        self.out
            .lock()
            .unwrap()
            .lines()
            .filter(|l| l.starts_with("--- btfs status "))
            .count()
    }

    fn wait_for_snapshots(&self, n: usize) {
        let deadline = Instant::now() + WATCH_DEADLINE;
        while self.snapshots() < n {
            assert!(
                Instant::now() < deadline,
                "the watch printed {} snapshots, not {n}:\n{}",
                self.snapshots(),
                self.out.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for the watch to end: its exit status, stdout and stderr.
    fn finish(mut self) -> (std::process::ExitStatus, String, String) {
        let deadline = Instant::now() + WATCH_DEADLINE;
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < deadline, "the watch did not end");
            std::thread::sleep(Duration::from_millis(50));
        };
        self.reader.take().unwrap().join().unwrap();
        let mut err = String::new();
        self.child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        let out = self.out.lock().unwrap().clone();
        (status, out, err)
    }
}

#[test]
fn status_watch_prints_snapshots_until_sigint_and_ends_when_the_daemon_goes() {
    let mut node = Node::start_with("");

    // Without a terminal: a dated snapshot every interval; SIGINT ends it
    // with status 0.
    let watch = Watch::start(&node.mnt, "200ms");
    watch.wait_for_snapshots(2);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(watch.child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let (status, out, err) = watch.finish();
    assert!(
        status.success(),
        "SIGINT must end the watch cleanly: {status:?} {err}"
    );
    let snapshots = out
        .lines()
        .filter(|l| l.starts_with("--- btfs status "))
        .count();
    assert!(snapshots >= 2, "{out}");
    assert_eq!(
        out.matches("btfs test on ").count(),
        snapshots,
        "each snapshot is the whole status text:\n{out}"
    );
    assert!(out.contains("  daemon       pid "), "{out}");

    // The daemon going away ends the watch with an error that says so.
    let watch = Watch::start(&node.mnt, "200ms");
    watch.wait_for_snapshots(1);
    node.umount();
    let (status, _, err) = watch.finish();
    assert!(!status.success(), "a watch whose daemon left must fail");
    assert!(err.contains("stopped answering"), "{err}");
}

#[test]
fn status_watch_on_a_path_that_is_not_a_mount_fails_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let out = btfs(&["status", dir.path().to_str().unwrap(), "--watch"]);
    assert!(!out.status.success());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot watch") && err.contains("is it mounted?"),
        "{err}"
    );
    assert!(out.stdout.is_empty(), "nothing is drawn before the error");
    // --interval without --watch, or too short, is refused.
    let out = btfs(&["status", dir.path().to_str().unwrap(), "--interval", "1s"]);
    assert!(!out.status.success());
    let out = btfs(&[
        "status",
        dir.path().to_str().unwrap(),
        "--watch",
        "--interval",
        "1ms",
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("too short"));
}
