//! Virtual per-client files: boot-loader configs rendered from the boot policy, so an
//! unmodified distro netboot tree (pxelinux.0, a GRUB network image, its own
//! `pxelinux.cfg/default`) boots each machine the way the policy says.
//!
//! # Which names are virtual
//!
//! - `pxelinux.cfg/01-<mac>` (in any directory: pxelinux looks next to itself). pxelinux asks
//!   for `pxelinux.cfg/<uuid>`, then `01-<mac>`, then the client IP in hex with one digit
//!   dropped at a time (`C0A80A05`, `C0A80A0`, ... `C`), then `default`; syslinux.efi does the
//!   same.
//! - `grub.cfg-01-<mac>` (in any directory: GRUB looks in its `$prefix`). GRUB 2.04+ asks for
//!   `grub.cfg-01-<mac>`, then `grub.cfg-<hex IP>` with one digit dropped at a time, then
//!   `grub.cfg`.
//! - `boot.ipxe` at the root: the iPXE entry script (the same as HTTP's `/boot.ipxe`), for
//!   setups that give iPXE a TFTP file name.
//!
//! # Precedence
//!
//! The virtual file sits at the `01-<mac>` step of each loader's own search, and the loader
//! takes the first name that exists:
//!
//! - a real file with the requested name always wins (an admin's hand-written
//!   `pxelinux.cfg/01-<mac>` or `pxelinux.cfg/<uuid>` overrides the policy);
//! - for a machine whose plan renders, the tree's later names (hex IP, `default`, `grub.cfg`)
//!   are never reached: the policy wins over the tree's generic menu;
//! - for a machine whose plan does not render for this loader (an `nbp` profile, which means
//!   "run the tree as it is", or `ignore`, or an iPXE-only target such as `script`, `chain`,
//!   `menu` and `sanboot`), the virtual name does not exist and the tree's own files apply.
//!
//! The MAC comes from the file name itself (the loader says who it is). The architecture and
//! vendor class are the ones the machine's firmware sent in its last DHCP request (the loader
//! itself sends neither; without a DHCP request seen they are unknown); the client is known not
//! to be iPXE. A
//! `pxelinux.cfg/<uuid>` request just before is remembered per client address, so groups that
//! match on the UUID work for pxelinux too.
//!
//! # What is rendered
//!
//! `Kernel` for pxelinux: `DEFAULT pxed` / `LABEL pxed` / `KERNEL ::<path>` / `INITRD
//! ::<a>,::<b>` / `APPEND <cmdline>`. The `::` prefix makes pxelinux send the path as given,
//! relative to the TFTP root (the boot root), wherever pxelinux.0 itself lives. pxelinux.0
//! speaks TFTP only, so URLs cannot be used (lpxelinux.0 could, but is not assumed); a profile
//! with URLs gets a config that says so and boots locally. For GRUB: `linux /<path> <cmdline>` /
//! `initrd /<a> /<b>` / `boot`, GRUB's root being the TFTP server; URLs likewise refused.
//! `Local`: pxelinux `LOCALBOOT 0`, GRUB `exit` (back to the firmware's next boot device).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::fs::{FileSource, TftpFile, TftpFileError, sanitize};
use crate::http::boot_state::{BootStateStore, MemoryBootStates};
use crate::mac::MacAddr;
use crate::policy::{BootPlan, BootTarget, ClientFacts, FirmwareMemory, Policy, ServerAddrs, plan};

/// The directory pxelinux reads its configs from.
const PXELINUX_DIR: &str = "pxelinux.cfg";
/// GRUB's per-MAC config name prefix (ARP type 1 = Ethernet).
const GRUB_MAC_PREFIX: &str = "grub.cfg-01-";
/// pxelinux's per-MAC config name prefix.
const PXELINUX_MAC_PREFIX: &str = "01-";
/// The iPXE entry script's name at the TFTP root.
const IPXE_ENTRY: &str = "boot.ipxe";
/// A remembered `pxelinux.cfg/<uuid>` request is used for the `01-<mac>` request that follows
/// within this time (pxelinux asks them back to back).
const UUID_MEMORY: Duration = Duration::from_secs(30);
/// Clients whose UUID is remembered at once; beyond that the oldest are forgotten, so a flood
/// of UUID requests cannot grow memory.
const UUID_MEMORY_ENTRIES: usize = 4096;

/// Which boot loader a virtual config is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Loader {
    /// pxelinux.0 / syslinux.efi (`pxelinux.cfg/...`).
    Pxelinux,
    /// GRUB 2 (`grub.cfg-...`).
    Grub,
}

/// What a requested name means to [`PolicyFiles`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VirtualName {
    /// A loader's per-MAC config.
    MacConfig(Loader, MacAddr),
    /// pxelinux's per-UUID config (lower-case `8-4-4-4-12`).
    PxelinuxUuid(String),
    /// The iPXE entry script.
    IpxeEntry,
}

/// Classify sanitized path components.
pub fn classify(parts: &[String]) -> Option<VirtualName> {
    let (last, dirs) = parts.split_last()?;
    if dirs.is_empty() && last == IPXE_ENTRY {
        return Some(VirtualName::IpxeEntry);
    }
    if let Some(mac) = last.strip_prefix(GRUB_MAC_PREFIX) {
        return parse_hyphen_mac(mac).map(|m| VirtualName::MacConfig(Loader::Grub, m));
    }
    if dirs.last().is_some_and(|d| d == PXELINUX_DIR) {
        if let Some(mac) = last.strip_prefix(PXELINUX_MAC_PREFIX)
            && let Some(m) = parse_hyphen_mac(mac)
        {
            return Some(VirtualName::MacConfig(Loader::Pxelinux, m));
        }
        if is_uuid(last) {
            return Some(VirtualName::PxelinuxUuid(last.to_ascii_lowercase()));
        }
    }
    None
}

/// `52-54-00-12-34-56` (exactly that shape: colons are not what loaders send).
fn parse_hyphen_mac(text: &str) -> Option<MacAddr> {
    if text.len() != 17 || text.contains(':') {
        return None;
    }
    text.parse().ok()
}

/// `8-4-4-4-12` hex digits.
fn is_uuid(text: &str) -> bool {
    let groups: Vec<&str> = text.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// A [`FileSource`] that serves real files from `inner` and, where none exists, the virtual
/// files described in the module docs.
pub struct PolicyFiles {
    inner: Arc<dyn FileSource>,
    policy: Arc<Policy>,
    server: ServerAddrs,
    uuids: Mutex<HashMap<IpAddr, (String, Instant)>>,
    /// One-shot boot state shared with DHCP and HTTP: a machine that finished its one-shot
    /// profile gets a local-boot config, not its installer again.
    boot_states: Arc<dyn BootStateStore>,
    /// What each machine's firmware told DHCP (architecture, vendor class): the loader's config
    /// request carries only the MAC, and an arm64 GRUB must get the arm64 plan.
    firmware: Arc<FirmwareMemory>,
}

impl PolicyFiles {
    /// Wrap `inner` (usually a [`super::fs::RootSource`] over the boot root).
    pub fn new(inner: Arc<dyn FileSource>, policy: Arc<Policy>, server: ServerAddrs) -> Self {
        PolicyFiles {
            inner,
            policy,
            server,
            uuids: Mutex::default(),
            boot_states: Arc::new(MemoryBootStates::default()),
            firmware: Arc::new(FirmwareMemory::default()),
        }
    }

    /// Plan with the architecture and vendor class the DHCP engine kept in `firmware`.
    pub fn with_firmware_memory(mut self, firmware: Arc<FirmwareMemory>) -> Self {
        self.firmware = firmware;
        self
    }

    /// Plan with the one-shot state in `store` (the one HTTP records phone-home reports in).
    pub fn with_boot_states(mut self, store: Arc<dyn BootStateStore>) -> Self {
        self.boot_states = store;
        self
    }

    fn remember_uuid(&self, ip: IpAddr, uuid: String, now: Instant) {
        let Ok(mut map) = self.uuids.lock() else {
            return;
        };
        if map.len() >= UUID_MEMORY_ENTRIES {
            map.retain(|_, (_, at)| now.duration_since(*at) < UUID_MEMORY);
            if map.len() >= UUID_MEMORY_ENTRIES
                && let Some(oldest) = map.iter().min_by_key(|(_, (_, at))| *at).map(|(k, _)| *k)
            {
                map.remove(&oldest);
            }
        }
        map.insert(ip, (uuid, now));
    }

    fn recall_uuid(&self, ip: IpAddr, now: Instant) -> Option<String> {
        let map = self.uuids.lock().ok()?;
        map.get(&ip)
            .filter(|(_, at)| now.duration_since(*at) < UUID_MEMORY)
            .map(|(u, _)| u.clone())
    }

    /// The virtual file for `name`, if this client has one.
    fn render(&self, peer: SocketAddr, name: VirtualName) -> Option<String> {
        let now = Instant::now();
        match name {
            VirtualName::IpxeEntry => Some(crate::http::entry_script(&self.server.http_base())),
            VirtualName::PxelinuxUuid(uuid) => {
                self.remember_uuid(peer.ip(), uuid, now);
                None
            }
            VirtualName::MacConfig(loader, mac) => {
                let facts = ClientFacts {
                    mac,
                    uuid: match loader {
                        Loader::Pxelinux => self.recall_uuid(peer.ip(), now),
                        Loader::Grub => None,
                    },
                    ..ClientFacts::default()
                }
                .with_firmware(self.firmware.get(&mac));
                let state = self.boot_states.get(&mac);
                let plan = plan(&self.policy, &facts, &state, &self.server);
                match loader {
                    Loader::Pxelinux => render_pxelinux(&plan, &mac),
                    Loader::Grub => render_grub(&plan, &mac),
                }
            }
        }
    }
}

impl FileSource for PolicyFiles {
    fn open(&self, peer: SocketAddr, path: &str) -> Result<TftpFile, TftpFileError> {
        match self.inner.open(peer, path) {
            Err(TftpFileError::NotFound) => {}
            other => return other,
        }
        let parts = sanitize(path)?;
        let name = classify(&parts).ok_or(TftpFileError::NotFound)?;
        let text = self.render(peer, name).ok_or(TftpFileError::NotFound)?;
        Ok(TftpFile::Memory(Bytes::from(text)))
    }
}

/// Text that goes into a config line: control characters (which would start a new directive)
/// become spaces.
fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// A boot-root path usable as one word in a loader config: no URL, no whitespace or control
/// characters, no `,` (pxelinux's INITRD separator) and no `..`.
fn root_path(path: &str) -> Result<String, String> {
    if path.contains("://") {
        return Err(format!(
            "`{}` is a URL; this loader reads files by TFTP only",
            one_line(path)
        ));
    }
    if path.is_empty()
        || path
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == ',')
    {
        return Err(format!(
            "`{}` cannot be written into a loader config",
            one_line(path)
        ));
    }
    let parts = sanitize(path).map_err(|e| format!("`{}`: {e}", one_line(path)))?;
    Ok(parts.join("/"))
}

/// pxelinux config for a plan, or `None` when pxelinux cannot boot this target (the tree's own
/// files then apply).
pub fn render_pxelinux(plan: &BootPlan, mac: &MacAddr) -> Option<String> {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# pxed: {mac} boots profile {} ({})",
        one_line(&plan.profile),
        one_line(&plan.reason)
    );
    let _ = writeln!(
        s,
        "SAY pxed: {mac} boots profile {}",
        one_line(&plan.profile)
    );
    match &plan.target {
        BootTarget::Kernel {
            kernel,
            initrd,
            cmdline,
        } => {
            let files = kernel_files(kernel, initrd);
            match files {
                Ok((kernel, initrds)) => {
                    s.push_str("DEFAULT pxed\nLABEL pxed\n");
                    let _ = writeln!(s, "  KERNEL ::{kernel}");
                    if !initrds.is_empty() {
                        let list: Vec<String> = initrds.iter().map(|i| format!("::{i}")).collect();
                        let _ = writeln!(s, "  INITRD {}", list.join(","));
                    }
                    let _ = writeln!(s, "  APPEND {}", one_line(cmdline));
                }
                Err(problem) => {
                    let _ = writeln!(s, "SAY pxed: cannot boot: {problem}");
                    s.push_str("DEFAULT local\nLABEL local\n  LOCALBOOT 0\n");
                }
            }
        }
        BootTarget::Local => s.push_str("DEFAULT local\nLABEL local\n  LOCALBOOT 0\n"),
        _ => return None,
    }
    Some(s)
}

/// The kernel and initrds of a `Kernel` target as paths in the TFTP root, or why not.
fn kernel_files(kernel: &str, initrd: &[String]) -> Result<(String, Vec<String>), String> {
    let k = root_path(kernel)?;
    let i = initrd
        .iter()
        .map(|p| root_path(p))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((k, i))
}

/// One GRUB word that GRUB's parser takes literally: single-quoted, with `'` written as `'\''`.
fn grub_word(word: &str) -> String {
    format!("'{}'", word.replace('\'', "'\\''"))
}

/// GRUB config for a plan, or `None` when GRUB is not told what to boot (the tree's own
/// `grub.cfg` then applies).
pub fn render_grub(plan: &BootPlan, mac: &MacAddr) -> Option<String> {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# pxed: {mac} boots profile {} ({})",
        one_line(&plan.profile),
        one_line(&plan.reason)
    );
    let _ = writeln!(
        s,
        "echo {}",
        grub_word(&format!(
            "pxed: {mac} boots profile {}",
            one_line(&plan.profile)
        ))
    );
    match &plan.target {
        BootTarget::Kernel {
            kernel,
            initrd,
            cmdline,
        } => {
            let files = kernel_files(kernel, initrd);
            match files {
                Ok((kernel, initrds)) => {
                    // Word by word: GRUB joins the arguments of `linux` with spaces, and would
                    // quote one argument that contains spaces.
                    let mut line = format!("linux {}", grub_word(&format!("/{kernel}")));
                    for word in cmdline.split_whitespace() {
                        line.push(' ');
                        line.push_str(&grub_word(word));
                    }
                    let _ = writeln!(s, "{line}");
                    if !initrds.is_empty() {
                        let list: Vec<String> = initrds
                            .iter()
                            .map(|i| grub_word(&format!("/{i}")))
                            .collect();
                        let _ = writeln!(s, "initrd {}", list.join(" "));
                    }
                    s.push_str("boot\n");
                }
                Err(problem) => {
                    let _ = writeln!(
                        s,
                        "echo {}",
                        grub_word(&format!("pxed: cannot boot: {problem}"))
                    );
                    s.push_str("exit\n");
                }
            }
        }
        BootTarget::Local => s.push_str("exit\n"),
        _ => return None,
    }
    Some(s)
}

#[cfg(test)]
mod tests;
