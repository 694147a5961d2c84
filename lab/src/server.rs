//! The lab's boot server, as a pluggable process running inside the lab's namespace: dnsmasq
//! (the baseline) or pxed. Either way the oracle reads BootEvents from a JSON-lines file. For
//! dnsmasq, which writes no BootEvents, the harness's own phone-home receiver writes
//! `os.phone-home` events into that file.

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use pxed::events::BootEvent;
use pxed::mac::MacAddr;
use pxed::stage::BootStage;

use crate::netns::{Netns, poll_readable};
use crate::payload::{PHONE_PARAM, Payload};

/// The TCP port of the harness's phone-home receiver (dnsmasq labs).
pub const PHONE_PORT: u16 = 8080;
/// A phone-home request line longer than this is refused.
const MAX_REQUEST_LINE: usize = 4096;
/// How long a process gets to stop after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(3);

/// What every server needs to know about the lab.
pub struct ServerContext<'a> {
    /// The lab's namespace.
    pub netns: &'a Netns,
    /// The TAP interface the server listens on.
    pub interface: &'a str,
    /// The server's address (x.y.z.1).
    pub server_ip: Ipv4Addr,
    /// The run directory.
    pub run_dir: &'a Path,
    /// The test OS.
    pub payload: &'a Payload,
}

impl ServerContext<'_> {
    /// The lab's /24 as (first, last) of the client pool.
    pub fn pool(&self) -> (Ipv4Addr, Ipv4Addr) {
        let [a, b, c, _] = self.server_ip.octets();
        (Ipv4Addr::new(a, b, c, 100), Ipv4Addr::new(a, b, c, 199))
    }
}

/// A boot server running for the lab.
pub trait ServerProcess: Send {
    /// `dnsmasq`, `pxed`.
    fn kind(&self) -> &'static str;
    /// The JSON-lines file of BootEvents the oracle reads.
    fn event_log(&self) -> &Path;
    /// The URL the test OS phones home to.
    fn phone_url(&self) -> String;
    /// Some(status) once the process has exited.
    fn exited(&mut self) -> Option<ExitStatus>;
    /// Stop it (also done on drop).
    fn stop(&mut self);
    /// Kill it at once (SIGKILL: a crash, for fault injection); by default a normal stop.
    fn kill(&mut self) {
        self.stop();
    }
}

/// A child process stopped on drop: SIGTERM, then SIGKILL.
struct Guarded {
    child: Child,
    done: Option<ExitStatus>,
}

impl Guarded {
    fn exited(&mut self) -> Option<ExitStatus> {
        if self.done.is_none() {
            self.done = self.child.try_wait().ok().flatten();
        }
        self.done
    }

    fn stop(&mut self) {
        if self.exited().is_some() {
            return;
        }
        // `ip netns exec` execs the server, so this pid is the server itself.
        // SAFETY: sending a signal to our own child.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = std::time::Instant::now() + STOP_GRACE;
        while std::time::Instant::now() < deadline {
            if self.exited().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        self.done = self.child.wait().ok();
    }
}

impl Guarded {
    fn kill(&mut self) {
        if self.exited().is_none() {
            let _ = self.child.kill();
            self.done = self.child.wait().ok();
        }
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        self.stop();
    }
}

/// How dnsmasq is configured: as it comes, or hand-tuned for fast PXE boots.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DnsmasqTuning {
    /// dnsmasq's defaults (ping check before offers, no RA, no option 60/43).
    Defaults,
    /// `no-ping`, an IPv6 RA, option 60 `PXEClient` and 43 {6: 8}: the best hand tuning.
    #[default]
    Tuned,
}

/// dnsmasq: DHCP + TFTP, answering iPXE with a script that loads the test OS.
pub struct Dnsmasq {
    proc: Guarded,
    events: PathBuf,
    phone: PhoneHome,
}

impl Dnsmasq {
    /// Write dnsmasq's config and TFTP tree into the run directory and start it.
    /// `boot_file` is what iPXE is told to fetch (a missing one makes a broken lab).
    pub fn start(ctx: &ServerContext<'_>, boot_file: &str, tuning: DnsmasqTuning) -> Result<Self> {
        let tftp = ctx.run_dir.join("tftp");
        std::fs::create_dir_all(&tftp)?;
        link_or_copy(&ctx.payload.kernel, &tftp.join("vmlinuz"))?;
        link_or_copy(&ctx.payload.initrd, &tftp.join("initrd.gz"))?;
        for nbp in ["undionly.kpxe", "snponly.efi"] {
            let from = Path::new(IPXE_DIR).join(nbp);
            if from.exists() {
                link_or_copy(&from, &tftp.join(nbp))?;
            }
        }
        let events = ctx.run_dir.join("events.jsonl");
        std::fs::write(&events, "")?;
        let phone = PhoneHome::start(ctx.netns, ctx.server_ip, &events)?;
        let ip = ctx.server_ip;
        std::fs::write(
            tftp.join("boot.ipxe"),
            format!(
                "#!ipxe\n\
                 kernel tftp://{ip}/vmlinuz initrd=initrd.gz console=ttyS0 panic=-1 no_timer_check {PHONE_PARAM}={}\n\
                 initrd tftp://{ip}/initrd.gz\n\
                 boot\n",
                phone.url()
            ),
        )?;
        let (lo, hi) = ctx.pool();
        let dir = ctx.run_dir;
        let tuned = tuning == DnsmasqTuning::Tuned;
        if tuned {
            // iPXE waits about 13 s for an IPv6 router advertisement after its DHCPv4 ACK
            // unless one arrives: give the lab an IPv6 prefix and let dnsmasq advertise it.
            let [_, _, c, _] = ctx.server_ip.octets();
            ctx.netns.ip(&[
                "-6",
                "addr",
                "add",
                &format!("fd77:{c:x}::1/64"),
                "dev",
                ctx.interface,
                "nodad",
            ])?;
        }
        // The hand tuning of the boot-time issue: no 3 s ping before offers, an RA that ends
        // iPXE's IPv6 wait, and option 60 + 43 {6: 8} so that neither iPXE nor EDK2 waits
        // for ProxyDHCP or goes to boot server discovery (firmware-quirks.md Q2, Q3, Q13).
        let tuning_lines = if tuned {
            format!(
                "no-ping\n\
                 enable-ra\n\
                 dhcp-range=::,constructor:{iface},ra-only,64\n\
                 dhcp-option-force=tag:pxe,60,PXEClient\n\
                 dhcp-option-force=tag:pxe,vendor:PXEClient,6,8\n",
                iface = ctx.interface
            )
        } else {
            String::new()
        };
        let conf = format!(
            "# generated by pxelab ({tuning:?})\n\
             port=0\n\
             interface={iface}\n\
             bind-interfaces\n\
             dhcp-authoritative\n\
             {tuning_lines}\
             dhcp-range={lo},{hi},255.255.255.0,1h\n\
             dhcp-leasefile={leases}\n\
             enable-tftp\n\
             tftp-root={tftp}\n\
             dhcp-vendorclass=set:pxe,PXEClient\n\
             dhcp-match=set:ipxe,175\n\
             dhcp-match=set:efi64,option:client-arch,7\n\
             dhcp-match=set:efi64,option:client-arch,9\n\
             dhcp-boot=tag:ipxe,{boot_file}\n\
             dhcp-boot=tag:!ipxe,tag:efi64,snponly.efi\n\
             dhcp-boot=tag:!ipxe,tag:!efi64,undionly.kpxe\n\
             log-dhcp\n\
             log-facility={log}\n\
             pid-file={pid}\n\
             user=root\n",
            iface = ctx.interface,
            leases = dir.join("dnsmasq.leases").display(),
            tftp = tftp.display(),
            log = dir.join("dnsmasq.log").display(),
            pid = dir.join("dnsmasq.pid").display(),
        );
        let conf_path = dir.join("dnsmasq.conf");
        std::fs::write(&conf_path, conf)?;
        let child = ctx
            .netns
            .command("dnsmasq")
            .arg("--keep-in-foreground")
            .arg(format!("--conf-file={}", conf_path.display()))
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.join("dnsmasq.stdout.log"))?)
            .stderr(std::fs::File::create(dir.join("dnsmasq.stderr.log"))?)
            .spawn()
            .context("starting dnsmasq (apt-get install dnsmasq)")?;
        let mut proc = Guarded { child, done: None };
        // dnsmasq writes its pid file once it is bound; wait for that (or its death).
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !dir.join("dnsmasq.pid").exists() {
            if let Some(st) = proc.exited() {
                let err =
                    std::fs::read_to_string(dir.join("dnsmasq.stderr.log")).unwrap_or_default();
                bail!("dnsmasq exited at start ({st}): {}", err.trim());
            }
            if std::time::Instant::now() > deadline {
                bail!("dnsmasq did not start within 10 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Dnsmasq {
            proc,
            events,
            phone,
        })
    }
}

impl ServerProcess for Dnsmasq {
    fn kind(&self) -> &'static str {
        "dnsmasq"
    }
    fn event_log(&self) -> &Path {
        &self.events
    }
    fn phone_url(&self) -> String {
        self.phone.url()
    }
    fn exited(&mut self) -> Option<ExitStatus> {
        self.proc.exited()
    }
    fn stop(&mut self) {
        self.proc.stop();
        self.phone.stop();
    }
}

/// The iPXE binaries from Debian's `ipxe` package that pxed hands to firmware.
const IPXE_DIR: &str = "/usr/lib/ipxe";
/// pxed's HTTP port in lab configs (pxed's default).
pub const PXED_HTTP_PORT: u16 = 8080;
/// How long pxed may take to bind its sockets.
const PXED_START_TIMEOUT: Duration = Duration::from_secs(15);

/// dnsmasq giving addresses only, in its own namespace: the "existing DHCP server" that
/// pxed's proxy mode works beside.
pub struct AddressOnlyDnsmasq {
    proc: Guarded,
}

impl AddressOnlyDnsmasq {
    /// Start it on `interface` in `netns`, handing out `pool`.
    pub fn start(
        netns: &Netns,
        interface: &str,
        pool: (Ipv4Addr, Ipv4Addr),
        run_dir: &Path,
    ) -> Result<Self> {
        let pid = run_dir.join("address-server.pid");
        // no-ping: dnsmasq's 3 s conflict check only slows the lab; nothing else is on it.
        let child = netns
            .command("dnsmasq")
            .args([
                "--keep-in-foreground",
                "--port=0",
                "--bind-interfaces",
                "--no-ping",
                "--log-dhcp",
                "--user=root",
            ])
            .arg(format!("--interface={interface}"))
            .arg(format!(
                "--dhcp-range={},{},255.255.255.0,1h",
                pool.0, pool.1
            ))
            .arg(format!(
                "--dhcp-leasefile={}",
                run_dir.join("address-server.leases").display()
            ))
            .arg(format!(
                "--log-facility={}",
                run_dir.join("address-server.log").display()
            ))
            .arg(format!("--pid-file={}", pid.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(
                run_dir.join("address-server.stderr.log"),
            )?)
            .spawn()
            .context("starting dnsmasq as the address server")?;
        let mut proc = Guarded { child, done: None };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !pid.exists() {
            if let Some(st) = proc.exited() {
                bail!("address-server dnsmasq exited at start ({st})");
            }
            if std::time::Instant::now() > deadline {
                bail!("address-server dnsmasq did not start within 10 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(AddressOnlyDnsmasq { proc })
    }
}

impl Drop for AddressOnlyDnsmasq {
    fn drop(&mut self) {
        self.proc.stop();
    }
}

/// pxed, started from a config template with the lab's values filled in.
pub struct Pxed {
    proc: Guarded,
    events: PathBuf,
    phone: String,
}

impl Pxed {
    /// Render `template` and run `<binary> serve --config <rendered>` in the namespace.
    pub fn start(ctx: &ServerContext<'_>, binary: &Path, template: &Path) -> Result<Self> {
        let tftp = ctx.run_dir.join("tftp");
        std::fs::create_dir_all(&tftp)?;
        link_or_copy(&ctx.payload.kernel, &tftp.join("vmlinuz"))?;
        link_or_copy(&ctx.payload.initrd, &tftp.join("initrd.gz"))?;
        for nbp in ["undionly.kpxe", "snponly.efi", "ipxe.efi"] {
            let from = Path::new(IPXE_DIR).join(nbp);
            if from.exists() {
                link_or_copy(&from, &tftp.join(nbp))?;
            }
        }
        let events = ctx.run_dir.join("events.jsonl");
        let phone = format!(
            "http://{}:{PXED_HTTP_PORT}/api/phone-home?stage={}",
            ctx.server_ip,
            BootStage::OsPhoneHome.as_str()
        );
        let text = std::fs::read_to_string(template)
            .with_context(|| format!("reading {}", template.display()))?;
        let rendered = text
            .replace("{server_ip}", &ctx.server_ip.to_string())
            .replace("{interface}", ctx.interface)
            .replace("{event_log}", &events.display().to_string())
            .replace("{tftp_root}", &tftp.display().to_string())
            .replace("{kernel}", &ctx.payload.kernel.display().to_string())
            .replace("{initrd}", &ctx.payload.initrd.display().to_string())
            .replace("{phone_url}", &phone)
            .replace("{pool_start}", &ctx.pool().0.to_string())
            .replace("{pool_end}", &ctx.pool().1.to_string())
            .replace("{run_dir}", &ctx.run_dir.display().to_string());
        let conf = ctx.run_dir.join("pxed.toml");
        std::fs::write(&conf, rendered)?;
        let child = ctx
            .netns
            .command(&binary.display().to_string())
            .arg("serve")
            .arg("--config")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(ctx.run_dir.join("pxed.stdout.log"))?)
            .stderr(std::fs::File::create(ctx.run_dir.join("pxed.stderr.log"))?)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let mut proc = Guarded { child, done: None };
        // pxed binds DHCP, TFTP and then HTTP before serving: once HTTP accepts, all are up.
        let addr = std::net::SocketAddr::from((ctx.server_ip, PXED_HTTP_PORT));
        let deadline = std::time::Instant::now() + PXED_START_TIMEOUT;
        loop {
            let up = ctx
                .netns
                .enter(move || {
                    std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200))
                })
                .is_ok();
            if up {
                break;
            }
            if let Some(st) = proc.exited() {
                let err = std::fs::read_to_string(ctx.run_dir.join("pxed.stderr.log"))
                    .unwrap_or_default();
                bail!("pxed exited at start ({st}): {}", err.trim());
            }
            if std::time::Instant::now() > deadline {
                bail!("pxed did not accept HTTP on {addr} within {PXED_START_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Pxed {
            proc,
            events,
            phone,
        })
    }
}

impl ServerProcess for Pxed {
    fn kind(&self) -> &'static str {
        "pxed"
    }
    fn event_log(&self) -> &Path {
        &self.events
    }
    fn phone_url(&self) -> String {
        self.phone.clone()
    }
    fn exited(&mut self) -> Option<ExitStatus> {
        self.proc.exited()
    }
    fn stop(&mut self) {
        self.proc.stop();
    }
    fn kill(&mut self) {
        self.proc.kill();
    }
}

fn link_or_copy(from: &Path, to: &Path) -> Result<()> {
    let _ = std::fs::remove_file(to);
    if std::fs::hard_link(from, to).is_err() {
        std::fs::copy(from, to)
            .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    }
    Ok(())
}

/// A tiny HTTP listener inside the lab's namespace: `GET /api/phone-home?mac=..&stage=..`
/// becomes a BootEvent line in the event file, as pxed's own endpoint would produce.
pub struct PhoneHome {
    url: String,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl PhoneHome {
    /// Listen on `ip:PHONE_PORT` inside `netns`; append events to `events`.
    pub fn start(netns: &Netns, ip: Ipv4Addr, events: &Path) -> Result<Self> {
        let listener = netns.enter(move || TcpListener::bind((ip, PHONE_PORT)))?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(events)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("phone-home".into())
            .spawn(move || serve_phone(listener, file, stop2))?;
        Ok(PhoneHome {
            url: format!(
                "http://{ip}:{PHONE_PORT}/api/phone-home?stage={}",
                BootStage::OsPhoneHome.as_str()
            ),
            stop,
            thread: Some(thread),
        })
    }

    /// The URL the test OS calls.
    pub fn url(&self) -> String {
        self.url.clone()
    }

    /// Stop listening.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for PhoneHome {
    fn drop(&mut self) {
        self.stop();
    }
}

fn serve_phone(listener: TcpListener, mut file: std::fs::File, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::SeqCst) {
        match poll_readable(listener.as_raw_fd(), 100) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(_) => break,
        }
        let Ok((stream, peer)) = listener.accept() else {
            continue;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
        let mut reader = BufReader::new(&stream).take(MAX_REQUEST_LINE as u64);
        let mut line = String::new();
        if reader.read_line(&mut line).is_err() {
            continue;
        }
        let (status, event) = match parse_phone_request(&line) {
            Some((mac, stage)) => (
                "200 OK",
                Some(BootEvent::now(
                    mac,
                    stage,
                    format!("phone-home from {}", peer.ip()),
                )),
            ),
            None => ("400 Bad Request", None),
        };
        if let Some(ev) = event
            && let Ok(json) = serde_json::to_string(&ev)
        {
            let _ = writeln!(file, "{json}");
        }
        let mut w = &stream;
        let _ = write!(
            w,
            "HTTP/1.0 {status}\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n"
        );
    }
}

use std::io::Read as _;

/// `GET /api/phone-home?stage=os.phone-home&mac=52:54:.. HTTP/1.1` -> (mac, stage).
pub fn parse_phone_request(line: &str) -> Option<(MacAddr, BootStage)> {
    let mut parts = line.split_whitespace();
    if parts.next()? != "GET" {
        return None;
    }
    let target = parts.next()?;
    let (path, query) = target.split_once('?')?;
    if path != "/api/phone-home" {
        return None;
    }
    let mut mac = None;
    let mut stage = BootStage::OsPhoneHome;
    for pair in query.split('&') {
        match pair.split_once('=') {
            Some(("mac", v)) => mac = v.replace("%3A", ":").replace("%3a", ":").parse().ok(),
            Some(("stage", v)) => stage = v.parse().ok()?,
            _ => {}
        }
    }
    Some((mac?, stage))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phone_requests() {
        let (mac, stage) = parse_phone_request(
            "GET /api/phone-home?stage=os.phone-home&mac=52:54:00:77:01:01 HTTP/1.1\r\n",
        )
        .unwrap();
        assert_eq!(mac.to_string(), "52:54:00:77:01:01");
        assert_eq!(stage, BootStage::OsPhoneHome);
        assert!(parse_phone_request("GET /other?mac=52:54:00:77:01:01 HTTP/1.1").is_none());
        assert!(
            parse_phone_request("GET /api/phone-home?stage=bogus&mac=52:54:00:77:01:01 HTTP/1.1")
                .is_none()
        );
        assert!(parse_phone_request("GET /api/phone-home?stage=os.phone-home HTTP/1.1").is_none());
    }
}
