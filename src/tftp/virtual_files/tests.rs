use std::net::Ipv4Addr;
use std::path::Path;

use super::*;
use crate::policy::PolicyConfig;
use crate::tftp::fs::RootSource;

const MAC: MacAddr = MacAddr([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
const OTHER: MacAddr = MacAddr([0x52, 0x54, 0x00, 0x99, 0x99, 0x99]);
const UUID: &str = "8a3b1c2d-5e6f-4a7b-8c9d-0123456789ab";

fn policy(toml_text: &str) -> Arc<Policy> {
    let cfg: PolicyConfig = toml::from_str(toml_text).unwrap();
    Arc::new(cfg.validate().unwrap())
}

/// The plan of a machine with no remembered state.
fn plan(policy: &Policy, facts: &ClientFacts, server: &ServerAddrs) -> BootPlan {
    crate::policy::plan(policy, facts, &crate::policy::BootState::default(), server)
}

fn server() -> ServerAddrs {
    ServerAddrs {
        ip: Ipv4Addr::new(10, 0, 0, 1),
        http_port: 8080,
    }
}

const POLICY: &str = r#"
[[profile]]
name = "node"
kernel = "debian/linux"
initrd = ["debian/initrd.gz", "extra.cpio"]
cmdline = "console=ttyS0 a='b c'"

[[profile]]
name = "disk"
local = true

[[profile]]
name = "tree"
nbp = "pxelinux.0"

[[profile]]
name = "by-uuid"
kernel = "uuid/linux"

[[machine]]
mac = "52:54:00:12:34:56"
profile = "node"

[[group]]
name = "uuid"
profile = "by-uuid"
match = { uuid = ["8A3B1C2D-5E6F-4A7B-8C9D-0123456789AB"] }

[[profile]]
name = "default"
nbp = "pxelinux.0"
"#;

fn parts(p: &str) -> Vec<String> {
    sanitize(p).unwrap()
}

#[test]
fn classifies_loader_names() {
    assert_eq!(
        classify(&parts("pxelinux.cfg/01-52-54-00-12-34-56")),
        Some(VirtualName::MacConfig(Loader::Pxelinux, MAC))
    );
    assert_eq!(
        classify(&parts("bios/pxelinux.cfg/01-52-54-00-12-34-56")),
        Some(VirtualName::MacConfig(Loader::Pxelinux, MAC))
    );
    assert_eq!(
        classify(&parts("/grub/grub.cfg-01-52-54-00-12-34-56")),
        Some(VirtualName::MacConfig(Loader::Grub, MAC))
    );
    assert_eq!(
        classify(&parts(&format!("pxelinux.cfg/{}", UUID.to_uppercase()))),
        Some(VirtualName::PxelinuxUuid(UUID.into()))
    );
    assert_eq!(classify(&parts("boot.ipxe")), Some(VirtualName::IpxeEntry));
    for other in [
        "pxelinux.cfg/default",
        "pxelinux.cfg/C0A80A05",
        "pxelinux.cfg/01-52:54:00:12:34:56",
        "pxelinux.cfg/01-52-54-00-12-34",
        "pxelinux.cfg/01-52-54-00-12-34-56-78",
        "01-52-54-00-12-34-56",
        "grub/grub.cfg",
        "grub/grub.cfg-C0A80A05",
        "sub/boot.ipxe",
        "pxelinux.0",
    ] {
        assert_eq!(classify(&parts(other)), None, "{other}");
    }
}

#[test]
fn pxelinux_kernel_and_local() {
    let p = policy(POLICY);
    let facts = ClientFacts {
        mac: MAC,
        ..Default::default()
    };
    let text = render_pxelinux(&plan(&p, &facts, &server()), &MAC).unwrap();
    assert!(text.contains("DEFAULT pxed\nLABEL pxed\n"), "{text}");
    assert!(text.contains("  KERNEL ::debian/linux\n"), "{text}");
    assert!(
        text.contains("  INITRD ::debian/initrd.gz,::extra.cpio\n"),
        "{text}"
    );
    assert!(text.contains("  APPEND console=ttyS0 a='b c'\n"), "{text}");

    let local = policy("[[profile]]\nname = \"default\"\nlocal = true\n");
    let text = render_pxelinux(&plan(&local, &facts, &server()), &MAC).unwrap();
    assert!(text.ends_with("LOCALBOOT 0\n"), "{text}");
    let text = render_grub(&plan(&local, &facts, &server()), &MAC).unwrap();
    assert!(text.ends_with("exit\n"), "{text}");
}

#[test]
fn grub_kernel_quotes_words() {
    let p = policy(POLICY);
    let facts = ClientFacts {
        mac: MAC,
        ..Default::default()
    };
    let text = render_grub(&plan(&p, &facts, &server()), &MAC).unwrap();
    assert!(
        text.contains("linux '/debian/linux' 'console=ttyS0' 'a='\\''b' 'c'\\'''\n"),
        "{text}"
    );
    assert!(
        text.contains("initrd '/debian/initrd.gz' '/extra.cpio'\nboot\n"),
        "{text}"
    );
}

#[test]
fn hostile_config_values_stay_on_their_line() {
    let p = policy(
        r#"
[[profile]]
name = "default"
kernel = "http://x/linux"
cmdline = "quiet\nLOCALBOOT 0"
[[profile]]
name = "b"
kernel = "a b"
[[machine]]
mac = "52:54:00:99:99:99"
profile = "b"
"#,
    );
    let facts = ClientFacts {
        mac: MAC,
        ..Default::default()
    };
    let plan_a = plan(&p, &facts, &server());
    let text = render_pxelinux(&plan_a, &MAC).unwrap();
    assert!(text.contains("is a URL"), "{text}");
    assert!(!text.contains("KERNEL"), "{text}");
    assert!(text.ends_with("LOCALBOOT 0\n"), "{text}");
    let text = render_grub(&plan_a, &MAC).unwrap();
    assert!(!text.contains("linux "), "{text}");
    assert!(text.ends_with("exit\n"), "{text}");

    let facts = ClientFacts {
        mac: OTHER,
        ..Default::default()
    };
    let text = render_pxelinux(&plan(&p, &facts, &server()), &OTHER).unwrap();
    assert!(text.contains("cannot be written"), "{text}");

    // A newline in the command line must not start a directive of its own.
    let p = policy(
        "[[profile]]\nname = \"default\"\nkernel = \"k\"\ncmdline = \"quiet\\nLOCALBOOT 0\"\n",
    );
    let text = render_pxelinux(&plan(&p, &facts, &server()), &OTHER).unwrap();
    assert!(text.contains("  APPEND quiet LOCALBOOT 0\n"), "{text}");
    assert_eq!(text.matches('\n').count(), 6, "{text}");
}

#[test]
fn nbp_and_ipxe_only_targets_fall_through() {
    let p = policy(
        r#"
[[profile]]
name = "default"
nbp = "pxelinux.0"
[[profile]]
name = "s"
script = "echo hi"
[[machine]]
mac = "52:54:00:99:99:99"
profile = "s"
"#,
    );
    for mac in [MAC, OTHER] {
        let facts = ClientFacts {
            mac,
            ..Default::default()
        };
        let pl = plan(&p, &facts, &server());
        assert_eq!(render_pxelinux(&pl, &mac), None);
        assert_eq!(render_grub(&pl, &mac), None);
    }
}

fn tree(dir: &Path) -> PolicyFiles {
    std::fs::create_dir_all(dir.join("pxelinux.cfg")).unwrap();
    std::fs::write(dir.join("pxelinux.cfg/default"), b"DEFAULT tree\n").unwrap();
    let root: Arc<dyn FileSource> = Arc::new(RootSource::new(dir, false, &[]).unwrap());
    PolicyFiles::new(root, policy(POLICY), server())
}

fn text(f: Result<TftpFile, TftpFileError>) -> String {
    match f {
        Ok(TftpFile::Memory(b)) => String::from_utf8(b.to_vec()).unwrap(),
        Ok(TftpFile::Disk { file, len, .. }) => {
            String::from_utf8(crate::tftp::fs::read_range(&file, 0, len as usize).unwrap()).unwrap()
        }
        Err(e) => format!("ERR {e}"),
    }
}

#[test]
fn precedence_real_file_then_virtual_then_tree() {
    let dir = tempfile::tempdir().unwrap();
    let files = tree(dir.path());
    let peer: SocketAddr = "10.0.0.50:2000".parse().unwrap();
    let mac_name = "pxelinux.cfg/01-52-54-00-12-34-56";
    // Virtual: the machine entry's kernel.
    assert!(text(files.open(peer, mac_name)).contains("KERNEL ::debian/linux"));
    // Other names in the chain are the tree's.
    assert_eq!(
        text(files.open(peer, "pxelinux.cfg/default")),
        "DEFAULT tree\n"
    );
    assert!(text(files.open(peer, "pxelinux.cfg/C0A80A05")).starts_with("ERR file not found"));
    // An nbp machine: no virtual file, pxelinux goes on to the tree's default.
    assert!(
        text(files.open(peer, "pxelinux.cfg/01-52-54-00-99-99-99"))
            .starts_with("ERR file not found")
    );
    // A real file with the same name wins.
    std::fs::write(dir.path().join(mac_name), b"DEFAULT admin\n").unwrap();
    assert_eq!(text(files.open(peer, mac_name)), "DEFAULT admin\n");
    // Traversal is still refused before anything is rendered.
    assert!(
        text(files.open(peer, "../pxelinux.cfg/01-52-54-00-12-34-56")).starts_with("ERR access")
    );
    // The iPXE entry script.
    let script = text(files.open(peer, "boot.ipxe"));
    assert!(script.starts_with("#!ipxe\n"), "{script}");
    assert!(
        script.contains("chain http://10.0.0.1:8080/ipxe/script?"),
        "{script}"
    );
}

#[test]
fn uuid_request_is_remembered_for_the_mac_request() {
    let dir = tempfile::tempdir().unwrap();
    let files = tree(dir.path());
    let peer: SocketAddr = "10.0.0.51:2000".parse().unwrap();
    let stranger: SocketAddr = "10.0.0.52:2000".parse().unwrap();
    let name = "pxelinux.cfg/01-52-54-00-99-99-99";
    assert!(
        text(files.open(peer, &format!("pxelinux.cfg/{UUID}"))).starts_with("ERR file not found")
    );
    assert!(text(files.open(peer, name)).contains("KERNEL ::uuid/linux"));
    // Another client address does not inherit it.
    assert!(text(files.open(stranger, name)).starts_with("ERR file not found"));
}

#[test]
fn uuid_memory_is_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let files = tree(dir.path());
    let now = Instant::now();
    for i in 0..(UUID_MEMORY_ENTRIES as u32 + 100) {
        files.remember_uuid(IpAddr::V4(Ipv4Addr::from(i)), UUID.into(), now);
    }
    assert!(files.uuids.lock().unwrap().len() <= UUID_MEMORY_ENTRIES);
}

/// A machine that finished its one-shot install gets a local-boot config from pxelinux and
/// GRUB, not the installer again: TFTP plans with the boot state HTTP records.
#[test]
fn finished_one_shot_machine_gets_a_local_boot_config() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("pxelinux.cfg")).unwrap();
    let root: Arc<dyn FileSource> = Arc::new(RootSource::new(dir.path(), false, &[]).unwrap());
    let p = policy(
        "[[profile]]\nname = \"default\"\nkernel = \"debian/linux\"\none_shot = \"os.installed\"\n",
    );
    let states = Arc::new(crate::http::MemoryBootStates::default());
    let files = PolicyFiles::new(root, p, server()).with_boot_states(states.clone());
    let peer: SocketAddr = "10.0.0.50:2000".parse().unwrap();
    let pxelinux = "pxelinux.cfg/01-52-54-00-12-34-56";
    let grub = "grub/grub.cfg-01-52-54-00-12-34-56";
    assert!(text(files.open(peer, pxelinux)).contains("KERNEL ::debian/linux"));
    assert!(text(files.open(peer, grub)).contains("linux "));
    states.record(MAC, "os.installed").unwrap();
    let done = text(files.open(peer, pxelinux));
    assert!(!done.contains("KERNEL"), "{done}");
    assert!(done.contains("LOCALBOOT"), "{done}");
    assert!(done.contains("one-shot, done (os.installed"), "{done}");
    let done = text(files.open(peer, grub));
    assert!(!done.contains("linux "), "{done}");
    assert!(done.ends_with("exit\n"), "{done}");
    // Another machine still installs.
    let other = text(files.open(peer, "pxelinux.cfg/01-52-54-00-99-99-99"));
    assert!(other.contains("KERNEL ::debian/linux"), "{other}");
}

/// GRUB asks for `grub.cfg-01-<mac>` with nothing but its MAC: the config follows the plan for
/// the architecture the machine's firmware told DHCP (an arm64 GRUB gets the arm64 kernel).
#[test]
fn grub_config_follows_the_architecture_the_firmware_sent_to_dhcp() {
    let dir = tempfile::tempdir().unwrap();
    let root: Arc<dyn FileSource> = Arc::new(RootSource::new(dir.path(), false, &[]).unwrap());
    let p = policy(
        r#"
[[profile]]
name = "arm"
kernel = "arm64/linux"

[[group]]
name = "arm64"
profile = "arm"
match = { arch = [11] }

[[profile]]
name = "default"
kernel = "x86/linux"
"#,
    );
    let firmware = Arc::new(FirmwareMemory::default());
    let files = PolicyFiles::new(root, p, server()).with_firmware_memory(firmware.clone());
    let peer: SocketAddr = "10.0.0.60:2000".parse().unwrap();
    let name = "grub/grub.cfg-01-52-54-00-12-34-56";
    // No DHCP request seen: the default plan.
    assert!(text(files.open(peer, name)).contains("x86/linux"));
    firmware.remember(
        MAC,
        crate::policy::FirmwareFacts {
            arch_code: Some(11),
            vendor_class: Some("PXEClient:Arch:00011:UNDI:003000".into()),
        },
    );
    let cfg = text(files.open(peer, name));
    assert!(cfg.contains("arm64/linux"), "{cfg}");
    // Another machine is not affected.
    assert!(text(files.open(peer, "grub/grub.cfg-01-52-54-00-99-99-99")).contains("x86/linux"));
}
