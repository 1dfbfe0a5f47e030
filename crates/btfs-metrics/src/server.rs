//! The metrics endpoint: `GET /metrics` answered with OpenMetrics text,
//! anything else with 404, over a hand-minimal HTTP/1.1 (one request a
//! connection, then close). Bounded, as it listens on the network: few
//! connections at once, a small request read within a short time.

use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};
use tracing::{debug, info, warn};

use crate::Metrics;

/// Connections served at once; more are closed at once (a scraper makes
/// one at a time).
pub const MAX_CONNECTIONS: usize = 8;
/// The most a request may be, head and all (a scraper's is a few hundred
/// bytes).
pub const MAX_REQUEST: usize = 8 << 10;
/// Time for a connection to send its request and take the answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The content type of OpenMetrics text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The endpoint could not listen.
#[derive(Debug, thiserror::Error)]
#[error("metrics={addr}: cannot listen: {source}")]
pub struct BindError {
    pub addr: SocketAddr,
    #[source]
    pub source: io::Error,
}

/// A bound metrics endpoint, not serving yet (bound first, so that a mount
/// whose address is taken fails before anything starts).
#[derive(Debug)]
pub struct Endpoint {
    listener: TcpListener,
}

impl Endpoint {
    /// Binds `addr` (inside a tokio runtime).
    pub fn bind(addr: SocketAddr) -> Result<Self, BindError> {
        let bound = std::net::TcpListener::bind(addr)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .and_then(TcpListener::from_std);
        match bound {
            Ok(listener) => Ok(Self { listener }),
            Err(source) => Err(BindError { addr, source }),
        }
    }

    /// Where it listens (the port a `:0` was given).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves `metrics` until the task is dropped.
    pub async fn serve(self, metrics: Arc<Metrics>) {
        if let Ok(a) = self.listener.local_addr() {
            info!(address = %a, "metrics served at http://{a}/metrics");
        }
        let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        loop {
            let (conn, from) = match self.listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors and the like: not a reason to stop.
                    warn!("metrics endpoint: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                debug!(%from, "metrics: connection refused, {MAX_CONNECTIONS} open");
                continue;
            };
            let metrics = metrics.clone();
            tokio::spawn(async move {
                if tokio::time::timeout(REQUEST_TIMEOUT, answer(conn, metrics))
                    .await
                    .is_err()
                {
                    debug!(%from, "metrics: request not done within {REQUEST_TIMEOUT:?}");
                }
                drop(permit);
            });
        }
    }
}

/// What a request asked for.
#[derive(Debug, PartialEq, Eq)]
enum Asked {
    Metrics,
    NotFound,
    Bad,
}

/// Reads the head of a request (up to `MAX_REQUEST`) and says what it asks.
async fn read_request(conn: &mut TcpStream) -> io::Result<Asked> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = conn.read(&mut chunk).await?;
        if n == 0 {
            return Ok(Asked::Bad);
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n") {
            return Ok(parse(&buf));
        }
        if buf.len() >= MAX_REQUEST {
            return Ok(Asked::Bad);
        }
    }
}

/// The request line of a request head.
fn parse(head: &[u8]) -> Asked {
    let Some(line) = head.split(|&b| b == b'\n').next() else {
        return Asked::Bad;
    };
    let Ok(line) = std::str::from_utf8(line) else {
        return Asked::Bad;
    };
    let mut parts = line.trim_end_matches('\r').split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Asked::Bad;
    };
    if !version.starts_with("HTTP/1.") {
        return Asked::Bad;
    }
    let path = target.split('?').next().unwrap_or(target);
    if method == "GET" && path == "/metrics" {
        Asked::Metrics
    } else {
        Asked::NotFound
    }
}

async fn answer(mut conn: TcpStream, metrics: Arc<Metrics>) -> io::Result<()> {
    let asked = read_request(&mut conn).await?;
    let (status, ctype, body) = match asked {
        Asked::Metrics => {
            // Collectors read the node's counters (and its store's
            // statistics): off the runtime's threads.
            let text = tokio::task::spawn_blocking(move || metrics.encode())
                .await
                .map_err(io::Error::other)?;
            match text {
                Ok(t) => ("200 OK", CONTENT_TYPE, t),
                Err(e) => (
                    "500 Internal Server Error",
                    "text/plain; charset=utf-8",
                    format!("encoding the metrics failed: {e}\n"),
                ),
            }
        }
        Asked::NotFound => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "only GET /metrics is served here\n".to_owned(),
        ),
        Asked::Bad => (
            "400 Bad Request",
            "text/plain; charset=utf-8",
            "bad request\n".to_owned(),
        ),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await?;
    conn.write_all(body.as_bytes()).await?;
    conn.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_get_metrics_is_served() {
        assert_eq!(
            parse(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Asked::Metrics
        );
        assert_eq!(parse(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n"), Asked::Metrics);
        assert_eq!(parse(b"POST /metrics HTTP/1.1\r\n\r\n"), Asked::NotFound);
        assert_eq!(parse(b"GET / HTTP/1.1\r\n\r\n"), Asked::NotFound);
        assert_eq!(parse(b"GET /metricsx HTTP/1.1\r\n\r\n"), Asked::NotFound);
        assert_eq!(parse(b"GET /metrics\r\n\r\n"), Asked::Bad);
        assert_eq!(parse(b"\xff\xfe\r\n\r\n"), Asked::Bad);
    }

    async fn get(addr: SocketAddr, request: &[u8]) -> String {
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(request).await.unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn serves_openmetrics_and_refuses_the_rest() {
        let mut m = Metrics::default();
        let c = prometheus_client::metrics::counter::Counter::<u64>::default();
        c.inc_by(7);
        m.registry.register("btfs_test", "a test counter", c);
        let ep = Endpoint::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = ep.local_addr().unwrap();
        let task = tokio::spawn(ep.serve(m.shared()));
        let ok = get(addr, b"GET /metrics HTTP/1.1\r\nHost: a\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.contains(CONTENT_TYPE));
        assert!(ok.contains("btfs_test_total 7"));
        assert!(ok.ends_with("# EOF\n"));
        let missing = get(addr, b"GET /other HTTP/1.1\r\n\r\n").await;
        assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
        // A head past the bound is refused, not read on.
        let mut big = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
        big.resize(MAX_REQUEST + 100, b'a');
        let refused = get(addr, &big).await;
        assert!(refused.starts_with("HTTP/1.1 400"), "{refused}");
        // A taken address is a clear error.
        let err = Endpoint::bind(addr).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("metrics={addr}: cannot listen")),
            "{err}"
        );
        task.abort();
    }
}
