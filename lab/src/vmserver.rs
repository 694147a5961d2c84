//! The boot server as a VM on the lab switch (`[server] kind = "vm"`): the prepared
//! `pxe-server` disk (or any imported server disk) boots in QEMU like the clients do. No TAP
//! uplink, no host-side server: the lab is the two (or more) VMs on a private LAN.
//!
//! The oracle still reads BootEvents from a file: a thread copies the server console's
//! `PXELAB-EVENT <json>` lines into it, stamped with the host time they arrived (the guest
//! clock under TCG is not the host's).

use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use pxed::events::BootEvent;
use pxed::mac::MacAddr;

use crate::images::ensure_server_image;
use crate::images::{
    DIED_LINE, EVENT_PREFIX, HTTP_PORT, LEASE_PREFIX, READY_LINE, STATE_DISK_FAILED_LINE,
};
use crate::labfile::LabFile;
use crate::machine::{Accel, ConsoleLine, Firmware, MachineSpec, OVMF_CODE, OVMF_VARS, Rom, Vm};
use crate::payload::{Payload, cache_dir};
use crate::server::ServerProcess;
use crate::switch::{LabSwitch, PassThrough};
use crate::vmdef::{VmFile, definitions_dir, nic_model};

/// How long the server VM may take from power-on to pxed serving, under KVM (scaled for TCG).
pub const SERVER_BOOT_TIMEOUT: Duration = Duration::from_secs(40);

/// A server VM's settings.
#[derive(Clone, Debug)]
pub struct VmServerSpec {
    /// Its disk (raw or qcow2); booted with `snapshot=on`, so it is never modified.
    pub disk: PathBuf,
    /// seabios or ovmf.
    pub firmware: Firmware,
    /// QEMU NIC model.
    pub nic: String,
    /// The NIC's MAC.
    pub mac: MacAddr,
    /// MiB.
    pub memory_mib: u32,
    /// vCPUs.
    pub cpus: u32,
    /// The address pxed serves on (for the phone-home URL).
    pub address: std::net::Ipv4Addr,
    /// A raw disk holding an ext4 file system that the server mounts as pxed's state directory
    /// (leases survive the VM); attached writable as virtio-blk with `cache=none`.
    pub state_disk: Option<PathBuf>,
}

impl VmServerSpec {
    /// The server VM that the definition `def` (read from `def_path`) describes, booting
    /// `disk` and serving on `address`, with an optional state disk.
    pub fn from_definition(
        def: &VmFile,
        def_path: &Path,
        disk: PathBuf,
        address: std::net::Ipv4Addr,
        state_disk: Option<PathBuf>,
    ) -> Result<Self> {
        let nic = def
            .vm
            .nic
            .first()
            .with_context(|| format!("{}: the server VM has no NIC", def_path.display()))?;
        Ok(VmServerSpec {
            disk,
            firmware: def.vm.firmware,
            nic: nic_model(&nic.model)
                .map(|m| m.qemu)
                .unwrap_or("e1000")
                .to_string(),
            mac: nic.mac,
            memory_mib: u32::try_from(def.vm.memory_mib).unwrap_or(u32::MAX),
            cpus: def.vm.cpus,
            address,
            state_disk,
        })
    }
}

/// A lease the server VM listed from its state disk at boot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredLease {
    /// The client.
    pub mac: MacAddr,
    /// Its address.
    pub ip: Ipv4Addr,
}

/// What the server VM says while it boots.
enum BootReport {
    /// pxed serves; the leases it listed from its state disk.
    Ready(Vec<StoredLease>),
    /// pxed or the state disk failed.
    Failed,
}

/// A running server VM.
pub struct VmServer {
    vm: Vm,
    events: PathBuf,
    phone: String,
    copier: Option<std::thread::JoinHandle<()>>,
    stored_leases: Vec<StoredLease>,
}

/// The QEMU command line for the server VM.
pub fn server_qemu_args(
    spec: &VmServerSpec,
    accel: Accel,
    switch_sock: &Path,
    dir: &Path,
) -> Result<Vec<String>> {
    let format = disk_format(&spec.disk)?;
    let mut a: Vec<String> = Vec::new();
    let mut push = |s: &[&str]| a.extend(s.iter().map(|x| x.to_string()));
    push(&["-name", "server", "-accel", accel.as_str()]);
    if accel == Accel::Tcg {
        push(&["-cpu", "max"]);
    }
    push(&["-m", &spec.memory_mib.to_string()]);
    push(&["-smp", &spec.cpus.to_string()]);
    push(&["-nographic", "-serial", "stdio", "-monitor", "none"]);
    push(&["-no-reboot", "-nodefaults"]);
    let qmp = dir.join("server.qmp");
    push(&[
        "-qmp",
        &format!("unix:{},server=on,wait=off", qmp.display()),
    ]);
    push(&["-pidfile", &dir.join("server.pid").display().to_string()]);
    push(&[
        "-netdev",
        &format!(
            "stream,id=n0,server=off,addr.type=unix,addr.path={}",
            switch_sock.display()
        ),
    ]);
    // No option ROM: the server boots from its disk, never from the network.
    push(&[
        "-device",
        &format!("{},netdev=n0,mac={},romfile=", spec.nic, spec.mac),
    ]);
    push(&[
        "-drive",
        &format!(
            "file={},format={format},if=ide,snapshot=on",
            spec.disk.display()
        ),
    ]);
    if let Some(state) = &spec.state_disk {
        // cache=none: the guest sees a disk with a volatile write cache, so its fsync must
        // send the FLUSH a real disk needs (QEMU then fdatasyncs the image), and QEMU writes
        // with O_DIRECT, past the host's page cache. What a QEMU kill loses is then exactly
        // what the guest had not yet handed to the disk. aio=threads: O_DIRECT without
        // io_uring or libaio.
        push(&[
            "-drive",
            &format!(
                "file={},format=raw,if=virtio,cache=none,aio=threads",
                state.display()
            ),
        ]);
    }
    match spec.firmware {
        Firmware::Seabios => push(&["-boot", "c"]),
        Firmware::Ovmf => {
            let vars = dir.join("server.OVMF_VARS.fd");
            std::fs::copy(OVMF_VARS, &vars)
                .with_context(|| format!("copying {OVMF_VARS} (apt-get install ovmf)"))?;
            push(&[
                "-drive",
                &format!("if=pflash,format=raw,readonly=on,file={OVMF_CODE}"),
                "-drive",
                &format!("if=pflash,format=raw,file={}", vars.display()),
            ]);
        }
        other => bail!(
            "the server VM boots with seabios or ovmf, not {}",
            other.as_str()
        ),
    }
    Ok(a)
}

/// qcow2 or raw, from the file's first bytes (never trust an extension with `format=`).
pub fn disk_format(path: &Path) -> Result<&'static str> {
    let mut magic = [0u8; 4];
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    std::io::Read::read_exact(&mut f, &mut magic)
        .with_context(|| format!("reading {}", path.display()))?;
    Ok(match &magic {
        b"QFI\xfb" => "qcow2",
        b"KDMV" => "vmdk",
        _ => "raw",
    })
}

impl VmServer {
    /// Boot the server VM on `switch_sock` and wait until it says pxed serves.
    pub fn start(
        spec: &VmServerSpec,
        accel: Accel,
        switch_sock: &Path,
        run_dir: &Path,
        timeout: Duration,
    ) -> Result<Self> {
        let args = server_qemu_args(spec, accel, switch_sock, run_dir)?;
        let machine = MachineSpec {
            name: "server".into(),
            firmware: spec.firmware,
            nic: spec.nic.clone(),
            rom: Rom::None,
            memory_mib: spec.memory_mib,
            mac: spec.mac,
            firmware_code: None,
            firmware_vars: None,
            netboot: Default::default(),
            media: None,
        };
        let (tx, rx) = mpsc::channel::<ConsoleLine>();
        let mut vm = Vm::spawn(machine, usize::MAX, &args, run_dir, tx)?;
        let events = run_dir.join("events.jsonl");
        let mut file = std::fs::File::create(&events)?;
        let (ready_tx, ready_rx) = mpsc::channel::<BootReport>();
        let copier = std::thread::Builder::new()
            .name("server-events".into())
            .spawn(move || {
                let mut leases = Vec::new();
                for line in rx {
                    if line.text.contains(READY_LINE) {
                        let _ = ready_tx.send(BootReport::Ready(std::mem::take(&mut leases)));
                    } else if line.text.contains(DIED_LINE)
                        || line.text.contains(STATE_DISK_FAILED_LINE)
                    {
                        let _ = ready_tx.send(BootReport::Failed);
                    } else if let Some(lease) = parse_lease_line(&line.text) {
                        leases.push(lease);
                    }
                    if let Some(ev) = parse_event_line(&line.text, line.at)
                        && let Ok(json) = serde_json::to_string(&ev)
                    {
                        let _ = writeln!(file, "{json}");
                        let _ = file.flush();
                    }
                }
            })?;
        let deadline = Instant::now() + timeout;
        let stored_leases = loop {
            match ready_rx.recv_timeout(Duration::from_millis(100)) {
                Ok(BootReport::Ready(leases)) => break leases,
                Ok(BootReport::Failed) => bail!(
                    "the server VM says pxed (or its state disk) failed; console in {}",
                    run_dir.join("server.console.log").display()
                ),
                Err(_) => {}
            }
            if let Some(st) = vm.exited() {
                bail!(
                    "the server VM exited during boot ({st}); console in {}",
                    run_dir.join("server.console.log").display()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "the server VM did not report `{READY_LINE}` within {timeout:?}; console in {}",
                    run_dir.join("server.console.log").display()
                );
            }
        };
        Ok(VmServer {
            vm,
            events,
            phone: format!(
                "http://{}:{HTTP_PORT}/api/phone-home?stage={}",
                spec.address,
                pxed::stage::BootStage::OsPhoneHome.as_str()
            ),
            copier: Some(copier),
            stored_leases,
        })
    }

    /// The QEMU process id.
    pub fn pid(&self) -> u32 {
        self.vm.pid()
    }

    /// The leases the server listed from its state disk at boot, before serving anyone
    /// (empty without a state disk).
    pub fn stored_leases(&self) -> &[StoredLease] {
        &self.stored_leases
    }

    /// Pull the plug: SIGKILL the QEMU process, so the guest's page cache and block queue
    /// vanish with it, and wait for it to be gone.
    pub fn power_cut(&mut self) {
        self.vm.power_cut();
        if let Some(t) = self.copier.take() {
            let _ = t.join();
        }
    }
}

/// `PXELAB-LEASE <mac> <ip> <expires> <hostname>` (the server's boot listing) -> the lease.
pub fn parse_lease_line(text: &str) -> Option<StoredLease> {
    let (_, rest) = text.split_once(LEASE_PREFIX)?;
    let mut words = rest.split_whitespace();
    Some(StoredLease {
        mac: words.next()?.parse().ok()?,
        ip: words.next()?.parse().ok()?,
    })
}

/// `PXELAB-EVENT {json}` anywhere in a console line -> the event, stamped `at`.
pub fn parse_event_line(text: &str, at: SystemTime) -> Option<BootEvent> {
    let (_, json) = text.split_once(EVENT_PREFIX)?;
    let mut ev: BootEvent = serde_json::from_str(json.trim()).ok()?;
    ev.at_ms = at
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(ev.at_ms);
    Some(ev)
}

impl ServerProcess for VmServer {
    fn kind(&self) -> &'static str {
        "vm"
    }
    fn event_log(&self) -> &Path {
        &self.events
    }
    fn phone_url(&self) -> String {
        self.phone.clone()
    }
    fn exited(&mut self) -> Option<ExitStatus> {
        self.vm.exited()
    }
    fn stop(&mut self) {
        self.vm.shutdown();
        if let Some(t) = self.copier.take() {
            let _ = t.join();
        }
    }
}

impl Drop for VmServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The switch port (and run-directory file prefix) of the server VM.
pub const SERVER_PORT_NAME: &str = "server";

/// Start the lab's `[server] kind = "vm"`: load its definition, build (or find cached) its
/// disk, connect it to the switch and wait until it serves.
pub fn start_for_lab(
    lab: &LabFile,
    payload: &Payload,
    accel: Accel,
    scale: f64,
    switch: &mut LabSwitch,
    server_ip: Ipv4Addr,
    run_dir: &Path,
) -> Result<VmServer> {
    let def_path = lab
        .server
        .definition
        .clone()
        .unwrap_or_else(|| definitions_dir().join("pxe-server.toml"));
    let def = VmFile::load(&def_path)?;
    let disk = def
        .disk
        .as_ref()
        .with_context(|| format!("{}: the server VM has no [disk]", def_path.display()))?;
    let (disk, address) = match (&disk.recipe, &disk.path) {
        (Some(_), _) => {
            let pxed = resolve_binary(
                lab.server
                    .binary
                    .clone()
                    .or_else(|| std::env::var_os("PXELAB_PXED").map(PathBuf::from))
                    .unwrap_or_else(|| PathBuf::from("pxed")),
            )?;
            let image = ensure_server_image(&cache_dir(), payload, &def, &pxed)?;
            (image.disk, image.address)
        }
        (None, Some(path)) => (
            path.clone(),
            def.server.as_ref().map(|s| s.address).unwrap_or(server_ip),
        ),
        (None, None) => bail!("{}: [disk] has neither recipe nor path", def_path.display()),
    };
    if address != server_ip {
        bail!(
            "the server VM's address {address} is not the lab's server address {server_ip}: set [lab] subnet to its /24"
        );
    }
    let spec = VmServerSpec::from_definition(&def, &def_path, disk, address, None)?;
    let (port, sock) = switch.add_stream_port(SERVER_PORT_NAME, Box::new(PassThrough))?;
    let timeout = SERVER_BOOT_TIMEOUT.mul_f64(scale);
    let server = VmServer::start(&spec, accel, &sock, run_dir, timeout)?;
    switch.wait_connected(port, Duration::from_secs(1))?;
    Ok(server)
}

/// A bare name is looked up on PATH (the image needs the file itself).
pub fn resolve_binary(p: PathBuf) -> Result<PathBuf> {
    if p.components().count() > 1 || p.is_absolute() {
        return Ok(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(&p))
        .find(|c| c.is_file())
        .with_context(|| format!("{} is not on PATH (set [server] binary)", p.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_lines_are_parsed_and_restamped() {
        let line = r#"PXELAB-EVENT {"mac":"08:00:27:77:01:10","stage":"dhcp.ack","detail":"10.77.1.100","at_ms":5}"#;
        let at = UNIX_EPOCH + Duration::from_millis(1_000_000);
        let ev = parse_event_line(line, at).unwrap();
        assert_eq!(ev.at_ms, 1_000_000);
        assert_eq!(ev.mac.to_string(), "08:00:27:77:01:10");
        assert!(parse_event_line("PXELAB-EVENT {broken", at).is_none());
        assert!(parse_event_line("[ 1.0] e1000: eth0 up", at).is_none());
    }

    #[test]
    fn lease_lines_are_parsed() {
        let l =
            parse_lease_line("PXELAB-LEASE 02:dd:01:00:00:07  10.77.1.12  1764099000  -").unwrap();
        assert_eq!(l.mac.to_string(), "02:dd:01:00:00:07");
        assert_eq!(l.ip, Ipv4Addr::new(10, 77, 1, 12));
        assert!(parse_lease_line("PXELAB-LEASE mac ip expires hostname").is_none());
        assert!(parse_lease_line("PXELAB-LEASES-END").is_none());
    }
}
