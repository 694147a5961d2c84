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
//! - [`server`]: state, routes, shutdown.

pub mod api;
pub mod assets;
pub mod ipxe;
pub mod server;

use std::net::IpAddr;

use serde::Deserialize;

pub use ipxe::{entry_script, render_script, try_render_script};
pub use server::{HttpState, MacLookup, router, serve};

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
    /// Bearer token required by mutating API endpoints (`POST /api/events`). Phone-home does
    /// not need it: a booted test OS has no way to know it.
    pub api_token: Option<String>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            enabled: true,
            port: 8080,
            bind: None,
            api_token: None,
        }
    }
}
