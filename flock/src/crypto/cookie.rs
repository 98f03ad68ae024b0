//! Cookies under load, as WireGuard's (whitepaper §5.4.7): a responder that is answering more
//! than [`HANDSHAKES_UNDER_LOAD`] join requests a second stops doing the x25519 work for
//! requests that carry no valid cookie and answers them with a small cookie reply instead; the
//! initiator sends its request again with the cookie, which proves it receives datagrams at the
//! source address it claims.
//!
//! A cookie is `HMAC-SHA-256(secret, source ip ‖ source port)`, cut to [`COOKIE_BYTES`]. The
//! secret is random (from the caller's seeded CSPRNG) and replaced every
//! [`COOKIE_SECRET_MAX_AGE`]; cookies made under the current or the previous secret are valid,
//! so a cookie lives between one and two rotation periods. Nothing here reads a clock or the OS
//! RNG: `now` and the RNG are passed in.
//!
//! The cookie travels sealed under the handshake key both ways (inside the cookie reply and
//! inside the request that echoes it), so only holders of the secondary key ever see one; a
//! cookie reply ([`COOKIE_REPLY_BYTES`](super::COOKIE_REPLY_BYTES)) is smaller than the request
//! that caused it ([`REQUEST_BYTES`](super::REQUEST_BYTES)).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hkdf::Hkdf;
use rand::{CryptoRng, RngCore};
use sha2::Sha256;
use zeroize::Zeroizing;

use super::keys::ct_eq;

/// Bytes of a cookie.
pub const COOKIE_BYTES: usize = 16;
/// A cookie: proof that a source address receives what is sent to it.
pub type Cookie = [u8; COOKIE_BYTES];
/// How long one cookie secret is used (WireGuard's `COOKIE_SECRET_MAX_AGE`, 2 minutes).
pub const COOKIE_SECRET_MAX_AGE: Duration = Duration::from_secs(120);
/// How long an initiator reuses a cookie it received: less than one secret's life, so that the
/// cookie is still valid when it arrives (WireGuard: the secret's age minus a latency margin).
pub const COOKIE_REUSE_MAX: Duration = Duration::from_secs(110);
/// Join requests a responder answers with keys per second before it asks for cookies (the
/// issue's "> 100 handshakes/s"); also the burst it allows.
pub const HANDSHAKES_UNDER_LOAD: u64 = 100;

const NANOS_PER_SECOND: u64 = 1_000_000_000;

/// The responder's cookie secrets: the current one and the one before.
pub struct CookieSecrets {
    current: Zeroizing<[u8; 32]>,
    previous: Option<Zeroizing<[u8; 32]>>,
    made: Option<Duration>,
}

impl std::fmt::Debug for CookieSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CookieSecrets")
            .field("made", &self.made)
            .finish_non_exhaustive()
    }
}

impl Default for CookieSecrets {
    fn default() -> Self {
        CookieSecrets::new()
    }
}

impl CookieSecrets {
    /// No secret yet: the first [`cookie`](CookieSecrets::cookie) makes one.
    pub fn new() -> CookieSecrets {
        CookieSecrets {
            current: Zeroizing::new([0; 32]),
            previous: None,
            made: None,
        }
    }

    fn rotate<R: RngCore + CryptoRng>(&mut self, now: Duration, rng: &mut R) {
        let due = self
            .made
            .is_none_or(|t| now.saturating_sub(t) >= COOKIE_SECRET_MAX_AGE);
        if !due {
            return;
        }
        let mut fresh = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(&mut fresh[..]);
        // A secret older than two periods is of no use any more.
        let keep_previous = self
            .made
            .is_some_and(|t| now.saturating_sub(t) < 2 * COOKIE_SECRET_MAX_AGE);
        let old = std::mem::replace(&mut self.current, fresh);
        self.previous = keep_previous.then_some(old);
        self.made = Some(now);
    }

    /// The cookie for `source` at `now` (under a secret made now if the current one is too old).
    pub fn cookie<R: RngCore + CryptoRng>(
        &mut self,
        now: Duration,
        source: SocketAddr,
        rng: &mut R,
    ) -> Cookie {
        self.rotate(now, rng);
        mac(&self.current, source)
    }

    /// Whether `cookie` is `source`'s at `now`: made under the current secret less than two
    /// periods ago, or under the previous one while the current one is less than a period old
    /// (a cookie is valid until two periods after its secret was made).
    pub fn check(&self, now: Duration, source: SocketAddr, cookie: &Cookie) -> bool {
        let Some(made) = self.made else {
            return false;
        };
        let age = now.saturating_sub(made);
        let current = age < 2 * COOKIE_SECRET_MAX_AGE && ct_eq(&mac(&self.current, source), cookie);
        let previous = age < COOKIE_SECRET_MAX_AGE
            && self
                .previous
                .as_ref()
                .is_some_and(|p| ct_eq(&mac(p, source), cookie));
        current | previous
    }
}

fn mac(secret: &[u8; 32], source: SocketAddr) -> Cookie {
    let mut input = [0u8; 18];
    let ip = match source.ip() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    input[..16].copy_from_slice(&ip.octets());
    input[16..].copy_from_slice(&source.port().to_be_bytes());
    // HKDF-Extract is HMAC(salt, ikm).
    let (prk, _) = Hkdf::<Sha256>::extract(Some(secret), &input);
    let mut cookie = [0u8; COOKIE_BYTES];
    cookie.copy_from_slice(&prk[..COOKIE_BYTES]);
    cookie
}

/// Whether the responder is under load: a token bucket of [`HANDSHAKES_UNDER_LOAD`] x25519
/// answers per second (and as many at once). Time is passed in.
#[derive(Debug, Clone)]
pub struct HandshakeLoad {
    cost_nanos: u64,
    max_nanos: u64,
    credit_nanos: u64,
    last: Option<Duration>,
}

impl Default for HandshakeLoad {
    fn default() -> Self {
        HandshakeLoad::new(HANDSHAKES_UNDER_LOAD)
    }
}

impl HandshakeLoad {
    /// A bucket of `per_second` answers a second (at least 1), full.
    pub fn new(per_second: u64) -> HandshakeLoad {
        let cost_nanos = NANOS_PER_SECOND / per_second.max(1);
        HandshakeLoad {
            cost_nanos,
            max_nanos: cost_nanos * per_second.max(1),
            credit_nanos: cost_nanos * per_second.max(1),
            last: None,
        }
    }

    fn refill(&mut self, now: Duration) {
        if let Some(last) = self.last {
            let earned = u64::try_from(now.saturating_sub(last).as_nanos()).unwrap_or(u64::MAX);
            self.credit_nanos = self.credit_nanos.saturating_add(earned).min(self.max_nanos);
        }
        self.last = Some(self.last.map_or(now, |l| l.max(now)));
    }

    /// Takes one answer's worth if the rate allows it; false means under load.
    pub fn try_take(&mut self, now: Duration) -> bool {
        self.refill(now);
        if self.credit_nanos >= self.cost_nanos {
            self.credit_nanos -= self.cost_nanos;
            true
        } else {
            false
        }
    }

    /// Counts one answer given whatever the load (a request with a valid cookie).
    pub fn take(&mut self, now: Duration) {
        self.refill(now);
        self.credit_nanos = self.credit_nanos.saturating_sub(self.cost_nanos);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_cookie_is_bound_to_the_source_and_lives_one_to_two_periods() {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let mut s = CookieSecrets::new();
        let t0 = Duration::from_secs(10);
        let a = addr("127.0.0.2:7700");
        assert!(!s.check(t0, a, &[0; COOKIE_BYTES]), "no secret, no cookie");
        let c = s.cookie(t0, a, &mut rng);
        assert!(s.check(t0, a, &c));
        assert!(!s.check(t0, addr("127.0.0.2:7701"), &c), "other port");
        assert!(!s.check(t0, addr("127.0.0.3:7700"), &c), "other ip");
        assert_eq!(s.cookie(t0 + Duration::from_secs(1), a, &mut rng), c);
        // Rotated: the old cookie stays valid for one more period.
        let t1 = t0 + COOKIE_SECRET_MAX_AGE;
        let c1 = s.cookie(t1, a, &mut rng);
        assert_ne!(c1, c);
        assert!(s.check(t1, a, &c));
        assert!(s.check(t1, a, &c1));
        let t2 = t1 + COOKIE_SECRET_MAX_AGE;
        assert!(!s.check(t2, a, &c), "two periods old");
        assert!(s.check(t2, a, &c1), "one period old");
        assert!(!s.check(t1 + 2 * COOKIE_SECRET_MAX_AGE, a, &c1));
        let c2 = s.cookie(t2, a, &mut rng);
        assert!(s.check(t2, a, &c1));
        assert!(!s.check(t2, a, &c));
        assert!(s.check(t2, a, &c2));
        // After a long silence no older secret is kept.
        let c3 = s.cookie(t2 + 10 * COOKIE_SECRET_MAX_AGE, a, &mut rng);
        assert!(!s.check(t2 + 10 * COOKIE_SECRET_MAX_AGE, a, &c2));
        assert!(s.check(t2 + 10 * COOKIE_SECRET_MAX_AGE, a, &c3));
    }

    #[test]
    fn the_load_gauge_allows_a_hundred_a_second() {
        let mut l = HandshakeLoad::default();
        let t = Duration::from_secs(1);
        for i in 0..HANDSHAKES_UNDER_LOAD {
            assert!(l.try_take(t), "{i}");
        }
        assert!(!l.try_take(t), "the 101st in one instant");
        assert!(l.try_take(t + Duration::from_millis(10)), "10 ms earns one");
        assert!(!l.try_take(t + Duration::from_millis(10)));
        l.take(t + Duration::from_millis(10));
        assert!(
            !l.try_take(t + Duration::from_millis(19)),
            "a forced take costs"
        );
        assert!(l.try_take(t + Duration::from_secs(5)));
    }
}
