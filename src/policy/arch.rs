//! Client system architectures (DHCP option 93), per RFC 4578 section 2.1 and the IANA
//! "Processor Architecture Types" registry, with the mix-ups real firmware makes.

use std::fmt;

/// The firmware interface a client boots through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Firmware {
    /// PC/AT BIOS with a PXE ROM.
    Bios,
    /// UEFI (PXE or HTTP boot).
    Uefi,
    /// U-Boot.
    UBoot,
    /// Anything else in the registry (Open Firmware, OPAL, s390, rpiboot...).
    Other,
}

/// The CPU family of a client.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Cpu {
    /// 32-bit x86.
    I386,
    /// 64-bit x86.
    X86_64,
    /// 32-bit ARM.
    Arm32,
    /// 64-bit ARM.
    Arm64,
    /// 32-bit RISC-V.
    Riscv32,
    /// 64-bit RISC-V.
    Riscv64,
    /// 64-bit LoongArch.
    Loongarch64,
    /// Itanium, Alpha, PowerPC, MIPS, s390 and the rest: recognised but not booted by default.
    Other,
}

impl Cpu {
    /// The name iPXE uses for `${buildarch}`.
    pub fn ipxe_buildarch(self) -> &'static str {
        match self {
            Cpu::I386 => "i386",
            Cpu::X86_64 => "x86_64",
            Cpu::Arm32 => "arm32",
            Cpu::Arm64 => "arm64",
            Cpu::Riscv32 => "riscv32",
            Cpu::Riscv64 => "riscv64",
            Cpu::Loongarch64 => "loong64",
            Cpu::Other => "unknown",
        }
    }
}

/// A decoded option 93 value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClientArch {
    /// The raw registry code the client sent.
    pub code: u16,
    /// Firmware interface.
    pub firmware: Firmware,
    /// CPU family.
    pub cpu: Cpu,
    /// The client boots from an HTTP URL (UEFI HTTP Boot and friends), not TFTP.
    pub http: bool,
    /// The registry's name for the code.
    pub name: &'static str,
}

impl fmt::Display for ClientArch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.code, self.name)
    }
}

/// IANA Processor Architecture Types (RFC 4578 section 2.1 and later registrations).
/// 7 and 9 are both x86-64 UEFI: RFC 4578 swapped them and firmware sends either (EDK2 sends 7).
/// 8 (EFI Xscale) is treated as x86-64 UEFI too, as dnsmasq and Smee do for laptops that send it.
const REGISTRY: &[(u16, Firmware, Cpu, bool, &str)] = &[
    (0, Firmware::Bios, Cpu::I386, false, "x86 BIOS"),
    (1, Firmware::Other, Cpu::Other, false, "NEC/PC98"),
    (2, Firmware::Uefi, Cpu::Other, false, "EFI Itanium"),
    (3, Firmware::Other, Cpu::Other, false, "DEC Alpha"),
    (4, Firmware::Other, Cpu::I386, false, "Arc x86"),
    (5, Firmware::Other, Cpu::I386, false, "Intel Lean Client"),
    (6, Firmware::Uefi, Cpu::I386, false, "x86 UEFI"),
    (7, Firmware::Uefi, Cpu::X86_64, false, "x64 UEFI"),
    (
        8,
        Firmware::Uefi,
        Cpu::X86_64,
        false,
        "EFI Xscale (sent by some x64 UEFI)",
    ),
    (9, Firmware::Uefi, Cpu::X86_64, false, "EFI x86-64"),
    (10, Firmware::Uefi, Cpu::Arm32, false, "ARM 32-bit UEFI"),
    (11, Firmware::Uefi, Cpu::Arm64, false, "ARM 64-bit UEFI"),
    (
        12,
        Firmware::Other,
        Cpu::Other,
        false,
        "PowerPC Open Firmware",
    ),
    (13, Firmware::Other, Cpu::Other, false, "PowerPC ePAPR"),
    (14, Firmware::Other, Cpu::Other, false, "POWER OPAL v3"),
    (15, Firmware::Uefi, Cpu::I386, true, "x86 UEFI HTTP"),
    (16, Firmware::Uefi, Cpu::X86_64, true, "x64 UEFI HTTP"),
    (17, Firmware::Uefi, Cpu::Other, true, "EBC UEFI HTTP"),
    (18, Firmware::Uefi, Cpu::Arm32, true, "ARM 32-bit UEFI HTTP"),
    (19, Firmware::Uefi, Cpu::Arm64, true, "ARM 64-bit UEFI HTTP"),
    (20, Firmware::Bios, Cpu::I386, true, "PC/AT BIOS HTTP"),
    (21, Firmware::UBoot, Cpu::Arm32, false, "ARM 32-bit U-Boot"),
    (22, Firmware::UBoot, Cpu::Arm64, false, "ARM 64-bit U-Boot"),
    (
        23,
        Firmware::UBoot,
        Cpu::Arm32,
        true,
        "ARM 32-bit U-Boot HTTP",
    ),
    (
        24,
        Firmware::UBoot,
        Cpu::Arm64,
        true,
        "ARM 64-bit U-Boot HTTP",
    ),
    (
        25,
        Firmware::Uefi,
        Cpu::Riscv32,
        false,
        "RISC-V 32-bit UEFI",
    ),
    (
        26,
        Firmware::Uefi,
        Cpu::Riscv32,
        true,
        "RISC-V 32-bit UEFI HTTP",
    ),
    (
        27,
        Firmware::Uefi,
        Cpu::Riscv64,
        false,
        "RISC-V 64-bit UEFI",
    ),
    (
        28,
        Firmware::Uefi,
        Cpu::Riscv64,
        true,
        "RISC-V 64-bit UEFI HTTP",
    ),
    (29, Firmware::Uefi, Cpu::Other, false, "RISC-V 128-bit UEFI"),
    (
        30,
        Firmware::Uefi,
        Cpu::Other,
        true,
        "RISC-V 128-bit UEFI HTTP",
    ),
    (31, Firmware::Other, Cpu::Other, false, "s390 Basic"),
    (32, Firmware::Other, Cpu::Other, false, "s390 Extended"),
    (33, Firmware::Uefi, Cpu::Other, false, "MIPS 32-bit UEFI"),
    (34, Firmware::Uefi, Cpu::Other, false, "MIPS 64-bit UEFI"),
    (35, Firmware::Uefi, Cpu::Other, false, "Sunway 32-bit UEFI"),
    (36, Firmware::Uefi, Cpu::Other, false, "Sunway 64-bit UEFI"),
    (
        37,
        Firmware::Uefi,
        Cpu::Other,
        false,
        "LoongArch 32-bit UEFI",
    ),
    (
        38,
        Firmware::Uefi,
        Cpu::Other,
        true,
        "LoongArch 32-bit UEFI HTTP",
    ),
    (
        39,
        Firmware::Uefi,
        Cpu::Loongarch64,
        false,
        "LoongArch 64-bit UEFI",
    ),
    (
        40,
        Firmware::Uefi,
        Cpu::Loongarch64,
        true,
        "LoongArch 64-bit UEFI HTTP",
    ),
    (41, Firmware::Other, Cpu::Arm32, false, "ARM rpiboot"),
];

impl ClientArch {
    /// Look a code up in the registry. `None` for codes the registry does not have: the caller
    /// reports them as an event and treats the client as unknown rather than guessing.
    pub fn from_code(code: u16) -> Option<ClientArch> {
        REGISTRY
            .iter()
            .find(|(c, ..)| *c == code)
            .map(|&(code, firmware, cpu, http, name)| ClientArch {
                code,
                firmware,
                cpu,
                http,
                name,
            })
    }

    /// x86 BIOS, what a client without option 93 is assumed to be (iPXE maintainers' advice).
    pub fn bios() -> ClientArch {
        ClientArch::from_code(0).unwrap_or(ClientArch {
            code: 0,
            firmware: Firmware::Bios,
            cpu: Cpu::I386,
            http: false,
            name: "x86 BIOS",
        })
    }

    /// iPXE's `${platform}` for this client.
    pub fn ipxe_platform(&self) -> &'static str {
        match self.firmware {
            Firmware::Bios => "pcbios",
            Firmware::Uefi => "efi",
            _ => "unknown",
        }
    }

    /// Whether the client is UEFI (and so needs `initrd=` on the kernel command line).
    pub fn is_uefi(&self) -> bool {
        self.firmware == Firmware::Uefi
    }

    /// Map iPXE's `${platform}` and `${buildarch}` back to an architecture (for requests that
    /// come over HTTP, where there is no option 93).
    pub fn from_ipxe(platform: &str, buildarch: &str) -> Option<ClientArch> {
        let code = match (platform, buildarch) {
            ("pcbios", _) => 0,
            ("efi", "i386") => 6,
            ("efi", "x86_64") => 7,
            ("efi", "arm32") => 10,
            ("efi", "arm64") => 11,
            ("efi", "riscv64") => 27,
            ("efi", "loong64") => 39,
            _ => return None,
        };
        ClientArch::from_code(code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seven_and_nine_are_both_x64_uefi() {
        for code in [7, 9] {
            let a = ClientArch::from_code(code).unwrap();
            assert_eq!(
                (a.firmware, a.cpu, a.http),
                (Firmware::Uefi, Cpu::X86_64, false)
            );
        }
    }

    #[test]
    fn http_codes() {
        for (code, cpu) in [
            (15, Cpu::I386),
            (16, Cpu::X86_64),
            (18, Cpu::Arm32),
            (19, Cpu::Arm64),
        ] {
            let a = ClientArch::from_code(code).unwrap();
            assert!(a.http, "{code}");
            assert_eq!(a.cpu, cpu);
        }
        assert!(ClientArch::from_code(20).unwrap().http);
    }

    #[test]
    fn unknown_codes_are_none() {
        assert!(ClientArch::from_code(42).is_none());
        assert!(ClientArch::from_code(0xffff).is_none());
    }

    #[test]
    fn ipxe_names_round_trip() {
        for code in [0u16, 6, 7, 10, 11] {
            let a = ClientArch::from_code(code).unwrap();
            let back = ClientArch::from_ipxe(a.ipxe_platform(), a.cpu.ipxe_buildarch()).unwrap();
            assert_eq!((back.firmware, back.cpu), (a.firmware, a.cpu), "{code}");
        }
    }
}
