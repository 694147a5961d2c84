//! Test support: network namespaces the tests create and always delete, processes that are
//! killed when the test ends, and waiting on conditions with deadlines (never sleep-and-hope).

#![allow(dead_code)]

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Whether the tests that need root (namespaces, ports below 1024) can run here.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Skip (with a message) unless root; CI runs as root, so these tests run there.
#[macro_export]
macro_rules! require_root {
    () => {
        if !$crate::support::is_root() {
            eprintln!("skipped: needs root (network namespaces)");
            return;
        }
    };
}

/// A short unique name: namespaces and interface names are limited to 15 characters.
pub fn unique(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{}{n}", std::process::id() % 10000)
}

/// Run a command and fail the test with its output if it fails.
pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace, deleted on drop.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    pub fn new(prefix: &str) -> NetNs {
        let name = unique(prefix);
        run("ip", &["netns", "add", &name]);
        let ns = NetNs { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip ARGS` inside the namespace.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut full = vec!["netns", "exec", &self.name, "ip"];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// A command that runs inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Run `f` on a thread that has entered the namespace; sockets it creates live there.
    pub fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = PathBuf::from("/var/run/netns").join(&self.name);
        std::thread::spawn(move || {
            let file = File::open(&path).expect("open netns");
            // SAFETY: setns on a namespace fd only changes this thread's network namespace.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("namespace thread panicked")
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Kill anything still running in the namespace, then remove it.
        if let Ok(out) = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
        {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-9", pid]).status();
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// The MAC of `eth0` in a namespace, as `ip link` prints it.
pub fn mac_of(ns: &NetNs) -> String {
    let out = ns.ip(&["-o", "link", "show", "eth0"]);
    let at = out.find("link/ether ").unwrap() + "link/ether ".len();
    out[at..at + 17].to_string()
}

/// A LAN: a bridge in its own namespace, and hosts (namespaces) joined to it by veth pairs.
pub struct Lan {
    pub switch: NetNs,
    pub hosts: Vec<NetNs>,
}

impl Lan {
    pub fn new() -> Lan {
        let switch = NetNs::new("pxsw");
        switch.ip(&["link", "add", "br0", "type", "bridge"]);
        switch.ip(&["link", "set", "br0", "up"]);
        Lan {
            switch,
            hosts: Vec::new(),
        }
    }

    /// Add a host namespace with interface `eth0`, optionally with an address (CIDR).
    /// Returns its index in `hosts`.
    pub fn host(&mut self, prefix: &str, addr: Option<&str>) -> usize {
        let host = NetNs::new(prefix);
        let peer = unique("vp");
        self.switch.ip(&[
            "link", "add", &peer, "type", "veth", "peer", "name", "eth0", "netns", &host.name,
        ]);
        self.switch
            .ip(&["link", "set", &peer, "master", "br0", "up"]);
        host.ip(&["link", "set", "eth0", "up"]);
        if let Some(a) = addr {
            host.ip(&["addr", "add", a, "dev", "eth0"]);
        }
        self.hosts.push(host);
        self.hosts.len() - 1
    }
}

/// A child process killed (and reaped) on drop, with its output in a file for diagnosis.
pub struct Daemon {
    pub child: Child,
    pub log: PathBuf,
}

impl Daemon {
    pub fn spawn(mut cmd: Command, log: &Path) -> Daemon {
        let file = File::create(log).expect("log file");
        let err = file.try_clone().expect("clone log");
        let child = cmd
            .stdout(Stdio::from(file))
            .stderr(Stdio::from(err))
            .spawn()
            .expect("spawn daemon");
        Daemon {
            child,
            log: log.to_path_buf(),
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Fail if the process has already exited.
    pub fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("daemon exited early ({status}):\n{}", self.log_text());
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Poll `f` until it returns Some, or panic with `what` after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether a UDP port is bound in a namespace (from `ss`), to start tests only when the
/// server is listening.
pub fn udp_listening(ns: &NetNs, port: u16) -> bool {
    let out = ns
        .command("ss")
        .args(["-uln"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    out.lines().any(|l| l.contains(&format!(":{port} ")))
}

/// `pxed serve --config CFG ARGS` in a namespace, once it listens on port 67.
pub fn start_pxed(ns: &NetNs, cfg: &Path, log: &Path, args: &[&str]) -> Daemon {
    let mut cmd = ns.command(env!("CARGO_BIN_EXE_pxed"));
    cmd.arg("serve").arg("--config").arg(cfg).args(args);
    let mut d = Daemon::spawn(cmd, log);
    wait_for("pxed on port 67", Duration::from_secs(10), || {
        d.assert_running();
        udp_listening(ns, 67).then_some(())
    });
    d
}
