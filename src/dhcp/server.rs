//! The DHCP socket driver: receives on 67 (and 4011), runs the engine, makes lease changes
//! durable, then sends the replies where RFC 2131 4.1 says. Thin: every decision is the
//! engine's.
//!
//! Group commit: lease changes of packets that arrive while a sync is in flight are collected
//! and written in the next transaction, so one fdatasync covers many leases. Replies that
//! carry a lease (ACKs) are held with their batch and sent only after its commit returned;
//! replies that carry none (OFFER, NAK, INFORM, 4011) go out at once.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

use super::engine::{
    CLIENT_PORT, Destination, DhcpEngine, LeaseChange, Outcome, PXE_PORT, Port, Received,
    SERVER_PORT,
};
use super::wire::{DhcpPacket, MessageType};
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

type Commit = JoinHandle<(Result<(), StoreError>, Batch)>;

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
        loop {
            let room = next.changes.len() < self.max_batch;
            tokio::select! {
                r = main.recv_from(&mut buf_main), if room => {
                    let (len, src) = r.context("receiving on port 67")?;
                    self.receive(&main, &pxe, Port::Dhcp, buf_main.get(..len), src, &mut next).await?;
                    // Take what else is queued now, so that it shares the next sync.
                    while next.changes.len() < self.max_batch {
                        match main.try_recv_from(&mut buf_main) {
                            Ok((len, src)) => {
                                self.receive(&main, &pxe, Port::Dhcp, buf_main.get(..len), src, &mut next).await?;
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
                    self.receive(&main, &pxe, Port::BootServer, buf_pxe.get(..len), src, &mut next).await?;
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
    async fn receive(
        &self,
        main: &UdpSocket,
        pxe: &Option<UdpSocket>,
        port: Port,
        payload: Option<&[u8]>,
        src: SocketAddr,
        next: &mut Batch,
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
        Ok(())
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
    let mut probe = DhcpPacket::client_request(xid, MacAddr(PROBE_MAC));
    probe.flags = 0x8000;
    probe.options.set(53, vec![1]);
    probe.options.set(55, vec![1, 3, 6, 54, 60, 66, 67]);
    sock.send_to(
        &probe.encode(&[]),
        SocketAddr::from((Ipv4Addr::BROADCAST, SERVER_PORT)),
    )
    .await?;
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
