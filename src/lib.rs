//! pxed: a PXE boot server in one binary (DHCPv4, proxyDHCP, TFTP, HTTP).
//!
//! # Layout
//!
//! Dependencies point one way: wire -> engine -> policy -> server.
//!
//! - [`mac`], [`stage`]: the basic vocabulary. [`stage::BootStage`] is the single list of boot
//!   stages shared by events, API, dashboard, metrics and the lab.
//! - [`events`]: the [`events::BootEvent`] stream every component publishes to.
//! - [`timeline`]: a boot's milestones cut into named spans (waits, transfers, kernel,
//!   userspace), shared by the API, the dashboard and the lab's `pxelab run` report.
//! - [`config`]: the TOML file, rejecting unknown keys, checked with line and column.
//! - [`policy`]: profiles, groups and machines -> a [`policy::BootPlan`]. A pure function.
//! - [`dhcp`]: hardened wire layer and PXE option codecs, the sans-IO engine (proxy and full),
//!   the socket driver.
//! - [`tftp`]: sans-IO TFTP engine and its server.
//! - [`http`]: boot assets, iPXE scripts, phone-home, API, dashboard, metrics.
//! - [`ipv6_ra`]: ends iPXE's IPv6 router wait on IPv4-only networks (full mode).
//! - [`leases`]: durable lease store (ACK only after the lease is on disk).
//! - [`net`]: OS networking (interface binding, interface addresses, ARP entries).
//! - [`server`]: wires the pieces together on one tokio runtime.
//! - [`media`]: `pxed media`, USB/ISO images that start iPXE when the NIC cannot PXE boot.

pub mod config;
pub mod dhcp;
pub mod events;
pub mod http;
pub mod ipv6_ra;
pub mod leases;
pub mod mac;
pub mod media;
pub mod net;
pub mod policy;
pub mod privs;
pub mod server;
pub mod stage;
pub mod tftp;
pub mod timeline;
