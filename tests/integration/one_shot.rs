//! A one-shot profile ("install once, then boot locally") seen through every door pxed has:
//! the real `pxed` binary in full DHCP mode with TFTP and HTTP, real clients (busybox udhcpc
//! as a PXE client, tftp-hpa as pxelinux would ask, curl as the installed OS phoning home).
//! After the phone-home, DHCP, TFTP and HTTP all send the machine to its local disk.

use std::path::Path;
use std::time::Duration;

use crate::require_root;
use crate::support::{Daemon, Lan, NetNs, run, udp_listening, wait_for};

const SERVER: &str = "10.78.0.1";
/// A UUID the DHCP client sends in option 97, as iPXE's `${uuid}` would print it.
const UUID: &str = "11223344-5566-4788-99aa-bbccddeeff00";
/// The same UUID as option 97 bytes (type 0, then the GUID with its first three fields
/// little-endian, as firmware sends it; see `pxe_options::format_uuid`).
const UUID_OPTION: &str = "00443322116655884799aabbccddeeff00";

/// `pxed`'s boot file for a DHCP exchange of busybox udhcpc posing as a BIOS PXE client (which
/// also takes the offered address, for the TFTP and HTTP clients that follow).
fn dhcp_boot_file(ns: &NetNs, dir: &Path, name: &str) -> String {
    let log = dir.join(format!("{name}.events"));
    let script = dir.join(format!("{name}.sh"));
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nif [ \"$1\" = bound ]; then\n  ip addr flush dev $interface\n  \
             ip addr add $ip/$mask dev $interface\n  \
             echo \"boot_file=$boot_file siaddr=$siaddr\" >> {}\nfi\nexit 0\n",
            log.display()
        ),
    )
    .unwrap();
    run("chmod", &["+x", script.to_str().unwrap()]);
    let mut cmd = ns.command("udhcpc");
    cmd.args(["-f", "-q", "-n", "-i", "eth0", "-t", "5", "-T", "1", "-s"])
        .arg(&script)
        .args(["-V", "PXEClient:Arch:00000:UNDI:002001"])
        .args(["-x", "0x5d:0000", "-x", &format!("0x61:{UUID_OPTION}")]);
    let mut client = Daemon::spawn(cmd, &dir.join(format!("{name}.log")));
    let line = wait_for("udhcpc bound", Duration::from_secs(20), || {
        std::fs::read_to_string(&log)
            .ok()
            .and_then(|t| t.lines().last().map(str::to_string))
    });
    let _ = client.child.wait();
    line
}

/// The file pxelinux would read, fetched with tftp-hpa from the client's namespace.
fn tftp_get(ns: &NetNs, dir: &Path, remote: &str) -> String {
    let local = dir.join("tftp.out");
    let _ = std::fs::remove_file(&local);
    let out = ns
        .command("tftp")
        .args(["-m", "binary", SERVER, "-c", "get", remote])
        .arg(&local)
        .output()
        .unwrap();
    std::fs::read_to_string(&local).unwrap_or_else(|_| {
        format!(
            "ERR tftp: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn curl(ns: &NetNs, url: &str) -> String {
    let out = ns
        .command("curl")
        .args(["-sS", "-f", url])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "curl {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn finished_one_shot_boots_locally_through_dhcp_tftp_and_http() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    let mut lan = Lan::new();
    let srv = lan.host("osv", Some(&format!("{SERVER}/24")));
    // One machine whose profile hands the firmware a loader (DHCP decides), one whose profile
    // is a kernel that pxelinux (as its "iPXE") reads from a config pxed renders (TFTP decides).
    let nbp = lan.host("onb", None);
    let kern = lan.host("okn", None);
    let nbp_mac = crate::support::mac_of(&lan.hosts[nbp]);
    let kern_mac = crate::support::mac_of(&lan.hosts[kern]);
    let root = dir.path().join("root");
    std::fs::create_dir_all(root.join("templates")).unwrap();
    std::fs::write(root.join("templates/id.txt"), "uuid={{ uuid }}\n").unwrap();
    let cfg = dir.path().join("pxed.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
[server]
interface = "eth0"
root = "{root}"
state_dir = "{state}"

[dhcp]
mode = "full"

[[dhcp.subnet]]
network = "10.78.0.0"
prefix_len = 24
pool_start = "10.78.0.100"
pool_end = "10.78.0.199"
lease_time = "1h"

[[profile]]
name = "install-loader"
nbp = "installer/pxelinux.0"
one_shot = "os.installed"

[[profile]]
name = "install-kernel"
kernel = "k/kern"
cmdline = "auto url={{{{ templates_url }}}}id.txt"
one_shot = "os.installed"

[[profile]]
name = "default"
local = true

[[machine]]
mac = "{nbp_mac}"
profile = "install-loader"

[[machine]]
mac = "{kern_mac}"
profile = "install-kernel"
"#,
            root = root.display(),
            state = dir.path().join("state").display(),
        ),
    )
    .unwrap();
    let mut pxed =
        crate::support::start_pxed(&lan.hosts[srv], &cfg, &dir.path().join("pxed.log"), &[]);
    wait_for("pxed's TFTP port", Duration::from_secs(10), || {
        pxed.assert_running();
        udp_listening(&lan.hosts[srv], 69).then_some(())
    });
    let diag = |pxed: &Daemon| format!("pxed log:\n{}", pxed.log_text());
    let hyphen = |mac: &str| mac.replace(':', "-");
    let pxelinux_cfg = format!("pxelinux.cfg/01-{}", hyphen(&kern_mac));
    let http = format!("http://{SERVER}:8080");

    // Before: the loader machine is sent to its installer's loader, the kernel machine's
    // pxelinux config and iPXE script boot the installer kernel.
    let got = dhcp_boot_file(&lan.hosts[nbp], dir.path(), "nbp1");
    assert!(
        got.contains("boot_file=installer/pxelinux.0 "),
        "{got}\n{}",
        diag(&pxed)
    );
    let got = dhcp_boot_file(&lan.hosts[kern], dir.path(), "kern1");
    assert!(got.contains("boot_file=undionly.kpxe "), "{got}");
    let text = tftp_get(&lan.hosts[kern], dir.path(), &pxelinux_cfg);
    assert!(text.contains("KERNEL ::k/kern"), "{text}\n{}", diag(&pxed));
    let script = curl(
        &lan.hosts[kern],
        &format!("{http}/ipxe/script?mac={kern_mac}&platform=pcbios&buildarch=i386"),
    );
    // The script request carried no UUID: the one DHCP saw (option 97) is the template's.
    let url = script
        .split_whitespace()
        .find_map(|w| w.strip_prefix("url="))
        .unwrap_or_else(|| panic!("no url= in {script}"));
    assert_eq!(curl(&lan.hosts[kern], url), format!("uuid={UUID}\n"));

    // The installed systems report.
    for (host, mac) in [(nbp, &nbp_mac), (kern, &kern_mac)] {
        let r = curl(
            &lan.hosts[host],
            &format!("{http}/api/phone-home?mac={mac}&stage=os.installed"),
        );
        assert!(r.contains("\"one_shot_done\":true"), "{r}");
    }

    // After: no door leads back to an installer.
    let got = dhcp_boot_file(&lan.hosts[nbp], dir.path(), "nbp2");
    assert!(
        got.contains("boot_file=undionly.kpxe "),
        "iPXE, whose script exits to the disk: {got}\n{}",
        diag(&pxed)
    );
    let text = tftp_get(&lan.hosts[kern], dir.path(), &pxelinux_cfg);
    assert!(
        !text.contains("KERNEL") && text.contains("LOCALBOOT 0"),
        "{text}"
    );
    for mac in [&nbp_mac, &kern_mac] {
        let script = curl(
            &lan.hosts[kern],
            &format!("{http}/ipxe/script?mac={mac}&platform=pcbios&buildarch=i386"),
        );
        assert!(
            script.contains("one-shot, done (os.installed")
                && script.contains("\nexit 0\n")
                && !script.lines().any(|l| l.starts_with("kernel ")),
            "{script}"
        );
    }
    // The state survives a restart of pxed (it is on disk), and DHCP reads it from there.
    drop(pxed);
    let pxed =
        crate::support::start_pxed(&lan.hosts[srv], &cfg, &dir.path().join("pxed2.log"), &[]);
    let got = dhcp_boot_file(&lan.hosts[nbp], dir.path(), "nbp3");
    assert!(
        got.contains("boot_file=undionly.kpxe "),
        "{got}\n{}",
        diag(&pxed)
    );
}
