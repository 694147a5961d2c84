//! TFTP packets (RFC 1350 section 5, RFC 2347 options): parsing that never panics on hostile
//! bytes, and encoding of the packets a server sends.

use std::fmt;

/// The longest request we parse. RFC 2347 section 2 limits a request to 512 octets; we allow one
/// Ethernet payload because some clients pad or send long paths, and refuse anything larger.
pub const MAX_REQUEST_BYTES: usize = 1500;
/// Options kept from one request; more than this is junk, not a client (RFC 2347 lists 4 + 1).
pub const MAX_OPTIONS: usize = 16;
/// The longest option name or value we look at (values are decimal numbers of at most 20 digits).
pub const MAX_OPTION_TEXT: usize = 64;

/// RFC 1350 section 5: opcodes.
pub mod opcode {
    /// Read request.
    pub const RRQ: u16 = 1;
    /// Write request.
    pub const WRQ: u16 = 2;
    /// Data.
    pub const DATA: u16 = 3;
    /// Acknowledgment.
    pub const ACK: u16 = 4;
    /// Error.
    pub const ERROR: u16 = 5;
    /// RFC 2347: option acknowledgment.
    pub const OACK: u16 = 6;
}

/// RFC 1350 appendix "Error Codes", plus RFC 2347's code 8.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum ErrorCode {
    /// Not defined, see error message.
    Undefined = 0,
    /// File not found.
    FileNotFound = 1,
    /// Access violation.
    AccessViolation = 2,
    /// Disk full or allocation exceeded.
    DiskFull = 3,
    /// Illegal TFTP operation.
    IllegalOperation = 4,
    /// Unknown transfer ID.
    UnknownTid = 5,
    /// File already exists.
    FileExists = 6,
    /// No such user.
    NoSuchUser = 7,
    /// RFC 2347: terminate transfer due to option negotiation.
    OptionNegotiation = 8,
}

/// The transfer mode of a request (RFC 1350 section 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// 8-bit bytes as they are.
    Octet,
    /// Text: line ends become CR LF, a lone CR becomes CR NUL.
    Netascii,
    /// Obsolete mail delivery; always refused.
    Mail,
}

impl Mode {
    fn parse(text: &[u8]) -> Option<Mode> {
        if text.eq_ignore_ascii_case(b"octet") {
            Some(Mode::Octet)
        } else if text.eq_ignore_ascii_case(b"netascii") {
            Some(Mode::Netascii)
        } else if text.eq_ignore_ascii_case(b"mail") {
            Some(Mode::Mail)
        } else {
            None
        }
    }

    /// The lower-case name used on the wire and in events.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Octet => "octet",
            Mode::Netascii => "netascii",
            Mode::Mail => "mail",
        }
    }
}

/// A read or write request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// True for a WRQ.
    pub write: bool,
    /// The file name, as sent (validated as UTF-8, never containing NUL).
    pub filename: String,
    /// The transfer mode.
    pub mode: Mode,
    /// RFC 2347 options in the order sent, names lower-cased; later duplicates are dropped.
    pub options: Vec<(String, String)>,
}

impl Request {
    /// The value of an option the client sent, by lower-case name.
    pub fn option(&self, name: &str) -> Option<&str> {
        self.options
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A parsed packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Packet<'a> {
    /// RRQ or WRQ.
    Request(Request),
    /// DATA: block number and payload.
    Data(u16, &'a [u8]),
    /// ACK of a block number.
    Ack(u16),
    /// ERROR: code (raw, may be outside the table) and message.
    Error(u16, String),
    /// OACK (only a client receives these; parsed for tests).
    Oack(Vec<(String, String)>),
}

/// Why bytes are not a TFTP packet.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Fewer than the fixed header bytes.
    #[error("packet too short ({0} bytes)")]
    Short(usize),
    /// An opcode outside 1..=6.
    #[error("unknown opcode {0}")]
    UnknownOpcode(u16),
    /// A string field without its NUL terminator.
    #[error("unterminated string")]
    Unterminated,
    /// The file name is empty or not UTF-8.
    #[error("bad file name")]
    BadFilename,
    /// The mode is not netascii, octet or mail.
    #[error("unknown transfer mode")]
    BadMode,
    /// A request larger than [`MAX_REQUEST_BYTES`].
    #[error("request too long ({0} bytes)")]
    TooLong(usize),
    /// More than [`MAX_OPTIONS`] options, or an option name or value that is not short ASCII.
    #[error("malformed options")]
    BadOptions,
}

fn be16(bytes: &[u8], at: usize) -> Option<u16> {
    let hi = *bytes.get(at)?;
    let lo = *bytes.get(at + 1)?;
    Some(u16::from_be_bytes([hi, lo]))
}

/// Split NUL-terminated strings; the last one must be terminated too.
fn nul_strings(mut rest: &[u8]) -> Result<Vec<&[u8]>, WireError> {
    let mut out = Vec::new();
    while !rest.is_empty() {
        let end = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or(WireError::Unterminated)?;
        let (s, tail) = rest.split_at(end);
        out.push(s);
        // Skip the NUL itself; `tail` starts with it.
        rest = tail.get(1..).unwrap_or(&[]);
        if out.len() > 2 + 2 * MAX_OPTIONS {
            return Err(WireError::BadOptions);
        }
    }
    Ok(out)
}

fn short_ascii(s: &[u8]) -> Option<String> {
    if s.len() > MAX_OPTION_TEXT || !s.iter().all(|b| b.is_ascii_graphic() || *b == b' ') {
        return None;
    }
    Some(String::from_utf8_lossy(s).to_ascii_lowercase())
}

fn parse_options(fields: &[&[u8]]) -> Result<Vec<(String, String)>, WireError> {
    // RFC 2347 section 2: options come as name/value pairs. Some clients end the packet with a
    // stray empty string; an odd trailing empty field is tolerated, anything else is malformed.
    let mut out: Vec<(String, String)> = Vec::new();
    let mut pairs = fields.chunks(2);
    for pair in &mut pairs {
        match pair {
            [name, value] => {
                let name = short_ascii(name).ok_or(WireError::BadOptions)?;
                let value = short_ascii(value).ok_or(WireError::BadOptions)?;
                if name.is_empty() {
                    return Err(WireError::BadOptions);
                }
                // A repeated option: the first one counts, as in tftp-hpa.
                if !out.iter().any(|(n, _)| *n == name) {
                    out.push((name, value));
                }
            }
            [[]] => {}
            _ => return Err(WireError::BadOptions),
        }
    }
    if out.len() > MAX_OPTIONS {
        return Err(WireError::BadOptions);
    }
    Ok(out)
}

/// Parse one datagram.
pub fn parse(bytes: &[u8]) -> Result<Packet<'_>, WireError> {
    let op = be16(bytes, 0).ok_or(WireError::Short(bytes.len()))?;
    let body = bytes.get(2..).unwrap_or(&[]);
    match op {
        opcode::RRQ | opcode::WRQ => {
            if bytes.len() > MAX_REQUEST_BYTES {
                return Err(WireError::TooLong(bytes.len()));
            }
            let fields = nul_strings(body)?;
            let (name, mode, rest) = match fields.as_slice() {
                [name, mode, rest @ ..] => (*name, *mode, rest),
                _ => return Err(WireError::Unterminated),
            };
            if name.is_empty() {
                return Err(WireError::BadFilename);
            }
            let filename = std::str::from_utf8(name)
                .map_err(|_| WireError::BadFilename)?
                .to_string();
            let mode = Mode::parse(mode).ok_or(WireError::BadMode)?;
            Ok(Packet::Request(Request {
                write: op == opcode::WRQ,
                filename,
                mode,
                options: parse_options(rest)?,
            }))
        }
        opcode::DATA => {
            let block = be16(bytes, 2).ok_or(WireError::Short(bytes.len()))?;
            Ok(Packet::Data(block, bytes.get(4..).unwrap_or(&[])))
        }
        opcode::ACK => {
            // Trailing bytes after the block number are ignored, as every server does.
            let block = be16(bytes, 2).ok_or(WireError::Short(bytes.len()))?;
            Ok(Packet::Ack(block))
        }
        opcode::ERROR => {
            let code = be16(bytes, 2).ok_or(WireError::Short(bytes.len()))?;
            // Clients often omit the terminating NUL of the message; take what is there.
            let msg = bytes.get(4..).unwrap_or(&[]);
            let end = msg.iter().position(|&b| b == 0).unwrap_or(msg.len());
            let msg = String::from_utf8_lossy(msg.get(..end).unwrap_or(&[])).into_owned();
            Ok(Packet::Error(code, msg))
        }
        opcode::OACK => {
            let fields = nul_strings(body)?;
            Ok(Packet::Oack(parse_options(&fields)?))
        }
        other => Err(WireError::UnknownOpcode(other)),
    }
}

/// The 4-byte header of a DATA packet; the payload follows it.
pub fn data_header(block: u16) -> [u8; 4] {
    let [hi, lo] = block.to_be_bytes();
    let [ohi, olo] = opcode::DATA.to_be_bytes();
    [ohi, olo, hi, lo]
}

/// A whole DATA packet.
pub fn encode_data(block: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + payload.len());
    out.extend_from_slice(&data_header(block));
    out.extend_from_slice(payload);
    out
}

/// An ACK (clients send these; used by tests and the built-in test client).
pub fn encode_ack(block: u16) -> Vec<u8> {
    let mut out = opcode::ACK.to_be_bytes().to_vec();
    out.extend_from_slice(&block.to_be_bytes());
    out
}

/// An ERROR packet. The message is cut to keep the packet within one 512-byte block.
pub fn encode_error(code: ErrorCode, msg: &str) -> Vec<u8> {
    let mut out = opcode::ERROR.to_be_bytes().to_vec();
    out.extend_from_slice(&(code as u16).to_be_bytes());
    let msg: Vec<u8> = msg.bytes().filter(|b| *b != 0).take(500).collect();
    out.extend_from_slice(&msg);
    out.push(0);
    out
}

/// An OACK with the given options, in order.
pub fn encode_oack(options: &[(String, String)]) -> Vec<u8> {
    let mut out = opcode::OACK.to_be_bytes().to_vec();
    for (name, value) in options {
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        out.extend_from_slice(value.as_bytes());
        out.push(0);
    }
    out
}

/// A request (clients send these; used by tests and the built-in test client).
pub fn encode_request(
    write: bool,
    filename: &str,
    mode: &str,
    options: &[(&str, &str)],
) -> Vec<u8> {
    let op = if write { opcode::WRQ } else { opcode::RRQ };
    let mut out = op.to_be_bytes().to_vec();
    for field in [filename, mode]
        .into_iter()
        .chain(options.iter().flat_map(|(n, v)| [*n, *v]))
    {
        out.extend_from_slice(field.as_bytes());
        out.push(0);
    }
    out
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", *self as u16)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trip() {
        let bytes = encode_request(
            false,
            "a/b.efi",
            "OCTET",
            &[("BlkSize", "1468"), ("tsize", "0")],
        );
        let Packet::Request(r) = parse(&bytes).unwrap() else {
            panic!("not a request")
        };
        assert!(!r.write);
        assert_eq!(r.filename, "a/b.efi");
        assert_eq!(r.mode, Mode::Octet);
        assert_eq!(r.option("blksize"), Some("1468"));
        assert_eq!(r.option("tsize"), Some("0"));
    }

    #[test]
    fn duplicate_options_keep_the_first() {
        let bytes = encode_request(
            false,
            "f",
            "octet",
            &[("blksize", "512"), ("BLKSIZE", "9000")],
        );
        let Packet::Request(r) = parse(&bytes).unwrap() else {
            panic!()
        };
        assert_eq!(r.options.len(), 1);
        assert_eq!(r.option("blksize"), Some("512"));
    }

    #[test]
    fn malformed_packets_are_errors_not_panics() {
        let cases: &[&[u8]] = &[
            b"",
            b"\x00",
            b"\x00\x01",
            b"\x00\x01file",
            b"\x00\x01file\x00",
            b"\x00\x01file\x00octet",
            b"\x00\x01\x00octet\x00",
            b"\x00\x01file\x00bogus\x00",
            b"\x00\x01file\x00octet\x00blksize\x00",
            b"\x00\x01file\x00octet\x00blksize",
            b"\x00\x01\xff\xfe\x00octet\x00",
            b"\x00\x09abc",
            b"\xff\xff",
            b"\x00\x03\x00",
            b"\x00\x04\x01",
        ];
        for case in cases {
            assert!(parse(case).is_err(), "{case:?}");
        }
        let long = encode_request(false, &"a".repeat(2000), "octet", &[]);
        assert_eq!(parse(&long), Err(WireError::TooLong(long.len())));
    }

    #[test]
    fn error_without_nul_is_accepted() {
        assert_eq!(
            parse(b"\x00\x05\x00\x08abort").unwrap(),
            Packet::Error(8, "abort".into())
        );
        let e = encode_error(ErrorCode::FileNotFound, "nope");
        assert_eq!(parse(&e).unwrap(), Packet::Error(1, "nope".into()));
    }

    mod props {
        use super::super::*;
        use proptest::prelude::*;

        /// Option names and values as `parse` returns them: short, printable ASCII, lower case.
        fn text(min: usize) -> impl Strategy<Value = String> {
            proptest::collection::vec(
                prop_oneof![Just(b' '), 0x21u8..=0x7e],
                min..=MAX_OPTION_TEXT,
            )
            .prop_map(|b| String::from_utf8_lossy(&b).to_ascii_lowercase())
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            /// A request survives encode/parse; the fuzz target `tftp_wire` checks the other
            /// direction (parse/encode) on arbitrary bytes.
            #[test]
            fn request_round_trip(
                write in any::<bool>(),
                name in "[^\\x00]{1,200}",
                mode in prop_oneof![Just(Mode::Octet), Just(Mode::Netascii), Just(Mode::Mail)],
                opts in proptest::collection::vec((text(1), text(0)), 0..=MAX_OPTIONS),
            ) {
                let mut unique: Vec<(String, String)> = Vec::new();
                for (n, v) in opts {
                    if !unique.iter().any(|(u, _)| *u == n) {
                        unique.push((n, v));
                    }
                }
                let refs: Vec<(&str, &str)> =
                    unique.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
                let bytes = encode_request(write, &name, mode.as_str(), &refs);
                prop_assume!(bytes.len() <= MAX_REQUEST_BYTES);
                let want = Request { write, filename: name, mode, options: unique };
                prop_assert_eq!(parse(&bytes), Ok(Packet::Request(want)));
            }

            #[test]
            fn data_ack_oack_round_trip(
                block in any::<u16>(),
                payload in proptest::collection::vec(any::<u8>(), 0..600),
                opts in proptest::collection::btree_map(text(1), text(0), 0..=MAX_OPTIONS),
            ) {
                let data = encode_data(block, &payload);
                prop_assert_eq!(parse(&data), Ok(Packet::Data(block, &payload[..])));
                let ack = encode_ack(block);
                prop_assert_eq!(parse(&ack), Ok(Packet::Ack(block)));
                let opts: Vec<(String, String)> = opts.into_iter().collect();
                let oack = encode_oack(&opts);
                prop_assert_eq!(parse(&oack), Ok(Packet::Oack(opts.clone())));
            }
        }
    }
}
