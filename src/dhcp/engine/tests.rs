//! Engine decisions, one test per rule. Packets are built here; the captured firmware packets
//! are replayed in `fixture_tests`.

use super::*;
use crate::dhcp::{ConflictProbe, SubnetConfig};
use crate::policy::PolicyConfig;
use std::time::Duration;

const SERVER: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const NOW: u64 = 1_700_000_000_000;

fn policy() -> Arc<Policy> {
    let cfg: PolicyConfig = toml::from_str(
        "[[profile]]\nname = \"default\"\nkernel = \"vmlinuz\"\ninitrd = [\"initrd.img\"]\n",
    )
    .unwrap();
    Arc::new(cfg.validate().unwrap())
}

fn subnet(network: [u8; 4]) -> SubnetConfig {
    let [a, b, c, _] = network;
    SubnetConfig {
        network: Ipv4Addr::from(network),
        prefix_len: 24,
        pool_start: Ipv4Addr::new(a, b, c, 100),
        pool_end: Ipv4Addr::new(a, b, c, 199),
        router: Some(Ipv4Addr::new(a, b, c, 1)),
        dns: vec![Ipv4Addr::new(a, b, c, 1)],
        domain: Some("lab".into()),
        lease_time: Duration::from_secs(3600),
        search: vec![],
        route: vec![],
        ntp: vec![],
        mtu: None,
        option: vec![],
    }
}

fn engine(mode: DhcpMode) -> DhcpEngine {
    let config = DhcpConfig {
        mode,
        subnet: vec![subnet([10, 0, 0, 0]), subnet([10, 9, 0, 0])],
        ..Default::default()
    };
    DhcpEngine::new(config, policy(), 8080, Vec::new())
}

/// What a client sends; the fields tests vary.
struct Client {
    mac: [u8; 6],
    kind: u8,
    arch: Option<u16>,
    vendor: Option<&'static str>,
    ipxe: bool,
    prl: Vec<u8>,
    uuid: Option<[u8; 16]>,
}

impl Client {
    fn bios_ipxe() -> Client {
        Client {
            mac: [0x52, 0x54, 0, 0, 0, 1],
            kind: 1,
            arch: Some(0),
            vendor: Some("PXEClient:Arch:00000:UNDI:002001"),
            ipxe: true,
            prl: vec![1, 3, 6, 43, 60, 66, 67, 175],
            uuid: None,
        }
    }
    fn edk2() -> Client {
        Client {
            mac: [0x52, 0x54, 0, 0, 0, 2],
            kind: 1,
            arch: Some(7),
            vendor: Some("PXEClient:Arch:00007:UNDI:003000"),
            ipxe: false,
            prl: vec![1, 3, 6, 43, 60, 66, 67, 97, 128],
            uuid: Some([0xab; 16]),
        }
    }
    fn plain() -> Client {
        Client {
            mac: [0x52, 0x54, 0, 0, 0, 3],
            kind: 1,
            arch: None,
            vendor: None,
            ipxe: false,
            prl: vec![1, 3, 6],
            uuid: None,
        }
    }
    fn packet(&self) -> DhcpPacket {
        let mut p = DhcpPacket::client_request(0x1234_5678, MacAddr(self.mac));
        p.secs = 4;
        p.options.set(53, vec![self.kind]);
        p.options.set(55, self.prl.clone());
        if let Some(v) = self.vendor {
            p.options.set(60, v.as_bytes().to_vec());
        }
        if let Some(a) = self.arch {
            p.options.set(93, a.to_be_bytes().to_vec());
        }
        if let Some(u) = self.uuid {
            let mut v = vec![0];
            v.extend_from_slice(&u);
            p.options.set(97, v);
        }
        if self.ipxe {
            p.options.set(77, b"iPXE".to_vec());
            p.options.set(175, vec![0x13, 1, 1]);
        }
        p
    }
}

fn rx(payload: &[u8], port: Port) -> Received<'_> {
    Received {
        payload,
        src: SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, CLIENT_PORT),
        port,
        server_ip: SERVER,
        now_ms: NOW,
    }
}

fn send(e: &mut DhcpEngine, p: &DhcpPacket, port: Port) -> Outcome {
    let bytes = p.encode(&[]);
    e.handle(&rx(&bytes, port))
}

fn stages(o: &Outcome) -> Vec<BootStage> {
    o.events.iter().map(|e| e.stage).collect()
}

#[test]
fn proxy_offer_for_ipxe_bios_carries_script_url_and_no_address() {
    let mut e = engine(DhcpMode::Proxy);
    let out = send(&mut e, &Client::bios_ipxe().packet(), Port::Dhcp);
    let reply = out.reply.clone().expect("a proxy offer");
    assert_eq!(reply.dest, Destination::Broadcast);
    let p = DhcpPacket::decode(&reply.payload).unwrap();
    assert_eq!(p.message_type(), Some(MessageType::Offer));
    assert_eq!(
        p.yiaddr,
        Ipv4Addr::UNSPECIFIED,
        "proxy never gives an address"
    );
    assert_eq!(p.siaddr, SERVER);
    assert_eq!(p.sname, b"10.0.0.1");
    assert_eq!(p.file, b"http://10.0.0.1:8080/boot.ipxe");
    assert_eq!(p.options.get(60), Some(&b"PXEClient"[..]));
    assert_eq!(
        p.options.get(67),
        Some(&b"http://10.0.0.1:8080/boot.ipxe"[..])
    );
    assert_eq!(p.options.get(66), Some(&b"10.0.0.1"[..]));
    assert!(p.options.get(43).is_some(), "43 {{6: 8}} for iPXE");
    assert!(
        p.options.get(175).is_none(),
        "no-pxedhcp is for full mode only"
    );
    assert!(p.options.get(51).is_none(), "no lease time in proxy mode");
    assert!(p.encode(&[]).len() >= 300);
    assert_eq!(
        stages(&out),
        vec![
            BootStage::IpxeDhcp,
            BootStage::DhcpDiscover,
            BootStage::ProxyOffer
        ]
    );
}

#[test]
fn proxy_uefi_gets_binl_offer_then_4011_ack_to_source() {
    let mut e = engine(DhcpMode::Proxy);
    let c = Client::edk2();
    let out = send(&mut e, &c.packet(), Port::Dhcp);
    let p = DhcpPacket::decode(&out.reply.unwrap().payload).unwrap();
    assert_eq!(p.file, b"snponly.efi");
    assert!(
        p.options.get(43).is_none(),
        "EDK2 in proxy mode: BINL offer, no 43"
    );
    let mut want97 = vec![0];
    want97.extend_from_slice(&[0xab; 16]);
    assert_eq!(p.options.get(97), Some(&want97[..]));

    let mut req = c.packet();
    req.options.set(53, vec![3]);
    req.ciaddr = Ipv4Addr::new(10, 0, 0, 150);
    let bytes = req.encode(&[]);
    let src = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 150), 4011);
    let out = e.handle(&Received {
        src,
        ..rx(&bytes, Port::BootServer)
    });
    let reply = out.reply.clone().expect("4011 ack");
    assert_eq!(
        reply.dest,
        Destination::Unicast(src),
        "4011 replies go to the source"
    );
    let p = DhcpPacket::decode(&reply.payload).unwrap();
    assert_eq!(p.message_type(), Some(MessageType::Ack));
    assert_eq!(p.file, b"snponly.efi");
    assert_eq!(p.options.get(60), Some(&b"PXEClient"[..]));
    assert_eq!(p.options.get(97), Some(&want97[..]));
    assert_eq!(stages(&out), vec![BootStage::Proxy4011]);
}

#[test]
fn proxy_ignores_non_pxe_clients_and_other_servers_requests() {
    let mut e = engine(DhcpMode::Proxy);
    let out = send(&mut e, &Client::plain().packet(), Port::Dhcp);
    assert!(out.reply.is_none());
    assert_eq!(stages(&out), vec![BootStage::DhcpIgnore]);

    let mut req = Client::edk2().packet();
    req.options.set(53, vec![3]);
    req.options.set(54, vec![10, 0, 0, 254]);
    let out = send(&mut e, &req, Port::Dhcp);
    assert!(out.reply.is_none());
    assert!(out.events[0].detail.contains("another DHCP server"));
}

#[test]
fn boot_options_66_67_only_when_requested() {
    let mut e = engine(DhcpMode::Proxy);
    let mut c = Client::edk2();
    c.prl = vec![1, 3, 6];
    let p =
        DhcpPacket::decode(&send(&mut e, &c.packet(), Port::Dhcp).reply.unwrap().payload).unwrap();
    assert!(p.options.get(66).is_none() && p.options.get(67).is_none());
    assert_eq!(
        p.file, b"snponly.efi",
        "the header always has the file (Q1)"
    );
}

#[test]
fn http_boot_client_gets_url_and_httpclient() {
    let mut e = engine(DhcpMode::Proxy);
    let mut c = Client::edk2();
    c.arch = Some(16);
    c.vendor = Some("HTTPClient:Arch:00016:UNDI:003000");
    let p =
        DhcpPacket::decode(&send(&mut e, &c.packet(), Port::Dhcp).reply.unwrap().payload).unwrap();
    assert_eq!(p.options.get(60), Some(&b"HTTPClient"[..]));
    assert_eq!(p.file, b"http://10.0.0.1:8080/snponly.efi");
}

#[test]
fn full_mode_cycle_commits_before_ack() {
    let mut e = engine(DhcpMode::Full);
    let c = Client::edk2();
    let offer = send(&mut e, &c.packet(), Port::Dhcp);
    assert!(offer.lease.is_none(), "an offer commits nothing");
    let reply = offer.reply.unwrap();
    let p = DhcpPacket::decode(&reply.payload).unwrap();
    let ip = p.yiaddr;
    assert!(subnet([10, 0, 0, 0]).contains(ip));
    assert_eq!(p.options.get(1), Some(&[255, 255, 255, 0][..]));
    assert_eq!(p.options.get(51), Some(&3600u32.to_be_bytes()[..]));
    assert_eq!(
        p.options.get(43),
        Some(&[6, 1, 8, 255][..]),
        "EDK2 full mode: 43 {{6: 8}}"
    );
    assert_eq!(p.file, b"snponly.efi");
    assert!(matches!(reply.dest, Destination::UnicastToHardware { .. }));

    let mut req = c.packet();
    req.options.set(53, vec![3]);
    req.options.set(54, SERVER.octets().to_vec());
    req.options.set(50, ip.octets().to_vec());
    let ack = send(&mut e, &req, Port::Dhcp);
    match &ack.lease {
        Some(LeaseChange::Commit(l)) => assert_eq!((l.ip, l.mac), (ip, MacAddr(c.mac))),
        other => panic!("expected a commit, got {other:?}"),
    }
    let p = DhcpPacket::decode(&ack.reply.as_ref().unwrap().payload).unwrap();
    assert_eq!(p.message_type(), Some(MessageType::Ack));
    assert_eq!(p.yiaddr, ip);

    // Another client asking for the same address is refused.
    let mut other = Client::plain();
    other.kind = 3;
    let mut req = other.packet();
    req.options.set(50, ip.octets().to_vec());
    let nak = send(&mut e, &req, Port::Dhcp);
    let reply = nak.reply.unwrap();
    assert_eq!(reply.dest, Destination::Broadcast);
    assert_eq!(
        DhcpPacket::decode(&reply.payload).unwrap().message_type(),
        Some(MessageType::Nak)
    );
}

#[test]
fn full_mode_ipxe_gets_no_pxedhcp() {
    let mut e = engine(DhcpMode::Full);
    let p = DhcpPacket::decode(
        &send(&mut e, &Client::bios_ipxe().packet(), Port::Dhcp)
            .reply
            .unwrap()
            .payload,
    )
    .unwrap();
    let opt175 = p.options.get(175).expect("175 for iPXE");
    assert!(opt175.windows(3).any(|w| w == [176, 1, 1]), "{opt175:?}");
}

#[test]
fn full_mode_plain_client_gets_address_without_boot_data() {
    let mut e = engine(DhcpMode::Full);
    let p = DhcpPacket::decode(
        &send(&mut e, &Client::plain().packet(), Port::Dhcp)
            .reply
            .unwrap()
            .payload,
    )
    .unwrap();
    assert!(!p.yiaddr.is_unspecified());
    assert!(p.file.is_empty() && p.options.get(60).is_none() && p.siaddr.is_unspecified());
}

#[test]
fn relayed_requests_use_the_relay_subnet_and_go_back_to_the_relay() {
    let mut e = engine(DhcpMode::Full);
    let mut p = Client::plain().packet();
    p.giaddr = Ipv4Addr::new(10, 9, 0, 1);
    p.hops = 1;
    let reply = send(&mut e, &p, Port::Dhcp).reply.unwrap();
    assert_eq!(
        reply.dest,
        Destination::Unicast(SocketAddrV4::new(Ipv4Addr::new(10, 9, 0, 1), SERVER_PORT))
    );
    let offer = DhcpPacket::decode(&reply.payload).unwrap();
    assert!(
        subnet([10, 9, 0, 0]).contains(offer.yiaddr),
        "{}",
        offer.yiaddr
    );
    assert_eq!(offer.giaddr, Ipv4Addr::new(10, 9, 0, 1));
}

#[test]
fn broadcast_flag_is_honoured() {
    let mut e = engine(DhcpMode::Full);
    let mut p = Client::plain().packet();
    p.flags = 0x8000;
    assert_eq!(
        send(&mut e, &p, Port::Dhcp).reply.unwrap().dest,
        Destination::Broadcast
    );
}

#[test]
fn release_and_decline_remove_leases() {
    let mut e = engine(DhcpMode::Full);
    let c = Client::plain();
    let ip = DhcpPacket::decode(&send(&mut e, &c.packet(), Port::Dhcp).reply.unwrap().payload)
        .unwrap()
        .yiaddr;
    let mut req = c.packet();
    req.options.set(53, vec![3]);
    req.options.set(50, ip.octets().to_vec());
    send(&mut e, &req, Port::Dhcp);
    let mut decline = c.packet();
    decline.options.set(53, vec![4]);
    decline.options.set(50, ip.octets().to_vec());
    let out = send(&mut e, &decline, Port::Dhcp);
    assert!(matches!(out.lease, Some(LeaseChange::Decline(_))));
    assert!(out.reply.is_none());
    // The quarantined address is not offered again.
    let again =
        DhcpPacket::decode(&send(&mut e, &c.packet(), Port::Dhcp).reply.unwrap().payload).unwrap();
    assert_ne!(again.yiaddr, ip);
}

#[test]
fn garbage_never_panics_and_is_not_answered() {
    let mut e = engine(DhcpMode::Full);
    for bytes in [&[][..], &[1u8; 10][..], &[0u8; 300][..], &[0xffu8; 600][..]] {
        assert!(e.handle(&rx(bytes, Port::Dhcp)).reply.is_none());
    }
}

fn engine_with(f: impl FnOnce(&mut DhcpConfig)) -> DhcpEngine {
    let mut config = DhcpConfig {
        mode: DhcpMode::Full,
        subnet: vec![subnet([10, 0, 0, 0]), subnet([10, 9, 0, 0])],
        ..Default::default()
    };
    f(&mut config);
    config.validate().unwrap();
    DhcpEngine::new(config, policy(), 8080, Vec::new())
}

fn decode(o: &Outcome) -> DhcpPacket {
    DhcpPacket::decode(&o.reply.as_ref().expect("a reply").payload).unwrap()
}

/// DISCOVER then REQUEST (SELECTING); returns the ACKed address.
fn dora(e: &mut DhcpEngine, c: &Client) -> Ipv4Addr {
    let ip = decode(&send(e, &c.packet(), Port::Dhcp)).yiaddr;
    let mut req = c.packet();
    req.options.set(53, vec![3]);
    req.options.set(54, SERVER.octets().to_vec());
    req.options.set(50, ip.octets().to_vec());
    let ack = send(e, &req, Port::Dhcp);
    assert_eq!(decode(&ack).message_type(), Some(MessageType::Ack));
    ip
}

fn request(c: &Client, f: impl FnOnce(&mut DhcpPacket)) -> DhcpPacket {
    let mut req = c.packet();
    req.options.set(53, vec![3]);
    f(&mut req);
    req
}

#[test]
fn options_people_set_are_encoded_per_their_rfcs() {
    let mut e = engine_with(|c| {
        let s = &mut c.subnet[0];
        s.search = vec!["lab.example".into(), "example".into()];
        s.route = vec![crate::dhcp::RouteConfig {
            network: Ipv4Addr::new(172, 16, 0, 0),
            prefix_len: 12,
            gateway: Ipv4Addr::new(10, 0, 0, 254),
        }];
        s.ntp = vec![Ipv4Addr::new(10, 0, 0, 5)];
        s.mtu = Some(9000);
        s.option = vec![crate::dhcp::RawOption {
            code: 252,
            hex: None,
            text: Some("http://wpad/wpad.dat".into()),
        }];
    });
    let p = decode(&send(&mut e, &Client::plain().packet(), Port::Dhcp));
    // RFC 3397: uncompressed DNS names.
    assert_eq!(
        p.options.get(119),
        Some(&b"\x03lab\x07example\x00\x07example\x00"[..])
    );
    // RFC 3442: /12 -> 2 significant octets; the router becomes 0/0 (option 3 is ignored).
    assert_eq!(
        p.options.get(121),
        Some(&[12, 172, 16, 10, 0, 0, 254, 0, 10, 0, 0, 1][..])
    );
    assert_eq!(p.options.get(42), Some(&[10, 0, 0, 5][..]));
    assert_eq!(p.options.get(26), Some(&9000u16.to_be_bytes()[..]));
    assert_eq!(p.options.get(252), Some(&b"http://wpad/wpad.dat"[..]));
    assert_eq!(p.options.get(15), Some(&b"lab"[..]));
    assert_eq!(p.options.get(6), Some(&[10, 0, 0, 1][..]));
}

#[test]
fn reservation_by_mac_and_by_client_id() {
    let mut by_id = Client::plain();
    by_id.mac = [0x52, 0x54, 0, 0, 0, 9];
    let mut e = engine_with(|c| {
        c.reservation = vec![
            crate::dhcp::ReservationConfig {
                mac: Some(MacAddr(Client::plain().mac)),
                client_id: None,
                ip: Ipv4Addr::new(10, 0, 0, 50),
                hostname: Some("db1".into()),
            },
            crate::dhcp::ReservationConfig {
                mac: None,
                client_id: Some("ff:00:00:00:01".into()),
                ip: Ipv4Addr::new(10, 0, 0, 51),
                hostname: None,
            },
        ];
    });
    let offer = decode(&send(&mut e, &Client::plain().packet(), Port::Dhcp));
    assert_eq!(offer.yiaddr, Ipv4Addr::new(10, 0, 0, 50));
    assert_eq!(offer.options.get(12), Some(&b"db1"[..]));
    let mut p = by_id.packet();
    p.options.set(61, vec![0xff, 0, 0, 0, 1]);
    assert_eq!(
        decode(&send(&mut e, &p, Port::Dhcp)).yiaddr,
        Ipv4Addr::new(10, 0, 0, 51)
    );
    // A reserved address is never given to someone else, even on request.
    let mut other = Client::plain();
    other.mac = [0x52, 0x54, 0, 0, 0, 0x77];
    let nak = send(
        &mut e,
        &request(&other, |r| r.options.set(50, vec![10, 0, 0, 50])),
        Port::Dhcp,
    );
    assert_eq!(decode(&nak).message_type(), Some(MessageType::Nak));
    // The reserved machine asking for a pool address is moved to its reservation.
    let nak = send(
        &mut e,
        &request(&Client::plain(), |r| r.options.set(50, vec![10, 0, 0, 120])),
        Port::Dhcp,
    );
    assert_eq!(decode(&nak).message_type(), Some(MessageType::Nak));
}

#[test]
fn one_address_through_the_whole_boot_despite_changing_client_ids() {
    let mut e = engine(DhcpMode::Full);
    let firmware = Client::edk2();
    let ip = dora(&mut e, &firmware);
    // iPXE and then the OS send other client identifiers from the same NIC.
    for id in [
        vec![1, 0x52, 0x54, 0, 0, 0, 2],
        vec![0xff, 1, 2, 3, 4, 5, 6, 7, 8],
    ] {
        let mut p = Client::plain().packet();
        p.chaddr[..6].copy_from_slice(&firmware.mac);
        p.options.set(61, id);
        assert_eq!(decode(&send(&mut e, &p, Port::Dhcp)).yiaddr, ip);
    }
}

#[test]
fn init_reboot_renewing_rebinding() {
    let mut e = engine(DhcpMode::Full);
    let c = Client::plain();
    let ip = dora(&mut e, &c);
    // INIT-REBOOT: no server id, requested address, no ciaddr.
    let out = send(
        &mut e,
        &request(&c, |r| r.options.set(50, ip.octets().to_vec())),
        Port::Dhcp,
    );
    assert_eq!(decode(&out).message_type(), Some(MessageType::Ack));
    assert!(matches!(out.lease, Some(LeaseChange::Renew(_))));
    // INIT-REBOOT on a foreign network: NAK, broadcast (RFC 2131 4.3.2).
    let out = send(
        &mut e,
        &request(&c, |r| r.options.set(50, vec![192, 168, 7, 7])),
        Port::Dhcp,
    );
    assert_eq!(decode(&out).message_type(), Some(MessageType::Nak));
    assert_eq!(out.reply.unwrap().dest, Destination::Broadcast);
    // RENEWING: ciaddr, unicast back to ciaddr.
    let out = send(&mut e, &request(&c, |r| r.ciaddr = ip), Port::Dhcp);
    assert_eq!(decode(&out).yiaddr, ip);
    assert_eq!(
        out.reply.unwrap().dest,
        Destination::Unicast(SocketAddrV4::new(ip, CLIENT_PORT))
    );
    // Another client renewing our address: NAK.
    let mut thief = Client::plain();
    thief.mac = [0x52, 0x54, 0, 0, 0, 0x66];
    let out = send(&mut e, &request(&thief, |r| r.ciaddr = ip), Port::Dhcp);
    assert_eq!(decode(&out).message_type(), Some(MessageType::Nak));
}

#[test]
fn not_authoritative_stays_silent_for_unknown_clients() {
    let mut e = engine_with(|c| c.authoritative = false);
    let c = Client::plain();
    for f in [
        (|r: &mut DhcpPacket| r.options.set(50, vec![192, 168, 7, 7])) as fn(&mut DhcpPacket),
        |r: &mut DhcpPacket| r.ciaddr = Ipv4Addr::new(192, 168, 7, 7),
    ] {
        let out = send(&mut e, &request(&c, f), Port::Dhcp);
        assert!(out.reply.is_none(), "{:?}", out.events);
    }
    // A free address on this network is granted (a client keeps its address after the
    // store was lost: the recovery path for a damaged store).
    let out = send(
        &mut e,
        &request(&c, |r| r.ciaddr = Ipv4Addr::new(10, 0, 0, 150)),
        Port::Dhcp,
    );
    assert_eq!(decode(&out).yiaddr, Ipv4Addr::new(10, 0, 0, 150));
    // It does NAK a client it knows, asking for a wrong address.
    dora(&mut e, &c);
    let out = send(
        &mut e,
        &request(&c, |r| r.options.set(50, vec![192, 168, 7, 7])),
        Port::Dhcp,
    );
    assert_eq!(decode(&out).message_type(), Some(MessageType::Nak));
}

#[test]
fn selecting_another_server_is_silent_and_inform_gets_no_lease() {
    let mut e = engine(DhcpMode::Full);
    let c = Client::plain();
    let out = send(
        &mut e,
        &request(&c, |r| {
            r.options.set(54, vec![10, 0, 0, 254]);
            r.options.set(50, vec![10, 0, 0, 120]);
        }),
        Port::Dhcp,
    );
    assert!(out.reply.is_none() && out.lease.is_none());
    let mut inform = c.packet();
    inform.options.set(53, vec![8]);
    inform.ciaddr = Ipv4Addr::new(10, 0, 0, 33);
    let out = send(&mut e, &inform, Port::Dhcp);
    let p = decode(&out);
    assert_eq!(p.message_type(), Some(MessageType::Ack));
    assert_eq!(p.yiaddr, Ipv4Addr::UNSPECIFIED);
    assert!(p.options.get(51).is_none(), "RFC 2131 4.3.5: no lease time");
    assert!(out.lease.is_none());
    assert_eq!(
        out.reply.unwrap().dest,
        Destination::Unicast(SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 33), CLIENT_PORT))
    );
}

#[test]
fn pool_exhaustion_offers_nothing() {
    let mut e = engine_with(|c| {
        c.subnet[0].pool_start = Ipv4Addr::new(10, 0, 0, 100);
        c.subnet[0].pool_end = Ipv4Addr::new(10, 0, 0, 101);
    });
    for n in 0..2u8 {
        let mut c = Client::plain();
        c.mac[5] = 0x10 + n;
        dora(&mut e, &c);
    }
    let mut late = Client::plain();
    late.mac[5] = 0x20;
    let out = send(&mut e, &late.packet(), Port::Dhcp);
    assert!(out.reply.is_none());
    assert!(out.events.iter().any(|ev| ev.detail.contains("exhausted")));
}

#[test]
fn two_clients_in_one_batch_never_share_an_address() {
    // The driver holds ACKs until the batch is durable; the engine must already have
    // recorded the first lease when it decides the second.
    let mut e = engine(DhcpMode::Full);
    let a = Client::plain();
    let mut b = Client::plain();
    b.mac[5] = 0x44;
    let ip = decode(&send(&mut e, &a.packet(), Port::Dhcp)).yiaddr;
    let req = |c: &Client| request(c, |r| r.options.set(50, ip.octets().to_vec()));
    let first = send(&mut e, &req(&a), Port::Dhcp);
    assert!(matches!(first.lease, Some(LeaseChange::Commit(_))));
    let second = send(&mut e, &req(&b), Port::Dhcp);
    assert_eq!(decode(&second).message_type(), Some(MessageType::Nak));
    assert!(second.lease.is_none());
}

#[test]
fn relay_agent_information_is_echoed_and_link_selection_picks_the_subnet() {
    let mut e = engine(DhcpMode::Full);
    let mut p = Client::plain().packet();
    p.giaddr = Ipv4Addr::new(10, 0, 0, 2);
    // Circuit id "eth3", link selection 10.9.0.0 (RFC 3527).
    let info = vec![1, 4, b'e', b't', b'h', b'3', 5, 4, 10, 9, 0, 0];
    p.options.set(82, info.clone());
    let out = send(&mut e, &p, Port::Dhcp);
    let offer = decode(&out);
    assert!(
        subnet([10, 9, 0, 0]).contains(offer.yiaddr),
        "{}",
        offer.yiaddr
    );
    assert_eq!(offer.options.get(82), Some(&info[..]));
    assert_eq!(
        out.reply.unwrap().dest,
        Destination::Unicast(SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 2), SERVER_PORT))
    );
}

#[test]
fn release_frees_and_decline_of_others_address_is_ignored() {
    let mut e = engine(DhcpMode::Full);
    let c = Client::plain();
    let ip = dora(&mut e, &c);
    let mut other = Client::plain();
    other.mac[5] = 0x55;
    let mut decline = other.packet();
    decline.options.set(53, vec![4]);
    decline.options.set(50, ip.octets().to_vec());
    assert!(send(&mut e, &decline, Port::Dhcp).lease.is_none());
    let mut release = c.packet();
    release.options.set(53, vec![7]);
    release.ciaddr = ip;
    let out = send(&mut e, &release, Port::Dhcp);
    assert!(matches!(out.lease, Some(LeaseChange::Release(_))));
    assert!(out.reply.is_none(), "RFC 2131 4.3.4: no reply to RELEASE");
    assert!(e.pool().lease(&MacAddr(c.mac)).is_none());
}

#[test]
fn leases_expire_on_tick() {
    let mut e = engine(DhcpMode::Full);
    let ip = dora(&mut e, &Client::plain());
    assert!(e.tick(NOW + 1000).is_empty());
    let ended = e.tick(NOW + 3601 * 1000);
    assert!(matches!(&ended[..], [LeaseChange::Expire(l)] if l.ip == ip));
}

#[test]
fn malformed_requests_are_dropped() {
    let mut e = engine(DhcpMode::Full);
    // A REQUEST with neither requested address nor ciaddr.
    let out = send(&mut e, &request(&Client::plain(), |_| {}), Port::Dhcp);
    assert!(out.reply.is_none() && out.lease.is_none());
    // Truncated and oversized option lengths.
    let mut bytes = Client::plain().packet().encode(&[]);
    bytes.truncate(245);
    assert!(e.handle(&rx(&bytes, Port::Dhcp)).reply.is_none());
    // A BOOTREPLY sent to the server.
    let mut p = Client::plain().packet();
    p.op = Op::Reply;
    assert!(send(&mut e, &p, Port::Dhcp).reply.is_none());
}

/// The packets real firmware sent under QEMU (tests/fixtures/dhcp), replayed through the engine:
/// each row of the reply table with the exact bytes the firmware sends.
mod fixture_tests {
    use super::*;

    fn fixture(name: &str) -> Vec<u8> {
        let path = format!(
            "{}/tests/fixtures/dhcp/{name}.bin",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    fn reply_to(mode: DhcpMode, name: &str, port: Port) -> DhcpPacket {
        let mut e = engine(mode);
        let bytes = fixture(name);
        let out = e.handle(&Received {
            src: SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 150), CLIENT_PORT),
            ..rx(&bytes, port)
        });
        let reply = out
            .reply
            .unwrap_or_else(|| panic!("no reply to {name}: {:?}", out.events));
        DhcpPacket::decode(&reply.payload).unwrap()
    }

    #[test]
    fn ipxe_bios_rom_gets_the_script_url() {
        for mode in [DhcpMode::Proxy, DhcpMode::Full] {
            let p = reply_to(mode, "ipxe-bios-discover", Port::Dhcp);
            assert_eq!(p.file, b"http://10.0.0.1:8080/boot.ipxe", "{mode:?}");
            assert_eq!(p.options.get(60), Some(&b"PXEClient"[..]));
            assert_eq!(p.options.get(175).is_some(), mode == DhcpMode::Full);
        }
    }

    #[test]
    fn ipxe_efi_gets_the_script_url() {
        let p = reply_to(DhcpMode::Full, "ipxe-efi-discover", Port::Dhcp);
        assert_eq!(p.file, b"http://10.0.0.1:8080/boot.ipxe");
    }

    #[test]
    fn edk2_pxe_gets_snponly_binl_in_proxy_and_bypass_in_full() {
        let proxy = reply_to(DhcpMode::Proxy, "edk2-pxe-discover", Port::Dhcp);
        assert_eq!(proxy.file, b"snponly.efi");
        assert!(proxy.options.get(43).is_none());
        let full = reply_to(DhcpMode::Full, "edk2-pxe-discover", Port::Dhcp);
        assert_eq!(full.file, b"snponly.efi");
        assert_eq!(full.options.get(43), Some(&[6, 1, 8, 255][..]));
        assert!(!full.yiaddr.is_unspecified());
        // EDK2 sends a UUID; it is echoed (EDK2 checks it on 4011 replies).
        let sent = DhcpPacket::decode(&fixture("edk2-pxe-discover")).unwrap();
        assert_eq!(full.options.get(97), sent.options.get(97));
    }

    #[test]
    fn edk2_http_boot_gets_a_url_and_httpclient() {
        // The DISCOVER EDK2's HttpBootDxe sent under QEMU (arch 16, `HTTPClient`).
        for mode in [DhcpMode::Proxy, DhcpMode::Full] {
            let p = reply_to(mode, "edk2-http-discover", Port::Dhcp);
            assert_eq!(p.options.get(60), Some(&b"HTTPClient"[..]), "{mode:?}");
            assert_eq!(p.file, b"http://10.0.0.1:8080/snponly.efi", "{mode:?}");
            assert!(
                p.options.get(43).is_none(),
                "no PXE sub-options for HTTP boot"
            );
        }
    }

    #[test]
    fn edk2_request_on_4011_gets_an_ack_with_the_file() {
        let p = reply_to(DhcpMode::Proxy, "edk2-pxe-request", Port::BootServer);
        assert_eq!(p.message_type(), Some(MessageType::Ack));
        assert_eq!(p.file, b"snponly.efi");
    }

    #[test]
    fn options_come_in_the_clients_order() {
        let sent = DhcpPacket::decode(&fixture("edk2-pxe-discover")).unwrap();
        let prl = sent.options.parameter_request_list().to_vec();
        let mut e = engine(DhcpMode::Full);
        let bytes = fixture("edk2-pxe-discover");
        let payload = e.handle(&rx(&bytes, Port::Dhcp)).reply.unwrap().payload;
        // Walk the encoded options: 53, 54 first, then the PRL's order.
        let mut codes = Vec::new();
        let mut i = 240;
        while let Some(&code) = payload.get(i) {
            if code == 255 {
                break;
            }
            if code == 0 {
                i += 1;
                continue;
            }
            codes.push(code);
            i += 2 + usize::from(payload[i + 1]);
        }
        assert_eq!(&codes[..2], &[53, 54]);
        let in_prl: Vec<u8> = codes[2..]
            .iter()
            .copied()
            .filter(|c| prl.contains(c))
            .collect();
        let expected: Vec<u8> = prl
            .iter()
            .copied()
            .filter(|c| codes.contains(c) && *c != 53 && *c != 54)
            .collect();
        assert_eq!(in_prl, expected);
    }
}

fn reply_with(config: DhcpConfig, c: &Client) -> DhcpPacket {
    let mut e = DhcpEngine::new(config, policy(), 8080, Vec::new());
    DhcpPacket::decode(&send(&mut e, &c.packet(), Port::Dhcp).reply.unwrap().payload).unwrap()
}

#[test]
fn compat_settings_default_on_and_each_can_be_turned_off() {
    let base = DhcpConfig {
        mode: DhcpMode::Full,
        subnet: vec![subnet([10, 0, 0, 0])],
        ..DhcpConfig::default()
    };
    let c = Client::edk2();
    let on = reply_with(base.clone(), &c);
    assert_eq!(on.options.get(60), Some(&b"PXEClient"[..]));
    assert!(on.options.contains(43));
    assert!(on.options.contains(67) && !on.file.is_empty() && on.siaddr == SERVER);

    // Q3: a server without option 60.
    let no60 = reply_with(
        DhcpConfig {
            pxe_vendor_option: false,
            ..base.clone()
        },
        &c,
    );
    assert!(!no60.options.contains(60) && no60.options.contains(43));
    // Q2: a server without option 43.
    let no43 = reply_with(
        DhcpConfig {
            discovery_control: false,
            ..base.clone()
        },
        &c,
    );
    assert!(!no43.options.contains(43) && no43.options.contains(60));
    // Q1: header only, then options only.
    let header = reply_with(
        DhcpConfig {
            boot_file: BootFileFields::Header,
            ..base.clone()
        },
        &c,
    );
    assert!(!header.options.contains(66) && !header.options.contains(67));
    assert_eq!(header.file, b"snponly.efi");
    let options = reply_with(
        DhcpConfig {
            boot_file: BootFileFields::Options,
            ..base
        },
        &c,
    );
    assert_eq!(options.options.get(67), Some(&b"snponly.efi"[..]));
    assert_eq!(options.options.get(66), Some(SERVER.to_string().as_bytes()));
    assert!(options.file.is_empty() && options.sname.is_empty());
    assert!(options.siaddr.is_unspecified());
}

#[test]
fn arch_from_option_60_when_93_is_missing_unless_turned_off() {
    let base = DhcpConfig {
        mode: DhcpMode::Full,
        subnet: vec![subnet([10, 0, 0, 0])],
        ..DhcpConfig::default()
    };
    let mut c = Client::edk2();
    c.arch = None;
    // Q5: option 60 says Arch:00007, so the client still gets the UEFI program.
    assert_eq!(reply_with(base.clone(), &c).file, b"snponly.efi");
    let strict = reply_with(
        DhcpConfig {
            arch_from_vendor_class: false,
            ..base
        },
        &c,
    );
    assert_ne!(
        strict.file, b"snponly.efi",
        "read as BIOS without option 93"
    );
}

#[test]
fn arch_9_is_x64_unless_turned_off() {
    let base = DhcpConfig {
        mode: DhcpMode::Full,
        subnet: vec![subnet([10, 0, 0, 0])],
        ..DhcpConfig::default()
    };
    let mut c = Client::edk2();
    c.arch = Some(9);
    c.vendor = Some("PXEClient:Arch:00009:UNDI:003000");
    // Q5: 9 is x64 UEFI as much as 7 is.
    assert_eq!(reply_with(base.clone(), &c).file, b"snponly.efi");
    let only_7 = reply_with(
        DhcpConfig {
            arch_9_is_x64: false,
            ..base
        },
        &c,
    );
    assert_ne!(
        only_7.file, b"snponly.efi",
        "9 unknown: the default program"
    );
}

#[test]
fn broadcast_flag_is_honoured_unless_turned_off() {
    let base = DhcpConfig {
        mode: DhcpMode::Full,
        subnet: vec![subnet([10, 0, 0, 0])],
        ..DhcpConfig::default()
    };
    let mut p = Client::edk2().packet();
    p.flags = 0x8000;
    let dest = |config: DhcpConfig| {
        let mut e = DhcpEngine::new(config, policy(), 8080, Vec::new());
        send(&mut e, &p, Port::Dhcp).reply.unwrap().dest
    };
    // RFC 2131 4.1: the client asked for broadcast.
    assert_eq!(dest(base.clone()), Destination::Broadcast);
    let ignoring = dest(DhcpConfig {
        honour_broadcast_flag: false,
        ..base
    });
    assert!(
        matches!(ignoring, Destination::UnicastToHardware { .. }),
        "{ignoring:?}"
    );
}

#[test]
fn pxe_client_without_uuid_is_served_unless_turned_off() {
    let base = DhcpConfig {
        mode: DhcpMode::Full,
        subnet: vec![subnet([10, 0, 0, 0])],
        ..DhcpConfig::default()
    };
    let mut c = Client::edk2();
    c.uuid = None;
    assert_eq!(reply_with(base.clone(), &c).file, b"snponly.efi");
    let mut strict = DhcpEngine::new(
        DhcpConfig {
            serve_without_uuid: false,
            ..base
        },
        policy(),
        8080,
        Vec::new(),
    );
    let out = send(&mut strict, &c.packet(), Port::Dhcp);
    assert!(out.reply.is_none());
    assert_eq!(stages(&out), vec![BootStage::DhcpIgnore]);
    // With its UUID the same client is answered, and a client that is not PXE never needs one.
    assert!(
        send(&mut strict, &Client::edk2().packet(), Port::Dhcp)
            .reply
            .is_some()
    );
    assert!(
        send(&mut strict, &Client::plain().packet(), Port::Dhcp)
            .reply
            .is_some()
    );
}

/// Q12: one boot sends several DHCP conversations; retransmissions and missing UUIDs must not
/// change the answer, and a client that skips 4011 still gets its boot file on port 67.
mod repeated_and_partial_clients {
    use super::*;

    #[test]
    fn retransmitted_discover_gets_the_same_offer() {
        let mut e = engine(DhcpMode::Full);
        let mut c = Client::edk2();
        c.uuid = None;
        let first =
            DhcpPacket::decode(&send(&mut e, &c.packet(), Port::Dhcp).reply.unwrap().payload)
                .unwrap();
        let mut again = c.packet();
        again.secs = 8;
        let second =
            DhcpPacket::decode(&send(&mut e, &again, Port::Dhcp).reply.unwrap().payload).unwrap();
        assert_eq!(first.yiaddr, second.yiaddr);
        assert_eq!(first.file, second.file);
        assert!(
            second.options.get(97).is_none(),
            "no UUID sent, none echoed"
        );
    }

    #[test]
    fn proxy_request_on_67_to_pxed_gets_an_ack() {
        let mut e = engine(DhcpMode::Proxy);
        let mut req = Client::edk2().packet();
        req.options.set(53, vec![3]);
        req.options.set(54, SERVER.octets().to_vec());
        let out = send(&mut e, &req, Port::Dhcp);
        let p = DhcpPacket::decode(&out.reply.unwrap().payload).unwrap();
        assert_eq!(p.message_type(), Some(MessageType::Ack));
        assert_eq!(p.yiaddr, Ipv4Addr::UNSPECIFIED);
        assert_eq!(p.file, b"snponly.efi");
    }
}

fn probing_engine() -> DhcpEngine {
    engine_with(|c| c.conflict_probe = ConflictProbe::Icmp)
}

fn at(e: &mut DhcpEngine, p: &DhcpPacket, now_ms: u64) -> Outcome {
    let bytes = p.encode(&[]);
    let mut r = rx(&bytes, Port::Dhcp);
    r.now_ms = now_ms;
    e.handle(&r)
}

#[test]
fn conflict_probe_is_off_by_default_and_offers_at_once() {
    let mut e = engine(DhcpMode::Full);
    let out = send(&mut e, &Client::plain().packet(), Port::Dhcp);
    assert_eq!(out.probe, None);
    assert_eq!(decode(&out).message_type(), Some(MessageType::Offer));
}

#[test]
fn conflict_probe_holds_the_offer_without_blocking_other_clients() {
    let mut e = probing_engine();
    let a = Client::plain();
    let out = at(&mut e, &a.packet(), NOW);
    let ip = out.probe.expect("a probe of the chosen address");
    assert!(out.reply.is_none(), "the OFFER waits for the probe");
    assert_eq!(stages(&out), [BootStage::DhcpDiscover]);
    // A retransmission during the probe starts no second probe.
    let again = at(&mut e, &a.packet(), NOW + 100);
    assert!(again.reply.is_none() && again.probe.is_none());
    // Another client meanwhile gets another address, with its own probe: nobody waits.
    let mut b = Client::plain();
    b.mac = [0x52, 0x54, 0, 0, 0, 9];
    let other = at(&mut e, &b.packet(), NOW + 50).probe.expect("b's probe");
    assert_ne!(other, ip);
    // Free: the held OFFER (with its event) goes out.
    let done = e.probe_result(ip, false, NOW + 300);
    let offer = decode(&done);
    assert_eq!(offer.message_type(), Some(MessageType::Offer));
    assert_eq!(offer.yiaddr, ip);
    assert_eq!(stages(&done), [BootStage::DhcpOffer]);
    // A result nobody waits for (already answered) does nothing.
    assert_eq!(e.probe_result(ip, false, NOW + 310), Outcome::default());
    // Within PROBE_MEMORY_SECS the same address is offered again without a probe.
    let retry = at(&mut e, &a.packet(), NOW + 2_000);
    assert_eq!(retry.probe, None);
    assert_eq!(decode(&retry).yiaddr, ip);
}

#[test]
fn an_address_in_use_is_quarantined_and_another_offered() {
    let mut e = probing_engine();
    let a = Client::plain();
    let squatted = at(&mut e, &a.packet(), NOW).probe.unwrap();
    let out = e.probe_result(squatted, true, NOW + 10);
    assert!(out.reply.is_none());
    assert_eq!(
        out.events.first().map(|ev| ev.stage),
        Some(BootStage::DhcpDecline)
    );
    let next = out
        .probe
        .expect("the DISCOVER decided again, with a new probe");
    assert_ne!(next, squatted);
    let offer = decode(&e.probe_result(next, false, NOW + 20));
    assert_eq!(offer.yiaddr, next);
    // Nobody is offered the squatted address during the quarantine, even asking for it.
    let mut b = Client::plain();
    b.mac = [0x52, 0x54, 0, 0, 0, 9];
    let mut ask = b.packet();
    ask.options.set(50, squatted.octets().to_vec());
    assert_ne!(at(&mut e, &ask, NOW + 30).probe, Some(squatted));
}

#[test]
fn a_clients_own_lease_and_lost_results_are_not_probed_or_kept() {
    let mut e = probing_engine();
    let c = Client::plain();
    let ip = at(&mut e, &c.packet(), NOW).probe.unwrap();
    e.probe_result(ip, false, NOW);
    let mut req = c.packet();
    req.options.set(53, vec![3]);
    req.options.set(54, SERVER.octets().to_vec());
    req.options.set(50, ip.octets().to_vec());
    assert_eq!(
        decode(&send(&mut e, &req, Port::Dhcp)).message_type(),
        Some(MessageType::Ack)
    );
    // Long after the probe memory, the holder of the live lease is still not probed.
    let later = at(&mut e, &c.packet(), NOW + (PROBE_MEMORY_SECS + 10) * 1000);
    assert_eq!(later.probe, None);
    assert_eq!(decode(&later).yiaddr, ip);
    // A probe whose result never comes is forgotten on tick.
    let mut d = Client::plain();
    d.mac = [0x52, 0x54, 0, 0, 0, 8];
    let pending = at(&mut e, &d.packet(), NOW).probe.unwrap();
    e.tick(NOW + 10_000);
    assert_eq!(
        e.probe_result(pending, false, NOW + 10_001),
        Outcome::default()
    );
}

#[test]
fn an_expired_client_comes_back_to_its_address() {
    let mut e = engine(DhcpMode::Full);
    let c = Client::plain();
    let ip = dora(&mut e, &c);
    let ended = e.tick(NOW + 3601 * 1000);
    assert!(matches!(&ended[..], [LeaseChange::Expire(l)] if l.ip == ip));
    assert!(
        ended.iter().all(|c| !c.ends()),
        "the store keeps it as remembered"
    );
    let later = NOW + 3700 * 1000;
    let mut other = Client::plain();
    other.mac = [0x52, 0x54, 0, 0, 0, 9];
    assert_ne!(decode(&at(&mut e, &other.packet(), later)).yiaddr, ip);
    assert_eq!(decode(&at(&mut e, &c.packet(), later)).yiaddr, ip);
}

/// A one-shot profile that hands the firmware a loader directly: once the machine reported the
/// stage, DHCP must not send it to that loader (its installer) again, but to iPXE, whose
/// script then boots the local disk (the same plan HTTP and TFTP make).
#[test]
fn finished_one_shot_machine_is_not_sent_to_its_loader_again() {
    let cfg: PolicyConfig = toml::from_str(
        "[[profile]]\nname = \"default\"\nnbp = \"grub/core.efi\"\none_shot = \"os.installed\"\n",
    )
    .unwrap();
    let states = Arc::new(crate::http::MemoryBootStates::default());
    let config = DhcpConfig {
        mode: DhcpMode::Proxy,
        subnet: vec![subnet([10, 0, 0, 0])],
        ..Default::default()
    };
    let mut e = DhcpEngine::new(config, Arc::new(cfg.validate().unwrap()), 8080, Vec::new())
        .with_boot_states(states.clone());
    let c = Client::edk2();
    let p = decode(&send(&mut e, &c.packet(), Port::Dhcp));
    assert_eq!(p.file, b"grub/core.efi");
    // Another machine's state does not count.
    states
        .record(MacAddr([0x52, 0x54, 0, 0, 0, 9]), "os.installed")
        .unwrap();
    let p = decode(&send(&mut e, &c.packet(), Port::Dhcp));
    assert_eq!(p.file, b"grub/core.efi");
    states.record(MacAddr(c.mac), "os.installed").unwrap();
    let p = decode(&send(&mut e, &c.packet(), Port::Dhcp));
    assert_eq!(p.file, b"snponly.efi", "iPXE, whose script boots locally");
    // Forgetting the state (DELETE /api/machines/{mac}/state) installs again.
    states.clear(&MacAddr(c.mac)).unwrap();
    let p = decode(&send(&mut e, &c.packet(), Port::Dhcp));
    assert_eq!(p.file, b"grub/core.efi");
}

#[test]
fn option_97_uuid_is_remembered_for_templates() {
    let uuids = Arc::new(UuidMemory::default());
    let mut e = engine(DhcpMode::Proxy).with_uuid_memory(uuids.clone());
    let c = Client::edk2();
    send(&mut e, &c.packet(), Port::Dhcp);
    assert_eq!(
        uuids.get(&MacAddr(c.mac)).as_deref(),
        Some("abababab-abab-abab-abab-abababababab")
    );
    assert_eq!(uuids.get(&MacAddr(Client::plain().mac)), None);
}

#[test]
fn firmware_arch_is_remembered_for_tftp_but_not_from_ipxe() {
    let firmware = Arc::new(FirmwareMemory::default());
    let mut e = engine(DhcpMode::Proxy).with_firmware_memory(firmware.clone());
    let c = Client::edk2();
    send(&mut e, &c.packet(), Port::Dhcp);
    let f = firmware.get(&MacAddr(c.mac)).unwrap();
    assert_eq!(f.arch_code, Some(7));
    assert_eq!(
        f.vendor_class.as_deref(),
        Some("PXEClient:Arch:00007:UNDI:003000")
    );
    // iPXE's own DHCP does not replace what the firmware said.
    let ipxe = Client {
        mac: c.mac,
        ..Client::bios_ipxe()
    };
    send(&mut e, &ipxe.packet(), Port::Dhcp);
    assert_eq!(firmware.get(&MacAddr(c.mac)).unwrap().arch_code, Some(7));
    assert_eq!(firmware.get(&MacAddr(Client::bios_ipxe().mac)), None);
}
