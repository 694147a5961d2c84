//! Real network boots: QEMU virtual machines with real firmware boot the lab's test OS through
//! the pxed binary built by this test run, on pxelab's virtual LAN. The oracle proves every
//! stage from three kinds of evidence (pxed's events, the serial console, the packet capture).
//! The full firmware x NIC matrix is `pxelab matrix`; these are the representative boots.

use std::path::{Path, PathBuf};

use pxed::stage::BootStage;
use pxelab::labfile::LabFile;
use pxelab::oracle::Verdict;
use pxelab::report::RunReport;
use pxelab::run::{RunOptions, run_lab};

use crate::require_root;

fn labs_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("lab/labs")
}

/// Load a lab file and point it at the pxed binary this test run built.
fn lab(name: &str) -> LabFile {
    let mut lab = LabFile::load(&labs_dir().join(name)).unwrap();
    lab.server.binary = Some(PathBuf::from(env!("CARGO_BIN_EXE_pxed")));
    lab
}

fn run(lab: &LabFile) -> RunReport {
    let report = run_lab(
        lab,
        &RunOptions {
            progress: true,
            run_dir: None,
        },
    )
    .unwrap();
    eprint!("{}", report.summary());
    report
}

fn assert_passed(report: &RunReport) {
    assert!(
        report.passed(),
        "lab {} failed; artifacts in {}:\n{}",
        report.lab,
        report.run_dir.display(),
        report.summary()
    );
}

/// Where a stage was seen first, in ms after power-on.
fn at(report: &RunReport, machine: usize, stage: BootStage) -> u64 {
    report.machines[machine]
        .seen
        .get(&stage)
        .unwrap_or_else(|| panic!("{stage} never seen on machine {machine}"))
        .at_ms
}

#[test]
fn bios_ipxe_rom_boots_over_http_through_pxed_full_mode() {
    require_root!();
    let report = run(&lab("pxed-bios.toml"));
    assert_passed(&report);
    // The chain went DHCP -> script -> kernel -> initrd -> kernel start -> userspace -> home.
    let order = [
        BootStage::DhcpAck,
        BootStage::HttpScript,
        BootStage::HttpKernel,
        BootStage::HttpInitrd,
        BootStage::OsKernel,
        BootStage::OsUserspace,
        BootStage::OsPhoneHome,
    ];
    for pair in order.windows(2) {
        assert!(
            at(&report, 0, pair[0]) <= at(&report, 0, pair[1]),
            "{} before {}",
            pair[0],
            pair[1]
        );
    }
    // iPXE's ROM is iPXE from the first packet: nothing went over TFTP.
    assert!(
        !report.machines[0]
            .seen
            .contains_key(&BootStage::TftpComplete)
    );
}

#[test]
fn uefi_native_pxe_chains_snponly_then_boots_over_http() {
    require_root!();
    let report = run(&lab("pxed-uefi.toml"));
    assert_passed(&report);
    // EDK2 fetched snponly.efi by TFTP (with its tsize probe), then iPXE took over.
    let seen = &report.machines[0].seen;
    assert!(
        seen.contains_key(&BootStage::TftpProbe),
        "EDK2's tsize probe was reported"
    );
    assert!(at(&report, 0, BootStage::TftpComplete) < at(&report, 0, BootStage::IpxeDhcp));
    assert!(at(&report, 0, BootStage::IpxeDhcp) < at(&report, 0, BootStage::HttpScript));
}

#[test]
fn proxy_mode_beside_dnsmasq_boots_bios_and_uefi() {
    require_root!();
    let report = run(&lab("pxed-proxy.toml"));
    assert_passed(&report);
    // EDK2 took the BINL proxy offer to port 4011 (reply table row "UEFI PXE, proxy");
    // iPXE took the boot file from the proxy offer itself.
    let uefi = report
        .machines
        .iter()
        .position(|m| m.name == "uefi-virtio")
        .unwrap();
    assert!(
        report.machines[uefi]
            .seen
            .contains_key(&BootStage::Proxy4011)
    );
    // pxed never gave an address: every lease is dnsmasq's, and pxed's own events hold no
    // offer or ack (the oracle's dhcp.ack comes from dnsmasq's packets on the wire).
    let leases = std::fs::read_to_string(report.run_dir.join("address-server.leases")).unwrap();
    let events = std::fs::read_to_string(report.run_dir.join("events.jsonl")).unwrap();
    for m in &report.machines {
        assert!(
            leases.contains(&m.mac),
            "{} got no lease from dnsmasq:\n{leases}",
            m.name
        );
    }
    for stage in ["\"dhcp.offer\"", "\"dhcp.ack\""] {
        assert!(
            !events.contains(stage),
            "pxed sent {stage} in proxy mode:\n{events}"
        );
    }
}

#[test]
fn missing_boot_file_fails_at_tftp_with_the_error_as_evidence() {
    require_root!();
    // A config whose UEFI boot program does not exist in the root.
    let dir = tempfile::tempdir().unwrap();
    let template = dir.path().join("broken.pxed.toml");
    let mut text = std::fs::read_to_string(labs_dir().join("pxed-full.pxed.toml")).unwrap();
    text.push_str("\n[ipxe]\nefi_x64 = \"missing-snponly.efi\"\n");
    std::fs::write(&template, text).unwrap();
    let mut lab = lab("pxed-uefi.toml");
    lab.lab.name = "pxed-missing-nbp".into();
    lab.server.config = Some(template);
    let report = run(&lab);
    assert!(!report.passed(), "a missing boot file must fail the run");
    let m = &report.machines[0];
    match &m.verdict {
        Verdict::Failed { stage, reason, .. } => {
            // Whichever evidence comes first names the TFTP stage: pxed's `tftp.error`, the
            // ERROR packet on the wire, or EDK2's PXE-E23 on the console. None is a deadline.
            assert_eq!(stage.map(|s| s.family()), Some("tftp"), "{reason}");
            assert!(
                !reason.contains("not reached within"),
                "failed on a deadline: {reason}"
            );
        }
        other => panic!("expected a failure, got {other:?}"),
    }
    let evidence = m.failure.as_ref().expect("failure evidence");
    let in_events = evidence
        .events
        .iter()
        .any(|e| e.stage == BootStage::TftpError && e.detail.contains("missing-snponly.efi"));
    let on_wire = evidence
        .packets
        .iter()
        .any(|p| p.contains("TFTP ERROR") && p.contains("missing-snponly.efi"));
    assert!(
        in_events || on_wire,
        "the report shows the TFTP error: {:?} {:?}",
        evidence.events,
        evidence.packets
    );
    assert!(
        report.run_dir.join("lab.pcap").exists() && report.run_dir.join("report.json").exists()
    );
}
