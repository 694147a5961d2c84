//! OVF descriptors: writing a VirtualBox-importable OVF 1.0 envelope for a lab VM, and reading
//! VirtualBox and VMware exports (OVF 1.0 and 2.0) into a lab VM definition.
//!
//! The writer follows what VirtualBox's own exporter writes (`virtualbox-2.2` system type,
//! `MegaBytes` memory, `/disk/<id>` host resources, a PIIX4 IDE controller) and adds the
//! `vbox:Machine` block, the only place VirtualBox reads MAC addresses, the internal-network
//! name, the boot order and the firmware from.
//!
//! The reader is namespace-aware (roxmltree): an undeclared prefix is an XML error. It never
//! panics on hostile input; every refusal names the element and the reason ([`OvfError`]).

use std::collections::HashMap;
use std::fmt::Write as _;

use pxed::mac::MacAddr;
use roxmltree::{Document, Node};
use sha2::{Digest, Sha256};

use crate::machine::Firmware;
use crate::vmdef::{
    BootDevice, LAB_NETWORK, MAX_CPUS, MAX_DISKS, MAX_MEMORY_MIB, MAX_NICS, MIN_MEMORY_MIB, VmFile,
    nic_model,
};

/// OVF namespaces (DSP0243).
pub const NS_OVF1: &str = "http://schemas.dmtf.org/ovf/envelope/1";
pub const NS_OVF2: &str = "http://schemas.dmtf.org/ovf/envelope/2";
pub const NS_OVF09: &str = "http://www.vmware.com/schema/ovf/1/envelope";
pub const NS_RASD: &str =
    "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData";
pub const NS_VSSD: &str =
    "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData";
pub const NS_VBOX: &str = "http://www.virtualbox.org/ovf/machine";
pub const NS_VMW: &str = "http://www.vmware.com/schema/ovf";
/// The disk format VirtualBox exports and imports.
pub const VMDK_STREAM: &str =
    "http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized";
/// A descriptor larger than this is refused: real ones are 5-15 KB.
pub const MAX_OVF_BYTES: usize = 4 << 20;
/// A disk larger than this is refused as absurd (64 TiB, VMDK's own limit is near it).
pub const MAX_DISK_BYTES: u64 = 64 << 40;
/// Hardware items per VM beyond which the file is refused (hostile repetition).
pub const MAX_ITEMS: usize = 1024;
/// The settings version we write: VirtualBox 5.1's format, which 5.1 to 7.x all read.
pub const VBOX_SETTINGS_VERSION: &str = "1.16-linux";

/// A refusal: which element, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{element}: {reason}")]
pub struct OvfError {
    /// The element (with its attribute when that is the culprit).
    pub element: String,
    /// Why.
    pub reason: String,
}

fn err(element: impl Into<String>, reason: impl Into<String>) -> OvfError {
    OvfError {
        element: element.into(),
        reason: reason.into(),
    }
}

/// A disk to write into a descriptor.
#[derive(Clone, Debug)]
pub struct ExportDisk {
    /// The file name inside the OVA.
    pub href: String,
    /// The file's size in bytes.
    pub file_size: u64,
    /// The virtual disk's capacity in bytes.
    pub capacity: u64,
}

/// A name-derived UUID (version 4 layout, fixed per name so exports are reproducible).
pub fn stable_uuid(seed: &str) -> String {
    let h = Sha256::digest(seed.as_bytes());
    let mut b = [0u8; 16];
    b.copy_from_slice(h.get(..16).unwrap_or(&[0u8; 16]));
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// Escape text for XML content and attribute values. XML 1.0 section 2.2 (`Char`) has no way
/// to carry other control characters, U+FFFE or U+FFFF, even escaped: they become U+FFFD, or
/// the descriptor is not XML at all (found by fuzzing: a description holding `\u{e}` gave an
/// OVF no reader accepts). Tab, LF and CR are written as character references, which survive
/// attribute-value normalisation (section 3.3.3) and line-end handling (section 2.11).
pub fn xml_escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&apos;"),
            '\t' => o.push_str("&#x9;"),
            '\n' => o.push_str("&#xA;"),
            '\r' => o.push_str("&#xD;"),
            '\u{0}'..='\u{1f}' | '\u{fffe}' | '\u{ffff}' => o.push('\u{fffd}'),
            c => o.push(c),
        }
    }
    o
}

/// The OVF 1.0 descriptor for `def` with `disks` (in attachment order).
pub fn write_ovf(def: &VmFile, disks: &[ExportDisk]) -> String {
    let vm = &def.vm;
    let name = xml_escape(&vm.name);
    let mut o = String::new();
    let _ = writeln!(o, r#"<?xml version="1.0"?>"#);
    let _ = writeln!(
        o,
        r#"<Envelope ovf:version="1.0" xml:lang="en-US" xmlns="{NS_OVF1}" xmlns:ovf="{NS_OVF1}" xmlns:rasd="{NS_RASD}" xmlns:vssd="{NS_VSSD}" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xmlns:vbox="{NS_VBOX}">"#
    );
    o.push_str("  <References>\n");
    for (i, d) in disks.iter().enumerate() {
        let _ = writeln!(
            o,
            r#"    <File ovf:id="file{}" ovf:href="{}" ovf:size="{}"/>"#,
            i + 1,
            xml_escape(&d.href),
            d.file_size
        );
    }
    o.push_str("  </References>\n");
    o.push_str("  <DiskSection>\n    <Info>List of the virtual disks used in the package</Info>\n");
    for (i, d) in disks.iter().enumerate() {
        let _ = writeln!(
            o,
            r#"    <Disk ovf:capacity="{}" ovf:diskId="vmdisk{n}" ovf:fileRef="file{n}" ovf:format="{VMDK_STREAM}" vbox:uuid="{}"/>"#,
            d.capacity,
            stable_uuid(&format!("{}/disk{}", vm.name, i + 1)),
            n = i + 1
        );
    }
    o.push_str("  </DiskSection>\n");
    let _ = writeln!(
        o,
        "  <NetworkSection>\n    <Info>Logical networks used in the package</Info>\n    <Network ovf:name=\"{LAB_NETWORK}\">\n      <Description>The pxelab lab network (a VirtualBox internal network, no DHCP but the lab's)</Description>\n    </Network>\n  </NetworkSection>"
    );
    let _ = writeln!(o, r#"  <VirtualSystem ovf:id="{name}">"#);
    o.push_str("    <Info>A virtual machine</Info>\n");
    if !vm.description.is_empty() {
        let _ = writeln!(
            o,
            "    <AnnotationSection>\n      <Info>A human-readable annotation</Info>\n      <Annotation>{}</Annotation>\n    </AnnotationSection>",
            xml_escape(&vm.description)
        );
    }
    // CIM OS 101 = "Linux 64-Bit"; a diskless client runs whatever it boots.
    o.push_str("    <OperatingSystemSection ovf:id=\"101\">\n      <Info>The kind of installed guest operating system</Info>\n      <Description>Linux_64</Description>\n      <vbox:OSType ovf:required=\"false\">Linux_64</vbox:OSType>\n    </OperatingSystemSection>\n");
    o.push_str("    <VirtualHardwareSection>\n      <Info>Virtual hardware requirements for a virtual machine</Info>\n");
    let _ = writeln!(
        o,
        "      <System>\n        <vssd:ElementName>Virtual Hardware Family</vssd:ElementName>\n        <vssd:InstanceID>0</vssd:InstanceID>\n        <vssd:VirtualSystemIdentifier>{name}</vssd:VirtualSystemIdentifier>\n        <vssd:VirtualSystemType>virtualbox-2.2</vssd:VirtualSystemType>\n      </System>"
    );
    let mut id = 1;
    let mut item = |o: &mut String, fields: &[(&str, String)]| {
        o.push_str("      <Item>\n");
        // rasd elements in the schema's (alphabetical) order, InstanceID included.
        let mut all: Vec<(&str, String)> = fields.to_vec();
        all.push(("InstanceID", id.to_string()));
        all.sort_by(|a, b| a.0.cmp(b.0));
        for (k, v) in all {
            let _ = writeln!(o, "        <rasd:{k}>{}</rasd:{k}>", xml_escape(&v));
        }
        o.push_str("      </Item>\n");
        id += 1;
        id - 1
    };
    item(
        &mut o,
        &[
            ("Caption", format!("{} virtual CPU", vm.cpus)),
            ("Description", "Number of virtual CPUs".into()),
            ("ElementName", format!("{} virtual CPU", vm.cpus)),
            ("ResourceType", "3".into()),
            ("VirtualQuantity", vm.cpus.to_string()),
        ],
    );
    item(
        &mut o,
        &[
            ("AllocationUnits", "MegaBytes".into()),
            ("Caption", format!("{} MB of memory", vm.memory_mib)),
            ("Description", "Memory Size".into()),
            ("ElementName", format!("{} MB of memory", vm.memory_mib)),
            ("ResourceType", "4".into()),
            ("VirtualQuantity", vm.memory_mib.to_string()),
        ],
    );
    let ide = item(
        &mut o,
        &[
            ("Address", "0".into()),
            ("Caption", "ideController0".into()),
            ("Description", "IDE Controller".into()),
            ("ElementName", "ideController0".into()),
            ("ResourceSubType", "PIIX4".into()),
            ("ResourceType", "5".into()),
        ],
    );
    for (i, _) in disks.iter().enumerate() {
        item(
            &mut o,
            &[
                ("AddressOnParent", i.to_string()),
                ("Caption", format!("disk{}", i + 1)),
                ("Description", "Disk Image".into()),
                ("ElementName", format!("disk{}", i + 1)),
                ("HostResource", format!("/disk/vmdisk{}", i + 1)),
                ("Parent", ide.to_string()),
                ("ResourceType", "17".into()),
            ],
        );
    }
    for n in &vm.nic {
        let m = nic_model(&n.model);
        item(
            &mut o,
            &[
                ("AutomaticAllocation", "true".into()),
                ("Caption", format!("Ethernet adapter on '{}'", n.network)),
                ("Connection", n.network.clone()),
                (
                    "ElementName",
                    format!("Ethernet adapter on '{}'", n.network),
                ),
                (
                    "ResourceSubType",
                    m.map(|m| m.ovf).unwrap_or("E1000").into(),
                ),
                ("ResourceType", "10".into()),
            ],
        );
    }
    o.push_str("    </VirtualHardwareSection>\n");
    let _ = writeln!(
        o,
        r#"    <vbox:Machine ovf:required="false" version="{VBOX_SETTINGS_VERSION}" uuid="{{{}}}" name="{name}" OSType="Linux_64" snapshotFolder="Snapshots">"#,
        stable_uuid(&format!("{}/machine", vm.name))
    );
    o.push_str("      <ovf:Info>Complete VirtualBox machine configuration in VirtualBox format</ovf:Info>\n      <Hardware>\n");
    let _ = writeln!(
        o,
        "        <CPU count=\"{}\">\n          <PAE enabled=\"true\"/>\n          <LongMode enabled=\"true\"/>\n        </CPU>",
        vm.cpus
    );
    let _ = writeln!(o, "        <Memory RAMSize=\"{}\"/>", vm.memory_mib);
    if vm.firmware == Firmware::Ovmf {
        o.push_str("        <Firmware type=\"EFI\"/>\n");
    }
    o.push_str("        <Boot>\n");
    for pos in 1..=4 {
        let dev = match vm.boot.get(pos - 1) {
            Some(BootDevice::Network) => "Network",
            Some(BootDevice::Disk) => "HardDisk",
            None => "None",
        };
        let _ = writeln!(o, "          <Order position=\"{pos}\" device=\"{dev}\"/>");
    }
    o.push_str("        </Boot>\n        <Display VRAMSize=\"16\"/>\n        <BIOS>\n          <IOAPIC enabled=\"true\"/>\n        </BIOS>\n        <Network>\n");
    for (slot, n) in vm.nic.iter().enumerate() {
        let m = nic_model(&n.model);
        let _ = writeln!(
            o,
            "          <Adapter slot=\"{slot}\" enabled=\"true\" MACAddress=\"{}\" type=\"{}\">\n            <InternalNetwork name=\"{}\"/>\n          </Adapter>",
            mac_vbox(&n.mac),
            m.map(|m| m.vbox).unwrap_or("82540EM"),
            xml_escape(&n.network)
        );
    }
    o.push_str("        </Network>\n");
    // The serial port the lab reads; in VirtualBox it is there to attach a file or pipe.
    o.push_str("        <UART>\n          <Port slot=\"0\" enabled=\"true\" IOBase=\"0x3f8\" IRQ=\"4\" hostMode=\"Disconnected\"/>\n        </UART>\n");
    o.push_str("      </Hardware>\n");
    if !disks.is_empty() {
        o.push_str("      <StorageControllers>\n        <StorageController name=\"IDE Controller\" type=\"PIIX4\" PortCount=\"2\" useHostIOCache=\"true\" Bootable=\"true\">\n");
        for (i, _) in disks.iter().enumerate() {
            let _ = writeln!(
                o,
                "          <AttachedDevice type=\"HardDisk\" hotpluggable=\"false\" port=\"{}\" device=\"{}\">\n            <Image uuid=\"{{{}}}\"/>\n          </AttachedDevice>",
                i / 2,
                i % 2,
                stable_uuid(&format!("{}/disk{}", vm.name, i + 1))
            );
        }
        o.push_str("        </StorageController>\n      </StorageControllers>\n");
    }
    o.push_str("    </vbox:Machine>\n  </VirtualSystem>\n</Envelope>\n");
    o
}

/// `08:00:27:77:01:01` -> `080027770101` (VirtualBox's spelling).
pub fn mac_vbox(mac: &MacAddr) -> String {
    mac.0.iter().map(|b| format!("{b:02X}")).collect()
}

/// OVF version of a descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum OvfVersion {
    /// `.../envelope/1`.
    V1,
    /// `.../envelope/2`.
    V2,
}

/// A NIC as the file describes it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct OvfNic {
    /// Our model name (see [`crate::vmdef::NIC_MODELS`]).
    pub model: String,
    /// The model as written.
    pub original_model: String,
    /// The MAC, when the file has one.
    pub mac: Option<MacAddr>,
    /// NAT, Bridged, HostOnly, Internal, Generic, or a VMware network name.
    pub attachment: String,
    /// The bridged host interface or internal network name, when given.
    pub attachment_name: Option<String>,
}

/// A disk the VM uses.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct OvfDisk {
    /// DiskSection diskId.
    pub disk_id: String,
    /// The file (References/File href).
    pub href: String,
    /// The size References says the file has.
    pub file_size: Option<u64>,
    /// Capacity in bytes.
    pub capacity: u64,
    /// ovf:format.
    pub format: String,
}

/// What we read from a descriptor.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct OvfMachine {
    /// The VirtualSystem id (or vbox:Machine name).
    pub name: String,
    /// 1.0 or 2.0.
    pub version: OvfVersion,
    /// vCPUs.
    pub cpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// BIOS or EFI.
    pub firmware: Firmware,
    /// Boot order, when the file has one (VirtualBox's; VMware's is not portable).
    pub boot: Vec<BootDevice>,
    /// NICs in slot order.
    pub nics: Vec<OvfNic>,
    /// Hard disks in the order their items appear.
    pub disks: Vec<OvfDisk>,
    /// Whether a `vbox:Machine` block was read.
    pub vbox_machine: bool,
    /// Things the import changes or ignores, for the user.
    pub warnings: Vec<String>,
}

fn attr<'a>(n: &Node<'a, '_>, ns: &str, name: &str) -> Option<&'a str> {
    n.attribute((ns, name))
}

/// `ovf:` attribute in either OVF namespace, or unqualified (some writers drop the prefix).
fn ovf_attr<'a>(n: &Node<'a, '_>, name: &str) -> Option<&'a str> {
    attr(n, NS_OVF1, name)
        .or_else(|| attr(n, NS_OVF2, name))
        .or_else(|| n.attribute(name))
}

fn local_children<'a, 'i>(
    n: Node<'a, 'i>,
    name: &'static str,
) -> impl Iterator<Item = Node<'a, 'i>> {
    n.children()
        .filter(move |c| c.is_element() && c.tag_name().name() == name)
}

fn child_text<'a>(n: Node<'a, '_>, name: &str) -> Option<&'a str> {
    n.children()
        .find(|c| c.is_element() && c.tag_name().name() == name)
        .and_then(|c| c.text())
        .map(str::trim)
}

fn parse_u64(element: &str, value: &str) -> Result<u64, OvfError> {
    value
        .trim()
        .parse::<u64>()
        .map_err(|_| err(element, format!("`{value}` is not a whole number")))
}

/// Bytes per unit for `AllocationUnits` / `capacityAllocationUnits`: `byte`, `byte * 2^N`,
/// `MegaBytes`, `MB`, `GigaBytes`, `GB`, `KiloBytes`, `KB` (DSP0004 programmatic units).
pub fn unit_bytes(element: &str, unit: &str) -> Result<u64, OvfError> {
    let u: String = unit.chars().filter(|c| !c.is_whitespace()).collect();
    let lower = u.to_ascii_lowercase();
    let known = match lower.as_str() {
        "byte" | "bytes" | "b" => Some(1),
        "kilobytes" | "kb" | "kib" => Some(1 << 10),
        "megabytes" | "mb" | "mib" => Some(1 << 20),
        "gigabytes" | "gb" | "gib" => Some(1 << 30),
        "terabytes" | "tb" | "tib" => Some(1u64 << 40),
        _ => None,
    };
    if let Some(k) = known {
        return Ok(k);
    }
    if let Some(exp) = lower.strip_prefix("byte*2^") {
        let e: u32 = exp
            .parse()
            .map_err(|_| err(element, format!("unit `{unit}`: bad exponent")))?;
        if e > 50 {
            return Err(err(element, format!("unit `{unit}`: absurd exponent")));
        }
        return Ok(1u64 << e);
    }
    Err(err(element, format!("unknown allocation unit `{unit}`")))
}

/// Map a VirtualBox adapter type or OVF ResourceSubType to our NIC model.
pub fn map_nic_model(original: &str) -> Option<&'static str> {
    let o = original.trim().to_ascii_lowercase();
    Some(match o.as_str() {
        "e1000" | "82540em" | "82543gc" | "82545em" => "e1000",
        "e1000e" => "e1000e",
        "virtio" | "virtionet" | "virtio-net" | "3" => "virtio",
        "pcnet32" | "am79c970a" | "am79c973" | "am79c960" | "pcnet" | "pcnetpci" => "pcnet",
        "vmxnet3" | "vmxnet" | "vmxnet2" => "vmxnet3",
        "rtl8139" => "rtl8139",
        _ => return None,
    })
}

/// Parse a descriptor. Every refusal names the element and the reason.
pub fn parse_ovf(bytes: &[u8]) -> Result<OvfMachine, OvfError> {
    if bytes.len() > MAX_OVF_BYTES {
        return Err(err(
            "descriptor",
            format!(
                "{} bytes, more than the {MAX_OVF_BYTES} a descriptor may have",
                bytes.len()
            ),
        ));
    }
    let text =
        std::str::from_utf8(bytes).map_err(|e| err("descriptor", format!("not UTF-8: {e}")))?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let opts = roxmltree::ParsingOptions {
        allow_dtd: false,
        nodes_limit: 200_000,
        ..Default::default()
    };
    let doc = Document::parse_with_options(text, opts)
        .map_err(|e| err("descriptor", format!("not well-formed XML: {e}")))?;
    let root = doc.root_element();
    if root.tag_name().name() != "Envelope" {
        return Err(err(
            root.tag_name().name(),
            "the root element must be Envelope",
        ));
    }
    let version = match root.tag_name().namespace() {
        Some(NS_OVF1) => OvfVersion::V1,
        Some(NS_OVF2) => OvfVersion::V2,
        Some(NS_OVF09) => {
            return Err(err(
                "Envelope",
                "OVF 0.9 (VMware's pre-standard namespace) is not supported: re-export as OVF 1.0",
            ));
        }
        other => {
            return Err(err(
                "Envelope",
                format!("namespace {other:?} is neither OVF 1.0 nor 2.0"),
            ));
        }
    };
    let mut warnings = Vec::new();

    // References: file id -> (href, size).
    let mut files: HashMap<&str, (&str, Option<u64>)> = HashMap::new();
    for refs in local_children(root, "References") {
        for f in local_children(refs, "File") {
            let id = ovf_attr(&f, "id").ok_or_else(|| err("References/File", "no ovf:id"))?;
            let href = ovf_attr(&f, "href")
                .ok_or_else(|| err(format!("References/File {id}"), "no ovf:href"))?;
            let size = match ovf_attr(&f, "size") {
                Some(s) => Some(parse_u64(&format!("References/File {id} ovf:size"), s)?),
                None => None,
            };
            if files.len() >= MAX_ITEMS {
                return Err(err("References", "too many files"));
            }
            files.insert(id, (href, size));
        }
    }
    // DiskSection: disk id -> disk.
    let mut disk_defs: HashMap<&str, OvfDisk> = HashMap::new();
    for sec in local_children(root, "DiskSection") {
        for d in local_children(sec, "Disk") {
            let id =
                ovf_attr(&d, "diskId").ok_or_else(|| err("DiskSection/Disk", "no ovf:diskId"))?;
            let el = format!("DiskSection/Disk {id}");
            let cap_s = ovf_attr(&d, "capacity").ok_or_else(|| err(&el, "no ovf:capacity"))?;
            let cap = parse_u64(&format!("{el} ovf:capacity"), cap_s)?;
            let unit = match ovf_attr(&d, "capacityAllocationUnits") {
                Some(u) => unit_bytes(&format!("{el} ovf:capacityAllocationUnits"), u)?,
                None => 1,
            };
            let capacity = cap
                .checked_mul(unit)
                .filter(|c| *c <= MAX_DISK_BYTES)
                .ok_or_else(|| {
                    err(
                        format!("{el} ovf:capacity"),
                        format!("{cap_s} x {unit} bytes is absurd (limit {MAX_DISK_BYTES} bytes)"),
                    )
                })?;
            let file_ref = ovf_attr(&d, "fileRef").ok_or_else(|| {
                err(
                    &el,
                    "no ovf:fileRef: an empty disk to create is not supported",
                )
            })?;
            let (href, file_size) = files.get(file_ref).copied().ok_or_else(|| {
                err(
                    format!("{el} ovf:fileRef"),
                    format!("`{file_ref}` is not in References"),
                )
            })?;
            let format = ovf_attr(&d, "format").unwrap_or_default().to_string();
            if !format.to_ascii_lowercase().contains("vmdk") && !format.is_empty() {
                return Err(err(
                    format!("{el} ovf:format"),
                    format!("`{format}`: only VMDK disks are imported"),
                ));
            }
            disk_defs.insert(
                id,
                OvfDisk {
                    disk_id: id.to_string(),
                    href: href.to_string(),
                    file_size,
                    capacity,
                    format,
                },
            );
        }
    }

    let vs = match root.children().find(|c| {
        c.is_element()
            && matches!(
                c.tag_name().name(),
                "VirtualSystem" | "VirtualSystemCollection"
            )
    }) {
        Some(v) if v.tag_name().name() == "VirtualSystem" => v,
        Some(_) => {
            return Err(err(
                "VirtualSystemCollection",
                "several VMs in one appliance: import them one at a time (not supported)",
            ));
        }
        None => return Err(err("Envelope", "no VirtualSystem")),
    };
    let vs_id = ovf_attr(&vs, "id").unwrap_or("imported").to_string();
    if local_children(vs, "OperatingSystemSection")
        .next()
        .is_some_and(|os| ovf_attr(&os, "id").is_none())
    {
        return Err(err(
            "OperatingSystemSection",
            "no ovf:id (VirtualBox refuses such files too)",
        ));
    }
    let hw = local_children(vs, "VirtualHardwareSection")
        .next()
        .ok_or_else(|| err("VirtualSystem", "no VirtualHardwareSection"))?;

    let mut cpus: Option<u32> = None;
    let mut memory_mib: Option<u64> = None;
    let mut nics: Vec<OvfNic> = Vec::new();
    let mut disks: Vec<OvfDisk> = Vec::new();
    let mut firmware = Firmware::Seabios;
    let items: Vec<Node> = hw
        .children()
        .filter(|c| {
            c.is_element()
                && matches!(
                    c.tag_name().name(),
                    "Item" | "StorageItem" | "EthernetPortItem"
                )
        })
        .collect();
    if items.len() > MAX_ITEMS {
        return Err(err(
            "VirtualHardwareSection",
            format!("more than {MAX_ITEMS} items"),
        ));
    }
    for it in &items {
        let iid = child_text(*it, "InstanceID").unwrap_or("?");
        let el = format!("{} {iid}", it.tag_name().name());
        let Some(rt) = child_text(*it, "ResourceType") else {
            warnings.push(format!("{el}: no ResourceType, ignored"));
            continue;
        };
        match rt {
            "3" => {
                let q = child_text(*it, "VirtualQuantity")
                    .ok_or_else(|| err(format!("{el} (CPU)"), "no VirtualQuantity"))?;
                let n = parse_u64(&format!("{el} VirtualQuantity"), q)?;
                if n == 0 || n > u64::from(MAX_CPUS) {
                    return Err(err(
                        format!("{el} VirtualQuantity"),
                        format!("{n} CPUs: must be 1..={MAX_CPUS}"),
                    ));
                }
                cpus = Some(n as u32);
            }
            "4" => {
                let q = child_text(*it, "VirtualQuantity")
                    .ok_or_else(|| err(format!("{el} (memory)"), "no VirtualQuantity"))?;
                let n = parse_u64(&format!("{el} VirtualQuantity"), q)?;
                let units = child_text(*it, "AllocationUnits")
                    .ok_or_else(|| err(format!("{el} (memory)"), "no AllocationUnits"))?;
                let per = unit_bytes(&format!("{el} AllocationUnits"), units)?;
                let bytes = n
                    .checked_mul(per)
                    .ok_or_else(|| err(format!("{el} VirtualQuantity"), "memory size overflows"))?;
                let mib = bytes / (1 << 20);
                if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&mib) {
                    return Err(err(
                        format!("{el} VirtualQuantity"),
                        format!("{mib} MiB of memory: must be {MIN_MEMORY_MIB}..={MAX_MEMORY_MIB}"),
                    ));
                }
                memory_mib = Some(mib);
            }
            "10" => {
                if nics.len() >= MAX_NICS {
                    return Err(err(&el, format!("more than {MAX_NICS} NICs")));
                }
                let sub = child_text(*it, "ResourceSubType").unwrap_or("");
                let conn = child_text(*it, "Connection").unwrap_or("").to_string();
                let mac = child_text(*it, "Address").and_then(|a| a.parse::<MacAddr>().ok());
                let model = match map_nic_model(sub) {
                    Some(m) => m,
                    None => {
                        warnings.push(format!(
                            "{el}: NIC model `{sub}` is unknown here, the lab uses e1000"
                        ));
                        "e1000"
                    }
                };
                nics.push(OvfNic {
                    model: model.into(),
                    original_model: sub.into(),
                    mac,
                    attachment: conn,
                    attachment_name: None,
                });
            }
            "17" => {
                let hr = child_text(*it, "HostResource")
                    .ok_or_else(|| err(format!("{el} (hard disk)"), "no HostResource"))?;
                let id = ["ovf:/disk/", "ovf://disk/", "/disk/"]
                    .iter()
                    .find_map(|p| hr.strip_prefix(p))
                    .ok_or_else(|| {
                        err(
                            format!("{el} HostResource"),
                            format!("`{hr}` does not name a disk (ovf:/disk/<id>)"),
                        )
                    })?;
                let d = disk_defs.get(id).ok_or_else(|| {
                    err(
                        format!("{el} HostResource"),
                        format!("disk `{id}` is not in DiskSection"),
                    )
                })?;
                if disks.len() >= MAX_DISKS {
                    return Err(err(&el, format!("more than {MAX_DISKS} disks")));
                }
                disks.push(d.clone());
            }
            "15" | "16" | "14"
                if child_text(*it, "HostResource").is_some_and(|h| !h.is_empty()) =>
            {
                warnings.push(format!(
                    "{el}: a CD/DVD or floppy image is not imported (the lab boots from the network)"
                ));
            }
            _ => {}
        }
    }
    // VMware's firmware lives in vmw:Config.
    for c in hw
        .children()
        .filter(|c| c.is_element() && c.tag_name().name() == "Config")
    {
        if attr(&c, NS_VMW, "key") == Some("firmware")
            && attr(&c, NS_VMW, "value").is_some_and(|v| v.eq_ignore_ascii_case("efi"))
        {
            firmware = Firmware::Ovmf;
        }
        if attr(&c, NS_VMW, "key") == Some("bootOptions.efiSecureBootEnabled")
            && attr(&c, NS_VMW, "value") == Some("true")
        {
            warnings
                .push("secure boot is on in the source; the lab's OVMF boots without it".into());
        }
    }

    let mut boot = Vec::new();
    let mut name = vs_id;
    let vbox = vs.children().find(|c| {
        c.is_element()
            && c.tag_name().name() == "Machine"
            && c.tag_name().namespace() == Some(NS_VBOX)
    });
    if let Some(m) = vbox {
        if let Some(n) = m.attribute("name") {
            name = n.to_string();
        }
        let hwm = local_children(m, "Hardware")
            .next()
            .ok_or_else(|| err("vbox:Machine", "no Hardware"))?;
        if let Some(c) = local_children(hwm, "CPU").next()
            && let Some(count) = c.attribute("count")
        {
            let n = parse_u64("vbox:Machine/Hardware/CPU count", count)?;
            if n == 0 || n > u64::from(MAX_CPUS) {
                return Err(err("vbox:Machine/Hardware/CPU count", format!("{n} CPUs")));
            }
            cpus = Some(n as u32);
        }
        if let Some(mem) = local_children(hwm, "Memory").next()
            && let Some(r) = mem.attribute("RAMSize")
        {
            let mib = parse_u64("vbox:Machine/Hardware/Memory RAMSize", r)?;
            if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&mib) {
                return Err(err(
                    "vbox:Machine/Hardware/Memory RAMSize",
                    format!("{mib} MiB: must be {MIN_MEMORY_MIB}..={MAX_MEMORY_MIB}"),
                ));
            }
            memory_mib = Some(mib);
        }
        if let Some(fw) = local_children(hwm, "Firmware").next()
            && fw
                .attribute("type")
                .is_some_and(|t| t.to_ascii_uppercase().starts_with("EFI"))
        {
            firmware = Firmware::Ovmf;
        }
        if let Some(b) = local_children(hwm, "Boot").next() {
            let mut order: Vec<(u64, BootDevice)> = Vec::new();
            for o in local_children(b, "Order") {
                let pos = o
                    .attribute("position")
                    .and_then(|p| p.parse::<u64>().ok())
                    .unwrap_or(u64::MAX);
                match o.attribute("device") {
                    Some("Network") => order.push((pos, BootDevice::Network)),
                    Some("HardDisk") => order.push((pos, BootDevice::Disk)),
                    _ => {}
                }
            }
            order.sort_by_key(|(p, _)| *p);
            boot = order.into_iter().map(|(_, d)| d).collect();
        }
        // vbox:Machine wins for NICs: it has the MACs and attachment names.
        if let Some(net) = local_children(hwm, "Network").next() {
            let mut vnics = Vec::new();
            for a in local_children(net, "Adapter") {
                if a.attribute("enabled") != Some("true") {
                    continue;
                }
                let slot = a.attribute("slot").unwrap_or("?");
                let el = format!("vbox:Machine Adapter slot {slot}");
                let mac = match a.attribute("MACAddress") {
                    Some(m) => Some(parse_vbox_mac(m).ok_or_else(|| {
                        err(
                            format!("{el} MACAddress"),
                            format!("`{m}` is not a MAC address"),
                        )
                    })?),
                    None => None,
                };
                let ty = a.attribute("type").unwrap_or("");
                let model = match map_nic_model(ty) {
                    Some(m) => m,
                    None => {
                        warnings.push(format!(
                            "{el}: NIC type `{ty}` is unknown here, the lab uses e1000"
                        ));
                        "e1000"
                    }
                };
                let att = a
                    .children()
                    .find(|c| c.is_element() && c.tag_name().name() != "DisabledModes");
                let (attachment, attachment_name) = match att {
                    Some(c) => {
                        let kind = match c.tag_name().name() {
                            "BridgedInterface" => "Bridged",
                            "HostOnlyInterface" => "HostOnly",
                            "InternalNetwork" => "Internal",
                            "GenericInterface" => "Generic",
                            "NATNetwork" => "NATNetwork",
                            other => other,
                        };
                        (kind.to_string(), c.attribute("name").map(str::to_string))
                    }
                    None => ("Null".to_string(), None),
                };
                if vnics.len() >= MAX_NICS {
                    return Err(err(&el, format!("more than {MAX_NICS} NICs")));
                }
                vnics.push(OvfNic {
                    model: model.into(),
                    original_model: ty.into(),
                    mac,
                    attachment,
                    attachment_name,
                });
            }
            nics = vnics;
        }
    }
    let cpus = cpus.unwrap_or_else(|| {
        warnings.push("no CPU item: 1 vCPU".into());
        1
    });
    let memory_mib = memory_mib
        .ok_or_else(|| err("VirtualHardwareSection", "no memory item (ResourceType 4)"))?;
    if boot.is_empty() {
        // Without a VirtualBox boot order: disk first if there is one (the VM's own OS),
        // then the network.
        if !disks.is_empty() {
            boot.push(BootDevice::Disk);
        }
        if !nics.is_empty() {
            boot.push(BootDevice::Network);
        }
    }
    Ok(OvfMachine {
        name,
        version,
        cpus,
        memory_mib,
        firmware,
        boot,
        nics,
        disks,
        vbox_machine: vbox.is_some(),
        warnings,
    })
}

/// `080027AF9290` (or with separators) -> a MAC.
pub fn parse_vbox_mac(s: &str) -> Option<MacAddr> {
    let hex: String = s.chars().filter(|c| *c != ':' && *c != '-').collect();
    if hex.len() != 12 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let mut b = [0u8; 6];
    for (i, out) in b.iter_mut().enumerate() {
        *out = u8::from_str_radix(hex.get(i * 2..i * 2 + 2)?, 16).ok()?;
    }
    Some(MacAddr(b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmdef::definitions_dir;

    #[test]
    fn units() {
        assert_eq!(unit_bytes("x", "byte * 2^20").unwrap(), 1 << 20);
        assert_eq!(unit_bytes("x", "MegaBytes").unwrap(), 1 << 20);
        assert_eq!(unit_bytes("x", "byte*2^30").unwrap(), 1 << 30);
        assert_eq!(unit_bytes("x", "byte").unwrap(), 1);
        assert!(unit_bytes("x", "furlongs").is_err());
        assert!(unit_bytes("x", "byte * 2^99").is_err());
    }

    #[test]
    fn written_descriptor_reads_back() {
        let def = VmFile::load(&definitions_dir().join("pxe-server.toml")).unwrap();
        let xml = write_ovf(
            &def,
            &[ExportDisk {
                href: "pxe-server-disk1.vmdk".into(),
                file_size: 1234,
                capacity: 35 << 20,
            }],
        );
        let m = parse_ovf(xml.as_bytes()).unwrap();
        assert_eq!(m.name, "pxe-server");
        assert_eq!(m.version, OvfVersion::V1);
        assert_eq!((m.cpus, m.memory_mib), (1, 512));
        assert!(m.vbox_machine);
        assert_eq!(m.boot, vec![BootDevice::Disk]);
        assert_eq!(m.nics.len(), 1);
        assert_eq!(m.nics[0].mac, Some(def.vm.nic[0].mac));
        assert_eq!(m.nics[0].attachment, "Internal");
        assert_eq!(m.nics[0].attachment_name.as_deref(), Some("pxelab"));
        assert_eq!(m.disks[0].capacity, 35 << 20);
        assert_eq!(m.disks[0].file_size, Some(1234));
        let uefi = VmFile::load(&definitions_dir().join("pxe-client-uefi.toml")).unwrap();
        let m = parse_ovf(write_ovf(&uefi, &[]).as_bytes()).unwrap();
        assert_eq!(m.firmware, Firmware::Ovmf);
        assert_eq!(m.boot, vec![BootDevice::Network]);
        assert_eq!(m.nics[0].model, "virtio");
    }

    /// Regression (fuzz/artifacts/ovf/control-char-description): free text with characters
    /// XML 1.0 cannot carry made `write_ovf` produce a descriptor no reader accepts.
    #[test]
    fn written_descriptor_is_xml_whatever_the_text() {
        let mut def = VmFile::load(&definitions_dir().join("pxe-server.toml")).unwrap();
        def.vm.description = "a\u{e}b\u{0}c\u{ffff} tab\there\r\nend".into();
        def.vm.nic[0].network = "net\u{1b}[0m \"x\" <y> & \t".into();
        let disk = ExportDisk {
            href: "d\u{7}\n.vmdk".into(),
            file_size: 1,
            capacity: 1 << 20,
        };
        let xml = write_ovf(&def, &[disk]);
        let m = parse_ovf(xml.as_bytes()).unwrap();
        assert_eq!(m.disks[0].href, "d\u{fffd}\n.vmdk");
        assert_eq!(m.cpus, def.vm.cpus);
        assert_eq!(xml_escape("a\tb"), "a&#x9;b");
    }

    #[test]
    fn hostile_input_is_refused_with_the_element() {
        let e = parse_ovf(b"<Envelope xmlns='urn:x'/>").unwrap_err();
        assert_eq!(e.element, "Envelope");
        let e = parse_ovf(b"<Envelope").unwrap_err();
        assert!(e.reason.contains("XML"), "{e}");
        let e = parse_ovf(&vec![b' '; MAX_OVF_BYTES + 1]).unwrap_err();
        assert!(e.reason.contains("bytes"));
        let def = VmFile::load(&definitions_dir().join("pxe-server.toml")).unwrap();
        let xml = write_ovf(
            &def,
            &[ExportDisk {
                href: "d.vmdk".into(),
                file_size: 1,
                capacity: 1 << 20,
            }],
        );
        let bad = xml.replace("ovf:capacity=\"1048576\"", "ovf:capacity=\"DISK_CAPACITY\"");
        let e = parse_ovf(bad.as_bytes()).unwrap_err();
        assert!(e.element.contains("Disk vmdisk1 ovf:capacity"), "{e}");
        let bad = xml.replace(
            "ovf:capacity=\"1048576\"",
            "ovf:capacity=\"18446744073709551615\"",
        );
        assert!(
            parse_ovf(bad.as_bytes())
                .unwrap_err()
                .reason
                .contains("absurd")
        );
        let bad = xml.replace(
            "<rasd:VirtualQuantity>512<",
            "<rasd:VirtualQuantity>99999999999<",
        );
        assert!(parse_ovf(bad.as_bytes()).is_err());
        let bad = xml.replace("MACAddress=\"080027770101\"", "MACAddress=\"MAC_ADDRESS\"");
        assert!(
            parse_ovf(bad.as_bytes())
                .unwrap_err()
                .element
                .contains("MACAddress")
        );
        // Billion laughs: DTDs are refused outright.
        let e = parse_ovf(b"<?xml version='1.0'?><!DOCTYPE x [<!ENTITY a 'aaaa'>]><Envelope/>")
            .unwrap_err();
        assert!(e.reason.contains("XML"));
    }

    #[test]
    fn uuids_are_stable_and_well_formed() {
        let u = stable_uuid("x");
        assert_eq!(u, stable_uuid("x"));
        assert_eq!(u.len(), 36);
        assert_eq!(u.as_bytes()[14], b'4');
        assert_eq!(
            parse_vbox_mac("080027AF9290").unwrap().to_string(),
            "08:00:27:af:92:90"
        );
        assert!(parse_vbox_mac("MAC_ADDRESS").is_none());
    }
}
