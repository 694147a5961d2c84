//! The `BootEvent` stream: every decision pxed makes about a client, in one typed stream that
//! feeds the log (tracing), the JSON event file, the HTTP API, the dashboard and the lab.

use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::mac::MacAddr;
use crate::stage::BootStage;

/// Events kept per machine for the API and dashboard; older ones are dropped first.
pub const HISTORY_PER_MACHINE: usize = 256;
/// Machines remembered; the least recently seen is forgotten first.
pub const MACHINES_REMEMBERED: usize = 4096;
/// Events buffered per live subscriber before a slow one starts missing events.
pub const SUBSCRIBER_BUFFER: usize = 4096;

/// One thing that happened to one client.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootEvent {
    /// The client's hardware address.
    pub mac: MacAddr,
    /// Which stage.
    pub stage: BootStage,
    /// Human-readable detail: the file, the reason, the address.
    pub detail: String,
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
}

impl BootEvent {
    /// An event stamped with the current wall-clock time.
    pub fn now(mac: MacAddr, stage: BootStage, detail: impl Into<String>) -> Self {
        let at_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        BootEvent {
            mac,
            stage,
            detail: detail.into(),
            at_ms,
        }
    }
}

#[derive(Default)]
struct History {
    per_machine: HashMap<MacAddr, VecDeque<BootEvent>>,
    order: VecDeque<MacAddr>,
}

/// The publishing side of the stream. Cheap to clone; every server task holds one.
#[derive(Clone)]
pub struct EventBus {
    tx: broadcast::Sender<BootEvent>,
    history: Arc<Mutex<History>>,
    file: Option<Arc<Mutex<std::fs::File>>>,
}

impl Default for EventBus {
    fn default() -> Self {
        Self::new()
    }
}

impl EventBus {
    /// A bus with no event file.
    pub fn new() -> Self {
        let (tx, _) = broadcast::channel(SUBSCRIBER_BUFFER);
        EventBus {
            tx,
            history: Arc::default(),
            file: None,
        }
    }

    /// A bus that also appends every event as one JSON line to `path` (the lab reads it).
    pub fn with_file(path: &Path) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        let mut bus = Self::new();
        bus.file = Some(Arc::new(Mutex::new(file)));
        Ok(bus)
    }

    /// Publish one event to the log, the file, the history and every subscriber.
    pub fn publish(&self, event: BootEvent) {
        tracing::info!(
            target: "pxed::event",
            mac = %event.mac,
            stage = %event.stage,
            detail = %event.detail,
            "{} {}",
            event.stage,
            event.detail
        );
        if let Some(file) = &self.file
            && let Ok(line) = serde_json::to_string(&event)
            && let Ok(mut f) = file.lock()
        {
            // A full disk must not stop the server from booting machines; the log has it.
            if let Err(err) = writeln!(f, "{line}") {
                tracing::warn!(%err, "cannot append to the event file");
            }
        }
        if let Ok(mut h) = self.history.lock() {
            if !h.per_machine.contains_key(&event.mac) {
                if h.order.len() >= MACHINES_REMEMBERED
                    && let Some(old) = h.order.pop_front()
                {
                    h.per_machine.remove(&old);
                }
                h.order.push_back(event.mac);
            }
            let list = h.per_machine.entry(event.mac).or_default();
            if list.len() >= HISTORY_PER_MACHINE {
                list.pop_front();
            }
            list.push_back(event.clone());
        }
        // No subscriber is not an error: nobody is watching right now.
        let _ = self.tx.send(event);
    }

    /// Shorthand for `publish(BootEvent::now(..))`.
    pub fn emit(&self, mac: MacAddr, stage: BootStage, detail: impl Into<String>) {
        self.publish(BootEvent::now(mac, stage, detail));
    }

    /// A live feed of events published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<BootEvent> {
        self.tx.subscribe()
    }

    /// The recent events of one machine, oldest first.
    pub fn timeline(&self, mac: &MacAddr) -> Vec<BootEvent> {
        self.history
            .lock()
            .map(|h| {
                h.per_machine
                    .get(mac)
                    .map(|l| l.iter().cloned().collect())
                    .unwrap_or_default()
            })
            .unwrap_or_default()
    }

    /// Every machine seen, in the order first seen.
    pub fn machines(&self) -> Vec<MacAddr> {
        self.history
            .lock()
            .map(|h| h.order.iter().copied().collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_is_bounded_and_ordered() {
        let bus = EventBus::new();
        let mac = MacAddr([2, 0, 0, 0, 0, 1]);
        for i in 0..(HISTORY_PER_MACHINE + 10) {
            bus.emit(mac, BootStage::TftpRequest, format!("{i}"));
        }
        let t = bus.timeline(&mac);
        assert_eq!(t.len(), HISTORY_PER_MACHINE);
        assert_eq!(t[0].detail, "10");
        assert_eq!(bus.machines(), vec![mac]);
    }

    #[test]
    fn file_gets_json_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        let bus = EventBus::with_file(&path).unwrap();
        let mac = MacAddr([2, 0, 0, 0, 0, 2]);
        bus.emit(mac, BootStage::DhcpAck, "10.0.0.5");
        let text = std::fs::read_to_string(&path).unwrap();
        let ev: BootEvent = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(ev.stage, BootStage::DhcpAck);
        assert_eq!(ev.mac, mac);
    }
}
