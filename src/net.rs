//! Operating-system networking that the standard library does not offer: binding a UDP socket
//! to one interface, reading an interface's IPv4 address, and adding an ARP entry so that a
//! reply can be unicast to a client that has no address yet. All `unsafe` lives here.

use std::ffi::CString;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use socket2::{Domain, Protocol, Socket, Type};

use crate::mac::MacAddr;

/// `SIOCSARP` from linux/sockios.h: set an ARP table entry.
const SIOCSARP: libc::c_ulong = 0x8955;
/// `ATF_COM` from linux/if_arp.h: the entry is complete (has a hardware address).
const ATF_COM: libc::c_int = 0x02;
/// `ARPHRD_ETHER` from linux/if_arp.h.
const ARPHRD_ETHER: libc::sa_family_t = 1;

/// A UDP socket for a DHCP-style service: broadcast allowed, address reuse (so that a proxy
/// can sit on 67 beside another server bound to other interfaces), bound to `interface` when
/// given (SO_BINDTODEVICE: only packets from that interface arrive, replies leave through it).
pub fn udp_socket(addr: SocketAddr, interface: Option<&str>) -> io::Result<std::net::UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_address(true)?;
    socket.set_broadcast(true)?;
    if let Some(ifname) = interface {
        socket.bind_device(Some(ifname.as_bytes())).map_err(|e| {
            io::Error::new(e.kind(), format!("cannot bind to interface {ifname}: {e}"))
        })?;
    }
    socket
        .bind(&addr.into())
        .map_err(|e| io::Error::new(e.kind(), format!("cannot bind UDP {addr}: {e}")))?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// The first IPv4 address and prefix length of an interface.
pub fn interface_ipv4(ifname: &str) -> io::Result<(Ipv4Addr, u8)> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head we free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut found = None;
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: cur is a node of the list getifaddrs returned; it stays valid until freed.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_name.is_null() || ifa.ifa_addr.is_null() {
            continue;
        }
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) };
        // SAFETY: ifa_addr is non-null; reading the family field is valid for any sockaddr.
        let family = unsafe { (*ifa.ifa_addr).sa_family };
        if name.to_bytes() != ifname.as_bytes() || i32::from(family) != libc::AF_INET {
            continue;
        }
        // SAFETY: family is AF_INET, so the address is a sockaddr_in.
        let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
        let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
        let prefix = if ifa.ifa_netmask.is_null() {
            32
        } else {
            // SAFETY: the netmask of an AF_INET address is a sockaddr_in.
            let mask = unsafe { &*(ifa.ifa_netmask as *const libc::sockaddr_in) };
            u32::from_be(mask.sin_addr.s_addr).count_ones() as u8
        };
        found = Some((ip, prefix));
        break;
    }
    // SAFETY: head came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    found.ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("interface {ifname} has no IPv4 address"),
        )
    })
}

/// Tell the kernel that `ip` is at `mac` on `ifname`, so that a unicast reply to a client
/// without an address reaches it (RFC 2131 4.1: "the server SHOULD unicast ... to the client's
/// hardware address and 'yiaddr'"). A plain UDP socket cannot do this by itself.
pub fn set_arp_entry(
    sock: &impl std::os::fd::AsRawFd,
    ifname: &str,
    ip: Ipv4Addr,
    mac: MacAddr,
) -> io::Result<()> {
    let name = CString::new(ifname).map_err(|_| io::Error::other("interface name has a NUL"))?;
    // SAFETY: arpreq is plain old data; all-zero is a valid value.
    let mut req: libc::arpreq = unsafe { std::mem::zeroed() };
    let pa = SocketAddrV4::new(ip, 0);
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(*pa.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in fits in sockaddr (both 16 bytes); we copy its bytes.
    unsafe {
        std::ptr::copy_nonoverlapping(
            &sin as *const libc::sockaddr_in as *const u8,
            &mut req.arp_pa as *mut libc::sockaddr as *mut u8,
            std::mem::size_of::<libc::sockaddr_in>(),
        );
    }
    req.arp_ha.sa_family = ARPHRD_ETHER;
    for (dst, src) in req.arp_ha.sa_data.iter_mut().zip(mac.0) {
        *dst = src as libc::c_char;
    }
    req.arp_flags = ATF_COM;
    for (dst, src) in req.arp_dev.iter_mut().zip(name.as_bytes().iter().take(15)) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCSARP takes a pointer to an arpreq, which lives for the call.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), SIOCSARP as _, &req as *const libc::arpreq) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The kernel's neighbour (ARP) table entry for `ip`, from /proc/net/arp: how TFTP and HTTP
/// name the machine behind a request in proxy mode, where pxed keeps no leases.
pub fn neighbour_mac(ip: Ipv4Addr) -> Option<MacAddr> {
    let table = std::fs::read_to_string("/proc/net/arp").ok()?;
    parse_arp_table(&table, ip)
}

fn parse_arp_table(table: &str, ip: Ipv4Addr) -> Option<MacAddr> {
    let wanted = ip.to_string();
    table.lines().skip(1).find_map(|line| {
        let mut cols = line.split_whitespace();
        let addr = cols.next()?;
        let hw = cols.nth(2)?;
        (addr == wanted && hw != "00:00:00:00:00:00")
            .then(|| hw.parse().ok())
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arp_table_lookup() {
        let table = "IP address       HW type     Flags       HW address            Mask     Device\n\
                     10.0.0.5         0x1         0x2         52:54:00:12:34:56     *        eth0\n\
                     10.0.0.6         0x1         0x0         00:00:00:00:00:00     *        eth0\n";
        assert_eq!(
            parse_arp_table(table, Ipv4Addr::new(10, 0, 0, 5)),
            Some("52:54:00:12:34:56".parse().unwrap())
        );
        assert_eq!(parse_arp_table(table, Ipv4Addr::new(10, 0, 0, 6)), None);
        assert_eq!(parse_arp_table(table, Ipv4Addr::new(10, 0, 0, 7)), None);
    }
}
