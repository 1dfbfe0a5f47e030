//! Tests of the direct peer wires: handshakes and proofs, frames (as snow
//! would make them), lingering flushes, relays, and what probes learn.

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;

async fn pair(
    server_prologue: Vec<u8>,
    client_prologue: Vec<u8>,
    expected: Option<PeerId>,
) -> (io::Result<(PeerId, Vec<u8>)>, io::Result<()>) {
    let (a, b) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
    let expected = expected.unwrap_or(a.public().to_peer_id());
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (s, _) = l.accept().await.unwrap();
        let (peer, mut w) = accept(&a, &server_prologue, s).await?;
        let mut got = vec![0u8; 5];
        w.read_exact(&mut got).await?;
        Ok((peer, got))
    });
    let client = async {
        let s = tokio::net::TcpStream::connect(addr).await?;
        let mut w = connect(&b, &client_prologue, s, expected).await?;
        w.write_all(b"hello").await?;
        w.flush().await?;
        Ok(())
    };
    let c = client.await;
    let s = tokio::time::timeout(std::time::Duration::from_secs(5), server)
        .await
        .unwrap()
        .unwrap();
    (s, c)
}

#[tokio::test]
async fn members_with_the_same_key_talk_and_learn_who_is_at_the_other_end() {
    let p = prologue("c", "key");
    let (s, c) = pair(p.clone(), p, None).await;
    c.unwrap();
    let (_, got) = s.unwrap();
    assert_eq!(got, b"hello");
}

#[tokio::test]
async fn another_key_or_cluster_cannot_complete_the_handshake() {
    assert_ne!(prologue("c", "key"), prologue("c", "other"));
    assert_ne!(prologue("c", "key"), prologue("d", "key"));
    let (s, c) = pair(prologue("c", "key"), prologue("c", "other"), None).await;
    assert!(c.is_err(), "the client took a peer with another key");
    assert!(
        s.is_err(),
        "the server read data from a peer with another key"
    );
}

#[tokio::test]
async fn a_wire_that_reaches_someone_else_is_refused() {
    let p = prologue("c", "key");
    let stranger = Keypair::generate_ed25519().public().to_peer_id();
    let (_, c) = pair(p.clone(), p, Some(stranger)).await;
    assert_eq!(c.unwrap_err().kind(), io::ErrorKind::PermissionDenied);
}

/// A proof signed by one identity for another's noise key, or for no
/// key of the handshake, is refused.
#[tokio::test]
async fn a_proof_must_sign_the_noise_key_of_the_handshake() {
    let (me, other) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
    let (hs, _) = start(&me, &prologue("c", "key"), true).unwrap();
    // Not yet known: the other end's static key.
    let (_, proof) = start(&other, &prologue("c", "key"), false).unwrap();
    assert!(verify(&hs, &proof).is_err());
    // A proof of a key that is not the one the handshake used.
    let (mut i, _) = start(&me, &prologue("c", "key"), true).unwrap();
    let (mut r, _) = start(&other, &prologue("c", "key"), false).unwrap();
    let (_, foreign) = start(&other, &prologue("c", "key"), false).unwrap();
    let (mut m, mut p) = (vec![0u8; MAX_MESSAGE], vec![0u8; MAX_MESSAGE]);
    let n = i.write_message(&[], &mut m).unwrap();
    r.read_message(&m[..n], &mut p).unwrap();
    let n = r.write_message(&foreign, &mut m).unwrap();
    let got = i.read_message(&m[..n], &mut p).unwrap();
    assert_eq!(&p[..got], &foreign[..]);
    let e = verify(&i, &p[..got]).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
    assert!(verify(&i, b"\x00\x05abc").is_err());
    assert!(verify(&i, b"").is_err());
}

/// A wire between two fresh identities over an in-memory pipe of
/// `capacity` bytes: (the end that connected, the end that accepted).
async fn in_memory(
    capacity: usize,
) -> (Wire<tokio::io::DuplexStream>, Wire<tokio::io::DuplexStream>) {
    let p = prologue("c", "key");
    let (a, b) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
    let expected = a.public().to_peer_id();
    let (x, y) = tokio::io::duplex(capacity);
    let server = tokio::spawn({
        let p = p.clone();
        async move { accept(&a, &p, y).await }
    });
    let client = connect(&b, &p, x, expected).await.unwrap();
    let (_, server) = server.await.unwrap().unwrap();
    (client, server)
}

/// Bulk data in writes of every size arrives whole and in order, in
/// both directions at once, through reads of every size.
#[tokio::test]
async fn bulk_data_crosses_whole_in_both_directions() {
    let (client, server) = in_memory(100_000).await;
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
    async fn pump(
        mut w: Wire<tokio::io::DuplexStream>,
        data: Vec<u8>,
    ) -> (Wire<tokio::io::DuplexStream>, Vec<u8>) {
        let (mut r, mut wr) = tokio::io::split(&mut w);
        let send = async {
            let sizes = [1usize, 100, 16_397, 65_519, 65_520, 200_000, 7];
            let (mut at, mut i) = (0, 0);
            while at < data.len() {
                let n = sizes[i % sizes.len()].min(data.len() - at);
                wr.write_all(&data[at..at + n]).await.unwrap();
                at += n;
                i += 1;
            }
            wr.flush().await.unwrap();
        };
        let recv = async {
            let mut got = Vec::new();
            let sizes = [3usize, 70_000, 4096, 65_519, 1];
            let mut i = 0;
            while got.len() < data.len() {
                let mut b = vec![0u8; sizes[i % sizes.len()]];
                let n = r.read(&mut b).await.unwrap();
                assert!(n > 0, "early end");
                got.extend_from_slice(&b[..n]);
                i += 1;
            }
            got
        };
        let ((), got) = tokio::join!(send, recv);
        drop((r, wr));
        (w, got)
    }
    let there: Vec<u8> = data.iter().rev().copied().collect();
    let ((_, got_by_server), (_, got_by_client)) =
        tokio::join!(pump(server, there.clone()), pump(client, data.clone()));
    assert!(got_by_server == data, "client to server differs");
    assert!(got_by_client == there, "server to client differs");
}

/// A flush on a quiet wire sends at once; on a busy one (a send less
/// than `LINGER` ago) a small flush waits up to `LINGER` for more, then
/// sends; a full buffer's worth goes at once either way.
#[tokio::test(start_paused = true)]
async fn small_flushes_linger_only_on_a_busy_wire() {
    let (mut client, mut server) = in_memory(1 << 20).await;
    let mut got = [0u8; 3];
    let t = tokio::time::Instant::now();
    client.write_all(b"one").await.unwrap();
    client.flush().await.unwrap();
    assert_eq!(
        t.elapsed(),
        std::time::Duration::ZERO,
        "a quiet wire lingered"
    );
    server.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"one");
    let t = tokio::time::Instant::now();
    client.write_all(b"two").await.unwrap();
    client.flush().await.unwrap();
    assert!(
        t.elapsed() >= LINGER,
        "a busy wire sent a small flush at once"
    );
    server.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"two");
    let big = vec![7u8; SEND_AT_ONCE];
    let t = tokio::time::Instant::now();
    client.write_all(&big).await.unwrap();
    client.flush().await.unwrap();
    assert_eq!(
        t.elapsed(),
        std::time::Duration::ZERO,
        "a full send lingered"
    );
    let mut back = vec![0u8; big.len()];
    server.read_exact(&mut back).await.unwrap();
    assert!(back == big);
}

/// The frames sealed and opened here are the ones snow's transport
/// mode makes and opens after the same handshake, message after
/// message (the nonces advance alike).
#[test]
fn frames_are_the_ones_snow_would_make() {
    let (a, b) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
    let (mut i, _) = start(&a, &prologue("c", "key"), true).unwrap();
    let (mut r, _) = start(&b, &prologue("c", "key"), false).unwrap();
    let (mut m, mut p) = (vec![0u8; MAX_MESSAGE], vec![0u8; MAX_MESSAGE]);
    let n = i.write_message(&[], &mut m).unwrap();
    r.read_message(&m[..n], &mut p).unwrap();
    let n = r.write_message(&[], &mut m).unwrap();
    i.read_message(&m[..n], &mut p).unwrap();
    let n = i.write_message(&[], &mut m).unwrap();
    r.read_message(&m[..n], &mut p).unwrap();
    let mut theirs = r.into_transport_mode().unwrap();
    let (mut tx, mut rx) = ciphers(i).unwrap();
    for k in 0..3 {
        let data = format!("message {k}").into_bytes();
        let mut body = data.clone();
        body.extend([0u8; TAG]);
        tx.seal(&mut body).unwrap();
        let n = theirs.read_message(&body, &mut p).unwrap();
        assert_eq!(&p[..n], &data[..]);
        let n = theirs.write_message(&data, &mut m).unwrap();
        // Opened from an offset, to the front.
        let mut shifted = vec![9u8; 7];
        shifted.extend_from_slice(&m[..n]);
        let got = rx.open_within(&mut shifted, 7).unwrap();
        assert_eq!(&shifted[..got], &data[..]);
    }
}

/// Two relays joined by a wire carry two loopback connections' bytes
/// both ways, whole and in order, after what the wire held from before
/// the relay started; each end's shutdown reaches the other, and both
/// relays then end with the byte counts.
#[tokio::test]
async fn relays_carry_loopback_connections_both_ways_to_the_end() {
    use tokio::net::{TcpListener, TcpStream};
    async fn loopback_pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (c, s)
    }
    let p = prologue("c", "key");
    let (a, b) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
    let (x, y) = loopback_pair().await;
    let expected = a.public().to_peer_id();
    let server = tokio::spawn({
        let p = p.clone();
        async move { accept(&a, &p, y).await }
    });
    let mut dialled = connect(&b, &p, x, expected).await.unwrap();
    let (_, mut accepted) = server.await.unwrap().unwrap();
    // Before the relays: a message read in part through the wire.
    dialled.write_all(b"handshake+rest").await.unwrap();
    dialled.flush().await.unwrap();
    let mut first = [0u8; 10];
    accepted.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, b"handshake+");

    let (mut app_a, local_a) = loopback_pair().await;
    let (mut app_b, local_b) = loopback_pair().await;
    let relay_a = tokio::spawn(async move { dialled.relay(&local_a).await });
    let relay_b = tokio::spawn(async move { accepted.relay(&local_b).await });

    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
    let back: Vec<u8> = data.iter().rev().copied().collect();
    async fn talk(app: &mut TcpStream, send: &[u8], expect: usize) -> Vec<u8> {
        let (mut r, mut w) = app.split();
        let send = async {
            let sizes = [17usize, 16_397, 1, 70_000, 300_000, 65_519];
            let (mut at, mut i) = (0, 0);
            while at < send.len() {
                let n = sizes[i % sizes.len()].min(send.len() - at);
                w.write_all(&send[at..at + n]).await.unwrap();
                at += n;
                i += 1;
            }
            w.shutdown().await.unwrap();
        };
        let recv = async {
            let mut got = Vec::with_capacity(expect);
            r.read_to_end(&mut got).await.unwrap();
            got
        };
        tokio::join!(send, recv).1
    }
    let timeout = std::time::Duration::from_secs(30);
    let (got_a, got_b) = tokio::time::timeout(timeout, async {
        tokio::join!(
            talk(&mut app_a, &data, back.len()),
            talk(&mut app_b, &back, data.len() + 4)
        )
    })
    .await
    .expect("the relays stalled");
    assert!(got_a == back, "B to A differs");
    assert_eq!(&got_b[..4], b"rest");
    assert!(got_b[4..] == data[..], "A to B differs");
    let (up_a, down_a) = relay_a.await.unwrap().unwrap();
    let (up_b, down_b) = relay_b.await.unwrap().unwrap();
    assert_eq!((up_a, down_a), (data.len() as u64, back.len() as u64));
    assert_eq!((up_b, down_b), (back.len() as u64, data.len() as u64 + 4));
}

/// A frame changed on the way is refused, not delivered.
#[tokio::test]
async fn a_tampered_frame_is_refused() {
    let (mut client, mut server) = in_memory(100_000).await;
    client.write_all(b"first").await.unwrap();
    client.flush().await.unwrap();
    let mut got = [0u8; 5];
    server.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"first");
    // A frame with one bit flipped, written under the wire.
    let mut frame = vec![0u8; HEADER + 5 + TAG];
    frame[HEADER..HEADER + 5].copy_from_slice(b"again");
    client.tx.seal(&mut frame[HEADER..]).unwrap();
    frame[..HEADER].copy_from_slice(&((5 + TAG) as u16).to_be_bytes());
    frame[HEADER + 1] ^= 1;
    client.io.write_all(&frame).await.unwrap();
    let e = server.read(&mut got).await.unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidData);
}

/// Fuzzing of every decoder of a peer's bytes: the handshake at either
/// end, the identity proof, and the frames of an established wire.
mod fuzz {
    use std::{
        alloc::{GlobalAlloc, Layout, System},
        cell::Cell,
        sync::LazyLock,
        time::Duration,
    };

    use proptest::{prelude::*, sample::Index};
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    use super::*;

    /// The system allocator, counting on the threads that ask for it
    /// the bytes allocated and not yet freed, and their peak, so that
    /// the tests below bound what decoding a peer's bytes holds. It is
    /// the allocator of the whole test binary; threads that do not ask
    /// pay one thread-local read per call.
    struct Counting;

    thread_local! {
        /// (counting, live bytes, peak) on this thread.
        static COUNT: Cell<(bool, usize, usize)> = const { Cell::new((false, 0, 0)) };
    }

    fn count(grown: usize, shrunk: usize) {
        let _ = COUNT.try_with(|c| {
            let (on, live, peak) = c.get();
            if on {
                let live = (live + grown).saturating_sub(shrunk);
                c.set((on, live, peak.max(live)));
            }
        });
    }

    // SAFETY: every call goes to the system allocator unchanged.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            count(layout.size(), 0);
            // SAFETY: the caller's contract, passed on.
            unsafe { System.alloc(layout) }
        }

        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            count(layout.size(), 0);
            // SAFETY: the caller's contract, passed on.
            unsafe { System.alloc_zeroed(layout) }
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            count(0, layout.size());
            // SAFETY: the caller's contract, passed on.
            unsafe { System.dealloc(ptr, layout) }
        }

        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            count(new_size, layout.size());
            // SAFETY: the caller's contract, passed on.
            unsafe { System.realloc(ptr, layout, new_size) }
        }
    }

    #[global_allocator]
    static ALLOCATOR: Counting = Counting;

    /// Runs `f`, counting what it allocates; returns its result and the
    /// most bytes it held at once.
    fn counting<R>(f: impl FnOnce() -> R) -> (R, usize) {
        COUNT.with(|c| c.set((true, 0, 0)));
        let r = f();
        let (_, _, peak) = COUNT.with(|c| c.replace((false, 0, 0)));
        (r, peak)
    }

    /// Runs `fut`, counting what it allocates while it is polled (not
    /// what the other tasks do in between); returns its output and the
    /// most bytes it held at once.
    async fn counted<F: Future>(fut: F) -> (F::Output, usize) {
        let mut fut = std::pin::pin!(fut);
        let (mut live, mut peak) = (0, 0);
        let out = std::future::poll_fn(|cx| {
            COUNT.with(|c| c.set((true, live, peak)));
            let out = fut.as_mut().poll(cx);
            (_, live, peak) = COUNT.with(|c| c.replace((false, 0, 0)));
            out
        })
        .await;
        (out, peak)
    }

    /// Room for snow's state, a proof, an error and the pipe's buffer.
    const SLACK: usize = 16 << 10;
    /// The most a handshake may hold at once: its two message buffers.
    /// A wire's buffers come on top once it is made.
    const HANDSHAKE_HOLDS: usize = 2 * MAX_MESSAGE + SLACK;
    const WIRE_HOLDS: usize = 2 * BUFFER;
    /// The most one read of an established wire may allocate: an error.
    const READ_HOLDS: usize = 1 << 10;
    /// How long an honest end waits for its peer before it hangs up.
    const PATIENCE: Duration = Duration::from_secs(5);
    /// How long an end under test may take once its peer has hung up.
    const BOUND: Duration = Duration::from_secs(60);

    /// The cases of proptest's default (`PROPTEST_CASES`, else 256),
    /// divided by `fewer` for the dearer tests; no regression files.
    fn config(fewer: u32) -> ProptestConfig {
        let default = ProptestConfig::default();
        ProptestConfig {
            cases: (default.cases / fewer).max(1),
            failure_persistence: None,
            ..default
        }
    }

    /// A runtime whose clock stands still while it is busy and jumps
    /// ahead when every task waits: a wait for a silent peer ends at
    /// once, at its timeout.
    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap()
    }

    /// The identities of the responder and of the initiator.
    static KEYS: LazyLock<[Keypair; 2]> =
        LazyLock::new(|| [Keypair::generate_ed25519(), Keypair::generate_ed25519()]);

    fn id(key: &Keypair) -> PeerId {
        key.public().to_peer_id()
    }

    /// An end of a handshake.
    #[derive(Debug, Clone, Copy)]
    enum End {
        /// `accept`, with the responder's identity.
        Responder,
        /// `connect`, with the initiator's identity, to the responder.
        Initiator,
    }

    impl End {
        fn other(self) -> Self {
            match self {
                End::Responder => End::Initiator,
                End::Initiator => End::Responder,
            }
        }
    }

    /// Runs `end` of a handshake over `io`; returns whom it found at
    /// the other end.
    async fn run(end: End, io: DuplexStream) -> io::Result<PeerId> {
        let [responder, initiator] = &*KEYS;
        let p = prologue("c", "key");
        match end {
            End::Responder => accept(responder, &p, io).await.map(|(peer, _)| peer),
            End::Initiator => connect(initiator, &p, io, id(responder))
                .await
                .map(|_| id(responder)),
        }
    }

    /// A change to a byte stream, at a position taken among the first
    /// `span` (given when it is applied).
    #[derive(Debug, Clone)]
    enum Edit {
        /// Exclusive-or of a byte with a mask that is not zero.
        Flip(Index, u8),
        /// The end of the stream there.
        Cut(Index),
        /// Bytes inserted there.
        Insert(Index, Vec<u8>),
        /// Bytes removed from there.
        Remove(Index, usize),
    }

    fn edit() -> impl Strategy<Value = Edit> {
        prop_oneof![
            (any::<Index>(), 1..=u8::MAX).prop_map(|(at, mask)| Edit::Flip(at, mask)),
            any::<Index>().prop_map(Edit::Cut),
            (any::<Index>(), prop::collection::vec(any::<u8>(), 1..8))
                .prop_map(|(at, bytes)| Edit::Insert(at, bytes)),
            (any::<Index>(), 1..8usize).prop_map(|(at, n)| Edit::Remove(at, n)),
        ]
    }

    impl Edit {
        /// `s` so changed. A position past its end changes nothing,
        /// but an insertion at its very end extends it: the change of
        /// a prefix of a stream is a prefix of the change of the
        /// stream, so a stream can be changed as it goes.
        fn apply(&self, s: &[u8], span: usize) -> Vec<u8> {
            let mut s = s.to_vec();
            match self {
                Edit::Flip(at, mask) => {
                    if let Some(b) = s.get_mut(at.index(span)) {
                        *b ^= mask;
                    }
                }
                Edit::Cut(at) => s.truncate(at.index(span)),
                Edit::Insert(at, bytes) => {
                    let at = at.index(span);
                    if at <= s.len() {
                        s.splice(at..at, bytes.iter().copied());
                    }
                }
                Edit::Remove(at, n) => {
                    let at = at.index(span);
                    if at < s.len() {
                        s.drain(at..(at + n).min(s.len()));
                    }
                }
            }
            s
        }

        /// `s` changed by each of `edits` in turn.
        fn all(edits: &[Edit], s: &[u8]) -> Vec<u8> {
            edits
                .iter()
                .fold(s.to_vec(), |s, e| e.apply(&s, s.len() + 1))
        }
    }

    /// Carries one direction of a connection, changed by `edit` (with
    /// the stream's expected length) as it goes; shuts `to` once
    /// `from` ends or the edit cuts the stream. Returns what came and
    /// what went on.
    async fn carry(
        mut from: tokio::io::ReadHalf<DuplexStream>,
        mut to: tokio::io::WriteHalf<DuplexStream>,
        edit: Option<(Edit, usize)>,
    ) -> (Vec<u8>, Vec<u8>) {
        let (mut came, mut went) = (Vec::new(), Vec::new());
        let mut open = true;
        let mut buf = vec![0u8; 4096];
        loop {
            if open
                && let Some((Edit::Cut(at), span)) = &edit
                && came.len() >= at.index(*span)
            {
                open = false;
                let _ = to.shutdown().await;
            }
            let n = match from.read(&mut buf).await {
                Ok(n) if n > 0 => n,
                _ => break,
            };
            came.extend_from_slice(&buf[..n]);
            if !open {
                continue;
            }
            let now = match &edit {
                Some((e, span)) => e.apply(&came, *span),
                None => came.clone(),
            };
            if now.len() > went.len() && to.write_all(&now[went.len()..]).await.is_err() {
                open = false;
            }
            went = now;
        }
        let _ = to.shutdown().await;
        (came, went)
    }

    /// A handshake through a tamperer.
    #[derive(Debug)]
    struct Session {
        /// Whom the end under test found at the other end.
        found: io::Result<PeerId>,
        /// The most bytes the end under test held at once.
        peak: usize,
        /// What the honest end sent, and what of it, changed, reached
        /// the end under test.
        sent: Vec<u8>,
        delivered: Vec<u8>,
        /// What the end under test sent.
        answered: Vec<u8>,
    }

    /// A handshake between `end`, under test, and an honest other end,
    /// through a tamperer that applies `edit` to what the honest end
    /// sends. The honest end hangs up after `PATIENCE`. None if the end
    /// under test has not ended `BOUND` after that.
    async fn session(end: End, edit: Option<(Edit, usize)>) -> Option<Session> {
        let (honest_io, near) = tokio::io::duplex(1 << 17);
        let (far, tested_io) = tokio::io::duplex(1 << 17);
        let ((near_r, near_w), (far_r, far_w)) = (tokio::io::split(near), tokio::io::split(far));
        let forth = tokio::spawn(carry(near_r, far_w, edit));
        let back = tokio::spawn(carry(far_r, near_w, None));
        let honest = tokio::spawn(async move {
            let _ = tokio::time::timeout(PATIENCE, run(end.other(), honest_io)).await;
        });
        let (found, peak) = tokio::time::timeout(PATIENCE + BOUND, counted(run(end, tested_io)))
            .await
            .ok()?;
        honest.await.unwrap();
        let ((sent, delivered), (answered, _)) = (forth.await.unwrap(), back.await.unwrap());
        Some(Session {
            found,
            peak,
            sent,
            delivered,
            answered,
        })
    }

    /// The bytes of a real handshake: (the initiator's, the
    /// responder's).
    static TRANSCRIPT: LazyLock<(Vec<u8>, Vec<u8>)> = LazyLock::new(|| {
        let s = runtime().block_on(session(End::Responder, None)).unwrap();
        assert_eq!(s.found.unwrap(), id(&KEYS[1]));
        assert_eq!(s.sent, s.delivered);
        (s.sent, s.answered)
    });

    fn framed(msg: &[u8]) -> Vec<u8> {
        let mut m = u16::try_from(msg.len()).unwrap().to_be_bytes().to_vec();
        m.extend_from_slice(msg);
        m
    }

    /// What a peer might send in a handshake: anything; messages of
    /// anything, framed right, up to the largest; or the bytes the
    /// other end sent in a real handshake (a replay), changed or not.
    fn handshake_input(real: &'static [u8]) -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            prop::collection::vec(any::<u8>(), 0..512),
            prop::collection::vec(prop::collection::vec(any::<u8>(), 0..300), 1..4)
                .prop_map(|msgs| msgs.iter().flat_map(|m| framed(m)).collect()),
            (0..=MAX_MESSAGE, any::<u8>()).prop_map(|(n, b)| framed(&vec![b; n])),
            prop::collection::vec(edit(), 0..4).prop_map(move |edits| Edit::all(&edits, real)),
        ]
    }

    /// Feeds `input` to `end` as all its peer sends before it hangs
    /// up: `end` must refuse it, within `BOUND` and a fixed memory.
    fn refuses(end: End, input: Vec<u8>) -> Result<(), TestCaseError> {
        let fed = runtime().block_on(async {
            let (peer, tested_io) = tokio::io::duplex(1 << 17);
            let (mut r, mut w) = tokio::io::split(peer);
            tokio::spawn(async move {
                let _ = w.write_all(&input).await;
                let _ = w.shutdown().await;
            });
            tokio::spawn(async move { r.read_to_end(&mut Vec::new()).await });
            tokio::time::timeout(BOUND, counted(run(end, tested_io)))
                .await
                .ok()
        });
        let Some((found, peak)) = fed else {
            return Err(TestCaseError::fail(
                "the handshake did not end after its peer hung up",
            ));
        };
        prop_assert!(
            found.is_err(),
            "found {found:?} in bytes not made for this handshake"
        );
        prop_assert!(peak <= HANDSHAKE_HOLDS, "held {peak} bytes");
        Ok(())
    }

    /// A handshake with an honest end, whose bytes `edit` changes on
    /// the way: the end under test succeeds if and only if what reached
    /// it of the handshake is what the honest end sent, and ends within
    /// `BOUND` of the honest end giving up, within a fixed memory.
    fn succeeds_only_untampered(end: End, edit: Edit) -> Result<(), TestCaseError> {
        let (expected, len) = match end {
            End::Responder => (id(&KEYS[1]), TRANSCRIPT.0.len()),
            End::Initiator => (id(&KEYS[0]), TRANSCRIPT.1.len()),
        };
        let Some(s) = runtime().block_on(session(end, Some((edit, len + len / 8)))) else {
            return Err(TestCaseError::fail(
                "the handshake did not end after its peer hung up",
            ));
        };
        let intact = s.sent.len() == len && s.delivered.get(..len) == Some(&s.sent[..]);
        prop_assert_eq!(s.found.is_ok(), intact, "{:?}", s.found);
        let mut holds = HANDSHAKE_HOLDS;
        if let Ok(peer) = s.found {
            prop_assert_eq!(peer, expected);
            holds += WIRE_HOLDS;
        }
        prop_assert!(s.peak <= holds, "held {} bytes", s.peak);
        Ok(())
    }

    proptest! {
        #![proptest_config(config(2))]

        /// A responder fed anything, or a replayed initiator's bytes,
        /// changed or not, refuses it, in time.
        #[test]
        fn a_responder_fed_anything_refuses_it_in_time(
            input in handshake_input(&TRANSCRIPT.0),
        ) {
            refuses(End::Responder, input)?;
        }

        /// An initiator fed anything, or a replayed responder's bytes,
        /// changed or not, refuses it, in time.
        #[test]
        fn an_initiator_fed_anything_refuses_it_in_time(
            input in handshake_input(&TRANSCRIPT.1),
        ) {
            refuses(End::Initiator, input)?;
        }

        #[test]
        fn a_responder_succeeds_only_with_an_untampered_initiator(edit in edit()) {
            succeeds_only_untampered(End::Responder, edit)?;
        }

        #[test]
        fn an_initiator_succeeds_only_with_an_untampered_responder(edit in edit()) {
            succeeds_only_untampered(End::Initiator, edit)?;
        }
    }

    /// What an identity proof might be: anything; a length and
    /// anything, up to the largest message; the right key with a
    /// signature of anything; a well-formed protobuf key of any length
    /// (which decoding copies); or a real proof, changed.
    #[derive(Debug, Clone)]
    enum Proof {
        Any(Vec<u8>),
        Long(u16, usize, u8),
        Forged(Vec<u8>),
        Huge(usize),
        Edited(Vec<Edit>),
    }

    fn proof() -> impl Strategy<Value = Proof> {
        prop_oneof![
            prop::collection::vec(any::<u8>(), 0..200).prop_map(Proof::Any),
            (any::<u16>(), 0..MAX_MESSAGE - HEADER, any::<u8>())
                .prop_map(|(len, n, b)| Proof::Long(len, n, b)),
            prop::collection::vec(any::<u8>(), 0..100).prop_map(Proof::Forged),
            prop_oneof![0..2 * MAX_KEY, 0..MAX_MESSAGE - 200].prop_map(Proof::Huge),
            prop::collection::vec(edit(), 1..4).prop_map(Proof::Edited),
        ]
    }

    proptest! {
        #![proptest_config(config(1))]

        /// An identity proof of any bytes does not panic and proves no
        /// one but the identity that signed the handshake's noise key,
        /// within a fixed memory.
        #[test]
        fn an_identity_proof_proves_only_who_signed_the_noise_key(proof in proof()) {
            let [responder, initiator] = &*KEYS;
            let p = prologue("c", "key");
            let (mut i, _) = start(initiator, &p, true).unwrap();
            let (mut r, real) = start(responder, &p, false).unwrap();
            let (mut m, mut payload) = (vec![0u8; MAX_MESSAGE], vec![0u8; MAX_MESSAGE]);
            let n = i.write_message(&[], &mut m).unwrap();
            r.read_message(&m[..n], &mut payload).unwrap();
            let n = r.write_message(&[], &mut m).unwrap();
            i.read_message(&m[..n], &mut payload).unwrap();
            prop_assert_eq!(verify(&i, &real).unwrap(), id(responder));
            let proof = match proof {
                Proof::Any(p) => p,
                Proof::Long(len, n, b) => {
                    let mut p = len.to_be_bytes().to_vec();
                    p.resize(HEADER + n, b);
                    p
                }
                Proof::Forged(sig) => {
                    let key = responder.public().encode_protobuf();
                    let mut p = u16::try_from(key.len()).unwrap().to_be_bytes().to_vec();
                    p.extend_from_slice(&key);
                    p.extend_from_slice(&sig);
                    p
                }
                Proof::Huge(n) => {
                    // Key type 1 (Ed25519), then `n` bytes of key data.
                    let mut key = vec![0x08, 0x01, 0x12];
                    let mut len = n;
                    while len >= 0x80 {
                        key.push((len & 0x7f) as u8 | 0x80);
                        len >>= 7;
                    }
                    key.push(len as u8);
                    key.resize(key.len() + n, 7);
                    let mut p = u16::try_from(key.len()).unwrap().to_be_bytes().to_vec();
                    p.extend_from_slice(&key);
                    p.extend_from_slice(&[0u8; 64]);
                    p
                }
                Proof::Edited(edits) => Edit::all(&edits, &real),
            };
            let (got, peak) = counting(|| verify(&i, &proof));
            match got {
                Ok(peer) => prop_assert_eq!(peer, id(responder)),
                Err(e) => prop_assert_eq!(e.kind(), io::ErrorKind::PermissionDenied),
            }
            prop_assert!(peak <= SLACK, "held {peak} bytes");
        }
    }

    /// What the reader of a wire is fed: frames of data of these
    /// lengths, sealed as the other end would, then `tail`, then
    /// changed by `edits`.
    fn frames() -> impl Strategy<Value = (Vec<usize>, Vec<u8>, Vec<Edit>)> {
        (
            prop::collection::vec(
                prop_oneof![4 => 1..64usize, 1 => 64..=MAX_DATA, 1 => Just(MAX_DATA)],
                0..5,
            ),
            prop_oneof![
                3 => Just(Vec::new()),
                1 => prop::collection::vec(any::<u8>(), 1..300),
            ],
            prop::collection::vec(edit(), 0..3),
        )
    }

    /// Reads `wire` to its end or its first error, counting what each
    /// read allocates; returns the data, how it ended, and whether a
    /// read after an error gave data.
    async fn read_all(
        mut wire: Wire<DuplexStream>,
    ) -> Result<(Vec<u8>, io::Result<()>), TestCaseError> {
        let (mut got, mut buf) = (Vec::new(), vec![0u8; 70_000]);
        loop {
            let (r, peak) = counted(wire.read(&mut buf)).await;
            prop_assert!(peak <= READ_HOLDS, "a read held {peak} bytes");
            match r {
                Ok(0) => return Ok((got, Ok(()))),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => {
                    let again = wire.read(&mut buf).await;
                    prop_assert!(!matches!(again, Ok(n) if n > 0), "data after an error");
                    return Ok((got, Err(e)));
                }
            }
        }
    }

    proptest! {
        #![proptest_config(config(4))]

        /// Whatever comes as the other end's frames, the reader hands on
        /// only the data of the whole, untouched frames at its front, in
        /// order, and ends cleanly only when nothing else came: a frame
        /// changed, cut or made up is an error, not data.
        #[test]
        fn a_wire_reads_only_the_data_of_untouched_frames(
            (sizes, tail, edits) in frames(),
        ) {
            runtime().block_on(async {
                let (mut client, server) = in_memory(1 << 16).await;
                let (mut stream, mut ends, mut data) = (Vec::new(), vec![0], Vec::new());
                for (k, &n) in sizes.iter().enumerate() {
                    let chunk: Vec<u8> = (0..n).map(|i| (i * 31 + k * 7) as u8).collect();
                    let mut frame = vec![0u8; HEADER + n + TAG];
                    frame[HEADER..HEADER + n].copy_from_slice(&chunk);
                    client.tx.seal(&mut frame[HEADER..]).unwrap();
                    frame[..HEADER]
                        .copy_from_slice(&u16::try_from(n + TAG).unwrap().to_be_bytes());
                    stream.extend_from_slice(&frame);
                    ends.push(stream.len());
                    data.push(chunk);
                }
                let sent = Edit::all(&edits, &[stream.as_slice(), &tail].concat());
                // The frames at the front that came untouched, and
                // whether nothing else came.
                let whole = ends
                    .iter()
                    .rposition(|&e| sent.get(..e) == stream.get(..e))
                    .unwrap_or(0);
                let clean = sent.len() == ends[whole];
                let good = data[..whole].concat();
                let write = async move {
                    let _ = client.io.write_all(&sent).await;
                    let _ = client.io.shutdown().await;
                };
                let ((), read) = tokio::join!(write, tokio::time::timeout(BOUND, read_all(server)));
                let Ok(read) = read else {
                    return Err(TestCaseError::fail("the reader did not end"));
                };
                let (got, end) = read?;
                prop_assert!(
                    good.starts_with(&got),
                    "{} bytes of data read, not the {} of the untouched frames",
                    got.len(),
                    good.len()
                );
                if clean {
                    prop_assert!(end.is_ok(), "{end:?}");
                    prop_assert_eq!(got.len(), good.len());
                } else {
                    let kind = end.map_err(|e| e.kind()).expect_err("no error");
                    prop_assert!(
                        matches!(kind, io::ErrorKind::InvalidData | io::ErrorKind::UnexpectedEof),
                        "{kind:?}"
                    );
                }
                Ok(())
            })?;
        }
    }

    /// A frame must carry 1 to 65,519 bytes of data: a header of fewer
    /// than a tag's bytes is refused, and so is a frame of a tag alone,
    /// even sealed right; the largest frame is read.
    #[tokio::test(start_paused = true)]
    async fn frames_without_data_are_refused() {
        for len in 0..=TAG {
            let (mut client, mut server) = in_memory(1 << 16).await;
            let mut frame = vec![0u8; HEADER + len];
            frame[..HEADER].copy_from_slice(&u16::try_from(len).unwrap().to_be_bytes());
            if len == TAG {
                client.tx.seal(&mut frame[HEADER..]).unwrap();
            }
            client.io.write_all(&frame).await.unwrap();
            client.write_all(b"after").await.unwrap();
            client.flush().await.unwrap();
            let mut got = [0u8; 5];
            let e = server.read(&mut got).await.unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{len}: {e}");
        }
        let (mut client, mut server) = in_memory(1 << 17).await;
        let largest = vec![5u8; MAX_DATA];
        client.write_all(&largest).await.unwrap();
        client.flush().await.unwrap();
        let mut got = vec![0u8; MAX_DATA];
        server.read_exact(&mut got).await.unwrap();
        assert!(got == largest);
    }

    /// A prober that does not know the cluster key sends the first
    /// message of a handshake: the responder hangs up, or answers with
    /// nothing the prober can read and without its identity in clear;
    /// it never accepts.
    #[tokio::test(start_paused = true)]
    async fn a_prober_without_the_key_learns_nothing_of_the_responder() {
        let responder = Keypair::generate_ed25519();
        let identity = responder.public().encode_protobuf();
        let (mut prober, _) =
            start(&Keypair::generate_ed25519(), &prologue("c", "other"), true).unwrap();
        let (mut msg, mut payload) = (vec![0u8; MAX_MESSAGE], vec![0u8; MAX_MESSAGE]);
        let n = prober.write_message(&[], &mut msg).unwrap();
        let (mut near, far) = tokio::io::duplex(1 << 17);
        let accepted = tokio::spawn(async move {
            accept(&responder, &prologue("c", "key"), far)
                .await
                .map(|(peer, _)| peer)
        });
        send(&mut near, &msg[..n]).await.unwrap();
        // All the responder sends before it hangs up, or waits.
        let (mut answer, mut buf) = (Vec::new(), [0u8; 4096]);
        while let Ok(Ok(got)) = tokio::time::timeout(PATIENCE, near.read(&mut buf)).await
            && got > 0
        {
            answer.extend_from_slice(&buf[..got]);
        }
        if let Some((len, body)) = answer.split_first_chunk::<HEADER>() {
            let body = &body[..usize::from(u16::from_be_bytes(*len)).min(body.len())];
            assert!(
                prober.read_message(body, &mut payload).is_err(),
                "the prober read the responder's answer"
            );
        }
        assert!(
            !answer.windows(identity.len()).any(|w| w == identity),
            "the responder's identity went in clear"
        );
        drop(near);
        let accepted = tokio::time::timeout(BOUND, accepted)
            .await
            .unwrap()
            .unwrap();
        assert!(accepted.is_err(), "the responder accepted a prober");
    }
}
