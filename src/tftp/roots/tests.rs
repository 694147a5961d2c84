//! Per-profile roots: which root serves which client, and that each root confines like the
//! main one.

use std::io::Read;
use std::net::Ipv4Addr;

use super::*;
use crate::mac::MacAddr;
use crate::policy::{ClientFacts, PolicyConfig, ServerAddrs, plan};

const INSTALLER: MacAddr = MacAddr([0x52, 0x54, 0, 0, 0, 1]);
const OTHER: MacAddr = MacAddr([0x52, 0x54, 0, 0, 0, 2]);
const SERVER: ServerAddrs = ServerAddrs {
    ip: Ipv4Addr::new(10, 0, 0, 1),
    http_port: 8080,
};

fn bytes(file: TftpFile) -> Vec<u8> {
    match file {
        TftpFile::Memory(b) => b.to_vec(),
        TftpFile::Disk { mut file, .. } => {
            let mut out = Vec::new();
            file.read_to_end(&mut out).unwrap();
            out
        }
    }
}

struct Setup {
    _tmp: tempfile::TempDir,
    roots: ProfileRoots,
}

/// Main root and an installer root, each with its own `boot.efi`; a secret next to both.
fn setup() -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let main = tmp.path().join("main");
    let installer = tmp.path().join("installer");
    std::fs::create_dir_all(&main).unwrap();
    std::fs::create_dir_all(installer.join("sub")).unwrap();
    std::fs::write(tmp.path().join("secret"), b"secret").unwrap();
    std::fs::write(main.join("boot.efi"), b"main boot").unwrap();
    std::fs::write(main.join("main-only"), b"main only").unwrap();
    std::fs::write(installer.join("boot.efi"), b"installer boot").unwrap();
    std::fs::write(installer.join("sub/x"), b"x").unwrap();
    std::os::unix::fs::symlink(tmp.path().join("secret"), installer.join("leak")).unwrap();
    std::os::unix::fs::symlink(&main, installer.join("to-main")).unwrap();
    let text = format!(
        r#"
[[profile]]
name = "default"
nbp = "boot.efi"

[[profile]]
name = "installer"
nbp = "boot.efi"
tftp_root = "{}"

[[machine]]
mac = "{INSTALLER}"
profile = "installer"
"#,
        installer.display()
    );
    let cfg: PolicyConfig = toml::from_str(&text).unwrap();
    let policy = Arc::new(cfg.validate().unwrap());
    let main_source: Arc<dyn FileSource> = Arc::new(RootSource::new(&main, false, &[]).unwrap());
    let lookup_policy = policy.clone();
    // 10.0.0.11 is the installer machine, 10.0.0.12 another one, anything else unknown.
    let plan_of: PlanLookup = Arc::new(move |ip: IpAddr| {
        let mac = match ip {
            IpAddr::V4(v4) if v4 == Ipv4Addr::new(10, 0, 0, 11) => INSTALLER,
            IpAddr::V4(v4) if v4 == Ipv4Addr::new(10, 0, 0, 12) => OTHER,
            _ => return None,
        };
        let facts = ClientFacts {
            mac,
            ..ClientFacts::default()
        };
        Some(plan(
            &lookup_policy,
            &facts,
            &crate::policy::BootState::default(),
            &SERVER,
        ))
    });
    let roots = ProfileRoots::new(main_source, &policy, &TftpConfig::default(), plan_of).unwrap();
    Setup { _tmp: tmp, roots }
}

fn peer(last: u8) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, last], 2000))
}

#[test]
fn each_client_is_served_from_its_profiles_root() {
    let s = setup();
    let installer = s.roots.open(peer(11), "boot.efi").unwrap();
    assert_eq!(bytes(installer), b"installer boot");
    let other = s.roots.open(peer(12), "/boot.efi").unwrap();
    assert_eq!(bytes(other), b"main boot");
    // A client the server cannot name gets the main root.
    let unknown = s.roots.open(peer(99), "boot.efi").unwrap();
    assert_eq!(bytes(unknown), b"main boot");
    // The installer's root is all its client sees: the main root's files are not there.
    assert!(matches!(
        s.roots.open(peer(11), "main-only"),
        Err(TftpFileError::NotFound)
    ));
    assert_eq!(bytes(s.roots.open(peer(11), "\\sub\\x").unwrap()), b"x");
}

#[test]
fn a_profile_root_confines_like_the_main_root() {
    let s = setup();
    for path in [
        "../secret",
        "/../secret",
        "sub/../../secret",
        "..\\secret",
        "leak",
        "to-main/boot.efi",
        "boot.efi\0",
        "../main/main-only",
    ] {
        let got = s.roots.open(peer(11), path);
        assert!(
            got.is_err(),
            "{path:?} must not be served from the installer root"
        );
    }
}

#[test]
fn a_missing_profile_root_is_a_start_up_error_naming_the_profile() {
    let tmp = tempfile::tempdir().unwrap();
    let text = format!(
        "[[profile]]\nname = \"broken\"\nlocal = true\ntftp_root = \"{}\"\n",
        tmp.path().join("nope").display()
    );
    let cfg: PolicyConfig = toml::from_str(&text).unwrap();
    let policy = cfg.validate().unwrap();
    let main: Arc<dyn FileSource> = Arc::new(RootSource::new(tmp.path(), false, &[]).unwrap());
    let err = match ProfileRoots::new(main, &policy, &TftpConfig::default(), Arc::new(|_| None)) {
        Ok(_) => panic!("a missing tftp_root must be refused"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("profile `broken`") && err.contains("nope"),
        "{err}"
    );
}
