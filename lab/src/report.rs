//! Run reports: report.json (everything the oracle knows) and junit.xml (for CI), written to
//! the run directory next to the consoles, pcaps, events and QEMU command lines.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use pxed::events::BootEvent;
use pxed::stage::BootStage;
use serde::Serialize;

use crate::oracle::{MachineOracle, StageHit, TimelineEntry, Verdict};
use crate::wire::PacketCounts;

/// Packet summaries put in a failure report.
const FAILURE_PACKETS: usize = 40;

/// Serde helper: SystemTime as milliseconds since the epoch.
pub mod system_time_ms {
    use std::time::{SystemTime, UNIX_EPOCH};
    /// Serialize.
    pub fn serialize<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64)
    }
}

/// Serde helper: Duration as milliseconds.
pub mod duration_ms {
    use std::time::Duration;
    /// Serialize.
    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }
}

/// One expected stage in the report.
#[derive(Clone, Debug, Serialize)]
pub struct StageReport {
    /// The stage.
    pub stage: BootStage,
    /// Its deadline after power-on.
    pub within_ms: u64,
    /// When it was first seen, if it was.
    pub reached_ms: Option<u64>,
    /// The evidence.
    pub hit: Option<StageHit>,
}

/// What a failed machine left behind.
#[derive(Clone, Debug, Serialize)]
pub struct FailureEvidence {
    /// The last console lines.
    pub console_tail: Vec<String>,
    /// The server's events for the machine.
    pub events: Vec<BootEvent>,
    /// The last packet summaries.
    pub packets: Vec<String>,
    /// What the stage expected.
    pub expected: String,
}

/// One machine's result.
#[derive(Clone, Debug, Serialize)]
pub struct MachineReport {
    /// Its name.
    pub name: String,
    /// Its MAC.
    pub mac: String,
    /// Firmware, NIC and ROM, one line.
    pub hardware: String,
    /// The verdict.
    pub verdict: Verdict,
    /// The expected stages.
    pub stages: Vec<StageReport>,
    /// Every stage seen, expected or not.
    pub seen: std::collections::BTreeMap<BootStage, StageHit>,
    /// Packets seen per protocol.
    pub packets: PacketCounts,
    /// Evidence when it failed.
    pub failure: Option<FailureEvidence>,
    /// The merged timeline.
    pub timeline: Vec<TimelineEntry>,
    /// QEMU's exit, if it exited.
    pub qemu_exit: Option<String>,
}

impl MachineReport {
    /// Build from an oracle's final state.
    pub fn from_oracle(
        name: &str,
        hardware: String,
        oracle: &MachineOracle,
        packets: PacketCounts,
        qemu_exit: Option<String>,
    ) -> Self {
        let stages: Vec<StageReport> = oracle
            .expected()
            .iter()
            .map(|e| {
                let hit = oracle.reached().get(&e.stage).cloned();
                StageReport {
                    stage: e.stage,
                    within_ms: e.within.as_millis() as u64,
                    reached_ms: hit.as_ref().map(|h| h.at_ms),
                    hit,
                }
            })
            .collect();
        let failure = match oracle.verdict() {
            Verdict::Failed { stage, .. } => {
                let expected =
                    match stage.and_then(|s| oracle.expected().iter().find(|e| e.stage == s)) {
                        Some(e) => {
                            format!("{} within {} ms of power-on", e.stage, e.within.as_millis())
                        }
                        None => format!(
                            "no failure evidence; expected stages: {}",
                            oracle
                                .expected()
                                .iter()
                                .map(|e| e.stage.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    };
                let wire = oracle.wire();
                Some(FailureEvidence {
                    console_tail: oracle.console_tail(),
                    events: oracle.events().to_vec(),
                    packets: wire
                        .iter()
                        .skip(wire.len().saturating_sub(FAILURE_PACKETS))
                        .map(|w| w.summary.clone())
                        .collect(),
                    expected,
                })
            }
            _ => None,
        };
        MachineReport {
            name: name.to_string(),
            mac: oracle.mac.to_string(),
            hardware,
            verdict: oracle.verdict().clone(),
            stages,
            seen: oracle.reached().clone(),
            packets,
            failure,
            timeline: oracle.timeline().to_vec(),
            qemu_exit,
        }
    }

    /// True when the machine passed.
    pub fn passed(&self) -> bool {
        self.verdict == Verdict::Passed
    }
}

/// The whole run.
#[derive(Clone, Debug, Serialize)]
pub struct RunReport {
    /// The lab's name.
    pub lab: String,
    /// Where the artifacts are.
    pub run_dir: PathBuf,
    /// kvm or tcg.
    pub accel: String,
    /// Deadline multiplier used.
    pub deadline_scale: f64,
    /// The server kind.
    pub server: String,
    /// The payload used (kernel package and hash).
    pub payload: Option<crate::payload::Payload>,
    /// Total run time.
    pub duration_ms: u64,
    /// Every machine.
    pub machines: Vec<MachineReport>,
    /// A harness error that stopped the run, if any.
    pub error: Option<String>,
}

impl RunReport {
    /// True when every machine passed and the harness had no error.
    pub fn passed(&self) -> bool {
        self.error.is_none()
            && !self.machines.is_empty()
            && self.machines.iter().all(|m| m.passed())
    }

    /// Write report.json and junit.xml into the run directory.
    pub fn write(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::write(dir.join("report.json"), serde_json::to_string_pretty(self)?)?;
        std::fs::write(dir.join("junit.xml"), self.junit())?;
        Ok(())
    }

    /// A JUnit XML document: one test case per machine.
    pub fn junit(&self) -> String {
        let failures = self.machines.iter().filter(|m| !m.passed()).count();
        let mut x = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
        let _ = writeln!(
            x,
            "<testsuite name=\"{}\" tests=\"{}\" failures=\"{}\" errors=\"{}\" time=\"{:.3}\">",
            xml(&self.lab),
            self.machines.len(),
            failures,
            usize::from(self.error.is_some()),
            self.duration_ms as f64 / 1000.0
        );
        for m in &self.machines {
            let time = m
                .stages
                .iter()
                .filter_map(|s| s.reached_ms)
                .max()
                .unwrap_or(0) as f64
                / 1000.0;
            let _ = write!(
                x,
                "  <testcase classname=\"pxelab.{}\" name=\"{}\" time=\"{time:.3}\">",
                xml(&self.lab),
                xml(&m.name)
            );
            if let Verdict::Failed { stage, reason, .. } = &m.verdict {
                let stage = stage.map(|s| s.as_str()).unwrap_or("-");
                let body = m
                    .failure
                    .as_ref()
                    .map(|f| f.console_tail.join("\n"))
                    .unwrap_or_default();
                let _ = write!(
                    x,
                    "\n    <failure message=\"{}: {}\">{}</failure>\n  ",
                    xml(stage),
                    xml(reason),
                    xml(&body)
                );
            }
            x.push_str("</testcase>\n");
        }
        if let Some(err) = &self.error {
            let _ = writeln!(
                x,
                "  <testcase classname=\"pxelab.{}\" name=\"harness\"><error message=\"{}\"/></testcase>",
                xml(&self.lab),
                xml(err)
            );
        }
        x.push_str("</testsuite>\n");
        x
    }

    /// A human summary: one block per machine.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "lab `{}`: {} ({} ms, {}, artifacts in {})",
            self.lab,
            if self.passed() { "PASSED" } else { "FAILED" },
            self.duration_ms,
            self.accel,
            self.run_dir.display()
        );
        if let Some(e) = &self.error {
            let _ = writeln!(s, "  harness error: {e}");
        }
        for m in &self.machines {
            let _ = writeln!(s, "  {} ({}, {}):", m.name, m.mac, m.hardware);
            for st in &m.stages {
                match st.reached_ms {
                    Some(ms) => {
                        let _ = writeln!(
                            s,
                            "    {:<16} {:>8.2} s",
                            st.stage.as_str(),
                            ms as f64 / 1000.0
                        );
                    }
                    None => {
                        let _ = writeln!(
                            s,
                            "    {:<16}        - (within {:.0} s)",
                            st.stage.as_str(),
                            st.within_ms as f64 / 1000.0
                        );
                    }
                }
            }
            let phases = crate::breakdown::breakdown(&m.timeline);
            if !phases.is_empty() {
                let _ = writeln!(s, "    where the time went:");
                s.push_str(&crate::breakdown::render(&phases));
            }
            if let Verdict::Failed {
                stage,
                reason,
                at_ms,
            } = &m.verdict
            {
                let _ = writeln!(
                    s,
                    "    FAILED at {:.2} s, stage {}: {reason}",
                    *at_ms as f64 / 1000.0,
                    stage.map(|x| x.as_str()).unwrap_or("-")
                );
                if let Some(f) = &m.failure {
                    let _ = writeln!(s, "    expected: {}", f.expected);
                    for p in &f.packets {
                        let _ = writeln!(s, "    wire| {p}");
                    }
                    for l in &f.console_tail {
                        let _ = writeln!(s, "    console| {l}");
                    }
                }
            }
        }
        s
    }
}

fn xml(s: &str) -> String {
    s.chars()
        .filter(|&c| c == '\n' || c == '\t' || c >= ' ')
        .map(|c| match c {
            '&' => "&amp;".to_string(),
            '<' => "&lt;".to_string(),
            '>' => "&gt;".to_string(),
            '"' => "&quot;".to_string(),
            c => c.to_string(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xml_escapes() {
        assert_eq!(xml("a<b & \"c\"\u{1b}"), "a&lt;b &amp; &quot;c&quot;");
    }
}
