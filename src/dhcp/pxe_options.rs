//! Codecs for the options PXE clients send and need: 60 (vendor class), 77 (user class), 93/94/97
//! (RFC 4578 architecture, network interface, machine UUID), 43 (PXE 2.1 vendor sub-options) and
//! 175 (iPXE encapsulated options), plus [`client_facts`], which turns a decoded request into the
//! policy's [`ClientFacts`]. Malformed values become errors or warnings, never panics.

use std::net::Ipv4Addr;

use crate::dhcp::wire::{DhcpPacket, code};
use crate::mac::MacAddr;
use crate::policy::{ClientArch, ClientFacts};

/// Why a PXE option value is malformed.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum PxeOptionError {
    /// The value's length breaks the option's definition.
    #[error("option {option} has length {len}: {why}")]
    BadLength {
        /// Option (or `43.<sub>` / `175.<sub>` sub-option, as text).
        option: String,
        /// Length found.
        len: usize,
        /// What the definition requires.
        why: &'static str,
    },
    /// Option 97 with a type byte other than 0 (RFC 4578 2.3 defines only 0, a GUID).
    #[error("option 97 has identifier type {0}; only type 0 (GUID) is defined")]
    UnknownUuidType(u8),
    /// Option 94 with an interface type other than 1 (UNDI), the only one RFC 4578 2.2 defines.
    #[error("option 94 has interface type {0}; only type 1 (UNDI) is defined")]
    UnknownNdiType(u8),
    /// A sub-option runs past the end of its encapsulating option.
    #[error("option {option} sub-option {sub} at offset {at} runs past the end of the option")]
    SubOptionOverrun {
        /// Encapsulating option (43 or 175).
        option: u8,
        /// Sub-option code.
        sub: u8,
        /// Offset inside the option value.
        at: usize,
    },
    /// A value too long for one sub-option (255 bytes) on encode.
    #[error("option {option} sub-option {sub} would be {len} bytes; at most 255 fit")]
    SubOptionTooLong {
        /// Encapsulating option.
        option: u8,
        /// Sub-option code.
        sub: u8,
        /// Encoded length.
        len: usize,
    },
}

// ---------------------------------------------------------------------------------------------
// Option 60

/// What a client says it is, by the prefix of option 60.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VendorKind {
    /// `PXEClient...`: PXE 2.1 firmware (and iPXE, which copies the format).
    PxeClient,
    /// `HTTPClient...`: UEFI HTTP Boot (UEFI 2.5+ section 24.7).
    HttpClient,
    /// Anything else (an OS DHCP client, `MSFT 5.0`, `udhcp 1.36`...).
    Other,
}

/// A decoded option 60.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VendorClass {
    /// As sent, NULs trimmed (firmware-quirks Q10: some clients NUL-terminate strings).
    pub raw: String,
    /// Prefix classification.
    pub kind: VendorKind,
    /// The five digits after `Arch:`.
    pub arch: Option<u16>,
    /// The six digits after `UNDI:` as (major, minor).
    pub undi: Option<(u8, u8)>,
}

/// Parses option 60. PXE 2.1 section 2.2 defines `PXEClient:Arch:xxxxx:UNDI:yyyzzz`; UEFI HTTP
/// Boot uses the same layout with `HTTPClient`. Short forms (`PXEClient` alone) and garbage are
/// kept in `raw` with the parts that do not parse left `None`.
pub fn parse_vendor_class(bytes: &[u8]) -> VendorClass {
    let raw = lossy_trimmed(bytes);
    let kind = if raw.starts_with("PXEClient") {
        VendorKind::PxeClient
    } else if raw.starts_with("HTTPClient") {
        VendorKind::HttpClient
    } else {
        VendorKind::Other
    };
    let mut arch = None;
    let mut undi = None;
    if kind != VendorKind::Other {
        let parts: Vec<&str> = raw.split(':').collect();
        for pair in parts.windows(2) {
            if let [key, value] = pair {
                match *key {
                    "Arch" if arch.is_none() => arch = digits(value, 5).and_then(to_u16),
                    "UNDI" if undi.is_none() => {
                        undi = digits(value, 6).and_then(|d| {
                            let (major, minor) = d.split_at(3);
                            Some((to_u8(major)?, to_u8(minor)?))
                        })
                    }
                    _ => {}
                }
            }
        }
    }
    VendorClass {
        raw,
        kind,
        arch,
        undi,
    }
}

/// `s` if it is exactly `n` ASCII digits.
fn digits(s: &str, n: usize) -> Option<&str> {
    (s.len() == n && s.bytes().all(|b| b.is_ascii_digit())).then_some(s)
}

fn to_u16(s: &str) -> Option<u16> {
    s.parse().ok()
}

fn to_u8(s: &str) -> Option<u8> {
    s.parse().ok()
}

/// Text from bytes: invalid UTF-8 replaced, trailing NULs dropped.
fn lossy_trimmed(bytes: &[u8]) -> String {
    let end = bytes.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1);
    String::from_utf8_lossy(bytes.get(..end).unwrap_or(&[])).into_owned()
}

// ---------------------------------------------------------------------------------------------
// Options 93, 94, 97

/// Parses option 93. RFC 4578 2.1: a list of 16-bit architecture types, so a non-empty, even
/// length.
pub fn parse_client_arch(bytes: &[u8]) -> Result<Vec<u16>, PxeOptionError> {
    if bytes.is_empty() || !bytes.len().is_multiple_of(2) {
        return Err(PxeOptionError::BadLength {
            option: "93".into(),
            len: bytes.len(),
            why: "RFC 4578 2.1 requires a non-empty list of 16-bit types",
        });
    }
    Ok(bytes
        .chunks_exact(2)
        .map(|c| match c {
            [a, b] => u16::from_be_bytes([*a, *b]),
            _ => 0,
        })
        .collect())
}

/// A decoded option 94 (RFC 4578 2.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientNdi {
    /// Interface type: 1 = UNDI.
    pub kind: u8,
    /// UNDI major version.
    pub major: u8,
    /// UNDI minor version.
    pub minor: u8,
}

/// Parses option 94: type (1 = UNDI), major, minor; exactly 3 bytes.
pub fn parse_client_ndi(bytes: &[u8]) -> Result<ClientNdi, PxeOptionError> {
    match bytes {
        [1, major, minor] => Ok(ClientNdi {
            kind: 1,
            major: *major,
            minor: *minor,
        }),
        [kind, _, _] => Err(PxeOptionError::UnknownNdiType(*kind)),
        _ => Err(PxeOptionError::BadLength {
            option: "94".into(),
            len: bytes.len(),
            why: "RFC 4578 2.2 requires exactly 3 bytes",
        }),
    }
}

/// Parses option 97. RFC 4578 2.3: a type byte (0 = GUID) then 16 bytes. An empty value (some
/// ROMs send one when the machine has no UUID) is `Ok(None)`. A bare 16-byte value (type byte
/// missing) is refused: no source documents a client sending it, and guessing would make the
/// server see a UUID the client's own `${uuid}` does not print.
pub fn parse_client_uuid(bytes: &[u8]) -> Result<Option<[u8; 16]>, PxeOptionError> {
    match bytes.split_first() {
        None => Ok(None),
        Some((0, rest)) if rest.len() == 16 => {
            let g: [u8; 16] = rest.try_into().map_err(|_| PxeOptionError::BadLength {
                option: "97".into(),
                len: bytes.len(),
                why: "RFC 4578 2.3 requires a type byte and 16 bytes",
            })?;
            Ok(Some(g))
        }
        Some((t, _)) if bytes.len() == 17 => Err(PxeOptionError::UnknownUuidType(*t)),
        Some(_) => Err(PxeOptionError::BadLength {
            option: "97".into(),
            len: bytes.len(),
            why: "RFC 4578 2.3 requires a type byte and 16 bytes",
        }),
    }
}

/// Formats an option 97 GUID as `8-4-4-4-12` lower-case hex, the way iPXE's `${uuid}` prints
/// the same machine's UUID.
///
/// Byte order: option 97 carries the GUID in EFI/SMBIOS 2.6 order, the first three fields
/// little-endian. EDK2 copies the SMBIOS bytes as they are; iPXE reads SMBIOS, converts to
/// network order for its `uuid` setting (`smbios_settings.c`), and converts back to the
/// little-endian order before putting it in option 97 (`dhcp.c`, "RFC4578 suggests that it
/// follows the EFI spec"). `${uuid}` prints the network-order form (`uuid_ntoa`). So we swap
/// the first three fields back: the result equals `${uuid}`, `dmidecode -s system-uuid` and
/// QEMU's `-uuid` argument (checked against the captured fixtures).
pub fn format_uuid(g: &[u8; 16]) -> String {
    let [a0, a1, a2, a3, b0, b1, c0, c1, rest @ ..] = *g;
    let mut s = String::with_capacity(36);
    for (i, b) in [a3, a2, a1, a0, b1, b0, c1, c0]
        .iter()
        .chain(rest.iter())
        .enumerate()
    {
        if matches!(i, 4 | 6 | 8 | 10) {
            s.push('-');
        }
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// Parses option 77. RFC 3004 defines a list of length-prefixed classes, but iPXE (and other
/// clients predating the RFC) send one bare string such as `iPXE`. The value is read as RFC 3004
/// when the length bytes tile it exactly with non-empty entries; otherwise it is one bare class.
pub fn parse_user_class(bytes: &[u8]) -> Vec<String> {
    if bytes.is_empty() {
        return Vec::new();
    }
    let mut out = Vec::new();
    let mut rest = bytes;
    while let Some((&len, tail)) = rest.split_first() {
        let len = usize::from(len);
        match (len, tail.get(..len), tail.get(len..)) {
            (1.., Some(class), Some(after)) => {
                out.push(lossy_trimmed(class));
                rest = after;
            }
            _ => return vec![lossy_trimmed(bytes)],
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Option 43: PXE 2.1 vendor sub-options

/// PXE 2.1 option 43 sub-option codes (PXE spec table 2-1; iPXE `include/ipxe/dhcp.h`).
pub mod pxe_sub {
    /// PXE_DISCOVERY_CONTROL (1 byte of bits).
    pub const DISCOVERY_CONTROL: u8 = 6;
    /// PXE_BOOT_SERVER_MCAST (discovery multicast address).
    pub const MCAST_ADDR: u8 = 7;
    /// PXE_BOOT_SERVERS.
    pub const BOOT_SERVERS: u8 = 8;
    /// PXE_BOOT_MENU.
    pub const BOOT_MENU: u8 = 9;
    /// PXE_MENU_PROMPT.
    pub const MENU_PROMPT: u8 = 10;
    /// PXE_BOOT_ITEM.
    pub const BOOT_ITEM: u8 = 71;
}

/// Discovery control bits (iPXE `enum dhcp_pxe_discovery_control`).
pub mod discovery {
    /// Do not broadcast discovery.
    pub const NO_BROADCAST: u8 = 1;
    /// Do not multicast discovery.
    pub const NO_MULTICAST: u8 = 2;
    /// Accept only servers in the boot server list.
    pub const ONLY_LISTED: u8 = 4;
    /// Skip discovery, boot the file in this packet (pixiecore sends this to BIOS clients).
    pub const SKIP: u8 = 8;
}

/// One PXE_BOOT_SERVERS entry: a server type and its addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootServer {
    /// Boot server type (0 = PXE bootstrap server).
    pub kind: u16,
    /// Its addresses.
    pub addrs: Vec<Ipv4Addr>,
}

/// One PXE_BOOT_MENU entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MenuEntry {
    /// Boot server type this entry selects.
    pub kind: u16,
    /// Text shown.
    pub description: String,
}

/// Decoded option 43 for PXE clients.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PxeVendorOptions {
    /// Sub-option 6.
    pub discovery_control: Option<u8>,
    /// Sub-option 8.
    pub boot_servers: Vec<BootServer>,
    /// Sub-option 9.
    pub menu: Vec<MenuEntry>,
    /// Sub-option 10: timeout seconds and prompt text.
    pub prompt: Option<(u8, String)>,
    /// Sub-option 71: boot server type and layer.
    pub boot_item: Option<(u16, u16)>,
    /// Sub-options not listed above (7, vendor-specific...), kept raw in order.
    pub other: Vec<(u8, Vec<u8>)>,
}

/// Walks encapsulated TLVs (RFC 2132 8.4 layout: Pad/End single bytes, others code-len-value).
/// Repeated codes are kept as separate entries.
fn walk_encapsulated(option: u8, bytes: &[u8]) -> Result<Vec<(u8, &[u8])>, PxeOptionError> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    while let Some(&sub) = bytes.get(pos) {
        match sub {
            0 => pos = pos.saturating_add(1),
            255 => break,
            _ => {
                let overrun = PxeOptionError::SubOptionOverrun {
                    option,
                    sub,
                    at: pos,
                };
                let len = usize::from(*bytes.get(pos.saturating_add(1)).ok_or(overrun.clone())?);
                let start = pos.saturating_add(2);
                let end = start.saturating_add(len);
                let value = bytes.get(start..end).ok_or(overrun)?;
                out.push((sub, value));
                pos = end;
            }
        }
    }
    Ok(out)
}

fn bad43(sub: u8, len: usize, why: &'static str) -> PxeOptionError {
    PxeOptionError::BadLength {
        option: format!("43.{sub}"),
        len,
        why,
    }
}

fn be16(b: &[u8]) -> Option<u16> {
    match b {
        [a, c] => Some(u16::from_be_bytes([*a, *c])),
        _ => None,
    }
}

impl PxeVendorOptions {
    /// Options that make a PXE ROM skip boot server discovery and boot the file in the packet
    /// (discovery control 8; pixiecore and Smee send this, firmware-quirks Q2).
    pub fn skip_discovery() -> Self {
        PxeVendorOptions {
            discovery_control: Some(discovery::SKIP),
            ..Self::default()
        }
    }

    /// Decodes an option 43 value as PXE sub-options. Repeated sub-options are concatenated
    /// (RFC 3396 applies to encapsulated options too, section 5).
    pub fn decode(bytes: &[u8]) -> Result<Self, PxeOptionError> {
        let mut merged: Vec<(u8, Vec<u8>)> = Vec::new();
        for (sub, value) in walk_encapsulated(code::VENDOR_SPECIFIC, bytes)? {
            match merged.iter_mut().find(|(c, _)| *c == sub) {
                Some(slot) => slot.1.extend_from_slice(value),
                None => merged.push((sub, value.to_vec())),
            }
        }
        let mut out = PxeVendorOptions::default();
        for (sub, v) in merged {
            match sub {
                pxe_sub::DISCOVERY_CONTROL => match v.as_slice() {
                    [bits] => out.discovery_control = Some(*bits),
                    _ => return Err(bad43(sub, v.len(), "PXE 2.1 requires exactly 1 byte")),
                },
                pxe_sub::BOOT_SERVERS => {
                    let mut rest = v.as_slice();
                    while !rest.is_empty() {
                        let why = "PXE 2.1: type (2), count (1), count addresses (4 each)";
                        let (head, tail) = rest
                            .split_at_checked(3)
                            .ok_or_else(|| bad43(sub, v.len(), why))?;
                        let (kind, count) = match head {
                            [a, b, n] => (u16::from_be_bytes([*a, *b]), usize::from(*n)),
                            _ => return Err(bad43(sub, v.len(), why)),
                        };
                        let (ips, after) = tail
                            .split_at_checked(count.saturating_mul(4))
                            .ok_or_else(|| bad43(sub, v.len(), why))?;
                        let addrs = ips
                            .chunks_exact(4)
                            .filter_map(|c| <[u8; 4]>::try_from(c).ok())
                            .map(Ipv4Addr::from)
                            .collect();
                        out.boot_servers.push(BootServer { kind, addrs });
                        rest = after;
                    }
                }
                pxe_sub::BOOT_MENU => {
                    let mut rest = v.as_slice();
                    while !rest.is_empty() {
                        let why = "PXE 2.1: type (2), length (1), description";
                        let (head, tail) = rest
                            .split_at_checked(3)
                            .ok_or_else(|| bad43(sub, v.len(), why))?;
                        let (kind, len) = match head {
                            [a, b, n] => (u16::from_be_bytes([*a, *b]), usize::from(*n)),
                            _ => return Err(bad43(sub, v.len(), why)),
                        };
                        let (desc, after) = tail
                            .split_at_checked(len)
                            .ok_or_else(|| bad43(sub, v.len(), why))?;
                        out.menu.push(MenuEntry {
                            kind,
                            description: lossy_trimmed(desc),
                        });
                        rest = after;
                    }
                }
                pxe_sub::MENU_PROMPT => match v.split_first() {
                    Some((timeout, text)) => out.prompt = Some((*timeout, lossy_trimmed(text))),
                    None => return Err(bad43(sub, 0, "PXE 2.1: timeout (1) then prompt text")),
                },
                pxe_sub::BOOT_ITEM => {
                    let item = v
                        .split_at_checked(2)
                        .and_then(|(a, b)| Some((be16(a)?, be16(b)?)));
                    match item {
                        Some(i) => out.boot_item = Some(i),
                        None => {
                            return Err(bad43(sub, v.len(), "PXE 2.1: type (2) and layer (2)"));
                        }
                    }
                }
                _ => out.other.push((sub, v)),
            }
        }
        Ok(out)
    }

    /// Encodes the sub-options (6, 8, 9, 10, 71, then the others in order), ending with End
    /// (255) as PXE 2.1 requires. A sub-option longer than 255 bytes is refused: PXE ROMs do not
    /// reassemble split sub-options.
    pub fn encode(&self) -> Result<Vec<u8>, PxeOptionError> {
        let mut subs: Vec<(u8, Vec<u8>)> = Vec::new();
        if let Some(bits) = self.discovery_control {
            subs.push((pxe_sub::DISCOVERY_CONTROL, vec![bits]));
        }
        if !self.boot_servers.is_empty() {
            let mut v = Vec::new();
            for s in &self.boot_servers {
                v.extend_from_slice(&s.kind.to_be_bytes());
                v.push(u8::try_from(s.addrs.len()).map_err(|_| {
                    PxeOptionError::SubOptionTooLong {
                        option: code::VENDOR_SPECIFIC,
                        sub: pxe_sub::BOOT_SERVERS,
                        len: s.addrs.len().saturating_mul(4),
                    }
                })?);
                for a in &s.addrs {
                    v.extend_from_slice(&a.octets());
                }
            }
            subs.push((pxe_sub::BOOT_SERVERS, v));
        }
        if !self.menu.is_empty() {
            let mut v = Vec::new();
            for m in &self.menu {
                v.extend_from_slice(&m.kind.to_be_bytes());
                let d = m.description.as_bytes();
                v.push(
                    u8::try_from(d.len()).map_err(|_| PxeOptionError::SubOptionTooLong {
                        option: code::VENDOR_SPECIFIC,
                        sub: pxe_sub::BOOT_MENU,
                        len: d.len(),
                    })?,
                );
                v.extend_from_slice(d);
            }
            subs.push((pxe_sub::BOOT_MENU, v));
        }
        if let Some((timeout, text)) = &self.prompt {
            let mut v = vec![*timeout];
            v.extend_from_slice(text.as_bytes());
            subs.push((pxe_sub::MENU_PROMPT, v));
        }
        if let Some((kind, layer)) = self.boot_item {
            let mut v = kind.to_be_bytes().to_vec();
            v.extend_from_slice(&layer.to_be_bytes());
            subs.push((pxe_sub::BOOT_ITEM, v));
        }
        subs.extend(self.other.iter().cloned());
        let mut out = encode_tlvs(code::VENDOR_SPECIFIC, &subs)?;
        out.push(255);
        Ok(out)
    }
}

/// code-len-value for each entry; refuses values over 255 bytes.
fn encode_tlvs(option: u8, subs: &[(u8, Vec<u8>)]) -> Result<Vec<u8>, PxeOptionError> {
    let mut out = Vec::new();
    for (sub, v) in subs {
        let len = u8::try_from(v.len()).map_err(|_| PxeOptionError::SubOptionTooLong {
            option,
            sub: *sub,
            len: v.len(),
        })?;
        out.push(*sub);
        out.push(len);
        out.extend_from_slice(v);
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Option 175: iPXE encapsulated options

/// iPXE option 175 sub-option codes (iPXE `include/ipxe/dhcp.h`, `include/ipxe/features.h`).
pub mod ipxe_sub {
    /// `DHCP_EB_PRIORITY`: priority of this DHCP server's settings.
    pub const PRIORITY: u8 = 0x01;
    /// `DHCP_EB_KEEP_SAN`.
    pub const KEEP_SAN: u8 = 0x08;
    /// `DHCP_EB_SKIP_SAN_BOOT`.
    pub const SKIP_SAN_BOOT: u8 = 0x09;
    /// `DHCP_EB_SCRIPTLET`: a script run instead of the boot file.
    pub const SCRIPTLET: u8 = 0x51;
    /// `DHCP_EB_SYSLOGS_SERVER`.
    pub const SYSLOGS_SERVER: u8 = 0x55;
    /// `DHCP_EB_NO_PXEDHCP`: do not wait for ProxyDHCP (firmware-quirks Q4).
    pub const NO_PXEDHCP: u8 = 0xb0;
    /// `DHCP_EB_BUS_ID`: bus type, vendor, device of the boot NIC.
    pub const BUS_ID: u8 = 0xb1;
    /// `DHCP_EB_SAN_RETRY`.
    pub const SAN_RETRY: u8 = 0xbb;
    /// `DHCP_EB_SAN_FILENAME`.
    pub const SAN_FILENAME: u8 = 0xbc;
    /// `DHCP_EB_SAN_DRIVE`.
    pub const SAN_DRIVE: u8 = 0xbd;
    /// `DHCP_EB_VERSION`: major, minor, patch.
    pub const VERSION: u8 = 0xeb;
}

/// Feature flags iPXE announces in option 175 (`DHCP_EB_FEATURE_*` in iPXE's `features.h`),
/// with the names used there.
pub const IPXE_FEATURES: &[(u8, &str)] = &[
    (0x10, "PXE_EXT"),
    (0x11, "ISCSI"),
    (0x12, "AOE"),
    (0x13, "HTTP"),
    (0x14, "HTTPS"),
    (0x15, "TFTP"),
    (0x16, "FTP"),
    (0x17, "DNS"),
    (0x18, "BZIMAGE"),
    (0x19, "MULTIBOOT"),
    (0x1a, "SLAM"),
    (0x1b, "SRP"),
    (0x20, "NBI"),
    (0x21, "PXE"),
    (0x22, "ELF"),
    (0x23, "COMBOOT"),
    (0x24, "EFI"),
    (0x25, "FCOE"),
    (0x26, "VLAN"),
    (0x27, "MENU"),
    (0x28, "SDI"),
    (0x29, "NFS"),
];

/// Feature codes by name, for callers that test one.
pub mod ipxe_feature {
    /// HTTP protocol.
    pub const HTTP: u8 = 0x13;
    /// HTTPS protocol.
    pub const HTTPS: u8 = 0x14;
    /// TFTP protocol.
    pub const TFTP: u8 = 0x15;
    /// DNS.
    pub const DNS: u8 = 0x17;
    /// bzImage (Linux kernel) format.
    pub const BZIMAGE: u8 = 0x18;
    /// PXE (NBP) format.
    pub const PXE: u8 = 0x21;
    /// EFI image format.
    pub const EFI: u8 = 0x24;
    /// Menu support.
    pub const MENU: u8 = 0x27;
}

/// A decoded option 175 value: iPXE's encapsulated `(code, bytes)` list, in order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IpxeOptions {
    /// Sub-options as sent.
    pub entries: Vec<(u8, Vec<u8>)>,
}

impl IpxeOptions {
    /// Decodes an option 175 value.
    pub fn decode(bytes: &[u8]) -> Result<Self, PxeOptionError> {
        Ok(IpxeOptions {
            entries: walk_encapsulated(code::IPXE_ENCAP, bytes)?
                .into_iter()
                .map(|(c, v)| (c, v.to_vec()))
                .collect(),
        })
    }

    /// Encodes the entries (no End: iPXE reads the encapsulated block to its end).
    pub fn encode(&self) -> Result<Vec<u8>, PxeOptionError> {
        encode_tlvs(code::IPXE_ENCAP, &self.entries)
    }

    /// The value of sub-option `sub`.
    pub fn get(&self, sub: u8) -> Option<&[u8]> {
        self.entries
            .iter()
            .find(|(c, _)| *c == sub)
            .map(|(_, v)| v.as_slice())
    }

    /// iPXE announced feature `code` (present with a non-zero first byte).
    pub fn has_feature(&self, code: u8) -> bool {
        self.get(code)
            .and_then(|v| v.first())
            .is_some_and(|b| *b != 0)
    }

    /// Names of the announced features, in iPXE's spelling.
    pub fn features(&self) -> Vec<&'static str> {
        IPXE_FEATURES
            .iter()
            .filter(|(c, _)| self.has_feature(*c))
            .map(|(_, n)| *n)
            .collect()
    }

    /// `DHCP_EB_VERSION`: (major, minor, patch).
    pub fn version(&self) -> Option<(u8, u8, u8)> {
        match self.get(ipxe_sub::VERSION)? {
            [a, b, c] => Some((*a, *b, *c)),
            _ => None,
        }
    }

    /// `DHCP_EB_BUS_ID`: (bus type, vendor, device); bus type 1 is PCI.
    pub fn bus_id(&self) -> Option<(u8, u16, u16)> {
        match self.get(ipxe_sub::BUS_ID)? {
            [t, v0, v1, d0, d1] => Some((
                *t,
                u16::from_be_bytes([*v0, *v1]),
                u16::from_be_bytes([*d0, *d1]),
            )),
            _ => None,
        }
    }
}

/// The option 175 value that tells iPXE not to wait for ProxyDHCP offers: sub-option 176 = 1
/// (`DHCP_EB_NO_PXEDHCP`; dnsmasq's `dhcp-option-force=175,176,1` idiom).
pub fn no_pxedhcp() -> Vec<u8> {
    vec![ipxe_sub::NO_PXEDHCP, 1, 1]
}

// ---------------------------------------------------------------------------------------------
// Policy input

/// What the policy needs from a client request, plus human-readable warnings about anything
/// malformed or unusual (for events). Option 93 wins over the arch digits of option 60 (iPXE
/// #1527: chainloaded iPXE can send a stale option 60).
pub fn client_facts(packet: &DhcpPacket) -> (ClientFacts, Vec<String>) {
    let mut warnings = Vec::new();
    let opts = &packet.options;

    let mac = match packet.mac() {
        Some(m) => m,
        None => {
            warnings.push(format!(
                "hardware type {} length {} is not Ethernet; using the first 6 bytes of chaddr",
                packet.htype, packet.hlen
            ));
            let mut six = [0u8; 6];
            for (d, s) in six.iter_mut().zip(packet.chaddr.iter()) {
                *d = *s;
            }
            MacAddr(six)
        }
    };

    let vendor = opts.get(code::VENDOR_CLASS).map(parse_vendor_class);

    let mut arch_code = None;
    if let Some(v) = opts.get(code::CLIENT_ARCH) {
        match parse_client_arch(v) {
            Ok(list) => arch_code = list.first().copied(),
            Err(e) => warnings.push(format!("{e}; ignored")),
        }
    }
    if arch_code.is_none() {
        arch_code = vendor.as_ref().and_then(|v| v.arch);
    }
    if let Some(c) = arch_code
        && ClientArch::from_code(c).is_none()
    {
        warnings.push(format!("option 93 has unknown architecture {c}"));
    }

    if let Some(v) = opts.get(code::CLIENT_NDI)
        && let Err(e) = parse_client_ndi(v)
    {
        warnings.push(e.to_string());
    }

    let user_class = opts
        .get(code::USER_CLASS)
        .map(parse_user_class)
        .unwrap_or_default();

    let mut has_175 = false;
    if let Some(v) = opts.get(code::IPXE_ENCAP) {
        has_175 = true;
        if let Err(e) = IpxeOptions::decode(v) {
            warnings.push(e.to_string());
        }
    }
    let is_ipxe = has_175 || user_class.iter().any(|c| c == "iPXE");

    let uuid = match opts.get(code::CLIENT_UUID).map(parse_client_uuid) {
        None | Some(Ok(None)) => None,
        Some(Ok(Some(g))) if g == [0; 16] || g == [0xff; 16] => {
            // SMBIOS 2.6 7.2.1: all-FF means "not present", all-zero "present but not set".
            warnings.push("option 97 carries a placeholder UUID; ignored".into());
            None
        }
        Some(Ok(Some(g))) => Some(format_uuid(&g)),
        Some(Err(e)) => {
            warnings.push(format!("option 97 malformed: {e}"));
            None
        }
    };

    let relay = (!packet.giaddr.is_unspecified()).then_some(packet.giaddr);

    (
        ClientFacts {
            mac,
            arch_code,
            vendor_class: vendor.map(|v| v.raw),
            user_class,
            is_ipxe,
            uuid,
            relay,
        },
        warnings,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dhcp::wire::{DhcpOptions, MessageType, Op};

    #[test]
    fn vendor_class_variants() {
        let v = parse_vendor_class(b"PXEClient:Arch:00007:UNDI:003016");
        assert_eq!(v.kind, VendorKind::PxeClient);
        assert_eq!(v.arch, Some(7));
        assert_eq!(v.undi, Some((3, 16)));
        let v = parse_vendor_class(b"HTTPClient:Arch:00016:UNDI:003001");
        assert_eq!(v.kind, VendorKind::HttpClient);
        assert_eq!((v.arch, v.undi), (Some(16), Some((3, 1))));
        let v = parse_vendor_class(b"PXEClient\0");
        assert_eq!(
            (v.raw.as_str(), v.kind, v.arch),
            ("PXEClient", VendorKind::PxeClient, None)
        );
        let v = parse_vendor_class(b"MSFT 5.0");
        assert_eq!((v.kind, v.arch, v.undi), (VendorKind::Other, None, None));
        // Digits out of range, wrong widths, junk: no numbers, no panic.
        for junk in [
            &b"PXEClient:Arch:99999:UNDI:999999"[..],
            b"PXEClient:Arch:7:UNDI:3016",
            b"PXEClient:Arch:",
            b"PXEClient:Arch:0000x",
            b"PXEClient:\xff\xfe:Arch",
        ] {
            let v = parse_vendor_class(junk);
            assert_eq!(v.kind, VendorKind::PxeClient);
            assert_eq!((v.arch, v.undi), (None, None), "{junk:?}");
        }
    }

    #[test]
    fn client_arch_list() {
        assert_eq!(parse_client_arch(&[0, 7]), Ok(vec![7]));
        assert_eq!(parse_client_arch(&[0, 0, 0, 16]), Ok(vec![0, 16]));
        assert!(matches!(
            parse_client_arch(&[0, 7, 1]),
            Err(PxeOptionError::BadLength { len: 3, .. })
        ));
        assert!(parse_client_arch(&[]).is_err());
    }

    #[test]
    fn client_ndi() {
        assert_eq!(
            parse_client_ndi(&[1, 3, 16]),
            Ok(ClientNdi {
                kind: 1,
                major: 3,
                minor: 16
            })
        );
        assert_eq!(
            parse_client_ndi(&[2, 3, 16]),
            Err(PxeOptionError::UnknownNdiType(2))
        );
        assert!(matches!(
            parse_client_ndi(&[1, 2]),
            Err(PxeOptionError::BadLength { .. })
        ));
    }

    #[test]
    fn client_uuid_and_format() {
        let mut v = vec![0u8];
        v.extend(1..=16u8);
        let g = parse_client_uuid(&v).unwrap().unwrap();
        // First three fields little-endian on the wire (EFI order), printed swapped.
        assert_eq!(format_uuid(&g), "04030201-0605-0807-090a-0b0c0d0e0f10");
        assert_eq!(parse_client_uuid(&[]), Ok(None));
        v[0] = 2;
        assert_eq!(
            parse_client_uuid(&v),
            Err(PxeOptionError::UnknownUuidType(2))
        );
        assert!(matches!(
            parse_client_uuid(&v[1..]),
            Err(PxeOptionError::BadLength { len: 16, .. })
        ));
        assert!(parse_client_uuid(&[0; 18]).is_err());
    }

    #[test]
    fn user_class_forms() {
        assert_eq!(parse_user_class(b"iPXE"), vec!["iPXE"]);
        assert_eq!(parse_user_class(b"\x04iPXE\x03foo"), vec!["iPXE", "foo"]);
        // A zero length byte is not RFC 3004: the whole value is one class.
        assert_eq!(
            parse_user_class(b"\x00ab"),
            vec!["\0ab".trim_end_matches('\0')]
        );
        assert_eq!(parse_user_class(b"\x05iPXE"), vec!["\u{5}iPXE"]);
        assert!(parse_user_class(b"").is_empty());
    }

    #[test]
    fn pxe_vendor_options_round_trip() {
        let o = PxeVendorOptions {
            discovery_control: Some(discovery::SKIP | discovery::NO_MULTICAST),
            boot_servers: vec![BootServer {
                kind: 0x8000,
                addrs: vec![Ipv4Addr::new(10, 0, 0, 2), Ipv4Addr::new(10, 0, 0, 3)],
            }],
            menu: vec![
                MenuEntry {
                    kind: 0x8000,
                    description: "pxed".into(),
                },
                MenuEntry {
                    kind: 0,
                    description: "Local boot".into(),
                },
            ],
            prompt: Some((5, "Press F8".into())),
            boot_item: Some((0x8000, 0)),
            other: vec![(7, vec![224, 0, 1, 2])],
        };
        let bytes = o.encode().unwrap();
        assert_eq!(&bytes[..3], &[6, 1, 10]);
        assert_eq!(bytes.last(), Some(&255));
        assert_eq!(PxeVendorOptions::decode(&bytes), Ok(o));
        // dnsmasq's classic `vendor:PXEClient,6,8` + `10,00:50:58:45` (edk2 #8149).
        let d = PxeVendorOptions::decode(&[6, 1, 8, 10, 4, 0, b'P', b'X', b'E', 255]).unwrap();
        assert_eq!(d.discovery_control, Some(8));
        assert_eq!(d.prompt, Some((0, "PXE".into())));
        assert_eq!(
            PxeVendorOptions::skip_discovery().encode().unwrap(),
            vec![6, 1, 8, 255]
        );
    }

    #[test]
    fn pxe_vendor_options_hostile() {
        assert!(matches!(
            PxeVendorOptions::decode(&[6, 5, 8]),
            Err(PxeOptionError::SubOptionOverrun {
                option: 43,
                sub: 6,
                at: 0
            })
        ));
        assert!(PxeVendorOptions::decode(&[6, 2, 8, 8]).is_err());
        assert!(PxeVendorOptions::decode(&[8, 3, 0, 0, 2]).is_err()); // 2 addrs, none there
        assert!(PxeVendorOptions::decode(&[9, 3, 0, 0, 9]).is_err()); // desc overrun
        assert!(PxeVendorOptions::decode(&[71, 3, 0, 0, 0]).is_err());
        assert!(PxeVendorOptions::decode(&[10, 0]).is_err());
        assert_eq!(
            PxeVendorOptions::decode(&[]),
            Ok(PxeVendorOptions::default())
        );
        let too_long = PxeVendorOptions {
            menu: vec![MenuEntry {
                kind: 1,
                description: "x".repeat(300),
            }],
            ..Default::default()
        };
        assert!(matches!(
            too_long.encode(),
            Err(PxeOptionError::SubOptionTooLong { sub: 9, .. })
        ));
    }

    #[test]
    fn ipxe_options() {
        // What iPXE sends: features, bus id, version.
        let raw = [
            0x13, 1, 1, 0x24, 1, 1, 0x15, 1, 1, 0x17, 1, 0, 0xb1, 5, 1, 0x80, 0x86, 0x10, 0x0e,
            0xeb, 3, 1, 21, 1,
        ];
        let o = IpxeOptions::decode(&raw).unwrap();
        assert!(o.has_feature(ipxe_feature::HTTP));
        assert!(o.has_feature(ipxe_feature::EFI));
        assert!(!o.has_feature(ipxe_feature::DNS), "value 0 means off");
        assert!(!o.has_feature(ipxe_feature::HTTPS));
        assert_eq!(o.features(), vec!["HTTP", "TFTP", "EFI"]);
        assert_eq!(o.bus_id(), Some((1, 0x8086, 0x100e)));
        assert_eq!(o.version(), Some((1, 21, 1)));
        assert_eq!(o.encode().unwrap(), raw.to_vec());
        assert_eq!(no_pxedhcp(), vec![176, 1, 1]);
        assert_eq!(
            IpxeOptions::decode(&no_pxedhcp())
                .unwrap()
                .get(ipxe_sub::NO_PXEDHCP),
            Some(&[1u8][..])
        );
        assert!(IpxeOptions::decode(&[0x13, 9]).is_err());
    }

    fn request(options: DhcpOptions) -> DhcpPacket {
        let mut chaddr = [0u8; 16];
        chaddr[..6].copy_from_slice(&[0x52, 0x54, 0, 1, 2, 3]);
        DhcpPacket {
            op: Op::Request,
            htype: 1,
            hlen: 6,
            hops: 0,
            xid: 1,
            secs: 0,
            flags: 0,
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

    #[test]
    fn facts_from_a_pxe_request() {
        let mut o = DhcpOptions::new();
        o.set_message_type(MessageType::Discover);
        o.set(
            code::VENDOR_CLASS,
            b"PXEClient:Arch:00000:UNDI:002001".to_vec(),
        );
        o.set(code::CLIENT_ARCH, vec![0, 7]);
        o.set(code::USER_CLASS, b"iPXE".to_vec());
        let mut u = vec![0u8];
        u.extend(1..=16u8);
        o.set(code::CLIENT_UUID, u);
        let mut p = request(o);
        p.giaddr = Ipv4Addr::new(10, 9, 0, 1);
        let (f, w) = client_facts(&p);
        assert!(w.is_empty(), "{w:?}");
        assert_eq!(f.mac.to_string(), "52:54:00:01:02:03");
        assert_eq!(f.arch_code, Some(7), "93 wins over option 60");
        assert_eq!(
            f.vendor_class.as_deref(),
            Some("PXEClient:Arch:00000:UNDI:002001")
        );
        assert_eq!(f.user_class, vec!["iPXE"]);
        assert!(f.is_ipxe);
        assert_eq!(
            f.uuid.as_deref(),
            Some("04030201-0605-0807-090a-0b0c0d0e0f10")
        );
        assert_eq!(f.relay, Some(Ipv4Addr::new(10, 9, 0, 1)));
    }

    #[test]
    fn facts_fallbacks_and_warnings() {
        let mut o = DhcpOptions::new();
        o.set(
            code::VENDOR_CLASS,
            b"HTTPClient:Arch:00016:UNDI:003001".to_vec(),
        );
        o.set(code::CLIENT_ARCH, vec![0, 7, 9]);
        o.set(code::CLIENT_UUID, vec![3; 17]);
        o.set(code::IPXE_ENCAP, vec![0xb1]);
        let (f, w) = client_facts(&request(o));
        assert_eq!(f.arch_code, Some(16), "malformed 93 -> option 60 digits");
        assert!(f.is_http_client());
        assert!(f.is_ipxe, "option 175 present");
        assert_eq!(f.uuid, None);
        assert_eq!(f.relay, None);
        assert_eq!(w.len(), 3, "{w:?}");
        assert!(w[0].contains("option 93"), "{w:?}");
        assert!(w.iter().any(|x| x.contains("option 97 malformed")), "{w:?}");
        assert!(w.iter().any(|x| x.contains("175")), "{w:?}");

        let mut o = DhcpOptions::new();
        o.set(code::CLIENT_ARCH, vec![0, 42]);
        o.set(code::CLIENT_UUID, vec![0; 17]);
        let mut p = request(o);
        p.htype = 6;
        let (f, w) = client_facts(&p);
        assert_eq!(f.arch_code, Some(42));
        assert_eq!(f.uuid, None);
        assert_eq!(f.mac.to_string(), "52:54:00:01:02:03");
        assert!(
            w.iter()
                .any(|x| x == "option 93 has unknown architecture 42"),
            "{w:?}"
        );
        assert!(w.iter().any(|x| x.contains("placeholder")), "{w:?}");
        assert!(w.iter().any(|x| x.contains("not Ethernet")), "{w:?}");
        assert!(!f.is_ipxe);
    }

    /// Packets captured from real firmware under QEMU (see tests/fixtures/dhcp/README.md). All
    /// machines ran with `-uuid 12345678-9abc-def0-1122-334455667788`.
    mod fixtures {
        use super::*;
        use crate::dhcp::wire::MAX_PACKET_LEN;

        const QEMU_UUID: &str = "12345678-9abc-def0-1122-334455667788";

        fn load(name: &str) -> DhcpPacket {
            let path = format!(
                "{}/tests/fixtures/dhcp/{name}.bin",
                env!("CARGO_MANIFEST_DIR")
            );
            let bytes = std::fs::read(&path).unwrap();
            let p = DhcpPacket::decode(&bytes).unwrap();
            // dhcproto, given the same raw bytes, sees the same message.
            let m = <dhcproto::v4::Message as dhcproto::Decodable>::decode(
                &mut dhcproto::Decoder::new(&bytes),
            )
            .unwrap();
            assert_eq!(m.xid(), p.xid, "{name}");
            assert_eq!(m.chaddr(), &p.chaddr[..6], "{name}");
            assert_eq!(m.opts().len(), p.options.len(), "{name}");
            // Our own round trip keeps every field and option.
            let again = DhcpPacket::decode(&p.encode(p.options.parameter_request_list())).unwrap();
            assert_eq!(again.xid, p.xid);
            for (c, v) in p.options.iter() {
                assert_eq!(again.options.get(c), Some(v), "{name} option {c}");
            }
            p
        }

        fn facts(name: &str) -> (DhcpPacket, ClientFacts) {
            let p = load(name);
            let (f, w) = client_facts(&p);
            assert!(w.is_empty(), "{name}: {w:?}");
            (p, f)
        }

        #[test]
        fn ipxe_bios_rom() {
            for (name, t) in [
                ("ipxe-bios-discover", MessageType::Discover),
                ("ipxe-bios-request", MessageType::Request),
            ] {
                let (p, f) = facts(name);
                assert_eq!(p.message_type(), Some(t));
                assert_eq!(f.mac.to_string(), "52:54:00:00:00:01");
                assert_eq!(f.arch_code, Some(0), "SeaBIOS: x86 BIOS");
                assert_eq!(
                    f.vendor_class.as_deref(),
                    Some("PXEClient:Arch:00000:UNDI:002001")
                );
                assert_eq!(f.user_class, vec!["iPXE"], "bare string, not RFC 3004");
                assert!(f.is_ipxe);
                assert_eq!(f.uuid.as_deref(), Some(QEMU_UUID));
                assert!(!p.broadcast_flag());
                let prl = p.options.parameter_request_list();
                for c in [1, 3, 6, 43, 60, 66, 67, 175] {
                    assert!(prl.contains(&c), "{name} PRL lacks {c}");
                }
                assert_eq!(p.options.max_message_size(), Some(1472));
                assert_eq!(
                    parse_client_ndi(p.options.get(code::CLIENT_NDI).unwrap()),
                    Ok(ClientNdi {
                        kind: 1,
                        major: 2,
                        minor: 1
                    })
                );
                let ipxe = IpxeOptions::decode(p.options.get(code::IPXE_ENCAP).unwrap()).unwrap();
                assert_eq!(ipxe.bus_id(), Some((1, 0x8086, 0x100e)), "e1000 on PCI");
                for feat in [ipxe_feature::HTTP, ipxe_feature::TFTP, ipxe_feature::PXE] {
                    assert!(ipxe.has_feature(feat), "{feat:#x}");
                }
                assert!(!ipxe.has_feature(ipxe_feature::EFI));
                assert!(ipxe.version().is_some());
                assert_eq!(
                    p.options.client_id(),
                    Some(&[1, 0x52, 0x54, 0, 0, 0, 1][..])
                );
            }
            let r = load("ipxe-bios-request");
            assert_eq!(r.options.server_id(), Some(Ipv4Addr::new(10, 0, 2, 2)));
            assert_eq!(r.options.requested_ip(), Some(Ipv4Addr::new(10, 0, 2, 15)));
        }

        #[test]
        fn ipxe_efi_snponly() {
            for name in ["ipxe-efi-discover", "ipxe-efi-request"] {
                let (p, f) = facts(name);
                assert_eq!(f.mac.to_string(), "52:54:00:00:00:02");
                assert_eq!(f.arch_code, Some(7), "x86-64 UEFI");
                assert_eq!(
                    f.vendor_class.as_deref(),
                    Some("PXEClient:Arch:00007:UNDI:003010")
                );
                assert_eq!(f.user_class, vec!["iPXE"]);
                assert!(f.is_ipxe);
                assert_eq!(f.uuid.as_deref(), Some(QEMU_UUID));
                let ipxe = IpxeOptions::decode(p.options.get(code::IPXE_ENCAP).unwrap()).unwrap();
                assert!(ipxe.has_feature(ipxe_feature::EFI));
                assert!(ipxe.has_feature(ipxe_feature::HTTP));
                assert!(!ipxe.has_feature(ipxe_feature::PXE));
                assert_eq!(ipxe.bus_id(), Some((1, 0x1af4, 0x1000)), "virtio-net");
            }
        }

        #[test]
        fn edk2_native_pxe() {
            for (name, t) in [
                ("edk2-pxe-discover", MessageType::Discover),
                ("edk2-pxe-request", MessageType::Request),
            ] {
                let (p, f) = facts(name);
                assert_eq!(p.message_type(), Some(t));
                assert_eq!(f.mac.to_string(), "52:54:00:00:00:02");
                assert_eq!(f.arch_code, Some(7), "EDK2 sends 7 for x64 (quirks Q5)");
                assert_eq!(
                    f.vendor_class.as_deref(),
                    Some("PXEClient:Arch:00007:UNDI:003000")
                );
                assert!(f.user_class.is_empty());
                assert!(!f.is_ipxe);
                assert_eq!(f.uuid.as_deref(), Some(QEMU_UUID));
                assert!(p.broadcast_flag(), "EDK2 sets the broadcast bit");
                assert_eq!(p.options.client_id(), None, "EDK2 sends no option 61");
                let prl = p.options.parameter_request_list();
                assert_eq!(prl.len(), 35);
                for c in [43, 60, 66, 67, 97, 128, 135] {
                    assert!(prl.contains(&c), "{name} PRL lacks {c}");
                }
            }
            // EDK2's REQUEST claims a 65280-byte limit; we never go past one frame.
            let r = load("edk2-pxe-request");
            assert_eq!(r.options.max_message_size(), Some(0xff00));
            assert_eq!(r.max_reply_len(), MAX_PACKET_LEN);
            assert_eq!(load("edk2-pxe-discover").max_reply_len(), 1472 - 28);
        }

        #[test]
        fn edk2_http_boot() {
            let (p, f) = facts("edk2-http-discover");
            assert_eq!(p.message_type(), Some(MessageType::Discover));
            assert_eq!(f.mac.to_string(), "52:54:00:00:00:03");
            assert_eq!(f.arch_code, Some(16), "x64 UEFI HTTP");
            let v = parse_vendor_class(f.vendor_class.as_deref().unwrap().as_bytes());
            assert_eq!(v.kind, VendorKind::HttpClient);
            assert_eq!((v.arch, v.undi), (Some(16), Some((3, 0))));
            assert!(f.is_http_client());
            assert!(!f.is_ipxe);
            assert_eq!(f.uuid.as_deref(), Some(QEMU_UUID));
            assert!(p.broadcast_flag());
            let prl = p.options.parameter_request_list();
            assert!(prl.contains(&60) && prl.contains(&67), "{prl:?}");
            assert!(!prl.contains(&66), "HTTP boot asks for no TFTP server");
        }
    }

    mod props {
        use super::super::*;
        use proptest::prelude::*;

        fn sub_options() -> impl Strategy<Value = Vec<(u8, Vec<u8>)>> {
            proptest::collection::vec(
                (1u8..=254, proptest::collection::vec(any::<u8>(), 0..=255)),
                0..8,
            )
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            /// Option 175 round trip; option 43 from arbitrary bytes round-trips whenever it
            /// decodes and re-encodes (the fuzz target `dhcp_wire` runs the same check).
            #[test]
            fn ipxe_options_round_trip(entries in sub_options()) {
                let o = IpxeOptions { entries };
                let bytes = o.encode().map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(IpxeOptions::decode(&bytes), Ok(o));
            }

            #[test]
            fn pxe_vendor_options_round_trip(
                control in proptest::option::of(any::<u8>()),
                servers in proptest::collection::vec(
                    (any::<u16>(), proptest::collection::vec(any::<[u8; 4]>(), 0..4)), 0..4),
                menu in proptest::collection::vec((any::<u16>(), "[a-zA-Z0-9 ]{0,40}"), 0..4),
                prompt in proptest::option::of((any::<u8>(), "[a-zA-Z0-9 ]{0,40}")),
                item in proptest::option::of((any::<u16>(), any::<u16>())),
                raw in proptest::collection::vec(any::<u8>(), 0..300),
            ) {
                let o = PxeVendorOptions {
                    discovery_control: control,
                    boot_servers: servers
                        .into_iter()
                        .map(|(kind, a)| BootServer { kind, addrs: a.into_iter().map(Ipv4Addr::from).collect() })
                        .collect(),
                    menu: menu.into_iter().map(|(kind, description)| MenuEntry { kind, description }).collect(),
                    prompt,
                    boot_item: item,
                    other: Vec::new(),
                };
                if let Ok(bytes) = o.encode() {
                    prop_assert_eq!(PxeVendorOptions::decode(&bytes), Ok(o));
                }
                if let Ok(d) = PxeVendorOptions::decode(&raw)
                    && let Ok(bytes) = d.encode()
                {
                    prop_assert_eq!(PxeVendorOptions::decode(&bytes), Ok(d));
                }
            }
        }
    }
}
