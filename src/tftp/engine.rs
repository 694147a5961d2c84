//! The sans-IO TFTP read engine. Input: a datagram or a timer tick, with the current time.
//! Output: datagrams to send, the next deadline, and transfer events. No sockets, no clock, no
//! file access: DATA packets are described as (block, offset, length) into the content and the
//! server fills in the bytes, so the engine never waits on a disk.

use std::time::{Duration, Instant};

use super::wire::{self, ErrorCode, Mode, Packet, Request};

/// RFC 2348 section 2: the valid blksize range.
pub const BLKSIZE_MIN: u16 = 8;
/// RFC 2348 section 2: the valid blksize range.
pub const BLKSIZE_MAX: u16 = 65464;
/// RFC 1350: the block size when the client negotiates none.
pub const BLKSIZE_DEFAULT: u16 = 512;
/// Largest window we ever grant: ACK numbers inside one window must stay unambiguous mod 2^16,
/// and a burst larger than this only fills socket buffers.
pub const WINDOW_HARD_MAX: u16 = 1024;
/// Default cap on the bytes of one window (windowsize x blksize). A window leaves in one burst
/// and must fit the client's receive buffer whole: Linux gives a socket ~208 KiB by default and
/// charges up to twice the payload per datagram, so 8192 x 16 already overflows it and the same
/// tail of every window is lost again. 64 KiB allows 8 blocks of 8192, 44 of 1468, 64 of 512.
pub const WINDOW_BYTES_DEFAULT: u32 = 64 << 10;
/// RFC 2349 section 2: the valid timeout option range, in seconds.
pub const TIMEOUT_OPTION_RANGE: std::ops::RangeInclusive<u64> = 1..=255;
/// Progress events are produced at most this often per transfer.
pub const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// Longest retransmission timeout used, whatever [`Limits`] says: the largest RFC 2349 timeout
/// option. It also keeps `now + timeout` from overflowing `Instant` (found by fuzzing).
pub const TIMEOUT_MAX: Duration = Duration::from_secs(255);
/// Longest whole-transfer deadline used: a day is far beyond any boot file, and keeps
/// `now + deadline` from overflowing `Instant` for a huge configured value (found by fuzzing).
pub const DEADLINE_MAX: Duration = Duration::from_secs(86_400);

/// Retransmission and size limits for one transfer, resolved by the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest blksize granted (the server passes the egress MTU minus 32 or the configured cap).
    pub blksize_max: u16,
    /// Largest windowsize granted (RFC 7440).
    pub windowsize_max: u16,
    /// Largest window in bytes (windowsize x blksize) granted; see [`WINDOW_BYTES_DEFAULT`].
    pub window_bytes_max: u32,
    /// Retransmission timeout when the client does not ask for one.
    pub timeout: Duration,
    /// Retransmissions of the same packet before giving up.
    pub max_retries: u32,
    /// The whole transfer must finish within this.
    pub deadline: Duration,
    /// Answer the tsize option (RFC 2349); off only to reproduce a server without it.
    pub tsize: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            blksize_max: 1468,
            windowsize_max: 64,
            window_bytes_max: WINDOW_BYTES_DEFAULT,
            timeout: Duration::from_secs(1),
            max_retries: 5,
            deadline: Duration::from_secs(600),
            tsize: true,
        }
    }
}

/// A datagram for the server to send to the transfer's peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Datagram {
    /// DATA `block` carrying content bytes `offset .. offset + len`.
    Data {
        /// Block number on the wire (wraps to 0 after 65535).
        block: u16,
        /// Offset in the content.
        offset: u64,
        /// Payload length (less than blksize only for the last block).
        len: usize,
    },
    /// A complete packet (OACK or ERROR).
    Bytes(Vec<u8>),
}

/// Something that happened to a transfer, for the event stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TransferEvent {
    /// Options were acknowledged; the text lists them (`blksize=1468 tsize=1234`).
    Oack(String),
    /// The client read the size and aborted, as EDK2 does before the real read (quirk Q6).
    Probe {
        /// The tsize we announced.
        tsize: u64,
        /// The client's ERROR code (8 from EDK2).
        code: u16,
    },
    /// The last block was acknowledged.
    Complete {
        /// Content bytes sent.
        bytes: u64,
        /// From request to final ACK.
        elapsed: Duration,
    },
    /// The transfer ended without delivering the file.
    Failed {
        /// Why.
        reason: String,
    },
    /// Bytes acknowledged so far (at most once per [`PROGRESS_EVERY`]).
    Progress {
        /// Acknowledged content bytes.
        bytes: u64,
    },
}

/// One step's work for the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    /// Send this to the peer.
    Send(Datagram),
    /// Publish this.
    Event(TransferEvent),
}

/// What to do with a datagram that arrived at the request port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestDecision {
    /// A read request: resolve the file, then [`Transfer::start`].
    Read(Request),
    /// Answer with this ERROR packet and do nothing else.
    Refuse {
        /// The ERROR packet.
        packet: Vec<u8>,
        /// Why, for the log.
        reason: String,
    },
    /// Drop silently (never answer an ERROR, an ACK or DATA sent to the request port).
    Ignore(String),
}

/// Classify a datagram that arrived at the request port (69).
pub fn on_request_packet(bytes: &[u8]) -> RequestDecision {
    match wire::parse(bytes) {
        Ok(Packet::Request(req)) if req.write => RequestDecision::Refuse {
            packet: wire::encode_error(
                ErrorCode::AccessViolation,
                "write requests are not accepted: pxed serves files read-only",
            ),
            reason: format!("write request for `{}` refused", req.filename),
        },
        Ok(Packet::Request(req)) if req.mode == Mode::Mail => RequestDecision::Refuse {
            packet: wire::encode_error(ErrorCode::IllegalOperation, "mail mode is not supported"),
            reason: "mail mode".into(),
        },
        Ok(Packet::Request(req)) => RequestDecision::Read(req),
        // RFC 1350 section 7: ERROR is never answered; stray ACK/DATA/OACK belong to no transfer.
        Ok(other) => {
            RequestDecision::Ignore(format!("non-request packet at the request port: {other:?}"))
        }
        Err(wire::WireError::Short(_)) => RequestDecision::Ignore("runt packet".into()),
        Err(err) => RequestDecision::Refuse {
            packet: wire::encode_error(
                ErrorCode::IllegalOperation,
                &format!("malformed request: {err}"),
            ),
            reason: format!("malformed request: {err}"),
        },
    }
}

/// Options granted to a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Negotiated {
    /// Block size in use.
    pub blksize: u16,
    /// Window size in use (1 = lock-step RFC 1350).
    pub windowsize: u16,
    /// Retransmission timeout.
    pub timeout: Duration,
    /// Whether the OACK carries tsize.
    pub tsize: bool,
    /// The OACK options, in the client's order; empty means no OACK.
    pub oack: Vec<(String, String)>,
}

fn number(value: &str) -> Option<u64> {
    // Only plain decimal digits; "+5", " 5" and overflowing values are not numbers.
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse().ok()
}

/// RFC 2347 section 2-3: grant only options the client asked for and we support, in its order.
pub fn negotiate(req: &Request, len: u64, limits: &Limits) -> Negotiated {
    let mut n = Negotiated {
        blksize: BLKSIZE_DEFAULT,
        windowsize: 1,
        timeout: limits.timeout.min(TIMEOUT_MAX),
        tsize: false,
        oack: Vec::new(),
    };
    let blk_cap = limits.blksize_max.clamp(BLKSIZE_MIN, BLKSIZE_MAX);
    let win_cap = limits.windowsize_max.clamp(1, WINDOW_HARD_MAX);
    // The windowsize answer depends on the blksize granted, whatever the options' order.
    let mut windowsize_at: Option<usize> = None;
    for (name, value) in &req.options {
        // RFC 2349 section 4: the client sends tsize 0 in a RRQ, but the value carries no
        // meaning and atftp sends the word `enable`; any value asks for the size.
        if name == "tsize" {
            // Octet mode only: in netascii the size on the wire is not the file size. An empty
            // file gets no tsize: curl 7.88 rejects `tsize 0` in an OACK as invalid.
            if limits.tsize && req.mode == Mode::Octet && len > 0 {
                n.tsize = true;
                n.oack.push((name.clone(), len.to_string()));
            }
            continue;
        }
        let Some(v) = number(value) else { continue };
        match name.as_str() {
            // RFC 2348: a value outside 8..=65464 is not a valid request; ignore it. A larger
            // request than we allow is answered with our maximum (the server may lower it).
            "blksize" if (u64::from(BLKSIZE_MIN)..=u64::from(BLKSIZE_MAX)).contains(&v) => {
                let granted = u16::try_from(v).unwrap_or(BLKSIZE_MAX).min(blk_cap);
                n.blksize = granted;
                n.oack.push((name.clone(), granted.to_string()));
            }
            // RFC 2349 section 3: the server must use the timeout or not acknowledge it.
            "timeout" if TIMEOUT_OPTION_RANGE.contains(&v) => {
                n.timeout = Duration::from_secs(v);
                n.oack.push((name.clone(), v.to_string()));
            }
            // RFC 7440 section 3: 1..=65535; we may answer with a smaller window. Netascii stays
            // lock-step.
            "windowsize" if req.mode == Mode::Octet && (1..=65535).contains(&v) => {
                n.windowsize = u16::try_from(v).unwrap_or(u16::MAX).min(win_cap);
                windowsize_at = Some(n.oack.len());
                n.oack.push((name.clone(), String::new()));
            }
            _ => {}
        }
    }
    // RFC 7440 section 3: the server may answer a smaller window. Keep one window's bytes
    // within the budget (at least one block: lock-step always works).
    let by_bytes = limits.window_bytes_max / u32::from(n.blksize.max(BLKSIZE_MIN));
    n.windowsize = n
        .windowsize
        .min(u16::try_from(by_bytes).unwrap_or(u16::MAX))
        .max(1);
    if let Some((_, value)) = windowsize_at.and_then(|i| n.oack.get_mut(i)) {
        *value = n.windowsize.to_string();
    }
    n
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// OACK sent; waiting for ACK 0 (RFC 2347 section 3).
    AwaitOackAck,
    /// Sending data; waiting for ACKs.
    Sending,
    /// Finished, successfully or not.
    Done,
}

/// One read transfer.
#[derive(Debug)]
pub struct Transfer {
    opts: Negotiated,
    len: u64,
    /// Absolute number of the final block (always exists: a file of k*blksize bytes ends with an
    /// empty block, RFC 1350 section 6).
    last_block: u64,
    state: State,
    /// Highest absolute block acknowledged (0 before any).
    acked: u64,
    /// Highest absolute block sent.
    sent: u64,
    retries: u32,
    max_retries: u32,
    timer: Option<Instant>,
    started: Instant,
    deadline: Instant,
    last_progress: Instant,
}

impl Transfer {
    /// Start serving `req` whose content is `len` bytes (after netascii translation).
    pub fn start(
        req: &Request,
        len: u64,
        limits: &Limits,
        now: Instant,
    ) -> (Transfer, Vec<Output>) {
        let opts = negotiate(req, len, limits);
        let blksize = u64::from(opts.blksize.max(BLKSIZE_MIN));
        let mut t = Transfer {
            last_block: len / blksize + 1,
            opts,
            len,
            state: State::Sending,
            acked: 0,
            sent: 0,
            retries: 0,
            max_retries: limits.max_retries,
            timer: None,
            started: now,
            deadline: now + limits.deadline.min(DEADLINE_MAX),
            last_progress: now,
        };
        let mut out = Vec::new();
        if t.opts.oack.is_empty() {
            t.send_window(now, &mut out);
        } else {
            t.state = State::AwaitOackAck;
            let text = t
                .opts
                .oack
                .iter()
                .map(|(n, v)| format!("{n}={v}"))
                .collect::<Vec<_>>()
                .join(" ");
            out.push(Output::Send(Datagram::Bytes(wire::encode_oack(
                &t.opts.oack,
            ))));
            out.push(Output::Event(TransferEvent::Oack(text)));
            t.timer = Some(now + t.opts.timeout);
        }
        (t, out)
    }

    /// The options in force.
    pub fn negotiated(&self) -> &Negotiated {
        &self.opts
    }

    /// True once the transfer has ended (the server closes the socket).
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// When to call [`Transfer::on_timer`] next.
    pub fn next_deadline(&self) -> Option<Instant> {
        if self.is_done() {
            return None;
        }
        self.timer.map(|t| t.min(self.deadline))
    }

    fn blksize(&self) -> u64 {
        u64::from(self.opts.blksize.max(BLKSIZE_MIN))
    }

    /// RFC 7440 section 4: send up to windowsize blocks after the last acknowledged one.
    fn send_window(&mut self, now: Instant, out: &mut Vec<Output>) {
        let first = self.acked + 1;
        let last = (self.acked + u64::from(self.opts.windowsize.max(1))).min(self.last_block);
        let blksize = self.blksize();
        for block in first..=last {
            let offset = (block - 1) * blksize;
            let len = self.len.saturating_sub(offset).min(blksize);
            out.push(Output::Send(Datagram::Data {
                // Q9: block numbers wrap to 0 after 65535, as tftp-hpa, atftp, curl and
                // dnsmasq expect.
                block: (block & 0xffff) as u16,
                offset,
                len: usize::try_from(len).unwrap_or(0),
            }));
        }
        self.sent = last;
        self.timer = Some(now + self.opts.timeout);
    }

    fn finish(&mut self, out: &mut Vec<Output>, event: TransferEvent) {
        self.state = State::Done;
        self.timer = None;
        out.push(Output::Event(event));
    }

    fn fail(&mut self, out: &mut Vec<Output>, reason: String, tell_peer: bool) {
        if tell_peer {
            out.push(Output::Send(Datagram::Bytes(wire::encode_error(
                ErrorCode::Undefined,
                &reason,
            ))));
        }
        self.finish(out, TransferEvent::Failed { reason });
    }

    /// A datagram from the transfer's peer (the server filters other sources).
    pub fn on_packet(&mut self, bytes: &[u8], now: Instant) -> Vec<Output> {
        let mut out = Vec::new();
        if self.is_done() {
            return out;
        }
        match wire::parse(bytes) {
            Ok(Packet::Ack(block)) => self.on_ack(block, now, &mut out),
            // RFC 1350 section 7 / RFC 2347: a client ERROR ends the transfer at once and is
            // never answered.
            Ok(Packet::Error(code, msg)) => {
                if self.state == State::AwaitOackAck && self.opts.tsize {
                    let event = TransferEvent::Probe {
                        tsize: self.len,
                        code,
                    };
                    self.finish(&mut out, event);
                } else {
                    let reason = format!("client sent ERROR {code}: {msg}");
                    self.finish(&mut out, TransferEvent::Failed { reason });
                }
            }
            // Anything else from the peer (junk, a repeated RRQ, DATA) is ignored: the timer
            // recovers, and answering junk would let a peer make us send more than it does.
            Ok(_) | Err(_) => {}
        }
        out
    }

    fn on_ack(&mut self, block: u16, now: Instant, out: &mut Vec<Output>) {
        match self.state {
            State::AwaitOackAck => {
                // RFC 2347 section 3: the client acknowledges the OACK with ACK 0.
                if block == 0 {
                    self.state = State::Sending;
                    self.retries = 0;
                    self.send_window(now, out);
                }
            }
            State::Sending => {
                // Map the 16-bit number to an absolute block in (acked, sent]. Anything else is
                // a duplicate or stale ACK and must not trigger a send: RFC 1123 section
                // 4.2.3.1 (Sorcerer's Apprentice). Lost windows are resent by the timer only.
                let next = self.acked + 1;
                let delta = u64::from(block.wrapping_sub((next & 0xffff) as u16));
                let abs = next + delta;
                if abs > self.sent {
                    return;
                }
                self.acked = abs;
                self.retries = 0;
                if abs >= self.last_block {
                    let event = TransferEvent::Complete {
                        bytes: self.len,
                        elapsed: now.saturating_duration_since(self.started),
                    };
                    self.finish(out, event);
                    return;
                }
                if now.saturating_duration_since(self.last_progress) >= PROGRESS_EVERY {
                    self.last_progress = now;
                    out.push(Output::Event(TransferEvent::Progress {
                        bytes: (self.acked * self.blksize()).min(self.len),
                    }));
                }
                // RFC 7440 section 4: an ACK inside the window means the blocks after it were
                // lost; the next window starts right after the acknowledged block.
                self.send_window(now, out);
            }
            State::Done => {}
        }
    }

    /// The deadline from [`Transfer::next_deadline`] passed (early calls do nothing).
    pub fn on_timer(&mut self, now: Instant) -> Vec<Output> {
        let mut out = Vec::new();
        if self.is_done() {
            return out;
        }
        if now >= self.deadline {
            let reason = format!(
                "transfer did not finish within {}s",
                self.deadline
                    .saturating_duration_since(self.started)
                    .as_secs()
            );
            self.fail(&mut out, reason, true);
            return out;
        }
        let Some(timer) = self.timer else { return out };
        if now < timer {
            return out;
        }
        self.retries += 1;
        if self.retries > self.max_retries {
            let what = if self.state == State::AwaitOackAck {
                "OACK".to_string()
            } else {
                format!("block {}", self.acked + 1)
            };
            let reason = format!(
                "timeout: no ACK for {what} after {} retransmissions",
                self.max_retries
            );
            self.fail(&mut out, reason, true);
            return out;
        }
        match self.state {
            State::AwaitOackAck => {
                out.push(Output::Send(Datagram::Bytes(wire::encode_oack(
                    &self.opts.oack,
                ))));
                self.timer = Some(now + self.opts.timeout);
            }
            // Resend the whole window from the last acknowledged block.
            State::Sending => self.send_window(now, &mut out),
            State::Done => {}
        }
        out
    }
}

/// RFC 1350 / RFC 764: netascii. A line feed becomes CR LF and a bare carriage return CR NUL.
pub fn to_netascii(input: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(input.len() + input.len() / 16);
    for &b in input {
        match b {
            b'\n' => out.extend_from_slice(b"\r\n"),
            b'\r' => out.extend_from_slice(b"\r\0"),
            other => out.push(other),
        }
    }
    out
}

#[cfg(test)]
mod tests;
