//! Per-source rate limit of handshakes: a token bucket per IP address, as WireGuard's.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::time::Duration;

/// Handshakes per second allowed from one source (WireGuard's `packetsPerSecond`).
pub const HANDSHAKES_PER_SECOND: u64 = 20;
/// Handshakes a source may send at once (WireGuard's `packetsBurstable`).
pub const HANDSHAKE_BURST: u64 = 5;

const NANOS_PER_SECOND: u64 = 1_000_000_000;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Nanoseconds of credit, at most `burst × cost`.
    tokens: u64,
    last: Duration,
}

/// A token bucket per source address with a bounded table.
///
/// Each source earns one handshake per `1 s / rate` and can save up `burst` of them. IPv6 sources
/// are grouped by /64 (one host usually owns a whole /64), IPv4 by address. When the table is
/// full the source heard from longest ago is forgotten (it comes back with a full bucket, which
/// is no more than a fresh source gets). Time is passed in, so it is deterministic.
#[derive(Debug)]
pub struct RateLimiter {
    cost_nanos: u64,
    max_tokens: u64,
    max_entries: usize,
    buckets: HashMap<IpAddr, Bucket>,
    by_time: BTreeMap<(Duration, IpAddr), ()>,
}

impl RateLimiter {
    /// WireGuard's limits: 20 per second, burst 5, for at most `max_entries` sources.
    pub fn new(max_entries: usize) -> RateLimiter {
        RateLimiter::with_rate(HANDSHAKES_PER_SECOND, HANDSHAKE_BURST, max_entries)
    }

    /// Custom limits (`per_second` and `burst` at least 1).
    pub fn with_rate(per_second: u64, burst: u64, max_entries: usize) -> RateLimiter {
        let cost_nanos = NANOS_PER_SECOND / per_second.max(1);
        RateLimiter {
            cost_nanos,
            max_tokens: cost_nanos * burst.max(1),
            max_entries: max_entries.max(1),
            buckets: HashMap::new(),
            by_time: BTreeMap::new(),
        }
    }

    /// Sources tracked.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// True when no source is tracked.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    /// Whether one more handshake from `ip` is allowed at `now` (and takes a token if so).
    pub fn allow(&mut self, ip: IpAddr, now: Duration) -> bool {
        let key = source(ip);
        if let Some(bucket) = self.buckets.get_mut(&key) {
            self.by_time.remove(&(bucket.last, key));
            let earned = now.saturating_sub(bucket.last).as_nanos();
            let earned = u64::try_from(earned).unwrap_or(u64::MAX);
            bucket.tokens = bucket.tokens.saturating_add(earned).min(self.max_tokens);
            bucket.last = bucket.last.max(now);
            self.by_time.insert((bucket.last, key), ());
            if bucket.tokens >= self.cost_nanos {
                bucket.tokens -= self.cost_nanos;
                return true;
            }
            return false;
        }
        if self.buckets.len() >= self.max_entries {
            if let Some(((_, old), ())) = self.by_time.pop_first() {
                self.buckets.remove(&old);
            }
        }
        let bucket = Bucket {
            tokens: self.max_tokens - self.cost_nanos,
            last: now,
        };
        self.buckets.insert(key, bucket);
        self.by_time.insert((now, key), ());
        true
    }

    /// Forgets sources whose buckets are full again at `now` (they would be allowed as if new):
    /// call about once a second to keep the table small.
    pub fn prune(&mut self, now: Duration) {
        let full_after = Duration::from_nanos(self.max_tokens);
        while let Some((&(last, ip), ())) = self.by_time.first_key_value() {
            if now.saturating_sub(last) < full_after {
                break;
            }
            self.by_time.pop_first();
            self.buckets.remove(&ip);
        }
    }
}

/// The key a source is limited under: the IPv4 address, or the /64 of an IPv6 address (an
/// IPv4-mapped IPv6 address counts as its IPv4 address).
fn source(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6([s[0], s[1], s[2], s[3], 0, 0, 0, 0].into())
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn ip(n: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, n))
    }

    #[test]
    fn burst_of_five_then_twenty_per_second() {
        let mut r = RateLimiter::new(100);
        let allowed: Vec<bool> = (0..7).map(|_| r.allow(ip(2), ms(1000))).collect();
        assert_eq!(allowed, [true, true, true, true, true, false, false]);
        assert!(!r.allow(ip(2), ms(1049)));
        assert!(r.allow(ip(2), ms(1050)), "one token per 50 ms");
        assert!(!r.allow(ip(2), ms(1050)));
        // Over a long run: 20 per second.
        let mut n = 0;
        for t in (2000..12_000).step_by(5) {
            n += r.allow(ip(2), ms(t)) as u32;
        }
        assert!((200..=206).contains(&n), "{n}");
        assert!(r.allow(ip(3), ms(12_000)), "other sources are independent");
    }

    #[test]
    fn idle_sources_refill_only_up_to_the_burst() {
        let mut r = RateLimiter::new(10);
        for _ in 0..5 {
            assert!(r.allow(ip(2), ms(0)));
        }
        let later: Vec<bool> = (0..6).map(|_| r.allow(ip(2), ms(60_000))).collect();
        assert_eq!(later, [true, true, true, true, true, false]);
    }

    #[test]
    fn time_going_backwards_earns_nothing() {
        let mut r = RateLimiter::new(10);
        for _ in 0..5 {
            assert!(r.allow(ip(2), ms(1000)));
        }
        assert!(!r.allow(ip(2), ms(500)));
        assert!(!r.allow(ip(2), ms(1000)));
    }

    #[test]
    fn table_is_bounded_and_evicts_the_oldest() {
        let mut r = RateLimiter::new(3);
        for n in 1..=3 {
            for _ in 0..5 {
                assert!(r.allow(ip(n), ms(n as u64)));
            }
        }
        assert!(!r.allow(ip(1), ms(10))); // 1 is now the most recent
        assert!(r.allow(ip(4), ms(11))); // evicts 2
        assert_eq!(r.len(), 3);
        assert!(
            r.allow(ip(2), ms(12)),
            "evicted: starts with a fresh bucket"
        );
        assert!(!r.allow(ip(1), ms(13)), "1 was kept");
        assert_eq!(r.by_time.len(), r.buckets.len());
    }

    #[test]
    fn prune_forgets_full_buckets() {
        let mut r = RateLimiter::new(10);
        r.allow(ip(1), ms(0));
        r.allow(ip(2), ms(200));
        r.prune(ms(250));
        assert_eq!(r.len(), 1);
        r.prune(ms(450));
        assert!(r.is_empty());
        assert!(r.by_time.is_empty());
    }

    #[test]
    fn ipv6_is_limited_per_64() {
        let mut r = RateLimiter::new(10);
        let a: Ipv6Addr = "2001:db8:1:2::1".parse().unwrap();
        let b: Ipv6Addr = "2001:db8:1:2::ffff".parse().unwrap();
        let c: Ipv6Addr = "2001:db8:1:3::1".parse().unwrap();
        for _ in 0..5 {
            assert!(r.allow(IpAddr::V6(a), ms(0)));
        }
        assert!(!r.allow(IpAddr::V6(b), ms(0)));
        assert!(r.allow(IpAddr::V6(c), ms(0)));
        let mapped = IpAddr::V6(Ipv4Addr::new(127, 0, 0, 9).to_ipv6_mapped());
        for _ in 0..5 {
            assert!(r.allow(mapped, ms(0)));
        }
        assert!(!r.allow(ip(9), ms(0)));
    }
}
