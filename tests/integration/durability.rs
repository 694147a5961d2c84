//! Power-cut durability, short form: pxed in the server VM with its leases on a virtio disk,
//! perfdhcp load from the lab switch, the QEMU process SIGKILLed under that load and the VM
//! booted again from the same disk. The long form (twenty power cuts) is
//! `scripts/test-durability`; its result is in SECURITY.md.

use std::path::PathBuf;

use pxelab::durability::{DurabilityOptions, run_durability};

use crate::require_root;

/// Two power cuts under load: after each reboot, every lease whose ACK left the VM is on its
/// disk with the acknowledged address, and no address belongs to two MACs.
#[test]
fn acknowledged_leases_survive_the_vm_being_killed_under_load() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    let opts = DurabilityOptions::new(
        2,
        dir.path().to_path_buf(),
        PathBuf::from(env!("CARGO_BIN_EXE_pxed")),
    );
    let report = run_durability(&opts).unwrap();
    eprint!("{}", report.summary());
    assert_eq!(report.kills, 2);
    // The kills came under load, after ACKs: the check had something to find.
    assert!(
        report.cycles.iter().take(2).all(|c| c.acks >= opts.min_acks_before_kill),
        "{:?}",
        report.cycles
    );
    // Leases acknowledged before a power cut are on the disk at the next boot (the last
    // boot's listing holds at least those of the first two cycles' new clients).
    assert!(report.cycles[2].stored >= report.cycles[1].stored);
    assert!(
        report.passed(),
        "{}\nartifacts: {}",
        report.summary(),
        dir.keep().display()
    );
}
