//! The conflict probe's I/O: one ICMP echo request to an address pxed is about to offer, and
//! a bounded wait for the echo reply (RFC 2131 2.2: "the allocating server SHOULD probe the
//! reused address before allocating the address, e.g., with an ICMP echo request").
//!
//! ICMP rather than ARP: it needs no AF_PACKET socket and works through a relay (the address
//! may be on a far subnet). It misses hosts that drop pings; the client's own ARP check and
//! DECLINE (RFC 2131 4.3.3) still catch those.
//!
//! Socket: an unprivileged Linux ping socket (`SOCK_DGRAM` + `IPPROTO_ICMP`) where
//! `net.ipv4.ping_group_range` allows it, else a raw ICMP socket (needs CAP_NET_RAW, which a
//! DHCP server on port 67 normally has).

use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use socket2::{Domain, Protocol, Socket, Type};

/// How long a probe waits for the echo reply. dnsmasq waits 3 s, which the boot-time
/// measurements showed on every new client; a host on the same LAN answers in well under a
/// millisecond, and a relayed one within tens.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(300);
/// Probes running at once; past this an address is offered unprobed rather than queueing
/// (a boot storm must not wait on probes, and each probe holds a blocking thread).
pub const MAX_PROBES_IN_FLIGHT: usize = 64;
/// ICMP echo request and reply types (RFC 792).
const ECHO_REQUEST: u8 = 8;
const ECHO_REPLY: u8 = 0;
/// The identifier of pxed's echo requests (raw sockets; a ping socket picks its own).
const ECHO_ID: u16 = 0x7078;
/// Bytes read per datagram: an IPv4 header (at most 60) and a short echo reply.
const RECV_BUFFER: usize = 256;

/// Whether a host answers an ICMP echo on `target` within `timeout`. `Err` when no ICMP socket
/// can be opened or sent on; the caller then offers without a probe.
pub fn icmp_in_use(
    target: Ipv4Addr,
    interface: Option<&str>,
    timeout: Duration,
) -> std::io::Result<bool> {
    let (mut sock, raw) = match Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::ICMPV4)) {
        Ok(s) => (s, false),
        Err(_) => (
            Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4))?,
            true,
        ),
    };
    if let Some(ifname) = interface
        && let Err(err) = sock.bind_device(Some(ifname.as_bytes()))
    {
        // Without the binding the route decides the interface, which is the same one for an
        // address in a subnet pxed serves.
        tracing::debug!(%err, "conflict probe: cannot bind to {ifname}");
    }
    // Sequence number: varies per probe so a late reply to an earlier probe is not taken
    // for this one.
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let seq = (u32::from(target) ^ nanos) as u16;
    let request = echo_request(ECHO_ID, seq);
    sock.send_to(
        &request,
        &SocketAddr::V4(SocketAddrV4::new(target, 0)).into(),
    )?;
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; RECV_BUFFER];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(false);
        }
        sock.set_read_timeout(Some(left))?;
        let len = match sock.read(&mut buf) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(false);
            }
            // ICMP errors (host unreachable) reported on the socket: nobody answered.
            Err(_) => return Ok(false),
        };
        let Some(datagram) = buf.get(..len) else {
            continue;
        };
        if is_reply(datagram, raw, target, seq) {
            return Ok(true);
        }
    }
}

/// An echo request (RFC 792): type, code, checksum, identifier, sequence, payload.
fn echo_request(id: u16, seq: u16) -> Vec<u8> {
    let mut p = vec![ECHO_REQUEST, 0, 0, 0];
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(b"pxed conflict probe");
    let sum = checksum(&p);
    if let Some(c) = p.get_mut(2..4) {
        c.copy_from_slice(&sum.to_be_bytes());
    }
    p
}

/// The Internet checksum (RFC 1071).
fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| match c {
            [a, b] => u32::from(u16::from_be_bytes([*a, *b])),
            [a] => u32::from(*a) << 8,
            _ => 0,
        })
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Whether a received datagram is the echo reply to our probe. A raw socket gives the IPv4
/// header too (its source must be the target; its length is in the low nibble of byte 0);
/// a ping socket gives the ICMP message only, already matched to our identifier.
fn is_reply(datagram: &[u8], raw: bool, target: Ipv4Addr, seq: u16) -> bool {
    let icmp = if raw {
        let Some(first) = datagram.first() else {
            return false;
        };
        let header = usize::from(first & 0x0f) * 4;
        let source = datagram
            .get(12..16)
            .and_then(|s| <[u8; 4]>::try_from(s).ok())
            .map(Ipv4Addr::from);
        if source != Some(target) {
            return false;
        }
        let Some(rest) = datagram.get(header..) else {
            return false;
        };
        if rest.get(4..6) != Some(&ECHO_ID.to_be_bytes()[..]) {
            return false;
        }
        rest
    } else {
        datagram
    };
    icmp.first() == Some(&ECHO_REPLY) && icmp.get(6..8) == Some(&seq.to_be_bytes()[..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_request_checksums_to_zero() {
        let p = echo_request(0x1234, 7);
        assert_eq!(
            checksum(&p),
            0,
            "RFC 1071: a packet with its checksum sums to 0"
        );
    }

    #[test]
    fn replies_are_matched_by_source_id_and_sequence() {
        let target = Ipv4Addr::new(10, 0, 0, 100);
        let mut icmp = echo_request(ECHO_ID, 9);
        icmp[0] = ECHO_REPLY;
        assert!(is_reply(&icmp, false, target, 9));
        assert!(!is_reply(&icmp, false, target, 10));
        let mut ip = vec![
            0x45, 0, 0, 0, 0, 0, 0, 0, 64, 1, 0, 0, 10, 0, 0, 100, 10, 0, 0, 1,
        ];
        ip.extend_from_slice(&icmp);
        assert!(is_reply(&ip, true, target, 9));
        assert!(!is_reply(&ip, true, Ipv4Addr::new(10, 0, 0, 101), 9));
        assert!(!is_reply(&ip[..10], true, target, 9));
        assert!(!is_reply(&[], true, target, 9));
    }
}
