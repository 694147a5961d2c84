//! pxed as the network's only DHCP server (full mode), on LANs of network namespaces, with
//! real clients (busybox udhcpc, ISC dhclient, dhcpcd), a real relay agent (ISC dhcrelay) and
//! a real load generator (perfdhcp) under strace for the durability proof.

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use pxed::dhcp::wire::{DhcpPacket, MessageType};
use serde_json::Value;

use crate::require_root;
use crate::support::{Daemon, Lan, run, udp_listening, unique, wait_for};

/// Writes a full-mode config for one subnet `10.X.0.0/24` with pxed at `.1`.
fn config(dir: &Path, net: u8, extra: &str) -> PathBuf {
    let root = dir.join("root");
    std::fs::create_dir_all(&root).unwrap();
    let hook_log = dir.join("hook.log");
    let hook = dir.join("hook.sh");
    std::fs::write(
        &hook,
        format!(
            "#!/bin/sh\nprintf '%s ' \"$1\" >> {log}\ncat >> {log}\n",
            log = hook_log.display()
        ),
    )
    .unwrap();
    run("chmod", &["+x", hook.to_str().unwrap()]);
    let text = format!(
        r#"[server]
interface = "eth0"
root = "{root}"
state_dir = "{state}"

[dhcp]
mode = "full"
lease_hook = "{hook}"
{extra}

[[dhcp.subnet]]
network = "10.{net}.0.0"
prefix_len = 24
pool_start = "10.{net}.0.100"
pool_end = "10.{net}.0.199"
router = "10.{net}.0.1"
dns = ["10.{net}.0.53"]
domain = "lab.test"
search = ["lab.test", "example.org"]
ntp = ["10.{net}.0.123"]
mtu = 1400
lease_time = "10m"

[[dhcp.subnet.route]]
network = "172.16.0.0"
prefix_len = 12
gateway = "10.{net}.0.254"

[tftp]
enabled = false

[http]
enabled = false

[[profile]]
name = "default"
kernel = "vmlinuz"
initrd = ["initrd.img"]
"#,
        root = root.display(),
        state = dir.join("state").display(),
        hook = hook.display(),
    );
    let path = dir.join("pxed.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// `pxed leases --json`: mac -> ip. Reads the store beside the running server.
fn leases(dir: &Path) -> HashMap<String, String> {
    let out = run(
        env!("CARGO_BIN_EXE_pxed"),
        &[
            "leases",
            "--json",
            "--state-dir",
            dir.join("state").to_str().unwrap(),
        ],
    );
    let v: Value = serde_json::from_str(&out).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["mac"].as_str().unwrap().to_string(),
                l["ip"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// A client script that configures the address and logs each event with its variables.
fn udhcpc_script(dir: &Path) -> (PathBuf, PathBuf) {
    let log = dir.join("udhcpc.events");
    let script = dir.join("udhcpc.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\ncase \"$1\" in\n bound|renew)\n  ip addr flush dev $interface\n  \
             ip addr add $ip/$mask dev $interface\n  echo \"$1 ip=$ip router=$router dns=$dns \
             domain=$domain search=$search ntp=$ntpsrv mtu=$mtu routes=$staticroutes\" >> {log} ;;\n \
             deconfig) ip addr flush dev $interface ;;\nesac\nexit 0\n",
            log = log.display()
        ),
    )
    .unwrap();
    run("chmod", &["+x", script.to_str().unwrap()]);
    (script, log)
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

fn signal(d: &Daemon, sig: &str) {
    run("kill", &[sig, &d.child.id().to_string()]);
}

#[test]
fn real_clients_get_leases_options_renew_release_and_reboot() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    let mut lan = Lan::new();
    let srv = lan.host("fsv", Some("10.232.0.1/24"));
    let c1 = lan.host("fud", None);
    let c2 = lan.host("fdh", None);
    let c3 = lan.host("fdc", None);
    let cfg = config(dir.path(), 232, "");
    let mut pxed =
        crate::support::start_pxed(&lan.hosts[srv], &cfg, &dir.path().join("pxed.log"), &[]);
    let diag = |pxed: &Daemon| format!("pxed log:\n{}", pxed.log_text());

    // busybox udhcpc: DORA with the options people set, renew on USR1, release on USR2.
    let (script, events) = udhcpc_script(dir.path());
    let mut cmd = lan.hosts[c1].command("udhcpc");
    cmd.args(["-f", "-i", "eth0", "-t", "10", "-T", "1", "-s"])
        .arg(&script)
        .args([
            "-O",
            "search",
            "-O",
            "staticroutes",
            "-O",
            "ntpsrv",
            "-O",
            "mtu",
        ]);
    let udhcpc = Daemon::spawn(cmd, &dir.path().join("udhcpc.log"));
    let bound = wait_for("udhcpc bound", Duration::from_secs(15), || {
        lines(&events).into_iter().find(|l| l.starts_with("bound"))
    });
    for want in [
        "router=10.232.0.1",
        "dns=10.232.0.53",
        "domain=lab.test",
        "search=lab.test example.org",
        "ntp=10.232.0.123",
        "mtu=1400",
        "routes=172.16.0.0/12 10.232.0.254 0.0.0.0/0 10.232.0.1",
    ] {
        assert!(
            bound.contains(want),
            "{want} missing in {bound}\n{}",
            diag(&pxed)
        );
    }
    let ip1 = bound
        .split_whitespace()
        .find_map(|w| w.strip_prefix("ip="))
        .unwrap()
        .to_string();
    let mac1 = crate::support::mac_of(&lan.hosts[c1]);
    assert_eq!(leases(dir.path()).get(&mac1), Some(&ip1));
    signal(&udhcpc, "-USR1");
    let renew = wait_for("udhcpc renew", Duration::from_secs(10), || {
        lines(&events).into_iter().find(|l| l.starts_with("renew"))
    });
    assert!(renew.contains(&format!("ip={ip1} ")), "{renew}");
    signal(&udhcpc, "-USR2");
    wait_for(
        "release to remove the lease",
        Duration::from_secs(10),
        || (!leases(dir.path()).contains_key(&mac1)).then_some(()),
    );
    drop(udhcpc);

    // ISC dhclient: acquire, stop without release, reboot (INIT-REBOOT from its lease file,
    // same address), then release.
    let ns = &lan.hosts[c2];
    let lf = dir.path().join("dhclient.leases");
    let pf = dir.path().join("dhclient.pid");
    // dhclient sends RELEASE from its address, so the script configures it (and nothing
    // else: Debian's dhclient-script would rewrite the host's /etc/resolv.conf).
    let sf = dir.path().join("dhclient.sh");
    std::fs::write(
        &sf,
        "#!/bin/sh\ncase \"$reason\" in\n BOUND|REBOOT|RENEW|REBIND)\n  ip addr flush dev \
         $interface\n  ip addr add $new_ip_address/$new_subnet_mask dev $interface ;;\n \
         RELEASE|STOP|EXPIRE|FAIL) ip addr flush dev $interface ;;\nesac\nexit 0\n",
    )
    .unwrap();
    run("chmod", &["+x", sf.to_str().unwrap()]);
    let dhclient = |extra: &[&str]| {
        let mut cmd = ns.command("dhclient");
        cmd.args(extra)
            .args(["-1", "-sf"])
            .arg(&sf)
            .arg("-lf")
            .arg(&lf)
            .arg("-pf")
            .arg(&pf)
            .arg("eth0");
        let out = cmd.output().unwrap();
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let out = dhclient(&["-v"]);
    let mac2 = crate::support::mac_of(ns);
    let ip2 = leases(dir.path())
        .get(&mac2)
        .cloned()
        .unwrap_or_else(|| panic!("dhclient got no lease: {out}\n{}", diag(&pxed)));
    assert!(out.contains(&format!("bound to {ip2}")), "{out}");
    dhclient(&["-x"]);
    let out = dhclient(&["-v"]);
    assert!(
        out.contains(&format!("DHCPREQUEST for {ip2}")) && out.contains(&format!("bound to {ip2}")),
        "reboot keeps the address: {out}"
    );
    dhclient(&["-r"]);
    wait_for("dhclient release", Duration::from_secs(10), || {
        (!leases(dir.path()).contains_key(&mac2)).then_some(())
    });

    // dhcpcd: one-shot DORA in the foreground; its hook script logs what it was given.
    let ns = &lan.hosts[c3];
    let dlog = dir.path().join("dhcpcd.events");
    let dscript = dir.path().join("dhcpcd.sh");
    std::fs::write(
        &dscript,
        format!(
            "#!/bin/sh\n[ \"$reason\" = BOUND ] && echo \"ip=$new_ip_address \
             routers=$new_routers dns=$new_domain_name_servers mtu=$new_interface_mtu\" >> {}\n\
             exit 0\n",
            dlog.display()
        ),
    )
    .unwrap();
    run("chmod", &["+x", dscript.to_str().unwrap()]);
    let mut cmd = ns.command("dhcpcd");
    cmd.args(["-B", "-1", "-4", "-t", "15", "-f", "/dev/null"])
        .args(["-o", "domain_name_servers", "-o", "interface_mtu", "-c"])
        .arg(&dscript)
        .arg("eth0");
    let mut dhcpcd = Daemon::spawn(cmd, &dir.path().join("dhcpcd.log"));
    let got = wait_for("dhcpcd bound", Duration::from_secs(20), || {
        lines(&dlog).into_iter().next()
    });
    let mac3 = crate::support::mac_of(ns);
    let ip3 = leases(dir.path()).get(&mac3).cloned();
    assert!(
        got.contains("routers=10.232.0.1")
            && got.contains("dns=10.232.0.53")
            && ip3
                .as_ref()
                .is_some_and(|ip| got.contains(&format!("ip={ip} "))),
        "dhcpcd: {got}, stored {ip3:?}\n{}\n{}",
        dhcpcd.log_text(),
        diag(&pxed)
    );
    assert!(
        ns.ip(&["-4", "addr", "show", "eth0"])
            .contains(&format!("{}/24", ip3.unwrap()))
    );
    let _ = dhcpcd.child.kill();

    // The hook saw commit, renew and release with the lease as JSON.
    let hook = std::fs::read_to_string(dir.path().join("hook.log")).unwrap_or_default();
    for kind in ["commit", "renew", "release"] {
        assert!(
            hook.lines()
                .any(|l| l.starts_with(kind) && l.contains(&format!("\"mac\":\"{mac1}\""))),
            "no {kind} hook for {mac1}:\n{hook}"
        );
    }
    pxed.assert_running();
}

#[test]
fn relayed_client_gets_an_address_from_the_far_pool() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    let mut near = Lan::new();
    let mut far = Lan::new();
    let srv = near.host("rsv", Some("10.236.0.1/24"));
    let relay = near.host("rry", Some("10.236.0.2/24"));
    let cli = far.host("rcl", None);
    // The relay's second leg, eth1, on the far LAN.
    let peer = unique("vr");
    far.switch.ip(&[
        "link",
        "add",
        &peer,
        "type",
        "veth",
        "peer",
        "name",
        "eth1",
        "netns",
        &near.hosts[relay].name,
    ]);
    far.switch
        .ip(&["link", "set", &peer, "master", "br0", "up"]);
    near.hosts[relay].ip(&["addr", "add", "10.237.0.1/24", "dev", "eth1"]);
    near.hosts[relay].ip(&["link", "set", "eth1", "up"]);
    near.hosts[srv].ip(&["route", "add", "10.237.0.0/24", "via", "10.236.0.2"]);

    let far_subnet = r#"
[[dhcp.subnet]]
network = "10.237.0.0"
prefix_len = 24
pool_start = "10.237.0.50"
pool_end = "10.237.0.60"
router = "10.237.0.1"
"#;
    let cfg = config(dir.path(), 236, "");
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    let at = text.find("[tftp]").unwrap();
    text.insert_str(at, far_subnet);
    std::fs::write(&cfg, text).unwrap();
    let mut pxed =
        crate::support::start_pxed(&near.hosts[srv], &cfg, &dir.path().join("pxed.log"), &[]);

    let mut cmd = near.hosts[relay].command("dhcrelay");
    cmd.args([
        "-4",
        "-d",
        "--no-pid",
        "-id",
        "eth1",
        "-iu",
        "eth0",
        "10.236.0.1",
    ]);
    let mut dhcrelay = Daemon::spawn(cmd, &dir.path().join("dhcrelay.log"));
    wait_for("dhcrelay listening", Duration::from_secs(10), || {
        dhcrelay.assert_running();
        udp_listening(&near.hosts[relay], 67).then_some(())
    });

    let (script, events) = udhcpc_script(dir.path());
    let out = far.hosts[cli]
        .command("udhcpc")
        .args(["-f", "-q", "-n", "-i", "eth0", "-t", "10", "-T", "1", "-s"])
        .arg(&script)
        .output()
        .unwrap();
    let bound = lines(&events)
        .into_iter()
        .find(|l| l.starts_with("bound"))
        .unwrap_or_else(|| {
            panic!(
                "no lease through the relay: {}\nrelay:\n{}\npxed:\n{}",
                String::from_utf8_lossy(&out.stderr),
                dhcrelay.log_text(),
                pxed.log_text()
            )
        });
    let ip: Ipv4Addr = bound
        .split_whitespace()
        .find_map(|w| w.strip_prefix("ip="))
        .unwrap()
        .parse()
        .unwrap();
    let last = ip.octets()[3];
    assert!(
        ip.octets()[..3] == [10, 237, 0] && (50..=60).contains(&last),
        "{bound}"
    );
    assert!(bound.contains("router=10.237.0.1"), "{bound}");
    assert_eq!(
        leases(dir.path()).get(&crate::support::mac_of(&far.hosts[cli])),
        Some(&ip.to_string())
    );
    pxed.assert_running();
}

/// One line of `strace -f -xx`: the syscall name and its first string argument as bytes.
fn syscall_bytes(line: &str) -> Option<(&str, Vec<u8>)> {
    let rest = line.split_once(' ').map_or(line, |(_, r)| r).trim_start();
    let name = rest.split('(').next()?;
    let start = rest.find('"')? + 1;
    let end = start + rest[start..].find('"')?;
    let hex = &rest[start..end];
    let bytes = hex
        .split("\\x")
        .filter(|s| !s.is_empty())
        .filter_map(|h| u8::from_str_radix(h, 16).ok())
        .collect();
    Some((name, bytes))
}

/// Durability proven from the syscall order, and recovery after SIGKILL: pxed runs under
/// strace while perfdhcp (a real DHCP load generator) does DORA exchanges; pxed is killed with
/// SIGKILL under that load. From the trace: every ACK carrying an address was sent after an
/// fdatasync that began after the write holding that lease. After restart, every ACKed lease is
/// in the store with its address, no address has two owners, and pxed gives a client its
/// ACKed address again.
#[test]
fn every_ack_follows_the_sync_that_holds_its_lease_and_survives_sigkill() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    let mut lan = Lan::new();
    let srv = lan.host("dsv", Some("10.238.0.1/24"));
    let cli = lan.host("dcl", Some("10.238.0.2/24"));
    let cfg = config(dir.path(), 238, "");
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    text = text.replace("pool_end = \"10.238.0.199\"", "pool_end = \"10.238.0.250\"");
    text = text.replace(
        "pool_start = \"10.238.0.100\"",
        "pool_start = \"10.238.0.3\"",
    );
    std::fs::write(&cfg, text).unwrap();

    let trace = dir.path().join("trace");
    let mut cmd = lan.hosts[srv].command("strace");
    cmd.args([
        "-f",
        "-xx",
        "-s",
        "65536",
        "-e",
        "trace=fdatasync,fsync,sendto,sendmsg,pwrite64,write",
        "-o",
    ])
    .arg(&trace)
    .arg(env!("CARGO_BIN_EXE_pxed"))
    .arg("serve")
    .arg("--config")
    .arg(&cfg);
    let mut strace = Daemon::spawn(cmd, &dir.path().join("pxed.log"));
    wait_for("pxed under strace on 67", Duration::from_secs(20), || {
        strace.assert_running();
        udp_listening(&lan.hosts[srv], 67).then_some(())
    });

    // perfdhcp acts as a relay (giaddr = its address) and does DORA at a modest rate.
    let mut load = lan.hosts[cli].command("perfdhcp");
    load.args([
        "-4",
        "-l",
        "10.238.0.2",
        "-r",
        "100",
        "-R",
        "200",
        "-p",
        "30",
        "10.238.0.1",
    ]);
    let perf = Daemon::spawn(load, &dir.path().join("perfdhcp.log"));
    // Kill once a good number of ACKs went out, while the load still runs.
    let count_acks = || {
        std::fs::read_to_string(&trace)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("sendto("))
            .filter_map(syscall_bytes)
            .filter_map(|(_, b)| DhcpPacket::decode(&b).ok())
            .filter(|p| p.message_type() == Some(MessageType::Ack))
            .count()
    };
    wait_for("40 ACKs under load", Duration::from_secs(30), || {
        (count_acks() >= 40).then_some(())
    });
    let children =
        std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", strace.child.id())).unwrap();
    let pxed_pid = children
        .split_whitespace()
        .next()
        .expect("pxed under strace");
    run("kill", &["-9", pxed_pid]);
    wait_for("strace to see the kill", Duration::from_secs(10), || {
        strace.child.try_wait().unwrap().map(|_| ())
    });
    drop(perf);

    // Walk the trace in order. A write's bytes are durable once an fdatasync/fsync that
    // started after the write returned; strace prints a call that was interrupted by another
    // thread as "<unfinished ...>" and its end as "<... resumed>".
    let text = std::fs::read_to_string(&trace).unwrap();
    let mut written: Vec<u8> = Vec::new(); // bytes written since the last sync began
    let mut syncing: HashMap<String, Vec<u8>> = HashMap::new(); // pid -> bytes its sync covers
    let mut durable: Vec<u8> = Vec::new();
    let mut acked: HashMap<String, Ipv4Addr> = HashMap::new();
    for line in text.lines() {
        let pid = line.split_whitespace().next().unwrap_or("").to_string();
        let is_sync = line.contains("fdatasync(") || line.contains("fsync(");
        if is_sync && !line.contains("resumed") {
            syncing.insert(pid.clone(), std::mem::take(&mut written));
        }
        let sync_done = (is_sync
            && !line.contains("unfinished")
            && line.trim_end().ends_with("= 0"))
            || (line.contains("<... fdatasync resumed>") || line.contains("<... fsync resumed>"))
                && line.trim_end().ends_with("= 0");
        if sync_done && let Some(bytes) = syncing.remove(&pid) {
            durable.extend(bytes);
        }
        if (line.contains("pwrite64(") || line.contains(" write("))
            && let Some((_, bytes)) = syscall_bytes(line)
        {
            written.extend(bytes);
        }
        if line.contains("sendto(")
            && let Some((_, bytes)) = syscall_bytes(line)
            && let Ok(p) = DhcpPacket::decode(&bytes)
            && p.message_type() == Some(MessageType::Ack)
            && !p.yiaddr.is_unspecified()
        {
            let mac = p.mac().unwrap().to_string();
            // SQLite stores a row's columns back to back: mac then ip.
            let row = format!("{mac}{}", p.yiaddr);
            assert!(
                find(&durable, row.as_bytes()),
                "ACK of {} to {mac} was sent before a sync covered its lease",
                p.yiaddr
            );
            acked.insert(mac, p.yiaddr);
        }
    }
    assert!(acked.len() >= 20, "only {} ACKs traced", acked.len());

    // Restart: every ACKed lease is there, with its address, and no address twice.
    let stored = leases(dir.path());
    for (mac, ip) in &acked {
        assert_eq!(
            stored.get(mac),
            Some(&ip.to_string()),
            "ACKed lease of {mac} lost"
        );
    }
    let unique_ips: HashSet<_> = stored.values().collect();
    assert_eq!(unique_ips.len(), stored.len(), "an address has two owners");
    let mut pxed =
        crate::support::start_pxed(&lan.hosts[srv], &cfg, &dir.path().join("pxed2.log"), &[]);
    // A DISCOVER from an ACKed MAC (relayed like perfdhcp) gets its address again.
    let (mac, ip) = acked.iter().next().unwrap();
    let mac_bytes: Vec<u8> = mac
        .split(':')
        .map(|h| u8::from_str_radix(h, 16).unwrap())
        .collect();
    let offer = lan.hosts[cli].enter(move || {
        let sock = std::net::UdpSocket::bind("10.238.0.2:67").unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut chaddr = [0u8; 16];
        chaddr[..6].copy_from_slice(&mac_bytes);
        let mut p = DhcpPacket {
            op: pxed::dhcp::wire::Op::Request,
            htype: 1,
            hlen: 6,
            hops: 1,
            xid: 0xfeed,
            secs: 0,
            flags: 0,
            ciaddr: Ipv4Addr::UNSPECIFIED,
            yiaddr: Ipv4Addr::UNSPECIFIED,
            siaddr: Ipv4Addr::UNSPECIFIED,
            giaddr: Ipv4Addr::new(10, 238, 0, 2),
            chaddr,
            sname: vec![],
            file: vec![],
            options: Default::default(),
        };
        p.options.set(53, vec![1]);
        sock.send_to(&p.encode(&[]), "10.238.0.1:67").unwrap();
        let mut buf = [0u8; 1500];
        let (n, _) = sock.recv_from(&mut buf).expect("an offer after restart");
        DhcpPacket::decode(&buf[..n]).unwrap()
    });
    assert_eq!(offer.yiaddr, *ip, "restarted pxed offers the ACKed address");
    pxed.assert_running();
}

fn find(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// The conflict probe: a host squats on the first pool address (configured by hand, answering
/// pings). With `conflict_probe = "icmp"` pxed's ping finds it, quarantines the address and
/// offers udhcpc another one; the probe costs at most its 300 ms bound.
#[test]
fn conflict_probe_skips_an_address_a_host_squats_on() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    let mut lan = Lan::new();
    let srv = lan.host("psv", Some("10.239.0.1/24"));
    let _squatter = lan.host("psq", Some("10.239.0.100/24"));
    let cli = lan.host("pcl", None);
    let cfg = config(dir.path(), 239, "conflict_probe = \"icmp\"");
    let pxed = crate::support::start_pxed(&lan.hosts[srv], &cfg, &dir.path().join("pxed.log"), &[]);
    let (script, events) = udhcpc_script(dir.path());
    let started = std::time::Instant::now();
    let out = lan.hosts[cli]
        .command("udhcpc")
        .args(["-f", "-q", "-n", "-i", "eth0", "-t", "5", "-T", "1", "-s"])
        .arg(&script)
        .output()
        .unwrap();
    // Two probes: the squatter answers at once, the free address costs the whole bound.
    eprintln!(
        "udhcpc bound after {:?} with the probe on",
        started.elapsed()
    );
    let bound = lines(&events)
        .into_iter()
        .find(|l| l.starts_with("bound"))
        .unwrap_or_else(|| {
            panic!(
                "no lease: {}\npxed:\n{}",
                String::from_utf8_lossy(&out.stderr),
                pxed.log_text()
            )
        });
    assert!(
        bound.contains("ip=10.239.0.101 "),
        "offered the squatted address or another: {bound}\n{}",
        pxed.log_text()
    );
    assert!(
        pxed.log_text().contains("conflict probe"),
        "{}",
        pxed.log_text()
    );
    assert_eq!(
        leases(dir.path()).get(&crate::support::mac_of(&lan.hosts[cli])),
        Some(&"10.239.0.101".to_string())
    );
}

/// The `bound`/`renew` lines udhcpc's script logged, and the address of the first.
fn event_lines(events: &Path, kind: &str) -> Vec<String> {
    lines(events)
        .into_iter()
        .filter(|l| l.starts_with(kind))
        .collect()
}

/// SIGHUP: a changed option is served on the next renew with the same address (the lease is
/// kept); a broken config is reported and the running one keeps serving.
#[test]
fn sighup_reloads_options_keeps_leases_and_survives_a_broken_config() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    let mut lan = Lan::new();
    let srv = lan.host("hsv", Some("10.240.0.1/24"));
    let cli = lan.host("hcl", None);
    let cfg = config(dir.path(), 240, "");
    let mut pxed =
        crate::support::start_pxed(&lan.hosts[srv], &cfg, &dir.path().join("pxed.log"), &[]);
    let (script, events) = udhcpc_script(dir.path());
    let mut cmd = lan.hosts[cli].command("udhcpc");
    cmd.args(["-f", "-i", "eth0", "-t", "10", "-T", "1", "-s"])
        .arg(&script);
    let udhcpc = Daemon::spawn(cmd, &dir.path().join("udhcpc.log"));
    let bound = wait_for("udhcpc bound", Duration::from_secs(15), || {
        event_lines(&events, "bound").into_iter().next()
    });
    assert!(bound.contains("dns=10.240.0.53 "), "{bound}");
    let ip = bound
        .split_whitespace()
        .find(|w| w.starts_with("ip="))
        .unwrap()
        .to_string();

    // A new DNS server in the config, then SIGHUP.
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, text.replace("10.240.0.53", "10.240.0.54")).unwrap();
    signal(&pxed, "-HUP");
    wait_for("the reload", Duration::from_secs(10), || {
        pxed.log_text()
            .contains("DHCP config reloaded")
            .then_some(())
    });
    signal(&udhcpc, "-USR1");
    let renew = wait_for("renew after reload", Duration::from_secs(10), || {
        event_lines(&events, "renew").into_iter().next()
    });
    assert!(
        renew.contains(&format!("{ip} ")) && renew.contains("dns=10.240.0.54 "),
        "renew keeps {ip} and serves the new DNS: {renew}\n{}",
        pxed.log_text()
    );

    // A broken config: reported, and the running one (with .54) keeps serving the lease.
    std::fs::write(&cfg, "[dhcp\nmode = ").unwrap();
    signal(&pxed, "-HUP");
    wait_for("the refusal", Duration::from_secs(10), || {
        pxed.log_text()
            .contains("config not reloaded")
            .then_some(())
    });
    signal(&udhcpc, "-USR1");
    let renew = wait_for(
        "renew after a broken reload",
        Duration::from_secs(10),
        || event_lines(&events, "renew").into_iter().nth(1),
    );
    assert!(
        renew.contains(&format!("{ip} ")) && renew.contains("dns=10.240.0.54 "),
        "{renew}\n{}",
        pxed.log_text()
    );
    pxed.assert_running();
}

/// `pxed import` from dnsmasq and ISC dhcpd: their lease files go into the store, their
/// static hosts become reservations in the config, and udhcpc clients with those MACs get
/// exactly those addresses from `pxed serve`.
#[test]
fn imported_leases_and_static_hosts_are_served() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let in_an_hour = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    // dnsmasq: a lease file (one live, one expired, one IPv6 line) and dhcp-host lines.
    std::fs::write(
        d.join("dnsmasq.leases"),
        format!(
            "{in_an_hour} 02:00:00:f1:00:01 10.241.0.150 alpha 01:02:00:00:f1:00:01\n\
             1000 02:00:00:f1:00:09 10.241.0.151 old *\n\
             duid 00:01:00:01:2c:5f:00:00:52:54:00:00:00:01\n"
        ),
    )
    .unwrap();
    std::fs::write(
        d.join("dnsmasq.conf"),
        "interface=eth0\ndhcp-range=10.241.0.100,10.241.0.199,12h\n\
         dhcp-host=02:00:00:f1:00:02,10.241.0.20,beta,infinite\n",
    )
    .unwrap();
    // ISC dhcpd: a lease file with an older and a newer block for one address, and hosts.
    std::fs::write(
        d.join("dhcpd.leases"),
        "# The format of this file is documented in the dhcpd.leases(5) manual page.\n\
         lease 10.241.0.160 {\n  starts 3 2026/11/25 10:00:00;\n  ends 3 2026/11/25 10:10:00;\n\
         \x20 binding state free;\n  hardware ethernet 02:00:00:f1:00:03;\n}\n\
         lease 10.241.0.160 {\n  starts 3 2026/11/25 10:00:00;\n  ends 2 2099/01/01 00:00:00;\n\
         \x20 cltt 3 2026/11/25 10:00:00;\n  binding state active;\n  next binding state free;\n\
         \x20 hardware ethernet 02:00:00:f1:00:03;\n  uid \"\\001\\002\\000\\000\\361\\000\\003\";\n\
         \x20 client-hostname \"gamma\";\n}\n",
    )
    .unwrap();
    std::fs::write(
        d.join("dhcpd.conf"),
        "subnet 10.241.0.0 netmask 255.255.255.0 {\n  range 10.241.0.100 10.241.0.199;\n}\n\
         host delta {\n  hardware ethernet 02:00:00:f1:00:04;\n  fixed-address 10.241.0.30;\n}\n",
    )
    .unwrap();
    let state = d.join("state");
    let import = |from: &str, leases: &str, hosts: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_pxed"))
            .args(["import", "--from", from, "--leases"])
            .arg(d.join(leases))
            .arg("--hosts")
            .arg(d.join(hosts))
            .arg("--state-dir")
            .arg(&state)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let mut reservations = import("dnsmasq", "dnsmasq.leases", "dnsmasq.conf");
    reservations.push_str(&import("dhcpd", "dhcpd.leases", "dhcpd.conf"));
    let stored = leases(d);
    assert_eq!(
        stored.get("02:00:00:f1:00:01").map(String::as_str),
        Some("10.241.0.150")
    );
    assert_eq!(
        stored.get("02:00:00:f1:00:03").map(String::as_str),
        Some("10.241.0.160")
    );
    assert!(
        !stored.contains_key("02:00:00:f1:00:09"),
        "expired lease imported"
    );

    let cfg = config(d, 241, "");
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    let at = text.find("[tftp]").unwrap();
    text.insert_str(at, &format!("{reservations}\n"));
    std::fs::write(&cfg, text).unwrap();
    let mut lan = Lan::new();
    let srv = lan.host("isv", Some("10.241.0.1/24"));
    let mut pxed = crate::support::start_pxed(&lan.hosts[srv], &cfg, &d.join("pxed.log"), &[]);
    for (n, want) in [
        (1, "10.241.0.150"),
        (2, "10.241.0.20"),
        (3, "10.241.0.160"),
        (4, "10.241.0.30"),
    ] {
        let cli = lan.host("icl", None);
        let ns = &lan.hosts[cli];
        ns.ip(&[
            "link",
            "set",
            "eth0",
            "address",
            &format!("02:00:00:f1:00:0{n}"),
        ]);
        let sub = d.join(format!("c{n}"));
        std::fs::create_dir_all(&sub).unwrap();
        let (script, events) = udhcpc_script(&sub);
        let out = ns
            .command("udhcpc")
            .args(["-f", "-q", "-n", "-i", "eth0", "-t", "5", "-T", "1", "-s"])
            .arg(&script)
            .output()
            .unwrap();
        let bound = event_lines(&events, "bound").into_iter().next();
        assert!(
            bound
                .as_ref()
                .is_some_and(|b| b.contains(&format!("ip={want} "))),
            "client {n} wanted {want}, got {bound:?}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            pxed.log_text()
        );
    }
    pxed.assert_running();
}
