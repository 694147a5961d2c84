//! Link impairments on one switch port: loss, duplication, reordering, delay with jitter, an
//! MTU cap, dropping of IP fragments and a link-up delay (a switch port that forwards nothing for its first seconds, like
//! one running spanning tree: firmware-quirks.md Q13). Randomness comes from a seeded generator,
//! so a lab with the same seed drops the same frames; the filter takes `now` from its caller,
//! so tests drive it with virtual time.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};

use crate::switch::{Direction, FrameFilter};

/// Ethernet header length: the MTU counts the IP packet, not the frame.
const ETH_HEADER: usize = 14;
/// How much longer a reordered frame is held than the frames around it: long enough for the
/// next frame of a burst to overtake it, short against any firmware retransmit timer (>= 1 s).
pub const REORDER_HOLD: Duration = Duration::from_millis(15);
/// EtherType of IPv4 (a fragment is recognised in its header).
const ETHERTYPE_IPV4: [u8; 2] = [0x08, 0x00];
/// IPv4 flags/fragment-offset field: the More Fragments bit and the 13-bit offset (RFC 791
/// section 3.1). A datagram is a fragment when either is set.
const IPV4_MF_OR_OFFSET: u16 = 0x3fff;
/// The smallest IPv4 MTU a link may have (RFC 791: every host takes 576-byte datagrams; 68 is
/// the absolute minimum, anything below breaks IP itself).
const MIN_MTU: usize = 68;

/// Which way an impairment applies, seen from the machine on the port.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Ways {
    /// Frames from the machine and to it.
    #[default]
    Both,
    /// Only frames the machine sends.
    FromClient,
    /// Only frames the machine receives.
    ToClient,
}

impl Ways {
    fn applies(self, dir: Direction) -> bool {
        match self {
            Ways::Both => true,
            Ways::FromClient => dir == Direction::Ingress,
            Ways::ToClient => dir == Direction::Egress,
        }
    }
}

/// `[machine.impair]`: what the port does to frames. Probabilities are 0..=1.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ImpairConfig {
    /// Probability a frame is lost.
    #[serde(default)]
    pub loss: f64,
    /// Probability a frame is delivered twice.
    #[serde(default)]
    pub duplicate: f64,
    /// Probability a frame is held back by [`REORDER_HOLD`] so the next ones overtake it.
    #[serde(default)]
    pub reorder: f64,
    /// Fixed delay added to every frame.
    #[serde(default, with = "humantime_serde")]
    pub delay: Option<Duration>,
    /// Up to this much extra delay, uniformly random per frame (can reorder on its own).
    #[serde(default, with = "humantime_serde")]
    pub jitter: Option<Duration>,
    /// Largest IP packet (bytes after the Ethernet header) the link carries; bigger frames are
    /// dropped, as a path with a smaller MTU would (Q7).
    pub mtu: Option<usize>,
    /// Drop IPv4 fragments (both ways): a firewall or NAT on the path that does not pass
    /// fragments, or a ROM that cannot reassemble them ("many netboot ROMs can't cope with
    /// fragmented packets", dnsmasq 2.51: Q7). Whole datagrams up to the MTU pass.
    #[serde(default)]
    pub drop_fragments: bool,
    /// Frames are dropped for this long after the port comes up (spanning tree, LACP: Q13).
    #[serde(default, with = "humantime_serde")]
    pub link_up_delay: Option<Duration>,
    /// Which way loss, duplication, reordering and delay apply (MTU, fragments and link-up: both ways).
    #[serde(default)]
    pub ways: Ways,
    /// The random seed (same seed, same frames dropped).
    #[serde(default)]
    pub seed: u64,
}

impl ImpairConfig {
    /// Reject probabilities outside 0..=1 and impossible MTUs.
    pub fn validate(&self) -> Result<()> {
        for (name, p) in [
            ("loss", self.loss),
            ("duplicate", self.duplicate),
            ("reorder", self.reorder),
        ] {
            if !(0.0..=1.0).contains(&p) {
                bail!("impair.{name} = {p}: a probability is between 0 and 1");
            }
        }
        if let Some(mtu) = self.mtu
            && mtu < MIN_MTU
        {
            bail!("impair.mtu = {mtu}: IPv4 needs at least {MIN_MTU}");
        }
        Ok(())
    }
}

/// SplitMix64 (Steele, Lea, Flood 2014): tiny, seedable, good enough to pick frames.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.unit() < p
    }
}

/// Counts of what the filter did, for tests and reports.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ImpairStats {
    /// Frames offered to the filter.
    pub seen: u64,
    /// Lost at random.
    pub lost: u64,
    /// Dropped for exceeding the MTU.
    pub too_big: u64,
    /// IPv4 fragments dropped.
    pub fragments: u64,
    /// Dropped before the link came up.
    pub link_down: u64,
    /// Extra copies sent.
    pub duplicated: u64,
    /// Held back to be overtaken.
    pub reordered: u64,
}

/// The impairment filter for one port.
pub struct Impair {
    cfg: ImpairConfig,
    rng: Rng,
    up_at: Instant,
    stats: ImpairStats,
}

impl Impair {
    /// A filter whose port came up at `start` (the link-up delay counts from it).
    pub fn new(cfg: ImpairConfig, start: Instant) -> Self {
        let up_at = start + cfg.link_up_delay.unwrap_or_default();
        Impair {
            rng: Rng::new(cfg.seed),
            cfg,
            up_at,
            stats: ImpairStats::default(),
        }
    }

    /// What it did so far.
    pub fn stats(&self) -> &ImpairStats {
        &self.stats
    }

    fn delay(&mut self) -> Duration {
        let base = self.cfg.delay.unwrap_or_default();
        match self.cfg.jitter {
            Some(j) if !j.is_zero() => base + j.mul_f64(self.rng.unit()),
            _ => base,
        }
    }
}

impl FrameFilter for Impair {
    fn on_frame(
        &mut self,
        dir: Direction,
        frame: Vec<u8>,
        now: Instant,
    ) -> Vec<(Duration, Vec<u8>)> {
        self.stats.seen += 1;
        if now < self.up_at {
            self.stats.link_down += 1;
            return Vec::new();
        }
        if let Some(mtu) = self.cfg.mtu
            && frame.len().saturating_sub(ETH_HEADER) > mtu
        {
            self.stats.too_big += 1;
            return Vec::new();
        }
        if self.cfg.drop_fragments && is_ipv4_fragment(&frame) {
            self.stats.fragments += 1;
            return Vec::new();
        }
        if !self.cfg.ways.applies(dir) {
            return vec![(Duration::ZERO, frame)];
        }
        // Draw every random number for every frame, so one setting does not shift the
        // sequence another setting sees (changing `loss` keeps the same reorders).
        let lose = self.rng.chance(self.cfg.loss);
        let dup = self.rng.chance(self.cfg.duplicate);
        let reorder = self.rng.chance(self.cfg.reorder);
        let mut delay = self.delay();
        if lose {
            self.stats.lost += 1;
            return Vec::new();
        }
        if reorder {
            self.stats.reordered += 1;
            delay += REORDER_HOLD;
        }
        let mut out = Vec::with_capacity(2);
        if dup {
            self.stats.duplicated += 1;
            let second = self.delay();
            out.push((delay, frame.clone()));
            out.push((second.max(delay), frame));
        } else {
            out.push((delay, frame));
        }
        out
    }
}

/// Whether an Ethernet frame carries an IPv4 fragment (first, middle or last piece).
pub(crate) fn is_ipv4_fragment(frame: &[u8]) -> bool {
    if frame.get(12..14) != Some(&ETHERTYPE_IPV4[..]) {
        return false;
    }
    frame
        .get(ETH_HEADER + 6..ETH_HEADER + 8)
        .is_some_and(|f| u16::from_be_bytes([f[0], f[1]]) & IPV4_MF_OR_OFFSET != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(tag: u32, len: usize) -> Vec<u8> {
        let mut f = vec![0u8; len];
        f[14..18].copy_from_slice(&tag.to_be_bytes());
        f
    }

    /// Push `n` frames spaced 1 ms apart in virtual time; return (deliver time, tag) in
    /// delivery order.
    fn drive(imp: &mut Impair, n: u32, start: Instant) -> Vec<(Instant, u32)> {
        let mut out = Vec::new();
        for i in 0..n {
            let now = start + Duration::from_millis(u64::from(i));
            for (d, f) in imp.on_frame(Direction::Ingress, frame(i, 100), now) {
                let tag = u32::from_be_bytes(f[14..18].try_into().unwrap());
                out.push((now + d, tag));
            }
        }
        out.sort_by_key(|(t, _)| *t);
        out
    }

    #[test]
    fn same_seed_same_fate_and_rates_near_the_settings() {
        let cfg = ImpairConfig {
            loss: 0.1,
            duplicate: 0.05,
            reorder: 0.1,
            seed: 42,
            ..Default::default()
        };
        let t0 = Instant::now();
        let mut a = Impair::new(cfg.clone(), t0);
        let mut b = Impair::new(cfg.clone(), t0);
        let ra = drive(&mut a, 10_000, t0);
        assert_eq!(ra, drive(&mut b, 10_000, t0), "deterministic per seed");
        let s = a.stats();
        assert!((800..1200).contains(&s.lost), "{s:?}");
        assert!((350..650).contains(&s.duplicated), "{s:?}");
        assert!((800..1200).contains(&s.reordered), "{s:?}");
        assert_eq!(ra.len() as u64, 10_000 - s.lost + s.duplicated);
        // Reordered frames really arrive after later ones.
        let overtaken = ra.windows(2).filter(|w| w[0].1 > w[1].1).count();
        assert!(overtaken > 500, "{overtaken} inversions");
        let mut c = Impair::new(ImpairConfig { seed: 43, ..cfg }, t0);
        assert_ne!(ra, drive(&mut c, 10_000, t0), "another seed, other frames");
    }

    #[test]
    fn nothing_set_passes_everything_at_once() {
        let t0 = Instant::now();
        let mut imp = Impair::new(ImpairConfig::default(), t0);
        let out = drive(&mut imp, 100, t0);
        assert_eq!(out.len(), 100);
        assert!(out.iter().enumerate().all(|(i, (_, tag))| *tag == i as u32));
    }

    #[test]
    fn link_up_delay_drops_then_forwards() {
        let t0 = Instant::now();
        let mut imp = Impair::new(
            ImpairConfig {
                link_up_delay: Some(Duration::from_secs(5)),
                ..Default::default()
            },
            t0,
        );
        let f = frame(1, 60);
        assert!(
            imp.on_frame(Direction::Ingress, f.clone(), t0 + Duration::from_secs(4))
                .is_empty()
        );
        assert!(
            imp.on_frame(
                Direction::Egress,
                f.clone(),
                t0 + Duration::from_millis(4999)
            )
            .is_empty()
        );
        assert_eq!(
            imp.on_frame(Direction::Ingress, f, t0 + Duration::from_secs(5))
                .len(),
            1
        );
        assert_eq!(imp.stats().link_down, 2);
    }

    #[test]
    fn mtu_cap_drops_only_bigger_packets() {
        let t0 = Instant::now();
        let mut imp = Impair::new(
            ImpairConfig {
                mtu: Some(1400),
                ..Default::default()
            },
            t0,
        );
        assert_eq!(
            imp.on_frame(Direction::Egress, frame(1, 14 + 1400), t0)
                .len(),
            1
        );
        assert!(
            imp.on_frame(Direction::Egress, frame(2, 14 + 1401), t0)
                .is_empty()
        );
        assert_eq!(imp.stats().too_big, 1);
    }

    #[test]
    fn fragments_are_dropped_whole_datagrams_pass() {
        let t0 = Instant::now();
        let mut imp = Impair::new(
            ImpairConfig {
                drop_fragments: true,
                ..Default::default()
            },
            t0,
        );
        let ipv4 = |flags_offset: u16| {
            let mut f = vec![0u8; 14 + 1500];
            f[12..14].copy_from_slice(&ETHERTYPE_IPV4);
            f[14] = 0x45;
            f[20..22].copy_from_slice(&flags_offset.to_be_bytes());
            f
        };
        // DF set, no offset: a whole datagram.
        assert_eq!(imp.on_frame(Direction::Egress, ipv4(0x4000), t0).len(), 1);
        // First piece (MF), middle and last (offset set).
        for fo in [0x2000, 0x2000 | 185, 370] {
            assert!(imp.on_frame(Direction::Egress, ipv4(fo), t0).is_empty());
        }
        // Not IPv4 (ARP), and runts: never taken for fragments.
        let mut arp = ipv4(0x2000);
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        assert_eq!(imp.on_frame(Direction::Ingress, arp, t0).len(), 1);
        assert_eq!(imp.on_frame(Direction::Ingress, vec![8, 0], t0).len(), 1);
        assert_eq!(imp.stats().fragments, 3);
    }

    #[test]
    fn delay_and_jitter_stay_in_bounds_and_ways_are_respected() {
        let t0 = Instant::now();
        let mut imp = Impair::new(
            ImpairConfig {
                delay: Some(Duration::from_millis(20)),
                jitter: Some(Duration::from_millis(10)),
                loss: 1.0,
                ways: Ways::FromClient,
                seed: 7,
                ..Default::default()
            },
            t0,
        );
        // Loss 1.0 from the client: everything the machine sends is lost ...
        assert!(
            imp.on_frame(Direction::Ingress, frame(1, 60), t0)
                .is_empty()
        );
        // ... and what it receives is untouched.
        let out = imp.on_frame(Direction::Egress, frame(2, 60), t0);
        assert_eq!(out, vec![(Duration::ZERO, frame(2, 60))]);
        let mut imp = Impair::new(
            ImpairConfig {
                delay: Some(Duration::from_millis(20)),
                jitter: Some(Duration::from_millis(10)),
                seed: 7,
                ..Default::default()
            },
            t0,
        );
        for i in 0..1000 {
            let out = imp.on_frame(Direction::Egress, frame(i, 60), t0);
            let d = out[0].0;
            assert!(d >= Duration::from_millis(20) && d <= Duration::from_millis(30));
        }
    }

    #[test]
    fn bad_settings_are_refused() {
        for cfg in [
            ImpairConfig {
                loss: 1.5,
                ..Default::default()
            },
            ImpairConfig {
                mtu: Some(20),
                ..Default::default()
            },
        ] {
            assert!(cfg.validate().is_err());
        }
        let parsed: ImpairConfig =
            toml::from_str("loss = 0.1\ndelay = \"5ms\"\nlink_up_delay = \"3s\"\nmtu = 1400")
                .unwrap();
        assert_eq!(parsed.link_up_delay, Some(Duration::from_secs(3)));
        assert!(toml::from_str::<ImpairConfig>("los = 0.1").is_err());
    }
}
