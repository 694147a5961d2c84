//! Firmware quirk profiles with real firmware, both sides: with the profile on the machine's
//! port, a server setup that does not compensate fails at the stage the profile's source
//! describes, and pxed's defaults boot through. The default suite runs four profiles (two VMs
//! at a time): the three most common DHCP ones and `blksize-over-mtu`, the one TFTP case where
//! pxed's own defaults are what makes the boot work; `scripts/test-quirks` runs every profile
//! (`cargo test ... -- --ignored`), and `pxelab quirks --check-all` does the same from the CLI.
//! Also: `pxelab replay` against pxed, and a boot through an impaired port.

use std::path::{Path, PathBuf};

use pxelab::labfile::LabFile;
use pxelab::oracle::Verdict;
use pxelab::quirks::{QuirkProfile, Side, check_lab};
use pxelab::report::RunReport;
use pxelab::run::{RunOptions, run_lab};

use crate::require_root;

fn labs_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("lab/labs")
}

fn with_our_pxed(lab: &mut LabFile) {
    lab.server.binary = Some(PathBuf::from(env!("CARGO_BIN_EXE_pxed")));
}

fn run(lab: &LabFile) -> RunReport {
    let report = run_lab(lab, &RunOptions::default()).unwrap();
    eprint!("{}", report.summary());
    report
}

/// Both sides of one profile's check, at the same time (two VMs).
fn both_sides(name: &str) {
    let profile = QuirkProfile::builtin(name).unwrap().unwrap();
    let check = profile.check.clone().unwrap();
    let want = check.fail_stage.expect("a both-sides check");
    let scratch = tempfile::tempdir().unwrap();
    let lab_for = |side| {
        let mut lab = check_lab(&profile, name, side, &labs_dir(), scratch.path()).unwrap();
        with_our_pxed(&mut lab);
        lab
    };
    let (fails, boots) = (lab_for(Side::Fails), lab_for(Side::Boots));
    let (fails, boots) = std::thread::scope(|s| {
        let f = s.spawn(|| run(&fails));
        let b = s.spawn(|| run(&boots));
        (f.join().unwrap(), b.join().unwrap())
    });
    for m in &fails.machines {
        match &m.verdict {
            Verdict::Failed { stage, reason, .. } => assert_eq!(
                *stage,
                Some(want),
                "{name}: the non-compensating server failed elsewhere ({reason}); {}",
                fails.run_dir.display()
            ),
            other => panic!("{name}: the non-compensating server must fail, got {other:?}"),
        }
    }
    assert!(
        boots.passed(),
        "{name}: pxed's defaults must boot through the quirk; {}",
        boots.summary()
    );
}

#[test]
fn quirk_header_only_needs_the_file_in_the_header() {
    require_root!();
    both_sides("header-only");
}

#[test]
fn quirk_options_only_needs_options_66_67() {
    require_root!();
    both_sides("options-only");
}

#[test]
fn quirk_requires_option_60_in_the_reply() {
    require_root!();
    both_sides("requires-option-60");
}

#[test]
fn quirk_blksize_over_mtu_needs_blocks_that_fit_the_servers_mtu() {
    require_root!();
    both_sides("blksize-over-mtu");
}

/// Every built-in profile (the long run: `scripts/test-quirks`).
#[test]
#[ignore = "about 25 minutes of VMs: scripts/test-quirks"]
fn every_quirk_profile_both_sides() {
    require_root!();
    let scratch = tempfile::tempdir().unwrap();
    let mut bad = Vec::new();
    for p in QuirkProfile::builtins().unwrap() {
        let sides =
            pxelab::quirks::run_check(&p, &labs_dir(), scratch.path(), &with_our_pxed).unwrap();
        for s in sides {
            eprintln!(
                "{:<5} {:<28} {:?} {:.1} s {}",
                if s.as_expected { "ok" } else { "FAIL" },
                p.name,
                s.side,
                s.duration_ms as f64 / 1000.0,
                s.summary
            );
            if !s.as_expected {
                bad.push(format!("{} {:?}: {}", p.name, s.side, s.summary));
            }
        }
    }
    assert!(bad.is_empty(), "{bad:#?}");
}

/// A BIOS machine boots through 10 % loss, 5 % duplication and 10 % reordering on its port.
#[test]
#[ignore = "one more VM boot: scripts/test-quirks"]
fn bios_boots_through_loss_duplication_and_reordering() {
    require_root!();
    let mut lab = LabFile::load(&labs_dir().join("pxed-bios.toml")).unwrap();
    with_our_pxed(&mut lab);
    lab.lab.name = "impaired-bios".into();
    lab.machines[0].impair =
        Some(toml::from_str("loss = 0.1\nduplicate = 0.05\nreorder = 0.1\nseed = 7").unwrap());
    let report = run(&lab);
    assert!(report.passed(), "{}", report.summary());
}

/// `pxelab replay`: a real firmware capture (OVMF's EDK2 PXE against QEMU's slirp DHCP and
/// TFTP, with its tsize probe) replayed against pxed makes a "field capture" of pxed's own
/// answers; replaying that against the same pxed shows no difference, against pxed without
/// option 60 exactly that difference.
#[test]
fn replay_shows_where_pxed_differs_from_the_capture() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    let fixture =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/dhcp/edk2-pxe-tftp.pcap");
    let frames = pxelab::replay::read_capture(&std::fs::read(fixture).unwrap()).unwrap();
    let full = labs_dir().join("pxed-full.pxed.toml");
    let opts = |config: &Path, name: &str| pxelab::replay::ReplayOptions {
        pxed: PathBuf::from(env!("CARGO_BIN_EXE_pxed")),
        config: config.to_path_buf(),
        run_dir: dir.path().join(name),
    };
    let first = pxelab::replay::replay(&frames, &opts(&full, "first")).unwrap();
    // slirp sends no PXE options: pxed's option 60 is among the differences.
    assert!(first.steps.iter().any(|s| {
        s.differences
            .iter()
            .any(|d| d.contains("option 60: only from pxed"))
    }));
    // The TFTP read requests were replayed too: EDK2 asks windowsize 4, which slirp ignores
    // and pxed grants (RFC 7440).
    let tftp: Vec<_> = first
        .steps
        .iter()
        .filter(|s| s.client.starts_with("RRQ"))
        .collect();
    assert_eq!(tftp.len(), 3, "{}", first.render());
    assert!(
        tftp.iter()
            .all(|s| s.pxed.as_deref().is_some_and(|p| p.starts_with("OACK"))),
        "{}",
        first.render()
    );
    assert!(
        tftp[0]
            .differences
            .iter()
            .any(|d| d == "option windowsize: only from pxed (4)"),
        "{}",
        first.render()
    );

    let field =
        pxelab::replay::read_capture(&std::fs::read(dir.path().join("first/lab.pcap")).unwrap())
            .unwrap();
    let same = pxelab::replay::replay(&field, &opts(&full, "same")).unwrap();
    assert!(
        same.steps.iter().filter(|s| s.pxed.is_some()).count() >= 4,
        "{}",
        same.render()
    );
    assert_eq!(same.difference_count(), 0, "{}", same.render());

    let no60 = dir.path().join("no60.pxed.toml");
    let mut table: toml::Table = toml::from_str(&std::fs::read_to_string(&full).unwrap()).unwrap();
    pxelab::quirks::merge_toml(
        &mut table,
        &toml::from_str("dhcp = { pxe_vendor_option = false }").unwrap(),
    );
    std::fs::write(&no60, toml::to_string(&table).unwrap()).unwrap();
    let other = pxelab::replay::replay(&field, &opts(&no60, "no60")).unwrap();
    let diffs: Vec<&String> = other.steps.iter().flat_map(|s| &s.differences).collect();
    assert!(!diffs.is_empty(), "{}", other.render());
    assert!(
        diffs
            .iter()
            .all(|d| d.starts_with("option 60: in the capture")),
        "{diffs:#?}"
    );
}
