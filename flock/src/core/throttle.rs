//! [`AddrThrottle`]: something done for an address at most once per period.

use std::net::SocketAddr;
use std::time::Duration;

use super::FastMap;

/// Most addresses a throttle remembers; past it, it forgets them all (a flood of sources can
/// only make it act a little more often, never grow it).
const ADDRS_MAX: usize = 1024;

/// When each address was last acted for.
#[derive(Default)]
pub(crate) struct AddrThrottle {
    last: FastMap<SocketAddr, Duration>,
}

impl AddrThrottle {
    /// Whether to act for `addr` now: true at most once per `period` per address (and then
    /// remembered as done at `now`).
    pub(crate) fn due(&mut self, addr: SocketAddr, now: Duration, period: Duration) -> bool {
        if self.last.get(&addr).is_some_and(|t| now < *t + period) {
            return false;
        }
        if self.last.len() >= ADDRS_MAX {
            self.last.clear();
        }
        self.last.insert(addr, now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(i: u8) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, i], 7700))
    }

    #[test]
    fn once_per_period_per_address_and_bounded() {
        let mut t = AddrThrottle::default();
        let ms = Duration::from_millis;
        let period = ms(200);
        assert!(t.due(addr(1), ms(0), period));
        assert!(!t.due(addr(1), ms(199), period));
        assert!(t.due(addr(2), ms(199), period));
        assert!(t.due(addr(1), ms(200), period));
        for i in 0..=255u8 {
            for port in 0..8u16 {
                t.due(SocketAddr::from(([10, 0, 0, i], port)), ms(300), period);
            }
        }
        assert!(t.last.len() <= ADDRS_MAX);
    }
}
