//! Where the seconds of a boot went: a machine's milestones cut into named spans (firmware
//! start, each DHCP exchange, the waits between packets, each transfer, the kernel's start, its
//! boot, userspace, phone-home). Waits are what a server can remove.
//!
//! One cutter, two views: the lab (`pxelab run`, `lab/src/breakdown.rs`) feeds it milestones
//! read off the pcap, the serial console and pxed's events, with power-on as time 0; pxed feeds
//! it its own [`BootEvent`]s ([`boot_spans`]) for the API and the dashboard, where the boot
//! starts at the first DHCP DISCOVER (pxed cannot see power-on).

use serde::Serialize;

use crate::events::BootEvent;
use crate::stage::BootStage;

/// Gaps shorter than this are not reported as waits.
pub const MIN_WAIT_MS: u64 = 300;

/// What a span was.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SpanKind {
    /// Power-on until the first DHCP packet: firmware and option ROM start.
    Firmware,
    /// DISCOVER to ACK (or to pxed's proxy offer).
    Dhcp,
    /// A file moving over TFTP or HTTP.
    Transfer,
    /// Nothing happening while the client waits (for a router, a ProxyDHCP offer, ...).
    Wait,
    /// The last transfer until the kernel's banner: starting the downloaded program.
    KernelStart,
    /// The kernel's banner (or the last transfer, when the banner is not seen) until userspace.
    KernelBoot,
    /// Userspace until phone-home (the OS's own DHCP and the report).
    Userspace,
}

impl SpanKind {
    /// The kebab-case name used in JSON and in the lab's text report.
    pub fn as_str(self) -> &'static str {
        match self {
            SpanKind::Firmware => "firmware",
            SpanKind::Dhcp => "dhcp",
            SpanKind::Transfer => "transfer",
            SpanKind::Wait => "wait",
            SpanKind::KernelStart => "kernel-start",
            SpanKind::KernelBoot => "kernel-boot",
            SpanKind::Userspace => "userspace",
        }
    }
}

/// One named span of a boot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Span {
    /// What it was.
    pub kind: SpanKind,
    /// What exactly (the file, the packets around a wait).
    pub what: String,
    /// Start, in the caller's time base (ms after power-on in the lab, Unix ms in pxed).
    pub start_ms: u64,
    /// End, same time base.
    pub end_ms: u64,
}

impl Span {
    /// Its length in ms.
    pub fn ms(&self) -> u64 {
        self.end_ms.saturating_sub(self.start_ms)
    }
}

/// A point in a boot that starts or ends a span.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Milestone {
    /// A DHCP DISCOVER: a DHCP exchange starts.
    DhcpStart,
    /// The exchange ended with this packet (`ACK`, `proxy offer`).
    DhcpEnd(String),
    /// A transfer started. `until_next`: nothing reports its end, so it ends at the next
    /// milestone (an HTTP GET in a capture).
    TransferStart {
        /// `TFTP <file>` or `HTTP <path>`.
        what: String,
        /// It ends at the next milestone of any kind.
        until_next: bool,
    },
    /// A transfer ended (its `what`, or `None`: whichever transfer is open).
    TransferEnd(Option<String>),
    /// Something happened that is no milestone (another packet on the wire).
    Activity,
    /// A step that takes no time of its own but names what a following gap comes after (a
    /// generated iPXE script: one small response).
    Instant(String),
    /// The kernel's banner.
    Kernel,
    /// The OS reached userspace (only the first report counts).
    Userspace,
    /// A DISCOVER from a client that is not PXE firmware after the boot's transfers: the booted
    /// OS asking for its own address, so userspace is up.
    OsDhcp,
    /// The OS reported a later stage (`phone-home`, `os.installed`).
    Reported(String),
}

/// A milestone and when it happened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mark {
    /// When, in the caller's time base.
    pub at_ms: u64,
    /// What.
    pub milestone: Milestone,
    /// Seen on the wire (the lab's capture): before the first DISCOVER it means the firmware
    /// was already talking, so the gap is a wait, not firmware start.
    pub on_wire: bool,
}

/// Cut marks into spans. Pure; the marks need not be sorted. `power_on_ms`: when the machine
/// was switched on (the lab knows; pxed does not), which gives the firmware span.
pub fn cut(marks: &[Mark], power_on_ms: Option<u64>) -> Vec<Span> {
    let mut marks: Vec<&Mark> = marks.iter().collect();
    marks.sort_by_key(|m| m.at_ms);
    let mut spans = Vec::new();
    let mut push = |kind, what: String, start_ms: u64, end_ms: u64| {
        if end_ms > start_ms {
            spans.push(Span {
                kind,
                what,
                start_ms,
                end_ms,
            });
        }
    };
    // The last thing that happened, and what it was called.
    let mut last_ms = power_on_ms;
    let mut last_what = "power-on".to_string();
    let mut seen_wire = false;
    let mut dhcp_start: Option<u64> = None;
    let mut transfer: Option<(String, u64, bool)> = None;
    let mut kernel_at: Option<u64> = None;
    let mut userspace_at: Option<u64> = None;
    for mark in marks {
        let at = mark.at_ms;
        let m = &mark.milestone;
        if let Some((what, start, until_next)) = transfer.take() {
            let ends_here = match m {
                Milestone::TransferEnd(None) => true,
                Milestone::TransferEnd(Some(w)) => *w == what,
                _ => false,
            };
            if ends_here || until_next {
                push(SpanKind::Transfer, what.clone(), start, at);
                last_ms = Some(at);
                last_what = what;
                if ends_here {
                    continue;
                }
            } else {
                transfer = Some((what, start, until_next));
            }
        }
        let wait_until_here = |last_ms: Option<u64>, last_what: &str, here: &str| {
            last_ms
                .filter(|l| at.saturating_sub(*l) >= MIN_WAIT_MS)
                .map(|l| (format!("after {last_what}, before {here}"), l, at))
        };
        match m {
            Milestone::DhcpStart => {
                if dhcp_start.is_none() {
                    match power_on_ms {
                        Some(p) if !seen_wire && kernel_at.is_none() => push(
                            SpanKind::Firmware,
                            "firmware and option ROM start".into(),
                            p,
                            at,
                        ),
                        _ => {
                            if let Some((w, s, t)) = wait_until_here(last_ms, &last_what, "DHCP") {
                                push(SpanKind::Wait, w, s, t);
                            }
                        }
                    }
                    dhcp_start = Some(at);
                }
            }
            Milestone::DhcpEnd(end) => {
                if let Some(start) = dhcp_start.take().or(last_ms) {
                    push(SpanKind::Dhcp, format!("DHCP DISCOVER to {end}"), start, at);
                }
                last_ms = Some(at);
                last_what = format!("DHCP {end}");
            }
            Milestone::TransferStart { what, until_next } => {
                if transfer.is_none() {
                    if let Some((w, s, t)) = wait_until_here(last_ms, &last_what, what) {
                        push(SpanKind::Wait, w, s, t);
                    }
                    transfer = Some((what.clone(), at, *until_next));
                }
            }
            Milestone::TransferEnd(_) | Milestone::Activity => {}
            Milestone::Instant(what) => {
                if let Some((w, s, t)) = wait_until_here(last_ms, &last_what, what) {
                    push(SpanKind::Wait, w, s, t);
                }
                last_ms = Some(at);
                last_what = what.clone();
            }
            Milestone::Kernel => {
                if let Some(last) = last_ms {
                    push(
                        SpanKind::KernelStart,
                        format!("{last_what} to the kernel's banner"),
                        last,
                        at,
                    );
                }
                kernel_at = Some(at);
                last_ms = Some(at);
                last_what = "kernel start".into();
            }
            Milestone::Userspace | Milestone::OsDhcp if userspace_at.is_none() => {
                let here = if *m == Milestone::OsDhcp {
                    "the OS's own DHCP"
                } else {
                    "userspace"
                };
                let (start, what) = match kernel_at {
                    Some(k) => (Some(k), format!("kernel boot to {here}")),
                    None => (
                        last_ms,
                        format!("{last_what} to {here} (kernel start and boot)"),
                    ),
                };
                if let Some(start) = start {
                    push(SpanKind::KernelBoot, what, start, at);
                }
                userspace_at = Some(at);
                last_ms = Some(at);
                last_what = here.into();
                if *m == Milestone::OsDhcp {
                    dhcp_start = Some(at);
                }
            }
            Milestone::Userspace | Milestone::OsDhcp => {}
            Milestone::Reported(name) => {
                // From the last milestone, not from userspace: the OS's DHCP in between is a
                // span of its own, and spans do not overlap.
                if let Some(start) = last_ms {
                    push(
                        SpanKind::Userspace,
                        format!("{last_what} to {name}"),
                        start,
                        at,
                    );
                }
                last_ms = Some(at);
                last_what = name.clone();
            }
        }
        seen_wire |= mark.on_wire;
    }
    spans
}

/// The milestone pxed's own event is: DHCP from the DHCP server, transfers from the TFTP and
/// HTTP servers (their details start with the file), OS stages from phone-home.
pub fn event_milestone(event: &BootEvent) -> Milestone {
    let detail = event.detail.as_str();
    // The servers' details: TFTP `file=<name> peer=...`, HTTP `<path> (<n> bytes)` or
    // `<path> bytes <a>-<b>/<n>`.
    let tftp_file = || {
        let rest = detail.strip_prefix("file=").unwrap_or(detail);
        let name = rest.split(" peer=").next().unwrap_or(rest);
        format!("TFTP {name}")
    };
    let http_path = || {
        let end = [" (", " bytes "]
            .iter()
            .filter_map(|k| detail.find(k))
            .min()
            .unwrap_or(detail.len());
        format!("HTTP {}", detail.get(..end).unwrap_or(detail))
    };
    match event.stage {
        // The engine's words for a DISCOVER without PXE options (`discover_detail`).
        BootStage::DhcpDiscover if detail.starts_with("not a PXE client") => Milestone::OsDhcp,
        BootStage::DhcpDiscover => Milestone::DhcpStart,
        BootStage::DhcpAck => Milestone::DhcpEnd("ACK".into()),
        BootStage::ProxyOffer => Milestone::DhcpEnd("proxy offer".into()),
        BootStage::TftpRequest => Milestone::TransferStart {
            what: tftp_file(),
            until_next: false,
        },
        // Firmware and iPXE fetch one file at a time: an end ends the open transfer.
        BootStage::TftpComplete
        | BootStage::TftpProbe
        | BootStage::TftpError
        | BootStage::HttpError
        | BootStage::HttpComplete => Milestone::TransferEnd(None),
        BootStage::HttpScript => Milestone::Instant("the iPXE script".into()),
        BootStage::HttpKernel | BootStage::HttpInitrd | BootStage::HttpAsset => {
            Milestone::TransferStart {
                what: http_path(),
                until_next: false,
            }
        }
        BootStage::OsKernel => Milestone::Kernel,
        BootStage::OsUserspace => Milestone::Userspace,
        BootStage::OsPhoneHome => Milestone::Reported("phone-home".into()),
        BootStage::OsCustom => Milestone::Reported(
            detail
                .split([':', ' '])
                .next()
                .filter(|s| !s.is_empty())
                .unwrap_or("a custom stage")
                .to_string(),
        ),
        _ => Milestone::Activity,
    }
}

/// The spans of the last boot in a machine's events (oldest first, as [`crate::events::EventBus`]
/// keeps them): from the last DHCP DISCOVER that was not iPXE's own (iPXE's DHCP belongs to the
/// same boot) to the last event. Times are Unix ms.
pub fn boot_spans(events: &[BootEvent]) -> Vec<Span> {
    let start = last_boot_start(events);
    let marks: Vec<Mark> = events
        .get(start..)
        .unwrap_or_default()
        .iter()
        .map(|e| Mark {
            at_ms: e.at_ms,
            milestone: event_milestone(e),
            on_wire: false,
        })
        .collect();
    cut(&marks, None)
}

/// Index of the first event of the last boot: the firmware's DISCOVER that starts it, i.e. the
/// last DISCOVER not made by iPXE (chained iPXE's DHCP is marked by an `ipxe.dhcp` event in the
/// same millisecond) that came after an OS stage or is the first one.
fn last_boot_start(events: &[BootEvent]) -> usize {
    let mut start = 0;
    let mut after_os = false;
    for (i, e) in events.iter().enumerate() {
        match e.stage {
            BootStage::DhcpDiscover if after_os => {
                start = i;
                after_os = false;
            }
            s if s.family() == "os" => after_os = true,
            _ => {}
        }
    }
    start
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mac::MacAddr;

    const MAC: MacAddr = MacAddr([0x52, 0x54, 0, 0x77, 1, 1]);

    fn ev(at_ms: u64, stage: BootStage, detail: &str) -> BootEvent {
        BootEvent {
            mac: MAC,
            stage,
            detail: detail.into(),
            at_ms,
        }
    }

    fn kinds(spans: &[Span]) -> Vec<SpanKind> {
        spans.iter().map(|s| s.kind).collect()
    }

    #[test]
    fn a_uefi_boot_from_pxeds_events() {
        // EDK2's DHCP, snponly.efi by TFTP, iPXE's DHCP, script and kernel by HTTP, phone-home.
        let events = vec![
            ev(1_000, BootStage::DhcpDiscover, "arch 7"),
            ev(1_001, BootStage::DhcpOffer, "10.0.0.5"),
            ev(1_800, BootStage::DhcpRequest, "10.0.0.5"),
            ev(1_801, BootStage::DhcpAck, "10.0.0.5"),
            ev(
                1_900,
                BootStage::TftpRequest,
                "file=snponly.efi peer=10.0.0.5:1024 mode=octet options=-",
            ),
            ev(
                2_300,
                BootStage::TftpComplete,
                "file=snponly.efi bytes=173792 duration=0.400s rate=0.4MiB/s",
            ),
            ev(3_000, BootStage::IpxeDhcp, "iPXE on efi"),
            ev(3_000, BootStage::DhcpDiscover, "arch 7, class IpxeEfi"),
            ev(3_010, BootStage::DhcpAck, "10.0.0.5"),
            ev(3_100, BootStage::HttpScript, "profile default"),
            ev(3_150, BootStage::HttpKernel, "/vmlinuz (8247232 bytes)"),
            ev(
                5_150,
                BootStage::HttpComplete,
                "/vmlinuz (8247232 bytes) sent in 2.000 s",
            ),
            ev(5_200, BootStage::HttpInitrd, "/initrd.gz (1591376 bytes)"),
            ev(
                5_600,
                BootStage::HttpComplete,
                "/initrd.gz (1591376 bytes) sent in 0.400 s",
            ),
            ev(
                8_000,
                BootStage::DhcpDiscover,
                "not a PXE client, vendor udhcp 1.35.0",
            ),
            ev(8_100, BootStage::DhcpAck, "10.0.0.5"),
            ev(9_000, BootStage::OsUserspace, "from 10.0.0.5"),
            ev(9_500, BootStage::OsPhoneHome, "from 10.0.0.5"),
        ];
        let spans = boot_spans(&events);
        use SpanKind::*;
        assert_eq!(
            kinds(&spans),
            [
                Dhcp, Transfer, Wait, Dhcp, Transfer, Transfer, KernelBoot, Dhcp, Userspace
            ],
            "{spans:#?}"
        );
        let whats: Vec<&str> = spans.iter().map(|s| s.what.as_str()).collect();
        assert_eq!(whats[1], "TFTP snponly.efi");
        assert_eq!(whats[2], "after TFTP snponly.efi, before DHCP");
        assert_eq!(whats[4], "HTTP /vmlinuz");
        assert_eq!((spans[4].start_ms, spans[4].end_ms), (3_150, 5_150));
        assert_eq!(whats[5], "HTTP /initrd.gz");
        assert_eq!(
            whats[6],
            "HTTP /initrd.gz to the OS's own DHCP (kernel start and boot)"
        );
        assert_eq!(whats[7], "DHCP DISCOVER to ACK");
        // os.userspace came after the OS's DHCP: already counted.
        assert_eq!(whats[8], "DHCP ACK to phone-home");
        assert_eq!((spans[8].start_ms, spans[8].end_ms), (8_100, 9_500));
        for pair in spans.windows(2) {
            assert!(pair[0].end_ms <= pair[1].start_ms, "overlap: {pair:#?}");
        }
        assert_eq!(
            spans[0].start_ms, 1_000,
            "no firmware span without power-on"
        );
    }

    #[test]
    fn only_the_last_boot_counts() {
        let events = vec![
            ev(1_000, BootStage::DhcpDiscover, ""),
            ev(1_100, BootStage::DhcpAck, ""),
            ev(5_000, BootStage::OsPhoneHome, ""),
            ev(60_000, BootStage::DhcpDiscover, ""),
            ev(60_200, BootStage::DhcpAck, ""),
            ev(61_000, BootStage::HttpScript, "profile x"),
            ev(
                70_000,
                BootStage::OsCustom,
                "os.installed: done from 10.0.0.5",
            ),
        ];
        let spans = boot_spans(&events);
        assert_eq!(spans[0].start_ms, 60_000, "{spans:#?}");
        assert_eq!(
            spans.last().map(|s| s.what.as_str()),
            Some("the iPXE script to os.installed")
        );
    }

    #[test]
    fn a_failed_transfer_closes_its_span() {
        let events = vec![
            ev(0, BootStage::DhcpDiscover, ""),
            ev(10, BootStage::DhcpAck, ""),
            ev(20, BootStage::TftpRequest, "file=missing.efi peer=x"),
            ev(
                30,
                BootStage::TftpError,
                "file=missing.efi peer=x reason=not found",
            ),
            ev(900, BootStage::TftpRequest, "file=other peer=x"),
        ];
        let spans = boot_spans(&events);
        assert_eq!(
            spans.iter().map(|s| s.what.as_str()).collect::<Vec<_>>(),
            [
                "DHCP DISCOVER to ACK",
                "TFTP missing.efi",
                "after TFTP missing.efi, before TFTP other"
            ]
        );
    }

    #[test]
    fn nothing_in_nothing_out() {
        assert!(boot_spans(&[]).is_empty());
        assert!(cut(&[], Some(0)).is_empty());
    }
}
