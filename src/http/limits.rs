//! Connection caps, per client IP and globally, enforced where connections are accepted.
//!
//! HTTP/1.1 (what iPXE, firmware and curl speak to us) runs one request at a time on a
//! connection, so a cap on connections is also a cap on concurrent downloads. A connection over
//! a cap gets `503 Service Unavailable` with `Retry-After` and is closed; iPXE and curl report
//! it, and a retry succeeds once other downloads finish.

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

use crate::mac::MacAddr;

/// Default `[http] max_connections`: a 1 GiB download holds a connection for seconds; a
/// thousand of them is far beyond a lab and still small in memory (a task and ~64 KiB each).
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// Default `[http] max_connections_per_ip`: one booting machine opens a handful (script,
/// kernel, initrd, sanboot's parallel ranges); 64 leaves room for NAT and test rigs.
pub const DEFAULT_MAX_CONNECTIONS_PER_IP: usize = 64;
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
}

impl ConnLimits {
    /// Limits of `max_total` connections, `max_per_ip` from one IP.
    pub fn new(max_total: usize, max_per_ip: usize) -> ConnLimits {
        ConnLimits {
            counts: Arc::default(),
            max_total,
            max_per_ip,
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

/// A connection that holds its permit.
pub struct Limited<S> {
    inner: S,
    _permit: ConnPermit,
}

impl<S> Limited<S> {
    /// Wrap `inner`, keeping `permit` until the connection is dropped.
    pub fn new(inner: S, permit: ConnPermit) -> Limited<S> {
        Limited {
            inner,
            _permit: permit,
        }
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
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
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
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
    use super::*;

    #[test]
    fn caps_per_ip_and_total() {
        let l = ConnLimits::new(3, 2);
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
