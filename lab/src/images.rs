//! The `pxe-server` recipe: a bootable disk image whose initramfs is the whole server OS.
//!
//! Layout: an MBR (SYSLINUX's `mbr.bin`) with one active FAT16 partition at 1 MiB holding
//! SYSLINUX, the lab's Debian kernel and an initramfs made of two concatenated archives (the
//! kernel unpacks them in order, later files win): the lab's test-OS initramfs (busybox, NIC
//! modules) and an overlay with pxed, the glibc libraries it links, the boot tree and a server
//! `/init`. No distro is installed, no loop device or root is needed (mtools writes the FAT),
//! and the image is tens of MB. Any BIOS boots it: QEMU's SeaBIOS, VirtualBox, libvirt.
//!
//! The server prints its BootEvents on the serial console as `PXELAB-EVENT <json>` and
//! `PXELAB-SERVER ready` once pxed answers HTTP, which is how the lab watches it.

use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use pxed::stage::BootStage;
use sha2::{Digest, Sha256};

use crate::cpio::CpioWriter;
use crate::payload::Payload;
use crate::vmdef::VmFile;

/// Bump when the image layout changes, so cached images are rebuilt.
const IMAGE_FORMAT: &str = "pxelab-server-image-v2";
/// Kernel modules for a state disk (virtio-blk with ext4 on it); ext4 needs a crc32c driver
/// for its metadata checksums and only names it as a soft dependency, so it is listed.
const STATE_DISK_MODULES: &[&str] = &["virtio_blk", "crc32c_generic", "ext4"];
/// Where the image lists the state-disk modules, in load order.
const STATE_DISK_MODULE_LIST: &str = "/etc/pxelab/state-disk-modules";
/// The console line before each stored lease the server lists at boot (state disk only).
pub const LEASE_PREFIX: &str = "PXELAB-LEASE ";
/// The console line after the lease listing.
pub const LEASES_END_LINE: &str = "PXELAB-LEASES-END";
/// The console line the server prints when its state disk cannot be mounted.
pub const STATE_DISK_FAILED_LINE: &str = "PXELAB-SERVER state-disk-failed";
/// SYSLINUX's MBR boot code and its modules (package syslinux-common).
const SYSLINUX_MBR: &str = "/usr/lib/syslinux/mbr/mbr.bin";
/// The iPXE binaries the server hands out (package ipxe).
const IPXE_FILES: &[&str] = &[
    "/usr/lib/ipxe/undionly.kpxe",
    "/usr/lib/ipxe/snponly.efi",
    "/usr/lib/ipxe/ipxe.efi",
];
/// Where the partition starts: 1 MiB, the alignment every partitioning tool uses.
const PARTITION_START_LBA: u64 = 2048;
const SECTOR: u64 = 512;
/// FAT16 needs at least this much; smaller images get this size.
const MIN_PARTITION_MIB: u64 = 32;
/// Free room on the partition beyond kernel and initramfs (FAT overhead, SYSLINUX).
const PARTITION_SLACK_MIB: u64 = 8;
/// The console line the server prints before each BootEvent JSON line.
pub const EVENT_PREFIX: &str = "PXELAB-EVENT ";
/// The console line the server prints once pxed serves.
pub const READY_LINE: &str = "PXELAB-SERVER ready";
/// The console line the server prints if pxed dies.
pub const DIED_LINE: &str = "PXELAB-SERVER pxed-exited";
/// pxed's HTTP port inside the image.
pub const HTTP_PORT: u16 = 8080;
/// The NIC inside the server VM.
const SERVER_IFACE: &str = "eth0";

/// A built server image.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ServerImage {
    /// The raw disk image (in the cache; never boot it writable: use a snapshot or a copy).
    pub disk: PathBuf,
    /// The server's address.
    pub address: Ipv4Addr,
    /// Prefix length.
    pub prefix_len: u8,
    /// Hash of every input (names the cached file).
    pub key: String,
    /// Whether this call built it (false: it came from the cache).
    pub built: bool,
}

/// Build (or find in `cache/images`) the `pxe-server` disk for `def` with `pxed` as binary.
pub fn ensure_server_image(
    cache: &Path,
    payload: &Payload,
    def: &VmFile,
    pxed: &Path,
) -> Result<ServerImage> {
    let server = def
        .server
        .as_ref()
        .context("the pxe-server recipe needs [server]")?;
    if server.prefix_len != 24 {
        bail!("[server] prefix_len: the lab network is a /24");
    }
    let ip = server.address;
    let [a, b, c, _] = ip.octets();
    let template = std::fs::read_to_string(&server.pxed_config)
        .with_context(|| format!("reading {}", server.pxed_config.display()))?;
    let phone = format!(
        "http://{ip}:{HTTP_PORT}/api/phone-home?stage={}",
        BootStage::OsPhoneHome.as_str()
    );
    let config = template
        .replace("{server_ip}", &ip.to_string())
        .replace("{interface}", SERVER_IFACE)
        .replace("{event_log}", "/run/events.jsonl")
        .replace("{tftp_root}", "/srv/tftp")
        .replace("{kernel}", "/srv/tftp/vmlinuz")
        .replace("{initrd}", "/srv/tftp/initrd.gz")
        .replace("{phone_url}", &phone)
        .replace("{pool_start}", &Ipv4Addr::new(a, b, c, 100).to_string())
        .replace("{pool_end}", &Ipv4Addr::new(a, b, c, 199).to_string())
        // The whole /24 but the server (.1) and one host-side peer (.2).
        .replace("{pool_wide_start}", &Ipv4Addr::new(a, b, c, 3).to_string())
        .replace("{pool_wide_end}", &Ipv4Addr::new(a, b, c, 254).to_string())
        .replace("{run_dir}", "/run");
    let init = server_init(ip, server.prefix_len);
    let disk_modules = crate::payload::kernel_modules(payload, STATE_DISK_MODULES)?;
    let syslinux_cfg = syslinux_cfg();
    let libs = shared_libraries(pxed)?;
    let pxed_bytes = std::fs::read(pxed).with_context(|| format!("reading {}", pxed.display()))?;
    let kernel = std::fs::read(&payload.kernel)?;
    let client_initrd = std::fs::read(&payload.initrd)?;
    let mut ipxe = Vec::new();
    for f in IPXE_FILES {
        let bytes =
            std::fs::read(f).with_context(|| format!("reading {f} (apt-get install ipxe)"))?;
        let name = Path::new(f)
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        ipxe.push((name, bytes));
    }
    let mbr = std::fs::read(SYSLINUX_MBR)
        .with_context(|| format!("reading {SYSLINUX_MBR} (apt-get install syslinux-common)"))?;

    let mut h = Sha256::new();
    for part in [
        IMAGE_FORMAT.as_bytes(),
        config.as_bytes(),
        init.as_bytes(),
        syslinux_cfg.as_bytes(),
        &pxed_bytes,
        &kernel,
        &client_initrd,
        &mbr,
        &tool_version("syslinux")?,
    ] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part);
    }
    for (name, bytes) in libs.iter().chain(&ipxe).chain(&disk_modules) {
        h.update(name.as_bytes());
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    }
    let key: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    let short = key.get(..16).unwrap_or(&key).to_string();
    let dir = cache.join("images");
    std::fs::create_dir_all(&dir)?;
    let disk = dir.join(format!("pxe-server-{short}.raw"));
    let mut image = ServerImage {
        disk: disk.clone(),
        address: ip,
        prefix_len: server.prefix_len,
        key,
        built: false,
    };
    if disk.exists() {
        return Ok(image);
    }

    // Build in a private directory next to the result and rename at the end: a crash leaves
    // no half-written image under the final name.
    let work = tempdir_in(&dir, "build")?;
    let stripped = work.path.join("pxed");
    crate::netns::run(Command::new("strip").arg("-o").arg(&stripped).arg(pxed))
        .context("strip (apt-get install binutils)")?;
    let pxed_small = std::fs::read(&stripped)?;

    let overlay = {
        let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        let mut w = CpioWriter::new(gz);
        for d in [
            "/usr",
            "/usr/bin",
            "/lib64",
            "/lib/x86_64-linux-gnu",
            "/srv",
            "/srv/tftp",
            "/etc",
        ] {
            w.dir(d, 0o755)?;
        }
        w.file("/init", 0o755, init.as_bytes())?;
        w.file("/etc/pxed.toml", 0o644, config.as_bytes())?;
        w.file("/usr/bin/pxed", 0o755, &pxed_small)?;
        for (path, bytes) in &libs {
            w.file(path, 0o755, bytes)?;
        }
        w.file("/srv/tftp/vmlinuz", 0o644, &kernel)?;
        w.file("/srv/tftp/initrd.gz", 0o644, &client_initrd)?;
        for (name, bytes) in &ipxe {
            w.file(&format!("/srv/tftp/{name}"), 0o644, bytes)?;
        }
        let mut order = String::new();
        for (name, bytes) in &disk_modules {
            w.file(&format!("/lib/modules/{name}.ko"), 0o644, bytes)?;
            order.push_str(name);
            order.push('\n');
        }
        w.file(STATE_DISK_MODULE_LIST, 0o644, order.as_bytes())?;
        let gz = w.finish()?;
        gz.finish()?
    };
    let mut initrd = client_initrd.clone();
    initrd.extend_from_slice(&overlay);
    let initrd_path = work.path.join("initrd.img");
    std::fs::write(&initrd_path, &initrd)?;
    let cfg_path = work.path.join("syslinux.cfg");
    std::fs::write(&cfg_path, &syslinux_cfg)?;

    let payload_mib = (kernel.len() as u64 + initrd.len() as u64).div_ceil(1 << 20);
    let part_mib = (payload_mib + PARTITION_SLACK_MIB).max(MIN_PARTITION_MIB);
    let part = work.path.join("part.img");
    // -h: the hidden-sectors field must say where the partition starts, SYSLINUX's boot
    // sector adds it to find ldlinux.sys.
    crate::netns::run(
        Command::new("mkfs.fat")
            .args(["-C", "-F", "16", "-n", "PXESERVER", "-i", "50584531"])
            .args(["-h", &PARTITION_START_LBA.to_string()])
            .arg(&part)
            .arg((part_mib * 1024).to_string()),
    )
    .context("mkfs.fat (apt-get install dosfstools)")?;
    for (from, to) in [
        (payload.kernel.as_path(), "::vmlinuz"),
        (initrd_path.as_path(), "::initrd.img"),
        (cfg_path.as_path(), "::syslinux.cfg"),
    ] {
        crate::netns::run(
            Command::new("mcopy")
                .arg("-i")
                .arg(&part)
                .arg(from)
                .arg(to)
                .env("MTOOLS_SKIP_CHECK", "1"),
        )
        .context("mcopy (apt-get install mtools)")?;
    }
    crate::netns::run(Command::new("syslinux").arg("--install").arg(&part))
        .context("syslinux (apt-get install syslinux)")?;

    let raw = work.path.join("disk.raw");
    let part_bytes = std::fs::read(&part)?;
    let mut out = std::fs::File::create(&raw)?;
    out.write_all(&mbr_sector(&mbr, part_bytes.len() as u64 / SECTOR)?)?;
    // Zeros up to the partition start.
    out.write_all(&vec![0u8; ((PARTITION_START_LBA - 1) * SECTOR) as usize])?;
    out.write_all(&part_bytes)?;
    out.sync_all()?;
    drop(out);
    std::fs::rename(&raw, &disk)?;
    image.built = true;
    Ok(image)
}

/// The first sector: SYSLINUX's MBR code, a disk signature, one active FAT16 (LBA) partition.
fn mbr_sector(code: &[u8], part_sectors: u64) -> Result<Vec<u8>> {
    let mut s = vec![0u8; SECTOR as usize];
    let code = code.get(..440.min(code.len())).unwrap_or_default();
    s.get_mut(..code.len())
        .context("MBR code")?
        .copy_from_slice(code);
    // Disk signature (bytes 440..444): fixed, so the image is reproducible.
    s.get_mut(440..444)
        .context("MBR")?
        .copy_from_slice(&0x7078_6c62u32.to_le_bytes());
    let sectors = u32::try_from(part_sectors).context("partition too large for MBR")?;
    let start = u32::try_from(PARTITION_START_LBA).context("start")?;
    let mut entry = [0u8; 16];
    entry[0] = 0x80; // active
    // CHS fields at their maximum: LBA addressing only (mbr.bin uses EDD).
    entry[1..4].copy_from_slice(&[0xfe, 0xff, 0xff]);
    entry[4] = 0x0e; // FAT16, LBA
    entry[5..8].copy_from_slice(&[0xfe, 0xff, 0xff]);
    entry[8..12].copy_from_slice(&start.to_le_bytes());
    entry[12..16].copy_from_slice(&sectors.to_le_bytes());
    s.get_mut(446..462).context("MBR")?.copy_from_slice(&entry);
    s.get_mut(510..512)
        .context("MBR")?
        .copy_from_slice(&[0x55, 0xaa]);
    Ok(s)
}

fn syslinux_cfg() -> String {
    // Serial first so the lab (and a VirtualBox serial port) sees the boot; tty0 too so a
    // VirtualBox window shows it. The last console= is /dev/console, where init writes.
    "SERIAL 0 115200\n\
     DEFAULT pxe-server\n\
     PROMPT 0\n\
     TIMEOUT 0\n\
     LABEL pxe-server\n\
     \x20 LINUX /vmlinuz\n\
     \x20 INITRD /initrd.img\n\
     \x20 APPEND console=tty0 console=ttyS0,115200 panic=10 no_timer_check loglevel=4\n"
        .to_string()
}

/// The server's /init.
pub fn server_init(ip: Ipv4Addr, prefix_len: u8) -> String {
    format!(
        r#"#!/bin/sh
# pxelab pxe-server: static address on the lab network, pxed in full DHCP mode.
export PATH=/bin:/sbin:/usr/bin
mkdir -p /proc /sys /dev /tmp /run /run/pxed-state
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
echo "PXELAB-SERVER booting"
for m in $(cat /etc/pxelab/modules); do insmod /lib/modules/$m.ko 2>/dev/null; done
i=0
while [ ! -e /sys/class/net/{SERVER_IFACE} ]; do
  i=$((i+1)); [ $i -gt 200 ] && {{ echo "PXELAB-SERVER no-nic"; poweroff -f; }}
  sleep 0.1
done
# A virtio block device (virtio device id 2), when the VM has one, is pxed's state directory:
# an ext4 file system whose journal the kernel replays on mount after a power cut.
state_disk=""
for d in /sys/bus/virtio/devices/*; do
  [ "$(cat $d/device 2>/dev/null)" = 0x0002 ] && state_disk=/dev/vda
done
if [ -n "$state_disk" ]; then
  for m in $(cat {STATE_DISK_MODULE_LIST}); do insmod /lib/modules/$m.ko 2>/dev/null; done
  i=0
  until [ -b $state_disk ]; do
    i=$((i+1)); [ $i -gt 100 ] && {{ echo "{STATE_DISK_FAILED_LINE} no $state_disk"; poweroff -f; }}
    sleep 0.1
  done
  mount -t ext4 $state_disk /run/pxed-state || {{ echo "{STATE_DISK_FAILED_LINE} mount"; poweroff -f; }}
fi
ip link set lo up
ip link set {SERVER_IFACE} up
ip addr add {ip}/{prefix_len} dev {SERVER_IFACE}
: > /run/events.jsonl
# Every BootEvent goes to the console with a prefix, one line each.
(tail -n +1 -f /run/events.jsonl | while read -r line; do echo "{EVENT_PREFIX}$line"; done) &
/usr/bin/pxed serve --config /etc/pxed.toml > /run/pxed.log 2>&1 &
pxed=$!
i=0
until wget -q -O /dev/null http://{ip}:{HTTP_PORT}/api/machines 2>/dev/null; do
  i=$((i+1))
  if [ $i -gt 600 ] || ! kill -0 $pxed 2>/dev/null; then
    cat /run/pxed.log; echo "{DIED_LINE}"; poweroff -f
  fi
  sleep 0.1
done
if [ -n "$state_disk" ]; then
  # What pxed loaded from the disk, before any client was served (WAL lets this read run
  # beside pxed).
  /usr/bin/pxed leases --config /etc/pxed.toml | tail -n +2 | while read -r line; do
    echo "{LEASE_PREFIX}$line"
  done
  echo "{LEASES_END_LINE}"
fi
echo "{READY_LINE} {ip}"
wait $pxed
cat /run/pxed.log
echo "{DIED_LINE}"
poweroff -f
"#
    )
}

/// The shared libraries a binary needs (from `ldd`), as (path in the image, bytes).
fn shared_libraries(binary: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .context("running ldd")?;
    if !out.status.success() {
        // A static binary: nothing to copy.
        return Ok(Vec::new());
    }
    let mut libs = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x..)` or `/lib64/ld-linux.. (0x..)`.
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        let Some(path) = path.filter(|p| p.starts_with('/')) else {
            continue;
        };
        let bytes = std::fs::read(path).with_context(|| format!("reading {path}"))?;
        libs.push((path.to_string(), bytes));
    }
    Ok(libs)
}

fn tool_version(tool: &str) -> Result<Vec<u8>> {
    let out = Command::new(tool)
        .arg("--version")
        .output()
        .with_context(|| format!("running {tool} (apt-get install {tool})"))?;
    let mut v = out.stdout;
    v.extend_from_slice(&out.stderr);
    Ok(v)
}

/// A directory removed on drop.
pub struct TempDir {
    /// Its path.
    pub path: PathBuf,
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A fresh directory under `parent`, removed when the guard drops.
pub fn tempdir_in(parent: &Path, tag: &str) -> Result<TempDir> {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let path = parent.join(format!(".{tag}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&path);
    std::fs::create_dir_all(&path)?;
    Ok(TempDir { path })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mbr_has_one_active_partition() {
        let s = mbr_sector(&[0xfa; 440], 65536).unwrap();
        assert_eq!(&s[510..], &[0x55, 0xaa]);
        assert_eq!(s[446], 0x80);
        assert_eq!(s[450], 0x0e);
        assert_eq!(u32::from_le_bytes(s[454..458].try_into().unwrap()), 2048);
        assert_eq!(u32::from_le_bytes(s[458..462].try_into().unwrap()), 65536);
        assert!(s[462..510].iter().all(|&b| b == 0));
    }

    #[test]
    fn init_sets_the_address_and_reports_events() {
        let s = server_init(Ipv4Addr::new(10, 77, 1, 1), 24);
        assert!(s.contains("ip addr add 10.77.1.1/24 dev eth0"));
        assert!(s.contains("PXELAB-EVENT "));
        assert!(s.contains("pxed serve --config /etc/pxed.toml"));
    }
}
