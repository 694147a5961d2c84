//! pxed in proxy mode beside dnsmasq (which gives the addresses) on a bridged LAN of network
//! namespaces. A scripted PXE client sends the DISCOVER real firmware sends, then a port 4011
//! REQUEST, and must get the right boot file and never an address from pxed.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use pxed::dhcp::wire::{DhcpPacket, MessageType, Op};
use socket2::{Domain, Protocol, Socket, Type};

use crate::require_root;
use crate::support::{Daemon, Lan, udp_listening, wait_for};

const PXED_IP: Ipv4Addr = Ipv4Addr::new(10, 231, 0, 1);
const DNSMASQ_IP: Ipv4Addr = Ipv4Addr::new(10, 231, 0, 2);

struct Firmware {
    mac: [u8; 6],
    arch: u16,
    ipxe: bool,
    expect_file: &'static str,
}

fn discover(fw: &Firmware, xid: u32) -> DhcpPacket {
    let mut p = DhcpPacket::client_request(xid, pxed::mac::MacAddr(fw.mac));
    p.flags = 0x8000;
    p.options.set(53, vec![1]);
    p.options.set(55, vec![1, 3, 6, 43, 54, 60, 66, 67, 97]);
    p.options.set(
        60,
        format!("PXEClient:Arch:{:05}:UNDI:003016", fw.arch).into_bytes(),
    );
    p.options.set(93, fw.arch.to_be_bytes().to_vec());
    p.options.set(94, vec![1, 3, 16]);
    let mut guid = vec![0u8];
    guid.extend_from_slice(&[0x11; 16]);
    p.options.set(97, guid);
    if fw.ipxe {
        p.options.set(77, b"iPXE".to_vec());
        p.options.set(175, vec![0x13, 1, 1]);
    }
    p
}

fn client_socket(port: u16) -> UdpSocket {
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).unwrap();
    s.set_reuse_address(true).unwrap();
    s.set_broadcast(true).unwrap();
    s.bind_device(Some(b"eth0")).unwrap();
    s.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)).into())
        .unwrap();
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    s.into()
}

/// Collect replies with this xid until both servers answered or the deadline passed.
fn collect(sock: &UdpSocket, xid: u32, want: usize, within: Duration) -> Vec<DhcpPacket> {
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    let mut buf = [0u8; 1500];
    while Instant::now() < deadline && got.len() < want {
        if let Ok((n, _)) = sock.recv_from(&mut buf)
            && let Ok(p) = DhcpPacket::decode(&buf[..n])
            && p.xid == xid
            && p.op == Op::Reply
        {
            got.push(p);
        }
    }
    got
}

#[test]
fn proxy_beside_dnsmasq_boots_bios_uefi_and_ipxe() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let mut lan = Lan::new();
    let srv = lan.host("pxd", Some("10.231.0.1/24"));
    let dns = lan.host("dnm", Some("10.231.0.2/24"));
    let cli = lan.host("cli", None);

    let mut dnsmasq_cmd = lan.hosts[dns].command("dnsmasq");
    dnsmasq_cmd.args([
        "--no-daemon",
        "--port=0",
        "--interface=eth0",
        "--bind-interfaces",
        "--dhcp-range=10.231.0.100,10.231.0.150,1h",
        "--no-ping",
        "--log-dhcp",
        "--pid-file=",
    ]);
    dnsmasq_cmd.arg(format!(
        "--dhcp-leasefile={}",
        dir.path().join("dnsmasq.leases").display()
    ));
    let mut dnsmasq = Daemon::spawn(dnsmasq_cmd, &dir.path().join("dnsmasq.log"));

    let events = dir.path().join("events.jsonl");
    let mut pxed_cmd = lan.hosts[srv].command(env!("CARGO_BIN_EXE_pxed"));
    pxed_cmd.args(["serve", "--interface", "eth0", "--root"]);
    pxed_cmd.arg(&root).arg("--event-log").arg(&events);
    // The generated admin API token goes there, not to /var/lib/pxed.
    pxed_cmd.arg("--state-dir").arg(dir.path().join("state"));
    let mut pxed = Daemon::spawn(pxed_cmd, &dir.path().join("pxed.log"));

    wait_for("servers to listen", Duration::from_secs(10), || {
        pxed.assert_running();
        dnsmasq.assert_running();
        (udp_listening(&lan.hosts[srv], 67)
            && udp_listening(&lan.hosts[srv], 4011)
            && udp_listening(&lan.hosts[dns], 67))
        .then_some(())
    });

    let clients = [
        Firmware {
            mac: [0x52, 0x54, 0, 0xaa, 0, 1],
            arch: 0,
            ipxe: false,
            expect_file: "undionly.kpxe",
        },
        Firmware {
            mac: [0x52, 0x54, 0, 0xaa, 0, 2],
            arch: 7,
            ipxe: false,
            expect_file: "snponly.efi",
        },
        Firmware {
            mac: [0x52, 0x54, 0, 0xaa, 0, 3],
            arch: 7,
            ipxe: true,
            expect_file: "http://10.231.0.1:8080/boot.ipxe",
        },
    ];
    for (i, fw) in clients.iter().enumerate() {
        let xid = 0x5000_0000 + i as u32;
        let packet = discover(fw, xid);
        let ns = &lan.hosts[cli];
        let offers = ns.enter(move || {
            let sock = client_socket(68);
            sock.send_to(&packet.encode(&[]), (Ipv4Addr::BROADCAST, 67))
                .unwrap();
            collect(&sock, xid, 2, Duration::from_secs(5))
        });
        let from = |ip: Ipv4Addr| {
            offers
                .iter()
                .find(|p| p.options.server_id() == Some(ip))
                .unwrap_or_else(|| {
                    panic!(
                        "no offer from {ip}; got {offers:?}\npxed log:\n{}",
                        pxed.log_text()
                    )
                })
        };
        let address_offer = from(DNSMASQ_IP);
        assert!(
            !address_offer.yiaddr.is_unspecified(),
            "dnsmasq gives the address"
        );
        let proxy = from(PXED_IP);
        assert_eq!(proxy.message_type(), Some(MessageType::Offer));
        assert_eq!(
            proxy.yiaddr,
            Ipv4Addr::UNSPECIFIED,
            "pxed must never give an address"
        );
        assert_eq!(proxy.siaddr, PXED_IP);
        assert_eq!(
            proxy.file,
            fw.expect_file.as_bytes(),
            "boot file for {:?}",
            fw.mac
        );
        assert_eq!(proxy.options.get(60), Some(&b"PXEClient"[..]));
        assert_eq!(
            proxy.options.get(97),
            Some(&discover(fw, xid).options.get(97).unwrap().to_vec()[..])
        );

        // The client takes dnsmasq's address, then asks pxed's boot server on 4011.
        let addr = format!("{}/24", address_offer.yiaddr);
        ns.ip(&["addr", "add", &addr, "dev", "eth0"]);
        let mut request = discover(fw, xid + 0x100);
        request.options.set(53, vec![3]);
        request.ciaddr = address_offer.yiaddr;
        request.flags = 0;
        let acks = ns.enter(move || {
            let sock = client_socket(4011);
            sock.send_to(&request.encode(&[]), (PXED_IP, 4011)).unwrap();
            collect(&sock, xid + 0x100, 1, Duration::from_secs(5))
        });
        ns.ip(&["addr", "del", &addr, "dev", "eth0"]);
        let ack = acks
            .first()
            .unwrap_or_else(|| panic!("no 4011 reply\n{}", pxed.log_text()));
        assert_eq!(ack.message_type(), Some(MessageType::Ack));
        assert_eq!(ack.yiaddr, Ipv4Addr::UNSPECIFIED);
        assert_eq!(ack.file, fw.expect_file.as_bytes());
    }

    // The event stream recorded each client's proxy offer and 4011 answer.
    let text = std::fs::read_to_string(&events).unwrap();
    for fw in &clients {
        let mac = fw
            .mac
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":");
        for stage in ["proxy.offer", "proxy.4011"] {
            assert!(
                text.lines().any(|l| l.contains(&mac) && l.contains(stage)),
                "no {stage} event for {mac}:\n{text}"
            );
        }
    }
    pxed.assert_running();
}
