//! Importers for moving to pxed from dnsmasq or ISC dhcpd: their lease files become leases in
//! pxed's store, their static hosts become `[[dhcp.reservation]]` entries. Parsing is pure;
//! bad lines are reported with their line number, never guessed at.

use std::net::Ipv4Addr;

use crate::dhcp::pool::Lease;
use crate::mac::MacAddr;

/// Which server the files come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// dnsmasq: lease file lines `EXPIRY MAC IP HOSTNAME CLIENTID`; config `dhcp-host=`.
    Dnsmasq,
    /// ISC dhcpd: `lease IP { ... }` blocks; config `host NAME { hardware ethernet; fixed-address; }`.
    Dhcpd,
}

/// A static host found in the old server's config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reservation {
    /// Hardware address.
    pub mac: MacAddr,
    /// Fixed address.
    pub ip: Ipv4Addr,
    /// Hostname, if given.
    pub hostname: Option<String>,
}

impl Reservation {
    /// The entry as pxed config TOML.
    pub fn to_toml(&self) -> String {
        let mut s = format!(
            "[[dhcp.reservation]]\nmac = \"{}\"\nip = \"{}\"\n",
            self.mac, self.ip
        );
        if let Some(h) = &self.hostname {
            s.push_str(&format!("hostname = {h:?}\n"));
        }
        s
    }
}

/// Leases from a lease file, keeping only those that have not expired at `now` (seconds).
/// Errors name the line.
pub fn leases(source: Source, text: &str, now: u64) -> Result<Vec<Lease>, String> {
    let all = match source {
        Source::Dnsmasq => dnsmasq_leases(text)?,
        Source::Dhcpd => dhcpd_leases(text)?,
    };
    // dhcpd appends a block per change: the last one for an address wins; expired go.
    let mut by_mac: std::collections::BTreeMap<MacAddr, Lease> = Default::default();
    for l in all {
        by_mac.insert(l.mac, l);
    }
    Ok(by_mac.into_values().filter(|l| l.expires > now).collect())
}

fn dnsmasq_leases(text: &str) -> Result<Vec<Lease>, String> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let f: Vec<&str> = line.split_whitespace().collect();
        // "duid ..." lines are DHCPv6; IPv6 leases have no MAC in field 2.
        if f.is_empty() || f.first() == Some(&"duid") {
            continue;
        }
        let bad = || format!("line {}: not a dnsmasq lease: {line}", i + 1);
        let [expiry, mac, ip, rest @ ..] = f.as_slice() else {
            return Err(bad());
        };
        let Ok(ip) = ip.parse::<Ipv4Addr>() else {
            continue; // an IPv6 lease
        };
        let expiry: u64 = expiry.parse().map_err(|_| bad())?;
        let hostname = rest.first().filter(|h| **h != "*").map(|h| h.to_string());
        let client_id = rest
            .get(1)
            .filter(|c| **c != "*")
            .map(|c| c.replace(':', ""));
        out.push(Lease {
            mac: mac.parse().map_err(|_| bad())?,
            ip,
            // dnsmasq writes 0 for infinite leases.
            expires: if expiry == 0 { u64::MAX / 2 } else { expiry },
            hostname,
            client_id,
        });
    }
    Ok(out)
}

/// Days since 1970-01-01 of a civil date (proleptic Gregorian).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `ends 4 2024/01/02 03:04:05;` (UTC) or `ends never;` or `ends epoch 1700000000;`.
fn dhcpd_time(words: &[&str]) -> Option<u64> {
    match words {
        ["never", ..] => Some(u64::MAX / 2),
        ["epoch", secs, ..] => secs.trim_end_matches(';').parse().ok(),
        [_, date, time, ..] => {
            let d: Vec<i64> = date
                .split('/')
                .map(|p| p.parse().ok())
                .collect::<Option<_>>()?;
            let t: Vec<i64> = time
                .trim_end_matches(';')
                .split(':')
                .map(|p| p.parse().ok())
                .collect::<Option<_>>()?;
            let (&[y, mo, da], &[h, mi, s]) = (d.as_slice(), t.as_slice()) else {
                return None;
            };
            let secs = days_from_civil(y, mo, da) * 86_400 + h * 3600 + mi * 60 + s;
            u64::try_from(secs).ok()
        }
        _ => None,
    }
}

/// Split dhcpd's config/lease syntax into blocks `HEAD { STATEMENTS }` (no nesting needed for
/// leases and host blocks; groups and subnets are walked through since their bodies hold
/// hosts).
fn blocks(text: &str) -> Vec<(String, Vec<String>)> {
    let clean: String = text
        .lines()
        .map(|l| l.split('#').next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n");
    let mut out = Vec::new();
    let mut head = String::new();
    let mut body: Option<Vec<String>> = None;
    let mut stmt = String::new();
    for c in clean.chars() {
        match (c, body.is_some()) {
            ('{', false) => {
                body = Some(Vec::new());
                stmt.clear();
            }
            ('{', true) => {
                // A nested block (subnet { host { } }): start over with the inner head.
                head = stmt.trim().to_string();
                body = Some(Vec::new());
                stmt.clear();
            }
            ('}', true) => {
                if let Some(b) = body.take() {
                    out.push((head.trim().to_string(), b));
                }
                head.clear();
                stmt.clear();
            }
            (';', true) => {
                if let Some(b) = body.as_mut() {
                    b.push(stmt.trim().to_string());
                }
                stmt.clear();
            }
            (';', false) => {
                head.clear();
            }
            (c, true) => stmt.push(c),
            (c, false) => head.push(c),
        }
    }
    out
}

fn dhcpd_leases(text: &str) -> Result<Vec<Lease>, String> {
    let mut out = Vec::new();
    for (head, body) in blocks(text) {
        let Some(ip) = head.strip_prefix("lease ") else {
            continue;
        };
        let ip: Ipv4Addr = ip
            .trim()
            .parse()
            .map_err(|_| format!("lease block `{head}`: bad address"))?;
        let mut mac = None;
        let mut ends = None;
        let mut active = false;
        let mut hostname = None;
        for s in &body {
            let words: Vec<&str> = s.split_whitespace().collect();
            match words.as_slice() {
                ["hardware", "ethernet", m] => mac = m.parse::<MacAddr>().ok(),
                ["ends", rest @ ..] => ends = dhcpd_time(rest),
                ["binding", "state", st] => active = *st == "active",
                ["client-hostname", h] => hostname = Some(h.trim_matches('"').to_string()),
                _ => {}
            }
        }
        let (Some(mac), Some(expires)) = (mac, ends) else {
            continue;
        };
        if active {
            out.push(Lease {
                mac,
                ip,
                expires,
                hostname,
                client_id: None,
            });
        }
    }
    Ok(out)
}

/// Static hosts from the old server's config file.
pub fn reservations(source: Source, text: &str) -> Result<Vec<Reservation>, String> {
    match source {
        Source::Dnsmasq => {
            let mut out = Vec::new();
            for (i, line) in text.lines().enumerate() {
                let Some(spec) = line.trim().strip_prefix("dhcp-host=") else {
                    continue;
                };
                let mut mac = None;
                let mut ip = None;
                let mut hostname = None;
                for part in spec.split(',') {
                    if let Ok(m) = part.parse::<MacAddr>() {
                        mac = Some(m);
                    } else if let Ok(a) = part.parse::<Ipv4Addr>() {
                        ip = Some(a);
                    } else if !part.contains(':') && !part.contains('=') && hostname.is_none() {
                        // Lease times ("1h", "infinite") are not names.
                        let is_time = part == "infinite"
                            || part
                                .trim_end_matches(['s', 'm', 'h', 'd', 'w'])
                                .parse::<u64>()
                                .is_ok();
                        if !is_time {
                            hostname = Some(part.to_string());
                        }
                    }
                }
                match (mac, ip) {
                    (Some(mac), Some(ip)) => out.push(Reservation { mac, ip, hostname }),
                    _ => tracing::warn!(
                        line = i + 1,
                        "dhcp-host without both a MAC and an IPv4 address skipped: {line}"
                    ),
                }
            }
            Ok(out)
        }
        Source::Dhcpd => {
            let mut out = Vec::new();
            for (head, body) in blocks(text) {
                let Some(name) = head.strip_prefix("host ") else {
                    continue;
                };
                let mut mac = None;
                let mut ip = None;
                for s in &body {
                    let words: Vec<&str> = s.split_whitespace().collect();
                    match words.as_slice() {
                        ["hardware", "ethernet", m] => mac = m.parse::<MacAddr>().ok(),
                        ["fixed-address", a] => ip = a.trim_end_matches(',').parse().ok(),
                        _ => {}
                    }
                }
                match (mac, ip) {
                    (Some(mac), Some(ip)) => out.push(Reservation {
                        mac,
                        ip,
                        hostname: Some(name.trim().to_string()),
                    }),
                    _ => {
                        return Err(format!(
                            "host {name}: needs `hardware ethernet` and an IPv4 `fixed-address`"
                        ));
                    }
                }
            }
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dnsmasq_lease_file_and_hosts() {
        let text = "1700000100 52:54:00:00:00:01 10.0.0.5 pc1 01:52:54:00:00:00:01\n\
                    1600000000 52:54:00:00:00:02 10.0.0.6 * *\n\
                    duid 00:01:00:01\n\
                    1700000100 52:54:00:00:00:03 fd00::3 * 00:01\n";
        let l = leases(Source::Dnsmasq, text, 1_700_000_000).unwrap();
        assert_eq!(l.len(), 1, "the expired and the IPv6 lease are skipped");
        assert_eq!(l[0].ip, Ipv4Addr::new(10, 0, 0, 5));
        assert_eq!(l[0].hostname.as_deref(), Some("pc1"));
        assert!(leases(Source::Dnsmasq, "garbage\n", 0).is_err());

        let conf =
            "dhcp-host=52:54:00:00:00:09,10.0.0.9,db1,12h\ndhcp-host=11:22:33:44:55:66,ignore\n";
        let r = reservations(Source::Dnsmasq, conf).unwrap();
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].hostname.as_deref(), Some("db1"));
        assert!(r[0].to_toml().contains("ip = \"10.0.0.9\""));
    }

    #[test]
    fn dhcpd_leases_last_block_wins_and_hosts() {
        let text = r#"
# The format of this file is documented in the dhcpd.leases(5) manual page.
lease 10.0.0.20 {
  starts 4 2023/11/16 10:00:00;
  ends 4 2033/11/16 11:00:00;
  binding state active;
  hardware ethernet 52:54:00:00:00:20;
  client-hostname "web";
}
lease 10.0.0.21 {
  ends 4 2033/11/16 11:00:00;
  binding state free;
  hardware ethernet 52:54:00:00:00:21;
}
"#;
        let l = leases(Source::Dhcpd, text, 1_700_000_000).unwrap();
        assert_eq!(l.len(), 1);
        assert_eq!(l[0].hostname.as_deref(), Some("web"));
        // 2033-11-16 11:00:00 UTC
        assert_eq!(l[0].expires, 2_015_751_600);
        let conf = "subnet 10.0.0.0 netmask 255.255.255.0 {\n host db1 { hardware ethernet 52:54:00:00:00:30; fixed-address 10.0.0.30; }\n}\n";
        let r = reservations(Source::Dhcpd, conf).unwrap();
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].ip, Ipv4Addr::new(10, 0, 0, 30));
    }
}
