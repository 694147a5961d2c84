//! Real boot loaders read their per-machine config from pxed's virtual TFTP files: Debian's
//! pxelinux.0 (chained by QEMU's iPXE ROM under SeaBIOS) and a GRUB x86_64-efi network image
//! (loaded by OVMF's own PXE). `pxed serve` runs in full DHCP mode in a network namespace with
//! a bridge and a TAP for the VM; the boot root is an "unmodified tree" whose own
//! `pxelinux.cfg/default` and `grub/grub.cfg` must NOT be used, because the policy names this
//! machine.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use pxed::events::BootEvent;
use pxed::stage::BootStage;

use crate::require_root;
use crate::support::{Daemon, NetNs, run, udp_listening, wait_for};

/// One VM boot, power-on to the kernel's download, under TCG: measured 10-25 s alone; the
/// deadline leaves room for a 2-core machine running the rest of the suite at the same time.
const BOOT_DEADLINE: Duration = Duration::from_secs(90);
const SERVER: &str = "10.77.0.1";
/// ipxe.lkrn is a bzImage kernel that runs its command line as an iPXE script: the marker on
/// the serial console proves the kernel booted with the APPEND line pxed rendered.
const CMDLINE_MARKER: &str = "PXED-CMDLINE-OK";

struct Netboot {
    ns: NetNs,
    dir: tempfile::TempDir,
    _pxed: Daemon,
}

impl Netboot {
    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    fn events(&self) -> Vec<BootEvent> {
        std::fs::read_to_string(self.dir.path().join("events.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Completed TFTP files for `mac`, in order.
    fn completed(&self, mac: &str) -> Vec<String> {
        self.events()
            .into_iter()
            .filter(|e| e.mac.to_string() == mac && e.stage == BootStage::TftpComplete)
            .filter_map(|e| {
                let file = e.detail.strip_prefix("file=")?.split(' ').next()?;
                Some(file.trim_start_matches('/').to_string())
            })
            .collect()
    }

    fn requested(&self, mac: &str) -> Vec<String> {
        self.events()
            .into_iter()
            .filter(|e| e.mac.to_string() == mac && e.stage == BootStage::TftpRequest)
            .filter_map(|e| {
                let file = e.detail.strip_prefix("file=")?.split(' ').next()?;
                Some(file.trim_start_matches('/').to_string())
            })
            .collect()
    }

    fn start(policy: &str) -> Netboot {
        let ns = NetNs::new("pxtn");
        ns.ip(&["link", "add", "br0", "type", "bridge"]);
        ns.ip(&["addr", "add", &format!("{SERVER}/24"), "dev", "br0"]);
        ns.ip(&["link", "set", "br0", "up"]);
        ns.ip(&["tuntap", "add", "dev", "tap0", "mode", "tap"]);
        ns.ip(&["link", "set", "tap0", "master", "br0", "up"]);

        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        // The "distro tree": pxelinux, GRUB's network directory, and their generic configs.
        std::fs::create_dir_all(root.join("pxelinux.cfg")).unwrap();
        std::fs::create_dir_all(root.join("k")).unwrap();
        for (from, to) in [
            ("/usr/lib/PXELINUX/pxelinux.0", "pxelinux.0"),
            ("/usr/lib/syslinux/modules/bios/ldlinux.c32", "ldlinux.c32"),
            ("/usr/lib/ipxe/ipxe.lkrn", "k/kern"),
        ] {
            std::fs::copy(from, root.join(to))
                .unwrap_or_else(|e| panic!("{from} (Debian packages pxelinux, syslinux-common, ipxe; see scripts/setup): {e}"));
        }
        std::fs::write(root.join("k/initrd.img"), vec![0x5a; 5000]).unwrap();
        std::fs::write(root.join("pxelinux.cfg/default"), "DEFAULT tree\n").unwrap();
        run(
            "grub-mknetdir",
            &[
                &format!("--net-directory={}", root.display()),
                "--subdir=grub",
                "-d",
                "/usr/lib/grub/x86_64-efi",
            ],
        );
        std::fs::write(root.join("grub/grub.cfg"), "echo TREE-GRUB-CFG\n").unwrap();

        let config = format!(
            r#"
[server]
interface = "br0"
root = "{root}"
state_dir = "{state}"
event_log = "{events}"

[dhcp]
mode = "full"

[[dhcp.subnet]]
network = "10.77.0.0"
prefix_len = 24
pool_start = "10.77.0.100"
pool_end = "10.77.0.199"
lease_time = "1h"

[ipxe]
efi_x64 = "grub/x86_64-efi/core.efi"

{policy}
"#,
            root = root.display(),
            state = dir.path().join("state").display(),
            events = dir.path().join("events.jsonl").display(),
        );
        std::fs::create_dir_all(dir.path().join("state")).unwrap();
        let path = dir.path().join("pxed.toml");
        std::fs::write(&path, config).unwrap();
        let mut cmd = ns.command(env!("CARGO_BIN_EXE_pxed"));
        cmd.arg("serve").arg("--config").arg(&path);
        let mut pxed = Daemon::spawn(cmd, &dir.path().join("pxed.log"));
        wait_for("pxed's TFTP port", Duration::from_secs(20), || {
            pxed.assert_running();
            udp_listening(&ns, 69).then_some(())
        });
        Netboot {
            ns,
            dir,
            _pxed: pxed,
        }
    }

    fn qemu(&self, firmware: &[String], nic: &str, serial: &Path) -> Daemon {
        let mut cmd = self.ns.command("qemu-system-x86_64");
        // -nographic makes QEMU tell SeaBIOS to mirror the text console to the serial port
        // (fw_cfg `etc/sercon-port`), where iPXE's and pxelinux's output then appears.
        cmd.args(["-accel", "tcg", "-m", "512", "-nographic"])
            .args(["-no-reboot", "-boot", "n", "-monitor", "none"])
            .arg("-serial")
            .arg(format!("file:{}", serial.display()))
            .args(firmware)
            .args([
                "-netdev",
                "tap,id=n0,ifname=tap0,script=no,downscript=no",
                "-device",
                nic,
            ]);
        Daemon::spawn(cmd, &self.dir.path().join("qemu.log"))
    }

    /// Wait until `want` files completed in this order (others may come in between).
    fn wait_files(&self, vm: &mut Daemon, mac: &str, serial: &Path, want: &[&str]) {
        let started = Instant::now();
        let deadline = started + BOOT_DEADLINE;
        loop {
            let done = self.completed(mac);
            let mut it = done.iter();
            if want.iter().all(|w| it.any(|d| d == w)) {
                eprintln!("boot took {:?}", started.elapsed());
                return;
            }
            if Instant::now() > deadline || vm.child.try_wait().ok().flatten().is_some() {
                panic!(
                    "wanted {want:?} in order, got {done:?}\nserial:\n{}\npxed log:\n{}",
                    std::fs::read_to_string(serial).unwrap_or_default(),
                    std::fs::read_to_string(self.dir.path().join("pxed.log")).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

fn serial_contains(serial: &Path, needle: &str) -> bool {
    std::fs::read(serial)
        .map(|b| String::from_utf8_lossy(&b).contains(needle))
        .unwrap_or(false)
}

/// SeaBIOS + e1000: QEMU's iPXE ROM gets a script from pxed that chains pxelinux.0 over TFTP
/// (option 210 points pxelinux's path prefix at pxed's TFTP), pxelinux asks for
/// `pxelinux.cfg/01-<mac>`, pxed renders it from the machine's profile, and pxelinux loads the
/// kernel and initrd it names and boots the kernel with its APPEND line.
#[test]
fn real_pxelinux_reads_its_config_from_the_policy() {
    require_root!();
    const MAC: &str = "52:54:00:7e:00:01";
    let lab = Netboot::start(&format!(
        r#"
[[profile]]
name = "via-pxelinux"
script = "set 210:string tftp://${{next-server}}/\nchain tftp://${{next-server}}/pxelinux.0\n"

[[profile]]
name = "node"
kernel = "k/kern"
initrd = ["k/initrd.img"]
cmdline = "echo {CMDLINE_MARKER}"

[[profile]]
name = "default"
local = true

# iPXE (the NIC's ROM) chains pxelinux; pxelinux (not iPXE) gets the kernel.
[[group]]
name = "ipxe-first"
profile = "via-pxelinux"
match = {{ mac = ["{MAC}"], ipxe = true }}

[[group]]
name = "then-kernel"
profile = "node"
match = {{ mac = ["{MAC}"] }}
"#
    ));
    let serial = lab.dir.path().join("serial.log");
    let mut vm = lab.qemu(&[], &format!("e1000,netdev=n0,mac={MAC}"), &serial);
    let cfg = "pxelinux.cfg/01-52-54-00-7e-00-01";
    lab.wait_files(
        &mut vm,
        MAC,
        &serial,
        &["pxelinux.0", "ldlinux.c32", cfg, "k/kern", "k/initrd.img"],
    );
    wait_for("the kernel to run the APPEND line", BOOT_DEADLINE, || {
        serial_contains(&serial, CMDLINE_MARKER).then_some(())
    });
    assert!(
        serial_contains(&serial, &format!("pxed: {MAC} boots profile node")),
        "pxelinux's SAY line is missing; serial:\n{}",
        String::from_utf8_lossy(&std::fs::read(&serial).unwrap_or_default())
    );
    // The virtual file was found at the MAC step: the tree's later names were never read.
    let asked = lab.requested(MAC);
    assert!(
        !asked
            .iter()
            .any(|f| f == "pxelinux.cfg/default" || f.starts_with("pxelinux.cfg/0A")),
        "{asked:?}"
    );
    // No such file exists in the tree: pxed rendered it.
    assert!(!lab.root().join(cfg).exists());
}

/// OVMF's own PXE (virtio-net without option ROM) loads GRUB's network image from pxed; GRUB
/// searches `grub.cfg-01-<mac>` under its prefix, pxed renders it, and GRUB prints the marker
/// and loads the kernel and initrd. The tree's generic `grub.cfg` is never read.
#[test]
fn real_grub_efi_reads_its_config_from_the_policy() {
    require_root!();
    const MAC: &str = "52:54:00:7e:00:02";
    let lab = Netboot::start(
        r#"
[[profile]]
name = "node"
kernel = "k/kern"
initrd = ["k/initrd.img"]
cmdline = "console=ttyS0"

[[profile]]
name = "default"
local = true

[[machine]]
mac = "52:54:00:7e:00:02"
profile = "node"
"#,
    );
    let vars = lab.dir.path().join("vars.fd");
    std::fs::copy("/usr/share/OVMF/OVMF_VARS_4M.fd", &vars).unwrap();
    let firmware = [
        "-drive".to_string(),
        "if=pflash,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd".to_string(),
        "-drive".to_string(),
        format!("if=pflash,format=raw,file={}", vars.display()),
    ];
    let serial = lab.dir.path().join("serial.log");
    let mut vm = lab.qemu(
        &firmware,
        &format!("virtio-net-pci,netdev=n0,mac={MAC},romfile="),
        &serial,
    );
    lab.wait_files(
        &mut vm,
        MAC,
        &serial,
        &[
            "grub/x86_64-efi/core.efi",
            "grub/grub.cfg-01-52-54-00-7e-00-02",
            "k/kern",
            "k/initrd.img",
        ],
    );
    assert!(
        serial_contains(&serial, &format!("pxed: {MAC} boots profile node")),
        "{}",
        String::from_utf8_lossy(&std::fs::read(&serial).unwrap_or_default())
    );
    assert!(!serial_contains(&serial, "TREE-GRUB-CFG"));
    let asked = lab.requested(MAC);
    assert!(!asked.iter().any(|f| f == "grub/grub.cfg"), "{asked:?}");
}
