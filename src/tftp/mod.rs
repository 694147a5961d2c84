//! TFTP (RFC 1350, 2347, 2348, 2349, 7440): a sans-IO engine and its tokio server.
//!
//! - [`wire`]: packet parsing and encoding.
//! - [`engine`]: one read transfer as a pure state machine (virtual time in tests).
//! - [`fs`]: where files come from: [`fs::FileSource`], the confined [`fs::RootSource`] and the
//!   shared read cache.
//! - [`roots`]: per-profile TFTP roots chosen by the client's boot plan.
//! - [`virtual_files`]: pxelinux/GRUB configs and the iPXE entry script rendered from the boot
//!   policy for each client ([`virtual_files::PolicyFiles`]).
//! - [`server`]: the listener, limits, file opening, events. [`server::serve`] is the entry.
//! - `driver`: the event threads (one epoll loop per CPU) that run every transfer's data
//!   exchange: sockets, engine timers, windows sent with `burst`.

use std::path::PathBuf;

use serde::Deserialize;

mod burst;
pub mod client;
mod driver;
pub mod engine;
pub mod fs;
pub mod roots;
pub mod server;
pub mod virtual_files;
pub mod wire;

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
    /// Compatibility (firmware-quirks.md Q6): answer the tsize option (RFC 2349). EDK2 asks
    /// for the size first (an RRQ with tsize 0, then ERROR 8) and does not download a file
    /// whose size it did not get. Default on; off reproduces a server without tsize.
    pub tsize: bool,
    /// Largest windowsize granted (RFC 7440); tftp-hpa breaks above 64.
    pub windowsize_max: u16,
    /// Largest window in bytes (windowsize x blksize) granted: a window is sent in one burst and
    /// must fit the client's receive buffer ([`engine::WINDOW_BYTES_DEFAULT`]).
    pub window_bytes_max: u32,
    /// Match file names case-insensitively when the exact name does not exist (Windows-made
    /// trees asked for by firmware with different case).
    pub case_insensitive: bool,
    /// Directories (relative to the root) searched for a file requested at the root that is not
    /// there; shim asks for `grubx64.efi` at the root while it sits next to shim.
    pub fallback_dirs: Vec<PathBuf>,
    /// Transfers running at once, over all clients.
    pub max_transfers: usize,
    /// Transfers running at once from one client address.
    pub max_transfers_per_client: usize,
    /// Retransmission timeout in milliseconds when the client asks for none.
    pub timeout_ms: u64,
    /// Retransmissions of one packet before a transfer is abandoned.
    pub max_retries: u32,
    /// A transfer must finish within this many seconds.
    pub transfer_deadline_secs: u64,
    /// Bytes of whole files kept in memory for boot storms.
    pub cache_bytes: u64,
    /// Files larger than this are read from disk per window instead of cached.
    pub cache_file_max: u64,
}

impl Default for TftpConfig {
    fn default() -> Self {
        TftpConfig {
            enabled: true,
            port: 69,
            blksize_max: None,
            tsize: true,
            windowsize_max: 64,
            window_bytes_max: engine::WINDOW_BYTES_DEFAULT,
            case_insensitive: false,
            fallback_dirs: Vec::new(),
            max_transfers: 256,
            max_transfers_per_client: 8,
            timeout_ms: 1000,
            max_retries: 5,
            transfer_deadline_secs: 600,
            cache_bytes: 256 << 20,
            cache_file_max: 32 << 20,
        }
    }
}
