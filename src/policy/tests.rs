//! "Why did host X get Y": the policy decisions as unit tests.

use super::*;

/// The plan of a machine with no remembered state (most decisions do not depend on it).
fn plan(policy: &Policy, facts: &ClientFacts, server: &ServerAddrs) -> BootPlan {
    super::plan(policy, facts, &BootState::default(), server)
}

fn policy(toml_text: &str) -> Policy {
    let cfg: PolicyConfig = toml::from_str(toml_text).unwrap();
    cfg.validate().unwrap()
}

const SERVER: ServerAddrs = ServerAddrs {
    ip: Ipv4Addr::new(10, 0, 0, 1),
    http_port: 8080,
};

fn facts(mac: &str, arch: Option<u16>, ipxe: bool) -> ClientFacts {
    ClientFacts {
        mac: mac.parse().unwrap(),
        arch_code: arch,
        vendor_class: Some(format!(
            "PXEClient:Arch:{:05}:UNDI:003016",
            arch.unwrap_or(0)
        )),
        user_class: if ipxe { vec!["iPXE".into()] } else { vec![] },
        is_ipxe: ipxe,
        ..Default::default()
    }
}

const BASIC: &str = r#"
[[profile]]
name = "default"
kernel = "vmlinuz"
initrd = ["initrd.img"]
cmdline = "console=ttyS0"

[[profile]]
name = "rescue"
kernel = "rescue/vmlinuz"

[[profile]]
name = "disk"
local = true

[[group]]
name = "lab-vendor"
profile = "rescue"
match = { mac = ["52:54:00"] }

[[group]]
name = "lab-vendor-uefi"
profile = "disk"
match = { mac = ["52:54:00"], arch = [7] }

[[machine]]
mac = "52:54:00:00:00:99"
profile = "default"
hostname = "pinned"
"#;

#[test]
fn bios_firmware_gets_undionly_over_tftp() {
    let p = plan(
        &policy(BASIC),
        &facts("02:00:00:00:00:01", Some(0), false),
        &SERVER,
    );
    assert_eq!(p.profile, "default");
    assert_eq!(
        p.dhcp,
        DhcpBoot::Tftp {
            file: "undionly.kpxe".into()
        }
    );
}

#[test]
fn uefi_x64_gets_snponly_for_7_and_9() {
    for arch in [7, 9] {
        let p = plan(
            &policy(BASIC),
            &facts("02:00:00:00:00:01", Some(arch), false),
            &SERVER,
        );
        assert_eq!(
            p.dhcp,
            DhcpBoot::Tftp {
                file: "snponly.efi".into()
            },
            "arch {arch}"
        );
    }
}

#[test]
fn ipxe_gets_the_script_url_not_ipxe_again() {
    let p = plan(
        &policy(BASIC),
        &facts("02:00:00:00:00:01", Some(0), true),
        &SERVER,
    );
    assert_eq!(
        p.dhcp,
        DhcpBoot::Http {
            url: "http://10.0.0.1:8080/boot.ipxe".into()
        }
    );
}

#[test]
fn missing_arch_is_treated_as_bios() {
    let p = plan(
        &policy(BASIC),
        &facts("02:00:00:00:00:01", None, false),
        &SERVER,
    );
    assert_eq!(
        p.dhcp,
        DhcpBoot::Tftp {
            file: "undionly.kpxe".into()
        }
    );
}

#[test]
fn unknown_arch_is_ignored_with_a_reason() {
    let p = plan(
        &policy(BASIC),
        &facts("02:00:00:00:00:01", Some(4242), false),
        &SERVER,
    );
    match p.dhcp {
        DhcpBoot::Nothing { reason } => assert!(reason.contains("4242"), "{reason}"),
        other => panic!("expected Nothing, got {other:?}"),
    }
}

#[test]
fn arm64_without_a_binary_says_so() {
    let p = plan(
        &policy(BASIC),
        &facts("02:00:00:00:00:01", Some(11), false),
        &SERVER,
    );
    match p.dhcp {
        DhcpBoot::Nothing { reason } => assert!(reason.contains("no iPXE binary"), "{reason}"),
        other => panic!("expected Nothing, got {other:?}"),
    }
}

#[test]
fn http_client_gets_an_http_url_to_the_efi_binary() {
    let mut f = facts("02:00:00:00:00:01", Some(16), false);
    f.vendor_class = Some("HTTPClient:Arch:00016:UNDI:003000".into());
    let p = plan(&policy(BASIC), &f, &SERVER);
    assert_eq!(
        p.dhcp,
        DhcpBoot::Http {
            url: "http://10.0.0.1:8080/snponly.efi".into()
        }
    );
}

#[test]
fn most_specific_group_wins() {
    let pol = policy(BASIC);
    let bios = plan(&pol, &facts("52:54:00:00:00:01", Some(0), false), &SERVER);
    assert_eq!(bios.profile, "rescue");
    // Same vendor prefix, plus arch: the more specific group wins; 9 counts as 7.
    for arch in [7, 9] {
        let uefi = plan(
            &pol,
            &facts("52:54:00:00:00:01", Some(arch), false),
            &SERVER,
        );
        assert_eq!(uefi.profile, "disk", "arch {arch}: {}", uefi.reason);
    }
}

#[test]
fn machine_entry_beats_groups() {
    let p = plan(
        &policy(BASIC),
        &facts("52:54:00:00:00:99", Some(7), false),
        &SERVER,
    );
    assert_eq!(p.profile, "default");
    assert_eq!(p.hostname.as_deref(), Some("pinned"));
    assert!(p.reason.contains("machine entry"));
}

#[test]
fn no_default_means_ignore() {
    let pol = policy("[[profile]]\nname = \"x\"\nlocal = true\n");
    let p = plan(&pol, &facts("02:00:00:00:00:01", Some(0), false), &SERVER);
    assert!(matches!(p.dhcp, DhcpBoot::Nothing { .. }));
}

#[test]
fn nbp_profile_goes_straight_to_firmware() {
    let pol = policy("[[profile]]\nname = \"default\"\nnbp = \"pxelinux.0\"\n");
    let p = plan(&pol, &facts("02:00:00:00:00:01", Some(0), false), &SERVER);
    assert_eq!(
        p.dhcp,
        DhcpBoot::Tftp {
            file: "pxelinux.0".into()
        }
    );
}

#[test]
fn labels_relay_uuid_and_user_class_match() {
    let pol = policy(
        r#"
[[profile]]
name = "default"
local = true
[[profile]]
name = "a"
local = true
[[profile]]
name = "b"
local = true
[[group]]
name = "racked"
profile = "a"
match = { labels = ["rack1"], relay = ["10.9.0.1"] }
[[group]]
name = "by-uuid"
profile = "b"
match = { uuid = ["AAAAAAAA-0000-0000-0000-000000000001"] }
[[machine]]
mac = "02:00:00:00:00:05"
labels = ["rack1"]
"#,
    );
    let mut f = facts("02:00:00:00:00:05", Some(0), false);
    assert_eq!(plan(&pol, &f, &SERVER).profile, "default", "relay missing");
    f.relay = Some(Ipv4Addr::new(10, 9, 0, 1));
    assert_eq!(plan(&pol, &f, &SERVER).profile, "a");
    f.uuid = Some("aaaaaaaa-0000-0000-0000-000000000001".into());
    assert_eq!(plan(&pol, &f, &SERVER).profile, "b");
}

#[test]
fn validation_names_the_problem() {
    let cases = [
        ("[[profile]]\nname = \"p\"\n", "sets no way to boot"),
        (
            "[[profile]]\nname = \"p\"\nlocal = true\nnbp = \"x\"\n",
            "several ways",
        ),
        (
            "[[profile]]\nname = \"p\"\nlocal = true\n[[profile]]\nname = \"p\"\nlocal = true\n",
            "defined twice",
        ),
        (
            "[[group]]\nname = \"g\"\nprofile = \"nope\"\n",
            "group `g` refers to profile `nope`",
        ),
        (
            "[[profile]]\nname = \"p\"\nlocal = true\n[[group]]\nname = \"g\"\nprofile = \"p\"\nmatch = { mac = [\"5:4\"] }\n",
            "not a MAC",
        ),
        (
            "[[profile]]\nname = \"p\"\nlocal = true\n[[group]]\nname = \"g\"\nprofile = \"p\"\nmatch = { arch = [999] }\n",
            "999",
        ),
        (
            "[[profile]]\nname = \"p\"\ncmdline = \"x\"\nlocal = true\n",
            "need `kernel`",
        ),
    ];
    for (text, want) in cases {
        let cfg: PolicyConfig = toml::from_str(text).unwrap();
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains(want), "{text:?}: {err}");
    }
}

#[test]
fn unknown_keys_are_rejected() {
    let err =
        toml::from_str::<PolicyConfig>("[[group]]\nname=\"g\"\nprofile=\"p\"\nmatch={ macs=[] }\n")
            .unwrap_err()
            .to_string();
    assert!(err.contains("macs"), "{err}");
}

#[test]
fn one_shot_profile_boots_locally_once_its_stage_is_reached() {
    let p = policy(
        r#"
[[profile]]
name = "install"
kernel = "debian/linux"
one_shot = "os.installed"

[[group]]
name = "new"
profile = "install"
match = { mac = ["52:54:00"] }
"#,
    );
    let f = facts("52:54:00:00:00:01", Some(0), true);
    let fresh = super::plan(&p, &f, &BootState::default(), &SERVER);
    assert!(
        matches!(fresh.target, BootTarget::Kernel { .. }),
        "{fresh:?}"
    );
    // Another stage does not complete it.
    let other = BootState {
        reached: vec!["os.custom-thing".into()],
    };
    let still = super::plan(&p, &f, &other, &SERVER);
    assert!(matches!(still.target, BootTarget::Kernel { .. }));
    let done = BootState {
        reached: vec!["os.installed".into()],
    };
    let after = super::plan(&p, &f, &done, &SERVER);
    assert_eq!(after.target, BootTarget::Local);
    assert_eq!(after.profile, "install");
    assert!(
        after.reason.contains("one-shot, done (os.installed"),
        "{}",
        after.reason
    );
    assert!(p.is_one_shot_stage("os.installed"));
    assert!(!p.is_one_shot_stage("os.phone-home"));
}

#[test]
fn one_shot_stage_must_be_a_stage_name() {
    let cfg: PolicyConfig =
        toml::from_str("[[profile]]\nname = \"x\"\nlocal = true\none_shot = \"a b\"\n").unwrap();
    let err = cfg.validate().unwrap_err().to_string();
    assert!(err.contains("one_shot `a b`"), "{err}");
}

#[test]
fn the_plan_carries_the_profiles_tftp_root() {
    let p = policy(
        r#"
[[profile]]
name = "default"
nbp = "pxelinux.0"

[[profile]]
name = "vendor"
nbp = "pxelinux.0"
tftp_root = "/srv/vendor"

[[machine]]
mac = "52:54:00:00:00:01"
profile = "vendor"
"#,
    );
    let vendor = plan(&p, &facts("52:54:00:00:00:01", None, false), &SERVER);
    assert_eq!(vendor.profile, "vendor");
    assert_eq!(
        vendor.tftp_root.as_deref(),
        Some(std::path::Path::new("/srv/vendor"))
    );
    let other = plan(&p, &facts("52:54:00:00:00:02", None, false), &SERVER);
    assert_eq!(other.profile, "default");
    assert_eq!(other.tftp_root, None);
}

#[test]
fn an_empty_tftp_root_is_refused_with_the_profile_name() {
    let cfg: PolicyConfig =
        toml::from_str("[[profile]]\nname = \"p\"\nlocal = true\ntftp_root = \"\"\n").unwrap();
    let err = cfg.validate().unwrap_err().to_string();
    assert!(
        err.contains("profile `p`") && err.contains("tftp_root"),
        "{err}"
    );
}
