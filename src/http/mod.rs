//! HTTP: boot assets, per-machine iPXE scripts, UEFI HTTP Boot, phone-home, API, dashboard and
//! metrics, on axum.
//!
//! The lead builds an [`HttpState`] and calls [`serve`] (or mounts [`router`] itself):
//!
//! ```no_run
//! # async fn run(state: pxed::http::HttpState) -> anyhow::Result<()> {
//! let listener = tokio::net::TcpListener::bind("0.0.0.0:8080").await?;
//! pxed::http::serve(listener, state, async { let _ = tokio::signal::ctrl_c().await; }).await
//! # }
//! ```
//!
//! - [`assets`]: files under the boot root (ranges, conditional GET, no escapes).
//! - [`ipxe`]: the entry script and the pure per-machine script renderer [`render_script`].
//! - [`api`]: phone-home, machines, the SSE event stream, metrics, dashboard.
//! - [`sendfile`]: the plain-HTTP listener; asset requests are answered there with
//!   `sendfile(2)`, everything else is handed to hyper and the router.
//! - [`server`]: state, routes, shutdown.

pub mod api;
pub mod assets;
pub mod boot_state;
pub mod buffers;
pub mod ipxe;
pub mod limits;
pub mod sendfile;
pub mod server;
pub mod templates;
pub mod tls;
pub mod token;

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

pub use boot_state::{BootStateStore, FileBootStates, MemoryBootStates};
pub use ipxe::{entry_script, render_script, try_render_script};
pub use server::{HttpState, MacLookup, router, serve};
pub use token::Secret;

/// Largest `[http] send_timeout_secs`: a day. A client that takes nothing for longer is gone;
/// the bound also keeps deadline arithmetic far from overflow.
pub const MAX_SEND_TIMEOUT_SECS: u64 = 24 * 60 * 60;

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
    /// Bearer token required by mutating API endpoints (`POST /api/events`, `DELETE
    /// /api/machines/{mac}/state`). Absent: `pxed serve` generates one and keeps it in
    /// `<state_dir>/api-token` (mode 0600); a state without a token refuses every mutation.
    /// Phone-home does not need it: a booted test OS has no way to know it (it carries its
    /// per-boot token instead).
    pub api_token: Option<String>,
    /// Template and phone-home requests must carry a valid per-boot token (see [`token`]), and
    /// a token is only issued to a client whose MAC pxed can confirm from its IP (lease or ARP
    /// table). Off: tokens are still generated and checked when given, but not required.
    pub require_token: bool,
    /// PEM certificate chain: with `tls_key`, the API and dashboard are also served over HTTPS
    /// on `tls_port` (boot assets stay on plain HTTP: iPXE has no CA that trusts us).
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// HTTPS port.
    pub tls_port: u16,
    /// Most connections open at once, all clients together (each costs a task and buffers).
    pub max_connections: usize,
    /// Most connections open at once from one client IP (a whole lab booting behind one NAT
    /// needs more; one machine needs a few).
    pub max_connections_per_ip: usize,
    /// Seconds a client may take no bytes of a response before pxed closes the connection (the
    /// time between two successful writes, as nginx's `send_timeout`). Without it a client that
    /// stops reading holds its connection, and its place under `max_connections_per_ip`, until
    /// TCP gives up (about 15 minutes of retransmissions, or never while the peer's window
    /// stays shut).
    pub send_timeout_secs: u64,
}

impl HttpConfig {
    /// Check what serde cannot: a configured API token is long enough to be a secret.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(t) = &self.api_token
            && (t.trim().len() < token::MIN_API_TOKEN_CHARS || t.trim() != t)
        {
            return Err(format!(
                "api_token must be at least {} characters without surrounding spaces \
                 (or leave it out: pxed then generates one in <state_dir>/{})",
                token::MIN_API_TOKEN_CHARS,
                token::API_TOKEN_FILE
            ));
        }
        if !(1..=MAX_SEND_TIMEOUT_SECS).contains(&self.send_timeout_secs) {
            return Err(format!(
                "send_timeout_secs must be between 1 and {MAX_SEND_TIMEOUT_SECS} (a day), not {}",
                self.send_timeout_secs
            ));
        }
        Ok(())
    }

    /// `send_timeout_secs` as a duration.
    pub fn send_timeout(&self) -> Duration {
        Duration::from_secs(self.send_timeout_secs)
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            enabled: true,
            port: 8080,
            bind: None,
            api_token: None,
            require_token: false,
            tls_cert: None,
            tls_key: None,
            tls_port: 8443,
            max_connections: limits::DEFAULT_MAX_CONNECTIONS,
            max_connections_per_ip: limits::DEFAULT_MAX_CONNECTIONS_PER_IP,
            send_timeout_secs: limits::DEFAULT_SEND_TIMEOUT.as_secs(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn send_timeout_is_bounded_and_named_when_wrong() {
        assert!(HttpConfig::default().validate().is_ok());
        for bad in [0, MAX_SEND_TIMEOUT_SECS + 1, u64::MAX] {
            let config = HttpConfig {
                send_timeout_secs: bad,
                ..HttpConfig::default()
            };
            let err = config.validate().unwrap_err();
            assert!(
                err.starts_with("send_timeout_secs must be between 1 and 86400"),
                "{err}"
            );
            assert!(err.ends_with(&format!("not {bad}")), "{err}");
        }
    }
}
