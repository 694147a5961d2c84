//! DHCP rate limits against starvation floods: token buckets per MAC, per relay (giaddr) and
//! global, in virtual time (the caller passes `now_ms`), so they are tested without clocks.
//!
//! A flood of DISCOVERs from random MACs (the classic starvation attack) holds an address per
//! offer and eats the CPU and disk of honest clients. The buckets bound how much of pxed one
//! MAC, one relayed subnet and all unknown clients together can use. Known clients (a
//! `[[dhcp.reservation]]` or a `[[machine]]` entry) do not draw from the relay and global
//! buckets of the crowd: they have their own shared bucket, so a flood of strangers never
//! starves them. Each MAC, known or not, still has its own bucket, so one spoofed known MAC
//! cannot flood either.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use serde::Deserialize;

use crate::mac::MacAddr;

/// Per MAC: an honest client sends a handful of packets per boot stage (DISCOVER and REQUEST,
/// retransmitted with backoff of 4 s and more, RFC 2131 4.1; firmware, iPXE and the OS each do
/// one exchange), so 2 per second sustained is far above any of them.
pub const DEFAULT_MAC_RATE: u32 = 2;
/// Per MAC burst: the firmware + 4011 + iPXE exchanges of one boot back to back.
pub const DEFAULT_MAC_BURST: u32 = 16;
/// Per relay (giaddr; directly attached clients share one bucket): a thousand machines behind
/// one relay booting at once, at two packets each per second.
pub const DEFAULT_RELAY_RATE: u32 = 2000;
/// Per relay burst: two seconds of that.
pub const DEFAULT_RELAY_BURST: u32 = 4000;
/// All unknown clients together: about 40% of the packets pxed answered with durable leases
/// on a loaded 2-core machine (BENCHMARKS.md: ~6 000 DORA/s, 12 000 packets/s), so a flood
/// leaves pxed the time to serve known clients and TFTP/HTTP.
pub const DEFAULT_GLOBAL_RATE: u32 = 5000;
/// Global burst for unknown clients: two seconds of that.
pub const DEFAULT_GLOBAL_BURST: u32 = 10_000;
/// All known clients together: the same as the crowd's, in a bucket of their own.
pub const DEFAULT_KNOWN_RATE: u32 = 5000;
/// Known clients' burst.
pub const DEFAULT_KNOWN_BURST: u32 = 10_000;
/// MACs whose buckets are remembered: at ~100 bytes each, 64 Ki is a few MiB. Buckets that
/// have refilled are forgotten first (they carry no state); past the cap a new MAC is bounded
/// by the relay and global buckets only.
pub const DEFAULT_MAX_TRACKED_MACS: usize = 65_536;
/// How often a full table is swept for refilled buckets (ms): sweeping on every packet of a
/// flood would make each packet cost O(table).
const SWEEP_INTERVAL_MS: u64 = 1000;
/// Tokens are counted in thousandths so that rates refill smoothly per millisecond.
const MILLI: u64 = 1000;

/// `[dhcp.limits]`: packets per second (`*_rate`) and bursts (`*_burst`); a rate of 0 turns
/// that bucket off.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct DhcpLimits {
    /// Turn all DHCP rate limits off.
    pub enabled: bool,
    /// Packets per second per client MAC.
    pub mac_rate: u32,
    /// Burst per client MAC.
    pub mac_burst: u32,
    /// Packets per second per relay (giaddr), directly attached clients counting as one.
    pub relay_rate: u32,
    /// Burst per relay.
    pub relay_burst: u32,
    /// Packets per second from all unknown clients.
    pub global_rate: u32,
    /// Burst of all unknown clients.
    pub global_burst: u32,
    /// Packets per second from all known clients (reservations and `[[machine]]` entries).
    pub known_rate: u32,
    /// Burst of all known clients.
    pub known_burst: u32,
    /// How many MACs' buckets are remembered.
    pub max_tracked_macs: usize,
}

impl Default for DhcpLimits {
    fn default() -> Self {
        DhcpLimits {
            enabled: true,
            mac_rate: DEFAULT_MAC_RATE,
            mac_burst: DEFAULT_MAC_BURST,
            relay_rate: DEFAULT_RELAY_RATE,
            relay_burst: DEFAULT_RELAY_BURST,
            global_rate: DEFAULT_GLOBAL_RATE,
            global_burst: DEFAULT_GLOBAL_BURST,
            known_rate: DEFAULT_KNOWN_RATE,
            known_burst: DEFAULT_KNOWN_BURST,
            max_tracked_macs: DEFAULT_MAX_TRACKED_MACS,
        }
    }
}

/// Which bucket ran dry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Limited {
    /// The client's own MAC bucket.
    Mac,
    /// The relay's (or the directly attached link's) bucket.
    Relay,
    /// The bucket of all unknown clients.
    Global,
    /// The bucket of all known clients.
    Known,
}

impl Limited {
    /// The label in metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Limited::Mac => "mac",
            Limited::Relay => "relay",
            Limited::Global => "global",
            Limited::Known => "known",
        }
    }
}

/// One token bucket: `rate` tokens per second up to `burst`, in thousandths.
#[derive(Clone, Copy, Debug)]
struct Bucket {
    milli_tokens: u64,
    last_ms: u64,
}

impl Bucket {
    fn full(burst: u32, now_ms: u64) -> Bucket {
        Bucket {
            milli_tokens: u64::from(burst) * MILLI,
            last_ms: now_ms,
        }
    }

    /// Refill for the time since the last call; a clock that went back refills nothing.
    fn refill(&mut self, rate: u32, burst: u32, now_ms: u64) {
        let elapsed = now_ms.saturating_sub(self.last_ms);
        // rate tokens per second = rate milli-tokens per millisecond.
        let added = elapsed.saturating_mul(u64::from(rate));
        self.milli_tokens = self
            .milli_tokens
            .saturating_add(added)
            .min(u64::from(burst) * MILLI);
        self.last_ms = self.last_ms.max(now_ms);
    }

    fn has_token(&self) -> bool {
        self.milli_tokens >= MILLI
    }

    fn take(&mut self) {
        self.milli_tokens = self.milli_tokens.saturating_sub(MILLI);
    }

    fn is_full(&self, burst: u32) -> bool {
        self.milli_tokens >= u64::from(burst) * MILLI
    }
}

/// The buckets. Sans-IO: [`RateLimiter::check`] takes the time.
#[derive(Debug)]
pub struct RateLimiter {
    config: DhcpLimits,
    macs: HashMap<MacAddr, Bucket>,
    relays: HashMap<Ipv4Addr, Bucket>,
    global: Bucket,
    known: Bucket,
    last_sweep_ms: u64,
}

/// Relays remembered at most: a relay is configured infrastructure, but giaddr is whatever
/// the packet says, so the table is bounded like the MAC table.
const MAX_TRACKED_RELAYS: usize = 4096;

impl RateLimiter {
    /// Full buckets at `now_ms`.
    pub fn new(config: DhcpLimits, now_ms: u64) -> RateLimiter {
        RateLimiter {
            global: Bucket::full(config.global_burst, now_ms),
            known: Bucket::full(config.known_burst, now_ms),
            config,
            macs: HashMap::new(),
            relays: HashMap::new(),
            last_sweep_ms: now_ms,
        }
    }

    /// New limits (config reload); the buckets start full again.
    pub fn reconfigure(&mut self, config: DhcpLimits, now_ms: u64) {
        *self = RateLimiter::new(config, now_ms);
    }

    /// May a packet from `mac` via `giaddr` (0.0.0.0 when not relayed) be answered at `now_ms`?
    /// `known` says whether the client has a reservation or a machine entry. Takes a token
    /// from every bucket concerned only when all of them have one.
    pub fn check(
        &mut self,
        mac: MacAddr,
        giaddr: Ipv4Addr,
        known: bool,
        now_ms: u64,
    ) -> Result<(), Limited> {
        let c = &self.config;
        if !c.enabled {
            return Ok(());
        }
        let (mac_rate, mac_burst) = (c.mac_rate, c.mac_burst);
        let (relay_rate, relay_burst) = (c.relay_rate, c.relay_burst);
        let (shared_rate, shared_burst, shared_kind) = if known {
            (c.known_rate, c.known_burst, Limited::Known)
        } else {
            (c.global_rate, c.global_burst, Limited::Global)
        };
        let max_macs = c.max_tracked_macs;

        let shared = if known {
            &mut self.known
        } else {
            &mut self.global
        };
        shared.refill(shared_rate, shared_burst, now_ms);
        if shared_rate > 0 && !shared.has_token() {
            return Err(shared_kind);
        }

        if mac_rate > 0 && !self.macs.contains_key(&mac) && self.macs.len() >= max_macs {
            self.sweep(now_ms);
        }
        let mac_bucket = if mac_rate == 0 {
            None
        } else if let Some(b) = self.macs.get_mut(&mac) {
            b.refill(mac_rate, mac_burst, now_ms);
            Some(b)
        } else if self.macs.len() < max_macs {
            Some(
                self.macs
                    .entry(mac)
                    .or_insert_with(|| Bucket::full(mac_burst, now_ms)),
            )
        } else {
            None
        };
        if mac_bucket.as_ref().is_some_and(|b| !b.has_token()) {
            return Err(Limited::Mac);
        }

        // Known clients are not counted against their relay: the crowd behind it must not
        // starve them.
        let relay_bucket = if known || relay_rate == 0 {
            None
        } else if let Some(b) = self.relays.get_mut(&giaddr) {
            b.refill(relay_rate, relay_burst, now_ms);
            Some(b)
        } else if self.relays.len() < MAX_TRACKED_RELAYS {
            Some(
                self.relays
                    .entry(giaddr)
                    .or_insert_with(|| Bucket::full(relay_burst, now_ms)),
            )
        } else {
            None
        };
        if relay_bucket.as_ref().is_some_and(|b| !b.has_token()) {
            return Err(Limited::Relay);
        }
        if let Some(b) = relay_bucket {
            b.take();
        }
        if let Some(b) = self.macs.get_mut(&mac).filter(|_| mac_rate > 0) {
            b.take();
        }
        let shared = if known {
            &mut self.known
        } else {
            &mut self.global
        };
        if shared_rate > 0 {
            shared.take();
        }
        Ok(())
    }

    /// Forget MAC buckets that have refilled: they would behave the same if created anew.
    fn sweep(&mut self, now_ms: u64) {
        if now_ms.saturating_sub(self.last_sweep_ms) < SWEEP_INTERVAL_MS {
            return;
        }
        self.last_sweep_ms = now_ms;
        let (rate, burst) = (self.config.mac_rate, self.config.mac_burst);
        self.macs.retain(|_, b| {
            b.refill(rate, burst, now_ms);
            !b.is_full(burst)
        });
    }

    /// How many MAC buckets are held (for tests and metrics).
    pub fn tracked_macs(&self) -> usize {
        self.macs.len()
    }
}

/// Labels of the rate-limit counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabels {
    /// `mac`, `relay`, `global` or `known`.
    pub limit: String,
}

/// DHCP counters for `/metrics`, shared between the driver (which counts) and the HTTP
/// server (which registers and exposes them). Clones share the same values.
#[derive(Clone, Debug, Default)]
pub struct DhcpCounters {
    /// Packets dropped by a rate limit, by bucket.
    pub rate_limited: Family<LimitLabels, Counter>,
    /// Replies seen from other DHCP servers on the link.
    pub foreign_replies: Counter,
    /// Distinct other DHCP servers seen since start.
    pub foreign_servers: Gauge,
}

impl DhcpCounters {
    /// Count a packet dropped by `limit`.
    pub fn limited(&self, limit: Limited) {
        self.rate_limited
            .get_or_create(&LimitLabels {
                limit: limit.as_str().to_string(),
            })
            .inc();
    }

    /// Register the counters in `registry` (prefix `pxed_` comes from the registry).
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "dhcp_rate_limited",
            "DHCP packets dropped by a rate limit, by bucket",
            self.rate_limited.clone(),
        );
        registry.register(
            "dhcp_foreign_replies",
            "DHCP replies seen from other DHCP servers on the link",
            self.foreign_replies.clone(),
        );
        registry.register(
            "dhcp_foreign_servers",
            "Distinct other DHCP servers seen on the link since start",
            self.foreign_servers.clone(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mac(n: u32) -> MacAddr {
        let b = n.to_be_bytes();
        MacAddr([0x02, 0, b[0], b[1], b[2], b[3]])
    }

    const DIRECT: Ipv4Addr = Ipv4Addr::UNSPECIFIED;

    fn limits() -> DhcpLimits {
        DhcpLimits {
            mac_rate: 2,
            mac_burst: 4,
            relay_rate: 100,
            relay_burst: 100,
            global_rate: 50,
            global_burst: 50,
            known_rate: 10,
            known_burst: 10,
            ..DhcpLimits::default()
        }
    }

    #[test]
    fn one_mac_gets_its_burst_then_its_rate() {
        let mut l = RateLimiter::new(limits(), 0);
        for _ in 0..4 {
            assert_eq!(l.check(mac(1), DIRECT, false, 0), Ok(()));
        }
        assert_eq!(l.check(mac(1), DIRECT, false, 0), Err(Limited::Mac));
        // 2 per second: one token after 500 ms, not before.
        assert_eq!(l.check(mac(1), DIRECT, false, 499), Err(Limited::Mac));
        assert_eq!(l.check(mac(1), DIRECT, false, 500), Ok(()));
        assert_eq!(l.check(mac(1), DIRECT, false, 500), Err(Limited::Mac));
        // Another MAC is not affected.
        assert_eq!(l.check(mac(2), DIRECT, false, 500), Ok(()));
    }

    #[test]
    fn a_flood_of_random_macs_hits_the_global_bucket_but_known_clients_pass() {
        let mut l = RateLimiter::new(limits(), 0);
        let mut passed = 0;
        // 10 seconds of 1000 new MACs per second.
        for i in 0..10_000u32 {
            let now = u64::from(i);
            if l.check(mac(1000 + i), DIRECT, false, now).is_ok() {
                passed += 1;
            }
            // A known client asks every 500 ms: always answered.
            if i % 500 == 0 {
                assert_eq!(l.check(mac(7), DIRECT, true, now), Ok(()), "at {now} ms");
            }
        }
        // Burst 50 + 50/s for ~10 s.
        assert!((540..=551).contains(&passed), "{passed} passed");
    }

    #[test]
    fn relays_have_separate_buckets_and_known_clients_skip_them() {
        let cfg = DhcpLimits {
            global_rate: 0,
            relay_rate: 1,
            relay_burst: 3,
            ..limits()
        };
        let mut l = RateLimiter::new(cfg, 0);
        let r1 = Ipv4Addr::new(10, 1, 0, 1);
        let r2 = Ipv4Addr::new(10, 2, 0, 1);
        for i in 0..3 {
            assert_eq!(l.check(mac(i), r1, false, 0), Ok(()));
        }
        assert_eq!(l.check(mac(10), r1, false, 0), Err(Limited::Relay));
        assert_eq!(l.check(mac(11), r2, false, 0), Ok(()));
        assert_eq!(l.check(mac(12), r1, true, 0), Ok(()));
        assert_eq!(l.check(mac(10), r1, false, 1000), Ok(()));
    }

    #[test]
    fn a_refused_packet_takes_no_token_elsewhere() {
        let cfg = DhcpLimits {
            mac_burst: 1,
            global_burst: 2,
            global_rate: 1,
            ..limits()
        };
        let mut l = RateLimiter::new(cfg, 0);
        assert_eq!(l.check(mac(1), DIRECT, false, 0), Ok(()));
        // Refused by its MAC bucket: the global bucket keeps its last token.
        assert_eq!(l.check(mac(1), DIRECT, false, 0), Err(Limited::Mac));
        assert_eq!(l.check(mac(2), DIRECT, false, 0), Ok(()));
        assert_eq!(l.check(mac(3), DIRECT, false, 0), Err(Limited::Global));
    }

    #[test]
    fn the_mac_table_is_bounded_and_forgets_refilled_buckets() {
        let cfg = DhcpLimits {
            max_tracked_macs: 100,
            global_rate: 0,
            relay_rate: 0,
            ..limits()
        };
        let mut l = RateLimiter::new(cfg, 0);
        for i in 0..1000 {
            let _ = l.check(mac(i), DIRECT, false, 0);
        }
        assert_eq!(l.tracked_macs(), 100);
        // After the buckets refilled (burst 4 at 2/s: 2 s) and a sweep interval, new MACs
        // replace them.
        assert_eq!(l.check(mac(5000), DIRECT, false, 3000), Ok(()));
        assert_eq!(l.tracked_macs(), 1);
    }

    #[test]
    fn disabled_limits_and_zero_rates_never_refuse() {
        let mut l = RateLimiter::new(
            DhcpLimits {
                enabled: false,
                ..limits()
            },
            0,
        );
        for _ in 0..1000 {
            assert_eq!(l.check(mac(1), DIRECT, false, 0), Ok(()));
        }
        let mut l = RateLimiter::new(
            DhcpLimits {
                mac_rate: 0,
                relay_rate: 0,
                global_rate: 0,
                ..limits()
            },
            0,
        );
        for i in 0..1000 {
            assert_eq!(l.check(mac(i % 3), DIRECT, false, 0), Ok(()));
        }
        assert_eq!(l.tracked_macs(), 0);
    }

    #[test]
    fn a_clock_going_back_refills_nothing() {
        let mut l = RateLimiter::new(limits(), 10_000);
        for _ in 0..4 {
            assert_eq!(l.check(mac(1), DIRECT, false, 10_000), Ok(()));
        }
        assert_eq!(l.check(mac(1), DIRECT, false, 0), Err(Limited::Mac));
        assert_eq!(l.check(mac(1), DIRECT, false, 10_499), Err(Limited::Mac));
        assert_eq!(l.check(mac(1), DIRECT, false, 10_500), Ok(()));
    }
}
