//! pxed's integration tests: one binary, a module per area. Tests that need root (network
//! namespaces, privileged ports) skip with a message when not root; CI runs them as root.

mod support;

mod cli;
mod dhcp_full;
mod dhcp_proxy;
mod durability;
mod harden;
mod harden_lab;
mod http;
mod lab_boot;
mod lab_matrix;
mod lab_quirks;
mod one_shot;
mod tftp;
mod tftp_netboot;
mod vm_images;
