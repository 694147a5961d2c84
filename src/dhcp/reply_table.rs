//! The PXE reply table: for each client class and server mode, what a reply carries so that
//! the client loads the boot file at once instead of retrying, waiting for ProxyDHCP or going
//! into boot server discovery. ARCHITECTURE.md ("The PXE reply table") prints this table; the
//! lab proves each row with real firmware.
//!
//! Sources per column (firmware-quirks.md):
//! - option 60 `PXEClient`/`HTTPClient` in the reply: Q3 (spec ROMs and EDK2 retry DISCOVER
//!   for 4 + 8 s without it; EDK2 HTTP boot needs `HTTPClient`).
//! - option 43 discovery control: Q2. `{6: 8}` ("use the boot file in this packet") makes EDK2
//!   classify an offer with an address as PXE 1.0 with the file in it (no discovery); without
//!   43 a ProxyDHCP offer is "BINL" and EDK2 asks the server on port 4011 (Q4), which pxed
//!   answers. Pixiecore omits 43 for EFI in proxy mode for the same reason.
//! - option 175 with 176 `no-pxedhcp`: Q4 and Q24. Tells iPXE there is no separate ProxyDHCP
//!   server to wait for (iPXE waits 2 s otherwise); only iPXE parses 175, so other firmware is
//!   untouched.

use super::DhcpMode;
use crate::policy::ClientFacts;

/// How pxed tells a client apart on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClientClass {
    /// iPXE on BIOS (user class `iPXE` or option 175, platform pcbios). QEMU's NIC ROMs are
    /// iPXE, so a SeaBIOS VM is this class from its first packet.
    IpxeBios,
    /// iPXE on UEFI (snponly.efi / ipxe.efi after chainloading).
    IpxeEfi,
    /// UEFI firmware's own PXE (EDK2 UefiPxeBcDxe and its descendants).
    UefiPxe,
    /// UEFI HTTP Boot (`HTTPClient` vendor class).
    UefiHttp,
    /// Any other PXE 2.x ROM (Intel Boot Agent, Broadcom, ... on BIOS).
    PxeRom,
}

impl ClientClass {
    /// Classify a client from what it sent.
    pub fn of(facts: &ClientFacts) -> ClientClass {
        let uefi = facts.arch().is_some_and(|a| a.is_uefi());
        if facts.is_ipxe {
            if uefi {
                ClientClass::IpxeEfi
            } else {
                ClientClass::IpxeBios
            }
        } else if facts.is_http_client() {
            ClientClass::UefiHttp
        } else if uefi {
            ClientClass::UefiPxe
        } else {
            ClientClass::PxeRom
        }
    }
}

/// Option 60 value identifying the reply as coming from a PXE (or HTTP boot) server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum VendorId {
    /// `PXEClient`.
    PxeClient,
    /// `HTTPClient`.
    HttpClient,
}

impl VendorId {
    /// The bytes of option 60.
    pub fn as_str(self) -> &'static str {
        match self {
            VendorId::PxeClient => "PXEClient",
            VendorId::HttpClient => "HTTPClient",
        }
    }
}

/// PXE discovery control bit 3 (value 8): "use the boot file in this packet, skip discovery"
/// (PXE 2.1 spec, option 43 sub-option 6; iPXE `PXEBS_SKIP`).
pub const DISCOVERY_USE_BOOTFILE: u8 = 8;

/// What the reply to one client carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ReplyShape {
    /// Option 60 in the reply.
    pub vendor_id: VendorId,
    /// Option 43 sub-option 6 value, or no option 43 at all.
    pub discovery_control: Option<u8>,
    /// Option 175 with 176 = 1 (iPXE: do not wait for ProxyDHCP).
    pub ipxe_no_pxedhcp: bool,
    /// Whether this client is expected to send a request to port 4011 next.
    pub expects_4011: bool,
}

/// The reply table. A pure function so that every row is a unit test.
pub fn reply_shape(class: ClientClass, mode: DhcpMode) -> ReplyShape {
    let proxy = mode == DhcpMode::Proxy;
    match class {
        // iPXE takes the file from an offer with PXEClient + 43 {6: 8}, also from a proxy
        // offer: the pxed-proxy lab shows no ProxyDHCPREQUEST to 4011 from iPXE.
        ClientClass::IpxeBios | ClientClass::IpxeEfi => ReplyShape {
            vendor_id: VendorId::PxeClient,
            discovery_control: Some(DISCOVERY_USE_BOOTFILE),
            ipxe_no_pxedhcp: !proxy,
            expects_4011: false,
        },
        // EDK2: in full mode 43 {6: 8} makes it boot the file in the offer (measured: 12.3 s
        // instead of a stall). In proxy mode no 43: the offer is BINL and EDK2 asks 4011.
        ClientClass::UefiPxe => ReplyShape {
            vendor_id: VendorId::PxeClient,
            discovery_control: if proxy {
                None
            } else {
                Some(DISCOVERY_USE_BOOTFILE)
            },
            ipxe_no_pxedhcp: false,
            expects_4011: proxy,
        },
        // HTTP boot clients take the URL from `file`/67 and need 60 `HTTPClient`; no PXE
        // sub-options apply.
        ClientClass::UefiHttp => ReplyShape {
            vendor_id: VendorId::HttpClient,
            discovery_control: None,
            ipxe_no_pxedhcp: false,
            expects_4011: false,
        },
        // Spec ROMs: 43 {6: 8} bypasses discovery (pixiecore sends it to BIOS clients).
        ClientClass::PxeRom => ReplyShape {
            vendor_id: VendorId::PxeClient,
            discovery_control: Some(DISCOVERY_USE_BOOTFILE),
            ipxe_no_pxedhcp: false,
            expects_4011: false,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(arch: u16, ipxe: bool, vendor: &str) -> ClientFacts {
        ClientFacts {
            arch_code: Some(arch),
            is_ipxe: ipxe,
            vendor_class: Some(vendor.into()),
            ..Default::default()
        }
    }

    #[test]
    fn classes() {
        let pxe = "PXEClient:Arch:00000:UNDI:002001";
        assert_eq!(ClientClass::of(&facts(0, true, pxe)), ClientClass::IpxeBios);
        assert_eq!(ClientClass::of(&facts(7, true, pxe)), ClientClass::IpxeEfi);
        assert_eq!(ClientClass::of(&facts(7, false, pxe)), ClientClass::UefiPxe);
        assert_eq!(ClientClass::of(&facts(9, false, pxe)), ClientClass::UefiPxe);
        assert_eq!(
            ClientClass::of(&facts(16, false, "HTTPClient:Arch:00016:UNDI:003000")),
            ClientClass::UefiHttp
        );
        assert_eq!(ClientClass::of(&facts(0, false, pxe)), ClientClass::PxeRom);
    }

    #[test]
    fn edk2_gets_43_only_in_full_mode() {
        // Q2/Q13: PXEClient without 43 sends EDK2 to 4011; with {6: 8} it boots the file.
        let full = reply_shape(ClientClass::UefiPxe, DhcpMode::Full);
        assert_eq!(full.discovery_control, Some(8));
        assert!(!full.expects_4011);
        let proxy = reply_shape(ClientClass::UefiPxe, DhcpMode::Proxy);
        assert_eq!(proxy.discovery_control, None);
        assert!(proxy.expects_4011);
    }

    #[test]
    fn no_pxedhcp_only_for_ipxe_in_full_mode() {
        for class in [ClientClass::IpxeBios, ClientClass::IpxeEfi] {
            assert!(reply_shape(class, DhcpMode::Full).ipxe_no_pxedhcp);
            assert!(!reply_shape(class, DhcpMode::Proxy).ipxe_no_pxedhcp);
        }
        for class in [
            ClientClass::UefiPxe,
            ClientClass::UefiHttp,
            ClientClass::PxeRom,
        ] {
            assert!(!reply_shape(class, DhcpMode::Full).ipxe_no_pxedhcp);
        }
    }

    #[test]
    fn every_reply_says_who_it_is() {
        // Q3: option 60 always present; HTTPClient for HTTP boot.
        assert_eq!(
            reply_shape(ClientClass::UefiHttp, DhcpMode::Proxy).vendor_id,
            VendorId::HttpClient
        );
        assert_eq!(
            reply_shape(ClientClass::PxeRom, DhcpMode::Full).vendor_id,
            VendorId::PxeClient
        );
    }
}
