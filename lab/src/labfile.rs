//! Lab definitions as TOML: topology, server, machines, expected stages. Unknown keys are
//! rejected so a typo never silently changes a test.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use pxed::mac::MacAddr;
use pxed::stage::BootStage;
use serde::Deserialize;

use crate::machine::{Firmware, MachineSpec, NetBoot, Rom};

/// Default deadline multiplier under TCG: emulation is several times slower than KVM.
pub const DEFAULT_TCG_SCALE: f64 = 3.0;
/// Default guest memory: the test OS needs little, iPXE and OVMF want some room.
pub const DEFAULT_MEMORY_MIB: u32 = 512;
/// `[server] mtu` bounds: IPv4 needs 576 from every host (RFC 791); above the machines' 1500
/// the setting means nothing, since the machines' links carry 1500.
const SERVER_MTU_MIN: u32 = 576;
const SERVER_MTU_MAX: u32 = 1500;
/// Machines per lab: each is a TCG QEMU on a 2-core host.
pub const MAX_MACHINES: usize = 16;

/// A parsed lab file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabFile {
    /// The lab as a whole.
    pub lab: LabSection,
    /// The boot server.
    pub server: ServerSection,
    /// The client machines.
    #[serde(rename = "machine", default)]
    pub machines: Vec<MachineSection>,
    /// Stages every machine must reach.
    #[serde(default)]
    pub expect: Vec<ExpectSection>,
    /// Oracle tuning.
    #[serde(default)]
    pub oracle: OracleSection,
}

/// `[lab]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabSection {
    /// Names the run directory.
    pub name: String,
    /// The lab subnet, a /24 (`10.77.5.0/24`); the server takes .1. Default: picked per run.
    pub subnet: Option<String>,
    /// Deadline multiplier under TCG.
    pub tcg_scale: Option<f64>,
}

/// Which server serves the lab.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ServerKind {
    /// dnsmasq for DHCP and TFTP, with an iPXE script (the baseline).
    Dnsmasq,
    /// pxed, from its config file.
    Pxed,
    /// A server VM on the lab switch (the prepared `pxe-server`, or an imported one).
    Vm,
}

/// `[server]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    /// dnsmasq or pxed.
    pub kind: ServerKind,
    /// dnsmasq: the file iPXE is told to fetch (default `boot.ipxe`; name a missing one to
    /// make a broken lab).
    pub boot_file: Option<String>,
    /// pxed: a config template; `{server_ip}`, `{interface}`, `{event_log}`, `{tftp_root}`,
    /// `{kernel}`, `{initrd}`, `{phone_url}`, `{run_dir}`, `{pool_start}`, `{pool_end}`
    /// are filled in.
    pub config: Option<PathBuf>,
    /// pxed: the binary (default `pxed` on PATH, or `$PXELAB_PXED`).
    pub binary: Option<PathBuf>,
    /// dnsmasq: `defaults` or `tuned` (the default: no ping, an RA, option 60 and 43).
    #[serde(default)]
    pub dnsmasq: crate::server::DnsmasqTuning,
    /// Another DHCP server on the lab LAN that gives the addresses (for pxed in proxy mode):
    /// it runs in its own namespace at x.y.z.2, joined to the lab switch by its own TAP.
    pub address_server: Option<AddressServer>,
    /// vm: the server VM's definition (default: `vm-images/pxe-server.toml`).
    pub definition: Option<PathBuf>,
    /// Extra files put in the TFTP/HTTP root before the server starts, name -> path: a
    /// user's own iPXE build (named in the template's `[ipxe]`), shim, GRUB, ...
    #[serde(default)]
    pub files: std::collections::BTreeMap<String, PathBuf>,
    /// pxed: a fault to inject: when pxed reports this stage for the first time (e.g.
    /// `tftp.request` or `http.kernel`), kill pxed (SIGKILL, like a crash) and start it again
    /// with the same config and state, while the client is in the middle of that transfer.
    #[serde(default)]
    pub restart_at: Option<BootStage>,
    /// dnsmasq, pxed: the MTU of the server's interface in the lab, when it is smaller than the
    /// machines' 1500 (a server behind a tunnel, VXLAN or WireGuard link: firmware-quirks.md Q7).
    /// Datagrams bigger than this leave the server in IP fragments.
    pub mtu: Option<u32>,
}

/// A DHCP server that gives addresses and no boot data.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AddressServer {
    /// dnsmasq with a `dhcp-range` and nothing else.
    Dnsmasq,
}

/// `[[machine]]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineSection {
    /// Unique name.
    pub name: String,
    /// seabios (default) or ovmf.
    #[serde(default)]
    pub firmware: Firmware,
    /// QEMU NIC model (default e1000).
    pub nic: Option<String>,
    /// `default`, `none` or a ROM file path.
    #[serde(default)]
    pub rom: Rom,
    /// MiB.
    pub memory: Option<u32>,
    /// Default: derived from the lab and the machine's position.
    pub mac: Option<MacAddr>,
    /// Stages for this machine only (replace the lab's `[[expect]]`).
    #[serde(default)]
    pub expect: Vec<ExpectSection>,
    /// Firmware quirk profiles on this machine's port: built-in names (`pxelab quirks`) or
    /// profile files (`*.toml`, relative to the lab file). See docs/quirks.md.
    #[serde(default)]
    pub quirks: Vec<String>,
    /// Link impairments on this machine's port (loss, duplication, reordering, delay, MTU,
    /// link-up delay).
    pub impair: Option<crate::impair::ImpairConfig>,
    /// A firmware image of your own: SeaBIOS's `-bios`, or the UEFI pflash code.
    pub code: Option<PathBuf>,
    /// A UEFI variable-store template of your own (copied for each run).
    pub vars: Option<PathBuf>,
    /// UEFI: `pxe` (default) or `http` (UEFI HTTP Boot).
    #[serde(default)]
    pub netboot: NetBoot,
    /// Boot media booted before the NIC: a `.iso` (CD) or a USB disk image.
    pub media: Option<PathBuf>,
}

/// `[[expect]]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectSection {
    /// The stage.
    pub stage: BootStage,
    /// Deadline after power-on under KVM; scaled under TCG.
    #[serde(with = "humantime_serde")]
    pub within: Duration,
}

/// `[oracle]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OracleSection {
    /// Failure stages or console patterns that must not fail the run.
    #[serde(default)]
    pub tolerate: Vec<String>,
}

impl LabFile {
    /// Read and validate a lab file.
    pub fn load(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut lab = Self::parse(&text).with_context(|| format!("in {}", path.display()))?;
        // Paths in the file are relative to the file.
        let base = path.parent().unwrap_or(Path::new("."));
        if let Some(c) = &lab.server.config
            && c.is_relative()
        {
            lab.server.config = Some(base.join(c));
        }
        if let Some(d) = &lab.server.definition
            && d.is_relative()
        {
            lab.server.definition = Some(base.join(d));
        }
        for m in &mut lab.machines {
            for q in &mut m.quirks {
                *q = crate::quirks::rebase(q, base);
            }
        }
        for from in lab.server.files.values_mut() {
            if from.is_relative() {
                *from = base.join(&*from);
            }
        }
        for m in &mut lab.machines {
            for p in [&mut m.code, &mut m.vars, &mut m.media]
                .into_iter()
                .flatten()
            {
                if p.is_relative() {
                    *p = base.join(&*p);
                }
            }
        }
        Ok(lab)
    }

    /// Parse and validate lab TOML.
    pub fn parse(text: &str) -> Result<Self> {
        let lab: LabFile = toml::from_str(text)?;
        lab.validate()?;
        Ok(lab)
    }

    fn validate(&self) -> Result<()> {
        if self.machines.is_empty() {
            bail!("the lab has no [[machine]]");
        }
        if self.machines.len() > MAX_MACHINES {
            bail!("at most {MAX_MACHINES} machines per lab");
        }
        let mut names = std::collections::HashSet::new();
        for m in &self.machines {
            if m.name.is_empty()
                || !m
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                bail!("machine name `{}`: use letters, digits, - and _", m.name);
            }
            if !names.insert(&m.name) {
                bail!("two machines are named `{}`", m.name);
            }
            for q in &m.quirks {
                if !crate::quirks::is_path(q) && crate::quirks::QuirkProfile::builtin(q).is_none() {
                    bail!("machine `{}`: no built-in quirk profile `{q}`", m.name);
                }
            }
            if let Some(i) = &m.impair {
                i.validate()
                    .with_context(|| format!("machine `{}`", m.name))?;
            }
            if m.netboot == NetBoot::Http && !m.firmware.is_uefi() {
                bail!(
                    "machine `{}`: netboot = \"http\" needs UEFI firmware",
                    m.name
                );
            }
            if m.vars.is_some() && !m.firmware.is_uefi() {
                bail!("machine `{}`: vars is for UEFI firmware", m.name);
            }
            if self.expect.is_empty() && m.expect.is_empty() {
                bail!("machine `{}` expects no stage: add [[expect]]", m.name);
            }
        }
        if let Some(mtu) = self.server.mtu {
            if self.server.kind == ServerKind::Vm {
                bail!("[server] mtu is for dnsmasq and pxed (a server VM sets its own)");
            }
            if !(SERVER_MTU_MIN..=SERVER_MTU_MAX).contains(&mtu) {
                bail!("[server] mtu = {mtu}: between {SERVER_MTU_MIN} and {SERVER_MTU_MAX}");
            }
        }
        if let Some(s) = &self.lab.subnet {
            parse_subnet(s)?;
        }
        if let Some(scale) = self.lab.tcg_scale
            && !(1.0..=100.0).contains(&scale)
        {
            bail!("tcg_scale must be between 1 and 100");
        }
        if self.server.kind == ServerKind::Pxed && self.server.config.is_none() {
            bail!("[server] kind = \"pxed\" needs config = \"<template>\"");
        }
        for name in self.server.files.keys() {
            if name.is_empty() || name.starts_with('/') || name.split('/').any(|c| c == "..") {
                bail!("[server] files: `{name}` must be a relative path inside the root");
            }
        }
        for t in &self.oracle.tolerate {
            let known = t.parse::<BootStage>().is_ok()
                || crate::oracle::FAILURE_PATTERNS.iter().any(|p| p.name == t);
            if !known {
                bail!("[oracle] tolerate: `{t}` is neither a stage nor a failure pattern");
            }
        }
        Ok(())
    }

    /// The machines with defaults filled in (MACs derived from `lab_id` when not given).
    pub fn machine_specs(&self, lab_id: u8) -> Vec<(MachineSpec, Vec<ExpectSection>)> {
        self.machines
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let spec = MachineSpec {
                    name: m.name.clone(),
                    firmware: m.firmware,
                    nic: m.nic.clone().unwrap_or_else(|| "e1000".into()),
                    rom: m.rom.clone(),
                    memory_mib: m.memory.unwrap_or(DEFAULT_MEMORY_MIB),
                    mac: m
                        .mac
                        .unwrap_or(MacAddr([0x52, 0x54, 0x00, 0x77, lab_id, i as u8 + 1])),
                    firmware_code: m.code.clone(),
                    firmware_vars: m.vars.clone(),
                    netboot: m.netboot,
                    media: m.media.clone(),
                };
                let expect = if m.expect.is_empty() {
                    self.expect.clone()
                } else {
                    m.expect.clone()
                };
                (spec, expect)
            })
            .collect()
    }
}

/// `a.b.c.0/24` -> the network's first three octets.
pub fn parse_subnet(s: &str) -> Result<[u8; 3]> {
    let (net, len) = s
        .split_once('/')
        .with_context(|| format!("subnet `{s}`: expected a.b.c.0/24"))?;
    let net: Ipv4Addr = net.parse().with_context(|| format!("subnet `{s}`"))?;
    let [a, b, c, d] = net.octets();
    if len != "24" || d != 0 {
        bail!("subnet `{s}`: the lab uses a /24 ending in .0");
    }
    Ok([a, b, c])
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[lab]
name = "bios"
subnet = "10.77.9.0/24"

[server]
kind = "dnsmasq"

[[machine]]
name = "c1"
nic = "e1000"

[[machine]]
name = "u1"
firmware = "ovmf"
nic = "virtio-net-pci"
rom = "none"
mac = "52:54:00:aa:bb:cc"

[[expect]]
stage = "dhcp.ack"
within = "30s"

[[expect]]
stage = "os.userspace"
within = "2m"
"#;

    #[test]
    fn parses_a_lab() {
        let lab = LabFile::parse(GOOD).unwrap();
        let specs = lab.machine_specs(9);
        assert_eq!(specs.len(), 2);
        assert_eq!(specs[0].0.mac.to_string(), "52:54:00:77:09:01");
        assert_eq!(specs[1].0.rom, Rom::None);
        assert_eq!(specs[1].0.firmware, Firmware::Ovmf);
        assert_eq!(specs[1].1[1].within, Duration::from_secs(120));
        assert_eq!(parse_subnet("10.77.9.0/24").unwrap(), [10, 77, 9]);
    }

    #[test]
    fn rejects_unknown_keys_and_stages() {
        let typo = GOOD.replace("nic = \"e1000\"", "nick = \"e1000\"");
        assert!(LabFile::parse(&typo).is_err());
        let bad_stage = GOOD.replace("dhcp.ack", "dhcp.acknowledged");
        assert!(LabFile::parse(&bad_stage).is_err());
        let dup = GOOD.replace("name = \"u1\"", "name = \"c1\"");
        assert!(LabFile::parse(&dup).is_err());
        assert!(LabFile::parse(&GOOD.replace("10.77.9.0/24", "10.77.9.0/16")).is_err());
    }

    #[test]
    fn server_mtu_is_bounded() {
        let with = |mtu: &str| {
            GOOD.replace(
                "kind = \"dnsmasq\"",
                &format!("kind = \"dnsmasq\"\nmtu = {mtu}"),
            )
        };
        assert_eq!(
            LabFile::parse(&with("1400")).unwrap().server.mtu,
            Some(1400)
        );
        assert!(LabFile::parse(&with("9000")).is_err());
        assert!(LabFile::parse(&with("100")).is_err());
    }
}
