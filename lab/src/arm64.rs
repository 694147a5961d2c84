//! The arm64 test OS and boot loader for the matrix's AAVMF machine: Debian's arm64 cloud
//! kernel, an initramfs with arm64 busybox and the virtio NIC modules (the same /init as the
//! x86 test OS), and GRUB's arm64-efi network image (Debian has no arm64 iPXE). Packages come
//! from apt (`dpkg --add-architecture arm64`), are unpacked with dpkg-deb and cached.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::cpio::CpioWriter;
use crate::payload::{UDHCPC_SCRIPT, init_script};

/// The arm64 kernel flavour: the cloud build is small and has PL011 and PCI built in.
const KERNEL_METAPACKAGE: &str = "linux-image-cloud-arm64:arm64";
/// busybox for the initramfs.
const BUSYBOX_PACKAGE: &str = "busybox-static:arm64";
/// GRUB's arm64-efi modules.
const GRUB_PACKAGE: &str = "grub-efi-arm64-bin:arm64";
/// virtio-net and what it needs, in load order (the cloud kernel has them as modules).
const MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "failover",
    "net_failover",
    "virtio_net",
];
/// Bump when the initramfs changes, so cached images are rebuilt.
const ARM64_FORMAT: &str = "pxelab-arm64-v2";
/// Built into the GRUB image: EFI NIC, TFTP, the Linux loader, the commands grub.cfg uses.
const GRUB_BUILTIN: &[&str] = &[
    "efinet",
    "tftp",
    "net",
    "linux",
    "normal",
    "configfile",
    "echo",
    "test",
];

/// The arm64 files a lab serves.
#[derive(Clone, Debug)]
pub struct Arm64Payload {
    /// The kernel (an EFI stub image).
    pub kernel: PathBuf,
    /// The initramfs.
    pub initrd: PathBuf,
    /// GRUB's arm64-efi network image (prefix `/grub`).
    pub grub: PathBuf,
}

/// Fetch, unpack and build (once; cached under `cache`).
pub fn ensure_arm64_payload(cache: &Path) -> Result<Arm64Payload> {
    let foreign = Command::new("dpkg")
        .arg("--print-foreign-architectures")
        .output()
        .context("running dpkg")?;
    if !String::from_utf8_lossy(&foreign.stdout)
        .lines()
        .any(|l| l.trim() == "arm64")
    {
        bail!("apt cannot fetch arm64 packages: dpkg --add-architecture arm64 && apt-get update");
    }
    let dir = cache.join("arm64");
    std::fs::create_dir_all(&dir)?;
    let kernel_pkg = depends_on(KERNEL_METAPACKAGE)?;
    let out = Arm64Payload {
        kernel: dir.join(format!("{kernel_pkg}.vmlinuz")),
        initrd: dir.join(format!("{kernel_pkg}.{ARM64_FORMAT}.initrd.gz")),
        grub: dir.join("grubaa64.efi"),
    };
    if out.kernel.exists() && out.initrd.exists() && out.grub.exists() {
        return Ok(out);
    }
    let root = dir.join("root");
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root)?;
    for pkg in [
        format!("{kernel_pkg}:arm64"),
        BUSYBOX_PACKAGE.into(),
        GRUB_PACKAGE.into(),
    ] {
        unpack(&pkg, &dir, &root)?;
    }
    let boot = root.join("boot");
    let vmlinuz = std::fs::read_dir(&boot)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .with_context(|| format!("no vmlinuz in {kernel_pkg}"))?;
    let kver = vmlinuz
        .file_name()
        .map(|n| {
            n.to_string_lossy()
                .trim_start_matches("vmlinuz-")
                .to_string()
        })
        .unwrap_or_default();

    // The initramfs: the x86 test OS's /init and udhcpc hook, arm64 busybox and modules.
    let busybox = std::fs::read(root.join("bin/busybox"))?;
    let applets = Command::new(crate::payload::BUSYBOX)
        .arg("--list")
        .output()
        .context("listing busybox applets (the host's busybox-static is the same version)")?;
    let tmp = out.initrd.with_extension("tmp");
    let gz =
        flate2::write::GzEncoder::new(std::fs::File::create(&tmp)?, flate2::Compression::default());
    let mut w = CpioWriter::new(gz);
    let applets = String::from_utf8_lossy(&applets.stdout).into_owned();
    crate::payload::write_busybox_root(
        &mut w,
        &busybox,
        applets
            .lines()
            .map(str::trim)
            .filter(|a| !a.is_empty() && !a.contains('/') && *a != "busybox"),
    )?;
    w.file("/init", 0o755, init_script().as_bytes())?;
    w.file("/etc/pxelab/udhcpc.script", 0o755, UDHCPC_SCRIPT.as_bytes())?;
    let mod_root = root.join("lib/modules").join(&kver);
    let mut order = String::new();
    for m in MODULES {
        // Not every kernel splits virtio the same way: a module built in is simply absent.
        if let Some(path) = find_module(&mod_root, m)? {
            let bytes = decompress(&path)?;
            w.file(&format!("/lib/modules/{m}.ko"), 0o644, &bytes)?;
            order.push_str(m);
            order.push('\n');
        }
    }
    if !order.contains("virtio_net") {
        bail!("{kernel_pkg} has no virtio_net module");
    }
    w.file("/etc/pxelab/modules", 0o644, order.as_bytes())?;
    let mut gz = w.finish()?;
    std::io::Write::flush(&mut gz)?;
    gz.finish()?;
    std::fs::rename(&tmp, &out.initrd)?;
    std::fs::copy(&vmlinuz, &out.kernel)?;

    let status = Command::new("grub-mkimage")
        .args(["-O", "arm64-efi", "-p", "/grub", "-d"])
        .arg(root.join("usr/lib/grub/arm64-efi"))
        .arg("-o")
        .arg(&out.grub)
        .args(GRUB_BUILTIN)
        .status()
        .context("running grub-mkimage (apt-get install grub-common)")?;
    if !status.success() {
        bail!("grub-mkimage -O arm64-efi failed ({status})");
    }
    let _ = std::fs::remove_dir_all(&root);
    Ok(out)
}

/// The versioned package a metapackage depends on.
fn depends_on(meta: &str) -> Result<String> {
    let out = Command::new("apt-cache")
        .args(["depends", meta])
        .output()
        .context("running apt-cache")?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .map(|p| p.trim_end_matches(":arm64").to_string())
        .find(|p| p.starts_with("linux-image-"))
        .with_context(|| format!("apt-cache depends {meta}: no kernel package"))
}

fn unpack(pkg: &str, dir: &Path, root: &Path) -> Result<()> {
    let status = Command::new("apt-get")
        .args(["download", "-q", pkg])
        .current_dir(dir)
        .status()
        .with_context(|| format!("apt-get download {pkg}"))?;
    if !status.success() {
        bail!("apt-get download {pkg} failed");
    }
    let name = pkg.split(':').next().unwrap_or(pkg);
    let deb = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name().is_some_and(|n| {
                let n = n.to_string_lossy();
                n.starts_with(&format!("{name}_")) && n.ends_with("_arm64.deb")
            })
        })
        .with_context(|| format!("apt-get download {pkg} left no .deb"))?;
    let status = Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(root)
        .status()?;
    if !status.success() {
        bail!("dpkg-deb -x {} failed", deb.display());
    }
    let _ = std::fs::remove_file(&deb);
    Ok(())
}

fn find_module(dir: &Path, name: &str) -> Result<Option<PathBuf>> {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.filter_map(|e| e.ok()) {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.file_name().is_some_and(|n| {
                let n = n.to_string_lossy();
                n.split(".ko").next() == Some(name) && n.contains(".ko")
            }) {
                return Ok(Some(p));
            }
        }
    }
    Ok(None)
}

fn decompress(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        "xz"
    } else if name.ends_with(".zst") {
        "zstd"
    } else {
        return Ok(std::fs::read(path)?);
    };
    let out = Command::new(tool).arg("-dc").arg(path).output()?;
    if !out.status.success() {
        bail!("{tool} -dc {name} failed");
    }
    Ok(out.stdout)
}
