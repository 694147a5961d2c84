//! `pxelab replay FIELD.pcap`: send the client side of a capture taken on a real network to
//! pxed in the lab and show where pxed's replies differ from the replies in the capture.
//!
//! The capture's client messages are sent in capture order, one at a time, into the lab switch
//! from a port of their own; each answer pxed sends within [`REPLY_WAIT`] is compared with the
//! capture's answer:
//!
//! - DHCP messages (to ports 67 and 4011) against the capture's first reply of the same xid and
//!   type. Addresses that must differ between networks (server address, offered address) are
//!   compared by kind (set or empty), everything else by value.
//! - TFTP read requests (to port 69), from the address pxed leased to the client during the
//!   replay, against the capture's first answer to the request (OACK, ERROR or DATA): this is
//!   where blksize, tsize and windowsize negotiation goes wrong with firmware. Only the answer
//!   to the request is compared; the replay then ends the transfer with an ERROR.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use pxed::dhcp::wire::{DhcpPacket, Op};
use pxed::tftp::wire::{
    self as tftp_wire, ErrorCode, Packet as TftpPacket, Request as TftpRequest,
};
use serde::Serialize;

use crate::netns::Netns;
use crate::payload::{cache_dir, ensure_payload};
use crate::server::{Pxed, ServerContext, ServerProcess};
use crate::switch::{LabSwitch, PassThrough};

/// How long pxed gets to answer one replayed message (it answers in milliseconds; a message it
/// ignores costs this much).
pub const REPLY_WAIT: Duration = Duration::from_millis(500);
/// Frames read from a capture: a boot's DHCP fits in far fewer; more is not a boot capture.
const MAX_CAPTURE_FRAMES: usize = 100_000;
/// Client messages replayed: enough for several boots' worth of DHCP.
const MAX_REPLAYED: usize = 200;
/// The largest record accepted from a capture file (the pcap snap length ceiling).
const MAX_RECORD: usize = 262_144;
const LINKTYPE_ETHERNET: u32 = 1;
/// Options whose value carries an address of the capture's network: compared present/absent.
const NETWORK_OPTIONS: [u8; 10] = [1, 3, 6, 15, 28, 50, 51, 54, 58, 59];
/// TFTP's well-known port (RFC 1350 section 4).
const TFTP_PORT: u16 = 69;
/// The TFTP client's address when the replay leased it none (a capture without DHCP).
const TFTP_FALLBACK_CLIENT: Ipv4Addr = Ipv4Addr::new(10, 77, 1, 99);
/// RFC 2349: the tsize pxed reports is its own file's size, which need not be the capture's.
const TFTP_FILE_DEPENDENT_OPTIONS: [&str; 1] = ["tsize"];

/// One frame from a capture.
#[derive(Clone, Debug)]
pub struct CapturedFrame {
    /// Microseconds since the Unix epoch.
    pub ts_us: u64,
    /// The Ethernet frame.
    pub data: Vec<u8>,
}

fn u32_at(b: &[u8], at: usize, le: bool) -> Option<u32> {
    let a: [u8; 4] = b.get(at..at + 4)?.try_into().ok()?;
    Some(if le {
        u32::from_le_bytes(a)
    } else {
        u32::from_be_bytes(a)
    })
}

/// Read a classic pcap (either byte order, µs or ns) or a pcapng file of Ethernet frames.
pub fn read_capture(bytes: &[u8]) -> Result<Vec<CapturedFrame>> {
    let magic = bytes.get(..4).context("capture shorter than its header")?;
    match magic {
        [0x0a, 0x0d, 0x0d, 0x0a] => read_pcapng(bytes),
        [0xd4, 0xc3, 0xb2, 0xa1] | [0x4d, 0x3c, 0xb2, 0xa1] => read_pcap(bytes, true),
        [0xa1, 0xb2, 0xc3, 0xd4] | [0xa1, 0xb2, 0x3c, 0x4d] => read_pcap(bytes, false),
        _ => bail!("not a pcap or pcapng file"),
    }
}

fn read_pcap(b: &[u8], le: bool) -> Result<Vec<CapturedFrame>> {
    let nanos = matches!(b.get(..4), Some([0x4d, 0x3c, ..]) | Some([.., 0x3c, 0x4d]));
    let link = u32_at(b, 20, le).context("truncated pcap header")?;
    if link != LINKTYPE_ETHERNET {
        bail!("pcap link type {link}: only Ethernet (1) captures can be replayed");
    }
    let mut out = Vec::new();
    let mut at = 24;
    while let (Some(sec), Some(frac), Some(len)) = (
        u32_at(b, at, le),
        u32_at(b, at + 4, le),
        u32_at(b, at + 8, le),
    ) {
        let len = len as usize;
        if len > MAX_RECORD || out.len() >= MAX_CAPTURE_FRAMES {
            bail!("pcap record at offset {at} is implausible");
        }
        let data = b
            .get(at + 16..at + 16 + len)
            .with_context(|| format!("pcap record at offset {at} is cut short"))?;
        let us = if nanos {
            u64::from(frac) / 1000
        } else {
            u64::from(frac)
        };
        out.push(CapturedFrame {
            ts_us: u64::from(sec) * 1_000_000 + us,
            data: data.to_vec(),
        });
        at += 16 + len;
    }
    Ok(out)
}

fn read_pcapng(b: &[u8]) -> Result<Vec<CapturedFrame>> {
    // pcapng (IETF draft-ietf-opsawg-pcapng): blocks of type, total length, body, length.
    let le = match b.get(8..12) {
        Some([0x4d, 0x3c, 0x2b, 0x1a]) => true,
        Some([0x1a, 0x2b, 0x3c, 0x4d]) => false,
        _ => bail!("pcapng section header without a byte-order magic"),
    };
    let mut links: Vec<u32> = Vec::new();
    let mut out = Vec::new();
    let mut at = 0;
    while let (Some(kind), Some(len)) = (u32_at(b, at, le), u32_at(b, at + 4, le)) {
        let len = len as usize;
        if !(12..=MAX_RECORD + 64).contains(&len) || out.len() >= MAX_CAPTURE_FRAMES {
            bail!("pcapng block at offset {at} has length {len}");
        }
        let body = b
            .get(at + 8..at + len - 4)
            .with_context(|| format!("pcapng block at offset {at} is cut short"))?;
        match kind {
            // Interface Description Block: link type in the first two bytes.
            1 => {
                let lt = body.get(..2).context("short IDB")?;
                let lt = if le {
                    u16::from_le_bytes([lt[0], lt[1]])
                } else {
                    u16::from_be_bytes([lt[0], lt[1]])
                };
                links.push(u32::from(lt));
            }
            // Enhanced Packet Block (timestamps in the IDB's default µs resolution).
            6 => {
                let iface = u32_at(body, 0, le).context("short EPB")? as usize;
                let hi = u64::from(u32_at(body, 4, le).context("short EPB")?);
                let lo = u64::from(u32_at(body, 8, le).context("short EPB")?);
                let cap = u32_at(body, 12, le).context("short EPB")? as usize;
                let data = body.get(20..20 + cap).context("EPB data cut short")?;
                if links.get(iface) == Some(&LINKTYPE_ETHERNET) {
                    out.push(CapturedFrame {
                        ts_us: (hi << 32) | lo,
                        data: data.to_vec(),
                    });
                }
            }
            _ => {}
        }
        at += len;
    }
    Ok(out)
}

/// A DHCP message found in a frame, with its UDP ports.
struct Dhcp {
    /// Position of the frame in the capture.
    index: usize,
    frame: Vec<u8>,
    dport: u16,
    packet: DhcpPacket,
}

fn dhcp_of(frame: &[u8]) -> Option<Dhcp> {
    // Ethernet + IPv4 (no fragments) + UDP between DHCP/PXE ports.
    let v = crate::quirks::parse_udp(frame)?;
    let ports = [67, 68, 4011];
    if !ports.contains(&v.sport) || !ports.contains(&v.dport) {
        return None;
    }
    let packet = DhcpPacket::decode(frame.get(v.payload)?).ok()?;
    Some(Dhcp {
        index: 0,
        frame: frame.to_vec(),
        dport: v.dport,
        packet,
    })
}

/// A TFTP read request in a capture.
struct TftpRead {
    /// Position of the frame in the capture.
    index: usize,
    mac: [u8; 6],
    /// The capture's client address and port (its transfer ID).
    client: SocketAddrV4,
    /// The capture's TFTP server.
    server: Ipv4Addr,
    request: TftpRequest,
    /// The UDP payload as the client sent it.
    payload: Vec<u8>,
}

fn tftp_read_of(index: usize, frame: &[u8]) -> Option<TftpRead> {
    let v = crate::quirks::parse_udp(frame)?;
    if v.dport != TFTP_PORT {
        return None;
    }
    let payload = frame.get(v.payload.clone())?;
    let TftpPacket::Request(request) = tftp_wire::parse(payload).ok()? else {
        return None;
    };
    if request.write {
        return None;
    }
    Some(TftpRead {
        index,
        mac: frame.get(6..12)?.try_into().ok()?,
        client: SocketAddrV4::new(v.src, v.sport),
        server: v.dst,
        request,
        payload: payload.to_vec(),
    })
}

/// The first answer to a TFTP read request, as far as a replay compares it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TftpAnswer {
    /// RFC 2347 option acknowledgment: the options the server granted.
    Oack(Vec<(String, String)>),
    /// ERROR: code and message.
    Error(u16, String),
    /// DATA: block number and payload length (the server ignored or was not asked options).
    Data(u16, usize),
}

impl TftpAnswer {
    fn parse(bytes: &[u8]) -> Option<Self> {
        match tftp_wire::parse(bytes).ok()? {
            TftpPacket::Oack(o) => Some(Self::Oack(o)),
            TftpPacket::Error(code, msg) => Some(Self::Error(code, msg)),
            TftpPacket::Data(block, payload) => Some(Self::Data(block, payload.len())),
            TftpPacket::Request(_) | TftpPacket::Ack(_) => None,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Self::Oack(_) => "OACK",
            Self::Error(..) => "ERROR",
            Self::Data(..) => "DATA",
        }
    }

    fn describe(&self) -> String {
        match self {
            Self::Oack(o) => format!("OACK {}", options_text(o)),
            Self::Error(code, msg) => format!("ERROR {code} {msg:?}"),
            Self::Data(block, len) => format!("DATA block {block} ({len} bytes)"),
        }
    }
}

fn options_text(options: &[(String, String)]) -> String {
    if options.is_empty() {
        return "(no options)".into();
    }
    options
        .iter()
        .map(|(n, v)| format!("{n}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn describe_tftp_read(t: &TftpRead) -> String {
    format!(
        "RRQ {:?} {} {} port {TFTP_PORT}",
        t.request.filename,
        t.request.mode.as_str(),
        options_text(&t.request.options)
    )
}

/// The capture's answer to `t`: the first TFTP packet after it from the capture's server to the
/// client's transfer ID.
fn captured_tftp_answer(capture: &[CapturedFrame], t: &TftpRead) -> Option<TftpAnswer> {
    capture.iter().skip(t.index + 1).find_map(|f| {
        let v = crate::quirks::parse_udp(&f.data)?;
        if v.src != t.server || v.dst != *t.client.ip() || v.dport != t.client.port() {
            return None;
        }
        TftpAnswer::parse(f.data.get(v.payload)?)
    })
}

/// Compare the capture's answer to a TFTP read request with pxed's.
pub fn compare_tftp(captured: &TftpAnswer, ours: &TftpAnswer) -> Vec<String> {
    let mut d = Vec::new();
    match (captured, ours) {
        (TftpAnswer::Oack(a), TftpAnswer::Oack(b)) => {
            let names: BTreeSet<&str> = a.iter().chain(b).map(|(n, _)| n.as_str()).collect();
            let get = |o: &[(String, String)], name: &str| {
                o.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone())
            };
            for name in names {
                match (get(a, name), get(b, name)) {
                    (Some(_), None) => {
                        d.push(format!("option {name}: in the capture, not from pxed"))
                    }
                    (None, Some(v)) => d.push(format!("option {name}: only from pxed ({v})")),
                    (Some(x), Some(y))
                        if x != y && !TFTP_FILE_DEPENDENT_OPTIONS.contains(&name) =>
                    {
                        d.push(format!("option {name}: capture {x}, pxed {y}"));
                    }
                    _ => {}
                }
            }
        }
        (TftpAnswer::Error(a, _), TftpAnswer::Error(b, _)) if a != b => {
            d.push(format!("error code: capture {a}, pxed {b}"));
        }
        (TftpAnswer::Data(a, _), TftpAnswer::Data(b, _)) if a != b => {
            d.push(format!("first block: capture {a}, pxed {b}"));
        }
        (a, b) if a.kind() != b.kind() => d.push(format!(
            "answer: capture {}, pxed {}",
            a.describe(),
            b.describe()
        )),
        _ => {}
    }
    d
}

/// One replayed client message and what came back.
#[derive(Clone, Debug, Serialize)]
pub struct ReplayStep {
    /// The client message (`DISCOVER xid=... to 67`).
    pub client: String,
    /// The reply in the capture, if there was one.
    pub captured: Option<String>,
    /// pxed's reply, if it sent one.
    pub pxed: Option<String>,
    /// Where they differ, one line each.
    pub differences: Vec<String>,
}

/// The outcome of a replay.
#[derive(Clone, Debug, Serialize)]
pub struct ReplayReport {
    /// Every replayed message.
    pub steps: Vec<ReplayStep>,
    /// Where the lab's capture and pxed's logs are.
    pub run_dir: PathBuf,
}

impl ReplayReport {
    /// Differences over all steps.
    pub fn difference_count(&self) -> usize {
        self.steps.iter().map(|s| s.differences.len()).sum()
    }

    /// Human-readable.
    pub fn render(&self) -> String {
        let mut s = String::new();
        for (i, st) in self.steps.iter().enumerate() {
            s.push_str(&format!("{:>3}. client: {}\n", i + 1, st.client));
            s.push_str(&format!(
                "     capture: {}\n     pxed:    {}\n",
                st.captured.as_deref().unwrap_or("(no reply)"),
                st.pxed.as_deref().unwrap_or("(no reply)")
            ));
            for d in &st.differences {
                s.push_str(&format!("     differs: {d}\n"));
            }
        }
        s.push_str(&format!(
            "{} difference(s); lab capture and pxed logs in {}\n",
            self.difference_count(),
            self.run_dir.display()
        ));
        s
    }
}

fn describe(p: &DhcpPacket, dport: u16) -> String {
    let t = p.message_type().map_or("BOOTP", |t| t.name());
    let file = p
        .options
        .get(67)
        .map(|f| String::from_utf8_lossy(f).into_owned())
        .unwrap_or_else(|| String::from_utf8_lossy(&p.file).into_owned());
    let mut codes: Vec<String> = p.options.iter().map(|(c, _)| c.to_string()).collect();
    codes.sort_by_key(|c| c.parse::<u8>().unwrap_or(0));
    format!(
        "{t} xid={:08x} port {dport} yiaddr={} file={:?} options [{}]",
        p.xid,
        p.yiaddr,
        file,
        codes.join(",")
    )
}

/// Compare a captured reply with pxed's, field by field.
pub fn compare(captured: &DhcpPacket, ours: &DhcpPacket) -> Vec<String> {
    let mut d = Vec::new();
    if captured.message_type() != ours.message_type() {
        d.push(format!(
            "message type: capture {:?}, pxed {:?}",
            captured.message_type().map(|t| t.name()),
            ours.message_type().map(|t| t.name())
        ));
    }
    let set = |ip: Ipv4Addr| if ip.is_unspecified() { "empty" } else { "set" };
    for (name, a, b) in [
        ("yiaddr", captured.yiaddr, ours.yiaddr),
        ("siaddr", captured.siaddr, ours.siaddr),
    ] {
        if set(a) != set(b) {
            d.push(format!("{name}: capture {a}, pxed {b}"));
        }
    }
    if captured.broadcast_flag() != ours.broadcast_flag() {
        d.push(format!(
            "broadcast flag: capture {}, pxed {}",
            captured.broadcast_flag(),
            ours.broadcast_flag()
        ));
    }
    for (name, a, b) in [
        ("file", &captured.file, &ours.file),
        ("sname", &captured.sname, &ours.sname),
    ] {
        if a.is_empty() != b.is_empty() {
            d.push(format!(
                "{name}: capture {:?}, pxed {:?}",
                String::from_utf8_lossy(a),
                String::from_utf8_lossy(b)
            ));
        }
    }
    let codes: BTreeSet<u8> = captured
        .options
        .iter()
        .chain(ours.options.iter())
        .map(|(c, _)| c)
        .collect();
    for c in codes {
        match (captured.options.get(c), ours.options.get(c)) {
            (Some(_), None) => d.push(format!("option {c}: in the capture, not from pxed")),
            (None, Some(v)) => d.push(format!("option {c}: only from pxed ({})", show(v))),
            (Some(a), Some(b)) if a != b && !NETWORK_OPTIONS.contains(&c) && c != 67 && c != 66 => {
                d.push(format!("option {c}: capture {}, pxed {}", show(a), show(b)));
            }
            _ => {}
        }
    }
    d
}

fn show(v: &[u8]) -> String {
    if !v.is_empty() && v.iter().all(|b| b.is_ascii_graphic() || *b == b' ') {
        format!("{:?}", String::from_utf8_lossy(v))
    } else {
        v.iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    }
}

/// Options for a replay.
pub struct ReplayOptions {
    /// pxed binary.
    pub pxed: PathBuf,
    /// pxed config template (lab placeholders allowed).
    pub config: PathBuf,
    /// Where to keep the lab's capture and logs.
    pub run_dir: PathBuf,
}

/// A client message to replay, in capture order.
enum ClientMessage<'a> {
    Dhcp(&'a Dhcp),
    Tftp(&'a TftpRead),
}

/// Replay a capture's client side against pxed in a lab namespace.
pub fn replay(capture: &[CapturedFrame], opts: &ReplayOptions) -> Result<ReplayReport> {
    let msgs: Vec<Dhcp> = capture
        .iter()
        .enumerate()
        .filter_map(|(index, f)| dhcp_of(&f.data).map(|d| Dhcp { index, ..d }))
        .collect();
    let reads: Vec<TftpRead> = capture
        .iter()
        .enumerate()
        .filter_map(|(index, f)| tftp_read_of(index, &f.data))
        .collect();
    let mut clients: Vec<(usize, ClientMessage)> = msgs
        .iter()
        .filter(|m| m.packet.op == Op::Request)
        .map(|m| (m.index, ClientMessage::Dhcp(m)))
        .chain(reads.iter().map(|t| (t.index, ClientMessage::Tftp(t))))
        .collect();
    clients.sort_by_key(|(index, _)| *index);
    clients.truncate(MAX_REPLAYED);
    if clients.is_empty() {
        bail!("the capture holds no DHCP client messages and no TFTP read requests");
    }
    // The capture's server: the source of its first reply (its option 54).
    let field_server = msgs
        .iter()
        .find(|m| m.packet.op == Op::Reply)
        .and_then(|m| m.packet.options.server_id());

    std::fs::create_dir_all(&opts.run_dir)?;
    let payload = ensure_payload(&cache_dir()).context("preparing the test OS")?;
    let suffix = format!("r{}", std::process::id());
    let netns = Netns::create(&suffix)?;
    let server_ip = Ipv4Addr::new(10, 77, 1, 1);
    let tap = netns.create_tap("tap0", &format!("{server_ip}/24"))?;
    let mut switch = LabSwitch::start(&opts.run_dir, None)?;
    switch.add_tap_port("uplink", tap, Box::new(PassThrough))?;
    let ctx = ServerContext {
        netns: &netns,
        interface: "tap0",
        server_ip,
        run_dir: &opts.run_dir,
        payload: &payload,
    };
    let mut server = Pxed::start(&ctx, &opts.pxed, &opts.config)?;
    let (port, sock) = switch.add_stream_port("replay", Box::new(PassThrough))?;
    let mut stream = UnixStream::connect(&sock)?;
    switch.wait_connected(port, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_millis(100)))?;

    let mut steps = Vec::new();
    let mut offered: Option<Ipv4Addr> = None;
    for (_, message) in clients {
        let step = match message {
            ClientMessage::Dhcp(m) => {
                let (step, ours) =
                    replay_dhcp(&mut stream, &msgs, m, field_server, offered, server_ip)?;
                if let Some(ip) = ours.filter(|ip| !ip.is_unspecified()) {
                    offered = Some(ip);
                }
                step
            }
            ClientMessage::Tftp(t) => {
                let client = offered.unwrap_or(TFTP_FALLBACK_CLIENT);
                replay_tftp(&mut stream, &netns, capture, t, client, server_ip)?
            }
        };
        steps.push(step);
    }
    server.stop();
    switch.stop();
    Ok(ReplayReport {
        steps,
        run_dir: opts.run_dir.clone(),
    })
}

/// Send one DHCP client message and compare pxed's reply with the capture's; also returns the
/// address pxed put in `yiaddr`.
fn replay_dhcp(
    stream: &mut UnixStream,
    msgs: &[Dhcp],
    m: &Dhcp,
    field_server: Option<Ipv4Addr>,
    offered: Option<Ipv4Addr>,
    server_ip: Ipv4Addr,
) -> Result<(ReplayStep, Option<Ipv4Addr>)> {
    let mut p = m.packet.clone();
    // A REQUEST names the capture's server and address; point it at pxed's.
    if field_server.is_some() && p.options.server_id() == field_server {
        p.options.set(54, server_ip.octets().to_vec());
        if let Some(ip) = offered {
            p.options.set(50, ip.octets().to_vec());
        }
    }
    let frame =
        client_frame(&m.frame, &p, m.dport, server_ip).context("rebuilding a client frame")?;
    send_frame(stream, &frame)?;
    let want = m.packet.xid;
    let ours = read_matching(stream, REPLY_WAIT, |frame| {
        dhcp_of(frame).filter(|d| d.packet.op == Op::Reply && d.packet.xid == want)
    })?;
    // The capture's answer: the first reply with this xid after the message.
    let captured = msgs.iter().find(|r| {
        r.index > m.index
            && r.packet.op == Op::Reply
            && r.packet.xid == want
            && reply_matches(&m.packet, &r.packet)
    });
    let differences = match (captured, &ours) {
        (Some(c), Some(o)) => compare(&c.packet, &o.packet),
        (Some(_), None) => vec!["the capture has a reply, pxed sent none".into()],
        (None, Some(_)) => vec!["pxed replied, the capture has no reply".into()],
        (None, None) => Vec::new(),
    };
    let step = ReplayStep {
        client: describe(&m.packet, m.dport),
        captured: captured.map(|c| describe(&c.packet, c.dport)),
        pxed: ours.as_ref().map(|o| describe(&o.packet, o.dport)),
        differences,
    };
    Ok((step, ours.map(|o| o.packet.yiaddr)))
}

/// Send one TFTP read request from `client` and compare pxed's first answer with the
/// capture's; a transfer pxed starts is ended with an ERROR, as a client that gives up would.
fn replay_tftp(
    stream: &mut UnixStream,
    netns: &Netns,
    capture: &[CapturedFrame],
    t: &TftpRead,
    client: Ipv4Addr,
    server_ip: Ipv4Addr,
) -> Result<ReplayStep> {
    // pxed answers by unicast: tell its namespace where the client is instead of answering ARP.
    let mac = pxed::mac::MacAddr(t.mac).to_string();
    netns.ip(&[
        "neigh",
        "replace",
        &client.to_string(),
        "lladdr",
        &mac,
        "dev",
        "tap0",
        "nud",
        "permanent",
    ])?;
    let tid = t.client.port();
    let frame = crate::quirks::udp_frame(
        t.mac, [0xff; 6], client, server_ip, tid, TFTP_PORT, &t.payload,
    );
    send_frame(stream, &frame)?;
    let ours = read_matching(stream, REPLY_WAIT, |frame| {
        let v = crate::quirks::parse_udp(frame)?;
        if v.src != server_ip || v.dst != client || v.dport != tid {
            return None;
        }
        Some((v.sport, TftpAnswer::parse(frame.get(v.payload)?)?))
    })?;
    if let Some((server_tid, TftpAnswer::Oack(_) | TftpAnswer::Data(..))) = &ours {
        let stop = tftp_wire::encode_error(ErrorCode::Undefined, "replay ends here");
        let frame =
            crate::quirks::udp_frame(t.mac, [0xff; 6], client, server_ip, tid, *server_tid, &stop);
        send_frame(stream, &frame)?;
    }
    let ours = ours.map(|(_, answer)| answer);
    let captured = captured_tftp_answer(capture, t);
    let differences = match (&captured, &ours) {
        (Some(c), Some(o)) => compare_tftp(c, o),
        (Some(_), None) => vec!["the capture has an answer, pxed sent none".into()],
        (None, Some(_)) => vec!["pxed answered, the capture has no answer".into()],
        (None, None) => Vec::new(),
    };
    Ok(ReplayStep {
        client: describe_tftp_read(t),
        captured: captured.as_ref().map(TftpAnswer::describe),
        pxed: ours.as_ref().map(TftpAnswer::describe),
        differences,
    })
}

/// Write one frame to the switch port (length-prefixed, as the switch's stream ports expect).
fn send_frame(stream: &mut UnixStream, frame: &[u8]) -> Result<()> {
    let len = u32::try_from(frame.len()).context("frame too long")?;
    let mut buf = len.to_be_bytes().to_vec();
    buf.extend_from_slice(frame);
    stream.write_all(&buf)?;
    Ok(())
}

/// Whether `reply` answers `req`: OFFER for DISCOVER, ACK/NAK for REQUEST/INFORM.
fn reply_matches(req: &DhcpPacket, reply: &DhcpPacket) -> bool {
    use pxed::dhcp::wire::MessageType as M;
    matches!(
        (req.message_type(), reply.message_type()),
        (Some(M::Discover), Some(M::Offer)) | (Some(M::Request | M::Inform), Some(M::Ack | M::Nak))
    )
}

/// Read frames from the switch port for at most `wait`; the first one `matching` accepts.
fn read_matching<T>(
    stream: &mut UnixStream,
    wait: Duration,
    mut matching: impl FnMut(&[u8]) -> Option<T>,
) -> Result<Option<T>> {
    let deadline = Instant::now() + wait;
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; crate::switch::MAX_FRAME];
    while Instant::now() < deadline {
        match stream.read(&mut chunk) {
            Ok(0) => bail!("the lab switch closed the replay port"),
            Ok(n) => buf.extend_from_slice(chunk.get(..n).unwrap_or_default()),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e.into()),
        }
        while let Some(len) = buf.get(..4).and_then(|b| <[u8; 4]>::try_from(b).ok()) {
            let len = u32::from_be_bytes(len) as usize;
            let Some(frame) = buf.get(4..4 + len) else {
                break;
            };
            let found = matching(frame);
            buf.drain(..4 + len);
            if found.is_some() {
                return Ok(found);
            }
        }
    }
    Ok(None)
}

/// The client's frame with `p` as its DHCP payload; a unicast to the capture's server is
/// redirected to the lab's server (broadcast MAC, so the TAP takes it without ARP).
fn client_frame(orig: &[u8], p: &DhcpPacket, dport: u16, server_ip: Ipv4Addr) -> Option<Vec<u8>> {
    let v = crate::quirks::parse_udp(orig)?;
    let dst = if v.dst == Ipv4Addr::BROADCAST {
        Ipv4Addr::BROADCAST
    } else {
        server_ip
    };
    let mac: [u8; 6] = orig.get(6..12)?.try_into().ok()?;
    Some(crate::quirks::udp_frame(
        mac,
        [0xff; 6],
        v.src,
        dst,
        v.sport,
        dport,
        &p.encode(&[]),
    ))
}

/// Default run directory for a replay.
pub fn default_run_dir(capture: &Path) -> PathBuf {
    let stem = capture
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "capture".into());
    crate::run::runs_root().join(format!("replay-{stem}-{}", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(format!(
            "{}/../tests/fixtures/dhcp/{name}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap()
    }

    #[test]
    fn reads_pcapng_and_classic_pcap() {
        let frames = read_capture(&fixture("edk2-pxe-dhcp.pcap")).unwrap();
        let dhcp: Vec<Dhcp> = frames.iter().filter_map(|f| dhcp_of(&f.data)).collect();
        assert_eq!(dhcp.len(), 10, "tshark shows 10 DHCP frames");
        assert_eq!(dhcp[0].packet.xid, 0x2e85_60c2);
        // Write them as classic pcap with our writer and read them back.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.pcap");
        let mut w = crate::pcap::PcapWriter::create(&path).unwrap();
        for f in &frames {
            w.write_frame(std::time::SystemTime::now(), &f.data)
                .unwrap();
        }
        w.flush().unwrap();
        let again = read_capture(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(again.len(), frames.len());
        assert!(again.iter().zip(&frames).all(|(a, b)| a.data == b.data));
        assert!(read_capture(b"garbage!").is_err());
        let mut cut = fixture("edk2-pxe-dhcp.pcap");
        cut.truncate(cut.len() - 7);
        assert!(read_capture(&cut).is_err());
    }

    #[test]
    fn compare_names_missing_and_extra_options() {
        let frames = read_capture(&fixture("edk2-pxe-dhcp.pcap")).unwrap();
        let offer = frames
            .iter()
            .filter_map(|f| dhcp_of(&f.data))
            .find(|d| d.packet.op == Op::Reply)
            .unwrap()
            .packet;
        assert!(compare(&offer, &offer).is_empty());
        let mut ours = offer.clone();
        ours.options.set(60, b"PXEClient".to_vec());
        ours.options.remove(3);
        ours.file = if offer.file.is_empty() {
            b"snponly.efi".to_vec()
        } else {
            Vec::new()
        };
        let d = compare(&offer, &ours);
        assert!(
            d.iter().any(|l| l.contains("option 60: only from pxed")),
            "{d:?}"
        );
        assert!(
            d.iter().any(|l| l.contains("option 3: in the capture")),
            "{d:?}"
        );
        assert!(d.iter().any(|l| l.starts_with("file:")), "{d:?}");
    }

    #[test]
    fn finds_tftp_requests_and_their_captured_answers() {
        let frames = read_capture(&fixture("edk2-pxe-tftp.pcap")).unwrap();
        let reads: Vec<TftpRead> = frames
            .iter()
            .enumerate()
            .filter_map(|(i, f)| tftp_read_of(i, &f.data))
            .collect();
        // EDK2's tsize probe, its real read, then iPXE's read (tshark shows the same three).
        assert_eq!(reads.len(), 3);
        assert_eq!(reads[0].request.filename, "snponly.efi");
        assert_eq!(reads[0].request.option("windowsize"), Some("4"));
        assert_eq!(reads[0].server, Ipv4Addr::new(10, 0, 2, 2));
        let answers: Vec<TftpAnswer> = reads
            .iter()
            .map(|t| captured_tftp_answer(&frames, t).unwrap())
            .collect();
        let opts = |o: &[(&str, &str)]| {
            TftpAnswer::Oack(
                o.iter()
                    .map(|(n, v)| (n.to_string(), v.to_string()))
                    .collect(),
            )
        };
        assert_eq!(
            answers[0],
            opts(&[("tsize", "173792"), ("blksize", "1428")])
        );
        assert_eq!(answers[1], opts(&[("blksize", "1428")]));
    }

    #[test]
    fn compare_tftp_names_option_and_kind_differences() {
        let oack = |o: &[(&str, &str)]| {
            TftpAnswer::Oack(
                o.iter()
                    .map(|(n, v)| (n.to_string(), v.to_string()))
                    .collect(),
            )
        };
        let field = oack(&[("tsize", "100"), ("blksize", "1428")]);
        // tsize is the size of each server's own file: not a difference.
        assert!(compare_tftp(&field, &oack(&[("tsize", "200"), ("blksize", "1428")])).is_empty());
        let d = compare_tftp(&field, &oack(&[("blksize", "1468"), ("windowsize", "4")]));
        assert_eq!(
            d,
            [
                "option blksize: capture 1428, pxed 1468",
                "option tsize: in the capture, not from pxed",
                "option windowsize: only from pxed (4)",
            ]
        );
        let d = compare_tftp(&field, &TftpAnswer::Error(1, "File not found".into()));
        assert_eq!(d.len(), 1);
        assert!(d[0].starts_with("answer: capture OACK"), "{d:?}");
        assert_eq!(
            compare_tftp(
                &TftpAnswer::Error(1, "a".into()),
                &TftpAnswer::Error(2, "b".into())
            ),
            ["error code: capture 1, pxed 2"]
        );
    }
}
