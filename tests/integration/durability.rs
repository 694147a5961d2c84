//! Power-cut durability, short form: pxed in the server VM with its leases on a virtio disk,
//! perfdhcp load from the lab switch, the QEMU process SIGKILLed under that load and the VM
//! booted again from the same disk. The long form (twenty power cuts) is
//! `scripts/test-durability`; its result is in SECURITY.md.

use std::path::PathBuf;

use pxelab::durability::{DurabilityOptions, run_durability};

use crate::require_root;

/// One power cut under load (two VM boots: 75-150 s under TCG): after the reboot, every lease
/// whose ACK left the VM is on its disk with the acknowledged address, and no address belongs
/// to two MACs.
#[test]
fn acknowledged_leases_survive_the_vm_being_killed_under_load() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    let opts = DurabilityOptions::new(
        1,
        dir.path().to_path_buf(),
        PathBuf::from(env!("CARGO_BIN_EXE_pxed")),
    );
    let report = run_durability(&opts).unwrap();
    eprint!("{}", report.summary());
    assert_eq!(report.kills, 1);
    // The kill came under load, after new clients were acknowledged: the check had
    // something to find.
    assert!(
        report.cycles[0].acks >= report.cycles[0].kill_after_new_clients,
        "{:?}",
        report.cycles
    );
    assert!(report.leases_acked > 0 && report.cycles[1].stored > 0);
    assert!(
        report.passed(),
        "{}\nartifacts: {}",
        report.summary(),
        dir.keep().display()
    );
}
