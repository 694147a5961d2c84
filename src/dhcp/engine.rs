//! The DHCP engine: decides the answer to one packet. Sans-IO: the input is the packet bytes,
//! where they came from and the time; the output is the reply with its destination, the boot
//! events, and in full mode the lease to make durable *before* the reply is sent.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;

use super::limits::{Limited, RateLimiter};
use super::pool::{ClientKey, Lease, Pool};
use super::pxe_options::{PxeVendorOptions, client_facts, no_pxedhcp};
use super::reply_table::{ClientClass, ReplyShape, reply_shape};
use super::wire::{DhcpPacket, MessageType, Op, code};
use super::{BootFileFields, ConflictProbe, DhcpConfig, DhcpMode};
use crate::events::BootEvent;
use crate::http::boot_state::{BootStateStore, MemoryBootStates};
use crate::mac::MacAddr;
use crate::mac::UuidMemory;
use crate::policy::{
    self, ClientFacts, DhcpBoot, FirmwareFacts, FirmwareMemory, Policy, ServerAddrs,
};
use crate::stage::BootStage;

/// The DHCP server port (RFC 2131 4.1).
pub const SERVER_PORT: u16 = 67;
/// The DHCP client port (RFC 2131 4.1).
pub const CLIENT_PORT: u16 = 68;
/// The PXE boot server discovery port (PXE 2.1 spec, section 2.2.5).
pub const PXE_PORT: u16 = 4011;
/// The longest boot file name the BOOTP `file` field holds with its NUL (RFC 951).
const FILE_FIELD_MAX: usize = 127;
/// Option 93 code 9: "EFI x86-64" in RFC 4578's table, "EFI BC" in its erratum (Q5).
const ARCH_EFI_X86_64_RFC4578: u16 = 9;
/// How long an address that passed the conflict probe is offered again without a new probe, in
/// seconds: a client that retries a DISCOVER is not delayed twice, and a host that appears
/// later is still found on a later offer.
pub const PROBE_MEMORY_SECS: u64 = 60;
/// How long a held OFFER waits for its probe result before it is forgotten, in milliseconds.
/// The driver bounds each probe far below this; it only cleans up after a lost result.
const PROBE_PENDING_MAX_MS: u64 = 5_000;

/// Which socket a packet arrived on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Port {
    /// Port 67: DHCP, broadcast or relayed.
    Dhcp,
    /// Port 4011: PXE boot server requests, unicast.
    BootServer,
}

/// One received packet with its context.
#[derive(Clone, Copy, Debug)]
pub struct Received<'a> {
    /// UDP payload.
    pub payload: &'a [u8],
    /// Source address and port.
    pub src: SocketAddrV4,
    /// Which port it came to.
    pub port: Port,
    /// pxed's address on the interface it came in on; replies and URLs use it.
    pub server_ip: Ipv4Addr,
    /// Wall-clock time, milliseconds since the Unix epoch.
    pub now_ms: u64,
}

/// Where a reply goes (RFC 2131 section 4.1, "the server ... sends").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Destination {
    /// 255.255.255.255:68 on the receiving interface.
    Broadcast,
    /// A unicast IP and port the sender can already receive on (relay, ciaddr, 4011 source).
    Unicast(SocketAddrV4),
    /// Unicast to an address the client does not have yet: needs the hardware address (an
    /// ARP entry or a raw frame); the driver falls back to broadcast if it cannot.
    UnicastToHardware {
        /// Where.
        addr: SocketAddrV4,
        /// The client's hardware address.
        mac: MacAddr,
    },
}

/// A reply to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// Where.
    pub dest: Destination,
    /// The decoded reply (for tests and logs).
    pub packet: DhcpPacket,
    /// The encoded UDP payload.
    pub payload: Vec<u8>,
}

/// A change to the lease database that must be durable before `reply` leaves. The engine has
/// already recorded it in its pool (so the next packet sees it); the driver holds the reply
/// until the store says it is on disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseChange {
    /// A new lease (new client, or a new address for it).
    Commit(Lease),
    /// The same address again, with a later expiry.
    Renew(Lease),
    /// The client gave the address back (RFC 2131 4.3.4).
    Release(Lease),
    /// The client found the address in use (RFC 2131 4.3.3).
    Decline(Lease),
    /// The lease ran out. The store keeps it as the client's remembered address (RFC 2131
    /// 4.3.1) until another client's lease supersedes it.
    Expire(Lease),
}

impl LeaseChange {
    /// The lease concerned.
    pub fn lease(&self) -> &Lease {
        match self {
            LeaseChange::Commit(l)
            | LeaseChange::Renew(l)
            | LeaseChange::Release(l)
            | LeaseChange::Decline(l)
            | LeaseChange::Expire(l) => l,
        }
    }

    /// Whether the lease ends (the store deletes it) rather than being written. An expired
    /// lease is written: it is remembered for its client.
    pub fn ends(&self) -> bool {
        !matches!(
            self,
            LeaseChange::Commit(_) | LeaseChange::Renew(_) | LeaseChange::Expire(_)
        )
    }

    /// The word the lease hook gets as its first argument.
    pub fn kind(&self) -> &'static str {
        match self {
            LeaseChange::Commit(_) => "commit",
            LeaseChange::Renew(_) => "renew",
            LeaseChange::Release(_) => "release",
            LeaseChange::Decline(_) => "decline",
            LeaseChange::Expire(_) => "expire",
        }
    }
}

/// Everything the engine decided about one packet.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// The reply, if any.
    pub reply: Option<Reply>,
    /// Boot events, in order.
    pub events: Vec<BootEvent>,
    /// A lease change to persist first.
    pub lease: Option<LeaseChange>,
    /// The packet was dropped by this rate limit (no event: a flood must not flood the
    /// event stream too; the driver counts it for `/metrics`).
    pub limited: Option<Limited>,
    /// Conflict probe: check that no host uses this address, then call
    /// [`DhcpEngine::probe_result`]; the OFFER is held until then.
    pub probe: Option<Ipv4Addr>,
}

/// An OFFER held while its address is probed, with what is needed to decide again.
#[derive(Debug)]
struct PendingProbe {
    mac: MacAddr,
    payload: Vec<u8>,
    src: SocketAddrV4,
    port: Port,
    server_ip: Ipv4Addr,
    since_ms: u64,
    reply: Reply,
    events: Vec<BootEvent>,
}

/// The DHCP decision maker for one server.
#[derive(Debug)]
pub struct DhcpEngine {
    config: DhcpConfig,
    policy: Arc<Policy>,
    http_port: u16,
    pool: Pool,
    /// OFFERs waiting for their conflict probe, by address.
    probing: HashMap<Ipv4Addr, PendingProbe>,
    /// Addresses a probe found free, until when (seconds).
    probed_free: HashMap<Ipv4Addr, u64>,
    limiter: RateLimiter,
    /// One-shot boot state, shared with TFTP and HTTP (which records it), so that a machine
    /// that finished its one-shot profile gets the same local-boot plan here as there.
    boot_states: Arc<dyn BootStateStore>,
    /// Where the option 97 UUIDs clients send are kept for HTTP's template facts.
    uuids: Arc<UuidMemory>,
    /// Where non-iPXE clients' architecture and vendor class are kept for TFTP's config files.
    firmware: Arc<FirmwareMemory>,
}

struct Ctx<'a> {
    rx: &'a Received<'a>,
    req: DhcpPacket,
    mac: MacAddr,
    facts: ClientFacts,
    events: Vec<BootEvent>,
}

impl Ctx<'_> {
    fn event(&mut self, stage: BootStage, detail: impl Into<String>) {
        self.events.push(BootEvent {
            mac: self.mac,
            stage,
            detail: detail.into(),
            at_ms: self.rx.now_ms,
        });
    }

    fn ignore(mut self, why: impl Into<String>) -> Outcome {
        self.event(BootStage::DhcpIgnore, why);
        Outcome {
            events: self.events,
            ..Default::default()
        }
    }
}

impl DhcpEngine {
    /// An engine with the leases loaded from the store.
    pub fn new(
        config: DhcpConfig,
        policy: Arc<Policy>,
        http_port: u16,
        leases: Vec<Lease>,
    ) -> DhcpEngine {
        let pool = Pool::with_reservations(config.subnet.clone(), &config.reservation, leases);
        // Buckets start full; virtual time starts at the first packet's clock (a bucket
        // created at 0 simply refills at once).
        let limiter = RateLimiter::new(config.limits.clone(), 0);
        DhcpEngine {
            limiter,
            config,
            policy,
            http_port,
            pool,
            probing: HashMap::new(),
            probed_free: HashMap::new(),
            boot_states: Arc::new(MemoryBootStates::default()),
            uuids: Arc::new(UuidMemory::default()),
            firmware: Arc::new(FirmwareMemory::default()),
        }
    }

    /// Keep every non-iPXE client's architecture and vendor class in `firmware`, where TFTP
    /// finds them when the boot loader asks for its config file.
    pub fn with_firmware_memory(mut self, firmware: Arc<FirmwareMemory>) -> DhcpEngine {
        self.firmware = firmware;
        self
    }

    /// Keep the UUID (option 97) of every client in `uuids`, where HTTP finds it for the
    /// templates of that machine.
    pub fn with_uuid_memory(mut self, uuids: Arc<UuidMemory>) -> DhcpEngine {
        self.uuids = uuids;
        self
    }

    /// Plan with the one-shot state in `store` (the one HTTP records phone-home reports in).
    /// Without it the engine plans as if no machine had finished a one-shot profile.
    pub fn with_boot_states(mut self, store: Arc<dyn BootStateStore>) -> DhcpEngine {
        self.boot_states = store;
        self
    }

    /// Swap in a new policy (config reload) without touching leases.
    pub fn set_policy(&mut self, policy: Arc<Policy>) {
        self.policy = policy;
    }

    /// Swap in a new `[dhcp]` section and policy (SIGHUP) without losing leases. The mode
    /// and sockets stay as they were started.
    pub fn reconfigure(&mut self, mut config: DhcpConfig, policy: Arc<Policy>) {
        config.mode = self.config.mode;
        config.port_4011 = self.config.port_4011;
        self.pool
            .reconfigure(config.subnet.clone(), &config.reservation);
        if config.limits != self.config.limits {
            self.limiter.reconfigure(config.limits.clone(), 0);
        }
        self.config = config;
        self.policy = policy;
    }

    /// The `[dhcp]` section in use.
    pub fn config(&self) -> &DhcpConfig {
        &self.config
    }

    /// End leases whose time is up; the driver makes the removals durable and runs the hook.
    pub fn tick(&mut self, now_ms: u64) -> Vec<LeaseChange> {
        self.probing
            .retain(|_, p| now_ms.saturating_sub(p.since_ms) < PROBE_PENDING_MAX_MS);
        self.probed_free.retain(|_, until| *until > now_ms / 1000);
        self.pool
            .expire(now_ms / 1000)
            .into_iter()
            .map(LeaseChange::Expire)
            .collect()
    }

    /// The pool, for listing leases and the TFTP/HTTP MAC lookups.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Decide the answer to one packet. Never panics; every packet that is not answered gets
    /// an event saying why (or a log line, when it is too broken to name a client).
    pub fn handle(&mut self, rx: &Received<'_>) -> Outcome {
        let req = match DhcpPacket::decode(rx.payload) {
            Ok(p) => p,
            Err(err) => {
                tracing::debug!(src = %rx.src, %err, "dropped malformed DHCP packet");
                return Outcome::default();
            }
        };
        if req.op != Op::Request {
            return Outcome::default();
        }
        let Some(mac) = req.mac() else {
            tracing::debug!(src = %rx.src, htype = req.htype, hlen = req.hlen, "dropped: not Ethernet");
            return Outcome::default();
        };
        if self.config.mode != DhcpMode::Off
            && let Err(limit) = self.rate_limit(&req, mac, rx.now_ms)
        {
            return Outcome {
                limited: Some(limit),
                ..Default::default()
            };
        }
        let (mut facts, warnings) = client_facts(&req);
        if let Some(uuid) = &facts.uuid {
            self.uuids.remember(mac, uuid);
        }
        if !self.config.arch_from_vendor_class && !req.options.contains(93) {
            facts.arch_code = None;
        }
        // Q5: a server that knows only 7 as x64 UEFI treats 9 as unknown: the default program.
        if !self.config.arch_9_is_x64 && facts.arch_code == Some(ARCH_EFI_X86_64_RFC4578) {
            facts.arch_code = None;
        }
        // A pxelinux or GRUB loaded by this firmware asks for its config over TFTP with only
        // its MAC: keep what the firmware said (iPXE's own requests would mask it).
        if !facts.is_ipxe {
            self.firmware.remember(
                mac,
                FirmwareFacts {
                    arch_code: facts.arch_code,
                    vendor_class: facts.vendor_class.clone(),
                },
            );
        }
        let mut ctx = Ctx {
            rx,
            req,
            mac,
            facts,
            events: Vec::new(),
        };
        for w in warnings {
            tracing::debug!(%mac, "{w}");
        }
        let Some(kind) = ctx.req.message_type() else {
            return ctx.ignore("no DHCP message type (BOOTP is not served)");
        };
        // Q12: a server that requires option 97 does not answer a PXE ROM that omits it.
        if !self.config.serve_without_uuid
            && is_pxe_client(&ctx.facts)
            && !ctx.req.options.contains(code::CLIENT_UUID)
        {
            return ctx.ignore("PXE client without option 97 (serve_without_uuid = false)");
        }
        if ctx.facts.is_ipxe && matches!(kind, MessageType::Discover) {
            ctx.event(BootStage::IpxeDhcp, ipxe_detail(&ctx.facts));
        }
        match (rx.port, self.config.mode) {
            (Port::BootServer, _) => self.boot_server(ctx, kind),
            (Port::Dhcp, DhcpMode::Proxy) => self.proxy(ctx, kind),
            (Port::Dhcp, DhcpMode::Full) => self.full(ctx, kind),
            (Port::Dhcp, DhcpMode::Off) => Outcome::default(),
        }
    }

    /// Starvation defence: known clients (a reservation or a `[[machine]]` entry) draw from
    /// their own bucket, everyone else from the relay's and the global one.
    fn rate_limit(&mut self, req: &DhcpPacket, mac: MacAddr, now_ms: u64) -> Result<(), Limited> {
        let who = ClientKey {
            mac,
            client_id: req.options.client_id(),
        };
        let known = self.pool.reservation(&who).is_some() || self.policy.machine(&mac).is_some();
        self.limiter.check(mac, req.giaddr, known, now_ms)
    }

    fn server_addrs(&self, rx: &Received<'_>) -> ServerAddrs {
        ServerAddrs {
            ip: rx.server_ip,
            http_port: self.http_port,
        }
    }

    /// Proxy mode on port 67: answer PXE clients with boot data only (PXE 2.1 section 2.2.3).
    fn proxy(&mut self, mut ctx: Ctx<'_>, kind: MessageType) -> Outcome {
        if !is_pxe_client(&ctx.facts) {
            return ctx.ignore("not a PXE client (option 60 is not PXEClient or HTTPClient)");
        }
        let reply_type = match kind {
            MessageType::Discover => {
                ctx.event(BootStage::DhcpDiscover, discover_detail(&ctx.facts));
                MessageType::Offer
            }
            // A client that skips port 4011 and requests from us directly (Q12).
            MessageType::Request if ctx.req.options.server_id() == Some(ctx.rx.server_ip) => {
                ctx.event(BootStage::DhcpRequest, "proxyDHCP request on port 67");
                MessageType::Ack
            }
            MessageType::Request => {
                return ctx
                    .ignore("request for another DHCP server (proxy mode gives no addresses)");
            }
            other => return ctx.ignore(format!("{other:?} is not answered in proxy mode")),
        };
        let Some(mut reply) = self.boot_reply(&mut ctx, reply_type, DhcpMode::Proxy) else {
            return Outcome {
                events: ctx.events,
                ..Default::default()
            };
        };
        // Proxy replies never carry an address.
        reply.yiaddr = Ipv4Addr::UNSPECIFIED;
        // dnsmasq and pixiecore broadcast proxy offers: the client has no address yet (Q11).
        let dest = if ctx.req.ciaddr.is_unspecified() {
            Destination::Broadcast
        } else {
            Destination::Unicast(SocketAddrV4::new(ctx.req.ciaddr, CLIENT_PORT))
        };
        let detail = boot_detail(&reply);
        ctx.event(BootStage::ProxyOffer, detail);
        self.finish(ctx, reply, dest, None)
    }

    /// Port 4011: PXE boot server requests (and iPXE's ProxyDHCPREQUEST). The reply is an ACK
    /// with the boot file, sent back to the request's source address and port.
    fn boot_server(&mut self, mut ctx: Ctx<'_>, kind: MessageType) -> Outcome {
        if !self.config.port_4011 {
            return ctx.ignore("port 4011 is disabled");
        }
        if !matches!(kind, MessageType::Request | MessageType::Inform) {
            return ctx.ignore(format!("{kind:?} on port 4011"));
        }
        if !is_pxe_client(&ctx.facts) {
            return ctx.ignore("not a PXE client on port 4011");
        }
        let mode = self.config.mode;
        let Some(reply) = self.boot_reply(&mut ctx, MessageType::Ack, mode) else {
            return Outcome {
                events: ctx.events,
                ..Default::default()
            };
        };
        // PXE 2.1 2.2.5: the boot server replies to the client's source port (4011 or 68).
        let dest = Destination::Unicast(ctx.rx.src);
        let detail = boot_detail(&reply);
        ctx.event(BootStage::Proxy4011, detail);
        self.finish(ctx, reply, dest, None)
    }

    /// Full mode: RFC 2131 address assignment plus the same boot data as proxy mode.
    fn full(&mut self, mut ctx: Ctx<'_>, kind: MessageType) -> Outcome {
        let now = ctx.rx.now_ms / 1000;
        let link = link_address(&ctx.req, ctx.rx.server_ip);
        if self.pool.subnet_for(link).is_none() {
            return ctx.ignore(format!("no [[dhcp.subnet]] holds {link}"));
        }
        // RFC 2131 4.3.3/4.3.4: DECLINE and RELEASE name the server they are for.
        let for_other = ctx
            .req
            .options
            .server_id()
            .is_some_and(|sid| sid != ctx.rx.server_ip);
        let client_id = ctx.req.options.client_id().map(<[u8]>::to_vec);
        let who = ClientKey {
            mac: ctx.mac,
            client_id: client_id.as_deref(),
        };
        match kind {
            MessageType::Discover => {
                ctx.event(BootStage::DhcpDiscover, discover_detail(&ctx.facts));
                let requested = ctx.req.options.requested_ip();
                let Some(ip) = self.pool.offer(&who, link, requested, now) else {
                    return ctx.ignore("pool exhausted: no free address to offer");
                };
                let Some(mut reply) = self.address_reply(&mut ctx, MessageType::Offer, link) else {
                    return Outcome {
                        events: ctx.events,
                        ..Default::default()
                    };
                };
                reply.yiaddr = ip;
                ctx.event(
                    BootStage::DhcpOffer,
                    format!("{ip} {}", boot_detail(&reply)),
                );
                let dest = client_destination(&ctx.req, ip, self.config.honour_broadcast_flag);
                if self.needs_probe(&who, ip, now) {
                    return self.hold_for_probe(ctx, reply, dest, ip);
                }
                self.finish(ctx, reply, dest, None)
            }
            MessageType::Request => self.full_request(ctx, link, &who, now),
            MessageType::Decline | MessageType::Release if for_other => {
                ctx.ignore(format!("{kind:?} for another server"))
            }
            MessageType::Decline => {
                let Some(ip) = ctx.req.options.requested_ip() else {
                    return ctx.ignore("DECLINE without a requested address");
                };
                // Only an address this client holds or was offered can be declined by it;
                // anything else would let one client take addresses out of the pool.
                let offered = self.pool.lease(&ctx.mac).is_some_and(|l| l.ip == ip)
                    || self.pool.owner(ip).is_none();
                if !offered {
                    return ctx.ignore(format!("DECLINE of {ip}, which is not this client's"));
                }
                let removed = self.pool.decline(&ctx.mac, ip, now);
                ctx.event(BootStage::DhcpDecline, format!("{ip} quarantined"));
                Outcome {
                    events: ctx.events,
                    lease: removed.map(LeaseChange::Decline),
                    ..Default::default()
                }
            }
            MessageType::Release => {
                let ip = ctx.req.ciaddr;
                let removed = self.pool.release(&ctx.mac, ip);
                ctx.event(BootStage::DhcpRelease, ip.to_string());
                Outcome {
                    events: ctx.events,
                    lease: removed.map(LeaseChange::Release),
                    ..Default::default()
                }
            }
            MessageType::Inform => {
                // RFC 2131 4.3.5: configuration only, no lease, no yiaddr, unicast to ciaddr.
                let Some(reply) = self.address_reply(&mut ctx, MessageType::Ack, link) else {
                    return Outcome {
                        events: ctx.events,
                        ..Default::default()
                    };
                };
                ctx.event(BootStage::DhcpInform, ctx.req.ciaddr.to_string());
                let dest =
                    client_destination(&ctx.req, ctx.req.ciaddr, self.config.honour_broadcast_flag);
                self.finish(ctx, reply, dest, None)
            }
            other => ctx.ignore(format!("{other:?} from a client")),
        }
    }

    /// RFC 2131 4.3.2: SELECTING, INIT-REBOOT, RENEWING and REBINDING.
    fn full_request(
        &mut self,
        mut ctx: Ctx<'_>,
        link: Ipv4Addr,
        who: &ClientKey<'_>,
        now: u64,
    ) -> Outcome {
        let server_id = ctx.req.options.server_id();
        let requested = ctx.req.options.requested_ip();
        let (ip, state) = match (server_id, requested, ctx.req.ciaddr.is_unspecified()) {
            (Some(sid), _, _) if sid != ctx.rx.server_ip => {
                // The client chose another server's offer: forget ours.
                return ctx.ignore(format!("client selected server {sid}"));
            }
            (Some(_), Some(ip), true) => (ip, "selecting"),
            (None, Some(ip), true) => (ip, "init-reboot"),
            // RENEWING (unicast) and REBINDING (broadcast) look alike to the server.
            (None, _, false) => (ctx.req.ciaddr, "renewing/rebinding"),
            _ => return ctx.ignore("REQUEST without a requested address or ciaddr"),
        };
        ctx.event(BootStage::DhcpRequest, format!("{ip} ({state})"));
        let hostname = ctx
            .req
            .options
            .get(12)
            .and_then(|h| std::str::from_utf8(h).ok())
            .map(|h| h.trim_end_matches('\0').to_string());
        match self.pool.prepare(who, link, ip, hostname, now) {
            Ok(lease) => {
                let renew = self.pool.lease(&ctx.mac).is_some_and(|l| l.ip == lease.ip);
                let Some(mut reply) = self.address_reply(&mut ctx, MessageType::Ack, link) else {
                    return Outcome {
                        events: ctx.events,
                        ..Default::default()
                    };
                };
                reply.yiaddr = ip;
                ctx.event(BootStage::DhcpAck, format!("{ip} {}", boot_detail(&reply)));
                let dest = client_destination(&ctx.req, ip, self.config.honour_broadcast_flag);
                // Recorded now so that the next packet cannot be given this address; the
                // ACK itself waits in the driver until the store has it on disk.
                self.pool.apply(lease.clone());
                let change = if renew {
                    LeaseChange::Renew(lease)
                } else {
                    LeaseChange::Commit(lease)
                };
                self.finish(ctx, reply, dest, Some(change))
            }
            Err(reason) => {
                // RFC 2131 4.3.2: a server with no record of the client "MUST remain silent"
                // on INIT-REBOOT and REBINDING unless it knows the address is wrong for the
                // network. `authoritative` says pxed knows (it is the only server here); when
                // off, pxed NAKs only clients whose lease it holds.
                let known = self.pool.lease(&ctx.mac).is_some();
                if !self.config.authoritative && !known && state != "selecting" {
                    return ctx.ignore(format!("{state}: {reason} (not authoritative)"));
                }
                let mut nak = ctx.req.reply_skeleton();
                nak.options.set(code::MESSAGE_TYPE, vec![6]);
                nak.options
                    .set(code::SERVER_ID, ctx.rx.server_ip.octets().to_vec());
                nak.options
                    .set(code::MESSAGE, reason.to_string().into_bytes());
                echo_relay_info(&ctx.req, &mut nak);
                ctx.event(BootStage::DhcpNak, reason.to_string());
                // RFC 2131 4.1: NAKs are broadcast unless relayed.
                let dest = if ctx.req.giaddr.is_unspecified() {
                    Destination::Broadcast
                } else {
                    Destination::Unicast(SocketAddrV4::new(ctx.req.giaddr, SERVER_PORT))
                };
                self.finish(ctx, nak, dest, None)
            }
        }
    }

    /// RFC 2131 4.3.1: "the server SHOULD probe the reused address before allocating". Only
    /// addresses new to this client are probed (not its live lease, not its reservation), and
    /// not again within `PROBE_MEMORY_SECS` of a probe that found it free.
    fn needs_probe(&self, who: &ClientKey<'_>, ip: Ipv4Addr, now: u64) -> bool {
        self.config.conflict_probe != ConflictProbe::Off
            && !self
                .pool
                .lease(&who.mac)
                .is_some_and(|l| l.ip == ip && l.expires > now)
            && self.pool.reservation(who).is_none_or(|(r, _)| r != ip)
            && self.probed_free.get(&ip).is_none_or(|until| *until <= now)
    }

    /// Keep the OFFER until the probe of `ip` answers. The address stays held for this client
    /// (the pool's offer hold), so other clients get other addresses meanwhile: nobody waits.
    fn hold_for_probe(
        &mut self,
        mut ctx: Ctx<'_>,
        packet: DhcpPacket,
        dest: Destination,
        ip: Ipv4Addr,
    ) -> Outcome {
        // The DhcpOffer event goes out with the OFFER.
        let offer_event = ctx.events.pop();
        let payload = packet.encode(ctx.req.options.parameter_request_list());
        let reply = Reply {
            dest,
            packet,
            payload,
        };
        // A retransmitted DISCOVER during the probe: answer it (newest xid) when the one
        // probe in flight returns; no second probe.
        let already = self.probing.contains_key(&ip);
        self.probing.insert(
            ip,
            PendingProbe {
                mac: ctx.mac,
                payload: ctx.rx.payload.to_vec(),
                src: ctx.rx.src,
                port: ctx.rx.port,
                server_ip: ctx.rx.server_ip,
                since_ms: ctx.rx.now_ms,
                reply,
                events: offer_event.into_iter().collect(),
            },
        );
        Outcome {
            events: ctx.events,
            probe: (!already).then_some(ip),
            ..Default::default()
        }
    }

    /// The result of the conflict probe asked for by [`Outcome::probe`]. Free: the held OFFER.
    /// In use: the address is quarantined like a declined one and the DISCOVER is decided
    /// again (which may ask for another probe).
    pub fn probe_result(&mut self, ip: Ipv4Addr, in_use: bool, now_ms: u64) -> Outcome {
        let Some(pending) = self.probing.remove(&ip) else {
            return Outcome::default();
        };
        if !in_use {
            self.probed_free
                .insert(ip, now_ms / 1000 + PROBE_MEMORY_SECS);
            return Outcome {
                reply: Some(pending.reply),
                events: pending.events,
                ..Default::default()
            };
        }
        tracing::warn!(%ip, mac = %pending.mac, "conflict probe: a host answers on this address; quarantined");
        self.pool.quarantine(&pending.mac, ip, now_ms / 1000);
        let mut outcome = self.handle(&Received {
            payload: &pending.payload,
            src: pending.src,
            port: pending.port,
            server_ip: pending.server_ip,
            now_ms,
        });
        outcome.events.insert(
            0,
            BootEvent {
                mac: pending.mac,
                stage: BootStage::DhcpDecline,
                detail: format!("{ip} answered the conflict probe; quarantined"),
                at_ms: now_ms,
            },
        );
        outcome
    }

    /// An OFFER/ACK with address options (full mode), plus boot data for PXE clients.
    fn address_reply(
        &self,
        ctx: &mut Ctx<'_>,
        reply_type: MessageType,
        link: Ipv4Addr,
    ) -> Option<DhcpPacket> {
        let mut reply = if is_pxe_client(&ctx.facts) {
            self.boot_reply(ctx, reply_type, DhcpMode::Full)?
        } else {
            let mut r = ctx.req.reply_skeleton();
            r.options.set(code::MESSAGE_TYPE, vec![reply_type.code()]);
            r.options
                .set(code::SERVER_ID, ctx.rx.server_ip.octets().to_vec());
            r
        };
        let subnet = self.pool.subnet_for(link)?;
        reply
            .options
            .set(code::SUBNET_MASK, subnet.mask().octets().to_vec());
        if let Some(router) = subnet.router {
            reply.options.set(code::ROUTER, router.octets().to_vec());
        }
        if !subnet.dns.is_empty() {
            reply
                .options
                .set(6, subnet.dns.iter().flat_map(|d| d.octets()).collect());
        }
        if let Some(domain) = &subnet.domain {
            reply
                .options
                .set(code::DOMAIN_NAME, domain.as_bytes().to_vec());
        }
        if let Some(mtu) = subnet.mtu {
            reply
                .options
                .set(code::INTERFACE_MTU, mtu.to_be_bytes().to_vec());
        }
        if !subnet.ntp.is_empty() {
            reply
                .options
                .set(42, subnet.ntp.iter().flat_map(|d| d.octets()).collect());
        }
        if !subnet.search.is_empty() {
            reply
                .options
                .set(code::DOMAIN_SEARCH, encode_search_list(&subnet.search));
        }
        if !subnet.route.is_empty() {
            reply
                .options
                .set(code::CLASSLESS_ROUTES, encode_routes(subnet));
        }
        for raw in &subnet.option {
            // Validated at load: a bad value cannot reach here, but never panic on it.
            if let Ok(value) = raw.value() {
                reply.options.set(raw.code, value);
            }
        }
        // RFC 2131 4.3.5: an INFORM reply carries no lease time.
        if ctx.req.message_type() != Some(MessageType::Inform) {
            let secs = u32::try_from(subnet.lease_time.as_secs()).unwrap_or(u32::MAX);
            // RFC 2132 9.2, 9.11, 9.12: lease time, T1 = 50 %, T2 = 87.5 %.
            reply
                .options
                .set(code::LEASE_TIME, secs.to_be_bytes().to_vec());
            reply
                .options
                .set(code::RENEWAL_TIME, (secs / 2).to_be_bytes().to_vec());
            reply
                .options
                .set(code::REBINDING_TIME, (secs / 8 * 7).to_be_bytes().to_vec());
        }
        let client_id = ctx.req.options.client_id().map(<[u8]>::to_vec);
        let who = ClientKey {
            mac: ctx.mac,
            client_id: client_id.as_deref(),
        };
        let reserved_name = self
            .pool
            .reservation(&who)
            .and_then(|(_, n)| n.map(str::to_string));
        if let Some(name) = reserved_name.or_else(|| {
            self.policy
                .machine(&ctx.mac)
                .and_then(|m| m.hostname.clone())
        }) {
            reply.options.set(code::HOSTNAME, name.into_bytes());
        }
        echo_relay_info(&ctx.req, &mut reply);
        Some(reply)
    }

    /// A reply with the PXE boot data for this client, shaped by the reply table. `None` (with
    /// an event) when the policy says not to boot it.
    fn boot_reply(
        &self,
        ctx: &mut Ctx<'_>,
        reply_type: MessageType,
        mode: DhcpMode,
    ) -> Option<DhcpPacket> {
        let server = self.server_addrs(ctx.rx);
        let state = self.boot_states.get(&ctx.mac);
        let plan = policy::plan(&self.policy, &ctx.facts, &state, &server);
        let file = match &plan.dhcp {
            DhcpBoot::Tftp { file } => file.clone(),
            DhcpBoot::Http { url } => url.clone(),
            DhcpBoot::Nothing { reason } => {
                ctx.event(
                    BootStage::DhcpIgnore,
                    format!("profile `{}`: {reason}", plan.profile),
                );
                return None;
            }
        };
        let class = ClientClass::of(&ctx.facts);
        let shape = reply_shape(class, mode);
        let mut reply = ctx.req.reply_skeleton();
        reply
            .options
            .set(code::MESSAGE_TYPE, vec![reply_type.code()]);
        reply
            .options
            .set(code::SERVER_ID, ctx.rx.server_ip.octets().to_vec());
        apply_boot(&mut reply, &ctx.req, ctx.rx.server_ip, &file, &shape);
        self.apply_compat(&mut reply, &file);
        tracing::debug!(mac = %ctx.mac, ?class, profile = %plan.profile, reason = %plan.reason, file, "boot plan");
        Some(reply)
    }

    /// The compatibility settings turned off (firmware-quirks.md Q1-Q3): only to reproduce a
    /// server that does not compensate. With the defaults this changes nothing.
    fn apply_compat(&self, reply: &mut DhcpPacket, file: &str) {
        if !self.config.pxe_vendor_option {
            reply.options.remove(code::VENDOR_CLASS);
        }
        if !self.config.discovery_control {
            reply.options.remove(code::VENDOR_SPECIFIC);
        }
        match self.config.boot_file {
            BootFileFields::Auto => {}
            BootFileFields::Header => {
                if file.len() <= FILE_FIELD_MAX {
                    reply.options.remove(code::TFTP_SERVER_NAME);
                    reply.options.remove(code::BOOTFILE_NAME);
                }
            }
            BootFileFields::Options => {
                reply.options.set(
                    code::TFTP_SERVER_NAME,
                    reply.siaddr.to_string().into_bytes(),
                );
                reply
                    .options
                    .set(code::BOOTFILE_NAME, file.as_bytes().to_vec());
                reply.siaddr = Ipv4Addr::UNSPECIFIED;
                reply.sname = Vec::new();
                reply.file = Vec::new();
            }
        }
    }

    fn finish(
        &self,
        ctx: Ctx<'_>,
        packet: DhcpPacket,
        dest: Destination,
        lease: Option<LeaseChange>,
    ) -> Outcome {
        let payload = packet.encode(ctx.req.options.parameter_request_list());
        Outcome {
            reply: Some(Reply {
                dest,
                packet,
                payload,
            }),
            events: ctx.events,
            lease,
            probe: None,
            limited: None,
        }
    }
}

/// Put the boot file where every kind of client looks (firmware-quirks.md Q1): `siaddr`,
/// `sname` (the server's address as text) and `file` always; options 66/67 when the client
/// asked for them in option 55. Then options 60, 43 and 175 per the reply table, and 97 echoed.
fn apply_boot(
    reply: &mut DhcpPacket,
    req: &DhcpPacket,
    server_ip: Ipv4Addr,
    file: &str,
    shape: &ReplyShape,
) {
    reply.siaddr = server_ip;
    reply.sname = server_ip.to_string().into_bytes();
    let prl = req.options.parameter_request_list();
    let too_long = file.len() > FILE_FIELD_MAX;
    if !too_long {
        reply.file = file.as_bytes().to_vec();
    }
    if prl.contains(&code::TFTP_SERVER_NAME) {
        reply
            .options
            .set(code::TFTP_SERVER_NAME, server_ip.to_string().into_bytes());
    }
    if prl.contains(&code::BOOTFILE_NAME) || too_long {
        reply
            .options
            .set(code::BOOTFILE_NAME, file.as_bytes().to_vec());
    }
    reply
        .options
        .set(60, shape.vendor_id.as_str().as_bytes().to_vec());
    if let Some(control) = shape.discovery_control {
        let vendor = PxeVendorOptions {
            discovery_control: Some(control),
            ..Default::default()
        };
        // Only a discovery control byte: it always fits, so encoding cannot fail.
        if let Ok(bytes) = vendor.encode() {
            reply.options.set(code::VENDOR_SPECIFIC, bytes);
        }
    }
    if shape.ipxe_no_pxedhcp {
        reply.options.set(code::IPXE_ENCAP, no_pxedhcp());
    }
    // Smee and pixiecore echo the client's UUID; EDK2 checks it on 4011 replies.
    if let Some(uuid) = req.options.get(code::CLIENT_UUID) {
        reply.options.set(code::CLIENT_UUID, uuid.to_vec());
    }
}

/// The address that picks the subnet: RFC 3011 subnet selection (option 118), else RFC 3527
/// link selection (option 82 sub-option 5), else the relay's giaddr, else pxed's own address on
/// the interface the request came in on.
fn link_address(req: &DhcpPacket, server_ip: Ipv4Addr) -> Ipv4Addr {
    if let Some(ip) = req.options.get_ip(118) {
        return ip;
    }
    if let Some(ip) = req
        .options
        .get(82)
        .and_then(|v| relay_suboption(v, 5))
        .and_then(|v| <[u8; 4]>::try_from(v).ok().map(Ipv4Addr::from))
    {
        return ip;
    }
    if req.giaddr.is_unspecified() {
        server_ip
    } else {
        req.giaddr
    }
}

/// One sub-option of the relay agent information option (RFC 3046 2.0: code, length, value).
fn relay_suboption(value: &[u8], code: u8) -> Option<&[u8]> {
    let mut rest = value;
    while let [c, len, tail @ ..] = rest {
        let body = tail.get(..usize::from(*len))?;
        if *c == code {
            return Some(body);
        }
        rest = tail.get(usize::from(*len)..)?;
    }
    None
}

/// RFC 3046 2.2: the server copies the relay agent information option into its reply.
fn echo_relay_info(req: &DhcpPacket, reply: &mut DhcpPacket) {
    if let Some(info) = req.options.get(code::RELAY_AGENT_INFO) {
        reply.options.set(code::RELAY_AGENT_INFO, info.to_vec());
    }
}

/// Option 119 (RFC 3397): the names in DNS wire format (RFC 1035 3.1), uncompressed, which
/// RFC 3397 section 2 allows. Labels were checked (1..=63 bytes) when the config was loaded.
fn encode_search_list(names: &[String]) -> Vec<u8> {
    let mut out = Vec::new();
    for name in names {
        for label in name
            .trim_end_matches('.')
            .split('.')
            .filter(|l| !l.is_empty())
        {
            let bytes = label.as_bytes();
            let len = u8::try_from(bytes.len()).unwrap_or(63).min(63);
            out.push(len);
            out.extend_from_slice(bytes.get(..usize::from(len)).unwrap_or(bytes));
        }
        out.push(0);
    }
    out
}

/// Option 121 (RFC 3442): prefix length, the significant octets of the destination, router.
/// RFC 3442 says a client that gets option 121 ignores option 3, so the subnet's router is
/// added as the default route unless the config gives one.
fn encode_routes(subnet: &super::SubnetConfig) -> Vec<u8> {
    let mut out = Vec::new();
    let mut push = |network: Ipv4Addr, prefix: u8, gateway: Ipv4Addr| {
        let prefix = prefix.min(32);
        out.push(prefix);
        let significant = usize::from(prefix.div_ceil(8));
        out.extend(network.octets().iter().take(significant));
        out.extend_from_slice(&gateway.octets());
    };
    for r in &subnet.route {
        push(r.network, r.prefix_len, r.gateway);
    }
    if let Some(router) = subnet.router
        && !subnet.route.iter().any(|r| r.prefix_len == 0)
    {
        push(Ipv4Addr::UNSPECIFIED, 0, router);
    }
    out
}

/// RFC 2131 4.1: relayed -> the relay's server port; ciaddr set -> unicast to it; broadcast
/// bit -> broadcast (unless `honour_broadcast` is off, reproducing a server that ignores the
/// bit, Q11); otherwise unicast to yiaddr at the client's hardware address.
fn client_destination(req: &DhcpPacket, yiaddr: Ipv4Addr, honour_broadcast: bool) -> Destination {
    if !req.giaddr.is_unspecified() {
        Destination::Unicast(SocketAddrV4::new(req.giaddr, SERVER_PORT))
    } else if !req.ciaddr.is_unspecified() {
        Destination::Unicast(SocketAddrV4::new(req.ciaddr, CLIENT_PORT))
    } else if (honour_broadcast && req.broadcast_flag()) || yiaddr.is_unspecified() {
        Destination::Broadcast
    } else {
        match req.mac() {
            Some(mac) => Destination::UnicastToHardware {
                addr: SocketAddrV4::new(yiaddr, CLIENT_PORT),
                mac,
            },
            None => Destination::Broadcast,
        }
    }
}

fn is_pxe_client(facts: &ClientFacts) -> bool {
    facts
        .vendor_class
        .as_deref()
        .is_some_and(|v| v.starts_with("PXEClient") || v.starts_with("HTTPClient"))
        || facts.is_ipxe
}

fn discover_detail(f: &ClientFacts) -> String {
    let arch = match (f.arch_code, f.arch()) {
        (_, Some(a)) => a.to_string(),
        (Some(code), None) => format!("{code} (unknown)"),
        (None, None) => "none".into(),
    };
    let vendor = f.vendor_class.as_deref().unwrap_or("-");
    if is_pxe_client(f) {
        format!(
            "arch {arch}, class {:?}, vendor {vendor}",
            ClientClass::of(f)
        )
    } else {
        format!("not a PXE client, vendor {vendor}")
    }
}

fn ipxe_detail(f: &ClientFacts) -> String {
    let platform = f.arch().map_or("pcbios", |a| a.ipxe_platform());
    format!("iPXE on {platform}")
}

fn boot_detail(reply: &DhcpPacket) -> String {
    let file = reply
        .options
        .get(code::BOOTFILE_NAME)
        .unwrap_or(reply.file.as_slice());
    if file.is_empty() {
        "no boot data".into()
    } else {
        format!("boot {}", String::from_utf8_lossy(file))
    }
}

#[cfg(test)]
mod tests;
