//! TCP congestion control on the peer wire's connections.
//!
//! Every byte a member sends crosses three TCP connections: librqbit to the
//! bridge on the sending node (loopback), the wire between the members, and
//! the bridge to librqbit on the receiving node (loopback; see `bridge`).
//!
//! The peer wire's traffic is bursty: librqbit keeps a window of requests
//! out, and each answer is a burst of 16 KiB blocks. BBR, a common system
//! default (and the test VM's), models the path's bandwidth from the
//! delivery rate of the last few round trips. On loopback, or a LAN, those
//! last a millisecond or less, so it paces each burst at the rate the wire
//! happened to carry just before. Loss-based algorithms read remote files
//! faster here, on the loopback legs and on the wires (see
//! docs/BENCHMARKS.md).
//!
//! * **Loopback legs** always get a loss-based algorithm (cubic, or reno
//!   where cubic is missing): they have no congestion to control. That means
//!   the sockets btfs opens, its SOCKS5 listener (accepted connections
//!   inherit it), librqbit's loopback listener (its accepted connections
//!   carry what a node uploads to members that dialled it), and librqbit's
//!   outgoing connections to the SOCKS5 listener (what a node uploads to
//!   members it dialled). librqbit has no hook for its sockets, so those are
//!   found among the process's open descriptors by their addresses, and set
//!   through a duplicate (`pidfd_getfd`): the same socket, without borrowing
//!   a descriptor that another thread may close.
//! * **Wires between members** get `bt_congestion=` ([`Congestion`]), cubic
//!   unless said otherwise; `system` keeps the system's default (for members
//!   across long, lossy links, where BBR earns its keep).

use std::{
    io,
    net::SocketAddr,
    os::fd::{AsFd, OwnedFd},
};

use socket2::SockRef;
use tracing::debug;

/// Loss-based algorithms for loopback, in order of preference; reno is
/// always built in.
const UNPACED: [&str; 2] = ["cubic", "reno"];

/// The congestion control of wires between members (`bt_congestion=`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Congestion {
    /// Whatever the system's default is (`net.ipv4.tcp_congestion_control`).
    System,
    /// A named algorithm, e.g. `cubic` or `bbr`.
    Named(String),
}

impl Default for Congestion {
    fn default() -> Self {
        Self::Named("cubic".into())
    }
}

impl std::str::FromStr for Congestion {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s == "system" {
            return Ok(Self::System);
        }
        // The kernel's names: at most 15 bytes (TCP_CA_NAME_MAX is 16).
        let plausible = !s.is_empty()
            && s.len() < 16
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if plausible {
            Ok(Self::Named(s.to_owned()))
        } else {
            Err(format!(
                "{s:?} is not a congestion control name (e.g. cubic, bbr, reno, or system)"
            ))
        }
    }
}

impl std::fmt::Display for Congestion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::System => f.write_str("system"),
            Self::Named(n) => f.write_str(n),
        }
    }
}

impl Congestion {
    /// Sets it on `socket` (a listener passes it to what it accepts).
    pub fn apply(&self, socket: &impl AsFd) -> io::Result<()> {
        match self {
            Self::System => Ok(()),
            Self::Named(name) => SockRef::from(socket)
                .set_tcp_congestion(name.as_bytes())
                .map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        ApplyError {
                            name: name.clone(),
                            available: available(),
                            source: e,
                        },
                    )
                }),
        }
    }
}

/// A named algorithm could not be set (the kernel lacks it, most likely).
#[derive(Debug, thiserror::Error)]
#[error("TCP congestion control {name:?} (bt_congestion=): {source}; this kernel has: {available}")]
struct ApplyError {
    name: String,
    available: String,
    #[source]
    source: io::Error,
}

/// The kernel's available algorithms, for error messages.
fn available() -> String {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_congestion_control")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|e| format!("(unknown: {e})"))
}

/// Gives a loopback socket a loss-based congestion control. Best effort: a
/// socket that keeps the default only costs speed.
pub(crate) fn unpace(socket: &impl AsFd) {
    let s = SockRef::from(socket);
    let mut last = None;
    for name in UNPACED {
        match s.set_tcp_congestion(name.as_bytes()) {
            Ok(()) => return,
            Err(e) => last = Some(e),
        }
    }
    if let Some(e) = last {
        debug!("loopback socket keeps the default congestion control: {e}");
    }
}

/// Which of this process's sockets to find.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Socket {
    /// The listener bound to this address.
    Listening(SocketAddr),
    /// The connection from `local` to `peer`.
    Connected { local: SocketAddr, peer: SocketAddr },
}

/// Finds a socket of this process (one that a library opened) and gives it
/// a loss-based congestion control, as [`unpace`]. Returns whether it was
/// found. It reads every open descriptor: call it off the runtime.
pub(crate) fn unpace_ours(which: Socket) -> io::Result<bool> {
    Ok(match find(which)? {
        Some(s) => {
            unpace(&s);
            true
        }
        None => false,
    })
}

/// Unpaces the sockets that arrive on `queue` as [`unpace_ours`] does, until
/// its senders are gone. Blocks: run it on a blocking thread.
pub(crate) fn unpace_each(mut queue: tokio::sync::mpsc::Receiver<Socket>) {
    while let Some(which) = queue.blocking_recv() {
        match unpace_ours(which) {
            Ok(true) => {}
            Ok(false) => debug!(?which, "socket gone before it was unpaced"),
            Err(e) => debug!(?which, "socket keeps the system's congestion control: {e}"),
        }
    }
}

/// A duplicate of the socket `which`, if this process has it open.
fn find(which: Socket) -> io::Result<Option<OwnedFd>> {
    use rustix::process::{PidfdFlags, PidfdGetfdFlags, getpid, pidfd_getfd, pidfd_open};
    let me = pidfd_open(getpid(), PidfdFlags::empty())?;
    for entry in std::fs::read_dir("/proc/self/fd")? {
        let entry = entry?;
        let Some(fd) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        // Sockets only: closing a duplicate of a regular file would drop the
        // process's POSIX record locks on it.
        let socket = std::fs::read_link(entry.path())
            .is_ok_and(|target| target.to_string_lossy().starts_with("socket:"));
        if !socket {
            continue;
        }
        // Closed since the listing: not the one.
        let Ok(dup) = pidfd_getfd(&me, fd, PidfdGetfdFlags::empty()) else {
            continue;
        };
        let s = SockRef::from(&dup);
        let Some(local) = s.local_addr().ok().and_then(|a| a.as_socket()) else {
            continue;
        };
        let found = match which {
            Socket::Listening(addr) => local == addr && s.is_listener().unwrap_or(false),
            Socket::Connected { local: l, peer } => {
                local == l && s.peer_addr().ok().and_then(|a| a.as_socket()) == Some(peer)
            }
        };
        if found {
            return Ok(Some(dup));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn congestion(socket: &impl AsFd) -> String {
        let name = SockRef::from(socket).tcp_congestion().unwrap();
        String::from_utf8_lossy(&name)
            .trim_end_matches('\0')
            .to_owned()
    }

    fn system_default() -> String {
        congestion(&std::net::TcpListener::bind("127.0.0.1:0").unwrap())
    }

    /// A loopback connection: the dialling end, the accepting end, and the
    /// dialling end's addresses as `Socket` names them.
    fn connection() -> (std::net::TcpStream, std::net::TcpStream, Socket) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        let (local, peer) = (client.local_addr().unwrap(), client.peer_addr().unwrap());
        (client, accepted, Socket::Connected { local, peer })
    }

    #[test]
    fn a_listener_found_by_its_address_passes_unpaced_control_to_what_it_accepts() {
        let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        assert!(unpace_ours(Socket::Listening(addr)).unwrap());
        assert!(UNPACED.contains(&congestion(&listener).as_str()));
        let _client = std::net::TcpStream::connect(addr).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        assert!(UNPACED.contains(&congestion(&accepted).as_str()));
        // Only the listener at that address was changed.
        assert_eq!(congestion(&other), system_default());
    }

    #[test]
    fn a_connection_is_found_by_its_two_addresses() {
        let (client, accepted, which) = connection();
        assert!(unpace_ours(which).unwrap());
        assert!(UNPACED.contains(&congestion(&client).as_str()));
        assert_eq!(congestion(&accepted), system_default());
    }

    #[test]
    fn queued_sockets_are_unpaced_until_the_queue_closes() {
        let (client, _accepted, which) = connection();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let worker = std::thread::spawn(move || unpace_each(rx));
        tx.blocking_send(which).unwrap();
        drop(tx);
        worker.join().unwrap();
        assert!(UNPACED.contains(&congestion(&client).as_str()));
    }

    #[test]
    fn sockets_that_are_not_open_are_reported_as_not_found() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        assert!(!unpace_ours(Socket::Listening(addr)).unwrap());
    }

    #[test]
    fn wire_congestion_parses_names_and_system_and_refuses_the_rest() {
        assert_eq!("system".parse(), Ok(Congestion::System));
        assert_eq!("bbr".parse(), Ok(Congestion::Named("bbr".into())));
        assert_eq!(Congestion::default(), Congestion::Named("cubic".into()));
        for bad in ["", "BBR", "cubic,bbr", "a_name_far_too_long", "bbr\0"] {
            let e = bad.parse::<Congestion>().unwrap_err();
            assert!(e.contains("not a congestion control name"), "{e}");
        }
    }

    #[test]
    fn a_named_algorithm_is_set_and_an_unknown_one_is_a_clear_error() {
        let s = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        Congestion::Named("reno".into()).apply(&s).unwrap();
        assert_eq!(congestion(&s), "reno");
        Congestion::System.apply(&s).unwrap();
        assert_eq!(congestion(&s), "reno", "system leaves the socket alone");
        let e = Congestion::Named("nosuchcc".into()).apply(&s).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("\"nosuchcc\"") && msg.contains("this kernel has: "),
            "{msg}"
        );
    }
}
