//! The TFTP event threads: a few OS threads, each with its own epoll instance, each driving
//! many transfers' data exchanges (the listener and admission stay in [`super::server`]).
//!
//! Why not one thread per transfer (the previous design): lock-step is one round trip per
//! block, and with a thousand clients every ACK woke a different sleeping thread; on loopback
//! the receive path runs in the sender's context, so that wake-up was paid by the client's
//! `sendto`, and pxed lost 1.9x to dnsmasq's single poll loop at 1000 clients. Why not tokio
//! tasks: a task pays for the reactor, a waker and the scheduler on every ACK (3x slower at
//! blksize 8192 on loopback, BENCHMARKS.md "TFTP"). An event thread that owns its sockets
//! turns an ACK into `epoll_wait` returning, one `recvfrom` and the sends, with no hand-off,
//! and several ready sockets share one wake-up.
//!
//! Each thread loops: `epoll_wait` (level-triggered) with a timeout from the nearest engine
//! deadline in a heap of (deadline, transfer id), capped at [`CANCEL_POLL`] so a shutdown is
//! seen; one datagram per ready socket, fed to the engine and its outputs sent at once
//! ([`TransferIo`]); then every due timer. New transfers arrive through a channel, with an
//! eventfd registered in the same epoll as the doorbell.
//!
//! epoll is used through `libc` directly rather than `mio`: mio registers edge-triggered only,
//! so every readiness would need one more `recvfrom` to see `EAGAIN` (a system call per ACK
//! in lock-step), and the code needs only create, add, delete and wait.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::burst::{Block, BurstSender};
use super::engine::{Datagram, Limits, Output, Transfer};
use super::fs::Content;
use super::server::{Reporter, Slot};
use super::wire::{self, ErrorCode, Request};

/// Receive buffer of a transfer socket: clients send only ACK and ERROR (at most 4 + 512 bytes).
const TRANSFER_RECV_BYTES: usize = 1024;
/// Distinct strangers answered with ERROR 5 per transfer; beyond that junk is dropped, so a
/// flood cannot make a transfer socket send more than this many packets.
const STRANGERS_ANSWERED: usize = 8;
/// A large file is read in chunks of this size (one pread serves many lock-step blocks).
const READ_AHEAD_BYTES: u64 = 256 << 10;
/// Longest sleep of an event thread before it looks at the shutdown token again.
pub(super) const CANCEL_POLL: Duration = Duration::from_millis(100);
/// Readiness events taken from one `epoll_wait`; more ready sockets wait for the next call
/// (level-triggered, so none is lost), which also fires the timers in between.
const EVENTS_PER_WAIT: usize = 128;
/// epoll token of the wake-up eventfd; transfer ids count up from 0 and never reach it.
const WAKE_TOKEN: u64 = u64::MAX;
/// What a client is told when the server stops under its transfer.
const SHUTDOWN_MESSAGE: &str = "server shutting down";

/// How many event threads a server runs: one per CPU the process may use (at least one).
/// Transfers are spread over them, so a single thread never becomes the ceiling on a machine
/// with idle cores; more threads than CPUs would only bring back the wake-ups this design
/// removes.
pub(super) fn event_threads() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
}

/// Everything a transfer's data exchange needs, handed to an event thread.
pub(super) struct TransferJob {
    pub sock: UdpSocket,
    pub peer: SocketAddr,
    pub req: Request,
    pub content: Content,
    pub limits: Limits,
    pub report: Reporter,
    /// Freed (with the transfer's place in the limits) when the transfer ends.
    pub slot: Slot,
}

impl TransferJob {
    /// Tell the client (and the event stream) that the server stopped under the transfer.
    pub fn shut_down(self) {
        tell_shutdown(&self.sock, self.peer, &self.report);
    }
}

fn tell_shutdown(sock: &UdpSocket, peer: SocketAddr, report: &Reporter) {
    let pkt = wire::encode_error(ErrorCode::Undefined, SHUTDOWN_MESSAGE);
    let _ = sock.send_to(&pkt, peer);
    report.error(SHUTDOWN_MESSAGE);
}

/// The event threads of one server. Dropping it lets each thread end once its transfers have.
pub(super) struct Pool {
    threads: Vec<Handle>,
    /// Where the search for the least loaded thread starts, so ties go round-robin.
    next: AtomicUsize,
}

/// The submitting side of one event thread.
struct Handle {
    jobs: mpsc::Sender<Box<TransferJob>>,
    wake: Arc<Wakeup>,
    /// Transfers submitted to the thread and not yet ended.
    load: Arc<AtomicUsize>,
}

impl Pool {
    /// Start `threads` event threads (at least one) that stop when `stop` is cancelled.
    pub fn start(threads: usize, stop: &CancellationToken) -> io::Result<Pool> {
        let mut handles = Vec::new();
        for i in 0..threads.max(1) {
            let (tx, rx) = mpsc::channel();
            let wake = Arc::new(Wakeup::new()?);
            let load = Arc::new(AtomicUsize::new(0));
            let epoll = Epoll::new()?;
            epoll.add(wake.fd.as_raw_fd(), WAKE_TOKEN)?;
            let event_loop = EventLoop {
                epoll,
                wake: wake.clone(),
                jobs: rx,
                load: load.clone(),
                stop: stop.clone(),
                transfers: HashMap::new(),
                timers: BinaryHeap::new(),
                next_id: 0,
                buf: [0; TRANSFER_RECV_BYTES],
            };
            std::thread::Builder::new()
                .name(format!("tftp-events-{i}"))
                .spawn(move || event_loop.run())?;
            handles.push(Handle {
                jobs: tx,
                wake,
                load,
            });
        }
        Ok(Pool {
            threads: handles,
            next: AtomicUsize::new(0),
        })
    }

    /// Hand `job` to the least loaded event thread. Gives the job back when no thread takes
    /// it any more (they have stopped). Boxed: the job is a few hundred bytes.
    pub fn submit(&self, job: Box<TransferJob>) -> Result<(), Box<TransferJob>> {
        let n = self.threads.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut order: Vec<&Handle> = (0..n)
            .filter_map(|i| self.threads.get((start + i) % n))
            .collect();
        // Stable: among equally loaded threads the rotation above decides.
        order.sort_by_key(|h| h.load.load(Ordering::Relaxed));
        let mut job = job;
        for handle in order {
            handle.load.fetch_add(1, Ordering::Relaxed);
            match handle.jobs.send(job) {
                Ok(()) => {
                    handle.wake.wake();
                    return Ok(());
                }
                // That thread has ended (shutdown, or a panic): try the next.
                Err(mpsc::SendError(back)) => {
                    handle.load.fetch_sub(1, Ordering::Relaxed);
                    job = back;
                }
            }
        }
        Err(job)
    }

    /// Make every thread look at its channel and the shutdown token now.
    pub fn wake_all(&self) {
        for handle in &self.threads {
            handle.wake.wake();
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // The channels are closing: let idle threads notice and end.
        self.wake_all();
    }
}

/// Decrements its thread's load when the transfer ends.
struct LoadGuard(Arc<AtomicUsize>);

impl Drop for LoadGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One transfer on an event thread.
struct Running {
    transfer: Transfer,
    io: TransferIo,
    report: Reporter,
    slot: Slot,
    /// Strangers answered with ERROR 5 so far.
    strangers: Vec<SocketAddr>,
    /// The earliest timer entry of this transfer in the heap; entries that differ are stale.
    queued: Option<Instant>,
    _load: LoadGuard,
}

struct EventLoop {
    epoll: Epoll,
    wake: Arc<Wakeup>,
    jobs: mpsc::Receiver<Box<TransferJob>>,
    load: Arc<AtomicUsize>,
    stop: CancellationToken,
    transfers: HashMap<u64, Running>,
    /// (deadline, transfer id), earliest first, with lazy deletion: an entry is acted on only
    /// if it is still its transfer's `queued` one. A later deadline does not add an entry; the
    /// earlier one fires, finds the engine's deadline moved, and queues that. So the heap holds
    /// about one entry per transfer, not one per ACK.
    timers: BinaryHeap<Reverse<(Instant, u64)>>,
    next_id: u64,
    buf: [u8; TRANSFER_RECV_BYTES],
}

impl EventLoop {
    fn run(mut self) {
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; EVENTS_PER_WAIT];
        let mut closed = false;
        loop {
            if self.stop.is_cancelled() {
                self.shut_down();
                return;
            }
            if closed && self.transfers.is_empty() {
                return;
            }
            let timeout = self.wait_ms(Instant::now());
            let ready = match self.epoll.wait(&mut events, timeout) {
                Ok(n) => n,
                // A signal (the privilege drop signals every thread): look again.
                Err(err) if err.kind() == io::ErrorKind::Interrupted => 0,
                Err(err) => {
                    // Cannot happen with a valid epoll fd and buffer; do not spin on it, and
                    // keep firing timers so the transfers still end.
                    tracing::error!(%err, "TFTP epoll_wait failed");
                    std::thread::sleep(CANCEL_POLL);
                    0
                }
            };
            if ready == 0 {
                // A timeout: also notice a pool that went away without ringing (if starting
                // the threads failed half-way); a try_recv costs next to nothing.
                closed |= self.take_jobs();
            }
            for ev in events.iter().take(ready) {
                let token = ev.u64;
                if token == WAKE_TOKEN {
                    self.wake.drain();
                    closed |= self.take_jobs();
                } else {
                    self.on_readable(token);
                }
            }
            self.fire_timers(Instant::now());
        }
    }

    /// Milliseconds until the nearest timer (rounded up, so the wait ends after it), at most
    /// [`CANCEL_POLL`].
    fn wait_ms(&self, now: Instant) -> libc::c_int {
        let until = self
            .timers
            .peek()
            .map_or(CANCEL_POLL, |Reverse((at, _))| {
                at.saturating_duration_since(now)
            })
            .min(CANCEL_POLL);
        libc::c_int::try_from(until.as_micros().div_ceil(1000)).unwrap_or(libc::c_int::MAX)
    }

    /// Start every transfer waiting in the channel; true once the pool is gone.
    fn take_jobs(&mut self) -> bool {
        loop {
            match self.jobs.try_recv() {
                Ok(job) => self.start(job),
                Err(mpsc::TryRecvError::Empty) => return false,
                Err(mpsc::TryRecvError::Disconnected) => return true,
            }
        }
    }

    fn start(&mut self, job: Box<TransferJob>) {
        let load = LoadGuard(self.load.clone());
        let TransferJob {
            sock,
            peer,
            req,
            content,
            limits,
            report,
            slot,
        } = *job;
        // Why non-blocking, sends included: a blocking UDP send sleeps while the socket's send
        // buffer (SO_SNDBUF, ~208 KiB) is full of datagrams the device has not released yet.
        // On loopback and veth they are released at once, and a window (64 KiB by default)
        // fits; but `window_bytes_max` is configurable, and a real NIC frees them only at TX
        // completion: a slow link, a shaping qdisc, pause frames or a wedged driver can keep
        // the buffer full for milliseconds to seconds. With one thread per transfer that
        // stalled only that transfer; here it would stall every transfer on the thread. So a
        // full buffer (EAGAIN) counts as a datagram lost on the wire: the engine's timer
        // resends it, as it would any loss. Receives never wait either (level-triggered epoll
        // said the socket is readable).
        if let Err(err) = sock.set_nonblocking(true) {
            report.error(&format!(
                "cannot make the transfer socket non-blocking: {err}"
            ));
            return;
        }
        let (transfer, first) = Transfer::start(&req, content.len(), &limits, Instant::now());
        let mut running = Running {
            transfer,
            io: TransferIo {
                sock,
                peer,
                content,
                sender: BurstSender::new(),
                ahead: Vec::new(),
                ahead_at: 0,
            },
            report,
            slot,
            strangers: Vec::new(),
            queued: None,
            _load: load,
        };
        if let Err(err) = running.io.apply(first, &running.report) {
            running.report.error(&format!("send failed: {err}"));
            return;
        }
        if running.transfer.is_done() {
            return;
        }
        let id = self.next_id;
        self.next_id += 1;
        if let Err(err) = self.epoll.add(running.io.sock.as_raw_fd(), id) {
            running
                .report
                .error(&format!("cannot watch the transfer socket: {err}"));
            return;
        }
        schedule(&mut self.timers, id, &mut running);
        self.transfers.insert(id, running);
    }

    /// One datagram from transfer `id`'s socket (level-triggered: more wake the next wait).
    fn on_readable(&mut self, id: u64) {
        let Some(running) = self.transfers.get_mut(&id) else {
            // Ended earlier in this batch.
            return;
        };
        let outs = match running.io.sock.recv_from(&mut self.buf) {
            Ok((n, from)) if from == running.io.peer => match self.buf.get(..n) {
                Some(bytes) => {
                    running.slot.mark_heard();
                    running.transfer.on_packet(bytes, Instant::now())
                }
                None => Vec::new(),
            },
            Ok((_, from)) => {
                // RFC 1350 section 4: a packet from an unknown TID gets ERROR 5 and the
                // transfer goes on; each stranger is answered once.
                if !running.strangers.contains(&from)
                    && running.strangers.len() < STRANGERS_ANSWERED
                {
                    running.strangers.push(from);
                    let pkt = wire::encode_error(ErrorCode::UnknownTid, "unknown transfer ID");
                    let _ = running.io.sock.send_to(&pkt, from);
                }
                Vec::new()
            }
            // Nothing after all (WouldBlock), an interrupted call, or an ICMP error from an
            // earlier send (the client is gone): the engine's timer decides what happens.
            Err(_) => Vec::new(),
        };
        let sent = running.io.apply(outs, &running.report);
        self.after_step(id, sent);
    }

    /// Pop every due timer entry and run the timers still valid. Entries queued meanwhile are
    /// in the future (the engine moves its deadline past `now`), so this ends.
    fn fire_timers(&mut self, now: Instant) {
        while let Some(Reverse((at, id))) = self.timers.peek().copied() {
            if at > now {
                break;
            }
            self.timers.pop();
            let Some(running) = self.transfers.get_mut(&id) else {
                continue;
            };
            if running.queued != Some(at) {
                // Superseded by an earlier entry of the same transfer.
                continue;
            }
            running.queued = None;
            let mut sent = Ok(());
            if running.transfer.next_deadline().is_some_and(|d| d <= now) {
                let outs = running.transfer.on_timer(now);
                sent = running.io.apply(outs, &running.report);
            }
            self.after_step(id, sent);
        }
    }

    /// After the engine ran for transfer `id`: end it (send failed, or done), or queue its
    /// next deadline.
    fn after_step(&mut self, id: u64, sent: io::Result<()>) {
        let Some(running) = self.transfers.get_mut(&id) else {
            return;
        };
        match sent {
            Ok(()) if !running.transfer.is_done() => {
                schedule(&mut self.timers, id, running);
                return;
            }
            Ok(()) => {}
            Err(err) => running.report.error(&format!("send failed: {err}")),
        }
        // Ended: stop watching the socket; dropping `running` closes it and frees the slot.
        if let Some(running) = self.transfers.remove(&id) {
            let _ = self.epoll.delete(running.io.sock.as_raw_fd());
        }
    }

    /// The server stops: every transfer (running or not yet started) gets an ERROR.
    fn shut_down(&mut self) {
        for (_, running) in self.transfers.drain() {
            tell_shutdown(&running.io.sock, running.io.peer, &running.report);
        }
        while let Ok(job) = self.jobs.try_recv() {
            let _load = LoadGuard(self.load.clone());
            job.shut_down();
        }
    }
}

/// Queue the engine's next deadline for transfer `id` unless an entry at or before it is
/// queued already.
fn schedule(timers: &mut BinaryHeap<Reverse<(Instant, u64)>>, id: u64, running: &mut Running) {
    if let Some(at) = running.transfer.next_deadline()
        && running.queued.is_none_or(|q| at < q)
    {
        running.queued = Some(at);
        timers.push(Reverse((at, id)));
    }
}

/// The sending side of one transfer: the socket, the content and the read-ahead buffer.
struct TransferIo {
    sock: UdpSocket,
    peer: SocketAddr,
    content: Content,
    /// Sends each window's blocks in as few system calls as the path allows.
    sender: BurstSender,
    /// Read-ahead of a large file: `ahead` holds the bytes from offset `ahead_at`.
    ahead: Vec<u8>,
    ahead_at: u64,
}

/// A send that found the socket's buffer full (non-blocking, see [`EventLoop::start`]) lost
/// its datagrams, as the wire might have; the engine's timer resends them.
fn lossy(sent: io::Result<()>) -> io::Result<()> {
    match sent {
        Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
            tracing::trace!("TFTP send buffer full; datagrams dropped");
            Ok(())
        }
        other => other,
    }
}

impl TransferIo {
    /// Send the engine's datagrams (reading a window of a large file in one go) and report
    /// its events.
    ///
    /// A large file's pread runs on the event thread: a read that misses the page cache holds
    /// up the thread's other transfers for one disk read of [`READ_AHEAD_BYTES`] (milliseconds),
    /// at most once per that many bytes of a transfer; files up to the cache limit are served
    /// from memory.
    fn apply(&mut self, outs: Vec<Output>, report: &Reporter) -> io::Result<()> {
        // A large file: make sure the span of this batch's DATA blocks is in the read-ahead
        // buffer, refilling it with one pread of at least READ_AHEAD_BYTES.
        if let Content::Disk(file, file_len) = &self.content {
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
                    let payload = match &self.content {
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
                    lossy(self.sender.send(&self.sock, self.peer, &blocks))?;
                    blocks.clear();
                    lossy(self.sock.send_to(&b, self.peer).map(drop))?;
                }
                Output::Event(e) => {
                    lossy(self.sender.send(&self.sock, self.peer, &blocks))?;
                    blocks.clear();
                    report.event(e);
                }
            }
        }
        lossy(self.sender.send(&self.sock, self.peer, &blocks))
    }
}

fn slice(bytes: &[u8], offset: u64, len: usize) -> Option<&[u8]> {
    let start = usize::try_from(offset).ok()?;
    bytes.get(start..start.checked_add(len)?)
}

/// An epoll instance (level-triggered, readable interest only).
struct Epoll {
    fd: OwnedFd,
}

impl Epoll {
    fn new() -> io::Result<Epoll> {
        // SAFETY: epoll_create1 takes no pointers.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a descriptor just created and owned by nothing else.
        Ok(Epoll {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Watch `fd` for readability; its events carry `token`.
    fn add(&self, fd: RawFd, token: u64) -> io::Result<()> {
        let mut event = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: token,
        };
        // SAFETY: both descriptors are live; `event` is a valid epoll_event for the call.
        let rc =
            unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut event) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Stop watching `fd`.
    fn delete(&self, fd: RawFd) -> io::Result<()> {
        // SAFETY: both descriptors are live; EPOLL_CTL_DEL ignores the event pointer (null is
        // allowed since Linux 2.6.9).
        let rc = unsafe {
            libc::epoll_ctl(
                self.fd.as_raw_fd(),
                libc::EPOLL_CTL_DEL,
                fd,
                std::ptr::null_mut(),
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Wait up to `timeout_ms` for readiness; the number of entries of `events` filled.
    fn wait(&self, events: &mut [libc::epoll_event], timeout_ms: libc::c_int) -> io::Result<usize> {
        let max = libc::c_int::try_from(events.len()).unwrap_or(libc::c_int::MAX);
        // SAFETY: `events` has room for `max` entries, which the kernel fills at most.
        let n =
            unsafe { libc::epoll_wait(self.fd.as_raw_fd(), events.as_mut_ptr(), max, timeout_ms) };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }
}

/// An eventfd that wakes an event thread from `epoll_wait`.
struct Wakeup {
    fd: OwnedFd,
}

impl Wakeup {
    fn new() -> io::Result<Wakeup> {
        // SAFETY: eventfd takes no pointers.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a descriptor just created and owned by nothing else.
        Ok(Wakeup {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes the 8 bytes of a live u64 to a live eventfd. EAGAIN (the counter at
        // its maximum) means a wake-up is pending anyway.
        let _ = unsafe {
            libc::write(
                self.fd.as_raw_fd(),
                (&one as *const u64).cast(),
                size_of::<u64>(),
            )
        };
    }

    /// Reset the counter so the eventfd is not readable until the next [`Wakeup::wake`].
    fn drain(&self) {
        let mut count: u64 = 0;
        // SAFETY: reads 8 bytes into a live u64 from a live, non-blocking eventfd.
        let _ = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                (&mut count as *mut u64).cast(),
                size_of::<u64>(),
            )
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_send_buffer_counts_as_loss_and_other_errors_do_not() {
        assert!(lossy(Err(io::ErrorKind::WouldBlock.into())).is_ok());
        assert!(lossy(Err(io::Error::from_raw_os_error(libc::EMSGSIZE))).is_err());
        assert!(lossy(Ok(())).is_ok());
    }

    #[test]
    fn at_least_one_event_thread() {
        assert!(event_threads() >= 1);
    }

    /// The doorbell: a wake makes the eventfd readable through epoll, a drain clears it.
    #[test]
    fn wakeup_rings_through_epoll_until_drained() {
        let epoll = Epoll::new().unwrap();
        let wake = Wakeup::new().unwrap();
        epoll.add(wake.fd.as_raw_fd(), WAKE_TOKEN).unwrap();
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 4];
        assert_eq!(epoll.wait(&mut events, 0).unwrap(), 0);
        wake.wake();
        wake.wake();
        assert_eq!(epoll.wait(&mut events, 1000).unwrap(), 1);
        let token = events[0].u64;
        assert_eq!(token, WAKE_TOKEN);
        wake.drain();
        assert_eq!(epoll.wait(&mut events, 0).unwrap(), 0);
    }
}
