//! Running a lab: namespace, TAP uplink, switch, server, machines, then the oracle loop until
//! every machine has a verdict. Every resource is a Drop guard, so success, failure, panic
//! and Ctrl-C all clean up.

use std::collections::HashMap;
use std::io::{BufRead, Seek, SeekFrom};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};
use pxed::events::BootEvent;
use pxed::mac::MacAddr;

use crate::labfile::{AddressServer, DEFAULT_TCG_SCALE, LabFile, ServerKind, parse_subnet};
use crate::machine::{Accel, Vm, choose_accel, qemu_command};
use crate::netns::Netns;
use crate::oracle::{Expectation, MachineOracle, Verdict};
use crate::payload::{Payload, cache_dir, ensure_payload};
use crate::report::{MachineReport, RunReport};
use crate::server::{AddressOnlyDnsmasq, Dnsmasq, Pxed, ServerContext, ServerProcess};
use crate::switch::{LabSwitch, PassThrough};
use crate::wire::WireTracker;

/// How long QEMU gets to connect its NIC to the switch after it starts.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);
/// How often the oracle loop wakes when nothing arrives (deadline checks, exits, event file).
const LOOP_TICK: Duration = Duration::from_millis(50);
/// After a passing verdict, how long machines may take to power off by themselves (the test
/// OS prints its last marker, then powers off) so that their last console lines are evidence.
const EXIT_GRACE: Duration = Duration::from_secs(5);
/// The TAP device's name inside the lab namespace.
const TAP_NAME: &str = "tap0";

static INTERRUPTED: AtomicBool = AtomicBool::new(false);
static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Install the Ctrl-C handler once: it only raises a flag the run loop checks, so the Drop
/// guards do the cleanup on the normal path.
/// The pxed binary and config template of a lab.
fn pxed_paths(lab: &LabFile) -> Result<(PathBuf, &Path)> {
    let binary = lab
        .server
        .binary
        .clone()
        .or_else(|| std::env::var_os("PXELAB_PXED").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("pxed"));
    let template = lab
        .server
        .config
        .as_deref()
        .context("pxed needs a config template")?;
    Ok((binary, template))
}

pub fn install_ctrlc() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = ctrlc::set_handler(|| {
            if INTERRUPTED.swap(true, Ordering::SeqCst) {
                // Second Ctrl-C: the user insists.
                std::process::exit(130);
            }
            eprintln!("pxelab: interrupted, cleaning up (Ctrl-C again to quit at once)");
        });
    });
}

/// Where run directories go: `$PXELAB_RUNS`, else `$CARGO_TARGET_DIR/pxelab-runs`, else
/// `target/pxelab-runs`.
pub fn runs_root() -> PathBuf {
    if let Some(d) = std::env::var_os("PXELAB_RUNS") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(d).join("pxelab-runs");
    }
    PathBuf::from("target").join("pxelab-runs")
}

/// Options for one run.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Print each stage as it is reached.
    pub progress: bool,
    /// Put the run directory here instead of under [`runs_root`].
    pub run_dir: Option<PathBuf>,
}

/// Run a lab to its verdict. Errors are harness failures (no root, QEMU missing); boot
/// failures are in the report.
pub fn run_lab(lab: &LabFile, opts: &RunOptions) -> Result<RunReport> {
    install_ctrlc();
    let started = Instant::now();
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let suffix = format!("{}-{n}", std::process::id());
    let stamp = humantime::format_rfc3339_seconds(SystemTime::now())
        .to_string()
        .replace([':', '-'], "");
    let run_dir = match &opts.run_dir {
        Some(d) => d.clone(),
        None => runs_root().join(format!("{}-{stamp}-{suffix}", lab.lab.name)),
    };
    std::fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    let run_dir = run_dir.canonicalize()?;
    let mut report = RunReport {
        lab: lab.lab.name.clone(),
        run_dir: run_dir.clone(),
        accel: String::new(),
        deadline_scale: 1.0,
        server: format!("{:?}", lab.server.kind).to_lowercase(),
        payload: None,
        duration_ms: 0,
        machines: Vec::new(),
        error: None,
    };
    let result = run_inner(lab, opts, &run_dir, &suffix, &mut report);
    report.duration_ms = started.elapsed().as_millis() as u64;
    if let Err(err) = &result {
        report.error = Some(format!("{err:#}"));
    }
    report.write(&run_dir)?;
    result.map(|()| report)
}

fn run_inner(
    lab: &LabFile,
    opts: &RunOptions,
    run_dir: &Path,
    suffix: &str,
    report: &mut RunReport,
) -> Result<()> {
    let payload: Payload = ensure_payload(&cache_dir()).context("preparing the test OS")?;
    report.payload = Some(payload.clone());
    let accel = choose_accel(&payload.kernel, &payload.initrd);
    let scale = match accel {
        Accel::Kvm => 1.0,
        Accel::Tcg => lab.lab.tcg_scale.unwrap_or(DEFAULT_TCG_SCALE),
    };
    report.accel = accel.as_str().to_string();
    report.deadline_scale = scale;

    let [a, b, c] = match &lab.lab.subnet {
        Some(s) => parse_subnet(s)?,
        // Each lab has its own namespace, so labs may share a subnet.
        None => [10, 77, 1],
    };
    let server_ip = Ipv4Addr::new(a, b, c, 1);

    let netns = Netns::create(suffix)?;
    let (obs_tx, obs_rx) = mpsc::channel();
    let mut switch = LabSwitch::start(run_dir, Some(obs_tx))?;
    // A server VM is itself on the switch: no uplink into the namespace.
    if lab.server.kind != ServerKind::Vm {
        let tap = netns.create_tap(TAP_NAME, &format!("{server_ip}/24"))?;
        if let Some(mtu) = lab.server.mtu {
            netns.ip(&["link", "set", TAP_NAME, "mtu", &mtu.to_string()])?;
        }
        switch.add_tap_port("uplink", tap, Box::new(PassThrough))?;
    }

    // Files the lab adds to the boot server's root (a user's iPXE build, shim, GRUB, ...).
    for (name, from) in &lab.server.files {
        let to = run_dir.join("tftp").join(name);
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::copy(from, &to)
            .with_context(|| format!("[server] files: copying {}", from.display()))?;
    }

    let ctx = ServerContext {
        netns: &netns,
        interface: TAP_NAME,
        server_ip,
        run_dir,
        payload: &payload,
    };
    let mut server: Box<dyn ServerProcess> = match lab.server.kind {
        ServerKind::Dnsmasq => Box::new(Dnsmasq::start(
            &ctx,
            lab.server.boot_file.as_deref().unwrap_or("boot.ipxe"),
            lab.server.dnsmasq,
        )?),
        ServerKind::Pxed => {
            let (binary, template) = pxed_paths(lab)?;
            Box::new(Pxed::start(&ctx, &binary, template)?)
        }
        ServerKind::Vm => Box::new(crate::vmserver::start_for_lab(
            lab,
            &payload,
            accel,
            scale,
            &mut switch,
            server_ip,
            run_dir,
        )?),
    };

    // The "existing DHCP server" for proxy labs: its own namespace and TAP at x.y.z.2.
    let _address_server = match lab.server.address_server {
        None => None,
        Some(AddressServer::Dnsmasq) => {
            let peer_ns = Netns::create(&format!("{suffix}a"))?;
            let peer_tap =
                peer_ns.create_tap(TAP_NAME, &format!("{}/24", Ipv4Addr::new(a, b, c, 2)))?;
            switch.add_tap_port("address-server", peer_tap, Box::new(PassThrough))?;
            let server = AddressOnlyDnsmasq::start(&peer_ns, TAP_NAME, ctx.pool(), run_dir)?;
            Some((server, peer_ns))
        }
    };

    let (con_tx, con_rx) = mpsc::channel();
    let specs = lab.machine_specs(c);
    let mut vms: Vec<Vm> = Vec::new();
    let mut oracles: Vec<MachineOracle> = Vec::new();
    for (i, (spec, expect)) in specs.into_iter().enumerate() {
        let filter = match lab.machines.get(i) {
            Some(m) => crate::quirks::port_filter(&m.quirks, m.impair.as_ref(), Instant::now())
                .with_context(|| format!("machine `{}`", m.name))?,
            None => Box::new(PassThrough),
        };
        let (port, sock) = switch.add_stream_port(&spec.name, filter)?;
        let args = qemu_command(&spec, accel, &sock, run_dir)?;
        let mut vm = Vm::spawn(spec, i, &args, run_dir, con_tx.clone())?;
        if let Err(err) = switch.wait_connected(port, CONNECT_TIMEOUT) {
            let _ = vm.exited();
            let stderr =
                std::fs::read_to_string(run_dir.join(format!("{}.qemu-stderr.log", vm.spec.name)))
                    .unwrap_or_default();
            bail!("{err}: QEMU said: {}", stderr.trim());
        }
        let expectations = expect
            .iter()
            .map(|e| Expectation {
                stage: e.stage,
                within: e.within.mul_f64(scale),
            })
            .collect();
        oracles.push(MachineOracle::new(
            vm.spec.mac,
            expectations,
            lab.oracle.tolerate.clone(),
            vm.started_at,
        ));
        if opts.progress {
            eprintln!(
                "pxelab: [{}] powered on ({} {} {}, pid {})",
                vm.spec.name,
                format!("{:?}", vm.spec.firmware).to_lowercase(),
                vm.spec.nic,
                vm.spec.mac,
                vm.pid()
            );
        }
        vms.push(vm);
    }
    drop(con_tx);

    let by_mac: HashMap<MacAddr, usize> = oracles
        .iter()
        .enumerate()
        .map(|(i, o)| (o.mac, i))
        .collect();
    let mut tracker = WireTracker::new();
    let mut events = EventTail::new(server.event_log());
    let mut exits: Vec<Option<String>> = vec![None; vms.len()];
    let names: Vec<String> = vms.iter().map(|v| v.spec.name.clone()).collect();
    let progress = |i: usize, new: Vec<(pxed::stage::BootStage, u64)>| {
        if opts.progress {
            for (stage, ms) in new {
                eprintln!(
                    "pxelab: [{}] {:>8.2} s  {}",
                    names.get(i).map(String::as_str).unwrap_or("?"),
                    ms as f64 / 1000.0,
                    stage
                );
            }
        }
    };

    let mut restart_at = lab
        .server
        .restart_at
        .filter(|_| lab.server.kind == ServerKind::Pxed);
    loop {
        if INTERRUPTED.load(Ordering::SeqCst) {
            bail!("interrupted");
        }
        while let Ok(obs) = obs_rx.try_recv() {
            for ev in tracker.observe(obs.at, &obs.frame) {
                if let Some(&i) = by_mac.get(&ev.mac)
                    && let Some(o) = oracles.get_mut(i)
                {
                    let new = o.on_wire(&ev);
                    progress(i, new);
                }
            }
        }
        for ev in events.read_new() {
            if let Some(&i) = by_mac.get(&ev.mac)
                && let Some(o) = oracles.get_mut(i)
            {
                let new = o.on_event(&ev);
                progress(i, new);
            }
            if restart_at == Some(ev.stage) {
                // The injected fault: pxed dies in the middle of the transfer and comes back.
                restart_at = None;
                server.kill();
                let (binary, template) = pxed_paths(lab)?;
                server = Box::new(Pxed::start(&ctx, &binary, template)?);
                if opts.progress {
                    eprintln!("pxelab: pxed killed and restarted at {}", ev.stage);
                }
            }
        }
        match con_rx.recv_timeout(LOOP_TICK) {
            Ok(line) => {
                if let Some(o) = oracles.get_mut(line.vm) {
                    let new = o.on_console(line.at, &line.text);
                    progress(line.vm, new);
                }
                while let Ok(line) = con_rx.try_recv() {
                    if let Some(o) = oracles.get_mut(line.vm) {
                        let new = o.on_console(line.at, &line.text);
                        progress(line.vm, new);
                    }
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => std::thread::sleep(LOOP_TICK),
        }
        let now = SystemTime::now();
        for (i, vm) in vms.iter_mut().enumerate() {
            if exits.get(i).is_some_and(Option::is_none)
                && let Some(st) = vm.exited()
            {
                // Read what is left of the console before judging the exit.
                while let Ok(line) = con_rx.try_recv() {
                    if let Some(o) = oracles.get_mut(line.vm) {
                        let new = o.on_console(line.at, &line.text);
                        progress(line.vm, new);
                    }
                }
                for ev in events.read_new() {
                    if let Some(&j) = by_mac.get(&ev.mac)
                        && let Some(o) = oracles.get_mut(j)
                    {
                        o.on_event(&ev);
                    }
                }
                if let Some(o) = oracles.get_mut(i) {
                    o.on_exit(now, &st.to_string());
                }
                if let Some(slot) = exits.get_mut(i) {
                    *slot = Some(st.to_string());
                }
            }
        }
        if let Some(st) = server.exited() {
            bail!("the {} server exited early ({st})", server.kind());
        }
        for o in &mut oracles {
            o.tick(now);
        }
        if oracles.iter().all(|o| o.verdict() != &Verdict::Running) {
            break;
        }
    }

    // A verdict can come from the server's event before the console line that says the same
    // thing: let passing machines finish and power off, reading their consoles meanwhile.
    if oracles.iter().all(|o| o.verdict() == &Verdict::Passed) {
        let grace_end = Instant::now() + EXIT_GRACE;
        while Instant::now() < grace_end && vms.iter_mut().any(|vm| vm.exited().is_none()) {
            if let Ok(line) = con_rx.recv_timeout(LOOP_TICK)
                && let Some(o) = oracles.get_mut(line.vm)
            {
                o.on_console(line.at, &line.text);
            }
        }
    }
    while let Ok(line) = con_rx.try_recv() {
        if let Some(o) = oracles.get_mut(line.vm) {
            o.on_console(line.at, &line.text);
        }
    }
    // Evidence already written but not yet read still belongs in the report (the verdict
    // may have been reached on a console line while the matching event sat in the file).
    for ev in events.read_new() {
        if let Some(&i) = by_mac.get(&ev.mac)
            && let Some(o) = oracles.get_mut(i)
        {
            o.on_event(&ev);
        }
    }
    while let Ok(obs) = obs_rx.try_recv() {
        for ev in tracker.observe(obs.at, &obs.frame) {
            if let Some(&i) = by_mac.get(&ev.mac)
                && let Some(o) = oracles.get_mut(i)
            {
                o.on_wire(&ev);
            }
        }
    }
    for (i, vm) in vms.iter_mut().enumerate() {
        vm.shutdown();
        if let Some(slot) = exits.get_mut(i)
            && slot.is_none()
        {
            *slot = Some("stopped by pxelab".into());
        }
    }
    server.stop();
    switch.stop();
    for (i, (vm, o)) in vms.iter().zip(&oracles).enumerate() {
        let hw = format!(
            "{} {} rom={}",
            format!("{:?}", vm.spec.firmware).to_lowercase(),
            vm.spec.nic,
            serde_json::to_value(&vm.spec.rom)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default()
        );
        let counts = tracker.counts().get(&o.mac).cloned().unwrap_or_default();
        report.machines.push(MachineReport::from_oracle(
            &vm.spec.name,
            hw,
            o,
            counts,
            exits.get(i).cloned().flatten(),
        ));
    }
    Ok(())
}

/// Reads BootEvent lines appended to a file since the last read.
struct EventTail {
    path: PathBuf,
    offset: u64,
    partial: String,
}

impl EventTail {
    fn new(path: &Path) -> Self {
        EventTail {
            path: path.to_path_buf(),
            offset: 0,
            partial: String::new(),
        }
    }

    fn read_new(&mut self) -> Vec<BootEvent> {
        let Ok(mut f) = std::fs::File::open(&self.path) else {
            return Vec::new();
        };
        if f.seek(SeekFrom::Start(self.offset)).is_err() {
            return Vec::new();
        }
        let mut out = Vec::new();
        let mut reader = std::io::BufReader::new(f);
        loop {
            let mut line = String::new();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    self.offset += n as u64;
                    self.partial.push_str(&line);
                    if !self.partial.ends_with('\n') {
                        break;
                    }
                    let full = std::mem::take(&mut self.partial);
                    match serde_json::from_str::<BootEvent>(full.trim()) {
                        Ok(ev) => out.push(ev),
                        Err(err) => eprintln!("pxelab: bad event line ({err}): {}", full.trim()),
                    }
                }
            }
        }
        out
    }
}
