//! LabSwitch: a userspace Ethernet switch inside the harness. QEMU NICs attach over unix
//! sockets (`-netdev stream`, each frame preceded by its 4-byte big-endian length); the lab's
//! server attaches through a TAP device in the lab's namespace. The switch learns MACs, floods
//! broadcast and unknown destinations, records pcaps (one per port, one for the whole lab), runs
//! a per-port [`FrameFilter`] for impairments and firmware quirks, and hands every switched frame
//! to an observer (the oracle).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};

use crate::netns::poll_readable;
use crate::pcap::PcapWriter;

/// The largest frame a port accepts: QEMU's stream netdev never sends more than 64 KiB.
pub const MAX_FRAME: usize = 65_536;
/// The smallest frame worth switching: an Ethernet header.
const MIN_FRAME: usize = 14;
/// MAC table entries; a lab has a handful of machines, more means a runaway client.
const MAC_TABLE_LIMIT: usize = 4096;
/// How often blocked reader threads look at the stop flag.
const POLL_MS: i32 = 100;
/// A port that cannot take a frame for this long is treated as gone (QEMU stopped reading).
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// A port's index in the switch.
pub type PortId = usize;

/// Which way a frame crosses a port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// From the attached device into the switch.
    Ingress,
    /// From the switch out to the attached device.
    Egress,
}

/// A per-port hook for impairments and quirks: it may drop, delay, rewrite or duplicate frames.
pub trait FrameFilter: Send {
    /// Return the frames to pass on, each with the delay before it is passed.
    fn on_frame(
        &mut self,
        dir: Direction,
        frame: Vec<u8>,
        now: Instant,
    ) -> Vec<(Duration, Vec<u8>)>;
}

/// The default filter: every frame passes at once, unchanged.
pub struct PassThrough;

impl FrameFilter for PassThrough {
    fn on_frame(&mut self, _: Direction, frame: Vec<u8>, _: Instant) -> Vec<(Duration, Vec<u8>)> {
        vec![(Duration::ZERO, frame)]
    }
}

/// Filters stacked on one port, listed from the attached device outwards: a frame the device
/// sends passes them first to last, a frame to the device last to first. So a firmware quirk
/// (next to the device) sees what the device really sends and receives, and link impairments
/// (outside it) act on the wire.
pub struct Chain(pub Vec<Box<dyn FrameFilter>>);

impl FrameFilter for Chain {
    fn on_frame(
        &mut self,
        dir: Direction,
        frame: Vec<u8>,
        now: Instant,
    ) -> Vec<(Duration, Vec<u8>)> {
        let mut frames = vec![(Duration::ZERO, frame)];
        let mut apply = |f: &mut Box<dyn FrameFilter>| {
            frames = std::mem::take(&mut frames)
                .into_iter()
                .flat_map(|(d, fr)| {
                    f.on_frame(dir, fr, now + d)
                        .into_iter()
                        .map(move |(d2, out)| (d + d2, out))
                })
                .collect();
        };
        match dir {
            Direction::Ingress => self.0.iter_mut().for_each(&mut apply),
            Direction::Egress => self.0.iter_mut().rev().for_each(&mut apply),
        }
        frames
    }
}

/// A frame as switched (after the ingress port's filter), for the oracle.
#[derive(Clone, Debug)]
pub struct Observed {
    /// When the switch forwarded it.
    pub at: SystemTime,
    /// The port it came in on.
    pub port: PortId,
    /// The Ethernet frame.
    pub frame: Vec<u8>,
}

#[derive(Clone, Debug, Default)]
struct PortState {
    name: String,
    connected: bool,
    disconnected: bool,
}

#[derive(Default)]
struct Shared {
    ports: Mutex<Vec<PortState>>,
    changed: Condvar,
}

impl Shared {
    fn update(&self, port: PortId, f: impl FnOnce(&mut PortState)) {
        if let Ok(mut ports) = self.ports.lock() {
            if let Some(p) = ports.get_mut(port) {
                f(p);
            }
            self.changed.notify_all();
        }
    }
}

enum Writer {
    Stream(UnixStream),
    Tap(File),
}

impl Writer {
    fn send(&mut self, frame: &[u8]) -> std::io::Result<()> {
        match self {
            Writer::Stream(s) => {
                let mut buf = Vec::with_capacity(frame.len() + 4);
                buf.extend_from_slice(&(frame.len() as u32).to_be_bytes());
                buf.extend_from_slice(frame);
                s.write_all(&buf)
            }
            Writer::Tap(f) => f.write_all(frame),
        }
    }
}

enum Msg {
    AddPort {
        filter: Box<dyn FrameFilter>,
        pcap: PcapWriter,
    },
    Attach(PortId, Writer),
    Detach(PortId),
    Frame(PortId, Vec<u8>),
}

/// The lab's switch. Dropping it stops its threads and flushes the pcaps.
pub struct LabSwitch {
    dir: PathBuf,
    tx: Sender<Msg>,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl LabSwitch {
    /// Start a switch that keeps its sockets and pcaps in `dir` (`lab.pcap` for all traffic)
    /// and sends every switched frame to `observer`.
    pub fn start(dir: &Path, observer: Option<Sender<Observed>>) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let lab_pcap = PcapWriter::create(&dir.join("lab.pcap"))?;
        let (tx, rx) = mpsc::channel();
        let shared = Arc::new(Shared::default());
        let stop = Arc::new(AtomicBool::new(false));
        let core = Core {
            ports: Vec::new(),
            macs: HashMap::new(),
            lab_pcap,
            observer,
            shared: shared.clone(),
            queue: BinaryHeap::new(),
            seq: 0,
        };
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("labswitch".into())
            .spawn(move || core.run(rx, stop2))?;
        Ok(LabSwitch {
            dir: dir.to_path_buf(),
            tx,
            shared,
            stop,
            threads: vec![thread],
        })
    }

    fn new_port(&mut self, name: &str, filter: Box<dyn FrameFilter>) -> Result<PortId> {
        let pcap = PcapWriter::create(&self.dir.join(format!("{name}.pcap")))?;
        let id = {
            let mut ports = self.shared.ports.lock().map_err(|_| poisoned())?;
            ports.push(PortState {
                name: name.to_string(),
                ..PortState::default()
            });
            ports.len() - 1
        };
        self.tx
            .send(Msg::AddPort { filter, pcap })
            .map_err(|_| anyhow::anyhow!("the switch thread stopped"))?;
        Ok(id)
    }

    /// A port for a QEMU NIC: returns the unix socket path to give QEMU
    /// (`-netdev stream,server=off,addr.type=unix,addr.path=<path>`). It listens at once, because
    /// QEMU 7.2 connects only once and never retries.
    pub fn add_stream_port(
        &mut self,
        name: &str,
        filter: Box<dyn FrameFilter>,
    ) -> Result<(PortId, PathBuf)> {
        let path = self.dir.join(format!("{name}.sock"));
        let _ = std::fs::remove_file(&path);
        let listener =
            UnixListener::bind(&path).with_context(|| format!("binding {}", path.display()))?;
        let id = self.new_port(name, filter)?;
        let tx = self.tx.clone();
        let stop = self.stop.clone();
        let shared = self.shared.clone();
        let t = std::thread::Builder::new()
            .name(format!("port-{name}"))
            .spawn(move || stream_port(id, listener, tx, stop, shared))?;
        self.threads.push(t);
        Ok((id, path))
    }

    /// A port for a TAP device (the uplink to the server's namespace).
    pub fn add_tap_port(
        &mut self,
        name: &str,
        tap: File,
        filter: Box<dyn FrameFilter>,
    ) -> Result<PortId> {
        let id = self.new_port(name, filter)?;
        let writer = crate::netns::dup_file(&tap)?;
        self.tx
            .send(Msg::Attach(id, Writer::Tap(writer)))
            .map_err(|_| anyhow::anyhow!("the switch thread stopped"))?;
        self.shared.update(id, |p| p.connected = true);
        let tx = self.tx.clone();
        let stop = self.stop.clone();
        let t = std::thread::Builder::new()
            .name(format!("port-{name}"))
            .spawn(move || tap_port(id, tap, tx, stop))?;
        self.threads.push(t);
        Ok(id)
    }

    /// Wait until something attached to `port`, or fail after `timeout`.
    pub fn wait_connected(&self, port: PortId, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut ports = self.shared.ports.lock().map_err(|_| poisoned())?;
        loop {
            let Some(state) = ports.get(port) else {
                bail!("no port {port}");
            };
            if state.connected {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                bail!(
                    "nothing connected to switch port `{}` within {timeout:?}",
                    state.name
                );
            }
            ports = self
                .shared
                .changed
                .wait_timeout(ports, deadline - now)
                .map_err(|_| poisoned())?
                .0;
        }
    }

    /// True once the device on `port` has hung up.
    pub fn disconnected(&self, port: PortId) -> bool {
        self.shared
            .ports
            .lock()
            .ok()
            .and_then(|p| p.get(port).map(|s| s.disconnected))
            .unwrap_or(true)
    }

    /// The port's name.
    pub fn port_name(&self, port: PortId) -> Option<String> {
        self.shared
            .ports
            .lock()
            .ok()
            .and_then(|p| p.get(port).map(|s| s.name.clone()))
    }

    /// Stop the threads and flush the captures.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for LabSwitch {
    fn drop(&mut self) {
        self.stop();
    }
}

fn poisoned() -> anyhow::Error {
    anyhow::anyhow!("switch state lock poisoned")
}

fn stream_port(
    id: PortId,
    listener: UnixListener,
    tx: Sender<Msg>,
    stop: Arc<AtomicBool>,
    shared: Arc<Shared>,
) {
    let stream = loop {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        match poll_readable(listener.as_raw_fd(), POLL_MS) {
            Ok(true) => match listener.accept() {
                Ok((s, _)) => break s,
                Err(_) => continue,
            },
            Ok(false) => continue,
            Err(_) => return,
        }
    };
    let Ok(writer) = stream.try_clone() else {
        return;
    };
    let _ = writer.set_write_timeout(Some(WRITE_TIMEOUT));
    if tx.send(Msg::Attach(id, Writer::Stream(writer))).is_err() {
        return;
    }
    shared.update(id, |p| p.connected = true);
    let mut stream = stream;
    let mut buf: Vec<u8> = Vec::with_capacity(2 * MAX_FRAME);
    let mut chunk = vec![0u8; MAX_FRAME];
    'outer: while !stop.load(Ordering::SeqCst) {
        match poll_readable(stream.as_raw_fd(), POLL_MS) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(_) => break,
        }
        let n = match stream.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
        // Each frame is a 4-byte big-endian length followed by that many bytes (QEMU net.c).
        while let Some(len_bytes) = buf.get(..4).and_then(|b| <[u8; 4]>::try_from(b).ok()) {
            let len = u32::from_be_bytes(len_bytes) as usize;
            if len > MAX_FRAME {
                break 'outer;
            }
            let Some(frame) = buf.get(4..4 + len) else {
                break;
            };
            if len >= MIN_FRAME && tx.send(Msg::Frame(id, frame.to_vec())).is_err() {
                break 'outer;
            }
            buf.drain(..4 + len);
        }
    }
    let _ = tx.send(Msg::Detach(id));
    shared.update(id, |p| p.disconnected = true);
}

fn tap_port(id: PortId, mut tap: File, tx: Sender<Msg>, stop: Arc<AtomicBool>) {
    let mut buf = vec![0u8; MAX_FRAME];
    while !stop.load(Ordering::SeqCst) {
        match poll_readable(tap.as_raw_fd(), POLL_MS) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(_) => break,
        }
        match tap.read(&mut buf) {
            Ok(n) if n >= MIN_FRAME => {
                if let Some(frame) = buf.get(..n)
                    && tx.send(Msg::Frame(id, frame.to_vec())).is_err()
                {
                    break;
                }
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
}

struct CorePort {
    writer: Option<Writer>,
    filter: Box<dyn FrameFilter>,
    pcap: PcapWriter,
}

enum Job {
    /// A frame that passed its ingress filter and is ready to be switched.
    Switch(PortId, Vec<u8>),
    /// A frame that passed the egress filter and is ready to leave by a port.
    Deliver(PortId, Vec<u8>),
}

struct Scheduled {
    when: Instant,
    seq: u64,
    job: Job,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.when, self.seq) == (other.when, other.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scheduled {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.when, self.seq).cmp(&(other.when, other.seq))
    }
}

struct Core {
    ports: Vec<CorePort>,
    macs: HashMap<[u8; 6], PortId>,
    lab_pcap: PcapWriter,
    observer: Option<Sender<Observed>>,
    shared: Arc<Shared>,
    queue: BinaryHeap<Reverse<Scheduled>>,
    seq: u64,
}

impl Core {
    fn run(mut self, rx: Receiver<Msg>, stop: Arc<AtomicBool>) {
        while !stop.load(Ordering::SeqCst) {
            let now = Instant::now();
            let wait = self
                .queue
                .peek()
                .map(|Reverse(s)| s.when.saturating_duration_since(now))
                .unwrap_or(Duration::from_millis(POLL_MS as u64))
                .min(Duration::from_millis(POLL_MS as u64));
            match rx.recv_timeout(wait) {
                Ok(msg) => self.handle(msg),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            self.run_due();
        }
        for p in &mut self.ports {
            let _ = p.pcap.flush();
        }
        let _ = self.lab_pcap.flush();
    }

    fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::AddPort { filter, pcap } => self.ports.push(CorePort {
                writer: None,
                filter,
                pcap,
            }),
            Msg::Attach(id, w) => {
                if let Some(p) = self.ports.get_mut(id) {
                    p.writer = Some(w);
                }
            }
            Msg::Detach(id) => {
                if let Some(p) = self.ports.get_mut(id) {
                    p.writer = None;
                }
                self.macs.retain(|_, port| *port != id);
            }
            Msg::Frame(id, frame) => {
                let Some(p) = self.ports.get_mut(id) else {
                    return;
                };
                let now = Instant::now();
                let _ = p.pcap.write_frame(SystemTime::now(), &frame);
                let _ = p.pcap.flush();
                for (delay, f) in p.filter.on_frame(Direction::Ingress, frame, now) {
                    self.schedule(now + delay, Job::Switch(id, f));
                }
            }
        }
    }

    fn schedule(&mut self, when: Instant, job: Job) {
        self.seq += 1;
        self.queue.push(Reverse(Scheduled {
            when,
            seq: self.seq,
            job,
        }));
    }

    fn run_due(&mut self) {
        let now = Instant::now();
        while self.queue.peek().is_some_and(|Reverse(s)| s.when <= now) {
            let Some(Reverse(item)) = self.queue.pop() else {
                break;
            };
            match item.job {
                Job::Switch(from, frame) => self.switch(from, frame, now),
                Job::Deliver(to, frame) => self.deliver(to, &frame),
            }
        }
    }

    fn switch(&mut self, from: PortId, frame: Vec<u8>, now: Instant) {
        let at = SystemTime::now();
        let _ = self.lab_pcap.write_frame(at, &frame);
        let _ = self.lab_pcap.flush();
        let (Some(dst), Some(src)) = (mac_at(&frame, 0), mac_at(&frame, 6)) else {
            return;
        };
        // Learn the source unless it is a group address (those never appear as sources).
        if src[0] & 1 == 0 && (self.macs.len() < MAC_TABLE_LIMIT || self.macs.contains_key(&src)) {
            self.macs.insert(src, from);
        }
        let targets: Vec<PortId> = match self.macs.get(&dst) {
            Some(&port) if dst[0] & 1 == 0 => {
                if port == from {
                    vec![]
                } else {
                    vec![port]
                }
            }
            _ => (0..self.ports.len()).filter(|&p| p != from).collect(),
        };
        for to in targets {
            let Some(p) = self.ports.get_mut(to) else {
                continue;
            };
            if p.writer.is_none() {
                continue;
            }
            for (delay, f) in p.filter.on_frame(Direction::Egress, frame.clone(), now) {
                if delay.is_zero() {
                    self.deliver(to, &f);
                } else {
                    self.schedule(now + delay, Job::Deliver(to, f));
                }
            }
        }
        if let Some(obs) = &self.observer {
            let _ = obs.send(Observed {
                at,
                port: from,
                frame,
            });
        }
    }

    fn deliver(&mut self, to: PortId, frame: &[u8]) {
        let Some(p) = self.ports.get_mut(to) else {
            return;
        };
        let Some(w) = p.writer.as_mut() else {
            return;
        };
        let _ = p.pcap.write_frame(SystemTime::now(), frame);
        let _ = p.pcap.flush();
        if w.send(frame).is_err() {
            p.writer = None;
            self.shared.update(to, |s| s.disconnected = true);
        }
    }
}

fn mac_at(frame: &[u8], offset: usize) -> Option<[u8; 6]> {
    frame.get(offset..offset + 6)?.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(dst: [u8; 6], src: [u8; 6], tag: u8) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&dst);
        f.extend_from_slice(&src);
        f.extend_from_slice(&[0x88, 0xb5]); // local experimental ethertype
        f.extend_from_slice(&[tag; 46]);
        f
    }

    fn send(s: &mut UnixStream, f: &[u8]) {
        s.write_all(&(f.len() as u32).to_be_bytes()).unwrap();
        s.write_all(f).unwrap();
    }

    fn recv(s: &mut UnixStream) -> Vec<u8> {
        let mut len = [0u8; 4];
        s.read_exact(&mut len).unwrap();
        let mut f = vec![0u8; u32::from_be_bytes(len) as usize];
        s.read_exact(&mut f).unwrap();
        f
    }

    fn has_pending(s: &UnixStream) -> bool {
        poll_readable(s.as_raw_fd(), 300).unwrap()
    }

    #[test]
    fn floods_then_learns_and_captures() {
        let dir = tempfile::tempdir().unwrap();
        let (otx, orx) = mpsc::channel();
        let mut sw = LabSwitch::start(dir.path(), Some(otx)).unwrap();
        let mut socks = Vec::new();
        let mut ids = Vec::new();
        for name in ["a", "b", "c"] {
            let (id, path) = sw.add_stream_port(name, Box::new(PassThrough)).unwrap();
            let s = UnixStream::connect(path).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            sw.wait_connected(id, Duration::from_secs(5)).unwrap();
            socks.push(s);
            ids.push(id);
        }
        let (ma, mb) = ([2, 0, 0, 0, 0, 0xa], [2, 0, 0, 0, 0, 0xb]);
        // Unknown destination: flooded to b and c.
        send(&mut socks[0], &frame(mb, ma, 1));
        assert_eq!(recv(&mut socks[1]), frame(mb, ma, 1));
        assert_eq!(recv(&mut socks[2]), frame(mb, ma, 1));
        // b answers a: a is learned, so only a gets it.
        send(&mut socks[1], &frame(ma, mb, 2));
        assert_eq!(recv(&mut socks[0]), frame(ma, mb, 2));
        assert!(!has_pending(&socks[2]));
        // Broadcast goes everywhere but the sender.
        send(&mut socks[2], &frame([0xff; 6], [2, 0, 0, 0, 0, 0xc], 3));
        assert_eq!(recv(&mut socks[0])[14], 3);
        assert_eq!(recv(&mut socks[1])[14], 3);
        let seen: Vec<Observed> = (0..3)
            .map(|_| orx.recv_timeout(Duration::from_secs(5)).unwrap())
            .collect();
        assert_eq!(seen[1].port, ids[1]);
        drop(socks);
        sw.stop();
        // lab.pcap: header + 3 records of 60 bytes.
        let pcap = std::fs::read(dir.path().join("lab.pcap")).unwrap();
        assert_eq!(pcap.len(), 24 + 3 * (16 + 60));
    }

    struct DropAll;
    impl FrameFilter for DropAll {
        fn on_frame(&mut self, _: Direction, _: Vec<u8>, _: Instant) -> Vec<(Duration, Vec<u8>)> {
            vec![]
        }
    }

    struct Tag(u8, Duration);
    impl FrameFilter for Tag {
        fn on_frame(
            &mut self,
            _: Direction,
            mut f: Vec<u8>,
            _: Instant,
        ) -> Vec<(Duration, Vec<u8>)> {
            f.push(self.0);
            vec![(self.1, f.clone()), (self.1, f)]
        }
    }

    #[test]
    fn chain_orders_by_direction_and_adds_delays() {
        let ms = Duration::from_millis;
        let mut c = Chain(vec![Box::new(Tag(1, ms(1))), Box::new(Tag(2, ms(10)))]);
        let out = c.on_frame(Direction::Ingress, vec![], Instant::now());
        assert_eq!(out.len(), 4);
        assert!(out.iter().all(|(d, f)| *d == ms(11) && f == &[1, 2]));
        let out = c.on_frame(Direction::Egress, vec![], Instant::now());
        assert!(out.iter().all(|(_, f)| f == &[2, 1]));
        assert!(
            Chain(vec![Box::new(DropAll)])
                .on_frame(Direction::Egress, vec![1], Instant::now())
                .is_empty()
        );
    }

    #[test]
    fn filters_apply_per_port() {
        let dir = tempfile::tempdir().unwrap();
        let mut sw = LabSwitch::start(dir.path(), None).unwrap();
        let (a, pa) = sw.add_stream_port("a", Box::new(PassThrough)).unwrap();
        let (b, pb) = sw.add_stream_port("b", Box::new(DropAll)).unwrap();
        let mut sa = UnixStream::connect(pa).unwrap();
        let sb = UnixStream::connect(pb).unwrap();
        sw.wait_connected(a, Duration::from_secs(5)).unwrap();
        sw.wait_connected(b, Duration::from_secs(5)).unwrap();
        send(&mut sa, &frame([0xff; 6], [2, 0, 0, 0, 0, 1], 1));
        assert!(!has_pending(&sb));
    }
}
