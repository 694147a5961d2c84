//! Fault tests in the lab: real firmware booting through pxed over a damaged link or across a
//! pxed crash. Slow under TCG: one runs in the default suite, the others are `#[ignore]`d and
//! run by `scripts/test-faults`; results are recorded in SECURITY.md.

use std::path::{Path, PathBuf};
use std::time::Duration;

use pxed::stage::BootStage;
use pxelab::impair::ImpairConfig;
use pxelab::labfile::{ExpectSection, LabFile};
use pxelab::run::{RunOptions, run_lab};

use crate::require_root;

fn lab(name: &str) -> LabFile {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("lab/labs")
        .join(name);
    let mut lab = LabFile::load(&path).unwrap();
    lab.server.binary = Some(PathBuf::from(env!("CARGO_BIN_EXE_pxed")));
    lab
}

/// SeaBIOS + iPXE boots to phone-home through pxed (full mode: DHCP, HTTP script, kernel,
/// initrd) while the client's switch port loses 10% of frames, duplicates 5% and reorders 5%,
/// both ways. Every deadline of the normal lab still holds, scaled for the retransmissions.
#[test]
#[ignore = "VM boot (~1-2 min under TCG); run by scripts/test-faults"]
fn bios_boot_reaches_phone_home_through_loss_duplication_and_reordering() {
    require_root!();
    let mut lab = lab("pxed-bios.toml");
    lab.lab.name = "pxed-bios-lossy".into();
    // Retransmission backoff (DHCP 4 s and more, TCP RTO from 1 s) stretches the boot.
    lab.lab.tcg_scale = Some(6.0);
    lab.machines[0].impair = Some(ImpairConfig {
        loss: 0.10,
        duplicate: 0.05,
        reorder: 0.05,
        seed: 9,
        ..Default::default()
    });
    let report = run_lab(
        &lab,
        &RunOptions {
            progress: true,
            run_dir: None,
        },
    )
    .unwrap();
    eprint!("{}", report.summary());
    assert!(
        report.passed(),
        "lossy boot failed; artifacts in {}:\n{}",
        report.run_dir.display(),
        report.summary()
    );
}

/// pxed is killed (SIGKILL) and restarted while iPXE downloads the kernel over HTTP: the
/// boot script retries the download once the new pxed listens, and the boot reaches
/// phone-home. In the default suite (~40 s): it guards the script's retry.
#[test]
fn bios_boot_survives_a_pxed_restart_during_the_kernel_download() {
    require_root!();
    let mut lab = lab("pxed-bios.toml");
    lab.lab.name = "pxed-bios-restart-http".into();
    lab.server.restart_at = Some(BootStage::HttpKernel);
    lab.lab.tcg_scale = Some(5.0);
    run_and_check(&lab);
}

/// pxed is killed and restarted while UEFI firmware (OVMF) fetches snponly.efi over TFTP.
/// EDK2 does not retry a TFTP transfer that breaks (PXE-E99): it moves on to its next boot
/// option, UEFI HTTP boot, which pxed also serves, so the machine still reaches phone-home,
/// only later (about 100 s under TCG). The test asks for exactly that: phone-home, not
/// `tftp.complete`.
#[test]
#[ignore = "VM boot (~2 min under TCG); run by scripts/test-faults"]
fn uefi_boot_survives_a_pxed_restart_during_the_tftp_transfer() {
    require_root!();
    let mut lab = lab("pxed-uefi.toml");
    lab.lab.name = "pxed-uefi-restart-tftp".into();
    lab.server.restart_at = Some(BootStage::TftpRequest);
    lab.lab.tcg_scale = Some(5.0);
    // The cut transfer is reported on the console (PXE-E99); what counts is whether the
    // firmware tries again and the boot still completes.
    lab.oracle.tolerate = vec!["console.pxe-error".into()];
    lab.expect = vec![ExpectSection {
        stage: BootStage::OsPhoneHome,
        within: Duration::from_secs(40),
    }];
    lab.machines[0].expect.clear();
    run_and_check(&lab);
}

fn run_and_check(lab: &LabFile) {
    let report = run_lab(
        lab,
        &RunOptions {
            progress: true,
            run_dir: None,
        },
    )
    .unwrap();
    eprint!("{}", report.summary());
    assert!(
        report.passed(),
        "{} failed; artifacts in {}:\n{}",
        lab.lab.name,
        report.run_dir.display(),
        report.summary()
    );
}
