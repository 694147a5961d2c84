//! The DHCP socket driver: receives on 67 (and 4011), runs the engine, makes lease changes
//! durable, then sends the replies where RFC 2131 4.1 says. Thin: every decision is the
//! engine's.
//!
//! Group commit: lease changes of packets that arrive while a sync is in flight are collected
//! and written in the next transaction, so one fdatasync covers many leases. Replies that
//! carry a lease (ACKs) are held with their batch and sent only after its commit returned;
//! replies that carry none (OFFER, NAK, INFORM, 4011) go out at once.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::engine::{
    CLIENT_PORT, Destination, DhcpEngine, LeaseChange, Outcome, PXE_PORT, Port, Received,
    SERVER_PORT,
};
use super::limits::DhcpCounters;
use super::probe::{MAX_PROBES_IN_FLIGHT, PROBE_TIMEOUT, icmp_in_use};
use super::wire::{DhcpPacket, MessageType, Op};
use crate::events::{BootEvent, EventBus};
use crate::leases::hook::LeaseHook;
use crate::leases::{LeaseStore, StoreError};
use crate::mac::MacAddr;
use crate::net;

/// The made-up, locally administered MAC (first octet 0x02) of the DISCOVER that looks for
/// other DHCP servers at start; pxed hears its own probe and must not answer it.
const PROBE_MAC: [u8; 6] = [0x02, 0x70, 0x78, 0x65, 0x64, 0x01];
/// Where `chaddr` starts in a DHCP packet (RFC 2131 section 2).
const CHADDR_OFFSET: usize = 28;

/// The largest datagram read; DHCP messages are far smaller (RFC 2131 allows up to the MTU).
const RECV_BUFFER: usize = 4096;
/// Kernel receive buffer for port 67: a boot storm arrives faster than one sync; the Linux
/// default (208 KiB, about 600 requests) drops packets before pxed reads them.
const SOCKET_RCVBUF: usize = 4 << 20;
/// How often leases are checked for expiry.
const EXPIRY_TICK: Duration = Duration::from_secs(1);

/// What the driver needs to run.
pub struct DhcpServer {
    /// The engine, shared with the API (lease listing) and reloads.
    pub engine: Arc<Mutex<DhcpEngine>>,
    /// Durable leases.
    pub store: Arc<dyn LeaseStore>,
    /// Event stream.
    pub events: EventBus,
    /// Interface to serve (SO_BINDTODEVICE), or all.
    pub interface: Option<String>,
    /// pxed's address on that interface.
    pub server_ip: Ipv4Addr,
    /// Also listen on 4011.
    pub port_4011: bool,
    /// The lease hook, if configured.
    pub hook: Option<LeaseHook>,
    /// Most lease changes per commit.
    pub max_batch: usize,
    /// Counters for `/metrics`.
    pub counters: DhcpCounters,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Replies and events waiting for their leases to be durable.
#[derive(Default)]
struct Batch {
    changes: Vec<LeaseChange>,
    replies: Vec<(Port, Destination, Vec<u8>)>,
    events: Vec<BootEvent>,
}

/// Packets read back to back before a commit starts when none is in flight: a burst that
/// arrived together shares one sync, yet a sync never waits long for a socket that stays busy.
const MAX_IDLE_DRAIN: usize = 64;

type Commit = JoinHandle<(Result<(), StoreError>, Batch)>;

/// Conflict probes run off the packet loop; their results come back on `results`.
struct Probes {
    results: mpsc::UnboundedSender<(Ipv4Addr, bool)>,
    in_flight: Arc<AtomicUsize>,
}

impl DhcpServer {
    /// Bind the sockets (so that errors show at start) and return the running future.
    pub fn bind(self) -> anyhow::Result<impl Future<Output = anyhow::Result<()>>> {
        let iface = self.interface.as_deref();
        let main_std = net::udp_socket(
            SocketAddr::from((Ipv4Addr::UNSPECIFIED, SERVER_PORT)),
            iface,
        )?;
        if let Err(err) = socket2::SockRef::from(&main_std).set_recv_buffer_size(SOCKET_RCVBUF) {
            tracing::debug!(%err, "cannot enlarge the DHCP receive buffer");
        }
        let main = UdpSocket::from_std(main_std)?;
        let pxe = if self.port_4011 {
            Some(UdpSocket::from_std(net::udp_socket(
                SocketAddr::from((Ipv4Addr::UNSPECIFIED, PXE_PORT)),
                iface,
            )?)?)
        } else {
            None
        };
        Ok(self.run(main, pxe))
    }

    async fn run(self, main: UdpSocket, pxe: Option<UdpSocket>) -> anyhow::Result<()> {
        let mut buf_main = vec![0u8; RECV_BUFFER];
        let mut buf_pxe = vec![0u8; RECV_BUFFER];
        let mut next = Batch::default();
        let mut inflight: Option<Commit> = None;
        let mut tick = tokio::time::interval(EXPIRY_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (results, mut probe_rx) = mpsc::unbounded_channel();
        let probes = Probes {
            results,
            in_flight: Arc::new(AtomicUsize::new(0)),
        };
        loop {
            let room = next.changes.len() < self.max_batch;
            tokio::select! {
                r = main.recv_from(&mut buf_main), if room => {
                    let (len, src) = r.context("receiving on port 67")?;
                    self.receive(&main, &pxe, Port::Dhcp, buf_main.get(..len), src, &mut next, &probes).await?;
                    // Take what else is queued now, so that it shares the next sync. Under
                    // overload the socket is never empty, so stop when the commit in flight
                    // has returned (its ACKs wait for this loop to end) and, with no commit
                    // in flight, after MAX_IDLE_DRAIN packets (a sync should start rather
                    // than wait for a quiet socket). Without these bounds the power-cut test
                    // saw no ACK for 70 s under perfdhcp load in a TCG VM, then 1024 at once.
                    let mut drained = 0usize;
                    while next.changes.len() < self.max_batch {
                        let commit_returned = inflight.as_ref().is_some_and(|c| c.is_finished());
                        if commit_returned || (inflight.is_none() && drained >= MAX_IDLE_DRAIN) {
                            break;
                        }
                        drained += 1;
                        match main.try_recv_from(&mut buf_main) {
                            Ok((len, src)) => {
                                self.receive(&main, &pxe, Port::Dhcp, buf_main.get(..len), src, &mut next, &probes).await?;
                            }
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                            Err(e) => return Err(e).context("receiving on port 67"),
                        }
                    }
                }
                r = async {
                    match &pxe {
                        Some(s) => s.recv_from(&mut buf_pxe).await,
                        None => std::future::pending().await,
                    }
                }, if room => {
                    let (len, src) = r.context("receiving on port 4011")?;
                    self.receive(&main, &pxe, Port::BootServer, buf_pxe.get(..len), src, &mut next, &probes).await?;
                }
                done = async {
                    match inflight.as_mut() {
                        Some(task) => task.await,
                        None => std::future::pending().await,
                    }
                } => {
                    inflight = None;
                    match done {
                        Ok((Ok(()), batch)) => self.release(&main, &pxe, batch).await,
                        Ok((Err(err), batch)) => {
                            // No ACK for a lease that is not on disk: the clients retry.
                            tracing::error!(%err, held = batch.replies.len(), "lease commit failed; replies dropped");
                        }
                        Err(err) => anyhow::bail!("lease commit task failed: {err}"),
                    }
                }
                Some((ip, in_use)) = probe_rx.recv() => {
                    let outcome = match self.engine.lock() {
                        Ok(mut engine) => engine.probe_result(ip, in_use, now_ms()),
                        Err(_) => anyhow::bail!("DHCP engine lock poisoned"),
                    };
                    self.dispatch(&main, &pxe, Port::Dhcp, outcome, &mut next, &probes).await;
                }
                _ = tick.tick() => {
                    let expired = match self.engine.lock() {
                        Ok(mut engine) => engine.tick(now_ms()),
                        Err(_) => anyhow::bail!("DHCP engine lock poisoned"),
                    };
                    next.changes.extend(expired);
                }
            }
            if inflight.is_none() && !next.changes.is_empty() {
                let batch = std::mem::take(&mut next);
                let store = self.store.clone();
                inflight = Some(tokio::task::spawn_blocking(move || {
                    let result = store.commit(&batch.changes);
                    (result, batch)
                }));
            }
        }
    }

    /// Run one packet through the engine; send a reply that needs no lease now, hold one that
    /// does in the next batch.
    // The loop's state, borrowed piecewise: a struct for it would only rename the arguments.
    #[allow(clippy::too_many_arguments)]
    async fn receive(
        &self,
        main: &UdpSocket,
        pxe: &Option<UdpSocket>,
        port: Port,
        payload: Option<&[u8]>,
        src: SocketAddr,
        next: &mut Batch,
        probes: &Probes,
    ) -> anyhow::Result<()> {
        let (Some(payload), SocketAddr::V4(src)) = (payload, src) else {
            return Ok(());
        };
        if payload.get(CHADDR_OFFSET..CHADDR_OFFSET + PROBE_MAC.len()) == Some(&PROBE_MAC[..]) {
            return Ok(());
        }
        let rx = Received {
            payload,
            src,
            port,
            server_ip: self.server_ip,
            now_ms: now_ms(),
        };
        let outcome: Outcome = match self.engine.lock() {
            Ok(mut engine) => engine.handle(&rx),
            Err(_) => anyhow::bail!("DHCP engine lock poisoned"),
        };
        if let Some(limit) = outcome.limited {
            self.counters.limited(limit);
            tracing::trace!(%src, limit = limit.as_str(), "DHCP packet rate-limited");
        }
        self.dispatch(main, pxe, port, outcome, next, probes).await;
        Ok(())
    }

    /// Act on one outcome: start its conflict probe, send a reply that needs no lease now,
    /// hold one that does in the next batch.
    async fn dispatch(
        &self,
        main: &UdpSocket,
        pxe: &Option<UdpSocket>,
        port: Port,
        outcome: Outcome,
        next: &mut Batch,
        probes: &Probes,
    ) {
        if let Some(ip) = outcome.probe {
            self.start_probe(ip, probes);
        }
        match outcome.lease {
            Some(change) => {
                next.changes.push(change);
                next.events.extend(outcome.events);
                if let Some(reply) = outcome.reply {
                    next.replies.push((port, reply.dest, reply.payload));
                }
            }
            None => {
                for event in outcome.events {
                    self.events.publish(event);
                }
                if let Some(reply) = outcome.reply {
                    self.send(socket_for(main, pxe, port), reply.dest, &reply.payload)
                        .await;
                }
            }
        }
    }

    /// Probe `ip` on a blocking thread, bounded by `PROBE_TIMEOUT`, and report on the channel.
    /// Too many probes at once, or no ICMP socket: report it free at once (offer unprobed).
    fn start_probe(&self, ip: Ipv4Addr, probes: &Probes) {
        let results = probes.results.clone();
        if probes.in_flight.fetch_add(1, Ordering::SeqCst) >= MAX_PROBES_IN_FLIGHT {
            probes.in_flight.fetch_sub(1, Ordering::SeqCst);
            tracing::debug!(%ip, "conflict probe skipped: too many in flight");
            let _ = results.send((ip, false));
            return;
        }
        let in_flight = probes.in_flight.clone();
        let interface = self.interface.clone();
        tokio::task::spawn_blocking(move || {
            let in_use = match icmp_in_use(ip, interface.as_deref(), PROBE_TIMEOUT) {
                Ok(v) => v,
                Err(err) => {
                    tracing::warn!(%ip, %err, "conflict probe failed; offering unprobed");
                    false
                }
            };
            in_flight.fetch_sub(1, Ordering::SeqCst);
            let _ = results.send((ip, in_use));
        });
    }

    /// The batch is durable: send its replies, publish its events, run the hook.
    async fn release(&self, main: &UdpSocket, pxe: &Option<UdpSocket>, batch: Batch) {
        for (port, dest, payload) in &batch.replies {
            self.send(socket_for(main, pxe, *port), *dest, payload)
                .await;
        }
        for event in batch.events {
            self.events.publish(event);
        }
        if let Some(hook) = &self.hook {
            for change in &batch.changes {
                hook.notify(change);
            }
        }
    }

    async fn send(&self, sock: &UdpSocket, dest: Destination, payload: &[u8]) {
        let broadcast = SocketAddr::from((Ipv4Addr::BROADCAST, CLIENT_PORT));
        let target = match dest {
            Destination::Broadcast => broadcast,
            Destination::Unicast(addr) => SocketAddr::V4(addr),
            Destination::UnicastToHardware { addr, mac } => self.via_arp(sock, addr, mac),
        };
        if let Err(err) = sock.send_to(payload, target).await {
            tracing::warn!(%target, %err, "cannot send DHCP reply");
        }
    }

    /// Unicast to a client without an address needs an ARP entry; without an interface name
    /// (or the right to set one) broadcast instead, which every client accepts.
    fn via_arp(&self, sock: &UdpSocket, addr: SocketAddrV4, mac: MacAddr) -> SocketAddr {
        let broadcast = SocketAddr::from((Ipv4Addr::BROADCAST, CLIENT_PORT));
        let Some(ifname) = self.interface.as_deref() else {
            return broadcast;
        };
        match net::set_arp_entry(sock, ifname, *addr.ip(), mac) {
            Ok(()) => SocketAddr::V4(addr),
            Err(err) => {
                tracing::debug!(%err, "cannot add ARP entry; broadcasting");
                broadcast
            }
        }
    }
}

fn socket_for<'a>(main: &'a UdpSocket, pxe: &'a Option<UdpSocket>, port: Port) -> &'a UdpSocket {
    match port {
        Port::Dhcp => main,
        Port::BootServer => pxe.as_ref().unwrap_or(main),
    }
}

/// Another DHCP server seen on the link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ForeignServer {
    /// Its server identifier (option 54), or the packet source.
    pub server: IpAddr,
    /// The address it offered.
    pub offered: Ipv4Addr,
    /// Whether its offer carried PXE boot data (option 60 `PXEClient` or a boot file).
    pub pxe: bool,
}

/// Look for other DHCP servers on the interface: broadcast a DISCOVER from a made-up,
/// locally administered MAC and collect offers for `wait`. In proxy mode one is expected (it
/// gives the addresses); in full mode any is a conflict to report.
pub async fn find_other_servers(
    interface: &str,
    our_ip: Ipv4Addr,
    wait: Duration,
) -> anyhow::Result<Vec<ForeignServer>> {
    let sock = UdpSocket::from_std(net::udp_socket(
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, CLIENT_PORT)),
        Some(interface),
    )?)?;
    let xid = (now_ms() as u32) ^ 0x7078_6564;
    send_probe(&sock, xid).await?;
    let mut found = Vec::new();
    let mut buf = vec![0u8; RECV_BUFFER];
    let deadline = tokio::time::Instant::now() + wait;
    while let Ok(Ok((len, src))) = tokio::time::timeout_at(deadline, sock.recv_from(&mut buf)).await
    {
        let Some(bytes) = buf.get(..len) else {
            continue;
        };
        let Ok(offer) = DhcpPacket::decode(bytes) else {
            continue;
        };
        if offer.xid != xid || offer.message_type() != Some(MessageType::Offer) {
            continue;
        }
        let server = offer.options.server_id().map_or(src.ip(), IpAddr::V4);
        if server == IpAddr::V4(our_ip) {
            continue;
        }
        let pxe = offer
            .options
            .get(60)
            .is_some_and(|v| v.starts_with(b"PXEClient"))
            || !offer.file.is_empty();
        found.push(ForeignServer {
            server,
            offered: offer.yiaddr,
            pxe,
        });
    }
    Ok(found)
}

/// Broadcast the DISCOVER from [`PROBE_MAC`] that makes every DHCP server on the link answer.
async fn send_probe(sock: &UdpSocket, xid: u32) -> std::io::Result<()> {
    let mut probe = DhcpPacket::client_request(xid, MacAddr(PROBE_MAC));
    // Ask for broadcast replies (RFC 2131 4.1): a server would otherwise unicast to a MAC
    // that does not exist.
    probe.flags = 0x8000;
    probe.options.set(53, vec![1]);
    probe.options.set(55, vec![1, 3, 6, 54, 60, 66, 67]);
    sock.send_to(
        &probe.encode(&[]),
        SocketAddr::from((Ipv4Addr::BROADCAST, SERVER_PORT)),
    )
    .await?;
    Ok(())
}

/// Distinct other servers remembered (and reported once each): a forged-reply flood with
/// random server identifiers must not grow memory or the event stream without bound.
const MAX_FOREIGN_SERVERS: usize = 64;

/// A DHCP reply from another server, if `bytes` is one: OFFER or ACK whose server identifier
/// is not `our_ip`.
pub fn foreign_reply(
    bytes: &[u8],
    src: SocketAddr,
    our_ip: Ipv4Addr,
) -> Option<(ForeignServer, MacAddr)> {
    let reply = DhcpPacket::decode(bytes).ok()?;
    if reply.op != Op::Reply
        || !matches!(
            reply.message_type(),
            Some(MessageType::Offer | MessageType::Ack)
        )
    {
        return None;
    }
    let server = reply.options.server_id().map_or(src.ip(), IpAddr::V4);
    if server == IpAddr::V4(our_ip) {
        return None;
    }
    let pxe = reply
        .options
        .get(60)
        .is_some_and(|v| v.starts_with(b"PXEClient"))
        || !reply.file.is_empty();
    let mac = reply.mac()?;
    Some((
        ForeignServer {
            server,
            offered: reply.yiaddr,
            pxe,
        },
        mac,
    ))
}

/// Watch the link for other DHCP servers for as long as pxed runs: every OFFER or ACK from
/// another server that reaches port 68 (broadcast replies, and replies to the probe sent
/// every `probe_every`) is counted; each new server is reported once as a
/// `dhcp.foreign-server` event. In proxy mode another server is expected (it gives the
/// addresses), so only one that also hands out boot data (a competing PXE server) counts.
pub async fn watch_other_servers(
    interface: String,
    our_ip: Ipv4Addr,
    mode: super::DhcpMode,
    probe_every: Option<Duration>,
    events: EventBus,
    counters: super::limits::DhcpCounters,
) -> anyhow::Result<()> {
    // Port 68 may be held by the host's own DHCP client without SO_REUSEADDR: then pxed
    // serves on without the watch rather than not at all.
    let sock = match net::udp_socket(
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, CLIENT_PORT)),
        Some(&interface),
    )
    .and_then(UdpSocket::from_std)
    {
        Ok(s) => s,
        Err(err) => {
            tracing::warn!(%err, "cannot watch for other DHCP servers on {interface}");
            return Ok(());
        }
    };
    let mut probe = probe_every.map(|every| {
        let mut t = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    });
    let mut seen: std::collections::HashSet<IpAddr> = std::collections::HashSet::new();
    let mut buf = vec![0u8; RECV_BUFFER];
    loop {
        tokio::select! {
            r = sock.recv_from(&mut buf) => {
                let (len, src) = match r {
                    Ok(v) => v,
                    Err(err) => {
                        tracing::debug!(%err, "receiving on port 68");
                        continue;
                    }
                };
                let Some((found, client)) = buf.get(..len).and_then(|b| foreign_reply(b, src, our_ip)) else {
                    continue;
                };
                if mode == super::DhcpMode::Proxy && !found.pxe {
                    continue;
                }
                counters.foreign_replies.inc();
                if seen.contains(&found.server) || seen.len() >= MAX_FOREIGN_SERVERS {
                    continue;
                }
                seen.insert(found.server);
                counters.foreign_servers.set(seen.len() as i64);
                tracing::warn!(
                    server = %found.server, offered = %found.offered, pxe = found.pxe,
                    "another DHCP server answers on {interface}"
                );
                events.publish(BootEvent {
                    mac: client,
                    stage: crate::stage::BootStage::DhcpForeignServer,
                    detail: format!(
                        "DHCP server {} on {interface} offered {}{}",
                        found.server,
                        found.offered,
                        if found.pxe { " with boot data" } else { "" }
                    ),
                    at_ms: now_ms(),
                });
            }
            _ = async {
                match probe.as_mut() {
                    Some(t) => { t.tick().await; }
                    None => std::future::pending().await,
                }
            } => {
                let xid = (now_ms() as u32) ^ 0x7078_6564;
                if let Err(err) = send_probe(&sock, xid).await {
                    tracing::debug!(%err, "cannot send the DHCP server probe");
                }
            }
        }
    }
}
