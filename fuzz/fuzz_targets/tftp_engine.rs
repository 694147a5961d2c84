//! The TFTP transfer state machine with virtual time: a request with fuzzed options and file
//! length, then a sequence of client datagrams (well-formed ACKs and ERRORs near the window,
//! or raw bytes) and timer ticks.
//!
//! Checked: no panic; every DATA block lies inside the content, is a full block except the
//! last, and carries the block number of its offset (mod 2^16); one step never sends more than
//! a window (or one OACK/ERROR); nothing is sent after the transfer ends; a completed transfer
//! had every block sent; the deadline is never in the past of the last step for a live
//! transfer; and with a client that acknowledges everything, the transfer completes.
#![no_main]

use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use pxed::tftp::engine::{Datagram, Limits, Output, Transfer, TransferEvent};
use pxed::tftp::wire::{self, Packet};

#[derive(Arbitrary, Debug)]
struct Input {
    netascii: bool,
    options: Vec<(u8, String)>,
    len: u32,
    blksize_max: u16,
    windowsize_max: u16,
    max_retries: u8,
    /// `[tftp] timeout_ms` and `transfer_deadline_secs` as configured (any u64).
    timeout_ms: u64,
    deadline_secs: u64,
    steps: Vec<Step>,
}

#[derive(Arbitrary, Debug)]
enum Step {
    /// ACK of the highest block sent so far plus a small signed offset.
    AckNear(i8),
    Ack(u16),
    Error(u16),
    Raw(Vec<u8>),
    /// Advance time by this many milliseconds (times 10) and tick the timer.
    Tick(u16),
    /// Jump to the engine's own deadline and tick.
    TickAtDeadline,
}

const NAMES: &[&str] = &["blksize", "tsize", "timeout", "windowsize", "BlkSize", "x"];

struct Seen {
    blksize: u64,
    window: u64,
    len: u64,
    last_block: u64,
    /// Highest block number (mod 2^16) sent, for AckNear.
    highest: u16,
    sent_last: bool,
}

impl Seen {
    fn check(&mut self, out: &[Output], was_done: bool) -> bool {
        let mut sends = 0u64;
        let mut finished = false;
        for o in out {
            match o {
                Output::Send(d) => {
                    assert!(!was_done, "sent after the transfer ended: {d:?}");
                    sends += 1;
                    if let Datagram::Data { block, offset, len } = d {
                        let len = *len as u64;
                        assert!(len <= self.blksize, "block longer than blksize");
                        assert!(offset + len <= self.len, "DATA past the end of the content");
                        assert_eq!(offset % self.blksize, 0, "unaligned block");
                        let abs = offset / self.blksize + 1;
                        assert!(abs <= self.last_block);
                        assert_eq!(*block, (abs & 0xffff) as u16, "block number");
                        if abs < self.last_block {
                            assert_eq!(len, self.blksize, "short block before the last");
                        } else {
                            assert!(len < self.blksize, "last block must be short");
                            self.sent_last = true;
                        }
                        self.highest = *block;
                    }
                }
                Output::Event(TransferEvent::Complete { bytes, .. }) => {
                    assert_eq!(*bytes, self.len);
                    assert!(self.sent_last, "complete without sending the last block");
                    finished = true;
                }
                Output::Event(TransferEvent::Failed { .. } | TransferEvent::Probe { .. }) => {
                    finished = true;
                }
                Output::Event(_) => {}
            }
        }
        assert!(
            sends <= self.window.max(1) + 1,
            "{sends} datagrams in one step"
        );
        finished
    }
}

fuzz_target!(|input: Input| {
    let options: Vec<(&str, &str)> = input
        .options
        .iter()
        .take(8)
        .map(|(n, v)| (NAMES[usize::from(*n) % NAMES.len()], v.as_str()))
        .collect();
    let mode = if input.netascii { "netascii" } else { "octet" };
    let Ok(Packet::Request(req)) = wire::parse(&wire::encode_request(false, "f", mode, &options))
    else {
        return;
    };
    let limits = Limits {
        blksize_max: input.blksize_max,
        windowsize_max: input.windowsize_max,
        // As the server builds them from the config (src/tftp/server.rs).
        timeout: Duration::from_millis(input.timeout_ms.max(1)),
        max_retries: u32::from(input.max_retries % 8),
        deadline: Duration::from_secs(input.deadline_secs.max(1)),
    };
    // Lengths up to a few blocks past 65535 blocks of the smallest size, to cross the wrap.
    let len = u64::from(input.len) % (70_000 * 8);
    let t0 = Instant::now();
    let mut now = t0;
    let (mut t, first) = Transfer::start(&req, len, &limits, now);
    let n = t.negotiated().clone();
    assert!(n.blksize >= 8 && n.windowsize >= 1);
    if n.oack.iter().any(|(name, _)| name == "blksize") {
        assert!(
            n.blksize <= limits.blksize_max.max(8),
            "granted more than the cap"
        );
    } else {
        assert_eq!(n.blksize, 512, "RFC 1350 block size without the option");
    }
    let blksize = u64::from(n.blksize);
    let mut seen = Seen {
        blksize,
        window: u64::from(n.windowsize),
        len,
        last_block: len / blksize + 1,
        highest: 0,
        sent_last: false,
    };
    let mut done = seen.check(&first, false);
    assert_eq!(done, t.is_done());
    for step in input.steps.iter().take(256) {
        let was_done = t.is_done();
        let out = match step {
            Step::AckNear(d) => {
                let b = seen.highest.wrapping_add_signed(i16::from(*d));
                t.on_packet(&wire::encode_ack(b), now)
            }
            Step::Ack(b) => t.on_packet(&wire::encode_ack(*b), now),
            Step::Error(c) => {
                let mut e = 5u16.to_be_bytes().to_vec();
                e.extend_from_slice(&c.to_be_bytes());
                e.push(0);
                t.on_packet(&e, now)
            }
            Step::Raw(bytes) => t.on_packet(bytes, now),
            Step::Tick(ms) => {
                now += Duration::from_millis(u64::from(*ms) * 10);
                t.on_timer(now)
            }
            Step::TickAtDeadline => {
                if let Some(d) = t.next_deadline() {
                    now = now.max(d);
                }
                t.on_timer(now)
            }
        };
        done |= seen.check(&out, was_done);
        assert_eq!(done, t.is_done(), "is_done disagrees with the events");
        if t.is_done() {
            assert!(t.next_deadline().is_none());
        } else {
            assert!(
                t.next_deadline().is_some(),
                "a live transfer without a timer"
            );
        }
    }
    // A perfect client from here on: ACK the highest block sent, or tick when nothing is
    // outstanding. Bounded: the file has at most len/8 + 1 blocks.
    let mut guard = 0u64;
    while !t.is_done() {
        guard += 1;
        assert!(
            guard < 200_000,
            "transfer does not finish with a perfect client"
        );
        let was_done = t.is_done();
        let ack = if seen.sent_last || seen.highest != 0 || guard > 1 {
            seen.highest
        } else {
            0
        };
        let out = t.on_packet(&wire::encode_ack(ack), now);
        let progressed = !out.is_empty();
        done |= seen.check(&out, was_done);
        if !progressed && !t.is_done() {
            if let Some(d) = t.next_deadline() {
                now = now.max(d);
            }
            let out = t.on_timer(now);
            done |= seen.check(&out, false);
        }
    }
    assert!(done);
});
