//! DHCPv4 wire format: bytes <-> [`DhcpPacket`]. Pure, no I/O, never panics on input.
//!
//! The header, the magic cookie and every option TLV are read here, by hand, with bounds checks,
//! before anything else looks at the bytes. dhcproto (pinned `=0.15.0`) is used for its option
//! catalogue only: [`encode_option`] turns its typed values (classless routes, domain search...)
//! into bytes, and [`DhcpPacket::to_dhcproto`] gives a typed view after our own validation has
//! removed the inputs that trip its `debug_assert!`s. Our encoder controls option order itself.

use std::net::Ipv4Addr;

use dhcproto::Encodable;

use crate::mac::MacAddr;

/// RFC 2131 section 2: op, htype, hlen, hops, xid, secs, flags, four addresses, chaddr (16),
/// sname (64) and file (128): 236 bytes before the options field.
pub const BOOTP_HEADER_LEN: usize = 236;
/// RFC 2131 section 3: the options field starts with the magic cookie 99.130.83.99.
pub const MAGIC_COOKIE: [u8; 4] = [99, 130, 83, 99];
/// Header plus cookie: the shortest DHCP message there is.
pub const MIN_PACKET_LEN: usize = BOOTP_HEADER_LEN + MAGIC_COOKIE.len();
/// RFC 1542 section 3.5: BOOTP relays and old clients drop messages shorter than 300 bytes.
pub const MIN_REPLY_LEN: usize = 300;
/// One unfragmented Ethernet frame (1500 - 20 IP - 8 UDP): PXE ROMs do not reassemble IP
/// fragments (firmware-quirks Q7) and EDK2 advertises exactly this in option 57. Longer input is
/// refused before decoding, so a hostile packet cannot make us walk more than this.
pub const MAX_PACKET_LEN: usize = 1472;
/// RFC 2131 section 2: every client must accept a 576-byte IP datagram, i.e. a 548-byte DHCP
/// message. The reply limit when the client sent no (or a smaller) option 57.
pub const DEFAULT_MAX_REPLY_LEN: usize = 576 - 20 - 8;
/// Largest option value one TLV can carry; longer values are split (RFC 3396 section 7).
const MAX_TLV_VALUE: usize = 255;

/// Size of the `sname` header field (NUL terminator included).
pub const SNAME_LEN: usize = 64;
/// Size of the `file` header field (NUL terminator included).
pub const FILE_LEN: usize = 128;
/// Offset of `sname` in the packet.
const SNAME_OFFSET: usize = 44;
/// Offset of `file` in the packet.
const FILE_OFFSET: usize = 108;

/// Option codes this module gives meaning to.
pub mod code {
    /// Pad (RFC 2132 3.1): one byte, no length.
    pub const PAD: u8 = 0;
    /// Requested IP address (RFC 2132 9.1).
    pub const REQUESTED_IP: u8 = 50;
    /// Option overload (RFC 2132 9.3).
    pub const OVERLOAD: u8 = 52;
    /// DHCP message type (RFC 2132 9.6).
    pub const MESSAGE_TYPE: u8 = 53;
    /// Server identifier (RFC 2132 9.7).
    pub const SERVER_ID: u8 = 54;
    /// Parameter request list (RFC 2132 9.8).
    pub const PARAMETER_REQUEST_LIST: u8 = 55;
    /// Maximum DHCP message size (RFC 2132 9.10).
    pub const MAX_MESSAGE_SIZE: u8 = 57;
    /// Vendor class identifier (RFC 2132 9.13).
    pub const VENDOR_CLASS: u8 = 60;
    /// Client identifier (RFC 2132 9.14).
    pub const CLIENT_ID: u8 = 61;
    /// TFTP server name (RFC 2132 9.4).
    pub const TFTP_SERVER_NAME: u8 = 66;
    /// Boot file name (RFC 2132 9.5).
    pub const BOOTFILE_NAME: u8 = 67;
    /// User class (RFC 3004).
    pub const USER_CLASS: u8 = 77;
    /// Rapid commit (RFC 4039): always empty.
    pub const RAPID_COMMIT: u8 = 80;
    /// Client FQDN (RFC 4702): flags, rcode1, rcode2, name.
    pub const CLIENT_FQDN: u8 = 81;
    /// Relay agent information (RFC 3046).
    pub const RELAY_AGENT_INFO: u8 = 82;
    /// Client system architecture (RFC 4578 2.1).
    pub const CLIENT_ARCH: u8 = 93;
    /// Client network device interface (RFC 4578 2.2).
    pub const CLIENT_NDI: u8 = 94;
    /// Client machine identifier / UUID (RFC 4578 2.3).
    pub const CLIENT_UUID: u8 = 97;
    /// Bulk leasequery status code (RFC 6926).
    pub const BULK_LQ_STATUS: u8 = 151;
    /// Vendor-specific information (RFC 2132 8.4), PXE sub-options.
    pub const VENDOR_SPECIFIC: u8 = 43;
    /// iPXE encapsulated options.
    pub const IPXE_ENCAP: u8 = 175;
    /// End (RFC 2132 3.2): one byte, no length.
    pub const END: u8 = 255;
}

/// BOOTP op code (RFC 951).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// BOOTREQUEST (1): client to server.
    Request,
    /// BOOTREPLY (2): server to client.
    Reply,
}

impl Op {
    /// The wire value.
    pub fn code(self) -> u8 {
        match self {
            Op::Request => 1,
            Op::Reply => 2,
        }
    }
}

/// DHCP message type, option 53 (RFC 2132 section 9.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MessageType {
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

impl MessageType {
    /// The wire value.
    pub fn code(self) -> u8 {
        match self {
            MessageType::Discover => 1,
            MessageType::Offer => 2,
            MessageType::Request => 3,
            MessageType::Decline => 4,
            MessageType::Ack => 5,
            MessageType::Nak => 6,
            MessageType::Release => 7,
            MessageType::Inform => 8,
        }
    }

    /// The type for a wire value; `None` for values outside RFC 2132 (leasequery and friends).
    pub fn from_code(code: u8) -> Option<MessageType> {
        Some(match code {
            1 => MessageType::Discover,
            2 => MessageType::Offer,
            3 => MessageType::Request,
            4 => MessageType::Decline,
            5 => MessageType::Ack,
            6 => MessageType::Nak,
            7 => MessageType::Release,
            8 => MessageType::Inform,
            _ => return None,
        })
    }

    /// Upper-case name as in the RFCs (`DHCPDISCOVER` without the prefix).
    pub fn name(self) -> &'static str {
        match self {
            MessageType::Discover => "DISCOVER",
            MessageType::Offer => "OFFER",
            MessageType::Request => "REQUEST",
            MessageType::Decline => "DECLINE",
            MessageType::Ack => "ACK",
            MessageType::Nak => "NAK",
            MessageType::Release => "RELEASE",
            MessageType::Inform => "INFORM",
        }
    }
}

/// Why bytes are not a DHCP message we accept. Offsets are from the start of the UDP payload.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    /// Shorter than header + cookie.
    #[error("packet is {len} bytes, shorter than the 240-byte BOOTP header and magic cookie")]
    Truncated {
        /// Bytes received.
        len: usize,
    },
    /// Longer than [`MAX_PACKET_LEN`].
    #[error("packet is {len} bytes, longer than the {MAX_PACKET_LEN}-byte limit")]
    TooLong {
        /// Bytes received.
        len: usize,
    },
    /// Bytes 236..240 are not 99.130.83.99 (a plain BOOTP packet or garbage).
    #[error("bad magic cookie at offset 236 (not a DHCP message)")]
    BadCookie,
    /// `hlen` (offset 2) larger than the 16-byte `chaddr` field.
    #[error("hardware address length {0} at offset 2 exceeds the 16-byte chaddr field")]
    BadHlen(u8),
    /// `op` (offset 0) neither 1 nor 2.
    #[error("op code {0} at offset 0 is neither BOOTREQUEST (1) nor BOOTREPLY (2)")]
    BadOp(u8),
    /// An option's length byte, or its value, runs past the end of its field.
    #[error("option {code} at offset {at} runs past the end of its field")]
    OptionOverrun {
        /// Option code.
        code: u8,
        /// Offset of the option's code byte.
        at: usize,
    },
    /// An option whose length breaks its RFC definition.
    #[error("option {code} at offset {at} has length {len}: {why}")]
    BadOptionLength {
        /// Option code.
        code: u8,
        /// Total length (after RFC 3396 concatenation).
        len: usize,
        /// What the RFC requires.
        why: &'static str,
        /// Offset of the option's first code byte.
        at: usize,
    },
    /// Option 52 with a value other than 1, 2 or 3.
    #[error("option 52 (overload) at offset {at} has value {value}, not 1, 2 or 3")]
    BadOverload {
        /// The value.
        value: u8,
        /// Offset of the option's code byte.
        at: usize,
    },
    /// Option 52 inside `file` or `sname`: RFC 2131 4.1 allows it only in the options field, and
    /// honouring it there could loop.
    #[error("option 52 (overload) at offset {at} is inside the file/sname field")]
    NestedOverload {
        /// Offset of the option's code byte.
        at: usize,
    },
    /// The encoded reply would not fit the client's limit.
    #[error("reply is {len} bytes, more than the client's limit of {limit}")]
    ReplyTooLong {
        /// Encoded length.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// `sname` or `file` too long for its header field with its NUL terminator.
    #[error("{field} is {len} bytes; the header field holds at most {max} plus a NUL")]
    FieldTooLong {
        /// `sname` or `file`.
        field: &'static str,
        /// Its length.
        len: usize,
        /// The most that fits.
        max: usize,
    },
    /// dhcproto refused a message we accepted (only from [`DhcpPacket::to_dhcproto`]).
    #[error("dhcproto could not decode the message: {0}")]
    Dhcproto(String),
}

/// The options of a message: ordered `(code, value)` pairs, one per code. On decode, repeated
/// codes are concatenated in order (RFC 3396 section 7), so a split long option reads as one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DhcpOptions {
    entries: Vec<(u8, Vec<u8>)>,
}

impl DhcpOptions {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// The value of option `code`, if present.
    pub fn get(&self, code: u8) -> Option<&[u8]> {
        self.entries
            .iter()
            .find(|(c, _)| *c == code)
            .map(|(_, v)| v.as_slice())
    }

    /// Whether option `code` is present.
    pub fn contains(&self, code: u8) -> bool {
        self.get(code).is_some()
    }

    /// Sets option `code`, replacing an earlier value in place (its position is kept). Pad (0) and
    /// End (255) are framing, not options, and are ignored.
    pub fn set(&mut self, code: u8, value: Vec<u8>) {
        if code == code::PAD || code == code::END {
            return;
        }
        match self.entries.iter_mut().find(|(c, _)| *c == code) {
            Some(slot) => slot.1 = value,
            None => self.entries.push((code, value)),
        }
    }

    /// Removes option `code` if present.
    pub fn remove(&mut self, code: u8) {
        self.entries.retain(|(c, _)| *c != code);
    }

    /// All options in order.
    pub fn iter(&self) -> impl Iterator<Item = (u8, &[u8])> {
        self.entries.iter().map(|(c, v)| (*c, v.as_slice()))
    }

    /// Number of options.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// No options at all.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Option 53, when it holds one of the eight RFC 2132 types.
    pub fn message_type(&self) -> Option<MessageType> {
        match self.get(code::MESSAGE_TYPE)? {
            [t] => MessageType::from_code(*t),
            _ => None,
        }
    }

    /// Sets option 53.
    pub fn set_message_type(&mut self, t: MessageType) {
        self.set(code::MESSAGE_TYPE, vec![t.code()]);
    }

    /// Option 55, empty when absent.
    pub fn parameter_request_list(&self) -> &[u8] {
        self.get(code::PARAMETER_REQUEST_LIST).unwrap_or(&[])
    }

    /// Option 50.
    pub fn requested_ip(&self) -> Option<Ipv4Addr> {
        self.get_ip(code::REQUESTED_IP)
    }

    /// Option 54.
    pub fn server_id(&self) -> Option<Ipv4Addr> {
        self.get_ip(code::SERVER_ID)
    }

    /// Sets option 54.
    pub fn set_server_id(&mut self, ip: Ipv4Addr) {
        self.set(code::SERVER_ID, ip.octets().to_vec());
    }

    /// Option 61 (type byte included), if present and non-empty.
    pub fn client_id(&self) -> Option<&[u8]> {
        self.get(code::CLIENT_ID).filter(|v| !v.is_empty())
    }

    /// Option 57.
    pub fn max_message_size(&self) -> Option<u16> {
        match self.get(code::MAX_MESSAGE_SIZE)? {
            [a, b] => Some(u16::from_be_bytes([*a, *b])),
            _ => None,
        }
    }

    /// A 4-byte option as an address (`None` if absent or another length).
    pub fn get_ip(&self, code: u8) -> Option<Ipv4Addr> {
        let v: [u8; 4] = self.get(code)?.try_into().ok()?;
        Some(Ipv4Addr::from(v))
    }

    /// Appends `value` to option `code` (RFC 3396 concatenation), creating it if needed.
    fn append(&mut self, code: u8, value: &[u8]) {
        match self.entries.iter_mut().find(|(c, _)| *c == code) {
            Some(slot) => slot.1.extend_from_slice(value),
            None => self.entries.push((code, value.to_vec())),
        }
    }
}

/// A DHCPv4 message (RFC 2131 section 2).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DhcpPacket {
    /// BOOTREQUEST or BOOTREPLY.
    pub op: Op,
    /// Hardware type (1 = Ethernet).
    pub htype: u8,
    /// Hardware address length (<= 16).
    pub hlen: u8,
    /// Relay hops.
    pub hops: u8,
    /// Transaction id.
    pub xid: u32,
    /// Seconds since the client began.
    pub secs: u16,
    /// Flags (bit 15 = broadcast).
    pub flags: u16,
    /// Client address (renewing clients).
    pub ciaddr: Ipv4Addr,
    /// "Your" address (offered).
    pub yiaddr: Ipv4Addr,
    /// Next server (TFTP server for PXE).
    pub siaddr: Ipv4Addr,
    /// Relay agent address.
    pub giaddr: Ipv4Addr,
    /// Client hardware address, all 16 bytes as received.
    pub chaddr: [u8; 16],
    /// Server host name, without NULs (empty when the field carried options).
    pub sname: Vec<u8>,
    /// Boot file name, without NULs (empty when the field carried options).
    pub file: Vec<u8>,
    /// Options, from the options field and any overloaded file/sname field.
    pub options: DhcpOptions,
}

/// Bounds-checked big-endian reader over the fixed header.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        let end = self.pos.checked_add(n).ok_or(WireError::Truncated {
            len: self.buf.len(),
        })?;
        let s = self.buf.get(self.pos..end).ok_or(WireError::Truncated {
            len: self.buf.len(),
        })?;
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let len = self.buf.len();
        self.take(N)?
            .try_into()
            .map_err(|_| WireError::Truncated { len })
    }

    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(u8::from_be_bytes(self.array::<1>()?))
    }

    fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_be_bytes(self.array::<2>()?))
    }

    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_be_bytes(self.array::<4>()?))
    }

    fn ip(&mut self) -> Result<Ipv4Addr, WireError> {
        Ok(Ipv4Addr::from(self.array::<4>()?))
    }
}

/// One option TLV as found on the wire.
struct RawOption<'a> {
    code: u8,
    at: usize,
    value: &'a [u8],
}

/// Which field a TLV walk covers; option 52 is legal only in the options field.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Field {
    Options,
    Overloaded,
}

/// Walks the TLVs of one field (`area` starts at packet offset `base`), stopping at End or at the
/// end of the field. RFC 2132 section 2: Pad and End are single bytes, every other option is
/// code, length, value.
fn walk<'a>(
    area: &'a [u8],
    base: usize,
    field: Field,
    out: &mut Vec<RawOption<'a>>,
) -> Result<(), WireError> {
    let mut pos = 0usize;
    while let Some(&code) = area.get(pos) {
        let at = base.saturating_add(pos);
        match code {
            code::PAD => pos = pos.saturating_add(1),
            code::END => return Ok(()),
            _ => {
                let len = *area
                    .get(pos.saturating_add(1))
                    .ok_or(WireError::OptionOverrun { code, at })?;
                let start = pos.saturating_add(2);
                let end = start.saturating_add(usize::from(len));
                let value = area
                    .get(start..end)
                    .ok_or(WireError::OptionOverrun { code, at })?;
                if code == code::OVERLOAD && field == Field::Overloaded {
                    return Err(WireError::NestedOverload { at });
                }
                out.push(RawOption { code, at, value });
                pos = end;
            }
        }
    }
    // No End: RFC 2131 requires one, but a field simply running out is harmless and some
    // BOOTP-era clients do it, so accept.
    Ok(())
}

/// Length rules checked on decode, for the options the engine relies on and for those that trip
/// dhcproto's `debug_assert!`s (80, 81, 94, 151), so a decoded packet is safe to hand to it.
/// Options that only feed policy (60, 77, 93, 97...) are checked by their codecs, which warn
/// instead of refusing the client.
fn length_rule(code: u8, len: usize) -> Option<&'static str> {
    let ok = match code {
        code::MESSAGE_TYPE => len == 1,
        code::OVERLOAD => len == 1,
        code::REQUESTED_IP | code::SERVER_ID => len == 4,
        code::MAX_MESSAGE_SIZE => len == 2,
        code::CLIENT_ID => len >= 2,
        code::RAPID_COMMIT => len == 0,
        code::CLIENT_FQDN => len >= 3,
        code::CLIENT_NDI => len == 3,
        code::BULK_LQ_STATUS => len >= 1,
        // RFC 6926 bulk leasequery times: dhcproto asserts 4 bytes.
        152..=155 => len == 4,
        _ => true,
    };
    if ok {
        return None;
    }
    Some(match code {
        code::MESSAGE_TYPE => "RFC 2132 9.6 requires exactly 1 byte",
        code::OVERLOAD => "RFC 2132 9.3 requires exactly 1 byte",
        code::REQUESTED_IP => "RFC 2132 9.1 requires exactly 4 bytes",
        code::SERVER_ID => "RFC 2132 9.7 requires exactly 4 bytes",
        code::MAX_MESSAGE_SIZE => "RFC 2132 9.10 requires exactly 2 bytes",
        code::CLIENT_ID => "RFC 2132 9.14 requires at least 2 bytes",
        code::RAPID_COMMIT => "RFC 4039 requires an empty value",
        code::CLIENT_FQDN => "RFC 4702 requires at least 3 bytes",
        code::CLIENT_NDI => "RFC 4578 2.2 requires exactly 3 bytes",
        code::BULK_LQ_STATUS => "RFC 6926 requires at least 1 byte",
        _ => "RFC 6926 requires exactly 4 bytes",
    })
}

/// Copies `s` into a fixed field of `N` bytes, always leaving at least one trailing NUL
/// (firmware-quirks Q10: PXE ROMs need NUL-terminated names).
fn fixed_field<const N: usize>(s: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    let room = N.saturating_sub(1);
    for (dst, src) in out.iter_mut().take(room).zip(s.iter()) {
        *dst = *src;
    }
    out
}

/// Text up to the first NUL.
fn nul_trimmed(field: &[u8]) -> Vec<u8> {
    field.split(|b| *b == 0).next().unwrap_or(&[]).to_vec()
}

/// Writes one option, split into 255-byte TLVs when longer (RFC 3396 section 7).
fn put_option(out: &mut Vec<u8>, code: u8, value: &[u8]) {
    if value.is_empty() {
        out.extend_from_slice(&[code, 0]);
        return;
    }
    for chunk in value.chunks(MAX_TLV_VALUE) {
        out.push(code);
        // chunks() never yields more than MAX_TLV_VALUE (255) bytes.
        out.push(u8::try_from(chunk.len()).unwrap_or(u8::MAX));
        out.extend_from_slice(chunk);
    }
}

impl DhcpPacket {
    /// Decodes a UDP payload. Length, magic cookie, `hlen` and `op` are checked before anything
    /// else; every option TLV is walked and bounds-checked; option 52 is honoured.
    pub fn decode(bytes: &[u8]) -> Result<DhcpPacket, WireError> {
        let len = bytes.len();
        if len < MIN_PACKET_LEN {
            return Err(WireError::Truncated { len });
        }
        if len > MAX_PACKET_LEN {
            return Err(WireError::TooLong { len });
        }
        if bytes.get(BOOTP_HEADER_LEN..MIN_PACKET_LEN) != Some(&MAGIC_COOKIE[..]) {
            return Err(WireError::BadCookie);
        }
        let mut r = Reader { buf: bytes, pos: 0 };
        let op = r.u8()?;
        let htype = r.u8()?;
        let hlen = r.u8()?;
        if usize::from(hlen) > 16 {
            return Err(WireError::BadHlen(hlen));
        }
        let op = match op {
            1 => Op::Request,
            2 => Op::Reply,
            other => return Err(WireError::BadOp(other)),
        };
        let hops = r.u8()?;
        let xid = r.u32()?;
        let secs = r.u16()?;
        let flags = r.u16()?;
        let ciaddr = r.ip()?;
        let yiaddr = r.ip()?;
        let siaddr = r.ip()?;
        let giaddr = r.ip()?;
        let chaddr = r.array::<16>()?;
        let sname_raw = r.take(SNAME_LEN)?;
        let file_raw = r.take(FILE_LEN)?;
        let options_area = bytes.get(MIN_PACKET_LEN..).unwrap_or(&[]);

        // RFC 2131 4.1 / RFC 2132 9.3: option 52 in the options field says whether `file` (1),
        // `sname` (2) or both (3) carry further options. RFC 3396 section 6: the options field
        // comes first, then `file`, then `sname`.
        let mut raw = Vec::new();
        walk(options_area, MIN_PACKET_LEN, Field::Options, &mut raw)?;
        let mut overload = 0u8;
        if let Some(o) = raw.iter().find(|o| o.code == code::OVERLOAD) {
            let total: usize = raw
                .iter()
                .filter(|x| x.code == code::OVERLOAD)
                .map(|x| x.value.len())
                .sum();
            if total != 1 {
                return Err(WireError::BadOptionLength {
                    code: code::OVERLOAD,
                    len: total,
                    why: "RFC 2132 9.3 requires exactly 1 byte",
                    at: o.at,
                });
            }
            overload = match o.value {
                [v @ 1..=3] => *v,
                [v] => {
                    return Err(WireError::BadOverload {
                        value: *v,
                        at: o.at,
                    });
                }
                _ => 0,
            };
        }
        let file_has_options = overload & 1 != 0;
        let sname_has_options = overload & 2 != 0;
        if file_has_options {
            walk(file_raw, FILE_OFFSET, Field::Overloaded, &mut raw)?;
        }
        if sname_has_options {
            walk(sname_raw, SNAME_OFFSET, Field::Overloaded, &mut raw)?;
        }

        let mut options = DhcpOptions::default();
        let mut first_at: Vec<(u8, usize)> = Vec::new();
        for o in &raw {
            if !first_at.iter().any(|(c, _)| *c == o.code) {
                first_at.push((o.code, o.at));
            }
            options.append(o.code, o.value);
        }
        for (c, v) in options.iter() {
            if let Some(why) = length_rule(c, v.len()) {
                let at = first_at
                    .iter()
                    .find(|(fc, _)| *fc == c)
                    .map_or(0, |(_, a)| *a);
                return Err(WireError::BadOptionLength {
                    code: c,
                    len: v.len(),
                    why,
                    at,
                });
            }
        }

        Ok(DhcpPacket {
            op,
            htype,
            hlen,
            hops,
            xid,
            secs,
            flags,
            ciaddr,
            yiaddr,
            siaddr,
            giaddr,
            chaddr,
            sname: if sname_has_options {
                Vec::new()
            } else {
                nul_trimmed(sname_raw)
            },
            file: if file_has_options {
                Vec::new()
            } else {
                nul_trimmed(file_raw)
            },
            options,
        })
    }

    /// Encodes the packet. Options in deliberate order: 53, 54, then the order of `prl` (the
    /// client's parameter request list), then the rest in insertion order; End; zero-padded to
    /// at least [`MIN_REPLY_LEN`]. Options longer than 255 bytes are split per RFC 3396. Option
    /// 52 is never written (we do not overload). `sname`/`file` are written NUL-terminated
    /// (firmware-quirks Q10) and cut to 63/127 bytes; [`DhcpPacket::encode_within`] refuses
    /// instead of cutting.
    pub fn encode(&self, prl: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(MIN_REPLY_LEN.max(512));
        out.push(self.op.code());
        out.push(self.htype);
        out.push(self.hlen);
        out.push(self.hops);
        out.extend_from_slice(&self.xid.to_be_bytes());
        out.extend_from_slice(&self.secs.to_be_bytes());
        out.extend_from_slice(&self.flags.to_be_bytes());
        for ip in [self.ciaddr, self.yiaddr, self.siaddr, self.giaddr] {
            out.extend_from_slice(&ip.octets());
        }
        out.extend_from_slice(&self.chaddr);
        out.extend_from_slice(&fixed_field::<SNAME_LEN>(&self.sname));
        out.extend_from_slice(&fixed_field::<FILE_LEN>(&self.file));
        out.extend_from_slice(&MAGIC_COOKIE);

        let mut order: Vec<u8> = Vec::with_capacity(self.options.len());
        let firsts = [code::MESSAGE_TYPE, code::SERVER_ID];
        for c in firsts.iter().chain(prl.iter()).copied() {
            if self.options.contains(c) && !order.contains(&c) {
                order.push(c);
            }
        }
        for (c, _) in self.options.iter() {
            if !order.contains(&c) {
                order.push(c);
            }
        }
        for c in order {
            if c == code::OVERLOAD {
                continue;
            }
            if let Some(v) = self.options.get(c) {
                put_option(&mut out, c, v);
            }
        }
        out.push(code::END);
        if out.len() < MIN_REPLY_LEN {
            out.resize(MIN_REPLY_LEN, code::PAD);
        }
        out
    }

    /// Like [`DhcpPacket::encode`], but refuses a `sname`/`file` that would be cut and a result
    /// longer than `limit` (see [`DhcpPacket::max_reply_len`]).
    pub fn encode_within(&self, prl: &[u8], limit: usize) -> Result<Vec<u8>, WireError> {
        for (field, value, size) in [
            ("sname", &self.sname, SNAME_LEN),
            ("file", &self.file, FILE_LEN),
        ] {
            let max = size.saturating_sub(1);
            if value.len() > max {
                return Err(WireError::FieldTooLong {
                    field,
                    len: value.len(),
                    max,
                });
            }
        }
        let out = self.encode(prl);
        if out.len() > limit {
            return Err(WireError::ReplyTooLong {
                len: out.len(),
                limit,
            });
        }
        Ok(out)
    }

    /// The largest reply this client takes: its option 57 (RFC 2132 9.10), never below the 548-byte
    /// message (576-byte datagram) every client must accept nor above [`MAX_PACKET_LEN`]. Option 57 counts the IP and
    /// UDP headers (RFC 2132 9.10 "maximum length DHCP message"; dnsmasq and ISC subtract 28);
    /// we subtract them too.
    pub fn max_reply_len(&self) -> usize {
        let from_client = self
            .options
            .max_message_size()
            .map_or(0, |m| usize::from(m).saturating_sub(20 + 8));
        from_client.clamp(DEFAULT_MAX_REPLY_LEN, MAX_PACKET_LEN)
    }

    /// The Ethernet address: htype 1 and hlen 6 only.
    pub fn mac(&self) -> Option<MacAddr> {
        if self.htype != 1 || self.hlen != 6 {
            return None;
        }
        let six: [u8; 6] = self.chaddr.get(..6)?.try_into().ok()?;
        Some(MacAddr(six))
    }

    /// Option 53.
    pub fn message_type(&self) -> Option<MessageType> {
        self.options.message_type()
    }

    /// RFC 2131 section 2 figure 2: only the top bit of `flags` means broadcast; the other 15
    /// are reserved (and some UEFI firmware sets them: firmware-quirks Q11), so they are masked.
    pub fn broadcast_flag(&self) -> bool {
        self.flags & BROADCAST_FLAG != 0
    }

    /// A client's request from an Ethernet `mac` with transaction id `xid`: op Request,
    /// htype 1, hlen 6, every address, flag and field zero and no options (the caller adds
    /// them). What pxed's own probe for other servers and test clients start from.
    pub fn client_request(xid: u32, mac: MacAddr) -> DhcpPacket {
        let mut chaddr = [0u8; 16];
        for (slot, byte) in chaddr.iter_mut().zip(mac.0) {
            *slot = byte;
        }
        DhcpPacket {
            op: Op::Request,
            htype: 1,
            hlen: 6,
            hops: 0,
            xid,
            secs: 0,
            flags: 0,
            ciaddr: Ipv4Addr::UNSPECIFIED,
            yiaddr: Ipv4Addr::UNSPECIFIED,
            siaddr: Ipv4Addr::UNSPECIFIED,
            giaddr: Ipv4Addr::UNSPECIFIED,
            chaddr,
            sname: Vec::new(),
            file: Vec::new(),
            options: DhcpOptions::default(),
        }
    }

    /// A reply skeleton: op Reply, same htype/hlen/xid/giaddr/chaddr, flags reduced to the
    /// broadcast bit (RFC 2131 4.1: reserved bits must be zero), hops 0, everything else empty.
    pub fn reply_skeleton(&self) -> DhcpPacket {
        DhcpPacket {
            op: Op::Reply,
            htype: self.htype,
            hlen: self.hlen,
            hops: 0,
            xid: self.xid,
            secs: 0,
            flags: self.flags & BROADCAST_FLAG,
            ciaddr: Ipv4Addr::UNSPECIFIED,
            yiaddr: Ipv4Addr::UNSPECIFIED,
            siaddr: Ipv4Addr::UNSPECIFIED,
            giaddr: self.giaddr,
            chaddr: self.chaddr,
            sname: Vec::new(),
            file: Vec::new(),
            options: DhcpOptions::default(),
        }
    }

    /// A typed view through dhcproto, for diagnostics and cross-checks. Safe because
    /// [`DhcpPacket::decode`] already refused the option lengths dhcproto asserts on; this
    /// re-encodes our own (validated) packet rather than passing raw input along.
    pub fn to_dhcproto(&self) -> Result<dhcproto::v4::Message, WireError> {
        use dhcproto::Decodable;
        for (c, v) in self.options.iter() {
            if let Some(why) = length_rule(c, v.len()) {
                return Err(WireError::BadOptionLength {
                    code: c,
                    len: v.len(),
                    why,
                    at: 0,
                });
            }
        }
        let bytes = self.encode(&[]);
        dhcproto::v4::Message::decode(&mut dhcproto::Decoder::new(&bytes))
            .map_err(|e| WireError::Dhcproto(e.to_string()))
    }
}

/// Bit 15 of `flags` (RFC 2131 section 2).
pub const BROADCAST_FLAG: u16 = 0x8000;

/// The value bytes of a typed dhcproto option (no code, no length; long values joined back
/// together), ready for [`DhcpOptions::set`] under `u8::from(dhcproto::v4::OptionCode::from(&opt))`.
/// Useful for options with structure, such as classless static routes (121) and domain search
/// (119). Returns an empty value if dhcproto cannot encode it.
pub fn encode_option(opt: dhcproto::v4::DhcpOption) -> Vec<u8> {
    let Ok(bytes) = opt.to_vec() else {
        return Vec::new();
    };
    let mut raw = Vec::new();
    if walk(&bytes, 0, Field::Options, &mut raw).is_err() {
        return Vec::new();
    }
    raw.into_iter().fold(Vec::new(), |mut acc, o| {
        acc.extend_from_slice(o.value);
        acc
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A DISCOVER like a PXE client sends, built by hand.
    pub(crate) fn discover() -> DhcpPacket {
        let mut options = DhcpOptions::new();
        options.set_message_type(MessageType::Discover);
        options.set(code::MAX_MESSAGE_SIZE, 1472u16.to_be_bytes().to_vec());
        options.set(code::PARAMETER_REQUEST_LIST, vec![1, 3, 6, 66, 67, 43, 60]);
        options.set(code::CLIENT_ARCH, vec![0, 7]);
        options.set(
            code::VENDOR_CLASS,
            b"PXEClient:Arch:00007:UNDI:003016".to_vec(),
        );
        let mut chaddr = [0u8; 16];
        chaddr[..6].copy_from_slice(&[0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        DhcpPacket {
            op: Op::Request,
            htype: 1,
            hlen: 6,
            hops: 0,
            xid: 0xdead_beef,
            secs: 4,
            flags: 0x8000,
            ciaddr: Ipv4Addr::UNSPECIFIED,
            yiaddr: Ipv4Addr::UNSPECIFIED,
            siaddr: Ipv4Addr::UNSPECIFIED,
            giaddr: Ipv4Addr::UNSPECIFIED,
            chaddr,
            sname: Vec::new(),
            file: Vec::new(),
            options,
        }
    }

    /// Options area of an encoded packet as (code, len) pairs, Pad skipped, up to End.
    fn tlv_codes(bytes: &[u8]) -> Vec<(u8, usize)> {
        let mut raw = Vec::new();
        walk(
            &bytes[MIN_PACKET_LEN..],
            MIN_PACKET_LEN,
            Field::Options,
            &mut raw,
        )
        .unwrap();
        raw.iter().map(|o| (o.code, o.value.len())).collect()
    }

    #[test]
    fn round_trip_and_accessors() {
        let p = discover();
        let bytes = p.encode(&[]);
        assert_eq!(bytes.len(), MIN_REPLY_LEN);
        let q = DhcpPacket::decode(&bytes).unwrap();
        assert_eq!(q, p);
        assert_eq!(q.message_type(), Some(MessageType::Discover));
        assert_eq!(q.options.max_message_size(), Some(1472));
        assert_eq!(
            q.options.parameter_request_list(),
            &[1, 3, 6, 66, 67, 43, 60]
        );
        assert_eq!(q.mac().unwrap().to_string(), "52:54:00:12:34:56");
        assert!(q.broadcast_flag());
        assert_eq!(q.max_reply_len(), 1472 - 28);
    }

    #[test]
    fn encode_orders_53_54_then_prl_then_insertion() {
        let mut p = discover().reply_skeleton();
        p.options.set(6, vec![10, 0, 0, 1]);
        p.options.set(3, vec![10, 0, 0, 254]);
        p.options.set(1, vec![255, 255, 255, 0]);
        p.options.set(code::SERVER_ID, vec![10, 0, 0, 2]);
        p.options.set_message_type(MessageType::Offer);
        p.options.set(99, vec![1]);
        let bytes = p.encode(&[1, 3, 53, 200, 6]);
        let codes: Vec<u8> = tlv_codes(&bytes).iter().map(|(c, _)| *c).collect();
        assert_eq!(codes, vec![53, 54, 1, 3, 6, 99]);
        // End right after the last option, then Pad up to 300.
        let end = bytes.iter().rposition(|b| *b == code::END).unwrap();
        assert!(bytes[end + 1..].iter().all(|b| *b == 0));
        assert_eq!(bytes.len(), MIN_REPLY_LEN);
    }

    #[test]
    fn long_option_is_split_and_concatenated_back() {
        let mut p = discover();
        let long: Vec<u8> = (0..600u32).map(|i| (i % 251) as u8 + 1).collect();
        p.options.set(code::IPXE_ENCAP, long.clone());
        let bytes = p.encode(&[]);
        let parts: Vec<(u8, usize)> = tlv_codes(&bytes)
            .into_iter()
            .filter(|(c, _)| *c == code::IPXE_ENCAP)
            .collect();
        assert_eq!(parts, vec![(175, 255), (175, 255), (175, 90)]);
        let q = DhcpPacket::decode(&bytes).unwrap();
        assert_eq!(q.options.get(code::IPXE_ENCAP), Some(&long[..]));
    }

    #[test]
    fn sname_and_file_are_nul_terminated_and_trimmed() {
        let mut p = discover().reply_skeleton();
        p.options.set_message_type(MessageType::Offer);
        p.sname = b"10.0.0.2".to_vec();
        p.file = vec![b'a'; 200];
        let bytes = p.encode(&[]);
        assert_eq!(&bytes[SNAME_OFFSET..SNAME_OFFSET + 9], b"10.0.0.2\0");
        assert_eq!(bytes[FILE_OFFSET + 127], 0, "file cut to 127 + NUL");
        let q = DhcpPacket::decode(&bytes).unwrap();
        assert_eq!(q.sname, b"10.0.0.2");
        assert_eq!(q.file.len(), 127);
        assert_eq!(
            p.encode_within(&[], 1000),
            Err(WireError::FieldTooLong {
                field: "file",
                len: 200,
                max: 127
            })
        );
        p.file = b"undionly.kpxe".to_vec();
        assert!(p.encode_within(&[], MIN_REPLY_LEN).is_ok());
        p.options.set(200, vec![7; 400]);
        assert!(matches!(
            p.encode_within(&[], DEFAULT_MAX_REPLY_LEN),
            Err(WireError::ReplyTooLong { limit: 548, .. })
        ));
    }

    #[test]
    fn reply_skeleton_keeps_identity_masks_flags() {
        let mut p = discover();
        p.flags = 0x7f80; // reserved bits only, as one UEFI capture shows (quirks Q11)
        p.hops = 3;
        p.giaddr = Ipv4Addr::new(10, 1, 0, 1);
        p.ciaddr = Ipv4Addr::new(10, 1, 0, 9);
        assert!(!p.broadcast_flag());
        let r = p.reply_skeleton();
        assert_eq!(r.op, Op::Reply);
        assert_eq!((r.htype, r.hlen, r.hops, r.xid), (1, 6, 0, 0xdead_beef));
        assert_eq!(r.flags, 0);
        assert_eq!(r.giaddr, p.giaddr);
        assert_eq!(r.chaddr, p.chaddr);
        assert_eq!(r.ciaddr, Ipv4Addr::UNSPECIFIED);
        assert!(r.options.is_empty());
        p.flags = 0xffff;
        assert_eq!(p.reply_skeleton().flags, 0x8000);
    }

    #[test]
    fn mac_needs_ethernet() {
        let mut p = discover();
        p.hlen = 8;
        assert_eq!(p.mac(), None);
        p.hlen = 6;
        p.htype = 6;
        assert_eq!(p.mac(), None);
    }

    #[test]
    fn options_set_replaces_in_place_remove_and_ignore_framing() {
        let mut o = DhcpOptions::new();
        o.set(1, vec![1]);
        o.set(2, vec![2]);
        o.set(1, vec![3]);
        o.set(0, vec![9]);
        o.set(255, vec![9]);
        assert_eq!(
            o.iter().collect::<Vec<_>>(),
            vec![(1, &[3u8][..]), (2, &[2u8][..])]
        );
        o.remove(1);
        assert_eq!(o.get(1), None);
        assert_eq!(o.len(), 1);
        assert_eq!(o.parameter_request_list(), &[] as &[u8]);
        assert_eq!(o.requested_ip(), None);
        o.set(code::REQUESTED_IP, vec![10, 0, 0, 7]);
        o.set(code::SERVER_ID, vec![10, 0, 0, 1]);
        o.set(code::CLIENT_ID, vec![1, 2, 3]);
        assert_eq!(o.requested_ip(), Some(Ipv4Addr::new(10, 0, 0, 7)));
        assert_eq!(o.server_id(), Some(Ipv4Addr::new(10, 0, 0, 1)));
        assert_eq!(o.client_id(), Some(&[1u8, 2, 3][..]));
    }

    /// Raw packet: header from `discover()` with the given options area (after the cookie).
    fn with_options(area: &[u8]) -> Vec<u8> {
        let mut b = discover().encode(&[])[..MIN_PACKET_LEN].to_vec();
        b.extend_from_slice(area);
        b
    }

    #[test]
    fn hostile_headers() {
        let good = discover().encode(&[]);
        assert_eq!(
            DhcpPacket::decode(&[]),
            Err(WireError::Truncated { len: 0 })
        );
        assert_eq!(
            DhcpPacket::decode(&good[..239]),
            Err(WireError::Truncated { len: 239 })
        );
        let mut big = good.clone();
        big.resize(MAX_PACKET_LEN + 1, 0);
        assert_eq!(
            DhcpPacket::decode(&big),
            Err(WireError::TooLong { len: 1473 })
        );
        let mut b = good.clone();
        b[237] = 0;
        assert_eq!(DhcpPacket::decode(&b), Err(WireError::BadCookie));
        let mut b = good.clone();
        b[2] = 255;
        assert_eq!(DhcpPacket::decode(&b), Err(WireError::BadHlen(255)));
        b[2] = 17;
        assert_eq!(DhcpPacket::decode(&b), Err(WireError::BadHlen(17)));
        b[2] = 16;
        assert!(DhcpPacket::decode(&b).is_ok());
        let mut b = good.clone();
        b[0] = 3;
        assert_eq!(DhcpPacket::decode(&b), Err(WireError::BadOp(3)));
        // Exactly header + cookie, no options at all: a valid (BOOTP-like) message.
        let p = DhcpPacket::decode(&good[..240]).unwrap();
        assert!(p.options.is_empty());
        assert_eq!(p.message_type(), None);
    }

    #[test]
    fn hostile_options() {
        // Length byte missing.
        assert_eq!(
            DhcpPacket::decode(&with_options(&[53])),
            Err(WireError::OptionOverrun { code: 53, at: 240 })
        );
        // Length past the end.
        assert_eq!(
            DhcpPacket::decode(&with_options(&[0, 0, 60, 40, b'P', b'X', b'E'])),
            Err(WireError::OptionOverrun { code: 60, at: 242 })
        );
        // Zero-length 53.
        let e = DhcpPacket::decode(&with_options(&[53, 0, 255])).unwrap_err();
        assert!(matches!(
            e,
            WireError::BadOptionLength {
                code: 53,
                len: 0,
                at: 240,
                ..
            }
        ));
        assert!(
            e.to_string()
                .contains("option 53 at offset 240 has length 0"),
            "{e}"
        );
        // 53 repeated: RFC 3396 concatenation gives 2 bytes, which is wrong for 53.
        assert!(matches!(
            DhcpPacket::decode(&with_options(&[53, 1, 1, 53, 1, 3, 255])),
            Err(WireError::BadOptionLength {
                code: 53,
                len: 2,
                ..
            })
        ));
        // Options dhcproto asserts on.
        for (area, c) in [
            (&[80u8, 1, 0, 255][..], 80u8),
            (&[81, 2, 0, 0, 255][..], 81),
            (&[94, 2, 1, 2, 255][..], 94),
            (&[151, 0, 255][..], 151),
            (&[152, 3, 0, 0, 0, 255][..], 152),
            (&[54, 3, 1, 2, 3, 255][..], 54),
            (&[57, 1, 5, 255][..], 57),
            (&[61, 1, 1, 255][..], 61),
        ] {
            assert!(
                matches!(
                    DhcpPacket::decode(&with_options(area)),
                    Err(WireError::BadOptionLength { code, .. }) if code == c
                ),
                "{c}"
            );
        }
        // Missing End is tolerated; data after End is ignored.
        let p = DhcpPacket::decode(&with_options(&[53, 1, 1])).unwrap();
        assert_eq!(p.message_type(), Some(MessageType::Discover));
        let p = DhcpPacket::decode(&with_options(&[53, 1, 1, 255, 60, 200])).unwrap();
        assert_eq!(p.options.len(), 1);
        // Unknown message type: decodes, but no MessageType.
        let p = DhcpPacket::decode(&with_options(&[53, 1, 13, 255])).unwrap();
        assert_eq!(p.message_type(), None);
    }

    /// A packet whose options continue in file (overload 1), sname (2) or both (3).
    fn overloaded(value: u8, file_opts: &[u8], sname_opts: &[u8]) -> Vec<u8> {
        let mut b = with_options(&[53, 1, 1, 52, 1, value, 255]);
        b[FILE_OFFSET..FILE_OFFSET + FILE_LEN].fill(0);
        b[FILE_OFFSET..FILE_OFFSET + file_opts.len()].copy_from_slice(file_opts);
        b[SNAME_OFFSET..SNAME_OFFSET + SNAME_LEN].fill(0);
        b[SNAME_OFFSET..SNAME_OFFSET + sname_opts.len()].copy_from_slice(sname_opts);
        b
    }

    #[test]
    fn overload_reads_file_then_sname() {
        // RFC 3396: options field, then file, then sname, concatenated per code.
        let b = overloaded(
            3,
            &[60, 3, b'P', b'X', b'E', 255],
            &[60, 2, b'C', b'l', 255],
        );
        let p = DhcpPacket::decode(&b).unwrap();
        assert_eq!(p.options.get(60), Some(&b"PXECl"[..]));
        assert!(p.file.is_empty() && p.sname.is_empty());
        // Overload 1: sname stays a name.
        let b = overloaded(1, &[66, 1, b'x', 255], b"boot.example");
        let p = DhcpPacket::decode(&b).unwrap();
        assert_eq!(p.options.get(66), Some(&b"x"[..]));
        assert_eq!(p.sname, b"boot.example");
        // Overload 2: file stays a name.
        let b = overloaded(2, b"pxelinux.0", &[66, 1, b'y', 255]);
        let p = DhcpPacket::decode(&b).unwrap();
        assert_eq!(p.file, b"pxelinux.0");
        assert_eq!(p.options.get(66), Some(&b"y"[..]));
    }

    #[test]
    fn hostile_overload() {
        // 52 inside file: would be a loop; refused.
        let b = overloaded(1, &[52, 1, 3, 255], &[]);
        assert_eq!(
            DhcpPacket::decode(&b),
            Err(WireError::NestedOverload { at: FILE_OFFSET })
        );
        let b = overloaded(2, &[], &[0, 52, 1, 1, 255]);
        assert_eq!(
            DhcpPacket::decode(&b),
            Err(WireError::NestedOverload {
                at: SNAME_OFFSET + 1
            })
        );
        // Bad value.
        let b = overloaded(4, &[], &[]);
        assert_eq!(
            DhcpPacket::decode(&b),
            Err(WireError::BadOverload { value: 4, at: 243 })
        );
        // Overrun inside file.
        let b = overloaded(1, &[60, 200], &[]);
        assert_eq!(
            DhcpPacket::decode(&b),
            Err(WireError::OptionOverrun {
                code: 60,
                at: FILE_OFFSET
            })
        );
        // Two 52s.
        let b = with_options(&[52, 1, 1, 52, 1, 1, 255]);
        assert!(matches!(
            DhcpPacket::decode(&b),
            Err(WireError::BadOptionLength {
                code: 52,
                len: 2,
                ..
            })
        ));
        // Empty 52.
        assert!(matches!(
            DhcpPacket::decode(&with_options(&[52, 0, 255])),
            Err(WireError::BadOptionLength {
                code: 52,
                len: 0,
                ..
            })
        ));
    }

    #[test]
    fn encode_never_writes_overload() {
        let mut p = discover();
        p.options.set(code::OVERLOAD, vec![3]);
        let bytes = p.encode(&[]);
        assert!(tlv_codes(&bytes).iter().all(|(c, _)| *c != 52));
    }

    #[test]
    fn max_reply_len_bounds() {
        let mut p = discover();
        p.options.remove(code::MAX_MESSAGE_SIZE);
        assert_eq!(p.max_reply_len(), 548);
        p.options
            .set(code::MAX_MESSAGE_SIZE, 100u16.to_be_bytes().to_vec());
        assert_eq!(p.max_reply_len(), 548);
        p.options
            .set(code::MAX_MESSAGE_SIZE, 9000u16.to_be_bytes().to_vec());
        assert_eq!(p.max_reply_len(), MAX_PACKET_LEN);
    }

    #[test]
    fn dhcproto_agrees_with_our_decode() {
        let p = discover();
        let m = p.to_dhcproto().unwrap();
        assert_eq!(m.xid(), 0xdead_beef);
        assert_eq!(m.chaddr(), &[0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        assert_eq!(
            m.opts().msg_type(),
            Some(dhcproto::v4::MessageType::Discover)
        );
        assert!(m.flags().broadcast());
    }

    #[test]
    fn encode_option_uses_dhcproto_catalogue() {
        use std::str::FromStr;
        let names = vec![
            dhcproto::Name::from_str("lab.example.").unwrap(),
            dhcproto::Name::from_str("example.").unwrap(),
        ];
        let v = encode_option(dhcproto::v4::DhcpOption::DomainSearch(names));
        // RFC 1035 labels; RFC 3397 allows compression, so only check the first name.
        assert!(v.starts_with(b"\x03lab\x07example\x00"), "{v:?}");
        let v = encode_option(dhcproto::v4::DhcpOption::Router(vec![
            Ipv4Addr::new(10, 0, 0, 1),
            Ipv4Addr::new(10, 0, 0, 2),
        ]));
        assert_eq!(v, vec![10, 0, 0, 1, 10, 0, 0, 2]);
        // Long values come back joined.
        let v = encode_option(dhcproto::v4::DhcpOption::Message("m".repeat(400)));
        assert_eq!(v.len(), 400);
    }

    mod props {
        use super::super::*;
        use crate::dhcp::pxe_options::client_facts;
        use proptest::prelude::*;

        /// Codes with a length rule get valid values from their own strategy.
        fn free_code() -> impl Strategy<Value = u8> {
            (1u8..=254).prop_filter("code with a length rule", |c| {
                length_rule(*c, 9999).is_none() && length_rule(*c, 0).is_none()
            })
        }

        fn ip() -> impl Strategy<Value = Ipv4Addr> {
            any::<u32>().prop_map(Ipv4Addr::from)
        }

        /// Names without NULs that fit their field.
        fn name(max: usize) -> impl Strategy<Value = Vec<u8>> {
            proptest::collection::vec(1u8..=255, 0..=max)
        }

        prop_compose! {
            fn packet()(
                op in prop_oneof![Just(Op::Request), Just(Op::Reply)],
                htype in any::<u8>(), hlen in 0u8..=16, hops in any::<u8>(),
                xid in any::<u32>(), secs in any::<u16>(), flags in any::<u16>(),
                ciaddr in ip(), yiaddr in ip(), siaddr in ip(), giaddr in ip(),
                chaddr in any::<[u8; 16]>(),
                sname in name(SNAME_LEN - 1), file in name(FILE_LEN - 1),
                mtype in proptest::option::of(1u8..=8),
                server in proptest::option::of(ip()),
                rest in proptest::collection::vec(
                    (free_code(), proptest::collection::vec(any::<u8>(), 0..140)), 0..8),
            ) -> DhcpPacket {
                let mut options = DhcpOptions::new();
                for (c, v) in rest {
                    options.set(c, v);
                }
                if let Some(t) = mtype {
                    options.set(code::MESSAGE_TYPE, vec![t]);
                }
                if let Some(s) = server {
                    options.set_server_id(s);
                }
                DhcpPacket {
                    op, htype, hlen, hops, xid, secs, flags, ciaddr, yiaddr, siaddr, giaddr,
                    chaddr, sname, file, options,
                }
            }
        }

        fn sorted(o: &DhcpOptions) -> Vec<(u8, Vec<u8>)> {
            let mut v: Vec<(u8, Vec<u8>)> = o.iter().map(|(c, b)| (c, b.to_vec())).collect();
            v.sort();
            v
        }

        /// Everything downstream of decode that must not panic either.
        fn exercise(p: &DhcpPacket) {
            let _ = client_facts(p);
            let _ = p.to_dhcproto();
            let prl = p.options.parameter_request_list().to_vec();
            let again = p.encode(&prl);
            let _ = DhcpPacket::decode(&again);
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            #[test]
            fn encode_decode_round_trip(
                p in packet(),
                prl in proptest::collection::vec(any::<u8>(), 0..20),
            ) {
                let bytes = p.encode(&prl);
                prop_assert!(bytes.len() >= MIN_REPLY_LEN);
                let q = DhcpPacket::decode(&bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(sorted(&q.options), sorted(&p.options));
                let mut q2 = q.clone();
                q2.options = p.options.clone();
                prop_assert_eq!(q2, p.clone());
                // Order: 53, 54 first, then the PRL's order.
                let codes: Vec<u8> = q.options.iter().map(|(c, _)| c).collect();
                let mut want: Vec<u8> = Vec::new();
                for c in [code::MESSAGE_TYPE, code::SERVER_ID].iter().chain(prl.iter()) {
                    if p.options.contains(*c) && !want.contains(c) {
                        want.push(*c);
                    }
                }
                prop_assert_eq!(&codes[..want.len()], &want[..]);
                // dhcproto reads what we wrote (xid, chaddr) without panicking.
                if let Ok(m) = q.to_dhcproto() {
                    prop_assert_eq!(m.xid(), p.xid);
                }
            }

            #[test]
            fn decode_never_panics_on_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..1600)) {
                if let Ok(p) = DhcpPacket::decode(&bytes) {
                    exercise(&p);
                }
            }

            #[test]
            fn decode_never_panics_on_mutations(
                p in packet(),
                muts in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..12),
                cut in proptest::option::of(any::<prop::sample::Index>()),
                overload in proptest::option::of(0u8..=4),
            ) {
                let mut bytes = p.encode(&[]);
                if let Some(v) = overload {
                    // Put a 52 at the start of the options so mutations hit file/sname parsing.
                    bytes.splice(MIN_PACKET_LEN..MIN_PACKET_LEN, [code::OVERLOAD, 1, v]);
                }
                for (i, b) in muts {
                    let at = i.index(bytes.len());
                    bytes[at] = b;
                }
                if let Some(c) = cut {
                    bytes.truncate(c.index(bytes.len() + 1));
                }
                if let Ok(q) = DhcpPacket::decode(&bytes) {
                    exercise(&q);
                }
            }

            #[test]
            fn valid_header_with_random_options_never_panics(
                area in proptest::collection::vec(any::<u8>(), 0..1200),
                file in any::<[u8; 128]>(),
                sname in any::<[u8; 64]>(),
            ) {
                let mut bytes = super::discover().encode(&[])[..MIN_PACKET_LEN].to_vec();
                bytes[FILE_OFFSET..FILE_OFFSET + FILE_LEN].copy_from_slice(&file);
                bytes[SNAME_OFFSET..SNAME_OFFSET + SNAME_LEN].copy_from_slice(&sname);
                bytes.extend_from_slice(&area);
                if let Ok(q) = DhcpPacket::decode(&bytes) {
                    exercise(&q);
                }
            }
        }
    }
}
