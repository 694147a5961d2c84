//! A small TFTP read client (RFC 1350, 2347, 2348, 7440) for load generation: many transfers
//! in one process, one socket each, no per-block allocation. Used by the flood test and by
//! `examples/tftp_load.rs` (the benchmark's client, which must not be the bottleneck).
//!
//! It counts bytes and folds them into a checksum instead of storing the file.

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;

use super::wire::{self, Packet};

/// Receive buffer: the largest DATA packet (RFC 2348 blksize 65464 + 4-byte header).
const RECV_BYTES: usize = 65468 + 4;
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

/// Read one file. Errors: the server's ERROR packet (as `io::ErrorKind::Other` with its text),
/// or a timeout after `retries` retransmissions.
pub async fn read(spec: &ReadSpec, bind: SocketAddr) -> io::Result<ReadResult> {
    let sock = UdpSocket::bind(bind).await?;
    // RFC 7440 section 4 puts a whole window on the wire at once: a socket buffer smaller than
    // the window drops its tail every time (the Linux default, ~208 KiB, holds fewer than 16
    // blocks of 8192 on loopback), and the transfer crawls on timeouts. Ask for room for two
    // windows of what we request.
    let window_bytes = usize::from(spec.windowsize.unwrap_or(1))
        * (usize::from(spec.blksize.unwrap_or(512)) + SKB_OVERHEAD);
    let want = (2 * window_bytes).min(RCVBUF_MAX);
    let sref = socket2::SockRef::from(&sock);
    if sref.recv_buffer_size().is_ok_and(|have| have < want) {
        // Best effort: the kernel caps the value at rmem_max; a smaller buffer only costs speed.
        let _ = sref.set_recv_buffer_size(want);
    }
    let mut opts: Vec<(&str, String)> = Vec::new();
    if let Some(b) = spec.blksize {
        opts.push(("blksize", b.to_string()));
    }
    if let Some(w) = spec.windowsize {
        opts.push(("windowsize", w.to_string()));
    }
    let opt_refs: Vec<(&str, &str)> = opts.iter().map(|(n, v)| (*n, v.as_str())).collect();
    let rrq = wire::encode_request(false, &spec.file, "octet", &opt_refs);
    let started = Instant::now();
    let mut buf = vec![0u8; RECV_BYTES];
    let mut blksize = 512usize;
    let mut window = 1u32;
    let mut peer: Option<SocketAddr> = None;
    // The packet to send again on timeout: the RRQ, then the latest ACK.
    let mut last_sent = rrq;
    sock.send_to(&last_sent, spec.server).await?;
    let mut expected: u16 = 1;
    let mut in_window = 0u32;
    let mut result = ReadResult {
        bytes: 0,
        checksum: 0,
        elapsed: Duration::ZERO,
        duplicates: 0,
        timeouts: 0,
        blksize: 512,
        windowsize: 1,
    };
    let mut tries = 0u32;
    let mut gap_acked = false;
    let mut crc = crc32fast::Hasher::new();
    let mut progress = Instant::now();
    loop {
        // The timer runs from the last progress, not the last packet: stale retransmissions
        // arriving must not keep a stalled transfer from retransmitting its ACK.
        let wait = spec.timeout.saturating_sub(progress.elapsed());
        let received = tokio::time::timeout(wait, sock.recv_from(&mut buf)).await;
        let (n, from) = match received {
            Ok(r) => r?,
            Err(_) => {
                tries += 1;
                progress = Instant::now();
                gap_acked = false;
                if tries > spec.retries {
                    return Err(io::Error::new(io::ErrorKind::TimedOut, "no answer"));
                }
                result.timeouts += 1;
                // RFC 7440 section 4: on a timeout the receiver acknowledges the last block
                // received in order, so the sender resumes right after it. Repeating the
                // window's previous ACK instead would be ignored as stale and make the sender
                // resend blocks we already have, losing the same tail again.
                if expected > 1 || result.bytes > 0 {
                    last_sent = wire::encode_ack(expected.wrapping_sub(1));
                }
                let to = peer.unwrap_or(spec.server);
                sock.send_to(&last_sent, to).await?;
                in_window = 0;
                continue;
            }
        };
        if peer.is_some_and(|p| p != from) {
            continue;
        }
        let Some(bytes) = buf.get(..n) else { continue };
        match wire::parse(bytes) {
            Ok(Packet::Oack(options)) if peer.is_none() => {
                peer = Some(from);
                progress = Instant::now();
                for (name, value) in options {
                    match name.as_str() {
                        "blksize" => blksize = value.parse().unwrap_or(blksize),
                        "windowsize" => window = value.parse().unwrap_or(window),
                        _ => {}
                    }
                }
                last_sent = wire::encode_ack(0);
                sock.send_to(&last_sent, from).await?;
            }
            Ok(Packet::Data(block, payload)) => {
                peer = Some(from);
                tries = 0;
                if block != expected {
                    result.duplicates += 1;
                    // A block from behind is a stale retransmission: answering each one would
                    // make the server resend whole windows (Sorcerer's Apprentice). On a gap
                    // ahead, RFC 7440 section 4: ACK the last block received in order, once
                    // until the transfer moves on.
                    let ahead = block.wrapping_sub(expected) < 0x8000;
                    if ahead && !gap_acked {
                        last_sent = wire::encode_ack(expected.wrapping_sub(1));
                        sock.send_to(&last_sent, from).await?;
                        in_window = 0;
                        gap_acked = true;
                    }
                    continue;
                }
                gap_acked = false;
                progress = Instant::now();
                result.bytes += payload.len() as u64;
                crc.update(payload);
                in_window += 1;
                let last = payload.len() < blksize;
                if last || in_window >= window {
                    last_sent = wire::encode_ack(block);
                    sock.send_to(&last_sent, from).await?;
                    in_window = 0;
                }
                expected = expected.wrapping_add(1);
                if last {
                    result.checksum = crc.finalize();
                    result.elapsed = started.elapsed();
                    result.blksize = u16::try_from(blksize).unwrap_or(u16::MAX);
                    result.windowsize = u16::try_from(window).unwrap_or(u16::MAX);
                    return Ok(result);
                }
            }
            Ok(Packet::Error(code, msg)) => {
                return Err(io::Error::other(format!("TFTP error {code}: {msg}")));
            }
            _ => {}
        }
    }
}
