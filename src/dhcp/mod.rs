//! DHCPv4: the wire layer (hardened decoding on top of dhcproto), PXE option codecs, the
//! sans-IO engine (proxyDHCP and full server) and the socket driver.

pub mod pxe_options;
pub mod wire;

use std::net::Ipv4Addr;
use std::time::Duration;

use serde::Deserialize;

pub mod engine;
pub mod pool;
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
            pxe_vendor_option: true,
            discovery_control: true,
            boot_file: BootFileFields::Auto,
            arch_from_vendor_class: true,
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
            if u32::from(s.pool_start) > u32::from(s.pool_end) {
                return Err(format!(
                    "subnet {}/{}: pool_start {} is after pool_end {}",
                    s.network, s.prefix_len, s.pool_start, s.pool_end
                ));
            }
        }
        Ok(())
    }
}
