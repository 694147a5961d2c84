//! The oracle: one state machine per client MAC over three kinds of evidence (the server's
//! BootEvents, the serial console, the packets on the wire). Expected stages are satisfied by
//! evidence within their deadlines; evidence that rules success out fails the machine at once.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pxed::events::BootEvent;
use pxed::mac::MacAddr;
use pxed::stage::BootStage;
use serde::Serialize;

use crate::payload::{FAIL_MARKER, STAGE_MARKER};
use crate::wire::WireEvidence;

/// Console lines kept for a failure report.
pub const CONSOLE_TAIL: usize = 30;
/// Events and packet summaries kept per machine; a boot has far fewer interesting ones.
const EVIDENCE_KEPT: usize = 2000;

/// A stage the lab expects, with its deadline counted from power-on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Expectation {
    /// The stage.
    pub stage: BootStage,
    /// The deadline after power-on (already scaled for the accelerator).
    #[serde(with = "crate::report::duration_ms")]
    pub within: Duration,
}

/// Console text that means the boot has failed, whatever comes next.
pub struct FailurePattern {
    /// The name a lab file uses to tolerate it (`[oracle] tolerate = ["console.pxe-error"]`).
    pub name: &'static str,
    /// The text to look for.
    pub needle: &'static str,
    /// The stage it is charged to, if one is obvious.
    pub stage: Option<BootStage>,
}

/// What the firmware, iPXE, the kernel and our test OS print when they give up.
pub const FAILURE_PATTERNS: &[FailurePattern] = &[
    FailurePattern {
        name: "console.kernel-panic",
        needle: "Kernel panic",
        stage: Some(BootStage::OsUserspace),
    },
    FailurePattern {
        name: "console.ipxe-no-more-devices",
        needle: "No more network devices",
        stage: None,
    },
    FailurePattern {
        name: "console.pxe-error",
        needle: "PXE-E",
        stage: None,
    },
    FailurePattern {
        name: "console.no-bootable-device",
        needle: "No bootable device",
        stage: None,
    },
    FailurePattern {
        name: "console.test-os-failed",
        needle: FAIL_MARKER,
        stage: None,
    },
];

/// Where a piece of evidence came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// The server's BootEvent stream.
    Event,
    /// The serial console.
    Console,
    /// The packet capture.
    Wire,
    /// The QEMU process.
    Qemu,
}

/// The first time a stage was seen.
#[derive(Clone, Debug, Serialize)]
pub struct StageHit {
    /// Milliseconds since power-on.
    pub at_ms: u64,
    /// Every kind of evidence that showed it.
    pub sources: BTreeSet<Source>,
    /// What the first evidence said.
    pub detail: String,
}

/// The oracle's conclusion for one machine.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "verdict", rename_all = "lowercase")]
pub enum Verdict {
    /// Still waiting for evidence.
    Running,
    /// Every expected stage was seen in time.
    Passed,
    /// Something ruled success out, or a deadline passed.
    Failed {
        /// The stage that failed (the first expected stage not reached, if none is obvious).
        stage: Option<BootStage>,
        /// Why, in one sentence.
        reason: String,
        /// Milliseconds after power-on.
        at_ms: u64,
    },
}

/// One line of a machine's merged timeline.
#[derive(Clone, Debug, Serialize)]
pub struct TimelineEntry {
    /// Milliseconds since power-on.
    pub at_ms: u64,
    /// Where it came from.
    pub source: Source,
    /// The stage it proves, if any.
    pub stage: Option<BootStage>,
    /// What it said.
    pub text: String,
}

/// The state machine for one client.
pub struct MachineOracle {
    /// The client's MAC.
    pub mac: MacAddr,
    expected: Vec<Expectation>,
    tolerate: BTreeSet<String>,
    power_on: SystemTime,
    reached: BTreeMap<BootStage, StageHit>,
    console_tail: VecDeque<String>,
    events: Vec<BootEvent>,
    wire: Vec<WireEvidence>,
    timeline: Vec<TimelineEntry>,
    verdict: Verdict,
}

impl MachineOracle {
    /// An oracle for `mac` powered on at `power_on`; `tolerate` names failure stages or
    /// console patterns that must not fail the run (e.g. `tftp.error` for pxelinux's probing).
    pub fn new(
        mac: MacAddr,
        expected: Vec<Expectation>,
        tolerate: impl IntoIterator<Item = String>,
        power_on: SystemTime,
    ) -> Self {
        MachineOracle {
            mac,
            expected,
            tolerate: tolerate.into_iter().collect(),
            power_on,
            reached: BTreeMap::new(),
            console_tail: VecDeque::new(),
            events: Vec::new(),
            wire: Vec::new(),
            timeline: Vec::new(),
            verdict: Verdict::Running,
        }
    }

    fn since(&self, at: SystemTime) -> u64 {
        at.duration_since(self.power_on)
            .unwrap_or_default()
            .as_millis() as u64
    }

    /// The verdict so far.
    pub fn verdict(&self) -> &Verdict {
        &self.verdict
    }

    /// The expected stages.
    pub fn expected(&self) -> &[Expectation] {
        &self.expected
    }

    /// Every stage seen so far, with the first time it was seen.
    pub fn reached(&self) -> &BTreeMap<BootStage, StageHit> {
        &self.reached
    }

    /// The last console lines.
    pub fn console_tail(&self) -> Vec<String> {
        self.console_tail.iter().cloned().collect()
    }

    /// The server events for this machine.
    pub fn events(&self) -> &[BootEvent] {
        &self.events
    }

    /// Packet summaries for this machine.
    pub fn wire(&self) -> &[WireEvidence] {
        &self.wire
    }

    /// The merged timeline.
    pub fn timeline(&self) -> &[TimelineEntry] {
        &self.timeline
    }

    /// A server event about this machine.
    pub fn on_event(&mut self, ev: &BootEvent) -> Vec<(BootStage, u64)> {
        let at = UNIX_EPOCH + Duration::from_millis(ev.at_ms);
        if self.events.len() < EVIDENCE_KEPT {
            self.events.push(ev.clone());
        }
        let new = self.hit(ev.stage, at, Source::Event, &ev.detail);
        if ev.stage.is_failure() && ev.stage != BootStage::DhcpNak {
            self.fail_unless_tolerated(
                ev.stage.as_str(),
                Some(ev.stage),
                format!("server event {} {}", ev.stage, ev.detail),
                at,
            );
        }
        new
    }

    /// A packet about this machine.
    pub fn on_wire(&mut self, ev: &WireEvidence) -> Vec<(BootStage, u64)> {
        if self.wire.len() < EVIDENCE_KEPT {
            self.wire.push(ev.clone());
        }
        let Some(stage) = ev.stage else {
            self.push_timeline(ev.at, Source::Wire, None, &ev.summary);
            return Vec::new();
        };
        let new = self.hit(stage, ev.at, Source::Wire, &ev.summary);
        if stage.is_failure() && stage != BootStage::DhcpNak {
            self.fail_unless_tolerated(
                stage.as_str(),
                Some(stage),
                format!("on the wire: {}", ev.summary),
                ev.at,
            );
        }
        new
    }

    /// A console line of this machine.
    pub fn on_console(&mut self, at: SystemTime, line: &str) -> Vec<(BootStage, u64)> {
        if self.console_tail.len() >= CONSOLE_TAIL {
            self.console_tail.pop_front();
        }
        self.console_tail.push_back(line.to_string());
        let mut new = Vec::new();
        let stage = if line.contains("Linux version ") {
            Some(BootStage::OsKernel)
        } else {
            line.find(STAGE_MARKER)
                .and_then(|i| line.get(i + STAGE_MARKER.len()..))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|name| name.parse().ok())
        };
        match stage {
            Some(s) => new = self.hit(s, at, Source::Console, line),
            None => self.push_timeline(at, Source::Console, None, line),
        }
        if let Some(p) = FAILURE_PATTERNS.iter().find(|p| line.contains(p.needle)) {
            self.fail_unless_tolerated(p.name, p.stage, format!("console: {line}"), at);
        }
        new
    }

    /// QEMU exited. Before every expected stage was seen, that is a failure.
    pub fn on_exit(&mut self, at: SystemTime, status: &str) {
        self.push_timeline(at, Source::Qemu, None, &format!("QEMU exited: {status}"));
        self.settle(at);
        if self.verdict == Verdict::Running {
            let missing = self.first_missing();
            self.fail(
                missing,
                format!(
                    "QEMU exited ({status}) before {}",
                    missing.map(|s| s.as_str()).unwrap_or("the end")
                ),
                at,
            );
        }
    }

    /// Check deadlines at `now`.
    pub fn tick(&mut self, now: SystemTime) {
        if self.verdict != Verdict::Running {
            return;
        }
        let elapsed = now.duration_since(self.power_on).unwrap_or_default();
        if let Some(late) = self
            .expected
            .iter()
            .find(|e| match self.reached.get(&e.stage) {
                Some(hit) => hit.at_ms > e.within.as_millis() as u64,
                None => elapsed > e.within,
            })
            .cloned()
        {
            self.fail(
                Some(late.stage),
                format!(
                    "{} not reached within {:.1}s of power-on",
                    late.stage,
                    late.within.as_secs_f64()
                ),
                now,
            );
        }
    }

    fn first_missing(&self) -> Option<BootStage> {
        self.expected
            .iter()
            .find(|e| !self.reached.contains_key(&e.stage))
            .map(|e| e.stage)
    }

    fn push_timeline(
        &mut self,
        at: SystemTime,
        source: Source,
        stage: Option<BootStage>,
        text: &str,
    ) {
        if self.timeline.len() < EVIDENCE_KEPT {
            let at_ms = self.since(at);
            self.timeline.push(TimelineEntry {
                at_ms,
                source,
                stage,
                text: text.to_string(),
            });
        }
    }

    fn hit(
        &mut self,
        stage: BootStage,
        at: SystemTime,
        source: Source,
        detail: &str,
    ) -> Vec<(BootStage, u64)> {
        self.push_timeline(at, source, Some(stage), detail);
        let at_ms = self.since(at);
        let mut new = Vec::new();
        match self.reached.get_mut(&stage) {
            Some(h) => {
                h.sources.insert(source);
                if at_ms < h.at_ms {
                    h.at_ms = at_ms;
                }
            }
            None => {
                self.reached.insert(
                    stage,
                    StageHit {
                        at_ms,
                        sources: [source].into(),
                        detail: detail.to_string(),
                    },
                );
                new.push((stage, at_ms));
            }
        }
        self.settle(at);
        new
    }

    fn settle(&mut self, at: SystemTime) {
        if self.verdict != Verdict::Running {
            return;
        }
        let all = self.expected.iter().all(|e| {
            self.reached
                .get(&e.stage)
                .is_some_and(|h| h.at_ms <= e.within.as_millis() as u64)
        });
        if all {
            self.verdict = Verdict::Passed;
        } else {
            self.tick(at);
        }
    }

    fn fail_unless_tolerated(
        &mut self,
        name: &str,
        stage: Option<BootStage>,
        reason: String,
        at: SystemTime,
    ) {
        if self.tolerate.contains(name) {
            return;
        }
        let stage = stage.or_else(|| self.first_missing());
        self.fail(stage, reason, at);
    }

    fn fail(&mut self, stage: Option<BootStage>, reason: String, at: SystemTime) {
        if self.verdict == Verdict::Running {
            self.verdict = Verdict::Failed {
                stage,
                reason,
                at_ms: self.since(at),
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn oracle(t0: SystemTime) -> MachineOracle {
        let exp = |s: BootStage, secs| Expectation {
            stage: s,
            within: Duration::from_secs(secs),
        };
        MachineOracle::new(
            MacAddr([0x52, 0x54, 0, 0, 0, 1]),
            vec![
                exp(BootStage::DhcpAck, 10),
                exp(BootStage::TftpComplete, 20),
                exp(BootStage::OsUserspace, 60),
            ],
            Vec::new(),
            t0,
        )
    }

    fn wire(at: SystemTime, stage: BootStage) -> WireEvidence {
        WireEvidence {
            at,
            mac: MacAddr([0x52, 0x54, 0, 0, 0, 1]),
            stage: Some(stage),
            summary: stage.to_string(),
        }
    }

    #[test]
    fn passes_when_every_stage_is_seen_in_time() {
        let t0 = SystemTime::now();
        let mut o = oracle(t0);
        o.on_wire(&wire(t0 + Duration::from_secs(2), BootStage::DhcpAck));
        o.on_wire(&wire(t0 + Duration::from_secs(5), BootStage::TftpComplete));
        assert_eq!(o.verdict(), &Verdict::Running);
        let new = o.on_console(t0 + Duration::from_secs(9), "PXELAB-STAGE os.userspace");
        assert_eq!(new, vec![(BootStage::OsUserspace, 9000)]);
        assert_eq!(o.verdict(), &Verdict::Passed);
        // Exiting after success changes nothing.
        o.on_exit(t0 + Duration::from_secs(10), "exit status: 0");
        assert_eq!(o.verdict(), &Verdict::Passed);
    }

    #[test]
    fn tftp_error_fails_at_once_unless_tolerated() {
        let t0 = SystemTime::now();
        let mut o = oracle(t0);
        o.on_wire(&wire(t0 + Duration::from_secs(1), BootStage::DhcpAck));
        o.on_wire(&wire(t0 + Duration::from_secs(2), BootStage::TftpError));
        assert!(matches!(
            o.verdict(),
            Verdict::Failed {
                stage: Some(BootStage::TftpError),
                at_ms: 2000,
                ..
            }
        ));
        let mut o = MachineOracle::new(o.mac, o.expected.clone(), ["tftp.error".to_string()], t0);
        o.on_wire(&wire(t0 + Duration::from_secs(2), BootStage::TftpError));
        assert_eq!(o.verdict(), &Verdict::Running);
    }

    #[test]
    fn deadlines_and_console_failures() {
        let t0 = SystemTime::now();
        let mut o = oracle(t0);
        o.tick(t0 + Duration::from_secs(11));
        assert!(matches!(
            o.verdict(),
            Verdict::Failed {
                stage: Some(BootStage::DhcpAck),
                ..
            }
        ));

        let mut o = oracle(t0);
        o.on_wire(&wire(t0, BootStage::DhcpAck));
        o.on_wire(&wire(t0, BootStage::TftpComplete));
        o.on_console(
            t0 + Duration::from_secs(3),
            "[    1.0] Kernel panic - not syncing: VFS",
        );
        assert!(matches!(
            o.verdict(),
            Verdict::Failed {
                stage: Some(BootStage::OsUserspace),
                ..
            }
        ));
        assert_eq!(o.console_tail().len(), 1);

        let mut o = oracle(t0);
        o.on_exit(t0 + Duration::from_secs(1), "exit status: 0");
        assert!(matches!(
            o.verdict(),
            Verdict::Failed {
                stage: Some(BootStage::DhcpAck),
                ..
            }
        ));
    }

    #[test]
    fn late_evidence_does_not_pass() {
        let t0 = SystemTime::now();
        let mut o = oracle(t0);
        o.on_wire(&wire(t0 + Duration::from_secs(12), BootStage::DhcpAck));
        assert!(matches!(o.verdict(), Verdict::Failed { .. }));
    }
}
