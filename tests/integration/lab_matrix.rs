//! The firmware matrix's representative subset (`pxelab matrix --ci`), booted through the pxed
//! binary this test run built, two machines at a time. Chosen to cover what the lab_boot tests
//! do not, one boot each:
//! - `bios-rtl8139`: a non-Intel NIC under SeaBIOS (its own iPXE ROM and Linux driver);
//! - `uefi-e1000-ipxe`: OVMF running the iPXE EFI driver from the NIC's option ROM;
//! - `uefi-virtio-http`: UEFI HTTP Boot, so pxed's `HTTPClient` answer is taken by EDK2;
//! - `uefi-secboot-shim`: Secure Boot enforced, Debian's signed shim -> GRUB -> kernel.
//!
//! The other NICs and firmware run with `pxelab matrix` / `pxelab matrix --all`. A second
//! test boots machines without any NIC ROM from `pxed media` images.

use std::path::{Path, PathBuf};

use pxed::stage::BootStage;
use pxelab::labfile::LabFile;
use pxelab::machine::Rom;
use pxelab::matrix::{MatrixOptions, RowResult, run_matrix};
use pxelab::run::{RunOptions, run_lab};

use crate::require_root;

#[test]
fn representative_matrix_boots_to_phone_home() {
    require_root!();
    let report = run_matrix(&MatrixOptions {
        ci: true,
        parallel: 2,
        pxed: Some(PathBuf::from(env!("CARGO_BIN_EXE_pxed"))),
        progress: true,
        ..Default::default()
    })
    .unwrap();
    let table = report.table();
    eprint!("{table}");
    let names: Vec<_> = report.rows.iter().map(|r| r.entry.name).collect();
    assert_eq!(
        names,
        [
            "bios-rtl8139",
            "uefi-e1000-ipxe",
            "uefi-virtio-http",
            "uefi-secboot-shim"
        ]
    );
    for r in &report.rows {
        // Skipped (a package missing) is a failure here: scripts/setup installs them all.
        assert_eq!(
            r.result,
            RowResult::Passed,
            "{}: {:?}; artifacts in {}\n{table}",
            r.entry.name,
            r.reason,
            report.run_dir.display()
        );
    }
    let row = |name: &str| report.row(name).unwrap();

    // iPXE from the option ROM (BIOS and EFI): no TFTP at all, iPXE's own DHCP.
    for name in ["bios-rtl8139", "uefi-e1000-ipxe"] {
        let seen = &row(name).seen;
        assert!(!seen.contains_key(&BootStage::TftpComplete), "{name}");
        assert!(seen.contains_key(&BootStage::IpxeDhcp), "{name}");
    }

    // HTTP Boot: EDK2 fetched snponly.efi over HTTP (http.asset) before iPXE's DHCP, and
    // nothing went over TFTP.
    let http = &row("uefi-virtio-http").seen;
    assert!(!http.contains_key(&BootStage::TftpComplete));
    assert!(http[&BootStage::HttpAsset] < http[&BootStage::IpxeDhcp]);
    let events = std::fs::read_to_string(
        row("uefi-virtio-http")
            .run_dir
            .as_ref()
            .unwrap()
            .join("events.jsonl"),
    )
    .unwrap();
    assert!(
        events.contains("HTTPClient"),
        "pxed saw the HTTPClient vendor class"
    );

    // Secure Boot: shim came by TFTP, the kernel said Secure Boot is on (the row's console
    // check), and no iPXE ran in between.
    let sb = &row("uefi-secboot-shim").seen;
    assert!(sb.contains_key(&BootStage::TftpComplete));
    assert!(!sb.contains_key(&BootStage::IpxeDhcp));
    let console = std::fs::read(
        row("uefi-secboot-shim")
            .run_dir
            .as_ref()
            .unwrap()
            .join("uefi-secboot-shim.console.log"),
    )
    .unwrap();
    assert!(String::from_utf8_lossy(&console).contains("Secure boot enabled"));
}

/// `pxed media`: two machines whose NIC has no PXE ROM at all (`rom = "none"`; OVMF has no
/// e1000 driver either) boot the images `pxed media` writes for this lab's pxed, then netboot
/// through it to phone-home. SeaBIOS boots the USB stick image, OVMF the ISO's EFI image.
#[test]
fn media_boot_machines_whose_nic_has_no_pxe() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    let mut lab =
        LabFile::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("lab/labs/matrix-media.toml"))
            .unwrap();
    // The lab's subnet is fixed in the file, so the media can name the server before it runs.
    assert_eq!(lab.lab.subnet.as_deref(), Some("10.77.1.0/24"));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pxed"))
        .args(["media", "--server", "http://10.77.1.1:8080", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pxed media failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let img = dir.path().join("pxed-boot.img");
    let iso = dir.path().join("pxed-boot.iso");
    assert!(img.exists() && iso.exists());
    lab.server.binary = Some(PathBuf::from(env!("CARGO_BIN_EXE_pxed")));
    for m in &mut lab.machines {
        assert_eq!(m.rom, Rom::None, "{}: the NIC must have no ROM", m.name);
        m.media = Some(if m.name == "bios-usb" {
            img.clone()
        } else {
            iso.clone()
        });
    }
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
    for m in &report.machines {
        // iPXE from the media did the whole network boot: no TFTP, no firmware PXE.
        assert!(!m.seen.contains_key(&BootStage::TftpRequest), "{}", m.name);
    }
    // The BIOS stick ran the media's own script (handed to iPXE as its initrd).
    let console = std::fs::read(report.run_dir.join("bios-usb.console.log")).unwrap();
    let console = String::from_utf8_lossy(&console);
    assert!(console.contains("SYSLINUX"));
    assert!(console.contains("pxed media: booting through http://10.77.1.1:8080"));
    let console = std::fs::read(report.run_dir.join("uefi-cd.console.log")).unwrap();
    assert!(String::from_utf8_lossy(&console).contains("DVD-ROM"));
}
