//! Real boots: QEMU (TCG) + SeaBIOS + e1000 with QEMU's iPXE ROM, on the lab switch, served by
//! dnsmasq in the lab's namespace. Needs root (namespaces, TAP); skipped with a message
//! otherwise.

use std::path::{Path, PathBuf};
use std::process::Command;

use pxed::stage::BootStage;
use pxelab::labfile::LabFile;
use pxelab::oracle::Verdict;
use pxelab::run::{RunOptions, run_lab};

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn lab(name: &str) -> LabFile {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("labs")
        .join(name);
    LabFile::load(&path).unwrap()
}

fn tshark_count(pcap: &Path, filter: &str) -> Option<usize> {
    let out = Command::new("tshark")
        .arg("-r")
        .arg(pcap)
        .args(["-Y", filter])
        .output()
        .ok()?;
    assert!(
        out.status.success(),
        "tshark cannot read {}: {}",
        pcap.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Some(String::from_utf8_lossy(&out.stdout).lines().count())
}

#[test]
fn seabios_e1000_boots_from_dnsmasq_through_every_stage() {
    if !is_root() {
        eprintln!("SKIPPED: needs root (network namespaces and TAP devices)");
        return;
    }
    let lab = lab("seabios-e1000-dnsmasq.toml");
    let report = run_lab(
        &lab,
        &RunOptions {
            progress: true,
            run_dir: None,
        },
    )
    .unwrap();
    eprint!("{}", report.summary());
    assert!(report.passed(), "{}", report.summary());
    let m = &report.machines[0];
    let at = |s: BootStage| m.seen.get(&s).map(|h| h.at_ms).unwrap();
    let order = [
        BootStage::DhcpAck,
        BootStage::TftpComplete,
        BootStage::OsKernel,
        BootStage::OsUserspace,
        BootStage::OsPhoneHome,
    ];
    for pair in order.windows(2) {
        assert!(at(pair[0]) <= at(pair[1]), "{} after {}", pair[0], pair[1]);
    }
    // Phone-home was proven by the server side (the receiver's event) and the console.
    let phone = &m.seen[&BootStage::OsPhoneHome].sources;
    assert_eq!(phone.len(), 2, "{phone:?}");
    // The wire saw iPXE's DHCP (option 175) and the second DHCP of the booted OS.
    assert!(m.seen.contains_key(&BootStage::IpxeDhcp));
    assert!(
        m.packets.dhcp >= 4 && m.packets.tftp > 100,
        "{:?}",
        m.packets
    );

    let dir: PathBuf = report.run_dir.clone();
    for f in [
        "report.json",
        "junit.xml",
        "lab.pcap",
        "uplink.pcap",
        "bios-e1000.pcap",
        "bios-e1000.console.log",
        "bios-e1000.qemu-cmdline.txt",
        "events.jsonl",
    ] {
        assert!(dir.join(f).exists(), "{f} missing in {}", dir.display());
    }
    let junit = std::fs::read_to_string(dir.join("junit.xml")).unwrap();
    assert!(junit.contains("failures=\"0\""), "{junit}");
    // Wireshark's reader opens our pcaps and finds the boot in them.
    match tshark_count(&dir.join("lab.pcap"), "tftp.opcode == 1") {
        Some(rrqs) => {
            assert!(
                rrqs >= 3,
                "expected boot.ipxe, vmlinuz and initrd RRQs, saw {rrqs}"
            );
            assert!(tshark_count(&dir.join("bios-e1000.pcap"), "dhcp").unwrap() >= 4);
        }
        None => eprintln!("tshark not installed: pcap check skipped"),
    }
}

#[test]
fn missing_boot_file_fails_fast_at_tftp_with_evidence() {
    if !is_root() {
        eprintln!("SKIPPED: needs root (network namespaces and TAP devices)");
        return;
    }
    let mut lab = lab("seabios-e1000-dnsmasq.toml");
    lab.lab.name = "missing-boot-file".into();
    lab.server.boot_file = Some("missing.ipxe".into());
    let report = run_lab(
        &lab,
        &RunOptions {
            progress: true,
            run_dir: None,
        },
    )
    .unwrap();
    eprint!("{}", report.summary());
    assert!(!report.passed());
    let m = &report.machines[0];
    let Verdict::Failed {
        stage,
        reason,
        at_ms,
    } = &m.verdict
    else {
        panic!("expected a failure, got {:?}", m.verdict);
    };
    assert_eq!(*stage, Some(BootStage::TftpError), "{reason}");
    // Fast: at the error, long before the tftp.complete deadline.
    let tftp_deadline = m
        .stages
        .iter()
        .find(|s| s.stage == BootStage::TftpComplete)
        .unwrap()
        .within_ms;
    assert!(
        *at_ms < tftp_deadline / 2,
        "failed at {at_ms} ms, deadline {tftp_deadline} ms"
    );
    assert!(
        report.duration_ms < tftp_deadline,
        "run took {} ms",
        report.duration_ms
    );
    let f = m.failure.as_ref().unwrap();
    assert!(
        f.packets.iter().any(|p| p.contains("RRQ missing.ipxe")),
        "{:?}",
        f.packets
    );
    assert!(
        f.packets
            .iter()
            .any(|p| p.contains("TFTP ERROR from server")),
        "{:?}",
        f.packets
    );
    assert!(!f.console_tail.is_empty());
    assert!(m.seen.contains_key(&BootStage::DhcpAck));
    assert!(!m.seen.contains_key(&BootStage::OsKernel));
    let junit = std::fs::read_to_string(report.run_dir.join("junit.xml")).unwrap();
    assert!(junit.contains("<failure message=\"tftp.error"), "{junit}");
}
