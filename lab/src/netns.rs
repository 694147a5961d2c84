//! Network namespaces and TAP devices for a lab: everything the lab's server sees lives in a
//! namespace of its own, so no frame reaches the host's interfaces.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};

/// Every namespace the lab creates starts with this, so `pxelab clean` can find leftovers.
pub const NETNS_PREFIX: &str = "pxelab-";
/// Where `ip netns` keeps its namespace handles.
const NETNS_DIR: &str = "/run/netns";
/// TUNSETIFF from <linux/if_tun.h>: _IOW('T', 202, int).
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
/// IFF_TAP | IFF_NO_PI from <linux/if_tun.h>: Ethernet frames without the 4-byte packet info.
const IFF_TAP_NO_PI: libc::c_short = 0x0002 | 0x1000;
/// IFNAMSIZ from <net/if.h>, including the NUL.
const IFNAMSIZ: usize = 16;

/// A network namespace owned by this process; deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Create `pxelab-<suffix>` (`ip netns add`) and bring its loopback up.
    pub fn create(suffix: &str) -> Result<Self> {
        let name = format!("{NETNS_PREFIX}{suffix}");
        run(Command::new("ip").args(["netns", "add", &name]))
            .with_context(|| format!("creating network namespace {name} (needs root)"))?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name, for `ip netns exec`.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn handle_path(&self) -> PathBuf {
        PathBuf::from(NETNS_DIR).join(&self.name)
    }

    /// Run `ip -n <ns> <args>`.
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        run(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// A command that runs inside the namespace (`ip netns exec <ns> program ...`).
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// Run `f` on a fresh thread that entered the namespace: sockets and devices it creates
    /// belong to the namespace and keep working from any thread afterwards.
    pub fn enter<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> io::Result<T> + Send + 'static,
    ) -> Result<T> {
        let handle = File::open(self.handle_path())
            .with_context(|| format!("opening {}", self.handle_path().display()))?;
        let joined = std::thread::spawn(move || -> io::Result<T> {
            // SAFETY: setns on a valid fd we own; only this thread changes namespace.
            let rc = unsafe { libc::setns(handle.as_raw_fd(), libc::CLONE_NEWNET) };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
            f()
        })
        .join();
        match joined {
            Ok(result) => Ok(result?),
            Err(_) => bail!("the thread inside namespace {} panicked", self.name),
        }
    }

    /// Create a TAP device named `ifname` inside the namespace, give it `cidr` and bring it up.
    /// The device lives as long as the returned file is open.
    pub fn create_tap(&self, ifname: &str, cidr: &str) -> Result<File> {
        let name = ifname.to_string();
        let tap = self.enter(move || open_tap(&name))?;
        self.ip(&["addr", "add", cidr, "dev", ifname])?;
        self.ip(&["link", "set", ifname, "up"])?;
        Ok(tap)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(err) = run(Command::new("ip").args(["netns", "delete", &self.name])) {
            eprintln!("pxelab: could not delete namespace {}: {err:#}", self.name);
        }
    }
}

/// Open /dev/net/tun and attach it as a TAP device in the calling thread's namespace.
fn open_tap(ifname: &str) -> io::Result<File> {
    if ifname.len() >= IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "interface name too long",
        ));
    }
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    // struct ifreq: 16 bytes of name, then a union whose first member is the short flags.
    let mut ifreq = [0u8; 40];
    if let Some(slot) = ifreq.get_mut(..ifname.len()) {
        slot.copy_from_slice(ifname.as_bytes());
    }
    if let Some(slot) = ifreq.get_mut(IFNAMSIZ..IFNAMSIZ + 2) {
        slot.copy_from_slice(&IFF_TAP_NO_PI.to_ne_bytes());
    }
    // SAFETY: TUNSETIFF reads and writes a struct ifreq, which `ifreq` is large enough to hold.
    let rc = unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF as _, ifreq.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(tun)
}

/// Duplicate a file descriptor (a reader and a writer for one TAP).
pub fn dup_file(file: &File) -> io::Result<File> {
    // SAFETY: dup of a valid fd; the new fd is owned by the returned File.
    let fd = unsafe { libc::dup(file.as_raw_fd()) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Wait until `fd` is readable or `timeout_ms` passes; true when readable.
pub fn poll_readable(fd: i32, timeout_ms: i32) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let rc = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
    match rc {
        r if r < 0 => {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(err)
            }
        }
        0 => Ok(false),
        _ => Ok(true),
    }
}

/// Namespaces left behind by earlier runs (named `pxelab-*`).
pub fn leftover_namespaces() -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(NETNS_DIR) else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(NETNS_PREFIX))
        .collect()
}

/// Delete a namespace by name (for `pxelab clean`).
pub fn delete_namespace(name: &str) -> Result<()> {
    run(Command::new("ip").args(["netns", "delete", name]))
}

pub(crate) fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
