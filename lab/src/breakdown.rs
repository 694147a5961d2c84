//! Where the seconds of a boot went: a machine's merged timeline (packets, console, server
//! events) cut into named phases: firmware start, each DHCP exchange, the waits between
//! packets, each transfer, the kernel's start, its boot, userspace. Waits are what a server
//! can remove; `pxelab run` prints them so that a slow boot explains itself.

use std::fmt::Write;

use pxed::stage::BootStage;
use serde::Serialize;

use crate::oracle::{Source, TimelineEntry};

/// Gaps shorter than this are not reported as waits.
pub const MIN_WAIT_MS: u64 = 300;

/// What a phase was.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PhaseKind {
    /// Power-on until the first DHCP packet: firmware and option ROM start.
    Firmware,
    /// DISCOVER to ACK.
    Dhcp,
    /// A file moving over TFTP or HTTP.
    Transfer,
    /// Nothing on the wire while the client waits (for a router, a ProxyDHCP offer, ...).
    Wait,
    /// The last transfer until the kernel's banner: starting the downloaded program.
    KernelStart,
    /// The kernel's banner until userspace.
    KernelBoot,
    /// Userspace until phone-home (the OS's own DHCP and the report).
    Userspace,
}

/// One phase of a boot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Phase {
    /// What it was.
    pub kind: PhaseKind,
    /// What exactly (the file, the packets around a wait).
    pub what: String,
    /// Start, ms after power-on.
    pub start_ms: u64,
    /// End, ms after power-on.
    pub end_ms: u64,
}

impl Phase {
    /// Its length in ms.
    pub fn ms(&self) -> u64 {
        self.end_ms.saturating_sub(self.start_ms)
    }
}

/// A milestone read off one timeline entry.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Mark {
    Discover,
    Ack,
    Packet(String),
    TransferStart(String),
    TransferEnd(String),
    Stage(BootStage),
}

fn mark(e: &TimelineEntry) -> Option<Mark> {
    let t = e.text.as_str();
    match e.source {
        Source::Wire => {
            if t.starts_with("DHCP DISCOVER") {
                Some(Mark::Discover)
            } else if t.starts_with("DHCP ACK") {
                Some(Mark::Ack)
            } else if let Some(rest) = t.strip_prefix("TFTP RRQ ") {
                Some(Mark::TransferStart(format!(
                    "TFTP {}",
                    rest.split_whitespace().next().unwrap_or("?")
                )))
            } else if let Some(rest) = t.strip_prefix("TFTP complete ") {
                Some(Mark::TransferEnd(format!("TFTP {rest}")))
            } else if let Some(rest) = t.strip_prefix("HTTP GET ") {
                Some(Mark::TransferStart(format!(
                    "HTTP {}",
                    rest.split_whitespace().next().unwrap_or("?")
                )))
            } else {
                Some(Mark::Packet(t.chars().take(60).collect()))
            }
        }
        _ => match e.stage {
            Some(s @ (BootStage::OsKernel | BootStage::OsUserspace | BootStage::OsPhoneHome)) => {
                Some(Mark::Stage(s))
            }
            _ => None,
        },
    }
}

/// Cut a timeline into phases. Pure; the timeline need not be sorted.
pub fn breakdown(timeline: &[TimelineEntry]) -> Vec<Phase> {
    let mut entries: Vec<&TimelineEntry> = timeline.iter().collect();
    entries.sort_by_key(|e| e.at_ms);
    let mut phases = Vec::new();
    let mut push = |kind, what: String, start_ms: u64, end_ms: u64| {
        if end_ms > start_ms {
            phases.push(Phase {
                kind,
                what,
                start_ms,
                end_ms,
            });
        }
    };
    // The last thing that happened, and what it was called.
    let mut last_ms = 0u64;
    let mut last_what = "power-on".to_string();
    let mut seen_packet = false;
    let mut dhcp_start: Option<u64> = None;
    let mut transfer: Option<(String, u64)> = None;
    let mut kernel_at: Option<u64> = None;
    let mut userspace_at: Option<u64> = None;
    for e in entries {
        let Some(m) = mark(e) else { continue };
        let at = e.at_ms;
        // A transfer over HTTP has no end packet we parse: it ends at the next milestone.
        if let Some((what, start)) = transfer.take() {
            if matches!(&m, Mark::TransferEnd(w) if *w == what) {
                push(PhaseKind::Transfer, what.clone(), start, at);
                last_ms = at;
                last_what = what;
                continue;
            }
            if what.starts_with("HTTP") {
                push(PhaseKind::Transfer, what.clone(), start, at);
                last_ms = at;
                last_what = what;
            } else {
                transfer = Some((what, start));
            }
        }
        let gap_to_here = |last_ms: u64, last_what: &str, here: &str| {
            (at.saturating_sub(last_ms) >= MIN_WAIT_MS)
                .then(|| (format!("after {last_what}, before {here}"), last_ms, at))
        };
        match m {
            Mark::Discover => {
                if dhcp_start.is_none() {
                    if !seen_packet && kernel_at.is_none() {
                        push(
                            PhaseKind::Firmware,
                            "firmware and option ROM start".into(),
                            0,
                            at,
                        );
                    } else if let Some((w, s, t)) = gap_to_here(last_ms, &last_what, "DHCP") {
                        push(PhaseKind::Wait, w, s, t);
                    }
                    dhcp_start = Some(at);
                }
            }
            Mark::Ack => {
                let start = dhcp_start.take().unwrap_or(last_ms);
                push(PhaseKind::Dhcp, "DHCP DISCOVER to ACK".into(), start, at);
                last_ms = at;
                last_what = "DHCP ACK".into();
            }
            Mark::TransferStart(what) => {
                if transfer.is_none() {
                    if let Some((w, s, t)) = gap_to_here(last_ms, &last_what, &what) {
                        push(PhaseKind::Wait, w, s, t);
                    }
                    transfer = Some((what, at));
                }
            }
            Mark::TransferEnd(_) | Mark::Packet(_) => {}
            Mark::Stage(BootStage::OsKernel) => {
                push(
                    PhaseKind::KernelStart,
                    format!("{last_what} to the kernel's banner"),
                    last_ms,
                    at,
                );
                kernel_at = Some(at);
                last_ms = at;
                last_what = "kernel start".into();
            }
            Mark::Stage(BootStage::OsUserspace) => {
                push(
                    PhaseKind::KernelBoot,
                    "kernel boot to userspace".into(),
                    kernel_at.unwrap_or(last_ms),
                    at,
                );
                userspace_at = Some(at);
                last_ms = at;
                last_what = "userspace".into();
            }
            Mark::Stage(_) => {
                push(
                    PhaseKind::Userspace,
                    "userspace to phone-home".into(),
                    userspace_at.unwrap_or(last_ms),
                    at,
                );
                last_ms = at;
                last_what = "phone-home".into();
            }
        }
        seen_packet |= e.source == Source::Wire;
    }
    phases
}

/// The phases as text lines (for `pxelab run`), longest waits marked.
pub fn render(phases: &[Phase]) -> String {
    let mut s = String::new();
    let total_wait: u64 = phases
        .iter()
        .filter(|p| p.kind == PhaseKind::Wait)
        .map(Phase::ms)
        .sum();
    for p in phases {
        let _ = writeln!(
            s,
            "      {:>7.2} s  +{:>6.2} s  {:<12} {}",
            p.start_ms as f64 / 1000.0,
            p.ms() as f64 / 1000.0,
            format!("{:?}", p.kind).to_lowercase(),
            p.what
        );
    }
    let _ = writeln!(
        s,
        "      waiting with nothing on the wire: {:.2} s",
        total_wait as f64 / 1000.0
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(at_ms: u64, text: &str) -> TimelineEntry {
        TimelineEntry {
            at_ms,
            source: Source::Wire,
            stage: None,
            text: text.into(),
        }
    }

    fn console(at_ms: u64, stage: BootStage) -> TimelineEntry {
        TimelineEntry {
            at_ms,
            source: Source::Console,
            stage: Some(stage),
            text: stage.as_str().into(),
        }
    }

    #[test]
    fn a_bios_boot_with_the_ipxe_ipv6_wait() {
        // The shape measured against dnsmasq's defaults: 13 s of nothing after the ACK.
        let t = vec![
            wire(2_960, "DHCP DISCOVER xid=1 (iPXE)"),
            wire(6_010, "DHCP OFFER xid=1"),
            wire(6_012, "DHCP REQUEST xid=1"),
            wire(6_031, "DHCP ACK xid=1"),
            wire(19_195, "TFTP RRQ boot.ipxe blksize 1432"),
            wire(19_197, "TFTP complete boot.ipxe"),
            wire(19_205, "TFTP RRQ vmlinuz blksize 1432"),
            wire(21_104, "TFTP complete vmlinuz"),
            console(24_000, BootStage::OsKernel),
            console(26_000, BootStage::OsUserspace),
            console(30_000, BootStage::OsPhoneHome),
        ];
        let p = breakdown(&t);
        let kinds: Vec<PhaseKind> = p.iter().map(|p| p.kind).collect();
        assert_eq!(
            kinds,
            vec![
                PhaseKind::Firmware,
                PhaseKind::Dhcp,
                PhaseKind::Wait,
                PhaseKind::Transfer,
                PhaseKind::Transfer,
                PhaseKind::KernelStart,
                PhaseKind::KernelBoot,
                PhaseKind::Userspace,
            ]
        );
        let wait = &p[2];
        assert_eq!((wait.start_ms, wait.end_ms), (6_031, 19_195));
        assert!(
            wait.what.contains("after DHCP ACK, before TFTP boot.ipxe"),
            "{}",
            wait.what
        );
        assert_eq!(p[4].what, "TFTP vmlinuz");
        assert_eq!(p[4].ms(), 1_899);
        assert!(render(&p).contains("waiting with nothing on the wire: 13.16 s"));
    }

    #[test]
    fn http_transfers_end_at_the_next_milestone() {
        let t = vec![
            wire(1_000, "DHCP DISCOVER xid=1"),
            wire(1_500, "DHCP ACK xid=1"),
            wire(1_600, "HTTP GET /boot.ipxe HTTP/1.1"),
            wire(1_700, "HTTP GET /vmlinuz?mac=x HTTP/1.1"),
            console(5_000, BootStage::OsKernel),
        ];
        let p = breakdown(&t);
        let http: Vec<&str> = p
            .iter()
            .filter(|p| p.kind == PhaseKind::Transfer)
            .map(|p| p.what.as_str())
            .collect();
        assert_eq!(http, vec!["HTTP /boot.ipxe", "HTTP /vmlinuz?mac=x"]);
        assert!(p.iter().all(|p| p.kind != PhaseKind::Wait), "{p:?}");
    }

    #[test]
    fn empty_timeline_has_no_phases() {
        assert!(breakdown(&[]).is_empty());
    }
}
