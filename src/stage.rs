//! The boot stages: the one vocabulary shared by the server's events, the dashboard, the API,
//! metrics and the lab's oracle. Add a stage here and every consumer sees it.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

macro_rules! stages {
    ($($(#[$doc:meta])* $variant:ident = $name:literal,)*) => {
        /// One step of a network boot, as seen by the server or by the lab.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum BootStage {
            $($(#[$doc])* $variant,)*
        }

        impl BootStage {
            /// Every stage, in boot order.
            pub const ALL: &'static [BootStage] = &[$(BootStage::$variant,)*];

            /// The dotted name used in logs, JSON, metrics and lab files (`dhcp.offer`).
            pub fn as_str(self) -> &'static str {
                match self {
                    $(BootStage::$variant => $name,)*
                }
            }
        }

        impl FromStr for BootStage {
            type Err = UnknownStage;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($name => Ok(BootStage::$variant),)*
                    _ => Err(UnknownStage(s.to_string())),
                }
            }
        }
    };
}

stages! {
    /// A DHCPDISCOVER arrived (port 67).
    DhcpDiscover = "dhcp.discover",
    /// pxed offered an address (full mode).
    DhcpOffer = "dhcp.offer",
    /// A DHCPREQUEST arrived.
    DhcpRequest = "dhcp.request",
    /// pxed acknowledged a lease.
    DhcpAck = "dhcp.ack",
    /// pxed refused a request.
    DhcpNak = "dhcp.nak",
    /// The client declined an address (it found it in use).
    DhcpDecline = "dhcp.decline",
    /// The client released its address.
    DhcpRelease = "dhcp.release",
    /// A DHCPINFORM was answered.
    DhcpInform = "dhcp.inform",
    /// A packet was not answered; the detail says why.
    DhcpIgnore = "dhcp.ignore",
    /// Another DHCP server answered on the link (the client named is the one it answered).
    DhcpForeignServer = "dhcp.foreign-server",
    /// pxed sent a proxyDHCP offer (port 67, proxy mode).
    ProxyOffer = "proxy.offer",
    /// pxed answered a boot server request on port 4011.
    Proxy4011 = "proxy.4011",
    /// A TFTP read request arrived.
    TftpRequest = "tftp.request",
    /// pxed acknowledged TFTP options.
    TftpOack = "tftp.oack",
    /// The client asked only for the size and aborted, as EDK2 does before the real read.
    TftpProbe = "tftp.probe",
    /// A TFTP transfer finished.
    TftpComplete = "tftp.complete",
    /// A TFTP transfer failed; the detail says why.
    TftpError = "tftp.error",
    /// iPXE runs and did its own DHCP (user class `iPXE`).
    IpxeDhcp = "ipxe.dhcp",
    /// An iPXE script was served.
    HttpScript = "http.script",
    /// A kernel was served over HTTP.
    HttpKernel = "http.kernel",
    /// An initrd was served over HTTP.
    HttpInitrd = "http.initrd",
    /// Another boot asset was served over HTTP (EFI program, image, template).
    HttpAsset = "http.asset",
    /// A kernel, initrd or other boot asset was sent in full over HTTP (the last byte handed to
    /// the connection).
    HttpComplete = "http.complete",
    /// An HTTP request for a boot asset failed.
    HttpError = "http.error",
    /// The kernel started (serial banner).
    OsKernel = "os.kernel",
    /// The test OS reached userspace.
    OsUserspace = "os.userspace",
    /// The booted OS reported home.
    OsPhoneHome = "os.phone-home",
    /// The booted OS reported a stage of its own (named in the detail).
    OsCustom = "os.custom",
}

impl BootStage {
    /// The protocol family a stage belongs to (`dhcp`, `tftp`, ...), for grouping in reports.
    pub fn family(self) -> &'static str {
        let name = self.as_str();
        name.split('.').next().unwrap_or(name)
    }

    /// Stages that mean the boot cannot go on as planned.
    pub fn is_failure(self) -> bool {
        matches!(
            self,
            BootStage::TftpError | BootStage::HttpError | BootStage::DhcpNak
        )
    }
}

/// A stage name that is not in the vocabulary.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unknown boot stage `{0}`")]
pub struct UnknownStage(pub String);

impl fmt::Display for BootStage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for BootStage {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for BootStage {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for stage in BootStage::ALL {
            assert_eq!(stage.as_str().parse::<BootStage>(), Ok(*stage));
        }
        assert!("dhcp.bogus".parse::<BootStage>().is_err());
    }

    #[test]
    fn families() {
        assert_eq!(BootStage::Proxy4011.family(), "proxy");
        assert_eq!(BootStage::OsPhoneHome.family(), "os");
    }
}
