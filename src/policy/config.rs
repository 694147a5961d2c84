//! The TOML model of the boot policy (`[ipxe]`, `[[profile]]`, `[[group]]`, `[[machine]]`)
//! and its validation into a [`Policy`].

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use serde::Deserialize;

use super::{BootTarget, ClientArch, ClientFacts, Cpu, Firmware, MenuItem, Policy};
use crate::mac::MacAddr;

/// Longest `one_shot` stage name: the phone-home API accepts no longer custom stage.
const MAX_STAGE_NAME: usize = 64;

/// `[ipxe]`: the iPXE binaries handed to firmware that is not iPXE yet, paths in the boot root.
/// Defaults follow firmware-quirks.md Q18: `undionly.kpxe` for BIOS (uses the ROM's own UNDI
/// driver) and `snponly.efi` for UEFI (uses the firmware's SNP driver, fewer NIC driver bugs).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct IpxeBinaries {
    /// BIOS clients (arch 0).
    pub bios: Option<String>,
    /// x86-64 UEFI (arch 7, 8, 9, 16).
    pub efi_x64: Option<String>,
    /// IA32 UEFI (arch 6, 15). Debian's `ipxe` package has no build for it.
    pub efi_ia32: Option<String>,
    /// ARM64 UEFI (arch 11, 19). Debian's `ipxe` package has no build for it.
    pub efi_arm64: Option<String>,
    /// ARM32 UEFI (arch 10, 18).
    pub efi_arm32: Option<String>,
}

impl Default for IpxeBinaries {
    fn default() -> Self {
        IpxeBinaries {
            bios: Some("undionly.kpxe".into()),
            efi_x64: Some("snponly.efi".into()),
            efi_ia32: None,
            efi_arm64: None,
            efi_arm32: None,
        }
    }
}

impl IpxeBinaries {
    /// The binary for an architecture, if one is configured.
    pub fn for_arch(&self, arch: &ClientArch) -> Option<&str> {
        let slot = match (arch.firmware, arch.cpu) {
            (Firmware::Bios, Cpu::I386 | Cpu::X86_64) => &self.bios,
            (Firmware::Uefi, Cpu::X86_64) => &self.efi_x64,
            (Firmware::Uefi, Cpu::I386) => &self.efi_ia32,
            (Firmware::Uefi, Cpu::Arm64) => &self.efi_arm64,
            (Firmware::Uefi, Cpu::Arm32) => &self.efi_arm32,
            _ => return None,
        };
        slot.as_deref()
    }
}

/// The policy sections of the config file.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// iPXE binaries per architecture.
    #[serde(default)]
    pub ipxe: IpxeBinaries,
    /// `[[profile]]`: what can be booted.
    #[serde(default, rename = "profile")]
    pub profiles: Vec<ProfileConfig>,
    /// `[[group]]`: who boots which profile.
    #[serde(default, rename = "group")]
    pub groups: Vec<GroupConfig>,
    /// `[[machine]]`: known machines.
    #[serde(default, rename = "machine")]
    pub machines: Vec<MachineConfig>,
}

/// `[[profile]]`: a name plus exactly one way to boot (one group of the keys below).
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ProfileConfig {
    /// Unique name; `default` is used when nothing else matches.
    pub name: String,
    /// Linux kernel (with `initrd` and `cmdline`).
    pub kernel: Option<String>,
    /// Initrds for `kernel`.
    pub initrd: Vec<String>,
    /// Command line for `kernel`.
    pub cmdline: Option<String>,
    /// Literal iPXE script.
    pub script: Option<String>,
    /// Chain to a URL.
    pub chain: Option<String>,
    /// Menu entries.
    pub menu: Vec<MenuItemConfig>,
    /// Menu title.
    pub menu_title: Option<String>,
    /// Menu default profile.
    pub menu_default: Option<String>,
    /// Menu timeout in seconds.
    pub menu_timeout: Option<u32>,
    /// Menu password.
    pub menu_password: Option<String>,
    /// Disk or ISO image for `sanboot`.
    pub sanboot: Option<String>,
    /// Boot from local disk.
    pub local: Option<bool>,
    /// Non-iPXE boot program served by TFTP.
    pub nbp: Option<String>,
    /// Do not boot; the reason.
    pub ignore: Option<String>,
    /// One-shot: boot this profile until the booted OS reports this stage (e.g.
    /// `os.installed`), then boot locally. Remembered in `[server] state_dir`.
    pub one_shot: Option<String>,
    /// TFTP serves this profile's clients from this directory instead of `[server] root`
    /// (same confinement rules); the boot plan carries it to the TFTP server.
    pub tftp_root: Option<PathBuf>,
}

/// `menu = [{ label = "...", profile = "..." }]`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MenuItemConfig {
    /// Text shown.
    pub label: String,
    /// Profile booted.
    pub profile: String,
}

/// `[[group]]`: criteria that pick a profile.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct GroupConfig {
    /// Name shown in events ("why did X get Y").
    pub name: String,
    /// Profile for members.
    pub profile: String,
    /// All given criteria must match.
    #[serde(rename = "match", default)]
    pub matches: MatchSpec,
}

/// Criteria; each list matches if any entry matches, and every non-empty list must match.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct MatchSpec {
    /// MACs, exact (`52:54:00:12:34:56`) or a prefix of whole octets (`52:54:00`).
    pub mac: Vec<String>,
    /// System UUIDs (option 97), case-insensitive.
    pub uuid: Vec<String>,
    /// Architecture codes (option 93).
    pub arch: Vec<u16>,
    /// Vendor class prefixes (option 60), e.g. `PXEClient:Arch:00007`, `HTTPClient`.
    pub vendor_class: Vec<String>,
    /// User classes (option 77), e.g. `iPXE`.
    pub user_class: Vec<String>,
    /// Only iPXE (`true`) or only non-iPXE (`false`) clients.
    pub ipxe: Option<bool>,
    /// Relay addresses (giaddr).
    pub relay: Vec<Ipv4Addr>,
    /// Machine labels (from `[[machine]]`).
    pub labels: Vec<String>,
}

/// `[[machine]]`: one known machine.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    /// Its MAC.
    pub mac: MacAddr,
    /// Profile it always boots (wins over groups).
    #[serde(default)]
    pub profile: Option<String>,
    /// Free labels that groups match on.
    #[serde(default)]
    pub labels: Vec<String>,
    /// Hostname given to it.
    #[serde(default)]
    pub hostname: Option<String>,
}

/// A policy config that cannot be used, with where the problem is.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    /// Two profiles share a name.
    #[error("profile `{0}` is defined twice")]
    DuplicateProfile(String),
    /// A profile sets no way to boot, or several.
    #[error("profile `{name}`: {problem}")]
    BadProfile {
        /// Profile name.
        name: String,
        /// What is wrong.
        problem: String,
    },
    /// A reference to a profile that does not exist.
    #[error("{from} refers to profile `{profile}`, which is not defined")]
    UnknownProfile {
        /// The table of the entry that refers to it.
        table: &'static str,
        /// That entry's name (or MAC).
        key: String,
        /// Who refers to it.
        from: String,
        /// The missing name.
        profile: String,
    },
    /// A MAC match that is not hex octets.
    #[error("group `{group}`: `{mac}` is not a MAC address or a prefix of whole octets")]
    BadMacPattern {
        /// Group name.
        group: String,
        /// The pattern.
        mac: String,
    },
    /// An arch code the registry does not have.
    #[error("group `{group}`: architecture {code} is not in the IANA registry")]
    UnknownArch {
        /// Group name.
        group: String,
        /// The code.
        code: u16,
    },
    /// Two machine entries for one MAC.
    #[error("machine {0} is listed twice")]
    DuplicateMachine(MacAddr),
}

fn parse_mac_prefix(p: &str) -> Option<Vec<u8>> {
    let octets: Option<Vec<u8>> = p
        .split([':', '-'])
        .map(|o| {
            if o.len() == 2 {
                u8::from_str_radix(o, 16).ok()
            } else {
                None
            }
        })
        .collect();
    octets.filter(|o| !o.is_empty() && o.len() <= 6)
}

impl MatchSpec {
    /// `Some(specificity)` when every given criterion matches, `None` otherwise. Weights: an
    /// exact MAC or UUID names one machine (1000); a MAC prefix names a vendor or batch
    /// (100 + 10 per octet); labels are chosen by people (50 each); a relay names a network
    /// (20); arch, vendor class, user class and iPXE describe the firmware (10 each).
    pub fn score(&self, facts: &ClientFacts, labels: &[String]) -> Option<u32> {
        let mut score = 0u32;
        if !self.mac.is_empty() {
            let best = self
                .mac
                .iter()
                .filter_map(|p| parse_mac_prefix(p))
                .filter(|p| facts.mac.0.starts_with(p))
                .map(|p| {
                    if p.len() == 6 {
                        1000
                    } else {
                        100 + 10 * p.len() as u32
                    }
                })
                .max()?;
            score += best;
        }
        if !self.uuid.is_empty() {
            let uuid = facts.uuid.as_deref()?;
            self.uuid.iter().find(|u| u.eq_ignore_ascii_case(uuid))?;
            score += 1000;
        }
        if !self.labels.is_empty() {
            if !self.labels.iter().all(|l| labels.contains(l)) {
                return None;
            }
            score += 50 * self.labels.len() as u32;
        }
        if !self.relay.is_empty() {
            let relay = facts.relay?;
            self.relay.iter().find(|r| **r == relay)?;
            score += 20;
        }
        if !self.arch.is_empty() {
            let code = facts.arch_code.unwrap_or(0);
            let arch = ClientArch::from_code(code)?;
            // 7 and 9 both mean x64 UEFI in the field (firmware-quirks.md Q5).
            self.arch.iter().find(|a| {
                **a == code
                    || ClientArch::from_code(**a).is_some_and(|m| {
                        (m.firmware, m.cpu, m.http) == (arch.firmware, arch.cpu, arch.http)
                    })
            })?;
            score += 10;
        }
        if !self.vendor_class.is_empty() {
            let vc = facts.vendor_class.as_deref()?;
            self.vendor_class
                .iter()
                .find(|p| vc.starts_with(p.as_str()))?;
            score += 10;
        }
        if !self.user_class.is_empty() {
            self.user_class
                .iter()
                .find(|u| facts.user_class.iter().any(|c| c == *u))?;
            score += 10;
        }
        if let Some(want) = self.ipxe {
            if want != facts.is_ipxe {
                return None;
            }
            score += 10;
        }
        Some(score)
    }
}

impl ProfileConfig {
    fn into_target(self) -> Result<BootTarget, PolicyError> {
        let name = self.name.clone();
        let bad = |problem: &str| PolicyError::BadProfile {
            name: name.clone(),
            problem: problem.to_string(),
        };
        let mut chosen: Vec<&str> = Vec::new();
        if self.kernel.is_some() {
            chosen.push("kernel");
        }
        if self.script.is_some() {
            chosen.push("script");
        }
        if self.chain.is_some() {
            chosen.push("chain");
        }
        if !self.menu.is_empty() {
            chosen.push("menu");
        }
        if self.sanboot.is_some() {
            chosen.push("sanboot");
        }
        if self.local == Some(true) {
            chosen.push("local");
        }
        if self.nbp.is_some() {
            chosen.push("nbp");
        }
        if self.ignore.is_some() {
            chosen.push("ignore");
        }
        match chosen.len() {
            0 => {
                return Err(bad(
                    "sets no way to boot: give one of kernel, script, chain, menu, sanboot, local, nbp, ignore",
                ));
            }
            1 => {}
            _ => {
                return Err(bad(&format!(
                    "sets several ways to boot ({}); give exactly one",
                    chosen.join(", ")
                )));
            }
        }
        if self.kernel.is_none() && (!self.initrd.is_empty() || self.cmdline.is_some()) {
            return Err(bad("`initrd` and `cmdline` need `kernel`"));
        }
        if self.menu.is_empty()
            && (self.menu_title.is_some()
                || self.menu_default.is_some()
                || self.menu_timeout.is_some()
                || self.menu_password.is_some())
        {
            return Err(bad("`menu_*` keys need `menu`"));
        }
        Ok(if let Some(kernel) = self.kernel {
            BootTarget::Kernel {
                kernel,
                initrd: self.initrd,
                cmdline: self.cmdline.unwrap_or_default(),
            }
        } else if let Some(script) = self.script {
            BootTarget::Script { script }
        } else if let Some(url) = self.chain {
            BootTarget::Chain { url }
        } else if !self.menu.is_empty() {
            BootTarget::Menu {
                title: self.menu_title.unwrap_or_else(|| "pxed boot menu".into()),
                items: self
                    .menu
                    .into_iter()
                    .map(|i| MenuItem {
                        label: i.label,
                        profile: i.profile,
                    })
                    .collect(),
                default: self.menu_default,
                timeout_secs: self.menu_timeout.unwrap_or(0),
                password: self.menu_password,
            }
        } else if let Some(image) = self.sanboot {
            BootTarget::San { image }
        } else if let Some(file) = self.nbp {
            BootTarget::Nbp { file }
        } else if let Some(reason) = self.ignore {
            BootTarget::Ignore { reason }
        } else {
            BootTarget::Local
        })
    }
}

/// Every problem found in the policy sections, in file order of the checks.
#[derive(Debug, PartialEq, Eq)]
pub struct PolicyErrors(pub Vec<PolicyError>);

impl std::fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for PolicyErrors {}

impl PolicyError {
    /// The `[[table]]` entry the problem is in, as (table, key value): `("profile", name)`,
    /// `("group", name)` or `("machine", mac)`. Used to point at the entry's line.
    pub fn subject(&self) -> (&'static str, String) {
        match self {
            PolicyError::DuplicateProfile(name) => ("profile", name.clone()),
            PolicyError::BadProfile { name, .. } => ("profile", name.clone()),
            PolicyError::UnknownProfile { table, key, .. } => (table, key.clone()),
            PolicyError::BadMacPattern { group, .. } | PolicyError::UnknownArch { group, .. } => {
                ("group", group.clone())
            }
            PolicyError::DuplicateMachine(mac) => ("machine", mac.to_string()),
        }
    }
}

impl PolicyConfig {
    /// Check every cross-reference and turn the config into a [`Policy`]. Reports every
    /// problem, each with the name of the profile, group or machine it is in.
    pub fn validate(self) -> Result<Policy, PolicyErrors> {
        let mut errors = Vec::new();
        let mut names = HashSet::new();
        let mut profiles = Vec::new();
        let mut one_shot = Vec::new();
        let mut tftp_roots = Vec::new();
        for p in self.profiles {
            if !names.insert(p.name.clone()) {
                errors.push(PolicyError::DuplicateProfile(p.name));
                continue;
            }
            let name = p.name.clone();
            if let Some(stage) = &p.one_shot {
                let ok = !stage.is_empty()
                    && stage.len() <= MAX_STAGE_NAME
                    && stage
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
                if ok {
                    one_shot.push((name.clone(), stage.clone()));
                } else {
                    errors.push(PolicyError::BadProfile {
                        name: name.clone(),
                        problem: format!(
                            "one_shot `{stage}` is not a stage name (1-{MAX_STAGE_NAME} of [A-Za-z0-9._-])"
                        ),
                    });
                }
            }
            if let Some(root) = &p.tftp_root {
                if root.as_os_str().is_empty() {
                    errors.push(PolicyError::BadProfile {
                        name: name.clone(),
                        problem: "tftp_root is empty: give a directory, or leave it out to use \
                                  `[server] root`"
                            .into(),
                    });
                } else {
                    tftp_roots.push((name.clone(), root.clone()));
                }
            }
            match p.into_target() {
                Ok(target) => profiles.push((name, target)),
                Err(e) => errors.push(e),
            }
        }
        let mut known = |table: &'static str, key: &str, from: String, profile: &str| {
            if !names.contains(profile) {
                errors.push(PolicyError::UnknownProfile {
                    table,
                    key: key.to_string(),
                    from,
                    profile: profile.to_string(),
                });
            }
        };
        for (name, target) in &profiles {
            if let BootTarget::Menu { items, default, .. } = target {
                for item in items {
                    known(
                        "profile",
                        name,
                        format!("menu of profile `{name}`"),
                        &item.profile,
                    );
                }
                if let Some(d) = default {
                    known(
                        "profile",
                        name,
                        format!("menu default of profile `{name}`"),
                        d,
                    );
                }
            }
        }
        for g in &self.groups {
            known("group", &g.name, format!("group `{}`", g.name), &g.profile);
        }
        for m in &self.machines {
            if let Some(p) = &m.profile {
                known(
                    "machine",
                    &m.mac.to_string(),
                    format!("machine {}", m.mac),
                    p,
                );
            }
        }
        let mut macs = HashSet::new();
        for m in &self.machines {
            if !macs.insert(m.mac) {
                errors.push(PolicyError::DuplicateMachine(m.mac));
            }
        }
        for g in &self.groups {
            for m in &g.matches.mac {
                if parse_mac_prefix(m).is_none() {
                    errors.push(PolicyError::BadMacPattern {
                        group: g.name.clone(),
                        mac: m.clone(),
                    });
                }
            }
            for code in &g.matches.arch {
                if ClientArch::from_code(*code).is_none() {
                    errors.push(PolicyError::UnknownArch {
                        group: g.name.clone(),
                        code: *code,
                    });
                }
            }
        }
        if !errors.is_empty() {
            return Err(PolicyErrors(errors));
        }
        Ok(Policy {
            profiles,
            groups: self.groups,
            machines: self.machines,
            ipxe: self.ipxe,
            one_shot,
            tftp_roots,
        })
    }
}
