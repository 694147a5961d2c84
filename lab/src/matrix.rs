//! The firmware x NIC matrix: a catalogue of machines (firmware, NIC model, option ROM, boot
//! path), each booted through pxed to phone-home, and a table of machines x stages with the
//! time each stage was first seen.
//!
//! A matrix run groups the selected entries by the pxed configuration they need and boots
//! them in labs of `parallel` machines at a time (each a TCG QEMU: two at a time suit a
//! 2-core host). Entries whose files are missing (a firmware or a boot loader package not
//! installed) are reported as skipped with the package to install, never silently dropped.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime};

use anyhow::{Context, Result, bail};
use pxed::stage::BootStage;
use serde::Serialize;

use crate::labfile::LabFile;
use crate::machine::{Firmware, NetBoot};
use crate::oracle::Verdict;
use crate::run::{RunOptions, run_lab, runs_root};

/// Most machines one lab of the matrix boots at once: each is a TCG QEMU using a core.
pub const MAX_PARALLEL: usize = 8;

/// Which runs include an entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    /// The representative subset the default `cargo test` boots.
    Ci,
    /// `pxelab matrix` with no arguments.
    Standard,
    /// Only with `--all` (slow, or needs extra packages).
    Slow,
}

/// How the machine reaches iPXE (or the kernel): decides which stages it must reach.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BootPath {
    /// iPXE is the NIC's ROM (BIOS or EFI): DHCP as iPXE, then the script over HTTP.
    IpxeRom,
    /// [`BootPath::IpxeRom`] on a NIC whose iPXE driver stalls on TCP bursts: pxed's script
    /// fetches the kernel and initrd by lock-step TFTP (`pxed::http::ipxe::LOCKSTEP_NICS`).
    IpxeRomTftpKernel,
    /// The firmware's own PXE loads snponly.efi/undionly.kpxe by TFTP, which chains.
    FirmwarePxe,
    /// UEFI HTTP Boot: the firmware fetches snponly.efi by HTTP from the URL pxed offers.
    HttpBoot,
    /// The firmware's PXE loads a boot loader by TFTP (signed shim then GRUB, or GRUB alone),
    /// which loads the kernel and initrd by TFTP: no iPXE anywhere.
    Loader,
    /// [`BootPath::Loader`] on an emulated arm64 CPU: several times slower under TCG.
    Arm64,
}

impl BootPath {
    /// Stages and deadlines (seconds after power-on under KVM; scaled under TCG).
    fn expect(self) -> &'static [(BootStage, u64)] {
        use BootStage::*;
        match self {
            BootPath::IpxeRom => &[
                (DhcpAck, 20),
                (HttpScript, 30),
                (HttpKernel, 30),
                (OsKernel, 60),
                (OsUserspace, 70),
                (OsPhoneHome, 80),
            ],
            BootPath::IpxeRomTftpKernel => &[
                (DhcpAck, 20),
                (HttpScript, 30),
                (TftpComplete, 50),
                (OsKernel, 70),
                (OsUserspace, 80),
                (OsPhoneHome, 90),
            ],
            BootPath::FirmwarePxe => &[
                (DhcpAck, 30),
                (TftpComplete, 40),
                (IpxeDhcp, 50),
                (HttpScript, 50),
                (OsKernel, 80),
                (OsUserspace, 90),
                (OsPhoneHome, 100),
            ],
            BootPath::HttpBoot => &[
                (DhcpAck, 30),
                (HttpAsset, 40),
                (IpxeDhcp, 50),
                (HttpScript, 50),
                (OsKernel, 80),
                (OsUserspace, 90),
                (OsPhoneHome, 100),
            ],
            BootPath::Arm64 => &[
                (DhcpAck, 60),
                (TftpComplete, 80),
                (OsKernel, 150),
                (OsUserspace, 200),
                (OsPhoneHome, 220),
            ],
            BootPath::Loader => &[
                (DhcpAck, 30),
                (TftpComplete, 40),
                (OsKernel, 100),
                (OsUserspace, 110),
                (OsPhoneHome, 120),
            ],
        }
    }
}

/// The option ROM of an entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryRom {
    /// QEMU's default for the model (ipxe-qemu's combined BIOS + EFI iPXE ROMs).
    Default,
    /// No ROM: the firmware's own network stack.
    None,
}

/// The pxed configuration an entry needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Flavor {
    /// `pxed-full.pxed.toml`: full DHCP, iPXE binaries, the test OS by iPXE script.
    Full,
    /// `matrix-secboot.pxed.toml`: the signed chain shim -> GRUB -> kernel.
    SecureBoot,
    /// `matrix-ia32.pxed.toml`: arch 6 gets GRUB's i386-efi network image.
    Ia32Grub,
    /// `matrix-arm64.pxed.toml`: arch 11 gets GRUB's arm64-efi image and the arm64 test OS.
    Arm64Grub,
}

/// Debian's signed shim (Microsoft-signed, trusts Debian's key).
pub const SHIM_SIGNED: &str = "/usr/lib/shim/shimx64.efi.signed";
/// Debian's signed GRUB network image (signed with Debian's key).
pub const GRUB_NET_SIGNED: &str = "/usr/lib/grub/x86_64-efi-signed/grubnetx64.efi.signed";

impl Flavor {
    fn template(self) -> &'static str {
        match self {
            Flavor::Full => include_str!("../labs/pxed-full.pxed.toml"),
            Flavor::SecureBoot => include_str!("../labs/matrix-secboot.pxed.toml"),
            Flavor::Ia32Grub => include_str!("../labs/matrix-ia32.pxed.toml"),
            Flavor::Arm64Grub => include_str!("../labs/matrix-arm64.pxed.toml"),
        }
    }

    /// Failures the flavour's labs tolerate: shim asks for optional files (SBAT revocations
    /// `revocations_sku.efi`, `revocations_ssp.efi`) that a server normally lacks.
    fn tolerate(self) -> &'static [&'static str] {
        match self {
            Flavor::Full => &[],
            // GRUB also probes for files it may lack (command.lst, grub.cfg-<mac>, ...).
            Flavor::SecureBoot | Flavor::Ia32Grub | Flavor::Arm64Grub => &["tftp.error"],
        }
    }

    /// Files the flavour adds to the server's root: (name in the root, source path).
    fn files(self, dir: &Path) -> Result<Vec<(String, PathBuf)>> {
        Ok(match self {
            Flavor::Full => Vec::new(),
            Flavor::SecureBoot => {
                let cfg = dir.join("grub.cfg");
                std::fs::write(&cfg, GRUB_CFG)?;
                vec![
                    ("shimx64.efi".into(), PathBuf::from(SHIM_SIGNED)),
                    ("grubx64.efi".into(), PathBuf::from(GRUB_NET_SIGNED)),
                    ("grub/grub.cfg".into(), cfg.clone()),
                    ("grub.cfg".into(), cfg),
                ]
            }
            Flavor::Ia32Grub => {
                let cfg = dir.join("grub.cfg");
                std::fs::write(&cfg, GRUB_CFG)?;
                let image = dir.join("grubia32.efi");
                grub_ia32_image(&image)?;
                vec![
                    ("grubia32.efi".into(), image),
                    ("grub/grub.cfg".into(), cfg),
                ]
            }
            Flavor::Arm64Grub => {
                let arm = crate::arm64::ensure_arm64_payload(&crate::payload::cache_dir())?;
                let cfg = dir.join("grub-arm64.cfg");
                std::fs::write(&cfg, GRUB_CFG_ARM64)?;
                vec![
                    ("grubaa64.efi".into(), arm.grub),
                    ("vmlinuz-arm64".into(), arm.kernel),
                    ("initrd-arm64.gz".into(), arm.initrd),
                    ("grub/grub.cfg".into(), cfg),
                ]
            }
        })
    }
}

/// GRUB's i386-efi modules (`grub-efi-ia32-bin`).
const GRUB_IA32_MODULES: &str = "/usr/lib/grub/i386-efi";
/// What the ia32 GRUB network image needs built in: the EFI NIC, TFTP, the Linux loader,
/// and the script commands grub.cfg uses.
const GRUB_IA32_BUILTIN: &[&str] = &[
    "efinet",
    "tftp",
    "net",
    "linux",
    "normal",
    "configfile",
    "echo",
    "test",
    "efi_gop",
];

/// Build GRUB's i386-efi network image (prefix `/grub`, so it reads `grub/grub.cfg` from the
/// TFTP server it came from).
fn grub_ia32_image(out: &Path) -> Result<()> {
    let status = std::process::Command::new("grub-mkimage")
        .args([
            "-O",
            "i386-efi",
            "-d",
            GRUB_IA32_MODULES,
            "-p",
            "/grub",
            "-o",
        ])
        .arg(out)
        .args(GRUB_IA32_BUILTIN)
        .status()
        .context("running grub-mkimage (apt-get install grub-common grub-efi-ia32-bin)")?;
    if !status.success() {
        bail!("grub-mkimage -O i386-efi failed ({status})");
    }
    Ok(())
}

/// GRUB's menu for the Secure Boot chain: the signed kernel and the lab initrd from the TFTP
/// server GRUB itself came from, phoning home to pxed there. GRUB verifies the kernel through
/// shim's protocol before it boots it.
const GRUB_CFG: &str = r#"set timeout=0
set default=0
menuentry "pxelab test OS" {
  echo "pxelab: loading the kernel from ${net_default_server}"
  linux (tftp,${net_default_server})/vmlinuz console=ttyS0 panic=-1 no_timer_check "pxelab.phone=http://${net_default_server}:8080/api/phone-home?stage=os.phone-home"
  initrd (tftp,${net_default_server})/initrd.gz
}
"#;

/// GRUB's menu for the arm64 machine: the arm64 kernel on the PL011 console.
const GRUB_CFG_ARM64: &str = r#"set timeout=0
set default=0
menuentry "pxelab test OS (arm64)" {
  linux (tftp,${net_default_server})/vmlinuz-arm64 console=ttyAMA0 panic=-1 "pxelab.phone=http://${net_default_server}:8080/api/phone-home?stage=os.phone-home"
  initrd (tftp,${net_default_server})/initrd-arm64.gz
}
"#;

/// One machine of the matrix.
#[derive(Clone, Debug, Serialize)]
pub struct Entry {
    /// Its name (a row of the table).
    pub name: &'static str,
    /// Firmware.
    pub firmware: Firmware,
    /// QEMU NIC model.
    pub nic: &'static str,
    /// Option ROM.
    pub rom: EntryRom,
    /// PXE or HTTP Boot (UEFI).
    pub netboot: NetBoot,
    /// Which stages it must reach.
    pub path: BootPath,
    /// The pxed configuration.
    pub flavor: Flavor,
    /// Which runs include it.
    pub tier: Tier,
    /// Console text the run must show (checked in the console log after the run).
    pub console: Option<&'static str>,
    /// Files it needs, with the Debian package that has them.
    pub needs: &'static [(&'static str, &'static str)],
    /// What it covers.
    pub about: &'static str,
    /// A failure seen and understood: the stage it fails at and why. A run that fails there
    /// is `known`; one that passes is flagged so the note gets removed.
    pub known: Option<(BootStage, &'static str)>,
}

const fn bios(name: &'static str, nic: &'static str, tier: Tier, about: &'static str) -> Entry {
    Entry {
        name,
        firmware: Firmware::Seabios,
        nic,
        rom: EntryRom::Default,
        netboot: NetBoot::Pxe,
        path: BootPath::IpxeRom,
        flavor: Flavor::Full,
        tier,
        console: None,
        needs: &[],
        about,
        known: None,
    }
}

const IPXE_QEMU: &[(&str, &str)] = &[("/usr/lib/ipxe/qemu/efi-e1000.rom", "ipxe-qemu")];

/// The catalogue.
pub fn catalogue() -> Vec<Entry> {
    let uefi = |name, nic, rom, netboot, path, tier, about| Entry {
        name,
        firmware: Firmware::Ovmf,
        nic,
        rom,
        netboot,
        path,
        flavor: Flavor::Full,
        tier,
        console: None,
        needs: &[],
        about,
        known: None,
    };
    vec![
        bios(
            "bios-e1000",
            "e1000",
            Tier::Standard,
            "the commonest emulated NIC; also the lab_boot test",
        ),
        bios(
            "bios-e1000e",
            "e1000e",
            Tier::Standard,
            "Intel 82574L (PCIe)",
        ),
        bios(
            "bios-virtio",
            "virtio-net-pci",
            Tier::Standard,
            "paravirtual NIC",
        ),
        bios(
            "bios-rtl8139",
            "rtl8139",
            Tier::Ci,
            "Realtek 8139: a non-Intel ROM with its own driver in iPXE and in the test OS (8139cp/8139too)",
        ),
        bios(
            "bios-vmxnet3",
            "vmxnet3",
            Tier::Standard,
            "VMware's paravirtual NIC",
        ),
        Entry {
            path: BootPath::IpxeRomTftpKernel,
            ..bios(
                "bios-pcnet",
                "pcnet",
                Tier::Slow,
                "AMD PCnet (pcnet32): its iPXE driver stops receiving after a TCP burst, so pxed sends the kernel by TFTP",
            )
        },
        bios(
            "bios-ne2k",
            "ne2k_pci",
            Tier::Standard,
            "NE2000 PCI: programmed I/O, no DMA",
        ),
        Entry {
            path: BootPath::IpxeRomTftpKernel,
            ..bios(
                "bios-i82559er",
                "i82559er",
                Tier::Slow,
                "Intel i8255x (eepro100/e100): its iPXE driver stops receiving after a TCP burst, so pxed sends the kernel by TFTP",
            )
        },
        Entry {
            needs: IPXE_QEMU,
            ..uefi(
                "uefi-e1000-ipxe",
                "e1000",
                EntryRom::Default,
                NetBoot::Pxe,
                BootPath::IpxeRom,
                Tier::Ci,
                "OVMF x64 running the iPXE EFI driver from the NIC's option ROM",
            )
        },
        Entry {
            needs: IPXE_QEMU,
            ..uefi(
                "uefi-virtio-ipxe",
                "virtio-net-pci",
                EntryRom::Default,
                NetBoot::Pxe,
                BootPath::IpxeRom,
                Tier::Standard,
                "OVMF x64 with iPXE's EFI virtio ROM (instead of EDK2's VirtioNetDxe)",
            )
        },
        uefi(
            "uefi-virtio-edk2",
            "virtio-net-pci",
            EntryRom::None,
            NetBoot::Pxe,
            BootPath::FirmwarePxe,
            Tier::Standard,
            "OVMF x64, EDK2's own PXE (arch 7) chaining snponly.efi; also the lab_boot test",
        ),
        uefi(
            "uefi-virtio-http",
            "virtio-net-pci",
            EntryRom::None,
            NetBoot::Http,
            BootPath::HttpBoot,
            Tier::Ci,
            "OVMF x64 UEFI HTTP Boot (HttpBootDxe, arch 16): PXE off by fw_cfg",
        ),
        Entry {
            firmware: Firmware::OvmfSecboot,
            flavor: Flavor::SecureBoot,
            console: Some("Secure boot enabled"),
            needs: &[
                ("/usr/share/OVMF/OVMF_CODE_4M.ms.fd", "ovmf"),
                (SHIM_SIGNED, "shim-signed"),
                (GRUB_NET_SIGNED, "grub-efi-amd64-signed"),
            ],
            ..uefi(
                "uefi-secboot-shim",
                "virtio-net-pci",
                EntryRom::None,
                NetBoot::Pxe,
                BootPath::Loader,
                Tier::Ci,
                "OVMF x64, Secure Boot enforced: signed shim -> signed GRUB -> signed kernel",
            )
        },
        Entry {
            firmware: Firmware::OvmfIa32,
            flavor: Flavor::Ia32Grub,
            needs: &[
                ("/usr/share/OVMF/OVMF32_CODE_4M.secboot.fd", "ovmf-ia32"),
                ("/usr/lib/grub/i386-efi/efinet.mod", "grub-efi-ia32-bin"),
            ],
            ..uefi(
                "uefi-ia32-grub",
                "virtio-net-pci",
                EntryRom::None,
                NetBoot::Pxe,
                BootPath::Loader,
                Tier::Standard,
                "OVMF ia32 (arch 6), EDK2's PXE loading GRUB's i386-efi image (no ia32 iPXE in Debian)",
            )
        },
        Entry {
            firmware: Firmware::Aavmf,
            flavor: Flavor::Arm64Grub,
            path: BootPath::Arm64,
            needs: &[
                (crate::machine::AAVMF_CODE, "qemu-efi-aarch64"),
                ("/usr/bin/qemu-system-aarch64", "qemu-system-arm"),
            ],
            ..uefi(
                "arm64-virtio-grub",
                "virtio-net-pci",
                EntryRom::None,
                NetBoot::Pxe,
                BootPath::Loader,
                Tier::Slow,
                "AAVMF arm64 UEFI (arch 11), EDK2's PXE loading GRUB's arm64-efi image and an arm64 kernel",
            )
        },
    ]
}

/// What to run.
#[derive(Clone, Debug, Default)]
pub struct MatrixOptions {
    /// Entry names or name prefixes (`bios-` = every SeaBIOS machine); empty = by tier.
    pub only: Vec<String>,
    /// Include the slow tier.
    pub all: bool,
    /// Only the CI tier.
    pub ci: bool,
    /// Machines booted at once (default 2).
    pub parallel: usize,
    /// The pxed binary (default `$PXELAB_PXED`, else `pxed` on PATH).
    pub pxed: Option<PathBuf>,
    /// Where the matrix run directory goes (default under [`runs_root`]).
    pub run_dir: Option<PathBuf>,
    /// Print stages as they are reached.
    pub progress: bool,
}

/// The entries `opts` selects.
pub fn select(opts: &MatrixOptions) -> Result<Vec<Entry>> {
    let all = catalogue();
    if !opts.only.is_empty() {
        let mut out: Vec<Entry> = Vec::new();
        for pat in &opts.only {
            let hits: Vec<&Entry> = all
                .iter()
                .filter(|e| e.name == pat || e.name.starts_with(pat.as_str()))
                .collect();
            if hits.is_empty() {
                bail!(
                    "no matrix entry is named `{pat}` (known: {})",
                    all.iter().map(|e| e.name).collect::<Vec<_>>().join(", ")
                );
            }
            for e in hits {
                if !out.iter().any(|o| o.name == e.name) {
                    out.push(e.clone());
                }
            }
        }
        return Ok(out);
    }
    let max = if opts.ci {
        Tier::Ci
    } else if opts.all {
        Tier::Slow
    } else {
        Tier::Standard
    };
    Ok(all.into_iter().filter(|e| e.tier <= max).collect())
}

/// One row of the table.
#[derive(Clone, Debug, Serialize)]
pub struct MatrixRow {
    /// The entry.
    pub entry: Entry,
    /// `passed`, `failed` or `skipped`.
    pub result: RowResult,
    /// Why it failed or was skipped.
    pub reason: Option<String>,
    /// Every stage seen, ms after power-on.
    pub seen: BTreeMap<BootStage, u64>,
    /// The lab run directory holding its evidence.
    pub run_dir: Option<PathBuf>,
}

/// A row's outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RowResult {
    /// Every stage within its deadline (and the console check, if any).
    Passed,
    /// A stage missed or a failure seen.
    Failed,
    /// Not run: a needed file is missing.
    Skipped,
    /// Failed where its `known` note says it does.
    Known,
}

/// A whole matrix run.
#[derive(Clone, Debug, Serialize)]
pub struct MatrixReport {
    /// Rows in catalogue order.
    pub rows: Vec<MatrixRow>,
    /// Wall time of the whole run.
    pub duration_ms: u64,
    /// Machines booted at once.
    pub parallel: usize,
    /// Where matrix.json and matrix.txt are.
    pub run_dir: PathBuf,
}

/// The table's stage columns.
pub const COLUMNS: &[(BootStage, &str)] = &[
    (BootStage::DhcpAck, "dhcp"),
    (BootStage::TftpComplete, "tftp"),
    (BootStage::IpxeDhcp, "ipxe"),
    (BootStage::HttpScript, "script"),
    (BootStage::HttpKernel, "kernel"),
    (BootStage::OsKernel, "linux"),
    (BootStage::OsUserspace, "user"),
    (BootStage::OsPhoneHome, "home"),
];

impl MatrixReport {
    /// Every run row passed (skipped rows do not fail the matrix, but are listed).
    pub fn passed(&self) -> bool {
        self.rows.iter().all(|r| r.result != RowResult::Failed)
    }

    /// The row for an entry.
    pub fn row(&self, name: &str) -> Option<&MatrixRow> {
        self.rows.iter().find(|r| r.entry.name == name)
    }

    /// The table: machines x stages, seconds after power-on.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = write!(
            s,
            "| {:<18} | {:<12} | {:<14} | {:<7} |",
            "machine", "firmware", "nic", "result"
        );
        for (_, h) in COLUMNS {
            let _ = write!(s, " {h:>6} |");
        }
        s.push('\n');
        let _ = write!(
            s,
            "|{}|{}|{}|{}|",
            "-".repeat(20),
            "-".repeat(14),
            "-".repeat(16),
            "-".repeat(9)
        );
        for _ in COLUMNS {
            let _ = write!(s, "{}:|", "-".repeat(7));
        }
        s.push('\n');
        for r in &self.rows {
            let result = match r.result {
                RowResult::Passed => "ok",
                RowResult::Failed => "FAILED",
                RowResult::Skipped => "skipped",
                RowResult::Known => "known",
            };
            let _ = write!(
                s,
                "| {:<18} | {:<12} | {:<14} | {:<7} |",
                r.entry.name,
                r.entry.firmware.as_str(),
                r.entry.nic,
                result
            );
            for (stage, _) in COLUMNS {
                match r.seen.get(stage) {
                    Some(ms) => {
                        let _ = write!(s, " {:>6.1} |", *ms as f64 / 1000.0);
                    }
                    None => {
                        let _ = write!(s, " {:>6} |", "-");
                    }
                }
            }
            s.push('\n');
        }
        let _ = writeln!(
            s,
            "\n{} machines, {} at a time, {:.0} s wall time; seconds after power-on.",
            self.rows.len(),
            self.parallel,
            self.duration_ms as f64 / 1000.0
        );
        for r in &self.rows {
            if let Some(why) = &r.reason {
                let _ = writeln!(s, "{}: {why}", r.entry.name);
            }
        }
        s
    }
}

/// The lab file (TOML) that boots `entries` together with the `flavor` configuration.
fn lab_toml(
    name: &str,
    entries: &[&Entry],
    flavor: Flavor,
    template: &Path,
    files: &[(String, PathBuf)],
    pxed: &Path,
) -> String {
    let q = |p: &Path| toml_str(&p.display().to_string());
    let mut t = String::new();
    let _ = writeln!(t, "[lab]\nname = {}\n", toml_str(name));
    let _ = writeln!(
        t,
        "[server]\nkind = \"pxed\"\nconfig = {}\nbinary = {}",
        q(template),
        q(pxed)
    );
    if !files.is_empty() {
        let _ = writeln!(t, "[server.files]");
        for (n, p) in files {
            let _ = writeln!(t, "{} = {}", toml_str(n), q(p));
        }
    }
    let tolerate: Vec<String> = flavor.tolerate().iter().map(|s| toml_str(s)).collect();
    let _ = writeln!(t, "\n[oracle]\ntolerate = [{}]", tolerate.join(", "));
    for e in entries {
        let _ = writeln!(
            t,
            "\n[[machine]]\nname = {}\nfirmware = {}\nnic = {}\nrom = {}\nnetboot = {}",
            toml_str(e.name),
            toml_str(e.firmware.as_str()),
            toml_str(e.nic),
            toml_str(match e.rom {
                EntryRom::Default => "default",
                EntryRom::None => "none",
            }),
            toml_str(match e.netboot {
                NetBoot::Pxe => "pxe",
                NetBoot::Http => "http",
            }),
        );
        for (stage, secs) in e.path.expect() {
            let _ = writeln!(
                t,
                "[[machine.expect]]\nstage = {}\nwithin = \"{secs}s\"",
                toml_str(stage.as_str())
            );
        }
    }
    t
}

fn toml_str(s: &str) -> String {
    // A TOML basic string: JSON's escaping is a subset TOML accepts.
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

/// Run the selected entries; the report holds every row, passed, failed or skipped.
pub fn run_matrix(opts: &MatrixOptions) -> Result<MatrixReport> {
    let started = Instant::now();
    let entries = select(opts)?;
    let parallel = opts.parallel.clamp(1, MAX_PARALLEL);
    let pxed = opts
        .pxed
        .clone()
        .or_else(|| std::env::var_os("PXELAB_PXED").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("pxed"));
    let stamp = humantime::format_rfc3339_seconds(SystemTime::now())
        .to_string()
        .replace([':', '-'], "");
    let dir = match &opts.run_dir {
        Some(d) => d.clone(),
        None => runs_root().join(format!("matrix-{stamp}-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir.canonicalize()?;

    let mut rows: BTreeMap<&'static str, MatrixRow> = BTreeMap::new();
    let mut runnable: BTreeMap<Flavor, Vec<&Entry>> = BTreeMap::new();
    for e in &entries {
        let missing: Vec<String> = e
            .needs
            .iter()
            .filter(|(f, _)| !Path::new(f).exists())
            .map(|(f, pkg)| format!("{f} (apt-get install {pkg})"))
            .collect();
        if missing.is_empty() {
            runnable.entry(e.flavor).or_default().push(e);
        } else {
            rows.insert(
                e.name,
                MatrixRow {
                    entry: e.clone(),
                    result: RowResult::Skipped,
                    reason: Some(format!("skipped: missing {}", missing.join(", "))),
                    seen: BTreeMap::new(),
                    run_dir: None,
                },
            );
        }
    }

    let mut batch_no = 0;
    for (flavor, list) in runnable {
        let template = dir.join(format!("{flavor:?}.pxed.toml").to_lowercase());
        std::fs::write(&template, flavor.template())?;
        // A flavour that cannot be prepared (no arm64 packages, no grub-mkimage) skips its
        // machines with the reason; the rest of the matrix still runs.
        let files = match flavor.files(&dir) {
            Ok(f) => f,
            Err(err) => {
                for e in list {
                    rows.insert(
                        e.name,
                        MatrixRow {
                            entry: e.clone(),
                            result: RowResult::Skipped,
                            reason: Some(format!("skipped: {err:#}")),
                            seen: BTreeMap::new(),
                            run_dir: None,
                        },
                    );
                }
                continue;
            }
        };
        for batch in list.chunks(parallel) {
            batch_no += 1;
            let name = format!("matrix-{batch_no}");
            let text = lab_toml(&name, batch, flavor, &template, &files, &pxed);
            let lab_path = dir.join(format!("{name}.toml"));
            std::fs::write(&lab_path, &text)?;
            let lab = LabFile::load(&lab_path)?;
            let run = run_lab(
                &lab,
                &RunOptions {
                    progress: opts.progress,
                    run_dir: Some(dir.join(&name)),
                },
            );
            for e in batch {
                rows.insert(e.name, row_from_run(e, &run));
            }
        }
    }

    let rows: Vec<MatrixRow> = entries.iter().filter_map(|e| rows.remove(e.name)).collect();
    let report = MatrixReport {
        rows,
        duration_ms: started.elapsed().as_millis() as u64,
        parallel,
        run_dir: dir.clone(),
    };
    std::fs::write(dir.join("matrix.json"), serde_json::to_vec_pretty(&report)?)?;
    std::fs::write(dir.join("matrix.txt"), report.table())?;
    Ok(report)
}

fn row_from_run(e: &Entry, run: &Result<crate::report::RunReport>) -> MatrixRow {
    let mut row = MatrixRow {
        entry: e.clone(),
        result: RowResult::Failed,
        reason: None,
        seen: BTreeMap::new(),
        run_dir: None,
    };
    let report = match run {
        Ok(r) => r,
        Err(err) => {
            row.reason = Some(format!("harness error: {err:#}"));
            return row;
        }
    };
    row.run_dir = Some(report.run_dir.clone());
    let Some(m) = report.machines.iter().find(|m| m.name == e.name) else {
        row.reason = Some("no report for the machine".into());
        return row;
    };
    row.seen = m.seen.iter().map(|(s, h)| (*s, h.at_ms)).collect();
    match &m.verdict {
        Verdict::Passed => {
            row.result = RowResult::Passed;
            if let Some((at, _)) = e.known {
                row.reason = Some(format!(
                    "passed although marked as failing at {at}: remove the known note"
                ));
            }
            if let Some(needle) = e.console {
                let log = report.run_dir.join(format!("{}.console.log", e.name));
                let text = std::fs::read(&log).unwrap_or_default();
                if !String::from_utf8_lossy(&text).contains(needle) {
                    row.result = RowResult::Failed;
                    row.reason = Some(format!("the console never showed `{needle}`"));
                }
            }
        }
        Verdict::Failed { stage, reason, .. } => {
            if let Some((at, why)) = e.known
                && *stage == Some(at)
            {
                row.result = RowResult::Known;
                row.reason = Some(format!("known failure at {at}: {why}"));
                return row;
            }
            row.reason = Some(format!(
                "failed at {}: {reason}",
                stage.map(|s| s.as_str()).unwrap_or("?")
            ));
        }
        other => row.reason = Some(format!("verdict {other:?}")),
    }
    row
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_selection_works() {
        let all = catalogue();
        let mut names: Vec<_> = all.iter().map(|e| e.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), all.len());
        let ci = select(&MatrixOptions {
            ci: true,
            ..Default::default()
        })
        .unwrap();
        assert!(ci.iter().all(|e| e.tier == Tier::Ci) && !ci.is_empty());
        let std_run = select(&MatrixOptions::default()).unwrap();
        assert!(std_run.iter().all(|e| e.tier != Tier::Slow));
        let every = select(&MatrixOptions {
            all: true,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(every.len(), all.len());
        let bios = select(&MatrixOptions {
            only: vec!["bios-".into()],
            ..Default::default()
        })
        .unwrap();
        assert!(bios.iter().all(|e| e.firmware == Firmware::Seabios) && bios.len() >= 8);
        assert!(
            select(&MatrixOptions {
                only: vec!["nope".into()],
                ..Default::default()
            })
            .is_err()
        );
    }

    #[test]
    fn generated_labs_parse() {
        let dir = tempfile::tempdir().unwrap();
        let all = catalogue();
        let refs: Vec<&Entry> = all.iter().collect();
        for flavor in [Flavor::Full, Flavor::SecureBoot] {
            // (Ia32Grub needs grub-mkimage; its lab text is built the same way.)
            let files = flavor.files(dir.path()).unwrap();
            let text = lab_toml(
                "m",
                &refs,
                flavor,
                Path::new("/t.toml"),
                &files,
                Path::new("/bin/pxed"),
            );
            let lab = LabFile::parse(&text).unwrap();
            let specs = lab.machine_specs(1);
            assert_eq!(specs.len(), all.len());
            let http = specs
                .iter()
                .find(|(s, _)| s.name == "uefi-virtio-http")
                .unwrap();
            assert_eq!(http.0.netboot, NetBoot::Http);
            assert!(http.1.iter().any(|e| e.stage == BootStage::HttpAsset));
        }
    }

    #[test]
    fn labs_take_user_supplied_firmware_roms_ipxe_and_media() {
        let text = r#"
[lab]
name = "mine"
[server]
kind = "pxed"
config = "mine.pxed.toml"
files = { "my-undionly.kpxe" = "build/undionly.kpxe", "sub/shim.efi" = "/srv/shim.efi" }
[[machine]]
name = "b"
rom = "/opt/roms/my-e1000.rom"
code = "/opt/fw/bios.bin"
[[machine]]
name = "u"
firmware = "ovmf"
code = "/opt/fw/CODE.fd"
vars = "/opt/fw/VARS.fd"
netboot = "http"
media = "/tmp/pxed-boot.iso"
[[expect]]
stage = "os.phone-home"
within = "60s"
"#;
        let lab = LabFile::parse(text).unwrap();
        let specs = lab.machine_specs(1);
        let (b, u) = (&specs[0].0, &specs[1].0);
        assert_eq!(
            b.rom,
            crate::machine::Rom::File("/opt/roms/my-e1000.rom".into())
        );
        assert_eq!(
            b.firmware_code.as_deref(),
            Some(Path::new("/opt/fw/bios.bin"))
        );
        assert_eq!(
            u.firmware_vars.as_deref(),
            Some(Path::new("/opt/fw/VARS.fd"))
        );
        assert_eq!(u.netboot, NetBoot::Http);
        assert_eq!(u.media.as_deref(), Some(Path::new("/tmp/pxed-boot.iso")));
        assert_eq!(lab.server.files.len(), 2);
        // HTTP Boot and a VARS file are UEFI things; files stay inside the root.
        assert!(
            LabFile::parse(&text.replace("name = \"b\"", "name = \"b\"\nnetboot = \"http\""))
                .is_err()
        );
        assert!(
            LabFile::parse(&text.replace("code = \"/opt/fw/bios.bin\"", "vars = \"/v\"")).is_err()
        );
        assert!(LabFile::parse(&text.replace("sub/shim.efi", "../shim.efi")).is_err());
    }

    #[test]
    fn example_labs_load() {
        let labs = Path::new(env!("CARGO_MANIFEST_DIR")).join("labs");
        let custom = LabFile::load(&labs.join("matrix-custom.toml")).unwrap();
        assert!(custom.server.files.contains_key("mine/snponly.efi"));
        assert!(
            custom
                .machines
                .iter()
                .any(|m| m.code.is_some() && m.vars.is_some())
        );
        let media = LabFile::load(&labs.join("matrix-media.toml")).unwrap();
        assert!(media.machines.iter().all(|m| m.media.is_some()));
    }

    #[test]
    fn qemu_lines_for_user_firmware_http_boot_and_media() {
        use crate::machine::{Accel, MachineSpec, Rom, qemu_command};
        let dir = tempfile::tempdir().unwrap();
        let vars = dir.path().join("my-vars.fd");
        let code = dir.path().join("my-code.fd");
        let iso = dir.path().join("boot.iso");
        for f in [&vars, &code, &iso] {
            std::fs::write(f, b"x").unwrap();
        }
        let spec = MachineSpec {
            name: "u".into(),
            firmware: Firmware::Ovmf,
            nic: "e1000".into(),
            rom: Rom::None,
            memory_mib: 512,
            mac: "52:54:00:00:00:02".parse().unwrap(),
            firmware_code: Some(code.clone()),
            firmware_vars: Some(vars),
            netboot: NetBoot::Http,
            media: Some(iso.clone()),
        };
        let line = qemu_command(&spec, Accel::Tcg, Path::new("/s.sock"), dir.path())
            .unwrap()
            .join(" ");
        assert!(
            line.contains(&format!("readonly=on,file={}", code.display())),
            "{line}"
        );
        assert!(line.contains("name=opt/org.tianocore/IPv4PXESupport,string=n"));
        assert!(line.contains("name=opt/org.tianocore/IPv6PXESupport,string=n"));
        assert!(line.contains(&format!("media=cdrom,readonly=on,file={}", iso.display())));
        assert!(line.contains("ide-cd,drive=media,bootindex=0"));
        // The user's VARS template was copied, not used in place.
        assert_eq!(
            std::fs::read(dir.path().join("u.OVMF_VARS.fd")).unwrap(),
            b"x"
        );
        let bios = MachineSpec {
            firmware: Firmware::Seabios,
            netboot: NetBoot::Pxe,
            media: None,
            firmware_vars: None,
            ..spec
        };
        let line = qemu_command(&bios, Accel::Tcg, Path::new("/s.sock"), dir.path())
            .unwrap()
            .join(" ");
        assert!(
            line.contains(&format!("-bios {}", code.display())),
            "{line}"
        );
        assert!(line.contains("-boot n"));
        let secboot = MachineSpec {
            firmware: Firmware::OvmfSecboot,
            firmware_code: None,
            ..bios
        };
        if Path::new(crate::machine::OVMF_SECBOOT_VARS).exists() {
            let line = qemu_command(&secboot, Accel::Tcg, Path::new("/s.sock"), dir.path())
                .unwrap()
                .join(" ");
            assert!(line.contains("-machine q35,smm=on"));
            assert!(line.contains("driver=cfi.pflash01,property=secure,value=on"));
            assert!(line.contains("OVMF_CODE_4M.ms.fd"));
        }
    }

    #[test]
    fn table_has_a_row_per_entry() {
        let e = catalogue().remove(0);
        let mut seen = BTreeMap::new();
        seen.insert(BootStage::DhcpAck, 3_840);
        let report = MatrixReport {
            rows: vec![MatrixRow {
                entry: e,
                result: RowResult::Passed,
                reason: None,
                seen,
                run_dir: None,
            }],
            duration_ms: 60_000,
            parallel: 2,
            run_dir: PathBuf::from("/x"),
        };
        let t = report.table();
        assert!(t.contains("| bios-e1000 "), "{t}");
        assert!(t.contains("    3.8 |"), "{t}");
        assert!(report.passed());
    }
}
