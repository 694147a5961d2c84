//! The DHCP socket driver: receives on 67 (and 4011), runs the engine, makes lease changes
//! durable, then sends the reply where RFC 2131 4.1 says. Thin: every decision is the engine's.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use tokio::net::UdpSocket;

use super::engine::{CLIENT_PORT, Destination, DhcpEngine, PXE_PORT, Port, Received, SERVER_PORT};
use super::wire::{DhcpPacket, MessageType, Op};
use crate::events::EventBus;
use crate::leases::LeaseStore;
use crate::mac::MacAddr;
use crate::net;

/// The made-up, locally administered MAC (first octet 0x02) of the DISCOVER that looks for
/// other DHCP servers at start; pxed hears its own probe and must not answer it.
const PROBE_MAC: [u8; 6] = [0x02, 0x70, 0x78, 0x65, 0x64, 0x01];
/// Where `chaddr` starts in a DHCP packet (RFC 2131 section 2).
const CHADDR_OFFSET: usize = 28;

/// The largest datagram read; DHCP messages are far smaller (RFC 2131 allows up to the MTU).
const RECV_BUFFER: usize = 4096;

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
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl DhcpServer {
    /// Bind the sockets (so that errors show at start) and return the running future.
    pub fn bind(self) -> anyhow::Result<impl Future<Output = anyhow::Result<()>>> {
        let iface = self.interface.as_deref();
        let main = UdpSocket::from_std(net::udp_socket(
            SocketAddr::from((Ipv4Addr::UNSPECIFIED, SERVER_PORT)),
            iface,
        )?)?;
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
        loop {
            let (port, len, src) = tokio::select! {
                r = main.recv_from(&mut buf_main) => {
                    let (len, src) = r.context("receiving on port 67")?;
                    (Port::Dhcp, len, src)
                }
                r = async {
                    match &pxe {
                        Some(s) => s.recv_from(&mut buf_pxe).await,
                        None => std::future::pending().await,
                    }
                } => {
                    let (len, src) = r.context("receiving on port 4011")?;
                    (Port::BootServer, len, src)
                }
            };
            let SocketAddr::V4(src) = src else { continue };
            let payload = match port {
                Port::Dhcp => buf_main.get(..len),
                Port::BootServer => buf_pxe.get(..len),
            };
            let Some(payload) = payload else { continue };
            if payload.get(CHADDR_OFFSET..CHADDR_OFFSET + PROBE_MAC.len()) == Some(&PROBE_MAC[..]) {
                continue;
            }
            let rx = Received {
                payload,
                src,
                port,
                server_ip: self.server_ip,
                now_ms: now_ms(),
            };
            let outcome = match self.engine.lock() {
                Ok(mut engine) => engine.handle(&rx),
                Err(_) => anyhow::bail!("DHCP engine lock poisoned"),
            };
            // Durable before the reply leaves: a client must never use a lease a crash loses.
            if let Some(change) = &outcome.lease {
                let store = self.store.clone();
                let batch = [change.clone()];
                let committed = tokio::task::spawn_blocking(move || store.commit(&batch)).await;
                match committed {
                    Ok(Ok(())) => {
                        if let Ok(mut engine) = self.engine.lock() {
                            engine.apply(change);
                        }
                    }
                    Ok(Err(err)) => {
                        tracing::error!(%err, "lease not stored; not answering");
                        continue;
                    }
                    Err(err) => {
                        tracing::error!(%err, "lease commit task failed; not answering");
                        continue;
                    }
                }
            }
            for event in outcome.events {
                self.events.publish(event);
            }
            if let Some(reply) = outcome.reply {
                let sock = match port {
                    Port::Dhcp => &main,
                    Port::BootServer => pxe.as_ref().unwrap_or(&main),
                };
                self.send(sock, reply.dest, &reply.payload).await;
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
    let mut chaddr = [0u8; 16];
    chaddr[..6].copy_from_slice(&PROBE_MAC);
    let mut probe = DhcpPacket {
        op: Op::Request,
        htype: 1,
        hlen: 6,
        hops: 0,
        xid,
        secs: 0,
        flags: 0x8000,
        ciaddr: Ipv4Addr::UNSPECIFIED,
        yiaddr: Ipv4Addr::UNSPECIFIED,
        siaddr: Ipv4Addr::UNSPECIFIED,
        giaddr: Ipv4Addr::UNSPECIFIED,
        chaddr,
        sname: Vec::new(),
        file: Vec::new(),
        options: Default::default(),
    };
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
