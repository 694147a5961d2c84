//! Ending iPXE's IPv6 wait on networks without IPv6 routers.
//!
//! After its DHCPv4 ACK, iPXE also configures IPv6: it sends Router Solicitations and waits
//! about 13 s for a Router Advertisement before giving up (measured in the lab, see
//! BENCHMARKS.md). On an IPv4-only network nothing answers, so every boot waits. A Router
//! Advertisement with router lifetime 0, no prefixes and neither the managed nor the other flag
//! (RFC 4861 4.2) tells iPXE "there is no IPv6 router and no DHCPv6 here" and ends the wait,
//! without configuring anything on any host: lifetime 0 means "not a default router"
//! (RFC 4861 6.3.4) and there is no prefix to build an address from.
//!
//! pxed answers only a solicitation from a machine that is in the middle of a PXE boot (a PXE
//! reply went to its MAC in the last [`PXE_BOOT_WINDOW_MS`]), only after waiting
//! [`ROUTER_ANSWER_WINDOW_MS`] (RFC 4861 `MAX_RA_DELAY_TIME`, the longest a real router waits),
//! never when another router has advertised on the link, and by unicast to the solicitor.
//! On by default in full mode (pxed runs the network); off by default in proxy mode, where
//! switches with RA guard drop it and monitoring raises alarms on unknown advertisers.
//!
//! [`RaResponder`] is the sans-IO decision; [`run`] is its socket driver.

use std::collections::HashMap;
use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6};
use std::time::Duration;

use crate::events::{BootEvent, EventBus};
use crate::mac::MacAddr;
use crate::stage::BootStage;

/// ICMPv6 Router Solicitation (RFC 4861 4.1).
const ROUTER_SOLICITATION: u8 = 133;
/// ICMPv6 Router Advertisement (RFC 4861 4.2).
const ROUTER_ADVERTISEMENT: u8 = 134;
/// Neighbor Discovery option: Source Link-Layer Address (RFC 4861 4.6.1).
const OPT_SOURCE_LINK_ADDR: u8 = 1;
/// A machine counts as "in the middle of a PXE boot" this long after pxed's last PXE reply.
pub const PXE_BOOT_WINDOW_MS: u64 = 120_000;
/// How long pxed waits for a real router to answer a solicitation first (RFC 4861 10:
/// MAX_RA_DELAY_TIME is 0.5 s).
pub const ROUTER_ANSWER_WINDOW_MS: u64 = 500;
/// After another router advertised, pxed stays silent this long.
pub const FOREIGN_ROUTER_QUIET_MS: u64 = 30 * 60 * 1000;
/// Solicitations waiting for their answer window; more are dropped (a flood of RS).
const MAX_PENDING: usize = 256;
/// PXE clients remembered; the oldest is forgotten first.
const MAX_RECENT: usize = 4096;

/// The advertisement pxed sends: RFC 4861 4.2 with Cur Hop Limit 0 (unspecified), M = O = 0,
/// Router Lifetime 0, Reachable Time 0, Retrans Timer 0, and no options. The kernel fills in
/// the checksum of ICMPv6 raw sockets.
pub const NO_ROUTER_RA: [u8; 16] = [
    ROUTER_ADVERTISEMENT,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
];

struct Pending {
    to: Ipv6Addr,
    mac: MacAddr,
    due_ms: u64,
}

/// The decision: which solicitations to answer, and when.
#[derive(Default)]
pub struct RaResponder {
    recent_pxe: HashMap<MacAddr, u64>,
    foreign_router_at: Option<u64>,
    pending: Vec<Pending>,
    own_addrs: Vec<Ipv6Addr>,
}

/// The MAC in a modified EUI-64 interface identifier (RFC 4291 2.5.1), as iPXE forms its
/// link-local address.
fn mac_from_eui64(addr: &Ipv6Addr) -> Option<MacAddr> {
    let o = addr.octets();
    let iid = o.get(8..16)?;
    if iid.get(3..5)? != [0xff, 0xfe] {
        return None;
    }
    let b = |i: usize| iid.get(i).copied();
    Some(MacAddr([b(0)? ^ 0x02, b(1)?, b(2)?, b(5)?, b(6)?, b(7)?]))
}

/// The Source Link-Layer Address option of an RS, if present (RFC 4861 4.1, 4.6.1).
fn source_link_addr(icmp: &[u8]) -> Option<MacAddr> {
    // Type, code, checksum (4 bytes), reserved (4 bytes), then options.
    let mut opts = icmp.get(8..)?;
    while let [kind, len, ..] = *opts {
        let bytes = usize::from(len) * 8;
        if bytes == 0 {
            return None; // RFC 4861 4.6: a zero length invalidates the packet.
        }
        let opt = opts.get(..bytes)?;
        if kind == OPT_SOURCE_LINK_ADDR
            && let Some(mac) = opt.get(2..8)
        {
            let mut m = [0u8; 6];
            m.copy_from_slice(mac);
            return Some(MacAddr(m));
        }
        opts = opts.get(bytes..)?;
    }
    None
}

impl RaResponder {
    /// A responder that ignores advertisements from its own addresses.
    pub fn new(own_addrs: Vec<Ipv6Addr>) -> RaResponder {
        RaResponder {
            own_addrs,
            ..Default::default()
        }
    }

    /// Record a boot event: stages only a network-booting machine passes mark it as mid-boot
    /// (iPXE's DHCP, proxy replies, boot file transfers, iPXE scripts). Plain DHCP does not.
    pub fn on_event(&mut self, event: &BootEvent) {
        let network_boot = matches!(
            event.stage,
            BootStage::ProxyOffer
                | BootStage::Proxy4011
                | BootStage::IpxeDhcp
                | BootStage::TftpRequest
                | BootStage::HttpScript
        );
        if !network_boot {
            return;
        }
        if self.recent_pxe.len() >= MAX_RECENT
            && !self.recent_pxe.contains_key(&event.mac)
            && let Some(oldest) = self
                .recent_pxe
                .iter()
                .min_by_key(|(_, t)| **t)
                .map(|(m, _)| *m)
        {
            self.recent_pxe.remove(&oldest);
        }
        self.recent_pxe.insert(event.mac, event.at_ms);
    }

    /// An ICMPv6 packet from `src` arrived.
    pub fn on_icmp(&mut self, src: Ipv6Addr, icmp: &[u8], now_ms: u64) {
        match icmp.first() {
            Some(&ROUTER_ADVERTISEMENT) if !self.own_addrs.contains(&src) => {
                // Someone else advertises: they own IPv6 on this link. Stay out of it.
                tracing::info!(router = %src, "IPv6 router advertisement seen; pxed will not send any");
                self.foreign_router_at = Some(now_ms);
                self.pending.clear();
            }
            Some(&ROUTER_SOLICITATION) => {
                if self
                    .foreign_router_at
                    .is_some_and(|t| now_ms.saturating_sub(t) < FOREIGN_ROUTER_QUIET_MS)
                {
                    return;
                }
                let Some(mac) = source_link_addr(icmp).or_else(|| mac_from_eui64(&src)) else {
                    return;
                };
                let mid_boot = self
                    .recent_pxe
                    .get(&mac)
                    .is_some_and(|t| now_ms.saturating_sub(*t) < PXE_BOOT_WINDOW_MS);
                // RFC 4861 6.2.6: the unspecified source cannot be answered by unicast.
                if !mid_boot || src.is_unspecified() || self.pending.len() >= MAX_PENDING {
                    return;
                }
                if self.pending.iter().any(|p| p.mac == mac) {
                    return;
                }
                self.pending.push(Pending {
                    to: src,
                    mac,
                    due_ms: now_ms + ROUTER_ANSWER_WINDOW_MS,
                });
            }
            _ => {}
        }
    }

    /// Advertisements due now: `(destination, MAC)`; send [`NO_ROUTER_RA`] to each.
    pub fn poll(&mut self, now_ms: u64) -> Vec<(Ipv6Addr, MacAddr)> {
        let (due, later): (Vec<_>, Vec<_>) =
            self.pending.drain(..).partition(|p| p.due_ms <= now_ms);
        self.pending = later;
        due.into_iter().map(|p| (p.to, p.mac)).collect()
    }

    /// When [`poll`](Self::poll) next has something to send.
    pub fn next_due(&self) -> Option<u64> {
        self.pending.iter().map(|p| p.due_ms).min()
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The interface's IPv6 link-local addresses (to ignore our own packets).
fn link_locals(ifname: &str) -> Vec<Ipv6Addr> {
    // /proc/net/if_inet6: address (32 hex), ifindex, prefix len, scope, flags, name.
    let text = std::fs::read_to_string("/proc/net/if_inet6").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            if cols.last() != Some(&ifname) {
                return None;
            }
            u128::from_str_radix(cols.first()?, 16)
                .ok()
                .map(Ipv6Addr::from)
        })
        .collect()
}

/// Run the responder on `ifname` until the process ends.
pub async fn run(ifname: String, events: EventBus) -> anyhow::Result<()> {
    use socket2::{Domain, Protocol, Socket, Type};
    let ifindex = nix_ifindex(&ifname)?;
    let socket = Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6))?;
    socket.bind_device(Some(ifname.as_bytes()))?;
    // RFC 4861 6.1.2 / 4.2: ND packets carry hop limit 255 so receivers know they are on-link.
    socket.set_unicast_hops_v6(255)?;
    socket.set_multicast_hops_v6(255)?;
    // Solicitations go to all-routers (ff02::2).
    socket.join_multicast_v6(&Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 2), ifindex)?;
    socket.set_nonblocking(true)?;
    let socket = tokio::net::UdpSocket::from_std(std::net::UdpSocket::from(socket))?;
    let mut responder = RaResponder::new(link_locals(&ifname));
    let mut sub = events.subscribe();
    let mut buf = vec![0u8; 1500];
    tracing::info!(interface = %ifname, "IPv6 RA responder on (ends iPXE's IPv6 wait for PXE clients)");
    loop {
        let sleep = responder
            .next_due()
            .map(|due| Duration::from_millis(due.saturating_sub(now_ms())))
            .unwrap_or(Duration::from_secs(3600));
        tokio::select! {
            ev = sub.recv() => match ev {
                Ok(ev) => responder.on_event(&ev),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    tracing::debug!(n, "RA responder missed events");
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return Ok(()),
            },
            r = socket.recv_from(&mut buf) => {
                let (len, src) = r?;
                if let (SocketAddr::V6(src), Some(icmp)) = (src, buf.get(..len)) {
                    responder.on_icmp(*src.ip(), icmp, now_ms());
                }
            }
            _ = tokio::time::sleep(sleep) => {}
        }
        for (to, mac) in responder.poll(now_ms()) {
            let dest = SocketAddrV6::new(to, 0, 0, ifindex);
            match socket.send_to(&NO_ROUTER_RA, SocketAddr::V6(dest)).await {
                Ok(_) => tracing::debug!(%mac, %to, "sent router advertisement with lifetime 0"),
                Err(err) => tracing::warn!(%err, %to, "cannot send router advertisement"),
            }
        }
    }
}

fn nix_ifindex(ifname: &str) -> anyhow::Result<u32> {
    let name = std::ffi::CString::new(ifname)?;
    // SAFETY: if_nametoindex reads a NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        anyhow::bail!("no interface {ifname}");
    }
    Ok(index)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: MacAddr = MacAddr([0x52, 0x54, 0, 0x12, 0x34, 0x56]);

    fn ll() -> Ipv6Addr {
        // fe80::5054:ff:fe12:3456, the EUI-64 link-local of MAC.
        Ipv6Addr::new(0xfe80, 0, 0, 0, 0x5054, 0x00ff, 0xfe12, 0x3456)
    }

    fn rs(with_slla: bool) -> Vec<u8> {
        let mut p = vec![ROUTER_SOLICITATION, 0, 0, 0, 0, 0, 0, 0];
        if with_slla {
            p.extend_from_slice(&[1, 1]);
            p.extend_from_slice(&MAC.0);
        }
        p
    }

    fn pxe_event(at_ms: u64) -> BootEvent {
        BootEvent {
            mac: MAC,
            stage: BootStage::IpxeDhcp,
            detail: "iPXE on pcbios".into(),
            at_ms,
        }
    }

    #[test]
    fn eui64_and_slla_name_the_machine() {
        assert_eq!(mac_from_eui64(&ll()), Some(MAC));
        assert_eq!(source_link_addr(&rs(true)), Some(MAC));
        assert_eq!(source_link_addr(&rs(false)), None);
        assert_eq!(
            source_link_addr(&[133, 0, 0, 0, 0, 0, 0, 0, 1, 0]),
            None,
            "zero length"
        );
    }

    #[test]
    fn answers_a_booting_machine_after_the_router_window() {
        let mut r = RaResponder::new(vec![]);
        r.on_event(&pxe_event(1_000));
        r.on_icmp(ll(), &rs(false), 2_000);
        assert!(
            r.poll(2_000 + ROUTER_ANSWER_WINDOW_MS - 1).is_empty(),
            "waits for a router"
        );
        assert_eq!(r.poll(2_000 + ROUTER_ANSWER_WINDOW_MS), vec![(ll(), MAC)]);
        assert!(r.poll(10_000).is_empty(), "once per solicitation");
    }

    #[test]
    fn silent_for_machines_not_booting() {
        let mut r = RaResponder::new(vec![]);
        r.on_icmp(ll(), &rs(true), 2_000);
        assert_eq!(r.next_due(), None, "never saw a PXE reply");
        r.on_event(&pxe_event(0));
        r.on_icmp(ll(), &rs(true), PXE_BOOT_WINDOW_MS + 1);
        assert_eq!(r.next_due(), None, "boot window over");
        // A plain DHCP ack does not count as a network boot.
        r.on_event(&BootEvent {
            stage: BootStage::DhcpAck,
            ..pxe_event(PXE_BOOT_WINDOW_MS + 2)
        });
        r.on_icmp(ll(), &rs(true), PXE_BOOT_WINDOW_MS + 3);
        assert_eq!(r.next_due(), None);
    }

    #[test]
    fn a_real_router_silences_it() {
        let mut r = RaResponder::new(vec![]);
        r.on_event(&pxe_event(1_000));
        r.on_icmp(ll(), &rs(false), 2_000);
        let router = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
        r.on_icmp(router, &[ROUTER_ADVERTISEMENT, 0, 0, 0], 2_100);
        assert!(r.poll(5_000).is_empty(), "the router answered");
        r.on_icmp(ll(), &rs(false), 6_000);
        assert!(r.poll(10_000).is_empty(), "and stays in charge");
    }

    #[test]
    fn own_advertisements_do_not_count_as_a_router() {
        let me = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 9);
        let mut r = RaResponder::new(vec![me]);
        r.on_icmp(me, &NO_ROUTER_RA, 1_000);
        r.on_event(&pxe_event(1_000));
        r.on_icmp(ll(), &rs(false), 2_000);
        assert_eq!(r.poll(3_000).len(), 1);
    }

    #[test]
    fn the_advertisement_configures_nothing() {
        // Router lifetime (bytes 6..8) 0, flags (byte 5) 0: no default route, no DHCPv6.
        assert_eq!(NO_ROUTER_RA[0], 134);
        assert_eq!(&NO_ROUTER_RA[4..8], &[0, 0, 0, 0]);
        assert_eq!(NO_ROUTER_RA.len(), 16, "no options, so no prefix");
    }
}
