//! `pxelab doctor`: check what the lab needs and print the command that fixes each problem.

use std::path::Path;
use std::process::Command;

use crate::machine::{OVMF_CODE, OVMF_VARS, QEMU};

/// Free space the cache wants: a kernel package plus its tree and the initramfs.
const CACHE_SPACE_MB: u64 = 600;

/// One check's result.
#[derive(Debug)]
pub struct Check {
    /// What was checked.
    pub what: String,
    /// Ok(detail) or Err(problem).
    pub result: Result<String, String>,
    /// The command that fixes it.
    pub fix: Option<String>,
}

fn check(what: &str, result: Result<String, String>, fix: &str) -> Check {
    Check {
        what: what.into(),
        fix: result.is_err().then(|| fix.to_string()),
        result,
    }
}

fn file(path: &str) -> Result<String, String> {
    if Path::new(path).exists() {
        Ok(path.to_string())
    } else {
        Err(format!("{path} is missing"))
    }
}

fn tool(program: &str, arg: &str) -> Result<String, String> {
    match Command::new(program).arg(arg).output() {
        Ok(out) => Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or(program)
            .to_string()),
        Err(_) => Err(format!("{program} not found")),
    }
}

/// Run every check.
pub fn doctor() -> Vec<Check> {
    let mut v = vec![
        check(
            "QEMU",
            tool(QEMU, "--version"),
            "apt-get install qemu-system-x86",
        ),
        check(
            "QEMU ROM e1000 (BIOS+EFI)",
            file("/usr/lib/ipxe/qemu/efi-e1000.rom"),
            "apt-get install ipxe-qemu",
        ),
        check(
            "QEMU ROM virtio (BIOS+EFI)",
            file("/usr/lib/ipxe/qemu/efi-virtio.rom"),
            "apt-get install ipxe-qemu",
        ),
        check(
            "QEMU ROM e1000 (BIOS only)",
            file("/usr/lib/ipxe/qemu/pxe-e1000.rom"),
            "apt-get install ipxe-qemu",
        ),
        check("OVMF code", file(OVMF_CODE), "apt-get install ovmf"),
        check("OVMF vars", file(OVMF_VARS), "apt-get install ovmf"),
        check(
            "iPXE binaries",
            file("/usr/lib/ipxe/undionly.kpxe"),
            "apt-get install ipxe",
        ),
        check(
            "dnsmasq",
            tool("dnsmasq", "--version"),
            "apt-get install dnsmasq",
        ),
        check(
            "busybox-static",
            file(crate::payload::BUSYBOX),
            "apt-get install busybox-static",
        ),
        check(
            "apt (kernel download)",
            tool("apt-cache", "--version"),
            "run on Debian or Ubuntu",
        ),
        check("/dev/net/tun", file("/dev/net/tun"), "modprobe tun"),
    ];
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    v.push(check(
        "root (namespaces, TAP)",
        if root {
            Ok("running as root".into())
        } else {
            Err("not root".into())
        },
        "sudo pxelab ...",
    ));
    let ns = if root {
        match crate::netns::Netns::create(&format!("doctor-{}", std::process::id())) {
            Ok(ns) => Ok(format!("created and deleted {}", ns.name())),
            Err(e) => Err(format!("{e:#}")),
        }
    } else {
        Err("needs root".into())
    };
    v.push(check(
        "network namespaces",
        ns,
        "sudo pxelab ... (and apt-get install iproute2)",
    ));
    let kvm = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Err(e) => Err(format!("/dev/kvm: {e}")),
        Ok(_) => {
            let cache = crate::payload::cache_dir();
            let cached = std::fs::read_dir(&cache).ok().and_then(|d| {
                d.flatten()
                    .map(|e| e.path())
                    .find(|p| p.to_string_lossy().ends_with(".cpio.gz"))
            });
            let kernel = std::fs::read_dir(&cache)
                .ok()
                .and_then(|d| {
                    d.flatten()
                        .map(|e| e.path().join("boot"))
                        .find(|p| p.is_dir())
                })
                .and_then(|b| std::fs::read_dir(b).ok())
                .and_then(|d| {
                    d.flatten()
                        .map(|e| e.path())
                        .find(|p| p.to_string_lossy().contains("vmlinuz-"))
                });
            match (kernel, cached) {
                (Some(k), Some(i)) => crate::machine::probe_kvm(&k, &i)
                    .map(|()| "a probe boot under KVM reached userspace".to_string())
                    .map_err(|e| format!("{e:#}: the lab uses TCG (slower, deadlines scaled)")),
                _ => Err("no cached payload to probe with yet (run a lab once)".into()),
            }
        }
    };
    v.push(check(
        "KVM (optional)",
        kvm,
        "nothing required: TCG works; for KVM fix nested virtualisation on the host",
    ));
    let cache = crate::payload::cache_dir();
    let _ = std::fs::create_dir_all(&cache);
    v.push(check(
        "disk space in the cache",
        free_mb(&cache).and_then(|mb| {
            if mb >= CACHE_SPACE_MB {
                Ok(format!("{mb} MB free in {}", cache.display()))
            } else {
                Err(format!("only {mb} MB free in {}", cache.display()))
            }
        }),
        "set PXELAB_CACHE to a directory on a larger disk",
    ));
    v
}

fn free_mb(path: &Path) -> Result<u64, String> {
    let c = std::ffi::CString::new(path.to_string_lossy().as_bytes()).map_err(|e| e.to_string())?;
    // SAFETY: statvfs with a valid C string and an out struct.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error().to_string());
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64 / 1_000_000)
}
