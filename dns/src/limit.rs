//! The bounds on what one source can make the server do: a token bucket per source address, and
//! the size a UDP answer may have (no amplification).

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use tokio::time::Instant;

/// An answer over UDP is at most this many times the size of its query (RFC 8482's concern:
/// a small spoofed query must not buy a large answer towards its victim). Past it, TC is set
/// and the client asks again over TCP, which needs a real handshake.
pub const MAX_AMPLIFICATION: usize = 10;

/// The UDP payload this server offers and honours at most with EDNS (1232 bytes: the DNS flag
/// day 2020 value, which avoids IP fragmentation).
pub const EDNS_PAYLOAD_MAX: u16 = 1232;

/// RFC 1035 §4.2.1: without EDNS a UDP message is at most 512 bytes.
pub const UDP_PAYLOAD_PLAIN: u16 = 512;

/// How large a UDP answer to a query of `query_len` bytes may be, when the query advertised
/// `edns_payload` (None: no EDNS).
pub fn udp_answer_limit(query_len: usize, edns_payload: Option<u16>) -> usize {
    let client = match edns_payload {
        Some(p) => p.clamp(UDP_PAYLOAD_PLAIN, EDNS_PAYLOAD_MAX),
        None => UDP_PAYLOAD_PLAIN,
    };
    usize::from(client).min(query_len.saturating_mul(MAX_AMPLIFICATION))
}

/// A token bucket per source address: `rate_per_s` tokens a second, at most `burst` saved.
/// At most `sources_max` sources are tracked; when full, sources whose bucket has refilled are
/// forgotten, and if none has, the new source is refused until one does (a flood of spoofed
/// sources cannot grow the table).
#[derive(Debug)]
pub struct RateLimiter {
    rate_per_s: f64,
    burst: f64,
    sources_max: usize,
    buckets: HashMap<IpAddr, Bucket>,
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl RateLimiter {
    /// A limiter; `rate_per_s == 0` lets everything through.
    pub fn new(rate_per_s: u32, burst: u32, sources_max: usize) -> RateLimiter {
        RateLimiter {
            rate_per_s: f64::from(rate_per_s),
            burst: f64::from(burst.max(1)),
            sources_max: sources_max.max(1),
            buckets: HashMap::new(),
        }
    }

    /// Whether a query from `src` at `now` may be answered (takes a token if so).
    pub fn allow(&mut self, src: IpAddr, now: Instant) -> bool {
        if self.rate_per_s == 0.0 {
            return true;
        }
        if !self.buckets.contains_key(&src) && self.buckets.len() >= self.sources_max {
            let full_after = Duration::from_secs_f64(self.burst / self.rate_per_s);
            self.buckets
                .retain(|_, b| now.saturating_duration_since(b.at) < full_after);
            if self.buckets.len() >= self.sources_max {
                return false;
            }
        }
        let (rate, burst) = (self.rate_per_s, self.burst);
        let b = self.buckets.entry(src).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * rate).min(burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Sources tracked now.
    pub fn sources(&self) -> usize {
        self.buckets.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_answer_limit_is_a_small_multiple_of_the_query_and_within_the_payload() {
        assert_eq!(udp_answer_limit(30, None), 300);
        assert_eq!(udp_answer_limit(60, None), 512);
        assert_eq!(udp_answer_limit(60, Some(4096)), 600);
        assert_eq!(udp_answer_limit(200, Some(4096)), 1232);
        assert_eq!(udp_answer_limit(200, Some(100)), 512);
        for len in 0..2000 {
            for p in [None, Some(0), Some(512), Some(1400), Some(65535)] {
                let l = udp_answer_limit(len, p);
                assert!(l <= len * MAX_AMPLIFICATION && l <= 1232, "{len} {p:?}");
            }
        }
    }

    #[test]
    fn a_source_gets_its_burst_then_its_rate() {
        let t0 = Instant::now();
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        let mut rl = RateLimiter::new(10, 5, 100);
        assert_eq!((0..8).filter(|_| rl.allow(a, t0)).count(), 5);
        // Another source is not affected.
        assert!(rl.allow(b, t0));
        // 0.5 s later: 5 more tokens.
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!((0..8).filter(|_| rl.allow(a, t1)).count(), 5);
        // A long pause refills only up to the burst.
        let t2 = t1 + Duration::from_secs(60);
        assert_eq!((0..20).filter(|_| rl.allow(a, t2)).count(), 5);
    }

    #[test]
    fn the_source_table_is_bounded() {
        let t0 = Instant::now();
        let mut rl = RateLimiter::new(10, 5, 2);
        let ip = |i: u8| IpAddr::from([127, 0, 0, i]);
        assert!(rl.allow(ip(1), t0));
        assert!(rl.allow(ip(2), t0));
        // Full, and no bucket has refilled: a third source waits.
        assert!(!rl.allow(ip(3), t0));
        assert_eq!(rl.sources(), 2);
        // Once the others' buckets are full again they are forgotten.
        let later = t0 + Duration::from_secs(1);
        assert!(rl.allow(ip(3), later));
        assert!(rl.sources() <= 2);
    }

    #[test]
    fn rate_zero_is_unlimited() {
        let mut rl = RateLimiter::new(0, 0, 1);
        let t0 = Instant::now();
        assert!((0..10_000).all(|i| rl.allow(IpAddr::from([10, 0, (i / 256) as u8, i as u8]), t0)));
    }
}
