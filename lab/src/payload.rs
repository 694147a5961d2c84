//! The lab's test OS: a Debian kernel (downloaded with apt into a cache outside the repo and
//! checked against the archive's SHA256) plus an initramfs we generate: busybox, the NIC
//! modules, and an /init that prints stage markers, gets an address by DHCP, phones home and
//! powers off.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use pxed::stage::BootStage;
use sha2::{Digest, Sha256};

use crate::cpio::CpioWriter;

/// The metapackage that names the current generic kernel. The cloud flavour has no e1000 at
/// all (CONFIG_E1000 unset), so the lab uses the generic one, whose NIC drivers are modules.
pub const KERNEL_METAPACKAGE: &str = "linux-image-amd64";
/// Where busybox-static installs its binary.
pub const BUSYBOX: &str = "/bin/busybox";
/// The console line prefix the oracle reads: `PXELAB-STAGE <stage> [detail]`.
pub const STAGE_MARKER: &str = "PXELAB-STAGE";
/// A console line that says the test OS failed: `PXELAB-FAIL <stage> <reason>`.
pub const FAIL_MARKER: &str = "PXELAB-FAIL";
/// The kernel command-line key carrying the phone-home URL.
pub const PHONE_PARAM: &str = "pxelab.phone";
/// NIC drivers the initramfs carries (those QEMU can emulate); dependencies are added.
pub const NIC_MODULES: &[&str] = &[
    "e1000",
    "e1000e",
    "virtio_net",
    "virtio_pci",
    "8139too",
    "8139cp",
    "ne2k_pci",
    "pcnet32",
    "vmxnet3",
    "e100",
];
/// The drivers the lab's default machines need: without them the payload is useless.
const REQUIRED_MODULES: &[&str] = &["e1000", "virtio_net"];
/// Bump when the initramfs layout changes, so cached images are rebuilt.
const INITRD_FORMAT: &str = "pxelab-initrd-v1";

/// The test OS ready to serve.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Payload {
    /// The kernel image.
    pub kernel: PathBuf,
    /// Our gzip'd newc initramfs.
    pub initrd: PathBuf,
    /// The Debian package the kernel came from.
    pub package: String,
    /// Its version.
    pub version: String,
    /// The .deb's SHA256 as the archive lists it, which the download matched.
    pub deb_sha256: String,
}

/// `$PXELAB_CACHE`, else `~/.cache/pxelab`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("PXELAB_CACHE") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache").join("pxelab")
}

/// Make sure the kernel and initramfs are in `cache`, building what is missing.
pub fn ensure_payload(cache: &Path) -> Result<Payload> {
    std::fs::create_dir_all(cache)?;
    // Tests run two at a time and several `pxelab` processes may share the cache: the first one
    // downloads and unpacks while the others wait, instead of unpacking over each other.
    let _lock = lock_cache(cache)?;
    let package = current_kernel_package()?;
    let meta = apt_show(&package)?;
    let (version, sha) = (
        meta.get("Version").cloned().unwrap_or_default(),
        meta.get("SHA256").cloned().unwrap_or_default(),
    );
    if sha.len() != 64 {
        bail!("apt-cache show {package} gives no SHA256");
    }
    let root = cache.join(format!("{package}_{version}"));
    let marker = root.join(".pxelab-verified");
    if std::fs::read_to_string(&marker).ok().as_deref() != Some(sha.as_str()) {
        fetch_kernel(cache, &package, &version, &sha, &root)?;
        std::fs::write(&marker, &sha)?;
    }
    let boot = root.join("boot");
    let kernel = std::fs::read_dir(&boot)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .with_context(|| format!("no vmlinuz in {}", boot.display()))?;
    let kver = kernel
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .unwrap_or_default()
        .to_string();
    let initrd = ensure_initrd(cache, &root, &kver)?;
    Ok(Payload {
        kernel,
        initrd,
        package,
        version,
        deb_sha256: sha,
    })
}

/// An exclusive lock on `cache/.lock`, held until the returned file is dropped.
pub fn lock_cache(cache: &Path) -> Result<std::fs::File> {
    let path = cache.join(".lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    file.lock()
        .with_context(|| format!("locking {}", path.display()))?;
    Ok(file)
}

fn current_kernel_package() -> Result<String> {
    let out = Command::new("apt-cache")
        .args(["depends", KERNEL_METAPACKAGE])
        .output()
        .context("running apt-cache")?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|d| d.starts_with("linux-image-"))
        .map(str::to_string)
        .with_context(|| format!("apt-cache depends {KERNEL_METAPACKAGE} names no kernel"))
}

fn apt_show(package: &str) -> Result<HashMap<String, String>> {
    let out = Command::new("apt-cache")
        .args(["show", package])
        .output()
        .context("running apt-cache show")?;
    let text = String::from_utf8_lossy(&out.stdout);
    // Only the first stanza: the candidate version.
    let stanza = text.split("\n\n").next().unwrap_or_default();
    Ok(stanza
        .lines()
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect())
}

fn fetch_kernel(cache: &Path, package: &str, version: &str, sha: &str, root: &Path) -> Result<()> {
    let debs = cache.join("debs");
    std::fs::create_dir_all(&debs)?;
    let deb_name = format!("{package}_{}_amd64.deb", version.replace(':', "%3a"));
    let deb = debs.join(&deb_name);
    if !deb.exists() {
        eprintln!("pxelab: downloading {package} {version} ...");
        let status = Command::new("apt-get")
            .args(["download", &format!("{package}={version}")])
            .current_dir(&debs)
            .status()
            .context("running apt-get download")?;
        if !status.success() || !deb.exists() {
            bail!("apt-get download {package}={version} failed");
        }
    }
    let got = sha256_file(&deb)?;
    if got != sha {
        let _ = std::fs::remove_file(&deb);
        bail!("{deb_name}: SHA256 {got} does not match the archive's {sha}; removed it");
    }
    let _ = std::fs::remove_dir_all(root);
    std::fs::create_dir_all(root)?;
    crate::netns::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(root))?;
    Ok(())
}

/// SHA256 of a file, lowercase hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = std::io::Read::read(&mut f, &mut buf)?;
        if n == 0 {
            break;
        }
        h.update(buf.get(..n).unwrap_or_default());
    }
    Ok(hex(&h.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Module files by name (`-` and `_` are the same to the kernel).
fn module_index(dir: &Path) -> Result<HashMap<String, PathBuf>> {
    let mut out = HashMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)?.filter_map(|e| e.ok()) {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Some(name) = p.file_name().and_then(|n| n.to_str())
                && let Some(stem) = [".ko", ".ko.xz", ".ko.zst", ".ko.gz"]
                    .iter()
                    .find_map(|ext| name.strip_suffix(ext))
            {
                out.insert(stem.replace('-', "_"), p);
            }
        }
    }
    Ok(out)
}

/// The module's bytes, decompressed: busybox insmod reads only plain ELF.
fn module_bytes(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        Some("xz")
    } else if name.ends_with(".zst") {
        Some("zstd")
    } else if name.ends_with(".gz") {
        Some("gzip")
    } else {
        None
    };
    match tool {
        None => Ok(std::fs::read(path)?),
        Some(tool) => {
            let out = Command::new(tool)
                .arg("-dc")
                .arg(path)
                .output()
                .with_context(|| format!("running {tool} to decompress {name}"))?;
            if !out.status.success() {
                bail!("{tool} -dc {name} failed");
            }
            Ok(out.stdout)
        }
    }
}

/// The `depends=` entry of a module's .modinfo section.
fn module_depends(ko: &[u8]) -> Vec<String> {
    ko.split(|&b| b == 0)
        .filter_map(|s| s.strip_prefix(b"depends="))
        .flat_map(|d| {
            String::from_utf8_lossy(d)
                .split(',')
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .filter(|s| !s.is_empty())
        .map(|s| s.replace('-', "_"))
        .collect()
}

/// `names` and their dependencies, dependencies first.
fn resolve_modules(
    index: &HashMap<String, PathBuf>,
    config: &str,
    names: &[&str],
) -> Result<Vec<(String, Vec<u8>)>> {
    fn visit(
        name: &str,
        index: &HashMap<String, PathBuf>,
        config: &str,
        seen: &mut BTreeSet<String>,
        out: &mut Vec<(String, Vec<u8>)>,
    ) -> Result<()> {
        if !seen.insert(name.to_string()) {
            return Ok(());
        }
        let Some(path) = index.get(name) else {
            // Built into the kernel (=y) is fine; otherwise the kernel cannot drive this NIC.
            let key = format!("CONFIG_{}=y", name.to_ascii_uppercase());
            if config.lines().any(|l| l == key) || !REQUIRED_MODULES.contains(&name) {
                return Ok(());
            }
            bail!("module {name} is neither built in nor shipped with the kernel");
        };
        let bytes = module_bytes(path)?;
        for dep in module_depends(&bytes) {
            visit(&dep, index, config, seen, out)?;
        }
        out.push((name.to_string(), bytes));
        Ok(())
    }
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for m in names {
        visit(m, index, config, &mut seen, &mut out)?;
    }
    Ok(out)
}

/// Modules of the payload's kernel: `names` and their dependencies, dependencies first, as
/// (name, plain ELF bytes). A name that is built in (`=y`) is skipped.
pub fn kernel_modules(payload: &Payload, names: &[&str]) -> Result<Vec<(String, Vec<u8>)>> {
    let boot = payload
        .kernel
        .parent()
        .with_context(|| format!("{}: no parent directory", payload.kernel.display()))?;
    let root = boot
        .parent()
        .with_context(|| format!("{}: not in a boot/ directory", payload.kernel.display()))?;
    let kver = payload
        .kernel
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .with_context(|| format!("{}: not a vmlinuz-<version>", payload.kernel.display()))?;
    let config = std::fs::read_to_string(boot.join(format!("config-{kver}"))).unwrap_or_default();
    let index = module_index(&root.join("lib/modules").join(kver))?;
    let modules = resolve_modules(&index, &config, names)?;
    for name in names {
        let key = format!("CONFIG_{}=y", name.to_ascii_uppercase());
        if !modules.iter().any(|(n, _)| n == name) && !config.lines().any(|l| l == key) {
            bail!(
                "module {name} is neither built in nor shipped with {}",
                payload.package
            );
        }
    }
    Ok(modules)
}

/// The /init script. Every line it prints with [`STAGE_MARKER`] is evidence for the oracle.
pub fn init_script() -> String {
    let userspace = BootStage::OsUserspace.as_str();
    let phone = BootStage::OsPhoneHome.as_str();
    let custom = BootStage::OsCustom.as_str();
    format!(
        r#"#!/bin/sh
# pxelab test OS: report stages on the console, configure the NIC, phone home, power off.
export PATH=/bin:/sbin
mkdir -p /proc /sys /dev /tmp /run
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
echo "{STAGE_MARKER} {userspace}"
fail() {{ echo "{FAIL_MARKER} $1 $2"; poweroff -f; }}
# Load the NIC drivers in dependency order; a missing device is not an error.
for m in $(cat /etc/pxelab/modules); do insmod /lib/modules/$m.ko 2>/dev/null; done
phone=""
for arg in $(cat /proc/cmdline); do
  case "$arg" in {PHONE_PARAM}=*) phone="${{arg#{PHONE_PARAM}=}}" ;; esac
done
i=0
while [ ! -e /sys/class/net/eth0 ]; do
  i=$((i+1)); [ $i -gt 100 ] && fail {custom} "no eth0 after 10s"
  sleep 0.1
done
ip link set lo up
ip link set eth0 up
udhcpc -i eth0 -s /etc/pxelab/udhcpc.script -n -q -t 10 -T 2 || fail {custom} "udhcpc got no lease"
mac=$(cat /sys/class/net/eth0/address)
echo "{STAGE_MARKER} {custom} net-up $(ip -4 -o addr show eth0 | awk '{{print $4}}') mac=$mac"
if [ -n "$phone" ]; then
  case "$phone" in *\?*) sep='&' ;; *) sep='?' ;; esac
  # busybox 1.35 wget segfaults with -T; bound it with timeout instead.
  if timeout 15 wget -q -O /tmp/phone "${{phone}}${{sep}}mac=$mac"; then
    echo "{STAGE_MARKER} {phone} ok"
  else
    fail {phone} "wget $phone failed"
  fi
fi
poweroff -f
"#
    )
}

/// The udhcpc hook: apply the lease busybox hands us in the environment.
pub const UDHCPC_SCRIPT: &str = r#"#!/bin/sh
case "$1" in
  deconfig) ip addr flush dev "$interface"; ip link set "$interface" up ;;
  bound|renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/${mask:-24}" dev "$interface"
    [ -n "$router" ] && ip route add default via "${router%% *}" dev "$interface"
    ;;
esac
exit 0
"#;

fn ensure_initrd(cache: &Path, kernel_root: &Path, kver: &str) -> Result<PathBuf> {
    let busybox = std::fs::read(BUSYBOX)
        .with_context(|| format!("reading {BUSYBOX} (apt-get install busybox-static)"))?;
    let mod_dir = kernel_root.join("lib/modules").join(kver);
    let config = std::fs::read_to_string(kernel_root.join("boot").join(format!("config-{kver}")))
        .unwrap_or_default();
    let index = module_index(&mod_dir)?;
    let modules = resolve_modules(&index, &config, NIC_MODULES)?;
    let init = init_script();

    let mut h = Sha256::new();
    h.update(INITRD_FORMAT);
    h.update(&busybox);
    h.update(&init);
    h.update(UDHCPC_SCRIPT);
    for (name, bytes) in &modules {
        h.update(name);
        h.update(bytes);
    }
    let key = hex(&h.finalize());
    let path = cache.join(format!("initrd-{}.cpio.gz", key.get(..16).unwrap_or(&key)));
    if path.exists() {
        return Ok(path);
    }

    let applets = Command::new(BUSYBOX).arg("--list").output()?;
    let applets: BTreeSet<String> = String::from_utf8_lossy(&applets.stdout)
        .lines()
        .map(str::trim)
        .filter(|a| !a.is_empty() && !a.contains('/') && *a != "busybox")
        .map(str::to_string)
        .collect();

    let tmp = path.with_extension("tmp");
    let file = std::fs::File::create(&tmp)?;
    let gz = flate2::write::GzEncoder::new(file, flate2::Compression::default());
    let mut w = CpioWriter::new(gz);
    write_busybox_root(&mut w, &busybox, applets.iter().map(String::as_str))?;
    w.file("/init", 0o755, init.as_bytes())?;
    w.file("/etc/pxelab/udhcpc.script", 0o755, UDHCPC_SCRIPT.as_bytes())?;
    let mut order = String::new();
    for (name, bytes) in &modules {
        w.file(&format!("/lib/modules/{name}.ko"), 0o644, bytes)?;
        order.push_str(name);
        order.push('\n');
    }
    w.file("/etc/pxelab/modules", 0o644, order.as_bytes())?;
    let mut gz = w.finish()?;
    gz.flush()?;
    gz.finish()?;
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

/// What a module list looks like, for reports (name -> size).
pub fn describe_modules(modules: &[(String, Vec<u8>)]) -> BTreeMap<String, usize> {
    modules.iter().map(|(n, b)| (n.clone(), b.len())).collect()
}

/// The skeleton every test-OS initramfs starts with: the directories init mounts on, the
/// console device, busybox and a symlink per applet. The kernel opens /dev/console for init
/// before anything is mounted, so the node must be in the archive.
pub(crate) fn write_busybox_root<'a, W: Write>(
    w: &mut CpioWriter<W>,
    busybox: &[u8],
    applets: impl IntoIterator<Item = &'a str>,
) -> std::io::Result<()> {
    for d in [
        "/bin",
        "/sbin",
        "/dev",
        "/etc",
        "/etc/pxelab",
        "/lib",
        "/lib/modules",
        "/proc",
        "/sys",
        "/tmp",
        "/run",
    ] {
        w.dir(d, 0o755)?;
    }
    w.char_dev("/dev/console", 0o600, 5, 1)?;
    w.file("/bin/busybox", 0o755, busybox)?;
    for a in applets {
        w.symlink(&format!("/bin/{a}"), "busybox")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depends_are_read_from_modinfo() {
        let ko = b"\x7fELF junk\0license=GPL\0depends=mii,ne2k-pci\0vermagic=6.1\0";
        assert_eq!(module_depends(ko), vec!["mii", "ne2k_pci"]);
        assert!(module_depends(b"depends=\0").is_empty());
    }

    #[test]
    fn init_uses_the_stage_vocabulary() {
        let s = init_script();
        assert!(s.contains("PXELAB-STAGE os.userspace"));
        assert!(s.contains("PXELAB-STAGE os.phone-home ok"));
        assert!(s.contains("pxelab.phone="));
    }
}
