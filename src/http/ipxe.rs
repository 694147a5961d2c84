//! iPXE scripts: the static entry script at `/boot.ipxe` and the per-machine script rendered
//! from a [`BootPlan`]. Everything here is pure: text in, text out.
//!
//! # How iPXE reads a script line (iPXE `src/core/exec.c`)
//!
//! A line is split on whitespace only; there is no quoting and no escape character. A token
//! that is exactly `||`, `&&` or `;` separates commands, a token starting with `#` starts a
//! comment, and `${name}` inside any token is replaced by a setting. So a single `&` inside a
//! URL is an ordinary character, but a configured value containing whitespace where one token
//! is needed, a newline, or an operator token would change the script. Values we generate
//! (URLs of boot-root files) are percent-encoded and cannot; values from the config are checked
//! ([`ScriptError`]) and text we only print is defused ([`display`]).
//!
//! # Telling kernels from initrds
//!
//! The renderer is the only party that knows which URL is a kernel and which an initrd, so it
//! says so in the URL: files under the boot root get `?mac=<mac>&kind=kernel|initrd`. The asset
//! server strips the query, serves the file, and reports `http.kernel` / `http.initrd` for the
//! MAC in the query (see [`super::assets`]). Full URLs from the config are left untouched (they
//! point at other servers).

use std::fmt::Write as _;

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};

use crate::mac::MacAddr;
use crate::policy::{BootPlan, BootTarget, ClientFacts, Firmware};

/// Query value of `kind` for a kernel URL.
pub const KIND_KERNEL: &str = "kernel";
/// Query value of `kind` for an initrd URL.
pub const KIND_INITRD: &str = "initrd";

/// Path of the per-machine script endpoint.
pub const SCRIPT_PATH: &str = "/ipxe/script";

/// The name the UEFI initrd gets when a file name cannot be used for it.
const INITRD_FALLBACK_NAME: &str = "initrd";

/// Characters left as they are in a path segment: RFC 3986 section 2.3 unreserved characters.
/// Everything else (spaces, `$`, `#`, `?`, `%`, non-ASCII) is percent-encoded, so a generated URL
/// is always one iPXE token and never expands a setting.
pub(crate) const PATH_SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// How the kernel and initrds of a `Kernel` target travel to the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelTransport {
    /// HTTP from pxed's boot root: the default, and the fastest for every NIC that keeps up.
    Http,
    /// TFTP from the boot root on this server address: one block per acknowledgement, for the
    /// NICs in [`LOCKSTEP_NICS`].
    Tftp(std::net::Ipv4Addr),
}

/// NICs (PCI vendor, device, name) whose iPXE driver stops receiving for good once a burst of
/// full-size frames outruns its receive ring, so that an HTTP download stalls after the
/// server's first TCP burst (TCP's initial window of 10 segments is already too much for the
/// i82559ER; a pacing or buffer limit on the server does not help: measured in the lab, the
/// guest then stalls a few hundred KiB later). TFTP sends one block and waits for its
/// acknowledgement, which these drivers always keep up with (dnsmasq's way of booting them).
/// Seen with the iPXE ROMs QEMU ships (ipxe-qemu 1.21) on QEMU's `pcnet` and `i82559er` models:
/// the lab's matrix rows `bios-pcnet` and `bios-i82559er`.
pub const LOCKSTEP_NICS: &[(u16, u16, &str)] = &[
    (0x1022, 0x2000, "AMD PCnet (pcnet32)"),
    (0x8086, 0x1209, "Intel i82559ER (eepro100)"),
];

/// Bytes of a PCI bus id in iPXE's `busid` setting: bus type, vendor (2), device (2).
const BUSID_LEN: usize = 5;
/// iPXE's bus type for PCI (`BUS_TYPE_PCI`).
const BUS_TYPE_PCI: u8 = 1;

/// The NIC named by iPXE's `busid` setting as text (`01:10:22:20:00`) when it is one of
/// [`LOCKSTEP_NICS`]; `None` for any other NIC, another bus, or text that is not a bus id.
pub fn lockstep_nic(busid: &str) -> Option<&'static str> {
    let bytes: Vec<u8> = busid
        .split(':')
        .map(|h| u8::from_str_radix(h, 16).ok())
        .collect::<Option<_>>()?;
    let [kind, v0, v1, d0, d1] = <[u8; BUSID_LEN]>::try_from(bytes).ok()?;
    if kind != BUS_TYPE_PCI {
        return None;
    }
    let (vendor, device) = (u16::from_be_bytes([v0, v1]), u16::from_be_bytes([d0, d1]));
    LOCKSTEP_NICS
        .iter()
        .find(|(v, d, _)| (*v, *d) == (vendor, device))
        .map(|(_, _, name)| *name)
}

/// A configured value that cannot be put into an iPXE script safely.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("profile `{profile}`: {problem}")]
pub struct ScriptError {
    /// The profile the value belongs to.
    pub profile: String,
    /// What is wrong and with which value.
    pub problem: String,
}

/// The static script at `/boot.ipxe`. It chains to the per-machine script and lets iPXE fill in
/// its own facts: `${netX/mac:hexhyp}` is the MAC of the interface iPXE last opened (the one it
/// booted from) as `52-54-00-12-34-56`, `${uuid}` the SMBIOS UUID as `8-4-4-4-12` hex text (empty
/// when the firmware has none), `${platform}` `pcbios` or `efi`, `${buildarch}` `i386`, `x86_64`,
/// `arm64`... `${netX/busid}` is the NIC's bus id as hex bytes (`01:10:22:20:00`: bus type 1 = PCI,
/// vendor, device; the value iPXE also sends as DHCP option 175.177), which picks the kernel's
/// transport ([`lockstep_nic`]). None of them contain characters that need encoding.
/// (`${uuid:uristring}` would be wrong: a type suffix re-formats the raw 16 bytes, not the text.)
pub fn entry_script(base_url: &str) -> String {
    let base = base_url.trim_end_matches('/');
    let mut s = String::new();
    s.push_str("#!ipxe\n");
    s.push_str("# pxed entry script: ask pxed for this machine's own script.\n");
    let _ = writeln!(
        s,
        "chain {base}{SCRIPT_PATH}?mac=${{netX/mac:hexhyp}}&uuid=${{uuid}}&buildarch=${{buildarch}}&platform=${{platform}}&busid=${{netX/busid}} || goto failed"
    );
    s.push_str("exit 0\n");
    s.push_str(":failed\n");
    let _ = writeln!(
        s,
        "echo pxed: cannot load this machine's boot script from {}",
        display(base)
    );
    s.push_str("exit 1\n");
    s
}

/// Render the per-machine iPXE script for a plan. Never fails: a configured value that cannot be
/// written safely gives a script that prints the problem and exits with status 1 (see
/// [`try_render_script`] for the error itself).
///
/// - `Kernel`: `imgfree`, `kernel`, one `initrd --name <n>` per initrd, `boot`. On UEFI (and when
///   the firmware is unknown) the command line gets `initrd=<n>` for each initrd, because the
///   Linux EFI stub only finds iPXE-loaded initrds by name (firmware-quirks.md Q14); on BIOS the
///   argument is left out. A command line that already has `initrd=` is left alone.
/// - `Script`: the literal script, `#!ipxe` added when missing.
/// - `Chain`: `chain <url>`. `San`: `sanboot <url>`. `Nbp`: `chain` to the program over HTTP
///   from the same boot root (iPXE clients can load it that way too).
/// - `Menu`: an iPXE `menu`; each entry chains back to [`SCRIPT_PATH`] with `profile=<name>`, so
///   nested menus and every kind of target work. With a password, `login` asks for it and
///   `iseq` compares (a speed bump against accidents: the password is in the script).
/// - `Local`: `exit 0`, so the firmware tries its next boot device.
/// - `Ignore`: prints the reason and `exit 1`.
///
/// Every download has a `|| goto failed` fallback that prints what failed and ends with `exit 1`:
/// returning to the firmware lets it try its next boot device instead of hanging at a prompt.
///
/// `base_url` is pxed's HTTP base (`http://10.0.0.1:8080`); relative paths are files under the
/// boot root served there, anything containing `://` is used as given.
pub fn render_script(plan: &BootPlan, facts: &ClientFacts, base_url: &str) -> String {
    match try_render_script(plan, facts, base_url) {
        Ok(s) => s,
        Err(e) => error_script(&e.to_string()),
    }
}

/// [`render_script`], reporting unsafe configured values as an error.
pub fn try_render_script(
    plan: &BootPlan,
    facts: &ClientFacts,
    base_url: &str,
) -> Result<String, ScriptError> {
    try_render_script_via(plan, facts, base_url, KernelTransport::Http)
}

/// [`try_render_script`] with the kernel and initrds of a `Kernel` target fetched by
/// `transport` (boot-root paths only; full URLs from the config are used as given).
pub fn try_render_script_via(
    plan: &BootPlan,
    facts: &ClientFacts,
    base_url: &str,
    transport: KernelTransport,
) -> Result<String, ScriptError> {
    let base = base_url.trim_end_matches('/');
    let err = |problem: String| ScriptError {
        profile: plan.profile.clone(),
        problem,
    };
    let mut s = String::new();
    if let BootTarget::Script { script } = &plan.target {
        // The admin's own script: passed through as written.
        if !script.trim_start().starts_with("#!ipxe") {
            s.push_str("#!ipxe\n");
        }
        s.push_str(script);
        if !script.ends_with('\n') {
            s.push('\n');
        }
        return Ok(s);
    }
    s.push_str("#!ipxe\n");
    let _ = writeln!(
        s,
        "echo pxed: {} boots profile {} ({})",
        facts.mac,
        display(&plan.profile),
        display(&plan.reason)
    );
    match &plan.target {
        BootTarget::Kernel {
            kernel,
            initrd,
            cmdline,
        } => {
            let kernel_url =
                kernel_file_url(transport, base, kernel, facts.mac, KIND_KERNEL).map_err(err)?;
            let mut args: Vec<String> = Vec::new();
            for word in cmdline.split_whitespace() {
                check_token(word).map_err(|p| err(format!("command line: {p}")))?;
                args.push(word.to_string());
            }
            let names = initrd_names(initrd);
            let wants_initrd_arg =
                !is_bios(facts) && !args.iter().any(|a| a.starts_with("initrd="));
            if wants_initrd_arg {
                args.extend(names.iter().map(|n| format!("initrd={n}")));
            }
            // A download cut off (pxed restarted, a link flap) is retried once from here.
            s.push_str(":retry\n");
            // Q14: free images left by earlier scripts so they do not end up in the initrd.
            s.push_str("imgfree\n");
            let mut line = format!("kernel {kernel_url}");
            for a in &args {
                line.push(' ');
                line.push_str(a);
            }
            let _ = writeln!(s, "{line} || goto failed");
            for (path, name) in initrd.iter().zip(&names) {
                let url =
                    kernel_file_url(transport, base, path, facts.mac, KIND_INITRD).map_err(err)?;
                let _ = writeln!(s, "initrd --name {name} {url} || goto failed");
            }
            s.push_str("boot || goto failed\n");
        }
        BootTarget::Chain { url } => {
            let url = plain_url(base, url).map_err(err)?;
            let _ = writeln!(s, "chain {url} || goto failed");
        }
        BootTarget::Nbp { file } => {
            let url = plain_url(base, file).map_err(err)?;
            let _ = writeln!(s, "chain {url} || goto failed");
        }
        BootTarget::San { image } => {
            let url = plain_url(base, image).map_err(err)?;
            let _ = writeln!(s, "sanboot {url} || goto failed");
        }
        BootTarget::Local => {
            s.push_str("echo pxed: booting from the next device\n");
            s.push_str("exit 0\n");
        }
        BootTarget::Ignore { reason } => {
            let _ = writeln!(
                s,
                "echo pxed: not booting this machine over the network: {}",
                display(reason)
            );
            s.push_str("exit 1\n");
        }
        BootTarget::Menu {
            title,
            items,
            default,
            timeout_secs,
            password,
        } => {
            render_menu(
                &mut s,
                base,
                facts,
                title,
                items,
                default.as_deref(),
                *timeout_secs,
                password.as_deref(),
            )
            .map_err(err)?;
        }
        BootTarget::Script { .. } => {}
    }
    s.push_str("exit 0\n");
    s.push_str(":failed\n");
    if matches!(plan.target, BootTarget::Kernel { .. }) {
        // One retry of the whole download after a pause long enough for a restarted pxed to
        // listen again (it binds within a second). The setting survives the `goto`.
        s.push_str("isset ${pxed-retried} && goto give_up ||\n");
        s.push_str("set pxed-retried 1\n");
        s.push_str("echo pxed: a download failed; retrying in 3 seconds\n");
        s.push_str("sleep 3\n");
        s.push_str("goto retry\n");
        s.push_str(":give_up\n");
    }
    let _ = writeln!(
        s,
        "echo pxed: profile {} failed to boot",
        display(&plan.profile)
    );
    s.push_str("exit 1\n");
    Ok(s)
}

#[allow(clippy::too_many_arguments)]
fn render_menu(
    s: &mut String,
    base: &str,
    facts: &ClientFacts,
    title: &str,
    items: &[crate::policy::MenuItem],
    default: Option<&str>,
    timeout_secs: u32,
    password: Option<&str>,
) -> Result<(), String> {
    let mut entries: Vec<(String, String)> = items
        .iter()
        .map(|i| (i.label.clone(), i.profile.clone()))
        .collect();
    if let Some(d) = default
        && !entries.iter().any(|(_, p)| p == d)
    {
        entries.push((d.to_string(), d.to_string()));
    }
    s.push_str(":menu\n");
    let _ = writeln!(s, "menu {}", display(title));
    for (i, (label, _)) in entries.iter().enumerate() {
        let _ = writeln!(s, "item p{i} {}", display(label));
    }
    let mut choose = String::from("choose");
    if let Some(d) = default
        && let Some(i) = entries.iter().position(|(_, p)| p == d)
    {
        let _ = write!(choose, " --default p{i}");
    }
    if timeout_secs > 0 {
        let _ = write!(choose, " --timeout {}", u64::from(timeout_secs) * 1000);
    }
    let _ = writeln!(s, "{choose} target || goto cancelled");
    if let Some(pw) = password {
        check_token(pw).map_err(|p| format!("menu password: {p}"))?;
        s.push_str("login || goto menu\n");
        let _ = writeln!(s, "iseq ${{password}} {pw} || goto badpassword");
    }
    s.push_str("goto ${target}\n");
    for (i, (_, profile)) in entries.iter().enumerate() {
        let _ = writeln!(s, ":p{i}");
        let _ = writeln!(
            s,
            "chain {base}{SCRIPT_PATH}?mac={}&profile={}&uuid=${{uuid}}&buildarch=${{buildarch}}&platform=${{platform}} || goto failed",
            facts.mac.hyphenated(),
            utf8_percent_encode(profile, PATH_SEGMENT)
        );
        s.push_str("exit 0\n");
    }
    if password.is_some() {
        s.push_str(":badpassword\n");
        s.push_str("echo pxed: wrong password\n");
        s.push_str("sleep 2\n");
        s.push_str("goto menu\n");
    }
    s.push_str(":cancelled\n");
    s.push_str("echo pxed: menu cancelled\n");
    s.push_str("exit 1\n");
    Ok(())
}

/// A script that prints a problem and gives the machine back to its firmware.
pub fn error_script(problem: &str) -> String {
    format!("#!ipxe\necho pxed: {}\nexit 1\n", display(problem))
}

/// Only a known BIOS client goes without `initrd=`: the argument is harmless there, and missing
/// on UEFI it breaks the boot (Q14), so an unknown firmware gets it.
fn is_bios(facts: &ClientFacts) -> bool {
    facts.arch().is_some_and(|a| a.firmware == Firmware::Bios)
}

/// The URL of a configured path: full URLs as given (checked to be one iPXE token), boot-root
/// paths percent-encoded under `base`, with the MAC and the file's role in the query.
fn asset_url(base: &str, path: &str, mac: MacAddr, kind: &str) -> Result<String, String> {
    if path.contains("://") {
        check_token(path)?;
        return Ok(path.to_string());
    }
    Ok(format!(
        "{}?mac={}&kind={kind}",
        root_url(base, path),
        mac.hyphenated()
    ))
}

/// The URL of a kernel or initrd: [`asset_url`] over HTTP, or `tftp://<server>/<path>` (no
/// query: the TFTP server reports the transfer itself).
fn kernel_file_url(
    transport: KernelTransport,
    base: &str,
    path: &str,
    mac: MacAddr,
    kind: &str,
) -> Result<String, String> {
    match transport {
        KernelTransport::Http => asset_url(base, path, mac, kind),
        KernelTransport::Tftp(server) => plain_url(&format!("tftp://{server}"), path),
    }
}

/// Like [`asset_url`] without the query: for targets whose server may not accept one.
fn plain_url(base: &str, path: &str) -> Result<String, String> {
    if path.contains("://") {
        check_token(path)?;
        return Ok(path.to_string());
    }
    Ok(root_url(base, path))
}

fn root_url(base: &str, path: &str) -> String {
    let mut url = base.to_string();
    for seg in path.split('/').filter(|s| !s.is_empty()) {
        url.push('/');
        let _ = write!(url, "{}", utf8_percent_encode(seg, PATH_SEGMENT));
    }
    url
}

/// Names for the initrds, unique and made of characters the kernel command line and iPXE's
/// image names take as they are: the file name when it is one, else `initrd`, `initrd1`...
fn initrd_names(initrds: &[String]) -> Vec<String> {
    let mut names: Vec<String> = Vec::with_capacity(initrds.len());
    for (i, path) in initrds.iter().enumerate() {
        let no_query = path.split(['?', '#']).next().unwrap_or(path);
        let file = no_query.rsplit('/').next().unwrap_or(no_query);
        let usable = !file.is_empty()
            && file
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'+'));
        let mut name = if usable {
            file.to_string()
        } else {
            INITRD_FALLBACK_NAME.to_string()
        };
        if names.contains(&name) {
            name = format!("{INITRD_FALLBACK_NAME}{i}");
        }
        names.push(name);
    }
    names
}

/// Check that a configured value is exactly one harmless iPXE token.
fn check_token(value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Err("empty value".into());
    }
    if value.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "`{}` contains whitespace or control characters",
            value.escape_debug()
        ));
    }
    if matches!(value, "||" | "&&" | ";") || value.starts_with('#') {
        return Err(format!(
            "`{value}` would be read by iPXE as an operator or comment"
        ));
    }
    Ok(())
}

/// Text that is only printed (`echo`, menu titles and items): control characters become spaces,
/// operator and comment tokens are quoted, and `${` cannot expand a setting.
pub fn display(text: &str) -> String {
    let cleaned: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let cleaned = cleaned.replace("${", "$ {");
    let words: Vec<String> = cleaned
        .split_whitespace()
        .map(|w| {
            if matches!(w, "||" | "&&" | ";") || w.starts_with('#') {
                format!("'{w}'")
            } else {
                w.to_string()
            }
        })
        .collect();
    words.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{ClientArch, DhcpBoot, MenuItem};

    const BASE: &str = "http://10.0.0.1:8080";

    fn facts(platform: &str, buildarch: &str) -> ClientFacts {
        ClientFacts {
            mac: "52:54:00:12:34:56".parse().unwrap(),
            arch_code: ClientArch::from_ipxe(platform, buildarch).map(|a| a.code),
            user_class: vec!["iPXE".into()],
            is_ipxe: true,
            ..Default::default()
        }
    }

    fn plan(target: BootTarget) -> BootPlan {
        BootPlan {
            profile: "p".into(),
            reason: "default profile".into(),
            target,
            dhcp: DhcpBoot::Http {
                url: format!("{BASE}/boot.ipxe"),
            },
            labels: vec![],
            hostname: None,
            tftp_root: None,
        }
    }

    fn linux() -> BootTarget {
        BootTarget::Kernel {
            kernel: "linux/vmlinuz".into(),
            initrd: vec!["linux/initrd.img".into(), "extra/firmware.cpio".into()],
            cmdline: "console=ttyS0 quiet".into(),
        }
    }

    fn kernel_line(script: &str) -> &str {
        script.lines().find(|l| l.starts_with("kernel ")).unwrap()
    }

    #[test]
    fn bios_kernel_has_no_initrd_arg() {
        let s = render_script(&plan(linux()), &facts("pcbios", "i386"), BASE);
        assert!(s.starts_with("#!ipxe\n"), "{s}");
        assert_eq!(
            kernel_line(&s),
            "kernel http://10.0.0.1:8080/linux/vmlinuz?mac=52-54-00-12-34-56&kind=kernel console=ttyS0 quiet || goto failed"
        );
        assert!(s.contains(
            "initrd --name initrd.img http://10.0.0.1:8080/linux/initrd.img?mac=52-54-00-12-34-56&kind=initrd || goto failed\n"
        ));
        assert!(s.contains("initrd --name firmware.cpio "));
        assert!(s.contains("\nboot || goto failed\n"));
        assert!(s.contains("\n:failed\n"));
        assert!(s.ends_with("exit 1\n"));
        // imgfree before the kernel, initrds after it, boot last.
        let pos = |needle: &str| s.find(needle).unwrap();
        assert!(pos("imgfree") < pos("kernel "));
        // A failed download is retried once from before imgfree, then gives up.
        assert!(pos(":retry\n") < pos("imgfree"));
        assert!(pos(":failed\n") < pos("set pxed-retried 1\n"));
        assert!(pos("isset ${pxed-retried} && goto give_up ||\n") < pos("goto retry\n"));
        assert!(pos("goto retry\n") < pos(":give_up\n"));
        assert!(pos("kernel ") < pos("initrd --name"));
        assert!(pos("initrd --name") < pos("boot ||"));
    }

    #[test]
    fn uefi_kernel_names_each_initrd() {
        let s = render_script(&plan(linux()), &facts("efi", "x86_64"), BASE);
        assert!(
            kernel_line(&s).ends_with(
                " console=ttyS0 quiet initrd=initrd.img initrd=firmware.cpio || goto failed"
            ),
            "{s}"
        );
    }

    #[test]
    fn arm64_uefi_gets_initrd_arg_too() {
        let f = facts("efi", "arm64");
        assert_eq!(f.arch_code, Some(11));
        let s = render_script(&plan(linux()), &f, BASE);
        assert!(
            kernel_line(&s).contains(" initrd=initrd.img initrd=firmware.cpio "),
            "{s}"
        );
    }

    #[test]
    fn unknown_firmware_gets_initrd_arg() {
        let s = render_script(&plan(linux()), &facts("", ""), BASE);
        assert!(kernel_line(&s).contains(" initrd=initrd.img"), "{s}");
    }

    #[test]
    fn existing_initrd_arg_is_kept_as_written() {
        let t = BootTarget::Kernel {
            kernel: "vmlinuz".into(),
            initrd: vec!["a/initrd".into(), "b/initrd".into()],
            cmdline: "initrd=initrd.magic".into(),
        };
        let s = render_script(&plan(t), &facts("efi", "x86_64"), BASE);
        assert!(
            kernel_line(&s).ends_with(" initrd=initrd.magic || goto failed"),
            "{s}"
        );
        // Same file name twice: the second gets a distinct name.
        assert!(s.contains("initrd --name initrd "));
        assert!(s.contains("initrd --name initrd1 "));
    }

    #[test]
    fn full_urls_and_odd_paths() {
        let t = BootTarget::Kernel {
            kernel: "http://mirror.example/vmlinuz".into(),
            initrd: vec!["my files/initrd ${x}.img".into()],
            cmdline: String::new(),
        };
        let s = render_script(&plan(t), &facts("pcbios", "i386"), BASE);
        assert!(
            s.contains("kernel http://mirror.example/vmlinuz || goto failed\n"),
            "{s}"
        );
        assert!(
            s.contains(
                "initrd --name initrd http://10.0.0.1:8080/my%20files/initrd%20%24%7Bx%7D.img?mac="
            ),
            "{s}"
        );
    }

    #[test]
    fn unsafe_values_give_an_error_script() {
        for cmdline in ["a || reboot", "a ; shell", "a && shell", "#x"] {
            let t = BootTarget::Kernel {
                kernel: "vmlinuz".into(),
                initrd: vec![],
                cmdline: cmdline.into(),
            };
            let p = plan(t);
            let f = facts("pcbios", "i386");
            assert!(try_render_script(&p, &f, BASE).is_err(), "{cmdline:?}");
            let s = render_script(&p, &f, BASE);
            assert!(!s.contains("kernel"), "{s}");
            assert!(s.ends_with("exit 1\n"), "{s}");
            assert_eq!(s.lines().count(), 3, "{s}");
        }
    }

    #[test]
    fn newlines_in_cmdline_stay_on_the_kernel_line() {
        let t = BootTarget::Kernel {
            kernel: "vmlinuz".into(),
            initrd: vec![],
            cmdline: "root=/dev/sda\nshell".into(),
        };
        let s = render_script(&plan(t), &facts("pcbios", "i386"), BASE);
        assert!(
            kernel_line(&s).ends_with(" root=/dev/sda shell || goto failed"),
            "{s}"
        );
        assert!(!s.contains("\nshell"), "{s}");
    }

    #[test]
    fn chain_sanboot_nbp() {
        let f = facts("efi", "x86_64");
        let s = render_script(
            &plan(BootTarget::Chain {
                url: "http://other/x.ipxe".into(),
            }),
            &f,
            BASE,
        );
        assert!(
            s.contains("\nchain http://other/x.ipxe || goto failed\n"),
            "{s}"
        );
        let s = render_script(
            &plan(BootTarget::Chain {
                url: "menus/x.ipxe".into(),
            }),
            &f,
            BASE,
        );
        assert!(
            s.contains("\nchain http://10.0.0.1:8080/menus/x.ipxe || goto failed\n"),
            "{s}"
        );
        let s = render_script(
            &plan(BootTarget::San {
                image: "iso/debian.iso".into(),
            }),
            &f,
            BASE,
        );
        assert!(
            s.contains("\nsanboot http://10.0.0.1:8080/iso/debian.iso || goto failed\n"),
            "{s}"
        );
        let s = render_script(
            &plan(BootTarget::Nbp {
                file: "pxelinux.0".into(),
            }),
            &f,
            BASE,
        );
        assert!(
            s.contains("\nchain http://10.0.0.1:8080/pxelinux.0 || goto failed\n"),
            "{s}"
        );
    }

    #[test]
    fn local_and_ignore() {
        let f = facts("pcbios", "i386");
        let s = render_script(&plan(BootTarget::Local), &f, BASE);
        let body: Vec<&str> = s.lines().collect();
        assert_eq!(body[0], "#!ipxe");
        assert_eq!(body[2], "echo pxed: booting from the next device");
        assert_eq!(body[3], "exit 0");
        let s = render_script(
            &plan(BootTarget::Ignore {
                reason: "retired || reboot".into(),
            }),
            &f,
            BASE,
        );
        assert!(
            s.contains("echo pxed: not booting this machine over the network: retired '||' reboot\nexit 1\n"),
            "{s}"
        );
    }

    #[test]
    fn literal_script_gets_shebang_once() {
        let f = facts("pcbios", "i386");
        let s = render_script(
            &plan(BootTarget::Script {
                script: "echo hi\nshell".into(),
            }),
            &f,
            BASE,
        );
        assert_eq!(s, "#!ipxe\necho hi\nshell\n");
        let s = render_script(
            &plan(BootTarget::Script {
                script: "#!ipxe\necho hi\n".into(),
            }),
            &f,
            BASE,
        );
        assert_eq!(s, "#!ipxe\necho hi\n");
    }

    #[test]
    fn menu_with_default_timeout_and_password() {
        let t = BootTarget::Menu {
            title: "Lab boot".into(),
            items: vec![
                MenuItem {
                    label: "Debian installer".into(),
                    profile: "debian".into(),
                },
                MenuItem {
                    label: "Local disk".into(),
                    profile: "local disk".into(),
                },
            ],
            default: Some("local disk".into()),
            timeout_secs: 5,
            password: Some("s3cret".into()),
        };
        let s = render_script(&plan(t), &facts("efi", "x86_64"), BASE);
        assert!(s.contains("\nmenu Lab boot\n"), "{s}");
        assert!(
            s.contains("\nitem p0 Debian installer\nitem p1 Local disk\n"),
            "{s}"
        );
        assert!(
            s.contains("\nchoose --default p1 --timeout 5000 target || goto cancelled\n"),
            "{s}"
        );
        assert!(
            s.contains("\nlogin || goto menu\niseq ${password} s3cret || goto badpassword\n"),
            "{s}"
        );
        assert!(s.contains("\ngoto ${target}\n"), "{s}");
        assert!(s.contains(
            "\n:p1\nchain http://10.0.0.1:8080/ipxe/script?mac=52-54-00-12-34-56&profile=local%20disk&uuid=${uuid}&buildarch=${buildarch}&platform=${platform} || goto failed\n"
        ), "{s}");
        assert!(s.contains("\n:badpassword\n"), "{s}");
        assert!(s.contains("\n:cancelled\n"), "{s}");
    }

    #[test]
    fn menu_without_timeout_waits() {
        let t = BootTarget::Menu {
            title: "m".into(),
            items: vec![MenuItem {
                label: "a".into(),
                profile: "a".into(),
            }],
            default: None,
            timeout_secs: 0,
            password: None,
        };
        let s = render_script(&plan(t), &facts("pcbios", "i386"), BASE);
        assert!(s.contains("\nchoose target || goto cancelled\n"), "{s}");
        assert!(!s.contains("login"), "{s}");
    }

    #[test]
    fn lockstep_nics_by_bus_id() {
        assert_eq!(lockstep_nic("01:10:22:20:00"), Some("AMD PCnet (pcnet32)"));
        assert_eq!(
            lockstep_nic("01:80:86:12:09"),
            Some("Intel i82559ER (eepro100)")
        );
        // e1000, virtio-net: HTTP as usual.
        assert_eq!(lockstep_nic("01:80:86:10:0e"), None);
        assert_eq!(lockstep_nic("01:1a:f4:10:00"), None);
        // Not PCI, too short or long, not hex, empty (an iPXE without the setting).
        assert_eq!(lockstep_nic("02:10:22:20:00"), None);
        assert_eq!(lockstep_nic("01:10:22:20"), None);
        assert_eq!(lockstep_nic("01:10:22:20:00:00"), None);
        assert_eq!(lockstep_nic("01:10:22:20:zz"), None);
        assert_eq!(lockstep_nic(""), None);
    }

    #[test]
    fn tftp_transport_fetches_boot_root_files_by_tftp() {
        let server = "10.0.0.1".parse().unwrap();
        let s = try_render_script_via(
            &plan(linux()),
            &facts("pcbios", "i386"),
            BASE,
            KernelTransport::Tftp(server),
        )
        .unwrap();
        assert_eq!(
            kernel_line(&s),
            "kernel tftp://10.0.0.1/linux/vmlinuz console=ttyS0 quiet || goto failed"
        );
        assert!(
            s.contains(
                "initrd --name initrd.img tftp://10.0.0.1/linux/initrd.img || goto failed\n"
            ),
            "{s}"
        );
        // A full URL from the config is still used as given.
        let remote = BootTarget::Kernel {
            kernel: "http://mirror/vmlinuz".into(),
            initrd: vec![],
            cmdline: String::new(),
        };
        let s = try_render_script_via(
            &plan(remote),
            &facts("pcbios", "i386"),
            BASE,
            KernelTransport::Tftp(server),
        )
        .unwrap();
        assert!(s.contains("kernel http://mirror/vmlinuz"), "{s}");
    }

    #[test]
    fn entry_script_chains_with_ipxe_settings() {
        let s = entry_script("http://10.0.0.1:8080/");
        assert!(s.starts_with("#!ipxe\n"));
        assert!(s.contains(
            "\nchain http://10.0.0.1:8080/ipxe/script?mac=${netX/mac:hexhyp}&uuid=${uuid}&buildarch=${buildarch}&platform=${platform}&busid=${netX/busid} || goto failed\n"
        ), "{s}");
    }

    #[test]
    fn display_defuses_operators() {
        assert_eq!(display("a\nb ${x} # c && d"), "a b $ {x} '#' c '&&' d");
    }
}
