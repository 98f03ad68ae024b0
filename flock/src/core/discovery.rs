//! Discovery: finding nodes that are not members yet, by probing random addresses of the
//! configured address space (fast while alone), the seeds, and members held dead (which may live
//! on in another flock). With security on, a discovery probe is a join handshake.

use std::net::SocketAddr;
use std::time::Duration;

use rand::Rng;

use super::machine::Flock;
use super::timer::Timer;
use crate::config::Config;
use crate::crypto::Purpose;

/// Where a discovery round probes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Target {
    /// A seed (given at start or by `crux join`): probed whatever we hold of it.
    Seed(SocketAddr),
    /// An address of the space: probed unless a live member is there.
    Space(SocketAddr),
}

/// The discovery state.
#[derive(Default)]
pub(super) struct Discovery {
    /// Discovery rounds run so far (while alone, every other round goes to a seed).
    pub(super) round: u64,
}

impl Discovery {
    /// The address the next round probes (None: nothing this round). While `alone`, every
    /// other round goes to the next seed; otherwise a random address of the space (a random
    /// seed when the space is empty). Never this node's own address `me`.
    pub(super) fn next_target(
        &mut self,
        alone: bool,
        config: &Config,
        me: SocketAddr,
        rng: &mut impl Rng,
    ) -> Option<Target> {
        self.round += 1;
        let seeds = &config.seeds;
        if alone && !seeds.is_empty() && (self.round % 2 == 1) {
            let addr = seeds[(self.round / 2) as usize % seeds.len()];
            if addr != me {
                return Some(Target::Seed(addr));
            }
        }
        let port = me.port();
        let size = config.space.size(port);
        if size == 0 {
            if alone && !seeds.is_empty() {
                let addr = seeds[rng.gen_range(0..seeds.len())];
                if addr != me {
                    return Some(Target::Seed(addr));
                }
            }
            return None;
        }
        let addr = config.space.nth(rng.gen_range(0..size), port)?;
        (addr != me).then_some(Target::Space(addr))
    }
}

impl Flock {
    /// A discovery round: probe the [`Discovery::next_target`].
    pub(super) fn discovery_round(&mut self, alone: bool) {
        let me = self.me.addr;
        let target = self
            .discovery
            .next_target(alone, &self.config, me, &mut self.rng);
        match target {
            Some(Target::Seed(addr)) => self.send_discovery_ping(addr),
            Some(Target::Space(addr)) => {
                let live_there = self
                    .members
                    .id_at(&addr)
                    .is_some_and(|id| self.members.is_live(id));
                if live_there {
                    return; // a live member: nothing to discover there
                }
                // Unknown, or a member we hold dead: it may live on in another flock (with
                // security on, under other keys, which only a handshake gets across).
                self.send_discovery_ping(addr);
            }
            None => {}
        }
    }

    /// Probes an address that is not a known member. With security on, that is a join
    /// handshake (sealed under the secondary key): it works before we hold any transient key,
    /// and it reaches flocks that formed apart under other transient keys.
    pub(super) fn send_discovery_ping(&mut self, addr: SocketAddr) {
        if self.keys.sec.is_some() {
            self.send_handshake(addr, Purpose::Join);
        } else {
            self.send_ping(addr, None);
        }
    }

    /// Timer: a discovery round (fast while alone).
    pub(super) fn on_discovery_timer(&mut self, now: Duration) {
        let t = &self.config.timing;
        let alone = self.members.live_len() == 0;
        let next = now
            + if alone {
                t.discovery_interval_alone
            } else {
                t.discovery_interval
            };
        self.schedule(next, Timer::Discovery);
        if !self.leaving {
            self.discovery_round(alone);
        }
    }

    /// Timer: probe a member held dead (it may have come back, or live on in another flock).
    pub(super) fn on_dead_probe_timer(&mut self, now: Duration) {
        let next = now + self.config.timing.dead_probe_interval;
        self.schedule(next, Timer::DeadProbe);
        if !self.leaving {
            if let Some(id) = self.members.choose_dead(&mut self.rng) {
                let addr = self.addr(id);
                self.send_ping(addr, Some(id));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{AddressSpace, Preset};
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn addr(i: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, i], 7700))
    }

    fn config(space: &[&str], seeds: &[SocketAddr]) -> Config {
        let mut c = Config::new("b", Preset::Lan);
        c.space = AddressSpace::parse(space, &[]).unwrap();
        c.seeds = seeds.to_vec();
        c
    }

    #[test]
    fn while_alone_every_other_round_goes_to_the_next_seed() {
        let c = config(&["10.0.1.0/24"], &[addr(1), addr(2), addr(3)]);
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut d = Discovery::default();
        let targets: Vec<_> = (0..6)
            .map(|_| d.next_target(true, &c, addr(9), &mut rng).unwrap())
            .collect();
        assert_eq!(targets[0], Target::Seed(addr(1)));
        assert_eq!(targets[2], Target::Seed(addr(2)));
        assert_eq!(targets[4], Target::Seed(addr(3)));
        for t in [targets[1], targets[3], targets[5]] {
            assert!(
                matches!(t, Target::Space(a) if c.space.contains(a, 7700)),
                "{t:?}"
            );
        }
        // Not alone: the space only.
        let t = d.next_target(false, &c, addr(9), &mut rng).unwrap();
        assert!(matches!(t, Target::Space(_)));
    }

    #[test]
    fn never_this_node_and_seeds_stand_in_for_an_empty_space() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let only_me = config(&["10.0.0.9"], &[]);
        let mut d = Discovery::default();
        assert_eq!(d.next_target(true, &only_me, addr(9), &mut rng), None);
        let no_space = config(&[], &[addr(1)]);
        assert_eq!(no_space.space.size(7700), 0);
        let mut d = Discovery { round: 1 }; // the next round is even: not the seed's turn
        assert_eq!(
            d.next_target(true, &no_space, addr(9), &mut rng),
            Some(Target::Seed(addr(1)))
        );
        assert_eq!(d.next_target(false, &no_space, addr(9), &mut rng), None);
    }
}
