//! Address pools and leases for full mode: which address a client gets. Pure bookkeeping with
//! time passed in; persisting leases is the lease store's job.

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use super::{ReservationConfig, SubnetConfig};
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
    /// Hostname the client sent (option 12), or its reservation's.
    #[serde(default)]
    pub hostname: Option<String>,
    /// The client identifier (option 61) of the last request, as hex, for the listing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
}

/// Who is asking: the hardware address, and the client identifier if one was sent.
#[derive(Clone, Copy, Debug)]
pub struct ClientKey<'a> {
    /// Hardware address (the lease key).
    pub mac: MacAddr,
    /// Option 61, used only to match reservations.
    pub client_id: Option<&'a [u8]>,
}

/// Why an address cannot be acknowledged.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NakReason {
    /// The address is not in any pool pxed serves on this network.
    #[error("{0} is not on this network")]
    WrongNetwork(Ipv4Addr),
    /// The address is leased (or offered) to another client.
    #[error("{ip} is leased to {owner}")]
    Taken {
        /// Address.
        ip: Ipv4Addr,
        /// Its holder.
        owner: MacAddr,
    },
    /// The address is reserved for another machine.
    #[error("{0} is reserved for another machine")]
    ReservedElsewhere(Ipv4Addr),
    /// The client has a reservation and must move to it.
    #[error("this machine's address is {0}")]
    HasReservation(Ipv4Addr),
    /// The address was declined and is quarantined.
    #[error("{0} was declined and is quarantined")]
    Quarantined(Ipv4Addr),
}

#[derive(Clone, Debug)]
struct Reservation {
    mac: Option<MacAddr>,
    client_id: Option<Vec<u8>>,
    ip: Ipv4Addr,
    hostname: Option<String>,
}

impl Reservation {
    fn matches(&self, who: &ClientKey<'_>) -> bool {
        match (&self.client_id, who.client_id) {
            (Some(want), Some(got)) if want.as_slice() == got => true,
            _ => self.mac == Some(who.mac),
        }
    }
}

/// The pools of all subnets, the reservations and the leases in them.
#[derive(Clone, Debug, Default)]
pub struct Pool {
    subnets: Vec<SubnetConfig>,
    reservations: Vec<Reservation>,
    reserved_ips: HashMap<Ipv4Addr, usize>,
    leases: HashMap<MacAddr, Lease>,
    by_ip: HashMap<Ipv4Addr, MacAddr>,
    offers: HashMap<MacAddr, (Ipv4Addr, u64)>,
    offered_ips: HashMap<Ipv4Addr, (MacAddr, u64)>,
    declined: HashMap<Ipv4Addr, u64>,
    /// Clients whose lease ran out and was reported: the lease stays as "free but remembered"
    /// (RFC 2131 4.3.1 prefers the client's previous address) until another client takes
    /// the address. At most one per address, so bounded by the pools.
    lapsed: HashSet<MacAddr>,
    /// Per subnet: where the search for a free address resumes, so that allocation costs
    /// O(1) amortised instead of a scan from the start of the pool for every client.
    cursors: Vec<u32>,
}

impl Pool {
    /// A pool over the given subnets, with leases loaded from the store.
    pub fn new(subnets: Vec<SubnetConfig>, leases: impl IntoIterator<Item = Lease>) -> Pool {
        Pool::with_reservations(subnets, &[], leases)
    }

    /// A pool with reservations.
    pub fn with_reservations(
        subnets: Vec<SubnetConfig>,
        reservations: &[ReservationConfig],
        leases: impl IntoIterator<Item = Lease>,
    ) -> Pool {
        let mut pool = Pool::default();
        pool.reconfigure(subnets, reservations);
        for lease in leases {
            // Two stored leases on one address (an expired one taken over): the later wins.
            if let Some(other) = pool.by_ip.get(&lease.ip).and_then(|m| pool.leases.get(m))
                && other.expires >= lease.expires
            {
                continue;
            }
            if let Some(old) = pool.by_ip.insert(lease.ip, lease.mac) {
                pool.leases.remove(&old);
            }
            pool.leases.insert(lease.mac, lease);
        }
        pool
    }

    /// Replace subnets and reservations (config reload); leases stay.
    pub fn reconfigure(&mut self, subnets: Vec<SubnetConfig>, reservations: &[ReservationConfig]) {
        self.cursors = subnets.iter().map(|s| u32::from(s.pool_start)).collect();
        self.subnets = subnets;
        self.reservations = reservations
            .iter()
            .map(|r| Reservation {
                mac: r.mac,
                client_id: r.client_id_bytes(),
                ip: r.ip,
                hostname: r.hostname.clone(),
            })
            .collect();
        self.reserved_ips = self
            .reservations
            .iter()
            .enumerate()
            .map(|(i, r)| (r.ip, i))
            .collect();
    }

    /// The subnet for a request: the relay's (giaddr) when relayed, else the one holding the
    /// server's own address on the receiving interface.
    pub fn subnet_for(&self, link: Ipv4Addr) -> Option<&SubnetConfig> {
        self.subnets.iter().find(|s| s.contains(link))
    }

    fn subnet_index(&self, link: Ipv4Addr) -> Option<usize> {
        self.subnets.iter().position(|s| s.contains(link))
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

    /// The reservation of a client, if it has one: (address, hostname).
    pub fn reservation(&self, who: &ClientKey<'_>) -> Option<(Ipv4Addr, Option<&str>)> {
        // A client-identifier match is more specific than a MAC match.
        let by_id = self
            .reservations
            .iter()
            .find(|r| r.client_id.is_some() && r.matches(who));
        by_id
            .or_else(|| self.reservations.iter().find(|r| r.matches(who)))
            .map(|r| (r.ip, r.hostname.as_deref()))
    }

    fn in_pool(subnet: &SubnetConfig, ip: Ipv4Addr) -> bool {
        let v = u32::from(ip);
        v >= u32::from(subnet.pool_start) && v <= u32::from(subnet.pool_end)
    }

    fn reserved_for_other(&self, who: &ClientKey<'_>, ip: Ipv4Addr) -> bool {
        self.reserved_ips
            .get(&ip)
            .and_then(|i| self.reservations.get(*i))
            .is_some_and(|r| !r.matches(who))
    }

    fn taken_by_other(&self, mac: &MacAddr, ip: Ipv4Addr, now: u64) -> Option<MacAddr> {
        if let Some(owner) = self.by_ip.get(&ip)
            && owner != mac
            && self.leases.get(owner).is_some_and(|l| l.expires > now)
        {
            return Some(*owner);
        }
        self.offered_ips
            .get(&ip)
            .filter(|(m, until)| m != mac && *until > now)
            .map(|(m, _)| *m)
    }

    fn free(&self, who: &ClientKey<'_>, ip: Ipv4Addr, now: u64) -> bool {
        self.declined.get(&ip).is_none_or(|until| *until <= now)
            && !self.reserved_for_other(who, ip)
            && self.taken_by_other(&who.mac, ip, now).is_none()
    }

    /// Choose an address to offer (RFC 2131 4.3.1): the client's reservation, else its current
    /// or previous lease, else the requested address if free, else a free address in the pool.
    pub fn offer(
        &mut self,
        who: &ClientKey<'_>,
        link: Ipv4Addr,
        requested: Option<Ipv4Addr>,
        now: u64,
    ) -> Option<Ipv4Addr> {
        let index = self.subnet_index(link)?;
        let subnet = self.subnets.get(index)?;
        let chosen =
            if let Some((ip, _)) = self.reservation(who).filter(|(ip, _)| subnet.contains(*ip)) {
                // A reserved address is offered even if quarantined: it is this machine's alone.
                self.taken_by_other(&who.mac, ip, now)
                    .is_none()
                    .then_some(ip)?
            } else {
                // RFC 2131 4.3.1 order: the client's lease, the address already offered to it
                // (a retransmitted DISCOVER must get the same offer), the requested address.
                let previous = self.leases.get(&who.mac).map(|l| l.ip);
                let offered = self
                    .offers
                    .get(&who.mac)
                    .filter(|(_, until)| *until > now)
                    .map(|(ip, _)| *ip);
                let candidates = previous.into_iter().chain(offered).chain(requested);
                match candidates
                    .filter(|ip| Self::in_pool(subnet, *ip))
                    .find(|ip| self.free(who, *ip, now))
                {
                    Some(ip) => ip,
                    None => self.scan(index, who, now)?,
                }
            };
        self.hold(who.mac, chosen, now);
        Some(chosen)
    }

    /// The next free pool address after the subnet's cursor, wrapping once around the pool.
    fn scan(&mut self, index: usize, who: &ClientKey<'_>, now: u64) -> Option<Ipv4Addr> {
        let subnet = self.subnets.get(index)?;
        let (start, end) = (u32::from(subnet.pool_start), u32::from(subnet.pool_end));
        let cursor = self
            .cursors
            .get(index)
            .copied()
            .unwrap_or(start)
            .clamp(start, end);
        // First an address nobody remembers; only when there is none, one whose lease ran
        // out (the oldest-held is as good as any: its client has been gone longest or not).
        let order = || (cursor..=end).chain(start..cursor).map(Ipv4Addr::from);
        let found = order()
            .find(|ip| self.free(who, *ip, now) && !self.remembered_for_other(&who.mac, *ip))
            .or_else(|| order().find(|ip| self.free(who, *ip, now)))?;
        if let Some(c) = self.cursors.get_mut(index) {
            *c = u32::from(found).saturating_add(1);
        }
        Some(found)
    }

    /// Whether `ip` is another client's expired, remembered lease.
    fn remembered_for_other(&self, mac: &MacAddr, ip: Ipv4Addr) -> bool {
        self.by_ip.get(&ip).is_some_and(|owner| owner != mac)
    }

    fn hold(&mut self, mac: MacAddr, ip: Ipv4Addr, now: u64) {
        if let Some((old, _)) = self.offers.insert(mac, (ip, now + OFFER_HOLD_SECS))
            && old != ip
        {
            self.offered_ips.remove(&old);
        }
        self.offered_ips.insert(ip, (mac, now + OFFER_HOLD_SECS));
    }

    /// Check that `ip` can be leased to the client on the link, without changing anything.
    pub fn check(
        &self,
        who: &ClientKey<'_>,
        link: Ipv4Addr,
        ip: Ipv4Addr,
        now: u64,
    ) -> Result<(), NakReason> {
        let subnet = self
            .subnet_for(link)
            .filter(|s| s.contains(ip))
            .ok_or(NakReason::WrongNetwork(ip))?;
        if let Some((reserved, _)) = self.reservation(who).filter(|(r, _)| subnet.contains(*r)) {
            if reserved != ip {
                return Err(NakReason::HasReservation(reserved));
            }
        } else if self.reserved_for_other(who, ip) {
            return Err(NakReason::ReservedElsewhere(ip));
        } else if self.declined.get(&ip).is_some_and(|until| *until > now) {
            return Err(NakReason::Quarantined(ip));
        } else if !Self::in_pool(subnet, ip) && self.leases.get(&who.mac).is_none_or(|l| l.ip != ip)
        {
            return Err(NakReason::WrongNetwork(ip));
        }
        if let Some(owner) = self.taken_by_other(&who.mac, ip, now) {
            return Err(NakReason::Taken { ip, owner });
        }
        Ok(())
    }

    /// The lease that acknowledging `ip` for the client would create.
    pub fn prepare(
        &self,
        who: &ClientKey<'_>,
        link: Ipv4Addr,
        ip: Ipv4Addr,
        hostname: Option<String>,
        now: u64,
    ) -> Result<Lease, NakReason> {
        self.check(who, link, ip, now)?;
        let lease_time = self
            .subnet_for(link)
            .map_or(3600, |s| s.lease_time.as_secs());
        let reserved_name = self
            .reservation(who)
            .and_then(|(_, name)| name.map(str::to_string));
        Ok(Lease {
            mac: who.mac,
            ip,
            expires: now + lease_time,
            hostname: reserved_name.or(hostname),
            client_id: who.client_id.map(hex::encode),
        })
    }

    /// Record a lease. The engine records it when it decides, so that the next packet sees
    /// it; the driver holds the ACK until the store has made it durable.
    pub fn apply(&mut self, lease: Lease) {
        if let Some(old) = self.leases.get(&lease.mac)
            && old.ip != lease.ip
        {
            self.by_ip.remove(&old.ip);
        }
        // An expired lease of another machine on this address is superseded.
        if let Some(previous) = self.by_ip.insert(lease.ip, lease.mac)
            && previous != lease.mac
        {
            self.leases.remove(&previous);
            self.lapsed.remove(&previous);
        }
        self.lapsed.remove(&lease.mac);
        if let Some((ip, _)) = self.offers.remove(&lease.mac) {
            self.offered_ips.remove(&ip);
        }
        self.offered_ips.remove(&lease.ip);
        self.leases.insert(lease.mac, lease);
    }

    /// RFC 2131 4.3.4: a released address returns to the pool. Returns the lease that ended.
    pub fn release(&mut self, mac: &MacAddr, ip: Ipv4Addr) -> Option<Lease> {
        if self.leases.get(mac).is_some_and(|l| l.ip == ip) {
            self.by_ip.remove(&ip);
            self.lapsed.remove(mac);
            return self.leases.remove(mac);
        }
        None
    }

    /// RFC 2131 4.3.3: the client found the address in use; quarantine it.
    pub fn decline(&mut self, mac: &MacAddr, ip: Ipv4Addr, now: u64) -> Option<Lease> {
        self.declined.insert(ip, now + DECLINE_QUARANTINE_SECS);
        if let Some((offered, _)) = self.offers.remove(mac) {
            self.offered_ips.remove(&offered);
        }
        self.release(mac, ip)
    }

    /// A conflict probe found a host on `ip`: keep it out of the pool like a declined address
    /// (RFC 2131 2.2: the server marks it unavailable) and drop the offer made with it.
    pub fn quarantine(&mut self, mac: &MacAddr, ip: Ipv4Addr, now: u64) {
        self.declined.insert(ip, now + DECLINE_QUARANTINE_SECS);
        if self.offers.get(mac).is_some_and(|(o, _)| *o == ip) {
            self.offers.remove(mac);
        }
        if self.offered_ips.get(&ip).is_some_and(|(m, _)| m == mac) {
            self.offered_ips.remove(&ip);
        }
    }

    /// Report leases whose time is up (once each) and forget lapsed offers and quarantines.
    /// An ended lease stays as the client's remembered address: free for anyone, but offered
    /// to others only when no unremembered address is left. Returns the leases that ended,
    /// for the store and the lease hook.
    pub fn expire(&mut self, now: u64) -> Vec<Lease> {
        let out: Vec<Lease> = self
            .leases
            .values()
            .filter(|l| l.expires <= now && !self.lapsed.contains(&l.mac))
            .cloned()
            .collect();
        self.lapsed.extend(out.iter().map(|l| l.mac));
        self.offers.retain(|_, (_, until)| *until > now);
        self.offered_ips.retain(|_, (_, until)| *until > now);
        self.declined.retain(|_, until| *until > now);
        out
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
            search: vec![],
            route: vec![],
            ntp: vec![],
            mtu: None,
            option: vec![],
        }
    }
    const LINK: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);

    fn mac(n: u8) -> MacAddr {
        MacAddr([2, 0, 0, 0, 0, n])
    }

    fn key(n: u8) -> ClientKey<'static> {
        ClientKey {
            mac: mac(n),
            client_id: None,
        }
    }

    #[test]
    fn same_client_same_address() {
        let mut p = Pool::new(vec![subnet()], []);
        let a = p.offer(&key(1), LINK, None, 0).unwrap();
        let lease = p.prepare(&key(1), LINK, a, None, 0).unwrap();
        p.apply(lease);
        assert_eq!(p.offer(&key(1), LINK, None, 10), Some(a));
        assert_ne!(p.offer(&key(2), LINK, None, 10), Some(a));
    }

    #[test]
    fn offers_are_held_then_exhaust() {
        let mut p = Pool::new(vec![subnet()], []);
        let ips: Vec<_> = (1..=3)
            .map(|n| p.offer(&key(n), LINK, None, 0).unwrap())
            .collect();
        assert_eq!(ips.len(), 3);
        assert_eq!(
            p.offer(&key(4), LINK, None, 0),
            None,
            "pool of three is exhausted"
        );
        // After the hold time the offers lapse.
        assert!(p.offer(&key(4), LINK, None, OFFER_HOLD_SECS + 1).is_some());
    }

    #[test]
    fn taken_and_declined_addresses_are_refused() {
        let mut p = Pool::new(vec![subnet()], []);
        let a = p.offer(&key(1), LINK, None, 0).unwrap();
        p.apply(p.prepare(&key(1), LINK, a, None, 0).unwrap());
        assert!(matches!(
            p.check(&key(2), LINK, a, 1),
            Err(NakReason::Taken { .. })
        ));
        p.decline(&mac(1), a, 1);
        assert_eq!(p.check(&key(2), LINK, a, 2), Err(NakReason::Quarantined(a)));
        assert_ne!(p.offer(&key(2), LINK, Some(a), 2), Some(a));
        assert!(matches!(
            p.check(&key(2), LINK, Ipv4Addr::new(192, 168, 1, 5), 2),
            Err(NakReason::WrongNetwork(_))
        ));
    }

    #[test]
    fn an_expired_lease_is_remembered_until_another_client_needs_it() {
        let mut p = Pool::new(vec![subnet()], []);
        let a = p.offer(&key(1), LINK, None, 0).unwrap();
        p.apply(p.prepare(&key(1), LINK, a, None, 0).unwrap());
        let ended = p.expire(601);
        assert_eq!(ended.iter().map(|l| l.ip).collect::<Vec<_>>(), [a]);
        assert!(p.expire(602).is_empty(), "reported once");
        // Others get the addresses nobody remembers first.
        let b = p.offer(&key(2), LINK, None, 700).unwrap();
        let c = p.offer(&key(3), LINK, None, 700).unwrap();
        assert!(b != a && c != a);
        // The client coming back later gets its previous address.
        assert_eq!(p.offer(&key(1), LINK, None, 700), Some(a));
        // Once the pool has nothing else, another client takes it over...
        let mut q = Pool::new(vec![subnet()], []);
        let a = q.offer(&key(1), LINK, None, 0).unwrap();
        q.apply(q.prepare(&key(1), LINK, a, None, 0).unwrap());
        q.expire(601);
        for n in 2..=3 {
            let ip = q.offer(&key(n), LINK, None, 700).unwrap();
            q.apply(q.prepare(&key(n), LINK, ip, None, 700).unwrap());
        }
        let d = q.offer(&key(4), LINK, None, 700).unwrap();
        assert_eq!(
            d, a,
            "the remembered address is used when nothing else is free"
        );
        q.apply(q.prepare(&key(4), LINK, d, None, 700).unwrap());
        // ...and the first client is forgotten: it gets nothing (the pool is full).
        assert!(q.lease(&mac(1)).is_none());
        assert_eq!(q.offer(&key(1), LINK, None, 700), None);
    }

    #[test]
    fn expired_leases_free_their_address() {
        let mut p = Pool::new(vec![subnet()], []);
        let a = p.offer(&key(1), LINK, None, 0).unwrap();
        p.apply(p.prepare(&key(1), LINK, a, None, 0).unwrap());
        assert!(p.check(&key(2), LINK, a, 601).is_ok());
    }

    /// Regression (fuzz/artifacts/dhcp_engine/double-lease-min): A's lease expires, B is given
    /// the address, then A releases it (or moves to another address). That must not free B's
    /// address for a third client.
    #[test]
    fn stale_lease_does_not_free_the_new_holders_address() {
        for a_moves_instead in [false, true] {
            let mut p = Pool::new(vec![subnet()], []);
            let x = p.offer(&key(1), LINK, None, 0).unwrap();
            p.apply(p.prepare(&key(1), LINK, x, None, 0).unwrap());
            // A's lease (600 s) has expired; B takes the address.
            p.apply(p.prepare(&key(2), LINK, x, None, 700).unwrap());
            assert_eq!(p.owner(x), Some(mac(2)));
            if a_moves_instead {
                let y = p.offer(&key(1), LINK, None, 701).unwrap();
                assert_ne!(y, x);
                p.apply(p.prepare(&key(1), LINK, y, None, 701).unwrap());
            } else {
                p.release(&mac(1), x);
            }
            assert_eq!(p.owner(x), Some(mac(2)), "B still owns the address");
            assert!(matches!(
                p.check(&key(3), LINK, x, 702),
                Err(NakReason::Taken { .. })
            ));
            assert_ne!(p.offer(&key(3), LINK, Some(x), 702), Some(x));
        }
    }
}
