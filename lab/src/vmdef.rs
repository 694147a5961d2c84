//! Prepared VM definitions (`vm-images/*.toml`): the hardware of a VM in a vocabulary that maps
//! onto QEMU, VirtualBox (OVF + `vbox:Machine`) and libvirt alike. Export writes them out,
//! import reads other people's VMs into them, the lab runs them.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use pxed::mac::MacAddr;
use serde::{Deserialize, Serialize};

use crate::machine::Firmware;

/// More vCPUs than this in a lab VM is a typo: the host has two cores.
pub const MAX_CPUS: u32 = 64;
/// Memory bounds in MiB: below 32 nothing boots, above 1 TiB is not a lab machine.
pub const MIN_MEMORY_MIB: u64 = 32;
pub const MAX_MEMORY_MIB: u64 = 1 << 20;
/// NICs per VM: VirtualBox has 8 adapter slots (36 with ICH9); more is not a real VM.
pub const MAX_NICS: usize = 36;
/// Disks per VM: far beyond any real appliance, small enough to refuse hostile files.
pub const MAX_DISKS: usize = 32;
/// The network every NIC joins: the lab switch in QEMU, an internal network in VirtualBox,
/// a libvirt network without DHCP.
pub const LAB_NETWORK: &str = "pxelab";

/// A VM definition file.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VmFile {
    /// The machine.
    pub vm: VmDef,
    /// Its disk, if it has one.
    pub disk: Option<DiskDef>,
    /// Server recipe parameters (`pxe-server` only).
    pub server: Option<ServerDef>,
}

/// The machine's hardware.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VmDef {
    /// Name (letters, digits, `-`, `_`).
    pub name: String,
    /// One line for humans.
    #[serde(default)]
    pub description: String,
    /// seabios (BIOS) or ovmf (UEFI).
    pub firmware: Firmware,
    /// vCPUs.
    pub cpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Boot order.
    pub boot: Vec<BootDevice>,
    /// NICs, in slot order.
    #[serde(default)]
    pub nic: Vec<NicDef>,
}

/// A boot device.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum BootDevice {
    /// PXE.
    Network,
    /// The first disk.
    Disk,
}

/// A NIC.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NicDef {
    /// Model in our vocabulary: e1000, e1000e, virtio, pcnet, rtl8139, vmxnet3.
    pub model: String,
    /// Fixed MAC (per-MAC boot records depend on it).
    pub mac: MacAddr,
    /// The network; lab VMs use [`LAB_NETWORK`].
    #[serde(default = "lab_network")]
    pub network: String,
}

fn lab_network() -> String {
    LAB_NETWORK.to_string()
}

/// A disk.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DiskDef {
    /// Built by a recipe (`pxe-server`).
    pub recipe: Option<String>,
    /// Or an existing image file (qcow2, raw, vmdk), relative to the definition.
    pub path: Option<PathBuf>,
}

/// The server recipe's parameters.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ServerDef {
    /// The static address.
    pub address: Ipv4Addr,
    /// Its prefix length.
    pub prefix_len: u8,
    /// pxed config template, relative to the definition.
    pub pxed_config: PathBuf,
}

/// A NIC model's names in each world.
pub struct NicModel {
    /// Ours.
    pub name: &'static str,
    /// QEMU `-device`.
    pub qemu: &'static str,
    /// VirtualBox `Adapter type`.
    pub vbox: &'static str,
    /// OVF `rasd:ResourceSubType`.
    pub ovf: &'static str,
    /// libvirt `<model type>`.
    pub libvirt: &'static str,
}

/// The NIC models the lab knows. VirtualBox has no e1000e, vmxnet3 or rtl8139: the closest
/// it has is named, so an export still imports.
pub const NIC_MODELS: &[NicModel] = &[
    NicModel {
        name: "e1000",
        qemu: "e1000",
        vbox: "82540EM",
        ovf: "E1000",
        libvirt: "e1000",
    },
    NicModel {
        name: "e1000e",
        qemu: "e1000e",
        vbox: "82545EM",
        ovf: "E1000e",
        libvirt: "e1000e",
    },
    NicModel {
        name: "virtio",
        qemu: "virtio-net-pci",
        vbox: "virtio",
        ovf: "VirtioNet",
        libvirt: "virtio",
    },
    NicModel {
        name: "pcnet",
        qemu: "pcnet",
        vbox: "Am79C973",
        ovf: "PCNet32",
        libvirt: "pcnet",
    },
    NicModel {
        name: "rtl8139",
        qemu: "rtl8139",
        vbox: "82540EM",
        ovf: "E1000",
        libvirt: "rtl8139",
    },
    NicModel {
        name: "vmxnet3",
        qemu: "vmxnet3",
        vbox: "82545EM",
        ovf: "VmxNet3",
        libvirt: "vmxnet3",
    },
];

/// Look up a NIC model by our name.
pub fn nic_model(name: &str) -> Option<&'static NicModel> {
    NIC_MODELS.iter().find(|m| m.name == name)
}

impl VmFile {
    /// Read and validate a definition; relative paths become relative to the file.
    pub fn load(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut def: VmFile =
            toml::from_str(&text).with_context(|| format!("in {}", path.display()))?;
        def.validate()
            .with_context(|| format!("in {}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        if let Some(s) = &mut def.server
            && s.pxed_config.is_relative()
        {
            s.pxed_config = base.join(&s.pxed_config);
        }
        if let Some(d) = &mut def.disk
            && let Some(p) = &d.path
            && p.is_relative()
        {
            d.path = Some(base.join(p));
        }
        Ok(def)
    }

    /// Check names, bounds and models.
    pub fn validate(&self) -> Result<()> {
        let vm = &self.vm;
        if vm.name.is_empty()
            || !vm
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            bail!("vm name `{}`: use letters, digits, - and _", vm.name);
        }
        if vm.cpus == 0 || vm.cpus > MAX_CPUS {
            bail!("cpus = {}: must be 1..={MAX_CPUS}", vm.cpus);
        }
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&vm.memory_mib) {
            bail!(
                "memory_mib = {}: must be {MIN_MEMORY_MIB}..={MAX_MEMORY_MIB}",
                vm.memory_mib
            );
        }
        if vm.nic.len() > MAX_NICS {
            bail!("{} NICs: at most {MAX_NICS}", vm.nic.len());
        }
        for n in &vm.nic {
            if nic_model(&n.model).is_none() {
                bail!(
                    "NIC model `{}`: known are {}",
                    n.model,
                    NIC_MODELS
                        .iter()
                        .map(|m| m.name)
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
        }
        if let Some(d) = &self.disk
            && d.recipe.is_some() == d.path.is_some()
        {
            bail!("[disk] needs exactly one of recipe or path");
        }
        if vm.boot.contains(&BootDevice::Disk) && self.disk.is_none() {
            bail!("boot order names the disk but there is no [disk]");
        }
        if vm.boot.contains(&BootDevice::Network) && vm.nic.is_empty() {
            bail!("boot order names the network but there is no NIC");
        }
        if let Some(d) = &self.disk
            && d.recipe.as_deref().is_some_and(|r| r != "pxe-server")
        {
            bail!("[disk] recipe: only `pxe-server` exists");
        }
        if self
            .disk
            .as_ref()
            .is_some_and(|d| d.recipe.as_deref() == Some("pxe-server"))
            && self.server.is_none()
        {
            bail!("the pxe-server recipe needs a [server] section");
        }
        Ok(())
    }
}

/// Where the shipped definitions are (the repository's `vm-images/`).
pub fn definitions_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new("."))
        .join("vm-images")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_definitions_load() {
        for name in ["pxe-server", "pxe-client-bios", "pxe-client-uefi"] {
            let def = VmFile::load(&definitions_dir().join(format!("{name}.toml"))).unwrap();
            assert_eq!(def.vm.name, name);
            assert_eq!(def.vm.nic.len(), 1);
        }
        let c = VmFile::load(&definitions_dir().join("pxe-client-uefi.toml")).unwrap();
        assert_eq!(c.vm.firmware, Firmware::Ovmf);
        assert_eq!(c.vm.boot, vec![BootDevice::Network]);
    }

    #[test]
    fn bounds_are_enforced() {
        let text = std::fs::read_to_string(definitions_dir().join("pxe-client-bios.toml")).unwrap();
        for (from, to) in [
            ("memory_mib = 512", "memory_mib = 4"),
            ("cpus = 1", "cpus = 0"),
            ("model = \"e1000\"", "model = \"tulip\""),
            ("boot = [\"network\"]", "boot = [\"disk\"]"),
        ] {
            let bad: VmFile = toml::from_str(&text.replace(from, to)).unwrap();
            assert!(bad.validate().is_err(), "{to} accepted");
        }
    }
}
