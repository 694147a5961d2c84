//! A small TFTP read client (RFC 1350, 2347, 2348, 7440) for load generation and tests.
//!
//! [`Reader`] is one read as a state machine without I/O (datagram or timeout in, what to send
//! out); [`read`] drives one on a tokio socket (the flood test, the server's tests), and
//! `examples/tftp_load.rs` (the benchmark's client, which must not be the bottleneck) drives a
//! thousand from one epoll loop. It counts bytes and folds them into a checksum instead of
//! storing the file.

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;

use super::wire::{self, Packet};

/// Receive buffer: the largest DATA packet (RFC 2348 blksize 65464 + 4-byte header).
pub const RECV_BYTES: usize = 65468 + 4;
/// Kernel bytes charged per queued datagram beyond its payload (sk_buff and allocation
/// rounding), used to size the socket buffer for a whole window.
const SKB_OVERHEAD: usize = 1024;
/// Socket receive buffer asked for at most; Linux caps it at net.core.rmem_max anyway.
const RCVBUF_MAX: usize = 16 << 20;

/// What one read asks for.
#[derive(Clone, Debug)]
pub struct ReadSpec {
    /// Server request address.
    pub server: SocketAddr,
    /// File name.
    pub file: String,
    /// RFC 2348 blksize to ask for (`None`: no option, 512).
    pub blksize: Option<u16>,
    /// RFC 7440 windowsize to ask for (`None`: lock-step).
    pub windowsize: Option<u16>,
    /// Retransmission timeout.
    pub timeout: Duration,
    /// Retransmissions before giving up.
    pub retries: u32,
}

/// What one read got.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadResult {
    /// Bytes received.
    pub bytes: u64,
    /// CRC-32 of the bytes ([`checksum`]), to compare with the file's.
    pub checksum: u32,
    /// Wall time from RRQ to the last ACK.
    pub elapsed: Duration,
    /// Blocks received again or out of order.
    pub duplicates: u64,
    /// Our retransmissions after a timeout.
    pub timeouts: u64,
    /// The blksize in force (512 without an OACK).
    pub blksize: u16,
    /// The windowsize in force (1 without an OACK granting one).
    pub windowsize: u16,
}

/// The checksum a read reports for `bytes`: CRC-32 (IEEE). crc32fast runs it with carry-less
/// multiplication at many bytes per cycle; the FNV-1a loop it replaced (one multiply per byte)
/// took a fifth of the benchmark client's CPU at 1000 concurrent reads.
pub fn checksum(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes)
}

/// What the caller does after feeding a [`Reader`].
#[derive(Debug)]
pub enum Step {
    /// Send [`Reader::outgoing`] to this address.
    Send(SocketAddr),
    /// Nothing to send; wait for the next datagram or [`Reader::deadline`].
    Wait,
    /// The last block arrived: send [`Reader::outgoing`] (its ACK) to this address, and the
    /// read is complete ([`Reader::result`]).
    Done(SocketAddr),
    /// The read failed: the server's ERROR packet (as `io::ErrorKind::Other` with its text) or
    /// no answer after the retries.
    Failed(io::Error),
}

/// One read as a state machine without I/O: datagrams and the clock go in, what to send comes
/// out. [`read`] drives it on a tokio socket; the benchmark client drives a thousand of them
/// from one epoll loop.
#[derive(Debug)]
pub struct Reader {
    server: SocketAddr,
    timeout: Duration,
    retries: u32,
    started: Instant,
    blksize: usize,
    window: u32,
    peer: Option<SocketAddr>,
    /// The packet to send again on timeout: the RRQ, then the latest ACK.
    last_sent: Vec<u8>,
    expected: u16,
    in_window: u32,
    tries: u32,
    gap_acked: bool,
    /// The retransmission timer runs from the last progress, not the last packet: stale
    /// retransmissions arriving must not keep a stalled transfer from retransmitting its ACK.
    progress: Instant,
    crc: crc32fast::Hasher,
    result: ReadResult,
    done: bool,
}

impl Reader {
    /// A read of `spec` starting at `now`; send [`Reader::outgoing`] (the RRQ) to the server.
    pub fn start(spec: &ReadSpec, now: Instant) -> Reader {
        let mut opts: Vec<(&str, String)> = Vec::new();
        if let Some(b) = spec.blksize {
            opts.push(("blksize", b.to_string()));
        }
        if let Some(w) = spec.windowsize {
            opts.push(("windowsize", w.to_string()));
        }
        let opt_refs: Vec<(&str, &str)> = opts.iter().map(|(n, v)| (*n, v.as_str())).collect();
        Reader {
            server: spec.server,
            timeout: spec.timeout,
            retries: spec.retries,
            started: now,
            blksize: 512,
            window: 1,
            peer: None,
            last_sent: wire::encode_request(false, &spec.file, "octet", &opt_refs),
            expected: 1,
            in_window: 0,
            tries: 0,
            gap_acked: false,
            progress: now,
            crc: crc32fast::Hasher::new(),
            result: ReadResult {
                bytes: 0,
                checksum: 0,
                elapsed: Duration::ZERO,
                duplicates: 0,
                timeouts: 0,
                blksize: 512,
                windowsize: 1,
            },
            done: false,
        }
    }

    /// The packet to send (the RRQ, then the latest ACK).
    pub fn outgoing(&self) -> &[u8] {
        &self.last_sent
    }

    /// Where the RRQ goes.
    pub fn server(&self) -> SocketAddr {
        self.server
    }

    /// When [`Reader::on_timeout`] is due.
    pub fn deadline(&self) -> Instant {
        self.progress + self.timeout
    }

    /// What the read got (complete after [`Step::Done`]).
    pub fn result(&self) -> &ReadResult {
        &self.result
    }

    /// Nothing came for a whole timeout: resend, or give up after the retries.
    pub fn on_timeout(&mut self, now: Instant) -> Step {
        self.tries += 1;
        self.progress = now;
        self.gap_acked = false;
        if self.tries > self.retries {
            return Step::Failed(io::Error::new(io::ErrorKind::TimedOut, "no answer"));
        }
        self.result.timeouts += 1;
        // RFC 7440 section 4: on a timeout the receiver acknowledges the last block received
        // in order, so the sender resumes right after it. Repeating the window's previous ACK
        // instead would be ignored as stale and make the sender resend blocks we already have,
        // losing the same tail again.
        if self.expected > 1 || self.result.bytes > 0 {
            self.last_sent = wire::encode_ack(self.expected.wrapping_sub(1));
        }
        self.in_window = 0;
        Step::Send(self.peer.unwrap_or(self.server))
    }

    /// A datagram arrived from `from`.
    pub fn on_datagram(&mut self, bytes: &[u8], from: SocketAddr, now: Instant) -> Step {
        if self.peer.is_some_and(|p| p != from) {
            return Step::Wait;
        }
        match wire::parse(bytes) {
            Ok(Packet::Oack(options)) if self.peer.is_none() => {
                self.peer = Some(from);
                self.progress = now;
                for (name, value) in options {
                    match name.as_str() {
                        "blksize" => self.blksize = value.parse().unwrap_or(self.blksize),
                        "windowsize" => self.window = value.parse().unwrap_or(self.window),
                        _ => {}
                    }
                }
                self.last_sent = wire::encode_ack(0);
                Step::Send(from)
            }
            Ok(Packet::Data(block, payload)) => {
                self.peer = Some(from);
                self.tries = 0;
                if block != self.expected {
                    self.result.duplicates += 1;
                    // A block from behind is a stale retransmission: answering each one would
                    // make the server resend whole windows (Sorcerer's Apprentice). On a gap
                    // ahead, RFC 7440 section 4: ACK the last block received in order, once
                    // until the transfer moves on.
                    let ahead = block.wrapping_sub(self.expected) < 0x8000;
                    if ahead && !self.gap_acked {
                        self.last_sent = wire::encode_ack(self.expected.wrapping_sub(1));
                        self.in_window = 0;
                        self.gap_acked = true;
                        return Step::Send(from);
                    }
                    return Step::Wait;
                }
                self.gap_acked = false;
                self.progress = now;
                self.result.bytes += payload.len() as u64;
                self.crc.update(payload);
                self.in_window += 1;
                self.expected = self.expected.wrapping_add(1);
                let last = payload.len() < self.blksize;
                if last {
                    self.done = true;
                    self.result.checksum = self.crc.clone().finalize();
                    self.result.elapsed = now.duration_since(self.started);
                    self.result.blksize = u16::try_from(self.blksize).unwrap_or(u16::MAX);
                    self.result.windowsize = u16::try_from(self.window).unwrap_or(u16::MAX);
                    self.last_sent = wire::encode_ack(block);
                    return Step::Done(from);
                }
                if self.in_window >= self.window {
                    self.last_sent = wire::encode_ack(block);
                    self.in_window = 0;
                    return Step::Send(from);
                }
                Step::Wait
            }
            Ok(Packet::Error(code, msg)) => {
                Step::Failed(io::Error::other(format!("TFTP error {code}: {msg}")))
            }
            _ => Step::Wait,
        }
    }

    /// True once the last block arrived.
    pub fn is_done(&self) -> bool {
        self.done
    }
}

/// Size a read socket's receive buffer for two windows of what `spec` asks for.
///
/// RFC 7440 section 4 puts a whole window on the wire at once: a socket buffer smaller than
/// the window drops its tail every time (the Linux default, ~208 KiB, holds fewer than 16
/// blocks of 8192 on loopback), and the transfer crawls on timeouts.
pub fn size_receive_buffer(sock: socket2::SockRef<'_>, spec: &ReadSpec) {
    let window_bytes = usize::from(spec.windowsize.unwrap_or(1))
        * (usize::from(spec.blksize.unwrap_or(512)) + SKB_OVERHEAD);
    let want = (2 * window_bytes).min(RCVBUF_MAX);
    if sock.recv_buffer_size().is_ok_and(|have| have < want) {
        // Best effort: the kernel caps the value at rmem_max; a smaller buffer only costs speed.
        let _ = sock.set_recv_buffer_size(want);
    }
}

/// Read one file on a tokio socket bound to `bind`. Errors: the server's ERROR packet (as
/// `io::ErrorKind::Other` with its text), or a timeout after `retries` retransmissions.
pub async fn read(spec: &ReadSpec, bind: SocketAddr) -> io::Result<ReadResult> {
    let sock = UdpSocket::bind(bind).await?;
    size_receive_buffer(socket2::SockRef::from(&sock), spec);
    let mut reader = Reader::start(spec, Instant::now());
    sock.send_to(reader.outgoing(), reader.server()).await?;
    let mut buf = vec![0u8; RECV_BYTES];
    loop {
        let step = match tokio::time::timeout_at(reader.deadline().into(), sock.recv_from(&mut buf))
            .await
        {
            Ok(received) => {
                let (n, from) = received?;
                let Some(bytes) = buf.get(..n) else { continue };
                reader.on_datagram(bytes, from, Instant::now())
            }
            Err(_) => reader.on_timeout(Instant::now()),
        };
        match step {
            Step::Send(to) => {
                sock.send_to(reader.outgoing(), to).await?;
            }
            Step::Wait => {}
            Step::Done(to) => {
                sock.send_to(reader.outgoing(), to).await?;
                return Ok(reader.result().clone());
            }
            Step::Failed(err) => return Err(err),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tftp::wire::{ErrorCode, encode_ack, encode_data, encode_error, encode_oack};

    const SERVER: &str = "10.0.0.1:69";
    const PEER: &str = "10.0.0.1:40000";

    fn spec(blksize: Option<u16>, windowsize: Option<u16>) -> ReadSpec {
        ReadSpec {
            server: SERVER.parse().unwrap(),
            file: "f".into(),
            blksize,
            windowsize,
            timeout: Duration::from_secs(1),
            retries: 2,
        }
    }

    fn sends_ack(r: &Reader, step: Step, block: u16) {
        assert!(
            matches!(step, Step::Send(to) if to == PEER.parse().unwrap()),
            "{step:?}"
        );
        assert_eq!(r.outgoing(), encode_ack(block));
    }

    #[test]
    fn lock_step_read_acks_every_block_and_checks_the_bytes() {
        let t0 = Instant::now();
        let mut r = Reader::start(&spec(None, None), t0);
        assert!(r.outgoing().starts_with(&[0, 1, b'f', 0]));
        let peer: SocketAddr = PEER.parse().unwrap();
        let full = [7u8; 512];
        let step = r.on_datagram(&encode_data(1, &full), peer, t0);
        sends_ack(&r, step, 1);
        let step = r.on_datagram(&encode_data(2, b"end"), peer, t0 + Duration::from_millis(5));
        assert!(matches!(step, Step::Done(to) if to == peer), "{step:?}");
        assert_eq!(r.outgoing(), encode_ack(2));
        assert!(r.is_done());
        let mut all = full.to_vec();
        all.extend_from_slice(b"end");
        assert_eq!(r.result().bytes, 515);
        assert_eq!(r.result().checksum, checksum(&all));
        assert_eq!(r.result().elapsed, Duration::from_millis(5));
    }

    #[test]
    fn a_window_is_acked_at_its_end_and_a_gap_once() {
        let t0 = Instant::now();
        let mut r = Reader::start(&spec(Some(8), Some(4)), t0);
        let peer: SocketAddr = PEER.parse().unwrap();
        let oack = encode_oack(&[
            ("blksize".into(), "8".into()),
            ("windowsize".into(), "2".into()),
        ]);
        let step = r.on_datagram(&oack, peer, t0);
        sends_ack(&r, step, 0);
        let b = [1u8; 8];
        // Window of 2 (the server granted less than asked): no ACK after the first block.
        assert!(matches!(
            r.on_datagram(&encode_data(1, &b), peer, t0),
            Step::Wait
        ));
        let step = r.on_datagram(&encode_data(2, &b), peer, t0);
        sends_ack(&r, step, 2);
        // Block 3 lost: 4 and 5 are a gap ahead; ACK 2 once, not per block.
        let step = r.on_datagram(&encode_data(4, &b), peer, t0);
        sends_ack(&r, step, 2);
        assert!(matches!(
            r.on_datagram(&encode_data(5, &b), peer, t0),
            Step::Wait
        ));
        // A stale block from behind is not answered.
        assert!(matches!(
            r.on_datagram(&encode_data(1, &b), peer, t0),
            Step::Wait
        ));
        assert_eq!(r.result().duplicates, 3);
        assert_eq!(r.result().bytes, 16);
    }

    #[test]
    fn timeouts_resend_the_last_in_order_ack_then_give_up() {
        let t0 = Instant::now();
        let mut r = Reader::start(&spec(None, None), t0);
        let rrq = r.outgoing().to_vec();
        // No answer to the RRQ: the RRQ again, to the server's port.
        let step = r.on_timeout(r.deadline());
        assert!(matches!(step, Step::Send(to) if to == SERVER.parse().unwrap()));
        assert_eq!(r.outgoing(), rrq);
        let peer: SocketAddr = PEER.parse().unwrap();
        let t1 = r.deadline();
        let step = r.on_datagram(&encode_data(1, &[0; 512]), peer, t1);
        sends_ack(&r, step, 1);
        assert_eq!(r.deadline(), t1 + Duration::from_secs(1));
        let step = r.on_timeout(r.deadline());
        sends_ack(&r, step, 1);
        let step = r.on_timeout(r.deadline());
        sends_ack(&r, step, 1);
        let step = r.on_timeout(r.deadline());
        assert!(
            matches!(&step, Step::Failed(e) if e.kind() == io::ErrorKind::TimedOut),
            "{step:?}"
        );
        assert_eq!(r.result().timeouts, 3);
    }

    #[test]
    fn strangers_are_ignored_and_an_error_ends_the_read() {
        let t0 = Instant::now();
        let mut r = Reader::start(&spec(None, None), t0);
        let peer: SocketAddr = PEER.parse().unwrap();
        let step = r.on_datagram(&encode_data(1, &[0; 512]), peer, t0);
        sends_ack(&r, step, 1);
        let stranger: SocketAddr = "10.0.0.9:40000".parse().unwrap();
        assert!(matches!(
            r.on_datagram(&encode_data(2, b"x"), stranger, t0),
            Step::Wait
        ));
        assert!(matches!(r.on_datagram(b"\0\x09junk", peer, t0), Step::Wait));
        let err = encode_error(ErrorCode::DiskFull, "full");
        match r.on_datagram(&err, peer, t0) {
            Step::Failed(e) => assert!(e.to_string().contains("full"), "{e}"),
            other => panic!("{other:?}"),
        }
    }
}
