//! Reads boot protocols off the switch's frames: Ethernet, IPv4, UDP and TCP headers parsed
//! here (no tshark at run time), then DHCP (RFC 2131), TFTP (RFC 1350, options RFC 2347/2348)
//! and the first line of HTTP/1.x messages. Each interesting packet becomes [`WireEvidence`]
//! for the client it concerns, keyed by the client's MAC.

use std::collections::{HashMap, VecDeque};
use std::net::Ipv4Addr;
use std::time::SystemTime;

use pxed::mac::MacAddr;
use pxed::stage::BootStage;
use serde::Serialize;

/// Ethertype of IPv4.
const ETHERTYPE_IPV4: u16 = 0x0800;
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;
const DHCP_SERVER_PORT: u16 = 67;
const DHCP_CLIENT_PORT: u16 = 68;
/// PXE boot server port (proxyDHCP requests, PXE spec 2.1).
const PXE_BOOT_SERVER_PORT: u16 = 4011;
const TFTP_PORT: u16 = 69;
/// RFC 1350: the default TFTP block size.
const TFTP_DEFAULT_BLKSIZE: usize = 512;
/// TFTP error 8: option negotiation refused (RFC 2347), what EDK2 sends after a tsize probe.
const TFTP_ERR_OPTION_REFUSED: u16 = 8;
/// RFC 2131 section 3: the magic cookie that opens the options field.
const DHCP_MAGIC: [u8; 4] = [99, 130, 83, 99];
/// Fixed BOOTP header length before the magic cookie (RFC 2131 figure 1).
const BOOTP_FIXED: usize = 236;
/// Transfers and connections tracked at once; older ones are forgotten first.
const TRACKED_FLOWS: usize = 1024;

/// One packet that matters for a client's boot.
#[derive(Clone, Debug, Serialize)]
pub struct WireEvidence {
    /// When the switch forwarded it.
    #[serde(with = "crate::report::system_time_ms")]
    pub at: SystemTime,
    /// The client it concerns.
    pub mac: MacAddr,
    /// The boot stage it proves, if any.
    pub stage: Option<BootStage>,
    /// One line for the report (`DHCP ACK 10.77.1.100 xid=...`).
    pub summary: String,
}

/// Packet counts per client, per protocol.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct PacketCounts {
    /// DHCP/BOOTP packets to or from the client.
    pub dhcp: u64,
    /// TFTP packets to or from the client.
    pub tftp: u64,
    /// TCP segments carrying HTTP to or from the client.
    pub http: u64,
}

struct TftpTransfer {
    mac: MacAddr,
    file: String,
    blksize: usize,
    last_block: Option<u16>,
    done: bool,
}

/// Turns frames into evidence. Keeps the little state TFTP and HTTP need.
#[derive(Default)]
pub struct WireTracker {
    /// Keyed by the client's (address, port) of the read request.
    tftp: HashMap<(Ipv4Addr, u16), TftpTransfer>,
    tftp_order: VecDeque<(Ipv4Addr, u16)>,
    /// Requests awaiting a response, keyed by the client's (address, port).
    http: HashMap<(Ipv4Addr, u16), VecDeque<String>>,
    http_order: VecDeque<(Ipv4Addr, u16)>,
    counts: HashMap<MacAddr, PacketCounts>,
}

struct Frame<'a> {
    dst: MacAddr,
    src: MacAddr,
    ip_src: Ipv4Addr,
    ip_dst: Ipv4Addr,
    proto: u8,
    l4: &'a [u8],
}

fn parse_frame(frame: &[u8]) -> Option<Frame<'_>> {
    let dst = MacAddr(frame.get(0..6)?.try_into().ok()?);
    let src = MacAddr(frame.get(6..12)?.try_into().ok()?);
    if be16(frame, 12)? != ETHERTYPE_IPV4 {
        return None;
    }
    let ip = frame.get(14..)?;
    let vihl = *ip.first()?;
    if vihl >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(vihl & 0x0f) * 4;
    let total = usize::from(be16(ip, 2)?);
    // Fragments other than the first carry no transport header; boot traffic rarely fragments.
    if be16(ip, 6)? & 0x1fff != 0 || ihl < 20 || total < ihl {
        return None;
    }
    let proto = *ip.get(9)?;
    let ip_src = Ipv4Addr::from(<[u8; 4]>::try_from(ip.get(12..16)?).ok()?);
    let ip_dst = Ipv4Addr::from(<[u8; 4]>::try_from(ip.get(16..20)?).ok()?);
    let l4 = ip.get(ihl..total.min(ip.len()))?;
    Some(Frame {
        dst,
        src,
        ip_src,
        ip_dst,
        proto,
        l4,
    })
}

/// The DHCP ACK a server sent in `frame` (UDP from port 67, to a client on 68 or a relay on
/// 67) that grants an address: the client's MAC and the address.
pub fn dhcp_ack_lease(frame: &[u8]) -> Option<(MacAddr, Ipv4Addr)> {
    use pxed::dhcp::wire::{DhcpPacket, MessageType};
    let f = parse_frame(frame)?;
    if f.proto != PROTO_UDP || be16(f.l4, 0)? != DHCP_SERVER_PORT {
        return None;
    }
    let p = DhcpPacket::decode(f.l4.get(8..)?).ok()?;
    if p.message_type() != Some(MessageType::Ack) || p.yiaddr.is_unspecified() {
        return None;
    }
    Some((p.mac()?, p.yiaddr))
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

impl WireTracker {
    /// A tracker with no state.
    pub fn new() -> Self {
        Self::default()
    }

    /// Packet counts seen so far, per client.
    pub fn counts(&self) -> &HashMap<MacAddr, PacketCounts> {
        &self.counts
    }

    /// Read one frame; return the evidence it carries.
    pub fn observe(&mut self, at: SystemTime, frame: &[u8]) -> Vec<WireEvidence> {
        let Some(f) = parse_frame(frame) else {
            return Vec::new();
        };
        match f.proto {
            PROTO_UDP => self.udp(at, &f),
            PROTO_TCP => self.tcp(at, &f),
            _ => Vec::new(),
        }
    }

    fn udp(&mut self, at: SystemTime, f: &Frame<'_>) -> Vec<WireEvidence> {
        let (Some(sport), Some(dport)) = (be16(f.l4, 0), be16(f.l4, 2)) else {
            return Vec::new();
        };
        let Some(payload) = f.l4.get(8..) else {
            return Vec::new();
        };
        let dhcp_ports = [DHCP_SERVER_PORT, DHCP_CLIENT_PORT, PXE_BOOT_SERVER_PORT];
        if dhcp_ports.contains(&sport) && dhcp_ports.contains(&dport) {
            return self.dhcp(at, sport, payload).into_iter().collect();
        }
        if dport == TFTP_PORT {
            return self.tftp_request(at, f, sport, payload);
        }
        if let Some(key) = [(f.ip_dst, dport), (f.ip_src, sport)]
            .into_iter()
            .find(|k| self.tftp.contains_key(k))
        {
            let from_client = key == (f.ip_src, sport);
            return self.tftp_packet(at, key, from_client, payload);
        }
        Vec::new()
    }

    fn dhcp(&mut self, at: SystemTime, sport: u16, p: &[u8]) -> Option<WireEvidence> {
        let op = *p.first()?;
        let xid = u32::from_be_bytes(p.get(4..8)?.try_into().ok()?);
        let yiaddr = Ipv4Addr::from(<[u8; 4]>::try_from(p.get(16..20)?).ok()?);
        let mac = MacAddr(p.get(28..34)?.try_into().ok()?);
        if p.get(BOOTP_FIXED..BOOTP_FIXED + 4)? != DHCP_MAGIC {
            return None;
        }
        let mut msg_type = None;
        let mut ipxe = false;
        let mut vendor = String::new();
        let mut opts = p.get(BOOTP_FIXED + 4..)?;
        // RFC 2132 section 2: code, length, data; 0 is padding and 255 ends the list.
        while let Some((&code, rest)) = opts.split_first() {
            if code == 0 {
                opts = rest;
                continue;
            }
            if code == 255 {
                break;
            }
            let (&len, rest) = rest.split_first()?;
            let data = rest.get(..usize::from(len))?;
            match code {
                53 => msg_type = data.first().copied(),
                // Option 175 is iPXE's encapsulated block; user class 77 "iPXE" says the same.
                175 => ipxe = true,
                77 => ipxe |= data.windows(4).any(|w| w == b"iPXE"),
                60 => vendor = String::from_utf8_lossy(data).into_owned(),
                _ => {}
            }
            opts = rest.get(usize::from(len)..)?;
        }
        let counts = self.counts.entry(mac).or_default();
        counts.dhcp += 1;
        let from_client = op == 1;
        let name = match msg_type? {
            1 => "DISCOVER",
            2 => "OFFER",
            3 => "REQUEST",
            4 => "DECLINE",
            5 => "ACK",
            6 => "NAK",
            7 => "RELEASE",
            8 => "INFORM",
            _ => "OTHER",
        };
        let stage = match (msg_type?, from_client) {
            (1 | 3, true) if ipxe => Some(BootStage::IpxeDhcp),
            (1, true) => Some(BootStage::DhcpDiscover),
            (3, true) => Some(BootStage::DhcpRequest),
            (4, true) => Some(BootStage::DhcpDecline),
            (7, true) => Some(BootStage::DhcpRelease),
            (2, false) if yiaddr.is_unspecified() => Some(BootStage::ProxyOffer),
            (2, false) => Some(BootStage::DhcpOffer),
            (5, false) if sport == PXE_BOOT_SERVER_PORT => Some(BootStage::Proxy4011),
            (5, false) => Some(BootStage::DhcpAck),
            (6, false) => Some(BootStage::DhcpNak),
            _ => None,
        };
        let mut summary = format!("DHCP {name} xid={xid:08x}");
        if !yiaddr.is_unspecified() {
            summary.push_str(&format!(" yiaddr={yiaddr}"));
        }
        if ipxe {
            summary.push_str(" (iPXE)");
        }
        if !vendor.is_empty() {
            summary.push_str(&format!(" vendor={vendor}"));
        }
        Some(WireEvidence {
            at,
            mac,
            stage,
            summary,
        })
    }

    fn tftp_request(
        &mut self,
        at: SystemTime,
        f: &Frame<'_>,
        sport: u16,
        p: &[u8],
    ) -> Vec<WireEvidence> {
        let Some(opcode) = be16(p, 0) else {
            return Vec::new();
        };
        self.counts.entry(f.src).or_default().tftp += 1;
        if opcode != 1 {
            return vec![WireEvidence {
                at,
                mac: f.src,
                stage: None,
                summary: format!("TFTP opcode {opcode} to port 69"),
            }];
        }
        // RFC 1350 RRQ: filename NUL mode NUL, then RFC 2347 option NUL value NUL pairs.
        let fields: Vec<String> = p
            .get(2..)
            .unwrap_or_default()
            .split(|&b| b == 0)
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect();
        let file = fields.first().cloned().unwrap_or_default();
        let options: Vec<&str> = fields.iter().skip(2).map(String::as_str).collect();
        let key = (f.ip_src, sport);
        if self.tftp_order.len() >= TRACKED_FLOWS
            && let Some(old) = self.tftp_order.pop_front()
        {
            self.tftp.remove(&old);
        }
        self.tftp_order.push_back(key);
        self.tftp.insert(
            key,
            TftpTransfer {
                mac: f.src,
                file: file.clone(),
                blksize: TFTP_DEFAULT_BLKSIZE,
                last_block: None,
                done: false,
            },
        );
        vec![WireEvidence {
            at,
            mac: f.src,
            stage: Some(BootStage::TftpRequest),
            summary: format!("TFTP RRQ {file} {}", options.join(" ").trim()),
        }]
    }

    fn tftp_packet(
        &mut self,
        at: SystemTime,
        key: (Ipv4Addr, u16),
        from_client: bool,
        p: &[u8],
    ) -> Vec<WireEvidence> {
        let Some(t) = self.tftp.get_mut(&key) else {
            return Vec::new();
        };
        self.counts.entry(t.mac).or_default().tftp += 1;
        let Some(opcode) = be16(p, 0) else {
            return Vec::new();
        };
        let block = be16(p, 2);
        let ev = |stage, summary| {
            vec![WireEvidence {
                at,
                mac: t.mac,
                stage,
                summary,
            }]
        };
        match (opcode, from_client) {
            // DATA: a block shorter than blksize is the last one (RFC 1350 section 6).
            (3, false) => {
                let len = p.len().saturating_sub(4);
                if len < t.blksize {
                    t.last_block = block;
                }
                Vec::new()
            }
            (4, true) => {
                if !t.done && t.last_block.is_some() && block == t.last_block {
                    t.done = true;
                    let file = t.file.clone();
                    return ev(
                        Some(BootStage::TftpComplete),
                        format!("TFTP complete {file}"),
                    );
                }
                Vec::new()
            }
            // OACK (RFC 2347): take the block size the server agreed to.
            (6, false) => {
                let fields: Vec<String> = p
                    .get(2..)
                    .unwrap_or_default()
                    .split(|&b| b == 0)
                    .map(|s| String::from_utf8_lossy(s).to_ascii_lowercase())
                    .collect();
                for pair in fields.chunks(2) {
                    if let [name, value] = pair
                        && name == "blksize"
                        && let Ok(size) = value.parse()
                    {
                        t.blksize = size;
                    }
                }
                let file = t.file.clone();
                ev(
                    Some(BootStage::TftpOack),
                    format!("TFTP OACK {file} {}", fields.join(" ").trim()),
                )
            }
            (5, _) => {
                let code = block.unwrap_or(0);
                let msg: String = p
                    .get(4..)
                    .unwrap_or_default()
                    .split(|&b| b == 0)
                    .next()
                    .map(|s| String::from_utf8_lossy(s).into_owned())
                    .unwrap_or_default();
                let file = t.file.clone();
                let who = if from_client { "client" } else { "server" };
                let stage = if from_client && code == TFTP_ERR_OPTION_REFUSED {
                    BootStage::TftpProbe
                } else {
                    BootStage::TftpError
                };
                ev(
                    Some(stage),
                    format!("TFTP ERROR from {who} code {code} `{msg}` for {file}"),
                )
            }
            _ => Vec::new(),
        }
    }

    fn tcp(&mut self, at: SystemTime, f: &Frame<'_>) -> Vec<WireEvidence> {
        let (Some(sport), Some(dport)) = (be16(f.l4, 0), be16(f.l4, 2)) else {
            return Vec::new();
        };
        let Some(&off) = f.l4.get(12) else {
            return Vec::new();
        };
        let Some(payload) = f.l4.get(usize::from(off >> 4) * 4..) else {
            return Vec::new();
        };
        if payload.is_empty() {
            return Vec::new();
        }
        let line = first_line(payload);
        if let Some(path) = line
            .strip_prefix("GET ")
            .or_else(|| line.strip_prefix("HEAD "))
            .and_then(|rest| rest.split(' ').next())
        {
            self.counts.entry(f.src).or_default().http += 1;
            let key = (f.ip_src, sport);
            if !self.http.contains_key(&key) {
                if self.http_order.len() >= TRACKED_FLOWS
                    && let Some(old) = self.http_order.pop_front()
                {
                    self.http.remove(&old);
                }
                self.http_order.push_back(key);
            }
            self.http
                .entry(key)
                .or_default()
                .push_back(path.to_string());
            return vec![WireEvidence {
                at,
                mac: f.src,
                stage: None,
                summary: format!("HTTP {line}"),
            }];
        }
        if let Some(status) = line
            .strip_prefix("HTTP/1.")
            .and_then(|rest| rest.get(2..5))
            .and_then(|s| s.parse::<u16>().ok())
        {
            self.counts.entry(f.dst).or_default().http += 1;
            let path = self
                .http
                .get_mut(&(f.ip_dst, dport))
                .and_then(VecDeque::pop_front)
                .unwrap_or_default();
            let stage = if status >= 400 {
                Some(BootStage::HttpError)
            } else if (200..300).contains(&status) {
                classify_http_path(&path)
            } else {
                None
            };
            return vec![WireEvidence {
                at,
                mac: f.dst,
                stage,
                summary: format!("HTTP {status} for {path}"),
            }];
        }
        Vec::new()
    }
}

/// What a successfully served path most likely is. A heuristic on names: the server's own
/// events are the precise source; this is the wire's view.
pub fn classify_http_path(path: &str) -> Option<BootStage> {
    let p = path.to_ascii_lowercase();
    if p.contains("phone-home") {
        None
    } else if p.ends_with(".ipxe") || p.contains("script") {
        Some(BootStage::HttpScript)
    } else if p.contains("vmlinuz") || p.contains("kernel") || p.contains("bzimage") {
        Some(BootStage::HttpKernel)
    } else if p.contains("initrd") || p.contains("initramfs") {
        Some(BootStage::HttpInitrd)
    } else {
        Some(BootStage::HttpAsset)
    }
}

fn first_line(payload: &[u8]) -> String {
    let end = payload
        .iter()
        .position(|&b| b == b'\r' || b == b'\n')
        .unwrap_or(payload.len().min(200));
    String::from_utf8_lossy(payload.get(..end).unwrap_or_default()).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLIENT: [u8; 6] = [0x52, 0x54, 0, 0, 0, 1];
    const SERVER: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfe];

    fn udp_frame(
        src: [u8; 6],
        dst: [u8; 6],
        ips: ([u8; 4], [u8; 4]),
        ports: (u16, u16),
        payload: &[u8],
    ) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&dst);
        f.extend_from_slice(&src);
        f.extend_from_slice(&[8, 0]);
        let total = (20 + 8 + payload.len()) as u16;
        f.extend_from_slice(&[0x45, 0]);
        f.extend_from_slice(&total.to_be_bytes());
        f.extend_from_slice(&[0, 0, 0x40, 0, 64, PROTO_UDP, 0, 0]);
        f.extend_from_slice(&ips.0);
        f.extend_from_slice(&ips.1);
        f.extend_from_slice(&ports.0.to_be_bytes());
        f.extend_from_slice(&ports.1.to_be_bytes());
        f.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        f.extend_from_slice(&[0, 0]);
        f.extend_from_slice(payload);
        f
    }

    fn bootp(op: u8, msg: u8, yiaddr: [u8; 4], extra: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; BOOTP_FIXED];
        p[0] = op;
        p[4..8].copy_from_slice(&[1, 2, 3, 4]);
        p[16..20].copy_from_slice(&yiaddr);
        p[28..34].copy_from_slice(&CLIENT);
        p.extend_from_slice(&DHCP_MAGIC);
        p.extend_from_slice(&[53, 1, msg]);
        p.extend_from_slice(extra);
        p.push(255);
        p
    }

    const C_IP: [u8; 4] = [10, 0, 0, 100];
    const S_IP: [u8; 4] = [10, 0, 0, 1];

    #[test]
    fn dhcp_stages_from_the_wire() {
        let mut t = WireTracker::new();
        let now = SystemTime::now();
        let disc = udp_frame(
            CLIENT,
            [0xff; 6],
            ([0; 4], [255; 4]),
            (68, 67),
            &bootp(1, 1, [0; 4], &[]),
        );
        let ev = t.observe(now, &disc);
        assert_eq!(ev[0].stage, Some(BootStage::DhcpDiscover));
        assert_eq!(ev[0].mac, MacAddr(CLIENT));
        let ack = udp_frame(
            SERVER,
            CLIENT,
            (S_IP, C_IP),
            (67, 68),
            &bootp(2, 5, C_IP, &[]),
        );
        let ev = t.observe(now, &ack);
        assert_eq!(ev[0].stage, Some(BootStage::DhcpAck));
        assert!(
            ev[0].summary.contains("yiaddr=10.0.0.100"),
            "{}",
            ev[0].summary
        );
        let ipxe = udp_frame(
            CLIENT,
            [0xff; 6],
            ([0; 4], [255; 4]),
            (68, 67),
            &bootp(1, 1, [0; 4], &[175, 2, 1, 1]),
        );
        assert_eq!(t.observe(now, &ipxe)[0].stage, Some(BootStage::IpxeDhcp));
        // Truncated options: no panic, no evidence.
        let mut cut = bootp(1, 1, [0; 4], &[60, 50, 1]);
        cut.pop();
        let bad = udp_frame(CLIENT, [0xff; 6], ([0; 4], [255; 4]), (68, 67), &cut);
        assert!(t.observe(now, &bad).is_empty());
        assert_eq!(t.counts()[&MacAddr(CLIENT)].dhcp, 3);
    }

    fn tftp(op: u16, rest: &[u8]) -> Vec<u8> {
        let mut p = op.to_be_bytes().to_vec();
        p.extend_from_slice(rest);
        p
    }

    #[test]
    fn tftp_transfer_completes_and_errors() {
        let mut t = WireTracker::new();
        let now = SystemTime::now();
        let c = |ports, p: &[u8]| udp_frame(CLIENT, SERVER, (C_IP, S_IP), ports, p);
        let s = |ports, p: &[u8]| udp_frame(SERVER, CLIENT, (S_IP, C_IP), ports, p);
        let rrq = c((2000, 69), &tftp(1, b"boot.ipxe\0octet\0blksize\x001024\0"));
        assert_eq!(t.observe(now, &rrq)[0].stage, Some(BootStage::TftpRequest));
        let oack = s((3000, 2000), &tftp(6, b"blksize\x001024\0"));
        assert_eq!(t.observe(now, &oack)[0].stage, Some(BootStage::TftpOack));
        let full = s(
            (3000, 2000),
            &[&tftp(3, &[0, 1])[..], &[7u8; 1024][..]].concat(),
        );
        assert!(t.observe(now, &full).is_empty());
        assert!(
            t.observe(now, &c((2000, 3000), &tftp(4, &[0, 1])))
                .is_empty()
        );
        let short = s(
            (3000, 2000),
            &[&tftp(3, &[0, 2])[..], &[7u8; 10][..]].concat(),
        );
        assert!(t.observe(now, &short).is_empty());
        let done = t.observe(now, &c((2000, 3000), &tftp(4, &[0, 2])));
        assert_eq!(done[0].stage, Some(BootStage::TftpComplete));

        let rrq = c((2001, 69), &tftp(1, b"missing\0octet\0"));
        t.observe(now, &rrq);
        let err = t.observe(now, &s((3001, 2001), &tftp(5, b"\0\x01File not found\0")));
        assert_eq!(err[0].stage, Some(BootStage::TftpError));
        assert!(err[0].summary.contains("File not found"));

        let rrq = c((2002, 69), &tftp(1, b"probe\0octet\0tsize\x000\0"));
        t.observe(now, &rrq);
        let probe = t.observe(now, &c((2002, 3002), &tftp(5, b"\0\x08\0")));
        assert_eq!(probe[0].stage, Some(BootStage::TftpProbe));
    }

    #[test]
    fn garbage_frames_are_ignored() {
        let mut t = WireTracker::new();
        for len in 0..80 {
            let junk: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            t.observe(SystemTime::now(), &junk);
        }
        let mut f = udp_frame(CLIENT, SERVER, (C_IP, S_IP), (68, 67), &[1, 2, 3]);
        f.truncate(30);
        assert!(t.observe(SystemTime::now(), &f).is_empty());
    }

    #[test]
    fn http_paths() {
        assert_eq!(
            classify_http_path("/boot/vmlinuz"),
            Some(BootStage::HttpKernel)
        );
        assert_eq!(
            classify_http_path("/x/initrd.gz"),
            Some(BootStage::HttpInitrd)
        );
        assert_eq!(
            classify_http_path("/boot.ipxe"),
            Some(BootStage::HttpScript)
        );
        assert_eq!(classify_http_path("/api/phone-home?x"), None);
    }
}
