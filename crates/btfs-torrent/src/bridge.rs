//! The peer-wire plumbing between librqbit and the mesh.
//!
//! * Outgoing: librqbit connects through a SOCKS5 server on 127.0.0.1 to a
//!   synthetic address (`127.77.x.y:6881`) that stands for one mesh member;
//!   the server opens a stream to that member through the daemon's network.
//! * Incoming: a stream (from a member, or a TCP connection from a network
//!   allowed by `bt_allow=`) starts with the BitTorrent handshake. Its info
//!   hash says which torrent is wanted; the engine brings it up if this node
//!   holds the content, then splices the stream into librqbit's loopback
//!   listener, handshake included.
//!
//! Only the SOCKS5 `CONNECT` command with no authentication is served: it is
//! all librqbit uses, and the server listens on loopback.

use std::{
    collections::HashMap,
    future::Future,
    io,
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
    pin::Pin,
    str::FromStr,
    task::{Context, Poll},
};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::TcpStream,
};

/// Buffer of each direction of a relay that copies: large writes make large
/// frames (tokio's default, 8 KiB, costs a frame and its encryption per
/// 8 KiB).
const RELAY_BUF: usize = 256 << 10;

/// A byte stream to or from a peer.
pub trait PeerIo: AsyncRead + AsyncWrite + Send + Unpin {
    /// Carries bytes both ways between this stream and `local`, librqbit's
    /// end of a loopback connection, until both directions have ended;
    /// returns the bytes sent to the peer and the bytes received from it.
    /// This one copies through a buffer; a stream that can move the bytes
    /// with fewer copies says so here.
    fn relay<'a>(&'a mut self, local: &'a mut QuickAck) -> RelayFuture<'a> {
        Box::pin(tokio::io::copy_bidirectional_with_sizes(
            local, self, RELAY_BUF, RELAY_BUF,
        ))
    }
}
pub type BoxIo = Box<dyn PeerIo>;
pub type RelayFuture<'a> = Pin<Box<dyn Future<Output = io::Result<(u64, u64)>> + Send + 'a>>;

/// A standard client's connection, from a `bt_allow=` network.
impl PeerIo for TcpStream {}
/// A peer wire carried as a stream of the mesh connection.
impl<S: futures::io::AsyncRead + futures::io::AsyncWrite + Send + Unpin> PeerIo
    for tokio_util::compat::Compat<S>
{
}

/// Our end of a loopback connection with librqbit, acknowledging every read
/// at once.
///
/// librqbit leaves Nagle's algorithm on for its sockets, and each peer-wire
/// message is its own `write`. With delayed ACKs on this end, a small message
/// that follows another (an unchoke after the extended handshake, requests
/// after an interested) waits up to 40 ms for the ACK of the first: that was
/// most of a cold read's latency. `TCP_QUICKACK` is not sticky, so it is
/// armed again after each read.
#[derive(Debug)]
pub struct QuickAck(TcpStream);

impl QuickAck {
    pub(crate) fn new(s: TcpStream) -> Self {
        let _ = s.set_nodelay(true);
        Self(s)
    }

    /// The socket, for a relay that reads it itself (and acknowledges its
    /// reads at once as this does).
    pub fn socket(&self) -> &TcpStream {
        &self.0
    }
}

impl AsyncRead for QuickAck {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.0).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            let _ = socket2::SockRef::from(&self.0).set_tcp_quickack(true);
        }
        r
    }
}

impl AsyncWrite for QuickAck {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// The BitTorrent v1 handshake: length byte, protocol name, 8 reserved
/// bytes, info hash, peer id.
pub(crate) const HANDSHAKE_LEN: usize = 68;
const PROTOCOL: &[u8] = b"BitTorrent protocol";

/// The first byte of every BitTorrent handshake (the length of the
/// protocol name).
pub(crate) const BT_HANDSHAKE_FIRST: u8 = PROTOCOL.len() as u8;

/// Reads the handshake that opens a peer connection; returns it whole and
/// the info hash it names.
pub(crate) async fn read_handshake(
    io: &mut (impl AsyncRead + Unpin),
) -> io::Result<([u8; HANDSHAKE_LEN], [u8; 20])> {
    let mut hs = [0u8; HANDSHAKE_LEN];
    io.read_exact(&mut hs).await?;
    if usize::from(hs[0]) != PROTOCOL.len() || &hs[1..20] != PROTOCOL {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not a BitTorrent handshake",
        ));
    }
    let mut ih = [0u8; 20];
    ih.copy_from_slice(&hs[28..48]);
    Ok((hs, ih))
}

/// Serves one SOCKS5 client: returns the address it asked to connect to,
/// once the reply is up to `answer`. Called by the engine, which dials.
pub(crate) async fn socks5_request(
    io: &mut (impl AsyncRead + AsyncWrite + Unpin),
) -> io::Result<SocketAddr> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("SOCKS5: {what}"));
    let mut head = [0u8; 2];
    io.read_exact(&mut head).await?;
    if head[0] != 5 {
        return Err(bad("not version 5"));
    }
    let mut methods = vec![0u8; usize::from(head[1])];
    io.read_exact(&mut methods).await?;
    if !methods.contains(&0) {
        io.write_all(&[5, 0xff]).await?;
        return Err(bad("client offers no unauthenticated method"));
    }
    io.write_all(&[5, 0]).await?;
    let mut req = [0u8; 4];
    io.read_exact(&mut req).await?;
    if req[0] != 5 || req[1] != 1 {
        socks5_reply(io, 7).await?;
        return Err(bad("only CONNECT is served"));
    }
    let ip = match req[3] {
        1 => {
            let mut a = [0u8; 4];
            io.read_exact(&mut a).await?;
            IpAddr::from(a)
        }
        4 => {
            let mut a = [0u8; 16];
            io.read_exact(&mut a).await?;
            IpAddr::from(a)
        }
        _ => {
            socks5_reply(io, 8).await?;
            return Err(bad("only IP addresses are served"));
        }
    };
    let port = io.read_u16().await?;
    Ok(SocketAddr::new(ip, port))
}

/// Answers a SOCKS5 request: 0 succeeded, 5 refused, 7 bad command, 8 bad
/// address type.
pub(crate) async fn socks5_reply(io: &mut (impl AsyncWrite + Unpin), code: u8) -> io::Result<()> {
    io.write_all(&[5, code, 0, 1, 0, 0, 0, 0, 0, 0]).await?;
    io.flush().await
}

/// Synthetic loopback addresses for mesh members, so that librqbit can name
/// them: `127.77.x.y:6881…` with `x.y` a per-run member number, and
/// `CONNECTIONS_PER_MEMBER` ports, so that librqbit opens that many peer
/// connections (each its own mesh stream, with its own flow-control window)
/// to a member.
#[derive(Debug, Default)]
pub(crate) struct PeerTable {
    by_member: HashMap<String, SocketAddr>,
    by_addr: HashMap<SocketAddr, String>,
}

pub(crate) const SYNTHETIC_PORT: u16 = 6881;
pub(crate) const CONNECTIONS_PER_MEMBER: u16 = 1;

impl PeerTable {
    /// The addresses that stand for `member`.
    pub(crate) fn addrs_of(&mut self, member: &str) -> Vec<SocketAddr> {
        let ip = match self.by_member.get(member) {
            Some(a) => a.ip(),
            None => {
                let Ok(n) = u16::try_from(self.by_member.len() + 1) else {
                    return Vec::new();
                };
                let [x, y] = n.to_be_bytes();
                let addr = SocketAddr::V4(SocketAddrV4::new(
                    Ipv4Addr::new(127, 77, x, y),
                    SYNTHETIC_PORT,
                ));
                self.by_member.insert(member.to_owned(), addr);
                self.by_addr.insert(addr, member.to_owned());
                addr.ip()
            }
        };
        (0..CONNECTIONS_PER_MEMBER)
            .map(|i| SocketAddr::new(ip, SYNTHETIC_PORT + i))
            .collect()
    }

    pub(crate) fn member_at(&self, addr: &SocketAddr) -> Option<&str> {
        self.by_addr
            .get(&SocketAddr::new(addr.ip(), SYNTHETIC_PORT))
            .map(String::as_str)
    }
}

/// An IPv4 or IPv6 network, `ADDR/BITS` (a bare address is one host).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    bits: u8,
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        match (self.net, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => prefix_eq(&n.octets(), &a.octets(), self.bits),
            (IpAddr::V6(n), IpAddr::V6(a)) => prefix_eq(&n.octets(), &a.octets(), self.bits),
            _ => false,
        }
    }
}

fn prefix_eq(a: &[u8], b: &[u8], bits: u8) -> bool {
    let (full, rest) = (usize::from(bits / 8), bits % 8);
    a[..full] == b[..full] && (rest == 0 || (a[full] ^ b[full]) >> (8 - rest) == 0)
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (ip, bits) = match s.split_once('/') {
            Some((ip, bits)) => (ip, Some(bits)),
            None => (s, None),
        };
        let net: IpAddr = ip
            .parse()
            .map_err(|_| format!("{s:?}: {ip:?} is not an IP address"))?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let bits = match bits {
            None => max,
            Some(b) => b
                .parse::<u8>()
                .ok()
                .filter(|b| *b <= max)
                .ok_or_else(|| format!("{s:?}: prefix length must be 0 to {max}"))?,
        };
        Ok(Self { net, bits })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.net, self.bits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_parse_and_match() {
        let c: Cidr = "10.1.0.0/16".parse().unwrap();
        assert!(c.contains("10.1.200.3".parse().unwrap()));
        assert!(!c.contains("10.2.0.1".parse().unwrap()));
        assert!(c.contains("::ffff:10.1.0.9".parse().unwrap()));
        let host: Cidr = "192.168.1.7".parse().unwrap();
        assert!(host.contains("192.168.1.7".parse().unwrap()));
        assert!(!host.contains("192.168.1.8".parse().unwrap()));
        let odd: Cidr = "172.16.0.0/12".parse().unwrap();
        assert!(odd.contains("172.31.255.1".parse().unwrap()));
        assert!(!odd.contains("172.32.0.1".parse().unwrap()));
        assert!(
            "fd00::/8"
                .parse::<Cidr>()
                .unwrap()
                .contains("fd12::1".parse().unwrap())
        );
        for bad in ["10.0.0.0/33", "nope/8", "10.0.0.0/x", ""] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn members_get_stable_distinct_loopback_addresses() {
        let mut t = PeerTable::default();
        let a = t.addrs_of("A");
        let b = t.addrs_of("B");
        assert_eq!(a.len(), usize::from(CONNECTIONS_PER_MEMBER));
        assert!(a.iter().all(|x| !b.contains(x)));
        assert_eq!(t.addrs_of("A"), a);
        assert!(a[0].ip().is_loopback());
        assert!(b.iter().all(|x| t.member_at(x) == Some("B")));
        assert_eq!(t.member_at(&"127.77.0.9:6881".parse().unwrap()), None);
    }

    #[tokio::test]
    async fn socks5_connect_requests_are_understood() {
        let (mut client, mut server) = tokio::io::duplex(256);
        let c = tokio::spawn(async move {
            client.write_all(&[5, 1, 0]).await.unwrap();
            let mut r = [0u8; 2];
            client.read_exact(&mut r).await.unwrap();
            assert_eq!(r, [5, 0]);
            client
                .write_all(&[5, 1, 0, 1, 127, 77, 0, 1, 0x1a, 0xe1])
                .await
                .unwrap();
            let mut r = [0u8; 10];
            client.read_exact(&mut r).await.unwrap();
            r[1]
        });
        let addr = socks5_request(&mut server).await.unwrap();
        assert_eq!(addr, "127.77.0.1:6881".parse().unwrap());
        socks5_reply(&mut server, 0).await.unwrap();
        assert_eq!(c.await.unwrap(), 0);
    }
}
