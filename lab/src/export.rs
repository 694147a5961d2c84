//! `pxelab export`: a prepared VM as an OVA that VirtualBox imports, and as libvirt XML.
//!
//! OVA layout (what VirtualBox's streaming reader expects): a ustar archive with the `.ovf`
//! first, then the `.mf` manifest (`SHA256(file)= hex`), then the disks in References order.
//! Disks are streamOptimized VMDK made by `qemu-img convert`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::images::tempdir_in;
use crate::machine::Firmware;
use crate::ovf::{ExportDisk, write_ovf, xml_escape};
use crate::payload::sha256_file;
use crate::vmdef::{BootDevice, LAB_NETWORK, VmFile, nic_model};

/// What one export wrote.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Exported {
    /// The OVA.
    pub ova: PathBuf,
    /// The libvirt domain XML.
    pub libvirt_xml: PathBuf,
    /// The disk libvirt uses (qcow2), if the VM has one.
    pub libvirt_disk: Option<PathBuf>,
}

/// Export `def` (with `disk`, a raw or qcow2 image, if it has one) into `out_dir`:
/// `<name>.ova`, `<name>.libvirt.xml` and for disks `<name>.qcow2`. Files appear complete or
/// not at all (written under temporary names, renamed at the end).
pub fn export_vm(def: &VmFile, disk: Option<&Path>, out_dir: &Path) -> Result<Exported> {
    def.validate()?;
    if def.disk.is_some() != disk.is_some() {
        bail!(
            "{}: a disk image is needed exactly when the definition has [disk]",
            def.vm.name
        );
    }
    std::fs::create_dir_all(out_dir)?;
    let out_dir = out_dir.canonicalize()?;
    let work = tempdir_in(&out_dir, "export")?;
    let name = &def.vm.name;
    let mut disks = Vec::new();
    let mut vmdks = Vec::new();
    let mut qcow = None;
    if let Some(src) = disk {
        let href = format!("{name}-disk1.vmdk");
        let vmdk = work.path.join(&href);
        crate::netns::run(
            Command::new("qemu-img")
                .args(["convert", "-O", "vmdk", "-o", "subformat=streamOptimized"])
                .arg(src)
                .arg(&vmdk),
        )
        .context("qemu-img convert (apt-get install qemu-utils)")?;
        let capacity = virtual_size(src)?;
        disks.push(ExportDisk {
            href: href.clone(),
            file_size: std::fs::metadata(&vmdk)?.len(),
            capacity,
        });
        vmdks.push((href, vmdk));
        let q = work.path.join(format!("{name}.qcow2"));
        crate::netns::run(
            Command::new("qemu-img")
                .args(["convert", "-O", "qcow2"])
                .arg(src)
                .arg(&q),
        )?;
        qcow = Some(q);
    }
    let ovf_name = format!("{name}.ovf");
    let ovf = write_ovf(def, &disks);
    let ovf_path = work.path.join(&ovf_name);
    std::fs::write(&ovf_path, &ovf)?;
    let mut mf = format!("SHA256({ovf_name})= {}\n", sha256_file(&ovf_path)?);
    for (href, path) in &vmdks {
        let _ = writeln!(mf, "SHA256({href})= {}", sha256_file(path)?);
    }
    let mf_name = format!("{name}.mf");
    let mf_path = work.path.join(&mf_name);
    std::fs::write(&mf_path, &mf)?;

    let ova_tmp = work.path.join(format!("{name}.ova"));
    {
        let f = std::fs::File::create(&ova_tmp)?;
        let mut tar = tar::Builder::new(f);
        let mut entries: Vec<(String, PathBuf)> = vec![(ovf_name, ovf_path), (mf_name, mf_path)];
        entries.extend(vmdks.iter().cloned());
        for (n, p) in entries {
            let mut h = tar::Header::new_ustar();
            h.set_size(std::fs::metadata(&p)?.len());
            h.set_mode(0o644);
            h.set_mtime(0);
            h.set_uid(0);
            h.set_gid(0);
            h.set_entry_type(tar::EntryType::Regular);
            let mut src = std::fs::File::open(&p)?;
            tar.append_data(&mut h, &n, &mut src)?;
        }
        tar.into_inner()?.sync_all()?;
    }

    let final_disk = qcow.as_ref().map(|_| out_dir.join(format!("{name}.qcow2")));
    let xml = libvirt_domain(def, final_disk.as_deref());
    let xml_tmp = work.path.join(format!("{name}.libvirt.xml"));
    std::fs::write(&xml_tmp, xml)?;
    std::fs::write(
        work.path.join(format!("{LAB_NETWORK}.network.xml")),
        libvirt_network(),
    )?;

    let ova = out_dir.join(format!("{name}.ova"));
    let libvirt_xml = out_dir.join(format!("{name}.libvirt.xml"));
    if let (Some(q), Some(d)) = (&qcow, &final_disk) {
        std::fs::rename(q, d)?;
    }
    std::fs::rename(&xml_tmp, &libvirt_xml)?;
    std::fs::rename(
        work.path.join(format!("{LAB_NETWORK}.network.xml")),
        out_dir.join(format!("{LAB_NETWORK}.network.xml")),
    )?;
    std::fs::rename(&ova_tmp, &ova)?;
    Ok(Exported {
        ova,
        libvirt_xml,
        libvirt_disk: final_disk,
    })
}

/// Export definition files (building the `pxe-server` disk with `pxed` when needed).
pub fn export_definitions(
    paths: &[PathBuf],
    out_dir: &Path,
    pxed: Option<&Path>,
) -> Result<Vec<Exported>> {
    let mut done = Vec::new();
    for p in paths {
        let def = VmFile::load(p)?;
        let disk = match def.disk.as_ref() {
            None => None,
            Some(d) if d.recipe.is_some() => {
                let pxed = crate::vmserver::resolve_binary(
                    pxed.map(Path::to_path_buf)
                        .or_else(|| std::env::var_os("PXELAB_PXED").map(PathBuf::from))
                        .unwrap_or_else(|| PathBuf::from("pxed")),
                )?;
                let cache = crate::payload::cache_dir();
                let payload = crate::payload::ensure_payload(&cache)?;
                Some(crate::images::ensure_server_image(&cache, &payload, &def, &pxed)?.disk)
            }
            Some(d) => d.path.clone(),
        };
        done.push(
            export_vm(&def, disk.as_deref(), out_dir)
                .with_context(|| format!("exporting {}", p.display()))?,
        );
    }
    Ok(done)
}

/// A disk image's virtual size in bytes (`qemu-img info`).
pub fn virtual_size(path: &Path) -> Result<u64> {
    let out = Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(path)
        .output()
        .context("running qemu-img info")?;
    if !out.status.success() {
        bail!(
            "qemu-img info {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    v.get("virtual-size")
        .and_then(|s| s.as_u64())
        .with_context(|| format!("qemu-img info {} gives no virtual-size", path.display()))
}

/// libvirt domain XML for `def` (TCG `qemu` domain; `disk` is the qcow2 it boots).
pub fn libvirt_domain(def: &VmFile, disk: Option<&Path>) -> String {
    let vm = &def.vm;
    let mut o = String::new();
    let _ = writeln!(o, "<domain type='qemu'>");
    let _ = writeln!(o, "  <name>{}</name>", xml_escape(&vm.name));
    if !vm.description.is_empty() {
        let _ = writeln!(
            o,
            "  <description>{}</description>",
            xml_escape(&vm.description)
        );
    }
    let _ = writeln!(o, "  <memory unit='MiB'>{}</memory>", vm.memory_mib);
    let _ = writeln!(o, "  <vcpu>{}</vcpu>", vm.cpus);
    match vm.firmware {
        Firmware::Seabios => o.push_str("  <os>\n    <type arch='x86_64' machine='pc'>hvm</type>\n  </os>\n"),
        Firmware::Ovmf => o.push_str("  <os firmware='efi'>\n    <type arch='x86_64' machine='q35'>hvm</type>\n    <firmware>\n      <feature enabled='no' name='secure-boot'/>\n    </firmware>\n  </os>\n"),
    }
    o.push_str("  <features>\n    <acpi/>\n    <apic/>\n  </features>\n  <devices>\n");
    let order = |d: BootDevice| vm.boot.iter().position(|b| *b == d).map(|p| p + 1);
    if let Some(d) = disk {
        let bus = if vm.firmware == Firmware::Ovmf {
            "sata"
        } else {
            "ide"
        };
        let _ = writeln!(
            o,
            "    <disk type='file' device='disk'>\n      <driver name='qemu' type='qcow2'/>\n      <source file='{}'/>\n      <target dev='sda' bus='{bus}'/>",
            xml_escape(&d.display().to_string())
        );
        if let Some(n) = order(BootDevice::Disk) {
            let _ = writeln!(o, "      <boot order='{n}'/>");
        }
        o.push_str("    </disk>\n");
    }
    for (i, n) in vm.nic.iter().enumerate() {
        let model = nic_model(&n.model).map(|m| m.libvirt).unwrap_or("e1000");
        let _ = writeln!(
            o,
            "    <interface type='network'>\n      <source network='{}'/>\n      <mac address='{}'/>\n      <model type='{model}'/>",
            xml_escape(&n.network),
            n.mac
        );
        if i == 0
            && let Some(b) = order(BootDevice::Network)
        {
            let _ = writeln!(o, "      <boot order='{b}'/>");
        }
        o.push_str("    </interface>\n");
    }
    o.push_str("    <serial type='pty'>\n      <target port='0'/>\n    </serial>\n    <console type='pty'>\n      <target type='serial' port='0'/>\n    </console>\n");
    // OVMF's network stack needs an RNG; harmless for BIOS.
    o.push_str("    <rng model='virtio'>\n      <backend model='random'>/dev/urandom</backend>\n    </rng>\n");
    o.push_str("  </devices>\n</domain>\n");
    o
}

/// The lab network for libvirt: isolated (no forward), and no `<ip>`/`<dhcp>`, so the server
/// VM is the only DHCP server on it.
pub fn libvirt_network() -> String {
    format!(
        "<network>\n  <name>{LAB_NETWORK}</name>\n  <bridge name='virbr-{LAB_NETWORK}' stp='off'/>\n</network>\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmdef::definitions_dir;

    #[test]
    fn libvirt_xml_boots_the_network_first() {
        let def = VmFile::load(&definitions_dir().join("pxe-client-uefi.toml")).unwrap();
        let x = libvirt_domain(&def, None);
        assert!(x.contains("<os firmware='efi'>"));
        assert!(x.contains("<mac address='08:00:27:77:01:11'/>"));
        assert!(x.contains("<model type='virtio'/>"));
        assert!(x.contains("<boot order='1'/>"));
        roxmltree::Document::parse(&x).unwrap();
        roxmltree::Document::parse(&libvirt_network()).unwrap();
    }
}
