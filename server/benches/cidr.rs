//! CIDR allowlist lookup: the merged-interval binary search against a linear scan over
//! the same ranges, at 200 (AKS's limit) and 10,000 ranges.
//! Run: `cargo bench -p kinvoke-gateway --bench cidr`.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use ipnet::{IpNet, Ipv4Net};
use kinvoke_gateway::access::cidr::CidrSet;

/// Deterministic pseudo-random ranges (/16 to /32) and probe addresses.
fn fixture(n: usize) -> (Vec<IpNet>, Vec<IpAddr>) {
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let ranges = (0..n)
        .filter_map(|_| {
            let len = 16 + (next() % 17) as u8;
            Ipv4Net::new(Ipv4Addr::from(next() as u32), len)
                .ok()
                .map(|n| IpNet::V4(n.trunc()))
        })
        .collect();
    let probes = (0..1024)
        .map(|_| IpAddr::V4(Ipv4Addr::from(next() as u32)))
        .collect();
    (ranges, probes)
}

fn lookup(c: &mut Criterion) {
    let mut group = c.benchmark_group("cidr_contains");
    for n in [200usize, 10_000] {
        let (ranges, probes) = fixture(n);
        let set = CidrSet::new(ranges.clone());
        let mut i = 0usize;
        group.bench_with_input(BenchmarkId::new("cidr_set", n), &n, |b, _| {
            b.iter(|| {
                i = (i + 1) & 1023;
                black_box(set.contains(black_box(probes[i])))
            })
        });
        let mut j = 0usize;
        group.bench_with_input(BenchmarkId::new("linear_scan", n), &n, |b, _| {
            b.iter(|| {
                j = (j + 1) & 1023;
                let ip = black_box(probes[j]);
                black_box(ranges.iter().any(|r| r.contains(&ip)))
            })
        });
        let mapped: Vec<IpAddr> = probes
            .iter()
            .map(|p| match p {
                IpAddr::V4(v4) => IpAddr::V6(v4.to_ipv6_mapped()),
                v6 => *v6,
            })
            .collect();
        let mut k = 0usize;
        group.bench_with_input(BenchmarkId::new("cidr_set_mapped_v6", n), &n, |b, _| {
            b.iter(|| {
                k = (k + 1) & 1023;
                black_box(set.contains(black_box(mapped[k])))
            })
        });
    }
    group.finish();
}

criterion_group!(benches, lookup);
criterion_main!(benches);
