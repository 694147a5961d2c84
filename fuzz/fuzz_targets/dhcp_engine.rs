//! The DHCP engine fed packet sequences: proxy and full mode, ports 67 and 4011, virtual time
//! that only moves forward, leases applied as the driver would after making them durable.
//! Packets are built from a few clients (so sequences hit the same leases) and then optionally
//! mutated, or are raw bytes.
//!
//! Checked after every packet: the engine does not panic; a reply decodes, answers the request
//! (xid, chaddr, op), fits the client's size limit, and gives no address in proxy mode or on
//! port 4011; a committed lease is the reply's address, for the sender's MAC, inside a pool;
//! no two unexpired leases hold one address.
#![no_main]

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::Path;
use std::sync::Arc;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use pxed::config::Config;
use pxed::dhcp::DhcpMode;
use pxed::dhcp::engine::{DhcpEngine, LeaseChange, Port, Received};
use pxed::dhcp::wire::{DhcpOptions, DhcpPacket, MessageType, Op};

/// A policy touching every branch the engine takes on the plan: kernel (iPXE), menus, an NBP,
/// an ignored machine, a machine with a hostname, groups on arch and vendor class.
const POLICY: &str = r#"
[server]
root = "/srv"

[[profile]]
name = "default"
kernel = "linux"
initrd = ["initrd.gz"]
cmdline = "console=ttyS0"

[[profile]]
name = "menu"
menu = [{ label = "Linux", profile = "default" }]
menu_title = "Pick"
menu_default = "default"
menu_timeout = 5

[[profile]]
name = "nbp"
nbp = "pxelinux.0"

[[profile]]
name = "nothing"
ignore = "not ours"

[[group]]
name = "uefi"
profile = "menu"
match = { arch = [7] }

[[group]]
name = "http"
profile = "nbp"
match = { arch = [16] }

[[machine]]
mac = "52:54:00:00:00:03"
profile = "nothing"

[[machine]]
mac = "52:54:00:00:00:02"
profile = "default"
hostname = "node2"
"#;

const SERVER: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const RELAY: Ipv4Addr = Ipv4Addr::new(10, 9, 0, 1);

#[derive(Arbitrary, Debug)]
struct Input {
    full: bool,
    port_4011: bool,
    /// Pool sizes are small so that exhaustion and reuse happen.
    pool_size: u8,
    lease_secs: u8,
    steps: Vec<Step>,
}

#[derive(Arbitrary, Debug)]
struct Step {
    /// Milliseconds to advance, scaled so that leases and offers expire within a run.
    advance: u16,
    boot_server_port: bool,
    /// Which address the packet arrived on (ours, or a network we do not serve).
    foreign_link: bool,
    src_port: u16,
    /// Run the driver's expiry tick after this packet.
    tick: bool,
    msg: Msg,
}

#[derive(Arbitrary, Debug)]
enum Msg {
    Built(Built),
    Raw(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
struct Built {
    client: u8,
    kind: u8,
    vendor: u8,
    ipxe: bool,
    arch: Option<u16>,
    requested: Option<u8>,
    server_id: Option<u8>,
    ciaddr: Option<u8>,
    relayed: bool,
    flags: u16,
    xid: u32,
    prl: Vec<u8>,
    max_size: Option<u16>,
    hostname: Option<Vec<u8>>,
    uuid: Option<[u8; 16]>,
    extra: Vec<(u8, Vec<u8>)>,
    mutations: Vec<(u16, u8)>,
}

const VENDORS: &[&[u8]] = &[
    b"PXEClient:Arch:00000:UNDI:002001",
    b"PXEClient:Arch:00007:UNDI:003016",
    b"HTTPClient:Arch:00016:UNDI:003001",
    b"PXEClient",
    b"MSFT 5.0",
];

/// An address on the test network from a selector: mostly inside the pool, sometimes not.
fn addr(sel: u8) -> Ipv4Addr {
    match sel % 8 {
        0 => Ipv4Addr::new(10, 0, 0, sel),
        1 => Ipv4Addr::new(10, 9, 0, 100 + sel % 8),
        2 => Ipv4Addr::new(192, 168, 1, sel),
        _ => Ipv4Addr::new(10, 0, 0, 100 + sel % 8),
    }
}

fn build(b: &Built) -> Vec<u8> {
    let mut chaddr = [0u8; 16];
    chaddr[..6].copy_from_slice(&[0x52, 0x54, 0, 0, 0, b.client % 6]);
    let mut options = DhcpOptions::new();
    options.set(53, vec![b.kind % 9]);
    options.set(55, b.prl.clone());
    if let Some(v) = VENDORS.get(usize::from(b.vendor) % (VENDORS.len() + 1)) {
        options.set(60, v.to_vec());
    }
    if let Some(a) = b.arch {
        options.set(93, a.to_be_bytes().to_vec());
    }
    if b.ipxe {
        options.set(77, b"\x04iPXE".to_vec());
        options.set(175, vec![0xeb, 3, 1, 21, 1, 0x13, 1, 1]);
    }
    if let Some(r) = b.requested {
        options.set(50, addr(r).octets().to_vec());
    }
    if let Some(s) = b.server_id {
        let sid = if s % 4 == 0 {
            Ipv4Addr::new(10, 0, 0, 2)
        } else {
            SERVER
        };
        options.set(54, sid.octets().to_vec());
    }
    if let Some(m) = b.max_size {
        options.set(57, m.to_be_bytes().to_vec());
    }
    if let Some(h) = &b.hostname {
        options.set(12, h.clone());
    }
    if let Some(u) = b.uuid {
        let mut v = vec![0];
        v.extend_from_slice(&u);
        options.set(97, v);
    }
    for (c, v) in &b.extra {
        options.set(*c, v.clone());
    }
    let p = DhcpPacket {
        op: Op::Request,
        htype: 1,
        hlen: 6,
        hops: 0,
        xid: b.xid,
        secs: 0,
        flags: b.flags,
        ciaddr: b.ciaddr.map_or(Ipv4Addr::UNSPECIFIED, addr),
        yiaddr: Ipv4Addr::UNSPECIFIED,
        siaddr: Ipv4Addr::UNSPECIFIED,
        giaddr: if b.relayed {
            RELAY
        } else {
            Ipv4Addr::UNSPECIFIED
        },
        chaddr,
        sname: Vec::new(),
        file: Vec::new(),
        options,
    };
    let mut bytes = p.encode(&[]);
    for (at, v) in &b.mutations {
        let len = bytes.len();
        if let Some(slot) = bytes.get_mut(usize::from(*at) % len) {
            *slot = *v;
        }
    }
    bytes
}

fn in_pool(ip: Ipv4Addr) -> bool {
    let o = ip.octets();
    matches!(o, [10, 0, 0, h] | [10, 9, 0, h] if (100..=103).contains(&h))
}

fuzz_target!(|input: Input| {
    // Two subnets (one reached through a relay) with small pools, from the config text as
    // an administrator would write it.
    let end = 100 + input.pool_size % 4;
    let mut text = String::from(POLICY);
    for net in ["10.0.0", "10.9.0"] {
        text.push_str(&format!(
            "\n[[dhcp.subnet]]\nnetwork = \"{net}.0\"\nprefix_len = 24\npool_start = \"{net}.100\"\n\
             pool_end = \"{net}.{end}\"\nrouter = \"{net}.1\"\ndns = [\"{net}.1\"]\n\
             domain = \"lab\"\nlease_time = \"{}s\"\n",
            input.lease_secs.max(1)
        ));
    }
    let parsed = match Config::parse(&text, Path::new("fuzz.toml")) {
        Ok(c) => c,
        Err(e) => panic!("fuzz config does not parse: {e}"),
    };
    let policy = Arc::new(parsed.policy);
    let mode = if input.full {
        DhcpMode::Full
    } else {
        DhcpMode::Proxy
    };
    let mut config = parsed.dhcp;
    config.mode = mode;
    config.port_4011 = input.port_4011;
    let mut engine = DhcpEngine::new(config, policy, 8080, Vec::new());
    let mut now_ms: u64 = 1_700_000_000_000;
    for step in input.steps.iter().take(64) {
        now_ms += u64::from(step.advance) * 50;
        let payload = match &step.msg {
            Msg::Built(b) => build(b),
            Msg::Raw(r) => r.clone(),
        };
        let port = if step.boot_server_port {
            Port::BootServer
        } else {
            Port::Dhcp
        };
        let server_ip = if step.foreign_link {
            Ipv4Addr::new(192, 168, 7, 1)
        } else {
            SERVER
        };
        let rx = Received {
            payload: &payload,
            src: SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, step.src_port),
            port,
            server_ip,
            now_ms,
        };
        let out = engine.handle(&rx);
        let req = DhcpPacket::decode(&payload).ok();

        if let Some(reply) = &out.reply {
            let req = req.as_ref().expect("a reply to bytes that do not decode");
            let back = DhcpPacket::decode(&reply.payload).expect("reply does not decode");
            assert_eq!(back.op, Op::Reply);
            assert_eq!(back.xid, req.xid, "reply xid");
            assert_eq!(back.chaddr, req.chaddr, "reply chaddr");
            assert_eq!(back.options.message_type(), reply.packet.message_type());
            assert!(
                reply.payload.len() <= req.max_reply_len(),
                "reply of {} bytes for a client taking {}",
                reply.payload.len(),
                req.max_reply_len()
            );
            if mode == DhcpMode::Proxy || port == Port::BootServer {
                assert_eq!(
                    back.yiaddr,
                    Ipv4Addr::UNSPECIFIED,
                    "address given by a proxy reply"
                );
            }
            if matches!(
                back.options.message_type(),
                Some(MessageType::Offer) | Some(MessageType::Ack)
            ) && back.yiaddr != Ipv4Addr::UNSPECIFIED
            {
                assert!(
                    in_pool(back.yiaddr),
                    "offered {} outside the pools",
                    back.yiaddr
                );
            }
        }
        // The driver also ends leases whose time is up, between packets.
        let expired = if step.tick {
            engine.tick(now_ms)
        } else {
            Vec::new()
        };
        for change in &expired {
            assert!(matches!(change, LeaseChange::Expire(l) if l.expires <= now_ms / 1000));
        }
        match &out.lease {
            Some(LeaseChange::Commit(lease) | LeaseChange::Renew(lease)) => {
                let req = req.as_ref().expect("a lease for bytes that do not decode");
                assert_eq!(mode, DhcpMode::Full, "a lease in proxy mode");
                assert_eq!(Some(lease.mac), req.mac(), "lease for another MAC");
                assert!(in_pool(lease.ip), "lease outside the pools");
                let reply = out.reply.as_ref().expect("a lease without a reply");
                assert_eq!(reply.packet.yiaddr, lease.ip, "ACK and lease disagree");
                assert_eq!(reply.packet.message_type(), Some(MessageType::Ack));
            }
            Some(_) => assert_eq!(mode, DhcpMode::Full, "a lease ended in proxy mode"),
            None => {}
        }

        // RFC 2131 4.3.1/4.3.2: an address is never leased to two clients at once.
        let now = now_ms / 1000;
        let mut live: Vec<(Ipv4Addr, pxed::mac::MacAddr)> = engine
            .pool()
            .leases()
            .filter(|l| l.expires > now)
            .map(|l| (l.ip, l.mac))
            .collect();
        live.sort();
        for pair in live.windows(2) {
            if let [a, b] = pair {
                assert!(a.0 != b.0, "{} leased to both {} and {}", a.0, a.1, b.1);
            }
        }
    }
});
