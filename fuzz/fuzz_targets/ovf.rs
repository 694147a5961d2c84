//! The lab's OVF reader: arbitrary descriptors through `pxelab::ovf::parse_ovf` (limits,
//! namespaces, units, vbox:Machine), and descriptors written by `write_ovf` from fuzzed
//! machines (hostile names and descriptions, any MAC, model, CPU and memory counts) read back.
//!
//! Checked: no panic; what is accepted stays inside the named limits; a machine we write
//! reads back with the same CPUs, memory, firmware, boot order, NIC MACs and models, and disks.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use pxed::mac::MacAddr;
use pxelab::machine::Firmware;
use pxelab::ovf::{ExportDisk, MAX_DISK_BYTES, parse_ovf, write_ovf};
use pxelab::vmdef::{
    BootDevice, MAX_CPUS, MAX_MEMORY_MIB, MAX_NICS, MIN_MEMORY_MIB, NIC_MODELS, NicDef, VmDef,
    VmFile,
};

#[derive(Arbitrary, Debug)]
enum Input {
    Raw(Vec<u8>),
    Written(Machine),
}

#[derive(Arbitrary, Debug)]
struct Machine {
    name: String,
    description: String,
    uefi: bool,
    cpus: u32,
    memory_mib: u64,
    boot: Vec<bool>,
    nics: Vec<(u8, [u8; 6], String)>,
    disks: Vec<(String, u64, u64)>,
}

fn check_limits(m: &pxelab::ovf::OvfMachine) {
    assert!((1..=MAX_CPUS).contains(&m.cpus), "cpus {}", m.cpus);
    assert!((MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&m.memory_mib));
    assert!(m.nics.len() <= MAX_NICS);
    for d in &m.disks {
        assert!(d.capacity <= MAX_DISK_BYTES);
    }
}

fuzz_target!(|input: Input| {
    let m = match input {
        Input::Raw(bytes) => {
            if let Ok(m) = parse_ovf(&bytes) {
                check_limits(&m);
            }
            return;
        }
        Input::Written(m) => m,
    };
    let vm = VmDef {
        name: m.name,
        description: m.description,
        firmware: if m.uefi {
            Firmware::Ovmf
        } else {
            Firmware::Seabios
        },
        cpus: m.cpus % MAX_CPUS + 1,
        memory_mib: MIN_MEMORY_MIB + m.memory_mib % (MAX_MEMORY_MIB - MIN_MEMORY_MIB + 1),
        boot: m
            .boot
            .iter()
            .take(4)
            .map(|n| {
                if *n {
                    BootDevice::Network
                } else {
                    BootDevice::Disk
                }
            })
            .collect(),
        nic: m
            .nics
            .into_iter()
            .take(8)
            .map(|(model, mac, network)| NicDef {
                model: NIC_MODELS[usize::from(model) % NIC_MODELS.len()]
                    .name
                    .to_string(),
                mac: MacAddr(mac),
                network,
            })
            .collect(),
    };
    let disks: Vec<ExportDisk> = m
        .disks
        .into_iter()
        .take(4)
        .map(|(href, file_size, capacity)| ExportDisk {
            href,
            file_size,
            capacity: capacity % (MAX_DISK_BYTES + 1),
        })
        .collect();
    let def = VmFile {
        vm: vm.clone(),
        disk: None,
        server: None,
    };
    let xml = write_ovf(&def, &disks);
    let back = match parse_ovf(xml.as_bytes()) {
        Ok(b) => b,
        // Our own writer's output must be readable, whatever the names hold.
        Err(e) => panic!("written descriptor refused: {e}\n{xml}"),
    };
    check_limits(&back);
    assert_eq!(back.cpus, vm.cpus);
    assert_eq!(back.memory_mib, vm.memory_mib);
    assert_eq!(back.firmware, vm.firmware);
    // An empty boot order is written as none and read back as the reader's default.
    if !vm.boot.is_empty() {
        assert_eq!(back.boot, vm.boot);
    }
    let macs: Vec<Option<MacAddr>> = back.nics.iter().map(|n| n.mac).collect();
    let want: Vec<Option<MacAddr>> = vm.nic.iter().map(|n| Some(n.mac)).collect();
    assert_eq!(macs, want, "NIC MACs");
    // VirtualBox has no e1000e, rtl8139 or vmxnet3: the vbox:Machine adapter type (which the
    // reader prefers) is lossy for them, so only the models it can carry are compared.
    for (got, want) in back.nics.iter().zip(&vm.nic) {
        if matches!(want.model.as_str(), "e1000" | "virtio" | "pcnet") {
            assert_eq!(got.model, want.model, "NIC model");
        }
    }
    assert_eq!(back.disks.len(), disks.len());
    for (d, w) in back.disks.iter().zip(&disks) {
        assert_eq!(d.capacity, w.capacity);
        // Characters XML 1.0 cannot carry come back as U+FFFD (see `xml_escape`).
        let want: String = w
            .href
            .chars()
            .map(|c| match c {
                '\t' | '\n' | '\r' => c,
                '\u{0}'..='\u{1f}' | '\u{fffe}' | '\u{ffff}' => '\u{fffd}',
                c => c,
            })
            .collect();
        assert_eq!(d.href, want);
    }
});
