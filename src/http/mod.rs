//! HTTP: boot assets, per-machine iPXE scripts, UEFI HTTP Boot, phone-home, API, dashboard and
//! metrics, on axum.

use std::net::IpAddr;

use serde::Deserialize;

/// `[http]`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Serve HTTP at all.
    pub enabled: bool,
    /// TCP port. URLs handed to clients use it.
    pub port: u16,
    /// Address to bind; the server address when absent.
    pub bind: Option<IpAddr>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            enabled: true,
            port: 8080,
            bind: None,
        }
    }
}
