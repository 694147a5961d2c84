//! pxelab: the lab harness. A private virtual LAN (a userspace switch plus a TAP uplink into a
//! network namespace where the boot server runs), QEMU machines on it, a generated test OS,
//! and an oracle that proves each boot stage from server events, serial consoles and packets.
//!
//! # Layout
//! - [`netns`], [`switch`], [`pcap`]: the virtual LAN.
//! - [`machine`]: firmware/NIC/ROM catalogue and running QEMUs.
//! - [`payload`], [`cpio`]: the Debian kernel and our initramfs; [`arm64`]: the same for arm64.
//! - [`server`]: the boot server process (dnsmasq or pxed) and the phone-home receiver.
//! - [`wire`], [`oracle`], [`report`], [`breakdown`]: evidence, verdicts, reports, and where
//!   the seconds of each boot went.
//! - [`impair`], [`quirks`]: link impairments and firmware quirk profiles on switch ports.
//! - [`replay`], [`bundle`]: replaying field captures against pxed; packing a lab into one file.
//! - [`labfile`], [`run`]: lab definitions and running them; [`matrix`]: the firmware x NIC
//!   matrix; [`demo`]: the built-in demo lab; [`doctor`], [`cleanup`]: CLI helpers.

pub mod arm64;
pub mod breakdown;
pub mod bundle;
pub mod cleanup;
pub mod cpio;
pub mod demo;
pub mod doctor;
pub mod durability;
pub mod export;
pub mod images;
pub mod impair;
pub mod import;
pub mod labfile;
pub mod machine;
pub mod matrix;
pub mod netns;
pub mod oracle;
pub mod ovf;
pub mod payload;
pub mod pcap;
pub mod quirks;
pub mod replay;
pub mod report;
pub mod run;
pub mod server;
pub mod switch;
pub mod vmdef;
pub mod vmserver;
pub mod wire;
