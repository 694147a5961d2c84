//! Hardware (MAC) addresses: the key that follows a machine through its whole boot.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Finds the MAC of a client from its IP address (DHCP leases, else the kernel's ARP table).
/// TFTP and HTTP requests carry no MAC, but their events are keyed on one.
pub type MacLookup = std::sync::Arc<dyn Fn(std::net::IpAddr) -> Option<MacAddr> + Send + Sync>;

/// Most machines a [`MacMemory`] keeps: a lab or a rack, with room; beyond it the machine heard
/// from longest ago is forgotten (a flood of made-up MACs cannot grow it).
pub const MAX_REMEMBERED_MACHINES: usize = 4096;

/// What each machine last announced about itself, by MAC, bounded by
/// [`MAX_REMEMBERED_MACHINES`]. DHCP sees facts that later requests of the same boot do not
/// carry (TFTP and template requests carry neither a UUID nor an architecture), so the DHCP
/// engine remembers them here and TFTP and HTTP look them up. What is remembered is what the
/// client claims, like its MAC: facts for choosing a plan, not credentials.
#[derive(Debug)]
pub struct MacMemory<T> {
    inner: std::sync::Mutex<MacMap<T>>,
}

#[derive(Debug)]
struct MacMap<T> {
    /// MAC to (value, number of the last announcement).
    by_mac: std::collections::HashMap<MacAddr, (T, u64)>,
    /// Number of the next announcement.
    next: u64,
}

impl<T> Default for MacMemory<T> {
    fn default() -> Self {
        MacMemory {
            inner: std::sync::Mutex::new(MacMap {
                by_mac: std::collections::HashMap::new(),
                next: 0,
            }),
        }
    }
}

/// The SMBIOS UUID each machine last announced: DHCP option 97 as the DHCP engine saw it, or
/// iPXE's `${uuid}` in a script request (text `8-4-4-4-12`, lower case). Template requests
/// (preseed, kickstart, cloud-init) carry neither, so their `uuid` fact comes from here.
pub type UuidMemory = MacMemory<String>;

impl<T: Clone> MacMemory<T> {
    fn lock(&self) -> std::sync::MutexGuard<'_, MacMap<T>> {
        match self.inner.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// `mac` announced `value`.
    pub fn remember(&self, mac: MacAddr, value: impl Into<T>) {
        let mut map = self.lock();
        let seq = map.next;
        map.next = seq.wrapping_add(1);
        if let Some(entry) = map.by_mac.get_mut(&mac) {
            *entry = (value.into(), seq);
            return;
        }
        if map.by_mac.len() >= MAX_REMEMBERED_MACHINES
            && let Some(oldest) = map
                .by_mac
                .iter()
                .min_by_key(|(_, (_, s))| *s)
                .map(|(m, _)| *m)
        {
            map.by_mac.remove(&oldest);
        }
        map.by_mac.insert(mac, (value.into(), seq));
    }

    /// What `mac` last announced, if anything.
    pub fn get(&self, mac: &MacAddr) -> Option<T> {
        self.lock().by_mac.get(mac).map(|(v, _)| v.clone())
    }
}

/// An Ethernet hardware address. Every boot event, lease and policy match is keyed on it,
/// because firmware, iPXE and the booted OS each send a different client identifier.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// The MAC as iPXE's `${net0/mac:hexhyp}` and pxelinux's `01-<mac>` spell it.
    pub fn hyphenated(&self) -> String {
        self.to_string().replace(':', "-")
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Why a string is not a MAC address.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("`{0}` is not a MAC address (expected six hex octets like 52:54:00:12:34:56)")]
pub struct MacParseError(pub String);

impl FromStr for MacAddr {
    type Err = MacParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 6];
        let mut parts = s.split([':', '-']);
        for slot in out.iter_mut() {
            let part = parts.next().ok_or_else(|| MacParseError(s.into()))?;
            if part.len() != 2 {
                return Err(MacParseError(s.into()));
            }
            *slot = u8::from_str_radix(part, 16).map_err(|_| MacParseError(s.into()))?;
        }
        if parts.next().is_some() {
            return Err(MacParseError(s.into()));
        }
        Ok(MacAddr(out))
    }
}

impl Serialize for MacAddr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_colons_and_hyphens() {
        let m: MacAddr = "52:54:00:AB:cd:01".parse().unwrap();
        assert_eq!(m.0, [0x52, 0x54, 0, 0xab, 0xcd, 1]);
        assert_eq!("52-54-00-ab-cd-01".parse::<MacAddr>().unwrap(), m);
        assert_eq!(m.hyphenated(), "52-54-00-ab-cd-01");
    }

    #[test]
    fn rejects_bad_input() {
        for bad in [
            "",
            "52:54",
            "52:54:00:ab:cd:01:02",
            "5:54:00:ab:cd:01",
            "zz:54:00:ab:cd:01",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn uuid_memory_keeps_the_latest_and_forgets_the_oldest() {
        let mem = UuidMemory::default();
        let a = MacAddr([2, 0, 0, 0, 0, 1]);
        assert_eq!(mem.get(&a), None);
        mem.remember(a, "00000000-0000-4000-8000-000000000001");
        mem.remember(a, "00000000-0000-4000-8000-000000000002");
        assert_eq!(
            mem.get(&a).as_deref(),
            Some("00000000-0000-4000-8000-000000000002")
        );
        // Fill it: `a` announced first, so it is the one forgotten when one more arrives.
        for i in 1..MAX_REMEMBERED_MACHINES as u32 {
            let [_, b, c, d] = i.to_be_bytes();
            mem.remember(MacAddr([6, 0, 0, b, c, d]), "x");
        }
        assert!(mem.get(&a).is_some());
        mem.remember(MacAddr([6, 1, 0, 0, 0, 0]), "y");
        assert_eq!(mem.get(&a), None);
        assert_eq!(mem.get(&MacAddr([6, 1, 0, 0, 0, 0])).as_deref(), Some("y"));
    }
}
