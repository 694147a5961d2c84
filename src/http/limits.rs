//! Connection caps, per client IP and globally, enforced where connections are accepted.
//!
//! HTTP/1.1 (what iPXE, firmware and curl speak to us) runs one request at a time on a
//! connection, so a cap on connections is also a cap on concurrent downloads. A connection over
//! a cap gets `503 Service Unavailable` with `Retry-After` and is closed; iPXE and curl report
//! it, and a retry succeeds once other downloads finish.
//!
//! A connection whose client takes no bytes for `[http] send_timeout_secs` is closed
//! ([`Limited`] for everything hyper writes, `sendfile`'s own loop for boot assets): a client
//! that stops reading must not keep its place under the caps.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::serve::{IncomingStream, Listener};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, Sleep};

use crate::mac::MacAddr;

/// Default `[http] max_connections`: a 1 GiB download holds a connection for seconds; a
/// thousand of them is far beyond a lab and still small in memory (a task and ~64 KiB each).
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// Default `[http] max_connections_per_ip`: one booting machine opens a handful (script,
/// kernel, initrd, sanboot's parallel ranges); 64 leaves room for NAT and test rigs.
pub const DEFAULT_MAX_CONNECTIONS_PER_IP: usize = 64;
/// Default `[http] send_timeout_secs`: nginx's `send_timeout`. A firmware that is busy (writing
/// a disk, decompressing) still drains its receive window well within it.
pub const DEFAULT_SEND_TIMEOUT: Duration = Duration::from_secs(60);
/// How long writing the 503 to a refused client may take before it is just closed.
const REFUSE_WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// The refusal: complete, so clients see why, and closed, so nothing more is read.
const REFUSAL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Type: text/plain\r\nContent-Length: 28\r\nConnection: close\r\n\r\ntoo many connections; retry\n";

#[derive(Default)]
struct Counts {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

/// Open-connection counters shared by every listener of one server.
#[derive(Clone)]
pub struct ConnLimits {
    counts: Arc<Mutex<Counts>>,
    max_total: usize,
    max_per_ip: usize,
    send_timeout: Duration,
}

impl ConnLimits {
    /// Limits of `max_total` connections, `max_per_ip` from one IP, and `send_timeout` without
    /// progress while writing to one.
    pub fn new(max_total: usize, max_per_ip: usize, send_timeout: Duration) -> ConnLimits {
        ConnLimits {
            counts: Arc::default(),
            max_total,
            max_per_ip,
            send_timeout,
        }
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        match self.counts.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// A permit for one more connection from `ip`, or `None` when a cap is reached.
    pub fn try_acquire(&self, ip: IpAddr) -> Option<ConnPermit> {
        let mut c = self.counts();
        let here = c.per_ip.get(&ip).copied().unwrap_or(0);
        if c.total >= self.max_total || here >= self.max_per_ip {
            return None;
        }
        c.total += 1;
        c.per_ip.insert(ip, here + 1);
        Some(ConnPermit {
            limits: self.clone(),
            ip,
        })
    }

    /// Connections open now (all IPs).
    pub fn open(&self) -> usize {
        self.counts().total
    }
}

/// One counted connection; the count drops with it.
pub struct ConnPermit {
    limits: ConnLimits,
    ip: IpAddr,
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        let mut c = self.limits.counts();
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.per_ip.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.per_ip.remove(&self.ip);
            }
        }
    }
}

/// The send timeout of one connection: fails a write that has waited `timeout` for the client
/// to take bytes.
///
/// Lazy, because a fast download waits for socket space thousands of times per second: a wait
/// that starts only notes the time (no timer operation), and the one timer, once armed, is
/// moved only when it fires early (at most once per timeout), never per write.
pub struct StallTimer {
    timeout: Duration,
    client: IpAddr,
    timer: Option<Pin<Box<Sleep>>>,
    /// When the current wait began; `None` while writes complete.
    waiting_since: Option<Instant>,
}

impl StallTimer {
    /// A timer for the connection of `client`.
    pub fn new(timeout: Duration, client: IpAddr) -> StallTimer {
        StallTimer {
            timeout,
            client,
            timer: None,
            waiting_since: None,
        }
    }

    /// Pass a write's result through; a write still waiting `timeout` after its wait began
    /// becomes a `TimedOut` error, which ends the connection.
    pub fn watch<T>(
        &mut self,
        cx: &mut Context<'_>,
        poll: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if poll.is_ready() {
            self.waiting_since = None;
            return poll;
        }
        let since = *self.waiting_since.get_or_insert_with(Instant::now);
        let deadline = since + self.timeout;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        loop {
            match timer.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                // Armed for an earlier wait: move it to this one's deadline and look again.
                Poll::Ready(()) if timer.deadline() < deadline => timer.as_mut().reset(deadline),
                Poll::Ready(()) => return Poll::Ready(Err(stalled(self.client, self.timeout))),
            }
        }
    }

    /// Run one write `io` (which completes when the client took bytes), failing it after the
    /// timeout.
    pub async fn limit<T>(&mut self, io: impl Future<Output = io::Result<T>>) -> io::Result<T> {
        let mut io = std::pin::pin!(io);
        std::future::poll_fn(|cx| {
            let poll = io.as_mut().poll(cx);
            self.watch(cx, poll)
        })
        .await
    }
}

/// A connection that holds its permit, and fails a write that waits longer than the send
/// timeout for the client to take bytes ([`StallTimer`]).
pub struct Limited<S> {
    inner: S,
    _permit: ConnPermit,
    stall: StallTimer,
}

impl<S> Limited<S> {
    /// Wrap `inner`, keeping `permit` until the connection is dropped.
    pub fn new(inner: S, permit: ConnPermit) -> Limited<S> {
        let stall = StallTimer::new(permit.limits.send_timeout, permit.ip);
        Limited {
            inner,
            _permit: permit,
            stall,
        }
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped stream and the connection's send timeout, for writes made on the stream
    /// directly (the `sendfile` path).
    pub fn parts(&mut self) -> (&S, &mut StallTimer) {
        (&self.inner, &mut self.stall)
    }

    fn watch<T>(&mut self, cx: &mut Context<'_>, poll: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        self.stall.watch(cx, poll)
    }
}

/// The error of a write the client left waiting for `timeout` (logged here: hyper drops it
/// silently).
fn stalled(client: IpAddr, timeout: Duration) -> io::Error {
    tracing::info!(
        %client,
        "HTTP client took no data for {} s (send_timeout_secs); connection closed",
        timeout.as_secs()
    );
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!("the client took no data for {} s", timeout.as_secs()),
    )
}

impl<S: AsyncRead + Unpin> AsyncRead for Limited<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Limited<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.watch(cx, poll)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_flush(cx);
        self.watch(cx, poll)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.watch(cx, poll)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.watch(cx, poll)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// The peer of a connection accepted by pxed's listeners (axum connect info), and the MAC
/// behind it once a request needed it.
#[derive(Clone, Debug)]
pub struct ClientAddr(pub SocketAddr, pub PeerMac);

impl ClientAddr {
    /// A new connection from `addr`.
    pub fn new(addr: SocketAddr) -> ClientAddr {
        ClientAddr(addr, PeerMac::default())
    }
}

/// The MAC of a connection's peer, looked up (leases, then the ARP table) at most once per
/// connection: every request of a keep-alive connection comes from the same machine, and the
/// lookup reads `/proc/net/arp`, which profiling showed on every asset request of range
/// readers that do not say their MAC.
#[derive(Clone, Debug, Default)]
pub struct PeerMac(Arc<std::sync::OnceLock<Option<MacAddr>>>);

impl PeerMac {
    /// The remembered MAC, or `lookup()`'s answer, remembered.
    pub fn get_or_lookup(&self, lookup: impl FnOnce() -> Option<MacAddr>) -> Option<MacAddr> {
        *self.0.get_or_init(lookup)
    }
}

/// A TCP listener that enforces [`ConnLimits`].
pub struct LimitedListener {
    inner: TcpListener,
    limits: ConnLimits,
}

impl LimitedListener {
    /// Wrap `inner`.
    pub fn new(inner: TcpListener, limits: ConnLimits) -> LimitedListener {
        LimitedListener { inner, limits }
    }
}

/// Tell a refused client why, then close.
pub(crate) async fn refuse(mut stream: TcpStream) {
    let _ = tokio::time::timeout(REFUSE_WRITE_TIMEOUT, async {
        stream.write_all(REFUSAL).await?;
        stream.shutdown().await
    })
    .await;
}

impl Listener for LimitedListener {
    type Io = Limited<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            // axum's accept logs and backs off on errors (e.g. out of file descriptors).
            let (stream, addr) = Listener::accept(&mut self.inner).await;
            let _ = stream.set_nodelay(true);
            match self.limits.try_acquire(addr.ip()) {
                Some(permit) => return (Limited::new(stream, permit), addr),
                None => {
                    tracing::warn!(client = %addr, "HTTP connection refused: connection cap reached");
                    tokio::spawn(refuse(stream));
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

impl Connected<IncomingStream<'_, LimitedListener>> for ClientAddr {
    fn connect_info(stream: IncomingStream<'_, LimitedListener>) -> Self {
        ClientAddr::new(*stream.remote_addr())
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;

    use super::*;

    const SEND_TIMEOUT: Duration = Duration::from_secs(60);

    /// A `Limited` end of an in-memory pipe that holds `room` bytes, and the client's end.
    fn pipe(room: usize) -> (Limited<tokio::io::DuplexStream>, tokio::io::DuplexStream) {
        let limits = ConnLimits::new(4, 4, SEND_TIMEOUT);
        let permit = limits.try_acquire("10.0.0.1".parse().unwrap()).unwrap();
        let (server, client) = tokio::io::duplex(room);
        (Limited::new(server, permit), client)
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_stops_reading_fails_the_write_after_the_send_timeout() {
        let (mut server, mut client) = pipe(1024);
        let started = Instant::now();
        let body = vec![7u8; 64 << 10];
        let mut first = [0u8; 512];
        // The client takes 512 bytes, then nothing more.
        let (written, read) = tokio::join!(server.write_all(&body), client.read_exact(&mut first));
        read.unwrap();
        let err = written.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(err.to_string().contains("took no data for 60 s"), "{err}");
        // Virtual time: exactly one timeout after the last byte was taken.
        assert_eq!(started.elapsed(), SEND_TIMEOUT);
    }

    #[tokio::test(start_paused = true)]
    async fn each_wait_gets_the_whole_timeout_after_an_idle_spell() {
        let (mut server, mut client) = pipe(1024);
        let mut chunk = vec![0u8; 4096];
        // A first wait, ended by the client after 10 s: the timer is armed for 60 s.
        let write = server.write_all(&[1u8; 2048]);
        let read = async {
            tokio::time::sleep(Duration::from_secs(10)).await;
            client.read_exact(&mut chunk[..2048]).await
        };
        let (w, r) = tokio::join!(write, read);
        w.unwrap();
        r.unwrap();
        // Idle for far longer than the timeout (the old timer fires meanwhile, harmlessly).
        tokio::time::sleep(Duration::from_secs(100)).await;
        // A new wait that the client never ends fails one whole timeout after it began, not
        // at once.
        let began = Instant::now();
        let err = server.write_all(&[2u8; 4096]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(began.elapsed(), SEND_TIMEOUT);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_client_that_keeps_reading_is_never_cut() {
        let (mut server, mut client) = pipe(1024);
        let body = vec![7u8; 16 << 10];
        let reader = async {
            let mut got = 0;
            let mut chunk = [0u8; 1024];
            // One read every 59 s: 16 reads take far longer than the send timeout in total,
            // but the writer never waits 60 s at once.
            loop {
                tokio::time::sleep(SEND_TIMEOUT - Duration::from_secs(1)).await;
                match client.read(&mut chunk).await.unwrap() {
                    0 => return got,
                    n => got += n,
                }
            }
        };
        let writer = async {
            server.write_all(&body).await.unwrap();
            server.shutdown().await.unwrap();
        };
        let ((), got) = tokio::join!(writer, reader);
        assert_eq!(got, body.len());
    }

    #[test]
    fn caps_per_ip_and_total() {
        let l = ConnLimits::new(3, 2, DEFAULT_SEND_TIMEOUT);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let p1 = l.try_acquire(a).unwrap();
        let _p2 = l.try_acquire(a).unwrap();
        assert!(l.try_acquire(a).is_none(), "per-IP cap");
        let _p3 = l.try_acquire(b).unwrap();
        assert!(l.try_acquire(b).is_none(), "global cap");
        drop(p1);
        assert_eq!(l.open(), 2);
        assert!(l.try_acquire(b).is_some());
    }
}
