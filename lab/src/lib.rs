//! pxelab: the lab harness. A private virtual LAN (a userspace switch plus a TAP uplink into a
//! network namespace where the boot server runs), QEMU machines on it, a generated test OS,
//! and an oracle that proves each boot stage from server events, serial consoles and packets.
//!
//! # Layout
//! - [`netns`], [`switch`], [`pcap`]: the virtual LAN.
//! - [`machine`]: firmware/NIC/ROM catalogue and running QEMUs.
//! - [`payload`], [`cpio`]: the Debian kernel and our initramfs; [`arm64`]: the same for arm64.
//! - [`server`]: the boot server process (dnsmasq or pxed) and the phone-home receiver.
//! - [`wire`], [`oracle`], [`report`]: evidence, verdicts, reports.
//! - [`labfile`], [`run`]: lab definitions and running them; [`matrix`]: the firmware x NIC
//!   matrix; [`doctor`], [`cleanup`]: CLI helpers.

pub mod arm64;
pub mod cleanup;
pub mod cpio;
pub mod doctor;
pub mod labfile;
pub mod machine;
pub mod matrix;
pub mod netns;
pub mod oracle;
pub mod payload;
pub mod pcap;
pub mod report;
pub mod run;
pub mod server;
pub mod switch;
pub mod wire;
