//! Deterministic engine tests with virtual time: a simulated RFC 7440 client over a lossy,
//! duplicating, reordering channel. Nothing sleeps; time jumps to the engine's next deadline.

use std::collections::VecDeque;

use super::*;

fn rrq(mode: &str, options: &[(&str, &str)]) -> Request {
    match wire::parse(&wire::encode_request(false, "f", mode, options)).unwrap() {
        Packet::Request(r) => r,
        other => panic!("{other:?}"),
    }
}

fn content(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

/// Faults applied to a direction of the channel, by packet index.
#[derive(Clone, Copy, Default)]
struct Faults {
    drop_every: usize,
    dup_every: usize,
    swap_every: usize,
}

impl Faults {
    fn apply(&self, n: &mut usize, pkt: Vec<u8>, queue: &mut VecDeque<Vec<u8>>) {
        *n += 1;
        if self.drop_every > 0 && (*n).is_multiple_of(self.drop_every) {
            return;
        }
        if self.swap_every > 0 && (*n).is_multiple_of(self.swap_every) && !queue.is_empty() {
            let last = queue.len() - 1;
            queue.insert(last, pkt);
            return;
        }
        if self.dup_every > 0 && (*n).is_multiple_of(self.dup_every) {
            queue.push_back(pkt.clone());
        }
        queue.push_back(pkt);
    }
}

struct Run {
    received: Vec<u8>,
    data_sent: usize,
    events: Vec<TransferEvent>,
    done_at: Duration,
}

fn render(d: &Datagram, data: &[u8]) -> Vec<u8> {
    match d {
        Datagram::Data { block, offset, len } => {
            let start = *offset as usize;
            wire::encode_data(*block, &data[start..start + len])
        }
        Datagram::Bytes(b) => b.clone(),
    }
}

/// Drive a full transfer of `data` between the engine and a simulated client.
fn run(data: &[u8], options: &[(&str, &str)], down: Faults, up: Faults) -> Run {
    let req = rrq("octet", options);
    let t0 = Instant::now();
    let mut now = t0;
    // Every loss costs a virtual timeout; the lossy rollover runs take hours of virtual time.
    let limits = Limits {
        deadline: Duration::from_secs(86_400),
        ..Limits::default()
    };
    let (mut t, first) = Transfer::start(&req, data.len() as u64, &limits, now);
    let blksize = t.negotiated().blksize as usize;
    let window = t.negotiated().windowsize as usize;
    let mut to_client = VecDeque::new();
    let mut to_server = VecDeque::new();
    let (mut nd, mut nu) = (0, 0);
    let mut run = Run {
        received: Vec::new(),
        data_sent: 0,
        events: Vec::new(),
        done_at: Duration::ZERO,
    };
    let mut handle = |outs: Vec<Output>, to_client: &mut VecDeque<Vec<u8>>, run: &mut Run| {
        for o in outs {
            match o {
                Output::Send(d) => {
                    if matches!(d, Datagram::Data { .. }) {
                        run.data_sent += 1;
                    }
                    down.apply(&mut nd, render(&d, data), to_client);
                }
                Output::Event(e) => run.events.push(e),
            }
        }
    };
    handle(first, &mut to_client, &mut run);
    // Client state: next expected absolute block, blocks since the last ACK.
    let mut expected: u64 = 1;
    let mut in_window = 0;
    let mut client_done = false;
    for _ in 0..1_000_000 {
        if t.is_done() {
            break;
        }
        if let Some(pkt) = to_client.pop_front() {
            match wire::parse(&pkt).unwrap() {
                Packet::Oack(_) => up.apply(&mut nu, wire::encode_ack(0), &mut to_server),
                Packet::Data(block, payload) => {
                    if client_done {
                        // Dally (RFC 1350 section 6): re-acknowledge a repeated final block.
                        let ack = ((expected - 1) & 0xffff) as u16;
                        up.apply(&mut nu, wire::encode_ack(ack), &mut to_server);
                        continue;
                    }
                    if block == (expected & 0xffff) as u16 {
                        run.received.extend_from_slice(payload);
                        in_window += 1;
                        let last = payload.len() < blksize;
                        if last || in_window == window {
                            up.apply(&mut nu, wire::encode_ack(block), &mut to_server);
                            in_window = 0;
                        }
                        client_done = last;
                        expected += 1;
                    } else {
                        // Out of order or duplicate: report the last in-order block.
                        in_window = 0;
                        let ack = ((expected - 1) & 0xffff) as u16;
                        up.apply(&mut nu, wire::encode_ack(ack), &mut to_server);
                    }
                }
                Packet::Error(..) => break,
                other => panic!("unexpected {other:?}"),
            }
            continue;
        }
        if let Some(pkt) = to_server.pop_front() {
            let outs = t.on_packet(&pkt, now);
            handle(outs, &mut to_client, &mut run);
            continue;
        }
        // Nothing in flight: jump to the engine's deadline.
        let Some(at) = t.next_deadline() else { break };
        now = at.max(now);
        let outs = t.on_timer(now);
        handle(outs, &mut to_client, &mut run);
    }
    run.done_at = now - t0;
    run
}

fn assert_same(got: &[u8], want: &[u8], why: &str) {
    let first_diff = got.iter().zip(want).position(|(a, b)| a != b);
    assert!(
        got == want,
        "{why}: got {} bytes, want {}, first difference at {first_diff:?}",
        got.len(),
        want.len()
    );
}

fn blocks(len: usize, blksize: usize) -> usize {
    len / blksize + 1
}

#[test]
fn lossless_transfers_send_each_block_once() {
    for (len, opts) in [
        (0usize, vec![]),
        (512, vec![]),
        (1000, vec![]),
        (100_000, vec![("blksize", "1468")]),
        (100_000, vec![("blksize", "1468"), ("windowsize", "16")]),
        (14680, vec![("blksize", "1468"), ("windowsize", "10")]),
        (
            70_000,
            vec![("blksize", "8192"), ("tsize", "0"), ("windowsize", "64")],
        ),
    ] {
        let data = content(len);
        let r = run(&data, &opts, Faults::default(), Faults::default());
        assert_same(&r.received, &data, &format!("{len} {opts:?}"));
        let blk = opts
            .iter()
            .find(|(n, _)| *n == "blksize")
            .map(|(_, v)| v.parse::<usize>().unwrap().min(1468))
            .unwrap_or(512);
        assert_eq!(r.data_sent, blocks(len, blk), "{len} {opts:?}");
        assert!(
            matches!(r.events.last(), Some(TransferEvent::Complete { bytes, .. }) if *bytes == len as u64)
        );
        assert_eq!(r.done_at, Duration::ZERO, "no timer should have fired");
    }
}

#[test]
fn survives_loss_in_both_directions() {
    let data = content(300_000);
    for opts in [vec![], vec![("blksize", "1468"), ("windowsize", "8")]] {
        for (down, up) in [
            (
                Faults {
                    drop_every: 7,
                    ..Default::default()
                },
                Faults::default(),
            ),
            (
                Faults::default(),
                Faults {
                    drop_every: 3,
                    ..Default::default()
                },
            ),
            (
                Faults {
                    drop_every: 11,
                    ..Default::default()
                },
                Faults {
                    drop_every: 5,
                    ..Default::default()
                },
            ),
        ] {
            let r = run(&data, &opts, down, up);
            assert_same(&r.received, &data, &format!("{opts:?}"));
            assert!(matches!(
                r.events.last(),
                Some(TransferEvent::Complete { .. })
            ));
        }
    }
}

#[test]
fn duplicated_acks_never_cause_duplicate_bursts() {
    // RFC 1123 4.2.3.1: with every ACK duplicated and no loss, each block goes out exactly once.
    let data = content(200_000);
    for opts in [
        vec![],
        vec![("windowsize", "4")],
        vec![("blksize", "1468"), ("windowsize", "16")],
    ] {
        let up = Faults {
            dup_every: 1,
            ..Default::default()
        };
        let r = run(&data, &opts, Faults::default(), up);
        assert_same(&r.received, &data, "");
        let blk = if opts.iter().any(|(n, _)| *n == "blksize") {
            1468
        } else {
            512
        };
        assert_eq!(r.data_sent, blocks(data.len(), blk), "{opts:?}");
    }
}

#[test]
fn duplicated_and_reordered_data_is_survived() {
    let data = content(150_000);
    for opts in [vec![], vec![("windowsize", "8")]] {
        let down = Faults {
            dup_every: 3,
            swap_every: 5,
            ..Default::default()
        };
        let up = Faults {
            swap_every: 4,
            ..Default::default()
        };
        let r = run(&data, &opts, down, up);
        assert_same(&r.received, &data, &format!("{opts:?}"));
    }
}

#[test]
fn late_and_future_acks_are_ignored() {
    let req = rrq("octet", &[]);
    let now = Instant::now();
    let (mut t, out) = Transfer::start(&req, 5000, &Limits::default(), now);
    assert_eq!(out.len(), 1);
    assert_eq!(t.on_packet(&wire::encode_ack(1), now).len(), 1);
    assert_eq!(t.on_packet(&wire::encode_ack(2), now).len(), 1);
    // Late ACKs for blocks already acknowledged and an ACK for a block never sent.
    for stale in [0u16, 1, 2, 4, 9, 65535] {
        assert!(
            t.on_packet(&wire::encode_ack(stale), now).is_empty(),
            "{stale}"
        );
    }
    // Junk from the peer does nothing either.
    assert!(t.on_packet(b"\x00", now).is_empty());
    assert!(t.on_packet(b"\x00\x03\x00\x01abc", now).is_empty());
}

#[test]
fn timeout_resends_the_window_then_gives_up() {
    let req = rrq("octet", &[("windowsize", "4")]);
    let t0 = Instant::now();
    let limits = Limits::default();
    let (mut t, _) = Transfer::start(&req, 100_000, &limits, t0);
    let out = t.on_packet(&wire::encode_ack(0), t0);
    assert_eq!(out.len(), 4);
    // Client got blocks 1 and 2 only.
    assert_eq!(t.on_packet(&wire::encode_ack(2), t0).len(), 4);
    // Too early: nothing.
    assert!(t.on_timer(t0 + Duration::from_millis(10)).is_empty());
    for _ in 0..limits.max_retries {
        let now = t.next_deadline().unwrap();
        let out = t.on_timer(now);
        let blocks: Vec<u16> = out
            .iter()
            .filter_map(|o| match o {
                Output::Send(Datagram::Data { block, .. }) => Some(*block),
                _ => None,
            })
            .collect();
        assert_eq!(blocks, vec![3, 4, 5, 6]);
    }
    let now = t.next_deadline().unwrap();
    let out = t.on_timer(now);
    assert!(matches!(out.first(), Some(Output::Send(Datagram::Bytes(b))) if b[1] == 5));
    assert!(
        matches!(out.last(), Some(Output::Event(TransferEvent::Failed { reason })) if reason.contains("timeout"))
    );
    assert!(t.is_done());
    assert_eq!(t.next_deadline(), None);
}

#[test]
fn overall_deadline_ends_a_trickling_transfer() {
    let limits = Limits {
        deadline: Duration::from_secs(5),
        ..Limits::default()
    };
    let t0 = Instant::now();
    let (mut t, _) = Transfer::start(&rrq("octet", &[]), 10_000_000, &limits, t0);
    // The client acknowledges one block per second forever: each ACK is progress, but the
    // overall deadline still ends the transfer.
    let mut failed = false;
    for i in 1..=10u16 {
        let now = t0 + Duration::from_secs(u64::from(i));
        t.on_packet(&wire::encode_ack(i), now);
        let out = t.on_timer(now);
        if out
            .iter()
            .any(|o| matches!(o, Output::Event(TransferEvent::Failed { .. })))
        {
            failed = true;
            break;
        }
    }
    assert!(failed);
}

#[test]
fn client_error_aborts_at_once() {
    let now = Instant::now();
    let (mut t, _) = Transfer::start(&rrq("octet", &[]), 100_000, &Limits::default(), now);
    t.on_packet(&wire::encode_ack(1), now);
    let out = t.on_packet(
        &wire::encode_error(ErrorCode::Undefined, "user cancelled"),
        now,
    );
    assert_eq!(
        out,
        vec![Output::Event(TransferEvent::Failed {
            reason: "client sent ERROR 0: user cancelled".into()
        })]
    );
    assert!(t.is_done());
    assert!(t.on_timer(now + Duration::from_secs(100)).is_empty());
    assert!(t.on_packet(&wire::encode_ack(2), now).is_empty());
}

#[test]
fn edk2_tsize_probe_is_a_probe() {
    let now = Instant::now();
    let req = rrq("octet", &[("tsize", "0"), ("blksize", "1468")]);
    let (mut t, out) = Transfer::start(&req, 123_456, &Limits::default(), now);
    let Output::Send(Datagram::Bytes(oack)) = &out[0] else {
        panic!()
    };
    assert_eq!(
        wire::parse(oack).unwrap(),
        Packet::Oack(vec![
            ("tsize".into(), "123456".into()),
            ("blksize".into(), "1468".into())
        ])
    );
    let out = t.on_packet(
        &wire::encode_error(ErrorCode::OptionNegotiation, "abort"),
        now,
    );
    assert_eq!(
        out,
        vec![Output::Event(TransferEvent::Probe {
            tsize: 123_456,
            code: 8
        })]
    );
    assert!(t.is_done());
}

#[test]
fn only_requested_and_supported_options_are_acknowledged() {
    let limits = Limits {
        blksize_max: 1400,
        windowsize_max: 8,
        ..Limits::default()
    };
    let n = negotiate(&rrq("octet", &[("blksize", "9000")]), 10, &limits);
    assert_eq!(n.oack, vec![("blksize".into(), "1400".into())]);
    let n = negotiate(
        &rrq(
            "octet",
            &[
                ("windowsize", "64"),
                ("multicast", ""),
                ("utimeout", "1000"),
            ],
        ),
        10,
        &limits,
    );
    assert_eq!(n.oack, vec![("windowsize".into(), "8".into())]);
    // Out-of-range and absurd values are ignored, not clamped.
    for (name, value) in [
        ("blksize", "7"),
        ("blksize", "65465"),
        ("blksize", "99999999999999999999999"),
        ("blksize", "-1"),
        ("blksize", "0x400"),
        ("timeout", "0"),
        ("timeout", "256"),
        ("windowsize", "0"),
        ("windowsize", "65536"),
    ] {
        let n = negotiate(&rrq("octet", &[(name, value)]), 10, &limits);
        assert!(n.oack.is_empty(), "{name}={value}");
    }
    // Any tsize value asks for the size (atftp sends `enable`); an empty file gets none.
    for value in ["0", "enable", "18446744073709551616"] {
        let n = negotiate(&rrq("octet", &[("tsize", value)]), 10, &limits);
        assert_eq!(n.oack, vec![("tsize".into(), "10".into())], "{value}");
        let n = negotiate(&rrq("octet", &[("tsize", value)]), 0, &limits);
        assert!(n.oack.is_empty());
    }
    // Netascii: no tsize, lock-step.
    let n = negotiate(
        &rrq("netascii", &[("tsize", "0"), ("windowsize", "8")]),
        10,
        &limits,
    );
    assert!(n.oack.is_empty());
    assert_eq!(n.windowsize, 1);
    // Q6: with tsize turned off (a server without RFC 2349's tsize) only blksize is granted.
    let no_tsize = Limits {
        tsize: false,
        ..limits.clone()
    };
    let n = negotiate(
        &rrq("octet", &[("tsize", "0"), ("blksize", "1468")]),
        10,
        &no_tsize,
    );
    assert_eq!(n.oack, vec![("blksize".into(), "1400".into())]);
}

#[test]
fn block_numbers_roll_over_to_zero() {
    // 70000 blocks of 8 bytes: blocks 65535, 0, 1, ... on the wire.
    let data = content(8 * 70_000 + 3);
    let r = run(
        &data,
        &[("blksize", "8"), ("windowsize", "4")],
        Faults::default(),
        Faults::default(),
    );
    assert_same(&r.received, &data, "");
    let lossy = Faults {
        drop_every: 13,
        ..Default::default()
    };
    let r = run(
        &data,
        &[("blksize", "8"), ("windowsize", "4")],
        lossy,
        Faults::default(),
    );
    assert_same(&r.received, &data, "");
    let r = run(&data, &[("blksize", "8")], Faults::default(), lossy);
    assert_same(&r.received, &data, "");
}

#[test]
fn request_port_decisions() {
    let wrq = wire::encode_request(true, "x", "octet", &[]);
    let RequestDecision::Refuse { packet, .. } = on_request_packet(&wrq) else {
        panic!()
    };
    assert_eq!(
        wire::parse(&packet).unwrap(),
        Packet::Error(
            2,
            "write requests are not accepted: pxed serves files read-only".into()
        )
    );
    let mail = wire::encode_request(false, "x", "mail", &[]);
    assert!(matches!(
        on_request_packet(&mail),
        RequestDecision::Refuse { .. }
    ));
    assert!(matches!(
        on_request_packet(&wire::encode_ack(1)),
        RequestDecision::Ignore(_)
    ));
    assert!(matches!(
        on_request_packet(&wire::encode_error(ErrorCode::Undefined, "x")),
        RequestDecision::Ignore(_)
    ));
    assert!(matches!(
        on_request_packet(b"\x00\x07zz"),
        RequestDecision::Refuse { .. }
    ));
    assert!(matches!(
        on_request_packet(b"\x01"),
        RequestDecision::Ignore(_)
    ));
}

#[test]
fn netascii_translation() {
    assert_eq!(to_netascii(b"a\nb\rc\r\n"), b"a\r\nb\r\0c\r\0\r\n");
}

#[test]
fn window_bytes_cap_the_granted_windowsize() {
    let limits = Limits {
        blksize_max: BLKSIZE_MAX,
        windowsize_max: 64,
        ..Limits::default()
    };
    // (request, granted blksize, granted windowsize), in the client's option order.
    for (opts, blk, win) in [
        (vec![("windowsize", "64"), ("blksize", "8192")], 8192, 8),
        (vec![("blksize", "8192"), ("windowsize", "16")], 8192, 8),
        (vec![("blksize", "8192"), ("windowsize", "4")], 8192, 4),
        (vec![("blksize", "1468"), ("windowsize", "64")], 1468, 44),
        (vec![("windowsize", "64")], 512, 64),
        (vec![("blksize", "65464"), ("windowsize", "4")], 65464, 1),
    ] {
        let n = negotiate(&rrq("octet", &opts), 1 << 20, &limits);
        assert_eq!((n.blksize, n.windowsize), (blk, win), "{opts:?}");
        let answered: Vec<(String, String)> = opts
            .iter()
            .map(|(name, _)| {
                let v = if *name == "blksize" { blk } else { win };
                (name.to_string(), v.to_string())
            })
            .collect();
        assert_eq!(n.oack, answered, "{opts:?}");
    }
    // A budget below one block still grants lock-step.
    let tiny = Limits {
        window_bytes_max: 0,
        ..limits
    };
    let n = negotiate(&rrq("octet", &[("windowsize", "8")]), 10, &tiny);
    assert_eq!(n.oack, vec![("windowsize".into(), "1".into())]);
}

/// A client whose socket buffer holds only `buffer` datagrams of a burst (the rest of the
/// window is dropped, as Linux does when a window overflows SO_RCVBUF). It follows RFC 7440
/// section 4: ACK after a full window or the last block, and on its own timeout ACK the last
/// block received in order. Returns (bytes received, virtual duration, events).
fn run_small_buffer(
    data: &[u8],
    options: &[(&str, &str)],
    limits: &Limits,
    buffer: usize,
) -> (Vec<u8>, Duration, Vec<TransferEvent>) {
    let client_timeout = limits.timeout - Duration::from_millis(100);
    let t0 = Instant::now();
    let mut now = t0;
    let (mut t, first) = Transfer::start(&rrq("octet", options), data.len() as u64, limits, now);
    let blksize = t.negotiated().blksize as usize;
    let window = t.negotiated().windowsize as usize;
    let mut received = Vec::new();
    let mut events = Vec::new();
    let mut expected: u64 = 1;
    let mut in_window = 0;
    let mut progress = now;
    let mut outs = first;
    while !t.is_done() {
        // One engine step is one burst: only `buffer` datagrams of it reach the client.
        let mut queue = Vec::new();
        for o in outs.drain(..) {
            match o {
                Output::Send(d) if queue.len() < buffer => queue.push(render(&d, data)),
                Output::Send(_) => {}
                Output::Event(e) => events.push(e),
            }
        }
        let mut ack = None;
        for pkt in queue {
            match wire::parse(&pkt).unwrap() {
                Packet::Oack(_) => ack = Some(0),
                Packet::Data(block, payload) if block == (expected & 0xffff) as u16 => {
                    received.extend_from_slice(payload);
                    progress = now;
                    in_window += 1;
                    if payload.len() < blksize || in_window == window {
                        ack = Some(block);
                        in_window = 0;
                    }
                    expected += 1;
                }
                _ => {}
            }
        }
        if let Some(block) = ack {
            outs = t.on_packet(&wire::encode_ack(block), now);
            continue;
        }
        let server_at = t.next_deadline().unwrap();
        let client_at = progress + client_timeout;
        if client_at < server_at {
            now = client_at;
            progress = now;
            in_window = 0;
            let block = ((expected - 1) & 0xffff) as u16;
            outs = t.on_packet(&wire::encode_ack(block), now);
        } else {
            now = server_at;
            outs = t.on_timer(now);
        }
    }
    events.extend(outs.into_iter().filter_map(|o| match o {
        Output::Event(e) => Some(e),
        Output::Send(_) => None,
    }));
    (received, now - t0, events)
}

#[test]
fn a_window_larger_than_the_client_buffer_still_completes() {
    // A window of 16 granted (budget lifted) to a client that keeps 5 datagrams of a burst:
    // every window loses its tail. The client's timeout ACK of its last in-order block must
    // move the window on (and reset the retry count) rather than end in "no ACK".
    let limits = Limits {
        blksize_max: BLKSIZE_MAX,
        window_bytes_max: u32::MAX,
        max_retries: 2,
        ..Limits::default()
    };
    let data = content(8192 * 60 + 5);
    let opts = [("blksize", "8192"), ("windowsize", "16")];
    let (got, took, events) = run_small_buffer(&data, &opts, &limits, 5);
    assert_same(&got, &data, "small buffer, window 16");
    assert!(
        matches!(events.last(), Some(TransferEvent::Complete { .. })),
        "{events:?}"
    );
    // 61 blocks, 5 per client timeout of 0.9 s: 12 stalls.
    assert!(took <= Duration::from_secs(13), "{took:?}");
}

#[test]
fn the_default_window_budget_fits_a_default_client_buffer() {
    // Linux's default receive buffer (~208 KiB) holds 12 datagrams of 8192 on loopback. With
    // the default budget the same request is granted a window that fits: no timer fires.
    let limits = Limits {
        blksize_max: BLKSIZE_MAX,
        ..Limits::default()
    };
    let data = content(8192 * 200 + 1);
    let opts = [("blksize", "8192"), ("windowsize", "64")];
    let (got, took, events) = run_small_buffer(&data, &opts, &limits, 12);
    assert_same(&got, &data, "default budget");
    assert!(matches!(
        events.last(),
        Some(TransferEvent::Complete { .. })
    ));
    assert_eq!(took, Duration::ZERO, "no timeout may be needed");
}

/// Fuzzing found that a huge `[tftp] timeout_ms` or `transfer_deadline_secs` (which the server
/// turns into `Limits` as they are) made `Transfer::start` panic adding them to `Instant`.
/// Reproducer: fuzz/artifacts/tftp_engine/instant-overflow.
#[test]
fn huge_configured_limits_are_capped() {
    let limits = Limits {
        timeout: Duration::from_millis(u64::MAX),
        deadline: Duration::from_secs(u64::MAX),
        max_retries: 2,
        ..Limits::default()
    };
    let t0 = Instant::now();
    for options in [&[][..], &[("blksize", "1024")][..]] {
        let (mut t, first) = Transfer::start(&rrq("octet", options), 5000, &limits, t0);
        assert!(!first.is_empty());
        assert_eq!(t.negotiated().timeout, TIMEOUT_MAX);
        let mut now = t0;
        let mut ticks = 0;
        while let Some(at) = t.next_deadline() {
            assert!(at <= t0 + DEADLINE_MAX);
            now = now.max(at);
            t.on_timer(now);
            ticks += 1;
            assert!(ticks <= 10, "retries are not counted");
        }
        // Two retransmissions of TIMEOUT_MAX each, then the third timeout gives up.
        assert_eq!(now - t0, TIMEOUT_MAX * 3);
    }
}
