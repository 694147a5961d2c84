//! The TFTP listener and admission: one listener (a tokio task) takes requests, applies the
//! limits, opens the file, and gives each transfer an ephemeral socket (RFC 1350 section 4: the
//! server's transfer ID is a new port) that one of a few event threads drives from then on
//! (`driver.rs`: epoll, many transfers per thread; see [`start_transfer`] for why).
//!
//! Entry points: [`serve`] (runs until the process ends) or [`TftpServer::bind`] then
//! [`TftpServer::run`] with a shutdown token (tests bind port 0 and read [`TftpServer::local_addr`]).
//!
//! Replies leave from the address the request was sent to: on IPv4 the listener sets
//! `IP_PKTINFO`, reads each request's destination address and interface with `recvmsg`, and binds
//! the transfer socket to that address. The interface's MTU (from sysfs) sets the default blksize
//! cap (MTU - 32, firmware-quirks.md Q7). On IPv6 the bound address is used as is.

use std::collections::HashMap;
use std::io;
use std::mem::{size_of, size_of_val};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use super::TftpConfig;
use super::driver::{self, Pool, TransferJob};
use super::engine::{self, Limits, RequestDecision, TransferEvent};
use super::fs::{Content, FileSource, ReadCache, RootSource, TftpFileError, read_range};
use super::wire::{self, Mode, Request};
use crate::events::EventBus;
use crate::mac::MacAddr;
use crate::stage::BootStage;

pub use crate::mac::MacLookup;

/// Receive buffer of the listener: requests are at most [`wire::MAX_REQUEST_BYTES`]; one more
/// byte tells an oversized request from a maximal one.
const LISTENER_RECV_BYTES: usize = wire::MAX_REQUEST_BYTES + 1;
/// Blksize cap when the egress MTU is unknown: Ethernet 1500 - IP 20 - UDP 8 - TFTP 4.
const BLKSIZE_UNKNOWN_MTU: u16 = 1468;
/// IPv4 + UDP + TFTP header bytes subtracted from the MTU.
const HEADERS: u32 = 32;
/// Receive buffer asked for on the listener: a boot storm (or the benchmark's 1000 clients) sends
/// its RRQs at once, and the default ~208 KiB holds only ~170 of them; every one dropped costs
/// its client a retransmission timeout. 4 MiB holds several thousand.
const LISTENER_RCVBUF_BYTES: usize = 4 << 20;
/// Netascii translates the whole file in memory; text files beyond this are refused.
const NETASCII_MAX_BYTES: u64 = 16 << 20;

/// A bound TFTP server, ready to [`run`](TftpServer::run).
pub struct TftpServer {
    socket: UdpSocket,
    pktinfo: bool,
    shared: Arc<Shared>,
    /// Event threads started by [`TftpServer::run`] ([`driver::event_threads`]).
    event_threads: usize,
}

struct Shared {
    config: TftpConfig,
    files: Arc<dyn FileSource>,
    events: EventBus,
    mac_lookup: MacLookup,
    cache: ReadCache,
    global: Arc<Semaphore>,
    active: Mutex<Active>,
}

#[derive(Default)]
struct Active {
    per_ip: HashMap<IpAddr, usize>,
    /// Running transfers by client address: (generation, request, has the client answered).
    peers: HashMap<SocketAddr, (u64, Request, Arc<AtomicBool>)>,
    generation: u64,
}

/// Holds a transfer's place in the limits; dropping it frees the place.
pub(super) struct Slot {
    shared: Arc<Shared>,
    peer: SocketAddr,
    generation: u64,
    /// Set once the client sent anything to the transfer socket.
    heard: Arc<AtomicBool>,
    _permit: OwnedSemaphorePermit,
}

impl Slot {
    /// The client sent something to the transfer socket: a repeat of its RRQ is a new read.
    pub(super) fn mark_heard(&self) {
        self.heard.store(true, Ordering::Relaxed);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Ok(mut a) = self.shared.active.lock() {
            if a.peers
                .get(&self.peer)
                .is_some_and(|(g, _, _)| *g == self.generation)
            {
                a.peers.remove(&self.peer);
            }
            let ip = self.peer.ip();
            if let Some(n) = a.per_ip.get_mut(&ip) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    a.per_ip.remove(&ip);
                }
            }
        }
    }
}

/// Serve TFTP on `bind` until the process ends, with files from `files` (usually a
/// [`RootSource`] over the boot root), events on `events`, and MACs from `mac_lookup`.
///
/// ```no_run
/// # async fn f(root: std::path::PathBuf, events: pxed::events::EventBus) -> anyhow::Result<()> {
/// use std::sync::Arc;
/// use pxed::tftp::{TftpConfig, fs::RootSource, server};
/// let cfg = TftpConfig::default();
/// let files = Arc::new(RootSource::new(&root, cfg.case_insensitive, &cfg.fallback_dirs)?);
/// let bind = ([0, 0, 0, 0], cfg.port).into();
/// server::serve(cfg, bind, files, events, Arc::new(|_| None)).await
/// # }
/// ```
pub async fn serve(
    config: TftpConfig,
    bind: SocketAddr,
    files: Arc<dyn FileSource>,
    events: EventBus,
    mac_lookup: MacLookup,
) -> anyhow::Result<()> {
    TftpServer::bind(config, bind, files, events, mac_lookup)
        .await?
        .run(CancellationToken::new())
        .await
}

/// A [`RootSource`] built from the config's root options.
pub fn root_source(config: &TftpConfig, root: PathBuf) -> io::Result<Arc<dyn FileSource>> {
    Ok(Arc::new(RootSource::new(
        &root,
        config.case_insensitive,
        &config.fallback_dirs,
    )?))
}

impl TftpServer {
    /// Bind the request socket (port 0 picks a free port).
    pub async fn bind(
        config: TftpConfig,
        bind: SocketAddr,
        files: Arc<dyn FileSource>,
        events: EventBus,
        mac_lookup: MacLookup,
    ) -> anyhow::Result<Self> {
        let domain = socket2::Domain::for_address(bind);
        let sock =
            socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
        sock.set_reuse_address(true)?;
        sock.set_nonblocking(true)?;
        grow_recv_buffer(&sock, LISTENER_RCVBUF_BYTES);
        sock.bind(&bind.into())
            .map_err(|e| anyhow::anyhow!("cannot bind TFTP to {bind}: {e}"))?;
        let pktinfo = bind.is_ipv4() && enable_pktinfo(sock.as_raw_fd()).is_ok();
        let socket = UdpSocket::from_std(sock.into())?;
        let shared = Arc::new(Shared {
            cache: ReadCache::new(config.cache_bytes, config.cache_file_max),
            global: Arc::new(Semaphore::new(config.max_transfers.max(1))),
            config,
            files,
            events,
            mac_lookup,
            active: Mutex::default(),
        });
        Ok(TftpServer {
            socket,
            pktinfo,
            shared,
            event_threads: driver::event_threads(),
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Answer requests until `shutdown` is cancelled; running transfers are cancelled too.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let bound = self.socket.local_addr()?;
        let mut buf = vec![0u8; LISTENER_RECV_BYTES];
        let pool = Arc::new(Pool::start(self.event_threads, &shutdown)?);
        tracing::info!(%bound, pktinfo = self.pktinfo, event_threads = self.event_threads, "TFTP listening");
        loop {
            let received = tokio::select! {
                _ = shutdown.cancelled() => {
                    // The event threads see the token within CANCEL_POLL; this makes it now.
                    pool.wake_all();
                    return Ok(());
                }
                r = recv_request(&self.socket, self.pktinfo, &mut buf) => r,
            };
            let rx = match received {
                Ok(rx) => rx,
                Err(err) => {
                    // ICMP errors from earlier sends surface here; they are no reason to stop.
                    tracing::debug!(%err, "TFTP listener receive error");
                    continue;
                }
            };
            let Some(bytes) = buf.get(..rx.len) else {
                continue;
            };
            let local = rx.local.unwrap_or(bound.ip());
            match engine::on_request_packet(bytes) {
                RequestDecision::Ignore(reason) => {
                    tracing::debug!(peer = %rx.from, %reason, "TFTP packet ignored");
                }
                RequestDecision::Refuse { packet, reason } => {
                    tracing::debug!(peer = %rx.from, %reason, "TFTP request refused");
                    if let Err(err) = self.socket.send_to(&packet, rx.from).await {
                        tracing::debug!(%err, "cannot send TFTP error");
                    }
                }
                RequestDecision::Read(req) => {
                    let Some(slot) = self.admit(rx.from, &req) else {
                        continue;
                    };
                    let shared = self.shared.clone();
                    let stop = shutdown.child_token();
                    tokio::spawn(start_transfer(
                        shared,
                        pool.clone(),
                        req,
                        rx.from,
                        local,
                        rx.ifindex,
                        slot,
                        stop,
                    ));
                }
            }
        }
    }

    /// Take a transfer slot, or say why not (the client retransmits its RRQ later).
    fn admit(&self, peer: SocketAddr, req: &Request) -> Option<Slot> {
        let shared = &self.shared;
        let mut active = shared.active.lock().ok()?;
        if let Some((_, running, heard)) = active.peers.get(&peer)
            && *running == *req
            && !heard.load(Ordering::Relaxed)
        {
            // The same RRQ again while our first answer is on its way: a second transfer from
            // a new port would only confuse the client (dnsmasq does the same). A different
            // request, or one after the client answered (EDK2's probe then the real read from
            // the same port), is a new read.
            tracing::debug!(%peer, "duplicate TFTP request ignored");
            return None;
        }
        let count = active.per_ip.get(&peer.ip()).copied().unwrap_or(0);
        if count >= shared.config.max_transfers_per_client {
            tracing::debug!(%peer, count, "TFTP per-client limit reached; request dropped");
            return None;
        }
        let Ok(permit) = shared.global.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "TFTP transfer limit reached; request dropped");
            return None;
        };
        active.generation += 1;
        let generation = active.generation;
        let heard = Arc::new(AtomicBool::new(false));
        active
            .peers
            .insert(peer, (generation, req.clone(), heard.clone()));
        *active.per_ip.entry(peer.ip()).or_insert(0) += 1;
        Some(Slot {
            shared: shared.clone(),
            peer,
            generation,
            heard,
            _permit: permit,
        })
    }
}

struct Received {
    len: usize,
    from: SocketAddr,
    local: Option<IpAddr>,
    ifindex: Option<u32>,
}

/// Ask for a receive buffer of `bytes`: SO_RCVBUFFORCE when we may (root: beyond
/// net.core.rmem_max), else SO_RCVBUF (capped by the kernel). A smaller buffer than asked only
/// costs retransmissions, so failures are logged and ignored.
fn grow_recv_buffer(sock: &socket2::Socket, bytes: usize) {
    if sock.recv_buffer_size().is_ok_and(|have| have >= bytes) {
        return;
    }
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: the fd is a live socket; the option value is a c_int of the given size.
    let forced = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&value as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    } == 0;
    if !forced && let Err(err) = sock.set_recv_buffer_size(bytes) {
        tracing::debug!(%err, "cannot grow the TFTP listener's receive buffer");
    }
}

fn enable_pktinfo(fd: RawFd) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: fd is a live socket; the option value is a c_int of the given size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_IP,
            libc::IP_PKTINFO,
            (&on as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// One `recvmsg` with the IP_PKTINFO control message (destination address and interface).
fn recvmsg_pktinfo(fd: RawFd, buf: &mut [u8]) -> io::Result<Received> {
    // SAFETY: all-zero is a valid sockaddr_storage and msghdr.
    let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // u64 elements keep the control buffer aligned for cmsghdr.
    let mut control = [0u64; 16];
    // SAFETY: see above.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&mut addr as *mut libc::sockaddr_storage).cast();
    msg.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = size_of_val(&control) as _;
    // SAFETY: msg points at live buffers of the stated sizes for the duration of the call.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut local = None;
    let mut ifindex = None;
    // SAFETY: the kernel filled msg_control/msg_controllen; CMSG_* walk it within bounds.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::IPPROTO_IP && (*cmsg).cmsg_type == libc::IP_PKTINFO {
                let info: libc::in_pktinfo =
                    std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::in_pktinfo>());
                // ipi_spec_dst: the local address the packet was for (the interface address
                // for broadcasts), the right source for the reply.
                local = Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                    info.ipi_spec_dst.s_addr,
                ))));
                ifindex = u32::try_from(info.ipi_ifindex).ok();
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    let from = match libc::c_int::from(addr.ss_family) {
        libc::AF_INET => {
            // SAFETY: ss_family says the storage holds a sockaddr_in.
            let sin: libc::sockaddr_in = unsafe {
                std::ptr::read_unaligned((&addr as *const libc::sockaddr_storage).cast())
            };
            SocketAddr::new(
                IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr))),
                u16::from_be(sin.sin_port),
            )
        }
        _ => return Err(io::Error::other("request from a non-IPv4 address")),
    };
    Ok(Received {
        len: usize::try_from(n).unwrap_or(0),
        from,
        local,
        ifindex,
    })
}

async fn recv_request(socket: &UdpSocket, pktinfo: bool, buf: &mut [u8]) -> io::Result<Received> {
    if pktinfo {
        let fd = socket.as_raw_fd();
        socket
            .async_io(Interest::READABLE, || recvmsg_pktinfo(fd, buf))
            .await
    } else {
        let (len, from) = socket.recv_from(buf).await?;
        Ok(Received {
            len,
            from,
            local: None,
            ifindex: None,
        })
    }
}

/// The MTU of interface `ifindex`, from sysfs.
fn interface_mtu(ifindex: u32) -> Option<u32> {
    let mut name = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: name has IF_NAMESIZE bytes, as if_indextoname requires.
    let ptr = unsafe { libc::if_indextoname(ifindex, name.as_mut_ptr()) };
    if ptr.is_null() {
        return None;
    }
    // SAFETY: if_indextoname wrote a NUL-terminated name into `name`.
    let name = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }
        .to_str()
        .ok()?;
    let text = std::fs::read_to_string(format!("/sys/class/net/{name}/mtu")).ok()?;
    text.trim().parse().ok()
}

/// The blksize cap: the configured one, else the egress MTU minus headers (Q7).
fn blksize_cap(config: &TftpConfig, ifindex: Option<u32>) -> u16 {
    if let Some(max) = config.blksize_max {
        return max.clamp(engine::BLKSIZE_MIN, engine::BLKSIZE_MAX);
    }
    ifindex
        .and_then(interface_mtu)
        .map(|mtu| {
            let cap = mtu.saturating_sub(HEADERS);
            u16::try_from(cap)
                .unwrap_or(engine::BLKSIZE_MAX)
                .clamp(engine::BLKSIZE_MIN, engine::BLKSIZE_MAX)
        })
        .unwrap_or(BLKSIZE_UNKNOWN_MTU)
}

/// Publishes one transfer's events with its MAC and file name.
pub(super) struct Reporter {
    events: EventBus,
    mac: MacAddr,
    file: String,
    peer: SocketAddr,
}

impl Reporter {
    fn emit(&self, stage: BootStage, detail: String) {
        self.events.emit(self.mac, stage, detail);
    }

    pub(super) fn error(&self, reason: &str) {
        self.emit(
            BootStage::TftpError,
            format!("file={} peer={} reason={reason}", self.file, self.peer),
        );
    }

    pub(super) fn event(&self, event: TransferEvent) {
        match event {
            TransferEvent::Oack(opts) => {
                self.emit(BootStage::TftpOack, format!("file={} {opts}", self.file));
            }
            TransferEvent::Probe { tsize, code } => self.emit(
                BootStage::TftpProbe,
                format!("file={} tsize={tsize} client-error={code}", self.file),
            ),
            TransferEvent::Complete { bytes, elapsed } => {
                let secs = elapsed.as_secs_f64();
                let rate = if secs > 0.0 {
                    bytes as f64 / secs / (1024.0 * 1024.0)
                } else {
                    0.0
                };
                self.emit(
                    BootStage::TftpComplete,
                    format!(
                        "file={} bytes={bytes} duration={secs:.3}s rate={rate:.1}MiB/s",
                        self.file
                    ),
                );
            }
            TransferEvent::Failed { reason } => self.error(&reason),
            TransferEvent::Progress { bytes } => {
                tracing::debug!(mac = %self.mac, file = %self.file, bytes, "TFTP progress");
            }
        }
    }
}

async fn open_content(
    shared: &Shared,
    peer: SocketAddr,
    req: &Request,
) -> Result<Content, TftpFileError> {
    let files = shared.files.clone();
    let name = req.filename.clone();
    let file = tokio::task::spawn_blocking(move || files.open(peer, &name))
        .await
        .map_err(|e| TftpFileError::Io(io::Error::other(e)))??;
    let content = shared.cache.load(file).await?;
    if req.mode != Mode::Netascii {
        return Ok(content);
    }
    // Netascii: translate once, up front, so the engine sees plain offsets.
    let raw = match content {
        Content::Memory(b) => b,
        Content::Disk(_, len) if len > NETASCII_MAX_BYTES => {
            return Err(TftpFileError::Denied("file too large for netascii"));
        }
        Content::Disk(file, len) => {
            let size = usize::try_from(len).map_err(io::Error::other)?;
            let bytes = tokio::task::spawn_blocking(move || read_range(&file, 0, size))
                .await
                .map_err(io::Error::other)??;
            Bytes::from(bytes)
        }
    };
    Ok(Content::Memory(Bytes::from(engine::to_netascii(&raw))))
}

/// The asynchronous part of a transfer: announce it, open the file (through the read cache),
/// then hand the data exchange to an event thread.
#[allow(clippy::too_many_arguments)]
async fn start_transfer(
    shared: Arc<Shared>,
    pool: Arc<Pool>,
    req: Request,
    peer: SocketAddr,
    local: IpAddr,
    ifindex: Option<u32>,
    slot: Slot,
    stop: CancellationToken,
) {
    let mac = (shared.mac_lookup)(peer.ip()).unwrap_or_default();
    let report = Reporter {
        events: shared.events.clone(),
        mac,
        file: req.filename.clone(),
        peer,
    };
    let opts = req
        .options
        .iter()
        .map(|(n, v)| format!("{n}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    report.emit(
        BootStage::TftpRequest,
        format!(
            "file={} peer={peer} mode={} options={}",
            req.filename,
            req.mode.as_str(),
            if opts.is_empty() { "-" } else { &opts }
        ),
    );
    // RFC 1350 section 4: the reply comes from a fresh port (our transfer ID), on the address
    // the client talked to.
    let sock = match std::net::UdpSocket::bind(SocketAddr::new(local, 0)) {
        Ok(s) => s,
        Err(err) => {
            report.error(&format!("cannot open a transfer socket on {local}: {err}"));
            return;
        }
    };
    let content = match open_content(&shared, peer, &req).await {
        Ok(c) => c,
        Err(err) => {
            let msg = match &err {
                TftpFileError::Io(_) => "cannot read file".to_string(),
                other => other.to_string(),
            };
            let _ = sock.send_to(&wire::encode_error(err.code(), &msg), peer);
            report.error(&err.to_string());
            return;
        }
    };
    let cfg = &shared.config;
    let limits = Limits {
        blksize_max: blksize_cap(cfg, ifindex),
        windowsize_max: cfg.windowsize_max,
        window_bytes_max: cfg.window_bytes_max,
        timeout: Duration::from_millis(cfg.timeout_ms.max(1)),
        max_retries: cfg.max_retries,
        deadline: Duration::from_secs(cfg.transfer_deadline_secs.max(1)),
        tsize: cfg.tsize,
    };
    let job = Box::new(TransferJob {
        sock,
        peer,
        req,
        content,
        limits,
        report,
        slot,
    });
    if stop.is_cancelled() {
        job.shut_down();
        return;
    }
    // Why event threads rather than a thread or a task per transfer: lock-step speed is one
    // round trip per block. A task pays for the reactor, a wake-up and the scheduler on every
    // ACK (3x slower at blksize 8192 on loopback, BENCHMARKS.md "TFTP"); a thread per
    // transfer is as fast alone, but with a thousand clients every ACK wakes a different
    // sleeping thread, and that cost lands on the client's send (1.9x behind dnsmasq's single
    // poll loop at 1000 clients). An event thread owns its sockets outright: one epoll_wait
    // serves every ready transfer, with no hand-off, and one transfer alone still costs one
    // wake-up per block. See `driver` for the loop.
    if let Err(job) = pool.submit(job) {
        // Every event thread has ended: the server is stopping.
        job.shut_down();
    }
}

#[cfg(test)]
mod tests {
    use std::net::UdpSocket as StdUdp;

    use super::*;
    use crate::tftp::client::{self, ReadSpec};
    use crate::tftp::wire::Packet;

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i % 251) as u8 ^ seed.wrapping_mul(31))
            .collect()
    }

    /// A server on 127.0.0.1 with `threads` event threads over a temporary root holding
    /// `files`; large files are read from disk (no cache), so the read-ahead path runs too.
    async fn start(
        threads: usize,
        files: &[(&str, &[u8])],
    ) -> (SocketAddr, CancellationToken, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        for (name, data) in files {
            std::fs::write(dir.path().join(name), data).unwrap();
        }
        let config = TftpConfig {
            max_transfers: 1024,
            max_transfers_per_client: 1024,
            cache_file_max: 64 << 10,
            ..TftpConfig::default()
        };
        let source = root_source(&config, dir.path().to_path_buf()).unwrap();
        let mut srv = TftpServer::bind(
            config,
            "127.0.0.1:0".parse().unwrap(),
            source,
            EventBus::new(),
            Arc::new(|_| None),
        )
        .await
        .unwrap();
        srv.event_threads = threads;
        let addr = srv.local_addr().unwrap();
        let stop = CancellationToken::new();
        tokio::spawn(srv.run(stop.clone()));
        (addr, stop, dir)
    }

    fn spec(server: SocketAddr, file: &str, blksize: Option<u16>) -> ReadSpec {
        ReadSpec {
            server,
            file: file.into(),
            blksize,
            windowsize: None,
            timeout: Duration::from_secs(1),
            retries: 10,
        }
    }

    /// A client that sends its RRQ and then neither reads nor answers: the server keeps
    /// retransmitting into a socket nobody drains.
    /// A client socket (5 s read timeout) that has sent a read request for `file`.
    fn requesting_client(server: SocketAddr, file: &str, opts: &[(&str, &str)]) -> StdUdp {
        let sock = StdUdp::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        sock.send_to(&wire::encode_request(false, file, "octet", opts), server)
            .unwrap();
        sock
    }

    fn silent_client(server: SocketAddr, file: &str) -> StdUdp {
        requesting_client(server, file, &[("blksize", "1468"), ("windowsize", "64")])
    }

    /// One event thread, three bad clients on it (one silent, one gone so every send draws
    /// ICMP port unreachable, one acknowledging a block every 300 ms): a lock-step download
    /// on the same thread still runs at loopback speed, and the slow transfer is still alive
    /// afterwards.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stalled_clients_do_not_hold_up_a_transfer_on_the_same_event_thread() {
        let big = pattern(4 << 20, 1);
        let small = pattern(1 << 20, 2);
        let (server, stop, _dir) = start(1, &[("big.bin", &big), ("small.bin", &small)]).await;
        let silent = silent_client(server, "big.bin");
        let gone = silent_client(server, "big.bin");
        drop(gone);
        /// Blocks the slow client acknowledges before it is satisfied.
        const SLOW_BLOCKS: u16 = 4;
        let slow = {
            std::thread::spawn(move || {
                let sock = requesting_client(server, "big.bin", &[]);
                let mut buf = [0u8; 600];
                let mut acked = 0u16;
                while acked < SLOW_BLOCKS {
                    let (n, from) = sock.recv_from(&mut buf).unwrap();
                    if let Ok(Packet::Data(block, _)) = wire::parse(&buf[..n])
                        && block == acked.wrapping_add(1)
                    {
                        std::thread::sleep(Duration::from_millis(300));
                        acked = block;
                        sock.send_to(&wire::encode_ack(block), from).unwrap();
                    }
                }
                acked
            })
        };
        // Let the stallers' transfers start and their first windows go out.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let started = std::time::Instant::now();
        let got = client::read(
            &spec(server, "small.bin", Some(1468)),
            "127.0.0.1:0".parse().unwrap(),
        )
        .await
        .unwrap();
        let elapsed = started.elapsed();
        assert_eq!(got.bytes, small.len() as u64);
        assert_eq!(got.checksum, client::checksum(&small));
        assert_eq!(got.timeouts, 0, "no retransmission was needed");
        // 715 lock-step blocks take well under a second on loopback, even in a debug build on
        // a busy machine; a loop that waited on a stalled transfer's socket or timer (1 s)
        // would take minutes.
        assert!(elapsed < Duration::from_secs(5), "took {elapsed:?}");
        // The slow transfer goes on after the fast one (the server answers each of its ACKs).
        let acked = tokio::task::spawn_blocking(move || slow.join().unwrap())
            .await
            .unwrap();
        assert_eq!(acked, SLOW_BLOCKS);
        // The silent client's transfer is alive too: its socket holds the window and the
        // server's retransmissions.
        silent.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 2048];
        let (n, _) = silent.recv_from(&mut buf).unwrap();
        assert!(matches!(wire::parse(&buf[..n]), Ok(Packet::Oack(_))));
        stop.cancel();
    }

    /// Several transfers on one event thread all get the shutdown ERROR.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shutdown_reaches_every_transfer_of_an_event_thread() {
        let big = pattern(1 << 20, 3);
        let (server, stop, _dir) = start(1, &[("big.bin", &big)]).await;
        let clients: Vec<StdUdp> = (0..5)
            .map(|_| {
                let sock = requesting_client(server, "big.bin", &[]);
                let mut buf = [0u8; 600];
                let (n, _) = sock.recv_from(&mut buf).unwrap();
                assert!(matches!(wire::parse(&buf[..n]), Ok(Packet::Data(1, _))));
                sock
            })
            .collect();
        stop.cancel();
        let errors = tokio::task::spawn_blocking(move || {
            clients
                .iter()
                .map(|sock| {
                    let mut buf = [0u8; 600];
                    loop {
                        let (n, _) = sock.recv_from(&mut buf).unwrap();
                        match wire::parse(&buf[..n]).unwrap() {
                            Packet::Data(1, _) => continue,
                            Packet::Error(code, msg) => return (code, msg.to_string()),
                            other => panic!("unexpected {other:?}"),
                        }
                    }
                })
                .collect::<Vec<_>>()
        })
        .await
        .unwrap();
        for error in errors {
            assert_eq!(error, (0, "server shutting down".to_string()));
        }
    }
}
