//! Where the seconds of a boot went, from the lab's side: a machine's merged timeline
//! (packets, console, server events) turned into milestones and cut into named spans by
//! [`pxed::timeline::cut`], the same cutter pxed uses for its API and dashboard. Power-on is
//! time 0 here, so the lab also names the firmware's start. `pxelab run` prints the spans so
//! that a slow boot explains itself.

use std::fmt::Write;

use pxed::stage::BootStage;
use pxed::timeline::{Mark, Milestone, Span, SpanKind, cut};

use crate::oracle::{Source, TimelineEntry};

/// The milestone a timeline entry is: DHCP and transfers from the capture, the kernel,
/// userspace and phone-home from the console or pxed.
fn milestone(e: &TimelineEntry) -> Option<Milestone> {
    let t = e.text.as_str();
    let first_word = |rest: &str| rest.split_whitespace().next().unwrap_or("?").to_string();
    match e.source {
        Source::Wire => Some(if t.starts_with("DHCP DISCOVER") {
            Milestone::DhcpStart
        } else if t.starts_with("DHCP ACK") {
            Milestone::DhcpEnd("ACK".into())
        } else if let Some(rest) = t.strip_prefix("TFTP RRQ ") {
            Milestone::TransferStart {
                what: format!("TFTP {}", first_word(rest)),
                until_next: false,
            }
        } else if let Some(rest) = t.strip_prefix("TFTP complete ") {
            Milestone::TransferEnd(Some(format!("TFTP {rest}")))
        } else if let Some(rest) = t.strip_prefix("HTTP GET ") {
            // The capture has no end for an HTTP transfer: it ends at the next milestone.
            Milestone::TransferStart {
                what: format!("HTTP {}", first_word(rest)),
                until_next: true,
            }
        } else {
            Milestone::Activity
        }),
        _ => match e.stage {
            Some(BootStage::OsKernel) => Some(Milestone::Kernel),
            Some(BootStage::OsUserspace) => Some(Milestone::Userspace),
            Some(s @ (BootStage::OsPhoneHome | BootStage::OsCustom)) => Some(Milestone::Reported(
                s.as_str().trim_start_matches("os.").into(),
            )),
            _ => None,
        },
    }
}

/// Cut a timeline into spans (ms after power-on). Pure; the timeline need not be sorted.
pub fn breakdown(timeline: &[TimelineEntry]) -> Vec<Span> {
    let marks: Vec<Mark> = timeline
        .iter()
        .filter_map(|e| {
            milestone(e).map(|milestone| Mark {
                at_ms: e.at_ms,
                milestone,
                on_wire: e.source == Source::Wire,
            })
        })
        .collect();
    cut(&marks, Some(0))
}

/// The spans as text lines (for `pxelab run`), with the total of the waits.
pub fn render(spans: &[Span]) -> String {
    let mut s = String::new();
    let total_wait: u64 = spans
        .iter()
        .filter(|p| p.kind == SpanKind::Wait)
        .map(Span::ms)
        .sum();
    for p in spans {
        let _ = writeln!(
            s,
            "      {:>7.2} s  +{:>6.2} s  {:<12} {}",
            p.start_ms as f64 / 1000.0,
            p.ms() as f64 / 1000.0,
            p.kind.as_str(),
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
        let kinds: Vec<SpanKind> = p.iter().map(|p| p.kind).collect();
        assert_eq!(
            kinds,
            vec![
                SpanKind::Firmware,
                SpanKind::Dhcp,
                SpanKind::Wait,
                SpanKind::Transfer,
                SpanKind::Transfer,
                SpanKind::KernelStart,
                SpanKind::KernelBoot,
                SpanKind::Userspace,
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
            .filter(|p| p.kind == SpanKind::Transfer)
            .map(|p| p.what.as_str())
            .collect();
        assert_eq!(http, vec!["HTTP /boot.ipxe", "HTTP /vmlinuz?mac=x"]);
        assert!(p.iter().all(|p| p.kind != SpanKind::Wait), "{p:?}");
    }

    #[test]
    fn empty_timeline_has_no_phases() {
        assert!(breakdown(&[]).is_empty());
    }
}
