//! The TFTP socket driver: one listener (a tokio task), and per transfer an ephemeral socket
//! (RFC 1350 section 4: the server's transfer ID is a new port) driven by its own OS thread
//! that blocks in `recvfrom` between ACKs (see [`start_transfer`] for why).
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
use std::os::unix::fs::FileExt;
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use super::TftpConfig;
use super::burst::{Block, BurstSender};
use super::engine::{self, Datagram, Limits, Output, RequestDecision, Transfer, TransferEvent};
use super::fs::{Content, FileSource, ReadCache, RootSource, TftpFileError, read_range};
use super::wire::{self, ErrorCode, Mode, Request};
use crate::events::EventBus;
use crate::mac::MacAddr;
use crate::stage::BootStage;

pub use crate::mac::MacLookup;

/// Receive buffer of a transfer socket: clients send only ACK and ERROR (at most 4 + 512 bytes).
const TRANSFER_RECV_BYTES: usize = 1024;
/// Receive buffer of the listener: requests are at most [`wire::MAX_REQUEST_BYTES`]; one more
/// byte tells an oversized request from a maximal one.
const LISTENER_RECV_BYTES: usize = wire::MAX_REQUEST_BYTES + 1;
/// Distinct strangers answered with ERROR 5 per transfer; beyond that junk is dropped, so a
/// flood cannot make a transfer socket send more than this many packets.
const STRANGERS_ANSWERED: usize = 8;
/// Blksize cap when the egress MTU is unknown: Ethernet 1500 - IP 20 - UDP 8 - TFTP 4.
const BLKSIZE_UNKNOWN_MTU: u16 = 1468;
/// IPv4 + UDP + TFTP header bytes subtracted from the MTU.
const HEADERS: u32 = 32;
/// A large file is read in chunks of this size (one pread serves many lock-step blocks).
const READ_AHEAD_BYTES: u64 = 256 << 10;
/// Receive buffer asked for on the listener: a boot storm (or the benchmark's 1000 clients) sends
/// its RRQs at once, and the default ~208 KiB holds only ~170 of them; every one dropped costs
/// its client a retransmission timeout. 4 MiB holds several thousand.
const LISTENER_RCVBUF_BYTES: usize = 4 << 20;
/// Stack of a transfer thread: its loop keeps a 1 KiB receive buffer and calls the engine and
/// the event bus, far below this; thousands of transfers must not each reserve the default 2 MiB.
const TRANSFER_STACK_BYTES: usize = 256 << 10;
/// Longest sleep of a transfer thread before it looks at the shutdown token again.
const CANCEL_POLL: Duration = Duration::from_millis(100);
/// Netascii translates the whole file in memory; text files beyond this are refused.
const NETASCII_MAX_BYTES: u64 = 16 << 20;

/// A bound TFTP server, ready to [`run`](TftpServer::run).
pub struct TftpServer {
    socket: UdpSocket,
    pktinfo: bool,
    shared: Arc<Shared>,
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
struct Slot {
    shared: Arc<Shared>,
    peer: SocketAddr,
    generation: u64,
    /// Set once the client sent anything to the transfer socket.
    heard: Arc<AtomicBool>,
    _permit: OwnedSemaphorePermit,
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
        tracing::info!(%bound, pktinfo = self.pktinfo, "TFTP listening");
        loop {
            let received = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
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
                        shared, req, rx.from, local, rx.ifindex, slot, stop,
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
struct Reporter {
    events: EventBus,
    mac: MacAddr,
    file: String,
    peer: SocketAddr,
}

impl Reporter {
    fn emit(&self, stage: BootStage, detail: String) {
        self.events.emit(self.mac, stage, detail);
    }

    fn error(&self, reason: &str) {
        self.emit(
            BootStage::TftpError,
            format!("file={} peer={} reason={reason}", self.file, self.peer),
        );
    }

    fn event(&self, event: TransferEvent) {
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

/// Everything a transfer's data thread needs, moved into it.
struct TransferJob {
    sock: std::net::UdpSocket,
    peer: SocketAddr,
    req: Request,
    content: Content,
    limits: Limits,
    report: Reporter,
    stop: CancellationToken,
    /// Freed (with the transfer's place in the limits) when the thread ends.
    slot: Slot,
}

/// The asynchronous part of a transfer: announce it, open the file (through the read cache),
/// then hand the data exchange to its own thread.
async fn start_transfer(
    shared: Arc<Shared>,
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
    let job = TransferJob {
        sock,
        peer,
        req,
        content,
        limits,
        report,
        stop,
        slot,
    };
    // Lock-step speed is one round trip per block: a thread that sleeps in `recvfrom` wakes
    // straight into the next send, where a task pays for epoll, a wake-up and the scheduler on
    // every ACK (3x slower at blksize 8192 on loopback, BENCHMARKS.md "TFTP"). The number of
    // threads is bounded by the transfer limits the slot holds.
    let spawned = std::thread::Builder::new()
        .name("tftp-transfer".into())
        .stack_size(TRANSFER_STACK_BYTES)
        .spawn(move || run_transfer(job));
    if let Err(err) = spawned {
        // The job (socket, slot) was dropped with the closure; the client retries its RRQ.
        tracing::warn!(%peer, %err, "cannot start a TFTP transfer thread");
    }
}

/// One transfer's data exchange, on its own thread: blocking receive with a timeout taken from
/// the engine's next deadline, pread for large files, the engine deciding everything.
fn run_transfer(job: TransferJob) {
    let TransferJob {
        sock,
        peer,
        req,
        content,
        limits,
        report,
        stop,
        slot,
    } = job;
    let (mut transfer, first) = Transfer::start(&req, content.len(), &limits, Instant::now());
    let mut io = TransferIo {
        sock: &sock,
        peer,
        content: &content,
        sender: BurstSender::new(),
        ahead: Vec::new(),
        ahead_at: 0,
    };
    if let Err(err) = io.apply(first, &report) {
        report.error(&format!("send failed: {err}"));
        return;
    }
    let mut buf = [0u8; TRANSFER_RECV_BYTES];
    let mut strangers: Vec<SocketAddr> = Vec::new();
    let mut wait_set: Option<Duration> = None;
    while !transfer.is_done() {
        if stop.is_cancelled() {
            let pkt = wire::encode_error(ErrorCode::Undefined, "server shutting down");
            let _ = sock.send_to(&pkt, peer);
            report.error("server shutting down");
            return;
        }
        // Sleep until the engine's deadline, but at most CANCEL_POLL so a shutdown is seen.
        // Whole milliseconds, so the socket option changes only when the wait really does
        // (in steady lock-step the deadline is a full timeout away: always CANCEL_POLL).
        let now = Instant::now();
        let until = transfer
            .next_deadline()
            .map_or(CANCEL_POLL, |d| d.saturating_duration_since(now));
        let wait = Duration::from_millis(
            u64::try_from(until.as_millis())
                .unwrap_or(u64::MAX)
                .saturating_add(1),
        )
        .min(CANCEL_POLL);
        if wait_set != Some(wait) {
            if let Err(err) = sock.set_read_timeout(Some(wait)) {
                report.error(&format!("cannot set the receive timeout: {err}"));
                return;
            }
            wait_set = Some(wait);
        }
        let mut outs = match sock.recv_from(&mut buf) {
            Ok((n, from)) if from == peer => match buf.get(..n) {
                Some(bytes) => {
                    slot.heard.store(true, Ordering::Relaxed);
                    transfer.on_packet(bytes, Instant::now())
                }
                None => Vec::new(),
            },
            Ok((_, from)) => {
                // RFC 1350 section 4: a packet from an unknown TID gets ERROR 5 and the
                // transfer goes on; each stranger is answered once.
                if !strangers.contains(&from) && strangers.len() < STRANGERS_ANSWERED {
                    strangers.push(from);
                    let pkt = wire::encode_error(ErrorCode::UnknownTid, "unknown transfer ID");
                    let _ = sock.send_to(&pkt, from);
                }
                Vec::new()
            }
            // A timeout (WouldBlock/TimedOut), an interrupted call, or an ICMP error from an
            // earlier send (the client is gone): the engine's timer decides what happens.
            Err(_) => Vec::new(),
        };
        // The timer is checked after every receive, not only on timeouts: a peer (or a
        // stranger) sending a steady stream of junk must not keep it from firing.
        let now = Instant::now();
        if transfer.next_deadline().is_some_and(|d| now >= d) {
            outs.extend(transfer.on_timer(now));
        }
        if let Err(err) = io.apply(outs, &report) {
            report.error(&format!("send failed: {err}"));
            return;
        }
    }
}

struct TransferIo<'a> {
    sock: &'a std::net::UdpSocket,
    peer: SocketAddr,
    content: &'a Content,
    /// Sends each window's blocks in as few system calls as the path allows.
    sender: BurstSender,
    /// Read-ahead of a large file: `ahead` holds the bytes from offset `ahead_at`.
    ahead: Vec<u8>,
    ahead_at: u64,
}

impl TransferIo<'_> {
    /// Send the engine's datagrams (reading a window of a large file in one go) and report
    /// its events.
    fn apply(&mut self, outs: Vec<Output>, report: &Reporter) -> io::Result<()> {
        // A large file: make sure the span of this batch's DATA blocks is in the read-ahead
        // buffer, refilling it with one pread of at least READ_AHEAD_BYTES.
        if let Content::Disk(file, file_len) = self.content {
            let span = outs
                .iter()
                .filter_map(|o| match o {
                    Output::Send(Datagram::Data { offset, len, .. }) => {
                        Some((*offset, *offset + *len as u64))
                    }
                    _ => None,
                })
                .reduce(|(a, b), (c, d)| (a.min(c), b.max(d)));
            if let Some((start, end)) = span
                && !(self.ahead_at <= start && end <= self.ahead_at + self.ahead.len() as u64)
            {
                let stop = end.max(start + READ_AHEAD_BYTES).min(*file_len).max(end);
                let size = usize::try_from(stop - start).map_err(io::Error::other)?;
                self.ahead.resize(size, 0);
                // A file that shrank is an error, not short data.
                file.read_exact_at(&mut self.ahead, start)?;
                self.ahead_at = start;
            }
        }
        // Consecutive DATA blocks (a window) leave together; anything else flushes them first,
        // so the order on the wire is the engine's.
        let mut blocks: Vec<Block<'_>> = Vec::new();
        for out in outs {
            match out {
                Output::Send(Datagram::Data { block, offset, len }) => {
                    let payload = match self.content {
                        Content::Memory(b) => slice(b, offset, len),
                        Content::Disk(..) => offset
                            .checked_sub(self.ahead_at)
                            .and_then(|o| slice(&self.ahead, o, len)),
                    }
                    .ok_or_else(|| io::Error::other("block outside the file"))?;
                    blocks.push(Block {
                        number: block,
                        payload,
                    });
                }
                Output::Send(Datagram::Bytes(b)) => {
                    self.sender.send(self.sock, self.peer, &blocks)?;
                    blocks.clear();
                    self.sock.send_to(&b, self.peer)?;
                }
                Output::Event(e) => {
                    self.sender.send(self.sock, self.peer, &blocks)?;
                    blocks.clear();
                    report.event(e);
                }
            }
        }
        self.sender.send(self.sock, self.peer, &blocks)
    }
}

fn slice(bytes: &[u8], offset: u64, len: usize) -> Option<&[u8]> {
    let start = usize::try_from(offset).ok()?;
    bytes.get(start..start.checked_add(len)?)
}
