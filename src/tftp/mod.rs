//! TFTP (RFC 1350, 2347, 2348, 2349, 7440): a sans-IO engine and its tokio server.

use serde::Deserialize;

/// `[tftp]`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct TftpConfig {
    /// Serve TFTP at all.
    pub enabled: bool,
    /// UDP port (69).
    pub port: u16,
    /// Largest blksize granted; by default the egress MTU minus 32 (firmware-quirks.md Q7).
    pub blksize_max: Option<u16>,
    /// Largest windowsize granted (RFC 7440); tftp-hpa breaks above 64.
    pub windowsize_max: u16,
}

impl Default for TftpConfig {
    fn default() -> Self {
        TftpConfig {
            enabled: true,
            port: 69,
            blksize_max: None,
            windowsize_max: 64,
        }
    }
}
