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
//! Only the SOCKS5 `CONNECT` command to an IP address is served, and only to
//! a client that authenticates (RFC 1929) with the daemon's random secret:
//! the server listens on loopback, where any local user could otherwise
//! reach members' peer wires through it. librqbit gets the secret in its
//! proxy URL (`socks5://user:secret@…`, see [`SocksSecret::proxy_url`]).

use std::{
    collections::HashMap,
    future::Future,
    io,
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
    pin::Pin,
    str::FromStr,
    task::{Context, Poll},
};

use ipnet::IpNet;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::TcpStream,
};

use crate::MemberId;

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

/// A BitTorrent `bitfield` message saying "no piece yet", for a torrent of
/// `pieces` pieces (at most `MAX_PIECES`: the caller's metainfo is checked).
///
/// Written to librqbit right after a member's handshake, as if the member
/// had sent it. A peer with nothing sends no bitfield, and librqbit takes a
/// peer whose bitfield it never got for one that has every piece: it never
/// sends it a `have`. Two members that connect before either has a piece
/// (readers of a new file, starting together) would then never trade.
/// A member that does hold pieces sends its own bitfield next, which
/// replaces this one. The cost: librqbit's requests to a member it knows
/// has nothing it needs sleep until librqbit gets a new piece of its own,
/// or 5 s; a `have` from the member does not wake them.
pub(crate) fn empty_bitfield(pieces: usize) -> Vec<u8> {
    let bytes = pieces.div_ceil(8);
    let len = u32::try_from(1 + bytes).unwrap_or(u32::MAX);
    let mut m = Vec::with_capacity(5 + bytes);
    m.extend_from_slice(&len.to_be_bytes());
    m.push(BITFIELD);
    m.resize(5 + bytes, 0);
    m
}

/// The id of the `bitfield` message (BEP 3).
const BITFIELD: u8 = 5;

/// The user name librqbit gives the SOCKS5 server (the secret is the
/// password).
const SOCKS_USER: &str = "btfs";

/// The password librqbit must give the SOCKS5 server: 16 random bytes in
/// hex, drawn once per daemon. It lives in this process only (librqbit gets
/// it in its options, not on a command line or in a file); `Debug` does not
/// show it.
#[derive(Clone)]
pub(crate) struct SocksSecret([u8; 32]);

impl SocksSecret {
    pub(crate) fn random() -> io::Result<Self> {
        let mut raw = [0u8; 16];
        getrandom::fill(&mut raw).map_err(|e| io::Error::other(SecretError::Random(e)))?;
        let mut hex_secret = [0u8; 32];
        hex::encode_to_slice(raw, &mut hex_secret)
            .map_err(|e| io::Error::other(SecretError::Hex(e)))?;
        Ok(Self(hex_secret))
    }

    /// The proxy URL for librqbit (`ConnectionOptions::proxy_url`): it hands
    /// the user name and password to its SOCKS5 client (librqbit 9.1
    /// `stream_connect.rs`, `SocksProxyConfig::parse` and `connect`).
    /// Hex and a plain name need no percent-encoding.
    pub(crate) fn proxy_url(&self, server: SocketAddr) -> String {
        format!("socks5://{SOCKS_USER}:{}@{server}", self.as_str())
    }

    fn as_str(&self) -> &str {
        // Hex digits: ASCII.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }

    /// Whether `user` and `password` are ours, in time that does not
    /// depend on where they differ (their lengths are no secret).
    fn admits(&self, user: &[u8], password: &[u8]) -> bool {
        let user_ok = ct_eq(user, SOCKS_USER.as_bytes());
        let password_ok = ct_eq(password, &self.0);
        user_ok & password_ok
    }
}

/// Why no SOCKS5 secret could be made.
#[derive(Debug, thiserror::Error)]
enum SecretError {
    #[error("random SOCKS5 secret: {0}")]
    Random(#[source] getrandom::Error),
    #[error("SOCKS5 secret: {0}")]
    Hex(#[source] hex::FromHexError),
}

impl std::fmt::Debug for SocksSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SocksSecret(..)")
    }
}

/// Equality of two byte strings, looking at every byte of equal-length
/// ones.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// Reads a length byte, then that many bytes into `buf`; returns them.
async fn read_counted<'b>(
    io: &mut (impl AsyncRead + Unpin),
    buf: &'b mut [u8; 255],
) -> io::Result<&'b [u8]> {
    let n = usize::from(io.read_u8().await?);
    let field = &mut buf[..n];
    io.read_exact(field).await?;
    Ok(field)
}

/// Serves one SOCKS5 client: returns the address it asked to connect to,
/// once the reply is up to `answer`. Called by the engine, which dials.
///
/// Only username/password authentication (RFC 1929) with `secret` is
/// offered. A client that does not offer it, or gives other credentials,
/// is told so (method 0xFF; status 1) and gets an error of kind
/// [`io::ErrorKind::PermissionDenied`]: the caller closes the connection.
///
/// Whatever the client sends, this reads at most 792 bytes: greeting
/// (2 + 255 methods), authentication (2 + 255 + 1 + 255), request (4 +
/// 16-byte address + 2 port). Every length on the wire is a byte, read
/// into a fixed buffer: nothing is allocated.
pub(crate) async fn socks5_request(
    io: &mut (impl AsyncRead + AsyncWrite + Unpin),
    secret: &SocksSecret,
) -> io::Result<SocketAddr> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("SOCKS5: {what}"));
    let refused =
        |what: &str| io::Error::new(io::ErrorKind::PermissionDenied, format!("SOCKS5: {what}"));
    let mut buf = [0u8; 255];
    if io.read_u8().await? != 5 {
        return Err(bad("not version 5"));
    }
    if !read_counted(io, &mut buf).await?.contains(&2) {
        io.write_all(&[5, 0xff]).await?;
        io.flush().await?;
        return Err(refused("client offers no username/password authentication"));
    }
    io.write_all(&[5, 2]).await?;
    io.flush().await?;
    // RFC 1929: version 1, user name, password.
    if io.read_u8().await? != 1 {
        io.write_all(&[1, 1]).await?;
        io.flush().await?;
        return Err(refused("not username/password authentication version 1"));
    }
    let mut user_buf = [0u8; 255];
    let user = read_counted(io, &mut user_buf).await?;
    let password = read_counted(io, &mut buf).await?;
    if !secret.admits(user, password) {
        io.write_all(&[1, 1]).await?;
        io.flush().await?;
        return Err(refused("wrong user name or password"));
    }
    io.write_all(&[1, 0]).await?;
    io.flush().await?;
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
    by_member: HashMap<MemberId, SocketAddr>,
    by_addr: HashMap<SocketAddr, MemberId>,
}

pub(crate) const SYNTHETIC_PORT: u16 = 6881;
pub(crate) const CONNECTIONS_PER_MEMBER: u16 = 1;

impl PeerTable {
    /// The addresses that stand for `member`.
    pub(crate) fn addrs_of(&mut self, member: &MemberId) -> Vec<SocketAddr> {
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
                self.by_member.insert(*member, addr);
                self.by_addr.insert(addr, *member);
                addr.ip()
            }
        };
        (0..CONNECTIONS_PER_MEMBER)
            .map(|i| SocketAddr::new(ip, SYNTHETIC_PORT + i))
            .collect()
    }

    pub(crate) fn member_at(&self, addr: &SocketAddr) -> Option<MemberId> {
        self.by_addr
            .get(&SocketAddr::new(addr.ip(), SYNTHETIC_PORT))
            .copied()
    }
}

/// An IPv4 or IPv6 network, `ADDR/BITS` (a bare address is one host: /32 or
/// /128). Shown as given (`10.1.2.3/16` stays so); an IPv4-mapped IPv6
/// address is matched as the IPv4 address it maps.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Cidr(IpNet);

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.contains(&ip.to_canonical())
    }
}

/// Why a network did not parse as a [`Cidr`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    #[error("{input:?}: {addr:?} is not an IP address")]
    NotAnAddress { input: String, addr: String },
    #[error("{input:?}: prefix length must be 0 to {max}")]
    BadPrefix { input: String, max: u8 },
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Self, CidrError> {
        let (ip, bits) = match s.split_once('/') {
            Some((ip, bits)) => (ip, Some(bits)),
            None => (s, None),
        };
        let addr: IpAddr = ip.parse().map_err(|_| CidrError::NotAnAddress {
            input: s.to_owned(),
            addr: ip.to_owned(),
        })?;
        let Some(bits) = bits else {
            return Ok(Self(IpNet::from(addr)));
        };
        bits.parse::<u8>()
            .ok()
            .and_then(|b| IpNet::new(addr, b).ok())
            .map(Self)
            .ok_or_else(|| CidrError::BadPrefix {
                input: s.to_owned(),
                max: if addr.is_ipv4() { 32 } else { 128 },
            })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::fmt::Debug for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cidr")
            .field("net", &self.0.addr())
            .field("bits", &self.0.prefix_len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The most bytes `socks5_request` reads from a client.
    const SOCKS5_MAX_READ: usize = 2 + 255 + 2 + 255 + 1 + 255 + 4 + 16 + 2;

    #[test]
    fn an_empty_bitfield_is_one_bit_a_piece_rounded_up_all_clear() {
        for (pieces, bytes) in [(1usize, 1usize), (8, 1), (9, 2), (192, 24), (2001, 251)] {
            let m = empty_bitfield(pieces);
            assert_eq!(m.len(), 5 + bytes);
            assert_eq!(
                u32::from_be_bytes([m[0], m[1], m[2], m[3]]) as usize,
                1 + bytes
            );
            assert_eq!(m[4], 5, "the bitfield message id");
            assert!(m[5..].iter().all(|b| *b == 0));
        }
    }

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
    fn cidrs_show_as_given_and_say_what_is_wrong() {
        for (given, shown) in [
            ("10.1.2.3/16", "10.1.2.3/16"),
            ("192.168.1.7", "192.168.1.7/32"),
            ("fd00::1", "fd00::1/128"),
            ("fd00::/8", "fd00::/8"),
        ] {
            assert_eq!(given.parse::<Cidr>().unwrap().to_string(), shown);
        }
        assert_eq!(
            "nope/8".parse::<Cidr>().unwrap_err().to_string(),
            r#""nope/8": "nope" is not an IP address"#
        );
        assert_eq!(
            "10.0.0.0/33".parse::<Cidr>().unwrap_err().to_string(),
            r#""10.0.0.0/33": prefix length must be 0 to 32"#
        );
        assert_eq!(
            "fd00::/x".parse::<Cidr>().unwrap_err().to_string(),
            r#""fd00::/x": prefix length must be 0 to 128"#
        );
        assert!(
            !"fd00::/8"
                .parse::<Cidr>()
                .unwrap()
                .contains("10.0.0.1".parse().unwrap())
        );
        assert!(
            "0.0.0.0/0"
                .parse::<Cidr>()
                .unwrap()
                .contains("1.2.3.4".parse().unwrap())
        );
    }

    #[test]
    fn members_get_stable_distinct_loopback_addresses() {
        let mut t = PeerTable::default();
        let (member_a, member_b) = (MemberId::random(), MemberId::random());
        let a = t.addrs_of(&member_a);
        let b = t.addrs_of(&member_b);
        assert_eq!(a.len(), usize::from(CONNECTIONS_PER_MEMBER));
        assert!(a.iter().all(|x| !b.contains(x)));
        assert_eq!(t.addrs_of(&member_a), a);
        assert!(a[0].ip().is_loopback());
        assert!(b.iter().all(|x| t.member_at(x) == Some(member_b)));
        assert_eq!(t.member_at(&"127.77.0.9:6881".parse().unwrap()), None);
    }

    fn secret() -> SocksSecret {
        SocksSecret::random().unwrap()
    }

    /// What a client that knows `secret` sends before its request.
    fn greeting_and_auth(secret: &SocksSecret) -> Vec<u8> {
        let mut b = vec![5, 2, 0, 2, 1, 4];
        b.extend_from_slice(SOCKS_USER.as_bytes());
        b.push(32);
        b.extend_from_slice(&secret.0);
        b
    }

    #[tokio::test]
    async fn socks5_connect_requests_are_understood() {
        let secret = secret();
        let hello = greeting_and_auth(&secret);
        let (mut client, mut server) = tokio::io::duplex(256);
        let c = tokio::spawn(async move {
            client.write_all(&hello).await.unwrap();
            let mut r = [0u8; 4];
            client.read_exact(&mut r).await.unwrap();
            assert_eq!(r, [5, 2, 1, 0]);
            client
                .write_all(&[5, 1, 0, 1, 127, 77, 0, 1, 0x1a, 0xe1])
                .await
                .unwrap();
            let mut r = [0u8; 10];
            client.read_exact(&mut r).await.unwrap();
            r[1]
        });
        let addr = socks5_request(&mut server, &secret).await.unwrap();
        assert_eq!(addr, "127.77.0.1:6881".parse().unwrap());
        socks5_reply(&mut server, 0).await.unwrap();
        assert_eq!(c.await.unwrap(), 0);
    }

    /// Runs `socks5_request` on what a client sends (then EOF); returns its
    /// outcome and what the server answered.
    async fn serve_bytes(sent: &[u8], secret: &SocksSecret) -> (io::Result<SocketAddr>, Vec<u8>) {
        let (mut client, mut server) = tokio::io::duplex(4096);
        client.write_all(sent).await.unwrap();
        client.shutdown().await.unwrap();
        let r = socks5_request(&mut server, secret).await;
        drop(server);
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.unwrap();
        (r, answer)
    }

    #[tokio::test]
    async fn a_socks_client_without_the_secret_is_refused() {
        let secret = secret();
        let connect = [5, 1, 0, 1, 127, 77, 0, 1, 0x1a, 0xe1];
        // No authentication offered (what librqbit sends without
        // credentials in its proxy URL): method 0xFF.
        let mut sent = vec![5, 1, 0];
        sent.extend_from_slice(&connect);
        let (r, answer) = serve_bytes(&sent, &secret).await;
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::PermissionDenied);
        assert_eq!(answer, [5, 0xff]);
        // Another secret, a secret one byte short, another user name, an
        // empty password, GSSAPI only: status 1, or method 0xFF.
        let other = SocksSecret::random().unwrap();
        let mut short = greeting_and_auth(&secret);
        short.pop();
        short[10] = 31;
        let mut wrong_user = greeting_and_auth(&secret);
        wrong_user[6] = b'c';
        let cases: [(Vec<u8>, &[u8]); 5] = [
            (greeting_and_auth(&other), &[5, 2, 1, 1]),
            (short, &[5, 2, 1, 1]),
            (wrong_user, &[5, 2, 1, 1]),
            (
                vec![5, 1, 2, 1, 4, b'b', b't', b'f', b's', 0],
                &[5, 2, 1, 1],
            ),
            (vec![5, 1, 1], &[5, 0xff]),
        ];
        for (mut sent, want) in cases {
            sent.extend_from_slice(&connect);
            let (r, answer) = serve_bytes(&sent, &secret).await;
            assert_eq!(r.unwrap_err().kind(), io::ErrorKind::PermissionDenied);
            assert_eq!(answer, want);
        }
    }

    #[tokio::test]
    async fn a_socks_client_with_the_secret_connects() {
        let secret = secret();
        let mut sent = greeting_and_auth(&secret);
        sent.extend_from_slice(&[5, 1, 0, 4]);
        sent.extend_from_slice(&"fd00::7".parse::<std::net::Ipv6Addr>().unwrap().octets());
        sent.extend_from_slice(&6882u16.to_be_bytes());
        let (r, answer) = serve_bytes(&sent, &secret).await;
        assert_eq!(r.unwrap(), "[fd00::7]:6882".parse().unwrap());
        assert_eq!(answer, [5, 2, 1, 0]);
    }

    /// librqbit 9.1 reads `proxy_url` with `url::Url` (user name, password)
    /// and dials with `tokio_socks`' `connect_with_password`
    /// (`stream_connect.rs`): the same, over TCP, gets through.
    #[tokio::test]
    async fn librqbits_socks_client_gets_through_with_the_proxy_url() {
        let secret = secret();
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .unwrap();
        let server_addr = listener.local_addr().unwrap();
        let url = url::Url::parse(&secret.proxy_url(server_addr)).unwrap();
        assert_eq!(url.scheme(), "socks5");
        let (host, port) = (url.host_str().unwrap().to_owned(), url.port().unwrap());
        let (user, password) = (
            url.username().to_owned(),
            url.password().unwrap().to_owned(),
        );
        let served = {
            let secret = secret.clone();
            tokio::spawn(async move {
                let (mut conn, _) = listener.accept().await.unwrap();
                let target = socks5_request(&mut conn, &secret).await.unwrap();
                socks5_reply(&mut conn, 0).await.unwrap();
                target
            })
        };
        let target: SocketAddr = "127.77.0.3:6881".parse().unwrap();
        tokio_socks::tcp::Socks5Stream::connect_with_password(
            (host.as_str(), port),
            target,
            &user,
            &password,
        )
        .await
        .unwrap();
        assert_eq!(served.await.unwrap(), target);
        // Without the credentials, the same client is refused.
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .unwrap();
        let server_addr = listener.local_addr().unwrap();
        let served = tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.unwrap();
            socks5_request(&mut conn, &secret).await.unwrap_err().kind()
        });
        let r = tokio_socks::tcp::Socks5Stream::connect(server_addr, target).await;
        assert!(r.is_err());
        assert_eq!(served.await.unwrap(), io::ErrorKind::PermissionDenied);
    }

    /// What the server should make of `b` (then EOF): the address asked
    /// for, if the exchange is complete, authenticated with `secret` and a
    /// CONNECT to an IP address.
    fn model(b: &[u8], secret: &SocksSecret) -> Option<SocketAddr> {
        let mut rest = b;
        let mut take = |n: usize| -> Option<&[u8]> {
            let (head, tail) = rest.split_at_checked(n)?;
            rest = tail;
            Some(head)
        };
        let [5, n] = *take(2)? else { return None };
        if !take(usize::from(n))?.contains(&2) {
            return None;
        }
        let [1, ulen] = *take(2)? else { return None };
        let user = take(usize::from(ulen))?;
        let plen = take(1)?[0];
        let password = take(usize::from(plen))?;
        if user != SOCKS_USER.as_bytes() || password != secret.0 {
            return None;
        }
        let [5, 1, _, atyp] = *take(4)? else {
            return None;
        };
        let ip = match atyp {
            1 => IpAddr::from(<[u8; 4]>::try_from(take(4)?).ok()?),
            4 => IpAddr::from(<[u8; 16]>::try_from(take(16)?).ok()?),
            _ => return None,
        };
        let port = u16::from_be_bytes(take(2)?.try_into().ok()?);
        Some(SocketAddr::new(ip, port))
    }

    /// A client end that sends `sent`, then `filler` forever (no EOF), and
    /// fails a read past [`SOCKS5_MAX_READ`] bytes.
    struct Endless {
        sent: Vec<u8>,
        filler: u8,
        read: usize,
        overread: bool,
    }

    impl AsyncRead for Endless {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let n = buf.remaining().min(7);
            for _ in 0..n {
                if self.read >= SOCKS5_MAX_READ {
                    self.overread = true;
                    return Poll::Ready(Err(io::Error::other("read past the bound")));
                }
                let byte = self.sent.get(self.read).copied().unwrap_or(self.filler);
                buf.put_slice(&[byte]);
                self.read += 1;
            }
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for Endless {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            b: &[u8],
        ) -> Poll<io::Result<usize>> {
            Poll::Ready(Ok(b.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// Serves `sent` twice, over a duplex stream that ends after it, and
    /// from a client that never stops sending: neither panics, reads past
    /// the bound or yields an address the model does not.
    fn check_served(sent: &[u8], filler: u8, secret: &SocksSecret) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let (r, answer) = serve_bytes(sent, secret).await;
            let want = model(sent, secret);
            assert_eq!(r.as_ref().ok(), want.as_ref(), "{r:?}");
            if want.is_some() {
                assert_eq!(answer, [5, 2, 1, 0]);
            }
            if r.is_err_and(|e| e.kind() == io::ErrorKind::PermissionDenied) {
                assert!(
                    answer == [5, 0xff] || answer.ends_with(&[1, 1]),
                    "{answer:?}"
                );
            }
            let mut endless = Endless {
                sent: sent.to_vec(),
                filler,
                read: 0,
                overread: false,
            };
            let r = socks5_request(&mut endless, secret).await;
            assert!(!endless.overread);
            let mut extended = sent.to_vec();
            extended.resize(sent.len().max(SOCKS5_MAX_READ), filler);
            assert_eq!(r.ok(), model(&extended, secret));
        });
    }

    /// A valid exchange: greeting, authentication with `password`, CONNECT.
    fn exchange(methods: &[u8], password: &[u8], v6: bool, port: u16) -> Vec<u8> {
        let mut b = vec![5, methods.len() as u8];
        b.extend_from_slice(methods);
        b.extend_from_slice(&[1, SOCKS_USER.len() as u8]);
        b.extend_from_slice(SOCKS_USER.as_bytes());
        b.push(password.len() as u8);
        b.extend_from_slice(password);
        if v6 {
            b.extend_from_slice(&[5, 1, 0, 4]);
            b.extend_from_slice(&[0xfd; 16]);
        } else {
            b.extend_from_slice(&[5, 1, 0, 1, 127, 77, 0, 1]);
        }
        b.extend_from_slice(&port.to_be_bytes());
        b
    }

    use proptest::prelude::*;

    proptest! {

        #[test]
        fn arbitrary_socks_streams_are_served_safely(
            sent in prop::collection::vec(any::<u8>(), 0..900),
            filler in any::<u8>(),
        ) {
            check_served(&sent, filler, &SocksSecret([b'a'; 32]));
        }

        #[test]
        fn mangled_socks_exchanges_connect_only_with_the_secret(
            methods in prop::collection::vec(any::<u8>(), 0..6),
            right in any::<bool>(),
            wrong in prop::collection::vec(any::<u8>(), 0..40),
            v6 in any::<bool>(),
            port in any::<u16>(),
            edits in prop::collection::vec((any::<usize>(), any::<u8>(), 0..3u8), 0..4),
            filler in any::<u8>(),
        ) {
            let secret = SocksSecret([b'7'; 32]);
            let mut methods = methods;
            methods.push(2);
            let password = if right { secret.0.to_vec() } else { wrong };
            let mut sent = exchange(&methods, &password, v6, port);
            for (at, byte, op) in edits {
                let at = at % (sent.len() + 1);
                match op {
                    0 if at < sent.len() => sent[at] = byte,
                    1 if at < sent.len() => { sent.remove(at); }
                    _ => sent.insert(at, byte),
                }
            }
            check_served(&sent, filler, &secret);
        }
    }
}
