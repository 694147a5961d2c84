//! Boot policy: which machine boots what. [`plan`] is a pure function from what we know about a
//! client ([`ClientFacts`]) and the configured profiles, groups and machines ([`Policy`]) to a
//! [`BootPlan`]. "Why did host X get Y" is answered by calling it in a unit test.
//!
//! Matching: a `[[machine]]` entry that names a profile wins outright. Otherwise every
//! `[[group]]` whose criteria all match is scored by how specific its criteria are (see
//! [`MatchSpec::score`]); the highest score wins, ties go to the group written first. With no
//! match the profile named `default` applies; without one the client is ignored, with a reason.

pub mod arch;
mod config;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

pub use arch::{ClientArch, Cpu, Firmware};
pub use config::{
    GroupConfig, IpxeBinaries, MachineConfig, MatchSpec, MenuItemConfig, PolicyConfig, PolicyError,
    PolicyErrors, ProfileConfig,
};

use crate::mac::MacAddr;

/// What the server knows about a client when it decides (from DHCP options or HTTP query).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientFacts {
    /// Hardware address.
    pub mac: MacAddr,
    /// Option 93 (first entry), or the arch digits of option 60 when 93 is missing.
    pub arch_code: Option<u16>,
    /// Option 60 as sent.
    pub vendor_class: Option<String>,
    /// Option 77 entries (`iPXE` when the client is iPXE).
    pub user_class: Vec<String>,
    /// The client is iPXE (user class `iPXE` or option 175 present).
    pub is_ipxe: bool,
    /// Option 97 GUID, as text (`8-4-4-4-12`, lower case).
    pub uuid: Option<String>,
    /// The relay (giaddr) the request came through, if any.
    pub relay: Option<Ipv4Addr>,
}

/// What a machine's firmware said about itself in its last DHCP request that was not iPXE's:
/// the facts a boot loader that speaks only TFTP (pxelinux, GRUB) does not repeat when it asks
/// for its config file, so that the config is rendered for the same plan DHCP chose.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FirmwareFacts {
    /// Option 93 (or option 60's arch digits), as the DHCP engine used it.
    pub arch_code: Option<u16>,
    /// Option 60 as sent.
    pub vendor_class: Option<String>,
}

/// [`FirmwareFacts`] by MAC, kept by the DHCP engine for TFTP.
pub type FirmwareMemory = crate::mac::MacMemory<FirmwareFacts>;

impl ClientFacts {
    /// These facts with the firmware's own (architecture, vendor class) from `firmware`: for
    /// a request (a TFTP config file) that carries only the MAC.
    pub fn with_firmware(mut self, firmware: Option<FirmwareFacts>) -> Self {
        if let Some(f) = firmware {
            self.arch_code = f.arch_code;
            self.vendor_class = f.vendor_class;
        }
        self
    }

    /// The decoded architecture, or `None` when the code is missing or not in the registry.
    pub fn arch(&self) -> Option<ClientArch> {
        self.arch_code.and_then(ClientArch::from_code)
    }

    /// The client announced UEFI HTTP Boot (`HTTPClient` vendor class or an HTTP arch code).
    pub fn is_http_client(&self) -> bool {
        self.vendor_class
            .as_deref()
            .is_some_and(|v| v.starts_with("HTTPClient"))
            || self.arch().is_some_and(|a| a.http)
    }
}

/// What pxed remembers about a machine across boots, looked up by the caller (the policy does
/// no I/O): the one-shot stages it has reported. A profile with `one_shot = "<stage>"` boots
/// until the machine reports that stage, and from then on the machine boots locally.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BootState {
    /// One-shot stages reported by the booted OS (e.g. `os.installed`).
    pub reached: Vec<String>,
}

impl BootState {
    /// The machine has reported `stage`.
    pub fn has_reached(&self, stage: &str) -> bool {
        self.reached.iter().any(|s| s == stage)
    }
}

/// Where the server can be reached by the client being answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerAddrs {
    /// The server's address on the client's network. URLs use it, not a name: proxy clients
    /// get no DNS server.
    pub ip: Ipv4Addr,
    /// The HTTP port.
    pub http_port: u16,
}

impl ServerAddrs {
    /// The base URL of pxed's HTTP server for this client.
    pub fn http_base(&self) -> String {
        if self.http_port == 80 {
            format!("http://{}", self.ip)
        } else {
            format!("http://{}:{}", self.ip, self.http_port)
        }
    }

    /// The URL an iPXE client is sent to. The script there chains to the per-machine script,
    /// letting iPXE fill in its own MAC, UUID, platform and architecture.
    pub fn ipxe_entry_url(&self) -> String {
        format!("{}/boot.ipxe", self.http_base())
    }
}

/// A menu entry that boots another profile.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct MenuItem {
    /// What the user sees.
    pub label: String,
    /// The profile it boots.
    pub profile: String,
}

/// What a profile boots, once the client runs iPXE (or directly, for `Nbp`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum BootTarget {
    /// A Linux kernel with initrds and a command line. Paths are relative to the boot root
    /// (served over HTTP) or full URLs.
    Kernel {
        /// Kernel path or URL.
        kernel: String,
        /// Initrd paths or URLs, in order.
        initrd: Vec<String>,
        /// Kernel command line (without `initrd=`; the script adds it on UEFI).
        cmdline: String,
    },
    /// An iPXE script given literally in the config.
    Script {
        /// Script body (the `#!ipxe` line is added when missing).
        script: String,
    },
    /// Chain to another URL (an iPXE script or EFI program elsewhere).
    Chain {
        /// The URL.
        url: String,
    },
    /// An iPXE menu of other profiles.
    Menu {
        /// Menu title.
        title: String,
        /// Entries.
        items: Vec<MenuItem>,
        /// Profile booted when the timeout expires.
        default: Option<String>,
        /// Seconds before the default is taken (0 waits forever).
        timeout_secs: u32,
        /// Optional password asked before booting an entry.
        password: Option<String>,
    },
    /// A whole disk or ISO image booted with iPXE `sanboot` over HTTP.
    San {
        /// Image path or URL.
        image: String,
    },
    /// Boot from the next device (local disk).
    Local,
    /// A non-iPXE network bootstrap program (pxelinux.0, grubx64.efi, shim) handed to the
    /// firmware directly over TFTP.
    Nbp {
        /// Path in the TFTP root.
        file: String,
    },
    /// Do not boot this client over the network.
    Ignore {
        /// Why (reported in the event).
        reason: String,
    },
}

/// What goes into the DHCP reply for this client.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DhcpBoot {
    /// Load this file by TFTP from the server (header `siaddr`/`file`, options 66/67).
    Tftp {
        /// Path in the TFTP root.
        file: String,
    },
    /// Load this URL (iPXE script or UEFI HTTP Boot program).
    Http {
        /// Full URL.
        url: String,
    },
    /// Send no boot information: the client is not booted over the network by us.
    Nothing {
        /// Why.
        reason: String,
    },
}

/// The decision for one client.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct BootPlan {
    /// The profile chosen.
    pub profile: String,
    /// Why this profile (which machine entry or group matched, or the default).
    pub reason: String,
    /// What the profile boots.
    pub target: BootTarget,
    /// What the DHCP reply tells the client to load now.
    pub dhcp: DhcpBoot,
    /// Machine labels from the config.
    pub labels: Vec<String>,
    /// Hostname from the machine entry, if any.
    pub hostname: Option<String>,
    /// The profile's own TFTP root (`tftp_root`); `None`: the server's root.
    pub tftp_root: Option<PathBuf>,
}

/// The validated policy, built once from the config (see [`PolicyConfig::validate`]).
#[derive(Clone, Debug, Default)]
pub struct Policy {
    pub(crate) profiles: Vec<(String, BootTarget)>,
    pub(crate) groups: Vec<GroupConfig>,
    pub(crate) machines: Vec<MachineConfig>,
    pub(crate) ipxe: IpxeBinaries,
    /// Profile name to the stage that completes it (`one_shot`).
    pub(crate) one_shot: Vec<(String, String)>,
    /// Profile name to its own TFTP root (`tftp_root`).
    pub(crate) tftp_roots: Vec<(String, PathBuf)>,
}

impl Policy {
    /// The target of a profile by name.
    pub fn profile(&self, name: &str) -> Option<&BootTarget> {
        self.profiles
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t)
    }

    /// The machine entry for a MAC, if the config has one.
    pub fn machine(&self, mac: &MacAddr) -> Option<&MachineConfig> {
        self.machines.iter().find(|m| m.mac == *mac)
    }

    /// The stage that completes a one-shot profile, if the profile is one-shot.
    pub fn one_shot_stage(&self, profile: &str) -> Option<&str> {
        self.one_shot
            .iter()
            .find(|(n, _)| n == profile)
            .map(|(_, s)| s.as_str())
    }

    /// The TFTP root of a profile, if it names its own.
    pub fn tftp_root(&self, profile: &str) -> Option<&Path> {
        self.tftp_roots
            .iter()
            .find(|(n, _)| n == profile)
            .map(|(_, r)| r.as_path())
    }

    /// Every profile's own TFTP root (the server opens each once at start).
    pub fn tftp_roots(&self) -> impl Iterator<Item = (&str, &Path)> {
        self.tftp_roots
            .iter()
            .map(|(n, r)| (n.as_str(), r.as_path()))
    }

    /// Some one-shot profile is completed by `stage`: worth remembering when reported.
    pub fn is_one_shot_stage(&self, stage: &str) -> bool {
        self.one_shot.iter().any(|(_, s)| s == stage)
    }

    /// Some profile is one-shot (its state must be kept).
    pub fn has_one_shot(&self) -> bool {
        !self.one_shot.is_empty()
    }

    /// How many profiles are defined.
    pub fn profile_count(&self) -> usize {
        self.profiles.len()
    }

    /// How many groups are defined.
    pub fn group_count(&self) -> usize {
        self.groups.len()
    }

    /// How many machines are listed.
    pub fn machine_count(&self) -> usize {
        self.machines.len()
    }

    /// The iPXE binaries this policy hands to non-iPXE clients.
    pub fn ipxe_binaries(&self) -> &IpxeBinaries {
        &self.ipxe
    }
}

/// Choose the plan for one client. Pure: same inputs, same plan. DHCP, TFTP and HTTP all call
/// it with the machine's remembered `state`, so that they agree: a one-shot profile whose stage
/// is in `state` becomes [`BootTarget::Local`] everywhere (the profile name is kept, the reason
/// says why), and no path (DHCP boot file, TFTP loader config, iPXE script) sends a finished
/// machine back into its installer.
pub fn plan(
    policy: &Policy,
    facts: &ClientFacts,
    state: &BootState,
    server: &ServerAddrs,
) -> BootPlan {
    let machine = policy.machine(&facts.mac);
    let labels = machine.map(|m| m.labels.clone()).unwrap_or_default();
    let hostname = machine.and_then(|m| m.hostname.clone());

    let (profile, reason) = choose_profile(policy, facts, machine, &labels);
    let (target, reason) = match profile.as_deref() {
        Some(name) => match profile_target(policy, name, state) {
            Some((target, Some(done))) => (target, format!("{reason}; {done}")),
            Some((target, None)) => (target, reason),
            None => (
                BootTarget::Ignore {
                    reason: format!("profile `{name}` does not exist"),
                },
                reason,
            ),
        },
        None => (
            BootTarget::Ignore {
                reason: "no group matched and there is no `default` profile".into(),
            },
            reason,
        ),
    };
    let dhcp = dhcp_boot(policy, facts, server, &target);
    let tftp_root = profile
        .as_deref()
        .and_then(|p| policy.tftp_root(p))
        .map(Path::to_path_buf);
    BootPlan {
        tftp_root,
        profile: profile.unwrap_or_else(|| "-".into()),
        reason,
        target,
        dhcp,
        labels,
        hostname,
    }
}

/// What profile `name` boots for a machine in `state`: its target, or [`BootTarget::Local`]
/// when it is one-shot and done, with the reason for that (`None` when the profile boots as
/// configured). `None` when there is no such profile. Used by [`plan`] and by the HTTP side
/// when a client picks a profile from a menu.
pub fn profile_target(
    policy: &Policy,
    name: &str,
    state: &BootState,
) -> Option<(BootTarget, Option<String>)> {
    let target = policy.profile(name)?;
    match policy.one_shot_stage(name) {
        Some(stage) if state.has_reached(stage) => Some((
            BootTarget::Local,
            Some(format!(
                "one-shot, done ({stage} reported): booting locally"
            )),
        )),
        _ => Some((target.clone(), None)),
    }
}

fn choose_profile(
    policy: &Policy,
    facts: &ClientFacts,
    machine: Option<&MachineConfig>,
    labels: &[String],
) -> (Option<String>, String) {
    if let Some(m) = machine
        && let Some(p) = &m.profile
    {
        return (Some(p.clone()), format!("machine entry {}", m.mac));
    }
    let mut best: Option<(u32, &GroupConfig)> = None;
    for group in &policy.groups {
        if let Some(score) = group.matches.score(facts, labels)
            && best.is_none_or(|(s, _)| score > s)
        {
            best = Some((score, group));
        }
    }
    if let Some((score, group)) = best {
        return (
            Some(group.profile.clone()),
            format!("group `{}` matched (specificity {score})", group.name),
        );
    }
    if policy.profile("default").is_some() {
        (Some("default".into()), "default profile".into())
    } else {
        (None, "no match".into())
    }
}

/// The DHCP-level decision: break the chainload loop by giving non-iPXE clients the iPXE
/// binary for their architecture and iPXE clients the URL of their script.
fn dhcp_boot(
    policy: &Policy,
    facts: &ClientFacts,
    server: &ServerAddrs,
    target: &BootTarget,
) -> DhcpBoot {
    match target {
        BootTarget::Ignore { reason } => {
            return DhcpBoot::Nothing {
                reason: reason.clone(),
            };
        }
        BootTarget::Nbp { file } if !facts.is_ipxe => {
            return DhcpBoot::Tftp { file: file.clone() };
        }
        _ => {}
    }
    if facts.is_ipxe {
        return DhcpBoot::Http {
            url: server.ipxe_entry_url(),
        };
    }
    // RFC 4578 leaves a missing option 93 undefined; iPXE's maintainers advise BIOS.
    let arch = match facts.arch_code {
        None => ClientArch::bios(),
        Some(code) => match ClientArch::from_code(code) {
            Some(a) => a,
            None => {
                return DhcpBoot::Nothing {
                    reason: format!("client architecture {code} is not in the IANA registry"),
                };
            }
        },
    };
    let Some(binary) = policy.ipxe.for_arch(&arch) else {
        return DhcpBoot::Nothing {
            reason: format!("no iPXE binary configured for architecture {arch}"),
        };
    };
    if facts.is_http_client() {
        DhcpBoot::Http {
            url: format!("{}/{}", server.http_base(), binary.trim_start_matches('/')),
        }
    } else {
        DhcpBoot::Tftp {
            file: binary.to_string(),
        }
    }
}

#[cfg(test)]
mod tests;
