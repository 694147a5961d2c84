//! DHCPv4: the wire layer (hardened decoding on top of dhcproto), PXE option codecs, the
//! sans-IO engine (proxyDHCP and full server) and the socket driver.

pub mod pxe_options;
pub mod wire;

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::mac::MacAddr;

pub mod engine;
pub mod limits;
pub mod pool;
pub mod probe;
pub mod reply_table;
pub mod server;

/// How pxed takes part in DHCP on its network.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DhcpMode {
    /// ProxyDHCP: another server gives addresses; pxed answers PXE clients with boot data only.
    #[default]
    Proxy,
    /// pxed is the network's DHCP server.
    Full,
    /// No DHCP at all (TFTP and HTTP only).
    Off,
}

/// `[dhcp]`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct DhcpConfig {
    /// Proxy, full or off.
    pub mode: DhcpMode,
    /// Also answer PXE boot server requests on port 4011.
    pub port_4011: bool,
    /// `[[dhcp.subnet]]`: address pools (full mode).
    pub subnet: Vec<SubnetConfig>,
    /// Answer IPv6 router solicitations of machines in the middle of a PXE boot with a
    /// "no router here" advertisement, ending iPXE's IPv6 wait (see `ipv6_ra`). Default: on in
    /// full mode, off in proxy mode.
    pub end_ipv6_wait: Option<bool>,
    /// `[[dhcp.reservation]]`: fixed addresses by MAC or client identifier (full mode).
    pub reservation: Vec<ReservationConfig>,
    /// Whether pxed is the authority on its subnets (RFC 2131 4.3.2): NAK a REQUEST for an
    /// address it has no lease for (true), or stay silent and let the client fall back to
    /// DISCOVER (false: safer beside another server, or after losing the lease store).
    pub authoritative: bool,
    /// A command run after each lease change is durable (`commit`, `renew`, `release`,
    /// `decline`, `expire` as its first argument, the lease as JSON on stdin).
    pub lease_hook: Option<PathBuf>,
    /// How many lease changes one disk sync may carry (group commit); bounds memory and the
    /// latency of the last reply in a batch.
    pub max_commit_batch: usize,
    /// Compatibility (firmware-quirks.md Q3): put option 60 `PXEClient`/`HTTPClient` in PXE
    /// replies. Spec ROMs and EDK2 ignore or retry past offers without it. Default on; turn it
    /// off only to reproduce a server that omits it (the lab's quirk checks do).
    pub pxe_vendor_option: bool,
    /// Compatibility (Q2): send option 43 discovery control `{6: 8}` where the reply table
    /// says so. Default on; off reproduces a server without PXE vendor options.
    pub discovery_control: bool,
    /// Compatibility (Q1): where the boot file goes. Default `auto`.
    pub boot_file: BootFileFields,
    /// Compatibility (Q5): when option 93 is missing, take the architecture from the `Arch:`
    /// digits of option 60 (ipxe #1527, firmware that omits 93). Default on; off reproduces a
    /// server that reads only option 93 and treats the client as BIOS.
    pub arch_from_vendor_class: bool,
    /// Compatibility (Q5): read client architecture 9 as x64 UEFI, like 7. RFC 4578's table
    /// and its erratum disagree on which of 7 and 9 is x86-64, and firmware sends either
    /// (crowbar PR #180: an OVMF sent 9). Default on; off reproduces a server that maps only 7
    /// (as many dnsmasq guides do): a client sending 9 gets the default, BIOS, program.
    pub arch_9_is_x64: bool,
    /// Compatibility (Q11, RFC 2131 4.1): full mode broadcasts the OFFER and ACK to a client
    /// that set the BROADCAST flag. Default on; off reproduces a server or relay that unicasts
    /// to the new address anyway (pyke369/pdhcp #3), which a client that cannot take unicast
    /// before it has an address never receives.
    pub honour_broadcast_flag: bool,
    /// Compatibility (Q12): answer PXE clients that send no option 97 (client UUID); some
    /// Intel ROMs omit it (danderson/pixiecore #21). Default on; off reproduces a server that
    /// requires the UUID and ignores such a client.
    pub serve_without_uuid: bool,
    /// `[dhcp.limits]`: rate limits against floods (see `limits`).
    pub limits: limits::DhcpLimits,
    /// How often (seconds) to probe for other DHCP servers on the link with a DISCOVER from
    /// a made-up MAC; 0 turns the periodic probe off (replies seen passively on port 68 are
    /// still reported).
    pub foreign_probe_secs: u64,
    /// Full mode: before offering an address no client held, check that no host answers on
    /// it (RFC 2131 2.2, 4.3.1). `off` (default) or `icmp` (one echo request, bounded wait).
    pub conflict_probe: ConflictProbe,
}

/// `[dhcp] conflict_probe`: how to check an address is unused before offering it.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ConflictProbe {
    /// Offer at once (the default: a probe delays every new client's OFFER).
    #[default]
    Off,
    /// One ICMP echo request; a reply within `probe::PROBE_TIMEOUT` means the address is in
    /// use. Hosts that drop pings are not found (their own DECLINE still quarantines).
    Icmp,
}

/// Where a PXE reply carries the boot file (firmware-quirks.md Q1).
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum BootFileFields {
    /// Header `siaddr`/`sname`/`file` always, options 66/67 when the client asks for them in
    /// option 55 (what dnsmasq does, and what every firmware we know reads).
    #[default]
    Auto,
    /// Only the header fields (an old BOOTP-style server): clients that read only 66/67 fail.
    Header,
    /// Only options 66/67 (a router-style server): clients that read only the header fail.
    Options,
}

impl Default for DhcpConfig {
    fn default() -> Self {
        DhcpConfig {
            mode: DhcpMode::Proxy,
            port_4011: true,
            subnet: Vec::new(),
            end_ipv6_wait: None,
            reservation: Vec::new(),
            authoritative: true,
            lease_hook: None,
            max_commit_batch: DEFAULT_COMMIT_BATCH,
            pxe_vendor_option: true,
            discovery_control: true,
            boot_file: BootFileFields::Auto,
            arch_from_vendor_class: true,
            arch_9_is_x64: true,
            honour_broadcast_flag: true,
            serve_without_uuid: true,
            conflict_probe: ConflictProbe::Off,
            limits: limits::DhcpLimits::default(),
            foreign_probe_secs: DEFAULT_FOREIGN_PROBE_SECS,
        }
    }
}

/// Default period of the probe for other DHCP servers: a rogue server that appears is
/// reported within minutes, at the cost of one broadcast packet per period.
pub const DEFAULT_FOREIGN_PROBE_SECS: u64 = 300;

/// Default limit of lease changes per sync: at 1 ms per fdatasync this allows millions of
/// leases per second, far past what one socket delivers, while keeping a batch small in memory.
pub const DEFAULT_COMMIT_BATCH: usize = 1024;

/// `[[dhcp.reservation]]`: a fixed address for one machine. Matched by MAC, or by client
/// identifier (option 61) for clients that must be told apart by it.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ReservationConfig {
    /// Hardware address.
    #[serde(default)]
    pub mac: Option<MacAddr>,
    /// Client identifier (option 61) as hex, e.g. `01:52:54:00:12:34:56` or `ff00...`.
    #[serde(default)]
    pub client_id: Option<String>,
    /// The address (may lie outside the dynamic pool, but inside a subnet).
    pub ip: Ipv4Addr,
    /// Hostname to give (option 12).
    #[serde(default)]
    pub hostname: Option<String>,
}

impl ReservationConfig {
    /// The client identifier as bytes, if one is given and valid hex.
    pub fn client_id_bytes(&self) -> Option<Vec<u8>> {
        let text: String = self
            .client_id
            .as_deref()?
            .chars()
            .filter(|c| !matches!(c, ':' | '-'))
            .collect();
        hex::decode(text).ok()
    }
}

/// `[[dhcp.subnet.route]]`: a classless static route (option 121, RFC 3442).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Destination network address.
    pub network: Ipv4Addr,
    /// Destination prefix length (0..=32).
    pub prefix_len: u8,
    /// Next hop.
    pub gateway: Ipv4Addr,
}

/// `[[dhcp.subnet.option]]`: any option by code, as hex bytes or text.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RawOption {
    /// Option code (1..=254).
    pub code: u8,
    /// Value as hex (`0a000001`, colons allowed).
    #[serde(default)]
    pub hex: Option<String>,
    /// Value as text.
    #[serde(default)]
    pub text: Option<String>,
}

impl RawOption {
    /// The option's value bytes.
    pub fn value(&self) -> Result<Vec<u8>, String> {
        match (&self.hex, &self.text) {
            (Some(h), None) => {
                let clean: String = h.chars().filter(|c| !matches!(c, ':' | ' ')).collect();
                hex::decode(clean).map_err(|e| format!("option {}: bad hex: {e}", self.code))
            }
            (None, Some(t)) => Ok(t.as_bytes().to_vec()),
            _ => Err(format!(
                "option {}: give exactly one of `hex` or `text`",
                self.code
            )),
        }
    }
}

/// `[[dhcp.subnet]]`: one network pxed gives addresses on.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SubnetConfig {
    /// Network address.
    pub network: Ipv4Addr,
    /// Prefix length.
    pub prefix_len: u8,
    /// First address of the pool.
    pub pool_start: Ipv4Addr,
    /// Last address of the pool.
    pub pool_end: Ipv4Addr,
    /// Default gateway (option 3).
    #[serde(default)]
    pub router: Option<Ipv4Addr>,
    /// DNS servers (option 6).
    #[serde(default)]
    pub dns: Vec<Ipv4Addr>,
    /// Domain name (option 15).
    #[serde(default)]
    pub domain: Option<String>,
    /// Lease time.
    #[serde(default = "default_lease_time", with = "humantime_serde")]
    pub lease_time: Duration,
    /// Domain search list (option 119, RFC 3397).
    #[serde(default)]
    pub search: Vec<String>,
    /// Classless static routes (option 121, RFC 3442).
    #[serde(default)]
    pub route: Vec<RouteConfig>,
    /// NTP servers (option 42).
    #[serde(default)]
    pub ntp: Vec<Ipv4Addr>,
    /// Interface MTU (option 26).
    #[serde(default)]
    pub mtu: Option<u16>,
    /// Any further option by code.
    #[serde(default)]
    pub option: Vec<RawOption>,
}

fn default_lease_time() -> Duration {
    Duration::from_secs(3600)
}

impl SubnetConfig {
    /// The subnet mask for `prefix_len`.
    pub fn mask(&self) -> Ipv4Addr {
        let bits = u32::MAX
            .checked_shl(32 - u32::from(self.prefix_len.min(32)))
            .unwrap_or(0);
        Ipv4Addr::from(bits)
    }

    /// Whether an address lies in this subnet.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = u32::from(self.mask());
        u32::from(ip) & mask == u32::from(self.network) & mask
    }
}

impl DhcpConfig {
    /// Whether the IPv6 "no router" responder runs: pxed owns the network in full mode; in
    /// proxy mode someone else does, so it stays off unless asked for.
    pub fn ipv6_ra_enabled(&self) -> bool {
        self.end_ipv6_wait.unwrap_or(self.mode == DhcpMode::Full)
    }

    /// Check values that parse but cannot work.
    pub fn validate(&self) -> Result<(), String> {
        if self.mode == DhcpMode::Full && self.subnet.is_empty() {
            return Err("full mode needs at least one [[dhcp.subnet]]".into());
        }
        for s in &self.subnet {
            if s.prefix_len > 30 {
                return Err(format!(
                    "subnet {}/{}: prefix too long",
                    s.network, s.prefix_len
                ));
            }
            for ip in [s.pool_start, s.pool_end] {
                if !s.contains(ip) {
                    return Err(format!(
                        "subnet {}/{}: pool address {ip} is outside the subnet",
                        s.network, s.prefix_len
                    ));
                }
            }
            for name in &s.search {
                // RFC 1035 2.3.4: labels of 1..=63 octets.
                if name
                    .trim_end_matches('.')
                    .split('.')
                    .any(|l| l.is_empty() || l.len() > 63)
                {
                    return Err(format!("search domain `{name}`: bad label"));
                }
            }
            for r in &s.route {
                if r.prefix_len > 32 {
                    return Err(format!(
                        "route {}/{}: prefix too long",
                        r.network, r.prefix_len
                    ));
                }
            }
            if s.mtu.is_some_and(|m| m < MIN_MTU) {
                return Err(format!(
                    "subnet {}/{}: mtu below {MIN_MTU} (RFC 2132 5.1)",
                    s.network, s.prefix_len
                ));
            }
            for o in &s.option {
                let v = o.value()?;
                if o.code == 0 || o.code == 255 {
                    return Err(format!(
                        "option {}: codes 0 and 255 are not options",
                        o.code
                    ));
                }
                if v.is_empty() {
                    return Err(format!("option {}: empty value", o.code));
                }
            }
            if u32::from(s.pool_start) > u32::from(s.pool_end) {
                return Err(format!(
                    "subnet {}/{}: pool_start {} is after pool_end {}",
                    s.network, s.prefix_len, s.pool_start, s.pool_end
                ));
            }
        }
        for r in &self.reservation {
            if r.mac.is_none() && r.client_id.is_none() {
                return Err(format!("reservation {}: give `mac` or `client_id`", r.ip));
            }
            if r.client_id.is_some() && r.client_id_bytes().is_none() {
                return Err(format!("reservation {}: client_id is not hex", r.ip));
            }
            if !self.subnet.iter().any(|s| s.contains(r.ip)) {
                return Err(format!("reservation {}: in no [[dhcp.subnet]]", r.ip));
            }
        }
        if self.max_commit_batch == 0 {
            return Err("max_commit_batch must be at least 1".into());
        }
        Ok(())
    }
}

/// The smallest MTU option 26 may carry (RFC 2132 section 5.1).
const MIN_MTU: u16 = 68;
