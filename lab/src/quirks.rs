//! Firmware quirk profiles: a [`FrameFilter`] on a machine's switch port that rewrites the
//! DHCP and TFTP packets the firmware sends or receives, so a VM behaves like a machine with a
//! documented bug (firmware-quirks.md). A profile is TOML: rules that match on packet fields and
//! then strip, set or rewrite options and header fields, drop, delay or duplicate the packet.
//! The built-in profiles live in `lab/quirks/*.toml`; each names its source and says how to
//! show both sides in the lab (a server that does not compensate fails at the stage the source
//! describes, pxed's defaults boot through).
//!
//! Packets are parsed here (Ethernet, IPv4, UDP) and DHCP with pxed's own codec; after an edit
//! the IPv4 total length and header checksum and the UDP length and checksum are recomputed.

use std::collections::{BTreeMap, VecDeque};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use pxed::dhcp::wire::DhcpPacket;
use pxed::stage::BootStage;
use serde::{Deserialize, Serialize};

use crate::impair::{Impair, ImpairConfig, Ways};
use crate::switch::{Chain, Direction, FrameFilter, PassThrough};

/// The built-in profiles, compiled in so `pxelab quirks` works from any directory.
pub const BUILTIN: &[(&str, &str)] = &[
    ("header-only", include_str!("../quirks/header-only.toml")),
    ("options-only", include_str!("../quirks/options-only.toml")),
    (
        "requires-option-60",
        include_str!("../quirks/requires-option-60.toml"),
    ),
    (
        "requires-option-43",
        include_str!("../quirks/requires-option-43.toml"),
    ),
    ("no-4011", include_str!("../quirks/no-4011.toml")),
    (
        "arch-9-for-x64",
        include_str!("../quirks/arch-9-for-x64.toml"),
    ),
    ("no-arch", include_str!("../quirks/no-arch.toml")),
    ("tsize-probe", include_str!("../quirks/tsize-probe.toml")),
    (
        "blksize-over-mtu",
        include_str!("../quirks/blksize-over-mtu.toml"),
    ),
    (
        "broken-windowsize",
        include_str!("../quirks/broken-windowsize.toml"),
    ),
    (
        "broadcast-flag",
        include_str!("../quirks/broadcast-flag.toml"),
    ),
    (
        "dup-discover-no-uuid",
        include_str!("../quirks/dup-discover-no-uuid.toml"),
    ),
];

const ETH_HEADER: usize = 14;
const ETHERTYPE_IPV4: u16 = 0x0800;
const PROTO_UDP: u8 = 17;
const DHCP_PORTS: [u16; 3] = [67, 68, 4011];
const TFTP_PORT: u16 = 69;
/// TFTP transfers remembered per port, to recognise the server's replies to a client's RRQ;
/// a boot makes a handful.
const TFTP_FLOWS: usize = 64;
/// Extra copies one rule may make of a packet: more is a flood, not a quirk.
const MAX_DUPLICATES: u32 = 16;

/// A DHCP message type, by its RFC 2132 9.6 name.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DhcpKind {
    /// 1
    Discover,
    /// 2
    Offer,
    /// 3
    Request,
    /// 4
    Decline,
    /// 5
    Ack,
    /// 6
    Nak,
    /// 7
    Release,
    /// 8
    Inform,
}

impl DhcpKind {
    fn code(self) -> u8 {
        self as u8 + 1
    }
}

/// A TFTP packet type (RFC 1350 section 5, OACK RFC 2347).
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TftpKind {
    /// 1
    Rrq,
    /// 2
    Wrq,
    /// 3
    Data,
    /// 4
    Ack,
    /// 5
    Error,
    /// 6
    Oack,
}

impl TftpKind {
    fn code(self) -> u16 {
        self as u16 + 1
    }
}

/// A DHCP option to set: `text` or `hex` bytes (`"00:07"` or `"0007"`).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SetOption {
    /// The option code.
    pub code: u8,
    /// The value as text.
    pub text: Option<String>,
    /// The value as hex bytes.
    pub hex: Option<String>,
}

impl SetOption {
    fn bytes(&self) -> Result<Vec<u8>> {
        match (&self.text, &self.hex) {
            (Some(t), None) => Ok(t.as_bytes().to_vec()),
            (None, Some(h)) => parse_hex(h),
            _ => bail!("set_option {}: give exactly one of text or hex", self.code),
        }
    }
}

fn parse_hex(h: &str) -> Result<Vec<u8>> {
    let digits: String = h
        .chars()
        .filter(|c| !matches!(c, ':' | ' ' | '-'))
        .collect();
    if !digits.len().is_multiple_of(2) {
        bail!("hex `{h}`: odd number of digits");
    }
    (0..digits.len())
        .step_by(2)
        .map(|i| {
            digits
                .get(i..i + 2)
                .and_then(|d| u8::from_str_radix(d, 16).ok())
                .with_context(|| format!("hex `{h}`: not hex"))
        })
        .collect()
}

/// One rule: which packets (all given matchers must hold), then what to do with them.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// `from-client` (what the firmware sends), `to-client` (what it sees), or `both`.
    pub direction: Ways,
    /// Match DHCP messages of these types (empty: any DHCP message, if the rule is about DHCP).
    #[serde(default)]
    pub dhcp: Vec<DhcpKind>,
    /// Match TFTP packets of these types.
    #[serde(default)]
    pub tftp: Vec<TftpKind>,
    /// Match UDP packets to this destination port.
    pub udp_port: Option<u16>,
    /// Match IPv4 fragments (first, middle and last pieces of a datagram bigger than the link
    /// MTU), e.g. to drop them like a ROM that cannot reassemble (Q7). Only `drop`, `delay`
    /// and `duplicate` act on them; every other matcher needs a whole UDP datagram, so
    /// fragments pass all other rules untouched.
    #[serde(default)]
    pub ip_fragments: bool,
    /// Match by destination IP: `true` only unicast packets, `false` only broadcast and
    /// multicast ones (a firmware that cannot take unicast before it has an address: Q11).
    pub unicast: Option<bool>,
    /// Match DHCP messages that carry all these options.
    #[serde(default)]
    pub has_option: Vec<u8>,
    /// Match DHCP messages that lack all these options.
    #[serde(default)]
    pub lacks_option: Vec<u8>,
    /// Match TFTP requests/OACKs that carry this option (by name, any case).
    pub tftp_has_option: Option<String>,
    /// Match only the firmware's PXE exchanges: client messages whose option 60 starts with
    /// `PXEClient`, and replies to them (by xid). The OS's DHCP client later in the boot is
    /// left alone.
    #[serde(default)]
    pub only_pxe: bool,
    /// Act only on the first this-many matches (e.g. only the first DISCOVER).
    pub times: Option<u32>,

    /// Drop the packet.
    #[serde(default)]
    pub drop: bool,
    /// Hold the packet this long.
    #[serde(default, with = "humantime_serde")]
    pub delay: Option<Duration>,
    /// Send this many extra copies.
    #[serde(default)]
    pub duplicate: u32,
    /// Space between the copies.
    #[serde(default, with = "humantime_serde")]
    pub duplicate_gap: Option<Duration>,
    /// DHCP: remove these options.
    #[serde(default)]
    pub strip_options: Vec<u8>,
    /// DHCP: set (add or replace) these options.
    #[serde(default)]
    pub set_option: Vec<SetOption>,
    /// DHCP header: set `siaddr` ("0.0.0.0" clears it).
    pub siaddr: Option<Ipv4Addr>,
    /// DHCP header: set `sname` ("" clears it).
    pub sname: Option<String>,
    /// DHCP header: set `file` ("" clears it).
    pub file: Option<String>,
    /// DHCP header: set (true) or clear (false) the broadcast flag (RFC 2131 figure 2).
    pub broadcast: Option<bool>,
    /// TFTP RRQ/OACK: set these options (name = value).
    #[serde(default)]
    pub tftp_set: BTreeMap<String, String>,
    /// TFTP RRQ/OACK: remove these options.
    #[serde(default)]
    pub tftp_strip: Vec<String>,
}

impl Rule {
    fn is_dhcp(&self) -> bool {
        self.only_pxe
            || !self.dhcp.is_empty()
            || !self.has_option.is_empty()
            || !self.lacks_option.is_empty()
            || !self.strip_options.is_empty()
            || !self.set_option.is_empty()
            || self.siaddr.is_some()
            || self.sname.is_some()
            || self.file.is_some()
            || self.broadcast.is_some()
    }

    fn edits_dhcp(&self) -> bool {
        !self.strip_options.is_empty()
            || !self.set_option.is_empty()
            || self.siaddr.is_some()
            || self.sname.is_some()
            || self.file.is_some()
            || self.broadcast.is_some()
    }

    fn is_tftp(&self) -> bool {
        !self.tftp.is_empty()
            || self.tftp_has_option.is_some()
            || !self.tftp_set.is_empty()
            || !self.tftp_strip.is_empty()
    }

    fn validate(&self, i: usize) -> Result<()> {
        if self.is_dhcp() && self.is_tftp() {
            bail!("rule {i}: a rule is about DHCP or TFTP, not both");
        }
        if self.direction == Ways::Both && (self.is_dhcp() || self.is_tftp()) {
            bail!("rule {i}: say direction = \"from-client\" or \"to-client\"");
        }
        if self.ip_fragments
            && (self.is_dhcp()
                || self.is_tftp()
                || self.udp_port.is_some()
                || self.unicast.is_some())
        {
            bail!("rule {i}: ip_fragments matches pieces of datagrams, not DHCP, TFTP or ports");
        }
        if self.duplicate > MAX_DUPLICATES {
            bail!("rule {i}: at most {MAX_DUPLICATES} duplicates");
        }
        for s in &self.set_option {
            s.bytes().with_context(|| format!("rule {i}"))?;
        }
        if let Some(s) = &self.sname
            && s.len() > 63
        {
            bail!("rule {i}: sname holds 63 bytes");
        }
        if let Some(f) = &self.file
            && f.len() > 127
        {
            bail!("rule {i}: file holds 127 bytes");
        }
        Ok(())
    }
}

/// The server setup that does not compensate, for `pxelab quirks --check`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Check {
    /// A lab in `lab/labs` to run with the profile on every machine.
    pub lab: String,
    /// Keep only this machine of the lab.
    pub machine: Option<String>,
    /// Merged into the lab's pxed config for the failing run (e.g. `{ dhcp = { pxe_vendor_option = false } }`).
    #[serde(default)]
    pub fail_config: toml::Table,
    /// The stage the failing run must fail at (what the source describes). None: the lab
    /// has no server setup that fails on this quirk yet, and the check only shows pxed booting.
    pub fail_stage: Option<BootStage>,
    /// Stages the failing run's oracle lets pass (`[oracle] tolerate`), so the stage the
    /// firmware fails at decides: pxed's own `tftp.error` for a transfer the client gave up on
    /// and the firmware's console message come within milliseconds, in either order.
    #[serde(default)]
    pub fail_tolerate: Vec<BootStage>,
    /// The failing run's deadlines are cut to this (wall clock), so a stall fails fast.
    #[serde(default, with = "humantime_serde")]
    pub fail_within: Option<Duration>,
    /// Link impairments for both runs (e.g. an MTU cap).
    pub impair: Option<ImpairConfig>,
    /// The server's interface MTU for both runs (`[server] mtu`: a server behind a smaller-MTU
    /// link than the machine's).
    pub server_mtu: Option<u32>,
    /// Whether the check belongs to the default test suite (else `pxelab quirks --check`).
    #[serde(default)]
    pub in_default_suite: bool,
}

/// A quirk profile.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct QuirkProfile {
    /// Its name.
    pub name: String,
    /// One line: what the firmware does.
    pub summary: String,
    /// Where this is documented (firmware-quirks.md entry and its sources).
    pub source: String,
    /// Which stage a server that does not compensate fails at, in words.
    pub symptom: Option<String>,
    /// The rules, applied in order; every matching rule acts.
    #[serde(rename = "rule", default)]
    pub rules: Vec<Rule>,
    /// How to show both sides in the lab.
    pub check: Option<Check>,
}

impl QuirkProfile {
    /// Parse and validate profile TOML.
    pub fn parse(text: &str) -> Result<Self> {
        let p: QuirkProfile = toml::from_str(text)?;
        if p.rules.is_empty() {
            bail!("profile `{}` has no [[rule]]", p.name);
        }
        for (i, r) in p.rules.iter().enumerate() {
            r.validate(i)?;
        }
        if let Some(c) = &p.check
            && let Some(i) = &c.impair
        {
            i.validate()?;
        }
        Ok(p)
    }

    /// A built-in profile by name.
    pub fn builtin(name: &str) -> Option<Result<Self>> {
        BUILTIN
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(n, text)| Self::parse(text).with_context(|| format!("built-in profile `{n}`")))
    }

    /// All built-in profiles.
    pub fn builtins() -> Result<Vec<Self>> {
        BUILTIN
            .iter()
            .map(|(n, text)| Self::parse(text).with_context(|| format!("built-in profile `{n}`")))
            .collect()
    }

    /// A built-in name, or a path to a profile file (anything ending in `.toml`).
    pub fn resolve(spec: &str) -> Result<Self> {
        if is_path(spec) {
            let text = std::fs::read_to_string(spec).with_context(|| format!("reading {spec}"))?;
            return Self::parse(&text).with_context(|| format!("in {spec}"));
        }
        Self::builtin(spec).unwrap_or_else(|| {
            bail!(
                "no quirk profile `{spec}` (built-in: {}; or give a .toml path)",
                BUILTIN
                    .iter()
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
    }
}

/// Whether a quirk reference is a file path rather than a built-in name.
pub fn is_path(spec: &str) -> bool {
    spec.ends_with(".toml")
}

/// Make a relative profile path relative to `base` (the lab file's directory).
pub fn rebase(spec: &str, base: &Path) -> String {
    if is_path(spec) && Path::new(spec).is_relative() {
        base.join(spec).to_string_lossy().into_owned()
    } else {
        spec.to_string()
    }
}

/// The filter for one machine's port: its quirk profiles next to the machine, then its link
/// impairments.
pub fn port_filter(
    quirks: &[String],
    impair: Option<&ImpairConfig>,
    start: Instant,
) -> Result<Box<dyn FrameFilter>> {
    let mut chain: Vec<Box<dyn FrameFilter>> = Vec::new();
    if !quirks.is_empty() {
        let profiles = quirks
            .iter()
            .map(|q| QuirkProfile::resolve(q))
            .collect::<Result<Vec<_>>>()?;
        chain.push(Box::new(QuirkFilter::new(profiles)));
    }
    if let Some(cfg) = impair {
        cfg.validate()?;
        chain.push(Box::new(Impair::new(cfg.clone(), start)));
    }
    Ok(match chain.len() {
        0 => Box::new(PassThrough),
        _ => Box::new(Chain(chain)),
    })
}

/// Offsets of a parsed IPv4/UDP frame.
pub(crate) struct UdpView {
    ip: usize,
    ihl: usize,
    pub(crate) src: Ipv4Addr,
    pub(crate) dst: Ipv4Addr,
    pub(crate) sport: u16,
    pub(crate) dport: u16,
    pub(crate) payload: std::ops::Range<usize>,
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

/// The IPv4/UDP view of an Ethernet frame (None for anything else, and for IP fragments).
pub(crate) fn parse_udp(frame: &[u8]) -> Option<UdpView> {
    if be16(frame, 12)? != ETHERTYPE_IPV4 {
        return None;
    }
    let ip = ETH_HEADER;
    let vihl = *frame.get(ip)?;
    let ihl = usize::from(vihl & 0x0f) * 4;
    let total = usize::from(be16(frame, ip + 2)?);
    // A fragment's payload is not a whole UDP datagram: leave fragments alone.
    let frag = be16(frame, ip + 6)?;
    if vihl >> 4 != 4 || ihl < 20 || frag & 0x3fff != 0 || *frame.get(ip + 9)? != PROTO_UDP {
        return None;
    }
    let udp = ip + ihl;
    let end = ip + total;
    if end > frame.len() || udp + 8 > end {
        return None;
    }
    let udp_len = usize::from(be16(frame, udp + 4)?);
    if udp_len < 8 || udp + udp_len > end {
        return None;
    }
    Some(UdpView {
        ip,
        ihl,
        src: Ipv4Addr::from(<[u8; 4]>::try_from(frame.get(ip + 12..ip + 16)?).ok()?),
        dst: Ipv4Addr::from(<[u8; 4]>::try_from(frame.get(ip + 16..ip + 20)?).ok()?),
        sport: be16(frame, udp)?,
        dport: be16(frame, udp + 2)?,
        payload: udp + 8..udp + udp_len,
    })
}

/// RFC 1071 ones'-complement sum.
fn checksum_add(mut sum: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    sum
}

fn checksum_fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Rebuild a frame around a new UDP payload: IPv4 total length and header checksum (RFC 791),
/// UDP length and checksum over the pseudo-header (RFC 768; a computed 0 is sent as 0xffff).
fn rebuild(frame: &[u8], v: &UdpView, payload: &[u8]) -> Option<Vec<u8>> {
    let udp_len = u16::try_from(8 + payload.len()).ok()?;
    let total = u16::try_from(v.ihl + 8 + payload.len()).ok()?;
    let mut out = Vec::with_capacity(v.ip + usize::from(total));
    out.extend_from_slice(frame.get(..v.ip + v.ihl)?);
    out.get_mut(v.ip + 2..v.ip + 4)?
        .copy_from_slice(&total.to_be_bytes());
    out.get_mut(v.ip + 10..v.ip + 12)?.copy_from_slice(&[0, 0]);
    let ip_sum = checksum_fold(checksum_add(0, out.get(v.ip..v.ip + v.ihl)?));
    out.get_mut(v.ip + 10..v.ip + 12)?
        .copy_from_slice(&ip_sum.to_be_bytes());
    let mut udp = Vec::with_capacity(usize::from(udp_len));
    udp.extend_from_slice(&v.sport.to_be_bytes());
    udp.extend_from_slice(&v.dport.to_be_bytes());
    udp.extend_from_slice(&udp_len.to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    let mut sum = checksum_add(0, &v.src.octets());
    sum = checksum_add(sum, &v.dst.octets());
    sum += u32::from(PROTO_UDP) + u32::from(udp_len);
    sum = checksum_add(sum, &udp);
    let udp_sum = match checksum_fold(sum) {
        0 => 0xffff,
        s => s,
    };
    udp.get_mut(6..8)?.copy_from_slice(&udp_sum.to_be_bytes());
    out.extend_from_slice(&udp);
    // Ethernet minimum frame: pad (the IP total length tells receivers where the packet ends).
    if out.len() < 60 {
        out.resize(60, 0);
    }
    Some(out)
}

/// A new Ethernet/IPv4/UDP frame with correct lengths and checksums (TTL 64, DF clear).
pub fn udp_frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut head = Vec::with_capacity(ETH_HEADER + 28);
    head.extend_from_slice(&dst_mac);
    head.extend_from_slice(&src_mac);
    head.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
    head.extend_from_slice(&[0x45, 0, 0, 0, 0, 0, 0, 0, 64, PROTO_UDP, 0, 0]);
    head.extend_from_slice(&src.octets());
    head.extend_from_slice(&dst.octets());
    let v = UdpView {
        ip: ETH_HEADER,
        ihl: 20,
        src,
        dst,
        sport,
        dport,
        payload: 0..0,
    };
    rebuild(&head, &v, payload).unwrap_or(head)
}

/// A TFTP request or OACK split into its fixed fields and its options (RFC 2347).
struct TftpOpts {
    opcode: u16,
    head: Vec<Vec<u8>>,
    options: Vec<(String, String)>,
}

fn parse_tftp_opts(p: &[u8]) -> Option<TftpOpts> {
    let opcode = be16(p, 0)?;
    let heads = match opcode {
        1 | 2 => 2,
        6 => 0,
        _ => return None,
    };
    let body = p.get(2..)?;
    let body = body.strip_suffix(&[0]).unwrap_or(body);
    let fields: Vec<&[u8]> = body.split(|&b| b == 0).collect();
    let head: Vec<Vec<u8>> = fields.iter().take(heads).map(|f| f.to_vec()).collect();
    let options = fields
        .get(heads..)?
        .chunks(2)
        .filter_map(|c| match c {
            [n, v] => Some((
                String::from_utf8_lossy(n).into_owned(),
                String::from_utf8_lossy(v).into_owned(),
            )),
            _ => None,
        })
        .collect();
    Some(TftpOpts {
        opcode,
        head,
        options,
    })
}

impl TftpOpts {
    fn encode(&self) -> Vec<u8> {
        let mut out = self.opcode.to_be_bytes().to_vec();
        for h in &self.head {
            out.extend_from_slice(h);
            out.push(0);
        }
        for (n, v) in &self.options {
            out.extend_from_slice(n.as_bytes());
            out.push(0);
            out.extend_from_slice(v.as_bytes());
            out.push(0);
        }
        out
    }
}

/// What a packet is, for matching.
enum Kind {
    Dhcp(Box<DhcpPacket>),
    Tftp { opcode: u16 },
    Udp,
}

/// The filter running one or more profiles on a port.
pub struct QuirkFilter {
    rules: Vec<(Rule, u32)>,
    /// Client (address, port) pairs that sent an RRQ: replies to them are TFTP.
    tftp_clients: VecDeque<(Ipv4Addr, u16)>,
    /// Transaction ids of the PXE client's DHCP messages (for `only_pxe`).
    pxe_xids: VecDeque<u32>,
    /// Packets each rule acted on, for tests and reports.
    pub hits: Vec<u64>,
}

impl QuirkFilter {
    /// A filter applying the profiles' rules in order.
    pub fn new(profiles: Vec<QuirkProfile>) -> Self {
        let rules: Vec<(Rule, u32)> = profiles
            .into_iter()
            .flat_map(|p| p.rules)
            .map(|r| (r, 0))
            .collect();
        QuirkFilter {
            hits: vec![0; rules.len()],
            rules,
            tftp_clients: VecDeque::new(),
            pxe_xids: VecDeque::new(),
        }
    }

    fn classify(&mut self, dir: Direction, frame: &[u8], v: &UdpView) -> Kind {
        let payload = frame.get(v.payload.clone()).unwrap_or_default();
        if DHCP_PORTS.contains(&v.sport) && DHCP_PORTS.contains(&v.dport) {
            return match DhcpPacket::decode(payload) {
                Ok(p) => {
                    let pxe = p
                        .options
                        .get(60)
                        .is_some_and(|v| v.starts_with(b"PXEClient"));
                    if dir == Direction::Ingress && pxe && !self.pxe_xids.contains(&p.xid) {
                        if self.pxe_xids.len() >= TFTP_FLOWS {
                            self.pxe_xids.pop_front();
                        }
                        self.pxe_xids.push_back(p.xid);
                    }
                    Kind::Dhcp(Box::new(p))
                }
                Err(_) => Kind::Udp,
            };
        }
        let opcode = be16(payload, 0).unwrap_or(0);
        if dir == Direction::Ingress && v.dport == TFTP_PORT {
            let key = (v.src, v.sport);
            if !self.tftp_clients.contains(&key) {
                if self.tftp_clients.len() >= TFTP_FLOWS {
                    self.tftp_clients.pop_front();
                }
                self.tftp_clients.push_back(key);
            }
            return Kind::Tftp { opcode };
        }
        let key = match dir {
            Direction::Ingress => (v.src, v.sport),
            Direction::Egress => (v.dst, v.dport),
        };
        if self.tftp_clients.contains(&key) {
            return Kind::Tftp { opcode };
        }
        Kind::Udp
    }
}

fn rule_matches(
    rule: &Rule,
    dir: Direction,
    kind: &Kind,
    v: Option<&UdpView>,
    payload: &[u8],
    pxe_xids: &VecDeque<u32>,
) -> bool {
    let way = match dir {
        Direction::Ingress => Ways::FromClient,
        Direction::Egress => Ways::ToClient,
    };
    if rule.direction != Ways::Both && rule.direction != way {
        return false;
    }
    if rule.ip_fragments {
        return false;
    }
    if let Some(port) = rule.udp_port
        && v.is_none_or(|v| v.dport != port)
    {
        return false;
    }
    if let Some(unicast) = rule.unicast
        && v.is_none_or(|v| (!v.dst.is_broadcast() && !v.dst.is_multicast()) != unicast)
    {
        return false;
    }
    if rule.is_dhcp() {
        let Kind::Dhcp(p) = kind else {
            return false;
        };
        if rule.only_pxe && !pxe_xids.contains(&p.xid) {
            return false;
        }
        let t = p.message_type().map(|t| t.code());
        if !rule.dhcp.is_empty() && !rule.dhcp.iter().any(|k| Some(k.code()) == t) {
            return false;
        }
        if !rule.has_option.iter().all(|&c| p.options.contains(c))
            || rule.lacks_option.iter().any(|&c| p.options.contains(c))
        {
            return false;
        }
        return true;
    }
    if rule.is_tftp() {
        let Kind::Tftp { opcode } = kind else {
            return false;
        };
        if !rule.tftp.is_empty() && !rule.tftp.iter().any(|k| k.code() == *opcode) {
            return false;
        }
        if let Some(name) = &rule.tftp_has_option {
            let has = parse_tftp_opts(payload)
                .is_some_and(|t| t.options.iter().any(|(n, _)| n.eq_ignore_ascii_case(name)));
            if !has {
                return false;
            }
        }
        return true;
    }
    // Port-only rules (and rules with no matcher) act on any UDP packet.
    true
}

fn edit_dhcp(rule: &Rule, p: &mut DhcpPacket) {
    for &c in &rule.strip_options {
        p.options.remove(c);
    }
    for s in &rule.set_option {
        // Validated when the profile was parsed.
        if let Ok(b) = s.bytes() {
            p.options.set(s.code, b);
        }
    }
    if let Some(ip) = rule.siaddr {
        p.siaddr = ip;
    }
    if let Some(s) = &rule.sname {
        p.sname = s.as_bytes().to_vec();
    }
    if let Some(f) = &rule.file {
        p.file = f.as_bytes().to_vec();
    }
    // RFC 2131 figure 2: the broadcast bit is the top bit of `flags`.
    match rule.broadcast {
        Some(true) => p.flags |= 0x8000,
        Some(false) => p.flags &= !0x8000,
        None => {}
    }
}

fn edit_tftp(rule: &Rule, t: &mut TftpOpts) {
    t.options
        .retain(|(n, _)| !rule.tftp_strip.iter().any(|s| s.eq_ignore_ascii_case(n)));
    for (name, value) in &rule.tftp_set {
        match t
            .options
            .iter_mut()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
        {
            Some(slot) => slot.1 = value.clone(),
            None => t.options.push((name.clone(), value.clone())),
        }
    }
}

impl QuirkFilter {
    /// An IPv4 fragment: only `ip_fragments` rules act on it (drop, delay, duplicate).
    fn on_fragment(&mut self, dir: Direction, frame: Vec<u8>) -> Vec<(Duration, Vec<u8>)> {
        let way = match dir {
            Direction::Ingress => Ways::FromClient,
            Direction::Egress => Ways::ToClient,
        };
        let mut delay = Duration::ZERO;
        let mut copies = 0u32;
        let mut gap = Duration::ZERO;
        for (i, (rule, used)) in self.rules.iter_mut().enumerate() {
            if !rule.ip_fragments
                || (rule.direction != Ways::Both && rule.direction != way)
                || rule.times.is_some_and(|t| *used >= t)
            {
                continue;
            }
            *used += 1;
            if let Some(h) = self.hits.get_mut(i) {
                *h += 1;
            }
            if rule.drop {
                return Vec::new();
            }
            delay += rule.delay.unwrap_or_default();
            copies = copies.saturating_add(rule.duplicate);
            gap = gap.max(rule.duplicate_gap.unwrap_or_default());
        }
        spaced_copies(frame, delay, copies, gap)
    }
}

/// The frame after `delay`, then `copies` more, `gap` apart.
fn spaced_copies(
    frame: Vec<u8>,
    delay: Duration,
    copies: u32,
    gap: Duration,
) -> Vec<(Duration, Vec<u8>)> {
    (0..=copies)
        .map(|i| (delay + gap * i, frame.clone()))
        .collect()
}

impl FrameFilter for QuirkFilter {
    fn on_frame(
        &mut self,
        dir: Direction,
        frame: Vec<u8>,
        _now: Instant,
    ) -> Vec<(Duration, Vec<u8>)> {
        if crate::impair::is_ipv4_fragment(&frame) {
            return self.on_fragment(dir, frame);
        }
        let Some(v) = parse_udp(&frame) else {
            return vec![(Duration::ZERO, frame)];
        };
        let mut kind = self.classify(dir, &frame, &v);
        let mut payload = frame.get(v.payload.clone()).unwrap_or_default().to_vec();
        let mut edited = false;
        let mut delay = Duration::ZERO;
        let mut copies = 0u32;
        let mut gap = Duration::ZERO;
        for (i, (rule, used)) in self.rules.iter_mut().enumerate() {
            if !rule_matches(rule, dir, &kind, Some(&v), &payload, &self.pxe_xids) {
                continue;
            }
            if rule.times.is_some_and(|t| *used >= t) {
                continue;
            }
            *used += 1;
            if let Some(h) = self.hits.get_mut(i) {
                *h += 1;
            }
            if rule.drop {
                return Vec::new();
            }
            if let Kind::Dhcp(p) = &mut kind
                && rule.edits_dhcp()
            {
                edit_dhcp(rule, p);
                edited = true;
            }
            if rule.is_tftp()
                && (!rule.tftp_set.is_empty() || !rule.tftp_strip.is_empty())
                && let Some(mut t) = parse_tftp_opts(&payload)
            {
                edit_tftp(rule, &mut t);
                payload = t.encode();
                edited = true;
            }
            delay += rule.delay.unwrap_or_default();
            copies = copies.saturating_add(rule.duplicate);
            gap = gap.max(rule.duplicate_gap.unwrap_or_default());
        }
        if let Kind::Dhcp(p) = &kind
            && edited
        {
            // Keep the client's option order where it had one (encode puts 53 and 54 first).
            payload = p.encode(&[]);
        }
        let out = if edited {
            match rebuild(&frame, &v, &payload) {
                Some(f) => f,
                None => frame,
            }
        } else {
            frame
        };
        spaced_copies(out, delay, copies, gap)
    }
}

/// Which side of a check a run is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    /// The server setup that does not compensate: must fail at the check's stage.
    Fails,
    /// pxed with its defaults: must boot.
    Boots,
}

/// Deep-merge `over` into `base` (tables merge, everything else replaces).
pub fn merge_toml(base: &mut toml::Table, over: &toml::Table) {
    for (k, v) in over {
        match (base.get_mut(k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge_toml(b, o),
            _ => {
                base.insert(k.clone(), v.clone());
            }
        }
    }
}

/// The lab for one side of a profile's check: the check's lab with the profile on every
/// machine; for the failing side the pxed config merged with `fail_config` (written to
/// `scratch`) and deadlines cut to `fail_within`.
pub fn check_lab(
    profile: &QuirkProfile,
    spec: &str,
    side: Side,
    labs_dir: &Path,
    scratch: &Path,
) -> Result<crate::labfile::LabFile> {
    let check = profile
        .check
        .as_ref()
        .with_context(|| format!("profile `{}` has no [check]", profile.name))?;
    let mut lab = crate::labfile::LabFile::load(&labs_dir.join(&check.lab))?;
    lab.lab.name = format!(
        // Short: QEMU's socket path lives in the run directory named after the lab, and a
        // unix socket path holds at most 107 bytes.
        "q-{}-{}",
        profile.name,
        match side {
            Side::Fails => "fail",
            Side::Boots => "boot",
        }
    );
    if let Some(keep) = &check.machine {
        lab.machines.retain(|m| &m.name == keep);
        if lab.machines.is_empty() {
            bail!("check.machine `{keep}` is not in {}", check.lab);
        }
    }
    for m in &mut lab.machines {
        m.quirks = vec![spec.to_string()];
        m.impair = check.impair.clone();
    }
    if check.server_mtu.is_some() {
        lab.server.mtu = check.server_mtu;
    }
    if side == Side::Fails {
        lab.oracle
            .tolerate
            .extend(check.fail_tolerate.iter().map(ToString::to_string));
        if !check.fail_config.is_empty() {
            let template = lab
                .server
                .config
                .clone()
                .context("the check's lab has no pxed config")?;
            let text = std::fs::read_to_string(&template)
                .with_context(|| format!("reading {}", template.display()))?;
            let mut table: toml::Table = toml::from_str(&text)?;
            merge_toml(&mut table, &check.fail_config);
            std::fs::create_dir_all(scratch)?;
            let path: PathBuf = scratch.join(format!("{}.pxed.toml", lab.lab.name));
            std::fs::write(&path, toml::to_string(&table)?)?;
            lab.server.config = Some(path);
        }
        // Deadlines count from power-on and are otherwise scaled for TCG: cut them so a
        // stall fails fast, and put them in wall-clock terms.
        let scale = lab
            .lab
            .tcg_scale
            .unwrap_or(crate::labfile::DEFAULT_TCG_SCALE);
        lab.lab.tcg_scale = Some(1.0);
        let limit = check.fail_within.unwrap_or(Duration::MAX);
        let cut = |e: &mut crate::labfile::ExpectSection| {
            e.within = e.within.mul_f64(scale).min(limit);
        };
        lab.expect.iter_mut().for_each(cut);
        for m in &mut lab.machines {
            m.expect.iter_mut().for_each(cut);
        }
    }
    Ok(lab)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLIENT: [u8; 6] = [0x52, 0x54, 0, 0, 0, 1];

    /// A broadcast frame from the client, built by the module's own `udp_frame`.
    fn udp_frame(ips: ([u8; 4], [u8; 4]), ports: (u16, u16), payload: &[u8]) -> Vec<u8> {
        super::udp_frame(
            CLIENT,
            [0xff; 6],
            Ipv4Addr::from(ips.0),
            Ipv4Addr::from(ips.1),
            ports.0,
            ports.1,
            payload,
        )
    }

    fn dhcp(op: u8, msg: u8, opts: &[(u8, &[u8])]) -> Vec<u8> {
        let mut p = vec![0u8; 236];
        p[0] = op;
        p[1] = 1;
        p[2] = 6;
        p[4..8].copy_from_slice(&[1, 2, 3, 4]);
        p[20..24].copy_from_slice(&[10, 0, 0, 1]);
        p[28..34].copy_from_slice(&CLIENT);
        p[108..116].copy_from_slice(b"boot.pxe");
        p.extend_from_slice(&[99, 130, 83, 99, 53, 1, msg]);
        for (c, v) in opts {
            p.push(*c);
            p.push(v.len() as u8);
            p.extend_from_slice(v);
        }
        p.push(255);
        p.resize(300, 0);
        p
    }

    fn payload_of(f: &[u8]) -> Vec<u8> {
        let v = parse_udp(f).unwrap();
        f[v.payload].to_vec()
    }

    /// The checksums a receiver verifies: IPv4 header sums to 0, UDP with pseudo-header too.
    fn checksums_ok(f: &[u8]) -> bool {
        let v = parse_udp(f).unwrap();
        let ip_ok = checksum_fold(checksum_add(0, &f[v.ip..v.ip + v.ihl])) == 0;
        let udp = &f[v.ip + v.ihl..v.payload.end];
        let mut sum = checksum_add(0, &v.src.octets());
        sum = checksum_add(sum, &v.dst.octets());
        sum += u32::from(PROTO_UDP) + udp.len() as u32;
        ip_ok && checksum_fold(checksum_add(sum, udp)) == 0
    }

    fn profile(rules: &str) -> QuirkFilter {
        let text = format!("name = \"t\"\nsummary = \"t\"\nsource = \"test\"\n{rules}");
        QuirkFilter::new(vec![QuirkProfile::parse(&text).unwrap()])
    }

    const SERVER_IPS: ([u8; 4], [u8; 4]) = ([10, 0, 0, 1], [255; 4]);
    const CLIENT_IPS: ([u8; 4], [u8; 4]) = ([0; 4], [255; 4]);

    #[test]
    fn strips_options_and_clears_header_to_the_client_with_valid_checksums() {
        let mut f = profile(
            "[[rule]]\ndirection = \"to-client\"\ndhcp = [\"offer\", \"ack\"]\nstrip_options = [66, 67]\nsiaddr = \"0.0.0.0\"\nfile = \"\"\n",
        );
        let offer = udp_frame(
            SERVER_IPS,
            (67, 68),
            &dhcp(
                2,
                2,
                &[(60, b"PXEClient"), (66, b"10.0.0.1"), (67, b"boot.pxe")],
            ),
        );
        let out = f.on_frame(Direction::Egress, offer.clone(), Instant::now());
        assert_eq!(out.len(), 1);
        let p = DhcpPacket::decode(&payload_of(&out[0].1)).unwrap();
        assert!(!p.options.contains(66) && !p.options.contains(67));
        assert_eq!(p.options.get(60), Some(&b"PXEClient"[..]));
        assert!(p.siaddr.is_unspecified() && p.file.is_empty());
        assert!(checksums_ok(&out[0].1));
        // Same packet from the client's side, or a DISCOVER: untouched.
        let out = f.on_frame(Direction::Ingress, offer.clone(), Instant::now());
        assert_eq!(out[0].1, offer);
        assert_eq!(f.hits, vec![1]);
    }

    #[test]
    fn rewrites_arch_and_flags_from_the_client_and_counts_times() {
        let mut f = profile(
            "[[rule]]\ndirection = \"from-client\"\ndhcp = [\"discover\"]\nbroadcast = true\ntimes = 1\n[[rule.set_option]]\ncode = 93\nhex = \"00:09\"\n",
        );
        let disc = udp_frame(CLIENT_IPS, (68, 67), &dhcp(1, 1, &[(93, &[0, 7])]));
        let out = f.on_frame(Direction::Ingress, disc.clone(), Instant::now());
        let p = DhcpPacket::decode(&payload_of(&out[0].1)).unwrap();
        assert_eq!(p.options.get(93), Some(&[0u8, 9][..]));
        assert!(p.broadcast_flag());
        assert!(checksums_ok(&out[0].1));
        // times = 1: the second DISCOVER passes unchanged.
        let out = f.on_frame(Direction::Ingress, disc.clone(), Instant::now());
        assert_eq!(out[0].1, disc);
    }

    #[test]
    fn drops_by_absent_option_and_duplicates_with_a_gap() {
        let mut f = profile(
            "[[rule]]\ndirection = \"to-client\"\ndhcp = [\"offer\"]\nlacks_option = [60]\ndrop = true\n\n[[rule]]\ndirection = \"from-client\"\ndhcp = [\"discover\"]\nduplicate = 2\nduplicate_gap = \"100ms\"\n",
        );
        let plain = udp_frame(SERVER_IPS, (67, 68), &dhcp(2, 2, &[]));
        assert!(
            f.on_frame(Direction::Egress, plain.clone(), Instant::now())
                .is_empty()
        );
        // only_pxe: the same offer to a client that is not PXE (the OS's udhcpc) passes.
        let mut g = profile(
            "[[rule]]\ndirection = \"to-client\"\ndhcp = [\"offer\"]\nlacks_option = [60]\nonly_pxe = true\ndrop = true\n",
        );
        assert_eq!(
            g.on_frame(Direction::Egress, plain.clone(), Instant::now())
                .len(),
            1
        );
        let pxe_disc = udp_frame(
            CLIENT_IPS,
            (68, 67),
            &dhcp(1, 1, &[(60, b"PXEClient:Arch:00000")]),
        );
        g.on_frame(Direction::Ingress, pxe_disc, Instant::now());
        assert!(
            g.on_frame(Direction::Egress, plain, Instant::now())
                .is_empty()
        );
        let pxe = udp_frame(SERVER_IPS, (67, 68), &dhcp(2, 2, &[(60, b"PXEClient")]));
        assert_eq!(f.on_frame(Direction::Egress, pxe, Instant::now()).len(), 1);
        let disc = udp_frame(CLIENT_IPS, (68, 67), &dhcp(1, 1, &[]));
        let out = f.on_frame(Direction::Ingress, disc.clone(), Instant::now());
        let delays: Vec<u64> = out.iter().map(|(d, _)| d.as_millis() as u64).collect();
        assert_eq!(delays, vec![0, 100, 200]);
        assert!(out.iter().all(|(_, fr)| *fr == disc));
    }

    #[test]
    fn tftp_request_options_are_rewritten_and_replies_recognised() {
        let mut f = profile(
            "[[rule]]\ndirection = \"from-client\"\ntftp = [\"rrq\"]\ntftp_set = { blksize = \"8192\" }\ntftp_strip = [\"windowsize\"]\n\n[[rule]]\ndirection = \"to-client\"\ntftp = [\"oack\"]\ndelay = \"1s\"\n",
        );
        let c_ips = ([10, 0, 0, 100], [10, 0, 0, 1]);
        let rrq = udp_frame(
            c_ips,
            (2000, 69),
            b"\0\x01snponly.efi\0octet\0blksize\x001468\0windowsize\x004\0tsize\x000\0",
        );
        let out = f.on_frame(Direction::Ingress, rrq, Instant::now());
        let p = payload_of(&out[0].1);
        assert_eq!(
            &p[..],
            b"\0\x01snponly.efi\0octet\0blksize\x008192\0tsize\x000\0"
        );
        assert!(checksums_ok(&out[0].1));
        let oack = udp_frame(
            ([10, 0, 0, 1], [10, 0, 0, 100]),
            (3000, 2000),
            b"\0\x06blksize\x008192\0",
        );
        let out = f.on_frame(Direction::Egress, oack, Instant::now());
        assert_eq!(out[0].0, Duration::from_secs(1));
        // An unrelated UDP packet to the client is not TFTP.
        let other = udp_frame(
            ([10, 0, 0, 1], [10, 0, 0, 100]),
            (3000, 2001),
            b"\0\x06x\0y\0",
        );
        assert_eq!(
            f.on_frame(Direction::Egress, other, Instant::now())[0].0,
            Duration::ZERO
        );
    }

    #[test]
    fn port_rule_drops_4011_and_garbage_passes() {
        let mut f =
            profile("[[rule]]\ndirection = \"from-client\"\nudp_port = 4011\ndrop = true\n");
        let req = udp_frame(
            ([10, 0, 0, 100], [10, 0, 0, 1]),
            (68, 4011),
            &dhcp(1, 3, &[]),
        );
        assert!(
            f.on_frame(Direction::Ingress, req, Instant::now())
                .is_empty()
        );
        let to67 = udp_frame(CLIENT_IPS, (68, 67), &dhcp(1, 3, &[]));
        assert_eq!(
            f.on_frame(Direction::Ingress, to67, Instant::now()).len(),
            1
        );
        for len in 0..120 {
            let junk: Vec<u8> = (0..len).map(|i| (i * 31 + 7) as u8).collect();
            assert_eq!(
                f.on_frame(Direction::Egress, junk.clone(), Instant::now())[0].1,
                junk
            );
        }
    }

    #[test]
    fn unicast_replies_are_told_from_broadcast_ones() {
        let mut f = profile(
            "[[rule]]\ndirection = \"to-client\"\ndhcp = [\"offer\"]\nunicast = true\ndrop = true\n",
        );
        let offer = dhcp(2, 2, &[(60, b"PXEClient")]);
        let to_all = udp_frame(SERVER_IPS, (67, 68), &offer);
        let to_one = udp_frame(([10, 0, 0, 1], [10, 0, 0, 100]), (67, 68), &offer);
        assert_eq!(
            f.on_frame(Direction::Egress, to_all, Instant::now()).len(),
            1
        );
        assert!(
            f.on_frame(Direction::Egress, to_one, Instant::now())
                .is_empty()
        );
        assert_eq!(f.hits, vec![1]);
    }

    #[test]
    fn fragment_rules_drop_only_fragments() {
        let mut f =
            profile("[[rule]]\ndirection = \"to-client\"\nip_fragments = true\ndrop = true\n");
        let whole = udp_frame(
            ([10, 0, 0, 1], [10, 0, 0, 100]),
            (3000, 2000),
            &[0, 3, 0, 1],
        );
        let mut first = whole.clone();
        first[20] = 0x20; // More Fragments
        let mut last = whole.clone();
        last[21] = 185; // offset 1480
        assert_eq!(
            f.on_frame(Direction::Egress, whole.clone(), Instant::now()),
            vec![(Duration::ZERO, whole)]
        );
        assert!(
            f.on_frame(Direction::Egress, first.clone(), Instant::now())
                .is_empty()
        );
        assert!(
            f.on_frame(Direction::Egress, last, Instant::now())
                .is_empty()
        );
        // From the client: not this rule's direction.
        assert_eq!(
            f.on_frame(Direction::Ingress, first, Instant::now()).len(),
            1
        );
        assert_eq!(f.hits, vec![2]);
    }

    #[test]
    fn profiles_are_validated() {
        let bad = [
            "[[rule]]\ndirection = \"to-client\"\nstrip_options = [60]\ntftp = [\"rrq\"]\n",
            "[[rule]]\ndirection = \"both\"\nstrip_options = [60]\n",
            "[[rule]]\ndirection = \"to-client\"\nstrip_option = [60]\n",
            "[[rule]]\ndirection = \"to-client\"\n[[rule.set_option]]\ncode = 60\nhex = \"zz\"\n",
            "[[rule]]\ndirection = \"to-client\"\nip_fragments = true\ntftp = [\"data\"]\n",
        ];
        for b in bad {
            let text = format!("name = \"t\"\nsummary = \"t\"\nsource = \"s\"\n{b}");
            assert!(QuirkProfile::parse(&text).is_err(), "{b}");
        }
    }

    #[test]
    fn builtins_parse_and_each_names_a_source_and_a_check() {
        let all = QuirkProfile::builtins().unwrap();
        assert!(all.len() >= 10);
        let both = all
            .iter()
            .filter(|p| p.check.as_ref().is_some_and(|c| c.fail_stage.is_some()));
        assert!(both.count() >= 11);
        for p in &all {
            assert!(p.source.contains("firmware-quirks.md Q"), "{}", p.name);
            let c = p
                .check
                .as_ref()
                .unwrap_or_else(|| panic!("{} has no check", p.name));
            assert_eq!(
                c.fail_stage.is_some(),
                c.fail_within.is_some(),
                "{}",
                p.name
            );
            assert_eq!(
                c.fail_stage.is_some(),
                !c.fail_config.is_empty(),
                "{}",
                p.name
            );
            let labs = Path::new(env!("CARGO_MANIFEST_DIR")).join("labs");
            assert!(labs.join(&c.lab).exists(), "{}: {}", p.name, c.lab);
        }
        assert!(QuirkProfile::resolve("no-such-quirk").is_err());
    }

    #[test]
    fn merge_keeps_the_template_and_overrides_one_key() {
        let mut base: toml::Table =
            toml::from_str("[dhcp]\nmode = \"full\"\n[server]\nroot = \"/x\"").unwrap();
        let over: toml::Table = toml::from_str("dhcp = { pxe_vendor_option = false }").unwrap();
        merge_toml(&mut base, &over);
        assert_eq!(base["dhcp"]["mode"].as_str(), Some("full"));
        assert_eq!(base["dhcp"]["pxe_vendor_option"].as_bool(), Some(false));
        assert_eq!(base["server"]["root"].as_str(), Some("/x"));
    }
}

/// One side of a check, run.
#[derive(Clone, Debug, Serialize)]
pub struct SideResult {
    /// Which side.
    pub side: Side,
    /// Whether it came out as the check wants (failed at the stage / booted).
    pub as_expected: bool,
    /// One line about what happened.
    pub summary: String,
    /// Milliseconds the run took.
    pub duration_ms: u64,
    /// Where its artifacts are.
    pub run_dir: PathBuf,
}

/// Run both sides of a profile's check (the failing side first, if the profile has one).
/// `adjust` may change each lab before it runs (tests point it at their pxed binary).
pub fn run_check(
    profile: &QuirkProfile,
    labs_dir: &Path,
    scratch: &Path,
    adjust: &dyn Fn(&mut crate::labfile::LabFile),
) -> Result<Vec<SideResult>> {
    let check = profile
        .check
        .as_ref()
        .with_context(|| format!("profile `{}` has no [check]", profile.name))?;
    let spec = BUILTIN
        .iter()
        .find(|(n, _)| *n == profile.name)
        .map(|(n, _)| n.to_string())
        .context("only built-in profiles have runnable checks")?;
    let mut sides = Vec::new();
    if check.fail_stage.is_some() {
        sides.push(Side::Fails);
    }
    sides.push(Side::Boots);
    let mut out = Vec::new();
    for side in sides {
        let mut lab = check_lab(profile, &spec, side, labs_dir, scratch)?;
        adjust(&mut lab);
        let report = crate::run::run_lab(&lab, &crate::run::RunOptions::default())?;
        let failed_at: Vec<Option<BootStage>> = report
            .machines
            .iter()
            .map(|m| match &m.verdict {
                crate::oracle::Verdict::Failed { stage, .. } => *stage,
                _ => None,
            })
            .collect();
        let (as_expected, summary) = match side {
            Side::Boots => (
                report.passed(),
                if report.passed() {
                    "booted to phone-home".to_string()
                } else {
                    format!("did not boot: {}", report.summary().trim())
                },
            ),
            Side::Fails => {
                let want = check.fail_stage;
                let ok = !report.passed()
                    && report.machines.iter().all(|m| {
                        matches!(&m.verdict, crate::oracle::Verdict::Failed { stage, .. } if *stage == want)
                    });
                (
                    ok,
                    format!(
                        "failed at {} (wanted {})",
                        failed_at
                            .iter()
                            .map(|s| s.map_or("-".to_string(), |s| s.to_string()))
                            .collect::<Vec<_>>()
                            .join(", "),
                        want.map_or("-".to_string(), |s| s.to_string())
                    ),
                )
            }
        };
        out.push(SideResult {
            side,
            as_expected,
            summary,
            duration_ms: report.duration_ms,
            run_dir: report.run_dir.clone(),
        });
    }
    Ok(out)
}
