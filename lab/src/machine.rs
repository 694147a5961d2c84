//! Lab machines: the firmware/NIC/ROM catalogue, and a running QEMU with its serial console
//! read live, a QMP socket for quit/reset, and a pidfile so `pxelab clean` finds strays.

use std::io::{BufRead, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc::Sender;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};
use pxed::mac::MacAddr;
use serde::{Deserialize, Serialize};

/// The QEMU binary.
pub const QEMU: &str = "qemu-system-x86_64";
/// OVMF code (read-only pflash) and the template for each VM's variable store.
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
/// OVMF with Secure Boot: code built with SMM, variables with Microsoft's keys enrolled
/// (so Debian's shim, signed by Microsoft's UEFI CA, is trusted).
pub const OVMF_SECBOOT_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.ms.fd";
pub const OVMF_SECBOOT_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.ms.fd";
/// OVMF ia32 (`ovmf-ia32`): Debian ships only the SMM build; its variables enroll no keys,
/// so Secure Boot is off.
pub const OVMF_IA32_CODE: &str = "/usr/share/OVMF/OVMF32_CODE_4M.secboot.fd";
pub const OVMF_IA32_VARS: &str = "/usr/share/OVMF/OVMF32_VARS_4M.fd";
/// AAVMF (`qemu-efi-aarch64`): EDK2 for QEMU's arm64 `virt` machine.
pub const AAVMF_CODE: &str = "/usr/share/AAVMF/AAVMF_CODE.fd";
pub const AAVMF_VARS: &str = "/usr/share/AAVMF/AAVMF_VARS.fd";
/// The QEMU binary for arm64 machines (`qemu-system-arm`).
pub const QEMU_AARCH64: &str = "qemu-system-aarch64";
/// A console line longer than this is split: firmware sometimes prints without newlines.
const MAX_CONSOLE_LINE: usize = 4096;
/// How long QEMU gets to leave after a QMP quit before it is killed.
const QUIT_GRACE: Duration = Duration::from_secs(3);

/// Which firmware the machine runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Firmware {
    /// SeaBIOS (legacy BIOS); the NIC's option ROM does the network boot.
    #[default]
    Seabios,
    /// OVMF x64 (UEFI); EDK2's own network stack unless an EFI ROM is given.
    Ovmf,
    /// OVMF x64 with Secure Boot enforced (q35 with SMM, Microsoft's keys enrolled).
    #[serde(rename = "ovmf-secboot")]
    OvmfSecboot,
    /// OVMF ia32 (32-bit UEFI, client arch 6) on a 64-bit CPU.
    #[serde(rename = "ovmf-ia32")]
    OvmfIa32,
    /// AAVMF: arm64 UEFI (client arch 11) on QEMU's `virt` machine.
    Aavmf,
}

impl Firmware {
    /// Whether it is UEFI (pflash code + per-VM variable store).
    pub fn is_uefi(self) -> bool {
        !matches!(self, Firmware::Seabios)
    }

    /// The name lab files use.
    pub fn as_str(self) -> &'static str {
        match self {
            Firmware::Seabios => "seabios",
            Firmware::Ovmf => "ovmf",
            Firmware::OvmfSecboot => "ovmf-secboot",
            Firmware::OvmfIa32 => "ovmf-ia32",
            Firmware::Aavmf => "aavmf",
        }
    }

    /// The firmware's own files: (code, variable-store template); None for SeaBIOS, which
    /// QEMU brings itself.
    pub fn default_files(self) -> Option<(&'static str, &'static str)> {
        match self {
            Firmware::Seabios => None,
            Firmware::Ovmf => Some((OVMF_CODE, OVMF_VARS)),
            Firmware::OvmfSecboot => Some((OVMF_SECBOOT_CODE, OVMF_SECBOOT_VARS)),
            Firmware::OvmfIa32 => Some((OVMF_IA32_CODE, OVMF_IA32_VARS)),
            Firmware::Aavmf => Some((AAVMF_CODE, AAVMF_VARS)),
        }
    }

    /// The QEMU binary that runs it.
    pub fn qemu(self) -> &'static str {
        match self {
            Firmware::Aavmf => QEMU_AARCH64,
            _ => QEMU,
        }
    }

    /// Built with SMM-protected variables: needs q35 with SMM and SMM-only flash writes.
    fn needs_smm(self) -> bool {
        matches!(self, Firmware::OvmfSecboot | Firmware::OvmfIa32)
    }
}

/// How a UEFI machine boots from its NIC.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetBoot {
    /// PXE first (the firmware's default order: PXEv4, PXEv6, HTTPv4, HTTPv6).
    #[default]
    Pxe,
    /// UEFI HTTP Boot: OVMF's PXE is switched off (fw_cfg `opt/org.tianocore/IPv4PXESupport`
    /// and `IPv6PXESupport`), so the NIC's first boot option is "UEFI HTTPv4".
    Http,
}

/// The NIC's option ROM.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Rom {
    /// QEMU's default ROM for the NIC model (iPXE, from ipxe-qemu).
    #[default]
    Default,
    /// No ROM (`romfile=`): the firmware's own PXE runs.
    None,
    /// A ROM file.
    File(PathBuf),
}

impl Serialize for Rom {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Rom::Default => s.serialize_str("default"),
            Rom::None => s.serialize_str("none"),
            Rom::File(p) => s.collect_str(&p.display()),
        }
    }
}

impl<'de> Deserialize<'de> for Rom {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(match s.as_str() {
            "default" => Rom::Default,
            "none" | "" => Rom::None,
            path => Rom::File(PathBuf::from(path)),
        })
    }
}

/// The CPU accelerator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Hardware virtualisation (only if a probe boot succeeded).
    Kvm,
    /// Emulation: slow, deadlines are scaled.
    Tcg,
}

impl Accel {
    /// QEMU's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// One machine of the lab.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MachineSpec {
    /// Unique in the lab; names files in the run directory.
    pub name: String,
    /// Firmware.
    pub firmware: Firmware,
    /// QEMU NIC model (`e1000`, `virtio-net-pci`, ...).
    pub nic: String,
    /// Option ROM.
    pub rom: Rom,
    /// Memory in MiB.
    pub memory_mib: u32,
    /// The NIC's MAC.
    pub mac: MacAddr,
    /// User-supplied firmware: `-bios` for SeaBIOS, the pflash code for UEFI.
    pub firmware_code: Option<PathBuf>,
    /// User-supplied UEFI variable-store template (copied per VM).
    pub firmware_vars: Option<PathBuf>,
    /// PXE or UEFI HTTP Boot.
    pub netboot: NetBoot,
    /// Boot media attached and booted first (`pxed media` output): a `.iso` is a CD, any
    /// other file a USB stick. The file is never written (QEMU snapshot/read-only).
    pub media: Option<PathBuf>,
}

/// A line of serial console output.
#[derive(Clone, Debug)]
pub struct ConsoleLine {
    /// Which machine (index in the lab).
    pub vm: usize,
    /// When it was read.
    pub at: SystemTime,
    /// The text, with terminal escapes removed.
    pub text: String,
}

/// The QEMU command line for a machine whose NIC connects to `switch_sock`.
pub fn qemu_command(
    spec: &MachineSpec,
    accel: Accel,
    switch_sock: &Path,
    dir: &Path,
) -> Result<Vec<String>> {
    let mut a: Vec<String> = Vec::new();
    let mut push = |s: &[&str]| a.extend(s.iter().map(|x| x.to_string()));
    push(&["-name", &spec.name, "-accel", accel.as_str()]);
    if spec.firmware == Firmware::Aavmf {
        // QEMU's arm64 board; a Cortex-A57 is cheaper to emulate than `max` (no pointer auth).
        push(&["-machine", "virt", "-cpu", "cortex-a57"]);
    } else if accel == Accel::Tcg {
        // Modern kernels need x86-64-v2; `max` offers everything TCG can emulate.
        push(&["-cpu", "max"]);
    }
    push(&["-m", &spec.memory_mib.to_string()]);
    push(&["-nographic", "-serial", "stdio", "-monitor", "none"]);
    push(&["-no-reboot", "-nodefaults"]);
    let qmp = dir.join(format!("{}.qmp", spec.name));
    push(&[
        "-qmp",
        &format!("unix:{},server=on,wait=off", qmp.display()),
    ]);
    let pidfile = dir.join(format!("{}.pid", spec.name));
    push(&["-pidfile", &pidfile.display().to_string()]);
    push(&[
        "-netdev",
        &format!(
            "stream,id=n0,server=off,addr.type=unix,addr.path={}",
            switch_sock.display()
        ),
    ]);
    let mut nic = format!("{},netdev=n0,mac={},bootindex=1", spec.nic, spec.mac);
    match &spec.rom {
        Rom::Default => {}
        Rom::None => nic.push_str(",romfile="),
        Rom::File(p) => {
            if !p.exists() {
                bail!("ROM file {} does not exist", p.display());
            }
            nic.push_str(&format!(",romfile={}", p.display()));
        }
    }
    push(&["-device", &nic]);
    if let Some(p) = &spec.firmware_code
        && !p.exists()
    {
        bail!("firmware file {} does not exist", p.display());
    }
    if spec.netboot == NetBoot::Http && !spec.firmware.is_uefi() {
        bail!("netboot = \"http\" needs UEFI firmware");
    }
    if let Some(media) = &spec.media {
        if !media.exists() {
            bail!("boot media {} does not exist", media.display());
        }
        let file = media.display().to_string();
        if media
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("iso"))
        {
            push(&[
                "-drive",
                &format!("if=none,id=media,format=raw,media=cdrom,readonly=on,file={file}"),
                "-device",
                "ide-cd,drive=media,bootindex=0",
            ]);
        } else {
            push(&[
                "-device",
                "qemu-xhci,id=xhci",
                "-drive",
                &format!("if=none,id=media,format=raw,snapshot=on,file={file}"),
                "-device",
                "usb-storage,bus=xhci.0,drive=media,bootindex=0",
            ]);
        }
    }
    match spec.firmware.default_files() {
        None => {
            if let Some(code) = &spec.firmware_code {
                push(&["-bios", &code.display().to_string()]);
            }
            if spec.media.is_none() {
                push(&["-boot", "n"]);
            }
        }
        Some((code, vars_template)) => {
            let code = spec
                .firmware_code
                .clone()
                .unwrap_or_else(|| PathBuf::from(code));
            let template = spec
                .firmware_vars
                .clone()
                .unwrap_or_else(|| PathBuf::from(vars_template));
            let vars = dir.join(format!("{}.OVMF_VARS.fd", spec.name));
            std::fs::copy(&template, &vars).with_context(|| {
                format!("copying {} (apt-get install ovmf)", template.display())
            })?;
            if spec.firmware.needs_smm() {
                // The Secure Boot build keeps its variables in SMM: q35 with SMM, and the
                // flash writable only from SMM, or a guest could rewrite the keys.
                push(&[
                    "-machine",
                    "q35,smm=on",
                    "-global",
                    "driver=cfi.pflash01,property=secure,value=on",
                ]);
            }
            push(&[
                "-drive",
                &format!("if=pflash,format=raw,readonly=on,file={}", code.display()),
                "-drive",
                &format!("if=pflash,format=raw,file={}", vars.display()),
                // OVMF's network stack needs EFI_RNG_PROTOCOL.
                "-device",
                "virtio-rng-pci",
            ]);
            if spec.netboot == NetBoot::Http {
                for knob in ["IPv4PXESupport", "IPv6PXESupport"] {
                    push(&[
                        "-fw_cfg",
                        &format!("name=opt/org.tianocore/{knob},string=n"),
                    ]);
                }
            }
        }
    }
    Ok(a)
}

/// A running QEMU. Dropping it kills the process.
pub struct Vm {
    /// The machine.
    pub spec: MachineSpec,
    /// When QEMU was started ("power-on").
    pub started: Instant,
    /// Wall-clock time of power-on.
    pub started_at: SystemTime,
    child: Child,
    qmp: PathBuf,
    pidfile: PathBuf,
    exit: Option<ExitStatus>,
}

impl Vm {
    /// Start QEMU with `args`; console lines go to `console` and `<dir>/<name>.console.log`.
    pub fn spawn(
        spec: MachineSpec,
        index: usize,
        args: &[String],
        dir: &Path,
        console: Sender<ConsoleLine>,
    ) -> Result<Vm> {
        let stderr = std::fs::File::create(dir.join(format!("{}.qemu-stderr.log", spec.name)))?;
        std::fs::write(
            dir.join(format!("{}.qemu-cmdline.txt", spec.name)),
            shell_line(spec.firmware.qemu(), args),
        )?;
        let mut child = Command::new(spec.firmware.qemu())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .with_context(|| {
                format!(
                    "starting {} (apt-get install qemu-system-x86 qemu-system-arm)",
                    spec.firmware.qemu()
                )
            })?;
        let started = Instant::now();
        let started_at = SystemTime::now();
        let log = std::fs::File::create(dir.join(format!("{}.console.log", spec.name)))?;
        if let Some(out) = child.stdout.take() {
            std::thread::Builder::new()
                .name(format!("console-{}", spec.name))
                .spawn(move || read_console(index, out, log, console))?;
        }
        Ok(Vm {
            qmp: dir.join(format!("{}.qmp", spec.name)),
            pidfile: dir.join(format!("{}.pid", spec.name)),
            spec,
            started,
            started_at,
            child,
            exit: None,
        })
    }

    /// QEMU's exit status, once it has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().ok().flatten();
        }
        self.exit
    }

    /// QEMU's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Send a QMP command (`quit`, `system_reset`, ...).
    pub fn qmp(&self, command: &str) -> Result<String> {
        qmp_execute(&self.qmp, command)
    }

    /// SIGKILL QEMU at once (a power cut for the guest) and reap it.
    pub fn power_cut(&mut self) {
        if self.exited().is_some() {
            return;
        }
        let _ = self.child.kill();
        self.exit = self.child.wait().ok();
        let _ = std::fs::remove_file(&self.pidfile);
    }

    /// Stop the VM: QMP quit, then kill if it lingers.
    pub fn shutdown(&mut self) {
        if self.exited().is_some() {
            return;
        }
        let _ = self.qmp("quit");
        let deadline = Instant::now() + QUIT_GRACE;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                self.exit = Some(st);
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if self.exit.is_none() {
            let _ = self.child.kill();
            self.exit = self.child.wait().ok();
        }
        let _ = std::fs::remove_file(&self.pidfile);
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Talk QMP (QEMU Machine Protocol) once: greeting, capabilities, one command.
pub fn qmp_execute(sock: &Path, command: &str) -> Result<String> {
    let stream =
        UnixStream::connect(sock).with_context(|| format!("connecting {}", sock.display()))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = std::io::BufReader::new(stream.try_clone()?);
    let mut w = stream;
    let mut line = String::new();
    reader.read_line(&mut line)?; // greeting
    writeln!(w, r#"{{"execute":"qmp_capabilities"}}"#)?;
    line.clear();
    reader.read_line(&mut line)?;
    let cmd = serde_json::json!({ "execute": command });
    writeln!(w, "{cmd}")?;
    line.clear();
    // `quit` may close the socket before answering.
    let _ = reader.read_line(&mut line);
    Ok(line)
}

fn read_console(
    vm: usize,
    mut out: std::process::ChildStdout,
    mut log: std::fs::File,
    tx: Sender<ConsoleLine>,
) {
    let mut buf = [0u8; 4096];
    let mut line: Vec<u8> = Vec::new();
    let emit = |line: &mut Vec<u8>| {
        let text = strip_escapes(&String::from_utf8_lossy(line));
        line.clear();
        let text = text.trim_end().to_string();
        if !text.is_empty() {
            let _ = tx.send(ConsoleLine {
                vm,
                at: SystemTime::now(),
                text,
            });
        }
    };
    loop {
        let n = match out.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let chunk = buf.get(..n).unwrap_or_default();
        let _ = log.write_all(chunk);
        let _ = log.flush();
        for &b in chunk {
            if b == b'\n' || b == b'\r' || line.len() >= MAX_CONSOLE_LINE {
                emit(&mut line);
                if b == b'\n' || b == b'\r' {
                    continue;
                }
            }
            line.push(b);
        }
    }
    emit(&mut line);
}

/// Remove ANSI/VT100 escape sequences (iPXE and OVMF paint the screen with them).
pub fn strip_escapes(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            match chars.peek() {
                Some('[') => {
                    chars.next();
                    // CSI: parameters, then one final byte in @..~.
                    for c in chars.by_ref() {
                        if ('@'..='~').contains(&c) {
                            break;
                        }
                    }
                }
                Some(_) => {
                    chars.next();
                }
                None => {}
            }
        } else if c >= ' ' || c == '\t' {
            out.push(c);
        }
    }
    out
}

fn shell_line(program: &str, args: &[String]) -> String {
    let mut s = program.to_string();
    for a in args {
        s.push(' ');
        if a.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_=,./:".contains(c))
            && !a.is_empty()
        {
            s.push_str(a);
        } else {
            s.push('\'');
            s.push_str(&a.replace('\'', r"'\''"));
            s.push('\'');
        }
    }
    s.push('\n');
    s
}

/// The accelerator to use: KVM only if a real probe boot under KVM reaches userspace.
/// `PXELAB_ACCEL=tcg|kvm` overrides the probe. The result is kept for the process and in the
/// cache (`accel-probe`, keyed by QEMU version and host kernel; delete it to probe again).
pub fn choose_accel(kernel: &Path, initrd: &Path) -> Accel {
    static CHOICE: OnceLock<Accel> = OnceLock::new();
    *CHOICE.get_or_init(|| match std::env::var("PXELAB_ACCEL").as_deref() {
        Ok("tcg") => Accel::Tcg,
        Ok("kvm") => Accel::Kvm,
        _ => {
            // The probe costs up to 15 s, so its answer is remembered per QEMU and host kernel.
            let qemu = Command::new(QEMU)
                .arg("--version")
                .output()
                .map(|o| {
                    String::from_utf8_lossy(&o.stdout)
                        .lines()
                        .next()
                        .unwrap_or("")
                        .to_string()
                })
                .unwrap_or_default();
            let host = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
            let key = format!("{qemu}|{}", host.trim());
            let memo = crate::payload::cache_dir().join("accel-probe");
            if let Ok(text) = std::fs::read_to_string(&memo)
                && let Some((k, v)) = text.trim().rsplit_once('|')
                && k == key
            {
                return if v == "kvm" { Accel::Kvm } else { Accel::Tcg };
            }
            let accel = match probe_kvm(kernel, initrd) {
                Ok(()) => Accel::Kvm,
                Err(err) => {
                    eprintln!("pxelab: using TCG: {err:#}");
                    Accel::Tcg
                }
            };
            let _ = std::fs::write(&memo, format!("{key}|{}\n", accel.as_str()));
            accel
        }
    })
}

/// How long a KVM probe boot may take: it reaches userspace in about a second when KVM works.
const KVM_PROBE_TIMEOUT: Duration = Duration::from_secs(15);

/// Boot the test kernel directly under KVM and wait for the userspace marker.
pub fn probe_kvm(kernel: &Path, initrd: &Path) -> Result<()> {
    if !Path::new("/dev/kvm").exists() {
        bail!("/dev/kvm is missing");
    }
    let mut child = Command::new(QEMU)
        .args([
            "-accel",
            "kvm",
            "-m",
            "256",
            "-nographic",
            "-serial",
            "stdio",
        ])
        .args(["-monitor", "none", "-no-reboot", "-nodefaults", "-kernel"])
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "console=ttyS0 panic=-1 no_timer_check"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let (tx, rx) = std::sync::mpsc::channel();
    let out = child.stdout.take();
    std::thread::spawn(move || {
        if let Some(out) = out {
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        }
    });
    let marker = format!(
        "{} {}",
        crate::payload::STAGE_MARKER,
        pxed::stage::BootStage::OsUserspace.as_str()
    );
    let deadline = Instant::now() + KVM_PROBE_TIMEOUT;
    let mut ok = false;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(line) if line.contains(&marker) => {
                ok = true;
                break;
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    if ok {
        Ok(())
    } else {
        bail!("a KVM probe boot did not reach userspace within {KVM_PROBE_TIMEOUT:?}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_are_stripped() {
        assert_eq!(
            strip_escapes("\u{1b}c\u{1b}[?7l\u{1b}[2J\u{1b}[0mSeaBIOS (version"),
            "SeaBIOS (version"
        );
        assert_eq!(strip_escapes("iPXE \u{1b}[1;31mok\u{1b}[0m"), "iPXE ok");
    }

    #[test]
    fn command_line_for_ovmf_without_rom() {
        let dir = tempfile::tempdir().unwrap();
        let spec = MachineSpec {
            name: "u1".into(),
            firmware: Firmware::Ovmf,
            nic: "virtio-net-pci".into(),
            rom: Rom::None,
            memory_mib: 512,
            mac: "52:54:00:00:00:01".parse().unwrap(),
            firmware_code: None,
            firmware_vars: None,
            netboot: NetBoot::Pxe,
            media: None,
        };
        if !Path::new(OVMF_VARS).exists() {
            eprintln!("skipping: no OVMF");
            return;
        }
        let args = qemu_command(&spec, Accel::Tcg, Path::new("/x.sock"), dir.path()).unwrap();
        let line = args.join(" ");
        assert!(
            line.contains("virtio-net-pci,netdev=n0,mac=52:54:00:00:00:01,bootindex=1,romfile=")
        );
        assert!(line.contains("virtio-rng-pci"));
        assert!(line.contains("readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd"));
        assert!(dir.path().join("u1.OVMF_VARS.fd").exists());
        assert!(!line.contains("-boot n"));
    }
}
