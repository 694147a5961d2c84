//! Hardening: DHCP starvation floods against the rate limits, another DHCP server appearing on
//! the link, privilege dropping, and which addresses pxed listens on. Real peers: busybox
//! udhcpc as the honest client, dnsmasq as the rogue server, `ss` and /proc for the posture.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use pxed::dhcp::wire::DhcpPacket;

use crate::require_root;
use crate::support::{Daemon, Lan, NetNs, run, wait_for};

/// A full-mode config for `10.N.0.0/24` with pxed at `.1`, HTTP on 8080 for `/metrics`.
fn config(dir: &Path, net: u8, extra_dhcp: &str, extra: &str) -> PathBuf {
    let root = dir.join("root");
    std::fs::create_dir_all(&root).unwrap();
    let text = format!(
        r#"[server]
interface = "eth0"
root = "{root}"
state_dir = "{state}"
event_log = "{events}"

[dhcp]
mode = "full"
{extra_dhcp}

[[dhcp.subnet]]
network = "10.{net}.0.0"
prefix_len = 24
pool_start = "10.{net}.0.100"
pool_end = "10.{net}.0.199"
lease_time = "10m"

[tftp]
enabled = false

[http]
port = 8080

[[profile]]
name = "default"
kernel = "vmlinuz"

{extra}
"#,
        root = root.display(),
        state = dir.join("state").display(),
        events = dir.join("events.jsonl").display(),
    );
    let path = dir.join("pxed.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// `/metrics` as text, fetched with curl inside the namespace.
fn metrics(ns: &NetNs, ip: &str) -> String {
    let out = ns
        .command("curl")
        .args([
            "-s",
            "--max-time",
            "2",
            &format!("http://{ip}:8080/metrics"),
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The value of the first metric line starting with `prefix`.
fn metric(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// A udhcpc script that logs `bound <ip>`.
fn udhcpc_script(dir: &Path) -> (PathBuf, PathBuf) {
    let log = dir.join("udhcpc.events");
    let script = dir.join("udhcpc.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n[ \"$1\" = bound ] && echo \"bound $ip\" >> {}\nexit 0\n",
            log.display()
        ),
    )
    .unwrap();
    run("chmod", &["+x", script.to_str().unwrap()]);
    (script, log)
}

/// A DISCOVER from a random, locally administered MAC.
fn discover(n: u32) -> Vec<u8> {
    let b = n.to_be_bytes();
    let mac = pxed::mac::MacAddr([0x06, 0xf1, b[0], b[1], b[2], b[3]]);
    let mut p = DhcpPacket::client_request(n, mac);
    p.options.set(53, vec![1]);
    p.encode(&[])
}

/// Thousands of random-MAC DISCOVERs (a starvation attack) while a reserved client boots: it
/// gets its reserved address within seconds, and `/metrics` shows the flood was cut by the
/// global limit (so the limit, not luck, kept pxed free for it).
#[test]
fn a_random_mac_flood_is_rate_limited_and_a_reserved_client_is_still_served() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    let mut lan = Lan::new();
    let srv = lan.host("hsv", Some("10.241.0.1/24"));
    let flooder = lan.host("hfl", Some("10.241.0.2/24"));
    let client = lan.host("hcl", None);
    let mac = crate::support::mac_of(&lan.hosts[client]);
    let cfg = config(
        dir.path(),
        241,
        // Low enough that the paced flood below exceeds it many times over.
        "[dhcp.limits]\nglobal_rate = 100\nglobal_burst = 100\n",
        &format!("[[dhcp.reservation]]\nmac = \"{mac}\"\nip = \"10.241.0.50\"\n"),
    );
    let mut pxed =
        crate::support::start_pxed(&lan.hosts[srv], &cfg, &dir.path().join("pxed.log"), &[]);

    // The flood: 6000 DISCOVERs at about 2000 per second, from a thread in the namespace.
    const FLOOD: u32 = 6000;
    let flood_ns = lan.hosts[flooder].name.clone();
    let path = PathBuf::from("/var/run/netns").join(&flood_ns);
    let flood = std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap();
        // SAFETY: setns on a namespace fd only changes this thread's network namespace.
        let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0);
        let sock = UdpSocket::bind("10.241.0.2:68").unwrap();
        sock.set_broadcast(true).unwrap();
        let to = SocketAddr::from((Ipv4Addr::BROADCAST, 67));
        let start = Instant::now();
        for n in 0..FLOOD {
            sock.send_to(&discover(n), to).unwrap();
            if n % 20 == 19 {
                // Pace: 20 packets per 10 ms.
                let due = start + Duration::from_millis(u64::from(n / 20) * 10);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
            }
        }
    });
    // Let the flood get going (by what pxed counted, not by time) before the client starts.
    let srv_ns = &lan.hosts[srv];
    wait_for("flood reaching the limit", Duration::from_secs(10), || {
        metric(
            &metrics(srv_ns, "10.241.0.1"),
            "pxed_dhcp_rate_limited_total{limit=\"global\"}",
        )
        .filter(|v| *v > 0.0)
    });
    let (script, events) = udhcpc_script(dir.path());
    let mut cmd = lan.hosts[client].command("udhcpc");
    cmd.args(["-f", "-i", "eth0", "-t", "20", "-T", "1", "-s"])
        .arg(&script);
    let started = Instant::now();
    let _udhcpc = Daemon::spawn(cmd, &dir.path().join("udhcpc.log"));
    let bound = wait_for("reserved client bound", Duration::from_secs(10), || {
        std::fs::read_to_string(&events)
            .ok()
            .and_then(|t| t.lines().next().map(str::to_string))
    });
    let took = started.elapsed();
    let flood_running = !flood.is_finished();
    flood.join().unwrap();
    pxed.assert_running();
    assert_eq!(bound, "bound 10.241.0.50");
    assert!(took < Duration::from_secs(5), "lease took {took:?}");
    assert!(flood_running, "the client must be served during the flood");
    let text = metrics(srv_ns, "10.241.0.1");
    let limited = metric(&text, "pxed_dhcp_rate_limited_total{limit=\"global\"}").unwrap();
    // 6000 sent in ~3 s against 100/s + 100: most are refused (some are lost in queues).
    assert!(limited > 3000.0, "only {limited} rate-limited:\n{text}");
    eprintln!("reserved client bound in {took:?} during the flood; {limited} packets rate-limited");
}

/// dnsmasq appears on the link beside pxed (full mode): pxed's periodic probe makes it
/// answer, and pxed reports it as a `dhcp.foreign-server` event and in `/metrics`.
#[test]
fn a_dhcp_server_appearing_on_the_link_is_reported() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    let mut lan = Lan::new();
    let srv = lan.host("hsv", Some("10.242.0.1/24"));
    let rogue = lan.host("hrg", Some("10.242.0.2/24"));
    let cfg = config(dir.path(), 242, "foreign_probe_secs = 1", "");
    let mut pxed =
        crate::support::start_pxed(&lan.hosts[srv], &cfg, &dir.path().join("pxed.log"), &[]);
    let srv_ns = &lan.hosts[srv];
    let before = wait_for("metrics", Duration::from_secs(10), || {
        metric(&metrics(srv_ns, "10.242.0.1"), "pxed_dhcp_foreign_servers ")
    });
    assert_eq!(before, 0.0);

    let mut cmd = lan.hosts[rogue].command("dnsmasq");
    cmd.args([
        "--no-daemon",
        "--conf-file=/dev/null",
        "--port=0",
        "--interface=eth0",
        "--bind-interfaces",
        "--dhcp-range=10.242.0.150,10.242.0.160,2m",
        "--no-ping",
    ])
    .arg(format!(
        "--dhcp-leasefile={}",
        dir.path().join("dnsmasq.leases").display()
    ))
    .arg(format!(
        "--pid-file={}",
        dir.path().join("dnsmasq.pid").display()
    ));
    let _dnsmasq = Daemon::spawn(cmd, &dir.path().join("dnsmasq.log"));

    let events_path = dir.path().join("events.jsonl");
    let event = wait_for("dhcp.foreign-server event", Duration::from_secs(15), || {
        std::fs::read_to_string(&events_path).ok().and_then(|t| {
            t.lines()
                .find(|l| l.contains("dhcp.foreign-server"))
                .map(str::to_string)
        })
    });
    assert!(event.contains("10.242.0.2"), "{event}");
    assert!(event.contains("offered 10.242.0.15"), "{event}");
    let text = metrics(srv_ns, "10.242.0.1");
    assert_eq!(
        metric(&text, "pxed_dhcp_foreign_servers "),
        Some(1.0),
        "{text}"
    );
    assert!(
        metric(
            &text,
            "pxed_boot_events_total{stage=\"dhcp.foreign-server\"}"
        ) >= Some(1.0)
    );
    pxed.assert_running();
}

/// A field of /proc/PID/status (or /proc/PID/task/TID/status).
fn status_field(path: &Path, field: &str) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap()
        .trim()
        .to_string()
}

/// `pxed serve --user nobody` in full mode, on a host with a second interface it was not
/// asked to serve: every thread runs as nobody with only CAP_NET_BIND_SERVICE, CAP_NET_ADMIN
/// and CAP_NET_RAW, a client still gets a durable lease (the state directory was handed
/// over), and `ss` shows nothing listening on the other interface.
#[test]
fn pxed_drops_to_nobody_and_listens_only_where_asked() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    let mut lan = Lan::new();
    let srv = lan.host("hsv", Some("10.243.0.1/24"));
    let client = lan.host("hcl", None);
    let srv_ns = &lan.hosts[srv];
    srv_ns.ip(&[
        "link", "add", "eth1", "type", "veth", "peer", "name", "eth1p",
    ]);
    srv_ns.ip(&["link", "set", "eth1p", "up"]);
    srv_ns.ip(&["addr", "add", "10.244.0.1/24", "dev", "eth1"]);
    srv_ns.ip(&["link", "set", "eth1", "up"]);
    let cfg = config(dir.path(), 243, "", "[tftp]\n");
    // tempdir is 0700 root: nobody must reach the state directory inside it.
    run("chmod", &["755", dir.path().to_str().unwrap()]);
    let cfg_text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("[tftp]\nenabled = false\n", "[tftp]\nenabled = true\n");
    // The extra `[tftp]` passed above would duplicate the table; keep the first.
    let cfg_text = cfg_text.trim_end().trim_end_matches("[tftp]").to_string();
    std::fs::write(&cfg, cfg_text).unwrap();
    let mut pxed = crate::support::start_pxed(
        srv_ns,
        &cfg,
        &dir.path().join("pxed.log"),
        &["--user", "nobody"],
    );
    let pid = pxed.child.id();
    wait_for("privileges dropped", Duration::from_secs(10), || {
        pxed.assert_running();
        pxed.log_text().contains("privileges dropped").then_some(())
    });
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    let nobody = crate::support::run("id", &["-u", "nobody"])
        .trim()
        .to_string();
    // Bits 10, 12, 13: NET_BIND_SERVICE, NET_ADMIN, NET_RAW.
    let expected_caps = format!("{:016x}", (1u64 << 10) | (1 << 12) | (1 << 13));
    let mut threads = 0;
    for task in std::fs::read_dir(proc_dir.join("task")).unwrap() {
        let status = task.unwrap().path().join("status");
        let uid = status_field(&status, "Uid");
        assert!(
            uid.split_whitespace().all(|u| u == nobody),
            "{}: Uid {uid}",
            status.display()
        );
        assert_eq!(status_field(&status, "CapEff"), expected_caps);
        assert_eq!(status_field(&status, "CapPrm"), expected_caps);
        assert_eq!(status_field(&status, "NoNewPrivs"), "1");
        threads += 1;
    }
    assert!(threads > 1, "only {threads} threads checked");

    // DHCP still works, with a durable lease written as nobody.
    let (script, events) = udhcpc_script(dir.path());
    let mut cmd = lan.hosts[client].command("udhcpc");
    cmd.args(["-f", "-i", "eth0", "-t", "10", "-T", "1", "-s"])
        .arg(&script);
    let _udhcpc = Daemon::spawn(cmd, &dir.path().join("udhcpc.log"));
    let bound = wait_for("client bound", Duration::from_secs(15), || {
        std::fs::read_to_string(&events)
            .ok()
            .and_then(|t| t.lines().next().map(str::to_string))
    });
    assert!(bound.starts_with("bound 10.243.0.1"), "{bound}");
    pxed.assert_running();

    // Nothing on the interface it was not asked for: TFTP and HTTP on 10.243.0.1 only, DHCP
    // on the wildcard but bound to eth0 (ss prints it as `0.0.0.0%eth0`).
    let ss = |args: &[&str]| {
        let out = srv_ns.command("ss").args(args).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let listening = format!("{}{}", ss(&["-ulnp"]), ss(&["-tlnp"]));
    let pxed_lines: Vec<&str> = listening.lines().filter(|l| l.contains("pxed")).collect();
    assert!(!pxed_lines.is_empty(), "{listening}");
    for line in &pxed_lines {
        let local = line.split_whitespace().nth(3).unwrap_or_default();
        assert!(
            local.starts_with("10.243.0.1:") || local.contains("%eth0:"),
            "pxed listens beyond eth0: {line}"
        );
    }
    for port in [":67", ":69", ":8080", ":4011"] {
        assert!(
            pxed_lines.iter().any(|l| l.contains(port)),
            "{port} not found:\n{listening}"
        );
    }
}

/// `curl` in `ns` with `args`; the HTTP status code.
fn http_status(ns: &NetNs, args: &[&str]) -> u16 {
    let out = ns
        .command("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "5",
        ])
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

/// No `api_token` in the config: pxed generates one into `<state_dir>/api-token` (mode 0600,
/// named in the log, never printed), the mutating API refuses requests without it and accepts
/// them with it, and a restart keeps the same token.
#[test]
fn the_admin_api_needs_the_token_pxed_generates_when_none_is_configured() {
    use std::os::unix::fs::PermissionsExt;
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    let mut lan = crate::support::Lan::new();
    let srv = lan.host("hsv", Some("10.246.0.1/24"));
    let cfg = config(dir.path(), 246, "", "");
    let token_file = dir.path().join("state").join("api-token");
    let events = "http://10.246.0.1:8080/api/events";
    let state = "http://10.246.0.1:8080/api/machines/52:54:00:12:34:56/state";
    let body = r#"{"mac":"52:54:00:12:34:56","stage":"os.custom","detail":"x"}"#;
    let mut tokens = Vec::new();
    for round in 0..2 {
        let log = dir.path().join(format!("pxed{round}.log"));
        let pxed = crate::support::start_pxed(&lan.hosts[srv], &cfg, &log, &[]);
        let ns = &lan.hosts[srv];
        wait_for("pxed's HTTP", Duration::from_secs(10), || {
            (http_status(ns, &[events, "-X", "HEAD"]) != 0).then_some(())
        });
        let token = std::fs::read_to_string(&token_file)
            .unwrap()
            .trim()
            .to_string();
        assert_eq!(token.len(), 64, "{token}");
        assert!(token.chars().all(|c| c.is_ascii_hexdigit()), "{token}");
        let mode = std::fs::metadata(&token_file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let text = pxed.log_text();
        assert!(text.contains(&token_file.display().to_string()), "{text}");
        assert!(!text.contains(&token), "the log shows the token:\n{text}");

        let auth = format!("Authorization: Bearer {token}");
        assert_eq!(http_status(ns, &["-d", body, events]), 401);
        assert_eq!(
            http_status(
                ns,
                &["-H", "Authorization: Bearer wrong", "-d", body, events]
            ),
            401
        );
        assert_eq!(http_status(ns, &["-X", "DELETE", state]), 401);
        assert_eq!(http_status(ns, &["-H", &auth, "-d", body, events]), 204);
        assert_eq!(http_status(ns, &["-H", &auth, "-X", "DELETE", state]), 200);
        // Reads need no token.
        assert_eq!(http_status(ns, &[state]), 200);
        tokens.push(token);
        drop(pxed);
    }
    assert_eq!(tokens[0], tokens[1], "a restart keeps the token");
}
