//! IP allowlists: a set of CIDR ranges matched in O(log n). Ranges are merged into
//! sorted, disjoint intervals once at load, so a lookup is one binary search whatever the
//! number of ranges. IPv4-mapped IPv6 peers (`::ffff:a.b.c.d`) are matched as IPv4, so
//! a dual-stack socket cannot slip past a v4 rule.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;

/// A set of CIDR ranges; empty means "not restricted" only where the caller says so.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct CidrSet {
    ranges: Vec<IpNet>,
    v4: Vec<(u32, u32)>,
    v6: Vec<(u128, u128)>,
}

impl fmt::Debug for CidrSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.ranges.iter().map(|r| r.to_string()))
            .finish()
    }
}

/// A range that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "\"{0}\" is not an IP address or CIDR range (e.g. \"203.0.113.0/24\", \"2001:db8::/32\", \"10.1.2.3\")"
)]
pub struct BadRange(pub String);

/// Parses a CIDR or a bare address (which means /32 or /128); host bits are cleared.
pub fn parse_range(text: &str) -> Result<IpNet, BadRange> {
    let text = text.trim();
    if let Ok(net) = IpNet::from_str(text) {
        return Ok(net.trunc());
    }
    IpAddr::from_str(text)
        .map(IpNet::from)
        .map_err(|_| BadRange(text.to_owned()))
}

/// The address as matched: IPv4-mapped IPv6 becomes IPv4.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

fn merge<T: Copy + Ord + num_like::Succ>(mut spans: Vec<(T, T)>) -> Vec<(T, T)> {
    spans.sort_unstable();
    let mut out: Vec<(T, T)> = Vec::with_capacity(spans.len());
    for (lo, hi) in spans {
        match out.last_mut() {
            // overlapping or adjacent: extend
            Some(last) if lo <= last.1.succ_saturating() => {
                if hi > last.1 {
                    last.1 = hi;
                }
            }
            _ => out.push((lo, hi)),
        }
    }
    out
}

mod num_like {
    pub trait Succ {
        fn succ_saturating(self) -> Self;
    }
    impl Succ for u32 {
        fn succ_saturating(self) -> Self {
            self.saturating_add(1)
        }
    }
    impl Succ for u128 {
        fn succ_saturating(self) -> Self {
            self.saturating_add(1)
        }
    }
}

fn contains<T: Copy + Ord>(spans: &[(T, T)], x: T) -> bool {
    // the last interval starting at or before x is the only candidate
    let idx = spans.partition_point(|(lo, _)| *lo <= x);
    idx > 0 && x <= spans[idx - 1].1
}

impl CidrSet {
    /// A set of ranges.
    pub fn new(ranges: Vec<IpNet>) -> Self {
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        for r in &ranges {
            match r.trunc() {
                IpNet::V4(n) => v4.push((u32::from(n.network()), u32::from(n.broadcast()))),
                IpNet::V6(n) => {
                    // a mapped v6 range (::ffff:0:0/96 and below) also covers those v4 peers
                    if n.prefix_len() >= 96 && n.network().to_ipv4_mapped().is_some() {
                        let lo = n.network().to_ipv4_mapped().map(u32::from).unwrap_or(0);
                        let hi = n.broadcast().to_ipv4_mapped().map(u32::from).unwrap_or(0);
                        v4.push((lo, hi));
                    }
                    v6.push((u128::from(n.network()), u128::from(n.broadcast())));
                }
            }
        }
        Self {
            ranges,
            v4: merge(v4),
            v6: merge(v6),
        }
    }

    /// Parses a list of ranges; the error names the bad entry.
    pub fn parse<S: AsRef<str>>(texts: &[S]) -> Result<Self, BadRange> {
        texts
            .iter()
            .map(|t| parse_range(t.as_ref()))
            .collect::<Result<Vec<_>, _>>()
            .map(Self::new)
    }

    /// True when no range is configured.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// The configured ranges, as written (host bits cleared).
    pub fn ranges(&self) -> &[IpNet] {
        &self.ranges
    }

    /// True when `ip` is inside some range (mapped IPv6 is matched as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match canonical(ip) {
            IpAddr::V4(v4) => contains(&self.v4, u32::from(v4)),
            IpAddr::V6(v6) => contains(&self.v6, u128::from(v6)),
        }
    }

    /// The first configured range holding `ip`, for audit messages (linear; not the hot path).
    pub fn matching_range(&self, ip: IpAddr) -> Option<IpNet> {
        let ip = canonical(ip);
        self.ranges.iter().copied().find(|r| match (r, ip) {
            (IpNet::V6(n), IpAddr::V4(v4)) => n.contains(&v4.to_ipv6_mapped()),
            (r, ip) => r.contains(&ip),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn membership_table() {
        let cases: &[(&[&str], &str, bool)] = &[
            (&["10.0.0.0/8"], "10.255.255.255", true),
            (&["10.0.0.0/8"], "11.0.0.0", false),
            (&["10.0.0.0/8"], "9.255.255.255", false),
            (&["10.1.2.3"], "10.1.2.3", true),
            (&["10.1.2.3"], "10.1.2.4", false),
            (&["10.1.2.3/32"], "10.1.2.3", true),
            (&["0.0.0.0/0"], "203.0.113.9", true),
            (&["0.0.0.0/0"], "2001:db8::1", false),
            (&["::/0"], "2001:db8::1", true),
            (&["::/0"], "198.51.100.1", false),
            (&["2001:db8::/32"], "2001:db8:ffff::1", true),
            (&["2001:db8::/32"], "2001:db9::1", false),
            (&["2001:db8::1/128"], "2001:db8::1", true),
            (&["2001:db8::1"], "2001:db8::2", false),
            (&["255.255.255.255/32"], "255.255.255.255", true),
            // IPv4-mapped IPv6 peers are matched as IPv4
            (&["10.0.0.0/8"], "::ffff:10.1.2.3", true),
            (&["10.0.0.0/8"], "::ffff:192.168.1.1", false),
            (&["127.0.0.2/32"], "::ffff:127.0.0.3", false),
            // a v6 rule does not admit a mapped v4 peer outside its mapped range
            (&["2001:db8::/32"], "::ffff:10.1.2.3", false),
            // a mapped v6 rule admits the v4 peer it maps
            (&["::ffff:10.0.0.0/104"], "10.9.9.9", true),
            // host bits are cleared
            (&["10.1.2.3/8"], "10.200.0.1", true),
            // adjacent and overlapping ranges merge correctly
            (
                &["10.0.0.0/9", "10.128.0.0/9", "10.64.0.0/10"],
                "10.200.0.1",
                true,
            ),
            (&["10.0.0.0/9", "10.128.0.0/9"], "11.0.0.0", false),
            (&[], "10.0.0.1", false),
        ];
        for (ranges, addr, expected) in cases {
            let set = CidrSet::parse(ranges).unwrap();
            assert_eq!(set.contains(ip(addr)), *expected, "{ranges:?} ∋ {addr}");
        }
    }

    #[test]
    fn bad_ranges_are_named() {
        let err = CidrSet::parse(&["10.0.0.0/8", "10.0.0/33"]).unwrap_err();
        assert_eq!(err, BadRange("10.0.0/33".into()));
        assert!(parse_range("10.0.0.0/33").is_err());
        assert!(parse_range("::/129").is_err());
    }

    #[test]
    fn matching_range_names_the_rule() {
        let set = CidrSet::parse(&["192.168.0.0/16", "10.0.0.0/8"]).unwrap();
        assert_eq!(
            set.matching_range(ip("::ffff:10.0.0.1")),
            Some("10.0.0.0/8".parse().unwrap())
        );
        assert_eq!(set.matching_range(ip("8.8.8.8")), None);
    }

    #[test]
    fn many_ranges_agree_with_a_linear_scan() {
        // deterministic pseudo-random ranges and probes
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let ranges: Vec<IpNet> = (0..2000)
            .map(|_| {
                let addr = std::net::Ipv4Addr::from(next() as u32);
                let len = 8 + (next() % 25) as u8;
                IpNet::V4(ipnet::Ipv4Net::new(addr, len).unwrap()).trunc()
            })
            .collect();
        let set = CidrSet::new(ranges.clone());
        for _ in 0..20_000 {
            let probe = IpAddr::V4(std::net::Ipv4Addr::from(next() as u32));
            let linear = ranges.iter().any(|r| r.contains(&probe));
            assert_eq!(set.contains(probe), linear, "{probe}");
        }
    }
}
