//! Address pools and leases for full mode: which address a client gets. Pure bookkeeping with
//! time passed in; persisting leases is the lease store's job.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use super::SubnetConfig;
use crate::mac::MacAddr;

/// How long an offered address is held for the client that was offered it, in seconds.
/// RFC 2131 4.3.1 leaves it to the server; a PXE client answers within a few seconds.
pub const OFFER_HOLD_SECS: u64 = 30;
/// How long a declined address stays out of the pool, in seconds (RFC 2131 4.3.3: the server
/// must mark it as not available; an hour lets the conflicting host be found).
pub const DECLINE_QUARANTINE_SECS: u64 = 3600;

/// One lease. Leases follow the hardware address: firmware, iPXE and the booted OS send
/// different client identifiers but must keep one address through a boot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// Hardware address.
    pub mac: MacAddr,
    /// Leased address.
    pub ip: Ipv4Addr,
    /// Expiry, seconds since the Unix epoch.
    pub expires: u64,
    /// Hostname the client sent (option 12), if any.
    #[serde(default)]
    pub hostname: Option<String>,
}

/// Why an address cannot be acknowledged.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NakReason {
    /// The address is not in any pool pxed serves on this network.
    #[error("{0} is not on this network")]
    WrongNetwork(Ipv4Addr),
    /// The address is leased to another client.
    #[error("{ip} is leased to {owner}")]
    Taken {
        /// Address.
        ip: Ipv4Addr,
        /// Its holder.
        owner: MacAddr,
    },
    /// The address was declined and is quarantined.
    #[error("{0} was declined and is quarantined")]
    Quarantined(Ipv4Addr),
}

/// The pools of all subnets and the leases in them.
#[derive(Clone, Debug, Default)]
pub struct Pool {
    subnets: Vec<SubnetConfig>,
    leases: HashMap<MacAddr, Lease>,
    by_ip: HashMap<Ipv4Addr, MacAddr>,
    offers: HashMap<MacAddr, (Ipv4Addr, u64)>,
    declined: HashMap<Ipv4Addr, u64>,
}

impl Pool {
    /// A pool over the given subnets, with leases loaded from the store.
    pub fn new(subnets: Vec<SubnetConfig>, leases: impl IntoIterator<Item = Lease>) -> Pool {
        let mut pool = Pool {
            subnets,
            ..Default::default()
        };
        for lease in leases {
            // Two stored leases can name one address (the older one expired before the newer
            // was granted); the address belongs to the lease that ends last.
            let keep_other = pool
                .by_ip
                .get(&lease.ip)
                .and_then(|other| pool.leases.get(other))
                .is_some_and(|other| other.mac != lease.mac && other.expires > lease.expires);
            if !keep_other {
                pool.by_ip.insert(lease.ip, lease.mac);
            }
            pool.leases.insert(lease.mac, lease);
        }
        pool
    }

    /// Forget that `mac` owns `ip`, unless the address has passed to another client since
    /// (its old lease expired and the address was leased again): unmapping it then would make
    /// the new holder's address look free (found by fuzzing: two clients leased one address).
    fn unmap(&mut self, ip: Ipv4Addr, mac: &MacAddr) {
        if self.by_ip.get(&ip) == Some(mac) {
            self.by_ip.remove(&ip);
        }
    }

    /// The subnet for a request: the relay's (giaddr) when relayed, else the one holding the
    /// server's own address on the receiving interface.
    pub fn subnet_for(&self, link: Ipv4Addr) -> Option<&SubnetConfig> {
        self.subnets.iter().find(|s| s.contains(link))
    }

    /// The lease a client holds, if any.
    pub fn lease(&self, mac: &MacAddr) -> Option<&Lease> {
        self.leases.get(mac)
    }

    /// Every lease.
    pub fn leases(&self) -> impl Iterator<Item = &Lease> {
        self.leases.values()
    }

    /// The client owning an address, by lease.
    pub fn owner(&self, ip: Ipv4Addr) -> Option<MacAddr> {
        self.by_ip.get(&ip).copied()
    }

    fn in_pool(subnet: &SubnetConfig, ip: Ipv4Addr) -> bool {
        let v = u32::from(ip);
        v >= u32::from(subnet.pool_start) && v <= u32::from(subnet.pool_end)
    }

    fn free(&self, mac: &MacAddr, ip: Ipv4Addr, now: u64) -> bool {
        if self.declined.get(&ip).is_some_and(|until| *until > now) {
            return false;
        }
        if let Some(owner) = self.by_ip.get(&ip)
            && owner != mac
            && self.leases.get(owner).is_some_and(|l| l.expires > now)
        {
            return false;
        }
        !self
            .offers
            .iter()
            .any(|(m, (o, until))| m != mac && *o == ip && *until > now)
    }

    /// Choose an address to offer (RFC 2131 4.3.1): the client's current or previous lease,
    /// else the requested address if free, else the first free address in the pool.
    pub fn offer(
        &mut self,
        mac: MacAddr,
        link: Ipv4Addr,
        requested: Option<Ipv4Addr>,
        now: u64,
    ) -> Option<Ipv4Addr> {
        let subnet = self.subnet_for(link)?.clone();
        let previous = self.leases.get(&mac).map(|l| l.ip);
        let candidates = previous.into_iter().chain(requested);
        let chosen = candidates
            .filter(|ip| Self::in_pool(&subnet, *ip))
            .find(|ip| self.free(&mac, *ip, now))
            .or_else(|| {
                (u32::from(subnet.pool_start)..=u32::from(subnet.pool_end))
                    .map(Ipv4Addr::from)
                    .find(|ip| self.free(&mac, *ip, now))
            })?;
        self.offers.insert(mac, (chosen, now + OFFER_HOLD_SECS));
        Some(chosen)
    }

    /// Check that `ip` can be leased to `mac` on the link, without changing anything.
    pub fn check(
        &self,
        mac: &MacAddr,
        link: Ipv4Addr,
        ip: Ipv4Addr,
        now: u64,
    ) -> Result<(), NakReason> {
        let subnet = self
            .subnet_for(link)
            .filter(|s| s.contains(ip))
            .ok_or(NakReason::WrongNetwork(ip))?;
        let reserved_elsewhere = self.owner(ip).filter(|o| o != mac);
        if let Some(owner) = reserved_elsewhere
            && self.leases.get(&owner).is_some_and(|l| l.expires > now)
        {
            return Err(NakReason::Taken { ip, owner });
        }
        if self.declined.get(&ip).is_some_and(|until| *until > now) {
            return Err(NakReason::Quarantined(ip));
        }
        if !Self::in_pool(subnet, ip) && self.leases.get(mac).is_none_or(|l| l.ip != ip) {
            return Err(NakReason::WrongNetwork(ip));
        }
        Ok(())
    }

    /// The lease that acknowledging `ip` for `mac` would create (not yet applied: the store
    /// makes it durable first, then [`Pool::apply`] records it).
    pub fn prepare(
        &self,
        mac: MacAddr,
        link: Ipv4Addr,
        ip: Ipv4Addr,
        hostname: Option<String>,
        now: u64,
    ) -> Result<Lease, NakReason> {
        self.check(&mac, link, ip, now)?;
        let lease_time = self
            .subnet_for(link)
            .map_or(3600, |s| s.lease_time.as_secs());
        Ok(Lease {
            mac,
            ip,
            expires: now + lease_time,
            hostname,
        })
    }

    /// Record a lease (after it is durable).
    pub fn apply(&mut self, lease: Lease) {
        if let Some(old) = self.leases.get(&lease.mac)
            && old.ip != lease.ip
        {
            let old_ip = old.ip;
            self.unmap(old_ip, &lease.mac);
        }
        self.offers.remove(&lease.mac);
        self.by_ip.insert(lease.ip, lease.mac);
        self.leases.insert(lease.mac, lease);
    }

    /// RFC 2131 4.3.4: a released address returns to the pool. Returns the lease that ended.
    pub fn release(&mut self, mac: &MacAddr, ip: Ipv4Addr) -> Option<Lease> {
        if self.leases.get(mac).is_some_and(|l| l.ip == ip) {
            self.unmap(ip, mac);
            return self.leases.remove(mac);
        }
        None
    }

    /// RFC 2131 4.3.3: the client found the address in use; quarantine it.
    pub fn decline(&mut self, mac: &MacAddr, ip: Ipv4Addr, now: u64) -> Option<Lease> {
        self.declined.insert(ip, now + DECLINE_QUARANTINE_SECS);
        self.offers.remove(mac);
        self.release(mac, ip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn subnet() -> SubnetConfig {
        SubnetConfig {
            network: Ipv4Addr::new(10, 0, 0, 0),
            prefix_len: 24,
            pool_start: Ipv4Addr::new(10, 0, 0, 100),
            pool_end: Ipv4Addr::new(10, 0, 0, 102),
            router: None,
            dns: vec![],
            domain: None,
            lease_time: Duration::from_secs(600),
        }
    }
    const LINK: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);

    fn mac(n: u8) -> MacAddr {
        MacAddr([2, 0, 0, 0, 0, n])
    }

    #[test]
    fn same_client_same_address() {
        let mut p = Pool::new(vec![subnet()], []);
        let a = p.offer(mac(1), LINK, None, 0).unwrap();
        let lease = p.prepare(mac(1), LINK, a, None, 0).unwrap();
        p.apply(lease);
        assert_eq!(p.offer(mac(1), LINK, None, 10), Some(a));
        assert_ne!(p.offer(mac(2), LINK, None, 10), Some(a));
    }

    #[test]
    fn offers_are_held_then_exhaust() {
        let mut p = Pool::new(vec![subnet()], []);
        let ips: Vec<_> = (1..=3)
            .map(|n| p.offer(mac(n), LINK, None, 0).unwrap())
            .collect();
        assert_eq!(ips.len(), 3);
        assert_eq!(
            p.offer(mac(4), LINK, None, 0),
            None,
            "pool of three is exhausted"
        );
        // After the hold time the offers lapse.
        assert!(p.offer(mac(4), LINK, None, OFFER_HOLD_SECS + 1).is_some());
    }

    #[test]
    fn taken_and_declined_addresses_are_refused() {
        let mut p = Pool::new(vec![subnet()], []);
        let a = p.offer(mac(1), LINK, None, 0).unwrap();
        p.apply(p.prepare(mac(1), LINK, a, None, 0).unwrap());
        assert!(matches!(
            p.check(&mac(2), LINK, a, 1),
            Err(NakReason::Taken { .. })
        ));
        p.decline(&mac(1), a, 1);
        assert_eq!(p.check(&mac(2), LINK, a, 2), Err(NakReason::Quarantined(a)));
        assert_ne!(p.offer(mac(2), LINK, Some(a), 2), Some(a));
        assert!(matches!(
            p.check(&mac(2), LINK, Ipv4Addr::new(192, 168, 1, 5), 2),
            Err(NakReason::WrongNetwork(_))
        ));
    }

    #[test]
    fn expired_leases_free_their_address() {
        let mut p = Pool::new(vec![subnet()], []);
        let a = p.offer(mac(1), LINK, None, 0).unwrap();
        p.apply(p.prepare(mac(1), LINK, a, None, 0).unwrap());
        assert!(p.check(&mac(2), LINK, a, 601).is_ok());
    }

    /// Regression (fuzz/artifacts/dhcp_engine/double-lease-min): A's lease expires, B is given
    /// the address, then A releases it (or moves to another address). That must not free B's
    /// address for a third client.
    #[test]
    fn stale_lease_does_not_free_the_new_holders_address() {
        for a_moves_instead in [false, true] {
            let mut p = Pool::new(vec![subnet()], []);
            let x = p.offer(mac(1), LINK, None, 0).unwrap();
            p.apply(p.prepare(mac(1), LINK, x, None, 0).unwrap());
            // A's lease (600 s) has expired; B takes the address.
            p.apply(p.prepare(mac(2), LINK, x, None, 700).unwrap());
            assert_eq!(p.owner(x), Some(mac(2)));
            if a_moves_instead {
                let y = p.offer(mac(1), LINK, None, 701).unwrap();
                assert_ne!(y, x);
                p.apply(p.prepare(mac(1), LINK, y, None, 701).unwrap());
            } else {
                assert!(p.release(&mac(1), x).is_some());
            }
            assert_eq!(p.owner(x), Some(mac(2)), "B still owns the address");
            assert!(matches!(
                p.check(&mac(3), LINK, x, 702),
                Err(NakReason::Taken { .. })
            ));
            assert_ne!(p.offer(mac(3), LINK, Some(x), 702), Some(x));
        }
    }

    #[test]
    fn reloaded_store_gives_a_shared_address_to_the_newer_lease() {
        let ip = Ipv4Addr::new(10, 0, 0, 100);
        let old = Lease {
            mac: mac(1),
            ip,
            expires: 600,
            hostname: None,
        };
        let new = Lease {
            mac: mac(2),
            ip,
            expires: 1300,
            hostname: None,
        };
        for order in [[old.clone(), new.clone()], [new.clone(), old.clone()]] {
            let p = Pool::new(vec![subnet()], order);
            assert_eq!(p.owner(ip), Some(mac(2)));
        }
    }
}
