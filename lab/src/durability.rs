//! Power-cut durability: pxed in the server VM keeps its state on a virtio disk (ext4, mounted
//! by the server's /init); perfdhcp, a real DHCP load generator, runs DORA against it from a
//! namespace on the lab switch; the QEMU process is SIGKILLed at a random moment under that
//! load and the VM is booted again from the same disk, as many times as asked.
//!
//! Killing QEMU, not pxed: a killed pxed leaves its writes in the guest's page cache, which
//! survives, so that proves recovery only. A killed QEMU takes the guest's page cache and
//! block queue with it; what survives is what the guest had handed to its disk (see
//! [`crate::vmserver::server_qemu_args`] for the drive's cache mode).
//!
//! The evidence: the switch sees every ACK that left the VM (the ACK is what tells a client
//! it holds an address); after each boot the server lists the leases on its disk before it
//! serves anyone. Every acknowledged (MAC, address) must be in that list, and no address may
//! belong to two MACs, neither in the list nor among the acknowledgements.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use pxed::mac::MacAddr;
use serde::Serialize;

use crate::images::ensure_server_image;
use crate::machine::{Accel, choose_accel};
use crate::netns::Netns;
use crate::payload::{cache_dir, ensure_payload};
use crate::switch::{LabSwitch, PassThrough};
use crate::vmdef::{VmFile, definitions_dir};
use crate::vmserver::{SERVER_BOOT_TIMEOUT, StoredLease, VmServer, VmServerSpec};

/// The state disk's size: SQLite's file, its WAL and ext4's journal fit many times over.
const STATE_DISK_MIB: u64 = 64;
/// The load generator's address (the durability config's pool starts after it).
const LOAD_IP_HOST: u8 = 2;
/// How long the load may take to get the first ACKs of a cycle through, under KVM (scaled).
const LOAD_TIMEOUT: Duration = Duration::from_secs(30);
/// The pxed config template of the durability server.
const CONFIG_TEMPLATE: &str = "durability.pxed.toml";
/// perfdhcp's MAC template: locally administered, the cycle number in the third octet, so each
/// cycle brings new clients (new leases, not only renewals).
const MAC_TEMPLATE_PREFIX: &str = "02:dd";

/// What to run.
#[derive(Clone, Debug)]
pub struct DurabilityOptions {
    /// Power cuts (the VM boots once more than this).
    pub kills: u32,
    /// Where the disk, captures, consoles and the report go.
    pub run_dir: PathBuf,
    /// The pxed binary put into the server image.
    pub pxed: PathBuf,
    /// Seed of the kill moments (printed in the report, so a run can be repeated).
    pub seed: u64,
    /// perfdhcp exchanges per second.
    pub rate: u32,
    /// perfdhcp clients (MACs) per cycle.
    pub clients_per_cycle: u32,
    /// The power cut comes this long at most (uniformly drawn) after the cycle's n-th new
    /// client was acknowledged, n drawn uniformly from 1 to `clients_per_cycle`: close behind
    /// a new lease, where a lease that is not yet on the disk would be lost.
    pub max_kill_delay: Duration,
}

impl DurabilityOptions {
    /// Defaults for `kills` power cuts, with a seed from the clock.
    pub fn new(kills: u32, run_dir: PathBuf, pxed: PathBuf) -> Self {
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        DurabilityOptions {
            kills,
            run_dir,
            pxed,
            seed,
            rate: 200,
            clients_per_cycle: 12,
            max_kill_delay: Duration::from_secs(1),
        }
    }
}

/// One boot of the server VM (and the load and power cut that followed it, unless last).
#[derive(Clone, Debug, Serialize)]
pub struct CycleReport {
    /// 0 is the first boot, on the empty disk.
    pub boot: u32,
    /// Power-on to pxed serving, seconds.
    pub boot_secs: f64,
    /// Leases the server listed from its disk at this boot.
    pub stored: usize,
    /// ACKs (frames) the server sent under load before the power cut.
    pub acks: usize,
    /// New clients acknowledged before the power cut may come (drawn).
    pub kill_after_new_clients: usize,
    /// The power cut's delay after them, milliseconds (drawn).
    pub kill_delay_ms: u64,
    /// Load start to power cut, seconds.
    pub load_secs: f64,
    /// Load start to the first ACK, seconds (the first commit on a fresh disk is the slow one).
    pub first_ack_secs: f64,
}

/// The result.
#[derive(Clone, Debug, Serialize)]
pub struct DurabilityReport {
    /// Power cuts done.
    pub kills: u32,
    /// The seed used.
    pub seed: u64,
    /// QEMU accelerator.
    pub accel: String,
    /// ACK frames the server sent, all cycles.
    pub ack_frames: usize,
    /// Distinct (MAC, address) pairs acknowledged.
    pub leases_acked: usize,
    /// Acknowledged leases missing (or with another address) after a restart.
    pub lost: Vec<String>,
    /// Addresses held by two MACs (on disk or among the acknowledgements).
    pub duplicates: Vec<String>,
    /// Per boot.
    pub cycles: Vec<CycleReport>,
    /// Wall time, seconds.
    pub total_secs: f64,
    /// Where everything is.
    pub run_dir: PathBuf,
}

impl DurabilityReport {
    /// No acknowledged lease lost, no address with two owners.
    pub fn passed(&self) -> bool {
        self.lost.is_empty() && self.duplicates.is_empty()
    }

    /// A few lines for people.
    pub fn summary(&self) -> String {
        let boots: Vec<f64> = self.cycles.iter().map(|c| c.boot_secs).collect();
        let mean_boot = boots.iter().sum::<f64>() / boots.len().max(1) as f64;
        format!(
            "power cuts: {}  (seed {}, {})\nACK frames sent: {}  distinct leases acknowledged: {}\n\
             lost: {}  addresses with two owners: {}\nserver boots: {} (mean {:.1} s)  total {:.0} s\n{}{}",
            self.kills,
            self.seed,
            self.accel,
            self.ack_frames,
            self.leases_acked,
            self.lost.len(),
            self.duplicates.len(),
            self.cycles.len(),
            mean_boot,
            self.total_secs,
            self.lost
                .iter()
                .map(|l| format!("  lost: {l}\n"))
                .collect::<String>(),
            self.duplicates
                .iter()
                .map(|d| format!("  two owners: {d}\n"))
                .collect::<String>(),
        )
    }
}

/// Check what the disk holds against what was acknowledged: (lost, duplicates).
pub fn compare_leases(
    acked: &HashMap<MacAddr, Ipv4Addr>,
    stored: &[StoredLease],
) -> (Vec<String>, Vec<String>) {
    let on_disk: HashMap<MacAddr, Ipv4Addr> = stored.iter().map(|l| (l.mac, l.ip)).collect();
    let mut lost: Vec<String> = acked
        .iter()
        .filter(|(mac, ip)| on_disk.get(mac) != Some(ip))
        .map(|(mac, ip)| match on_disk.get(mac) {
            Some(other) => format!("{mac} was acknowledged {ip}, the disk says {other}"),
            None => format!("{mac} was acknowledged {ip}, the disk has no lease for it"),
        })
        .collect();
    lost.sort();
    let mut duplicates = Vec::new();
    let pairs = [
        (
            "on disk",
            stored.iter().map(|l| (l.ip, l.mac)).collect::<Vec<_>>(),
        ),
        (
            "acknowledged",
            acked.iter().map(|(m, i)| (*i, *m)).collect::<Vec<_>>(),
        ),
    ];
    for (what, pairs) in pairs {
        let mut owners: BTreeMap<Ipv4Addr, Vec<MacAddr>> = BTreeMap::new();
        for (ip, mac) in pairs {
            owners.entry(ip).or_default().push(mac);
        }
        for (ip, macs) in owners.into_iter().filter(|(_, m)| m.len() > 1) {
            let names: Vec<String> = macs.iter().map(|m| m.to_string()).collect();
            duplicates.push(format!("{ip} {what} for {}", names.join(", ")));
        }
    }
    (lost, duplicates)
}

/// A small deterministic generator for the kill moments (xorshift64*).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n.max(1)
    }
}

/// The lab's own pxed config templates.
fn labs_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("labs")
}

/// A fresh raw disk of [`STATE_DISK_MIB`] with an empty ext4 file system on it.
fn make_state_disk(path: &Path) -> Result<()> {
    let f = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.set_len(STATE_DISK_MIB << 20)?;
    drop(f);
    // Lazy initialisation off: no background writes of the kernel's own after mount.
    crate::netns::run(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "pxed-state"])
            .args(["-E", "lazy_itable_init=0,lazy_journal_init=0"])
            .arg(path),
    )
    .context("mkfs.ext4 (apt-get install e2fsprogs)")?;
    // mkfs wrote through the host's page cache: put that on the host's disk now, or the
    // guest's first flush (its first lease commit) pays for all of it.
    std::fs::File::open(path)?.sync_all()?;
    Ok(())
}

/// perfdhcp as a relay from the load namespace, new MACs for each cycle.
fn start_load(
    ns: &Netns,
    opts: &DurabilityOptions,
    cycle: u32,
    server: Ipv4Addr,
    dir: &Path,
) -> Result<Child> {
    let [a, b, c, _] = server.octets();
    let log = std::fs::File::create(dir.join("perfdhcp.log"))?;
    let mut cmd = ns.command("perfdhcp");
    cmd.args([
        "-4",
        "-l",
        &Ipv4Addr::new(a, b, c, LOAD_IP_HOST).to_string(),
    ])
    .args(["-r", &opts.rate.to_string()])
    .args(["-R", &opts.clients_per_cycle.to_string()])
    .args([
        "-b",
        &format!("mac={MAC_TEMPLATE_PREFIX}:{:02x}:00:00:00", cycle % 256),
    ])
    .arg(server.to_string())
    .stdin(Stdio::null())
    .stdout(log.try_clone()?)
    .stderr(log);
    cmd.spawn()
        .context("starting perfdhcp (apt-get install kea-admin)")
}

/// Run the whole procedure. Needs root (namespace, TAP) and QEMU.
pub fn run_durability(opts: &DurabilityOptions) -> Result<DurabilityReport> {
    let started = Instant::now();
    std::fs::create_dir_all(&opts.run_dir)?;
    let cache = cache_dir();
    let payload = ensure_payload(&cache).context("preparing the test OS")?;
    let accel = choose_accel(&payload.kernel, &payload.initrd);
    let scale = match accel {
        Accel::Kvm => 1.0,
        Accel::Tcg => crate::labfile::DEFAULT_TCG_SCALE,
    };
    let def_path = definitions_dir().join("pxe-server.toml");
    let mut def = VmFile::load(&def_path)?;
    let server_def = def
        .server
        .as_mut()
        .with_context(|| format!("{}: no [server]", def_path.display()))?;
    server_def.pxed_config = labs_dir().join(CONFIG_TEMPLATE);
    let image = ensure_server_image(&cache, &payload, &def, &opts.pxed)?;
    let disk = opts.run_dir.join("state.ext4");
    let spec = VmServerSpec::from_definition(
        &def,
        &def_path,
        image.disk.clone(),
        image.address,
        Some(disk.clone()),
    )?;
    make_state_disk(&disk)?;

    // Every ACK the server sends crosses the switch: collect (MAC, address) in order.
    let (obs_tx, obs_rx) = mpsc::channel();
    let mut switch = LabSwitch::start(&opts.run_dir, Some(obs_tx))?;
    let ns = Netns::create(&format!("dur{}", std::process::id()))?;
    let [a, b, c, _] = image.address.octets();
    let tap = ns.create_tap(
        "eth0",
        &format!(
            "{}/{}",
            Ipv4Addr::new(a, b, c, LOAD_IP_HOST),
            image.prefix_len
        ),
    )?;
    let load_port = switch.add_tap_port("load", tap, Box::new(PassThrough))?;
    let ack_log: Arc<Mutex<Vec<(MacAddr, Ipv4Addr)>>> = Arc::default();
    let collector = {
        let log = ack_log.clone();
        std::thread::Builder::new()
            .name("ack-collector".into())
            .spawn(move || {
                for o in obs_rx {
                    if o.port != load_port
                        && let Some(lease) = crate::wire::dhcp_ack_lease(&o.frame)
                        && let Ok(mut log) = log.lock()
                    {
                        log.push(lease);
                    }
                }
            })?
    };
    let ack_count = || ack_log.lock().map(|l| l.len()).unwrap_or(0);

    let mut rng = Rng(opts.seed | 1);
    let mut acked: HashMap<MacAddr, Ipv4Addr> = HashMap::new();
    let mut report = DurabilityReport {
        kills: 0,
        seed: opts.seed,
        accel: accel.as_str().to_string(),
        ack_frames: 0,
        leases_acked: 0,
        lost: Vec::new(),
        duplicates: Vec::new(),
        cycles: Vec::new(),
        total_secs: 0.0,
        run_dir: opts.run_dir.clone(),
    };
    for boot in 0..=opts.kills {
        let dir = opts.run_dir.join(format!("boot-{boot:02}"));
        std::fs::create_dir_all(&dir)?;
        let (port, sock) =
            switch.add_stream_port(&format!("server-{boot:02}"), Box::new(PassThrough))?;
        let t0 = Instant::now();
        let mut vm = VmServer::start(
            &spec,
            accel,
            &sock,
            &dir,
            SERVER_BOOT_TIMEOUT.mul_f64(scale),
        )
        .with_context(|| format!("boot {boot} of the server VM"))?;
        switch.wait_connected(port, Duration::from_secs(1))?;
        let boot_secs = t0.elapsed().as_secs_f64();

        // The previous power cut is at least a boot ago: every frame the dead VM had sent
        // has long been switched and collected.
        if let Ok(log) = ack_log.lock() {
            acked.extend(log.iter().copied());
        }
        let (lost, duplicates) = compare_leases(&acked, vm.stored_leases());
        report
            .lost
            .extend(lost.into_iter().map(|l| format!("boot {boot}: {l}")));
        report
            .duplicates
            .extend(duplicates.into_iter().map(|d| format!("boot {boot}: {d}")));
        let mut cycle = CycleReport {
            boot,
            boot_secs,
            stored: vm.stored_leases().len(),
            acks: 0,
            kill_after_new_clients: 0,
            kill_delay_ms: 0,
            load_secs: 0.0,
            first_ack_secs: 0.0,
        };
        eprintln!(
            "durability: boot {boot} in {boot_secs:.1} s, {} leases on disk, {} acknowledged so far",
            cycle.stored,
            acked.len()
        );
        if boot == opts.kills {
            report.cycles.push(cycle);
            drop(vm);
            break;
        }

        let before = ack_count();
        cycle.kill_after_new_clients =
            1 + rng.below(u64::from(opts.clients_per_cycle.max(1))) as usize;
        let max_ms = u64::try_from(opts.max_kill_delay.as_millis()).unwrap_or(u64::MAX);
        cycle.kill_delay_ms = rng.below(max_ms + 1);
        let new_clients = || {
            ack_log
                .lock()
                .map(|l| {
                    let macs: std::collections::HashSet<MacAddr> = l
                        .get(before..)
                        .unwrap_or_default()
                        .iter()
                        .map(|(mac, _)| *mac)
                        .collect();
                    macs.len()
                })
                .unwrap_or(0)
        };
        let load_started = Instant::now();
        let mut load = start_load(&ns, opts, boot, image.address, &dir)?;
        let deadline = load_started + LOAD_TIMEOUT.mul_f64(scale);
        let outcome = loop {
            let acks = ack_count() - before;
            if acks > 0 && cycle.first_ack_secs == 0.0 {
                cycle.first_ack_secs = load_started.elapsed().as_secs_f64();
            }
            if new_clients() >= cycle.kill_after_new_clients {
                break Ok(());
            }
            if let Ok(Some(st)) = load.try_wait() {
                break Err(anyhow::anyhow!(
                    "perfdhcp exited ({st}); log in {}",
                    dir.join("perfdhcp.log").display()
                ));
            }
            if Instant::now() > deadline {
                break Err(anyhow::anyhow!(
                    "only {} ACKs within {:?} of load; console in {}",
                    ack_count() - before,
                    LOAD_TIMEOUT.mul_f64(scale),
                    dir.join("server.console.log").display()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        if let Err(e) = outcome {
            let _ = load.kill();
            let _ = load.wait();
            return Err(e);
        }
        std::thread::sleep(Duration::from_millis(cycle.kill_delay_ms));
        vm.power_cut();
        cycle.load_secs = load_started.elapsed().as_secs_f64();
        let _ = load.kill();
        let _ = load.wait();
        cycle.acks = ack_count() - before;
        report.kills += 1;
        report.cycles.push(cycle);
    }
    drop(switch);
    let _ = collector.join();
    let log = ack_log.lock().map(|l| l.clone()).unwrap_or_default();
    report.ack_frames = log.len();
    let mut pairs: Vec<(MacAddr, Ipv4Addr)> = log;
    pairs.sort();
    pairs.dedup();
    report.leases_acked = pairs.len();
    report.total_secs = started.elapsed().as_secs_f64();
    std::fs::write(
        opts.run_dir.join("durability.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    if report.cycles.is_empty() {
        bail!("no server boot completed");
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mac(n: u8) -> MacAddr {
        MacAddr([2, 0xdd, 0, 0, 0, n])
    }

    #[test]
    fn a_lease_missing_or_moved_is_lost_and_a_shared_address_is_reported() {
        let ip = |n| Ipv4Addr::new(10, 77, 1, n);
        let acked: HashMap<MacAddr, Ipv4Addr> =
            [(mac(1), ip(3)), (mac(2), ip(4)), (mac(3), ip(5))].into();
        let stored = vec![
            StoredLease {
                mac: mac(1),
                ip: ip(3),
            },
            StoredLease {
                mac: mac(2),
                ip: ip(9),
            },
            StoredLease {
                mac: mac(4),
                ip: ip(9),
            },
        ];
        let (lost, dup) = compare_leases(&acked, &stored);
        assert_eq!(lost.len(), 2, "{lost:?}");
        assert!(lost.iter().any(|l| l.contains("the disk says 10.77.1.9")));
        assert!(lost.iter().any(|l| l.contains("no lease")));
        assert_eq!(dup.len(), 1, "{dup:?}");
        assert!(dup[0].starts_with("10.77.1.9 on disk"));
        // Everything there, nothing shared: clean.
        let stored: Vec<StoredLease> = acked
            .iter()
            .map(|(m, i)| StoredLease { mac: *m, ip: *i })
            .collect();
        assert_eq!(compare_leases(&acked, &stored), (vec![], vec![]));
    }

    #[test]
    fn the_kill_moments_repeat_with_the_seed() {
        let draw = |seed: u64| {
            let mut r = Rng(seed | 1);
            (0..5).map(|_| r.below(3000)).collect::<Vec<_>>()
        };
        assert_eq!(draw(42), draw(42));
        assert!(draw(42).iter().all(|&d| d <= 3000));
    }
}
